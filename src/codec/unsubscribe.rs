//! UNSUBSCRIBE (packet type 10).

use bytes::{BufMut, Bytes, BytesMut};

use super::header::{self, kind};
use super::primitives::{field_len, put_prefixed, Reader};
use super::properties::{self, PropKind};
use super::{BoxedProperties, DecodeError, Unsubscribe, Version};

/// Decodes an UNSUBSCRIBE body.
pub(crate) fn decode(body: &Bytes, version: Version) -> Result<Unsubscribe, DecodeError> {
    let mut r = Reader::new(body);
    let packet_id = r.u16()?;
    if packet_id == 0 {
        return Err(DecodeError::Protocol(
            "[MQTT-2.2.1-3] UNSUBSCRIBE has packet identifier 0",
        ));
    }
    let properties = match version.is_v5() {
        true => properties::decode_boxed(&mut r, PropKind::Unsubscribe)?,
        false => BoxedProperties::default(),
    };
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        filters.push(r.string()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol(
            "[MQTT-3.10.3-2] UNSUBSCRIBE contains no topic filter",
        ));
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        properties,
    })
}

/// (remaining length, property list length).
fn lens(u: &Unsubscribe, version: Version) -> (usize, usize) {
    let mut remaining = 2;
    let mut props = 0;
    if version.is_v5() {
        props = properties::len(&u.properties, PropKind::Unsubscribe);
        remaining += properties::prefixed_len(props);
    }
    remaining += u.filters.iter().map(|f| field_len(f.len())).sum::<usize>();
    (remaining, props)
}

/// Remaining length of the encoding of `u`.
pub(crate) fn remaining_len(u: &Unsubscribe, version: Version) -> usize {
    lens(u, version).0
}

/// Appends UNSUBSCRIBE.
pub(crate) fn encode(u: &Unsubscribe, version: Version, out: &mut BytesMut) {
    let (remaining, props) = lens(u, version);
    header::write(out, (kind::UNSUBSCRIBE << 4) | 0b0010, remaining);
    out.put_u16(u.packet_id);
    if version.is_v5() {
        properties::encode(&u.properties, PropKind::Unsubscribe, props, out);
    }
    for f in &u.filters {
        put_prefixed(out, f.as_bytes());
    }
}
