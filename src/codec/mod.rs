//! The MQTT wire codec: a sans-IO encoder and decoder for MQTT 3.1, 3.1.1 and
//! 5.0 control packets.
//!
//! This module owns the byte-level protocol and nothing else: it turns bytes
//! into [`Packet`]s and back, and enforces every rule that can be checked on
//! one packet in isolation (fixed header flags, field lengths, UTF-8, the
//! properties allowed per packet kind, ...). Rules that need connection or
//! session state (topic wildcards, topic aliases, packet identifier reuse, a
//! second CONNECT) belong to the session. It is used on every shard and holds
//! no executor, socket or clock types: a caller appends received bytes to a
//! `BytesMut`, calls [`decode`] until it returns `Ok(None)`, and writes what
//! [`encode`] appended.
//!
//! Decoding is zero-copy for payloads: a packet is split off the input
//! buffer, frozen, and its payload, password, will payload, correlation and
//! authentication data are `Bytes` slices of it.
//!
//! Leniencies and choices, all deliberate:
//! * a CONNECT protocol name other than `MQTT` or `MQIsdp` is
//!   [`DecodeError::Protocol`]; a known name with an unknown level is
//!   [`DecodeError::UnsupportedProtocolVersion`];
//! * variable byte integers in non-minimal form are accepted;
//! * reason codes are not checked against the per-packet lists of 5.0,
//!   except 3.x CONNACK and SUBACK return codes;
//! * on `Err`, `buf` may have been advanced past the offending packet; the
//!   connection must be closed anyway.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};

mod auth;
mod connack;
mod connect;
mod disconnect;
mod error;
mod header;
mod packet;
mod ping;
mod primitives;
mod properties;
mod publish;
mod pubresp;
mod suback;
mod subscribe;
mod unsuback;
mod unsubscribe;

#[cfg(test)]
mod tests;

pub use connack::{reason_from_v3, reason_to_v3};
pub use error::DecodeError;
pub use packet::*;
pub use publish::PublishView;
pub(crate) use subscribe::{decode_options, encode_options};

use header::kind;

/// Largest packet MQTT can express: a 5-byte fixed header plus the largest
/// remaining length (268,435,455). A useful upper bound for `max_packet_size`.
pub const MAX_PACKET_SIZE: usize = 5 + primitives::MAX_VARIABLE_BYTE_INTEGER;

/// Decode one packet from the front of `buf`. Ok(None) = need more bytes (buf untouched).
/// `version` is the connection's version, used for every packet except CONNECT (which carries its own).
/// A packet whose total size (fixed header + remaining length) exceeds `max_packet_size` is refused
/// as soon as its fixed header is read, before its body is buffered: DecodeError::PacketTooLarge.
///
/// On success `buf` is advanced past the packet. Before the CONNECT has been
/// read the version is not known; pass [`Version::V5`] (the CONNECT itself
/// is decoded the same way whatever `version` says).
#[inline]
pub fn decode(
    buf: &mut BytesMut,
    version: Version,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    decode_with(buf, version, max_packet_size, None)
}

/// [`decode`] for a connection's stream of packets: a PUBLISH whose topic
/// is the same as the last new one (`last_topic`, which the caller keeps
/// between calls) shares its allocation.
#[inline]
pub fn decode_sharing(
    buf: &mut BytesMut,
    version: Version,
    max_packet_size: usize,
    last_topic: &mut Option<Arc<str>>,
) -> Result<Option<Packet>, DecodeError> {
    decode_with(buf, version, max_packet_size, Some(last_topic))
}

/// [`decode`], or [`decode_sharing`] when given the last topic.
#[inline]
fn decode_with(
    buf: &mut BytesMut,
    version: Version,
    max_packet_size: usize,
    last_topic: Option<&mut Option<Arc<str>>>,
) -> Result<Option<Packet>, DecodeError> {
    let Some(h) = header::parse(buf, version)? else {
        return Ok(None);
    };
    let size = h.len + h.remaining;
    if size > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size,
            max: max_packet_size,
        });
    }
    if buf.len() < size {
        return Ok(None);
    }
    let mut body = buf.split_to(size).freeze();
    body.advance(h.len);
    if h.byte0 >> 4 == kind::PUBLISH {
        // Built in place in the return value: a `Packet` is large.
        return publish::decode(h.byte0 & 0x0F, body, version, last_topic);
    }
    decode_body(h.byte0, body, version).map(Some)
}

/// Decodes the body of a packet other than PUBLISH whose fixed header (first
/// byte `byte0`) has been checked.
fn decode_body(byte0: u8, body: Bytes, version: Version) -> Result<Packet, DecodeError> {
    Ok(match byte0 >> 4 {
        kind::CONNECT => Packet::Connect(Box::new(connect::decode(&body)?)),
        kind::CONNACK => Packet::ConnAck(connack::decode(&body, version)?),
        kind::PUBACK => Packet::PubAck(pubresp::decode(&body, version)?),
        kind::PUBREC => Packet::PubRec(pubresp::decode(&body, version)?),
        kind::PUBREL => Packet::PubRel(pubresp::decode(&body, version)?),
        kind::PUBCOMP => Packet::PubComp(pubresp::decode(&body, version)?),
        kind::SUBSCRIBE => Packet::Subscribe(subscribe::decode(&body, version)?),
        kind::SUBACK => Packet::SubAck(suback::decode(&body, version)?),
        kind::UNSUBSCRIBE => Packet::Unsubscribe(unsubscribe::decode(&body, version)?),
        kind::UNSUBACK => Packet::UnsubAck(unsuback::decode(&body, version)?),
        kind::PINGREQ => ping::decode(&body).map(|()| Packet::PingReq)?,
        kind::PINGRESP => ping::decode(&body).map(|()| Packet::PingResp)?,
        kind::DISCONNECT => Packet::Disconnect(disconnect::decode(&body, version)?),
        kind::AUTH => Packet::Auth(auth::decode(&body)?),
        _ => {
            return Err(DecodeError::Malformed(
                "[MQTT-2.1.2] packet type 0 is reserved",
            ))
        }
    })
}

/// Append the encoding of `packet` for `version` to `out`.
///
/// MQTT 3.x packets are written without properties (the `properties` fields
/// are ignored) and 3.x CONNACK reason codes are mapped to return codes. A
/// CONNECT is written in the version its `version` field names (3.1 as
/// `MQIsdp`/3), whatever `version` says; AUTH always uses the 5.0 layout.
/// Properties that the packet kind does not allow are skipped.
///
/// # Panics
/// If a string or binary field is longer than 65,535 bytes or the packet's
/// remaining length exceeds 268,435,455 bytes (use [`encoded_len`] to check
/// a packet against a peer's maximum packet size first).
#[inline]
pub fn encode(packet: &Packet, version: Version, out: &mut BytesMut) {
    match packet {
        Packet::Publish(p) => publish::encode(p, version, out),
        Packet::Connect(c) => connect::encode(c, out),
        Packet::ConnAck(c) => connack::encode(c, version, out),
        Packet::PubAck(p) => pubresp::encode(kind::PUBACK << 4, p, version, out),
        Packet::PubRec(p) => pubresp::encode(kind::PUBREC << 4, p, version, out),
        Packet::PubRel(p) => pubresp::encode((kind::PUBREL << 4) | 0b0010, p, version, out),
        Packet::PubComp(p) => pubresp::encode(kind::PUBCOMP << 4, p, version, out),
        Packet::Subscribe(s) => subscribe::encode(s, version, out),
        Packet::SubAck(s) => suback::encode(s, version, out),
        Packet::Unsubscribe(u) => unsubscribe::encode(u, version, out),
        Packet::UnsubAck(u) => unsuback::encode(u, version, out),
        Packet::PingReq => ping::encode(kind::PINGREQ << 4, out),
        Packet::PingResp => ping::encode(kind::PINGRESP << 4, out),
        Packet::Disconnect(d) => disconnect::encode(d, version, out),
        Packet::Auth(a) => auth::encode(a, out),
    }
}

/// Append a PUBLISH given by borrowed parts (see [`PublishView`]): the
/// broker's per-delivery encoder. Decodes to the equivalent [`Publish`];
/// panics on the same oversize fields as [`encode`].
#[inline]
pub fn encode_publish(view: &PublishView, version: Version, out: &mut BytesMut) {
    publish::encode_view(view, version, out);
}

/// Exact number of bytes [`encode_publish`] would append.
#[inline]
pub fn publish_len(view: &PublishView, version: Version) -> usize {
    publish::view_len(view, version)
}

/// Exact number of bytes `encode` would append.
#[inline]
pub fn encoded_len(packet: &Packet, version: Version) -> usize {
    let remaining = match packet {
        Packet::Publish(p) => publish::remaining_len(p, version),
        Packet::Connect(c) => connect::remaining_len(c),
        Packet::ConnAck(c) => connack::remaining_len(c, version),
        Packet::PubAck(p) | Packet::PubRec(p) | Packet::PubRel(p) | Packet::PubComp(p) => {
            pubresp::remaining_len(p, version)
        }
        Packet::Subscribe(s) => subscribe::remaining_len(s, version),
        Packet::SubAck(s) => suback::remaining_len(s, version),
        Packet::Unsubscribe(u) => unsubscribe::remaining_len(u, version),
        Packet::UnsubAck(u) => unsuback::remaining_len(u, version),
        Packet::PingReq | Packet::PingResp => 0,
        Packet::Disconnect(d) => disconnect::remaining_len(d, version),
        Packet::Auth(a) => auth::remaining_len(a),
    };
    header::len(remaining) + remaining
}
