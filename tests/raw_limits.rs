//! Raw-packet tests of the broker's limits and of its robustness against bad
//! input: packet size, remaining length, garbage, a small fuzz loop, per
//! client quotas, queue bounds, connection limits, keepalive and shutdown.
//!
//! Every wait is bounded by `WAIT` (5 s) or less; no test asserts on timing.
//! After each bad-input test a fresh client must still round-trip a message.

mod common;

use std::io::Write;
use std::net::Shutdown;

use common::raw::*;
use common::*;
use shardmq::codec::{
    self, reason, Disconnect, Packet, Properties, PubResp, QoS, SubOptions, Subscribe, Unsubscribe,
    Version,
};

// ---------------------------------------------------------------------------
// Helpers (local to this file; shared ones are in common/raw.rs).
// ---------------------------------------------------------------------------

/// A fresh subscriber and publisher, in both shard directions, still
/// round-trip a QoS 1 message: the broker survived whatever the test did.
fn assert_broker_serves(b: &TestBroker) {
    for (sub_shard, pub_shard) in [(0, 1), (1, 0)] {
        let sub_id = b.id_on_shard(&format!("alive-sub{sub_shard}"), sub_shard);
        let pub_id = b.id_on_shard(&format!("alive-pub{pub_shard}"), pub_shard);
        assert_round_trip(b.addr, &sub_id, &pub_id, &format!("alive/{sub_shard}"));
    }
}

/// Publish `n` QoS 1 messages with payloads "0".."n-1", then collect their
/// PUBACKs.
fn publish_numbered(p: &mut Raw, topic: &str, n: u16) {
    for i in 0..n {
        p.publish(
            topic,
            i.to_string().as_bytes(),
            QoS::AtLeastOnce,
            false,
            i + 1,
        );
    }
    for i in 0..n {
        expect_puback(p, i + 1);
    }
}

fn payload_number(m: &codec::Publish) -> u32 {
    std::str::from_utf8(&m.payload).unwrap().parse().unwrap()
}

/// Receive PUBLISHes, acking each: up to `expected` of them waiting up to
/// `WAIT` for each, then any extra ones that arrive within `QUIET` (so an
/// assertion on the result shows them).
fn collect_acking(s: &mut Raw, expected: usize) -> Vec<u32> {
    let mut got = Vec::new();
    loop {
        let wait = if got.len() < expected { WAIT } else { QUIET };
        match s.recv_within(wait) {
            Err(()) => return got,
            Ok(Some(Packet::Publish(m))) => {
                got.push(payload_number(&m));
                s.send(&puback(m.packet_id));
            }
            Ok(other) => panic!("expected PUBLISH or silence, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Packet size and remaining length.
// ---------------------------------------------------------------------------

#[test]
fn packet_larger_than_maximum_v5_gets_disconnect_0x95() {
    let b = TestBroker::start_with(2, |cfg| cfg.mqtt.packet_size_max_bytes = 1024);
    let (mut s, _) = Raw::connect(b.addr, Version::V5, &b.id_on_shard("big-sub", 0), true);
    assert_eq!(s.subscribe(1, "big/t", QoS::AtMostOnce), vec![0]);
    let (mut c, ack) = Raw::connect(b.addr, Version::V5, &b.id_on_shard("big5", 1), true);
    assert_eq!(ack.properties.maximum_packet_size, Some(1024));
    // Exactly 1024 bytes on the wire (3-byte fixed header + 1021): accepted.
    let at_limit = v5_publish_bytes(0x30, b"big/t", None, &[], &[b'x'; 1013]);
    assert_eq!(at_limit.len(), 1024);
    c.send_bytes(&at_limit);
    assert_eq!(s.recv_publish().payload.len(), 1013);
    // 1025 bytes: too large.
    let over = v5_publish_bytes(0x30, b"big/t", None, &[], &[b'x'; 1014]);
    assert_eq!(over.len(), 1025);
    c.send_bytes(&over);
    assert_eq!(c.expect_close(), Some(reason::PACKET_TOO_LARGE));
    s.expect_silence(QUIET);
    // Far over the limit.
    v5_bytes_disconnect(
        &b,
        "big5b",
        &v5_publish_bytes(0x30, b"big/t", None, &[], &[b'x'; 4000]),
        reason::PACKET_TOO_LARGE,
    );
    assert_broker_serves(&b);
}

#[test]
fn packet_larger_than_maximum_v311_is_closed() {
    let b = TestBroker::start_with(2, |cfg| cfg.mqtt.packet_size_max_bytes = 1024);
    let publish = v311_publish_bytes(0x30, b"big/t", None, &[b'x'; 2000]);
    v311_bytes_close(&b, "big4", &publish);
    assert_broker_serves(&b);
}

#[test]
fn huge_remaining_length_is_refused_without_waiting_for_the_body() {
    let b = TestBroker::start_with(2, |cfg| cfg.mqtt.packet_size_max_bytes = 1024);
    // Only a fixed header announcing 268,435,455 bytes; no body follows.
    let header = [0x30, 0xFF, 0xFF, 0xFF, 0x7F];
    v5_bytes_disconnect(&b, "huge5", &header, reason::PACKET_TOO_LARGE);
    v311_bytes_close(&b, "huge4", &header);
    // As the first packet: a CONNECT that big is refused too.
    let mut c = Raw::open(b.addr, Version::V5);
    c.send_bytes(&[0x10, 0xFF, 0xFF, 0xFF, 0x7F]);
    assert_eq!(read_until_close(&mut c.stream), Vec::<u8>::new());
    assert_broker_serves(&b);
}

#[test]
fn malformed_remaining_length_is_closed() {
    let b = TestBroker::start(2);
    // Five length bytes with the continuation bit: [MQTT-1.5.5] / 2.2.3.
    let bad = [0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
    v5_bytes_disconnect(&b, "rl5", &bad, reason::MALFORMED_PACKET);
    v311_bytes_close(&b, "rl4", &bad);
    let mut c = Raw::open(b.addr, Version::V5);
    c.send_bytes(&[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]);
    assert_eq!(read_until_close(&mut c.stream), Vec::<u8>::new());
    assert_broker_serves(&b);
}

// ---------------------------------------------------------------------------
// Garbage and fuzzing.
// ---------------------------------------------------------------------------

const GARBAGE: [u8; 16] = [
    0x00, 0x13, 0x37, 0xDE, 0xAD, 0xBE, 0xEF, 0xFF, 0x00, 0x42, 0x99, 0x01, 0x02, 0x03, 0x04, 0x05,
];

#[test]
fn garbage_after_connect_is_closed_and_others_unaffected() {
    let b = TestBroker::start(2);
    // A well-behaved pair, connected before and used after the garbage.
    let (mut s, mut p) = v5_sub_and_pub(&b, "calm", "calm/t", QoS::AtLeastOnce);

    for shard in 0..2 {
        // Packet type 0 is reserved: malformed.
        v5_bytes_disconnect(
            &b,
            &b.id_on_shard("garbage5", shard),
            &GARBAGE,
            reason::MALFORMED_PACKET,
        );
        v311_bytes_close(&b, &b.id_on_shard("garbage4", shard), &GARBAGE);
    }
    // Garbage instead of a CONNECT.
    let mut c = Raw::open(b.addr, Version::V5);
    c.send_bytes(&GARBAGE);
    assert_eq!(read_until_close(&mut c.stream), Vec::<u8>::new());

    publish_qos1(&mut p, "calm/t", b"unaffected", 1);
    let m = s.recv_publish();
    assert_eq!(&m.payload[..], b"unaffected");
    assert_broker_serves(&b);
}

/// Well-formed packets a client may send, as seeds for mutation.
fn fuzz_templates(version: Version) -> Vec<Vec<u8>> {
    let mut publish_props = publish("fz/a", b"payload", QoS::ExactlyOnce, true, 3);
    publish_props.properties.topic_alias = Some(1);
    publish_props.properties.payload_format_indicator = Some(1);
    publish_props
        .properties
        .user_properties
        .push(("k".into(), "v".into()));
    let packets = [
        Packet::Publish(publish("fz/t", b"hello", QoS::AtMostOnce, false, 0)),
        Packet::Publish(publish("fz/t", b"hello", QoS::AtLeastOnce, false, 1)),
        Packet::Publish(publish_props),
        Packet::Subscribe(Subscribe {
            packet_id: 2,
            filters: vec![
                ("fz/#".into(), SubOptions::default()),
                (
                    "$share/g/fz/+".into(),
                    SubOptions {
                        qos: QoS::ExactlyOnce,
                        ..Default::default()
                    },
                ),
            ],
            properties: Properties::default().into(),
        }),
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 4,
            filters: vec!["fz/#".into()],
            properties: Properties::default().into(),
        }),
        Packet::PubRel(PubResp {
            packet_id: 3,
            ..Default::default()
        }),
        Packet::PubAck(PubResp {
            packet_id: 1,
            ..Default::default()
        }),
        Packet::PingReq,
        Packet::Disconnect(Disconnect {
            reason: 0x04,
            properties: Properties::default().into(),
        }),
    ];
    packets.iter().map(|p| encode(p, version)).collect()
}

/// One random input: raw noise, a plausible header with a random body, or a
/// mutated sequence of valid packets.
fn fuzz_input(rng: &mut XorShift, templates: &[Vec<u8>]) -> Vec<u8> {
    match rng.below(3) {
        0 => {
            let n = 1 + rng.below(300);
            rng.bytes(n)
        }
        1 => {
            let kind = (1 + rng.below(15)) as u8;
            let flags = if rng.below(2) == 0 {
                0
            } else {
                rng.byte() & 0x0F
            };
            let n = rng.below(200);
            let body = rng.bytes(n);
            let mut f = frame((kind << 4) | flags, &body);
            if rng.below(4) == 0 {
                f.truncate(1 + rng.below(f.len()));
            }
            f
        }
        _ => {
            let mut out = Vec::new();
            for _ in 0..1 + rng.below(4) {
                out.extend_from_slice(&templates[rng.below(templates.len())]);
            }
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(out.len());
                out[i] = rng.byte();
            }
            match rng.below(4) {
                0 => out.truncate(1 + rng.below(out.len())),
                1 => {
                    let n = rng.below(32);
                    out.extend(rng.bytes(n));
                }
                _ => {}
            }
            out
        }
    }
}

#[test]
fn fuzz_random_bytes_after_connect_never_break_the_broker() {
    let seed = seed_from_env("FUZZ_SEED");
    // FUZZ_CONNECTIONS raises the count for a longer local run.
    let connections: usize = std::env::var("FUZZ_CONNECTIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    eprintln!("fuzz seed: {seed} (replay with FUZZ_SEED={seed})");
    let mut rng = XorShift::new(seed);
    let b = TestBroker::start(2);
    let versions = [Version::V5, Version::V3_1_1, Version::V3_1];
    let templates: Vec<Vec<Vec<u8>>> = versions.iter().map(|&v| fuzz_templates(v)).collect();
    for i in 0..connections {
        let which = i % versions.len();
        let id = format!("fuzz-{i}");
        let (mut c, ack) = Raw::connect(b.addr, versions[which], &id, true);
        assert_eq!(
            ack.reason, 0,
            "seed {seed}, connection {i}: CONNACK refused"
        );
        let input = fuzz_input(&mut rng, &templates[which]);
        // The broker may close (and reset) before everything is written.
        let _ = c.stream.write_all(&input);
        let _ = c.stream.shutdown(Shutdown::Write);
        if let Err(got) = try_read_until_close(&mut c.stream) {
            panic!(
                "seed {seed}, connection {i} ({:?}): broker did not close within {WAIT:?} \
                 after input {input:02X?}; it sent {got:02X?}",
                versions[which]
            );
        }
    }
    assert_broker_serves(&b);
}

// ---------------------------------------------------------------------------
// Per-client quotas.
// ---------------------------------------------------------------------------

#[test]
fn subscriptions_max_v5_third_gets_0x97() {
    let b = TestBroker::start_with(2, |cfg| cfg.mqtt.subscriptions_max = 2);
    let (mut c, _) = Raw::connect(b.addr, Version::V5, "submax5", true);
    subscribe_each(
        &mut c,
        &[
            ("q/a", QoS::AtMostOnce, 0),
            ("q/b", QoS::AtLeastOnce, 1),
            ("q/c", QoS::AtMostOnce, reason::QUOTA_EXCEEDED),
            // Replacing an existing subscription is not a new one.
            ("q/a", QoS::AtLeastOnce, 1),
        ],
    );
    assert_broker_serves(&b);
}

#[test]
fn subscriptions_max_v311_third_gets_0x80() {
    let b = TestBroker::start_with(2, |cfg| cfg.mqtt.subscriptions_max = 2);
    let (mut c, _) = Raw::connect(b.addr, Version::V3_1_1, "submax4", true);
    subscribe_each(
        &mut c,
        &[
            ("q/a", QoS::AtMostOnce, 0),
            ("q/b", QoS::AtMostOnce, 0),
            ("q/c", QoS::AtMostOnce, 0x80),
        ],
    );
}

#[test]
fn topic_levels_max_publish_v5_gets_disconnect_0x90() {
    let b = TestBroker::start_with(2, |cfg| cfg.mqtt.topic_levels_max = 3);
    let (mut s, mut c) = v5_sub_and_pub(&b, "lvl", "a/#", QoS::AtMostOnce);
    c.publish("a/b/c", b"three", QoS::AtMostOnce, false, 0);
    assert_eq!(&s.recv_publish().payload[..], b"three");
    c.publish("a/b/c/d", b"four", QoS::AtMostOnce, false, 0);
    assert_eq!(c.expect_close(), Some(reason::TOPIC_NAME_INVALID));
    s.expect_silence(QUIET);
    v311_bytes_close(
        &b,
        "lvl4",
        &v311_publish_bytes(0x30, b"a/b/c/d", None, b"x"),
    );
    assert_broker_serves(&b);
}

#[test]
fn topic_levels_max_subscribe_gets_0x8f() {
    let b = TestBroker::start_with(2, |cfg| cfg.mqtt.topic_levels_max = 3);
    let (mut c, _) = Raw::connect(b.addr, Version::V5, "lvl-filter5", true);
    subscribe_each(
        &mut c,
        &[
            ("a/b/c/d", QoS::AtMostOnce, reason::TOPIC_FILTER_INVALID),
            ("a/b/c", QoS::AtMostOnce, 0),
            ("a/+/#", QoS::AtMostOnce, 0),
            ("a/+/+/#", QoS::AtMostOnce, reason::TOPIC_FILTER_INVALID),
        ],
    );
    let (mut c4, _) = Raw::connect(b.addr, Version::V3_1_1, "lvl-filter4", true);
    assert_eq!(c4.subscribe(1, "a/b/c/d", QoS::AtMostOnce), vec![0x80]);
}

#[test]
fn client_id_longer_than_maximum_is_refused() {
    let b = TestBroker::start_with(2, |cfg| cfg.mqtt.client_id_bytes_max = 23);
    let long = "x".repeat(24);
    let ok = "y".repeat(23);
    let reply = connect_reply(&b, connect_packet(Version::V5, &long, true));
    assert_eq!(reply, vec![0x20, 0x03, 0x00, 0x85, 0x00]);
    let reply = connect_reply(&b, connect_packet(Version::V3_1_1, &long, true));
    assert_eq!(reply, vec![0x20, 0x02, 0x00, 0x02]);
    let (_c, ack) = Raw::connect(b.addr, Version::V5, &ok, true);
    assert_eq!(ack.reason, 0);
    let (_c, ack) = Raw::connect(b.addr, Version::V3_1_1, &ok, true);
    assert_eq!(ack.reason, 0);
}

// ---------------------------------------------------------------------------
// Queues.
// ---------------------------------------------------------------------------

#[test]
fn slow_subscriber_drops_messages_without_stalling_its_shard() {
    let b = TestBroker::start_with(2, |cfg| cfg.mqtt.queue_messages_max = 10);
    let mut slow_connect = connect_packet(Version::V5, &b.id_on_shard("slow", 0), true);
    slow_connect.properties.receive_maximum = Some(1);
    let (mut slow, _) = Raw::connect_with(b.addr, slow_connect);
    assert_eq!(slow.subscribe(1, "flood/t", QoS::AtLeastOnce), vec![1]);
    let (mut fast, _) = Raw::connect(b.addr, Version::V5, &b.id_on_shard("fast", 0), true);
    assert_eq!(fast.subscribe(1, "flood/t", QoS::AtLeastOnce), vec![1]);
    let (mut p, _) = Raw::connect(b.addr, Version::V5, &b.id_on_shard("flooder", 1), true);
    publish_numbered(&mut p, "flood/t", 100);

    // The fast subscriber on the same shard gets every message, in order.
    for i in 0..100 {
        let m = fast.recv_publish();
        assert_eq!(payload_number(&m), i);
        fast.send(&puback(m.packet_id));
    }

    // The slow one got one message and nothing more until it acks.
    let first = slow.recv_publish();
    assert_eq!(payload_number(&first), 0);
    slow.expect_silence(QUIET);
    slow.send(&puback(first.packet_id));
    let mut got = vec![0];
    got.extend(collect_acking(&mut slow, 10));
    assert!(
        got.len() >= 2,
        "acking must release queued messages: {got:?}"
    );
    // Behind, it holds the flooder (`mqtt.publisher_hold_ms`), and takes
    // up to twice its queue's bound meanwhile: what the flooder had sent
    // before the hold reached it.
    assert!(
        got.len() <= 1 + 2 * 10,
        "at most 1 in flight + 2 x 10 queued may survive, got {} : {got:?}",
        got.len()
    );
    // drop_new: the first messages are kept, in order.
    assert_eq!(got, (0..got.len() as u32).collect::<Vec<_>>());
}

fn offline_queue_keeps(overflow: &str) -> Vec<u32> {
    let overflow = overflow.to_string();
    let b = TestBroker::start_with(2, |cfg| {
        cfg.mqtt.queue_messages_max = 10;
        cfg.mqtt.queue_overflow = overflow;
    });
    let sub_id = b.id_on_shard("offline", 0);
    let (mut s, _) = Raw::connect(b.addr, Version::V3_1_1, &sub_id, false);
    assert_eq!(s.subscribe(1, "offline/t", QoS::AtLeastOnce), vec![1]);
    s.send(&Packet::Disconnect(Disconnect::default()));
    assert_eq!(s.expect_close(), None);

    // A barrier on the subscriber's shard: lanes between two shards are
    // FIFO, so once the marker arrives the 50 messages have reached the
    // offline session's queue (a PUBACK only means the broker took them).
    let (mut barrier, _) =
        Raw::connect(b.addr, Version::V3_1_1, &b.id_on_shard("barrier", 0), true);
    barrier.subscribe(1, "offline/barrier", QoS::AtMostOnce);
    let (mut p, _) = Raw::connect(b.addr, Version::V5, &b.id_on_shard("offline-pub", 1), true);
    publish_numbered(&mut p, "offline/t", 50);
    p.publish("offline/barrier", b"", QoS::AtMostOnce, false, 0);
    assert_eq!(&*barrier.recv_publish().topic, "offline/barrier");

    let (mut s, ack) = Raw::connect(b.addr, Version::V3_1_1, &sub_id, false);
    assert!(ack.session_present);
    collect_acking(&mut s, 10)
}

#[test]
fn offline_queue_drop_new_keeps_first_10() {
    let got = offline_queue_keeps("drop_new");
    assert_eq!(got, (0..10).collect::<Vec<_>>());
}

#[test]
fn offline_queue_drop_oldest_keeps_last_10() {
    let got = offline_queue_keeps("drop_oldest");
    assert_eq!(got, (40..50).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------
// Connections, keepalive, shutdown.
// ---------------------------------------------------------------------------

#[test]
fn connections_max_per_shard_refuses_with_0x97() {
    let b = TestBroker::start_with(2, |cfg| cfg.server.connections_max = 4);
    // 4 connections over 2 shards: 2 per shard.
    let fill = |prefix: &str, shard: usize| -> Vec<Raw> {
        (0..2)
            .map(|i| {
                let id = b.id_on_shard(&format!("{prefix}{i}"), shard);
                let (c, ack) = Raw::connect(b.addr, Version::V5, &id, true);
                assert_eq!(ack.reason, 0, "connection {i} on shard {shard}");
                c
            })
            .collect()
    };
    let mut shard0 = fill("cmax", 0);
    let id = b.id_on_shard("cmax-extra", 0);
    let reply = connect_reply(&b, connect_packet(Version::V5, &id, true));
    assert_eq!(reply, vec![0x20, 0x03, 0x00, 0x97, 0x00]);
    let reply = connect_reply(&b, connect_packet(Version::V3_1_1, &id, true));
    assert!(
        reply.len() == 4 && reply[..3] == [0x20, 0x02, 0x00] && reply[3] != 0,
        "3.1.1 gets a failure CONNACK: {reply:02X?}"
    );

    // Shard 1 still has room for its share.
    let _shard1 = fill("cmax1-", 1);

    // Closing one connection on shard 0 makes room again.
    let mut gone = shard0.pop().unwrap();
    gone.send(&Packet::Disconnect(Disconnect::default()));
    assert_eq!(gone.expect_close(), None);
    let (_again, ack) = Raw::connect(b.addr, Version::V5, &id, true);
    assert_eq!(ack.reason, 0);
}

/// Connect with a keep alive of `seconds`.
fn connect_keep_alive(
    b: &TestBroker,
    version: Version,
    id: &str,
    seconds: u16,
) -> (Raw, codec::ConnAck) {
    let mut c = connect_packet(version, id, true);
    c.keep_alive = seconds;
    Raw::connect_with(b.addr, c)
}

#[test]
fn keepalive_zero_gets_server_keep_alive_maximum() {
    let b = TestBroker::start_with(2, |cfg| cfg.mqtt.keep_alive_s_max = 5);
    // 0 (none) and 100 s are capped to 5 s; 3 s is within the cap.
    for (id, seconds, cap) in [
        ("ka0", 0, Some(5)),
        ("ka100", 100, Some(5)),
        ("ka3", 3, None),
    ] {
        let (_c, ack) = connect_keep_alive(&b, Version::V5, id, seconds);
        assert_eq!(
            ack.properties.server_keep_alive, cap,
            "keep alive {seconds} s, maximum 5 s"
        );
    }
}

#[test]
fn keepalive_expired_v5_gets_disconnect_0x8d() {
    let b = TestBroker::start_with(2, |cfg| cfg.mqtt.keep_alive_s_max = 5);
    let (mut c, ack) = connect_keep_alive(&b, Version::V5, "ka1-5", 1);
    assert_eq!(ack.properties.server_keep_alive, None);
    // 1.5 x 1 s without a packet; bounded by WAIT (5 s).
    assert_eq!(c.expect_close(), Some(reason::KEEP_ALIVE_TIMEOUT));
}

#[test]
fn keepalive_expired_v311_is_closed() {
    let b = TestBroker::start(2);
    let (mut c, _) = connect_keep_alive(&b, Version::V3_1_1, "ka1-4", 1);
    assert_eq!(read_until_close(&mut c.stream), Vec::<u8>::new());
}

#[test]
fn graceful_stop_sends_disconnect_0x8b() {
    let mut b = TestBroker::start(2);
    let mut v5 = Vec::new();
    for shard in 0..2 {
        let (c, _) = Raw::connect(b.addr, Version::V5, &b.id_on_shard("stop5", shard), true);
        v5.push(c);
    }
    let (mut v311, _) = Raw::connect(b.addr, Version::V3_1_1, "stop4", true);
    b.stop();
    for mut c in v5 {
        assert_eq!(c.expect_close(), Some(reason::SERVER_SHUTTING_DOWN));
    }
    assert_eq!(read_until_close(&mut v311.stream), Vec::<u8>::new());
}
