//! Wire primitives: big-endian integers, variable byte integers, UTF-8
//! strings, binary data and string pairs, read from a frozen packet body and
//! written to a `BytesMut`.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use super::DecodeError;

/// Largest value a variable byte integer can carry (4 bytes).
pub const MAX_VARIABLE_BYTE_INTEGER: usize = 268_435_455;

/// Largest length of a UTF-8 string or binary data field.
pub const MAX_FIELD_LEN: usize = u16::MAX as usize;

/// A field runs past the end of the packet body (or of the property list).
pub(crate) const TRUNCATED: DecodeError =
    DecodeError::Malformed("[MQTT-1.5] packet body is shorter than its fields");

const BAD_UTF8: DecodeError =
    DecodeError::Malformed("[MQTT-1.5.4-1] string is not well-formed UTF-8");
const NUL_IN_STRING: DecodeError =
    DecodeError::Malformed("[MQTT-1.5.4-2] string contains the null character U+0000");
const LONG_VBI: DecodeError =
    DecodeError::Malformed("[MQTT-1.5.5] variable byte integer longer than 4 bytes");

/// Longest topic a connection's reader remembers to share with its next
/// PUBLISH ([`Reader::topic_as`]), in bytes.
pub(crate) const SHARED_TOPIC_MAX_BYTES: usize = 256;

/// A cursor over (part of) a frozen packet body.
///
/// Binary fields are returned as `Bytes` slices of the body, so nothing is
/// copied; strings are validated (UTF-8, no U+0000) before they are returned.
pub(crate) struct Reader<'a> {
    bytes: &'a Bytes,
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    /// A reader over the whole of `bytes`.
    pub(crate) fn new(bytes: &'a Bytes) -> Self {
        Reader {
            bytes,
            pos: 0,
            end: bytes.len(),
        }
    }

    /// Bytes left before the end of this reader.
    pub(crate) fn remaining(&self) -> usize {
        self.end - self.pos
    }

    /// Offset of the cursor from the start of the underlying body.
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    /// Takes the next `n` bytes.
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(TRUNCATED);
        }
        let bytes: &'a Bytes = self.bytes;
        let s = &bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// A reader over the next `n` bytes; this reader skips them.
    pub(crate) fn sub(&mut self, n: usize) -> Result<Reader<'a>, DecodeError> {
        if self.remaining() < n {
            return Err(TRUNCATED);
        }
        let sub = Reader {
            bytes: self.bytes,
            pos: self.pos,
            end: self.pos + n,
        };
        self.pos += n;
        Ok(sub)
    }

    /// One byte.
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    /// Two byte integer, big-endian.
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// Four byte integer, big-endian.
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Variable byte integer, 1 to 4 bytes.
    pub(crate) fn vbi(&mut self) -> Result<u32, DecodeError> {
        let mut value = 0u32;
        for i in 0..4 {
            let b = self.u8()?;
            value |= u32::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(LONG_VBI)
    }

    /// Length-prefixed raw bytes (the body of a string or binary field).
    pub(crate) fn prefixed(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// UTF-8 encoded string, borrowed from the body.
    pub(crate) fn str(&mut self) -> Result<&'a str, DecodeError> {
        validate_str(self.prefixed()?)
    }

    /// UTF-8 encoded string, owned.
    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        self.str().map(str::to_owned)
    }

    /// UTF-8 encoded string as a shared topic: one allocation.
    pub(crate) fn topic(&mut self) -> Result<Arc<str>, DecodeError> {
        self.str().map(Arc::from)
    }

    /// [`Reader::topic`], sharing `last` when the bytes are the same (a
    /// client publishes to the same topic over and over: no allocation, no
    /// second check of bytes `last` passed), else allocating and
    /// remembering it in `last` if it is at most [`SHARED_TOPIC_MAX_BYTES`]
    /// long (what an idle connection may keep).
    pub(crate) fn topic_as(
        &mut self,
        last: &mut Option<Arc<str>>,
    ) -> Result<Arc<str>, DecodeError> {
        let raw = self.prefixed()?;
        if let Some(t) = last.as_ref().filter(|t| t.as_bytes() == raw) {
            return Ok(t.clone());
        }
        let t: Arc<str> = Arc::from(validate_str(raw)?);
        *last = (t.len() <= SHARED_TOPIC_MAX_BYTES).then(|| t.clone());
        Ok(t)
    }

    /// Binary data: a slice of the body, not a copy.
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = usize::from(self.u16()?);
        if self.remaining() < len {
            return Err(TRUNCATED);
        }
        let b = self.bytes.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(b)
    }

    /// UTF-8 string pair (user property).
    pub(crate) fn string_pair(&mut self) -> Result<(String, String), DecodeError> {
        let k = self.string()?;
        let v = self.string()?;
        Ok((k, v))
    }

    /// Fails unless the whole body has been read.
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.pos == self.end {
            Ok(())
        } else {
            Err(DecodeError::Malformed(
                "[MQTT-2.1.4] bytes left over after the packet's last field",
            ))
        }
    }
}

/// Checks `[MQTT-1.5.4-1]` (well-formed UTF-8) and `[MQTT-1.5.4-2]` (no U+0000).
pub(crate) fn validate_str(b: &[u8]) -> Result<&str, DecodeError> {
    let s = std::str::from_utf8(b).map_err(|_| BAD_UTF8)?;
    if has_nul(b) {
        return Err(NUL_IN_STRING);
    }
    Ok(s)
}

/// True when `b` contains a zero byte. Eight bytes at a time: `contains`
/// goes through memchr, whose set-up dominates on the short strings MQTT
/// carries.
#[inline]
fn has_nul(b: &[u8]) -> bool {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let x = u64::from_le_bytes(w);
        if x.wrapping_sub(LO) & !x & HI != 0 {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .fold(false, |nul, &c| nul | (c == 0))
}

/// Bytes taken by `v` as a variable byte integer.
#[inline]
pub(crate) fn vbi_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Encodes `v` (at most [`MAX_VARIABLE_BYTE_INTEGER`]) into `dst`, returning
/// the number of bytes used.
#[inline]
pub(crate) fn vbi_bytes(mut v: usize, dst: &mut [u8; 4]) -> usize {
    assert!(
        v <= MAX_VARIABLE_BYTE_INTEGER,
        "variable byte integer {v} exceeds 268435455"
    );
    let mut n = 0;
    loop {
        let mut b = (v & 0x7F) as u8;
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        dst[n] = b;
        n += 1;
        if v == 0 {
            return n;
        }
    }
}

/// Appends `v` as a variable byte integer.
#[inline]
pub(crate) fn put_vbi(out: &mut BytesMut, v: usize) {
    let mut tmp = [0u8; 4];
    let n = vbi_bytes(v, &mut tmp);
    out.put_slice(&tmp[..n]);
}

/// Bytes taken by a string or binary field of `len` bytes.
#[inline]
pub(crate) fn field_len(len: usize) -> usize {
    2 + len
}

/// Appends a length-prefixed string or binary field.
///
/// # Panics
/// If `b` is longer than 65,535 bytes: it cannot be represented.
#[inline]
pub(crate) fn put_prefixed(out: &mut BytesMut, b: &[u8]) {
    assert!(
        b.len() <= MAX_FIELD_LEN,
        "string or binary field of {} bytes exceeds 65535",
        b.len()
    );
    out.put_u16(b.len() as u16);
    out.put_slice(b);
}
