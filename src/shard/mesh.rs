//! What shards say to each other, and each shard's outbox of it.
//!
//! Shard-local: each shard owns an outbox per destination. Anything queued
//! during one loop turn leaves as one batch per destination: the runtime's
//! flusher ([`Mesh::poll_batches`]) runs after the turn's other ready tasks
//! and puts each batch on the bounded SPSC lane to its shard. A full lane
//! makes the flusher wait; the outbox then grows, and past
//! `outbox_messages_max` the shard stops reading from its clients until it
//! drains (backpressure, never an unbounded queue). No runtime here: the
//! lanes belong to `shard::runtime`, and the simulator carries the batches
//! itself.

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use bytes::BytesMut;
use smallvec::SmallVec;

use crate::codec::{Connect, QoS};
use crate::message::Message;
use crate::persist::Origin;
use crate::router::MatchWalk;
pub use crate::router::SharedPick;

use super::notify::Notify;
use super::SessionKey;

/// Who is waiting for retained messages: a subscription on some shard.
#[derive(Debug, Clone)]
pub struct RetainedWaiter {
    /// Shard of the subscribing session.
    pub shard: usize,
    /// The session on that shard.
    pub session: SessionKey,
    /// The session's uid: guards against the key having been reused.
    pub session_uid: u64,
    /// Granted QoS of the subscription.
    pub qos: QoS,
    /// Its subscription identifier.
    pub subscription_id: Option<u32>,
}

/// A connection moving to its home shard after CONNECT was read.
#[derive(Debug)]
pub struct Handoff {
    /// The socket (a duplicate of the accepting shard's descriptor).
    pub socket: socket2::Socket,
    /// The CONNECT already decoded.
    pub connect: Box<Connect>,
    /// Bytes read after CONNECT.
    pub buffered: BytesMut,
    /// Client id the broker assigned (empty id in CONNECT).
    pub assigned_client_id: Option<String>,
    /// A TLS connection's state (handshake done, CONNECT read through
    /// it): the home shard goes on with it.
    pub tls: Option<Box<rustls::ServerConnection>>,
    /// A WebSocket connection's framing state (upgrade done).
    pub ws: Option<Box<crate::ws::Framer>>,
    /// What its login token grants.
    pub grant: crate::auth::Grant,
}

/// Whom to acknowledge once a mesh message has taken effect: a session
/// whose output (a SUBACK, a PUBACK) waits until it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckTo {
    /// Shard of the waiting session.
    pub shard: usize,
    /// The session.
    pub session: SessionKey,
    /// The session's uid: a later session under the same key is not it.
    /// Not its connection: a connection that resumes the session waits
    /// for what the last one did (its SUBACK may have been lost with the
    /// old connection, yet a SUBSCRIBE repeating it is answered at once,
    /// the subscription being there already).
    pub uid: u64,
    /// For a move of the session to this node (`moves`), the move's
    /// number (0: not a move): the route it waits for is applied; its
    /// output does not wait for this one, and a later move of the same
    /// session does not count it.
    pub move_in: u64,
}

/// A connection a message was read from, on the shard that routed it:
/// its subscribers' queues may hold its reading (`shard::pressure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Publisher {
    /// Its session.
    pub key: SessionKey,
    /// The connection (a later one under the same key is not it).
    pub conn: std::num::NonZeroU64,
}

/// A route replica change: `key` gained or lost subscribers of `filter`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RouteKey {
    /// Shard `0` has ordinary subscribers of the filter.
    Shard(u16),
    /// Shard `0` has ordinary subscribers of the filter in persistent
    /// sessions (ones with a place in its log): a QoS 1/2 message going
    /// there is logged as Accepted before its publisher is answered, so a
    /// crash cannot lose it (`durable_accept`). Never leaves the node.
    Kept(u16),
    /// Shard has members of a shared subscription (`group`, `filter`).
    Shared {
        /// The shared subscription.
        pick: SharedPick,
        /// The shard with members.
        shard: u16,
    },
    /// Remote node `0` (its index on this node) has ordinary subscribers
    /// of the filter.
    Node(u16),
    /// A remote node has members of a shared subscription.
    NodeShared {
        /// The shared subscription.
        pick: SharedPick,
        /// The node's index.
        node: u16,
    },
}

impl RouteKey {
    /// A persistent-subscriber mark ([`RouteKey::Kept`]): this node's own,
    /// neither exported to other nodes nor waiting for them.
    pub fn is_node_local(&self) -> bool {
        matches!(self, RouteKey::Kept(_))
    }
}

/// One message on the mesh.
#[derive(Debug)]
pub enum MeshMsg {
    /// Deliver to this shard's ordinary subscribers (if `ordinary`) and to
    /// one member of each listed shared subscription.
    Publish {
        /// The message.
        message: Arc<Message>,
        /// Deliver to ordinary (non-shared) subscribers.
        ordinary: bool,
        /// Shared subscriptions this shard serves for this message.
        shared: SmallVec<[SharedPick; 1]>,
        /// Times a shared pick was forwarded because the chosen shard had
        /// lost its members meanwhile (bounded by the shard count).
        hops: u8,
        /// Where it was accepted, when that was logged (durable QoS 1/2):
        /// the receiver records it and answers [`MeshMsg::Applied`].
        origin: Option<Origin>,
        /// When it was routed (or passed on): the delivery latency
        /// histogram's start.
        routed_at: std::time::Instant,
        /// The sender's connection it was read from, if it was read from
        /// one.
        from: Option<Publisher>,
    },
    /// Store (or, with an empty payload, delete) a retained message: the
    /// receiver owns its topic.
    Retain {
        /// The message.
        message: Arc<Message>,
        /// Acknowledge once stored (a QoS 1/2 publisher's ack waits).
        ack_to: Option<AckTo>,
        /// Where it was accepted, when that was logged.
        origin: Option<Origin>,
        /// When it was accepted (Unix ms): orders retained messages after a
        /// recovery. From a peer: its stamp.
        stamp_ms: u64,
        /// Another node's version (the peer's index): kept only if newer
        /// than this shard's, and not sent back to that peer.
        from_peer: Option<u16>,
    },
    /// Another node claimed a client id whose home is the receiver
    /// (`cluster::claims`).
    PeerClaim(Box<super::claims::PeerClaim>),
    /// A peer acknowledged a claim of a client id whose home is the
    /// receiver.
    ClaimAck(crate::cluster::frame::ClaimEntry),
    /// Ask this shard's peers to answer behind what they sent (a session
    /// of shard `home` is about to move: `moves`).
    MoveFence {
        /// The fence.
        id: u64,
        /// The shard that waits for it.
        home: usize,
    },
    /// Every peer of the sender answered fence `id`.
    MoveFencePassed {
        /// The fence.
        id: u64,
    },
    /// A session frame from peer `from` for a client id whose home is
    /// the receiver (`moves`).
    SessionMove {
        /// The peer's index.
        from: u16,
        /// A SessionOffer, SessionTake or SessionMoved.
        frame: Box<crate::cluster::frame::Frame>,
    },
    /// Sessions of peer `peer`'s run `run`, declared down, that this
    /// node takes over (`adopt`), for their home shard.
    Adopt {
        /// The peer's index.
        peer: u16,
        /// Its name.
        node: Arc<str>,
        /// Its run.
        run: u64,
        /// The sessions.
        sessions: Vec<crate::persist::recover::AdoptedSession>,
        /// A session orphaned by that run's death (`orphans`): the claim
        /// of its move there.
        orphan: Option<u64>,
    },
    /// To shard 0: part of a session orphaned by a peer's death, sent
    /// here by a node it moved from (`orphans`).
    Orphaned(Box<crate::cluster::frame::Orphaned>),
    /// To shard 0: a message for the sessions taken over from a peer's
    /// run (name, incarnation) declared down (`adopt`).
    ForAdopted(Box<super::adopt::Pending>),
    /// To shard 0: this shard took in its sessions of a peer's run
    /// (`Adopt`), their routes sent ahead.
    AdoptDone {
        /// The run.
        of: (Arc<str>, u64),
    },
    /// From shard 0: this node, next after a peer's run declared down, is
    /// done with its sessions (taken in by every shard, or none taken):
    /// CONNECTs that resume a session are taken again, and the peers are
    /// told.
    Adopted {
        /// The run.
        of: (Arc<str>, u64),
    },
    /// From a shard whose link brought a peer's word that it is done with
    /// a run's sessions: CONNECTs that resume a session are taken again.
    AdoptionNoted {
        /// The run.
        of: (Arc<str>, u64),
    },
    /// From shard 0: a message for this shard's sessions taken over from
    /// a peer's run.
    AdoptedPublish {
        /// The run.
        of: (Arc<str>, u64),
        /// The message.
        message: Arc<Message>,
    },
    /// Send the next chunk of retained messages matching a subscription
    /// to `waiter`.
    RetainedQuery {
        /// Where to send them.
        waiter: RetainedWaiter,
        /// The walk over the filter's matches, where it stopped.
        walk: Box<MatchWalk>,
        /// Messages the subscriber's queue takes now (a chunk has at least
        /// one, at most `gather::RETAINED_CHUNK_MAX`).
        credit: usize,
    },
    /// A chunk of retained messages for a subscription, from one owner
    /// shard.
    RetainedReply {
        /// The subscription.
        waiter: RetainedWaiter,
        /// Matching retained messages.
        messages: Vec<Arc<Message>>,
        /// The credit the query gave (the subscriber's shard counts it as
        /// outstanding until now).
        credit: usize,
        /// The rest of the walk; `None` when this owner has no more.
        rest: Option<Box<MatchWalk>>,
    },
    /// Route replica delta (broadcast on 0↔1 transitions, and sent again
    /// for another subscriber to wait on: applying it again changes nothing).
    Route {
        /// The filter.
        filter: Arc<str>,
        /// Who has subscribers.
        key: RouteKey,
        /// Gained (true) or lost (false).
        add: bool,
        /// Acknowledge once applied (the subscriber's SUBACK waits).
        ack_to: Option<AckTo>,
    },
    /// A route delta or retained store asked for acknowledgement took effect.
    Ack(AckTo),
    /// A connection whose home is the receiving shard.
    Handoff(Box<Handoff>),
    /// The sender applied (and logged) every message the receiver accepted
    /// and sent it, up to this accept id.
    Applied {
        /// Accept id.
        upto: u64,
    },
    /// The sender's accepted messages up to this id were applied everywhere.
    Settled {
        /// Accept id.
        upto: u64,
    },
    /// Answer [`MeshMsg::FenceDone`] with this id: the sender (shard 0)
    /// then knows this shard applied everything it sent before, such as a
    /// remote node's routes.
    Fence {
        /// Chosen by the sender.
        id: u64,
    },
    /// The answer to a [`MeshMsg::Fence`].
    FenceDone {
        /// The fence's id.
        id: u64,
    },
    /// From shard 0: every shard here has the routes of run `run` of
    /// node `node` (its index), or shard 0 stopped waiting for them
    /// ([`ShardCore::routes_known`]).
    RoutesKnown {
        /// The node's index.
        node: u16,
        /// Its run (incarnation).
        run: u64,
    },
    /// Hold (or release) the reading of a connection of the receiver's:
    /// a session of the sender's that it publishes to fell behind (or
    /// caught up, or went).
    Hold {
        /// The connection.
        to: Publisher,
        /// Hold (true) or release.
        hold: bool,
    },
    /// The sender's log became full (or has room again).
    StoreFull {
        /// Full now.
        full: bool,
    },
}

impl MeshMsg {
    /// The acknowledgement this message is, or asks its receiver to send:
    /// one of the acknowledgements a session's output waits for
    /// ([`AckTo`]), on its way.
    pub fn awaited_ack(&self) -> Option<&AckTo> {
        match self {
            MeshMsg::Route { ack_to, .. } | MeshMsg::Retain { ack_to, .. } => ack_to.as_ref(),
            MeshMsg::Ack(ack) => Some(ack),
            _ => None,
        }
    }
}

/// Most messages a new batch makes room for at once (see `Mesh::send`): a
/// burst's batch length does not make every later batch that large.
const BATCH_ROOM_MAX: usize = 256;

/// One batch on a lane.
pub type Batch = Vec<MeshMsg>;

/// This shard's outbox: what it said to each other shard this loop turn.
pub struct Mesh {
    me: usize,
    outbox: RefCell<Vec<Batch>>,
    /// Per destination, the length of the last batch taken: the next one
    /// starts with that much room (at most [`BATCH_ROOM_MAX`]), instead of
    /// growing by doubling (each step a copy of every message so far)
    /// under load.
    last_len: RefCell<Vec<usize>>,
    /// Messages queued and not yet on a lane, for backpressure.
    pending: Cell<usize>,
    pending_max: usize,
    /// Wakes the flusher: a batch waits.
    wake: Notify,
    /// Batches and messages handed to the lanes since the start.
    batches: Cell<u64>,
    messages: Cell<u64>,
    /// Batches that waited for room on a full lane.
    stalls: Cell<u64>,
}

impl Mesh {
    /// The outbox of shard `me` of `shards`; past `pending_max` messages
    /// not yet on a lane it reports [`Mesh::congested`].
    pub fn new(me: usize, shards: usize, pending_max: usize) -> Mesh {
        Mesh {
            me,
            outbox: RefCell::new((0..shards).map(|_| Vec::new()).collect()),
            last_len: RefCell::new(vec![0; shards]),
            pending: Cell::new(0),
            pending_max,
            wake: Notify::default(),
            batches: Cell::new(0),
            messages: Cell::new(0),
            stalls: Cell::new(0),
        }
    }

    /// Queue `msg` for shard `to`; it leaves with this loop turn's batch.
    pub fn send(&self, to: usize, msg: MeshMsg) {
        debug_assert_ne!(to, self.me, "a shard never sends to itself");
        let mut outbox = self.outbox.borrow_mut();
        let batch = &mut outbox[to];
        if batch.capacity() == 0 {
            batch.reserve(self.last_len.borrow()[to].min(BATCH_ROOM_MAX));
        }
        batch.push(msg);
        self.pending.set(self.pending.get() + 1);
        self.wake.notify();
    }

    /// Queue `msg` for every other shard.
    pub fn broadcast(&self, msg: impl Fn() -> MeshMsg) {
        let shards = self.outbox.borrow().len();
        for to in (0..shards).filter(|&to| to != self.me) {
            self.send(to, msg());
        }
    }

    /// True while the outbox holds more than its limit.
    pub fn congested(&self) -> bool {
        self.pending.get() > self.pending_max
    }

    /// Take this turn's batches, one per destination with anything queued,
    /// in destination order. Their messages still count as pending until
    /// [`Mesh::sent`] says they are on their lane.
    pub fn poll_batches(&self) -> Vec<(usize, Batch)> {
        let mut outbox = self.outbox.borrow_mut();
        let mut last_len = self.last_len.borrow_mut();
        outbox
            .iter_mut()
            .enumerate()
            .filter(|(_, b)| !b.is_empty())
            .map(|(to, b)| {
                last_len[to] = b.len();
                (to, std::mem::take(b))
            })
            .collect()
    }

    /// Batches and messages put on the lanes since the start, and the
    /// batches that had to wait for room on their lane.
    pub fn counts(&self) -> (u64, u64, u64) {
        (self.batches.get(), self.messages.get(), self.stalls.get())
    }

    /// A batch found its lane full and waits for room.
    pub fn stalled(&self) {
        self.stalls.set(self.stalls.get() + 1);
    }

    /// Every message queued and not yet taken by [`Mesh::poll_batches`].
    pub fn for_each_queued(&self, mut f: impl FnMut(&MeshMsg)) {
        self.outbox.borrow().iter().flatten().for_each(&mut f);
    }

    /// A batch of `n` messages taken by [`Mesh::poll_batches`] is on its
    /// lane (or was dropped with a closed lane).
    pub fn sent(&self, n: usize) {
        self.pending.set(self.pending.get() - n);
        self.batches.set(self.batches.get() + 1);
        self.messages.set(self.messages.get() + n as u64);
    }

    /// Wait until something is queued (the runtime's flusher).
    pub async fn queued(&self) {
        self.wake.wait().await
    }
}
