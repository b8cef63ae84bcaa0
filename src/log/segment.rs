//! One preallocated, memory-mapped segment file being appended to, and
//! read-only mappings of segments for recovery's scan.
//!
//! Shard-local. The file gets all its blocks at creation (`fallocate`), so a
//! full disk is an error when a segment is created, never a SIGBUS while
//! writing into the mapping. This file holds the log's mmap `unsafe`.

#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapMut};

use super::record;

/// File name of segment `index`.
pub fn file_name(index: u64) -> String {
    format!("{index:010}.seg")
}

/// Index of a segment file name, if it is one.
pub fn parse_file_name(name: &str) -> Option<u64> {
    // Exactly the width `file_name` writes.
    let digits = name.strip_suffix(".seg")?;
    let padded = digits.len() == 10;
    let wide = digits.len() > 10 && !digits.starts_with('0');
    if !(padded || wide) {
        return None;
    }
    super::parse_counter(digits)
}

/// Map a segment file read-only: a scan touches only the pages it reads,
/// not the preallocated zeros after the last record.
pub fn map_read(path: &Path) -> io::Result<Mmap> {
    let file = File::open(path)?;
    // SAFETY: the data directory is locked (`LOCK`) while a broker uses it,
    // and recovery runs before any shard appends, so nothing writes to or
    // truncates the file while the mapping lives.
    unsafe { Mmap::map(&file) }
}

/// A segment open for appending.
pub struct Segment {
    index: u64,
    path: PathBuf,
    map: MmapMut,
    /// Write offset: bytes used.
    used: usize,
    /// Kept open for the mapping's lifetime (and syncs).
    file: File,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("index", &self.index)
            .field("used", &self.used)
            .field("size", &self.map.len())
            .finish()
    }
}

impl Segment {
    /// Create segment `index` in `dir` with `bytes` allocated on disk and
    /// map it. Fails (ENOSPC) when the disk cannot hold it.
    pub fn create(dir: &Path, index: u64, bytes: usize) -> io::Result<Segment> {
        let path = dir.join(file_name(index));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        if let Err(e) = allocate(&file, bytes) {
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        // SAFETY: the file was just created by this process with
        // `create_new`, is exactly `bytes` long with every block allocated,
        // and no other process or mapping writes it; the mapping lives no
        // longer than `file`.
        let map = unsafe { MmapMut::map_mut(&file)? };
        Ok(Segment {
            index,
            path,
            map,
            used: 0,
            file,
        })
    }

    /// This segment's index.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Its file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes used so far.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Size of the file.
    pub fn size(&self) -> usize {
        self.map.len()
    }

    /// Write the mapping's dirty pages and the file's data to disk.
    pub fn sync(&self) -> io::Result<()> {
        self.map.flush()?;
        self.file.sync_data()
    }

    /// The bytes written so far.
    pub fn written(&self) -> &[u8] {
        &self.map[..self.used]
    }

    /// Append a record if it fits. The bytes after it are zero, and fewer
    /// than a length field's 4 read as the end, so no end marker is
    /// needed. False when it does not fit.
    pub fn append(&mut self, seq: u64, kind: u8, body: &[u8]) -> bool {
        let n = record::record_len(body.len());
        if self.used + n > self.map.len() {
            return false;
        }
        record::write(&mut self.map[self.used..self.used + n], seq, kind, body);
        self.used += n;
        true
    }
}

/// Give `file` `bytes` of allocated blocks: `fallocate`, or where the
/// filesystem lacks it, `posix_fallocate` (which writes zeros).
fn allocate(file: &File, bytes: usize) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let len = bytes as libc::off_t;
    // SAFETY: plain system calls on a descriptor this function borrows.
    let rc = unsafe { libc::fallocate(fd, 0, 0, len) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err);
    }
    // SAFETY: as above.
    let rc = unsafe { libc::posix_fallocate(fd, 0, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::record::{read, Read};

    #[test]
    fn only_names_the_log_writes_are_segments() {
        assert_eq!(parse_file_name(&file_name(7)), Some(7));
        assert_eq!(
            parse_file_name(&file_name(12_345_678_901)),
            Some(12_345_678_901)
        );
        for bad in [
            "7.seg",
            "+000000007.seg",
            "00000000007.seg",
            "18446744073709551615.seg",
            "+18446744073709551614.seg",
            "000000000x.seg",
            "0000000007.log",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn appends_until_full_then_refuses() {
        let dir = crate::log::tests::temp_dir("segment");
        let mut s = Segment::create(&dir, 3, 256).unwrap();
        assert_eq!(s.path().file_name().unwrap(), "0000000003.seg");
        let mut seq = 0;
        while s.append(seq, 1, &[7; 40]) {
            seq += 1;
        }
        assert_eq!(seq, 256 / record::record_len(40) as u64);
        drop(s);
        let bytes = std::fs::read(dir.join(file_name(3))).unwrap();
        assert_eq!(bytes.len(), 256);
        let mut off = 0;
        for want in 0..seq {
            let Read::Record(r, next) = read(&bytes, off) else {
                panic!("record {want}")
            };
            assert_eq!(r.seq, want);
            off = next;
        }
        assert_eq!(read(&bytes, off), Read::End);
        assert!(
            Segment::create(&dir, 3, 256).is_err(),
            "never reuses a file"
        );
        assert_eq!(&map_read(&dir.join(file_name(3))).unwrap()[..], &bytes[..]);
    }

    #[test]
    fn an_empty_file_maps_empty() {
        let dir = crate::log::tests::temp_dir("segment-empty");
        std::fs::write(dir.join(file_name(0)), b"").unwrap();
        assert!(map_read(&dir.join(file_name(0))).unwrap().is_empty());
    }
}
