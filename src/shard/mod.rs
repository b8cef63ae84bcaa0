//! A shard: [`ShardCore`], every decision of one core, and `runtime`, the
//! glommio side that does its I/O.
//!
//! Shard-local: a `ShardCore` and everything it owns (sessions, subscriber
//! trie, route replica, its part of the retained store, its log and the
//! bookkeeping of what in it is live, delayed publishes, mesh outbox,
//! timers) lives on one thread and is `!Send`. Shards share nothing; they
//! exchange [`mesh::MeshMsg`] batches.
//!
//! ```text
//!   runtime (glommio, this shard's thread)        ShardCore (no I/O, no clock)
//!   ─────────────────────────────────────        ───────────────────────────
//!   accept, read CONNECT ─────────────────────▶  handshake → serve / move / refuse
//!   home shard's connection task ─────────────▶  attach → ConnHandle (CONNACK queued)
//!   reader: bytes → codec::decode ────────────▶  handle_packet / handle_bad_bytes /
//!                                                 handle_connection_lost
//!   writer ◀──────────────────────────────────   poll_transmit (held for acks and syncs)
//!   mesh lane receivers ──────────────────────▶  handle_mesh → handoffs to serve
//!   mesh flusher ◀────────────────────────────   mesh().poll_batches / sent
//!   tick (every 50 ms) ───────────────────────▶  handle_tick: timers, delayed, log upkeep
//!   gather task ──────────────────────────────▶  run_gathers (retained replay chunks)
//!   group commit (power-safe) ◀───────────────   poll_sync → fdatasync → synced
//! ```
//!
//! Every input carries the time (`now`); the core reads no clock. Its
//! outputs are pulled through `poll_*` methods: packets per connection
//! ([`ShardCore::poll_transmit`], or a closing connection's last packets,
//! [`ConnHandle::poll_last_packets`]), mesh batches
//! ([`mesh::Mesh::poll_batches`]), files to sync
//! ([`ShardCore::poll_sync`]). Log appends are not an output: the core
//! writes them into its mmap segments itself, and only their sync is the
//! runtime's. Timers are inside the core, run by `handle_tick`. The
//! wake-ups (`notify::Notify`) only say that something can be pulled. The
//! simulator (`tests/simulation.rs`) drives several cores the same way with
//! a virtual clock and carries their batches itself.
//!
//! Order of the outputs: any. An output is offered only once nothing it
//! depends on is missing: a session's packets that acknowledge what other
//! shards must apply first, or (power-safe) what a sync must make durable,
//! are held inside the core, and so are mesh messages that name an origin
//! not yet synced; `synced` and the other shards' answers release them.
//! So a runtime may pull connections, mesh batches and sync requests in
//! whatever order its tasks run, and the simulator reads connections and
//! delivers batches in an order drawn from the seed. Within one
//! connection, packets come in the order the session queued them; within
//! one lane, batches in the order sent.
//!
//! Borrow rule: the core's state sits in one `RefCell`, borrowed only by
//! synchronous code; it never calls the runtime, so no task is spawned
//! while it is borrowed.

/// Log a line that clients can cause in numbers (refused handshakes, full
/// stores) through the shard's log gate: a flood of them becomes a few
/// lines and a count.
macro_rules! shard_log {
    ($shard:expr, $level:expr, $($arg:tt)+) => {
        if log::log_enabled!($level) {
            if let Some(n) = $shard.log_gate.borrow_mut().allow_ticked() {
                log::log!(
                    $level,
                    "{}{}",
                    format_args!($($arg)+),
                    $crate::text::suppressed_note(n)
                );
            }
        }
    };
}

pub mod admin;
mod adopt;
pub mod bridge;
mod claims;
mod cluster_retained;
mod connect;
mod delayed;
mod durable;
mod gather;
pub mod latency;
pub mod mesh;
mod moves;
pub mod notify;
mod orphans;
mod pressure;
mod remote;
mod restore;
mod routing;
pub mod runtime;
mod slab;
#[cfg(test)]
mod tests;
mod wills;

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::hash::HashMap;

use crate::codec::{reason, Packet, QoS, Version};
use crate::config::Config;
use crate::message::{ClientId, Message};
pub use crate::router::{home_shard, stable_hash};
use crate::router::{FilterTrie, RetainedStore};
use crate::session::{Action, Session, SessionLimits, SessionStats, Subscription};

pub use durable::{
    chunk_bytes as durable_chunk_bytes, CopyInfo, LogStatus, ReplicationStats, REPLICA_WAIT,
};
use durable::{DurableSlot, Store};
use routing::{Reach, Source};

pub use claims::ClaimsSnapshot;
pub use cluster_retained::RetainedSnapshot;
pub use connect::{Arrival, CertLogin, Handshake};
use mesh::{Mesh, RouteKey};
use notify::Notify;
pub use remote::{BridgeOut, ClusterReport, ClusterStats, RouteAckTo, FRAME_OVERHEAD_BYTES};
pub use runtime::last_client;

/// Where a pause for a peer that fell behind ends
/// ([`ShardCore::links_full`]): a quarter of `cluster.link_queue_bytes_max`
/// (`max`); it begins at half.
fn links_resume_mark(max: usize) -> usize {
    max / 4
}
use slab::Slab;

/// Debug builds check a shard's invariants after every input up to this
/// many sessions and stored messages, and once per tick beyond.
const INPUT_CHECK_OBJECTS_MAX: usize = 256;

/// Index of a session in its shard's slab.
pub type SessionKey = u32;

/// Key of an entry in the subscriber trie: a session, and the share name
/// when the subscription is shared.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubKey {
    session: SessionKey,
    group: Option<Arc<str>>,
}

/// Value of an entry in the subscriber trie.
#[derive(Debug, Clone)]
pub struct SubEntry {
    subscription: Subscription,
    /// The filter without `$share/{group}/`, to tell shared subscriptions of
    /// one group with different filters apart.
    filter: Arc<str>,
}

/// The socket side of a session, shared by its reader and writer tasks.
#[derive(Debug)]
pub struct ConnHandle {
    key: SessionKey,
    /// The client's id, for the panic report ([`last_client`]).
    client_id: ClientId,
    /// Unique among this shard's connections, ever: a stale task or message
    /// can never be mistaken for a later connection that reuses the key.
    id: u64,
    /// The session's generation for this connection.
    generation: u64,
    version: Version,
    /// Wakes the writer: packets are waiting, or the connection is closing.
    wake: Notify,
    /// Wakes the reader when the writer has written, or when a pause for
    /// a peer that fell behind ends ([`ShardCore::links_full`]), or when
    /// the last session that held it releases it (`pressure`): a reader
    /// paused looks again.
    drained: Notify,
    /// Wakes the reader when the connection closes: the reader stops, and
    /// the writer's last packets go out before the input is drained.
    closed: Notify,
    /// Sessions of subscribers behind that hold this connection's reading
    /// (`pressure`), and since when one does.
    holds: Cell<u32>,
    held_since: Cell<Option<Instant>>,
    /// Open, or closing with its last packets.
    phase: RefCell<Phase>,
}

/// Where a connection is in its life, as its reader and writer see it.
#[derive(Debug, Default)]
enum Phase {
    /// Attached to its session: packets flow both ways.
    #[default]
    Open,
    /// The session let go of it: the reader stops; the writer writes these
    /// packets last (DISCONNECT, last acks), then the input is drained.
    Closing {
        /// Not yet handed to the writer.
        last_packets: Vec<Packet>,
        /// Power-safe: they wait until log records below this sequence
        /// number are synced.
        wait_seq: u64,
    },
}

impl ConnHandle {
    /// The session let go of this connection: `last_packets` go out once
    /// log records below `wait_seq` are synced (power-safe; 0: at once).
    /// Called once: the shard takes the handle out of the session's slot.
    fn close(&self, last_packets: Vec<Packet>, wait_seq: u64) {
        let was = self.phase.replace(Phase::Closing {
            last_packets,
            wait_seq,
        });
        debug_assert!(matches!(was, Phase::Open), "a connection closes once");
        self.wake.notify();
        self.drained.notify();
        self.closed.notify();
    }

    /// True once the session let go of this connection.
    pub fn is_closing(&self) -> bool {
        matches!(*self.phase.borrow(), Phase::Closing { .. })
    }

    /// Closing: the sequence number its last packets wait for.
    fn close_wait_seq(&self) -> Option<u64> {
        match &*self.phase.borrow() {
            Phase::Closing { wait_seq, .. } => Some(*wait_seq),
            Phase::Open => None,
        }
    }

    /// Closing: the last packets not yet taken by the writer.
    pub fn poll_last_packets(&self) -> Vec<Packet> {
        match &mut *self.phase.borrow_mut() {
            Phase::Closing { last_packets, .. } => std::mem::take(last_packets),
            Phase::Open => Vec::new(),
        }
    }
}

/// A retained message as its owner shard keeps it.
#[derive(Debug)]
struct Kept {
    message: Arc<Message>,
    /// When it was stored (Unix ms; in a cluster, its hybrid-logical-clock
    /// stamp): what orders it against messages routed again after a
    /// restart, and against other nodes' versions.
    stamp: u64,
}

/// A session and the connection attached to it.
#[derive(Debug)]
struct SessionSlot {
    session: Session,
    /// Unique among this shard's sessions, ever: a late reply for an ended
    /// session cannot reach a new one that reuses its slab key.
    uid: u64,
    conn: Option<Rc<ConnHandle>>,
    /// Deadline registered in the timer heap (the earliest pending entry).
    timer_at: Option<Instant>,
    /// Acknowledgements still awaited from other shards (route deltas of
    /// its subscribes, retained stores of its publishes); while non-zero the
    /// writer holds the session's output.
    held_acks: u32,
    /// Its place in the log, when the session is persistent.
    durable: Option<DurableSlot>,
    /// Power-safe: its output waits until log records below this sequence
    /// number are synced.
    wait_seq: u64,
    /// Retained-message walks waiting for room in the session's queue.
    parked_gathers: Vec<gather::Gather>,
    /// Credit granted to other shards for retained chunks not yet here.
    gather_credit_out: usize,
    /// In a cluster: what the peers hold of the session's will.
    will_mark: wills::WillMark,
    /// In a cluster: the stamp of its connection's claim of the client id.
    claim: u64,
    /// In a cluster: the stamp of the claim of the connection that created
    /// it, or of the copy it took in when it moved here (0: unknown,
    /// restored from the log). Of two copies that a partition let live,
    /// the one born later is the one its client was last told about.
    born: u64,
    /// Its client was told about the copy `born` names (the CONNACK that
    /// said it was new went): only then does `born` make an older copy
    /// stale.
    born_told: bool,
    /// A move into it from this node was cut short by the node's death: a
    /// copy taken over from that node (`adopt`) is this session (what the
    /// move did not bring), not an older one. Cleared once taken in.
    cut_short_from: Option<Arc<str>>,
    /// In a cluster: the latest claim whose move brought the session here
    /// whole, as its log says (`Rec::MovedIn`, written again when
    /// compaction rewrites the session; 0: none).
    moved_in: u64,
    /// Restored from the log and not connected since: its will is the
    /// previous run's, which the peers published already (this node
    /// publishes it to its own subscribers only, and exports it not).
    will_of_last_run: bool,
    /// Taken over from peer run (index, incarnation) declared down, and
    /// not connected to since (`adopt`).
    adopted_from: Option<(u16, u64)>,
    /// The user name its last connection logged in with (its ACL is
    /// rebuilt from it when the rules are reloaded); None: anonymous, or
    /// restored from the log and not connected since.
    username: Option<Box<str>>,
    /// The topics its last connection's login token granted (its ACL,
    /// kept when the files are reloaded); None: the ACL file applies.
    token_rules: Option<std::sync::Arc<crate::auth::token::TokenRules>>,
    /// The queue length last added to `ShardStats::queued`.
    counted_queued: u32,
    /// The in-flight count last added to `ShardStats::inflight`.
    counted_inflight: u32,
}

impl SessionSlot {
    /// What its log says of it besides its state (`Store::note_marks`).
    fn marks(&self) -> crate::persist::recover::Marks {
        crate::persist::recover::Marks {
            moved_in: self.moved_in,
            told: if self.born_told { self.born } else { 0 },
        }
    }

    /// Take what its log said of it (a restart).
    fn set_marks(&mut self, marks: crate::persist::recover::Marks) {
        self.moved_in = marks.moved_in;
        (self.born, self.born_told) = (marks.told, marks.told != 0);
    }

    /// A slot for `session`, without a connection yet.
    fn new(session: Session, uid: u64, durable: Option<DurableSlot>) -> SessionSlot {
        SessionSlot {
            session,
            uid,
            conn: None,
            timer_at: None,
            held_acks: 0,
            durable,
            wait_seq: 0,
            parked_gathers: Vec::new(),
            gather_credit_out: 0,
            will_mark: None,
            will_of_last_run: false,
            adopted_from: None,
            claim: 0,
            born: 0,
            born_told: false,
            cut_short_from: None,
            moved_in: 0,
            username: None,
            token_rules: None,
            counted_queued: 0,
            counted_inflight: 0,
        }
    }

    /// Add the change of the session's queue and in-flight lengths to
    /// `stats` (constant time; a scrape then reads the totals without
    /// walking the sessions).
    fn account(&mut self, stats: &mut ShardStats) {
        let queued = self.session.queued_len() as u32;
        let inflight = self.session.inflight_len() as u32;
        stats.queued = stats.queued + u64::from(queued) - u64::from(self.counted_queued);
        stats.inflight = stats.inflight + u64::from(inflight) - u64::from(self.counted_inflight);
        self.counted_queued = queued;
        self.counted_inflight = inflight;
    }
}

/// Counters of one shard.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShardStats {
    /// Connections attached now.
    pub connections: usize,
    /// Messages routed from this shard's publishers.
    pub routed: u64,
    /// Deliveries into this shard's sessions.
    pub delivered: u64,
    /// Retained messages not kept because the store was full (messages or
    /// bytes) or the message was larger than one may be.
    pub retained_dropped: u64,
    /// Times this shard's share of `storage.delayed_bytes_max` was reached
    /// (new delayed publishes are refused while it is).
    pub delayed_bytes_full: u64,
    /// CONNECTs accepted (a session attached).
    pub connects_accepted: u64,
    /// Connections refused before or at CONNECT, by [`ConnectRefusal`] reason.
    pub connects_refused: [u64; ConnectRefusal::ALL.len()],
    /// MQTT bytes read from clients (after TLS and WebSocket framing).
    pub bytes_received: u64,
    /// MQTT bytes written to clients.
    pub bytes_sent: u64,
    /// Messages routed that matched no subscription anywhere and were
    /// not retained.
    pub no_subscribers: u64,
    /// Messages in the sessions' queues (waiting, not in flight).
    pub queued: u64,
    /// Messages sent and not yet acknowledged.
    pub inflight: u64,
    /// Times a connection's reading paused because the shard's outbox to
    /// the other shards held more than `mesh.outbox_messages_max`.
    pub mesh_pauses: u64,
    /// Times a connection's reading paused because a peer node had half
    /// of `cluster.link_queue_bytes_max` or more of this shard's messages
    /// unconfirmed ([`ShardCore::links_full`]).
    pub link_pauses: u64,
    /// Times a connection's reading paused because a session it publishes
    /// to was behind (`pressure`).
    pub publisher_holds: u64,
    /// Times a held connection was read again because
    /// `mqtt.publisher_hold_ms` passed while a session still held it.
    pub publisher_holds_expired: u64,
    /// Log records that could not be written (the log was full, or a
    /// record too large): each refused, held for a retry or counted here.
    pub log_appends_failed: u64,
    /// Connections closed because a write waited `server.send_timeout_ms`
    /// for the client to read.
    pub send_timeouts: u64,
    /// TLS connections closed at accept because `server.tls_handshakes_max`
    /// were already waiting to send CONNECT.
    pub tls_handshakes_refused: u64,
}

/// Why a connection was refused before its session attached: the
/// `reason` label of `shardmq_connects_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRefusal {
    /// Bad user name or password, or a bad login token (0x86).
    BadCredentials,
    /// Not authorized (0x87) or banned (0x8A).
    NotAuthorized,
    /// The client id is not allowed (0x85).
    ClientIdInvalid,
    /// `connections_max`, `sessions_max`, or a full log (0x97).
    QuotaExceeded,
    /// The broker is stopping (0x88), too many connections are waiting
    /// to send CONNECT (closed at accept), a cluster node does not have
    /// the routes of every node it sees up yet (0x88), or a peer did not
    /// answer a claim in time (0x88).
    Unavailable,
    /// The node is on the minority side of a partition (0x88,
    /// `cluster.on_minority`).
    Minority,
    /// An authentication method the broker does not know (0x8C).
    BadAuthMethod,
    /// A will with a bad topic or payload (0x90, 0x99).
    BadWill,
    /// No valid CONNECT within `server.connect_timeout_ms`: bad bytes, an
    /// unsupported protocol level, another packet first, a refused
    /// WebSocket upgrade, or silence.
    Protocol,
    /// Any other CONNACK reason.
    Other,
}

impl ConnectRefusal {
    /// Every reason, in the order of `ShardStats::connects_refused`.
    pub const ALL: [ConnectRefusal; 10] = [
        ConnectRefusal::BadCredentials,
        ConnectRefusal::NotAuthorized,
        ConnectRefusal::ClientIdInvalid,
        ConnectRefusal::QuotaExceeded,
        ConnectRefusal::Unavailable,
        ConnectRefusal::Minority,
        ConnectRefusal::BadAuthMethod,
        ConnectRefusal::BadWill,
        ConnectRefusal::Protocol,
        ConnectRefusal::Other,
    ];

    /// The metric label.
    pub const fn label(self) -> &'static str {
        match self {
            ConnectRefusal::BadCredentials => "bad_credentials",
            ConnectRefusal::NotAuthorized => "not_authorized",
            ConnectRefusal::ClientIdInvalid => "client_id_invalid",
            ConnectRefusal::QuotaExceeded => "quota_exceeded",
            ConnectRefusal::Unavailable => "unavailable",
            ConnectRefusal::Minority => "minority",
            ConnectRefusal::BadAuthMethod => "bad_auth_method",
            ConnectRefusal::BadWill => "bad_will",
            ConnectRefusal::Protocol => "protocol",
            ConnectRefusal::Other => "other",
        }
    }

    /// The reason a 5.0 CONNACK code gives.
    pub fn of_code(code: u8) -> ConnectRefusal {
        match code {
            reason::BAD_USER_NAME_OR_PASSWORD => ConnectRefusal::BadCredentials,
            reason::NOT_AUTHORIZED | reason::BANNED => ConnectRefusal::NotAuthorized,
            reason::CLIENT_IDENTIFIER_NOT_VALID => ConnectRefusal::ClientIdInvalid,
            reason::QUOTA_EXCEEDED => ConnectRefusal::QuotaExceeded,
            reason::SERVER_UNAVAILABLE | reason::SERVER_BUSY => ConnectRefusal::Unavailable,
            reason::BAD_AUTHENTICATION_METHOD => ConnectRefusal::BadAuthMethod,
            reason::TOPIC_NAME_INVALID | reason::PAYLOAD_FORMAT_INVALID => ConnectRefusal::BadWill,
            reason::UNSUPPORTED_PROTOCOL_VERSION
            | reason::MALFORMED_PACKET
            | reason::PROTOCOL_ERROR => ConnectRefusal::Protocol,
            _ => ConnectRefusal::Other,
        }
    }
}

/// One shard's part of a metrics scrape ([`ShardCore::report`]).
#[derive(Debug, Clone, Default)]
pub struct ShardReport {
    /// The shard.
    pub shard: usize,
    /// Its counters.
    pub stats: ShardStats,
    /// What its sessions, live and ended, counted of their messages.
    pub messages: SessionStats,
    /// Sessions it holds, connected or not.
    pub sessions: usize,
    /// Subscriptions of its sessions.
    pub subscriptions: usize,
    /// Entries of its route replica: (filter, shard or node) pairs, and
    /// (filter, shard) pairs with persistent subscribers.
    pub routes: usize,
    /// Retained messages it stores.
    pub retained: usize,
    /// Their bytes (topic, payload, properties).
    pub retained_bytes: u64,
    /// Delayed publishes it holds, and their bytes.
    pub delayed: usize,
    /// Their bytes.
    pub delayed_bytes: u64,
    /// Batches and messages it handed to the lanes to other shards, and
    /// the batches that waited for room on a full lane.
    pub mesh: (u64, u64, u64),
    /// What its log holds; None without durability.
    pub log: Option<LogStatus>,
    /// Its latency histograms.
    pub latency: Box<latency::Latencies>,
    /// Its cluster counters; None on a broker that runs alone.
    pub cluster: Option<ClusterReport>,
}

/// What a shard's orderly stop closed.
#[derive(Debug, Clone, Copy, Default)]
pub struct StopReport {
    /// Connections attached when the stop began.
    pub connections: usize,
    /// Of those, 5.0 connections sent DISCONNECT 0x8B.
    pub disconnects_sent: usize,
    /// Sockets still flushing or draining when the shard stopped waiting.
    pub sockets_left: usize,
    /// Sessions the shard held at the stop (persistent ones are in the log).
    pub sessions: usize,
    /// Shards whose log was synced (0 or 1 per shard).
    pub logs_synced: usize,
}

impl StopReport {
    /// Add another shard's report to this one.
    pub fn add(&mut self, other: &StopReport) {
        self.connections += other.connections;
        self.disconnects_sent += other.disconnects_sent;
        self.sockets_left += other.sockets_left;
        self.sessions += other.sessions;
        self.logs_synced += other.logs_synced;
    }
}

/// Mutable state of a shard, behind one `RefCell` never held across an await.
struct State {
    sessions: Slab<SessionSlot>,
    by_client: HashMap<ClientId, SessionKey>,
    /// filter → local subscriptions.
    subscribers: FilterTrie<SubKey, SubEntry>,
    /// How many local subscriptions each route key has per filter; a route
    /// delta changes the replicas on 0↔1 only.
    local_routes: HashMap<(Arc<str>, RouteKey), u32>,
    /// Replica of every shard's routes: filter → who has subscribers.
    routes: FilterTrie<RouteKey, ()>,
    /// Retained messages of the topics this shard owns.
    retained: RetainedStore<Kept>,
    /// Their bytes (`Message::cost_bytes`).
    retained_bytes: u64,
    /// Round-robin position per shared subscription over the shards with
    /// members (publishing side).
    shared_shard_next: HashMap<mesh::SharedPick, usize>,
    /// Round-robin position per shared subscription over this shard's
    /// members (serving side).
    shared_member_next: HashMap<mesh::SharedPick, usize>,
    timers: BinaryHeap<Reverse<(Instant, SessionKey)>>,
    /// Last connection id handed out.
    last_conn_id: u64,
    /// Last session uid handed out.
    last_session_uid: u64,
    /// Last client id the broker assigned (empty id in CONNECT).
    last_assigned_id: u64,
    /// The log and what in it is live; None without durability.
    store: Option<Store>,
    /// Delayed publishes by (due, id).
    delayed: BTreeMap<(Instant, u64), Arc<Message>>,
    /// Their bytes (`Message::cost_bytes`).
    delayed_bytes: u64,
    /// Next delayed publish id.
    next_delayed_id: u64,
    /// Retained-message walks ready for their next chunk.
    gathers: std::collections::VecDeque<gather::Gather>,
    /// Chunks other shards asked for: (waiter, walk, credit).
    serving:
        std::collections::VecDeque<(mesh::RetainedWaiter, Box<crate::router::MatchWalk>, usize)>,
    /// Wakes the gather task when `gathers` or `serving` is not empty.
    gather_wake: Rc<Notify>,
    /// The cluster's side of the shard; None on a broker that runs alone.
    remote: Option<remote::Remote>,
    /// Online sessions behind, and the connections they hold (`pressure`).
    pressure: HashMap<SessionKey, pressure::Pressing>,
    stats: ShardStats,
}

/// A peer's routes as one shard waits for them (see
/// [`ShardCore::peer_routes_expected`]).
#[derive(Debug, Clone, Copy)]
struct PeerRoutes {
    run: u64,
    up: bool,
    known: bool,
    /// When this shard's bridge saw the run up (None: not yet).
    up_at: Option<Instant>,
}

/// One shard; see the module docs.
pub struct ShardCore {
    id: usize,
    shards: usize,
    config: Config,
    limits: Rc<SessionLimits>,
    retained_max: usize,
    /// This shard's share of `mqtt.retained_bytes_max`.
    retained_bytes_max: u64,
    connections_max: usize,
    /// This shard's share of `mqtt.sessions_max`.
    sessions_max: usize,
    state: RefCell<State>,
    mesh: Mesh,
    stopping: Cell<bool>,
    /// On the minority side of a partition with `cluster.on_minority =
    /// refuse_connects`: new CONNECTs are refused (0x88).
    refusing_connects: Cell<bool>,
    /// Bytes of this shard's messages the peer furthest behind has not
    /// confirmed (set by the bridge), and whether the connections stopped
    /// reading for it ([`ShardCore::links_full`]).
    links_fill: Cell<usize>,
    links_paused: Cell<bool>,
    /// Bytes of the messages in the bridge's outbox (as the bridge counts
    /// them against `cluster.link_queue_bytes_max`): the connections stop
    /// reading while they reach half of it, before the bridge takes them
    /// (outside `State`, so that the check between packets borrows
    /// nothing).
    routed_bytes: Cell<usize>,
    /// Whether new CONNECTs were taken (not waiting for a peer's routes)
    /// when last looked at, for the log line when that changes.
    routes_gate_open: Cell<bool>,
    /// A cluster node without the routes of every node it sees up: new
    /// CONNECTs are refused (0x88), since a publish here could miss those
    /// nodes' subscribers. Per peer index: the run this shard saw last,
    /// whether it is up, and whether its routes are known here
    /// ([`ShardCore::peer_routes_expected`], [`ShardCore::routes_known`]).
    peer_routes: RefCell<hashbrown::HashMap<u16, PeerRoutes>>,
    /// Runs of peers declared down whose sessions the node next after them
    /// may still be taking over, since when: CONNECTs that resume a
    /// session are refused meanwhile (`adopt`; outside `State`, for the
    /// check at CONNECT).
    adoption_waits: RefCell<Vec<(adopt::Run, Instant)>>,
    /// The latest runs (and earlier ones of the same node) whose sessions
    /// need no such wait any more.
    adoptions_over: RefCell<std::collections::VecDeque<adopt::Run>>,
    /// Sockets of attached connections still open (reader or writer alive).
    sockets: Cell<usize>,
    /// Accepted connections that have not finished CONNECT yet; bounded by
    /// `connections_max` too.
    handshakes: Cell<usize>,
    /// Of those, the TLS ones (handshake or CONNECT awaited); bounded by
    /// `server.tls_handshakes_max`.
    tls_handshakes: Cell<usize>,
    /// This shard's share of `storage.delayed_messages_max`.
    delayed_max: usize,
    /// This shard's share of `storage.delayed_bytes_max`.
    delayed_bytes_max: u64,
    /// Wakes the group-commit task (power-safe): records wait for a sync.
    sync_wake: Rc<notify::Notify>,
    /// Rate limit of the log lines clients cause on this shard as a crowd.
    log_gate: RefCell<crate::text::LogGate>,
    /// The runtime's start stamp, carried by assigned client ids.
    boot_stamp: u64,
    /// Debug builds: `SHARDMQ_TEST_PANIC_CLIENT_ID`, see
    /// `runtime::connection::test_panic_trigger`.
    #[cfg(debug_assertions)]
    test_panic_client: Option<String>,
    /// Who may connect and what they may read and write (shared by every
    /// shard, read-only; replaced whole by [`ShardCore::set_auth`]).
    auth: RefCell<Arc<crate::auth::Auth>>,
    /// Verified passwords and failed logins (see `connect::Logins`).
    logins: RefCell<connect::Logins>,
    /// Latency histograms (see `latency`).
    latency: RefCell<latency::Latencies>,
}

impl ShardCore {
    /// Shard `id` of `shards` with empty state; `mesh` is its outbox;
    /// client ids it assigns carry `boot_stamp` (the runtime's start time,
    /// so they differ from run to run).
    pub fn new(id: usize, shards: usize, config: Config, mesh: Mesh, boot_stamp: u64) -> ShardCore {
        let limits = Rc::new(config.session_limits());
        let retained_max = config.mqtt.retained_messages_max.div_ceil(shards);
        let connections_max = config.server.connections_max.div_ceil(shards);
        let sessions_max = config.mqtt.sessions_max.div_ceil(shards);
        let delayed_max = config.storage.delayed_messages_max.div_ceil(shards);
        let delayed_bytes_max = config.storage.delayed_bytes_max.div_ceil(shards as u64);
        let retained_bytes_max = config.mqtt.retained_bytes_max.div_ceil(shards as u64);
        let auth = crate::auth::Auth::without_files(&config.auth);
        ShardCore {
            auth: RefCell::new(Arc::new(auth)),
            logins: RefCell::new(connect::Logins::new()),
            latency: RefCell::default(),
            boot_stamp,
            delayed_max,
            delayed_bytes_max,
            retained_bytes_max,
            sync_wake: Rc::default(),
            log_gate: RefCell::new(crate::text::LogGate::new(50, Duration::from_millis(100))),
            #[cfg(debug_assertions)]
            test_panic_client: std::env::var("SHARDMQ_TEST_PANIC_CLIENT_ID").ok(),
            id,
            shards,
            limits,
            retained_max,
            connections_max,
            sessions_max,
            config,
            mesh,
            stopping: Cell::new(false),
            refusing_connects: Cell::new(false),
            links_fill: Cell::new(0),
            links_paused: Cell::new(false),
            routed_bytes: Cell::new(0),
            routes_gate_open: Cell::new(true),
            peer_routes: RefCell::new(hashbrown::HashMap::new()),
            adoption_waits: RefCell::new(Vec::new()),
            adoptions_over: RefCell::new(std::collections::VecDeque::new()),
            sockets: Cell::new(0),
            handshakes: Cell::new(0),
            tls_handshakes: Cell::new(0),
            state: RefCell::new(State {
                sessions: Slab::default(),
                by_client: HashMap::default(),
                subscribers: FilterTrie::new(),
                local_routes: HashMap::default(),
                routes: FilterTrie::new(),
                retained: RetainedStore::new(),
                retained_bytes: 0,
                shared_shard_next: HashMap::default(),
                shared_member_next: HashMap::default(),
                timers: BinaryHeap::new(),
                last_conn_id: 0,
                last_session_uid: 0,
                last_assigned_id: 0,
                store: None,
                delayed: BTreeMap::new(),
                delayed_bytes: 0,
                next_delayed_id: 1,
                gathers: Default::default(),
                serving: Default::default(),
                gather_wake: Rc::default(),
                remote: None,
                pressure: HashMap::default(),
                stats: ShardStats::default(),
            }),
        }
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// This shard's index.
    pub fn id(&self) -> usize {
        self.id
    }

    /// The mesh sender side.
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ShardStats {
        self.state.borrow().stats
    }

    /// The counters and sizes a metrics scrape shows: constant time (no
    /// walk over sessions), so a scrape never stalls the shard.
    pub fn report(&self) -> ShardReport {
        let st = self.state.borrow();
        ShardReport {
            shard: self.id,
            stats: st.stats,
            messages: *self.limits.status.stats.borrow(),
            sessions: st.sessions.len(),
            subscriptions: st.subscribers.len(),
            routes: st.routes.len(),
            retained: st.retained.len(),
            retained_bytes: st.retained_bytes,
            delayed: st.delayed.len(),
            delayed_bytes: st.delayed_bytes,
            mesh: self.mesh.counts(),
            log: self.log_status(),
            latency: Box::new(self.latency.borrow().clone()),
            cluster: Self::cluster_stats_of(&st).map(|core| ClusterReport {
                core,
                bridge: Default::default(),
            }),
        }
    }

    /// A packet read from connection `conn`.
    pub fn handle_packet(&self, conn: &ConnHandle, now: Instant, packet: Packet) {
        self.with_session(conn, now, |s| s.handle_packet(now, packet));
    }

    /// A decode error on the connection: DISCONNECT with its reason code.
    pub fn handle_bad_bytes(&self, conn: &ConnHandle, now: Instant, reason: u8, why: &str) {
        self.with_session(conn, now, |s| s.violation(now, reason, why));
    }

    /// The connection's socket ended (EOF or error) without DISCONNECT.
    pub fn handle_connection_lost(&self, conn: &ConnHandle, now: Instant) {
        let generation = conn.generation;
        self.with_session(conn, now, |s| s.connection_lost(now, generation));
    }

    /// Run `f` on the session `conn` belongs to, if `conn` is still its
    /// connection, then apply the session's actions.
    fn with_session(&self, conn: &ConnHandle, now: Instant, f: impl FnOnce(&mut Session)) {
        let mut st = self.state.borrow_mut();
        let Some(slot) = st.sessions.get_mut(conn.key) else {
            return;
        };
        if slot.conn.as_ref().is_some_and(|c| c.id == conn.id) {
            f(&mut slot.session);
            self.drive(&mut st, conn.key, now);
        }
        Self::debug_invariants(&st);
    }

    /// Debug builds: check every invariant after each input, while the
    /// shard is small enough for that to cost little (at most
    /// [`INPUT_CHECK_OBJECTS_MAX`] sessions and stored messages); beyond,
    /// once per tick. The checks walk everything, and a shard slowed by
    /// them changes what a test measures: with 2,000 stored messages a
    /// subscriber's shard fell behind its publisher's, and their lane held
    /// 15 MiB. The simulator checks after every input at any size.
    fn debug_invariants(st: &State) {
        if cfg!(debug_assertions) && durable::invariants::size(st) <= INPUT_CHECK_OBJECTS_MAX {
            Self::invariants(st);
        }
    }

    /// Apply every action session `key` has queued, then wake its writer
    /// and re-arm its timer.
    fn drive(&self, st: &mut State, key: SessionKey, now: Instant) {
        loop {
            let Some(slot) = st.sessions.get_mut(key) else {
                return;
            };
            let Some(action) = slot.session.poll_action() else {
                break;
            };
            match action {
                Action::Publish {
                    message,
                    packet_id,
                    delay_s,
                    will,
                } => {
                    let qos = message.qos;
                    let read_from = slot
                        .conn
                        .as_ref()
                        .filter(|_| !will)
                        .and_then(|c| c.publisher());
                    let source = Source {
                        from: Some(key),
                        qos2_packet_id: packet_id.filter(|_| qos == QoS::ExactlyOnce),
                        delayed: None,
                        will_of: will.then_some(key),
                        read_from,
                    };
                    let reach = match will {
                        true => Self::will_reach(st.remote.as_ref(), slot),
                        false => Reach::Cluster,
                    };
                    // Numbered when routed (a delayed one when it is due):
                    // an origin's ids go out in order.
                    let accepted = match delay_s {
                        Some(d) => self.delay(st, now, message, d, source),
                        None => {
                            let message = Self::number_message(st, message);
                            self.route(st, now, message, source, reach)
                        }
                    };
                    if let (Some(pid), Some(slot)) = (packet_id, st.sessions.get_mut(key)) {
                        slot.session.publish_done(now, qos, pid, accepted);
                    }
                }
                Action::Subscribe {
                    filter,
                    subscription,
                    is_new,
                } => {
                    Self::durable_subscription(st, key, &filter, Some(&subscription));
                    self.subscribe(st, key, &filter, subscription, is_new);
                }
                Action::Unsubscribe { filter } => {
                    Self::durable_subscription(st, key, &filter, None);
                    self.unsubscribe(st, key, &filter);
                }
                Action::Close => {
                    Self::durable_offline(st, key);
                    Self::close_connection(st, key);
                }
                Action::End => {
                    Self::drain_journal(st, key);
                    Self::durable_end(st, key);
                    self.end_session(st, key, now);
                    self.ease(st, key);
                    return;
                }
            }
        }
        // Only a session's own steps change its will (not a delivery).
        if st.remote.is_some() {
            Self::export_will(st, key, now);
        }
        // Its client's acknowledgements, or its connection's end, may end
        // a hold on its publishers.
        self.ease(st, key);
        Self::after_step(st, key, now);
    }

    /// Wake the session's writer if it has output, and keep the timer heap
    /// holding the session's earliest deadline.
    fn after_step(st: &mut State, key: SessionKey, now: Instant) {
        if st.store.is_some() {
            Self::page_in(st, key, now);
        }
        Self::resume_gathers(st, key);
        if st.store.is_some() {
            Self::drain_journal(st, key);
            Self::hold_for_sync(st, key);
        }
        let Some(slot) = st.sessions.get_mut(key) else {
            return;
        };
        slot.account(&mut st.stats);
        // Without a log nothing reads the journal.
        while slot.session.poll_journal().is_some() {}
        if slot.session.has_transmit() {
            if let Some(c) = &slot.conn {
                c.wake.notify();
            }
        }
        let next = slot.session.next_timeout();
        if let Some(at) = next {
            if slot.timer_at.is_none_or(|t| at < t) {
                slot.timer_at = Some(at);
                st.timers.push(Reverse((at, key)));
            }
        }
    }

    /// The session let go of its connection: hand the writer the packets
    /// still queued for it (a DISCONNECT) and tell it to close.
    fn close_connection(st: &mut State, key: SessionKey) {
        let wait_seq = Self::close_wait_seq(st, key);
        let Some(slot) = st.sessions.get_mut(key) else {
            return;
        };
        if let Some(conn) = slot.conn.take() {
            let mut last = Vec::new();
            while let Some(p) = slot.session.poll_transmit() {
                last.push(p);
            }
            conn.close(last, wait_seq);
            st.stats.connections -= 1;
        }
    }

    /// Drop an ended session and every subscription it held.
    fn end_session(&self, st: &mut State, key: SessionKey, now: Instant) {
        Self::close_connection(st, key);
        let filters: Vec<String> = match st.sessions.get(key) {
            Some(slot) => slot.session.subscriptions().keys().cloned().collect(),
            None => return,
        };
        for filter in filters {
            self.unsubscribe(st, key, &filter);
        }
        // Route any will the session published on its way out.
        let slot = st.sessions.remove(key).expect("checked above");
        Self::unexport_will(st, &slot);
        let reach = Self::will_reach(st.remote.as_ref(), &slot);
        st.stats.queued -= u64::from(slot.counted_queued);
        st.stats.inflight -= u64::from(slot.counted_inflight);
        let mut session = slot.session;
        while let Some(action) = session.poll_action() {
            if let Action::Publish { message, .. } = action {
                self.route(st, now, message, Source::default(), reach);
            }
        }
        if st.by_client.get(session.client_id()) == Some(&key) {
            st.by_client.remove(session.client_id());
        }
    }

    /// Run every timer that is due, send the delayed publishes that are
    /// due, and keep the log (clock, settled frontier, compaction).
    pub fn handle_tick(&self, now: Instant) {
        self.log_gate.borrow_mut().tick(now);
        self.publish_due_peer_wills(now);
        let mut st = self.state.borrow_mut();
        self.send_due_delayed(&mut st, now);
        self.durable_tick(&mut st, now);
        Self::expire_tombstones(&mut st, now);
        self.release_overdue_claims(&mut st, now);
        self.release_overdue_moves(&mut st, now);
        self.expire_kept(&mut st, now);
        Self::expire_adopt_pending(&mut st, now);
        self.expire_orphans(&mut st, now);
        while let Some(Reverse((at, key))) = st.timers.peek().copied() {
            if at > now {
                break;
            }
            st.timers.pop();
            let Some(slot) = st.sessions.get_mut(key) else {
                continue;
            };
            if slot.timer_at != Some(at) {
                continue; // superseded by an earlier deadline
            }
            slot.timer_at = None;
            let held = slot
                .conn
                .as_ref()
                .and_then(|c| c.held(now, self.publisher_hold()));
            if self.links_paused.get() || held.is_some() {
                // Not read while paused: not the client's silence.
                slot.session.excuse_silence(now);
            }
            slot.session.handle_timeout(now);
            self.drive(&mut st, key, now);
        }
        // After the timers: a connection released now was excused above
        // (its reader has not read what waited yet).
        self.ease_all(&mut st);
        if cfg!(debug_assertions) {
            Self::invariants(&st);
        }
    }

    /// Check every invariant of the shard and its store; panics naming the
    /// first that does not hold. Debug builds run it after every input
    /// (once per tick for a shard past 256
    /// sessions and stored messages); the simulator after every input, in
    /// release builds too.
    pub fn check_invariants(&self) {
        Self::invariants(&self.state.borrow());
    }

    /// The store's bookkeeping
    /// (`durable::invariants`), route refcounts equal the subscriber trie's
    /// entries, byte counters equal their sums, every
    /// client index points at its session, and no round-robin position
    /// outlives its shared subscription (memory that only grows).
    fn invariants(st: &State) {
        durable::invariants::check(st);
        // Route refcounts match the subscriber trie: per filter and share
        // name, the count is the number of local subscriptions; a filter's
        // persistent-subscriber mark counts its ordinary subscriptions of
        // persistent sessions.
        let persistent = |k: &SubKey| {
            st.sessions
                .get(k.session)
                .is_some_and(|s| s.durable.is_some())
        };
        let (mut counted, mut kept) = (0u64, 0u64);
        for ((filter, route), &count) in &st.local_routes {
            let (group, only_kept) = match route {
                RouteKey::Shard(_) => (None, false),
                RouteKey::Kept(_) => (None, true),
                RouteKey::Shared { pick, .. } => (Some(&pick.group), false),
                RouteKey::Node(_) | RouteKey::NodeShared { .. } => {
                    unreachable!("a remote node's route counted locally")
                }
            };
            let entries = st
                .subscribers
                .entries(filter)
                .filter(|(k, _)| k.group.as_ref() == group && (!only_kept || persistent(k)))
                .count();
            assert_eq!(
                entries, count as usize,
                "route refcount of {filter:?} ({route:?}) matches the subscriber trie"
            );
            match only_kept {
                true => kept += u64::from(count),
                false => counted += u64::from(count),
            }
        }
        assert_eq!(
            counted,
            st.subscribers.len() as u64,
            "every local subscription is counted in a route"
        );
        let mut of_persistent = 0u64;
        st.subscribers.for_each(|_, k, _| {
            if k.group.is_none() && persistent(k) {
                of_persistent += 1;
            }
        });
        assert_eq!(
            kept, of_persistent,
            "every ordinary subscription of a persistent session is marked"
        );
        let mut retained = 0u64;
        st.retained
            .for_each(|_, k| retained += k.message.cost_bytes() as u64);
        assert_eq!(retained, st.retained_bytes, "retained bytes match");
        let delayed: u64 = st.delayed.values().map(|m| m.cost_bytes() as u64).sum();
        assert_eq!(delayed, st.delayed_bytes, "delayed bytes match");
        for (id, &key) in &st.by_client {
            let slot = st.sessions.get(key).expect("an indexed session exists");
            assert_eq!(slot.session.client_id(), id, "the index names its session");
        }
        let mut connected = 0;
        let (mut queued, mut inflight) = (0u64, 0u64);
        for (key, slot) in st.sessions.iter() {
            slot.session.check_invariants();
            queued += u64::from(slot.counted_queued);
            inflight += u64::from(slot.counted_inflight);
            if let Some(conn) = &slot.conn {
                connected += 1;
                assert_eq!(conn.key, key, "a connection names its session");
                assert!(!conn.is_closing(), "an attached connection is open");
            }
        }
        assert_eq!(connected, st.stats.connections, "connections are counted");
        assert_eq!(queued, st.stats.queued, "queue lengths are counted");
        assert_eq!(inflight, st.stats.inflight, "in-flight counts are counted");
        for pick in st.shared_shard_next.keys() {
            let live = st.routes.entries(&pick.filter).any(|(k, _)| {
                matches!(k, RouteKey::Shared { pick: p, .. } | RouteKey::NodeShared { pick: p, .. }
                    if p == pick)
            });
            assert!(
                live,
                "a round-robin position outlived its shared subscription"
            );
        }
        for pick in st.shared_member_next.keys() {
            let live = st
                .local_routes
                .keys()
                .any(|(_, k)| matches!(k, RouteKey::Shared { pick: p, .. } if p == pick));
            assert!(live, "a member position outlived this shard's members");
        }
    }

    /// Stop: DISCONNECT 0x8B to every 5.0 client and close every
    /// connection; says what it closed.
    pub fn begin_stop(&self, now: Instant) -> StopReport {
        self.stopping.set(true);
        let mut st = self.state.borrow_mut();
        let mut report = StopReport {
            connections: st.stats.connections,
            ..StopReport::default()
        };
        let keys: Vec<SessionKey> = st.sessions.keys().collect();
        for key in keys {
            if let Some(slot) = st.sessions.get_mut(key) {
                let v5 = slot.conn.as_ref().is_some_and(|c| c.version.is_v5());
                report.disconnects_sent += usize::from(v5);
                slot.session.shutdown(now);
                self.drive(&mut st, key, now);
            }
        }
        report.sessions = st.sessions.len();
        report
    }

    /// What the log holds; `None` without durability.
    pub fn log_status(&self) -> Option<durable::LogStatus> {
        self.state
            .borrow()
            .store
            .as_ref()
            .map(durable::Store::status)
    }

    /// Acknowledgements from other shards the attached connections wait
    /// for (their output is held meanwhile): 0 once the mesh is quiet.
    pub fn held_acks(&self) -> u64 {
        let st = self.state.borrow();
        st.sessions
            .iter()
            .filter(|(_, slot)| slot.conn.is_some())
            .map(|(_, slot)| u64::from(slot.held_acks))
            .sum()
    }

    /// Per session whose output waits for acknowledgements from other
    /// shards: its key, its uid and how many.
    /// Each must be on its way exactly once, as a message in some shard's
    /// queues ([`ShardCore::for_each_queued_message`]) or on a lane that
    /// asks for it or is it ([`mesh::MeshMsg::awaited_ack`]); the
    /// simulator checks so after every input.
    pub fn awaited_acks(&self) -> Vec<(SessionKey, u64, u32)> {
        let st = self.state.borrow();
        st.sessions
            .iter()
            .filter(|(_, slot)| slot.held_acks > 0)
            .map(|(key, slot)| (key, slot.uid, slot.held_acks))
            .collect()
    }

    /// How many acknowledgements session `key` waits for, if it is the
    /// session `uid`.
    pub fn awaited_acks_of(&self, key: SessionKey, uid: u64) -> Option<u32> {
        let st = self.state.borrow();
        let slot = st.sessions.get(key).filter(|s| s.uid == uid)?;
        Some(slot.held_acks)
    }

    /// Every mesh message this core has queued and not yet handed to the
    /// runtime: the outbox, and (power-safe) what waits for a sync.
    pub fn for_each_queued_message(&self, mut f: impl FnMut(&mesh::MeshMsg)) {
        self.mesh.for_each_queued(&mut f);
        if let Some(store) = self.state.borrow().store.as_ref() {
            store.for_each_after_sync(&mut f);
        }
    }

    /// Connections still attached.
    pub fn connection_count(&self) -> usize {
        self.state.borrow().stats.connections
    }

    /// Sockets still open (attached, or closing and flushing).
    pub fn open_sockets(&self) -> usize {
        self.sockets.get()
    }

    /// True once [`ShardCore::begin_stop`] ran.
    pub fn is_stopping(&self) -> bool {
        self.stopping.get()
    }

    /// Sessions on this shard.
    pub fn session_count(&self) -> usize {
        self.state.borrow().sessions.len()
    }

    /// How long the housekeeping task sleeps between timer checks.
    pub const TICK: Duration = Duration::from_millis(50);
}
