//! Durability on a shard: its log writer, and the bookkeeping of what in
//! the log is still live, so acknowledged messages survive a crash and the
//! log's size stays bounded.
//!
//! Shard-local. What gets written, and when:
//!
//! - A persistent session (expiry > 0) writes its whole state when it is
//!   created, then deltas: Subscribe, Unsubscribe, Online, Offline, End.
//! - A QoS 1/2 publish that reaches other shards (or is QoS 2 from a
//!   persistent session, or a delayed publish being sent) is written as
//!   Accepted on the publisher's shard before its PUBACK/PUBREC, with an
//!   accept id. Every shard that applies it records that origin in what it
//!   writes and answers `Applied`; once all have, the accept is settled.
//!   After a crash, recovery routes again what was not settled, to the
//!   sessions whose shard did not record it.
//! - A delivery at QoS 1/2 to a persistent session is stored: one Message
//!   record per message per shard with every such session, then Sent,
//!   Released and Done as the session reports them (its journal).
//! - Retained messages (Retain), delayed publishes (Delayed, DelayedDone).
//!
//! Compaction: every live object remembers the segment of its last whole
//! record. When the log holds more than twice the live bytes (plus a
//! segment), the oldest segment's live objects are written again whole at
//! the head and the segment is deleted.
//!
//! Kill-safe mode acknowledges once a record is in the mapping. Power-safe
//! mode holds every session's output and every `Applied` answer until the
//! group-commit task has synced the records written before it.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hashbrown::HashMap;
use smallvec::SmallVec;

use crate::codec::QoS;
use crate::config::Durability;
use crate::log::{AppendError, Log};
use crate::message::Message;
use crate::persist::record::SessionRec;
use crate::persist::{Origin, Rec, Scope, Sid, Target, TargetState, WallClock};
use crate::session::{Journal, Session, StoredDelivery};

use super::mesh::MeshMsg;
use super::notify::Notify;
use super::{SessionKey, Shard, State};

/// A persistent session's place in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DurableSlot {
    /// Its number in the log.
    pub(super) sid: Sid,
    /// Segment of its last whole record.
    pub(super) seg: u64,
    /// Size of that record (for the live-bytes estimate).
    pub(super) bytes: u32,
}

/// An object of the log, for compaction.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Obj {
    Session(SessionKey, u64),
    Message(u64),
    Retained(Arc<str>),
    Delayed(u64),
    Accepted(u64),
}

/// A message stored for this shard's persistent sessions.
#[derive(Debug)]
struct StoredMessage {
    /// None once every delivery finished while its origin is not yet
    /// settled: the record must stay as proof this shard applied it.
    message: Option<Arc<Message>>,
    origin: Option<Origin>,
    scope: Scope,
    /// Sessions with an unfinished delivery (keys may repeat only if a
    /// session held it twice, which routing never does).
    sessions: SmallVec<[SessionKey; 2]>,
    seg: u64,
    bytes: u32,
}

/// An accepted message not yet applied everywhere.
#[derive(Debug)]
struct Accepted {
    id: u64,
    seg: u64,
    bytes: u32,
    message: Arc<Message>,
    scope: Scope,
    stamp_ms: u64,
    from: Option<(Sid, u16)>,
    delayed: Option<u64>,
    /// Shards that must answer `Applied`.
    dests: SmallVec<[u16; 4]>,
}

/// Size and segment of a single-record object (retained, delayed).
#[derive(Debug, Clone, Copy)]
struct Placed {
    seg: u64,
    bytes: u32,
}

/// The durable side of a shard; see the module docs.
pub(super) struct Store {
    log: Log,
    mode: Durability,
    clock: WallClock,
    scratch: BytesMut,
    me: u16,
    next_sid: Sid,
    next_message_id: u64,
    next_accept_id: u64,
    messages: HashMap<u64, StoredMessage>,
    accepted: VecDeque<Accepted>,
    /// Per shard: the largest accept id it answered `Applied` for.
    acked_upto: Vec<u64>,
    settled_upto: u64,
    settled_written: u64,
    settled_sent: u64,
    /// Per origin shard: its settled frontier as last heard.
    known_settled: Vec<u64>,
    /// Per origin shard: the largest accept id applied here and not yet
    /// answered.
    applied_pending: Vec<Option<u64>>,
    /// Origins whose messages could not be stored (the log is full): no
    /// more answers to them, so recovery routes their messages again.
    ack_blocked: Vec<bool>,
    retained: HashMap<Arc<str>, Placed>,
    /// Delayed publishes by id: when due, and their record.
    delayed: HashMap<u64, (Instant, Placed)>,
    by_seg: BTreeMap<u64, Vec<Obj>>,
    /// Sum of the live objects' whole-record sizes.
    live_bytes: u64,
    /// Records with a lower sequence number are synced (power-safe).
    synced_next: u64,
    /// Connections whose output waits for a sync.
    sync_waiters: Vec<(SessionKey, u64)>,
    /// Mesh messages that wait for a sync: (sequence needed, to, message).
    after_sync: Vec<(u64, usize, MeshMsg)>,
    sync_wake: Rc<Notify>,
    /// Sequence number when the clock was last written.
    clock_seq: u64,
    clock_at: Instant,
    /// The log has no room for new messages (no spare segment).
    full: bool,
    /// Which other shards reported a full log.
    others_full: Vec<bool>,
    /// When an append failure was last logged (rate limit).
    failure_logged: Option<Instant>,
}

impl Store {
    /// The store of a shard starting from `start` (recovery's output).
    pub(super) fn new(
        start: &ShardStartIds,
        log: Log,
        mode: Durability,
        clock: WallClock,
        me: usize,
        shards: usize,
        sync_wake: Rc<Notify>,
    ) -> Store {
        let next = log.next_seq();
        Store {
            log,
            mode,
            clock,
            scratch: BytesMut::new(),
            me: me as u16,
            next_sid: start.next_sid,
            next_message_id: start.next_message_id,
            next_accept_id: 1,
            messages: HashMap::new(),
            accepted: VecDeque::new(),
            acked_upto: vec![0; shards],
            settled_upto: 0,
            settled_written: 0,
            settled_sent: 0,
            known_settled: vec![0; shards],
            applied_pending: vec![None; shards],
            ack_blocked: vec![false; shards],
            retained: HashMap::new(),
            delayed: HashMap::new(),
            by_seg: BTreeMap::new(),
            live_bytes: 0,
            synced_next: next,
            sync_waiters: Vec::new(),
            after_sync: Vec::new(),
            sync_wake,
            clock_seq: next,
            clock_at: Instant::now(),
            full: false,
            others_full: vec![false; shards],
            failure_logged: None,
        }
    }

    /// A restored session whose whole record is in segment `seg`.
    pub(super) fn restore_session(&mut self, key: SessionKey, uid: u64, seg: u64) {
        self.track(seg, Obj::Session(key, uid));
    }

    /// A restored stored message and the sessions holding it.
    pub(super) fn restore_message(
        &mut self,
        id: u64,
        seg: u64,
        message: Arc<Message>,
        sessions: SmallVec<[SessionKey; 2]>,
    ) {
        self.track(seg, Obj::Message(id));
        let m = StoredMessage {
            message: Some(message),
            origin: None,
            scope: Scope::default(),
            sessions,
            seg,
            bytes: 0,
        };
        self.messages.insert(id, m);
    }

    /// A restored retained message.
    pub(super) fn restore_retained(&mut self, topic: Arc<str>, seg: u64) {
        self.track(seg, Obj::Retained(topic.clone()));
        self.retained.insert(topic, Placed { seg, bytes: 0 });
    }

    /// A restored delayed publish.
    pub(super) fn restore_delayed(&mut self, id: u64, due: Instant, seg: u64) {
        self.track(seg, Obj::Delayed(id));
        self.delayed.insert(id, (due, Placed { seg, bytes: 0 }));
    }

    /// Append `rec`; returns the segment it went into and its size.
    fn put(&mut self, rec: &Rec) -> Result<(u64, u32), AppendError> {
        self.scratch.clear();
        let kind = rec.encode(&self.clock, &mut self.scratch);
        let bytes = self.scratch.len() as u32;
        match self.log.append(kind, &self.scratch) {
            Ok(_) => {
                if self.mode == Durability::PowerSafe {
                    self.sync_wake.notify();
                }
                Ok((self.log.current_index(), bytes))
            }
            Err(e) => {
                let now = Instant::now();
                if self
                    .failure_logged
                    .is_none_or(|t| now - t > Duration::from_secs(10))
                {
                    self.failure_logged = Some(now);
                    log::error!(
                        "shard {}: {e}: a {} record was not written ({})",
                        self.me,
                        kind,
                        self.log.dir().display()
                    );
                }
                Err(e)
            }
        }
    }

    /// Append a record that only records a change (no object of its own).
    fn note(&mut self, rec: &Rec) {
        let _ = self.put(rec);
    }

    fn track(&mut self, seg: u64, obj: Obj) {
        self.by_seg.entry(seg).or_default().push(obj);
    }

    fn wall_ms(&self, t: Instant) -> u64 {
        self.clock.to_ms(t)
    }

    /// True when new QoS 1/2 messages cannot be taken (this shard's log or
    /// another's is full).
    pub(super) fn refusing(&self) -> bool {
        self.full || self.others_full.iter().any(|f| *f)
    }

    /// Power-safe: the sequence number a session's output must wait for,
    /// when records are not yet synced.
    fn unsynced_upto(&self) -> Option<u64> {
        let next = self.log.next_seq();
        (self.mode == Durability::PowerSafe && next > self.synced_next).then_some(next)
    }

    /// Send now (kill-safe) or after the records written so far are synced.
    fn send_after_sync(&mut self, mesh: &super::mesh::Mesh, to: usize, msg: MeshMsg) {
        match self.unsynced_upto() {
            Some(seq) => self.after_sync.push((seq, to, msg)),
            None => mesh.send(to, msg),
        }
    }
}

/// The id counters a shard's log continues from.
#[derive(Debug, Clone, Copy)]
pub(super) struct ShardStartIds {
    pub(super) next_sid: Sid,
    pub(super) next_message_id: u64,
}

/// How a delivery to a session is stored, decided by the caller.
pub(super) struct StoreTarget {
    pub(super) key: SessionKey,
    pub(super) sid: Sid,
    pub(super) qos: QoS,
    pub(super) retain: bool,
    pub(super) subscription_ids: crate::session::SubIds,
}

impl Shard {
    /// The message id a delivery to `key` at `qos` is stored under, if it
    /// is to be stored (persistent session, QoS 1/2): allocated once per
    /// message per shard by the caller through `id`.
    pub(super) fn storable(st: &State, key: SessionKey, qos: QoS) -> Option<Sid> {
        st.store.as_ref()?;
        if qos == QoS::AtMostOnce {
            return None;
        }
        st.sessions.get(key)?.durable.map(|d| d.sid)
    }

    /// A new message id for this shard's log.
    pub(super) fn next_message_id(st: &mut State) -> Option<u64> {
        let store = st.store.as_mut()?;
        let id = store.next_message_id;
        store.next_message_id += 1;
        Some(id)
    }

    /// Write the Message record of deliveries just handed to sessions; with
    /// no message, a marker that this shard applied `origin`.
    pub(super) fn store_message(
        st: &mut State,
        id: u64,
        message: Option<&Arc<Message>>,
        origin: Option<Origin>,
        scope: Scope,
        targets: Vec<StoreTarget>,
    ) {
        let Some(store) = st.store.as_mut() else {
            return;
        };
        let rec = Rec::Message {
            id,
            origin,
            scope: scope.clone(),
            message: message.cloned(),
            targets: targets
                .iter()
                .map(|t| Target {
                    sid: t.sid,
                    qos: t.qos,
                    retain: t.retain,
                    subscription_ids: t.subscription_ids.clone(),
                    state: TargetState::Queued,
                })
                .collect(),
        };
        match store.put(&rec) {
            Ok((seg, bytes)) => {
                store.live_bytes += u64::from(bytes);
                store.track(seg, Obj::Message(id));
                store.messages.insert(
                    id,
                    StoredMessage {
                        message: message.cloned(),
                        origin,
                        scope,
                        sessions: targets.iter().map(|t| t.key).collect(),
                        seg,
                        bytes,
                    },
                );
            }
            Err(_) => {
                if let Some(o) = origin {
                    store.ack_blocked[usize::from(o.shard)] = true;
                }
            }
        }
    }

    /// This shard applied the routed message `origin` (whether or not it
    /// stored anything): answer its origin (batched per mesh batch).
    pub(super) fn applied(st: &mut State, origin: Option<Origin>) {
        let (Some(store), Some(o)) = (st.store.as_mut(), origin) else {
            return;
        };
        let slot = &mut store.applied_pending[usize::from(o.shard)];
        *slot = Some(slot.map_or(o.id, |p| p.max(o.id)));
    }

    /// Send the `Applied` answers gathered while handling a batch.
    pub(super) fn send_applied(&self, st: &mut State) {
        let Some(store) = st.store.as_mut() else {
            return;
        };
        for origin in 0..store.applied_pending.len() {
            let Some(upto) = store.applied_pending[origin].take() else {
                continue;
            };
            if store.ack_blocked[origin] {
                continue;
            }
            if origin == self.id {
                store.acked_upto[origin] = store.acked_upto[origin].max(upto);
                continue;
            }
            store.send_after_sync(&self.mesh, origin, MeshMsg::Applied { upto });
        }
    }

    /// Write an Accepted record for a message about to be routed to
    /// `dests` (other shards); returns its origin for the mesh messages.
    pub(super) fn accept(
        &self,
        st: &mut State,
        message: &Arc<Message>,
        scope: Scope,
        from: Option<(Sid, u16)>,
        delayed: Option<u64>,
        dests: SmallVec<[u16; 4]>,
    ) -> Option<Origin> {
        let store = st.store.as_mut()?;
        let id = store.next_accept_id;
        let stamp_ms = store.clock.to_ms(Instant::now());
        let rec = Rec::Accepted {
            id,
            scope: scope.clone(),
            message: message.clone(),
            stamp_ms,
            from,
            delayed,
        };
        let (seg, bytes) = store.put(&rec).ok()?;
        store.next_accept_id += 1;
        store.live_bytes += u64::from(bytes);
        store.track(seg, Obj::Accepted(id));
        store.accepted.push_back(Accepted {
            id,
            seg,
            bytes,
            message: message.clone(),
            scope,
            stamp_ms,
            from,
            delayed,
            dests,
        });
        Self::settle(store);
        Some(Origin {
            shard: self.id as u16,
            id,
        })
    }

    /// Shard `from` applied every message of ours up to `upto`.
    pub(super) fn on_applied(st: &mut State, from: usize, upto: u64) {
        let Some(store) = st.store.as_mut() else {
            return;
        };
        store.acked_upto[from] = store.acked_upto[from].max(upto);
        Self::settle(store);
    }

    /// Advance the settled frontier past every accept all its destinations
    /// answered.
    fn settle(store: &mut Store) {
        while let Some(a) = store.accepted.front() {
            let done = a
                .dests
                .iter()
                .all(|d| store.acked_upto[usize::from(*d)] >= a.id);
            if !done {
                break;
            }
            store.settled_upto = a.id;
            store.live_bytes -= u64::from(a.bytes);
            store.accepted.pop_front();
        }
    }

    /// Another shard's settled frontier: markers of its messages up to it
    /// can go.
    pub(super) fn on_settled(st: &mut State, from: usize, upto: u64) {
        let Some(store) = st.store.as_mut() else {
            return;
        };
        store.known_settled[from] = store.known_settled[from].max(upto);
        let known = &store.known_settled;
        let mut freed = 0;
        store.messages.retain(|_, m| {
            let keep =
                m.message.is_some() || m.origin.is_some_and(|o| o.id > known[usize::from(o.shard)]);
            if !keep {
                freed += u64::from(m.bytes);
            }
            keep
        });
        store.live_bytes -= freed;
    }

    /// Another shard's log became full or has room again.
    pub(super) fn on_store_full(&self, st: &mut State, from: usize, full: bool) {
        if let Some(store) = st.store.as_mut() {
            store.others_full[from] = full;
            self.limits.status.store_full.set(store.refusing());
        }
    }

    /// A connection attached: a persistent session writes its whole state
    /// the first time, an Online record after.
    pub(super) fn durable_connect(st: &mut State, key: SessionKey) {
        let Some(store) = st.store.as_mut() else {
            return;
        };
        let Some(slot) = st.sessions.get_mut(key) else {
            return;
        };
        let state = slot.session.durable_state();
        match slot.durable {
            Some(d) => store.note(&Rec::Online {
                sid: d.sid,
                expiry_s: state.expiry_s,
                will: state.will.map(Box::new),
            }),
            None if state.expiry_s > 0 => {
                let sid = store.next_sid;
                let rec = session_rec(store, sid, &slot.session);
                if let Ok((seg, bytes)) = store.put(&rec) {
                    store.next_sid += 1;
                    store.live_bytes += u64::from(bytes);
                    store.track(seg, Obj::Session(key, slot.uid));
                    slot.durable = Some(DurableSlot { sid, seg, bytes });
                } else {
                    log::warn!(
                        "client {}: session not persisted (the log is full)",
                        slot.session.client_id()
                    );
                }
            }
            None => {}
        }
    }

    /// A subscription of a persistent session changed.
    pub(super) fn durable_subscription(
        st: &mut State,
        key: SessionKey,
        filter: &str,
        sub: Option<&crate::session::Subscription>,
    ) {
        let (Some(store), Some(slot)) = (st.store.as_mut(), st.sessions.get(key)) else {
            return;
        };
        let Some(d) = slot.durable else {
            return;
        };
        let rec = match sub {
            Some(sub) => Rec::Subscribe {
                sid: d.sid,
                filter: filter.to_string(),
                sub: sub.clone(),
            },
            None => Rec::Unsubscribe {
                sid: d.sid,
                filter: filter.to_string(),
            },
        };
        store.note(&rec);
    }

    /// The connection of a persistent session ended.
    pub(super) fn durable_offline(st: &mut State, key: SessionKey) {
        let (Some(store), Some(slot)) = (st.store.as_mut(), st.sessions.get(key)) else {
            return;
        };
        let Some(d) = slot.durable else {
            return;
        };
        let state = slot.session.durable_state();
        let at = state.offline_since.unwrap_or_else(Instant::now);
        let rec = Rec::Offline {
            sid: d.sid,
            at_ms: store.wall_ms(at),
            expiry_s: state.expiry_s,
            will_due_ms: state.will_due.map(|t| store.wall_ms(t)),
        };
        store.note(&rec);
    }

    /// A persistent session ended: everything it held goes.
    pub(super) fn durable_end(st: &mut State, key: SessionKey) {
        let (Some(store), Some(slot)) = (st.store.as_mut(), st.sessions.get(key)) else {
            return;
        };
        let Some(d) = slot.durable else {
            return;
        };
        store.note(&Rec::SessionEnd { sid: d.sid });
        store.live_bytes -= u64::from(d.bytes);
        let mut ids = Vec::new();
        slot.session.stored_deliveries(|_, s| ids.push(s.id));
        for id in ids {
            message_done(store, id, key);
        }
    }

    /// Write what the session's journal reports.
    pub(super) fn drain_journal(st: &mut State, key: SessionKey) {
        let Some(slot) = st.sessions.get_mut(key) else {
            return;
        };
        let Some(store) = st.store.as_mut() else {
            while slot.session.poll_journal().is_some() {}
            return;
        };
        let sid = slot.durable.map(|d| d.sid);
        while let Some(j) = slot.session.poll_journal() {
            let Some(sid) = sid else {
                continue;
            };
            match j {
                Journal::Sent { id, packet_id } => store.note(&Rec::Sent { sid, id, packet_id }),
                Journal::Released { id } => store.note(&Rec::Released { sid, id }),
                Journal::Done { id } => {
                    store.note(&Rec::Done { sid, id });
                    message_done(store, id, key);
                }
                Journal::Qos2Done { packet_id } => store.note(&Rec::Qos2Done { sid, packet_id }),
                Journal::WillDone => store.note(&Rec::WillDone { sid }),
            }
        }
    }

    /// Power-safe: hold the session's output until what was written so far
    /// is synced.
    pub(super) fn hold_for_sync(st: &mut State, key: SessionKey) {
        let Some(seq) = st.store.as_ref().and_then(Store::unsynced_upto) else {
            return;
        };
        if let Some(slot) = st.sessions.get_mut(key) {
            slot.wait_seq = slot.wait_seq.max(seq);
        }
    }

    /// True when the session's output must wait for a sync; the writer is
    /// then woken by [`Shard::sync_done`].
    pub(super) fn output_waits_for_sync(st: &mut State, key: SessionKey, conn_id: u64) -> bool {
        let Some(store) = st.store.as_mut() else {
            return false;
        };
        let Some(slot) = st.sessions.get(key) else {
            return false;
        };
        if slot.wait_seq <= store.synced_next {
            return false;
        }
        store.sync_waiters.push((key, conn_id));
        true
    }

    /// Store, replace or (empty payload) delete a retained topic's record.
    /// `origin` is the routed message's, for recovery to tell it was applied.
    pub(super) fn durable_retain(st: &mut State, message: &Arc<Message>, origin: Option<Origin>) {
        let Some(store) = st.store.as_mut() else {
            return;
        };
        let stamp_ms = store.clock.to_ms(Instant::now());
        let rec = Rec::Retain {
            message: message.clone(),
            stamp_ms,
            origin,
        };
        let placed = store.put(&rec).ok();
        if let Some(old) = store.retained.remove(&message.topic) {
            store.live_bytes -= u64::from(old.bytes);
        }
        if let Some((seg, bytes)) = placed.filter(|_| !message.payload.is_empty()) {
            store.live_bytes += u64::from(bytes);
            store.track(seg, Obj::Retained(message.topic.clone()));
            store
                .retained
                .insert(message.topic.clone(), Placed { seg, bytes });
        }
    }

    /// Record a delayed publish (with a QoS 2 publisher's packet id, which
    /// its session now remembers).
    pub(super) fn durable_delay(
        st: &mut State,
        id: u64,
        due: Instant,
        message: &Arc<Message>,
        from: Option<(Sid, u16)>,
    ) {
        let Some(store) = st.store.as_mut() else {
            return;
        };
        let rec = Rec::Delayed {
            id,
            due_ms: store.wall_ms(due),
            message: message.clone(),
            from,
        };
        if let Ok((seg, bytes)) = store.put(&rec) {
            store.live_bytes += u64::from(bytes);
            store.track(seg, Obj::Delayed(id));
            store.delayed.insert(id, (due, Placed { seg, bytes }));
        }
    }

    /// A delayed publish was sent: its record is dead (the Accepted record
    /// written when it was routed says so too).
    pub(super) fn durable_delay_done(st: &mut State, id: u64, accepted: bool) {
        let Some(store) = st.store.as_mut() else {
            return;
        };
        if let Some((_, p)) = store.delayed.remove(&id) {
            store.live_bytes -= u64::from(p.bytes);
        }
        if !accepted {
            store.note(&Rec::DelayedDone { id });
        }
    }

    /// Housekeeping on each tick: the clock record, the settled frontier,
    /// the spare segment, compaction.
    pub(super) fn durable_tick(&self, st: &mut State, now: Instant) {
        let Some(store) = st.store.as_mut() else {
            return;
        };
        if store.log.next_seq() != store.clock_seq && now - store.clock_at >= Duration::from_secs(1)
        {
            let ms = store.clock.to_ms(now);
            store.note(&Rec::Clock { ms });
            store.clock_seq = store.log.next_seq();
            store.clock_at = now;
        }
        if store.settled_upto > store.settled_written {
            let upto = store.settled_upto;
            if store.put(&Rec::Settled { upto }).is_ok() {
                store.settled_written = upto;
            }
        }
        if store.settled_upto > store.settled_sent {
            let upto = store.settled_upto;
            store.settled_sent = upto;
            self.mesh.broadcast(|| MeshMsg::Settled { upto });
            Self::on_settled(st, self.id, upto);
        }
        let Some(store) = st.store.as_mut() else {
            return;
        };
        let full = !store.log.ensure_spare();
        if full != store.full {
            store.full = full;
            if full {
                log::error!(
                    "shard {}: no disk space for a new log segment in {}: refusing QoS 1/2 \
                     messages (0x97) until there is",
                    self.id,
                    store.log.dir().display()
                );
            } else {
                log::warn!("shard {}: the log has room again", self.id);
            }
            self.mesh.broadcast(|| MeshMsg::StoreFull { full });
            self.limits.status.store_full.set(store.refusing());
        }
        self.compact(st);
    }

    /// Take what is synced into account: release held output and answers.
    pub(super) fn sync_done(&self, st: &mut State, synced_next: u64) {
        let Some(store) = st.store.as_mut() else {
            return;
        };
        store.synced_next = store.synced_next.max(synced_next);
        let synced = store.synced_next;
        let mut later = Vec::new();
        for (seq, to, msg) in std::mem::take(&mut store.after_sync) {
            if seq <= synced {
                self.mesh.send(to, msg);
            } else {
                later.push((seq, to, msg));
            }
        }
        store.after_sync = later;
        for (key, conn_id) in std::mem::take(&mut store.sync_waiters) {
            if let Some(c) = st
                .sessions
                .get(key)
                .and_then(|s| s.conn.as_ref())
                .filter(|c| c.id == conn_id)
            {
                c.wake.notify();
            }
        }
    }

    /// Start a sync: the files to sync and the sequence number all records
    /// below will be durable after it. None when nothing waits.
    pub(super) fn begin_sync(st: &mut State) -> Option<(u64, Vec<std::path::PathBuf>)> {
        let store = st.store.as_mut()?;
        let next = store.log.next_seq();
        if next <= store.synced_next {
            return None;
        }
        Some((next, store.log.take_dirty()))
    }

    /// Rewrite the oldest segment's live objects at the head and delete it,
    /// while the log holds more than twice its live bytes plus a segment.
    fn compact(&self, st: &mut State) {
        for _ in 0..4 {
            let Some(store) = st.store.as_ref() else {
                return;
            };
            let limit = store.live_bytes * 2 + store.log.body_max_bytes() as u64;
            if store.log.sealed_count() == 0 || store.log.used_bytes() <= limit {
                return;
            }
            if !self.compact_oldest(st) {
                return;
            }
        }
    }

    /// Compact the oldest sealed segment; false if it could not be.
    fn compact_oldest(&self, st: &mut State) -> bool {
        let store = st.store.as_ref().expect("checked by the caller");
        let victim = store.log.oldest_index();
        let objs: Vec<Obj> = store
            .by_seg
            .range(..=victim)
            .flat_map(|(_, v)| v.iter().cloned())
            .collect();
        let mut targets: HashMap<u64, Vec<Target>> = objs
            .iter()
            .filter_map(|o| match o {
                Obj::Message(id) if store.messages.get(id).is_some_and(|m| m.seg <= victim) => {
                    Some((*id, Vec::new()))
                }
                _ => None,
            })
            .collect();
        gather_targets(st, &mut targets);
        let State {
            store,
            sessions,
            retained,
            delayed,
            ..
        } = st;
        let store = store.as_mut().expect("checked by the caller");
        for obj in objs {
            let ok = match obj {
                Obj::Session(key, uid) => rewrite_session(store, sessions, key, uid, victim),
                Obj::Message(id) => {
                    rewrite_message(store, id, targets.remove(&id).unwrap_or_default(), victim)
                }
                Obj::Retained(topic) => match retained.get(&topic) {
                    Some(m) => {
                        let rec = Rec::Retain {
                            message: m.clone(),
                            stamp_ms: store.clock.to_ms(Instant::now()),
                            origin: None,
                        };
                        let obj = Obj::Retained(topic.clone());
                        rewrite_single(store, victim, obj, &rec, |s| s.retained.get_mut(&topic))
                    }
                    None => true,
                },
                Obj::Delayed(id) => {
                    let due = store.delayed.get(&id).map(|d| d.0);
                    match due.and_then(|due| Some((due, delayed.get(&(due, id))?))) {
                        Some((due, m)) => {
                            let rec = Rec::Delayed {
                                id,
                                due_ms: store.clock.to_ms(due),
                                message: m.clone(),
                                from: None,
                            };
                            rewrite_single(store, victim, Obj::Delayed(id), &rec, |s| {
                                s.delayed.get_mut(&id).map(|d| &mut d.1)
                            })
                        }
                        None => true,
                    }
                }
                Obj::Accepted(id) => rewrite_accepted(store, id, victim),
            };
            if !ok {
                return false;
            }
        }
        store.by_seg = store.by_seg.split_off(&(victim + 1));
        if let Err(e) = store.log.remove_through(victim) {
            log::error!("shard {}: cannot delete compacted segments: {e}", self.id);
            return false;
        }
        true
    }
}

impl Shard {
    /// The group-commit task (power-safe): whenever records wait, wait up to
    /// `storage.sync_interval_ms` for more, `fdatasync` the segments written
    /// (io_uring), then release the output and answers that waited.
    pub async fn sync_loop(self: Rc<Self>) {
        let gather = Duration::from_millis(self.config.storage.sync_interval_ms);
        let mut files = HashMap::new();
        loop {
            self.sync_wake.wait().await;
            if !gather.is_zero() {
                glommio::timer::sleep(gather).await;
            }
            self.sync_once(&mut files).await;
        }
    }

    /// Sync what is written now (at a clean stop; a no-op in kill-safe mode).
    pub async fn sync_now(&self) {
        if self.config.durability() == Durability::PowerSafe {
            self.sync_once(&mut HashMap::new()).await;
        }
    }

    async fn sync_once(&self, files: &mut HashMap<std::path::PathBuf, glommio::io::BufferedFile>) {
        let Some((target, paths)) = Self::begin_sync(&mut self.state.borrow_mut()) else {
            return;
        };
        files.retain(|p, _| paths.contains(p));
        for path in paths {
            if !files.contains_key(&path) {
                match glommio::io::BufferedFile::open(&path).await {
                    Ok(f) => {
                        files.insert(path.clone(), f);
                    }
                    Err(e) => {
                        log::error!(
                            "shard {}: cannot open {} to sync it: {e}",
                            self.id,
                            path.display()
                        );
                        return;
                    }
                }
            }
            if let Err(e) = files[&path].fdatasync().await {
                log::error!(
                    "shard {}: fdatasync of {} failed: {e}",
                    self.id,
                    path.display()
                );
                return;
            }
        }
        self.sync_done(&mut self.state.borrow_mut(), target);
    }
}

/// A session finished with stored message `id`.
fn message_done(store: &mut Store, id: u64, key: SessionKey) {
    let Some(m) = store.messages.get_mut(&id) else {
        return;
    };
    if let Some(i) = m.sessions.iter().position(|k| *k == key) {
        m.sessions.swap_remove(i);
    }
    if !m.sessions.is_empty() {
        return;
    }
    let settled = match m.origin {
        None => true,
        Some(o) if o.shard == store.me => o.id <= store.settled_upto,
        Some(o) => o.id <= store.known_settled[usize::from(o.shard)],
    };
    if settled {
        let m = store.messages.remove(&id).expect("present");
        store.live_bytes -= u64::from(m.bytes);
    } else {
        m.message = None;
    }
}

/// The whole-state record of a session.
fn session_rec(store: &Store, sid: Sid, session: &Session) -> Rec {
    let s = session.durable_state();
    Rec::Session(Box::new(SessionRec {
        sid,
        client_id: session.client_id().to_string(),
        expiry_s: s.expiry_s,
        offline_since_ms: s.offline_since.map(|t| store.clock.to_ms(t)),
        subscriptions: s.subscriptions,
        qos2_in: s.qos2_in,
        will: s.will,
        will_due_ms: s.will_due.map(|t| store.clock.to_ms(t)),
    }))
}

fn rewrite_session(
    store: &mut Store,
    sessions: &mut super::slab::Slab<super::SessionSlot>,
    key: SessionKey,
    uid: u64,
    victim: u64,
) -> bool {
    let Some(slot) = sessions.get_mut(key).filter(|s| s.uid == uid) else {
        return true;
    };
    let Some(d) = slot.durable.filter(|d| d.seg <= victim) else {
        return true;
    };
    let rec = session_rec(store, d.sid, &slot.session);
    match store.put(&rec) {
        Ok((seg, bytes)) => {
            store.live_bytes = store.live_bytes - u64::from(d.bytes) + u64::from(bytes);
            store.track(seg, Obj::Session(key, uid));
            slot.durable = Some(DurableSlot {
                sid: d.sid,
                seg,
                bytes,
            });
            true
        }
        Err(_) => false,
    }
}

/// Collect the current delivery states of the messages in `ids` from the
/// sessions holding them (one pass over each such session).
fn gather_targets(st: &State, ids: &mut HashMap<u64, Vec<Target>>) {
    let Some(store) = st.store.as_ref() else {
        return;
    };
    let mut keys: Vec<SessionKey> = ids
        .keys()
        .filter_map(|id| store.messages.get(id))
        .flat_map(|m| m.sessions.iter().copied())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    for key in keys {
        let Some(slot) = st.sessions.get(key) else {
            continue;
        };
        let Some(d) = slot.durable else {
            continue;
        };
        slot.session.stored_deliveries(|_, s: StoredDelivery| {
            if let Some(v) = ids.get_mut(&s.id) {
                v.push(Target {
                    sid: d.sid,
                    qos: s.qos,
                    retain: s.retain,
                    subscription_ids: s.subscription_ids,
                    state: match s.packet_id {
                        None => TargetState::Queued,
                        Some(packet_id) => TargetState::Inflight {
                            packet_id,
                            released: s.released,
                        },
                    },
                });
            }
        });
    }
}

fn rewrite_message(store: &mut Store, id: u64, targets: Vec<Target>, victim: u64) -> bool {
    let Some(m) = store.messages.get(&id).filter(|m| m.seg <= victim) else {
        return true;
    };
    let rec = Rec::Message {
        id,
        origin: m.origin,
        scope: m.scope.clone(),
        message: m.message.clone(),
        targets,
    };
    let old = m.bytes;
    match store.put(&rec) {
        Ok((seg, bytes)) => {
            store.live_bytes = store.live_bytes - u64::from(old) + u64::from(bytes);
            store.track(seg, Obj::Message(id));
            let m = store.messages.get_mut(&id).expect("present");
            m.seg = seg;
            m.bytes = bytes;
            true
        }
        Err(_) => false,
    }
}

fn rewrite_single(
    store: &mut Store,
    victim: u64,
    obj: Obj,
    rec: &Rec,
    place: impl Fn(&mut Store) -> Option<&mut Placed>,
) -> bool {
    if place(store).is_none_or(|p| p.seg > victim) {
        return true;
    }
    match store.put(rec) {
        Ok((seg, bytes)) => {
            let p = place(store).expect("checked");
            let old = p.bytes;
            *p = Placed { seg, bytes };
            store.live_bytes = store.live_bytes - u64::from(old) + u64::from(bytes);
            store.track(seg, obj);
            true
        }
        Err(_) => false,
    }
}

fn rewrite_accepted(store: &mut Store, id: u64, victim: u64) -> bool {
    let Some(a) = store
        .accepted
        .iter()
        .find(|a| a.id == id && a.seg <= victim)
    else {
        return true;
    };
    let rec = Rec::Accepted {
        id,
        scope: a.scope.clone(),
        message: a.message.clone(),
        stamp_ms: a.stamp_ms,
        from: a.from,
        delayed: a.delayed,
    };
    let old = a.bytes;
    match store.put(&rec) {
        Ok((seg, bytes)) => {
            store.live_bytes = store.live_bytes - u64::from(old) + u64::from(bytes);
            store.track(seg, Obj::Accepted(id));
            let a = store
                .accepted
                .iter_mut()
                .find(|a| a.id == id)
                .expect("present");
            a.seg = seg;
            a.bytes = bytes;
            true
        }
        Err(_) => false,
    }
}
