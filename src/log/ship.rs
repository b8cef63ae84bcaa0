//! A shard's log copied to a standby node, record for record: the side
//! that sends it ([`Shipper`], one per standby) and the copy the standby
//! keeps ([`Replica`]).
//!
//! Shard-local, no I/O but the copy's files (through [`Disk`]) and no
//! clock. The copy is a byte-for-byte copy of the log's segments from some
//! segment on, so a broker can recover from it as from the log itself.
//!
//! The owner reads whole records from where the copy ends and sends them
//! as [`Chunk`]s, in order, a bounded window ahead of the answers; the
//! standby checks every record (checksum, sequence), writes them at the
//! same segment and offset and answers each chunk with what it holds
//! ([`Have`]). A chunk that does not continue the copy is not written:
//! the answer says where the copy ends, and the owner goes on from there,
//! or, when it no longer has that segment (compacted away) or the copy
//! holds nothing of its run, starts the copy anew at its oldest segment
//! ([`Chunk::start`]).
//!
//! A copy started anew is *whole*, that is, what the log held at some
//! moment and so recoverable, only once it reaches the log's head as it
//! was at the start: the segments the log had dropped before held records
//! whose live content was written again further on. So a start names the
//! sequence number the copy must reach ([`Chunk::start`]), and only a
//! whole copy's answers confirm records ([`Shipper::confirmed`]). For the
//! same reason the standby drops its copies of segments the log dropped
//! only when the owner says so ([`Chunk::oldest`]), which it does in a
//! chunk that reaches the log's head: by then the copy holds the records
//! written again.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use super::disk::Disk;
use super::record;
use super::segment::Segment;
use super::{Log, ReadError, RecordAt};

/// Records of a log on their way to its copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The owner's number for it: the answer names it.
    pub id: u64,
    /// The log's generation (its directory, `gen-N`).
    pub generation: u64,
    /// Size of the log's segments.
    pub segment_bytes: u64,
    /// Where the records lie in the log.
    pub at: RecordAt,
    /// The first record's sequence number (the log's next one when there
    /// is none: an empty log's copy).
    pub seq: u64,
    /// Start the copy anew here (`at` is a segment's start): it is whole
    /// once it holds every record below this sequence number.
    pub start: Option<u64>,
    /// The log's oldest segment, once the copy may drop those before it
    /// (the chunk reaches the log's head); 0: not yet.
    pub oldest: u64,
    /// The records, as they lie in the segment.
    pub bytes: Vec<u8>,
    /// The owner waits for this copy (its acknowledgements hold until the
    /// copy has the records) from a record at or below this chunk's end:
    /// a copy that has taken it holds all the owner acknowledged (what a
    /// standby that takes over a dead owner's sessions needs).
    pub waited: bool,
}

/// What a copy holds: the standby's answer to each chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Have {
    /// The chunk answered.
    pub id: u64,
    /// The copy's generation (0: none).
    pub generation: u64,
    /// Where its next record would go, and that record's sequence number;
    /// None: it holds nothing of this run of the log.
    pub at: Option<(RecordAt, u64)>,
    /// It holds every record below that sequence number, whole.
    pub whole: bool,
    /// The standby keeps no copy (it has no log, or its bound is
    /// reached): the owner stops waiting for it.
    pub refused: bool,
}

/// A chunk sent and not yet answered.
#[derive(Debug, Clone, Copy)]
struct Sent {
    id: u64,
    /// Where the copy ends once it has taken the chunk.
    end: (RecordAt, u64),
    bytes: usize,
}

/// The owner's side of one standby's copy; see the module docs.
#[derive(Debug)]
pub struct Shipper {
    generation: u64,
    last_id: u64,
    /// Where the next chunk is read; None: start the copy anew.
    next: Option<(RecordAt, u64)>,
    /// Where the copy ended, as last answered (where a new link goes on).
    resume: Option<(RecordAt, u64)>,
    sent: VecDeque<Sent>,
    sent_bytes: usize,
    confirmed: u64,
    /// The last chunk that started the copy anew: answers to chunks
    /// before it speak of a copy since emptied, and confirm nothing.
    start_id: u64,
    refused: bool,
}

impl Shipper {
    /// A copy of the log of generation `generation`, from nothing.
    pub fn new(generation: u64) -> Shipper {
        Shipper {
            generation,
            last_id: 0,
            next: None,
            resume: None,
            sent: VecDeque::new(),
            sent_bytes: 0,
            confirmed: 0,
            start_id: 0,
            refused: false,
        }
    }

    /// The sequence number below which the copy holds every record once
    /// the chunks sent so far are taken (None: starting anew).
    pub fn sent_end(&self) -> Option<u64> {
        self.next.map(|(_, seq)| seq)
    }

    /// Every record below this sequence number is in the copy, whole.
    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }

    /// The standby refused to keep a copy.
    pub fn refused(&self) -> bool {
        self.refused
    }

    /// Bytes sent and not yet answered.
    pub fn unanswered_bytes(&self) -> usize {
        self.sent_bytes
    }

    /// The next chunk to send, of at most `max_bytes` of records (one
    /// larger record goes alone); None when the copy has everything sent
    /// to it, while `window` bytes are unanswered, or once refused.
    pub fn poll(
        &mut self,
        log: &mut Log,
        max_bytes: usize,
        window: usize,
    ) -> Result<Option<Chunk>, ReadError> {
        if self.refused || self.sent_bytes >= window {
            return Ok(None);
        }
        let oldest = log.oldest_index();
        let resumable = self
            .next
            .filter(|(at, _)| at.segment >= oldest && at.segment <= log.current_index());
        let (from, start) = match resumable {
            Some((at, _)) => (at, None),
            None => {
                let at = RecordAt {
                    segment: oldest,
                    offset: 0,
                };
                (at, Some(log.next_seq()))
            }
        };
        let run = log.read_from(from, max_bytes)?;
        let (at, seq, end, bytes) = match run {
            Some(run) => {
                let end = RecordAt {
                    segment: run.at.segment,
                    offset: run.at.offset + run.bytes.len() as u64,
                };
                (run.at, run.first_seq, (end, run.next_seq), run.bytes)
            }
            // An empty log: its copy starts empty, at its next record.
            None if start.is_some() => (from, log.next_seq(), (from, log.next_seq()), Vec::new()),
            None => return Ok(None),
        };
        let at_head = end.1 == log.next_seq();
        self.last_id += 1;
        if start.is_some() {
            // What the copy held before goes with it.
            self.confirmed = 0;
            self.start_id = self.last_id;
        }
        let chunk = Chunk {
            id: self.last_id,
            generation: self.generation,
            segment_bytes: log.segment_bytes() as u64,
            at,
            seq,
            start,
            oldest: if at_head { oldest } else { 0 },
            bytes,
            waited: false,
        };
        self.next = Some(end);
        self.sent.push_back(Sent {
            id: chunk.id,
            end,
            bytes: chunk.bytes.len(),
        });
        self.sent_bytes += chunk.bytes.len();
        Ok(Some(chunk))
    }

    /// The standby's answer to a chunk; true when it refuses the copy
    /// from now on (the first such answer).
    pub fn have(&mut self, have: Have) -> bool {
        if have.refused {
            return !std::mem::replace(&mut self.refused, true);
        }
        let current = have.id >= self.start_id;
        let ours = have.generation == self.generation && current;
        if let (true, true, Some((_, next_seq))) = (ours, have.whole, have.at) {
            self.confirmed = self.confirmed.max(next_seq);
        }
        while self.sent.front().is_some_and(|s| s.id < have.id) {
            self.forget_front();
        }
        let Some(front) = self.sent.front().copied() else {
            // The answer to a chunk of a link since gone, or sent before
            // the copy was found elsewhere: only its confirmation counts.
            return false;
        };
        if front.id != have.id {
            return false;
        }
        self.forget_front();
        if !current {
            // Sent before the copy started anew: what it says is void.
            return false;
        }
        if ours && have.at == Some(front.end) {
            self.resume = have.at;
            return false;
        }
        // The copy did not take it: go on from where it ends (or start
        // anew), and the chunks sent after it are void.
        self.resume = have.at.filter(|_| ours);
        self.next = self.resume;
        self.sent.clear();
        self.sent_bytes = 0;
        false
    }

    /// The link to the standby closed: what was sent and not answered is
    /// sent again on the next one, from where the copy last ended.
    pub fn link_down(&mut self) {
        self.next = self.resume;
        self.sent.clear();
        self.sent_bytes = 0;
    }

    fn forget_front(&mut self) {
        if let Some(s) = self.sent.pop_front() {
            self.sent_bytes -= s.bytes;
        }
    }
}

/// Why a chunk was refused (the link that brought it is closed).
#[derive(Debug, Error)]
pub enum ReplicaError {
    /// Its records do not check out.
    #[error("bad chunk: {0}")]
    Bad(&'static str),
    /// The copy's files failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The standby's copy of one shard log; see the module docs.
#[derive(Debug)]
pub struct Replica {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    generation: u64,
    segment_bytes: usize,
    /// Segments on disk at most; past it the copy is refused.
    segments_max: usize,
    sealed: VecDeque<(u64, PathBuf)>,
    current: Option<Segment>,
    next_seq: u64,
    whole_at: u64,
    refused: bool,
    sync_dirs: bool,
}

impl Replica {
    /// A copy of a log of generation `generation` in `dir` (which it owns:
    /// a start empties it), of at most `segments_max` segments of
    /// `segment_bytes`.
    pub fn new(
        disk: Arc<dyn Disk>,
        dir: &Path,
        generation: u64,
        segment_bytes: usize,
        segments_max: usize,
    ) -> Replica {
        Replica {
            disk,
            dir: dir.to_path_buf(),
            generation,
            segment_bytes,
            segments_max: segments_max.max(2),
            sealed: VecDeque::new(),
            current: None,
            next_seq: 0,
            whole_at: u64::MAX,
            refused: false,
            sync_dirs: false,
        }
    }

    /// Sync the directory after creating a segment (power-safe: the new
    /// file's entry survives a power cut; its parents are not synced).
    pub fn set_sync_dirs(&mut self, on: bool) {
        self.sync_dirs = on;
    }

    /// The log generation it copies.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True once it holds what the log held at some moment (recoverable).
    pub fn whole(&self) -> bool {
        self.current.is_some() && self.next_seq >= self.whole_at
    }

    /// Bytes of its segment files.
    pub fn file_bytes(&self) -> u64 {
        let n = self.sealed.len() + usize::from(self.current.is_some());
        (n * self.segment_bytes) as u64
    }

    /// The segment file being written, if any.
    pub fn current_path(&self) -> Option<&Path> {
        self.current.as_ref().map(|s| s.path())
    }

    /// Keep no copy from now on (the disk here failed it): answers say
    /// so.
    pub fn refuse(&mut self) {
        self.refused = true;
    }

    /// What it holds, as an answer to chunk `id`.
    pub fn have(&self, id: u64) -> Have {
        Have {
            id,
            generation: self.generation,
            at: self.current.as_ref().map(|s| {
                let at = RecordAt {
                    segment: s.index(),
                    offset: s.used() as u64,
                };
                (at, self.next_seq)
            }),
            whole: self.whole(),
            refused: self.refused,
        }
    }

    /// Take a chunk of the log: written when it continues the copy (or
    /// starts it anew); either way the answer says what the copy holds.
    pub fn apply(&mut self, chunk: &Chunk) -> Result<Have, ReplicaError> {
        if chunk.generation != self.generation {
            return Err(ReplicaError::Bad("another generation"));
        }
        if chunk.segment_bytes != self.segment_bytes as u64 {
            return Err(ReplicaError::Bad("another segment size"));
        }
        let len = chunk.bytes.len() as u64;
        if chunk.at.offset.saturating_add(len) > self.segment_bytes as u64 {
            return Err(ReplicaError::Bad("records past the segment's end"));
        }
        let records = check_records(&chunk.bytes, chunk.seq)?;
        if self.refused {
            return Ok(self.have(chunk.id));
        }
        if let Some(whole_at) = chunk.start {
            if chunk.at.offset != 0 {
                return Err(ReplicaError::Bad("a copy starts at a segment's start"));
            }
            if chunk.at.segment >= u64::MAX / 2 {
                return Err(ReplicaError::Bad("segment index out of range"));
            }
            if whole_at < chunk.seq + records {
                return Err(ReplicaError::Bad("whole before its own records"));
            }
            self.clear()?;
            self.whole_at = whole_at;
            self.next_seq = chunk.seq;
            self.open_segment(chunk.at.segment)?;
        } else {
            let Some(cur) = self.current.as_ref() else {
                return Ok(self.have(chunk.id));
            };
            if chunk.seq != self.next_seq {
                return Ok(self.have(chunk.id));
            }
            let here = chunk.at.segment == cur.index() && chunk.at.offset == cur.used() as u64;
            let next = Some(chunk.at.segment) == cur.index().checked_add(1) && chunk.at.offset == 0;
            if !here && !next {
                return Ok(self.have(chunk.id));
            }
            if next {
                if self.sealed.len() + 2 > self.segments_max {
                    log::warn!(
                        "log copy in {}: {} segments, its bound: no longer kept",
                        self.dir.display(),
                        self.segments_max
                    );
                    self.refused = true;
                    return Ok(self.have(chunk.id));
                }
                let old = self.current.take().expect("checked");
                self.sealed
                    .push_back((old.index(), old.path().to_path_buf()));
                self.open_segment(chunk.at.segment)?;
            }
        }
        let seg = self.current.as_mut().expect("opened");
        if !seg.append_encoded(&chunk.bytes) {
            return Err(ReplicaError::Bad("records past the segment's end"));
        }
        self.next_seq = chunk.seq + records;
        if chunk.oldest > 0 && self.whole() {
            while let Some((index, path)) = self.sealed.front().cloned() {
                if index >= chunk.oldest {
                    break;
                }
                self.disk.remove_file(&path)?;
                self.sealed.pop_front();
            }
        }
        Ok(self.have(chunk.id))
    }

    fn open_segment(&mut self, index: u64) -> io::Result<()> {
        self.disk.create_dir_all(&self.dir)?;
        self.current = Some(Segment::create(
            self.disk.as_ref(),
            &self.dir,
            index,
            self.segment_bytes,
        )?);
        if self.sync_dirs {
            self.disk.sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Forget every segment (a start anew).
    fn clear(&mut self) -> io::Result<()> {
        self.current = None;
        self.sealed.clear();
        match self.disk.remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Check that `bytes` are whole records numbered from `seq` on; how many
/// they are.
fn check_records(bytes: &[u8], seq: u64) -> Result<u64, ReplicaError> {
    let (mut off, mut want) = (0, seq);
    while off < bytes.len() {
        match record::read(bytes, off) {
            record::Read::Record(r, next) if r.seq == want && want < u64::MAX => {
                want += 1;
                off = next;
            }
            record::Read::Record(..) => return Err(ReplicaError::Bad("sequence break")),
            record::Read::End => return Err(ReplicaError::Bad("zeros among the records")),
            record::Read::Bad(why) => return Err(ReplicaError::Bad(why)),
        }
    }
    Ok(want - seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::disk::MemDisk;
    use crate::log::scan::scan_on;

    /// Every record of the log in `dir`: (seq, kind, body).
    fn records(disk: &dyn Disk, dir: &Path) -> Vec<(u64, u8, Vec<u8>)> {
        let mut out = Vec::new();
        let report = scan_on(disk, dir, |r| out.push((r.seq, r.kind, r.body.to_vec()))).unwrap();
        assert!(report.damage.is_none(), "{:?}", report.damage);
        out
    }

    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// One seed: a log written, rolled and trimmed at random while its
    /// copy is shipped over a link that loses what is in flight when it
    /// breaks; at every answer, a whole copy holds the log's records byte
    /// for byte, and once the link stays up the copy catches up and holds
    /// exactly the log's segments.
    fn run(seed: u64) -> (u64, u64) {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let disk: Arc<dyn Disk> = Arc::new(MemDisk::new());
        let (owner, copy) = (Path::new("/o/gen-000003/shard-0"), Path::new("/c/shard-0"));
        let segment_bytes = 512;
        let mut log = Log::create_without_spare(disk.clone(), owner, segment_bytes, 0, 1).unwrap();
        log.ensure_spare();
        let mut ship = Shipper::new(3);
        let mut replica = Replica::new(disk.clone(), copy, 3, segment_bytes, 100_000);
        let mut wire: VecDeque<Chunk> = VecDeque::new();
        let mut answers: VecDeque<Have> = VecDeque::new();
        let (mut starts, mut confirmed_max) = (0, 0);
        let steps = 400 + rng.below(400);
        for step in 0..steps + 2000 {
            let settling = step >= steps;
            match rng.below(if settling { 3 } else { 8 }) {
                0 => {
                    if let Some(c) = ship
                        .poll(&mut log, 100 + rng.below(400) as usize, 2048)
                        .unwrap()
                    {
                        if c.start.is_some() {
                            // What a copy started anew confirms starts over.
                            starts += 1;
                            confirmed_max = 0;
                        }
                        wire.push_back(c);
                    }
                }
                1 => {
                    if let Some(c) = wire.pop_front() {
                        let have = replica.apply(&c).unwrap();
                        answers.push_back(have);
                    }
                }
                2 => {
                    if let Some(h) = answers.pop_front() {
                        ship.have(h);
                        // What it confirms is in the copy.
                        let got = records(disk.as_ref(), copy);
                        let want = records(disk.as_ref(), owner);
                        assert!(ship.confirmed() >= confirmed_max, "seed {seed}");
                        confirmed_max = ship.confirmed();
                        // (A start anew may have emptied the copy since
                        // it answered.)
                        if replica.whole() {
                            for r in &got {
                                if let Some(w) = want.iter().find(|w| w.0 == r.0) {
                                    assert_eq!(w, r, "seed {seed}: record {} differs", r.0);
                                }
                            }
                            let last = got.last().map_or(1, |r| r.0 + 1); // the log starts at 1
                            assert!(
                                last >= ship.confirmed(),
                                "seed {seed} step {step}: copy ends at {last}, confirmed {}, {:?} {:?}",
                                ship.confirmed(),
                                replica.have(0),
                                h
                            );
                        }
                    }
                }
                3 | 4 => {
                    let body = vec![rng.below(250) as u8; rng.below(120) as usize];
                    if log.append(1 + rng.below(5) as u8, &body).is_err() {
                        log.ensure_spare();
                    }
                    log.ensure_spare();
                }
                // Compaction drops the oldest sealed segments.
                5 if log.sealed_count() > 2 => {
                    let through = log.oldest_index() + rng.below(2);
                    log.remove_through(through).unwrap();
                }
                6 => {
                    // The link breaks: what it carried is lost.
                    wire.clear();
                    answers.clear();
                    ship.link_down();
                }
                _ => {}
            }
        }
        // Quiet: everything goes across.
        loop {
            while let Some(c) = ship.poll(&mut log, 300, 2048).unwrap() {
                let have = replica.apply(&c).unwrap();
                ship.have(have);
            }
            if ship.unanswered_bytes() == 0 {
                break;
            }
        }
        assert_eq!(ship.confirmed(), log.next_seq(), "seed {seed}: caught up");
        assert!(replica.whole());
        assert_eq!(
            records(disk.as_ref(), copy),
            records(disk.as_ref(), owner),
            "seed {seed}: the copy is the log"
        );
        (starts, log.next_seq())
    }

    #[test]
    fn a_copy_follows_its_log_through_breaks_and_compaction() {
        let seeds: u64 = std::env::var("SHARDMQ_SHIP_SEEDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(200);
        let (mut starts, mut records) = (0, 0);
        for seed in 1..=seeds {
            let (s, r) = run(seed);
            starts += s;
            records += r;
        }
        // The runs went through starts anew (a break after compaction)
        // and wrote many segments.
        assert!(starts > seeds, "{starts} starts");
        assert!(records > seeds * 100, "{records} records");
    }

    #[test]
    fn a_chunk_that_does_not_check_out_is_refused() {
        let disk: Arc<dyn Disk> = Arc::new(MemDisk::new());
        let mut log =
            Log::create_without_spare(disk.clone(), Path::new("/o/s"), 512, 0, 1).unwrap();
        log.ensure_spare();
        log.append(1, b"hello").unwrap();
        log.append(1, b"world").unwrap();
        let mut ship = Shipper::new(1);
        let chunk = ship.poll(&mut log, 1000, 4096).unwrap().unwrap();
        let mut replica = Replica::new(disk.clone(), Path::new("/c/s"), 1, 512, 8);
        let mut flipped = chunk.clone();
        let last = flipped.bytes.len() - 1;
        flipped.bytes[last] ^= 1;
        assert!(replica.apply(&flipped).is_err(), "checksum");
        let mut renumbered = chunk.clone();
        renumbered.seq = 7;
        assert!(replica.apply(&renumbered).is_err(), "sequence");
        let mut other = chunk.clone();
        other.generation = 2;
        assert!(replica.apply(&other).is_err(), "generation");
        let mut wide = chunk.clone();
        wide.at.offset = 500;
        wide.start = None;
        assert!(replica.apply(&wide).is_err(), "past the segment");
        let have = replica.apply(&chunk).unwrap();
        assert!(have.whole);
        assert_eq!(have.at.map(|a| a.1), Some(3));
        // A chunk that does not continue the copy is not written.
        let mut ahead = chunk.clone();
        ahead.start = None;
        ahead.seq = 3;
        ahead.at.offset = 200;
        ahead.bytes.clear();
        let again = replica.apply(&ahead).unwrap();
        assert_eq!(again.at, have.at);
    }
}
