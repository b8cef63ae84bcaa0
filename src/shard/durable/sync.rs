//! Power-safe mode: the group-commit task, and everything that waits for
//! it (session output, closing connections' last packets, mesh messages,
//! the deletion of compacted segments).
//!
//! Shard-local. The task syncs the segment files written since the last
//! sync with io_uring `fdatasync` (glommio), then releases what waited for
//! records below the sequence number it synced up to.

use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use glommio::io::BufferedFile;

use crate::config::Durability;

use super::super::ConnHandle;
use super::compaction::remove_segments;
use super::{SessionKey, Shard, State, Store};

impl Shard {
    /// The group-commit task: whenever records wait, wait up to
    /// `storage.sync_interval_ms` for more, sync, release what waited.
    pub async fn sync_loop(self: Rc<Self>) {
        let gather = Duration::from_millis(self.config.storage.sync_interval_ms);
        let mut files = HashMap::new();
        loop {
            self.sync_wake.wait().await;
            if !gather.is_zero() {
                glommio::timer::sleep(gather).await;
            }
            if !self.sync_once(&mut files).await {
                // Try again shortly; the records stay unacknowledged.
                glommio::timer::sleep(Duration::from_millis(100)).await;
                self.sync_wake.notify();
            }
        }
    }

    /// Sync what is written now (at a clean stop; a no-op in kill-safe mode).
    pub async fn sync_now(&self) {
        if self.config.durability() == Durability::PowerSafe {
            self.sync_once(&mut HashMap::new()).await;
        }
    }

    /// One sync. A file that cannot be opened is tried again later (its
    /// records stay unacknowledged); a failed `fdatasync` stops the process.
    async fn sync_once(&self, files: &mut HashMap<PathBuf, BufferedFile>) -> bool {
        let Some((target, paths)) = Self::begin_sync(&mut self.state.borrow_mut()) else {
            return true;
        };
        files.retain(|p, _| paths.contains(p));
        for path in &paths {
            if !files.contains_key(path) {
                match BufferedFile::open(path).await {
                    Ok(f) => {
                        files.insert(path.clone(), f);
                    }
                    Err(e) => {
                        let (id, path) = (self.id, path.display());
                        log::error!("shard {id}: cannot open {path} to sync it: {e}");
                        if let Some(store) = self.state.borrow_mut().store.as_mut() {
                            store.log.mark_dirty(paths);
                        }
                        return false;
                    }
                }
            }
            if let Err(e) = files[path].fdatasync().await {
                // After a failed fdatasync the kernel may have dropped the
                // dirty pages, and a second one can succeed without them:
                // nothing acknowledged since the last sync can be trusted.
                // Stop, so a restart reads back what the disk really holds.
                log::error!(
                    "shard {}: fdatasync of {} failed: {e}; stopping: power_safe cannot \
                     acknowledge what it cannot sync",
                    self.id,
                    path.display()
                );
                std::process::abort();
            }
        }
        self.sync_done(&mut self.state.borrow_mut(), target);
        true
    }

    /// Start a sync: the files to sync and the sequence number all records
    /// below will be durable after it. None when nothing waits.
    fn begin_sync(st: &mut State) -> Option<(u64, Vec<PathBuf>)> {
        let store = st.store.as_mut()?;
        let next = store.log.next_seq();
        if next <= store.synced_next && store.pending_removal.is_none() {
            return None;
        }
        Some((next, store.log.take_dirty()))
    }

    /// Records below `synced_next` are durable: release held output and
    /// answers, delete compacted segments whose copies are now durable.
    fn sync_done(&self, st: &mut State, synced_next: u64) {
        let Some(store) = st.store.as_mut() else {
            return;
        };
        store.synced_next = store.synced_next.max(synced_next);
        let synced = store.synced_next;
        if let Some((seq, victim)) = store.pending_removal {
            if seq <= synced {
                store.pending_removal = None;
                remove_segments(store, victim);
            }
        }
        let mut later = Vec::new();
        for (seq, to, msg) in std::mem::take(&mut store.after_sync) {
            if seq <= synced {
                self.mesh.send(to, msg);
            } else {
                later.push((seq, to, msg));
            }
        }
        store.after_sync = later;
        for c in std::mem::take(&mut store.closing_waiters) {
            c.wake.notify();
        }
        for (key, conn_id) in std::mem::take(&mut store.sync_waiters) {
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
        if slot.wait_seq <= store.synced_next {
            return false;
        }
        store.sync_waiters.push((key, conn_id));
        true
    }

    /// True when a closing connection's last packets must wait for a sync
    /// (it is woken once it is done).
    pub(in crate::shard) fn closing_waits_for_sync(&self, conn: &Rc<ConnHandle>) -> bool {
        let mut st = self.state.borrow_mut();
        let Some(store) = st.store.as_mut() else {
            return false;
        };
        if conn
            .close_wait_seq()
            .is_none_or(|seq| seq <= store.synced_next)
        {
            return false;
        }
        store.closing_waiters.push(conn.clone());
        true
    }
}
