//! The data directory: a lock so one broker uses it, and generations of
//! per-shard logs with a `CURRENT` file naming the one in force.
//!
//! Node-wide; used at start (recovery) and by the shards only through the
//! paths it hands out.
//!
//! ```text
//! DIR/LOCK                      flock'd by the running broker (holds its pid)
//! DIR/CURRENT                   "gen-000007": the generation in force
//! DIR/gen-000007/shard-0/       shard 0's segments: 0000000000.seg, ...
//! DIR/gen-000007/shard-1/
//! DIR/damaged/                  segments kept aside when recovery found damage
//! ```
//!
//! Each start reads the current generation, writes what it recovered as the
//! next one, and switches `CURRENT` to it atomically (write a temporary
//! file, sync, rename, sync the directory). A crash part way through leaves
//! `CURRENT` on the old generation, which the next start reads again.

#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::sync_dir;

/// Why the data directory cannot be used.
#[derive(Debug, Error)]
pub enum DirError {
    /// Another process holds the lock.
    #[error(
        "data directory {dir} is in use by another shardmq (pid {pid}); \
         two brokers on one directory would corrupt it"
    )]
    Locked {
        /// The directory.
        dir: String,
        /// The pid written in its LOCK file.
        pid: String,
    },
    /// A file system error.
    #[error("data directory {dir}: {source}")]
    Io {
        /// The directory.
        dir: String,
        /// What failed.
        source: io::Error,
    },
}

/// The locked data directory; the lock is released when this is dropped.
#[derive(Debug)]
pub struct DataDir {
    root: PathBuf,
    _lock: File,
}

impl DataDir {
    /// Create (if needed) and lock `root`.
    pub fn open(root: &Path) -> Result<DataDir, DirError> {
        let io_err = |source| DirError::Io {
            dir: root.display().to_string(),
            source,
        };
        std::fs::create_dir_all(root).map_err(io_err)?;
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
        Ok(DataDir {
            root: root.to_path_buf(),
            _lock: lock,
        })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The generation `CURRENT` names; None in a new directory.
    pub fn current(&self) -> io::Result<Option<u64>> {
        match std::fs::read_to_string(self.root.join("CURRENT")) {
            Ok(s) => parse_generation(s.trim()).map(Some).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("CURRENT holds {:?}, not a generation name", s.trim()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Directory of generation `gen`.
    pub fn generation_dir(&self, gen: u64) -> PathBuf {
        self.root.join(generation_name(gen))
    }

    /// Log directory of shard `shard` in generation `gen`.
    pub fn shard_dir(&self, gen: u64, shard: usize) -> PathBuf {
        self.generation_dir(gen).join(format!("shard-{shard}"))
    }

    /// The shard log directories of generation `gen`, by shard index.
    pub fn shard_dirs(&self, gen: u64) -> io::Result<Vec<(usize, PathBuf)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(self.generation_dir(gen))? {
            let entry = entry?;
            let name = entry.file_name();
            if let Some(i) = name
                .to_str()
                .and_then(|n| n.strip_prefix("shard-"))
                .and_then(|n| n.parse().ok())
            {
                out.push((i, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Make `gen` the generation in force, atomically.
    pub fn set_current(&self, gen: u64) -> io::Result<()> {
        let tmp = self.root.join("CURRENT.tmp");
        let mut f = File::create(&tmp)?;
        writeln!(f, "{}", generation_name(gen))?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.root.join("CURRENT"))?;
        sync_dir(&self.root)
    }

    /// Delete every generation but `keep` (old ones, and any a crashed
    /// start left half written).
    pub fn remove_other_generations(&self, keep: u64) -> io::Result<()> {
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(gen) = name.to_str().and_then(parse_generation) else {
                continue;
            };
            if gen != keep {
                std::fs::remove_dir_all(entry.path())?;
            }
        }
        sync_dir(&self.root)
    }

    /// Where damaged segments are kept for inspection.
    pub fn damaged_dir(&self) -> PathBuf {
        self.root.join("damaged")
    }
}

fn generation_name(gen: u64) -> String {
    format!("gen-{gen:06}")
}

fn parse_generation(name: &str) -> Option<u64> {
    super::parse_counter(name.strip_prefix("gen-")?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::tests::temp_dir;

    #[test]
    fn a_generation_name_is_digits_below_the_largest_number() {
        assert_eq!(parse_generation(&generation_name(7)), Some(7));
        assert_eq!(
            parse_generation("gen-18446744073709551614"),
            Some(u64::MAX - 1)
        );
        assert_eq!(parse_generation("gen-18446744073709551615"), None);
        assert_eq!(parse_generation("gen-+7"), None);
        assert_eq!(parse_generation("gen-"), None);
    }

    #[test]
    fn a_second_open_is_refused_until_the_first_is_dropped() {
        let root = temp_dir("dir-lock");
        let first = DataDir::open(&root).unwrap();
        let err = DataDir::open(&root).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("in use by another shardmq"), "{msg}");
        assert!(msg.contains(&std::process::id().to_string()), "{msg}");
        drop(first);
        DataDir::open(&root).unwrap();
    }

    #[test]
    fn current_switches_and_old_generations_go() {
        let root = temp_dir("dir-gen");
        let d = DataDir::open(&root).unwrap();
        assert_eq!(d.current().unwrap(), None);
        std::fs::create_dir_all(d.shard_dir(1, 0)).unwrap();
        std::fs::create_dir_all(d.shard_dir(2, 1)).unwrap();
        std::fs::create_dir_all(d.shard_dir(2, 0)).unwrap();
        d.set_current(2).unwrap();
        assert_eq!(d.current().unwrap(), Some(2));
        let shards: Vec<usize> = d.shard_dirs(2).unwrap().into_iter().map(|s| s.0).collect();
        assert_eq!(shards, vec![0, 1]);
        d.remove_other_generations(2).unwrap();
        assert!(!d.generation_dir(1).exists());
        assert!(d.generation_dir(2).exists());
    }
}
