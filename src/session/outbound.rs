//! Server → client delivery: packet ids, the in-flight window, the bounded
//! queue, topic aliases and the client's Maximum Packet Size.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use crate::codec::{self, PubResp, QoS};
use crate::hash::HashSet;
use crate::message::Message;

use super::transmit::{AckKind, Delivered, Outgoing};
use super::{Conn, Delivery, OverflowPolicy, Session, SubIds};

/// Which acknowledgement an outbound QoS 1/2 message waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Awaiting {
    /// QoS 1 PUBLISH sent, waiting for PUBACK.
    Ack,
    /// QoS 2 PUBLISH sent, waiting for PUBREC.
    Rec,
    /// PUBREL sent, waiting for PUBCOMP.
    Comp,
}

impl Awaiting {
    /// What an in-flight delivery of `qos` waits for (`released`: past
    /// PUBREC).
    pub(super) fn of(qos: QoS, released: bool) -> Awaiting {
        match (qos, released) {
            (_, true) => Awaiting::Comp,
            (QoS::ExactlyOnce, false) => Awaiting::Rec,
            _ => Awaiting::Ack,
        }
    }
}

/// A message sent with a packet id and not yet acknowledged.
#[derive(Debug, Clone)]
pub(super) struct Inflight {
    pub(super) packet_id: u16,
    pub(super) message: Arc<Message>,
    pub(super) qos: QoS,
    pub(super) retain: bool,
    pub(super) subscription_ids: SubIds,
    /// Id in the shard's log, when stored.
    pub(super) stored: Option<u64>,
    pub(super) stage: Awaiting,
    /// Sent on the current connection. False for messages carried over a
    /// reconnect beyond the client's new Receive Maximum: they keep their
    /// packet id and go out (with DUP) as the window opens.
    pub(super) sent: bool,
}

impl Inflight {
    /// One in flight that a log or another node handed back (`sent`: on
    /// the connection to come, as a restored session's are counted).
    pub(super) fn restored(i: super::RestoredInflight, sent: bool) -> Inflight {
        Inflight {
            packet_id: i.packet_id,
            stage: Awaiting::of(i.delivery.qos, i.released),
            message: i.message,
            qos: i.delivery.qos,
            retain: i.delivery.retain,
            subscription_ids: i.delivery.subscription_ids,
            stored: i.delivery.stored,
            sent,
        }
    }
}

/// A message waiting for the window or for the client to come back.
#[derive(Debug, Clone)]
pub(super) struct Queued {
    /// `None` while paged out: the message waits in the shard's log under
    /// `delivery.stored` and is read back by [`Session::page_in`].
    pub(super) message: Option<Arc<Message>>,
    /// The message's `cost_bytes`, known while it is paged out.
    pub(super) cost: usize,
    /// Its [`Message::id`], known while it is paged out (a copy that
    /// comes to the session by another path is skipped by it).
    pub(super) id: u64,
    pub(super) delivery: Delivery,
}

/// What one queued message costs in memory besides the message itself
/// while it is paged out: its queue entry and the shard's index of its
/// record (measured: about 316 bytes per message with 100,000 queued).
/// Charged per message against `queue_log_bytes_max`, so a queue of tiny
/// messages cannot hold more in memory than its bound says.
pub const QUEUE_ENTRY_INDEX_BYTES: usize = 320;

/// Stored deliveries read back from the log per [`Session::page_in`] call,
/// so a long queue comes back over several loop turns.
pub const PAGE_IN_BATCH_MAX: usize = 256;

/// Outbound state that survives reconnects.
#[derive(Debug, Default)]
pub(super) struct Outbound {
    /// In send order; acknowledgements usually arrive in that order too.
    pub(super) inflight: VecDeque<Inflight>,
    /// Resident entries first, then the `paged` ones (a suffix).
    pub(super) queue: VecDeque<Queued>,
    /// Sum of `cost` over `queue`.
    pub(super) queue_bytes: usize,
    /// Entries at the end of `queue` whose message is paged out.
    pub(super) paged: usize,
    /// Sum of `cost` over them.
    pub(super) paged_bytes: usize,
    /// In-flight messages not sent on the current connection.
    pub(super) unsent: usize,
    /// Last packet id handed out.
    pub(super) last_packet_id: u16,
}

impl Outbound {
    /// A free packet id: the next after the last one, skipping ids in flight.
    fn allocate_packet_id(&mut self) -> u16 {
        loop {
            self.last_packet_id = self.last_packet_id.wrapping_add(1).max(1);
            let id = self.last_packet_id;
            if !self.inflight.iter().any(|m| m.packet_id == id) {
                return id;
            }
        }
    }

    /// A packet id free here and not among `taken`; None when every id is
    /// in use.
    pub(super) fn free_packet_id(&mut self, taken: &HashSet<u16>) -> Option<u16> {
        if self.inflight.len() + taken.len() >= usize::from(u16::MAX) {
            return None;
        }
        for _ in 0..u16::MAX {
            let id = self.allocate_packet_id();
            if !taken.contains(&id) {
                return Some(id);
            }
        }
        None
    }

    /// Forget in-flight message `i` (acknowledged, refused or dropped);
    /// returns its stored id.
    pub(super) fn remove_inflight(&mut self, i: usize) -> Option<u64> {
        let m = self.inflight.remove(i)?;
        if !m.sent {
            self.unsent -= 1;
        }
        m.stored
    }

    pub(super) fn position(&self, packet_id: u16) -> Option<usize> {
        self.inflight.iter().position(|m| m.packet_id == packet_id)
    }

    /// Entries whose message is in memory.
    fn resident_len(&self) -> usize {
        self.queue.len() - self.paged
    }

    fn resident_bytes(&self) -> usize {
        self.queue_bytes - self.paged_bytes
    }

    fn pop_queue(&mut self) -> Option<Queued> {
        let q = self.queue.pop_front()?;
        self.queue_bytes -= q.cost;
        if q.message.is_none() {
            self.paged -= 1;
            self.paged_bytes -= q.cost;
        }
        Some(q)
    }

    /// Append an entry, in memory or (no message) paged out.
    pub(super) fn push_queue(
        &mut self,
        message: Option<Arc<Message>>,
        (cost, id): (usize, u64),
        delivery: Delivery,
    ) {
        debug_assert!(message.is_some() || delivery.stored.is_some());
        debug_assert!(message.is_none() || self.paged == 0, "paged is a suffix");
        self.queue_bytes += cost;
        if message.is_none() {
            self.paged += 1;
            self.paged_bytes += cost;
        }
        self.queue.push_back(Queued {
            message,
            cost,
            id,
            delivery,
        });
    }

    /// Page out the stored entries beyond the in-memory limits (a session
    /// restored from the log). An entry that is not stored stays resident,
    /// and so does everything before it.
    pub(super) fn page_out_beyond(&mut self, messages_max: usize, bytes_max: usize) {
        let mut bytes = 0;
        let mut cut = self.queue.len();
        for (i, q) in self.queue.iter().enumerate() {
            bytes += q.cost;
            if i >= messages_max || bytes > bytes_max {
                cut = i;
                break;
            }
        }
        if let Some(last) = self.queue.iter().rposition(|q| q.delivery.stored.is_none()) {
            cut = cut.max(last + 1);
        }
        for q in self.queue.iter_mut().skip(cut) {
            if q.message.take().is_some() {
                self.paged += 1;
                self.paged_bytes += q.cost;
            }
        }
    }

    pub(super) fn check_invariants(&self) {
        let sum: usize = self.queue.iter().map(|q| q.cost).sum();
        assert_eq!(sum, self.queue_bytes, "queue bytes must equal their sum");
        let resident = self.resident_len();
        for (i, q) in self.queue.iter().enumerate() {
            match &q.message {
                Some(m) => {
                    assert!(i < resident, "paged entries are a suffix");
                    assert_eq!(q.cost, m.cost_bytes(), "a resident entry's cost");
                }
                None => {
                    assert!(i >= resident, "paged entries are a suffix");
                    assert!(q.delivery.stored.is_some(), "only stored ones page out");
                }
            }
        }
        let paged: usize = self.queue.iter().skip(resident).map(|q| q.cost).sum();
        assert_eq!(paged, self.paged_bytes, "paged bytes must equal their sum");
        let unsent = self.inflight.iter().filter(|m| !m.sent).count();
        assert_eq!(unsent, self.unsent, "unsent count must match the window");
        for (i, m) in self.inflight.iter().enumerate() {
            assert_ne!(m.packet_id, 0);
            assert!(
                self.inflight
                    .iter()
                    .skip(i + 1)
                    .all(|o| o.packet_id != m.packet_id),
                "in-flight packet ids must be unique"
            );
        }
    }
}

impl Session {
    /// Hand the session a message the router matched to its subscriptions.
    /// While retained messages are being gathered for a new subscription,
    /// live messages wait behind them, as many as the queue limit; past
    /// that, the held ones and every later one go to the queue at once (in
    /// their order, behind the retained messages queued so far) rather
    /// than be dropped: an acknowledged message is worth more than the
    /// retained ones coming first.
    pub fn deliver(&mut self, now: Instant, message: &Arc<Message>, delivery: Delivery) {
        if self.moved_here(message) || self.had_before_move(message, delivery.qos.min(message.qos))
        {
            self.done(delivery.stored);
            return;
        }
        // While a move into the session is on, the nodes route to it by
        // what they last knew of it: one that still had this node's route
        // for a copy of the session since gone sends some of an origin's
        // messages here, and the rest where the session was. What comes
        // now is late (`Message::late`).
        let late;
        let message = match self.queue_waits.1 > 0 {
            true => {
                late = super::moving::late(message);
                &late
            }
            false => message,
        };
        if self.gathers_pending > 0 && !self.ended && !self.held_released {
            if self.held.len() < self.limits.queue_messages_max {
                self.held.push_back((message.clone(), delivery));
                return;
            }
            self.held_released = true;
            self.release_held(now);
        }
        self.deliver_now(now, message, delivery);
    }

    /// The held live deliveries go to the queue, in order.
    fn release_held(&mut self, now: Instant) {
        for (m, d) in std::mem::take(&mut self.held) {
            self.deliver_now(now, &m, d);
        }
    }

    /// Retained messages the session takes now: room left in memory for
    /// its queue and the live messages held meanwhile (when its deliveries
    /// page out, `pages_out`: a chunk more while the log budget is below
    /// half), at most
    /// `chunk_max`, and never more than the packets waiting for the socket
    /// leave room for (QoS 0 deliveries bypass the queue and are dropped
    /// past that backlog: a burst of retained ones must not be). While
    /// offline it takes a whole chunk (what does not fit is dropped and
    /// counted, as any delivery would be).
    pub fn retained_credit(&self, chunk_max: usize, pages_out: bool) -> usize {
        let max = self.limits.queue_messages_max;
        if !self.is_connected() {
            return chunk_max;
        }
        if self.transmit.publish_bytes() >= self.limits.queue_bytes_max {
            return 0;
        }
        let transmit_room = max.saturating_sub(self.transmit.len());
        let used = self.out.resident_len() + self.held.len();
        let room = max.saturating_sub(used);
        let log = self.limits.queue_log_bytes_max;
        let log_room = if pages_out && log > 0 && self.out.queue_bytes < log / 2 {
            chunk_max
        } else {
            0
        };
        room.max(log_room).min(chunk_max).min(transmit_room)
    }

    /// A retained-message gather for a new subscription has started on
    /// another shard; live deliveries wait until it ends.
    pub fn begin_retained_gather(&mut self) {
        self.gathers_pending += 1;
    }

    /// Deliver a retained message for a new subscription (ahead of the
    /// live ones held meanwhile).
    pub fn deliver_retained(&mut self, now: Instant, message: &Arc<Message>, delivery: Delivery) {
        self.deliver_now(now, message, delivery);
    }

    /// One gather ended; when none is left, release the held deliveries.
    pub fn end_retained_gather(&mut self, now: Instant) {
        debug_assert!(self.gathers_pending > 0);
        self.gathers_pending = self.gathers_pending.saturating_sub(1);
        if self.gathers_pending == 0 {
            self.held_released = false;
            self.release_held(now);
        }
    }

    pub(super) fn deliver_now(&mut self, now: Instant, message: &Arc<Message>, delivery: Delivery) {
        if self.ended {
            return;
        }
        // Noted here, not while held: a held copy may be dropped as one the
        // other node has (a move that did not happen). A retained one for a
        // new subscription says nothing of its origin's live messages.
        let qos = delivery.qos.min(message.qos);
        if !delivery.retain {
            self.note_seen(message, qos);
        }
        if message.is_expired(now) {
            self.counters().dropped_expired += 1;
            self.done(delivery.stored);
            return;
        }
        let delivery = Delivery { qos, ..delivery };
        if !self.is_connected() {
            if qos == QoS::AtMostOnce && !self.limits.queue_qos0_offline {
                self.counters().dropped_offline_qos0 += 1;
                self.done(delivery.stored);
                return;
            }
            self.enqueue(now, message, delivery);
            return;
        }
        if qos == QoS::AtMostOnce {
            // QoS 0 bypasses the queue: a client that does not read must
            // not make the transmit queue grow without bound.
            if self.transmit_backlog_full() {
                client_log!(
                    self,
                    now,
                    log::Level::Warn,
                    "not reading fast enough ({} packets, {} bytes waiting to be written; \
                     bounds {} and {}: mqtt.queue_messages_max and queue_bytes_max, twice them \
                     while it holds its publishers): dropping a QoS 0 message \
                     (counted in shardmq_messages_dropped_total)",
                    self.transmit.len(),
                    self.transmit.publish_bytes(),
                    self.queue_bounds().0,
                    self.queue_bounds().1,
                );
                self.counters().dropped_queue_full += 1;
                self.done(delivery.stored);
                return;
            }
            self.send_publish(now, message, &delivery, 0, false);
            self.done(delivery.stored);
        } else if self.out.queue.is_empty() && self.window_open() && !self.queue_waits() {
            self.start_inflight(now, message.clone(), delivery);
        } else {
            self.enqueue(now, message, delivery);
        }
    }

    /// Room for one more QoS 1/2 PUBLISH under the client's Receive
    /// Maximum (counting what was sent on this connection).
    fn window_open(&self) -> bool {
        self.conn()
            .is_some_and(|c| self.out.inflight.len() - self.out.unsent < usize::from(c.window))
    }

    /// Queue a delivery behind the others. In memory while the queue's
    /// resident part is within `queue_messages_max` / `queue_bytes_max`
    /// and nothing is paged out; beyond that a stored delivery pages out to
    /// the log, while the whole queue stays within `queue_log_bytes_max`.
    /// Otherwise the overflow policy decides what is dropped.
    fn enqueue(&mut self, now: Instant, message: &Arc<Message>, delivery: Delivery) {
        let cost = message.cost_bytes();
        let limits = self.limits.clone();
        let pageable = delivery.stored.is_some() && limits.queue_log_bytes_max > 0;
        let (len_max, bytes_max) = self.queue_bounds();
        let resident_fits = |o: &Outbound| {
            o.paged == 0 && o.resident_len() < len_max && o.resident_bytes() + cost <= bytes_max
        };
        let log_fits = |o: &Outbound| {
            let entries = (o.queue.len() + 1) * QUEUE_ENTRY_INDEX_BYTES;
            pageable && o.queue_bytes + cost + entries <= limits.queue_log_bytes_max
        };
        let fits = |o: &Outbound| resident_fits(o) || log_fits(o);
        if !fits(&self.out) {
            let stored = if delivery.stored.is_some() {
                ", stored"
            } else {
                ""
            };
            client_log!(
                self,
                now,
                log::Level::Warn,
                "queue full ({} messages, {} bytes, {} of them in the log; \
                 {len_max} messages and {bytes_max} bytes in memory: mqtt.queue_messages_max \
                 and queue_bytes_max, twice them while it holds its publishers; \
                 storage.session_queue_bytes_max {}): dropping a QoS {} message{stored} \
                 (counted in shardmq_messages_dropped_total)",
                self.out.queue.len(),
                self.out.queue_bytes,
                self.out.paged,
                limits.queue_log_bytes_max,
                delivery.qos as u8,
            );
            // A message that cannot be paged out never waits behind ones
            // that are: dropping older ones would not make room for it.
            let policy = if self.out.paged > 0 && !pageable {
                OverflowPolicy::DropNew
            } else {
                limits.overflow
            };
            match policy {
                OverflowPolicy::DropNew => {
                    self.counters().dropped_queue_full += 1;
                    self.done(delivery.stored);
                    return;
                }
                OverflowPolicy::DropOldest => {
                    while !fits(&self.out) {
                        let Some(old) = self.out.pop_queue() else {
                            break;
                        };
                        self.counters().dropped_queue_full += 1;
                        self.done(old.delivery.stored);
                    }
                    if !fits(&self.out) {
                        self.counters().dropped_queue_full += 1;
                        self.done(delivery.stored);
                        return;
                    }
                }
            }
        }
        if resident_fits(&self.out) {
            self.out
                .push_queue(Some(message.clone()), (cost, message.id), delivery);
        } else {
            self.out.push_queue(None, (cost, message.id), delivery);
        }
    }

    /// Whether this session's client falls behind its publishers, which
    /// then wait (`shard::pressure`): connected, with half of
    /// `queue_messages_max` or `queue_bytes_max` or more waiting to be
    /// written or in the queue's memory part; once `pressing`, until both
    /// are below a quarter. An offline session never presses (its
    /// messages wait in the log, or are dropped as the queue's limits
    /// say), nor does the queue of a persistent session with a log (past
    /// its memory part, it pages out to the log instead of dropping).
    pub fn presses(&self, pressing: bool) -> bool {
        if !self.is_connected() {
            return false;
        }
        let pages = self.limits.queue_log_bytes_max > 0 && self.expiry_s > 0;
        let (queued, queued_bytes) = match pages {
            true => (0, 0),
            false => (self.out.resident_len(), self.out.resident_bytes()),
        };
        let len = self.transmit.len() + queued;
        let bytes = self.transmit.publish_bytes() + queued_bytes;
        let part = if pressing { 4 } else { 2 };
        len * part >= self.limits.queue_messages_max || bytes * part >= self.limits.queue_bytes_max
    }

    /// True when paged-out deliveries should be read back now: a
    /// connection is attached and the resident part of the queue has
    /// drained to half its limits (or is empty).
    pub fn wants_page_in(&self) -> bool {
        let o = &self.out;
        o.paged > 0
            && self.is_connected()
            && (o.resident_len() == 0
                || (o.resident_len() * 2 <= self.limits.queue_messages_max
                    && o.resident_bytes() * 2 <= self.limits.queue_bytes_max))
    }

    /// Read back paged-out deliveries (at most [`PAGE_IN_BATCH_MAX`], and
    /// as many as the in-memory limits allow) with `load`, which fetches a
    /// stored message from the shard's log, then send what the window
    /// takes. A message that cannot be read back is lost: counted, logged
    /// and journaled as done. Returns how many were read back.
    pub fn page_in(
        &mut self,
        now: Instant,
        mut load: impl FnMut(u64) -> Result<Arc<Message>, String>,
    ) -> usize {
        let mut loaded = 0;
        for _ in 0..PAGE_IN_BATCH_MAX {
            if self.out.paged == 0 {
                break;
            }
            let i = self.out.resident_len();
            let cost = self.out.queue[i].cost;
            let room = i == 0
                || (i < self.limits.queue_messages_max
                    && self.out.resident_bytes() + cost <= self.limits.queue_bytes_max);
            if !room {
                break;
            }
            let stored = self.out.queue[i].delivery.stored;
            let got = match stored {
                Some(id) => load(id),
                None => Err("no stored id".to_string()),
            };
            self.out.paged -= 1;
            self.out.paged_bytes -= cost;
            match got {
                Ok(m) => {
                    let q = &mut self.out.queue[i];
                    q.cost = m.cost_bytes();
                    q.message = Some(m);
                    self.out.queue_bytes = self.out.queue_bytes - cost + q.cost;
                    loaded += 1;
                }
                Err(why) => {
                    self.out.queue.remove(i);
                    self.out.queue_bytes -= cost;
                    self.counters().lost_unreadable += 1;
                    self.done(stored);
                    client_log!(
                        self,
                        now,
                        log::Level::Error,
                        "a queued message (log id {}) could not be read back from the \
                         log and is lost: {why}",
                        stored.unwrap_or(0),
                    );
                }
            }
        }
        if loaded > 0 {
            self.pump(now);
        }
        loaded
    }

    /// Move queued messages into the window while it has room: first the
    /// in-flight ones a reconnect left unsent, then the queue (unless it
    /// waits: `queue_waits`).
    pub(super) fn pump(&mut self, now: Instant) {
        while self.out.unsent > 0 && self.window_open() {
            let i = self
                .out
                .inflight
                .iter()
                .position(|m| !m.sent)
                .expect("unsent counts entries");
            self.out.unsent -= 1;
            if !self.resend(now, i) {
                let gone = self.out.inflight.remove(i).expect("index is in range");
                self.done(gone.stored);
            }
        }
        while self.is_connected() && !self.queue_waits() {
            let Some(front) = self.out.queue.front() else {
                return;
            };
            if front.message.is_none() {
                // Paged out: the shard reads it back (`page_in`).
                return;
            }
            if front.delivery.qos != QoS::AtMostOnce && !self.window_open() {
                return;
            }
            let q = self.out.pop_queue().expect("front exists");
            let Some(message) = q.message else {
                unreachable!("checked resident above")
            };
            if message.is_expired(now) {
                self.counters().dropped_expired += 1;
                self.done(q.delivery.stored);
                continue;
            }
            // Queued before this connection's ACL was known (a session
            // restored from the log) or under an earlier user's.
            if !self.may_read(&message.topic) {
                self.counters().denied_delivery += 1;
                self.done(q.delivery.stored);
                continue;
            }
            if q.delivery.qos == QoS::AtMostOnce {
                self.send_publish(now, &message, &q.delivery, 0, false);
                self.done(q.delivery.stored);
            } else {
                self.start_inflight(now, message, q.delivery);
            }
        }
    }

    fn start_inflight(&mut self, now: Instant, message: Arc<Message>, delivery: Delivery) {
        let packet_id = self.out.allocate_packet_id();
        if !self.send_publish(now, &message, &delivery, packet_id, false) {
            self.done(delivery.stored);
            return;
        }
        if let Some(id) = delivery.stored {
            self.journal
                .push_back(super::Journal::Sent { id, packet_id });
        }
        let stage = if delivery.qos == QoS::AtLeastOnce {
            Awaiting::Ack
        } else {
            Awaiting::Rec
        };
        self.out.inflight.push_back(Inflight {
            packet_id,
            message,
            qos: delivery.qos,
            retain: delivery.retain,
            subscription_ids: delivery.subscription_ids,
            stored: delivery.stored,
            stage,
            sent: true,
        });
    }

    /// Queue one PUBLISH. False when it was dropped because it is larger
    /// than the client accepts ([MQTT-3.1.2-25]: treated as delivered).
    fn send_publish(
        &mut self,
        now: Instant,
        message: &Arc<Message>,
        delivery: &Delivery,
        packet_id: u16,
        dup: bool,
    ) -> bool {
        let super::Presence::Connected(conn) = &mut self.presence else {
            unreachable!("send_publish needs a connection")
        };
        let v5 = conn.version.is_v5();
        let mut d = Delivered {
            message: message.clone(),
            qos: delivery.qos,
            retain: delivery.retain,
            dup,
            packet_id,
            v5,
            topic_alias: None,
            elide_topic: false,
            message_expiry_interval: if v5 {
                message.remaining_expiry_s(now)
            } else {
                None
            },
            subscription_ids: if v5 {
                delivery.subscription_ids.clone()
            } else {
                SubIds::new()
            },
        };
        let len = codec::publish_len(&d.view(), conn.version);
        if len > conn.max_packet_out as usize {
            self.counters().dropped_too_large += 1;
            return false;
        }
        // A new alias adds a 3-byte property: assign one only if it fits.
        let alias_bytes_max = self.limits.topic_alias_out_bytes_max;
        if conn.apply_alias(
            &mut d,
            len + 3 <= conn.max_packet_out as usize,
            alias_bytes_max,
        ) {
            self.counters().alias_bytes_full += 1;
        }
        if !dup {
            let q = delivery.qos as usize;
            let mut counters = self.counters();
            counters.sent[q] += 1;
            counters.sent_bytes[q] += message.payload.len() as u64;
        }
        self.transmit.push(Outgoing::Publish(d));
        true
    }

    /// Resend what is in flight after a reconnect, with the original packet
    /// ids ([MQTT-4.4.0-1]): PUBLISH with DUP for unacknowledged messages,
    /// PUBREL for those past PUBREC. Only as many as the client's new
    /// Receive Maximum allows go now; the rest as acks open the window.
    pub(super) fn redeliver(&mut self, now: Instant) {
        for m in &mut self.out.inflight {
            m.sent = false;
        }
        self.out.unsent = self.out.inflight.len();
        self.pump(now);
    }

    /// Send in-flight message `i` again. False when it no longer fits the
    /// client's Maximum Packet Size (then it counts as delivered).
    fn resend(&mut self, now: Instant, i: usize) -> bool {
        let m = &mut self.out.inflight[i];
        m.sent = true;
        if m.stage == Awaiting::Comp {
            let id = m.packet_id;
            self.transmit.push(Outgoing::Ack(AckKind::Rel, id, 0));
            return true;
        }
        let delivery = Delivery {
            qos: m.qos,
            retain: m.retain,
            subscription_ids: m.subscription_ids.clone(),
            stored: m.stored,
        };
        let (message, id) = (m.message.clone(), m.packet_id);
        self.send_publish(now, &message, &delivery, id, true)
    }

    /// PUBACK from the client.
    pub(super) fn on_puback(&mut self, now: Instant, ack: &PubResp) {
        match self.out.position(ack.packet_id) {
            Some(i) if self.out.inflight[i].stage == Awaiting::Ack => {
                let stored = self.out.remove_inflight(i);
                self.done(stored);
                self.pump(now);
            }
            _ => client_log!(
                self,
                now,
                log::Level::Debug,
                "PUBACK for unknown packet id {}",
                ack.packet_id
            ),
        }
    }

    /// PUBREC from the client: answer PUBREL, or drop the message when the
    /// client refused it with an error reason.
    pub(super) fn on_pubrec(&mut self, now: Instant, rec: &PubResp) {
        let reason = match self.out.position(rec.packet_id) {
            Some(i) if rec.reason >= 0x80 => {
                let stored = self.out.remove_inflight(i);
                self.done(stored);
                self.pump(now);
                return;
            }
            Some(i) => {
                let m = &mut self.out.inflight[i];
                let first = m.stage != Awaiting::Comp;
                m.stage = Awaiting::Comp;
                if !std::mem::replace(&mut m.sent, true) {
                    self.out.unsent -= 1;
                }
                if let Some(id) = m.stored.filter(|_| first) {
                    self.journal.push_back(super::Journal::Released { id });
                }
                0
            }
            None => codec::reason::PACKET_IDENTIFIER_NOT_FOUND,
        };
        let reason = self.reason_for_version(reason);
        self.transmit
            .push(Outgoing::Ack(AckKind::Rel, rec.packet_id, reason));
    }

    /// PUBCOMP from the client.
    pub(super) fn on_pubcomp(&mut self, now: Instant, comp: &PubResp) {
        match self.out.position(comp.packet_id) {
            Some(i) if self.out.inflight[i].stage == Awaiting::Comp => {
                let stored = self.out.remove_inflight(i);
                self.done(stored);
                self.pump(now);
            }
            _ => client_log!(
                self,
                now,
                log::Level::Debug,
                "PUBCOMP for unknown packet id {}",
                comp.packet_id
            ),
        }
    }

    /// Reason codes exist only in 5.0; 3.x acknowledgements carry none.
    pub(super) fn reason_for_version(&self, reason: u8) -> u8 {
        if self.version().is_some_and(|v| v.is_v5()) {
            reason
        } else {
            0
        }
    }
}

impl Conn {
    /// Replace the topic by an alias when the client allows aliases: the
    /// first PUBLISH on a topic carries topic and new alias, later ones an
    /// empty topic and the alias. When every alias is taken, or the map
    /// holds `bytes_max` of topics, the topic is sent in full; true when the
    /// byte bound was what stopped it.
    fn apply_alias(&mut self, d: &mut Delivered, room_for_new: bool, bytes_max: usize) -> bool {
        if self.alias_out_max == 0 {
            return false;
        }
        let (set, (count, held)) = match self.aliases.as_deref() {
            Some(a) => (
                a.out.get(&d.message.topic).copied(),
                (a.out.len(), a.out_bytes),
            ),
            None => (None, (0, 0)),
        };
        if let Some(alias) = set {
            d.topic_alias = Some(alias);
            d.elide_topic = true;
            return false;
        }
        let next = count + 1;
        if !room_for_new || next > usize::from(self.alias_out_max) {
            return false;
        }
        let bytes = held + d.message.topic.len();
        if bytes > bytes_max {
            return true;
        }
        let alias = next as u16;
        // Made by the first alias assigned.
        let aliases = self.aliases.get_or_insert_with(Box::default);
        aliases.out.insert(d.message.topic.clone(), alias);
        aliases.out_bytes = bytes;
        d.topic_alias = Some(alias);
        false
    }
}
