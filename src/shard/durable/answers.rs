//! The Accepted / Applied / Settled protocol between shards.
//!
//! Shard-local. The publisher's shard logs a QoS 1/2 message bound for
//! other shards as Accepted (accept id) before acknowledging it. Each
//! destination records the origin in what it stores and answers
//! `Applied { upto }` (lanes are FIFO, so one number covers every earlier
//! message). When every destination of an accept has answered, it is
//! settled: a Settled record makes that durable, and the frontier is told
//! to every shard so they can drop their proofs of application (markers).
//!
//! ```text
//!  publisher's shard P                     destination shard D
//!  -------------------                     -------------------
//!  PUBLISH (QoS 1/2) in
//!  log Accepted{id, message, scope}
//!  [power-safe: wait for its sync]
//!  PUBACK / PUBREC out
//!  Publish{message, origin (P,id)} ───────▶ deliver; log Message records
//!                                            naming origin (P,id), or a
//!                                            marker when nothing is stored
//!                                          [power-safe: wait for sync]
//!  all of id's destinations answered ◀──── Applied{upto: id}
//!  log Settled{upto}; the accept is dead
//!  Settled{upto} ─────────────────────────▶ proofs of origins ≤ upto may go
//! ```
//!
//! After a crash, recovery takes every Accepted record without a Settled
//! one covering it, and routes its message again with the live fan-out
//! rule (`router::fanout`), skipping each old shard that had recorded the
//! origin (its Message records or marker: it applied the message, for the
//! ordinary subscribers or the shared subscriptions the record's scope
//! names). So a message acknowledged to its publisher reaches every
//! matching persistent session once, even when the crash came between the
//! PUBACK and the last destination's record.

use std::collections::BTreeMap;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::log::AppendError;
use crate::message::Message;
use crate::persist::{Causes, Origin, Rec, Scope, Sid};

use super::super::mesh::MeshMsg;
use super::{Obj, Settle, ShardCore, State, Store};

/// An accepted message not yet applied everywhere.
#[derive(Debug)]
pub(super) struct Accepted {
    pub(super) id: u64,
    pub(super) seg: u64,
    pub(super) bytes: u32,
    pub(super) message: Arc<Message>,
    pub(super) scope: Scope,
    pub(super) stamp_ms: u64,
    pub(super) delayed: Option<u64>,
    pub(super) will_of: Option<Sid>,
    pub(super) passes_on: Option<Origin>,
    /// Shards that must answer `Applied`.
    dests: SmallVec<[u16; 4]>,
}

/// What this shard owes one origin shard in `Applied` answers.
#[derive(Debug, Default)]
pub(super) struct Owed {
    /// Largest accept id of that origin applied here.
    pub(super) applied: u64,
    /// Largest id answered.
    answered: u64,
    /// Accept ids whose effects here are not logged yet (how many pieces
    /// each): answers stop short of the first, so the origin keeps its
    /// record until then.
    pub(super) unlogged: BTreeMap<u64, u32>,
}

impl Owed {
    /// The answer due now, if it moves forward.
    fn due(&self) -> Option<u64> {
        let mut upto = self.applied;
        if let Some((&first, _)) = self.unlogged.first_key_value() {
            upto = upto.min(first - 1);
        }
        (upto > self.answered).then_some(upto)
    }

    /// One more piece of `id` waits to be logged.
    pub(super) fn hold(&mut self, id: u64) {
        *self.unlogged.entry(id).or_insert(0) += 1;
    }

    /// A piece of `id` was logged (or is no longer needed).
    pub(super) fn release(&mut self, id: u64) {
        if let Some(n) = self.unlogged.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.unlogged.remove(&id);
            }
        }
    }
}

impl Settle {
    /// Hold the answers to `origin` until a piece of it is logged.
    pub(super) fn hold_answer(&mut self, origin: Option<Origin>) {
        if let Some(o) = origin {
            self.owed[usize::from(o.shard)].hold(o.id);
        }
    }

    /// A held piece of `origin` was logged.
    pub(super) fn release_answer(&mut self, origin: Option<Origin>) {
        if let Some(o) = origin {
            self.owed[usize::from(o.shard)].release(o.id);
        }
    }

    /// True while `origin` is not known settled: proof that this shard
    /// applied it must stay in the log.
    pub(super) fn unsettled(&self, origin: Origin) -> bool {
        origin.id > self.known_settled[usize::from(origin.shard)]
    }

    /// Where accept `id` is among the unsettled ones (they are in id
    /// order), if it is unsettled.
    pub(super) fn accepted_index(&self, id: u64) -> Option<usize> {
        self.accepted.binary_search_by_key(&id, |a| a.id).ok()
    }

    /// `from`'s settled frontier moved to `upto` (for this shard itself:
    /// its Settled record is durable). Proofs of application up to it are
    /// no longer needed (compaction drops them).
    fn forget_settled(&mut self, from: usize, upto: u64) {
        self.known_settled[from] = self.known_settled[from].max(upto);
    }
}

impl Store {
    /// Advance the settled frontier past every accept all its destinations
    /// answered and whose pieces on this shard are logged (a delivery here
    /// that waits for room keeps its accept unsettled, so recovery routes
    /// it again after a crash).
    fn settle(&mut self) {
        let own_unlogged = &self.settle.owed[usize::from(self.rec.me)].unlogged;
        while let Some(a) = self.settle.accepted.front() {
            let done = a
                .dests
                .iter()
                .all(|d| self.settle.acked_upto[usize::from(*d)] >= a.id)
                && own_unlogged
                    .first_key_value()
                    .is_none_or(|(&f, _)| f > a.id);
            if !done {
                break;
            }
            self.settle.settled_upto = a.id;
            self.live.live_bytes -= u64::from(a.bytes);
            self.settle.accepted.pop_front();
        }
    }
}

impl ShardCore {
    /// Write an Accepted record for a message about to be routed to
    /// `dests` (other shards); returns its origin for the mesh messages.
    pub(in crate::shard) fn accept(
        &self,
        st: &mut State,
        message: &Arc<Message>,
        scope: Scope,
        causes: Causes,
        stamp_ms: u64,
        dests: SmallVec<[u16; 4]>,
    ) -> Result<Origin, AppendError> {
        let store = st.store.as_mut().expect("accepting needs a store");
        let id = store.settle.next_accept_id;
        let rec = Rec::Accepted {
            id,
            scope: scope.clone(),
            message: message.clone(),
            stamp_ms,
            causes,
        };
        let (seg, bytes) = store.rec.put(&rec)?;
        store.settle.next_accept_id += 1;
        store.live.live_bytes += u64::from(bytes);
        store.live.track(seg, Obj::Accepted(id));
        store.settle.accepted.push_back(Accepted {
            id,
            seg,
            bytes,
            message: message.clone(),
            scope,
            stamp_ms,
            delayed: causes.delayed,
            will_of: causes.will_of,
            passes_on: causes.passes_on,
            dests,
        });
        Ok(Origin {
            shard: self.id as u16,
            id,
        })
    }

    /// This shard applied the routed message `origin` (whether or not it
    /// stored anything): answer its origin (batched).
    pub(in crate::shard) fn applied(st: &mut State, origin: Option<Origin>) {
        let (Some(store), Some(o)) = (st.store.as_mut(), origin) else {
            return;
        };
        let owed = &mut store.settle.owed[usize::from(o.shard)];
        owed.applied = owed.applied.max(o.id);
    }

    /// Send the `Applied` answers that are due.
    pub(in crate::shard) fn send_applied(&self, st: &mut State) {
        let Some(store) = st.store.as_mut() else {
            return;
        };
        for origin in 0..store.settle.owed.len() {
            if origin == self.id {
                continue;
            }
            if let Some(upto) = store.settle.owed[origin].due() {
                store.settle.owed[origin].answered = upto;
                store.send_after_sync(&self.mesh, origin, MeshMsg::Applied { upto });
            }
        }
    }

    /// Shard `from` applied every message of ours up to `upto`.
    pub(in crate::shard) fn on_applied(st: &mut State, from: usize, upto: u64) {
        let Some(store) = st.store.as_mut() else {
            return;
        };
        store.settle.acked_upto[from] = store.settle.acked_upto[from].max(upto);
        store.settle();
    }

    /// Another shard's settled frontier: markers of its messages up to it
    /// can go.
    pub(in crate::shard) fn on_settled(st: &mut State, from: usize, upto: u64) {
        if let Some(store) = st.store.as_mut() {
            store.settle.forget_settled(from, upto);
        }
    }

    /// Log the settled frontier, and once that record is durable tell every
    /// shard (and drop this shard's own markers up to it).
    pub(super) fn write_settled(&self, st: &mut State) {
        let Some(store) = st.store.as_mut() else {
            return;
        };
        store.settle();
        if store.settle.settled_upto > store.settle.settled_written {
            let upto = store.settle.settled_upto;
            if store.rec.put(&Rec::Settled { upto }).is_ok() {
                store.settle.settled_written = upto;
                store.settle.settled_written_seq = store.rec.log.next_seq();
            }
        }
        let durable =
            !store.waits_for_gate() || store.gate.synced_next >= store.settle.settled_written_seq;
        if store.settle.settled_written > store.settle.known_settled[self.id] && durable {
            let upto = store.settle.settled_written;
            self.mesh.broadcast(|| MeshMsg::Settled { upto });
            store.settle.forget_settled(self.id, upto);
        }
    }

    /// Another shard's log became full or has room again.
    pub(in crate::shard) fn on_store_full(&self, st: &mut State, from: usize, full: bool) {
        if let Some(store) = st.store.as_mut() {
            store.rec.others_full[from] = full;
            self.limits.status.store_full.set(store.rec.refusing());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;
    use std::sync::Arc;

    use crate::config::Durability;
    use crate::log::tests::{temp_dir, TempDir};
    use crate::log::Log;
    use crate::message::Message;
    use crate::persist::{Causes, Origin, Rec, Scope, WallClock};

    use super::super::{Store, StoreEnv};
    use super::Accepted;

    /// A store on a log of its own, and the log's directory (removed when
    /// the test drops it).
    fn store(name: &str) -> (Store, TempDir) {
        let dir = temp_dir(name);
        let log = Log::create_without_spare(crate::log::disk::fs(), &dir, 1 << 20, 0, 1).unwrap();
        let env = StoreEnv {
            mode: Durability::KillSafe,
            clock: WallClock::now(),
            me: 0,
            shards: 2,
            sync_wake: Rc::default(),
            status: Rc::default(),
            now: std::time::Instant::now(),
        };
        (Store::new(0, 1, log, env), dir)
    }

    /// Accept `id` as the publisher's shard does, bound for `dests`.
    fn accept(s: &mut Store, id: u64, dests: &[u16]) {
        let message = Arc::new(Message {
            topic: Arc::from("t"),
            payload: bytes::Bytes::from_static(b"m"),
            qos: crate::codec::QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
            expires_at: None,
            publisher: None,
            id: 0,
            late: false,
        });
        let rec = Rec::Accepted {
            id,
            scope: Scope::everyone(),
            message: message.clone(),
            stamp_ms: 0,
            causes: Causes::default(),
        };
        let (seg, bytes) = s.rec.put(&rec).unwrap();
        s.live.live_bytes += u64::from(bytes);
        s.settle.accepted.push_back(Accepted {
            id,
            seg,
            bytes,
            message,
            scope: Scope::everyone(),
            stamp_ms: 0,
            delayed: None,
            will_of: None,
            passes_on: None,
            dests: dests.into(),
        });
    }

    #[test]
    fn an_accept_settles_when_every_destination_answered() {
        let (mut s, _dir) = store("settle-answers");
        accept(&mut s, 1, &[1]);
        s.settle();
        assert_eq!(s.settle.settled_upto, 0, "shard 1 has not answered");
        s.settle.acked_upto[1] = 1;
        s.settle();
        assert_eq!(s.settle.settled_upto, 1);
        assert!(s.settle.accepted.is_empty());
    }

    #[test]
    fn a_delivery_on_the_origin_shard_waiting_for_room_keeps_its_accept_unsettled() {
        let (mut s, _dir) = store("settle-own");
        accept(&mut s, 1, &[]);
        accept(&mut s, 2, &[1]);
        s.settle.acked_upto[1] = 2;
        // Accept 1's delivery here could not be logged (the log was full).
        let own = Some(Origin { shard: 0, id: 1 });
        s.settle.hold_answer(own);
        s.settle();
        assert_eq!(
            s.settle.settled_upto, 0,
            "a crash now must route accept 1 again"
        );
        s.settle.release_answer(own);
        s.settle();
        assert_eq!(s.settle.settled_upto, 2);
    }
}
