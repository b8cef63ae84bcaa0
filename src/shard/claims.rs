//! The shard's side of claims (`cluster::claims`): one live connection
//! per client id in the cluster.
//!
//! Shard-local, no I/O. When a connection attaches on its home shard in a
//! cluster, the shard stamps the claim and puts it in the bridge outbox
//! ([`BridgeOut::Claim`]), and holds the connection's output (its CONNACK)
//! until every peer the runtime sent it to has acknowledged it
//! ([`ShardCore::claim_sent`], [`ShardCore::handle_claim_acks`]) or
//! [`CLAIM_WAIT`] has passed: when the client hears CONNACK, no peer
//! whose link is up still serves an older connection of its client id. A
//! link that comes up sends every live connection's claim, a part at a
//! time ([`ShardCore::claims_snapshot`]), without acknowledgements except
//! for a connection still waiting to resume a session (the peer may hold
//! it). A claim from a
//! peer ([`ShardCore::handle_remote_claims`]) goes to this node's home
//! shard of its client id, which closes its own connection of that client
//! id if the peer's claim is later, as a takeover on one node would
//! (DISCONNECT 0x8E to a 5.0 client, the will as for any takeover; a
//! connection whose CONNACK has not gone yet is refused instead, 0x88).
//! A will waiting for its delay is cancelled, since its client is back.
//! A claim the clocks put no later still takes a session that no
//! connection holds here (two nodes' clocks may not order two CONNECTs).
//! A CONNECT without Clean Start waits for every member up (any may hold
//! its session) and is refused (0x88) when one did not answer in time.
//! When the claim says the client started clean there (or, in a link's
//! snapshot, that it was told there it had no session), the session here
//! ends (offline or just closed), as a Clean Start here would end it;
//! otherwise it moves to the claiming node (`moves`), offered ahead of
//! the acknowledgement.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::claims::wins;
use crate::cluster::frame::{ClaimEntry, Frame};
use crate::text::quote;

use crate::hash::HashMap;

use super::mesh::{AckTo, MeshMsg};
use super::remote::BridgeOut;
use super::{home_shard, SessionKey, ShardCore, State};

/// A link's progress through this shard's live connections' claims.
#[derive(Debug, Default)]
pub struct ClaimsSnapshot {
    next: u32,
    done: bool,
}

impl ClaimsSnapshot {
    /// True when every part was given.
    pub fn is_done(&self) -> bool {
        self.done
    }
}

/// How long a CONNACK waits for the peers' acknowledgements of its claim
/// at most (a link that breaks loses them).
pub const CLAIM_WAIT: Duration = Duration::from_secs(2);

/// A claim of this shard's whose acknowledgements are awaited.
struct Pending {
    /// The held output to release.
    ack: AckTo,
    /// Peers it was sent to (once the runtime said).
    sent: Option<usize>,
    acked: usize,
    /// Peers whose link came up since and that were asked too (a link's
    /// snapshot asks again for a connection that resumes a session).
    asked: usize,
    since: Instant,
    /// A connection that resumes a session (no Clean Start): refused if
    /// a peer does not answer in time (that peer may hold the session);
    /// true when this connection created the session here (it ends).
    refuse: Option<bool>,
}

/// A claim from a peer, as its node's home shard of the client id takes
/// it.
#[derive(Debug, Clone)]
pub struct PeerClaim {
    /// The claim.
    pub claim: ClaimEntry,
    /// The claiming node's name (ties between equal stamps).
    pub node: Arc<str>,
    /// Its index here (where the acknowledgement goes).
    pub index: u16,
    /// Acknowledge it.
    pub answer: bool,
}

/// A shard's claims (part of its cluster state).
pub(super) struct Claims {
    /// This node's name (ties between equal stamps).
    pub(super) me: Arc<str>,
    /// Claims of this shard's connections waiting for acknowledgements,
    /// by stamp (this shard's clock gives each stamp once).
    pending: HashMap<u64, Pending>,
    /// Peers with a link up from this shard (the runtime says).
    links_up: usize,
    /// Peers up by membership, linked from this shard or not.
    members_up: usize,
    /// Connections closed here for a later one on another node.
    pub(super) taken_over: u64,
    /// Sessions ended here because their client started clean on
    /// another node.
    pub(super) discarded: u64,
    /// CONNACKs released after [`CLAIM_WAIT`] without every
    /// acknowledgement.
    pub(super) unanswered: u64,
}

impl Claims {
    /// True while the claim `stamp` of a connection here waits for
    /// acknowledgements (its CONNACK has not gone).
    pub(super) fn is_pending(&self, stamp: u64) -> bool {
        self.pending.contains_key(&stamp)
    }

    /// This node's name.
    pub(super) fn me(&self) -> Arc<str> {
        self.me.clone()
    }

    pub(super) fn new(me: Arc<str>) -> Claims {
        Claims {
            me,
            pending: HashMap::default(),
            links_up: 0,
            members_up: 0,
            taken_over: 0,
            discarded: 0,
            unanswered: 0,
        }
    }
}

impl ShardCore {
    /// A connection attached to session `key` at `now` (with Clean Start:
    /// `clean_start`; `created`: the session is new here): stamp its
    /// claim, tell the peers, and hold its output until they acknowledge
    /// it.
    pub(super) fn claim_connection(
        &self,
        st: &mut State,
        key: SessionKey,
        now: Instant,
        (clean_start, created): (bool, bool),
    ) {
        let (links_up, members_up) = match st.remote.as_ref() {
            Some(r) => (r.claims.links_up, r.claims.members_up),
            None => return,
        };
        // Nobody to wait for when no peer has a link up from here (and,
        // resuming a session, no member is up that might hold it).
        let held = match (links_up, members_up, clean_start) {
            (0, _, true) | (0, 0, false) => None,
            _ => self.hold_output(st, key, 1),
        };
        let (Some(r), Some(slot)) = (st.remote.as_mut(), st.sessions.get_mut(key)) else {
            return;
        };
        // Nobody to wait for: the queue goes on.
        if held.is_none() {
            slot.session.release_queue(now);
        }
        slot.claim = r.hlc.next(r.wall.to_ms(now));
        if created {
            slot.born = slot.claim;
            slot.born_told = held.is_none();
            slot.cut_short_from = None;
        }
        let client_id = slot.session.client_id().clone();
        if let Some(ack) = held {
            let pending = Pending {
                ack,
                sent: None,
                acked: 0,
                asked: 0,
                since: now,
                refuse: (!clean_start).then_some(created),
            };
            r.claims.pending.insert(slot.claim, pending);
        }
        r.out.push_back(BridgeOut::Claim(ClaimEntry {
            client_id: client_id.clone(),
            stamp: slot.claim,
            clean_start,
        }));
        r.wake.notify();
        // Its client is back: a dead run's will of it waiting here goes,
        // and the session stays here if it was offered to another node.
        Self::cancel_peer_will(st, &client_id);
        Self::keep_offered(st, &client_id);
        // (A session created here is not in the log yet: its record, once
        // written, says it was told, `durable_connect`.)
    }

    /// How many peers have a link up from this shard now (a new
    /// connection's CONNACK waits for their acknowledgements), of
    /// `members` up by membership (a connection that resumes a session
    /// is refused when one of them was not asked: it may hold it).
    pub fn set_peer_links_up(&self, links: usize, members: usize) {
        if let Some(r) = self.state.borrow_mut().remote.as_mut() {
            r.claims.links_up = links;
            r.claims.members_up = members;
        }
    }

    /// The runtime sent this shard's claim `stamp` to `links` peers: the
    /// connection's output waits for that many acknowledgements (none: it
    /// goes at once). A connection that resumes a session waits for
    /// [`CLAIM_WAIT`] and is refused when a member up was not asked.
    pub fn claim_sent(&self, now: Instant, stamp: u64, links: usize) {
        let mut st = self.state.borrow_mut();
        let members = st.remote.as_ref().map_or(0, |r| r.claims.members_up);
        self.claim_answered(&mut st, now, stamp, |p| {
            p.sent = match (p.refuse, links < members) {
                (Some(_), true) => Some(usize::MAX),
                _ => Some(links),
            };
        });
    }

    /// Update the claim `stamp` waits for with `f`; release its output
    /// once every peer it was sent to acknowledged it.
    fn claim_answered(
        &self,
        st: &mut State,
        now: Instant,
        stamp: u64,
        f: impl FnOnce(&mut Pending),
    ) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let Some(p) = r.claims.pending.get_mut(&stamp) else {
            return;
        };
        f(p);
        if p.sent.is_some_and(|n| p.acked >= n.saturating_add(p.asked)) {
            let ack = p.ack;
            r.claims.pending.remove(&stamp);
            self.claim_done(st, now, ack, stamp);
        }
    }

    /// A claim waits no more: its session's queue goes on, and its output
    /// once nothing else holds it.
    fn claim_done(&self, st: &mut State, now: Instant, ack: AckTo, stamp: u64) {
        let mut told = false;
        if let Some(slot) = Self::acked_slot(st, &ack) {
            slot.session.release_queue(now);
            // Its CONNACK goes: a copy it created is the one the client
            // knows.
            told = slot.born == stamp && slot.session.is_connected();
            slot.born_told |= told;
        }
        if told {
            Self::durable_told(st, ack.session);
        }
        self.ack(st, ack);
        self.drive(st, ack.session, now);
    }

    /// Acknowledgements of this node's claims: each to its home shard.
    pub fn handle_claim_acks(&self, now: Instant, acks: Vec<ClaimEntry>) {
        let mut st = self.state.borrow_mut();
        for a in acks {
            let home = home_shard(&a.client_id, self.shards);
            if home == self.id {
                self.claim_acked(&mut st, now, &a);
            } else {
                self.mesh.send(home, MeshMsg::ClaimAck(a));
            }
        }
    }

    /// On the home shard: a peer acknowledged claim `a`.
    pub(super) fn claim_acked(&self, st: &mut State, now: Instant, a: &ClaimEntry) {
        self.claim_answered(st, now, a.stamp, |p| p.acked += 1);
    }

    /// Release the CONNACKs that waited [`CLAIM_WAIT`] for their claims'
    /// acknowledgements (counted).
    pub(super) fn release_overdue_claims(&self, st: &mut State, now: Instant) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        if r.claims.pending.is_empty() {
            return;
        }
        let overdue: Vec<u64> = r
            .claims
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.since) >= CLAIM_WAIT)
            .map(|(&stamp, _)| stamp)
            .collect();
        for stamp in overdue {
            let held = st.remote.as_mut().and_then(|r| {
                let p = r.claims.pending.remove(&stamp)?;
                r.claims.unanswered += 1;
                Some((p.ack, p.refuse))
            });
            let Some((ack, refuse)) = held else {
                continue;
            };
            if let Some(created) = refuse {
                self.refuse_unanswered(st, now, ack, created);
            }
            self.claim_done(st, now, ack, stamp);
        }
    }

    /// A connection that resumes a session waited [`CLAIM_WAIT`] for a
    /// peer's answer: that peer may hold the session, so the connection is
    /// refused (5.0: 0x88, 3.x: 3, server unavailable) rather than told
    /// it has none, and a session it created here ends. The client's next
    /// CONNECT asks again.
    fn refuse_unanswered(&self, st: &mut State, now: Instant, ack: AckTo, created: bool) {
        let Some(slot) = Self::acked_slot(st, &ack) else {
            return;
        };
        if !slot.session.refuse_connect(now) {
            return;
        }
        let client_id = slot.session.client_id().clone();
        self.drive(st, ack.session, now);
        // A session on its way here from another node stays (the
        // client's next CONNECT resumes it).
        let moving = st
            .remote
            .as_ref()
            .is_some_and(|r| r.moves.is_moving_in(&client_id));
        let fresh = st.sessions.get_mut(ack.session).filter(|s| {
            created && !moving && s.uid == ack.uid && s.session.subscriptions().is_empty()
        });
        if let Some(slot) = fresh {
            slot.session.discard(now);
            self.drive(st, ack.session, now);
        }
        shard_log!(
            self,
            log::Level::Warn,
            "cluster: client {} refused (server unavailable): a peer that may hold its \
             session did not answer its claim within {} s",
            quote(&client_id),
            CLAIM_WAIT.as_secs()
        );
    }

    /// Claims from peer node `node` (its name and index): each to this
    /// node's home shard of its client id; `answer`: acknowledge each.
    pub fn handle_remote_claims(
        &self,
        now: Instant,
        node: (&str, u16),
        claims: Vec<ClaimEntry>,
        answer: bool,
    ) {
        let mut st = self.state.borrow_mut();
        let name: Arc<str> = Arc::from(node.0);
        for claim in claims {
            let c = PeerClaim {
                claim,
                node: name.clone(),
                index: node.1,
                answer,
            };
            let home = home_shard(&c.claim.client_id, self.shards);
            if home == self.id {
                self.claimed_elsewhere(&mut st, now, &c);
            } else {
                self.mesh.send(home, MeshMsg::PeerClaim(Box::new(c)));
            }
        }
        Self::debug_invariants(&st);
    }

    /// On the home shard: a peer claimed a client id. A live connection
    /// here with an earlier claim closes, and the session too when the
    /// client started clean there; then the claim is acknowledged if
    /// asked.
    pub(super) fn claimed_elsewhere(&self, st: &mut State, now: Instant, c: &PeerClaim) {
        self.apply_peer_claim(st, now, c);
        if let (true, Some(r)) = (c.answer, st.remote.as_mut()) {
            r.out.push_back(BridgeOut::ClaimAck {
                node: c.index,
                claim: c.claim.clone(),
            });
            r.wake.notify();
        }
    }

    fn apply_peer_claim(&self, st: &mut State, now: Instant, c: &PeerClaim) {
        let (client_id, stamp, node) = (&*c.claim.client_id, c.claim.stamp, &*c.node);
        // The client started clean there, or was told there that it had
        // no session (a link's snapshot says so): a session here that it
        // last had before ends.
        let discard = c.claim.clean_start;
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        r.hlc.observe(stamp);
        let me = r.claims.me.clone();
        // Its client is back: a dead run's will of it waiting here goes.
        Self::cancel_peer_will(st, client_id);
        let Some(&key) = st.by_client.get(client_id) else {
            return;
        };
        let Some(slot) = st.sessions.get_mut(key) else {
            return;
        };
        // A claim no later by the clocks than this node's last one still
        // takes the session when no connection holds it here and it is
        // not on its way to another node: the clocks of two nodes may not
        // tell which CONNECT came first (a claim from a connection that is
        // gone there too is declined). Offered to the claiming node
        // already, it is offered again for this claim: that node declined
        // the offer if the connection it was for is gone, and would
        // otherwise answer this one with a copy the client never had.
        let moot = slot.conn.is_none()
            && c.answer
            && !discard
            && st
                .remote
                .as_ref()
                .is_some_and(|r| !r.moves.is_moving_out_elsewhere(client_id, c.index));
        if !wins((stamp, node), (slot.claim, &me)) && !moot {
            return;
        }
        if slot.conn.is_some() {
            // A session that ends (a clean start there) publishes a will
            // waiting for its delay, as a Clean Start here would.
            self.close_taken_over(st, now, (key, client_id), node, !discard);
        }
        // The client started clean on that node: the session it had here
        // ends, as a Clean Start on this node would end it.
        let still = st.by_client.get(client_id) == Some(&key);
        if let (true, true, Some(slot)) = (discard, still, st.sessions.get_mut(key)) {
            slot.session.discard(now);
            self.drive(st, key, now);
            if let Some(r) = st.remote.as_mut() {
                r.claims.discarded += 1;
            }
            shard_log!(
                self,
                log::Level::Info,
                "cluster: client {} started clean on node {}: its session here is discarded",
                quote(client_id),
                quote(node)
            );
        }
        // Otherwise the session follows its client there (`moves`), unless
        // it is offered already for a later claim (this one came late).
        let later = st
            .remote
            .as_ref()
            .is_some_and(|r| r.moves.offered_for_later(client_id, stamp, node));
        if c.answer && !discard && !later && st.by_client.get(client_id) == Some(&key) {
            self.offer_session(st, now, key, c);
        }
    }

    /// Close session `key`'s connection: its client connected later on
    /// `node`; `cancel_will`: a will left waiting for its delay does not
    /// go (the session lives on).
    fn close_taken_over(
        &self,
        st: &mut State,
        now: Instant,
        (key, client_id): (SessionKey, &str),
        node: &str,
        cancel_will: bool,
    ) {
        let Some(slot) = st.sessions.get_mut(key) else {
            return;
        };
        // A CONNECT not yet answered is refused (server unavailable: its
        // client tries again) rather than told about a session that is
        // about to leave.
        let refused = slot.session.refuse_connect(now);
        if !refused {
            slot.session.takeover(now);
        }
        // A refused CONNECT's claim waits no more (an offer for it is
        // declined): its output goes.
        let stamp = slot.claim;
        if refused {
            self.claim_answered(st, now, stamp, |p| {
                p.sent = Some(0);
                p.asked = 0;
            });
        }
        self.drive(st, key, now);
        // Its client is back (on the other node): a will waiting for its
        // delay does not go.
        let cancelled = cancel_will
            && st
                .sessions
                .get_mut(key)
                .is_some_and(|slot| slot.session.cancel_pending_will());
        if cancelled {
            Self::durable_will_done(st, Some(key));
            Self::export_will(st, key, now);
            Self::after_step(st, key, now);
        }
        if let Some(r) = st.remote.as_mut() {
            r.claims.taken_over += 1;
        }
        shard_log!(
            self,
            log::Level::Info,
            "cluster: client {} connected on node {}: its connection here is {}",
            quote(client_id),
            quote(node),
            match refused {
                true => "refused (server unavailable)",
                false => "closed (session taken over)",
            }
        );
    }

    /// The next part (at most `max` claims) of the live connections'
    /// claims for a link that came up; None once `snapshot` is done. A
    /// connection that attaches meanwhile reaches the link as a change.
    ///
    /// A connection its client was told had no session says so (Clean
    /// Start in its entry): an older session of its client id on the peer
    /// (a partition let both live) ends there. A connection that resumes
    /// a session and still waits for its claim's answers asks the peer
    /// too, in a part of its own, and waits for its answer: the peer came
    /// up since and may hold the session.
    pub fn claims_snapshot(&self, snapshot: &mut ClaimsSnapshot, max: usize) -> Option<Frame> {
        let mut st = self.state.borrow_mut();
        let st = &mut *st;
        let (sessions, Some(r)) = (&st.sessions, st.remote.as_mut()) else {
            snapshot.done = true;
            return None;
        };
        if snapshot.done {
            return None;
        }
        let mut claims = Vec::new();
        let mut next = None;
        let mut asks = false;
        for (key, slot) in sessions.iter_from(snapshot.next) {
            if slot.conn.is_none() {
                continue;
            }
            let pending = r.claims.pending.get(&slot.claim);
            let waits = pending.is_some_and(|p| p.refuse.is_some());
            if claims.len() == max || asks || (waits && !claims.is_empty()) {
                next = Some(key);
                break;
            }
            asks = waits;
            // Told that it had no session, or about to be: a Clean Start
            // (its claim said so already where it went).
            let clean_start = slot.born == slot.claim
                && (slot.born_told || pending.is_some_and(|p| p.refuse.is_none()));
            claims.push(ClaimEntry {
                client_id: slot.session.client_id().clone(),
                stamp: slot.claim,
                clean_start,
            });
        }
        match next {
            Some(k) => snapshot.next = k,
            None => snapshot.done = true,
        }
        if asks {
            let asked = claims
                .first()
                .and_then(|c| r.claims.pending.get_mut(&c.stamp));
            if let Some(p) = asked {
                p.asked += 1;
            }
        }
        (!claims.is_empty()).then_some(Frame::Claims {
            claims,
            answer: asks,
        })
    }
}
