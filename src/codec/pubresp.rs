//! PUBACK, PUBREC, PUBREL and PUBCOMP (packet types 4 to 7): a packet
//! identifier and, in 5.0, an optional reason code and properties.
//!
//! 5.0 remaining length 2 means reason 0 and no properties, 3 means a reason
//! and no properties, more means reason and properties. The encoder writes
//! the shortest form.

use bytes::{BufMut, Bytes, BytesMut};

use super::header;
use super::primitives::Reader;
use super::properties::{self, PropKind};
use super::{BoxedProperties, DecodeError, PubResp, Version};

/// Decodes the body of any of the four responses.
pub(crate) fn decode(body: &Bytes, version: Version) -> Result<PubResp, DecodeError> {
    let mut r = Reader::new(body);
    let packet_id = r.u16()?;
    let mut resp = PubResp {
        packet_id,
        reason: 0,
        properties: BoxedProperties::default(),
    };
    if version.is_v5() && r.remaining() > 0 {
        resp.reason = r.u8()?;
        if r.remaining() > 0 {
            resp.properties = properties::decode_boxed(&mut r, PropKind::PubResp)?;
        }
    }
    r.finish()?;
    Ok(resp)
}

/// (remaining length, property list length).
fn lens(p: &PubResp, version: Version) -> (usize, usize) {
    if !version.is_v5() {
        return (2, 0);
    }
    let props = properties::len(&p.properties, PropKind::PubResp);
    match (p.reason, props) {
        (0, 0) => (2, 0),
        (_, 0) => (3, 0),
        _ => (3 + properties::prefixed_len(props), props),
    }
}

/// Remaining length of the encoding of `p`.
pub(crate) fn remaining_len(p: &PubResp, version: Version) -> usize {
    lens(p, version).0
}

/// Appends the response whose first byte (type and flags) is `byte0`.
pub(crate) fn encode(byte0: u8, p: &PubResp, version: Version, out: &mut BytesMut) {
    let (remaining, props) = lens(p, version);
    header::write(out, byte0, remaining);
    out.put_u16(p.packet_id);
    if remaining > 2 {
        out.put_u8(p.reason);
    }
    if remaining > 3 {
        properties::encode(&p.properties, PropKind::PubResp, props, out);
    }
}
