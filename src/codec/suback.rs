//! SUBACK (packet type 9). In 3.x the only return codes are 0, 1, 2 and
//! 0x80; the encoder writes any other code (a 5.0 failure) as 0x80 there.

use bytes::{BufMut, Bytes, BytesMut};

use super::header::{self, kind};
use super::primitives::Reader;
use super::properties::{self, PropKind};
use super::{BoxedProperties, DecodeError, SubAck, Version};

/// Decodes a SUBACK body.
pub(crate) fn decode(body: &Bytes, version: Version) -> Result<SubAck, DecodeError> {
    let mut r = Reader::new(body);
    let packet_id = r.u16()?;
    let properties = match version.is_v5() {
        true => properties::decode_boxed(&mut r, PropKind::SubAck)?,
        false => BoxedProperties::default(),
    };
    let reasons = r.take(r.remaining())?.to_vec();
    if reasons.is_empty() {
        return Err(DecodeError::Protocol(
            "[MQTT-3.9.3-1] SUBACK contains no return code",
        ));
    }
    if !version.is_v5() && reasons.iter().any(|&c| !matches!(c, 0 | 1 | 2 | 0x80)) {
        return Err(DecodeError::Malformed(
            "[MQTT-3.9.3-2] SUBACK return code is not 0x00, 0x01, 0x02 or 0x80",
        ));
    }
    Ok(SubAck {
        packet_id,
        reasons,
        properties,
    })
}

/// (remaining length, property list length).
fn lens(s: &SubAck, version: Version) -> (usize, usize) {
    let mut props = 0;
    let mut remaining = 2 + s.reasons.len();
    if version.is_v5() {
        props = properties::len(&s.properties, PropKind::SubAck);
        remaining += properties::prefixed_len(props);
    }
    (remaining, props)
}

/// Remaining length of the encoding of `s`.
pub(crate) fn remaining_len(s: &SubAck, version: Version) -> usize {
    lens(s, version).0
}

/// Appends SUBACK.
pub(crate) fn encode(s: &SubAck, version: Version, out: &mut BytesMut) {
    let (remaining, props) = lens(s, version);
    header::write(out, kind::SUBACK << 4, remaining);
    out.put_u16(s.packet_id);
    if version.is_v5() {
        properties::encode(&s.properties, PropKind::SubAck, props, out);
        out.put_slice(&s.reasons);
    } else if s.reasons.iter().all(|&c| c <= 2 || c == 0x80) {
        out.put_slice(&s.reasons);
    } else {
        for &c in &s.reasons {
            out.put_u8(if c <= 2 { c } else { 0x80 });
        }
    }
}
