//! Adoption: when a node is declared down, the node first up after it in
//! name order (its first standby) takes its sessions over from the copy
//! of its logs kept here (`durable::replicate`), so that a client of the
//! dead node resumes its session, with every message acknowledged for it,
//! on whichever node it connects to next. Only from a copy of that run
//! whose every shard holds what the node acknowledged (no `BEHIND` file),
//! and only when this node hears a majority of the nodes and heard the
//! dead one lately (`Bridge::on_peer_event`): a node cut off, or a copy
//! the owner stopped waiting for, would bring back stale sessions.
//!
//! Shard-local, no I/O but the copy's reading; shard 0 reads the copy
//! (`persist::recover::read_copy`) and each session goes to its home
//! shard here, where it is taken in as an offline session: written to
//! this shard's log with its deliveries, its subscriptions routed in the
//! cluster (no retained messages gathered: the session is not new). A
//! session of the same client id already here (its client came back
//! first) takes the adopted one's subscriptions and deliveries, as a
//! session moving here does. A client that then connects on another node
//! claims the session, and it moves there as any other.
//!
//! The dead node's wills are published by every peer (`wills`), which
//! gives them to the adopted sessions too, and its retained messages are
//! on every node already: the copy's are left out.
//!
//! A message a peer routed to the dead node and had not seen confirmed
//! when it was declared down goes to the node that takes its sessions over
//! (`Bridge::undeliverable`, a `Frame::Publish` naming the run); there,
//! shard 0 holds it until it has taken the sessions in (or for
//! [`ADOPT_PENDING_WAIT`], bounded by [`ADOPT_PENDING_MAX`]), then every
//! shard gives it to its sessions taken over from that run whose
//! subscriptions match, skipping what they had. Those messages are held in
//! memory meanwhile: a crash of the adopting node before it stores them
//! loses them, though their publishers were answered.
//!
//! A run declared down that comes back (a partition healed: it kept its
//! sessions, and its clients that stayed connected there) takes its
//! sessions back: the adopted ones no client connected to since end here,
//! without their wills, and what they queued meanwhile (the messages the
//! dead-looking node was not routed either) goes with them, counted.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::frame::OriginMark;
use crate::cluster::node::Node;
use crate::message::Message;
use crate::persist::recover::{read_copy, AdoptedSession, Marks};
use crate::persist::WallClock;
use crate::router::fanout::{Fan, Match};
use crate::router::{home_shard, SharedPick};
use crate::session::Session;
use crate::text::quote;

use super::durable::BEHIND;
use super::mesh::MeshMsg;
use super::remote::BridgeOut;
use super::{SessionKey, SessionSlot, ShardCore, State};

/// The birth stamp of an adopted session whose copy does not say when its
/// client was told about it (`SessionSlot::born`; an orphan): older than
/// any claim, so that a copy its client was told about since (it came back
/// before the adoption, and was told its session is new) wins.
pub(super) const ADOPTED_BORN: u64 = 1;

/// How long shard 0 holds messages for the sessions of a run declared
/// down until this node has decided whether it takes them over.
pub const ADOPT_PENDING_WAIT: Duration = Duration::from_secs(10);

/// Messages shard 0 holds so at most, and their bytes
/// ([`Message::cost_bytes`]); past either they are dropped, counted.
pub const ADOPT_PENDING_MAX: usize = 100_000;
/// See [`ADOPT_PENDING_MAX`].
pub const ADOPT_PENDING_BYTES_MAX: usize = 64 << 20;

/// Runs of peers whose adoption shard 0 remembers deciding.
const DECIDED_KEPT: usize = 64;

/// How long a shard refuses CONNECTs that resume a session after a node
/// was declared down, while the node next after it may be taking its
/// sessions over: a client of the dead node told here that its session is
/// new would make the copy taken over stale (it is dropped). The next
/// node's word that it is done ([`crate::cluster::frame::Frame::Adopted`])
/// ends the wait sooner, as does a newer run of the dead node coming up.
pub const ADOPT_CONNECT_WAIT: Duration = Duration::from_secs(10);

/// A run of a peer (its name and incarnation).
pub(super) type Run = (Arc<str>, u64);

/// What adoption counted on a shard (part of its cluster state).
#[derive(Debug, Default)]
pub(super) struct Adoptions {
    /// Sessions taken over from dead nodes' log copies.
    pub(super) sessions: u64,
    /// Of those, taken into a session of the same client id here.
    pub(super) merged: u64,
    /// Their deliveries.
    pub(super) deliveries: u64,
    /// Adopted sessions given back (their node's run came back), and the
    /// deliveries they dropped.
    pub(super) given_back: u64,
    pub(super) given_back_deliveries: u64,
    /// Adopted sessions dropped: their client came back first and was
    /// told its session is new; and their deliveries.
    pub(super) stale: u64,
    pub(super) stale_deliveries: u64,
    /// Adopted sessions that found no room (`limits.sessions_max`).
    pub(super) refused: u64,
    /// The sessions taken over here: the peer (index, name) and run they
    /// came from, their key and uid. Pruned of sessions gone.
    pub(super) taken: Vec<Taken>,
    /// Shard 0: the runs declared down whose adoption this node decided,
    /// and whether it took their sessions, with the peer's index (latest
    /// [`DECIDED_KEPT`]).
    pub(super) decided: VecDeque<(Run, bool, u16)>,
    /// Shard 0: messages for the sessions of runs not decided yet (or
    /// whose sessions every shard has not taken in yet).
    pending: VecDeque<Pending>,
    pending_bytes: usize,
    /// Shard 0: runs taken over whose sessions some shards have not taken
    /// in yet, and how many.
    pub(super) taking: Vec<(Run, usize)>,
    /// Shard 0: runs this node is next after, whose end of adoption the
    /// peers and this node's shards are told of once every shard took its
    /// sessions in (or at once when none are taken).
    tell: Vec<Run>,
    /// Messages for adopted sessions that found none to go to (this node
    /// took no session of that run, or past the bounds above).
    pub(super) messages_dropped: u64,
    /// Messages given to adopted sessions.
    pub(super) messages_delivered: u64,
}

/// A message held for the sessions of a run declared down.
#[derive(Debug)]
pub struct Pending {
    at: Instant,
    of: Run,
    message: Arc<Message>,
    /// For its ordinary subscribers.
    ordinary: bool,
    /// Shared subscriptions it was to serve.
    shared: Vec<SharedPick>,
    /// A will of a client of that run: every node has one to give, only
    /// the one that took the sessions over counts it.
    will: bool,
}

impl Pending {
    /// A will of a client of run `of`, for the sessions taken over from
    /// it (every node publishes it to its own subscribers).
    pub(super) fn will(at: Instant, of: Run, message: Arc<Message>) -> Pending {
        Pending {
            at,
            of,
            message,
            ordinary: true,
            shared: Vec::new(),
            will: true,
        }
    }
}

/// A session taken over from a peer's run.
#[derive(Debug)]
pub(super) struct Taken {
    peer: u16,
    run: Run,
    key: SessionKey,
    uid: u64,
}

impl ShardCore {
    /// Shard 0, peer `peer` (`node`, run `run`) declared down; `next`:
    /// this node is the first up after it in name order (it tells the
    /// others when it is done with that run's sessions), and `mine`: it
    /// may take them (it hears a majority, heard the node lately). Then take over
    /// its sessions from the copy of its logs kept here, if the copy is of
    /// that run and whole: reads the copy's files (blocking), and each
    /// session goes to its home shard. Either way the messages held for
    /// that run's sessions go on (or are dropped, counted). Returns how
    /// many sessions were taken over.
    pub fn adopt_if_mine(
        &self,
        now: Instant,
        peer: u16,
        dead: &Node,
        (next, mine): (bool, bool),
    ) -> usize {
        let (node, run) = (dead.name.as_str(), dead.incarnation);
        let count = match mine {
            true => self.adopt_copy_of(now, peer, node, run, usize::from(dead.shards)),
            false => 0,
        };
        let mut st = self.state.borrow_mut();
        let Some(r) = st.remote.as_mut() else {
            return count;
        };
        let a = &mut r.adoptions;
        let key: Run = (Arc::from(node), run);
        if a.decided.len() == DECIDED_KEPT {
            a.decided.pop_front();
        }
        a.decided.push_back((key.clone(), count > 0, peer));
        if next && !a.tell.contains(&key) {
            a.tell.push(key.clone());
        }
        self.release_pending(&mut st, now, &key);
        Self::debug_invariants(&st);
        count
    }

    /// Shard 0: the messages held for run `of`'s sessions go on, once
    /// this node decided on them and every shard took its sessions in
    /// (their routes, sent ahead on the same lanes, are here then).
    fn release_pending(&self, st: &mut State, now: Instant, of: &Run) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let a = &mut r.adoptions;
        if a.taking.iter().any(|(k, _)| k == of) {
            return;
        }
        // Done with that run's sessions: every shard here, and the peers,
        // take CONNECTs that resume a session again.
        if let Some(i) = a.tell.iter().position(|k| k == of) {
            a.tell.swap_remove(i);
            let of = of.clone();
            self.mesh.broadcast(|| MeshMsg::Adopted { of: of.clone() });
            self.adoption_over(st, &of);
        }
        // Sessions orphaned by that run's death first: the messages held
        // may be for them.
        self.release_orphans(st, now, of);
        let a = match st.remote.as_mut() {
            Some(r) => &mut r.adoptions,
            None => return,
        };
        let (held, rest): (VecDeque<_>, VecDeque<_>) =
            a.pending.drain(..).partition(|p| p.of == *of);
        a.pending = rest;
        let bytes: usize = held.iter().map(|p| p.message.cost_bytes()).sum();
        a.pending_bytes = a.pending_bytes.saturating_sub(bytes);
        for p in held {
            self.adopted_message(st, now, p);
        }
    }

    /// Run `dead` was declared down (no newer run of it up): until the
    /// node next after it is done with its sessions, or for
    /// [`ADOPT_CONNECT_WAIT`], a CONNECT here that resumes a session is
    /// refused (0x88; its client tries again). Not without copies to take
    /// over from (`cluster.replicas = 1`).
    pub fn await_adoption(&self, now: Instant, dead: &Node) {
        if self.config.cluster.replicas < 2 {
            return;
        }
        let (node, run) = (dead.name.as_str(), dead.incarnation);
        // Told already (the word can come before this shard hears of
        // the death).
        if (self.adoptions_over.borrow().iter()).any(|(n, r)| &**n == node && *r >= run) {
            return;
        }
        let key: Run = (Arc::from(node), run);
        let mut waits = self.adoption_waits.borrow_mut();
        if !waits.iter().any(|(k, _)| *k == key) {
            waits.push((key, now));
        }
    }

    /// Remember that runs of `node` up to `run` need no wait.
    pub(super) fn note_adoption_over(&self, node: &Arc<str>, run: u64) {
        self.adoption_waits
            .borrow_mut()
            .retain(|((n, r), _)| n != node || *r > run);
        let mut over = self.adoptions_over.borrow_mut();
        if over.iter().any(|(n, r)| n == node && *r >= run) {
            return;
        }
        over.retain(|(n, _)| n != node);
        if over.len() == DECIDED_KEPT {
            over.pop_front();
        }
        over.push_back((node.clone(), run));
    }

    /// Run `run` of `node` is up (a restart, or a run that rejoined after
    /// it was declared down: it keeps its sessions): no wait for it or an
    /// earlier run, and its next death waits again.
    pub fn peer_run_is_up(&self, node: &str, run: u64) {
        self.adoption_waits
            .borrow_mut()
            .retain(|((n, r), _)| &**n != node || *r > run);
        (self.adoptions_over.borrow_mut()).retain(|(n, _)| &**n != node);
        self.note_adoption_over(&Arc::from(node), run.saturating_sub(1));
    }

    /// The node next after run `of` is done with its sessions (its
    /// [`crate::cluster::frame::Frame::Adopted`], or this node's shard 0):
    /// the wait for it ends here, and this shard tells the peers on its
    /// links when it is this node's.
    pub(super) fn adoption_over(&self, st: &mut State, of: &Run) {
        self.note_adoption_over(&of.0, of.1);
        if let Some(r) = st.remote.as_mut() {
            r.out.push_back(BridgeOut::Adopted { of: of.clone() });
            r.wake.notify();
        }
    }

    /// A peer next after `node`'s run `run` is done with its sessions
    /// (its word reached this shard's link): the waits for that run and
    /// earlier ones end here and on every other shard (a shard's link from
    /// that peer may be down, or missing: nodes of fewer shards).
    pub fn adopted_elsewhere(&self, node: &str, run: u64) {
        let node: Arc<str> = Arc::from(node);
        self.note_adoption_over(&node, run);
        self.mesh.broadcast(|| MeshMsg::AdoptionNoted {
            of: (node.clone(), run),
        });
    }

    /// True while this shard waits for a dead run's sessions to be taken
    /// over ([`ShardCore::await_adoption`]); waits past
    /// [`ADOPT_CONNECT_WAIT`] end (logged).
    pub(super) fn adoption_awaited(&self, now: Instant) -> bool {
        let mut waits = self.adoption_waits.borrow_mut();
        waits.retain(|((node, run), since)| {
            let over = now.saturating_duration_since(*since) >= ADOPT_CONNECT_WAIT;
            if over {
                shard_log!(
                    self,
                    log::Level::Warn,
                    "cluster: no word within {} s that node {}'s sessions (run {run}) were \
                     taken over: CONNECTs that resume a session are taken again",
                    ADOPT_CONNECT_WAIT.as_secs(),
                    quote(node)
                );
            }
            !over
        });
        !waits.is_empty()
    }

    /// Shard 0: another shard took in its sessions of run `of`.
    pub(super) fn adopt_done(&self, st: &mut State, now: Instant, of: Run) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let taking = &mut r.adoptions.taking;
        if let Some(i) = taking.iter().position(|(k, _)| *k == of) {
            taking[i].1 -= 1;
            if taking[i].1 == 0 {
                taking.swap_remove(i);
            }
        }
        self.release_pending(st, now, &of);
    }

    /// Take over the sessions of peer `peer`'s run `run` (`shards`
    /// shards) from the copy of its logs kept here; how many.
    fn adopt_copy_of(&self, now: Instant, peer: u16, node: &str, run: u64, shards: usize) -> usize {
        let copy = self
            .log_copies()
            .into_iter()
            .find(|c| &*c.node == node && c.shard == 0);
        let Some(copy) = copy else {
            return 0;
        };
        if copy.run != run || !copy.whole {
            log::warn!(
                "cluster: node {} is down; the copy of its log here is {}: its sessions are \
                 not taken over (they are lost unless it comes back)",
                quote(node),
                match copy.run == run {
                    true => "still catching up".to_string(),
                    false => format!("of its run {}, not {run}", copy.run),
                }
            );
            return 0;
        }
        let Some((gen, root)) = copy.dir.parent().and_then(|g| Some((g, g.parent()?))) else {
            return 0;
        };
        let (disk, clock) = {
            let st = self.state.borrow();
            let (Some(store), Some(r)) = (st.store.as_ref(), st.remote.as_ref()) else {
                return 0;
            };
            (store.disk(), WallClock::at(now, r.wall.to_ms(now)))
        };
        // Every shard's copy, each holding what its owner acknowledged.
        let behind: Vec<usize> = (0..shards)
            .filter(|i| {
                let dir = gen.join(format!("shard-{i}"));
                (disk.list(&dir).ok()).is_none_or(|files| files.iter().any(|f| f.ends_with(BEHIND)))
            })
            .collect();
        if !behind.is_empty() {
            log::warn!(
                "cluster: node {} is down; the copies of its shards {behind:?} here may lack \
                 what it acknowledged (missing, or catching up when it went): its sessions \
                 are not taken over (they are lost unless it comes back)",
                quote(node)
            );
            return 0;
        }
        let adoption = match read_copy(disk.clone(), root, clock) {
            Ok(Some(a)) => a,
            Ok(None) => return 0,
            Err(e) => {
                log::error!(
                    "cluster: node {} is down; its sessions are not taken over: {e}",
                    quote(node)
                );
                return 0;
            }
        };
        // Once: the copy's files stay until that node's next copy
        // replaces them.
        if let Err(e) = disk.remove_file(&root.join("CURRENT")) {
            log::warn!(
                "cluster: cannot remove {}/CURRENT after taking its sessions over: {e}",
                root.display()
            );
        }
        let count = adoption.sessions.len();
        log::info!(
            "cluster: node {} is down: this node takes over its sessions from the copy of its \
             log: {count} ({})",
            quote(node),
            adoption.summary
        );
        let mut per_shard: Vec<Vec<AdoptedSession>> =
            (0..self.shards).map(|_| Vec::new()).collect();
        for s in adoption.sessions {
            per_shard[home_shard(&s.client_id, self.shards)].push(s);
        }
        let mut st = self.state.borrow_mut();
        let node: Arc<str> = Arc::from(node);
        let others = (0..self.shards)
            .filter(|&s| s != self.id && !per_shard[s].is_empty())
            .count();
        if let (Some(r), true) = (st.remote.as_mut(), others > 0) {
            r.adoptions.taking.push(((node.clone(), run), others));
        }
        for (shard, sessions) in per_shard.into_iter().enumerate() {
            if sessions.is_empty() {
                continue;
            }
            if shard == self.id {
                self.adopt_here(&mut st, now, peer, (node.clone(), run), sessions, None);
            } else {
                let msg = MeshMsg::Adopt {
                    peer,
                    node: node.clone(),
                    run,
                    sessions,
                    orphan: None,
                };
                self.mesh.send(shard, msg);
            }
        }
        count
    }

    /// On the home shard: take in `sessions` of peer `peer`'s run `of`:
    /// from the copy of its log, or (`orphan`: the claim of its move) one
    /// that moved there and was orphaned by its death (`orphans`).
    pub(super) fn adopt_here(
        &self,
        st: &mut State,
        now: Instant,
        peer: u16,
        of: Run,
        sessions: Vec<AdoptedSession>,
        orphan: Option<u64>,
    ) {
        let run = of.1;
        // Those gone since the last adoption go from the list.
        if let Some(r) = st.remote.as_mut() {
            let sessions = &st.sessions;
            (r.adoptions.taken).retain(|t| sessions.get(t.key).is_some_and(|s| s.uid == t.uid));
        }
        for AdoptedSession {
            client_id,
            restored: mut bare,
            marks: Marks {
                moved_in,
                told: copy_told,
            },
        } in sessions
        {
            if !self.orphan_wanted(st, now, &of, &client_id, (orphan, moved_in)) {
                continue;
            }
            // Taken in below, whether into a new session or one here.
            let subscriptions = std::mem::take(&mut bare.subscriptions);
            let qos2_in = std::mem::take(&mut bare.qos2_in);
            let mut inflight = std::mem::take(&mut bare.inflight);
            let mut queue = std::mem::take(&mut bare.queue);
            let here = st.by_client.get(&client_id).copied();
            // (A session that was moving here from that node when it died
            // is the same one: the copy holds what the move did not bring.)
            let moving =
                (st.remote.as_ref()).is_some_and(|r| r.moves.is_moving_in_from(&client_id, peer));
            // Stale only if its client was told about it, and about the
            // session here later (seed 47263: a copy made for a CONNECT
            // never answered there, the session here the one its client
            // knew, both with messages of their own).
            let told = here.and_then(|k| st.sessions.get_mut(k)).is_some_and(|s| {
                let cut_short = s.cut_short_from.take_if(|n| **n == *of.0).is_some() || moving;
                let copy_born = (copy_told != 0).then_some(copy_told.max(ADOPTED_BORN));
                !cut_short && s.born_told && copy_born.is_some_and(|b| s.born > b)
            });
            if told {
                // Its client came back first and was told its session is
                // new: the copy is older than what it knows (its QoS 2
                // messages in flight there would come again as new).
                if let Some(r) = st.remote.as_mut() {
                    r.adoptions.stale += 1;
                    r.adoptions.stale_deliveries += (inflight.len() + queue.len()) as u64;
                }
                shard_log!(
                    self,
                    log::Level::Warn,
                    "cluster: client {} came back before its session was taken over from the \
                     node that died, and was told its session is new: the old one is dropped \
                     ({} deliveries)",
                    quote(&client_id),
                    inflight.len() + queue.len()
                );
                continue;
            }
            let key = match here {
                Some(key) => {
                    if let (Some(r), None) = (st.remote.as_mut(), orphan) {
                        r.adoptions.merged += 1;
                    }
                    // Its client was told about the copy later than about
                    // this one (or never about this one): the merged
                    // session is the one it knows.
                    let later = (st.sessions.get_mut(key))
                        .filter(|s| copy_told != 0 && (!s.born_told || copy_told > s.born));
                    if let Some(slot) = later {
                        (slot.born, slot.born_told) = (copy_told, true);
                        Self::durable_told(st, key);
                    }

                    // A CONNACK still waiting says the session is present.
                    if let Some(slot) = st.sessions.get_mut(key) {
                        slot.session.mark_present();
                    }
                    key
                }
                None if st.sessions.len() >= self.sessions_max => {
                    if let Some(r) = st.remote.as_mut() {
                        r.adoptions.refused += 1;
                    }
                    shard_log!(
                        self,
                        log::Level::Warn,
                        "cluster: client {}'s session is not taken over from the node that \
                         died: sessions_max reached ({})",
                        quote(&client_id),
                        self.sessions_max
                    );
                    continue;
                }
                None => {
                    let session = Session::restore(client_id.clone(), self.limits.clone(), bare);
                    st.last_session_uid += 1;
                    let uid = st.last_session_uid;
                    let mut slot = SessionSlot::new(session, uid, None);
                    slot.adopted_from = Some((peer, run));
                    // Its client was told about it (as the copy says): any
                    // copy it was told about since is newer.
                    (slot.born, slot.born_told) = (copy_told.max(ADOPTED_BORN), copy_told != 0);
                    let key = st.sessions.insert(slot);
                    st.by_client.insert(client_id.clone(), key);
                    Self::durable_whole(st, key);
                    key
                }
            };
            // What the copy holds and what reaches the session here may
            // meet out of their publisher's order.
            Self::note_split(st, &client_id);
            let uid = st.sessions.get(key).map_or(0, |s| s.uid);
            if let Some(r) = st.remote.as_mut() {
                let taken = &mut r.adoptions.taken;
                if !taken.iter().any(|t| t.key == key && t.uid == uid) {
                    taken.push(Taken {
                        peer,
                        run: of.clone(),
                        key,
                        uid,
                    });
                }
            }
            // A copy of one of its messages that comes later by a slower
            // path (held in a lane here, say) is skipped: what the dead
            // node's session had from an origin, it had in the origin's
            // order, up to the last one the copy holds.
            let marks = adopted_marks(&inflight, &queue);
            let mut filters = Vec::new();
            for (filter, sub) in subscriptions {
                if !filter.starts_with("$share/") {
                    filters.push(filter.clone());
                }
                if Self::take_subscription(st, key, &filter, &sub) {
                    self.route_moved(st, key, &filter, sub);
                }
            }
            let count = (inflight.len() + queue.len()) as u64;
            for i in &mut inflight {
                i.delivery.stored = Self::store_taken(st, key, &i.message, &i.delivery);
            }
            for (message, delivery) in &mut queue {
                delivery.stored = Self::store_taken(st, key, message, delivery);
            }
            let ids: Vec<u64> = (inflight.iter().map(|i| i.message.id))
                .chain(queue.iter().map(|(m, _)| m.id))
                .collect();
            if let Some(slot) = st.sessions.get_mut(key) {
                slot.session.note_moved_ids(ids);
                // An orphaned copy merged into one here (taken over from
                // a copy of the log without its move, or its client came
                // back): its QoS 2 messages this one went through already
                // do not come again.
                let marked = here.is_some() && orphan.is_some() && slot.session.begin_merge();
                slot.session.take_deliveries(now, inflight, queue);
                if marked {
                    slot.session.end_merge();
                }
                slot.session.take_qos2_in(&qos2_in);
                slot.session.take_marks(&marks, filters, true);
            }
            match (st.remote.as_mut(), orphan) {
                (Some(r), None) => {
                    r.adoptions.sessions += 1;
                    r.adoptions.deliveries += count;
                }
                (Some(r), Some(_)) => r.orphans.taken += 1,
                (None, _) => {}
            }
            Self::skip_copies_for_a_while(st, now, key);
            Self::after_step(st, key, now);
        }
        if self.id != 0 && orphan.is_none() {
            self.mesh.send(0, MeshMsg::AdoptDone { of });
        }
    }

    /// Session `key` stops skipping copies of what it took over after
    /// [`super::moves::MOVED_IDS_KEPT`], as a session that moved here does.
    fn skip_copies_for_a_while(st: &mut State, now: Instant, key: SessionKey) {
        let uid = st.sessions.get(key).map_or(0, |s| s.uid);
        if let Some(r) = st.remote.as_mut() {
            let at = now + super::moves::MOVED_IDS_KEPT;
            r.moves.recent.push_back((at, key, uid));
        }
    }

    /// Run `run` of peer `peer` is up again after being declared down
    /// (a partition healed): the sessions adopted from it that no client
    /// connected to since end here, without their wills: that run kept
    /// them.
    pub(super) fn give_adopted_back(&self, st: &mut State, now: Instant, peer: u16, run: u64) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let mut back = Vec::new();
        r.adoptions.taken.retain(|t| {
            let mine = t.peer == peer && t.run.1 == run;
            if mine {
                back.push((t.key, t.uid));
            }
            !mine
        });
        let (mut sessions, mut deliveries) = (0, 0);
        for (key, uid) in back {
            let Some(slot) = st.sessions.get_mut(key) else {
                continue;
            };
            if slot.uid != uid || slot.adopted_from != Some((peer, run)) || slot.conn.is_some() {
                continue;
            }
            sessions += 1;
            deliveries += (slot.session.queued_len() + slot.session.inflight_len()) as u64;
            slot.session.cancel_pending_will();
            slot.session.discard(now);
            self.drive(st, key, now);
        }
        if sessions == 0 {
            return;
        }
        if let Some(r) = st.remote.as_mut() {
            r.adoptions.given_back += sessions;
            r.adoptions.given_back_deliveries += deliveries;
        }
        let name = Self::peer_name(st, peer);
        shard_log!(
            self,
            log::Level::Warn,
            "cluster: node {} is back with the run whose {sessions} sessions this shard took \
             over: they end here ({deliveries} deliveries queued meanwhile dropped; that run \
             kept its own)",
            quote(&name)
        );
    }
}

impl ShardCore {
    /// `message` was for the ordinary subscribers of run `run` of node
    /// `node`, declared down before it confirmed it (a peer, or this
    /// node's bridge, sends it): to the sessions this node took over from
    /// that run, once it has decided whether it takes them.
    /// With `shared`, the shared subscriptions it was to serve there:
    /// served from here once the sessions are taken in (a member among
    /// them, or on another node).
    pub fn for_adopted(
        &self,
        now: Instant,
        (node, run): (&str, u64),
        message: Arc<Message>,
        ordinary: bool,
        shared: Vec<SharedPick>,
    ) {
        let mut st = self.state.borrow_mut();
        let p = Pending {
            at: now,
            of: (Arc::from(node), run),
            message,
            ordinary,
            shared,
            will: false,
        };
        self.held_for_adopted(&mut st, p);
        Self::debug_invariants(&st);
    }

    /// Shard 0 holds `message` for run `of`'s sessions until this node
    /// decided on them, then hands it on; other shards send it there.
    pub(super) fn held_for_adopted(&self, st: &mut State, p: Pending) {
        if self.id != 0 {
            self.mesh.send(0, MeshMsg::ForAdopted(Box::new(p)));
            return;
        }
        let now = p.at;
        Self::expire_adopt_pending(st, now);
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let a = &mut r.adoptions;
        let decided = a.decided.iter().any(|(k, _, _)| *k == p.of);
        if decided && !a.taking.iter().any(|(k, _)| *k == p.of) {
            self.adopted_message(st, now, p);
        } else if a.pending.len() >= ADOPT_PENDING_MAX
            || a.pending_bytes + p.message.cost_bytes() > ADOPT_PENDING_BYTES_MAX
        {
            a.messages_dropped += u64::from(!p.will);
        } else {
            a.pending_bytes += p.message.cost_bytes();
            a.pending.push_back(p);
        }
    }

    /// Shard 0: what waited [`ADOPT_PENDING_WAIT`] for a decision goes
    /// (counted).
    pub(super) fn expire_adopt_pending(st: &mut State, now: Instant) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let a = &mut r.adoptions;
        while a
            .pending
            .front()
            .is_some_and(|p| now.saturating_duration_since(p.at) >= ADOPT_PENDING_WAIT)
        {
            if let Some(p) = a.pending.pop_front() {
                a.pending_bytes = a.pending_bytes.saturating_sub(p.message.cost_bytes());
                a.messages_dropped += u64::from(!p.will);
            }
        }
    }

    /// Shard 0, run `p.of` decided and its sessions taken in: the message
    /// goes to every shard's sessions taken over from it (none when this
    /// node took none), and its shared subscriptions are served by a
    /// member in the cluster (the dead node none).
    fn adopted_message(&self, st: &mut State, now: Instant, p: Pending) {
        let Pending {
            of,
            message,
            ordinary,
            shared,
            will,
            ..
        } = p;
        if !shared.is_empty() && !message.is_expired(now) {
            let up = |n: u16| self.peer_routes.borrow().get(&n).is_some_and(|p| p.up);
            let plan = self.plan_picks(st, &message, &shared, |n| !up(n));
            if plan.picks.is_empty() && plan.node_picks.is_empty() {
                if let Some(r) = st.remote.as_mut() {
                    r.adoptions.messages_dropped += 1;
                }
            } else {
                self.route_planned(st, now, message.clone(), Default::default(), plan);
            }
        }
        if !ordinary {
            return;
        }
        let took = st
            .remote
            .as_ref()
            .is_some_and(|r| (r.adoptions.decided.iter()).any(|(k, took, _)| *k == of && *took));
        if !took {
            if let Some(r) = st.remote.as_mut() {
                r.adoptions.messages_dropped += u64::from(!will);
            }
            return;
        }
        for shard in (0..self.shards).filter(|&s| s != self.id) {
            let msg = MeshMsg::AdoptedPublish {
                of: of.clone(),
                message: message.clone(),
            };
            self.mesh.send(shard, msg);
        }
        self.deliver_adopted(st, now, &of, &message);
    }

    /// Give `message` to this shard's sessions taken over from run `of`
    /// whose subscriptions match (shared ones aside: their picks were
    /// served again by the publisher's node), as routing would have, in
    /// its origin's order among what they have queued.
    pub(super) fn deliver_adopted(
        &self,
        st: &mut State,
        now: Instant,
        of: &Run,
        message: &Arc<Message>,
    ) {
        if message.is_expired(now) {
            return;
        }
        let Some(r) = st.remote.as_ref() else {
            return;
        };
        let keys: Vec<SessionKey> = (r.adoptions.taken.iter())
            .filter(|t| t.run == *of)
            .filter(|t| st.sessions.get(t.key).is_some_and(|s| s.uid == t.uid))
            .map(|t| t.key)
            .collect();
        let publisher = message.publisher.as_deref();
        for key in keys {
            let Some(slot) = st.sessions.get(key) else {
                continue;
            };
            let target = {
                let own = publisher == Some(&**slot.session.client_id());
                let mut fan = Fan::new(message, true, |_| false, |_: SessionKey| own);
                let filters: Vec<(Arc<str>, &crate::session::Subscription)> =
                    (slot.session.subscriptions().iter())
                        .filter(|(f, _)| !f.starts_with("$share/"))
                        .filter(|(f, _)| crate::router::topic::matches(f, &message.topic))
                        .map(|(f, s)| (Arc::<str>::from(f.as_str()), s))
                        .collect();
                for (filter, sub) in &filters {
                    fan.add(Match {
                        session: key,
                        group: None,
                        filter,
                        options: &sub.options,
                        subscription_id: sub.subscription_id,
                    });
                }
                fan.finish().ordinary.into_iter().next()
            };
            let Some(t) = target else {
                continue;
            };
            let mut delivery = crate::session::Delivery {
                qos: t.qos,
                retain: t.retain,
                subscription_ids: t.subscription_ids,
                stored: None,
            };
            delivery.stored = Self::store_taken(st, key, message, &delivery);
            if let Some(slot) = st.sessions.get_mut(key) {
                // Merged in its origin's order with what is queued: a
                // later message of its publisher may have come first, by
                // a route to this node its node learned before it saw the
                // dead one down. (Skipped if the session has it.)
                let queued = vec![(message.clone(), delivery)];
                slot.session.take_deliveries(now, Vec::new(), queued);
                slot.session.note_moved_ids([message.id]);
            }
            Self::skip_copies_for_a_while(st, now, key);
            if let Some(r) = st.remote.as_mut() {
                r.adoptions.messages_delivered += 1;
            }
            Self::after_step(st, key, now);
        }
    }
}

/// Per origin of the messages an adopted session holds, the range from
/// the origin's first id to the last id held ([`OriginMark`]).
fn adopted_marks(
    inflight: &[crate::session::RestoredInflight],
    queue: &[(
        std::sync::Arc<crate::message::Message>,
        crate::session::Delivery,
    )],
) -> Vec<OriginMark> {
    let mut high: BTreeMap<u32, u64> = BTreeMap::new();
    let ids = (inflight.iter().map(|i| i.message.id)).chain(queue.iter().map(|(m, _)| m.id));
    for id in ids.filter(|&id| id != 0) {
        let e = high.entry((id >> 32) as u32).or_insert(id);
        *e = (*e).max(id);
    }
    (high.into_iter())
        .map(|(origin, high)| OriginMark {
            origin,
            low: u64::from(origin) << 32,
            high,
        })
        .collect()
}
