//! What a shard stores of routed messages: deliveries to its persistent
//! sessions (Message records), proofs that it applied a routed message
//! (markers), retained messages and delayed publishes.
//!
//! Shard-local. A Message record that names an origin is also proof that
//! this shard applied it, which recovery needs until the origin settles.
//! Once its deliveries finish, the record is dead as a message but kept as
//! a proof, remembered per segment: when compaction reaches the segment and
//! the origin is still unsettled, a small marker record is written at the
//! head instead. (Origins settle within milliseconds; compaction reaches a
//! segment much later, so markers are rarely written.)

use std::sync::Arc;
use std::time::Instant;

use smallvec::SmallVec;

use crate::codec::QoS;
use crate::log::{AppendError, ReadError, RecordAt};
use crate::message::Message;
use crate::persist::record::{kind, message_records};
use crate::persist::{Origin, Rec, Scope, Sid, Target, TargetState};
use crate::session::{Delivery, SubIds};

use super::retry::Retry;
use super::{Obj, Placed, RetainedMeta, SessionKey, ShardCore, State, Store};

/// A message stored for this shard's persistent sessions.
#[derive(Debug)]
pub(super) struct StoredMessage {
    pub(super) body: Body,
    pub(super) origin: Option<Origin>,
    pub(super) scope: Scope,
    /// Sessions with an unfinished delivery.
    pub(super) sessions: SmallVec<[SessionKey; 2]>,
    /// Segment of its first record.
    pub(super) seg: u64,
    pub(super) bytes: u32,
    /// Deliveries held back until the record is written (see [`Held`]).
    pub(super) held: Vec<Held>,
}

/// A delivery of a stored message whose record is not written yet, kept
/// out of its session until it is: a client that received and
/// acknowledged it before a crash would otherwise get it again as a new
/// message when recovery routes the unsettled accept once more (twice for
/// QoS 2). Only this delivery waits; the session goes on sending what is
/// already logged.
#[derive(Debug)]
pub(in crate::shard) struct Held {
    pub(in crate::shard) key: SessionKey,
    /// The session slot's uid when routed: a new session under the same
    /// key does not get it.
    pub(in crate::shard) uid: u64,
    pub(in crate::shard) sid: Sid,
    pub(in crate::shard) delivery: Delivery,
}

/// Where a stored message's content is.
#[derive(Debug)]
pub(super) enum Body {
    /// Only in memory: its record could not be written (the log was full).
    /// The deliveries live in memory, answers to the origin wait, and the
    /// record is written when room returns.
    Pinned(Arc<Message>),
    /// In the log, its first record at `at`. The store keeps no copy (not
    /// even a weak one, which would keep the allocation alive): sessions
    /// hold it while it is in their memory, and [`Store::load`] reads it
    /// back for a session that paged it out, or for compaction.
    Logged { at: RecordAt },
}

/// Why a stored message could not be given back.
#[derive(Debug, thiserror::Error)]
pub(in crate::shard) enum LoadError {
    /// No message of that id is stored (a damaged index, or already done).
    #[error("message {0} is not stored")]
    NotStored(u64),
    /// Its record could not be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The record there is not this message's.
    #[error("the record at {at:?} is not message {id}: {why}")]
    Mismatch { id: u64, at: RecordAt, why: String },
}

impl StoredMessage {
    /// True once its record is written.
    pub(super) fn is_logged(&self) -> bool {
        matches!(self.body, Body::Logged { .. })
    }

    /// Its record was written at `at`, `bytes` long in all.
    pub(super) fn set_logged(&mut self, at: RecordAt, bytes: u32) {
        self.seg = at.segment;
        self.bytes = bytes;
        self.body = Body::Logged { at };
    }
}

/// A delivery to a persistent session to store, as decided by routing.
pub(in crate::shard) struct StoreTarget {
    pub(in crate::shard) key: SessionKey,
    pub(in crate::shard) sid: Sid,
    pub(in crate::shard) qos: QoS,
    pub(in crate::shard) retain: bool,
    pub(in crate::shard) subscription_ids: SubIds,
}

impl StoreTarget {
    fn queued(&self) -> Target {
        Target {
            sid: self.sid,
            qos: self.qos,
            retain: self.retain,
            subscription_ids: self.subscription_ids.clone(),
            state: TargetState::Queued,
        }
    }
}

/// What every record of one stored message repeats.
pub(super) struct MessageHead {
    origin: Option<Origin>,
    scope: Scope,
    pub(super) message: Arc<Message>,
}

impl Store {
    /// The head of stored message `id`, for writing its records (its
    /// content read back from the log if no session holds it in memory).
    pub(super) fn message_head(&mut self, id: u64) -> Result<MessageHead, LoadError> {
        let message = self.load(id)?;
        let m = self.messages.get(&id).ok_or(LoadError::NotStored(id))?;
        Ok(MessageHead {
            origin: m.origin,
            scope: m.scope.clone(),
            message,
        })
    }

    /// Stored message `id`: the pinned copy until its record is written,
    /// then read back from that record.
    pub(in crate::shard) fn load(&mut self, id: u64) -> Result<Arc<Message>, LoadError> {
        let m = self.messages.get(&id).ok_or(LoadError::NotStored(id))?;
        let at = match &m.body {
            Body::Pinned(message) => return Ok(message.clone()),
            Body::Logged { at } => *at,
        };
        let clock = &self.rec.clock;
        let decoded = self.rec.log.read(at, |r| {
            if r.kind != kind::MESSAGE {
                return Err(format!("a record of kind {}", r.kind));
            }
            Rec::decode(r.kind, r.body, clock).map_err(|e| e.to_string())
        })?;
        let message = match decoded {
            Ok(Rec::Message {
                id: found,
                message: Some(message),
                ..
            }) if found == id => message,
            Ok(_) => {
                let why = "another message's record".to_string();
                return Err(LoadError::Mismatch { id, at, why });
            }
            Err(why) => return Err(LoadError::Mismatch { id, at, why }),
        };
        Ok(message)
    }

    /// Write the records of message `id` (chunks of targets); returns
    /// where the first record starts and the total size.
    pub(super) fn put_message(
        &mut self,
        id: u64,
        m: &MessageHead,
        targets: &[Target],
    ) -> Result<(RecordAt, u32), AppendError> {
        self.rec.put_all(&message_records(
            id, m.origin, &m.scope, &m.message, targets,
        ))
    }

    /// Record `m` as message `id`: logged (true), or held for a retry.
    /// While older work waits for room, a new message waits behind it, so
    /// the deliveries held back with it (see [`Held`]) keep their order.
    fn insert_message(&mut self, id: u64, mut m: StoredMessage, targets: &[Target]) -> bool {
        let head = match &m.body {
            Body::Pinned(message) => MessageHead {
                origin: m.origin,
                scope: m.scope.clone(),
                message: message.clone(),
            },
            Body::Logged { .. } => unreachable!("a new message is pinned until written"),
        };
        let written = if self.retry.is_empty() {
            self.put_message(id, &head, targets).ok()
        } else {
            None
        };
        let logged = written.is_some();
        match written {
            Some((at, bytes)) => {
                m.set_logged(at, bytes);
                self.live.live_bytes += u64::from(bytes);
                self.live.track(at.segment, Obj::Message(id));
            }
            None => {
                self.settle.hold_answer(m.origin);
                self.retry.push_back(Retry::Message(id));
            }
        }
        self.messages.insert(id, m);
        logged
    }

    /// Session `key` ended: the deliveries held back for it go, and with
    /// them its part of those messages.
    pub(super) fn drop_held(&mut self, key: SessionKey) {
        let waiting: Vec<u64> = self
            .retry
            .iter()
            .filter_map(|r| match r {
                Retry::Message(id) => Some(*id),
                _ => None,
            })
            .collect();
        for id in waiting {
            let Some(m) = self.messages.get_mut(&id) else {
                continue;
            };
            let before = m.held.len();
            m.held.retain(|h| h.key != key);
            if m.held.len() != before {
                self.message_done(id, key);
            }
        }
    }

    /// Write a retained topic's record (an empty payload deletes it) and
    /// make it the topic's live one.
    pub(super) fn write_retain(
        &mut self,
        message: &Arc<Message>,
        stamp_ms: u64,
        origin: Option<Origin>,
    ) -> Result<(), AppendError> {
        let rec = Rec::Retain {
            message: message.clone(),
            stamp_ms,
            origin,
        };
        let (seg, bytes) = self.rec.put(&rec)?;
        if let Some(old) = self.live.retained.remove(&message.topic) {
            self.live.live_bytes -= u64::from(old.bytes);
        }
        if !message.payload.is_empty() {
            self.live.live_bytes += u64::from(bytes);
            self.live.track(seg, Obj::Retained(message.topic.clone()));
            let meta = RetainedMeta {
                seg,
                bytes,
                stamp_ms,
                origin,
            };
            self.live.retained.insert(message.topic.clone(), meta);
        }
        Ok(())
    }

    /// Write a marker that this shard applied `origin` (serving `scope`).
    pub(super) fn put_marker(&mut self, origin: Origin, scope: Scope) -> Result<(), AppendError> {
        let id = self.next_message_id;
        let rec = Rec::Message {
            id,
            origin: Some(origin),
            scope: scope.clone(),
            message: None,
            targets: Vec::new(),
        };
        let (seg, _) = self.rec.put(&rec)?;
        self.next_message_id += 1;
        self.live
            .proofs
            .entry(seg)
            .or_default()
            .push((origin, scope));
        Ok(())
    }

    /// Write a marker, or when the log is full keep it (and the answer to
    /// its origin) waiting for room.
    pub(super) fn marker_or_retry(&mut self, origin: Origin, scope: Scope) {
        if self.put_marker(origin, scope.clone()).is_err() {
            self.settle.hold_answer(Some(origin));
            self.retry.push_back(Retry::Marker { origin, scope });
        }
    }

    /// Keep a retained topic whose record could not be written for a retry.
    /// One entry per topic (the retry writes the topic's value then): a
    /// newer message takes the older one's place, whose proof is no longer
    /// needed (recovery orders retained messages by their stamps).
    fn retry_retain(&mut self, topic: &Arc<str>, stamp_ms: u64, origin: Option<Origin>) {
        self.settle.hold_answer(origin);
        let queued = self.retry.iter_mut().find_map(|r| match r {
            Retry::Retain {
                topic: t,
                stamp_ms: s,
                origin: o,
            } if t == topic => Some((s, o)),
            _ => None,
        });
        match queued {
            Some((s, o)) => {
                let older = std::mem::replace(o, origin);
                *s = stamp_ms;
                self.settle.release_answer(older);
            }
            None => self.retry.push_back(Retry::Retain {
                topic: topic.clone(),
                stamp_ms,
                origin,
            }),
        }
    }

    /// A restored stored message and the sessions holding it.
    pub(in crate::shard) fn restore_message(
        &mut self,
        id: u64,
        at: RecordAt,
        bytes: u32,
        sessions: SmallVec<[SessionKey; 2]>,
    ) {
        self.live.live_bytes += u64::from(bytes);
        self.live.track(at.segment, Obj::Message(id));
        let m = StoredMessage {
            body: Body::Logged { at },
            origin: None,
            scope: Scope::default(),
            sessions,
            seg: at.segment,
            bytes,
            held: Vec::new(),
        };
        self.messages.insert(id, m);
    }

    /// A session finished with stored message `id`.
    pub(super) fn message_done(&mut self, id: u64, key: SessionKey) {
        let Some(m) = self.messages.get_mut(&id) else {
            return;
        };
        if let Some(i) = m.sessions.iter().position(|k| *k == key) {
            m.sessions.swap_remove(i);
        }
        if !m.sessions.is_empty() {
            return;
        }
        let m = self.messages.remove(&id).expect("present");
        if m.is_logged() {
            self.live.live_bytes -= u64::from(m.bytes);
            if let Some(o) = m.origin {
                // The dead record stays as proof of application.
                self.live
                    .proofs
                    .entry(m.seg)
                    .or_default()
                    .push((o, m.scope));
            }
            return;
        }
        // Never written: the proof still has to be, while the origin is
        // unsettled.
        self.settle.release_answer(m.origin);
        if let Some(o) = m.origin.filter(|&o| self.settle.unsettled(o)) {
            self.marker_or_retry(o, m.scope);
        }
    }
}

impl ShardCore {
    /// Store message `id`'s deliveries (routing gave every target a
    /// distinct session). True when its record is written (or there is no
    /// store); false when it waits for room, and then a delivery not yet
    /// handed to its session must wait with it ([`Self::hold_delivery`]).
    pub(in crate::shard) fn store_message(
        st: &mut State,
        id: u64,
        message: &Arc<Message>,
        origin: Option<Origin>,
        scope: Scope,
        targets: &[StoreTarget],
    ) -> bool {
        let Some(store) = st.store.as_mut() else {
            return true;
        };
        let m = StoredMessage {
            body: Body::Pinned(message.clone()),
            origin,
            scope,
            sessions: targets.iter().map(|t| t.key).collect(),
            seg: 0,
            bytes: 0,
            held: Vec::new(),
        };
        let records: Vec<Target> = targets.iter().map(StoreTarget::queued).collect();
        store.insert_message(id, m, &records)
    }

    /// Keep a delivery of message `id` (waiting for room) out of its
    /// session until the record is written; the retry hands it over.
    pub(in crate::shard) fn hold_delivery(st: &mut State, id: u64, held: Held) {
        if let Some(m) = st.store.as_mut().and_then(|s| s.messages.get_mut(&id)) {
            m.held.push(held);
        }
    }

    /// Record that this shard applied `origin` for `scope` without storing
    /// any delivery (a shared pick served by a clean session, or passed on).
    pub(in crate::shard) fn store_marker(st: &mut State, origin: Origin, scope: Scope) {
        if let Some(store) = st.store.as_mut() {
            store.marker_or_retry(origin, scope);
        }
    }

    /// Store, replace or (empty payload) delete a retained topic's record.
    /// `origin` and `stamp_ms` are the routed message's: recovery uses them
    /// to tell what this shard applied and which retained message is newer.
    pub(in crate::shard) fn durable_retain(
        st: &mut State,
        message: &Arc<Message>,
        origin: Option<Origin>,
        stamp_ms: u64,
    ) {
        let Some(store) = st.store.as_mut() else {
            return;
        };
        if crate::sys::is_sys_topic(&message.topic) {
            return; // this run's figures only
        }
        if store.write_retain(message, stamp_ms, origin).is_err() {
            // The topic's older record no longer says its value.
            if let Some(old) = store.live.retained.remove(&message.topic) {
                store.live.live_bytes -= u64::from(old.bytes);
            }
            store.retry_retain(&message.topic, stamp_ms, origin);
        }
    }

    /// Record a delayed publish (with a QoS 2 publisher's packet id, which
    /// its session now remembers). False when the log could not take a
    /// QoS 1/2 one.
    pub(in crate::shard) fn durable_delay(
        st: &mut State,
        id: u64,
        due: Instant,
        message: &Arc<Message>,
        from: Option<(Sid, u16)>,
    ) -> bool {
        let Some(store) = st.store.as_mut() else {
            return true;
        };
        let rec = Rec::Delayed {
            id,
            due_ms: store.rec.wall_ms(due),
            message: message.clone(),
            from,
        };
        match store.rec.put(&rec) {
            Ok((seg, bytes)) => {
                store.live.live_bytes += u64::from(bytes);
                store.live.track(seg, Obj::Delayed(id));
                store.live.delayed.insert(id, (due, Placed { seg, bytes }));
                true
            }
            Err(_) => message.qos == QoS::AtMostOnce,
        }
    }

    /// A delayed publish waits longer (it could not be sent yet).
    pub(in crate::shard) fn durable_delay_moved(st: &mut State, id: u64, due: Instant) {
        if let Some(d) = st.store.as_mut().and_then(|s| s.live.delayed.get_mut(&id)) {
            d.0 = due;
        }
    }

    /// A delayed publish was sent: its record is dead (the Accepted record
    /// written when it was routed says so; without one, a DelayedDone does).
    pub(in crate::shard) fn durable_delay_done(st: &mut State, id: u64, accepted: bool) {
        let Some(store) = st.store.as_mut() else {
            return;
        };
        if let Some((_, p)) = store.live.delayed.remove(&id) {
            store.live.live_bytes -= u64::from(p.bytes);
        }
        if !accepted {
            store.rec.note(&Rec::DelayedDone { id });
        }
    }
}
