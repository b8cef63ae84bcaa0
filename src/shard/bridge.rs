//! The shard's bridge without I/O: its links to the other nodes, what
//! goes on them and what their frames do to the core.
//!
//! Shard-local, no I/O and no clock. Shard `i` dials shard `i mod n` of
//! every live peer and sends it what its core routes there; it takes the
//! links other nodes' shards dial to it and hands the messages they bring
//! to its core. Shard 0's link to each peer also carries this node's
//! routes (a snapshot when it comes up, then every change: [`RouteFeed`]);
//! shard 0 takes each peer's routes from the link of the peer's shard 0
//! ([`RouteImport`]) and gives the changes to its core, which broadcasts
//! them to every shard's replica. Protocol and framing are
//! [`LinkSession`]'s; when to dial, the backoff and what waits for a link
//! are [`PeerLinks`]'; what goes on the links (messages, routes, wills,
//! retained messages, claims) is the core's. Peers come from shard 0's
//! membership as [`PeerEvent`]s.
//!
//! The runtime (`runtime::bridge`) and the cluster simulator
//! (`tests/cluster_sim.rs`) drive it alike: they make the dials it asks
//! for ([`Bridge::poll_dials`]) and report them ([`Bridge::dialed`],
//! [`Bridge::dial_failed`]), report links they accept
//! ([`Bridge::accepted`]), hand it the bytes they read
//! ([`Bridge::handle_bytes`]), write what [`Bridge::poll_transmit`] gives
//! (then [`Bridge::written`]), tick it, move the core's outbox onto the
//! links ([`Bridge::drain_outbox`]) and close the sockets it names
//! ([`Bridge::poll_closed`]). Every input carries the time.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::cluster::frame::{Frame, Hello, RefuseReason, RemotePublish};
use crate::cluster::link::{LinkError, LinkEvent, LinkSession, LinkSettings};
use crate::cluster::node::{same_addr, Node};
use crate::cluster::peers::PeerLinks;
use crate::cluster::routes::{RouteFeed, RouteImport};
use crate::hash::HashMap;
use crate::log::ship::ReplicaError;
use crate::shard::mesh::AckTo;
use crate::shard::notify::Notify;
use crate::shard::{BridgeOut, ClaimsSnapshot, RetainedSnapshot, RouteAckTo, ShardCore};
use crate::text::{quote, suppressed_note, LogGate};

/// A membership change, from shard 0 to every shard's bridge. Indices
/// are shard 0's, the same on every shard for the life of the process.
#[derive(Debug, Clone)]
pub enum PeerEvent {
    /// A node is up (or a newer run of it).
    Up {
        /// Its index.
        index: u16,
        /// The run.
        node: Node,
    },
    /// A node is down.
    Down {
        /// Its index.
        index: u16,
        /// The run that went down.
        node: Node,
    },
    /// New CONNECTs start (true) or stop being refused for want of a
    /// majority of the members (`cluster::quorum`).
    Quorum {
        /// Refuse them.
        refuse: bool,
    },
}

/// The longest a peer declared down may have been silent for this node to
/// take its sessions over: under [`super::durable::REPLICA_WAIT`], after
/// which a peer still running (cut off) acknowledges without this node's
/// copy of its log.
pub const ADOPT_SILENCE_MAX: Duration = Duration::from_secs(8);

/// A link's id, the bridge's name for one socket.
pub type LinkId = u64;

/// A dial the bridge wants made: peer `index`, run `node`, at `addr` (its
/// shard's bridge port).
#[derive(Debug, Clone)]
pub struct Dial {
    /// The peer's index.
    pub index: u16,
    /// Its bridge port for this shard.
    pub addr: SocketAddr,
    /// The run meant.
    pub node: Node,
}

/// Claims per part of a link's first claims.
const CLAIMS_PER_FRAME: usize = 1024;
/// Bytes a link may hold unwritten before the next part of a claims or
/// retained snapshot is put on it.
const SNAPSHOT_BACKLOG_BYTES: usize = 1 << 20;
/// Links a shard accepts at once (beyond: closed at once).
pub const INBOUND_LINKS_MAX: usize = 1024;
/// Snapshot parts, in bytes of filters (routes) or wills.
const SNAPSHOT_CHUNK_BYTES: usize = 64 << 10;

struct Link {
    id: LinkId,
    /// Outbound: the peer dialed. Inbound: the peer, once its Hello named a
    /// live member.
    peer: Cell<Option<u16>>,
    outbound: bool,
    session: RefCell<LinkSession>,
    /// Set when the link has bytes to write (or closed).
    wake: Rc<Notify>,
    closed: Cell<bool>,
    /// Close once what is queued is written (after a Refuse).
    closing: Cell<bool>,
    /// The peer's Hello, once the link is up.
    hello: RefCell<Option<Hello>>,
    /// Outbound: how far this shard's claims have been sent.
    claims: RefCell<Option<ClaimsSnapshot>>,
    /// Outbound: how far this shard's retained messages have been sent.
    retained: RefCell<Option<RetainedSnapshot>>,
    /// Outbound on shard 0: the routes this link still needs.
    feed: RefCell<RouteFeed>,
    /// Outbound on shard 0: the route sequence number the peer has
    /// acknowledged.
    acked: Cell<u64>,
    /// Inbound: the message number last confirmed to the peer
    /// ([`Frame::Delivered`]).
    confirmed: Cell<u64>,
    /// Inbound: a QoS 1/2 message came since the last confirmation (its
    /// publisher's acknowledgement may wait for it): confirm at the end
    /// of this read rather than after `CONFIRM_AFTER` or at the tick.
    urgent: Cell<bool>,
    /// Inbound, once welcomed: the last message number taken from the
    /// peer shard's run, shared with every link of that run
    /// ([`Bridge::received`]).
    received: std::cell::OnceCell<LastTaken>,
    /// Inbound, power-safe: confirmations waiting for this shard's log to
    /// be synced, in order: (the message number, the log sequence number
    /// that makes it durable).
    sync_waits: RefCell<VecDeque<(u64, u64)>>,
}

/// A bridge's links and messages, for a metrics scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BridgeStats {
    /// Links from this shard to peers, up or in their handshake.
    pub links_out: usize,
    /// Links from peers to this shard (their handshake done).
    pub links_in: usize,
    /// Links closed (broken, refused, or their peer's run ended).
    pub link_closes: u64,
    /// Messages for a peer dropped: the peer not up, past
    /// `cluster.link_queue_bytes_max`, or unconfirmed when the peer's run
    /// ended or it was declared down (their shared subscriptions' picks
    /// are served again).
    pub messages_dropped: u64,
    /// Messages written again on a new link because the peer had not
    /// confirmed them on the one that broke.
    pub messages_replayed: u64,
    /// Messages from peers skipped because they had come already (a
    /// replay of what a broken link had brought).
    pub duplicates_skipped: u64,
    /// Bytes of messages peers have not confirmed yet.
    pub unconfirmed_bytes: usize,
    /// Publishers' acknowledgements released after [`ACK_WAIT`] without
    /// the peer's confirmation (the message stays, to be sent).
    pub acks_unconfirmed: u64,
    /// Confirmations to peers that waited for this shard's log to be
    /// synced first (power-safe).
    pub confirms_after_sync: u64,
}

/// How long a node refuses new CONNECTs for want of the routes of a
/// node it sees up (its links may not come up: a peer that has not seen
/// this run yet refuses them); past it, it serves without them (logged).
pub const ROUTES_WAIT: Duration = Duration::from_secs(5);

/// How long a publisher's acknowledgement waits for a peer to confirm a
/// message before it goes without (counted, logged): a peer seen up whose
/// link does not come up must not stall the publisher's connection. Past
/// the failure detection's few seconds, so that a node that died is
/// declared down (and its shared picks served again) first.
pub const ACK_WAIT: Duration = Duration::from_secs(10);

/// How long the connections of a shard stop reading for a peer that
/// holds a quarter of `cluster.link_queue_bytes_max` of its messages or
/// more unconfirmed while no link to it is up ([`Bridge::note_fill`]; a
/// link that stops answering is closed 5 s after its last word): past it,
/// they read again, and what goes past the bound is dropped (counted,
/// logged). A peer whose link is up is waited for as long as it takes:
/// it is slow, and its confirmations come as it reads.
pub const LINK_FULL_WAIT: Duration = ACK_WAIT;

/// Confirmations an inbound link holds for a sync of the log at most
/// (power-safe); a later one replaces the last past it.
const SYNC_WAITS_MAX: usize = 64;

/// Messages from a peer an inbound link takes before it confirms them
/// within a read; fewer wait for the next tick (see [`Bridge::tick`]),
/// unless one is QoS 1/2 (its publisher's acknowledgement may wait): then
/// the read ends with a confirmation.
const CONFIRM_AFTER: u64 = 64;

/// Bytes of frames other than messages (sessions' moves, the protocol's
/// answers) one peer may leave unconfirmed: two moves' worth, each at
/// most [`super::moves::MOVE_BYTES_MAX`] and the frames around its
/// messages.
const OTHERS_BYTES_MAX: usize = super::moves::MOVE_BYTES_MAX * 2;

/// The last message number taken from one peer shard's run.
type LastTaken = Rc<Cell<u64>>;

/// A message sent to a peer that its publisher's acknowledgement waits
/// for, or that serves a shared subscription again.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    seq: u64,
    ack: Option<AckTo>,
    again: u8,
    sent: Instant,
}

/// One shard's bridge; see the module docs.
pub struct Bridge {
    core: Rc<ShardCore>,
    me: Hello,
    epoch: Instant,
    settings: LinkSettings,
    routes_max: usize,
    /// Dials, backoff, frames waiting: which outbound link is whose.
    peers: RefCell<PeerLinks>,
    /// Outbound links by id.
    outbound: RefCell<HashMap<LinkId, Rc<Link>>>,
    inbound: RefCell<Vec<Rc<Link>>>,
    /// Shard 0: each peer's routes, and the link that carries them.
    imports: RefCell<HashMap<u16, (RouteImport, LinkId)>>,
    next_id: Cell<LinkId>,
    log_gate: RefCell<LogGate>,
    /// Messages for a peer with no link up, or whose link was full.
    dropped: Cell<u64>,
    /// When each peer was last heard on a link of this shard that closed
    /// since (ms of the bridge's clock): a link up tells for itself.
    heard: RefCell<HashMap<u16, u64>>,
    /// Shard 0: the names of the nodes seen up in this run (for the
    /// majority a node must hear to take a dead peer's sessions over).
    known: RefCell<crate::hash::HashSet<String>>,
    /// Links closed here whose sockets the runtime still has to shut.
    closed: RefCell<Vec<LinkId>>,
    /// The messages taken from each peer shard's run: (peer, its shard) →
    /// (its incarnation, the last message number handed to the core). A
    /// message a broken link had brought already comes again when the
    /// link is replayed, and is skipped.
    received: RefCell<HashMap<(u16, u16), (u64, LastTaken)>>,
    link_closes: Cell<u64>,
    /// Move fences asked of the peers, by id. One older than the move's
    /// limit ([`super::moves::MOVE_GIVE_UP`]) is forgotten: its move was
    /// given up (an answer or the question was dropped past the link's
    /// bound).
    move_fences: RefCell<HashMap<u64, FenceAsked>>,
    /// Per peer, by message number, in order: the messages whose
    /// publisher's acknowledgement waits for it to confirm them, and those
    /// sent to it for a shared subscription served again
    /// ([`BridgeOut::Publish`]'s `ack` and `again`).
    waiting: RefCell<HashMap<u16, VecDeque<Waiting>>>,
    /// Power-safe: answers to peers' log chunks waiting for the sync of
    /// the copy (the sync's number, the link, the answer).
    copy_answers: RefCell<VecDeque<(u64, Rc<Link>, Frame)>>,
    acks_unconfirmed: Cell<u64>,
    confirms_after_sync: Cell<u64>,
    replayed: Cell<u64>,
    duplicates: Cell<u64>,
    /// Peers with no link up holding enough to keep the connections
    /// paused ([`Bridge::note_fill`]): since when, and whether the end of
    /// the wait was logged.
    full_unlinked: RefCell<HashMap<u16, (Instant, bool)>>,
}

/// A move fence this shard asked its peers to answer.
struct FenceAsked {
    /// The shard whose move waits for it.
    home: usize,
    /// The peers yet to answer.
    peers: Vec<u16>,
    at: Instant,
}

impl Bridge {
    /// The bridge of shard `core` (enabled for the cluster here), which
    /// says `me` to its peers; `refuse_connects` at start (no majority of
    /// the members seen yet), `routes_max` routes taken from one peer.
    pub fn new(
        core: Rc<ShardCore>,
        me: Hello,
        settings: LinkSettings,
        routes_max: usize,
        refuse_connects: bool,
        now: Instant,
        wall: crate::persist::WallClock,
    ) -> Bridge {
        core.enable_cluster(now, wall);
        core.set_refusing_connects(refuse_connects);
        // Past OTHERS_BYTES_MAX a move's parts are dropped (it is given up)
        // and answers are waited for in vain.
        let peers = PeerLinks::new(me.shard, settings.out_bytes_max, OTHERS_BYTES_MAX);
        let bridge = Bridge {
            core,
            epoch: now,
            routes_max,
            me,
            settings,
            peers: RefCell::new(peers),
            outbound: RefCell::new(HashMap::default()),
            inbound: RefCell::new(Vec::new()),
            imports: RefCell::new(HashMap::default()),
            next_id: Cell::new(0),
            log_gate: RefCell::new(LogGate::new(10, Duration::from_secs(10))),
            dropped: Cell::new(0),
            heard: RefCell::new(HashMap::default()),
            known: RefCell::new(Default::default()),
            closed: RefCell::new(Vec::new()),
            received: RefCell::new(HashMap::default()),
            link_closes: Cell::new(0),
            move_fences: RefCell::new(HashMap::default()),
            waiting: RefCell::new(HashMap::default()),
            copy_answers: RefCell::default(),
            acks_unconfirmed: Cell::new(0),
            confirms_after_sync: Cell::new(0),
            replayed: Cell::new(0),
            duplicates: Cell::new(0),
            full_unlinked: RefCell::new(HashMap::default()),
        };
        bridge.recompute_acks();
        bridge
    }

    /// Its links and message counters now.
    pub fn stats(&self) -> BridgeStats {
        let peers = self.peers.borrow();
        BridgeStats {
            links_out: peers.links().count(),
            links_in: self
                .inbound
                .borrow()
                .iter()
                .filter(|l| l.peer.get().is_some())
                .count(),
            link_closes: self.link_closes.get(),
            messages_dropped: self.dropped.get(),
            messages_replayed: self.replayed.get(),
            duplicates_skipped: self.duplicates.get(),
            unconfirmed_bytes: peers.unconfirmed_bytes(),
            acks_unconfirmed: self.acks_unconfirmed.get(),
            confirms_after_sync: self.confirms_after_sync.get(),
        }
    }

    /// This shard's Hello.
    pub fn me(&self) -> &Hello {
        &self.me
    }

    /// The core's outbox wake-up (see [`Bridge::drain_outbox`]).
    pub fn core(&self) -> &Rc<ShardCore> {
        &self.core
    }

    fn ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn warn(&self, now: Instant, line: std::fmt::Arguments<'_>) {
        if let Some(n) = self.log_gate.borrow_mut().allow(now) {
            log::warn!(
                "cluster: shard {}: {line}{}",
                self.me.shard,
                suppressed_note(n)
            );
        }
    }

    /// A membership change from shard 0.
    pub fn on_peer_event(&self, now: Instant, ev: PeerEvent) {
        log::debug!("cluster: shard {}: {ev:?}", self.me.shard);
        // What the core routed before the change goes to the runs it was
        // routed for (and, for a run that ended, back to the core).
        self.drain_outbox(now);
        match ev {
            PeerEvent::Up { index, node } => {
                self.core.peer_named(index, node.name.as_str());
                self.known
                    .borrow_mut()
                    .insert(node.name.as_str().to_string());
                let incarnation_up = node.incarnation;
                self.core.peer_routes_expected(index, incarnation_up, now);
                // A newer run recovers its own log, and one that rejoined
                // kept its sessions: nothing of either is taken over.
                (self.core).peer_run_is_up(node.name.as_str(), incarnation_up);
                let replaced = self.peers.borrow_mut().up(index, node, self.ms(now));
                if let Some(incarnation) = replaced.ended_run {
                    // Restarted before it was declared down: the old run
                    // ended all the same, its wills go out, and its routes
                    // go (the new run's snapshot brings its own).
                    self.core.peer_run_ended(now, index, incarnation);
                    self.forget_routes(index);
                    self.fence_answered(now, None, index);
                }
                // A run that rejoined after being declared down: its will
                // frames count again.
                self.core.peer_run_up(now, index, incarnation_up);
                self.undeliverable(now, index, replaced.dropped, None);
                if let Some(id) = replaced.close {
                    self.close_outbound(now, id, "a newer run of the node is up");
                }
                self.recompute_acks();
                self.choose_standbys(now);
            }
            PeerEvent::Down { index, node } => {
                let silent = self.silence_of(now, index);
                let Some((link, dropped)) = self.peers.borrow_mut().down(index, &node) else {
                    return;
                };
                // (This is that run: a newer one up, a restart, ended it
                // already, `up` above, and recovered its own log.)
                // The node that takes its sessions over (None: this one).
                let adopter = self.adopter_of(node.name.as_str());
                // The sessions that moved there and are not in its
                // standbys' copies yet go to it (before its moves end).
                self.core.orphan_moves(now, index, &node, adopter);
                self.core.peer_run_ended(now, index, node.incarnation);
                // Its answers to move fences will not come.
                self.fence_answered(now, None, index);
                // What it did not confirm goes to the sessions taken over
                // from it, wherever they are.
                self.undeliverable(now, index, dropped, Some((adopter, &node)));
                if let Some(id) = link {
                    self.close_outbound(now, id, "the node is down");
                }
                self.forget_routes(index);
                self.core.peer_routes_gone(index, node.incarnation);
                self.core.await_adoption(now, &node);
                if self.me.shard == 0 {
                    let next = adopter.is_none();
                    let why_not = match (self.hears_majority(now), silent) {
                        (false, _) => Some(
                            "it hears from no majority of the nodes it knows (it may be the \
                             one cut off)",
                        ),
                        (_, Some(s)) if s >= ADOPT_SILENCE_MAX => Some(
                            "that node was not heard from for longer than the wait for a \
                             standby (cut off, it may have acknowledged without this copy)",
                        ),
                        _ => None,
                    };
                    if let (true, Some(why)) = (next, why_not) {
                        log::warn!(
                            "cluster: node {} is down; this node, next after it, does not take \
                             its sessions over: {why}",
                            quote(node.name.as_str())
                        );
                    }
                    let mine = next && why_not.is_none();
                    self.core.adopt_if_mine(now, index, &node, (next, mine));
                }
                // Every link from that run: nothing it still sends counts.
                let from_it: Vec<Rc<Link>> = self
                    .inbound
                    .borrow()
                    .iter()
                    .filter(|l| l.peer.get() == Some(index))
                    .cloned()
                    .collect();
                for l in from_it {
                    self.close(now, &l, "the node is down");
                }
                self.recompute_acks();
                self.choose_standbys(now);
            }
            PeerEvent::Quorum { refuse } => self.core.set_refusing_connects(refuse),
        }
    }

    /// This node hears from more than half of the nodes it has seen up
    /// in this run (itself included, those declared down since too): its
    /// links to them heard something within one and a half ping intervals
    /// (a link with nothing else to say answers a ping every interval). A
    /// node cut off from the others by a partition, which declares its
    /// peers down one after the other, does not take over the first one's
    /// sessions.
    fn hears_majority(&self, now: Instant) -> bool {
        let ms = self.ms(now);
        let fresh = self.settings.ping_after_ms * 3 / 2;
        let peers = self.peers.borrow().indices();
        let heard = (peers.iter())
            .filter(|&&p| {
                (self.up_link_to(p)).is_some_and(|l| l.session.borrow().silent_ms(ms) < fresh)
            })
            .count();
        let known = self.known.borrow().len().max(peers.len() + 1);
        2 * (heard + 1) > known + 1
    }

    /// How long peer `index` has not been heard from on this shard's
    /// links (None: never heard).
    fn silence_of(&self, now: Instant, index: u16) -> Option<Duration> {
        let ms = self.ms(now);
        let live = (self.outbound.borrow().values())
            .chain(self.inbound.borrow().iter())
            .filter(|l| l.peer.get() == Some(index))
            .map(|l| ms.saturating_sub(l.session.borrow().silent_ms(ms)))
            .max();
        let last = live.max(self.heard.borrow().get(&index).copied())?;
        Some(Duration::from_millis(ms.saturating_sub(last)))
    }

    /// The node that takes over the sessions of `dead`, declared down:
    /// the first up after it in name order (its first standby, as
    /// [`Bridge::choose_standbys`] chooses on every node). None: this
    /// node; else the peer's index.
    fn adopter_of(&self, dead: &str) -> Option<u16> {
        let peers = self.peers.borrow();
        let mut up: Vec<(&str, Option<u16>)> = (peers.indices().into_iter())
            .filter_map(|i| peers.node(i).map(|n| (n.name.as_str(), Some(i))))
            .chain([(self.me.node.as_str(), None)])
            .collect();
        up.sort_unstable();
        let next = up.iter().find(|(n, _)| *n > dead).or(up.first());
        next.and_then(|(_, i)| *i)
    }

    /// The standbys of this shard's log: the `cluster.replicas - 1` peers
    /// up after this node in the order of their names (from the first
    /// again after the last), the same choice on every shard.
    fn choose_standbys(&self, now: Instant) {
        let want = self.core.config().cluster.replicas.saturating_sub(1);
        let peers = self.peers.borrow();
        let mut up: Vec<(&str, u16)> = (peers.indices().into_iter())
            .filter_map(|i| peers.node(i).map(|n| (n.name.as_str(), i)))
            .collect();
        up.sort_unstable();
        let me = self.me.node.as_str();
        let (after, before): (Vec<_>, Vec<_>) = up.into_iter().partition(|(n, _)| *n > me);
        let chosen: Vec<u16> = (after.into_iter().chain(before))
            .take(want)
            .map(|(_, i)| i)
            .collect();
        drop(peers);
        if chosen[..] != self.core.standbys()[..] {
            self.core.set_standbys(now, &chosen);
            self.ship_logs(now);
        }
    }

    /// Copy new records of this shard's log to the standbys whose links
    /// are up, while their windows and the links' output have room.
    fn ship_logs(&self, now: Instant) {
        let ms = self.ms(now);
        // A chunk fits the peer's largest frame (one larger record goes
        // alone: the frame bound takes a segment, the largest record).
        let max = super::durable_chunk_bytes(self.settings.frame_bytes_max);
        for node in self.core.standbys() {
            let Some(link) = self.up_link_to(node) else {
                continue;
            };
            let mut sent = false;
            while link.session.borrow().out_bytes() < self.settings.out_bytes_max / 2 {
                let Some(frame) = self.core.poll_log_chunk(node, max) else {
                    break;
                };
                link.session.borrow_mut().force_send(ms, &frame);
                sent = true;
            }
            if sent {
                link.wake.notify();
            }
        }
    }

    /// Stop waiting for the routes of a node seen up for [`ROUTES_WAIT`]
    /// without them (new CONNECTs are taken again); shard 0 says so.
    fn routes_wait_expired(&self, now: Instant) {
        let late = self.core.routes_wait_tick(now, ROUTES_WAIT);
        if self.me.shard != 0 {
            return;
        }
        for (index, _) in late {
            let name = self.peer_name(Some(index));
            self.warn(
                now,
                format_args!(
                    "no routes from node {} within {} s of seeing it up; taking new CONNECTs \
                     without them (a publish here misses its subscribers until they come)",
                    quote(&name),
                    ROUTES_WAIT.as_secs()
                ),
            );
        }
    }

    /// Shard 0: the routes of peer `index`'s run that ended go from every
    /// shard's replica.
    fn forget_routes(&self, index: u16) {
        let import = self.imports.borrow_mut().remove(&index);
        if let Some((mut import, _)) = import {
            let removals = import.clear();
            self.core.remote_routes(index, &removals, None);
        }
    }

    /// Peer `index`'s name for a log line ("?" when unknown).
    fn peer_name(&self, index: Option<u16>) -> String {
        index
            .and_then(|i| self.peers.borrow().node(i).map(|n| n.name.to_string()))
            .unwrap_or_else(|| "?".into())
    }

    fn close_outbound(&self, now: Instant, id: LinkId, why: &str) {
        let link = self.outbound.borrow().get(&id).cloned();
        if let Some(l) = link {
            self.close(now, &l, why);
        }
    }

    /// Messages that waited for a peer's link and will not be sent.
    fn count_dropped(&self, now: Instant, n: usize) {
        if n > 0 {
            self.dropped.set(self.dropped.get() + n as u64);
            self.warn(
                now,
                format_args!(
                    "{n} messages that waited for a node's link were dropped: that run of the \
                     node ended or is down (shared subscriptions' picks are served again; {} \
                     so far)",
                    self.dropped.get()
                ),
            );
        }
    }

    /// Tell the core how many peers have a link up from this shard (a
    /// CONNACK waits for their acknowledgements of its claim), and on
    /// shard 0 how far every such peer has acknowledged this node's routes
    /// (subscribers' SUBACKs wait for it). A peer without a link up is not
    /// waited for: its link starts from a snapshot that has the route and
    /// the claim. A session moving here waits for every peer up, linked
    /// or not: until one has the route, it may route the session's
    /// messages to the node the session leaves only.
    fn recompute_acks(&self) {
        let members = self.peers.borrow().count();
        let up = self.up_links();
        self.core.set_peer_links_up(up.len(), members);
        if self.me.shard != 0 {
            return;
        }
        let upto = (up.iter().map(|l| l.acked.get()).min()).unwrap_or(u64::MAX);
        let all_linked = (self.peers.borrow().indices().iter())
            .all(|&i| up.iter().any(|l| l.peer.get() == Some(i)));
        let by_members = if all_linked { upto } else { 0 };
        self.core.routes_acked(upto, by_members);
    }

    /// The dials due now (peers without a link, past their backoff).
    pub fn poll_dials(&self, now: Instant) -> Vec<Dial> {
        let due = self.peers.borrow_mut().due(self.ms(now));
        due.into_iter()
            .map(|(index, addr, node)| Dial { index, addr, node })
            .collect()
    }

    /// A dial of [`Bridge::poll_dials`] connected: its link, or None when
    /// the peer went away meanwhile (close the socket).
    pub fn dialed(&self, now: Instant, dial: &Dial) -> Option<(LinkId, Rc<Notify>)> {
        let id = self.next_id.get() + 1;
        if !self.peers.borrow_mut().dialed(dial.index, &dial.node, id) {
            log::debug!(
                "cluster: shard {}: node {} went away while dialing",
                self.me.shard,
                quote(dial.node.name.as_str())
            );
            return None;
        }
        self.next_id.set(id);
        let session = LinkSession::dialed(
            self.me.clone(),
            (
                dial.node.name.clone(),
                dial.node.incarnation,
                dial.node.addr,
            ),
            self.settings.clone(),
            (self.epoch, self.ms(now)),
            id,
        );
        let link = self.new_link(id, Some(dial.index), session);
        self.outbound.borrow_mut().insert(id, link.clone());
        // The Hello is queued already.
        link.wake.notify();
        Some((id, link.wake.clone()))
    }

    /// A dial of [`Bridge::poll_dials`] failed (`why`, for the log).
    pub fn dial_failed(&self, now: Instant, dial: &Dial, why: &str) {
        log::debug!(
            "cluster: shard {}: cannot reach node {} at {}: {why}",
            self.me.shard,
            quote(dial.node.name.as_str()),
            dial.addr
        );
        self.peers
            .borrow_mut()
            .dial_failed(dial.index, self.ms(now));
    }

    /// A peer's shard dialed this one: its link, or None past
    /// [`INBOUND_LINKS_MAX`] (close the socket).
    pub fn accepted(&self, now: Instant) -> Option<(LinkId, Rc<Notify>)> {
        if self.inbound.borrow().len() >= INBOUND_LINKS_MAX {
            self.warn(
                now,
                format_args!("more than {INBOUND_LINKS_MAX} bridge links; a new one was closed"),
            );
            return None;
        }
        let id = self.next_id.get() + 1;
        self.next_id.set(id);
        let session = LinkSession::accepted(
            self.me.clone(),
            self.settings.clone(),
            (self.epoch, self.ms(now)),
            id,
        );
        let link = self.new_link(id, None, session);
        self.inbound.borrow_mut().push(link.clone());
        Some((id, link.wake.clone()))
    }

    fn new_link(&self, id: LinkId, peer: Option<u16>, session: LinkSession) -> Rc<Link> {
        Rc::new(Link {
            id,
            peer: Cell::new(peer),
            outbound: peer.is_some(),
            session: RefCell::new(session),
            wake: Rc::default(),
            closed: Cell::new(false),
            closing: Cell::new(false),
            hello: RefCell::new(None),
            claims: RefCell::new(None),
            retained: RefCell::new(None),
            feed: RefCell::new(RouteFeed::new()),
            acked: Cell::new(0),
            confirmed: Cell::new(0),
            urgent: Cell::new(false),
            received: std::cell::OnceCell::new(),
            sync_waits: RefCell::new(VecDeque::new()),
        })
    }

    fn link(&self, id: LinkId) -> Option<Rc<Link>> {
        if let Some(l) = self.outbound.borrow().get(&id) {
            return Some(l.clone());
        }
        self.inbound.borrow().iter().find(|l| l.id == id).cloned()
    }

    /// Whether link `id` is closed (or unknown): its socket is done.
    pub fn is_closed(&self, id: LinkId) -> bool {
        self.link(id).is_none_or(|l| l.closed.get())
    }

    /// Bytes read from link `id`'s socket.
    pub fn handle_bytes(&self, now: Instant, id: LinkId, data: &[u8]) {
        let Some(link) = self.link(id) else {
            return;
        };
        // A link refused here reads nothing more while its Refuse goes out
        // (and its keep-alive ends it if the peer never reads that).
        if link.closed.get() || link.closing.get() {
            return;
        }
        let read = link.session.borrow_mut().handle_bytes(self.ms(now), data);
        // Events before the error (a Hello, then garbage) still count.
        self.process(now, &link);
        if let Err(e) = read {
            // A peer that does not know this node yet refuses it: the
            // usual race at a join, retried after a backoff.
            let expected = matches!(
                e,
                LinkError::Refused {
                    reason: RefuseReason::NotMember,
                    ..
                }
            );
            if !expected {
                self.warn(now, format_args!("bridge link error: {e}"));
            }
            if let LinkError::Handshake(_) = e {
                // Its Refuse is queued: closed once written (`written`),
                // so the peer's log says why.
                link.closing.set(true);
                link.wake.notify();
            } else {
                self.close(now, &link, &e.to_string());
            }
        }
    }

    /// Link `id`'s socket ended or failed (`why`, for the log).
    pub fn io_closed(&self, now: Instant, id: LinkId, why: &str) {
        if let Some(link) = self.link(id) {
            self.close(now, &link, why);
        }
    }

    /// The next bytes to write on link `id`.
    pub fn poll_transmit(&self, id: LinkId) -> Option<BytesMut> {
        let link = self.link(id)?;
        if link.closed.get() {
            return None;
        }
        let out = link.session.borrow_mut().poll_transmit();
        out
    }

    /// Everything [`Bridge::poll_transmit`] gave for link `id` is
    /// written: a refused link closes, and one that came up gets the next
    /// parts of its snapshots.
    pub fn written(&self, now: Instant, id: LinkId) {
        let Some(link) = self.link(id) else {
            return;
        };
        if link.closing.get() {
            self.close(now, &link, "refused");
            return;
        }
        if link.claims.borrow().is_some() || link.retained.borrow().is_some() {
            self.feed_snapshots(now, &link);
        }
    }

    /// The next link closed here whose socket is to be shut.
    pub fn poll_closed(&self) -> Option<LinkId> {
        self.closed.borrow_mut().pop()
    }

    /// The peers this shard has a link up to, as (index, incarnation): a
    /// new connection's claim, and its will before it, go to those.
    pub fn linked_runs(&self) -> Vec<(u16, u64)> {
        self.up_links()
            .iter()
            .filter_map(|l| Some((l.peer.get()?, l.hello.borrow().as_ref()?.incarnation)))
            .collect()
    }

    /// The outbound links whose handshake is done.
    fn up_links(&self) -> Vec<Rc<Link>> {
        let mut links: Vec<Rc<Link>> = self
            .outbound
            .borrow()
            .values()
            .filter(|l| !l.closed.get() && l.session.borrow().is_up())
            .cloned()
            .collect();
        // In id order, so a simulated run replays.
        links.sort_unstable_by_key(|l| l.id);
        links
    }

    /// Put a change of this shard's (a will, a retained message, a claim)
    /// on every outbound link up but the one to peer `except`. Like
    /// routes, never dropped: a link that falls this far behind is closed
    /// and starts over from a snapshot. Returns how many links it went on.
    fn to_every_link(&self, now: Instant, frame: &Frame, what: &str, except: Option<u16>) -> usize {
        let mut links = self.up_links();
        links.retain(|l| except.is_none() || l.peer.get() != except);
        for l in &links {
            self.force_on(now, l, frame, what);
        }
        links.len()
    }

    /// Put `frame` (a change of `what`) on link `l` past its output bound;
    /// a link that holds more unwritten than the messages and other frames
    /// kept for its peer can account for (twice the bound, twice a move's
    /// bound) and twice the bound again is closed (its peer resyncs).
    fn force_on(&self, now: Instant, l: &Rc<Link>, frame: &Frame, what: &str) {
        l.session.borrow_mut().force_send(self.ms(now), frame);
        l.wake.notify();
        let max = self.settings.out_bytes_max;
        let limit = max.saturating_mul(4).saturating_add(OTHERS_BYTES_MAX);
        if l.session.borrow().out_bytes() > limit {
            self.close(now, l, &format!("{what} changes not read"));
        }
    }

    /// The outbound link to peer `node`, once its handshake is done.
    fn up_link_to(&self, node: u16) -> Option<Rc<Link>> {
        let id = self.peers.borrow().up_link(node)?;
        let link = self.outbound.borrow().get(&id).cloned();
        link.filter(|l| l.session.borrow().is_up())
    }

    /// Put the next parts of this shard's claims, then of its retained
    /// messages, on an outbound link that came up, while it holds little
    /// unwritten.
    fn feed_snapshots(&self, now: Instant, link: &Rc<Link>) {
        while !link.closed.get() && link.session.borrow().out_bytes() < SNAPSHOT_BACKLOG_BYTES {
            let Some(part) = self.next_snapshot_part(now, link) else {
                return;
            };
            if let Some(f) = part {
                link.session.borrow_mut().force_send(self.ms(now), &f);
                link.wake.notify();
            }
        }
    }

    /// The next part of what a link that came up still needs (it may be
    /// empty); None when nothing is left.
    fn next_snapshot_part(&self, now: Instant, link: &Link) -> Option<Option<Frame>> {
        let mut claims = link.claims.borrow_mut();
        if let Some(progress) = claims.as_mut() {
            let part = self.core.claims_snapshot(progress, CLAIMS_PER_FRAME);
            if progress.is_done() {
                *claims = None;
            }
            return Some(part);
        }
        let mut retained = link.retained.borrow_mut();
        let progress = retained.as_mut()?;
        let part = self
            .core
            .retained_snapshot(progress, SNAPSHOT_CHUNK_BYTES, now);
        if progress.is_done() {
            *retained = None;
        }
        Some(part)
    }

    /// Keep-alives, confirmations of what the peers' messages reached,
    /// dead links and the snapshots under way (every 50 ms or so).
    pub fn tick(&self, now: Instant) {
        let ms = self.ms(now);
        self.core.replication_tick(now);
        self.ship_logs(now);
        self.routes_wait_expired(now);
        self.ack_wait_expired(now);
        self.note_fill(now);
        self.confirm_synced(now);
        self.move_fences.borrow_mut().retain(|_, asked| {
            now.saturating_duration_since(asked.at) < super::moves::MOVE_GIVE_UP
        });
        let mut links: Vec<Rc<Link>> = self.inbound.borrow().clone();
        links.extend(self.up_or_dialed());
        for link in links {
            if link.claims.borrow().is_some() || link.retained.borrow().is_some() {
                self.feed_snapshots(now, &link);
            }
            self.confirm(now, &link, 1);
            if link.session.borrow().out_bytes() > 0 {
                link.wake.notify();
            }
            let tick = link.session.borrow_mut().handle_tick(ms);
            match tick {
                Err(e) => self.close(now, &link, &e.to_string()),
                Ok(true) => {
                    let ping = if link.outbound && self.me.shard == 0 {
                        self.core.route_ping()
                    } else {
                        Frame::Ping { seq: 0, digest: 0 }
                    };
                    let _ = link.session.borrow_mut().send(ms, &ping);
                    link.wake.notify();
                }
                Ok(false) => {}
            }
        }
    }

    /// Every outbound link, in id order.
    fn up_or_dialed(&self) -> Vec<Rc<Link>> {
        let mut links: Vec<Rc<Link>> = self.outbound.borrow().values().cloned().collect();
        links.sort_unstable_by_key(|l| l.id);
        links
    }

    /// Number `frame` (`bytes` long) in this shard's stream to peer
    /// `node`, keep it until confirmed, and write it now if a link is up
    /// (else it goes first on the next): its number. Past the bound of
    /// what a peer may leave unconfirmed, or for a peer not up, it is
    /// dropped, counted and logged (`what`): the frame back.
    fn send_numbered(
        &self,
        now: Instant,
        node: u16,
        frame: Frame,
        bytes: usize,
        what: &str,
    ) -> Result<u64, Frame> {
        let link = self.up_link_to(node);
        let mut peers = self.peers.borrow_mut();
        match peers.number(node, frame, bytes) {
            Ok(frame) => {
                if let Some(l) = link {
                    l.session.borrow_mut().force_send(self.ms(now), frame);
                    l.wake.notify();
                }
                Ok(frame.stream_seq().unwrap_or_default())
            }
            Err(frame) => {
                drop(peers);
                self.dropped.set(self.dropped.get() + 1);
                self.warn(
                    now,
                    format_args!(
                        "{what} for node {node} was dropped: the node is not up, or it left \
                         too much unconfirmed (messages: cluster.link_queue_bytes_max, twice \
                         it with a link up; moves and answers: {} MiB) ({} so far)",
                        OTHERS_BYTES_MAX >> 20,
                        self.dropped.get()
                    ),
                );
                Err(frame)
            }
        }
    }

    /// Peer `index` confirmed its messages up to `upto`: the publishers'
    /// acknowledgements that waited for them go.
    fn release_waiting(&self, index: u16, upto: u64) {
        let mut released = Vec::new();
        if let Some(w) = self.waiting.borrow_mut().get_mut(&index) {
            while w.front().is_some_and(|m| m.seq <= upto) {
                released.extend(w.pop_front().and_then(|m| m.ack));
            }
        }
        if !released.is_empty() {
            self.core.remote_confirmed(released);
        }
    }

    /// Release the publishers' acknowledgements that waited [`ACK_WAIT`]
    /// for a peer's confirmation; the messages stay, to be sent.
    fn ack_wait_expired(&self, now: Instant) {
        let mut released = Vec::new();
        for w in self.waiting.borrow_mut().values_mut() {
            let before = released.len();
            for m in w.iter_mut() {
                if now.saturating_duration_since(m.sent) < ACK_WAIT {
                    break;
                }
                released.extend(m.ack.take());
            }
            // What is left of an entry without its acknowledgement is
            // only worth keeping for a pick served again.
            if released.len() > before {
                w.retain(|m| m.ack.is_some() || m.again > 0);
            }
        }
        if released.is_empty() {
            return;
        }
        let n = released.len() as u64;
        self.acks_unconfirmed.set(self.acks_unconfirmed.get() + n);
        self.warn(
            now,
            format_args!(
                "{n} publishers' acknowledgements went without a peer's confirmation after {} s \
                 (its link is not up, or that far behind; {} so far)",
                ACK_WAIT.as_secs(),
                self.acks_unconfirmed.get()
            ),
        );
        self.core.remote_confirmed(released);
    }

    /// Frames for peer `index` that will never be sent to it (its run
    /// ended, or it is down), in order: counted, and each message goes
    /// back to the core with the publisher's acknowledgement that waited
    /// for it ([`ShardCore::remote_undeliverable`]).
    /// With `adopter` (the peer declared down: the node that takes its
    /// sessions over, None for this one, and the peer's run), a message
    /// goes there with the publisher's acknowledgement: for the sessions
    /// taken over from it, and its shared subscriptions to be served once
    /// those are taken in (a member of them may be among them).
    fn undeliverable(
        &self,
        now: Instant,
        index: u16,
        frames: Vec<Frame>,
        adopter: Option<(Option<u16>, &Node)>,
    ) {
        self.count_dropped(now, frames.len());
        let mut waiting = self.waiting.borrow_mut().remove(&index).unwrap_or_default();
        for f in frames {
            let Frame::Publish(mut publish) = f else {
                continue;
            };
            let (mut ack, again) = match waiting.front() {
                Some(m) if m.seq == publish.seq => {
                    let m = *m;
                    waiting.pop_front();
                    (m.ack, m.again)
                }
                _ => (None, 0),
            };
            if let Some((to, node)) = adopter.filter(|_| publish.adopted_of.is_none()) {
                // Its shared subscriptions are served by other members if
                // any; those left, and its ordinary subscribers, by the
                // sessions taken over.
                let ordinary = std::mem::replace(&mut publish.ordinary, false);
                let message = publish.message.clone();
                let unserved = self
                    .core
                    .remote_undeliverable(now, index, publish, None, again);
                self.to_adopter(now, to, node, message, (ordinary, unserved), ack.take());
                continue;
            }
            self.core
                .remote_undeliverable(now, index, publish, ack, again);
        }
        // Each waits with its frame; none should be left.
        let rest: Vec<AckTo> = waiting.into_iter().filter_map(|m| m.ack).collect();
        if !rest.is_empty() {
            self.core.remote_confirmed(rest);
        }
    }

    /// `message` was for `node` (for its ordinary subscribers, and the
    /// shared subscriptions it was to serve: `(ordinary, shared)`),
    /// declared down before it confirmed it: it goes to node `to` (None:
    /// this one), which takes its sessions over (`adopt`), the publisher's
    /// acknowledgement `ack` waiting for that node's confirmation.
    fn to_adopter(
        &self,
        now: Instant,
        to: Option<u16>,
        node: &Node,
        message: std::sync::Arc<crate::message::Message>,
        (ordinary, shared): (bool, Vec<crate::router::SharedPick>),
        ack: Option<AckTo>,
    ) {
        if !ordinary && shared.is_empty() {
            self.core
                .remote_confirmed(ack.into_iter().collect::<Vec<_>>());
            return;
        }
        let run = (node.name.as_str(), node.incarnation);
        let Some(peer) = to else {
            self.core.for_adopted(now, run, message, ordinary, shared);
            if let Some(a) = ack {
                self.core.remote_confirmed(vec![a]);
            }
            return;
        };
        let bytes = super::remote::link_bytes(&message);
        let publish = RemotePublish {
            seq: 0,
            message,
            ordinary,
            shared,
            passed_on: false,
            adopted_of: Some((node.name.clone(), node.incarnation)),
            late: false,
        };
        let what = "a message for the sessions taken over from a node";
        match self.send_numbered(now, peer, Frame::Publish(publish), bytes, what) {
            Ok(seq) if ack.is_some() => {
                let m = Waiting {
                    seq,
                    ack,
                    again: 0,
                    sent: now,
                };
                self.waiting
                    .borrow_mut()
                    .entry(peer)
                    .or_default()
                    .push_back(m);
            }
            Ok(_) => {}
            Err(_) => self
                .core
                .remote_confirmed(ack.into_iter().collect::<Vec<_>>()),
        }
    }

    /// Peer `index` answered move fence `id` (None: every fence, its
    /// run ended): tell the core of each fence all peers answered.
    fn fence_answered(&self, now: Instant, id: Option<u64>, index: u16) {
        let mut passed = Vec::new();
        self.move_fences.borrow_mut().retain(|&f, asked| {
            if id.is_none_or(|id| id == f) {
                asked.peers.retain(|&p| p != index);
            }
            if asked.peers.is_empty() {
                passed.push((f, asked.home));
                return false;
            }
            true
        });
        passed.sort_unstable();
        for (f, home) in passed {
            self.core.move_fence_passed(now, f, home);
        }
    }

    fn close(&self, now: Instant, link: &Rc<Link>, why: &str) {
        if link.closed.replace(true) {
            return;
        }

        self.link_closes.set(self.link_closes.get() + 1);
        self.closed.borrow_mut().push(link.id);
        link.wake.notify();
        self.inbound.borrow_mut().retain(|l| l.id != link.id);
        let peer = link.peer.get();
        if let Some(index) = peer {
            let ms = self.ms(now);
            let at = ms.saturating_sub(link.session.borrow().silent_ms(ms));
            let mut heard = self.heard.borrow_mut();
            let last = heard.entry(index).or_insert(at);
            *last = (*last).max(at);
        }
        if link.outbound {
            self.outbound.borrow_mut().remove(&link.id);
            if let Some(index) = peer {
                // Dial again after the backoff (started over if the link
                // had been up a while).
                self.peers
                    .borrow_mut()
                    .link_closed(index, link.id, self.ms(now));
                self.core.log_link_down(index);
            }
            self.recompute_acks();
        }
        let name = self.peer_name(peer);
        let dir = if link.outbound { "to" } else { "from" };
        log::debug!(
            "cluster: shard {}: link {dir} node {} closed: {why}",
            self.me.shard,
            quote(&name)
        );
    }

    /// Act on what a link's session reported.
    fn process(&self, now: Instant, link: &Rc<Link>) {
        loop {
            let ev = link.session.borrow_mut().poll_event();
            let Some(ev) = ev else {
                break;
            };
            match ev {
                LinkEvent::Up(h) => self.link_up(now, link, h),
                LinkEvent::Frame(f) => self.frame(now, link, f),
            }
            if link.closed.get() {
                return;
            }
        }
        let after = if link.urgent.get() { 1 } else { CONFIRM_AFTER };
        self.confirm(now, link, after);
        link.wake.notify();
    }

    /// An inbound link's messages were handed on: tell the peer how far,
    /// once `after` messages wait for it (a busy link confirms in few
    /// frames; the tick confirms the rest, so a quiet link does not
    /// answer every message with a frame of its own).
    fn confirm(&self, now: Instant, link: &Link, after: u64) {
        if link.outbound {
            return;
        }
        let Some(seq) = link.received.get().map(|last| last.get()) else {
            return;
        };
        if seq < link.confirmed.get() + after.max(1) {
            return;
        }
        link.urgent.set(false);
        if let Some(need) = self.core.log_unsynced_upto() {
            // Power-safe: confirmed once this shard's log holds them for
            // good (the log's sync wakes the bridge, `confirm_synced`).
            let mut waits = link.sync_waits.borrow_mut();
            if waits.back().is_some_and(|&(s, _)| s >= seq) {
                return;
            }
            if waits.len() >= SYNC_WAITS_MAX {
                waits.pop_back();
            }
            waits.push_back((seq, need));
            return;
        }
        self.send_confirmation(now, link, seq);
    }

    /// Confirm messages up to `seq` on inbound `link`, unless they were;
    /// true when it did.
    fn send_confirmation(&self, now: Instant, link: &Link, seq: u64) -> bool {
        if seq <= link.confirmed.get() {
            return false;
        }
        link.confirmed.set(seq);
        link.session
            .borrow_mut()
            .force_send(self.ms(now), &Frame::Delivered { seq });
        link.wake.notify();
        true
    }

    /// Power-safe: confirm what this shard's log now holds for good.
    fn confirm_synced(&self, now: Instant) {
        let done = self.core.copy_syncs_done();
        loop {
            let mut answers = self.copy_answers.borrow_mut();
            if answers.front().is_none_or(|(sync, _, _)| *sync > done) {
                break;
            }
            let (_, link, answer) = answers.pop_front().expect("checked");
            drop(answers);
            if !link.closed.get() {
                link.session.borrow_mut().force_send(self.ms(now), &answer);
                link.wake.notify();
            }
        }
        let links: Vec<Rc<Link>> = (self.inbound.borrow().iter())
            .filter(|l| !l.sync_waits.borrow().is_empty())
            .cloned()
            .collect();
        if links.is_empty() {
            return;
        }
        let synced = self.core.log_synced_next();
        for link in links {
            let mut upto = None;
            {
                let mut waits = link.sync_waits.borrow_mut();
                while waits.front().is_some_and(|&(_, need)| need <= synced) {
                    upto = waits.pop_front().map(|(seq, _)| seq);
                }
            }
            if upto.is_some_and(|seq| self.send_confirmation(now, &link, seq)) {
                let n = self.confirms_after_sync.get();
                self.confirms_after_sync.set(n + 1);
            }
        }
    }

    fn link_up(&self, now: Instant, link: &Rc<Link>, h: Hello) {
        let ms = self.ms(now);
        if link.outbound {
            let Some(index) = link.peer.get() else {
                return;
            };
            *link.hello.borrow_mut() = Some(h.clone());
            // The wills of this shard's clients, whole, before any change.
            let wills = self.core.will_snapshot(SNAPSHOT_CHUNK_BYTES, now);
            let mut s = link.session.borrow_mut();
            for f in &wills {
                s.force_send(ms, f);
            }
            drop(s);
            // Its live connections' claims (so connections a partition
            // let live on both sides meet) and its retained messages, a
            // part at a time as the link drains (`feed_snapshots`).
            *link.claims.borrow_mut() = Some(ClaimsSnapshot::default());
            *link.retained.borrow_mut() = Some(RetainedSnapshot::default());
            self.feed_snapshots(now, link);
            if self.me.shard == 0 {
                let frames = self
                    .core
                    .start_route_feed(&mut link.feed.borrow_mut(), SNAPSHOT_CHUNK_BYTES);
                let mut s = link.session.borrow_mut();
                for f in &frames {
                    // Past the output bound too: routes are never dropped.
                    s.force_send(ms, f);
                }
                drop(s);
            }
            self.recompute_acks();
            // What the run has not confirmed, in order, before any new
            // message (it skips those it had).
            self.peers.borrow_mut().link_up(index, link.id, ms);
            // The log's copy goes on from where it ended.
            self.ship_logs(now);
            let unconfirmed = self.peers.borrow().unconfirmed(index);
            self.replayed
                .set(self.replayed.get() + unconfirmed.len() as u64);
            let mut s = link.session.borrow_mut();
            for f in &unconfirmed {
                s.force_send(ms, f);
            }
            drop(s);
            log::info!(
                "cluster: shard {}: link to node {} (its shard {}) is up",
                self.me.shard,
                quote(h.node.as_str()),
                h.shard
            );
            return;
        }
        let peers = self.peers.borrow();
        let index = peers
            .index_of(h.node.as_str(), h.incarnation)
            // The node membership knows by that id, not another given it.
            .filter(|&i| peers.node(i).is_some_and(|n| same_addr(n.addr, h.addr)))
            // Its shard count as its membership says: a peer cannot make
            // room for more tables (of wills) than it has shards.
            .filter(|&i| peers.node(i).is_some_and(|n| n.shards == h.shards))
            // Shard i of a peer dials this node's shard i mod its shards.
            .filter(|_| h.shard % self.me.shards.max(1) == self.me.shard);
        drop(peers);
        let Some(index) = index else {
            link.session.borrow_mut().refuse(
                ms,
                RefuseReason::NotMember,
                "not a live member here (yet)",
            );
            // Closed once the Refuse is written (`written`).
            link.closing.set(true);
            link.wake.notify();
            return;
        };
        link.peer.set(Some(index));
        // What this run of that shard sent on earlier links counts here.
        let mut received = self.received.borrow_mut();
        let last = received
            .entry((index, h.shard))
            .or_insert_with(|| (h.incarnation, Rc::default()));
        if last.0 != h.incarnation {
            *last = (h.incarnation, Rc::default());
        }
        let _ = link.received.set(last.1.clone());
        drop(received);
        *link.hello.borrow_mut() = Some(h.clone());
        link.session.borrow_mut().welcome(ms);
        if self.me.shard == 0 && h.shard == 0 {
            let mut imports = self.imports.borrow_mut();
            let entry = imports
                .entry(index)
                .or_insert_with(|| (RouteImport::new(self.routes_max), link.id));
            let older = std::mem::replace(&mut entry.1, link.id);
            drop(imports);
            if older != link.id {
                let old = self
                    .inbound
                    .borrow()
                    .iter()
                    .find(|l| l.id == older)
                    .cloned();
                if let Some(old) = old {
                    self.close(now, &old, "replaced by a newer link");
                }
            }
        }
    }

    fn frame(&self, now: Instant, link: &Rc<Link>, f: Frame) {
        if link.closing.get() {
            return;
        }
        // Messages, claim answers and what moves a session are numbered
        // in the peer's stream: one had already (a link replayed it) is
        // skipped, whatever its kind.
        if let (Frame::Publish(p), false) = (&f, link.outbound) {
            if p.message.qos != crate::codec::QoS::AtMostOnce {
                link.urgent.set(true);
            }
        }
        if let (Some(seq), false) = (f.stream_seq(), link.outbound) {
            let Some(last) = link.received.get() else {
                return;
            };
            if seq <= last.get() {
                self.duplicates.set(self.duplicates.get() + 1);
                return;
            }
            last.set(seq);
        }
        if let (Frame::Claims { .. } | Frame::ClaimAcks { .. }, false) = (&f, link.outbound) {
            let node = link.hello.borrow().as_ref().map(|h| h.node.clone());
            let (Some(node), Some(index)) = (node, link.peer.get()) else {
                return;
            };
            match f {
                Frame::Claims { claims, answer } => {
                    let from = (node.as_str(), index);
                    self.core.handle_remote_claims(now, from, claims, answer);
                }
                Frame::ClaimAcks { acks, .. } => self.core.handle_claim_acks(now, acks),
                _ => {}
            }
            return;
        }
        if let (
            Frame::SessionOffer(_)
            | Frame::SessionTake { .. }
            | Frame::SessionMoved(_)
            | Frame::SessionStored { .. },
            false,
        ) = (&f, link.outbound)
        {
            if let Some(index) = link.peer.get() {
                self.core.handle_session_frame(now, index, f);
            }
            return;
        }
        if let (Frame::Orphaned(_), false) = (&f, link.outbound) {
            if let (Frame::Orphaned(part), Some(_)) = (f, link.peer.get()) {
                self.core.orphan_arrived(now, part);
            }
            return;
        }
        if let (Frame::LogChunk { shard, chunk }, false) = (&f, link.outbound) {
            let Some(h) = link.hello.borrow().clone() else {
                return;
            };
            let (name, run) = (h.node.as_str(), h.incarnation);
            let taken = match *shard == h.shard {
                true => self.core.take_log_chunk(name, run, h.shards, *shard, chunk),
                false => Err(ReplicaError::Bad("a chunk of another shard's log")),
            };
            match taken {
                Ok((answer, None)) => {
                    link.session.borrow_mut().force_send(self.ms(now), &answer);
                    link.wake.notify();
                }
                Ok((answer, Some(sync))) => {
                    // Power-safe: once the copy is synced.
                    let mut held = self.copy_answers.borrow_mut();
                    held.push_back((sync, link.clone(), answer));
                }
                Err(e) => {
                    self.warn(
                        now,
                        format_args!(
                            "a chunk of node {}'s log refused: {e}; closing the link",
                            quote(h.node.as_str())
                        ),
                    );
                    self.close(now, link, "bad log chunk");
                }
            }
            return;
        }
        if let (Frame::LogHave { have, .. }, true) = (&f, link.outbound) {
            if let Some(index) = link.peer.get() {
                self.core.log_have(now, index, *have);
                self.ship_logs(now);
                // What the copy now holds may be confirmed to peers.
                self.confirm_synced(now);
            }
            return;
        }
        if let (Frame::Adopted { node, incarnation }, false) = (&f, link.outbound) {
            if link.peer.get().is_some() {
                self.core.adopted_elsewhere(node.as_str(), *incarnation);
            }
            return;
        }
        if let (Frame::Retained(_), false) = (&f, link.outbound) {
            if let (Frame::Retained(entries), Some(index)) = (f, link.peer.get()) {
                self.core.handle_remote_retained(now, index, entries);
            }
            return;
        }
        if let (Frame::Publish(_), false) = (&f, link.outbound) {
            if let Frame::Publish(m) = f {
                if let Some(index) = link.peer.get() {
                    self.core.handle_remote_publish(now, index, m);
                }
            }
            return;
        }
        match (&f, link.outbound) {
            (
                Frame::RouteSnapshot { .. } | Frame::RouteDelta { .. } | Frame::Ping { .. },
                false,
            ) => {
                let Some(index) = link.peer.get() else {
                    return;
                };
                let mut imports = self.imports.borrow_mut();
                let Some((import, route_link)) = imports.get_mut(&index) else {
                    return;
                };
                if *route_link != link.id {
                    return;
                }
                match import.apply(&f) {
                    Ok(applied) => {
                        drop(imports);
                        // Acknowledged once every shard here has them
                        // (BridgeOut::RouteAck).
                        let ack = (applied.ack).map(|seq| RouteAckTo { link: link.id, seq });
                        self.core.remote_routes(index, &applied.changes, ack);
                    }
                    Err(e) => {
                        drop(imports);
                        self.warn(
                            now,
                            format_args!("routes from a peer refused: {e}; resyncing"),
                        );
                        self.close(now, link, "route error");
                    }
                }
            }
            (Frame::WillSnapshot { .. } | Frame::WillSet(_) | Frame::WillClear { .. }, false) => {
                let (Some(index), Some(h)) = (link.peer.get(), link.hello.borrow().clone()) else {
                    return;
                };
                let taken = self.core.peer_wills(now, index, h.incarnation, h.shard, &f);
                if let Err(e) = taken {
                    self.warn(
                        now,
                        format_args!(
                            "wills from node {} refused: {e}; resyncing",
                            quote(h.node.as_str())
                        ),
                    );
                    self.close(now, link, "will error");
                }
            }
            (Frame::MoveFence { id, .. }, false) => {
                // Behind every message this shard routed to that peer so
                // far: through the core's outbox, which may still hold some.
                if let Some(index) = link.peer.get() {
                    self.core.answer_move_fence(index, *id);
                }
            }
            (Frame::MoveFenceDone { id, .. }, false) => {
                if let Some(index) = link.peer.get() {
                    self.fence_answered(now, Some(*id), index);
                }
            }
            (Frame::RouteAck { seq }, true) => {
                if self.me.shard == 0 && *seq > link.acked.get() {
                    link.acked.set(*seq);
                    self.recompute_acks();
                }
            }
            (Frame::Ping { .. }, true) => {}
            (Frame::Delivered { seq }, true) => {
                let Some(index) = link.peer.get() else {
                    return;
                };
                let known = self.peers.borrow_mut().delivered(index, *seq);
                if known {
                    self.release_waiting(index, *seq);
                    self.note_fill(now);
                } else {
                    self.warn(
                        now,
                        format_args!(
                            "a peer confirmed message {seq}, never sent; closing the link"
                        ),
                    );
                    self.close(now, link, "confirmed what was never sent");
                }
            }
            _ => {
                self.warn(
                    now,
                    format_args!("unexpected bridge frame; closing the link"),
                );
                self.close(now, link, "unexpected frame");
            }
        }
    }

    /// Move the core's outbox ([`ShardCore::poll_bridge`]) onto the
    /// links: run whenever the core's bridge wake-up is set.
    pub fn drain_outbox(&self, now: Instant) {
        while let Some(out) = self.core.poll_bridge() {
            self.bridge_out(now, out);
        }
        self.ship_logs(now);
        self.note_fill(now);
        self.confirm_synced(now);
    }

    /// Tell the core how far behind the peers are (the most bytes of
    /// this shard's messages one has not confirmed), for its connections
    /// to stop reading while that is too much
    /// ([`ShardCore::links_full`]). A peer with no link up counts for
    /// [`LINK_FULL_WAIT`] at most from when it holds enough to keep the
    /// connections paused (its link may never come while membership still
    /// sees it up); past it, messages for it beyond
    /// `cluster.link_queue_bytes_max` are dropped (logged once).
    fn note_fill(&self, now: Instant) {
        let mut fill = 0;
        let mut unlinked = self.full_unlinked.borrow_mut();
        let mut gave_up = Vec::new();
        // What keeps a pause going (`ShardCore::links_full`).
        let quarter = super::links_resume_mark(self.settings.out_bytes_max);
        let peers = self.peers.borrow();
        for (index, bytes, linked) in peers.fills() {
            if linked || bytes < quarter {
                unlinked.remove(&index);
                fill = fill.max(bytes);
                continue;
            }
            let (since, logged) = unlinked.entry(index).or_insert((now, false));
            if now.saturating_duration_since(*since) < LINK_FULL_WAIT {
                fill = fill.max(bytes);
            } else if !*logged {
                *logged = true;
                gave_up.push((index, bytes));
            }
        }
        unlinked.retain(|i, _| peers.node(*i).is_some());
        drop((unlinked, peers));
        self.core.set_links_fill(fill);
        for (index, bytes) in gave_up {
            let name = self.peer_name(Some(index));
            self.warn(
                now,
                format_args!(
                    "node {} has {bytes} bytes of this shard's messages unconfirmed and no \
                     link up for {} s: clients are read again, and messages for it past \
                     cluster.link_queue_bytes_max are dropped",
                    quote(&name),
                    LINK_FULL_WAIT.as_secs()
                ),
            );
        }
    }

    fn bridge_out(&self, now: Instant, out: BridgeOut) {
        let ms = self.ms(now);
        match out {
            BridgeOut::Publish {
                node,
                publish,
                ack,
                again,
                bytes,
            } => {
                // Kept until the peer confirms it: within the bound of what
                // it may leave unconfirmed, so past the link's.
                match self.send_numbered(now, node, Frame::Publish(publish), bytes, "a message") {
                    Ok(seq) => {
                        if ack.is_some() || again > 0 {
                            let mut waiting = self.waiting.borrow_mut();
                            let m = Waiting {
                                seq,
                                ack,
                                again,
                                sent: now,
                            };
                            waiting.entry(node).or_default().push_back(m);
                        }
                    }
                    Err(Frame::Publish(publish)) => {
                        let _ = self
                            .core
                            .remote_undeliverable(now, node, publish, ack, again);
                    }
                    Err(_) => {}
                }
            }
            BridgeOut::RouteAck { node, to } => {
                // Only for the node's route link now: an answer for a link
                // replaced since (a new run's, or the same run's again,
                // which brings a new snapshot) would say routes are here
                // that are not yet.
                let route_link = self.imports.borrow().get(&node).map(|(_, id)| *id);
                let link = route_link
                    .filter(|&id| id == to.link)
                    .and_then(|id| self.inbound.borrow().iter().find(|l| l.id == id).cloned());
                if let Some(l) = link {
                    // Every shard here has the routes of the run that link
                    // is from, up to `to.seq`.
                    let run = l.hello.borrow().as_ref().map(|h| h.incarnation);
                    if let Some(run) = run {
                        self.core.routes_known(node, run);
                    }
                    l.session
                        .borrow_mut()
                        .force_send(ms, &Frame::RouteAck { seq: to.seq });
                    l.wake.notify();
                }
            }
            BridgeOut::Retained { entry, except } => {
                let frame = Frame::Retained(vec![entry]);
                self.to_every_link(now, &frame, "retained", except);
            }
            BridgeOut::Will(frame) => {
                self.to_every_link(now, &frame, "will", None);
            }
            BridgeOut::Claim(claim) => {
                let stamp = claim.stamp;
                let frame = Frame::Claims {
                    claims: vec![claim],
                    answer: true,
                };
                let links = self.to_every_link(now, &frame, "claim", None);
                // Its CONNACK waits for that many acknowledgements.
                self.core.claim_sent(now, stamp, links);
            }
            BridgeOut::Adopted {
                of: (node, incarnation),
            } => {
                if let Ok(node) = crate::cluster::node::NodeName::new(&node) {
                    let frame = Frame::Adopted { node, incarnation };
                    self.to_every_link(now, &frame, "adopted", None);
                }
            }
            BridgeOut::MoveFenceDone { node, id } => {
                // Numbered with the messages ahead of it (a link that
                // breaks replays both).
                let done = Frame::MoveFenceDone { seq: 0, id };
                let _ = self.send_numbered(now, node, done, 64, "a move fence's answer");
            }
            BridgeOut::MoveFence { id, home } => {
                // Every peer up, linked now or not (its messages may be
                // waiting to be replayed).
                let peers = self.peers.borrow().indices();
                for &p in &peers {
                    let fence = Frame::MoveFence { seq: 0, id };
                    let _ = self.send_numbered(now, p, fence, 64, "a move's fence");
                }
                if peers.is_empty() {
                    self.core.move_fence_passed(now, id, home);
                } else {
                    let asked = FenceAsked {
                        home,
                        peers,
                        at: now,
                    };
                    self.move_fences.borrow_mut().insert(id, asked);
                }
            }
            BridgeOut::Peer { node, frame } => {
                let bytes = match &frame {
                    Frame::SessionMoved(m) => m
                        .deliveries
                        .iter()
                        .map(|d| d.message.cost_bytes() + 64)
                        .sum::<usize>(),
                    Frame::Orphaned(o) => (o.deliveries.iter())
                        .map(|d| d.message.cost_bytes() + 64)
                        .sum::<usize>(),
                    _ => 0,
                } + 64;
                let _ = self.send_numbered(now, node, frame, bytes, "a session move's frame");
            }
            BridgeOut::ClaimAck { node, claim } => {
                // Behind the offer of the claimed session, if any (past the
                // bound dropped: the claimant's CONNACK waits CLAIM_WAIT).
                let frame = Frame::ClaimAcks {
                    seq: 0,
                    acks: vec![claim],
                };
                let _ = self.send_numbered(now, node, frame, 64, "a claim's acknowledgement");
            }
            BridgeOut::Route { seq, change } => {
                for l in self.up_or_dialed() {
                    // Routes are never dropped; a peer that reads none of
                    // them loses the link and resyncs.
                    let frame = l.feed.borrow_mut().change(seq, &change);
                    if let Some(f) = frame {
                        self.force_on(now, &l, &f, "route");
                    }
                }
            }
        }
    }

    /// An orderly stop: put a Ping on every link up (shard 0's carries
    /// the route digest), after everything queued. Give the answer to
    /// [`Bridge::pings_answered`].
    pub fn ping_links(&self, now: Instant) -> Vec<(LinkId, u64)> {
        let ms = self.ms(now);
        self.up_links()
            .into_iter()
            .map(|l| {
                let ping = match self.me.shard {
                    0 => self.core.route_ping(),
                    _ => Frame::Ping { seq: 0, digest: 0 },
                };
                l.session.borrow_mut().force_send(ms, &ping);
                l.wake.notify();
                let (pings, _) = l.session.borrow().pings_answered();
                (l.id, pings)
            })
            .collect()
    }

    /// Whether the peer of every link of [`Bridge::ping_links`] answered
    /// (or the link closed): it read everything sent before.
    pub fn pings_answered(&self, asked: &[(LinkId, u64)]) -> bool {
        asked.iter().all(|&(id, pings)| {
            self.link(id)
                .is_none_or(|l| l.closed.get() || l.session.borrow().pings_answered().1 >= pings)
        })
    }
}
