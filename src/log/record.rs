//! Record framing: `[len u32][crc32c u32][seq u64][kind u8][body]`, little
//! endian. `len` counts the bytes after the checksum (seq, kind, body); the
//! checksum covers the same bytes. A zero `len` marks the end of what was
//! written (segments are preallocated with zeros).
//!
//! Pure functions over byte slices; used by the writer and by recovery.

/// Bytes before the body: len, crc, seq, kind.
pub const HEADER_BYTES: usize = 4 + 4 + 8 + 1;

/// Bytes covered by `len` besides the body: seq and kind.
const LEN_EXTRA: usize = 8 + 1;

/// Largest body a record may carry (bounded so a damaged `len` is seen as
/// damage, not as a huge record).
pub const BODY_MAX_BYTES: usize = 1 << 30;

/// Total size of a record with a body of `body_len` bytes.
#[inline]
pub fn record_len(body_len: usize) -> usize {
    HEADER_BYTES + body_len
}

/// Write a record into `dst` (exactly [`record_len`] bytes). The length is
/// written last, after a release fence: a process killed mid-write leaves a
/// zero length (the end of the log), never a length over half a record.
pub fn write(dst: &mut [u8], seq: u64, kind: u8, body: &[u8]) {
    assert_eq!(dst.len(), record_len(body.len()), "record buffer size");
    assert!(body.len() <= BODY_MAX_BYTES, "record body too large");
    dst[8..16].copy_from_slice(&seq.to_le_bytes());
    dst[16] = kind;
    dst[HEADER_BYTES..].copy_from_slice(body);
    let crc = crc32c::crc32c(&dst[8..]);
    dst[4..8].copy_from_slice(&crc.to_le_bytes());
    std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    let len = (LEN_EXTRA + body.len()) as u32;
    dst[0..4].copy_from_slice(&len.to_le_bytes());
}

/// One record read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// Sequence number (one more than the previous record's).
    pub seq: u64,
    /// Record kind.
    pub kind: u8,
    /// Body.
    pub body: &'a [u8],
}

/// What is found at an offset of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read<'a> {
    /// A record whose checksum verifies, and the offset after it.
    Record(RecordRef<'a>, usize),
    /// Zero length: nothing was written here.
    End,
    /// A record that does not verify: why.
    Bad(&'static str),
}

/// Read the record at `off` of `seg`, verifying its checksum.
pub fn read(seg: &[u8], off: usize) -> Read<'_> {
    // An offset past the segment (from a damaged index) reads as its end.
    let Some(head) = seg.get(off..off.saturating_add(4)) else {
        return Read::End;
    };
    let len = u32::from_le_bytes(head.try_into().expect("4 bytes")) as usize;
    if len == 0 {
        return Read::End;
    }
    if !(LEN_EXTRA..=LEN_EXTRA + BODY_MAX_BYTES).contains(&len) {
        return Read::Bad("length out of range");
    }
    let Some(rest) = seg.get(off + 4..(off + 8).saturating_add(len)) else {
        return Read::Bad("length runs past the end of the segment");
    };
    let crc = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
    let covered = &rest[4..];
    if crc32c::crc32c(covered) != crc {
        return Read::Bad("checksum mismatch");
    }
    let seq = u64::from_le_bytes(covered[..8].try_into().expect("8 bytes"));
    let rec = RecordRef {
        seq,
        kind: covered[8],
        body: &covered[9..],
    };
    Read::Record(rec, off + 8 + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(seq: u64, kind: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![0; record_len(body.len())];
        write(&mut v, seq, kind, body);
        v
    }

    #[test]
    fn a_written_record_reads_back() {
        let mut seg = one(7, 3, b"hello");
        seg.extend(one(8, 4, b""));
        seg.extend([0u8; 16]);
        let Read::Record(r, next) = read(&seg, 0) else {
            panic!()
        };
        assert_eq!((r.seq, r.kind, r.body), (7, 3, &b"hello"[..]));
        let Read::Record(r, next) = read(&seg, next) else {
            panic!()
        };
        assert_eq!((r.seq, r.kind, r.body), (8, 4, &b""[..]));
        assert_eq!(read(&seg, next), Read::End);
        assert_eq!(read(&seg, seg.len()), Read::End);
    }

    #[test]
    fn any_flipped_bit_is_caught() {
        let rec = one(1, 2, b"payload bytes");
        for byte in 4..rec.len() {
            for bit in 0..8 {
                let mut bad = rec.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    matches!(read(&bad, 0), Read::Bad(_)),
                    "flip of bit {bit} in byte {byte} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn a_torn_record_is_bad_or_the_end() {
        let rec = one(1, 2, b"0123456789");
        for cut in 0..rec.len() {
            let mut torn = rec[..cut].to_vec();
            torn.resize(rec.len() + 8, 0);
            assert!(
                !matches!(read(&torn, 0), Read::Record(..)),
                "a record cut at {cut} bytes reads as whole"
            );
        }
    }
}
