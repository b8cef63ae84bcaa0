//! A session moving between cluster nodes: what the node it leaves hands
//! over, and how the node it reaches takes it in (the protocol is
//! `shard::moves`).
//!
//! Still sans-IO: plain values in and out.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use crate::cluster::frame::OriginMark;
use crate::codec::{reason, Packet, QoS};
use crate::hash::{HashMap, HashSet};
use crate::message::Message;

use super::outbound::{Awaiting, Inflight};
use super::transmit::Outgoing;
use super::{Delivery, Journal, RestoredInflight, Session, Subscription};

/// One delivery a moving session holds: the message (None while paged out
/// to the log: the shard reads it back), how it is delivered, and, in
/// flight, its packet id (0: queued) and whether it is past PUBREC.
#[derive(Debug, Clone)]
pub struct Leaving {
    /// The message, when in memory.
    pub message: Option<Arc<Message>>,
    /// How it is delivered (`stored`: its id in this shard's log).
    pub delivery: Delivery,
    /// In flight: its packet id; 0 when queued.
    pub packet_id: u16,
    /// QoS 2 past PUBREC.
    pub released: bool,
}

impl Session {
    /// Every delivery the session holds, in the order the client gets
    /// them: in flight, queued, held behind a retained gather.
    pub fn leaving(&self) -> Vec<Leaving> {
        let inflight = self.out.inflight.iter().map(|m| Leaving {
            message: Some(m.message.clone()),
            delivery: Delivery {
                qos: m.qos,
                retain: m.retain,
                subscription_ids: m.subscription_ids.clone(),
                stored: m.stored,
            },
            packet_id: m.packet_id,
            released: m.stage == Awaiting::Comp,
        });
        let queued = self.out.queue.iter().map(|q| Leaving {
            message: q.message.clone(),
            delivery: q.delivery.clone(),
            packet_id: 0,
            released: false,
        });
        let held = self.held.iter().map(|(m, d)| Leaving {
            message: Some(m.clone()),
            delivery: d.clone(),
            packet_id: 0,
            released: false,
        });
        inflight.chain(queued).chain(held).collect()
    }

    /// The session is coming here from another node: live deliveries wait
    /// (as behind a retained gather) until [`Session::end_move_in`], so
    /// that what the other node held goes first.
    pub fn begin_move_in(&mut self) {
        self.begin_retained_gather();
        self.queue_waits.1 += 1;
        // What it had before: a QoS 2 delivery that comes with the move
        // and that this copy went through already is not taken again.
        self.begin_merge();
    }

    /// Another copy of this session is about to be merged in: a QoS 2
    /// delivery it brings that this copy went through already (within
    /// what reached it, through a subscription it has) is not taken again
    /// ([`Session::take_deliveries`]). True when this call marked it (a
    /// move in marks it for its whole length); [`Session::end_merge`]
    /// then clears it.
    pub fn begin_merge(&mut self) -> bool {
        if self.pre_move.is_some() {
            return false;
        }
        let filters = (self.subscriptions.keys())
            .filter(|f| !f.starts_with("$share/"))
            .take(MARKED_FILTERS_MAX)
            .cloned()
            .collect();
        let (marks, singles) = match self.seen.as_deref() {
            Some(seen) => (seen.ranges.clone(), seen.singles.iter().copied().collect()),
            None => Default::default(),
        };
        self.pre_move = Some(Box::new(MovedMarks {
            marks,
            filters,
            singles,
        }));
        true
    }

    /// The merge [`Session::begin_merge`] marked is done.
    pub fn end_merge(&mut self) {
        self.pre_move = None;
    }

    /// Take a subscription the session had on the node it comes from,
    /// unless it has one to that filter here already (the client's own,
    /// newer) or is at `subscriptions_max`. True when taken.
    pub fn take_subscription(&mut self, filter: &str, sub: Subscription) -> bool {
        if self.subscriptions.contains_key(filter)
            || self.subscriptions.len() >= self.limits.subscriptions_max
        {
            return false;
        }
        // Under this node's ACL for its user, as the client's own SUBSCRIBE.
        let inner = crate::router::split_shared(filter).1;
        if self
            .acl
            .as_ref()
            .is_some_and(|a| !a.allows_subscribe(inner))
        {
            self.counters().denied_subscribe += 1;
            return false;
        }
        self.subscriptions.insert(filter.to_string(), sub);
        true
    }

    /// The live deliveries held during a move that did not happen and
    /// that no subscription the session still has matches, taken out:
    /// they came through the subscriptions taken from the move, and the
    /// session on the other node has them. One that a subscription of
    /// its own matches stays (that node may not have it).
    pub fn take_held_unmatched(&mut self) -> Vec<(Arc<Message>, Delivery)> {
        let subscriptions = &self.subscriptions;
        let matched = |m: &Message| {
            subscriptions
                .keys()
                .any(|f| crate::router::topic::matches(crate::router::split_shared(f).1, &m.topic))
        };
        let mut gone = Vec::new();
        for (m, d) in std::mem::take(&mut self.held) {
            match matched(&m) {
                true => self.held.push_back((m, d)),
                false => gone.push((m, d)),
            }
        }
        gone
    }

    /// Drop a subscription taken from a move that did not happen; true
    /// when it was there.
    pub fn drop_subscription(&mut self, filter: &str) -> bool {
        self.subscriptions.remove(filter).is_some()
    }

    /// Take deliveries the session held on the node it comes from, in
    /// their order: those in flight behind the ones in flight here, the
    /// queued ones merged with what is queued here ([`Self::merge_queued`]).
    /// One in flight keeps its packet id and is sent again with DUP, unless
    /// the id is in use here: then it takes a free one in its place (queued
    /// when none is free), or is dropped past PUBREC (the client has it;
    /// only the PUBREL was left).
    pub fn take_deliveries(
        &mut self,
        now: Instant,
        inflight: Vec<RestoredInflight>,
        queued: Vec<(Arc<Message>, Delivery)>,
    ) {
        // A message the session has queued or in flight already (both
        // nodes had it) is not taken twice. (One held meanwhile gives way
        // to the copy taken here, which keeps its place: `end_move_in`.)
        let mut had: HashSet<u64> = self.out.inflight.iter().map(|m| m.message.id).collect();
        had.extend(self.out.queue.iter().map(|q| q.id));
        had.remove(&0);
        // Nor, at QoS 2, one within what had reached this copy from its
        // origin, through a subscription it had, when the move began:
        // two copies of the session met (a move given up, or a partition),
        // and this one went through it already (at QoS 1 a duplicate is
        // allowed, a loss is not). Nor one this node's ACL does not let its
        // user read.
        let pre = self.pre_move.take();
        // What the other copy held says nothing of what came between (it
        // went through some, and some may have reached it late): its marks
        // say that ([`Session::take_marks`]). Here each is a single.
        let mut inflight = inflight;
        let mut queued = queued;
        for i in &mut inflight {
            i.message = late(&i.message);
            self.note_seen(&i.message, i.delivery.qos.min(i.message.qos));
        }
        for (m, d) in &mut queued {
            *m = late(m);
            self.note_seen(m, d.qos.min(m.qos));
        }
        inflight.retain(|i| self.keep_moved(&had, pre.as_deref(), &i.message, &i.delivery));
        queued.retain(|(m, d)| self.keep_moved(&had, pre.as_deref(), m, d));
        self.pre_move = pre;
        // One whose packet id is in use here takes a free one in its place
        // (its order holds), or is queued when none is free; one past
        // PUBREC has reached the client already.
        let brought: HashSet<u16> = inflight.iter().map(|i| i.packet_id).collect();
        let mut requeue = Vec::new();
        for mut i in inflight {
            let in_use = i.packet_id == 0 || self.out.position(i.packet_id).is_some();
            if in_use && i.released {
                self.done(i.delivery.stored);
                continue;
            }
            if in_use {
                match self.out.free_packet_id(&brought) {
                    Some(id) => i.packet_id = id,
                    None => {
                        requeue.push((i.message, i.delivery));
                        continue;
                    }
                }
            }
            if let Some(id) = i.delivery.stored {
                let packet_id = i.packet_id;
                self.journal.push_back(Journal::Sent { id, packet_id });
                if i.released {
                    self.journal.push_back(Journal::Released { id });
                }
            }
            self.out.inflight.push_back(Inflight::restored(i, false));
            self.out.unsent += 1;
        }
        // Those in flight go again first: a queued delivery may go out at
        // once.
        if self.is_connected() {
            self.pump(now);
        }
        let mut taken = requeue;
        taken.extend(queued);
        self.merge_queued(now, taken);
    }

    /// Whether a delivery that came with a move is taken (see
    /// `take_deliveries`); one that is not is journaled done.
    fn keep_moved(
        &mut self,
        had: &HashSet<u64>,
        pre: Option<&MovedMarks>,
        m: &Message,
        d: &Delivery,
    ) -> bool {
        let went = d.qos.min(m.qos) == QoS::ExactlyOnce && pre.is_some_and(|p| p.had(m));
        if had.contains(&m.id) || went {
            self.done(d.stored);
            return false;
        }
        if !self.may_read(&m.topic) {
            self.counters().denied_delivery += 1;
            self.done(d.stored);
            return false;
        }
        true
    }

    /// Queue `items` (each in order) with what the session has queued, in
    /// each origin's order ([`order_by_origin`]): the two came by
    /// different paths (the other node's session and this one, or the
    /// messages held here meanwhile), and either may hold a publisher's
    /// earlier messages. A queue with a part paged out to the log takes
    /// them behind it instead.
    fn merge_queued(&mut self, now: Instant, mut items: Vec<(Arc<Message>, Delivery)>) {
        // Part of the queue waits in the log: what comes goes behind it
        // (merging would put it ahead of the paged part).
        if self.out.paged > 0 {
            for (message, delivery) in items {
                self.deliver_now(now, &message, delivery);
            }
            return;
        }
        let local = std::mem::take(&mut self.out.queue);
        self.out.queue_bytes = 0;
        self.out.paged = 0;
        self.out.paged_bytes = 0;
        items.extend(
            local
                .into_iter()
                .filter_map(|q| Some((q.message?, q.delivery))),
        );
        order_by_origin(&mut items);
        for (message, delivery) in items {
            self.deliver_now(now, &message, delivery);
        }
    }

    /// Take the inbound QoS 2 packet ids not yet released on the node the
    /// session comes from (each an exactly-once promise: kept even beyond
    /// the Receive Maximum).
    pub fn take_qos2_in(&mut self, ids: &[u16]) {
        self.inbound_qos2.extend(ids.iter().copied());
        self.inbound_qos2_max = self.inbound_qos2_max.max(self.inbound_qos2.len());
    }

    /// The CONNACK still waiting to be written becomes a refusal (Server
    /// unavailable: a node that may hold the client's session did not
    /// answer in time), and the connection closes after it, its will not
    /// taken (the CONNECT was not accepted). False when the CONNACK went
    /// already.
    pub fn refuse_connect(&mut self, now: Instant) -> bool {
        if self.conn().is_none() || !self.transmit.refuse_connack(reason::SERVER_UNAVAILABLE) {
            return false;
        }
        self.detach(now, false);
        true
    }

    /// A session came from another node: a CONNACK still waiting to be
    /// written says the session is present.
    pub fn mark_present(&mut self) {
        for o in self.transmit.items_mut() {
            if let Outgoing::Other(p) = o {
                if let Packet::ConnAck(ack) = &mut **p {
                    ack.session_present = true;
                }
            }
        }
    }

    /// A move into this session ended: `ids` are the messages it brought.
    /// Held live deliveries that are among them, or within the other
    /// node's marks, are dropped (the session had them there); the rest
    /// are merged with the queue ([`Self::merge_queued`]), or held on
    /// while a retained gather is still out. Later copies of
    /// them are skipped too until [`Session::forget_moved_ids`].
    pub fn end_move_in(&mut self, now: Instant, ids: HashSet<u64>) {
        self.queue_waits.1 = self.queue_waits.1.saturating_sub(1);
        // (And those the other node had before, by its marks.)
        for (m, d) in std::mem::take(&mut self.held) {
            let had = m.id != 0 && ids.contains(&m.id);
            match had || self.had_before_move(&m, d.qos.min(m.qos)) {
                true => self.done(d.stored),
                false => self.held.push_back((m, d)),
            }
        }
        match &mut self.moved_ids {
            Some(known) => known.extend(ids),
            None => self.moved_ids = Some(Box::new(ids)),
        }
        self.pre_move = None;
        // The last hold: what it held joins the queue in each origin's
        // order (a publisher's earlier messages may have reached this
        // node only, its later ones both).
        if self.gathers_pending > 1 {
            self.end_retained_gather(now);
        } else {
            self.gathers_pending = 0;
            self.held_released = false;
            let held = std::mem::take(&mut self.held).into_iter().collect();
            self.merge_queued(now, held);
        }
        if self.is_connected() {
            self.pump(now);
        }
    }

    /// True while what the session has queued waits (`queue_waits`).
    pub(super) fn queue_waits(&self) -> bool {
        self.queue_waits != (0, 0)
    }

    /// Its connection's claim went to the peers: what it has queued waits
    /// for their answers (a move of the session here may come with them).
    pub fn hold_queue(&mut self) {
        self.queue_waits.0 += 1;
    }

    /// A claim was answered (or waited long enough): the queue goes on,
    /// unless another claim or a move into the session is still on.
    pub fn release_queue(&mut self, now: Instant) {
        self.queue_waits.0 = self.queue_waits.0.saturating_sub(1);
        if self.is_connected() {
            self.pump(now);
        }
    }

    /// Note that `message` reached the session at `qos` (cluster mode: it
    /// has an id). One that came late ([`Message::late`]) says nothing of
    /// the messages of its origin between it and those that reached the
    /// session before: its origin's node may have sent those elsewhere
    /// (its route to this node was for another copy of the session, since
    /// gone). It widens no range; at QoS 2 its id is kept among the
    /// singles ([`Seen`]).
    pub(super) fn note_seen(&mut self, message: &Message, qos: QoS) {
        if message.id == 0 {
            return;
        }
        let seen = self.seen.get_or_insert_with(Box::default);
        let o = origin(message.id);
        let past = |seen: &Seen| (seen.ranges.get(&o)).is_some_and(|&(_, high)| message.id > high);
        if !message.late {
            // Past a range a late one closed: the range starts anew.
            if let Some(i) = seen.closed.iter().position(|&c| c == o) {
                seen.closed.swap_remove(i);
                if past(seen) {
                    seen.ranges.remove(&o);
                }
            }
            raise_mark(&mut seen.ranges, o, message.id);
            return;
        }
        if qos == QoS::ExactlyOnce {
            seen.note_single(message.id);
        }
        // One late past its origin's range: the origin's next one in
        // order does not widen the range over what lies between.
        if past(seen) && !seen.closed.contains(&o) {
            seen.closed.push(o);
        }
    }

    /// Per message origin, the lowest and highest id that reached the
    /// session in its origin's order, and each of the single ones that
    /// reached it outside that order (low and high the same), for the
    /// node it moves to.
    pub fn seen_marks(&self) -> Vec<OriginMark> {
        let Some(seen) = self.seen.as_deref() else {
            return Vec::new();
        };
        let ranges =
            (seen.ranges.iter()).map(|(&origin, &(low, high))| OriginMark { origin, low, high });
        let singles = (seen.singles.iter()).map(|&id| OriginMark {
            origin: origin(id),
            low: id,
            high: id,
        });
        let mut marks: Vec<OriginMark> = ranges.chain(singles).collect();
        marks.sort_unstable_by_key(|m| (m.origin, m.low));
        marks
    }

    /// Take the marks of the node the session moved from (`marks`, sent
    /// with its offer and again with its last part) and the subscriptions
    /// it had there (`filters`): later live copies within them are
    /// skipped. `whole`: all of it came, and the session here has what it
    /// had there. Else (the move was given up) the copy there lives on,
    /// or was lost with its node: only QoS 2 copies are skipped (a
    /// duplicate is allowed at QoS 1, a loss is not), and the session's
    /// own marks stay its own. A mark of one id is that message alone
    /// (one that reached the other copy outside its origin's order, or
    /// the only one of its origin that did): it widens no range.
    pub fn take_marks(&mut self, marks: &[OriginMark], filters: Vec<String>, whole: bool) {
        let slot = match whole {
            true => &mut self.moved_marks,
            false => &mut self.given_up_marks,
        };
        let moved = slot.get_or_insert_with(Box::default);
        for m in marks {
            if origin(m.low) != m.origin || origin(m.high) != m.origin || m.low > m.high {
                continue;
            }
            let single = m.low == m.high;
            if !single {
                merge_range(&mut moved.marks, m);
            } else if moved.singles.len() < MOVED_SINGLES_MAX {
                moved.singles.insert(m.low);
            }
            if whole {
                let seen = self.seen.get_or_insert_with(Box::default);
                match single {
                    true => seen.note_single(m.low),
                    false => merge_range(&mut seen.ranges, m),
                }
            }
        }
        for f in filters {
            if moved.filters.len() < MARKED_FILTERS_MAX {
                moved.filters.insert(f);
            }
        }
    }

    /// True when the node the session moved from had `message` (a copy
    /// that reached this node by another path, late), delivered at `qos`.
    pub(super) fn had_before_move(&self, message: &Message, qos: QoS) -> bool {
        self.moved_marks.as_deref().is_some_and(|m| m.had(message))
            || (qos == QoS::ExactlyOnce
                && (self.given_up_marks.as_deref()).is_some_and(|m| m.had(message)))
    }

    /// `ids` came to the session by another path than its routes (taken
    /// over from a dead node's copy, or sent on for it): a copy that comes
    /// by its routes is skipped until [`Session::forget_moved_ids`].
    pub fn note_moved_ids(&mut self, ids: impl IntoIterator<Item = u64>) {
        let known = self.moved_ids.get_or_insert_with(Box::default);
        known.extend(ids.into_iter().filter(|&id| id != 0));
    }

    /// Stop looking for copies of moved messages.
    pub fn forget_moved_ids(&mut self) {
        self.moved_ids = None;
    }

    /// True when `message` came with the session from another node.
    pub(super) fn moved_here(&self, message: &Message) -> bool {
        message.id != 0
            && self
                .moved_ids
                .as_ref()
                .is_some_and(|s| s.contains(&message.id))
    }
}

/// Put the messages of each origin (the high half of
/// [`Message::id`]) in the order they were accepted there, each origin's
/// keeping the places its messages had: two queues of one session, each
/// in order, merged so that no publisher's messages overtake each other.
fn order_by_origin(items: &mut [(Arc<Message>, Delivery)]) {
    let mut places: crate::hash::HashMap<u32, Vec<usize>> = Default::default();
    for (i, (m, _)) in items.iter().enumerate() {
        if m.id != 0 {
            places.entry(origin(m.id)).or_default().push(i);
        }
    }
    for places in places.values() {
        let mut ids: Vec<(u64, usize)> = places.iter().map(|&i| (items[i].0.id, i)).collect();
        ids.sort_unstable();
        let moved: Vec<(Arc<Message>, Delivery)> =
            ids.iter().map(|&(_, i)| items[i].clone()).collect();
        for (&place, item) in places.iter().zip(moved) {
            items[place] = item;
        }
    }
}

/// What reached a session of the messages routed in the cluster
/// ([`Session::note_seen`]).
#[derive(Debug, Default)]
pub(super) struct Seen {
    /// Per origin, the lowest and highest id that reached it in its
    /// origin's order.
    ranges: HashMap<u32, (u64, u64)>,
    /// Single messages outside those ranges, oldest first: the QoS 2 ones
    /// that reached it late, and those a move brought as single marks.
    singles: VecDeque<u64>,
    /// Origins whose range a late message past it closed: their next
    /// message in order starts it anew (the ids between may have gone to
    /// another copy of the session). At most one per range.
    closed: Vec<u32>,
}

impl Seen {
    /// Keep `id` among the singles, the last [`SINGLES_MAX`] of them.
    fn note_single(&mut self, id: u64) {
        if self.singles.contains(&id) {
            return;
        }
        if self.singles.len() >= SINGLES_MAX {
            self.singles.pop_front();
        }
        self.singles.push_back(id);
    }
}

/// Single messages outside its ranges a session keeps the ids of
/// ([`Seen`]); past that, the oldest is forgotten (a copy of it that a
/// merge brings later reaches the client again: a duplicate rather than a
/// loss).
pub const SINGLES_MAX: usize = 256;

/// Single marks a session keeps of what moves brought: as many as one
/// move sends (its singles and a one-id range per origin).
const MOVED_SINGLES_MAX: usize = SINGLES_MAX + MARKED_ORIGINS_MAX;

/// What a move brought to skip late copies by (see
/// [`Session::take_marks`]), or a session's own marks when a move into
/// it began ([`Session::begin_merge`]).
#[derive(Debug, Default)]
pub(super) struct MovedMarks {
    /// Per origin, the lowest and highest id the other node's session
    /// had.
    marks: HashMap<u32, (u64, u64)>,
    /// The subscriptions it had there (shared ones aside).
    filters: HashSet<String>,
    /// Single messages outside those ranges (see [`Seen`]).
    singles: HashSet<u64>,
}

/// Origins a session keeps marks of: past it, a new origin is not marked
/// (its late copies are not skipped: a duplicate rather than a loss).
pub const MARKED_ORIGINS_MAX: usize = 256;

/// Filters of the sessions it moved from that a session keeps marks for.
pub const MARKED_FILTERS_MAX: usize = 4096;

/// Take in `m`, another copy's range of its origin, within
/// [`MARKED_ORIGINS_MAX`]: two that overlap become one; of two apart,
/// the later is kept (the ids between reached neither copy, and must not
/// be taken as had).
fn merge_range(marks: &mut HashMap<u32, (u64, u64)>, m: &OriginMark) {
    if marks.len() >= MARKED_ORIGINS_MAX && !marks.contains_key(&m.origin) {
        return;
    }
    let (low, high) = marks.entry(m.origin).or_insert((m.low, m.high));
    if m.low <= *high && m.high >= *low {
        *low = (*low).min(m.low);
        *high = (*high).max(m.high);
    } else if m.low > *high {
        (*low, *high) = (m.low, m.high);
    }
}

/// Widen `marks`' range of origin `o` to take in `id` (one that reached
/// the session itself), within [`MARKED_ORIGINS_MAX`].
fn raise_mark(marks: &mut HashMap<u32, (u64, u64)>, o: u32, id: u64) {
    if marks.len() >= MARKED_ORIGINS_MAX && !marks.contains_key(&o) {
        return;
    }
    let (low, high) = marks.entry(o).or_insert((id, id));
    *low = (*low).min(id);
    *high = (*high).max(id);
}

impl MovedMarks {
    /// True when `message` is within its origin's marks and one of the
    /// filters matches it, or is one of the singles.
    fn had(&self, message: &Message) -> bool {
        if message.id == 0 {
            return false;
        }
        let marked = (self.marks.get(&origin(message.id)))
            .is_some_and(|&(low, high)| (low..=high).contains(&message.id))
            && (self.filters.iter()).any(|f| crate::router::topic::matches(f, &message.topic));
        marked || self.singles.contains(&message.id)
    }
}

/// `message`, marked late ([`Message::late`]): a copy when it is not
/// already (or has no id).
pub(super) fn late(message: &Arc<Message>) -> Arc<Message> {
    match message.late || message.id == 0 {
        true => message.clone(),
        false => Arc::new(Message {
            late: true,
            ..Message::clone(message)
        }),
    }
}

/// The origin of message id `id` (its high half).
fn origin(id: u64) -> u32 {
    (id >> 32) as u32
}
