//! The fixed header: packet type, flags and remaining length.

use bytes::{BufMut, BytesMut};

use super::primitives::{vbi_bytes, vbi_len};
use super::{DecodeError, Version};

/// Packet type numbers (high nibble of the first byte).
pub(crate) mod kind {
    pub(crate) const CONNECT: u8 = 1;
    pub(crate) const CONNACK: u8 = 2;
    pub(crate) const PUBLISH: u8 = 3;
    pub(crate) const PUBACK: u8 = 4;
    pub(crate) const PUBREC: u8 = 5;
    pub(crate) const PUBREL: u8 = 6;
    pub(crate) const PUBCOMP: u8 = 7;
    pub(crate) const SUBSCRIBE: u8 = 8;
    pub(crate) const SUBACK: u8 = 9;
    pub(crate) const UNSUBSCRIBE: u8 = 10;
    pub(crate) const UNSUBACK: u8 = 11;
    pub(crate) const PINGREQ: u8 = 12;
    pub(crate) const PINGRESP: u8 = 13;
    pub(crate) const DISCONNECT: u8 = 14;
    pub(crate) const AUTH: u8 = 15;
}

/// A parsed fixed header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FixedHeader {
    /// The first byte: type in the high nibble, flags in the low one.
    pub(crate) byte0: u8,
    /// Remaining length: size of the body.
    pub(crate) remaining: usize,
    /// Size of the fixed header itself (2 to 5 bytes).
    pub(crate) len: usize,
}

/// Checks the packet type and its reserved flags (`[MQTT-2.1.3-1]`).
/// PUBLISH flags are checked by the PUBLISH decoder.
pub(crate) fn check_first_byte(byte0: u8, version: Version) -> Result<(), DecodeError> {
    let flags = byte0 & 0x0F;
    match byte0 >> 4 {
        0 => Err(DecodeError::Malformed(
            "[MQTT-2.1.2] packet type 0 is reserved",
        )),
        kind::AUTH if !version.is_v5() => Err(DecodeError::Malformed(
            "[MQTT-2.2.1] packet type 15 is reserved before MQTT 5.0",
        )),
        kind::PUBLISH => Ok(()),
        kind::PUBREL if flags != 0b0010 => Err(DecodeError::Malformed(
            "[MQTT-3.6.1-1] PUBREL fixed header flags are not 0010",
        )),
        kind::SUBSCRIBE if flags != 0b0010 => Err(DecodeError::Malformed(
            "[MQTT-3.8.1-1] SUBSCRIBE fixed header flags are not 0010",
        )),
        kind::UNSUBSCRIBE if flags != 0b0010 => Err(DecodeError::Malformed(
            "[MQTT-3.10.1-1] UNSUBSCRIBE fixed header flags are not 0010",
        )),
        kind::PUBREL | kind::SUBSCRIBE | kind::UNSUBSCRIBE => Ok(()),
        _ if flags != 0 => Err(DecodeError::Malformed(
            "[MQTT-2.2.2-2] reserved fixed header flags are not 0",
        )),
        _ => Ok(()),
    }
}

/// Parses the fixed header at the front of `buf`; `Ok(None)` when it is not
/// complete yet.
#[inline]
pub(crate) fn parse(buf: &[u8], version: Version) -> Result<Option<FixedHeader>, DecodeError> {
    let Some(&byte0) = buf.first() else {
        return Ok(None);
    };
    check_first_byte(byte0, version)?;
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some(FixedHeader {
                byte0,
                remaining,
                len: 2 + i,
            }));
        }
    }
    Err(DecodeError::MalformedRemainingLength)
}

/// Size of a fixed header announcing `remaining` bytes of body.
#[inline]
pub(crate) fn len(remaining: usize) -> usize {
    1 + vbi_len(remaining)
}

/// Reserves room for the whole packet and writes its fixed header.
///
/// # Panics
/// If `remaining` exceeds 268,435,455, the largest MQTT packet.
#[inline]
pub(crate) fn write(out: &mut BytesMut, byte0: u8, remaining: usize) {
    let mut tmp = [0u8; 5];
    tmp[0] = byte0;
    let mut vbi = [0u8; 4];
    let n = vbi_bytes(remaining, &mut vbi);
    tmp[1..1 + n].copy_from_slice(&vbi[..n]);
    out.reserve(1 + n + remaining);
    out.put_slice(&tmp[..1 + n]);
}

/// Like [`write`], followed by the big-endian `first` (the first field of
/// the body), in one `put_slice`.
#[inline]
pub(crate) fn write_with_u16(out: &mut BytesMut, byte0: u8, remaining: usize, first: u16) {
    let mut tmp = [0u8; 7];
    tmp[0] = byte0;
    let mut vbi = [0u8; 4];
    let n = vbi_bytes(remaining, &mut vbi);
    tmp[1..1 + n].copy_from_slice(&vbi[..n]);
    tmp[1 + n..3 + n].copy_from_slice(&first.to_be_bytes());
    out.reserve(1 + n + remaining);
    out.put_slice(&tmp[..3 + n]);
}
