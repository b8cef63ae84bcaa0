//! CONNECT (packet type 1).
//!
//! The protocol name and level fix the version: `MQIsdp`/3 is 3.1, `MQTT`/4
//! is 3.1.1, `MQTT`/5 is 5.0. A known name with another level is
//! [`DecodeError::UnsupportedProtocolVersion`]; any other protocol name is a
//! [`DecodeError::Protocol`] error (`[MQTT-3.1.2-1]`).

use bytes::{BufMut, Bytes, BytesMut};

use super::header::{self, kind};
use super::primitives::{field_len, put_prefixed, Reader};
use super::properties::{self, PropKind};
use super::{Connect, DecodeError, Properties, QoS, Version, Will};

const RESERVED: u8 = 0x01;
const CLEAN_START: u8 = 0x02;
const WILL: u8 = 0x04;
const WILL_QOS_SHIFT: u8 = 3;
const WILL_RETAIN: u8 = 0x20;
const PASSWORD: u8 = 0x40;
const USERNAME: u8 = 0x80;

/// Protocol name and level on the wire for `version`.
fn protocol(version: Version) -> (&'static [u8], u8) {
    match version {
        Version::V3_1 => (b"MQIsdp", 3),
        Version::V3_1_1 => (b"MQTT", 4),
        Version::V5 => (b"MQTT", 5),
    }
}

fn read_protocol(r: &mut Reader<'_>) -> Result<Version, DecodeError> {
    let name = r.prefixed()?;
    let level = r.u8()?;
    match (name, level) {
        (b"MQIsdp", 3) => Ok(Version::V3_1),
        (b"MQTT", 4) => Ok(Version::V3_1_1),
        (b"MQTT", 5) => Ok(Version::V5),
        (b"MQTT" | b"MQIsdp", level) => Err(DecodeError::UnsupportedProtocolVersion(level)),
        _ => Err(DecodeError::Protocol(
            "[MQTT-3.1.2-1] protocol name is neither MQTT nor MQIsdp",
        )),
    }
}

fn check_flags(flags: u8, version: Version) -> Result<(), DecodeError> {
    if flags & RESERVED != 0 {
        return Err(DecodeError::Malformed(
            "[MQTT-3.1.2-3] reserved flag in CONNECT is not 0",
        ));
    }
    let will_qos = (flags >> WILL_QOS_SHIFT) & 0x03;
    if flags & WILL == 0 {
        if will_qos != 0 {
            return Err(DecodeError::Malformed(
                "[MQTT-3.1.2-13] Will QoS is not 0 while the Will Flag is 0",
            ));
        }
        if flags & WILL_RETAIN != 0 {
            return Err(DecodeError::Malformed(
                "[MQTT-3.1.2-15] Will Retain is set while the Will Flag is 0",
            ));
        }
    } else if will_qos == 3 {
        return Err(DecodeError::Malformed("[MQTT-3.1.2-14] Will QoS is 3"));
    }
    if !version.is_v5() && flags & PASSWORD != 0 && flags & USERNAME == 0 {
        return Err(DecodeError::Malformed(
            "[MQTT-3.1.2-22] Password Flag is set without the User Name Flag",
        ));
    }
    Ok(())
}

fn read_will(r: &mut Reader<'_>, flags: u8, version: Version) -> Result<Will, DecodeError> {
    let mut properties = Properties::default();
    if version.is_v5() {
        properties::decode(r, PropKind::Will, &mut properties)?;
    }
    let topic = r.topic()?;
    let payload = r.binary()?;
    let qos = QoS::from_u8((flags >> WILL_QOS_SHIFT) & 0x03)
        .ok_or(DecodeError::Malformed("[MQTT-3.1.2-14] Will QoS is 3"))?;
    Ok(Will {
        topic,
        payload,
        qos,
        retain: flags & WILL_RETAIN != 0,
        properties,
    })
}

/// Decodes a CONNECT body; the version comes from the packet itself.
pub(crate) fn decode(body: &Bytes) -> Result<Connect, DecodeError> {
    let mut r = Reader::new(body);
    let version = read_protocol(&mut r)?;
    let flags = r.u8()?;
    check_flags(flags, version)?;
    let keep_alive = r.u16()?;
    let mut properties = Properties::default();
    if version.is_v5() {
        properties::decode(&mut r, PropKind::Connect, &mut properties)?;
    }
    let client_id = r.string()?;
    let will = match flags & WILL {
        0 => None,
        _ => Some(read_will(&mut r, flags, version)?),
    };
    let username = match flags & USERNAME {
        0 => None,
        _ => Some(r.string()?),
    };
    let password = match flags & PASSWORD {
        0 => None,
        _ => Some(r.binary()?),
    };
    r.finish()?;
    Ok(Connect {
        version,
        clean_start: flags & CLEAN_START != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

/// Lengths computed once and shared by `remaining_len` and `encode`.
struct Lens {
    remaining: usize,
    props: usize,
    will_props: usize,
}

fn lens(c: &Connect) -> Lens {
    let v5 = c.version.is_v5();
    let (name, _) = protocol(c.version);
    let props = if v5 {
        properties::len(&c.properties, PropKind::Connect)
    } else {
        0
    };
    let mut remaining = field_len(name.len()) + 1 + 1 + 2 + field_len(c.client_id.len());
    if v5 {
        remaining += properties::prefixed_len(props);
    }
    let mut will_props = 0;
    if let Some(w) = &c.will {
        if v5 {
            will_props = properties::len(&w.properties, PropKind::Will);
            remaining += properties::prefixed_len(will_props);
        }
        remaining += field_len(w.topic.len()) + field_len(w.payload.len());
    }
    remaining += c.username.as_ref().map_or(0, |u| field_len(u.len()));
    remaining += c.password.as_ref().map_or(0, |p| field_len(p.len()));
    Lens {
        remaining,
        props,
        will_props,
    }
}

/// Remaining length of the encoding of `c`.
pub(crate) fn remaining_len(c: &Connect) -> usize {
    lens(c).remaining
}

fn flags(c: &Connect) -> u8 {
    let mut f = 0;
    if c.clean_start {
        f |= CLEAN_START;
    }
    if let Some(w) = &c.will {
        f |= WILL | ((w.qos as u8) << WILL_QOS_SHIFT);
        if w.retain {
            f |= WILL_RETAIN;
        }
    }
    if c.password.is_some() {
        f |= PASSWORD;
    }
    if c.username.is_some() {
        f |= USERNAME;
    }
    f
}

/// Appends CONNECT in the version `c.version` names.
pub(crate) fn encode(c: &Connect, out: &mut BytesMut) {
    let l = lens(c);
    let v5 = c.version.is_v5();
    let (name, level) = protocol(c.version);
    header::write(out, kind::CONNECT << 4, l.remaining);
    put_prefixed(out, name);
    out.put_slice(&[level, flags(c)]);
    out.put_u16(c.keep_alive);
    if v5 {
        properties::encode(&c.properties, PropKind::Connect, l.props, out);
    }
    put_prefixed(out, c.client_id.as_bytes());
    if let Some(w) = &c.will {
        if v5 {
            properties::encode(&w.properties, PropKind::Will, l.will_props, out);
        }
        put_prefixed(out, w.topic.as_bytes());
        put_prefixed(out, &w.payload);
    }
    if let Some(u) = &c.username {
        put_prefixed(out, u.as_bytes());
    }
    if let Some(p) = &c.password {
        put_prefixed(out, p);
    }
}
