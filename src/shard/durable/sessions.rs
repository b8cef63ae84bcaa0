//! What a shard logs of its persistent sessions: the whole state once, then
//! each change (connection, subscriptions, journal of stored deliveries).
//!
//! Shard-local.

use std::time::Instant;

use crate::log::AppendError;
use crate::persist::record::{session_records, SessionRec};
use crate::persist::{Rec, Sid};
use crate::session::{Journal, Session, Subscription};

use super::{DurableSlot, Obj, SessionKey, ShardCore, State, Store};

/// Messages read back for one session per input at most (a few batches,
/// when what is read back keeps expiring). Past it, the next input to the
/// session (an acknowledgement, a PINGREQ within the keep-alive, a
/// routed message) reads on.
const PAGE_IN_READS_MAX: usize = 1024;

impl Store {
    /// The marks a session's log holds after its Session record, written
    /// again after each rewrite of it: a whole move in (`Rec::MovedIn`)
    /// and the birth its client was told of (`Rec::Told`).
    pub(super) fn note_marks(&mut self, slot: &super::super::SessionSlot, sid: Sid) {
        for mark in slot.marks().records(sid) {
            self.rec.note(&mark);
        }
    }

    /// Write a session's whole state as sid `sid` (a Session record, then
    /// Subscribe records for what does not fit one). All or none: when the
    /// log has no spare segment and the current one cannot take them all,
    /// nothing is written (a shorter Session record would replace a
    /// complete older one at replay). Returns the first record's segment
    /// and the total size.
    pub(super) fn put_session(
        &mut self,
        sid: Sid,
        session: &Session,
    ) -> Result<(u64, u32), AppendError> {
        let s = session.durable_state();
        let rec = SessionRec {
            sid,
            client_id: session.client_id().to_string(),
            expiry_s: s.expiry_s,
            offline_since_ms: s.offline_since.map(|t| self.rec.clock.to_ms(t)),
            subscriptions: s.subscriptions,
            qos2_in: s.qos2_in,
            will: s.will,
            will_due_ms: s.will_due.map(|t| self.rec.clock.to_ms(t)),
        };
        let recs = session_records(rec, self.rec.log.segment_bytes() / 8);
        if !self.rec.log.has_spare() {
            let need: usize = recs
                .iter()
                .map(|r| self.rec.writer.size(&self.rec.clock, r) as usize)
                .sum();
            if need > self.rec.log.current_room() {
                return Err(AppendError::Full);
            }
        }
        self.rec
            .put_all(&recs)
            .map(|(at, bytes)| (at.segment, bytes))
    }
}

impl ShardCore {
    /// A connection attached: a persistent session writes its whole state
    /// the first time, an Online record after. True when the session got
    /// its place in the log now (it became persistent).
    pub(in crate::shard) fn durable_connect(st: &mut State, key: SessionKey) -> bool {
        let (Some(store), Some(slot)) = (st.store.as_mut(), st.sessions.get_mut(key)) else {
            return false;
        };
        match slot.durable {
            Some(d) => {
                let state = slot.session.lifetime();
                store.rec.note(&Rec::Online {
                    sid: d.sid,
                    expiry_s: state.expiry_s,
                    will: state.will.map(Box::new),
                });
                false
            }
            None if slot.session.lifetime().expiry_s > 0 => {
                Self::durable_whole(st, key);
                Self::durable_sid(st, key).is_some()
            }
            None => false,
        }
    }

    /// Write session `key`'s whole state for the first time (a new
    /// persistent session, or one taken over from a dead node).
    pub(in crate::shard) fn durable_whole(st: &mut State, key: SessionKey) {
        let (Some(store), Some(slot)) = (st.store.as_mut(), st.sessions.get_mut(key)) else {
            return;
        };
        let sid = store.next_sid;
        match store.put_session(sid, &slot.session) {
            Ok((seg, bytes)) => {
                store.next_sid += 1;
                store.live.live_bytes += u64::from(bytes);
                store.live.track(seg, Obj::Session(key, slot.uid));
                slot.durable = Some(DurableSlot { sid, seg, bytes });
                store.note_marks(slot, sid);
            }
            Err(_) => log::warn!(
                "client {}: session not persisted (the log is full)",
                crate::text::quote(slot.session.client_id())
            ),
        }
    }

    /// Session `key`'s birth as its client was told about it changed
    /// (`SessionSlot::born`; 0 when it took that of a copy never told):
    /// its log says so, so that a copy taken over from it knows which
    /// copies its client knew of (`adopt`).
    pub(in crate::shard) fn durable_told(st: &mut State, key: SessionKey) {
        let Some(slot) = st.sessions.get(key) else {
            return;
        };
        let (Some(store), Some(d)) = (st.store.as_mut(), slot.durable) else {
            return;
        };
        let born = slot.marks().told;
        store.rec.note(&Rec::Told { sid: d.sid, born });
    }

    /// Every part of a session moving here came (the move answered
    /// `claim`): its log says so after what the parts brought, so that a
    /// copy of the log holding this record holds the whole move.
    pub(in crate::shard) fn durable_moved_in(st: &mut State, key: SessionKey, claim: u64) {
        let Some(slot) = st.sessions.get_mut(key) else {
            return;
        };
        slot.moved_in = slot.moved_in.max(claim);
        let (Some(store), Some(d)) = (st.store.as_mut(), slot.durable) else {
            return;
        };
        store.rec.note(&Rec::MovedIn { sid: d.sid, claim });
    }

    /// A subscription of a persistent session changed (`None`: removed).
    pub(in crate::shard) fn durable_subscription(
        st: &mut State,
        key: SessionKey,
        filter: &str,
        sub: Option<&Subscription>,
    ) {
        let (Some(store), Some(slot)) = (st.store.as_mut(), st.sessions.get(key)) else {
            return;
        };
        let Some(d) = slot.durable else {
            return;
        };
        let filter = filter.to_string();
        let rec = match sub {
            Some(sub) => Rec::Subscribe {
                sid: d.sid,
                filter,
                sub: sub.clone(),
            },
            None => Rec::Unsubscribe { sid: d.sid, filter },
        };
        store.rec.note(&rec);
    }

    /// The connection of a persistent session ended.
    pub(in crate::shard) fn durable_offline(st: &mut State, key: SessionKey) {
        let (Some(store), Some(slot)) = (st.store.as_mut(), st.sessions.get(key)) else {
            return;
        };
        let Some(d) = slot.durable else {
            return;
        };
        let state = slot.session.lifetime();
        let at = state.offline_since.unwrap_or_else(Instant::now);
        let rec = Rec::Offline {
            sid: d.sid,
            at_ms: store.rec.wall_ms(at),
            expiry_s: state.expiry_s,
            will_due_ms: state.will_due.map(|t| store.rec.wall_ms(t)),
        };
        store.rec.note(&rec);
    }

    /// A persistent session ended: everything it held goes.
    pub(in crate::shard) fn durable_end(st: &mut State, key: SessionKey) {
        let (Some(store), Some(slot)) = (st.store.as_mut(), st.sessions.get(key)) else {
            return;
        };
        let Some(d) = slot.durable else {
            return;
        };
        store.rec.note(&Rec::SessionEnd { sid: d.sid });
        store.live.live_bytes -= u64::from(d.bytes);
        let mut ids = Vec::new();
        slot.session.stored_deliveries(|s| ids.push(s.id));
        for id in ids {
            store.message_done(id, key);
        }
        store.drop_held(key);
    }

    /// Read back deliveries session `key` paged out to the log, when it
    /// is ready for them (see [`crate::session::Session::wants_page_in`]).
    /// Again while it still is: what was read back may have expired and
    /// been dropped at once, leaving a paged-out message at the front that
    /// no later input would read back (an idle client then waited for
    /// acknowledged messages for good; found by the simulator).
    pub(in crate::shard) fn page_in(st: &mut State, key: SessionKey, now: Instant) {
        let (Some(slot), Some(store)) = (st.sessions.get_mut(key), st.store.as_mut()) else {
            return;
        };
        let mut read = 0;
        while slot.session.wants_page_in() && read < PAGE_IN_READS_MAX {
            let mut load = |id| {
                read += 1;
                store.load(id).map_err(|e| e.to_string())
            };
            slot.session.page_in(now, &mut load);
        }
    }

    /// Write what the session's journal reports.
    pub(in crate::shard) fn drain_journal(st: &mut State, key: SessionKey) {
        let Some(slot) = st.sessions.get_mut(key) else {
            return;
        };
        let (Some(store), Some(d)) = (st.store.as_mut(), slot.durable) else {
            while slot.session.poll_journal().is_some() {}
            return;
        };
        let sid = d.sid;
        while let Some(j) = slot.session.poll_journal() {
            match j {
                Journal::Sent { id, packet_id } => {
                    store.rec.note(&Rec::Sent { sid, id, packet_id })
                }
                Journal::Released { id } => store.rec.note(&Rec::Released { sid, id }),
                Journal::Done { id } => {
                    store.rec.note(&Rec::Done { sid, id });
                    store.message_done(id, key);
                }
                Journal::Qos2Done { packet_id } => {
                    store.rec.note(&Rec::Qos2Done { sid, packet_id })
                }
            }
        }
    }

    /// The will of session `key` went out without its Accepted record (the
    /// log was full): record that the session no longer has one.
    pub(in crate::shard) fn durable_will_done(st: &mut State, key: Option<SessionKey>) {
        let sid = key.and_then(|k| Self::durable_sid(st, k));
        if let (Some(store), Some(sid)) = (st.store.as_mut(), sid) {
            store.rec.note(&Rec::WillDone { sid });
        }
    }
}
