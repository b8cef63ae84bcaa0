//! Reading a shard's log back at start: every record in order, up to the
//! first one that fails its checksum or its sequence number, and a report
//! of where reading stopped and why.
//!
//! Runs before the shards start (node-wide recovery), on one thread.
//!
//! A bad record with nothing valid after it is a torn tail: a crash stopped
//! a write half way, and what follows was never acknowledged. A bad record
//! with valid records after it is damage in the middle of the log: those
//! later records are not replayed, and the report names the position and
//! counts them so it can be said loudly, never dropped silently.

use std::io;
use std::path::{Path, PathBuf};

use super::disk::{self, Disk};
use super::record::{self, Read, RecordRef};
use super::segment::parse_file_name;

/// Where reading stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// A record was cut by a crash and nothing valid follows it.
    TornTail {
        /// Segment file.
        segment: PathBuf,
        /// Offset of the torn record.
        offset: usize,
        /// What is wrong with the torn record.
        why: &'static str,
    },
    /// A bad record with valid records after it.
    Corrupt {
        /// Segment file.
        segment: PathBuf,
        /// Offset of the bad record.
        offset: usize,
        /// Sequence number the bad record should have had (0 when it is
        /// the log's first).
        seq: u64,
        /// What is wrong with it.
        why: &'static str,
        /// Valid records found after it (not replayed).
        later_records: u64,
    },
    /// A segment file is missing between two others.
    MissingSegment {
        /// Index of the first missing segment.
        index: u64,
        /// Valid records found after the gap (not replayed).
        later_records: u64,
    },
}

impl Damage {
    /// True for damage in the middle of the log (records were cut).
    pub fn is_corruption(&self) -> bool {
        !matches!(self, Damage::TornTail { .. })
    }
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::TornTail {
                segment,
                offset,
                why,
            } => write!(
                f,
                "torn tail at {} offset {offset} ({why}); cut there",
                segment.display()
            ),
            Damage::Corrupt {
                segment,
                offset,
                seq,
                why,
                later_records,
            } => write!(
                f,
                "corrupt record (sequence {seq}) at {} offset {offset}: {why}; \
                 {later_records} valid records after it were NOT replayed",
                segment.display()
            ),
            Damage::MissingSegment {
                index,
                later_records,
            } => write!(
                f,
                "segment {index} is missing; {later_records} valid records after it were NOT replayed"
            ),
        }
    }
}

/// What a scan read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Segment files found.
    pub segments: Vec<PathBuf>,
    /// Records replayed.
    pub records: u64,
    /// Bytes of the records replayed.
    pub bytes: u64,
    /// Sequence number of the last record replayed.
    pub last_seq: Option<u64>,
    /// The segment holding that record.
    pub last_segment: Option<PathBuf>,
    /// Where reading stopped early, if it did.
    pub damage: Option<Damage>,
}

/// The segment files of a log directory on the file system, by index.
pub fn segment_files(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    segment_files_on(&disk::Fs, dir)
}

/// The segment files of a log directory on `disk`, by index.
pub fn segment_files_on(disk: &dyn Disk, dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for path in disk.list(dir)? {
        let name = path.file_name().and_then(|n| n.to_str());
        if let Some(index) = name.and_then(parse_file_name) {
            out.push((index, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Read every good record of the log in `dir` on the file system, in
/// order, into `f`.
pub fn scan(dir: &Path, f: impl FnMut(RecordRef<'_>)) -> io::Result<ScanReport> {
    scan_on(&disk::Fs, dir, f)
}

/// Read every good record of the log in `dir` on `disk`, in order, into
/// `f`.
pub fn scan_on(
    disk: &dyn Disk,
    dir: &Path,
    mut f: impl FnMut(RecordRef<'_>),
) -> io::Result<ScanReport> {
    let files = segment_files_on(disk, dir)?;
    let mut report = ScanReport {
        segments: files.iter().map(|(_, p)| p.clone()).collect(),
        ..ScanReport::default()
    };
    let mut expected: Option<u64> = None;
    for (i, (index, path)) in files.iter().enumerate() {
        let follows = files[i.saturating_sub(1)].0.checked_add(1);
        if i > 0 && Some(*index) != follows {
            let later = count_later(disk, &files[i..]);
            report.damage = Some(Damage::MissingSegment {
                index: follows.unwrap_or(u64::MAX),
                later_records: later,
            });
            return Ok(report);
        }
        let contents = disk.read(path)?;
        let bytes: &[u8] = contents.as_ref().as_ref();
        let mut off = 0;
        let mut any = false;
        loop {
            let why = match record::read(bytes, off) {
                Read::End => break,
                Read::Record(r, _) if expected.is_some_and(|e| r.seq != e) => "sequence break",
                Read::Record(r, _) if r.seq == u64::MAX => "sequence number at its maximum",
                Read::Record(r, next) => {
                    f(r);
                    report.records += 1;
                    report.bytes += (next - off) as u64;
                    report.last_seq = Some(r.seq);
                    if !any {
                        any = true;
                        report.last_segment = Some(path.clone());
                    }
                    expected = Some(r.seq + 1); // below u64::MAX: checked above
                    off = next;
                    continue;
                }
                Read::Bad(why) => why,
            };
            let min_seq = expected.unwrap_or(0);
            let later = find_valid(bytes, off + 1, min_seq).map_or(0, |at| count_from(bytes, at))
                + count_later(disk, &files[i + 1..]);
            report.damage = Some(if later == 0 {
                Damage::TornTail {
                    segment: path.clone(),
                    offset: off,
                    why,
                }
            } else {
                Damage::Corrupt {
                    segment: path.clone(),
                    offset: off,
                    seq: min_seq,
                    why,
                    later_records: later,
                }
            });
            return Ok(report);
        }
    }
    Ok(report)
}

/// The first offset at or after `from` holding a valid record with a
/// sequence number of at least `min_seq` (a cheap plausibility check first,
/// the checksum after).
fn find_valid(bytes: &[u8], from: usize, min_seq: u64) -> Option<usize> {
    let last = bytes.len().checked_sub(record::HEADER_BYTES)?;
    (from..=last).find(|&at| {
        let seq = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().expect("8 bytes"));
        (min_seq..min_seq.saturating_add(1 << 32)).contains(&seq)
            && matches!(record::read(bytes, at), Read::Record(..))
    })
}

/// Valid records from `at` to the first end or bad record.
fn count_from(bytes: &[u8], mut at: usize) -> u64 {
    let mut n = 0;
    while let Read::Record(_, next) = record::read(bytes, at) {
        n += 1;
        at = next;
    }
    n
}

/// Valid records at the start of each of `files` (damage is being reported
/// anyway; a file that cannot be read counts none).
fn count_later(disk: &dyn Disk, files: &[(u64, PathBuf)]) -> u64 {
    files
        .iter()
        .filter_map(|(_, p)| disk.read(p).ok())
        .map(|b| count_from(b.as_ref().as_ref(), 0))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::tests::temp_dir;
    use crate::log::Log;

    fn write_log(dir: &Path, n: u64) -> Vec<(u64, Vec<u8>)> {
        let mut log = Log::create(dir, 512, 0, 1).unwrap();
        let mut out = Vec::new();
        for i in 0..n {
            let body = vec![i as u8; 30 + (i as usize % 7)];
            let seq = log.append(9, &body).unwrap();
            out.push((seq, body));
        }
        out
    }

    fn read_all(dir: &Path) -> (Vec<(u64, Vec<u8>)>, ScanReport) {
        let mut got = Vec::new();
        let report = scan(dir, |r| got.push((r.seq, r.body.to_vec()))).unwrap();
        (got, report)
    }

    #[test]
    fn reads_back_everything_across_segments() {
        let dir = temp_dir("scan-all");
        let written = write_log(&dir, 40);
        let (got, report) = read_all(&dir);
        assert_eq!(got, written);
        assert_eq!(report.damage, None);
        assert_eq!(report.last_seq, Some(40));
        assert!(report.segments.len() > 3);
    }

    /// Offset of the record with sequence `seq` in its segment file.
    fn locate(dir: &Path, seq: u64) -> (PathBuf, usize) {
        for (_, path) in segment_files(dir).unwrap() {
            let bytes = std::fs::read(&path).unwrap();
            let mut off = 0;
            while let Read::Record(r, next) = record::read(&bytes, off) {
                if r.seq == seq {
                    return (path, off);
                }
                off = next;
            }
        }
        panic!("no record {seq}")
    }

    fn patch(path: &Path, at: usize, f: impl FnOnce(&mut [u8])) {
        let mut bytes = std::fs::read(path).unwrap();
        f(&mut bytes[at..]);
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn a_torn_last_record_is_cut_and_reported_as_a_torn_tail() {
        let dir = temp_dir("scan-torn");
        let written = write_log(&dir, 40);
        let (path, off) = locate(&dir, 40);
        // Half of the last record's body never made it.
        patch(&path, off + 20, |b| b[..20].fill(0));
        let (got, report) = read_all(&dir);
        assert_eq!(got, written[..39]);
        match report.damage {
            Some(Damage::TornTail {
                segment, offset, ..
            }) => {
                assert_eq!((segment, offset), (path, off))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_corrupt_record_in_the_middle_is_reported_with_what_follows() {
        let dir = temp_dir("scan-corrupt");
        let written = write_log(&dir, 40);
        let (path, off) = locate(&dir, 12);
        patch(&path, off + 20, |b| b[0] ^= 0x40);
        let (got, report) = read_all(&dir);
        assert_eq!(got, written[..11], "replay stops at the bad record");
        match report.damage {
            Some(Damage::Corrupt {
                segment,
                offset,
                seq,
                later_records,
                ..
            }) => {
                assert_eq!((segment, offset, seq), (path, off, 12));
                assert_eq!(later_records, 28, "records 13..=40 are counted");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_damaged_length_still_finds_the_later_records() {
        let dir = temp_dir("scan-len");
        write_log(&dir, 40);
        let (path, off) = locate(&dir, 5);
        patch(&path, off, |b| {
            b[..4].copy_from_slice(&7_000_000u32.to_le_bytes())
        });
        let (got, report) = read_all(&dir);
        assert_eq!(got.len(), 4);
        assert!(
            matches!(
                report.damage,
                Some(Damage::Corrupt {
                    later_records: 35,
                    ..
                })
            ),
            "{:?}",
            report.damage
        );
    }

    #[test]
    fn a_missing_segment_is_reported() {
        let dir = temp_dir("scan-missing");
        write_log(&dir, 40);
        let files = segment_files(&dir).unwrap();
        std::fs::remove_file(&files[1].1).unwrap();
        let (got, report) = read_all(&dir);
        assert!(!got.is_empty());
        assert!(
            matches!(report.damage, Some(Damage::MissingSegment { index: 1, later_records, .. }) if later_records > 0),
            "{:?}",
            report.damage
        );
    }
}
