//! Sessions that moved away, kept until the node they went to has them
//! in its standbys' copies, and given to the node next after it when it
//! dies first.
//!
//! Shard-local, no I/O. A session that moves from node A to node B
//! (`moves`) ends on A once its last part is sent; until B's standbys
//! hold what B wrote of it (`durable::replicate`), B's death would lose
//! what the session held. So A's home shard of the client id keeps what
//! it sent (subscriptions, deliveries, inbound QoS 2 state, Session
//! Expiry Interval) in memory ([`Kept`]), when it has a log and
//! `cluster.replicas` is 2 or more, until B says the session is in its
//! standbys' copies ([`Frame::SessionStored`]), for at most [`KEPT_FOR`]
//! and [`KEPT_BYTES_MAX`] (past either the oldest go, counted and
//! logged). B writes `Rec::MovedIn` after the parts' records once no other
//! node's parts are still coming, and sends the word when a standby it
//! waits for holds them; with records still waiting for room, or no
//! standby waited for, it sends no word (A's bound applies).
//!
//! When B is declared down first, A sends what it kept in parts
//! ([`Frame::Orphaned`]) to the node next after B, the one that takes B's
//! sessions over (`adopt`), or takes it in itself when it is that node.
//! There shard 0 holds the parts until the node decided on B's run (for
//! at most `ADOPT_PENDING_WAIT`, within its bounds), and the client id's
//! home shard takes them in as a session taken over from B's run, unless
//! the session it took over from its copy of B's log says that move came
//! whole (`Rec::MovedIn` of that claim or a later one): B's output to the
//! client waited for that copy, so only a copy without the mark can lack
//! what the client was given, and only such a copy is merged with what A
//! kept (each message once, by its id; a QoS 2 message within what had
//! reached the session here is not taken again).
//!
//! Not covered: a newer run of B that comes up before B is declared down
//! recovered its own log, and what is kept for B is dropped then (parts
//! B had not received are lost); a client that connects elsewhere after
//! the node next after B said it was done with B's sessions and before an
//! orphan reached it is told its session is new, and the orphan is then
//! dropped as stale; an orphan whose session the adopter took over and
//! saw end since comes back as a session of its own (dropped as stale
//! when its client next connects).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::frame::{Frame, MovedDelivery, Orphaned};
use crate::cluster::node::Node;
use crate::hash::HashMap;
use crate::persist::recover::{AdoptedSession, Marks};
use crate::session::{Restored, Subscription};
use crate::text::quote;

use super::adopt::{Run, ADOPT_PENDING_BYTES_MAX, ADOPT_PENDING_WAIT};
use super::mesh::MeshMsg;
use super::moves::{in_parts, restored_deliveries};
use super::remote::BridgeOut;
use super::{home_shard, SessionKey, ShardCore, State};

/// How long a session that moved away is kept at most without word that
/// the node it went to has it in its standbys' copies.
pub const KEPT_FOR: Duration = Duration::from_secs(60);

/// Bytes of messages a shard keeps so at most ([`Message::cost_bytes`]);
/// past it the oldest kept sessions go (counted, logged).
///
/// [`Message::cost_bytes`]: crate::message::Message::cost_bytes
pub const KEPT_BYTES_MAX: usize = 256 << 20;

/// How long a home shard remembers the whole moves of the sessions it
/// took over from a run's log copy, for the orphans of that run that come
/// later.
const ADOPTED_MOVES_KEPT: Duration = Duration::from_secs(120);

/// A session that moved to another node, kept here until it is in that
/// node's standbys' copies.
#[derive(Debug)]
struct Kept {
    /// Its number among the copies kept here (for `order`).
    id: u64,
    /// The node it went to.
    to: u16,
    /// The claim its move answered.
    claim: u64,
    since: Instant,
    expiry_s: u32,
    subscriptions: Vec<(String, Subscription)>,
    deliveries: Vec<MovedDelivery>,
    qos2_in: Vec<u16>,
    bytes: usize,
}

/// A shard's kept and orphaned sessions (part of its cluster state).
#[derive(Debug, Default)]
pub(super) struct Orphans {
    /// Sessions moved away and kept, by client id.
    kept: HashMap<Arc<str>, Kept>,
    kept_bytes: usize,
    /// The kept copies oldest first, by client id and number (an entry
    /// whose copy went or was replaced is skipped).
    order: VecDeque<(Arc<str>, u64)>,
    last_kept: u64,
    /// Shard 0: parts of orphaned sessions waiting for this node's
    /// decision on their run, with when they came.
    waiting: VecDeque<(Instant, Box<Orphaned>)>,
    waiting_bytes: usize,
    /// Home shards: sessions taken over from a run's log copy whose copy
    /// says a move into them came whole (the latest claim), and when.
    adopted_moves: HashMap<Arc<str>, (Run, u64, Instant)>,
    /// Kept sessions the node they went to said it holds in its
    /// standbys' copies.
    pub(super) confirmed: u64,
    /// Kept sessions dropped without that word: past [`KEPT_FOR`] or
    /// [`KEPT_BYTES_MAX`], or a newer run of the node came up.
    pub(super) unconfirmed: u64,
    /// Kept sessions sent on (or taken in here) when the node they went
    /// to was declared down.
    pub(super) orphaned: u64,
    /// Parts of orphaned sessions taken in here.
    pub(super) taken: u64,
    /// Parts of orphaned sessions not taken: the copy taken over holds
    /// their move.
    pub(super) superseded: u64,
    /// Parts of orphaned sessions dropped: no decision on their run in
    /// time, or past the byte bound.
    pub(super) dropped: u64,
}

impl Orphans {
    /// Sessions kept now.
    pub(super) fn kept_len(&self) -> usize {
        self.kept.len()
    }

    /// The copy kept of `client_id`'s session, taken out.
    fn take_kept(&mut self, client_id: &str) -> Option<Kept> {
        let k = self.kept.remove(client_id)?;
        self.kept_bytes -= k.bytes;
        Some(k)
    }
}

/// The bytes a kept copy or an orphaned part counts against the bounds:
/// its deliveries, its subscriptions' filters, and a little for itself.
fn cost_of(deliveries: &[MovedDelivery], subscriptions: &[(String, Subscription)]) -> usize {
    let filters: usize = subscriptions.iter().map(|(f, _)| f.len() + 16).sum();
    let messages: usize = deliveries.iter().map(|d| d.message.cost_bytes()).sum();
    messages + filters + 256
}

/// Orphaned parts shard 0 holds at most while it waits for decisions.
const WAITING_MAX: usize = 10_000;

impl ShardCore {
    /// A's side: session `key` of `client_id` moves to peer `to` for
    /// claim `claim` with `deliveries` and `qos2_in`: keep a copy until
    /// `to` says it is in its standbys' copies (with a log, and replicas
    /// to copy to).
    pub(super) fn keep_moving(
        &self,
        st: &mut State,
        now: Instant,
        key: SessionKey,
        (to, claim): (u16, u64),
        deliveries: &[MovedDelivery],
        qos2_in: &[u16],
    ) {
        if st.store.is_none() || self.config.cluster.replicas < 2 {
            return;
        }
        let Some(slot) = st.sessions.get(key) else {
            return;
        };
        let state = slot.session.durable_state();
        let client_id = slot.session.client_id().clone();
        let bytes = cost_of(deliveries, &state.subscriptions);
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        r.orphans.last_kept += 1;
        let id = r.orphans.last_kept;
        let kept = Kept {
            id,
            to,
            claim,
            since: now,
            expiry_s: state.expiry_s,
            subscriptions: state.subscriptions,
            deliveries: deliveries.to_vec(),
            qos2_in: qos2_in.to_vec(),
            bytes,
        };
        let o = &mut r.orphans;
        o.order.push_back((client_id.clone(), id));
        if let Some(old) = o.kept.insert(client_id, kept) {
            o.kept_bytes -= old.bytes;
        }
        o.kept_bytes += bytes;
        // Entries of copies gone pile up behind a live one: drop them
        // once they outnumber the live ones.
        if o.order.len() > 2 * o.kept.len() + 64 {
            let kept = &o.kept;
            o.order
                .retain(|(c, id)| kept.get(c).is_some_and(|k| k.id == *id));
        }
        self.drop_kept_past_bounds(st, now);
    }

    /// The oldest kept sessions go while past [`KEPT_FOR`] or
    /// [`KEPT_BYTES_MAX`] (counted, logged).
    fn drop_kept_past_bounds(&self, st: &mut State, now: Instant) {
        loop {
            let Some(r) = st.remote.as_mut() else {
                return;
            };
            let o = &mut r.orphans;
            let Some((client_id, id)) = o.order.front().cloned() else {
                return;
            };
            let Some(since) = (o.kept.get(&client_id))
                .filter(|k| k.id == id)
                .map(|k| k.since)
            else {
                o.order.pop_front();
                continue;
            };
            let overdue = now.saturating_duration_since(since) >= KEPT_FOR;
            if !overdue && o.kept_bytes <= KEPT_BYTES_MAX {
                return;
            }
            o.order.pop_front();
            let Some(k) = o.take_kept(&client_id) else {
                return;
            };
            o.unconfirmed += 1;
            let name = Self::peer_name(st, k.to);
            shard_log!(
                self,
                log::Level::Warn,
                "cluster: no word from node {} that client {}'s session, which moved there, \
                 is in its standbys' copies ({}): the copy kept here goes",
                quote(&name),
                quote(&client_id),
                match overdue {
                    true => format!("after {} s", KEPT_FOR.as_secs()),
                    false => format!("past {} MiB kept", KEPT_BYTES_MAX >> 20),
                }
            );
        }
    }

    /// B's side: every part of session `key` (`uid`) moving here from
    /// peer `from` for claim `claim` came, and it is the `last` move into
    /// it still on. Its log marks the move whole after the parts' records
    /// (when every record is written and no other node's parts are still
    /// coming: an adopter would take the mark for all of them), and `from`
    /// is told once a standby holds them; without a log there is nothing
    /// to copy and it is told at once; without a standby waited for, or
    /// with records waiting for room, it is not told, and keeps its copy
    /// for [`KEPT_FOR`].
    pub(super) fn moved_in_whole(
        &self,
        st: &mut State,
        key: SessionKey,
        uid: u64,
        (from, client_id, claim): (u16, &Arc<str>, u64),
        last: bool,
    ) {
        Self::forget_kept(st, client_id);
        let written = st.store.as_ref().is_none_or(|s| s.all_written());
        let live = st.sessions.get(key).is_some_and(|s| s.uid == uid);
        if written && live && last {
            Self::durable_moved_in(st, key, claim);
        }
        let word = Frame::SessionStored {
            seq: 0,
            client_id: client_id.clone(),
            claim,
        };
        match st.store.as_mut() {
            Some(store) if written => store.after_standbys(BridgeOut::Peer {
                node: from,
                frame: word,
            }),
            Some(_) => {}
            None => Self::to_peer(st, from, word),
        }
    }

    /// The kept sessions past [`KEPT_FOR`] go (the tick).
    pub(super) fn expire_kept(&self, st: &mut State, now: Instant) {
        let any = (st.remote.as_ref()).is_some_and(|r| !r.orphans.order.is_empty());
        if any {
            self.drop_kept_past_bounds(st, now);
        }
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        (r.orphans.adopted_moves)
            .retain(|_, (_, _, at)| now.saturating_duration_since(*at) < ADOPTED_MOVES_KEPT);
    }

    /// The sessions kept here now: client id, the node (index) they
    /// moved to, and the messages kept (for the simulator's checks).
    pub fn kept_moves(&self) -> Vec<(Arc<str>, u16, Vec<Arc<crate::message::Message>>)> {
        let st = self.state.borrow();
        let Some(r) = st.remote.as_ref() else {
            return Vec::new();
        };
        let mut out: Vec<_> = (r.orphans.kept.iter())
            .map(|(id, k)| {
                let messages = k.deliveries.iter().map(|d| d.message.clone()).collect();
                (id.clone(), k.to, messages)
            })
            .collect();
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Peer `from` has the session of `client_id` that moved there for
    /// claim `claim` in its standbys' copies: the copy kept here goes.
    pub(super) fn moved_stored(st: &mut State, from: u16, client_id: &str, claim: u64) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let o = &mut r.orphans;
        let done = (o.kept.get(client_id)).is_some_and(|k| k.to == from && k.claim <= claim);
        if done && o.take_kept(client_id).is_some() {
            o.confirmed += 1;
        }
    }

    /// A session of `client_id` lives here again: the copy kept of an
    /// earlier move away is not wanted.
    pub(super) fn forget_kept(st: &mut State, client_id: &str) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        r.orphans.take_kept(client_id);
    }

    /// Peer `peer`'s run ended with a newer run up (it recovered its own
    /// log): what is kept for it goes.
    pub(super) fn kept_for_gone(st: &mut State, peer: u16) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let o = &mut r.orphans;
        let before = o.kept.len();
        o.kept.retain(|_, k| k.to != peer);
        if o.kept.len() != before {
            o.unconfirmed += (before - o.kept.len()) as u64;
            o.kept_bytes = o.kept.values().map(|k| k.bytes).sum();
        }
    }

    /// Peer `peer` (`dead`) was declared down: the sessions kept for it
    /// go to `adopter` (None: this node), in parts.
    pub fn orphan_moves(&self, now: Instant, peer: u16, dead: &Node, adopter: Option<u16>) {
        let mut st = self.state.borrow_mut();
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let o = &mut r.orphans;
        let mut ids: Vec<Arc<str>> = (o.kept.iter())
            .filter(|(_, k)| k.to == peer)
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort_unstable();
        for client_id in ids {
            let Some(r) = st.remote.as_mut() else {
                return;
            };
            let Some(k) = r.orphans.take_kept(&client_id) else {
                continue;
            };
            r.orphans.orphaned += 1;
            let count = k.deliveries.len();
            for part in orphan_parts(dead, client_id.clone(), k) {
                match adopter {
                    Some(p) => Self::to_peer(&mut st, p, Frame::Orphaned(Box::new(part))),
                    None => self.orphan_to_zero(&mut st, now, Box::new(part)),
                }
            }
            let to = match adopter {
                Some(p) => format!("node {}", quote(&Self::peer_name(&st, p))),
                None => "this node".to_string(),
            };
            shard_log!(
                self,
                log::Level::Warn,
                "cluster: node {} is down before it said client {}'s session, which moved \
                 there, is in its standbys' copies: the copy kept here ({count} deliveries) \
                 goes to {to}, which takes its sessions over",
                quote(dead.name.as_str()),
                quote(&client_id)
            );
        }
        Self::debug_invariants(&st);
    }

    /// Part of a session orphaned by a peer's death came from a peer: to
    /// shard 0.
    pub fn orphan_arrived(&self, now: Instant, part: Box<Orphaned>) {
        let mut st = self.state.borrow_mut();
        self.orphan_to_zero(&mut st, now, part);
        Self::debug_invariants(&st);
    }

    /// `part` to shard 0 (`orphan_at_zero`).
    fn orphan_to_zero(&self, st: &mut State, now: Instant, part: Box<Orphaned>) {
        match self.id {
            0 => self.orphan_at_zero(st, now, *part),
            _ => self.mesh.send(0, MeshMsg::Orphaned(part)),
        }
    }

    /// Shard 0: `part` goes to its home shard once this node decided on
    /// its run and every shard took that run's sessions in; until then it
    /// waits (for at most [`ADOPT_PENDING_WAIT`]).
    pub(super) fn orphan_at_zero(&self, st: &mut State, now: Instant, part: Orphaned) {
        self.expire_orphans(st, now);
        let of: Run = (Arc::from(part.node.as_str()), part.incarnation);
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let a = &r.adoptions;
        let decided = (a.decided.iter()).find(|(k, _, _)| *k == of).map(|d| d.2);
        let taking = a.taking.iter().any(|(k, _)| *k == of);
        if let (Some(peer), false) = (decided, taking) {
            self.orphan_home(st, now, peer, of, part);
            return;
        }
        let o = &mut r.orphans;
        let bytes = cost_of(&part.deliveries, &part.subscriptions);
        if o.waiting_bytes + bytes > ADOPT_PENDING_BYTES_MAX || o.waiting.len() >= WAITING_MAX {
            o.dropped += 1;
            shard_log!(
                self,
                log::Level::Warn,
                "cluster: part of client {}'s session, orphaned by node {}'s death, is \
                 dropped: past {} MiB or {WAITING_MAX} parts waiting for this node's decision \
                 on that node",
                quote(&part.client_id),
                quote(part.node.as_str()),
                ADOPT_PENDING_BYTES_MAX >> 20
            );
            return;
        }
        o.waiting_bytes += bytes;
        o.waiting.push_back((now, Box::new(part)));
    }

    /// Shard 0, run `of` decided and its sessions taken in: the orphaned
    /// parts that waited for it go to their home shards.
    pub(super) fn release_orphans(&self, st: &mut State, now: Instant, of: &Run) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let peer = (r.adoptions.decided.iter())
            .find(|(k, _, _)| k == of)
            .map(|d| d.2);
        let Some(peer) = peer else {
            return;
        };
        let o = &mut r.orphans;
        if o.waiting.is_empty() {
            return;
        }
        let (due, rest): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut o.waiting)
            .into_iter()
            .partition(|(_, p)| p.node.as_str() == &*of.0 && p.incarnation == of.1);
        o.waiting = rest;
        for (_, part) in due {
            if let Some(r) = st.remote.as_mut() {
                r.orphans.waiting_bytes -= cost_of(&part.deliveries, &part.subscriptions);
            }
            self.orphan_home(st, now, peer, of.clone(), *part);
        }
    }

    /// Shard 0: orphaned parts that waited [`ADOPT_PENDING_WAIT`] for a
    /// decision on their run go (counted, logged).
    pub(super) fn expire_orphans(&self, st: &mut State, now: Instant) {
        loop {
            let Some(r) = st.remote.as_mut() else {
                return;
            };
            let o = &mut r.orphans;
            let old = (o.waiting.front())
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= ADOPT_PENDING_WAIT);
            if !old {
                return;
            }
            let Some((_, part)) = o.waiting.pop_front() else {
                return;
            };
            o.waiting_bytes -= cost_of(&part.deliveries, &part.subscriptions);
            o.dropped += 1;
            shard_log!(
                self,
                log::Level::Warn,
                "cluster: part of client {}'s session, orphaned by node {}'s death, is \
                 dropped: this node did not declare that node down within {} s",
                quote(&part.client_id),
                quote(part.node.as_str()),
                ADOPT_PENDING_WAIT.as_secs()
            );
        }
    }

    /// Shard 0: `part`, of a session orphaned by the death of peer
    /// `peer`'s run `of`, to its home shard as a session taken over.
    fn orphan_home(&self, st: &mut State, now: Instant, peer: u16, of: Run, part: Orphaned) {
        let claim = part.claim;
        let home = home_shard(&part.client_id, self.shards);
        let session = adopted_from_orphan(now, part);
        if home == self.id {
            self.adopt_here(st, now, peer, of, vec![session], Some(claim));
        } else {
            let msg = MeshMsg::Adopt {
                peer,
                node: of.0,
                run: of.1,
                sessions: vec![session],
                orphan: Some(claim),
            };
            self.mesh.send(home, msg);
        }
    }

    /// On the home shard, taking in a session of run `of`: from its log
    /// copy (`orphan` None; its whole move, if any, remembered), or
    /// orphaned by a move there for claim `orphan`, wanted unless the
    /// copy taken over says that move came whole.
    pub(super) fn orphan_wanted(
        &self,
        st: &mut State,
        now: Instant,
        of: &Run,
        client_id: &Arc<str>,
        (orphan, moved_in): (Option<u64>, u64),
    ) -> bool {
        let Some(r) = st.remote.as_mut() else {
            return true;
        };
        let o = &mut r.orphans;
        let Some(claim) = orphan else {
            if moved_in != 0 {
                (o.adopted_moves).insert(client_id.clone(), (of.clone(), moved_in, now));
            }
            return true;
        };
        let whole =
            (o.adopted_moves.get(client_id)).is_some_and(|(run, m, _)| run == of && *m >= claim);
        if whole {
            o.superseded += 1;
            shard_log!(
                self,
                log::Level::Info,
                "cluster: client {}'s session, orphaned by node {}'s death, came whole in the \
                 copy of that node's log taken over here: the orphaned copy is not needed",
                quote(client_id),
                quote(&of.0)
            );
            return false;
        }
        true
    }
}

/// What `kept` holds for `client_id`, in parts (`moves::in_parts`): the
/// subscriptions in the first, the inbound QoS 2 state in the last.
fn orphan_parts(dead: &Node, client_id: Arc<str>, kept: Kept) -> Vec<Orphaned> {
    let Kept {
        claim,
        expiry_s,
        subscriptions,
        deliveries,
        qos2_in,
        ..
    } = kept;
    let mut parts: Vec<Orphaned> = (in_parts(deliveries).into_iter())
        .map(|deliveries| Orphaned {
            seq: 0,
            node: dead.name.clone(),
            incarnation: dead.incarnation,
            client_id: client_id.clone(),
            claim,
            expiry_s,
            subscriptions: Vec::new(),
            qos2_in: Vec::new(),
            deliveries,
        })
        .collect();
    if let Some(first) = parts.first_mut() {
        first.subscriptions = subscriptions;
    }
    if let Some(last) = parts.last_mut() {
        last.qos2_in = qos2_in;
    }
    parts
}

/// An orphaned part as a session taken over: offline since `now`.
fn adopted_from_orphan(now: Instant, part: Orphaned) -> AdoptedSession {
    let (inflight, queue) = restored_deliveries(part.deliveries);
    AdoptedSession {
        client_id: part.client_id,
        restored: Restored {
            expiry_s: part.expiry_s,
            offline_since: now,
            subscriptions: part.subscriptions,
            qos2_in: part.qos2_in,
            pending_will: None,
            inflight,
            queue,
        },
        // (Taken for one its client was told about before any other.)
        marks: Marks {
            moved_in: 0,
            told: super::adopt::ADOPTED_BORN,
        },
    }
}
