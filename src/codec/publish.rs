//! PUBLISH (packet type 3): the hot path.
//!
//! Decoding a QoS 0 PUBLISH without properties allocates at most once (the
//! topic's `Arc<str>`, none when it is the connection's last topic); the
//! payload is the tail of the frozen packet, not a copy.
//! Encoding reserves once and writes with `put_slice`. Topic wildcards and an
//! empty topic (5.0 topic alias) are left to the session.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::header::{self, kind};
use super::primitives::{field_len, Reader, MAX_FIELD_LEN};
use super::properties::{self, PropKind};
use super::{BoxedProperties, DecodeError, Packet, Properties, Publish, QoS, Version};

const DUP: u8 = 0x08;
const RETAIN: u8 = 0x01;

/// Decodes a PUBLISH from its fixed header flags and body. Returns the
/// `decode` result directly so that the large `Packet` is built in place.
#[inline]
pub(crate) fn decode(
    flags: u8,
    mut body: Bytes,
    version: Version,
    last_topic: Option<&mut Option<Arc<str>>>,
) -> Result<Option<Packet>, DecodeError> {
    let qos = QoS::from_u8((flags >> 1) & 0x03)
        .ok_or(DecodeError::Malformed("[MQTT-3.3.1-4] PUBLISH QoS is 3"))?;
    let dup = flags & DUP != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::Malformed(
            "[MQTT-3.3.1-2] DUP flag set on a QoS 0 PUBLISH",
        ));
    }
    let mut r = Reader::new(&body);
    let topic = match last_topic {
        Some(last) => r.topic_as(last)?,
        None => r.topic()?,
    };
    let mut packet_id = 0;
    if qos != QoS::AtMostOnce {
        packet_id = r.u16()?;
        if packet_id == 0 {
            return Err(DecodeError::Protocol(
                "[MQTT-2.2.1-3] PUBLISH with QoS > 0 has packet identifier 0",
            ));
        }
    }
    // Built (344 bytes) only for 5.0, boxed only when any is set.
    let properties = if version.is_v5() {
        properties::decode_boxed(&mut r, PropKind::Publish)?
    } else {
        BoxedProperties::default()
    };
    let consumed = r.position();
    body.advance(consumed);
    Ok(Some(Packet::Publish(Publish {
        dup,
        qos,
        retain: flags & RETAIN != 0,
        topic,
        packet_id,
        payload: body,
        properties,
    })))
}

/// Remaining length of the encoding of `p`.
#[inline]
pub(crate) fn remaining_len(p: &Publish, version: Version) -> usize {
    PublishView::of(p).lens(version).0
}

/// Appends PUBLISH. The DUP flag is written only for QoS > 0
/// (`[MQTT-3.3.1-2]`).
#[inline]
pub(crate) fn encode(p: &Publish, version: Version, out: &mut BytesMut) {
    encode_view(&PublishView::of(p), version, out);
}

/// A PUBLISH described by borrowed parts: how the broker sends one shared
/// message to many subscribers without building a [`Publish`] (and cloning
/// its topic, payload handle and properties) per delivery.
#[derive(Debug, Clone, Copy)]
pub struct PublishView<'a> {
    /// DUP flag (written only for QoS > 0).
    pub dup: bool,
    /// QoS of this delivery.
    pub qos: QoS,
    /// RETAIN flag of this delivery.
    pub retain: bool,
    /// Topic name; empty when an established topic alias replaces it.
    pub topic: &'a str,
    /// Packet identifier; ignored for QoS 0.
    pub packet_id: u16,
    /// Application payload.
    pub payload: &'a [u8],
    /// The message's 5.0 properties. A message expiry, topic alias or
    /// subscription identifiers given in the fields below must not be here
    /// too.
    pub properties: Option<&'a Properties>,
    /// Remaining Message Expiry Interval.
    pub message_expiry_interval: Option<u32>,
    /// Topic alias of this delivery.
    pub topic_alias: Option<u16>,
    /// Identifiers of the subscriptions this delivery matched.
    pub subscription_identifiers: &'a [u32],
}

impl<'a> PublishView<'a> {
    /// The view of a whole [`Publish`]: its own properties, nothing added.
    fn of(p: &'a Publish) -> PublishView<'a> {
        PublishView {
            dup: p.dup,
            qos: p.qos,
            retain: p.retain,
            topic: &p.topic,
            packet_id: p.packet_id,
            payload: &p.payload,
            properties: Some(&p.properties),
            message_expiry_interval: None,
            topic_alias: None,
            subscription_identifiers: &[],
        }
    }

    fn extra(&self) -> properties::PublishExtra<'_> {
        properties::PublishExtra {
            message_expiry_interval: self.message_expiry_interval,
            topic_alias: self.topic_alias,
            subscription_identifiers: self.subscription_identifiers,
        }
    }

    /// (remaining length, base property length, extra property length).
    #[inline]
    fn lens(&self, version: Version) -> (usize, usize, usize) {
        let mut remaining = field_len(self.topic.len()) + self.payload.len();
        if self.qos != QoS::AtMostOnce {
            remaining += 2;
        }
        let (mut base, mut extra) = (0, 0);
        if version.is_v5() {
            if let Some(p) = self.properties {
                debug_assert!(
                    (self.message_expiry_interval.is_none() || p.message_expiry_interval.is_none())
                        && (self.topic_alias.is_none() || p.topic_alias.is_none())
                        && (self.subscription_identifiers.is_empty()
                            || p.subscription_identifiers.is_empty()),
                    "a per-delivery property is given twice"
                );
                base = properties::len(p, PropKind::Publish);
            }
            extra = properties::extra_len(&self.extra());
            remaining += properties::prefixed_len(base + extra);
        }
        (remaining, base, extra)
    }
}

/// Exact encoded size of a [`PublishView`] (fixed header included).
#[inline]
pub(crate) fn view_len(v: &PublishView, version: Version) -> usize {
    let remaining = v.lens(version).0;
    header::len(remaining) + remaining
}

/// Appends the PUBLISH a [`PublishView`] describes. It decodes to the
/// equivalent [`Publish`] (the per-delivery properties come last).
#[inline]
pub(crate) fn encode_view(v: &PublishView, version: Version, out: &mut BytesMut) {
    let (remaining, base, extra) = v.lens(version);
    let mut byte0 = (kind::PUBLISH << 4) | ((v.qos as u8) << 1);
    if v.dup && v.qos != QoS::AtMostOnce {
        byte0 |= DUP;
    }
    if v.retain {
        byte0 |= RETAIN;
    }
    let topic = v.topic.as_bytes();
    assert!(
        topic.len() <= MAX_FIELD_LEN,
        "topic of {} bytes exceeds 65535",
        topic.len()
    );
    header::write_with_u16(out, byte0, remaining, topic.len() as u16);
    out.put_slice(topic);
    if v.qos != QoS::AtMostOnce {
        out.put_u16(v.packet_id);
    }
    if version.is_v5() {
        properties::encode_publish_view(v.properties, base, &v.extra(), extra, out);
    }
    out.put_slice(v.payload);
}
