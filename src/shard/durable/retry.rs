//! Work that could not be logged because the log was full, written when it
//! has room again.
//!
//! Shard-local. Each entry holds back the `Applied` answer to its origin
//! (see `answers`), so the origin keeps its Accepted record meanwhile and a
//! crash before the retry loses nothing: recovery routes it again.

use std::sync::Arc;
use std::time::Instant;

use crate::hash::HashMap;

use super::routed::Forward;
use crate::codec::QoS;
use crate::message::Message;
use crate::persist::{Origin, Scope};

use super::compaction::gather_targets;
use super::{Obj, ShardCore, State};

/// One piece of work waiting for room in the log.
#[derive(Debug)]
pub(in crate::shard) enum Retry {
    /// A stored message whose record could not be written: write it with
    /// its deliveries' current state.
    Message(u64),
    /// A marker (proof of application) that could not be written.
    Marker { origin: Origin, scope: Scope },
    /// A retained topic whose record could not be written: write its
    /// current value.
    Retain {
        topic: Arc<str>,
        stamp_ms: u64,
        origin: Option<Origin>,
    },
    /// A shared-subscription message to pass on, whose Accepted record
    /// could not be written.
    Forward(Forward),
}

impl ShardCore {
    /// Queue a shared-subscription forward that could not be logged.
    pub(in crate::shard) fn retry_forward(st: &mut State, forward: Forward) {
        let Some(store) = st.store.as_mut() else {
            return;
        };
        store.settle.hold_answer(forward.parent);
        store.retry.push_back(Retry::Forward(forward));
    }

    /// Write what waited for room, in order, until the log refuses again.
    pub(super) fn retry_unlogged(&self, st: &mut State, now: Instant) {
        loop {
            let Some(next) = st.store.as_mut().and_then(|s| s.retry.pop_front()) else {
                return;
            };
            if let Err(back) = self.retry_one(st, next, now) {
                st.store.as_mut().expect("a store").retry.push_front(back);
                return;
            }
        }
    }

    /// Try one entry; `Err` gives it back when the log still has no room.
    fn retry_one(&self, st: &mut State, r: Retry, now: Instant) -> Result<(), Retry> {
        match r {
            Retry::Message(id) => {
                let pending = st
                    .store
                    .as_ref()
                    .and_then(|s| s.messages.get(&id))
                    .is_some_and(|m| !m.is_logged());
                if !pending {
                    return Ok(());
                }
                let mut targets = HashMap::default();
                targets.insert(id, Vec::new());
                gather_targets(st, &mut targets);
                let store = st.store.as_mut().expect("a store");
                let head = store
                    .message_head(id)
                    .expect("a pinned message is in memory");
                let targets = targets.remove(&id).unwrap_or_default();
                let (at, bytes) = store
                    .put_message(id, &head, &targets)
                    .map_err(|_| Retry::Message(id))?;
                let m = store.messages.get_mut(&id).expect("checked");
                m.set_logged(at, bytes);
                let origin = m.origin;
                let held = std::mem::take(&mut m.held);
                store.live.live_bytes += u64::from(bytes);
                store.live.track(at.segment, Obj::Message(id));
                store.settle.release_answer(origin);
                // The deliveries that waited for the record go to their
                // sessions now, in the order they were routed.
                for h in held {
                    if st.sessions.get(h.key).is_some_and(|s| s.uid == h.uid)
                        && Self::hand_over(st, h.key, now, &head.message, h.delivery)
                    {
                        Self::after_step(st, h.key, now);
                    }
                }
                Ok(())
            }
            Retry::Marker { origin, scope } => {
                let store = st.store.as_mut().expect("a store");
                if store.settle.unsettled(origin) {
                    store
                        .put_marker(origin, scope.clone())
                        .map_err(|_| Retry::Marker {
                            origin,
                            scope: scope.clone(),
                        })?;
                }
                store.settle.release_answer(Some(origin));
                Ok(())
            }
            Retry::Retain {
                topic,
                stamp_ms,
                origin,
            } => {
                let kept = st.retained.get(&topic).map(|k| k.message.clone());
                let message = kept.unwrap_or_else(|| {
                    Arc::new(Message {
                        topic: topic.clone(),
                        payload: bytes::Bytes::new(),
                        qos: QoS::AtMostOnce,
                        retain: true,
                        properties: Default::default(),
                        expires_at: None,
                        publisher: None,
                        id: 0,
                        late: false,
                    })
                });
                let store = st.store.as_mut().expect("a store");
                if store.write_retain(&message, stamp_ms, origin).is_err() {
                    return Err(Retry::Retain {
                        topic,
                        stamp_ms,
                        origin,
                    });
                }
                store.settle.release_answer(origin);
                Ok(())
            }
            Retry::Forward(forward) => {
                if self.forward_logged(st, now, &forward).is_err() {
                    return Err(Retry::Forward(forward));
                }
                st.store
                    .as_mut()
                    .expect("a store")
                    .settle
                    .release_answer(forward.parent);
                Ok(())
            }
        }
    }
}
