//! Compaction: rewrite the oldest segment's live objects at the head of
//! the log and delete the segment, so the log's size follows its live data.
//!
//! Shard-local, run from the shard's tick. A rewrite is a whole record of
//! the object's current state, which replay takes over earlier records of
//! the same object; deltas older than it that survive in later segments
//! are then already part of it (replay skips or merges them).

use std::time::Instant;

use crate::hash::HashMap;

use crate::persist::{Causes, Rec, Target, TargetState};
use crate::session::StoredDelivery;

use super::super::slab::Slab;
use super::super::SessionSlot;
use super::{DurableSlot, Obj, Room, SessionKey, ShardCore, State, Store};

/// Of the current segment's room, what compaction leaves unused while the
/// log is full: the bookkeeping of messages already taken (acks, session
/// changes) goes on there until the compacted segment is deleted and a
/// spare can be made. A fraction of a segment (1/8): bookkeeping records
/// are tens of bytes, and a reserve of half a segment could leave no room
/// to compact at all once the current segment passed its half.
const FULL_RESERVE_DIVISOR: usize = 8;

/// How one compaction went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compacted {
    /// The oldest segment's live objects were rewritten; it is deleted
    /// (or will be, once the copies are synced).
    Done,
    /// The log is full and the current segment cannot take the live
    /// objects yet: tried again next tick (acks make them fewer).
    NoRoom,
    /// A rewrite failed midway: not tried again until a spare segment
    /// can be made.
    Failed,
}

impl ShardCore {
    /// Compact while the log holds more than twice its live bytes plus a
    /// segment (a few segments per tick at most).
    pub(super) fn compact(&self, st: &mut State) {
        for _ in 0..4 {
            let Some(store) = st.store.as_mut() else {
                return;
            };
            let limit = store.live.live_bytes * 2 + store.rec.log.body_max_bytes() as u64;
            if matches!(
                store.rec.room,
                Room::Full {
                    compaction_stuck: true
                }
            ) || store.gate.pending_removal.is_some()
                || store.rec.log.sealed_count() == 0
                || store.rec.log.used_bytes() <= limit
            {
                return;
            }
            store.rec.compacting = true;
            let done = self.compact_oldest(st);
            let store = st.store.as_mut().expect("checked above");
            store.rec.compacting = false;
            match done {
                Compacted::Done => store.rec.compactions += 1,
                Compacted::NoRoom => return,
                Compacted::Failed => {
                    if let Room::Full { compaction_stuck } = &mut store.rec.room {
                        *compaction_stuck = true;
                    }
                    return;
                }
            }
        }
    }

    /// Compact the oldest sealed segment.
    fn compact_oldest(&self, st: &mut State) -> Compacted {
        let store = st.store.as_ref().expect("checked by the caller");
        let victim = store.rec.log.oldest_index();
        let objs: Vec<Obj> = store
            .live
            .by_seg
            .range(..=victim)
            .flat_map(|(_, v)| v.iter().cloned())
            .collect();
        let proofs: Vec<(crate::persist::Origin, crate::persist::Scope)> = store
            .live
            .proofs
            .range(..=victim)
            .flat_map(|(_, v)| v.iter().cloned())
            .filter(|(o, _)| store.settle.unsettled(*o))
            .collect();
        if store.rec.room.is_full() {
            // Only what fits beside the room kept for bookkeeping.
            let markers = proofs.len() as u64 * 64;
            let need: u64 = objs.iter().map(|o| live_size(st, o, victim)).sum::<u64>() + markers;
            let room = store
                .rec
                .log
                .current_room()
                .saturating_sub(store.rec.log.segment_bytes() / FULL_RESERVE_DIVISOR);
            if need > room as u64 {
                return Compacted::NoRoom;
            }
        }
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
                    Some(k) => rewrite_retained(store, &k.message, victim),
                    None => true,
                },
                Obj::Delayed(id) => {
                    let due = store.live.delayed.get(&id).map(|d| d.0);
                    match due.and_then(|due| Some((due, delayed.get(&(due, id))?.clone()))) {
                        Some((due, m)) => rewrite_delayed(store, id, due, m, victim),
                        None => true,
                    }
                }
                Obj::Accepted(id) => rewrite_accepted(store, id, victim),
            };
            if !ok {
                return Compacted::Failed;
            }
        }
        for (origin, scope) in proofs {
            if store.put_marker(origin, scope).is_err() {
                return Compacted::Failed;
            }
        }
        store.live.by_seg = store.live.by_seg.split_off(&(victim + 1));
        store.live.proofs = store.live.proofs.split_off(&(victim + 1));
        if store.waits_for_gate() {
            // The rewritten copies must be durable (synced, and held by
            // the standbys) before the originals go.
            store.gate.pending_removal = Some((store.rec.log.next_seq(), victim));
            store.rec.sync_wake.notify();
            return Compacted::Done;
        }
        if remove_segments(store, victim) {
            Compacted::Done
        } else {
            Compacted::Failed
        }
    }
}

/// Delete the segments up to `victim`.
pub(super) fn remove_segments(store: &mut Store, victim: u64) -> bool {
    match store.rec.log.remove_through(victim) {
        Ok(()) => true,
        Err(e) => {
            log::error!(
                "shard {}: cannot delete compacted segments: {e}",
                store.rec.me
            );
            false
        }
    }
}

/// Bytes a session's mark takes at most when compaction writes it again
/// (a record of a sid and a stamp, with its header).
pub(super) const MARK_BYTES: u32 = 40;

/// Bytes a live object of the victim segment takes when rewritten.
fn live_size(st: &State, obj: &Obj, victim: u64) -> u64 {
    let store = st.store.as_ref().expect("a store");
    let bytes = match obj {
        Obj::Session(key, uid) => (st.sessions.get(*key))
            .filter(|s| s.uid == *uid)
            .and_then(|s| {
                let d = s.durable.filter(|d| d.seg <= victim)?;
                // With its marks (`Store::note_marks`).
                let marks = s.marks().records(d.sid).count() as u32;
                Some(d.bytes + marks * MARK_BYTES)
            }),
        Obj::Message(id) => store
            .messages
            .get(id)
            .filter(|m| m.seg <= victim)
            .map(|m| m.bytes),
        Obj::Retained(t) => store
            .live
            .retained
            .get(t)
            .filter(|m| m.seg <= victim)
            .map(|m| m.bytes),
        Obj::Delayed(id) => store
            .live
            .delayed
            .get(id)
            .filter(|d| d.1.seg <= victim)
            .map(|d| d.1.bytes),
        Obj::Accepted(id) => store
            .settle
            .accepted_index(*id)
            .map(|i| &store.settle.accepted[i])
            .filter(|a| a.seg <= victim)
            .map(|a| a.bytes),
    };
    u64::from(bytes.unwrap_or(0))
}

/// Collect the current delivery states of the messages in `ids` from the
/// sessions holding them (one pass over each such session).
pub(super) fn gather_targets(st: &State, ids: &mut HashMap<u64, Vec<Target>>) {
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
    for (id, targets) in ids.iter_mut() {
        let held = store.messages.get(id).map_or(&[][..], |m| &m.held[..]);
        targets.extend(held.iter().map(|h| Target {
            sid: h.sid,
            qos: h.delivery.qos,
            retain: h.delivery.retain,
            subscription_ids: h.delivery.subscription_ids.clone(),
            state: TargetState::Queued,
        }));
    }
    for key in keys {
        let Some(slot) = st.sessions.get(key) else {
            continue;
        };
        let Some(d) = slot.durable else {
            continue;
        };
        slot.session.stored_deliveries(|s: StoredDelivery| {
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

fn rewrite_session(
    store: &mut Store,
    sessions: &mut Slab<SessionSlot>,
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
    match store.put_session(d.sid, &slot.session) {
        Ok((seg, bytes)) => {
            // Its marks go with it (after its rewrite, as after the
            // records they follow).
            store.note_marks(slot, d.sid);
            store.live.live_bytes = store.live.live_bytes - u64::from(d.bytes) + u64::from(bytes);
            store.live.track(seg, Obj::Session(key, uid));
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

fn rewrite_message(store: &mut Store, id: u64, targets: Vec<Target>, victim: u64) -> bool {
    let Some(m) = store
        .messages
        .get(&id)
        .filter(|m| m.seg <= victim && m.is_logged())
    else {
        return true;
    };
    let old = m.bytes;
    let head = match store.message_head(id) {
        Ok(head) => head,
        Err(e) => {
            // Its sessions find it unreadable too when they come to it:
            // each counts and logs the loss then.
            log::error!(
                "shard {}: compaction cannot copy a stored message: {e}",
                store.rec.me
            );
            return true;
        }
    };
    let Ok((at, bytes)) = store.put_message(id, &head, &targets) else {
        return false;
    };
    store.live.live_bytes = store.live.live_bytes - u64::from(old) + u64::from(bytes);
    store.live.track(at.segment, Obj::Message(id));
    let m = store.messages.get_mut(&id).expect("present");
    m.set_logged(at, bytes);
    true
}

fn rewrite_retained(
    store: &mut Store,
    message: &std::sync::Arc<crate::message::Message>,
    victim: u64,
) -> bool {
    let Some(meta) = store
        .live
        .retained
        .get(&message.topic)
        .copied()
        .filter(|m| m.seg <= victim)
    else {
        return true;
    };
    let rec = Rec::Retain {
        message: message.clone(),
        stamp_ms: meta.stamp_ms,
        origin: meta.origin,
    };
    let Ok((seg, bytes)) = store.rec.put(&rec) else {
        return false;
    };
    store.live.live_bytes = store.live.live_bytes - u64::from(meta.bytes) + u64::from(bytes);
    store.live.track(seg, Obj::Retained(message.topic.clone()));
    let m = store
        .live
        .retained
        .get_mut(&message.topic)
        .expect("present");
    m.seg = seg;
    m.bytes = bytes;
    true
}

fn rewrite_delayed(
    store: &mut Store,
    id: u64,
    due: Instant,
    message: std::sync::Arc<crate::message::Message>,
    victim: u64,
) -> bool {
    let Some(old) = store
        .live
        .delayed
        .get(&id)
        .map(|d| d.1)
        .filter(|p| p.seg <= victim)
    else {
        return true;
    };
    // The publisher's QoS 2 packet id is in its session's own record now.
    let rec = Rec::Delayed {
        id,
        due_ms: store.rec.clock.to_ms(due),
        message,
        from: None,
    };
    let Ok((seg, bytes)) = store.rec.put(&rec) else {
        return false;
    };
    store.live.live_bytes = store.live.live_bytes - u64::from(old.bytes) + u64::from(bytes);
    store.live.track(seg, Obj::Delayed(id));
    let p = &mut store.live.delayed.get_mut(&id).expect("present").1;
    p.seg = seg;
    p.bytes = bytes;
    true
}

fn rewrite_accepted(store: &mut Store, id: u64, victim: u64) -> bool {
    let Some(i) = store.settle.accepted_index(id) else {
        return true;
    };
    let a = &store.settle.accepted[i];
    if a.seg > victim {
        return true;
    }
    // The QoS 2 packet id stays out: it lives in the publisher's session
    // record (written after the original), and may be released by now;
    // repeating it would bring a released id back.
    let rec = Rec::Accepted {
        id,
        scope: a.scope.clone(),
        message: a.message.clone(),
        stamp_ms: a.stamp_ms,
        causes: Causes {
            qos2_from: None,
            delayed: a.delayed,
            will_of: a.will_of,
            passes_on: a.passes_on,
        },
    };
    let old = a.bytes;
    let Ok((seg, bytes)) = store.rec.put(&rec) else {
        return false;
    };
    store.live.live_bytes = store.live.live_bytes - u64::from(old) + u64::from(bytes);
    store.live.track(seg, Obj::Accepted(id));
    let a = &mut store.settle.accepted[i];
    a.seg = seg;
    a.bytes = bytes;
    true
}

#[cfg(test)]
mod tests {
    use super::MARK_BYTES;
    use crate::persist::{Rec, WallClock, Writer};

    #[test]
    fn a_session_s_marks_fit_the_room_compaction_counts_for_them() {
        let (mut w, clock) = (Writer::default(), WallClock::now());
        let (sid, stamp) = (u64::MAX, u64::MAX);
        let moved = w.size(&clock, &Rec::MovedIn { sid, claim: stamp });
        let told = w.size(&clock, &Rec::Told { sid, born: stamp });
        assert!(moved <= MARK_BYTES && told <= MARK_BYTES, "{moved}, {told}");
    }
}
