//! MQTT 3.1.1 behaviour seen through an independent client (rumqttc), on a
//! 2-shard broker with publisher and subscriber sessions on different shards
//! unless a test says otherwise.

#[path = "common/client.rs"]
mod client;
mod common;
#[path = "common/scenarios.rs"]
mod scenarios;

use client::v3::*;
use common::{Raw, TestBroker};
use shardmq::codec::{self, Version};

fn qos_num(q: QoS) -> u8 {
    match q {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

fn min_qos(a: QoS, b: QoS) -> QoS {
    if qos_num(a) <= qos_num(b) {
        a
    } else {
        b
    }
}

async fn connect_on(b: &TestBroker, prefix: &str, shard: usize) -> Client {
    connect(options(b.addr, &b.id_on_shard(prefix, shard))).await
}

async fn connect_persistent(b: &TestBroker, id: &str) -> Client {
    let mut o = options(b.addr, id);
    o.set_clean_session(false);
    connect(o).await
}

/// A client on shard 1 with a QoS 1 will on `topic`.
async fn connect_with_will(
    b: &TestBroker,
    prefix: &str,
    topic: &str,
    payload: &[u8],
    retain: bool,
) -> Client {
    let mut o = options(b.addr, &b.id_on_shard(prefix, 1));
    o.set_last_will(LastWill::new(
        topic,
        payload.to_vec(),
        QoS::AtLeastOnce,
        retain,
    ));
    connect(o).await
}

/// Subscribers granted QoS 0, 1 and 2 on shard 0; a publisher on shard 1
/// publishes at `pub_qos`; each gets min(pub_qos, granted).
async fn qos_matrix(pub_qos: QoS) {
    let b = TestBroker::start(2);
    let mut subs = Vec::new();
    for (i, granted) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        let mut s = connect_on(&b, &format!("sub{i}"), 0).await;
        assert_eq!(
            s.subscribe("q/t", granted).await,
            vec![SubscribeReasonCode::Success(granted)]
        );
        subs.push((granted, s));
    }
    let p = connect_on(&b, "pub", 1).await;
    p.publish("q/t", pub_qos, false, b"payload").await;
    for (granted, s) in &mut subs {
        let m = s.next_publish().await;
        assert_eq!(m.topic, "q/t");
        assert_eq!(&m.payload[..], b"payload");
        assert_eq!(
            m.qos,
            min_qos(pub_qos, *granted),
            "published at {pub_qos:?}, granted {granted:?}"
        );
        assert!(!m.retain);
    }
    for (_, s) in &mut subs {
        s.expect_no_publish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_gets_connack() {
    let b = TestBroker::start(2);
    for shard in 0..2 {
        let c = connect_on(&b, "conn", shard).await;
        assert_eq!(c.connack.code, rumqttc::ConnectReturnCode::Success);
        assert!(!c.connack.session_present);
        c.disconnect().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_publish_across_shards_delivered_at_min_qos() {
    qos_matrix(QoS::AtMostOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_publish_across_shards_delivered_at_min_qos() {
    qos_matrix(QoS::AtLeastOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_publish_across_shards_delivered_at_min_qos() {
    qos_matrix(QoS::ExactlyOnce).await;
}

/// Collect publishes until one on `last` arrives; returns their topics.
async fn topics_until(c: &mut Client, last: &str) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let m = c.next_publish().await;
        got.push(m.topic.clone());
        if m.topic == last {
            return got;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_plus_and_hash_match() {
    let b = TestBroker::start(2);
    let mut plus = connect_on(&b, "plus", 0).await;
    plus.subscribe("w/+/c", QoS::AtLeastOnce).await;
    let mut hash = connect_on(&b, "hash", 1).await;
    hash.subscribe("w/#", QoS::AtLeastOnce).await;
    let p = connect_on(&b, "pub", 1).await;
    for t in ["w/b/c", "w/b/d", "w/b/c/d", "w", "x/b/c", "w//c", "w/end/c"] {
        p.publish(t, QoS::AtLeastOnce, false, t.as_bytes()).await;
    }
    assert_eq!(
        topics_until(&mut plus, "w/end/c").await,
        ["w/b/c", "w//c", "w/end/c"]
    );
    assert_eq!(
        topics_until(&mut hash, "w/end/c").await,
        ["w/b/c", "w/b/d", "w/b/c/d", "w", "w//c", "w/end/c"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_topics_not_matched_by_leading_wildcards() {
    let b = TestBroker::start(2);
    let mut hash = connect_on(&b, "hash", 0).await;
    hash.subscribe("#", QoS::AtLeastOnce).await;
    let mut plus = connect_on(&b, "plus", 0).await;
    plus.subscribe("+/info", QoS::AtLeastOnce).await;
    let mut dollar = connect_on(&b, "dollar", 1).await;
    dollar.subscribe("$app/#", QoS::AtLeastOnce).await;
    let p = connect_on(&b, "pub", 1).await;
    for t in [
        "$app/info",
        "a/info",
        "$app/broker/load",
        "b/info",
        "$app/end",
    ] {
        p.publish(t, QoS::AtLeastOnce, false, b"x").await;
    }
    assert_eq!(
        topics_until(&mut hash, "b/info").await,
        ["a/info", "b/info"]
    );
    assert_eq!(
        topics_until(&mut plus, "b/info").await,
        ["a/info", "b/info"]
    );
    assert_eq!(
        topics_until(&mut dollar, "$app/end").await,
        ["$app/info", "$app/broker/load", "$app/end"]
    );
    hash.expect_no_publish().await;
    plus.expect_no_publish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_sent_on_subscribe_replaced_and_deleted() {
    let b = TestBroker::start(2);
    // A live subscriber: once it has a message, the retained copy is stored
    // (the retained store and the live delivery travel the same lane).
    let mut witness = connect_on(&b, "witness", 0).await;
    witness.subscribe("r/t", QoS::AtLeastOnce).await;
    let mut p = connect_on(&b, "pub", 1).await;

    p.publish_acked("r/t", true, b"v1").await;
    assert_eq!(text(&witness.next_publish().await), "v1");
    let mut s1 = connect_on(&b, "s1", 0).await;
    s1.subscribe("r/t", QoS::AtLeastOnce).await;
    let m = s1.next_publish().await;
    assert_eq!(
        (m.topic.as_str(), text(&m).as_str(), m.retain),
        ("r/t", "v1", true)
    );

    p.publish_acked("r/t", true, b"v2").await;
    assert_eq!(text(&witness.next_publish().await), "v2");
    let mut s2 = connect_on(&b, "s2", 1).await;
    s2.subscribe("r/+", QoS::AtLeastOnce).await;
    let m = s2.next_publish().await;
    assert_eq!(
        (m.topic.as_str(), text(&m).as_str(), m.retain),
        ("r/t", "v2", true)
    );
    // s1 already subscribed: it gets v2 live, without the retain flag.
    let m = s1.next_publish().await;
    assert_eq!((text(&m).as_str(), m.retain), ("v2", false));

    p.publish_acked("r/t", true, b"").await;
    assert_eq!(text(&witness.next_publish().await), "");
    let mut s3 = connect_on(&b, "s3", 0).await;
    s3.subscribe("r/t", QoS::AtLeastOnce).await;
    p.publish_acked("r/t", false, b"marker").await;
    let m = s3.next_publish().await;
    assert_eq!(
        (text(&m).as_str(), m.retain),
        ("marker", false),
        "a deleted retained message must not be sent"
    );
    s3.expect_no_publish().await;
    s2.next_publish().await; // the empty live message
    let m = s2.next_publish().await;
    assert_eq!(text(&m), "marker");
    s2.expect_no_publish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_flag_cleared_on_live_delivery() {
    let b = TestBroker::start(2);
    let mut live = connect_on(&b, "live", 0).await;
    live.subscribe("rl/t", QoS::AtLeastOnce).await;
    let mut p = connect_on(&b, "pub", 1).await;
    p.publish_acked("rl/t", true, b"kept").await;
    let m = live.next_publish().await;
    assert_eq!(text(&m), "kept");
    assert!(
        !m.retain,
        "a live delivery to an existing subscriber has RETAIN 0"
    );
    // It was retained all the same: a new subscription gets it with RETAIN 1.
    let mut late = connect_on(&b, "late", 1).await;
    late.subscribe("rl/#", QoS::AtLeastOnce).await;
    let m = late.next_publish().await;
    assert_eq!((text(&m).as_str(), m.retain), ("kept", true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_queues_qos1_while_offline() {
    let b = TestBroker::start(2);
    let sub_id = b.id_on_shard("persist", 0);
    let mut s = connect_persistent(&b, &sub_id).await;
    assert!(!s.connack.session_present);
    s.subscribe("ps/t", QoS::AtLeastOnce).await;
    s.disconnect().await;

    let mut p = connect_on(&b, "pub", 1).await;
    for i in 0..3 {
        p.publish_acked("ps/t", false, format!("m{i}").as_bytes())
            .await;
    }
    let mut s = connect_persistent(&b, &sub_id).await;
    assert!(s.connack.session_present, "the session must be resumed");
    for i in 0..3 {
        let m = s.next_publish().await;
        assert_eq!((m.topic.as_str(), text(&m)), ("ps/t", format!("m{i}")));
        assert_eq!(m.qos, QoS::AtLeastOnce);
    }
    // The subscription survived too.
    p.publish_acked("ps/t", false, b"live").await;
    assert_eq!(text(&s.next_publish().await), "live");
    s.expect_no_publish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_session_discards_state() {
    let b = TestBroker::start(2);
    let sub_id = b.id_on_shard("discard", 0);
    let mut s = connect_persistent(&b, &sub_id).await;
    s.subscribe("cs/t", QoS::AtLeastOnce).await;
    s.disconnect().await;
    let mut p = connect_on(&b, "pub", 1).await;
    p.publish_acked("cs/t", false, b"queued").await;

    let mut s = connect(options(b.addr, &sub_id)).await;
    assert!(!s.connack.session_present, "clean session must not resume");
    s.subscribe("cs/marker", QoS::AtLeastOnce).await;
    p.publish_acked("cs/t", false, b"after").await;
    p.publish_acked("cs/marker", false, b"marker").await;
    let m = s.next_publish().await;
    assert_eq!(
        (m.topic.as_str(), text(&m).as_str()),
        ("cs/marker", "marker"),
        "neither queued messages nor old subscriptions may survive a clean session"
    );
    s.expect_no_publish().await;
    s.disconnect().await;

    // And the clean session itself is not kept either.
    let s = connect_persistent(&b, &sub_id).await;
    assert!(!s.connack.session_present);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_disconnects_first_client() {
    let b = TestBroker::start(2);
    let id = b.id_on_shard("dup", 0);
    let mut first = connect(options(b.addr, &id)).await;
    first.subscribe("to/first", QoS::AtLeastOnce).await;
    let mut second = connect(options(b.addr, &id)).await;
    first.closed().await;
    second.subscribe("to/t", QoS::AtLeastOnce).await;
    let mut p = connect_on(&b, "pub", 1).await;
    p.publish_acked("to/t", false, b"to second").await;
    assert_eq!(text(&second.next_publish().await), "to second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_repeated_across_accepting_shards() {
    // The kernel spreads connections over the shards' listeners; with several
    // successive connections some land on a shard other than the home shard
    // and other than the previous connection's.
    let b = TestBroker::start(2);
    let id = b.id_on_shard("hop", 1);
    let mut p = connect_on(&b, "pub", 0).await;
    let mut current = connect_persistent(&b, &id).await;
    current.subscribe("hop/t", QoS::AtLeastOnce).await;
    for round in 0..6 {
        let mut next = connect_persistent(&b, &id).await;
        assert!(next.connack.session_present, "round {round}");
        current.closed().await;
        let payload = format!("round {round}");
        p.publish_acked("hop/t", false, payload.as_bytes()).await;
        assert_eq!(text(&next.next_publish().await), payload);
        current = next;
    }
    current.expect_no_publish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_published_on_abrupt_drop() {
    let b = TestBroker::start(2);
    let mut s = connect_on(&b, "sub", 0).await;
    s.subscribe("will/t", QoS::AtLeastOnce).await;
    let w = connect_with_will(&b, "dying", "will/t", b"gone", false).await;
    w.events.abort(); // the socket closes without DISCONNECT
    let m = s.next_publish().await;
    assert_eq!((m.topic.as_str(), text(&m).as_str()), ("will/t", "gone"));
    assert_eq!(m.qos, QoS::AtLeastOnce);
    assert!(!m.retain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_not_published_on_normal_disconnect() {
    let b = TestBroker::start(2);
    let mut s = connect_on(&b, "sub", 0).await;
    s.subscribe("will/t", QoS::AtLeastOnce).await;
    let w = connect_with_will(&b, "polite", "will/t", b"gone", false).await;
    w.disconnect().await;
    let mut p = connect_on(&b, "pub", 1).await;
    p.publish_acked("will/t", false, b"marker").await;
    let m = s.next_publish().await;
    assert_eq!(text(&m), "marker", "no will after DISCONNECT");
    s.expect_no_publish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_retain_is_stored() {
    let b = TestBroker::start(2);
    let mut live = connect_on(&b, "live", 0).await;
    live.subscribe("wr/t", QoS::AtLeastOnce).await;
    let w = connect_with_will(&b, "dying", "wr/t", b"retained will", true).await;
    w.events.abort();
    let m = live.next_publish().await;
    assert_eq!((text(&m).as_str(), m.retain), ("retained will", false));
    let mut late = connect_on(&b, "late", 0).await;
    late.subscribe("wr/t", QoS::AtLeastOnce).await;
    let m = late.next_publish().await;
    assert_eq!((text(&m).as_str(), m.retain), ("retained will", true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery() {
    let b = TestBroker::start(2);
    let mut s = connect_on(&b, "sub", 0).await;
    s.subscribe("u/a", QoS::AtLeastOnce).await;
    s.subscribe("u/marker", QoS::AtLeastOnce).await;
    let mut p = connect_on(&b, "pub", 1).await;
    p.publish_acked("u/a", false, b"before").await;
    assert_eq!(text(&s.next_publish().await), "before");
    s.unsubscribe("u/a").await;
    p.publish_acked("u/a", false, b"after").await;
    p.publish_acked("u/marker", false, b"marker").await;
    let m = s.next_publish().await;
    assert_eq!(
        (m.topic.as_str(), text(&m).as_str()),
        ("u/marker", "marker")
    );
    s.expect_no_publish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_timeout_closes_and_publishes_will() {
    let b = TestBroker::start(2);
    let mut s = connect_on(&b, "sub", 0).await;
    s.subscribe("ka/will", QoS::AtLeastOnce).await;
    let mut connect = common::connect_packet(Version::V3_1_1, &b.id_on_shard("silent", 1), true);
    connect.keep_alive = 1;
    connect.will = Some(codec::Will {
        topic: "ka/will".into(),
        payload: bytes::Bytes::from_static(b"timed out"),
        qos: codec::QoS::AtLeastOnce,
        retain: false,
        properties: codec::Properties::default(),
    });
    let (mut raw, ack) = Raw::connect_with(b.addr, connect);
    assert_eq!(ack.reason, 0);
    // Send nothing more: after 1.5 x keepalive the broker gives up.
    let m = s.next_publish().await;
    assert_eq!(
        (m.topic.as_str(), text(&m).as_str()),
        ("ka/will", "timed out")
    );
    assert_eq!(raw.expect_close(), None, "3.1.1 has no server DISCONNECT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_splits_across_shards() {
    scenarios::shared_subscription_splits_across_shards::<Client>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_member_disconnect_sends_all_to_other() {
    scenarios::shared_subscription_member_disconnect_sends_all_to_other::<Client>().await;
}
