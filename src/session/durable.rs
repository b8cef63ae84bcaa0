//! A session's durable state: what the shard writes to its log when it
//! rewrites the session whole, and how a session is rebuilt from it after a
//! restart.
//!
//! Still sans-IO: plain values in, plain values out. The shard turns them
//! into log records (`persist`) and back.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use crate::hash::HashSet;

use crate::codec::{QoS, Will};
use crate::message::{ClientId, Message};

use super::outbound::{Awaiting, Inflight, Outbound};
use super::{Delivery, Session, SessionLimits, SubIds, Subscription};

/// The parts of a session that outlive a restart, except its messages.
#[derive(Debug, Clone, PartialEq)]
pub struct DurableState {
    /// Session Expiry Interval in force, seconds.
    pub expiry_s: u32,
    /// When the last connection ended; None while connected.
    pub offline_since: Option<Instant>,
    /// Subscriptions by full filter.
    pub subscriptions: Vec<(String, Subscription)>,
    /// Inbound QoS 2 packet ids not yet released.
    pub qos2_in: Vec<u16>,
    /// The connection's will (connected) or the pending will (offline).
    pub will: Option<Will>,
    /// Offline: when the pending will is due.
    pub will_due: Option<Instant>,
}

/// How long a session lives and what it leaves behind: what changes when a
/// connection attaches or ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Lifetime {
    /// Session Expiry Interval in force, seconds.
    pub expiry_s: u32,
    /// When the last connection ended; None while connected.
    pub offline_since: Option<Instant>,
    /// The connection's will (connected) or the pending will (offline).
    pub will: Option<Will>,
    /// Offline: when the pending will is due.
    pub will_due: Option<Instant>,
}

/// One stored delivery the session holds, and how far it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDelivery {
    /// Stored message id.
    pub id: u64,
    /// Delivery QoS.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Subscription identifiers.
    pub subscription_ids: SubIds,
    /// Packet id, once sent.
    pub packet_id: Option<u16>,
    /// QoS 2 past PUBREC.
    pub released: bool,
}

/// A delivery sent before a restart and not yet acknowledged.
#[derive(Debug, Clone)]
pub struct RestoredInflight {
    /// The message.
    pub message: Arc<Message>,
    /// How it is delivered (its `stored` id included).
    pub delivery: Delivery,
    /// The packet id it was sent with.
    pub packet_id: u16,
    /// QoS 2 past PUBREC: PUBREL is resent instead of the PUBLISH.
    pub released: bool,
}

/// Everything needed to rebuild an offline session after a restart.
#[derive(Debug, Clone)]
pub struct Restored {
    /// Session Expiry Interval, seconds.
    pub expiry_s: u32,
    /// When its connection ended (a crash counts as the end).
    pub offline_since: Instant,
    /// Subscriptions by full filter.
    pub subscriptions: Vec<(String, Subscription)>,
    /// Inbound QoS 2 packet ids not yet released.
    pub qos2_in: Vec<u16>,
    /// A will waiting for its delay, and when it is due.
    pub pending_will: Option<(Will, Instant)>,
    /// Deliveries in flight, in send order.
    pub inflight: Vec<RestoredInflight>,
    /// Deliveries queued, in order.
    pub queue: Vec<(Arc<Message>, Delivery)>,
}

impl Session {
    /// The durable parts of this session now.
    pub fn durable_state(&self) -> DurableState {
        let Lifetime {
            expiry_s,
            offline_since,
            will,
            will_due,
        } = self.lifetime();
        let mut qos2_in: Vec<u16> = self.inbound_qos2.iter().copied().collect();
        qos2_in.sort_unstable();
        DurableState {
            expiry_s,
            offline_since,
            subscriptions: self
                .subscriptions
                .iter()
                .map(|(f, s)| (f.clone(), s.clone()))
                .collect(),
            qos2_in,
            will,
            will_due,
        }
    }

    /// Its expiry, connection state and will.
    pub fn lifetime(&self) -> Lifetime {
        let (will, will_due) = match (self.conn(), self.pending_will()) {
            (Some(c), _) => (c.will.as_deref().cloned(), None),
            (None, Some(p)) => (Some(p.0.clone()), Some(p.1)),
            (None, None) => (None, None),
        };
        Lifetime {
            expiry_s: self.expiry_s,
            offline_since: self.offline_since(),
            will,
            will_due,
        }
    }

    /// Every stored delivery the session holds (in flight, queued, held
    /// behind a retained gather), with how far it got.
    pub fn stored_deliveries(&self, mut f: impl FnMut(StoredDelivery)) {
        for m in &self.out.inflight {
            if let Some(id) = m.stored {
                f(StoredDelivery {
                    id,
                    qos: m.qos,
                    retain: m.retain,
                    subscription_ids: m.subscription_ids.clone(),
                    packet_id: Some(m.packet_id),
                    released: m.stage == Awaiting::Comp,
                });
            }
        }
        let queued = self.out.queue.iter().map(|q| &q.delivery);
        let held = self.held.iter().map(|(_, d)| d);
        for d in queued.chain(held) {
            if let Some(id) = d.stored {
                f(StoredDelivery {
                    id,
                    qos: d.qos,
                    retain: d.retain,
                    subscription_ids: d.subscription_ids.clone(),
                    packet_id: None,
                    released: false,
                });
            }
        }
    }

    /// Rebuild an offline session from what the log held.
    pub fn restore(client_id: ClientId, limits: Rc<SessionLimits>, r: Restored) -> Session {
        let mut out = Outbound::default();
        // A damaged log may hold packet id 0 or one id twice: such a
        // delivery is queued again instead of being kept in flight.
        let mut ids = HashSet::default();
        let mut requeue = Vec::new();
        for i in r.inflight {
            if i.packet_id == 0 || !ids.insert(i.packet_id) {
                requeue.push((i.message, i.delivery));
                continue;
            }
            out.inflight.push_back(Inflight::restored(i, true));
        }
        out.last_packet_id = out.inflight.iter().map(|m| m.packet_id).max().unwrap_or(0);
        for (message, delivery) in requeue.into_iter().chain(r.queue) {
            out.push_queue(
                Some(message.clone()),
                (message.cost_bytes(), message.id),
                delivery,
            );
        }
        // What the memory limits do not hold stays in the log until the
        // client is back to take it.
        if limits.queue_log_bytes_max > 0 {
            out.page_out_beyond(limits.queue_messages_max, limits.queue_bytes_max);
        }
        let mut session = Session::new(client_id, limits, r.offline_since);
        session.expiry_s = r.expiry_s;
        session.presence = super::Presence::Offline {
            since: r.offline_since,
            pending_will: r.pending_will.map(Box::new),
        };
        session.subscriptions = r.subscriptions.into_iter().collect();
        session.out = out;
        session.inbound_qos2 = r.qos2_in.into_iter().collect();
        // Kept even beyond a Receive Maximum lowered since they were logged:
        // each is an exactly-once promise.
        session.inbound_qos2_max = session
            .inbound_qos2
            .len()
            .max(usize::from(session.limits.receive_maximum));
        session
    }
}
