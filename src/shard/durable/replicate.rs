//! Cluster mode with a log: this shard's log copied to its standby nodes
//! before what it holds is acknowledged, and the copies this shard keeps
//! for other nodes' shards.
//!
//! Shard-local, no I/O but the copies' files. The bridge names the
//! standbys (`cluster.replicas - 1` nodes, [`ShardCore::set_standbys`]),
//! carries [`Frame::LogChunk`]s to them ([`ShardCore::poll_log_chunk`])
//! and brings their answers back ([`ShardCore::log_have`]). What is
//! acknowledged waits for the copies through the same gate as power-safe
//! mode's syncs (`sync`): session output, messages to other shards that
//! name an origin, `Applied` answers, peers' confirmations and the word
//! that a session moved here is whole ([`Frame::SessionStored`],
//! `orphans`) are held until every standby holds the records written
//! before them, whole. A
//! standby that holds nothing new for [`REPLICA_WAIT`] stops being waited
//! for (logged, counted) until it catches up again; a node with no
//! standby up waits for none.
//!
//! The other way, this shard keeps copies of its peers' shards' logs
//! ([`ShardCore::take_log_chunk`]) under
//! `storage.data_dir/replicas/node-NAME/run-R/` (R: the peer's run, its
//! incarnation), laid out like a data directory (`gen-N/shard-I/`,
//! `CURRENT` once the copy of shard 0 is whole, when the copies of the
//! peer's earlier runs go), so a broker started on it recovers that
//! node's sessions and messages, and so does adoption (`adopt`) when that
//! run is declared down.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::frame::Frame;
use crate::log::ship::{Chunk, Have, Replica, ReplicaError, Shipper};

use super::{ShardCore, State, Store};

/// How long acknowledgements wait for a standby that takes nothing new:
/// then they go without it until it catches up.
pub const REPLICA_WAIT: Duration = Duration::from_secs(10);

/// Bytes of records per [`Frame::LogChunk`] at most (one larger record
/// goes alone), and less than a peer's largest frame
/// (`frame_bytes_max`) by room for the frame's own fields.
pub fn chunk_bytes(frame_bytes_max: usize) -> usize {
    (256 << 10).min(frame_bytes_max.saturating_sub(1024)).max(1)
}

/// Bytes of records sent to one standby and not yet answered.
pub const WINDOW_BYTES: usize = 4 << 20;

/// A standby this shard's log goes to.
#[derive(Debug)]
pub(in crate::shard) struct Standby {
    /// The node (the bridge's index).
    node: u16,
    ship: Shipper,
    /// Sequence numbers the log reached, and when (one a tick at most):
    /// the oldest the standby does not hold says how long it is behind.
    marks: VecDeque<(u64, Instant)>,
    /// Waited for since the log reached this sequence number (what came
    /// before may have been acknowledged without it); None: not waited
    /// for (new and catching up, behind for [`REPLICA_WAIT`], or
    /// refusing).
    waited_from: Option<u64>,
}

/// A copy of a peer shard's log kept here.
#[derive(Debug)]
pub(in crate::shard) struct Copy {
    node: Arc<str>,
    run: u64,
    shard: u16,
    replica: Replica,
    current_written: bool,
    /// Whether the last chunk said the copy holds what its owner
    /// acknowledged (waited for, or at the log's head); None before the
    /// first. Marked on disk by a [`BEHIND`] file while not.
    adoptable: Option<bool>,
}

/// The file in a copy's shard directory while the copy may lack records
/// its owner acknowledged (it was not waited for, and is catching up): a
/// node does not take over a dead peer's sessions from such a copy.
pub const BEHIND: &str = "BEHIND";

/// The replication side of a shard's store.
#[derive(Debug, Default)]
pub(in crate::shard) struct Replication {
    pub(in crate::shard) standbys: Vec<Standby>,
    copies: Vec<Copy>,
    /// Times a standby stopped being waited for.
    pub(in crate::shard) given_up: u64,
    /// Chunks refused from peers (bad records), and copies started anew.
    pub(in crate::shard) chunks_refused: u64,
    pub(in crate::shard) copies_started: u64,
    /// Power-safe: copy files written since the last sync began, and the
    /// syncs begun and done that took such files (an answer waits for
    /// the sync after the one running when it was made).
    pub(in crate::shard) copy_dirty: Vec<PathBuf>,
    pub(in crate::shard) copy_syncs_begun: u64,
    pub(in crate::shard) copy_syncs_done: u64,
}

/// What replication counted, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicationStats {
    /// Standbys this shard's log goes to, and of those, the ones waited
    /// for.
    pub standbys: usize,
    /// Of those, waited for.
    pub standbys_waited: usize,
    /// Records of this shard's log not yet held by the slowest standby
    /// waited for.
    pub records_behind: u64,
    /// Times a standby stopped being waited for.
    pub standbys_given_up: u64,
    /// Copies of peers' shard logs kept here, and their files' bytes.
    pub copies: usize,
    /// Their bytes.
    pub copy_bytes: u64,
    /// Copies started anew.
    pub copies_started: u64,
    /// Chunks from peers refused (records that do not check out).
    pub chunks_refused: u64,
    /// Power-safe: syncs that made peers' log copies durable before
    /// their answers went.
    pub copy_syncs: u64,
}

impl Replication {
    /// Of `paths`, those in the directory of a live copy (a copy gone
    /// took its files, and the answers waiting for them are void).
    pub(super) fn live_copy_files(&self, paths: Vec<PathBuf>) -> Vec<PathBuf> {
        (paths.into_iter())
            .filter(|p| (self.copies.iter()).any(|c| p.starts_with(c.replica.dir())))
            .collect()
    }

    /// True while some standby is waited for.
    pub(super) fn waits(&self) -> bool {
        self.standbys.iter().any(|s| s.waited_from.is_some())
    }

    /// Every record below this is held by every standby waited for.
    pub(super) fn held_below(&self) -> u64 {
        (self.standbys.iter())
            .filter(|s| s.waited_from.is_some())
            .map(|s| s.ship.confirmed())
            .min()
            .unwrap_or(u64::MAX)
    }
}

impl Store {
    /// Cluster mode: new records wake the bridge.
    pub(in crate::shard) fn set_ship_wake(
        &mut self,
        wake: std::rc::Rc<crate::shard::notify::Notify>,
    ) {
        self.rec.ship_wake = Some(wake);
    }

    /// The log's generation (its directory `gen-N/shard-I`), 0 if the
    /// name says none.
    fn generation(&self) -> u64 {
        let gen = self.rec.log.dir().parent().and_then(|p| p.file_name());
        (gen.and_then(|n| n.to_str()))
            .and_then(crate::log::dir::parse_generation)
            .unwrap_or(0)
    }

    /// The disk the log is on.
    pub(in crate::shard) fn disk(&self) -> std::sync::Arc<dyn crate::log::disk::Disk> {
        self.rec.log.disk().clone()
    }

    /// Where the copies of peers' logs are kept: `replicas/` in the data
    /// directory the log is in.
    fn copies_dir(&self) -> Option<PathBuf> {
        Some(self.rec.log.dir().parent()?.parent()?.join("replicas"))
    }
}

/// A copy of a peer shard's log kept here ([`ShardCore::log_copies`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyInfo {
    /// The peer's name.
    pub node: Arc<str>,
    /// Its run (incarnation) the copy is of.
    pub run: u64,
    /// Its shard.
    pub shard: u16,
    /// The log's generation.
    pub generation: u64,
    /// The copy holds what the log held at some moment (recoverable).
    pub whole: bool,
    /// Where it is.
    pub dir: PathBuf,
}

impl ShardCore {
    /// The copies of peers' shard logs this shard keeps.
    pub fn log_copies(&self) -> Vec<CopyInfo> {
        let st = self.state.borrow();
        let Some(store) = st.store.as_ref() else {
            return Vec::new();
        };
        (store.replication.copies.iter())
            .map(|c| CopyInfo {
                node: c.node.clone(),
                run: c.run,
                shard: c.shard,
                generation: c.replica.generation(),
                whole: c.replica.whole(),
                dir: c.replica.dir().to_path_buf(),
            })
            .collect()
    }

    /// Cluster mode: the nodes (the bridge's indexes) this shard's log is
    /// copied to; records written from now on wait for them. A node
    /// dropped from the list is no longer waited for; a new one gets a
    /// copy from the start. Without a log: nothing.
    pub fn set_standbys(&self, now: Instant, nodes: &[u16]) {
        let mut st = self.state.borrow_mut();
        let Some(store) = st.store.as_mut() else {
            return;
        };
        let gen = store.generation();
        let r = &mut store.replication;
        r.standbys.retain(|s| nodes.contains(&s.node));
        for &node in nodes {
            if !r.standbys.iter().any(|s| s.node == node) {
                log::info!(
                    "shard {}: log copied to peer {node} from now on (generation {gen}); \
                     acknowledgements wait for it once it has caught up",
                    self.id
                );
                r.standbys.push(Standby {
                    node,
                    ship: Shipper::new(gen),
                    marks: VecDeque::from([(store.rec.log.next_seq(), now)]),
                    waited_from: None,
                });
            }
        }
        self.release_gate(&mut st);
    }

    /// True when every acknowledgement this shard's log made so far is
    /// in its standbys' copies: it has standbys, each waited for, each
    /// holding every record written before it was last waited for (what
    /// came after waited for it).
    pub fn log_copies_cover_acks(&self) -> bool {
        let st = self.state.borrow();
        let Some(store) = st.store.as_ref() else {
            return false;
        };
        let r = &store.replication;
        !r.standbys.is_empty()
            && (r.standbys.iter())
                .all(|s| s.waited_from.is_some_and(|from| s.ship.confirmed() >= from))
    }

    /// The standbys this shard's log goes to (asked at every outbox
    /// drain: no allocation for up to two).
    pub fn standbys(&self) -> smallvec::SmallVec<[u16; 2]> {
        let st = self.state.borrow();
        (st.store.iter())
            .flat_map(|s| s.replication.standbys.iter().map(|s| s.node))
            .collect()
    }

    /// The next chunk of this shard's log for standby `node`, of at most
    /// `max_bytes` of records (one larger record goes alone), while its
    /// window has room.
    pub fn poll_log_chunk(&self, node: u16, max_bytes: usize) -> Option<Frame> {
        let mut st = self.state.borrow_mut();
        let store = st.store.as_mut()?;
        let log = &mut store.rec.log;
        let standby = (store.replication.standbys.iter_mut()).find(|s| s.node == node)?;
        match standby.ship.poll(log, max_bytes, WINDOW_BYTES) {
            Ok(chunk) => chunk.map(|mut chunk| {
                if chunk.start.is_some() && standby.waited_from.take().is_some() {
                    // A new run of the standby, or one too far behind:
                    // the copy starts anew and is waited for again once
                    // it has caught up.
                    log::warn!(
                        "shard {}: the copy of this shard's log on peer {node} starts anew \
                         (a new run of it, or it fell behind compaction): acknowledgements \
                         wait for it again once it has caught up",
                        self.id
                    );
                }
                let end = standby.ship.sent_end();
                chunk.waited = (standby.waited_from).is_some_and(|f| end.is_some_and(|e| e >= f));
                Frame::LogChunk {
                    shard: self.id as u16,
                    chunk: Box::new(chunk),
                }
            }),
            Err(e) => {
                shard_log!(
                    self,
                    log::Level::Error,
                    "shard {}: cannot read the log to copy it to peer {node}: {e}",
                    self.id
                );
                None
            }
        }
    }

    /// Standby `node` answered a chunk.
    pub fn log_have(&self, now: Instant, node: u16, have: Have) {
        let mut st = self.state.borrow_mut();
        let Some(store) = st.store.as_mut() else {
            return;
        };
        let Some(s) = (store.replication.standbys.iter_mut()).find(|s| s.node == node) else {
            return;
        };
        if s.ship.have(have) {
            if s.waited_from.take().is_some() {
                store.replication.given_up += 1;
            }
            log::warn!(
                "shard {}: peer {node} keeps no copy of this shard's log (no log there, or \
                 its bound reached): acknowledgements no longer wait for it",
                self.id
            );
        }
        self.check_standbys(&mut st, now);
    }

    /// The link to standby `node` closed: what it had not answered goes
    /// again on the next one.
    pub fn log_link_down(&self, node: u16) {
        let mut st = self.state.borrow_mut();
        let Some(store) = st.store.as_mut() else {
            return;
        };
        if let Some(s) = (store.replication.standbys.iter_mut()).find(|s| s.node == node) {
            s.ship.link_down();
        }
    }

    /// Every tick: note how far the log is, stop waiting for a standby
    /// behind for [`REPLICA_WAIT`], wait again for one that caught up.
    pub fn replication_tick(&self, now: Instant) {
        let mut st = self.state.borrow_mut();
        self.check_standbys(&mut st, now);
    }

    fn check_standbys(&self, st: &mut State, now: Instant) {
        let Some(store) = st.store.as_mut() else {
            return;
        };
        let next = store.rec.log.next_seq();
        let me = self.id;
        let r = &mut store.replication;
        for s in &mut r.standbys {
            if s.marks.back().is_none_or(|m| m.0 < next) {
                s.marks.push_back((next, now));
            }
            let confirmed = s.ship.confirmed();
            while s.marks.len() > 1 && s.marks.get(1).is_some_and(|m| m.0 <= confirmed) {
                s.marks.pop_front();
            }
            // The oldest record it lacks was written after the last mark
            // at or below what it holds and by the first one above: it
            // has waited at least since the latter (given up past
            // REPLICA_WAIT) and at most since the former (waited for
            // again below a tenth of it).
            let (after, by) = match s.marks.front() {
                _ if confirmed >= next => (Some(now), Some(now)),
                Some(m) if m.0 <= confirmed => (Some(m.1), s.marks.get(1).map(|m| m.1)),
                m => (None, m.map(|m| m.1)),
            };
            let since = |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t));
            let behind = since(by).unwrap_or(Duration::ZERO);
            let behind_at_most = since(after).unwrap_or(Duration::MAX);
            if s.waited_from.is_some() && behind >= REPLICA_WAIT {
                s.waited_from = None;
                r.given_up += 1;
                log::warn!(
                    "shard {me}: peer {} has held nothing new of this shard's log for {} s: \
                     acknowledgements no longer wait for it until it catches up",
                    s.node,
                    behind.as_secs()
                );
            } else if s.waited_from.is_none()
                && !s.ship.refused()
                && behind_at_most < REPLICA_WAIT / 10
            {
                s.waited_from = Some(next);
                log::info!(
                    "shard {me}: peer {} caught up with this shard's log: acknowledgements \
                     wait for it",
                    s.node
                );
            }
        }
        self.release_gate(st);
    }

    /// A chunk of peer `node`'s (run `run`) shard log for the copy kept
    /// here; the answer goes back on the link it came on, in power-safe
    /// mode once this shard's group commit has synced the copy (the
    /// number with the answer: send it once [`ShardCore::copy_syncs_done`]
    /// reaches it). Without a log here the answer refuses. Errors close
    /// the link: the chunk does not check out.
    pub fn take_log_chunk(
        &self,
        node: &str,
        run: u64,
        shards: u16,
        shard: u16,
        chunk: &Chunk,
    ) -> Result<(Frame, Option<u64>), ReplicaError> {
        let mut st = self.state.borrow_mut();
        let refused = Frame::LogHave {
            shard,
            have: Have {
                id: chunk.id,
                refused: true,
                ..Have::default()
            },
        };
        let Some(store) = st.store.as_mut() else {
            return Ok((refused, None));
        };
        let Some(copies_dir) = store.copies_dir() else {
            return Ok((refused, None));
        };
        let node_dir = copies_dir.join(format!("node-{node}"));
        let run_dir = node_dir.join(format!("run-{run}"));
        let power_safe = self.config.durability() == crate::config::Durability::PowerSafe;
        let own_segment = store.rec.log.segment_bytes() as u64;
        let i =
            (store.replication.copies.iter()).position(|c| &*c.node == node && c.shard == shard);
        let fits = |c: &Copy| c.run == run && c.replica.generation() == chunk.generation;
        let i = match i {
            Some(i) if fits(&store.replication.copies[i]) => i,
            _ if chunk.start.is_none() => {
                // Nothing of this run here: the owner starts anew.
                let have = Have {
                    id: chunk.id,
                    ..Have::default()
                };
                return Ok((Frame::LogHave { shard, have }, None));
            }
            old => {
                // A segment size a node could have (`storage.segment_bytes`
                // is at most 4 GiB; the simulator's are smaller than the
                // configuration allows, 64 KiB at least).
                if !((64 << 10)..=own_segment.max(1 << 32)).contains(&chunk.segment_bytes) {
                    log::warn!(
                        "shard {}: node {} copies its log in segments of {} bytes, out of \
                         range here: no copy kept",
                        self.id,
                        crate::text::quote(node),
                        chunk.segment_bytes
                    );
                    return Ok((refused, None));
                }
                let disk = store.rec.log.disk().clone();
                let dir = (run_dir.join(crate::log::dir::generation_name(chunk.generation)))
                    .join(format!("shard-{shard}"));
                // Twice the owner's share of `storage.log_bytes_max` (as
                // configured here): the copy drops the segments its log
                // dropped only once it has caught up.
                let share = self.config.storage.log_bytes_max / u64::from(shards.max(1));
                let segments_max = (2 * share / chunk.segment_bytes).max(3) as usize;
                let mut replica = Replica::new(
                    disk.clone(),
                    &dir,
                    chunk.generation,
                    chunk.segment_bytes as usize,
                    segments_max,
                );
                replica.set_sync_dirs(power_safe);
                if let Some(i) = old {
                    let gone = store.replication.copies.remove(i);
                    if gone.replica.dir() != dir {
                        if let Err(e) = disk.remove_dir_all(gone.replica.dir()) {
                            log::warn!(
                                "shard {}: cannot remove the old copy {}: {e}",
                                self.id,
                                gone.replica.dir().display()
                            );
                        }
                    }
                }
                store.replication.copies_started += 1;
                store.replication.copies.push(Copy {
                    node: Arc::from(node),
                    run,
                    shard,
                    replica,
                    current_written: false,
                    adoptable: None,
                });
                store.replication.copies.len() - 1
            }
        };
        let copy = &mut store.replication.copies[i];
        let have = match copy.replica.apply(chunk) {
            Ok(have) => have,
            Err(ReplicaError::Io(e)) => {
                // The disk here, not the peer: no copy kept (the owner
                // stops waiting for it); a new run of it starts again.
                log::error!(
                    "shard {}: cannot keep the copy of node {}'s log in {}: {e}",
                    self.id,
                    crate::text::quote(node),
                    copy.replica.dir().display()
                );
                copy.replica.refuse();
                copy.adoptable = Some(false);
                let marker = copy.replica.dir().join(BEHIND);
                let _ = store.rec.log.disk().write_synced(&marker, b"");
                let have = copy.replica.have(chunk.id);
                return Ok((Frame::LogHave { shard, have }, None));
            }
            Err(e) => {
                store.replication.chunks_refused += 1;
                return Err(e);
            }
        };
        // Waited for through this chunk, and the copy took it whole (a
        // chunk that does not continue the copy, or one refused, leaves it
        // behind).
        let took = have.at.is_some_and(|(_, seq)| seq >= chunk.seq);
        let adoptable = chunk.waited && took && have.whole && !have.refused;
        if chunk.start.is_some() {
            // Started anew: its directory was emptied, marker included.
            copy.adoptable = None;
        }
        if copy.adoptable != Some(adoptable) {
            copy.adoptable = Some(adoptable);
            let disk = store.rec.log.disk();
            let marker = copy.replica.dir().join(BEHIND);
            let marked = match adoptable {
                true => disk.remove_file(&marker).or_else(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => Ok(()),
                    _ => Err(e),
                }),
                false => disk.write_synced(&marker, b""),
            };
            if let Err(e) = marked {
                log::warn!("shard {}: cannot mark {}: {e}", self.id, marker.display());
            }
        }
        if copy.shard == 0 && copy.replica.whole() && !copy.current_written {
            copy.current_written = true;
            let text = format!("{}\n", crate::log::dir::generation_name(chunk.generation));
            let disk = store.rec.log.disk();
            if let Err(e) = disk.replace_synced(&run_dir, "CURRENT", text.as_bytes()) {
                log::warn!(
                    "shard {}: cannot write {}/CURRENT: {e}",
                    self.id,
                    run_dir.display()
                );
            }
            // The copies of its earlier runs are of no more use (and
            // what an older version kept there, `CURRENT` and `gen-N`).
            for old in disk.list(&node_dir).unwrap_or_default() {
                if old != run_dir {
                    let gone = match old.file_name().and_then(|n| n.to_str()) {
                        Some("CURRENT") => disk.remove_file(&old),
                        _ => disk.remove_dir_all(&old),
                    };
                    if let Err(e) = gone {
                        log::warn!(
                            "shard {}: cannot remove the old copy {}: {e}",
                            self.id,
                            old.display()
                        );
                    }
                }
            }
        }
        let answer = Frame::LogHave { shard, have };
        if !power_safe {
            return Ok((answer, None));
        }
        let r = &mut store.replication;
        let Some(path) = r.copies[i].replica.current_path() else {
            // Nothing written (a refused copy): nothing to wait for.
            return Ok((answer, None));
        };
        r.copy_dirty.push(path.to_path_buf());
        self.sync_wake.notify();
        Ok((answer, Some(r.copy_syncs_begun + 1)))
    }

    /// True when `path` is a file of a peer's log copy kept here.
    pub fn is_log_copy(&self, path: &std::path::Path) -> bool {
        let st = self.state.borrow();
        (st.store.as_ref())
            .and_then(Store::copies_dir)
            .is_some_and(|dir| path.starts_with(dir))
    }

    /// Power-safe: the syncs of peers' log copies done (see
    /// [`ShardCore::take_log_chunk`]).
    pub fn copy_syncs_done(&self) -> u64 {
        let st = self.state.borrow();
        st.store
            .as_ref()
            .map_or(0, |s| s.replication.copy_syncs_done)
    }
}

impl Store {
    /// What replication counted on this shard.
    pub(in crate::shard) fn replication_stats(&self) -> ReplicationStats {
        let r = &self.replication;
        let next = self.rec.log.next_seq();
        ReplicationStats {
            standbys: r.standbys.len(),
            standbys_waited: (r.standbys.iter())
                .filter(|s| s.waited_from.is_some())
                .count(),
            records_behind: next.saturating_sub(r.held_below().min(next)),
            standbys_given_up: r.given_up,
            copies: r.copies.len(),
            copy_bytes: r.copies.iter().map(|c| c.replica.file_bytes()).sum(),
            copies_started: r.copies_started,
            chunks_refused: r.chunks_refused,
            copy_syncs: r.copy_syncs_done,
        }
    }
}
