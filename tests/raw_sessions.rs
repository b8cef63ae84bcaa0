//! Raw-packet tests of session behaviour across shards: wills in every way a
//! connection can end, shared subscriptions, retained messages with shares,
//! redelivery under a smaller Receive Maximum, and a few per-broker limits.
//!
//! Every wait is bounded by `WAIT` (5 s) or less; no test asserts on timing.

mod common;

use std::time::Duration;

use common::raw::*;
use common::*;
use shardmq::codec::{self, reason, Disconnect, Packet, Properties, QoS, Version, Will};

/// A CONNECT carrying a QoS 1 will on `topic`.
fn with_will(mut c: codec::Connect, topic: &str, payload: &[u8]) -> codec::Connect {
    c.will = Some(Will {
        topic: topic.into(),
        payload: bytes::Bytes::copy_from_slice(payload),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
    });
    c
}

/// A 5.0 watcher subscribed to `filter` at QoS 1, on `shard`.
fn watcher(b: &TestBroker, name: &str, shard: usize, filter: &str) -> Raw {
    let (mut w, ack) = Raw::connect(b.addr, Version::V5, &b.id_on_shard(name, shard), true);
    assert_eq!(ack.reason, 0);
    assert_eq!(w.subscribe(1, filter, QoS::AtLeastOnce), vec![1]);
    w
}

/// The next packet is a PUBLISH on `topic` with `payload`; it is acked.
fn expect_message(w: &mut Raw, topic: &str, payload: &[u8]) -> codec::Publish {
    let m = w.recv_publish();
    assert_eq!((&*m.topic, &m.payload[..]), (topic, payload));
    if m.qos != QoS::AtMostOnce {
        w.send(&puback(m.packet_id));
    }
    m
}

// ---------------------------------------------------------------------------
// Wills.
// ---------------------------------------------------------------------------

#[test]
fn will_published_after_disconnect_with_an_error_reason() {
    let b = TestBroker::start(2);
    let mut w = watcher(&b, "will-err-watch", 0, "will/err");
    let id = b.id_on_shard("will-err", 1);
    let (mut c, _) = Raw::connect_with(
        b.addr,
        with_will(v5_connect(&id, true, 0), "will/err", b"gone"),
    );
    c.send(&Packet::Disconnect(Disconnect {
        reason: reason::UNSPECIFIED_ERROR,
        properties: Properties::default().into(),
    }));
    assert_eq!(c.expect_close(), None);
    expect_message(&mut w, "will/err", b"gone");
}

#[test]
fn will_published_on_takeover_across_shards() {
    let b = TestBroker::start(2);
    let mut w = watcher(&b, "will-to-watch", 0, "will/takeover");
    let id = b.id_on_shard("will-to", 1);
    let first = with_will(v5_connect(&id, true, 0), "will/takeover", b"taken");
    let (mut old, _) = Raw::connect_with(b.addr, first);
    let (_new, ack) = Raw::connect_with(b.addr, v5_connect(&id, true, 0));
    assert_eq!(ack.reason, 0);
    assert_eq!(old.expect_close(), Some(reason::SESSION_TAKEN_OVER));
    expect_message(&mut w, "will/takeover", b"taken");
}

#[test]
fn will_published_after_a_protocol_error_with_its_properties() {
    let b = TestBroker::start(2);
    let mut w = watcher(&b, "will-pe-watch", 1, "will/pe");
    let id = b.id_on_shard("will-pe", 0);
    let mut connect = with_will(v5_connect(&id, true, 0), "will/pe", b"{\"up\":false}");
    let will = connect.will.as_mut().unwrap();
    will.properties.content_type = Some("application/json".into());
    will.properties.user_properties = vec![("a".into(), "1".into()), ("b".into(), "2".into())];
    will.properties.payload_format_indicator = Some(1);
    let (mut c, _) = Raw::connect_with(b.addr, connect);
    // A second CONNECT is a protocol error.
    c.send(&Packet::Connect(Box::new(v5_connect(&id, true, 0))));
    assert_eq!(c.expect_close(), Some(reason::PROTOCOL_ERROR));
    let m = expect_message(&mut w, "will/pe", b"{\"up\":false}");
    assert_eq!(
        m.properties.content_type.as_deref(),
        Some("application/json")
    );
    assert_eq!(m.properties.payload_format_indicator, Some(1));
    assert_eq!(
        m.properties.user_properties,
        vec![("a".into(), "1".into()), ("b".into(), "2".into())],
        "user properties pass through in order"
    );
}

#[test]
fn will_with_a_wildcard_topic_is_refused() {
    let b = TestBroker::start(2);
    let v5 = with_will(v5_connect("bad-will-5", true, 0), "will/#", b"x");
    assert_eq!(connect_reply(&b, v5), vec![0x20, 0x03, 0x00, 0x90, 0x00]);
    let v311 = with_will(
        connect_packet(Version::V3_1_1, "bad-will-4", true),
        "will/+/x",
        b"x",
    );
    assert_eq!(connect_reply(&b, v311), Vec::<u8>::new(), "3.1.1: closed");
    let mut bad_utf8 = with_will(v5_connect("bad-will-pfi", true, 0), "will/ok", b"\xff");
    bad_utf8
        .will
        .as_mut()
        .unwrap()
        .properties
        .payload_format_indicator = Some(1);
    assert_eq!(
        connect_reply(&b, bad_utf8),
        vec![0x20, 0x03, 0x00, 0x99, 0x00]
    );
}

#[test]
fn publish_with_a_wildcard_response_topic_gets_disconnect_0x82() {
    let b = TestBroker::start(2);
    let (mut c, _) = Raw::connect(b.addr, Version::V5, "rt-wild", true);
    let mut p = publish("rt/req", b"q", QoS::AtMostOnce, false, 0);
    p.properties.response_topic = Some("rt/+/reply".into());
    c.send(&Packet::Publish(p));
    assert_eq!(c.expect_close(), Some(reason::PROTOCOL_ERROR));
}

// ---------------------------------------------------------------------------
// Shared subscriptions.
// ---------------------------------------------------------------------------

/// Publish `n` QoS 1 messages "0".."n-1" to `topic`, one PUBACK at a time.
fn publish_n(p: &mut Raw, topic: &str, n: u32) {
    for i in 0..n {
        p.publish(topic, i.to_string().as_bytes(), QoS::AtLeastOnce, false, 1);
        expect_puback(p, 1);
    }
}

/// Count the PUBLISHes that arrive at `c` until it is quiet.
fn drain_count(c: &mut Raw) -> usize {
    let mut n = 0;
    while let Ok(Some(p)) = c.recv_within(QUIET) {
        match p {
            Packet::Publish(m) => {
                n += 1;
                if m.qos != QoS::AtMostOnce {
                    c.send(&puback(m.packet_id));
                }
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    n
}

#[test]
fn shared_members_on_the_publishers_shard_take_turns() {
    let b = TestBroker::start(1);
    let mut a = watcher(&b, "rr-a", 0, "$share/g/rr/#");
    let mut c = watcher(&b, "rr-b", 0, "$share/g/rr/#");
    let (mut p, _) = Raw::connect(b.addr, Version::V5, "rr-pub", true);
    publish_n(&mut p, "rr/x", 20);
    let (na, nc) = (drain_count(&mut a), drain_count(&mut c));
    assert_eq!(na + nc, 20);
    assert_eq!((na, nc), (10, 10), "round-robin alternates members");
}

#[test]
fn shared_members_on_two_shards_take_turns() {
    let b = TestBroker::start(2);
    let mut a = watcher(&b, "rr2-a", 0, "$share/g/rr2/#");
    let mut c = watcher(&b, "rr2-b", 1, "$share/g/rr2/#");
    for pub_shard in 0..2 {
        let id = b.id_on_shard(&format!("rr2-pub{pub_shard}"), pub_shard);
        let (mut p, _) = Raw::connect(b.addr, Version::V5, &id, true);
        publish_n(&mut p, "rr2/x", 20);
        let (na, nc) = (drain_count(&mut a), drain_count(&mut c));
        assert_eq!(
            (na, nc),
            (10, 10),
            "publisher on shard {pub_shard}: shards alternate"
        );
    }
}

#[test]
fn shared_messages_skip_an_offline_member_while_another_is_connected() {
    let b = TestBroker::start(2);
    let mut online = watcher(&b, "sh-on", 1, "$share/g/shoff/#");
    let off_id = b.id_on_shard("sh-off", 0);
    let (mut off, _) = Raw::connect_with(b.addr, v5_connect(&off_id, true, 300));
    assert_eq!(
        off.subscribe(1, "$share/g/shoff/#", QoS::AtLeastOnce),
        vec![1]
    );
    off.send(&Packet::Disconnect(Disconnect::default()));
    assert_eq!(off.expect_close(), None);

    // Publishers on both shards: every message reaches the connected member.
    for pub_shard in 0..2 {
        let id = b.id_on_shard(&format!("sh-off-pub{pub_shard}"), pub_shard);
        let (mut p, _) = Raw::connect(b.addr, Version::V5, &id, true);
        publish_n(&mut p, "shoff/x", 10);
        assert_eq!(
            drain_count(&mut online),
            10,
            "publisher on shard {pub_shard}"
        );
    }
    // Nothing was queued for the offline member.
    let (mut off, ack) = Raw::connect_with(b.addr, v5_connect(&off_id, false, 300));
    assert!(ack.session_present);
    assert_eq!(drain_count(&mut off), 0);
}

#[test]
fn shared_subscription_gets_no_retained_messages() {
    let b = TestBroker::start(2);
    let (mut p, _) = Raw::connect(b.addr, Version::V5, "shret-pub", true);
    for i in 0..4 {
        p.publish(&format!("shret/{i}"), b"kept", QoS::AtLeastOnce, true, 1);
        expect_puback(&mut p, 1);
    }
    let mut shared = watcher(&b, "shret-sh", 0, "$share/g/shret/#");
    shared.expect_silence(QUIET);
    // An ordinary subscription on the same shard does get them.
    let mut plain = watcher(&b, "shret-plain", 0, "shret/#");
    assert_eq!(drain_count(&mut plain), 4);
}

// ---------------------------------------------------------------------------
// Redelivery and the client's limits.
// ---------------------------------------------------------------------------

#[test]
fn redelivery_respects_a_smaller_receive_maximum_after_reconnect() {
    let b = TestBroker::start(2);
    let id = b.id_on_shard("rmax-sub", 0);
    let (mut s, _) = Raw::connect_with(b.addr, v5_connect(&id, true, 300));
    assert_eq!(s.subscribe(1, "rmax/t", QoS::AtLeastOnce), vec![1]);
    let (mut p, _) = Raw::connect(b.addr, Version::V5, &b.id_on_shard("rmax-pub", 1), true);
    publish_n(&mut p, "rmax/t", 5);
    let first: Vec<u16> = (0..5).map(|_| s.recv_publish().packet_id).collect();
    drop(s); // nothing acked

    let mut again = v5_connect(&id, false, 300);
    again.properties.receive_maximum = Some(2);
    let (mut s, ack) = Raw::connect_with(b.addr, again);
    assert!(ack.session_present);
    let mut resent = Vec::new();
    for _ in 0..2 {
        let m = s.recv_publish();
        assert!(m.dup);
        resent.push(m.packet_id);
    }
    s.expect_silence(QUIET);
    // Each ack lets one more through, with its original packet id.
    while resent.len() < 5 {
        s.send(&puback(resent[resent.len() - 2]));
        let m = s.recv_publish();
        assert!(m.dup);
        resent.push(m.packet_id);
    }
    assert_eq!(resent, first, "original packet ids, in order");
}

#[test]
fn disconnect_reason_string_is_dropped_when_it_exceeds_the_clients_maximum() {
    let b = TestBroker::start(2);
    let mut c = connect_packet(Version::V5, "small-max", true);
    c.properties.maximum_packet_size = Some(16);
    let (mut c, _) = Raw::connect_with(b.addr, c);
    c.send(&Packet::Connect(Box::new(connect_packet(
        Version::V5,
        "x",
        true,
    ))));
    let bytes = read_until_close(&mut c.stream);
    assert_eq!(bytes, vec![0xE0, 0x01, reason::PROTOCOL_ERROR]);
}

#[test]
fn a_disconnect_carries_a_reason_string_when_it_fits() {
    let b = TestBroker::start(2);
    let (mut c, _) = Raw::connect(b.addr, Version::V5, "reason-str", true);
    c.send(&Packet::Connect(Box::new(connect_packet(
        Version::V5,
        "x",
        true,
    ))));
    match c.recv() {
        Some(Packet::Disconnect(d)) => {
            assert_eq!(d.reason, reason::PROTOCOL_ERROR);
            let why = d.properties.reason_string.clone().expect("a reason string");
            assert!(why.contains("second CONNECT"), "{why}");
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Limits.
// ---------------------------------------------------------------------------

#[test]
fn sessions_max_refuses_a_new_session_with_0x97() {
    let b = TestBroker::start_with(1, |cfg| cfg.mqtt.sessions_max = 2);
    let (mut a, _) = Raw::connect_with(b.addr, v5_connect("smax-a", true, 300));
    a.send(&Packet::Disconnect(Disconnect::default()));
    assert_eq!(a.expect_close(), None);
    let (_b, ack) = Raw::connect(b.addr, Version::V5, "smax-b", true);
    assert_eq!(ack.reason, 0);
    let reply = connect_reply(&b, connect_packet(Version::V5, "smax-c", true));
    assert_eq!(reply, vec![0x20, 0x03, 0x00, 0x97, 0x00]);
    // The offline session still resumes.
    let (_a, ack) = Raw::connect_with(b.addr, v5_connect("smax-a", false, 300));
    assert_eq!((ack.reason, ack.session_present), (0, true));
}

#[test]
fn offline_queue_is_bounded_by_bytes() {
    let b = TestBroker::start_with(2, |cfg| {
        cfg.mqtt.queue_bytes_max = 4096;
        cfg.mqtt.packet_size_max_bytes = 2048;
    });
    let id = b.id_on_shard("qbytes", 0);
    let (mut s, _) = Raw::connect(b.addr, Version::V3_1_1, &id, false);
    assert_eq!(s.subscribe(1, "qb/t", QoS::AtLeastOnce), vec![1]);
    s.send(&Packet::Disconnect(Disconnect::default()));
    assert_eq!(s.expect_close(), None);
    let mut barrier = watcher(&b, "qb-barrier", 0, "qb/barrier");
    let (mut p, _) = Raw::connect(b.addr, Version::V5, &b.id_on_shard("qb-pub", 1), true);
    for _ in 0..10 {
        p.publish("qb/t", &[7u8; 1000], QoS::AtLeastOnce, false, 1);
        expect_puback(&mut p, 1);
    }
    p.publish("qb/barrier", b"", QoS::AtMostOnce, false, 0);
    barrier.recv_publish();
    let (mut s, ack) = Raw::connect(b.addr, Version::V3_1_1, &id, false);
    assert!(ack.session_present);
    // 4 of (4 topic bytes + 1000 payload bytes) fit in 4096.
    assert_eq!(drain_count(&mut s), 4);
}

#[test]
fn a_subscriber_that_stops_reading_does_not_stall_others() {
    let b = TestBroker::start_with(2, |cfg| cfg.mqtt.queue_messages_max = 100);
    let (mut stuck, _) = Raw::connect(b.addr, Version::V5, &b.id_on_shard("stuck", 0), true);
    assert_eq!(stuck.subscribe(1, "stall/t", QoS::AtMostOnce), vec![0]);
    // It never reads again: its socket buffers fill, then its backlog.
    let mut healthy = watcher(&b, "healthy", 0, "stall/t");
    let (mut p, _) = Raw::connect(b.addr, Version::V5, &b.id_on_shard("stall-pub", 1), true);
    // A broker that stopped reading the publisher fails a write, not the
    // test's patience.
    p.stream.set_write_timeout(Some(WAIT)).unwrap();
    let payload = vec![b'x'; 4096];
    let total = 3000; // 12 MB: far more than the socket buffers hold
    let mut received = 0;
    for i in 0..total {
        p.publish("stall/t", &payload, QoS::AtMostOnce, false, 0);
        // Keep the healthy subscriber reading as we go.
        if i % 50 == 49 {
            while let Ok(Some(Packet::Publish(_))) = healthy.recv_within(Duration::from_millis(1)) {
                received += 1;
            }
        }
    }
    // A QoS 1 marker after the flood arrives at the healthy subscriber.
    p.publish("stall/t", b"marker", QoS::AtLeastOnce, false, 9);
    loop {
        match healthy.recv() {
            Some(Packet::Publish(m)) if &m.payload[..] == b"marker" => break,
            Some(Packet::Publish(_)) => received += 1,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    assert!(received > 0);
    drop(stuck);
}

#[test]
fn mqtt_3_1_publish_and_subscribe_across_shards() {
    let b = TestBroker::start(2);
    let (mut s, ack) = Raw::connect(b.addr, Version::V3_1, &b.id_on_shard("v31s", 0), true);
    assert_eq!(ack.reason, 0);
    assert_eq!(s.subscribe(1, "v31/+", QoS::ExactlyOnce), vec![2]);
    let (mut p, ack) = Raw::connect(b.addr, Version::V3_1, &b.id_on_shard("v31p", 1), true);
    assert_eq!(ack.reason, 0);
    publish_qos1(&mut p, "v31/a", b"hello 3.1", 1);
    let m = s.recv_publish();
    assert_eq!(
        (&*m.topic, &m.payload[..], m.qos),
        ("v31/a", &b"hello 3.1"[..], QoS::AtLeastOnce)
    );
    s.send(&puback(m.packet_id));
    s.send(&Packet::PingReq);
    assert_eq!(s.recv(), Some(Packet::PingResp));
}
