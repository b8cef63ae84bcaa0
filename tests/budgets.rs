//! Byte budgets, each at its boundary: retained messages (one and all),
//! delayed publishes, user properties per packet, the outbound topic-alias
//! map, and a session's queue counting the whole message. (The log's bound,
//! `storage.log_bytes_max`, is in `storage.rs` with the full-disk tests.)

mod common;

use std::time::Duration;

use common::raw::*;
use common::*;
use shardmq::codec::{Packet, QoS, Version};

/// A 5.0 QoS 1 PUBLISH of `payload` bytes with user properties of
/// `user_bytes` bytes in all (one pair: a 1-byte name and the rest value).
fn publish_with_user_bytes(c: &mut Raw, topic: &str, qos: QoS, id: u16, user_bytes: usize) {
    let mut p = publish(topic, b"x", qos, false, id);
    if user_bytes > 0 {
        p.properties
            .user_properties
            .push(("k".into(), "v".repeat(user_bytes - 1)));
    }
    c.send(&Packet::Publish(p));
}

fn puback_reason(c: &mut Raw, id: u16) -> u8 {
    match c.recv() {
        Some(Packet::PubAck(a)) if a.packet_id == id => a.reason,
        other => panic!("expected PUBACK {id}, got {other:?}"),
    }
}

#[test]
fn user_properties_past_their_budget_are_refused_with_0x97() {
    let b = TestBroker::start_with(2, |c| c.mqtt.user_properties_bytes_max = 100);
    let (mut c, _) = Raw::connect(b.addr, Version::V5, "up-pub", true);
    publish_with_user_bytes(&mut c, "up/t", QoS::AtLeastOnce, 1, 100);
    assert_eq!(puback_reason(&mut c, 1), 0, "exactly the budget is taken");
    publish_with_user_bytes(&mut c, "up/t", QoS::AtLeastOnce, 2, 101);
    assert_eq!(puback_reason(&mut c, 2), 0x97, "one byte more is refused");
    publish_with_user_bytes(&mut c, "up/t", QoS::AtMostOnce, 0, 101);
    assert_eq!(c.expect_close(), Some(0x97), "QoS 0 has no ack: DISCONNECT");

    let mut connect = v5_connect("up-connect", true, 0);
    connect
        .properties
        .user_properties
        .push(("k".into(), "v".repeat(100)));
    let reply = connect_reply(&b, connect);
    assert_eq!(reply[..2], [0x20, 0x03], "a CONNACK");
    assert_eq!(reply[3], 0x97, "CONNECT with 101 bytes of user properties");
    assert_round_trip(b.addr, "up-sub2", "up-pub2", "up/alive");
}

/// A retained message of `bytes` bytes in all (topic `r/{name}` + payload).
fn retain(c: &mut Raw, name: &str, bytes: usize, id: u16) {
    let topic = format!("r/{name}");
    let payload = vec![b'p'; bytes - topic.len()];
    c.publish(&topic, &payload, QoS::AtLeastOnce, true, id);
    assert_eq!(
        puback_reason(c, id),
        0,
        "retained publishes are acknowledged"
    );
}

/// Which of `names` a fresh subscriber to `r/+` gets as retained messages.
fn retained_names(b: &TestBroker, names: &[&str]) -> Vec<String> {
    let (mut s, _) = Raw::connect(b.addr, Version::V5, "r-check", true);
    assert_eq!(s.subscribe(1, "r/+", QoS::AtMostOnce), vec![0]);
    let mut got = Vec::new();
    while let Ok(Some(Packet::Publish(p))) = s.recv_within(Duration::from_millis(300)) {
        got.push(p.topic.trim_start_matches("r/").to_string());
    }
    got.sort();
    assert!(got.iter().all(|g| names.contains(&g.as_str())), "{got:?}");
    got
}

#[test]
fn a_retained_message_larger_than_its_budget_is_delivered_but_not_kept() {
    let b = TestBroker::start_with(1, |c| c.mqtt.retained_message_bytes_max = 1000);
    let (mut c, _) = Raw::connect(b.addr, Version::V5, "r-pub", true);
    retain(&mut c, "fits", 1000, 1);
    retain(&mut c, "big", 1001, 2);
    assert_eq!(retained_names(&b, &["fits", "big"]), vec!["fits"]);
}

#[test]
fn retained_messages_stop_at_the_shards_byte_share_and_a_delete_frees_it() {
    let b = TestBroker::start_with(1, |c| c.mqtt.retained_bytes_max = 3000);
    let (mut c, _) = Raw::connect(b.addr, Version::V5, "rb-pub", true);
    retain(&mut c, "a", 1000, 1);
    retain(&mut c, "b", 1000, 2);
    retain(&mut c, "c", 1000, 3);
    retain(&mut c, "d", 1000, 4);
    assert_eq!(
        retained_names(&b, &["a", "b", "c", "d"]),
        vec!["a", "b", "c"]
    );
    // A replacement of the same size still fits; a delete frees room.
    retain(&mut c, "a", 1000, 5);
    c.publish("r/b", b"", QoS::AtLeastOnce, true, 6);
    assert_eq!(puback_reason(&mut c, 6), 0);
    retain(&mut c, "d", 1000, 7);
    assert_eq!(retained_names(&b, &["a", "c", "d"]), vec!["a", "c", "d"]);
}

#[test]
fn delayed_publishes_stop_at_their_byte_budget_with_0x97() {
    let b = TestBroker::start_with(1, |c| c.storage.delayed_bytes_max = 2000);
    let (mut c, _) = Raw::connect(b.addr, Version::V5, "d-pub", true);
    let payload = vec![b'p'; 997]; // topic "d/x" + 997 = 1000 bytes
    for (id, expect) in [(1, 0), (2, 0), (3, 0x97)] {
        c.publish("$delayed/600/d/x", &payload, QoS::AtLeastOnce, false, id);
        assert_eq!(puback_reason(&mut c, id), expect, "delayed publish {id}");
    }
}

#[test]
fn the_outbound_alias_map_keeps_at_most_its_bytes_of_topics() {
    let b = TestBroker::start_with(1, |c| c.mqtt.topic_alias_out_bytes_max = 10);
    let mut connect = v5_connect("alias-sub", true, 0);
    connect.properties.topic_alias_maximum = Some(10);
    let (mut s, _) = Raw::connect_with(b.addr, connect);
    assert_eq!(s.subscribe(1, "+", QoS::AtMostOnce), vec![0]);
    let (mut p, _) = Raw::connect(b.addr, Version::V5, "alias-pub", true);
    for topic in ["aaaaa", "bbbbb", "ccccc", "aaaaa", "ccccc"] {
        p.publish(topic, b"m", QoS::AtMostOnce, false, 0);
    }
    let got: Vec<(String, Option<u16>)> = (0..5)
        .map(|_| {
            let m = s.recv_publish();
            (m.topic.to_string(), m.properties.topic_alias)
        })
        .collect();
    let expected = [
        ("aaaaa", Some(1)), // 5 bytes kept
        ("bbbbb", Some(2)), // 10 bytes: the budget exactly
        ("ccccc", None),    // 15 would pass it: sent in full
        ("", Some(1)),      // the alias stands for its topic
        ("ccccc", None),
    ];
    let expected: Vec<(String, Option<u16>)> =
        expected.iter().map(|(t, a)| (t.to_string(), *a)).collect();
    assert_eq!(got, expected);
}

#[test]
fn a_session_queue_counts_the_whole_message_properties_included() {
    // 2 KiB of queue: one message of 1 + 1 + 1,100 bytes (topic, payload,
    // user properties) fits, a second does not; counting topic and payload
    // alone, both would.
    let b = TestBroker::start_with(1, |c| {
        c.mqtt.queue_bytes_max = 2048;
        c.mqtt.packet_size_max_bytes = 2048;
    });
    let (mut s, _) = Raw::connect_with(b.addr, v5_connect("q-sub", true, 600));
    assert_eq!(s.subscribe(1, "q", QoS::AtLeastOnce), vec![1]);
    s.send(&Packet::Disconnect(Default::default()));
    assert_eq!(s.expect_close(), None);
    let (mut p, _) = Raw::connect(b.addr, Version::V5, "q-pub", true);
    for id in 1..=2 {
        publish_with_user_bytes(&mut p, "q", QoS::AtLeastOnce, id, 1100);
        assert_eq!(puback_reason(&mut p, id), 0);
    }
    let (mut s, ack) = Raw::connect_with(b.addr, v5_connect("q-sub", false, 600));
    assert!(ack.session_present);
    let first = s.recv_publish();
    assert_eq!(first.properties.user_properties[0].1.len(), 1099);
    s.send(&puback(first.packet_id));
    s.expect_silence(Duration::from_millis(500));
}
