//! Retained messages for a new subscription, gathered from the shards that
//! own them in bounded chunks.
//!
//! Shard-local code over [`State`]. A subscription to an exact topic asks
//! the topic's owner; a wildcard asks every shard. Each owner answers one
//! chunk at a time: at most [`RETAINED_VISITS_MAX`] nodes of its retained
//! tree walked and at most the subscriber's credit (room in its queue, at
//! most [`RETAINED_CHUNK_MAX`]) messages found, plus the rest of the walk
//! ([`MatchWalk`], owned data that travels with the reply). The
//! subscriber's shard asks for the next chunk only when its session has
//! room again; until then the walk waits in the session's slot. Chunks,
//! whether of this shard's own store or asked for by another, are taken by
//! the gather task, a few per loop turn. So a `#` over a million retained topics, or a SUBSCRIBE with a
//! thousand wildcards, never stalls a shard and never builds more than a
//! queue can take.
//!
//! Live messages for the session wait behind the retained ones while a
//! gather is outstanding (the session holds them, as many as its queue
//! limit; past that they go to its queue at once, in order, rather than be
//! dropped). A session that is offline takes the rest of the retained
//! messages without waiting for room (beyond its queue they are dropped
//! and counted, as any delivery would be).

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use smallvec::SmallVec;

use crate::message::Message;
use crate::persist::Scope;
use crate::router::topic::has_wildcard;
use crate::router::MatchWalk;
use crate::session::{Delivery, SubIds, Subscription};

use super::durable::StoreTarget;
use super::mesh::{MeshMsg, RetainedWaiter};
use super::notify::Notify;
use super::{SessionKey, SessionSlot, ShardCore, State};

/// Retained messages one chunk carries at most.
pub const RETAINED_CHUNK_MAX: usize = 256;

/// Nodes of the retained tree one chunk's walk visits at most (a sparse
/// match visits many nodes per message found).
pub const RETAINED_VISITS_MAX: usize = 4096;

/// The rest of one owner's walk for one subscription.
#[derive(Debug)]
pub(super) struct Gather {
    /// The shard whose retained store is walked.
    pub(super) owner: usize,
    /// The subscription waiting.
    pub(super) waiter: RetainedWaiter,
    /// Where the walk goes on.
    pub(super) walk: Box<MatchWalk>,
}

impl SessionSlot {
    /// Retained messages the session can be sent now: what its queue
    /// takes (a persistent session's stored deliveries page out to the
    /// log; a clean session's do not), less what chunks asked for from
    /// other shards will bring.
    fn available_credit(&self) -> usize {
        self.session
            .retained_credit(RETAINED_CHUNK_MAX, self.durable.is_some())
            .saturating_sub(self.gather_credit_out)
    }
}

impl ShardCore {
    /// Send the retained messages matching a new subscription: from the
    /// owner shard of an exact topic, or from every shard for a wildcard
    /// filter. Each part starts from the gather task.
    pub(super) fn gather_retained(
        &self,
        st: &mut State,
        key: SessionKey,
        filter: &Arc<str>,
        subscription: &Subscription,
    ) {
        let Some(slot) = st.sessions.get(key) else {
            return;
        };
        let waiter = RetainedWaiter {
            shard: self.id,
            session: key,
            session_uid: slot.uid,
            qos: subscription.options.qos,
            subscription_id: subscription.subscription_id,
        };
        let owners: SmallVec<[usize; 8]> = if has_wildcard(filter) {
            (0..self.shards).collect()
        } else {
            SmallVec::from_slice(&[self.topic_owner(filter)])
        };
        for owner in owners {
            if let Some(slot) = st.sessions.get_mut(key) {
                slot.session.begin_retained_gather();
            }
            // Through the gather task, a few chunks per loop turn: a
            // SUBSCRIBE with a thousand wildcards walks nothing here.
            st.gathers.push_back(Gather {
                owner,
                waiter: waiter.clone(),
                walk: Box::new(MatchWalk::new(filter)),
            });
        }
        st.gather_wake.notify();
    }

    /// Another shard asks for the next chunk of a walk over this shard's
    /// retained store: served from the gather task, like this shard's own.
    pub(super) fn on_retained_query(
        st: &mut State,
        waiter: RetainedWaiter,
        walk: Box<MatchWalk>,
        credit: usize,
    ) {
        st.serving.push_back((waiter, walk, credit));
        st.gather_wake.notify();
    }

    /// Serve one chunk asked for by another shard.
    fn serve_chunk(
        &self,
        st: &mut State,
        now: Instant,
        waiter: RetainedWaiter,
        mut walk: Box<MatchWalk>,
        credit: usize,
    ) {
        let messages = Self::retained_chunk(st, now, &mut walk, credit);
        let rest = (!walk.is_done()).then_some(walk);
        let to = waiter.shard;
        let reply = MeshMsg::RetainedReply {
            waiter,
            messages,
            credit,
            rest,
        };
        self.mesh.send(to, reply);
    }

    /// Take the next chunk of `g`: from this shard's store now, or by
    /// asking its owner.
    fn step_gather(&self, st: &mut State, now: Instant, g: Gather) {
        let Some(slot) = st.sessions.get(g.waiter.session) else {
            return;
        };
        if slot.uid != g.waiter.session_uid {
            return;
        }
        let credit = slot.available_credit();
        if credit == 0 {
            // Another chunk took the room meanwhile: wait for it.
            Self::continue_gather(st, g);
            return;
        }
        let Gather {
            owner,
            waiter,
            mut walk,
        } = g;
        if owner != self.id {
            if let Some(slot) = st.sessions.get_mut(waiter.session) {
                slot.gather_credit_out += credit;
            }
            let query = MeshMsg::RetainedQuery {
                waiter,
                walk,
                credit,
            };
            self.mesh.send(owner, query);
            return;
        }
        let messages = Self::retained_chunk(st, now, &mut walk, credit);
        let rest = (!walk.is_done()).then(|| Gather {
            owner,
            waiter: waiter.clone(),
            walk,
        });
        Self::deliver_retained(st, now, &waiter, &messages, 0, rest);
    }

    /// The next chunk of `walk` over this shard's retained store: at most
    /// `credit` messages (at least one), after at most
    /// [`RETAINED_VISITS_MAX`] nodes. Expired messages met on the way are
    /// dropped from the store.
    pub(super) fn retained_chunk(
        st: &mut State,
        now: Instant,
        walk: &mut MatchWalk,
        credit: usize,
    ) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        let mut expired: Vec<Box<str>> = Vec::new();
        let found_max = credit.clamp(1, RETAINED_CHUNK_MAX);
        st.retained
            .walk(walk, RETAINED_VISITS_MAX, found_max, |topic, k| {
                if k.message.is_expired(now) {
                    expired.push(topic.into());
                } else {
                    out.push(k.message.clone());
                }
            });
        for topic in expired {
            Self::remove_retained(st, &topic);
        }
        out
    }

    /// A chunk of retained messages for a new subscription, asked for with
    /// `granted` credit from another shard (0: from this one), and the
    /// rest of its walk (`None`: this owner is done, which ends one
    /// gather).
    pub(super) fn deliver_retained(
        st: &mut State,
        now: Instant,
        waiter: &RetainedWaiter,
        messages: &[Arc<Message>],
        granted: usize,
        rest: Option<Gather>,
    ) {
        let Some(slot) = st.sessions.get_mut(waiter.session) else {
            return;
        };
        if slot.uid != waiter.session_uid {
            return;
        }
        slot.gather_credit_out = slot.gather_credit_out.saturating_sub(granted);
        let subscription_ids: SubIds = waiter.subscription_id.into_iter().collect();
        for m in messages {
            let readable = st.sessions.get(waiter.session);
            if !readable.is_some_and(|s| s.session.may_read(&m.topic)) {
                continue;
            }
            let qos = waiter.qos.min(m.qos);
            let sid = Self::storable(st, waiter.session, qos);
            let id = sid.and_then(|_| Self::next_message_id(st));
            let delivery = Delivery {
                qos: waiter.qos,
                retain: true,
                subscription_ids: subscription_ids.clone(),
                stored: id,
            };
            if let Some(slot) = st.sessions.get_mut(waiter.session) {
                slot.session.deliver_retained(now, m, delivery);
            }
            if let (Some(id), Some(sid)) = (id, sid) {
                let target = StoreTarget {
                    key: waiter.session,
                    sid,
                    qos,
                    retain: true,
                    subscription_ids: subscription_ids.clone(),
                };
                // A retained delivery is handed over even when its record
                // must wait for room: recovery does not replay retained
                // messages, so a crash before the record loses this copy
                // (never acknowledged to anyone) and repeats nothing.
                Self::store_message(st, id, m, None, Scope::default(), &[target]);
            }
        }
        match rest {
            Some(g) => Self::continue_gather(st, g),
            None => {
                if let Some(slot) = st.sessions.get_mut(waiter.session) {
                    slot.session.end_retained_gather(now);
                }
            }
        }
        Self::after_step(st, waiter.session, now);
    }

    /// Go on with `g` from the gather task, or park it in its session's
    /// slot until the session has room.
    fn continue_gather(st: &mut State, g: Gather) {
        let Some(slot) = st.sessions.get_mut(g.waiter.session) else {
            return;
        };
        if slot.available_credit() == 0 {
            slot.parked_gathers.push(g);
        } else {
            st.gathers.push_back(g);
            st.gather_wake.notify();
        }
    }

    /// Session `key` has room again: its parked gathers go on.
    pub(super) fn resume_gathers(st: &mut State, key: SessionKey) {
        let Some(slot) = st.sessions.get_mut(key) else {
            return;
        };
        if slot.parked_gathers.is_empty() || slot.available_credit() == 0 {
            return;
        }
        st.gathers.extend(slot.parked_gathers.drain(..));
        st.gather_wake.notify();
    }

    /// The gather task's work: serve the chunks other shards asked for and
    /// step this shard's gathers, at most `max` chunks; true when more are
    /// waiting.
    pub fn run_gathers(&self, now: Instant, max: usize) -> bool {
        let mut st = self.state.borrow_mut();
        for _ in 0..max {
            if let Some((waiter, walk, credit)) = st.serving.pop_front() {
                self.serve_chunk(&mut st, now, waiter, walk, credit);
            } else if let Some(g) = st.gathers.pop_front() {
                self.step_gather(&mut st, now, g);
            } else {
                return false;
            }
        }
        !(st.serving.is_empty() && st.gathers.is_empty())
    }

    /// What wakes the gather task.
    pub fn gather_wake(&self) -> Rc<Notify> {
        self.state.borrow().gather_wake.clone()
    }
}
