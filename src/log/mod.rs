//! The per-shard append-only log: preallocated segment files of
//! checksummed, sequenced records, memory-mapped on the file system or
//! held by the simulator's disk in memory ([`disk`]).
//!
//! Shard-local: each shard writes only its own directory; no other shard
//! reads it while the broker runs (recovery, before the shards start, reads
//! them all). `log` knows files and bytes, not what the records mean (that
//! is `persist`), and no runtime: the shard's group-commit task syncs the
//! paths [`Log::take_dirty`] names.
//!
//! Invariants: sequence numbers grow by one from record to record across
//! segments; segment indexes grow by one; every segment is fully allocated
//! on disk before its first record is written; a spare segment is created
//! ahead of need, so "the disk is full" shows as [`Log::has_spare`] turning
//! false long before an append fails.
//!
//! The only `unsafe` code of the broker besides the socket move is here, in
//! `disk.rs` (the mappings and `flock`).

pub mod dir;
pub mod disk;
mod memdisk;
pub mod record;
pub mod scan;
mod segment;
pub mod ship;

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use disk::{Contents, Disk};

use thiserror::Error;

use segment::Segment;
pub use segment::{file_name, parse_file_name};

/// Why an append failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AppendError {
    /// The current segment is full and no new one can be created (the disk
    /// is full): the record was not written.
    #[error("the log is full: no space for a new segment")]
    Full,
    /// The record is larger than a segment can hold.
    #[error("a {bytes}-byte record cannot fit a {max}-byte segment")]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The largest body a segment takes.
        max: usize,
    },
}

/// Where a record starts: its segment and byte offset there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecordAt {
    /// Segment index.
    pub segment: u64,
    /// Byte offset of the record's header in the segment.
    pub offset: u64,
}

/// Records read back whole ([`Log::read_from`]), as they lie in their
/// segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Where the first one starts.
    pub at: RecordAt,
    /// Its sequence number.
    pub first_seq: u64,
    /// The sequence number after the last one.
    pub next_seq: u64,
    /// Their bytes, headers included.
    pub bytes: Vec<u8>,
}

/// Why a record could not be read back.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReadError {
    /// Its segment is no longer on disk (compacted away) or never was.
    #[error("segment {0} is not in the log")]
    NoSegment(u64),
    /// The segment could not be mapped.
    #[error("cannot map segment {segment}: {error}")]
    Map {
        /// Segment index.
        segment: u64,
        /// The system's error.
        error: String,
    },
    /// Nothing that verifies starts at the offset.
    #[error("no valid record at {at:?}: {why}")]
    Bad {
        /// Where it was looked for.
        at: RecordAt,
        /// What the framing found.
        why: &'static str,
    },
}

/// Read-only mappings of sealed segments kept for reads (most recent last).
const READ_MAPS_MAX: usize = 4;

/// A segment that is no longer written, still on disk.
#[derive(Debug, Clone)]
struct Sealed {
    index: u64,
    path: PathBuf,
    bytes: u64,
}

/// Read-only views of sealed segments (most recent last), by index.
#[derive(Default)]
struct ReadMaps(VecDeque<(u64, Contents)>);

impl std::fmt::Debug for ReadMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(i, _)| i))
            .finish()
    }
}

/// The log of one shard; see the module docs.
#[derive(Debug)]
pub struct Log {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    segment_bytes: usize,
    current: Segment,
    /// The next segment, created ahead of need.
    spare: Option<Segment>,
    /// Index the next created segment gets.
    next_index: u64,
    sealed: VecDeque<Sealed>,
    next_seq: u64,
    /// Segments written since the last [`Log::take_dirty`].
    dirty: Vec<PathBuf>,
    /// Sync the directory after creating or deleting segments (power-safe
    /// mode; a killed process loses no directory entry, a power cut can).
    sync_dirs: bool,
    /// Segments on disk at most, spare included (`storage.log_bytes_max`):
    /// reaching it is handled as a full disk.
    segments_max: usize,
    /// Where the last appended record starts.
    last_at: RecordAt,
    /// Read-only mappings of sealed segments, for [`Log::read`].
    read_maps: ReadMaps,
}

impl Log {
    /// Start a new log in `dir` (created if missing, must hold no
    /// segments): segment `first_index` and a spare after it. The first
    /// record gets `first_seq`.
    pub fn create(
        dir: &Path,
        segment_bytes: usize,
        first_index: u64,
        first_seq: u64,
    ) -> io::Result<Log> {
        let mut log =
            Self::create_without_spare(disk::fs(), dir, segment_bytes, first_index, first_seq)?;
        log.ensure_spare();
        Ok(log)
    }

    /// As [`Log::create`] on `disk`, without making the spare segment yet
    /// (recovery: the old generation still takes its room; the shard's
    /// store makes the spare when it is built).
    pub fn create_without_spare(
        disk: Arc<dyn Disk>,
        dir: &Path,
        segment_bytes: usize,
        first_index: u64,
        first_seq: u64,
    ) -> io::Result<Log> {
        disk.create_dir_all(dir)?;
        let current = Segment::create(disk.as_ref(), dir, first_index, segment_bytes)?;
        disk.sync_dir(dir)?;
        let log = Log {
            disk,
            dir: dir.to_path_buf(),
            segment_bytes,
            dirty: vec![current.path().to_path_buf()],
            current,
            spare: None,
            next_index: first_index + 1,
            sealed: VecDeque::new(),
            next_seq: first_seq,
            sync_dirs: true,
            segments_max: usize::MAX,
            last_at: RecordAt::default(),
            read_maps: ReadMaps::default(),
        };
        Ok(log)
    }

    /// Whether creating and deleting segments syncs the directory.
    pub fn set_sync_dirs(&mut self, on: bool) {
        self.sync_dirs = on;
    }

    /// Largest body one record can carry.
    pub fn body_max_bytes(&self) -> usize {
        (self.segment_bytes - record::HEADER_BYTES).min(record::BODY_MAX_BYTES)
    }

    /// Append a record; returns its sequence number. Rolls to the spare
    /// segment when the current one is full.
    pub fn append(&mut self, kind: u8, body: &[u8]) -> Result<u64, AppendError> {
        if body.len() > self.body_max_bytes() {
            return Err(AppendError::TooLarge {
                bytes: body.len(),
                max: self.body_max_bytes(),
            });
        }
        let seq = self.next_seq;
        if !self.current.append(seq, kind, body) {
            self.roll()?;
            assert!(self.current.append(seq, kind, body), "fits a new segment");
        }
        self.last_at = RecordAt {
            segment: self.current.index(),
            offset: (self.current.used() - record::record_len(body.len())) as u64,
        };
        self.next_seq += 1;
        Ok(seq)
    }

    /// Where the last appended record starts.
    pub fn last_at(&self) -> RecordAt {
        self.last_at
    }

    /// Read the record at `at` back (its checksum verified) and hand it to
    /// `f`. A sealed segment is mapped read-only on first use; the last
    /// few such mappings are kept.
    pub fn read<T>(
        &mut self,
        at: RecordAt,
        f: impl FnOnce(record::RecordRef<'_>) -> T,
    ) -> Result<T, ReadError> {
        let offset = usize::try_from(at.offset).unwrap_or(usize::MAX);
        let bytes = self.segment_contents(at.segment)?;
        match record::read(bytes, offset) {
            record::Read::Record(r, _) => Ok(f(r)),
            record::Read::End => Err(ReadError::Bad {
                at,
                why: "nothing written there",
            }),
            record::Read::Bad(why) => Err(ReadError::Bad { at, why }),
        }
    }

    /// The bytes of segment `index`: what was written of the current one,
    /// the whole file of a sealed one (zeros after its last record),
    /// mapped read-only on first use; the last few such mappings are kept.
    fn segment_contents(&mut self, index: u64) -> Result<&[u8], ReadError> {
        if index == self.current.index() {
            return Ok(self.current.written());
        }
        let Some(sealed) = self.sealed.iter().find(|s| s.index == index) else {
            return Err(ReadError::NoSegment(index));
        };
        match self.read_maps.0.iter().position(|(i, _)| *i == index) {
            Some(i) => {
                let m = self.read_maps.0.remove(i).expect("found");
                self.read_maps.0.push_back(m);
            }
            None => {
                let map = self.disk.read(&sealed.path).map_err(|e| ReadError::Map {
                    segment: index,
                    error: e.to_string(),
                })?;
                if self.read_maps.0.len() == READ_MAPS_MAX {
                    self.read_maps.0.pop_front();
                }
                self.read_maps.0.push_back((index, map));
            }
        }
        Ok(self
            .read_maps
            .0
            .back()
            .expect("just pushed")
            .1
            .as_ref()
            .as_ref())
    }

    /// Whole records from `at` on (a record boundary), within one
    /// segment: at least one, then more while they add up to at most
    /// `max_bytes`. At the end of a sealed segment the read goes on at the
    /// start of the next. None when nothing was written from `at` on.
    /// Errors: `at`'s segment is gone (compacted away) or unreadable, or
    /// `at` is not where a record starts.
    pub fn read_from(&mut self, at: RecordAt, max_bytes: usize) -> Result<Option<Run>, ReadError> {
        let mut at = at;
        loop {
            let current = self.current.index();
            let bytes = self.segment_contents(at.segment)?;
            let start = usize::try_from(at.offset).unwrap_or(usize::MAX);
            let (mut end, mut first, mut next_seq) = (start, None, 0);
            loop {
                match record::read(bytes, end) {
                    record::Read::Record(r, next) => {
                        if first.is_some() && next - start > max_bytes {
                            break;
                        }
                        first.get_or_insert(r.seq);
                        next_seq = r.seq + 1;
                        end = next;
                    }
                    record::Read::End => break,
                    record::Read::Bad(why) => return Err(ReadError::Bad { at, why }),
                }
            }
            if let Some(first_seq) = first {
                return Ok(Some(Run {
                    at,
                    first_seq,
                    next_seq,
                    bytes: bytes[start..end].to_vec(),
                }));
            }
            if at.segment >= current {
                return Ok(None);
            }
            at = RecordAt {
                segment: at.segment + 1,
                offset: 0,
            };
        }
    }

    /// The disk the log is on.
    pub fn disk(&self) -> &Arc<dyn Disk> {
        &self.disk
    }

    /// Move to the spare segment (creating it now if it is missing).
    fn roll(&mut self) -> Result<(), AppendError> {
        if self.spare.is_none() && !self.ensure_spare() {
            return Err(AppendError::Full);
        }
        let next = self.spare.take().expect("ensured");
        let old = std::mem::replace(&mut self.current, next);
        self.sealed.push_back(Sealed {
            index: old.index(),
            path: old.path().to_path_buf(),
            bytes: old.size() as u64,
        });
        self.dirty.push(self.current.path().to_path_buf());
        self.ensure_spare();
        Ok(())
    }

    /// Bound the segments on disk, spare included (at least 3).
    pub fn set_segments_max(&mut self, segments: usize) {
        self.segments_max = segments.max(3);
    }

    /// True when a new spare would pass the bound of
    /// [`Log::set_segments_max`].
    pub fn at_segments_max(&self) -> bool {
        self.sealed.len() + 2 > self.segments_max
    }

    /// Create the spare segment if there is none; false when the disk has
    /// no room for it, or the log is at its bound. Called at every roll and
    /// retried by the shard.
    pub fn ensure_spare(&mut self) -> bool {
        if self.spare.is_some() {
            return true;
        }
        if self.at_segments_max() {
            return false;
        }
        match Segment::create(
            self.disk.as_ref(),
            &self.dir,
            self.next_index,
            self.segment_bytes,
        ) {
            Ok(s) => {
                self.next_index += 1;
                self.spare = Some(s);
                if self.sync_dirs {
                    if let Err(e) = self.disk.sync_dir(&self.dir) {
                        log::warn!("cannot sync {}: {e}", self.dir.display());
                    }
                }
                true
            }
            Err(e) => {
                log::debug!(
                    "cannot create a spare segment in {}: {e}",
                    self.dir.display()
                );
                false
            }
        }
    }

    /// True while a spare segment is ready: the log can take new data. When
    /// false the broker refuses new QoS 1/2 messages and keeps the room left
    /// in the current segment for bookkeeping records.
    pub fn has_spare(&self) -> bool {
        self.spare.is_some()
    }

    /// Bytes left in the segment being written.
    pub fn current_room(&self) -> usize {
        self.current.size() - self.current.used()
    }

    /// Size of one segment.
    pub fn segment_bytes(&self) -> usize {
        self.segment_bytes
    }

    /// Sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Index of the segment being written.
    pub fn current_index(&self) -> u64 {
        self.current.index()
    }

    /// Index of the oldest segment still on disk.
    pub fn oldest_index(&self) -> u64 {
        self.sealed
            .front()
            .map_or(self.current.index(), |s| s.index)
    }

    /// Sealed segments on disk.
    pub fn sealed_count(&self) -> usize {
        self.sealed.len()
    }

    /// Bytes written into segments on disk (sealed in full, current so far).
    pub fn used_bytes(&self) -> u64 {
        let sealed: u64 = self.sealed.iter().map(|s| s.bytes).sum();
        sealed + self.current.used() as u64
    }

    /// Delete every sealed segment with an index up to `index`: compaction
    /// has rewritten what they held that is still live.
    pub fn remove_through(&mut self, index: u64) -> io::Result<()> {
        let mut removed = false;
        self.read_maps.0.retain(|(i, _)| *i > index);
        while let Some(s) = self.sealed.front().filter(|s| s.index <= index) {
            // Forgotten only once gone, so a failed delete is tried again.
            self.disk.remove_file(&s.path)?;
            self.sealed.pop_front();
            removed = true;
        }
        if removed && self.sync_dirs {
            self.disk.sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// The segment files written since the last call, for a sync: after
    /// `fdatasync` on each, every record below `next_seq` (as read before
    /// this call) is durable.
    pub fn take_dirty(&mut self) -> Vec<PathBuf> {
        let current = self.current.path().to_path_buf();
        let mut dirty = std::mem::replace(&mut self.dirty, vec![current]);
        dirty.dedup();
        dirty
    }

    /// Files a failed sync covered, to sync again next time.
    pub fn mark_dirty(&mut self, paths: Vec<PathBuf>) {
        self.dirty.extend(paths);
    }

    /// Make every record and segment file of this log durable (after
    /// recovery wrote a generation, before it is switched to).
    pub fn sync_all(&self) -> io::Result<()> {
        for s in &self.sealed {
            self.disk.sync_file(&s.path)?;
        }
        self.current.sync()?;
        if let Some(spare) = &self.spare {
            spare.sync()?;
        }
        self.disk.sync_dir(&self.dir)
    }

    /// The directory of this log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A segment index or generation number from a file name: plain digits
/// (no sign, no other character), and never the largest number, whose
/// successor could not be named.
fn parse_counter(digits: &str) -> Option<u64> {
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&n| n < u64::MAX)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A directory for one test, removed with everything in it when the
    /// test ends (segments take their blocks when they are created).
    pub(crate) struct TempDir(PathBuf);

    impl std::ops::Deref for TempDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl AsRef<Path> for TempDir {
        fn as_ref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A fresh, empty [`TempDir`] under the system temp dir.
    pub(crate) fn temp_dir(name: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "shardmq-unit-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    #[test]
    fn rolls_keeps_a_spare_and_removes_sealed_segments() {
        let dir = temp_dir("log-roll");
        let mut log = Log::create(&dir, 1024, 0, 100).unwrap();
        assert!(log.has_spare());
        for i in 0..50u64 {
            assert_eq!(log.append(1, &[i as u8; 100]), Ok(100 + i));
        }
        assert!(log.sealed_count() >= 4, "{log:?}");
        assert_eq!(log.oldest_index(), 0);
        let current = log.current_index();
        log.remove_through(current - 1).unwrap();
        assert_eq!(log.oldest_index(), current);
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(files.len(), 2, "current and spare remain");
        let dirty = log.take_dirty();
        assert!(dirty.contains(&dir.join(file_name(current))));
    }

    #[test]
    fn a_record_reads_back_where_it_was_appended_until_its_segment_goes() {
        let dir = temp_dir("log-read");
        let mut log = Log::create(&dir, 1024, 0, 1).unwrap();
        let mut placed = Vec::new();
        for i in 0..60u8 {
            log.append(7, &[i; 100]).unwrap();
            placed.push((log.last_at(), i));
        }
        assert!(
            log.sealed_count() > READ_MAPS_MAX,
            "more segments than maps kept"
        );
        // Out of order, so mappings are made, reused and evicted.
        for &(at, i) in placed.iter().rev().chain(placed.iter()) {
            let body = log.read(at, |r| (r.kind, r.body.to_vec())).unwrap();
            assert_eq!(body, (7, vec![i; 100]), "{at:?}");
        }
        let (first, _) = placed[0];
        let off = RecordAt {
            offset: first.offset + 1,
            ..first
        };
        assert!(matches!(log.read(off, |_| ()), Err(ReadError::Bad { .. })));
        let past = RecordAt {
            offset: u64::MAX,
            ..first
        };
        assert!(matches!(log.read(past, |_| ()), Err(ReadError::Bad { .. })));
        let current = log.current_index();
        log.remove_through(current - 1).unwrap();
        assert_eq!(log.read(first, |_| ()), Err(ReadError::NoSegment(0)));
        let (last, i) = *placed.last().unwrap();
        assert_eq!(log.read(last, |r| r.body[0]), Ok(i));
    }
}
