mod common;
use common::*;
use shardmq::codec::{QoS, Version};

#[test]
fn publish_reaches_subscriber_on_other_shard() {
    let b = TestBroker::start(2);
    let sub_id = b.id_on_shard("sub", 0);
    let pub_id = b.id_on_shard("pub", 1);
    let (mut sub, ack) = Raw::connect(b.addr, Version::V3_1_1, &sub_id, true);
    assert_eq!(ack.reason, 0);
    assert_eq!(sub.subscribe(1, "a/+", QoS::AtLeastOnce), vec![1]);
    let (mut p, _) = Raw::connect(b.addr, Version::V5, &pub_id, true);
    p.publish("a/b", b"hello", QoS::AtMostOnce, false, 0);
    let got = sub.recv_publish();
    assert_eq!(&*got.topic, "a/b");
    assert_eq!(&got.payload[..], b"hello");
}
