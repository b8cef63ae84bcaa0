//! Checks of the store's bookkeeping against the shard's sessions, part of
//! `ShardCore::check_invariants` (debug builds and the simulator run it
//! after every input).
//!
//! Shard-local. What compaction and recovery rely on: `live_bytes` is the
//! sum of the live objects' record sizes; every live object is tracked at
//! the segment of its whole record; a message not yet logged waits in the
//! retry queue; accept ids rise; and the store and the sessions agree on
//! which stored message each session still holds (a paged-out delivery
//! included, and one held back until its record is written).

use crate::session::StoredDelivery;

use super::super::State;
use super::retry::Retry;
use super::{Obj, SessionKey};

/// How much the checks walk: sessions and stored messages.
pub(in crate::shard) fn size(st: &State) -> usize {
    st.sessions.len() + st.store.as_ref().map_or(0, |s| s.messages.len())
}

/// Check the store of `st`, if it has one; panics on a broken invariant.
pub(in crate::shard) fn check(st: &State) {
    let Some(store) = st.store.as_ref() else {
        return;
    };
    let tracked =
        |seg: u64, obj: &Obj| store.live.by_seg.get(&seg).is_some_and(|o| o.contains(obj));
    let mut live = 0u64;
    for (id, m) in &store.messages {
        if m.is_logged() {
            live += u64::from(m.bytes);
            if m.seg >= store.rec.log.oldest_index() {
                assert!(
                    tracked(m.seg, &Obj::Message(*id)),
                    "stored message {id} is tracked at its segment {}",
                    m.seg
                );
            }
        } else {
            assert!(
                store
                    .retry
                    .iter()
                    .any(|r| matches!(r, Retry::Message(x) if x == id)),
                "stored message {id}, not logged, waits for a retry"
            );
        }
        assert!(
            m.held.is_empty() || !m.is_logged(),
            "stored message {id} holds deliveries back only until it is logged"
        );
    }
    for meta in store.live.retained.values() {
        live += u64::from(meta.bytes);
    }
    for (_, placed) in store.live.delayed.values() {
        live += u64::from(placed.bytes);
    }
    let mut last_accept = 0;
    for a in &store.settle.accepted {
        live += u64::from(a.bytes);
        assert!(a.id > last_accept, "accept ids rise");
        last_accept = a.id;
    }
    // Which session holds which stored message, as the sessions say.
    let mut held: Vec<(u64, SessionKey)> = Vec::new();
    for (key, slot) in st.sessions.iter() {
        let Some(d) = slot.durable else {
            continue;
        };
        live += u64::from(d.bytes);
        slot.session.stored_deliveries(|s: StoredDelivery| {
            held.push((s.id, key));
        });
    }
    for (id, m) in &store.messages {
        for h in &m.held {
            let slot = st
                .sessions
                .get(h.key)
                .filter(|s| s.uid == h.uid)
                .unwrap_or_else(|| panic!("message {id} holds a delivery back for a live session"));
            assert_eq!(
                slot.durable.map(|d| d.sid),
                Some(h.sid),
                "message {id} holds a delivery back under its session's sid"
            );
            held.push((*id, h.key));
        }
    }
    assert_eq!(
        live, store.live.live_bytes,
        "live bytes are the live objects' sum"
    );
    held.sort_unstable();
    for (id, key) in &held {
        let m = store
            .messages
            .get(id)
            .unwrap_or_else(|| panic!("a session holds stored message {id}, which the store has"));
        assert!(
            m.sessions.contains(key),
            "stored message {id} lists every session holding it"
        );
    }
    for (id, m) in &store.messages {
        for key in &m.sessions {
            assert!(
                held.binary_search(&(*id, *key)).is_ok(),
                "stored message {id} names only sessions that hold it"
            );
        }
    }
}
