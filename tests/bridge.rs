//! The deterministic simulator for route replication between nodes: the
//! broker's own [`LinkSession`], [`RouteExport`] and [`RouteImport`] on
//! simulated nodes, over simulated TCP connections (in order, delayed,
//! delivered in random pieces) that break at random and are dialed again.
//!
//! Each seed: 2 to 5 nodes of 1 to 4 shards; shards subscribe and
//! unsubscribe at random from a pool of filters, and clients of each node
//! get and lose wills ([`WillExport`], [`WillImport`] on the same links);
//! every node dials every other; 1 in 150 steps breaks a random
//! connection. Checked: no route or will frame is ever refused (out of
//! sequence, contradicting, drifting) while links only break; and after
//! the faults stop, every node holds exactly every other node's filters,
//! and exactly its wills (what it would publish if that node died). The
//! links carry retained messages too ([`Hlc`], [`wins`]): nodes with
//! clocks up to half a second apart store and delete retained topics, and
//! at the end every node holds the same version of every topic, the one
//! the last-writer-wins rule picks among all writes. And they carry
//! claims of client ids ([`claims::wins`]): clients connect to random
//! nodes (as a load balancer would send them, partitions included) and
//! leave; a node closes its connection of a client id when a later claim
//! arrives; at the end each client id is live on one node at most, and
//! the latest connection of each is still live unless its client left. `SHARDMQ_BRIDGE_SEEDS=N` runs N seeds
//! (default 300), `SHARDMQ_BRIDGE_SEED=S` just seed S.

#[path = "common/rng.rs"]
mod rng;
use rng::Rng;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use shardmq::cluster::claims;
use shardmq::cluster::frame::RouteChange;
use shardmq::cluster::frame::{ClaimEntry, RetainedEntry, WillEntry};
use shardmq::cluster::frame::{Frame, Hello, BRIDGE_VERSION};
use shardmq::cluster::link::{LinkEvent, LinkSession, LinkSettings};
use shardmq::cluster::node::NodeName;
use shardmq::cluster::retained::{wins, Hlc};
use shardmq::cluster::routes::{RouteExport, RouteFeed, RouteImport};
use shardmq::cluster::wills::{WillExport, WillImport};
use shardmq::codec::{Properties, QoS, Will};
use shardmq::message::Message;

const FILTERS: [&str; 14] = [
    "a",
    "a/b",
    "a/+",
    "a/#",
    "#",
    "+/x",
    "s/1",
    "s/2",
    "s/+/t",
    "$SYS/#",
    "x/y/z",
    "+",
    "$share/g/a/#",
    "$share/h/+",
];

fn settings() -> LinkSettings {
    LinkSettings {
        frame_bytes_max: 1 << 20,
        out_bytes_max: 1 << 20,
        ping_after_ms: 50,
        dead_after_ms: 100_000,
        secret: None,
        nonce_seed: [0; 16],
    }
}

/// Node `node`'s membership address.
fn addr_of(node: usize) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 7000 + node as u16))
}

fn hello(node: usize, shards: u16) -> Hello {
    Hello {
        version: BRIDGE_VERSION,
        cluster_tag: 7,
        node: NodeName::new(&format!("n{node}")).unwrap(),
        incarnation: 1,
        addr: addr_of(node),
        shard: 0,
        shards,
        auth: false,
        nonce: 0,
    }
}

/// One direction's connection: the dialer's session (at `from`), the
/// acceptor's (at `to`), and bytes in flight each way with their arrival
/// step.
struct Conn {
    /// What the dialer's node still owes this link of its routes.
    feed: RouteFeed,
    dialer: LinkSession,
    acceptor: LinkSession,
    to_acceptor: VecDeque<(u64, Vec<u8>)>,
    to_dialer: VecDeque<(u64, Vec<u8>)>,
}

struct Node {
    export: RouteExport,
    /// Changes not yet handed to the links (the runtime drains its
    /// shard's bridge outbox a loop turn later).
    outbox: VecDeque<(u64, RouteChange)>,
    /// Per shard, the filters it has subscribers of.
    shards: Vec<BTreeSet<&'static str>>,
    /// What this node holds of each other node's routes.
    imports: Vec<RouteImport>,
    /// Its clients' wills as its peers hold them, the changes not yet
    /// handed to the links, and the truth: client → payload.
    wills: WillExport,
    will_outbox: VecDeque<Frame>,
    will_truth: BTreeMap<String, u64>,
    /// What this node holds of each other node's wills.
    will_imports: Vec<WillImport>,
    /// Its retained store, deletes included: topic → stamp and version;
    /// its clock and how far it is off; its changes not yet on the links.
    retained: BTreeMap<String, (u64, Arc<Message>)>,
    hlc: Hlc,
    skew_ms: u64,
    retained_outbox: VecDeque<RetainedEntry>,
    /// Live connections: client id → claim stamp; claims not yet on the
    /// links.
    live: BTreeMap<String, u64>,
    claim_outbox: VecDeque<ClaimEntry>,
}

/// Keep `e` in `store` if it is newer than what is there.
fn keep(store: &mut BTreeMap<String, (u64, Arc<Message>)>, hlc: &mut Hlc, e: &RetainedEntry) {
    hlc.observe(e.stamp);
    let newer = match store.get(&*e.message.topic) {
        Some((stamp, m)) => wins((e.stamp, &e.message), (*stamp, m)),
        None => true,
    };
    if newer {
        store.insert(e.message.topic.to_string(), (e.stamp, e.message.clone()));
    }
}

fn retained_message(topic: &str, payload: String) -> Arc<Message> {
    Arc::new(Message {
        topic: Arc::from(topic),
        payload: Bytes::from(payload),
        qos: QoS::AtMostOnce,
        retain: true,
        properties: Default::default(),
        expires_at: None,
        publisher: None,
        id: 0,
        late: false,
    })
}

struct Sim {
    rng: Rng,
    step: u64,
    nodes: Vec<Node>,
    /// conns[a][b]: a's outbound connection to b, when up.
    conns: Vec<Vec<Option<Conn>>>,
    epoch: Instant,
    breaks: u64,
    snapshots: u64,
    deltas: u64,
    will_changes: u64,
    takeovers: u64,
}

fn will_entry(client: &str, version: u64) -> WillEntry {
    WillEntry {
        client_id: Arc::from(client),
        will: Will {
            topic: Arc::from(format!("status/{client}")),
            payload: Bytes::from(version.to_string()),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
        },
        delay_ms: version % 3 * 1000,
        waiting: false,
    }
}

impl Sim {
    fn dial(&mut self, a: usize, b: usize) {
        let shards = self.nodes[a].shards.len() as u16;
        let expect = (NodeName::new(&format!("n{b}")).unwrap(), 1, addr_of(b));
        let dialer = LinkSession::dialed(
            hello(a, shards),
            expect,
            settings(),
            (self.epoch, self.step),
            1,
        );
        let bs = self.nodes[b].shards.len() as u16;
        let acceptor = LinkSession::accepted(hello(b, bs), settings(), (self.epoch, self.step), 1);
        self.conns[a][b] = Some(Conn {
            feed: RouteFeed::new(),
            dialer,
            acceptor,
            to_acceptor: VecDeque::new(),
            to_dialer: VecDeque::new(),
        });
    }

    /// Queue what both sessions of a→b want written.
    fn transmit(&mut self, a: usize, b: usize) {
        let delay = 1 + self.rng.below(4);
        let at = self.step + delay;
        let Some(c) = self.conns[a][b].as_mut() else {
            return;
        };
        while let Some(bytes) = c.dialer.poll_transmit() {
            c.to_acceptor.push_back((at, bytes.to_vec()));
        }
        while let Some(bytes) = c.acceptor.poll_transmit() {
            c.to_dialer.push_back((at, bytes.to_vec()));
        }
    }

    fn at(&self) -> Instant {
        self.epoch + Duration::from_millis(self.step)
    }

    /// A node's queued route, will, retained and claim changes go out on
    /// its links.
    fn drain(&mut self, a: usize) {
        while let Some(c) = self.nodes[a].claim_outbox.pop_front() {
            let f = Frame::Claims {
                claims: vec![c],
                answer: false,
            };
            self.send_on_links_up(a, &f);
        }
        while let Some(e) = self.nodes[a].retained_outbox.pop_front() {
            self.send_on_links_up(a, &Frame::Retained(vec![e]));
        }
        while let Some(f) = self.nodes[a].will_outbox.pop_front() {
            self.will_changes += 1;
            self.send_on_links_up(a, &f);
        }
        while let Some((seq, change)) = self.nodes[a].outbox.pop_front() {
            self.deltas += 1;
            for b in 0..self.nodes.len() {
                if let Some(c) = self.conns[a][b].as_mut() {
                    if let Some(f) = c.feed.change(seq, &change) {
                        c.dialer.send(self.step, &f).unwrap();
                    }
                }
                self.transmit(a, b);
            }
        }
    }

    /// A change of node `a` on each of its links that is up (one that is
    /// not gets it in the snapshot it starts with).
    fn send_on_links_up(&mut self, a: usize, f: &Frame) {
        for b in 0..self.nodes.len() {
            if let Some(c) = self.conns[a][b].as_mut() {
                if c.dialer.is_up() {
                    c.dialer.send(self.step, f).unwrap();
                }
            }
            self.transmit(a, b);
        }
    }

    fn deliver(&mut self, a: usize, b: usize, seed: u64) {
        loop {
            let step = self.step;
            let Some(c) = self.conns[a][b].as_mut() else {
                return;
            };
            // Acceptor side: reads in random pieces.
            if let Some((at, _)) = c.to_acceptor.front() {
                if *at <= step {
                    let (_, mut bytes) = c.to_acceptor.pop_front().unwrap();
                    let cut = 1 + (self.rng.below(bytes.len() as u64)) as usize;
                    if cut < bytes.len() {
                        let rest = bytes.split_off(cut);
                        c.to_acceptor.push_front((step, rest));
                    }
                    c.acceptor
                        .handle_bytes(step, &bytes)
                        .unwrap_or_else(|e| panic!("seed {seed}: link {a}->{b}: {e}"));
                    while let Some(ev) = c.acceptor.poll_event() {
                        if let LinkEvent::Up(_) = ev {
                            c.acceptor.welcome(step);
                        }
                        if let LinkEvent::Frame(Frame::Claims { claims, .. }) = &ev {
                            let me = format!("n{b}");
                            let from = format!("n{a}");
                            let n = &mut self.nodes[b];
                            for c in claims {
                                n.hlc.observe(c.stamp);
                                let local = n.live.get(&*c.client_id).copied();
                                if local.is_some_and(|l| claims::wins((c.stamp, &from), (l, &me))) {
                                    n.live.remove(&*c.client_id);
                                    self.takeovers += 1;
                                }
                            }
                            continue;
                        }
                        if let LinkEvent::Frame(Frame::Retained(entries)) = &ev {
                            let n = &mut self.nodes[b];
                            for e in entries {
                                keep(&mut n.retained, &mut n.hlc, e);
                            }
                            continue;
                        }
                        if let LinkEvent::Frame(
                            f @ (Frame::WillSnapshot { .. }
                            | Frame::WillSet(_)
                            | Frame::WillClear { .. }),
                        ) = &ev
                        {
                            let at = self.epoch + Duration::from_millis(step);
                            self.nodes[b].will_imports[a]
                                .apply(f, at)
                                .unwrap_or_else(|e| {
                                    panic!("seed {seed}: n{b}'s wills from n{a}: {e}")
                                });
                            continue;
                        }
                        if let LinkEvent::Frame(f) = ev {
                            let applied = self.nodes[b].imports[a]
                                .apply(&f)
                                .unwrap_or_else(|e| panic!("seed {seed}: n{b} from n{a}: {e}"));
                            if let Some(seq) = applied.ack {
                                c.acceptor.send(step, &Frame::RouteAck { seq }).unwrap();
                            }
                        }
                    }
                    self.transmit(a, b);
                    continue;
                }
            }
            let Some(c) = self.conns[a][b].as_mut() else {
                return;
            };
            if let Some((at, _)) = c.to_dialer.front() {
                if *at <= step {
                    let (_, bytes) = c.to_dialer.pop_front().unwrap();
                    c.dialer
                        .handle_bytes(step, &bytes)
                        .unwrap_or_else(|e| panic!("seed {seed}: link {a}->{b} dialer: {e}"));
                    let mut up = false;
                    while let Some(ev) = c.dialer.poll_event() {
                        up |= matches!(ev, LinkEvent::Up(_));
                    }
                    if up {
                        // A link that comes up starts from a snapshot.
                        self.snapshots += 1;
                        let c = self.conns[a][b].as_mut().unwrap();
                        let frames = c.feed.start(&self.nodes[a].export, 64);
                        for f in &frames {
                            c.dialer.send(step, f).unwrap();
                        }
                        let at = self.epoch + Duration::from_millis(step);
                        for f in &self.nodes[a].wills.snapshot(128, at) {
                            c.dialer.send(step, f).unwrap();
                        }
                        // Its live connections' claims.
                        let claims: Vec<ClaimEntry> = self.nodes[a]
                            .live
                            .iter()
                            .map(|(id, stamp)| ClaimEntry {
                                client_id: Arc::from(id.as_str()),
                                stamp: *stamp,
                                clean_start: false,
                            })
                            .collect();
                        for part in claims.chunks(4) {
                            let f = Frame::Claims {
                                claims: part.to_vec(),
                                answer: false,
                            };
                            c.dialer.send(step, &f).unwrap();
                        }
                        // Its retained store, deletes included, in parts.
                        let entries: Vec<RetainedEntry> = self.nodes[a]
                            .retained
                            .values()
                            .map(|(stamp, m)| RetainedEntry {
                                stamp: *stamp,
                                message: m.clone(),
                            })
                            .collect();
                        for part in entries.chunks(3) {
                            c.dialer
                                .send(step, &Frame::Retained(part.to_vec()))
                                .unwrap();
                        }
                    }
                    self.transmit(a, b);
                    continue;
                }
            }
            return;
        }
    }

    fn tick(&mut self, a: usize, b: usize) {
        let step = self.step;
        let Some(c) = self.conns[a][b].as_mut() else {
            return;
        };
        if c.dialer.handle_tick(step).unwrap() {
            let e = &self.nodes[a].export;
            let ping = Frame::Ping {
                seq: e.seq(),
                digest: e.digest(),
            };
            c.dialer.send(step, &ping).unwrap();
        }
        let _ = c.acceptor.handle_tick(step).unwrap();
        self.transmit(a, b);
    }
}

fn run_seed(seed: u64) -> (u64, u64, u64, u64) {
    let mut rng = Rng(seed);
    let n = 2 + rng.below(4) as usize;
    let nodes = (0..n)
        .map(|_| {
            let shards = 1 + rng.below(4) as usize;
            Node {
                export: RouteExport::new(),
                outbox: VecDeque::new(),
                shards: vec![BTreeSet::new(); shards],
                imports: (0..n).map(|_| RouteImport::new(1000)).collect(),
                wills: WillExport::new(),
                will_outbox: VecDeque::new(),
                will_truth: BTreeMap::new(),
                will_imports: (0..n).map(|_| WillImport::new(1000, 1 << 20)).collect(),
                retained: BTreeMap::new(),
                hlc: Hlc::new(),
                skew_ms: rng.below(500),
                retained_outbox: VecDeque::new(),
                live: BTreeMap::new(),
                claim_outbox: VecDeque::new(),
            }
        })
        .collect();
    let mut sim = Sim {
        rng,
        step: 0,
        nodes,
        conns: (0..n).map(|_| (0..n).map(|_| None).collect()).collect(),
        epoch: Instant::now(),
        breaks: 0,
        snapshots: 0,
        deltas: 0,
        will_changes: 0,
        takeovers: 0,
    };
    let steps = 3_000;
    let mut all_writes: Vec<RetainedEntry> = Vec::new();
    let mut latest_claims: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut left: BTreeSet<(String, u64)> = BTreeSet::new();
    for step in 0..steps + 500 {
        sim.step = step;
        let faults = step < steps;
        // Dial what is down (at once: backoff is the runtime's).
        for a in 0..n {
            for b in 0..n {
                if a != b && sim.conns[a][b].is_none() && sim.rng.below(5) == 0 {
                    sim.dial(a, b);
                    sim.transmit(a, b);
                }
            }
        }
        if faults {
            // A shard subscribes or unsubscribes.
            let a = sim.rng.below(n as u64) as usize;
            let s = sim.rng.below(sim.nodes[a].shards.len() as u64) as usize;
            let f = FILTERS[sim.rng.below(FILTERS.len() as u64) as usize];
            let add = sim.nodes[a].shards[s].insert(f);
            if !add {
                sim.nodes[a].shards[s].remove(f);
            }
            if let Some(c) = sim.nodes[a].export.shard_changed(f, add) {
                sim.nodes[a].outbox.push_back(c);
            }
            // A client of a node connects with a will, or loses it.
            let a = sim.rng.below(n as u64) as usize;
            let client = format!("c{}", sim.rng.below(12));
            let at = sim.at();
            let node = &mut sim.nodes[a];
            if sim.rng.below(3) == 0 {
                if let Some(f) = node.wills.clear(&client) {
                    node.will_truth.remove(&client);
                    node.will_outbox.push_back(f);
                }
            } else {
                let version = step;
                node.will_truth.insert(client.clone(), version);

                let due = (version % 2 == 0).then(|| at + Duration::from_secs(5));
                let f = node.wills.set(will_entry(&client, version), due);
                node.will_outbox.push_back(f);
            }
            // A client of a node stores or deletes a retained message; the
            // node's clock runs 10 ms a step, off by its skew.
            let a = sim.rng.below(n as u64) as usize;
            let topic = format!("r/{}", sim.rng.below(8));
            let payload = match sim.rng.below(4) {
                0 => String::new(),
                _ => format!("n{a}-{step}"),
            };
            let node = &mut sim.nodes[a];
            let stamp = node.hlc.next(step * 10 + node.skew_ms);
            let e = RetainedEntry {
                stamp,
                message: retained_message(&topic, payload),
            };
            keep(&mut node.retained, &mut node.hlc, &e);
            all_writes.push(e.clone());
            node.retained_outbox.push_back(e);
            // A client connects to a node, or one leaves.
            let a = sim.rng.below(n as u64) as usize;
            let client = format!("d{}", sim.rng.below(6));
            let node = &mut sim.nodes[a];
            if sim.rng.below(4) == 0 {
                if let Some(stamp) = node.live.remove(&client) {
                    left.insert((client, stamp));
                }
            } else {
                let stamp = node.hlc.next(step * 10 + node.skew_ms);
                // A connection of the same client id here is taken over.
                node.live.insert(client.clone(), stamp);
                let name = format!("n{a}");
                let latest = latest_claims
                    .entry(client.clone())
                    .or_insert((0, String::new()));
                if claims::wins((stamp, &name), (latest.0, &latest.1)) {
                    *latest = (stamp, name);
                }
                node.claim_outbox.push_back(ClaimEntry {
                    client_id: Arc::from(client.as_str()),
                    stamp,
                    clean_start: false,
                });
            }
            if sim.rng.below(150) == 0 {
                let a = sim.rng.below(n as u64) as usize;
                let b = sim.rng.below(n as u64) as usize;
                if sim.conns[a][b].take().is_some() {
                    sim.breaks += 1;
                }
            }
        }
        for a in 0..n {
            if sim.rng.below(2) == 0 {
                sim.drain(a);
            }
        }
        if !faults {
            (0..n).for_each(|a| sim.drain(a));
        }
        for a in 0..n {
            for b in 0..n {
                sim.deliver(a, b, seed);
                sim.tick(a, b);
            }
        }
    }
    for a in 0..n {
        let mut truth: BTreeSet<&str> = BTreeSet::new();
        for s in &sim.nodes[a].shards {
            truth.extend(s.iter().copied());
        }
        for b in (0..n).filter(|&b| b != a) {
            let held: BTreeSet<&str> = sim.nodes[b].imports[a].filters().map(|f| &**f).collect();
            assert_eq!(held, truth, "seed {seed}: n{b}'s copy of n{a}'s routes");
            let wills: BTreeMap<String, u64> = sim.nodes[b].will_imports[a]
                .entries()
                .map(|e| {
                    let version = std::str::from_utf8(&e.will.payload).unwrap();
                    (e.client_id.to_string(), version.parse().unwrap())
                })
                .collect();
            assert_eq!(
                wills, sim.nodes[a].will_truth,
                "seed {seed}: n{b}'s copy of n{a}'s wills"
            );
        }
    }
    // Every node holds, for every topic, the version the rule picks among
    // every write made anywhere.
    let mut winners: BTreeMap<String, (u64, Arc<Message>)> = BTreeMap::new();
    let mut clock = Hlc::new();
    for e in &all_writes {
        keep(&mut winners, &mut clock, e);
    }
    for (b, node) in sim.nodes.iter().enumerate() {
        let held: Vec<(&String, u64, &[u8])> = node
            .retained
            .iter()
            .map(|(t, (s, m))| (t, *s, &m.payload[..]))
            .collect();
        let want: Vec<(&String, u64, &[u8])> = winners
            .iter()
            .map(|(t, (s, m))| (t, *s, &m.payload[..]))
            .collect();
        assert_eq!(held, want, "seed {seed}: n{b}'s retained messages");
    }
    // One live connection per client id at most, and the latest one of
    // each is live unless its client left.
    for (client, (stamp, node)) in &latest_claims {
        let live: Vec<String> = (0..n)
            .filter(|&b| sim.nodes[b].live.contains_key(client))
            .map(|b| format!("n{b}"))
            .collect();
        assert!(live.len() <= 1, "seed {seed}: {client} live on {live:?}");
        if !left.contains(&(client.clone(), *stamp)) {
            assert_eq!(
                live,
                std::slice::from_ref(node),
                "seed {seed}: {client}'s latest connection"
            );
            let b: usize = node[1..].parse().unwrap();
            assert_eq!(sim.nodes[b].live[client], *stamp);
        }
    }
    (
        sim.breaks,
        sim.snapshots,
        sim.deltas + sim.will_changes,
        sim.takeovers,
    )
}

#[test]
fn seeded() {
    let seeds: Vec<u64> = match std::env::var("SHARDMQ_BRIDGE_SEED") {
        Ok(s) => vec![s.parse().expect("a seed")],
        Err(_) => {
            let n = std::env::var("SHARDMQ_BRIDGE_SEEDS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(300);
            (1..=n).collect()
        }
    };
    let (mut breaks, mut snapshots, mut deltas, mut takeovers) = (0, 0, 0, 0);
    for &seed in &seeds {
        let (b, s, d, t) = run_seed(seed);
        breaks += b;
        snapshots += s;
        deltas += d;
        takeovers += t;
    }
    eprintln!(
        "bridge routes, wills, retained and claims: {} seeds, {breaks} connections broken, {snapshots} \
         snapshots, {deltas} route and will changes, {takeovers} connections taken over from \
         another node; every copy matched its node, every node kept the winning version of \
         every retained topic, one live connection per client id",
        seeds.len()
    );
}
