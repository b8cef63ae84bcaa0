//! Ordering guarantees across shards that clients can observe: an
//! acknowledgement means the effect is visible everywhere on the node.

mod common;

use common::*;
use shardmq::codec::{QoS, Version};
use shardmq::home_shard;

/// A topic whose retained copy lives on `shard`.
fn topic_on_shard(prefix: &str, shard: usize, shards: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}/{i}"))
        .find(|t| home_shard(t, shards) == shard)
        .unwrap()
}

#[test]
fn a_subscription_is_effective_on_every_shard_once_subscribed() {
    let b = TestBroker::start(2);
    let (mut publisher, _) = Raw::connect(b.addr, Version::V5, &b.id_on_shard("p", 1), true);
    for round in 0..50 {
        let id = b.id_on_shard(&format!("s{round}"), 0);
        let (mut sub, _) = Raw::connect(b.addr, Version::V5, &id, true);
        let topic = format!("fresh/{round}");
        assert_eq!(sub.subscribe(1, &topic, QoS::AtLeastOnce), vec![1]);
        publisher.publish(&topic, b"now", QoS::AtMostOnce, false, 0);
        let got = sub.recv_publish();
        assert_eq!(&*got.topic, topic, "round {round}");
    }
}

#[test]
fn a_retained_publish_is_visible_to_new_subscribers_once_acknowledged() {
    let b = TestBroker::start(2);
    let pub_id = b.id_on_shard("p", 1);
    let (mut publisher, _) = Raw::connect(b.addr, Version::V3_1_1, &pub_id, true);
    for round in 0..50u16 {
        let topic = topic_on_shard(&format!("ret{round}"), 0, b.shards);
        publisher.publish(&topic, b"kept", QoS::AtLeastOnce, true, round + 1);
        match publisher.recv() {
            Some(shardmq::codec::Packet::PubAck(a)) => assert_eq!(a.packet_id, round + 1),
            other => panic!("expected PUBACK, got {other:?}"),
        }
        let sub_id = b.id_on_shard(&format!("s{round}"), round as usize % 2);
        let (mut sub, _) = Raw::connect(b.addr, Version::V3_1_1, &sub_id, true);
        sub.subscribe(1, &topic, QoS::AtMostOnce);
        let got = sub.recv_publish();
        assert!(got.retain, "round {round}");
        assert_eq!(&got.payload[..], b"kept");
    }
}

/// The fan-in shape against the default configuration: 100 publishers
/// (on both shards) send 100 QoS 0 messages of 1 KiB each to one
/// wildcard subscriber that reads nothing until all 10,000 are in (its
/// socket's receive buffer kept at 4 KiB: 10 MiB is more than the
/// kernel's buffers take, so most wait in the broker); every one arrives,
/// in order per publisher. With the old default of 1,000 messages per
/// session most of them were dropped.
#[test]
fn a_fan_in_of_10000_messages_in_flight_loses_none_with_the_default_configuration() {
    use shardmq::codec::Packet;
    let b = TestBroker::start(2);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&b.addr.into()).unwrap();
    let mut sub = common::Raw::from_stream(socket.into(), Version::V3_1_1);
    sub.send(&Packet::Connect(Box::new(common::connect_packet(
        Version::V3_1_1,
        "fan-in-sub",
        true,
    ))));
    assert!(matches!(sub.recv(), Some(Packet::ConnAck(a)) if a.reason == 0));
    sub.subscribe(1, "fan/in/#", QoS::AtMostOnce);
    let mut pubs: Vec<common::Raw> = (0..100)
        .map(|i| {
            let id = format!("fan-in-pub-{i}");
            common::Raw::connect(b.addr, Version::V3_1_1, &id, true).0
        })
        .collect();
    for seq in 0u32..100 {
        for (i, p) in pubs.iter_mut().enumerate() {
            let mut payload = [(i as u32).to_be_bytes(), seq.to_be_bytes()].concat();
            payload.resize(1024, 0);
            p.publish(&format!("fan/in/{i}"), &payload, QoS::AtMostOnce, false, 0);
        }
    }
    // Each publisher's messages were read and routed before its PINGRESP.
    for p in &mut pubs {
        p.send(&Packet::PingReq);
        assert!(matches!(p.recv(), Some(Packet::PingResp)));
    }
    let mut next = [0u32; 100];
    for got in 0..10_000 {
        let p = match sub.recv_within(common::WAIT) {
            Ok(Some(Packet::Publish(p))) => p,
            other => panic!("after {got} of 10,000 messages: {other:?}"),
        };
        let publisher = u32::from_be_bytes(p.payload[..4].try_into().unwrap()) as usize;
        let seq = u32::from_be_bytes(p.payload[4..8].try_into().unwrap());
        assert_eq!(
            seq, next[publisher],
            "publisher {publisher}: out of order or lost"
        );
        next[publisher] += 1;
    }
    assert!(next.iter().all(|&n| n == 100));
}
