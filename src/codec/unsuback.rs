//! UNSUBACK (packet type 11). 3.x: just the packet identifier, no reason
//! codes (the encoder ignores `reasons`); 5.0: properties and one reason code
//! per filter.

use bytes::{BufMut, Bytes, BytesMut};

use super::header::{self, kind};
use super::primitives::Reader;
use super::properties::{self, PropKind};
use super::{BoxedProperties, DecodeError, UnsubAck, Version};

/// Decodes an UNSUBACK body.
pub(crate) fn decode(body: &Bytes, version: Version) -> Result<UnsubAck, DecodeError> {
    let mut r = Reader::new(body);
    let packet_id = r.u16()?;
    if !version.is_v5() {
        r.finish()?;
        return Ok(UnsubAck {
            packet_id,
            reasons: Vec::new(),
            properties: BoxedProperties::default(),
        });
    }
    let properties = properties::decode_boxed(&mut r, PropKind::UnsubAck)?;
    let reasons = r.take(r.remaining())?.to_vec();
    if reasons.is_empty() {
        return Err(DecodeError::Protocol(
            "[MQTT-3.11.3-1] UNSUBACK contains no reason code",
        ));
    }
    Ok(UnsubAck {
        packet_id,
        reasons,
        properties,
    })
}

/// (remaining length, property list length).
fn lens(u: &UnsubAck, version: Version) -> (usize, usize) {
    if !version.is_v5() {
        return (2, 0);
    }
    let props = properties::len(&u.properties, PropKind::UnsubAck);
    (2 + properties::prefixed_len(props) + u.reasons.len(), props)
}

/// Remaining length of the encoding of `u`.
pub(crate) fn remaining_len(u: &UnsubAck, version: Version) -> usize {
    lens(u, version).0
}

/// Appends UNSUBACK.
pub(crate) fn encode(u: &UnsubAck, version: Version, out: &mut BytesMut) {
    let (remaining, props) = lens(u, version);
    header::write(out, kind::UNSUBACK << 4, remaining);
    out.put_u16(u.packet_id);
    if version.is_v5() {
        properties::encode(&u.properties, PropKind::UnsubAck, props, out);
        out.put_slice(&u.reasons);
    }
}
