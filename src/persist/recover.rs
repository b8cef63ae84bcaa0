//! Recovery at start: read every shard log of the current generation, work
//! out the broker's state, finish what a crash interrupted, and write it as
//! the next generation laid out for the shard count now in force.
//!
//! Node-wide, on the starting thread, before any shard runs. The steps:
//!
//! 1. Replay each old shard log into a [`ShardImage`] (stopping at damage,
//!    which is reported; the segment files of a corrupt log are copied
//!    aside, a torn tail is just cut).
//! 2. Sessions that were connected when the broker stopped count as
//!    disconnected at its last clock record: their wills wait for their
//!    delay; sessions whose expiry has passed end (publishing a pending
//!    will); wills that are due are published.
//! 3. Messages that were accepted and not known applied everywhere are
//!    routed again, to the persistent sessions (and retained store) that
//!    did not get them: destinations record the origin of what they apply,
//!    so nothing is delivered twice.
//! 4. Sessions move to `hash(client id) % shards`, retained messages and
//!    delayed publishes to `hash(topic) % shards`; the next generation is
//!    written (one log per shard), `CURRENT` switches to it, and the old
//!    one is deleted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::hash::HashMap;
use thiserror::Error;

use super::clock::WallClock;
use super::image::ShardImage;
use super::record::{
    message_records, session_records, Origin, Rec, Scope, SessionRec, Sid, Target, TargetState,
};
use super::writer::Writer;
use crate::codec::QoS;
use crate::log::dir::{DataDir, DirError};
use crate::log::disk::Disk;
use crate::log::scan::{scan_on, ScanReport};
use crate::log::{AppendError, Log, RecordAt};
use crate::message::Message;
use crate::router::fanout::{self, Fan, FanOut, Match};
use crate::router::{home_shard, split_shared, FilterTrie, SharedPick};
use crate::session::{
    expires_after_s, will_delay_s, Delivery, Restored, RestoredInflight, Subscription,
};

/// Why recovery failed (the broker does not start).
#[derive(Debug, Error)]
pub enum RecoveryError {
    /// The data directory cannot be used.
    #[error(transparent)]
    Dir(#[from] DirError),
    /// Reading or writing the logs failed.
    #[error("data directory {dir}: {what}: {source}")]
    Io {
        /// The directory.
        dir: String,
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// A recovered session, ready for its new home shard.
#[derive(Debug)]
pub struct SessionStart {
    /// Its number in the new log.
    pub sid: Sid,
    /// Segment holding its full record.
    pub seg: u64,
    /// Size of its records.
    pub bytes: u32,
    /// Client identifier.
    pub client_id: Arc<str>,
    /// Its state, offline.
    pub restored: Restored,
    /// Its marks, written again after its records in the new log.
    pub marks: Marks,
}

/// What a session's log says of it besides its state (cluster mode; 0:
/// nothing): the records after its Session record that name it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Marks {
    /// The latest claim whose move brought it whole to the node
    /// (`Rec::MovedIn`).
    pub moved_in: u64,
    /// The birth stamp of the session as its client was told about it
    /// (`Rec::Told`).
    pub told: u64,
}

impl Marks {
    /// Session `sid`'s marks in `image`.
    fn of(image: &ShardImage, sid: Sid) -> Marks {
        Marks {
            moved_in: image.moved_in.get(&sid).copied().unwrap_or(0),
            told: image.told.get(&sid).copied().unwrap_or(0),
        }
    }

    /// Their records for session `sid` (none for a mark that is 0).
    pub fn records(self, sid: Sid) -> impl Iterator<Item = Rec> {
        let moved = (self.moved_in != 0).then_some(Rec::MovedIn {
            sid,
            claim: self.moved_in,
        });
        let told = (self.told != 0).then_some(Rec::Told {
            sid,
            born: self.told,
        });
        moved.into_iter().chain(told)
    }
}

/// A stored message of a new shard log: which sessions hold it.
#[derive(Debug)]
pub struct MessageStart {
    /// Message id in the new log.
    pub id: u64,
    /// Where its first record starts.
    pub at: RecordAt,
    /// Size of its records.
    pub bytes: u32,
    /// Sessions holding it.
    pub sids: Vec<Sid>,
}

/// A retained message of a new shard.
#[derive(Debug)]
pub struct RetainedStart {
    /// The message.
    pub message: Arc<Message>,
    /// When it was accepted.
    pub stamp_ms: u64,
    /// Segment of its record.
    pub seg: u64,
    /// Size of its record.
    pub bytes: u32,
}

/// A delayed publish of a new shard.
#[derive(Debug)]
pub struct DelayedStart {
    /// Delayed id.
    pub id: u64,
    /// Due, Unix ms.
    pub due_ms: u64,
    /// The message.
    pub message: Arc<Message>,
    /// Segment of its record.
    pub seg: u64,
    /// Size of its record.
    pub bytes: u32,
}

/// Everything one shard starts from: its new log and the state in it.
#[derive(Debug)]
pub struct ShardStart {
    /// The log, open for appending.
    pub log: Log,
    /// Sessions, offline.
    pub sessions: Vec<SessionStart>,
    /// Stored messages.
    pub messages: Vec<MessageStart>,
    /// Retained messages of the topics it owns.
    pub retained: Vec<RetainedStart>,
    /// Delayed publishes.
    pub delayed: Vec<DelayedStart>,
    /// Next session number.
    pub next_sid: Sid,
    /// Next message id.
    pub next_message_id: u64,
    /// Next delayed id.
    pub next_delayed_id: u64,
}

/// The result of recovery; see the module docs.
#[derive(Debug)]
pub struct Recovery {
    /// The locked data directory (held while the broker runs).
    pub dir: DataDir,
    /// One start per shard.
    pub shards: Vec<ShardStart>,
    /// Every restored subscription: (shard, full filter), for the route
    /// replicas.
    pub routes: Vec<(usize, String)>,
    /// The clock every deadline was converted with.
    pub clock: WallClock,
    /// What was recovered, for the log.
    pub summary: String,
}

/// Settings recovery needs.
#[derive(Debug, Clone)]
pub struct RecoverySettings {
    /// The data directory.
    pub data_dir: PathBuf,
    /// Shards of this run.
    pub shards: usize,
    /// Segment file size.
    pub segment_bytes: usize,
    /// The clock to read time from: `None` reads the system's (the
    /// broker); the simulator gives its virtual one.
    pub clock: Option<WallClock>,
    /// Where the data directory is: `None` is the file system (the
    /// broker); the simulator gives a disk in memory.
    pub disk: Option<Arc<dyn Disk>>,
}

/// A session gathered from an old shard.
struct Gathered {
    old_shard: usize,
    rec: SessionRec,
    marks: Marks,
    /// Its deliveries, each with an ordering key (see `OrderKey`).
    deliveries: Vec<(OrderKey, Arc<Message>, Target)>,
    ended: bool,
}

/// Global order of stored messages in the new logs: old messages by (old
/// shard, old id), then re-routed ones in routing order. Every session's
/// own order agrees with it.
type OrderKey = (u8, u64, u64);

/// Run recovery; see the module docs.
pub fn recover(settings: &RecoverySettings) -> Result<Recovery, RecoveryError> {
    let started = Instant::now();
    let disk = settings.disk.clone().unwrap_or_else(crate::log::disk::fs);
    let dir = DataDir::open_on(disk, &settings.data_dir)?;
    let io = |what: &str| {
        let dir = settings.data_dir.display().to_string();
        let what = what.to_string();
        move |source| RecoveryError::Io { dir, what, source }
    };
    let clock = settings.clock.unwrap_or_else(WallClock::now);
    let current = dir.current().map_err(io("read CURRENT"))?;
    let mut lines = Vec::new();
    let mut images = Vec::new();
    if let Some(gen) = current {
        for (shard, path) in dir.shard_dirs(gen).map_err(io("list shard logs"))? {
            let (image, report, bad) = read_shard(dir.disk().as_ref(), &path, shard, &clock)
                .map_err(io(&format!("read {}", path.display())))?;
            lines.push(describe(shard, &report, bad));
            match &report.damage {
                Some(d) if d.is_corruption() => keep_damaged(&dir, gen, shard, &report),
                _ => drop_empty_segments(dir.disk().as_ref(), &report),
            }
            images.push(image);
        }
    }
    let mut state = Merge::new(&images, &clock);
    state.gather_sessions();
    state.settle_sessions();
    // Stored retained messages first: an accepted message its owner had
    // not applied came after anything that owner stored from the same
    // shard (one FIFO lane), so on an equal stamp it must win.
    state.gather_retained_and_delayed();
    state.reroute_accepted();
    state.publish_wills();
    state.drop_retained_deletions();
    let generation = current.map_or(1, |g| g + 1); // below u64::MAX: see dir.rs
    let Written {
        starts: shards,
        routes,
        counts,
    } = write_generation(&dir, generation, settings, &clock, state).map_err(|e| {
        // Give the room back; the current generation is untouched.
        let _ = dir.disk().remove_dir_all(&dir.generation_dir(generation));
        let what = if e.kind() == std::io::ErrorKind::StorageFull {
            "write the next generation (recovery needs free room for a copy of the live \
             state; nothing was lost: free some space and start again)"
        } else {
            "write the next generation"
        };
        io(what)(e)
    })?;
    dir.set_current(generation).map_err(io("switch CURRENT"))?;
    dir.remove_other_generations(generation)
        .map_err(io("remove the old generation"))?;
    lines.push(format!(
        "recovered {} sessions ({} ended on expiry), {} queued and {} in-flight messages, \
         {} retained, {} delayed publishes; {} messages routed again, {} wills published; \
         generation {generation} written in {} ms",
        counts.sessions,
        counts.expired,
        counts.queued,
        counts.inflight,
        counts.retained,
        counts.delayed,
        counts.rerouted,
        counts.wills,
        started.elapsed().as_millis()
    ));
    Ok(Recovery {
        dir,
        shards,
        routes,
        clock,
        summary: lines.join("\n"),
    })
}

/// A session of a dead peer's log copy, for the node that adopts it
/// (`shard::adopt`).
#[derive(Debug)]
pub struct AdoptedSession {
    /// Client identifier.
    pub client_id: Arc<str>,
    /// Its state, offline since the peer's last clock record, without
    /// its will (every peer publishes a dead node's wills) and with no
    /// delivery stored on the adopting node yet (`stored` is None).
    pub restored: Restored,
    /// What the copy says of it besides: the latest claim whose move
    /// brought it whole to the dead node (0: none), and its birth as its
    /// client was told about it (0: never told, as far as the copy says).
    pub marks: Marks,
}

/// What reading a peer's log copy gave ([`read_copy`]).
#[derive(Debug)]
pub struct Adoption {
    /// The sessions that had not expired, in no particular order.
    pub sessions: Vec<AdoptedSession>,
    /// What was read, for the log.
    pub summary: String,
}

/// Read the copy of a dead peer's logs at `root` (a data directory:
/// `CURRENT` and its generation's shard logs) the way recovery reads a
/// data directory, steps 1 to 3 of the module docs (a connected session
/// counts as disconnected at the copy's last clock record, an expired one
/// ends, an accepted message not known applied is routed again to the
/// copy's sessions, a message a session would hold twice is held once),
/// but writes no generation (only the lock file `DataDir` takes): the
/// sessions are for the adopting node's shards to take in. Wills, retained messages and delayed
/// publishes are left out (peers hold and publish a dead node's wills,
/// retained messages are on every node; delayed publishes are not
/// replicated: a cut). `Ok(None)` when the copy has no `CURRENT` (it never
/// caught up once).
pub fn read_copy(
    disk: Arc<dyn Disk>,
    root: &Path,
    clock: WallClock,
) -> Result<Option<Adoption>, RecoveryError> {
    let dir = DataDir::open_on(disk, root)?;
    let io = |what: &str| {
        let dir = root.display().to_string();
        let what = what.to_string();
        move |source| RecoveryError::Io { dir, what, source }
    };
    let Some(gen) = dir.current().map_err(io("read CURRENT"))? else {
        return Ok(None);
    };
    let mut lines = Vec::new();
    let mut images = Vec::new();
    for (shard, path) in dir.shard_dirs(gen).map_err(io("list shard logs"))? {
        let (image, report, bad) = read_shard(dir.disk().as_ref(), &path, shard, &clock)
            .map_err(io(&format!("read {}", path.display())))?;
        lines.push(describe(shard, &report, bad));
        images.push(image);
    }
    let mut state = Merge::new(&images, &clock);
    state.gather_sessions();
    state.settle_sessions();
    state.wills.clear();
    state.reroute_accepted();
    let mut counts = Counts {
        expired: state.expired,
        rerouted: state.rerouted,
        ..Counts::default()
    };
    let no_ids = HashMap::default();
    let mut sessions = Vec::new();
    for mut g in std::mem::take(&mut state.sessions) {
        if g.ended {
            continue;
        }
        // A message once per session: one the copy's shards hold both as
        // stored and as accepted and not known applied (their copies were
        // taken at different moments) is routed again above; its number
        // in the cluster tells.
        let mut ids = crate::hash::HashSet::default();
        g.deliveries
            .retain(|(_, m, _)| m.id == 0 || ids.insert(m.id));
        // In the order recovery restores them.
        let mut restored = restore(&g, &no_ids, &clock, &mut counts);
        restored.pending_will = None;
        counts.sessions += 1;
        sessions.push(AdoptedSession {
            client_id: Arc::from(g.rec.client_id.as_str()),
            restored,
            marks: g.marks,
        });
    }
    lines.push(format!(
        "read {} sessions ({} ended on expiry), {} queued and {} in-flight messages \
         ({} routed again) from generation {gen}",
        counts.sessions, counts.expired, counts.queued, counts.inflight, counts.rerouted
    ));
    Ok(Some(Adoption {
        sessions,
        summary: lines.join("; "),
    }))
}

/// Replay one shard log. Returns the image, the scan report and how many
/// records were valid but could not be understood.
fn read_shard(
    disk: &dyn Disk,
    path: &Path,
    shard: usize,
    clock: &WallClock,
) -> std::io::Result<(ShardImage, ScanReport, u64)> {
    let mut image = ShardImage::new(shard);
    let mut bad = 0;
    let report = scan_on(disk, path, |r| match Rec::decode(r.kind, r.body, clock) {
        Ok(rec) => image.apply(rec),
        Err(e) => {
            bad += 1;
            log::error!(
                "shard {shard} log: record {} (kind {}) does not decode: {e}; skipped",
                r.seq,
                r.kind
            );
        }
    })?;
    Ok((image, report, bad))
}

fn describe(shard: usize, r: &ScanReport, bad: u64) -> String {
    let mut line = format!(
        "shard {shard} log: {} records ({} bytes) in {} segments replayed",
        r.records,
        r.bytes,
        r.segments.len()
    );
    if bad > 0 {
        line += &format!("; {bad} records could not be decoded and were skipped");
    }
    match &r.damage {
        None => {}
        Some(d) if d.is_corruption() => {
            log::error!("shard {shard} log: {d}");
            line += &format!("; DAMAGE: {d}");
        }
        Some(d) => {
            log::warn!("shard {shard} log: {d}");
            line += &format!("; {d}");
        }
    }
    line
}

/// Delete the segments after the last one holding a record (the spare,
/// all zeros): the next generation needs their room more, on a full disk.
fn drop_empty_segments(disk: &dyn Disk, report: &ScanReport) {
    let Some(last) = report.last_segment.as_ref() else {
        return;
    };
    let Some(pos) = report.segments.iter().position(|p| p == last) else {
        return;
    };
    for empty in &report.segments[pos + 1..] {
        if let Err(e) = disk.remove_file(empty) {
            log::warn!("cannot delete the empty segment {}: {e}", empty.display());
        }
    }
}

/// Copy the segment files of a damaged log aside for inspection.
fn keep_damaged(dir: &DataDir, gen: u64, shard: usize, report: &ScanReport) {
    let to = dir
        .damaged_dir()
        .join(format!("gen-{gen:06}-shard-{shard}"));
    if let Err(e) = dir.disk().create_dir_all(&to) {
        log::error!("cannot keep damaged segments in {}: {e}", to.display());
        return;
    }
    for seg in &report.segments {
        let name = seg.file_name().expect("segment files have names");
        if let Err(e) = dir.disk().copy(seg, &to.join(name)) {
            log::error!("cannot keep {}: {e}", seg.display());
        }
    }
    log::error!(
        "shard {shard} log: its segments are kept in {} for inspection",
        to.display()
    );
}

/// Key of a recovered subscription: a gathered session and the share name.
type SubKey = (usize, Option<Arc<str>>);

/// The node-wide state being put together.
struct Merge<'a> {
    images: &'a [ShardImage],
    now_ms: u64,
    /// The same moment as an `Instant`.
    now: Instant,
    /// Roughly when the broker stopped: its last clock record.
    crash_ms: u64,
    old_shards: usize,
    sessions: Vec<Gathered>,
    /// Every live subscription, with the filter inside a `$share/...`.
    subscriptions: FilterTrie<SubKey, (Subscription, Arc<str>)>,
    retained: HashMap<Arc<str>, (Arc<Message>, u64)>,
    delayed: Vec<(u64, Arc<Message>)>,
    /// Wills to publish now.
    wills: Vec<Arc<Message>>,
    next_order: u64,
    shared_next: HashMap<SharedPick, usize>,
    rerouted: u64,
    wills_published: u64,
    expired: u64,
}

impl<'a> Merge<'a> {
    fn new(images: &'a [ShardImage], clock: &WallClock) -> Merge<'a> {
        let now_ms = clock.anchor_ms();
        let crash_ms = images
            .iter()
            .map(|i| i.last_ms)
            .max()
            .filter(|&ms| ms > 0)
            .unwrap_or(now_ms)
            .min(now_ms);
        Merge {
            images,
            now_ms,
            now: clock.anchor(),
            crash_ms,
            old_shards: images.len().max(1),
            sessions: Vec::new(),
            subscriptions: FilterTrie::new(),
            retained: HashMap::default(),
            delayed: Vec::new(),
            wills: Vec::new(),
            next_order: 0,
            shared_next: HashMap::default(),
            rerouted: 0,
            wills_published: 0,
            expired: 0,
        }
    }

    fn gather_sessions(&mut self) {
        let mut seen: HashMap<String, ()> = HashMap::default();
        for image in self.images {
            for (sid, rec) in &image.sessions {
                if seen.insert(rec.client_id.clone(), ()).is_some() {
                    log::warn!(
                        "client {} has a session in more than one shard log; keeping the first",
                        rec.client_id
                    );
                    continue;
                }
                let deliveries = image
                    .deliveries_of(*sid)
                    .into_iter()
                    .map(|(id, m, t)| ((0, image.shard as u64, id), m, t))
                    .collect();
                self.sessions.push(Gathered {
                    old_shard: image.shard,
                    rec: rec.clone(),
                    marks: Marks::of(image, *sid),
                    deliveries,
                    ended: false,
                });
            }
        }
    }

    /// Connected sessions became disconnected when the broker stopped;
    /// expired ones end; due wills are collected for publishing.
    fn settle_sessions(&mut self) {
        for i in 0..self.sessions.len() {
            let s = &mut self.sessions[i].rec;
            if s.offline_since_ms.is_none() {
                s.offline_since_ms = Some(self.crash_ms);
                if let Some(w) = &s.will {
                    let delay = will_delay_s(w, s.expiry_s);
                    s.will_due_ms = Some(self.crash_ms.saturating_add(u64::from(delay) * 1000));
                }
            }
            let since = s.offline_since_ms.expect("set above");
            let expired = expires_after_s(s.expiry_s)
                .is_some_and(|e| since.saturating_add(u64::from(e) * 1000) <= self.now_ms);
            let will_due = s.will_due_ms.is_some_and(|d| d <= self.now_ms);
            if (expired || will_due) && s.will.is_some() {
                let will = s.will.take().expect("checked");
                s.will_due_ms = None;
                self.wills
                    .push(Arc::new(Message::from_will(will, self.now)));
            }
            if expired {
                self.sessions[i].ended = true;
                self.expired += 1;
            }
        }
        for (i, g) in self.sessions.iter().enumerate() {
            if g.ended {
                continue;
            }
            for (filter, sub) in &g.rec.subscriptions {
                let (group, inner) = split_shared(filter);
                let value = (sub.clone(), Arc::<str>::from(inner));
                self.subscriptions.insert(inner, (i, group), value);
            }
        }
    }

    /// Route again what was accepted and not known applied everywhere.
    fn reroute_accepted(&mut self) {
        for image in self.images {
            for (id, a) in &image.accepted {
                let origin = Origin {
                    shard: image.shard as u16,
                    id: *id,
                };
                self.route(&a.message, &a.scope, Some(origin), a.stamp_ms);
            }
        }
    }

    fn publish_wills(&mut self) {
        for will in std::mem::take(&mut self.wills) {
            self.wills_published += 1;
            self.route(&will, &Scope::everyone(), None, self.now_ms);
        }
    }

    /// Did the old shard `shard` apply `origin` (for `pick`, or its
    /// ordinary subscribers when `pick` is None)?
    fn applied(&self, shard: usize, origin: Option<Origin>, pick: Option<&SharedPick>) -> bool {
        let Some(o) = origin else {
            return false;
        };
        let Some(scope) = self.images.get(shard).and_then(|i| i.applied.get(&o)) else {
            return false;
        };
        match pick {
            None => scope.ordinary,
            Some(p) => scope.shared.contains(p),
        }
    }

    /// Deliver `message` to the persistent sessions that should have it and
    /// did not get it, and to the retained store.
    fn route(&mut self, message: &Arc<Message>, scope: &Scope, origin: Option<Origin>, stamp: u64) {
        if message.is_expired(self.now) {
            return;
        }
        self.rerouted += u64::from(origin.is_some());
        if message.retain && scope.ordinary && !scope.retained_elsewhere {
            let owner = home_shard(&message.topic, self.old_shards);
            let stored = origin.is_some_and(|o| {
                self.images
                    .get(owner)
                    .is_some_and(|i| i.applied_retain.contains(&o))
            });
            if !stored {
                self.merge_retained(message.clone(), stamp);
            }
        }
        // The fan-out live routing uses, over every recovered session.
        let sessions = &self.sessions;
        let publisher = message.publisher.as_deref();
        let is_publisher = |i: usize| publisher == Some(sessions[i].rec.client_id.as_str());
        let wants = |p: &SharedPick| scope.every_pick || scope.shared.contains(p);
        let mut fan = Fan::new(message, scope.ordinary, wants, is_publisher);
        self.subscriptions
            .for_each_match(&message.topic, |(i, group), (sub, inner)| {
                fan.add(Match {
                    session: *i,
                    group: group.as_ref(),
                    filter: inner,
                    options: &sub.options,
                    subscription_id: sub.subscription_id,
                });
            });
        let FanOut { ordinary, shared } = fan.finish();
        let order = (1, self.next_order, 0);
        self.next_order += 1;
        let stored = |t: fanout::Target<usize>| Target {
            sid: 0,
            qos: t.qos,
            retain: t.retain,
            subscription_ids: t.subscription_ids,
            state: TargetState::Queued,
        };
        // Only what a persistent session stores: QoS 1/2.
        for t in ordinary.into_iter().filter(|t| t.qos != QoS::AtMostOnce) {
            let i = t.session;
            if !self.applied(self.sessions[i].old_shard, origin, None) {
                self.sessions[i]
                    .deliveries
                    .push((order, message.clone(), stored(t)));
            }
        }
        for (pick, mut members) in shared {
            // A QoS 0 member would not store it: the message must not be
            // lost to a QoS 0 member of an offline group.
            members.retain(|t| t.qos != QoS::AtMostOnce);
            let done = (0..self.images.len()).any(|s| self.applied(s, origin, Some(&pick)));
            if done {
                continue;
            }
            let next = self.shared_next.entry(pick).or_insert(0);
            let Some(m) = fanout::choose_member(&members, next, |_| false) else {
                continue;
            };
            let t = members.swap_remove(m);
            let i = t.session;
            self.sessions[i]
                .deliveries
                .push((order, message.clone(), stored(t)));
        }
    }

    fn merge_retained(&mut self, message: Arc<Message>, stamp: u64) {
        let newer = self
            .retained
            .get(&message.topic)
            .is_none_or(|(_, s)| *s <= stamp);
        if newer {
            self.retained
                .insert(message.topic.clone(), (message, stamp));
        }
    }

    fn gather_retained_and_delayed(&mut self) {
        for image in self.images {
            for (m, stamp) in image.retained.values() {
                self.merge_retained(m.clone(), *stamp);
            }
            for (due, m) in image.delayed.values() {
                self.delayed.push((*due, m.clone()));
            }
        }
    }

    /// An empty retained message deletes its topic's: once merged, it goes.
    fn drop_retained_deletions(&mut self) {
        self.retained.retain(|_, (m, _)| !m.payload.is_empty());
    }
}

/// Counts for the summary line.
#[derive(Default)]
struct Counts {
    sessions: u64,
    expired: u64,
    queued: u64,
    inflight: u64,
    retained: u64,
    delayed: u64,
    rerouted: u64,
    wills: u64,
}

/// What writing the next generation produced.
struct Written {
    starts: Vec<ShardStart>,
    routes: Vec<(usize, String)>,
    counts: Counts,
}

/// Stored messages of one new shard log, in the global order, with the
/// sessions holding each.
type Ordered = BTreeMap<OrderKey, (Arc<Message>, Vec<(Sid, Target)>)>;

/// Appends records to a new shard log, reporting where each went.
struct Put<'a> {
    clock: &'a WallClock,
    writer: Writer,
}

impl Put<'_> {
    /// Append `rec`; returns (segment, size).
    fn put(&mut self, log: &mut Log, rec: &Rec) -> std::io::Result<(u64, u32)> {
        self.writer.append(log, self.clock, rec).map_err(|e| {
            let kind = match e {
                AppendError::Full => std::io::ErrorKind::StorageFull,
                AppendError::TooLarge { .. } => std::io::ErrorKind::InvalidData,
            };
            std::io::Error::new(kind, e)
        })
    }

    /// Append `recs`; returns where the first one starts and the total
    /// size.
    fn put_all(&mut self, log: &mut Log, recs: &[Rec]) -> std::io::Result<(RecordAt, u32)> {
        let mut first = None;
        let mut bytes: u32 = 0;
        for rec in recs {
            let (_, b) = self.put(log, rec)?;
            first.get_or_insert(log.last_at());
            bytes = bytes.saturating_add(b);
        }
        let at = first.unwrap_or_else(|| RecordAt {
            segment: log.current_index(),
            offset: 0,
        });
        Ok((at, bytes))
    }
}

/// Write the next generation and build each shard's start.
fn write_generation(
    dir: &DataDir,
    generation: u64,
    settings: &RecoverySettings,
    clock: &WallClock,
    mut state: Merge<'_>,
) -> std::io::Result<Written> {
    let n = settings.shards;
    let mut counts = Counts {
        expired: state.expired,
        rerouted: state.rerouted,
        wills: state.wills_published,
        ..Counts::default()
    };
    let _ = dir.disk().remove_dir_all(&dir.generation_dir(generation));
    let mut w = Put {
        clock,
        writer: Writer::default(),
    };
    let mut starts = Vec::with_capacity(n);
    for shard in 0..n {
        let mut log = Log::create_without_spare(
            dir.disk().clone(),
            &dir.shard_dir(generation, shard),
            settings.segment_bytes,
            0,
            1,
        )?;
        let start = Rec::Start {
            shard: shard as u16,
            shards: n as u16,
        };
        w.put(&mut log, &start)?;
        w.put(
            &mut log,
            &Rec::Clock {
                ms: clock.anchor_ms(),
            },
        )?;
        starts.push(ShardStart {
            log,
            sessions: Vec::new(),
            messages: Vec::new(),
            retained: Vec::new(),
            delayed: Vec::new(),
            next_sid: 1,
            next_message_id: 1,
            next_delayed_id: 1,
        });
    }
    let mut routes = Vec::new();
    let mut per_shard: Vec<Vec<Gathered>> = (0..n).map(|_| Vec::new()).collect();
    for g in std::mem::take(&mut state.sessions) {
        if !g.ended {
            per_shard[home_shard(&g.rec.client_id, n)].push(g);
        }
    }
    for (shard, gathered) in per_shard.into_iter().enumerate() {
        let start = &mut starts[shard];
        // Stored messages of this shard in the global order, numbered anew.
        let mut order: Ordered = BTreeMap::new();
        let mut sessions = Vec::new();
        for mut g in gathered {
            let sid = start.next_sid;
            start.next_sid += 1;
            g.rec.sid = sid;
            for (filter, _) in &g.rec.subscriptions {
                routes.push((shard, filter.clone()));
            }
            let budget = start.log.segment_bytes() / 8;
            let (at, bytes) = w.put_all(&mut start.log, &session_records(g.rec.clone(), budget))?;
            for mark in g.marks.records(sid) {
                w.put(&mut start.log, &mark)?;
            }
            let seg = at.segment;
            for (key, m, t) in &g.deliveries {
                let e = order.entry(*key).or_insert_with(|| (m.clone(), Vec::new()));
                e.1.push((sid, Target { sid, ..t.clone() }));
            }
            sessions.push((sid, seg, bytes, g));
        }
        let mut ids: HashMap<OrderKey, u64> = HashMap::default();
        for (key, (message, targets)) in order {
            let id = start.next_message_id;
            start.next_message_id += 1;
            ids.insert(key, id);
            let records: Vec<Target> = targets.iter().map(|(_, t)| t.clone()).collect();
            let recs = message_records(id, None, &Scope::everyone(), &message, &records);
            let (at, bytes) = w.put_all(&mut start.log, &recs)?;
            start.messages.push(MessageStart {
                id,
                at,
                bytes,
                sids: targets.iter().map(|(s, _)| *s).collect(),
            });
        }
        for (sid, seg, bytes, g) in sessions {
            let restored = restore(&g, &ids, clock, &mut counts);
            counts.sessions += 1;
            start.sessions.push(SessionStart {
                sid,
                seg,
                bytes,
                client_id: Arc::from(g.rec.client_id.as_str()),
                restored,
                marks: g.marks,
            });
        }
    }
    for (topic, (message, stamp_ms)) in std::mem::take(&mut state.retained) {
        let start = &mut starts[home_shard(&topic, n)];
        let rec = Rec::Retain {
            message: message.clone(),
            stamp_ms,
            origin: None,
        };
        let (seg, bytes) = w.put(&mut start.log, &rec)?;
        counts.retained += 1;
        start.retained.push(RetainedStart {
            message,
            stamp_ms,
            seg,
            bytes,
        });
    }
    for (due_ms, message) in std::mem::take(&mut state.delayed) {
        let start = &mut starts[home_shard(&message.topic, n)];
        let id = start.next_delayed_id;
        start.next_delayed_id += 1;
        let rec = Rec::Delayed {
            id,
            due_ms,
            message: message.clone(),
            from: None,
        };
        let (seg, bytes) = w.put(&mut start.log, &rec)?;
        counts.delayed += 1;
        start.delayed.push(DelayedStart {
            id,
            due_ms,
            message,
            seg,
            bytes,
        });
    }
    // Durable before CURRENT names it: records, files, directories.
    for start in &starts {
        start.log.sync_all()?;
    }
    dir.disk().sync_dir(&dir.generation_dir(generation))?;
    Ok(Written {
        starts,
        routes,
        counts,
    })
}

/// A gathered session as the session module restores it.
fn restore(
    g: &Gathered,
    ids: &HashMap<OrderKey, u64>,
    clock: &WallClock,
    counts: &mut Counts,
) -> Restored {
    let mut inflight = Vec::new();
    let mut queue = Vec::new();
    for (key, message, t) in &g.deliveries {
        let delivery = Delivery {
            qos: t.qos,
            retain: t.retain,
            subscription_ids: t.subscription_ids.clone(),
            stored: ids.get(key).copied(),
        };
        match t.state {
            TargetState::Queued => {
                counts.queued += 1;
                queue.push((message.clone(), delivery));
            }
            TargetState::Inflight {
                packet_id,
                released,
            } => {
                counts.inflight += 1;
                inflight.push(RestoredInflight {
                    message: message.clone(),
                    delivery,
                    packet_id,
                    released,
                });
            }
        }
    }
    let r = &g.rec;
    Restored {
        expiry_s: r.expiry_s,
        offline_since: clock.to_instant(r.offline_since_ms.unwrap_or(clock.anchor_ms())),
        subscriptions: r.subscriptions.clone(),
        qos2_in: r.qos2_in.clone(),
        pending_will: match (&r.will, r.will_due_ms) {
            (Some(w), Some(due)) => Some((w.clone(), clock.to_instant(due))),
            _ => None,
        },
        inflight,
        queue,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::log::disk::MemDisk;

    /// Recovery settings for one shard on an empty disk in memory, and
    /// their clock.
    fn one_shard_on_a_disk_in_memory() -> (RecoverySettings, WallClock) {
        let clock = WallClock::now();
        let settings = RecoverySettings {
            data_dir: "/data".into(),
            shards: 1,
            segment_bytes: 1 << 20,
            clock: Some(clock),
            disk: Some(Arc::new(MemDisk::new())),
        };
        (settings, clock)
    }

    /// A restart keeps what a session's log says of it besides its state
    /// (`Rec::MovedIn`, `Rec::Told`): recovery hands the marks to the
    /// shard and writes them again in the new generation, so a second
    /// restart (or a copy of the log) still has them.
    #[test]
    fn a_restart_keeps_a_session_s_marks() {
        let (settings, clock) = one_shard_on_a_disk_in_memory();
        let recovered = |settings: &RecoverySettings| {
            let mut r = recover(settings).expect("recovers");
            let start = r.shards.remove(0);
            (start.sessions.first().map(|s| s.marks), start.log)
        };
        let (none, mut log) = recovered(&settings);
        assert_eq!(none, None, "an empty disk");
        let session = SessionRec {
            sid: 1,
            client_id: "dev".into(),
            expiry_s: 3600,
            offline_since_ms: None,
            subscriptions: Vec::new(),
            qos2_in: Vec::new(),
            will: None,
            will_due_ms: None,
        };
        let mut w = Writer::default();
        for rec in [
            Rec::Session(Box::new(session)),
            Rec::MovedIn { sid: 1, claim: 7 },
            Rec::Told { sid: 1, born: 9 },
        ] {
            w.append(&mut log, &clock, &rec).expect("room");
        }
        log.sync_all().expect("synced");
        drop(log);
        let marks = Marks {
            moved_in: 7,
            told: 9,
        };
        let (first, log) = recovered(&settings);
        assert_eq!(first, Some(marks));
        drop(log);
        let (second, _) = recovered(&settings);
        assert_eq!(second, Some(marks), "written again in the new generation");
    }

    /// An accepted message not known applied goes again to whom its
    /// record names: a fresh publish to everyone, a pick served again to
    /// its group only, a peer's message to the ordinary subscribers (and
    /// the picks it lists), its retained copy to this node's store only
    /// when this node keeps it.
    #[test]
    fn an_unsettled_accept_goes_again_only_to_whom_its_record_names() {
        use crate::codec::{Properties, QoS, SubOptions};
        use crate::persist::record::Causes;
        let (settings, clock) = one_shard_on_a_disk_in_memory();
        let mut log = recover(&settings).expect("recovers").shards.remove(0).log;
        let sub = |filter: &str| {
            let options = SubOptions {
                qos: QoS::AtLeastOnce,
                no_local: false,
                retain_as_published: false,
                retain_handling: 0,
            };
            let s = Subscription {
                options,
                subscription_id: None,
            };
            (filter.to_string(), s)
        };
        let session = |sid, client_id: &str, filter: &str| {
            Rec::Session(Box::new(SessionRec {
                sid,
                client_id: client_id.into(),
                expiry_s: 3600,
                offline_since_ms: None,
                subscriptions: vec![sub(filter)],
                qos2_in: Vec::new(),
                will: None,
                will_due_ms: None,
            }))
        };
        let message = |topic: &str, retain: bool| {
            Arc::new(Message {
                topic: topic.into(),
                payload: bytes::Bytes::copy_from_slice(topic.as_bytes()),
                qos: QoS::AtLeastOnce,
                retain,
                properties: Properties::default().into(),
                expires_at: None,
                publisher: None,
                id: 0,
                late: false,
            })
        };
        let pick = SharedPick {
            group: "g".into(),
            filter: "t/#".into(),
        };
        let picks_only = Scope {
            shared: smallvec::SmallVec::from_buf([pick]),
            ..Scope::default()
        };
        let peers = Scope {
            ordinary: true,
            retained_elsewhere: true,
            ..Scope::default()
        };
        let accepts = [
            ("t/picks", false, picks_only),
            ("t/peers", false, peers.clone()),
            ("t/everyone", false, Scope::everyone()),
            ("t/peers-retained", true, peers),
            ("t/retained", true, Scope::everyone()),
        ];
        let mut w = Writer::default();
        let mut recs = vec![
            session(1, "sub", "t/#"),
            session(2, "member", "$share/g/t/#"),
        ];
        for (id, (topic, retain, scope)) in accepts.into_iter().enumerate() {
            recs.push(Rec::Accepted {
                id: id as u64 + 1,
                scope,
                message: message(topic, retain),
                stamp_ms: clock.anchor_ms(),
                causes: Causes::default(),
            });
        }
        for rec in recs {
            w.append(&mut log, &clock, &rec).expect("room");
        }
        log.sync_all().expect("synced");
        drop(log);
        let start = recover(&settings).expect("recovers").shards.remove(0);
        // What each session got, sorted.
        let got = |client_id: &str| -> Vec<String> {
            let s = (start.sessions.iter())
                .find(|s| &*s.client_id == client_id)
                .expect("recovered");
            let mut topics: Vec<String> = (s.restored.queue.iter())
                .map(|(m, _)| m.topic.to_string())
                .collect();
            topics.sort();
            topics
        };
        assert_eq!(
            got("sub"),
            ["t/everyone", "t/peers", "t/peers-retained", "t/retained"]
        );
        assert_eq!(got("member"), ["t/everyone", "t/picks", "t/retained"]);
        let retained: Vec<&str> = start.retained.iter().map(|r| &*r.message.topic).collect();
        assert_eq!(retained, ["t/retained"]);
    }
}
