//! Heap allocations per message on the hot path, counted by a counting
//! global allocator: two shards' cores driven as the runtime drives them
//! (a read's bytes decoded packet by packet, the mesh batches of the turn
//! handed to the other shard, the subscriber's packets encoded into its
//! write buffer), without sockets, so the count is exact and the same on
//! every machine. It bounds what a message costs in allocations, not in
//! time: a new allocation per message on the path fails it.
//!
//! What one QoS 0 message from a client on one shard to a subscriber on
//! the other allocates today: its payload's copy (`message::own_buffers`:
//! a message must not keep its publisher's read buffer alive) and the
//! shared `Arc<Message>`. Per read (100 packets here), the read buffer and
//! its shared handle; per turn, the mesh batch. The topic is the
//! connection's last one, shared, not allocated again.

#[path = "common/model.rs"]
#[allow(dead_code)] // the simulators' client model; this test decodes with it
mod model;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use shardmq::codec::{self, Connect, Packet, Properties, Publish, QoS, Subscribe, Version};
use shardmq::shard::mesh::Mesh;
use shardmq::shard::{Arrival, ConnHandle, Handshake, ShardCore};
use shardmq::Config;

/// The system allocator, counting the allocations (and reallocations) of
/// a thread in its [`ALLOCATIONS`] while its [`COUNTING`] is on (tests run
/// on threads of their own, side by side).
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    if COUNTING.with(Cell::get) {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
    }
}

// SAFETY: every call is passed to `System` unchanged; counting touches
// only const-initialized thread locals (no allocation).
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The allocations `f` makes on this thread.
fn allocations<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = ALLOCATIONS.with(Cell::get);
    COUNTING.with(|c| c.set(true));
    let out = f();
    COUNTING.with(|c| c.set(false));
    (out, ALLOCATIONS.with(Cell::get) - before)
}

/// Two shards in memory mode, a client on each, as the runtime runs them.
struct Broker {
    cores: Vec<ShardCore>,
    now: Instant,
}

/// A connected client: its shard, its connection, the broker's output
/// not yet decoded.
struct Client {
    shard: usize,
    conn: Rc<ConnHandle>,
    version: Version,
    inbuf: BytesMut,
}

impl Broker {
    fn new() -> Broker {
        let mut config = Config::default();
        config.server.shards = 2;
        config.storage.durability = "memory".into();
        config.validate().expect("a valid config");
        let cores = (0..2)
            .map(|id| {
                let mesh = Mesh::new(id, 2, config.mesh.outbox_messages_max);
                ShardCore::new(id, 2, config.clone(), mesh, 1)
            })
            .collect();
        Broker {
            cores,
            now: Instant::now(),
        }
    }

    /// Hand every batch the cores queued to its shard, and run the
    /// retained-message gathers a subscription starts, until nothing is
    /// left (the runtime's lanes and gather task, turn after turn).
    fn pump(&self) {
        loop {
            let mut moved = false;
            for (from, core) in self.cores.iter().enumerate() {
                moved |= core.run_gathers(self.now, 8);
                for (to, batch) in core.mesh().poll_batches() {
                    core.mesh().sent(batch.len());
                    let handoffs = self.cores[to].handle_mesh(batch, from, self.now);
                    assert!(handoffs.is_empty(), "no socket moves here");
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// A client with a clean session, connected on its home shard.
    fn connect(&self, client_id: &str, version: Version) -> Client {
        let connect = Connect {
            version,
            clean_start: true,
            keep_alive: 0,
            client_id: client_id.into(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        };
        let (home, assigned) = match self.cores[0].handshake(&connect, Arrival::LOOPBACK, self.now)
        {
            Handshake::Serve { assigned, .. } => (0, assigned),
            Handshake::MoveTo { home, assigned, .. } => (home, assigned),
            Handshake::Refuse { code, .. } => panic!("CONNECT refused 0x{code:02X}"),
        };
        let conn = self.cores[home]
            .attach(self.now, Box::new(connect), assigned)
            .expect("attached");
        self.pump();
        let mut client = Client {
            shard: home,
            conn,
            version,
            inbuf: BytesMut::new(),
        };
        let got = self.read(&mut client, &mut BytesMut::new());
        assert!(matches!(got.first(), Some(Packet::ConnAck(_))), "{got:?}");
        client
    }

    /// The runtime's reader: decode `bytes` (one read) packet by packet
    /// and handle each, then pass the turn's batches on.
    fn input(&self, client: &Client, bytes: &[u8], last_topic: &mut Option<std::sync::Arc<str>>) {
        let mut buf = BytesMut::with_capacity(16384);
        buf.extend_from_slice(bytes);
        while let Some(p) = codec::decode_sharing(&mut buf, client.version, 1 << 20, last_topic)
            .expect("decodable input")
        {
            self.cores[client.shard].handle_packet(&client.conn, self.now, p);
        }
        assert!(buf.is_empty(), "whole packets only");
        self.pump();
    }

    /// The runtime's writer: encode what waits for `client` into `out`
    /// (cleared first, given back past 8 KiB as the runtime does), and
    /// return it decoded (not counted).
    fn read(&self, client: &mut Client, out: &mut BytesMut) -> Vec<Packet> {
        out.clear();
        if out.capacity() > 8192 {
            *out = BytesMut::new();
        }
        self.cores[client.shard].poll_transmit(&client.conn, out, 65536);
        self.pump();
        let was = COUNTING.with(|c| c.replace(false));
        let packets = model::packets(&mut client.inbuf, out, client.version);
        COUNTING.with(|c| c.set(was));
        packets
    }
}

/// The encoding of `n` QoS 0 PUBLISHes of 64-byte payloads to `topic`,
/// in `version`, with `properties`.
fn publishes(topic: &str, n: usize, version: Version, properties: &Properties) -> Vec<u8> {
    let mut out = BytesMut::new();
    for i in 0..n {
        let mut payload = vec![b'x'; 64];
        payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let p = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic.into(),
            packet_id: 0,
            payload: Bytes::from(payload),
            properties: properties.clone().into(),
        };
        codec::encode(&Packet::Publish(p), version, &mut out);
    }
    out.to_vec()
}

/// Allocations while 10,000 QoS 0 messages in `version`, with
/// `properties`, go from a publisher on one shard to a subscriber on the
/// other, in reads of 100: they all arrive, and at most `per_message`
/// allocations per message and twelve per read are made (what each is:
/// the module's doc). More means something on the path allocates per
/// message again.
fn cross_shard_allocations(version: Version, properties: Properties, per_message: usize) {
    let broker = Broker::new();
    // A publisher and a subscriber whose home shards differ.
    let mut sub = broker.connect("alloc-sub", version);
    let pub_id = (0..)
        .map(|i| format!("alloc-pub-{i}"))
        .find(|id| broker.connect(id, version).shard != sub.shard)
        .unwrap();
    let publisher = broker.connect(&pub_id, version);
    assert_ne!(publisher.shard, sub.shard);
    let subscribe = Subscribe {
        packet_id: 1,
        filters: vec![("bench/pairs/+".into(), model::sub_options(QoS::AtMostOnce))],
        properties: Properties::default().into(),
    };
    broker.cores[sub.shard].handle_packet(&sub.conn, broker.now, Packet::Subscribe(subscribe));
    broker.pump();
    let mut out = BytesMut::new();
    let got = broker.read(&mut sub, &mut out);
    assert!(matches!(got.first(), Some(Packet::SubAck(_))), "{got:?}");

    // Reads of 100 packets each; the subscriber's writer runs after each.
    const PER_READ: usize = 100;
    let read = publishes("bench/pairs/7", PER_READ, version, &properties);
    let mut last_topic = None;
    let mut run = |reads: usize| {
        let mut delivered = 0;
        for _ in 0..reads {
            broker.input(&publisher, &read, &mut last_topic);
            for p in broker.read(&mut sub, &mut out) {
                let Packet::Publish(p) = p else {
                    panic!("not a delivery: {p:?}");
                };
                assert_eq!(*p.properties, properties);
                delivered += 1;
            }
        }
        delivered
    };
    // Warm up: queues, maps and buffers reach their working size.
    assert_eq!(run(20), 20 * PER_READ);
    let reads = 100;
    let (delivered, n) = allocations(|| run(reads));
    assert_eq!(delivered, reads * PER_READ, "every message delivered");
    println!(
        "{version:?}: {n} allocations for {delivered} messages in {reads} reads: {:.3} per message",
        n as f64 / delivered as f64
    );
    let bound = per_message * delivered + 12 * reads;
    assert!(n as usize <= bound, "{n} allocations (at most {bound})");
}

#[test]
fn a_qos0_message_to_another_shard_allocates_at_most_twice() {
    cross_shard_allocations(Version::V3_1_1, Properties::default(), 2);
    cross_shard_allocations(Version::V5, Properties::default(), 2);
}

#[test]
fn a_qos0_message_with_a_property_allocates_once_more_for_it() {
    // A 5.0 client saying its payload is UTF-8: the message's properties
    // are boxed (`codec::BoxedProperties` says why).
    let utf8 = Properties {
        payload_format_indicator: Some(1),
        ..Properties::default()
    };
    cross_shard_allocations(Version::V5, utf8, 3);
}
