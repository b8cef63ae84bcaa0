//! Hostile and broken clients: packets built to stop a shard, flood the
//! log or leave the broker half alive. After each attack the broker must
//! still serve fresh clients on every shard, and the attacker must get the
//! right reason code, read rather than reset.

mod common;

use std::io::Write;
use std::time::Duration;

use bytes::BytesMut;
use common::child::{self, temp_dir, ChildBroker};
use common::raw::*;
use common::*;
use shardmq::codec::{self, Packet, QoS, Version};

/// The tests that open thousands of sockets run one at a time: together
/// they would pass the test process's open-file limit (20,000 here).
static MANY_SOCKETS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn many_sockets() -> std::sync::MutexGuard<'static, ()> {
    MANY_SOCKETS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A 2-shard broker without a log, with `config` (TOML) written in `dir`.
fn memory_broker_with(dir: &std::path::Path, config: &str) -> ChildBroker {
    let config = child::config_file(dir, config);
    ChildBroker::start(&[
        "--shards",
        "2",
        "--durability",
        "memory",
        "--config",
        config.to_str().unwrap(),
    ])
}

/// Every shard of `b` still round-trips a QoS 1 message.
fn every_shard_serves(addr: std::net::SocketAddr, shards: usize, name: &str) {
    for shard in 0..shards {
        let sub = id_on(&format!("{name}-sub"), shard, shards);
        let publisher = id_on(&format!("{name}-pub"), shard, shards);
        assert_round_trip(addr, &sub, &publisher, &format!("alive/{name}/{shard}"));
    }
}

/// The packets in `bytes` (what a 5.0 client read until the close).
fn packets(bytes: &[u8]) -> Vec<Packet> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(p) = codec::decode(&mut buf, Version::V5, 1 << 28).expect("valid packets") {
        out.push(p);
    }
    out
}

/// The issue's reproduction: a 60,000-byte Response Topic holding `#` and
/// control characters used to be quoted whole into the DISCONNECT reason
/// string, overflow the 65,535-byte field and panic the shard.
#[test]
fn a_huge_response_topic_gets_0x82_with_a_short_reason_and_every_shard_lives() {
    let b = TestBroker::start(2);
    for shard in 0..2 {
        let id = b.id_on_shard("huge-rt", shard);
        let (mut c, ack) = Raw::connect(b.addr, Version::V5, &id, true);
        assert_eq!(ack.reason, 0);
        let mut p = publish("t", b"x", QoS::AtMostOnce, false, 0);
        let rt: String = "\u{7f}\n#".repeat(20_000);
        p.properties.response_topic = Some(rt);
        c.send(&Packet::Publish(p));
        let got = packets(&read_until_close(&mut c.stream));
        let Some(Packet::Disconnect(d)) = got.last() else {
            panic!("expected a DISCONNECT, got {got:?}");
        };
        assert_eq!(d.reason, 0x82);
        let why = d.properties.reason_string.as_deref().unwrap_or("");
        assert!(why.len() <= 256, "reason string of {} bytes", why.len());
        assert!(why.contains("response topic"), "{why}");
        assert!(!why.contains('\n'), "control characters are escaped: {why}");
    }
    every_shard_serves(b.addr, 2, "huge-rt");
}

/// The same class through another path: a `$delayed/` topic too long to
/// quote, whose delay is not a number.
#[test]
fn a_huge_bad_delayed_topic_gets_a_disconnect_with_a_short_reason() {
    let b = TestBroker::start(2);
    let (mut c, _) = Raw::connect(b.addr, Version::V5, "huge-delayed", true);
    let topic = format!("$delayed/x/{}", "\u{7f}".repeat(20_000));
    c.send(&Packet::Publish(publish(
        &topic,
        b"x",
        QoS::AtMostOnce,
        false,
        0,
    )));
    let got = packets(&read_until_close(&mut c.stream));
    let Some(Packet::Disconnect(d)) = got.last() else {
        panic!("expected a DISCONNECT, got {got:?}");
    };
    assert_eq!(d.reason, 0x90);
    let why = d.properties.reason_string.as_deref().unwrap_or("");
    assert!(why.len() <= 256, "reason string of {} bytes", why.len());
    every_shard_serves(b.addr, 2, "huge-delayed");
}

/// Eclipse Paho's 5.0 interoperability case: one QoS 2 PUBLISH past the
/// Receive Maximum while the client keeps sending. The client must read
/// DISCONNECT 0x93, not a reset: the broker shuts its write side and drains
/// the input before it closes.
#[test]
fn a_publish_past_receive_maximum_reads_0x93_although_the_client_keeps_sending() {
    let b = TestBroker::start_with(2, |c| c.mqtt.receive_maximum = 2);
    let (mut c, _) = Raw::connect(b.addr, Version::V5, "past-rm", true);
    for id in 1..=3 {
        c.send(&Packet::Publish(publish(
            "rm/t",
            b"x",
            QoS::ExactlyOnce,
            false,
            id,
        )));
    }
    // The broker has closed by now; the client goes on acknowledging and
    // pinging before it reads, as the Paho client does. Every write must
    // go through: a reset here would be the broken pipe Paho reports.
    std::thread::sleep(Duration::from_millis(200));
    for i in 0..50 {
        let mut out = encode(&puback(7), Version::V5);
        out.extend(encode(&Packet::PingReq, Version::V5));
        if let Err(e) = c.stream.write_all(&out) {
            panic!("write {i} after the broker's close failed: {e}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let got = packets(&read_until_close(&mut c.stream));
    let disconnect = got.iter().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d.reason),
        _ => None,
    });
    assert_eq!(disconnect, Some(0x93), "{got:?}");
    every_shard_serves(b.addr, 2, "past-rm");
}

/// A shard that panics takes the process with it (exit 101), with the
/// panic, the shard and the client in the log: never a half-alive broker.
/// The trigger exists in debug builds only.
#[test]
fn a_shard_panic_ends_the_process_naming_the_shard_and_the_client() {
    let dir = temp_dir("panic-exits");
    let data = dir.to_str().unwrap();
    let mut b = ChildBroker::try_start_env(
        "127.0.0.1:0",
        &["--shards", "2", "--data-dir", data],
        &[("SHARDMQ_TEST_PANIC_CLIENT_ID", "panic-me")],
    )
    .unwrap();
    let (mut c, ack) = Raw::connect(b.addr, Version::V5, "panic-me", true);
    assert_eq!(ack.reason, 0);
    c.send(&Packet::PingReq);
    assert_eq!(b.wait_exit(Duration::from_secs(10)), Some(101));
    let log = b.log_text();
    assert!(log.contains("test-only panic trigger"), "{log}");
    assert!(
        log.contains("panicked while handling client \"panic-me\""),
        "{log}"
    );
    assert!(log.contains("thread shard-"), "{log}");
    // A restart on the same data directory serves again.
    let b = ChildBroker::start(&["--shards", "2", "--data-dir", data]);
    every_shard_serves(b.addr, 2, "after-panic");
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Client text in the log is escaped and short, and one client cannot
/// write more than a few lines however many refusals it causes.
#[test]
fn a_client_cannot_forge_or_flood_log_lines() {
    let b = ChildBroker::start(&["--shards", "2", "--durability", "memory"]);
    let id = "evil\n[2026-01-01T00:00:00Z ERROR shardmq] forged line";
    let (mut c, ack) = Raw::connect(b.addr, Version::V5, id, true);
    assert_eq!(ack.reason, 0);
    // 5.0 QoS 1 publishes to a malformed `$delayed/` topic are refused in
    // their PUBACK (0x90) and logged, without a close: 200 log causes.
    let topic = format!("$delayed/x/{}", "y".repeat(1000));
    for id in 1..=200u16 {
        c.publish(&topic, b"x", QoS::AtLeastOnce, false, id);
        match c.recv() {
            Some(Packet::PubAck(a)) => assert_eq!((a.packet_id, a.reason), (id, 0x90)),
            other => panic!("expected PUBACK 0x90, got {other:?}"),
        }
    }
    every_shard_serves(b.addr, 2, "log-flood");
    let log = b.log_text();
    assert!(
        !log.lines().any(|l| l.starts_with("[2026-01-01")),
        "a forged line:\n{log}"
    );
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("forged line")).collect();
    assert!(
        !lines.is_empty() && lines.len() <= 5,
        "{} lines for one client:\n{}",
        lines.len(),
        lines.join("\n")
    );
    assert!(lines.iter().all(|l| l.len() < 600), "{lines:?}");
    assert!(lines[0].contains(r#""evil\n[2026"#), "{}", lines[0]);
}

/// Sockets that never send CONNECT are closed at the connect timeout while
/// other clients connect and publish; the broker's memory stays bounded.
#[test]
fn two_thousand_silent_sockets_are_closed_at_the_connect_timeout() {
    let _one_at_a_time = many_sockets();
    let dir = temp_dir("silent-sockets");
    let b = memory_broker_with(&dir, "[server]\nconnect_timeout_ms = 1000\n");
    let silent: Vec<std::net::TcpStream> = (0..2000)
        .map(|_| std::net::TcpStream::connect(b.addr).expect("connect"))
        .collect();
    every_shard_serves(b.addr, 2, "silent");
    b.assert_rss_below(256, "with 2,000 silent sockets");
    for mut s in silent {
        // Closed by the broker: EOF (or a reset) well within the wait.
        assert_eq!(read_until_close(&mut s), Vec::<u8>::new());
    }
    every_shard_serves(b.addr, 2, "after-silent");
    let _ = std::fs::remove_dir_all(&dir);
}

/// 500 connections with one client id, all at once: each takes the
/// session over from the one before; one connection is left, the others
/// are told (0x8E) and closed, and the broker holds one session.
#[test]
fn a_takeover_storm_leaves_one_connection_and_a_bounded_broker() {
    let _one_at_a_time = many_sockets();
    let b = ChildBroker::start(&["--shards", "2", "--durability", "memory"]);
    let connect = encode(
        &Packet::Connect(Box::new(v5_connect("storm", false, 600))),
        Version::V5,
    );
    let mut streams: Vec<std::net::TcpStream> = (0..500)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(b.addr).unwrap();
            s.write_all(&connect).unwrap();
            s
        })
        .collect();
    let mut open = 0;
    for s in &mut streams {
        match try_read_until_close(s) {
            Ok(bytes) => {
                let got = packets(&bytes);
                assert!(
                    matches!(got.last(), Some(Packet::Disconnect(d)) if d.reason == 0x8E),
                    "a replaced connection is told why: {got:?}"
                );
            }
            Err(_) => open += 1,
        }
    }
    assert_eq!(open, 1, "exactly one connection holds the session");
    every_shard_serves(b.addr, 2, "storm");
    b.assert_rss_below(128, "after the takeover storm");
}

/// One SUBSCRIBE with 5,000 wildcard filters over 300 retained messages:
/// past `subscriptions_max` (1,000) filters are refused with 0x97, the
/// retained replay stays bounded, and other clients are served meanwhile.
#[test]
fn a_subscribe_with_thousands_of_wildcard_filters_is_bounded() {
    let b = ChildBroker::start(&["--shards", "2", "--durability", "memory"]);
    let (mut p, _) = Raw::connect(b.addr, Version::V5, "wild-pub", true);
    for i in 0..300u16 {
        p.publish(&format!("w/{i}/x"), b"r", QoS::AtLeastOnce, true, i + 1);
        assert!(matches!(p.recv(), Some(Packet::PubAck(_))));
    }
    let (mut s, _) = Raw::connect(b.addr, Version::V5, "wild-sub", true);
    let filters: Vec<(String, codec::SubOptions)> = std::iter::once("w/#".to_string())
        .chain((0..5000).map(|i| format!("w/+/{i}/#")))
        .map(|f| (f, codec::SubOptions::default()))
        .collect();
    s.send(&Packet::Subscribe(codec::Subscribe {
        packet_id: 9,
        filters,
        properties: Default::default(),
    }));
    every_shard_serves(b.addr, 2, "wild-others");
    let mut granted = 0;
    let mut refused = 0;
    let mut retained = 0;
    loop {
        match s.recv_within(Duration::from_secs(3)) {
            Ok(Some(Packet::SubAck(a))) => {
                granted = a.reasons.iter().filter(|&&r| r == 0).count();
                refused = a.reasons.iter().filter(|&&r| r == 0x97).count();
            }
            Ok(Some(Packet::Publish(_))) => retained += 1,
            Ok(other) => panic!("{other:?}"),
            Err(()) => break,
        }
    }
    assert_eq!((granted, refused), (1000, 4001));
    // Subscriptions that match a topic more than once deliver it once.
    assert_eq!(retained, 300, "each retained message once");
    b.assert_rss_below(128, "after the flood");
}

/// A wildcard subscription over 10,000 retained messages, with queues of
/// 100: the replay is streamed in chunks as the subscriber makes room, so
/// a subscriber that does not read yet loses nothing and stalls no shard,
/// and once it reads it receives every retained message once.
#[test]
fn a_retained_replay_larger_than_the_queue_is_streamed_as_the_subscriber_reads() {
    let dir = temp_dir("retained-stream");
    let b = memory_broker_with(&dir, "[mqtt]\nqueue_messages_max = 100\n");
    let (mut p, _) = Raw::connect(b.addr, Version::V5, "stream-pub", true);
    let count = 10_000u32;
    for i in 0..count {
        let id = (i % 60000 + 1) as u16;
        p.publish(
            &format!("r/{i}"),
            &i.to_be_bytes(),
            QoS::AtLeastOnce,
            true,
            id,
        );
        assert!(matches!(p.recv(), Some(Packet::PubAck(_))));
    }
    let (mut s, _) = Raw::connect(b.addr, Version::V5, &id_on("stream-sub", 0, 2), true);
    s.send(&Packet::Subscribe(codec::Subscribe {
        packet_id: 1,
        filters: vec![(
            "r/#".to_string(),
            codec::SubOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
        )],
        properties: Default::default(),
    }));
    // Not reading yet: the walk waits for room, the shards serve.
    std::thread::sleep(Duration::from_millis(500));
    every_shard_serves(b.addr, 2, "stream-others");
    b.assert_rss_below(96, "with a replay waiting for its subscriber");
    let mut seen = std::collections::HashSet::new();
    while seen.len() < count as usize {
        match s.recv_within(Duration::from_secs(5)) {
            Ok(Some(Packet::SubAck(_))) => {}
            Ok(Some(Packet::Publish(m))) => {
                assert!(m.retain);
                let n = u32::from_be_bytes(m.payload[..4].try_into().unwrap());
                assert!(seen.insert(n), "retained message {n} twice");
                s.send(&puback(m.packet_id));
            }
            other => panic!("after {} retained messages: {other:?}", seen.len()),
        }
    }
    assert!(
        !b.log_text().contains("queue full"),
        "nothing dropped:\n{}",
        b.log_text()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A subscriber that stops reading costs at most its queue while the
/// publisher goes on and another subscriber of the same topic receives
/// everything; its drops are logged with its id.
#[test]
fn a_subscriber_that_stops_reading_costs_at_most_its_budget() {
    let dir = temp_dir("slow-consumer");
    let b = memory_broker_with(
        &dir,
        "[mqtt]\nqueue_bytes_max = 2097152\npacket_size_max_bytes = 65536\n",
    );
    let (mut stalled, _) = Raw::connect(b.addr, Version::V5, &id_on("stalled", 0, 2), true);
    assert_eq!(stalled.subscribe(1, "slow/t", QoS::AtLeastOnce), vec![1]);
    let (mut reader, _) = Raw::connect(b.addr, Version::V5, &id_on("reader", 1, 2), true);
    assert_eq!(reader.subscribe(1, "slow/t", QoS::AtLeastOnce), vec![1]);
    let count = 3000u32;
    let reading = std::thread::spawn(move || {
        let mut n = 0u32;
        while n < count {
            let m = reader.recv_publish();
            assert_eq!(&m.payload[..4], &n.to_be_bytes(), "in order");
            reader.send(&puback(m.packet_id));
            n += 1;
        }
    });
    let (mut p, _) = Raw::connect(b.addr, Version::V5, &id_on("slow-pub", 1, 2), true);
    for n in 0..count {
        let mut payload = n.to_be_bytes().to_vec();
        payload.resize(4096, b'x');
        publish_qos1(&mut p, "slow/t", &payload, (n % 60000 + 1) as u16);
    }
    reading
        .join()
        .expect("the reading subscriber got every message");
    b.assert_rss_below(160, "with a subscriber that does not read");
    let log = b.wait_for_log("queue full").expect("drops are logged");
    let lines = log.lines().filter(|l| l.contains("queue full")).count();
    assert!(lines <= 5, "{lines} lines for one client");
    assert!(log.contains("client \"stalled-"), "{log}");
    every_shard_serves(b.addr, 2, "beside-stalled");
    drop(stalled);
    let _ = std::fs::remove_dir_all(&dir);
}

/// 15,000 connections at once against a broker that takes 10,000: each
/// gets a CONNACK, accepted or refused, or a close; none hangs, and the
/// broker still serves.
#[test]
fn fifteen_thousand_connects_in_a_burst_are_served_or_refused_cleanly() {
    let _one_at_a_time = many_sockets();
    let dir = temp_dir("connect-burst");
    let b = memory_broker_with(&dir, "[server]\nconnections_max = 10000\n");
    let connects: Vec<Vec<u8>> = (0..15_000)
        .map(|i| {
            encode(
                &Packet::Connect(Box::new(connect_packet(
                    Version::V3_1_1,
                    &format!("burst-{i}"),
                    true,
                ))),
                Version::V3_1_1,
            )
        })
        .collect();
    let mut streams = Vec::with_capacity(connects.len());
    for c in &connects {
        match std::net::TcpStream::connect(b.addr) {
            Ok(mut s) => {
                let _ = s.write_all(c);
                streams.push(Some(s));
            }
            // The backlog overflowed: refused by the kernel, cleanly.
            Err(_) => streams.push(None),
        }
    }
    let (mut accepted, mut refused) = (0, 0);
    for s in streams.iter_mut().flatten() {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut head = [0u8; 4];
        match std::io::Read::read_exact(s, &mut head) {
            Ok(()) if head == [0x20, 2, 0, 0] => accepted += 1,
            Ok(()) => {
                assert_eq!(head[..2], [0x20, 2], "a CONNACK");
                refused += 1;
            }
            Err(e) if is_timeout(&e) => panic!("a connection got no answer within 20 s"),
            Err(_) => refused += 1, // closed: refused before CONNECT was read
        }
    }
    assert!(accepted >= 9_000, "{accepted} accepted, {refused} refused");
    assert!(accepted <= 10_000, "{accepted} accepted");
    assert_eq!(accepted + refused, streams.iter().flatten().count());
    drop(streams);
    every_shard_serves(b.addr, 2, "after-burst");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A storm of wills: 1,000 clients with wills drop their connections at
/// once. Every will reaches the subscriber, and the broker still serves.
#[test]
fn a_storm_of_wills_is_delivered_whole_and_the_broker_serves() {
    let _one_at_a_time = many_sockets();
    let b = ChildBroker::start(&["--shards", "2", "--durability", "memory"]);
    let (mut s, _) = Raw::connect(b.addr, Version::V5, "will-watch", true);
    assert_eq!(s.subscribe(1, "storm/will/#", QoS::AtLeastOnce), vec![1]);
    let clients: Vec<Raw> = (0..1000)
        .map(|i| {
            let mut c = connect_packet(Version::V3_1_1, &format!("will-{i}"), true);
            c.will = Some(codec::Will {
                topic: format!("storm/will/{i}").into(),
                payload: bytes::Bytes::from_static(b"gone"),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Default::default(),
            });
            let (c, ack) = Raw::connect_with(b.addr, c);
            assert_eq!(ack.reason, 0);
            c
        })
        .collect();
    drop(clients); // every connection ends without DISCONNECT
    let mut got = std::collections::BTreeSet::new();
    while got.len() < 1000 {
        match s.recv_within(Duration::from_secs(10)) {
            Ok(Some(Packet::Publish(p))) => {
                s.send(&puback(p.packet_id));
                got.insert(p.topic.to_string());
            }
            other => panic!("{} wills of 1000, then {other:?}", got.len()),
        }
    }
    every_shard_serves(b.addr, 2, "after-wills");
    b.assert_rss_below(128, "after the flood");
}
