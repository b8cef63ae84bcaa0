//! Power-safe mode: the sync gate. What waits for records to be synced
//! (session output, closing connections' last packets, mesh messages, the
//! deletion of compacted segments), and what is released when they are.
//!
//! Shard-local, no I/O: [`ShardCore::poll_sync`] names the files to sync
//! and the sequence number they make durable; the runtime's group-commit
//! task (`runtime::sync`) syncs them and calls [`ShardCore::synced`].

use std::path::PathBuf;
use std::rc::Rc;

use super::super::ConnHandle;
use super::compaction::remove_segments;
use super::{SessionKey, ShardCore, State, Store};

impl ShardCore {
    /// The files to sync now and the sequence number every record below
    /// will be durable at once they are; None when nothing waits.
    pub fn poll_sync(&self) -> Option<(u64, Vec<PathBuf>)> {
        Self::begin_sync(&mut self.state.borrow_mut())
    }

    /// Wait until records wait for a sync (the runtime's group-commit task).
    pub async fn sync_wanted(&self) {
        self.sync_wake.wait().await
    }

    /// True when records wait for a sync already (the group-commit task
    /// has not taken them yet).
    pub fn sync_pending(&self) -> bool {
        self.sync_wake.is_set()
    }

    /// Power-safe: the sequence number this shard's log must be synced to
    /// for what it holds now to be durable; None when it is already (or
    /// in any other mode).
    pub fn log_unsynced_upto(&self) -> Option<u64> {
        self.state.borrow().store.as_ref()?.unsynced_upto()
    }

    /// Every record below this sequence number is durable (power-safe).
    pub fn log_synced_next(&self) -> u64 {
        let st = self.state.borrow();
        st.store.as_ref().map_or(0, |s| s.gate.synced_next)
    }

    /// Ask for a sync again (one that could not be done is retried).
    pub fn want_sync(&self) {
        self.sync_wake.notify();
    }

    /// The sync [`ShardCore::poll_sync`] asked for is done: release what
    /// waited for records below `synced_next`.
    pub fn synced(&self, synced_next: u64) {
        let mut st = self.state.borrow_mut();
        self.sync_done(&mut st, synced_next);
        Self::debug_invariants(&st);
    }

    /// Count a group commit: `sync` spent in `fdatasync`, `commit` from
    /// the first record waiting to the sync done.
    pub fn record_sync(&self, sync: std::time::Duration, commit: std::time::Duration) {
        let mut latency = self.latency.borrow_mut();
        super::super::latency::record(&mut latency.log_sync, sync);
        super::super::latency::record(&mut latency.log_commit, commit);
    }

    /// The sync could not start (a file would not open): its files are
    /// synced with the next one; what waits stays held.
    pub fn sync_failed(&self, paths: Vec<PathBuf>) {
        if let Some(store) = self.state.borrow_mut().store.as_mut() {
            // A peer's log copy goes back to its own list while the copy
            // lives (one started anew since took its files with it: its
            // answers are void, and a file gone must not stop every sync).
            let (own, copies): (Vec<PathBuf>, Vec<PathBuf>) =
                (paths.into_iter()).partition(|p| p.starts_with(store.rec.log.dir()));
            let live = store.replication.live_copy_files(copies);
            store.replication.copy_dirty.extend(live);
            store.rec.log.mark_dirty(own);
        }
    }

    /// Start a sync: the files to sync and the sequence number all records
    /// below will be durable after it. None when nothing waits.
    fn begin_sync(st: &mut State) -> Option<(u64, Vec<PathBuf>)> {
        let store = st.store.as_mut()?;
        let next = store.rec.log.next_seq();
        let copies = &mut store.replication;
        if next <= store.gate.local_next
            && store.gate.pending_removal.is_none()
            && copies.copy_dirty.is_empty()
        {
            return None;
        }
        let mut paths = store.rec.log.take_dirty();
        if !copies.copy_dirty.is_empty() {
            // Peers' log copies written since the last sync: the answers
            // held for them go once this sync is done.
            copies.copy_syncs_begun += 1;
            paths.append(&mut copies.copy_dirty);
            paths.sort_unstable();
            paths.dedup();
        }
        Some((next, paths))
    }

    /// Records below `synced_next` are synced: release what that makes
    /// durable.
    fn sync_done(&self, st: &mut State, synced_next: u64) {
        if let Some(store) = st.store.as_mut() {
            store.gate.local_next = store.gate.local_next.max(synced_next);
            let copies = &mut store.replication;
            if copies.copy_syncs_done < copies.copy_syncs_begun {
                copies.copy_syncs_done = copies.copy_syncs_begun;
                // The bridge sends the answers that waited for it.
                if let Some(r) = st.remote.as_ref() {
                    r.wake.notify();
                }
            }
        }
        self.release_gate(st);
    }

    /// Release held output and answers up to what is durable now (synced,
    /// held by the standbys), delete compacted segments whose copies are
    /// durable.
    pub(in crate::shard) fn release_gate(&self, st: &mut State) {
        let Some(store) = st.store.as_mut() else {
            return;
        };
        let durable = store.durable_next();
        let removal_due = (store.gate.pending_removal).is_some_and(|(seq, _)| seq <= durable);
        if durable <= store.gate.synced_next && !removal_due {
            return;
        }
        store.gate.synced_next = store.gate.synced_next.max(durable);
        let synced = store.gate.synced_next;
        if let Some((seq, victim)) = store.gate.pending_removal {
            if seq <= synced {
                store.gate.pending_removal = None;
                remove_segments(store, victim);
            }
        }
        let mut later = Vec::new();
        for (seq, to, msg) in std::mem::take(&mut store.gate.after_sync) {
            if seq <= synced {
                if let Some(n) = store.gate.waiting_for.get_mut(to) {
                    *n -= 1;
                }
                self.mesh.send(to, msg);
            } else {
                later.push((seq, to, msg));
            }
        }
        store.gate.after_sync = later;
        // (Pushed in sequence order: those due lead.)
        let frames = &mut store.gate.frames_after_sync;
        let due = frames.iter().take_while(|(seq, _)| *seq <= synced).count();
        if let (true, Some(r)) = (due > 0, st.remote.as_mut()) {
            r.out.extend(frames.drain(..due).map(|(_, out)| out));
        }
        for c in std::mem::take(&mut store.gate.closing_waiters) {
            c.wake.notify();
        }
        // The bridge confirms to peers what a sync made durable.
        if let Some(r) = st.remote.as_ref() {
            r.wake.notify();
        }
        for (key, conn_id) in std::mem::take(&mut store.gate.sync_waiters) {
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

    /// Power-safe: hold the session's output until what was written so far
    /// is synced.
    pub(in crate::shard) fn hold_for_sync(st: &mut State, key: SessionKey) {
        let Some(seq) = st.store.as_ref().and_then(Store::unsynced_upto) else {
            return;
        };
        if let Some(slot) = st.sessions.get_mut(key) {
            slot.wait_seq = slot.wait_seq.max(seq);
        }
    }

    /// Power-safe: the sequence number a closing connection's last packets
    /// must wait for (0: none).
    pub(in crate::shard) fn close_wait_seq(st: &State, key: SessionKey) -> u64 {
        let unsynced = st.store.as_ref().and_then(Store::unsynced_upto);
        let held = st.sessions.get(key).map_or(0, |s| s.wait_seq);
        unsynced.unwrap_or(0).max(held)
    }

    /// True when the session's output must wait for a sync; the writer is
    /// then woken once it is done.
    pub(in crate::shard) fn output_waits_for_sync(
        st: &mut State,
        key: SessionKey,
        conn_id: u64,
    ) -> bool {
        let Some(store) = st.store.as_mut() else {
            return false;
        };
        let Some(slot) = st.sessions.get(key) else {
            return false;
        };
        if slot.wait_seq <= store.gate.synced_next {
            return false;
        }
        store.gate.sync_waiters.push((key, conn_id));
        true
    }

    /// True when a closing connection's last packets
    /// ([`ConnHandle::poll_last_packets`]) must wait for a sync (it is
    /// woken once it is done): they may acknowledge what is not synced yet.
    pub fn closing_waits_for_sync(&self, conn: &Rc<ConnHandle>) -> bool {
        let mut st = self.state.borrow_mut();
        let Some(store) = st.store.as_mut() else {
            return false;
        };
        if conn
            .close_wait_seq()
            .is_none_or(|seq| seq <= store.gate.synced_next)
        {
            return false;
        }
        store.gate.closing_waiters.push(conn.clone());
        true
    }
}
