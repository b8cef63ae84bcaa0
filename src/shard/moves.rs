//! Sessions moving between nodes: one session per client id in the
//! cluster, and it is where its client is.
//!
//! Shard-local, no I/O; on each node, the client id's home shard runs it.
//! A client that connects on node B without Clean Start claims its client
//! id (`claims`); a node A holding a session for it, whose connection the
//! claim closed, answers with a [`Frame::SessionOffer`] of the session's
//! subscriptions ahead of its acknowledgement, and keeps the session
//! meanwhile, still taking messages. B adds them to the client's session
//! (a subscription the client made on B already stays as it is), holds the
//! connection's output, and holds the live messages that reach the
//! session. Once every shard of B and every peer up (linked or not: one
//! without a link up may not have B's routes and still send the
//! session's messages to A only) can route the new subscriptions to B,
//! even those B routed already for another session, every message for
//! the session published from then on reaches B, and B asks A for the rest ([`Frame::SessionTake`]). A
//! sends the deliveries the session holds in order (in flight with their
//! packet ids, queued, paged out to its log and read back) in parts
//! ([`Frame::SessionMoved`]), the last with its inbound QoS 2 state, and
//! ends the session there without its will (its client is back). B merges
//! them with the messages it held, each origin's in the order it numbered
//! them, skips among those (and among the copies that reach it later, for
//! [`MOVED_IDS_KEPT`]) the ones it had from A already, by
//! [`crate::message::Message::id`], and from then on skips any later copy
//! within what reached the session on A (its marks per origin, the lowest
//! and highest id, sent with the offer and again with the last part).
//! Nothing published between the two steps is lost (both nodes take it)
//! or delivered twice (the ids). A copy of a session born before the one
//! the client was last told about (a partition let both live) is dropped
//! on arrival.
//!
//! A move that takes longer than [`MOVE_WAIT`] lets the CONNACK go (the
//! subscriptions are here; the messages still wait, so that their order
//! holds); one that takes longer than [`MOVE_GIVE_UP`], or whose other
//! node is declared down, is given up on both sides (counted): B delivers
//! what it held but QoS 2 messages within the marks of A's offer, A keeps
//! its session, and parts that come after are dropped (counted). What a
//! link loses during a move (a broken link, a killed node) is lost with
//! it. A session that moved is in B's standby copy
//! (`durable::replicate`) only once that copy catches up: B writes
//! `Rec::MovedIn` after the parts and tells A behind its sync gate
//! ([`Frame::SessionStored`]); until then A keeps a copy (`orphans`),
//! which goes to the node taking B's sessions over if B dies first.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::claims::wins;
use crate::cluster::frame::{Frame, MovedDelivery, SessionMoved, SessionOffer};
use crate::hash::{HashMap, HashSet};
use crate::message::Message;
use crate::persist::Scope;
use crate::session::{Delivery, RestoredInflight, Subscription};
use crate::text::quote;

use super::claims::PeerClaim;
use super::durable::StoreTarget;
use super::mesh::{AckTo, MeshMsg};
use super::remote::BridgeOut;
use super::{home_shard, SessionKey, ShardCore, State};

/// How long a node that a session moves to holds the client's CONNACK
/// for it: then the CONNACK goes (Session Present, the subscriptions are
/// here) while the messages still wait for the rest.
pub const MOVE_WAIT: Duration = Duration::from_secs(5);

/// How long a move may take at all, counted on each side from the offer:
/// then the node it goes to stops waiting (the messages it held go out;
/// what the other node holds stays there); the node it comes from forgets
/// the offer and its fence [`MOVE_WAIT`] before (the session stays
/// there). A node declared down ends its moves at once.
pub const MOVE_GIVE_UP: Duration = Duration::from_secs(60);

/// How long a session that moved here skips copies of the messages it
/// brought (a copy on a slower path from their publisher's node).
pub const MOVED_IDS_KEPT: Duration = Duration::from_secs(30);

/// How many client ids of moves given up a shard keeps until they are
/// taken ([`ShardCore::take_moves_given_up`]).
pub const GIVEN_UP_KEPT: usize = 256;

/// Bytes of messages per [`Frame::SessionMoved`] part (one larger
/// message goes alone).
const MOVE_PART_BYTES: usize = 256 << 10;

/// Moved deliveries as a session takes them: those in flight (a packet
/// id) and those queued, each in order, none stored here yet.
pub(super) fn restored_deliveries(
    deliveries: Vec<MovedDelivery>,
) -> (Vec<RestoredInflight>, Vec<(Arc<Message>, Delivery)>) {
    let (mut inflight, mut queued) = (Vec::new(), Vec::new());
    for d in deliveries {
        let delivery = Delivery {
            qos: d.qos,
            retain: d.retain,
            subscription_ids: d.subscription_ids,
            stored: None,
        };
        match d.packet_id {
            0 => queued.push((d.message, delivery)),
            packet_id => inflight.push(RestoredInflight {
                message: d.message,
                delivery,
                packet_id,
                released: d.released,
            }),
        }
    }
    (inflight, queued)
}

/// `deliveries` in order, in parts of at most [`MOVE_PART_BYTES`] of
/// messages (one larger message alone); at least one part, maybe empty.
pub(super) fn in_parts(deliveries: Vec<MovedDelivery>) -> Vec<Vec<MovedDelivery>> {
    let mut parts = Vec::new();
    let (mut part, mut bytes) = (Vec::new(), 0);
    for d in deliveries {
        let cost = d.message.cost_bytes();
        if !part.is_empty() && bytes + cost > MOVE_PART_BYTES {
            parts.push(std::mem::take(&mut part));
            bytes = 0;
        }
        bytes += cost;
        part.push(d);
    }
    parts.push(part);
    parts
}

/// Bytes of messages one move carries at most; deliveries past it are
/// dropped, counted and logged.
pub const MOVE_BYTES_MAX: usize = 64 << 20;

/// A shard's sessions on the move (part of its cluster state).
#[derive(Default)]
pub(super) struct Moves {
    /// Sessions offered to the node their client connected to, by client
    /// id.
    out: HashMap<Arc<str>, MoveOut>,
    /// Sessions coming here, by client id.
    inbound: HashMap<Arc<str>, MoveIn>,
    /// Sessions that moved here (or were taken over, `adopt`): when they
    /// stop skipping copies of what they brought.
    pub(super) recent: VecDeque<(Instant, SessionKey, u64)>,
    /// Sessions moved to another node.
    pub(super) moved_out: u64,
    /// Sessions moved here.
    pub(super) moved_in: u64,
    /// Moves given up ([`MOVE_GIVE_UP`], or the other node down).
    pub(super) unfinished: u64,
    /// Moves that found the session staying where it was (its client
    /// went back there).
    pub(super) stayed: u64,
    /// Deliveries of copies of sessions older than the one here, dropped
    /// on arrival (a partition let both live).
    pub(super) stale_dropped: u64,
    /// Deliveries lost in moves (past [`MOVE_BYTES_MAX`], not read back
    /// from the log, or their session gone before they came).
    pub(super) lost: u64,
    /// Offers declined: they came after the client's CONNACK went
    /// without them.
    pub(super) declined: u64,
    /// The client ids of the moves given up lately, and of the sessions
    /// that took in a copy taken over from a dead node (at most
    /// [`GIVEN_UP_KEPT`]), for [`ShardCore::take_moves_given_up`].
    given_up: VecDeque<Arc<str>>,
    /// The last [`crate::message::Message::id`] given here.
    last_id: u64,
    /// What this shard's run hashes to name its origins (a new one each
    /// time the count runs out).
    origin_seed: String,
    origins: u64,
    /// Sessions about to go, by fence id.
    fences: HashMap<u64, Fence>,
    last_fence: u64,
    /// The last move's number given here.
    last_move: u64,
}

impl Moves {
    /// True while a session of `client_id` is on its way here.
    pub(super) fn is_moving_in(&self, client_id: &str) -> bool {
        self.inbound.contains_key(client_id)
    }

    /// True while a session of `client_id` is on its way here from peer
    /// `from` (this shard may hear of its death after another shard).
    pub(super) fn is_moving_in_from(&self, client_id: &str, from: u16) -> bool {
        (self.inbound.get(client_id)).is_some_and(|m| m.offers.iter().any(|o| o.from == from))
    }

    /// True when the session of `client_id` is offered to another node
    /// (or about to go there, behind its fence) for a claim later than
    /// `claim` of node `node`: a late, older claim does not take it back.
    pub(super) fn offered_for_later(&self, client_id: &str, claim: u64, node: &str) -> bool {
        let later = |(stamp, by): &(u64, Arc<str>)| !wins((claim, node), (*stamp, by));
        self.out.get(client_id).is_some_and(|m| later(&m.claim))
            || (self.fences.values()).any(|f| &*f.client_id == client_id && later(&f.promised))
    }

    /// The session of `client_id` is offered, or on its way, to a node
    /// other than `to` (by index).
    pub(super) fn is_moving_out_elsewhere(&self, client_id: &str, to: u16) -> bool {
        self.out.get(client_id).is_some_and(|m| m.to != to)
            || (self.fences.values()).any(|f| &*f.client_id == client_id && f.to != to)
    }

    /// A shard's moves, numbering messages from a base no other run of a
    /// shard in the cluster is likely to share: a hash of the node, the
    /// runtime's start stamp and the shard.
    pub(super) fn new(node: &str, boot_stamp: u64, shard: usize) -> Moves {
        Moves {
            origin_seed: format!("{node}/{boot_stamp:x}/{shard}"),
            ..Moves::default()
        }
    }

    /// The next message id: this origin's count up by one, or the first of
    /// a new origin when it ran out (and at the start).
    fn next_id(&mut self) -> u64 {
        if self.last_id as u32 == u32::MAX || self.last_id == 0 {
            self.origins += 1;
            let hash = super::stable_hash(&format!("{}/{}", self.origin_seed, self.origins));
            // Origin 0 is never used (id 0 means none); the count starts
            // at a point of the hash too, so that two origins whose halves
            // collide (2^-32 a pair) rarely share ids (their marks still
            // mix).
            self.last_id = (hash | 1) << 32 | (hash >> 33);
        }
        self.last_id += 1;
        self.last_id
    }
}

/// How a move into a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MoveEnd {
    /// Every part came.
    Whole,
    /// The session stayed on the other node (its client went back there).
    Stays,
    /// Given up: the other node down, or [`MOVE_GIVE_UP`] passed.
    GivenUp,
}

/// A session offered to another node.
struct MoveOut {
    to: u16,
    uid: u64,
    since: Instant,
    /// The claim it answers, and the node that made it.
    claim: (u64, Arc<str>),
    /// The Take came while the session was still coming here from a
    /// third node: its claim, answered once that move ends.
    deferred: Option<u64>,
}

impl MoveOut {
    /// True when a Take from peer `from` for its claim `claim` answers this
    /// offer: one made to that node, for that claim or an earlier one (an
    /// offer made since for a later claim waits for that claim's Take).
    fn answered_by(&self, from: u16, claim: u64) -> bool {
        self.to == from && self.claim.0 <= claim
    }
}

/// A session coming here from one or more nodes (a partition may have
/// left one on each).
struct MoveIn {
    key: SessionKey,
    uid: u64,
    /// This move's number ([`AckTo::move_in`]).
    id: u64,
    /// Route acknowledgements awaited before the Takes go.
    routes: u32,
    offers: Vec<Offer>,
    /// The ids of the messages taken so far.
    ids: HashSet<u64>,
}

/// A session about to go, waiting for its fence.
struct Fence {
    /// When the session was offered (the move's age).
    since: Instant,
    to: u16,
    client_id: Arc<str>,
    claim: u64,
    /// The claim the session was offered for, and the node that made it.
    promised: (u64, Arc<str>),
    uid: u64,
    shards_left: usize,
}

/// One node's offer.
struct Offer {
    from: u16,
    claim: u64,
    /// The subscriptions taken from it (dropped if the session stays
    /// there, but those another node's offer still coming offered too,
    /// which pass to that offer, and those a move that ended whole or
    /// was given up brought too).
    filters: Vec<String>,
    /// Every subscription it offered (shared ones aside): a late copy of
    /// a message of one of them that it had is skipped here.
    offered: Vec<String>,
    /// What had reached the session there when it was offered
    /// ([`SessionOffer::seen`]): a move given up still skips late copies
    /// of those.
    seen: Vec<crate::cluster::frame::OriginMark>,
    /// Older than the session here, which its client was told about:
    /// what comes is dropped (the copy there ends).
    stale: bool,
    /// Its shared subscriptions, taken once the move is done: a message
    /// of a shared subscription goes to one node, and while both nodes
    /// route it, the one it went to might not be the one that keeps it.
    shared: Vec<(String, crate::session::Subscription)>,
    taken: bool,
    output: Option<AckTo>,
    since: Instant,
}

impl ShardCore {
    /// True while a session moves to or from this shard (offered, coming,
    /// or waiting for its fence).
    pub fn moves_pending(&self) -> bool {
        let st = self.state.borrow();
        st.remote.as_ref().is_some_and(|r| {
            let m = &r.moves;
            !(m.out.is_empty() && m.inbound.is_empty() && m.fences.is_empty())
        })
    }

    /// The client ids whose sessions move here and have not all come, each
    /// with the nodes (their index) it comes from: a node that dies
    /// before its part came takes what it held with it (nothing is
    /// replicated yet).
    pub fn moving_in(&self) -> Vec<(Arc<str>, Vec<u16>)> {
        let st = self.state.borrow();
        let Some(r) = st.remote.as_ref() else {
            return Vec::new();
        };
        r.moves
            .inbound
            .iter()
            .map(|(id, m)| (id.clone(), m.offers.iter().map(|o| o.from).collect()))
            .collect()
    }

    /// The client ids whose session's move here was given up since the
    /// last call (the latest [`GIVEN_UP_KEPT`]): each such client's
    /// session was in two places, and messages the two held may reach it
    /// out of their publisher's order when they meet again.
    pub fn take_moves_given_up(&self) -> Vec<Arc<str>> {
        let mut st = self.state.borrow_mut();
        st.remote
            .as_mut()
            .map(|r| r.moves.given_up.drain(..).collect())
            .unwrap_or_default()
    }

    /// `client_id`'s session was taken over from a dead node's copy (into
    /// a session here, maybe): as with a move given up, what the copy
    /// holds and what reaches the session by other paths may meet out of
    /// their publisher's order ([`ShardCore::take_moves_given_up`]).
    pub(super) fn note_split(st: &mut State, client_id: &Arc<str>) {
        if let Some(r) = st.remote.as_mut() {
            if r.moves.given_up.len() == GIVEN_UP_KEPT {
                r.moves.given_up.pop_front();
            }
            r.moves.given_up.push_back(client_id.clone());
        }
    }

    /// Give a message accepted on this node its number in the cluster
    /// (a copy of it on another node keeps it).
    pub(super) fn number_message(st: &mut State, mut message: Arc<Message>) -> Arc<Message> {
        let Some(r) = st.remote.as_mut() else {
            return message;
        };
        Arc::make_mut(&mut message).id = r.moves.next_id();
        message
    }

    /// A session frame from peer `node` (its index): to this node's home
    /// shard of its client id.
    pub fn handle_session_frame(&self, now: Instant, node: u16, frame: Frame) {
        let client_id = match &frame {
            Frame::SessionOffer(o) => o.client_id.clone(),
            Frame::SessionTake { client_id, .. } => client_id.clone(),
            Frame::SessionMoved(m) => m.client_id.clone(),
            Frame::SessionStored { client_id, .. } => client_id.clone(),
            _ => return,
        };
        let home = home_shard(&client_id, self.shards);
        if home != self.id {
            let msg = MeshMsg::SessionMove {
                from: node,
                frame: Box::new(frame),
            };
            self.mesh.send(home, msg);
            return;
        }
        let mut st = self.state.borrow_mut();
        self.session_frame(&mut st, now, node, frame);
        Self::debug_invariants(&st);
    }

    /// On the home shard: a session frame from peer `from`.
    pub(super) fn session_frame(&self, st: &mut State, now: Instant, from: u16, frame: Frame) {
        match frame {
            Frame::SessionOffer(o) => self.offered(st, now, from, *o),
            Frame::SessionTake {
                client_id, claim, ..
            } => self.take_asked(st, now, from, client_id, claim),
            Frame::SessionMoved(m) => self.moved_part(st, now, from, *m),
            Frame::SessionStored {
                client_id, claim, ..
            } => Self::moved_stored(st, from, &client_id, claim),
            _ => {}
        }
    }

    /// A's side: peer claim `c` closed this node's connection of its
    /// client (or found the session offline): offer the session to the
    /// claiming node.
    pub(super) fn offer_session(
        &self,
        st: &mut State,
        now: Instant,
        key: SessionKey,
        c: &PeerClaim,
    ) {
        let Some(slot) = st.sessions.get(key) else {
            return;
        };
        if slot.conn.is_some() {
            return;
        }
        let client_id = slot.session.client_id().clone();
        let subscriptions = slot
            .session
            .subscriptions()
            .iter()
            .map(|(f, s)| (f.clone(), s.clone()))
            .collect();
        // (A copy its client was never told about is no newer than any.)
        let born = if slot.born_told { slot.born } else { 0 };
        let (uid, seen) = (slot.uid, slot.session.seen_marks());
        // Offered before to another node: it goes here instead.
        Self::withdraw_offers(st, &client_id, Some(c.index));
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        // The same node's claim again: a Take it sent meanwhile, waiting
        // for a move here to end, still stands, and the move keeps its
        // start (that node keeps its own: this side gives up first).
        let (deferred, since) =
            match (r.moves.out.get(&client_id)).filter(|m| m.to == c.index && m.uid == uid) {
                Some(m) => (m.deferred, m.since),
                None => (None, now),
            };
        let m = MoveOut {
            to: c.index,
            uid,
            since,
            claim: (c.claim.stamp, c.node.clone()),
            deferred,
        };
        r.moves.out.insert(client_id.clone(), m);
        let offer = SessionOffer {
            seq: 0,
            client_id,
            claim: c.claim.stamp,
            born,
            subscriptions,
            seen,
        };
        Self::to_peer(st, c.index, Frame::SessionOffer(Box::new(offer)));
    }

    /// A connection attached here: a session offered to another node
    /// stays (a Take for it, now or waiting, is answered that it stays).
    pub(super) fn keep_offered(st: &mut State, client_id: &str) {
        Self::withdraw_offers(st, client_id, None);
    }

    /// The session of `client_id` no longer goes to the nodes it was
    /// offered to (all, or all but `keep`): a Take one of them sent that
    /// waits, and a fence about to send it there, are answered that it
    /// stays.
    fn withdraw_offers(st: &mut State, client_id: &str, keep: Option<u16>) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let mut stays = Vec::new();
        if r.moves
            .out
            .get(client_id)
            .is_some_and(|m| Some(m.to) != keep)
        {
            if let Some((c, m)) = r.moves.out.remove_entry(client_id) {
                stays.extend(m.deferred.map(|claim| (m.to, c, claim)));
            }
        }
        let mut fenced: Vec<u64> = (r.moves.fences.iter())
            .filter(|(_, f)| &*f.client_id == client_id && Some(f.to) != keep)
            .map(|(&id, _)| id)
            .collect();
        fenced.sort_unstable();
        for id in fenced {
            if let Some(f) = r.moves.fences.remove(&id) {
                stays.push((f.to, f.client_id, f.claim));
            }
        }
        for (to, client_id, claim) in stays {
            Self::stays(st, to, client_id, claim);
        }
    }

    /// A's side: peer `from` routes what was offered; send it the rest of
    /// the session and end the session here. (Its client may have
    /// connected there again meanwhile, and the offer been made again for
    /// the later claim: the Take of that claim moves the session, one of
    /// an earlier claim is answered that it stays, and that node asks
    /// again with the later one.)
    fn take_asked(&self, st: &mut State, now: Instant, from: u16, client_id: Arc<str>, claim: u64) {
        // Coming here from that node for a later claim (two clients'
        // CONNECTs crossed): it stays here (the offer to it ends), and the
        // peer sends its copy once it has the answer.
        let later = Self::comes_here_later(st, &client_id, from, claim);
        // Still coming here from a third node: the rest goes on once it
        // is all here (in order).
        if let (Some(r), false) = (st.remote.as_mut(), later) {
            if r.moves.inbound.contains_key(&client_id) {
                let out = r.moves.out.get_mut(&client_id);
                if let Some(m) = out.filter(|m| m.answered_by(from, claim)) {
                    m.deferred = Some(claim);
                    return;
                }
            }
        }
        // (An offer made since to another node stays: that node's Take
        // moves the session, this one gets nothing. So does one made since
        // to that node for a later claim of its: the Take of that claim
        // follows, and this one, for an earlier claim, gets nothing (seed
        // 37929: taken here, the offer ended with the earlier claim's
        // answer, and so did the move there).)
        let offered = st.remote.as_mut().and_then(|r| {
            let out = r.moves.out.get(&client_id);
            let to_from = out.is_some_and(|m| m.answered_by(from, claim));
            to_from.then(|| r.moves.out.remove(&client_id)).flatten()
        });
        let uid = offered.as_ref().map(|m| m.uid).filter(|_| !later);
        let key = Self::leaving_session(st, &client_id, uid);
        if let (Some(m), Some(_)) = (offered, key) {
            self.fence_then_send(st, (from, client_id, claim), m);
            return;
        }
        self.send_session(st, now, from, client_id, claim, uid);
    }

    /// The session of `client_id` that is to leave, if it is still the
    /// one offered (`uid`) and its client is not back.
    fn leaving_session(st: &State, client_id: &str, uid: Option<u64>) -> Option<SessionKey> {
        let key = *st.by_client.get(client_id)?;
        let slot = st.sessions.get(key)?;
        (Some(slot.uid) == uid && slot.conn.is_none()).then_some(key)
    }

    /// Before the session goes, every message on its way to it must be
    /// here: every shard of this node asks every peer to answer behind
    /// what it sent ([`Frame::MoveFence`]). A peer routes to the other
    /// node since before the Take (it acknowledged those routes first), so
    /// what it published before reached this node by its answer.
    fn fence_then_send(
        &self,
        st: &mut State,
        (from, client_id, claim): (u16, Arc<str>, u64),
        offer: MoveOut,
    ) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        // Unique on this node: the bridges keep every shard's fences by id.
        r.moves.last_fence += 1;
        let id = r.moves.last_fence * self.shards as u64 + self.id as u64;
        let fence = Fence {
            since: offer.since,
            to: from,
            client_id,
            claim,
            promised: offer.claim,
            uid: offer.uid,
            shards_left: self.shards,
        };
        r.moves.fences.insert(id, fence);
        Self::move_fence_asked(st, id, self.id);
        for s in (0..self.shards).filter(|&s| s != self.id) {
            self.mesh.send(s, MeshMsg::MoveFence { id, home: self.id });
        }
    }

    /// Another shard's part of a move's fence: ask this shard's peers.
    pub(super) fn move_fence_asked(st: &mut State, id: u64, home: usize) {
        Self::to_bridge(st, BridgeOut::MoveFence { id, home });
    }

    /// Peer `node` asks for an answer to its fence `id` behind every
    /// message this shard routed to it so far (those still in the outbox
    /// included).
    pub fn answer_move_fence(&self, node: u16, id: u64) {
        Self::to_bridge(
            &mut self.state.borrow_mut(),
            BridgeOut::MoveFenceDone { node, id },
        );
    }

    /// Every peer of this shard answered fence `id` of shard `home`.
    pub fn move_fence_passed(&self, now: Instant, id: u64, home: usize) {
        let mut st = self.state.borrow_mut();
        if home != self.id {
            // Behind every message this shard routed there that still
            // waits for the sync gate: the session must not go before
            // they reach it.
            let msg = MeshMsg::MoveFencePassed { id };
            match st.store.as_mut() {
                Some(store) => store.send_behind(&self.mesh, home, msg),
                None => self.mesh.send(home, msg),
            }
            return;
        }
        self.move_fence_part(&mut st, now, id);
    }

    /// On the fence's home shard: one more shard passed fence `id`; once
    /// all have, the session goes.
    pub(super) fn move_fence_part(&self, st: &mut State, now: Instant, id: u64) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let Some(f) = r.moves.fences.get_mut(&id) else {
            return;
        };
        f.shards_left = f.shards_left.saturating_sub(1);
        if f.shards_left > 0 {
            return;
        }
        let Some(f) = r.moves.fences.remove(&id) else {
            return;
        };
        // Taken meanwhile from that very node, for a later claim: it stays.
        if Self::comes_here_later(st, &f.client_id, f.to, f.claim) {
            self.send_session(st, now, f.to, f.client_id, f.claim, None);
            return;
        }
        // Coming here meanwhile from a third node: it goes once all of it
        // is here (what that node brings would find the session gone).
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let elsewhere = r.moves.out.get(&f.client_id).is_some_and(|m| m.to != f.to);
        if r.moves.inbound.contains_key(&f.client_id) && !elsewhere {
            let m = r.moves.out.entry(f.client_id).or_insert(MoveOut {
                to: f.to,
                uid: f.uid,
                since: f.since,
                claim: f.promised,
                deferred: None,
            });
            m.deferred = Some(f.claim);
            return;
        }
        self.send_session(st, now, f.to, f.client_id, f.claim, Some(f.uid));
    }

    /// True when the session of `client_id` is coming here from peer
    /// `from` for a claim of this node later than `claim` (a claim of that
    /// peer's): of two nodes each asking the other for the session, the
    /// later claim's gets it.
    fn comes_here_later(st: &State, client_id: &str, from: u16, claim: u64) -> bool {
        let Some(r) = st.remote.as_ref() else {
            return false;
        };
        let peer = Self::peer_name(st, from);
        (r.moves.inbound.get(client_id).into_iter())
            .flat_map(|m| &m.offers)
            .any(|o| o.from == from && wins((o.claim, &r.claims.me), (claim, &peer)))
    }

    /// Send the session of `client_id` (still the one offered, `uid`) to
    /// peer `from`, and end it here; or, if it is not, tell the peer it
    /// stays.
    fn send_session(
        &self,
        st: &mut State,
        now: Instant,
        from: u16,
        client_id: Arc<str>,
        claim: u64,
        uid: Option<u64>,
    ) {
        let Some(key) = Self::leaving_session(st, &client_id, uid) else {
            Self::stays(st, from, client_id, claim);
            return;
        };
        let (deliveries, lost) = Self::leaving(st, key);
        let Some(slot) = st.sessions.get_mut(key) else {
            return;
        };
        let qos2_in = slot.session.durable_state().qos2_in;
        let seen = slot.session.seen_marks();
        // Kept until that node's standbys hold it (`orphans`).
        self.keep_moving(st, now, key, (from, claim), &deliveries, &qos2_in);
        let Some(slot) = st.sessions.get_mut(key) else {
            return;
        };
        // Its client is back (on that node): the session ends without
        // its will.
        slot.session.cancel_pending_will();
        slot.session.discard(now);
        self.drive(st, key, now);
        let count = deliveries.len();
        let mut parts = in_parts(deliveries);
        let last = parts.pop().unwrap_or_default();
        for part in parts {
            let m = SessionMoved {
                seq: 0,
                client_id: client_id.clone(),
                claim,
                deliveries: part,
                qos2_in: Vec::new(),
                seen: Vec::new(),
                last: false,
                stays: false,
            };
            Self::to_peer(st, from, Frame::SessionMoved(Box::new(m)));
        }
        let m = SessionMoved {
            seq: 0,
            client_id: client_id.clone(),
            claim,
            deliveries: last,
            qos2_in,
            seen,
            last: true,
            stays: false,
        };
        Self::to_peer(st, from, Frame::SessionMoved(Box::new(m)));
        let name = Self::peer_name(st, from);
        if let Some(r) = st.remote.as_mut() {
            r.moves.moved_out += 1;
            r.moves.lost += lost;
        }
        shard_log!(
            self,
            log::Level::Info,
            "cluster: client {} connected on node {}: its session moves there \
             ({count} deliveries{})",
            quote(&client_id),
            quote(&name),
            match lost {
                0 => String::new(),
                n => format!(", {n} lost: past the move's {MOVE_BYTES_MAX} bytes or unreadable"),
            }
        );
    }

    /// Nothing moves to peer `to` for its claim `claim` of `client_id`
    /// (the client came back here, or the session ended): it finishes
    /// with what it has.
    fn stays(st: &mut State, to: u16, client_id: Arc<str>, claim: u64) {
        let part = SessionMoved {
            seq: 0,
            client_id,
            claim,
            deliveries: Vec::new(),
            qos2_in: Vec::new(),
            seen: Vec::new(),
            last: true,
            stays: true,
        };
        Self::to_peer(st, to, Frame::SessionMoved(Box::new(part)));
    }

    /// The deliveries session `key` holds, in order, with what is paged
    /// out read back from the log, up to [`MOVE_BYTES_MAX`]; and how many
    /// were left out.
    fn leaving(st: &mut State, key: SessionKey) -> (Vec<MovedDelivery>, u64) {
        let Some(slot) = st.sessions.get(key) else {
            return (Vec::new(), 0);
        };
        let leaving = slot.session.leaving();
        let (mut out, mut lost, mut bytes) = (Vec::with_capacity(leaving.len()), 0, 0);
        for l in leaving {
            let message = match (l.message, l.delivery.stored, st.store.as_mut()) {
                (Some(m), _, _) => Some(m),
                (None, Some(id), Some(store)) => store.load(id).ok(),
                (None, _, _) => None,
            };
            let Some(message) = message.filter(|m| bytes + m.cost_bytes() <= MOVE_BYTES_MAX) else {
                lost += 1;
                continue;
            };
            bytes += message.cost_bytes();
            out.push(MovedDelivery {
                message,
                qos: l.delivery.qos,
                retain: l.delivery.retain,
                subscription_ids: l.delivery.subscription_ids,
                packet_id: l.packet_id,
                released: l.released,
            });
        }
        (out, lost)
    }

    /// B's side: peer `from` offers the session of a client connected
    /// here. Route its subscriptions; the Take goes once every peer can.
    fn offered(&self, st: &mut State, now: Instant, from: u16, o: SessionOffer) {
        // The connection's CONNACK went already (refused: a peer did not
        // answer in time): the session stays there, and the client's next
        // CONNECT claims it again.
        let answered = st
            .remote
            .as_ref()
            .is_some_and(|r| r.claims.is_pending(o.claim));
        let key = st.by_client.get(&o.client_id).copied();
        let (true, Some(key)) = (answered, key) else {
            if let Some(r) = st.remote.as_mut() {
                r.moves.declined += 1;
            }
            return;
        };
        let Some(slot) = st.sessions.get_mut(key) else {
            return;
        };
        let uid = slot.uid;
        // The same node's offer again (its client connected here again
        // before the move ended): one move, and the output its
        // connections wait for is the session's.
        let again = st
            .remote
            .as_mut()
            .and_then(|r| r.moves.inbound.get_mut(&o.client_id))
            .filter(|m| m.uid == uid)
            .and_then(|m| m.offers.iter_mut().find(|x| x.from == from));
        if let Some(again) = again {
            again.claim = o.claim;
            if !again.stale {
                again.seen = o.seen;
            }
            return;
        }
        let Some(slot) = st.sessions.get_mut(key) else {
            return;
        };
        // Created by the CONNECT waiting now (its CONNACK has not gone),
        // or without subscriptions: it becomes the offered copy. Otherwise,
        // if its client was told about it, an offered copy born before it
        // is older than what the client knows (a partition let both live),
        // and only ends there.
        let fresh = slot.session.subscriptions().is_empty() || slot.born == slot.claim;
        let stale = !fresh && slot.born_told && o.born != 0 && slot.born > o.born;
        let took_birth = fresh || (!stale && o.born > slot.born);
        if took_birth {
            slot.born = o.born;
            slot.born_told = o.born != 0;
        }
        slot.session.begin_move_in();
        if took_birth {
            Self::durable_told(st, key);
        }
        let output = self.hold_output(st, key, 1);
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        // A move into an earlier session of this client id (it ended) is
        // over.
        if r.moves
            .inbound
            .get(&o.client_id)
            .is_some_and(|m| m.uid != uid)
        {
            r.moves.inbound.remove(&o.client_id);
        }
        // A number for a new move (one that goes on keeps its own).
        r.moves.last_move += 1;
        let id = r.moves.last_move;
        let m = r
            .moves
            .inbound
            .entry(o.client_id.clone())
            .or_insert(MoveIn {
                key,
                uid,
                id,
                routes: 0,
                offers: Vec::new(),
                ids: HashSet::default(),
            });
        m.offers.push(Offer {
            from,
            claim: o.claim,
            filters: Vec::new(),
            offered: Vec::new(),
            seen: match stale {
                true => Vec::new(),
                false => o.seen,
            },
            shared: Vec::new(),
            stale,
            taken: false,
            output,
            since: now,
        });
        if let Some(slot) = st.sessions.get_mut(key) {
            slot.session.mark_present();
        }
        let subscriptions = match stale {
            true => Vec::new(),
            false => o.subscriptions,
        };
        for (filter, sub) in subscriptions {
            if filter.starts_with("$share/") {
                let offer = Self::offer_mut(st, &o.client_id, from);
                if let Some(offer) = offer {
                    offer.shared.push((filter, sub));
                }
                continue;
            }
            let offer = Self::offer_mut(st, &o.client_id, from);
            if let Some(offer) = offer {
                offer.offered.push(filter.clone());
            }
            if Self::take_subscription(st, key, &filter, &sub) {
                self.route_moved(st, key, &filter, sub);
                let offer = Self::offer_mut(st, &o.client_id, from);
                if let Some(offer) = offer {
                    offer.filters.push(filter);
                }
            }
        }
        Self::send_takes(st, &o.client_id);
        Self::after_step(st, key, now);
    }

    /// Session `key` takes subscription `filter` from the node it moves
    /// from (logged), unless it has its own (`Session::take_subscription`):
    /// true when taken, for the caller to route.
    pub(super) fn take_subscription(
        st: &mut State,
        key: SessionKey,
        filter: &str,
        sub: &Subscription,
    ) -> bool {
        let taken = (st.sessions.get_mut(key))
            .is_some_and(|s| s.session.take_subscription(filter, sub.clone()));
        if taken {
            Self::durable_subscription(st, key, filter, Some(sub));
        }
        taken
    }

    /// The offer from peer `from` of the move of `client_id`'s session
    /// here, if that move is on.
    fn offer_mut<'a>(st: &'a mut State, client_id: &str, from: u16) -> Option<&'a mut Offer> {
        let m = Self::move_in_mut(st, client_id)?;
        m.offers.iter_mut().find(|x| x.from == from)
    }

    /// The move `m` from peer `from` ended whole or given up: the
    /// subscriptions it offered (`filters`) are the session's now,
    /// whichever other node's offer brought them first (that one ending
    /// "stays" leaves them; seed 34698).
    fn own_offered(m: &mut MoveIn, from: u16, filters: &[String]) {
        for o in m.offers.iter_mut().filter(|o| o.from != from) {
            o.filters.retain(|f| !filters.contains(f));
        }
    }

    /// The move of `client_id`'s session here, if one is on.
    fn move_in_mut<'a>(st: &'a mut State, client_id: &str) -> Option<&'a mut MoveIn> {
        st.remote.as_mut()?.moves.inbound.get_mut(client_id)
    }

    /// Hold `count` route acknowledgements for the move into session
    /// `key` (its Takes wait for them).
    pub(super) fn hold_move(&self, st: &mut State, key: SessionKey, count: u32) -> Option<AckTo> {
        let slot = st.sessions.get(key)?;
        let m = st
            .remote
            .as_mut()?
            .moves
            .inbound
            .get_mut(slot.session.client_id())?;
        if count == 0 || m.uid != slot.uid {
            return None;
        }
        m.routes += count;
        Some(AckTo {
            shard: self.id,
            session: key,
            uid: slot.uid,
            move_in: m.id,
        })
    }

    /// A route the move into session `ack.session` waits for was
    /// acknowledged.
    pub(super) fn move_route_acked(st: &mut State, ack: AckTo) {
        let Some(slot) = st.sessions.get(ack.session).filter(|s| s.uid == ack.uid) else {
            return;
        };
        let client_id = slot.session.client_id().clone();
        let Some(m) = st
            .remote
            .as_mut()
            .and_then(|r| r.moves.inbound.get_mut(&client_id))
            .filter(|m| m.id == ack.move_in)
        else {
            return;
        };
        m.routes = m.routes.saturating_sub(1);
        Self::send_takes(st, &client_id);
    }

    /// Once the routes are everywhere, ask every offering node for the
    /// rest of its session.
    fn send_takes(st: &mut State, client_id: &Arc<str>) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let Some(m) = r.moves.inbound.get_mut(client_id) else {
            return;
        };
        if m.routes > 0 {
            return;
        }
        for o in m.offers.iter_mut().filter(|o| !o.taken) {
            o.taken = true;
            r.out.push_back(BridgeOut::Peer {
                node: o.from,
                frame: Frame::SessionTake {
                    seq: 0,
                    client_id: client_id.clone(),
                    claim: o.claim,
                },
            });
        }
        r.wake.notify();
    }

    /// B's side: part of the session moving here from peer `from`.
    fn moved_part(&self, st: &mut State, now: Instant, from: u16, mut part: SessionMoved) {
        // Only into the session the move is for, while it is on.
        let expected = st
            .remote
            .as_ref()
            .and_then(|r| r.moves.inbound.get(&part.client_id))
            .filter(|m| m.offers.iter().any(|o| o.from == from))
            .map(|m| (m.key, m.uid));
        let key = expected.and_then(|(k, uid)| {
            let live = st.sessions.get(k).is_some_and(|s| s.uid == uid);
            live.then_some(k)
        });
        let Some(key) = key else {
            let n = part.deliveries.len() as u64;
            if let Some(r) = st.remote.as_mut() {
                r.moves.lost += n;
                // The session it was for ended: so did its move.
                if expected.is_some() {
                    r.moves.inbound.remove(&part.client_id);
                }
            }
            if n > 0 {
                shard_log!(
                    self,
                    log::Level::Warn,
                    "cluster: {n} deliveries of client {}'s session came from another node \
                     after the move here ended (given up, or the session ended): dropped",
                    quote(&part.client_id)
                );
            }
            if expected.is_some() {
                self.answer_deferred_take(st, now, &part.client_id);
            }
            return;
        };
        // The answer to a Take for an earlier claim of this node's than
        // the one the offer now answers (its client connected here again
        // meanwhile): the node asked answers the Take of the current claim
        // alone, so that one goes (again).
        let offer = Self::offer_mut(st, &part.client_id, from);
        if let Some(offer) = offer.filter(|o| part.stays && part.claim < o.claim) {
            offer.taken = false;
            Self::send_takes(st, &part.client_id);
            return;
        }
        let stale = Self::offer_mut(st, &part.client_id, from).is_some_and(|o| o.stale);
        if stale {
            let n = std::mem::take(&mut part.deliveries).len() as u64;
            part.qos2_in.clear();
            if let Some(r) = st.remote.as_mut() {
                r.moves.stale_dropped += n;
            }
            if part.last {
                let name = Self::peer_name(st, from);
                shard_log!(
                    self,
                    log::Level::Warn,
                    "cluster: client {}'s session on node {} is older than the one here, \
                     which its client was told was new (a partition let both live): it ends \
                     there, its deliveries dropped",
                    quote(&part.client_id),
                    quote(&name)
                );
            }
        }
        let ids: Vec<u64> = part.deliveries.iter().map(|d| d.message.id).collect();
        // (In flight first, then queued, as the parts carry them.)
        let (mut inflight, mut queued) = restored_deliveries(part.deliveries);
        for i in &mut inflight {
            i.delivery.stored = Self::store_taken(st, key, &i.message, &i.delivery);
        }
        for (message, delivery) in &mut queued {
            delivery.stored = Self::store_taken(st, key, message, delivery);
        }
        let offered = match part.last && !part.stays && !stale {
            true => {
                Self::offer_mut(st, &part.client_id, from).map(|o| std::mem::take(&mut o.offered))
            }
            false => None,
        };
        if let (Some(filters), Some(m)) = (&offered, Self::move_in_mut(st, &part.client_id)) {
            Self::own_offered(m, from, filters);
        }
        if let Some(slot) = st.sessions.get_mut(key) {
            slot.session.take_deliveries(now, inflight, queued);
            if part.last {
                slot.session.take_qos2_in(&part.qos2_in);
            }
            if let Some(filters) = offered {
                slot.session.take_marks(&part.seen, filters, true);
            }
        }
        if let Some(m) = st
            .remote
            .as_mut()
            .and_then(|r| r.moves.inbound.get_mut(&part.client_id))
        {
            m.ids.extend(ids.into_iter().filter(|&id| id != 0));
        }
        if part.stays {
            self.drop_offered(st, key, &part.client_id, from);
        }
        if part.last {
            let end = match part.stays {
                true => MoveEnd::Stays,
                false => MoveEnd::Whole,
            };
            self.move_done(st, now, &part.client_id, from, end);
        }
        Self::after_step(st, key, now);
    }

    /// Store `delivery` of `message`, which session `key` takes from
    /// another node (a move, an adoption), in this shard's log when the
    /// session keeps it there: its stored id. Handed over even when its
    /// record must wait for room, as a retained delivery is: held back, it
    /// could not keep its place ahead of the messages that came here
    /// directly.
    pub(super) fn store_taken(
        st: &mut State,
        key: SessionKey,
        message: &Arc<Message>,
        delivery: &Delivery,
    ) -> Option<u64> {
        let sid = Self::storable(st, key, delivery.qos)?;
        let id = Self::next_message_id(st)?;
        let target = StoreTarget {
            key,
            sid,
            qos: delivery.qos,
            retain: delivery.retain,
            subscription_ids: delivery.subscription_ids.clone(),
        };
        Self::store_message(st, id, message, None, Scope::default(), &[target]);
        Some(id)
    }

    /// The session stays on peer `from` (its client came back there):
    /// the subscriptions session `key` took from its offer go, and so do
    /// the messages it held meanwhile.
    fn drop_offered(&self, st: &mut State, key: SessionKey, client_id: &Arc<str>, from: u16) {
        let mut filters = Self::offer_mut(st, client_id, from)
            .map(|o| std::mem::take(&mut o.filters))
            .unwrap_or_default();
        // A subscription another node's copy (still coming) offered too
        // stays, as if that offer had brought it (seed 34698: taken from
        // this offer first, then the other copy came whole without it).
        if let Some(m) = Self::move_in_mut(st, client_id) {
            for o in m.offers.iter_mut().filter(|o| o.from != from && !o.stale) {
                let (shared, own): (Vec<_>, Vec<_>) =
                    filters.into_iter().partition(|f| o.offered.contains(f));
                o.filters.extend(shared);
                filters = own;
            }
        }
        for filter in filters {
            let dropped = st
                .sessions
                .get_mut(key)
                .is_some_and(|s| s.session.drop_subscription(&filter));
            if dropped {
                Self::durable_subscription(st, key, &filter, None);
                self.unsubscribe(st, key, &filter);
            }
        }
        // The live messages held meanwhile that came through those only
        // (copies of what the session there has) go.
        if let Some(slot) = st.sessions.get_mut(key) {
            for (_, d) in slot.session.take_held_unmatched() {
                if let Some(id) = d.stored {
                    slot.session.journal_done(id);
                }
            }
        }
    }

    /// The move of `client_id`'s session from peer `from` ended (`end`):
    /// held deliveries go on, the output is released.
    fn move_done(
        &self,
        st: &mut State,
        now: Instant,
        client_id: &Arc<str>,
        from: u16,
        end: MoveEnd,
    ) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let Some(m) = r.moves.inbound.get_mut(client_id) else {
            return;
        };
        let Some(i) = m.offers.iter().position(|o| o.from == from) else {
            return;
        };
        let offer = m.offers.remove(i);
        if end == MoveEnd::GivenUp {
            Self::own_offered(m, from, &offer.offered);
        }
        let (key, uid) = (m.key, m.uid);
        let ids = std::mem::take(&mut m.ids);
        if m.offers.is_empty() {
            r.moves.inbound.remove(client_id);
            r.moves.recent.push_back((now + MOVED_IDS_KEPT, key, uid));
        }
        if end == MoveEnd::Whole {
            let last =
                (st.remote.as_ref()).is_none_or(|r| !r.moves.inbound.contains_key(client_id));
            self.moved_in_whole(st, key, uid, (from, client_id, offer.claim), last);
        }
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        match end {
            MoveEnd::Whole => r.moves.moved_in += 1,
            MoveEnd::Stays => r.moves.stayed += 1,
            MoveEnd::GivenUp => {
                r.moves.unfinished += 1;
                if r.moves.given_up.len() == GIVEN_UP_KEPT {
                    r.moves.given_up.pop_front();
                }
                r.moves.given_up.push_back(client_id.clone());
            }
        }
        if let Some(slot) = st.sessions.get_mut(key).filter(|s| s.uid == uid) {
            // What it had there when offered still counts: a late copy of
            // one of those is no more this copy's than if the rest had
            // come (the last part brought marks at least as high).
            if end == MoveEnd::GivenUp {
                slot.session
                    .take_marks(&offer.seen, offer.offered.clone(), false);
            }
            slot.session.end_move_in(now, ids);
        }
        // The session is here now: its shared subscriptions too.
        let still = st.sessions.get(key).is_some_and(|s| s.uid == uid);
        for (filter, sub) in offer
            .shared
            .into_iter()
            .filter(|_| end == MoveEnd::Whole && still)
        {
            if Self::take_subscription(st, key, &filter, &sub) {
                self.subscribe(st, key, &filter, sub, false);
            }
        }
        if let Some(ack) = offer.output {
            self.ack(st, ack);
        }
        self.answer_deferred_take(st, now, client_id);
        if end == MoveEnd::GivenUp {
            let name = Self::peer_name(st, from);
            shard_log!(
                self,
                log::Level::Warn,
                "cluster: client {}'s session did not all come from node {} (down, or \
                 more than {} s): what it held there is lost",
                quote(client_id),
                quote(&name),
                MOVE_GIVE_UP.as_secs()
            );
        }
        Self::after_step(st, key, now);
    }

    /// A node that asked for the session of `client_id` while it was
    /// coming here gets its answer now that no move into it is on.
    fn answer_deferred_take(&self, st: &mut State, now: Instant, client_id: &Arc<str>) {
        let deferred = st.remote.as_ref().and_then(|r| {
            let m = r.moves.out.get(client_id)?;
            let claim = m.deferred?;
            (!r.moves.inbound.contains_key(client_id)).then_some((m.to, claim))
        });
        if let Some((to, claim)) = deferred {
            self.take_asked(st, now, to, client_id.clone(), claim);
        }
    }

    /// Give up the moves that waited too long; forget the moved ids of
    /// sessions that moved long enough ago.
    pub(super) fn release_overdue_moves(&self, st: &mut State, now: Instant) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let m = &mut r.moves;
        if m.out.is_empty() && m.inbound.is_empty() && m.recent.is_empty() && m.fences.is_empty() {
            return;
        }
        // An offer, or a fence, is given up a little before the node it
        // went to gives up (its clock starts later): the session stays
        // here (a later Take gets that answer), not sent into a move that
        // ended there.
        let limit = MOVE_GIVE_UP - MOVE_WAIT;
        m.out
            .retain(|_, o| now.saturating_duration_since(o.since) < limit);
        m.fences
            .retain(|_, f| now.saturating_duration_since(f.since) < limit);
        let mut overdue = Vec::new();
        let mut slow = Vec::new();
        for (client_id, i) in &mut m.inbound {
            for o in &mut i.offers {
                let waited = now.saturating_duration_since(o.since);
                if waited >= MOVE_GIVE_UP {
                    overdue.push((client_id.clone(), o.from));
                } else if waited >= MOVE_WAIT {
                    if let Some(ack) = o.output.take() {
                        slow.push((client_id.clone(), o.from, ack));
                    }
                }
            }
        }
        let mut forget = Vec::new();
        while let Some(&(at, key, uid)) = m.recent.front() {
            if at > now {
                break;
            }
            m.recent.pop_front();
            forget.push((key, uid));
        }
        for (key, uid) in forget {
            if let Some(slot) = st.sessions.get_mut(key).filter(|s| s.uid == uid) {
                slot.session.forget_moved_ids();
            }
        }
        slow.sort_unstable_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        for (client_id, from, ack) in slow {
            self.ack(st, ack);
            let name = Self::peer_name(st, from);
            shard_log!(
                self,
                log::Level::Info,
                "cluster: client {}'s session is not all here from node {} after {} s: \
                 its CONNACK goes, its messages wait for the rest",
                quote(&client_id),
                quote(&name),
                MOVE_WAIT.as_secs()
            );
        }
        overdue.sort_unstable();
        for (client_id, from) in overdue {
            self.move_done(st, now, &client_id, from, MoveEnd::GivenUp);
        }
    }

    /// Peer `peer`'s run ended: the moves to and from it end (what it
    /// held for a session moving here is lost with it).
    pub(super) fn peer_moves_ended(&self, st: &mut State, now: Instant, peer: u16) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        r.moves.out.retain(|_, o| o.to != peer);
        // What is kept for it and not sent on (`orphan_moves`): a newer
        // run of it recovered its own log.
        Self::kept_for_gone(st, peer);
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        // A session about to go there stays (its fence passes as the
        // peer's run ends: it must not be sent into that link).
        r.moves.fences.retain(|_, f| f.to != peer);
        let mut ended: Vec<Arc<str>> = r
            .moves
            .inbound
            .iter()
            .filter(|(_, m)| m.offers.iter().any(|o| o.from == peer))
            .map(|(c, _)| c.clone())
            .collect();
        ended.sort_unstable();
        let name = Self::peer_name(st, peer);
        for client_id in ended {
            let at = (st.remote.as_ref())
                .and_then(|r| r.moves.inbound.get(&client_id))
                .map(|m| (m.key, m.uid));
            self.move_done(st, now, &client_id, peer, MoveEnd::GivenUp);
            // What the move did not bring is in that node's log: a copy
            // of the session taken over from it (`adopt`) is this session.
            let slot = at.and_then(|(k, uid)| st.sessions.get_mut(k).filter(|s| s.uid == uid));
            if let Some(slot) = slot {
                slot.cut_short_from = Some(name.clone());
            }
        }
    }

    /// Put `frame` in the outbox for peer `node`.
    pub(super) fn to_peer(st: &mut State, node: u16, frame: Frame) {
        Self::to_bridge(st, BridgeOut::Peer { node, frame });
    }

    /// Put `out` in the bridge's outbox.
    fn to_bridge(st: &mut State, out: BridgeOut) {
        if let Some(r) = st.remote.as_mut() {
            r.out.push_back(out);
            r.wake.notify();
        }
    }

    /// Peer `index`'s name, for the log.
    pub(super) fn peer_name(st: &State, index: u16) -> Arc<str> {
        st.remote
            .as_ref()
            .and_then(|r| r.peer_names.get(&index).cloned())
            .unwrap_or_else(|| Arc::from(index.to_string()))
    }
}
