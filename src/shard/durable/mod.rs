//! Durability on a shard: its log writer, and the bookkeeping of what in
//! the log is still live, so acknowledged messages survive a crash and the
//! log's size stays bounded.
//!
//! Shard-local. Routing decides who gets a message and hands its decision
//! here as a value (`routing::Plan` on the publisher's shard,
//! `routing::Local` on each shard that delivers it); `routed` reads it and
//! writes what must survive a crash. Without a log (memory mode) `store` is
//! None and every entry point is a no-op; routing does not call them at
//! all for a plain QoS 0 publish.
//!
//! What gets written, and when:
//!
//! - A persistent session (expiry > 0) writes its whole state when it is
//!   created, then deltas: Subscribe, Unsubscribe, Online, Offline,
//!   Qos2Done, End (`sessions`); WillDone only when its will went out
//!   without an Accepted record.
//! - A QoS 1/2 publish that reaches other shards (or is QoS 2 from a
//!   persistent session, a delayed publish being sent, a shared
//!   subscription's message passed on, any message while the log is full)
//!   and a persistent session's will are written as Accepted on the
//!   publisher's shard before its PUBACK/PUBREC, with an accept id. Every shard that applies it records that origin in what it
//!   writes and answers `Applied`; once all have, the accept is settled
//!   (`answers`). After a crash, recovery routes again what was not
//!   settled, to the sessions whose shard did not record it.
//! - A delivery at QoS 1/2 to a persistent session is stored: one Message
//!   record per message per shard with every such session, then Sent,
//!   Released and Done as the session reports them (`messages`).
//! - Retained messages (Retain), delayed publishes (Delayed, DelayedDone).
//!
//! What cannot be written because the log is full waits in memory and is
//! written when room returns, in order (a new message waits behind older
//! work); answers to its origin wait for it (`retry`), and so do the
//! message's deliveries, kept out of their sessions (`messages::Held`): a
//! client must not acknowledge what a crash would route to it again.
//!
//! Compaction (`compaction`): every live object remembers the segment of
//! its first whole record. When the log holds more than twice the live
//! bytes (plus a segment), the oldest segment's live objects are written
//! again whole at the head and the segment is deleted.
//!
//! Kill-safe mode acknowledges once a record is in the mapping. Power-safe
//! mode holds every session's output, every message to another shard that
//! names an origin, and every `Applied` answer until the group-commit task
//! has synced the records written before it (`sync`).

mod answers;
mod compaction;
pub(super) mod invariants;
mod messages;
mod replicate;
mod retry;
mod routed;
mod sessions;
mod sync;

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::hash::HashMap;

use crate::codec::QoS;
use crate::config::Durability;
use crate::log::{AppendError, Log, RecordAt};
use crate::message::Message;
use crate::persist::{Origin, Rec, Sid, WallClock, Writer};
use crate::session::ShardStatus;

use super::mesh::MeshMsg;
use super::notify::Notify;
use super::{ConnHandle, SessionKey, ShardCore, State};

use answers::{Accepted, Owed};
use messages::StoredMessage;
use retry::Retry;

pub(super) use messages::{Held, StoreTarget};
pub use replicate::{chunk_bytes, CopyInfo, ReplicationStats, BEHIND, REPLICA_WAIT};
pub(super) use routed::{Forward, Logged};

/// A persistent session's place in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DurableSlot {
    /// Its number in the log.
    pub(super) sid: Sid,
    /// Segment of its last whole record.
    pub(super) seg: u64,
    /// Size of that whole state (its Session record and any Subscribe
    /// records it overflowed into), for the live-bytes estimate.
    pub(super) bytes: u32,
}

/// An object of the log, for compaction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Obj {
    Session(SessionKey, u64),
    Message(u64),
    Retained(Arc<str>),
    Delayed(u64),
    Accepted(u64),
}

/// Where a single-record object sits (delayed publishes).
#[derive(Debug, Clone, Copy)]
struct Placed {
    seg: u64,
    bytes: u32,
}

/// A retained message's record.
#[derive(Debug, Clone, Copy)]
struct RetainedMeta {
    seg: u64,
    bytes: u32,
    /// When it was accepted: orders it against messages routed again.
    stamp_ms: u64,
    origin: Option<Origin>,
}

/// The durable side of a shard (see the module docs), by concern: the
/// record writer, the liveness and compaction accounting, the settle
/// protocol, the power-safe sync gate and the full-disk retry, plus the
/// numbers and stored messages they share.
pub(super) struct Store {
    /// Writes records; knows whether the log has room.
    rec: Records,
    /// What in the log is still live, for compaction.
    pub(super) live: Liveness,
    /// The Accepted / Applied / Settled protocol (`answers`).
    settle: Settle,
    /// Power-safe: what waits for a sync (`sync`).
    gate: SyncGate,
    /// Work that could not be logged, to write when room returns
    /// (`retry`).
    retry: VecDeque<Retry>,
    next_sid: Sid,
    next_message_id: u64,
    /// Stored messages by id (`messages`).
    messages: HashMap<u64, StoredMessage>,
    /// Cluster mode: the log's copies on standbys, and the copies of
    /// peers' logs kept here (`replicate`).
    replication: replicate::Replication,
}

/// The record writer: the log, its room, and the failures it counts.
struct Records {
    log: Log,
    mode: Durability,
    clock: WallClock,
    writer: Writer,
    me: u16,
    /// When the clock was last written.
    clock_at: Instant,
    /// Whether the log has room for new messages.
    room: Room,
    /// Whether it was full, as last logged and told to the other shards.
    reported_full: bool,
    /// Compaction is rewriting: it may use the room kept for bookkeeping.
    compacting: bool,
    /// Segments compacted since the start.
    compactions: u64,
    /// Which other shards reported a full log.
    others_full: Vec<bool>,
    /// Rate limit of the append-failure log line: one per 10 s, on the
    /// shard's tick time.
    failure_gate: crate::text::LogGate,
    /// Records that could not be written, ever (each also logged, rate
    /// limited): what was refused, held for a retry, or lost.
    appends_failed: u64,
    /// The shard's status its sessions read: `store_full` is raised the
    /// moment the log has no spare segment.
    status: Rc<ShardStatus>,
    /// Power-safe: wakes the group-commit task (every append, and
    /// compaction waiting to delete segments).
    sync_wake: Rc<Notify>,
    /// Cluster mode: wakes the bridge, which copies new records to the
    /// standbys.
    ship_wake: Option<Rc<Notify>>,
}

/// Liveness and compaction accounting: where each live object's whole
/// record is, and how many bytes are live.
#[derive(Default)]
pub(super) struct Liveness {
    retained: HashMap<Arc<str>, RetainedMeta>,
    /// Delayed publishes by id: when due, and their record.
    delayed: HashMap<u64, (Instant, Placed)>,
    /// Objects by the segment of their first whole record.
    by_seg: BTreeMap<u64, Vec<Obj>>,
    /// Dead Message records kept as proof that this shard applied their
    /// origin, by segment: compaction writes a marker for each whose origin
    /// is still unsettled.
    proofs: BTreeMap<u64, Vec<(Origin, crate::persist::Scope)>>,
    /// Sum of the live objects' whole-record sizes (headers included, as
    /// the segments count them).
    live_bytes: u64,
}

/// The settle protocol's state (`answers`).
struct Settle {
    next_accept_id: u64,
    accepted: VecDeque<Accepted>,
    /// Per shard: the largest accept id it answered `Applied` for.
    acked_upto: Vec<u64>,
    settled_upto: u64,
    settled_written: u64,
    /// Log sequence number after the last Settled record.
    settled_written_seq: u64,
    /// Per origin shard: its settled frontier as last heard (for this
    /// shard: as last told to the others).
    known_settled: Vec<u64>,
    /// Per origin shard: the `Applied` answers owed to it.
    owed: Vec<Owed>,
}

/// The power-safe sync gate: what waits for records to be synced.
struct SyncGate {
    /// Records with a lower sequence number are durable: synced
    /// (power-safe) and held by every standby waited for (`replicate`).
    synced_next: u64,
    /// Records with a lower sequence number are synced (power-safe;
    /// otherwise the largest number).
    local_next: u64,
    /// Sessions whose output waits for a sync: (key, connection id).
    sync_waiters: Vec<(SessionKey, u64)>,
    /// Closing connections whose last packets wait for a sync.
    closing_waiters: Vec<Rc<ConnHandle>>,
    /// Mesh messages that wait for a sync: (sequence needed, to, message).
    after_sync: Vec<(u64, usize, MeshMsg)>,
    /// How many of those wait for each shard.
    waiting_for: Vec<usize>,
    /// Frames for peers that wait for a sync: (sequence needed, frame).
    frames_after_sync: Vec<(u64, super::remote::BridgeOut)>,
    /// Power-safe compaction: segments up to the second number are deleted
    /// once records below the first are synced.
    pending_removal: Option<(u64, u64)>,
}

/// How much room a shard's log has for new data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Room {
    /// A spare segment is ready: every record is written.
    Spare,
    /// No spare segment (no disk space, or `storage.log_bytes_max`):
    /// records bringing new message data are refused, and the second half
    /// of the current segment is kept for bookkeeping and compaction.
    Full {
        /// A compaction failed for lack of room: none is tried again until
        /// a spare segment could be made.
        compaction_stuck: bool,
    },
}

impl Room {
    fn is_full(self) -> bool {
        matches!(self, Room::Full { .. })
    }
}

/// What a shard's log holds, for operators and the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogStatus {
    /// Bytes written in the segments on disk.
    pub used_bytes: u64,
    /// Of those, bytes of records still live.
    pub live_bytes: u64,
    /// Sealed segments (besides the one written and the spare).
    pub sealed_segments: usize,
    /// No spare segment: new data (QoS 1/2 publishes, new persistent
    /// sessions) is refused.
    pub full: bool,
    /// A compaction failed for lack of room; none is tried until a spare
    /// segment can be made.
    pub compaction_stuck: bool,
    /// Other shards whose log is full, as they reported it: this shard
    /// refuses QoS 1/2 messages too while any is.
    pub others_full: usize,
    /// Segments compacted since the start.
    pub compactions: u64,
}

/// Where a store sits: its shard and what it shares with it.
pub(super) struct StoreEnv {
    pub(super) mode: Durability,
    pub(super) clock: WallClock,
    pub(super) me: usize,
    pub(super) shards: usize,
    pub(super) sync_wake: Rc<Notify>,
    pub(super) status: Rc<ShardStatus>,
    /// The shard's clock reading when the store is built.
    pub(super) now: Instant,
}

/// Why the log has no spare segment: its bound, or the disk.
fn why_full(log: &Log) -> &'static str {
    if log.at_segments_max() {
        "storage.log_bytes_max reached (its share of segments is in use): no room"
    } else {
        "no disk space"
    }
}

impl Store {
    /// The store of a shard starting from recovery's output (whose records
    /// recovery has synced), continuing its session and message numbers.
    pub(super) fn new(next_sid: Sid, next_message_id: u64, log: Log, env: StoreEnv) -> Store {
        let StoreEnv {
            mode,
            clock,
            me,
            shards,
            sync_wake,
            status,
            now,
        } = env;
        let next = log.next_seq();
        let mut log = log;
        log.set_sync_dirs(mode == Durability::PowerSafe);
        // Recovery made no spare segment (the old generation held the room).
        let full = !log.ensure_spare();
        status.store_full.set(full);
        if full {
            log::error!(
                "shard {me}: {} for a log segment in {}: refusing QoS 1/2 messages \
                 (0x97) until there is",
                why_full(&log),
                log.dir().display()
            );
        }
        Store {
            rec: Records {
                log,
                mode,
                clock,
                writer: Writer::default(),
                me: me as u16,
                clock_at: now,
                room: if full {
                    Room::Full {
                        compaction_stuck: false,
                    }
                } else {
                    Room::Spare
                },
                reported_full: false,
                compacting: false,
                compactions: 0,
                others_full: vec![false; shards],
                failure_gate: crate::text::LogGate::new(1, Duration::from_secs(10)),
                appends_failed: 0,
                status,
                sync_wake,
                ship_wake: None,
            },
            live: Liveness::default(),
            settle: Settle {
                next_accept_id: 1,
                accepted: VecDeque::new(),
                acked_upto: vec![0; shards],
                settled_upto: 0,
                settled_written: 0,
                settled_written_seq: 0,
                known_settled: vec![0; shards],
                owed: (0..shards).map(|_| Owed::default()).collect(),
            },
            gate: SyncGate {
                synced_next: next,
                local_next: if mode == Durability::PowerSafe {
                    next
                } else {
                    u64::MAX
                },
                sync_waiters: Vec::new(),
                closing_waiters: Vec::new(),
                after_sync: Vec::new(),
                waiting_for: vec![0; shards],
                frames_after_sync: Vec::new(),
                pending_removal: None,
            },
            retry: VecDeque::new(),
            next_sid,
            next_message_id,
            messages: HashMap::default(),
            replication: replicate::Replication::default(),
        }
    }

    /// True when a QoS 1/2 `message` must be accepted (logged as
    /// Accepted) before it is routed, though nothing else asks for it:
    /// while the log has no spare segment or work waits for room (a new
    /// message's record may be refused, or wait behind that work), and
    /// when its fan-out could roll the log into its last segment, after
    /// which a record refused half-way through would leave the
    /// acknowledged message only in memory. A disk that fills below
    /// `storage.log_bytes_max` is not foreseen this way.
    pub(super) fn must_accept_first(&self, message: &Message) -> bool {
        if self.rec.room.is_full() || !self.retry.is_empty() {
            return true;
        }
        // The records of a fan-out: the message, in each of a few groups,
        // and its targets.
        self.rec.log.at_segments_max()
            && self.rec.log.current_room() < 2 * message.cost_bytes() + 64 * 1024
    }

    /// What the log holds.
    pub(super) fn status(&self) -> LogStatus {
        LogStatus {
            used_bytes: self.rec.log.used_bytes(),
            live_bytes: self.live.live_bytes,
            sealed_segments: self.rec.log.sealed_count(),
            full: self.rec.room.is_full(),
            compaction_stuck: matches!(
                self.rec.room,
                Room::Full {
                    compaction_stuck: true
                }
            ),
            others_full: self.rec.others_full.iter().filter(|f| **f).count(),
            compactions: self.rec.compactions,
        }
    }

    /// Unix milliseconds of `t` (deadlines, stamps of accepted messages).
    pub(super) fn wall_ms(&self, t: Instant) -> u64 {
        self.rec.wall_ms(t)
    }

    /// The sequence number output must wait for, when records are not
    /// yet durable: synced (power-safe), held by the standbys waited for
    /// (cluster mode).
    fn unsynced_upto(&self) -> Option<u64> {
        let next = self.rec.log.next_seq();
        (self.waits_for_gate() && next > self.gate.synced_next).then_some(next)
    }

    /// True when what is acknowledged waits for records to be durable
    /// beyond the mapping: power-safe mode, or a standby waited for.
    fn waits_for_gate(&self) -> bool {
        self.rec.mode == Durability::PowerSafe || self.replication.waits()
    }

    /// Records below this sequence number are durable.
    fn durable_next(&self) -> u64 {
        let next = self.rec.log.next_seq();
        (self.gate.local_next)
            .min(self.replication.held_below())
            .min(next)
    }

    /// Send now (kill-safe) or after the records written so far are synced.
    /// Every mesh message waiting for a sync.
    pub(super) fn for_each_after_sync(&self, f: &mut impl FnMut(&MeshMsg)) {
        self.gate.after_sync.iter().for_each(|(_, _, m)| f(m));
    }

    fn send_after_sync(&mut self, mesh: &super::mesh::Mesh, to: usize, msg: MeshMsg) {
        match self.unsynced_upto() {
            Some(seq) => self.hold_for(seq, to, msg),
            None => self.send_behind(mesh, to, msg),
        }
    }

    /// Send `msg` to shard `to` now, or behind what waits for a sync to
    /// go there (it goes with the last of those): a lane keeps its order.
    pub(super) fn send_behind(&mut self, mesh: &super::mesh::Mesh, to: usize, msg: MeshMsg) {
        if self.gate.waiting_for.get(to).is_none_or(|&n| n == 0) {
            mesh.send(to, msg);
            return;
        }
        let waiting = (self.gate.after_sync.iter().rev()).find(|(_, t, _)| *t == to);
        let seq = waiting.map_or(0, |(seq, _, _)| *seq);
        self.hold_for(seq, to, msg);
    }

    /// True when every record asked for so far is in the log (none waits
    /// for room, `retry`): a mark written now follows them.
    pub(super) fn all_written(&self) -> bool {
        self.retry.is_empty()
    }

    /// `out` for the bridge once a standby waited for holds the records
    /// written so far (and, power-safe, they are synced): held until then
    /// and sent by [`ShardCore::release_gate`]. Not sent when no standby
    /// is waited for (none up, or every one behind).
    pub(super) fn after_standbys(&mut self, out: super::remote::BridgeOut) {
        if self.replication.waits() {
            let seq = self.rec.log.next_seq();
            self.gate.frames_after_sync.push((seq, out));
        }
    }

    fn hold_for(&mut self, seq: u64, to: usize, msg: MeshMsg) {
        if let Some(n) = self.gate.waiting_for.get_mut(to) {
            *n += 1;
        }
        self.gate.after_sync.push((seq, to, msg));
    }
}

impl Records {
    /// Append `rec`; returns the segment it went into and its size. While
    /// the log has no spare segment, the second half of the current one is
    /// kept for bookkeeping (acks, session changes) and compaction: a record
    /// bringing new message data is refused there.
    fn put(&mut self, rec: &Rec) -> Result<(u64, u32), AppendError> {
        if self.room.is_full()
            && !self.compacting
            && brings_data(rec)
            && self.log.current_room() < self.log.segment_bytes() / 2
        {
            return Err(AppendError::Full);
        }
        let appended = self.writer.append(&mut self.log, &self.clock, rec);
        if !self.log.has_spare() && !self.room.is_full() {
            // Refuse new messages from now on; the room left in the current
            // segment is for the bookkeeping of those already taken.
            self.room = Room::Full {
                compaction_stuck: false,
            };
            self.status.store_full.set(true);
            log::error!(
                "shard {}: {} for a new log segment in {}: refusing QoS 1/2 \
                 messages (0x97) until there is",
                self.me,
                why_full(&self.log),
                self.log.dir().display()
            );
        }
        match appended {
            Ok(placed) => {
                if self.mode == Durability::PowerSafe {
                    self.sync_wake.notify();
                }
                if let Some(wake) = &self.ship_wake {
                    wake.notify();
                }
                Ok(placed)
            }
            Err(e) => {
                self.appends_failed += 1;
                if let Some(n) = self.failure_gate.allow_ticked() {
                    log::error!(
                        "shard {}: {e}: a record of kind {} was not written ({}){}",
                        self.me,
                        rec.kind(),
                        self.log.dir().display(),
                        crate::text::suppressed_note(n)
                    );
                }
                Err(e)
            }
        }
    }

    /// Append `recs`; returns where the first one starts and the total
    /// size.
    fn put_all(&mut self, recs: &[Rec]) -> Result<(RecordAt, u32), AppendError> {
        let mut first = None;
        let mut bytes: u32 = 0;
        for rec in recs {
            let (_, b) = self.put(rec)?;
            first.get_or_insert(self.log.last_at());
            bytes = bytes.saturating_add(b);
        }
        let first = first.unwrap_or_else(|| RecordAt {
            segment: self.log.current_index(),
            offset: 0,
        });
        Ok((first, bytes))
    }

    /// Append a record that only records a change (no object of its own).
    fn note(&mut self, rec: &Rec) {
        let _ = self.put(rec);
    }

    /// Unix milliseconds of `t` (deadlines, stamps of accepted messages).
    pub(super) fn wall_ms(&self, t: Instant) -> u64 {
        self.clock.to_ms(t)
    }

    /// True when new QoS 1/2 messages cannot be taken (this shard's log or
    /// another's is full).
    fn refusing(&self) -> bool {
        self.room.is_full() || self.others_full.iter().any(|f| *f)
    }
}

impl Liveness {
    /// Count the object `obj` as live in segment `seg`.
    fn track(&mut self, seg: u64, obj: Obj) {
        self.by_seg.entry(seg).or_default().push(obj);
    }

    /// A restored session whose whole record is in segment `seg`.
    pub(super) fn restore_session(&mut self, key: SessionKey, uid: u64, seg: u64, bytes: u32) {
        self.live_bytes += u64::from(bytes);
        self.track(seg, Obj::Session(key, uid));
    }

    /// A restored retained message.
    pub(super) fn restore_retained(
        &mut self,
        topic: Arc<str>,
        seg: u64,
        bytes: u32,
        stamp_ms: u64,
    ) {
        self.live_bytes += u64::from(bytes);
        self.track(seg, Obj::Retained(topic.clone()));
        let meta = RetainedMeta {
            seg,
            bytes,
            stamp_ms,
            origin: None,
        };
        self.retained.insert(topic, meta);
    }

    /// A restored delayed publish.
    pub(super) fn restore_delayed(&mut self, id: u64, due: Instant, seg: u64, bytes: u32) {
        self.live_bytes += u64::from(bytes);
        self.track(seg, Obj::Delayed(id));
        self.delayed.insert(id, (due, Placed { seg, bytes }));
    }
}

/// True for records that add message data (what a full log refuses first).
fn brings_data(rec: &Rec) -> bool {
    match rec {
        Rec::Message { message, .. } => message.is_some(),
        Rec::Accepted { .. } | Rec::Delayed { .. } => true,
        Rec::Retain { message, .. } => !message.payload.is_empty(),
        _ => false,
    }
}

impl ShardCore {
    /// The log's number of session `key`, when it is persistent (only then,
    /// and only with a log, has it a place there).
    pub(super) fn durable_sid(st: &State, key: SessionKey) -> Option<Sid> {
        st.sessions.get(key)?.durable.map(|d| d.sid)
    }

    /// The session number a delivery to `key` at `qos` is stored under,
    /// when it is to be stored (persistent session, QoS 1/2).
    pub(super) fn storable(st: &State, key: SessionKey, qos: QoS) -> Option<Sid> {
        if qos == QoS::AtMostOnce {
            return None;
        }
        Self::durable_sid(st, key)
    }

    /// A new message id for this shard's log.
    pub(super) fn next_message_id(st: &mut State) -> Option<u64> {
        let store = st.store.as_mut()?;
        let id = store.next_message_id;
        store.next_message_id += 1;
        Some(id)
    }

    /// Housekeeping on each tick: the clock record, answers and the settled
    /// frontier, retries, the spare segment, compaction.
    pub(super) fn durable_tick(&self, st: &mut State, now: Instant) {
        if st.store.is_none() {
            return;
        }
        self.send_applied(st);
        self.write_settled(st);
        let store = st.store.as_mut().expect("checked");
        store.rec.failure_gate.tick(now);
        st.stats.log_appends_failed = store.rec.appends_failed;
        // The clock, each second: recovery takes the last one as the moment
        // the broker stopped, when connected sessions became disconnected.
        if now - store.rec.clock_at >= Duration::from_secs(1) {
            let ms = store.rec.clock.to_ms(now);
            store.rec.note(&Rec::Clock { ms });
            store.rec.clock_at = now;
        }
        // `put` makes the log full the moment the spare is gone; the tick
        // gives it room again once a spare could be made.
        let full = !store.rec.log.ensure_spare();
        store.rec.room = match (full, store.rec.room) {
            (false, _) => Room::Spare,
            (true, Room::Spare) => Room::Full {
                compaction_stuck: false,
            },
            (true, stuck) => stuck,
        };
        self.limits.status.store_full.set(store.rec.refusing());
        if full != store.rec.reported_full {
            store.rec.reported_full = full;
            if !full {
                log::warn!("shard {}: the log has room again", self.id);
            }
            self.mesh.broadcast(|| MeshMsg::StoreFull { full });
        }
        if !full {
            self.retry_unlogged(st, now);
        }
        self.compact(st);
    }
}
