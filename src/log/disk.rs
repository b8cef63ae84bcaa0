//! Where a log's files live, behind one small trait: the file system
//! ([`Fs`], memory-mapped segments, what the broker uses), or memory with
//! injected faults ([`MemDisk`], what the simulator uses).
//!
//! Node-wide: recovery reads and writes through it before the shards start;
//! each shard's [`Log`](super::Log) then holds its own segments through it.
//! The trait names what the log, the data directory and recovery do to
//! files, and nothing more; the power-safe group-commit task syncs with
//! io_uring on the file system itself (`shard/runtime/sync.rs`).

#![allow(unsafe_code)]

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Mmap, MmapMut};

use super::dir::DirError;

pub use super::memdisk::{MemDisk, SyncFault};

/// A file's whole content, read-only (a mapping, or a copy).
pub type Contents = Box<dyn AsRef<[u8]> + Send + Sync>;

/// The files of a data directory; see the module docs.
pub trait Disk: Send + Sync + fmt::Debug {
    /// Take the data directory `root` for this process: one broker per
    /// directory. The file system locks it (`flock` on `root/LOCK`, held
    /// while the returned file lives); memory needs no lock.
    fn lock(&self, root: &Path) -> Result<Option<File>, DirError>;
    /// Create `dir` and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Delete `dir` and everything in it.
    fn remove_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The entries directly in `dir`, files and directories, in no order.
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    /// Create the new file `path` with `bytes` allocated, for appending.
    /// Fails (ENOSPC, `StorageFull`) when the disk cannot hold it, so a
    /// full disk shows here and never as a failed write into the file.
    fn create_segment(&self, path: &Path, bytes: usize) -> io::Result<Box<dyn SegmentFile>>;
    /// The whole content of `path`.
    fn read(&self, path: &Path) -> io::Result<Contents>;
    /// `path` as text.
    fn read_to_string(&self, path: &Path) -> io::Result<String>;
    /// Write `path` (replacing it) and sync its data.
    fn write_synced(&self, path: &Path, data: &[u8]) -> io::Result<()>;
    /// Rename `from` to `to`, replacing `to` atomically.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Copy `from` to `to`.
    fn copy(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Delete the file `path`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Make the data written to `path` durable (`fdatasync`).
    fn sync_file(&self, path: &Path) -> io::Result<()>;
    /// Make `dir`'s entries (files created, renamed or removed in it)
    /// durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;

    /// Replace file `name` in `dir` with `data`, atomically and durably: a
    /// synced `name.tmp` renamed over it, then the directory synced. A
    /// crash leaves the old content or the new one, never a mix.
    fn replace_synced(&self, dir: &Path, name: &str, data: &[u8]) -> io::Result<()> {
        let tmp = dir.join(format!("{name}.tmp"));
        self.write_synced(&tmp, data)?;
        self.rename(&tmp, &dir.join(name))?;
        self.sync_dir(dir)
    }
}

/// A preallocated file the log appends to, seen as one byte slice.
pub trait SegmentFile: Send + fmt::Debug {
    /// Its bytes (all of them, zeros where nothing was written).
    fn bytes(&self) -> &[u8];
    /// Its bytes, to write into; tell [`SegmentFile::wrote`] what changed.
    fn bytes_mut(&mut self) -> &mut [u8];
    /// Bytes `range` were written through [`SegmentFile::bytes_mut`].
    fn wrote(&mut self, range: Range<usize>);
    /// Make what was written durable.
    fn sync(&self) -> io::Result<()>;
}

/// The file system: the broker's disk. Segments are memory-mapped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fs;

/// The file system, shared.
pub fn fs() -> Arc<dyn Disk> {
    Arc::new(Fs)
}

impl Disk for Fs {
    fn lock(&self, root: &Path) -> Result<Option<File>, DirError> {
        let io_err = |source| DirError::Io {
            dir: root.display().to_string(),
            source,
        };
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(root.join("LOCK"))
            .map_err(io_err)?;
        // SAFETY: flock on a descriptor owned by `lock`, alive for the call.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut pid = String::new();
                let _ = lock.read_to_string(&mut pid);
                return Err(DirError::Locked {
                    dir: root.display().to_string(),
                    pid: pid.trim().to_string(),
                });
            }
            return Err(io_err(err));
        }
        lock.set_len(0).map_err(io_err)?;
        writeln!(lock, "{}", std::process::id()).map_err(io_err)?;
        Ok(Some(lock))
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.path()))
            .collect()
    }

    fn create_segment(&self, path: &Path, bytes: usize) -> io::Result<Box<dyn SegmentFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        if let Err(e) = allocate(&file, bytes) {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        // SAFETY: the file was just created by this process with
        // `create_new`, is exactly `bytes` long with every block allocated,
        // and no other process or mapping writes it; the mapping lives no
        // longer than `file`.
        let map = unsafe { MmapMut::map_mut(&file)? };
        Ok(Box::new(Mapped { map, file }))
    }

    fn read(&self, path: &Path) -> io::Result<Contents> {
        let file = File::open(path)?;
        // SAFETY: the data directory is locked (`LOCK`) while a broker uses
        // it, and only sealed segments (never written again) and segments
        // before the shards start are read, so nothing writes to or
        // truncates the file while the mapping lives. A read-only mapping
        // touches only the pages read, not the preallocated zeros after
        // the last record.
        Ok(Box::new(unsafe { Mmap::map(&file)? }))
    }

    fn read_to_string(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn write_synced(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let mut f = File::create(path)?;
        f.write_all(data)?;
        f.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn copy(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::copy(from, to).map(|_| ())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_file(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_data()
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// A segment file mapped read-write.
struct Mapped {
    map: MmapMut,
    /// Kept open for the mapping's lifetime (and syncs).
    file: File,
}

impl fmt::Debug for Mapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mapped")
            .field("len", &self.map.len())
            .finish()
    }
}

impl SegmentFile for Mapped {
    fn bytes(&self) -> &[u8] {
        &self.map
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }

    fn wrote(&mut self, _range: Range<usize>) {}

    fn sync(&self) -> io::Result<()> {
        self.map.flush()?;
        self.file.sync_data()
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
