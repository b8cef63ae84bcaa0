//! Packets waiting to be written, kept compact.
//!
//! A delivery references the shared message (`Arc<Message>`) plus the few
//! fields that differ per subscriber, instead of a ~400-byte [`Packet`]
//! holding clones of the topic, payload handle and properties: fan-out to N
//! subscribers costs N small entries, and the writer encodes each straight
//! into its buffer with [`codec::encode_publish`].

use std::sync::Arc;

use bytes::BytesMut;

use crate::codec::{self, Packet, Properties, PubResp, Publish, PublishView, QoS, Version};
use crate::message::Message;

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
            properties,
        }
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
                    properties: Properties::default(),
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

impl From<Packet> for Outgoing {
    fn from(p: Packet) -> Outgoing {
        Outgoing::Other(Box::new(p))
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
