//! One preallocated segment file being appended to.
//!
//! Shard-local. The file gets all its blocks at creation (`fallocate`, in
//! `disk.rs`), so a full disk is an error when a segment is created, never
//! a SIGBUS while writing into the mapping.

use std::io;
use std::path::{Path, PathBuf};

use super::disk::{Disk, SegmentFile};
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

/// A segment open for appending.
#[derive(Debug)]
pub struct Segment {
    index: u64,
    path: PathBuf,
    file: Box<dyn SegmentFile>,
    /// Write offset: bytes used.
    used: usize,
}

impl Segment {
    /// Create segment `index` in `dir` with `bytes` allocated on disk.
    /// Fails (ENOSPC) when the disk cannot hold it.
    pub fn create(disk: &dyn Disk, dir: &Path, index: u64, bytes: usize) -> io::Result<Segment> {
        let path = dir.join(file_name(index));
        let file = disk.create_segment(&path, bytes)?;
        Ok(Segment {
            index,
            path,
            file,
            used: 0,
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
        self.file.bytes().len()
    }

    /// Make what was written durable.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync()
    }

    /// The bytes written so far.
    pub fn written(&self) -> &[u8] {
        &self.file.bytes()[..self.used]
    }

    /// Append records already encoded (checked by the caller) if they
    /// fit; false when they do not.
    pub fn append_encoded(&mut self, records: &[u8]) -> bool {
        let range = self.used..self.used + records.len();
        if range.end > self.size() {
            return false;
        }
        self.file.bytes_mut()[range.clone()].copy_from_slice(records);
        self.file.wrote(range);
        self.used += records.len();
        true
    }

    /// Append a record if it fits. The bytes after it are zero, and fewer
    /// than a length field's 4 read as the end, so no end marker is
    /// needed. False when it does not fit.
    pub fn append(&mut self, seq: u64, kind: u8, body: &[u8]) -> bool {
        let n = record::record_len(body.len());
        let range = self.used..self.used + n;
        if range.end > self.size() {
            return false;
        }
        record::write(&mut self.file.bytes_mut()[range.clone()], seq, kind, body);
        self.file.wrote(range);
        self.used += n;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::disk::Fs;
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
        let mut s = Segment::create(&Fs, &dir, 3, 256).unwrap();
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
            Segment::create(&Fs, &dir, 3, 256).is_err(),
            "never reuses a file"
        );
        let mapped = Fs.read(&dir.join(file_name(3))).unwrap();
        assert_eq!(mapped.as_ref().as_ref(), &bytes[..]);
    }

    #[test]
    fn an_empty_file_maps_empty() {
        let dir = crate::log::tests::temp_dir("segment-empty");
        std::fs::write(dir.join(file_name(0)), b"").unwrap();
        assert!(Fs
            .read(&dir.join(file_name(0)))
            .unwrap()
            .as_ref()
            .as_ref()
            .is_empty());
    }
}
