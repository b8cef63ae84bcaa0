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
