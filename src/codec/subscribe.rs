//! SUBSCRIBE (packet type 8).
//!
//! Topic filters are not checked for wildcard placement here; the session
//! does that.

use bytes::{BufMut, Bytes, BytesMut};

use super::header::{self, kind};
use super::primitives::{field_len, put_prefixed, Reader};
use super::properties::{self, PropKind};
use super::{BoxedProperties, DecodeError, QoS, SubOptions, Subscribe, Version};

const QOS_MASK: u8 = 0x03;
const NO_LOCAL: u8 = 0x04;
const RETAIN_AS_PUBLISHED: u8 = 0x08;
const RETAIN_HANDLING_SHIFT: u8 = 4;

/// Decodes a subscription options byte for `version`.
pub(crate) fn decode_options(b: u8, version: Version) -> Result<SubOptions, DecodeError> {
    if !version.is_v5() && b & !QOS_MASK != 0 {
        return Err(DecodeError::Malformed(
            "[MQTT-3.8.3-4] reserved bits of the requested QoS byte are not 0",
        ));
    }
    if b & 0xC0 != 0 {
        return Err(DecodeError::Malformed(
            "[MQTT-3.8.3-5] reserved bits of the subscription options are not 0",
        ));
    }
    let qos = QoS::from_u8(b & QOS_MASK)
        .ok_or(DecodeError::Malformed("[MQTT-3.8.3-4] requested QoS is 3"))?;
    let retain_handling = (b >> RETAIN_HANDLING_SHIFT) & 0x03;
    if retain_handling == 3 {
        return Err(DecodeError::Protocol("[MQTT-3.8.3.1] Retain Handling is 3"));
    }
    Ok(SubOptions {
        qos,
        no_local: b & NO_LOCAL != 0,
        retain_as_published: b & RETAIN_AS_PUBLISHED != 0,
        retain_handling,
    })
}

/// Encodes a subscription options byte; 3.x carries only the QoS.
pub(crate) fn encode_options(o: &SubOptions, version: Version) -> u8 {
    let mut b = o.qos as u8;
    if version.is_v5() {
        if o.no_local {
            b |= NO_LOCAL;
        }
        if o.retain_as_published {
            b |= RETAIN_AS_PUBLISHED;
        }
        b |= (o.retain_handling & 0x03) << RETAIN_HANDLING_SHIFT;
    }
    b
}

/// Decodes a SUBSCRIBE body.
pub(crate) fn decode(body: &Bytes, version: Version) -> Result<Subscribe, DecodeError> {
    let mut r = Reader::new(body);
    let packet_id = r.u16()?;
    if packet_id == 0 {
        return Err(DecodeError::Protocol(
            "[MQTT-2.2.1-3] SUBSCRIBE has packet identifier 0",
        ));
    }
    let properties = match version.is_v5() {
        true => properties::decode_boxed(&mut r, PropKind::Subscribe)?,
        false => BoxedProperties::default(),
    };
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        let filter = r.string()?;
        let options = decode_options(r.u8()?, version)?;
        filters.push((filter, options));
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol(
            "[MQTT-3.8.3-3] SUBSCRIBE contains no topic filter",
        ));
    }
    Ok(Subscribe {
        packet_id,
        filters,
        properties,
    })
}

/// (remaining length, property list length).
fn lens(s: &Subscribe, version: Version) -> (usize, usize) {
    let mut remaining = 2;
    let mut props = 0;
    if version.is_v5() {
        props = properties::len(&s.properties, PropKind::Subscribe);
        remaining += properties::prefixed_len(props);
    }
    remaining += s
        .filters
        .iter()
        .map(|(f, _)| field_len(f.len()) + 1)
        .sum::<usize>();
    (remaining, props)
}

/// Remaining length of the encoding of `s`.
pub(crate) fn remaining_len(s: &Subscribe, version: Version) -> usize {
    lens(s, version).0
}

/// Appends SUBSCRIBE.
pub(crate) fn encode(s: &Subscribe, version: Version, out: &mut BytesMut) {
    let (remaining, props) = lens(s, version);
    header::write(out, (kind::SUBSCRIBE << 4) | 0b0010, remaining);
    out.put_u16(s.packet_id);
    if version.is_v5() {
        properties::encode(&s.properties, PropKind::Subscribe, props, out);
    }
    for (filter, options) in &s.filters {
        put_prefixed(out, filter.as_bytes());
        out.put_u8(encode_options(options, version));
    }
}
