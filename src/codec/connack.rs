//! CONNACK (packet type 2).
//!
//! [`ConnAck::reason`] always holds an MQTT 5.0 reason code. For 3.x the
//! decoder maps return codes 0..=5 to 0x00, 0x84, 0x85, 0x88, 0x86, 0x87 and
//! the encoder maps back: 0x00 → 0, 0x84 → 1, 0x85 → 2, 0x86 → 4, 0x87 → 5,
//! 0x8C → 4, 0x8A → 5, any other failure → 3 (server unavailable).

use bytes::{BufMut, Bytes, BytesMut};

use super::header::{self, kind};
use super::primitives::Reader;
use super::properties::{self, PropKind};
use super::{reason, BoxedProperties, ConnAck, DecodeError, Version};

const SESSION_PRESENT: u8 = 0x01;

/// The MQTT 5.0 reason code for a 3.x CONNACK return code.
pub fn reason_from_v3(code: u8) -> Option<u8> {
    Some(match code {
        0 => reason::SUCCESS,
        1 => reason::UNSUPPORTED_PROTOCOL_VERSION,
        2 => reason::CLIENT_IDENTIFIER_NOT_VALID,
        3 => reason::SERVER_UNAVAILABLE,
        4 => reason::BAD_USER_NAME_OR_PASSWORD,
        5 => reason::NOT_AUTHORIZED,
        _ => return None,
    })
}

/// The 3.x CONNACK return code for an MQTT 5.0 reason code.
pub fn reason_to_v3(code: u8) -> u8 {
    match code {
        reason::SUCCESS => 0,
        reason::UNSUPPORTED_PROTOCOL_VERSION => 1,
        reason::CLIENT_IDENTIFIER_NOT_VALID => 2,
        reason::BAD_USER_NAME_OR_PASSWORD | reason::BAD_AUTHENTICATION_METHOD => 4,
        reason::NOT_AUTHORIZED | reason::BANNED => 5,
        _ => 3,
    }
}

/// Decodes a CONNACK body.
pub(crate) fn decode(body: &Bytes, version: Version) -> Result<ConnAck, DecodeError> {
    let mut r = Reader::new(body);
    let flags = r.u8()?;
    if flags & !SESSION_PRESENT != 0 {
        return Err(DecodeError::Malformed(
            "[MQTT-3.2.2-1] reserved CONNACK acknowledge flags are not 0",
        ));
    }
    let code = r.u8()?;
    let mut properties = BoxedProperties::default();
    let reason = if version.is_v5() {
        properties = properties::decode_boxed(&mut r, PropKind::ConnAck)?;
        code
    } else {
        reason_from_v3(code).ok_or(DecodeError::Malformed(
            "[MQTT-3.2.2.3] reserved CONNACK return code",
        ))?
    };
    r.finish()?;
    Ok(ConnAck {
        session_present: flags & SESSION_PRESENT != 0,
        reason,
        properties,
    })
}

fn lens(c: &ConnAck, version: Version) -> (usize, usize) {
    if version.is_v5() {
        let props = properties::len(&c.properties, PropKind::ConnAck);
        (2 + properties::prefixed_len(props), props)
    } else {
        (2, 0)
    }
}

/// Remaining length of the encoding of `c`.
pub(crate) fn remaining_len(c: &ConnAck, version: Version) -> usize {
    lens(c, version).0
}

/// Appends CONNACK.
pub(crate) fn encode(c: &ConnAck, version: Version, out: &mut BytesMut) {
    let (remaining, props) = lens(c, version);
    header::write(out, kind::CONNACK << 4, remaining);
    let code = if version.is_v5() {
        c.reason
    } else {
        reason_to_v3(c.reason)
    };
    out.put_slice(&[u8::from(c.session_present), code]);
    if version.is_v5() {
        properties::encode(&c.properties, PropKind::ConnAck, props, out);
    }
}
