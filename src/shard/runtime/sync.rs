//! Power-safe mode: the group-commit task.
//!
//! Shard-local. The task syncs the segment files the core names
//! ([`ShardCore::poll_sync`]) with io_uring `fdatasync` (glommio), then
//! tells the core ([`ShardCore::synced`]), which releases what waited for
//! those records. It decides nothing about what waits.

use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::io::BufferedFile;

use crate::config::Durability;

use super::super::ShardCore;

/// The group-commit task: whenever records wait, wait up to
/// `storage.sync_interval_ms` for more, sync, release what waited.
pub(super) async fn sync_loop(shard: Rc<ShardCore>) {
    let gather = Duration::from_millis(shard.config().storage.sync_interval_ms);
    let mut files = HashMap::new();
    let mut last_taken = Instant::now();
    loop {
        // Records written during the last sync have waited since it took
        // its own, at most: the commit histogram counts from then (an upper
        // bound), not from when this task gets to them.
        let pending = shard.sync_pending();
        shard.sync_wanted().await;
        let wanted = if pending { last_taken } else { Instant::now() };
        if !gather.is_zero() {
            glommio::timer::sleep(gather).await;
        }
        last_taken = Instant::now();
        if !sync_once(&shard, &mut files, wanted).await {
            // Try again shortly; the records stay unacknowledged.
            glommio::timer::sleep(Duration::from_millis(100)).await;
            shard.want_sync();
        }
    }
}

/// Sync what is written now (at a clean stop; a no-op in kill-safe mode).
pub(super) async fn sync_now(shard: &ShardCore) {
    if shard.config().durability() == Durability::PowerSafe {
        sync_once(shard, &mut HashMap::new(), Instant::now()).await;
    }
}

/// One sync of the records that waited since `wanted`. A file that
/// cannot be opened is tried again later (its records stay
/// unacknowledged); a failed `fdatasync` stops the process.
async fn sync_once(
    shard: &ShardCore,
    files: &mut HashMap<PathBuf, BufferedFile>,
    wanted: Instant,
) -> bool {
    let Some((target, paths)) = shard.poll_sync() else {
        return true;
    };
    let mut synced = Duration::ZERO;
    files.retain(|p, _| paths.contains(p));
    for path in &paths {
        if !files.contains_key(path) {
            match BufferedFile::open(path).await {
                Ok(f) => {
                    files.insert(path.clone(), f);
                }
                Err(e) => {
                    let (id, path) = (shard.id(), path.display());
                    log::error!("shard {id}: cannot open {path} to sync it: {e}");
                    shard.sync_failed(paths);
                    return false;
                }
            }
        }
        let started = Instant::now();
        let result = files[path].fdatasync().await;
        synced += started.elapsed();
        // A peer's log copy can be started anew under the same path (a
        // new file): opened again at each sync, never kept.
        if shard.is_log_copy(path) {
            files.remove(path);
        }
        if let Err(e) = result {
            // After a failed fdatasync the kernel may have dropped the
            // dirty pages, and a second one can succeed without them:
            // nothing acknowledged since the last sync can be trusted.
            // Stop, so a restart reads back what the disk really holds.
            log::error!(
                "shard {}: fdatasync of {} failed: {e}; stopping: power_safe cannot \
                 acknowledge what it cannot sync",
                shard.id(),
                path.display()
            );
            std::process::abort();
        }
    }
    shard.synced(target);
    shard.record_sync(synced, wanted.elapsed());
    true
}
