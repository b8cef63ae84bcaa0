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

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use super::disk::{self, Disk};

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
    disk: Arc<dyn Disk>,
    _lock: Option<File>,
}

impl DataDir {
    /// Create (if needed) and lock `root` on the file system.
    pub fn open(root: &Path) -> Result<DataDir, DirError> {
        Self::open_on(disk::fs(), root)
    }

    /// Create (if needed) and lock `root` on `disk`.
    pub fn open_on(disk: Arc<dyn Disk>, root: &Path) -> Result<DataDir, DirError> {
        disk.create_dir_all(root).map_err(|source| DirError::Io {
            dir: root.display().to_string(),
            source,
        })?;
        let lock = disk.lock(root)?;
        Ok(DataDir {
            root: root.to_path_buf(),
            disk,
            _lock: lock,
        })
    }

    /// The disk it is on.
    pub fn disk(&self) -> &Arc<dyn Disk> {
        &self.disk
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The generation `CURRENT` names; None in a new directory.
    pub fn current(&self) -> io::Result<Option<u64>> {
        match self.disk.read_to_string(&self.root.join("CURRENT")) {
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
        for path in self.disk.list(&self.generation_dir(gen))? {
            if let Some(i) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("shard-"))
                .and_then(|n| n.parse().ok())
            {
                out.push((i, path));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Make `gen` the generation in force, atomically.
    pub fn set_current(&self, gen: u64) -> io::Result<()> {
        let text = format!("{}\n", generation_name(gen));
        self.disk
            .replace_synced(&self.root, "CURRENT", text.as_bytes())
    }

    /// Delete every generation but `keep` (old ones, and any a crashed
    /// start left half written).
    pub fn remove_other_generations(&self, keep: u64) -> io::Result<()> {
        for path in self.disk.list(&self.root)? {
            let name = path.file_name().and_then(|n| n.to_str());
            let Some(gen) = name.and_then(parse_generation) else {
                continue;
            };
            if gen != keep {
                self.disk.remove_dir_all(&path)?;
            }
        }
        self.disk.sync_dir(&self.root)
    }

    /// Where damaged segments are kept for inspection.
    pub fn damaged_dir(&self) -> PathBuf {
        self.root.join("damaged")
    }
}

/// The directory name of generation `gen`.
pub(crate) fn generation_name(gen: u64) -> String {
    format!("gen-{gen:06}")
}

/// The generation a directory name names, if it is one.
pub(crate) fn parse_generation(name: &str) -> Option<u64> {
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
