//! What the simulators' clients share: the answers they send and the
//! topic matching they check deliveries against (independent of the
//! broker's own matcher).

use std::collections::{BTreeMap, HashSet};

use bytes::BytesMut;
use shardmq::codec::{self, Packet, Properties, PubResp, Publish, QoS, SubOptions, Version};

/// The broker's output `out` after what `inbuf` kept of the last: every
/// whole packet in it (the rest stays in `inbuf`); output the client
/// cannot decode fails the run.
pub fn packets(inbuf: &mut BytesMut, out: &[u8], version: Version) -> Vec<Packet> {
    inbuf.extend_from_slice(out);
    let mut packets = Vec::new();
    while let Some(p) =
        codec::decode(inbuf, version, 1 << 24).unwrap_or_else(|e| panic!("undecodable output: {e}"))
    {
        packets.push(p);
    }
    packets
}

/// A message a publisher sent at QoS 1/2 and holds until acknowledged.
pub trait Sent: Clone {
    /// QoS 2: PUBREC came; PUBREL goes next.
    fn released(&mut self) -> &mut bool;
}

/// PUBREC of `pid` from the broker with `reason`, for `outgoing`: the
/// message it acknowledges now (refused: taken out of `outgoing`; taken:
/// marked released, the first time only), and whether PUBREL goes next
/// (not after a refusal, nor for a packet id not held).
pub fn pubrec<T: Sent>(outgoing: &mut BTreeMap<u16, T>, pid: u16, reason: u8) -> (Option<T>, bool) {
    let Some(o) = outgoing.get_mut(&pid) else {
        return (None, false);
    };
    if reason >= 0x80 {
        return (outgoing.remove(&pid), false);
    }
    if *o.released() {
        return (None, true);
    }
    *o.released() = true;
    (Some(o.clone()), true)
}

/// A client's side of the messages it receives: QoS 2 packet ids it has
/// answered with PUBREC and not yet seen released.
#[derive(Debug, Default)]
pub struct Inbound {
    awaiting_rel: HashSet<u16>,
}

impl Inbound {
    /// The answer to PUBLISH `p` (PUBACK, PUBREC, none at QoS 0), and
    /// whether the message is new here (a QoS 2 packet id not yet
    /// released is the same message again).
    pub fn publish(&mut self, p: &Publish) -> (Option<Packet>, bool) {
        match p.qos {
            QoS::AtMostOnce => (None, true),
            QoS::AtLeastOnce => (Some(Packet::PubAck(resp(p.packet_id))), true),
            QoS::ExactlyOnce => {
                let fresh = self.awaiting_rel.insert(p.packet_id);
                (Some(Packet::PubRec(resp(p.packet_id))), fresh)
            }
        }
    }

    /// PUBREL of `packet_id`: released; the PUBCOMP to send.
    pub fn release(&mut self, packet_id: u16) -> Packet {
        self.awaiting_rel.remove(&packet_id);
        Packet::PubComp(resp(packet_id))
    }

    /// A new session: nothing awaits release.
    pub fn clear(&mut self) {
        self.awaiting_rel.clear();
    }
}

/// A PUBACK, PUBREC, PUBREL or PUBCOMP of `packet_id`, reason 0.
pub fn resp(packet_id: u16) -> PubResp {
    PubResp {
        packet_id,
        reason: 0,
        properties: Properties::default().into(),
    }
}

/// Plain subscription options at `qos`.
#[allow(dead_code)] // not every simulator subscribes this way
pub fn sub_options(qos: QoS) -> SubOptions {
    SubOptions {
        qos,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
    }
}

/// Whether `filter` (a shared one by its filter part) matches `topic`; a
/// wildcard first level does not match a `$` topic.
pub fn matches(filter: &str, topic: &str) -> bool {
    let filter = match filter.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/').map_or(rest, |(_, f)| f),
        None => filter,
    };
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    let mut first = true;
    loop {
        match (f.next(), t.next()) {
            (Some("#" | "+"), _) if first && topic.starts_with('$') => return false,
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}
