//! Starting a shard from what recovery read back: its sessions (offline),
//! their stored deliveries, retained messages, delayed publishes, its route
//! replica, and the log it goes on writing.
//!
//! Shard-local; runs once, before the shard listens.

use std::sync::Arc;
use std::time::Instant;

use crate::hash::HashMap;

use crate::persist::recover::ShardStart;
use crate::persist::WallClock;
use crate::session::Session;

use super::durable::{DurableSlot, Store, StoreEnv};
use super::routing::route_keys_of;
use super::{SessionSlot, ShardCore};
use crate::router::split_shared;

impl ShardCore {
    /// Take over `start` (this shard's part of recovery) and `routes`
    /// (every shard's subscriptions, for the route replica); `now` is the
    /// shard's clock reading at the start.
    pub fn restore(
        &self,
        start: ShardStart,
        routes: &[(usize, String)],
        clock: WallClock,
        now: Instant,
    ) {
        let mut st = self.state.borrow_mut();
        let ShardStart {
            log,
            sessions,
            messages,
            retained,
            delayed,
            next_sid,
            next_message_id,
            next_delayed_id,
        } = start;
        let env = StoreEnv {
            mode: self.config.durability(),
            clock,
            me: self.id,
            shards: self.shards,
            sync_wake: self.sync_wake.clone(),
            status: self.limits.status.clone(),
            now,
        };
        let mut log = log;
        log.set_segments_max(self.config.log_segments_max(self.shards));
        let mut store = Store::new(next_sid, next_message_id, log, env);
        // Every recovered session is persistent (`route_keys_of`).
        for (shard, filter) in routes {
            let (group, inner) = split_shared(filter);
            for key in route_keys_of(*shard, group, Arc::from(inner), true) {
                st.routes.insert(inner, key, ());
            }
        }
        let mut keys = HashMap::default();
        for s in sessions {
            st.last_session_uid += 1;
            let uid = st.last_session_uid;
            let session = Session::restore(s.client_id.clone(), self.limits.clone(), s.restored);
            let subscriptions: Vec<_> = session
                .subscriptions()
                .iter()
                .map(|(f, sub)| (f.clone(), sub.clone()))
                .collect();
            let durable = DurableSlot {
                sid: s.sid,
                seg: s.seg,
                bytes: s.bytes,
            };
            let mut slot = SessionSlot::new(session, uid, Some(durable));
            slot.will_of_last_run = slot.session.will_now().is_some();
            // What its log said of it, written again after it
            // (`Store::note_marks` keeps them through compaction).
            slot.set_marks(s.marks);
            let key = st.sessions.insert(slot);
            st.by_client.insert(s.client_id, key);
            store.live.restore_session(key, uid, s.seg, s.bytes);
            keys.insert(s.sid, key);
            // The route replica came whole from recovery: only this
            // shard's counts of its own routes are rebuilt here.
            for (filter, subscription) in subscriptions {
                let (group, inner, _) =
                    Self::insert_subscriber(&mut st, key, &filter, subscription);
                for route in route_keys_of(self.id, group, inner.clone(), true) {
                    *st.local_routes.entry((inner.clone(), route)).or_insert(0) += 1;
                }
            }
        }
        for m in messages {
            let holders = m
                .sids
                .iter()
                .filter_map(|sid| keys.get(sid).copied())
                .collect();
            store.restore_message(m.id, m.at, m.bytes, holders);
        }
        for r in retained {
            store
                .live
                .restore_retained(r.message.topic.clone(), r.seg, r.bytes, r.stamp_ms);
            let topic = r.message.topic.clone();
            Self::insert_retained(&mut st, &topic, r.message, r.stamp_ms);
        }
        for d in delayed {
            let due = clock.to_instant(d.due_ms);
            store.live.restore_delayed(d.id, due, d.seg, d.bytes);
            Self::hold_delayed(&mut st, due, d.id, d.message);
        }
        st.next_delayed_id = next_delayed_id;
        st.store = Some(store);
        let restored: Vec<_> = keys.values().copied().collect();
        for key in restored {
            Self::after_step(&mut st, key, now);
        }
        self.send_due_delayed(&mut st, now);
    }
}
