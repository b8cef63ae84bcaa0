//! Packets waiting to be written, kept compact.
//!
//! A delivery references the shared message (`Arc<Message>`) plus the few
//! fields that differ per subscriber, instead of a ~400-byte [`Packet`]
//! holding clones of the topic, payload handle and properties: fan-out to N
//! subscribers costs N small entries, and the writer encodes each straight
//! into its buffer with [`codec::encode_publish`].

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::BytesMut;

use crate::codec::{
    self, BoxedProperties, Packet, Properties, PubResp, Publish, PublishView, QoS, Version,
};
use crate::message::Message;
use crate::text;

use super::SubIds;

/// The four acknowledgements, which carry a packet id and a reason only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AckKind {
    /// PUBACK.
    Ack,
    /// PUBREC.
    Rec,
    /// PUBREL.
    Rel,
    /// PUBCOMP.
    Comp,
}

/// One delivery of a shared message to this session.
#[derive(Debug, Clone)]
pub(super) struct Delivered {
    pub(super) message: Arc<Message>,
    pub(super) qos: QoS,
    pub(super) retain: bool,
    pub(super) dup: bool,
    pub(super) packet_id: u16,
    /// 5.0 only: the connection's version decides what is written.
    pub(super) v5: bool,
    pub(super) topic_alias: Option<u16>,
    /// The alias is established: send an empty topic.
    pub(super) elide_topic: bool,
    pub(super) message_expiry_interval: Option<u32>,
    pub(super) subscription_ids: SubIds,
}

impl Delivered {
    pub(super) fn view(&self) -> PublishView<'_> {
        let m = &self.message;
        PublishView {
            dup: self.dup,
            qos: self.qos,
            retain: self.retain,
            topic: if self.elide_topic { "" } else { &m.topic },
            packet_id: self.packet_id,
            payload: &m.payload,
            properties: self.v5.then_some(&m.properties),
            message_expiry_interval: self.message_expiry_interval.filter(|_| self.v5),
            topic_alias: self.topic_alias.filter(|_| self.v5),
            subscription_identifiers: if self.v5 { &self.subscription_ids } else { &[] },
        }
    }

    fn to_publish(&self) -> Publish {
        let v = self.view();
        let mut properties = v.properties.cloned().unwrap_or_default();
        properties.message_expiry_interval = v.message_expiry_interval;
        properties.topic_alias = v.topic_alias;
        properties.subscription_identifiers = v.subscription_identifiers.iter().copied().collect();
        Publish {
            dup: self.dup,
            qos: self.qos,
            retain: self.retain,
            topic: if self.elide_topic {
                Arc::from("")
            } else {
                self.message.topic.clone()
            },
            packet_id: self.packet_id,
            payload: self.message.payload.clone(),
            properties: properties.into(),
        }
    }
}

/// Packets waiting for the socket, in order, with the bytes of the
/// deliveries among them (for the session's byte limit).
#[derive(Debug, Default)]
pub(super) struct TransmitQueue {
    items: VecDeque<Outgoing>,
    publish_bytes: usize,
}

impl TransmitQueue {
    /// The packets waiting, to change in place (a CONNACK's flag).
    pub(super) fn items_mut(&mut self) -> impl Iterator<Item = &mut Outgoing> {
        self.items.iter_mut()
    }

    /// A CONNACK still waiting becomes a refusal with `reason`, and
    /// nothing after it goes; false when none waits.
    pub(super) fn refuse_connack(&mut self, reason: u8) -> bool {
        let at = self
            .items
            .iter()
            .position(|o| matches!(o, Outgoing::Other(p) if matches!(**p, Packet::ConnAck(_))));
        let Some(at) = at else {
            return false;
        };
        self.items.truncate(at + 1);
        self.items.drain(..at);
        self.publish_bytes = 0;
        if let Some(Outgoing::Other(p)) = self.items.front_mut() {
            **p = Packet::ConnAck(codec::ConnAck {
                session_present: false,
                reason,
                properties: BoxedProperties::default(),
            });
        }
        true
    }

    pub(super) fn push(&mut self, o: Outgoing) {
        if let Outgoing::Publish(d) = &o {
            self.publish_bytes += d.message.cost_bytes();
        }
        self.items.push_back(o);
    }

    pub(super) fn pop(&mut self) -> Option<Outgoing> {
        let o = self.items.pop_front()?;
        if let Outgoing::Publish(d) = &o {
            self.publish_bytes -= d.message.cost_bytes();
        }
        Some(o)
    }

    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Topic and payload bytes of the deliveries waiting.
    pub(super) fn publish_bytes(&self) -> usize {
        self.publish_bytes
    }
}

/// A packet waiting in a session's transmit queue.
#[derive(Debug)]
pub(super) enum Outgoing {
    /// A delivery.
    Publish(Delivered),
    /// PUBACK, PUBREC, PUBREL or PUBCOMP without properties.
    Ack(AckKind, u16, u8),
    /// Anything else (CONNACK, SUBACK, PINGRESP, DISCONNECT, ...).
    Other(Box<Packet>),
}

impl Outgoing {
    /// The same packet as a [`Packet`] (for tests and closing connections).
    pub(super) fn into_packet(self) -> Packet {
        match self {
            Outgoing::Publish(d) => Packet::Publish(d.to_publish()),
            Outgoing::Ack(kind, packet_id, reason) => {
                let r = PubResp {
                    packet_id,
                    reason,
                    properties: BoxedProperties::default(),
                };
                match kind {
                    AckKind::Ack => Packet::PubAck(r),
                    AckKind::Rec => Packet::PubRec(r),
                    AckKind::Rel => Packet::PubRel(r),
                    AckKind::Comp => Packet::PubComp(r),
                }
            }
            Outgoing::Other(p) => *p,
        }
    }

    /// Append the encoding for `version` to `out`.
    pub(super) fn encode(&self, version: Version, out: &mut BytesMut) {
        match self {
            Outgoing::Publish(d) => codec::encode_publish(&d.view(), version, out),
            Outgoing::Ack(kind, packet_id, reason) => {
                encode_ack(*kind, *packet_id, *reason, version, out)
            }
            Outgoing::Other(p) => codec::encode(p, version, out),
        }
    }
}

/// The short forms of the acknowledgements: 3.x and 5.0 success are the
/// packet id alone; a 5.0 failure adds the reason byte.
fn encode_ack(kind: AckKind, packet_id: u16, reason: u8, version: Version, out: &mut BytesMut) {
    let byte0 = match kind {
        AckKind::Ack => 0x40,
        AckKind::Rec => 0x50,
        AckKind::Rel => 0x62,
        AckKind::Comp => 0x70,
    };
    let id = packet_id.to_be_bytes();
    if reason == 0 || !version.is_v5() {
        out.extend_from_slice(&[byte0, 2, id[0], id[1]]);
    } else {
        out.extend_from_slice(&[byte0, 3, id[0], id[1], reason]);
    }
}

impl super::Session {
    /// Queue a packet other than a delivery or an ack. A reason string is
    /// cut to [`text::REASON_STRING_BYTES_MAX`]. A 5.0 client's Maximum
    /// Packet Size holds for every packet ([MQTT-3.1.2-24]): the reason
    /// string and user properties go first when it would not fit
    /// ([MQTT-3.1.2-25]).
    pub(super) fn push_packet(&mut self, mut packet: Packet) {
        if let Some(p) = packet_properties(&mut packet) {
            if let Some(r) = &mut p.reason_string {
                r.truncate(text::cut(r, text::REASON_STRING_BYTES_MAX).len());
            }
        }
        if let Some(conn) = self.conn() {
            let max = conn.max_packet_out as usize;
            if codec::encoded_len(&packet, conn.version) > max {
                if let Some(p) = packet_properties(&mut packet) {
                    p.reason_string = None;
                    p.user_properties.clear();
                }
            }
        }
        self.transmit.push(Outgoing::Other(Box::new(packet)));
    }
}

/// The properties of the packets a server sends with a reason string,
/// when it has any.
fn packet_properties(packet: &mut Packet) -> Option<&mut Properties> {
    match packet {
        Packet::ConnAck(p) => p.properties.get_mut(),
        Packet::SubAck(p) => p.properties.get_mut(),
        Packet::UnsubAck(p) => p.properties.get_mut(),
        Packet::Disconnect(p) => p.properties.get_mut(),
        Packet::Auth(p) => p.properties.get_mut(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_acks_match_the_codec() {
        for v in [Version::V3_1_1, Version::V5] {
            for (kind, reason) in [(AckKind::Ack, 0), (AckKind::Rel, 0), (AckKind::Rec, 0x99)] {
                let o = Outgoing::Ack(kind, 513, reason);
                let mut fast = BytesMut::new();
                o.encode(v, &mut fast);
                let mut slow = BytesMut::new();
                let mut p = o.into_packet();
                if !v.is_v5() {
                    if let Packet::PubRec(r) = &mut p {
                        r.reason = 0;
                    }
                }
                codec::encode(&p, v, &mut slow);
                assert_eq!(fast, slow, "{kind:?} {v:?}");
            }
        }
    }
}
