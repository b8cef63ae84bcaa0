//! The cluster simulator: several nodes of `ShardCore`s and their
//! bridges (`shardmq::shard::bridge::Bridge`, the code the runtime runs)
//! on one thread, a virtual clock, mesh lanes and TCP links delivered in
//! a seeded order, and simulated clients.
//!
//! Each seed builds 2 or 3 nodes of 1 or 2 shards (memory durability; a
//! quarter of the seeds with a cluster secret that every link's handshake
//! proves, and another quarter with `kill_safe` logs on disks in memory,
//! each shard's log copied to a standby node, `cluster.replicas = 2`: a
//! node killed there loses its disk, as with memory durability), brings their links up from membership events, connects persistent
//! subscribers on every node (QoS 1 and 2, `t/#` and single topics) and
//! waits for their SUBACKs, then runs random steps: QoS 0/1/2 publishes
//! (some retained, some deleting a retained message) from publishers that
//! connect on any node and move between nodes (a new connection on another
//! node while the old one still stands: the cluster's claims must close
//! it), subscribers that lose their connection and come back, lane and
//! link deliveries (a link's bytes in pieces of any size), ticks and
//! outbox drains in any order. Half the seeds add faults: a link that
//! breaks, a partition between two sides (the links stall until their
//! keep-alive gives up; membership declares the other side down 1.5 to
//! 3 s later and up again after the heal), and a node killed and started
//! again as a new run. Every node runs the default minority policy
//! (`cluster.on_minority = refuse_connects`): while its membership shows
//! no more than half of the nodes up, a new CONNECT is refused (0x88) and
//! its client comes back later. A last phase heals everything, reconnects every
//! client and runs until the cluster is quiet, then checks:
//!
//! - every QoS 1/2 message the broker acknowledged reached every matching
//!   subscriber (QoS 1 at least once, QoS 2 exactly once) and one member
//!   of each matching shared group, with links breaking and nodes dying
//!   too: what is forgiven is what a subscriber's own session held when
//!   it died with its node (a standby's copy of its log is checked below,
//!   not served by a survivor yet), and, where
//!   partitions come, what crossed one when it formed (counted, reported);
//!   a shared group's message may reach a second member when the first
//!   member's node died or a partition cut it off (served again), and
//!   then come after later ones;
//! - seeds with logs, at each node's death: every acknowledged message
//!   owed to a subscriber whose session dies with the node and not yet
//!   delivered is in the session that a recovery of its standby's copy of
//!   the node's log gives back (checked when the standby held everything
//!   acknowledged: waited for, with a whole copy of every shard; the
//!   deaths not checked are counted);
//! - no publisher's acknowledgement is still held once the run settles;
//! - no QoS 2 delivery was ever duplicated;
//! - first deliveries from one connection of a publisher on one topic
//!   came in order;
//! - a client id has one live connection in the cluster: every older
//!   connection of a client that connected again on another node was
//!   closed by the broker;
//! - every node holds the same retained messages;
//! - after every input, `ShardCore::check_invariants`.
//!
//! `cargo test --release --test cluster_sim`; `SHARDMQ_CLUSTER_SEEDS=N`
//! runs N seeds (default 30), `SHARDMQ_CLUSTER_SEED=S` replays one,
//! `SHARDMQ_CLUSTER_FIRST=F` starts at F; `RUST_LOG=debug` prints the
//! broker's log lines. A seed replays exactly: the broker's hash maps are
//! seeded from it, and the simulator iterates nothing unordered.

#[path = "common/rng.rs"]
mod rng;
use rng::Rng;
#[path = "common/model.rs"]
mod model;
use model::{matches, resp, sub_options};

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use shardmq::cluster::frame::{Hello, BRIDGE_VERSION};
use shardmq::cluster::link::LinkSettings;
use shardmq::cluster::node::{Node, NodeName};
use shardmq::cluster::secret::ClusterSecret;
use shardmq::codec::{Connect, Packet, Properties, Publish, QoS, Subscribe, Version, Will};
use shardmq::log::disk::{Disk, MemDisk};
use shardmq::persist::recover::{recover, RecoverySettings};
use shardmq::persist::WallClock;
use shardmq::shard::admin::{AdminAnswer, AdminRequest};
use shardmq::shard::bridge::{Bridge, Dial, LinkId, PeerEvent};
use shardmq::shard::mesh::{Batch, Mesh};
use shardmq::shard::{Arrival, ConnHandle, Handshake, ShardCore};
use shardmq::Config;

/// Topics published on, and retained topics.
const TOPICS: u64 = 4;

#[derive(Debug, Clone)]
enum Role {
    Publisher,
    Subscriber {
        filter: String,
        qos: QoS,
    },
    /// Reads the retained messages of one node at the end.
    Probe,
}

struct Conn {
    node: usize,
    run: u64,
    shard: usize,
    /// When it attached, and the peer runs its home shard was linked to.
    since: Instant,
    linked: Vec<(u16, u64)>,
    handle: Rc<ConnHandle>,
    inbuf: BytesMut,
}

struct Client {
    id: String,
    version: Version,
    role: Role,
    /// Subscribers: the node they always connect to.
    home_node: usize,
    conn: Option<Conn>,
    /// Older connections the client left standing (it connected again
    /// elsewhere): the broker must close every one.
    stale: Vec<Conn>,
    next_pid: u16,
    /// Publishes not finished: packet id → (message seq, released).
    outgoing: BTreeMap<u16, (u64, bool)>,
    inbound: model::Inbound,
    /// Which connection of the client (order is kept per connection).
    epoch: u64,
    /// Subscribers: the step their subscription took effect in the
    /// session they have (None: not subscribed in it).
    subscribed_at: Option<u64>,
    connacked: bool,
    /// A move of its session was given up: two nodes held it for a while,
    /// and the messages each held may reach it out of their publisher's
    /// order when they meet (counted, not checked).
    split: bool,
    /// Subscribers: the steps at which a session of theirs died with its
    /// node or was cut short by a move (the messages it held with it).
    sessions_lost: Vec<u64>,
    /// How many CONNACKs told it that the session it had subscribed in
    /// was gone (Session Present 0).
    told_new: u64,
    /// Seeds with logs: its session was on a node that died since its
    /// last CONNACK; the next one tells whether a standby took it over
    /// (Session Present, with its subscription: a CONNECT whose CONNACK
    /// never came may have started a new session without it).
    maybe_lost: bool,
    /// It connected on a node other than its home node at least once (its
    /// session may have moved).
    roamed: bool,
    /// Seeds with logs: its session was on a node that died (a standby
    /// may have taken it over).
    taken_over: bool,
    next_seq: u64,
    /// Probes: topic → payload of the retained messages read.
    retained: BTreeMap<String, Bytes>,
    /// Publishers: the will of the last connection (its message seq).
    will_seq: Option<u64>,
    /// Each node's run when that connection's CONNACK came.
    will_runs: Vec<u64>,
}

/// What goes wrong in a seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Faults {
    None,
    /// Links broken (each side redials; membership sees nothing).
    Links,
    /// Nodes killed and started again; links and the network hold.
    Crashes,
    /// Broken links and partitions too.
    All,
}

/// A will whose node was killed while its connection was live, every
/// peer having it: owed by each node that then still ran the run it had
/// at CONNACK, once it hears that run of the node ended.
struct PendingWill {
    key: (usize, u64),
    node: usize,
    run: u64,
    runs: Vec<u64>,
}

/// A publisher's message in flight: (its number, released).
impl model::Sent for (u64, bool) {
    fn released(&mut self) -> &mut bool {
        &mut self.1
    }
}

#[derive(Debug, Clone)]
struct Sent {
    topic: String,
    qos: QoS,
    acked: bool,
    step: u64,
    epoch: u64,
    /// A will: owed once its node is killed while its connection is live
    /// and every peer had it (see `Sim::crash`), by the nodes other than
    /// this one.
    will_of: Option<usize>,
}

struct Pipe {
    /// (node, its run, shard, link id) of the dialing and the accepting end.
    ends: [(usize, u64, usize, LinkId); 2],
    /// Bytes written by end `i`, not yet read by the other.
    bytes: [VecDeque<Bytes>; 2],
    /// End `i` closed its socket: the other reads what is left, then EOF.
    closed: [bool; 2],
    /// Deliveries of other pipes' bytes since end `i`'s bytes were last
    /// delivered while they waited ([`PIPE_PASSED_MAX`]).
    passed: [u32; 2],
}

/// How many deliveries of other pipes' bytes may pass bytes waiting in a
/// pipe at most: a network without faults delivers every byte in bounded
/// time (a random pick alone once starved one direction of a link for
/// 5 s of simulated time, and its peer closed it as silent).
const PIPE_PASSED_MAX: u32 = 64;

struct NodeSim {
    name: NodeName,
    addr: SocketAddr,
    run: u64,
    up: bool,
    cores: Vec<Rc<ShardCore>>,
    bridges: Vec<Bridge>,
    lanes: BTreeMap<(usize, usize), VecDeque<Batch>>,
    /// Peers this node's membership has up, by index.
    view: BTreeMap<usize, Node>,
    /// New CONNECTs refused: the node sees no majority of the members
    /// (`cluster.on_minority = refuse_connects`, the default).
    refusing: bool,
    /// Seeds with a log: this run's disk (a new run starts with an empty
    /// one: what the node held is gone, as with memory durability) and
    /// its wall clock.
    disk: Option<Arc<MemDisk>>,
    wall: Option<WallClock>,
}

struct Sim {
    rng: Rng,
    seed: u64,
    now: Instant,
    steps: u64,
    config: Config,
    shards: usize,
    nodes: Vec<NodeSim>,
    pipes: BTreeMap<u64, Pipe>,
    next_pipe: u64,
    /// Node pairs cut from each other.
    cut: BTreeSet<(usize, usize)>,
    /// Membership changes due: (when, at node, its run then, event). An
    /// Up names the run that is current when it is told (membership never
    /// brings back a run it knows was replaced).
    due: Vec<(Instant, usize, u64, PeerEvent)>,
    /// A node started again before every peer declared its last run down
    /// (a peer may take that run's sessions over while the new run
    /// recovers its own log).
    restart_raced: bool,
    clients: Vec<Client>,
    sent: BTreeMap<(usize, u64), Sent>,
    /// How often each message reached each client, and how many times
    /// the client had been told its session was gone when it last did.
    delivered: HashMap<(usize, usize, u64), (u32, u64)>,
    last_first: HashMap<(usize, usize, u64, String), u64>,
    faults: Faults,
    /// Publishers' live connections: whether every peer had the will
    /// when CONNACK came (set then).
    will_known: HashMap<usize, bool>,
    pending_wills: Vec<PendingWill>,
    /// Wills: the nodes that owe each.
    owed_by: HashMap<(usize, u64), Vec<usize>>,
    /// Shared group deliveries: the member that got each message.
    group_got: HashMap<(usize, u64), usize>,
    /// Subscribers whose session a crash took: what was owed before is
    /// not any more.
    lost_sessions: u64,
    /// Seeds with logs: acknowledgements that went without a peer's
    /// confirmation after the bridge's 10 s (counted, not failed).
    late_acks: u64,
    /// Sessions taken over from dead nodes' log copies, and messages
    /// routed to a dead node given to them (`adopt`), and copies of
    /// sessions dropped as stale (their client was told first that its
    /// session was new).
    adopted: (u64, u64, u64),
    /// See `Outcome::orphans`.
    orphans: (u64, u64, u64, u64, u64),
    /// Seeds with logs, nodes killed: (deaths whose standby's copy was
    /// not checked: no single standby waited for all along, or no whole
    /// copy; copies recovered and checked; undelivered acknowledged
    /// messages found in them).
    copies: (u64, u64, u64),
    /// CONNECTs refused (0x88): a peer did not answer in time, or a
    /// peer's claim came first.
    refused: u64,
    /// CONNECTs refused (0x88) by a node that saw no majority.
    minority_refused: u64,
    routes_refused: u64,
    /// CONNECTs resuming a session refused (0x88) while a dead node's
    /// sessions may still be taken over.
    adoption_refused: u64,
    /// Subscribers of a node with a log that died, told by their next
    /// CONNACK that their session is gone (not taken over, or taken over
    /// too late).
    told_gone: u64,
    /// QoS 2 messages a client had in a session it was later told was
    /// gone, delivered again to the session it started anew.
    again_after_loss: u64,
    /// Publishes a client held back because its shard did not read it (a
    /// peer held too many of the shard's messages unconfirmed, or a
    /// subscriber behind held it).
    link_pauses: u64,
    /// Subscribers whose session's move a node gave up.
    splits: u64,
    crashes: u64,
    partitions: u64,
    breaks: u64,
}

fn hello(node: &NodeSim, shard: usize, shards: usize) -> Hello {
    Hello {
        version: BRIDGE_VERSION,
        cluster_tag: 7,
        node: node.name.clone(),
        incarnation: node.run,
        addr: node.addr,
        shard: shard as u16,
        shards: shards as u16,
        auth: false,
        nonce: 0,
    }
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let n = 2 + rng.below(2) as usize;
        let shards = 1 + rng.below(2) as usize;
        let faults = match rng.below(8) {
            0..=2 => Faults::None,
            3 => Faults::Links,
            4 | 5 => Faults::Crashes,
            _ => Faults::All,
        };
        let mut config = Config::default();
        config.server.shards = shards;
        config.storage.durability = "memory".into();
        config.mqtt.queue_messages_max = 100_000;
        config.mqtt.inflight_max = 1 + rng.below(8) as u16;
        // A third of the seeds keep links short: at most 2 KiB of messages
        // (about 15) unconfirmed per peer, so that publishers are paused
        // (`ShardCore::links_full`) rather than have messages dropped.
        if seed % 3 == 2 {
            config.mqtt.packet_size_max_bytes = 960;
            config.cluster.link_queue_bytes_max = 2048;
        }
        // A quarter of the seeds keep logs (kill_safe, on disks in
        // memory), each shard's copied to a standby (`cluster.replicas =
        // 2`): what a node acknowledges waits for its standby's copy.
        if seed % 4 == 3 {
            config.storage.durability = "kill_safe".into();
            config.storage.segment_bytes = 256 << 10;
            config.mqtt.packet_size_max_bytes = config.mqtt.packet_size_max_bytes.min(64 << 10);
        }
        let nodes = (0..n)
            .map(|k| NodeSim {
                name: NodeName::new(&format!("n{k}")).unwrap(),
                addr: SocketAddr::from(([10, 0, 0, 1 + k as u8], 7000)),
                run: 0,
                up: false,
                cores: Vec::new(),
                bridges: Vec::new(),
                lanes: BTreeMap::new(),
                view: BTreeMap::new(),
                refusing: false,
                disk: None,
                wall: None,
            })
            .collect();
        let mut sim = Sim {
            rng,
            seed,
            now: Instant::now(),
            steps: 0,
            config,
            shards,
            nodes,
            pipes: BTreeMap::new(),
            next_pipe: 0,
            cut: BTreeSet::new(),
            due: Vec::new(),
            restart_raced: false,
            clients: Vec::new(),
            sent: BTreeMap::new(),
            delivered: HashMap::new(),
            last_first: HashMap::new(),
            faults,
            will_known: HashMap::new(),
            pending_wills: Vec::new(),
            owed_by: HashMap::new(),
            group_got: HashMap::new(),
            lost_sessions: 0,
            copies: (0, 0, 0),
            late_acks: 0,
            adopted: (0, 0, 0),
            orphans: (0, 0, 0, 0, 0),
            refused: 0,
            minority_refused: 0,
            routes_refused: 0,
            adoption_refused: 0,
            told_gone: 0,
            again_after_loss: 0,
            link_pauses: 0,
            splits: 0,
            crashes: 0,
            partitions: 0,
            breaks: 0,
        };
        for k in 0..n {
            sim.start_node(k);
        }
        // Every node sees every other up at once.
        for k in 0..n {
            for p in 0..n {
                if p != k {
                    let node = sim.run_of(p);
                    sim.peer_event(
                        k,
                        PeerEvent::Up {
                            index: p as u16,
                            node,
                        },
                    );
                }
            }
        }
        for k in 0..n {
            for s in 0..2 {
                let qos = if s == 0 {
                    QoS::AtLeastOnce
                } else {
                    QoS::ExactlyOnce
                };
                let filter = if sim.rng.chance(500) {
                    "t/#".to_string()
                } else {
                    format!("t/{}", sim.rng.below(TOPICS))
                };
                sim.add_client(Role::Subscriber { filter, qos }, k);
            }
            // A member of one shared group, and a subscriber to the wills.
            let filter = "$share/g/t/#".to_string();
            let qos = QoS::AtLeastOnce;
            sim.add_client(Role::Subscriber { filter, qos }, k);
            let filter = "w/#".to_string();
            sim.add_client(Role::Subscriber { filter, qos }, k);
        }
        for _ in 0..2 + sim.rng.below(3) {
            let k = sim.rng.below(n as u64) as usize;
            sim.add_client(Role::Publisher, k);
        }
        sim
    }

    fn fail(&self, why: &str) -> ! {
        panic!("seed {}: step {}: {why}", self.seed, self.steps)
    }

    fn run_of(&self, k: usize) -> Node {
        let n = &self.nodes[k];
        Node::new(n.name.clone(), n.addr, n.run, self.shards as u16)
    }

    fn start_node(&mut self, k: usize) {
        let shards = self.shards;
        let mut config = self.config.clone();
        config.cluster.node_id = self.nodes[k].name.to_string();
        // Every node is a member from the start (as its MEMBERS file
        // says): alone, a node of two or three sees no majority.
        let refuse = self.nodes.len() > 1;
        let node = &mut self.nodes[k];
        node.run += 1;
        node.up = true;
        node.refusing = refuse;
        node.view.clear();
        node.lanes.clear();
        let boot = node.run * 1000 + k as u64;
        node.cores = (0..shards)
            .map(|id| {
                let mesh = Mesh::new(id, shards, config.mesh.outbox_messages_max);
                Rc::new(ShardCore::new(id, shards, config.clone(), mesh, boot))
            })
            .collect();
        let wall = WallClock::at(self.now, 1_800_000_000_000 + self.steps);
        node.wall = Some(wall);
        node.disk = None;
        if config.storage.durability != "memory" {
            let disk = Arc::new(MemDisk::new());
            let settings = RecoverySettings {
                data_dir: "/data".into(),
                shards,
                segment_bytes: config.storage.segment_bytes,
                clock: Some(wall),
                disk: Some(disk.clone()),
            };
            let recovery = recover(&settings).expect("an empty disk recovers");
            for (j, start) in recovery.shards.into_iter().enumerate() {
                node.cores[j].restore(start, &recovery.routes, recovery.clock, self.now);
            }
            node.disk = Some(disk);
        }
        let settings = LinkSettings {
            frame_bytes_max: shardmq::cluster::link::frame_bytes_max(&config),
            out_bytes_max: config.cluster.link_queue_bytes_max,
            ping_after_ms: 1_000,
            dead_after_ms: 5_000,
            // A quarter of the seeds run with a cluster secret: every link
            // proves it in its handshake.
            secret: (self.seed % 4 == 1).then(|| {
                let key = ClusterSecret::new(b"the simulated cluster's secret").unwrap();
                Arc::new(key)
            }),
            nonce_seed: (self.seed ^ node.run)
                .to_be_bytes()
                .repeat(2)
                .try_into()
                .unwrap(),
        };
        node.bridges = (0..shards)
            .map(|j| {
                Bridge::new(
                    node.cores[j].clone(),
                    hello(node, j, shards),
                    settings.clone(),
                    config.cluster.routes_max,
                    refuse,
                    self.now,
                    wall,
                )
            })
            .collect();
    }

    fn peer_event(&mut self, k: usize, ev: PeerEvent) {
        if !self.nodes[k].up {
            return;
        }
        // A run that ended, as node k learns it: the wills it had go out.
        let ended = match &ev {
            PeerEvent::Down { index, node } => Some((usize::from(*index), node.incarnation + 1)),
            PeerEvent::Up { index, node } => Some((usize::from(*index), node.incarnation)),
            PeerEvent::Quorum { .. } => None,
        };
        if let Some((p, newer)) = ended {
            let run = self.nodes[k].run;
            let owed_by = &mut self.owed_by;
            self.pending_wills.retain(|w| {
                if w.node != p || w.run >= newer || w.runs[k] != run {
                    return true;
                }
                let by = owed_by.entry(w.key).or_default();
                if !by.contains(&k) {
                    by.push(k);
                }
                true
            });
        }
        match &ev {
            PeerEvent::Up { index, node } => {
                self.nodes[k].view.insert(*index as usize, node.clone());
            }
            PeerEvent::Down { index, node } => {
                if self.nodes[k].view.get(&(*index as usize)) == Some(node) {
                    self.nodes[k].view.remove(&(*index as usize));
                }
            }
            PeerEvent::Quorum { .. } => {}
        }
        for j in 0..self.shards {
            self.nodes[k].bridges[j].on_peer_event(self.now, ev.clone());
            self.after(k, j);
        }
        // A majority is more than half the members up, this node included
        // (`cluster::quorum`).
        let refuse = 2 * (1 + self.nodes[k].view.len()) <= self.nodes.len();
        if refuse != self.nodes[k].refusing {
            self.nodes[k].refusing = refuse;
            self.event(format_args!("node {k} refuses new CONNECTs: {refuse}"));
            for j in 0..self.shards {
                let ev = PeerEvent::Quorum { refuse };
                self.nodes[k].bridges[j].on_peer_event(self.now, ev);
                self.after(k, j);
            }
        }
    }

    /// After any input to shard `j` of node `k`: its mesh batches onto
    /// the lanes, the links its bridge closed, its invariants.
    fn after(&mut self, k: usize, j: usize) {
        let node = &mut self.nodes[k];
        if !node.up {
            return;
        }
        let core = &node.cores[j];
        core.check_invariants();
        for (to, batch) in core.mesh().poll_batches() {
            core.mesh().sent(batch.len());
            node.lanes.entry((j, to)).or_default().push_back(batch);
        }
        let run = node.run;
        while let Some(id) = node.bridges[j].poll_closed() {
            for p in self.pipes.values_mut() {
                for e in 0..2 {
                    let (pk, prun, pj, pid) = p.ends[e];
                    if (pk, prun, pj, pid) == (k, run, j, id) {
                        p.closed[e] = true;
                        p.bytes[1 - e].clear();
                    }
                }
            }
        }
    }

    fn add_client(&mut self, role: Role, home_node: usize) -> usize {
        let c = self.clients.len();
        let version = if self.rng.chance(500) {
            Version::V5
        } else {
            Version::V3_1_1
        };
        self.clients.push(Client {
            id: format!("c{c}"),
            version,
            role,
            home_node,
            conn: None,
            stale: Vec::new(),
            next_pid: 0,
            outgoing: BTreeMap::new(),
            inbound: model::Inbound::default(),
            epoch: 0,
            subscribed_at: None,
            connacked: false,
            split: false,
            sessions_lost: Vec::new(),
            told_new: 0,
            maybe_lost: false,
            roamed: false,
            taken_over: false,
            next_seq: 0,
            retained: BTreeMap::new(),
            will_seq: None,
            will_runs: Vec::new(),
        });
        self.connect(c, home_node);
        c
    }

    fn live_nodes(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&k| self.nodes[k].up)
            .collect()
    }

    /// Client `c` connects on node `k` (a publisher: a clean session; a
    /// subscriber: its persistent one). An older connection stays open.
    fn connect(&mut self, c: usize, k: usize) {
        if !self.nodes[k].up {
            return;
        }
        if self.traces(c) {
            eprintln!(
                "step {} {} CONNECT on node {k} (a publisher's will: {c}:{})",
                self.steps,
                self.clients[c].id,
                self.clients[c].next_seq + 1
            );
        }
        // The minority side of a partition refuses new CONNECTs, and so
        // does a node without the routes of every node it sees up: the
        // client comes back later, its state as it was (an older
        // connection stays, its will and what it has in flight with it).
        let accepting = self.rng.below(self.shards as u64) as usize;
        let no_routes = self.nodes[k].cores[accepting].routes_pending();
        if self.nodes[k].refusing || no_routes {
            let probe = Connect {
                version: self.clients[c].version,
                clean_start: true,
                keep_alive: 0,
                client_id: self.clients[c].id.clone(),
                will: None,
                username: None,
                password: None,
                properties: Properties::default(),
            };
            let core = &self.nodes[k].cores[accepting];
            match core.handshake(&probe, Arrival::LOOPBACK, self.now) {
                Handshake::Refuse { code: 0x88, .. } if no_routes => {
                    self.routes_refused += 1;
                    return;
                }
                Handshake::Refuse { code: 0x88, .. } => {
                    self.minority_refused += 1;
                    return;
                }
                _ => self.fail("a node without a majority or routes took a CONNECT"),
            }
        }
        let client = &mut self.clients[c];
        let clean = !matches!(client.role, Role::Subscriber { .. });
        if clean {
            client.outgoing.clear();
        }
        let mut properties = Properties::default();
        if client.version == Version::V5 && !clean {
            properties.session_expiry_interval = Some(u32::MAX);
        }
        let will = matches!(client.role, Role::Publisher).then(|| {
            client.next_seq += 1;
            let seq = client.next_seq;
            client.will_seq = Some(seq);
            Will {
                topic: format!("w/{c}").into(),
                payload: Bytes::from(format!("{c}:{seq}")),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Properties::default(),
            }
        });
        if let Some(w) = &will {
            let seq = self.clients[c].next_seq;
            let sent = Sent {
                topic: w.topic.to_string(),
                qos: QoS::AtLeastOnce,
                acked: false,
                step: self.steps,
                epoch: self.clients[c].epoch + 1,
                will_of: None,
            };
            self.sent.insert((c, seq), sent);
        }
        let client = &mut self.clients[c];
        let connect = Connect {
            version: client.version,
            clean_start: clean,
            keep_alive: 0,
            client_id: client.id.clone(),
            will,
            username: None,
            password: None,
            properties,
        };
        let cores = &self.nodes[k].cores;
        let (home, assigned) =
            match cores[accepting].handshake(&connect, Arrival::LOOPBACK, self.now) {
                Handshake::Serve { assigned, .. } => (accepting, assigned),
                Handshake::MoveTo { home, assigned, .. } => (home, assigned),
                // A dead node's sessions may still be taken over: a
                // resuming client comes back later, as it was.
                Handshake::Refuse { code: 0x88, .. } if !clean => {
                    self.adoption_refused += 1;
                    return;
                }
                Handshake::Refuse { code, .. } => {
                    self.fail(&format!("CONNECT refused 0x{code:02X}"))
                }
            };
        let handle = match cores[home].attach(self.now, Box::new(connect), assigned) {
            Ok(h) => h,
            Err(code) => self.fail(&format!("attach refused 0x{code:02X}")),
        };
        let run = self.nodes[k].run;
        let client = &mut self.clients[c];
        if let Some(old) = client.conn.take() {
            if old.node == k && old.run == run {
                // On one node, a takeover closes it at once.
            } else {
                client.stale.push(old);
            }
        }
        client.epoch += 1;
        client.connacked = false;
        let mut linked = self.nodes[k].bridges[home].linked_runs();
        linked.sort_unstable();
        let client = &mut self.clients[c];
        client.conn = Some(Conn {
            node: k,
            run,
            shard: home,
            since: self.now,
            linked,
            handle,
            inbuf: BytesMut::new(),
        });
        self.after(k, home);
    }

    fn send(&mut self, c: usize, packet: Packet) {
        let Some(conn) = &self.clients[c].conn else {
            return;
        };
        let (k, j, handle) = (conn.node, conn.shard, conn.handle.clone());
        if handle.is_closing() {
            return;
        }
        if self.traces(c) {
            eprintln!(
                "step {} {} ({k}, {j}) -> {packet:?}",
                self.steps, self.clients[c].id
            );
        }
        self.nodes[k].cores[j].handle_packet(&handle, self.now, packet);
        self.after(k, j);
    }

    /// Read what the broker wrote to client `c` and answer.
    fn read(&mut self, c: usize) {
        loop {
            let Some(conn) = &mut self.clients[c].conn else {
                return;
            };
            let (k, j, handle) = (conn.node, conn.shard, conn.handle.clone());
            let version = self.clients[c].version;
            let mut packets = Vec::new();
            let closing = handle.is_closing();
            if closing {
                packets.extend(handle.poll_last_packets());
            } else {
                let mut out = BytesMut::new();
                self.nodes[k].cores[j].poll_transmit(&handle, &mut out, 1 << 20);
                self.after(k, j);
                let conn = self.clients[c].conn.as_mut().unwrap();
                packets.extend(model::packets(&mut conn.inbuf, &out, version));
            }
            let got = !packets.is_empty();
            for p in packets {
                self.on_packet(c, p);
            }
            if closing {
                self.clients[c].conn = None;
                return;
            }
            if !got {
                return;
            }
        }
    }

    fn event(&self, what: std::fmt::Arguments<'_>) {
        if std::env::var("SHARDMQ_CLUSTER_TRACE").is_ok() {
            eprintln!("step {} {what}", self.steps);
        }
    }

    fn traces(&self, c: usize) -> bool {
        std::env::var("SHARDMQ_CLUSTER_TRACE").is_ok_and(|t| t == self.clients[c].id || t == "all")
    }

    fn on_packet(&mut self, c: usize, packet: Packet) {
        if self.traces(c) {
            let conn = self.clients[c].conn.as_ref().map(|c| (c.node, c.shard));
            eprintln!(
                "step {} {} {conn:?} <- {packet:?}",
                self.steps, self.clients[c].id
            );
        }
        match packet {
            Packet::ConnAck(ack) => {
                if ack.reason == 0x88 {
                    // A peer did not answer its claim in time (it may
                    // hold the session), or a peer's claim as late by the
                    // clocks came first: refused, it comes back later.
                    self.refused += 1;
                    self.clients[c].conn = None;
                    return;
                }
                if ack.reason != 0 {
                    self.fail(&format!(
                        "{} refused: 0x{:02X}",
                        self.clients[c].id, ack.reason
                    ));
                }
                if let (Role::Publisher, Some(conn)) =
                    (&self.clients[c].role, &self.clients[c].conn)
                {
                    // Every peer has its will when its home shard's links
                    // to every live run were up when it attached and still
                    // are, and CONNACK came before CLAIM_WAIT (2 s): it
                    // waited for their acknowledgements of its claim, sent
                    // after the will on the same links (after CLAIM_WAIT it
                    // goes without them).
                    let (k, j) = (conn.node, conn.shard);
                    let live: Vec<(u16, u64)> = self
                        .live_nodes()
                        .into_iter()
                        .filter(|&p| p != k)
                        .map(|p| (p as u16, self.nodes[p].run))
                        .collect();
                    let mut linked = self.nodes[k].bridges[j].linked_runs();
                    linked.sort_unstable();
                    let in_time = self.now < conn.since + Duration::from_millis(1900);
                    let known = in_time && linked == live && conn.linked == live;
                    self.will_known.insert(c, known);
                    let runs = self
                        .nodes
                        .iter()
                        .map(|n| if n.up { n.run } else { 0 })
                        .collect();
                    self.clients[c].will_runs = runs;
                }
                let adopted = self.clients[c].maybe_lost && ack.session_present;
                if self.clients[c].maybe_lost && !ack.session_present {
                    self.told_gone += 1;
                }
                let kept = ack.session_present
                    && (!self.clients[c].maybe_lost || self.holds_subscription(c));
                let client = &mut self.clients[c];
                // A session a standby took over: what it held and what
                // came to the new node since may meet out of their
                // publisher's order (seed 7124: the dead node had
                // delivered a publisher's later message before an earlier
                // one reached it, which the copy then brought), as in a
                // split.
                if adopted && !client.split {
                    client.split = true;
                    self.splits += 1;
                }
                client.connacked = true;
                client.maybe_lost = false;
                match client.role.clone() {
                    Role::Subscriber { filter, qos } => {
                        if client.subscribed_at.is_some() && !kept {
                            // Only faults may take it: a crash of its
                            // node, a move cut short.
                            if self.faults == Faults::None {
                                let id = client.id.clone();
                                self.fail(&format!("{id}: its session was lost"));
                            }
                            client.subscribed_at = None;
                            client.inbound.clear();
                            client.sessions_lost.push(self.steps);
                            client.told_new += u64::from(!ack.session_present);
                            self.lost_sessions += 1;
                            // Order holds within a session (what a node
                            // took over may join the new one).
                            self.last_first.retain(|k, _| k.0 != c);
                        }
                        let client = &mut self.clients[c];
                        if client.subscribed_at.is_none() {
                            let pid = client.pid();
                            let sub = Subscribe {
                                packet_id: pid,
                                filters: vec![(filter, sub_options(qos))],
                                properties: Properties::default().into(),
                            };
                            self.send(c, Packet::Subscribe(sub));
                        }
                    }
                    Role::Probe => {
                        let pid = client.pid();
                        let sub = Subscribe {
                            packet_id: pid,
                            filters: vec![("r/#".into(), sub_options(QoS::AtLeastOnce))],
                            properties: Properties::default().into(),
                        };
                        self.send(c, Packet::Subscribe(sub));
                    }
                    Role::Publisher => {}
                }
            }
            Packet::Publish(p) => self.on_publish(c, p),
            Packet::PubAck(r) => {
                if let Some((seq, _)) = self.clients[c].outgoing.remove(&r.packet_id) {
                    self.acked(seq, r.reason);
                }
            }
            Packet::PubRec(r) => {
                let pid = r.packet_id;
                let (acked, release) = model::pubrec(&mut self.clients[c].outgoing, pid, r.reason);
                if let Some((seq, _)) = acked {
                    self.acked(seq, r.reason);
                }
                if release {
                    self.send(c, Packet::PubRel(resp(pid)));
                }
            }
            Packet::PubComp(r) => {
                self.clients[c].outgoing.remove(&r.packet_id);
            }
            Packet::PubRel(r) => {
                let comp = self.clients[c].inbound.release(r.packet_id);
                self.send(c, comp);
            }
            Packet::SubAck(ack) => {
                if ack.reasons.iter().any(|&r| r >= 0x80) {
                    self.fail(&format!("SUBACK refused: {:?}", ack.reasons));
                }
                let steps = self.steps;
                let client = &mut self.clients[c];
                if client.subscribed_at.is_none() {
                    client.subscribed_at = Some(steps);
                }
            }
            Packet::Disconnect(_) | Packet::PingResp | Packet::UnsubAck(_) => {}
            other => self.fail(&format!("a client got {other:?}")),
        }
    }

    fn acked(&mut self, seq_key: u64, reason: u8) {
        if reason < 0x80 {
            if let Some(s) = self.sent.get_mut(&unpack(seq_key)) {
                s.acked = true;
            }
        }
    }

    fn on_publish(&mut self, c: usize, p: Publish) {
        let text = std::str::from_utf8(&p.payload).expect("payloads are text");
        if let Role::Probe = self.clients[c].role {
            if p.qos == QoS::AtLeastOnce {
                self.send(c, Packet::PubAck(resp(p.packet_id)));
            }
            if p.retain {
                self.clients[c]
                    .retained
                    .insert(p.topic.to_string(), p.payload.clone());
            }
            return;
        }
        let mut fields = text.split(':');
        let (from, seq) = (fields.next().unwrap(), fields.next().expect("pub:seq"));
        let (from, seq): (usize, u64) = (from.parse().unwrap(), seq.parse().unwrap());
        let Some(sent) = self.sent.get(&(from, seq)).cloned() else {
            self.fail(&format!("delivered {text}, never published"));
        };
        if *p.topic != *sent.topic {
            self.fail(&format!(
                "{text} delivered on {}, sent on {}",
                p.topic, sent.topic
            ));
        }
        let (answer, fresh) = self.clients[c].inbound.publish(&p);
        if let Some(answer) = answer {
            self.send(c, answer);
        }
        if !fresh {
            return;
        }
        let shared = matches!(&self.clients[c].role,
            Role::Subscriber { filter, .. } if filter.starts_with("$share/"));
        if shared {
            let first = *self.group_got.entry((from, seq)).or_insert(c);
            // The member it went to is on a node declared down before it
            // confirmed the message: the publisher's node serves it with
            // another member, QoS 2 too (the README says why). So one whose
            // session died with its node, and where partitions cut nodes
            // off, one on each side. In seeds with logs, the session of
            // the member that died comes back (its node's standby takes
            // it over) and delivers it too, maybe after the other.
            let died = |m: usize| (self.clients[m].sessions_lost.iter()).any(|&at| at >= sent.step);
            let died = died(first) || died(c);
            if first != c && !died && self.faults != Faults::All {
                self.fail(&format!(
                    "{text} reached two members of the shared group: {} and {}",
                    self.clients[first].id, self.clients[c].id
                ));
            }
        }
        let told_new = self.clients[c].told_new;
        let (n, told_then) = self
            .delivered
            .entry((c, from, seq))
            .or_insert((0, told_new));
        *n += 1;
        // QoS 2 is once per session: a client told since its last copy
        // that its session was gone (a partition kept it on the other
        // side) may get the message again in the new one, when its
        // publisher's node routed it to this node before and delivers it
        // only now (seed 31674: a publish at step 250 held on a link until
        // a heal at step 1500, fanned out to the subscription the new
        // session made at step 1310).
        let (n, lost_since) = (*n, std::mem::replace(told_then, told_new) < told_new);
        if n > 1 && p.qos == QoS::ExactlyOnce && lost_since {
            self.again_after_loss += 1;
        } else if n > 1 && p.qos == QoS::ExactlyOnce {
            self.fail(&format!(
                "{text} delivered twice at QoS 2 to {}",
                self.clients[c].id
            ));
        }
        let first = n == 1;
        self.note_splits();
        // A member of a shared group may get a message served again after
        // later ones (its first member's node died), so its order is not
        // checked where nodes die.
        let nodes_die = matches!(self.faults, Faults::Crashes | Faults::All);
        let unchecked = self.clients[c].split || (shared && nodes_die);
        if first
            && !unchecked
            && p.qos != QoS::AtMostOnce
            && sent.qos != QoS::AtMostOnce
            && !p.retain
        {
            let key = (c, from, sent.epoch, sent.topic.clone());
            if let Some(&last) = self.last_first.get(&key) {
                if seq < last {
                    self.fail(&format!(
                        "{} got {text} after {from}:{last} on {}: out of order",
                        self.clients[c].id, sent.topic
                    ));
                }
            }
            self.last_first.insert(key, seq);
        }
    }

    /// Mark the clients whose session's move a node gave up.
    fn note_splits(&mut self) {
        for core in self.nodes.iter().flat_map(|n| &n.cores) {
            for id in core.take_moves_given_up() {
                if let Some(client) = self.clients.iter_mut().find(|c| *c.id == *id) {
                    self.splits += u64::from(!client.split);
                    client.split = true;
                }
            }
        }
    }

    fn publish_next(&mut self, c: usize) {
        let Some(conn) = &self.clients[c].conn else {
            return;
        };
        if !self.clients[c].connacked || conn.handle.is_closing() {
            return;
        }
        if self.clients[c].outgoing.len() >= 8 {
            return;
        }
        // Its shard does not read it while a peer holds too many of the
        // shard's messages unconfirmed: the client waits.
        if self.nodes[conn.node].cores[conn.shard].links_full() {
            self.link_pauses += 1;
            return;
        }
        // Nor while a subscriber behind holds it (`shard::pressure`).
        let limit = self.nodes[conn.node].cores[conn.shard].publisher_hold();
        if conn.handle.held(self.now, limit).is_some() {
            self.link_pauses += 1;
            return;
        }
        let qos = match self.rng.below(4) {
            0 => QoS::AtMostOnce,
            1 | 2 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        let retained = self.rng.chance(100);
        let topic = if retained {
            format!("r/{}", self.rng.below(TOPICS))
        } else {
            format!("t/{}", self.rng.below(TOPICS))
        };
        let client = &mut self.clients[c];
        client.next_seq += 1;
        let seq = client.next_seq;
        let pid = if qos == QoS::AtMostOnce {
            0
        } else {
            client.pid()
        };
        if qos != QoS::AtMostOnce {
            client.outgoing.insert(pid, (pack(c, seq), false));
        }
        let payload = if retained && self.rng.chance(200) {
            Bytes::new() // deletes the retained message
        } else {
            Bytes::from(format!("{c}:{seq}"))
        };
        self.sent.insert(
            (c, seq),
            Sent {
                topic: topic.clone(),
                qos,
                acked: false,
                step: self.steps,
                epoch: client.epoch,
                will_of: None,
            },
        );
        let p = Publish {
            dup: false,
            qos,
            retain: retained,
            topic: topic.into(),
            packet_id: pid,
            properties: Properties::default().into(),
            payload,
        };
        self.send(c, Packet::Publish(p));
    }

    // ---- the network ----

    /// Make the dials node `k`'s shard `j` asks for.
    fn dial(&mut self, k: usize, j: usize) {
        let dials = self.nodes[k].bridges[j].poll_dials(self.now);
        for d in dials {
            self.dial_one(k, j, d);
        }
        self.after(k, j);
    }

    fn dial_one(&mut self, k: usize, j: usize, d: Dial) {
        let target = (0..self.nodes.len())
            .find(|&t| self.nodes[t].up && self.nodes[t].addr.ip() == d.addr.ip() && t != k);
        let reachable = target.filter(|&t| !self.is_cut(k, t));
        let Some(t) = reachable else {
            self.nodes[k].bridges[j].dial_failed(self.now, &d, "unreachable");
            return;
        };
        let tj = usize::from(d.addr.port() - self.nodes[t].addr.port());
        let Some((accepted, _)) = self.nodes[t].bridges[tj].accepted(self.now) else {
            self.nodes[k].bridges[j].dial_failed(self.now, &d, "refused");
            return;
        };
        let dialed = self.nodes[k].bridges[j].dialed(self.now, &d);
        let id = self.next_pipe;
        self.next_pipe += 1;
        let mut pipe = Pipe {
            ends: [
                (k, self.nodes[k].run, j, 0),
                (t, self.nodes[t].run, tj, accepted),
            ],
            bytes: [VecDeque::new(), VecDeque::new()],
            closed: [false, false],
            passed: [0, 0],
        };
        match dialed {
            Some((link, _)) => pipe.ends[0].3 = link,
            None => pipe.closed[0] = true,
        }
        self.pipes.insert(id, pipe);
        self.after(t, tj);
    }

    fn is_cut(&self, a: usize, b: usize) -> bool {
        self.cut.contains(&(a.min(b), a.max(b)))
    }

    /// Move what every live end of every pipe has to write into the pipe.
    fn collect_writes(&mut self) {
        self.pipes.retain(|_, p| !(p.closed[0] && p.closed[1]));
        let ids: Vec<u64> = self.pipes.keys().copied().collect();
        for id in ids {
            for e in 0..2 {
                let p = &self.pipes[&id];
                if p.closed[e] {
                    continue;
                }
                let (k, run, j, link) = p.ends[e];
                if !self.nodes[k].up || self.nodes[k].run != run {
                    continue;
                }
                let mut out = Vec::new();
                while let Some(b) = self.nodes[k].bridges[j].poll_transmit(link) {
                    out.push(b.freeze());
                }
                let wrote = !out.is_empty();
                self.pipes.get_mut(&id).unwrap().bytes[e].extend(out);
                if wrote {
                    self.nodes[k].bridges[j].written(self.now, link);
                    self.after(k, j);
                }
            }
        }
    }

    /// Deliver some of what one pipe carries (or its end).
    fn deliver_pipe(&mut self) -> bool {
        self.collect_writes();
        let mut ready: Vec<(u64, usize)> = Vec::new();
        for (&id, p) in &self.pipes {
            let (a, b) = (p.ends[0].0, p.ends[1].0);
            if self.is_cut(a, b) {
                continue;
            }
            for e in 0..2 {
                if !p.bytes[e].is_empty() || (p.closed[e] && !p.closed[1 - e]) {
                    ready.push((id, e));
                }
            }
        }
        if ready.is_empty() {
            return false;
        }
        let starved = ready
            .iter()
            .find(|&&(id, e)| self.pipes[&id].passed[e] >= PIPE_PASSED_MAX)
            .copied();
        let (id, e) = match starved {
            Some(end) => end,
            None => *self.rng.pick(&ready),
        };
        for &(other, end) in &ready {
            let p = self.pipes.get_mut(&other).unwrap();
            p.passed[end] = if (other, end) == (id, e) {
                0
            } else {
                p.passed[end] + 1
            };
        }
        let whole = self.rng.chance(700);
        let p = self.pipes.get_mut(&id).unwrap();
        let (k, run, j, link) = p.ends[1 - e];
        let Some(mut chunk) = p.bytes[e].pop_front() else {
            // The writer closed: EOF.
            p.closed[1 - e] = true;
            self.pipes.remove(&id);
            if self.nodes[k].up && self.nodes[k].run == run {
                self.nodes[k].bridges[j].io_closed(self.now, link, "closed by the peer");
                self.after(k, j);
            }
            return true;
        };
        if !whole && chunk.len() > 1 {
            let cut = 1 + self.rng.below(chunk.len() as u64 - 1) as usize;
            let rest = chunk.split_off(cut);
            p.bytes[e].push_front(rest);
        }
        if p.closed[1 - e] || !self.nodes[k].up || self.nodes[k].run != run {
            return true;
        }
        self.nodes[k].bridges[j].handle_bytes(self.now, link, &chunk);
        self.after(k, j);
        true
    }

    fn deliver_lane(&mut self) -> bool {
        let mut keys = Vec::new();
        for (k, n) in self.nodes.iter().enumerate() {
            for (&(from, to), q) in &n.lanes {
                if !q.is_empty() && n.up {
                    keys.push((k, from, to));
                }
            }
        }
        if keys.is_empty() {
            return false;
        }
        let (k, from, to) = *self.rng.pick(&keys);
        let batch = self.nodes[k]
            .lanes
            .get_mut(&(from, to))
            .unwrap()
            .pop_front()
            .unwrap();
        let handoffs = self.nodes[k].cores[to].handle_mesh(batch, from, self.now);
        assert!(handoffs.is_empty(), "the simulator moves no sockets");
        self.after(k, to);
        true
    }

    fn tick(&mut self, k: usize, j: usize) {
        if !self.nodes[k].up {
            return;
        }
        self.nodes[k].cores[j].handle_tick(self.now);
        self.after(k, j);
        while self.nodes[k].cores[j].run_gathers(self.now, 8) {
            self.after(k, j);
        }
        self.nodes[k].bridges[j].tick(self.now);
        self.after(k, j);
        self.dial(k, j);
    }

    fn drain(&mut self, k: usize, j: usize) {
        if !self.nodes[k].up {
            return;
        }
        self.nodes[k].bridges[j].drain_outbox(self.now);
        self.after(k, j);
    }

    fn advance(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
        let now = self.now;
        let mut due: Vec<(Instant, usize, u64, PeerEvent)> = Vec::new();
        self.due.retain(|d| {
            if d.0 <= now {
                due.push(d.clone());
                false
            } else {
                true
            }
        });
        for (_, k, run, ev) in due {
            if !self.nodes[k].up || self.nodes[k].run != run {
                continue;
            }
            let ev = match ev {
                PeerEvent::Up { index, .. } => {
                    let p = usize::from(index);
                    if !self.nodes[p].up || self.is_cut(k, p) {
                        continue;
                    }
                    PeerEvent::Up {
                        index,
                        node: self.run_of(p),
                    }
                }
                ev => ev,
            };
            self.event(format_args!("node {k} membership: {ev:?}"));
            self.peer_event(k, ev);
        }
    }

    /// Membership in the end: every node sees every other live node's
    /// current run up.
    fn converge(&mut self) {
        for k in self.live_nodes() {
            for p in self.live_nodes() {
                let run = self.run_of(p);
                if p != k && self.nodes[k].view.get(&p) != Some(&run) {
                    let ev = PeerEvent::Up {
                        index: p as u16,
                        node: run,
                    };
                    self.event(format_args!("node {k} membership: {ev:?}"));
                    self.peer_event(k, ev);
                }
            }
        }
    }

    // ---- faults ----

    fn break_link(&mut self) {
        let ids: Vec<u64> = self.pipes.keys().copied().collect();
        if ids.is_empty() {
            return;
        }
        let id = *self.rng.pick(&ids);
        let p = self.pipes.remove(&id).unwrap();
        self.breaks += 1;
        self.event(format_args!("link broken: {:?}", p.ends));
        for e in 0..2 {
            let (k, run, j, link) = p.ends[e];
            if !p.closed[e] && self.nodes[k].up && self.nodes[k].run == run {
                self.nodes[k].bridges[j].io_closed(self.now, link, "reset");
                self.after(k, j);
            }
        }
    }

    /// Membership on node `k` declares `peer`'s run `node` down after
    /// `ms`, and (when `back`) up again later.
    fn schedule(&mut self, at: usize, ev: PeerEvent, ms: u64) {
        let when = self.now + Duration::from_millis(ms);
        let run = self.nodes[at].run;
        self.due.push((when, at, run, ev));
    }

    fn partition(&mut self) {
        let n = self.nodes.len();
        let alone = self.rng.below(n as u64) as usize;
        self.partitions += 1;
        // Now and then only one side declares the other down (a one-way
        // loss, or a heal before the other side's detection).
        let sides = match self.rng.below(4) {
            0 => (true, false),
            1 => (false, true),
            _ => (true, true),
        };
        self.event(format_args!("partition: node {alone} alone, {sides:?}"));
        for k in 0..n {
            if k != alone {
                self.cut.insert((k.min(alone), k.max(alone)));
                let detect = 1500 + self.rng.below(1500);
                let (a, b) = (self.run_of(alone), self.run_of(k));
                if sides.0 {
                    let index = alone as u16;
                    self.schedule(k, PeerEvent::Down { index, node: a }, detect);
                }
                if sides.1 {
                    let index = k as u16;
                    self.schedule(alone, PeerEvent::Down { index, node: b }, detect);
                }
            }
        }
    }

    fn heal(&mut self) {
        let cut = std::mem::take(&mut self.cut);
        self.event(format_args!("heal {cut:?}"));
        // A Down not declared yet never will be: the links are back first.
        self.due.retain(|(_, at, _, ev)| match ev {
            PeerEvent::Down { index, .. } => {
                let (a, b) = (*at, usize::from(*index));
                !cut.contains(&(a.min(b), a.max(b)))
            }
            _ => true,
        });
        for (a, b) in cut {
            if !self.nodes[a].up || !self.nodes[b].up {
                continue;
            }
            let ms = 300 + self.rng.below(700);
            let (ra, rb) = (self.run_of(a), self.run_of(b));
            // Declared down first if it was not yet.
            self.schedule(
                a,
                PeerEvent::Up {
                    index: b as u16,
                    node: rb,
                },
                ms,
            );
            self.schedule(
                b,
                PeerEvent::Up {
                    index: a as u16,
                    node: ra,
                },
                ms,
            );
        }
    }

    fn crash(&mut self) {
        let live = self.live_nodes();
        if live.len() < 2 {
            return;
        }
        let k = *self.rng.pick(&live);
        self.crashes += 1;
        self.event(format_args!("node {k} killed"));
        let old = self.run_of(k);
        // The sessions it holds die with it (memory durability), also one
        // whose client connected elsewhere while it was to move there
        // (not an empty one left behind).
        let now = self.now;
        // And the sessions it was moving to another node that have not all
        // come there (node k ended its copy once it sent them).
        let moving: BTreeSet<Arc<str>> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(p, n)| *p != k && n.up)
            .flat_map(|(_, n)| n.cores.iter().flat_map(|core| core.moving_in()))
            .filter(|(_, from)| from.contains(&(k as u16)))
            .map(|(id, _)| id)
            .collect();
        let held: BTreeSet<usize> = (0..self.clients.len())
            .filter(|&c| {
                let client = &self.clients[c];
                moving.contains(&*client.id)
                    || self.nodes[k].cores.iter().any(|core| {
                        let ask = AdminRequest::Client {
                            client_id: client.id.clone(),
                        };
                        matches!(core.admin(now, ask),
                        AdminAnswer::Client(Some(d)) if d.info.subscriptions + d.info.queued + d.info.inflight > 0)
                    })
            })
            .collect();
        let logged = self.nodes[k].disk.is_some();
        if logged && self.faults != Faults::All {
            self.check_copy_of(k, &held, &moving);
        }
        self.count_adoptions(k);
        // (Its record of sessions split goes with it.)
        self.note_splits();
        let node = &mut self.nodes[k];
        node.up = false;
        node.cores.clear();
        node.bridges.clear();
        node.lanes.clear();
        // The kernel closes its sockets: the peers read EOF.
        for p in self.pipes.values_mut() {
            for e in 0..2 {
                if p.ends[e].0 == k && p.ends[e].1 == old.incarnation {
                    p.closed[e] = true;
                    p.bytes[e].clear();
                }
            }
        }
        for c in 0..self.clients.len() {
            let client = &self.clients[c];
            let live = client
                .conn
                .as_ref()
                .is_some_and(|s| s.node == k && !s.handle.is_closing());
            if live && client.connacked && self.will_known.get(&c) == Some(&true) {
                if let Some(seq) = client.will_seq {
                    let key = (c, seq);
                    if let Some(s) = self.sent.get_mut(&key) {
                        s.acked = true;
                        s.will_of = Some(k);
                    }
                    self.pending_wills.push(PendingWill {
                        key,
                        node: k,
                        run: old.incarnation,
                        runs: client.will_runs.clone(),
                    });
                }
            }
            let client = &mut self.clients[c];
            client.stale.retain(|s| s.node != k);
            if client.conn.as_ref().is_some_and(|s| s.node == k) {
                client.conn = None;
            }
            let died = client.home_node == k || held.contains(&c);
            if let (Role::Subscriber { .. }, true) = (&client.role, died) {
                // Memory durability: its session died with the node, and
                // what it held (a subscription whose SUBACK had not come
                // yet may have taken effect). With logs, the standby may
                // take it over: its next CONNACK tells (Session Present),
                // and until then it owes what it was owed.
                client.sessions_lost.push(self.steps);
                client.maybe_lost = logged;
                // Taken over by a standby, its session lives on another
                // node, in that node's standby copy once the copy catches
                // up (seed 9767): a second death within that lag loses it.
                client.taken_over |= logged;
                if client.subscribed_at.is_some() && !logged {
                    client.subscribed_at = None;
                    client.inbound.clear();
                    self.lost_sessions += 1;
                }
            }
        }
        for p in 0..self.nodes.len() {
            if p != k && self.nodes[p].up {
                let ms = 1000 + self.rng.below(2000);
                self.schedule(
                    p,
                    PeerEvent::Down {
                        index: k as u16,
                        node: old.clone(),
                    },
                    ms,
                );
            }
        }
    }

    /// Node `k` dies now (seeds with logs): every acknowledged message
    /// owed to a subscriber whose session dies with it, and not delivered
    /// yet, is in the copy of its log its standby holds. Checked when
    /// every shard's standby is the same node, waited for, holding all
    /// that was acknowledged before it was (`log_copies_cover_acks`), with
    /// a whole copy (for subscribers whose session was taken over from a
    /// dead node, a copy holding every record of the log: nothing waits
    /// for the adopter's copy); a broker recovered from that copy holds
    /// each such message for the subscriber, or, for a session that moved
    /// to node `k` and is not in its standby's copy yet, the node it came
    /// from keeps it (`orphans`). (`held`: the subscribers with a
    /// session on node `k`; `moving`: client ids whose sessions were on
    /// their way from it. Sessions on their way to it or from it are not
    /// checked.)
    fn check_copy_of(&mut self, k: usize, held: &BTreeSet<usize>, moving: &BTreeSet<Arc<str>>) {
        let node = &self.nodes[k];
        let coming: BTreeSet<Arc<str>> = (node.cores.iter())
            .flat_map(|c| c.moving_in())
            .map(|(id, _)| id)
            .collect();
        let standbys: BTreeSet<Vec<u16>> =
            node.cores.iter().map(|c| c.standbys().to_vec()).collect();
        // Every acknowledgement is in the copies. A session taken over
        // here is not an acknowledgement of this node's, and nothing else
        // holds it until this node's copy does (a second death within
        // that lag loses it), so only a copy that holds every record of
        // the log answers for sessions taken over.
        let covered = node.cores.iter().all(|c| c.log_copies_cover_acks());
        let whole_log =
            (node.cores.iter()).all(|c| c.cluster_stats().replication.records_behind == 0);
        let Some(standby) = standbys.iter().next().and_then(|s| s.first().copied()) else {
            self.copies.0 += 1;
            return;
        };
        let p = standby as usize;
        if standbys.len() > 1 || !covered || !self.nodes[p].up {
            self.copies.0 += 1;
            return;
        }
        let (name, run) = (node.name.as_str().to_string(), node.run);
        let copies: Vec<_> = (self.nodes[p].cores.iter())
            .flat_map(|c| c.log_copies())
            .filter(|c| *c.node == *name && c.run == run && c.whole)
            .collect();
        let gens: BTreeSet<u64> = copies.iter().map(|c| c.generation).collect();
        let all = (0..self.shards).all(|j| copies.iter().any(|c| c.shard as usize == j));
        if !all || gens.len() != 1 {
            self.copies.0 += 1;
            return;
        }
        // Recover a scratch copy of the copy.
        let from = self.nodes[p].disk.clone().expect("a node with a log");
        let scratch = Arc::new(MemDisk::new());
        let gen = *gens.iter().next().unwrap();
        let root = std::path::Path::new("/copy");
        for c in &copies {
            let dir = root
                .join(format!("gen-{gen:06}"))
                .join(format!("shard-{}", c.shard));
            scratch.create_dir_all(&dir).unwrap();
            for file in from.list(&c.dir).unwrap() {
                let bytes = from.read(&file).unwrap();
                let to = dir.join(file.file_name().unwrap());
                scratch.write_synced(&to, bytes.as_ref().as_ref()).unwrap();
            }
        }
        let text = format!("gen-{gen:06}\n");
        scratch
            .write_synced(&root.join("CURRENT"), text.as_bytes())
            .unwrap();
        let settings = RecoverySettings {
            data_dir: root.to_path_buf(),
            shards: self.shards,
            segment_bytes: self.config.storage.segment_bytes,
            clock: self.nodes[k].wall,
            disk: Some(scratch),
        };
        let recovery = recover(&settings)
            .unwrap_or_else(|e| self.fail(&format!("node {k}'s copy on node {p}: {e}")));
        let mut kept: BTreeMap<String, BTreeSet<(usize, u64)>> = BTreeMap::new();
        for start in &recovery.shards {
            for session in &start.sessions {
                let got = kept.entry(session.client_id.to_string()).or_default();
                let r = &session.restored;
                let messages =
                    (r.queue.iter().map(|(m, _)| m)).chain(r.inflight.iter().map(|i| &i.message));
                got.extend(messages.filter_map(|m| published_as(m)));
            }
        }
        self.copies.1 += 1;
        let mut moved_away: BTreeMap<String, BTreeSet<(usize, u64)>> = BTreeMap::new();
        for n in (self.nodes.iter().enumerate()).filter(|(q, n)| *q != k && n.up) {
            for core in &n.1.cores {
                for (id, to, messages) in core.kept_moves() {
                    if to as usize != k {
                        continue;
                    }
                    let got = moved_away.entry(id.to_string()).or_default();
                    got.extend(messages.iter().filter_map(|m| published_as(m)));
                }
            }
        }
        for (c, client) in self.clients.iter().enumerate() {
            let Role::Subscriber { filter, .. } = &client.role else {
                continue;
            };
            let Some(at) = client.subscribed_at else {
                continue;
            };
            let id = &*client.id;
            if !held.contains(&c) || moving.contains(id) || coming.contains(id) || client.split {
                continue;
            }
            if client.taken_over && !whole_log {
                continue;
            }
            if filter.starts_with("$share/") {
                continue;
            }
            let in_copy = kept.get(&client.id);
            // A session that moved to node k: until k's standbys held it,
            // the node it came from kept it (`orphans`).
            let in_kept = |from: usize, seq: u64| {
                client.roamed
                    && (moved_away.get(&*client.id)).is_some_and(|m| m.contains(&(from, seq)))
            };
            for (&(from, seq), s) in &self.sent {
                let owed = s.acked
                    && s.qos != QoS::AtMostOnce
                    && s.will_of.is_none()
                    && s.topic.starts_with("t/")
                    && s.step > at
                    && matches(filter, &s.topic);
                if !owed || self.delivered.contains_key(&(c, from, seq)) {
                    continue;
                }
                self.copies.2 += 1;
                let copied = in_copy.is_some_and(|m| m.contains(&(from, seq)));
                if !copied && in_kept(from, seq) {
                    self.orphans.4 += 1;
                } else if !copied {
                    self.fail(&format!(
                        "{from}:{seq} on {} (acknowledged) owed to {} is neither delivered nor in \
                         node {p}'s copy of node {k}'s log, nor kept where it moved from",
                        s.topic, client.id
                    ));
                }
            }
        }
    }

    /// Client `c`'s session on the node of its connection holds its
    /// subscription.
    fn holds_subscription(&self, c: usize) -> bool {
        let client = &self.clients[c];
        let (Some(conn), Role::Subscriber { filter, .. }) = (&client.conn, &client.role) else {
            return false;
        };
        let ask = AdminRequest::Client {
            client_id: client.id.clone(),
        };
        (self.nodes[conn.node].cores.iter()).any(|core| {
            matches!(core.admin(self.now, ask.clone()), AdminAnswer::Client(Some(d))
                if d.subscription_list.iter().any(|s| s.filter == *filter))
        })
    }

    /// Add node `k`'s counts of sessions and messages taken over.
    fn count_adoptions(&mut self, k: usize) {
        for core in &self.nodes[k].cores {
            let s = core.cluster_stats();
            self.adopted.0 += s.sessions_adopted;
            self.adopted.1 += s.adopted_messages;
            self.adopted.2 += s.adopted_stale;
            self.orphans.0 += s.kept_confirmed + s.kept_unconfirmed + s.sessions_orphaned;
            self.orphans.1 += s.sessions_orphaned;
            self.orphans.2 += s.orphan_parts_taken;
            self.orphans.3 += s.orphan_parts_superseded;
        }
    }

    fn restart(&mut self) {
        let down: Vec<usize> = (0..self.nodes.len())
            .filter(|&k| !self.nodes[k].up)
            .collect();
        if down.is_empty() {
            return;
        }
        let k = *self.rng.pick(&down);
        self.restart_raced |= (self.due.iter()).any(
            |(_, _, _, ev)| matches!(ev, PeerEvent::Down { index, .. } if *index as usize == k),
        );
        self.start_node(k);
        let new = self.run_of(k);
        self.event(format_args!("node {k} started: run {}", new.incarnation));
        for p in 0..self.nodes.len() {
            if p == k || !self.nodes[p].up {
                continue;
            }
            let ms = 200 + self.rng.below(1000);
            self.schedule(
                p,
                PeerEvent::Up {
                    index: k as u16,
                    node: new.clone(),
                },
                ms,
            );
            if !self.is_cut(k, p) {
                let other = self.run_of(p);
                self.peer_event(
                    k,
                    PeerEvent::Up {
                        index: p as u16,
                        node: other,
                    },
                );
            }
        }
    }

    // ---- the run ----

    fn step(&mut self) {
        self.steps += 1;
        let n = self.nodes.len();
        match self.rng.below(100) {
            0..=19 => {
                let pubs: Vec<usize> = (0..self.clients.len())
                    .filter(|&c| matches!(self.clients[c].role, Role::Publisher))
                    .collect();
                let c = *self.rng.pick(&pubs);
                self.publish_next(c);
            }
            20..=34 => {
                let c = self.rng.below(self.clients.len() as u64) as usize;
                self.read(c);
            }
            35..=49 => {
                self.deliver_lane();
            }
            50..=69 => {
                self.deliver_pipe();
            }
            70..=79 => {
                let k = self.rng.below(n as u64) as usize;
                let j = self.rng.below(self.shards as u64) as usize;
                self.drain(k, j);
            }
            80..=89 => {
                let ms = self.rng.below(100);
                self.advance(ms);
                let k = self.rng.below(n as u64) as usize;
                let j = self.rng.below(self.shards as u64) as usize;
                self.tick(k, j);
            }
            90..=95 => self.client_churn(),
            _ => {
                if self.faults != Faults::None && self.rng.chance(250) {
                    self.fault();
                }
            }
        }
    }

    fn client_churn(&mut self) {
        let c = self.rng.below(self.clients.len() as u64) as usize;
        let live = self.live_nodes();
        match self.clients[c].role.clone() {
            Role::Publisher => {
                // Connects again on any node, the old connection left
                // standing half the time.
                let k = *self.rng.pick(&live);
                if self.rng.chance(500) {
                    self.lose_connection(c);
                }
                self.connect(c, k);
            }
            Role::Subscriber { .. } => {
                if self.clients[c].conn.is_some() {
                    self.lose_connection(c);
                } else {
                    // Back where its session is, or on another node: the
                    // session must follow it there.
                    let mut k = self.clients[c].home_node;
                    let shared = matches!(&self.clients[c].role,
                        Role::Subscriber { filter, .. } if filter.starts_with("$share/"));
                    if self.rng.chance(300) && !shared {
                        k = *self.rng.pick(&live);
                    }
                    // Its session may move between nodes from now on.
                    self.clients[c].roamed |= k != self.clients[c].home_node;
                    self.clients[c].home_node = k;
                    self.connect(c, k);
                }
            }
            Role::Probe => {}
        }
    }

    /// Client `c`'s connection ends without a DISCONNECT.
    fn lose_connection(&mut self, c: usize) {
        let Some(conn) = self.clients[c].conn.take() else {
            return;
        };
        let (k, run, j) = (conn.node, conn.run, conn.shard);
        if self.traces(c) {
            eprintln!("step {} {} connection lost", self.steps, self.clients[c].id);
        }
        if self.nodes[k].up && self.nodes[k].run == run {
            self.nodes[k].cores[j].handle_connection_lost(&conn.handle, self.now);
            self.after(k, j);
        }
    }

    fn fault(&mut self) {
        let roll = match self.faults {
            Faults::None => return,
            Faults::Links => 0,
            Faults::Crashes => 7 + self.rng.below(3),
            Faults::All => self.rng.below(10),
        };
        match roll {
            0..=3 => self.break_link(),
            4..=5 if self.cut.is_empty() => self.partition(),
            4..=6 => self.heal(),
            7 => self.crash(),
            _ => self.restart(),
        }
    }

    /// Everything delivered, ticked and answered until nothing moves.
    fn settle(&mut self, rounds: usize) {
        for _ in 0..rounds {
            let mut moved = false;
            for k in 0..self.nodes.len() {
                for j in 0..self.shards {
                    self.drain(k, j);
                }
            }
            while self.deliver_lane() {
                moved = true;
            }
            let mut budget = 10_000;
            while budget > 0 && self.deliver_pipe() {
                moved = true;
                budget -= 1;
            }
            for c in 0..self.clients.len() {
                self.read(c);
            }
            self.advance(20);
            for k in 0..self.nodes.len() {
                for j in 0..self.shards {
                    self.tick(k, j);
                }
            }
            for k in 0..self.nodes.len() {
                for j in 0..self.shards {
                    self.drain(k, j);
                }
            }
            self.collect_writes();
            if !moved && self.due.is_empty() && self.quiet() {
                return;
            }
        }
    }

    fn quiet(&self) -> bool {
        self.pipes
            .values()
            .all(|p| p.bytes.iter().all(|b| b.is_empty()))
            && self
                .nodes
                .iter()
                .all(|n| n.lanes.values().all(|q| q.is_empty()))
            && self
                .clients
                .iter()
                .all(|c| c.outgoing.is_empty() || c.conn.is_none())
    }

    fn run(&mut self, steps: u64) {
        // Links up and subscriptions taken before the first publish (a
        // subscriber that connected before its node's links were up was
        // refused: its session might have been on a peer; it comes back).
        self.settle(200);
        // CLAIM_WAIT (2 s) for the CONNACKs refused.
        for _ in 0..120 {
            self.advance(20);
            self.settle(1);
        }
        for c in 0..self.clients.len() {
            if self.clients[c].conn.is_none() {
                let k = self.clients[c].home_node;
                self.connect(c, k);
            }
        }
        self.settle(200);
        for c in 0..self.clients.len() {
            if matches!(self.clients[c].role, Role::Subscriber { .. })
                && self.clients[c].subscribed_at.is_none()
            {
                self.fail(&format!(
                    "{} has no SUBACK after the start",
                    self.clients[c].id
                ));
            }
        }
        for _ in 0..steps {
            self.step();
        }
        // The end: every fault healed, every node up, every client back.
        self.heal();
        while self.nodes.iter().any(|n| !n.up) {
            self.restart();
        }
        self.advance(3500);
        self.converge();
        self.settle(300);
        for c in 0..self.clients.len() {
            if self.clients[c].conn.is_none() {
                let k = match self.clients[c].role {
                    Role::Subscriber { .. } => self.clients[c].home_node,
                    _ => self.rng.below(self.nodes.len() as u64) as usize,
                };
                self.connect(c, k);
            }
        }
        // A keep-alive round (5 s) for links that a partition left half
        // dead, and on until every session on the move got where it goes
        // (a link broken meanwhile comes back after its backoff) and
        // every client refused meanwhile (a peer not yet answering) is
        // back.
        for i in 0..3000 {
            self.advance(20);
            self.settle(1);
            let moving = self
                .nodes
                .iter()
                .filter(|n| n.up)
                .flat_map(|n| &n.cores)
                .any(|c| c.moves_pending());
            let mut out = false;
            for c in 0..self.clients.len() {
                if self.clients[c].conn.is_none() {
                    out = true;
                    let k = self.clients[c].home_node;
                    self.connect(c, k);
                }
            }
            if i >= 300 && !moving && !out {
                break;
            }
        }
        self.settle(500);
    }

    fn check(&mut self) -> Outcome {
        // Every publisher's acknowledgement that waited for other nodes
        // went once the cluster settled: none stuck; and, without faults,
        // each because the peer confirmed it, not because `ACK_WAIT` ran
        // out (the last phase runs longer than that; a link that breaks
        // may stay down that long, backing off).
        let durable = self.config.storage.durability != "memory";
        let mut late_acks = 0;
        for (k, node) in self.nodes.iter().enumerate().filter(|(_, n)| n.up) {
            for (j, bridge) in node.bridges.iter().enumerate() {
                let stats = bridge.stats();
                let gave_up = stats.acks_unconfirmed;
                // With logs a peer confirms once its standby holds the
                // message too: two round trips on a simulated network
                // whose random order of deliveries can stretch them to
                // seconds, now and then past the 10 s the bridge waits.
                // Counted; that every acknowledged message arrived is
                // still checked below.
                if durable {
                    late_acks += gave_up;
                } else if gave_up > 0 && self.faults == Faults::None {
                    self.fail(&format!(
                        "node {k} shard {j} ({:?}): {gave_up} acknowledgements went without the peer's \
                         confirmation",
                        self.faults
                    ));
                }
                // Without faults every peer stays up and linked: nothing
                // goes past a link's bound (its publishers wait).
                if stats.messages_dropped > 0 && self.faults == Faults::None {
                    self.fail(&format!(
                        "node {k} shard {j}: {} messages for peers dropped without faults",
                        stats.messages_dropped
                    ));
                }
            }
            for (j, core) in node.cores.iter().enumerate() {
                if core.held_acks() > 0 {
                    self.fail(&format!(
                        "node {k} shard {j}: {} acknowledgements still held after the run",
                        core.held_acks()
                    ));
                }
            }
        }
        self.late_acks += late_acks;
        for k in 0..self.nodes.len() {
            if self.nodes[k].up {
                self.count_adoptions(k);
            }
        }
        // Without partitions, no client of a dead node is told its session
        // is new before the copy is taken in (CONNECTs that resume a
        // session wait for the adoption; a session that was moving from it
        // is the same session), so no copy taken over is stale; unless the
        // node started again before its peers all declared it down.
        if self.faults != Faults::All && !self.restart_raced && self.adopted.2 > 0 {
            self.fail(&format!(
                "{} sessions taken over from a dead node were dropped: their client had been \
                 told its session was new",
                self.adopted.2
            ));
        }
        // One live connection per client id (not always the newest: two
        // connections a partition let live meet when it heals, and the
        // later claim by the clocks wins).
        for c in 0..self.clients.len() {
            let client = &self.clients[c];
            let live: Vec<usize> = client
                .stale
                .iter()
                .chain(client.conn.as_ref())
                .filter(|s| self.nodes[s.node].up && self.nodes[s.node].run == s.run)
                .filter(|s| !s.handle.is_closing())
                .map(|s| s.node)
                .collect();
            if live.len() > 1 {
                self.fail(&format!(
                    "{}: {} live connections, on nodes {live:?}",
                    client.id,
                    live.len()
                ));
            }
        }
        // What was owed: each acknowledged QoS 1/2 message to each
        // matching subscriber that had its subscription in the session it
        // has (to one member of the shared group), and each will of a
        // killed node's live connection to the wills' subscribers of the
        // nodes that owe it.
        // (Moves given up since the last delivery count too.)
        self.note_splits();
        let mut lost = 0u64;
        let mut owed = 0u64;
        let mut wills_owed = 0u64;
        let (mut failure, mut will_failure) = (None, None);
        for (&(p, seq), s) in &self.sent {
            if !s.acked || s.qos == QoS::AtMostOnce {
                continue;
            }
            let owed_by = match s.will_of {
                Some(_) => self.owed_by.get(&(p, seq)).cloned().unwrap_or_default(),
                None if s.topic.starts_with("t/") => (0..self.nodes.len()).collect(),
                None => continue,
            };
            // A shared group: a member was owed it, a member had it, a
            // member's session died since (the one it went to, maybe).
            let mut group = (false, false, false);
            for (c, client) in self.clients.iter().enumerate() {
                let Role::Subscriber { filter, .. } = &client.role else {
                    continue;
                };
                let got = self.delivered.contains_key(&(c, p, seq));
                if filter.starts_with("$share/") && matches(filter, &s.topic) {
                    // A member that had it counts, though its session
                    // was taken since (a CONNACK without a peer's answer
                    // starts a new one).
                    group.1 |= got;
                    group.2 |= client.sessions_lost.iter().any(|&at| at >= s.step);
                }
                if !matches(filter, &s.topic)
                    || client.subscribed_at.is_none_or(|at| at >= s.step)
                    || !owed_by.contains(&client.home_node)
                {
                    continue;
                }
                if filter.starts_with("$share/") {
                    group.0 = true;
                    continue;
                }
                owed += 1;
                wills_owed += u64::from(s.will_of.is_some());
                if !got {
                    lost += 1;
                    // A session whose move a node gave up, killed with the
                    // session on its way (not in any copy), lost
                    // what it held there, wills too.
                    if client.split && self.faults == Faults::Crashes {
                        continue;
                    }
                    let slot = match s.will_of {
                        Some(_) => &mut will_failure,
                        None => &mut failure,
                    };
                    slot.get_or_insert(format!(
                        "{p}:{seq} on {} (acknowledged) never reached {}",
                        s.topic, client.id
                    ));
                }
            }
            if group.0 {
                owed += 1;
                if !group.1 {
                    lost += 1;
                    if group.2 && self.faults == Faults::Crashes {
                        continue;
                    }
                    failure.get_or_insert(format!(
                        "{p}:{seq} on {} (acknowledged) reached no member of the shared group",
                        s.topic
                    ));
                }
            }
        }
        // A node that dies takes nothing acknowledged with it but the
        // sessions it held (no survivor serves a standby's copy yet: what they had
        // queued, and a shared group's message that went to a member
        // there, are forgiven above). A partition loses what crossed it
        // when it formed (the other side is declared down and its routes
        // go): not checked where partitions come. Wills are checked where
        // no partition comes.
        if let (Faults::None | Faults::Links | Faults::Crashes, Some(why)) = (self.faults, failure)
        {
            self.fail(&why);
        }
        if let (Faults::None | Faults::Links | Faults::Crashes, Some(why)) =
            (self.faults, will_failure)
        {
            self.fail(&why);
        }
        // The same retained messages on every node.
        let probes: Vec<usize> = (0..self.nodes.len())
            .map(|k| self.add_client(Role::Probe, k))
            .collect();
        self.settle(300);
        for &c in &probes {
            if self.clients[c].subscribed_at.is_none() {
                self.fail(&format!(
                    "the probe of node {} got no SUBACK",
                    self.clients[c].home_node
                ));
            }
        }
        let first = self.clients[probes[0]].retained.clone();
        for &c in &probes[1..] {
            if self.clients[c].retained != first {
                self.fail(&format!(
                    "retained messages differ: node 0 has {:?}, node {} has {:?}",
                    first, self.clients[c].home_node, self.clients[c].retained
                ));
            }
        }
        Outcome {
            published: self.sent.len() as u64,
            owed,
            lost,
            wills_owed,
            crashes: self.crashes,
            partitions: self.partitions,
            breaks: self.breaks,
            lost_sessions: self.lost_sessions,
            copies: self.copies,
            late_acks: self.late_acks,
            adopted: self.adopted,
            orphans: self.orphans,
            refused: self.refused,
            minority_refused: self.minority_refused,
            routes_refused: self.routes_refused,
            adoption_refused: self.adoption_refused,
            told_gone: self.told_gone,
            again_after_loss: self.again_after_loss,
            link_pauses: self.link_pauses,
            dropped: self
                .nodes
                .iter()
                .flat_map(|n| &n.bridges)
                .map(|b| b.stats().messages_dropped)
                .sum(),
            splits: self.splits,
            moved: self
                .nodes
                .iter()
                .flat_map(|n| &n.cores)
                .map(|c| c.cluster_stats().sessions_moved_in)
                .sum(),
            faulty: u64::from(self.faults != Faults::None),
        }
    }
}

impl Client {
    fn pid(&mut self) -> u16 {
        loop {
            self.next_pid = self.next_pid.wrapping_add(1).max(1);
            if !self.outgoing.contains_key(&self.next_pid) {
                return self.next_pid;
            }
        }
    }
}

fn pack(c: usize, seq: u64) -> u64 {
    ((c as u64) << 40) | seq
}

fn unpack(v: u64) -> (usize, u64) {
    ((v >> 40) as usize, v & ((1 << 40) - 1))
}

#[derive(Debug, Default, Clone, Copy)]
struct Outcome {
    published: u64,
    owed: u64,
    lost: u64,
    wills_owed: u64,
    crashes: u64,
    partitions: u64,
    breaks: u64,
    lost_sessions: u64,
    copies: (u64, u64, u64),
    late_acks: u64,
    /// Sessions taken over from dead nodes' log copies, and messages
    /// routed to a dead node given to them (`adopt`), and copies of
    /// sessions dropped as stale (their client was told first that its
    /// session was new).
    adopted: (u64, u64, u64),
    /// Sessions moved away and kept until confirmed, kept ones sent on
    /// when the node they went to died, their parts taken in and not
    /// needed, and acknowledged messages a death check found only in a
    /// kept copy.
    orphans: (u64, u64, u64, u64, u64),
    refused: u64,
    minority_refused: u64,
    routes_refused: u64,
    adoption_refused: u64,
    told_gone: u64,
    again_after_loss: u64,
    link_pauses: u64,
    /// Messages for peers dropped by the bridges.
    dropped: u64,
    /// Subscribers whose session's move a node gave up.
    splits: u64,
    moved: u64,
    faulty: u64,
}

impl std::ops::AddAssign for Outcome {
    fn add_assign(&mut self, o: Outcome) {
        self.published += o.published;
        self.owed += o.owed;
        self.lost += o.lost;
        self.wills_owed += o.wills_owed;
        self.crashes += o.crashes;
        self.partitions += o.partitions;
        self.breaks += o.breaks;
        self.lost_sessions += o.lost_sessions;
        self.copies.0 += o.copies.0;
        self.copies.1 += o.copies.1;
        self.copies.2 += o.copies.2;
        self.late_acks += o.late_acks;
        self.adopted.0 += o.adopted.0;
        self.adopted.1 += o.adopted.1;
        self.adopted.2 += o.adopted.2;
        self.orphans.0 += o.orphans.0;
        self.orphans.1 += o.orphans.1;
        self.orphans.2 += o.orphans.2;
        self.orphans.3 += o.orphans.3;
        self.orphans.4 += o.orphans.4;
        self.refused += o.refused;
        self.minority_refused += o.minority_refused;
        self.routes_refused += o.routes_refused;
        self.adoption_refused += o.adoption_refused;
        self.told_gone += o.told_gone;
        self.again_after_loss += o.again_after_loss;
        self.link_pauses += o.link_pauses;
        self.dropped += o.dropped;
        self.splits += o.splits;
        self.moved += o.moved;
        self.faulty += o.faulty;
    }
}

/// The publisher and sequence number a message's payload names
/// ("from:seq"), if it does.
fn published_as(m: &shardmq::message::Message) -> Option<(usize, u64)> {
    let text = std::str::from_utf8(&m.payload).ok()?;
    let mut f = text.split(':');
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

fn run(seed: u64) -> Outcome {
    shardmq::hash::fix_seeds_on_this_thread(Some(seed));
    let mut sim = Sim::new(seed);
    sim.run(1500);
    sim.check()
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}"))
    })
}

#[test]
fn seeded_cluster_runs() {
    let _ = env_logger::builder().is_test(true).try_init();
    let seeds: Vec<u64> = match env_u64("SHARDMQ_CLUSTER_SEED") {
        Some(s) => vec![s],
        None => {
            let first = env_u64("SHARDMQ_CLUSTER_FIRST").unwrap_or(1);
            let n = env_u64("SHARDMQ_CLUSTER_SEEDS").unwrap_or(30);
            (first..first + n).collect()
        }
    };
    let mut total = Outcome::default();
    for &seed in &seeds {
        total += run(seed);
    }
    eprintln!(
        "cluster simulator: {} seeds ({} with faults), {} messages published, {} deliveries \
         owed ({} of them wills of killed nodes' clients), {} of them lost ({} link breaks, {} partitions, {} node crashes, {} sessions \
         lost with their node or a move cut short); {} sessions moved between nodes, {} \
         CONNECTs refused for a peer's late answer, {} by a node without a majority and {} by \
         one without the routes of a node it sees up, {} resuming while a dead node's sessions \
         may still be taken over, {} \
         sessions split by a move given up (their order across the split not checked); {} \
         publishes held back while a peer had too many messages unconfirmed or a subscriber was behind, {} messages for \
         peers dropped by the bridges; nodes with logs killed: {} standbys' copies recovered, \
         holding {} acknowledged messages not yet delivered, {} deaths not checked (no whole \
         copy, or acknowledgements made without the standby), {} acknowledgements that went \
         after the bridge's 10 s without a peer's confirmation; {} sessions taken over from \
         dead nodes' copies ({} dropped: their client was told first that its session was \
         new), and {} messages in flight to a dead node given to them; {} \
         subscribers of those nodes told their session was gone; {} sessions moved away and \
         kept until their new node's standbys held them, {} of those sent on when that node \
         died first ({} parts taken in, {} not needed: the copy held the move), {} \
         acknowledged messages found at a death only in such a kept copy; {} QoS 2 \
         messages delivered again to a session started anew after its client was told \
         its earlier session (which had them) was gone",
        seeds.len(),
        total.faulty,
        total.published,
        total.owed,
        total.wills_owed,
        total.lost,
        total.breaks,
        total.partitions,
        total.crashes,
        total.lost_sessions,
        total.moved,
        total.refused,
        total.minority_refused,
        total.routes_refused,
        total.adoption_refused,
        total.splits,
        total.link_pauses,
        total.dropped,
        total.copies.1,
        total.copies.2,
        total.copies.0,
        total.late_acks,
        total.adopted.0,
        total.adopted.2,
        total.adopted.1,
        total.told_gone,
        total.orphans.0,
        total.orphans.1,
        total.orphans.2,
        total.orphans.3,
        total.orphans.4,
        total.again_after_loss
    );
}

#[test]
fn a_cluster_seed_replays_the_same_run() {
    let (a, b) = (run(3), run(3));
    assert_eq!(
        (a.published, a.owed, a.lost, a.breaks),
        (b.published, b.owed, b.lost, b.breaks)
    );
}

/// Seeds that found a bug once (the seeded runs start at 1): each still
/// holds every check. 3661 and 33350: a SUBACK before the peers could
/// route the filter; 37929 (before the fix only) and 34698: crossing
/// CONNECTs that left a client's session without its subscription; 47263:
/// a copy taken over dropped as stale though its client never knew of it;
/// 31674: QoS 2 again in a session its client was told was new; 25855
/// (once the routes were sent again for each subscriber): a node whose
/// clock lagged claimed a session offered to it already for a claim whose
/// connection was gone, was not offered it again, and told its client
/// of a copy it never had; 42371: a message whose shared subscription's
/// pick went to a node that died was served again under an Accepted
/// record that said "everyone", so the node's survivor routed it again to
/// an ordinary subscriber that had completed it at QoS 2; 69617 and
/// 87072: a copy of a session took a message of an origin late (a link's
/// replay, or while a move into it was on) and counted the ones between
/// it and that origin's next as its own, so a merge dropped a QoS 2
/// message it never had; 87998 (with the first fix of those only): a QoS
/// 2 message taken late, not among the marks its session moved with, went
/// to the client again on the node it moved to.
#[test]
fn seeds_that_once_failed_still_pass() {
    for seed in [
        3661, 25855, 31674, 33350, 34698, 37929, 42371, 47263, 69617, 87072, 87998,
    ] {
        run(seed);
    }
}
