//! The crash test: the broker runs as a child process and is killed with
//! SIGKILL at random moments, then started again on the same data
//! directory, 20 times (kill-safe mode; 8 more in power-safe mode), while
//! QoS 1 and QoS 2 publishers run against
//! persistent subscribers (two connected, one offline the whole time).
//! Queues keep 50 messages in memory, so most of what waits for the
//! offline subscriber is paged out to the log and read back.
//!
//! What must hold at the end: every message whose PUBACK (QoS 1) or PUBCOMP
//! (QoS 2) its publisher received has reached each persistent subscriber,
//! at least once for QoS 1 and exactly once for QoS 2; the retained message
//! and the subscriptions are back after every restart.
//!
//! The clients behave as MQTT requires across reconnects: publishers resend
//! an unacknowledged PUBLISH with DUP (or their PUBREL) on the same packet
//! id; QoS 2 subscribers remember the packet ids they answered PUBREC for
//! until PUBREL, and deliver a message to the application once. The random
//! moments come from a seed printed on failure (set SHARDMQ_CRASH_SEED to
//! replay one).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use common::child::{config_file, temp_dir, ChildBroker};
use common::raw::pub_resp;
use common::Raw;
use shardmq::codec::{
    self, Connect, Packet, Properties, Publish, QoS, SubOptions, Subscribe, Version,
};

const CYCLES: usize = 20;

/// A blocking MQTT 5.0 connection that reports a dead broker instead of
/// panicking.
struct Conn(Raw);

/// The broker went away (killed): the client will reconnect.
#[derive(Debug)]
struct Gone;

impl Conn {
    /// Connect with a persistent session; returns the session-present flag.
    fn open(addr: SocketAddr, id: &str, clean: bool) -> Result<(Conn, bool), Gone> {
        let mut c = Conn(Raw::try_open(addr, Version::V5).map_err(|_| Gone)?);
        let connect = Connect {
            version: Version::V5,
            clean_start: clean,
            keep_alive: 60,
            client_id: id.into(),
            will: None,
            username: None,
            password: None,
            properties: Properties {
                session_expiry_interval: Some(3600),
                ..Properties::default()
            },
        };
        c.send(&Packet::Connect(Box::new(connect)))?;
        match c.recv(Duration::from_secs(10))? {
            Some(Packet::ConnAck(a)) if a.reason == 0 => Ok((c, a.session_present)),
            other => panic!("{id}: expected CONNACK, got {other:?}"),
        }
    }

    fn send(&mut self, p: &Packet) -> Result<(), Gone> {
        self.0.try_send(p).map_err(|_| Gone)
    }

    /// The next packet, None after `wait` without one.
    fn recv(&mut self, wait: Duration) -> Result<Option<Packet>, Gone> {
        match self.0.recv_within(wait) {
            Ok(Some(p)) => Ok(Some(p)),
            Ok(None) => Err(Gone),
            Err(()) => Ok(None),
        }
    }
}

/// Where a publisher's one message in flight stands.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// PUBLISH sent, waiting for PUBACK or PUBREC.
    Published,
    /// PUBREL sent, waiting for PUBCOMP.
    Released,
}

/// A publisher's state, kept across broker restarts.
struct Publisher {
    id: String,
    qos: QoS,
    topic: &'static str,
    next: u32,
    inflight: Option<(u32, u16, Stage)>,
    /// Messages whose PUBACK / PUBCOMP arrived.
    acked: Vec<u32>,
    /// Stop publishing new messages (finish the one in flight).
    draining: bool,
}

impl Publisher {
    fn publish_packet(&self, n: u32, pid: u16, dup: bool) -> Packet {
        Packet::Publish(Publish {
            dup,
            qos: self.qos,
            retain: false,
            topic: format!("{}/{}", self.topic, n % 7).into(),
            packet_id: pid,
            payload: bytes::Bytes::from(format!("{}-{n}", self.id)),
            properties: Properties::default().into(),
        })
    }

    /// Publish until the broker dies (when draining: until nothing is in
    /// flight).
    fn run(&mut self, addr: SocketAddr) -> Result<(), Gone> {
        let (mut c, _) = Conn::open(addr, &self.id, false)?;
        // Resume the message in flight as MQTT requires: same packet id.
        match self.inflight {
            Some((n, pid, Stage::Published)) => c.send(&self.publish_packet(n, pid, true))?,
            Some((_, pid, Stage::Released)) => c.send(&Packet::PubRel(pub_resp(pid)))?,
            None => {}
        }
        loop {
            if self.inflight.is_none() {
                if self.draining {
                    return Ok(());
                }
                // About 2,000 messages a second: enough to be killed in
                // every stage of every flow, few enough to check.
                if self.next % 4 == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
                let n = self.next;
                self.next += 1;
                let pid = (n % 60_000) as u16 + 1;
                c.send(&self.publish_packet(n, pid, false))?;
                self.inflight = Some((n, pid, Stage::Published));
            }
            let Some(p) = c.recv(Duration::from_secs(5))? else {
                panic!("{}: no acknowledgement within 5 s", self.id);
            };
            let (n, pid, _) = self.inflight.expect("one in flight");
            match p {
                Packet::PubAck(a) if a.packet_id == pid => {
                    assert_eq!(a.reason, 0, "{}: PUBACK {a:?}", self.id);
                    self.acked.push(n);
                    self.inflight = None;
                }
                Packet::PubRec(r) if r.packet_id == pid => {
                    assert_eq!(r.reason, 0, "{}: PUBREC {r:?}", self.id);
                    self.inflight = Some((n, pid, Stage::Released));
                    c.send(&Packet::PubRel(pub_resp(pid)))?;
                }
                Packet::PubComp(r) if r.packet_id == pid => {
                    self.acked.push(n);
                    self.inflight = None;
                }
                other => panic!("{}: unexpected {other:?}", self.id),
            }
        }
    }
}

/// A subscriber's state, kept across broker restarts.
struct Subscriber {
    id: String,
    /// Every application delivery, in order.
    received: Vec<String>,
    /// QoS 2 packet ids answered with PUBREC and not yet released.
    pending: HashSet<u16>,
}

impl Subscriber {
    fn new(id: String) -> Subscriber {
        Subscriber {
            id,
            received: Vec::new(),
            pending: HashSet::new(),
        }
    }

    /// Receive until the broker dies or (when `quiet` is given) nothing
    /// arrives for that long.
    fn run(&mut self, addr: SocketAddr, quiet: Option<Duration>) -> Result<(), Gone> {
        let (mut c, present) = Conn::open(addr, &self.id, false)?;
        assert!(present, "{}: the session must survive the restart", self.id);
        loop {
            let wait = quiet.unwrap_or(Duration::from_millis(100));
            let Some(p) = c.recv(wait)? else {
                if quiet.is_some() {
                    return Ok(());
                }
                continue;
            };
            match p {
                Packet::Publish(m) => {
                    let text = String::from_utf8(m.payload.to_vec()).unwrap();
                    match m.qos {
                        QoS::AtMostOnce => self.received.push(text),
                        QoS::AtLeastOnce => {
                            self.received.push(text);
                            c.send(&Packet::PubAck(pub_resp(m.packet_id)))?;
                        }
                        QoS::ExactlyOnce => {
                            if self.pending.insert(m.packet_id) {
                                self.received.push(text);
                            }
                            c.send(&Packet::PubRec(pub_resp(m.packet_id)))?;
                        }
                    }
                }
                Packet::PubRel(r) => {
                    self.pending.remove(&r.packet_id);
                    c.send(&Packet::PubComp(pub_resp(r.packet_id)))?;
                }
                other => panic!("{}: unexpected {other:?}", self.id),
            }
        }
    }
}

/// Subscribe `id` (fresh persistent session) to `filter` and leave.
fn subscribe_once(addr: SocketAddr, id: &str, filter: &str, qos: QoS) {
    let (mut c, _) = Conn::open(addr, id, true).unwrap();
    c.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            filter.into(),
            SubOptions {
                qos,
                ..SubOptions::default()
            },
        )],
        properties: Properties::default().into(),
    }))
    .unwrap();
    match c.recv(Duration::from_secs(5)).unwrap() {
        Some(Packet::SubAck(a)) => assert_eq!(a.reasons, vec![qos as u8]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    c.send(&Packet::Disconnect(codec::Disconnect::default()))
        .unwrap();
}

/// A fresh client subscribing to the retained topic gets the retained
/// message.
fn expect_retained(addr: SocketAddr, cycle: usize) {
    let (mut c, _) = Conn::open(addr, &format!("retained-check-{cycle}"), true).unwrap();
    c.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![("crash/retained".into(), SubOptions::default())],
        properties: Properties::default().into(),
    }))
    .unwrap();
    let mut got = None;
    while let Some(p) = c.recv(Duration::from_secs(5)).unwrap() {
        match p {
            Packet::SubAck(_) => {}
            Packet::Publish(m) => {
                got = Some(m.payload.to_vec());
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        got.as_deref(),
        Some(&b"kept across crashes"[..]),
        "cycle {cycle}: the retained message is back"
    );
}

/// How many times each message reached a subscriber's application.
fn counts(s: &Subscriber) -> BTreeMap<&str, usize> {
    let mut m: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &s.received {
        *m.entry(r.as_str()).or_default() += 1;
    }
    m
}

/// A client id whose session lives on `shard` of 2.
fn id_on(prefix: &str, shard: usize) -> String {
    common::id_on(prefix, shard, 2)
}

#[test]
fn acknowledged_messages_survive_20_kill_9_restarts() {
    crash_cycles("kill_safe", CYCLES);
}

#[test]
fn power_safe_acknowledged_messages_survive_kill_9_restarts() {
    crash_cycles("power_safe", 8);
}

/// Run the crash test with `durability` for `cycles` kills.
fn crash_cycles(durability: &str, cycles: usize) {
    let seed = common::seed_from_env("SHARDMQ_CRASH_SEED");
    eprintln!("crash test seed: {seed} (SHARDMQ_CRASH_SEED={seed} replays the kill moments)");
    let mut rng = common::XorShift::new(seed);
    let dir = temp_dir(&format!("crash-{durability}"));
    let config = config_file(
        &dir,
        // 50 messages per queue in memory: the offline subscriber's queue,
        // and any backlog of the others, waits in the log (paged out and
        // read back across restarts and compactions).
        "[mqtt]\npacket_size_max_bytes = 65536\nqueue_messages_max = 50\nqueue_bytes_max = 65536\n\
         [storage]\nsegment_bytes = 1048576\nsession_queue_bytes_max = 1073741824\n",
    );
    let data = dir.join("data");
    let args = [
        "--durability",
        durability,
        "--shards",
        "2",
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ];

    let mut publishers = [
        Publisher {
            id: id_on("pub1", 0),
            qos: QoS::AtLeastOnce,
            topic: "crash/q1",
            next: 0,
            inflight: None,
            acked: Vec::new(),
            draining: false,
        },
        Publisher {
            id: id_on("pub2", 1),
            qos: QoS::ExactlyOnce,
            topic: "crash/q2",
            next: 0,
            inflight: None,
            acked: Vec::new(),
            draining: false,
        },
    ];
    let mut s1 = Subscriber::new(id_on("sub1", 1));
    let mut s2 = Subscriber::new(id_on("sub2", 0));
    let mut offline = Subscriber::new(id_on("offline", 1));

    let mut broker = ChildBroker::start(&args);
    subscribe_once(broker.addr, &s1.id, "crash/q1/#", QoS::AtLeastOnce);
    subscribe_once(broker.addr, &s2.id, "crash/q2/#", QoS::ExactlyOnce);
    subscribe_once(broker.addr, &offline.id, "crash/#", QoS::ExactlyOnce);
    {
        let (mut c, _) = Conn::open(broker.addr, "retainer", true).unwrap();
        let mut p = publishers[0].publish_packet(0, 1, false);
        if let Packet::Publish(p) = &mut p {
            p.topic = "crash/retained".into();
            p.retain = true;
            p.payload = bytes::Bytes::from_static(b"kept across crashes");
        }
        c.send(&p).unwrap();
        assert!(matches!(
            c.recv(Duration::from_secs(5)).unwrap(),
            Some(Packet::PubAck(_))
        ));
    }

    for cycle in 0..cycles {
        if cycle > 0 {
            broker = ChildBroker::start(&args);
        }
        expect_retained(broker.addr, cycle);
        let addr = broker.addr;
        let kill_after = Duration::from_millis(100 + rng.below(400) as u64);
        std::thread::scope(|scope| {
            let mut handles = Vec::new();
            for p in publishers.iter_mut() {
                handles.push(scope.spawn(move || {
                    let _ = p.run(addr);
                }));
            }
            for s in [&mut s1, &mut s2] {
                handles.push(scope.spawn(move || {
                    let _ = s.run(addr, None);
                }));
            }
            std::thread::sleep(kill_after);
            broker.kill9();
            for h in handles {
                h.join().expect("client thread");
            }
        });
        let recovered = broker
            .log_text()
            .lines()
            .filter(|l| l.contains("recovered") || l.contains("log:"))
            .map(|l| l.split("] ").nth(1).unwrap_or(l).to_string())
            .collect::<Vec<_>>()
            .join("; ");
        eprintln!(
            "cycle {cycle}: killed after {kill_after:?}; acked so far {} / {}; at start: {recovered}",
            publishers[0].acked.len(),
            publishers[1].acked.len()
        );
    }

    // A last start: publishers finish what is in flight, everyone drains.
    let mut broker = ChildBroker::start(&args);
    expect_retained(broker.addr, cycles);
    for p in publishers.iter_mut() {
        p.draining = true;
        p.run(broker.addr).expect("the broker stays up");
    }
    let quiet = Some(Duration::from_secs(2));
    for s in [&mut s1, &mut s2, &mut offline] {
        s.run(broker.addr, quiet).expect("the broker stays up");
    }
    broker.stop();

    let acked = |p: &Publisher| -> Vec<String> {
        p.acked.iter().map(|n| format!("{}-{n}", p.id)).collect()
    };
    let (q1, q2) = (acked(&publishers[0]), acked(&publishers[1]));
    assert!(
        q1.len() > 100 && q2.len() > 100,
        "too little traffic: {} / {}",
        q1.len(),
        q2.len()
    );
    let (c1, c2, co) = (counts(&s1), counts(&s2), counts(&offline));
    let seedmsg = format!("(seed {seed}; data dir {})", dir.display());
    let mut failures = Vec::new();
    for (who, c, want, once) in [
        (&s1.id, &c1, &q1, false),
        (&offline.id, &co, &q1, false),
        (&s2.id, &c2, &q2, true),
        (&offline.id, &co, &q2, true),
    ] {
        let lost: Vec<&String> = want
            .iter()
            .filter(|m| !c.contains_key(m.as_str()))
            .collect();
        let twice: Vec<&String> = want
            .iter()
            .filter(|m| once && c.get(m.as_str()).is_some_and(|n| *n > 1))
            .collect();
        if !lost.is_empty() {
            failures.push(format!(
                "{who}: {} of {} acknowledged messages lost, first {:?}",
                lost.len(),
                want.len(),
                &lost[..lost.len().min(5)]
            ));
        }
        if !twice.is_empty() {
            failures.push(format!(
                "{who}: {} QoS 2 messages delivered twice, first {:?}",
                twice.len(),
                &twice[..twice.len().min(5)]
            ));
        }
    }
    assert!(failures.is_empty(), "{seedmsg}\n{}", failures.join("\n"));
    eprintln!(
        "acked: {} QoS 1, {} QoS 2; received: {} / {} / {} (offline)",
        q1.len(),
        q2.len(),
        s1.received.len(),
        s2.received.len(),
        offline.received.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
