//! What durability does with routing's decisions: the Accepted record of a
//! message leaving its publisher's shard, the stored deliveries and the
//! proof of application on a shard that delivers it, and the log entry of
//! a shared-subscription message passed on.
//!
//! Shard-local. Routing decides who gets a message ([`Plan`], [`Local`])
//! and calls these only when there is something a log could keep: never
//! for a plain QoS 0 publish. Without a log (memory mode) each of them is a
//! no-op that passes the decision through.

use std::sync::Arc;
use std::time::Instant;

use smallvec::SmallVec;

use crate::codec::QoS;
use crate::log::AppendError;
use crate::message::Message;
use crate::persist::{Causes, Origin, Scope, Sid};
use crate::router::SharedPick;
use crate::session::Delivery;

use super::super::mesh::MeshMsg;
use super::super::routing::{shared_forward, unstored, Local, Plan, Source};
use super::super::SessionKey;
use super::{Held, ShardCore, State, StoreTarget};

/// A shared-subscription message passed on to another shard for one
/// shared subscription.
#[derive(Debug)]
pub(in crate::shard) struct Forward {
    pub(in crate::shard) message: Arc<Message>,
    pub(in crate::shard) pick: SharedPick,
    /// Shards visited, the one it goes to included.
    pub(in crate::shard) hops: u8,
    pub(in crate::shard) to: u16,
    /// The accept whose pick it serves, if it has one.
    pub(in crate::shard) parent: Option<Origin>,
}

/// What durability did with a message leaving its publisher's shard.
#[derive(Debug, Clone, Copy, Default)]
pub(in crate::shard) struct Logged {
    /// Its Accepted record, when one was written: every shard that applies
    /// it answers this origin.
    pub(in crate::shard) origin: Option<Origin>,
    /// When it was accepted, on the log's wall clock (0 without a log):
    /// orders retained messages against messages routed again.
    pub(in crate::shard) stamp_ms: u64,
}

impl ShardCore {
    /// Log a message as Accepted when a crash could otherwise lose or
    /// repeat it: a QoS 1/2 message that goes to other shards' persistent
    /// sessions, shared subscriptions or retained store ([`Plan::kept_by`]), a
    /// persistent session's QoS 2 publish, a delayed publish leaving, or a
    /// will (of any QoS: the record also says the session's will is gone).
    /// While the log is full, or its fan-out could fill it, every QoS 1/2
    /// message is accepted first: a delivery here may then have to wait
    /// for room, and its accept stays unsettled until it is logged.
    pub(in crate::shard) fn durable_accept(
        &self,
        st: &mut State,
        now: Instant,
        message: &Arc<Message>,
        source: Source,
        plan: &Plan,
    ) -> Result<Logged, AppendError> {
        let durable_sid = |key: Option<SessionKey>| Self::durable_sid(st, key?);
        let will_of = durable_sid(source.will_of);
        let Some(store) = st.store.as_ref() else {
            return Ok(Logged::default());
        };
        let stamp_ms = store.wall_ms(now);
        let none = Logged {
            origin: None,
            stamp_ms,
        };
        if message.qos == QoS::AtMostOnce && will_of.is_none() {
            return Ok(none);
        }
        let full = store.must_accept_first(message);
        let dests = plan.kept_by(self.id as u16);
        let causes = Causes {
            qos2_from: source
                .qos2_packet_id
                .and_then(|pid| Some((durable_sid(source.from)?, pid))),
            delayed: source.delayed,
            will_of,
            passes_on: None,
        };
        if dests.is_empty() && causes == Causes::default() && !full {
            return Ok(none);
        }
        let origin = self.accept(st, message, plan.scope(message), causes, stamp_ms, dests)?;
        Ok(Logged {
            origin: Some(origin),
            stamp_ms,
        })
    }

    /// Store the deliveries of `local` to persistent sessions at QoS 1/2
    /// in Message records (written before their journals, so Sent records
    /// follow them), one record per message id; a session that is a target
    /// twice (an ordinary and a shared subscription) gets a second id.
    /// With an origin and shared subscriptions served but nothing stored, a
    /// marker records that this shard applied it; an origin on another
    /// shard is answered. Returns the deliveries to hand over now: first
    /// those that need no record, then the stored ones whose records are
    /// written. A stored delivery whose record waits for room waits with
    /// it, out of its session (see [`Held`]).
    pub(in crate::shard) fn durable_deliver(
        &self,
        st: &mut State,
        message: &Arc<Message>,
        origin: Option<Origin>,
        local: Local,
    ) -> SmallVec<[(SessionKey, Delivery); 8]> {
        if st.store.is_none() {
            return local.targets.into_iter().map(unstored).collect();
        }
        let Local {
            targets,
            distinct,
            scope,
        } = local;
        let mut now: SmallVec<[(SessionKey, Delivery); 8]> = SmallVec::new();
        // (message id, its deliveries); each session at most once per id.
        let mut groups: SmallVec<[(u64, Vec<StoreTarget>); 1]> = SmallVec::new();
        let mut stored: SmallVec<[(SessionKey, Sid, Delivery); 4]> = SmallVec::new();
        for (i, t) in targets.into_iter().enumerate() {
            let Some(sid) = Self::storable(st, t.session, t.qos) else {
                now.push(unstored(t));
                continue;
            };
            let target = StoreTarget {
                key: t.session,
                sid,
                qos: t.qos, // the fan-out lowered it to the message's
                retain: t.retain,
                subscription_ids: t.subscription_ids.clone(),
            };
            let free = if i < distinct {
                groups.first_mut()
            } else {
                groups
                    .iter_mut()
                    .find(|(_, g)| g.iter().all(|x| x.key != t.session))
            };
            let id = match free {
                Some((id, g)) => {
                    g.push(target);
                    *id
                }
                None => {
                    let id = Self::next_message_id(st).expect("a store");
                    groups.push((id, vec![target]));
                    id
                }
            };
            let (key, mut delivery) = unstored(t);
            delivery.stored = Some(id);
            stored.push((key, sid, delivery));
        }
        if let Some(o) = origin.filter(|_| groups.is_empty() && !scope.shared.is_empty()) {
            Self::store_marker(st, o, scope.clone());
        }
        let mut waiting: SmallVec<[u64; 1]> = SmallVec::new();
        for (id, group) in &groups {
            if !Self::store_message(st, *id, message, origin, scope.clone(), group) {
                waiting.push(*id);
            }
        }
        for (key, sid, delivery) in stored {
            match delivery.stored.filter(|id| waiting.contains(id)) {
                Some(id) => {
                    let Some(uid) = st.sessions.get(key).map(|s| s.uid) else {
                        continue;
                    };
                    let held = Held {
                        key,
                        uid,
                        sid,
                        delivery,
                    };
                    Self::hold_delivery(st, id, held);
                }
                None => now.push((key, delivery)),
            }
        }
        if origin.is_some_and(|o| usize::from(o.shard) != self.id) {
            Self::applied(st, origin);
        }
        now
    }

    /// Pass a shared-subscription message on to shard `to`: with a log,
    /// accepted here first (this shard answers for it from now on), or,
    /// when the log cannot take that record, queued for room with the
    /// origin's answer held back.
    pub(in crate::shard) fn durable_forward(&self, st: &mut State, now: Instant, f: Forward) {
        if st.store.is_none() {
            let msg = shared_forward(&f.message, &f.pick, f.hops, f.parent, now);
            return self.mesh.send(usize::from(f.to), msg);
        }
        if self.forward_logged(st, now, &f).is_err() {
            Self::retry_forward(st, f);
        }
    }

    /// Accept a shared-subscription message passed on to shard `to` (this
    /// shard answers for it from now on) and send it.
    ///
    /// The forward answers for the pick of `parent` from now on. Its
    /// Accepted record says so itself (`Causes::passes_on`): a proof
    /// written apart from it could be cut off by a power cut, and recovery
    /// would serve the pick again from the parent while routing the
    /// forward, so the group would get it twice (found by the simulator,
    /// once for a marker behind a full log, once for a torn log). A marker
    /// follows, as the proof that outlives the Accepted record once it
    /// settles.
    pub(in crate::shard) fn forward_logged(
        &self,
        st: &mut State,
        now: Instant,
        f: &Forward,
    ) -> Result<(), AppendError> {
        let (message, pick, to, parent) = (&f.message, &f.pick, f.to, f.parent);
        let scope = Scope {
            ordinary: false,
            shared: SmallVec::from_buf([pick.clone()]),
            ..Scope::default()
        };
        let stamp_ms = st.store.as_ref().map_or(0, |s| s.wall_ms(now));
        let dests = SmallVec::from_slice(&[to]);
        let causes = Causes {
            passes_on: parent,
            ..Causes::default()
        };
        let origin = self.accept(st, message, scope.clone(), causes, stamp_ms, dests)?;
        let forward = shared_forward(message, pick, f.hops, Some(origin), now);
        self.send_routed(st, usize::from(to), forward, Some(origin));
        if let Some(parent) = parent {
            Self::store_marker(st, parent, scope);
        }
        Ok(())
    }

    /// Send a routed message to another shard. In power-safe mode one that
    /// names an origin waits until the origin's Accepted record is synced:
    /// it must not be applied anywhere before it is durable here.
    pub(in crate::shard) fn send_routed(
        &self,
        st: &mut State,
        to: usize,
        msg: MeshMsg,
        origin: Option<Origin>,
    ) {
        match (st.store.as_mut(), origin) {
            (Some(store), Some(_)) => store.send_after_sync(&self.mesh, to, msg),
            // Behind what waits for that shard: a lane keeps its
            // messages' order (a later message overtaking one held here
            // would raise a moving session's marks past it).
            (Some(store), None) => store.send_behind(&self.mesh, to, msg),
            _ => self.mesh.send(to, msg),
        }
    }
}
