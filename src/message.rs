//! The routed message: what one PUBLISH (or will) becomes once accepted.
//!
//! A `Message` is immutable and shared by `Arc` between every subscriber on
//! every shard, so a fan-out to N sessions never copies the payload or topic.
//! It is the one type that crosses shards on the publish path.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::codec::{BoxedProperties, Properties, Publish, QoS, Topic, Will};

/// Client identifier, shared between a session, its messages and the maps
/// that index it.
pub type ClientId = Arc<str>;

/// An accepted application message, ready to be routed.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Topic name (aliases already resolved).
    pub topic: Topic,
    /// Payload, shared with every delivery.
    pub payload: Bytes,
    /// QoS the publisher used; a delivery gets min(this, granted).
    pub qos: QoS,
    /// RETAIN flag as published.
    pub retain: bool,
    /// Properties forwarded to subscribers: payload format, content type,
    /// response topic, correlation data, user properties. Never a topic
    /// alias, subscription identifier or expiry (those are per delivery).
    pub properties: BoxedProperties,
    /// When the message expires (5.0 Message Expiry Interval), if ever.
    pub expires_at: Option<Instant>,
    /// The publishing client, for No Local. `None` for broker-made messages.
    pub publisher: Option<ClientId>,
    /// Its number in the cluster (0: none): given where a node accepts it
    /// and carried to the other nodes with it, so that a session moving
    /// between nodes takes each message once even when both nodes had it
    /// (`shard::moves`). The high 32 bits name its origin (one run of one
    /// shard, hashed), the low 32 count up there: two messages of one
    /// origin compare in the order they were accepted. Not kept in the
    /// log.
    pub id: u64,
    /// It reached its session out of its origin's order, or may have: its
    /// frame was sent again on a link that came up after the message was
    /// routed (a broken link's replay), it came while a move into the
    /// session was on, or with such a move (in each case its node may have
    /// routed it by a route to an older copy of the session, and its
    /// origin's next messages elsewhere). The session does not count it as
    /// a sign of what came before it from its origin (`Session::note_seen`).
    /// Not kept in the log; a move does not carry it (the marks do).
    pub late: bool,
}

/// Payloads up to this size are copied out of the connection's read buffer
/// when a message is accepted. A decoded payload is a slice of that buffer,
/// and a small retained or queued message would otherwise keep the whole
/// read chunk (kilobytes) alive for as long as it lives. Larger payloads
/// mostly fill their chunk and stay zero-copy.
pub const PAYLOAD_COPY_MAX_BYTES: usize = 16 << 10;

/// Make a payload and its properties keep no read buffer alive (see
/// [`PAYLOAD_COPY_MAX_BYTES`]): decoded `Bytes` are slices of the buffer the
/// packet was read into.
pub fn own_buffers(payload: &mut Bytes, properties: Option<&mut Properties>) {
    if payload.len() <= PAYLOAD_COPY_MAX_BYTES {
        *payload = Bytes::copy_from_slice(payload);
    }
    if let Some(c) = properties.and_then(|p| p.correlation_data.as_mut()) {
        *c = Bytes::copy_from_slice(c);
    }
}

impl Message {
    /// A message the broker publishes itself (`$SYS`, the admin API): no
    /// properties, no expiry, no publishing client.
    pub fn from_broker(topic: &str, payload: Bytes, qos: QoS, retain: bool) -> Message {
        Message {
            topic: topic.into(),
            payload,
            qos,
            retain,
            properties: Default::default(),
            expires_at: None,
            publisher: None,
            id: 0,
            late: false,
        }
    }

    /// A QoS 0 retained message of `topic` with no properties (tests).
    #[cfg(test)]
    pub(crate) fn retained_for_test(topic: &str, payload: &'static [u8]) -> Message {
        Message::from_broker(topic, Bytes::from_static(payload), QoS::AtMostOnce, true)
    }

    /// Turn an inbound PUBLISH (topic already resolved) into a routed message.
    pub fn from_publish(publish: Publish, now: Instant, publisher: Option<ClientId>) -> Message {
        let mut payload = publish.payload;
        let mut properties = publish.properties;
        own_buffers(&mut payload, properties.get_mut());
        let expires_at = strip_per_delivery(&mut properties)
            .map(|s| now + std::time::Duration::from_secs(u64::from(s)));
        Message {
            topic: publish.topic,
            payload,
            qos: publish.qos,
            retain: publish.retain,
            properties,
            expires_at,
            publisher,
            id: 0,
            late: false,
        }
    }

    /// The message a will becomes when it is published at `now`.
    pub fn from_will(will: Will, now: Instant) -> Message {
        let mut properties = will.properties;
        properties.will_delay_interval = None;
        let expires_at = properties
            .message_expiry_interval
            .take()
            .map(|s| now + std::time::Duration::from_secs(u64::from(s)));
        Message {
            topic: will.topic,
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            properties: properties.into(),
            expires_at,
            publisher: None,
            id: 0,
            late: false,
        }
    }

    /// The message as a 5.0 PUBLISH (packet id 1, no per-delivery
    /// properties): how the log stores it and the bridge carries it.
    pub fn publish_view(&self) -> crate::codec::PublishView<'_> {
        crate::codec::PublishView {
            dup: false,
            qos: self.qos,
            retain: self.retain,
            topic: &self.topic,
            packet_id: 1,
            payload: &self.payload,
            properties: Some(&self.properties),
            message_expiry_interval: None,
            topic_alias: None,
            subscription_identifiers: &[],
        }
    }

    /// True once the message's expiry interval has passed.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// Whole seconds left before expiry, rounded up (the interval sent on
    /// forward), or `None` when the message never expires.
    pub fn remaining_expiry_s(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|t| {
            let left = t.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            u32::try_from(secs).unwrap_or(u32::MAX)
        })
    }

    /// Bytes this message costs wherever it is held (a session's queue,
    /// the retained store, delayed publishes), for their byte limits: topic,
    /// payload and the properties it carries.
    pub fn cost_bytes(&self) -> usize {
        let p = &self.properties;
        let len = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        self.topic.len()
            + self.payload.len()
            + len(&p.content_type)
            + len(&p.response_topic)
            + p.correlation_data.as_ref().map_or(0, Bytes::len)
            + user_properties_bytes(p)
    }
}

/// Take out the properties each delivery sets for itself (topic alias,
/// subscription identifiers, message expiry), so a message never carries
/// them; returns the Message Expiry Interval it had.
pub fn strip_per_delivery(properties: &mut BoxedProperties) -> Option<u32> {
    let p = properties.get_mut()?;
    p.topic_alias = None;
    p.subscription_identifiers.clear();
    let expiry = p.message_expiry_interval.take();
    properties.shrink();
    expiry
}

/// Bytes of the user properties in `p`: every name and value.
pub fn user_properties_bytes(p: &Properties) -> usize {
    p.user_properties
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_without_properties_boxes_none_and_stays_small() {
        let p = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "t".into(),
            packet_id: 1,
            payload: Bytes::from_static(b"x"),
            properties: Properties {
                message_expiry_interval: Some(5),
                ..Properties::default()
            }
            .into(),
        };
        let m = Message::from_publish(p.clone(), Instant::now(), None);
        // The expiry is per delivery: nothing is left to box.
        assert_eq!(m.properties, BoxedProperties::default());
        assert!(m.properties.is_empty());
        // Two cache lines: topic, payload and the rest, not the 344 bytes
        // of an inline `Properties`.
        assert!(std::mem::size_of::<Message>() <= 128);

        let mut with = p;
        with.properties.content_type = Some("text/plain".into());
        let m = Message::from_publish(with, Instant::now(), None);
        assert_eq!(m.properties.content_type.as_deref(), Some("text/plain"));
        assert_eq!(m.properties.message_expiry_interval, None);
        let mut props = m.properties.clone();
        props.content_type = None;
        assert!(props.is_empty());
        // Equal by what they hold, boxed or not.
        assert_eq!(props, BoxedProperties::default());
        assert_eq!(props.into_properties(), Properties::default());

        // Written to and emptied again: still equal to none.
        let mut emptied = BoxedProperties::from(Properties {
            payload_format_indicator: Some(1),
            ..Properties::default()
        });
        assert_ne!(emptied, BoxedProperties::default());
        emptied.payload_format_indicator = None;
        assert_eq!(emptied, BoxedProperties::default());
    }
}
