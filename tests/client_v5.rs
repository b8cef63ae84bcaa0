//! MQTT 5.0 behaviour seen through an independent client (rumqttc), on a
//! 2-shard broker with publisher and subscriber sessions on different shards
//! unless a test says otherwise.

#[path = "common/client.rs"]
mod client;
mod common;
#[path = "common/scenarios.rs"]
mod scenarios;

use std::time::Duration;

use bytes::Bytes;
use client::v5::*;
use common::{Raw, TestBroker};
use shardmq::codec::{self, Version};

async fn connect_on(b: &TestBroker, prefix: &str, shard: usize) -> Client {
    connect(options(b.addr, &b.id_on_shard(prefix, shard))).await
}

/// Options for a session that outlives its connection by `expiry` seconds.
fn persistent(b: &TestBroker, id: &str, clean_start: bool, expiry: u32) -> MqttOptions {
    let mut o = options(b.addr, id);
    o.set_clean_start(clean_start);
    set_session_expiry(&mut o, expiry);
    o
}

fn sub_ids(p: &Publish) -> Vec<usize> {
    let mut ids = props(p).subscription_identifiers;
    ids.sort_unstable();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_properties_advertised() {
    let b = TestBroker::start_with(2, |cfg| {
        cfg.mqtt.receive_maximum = 7;
        cfg.mqtt.topic_alias_max = 5;
        cfg.mqtt.packet_size_max_bytes = 4096;
    });
    for shard in 0..2 {
        let c = connect_on(&b, "props", shard).await;
        assert_eq!(
            c.connack.code,
            rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
        );
        assert!(!c.connack.session_present);
        let p = c.connack_props();
        assert_eq!(p.receive_max, Some(7));
        assert_eq!(p.topic_alias_max, Some(5));
        assert_eq!(p.max_packet_size, Some(4096));
        assert_eq!(p.retain_available, Some(1));
        assert_eq!(p.wildcard_subscription_available, Some(1));
        assert_eq!(p.subscription_identifiers_available, Some(1));
        assert_eq!(p.shared_subscription_available, Some(1));
        assert_eq!(p.max_qos, None, "QoS 2 is supported: no Maximum QoS");
        assert_eq!(p.assigned_client_identifier, None);
        assert_eq!(p.response_information, None, "not requested");
        c.disconnect().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_client_id_gets_assigned_identifier() {
    let b = TestBroker::start(2);
    let mut c = connect(options(b.addr, "")).await;
    let assigned = c
        .connack_props()
        .assigned_client_identifier
        .clone()
        .expect("an Assigned Client Identifier");
    assert!(!assigned.is_empty());
    // The session works under that identity.
    c.subscribe("aci/t", QoS::AtLeastOnce).await;
    let mut p = connect_on(&b, "pub", 1).await;
    p.publish_acked("aci/t", false, b"hello").await;
    assert_eq!(text(&c.next_publish().await), "hello");
    // Two anonymous clients get different identifiers.
    let d = connect(options(b.addr, "")).await;
    let other = d.connack_props().assigned_client_identifier.clone();
    assert!(other.is_some() && other.as_deref() != Some(assigned.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_resumes_within_interval_and_ends_after() {
    let b = TestBroker::start(2);
    let id = b.id_on_shard("expiring", 0);
    let mut s = connect(persistent(&b, &id, true, 2)).await;
    s.subscribe("se/t", QoS::AtLeastOnce).await;
    s.disconnect().await;
    let mut p = connect_on(&b, "pub", 1).await;
    p.publish_acked("se/t", false, b"queued").await;

    let mut s = connect(persistent(&b, &id, false, 2)).await;
    assert!(
        s.connack.session_present,
        "resumed within the expiry interval"
    );
    assert_eq!(text(&s.next_publish().await), "queued");
    s.disconnect().await;

    tokio::time::sleep(Duration::from_millis(3500)).await;
    p.publish_acked("se/t", false, b"too late").await;
    let mut s = connect(persistent(&b, &id, false, 2)).await;
    assert!(!s.connack.session_present, "the session expired");
    s.subscribe("se/marker", QoS::AtLeastOnce).await;
    p.publish_acked("se/t", false, b"old subscription").await;
    p.publish_acked("se/marker", false, b"marker").await;
    let m = s.next_publish().await;
    assert_eq!((topic(&m), text(&m)), ("se/marker".into(), "marker".into()));
    s.expect_no_publish().await;
}

/// Subscribe at QoS 1 with No Local and Retain As Published as given.
async fn subscribe_flags(c: &mut Client, path: &str, no_local: bool, retain_as_published: bool) {
    let rule = RetainForwardRule::OnEverySubscribe;
    let f = filter(path, QoS::AtLeastOnce, no_local, retain_as_published, rule);
    c.subscribe_filters(vec![f], None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local_suppresses_own_publishes() {
    let b = TestBroker::start(2);
    let mut me = connect_on(&b, "me", 0).await;
    subscribe_flags(&mut me, "nl/t", true, false).await;
    let mut other = connect_on(&b, "other", 1).await;
    other.subscribe("nl/t", QoS::AtLeastOnce).await;

    me.publish_acked("nl/t", false, b"mine").await;
    assert_eq!(text(&other.next_publish().await), "mine");
    other.publish_acked("nl/t", false, b"theirs").await;
    let m = me.next_publish().await;
    assert_eq!(
        text(&m),
        "theirs",
        "No Local: own message must not come back"
    );
    me.expect_no_publish().await;
    // Without No Local, the other client does get its own message.
    assert_eq!(text(&other.next_publish().await), "theirs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_as_published_keeps_flag_on_live_delivery() {
    let b = TestBroker::start(2);
    let mut keep = connect_on(&b, "rap", 0).await;
    subscribe_flags(&mut keep, "rap/t", false, true).await;
    let mut clear = connect_on(&b, "norap", 1).await;
    clear.subscribe("rap/t", QoS::AtLeastOnce).await;
    let mut p = connect_on(&b, "pub", 1).await;
    p.publish_acked("rap/t", true, b"retained").await;
    p.publish_acked("rap/t", false, b"plain").await;
    let m = keep.next_publish().await;
    assert_eq!((text(&m).as_str(), m.retain), ("retained", true));
    let m = keep.next_publish().await;
    assert_eq!((text(&m).as_str(), m.retain), ("plain", false));
    let m = clear.next_publish().await;
    assert_eq!((text(&m).as_str(), m.retain), ("retained", false));
    let m = clear.next_publish().await;
    assert_eq!((text(&m).as_str(), m.retain), ("plain", false));
}

/// (payload, retain) of every publish up to and including "marker".
async fn until_marker(c: &mut Client) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    loop {
        let m = c.next_publish().await;
        out.push((text(&m), m.retain));
        if text(&m) == "marker" {
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_handling_0_1_2() {
    let b = TestBroker::start(2);
    let mut witness = connect_on(&b, "witness", 0).await;
    witness.subscribe("rh/t", QoS::AtLeastOnce).await;
    let mut p = connect_on(&b, "pub", 1).await;
    p.publish_acked("rh/t", true, b"kept").await;
    assert_eq!(text(&witness.next_publish().await), "kept");

    let rule = |r| vec![filter("rh/t", QoS::AtLeastOnce, false, false, r)];
    let mut c0 = connect_on(&b, "rh0", 0).await;
    let mut c1 = connect_on(&b, "rh1", 1).await;
    let mut c2 = connect_on(&b, "rh2", 0).await;
    for _ in 0..2 {
        c0.subscribe_filters(rule(RetainForwardRule::OnEverySubscribe), None)
            .await;
        c1.subscribe_filters(rule(RetainForwardRule::OnNewSubscribe), None)
            .await;
        c2.subscribe_filters(rule(RetainForwardRule::Never), None)
            .await;
    }
    p.publish_acked("rh/t", false, b"marker").await;

    let kept = ("kept".to_string(), true);
    let marker = ("marker".to_string(), false);
    assert_eq!(
        until_marker(&mut c0).await,
        [kept.clone(), kept.clone(), marker.clone()],
        "Retain Handling 0: at every subscribe"
    );
    assert_eq!(
        until_marker(&mut c1).await,
        [kept.clone(), marker.clone()],
        "Retain Handling 1: only for a new subscription"
    );
    assert_eq!(
        until_marker(&mut c2).await,
        [marker],
        "Retain Handling 2: never"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_subscriptions_give_one_copy_with_all_identifiers() {
    let b = TestBroker::start(2);
    let mut c = connect_on(&b, "ids", 0).await;
    c.subscribe_filters(vec![Filter::new("si/+", QoS::AtMostOnce)], Some(1))
        .await;
    c.subscribe_filters(vec![Filter::new("si/#", QoS::AtLeastOnce)], Some(2))
        .await;
    c.subscribe_filters(vec![Filter::new("marker", QoS::AtLeastOnce)], Some(3))
        .await;
    let mut p = connect_on(&b, "pub", 1).await;
    p.publish("si/a", QoS::ExactlyOnce, false, b"both").await;
    p.publish_acked("marker", false, b"marker").await;

    let m = c.next_publish().await;
    assert_eq!(topic(&m), "si/a");
    assert_eq!(sub_ids(&m), [1, 2], "one copy carrying both identifiers");
    assert_eq!(m.qos, QoS::AtLeastOnce, "the highest granted QoS");
    let m = c.next_publish().await;
    assert_eq!(
        (topic(&m).as_str(), sub_ids(&m)),
        ("marker", vec![3]),
        "exactly one copy of si/a"
    );
    c.expect_no_publish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_expiry_for_offline_session() {
    let b = TestBroker::start(2);
    let id = b.id_on_shard("offline", 0);
    let mut s = connect(persistent(&b, &id, true, 60)).await;
    s.subscribe("me/t", QoS::AtLeastOnce).await;
    s.disconnect().await;

    let mut p = connect_on(&b, "pub", 1).await;
    let expiring = |s| PublishProperties {
        message_expiry_interval: Some(s),
        ..Default::default()
    };
    p.publish_props_acked("me/t", b"short", expiring(1)).await;
    p.publish_props_acked("me/t", b"long", expiring(60)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut s = connect(persistent(&b, &id, false, 60)).await;
    assert!(s.connack.session_present);
    let m = s.next_publish().await;
    assert_eq!(
        text(&m),
        "long",
        "the message with expiry 1 s must be dropped"
    );
    let left = props(&m).message_expiry_interval.expect("expiry forwarded");
    // At least 2 s have passed since the broker accepted it.
    assert!((1..=58).contains(&left), "remaining expiry {left}");
    s.expect_no_publish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_properties_pass_through() {
    let b = TestBroker::start(2);
    let mut s = connect_on(&b, "responder", 0).await;
    s.subscribe("rr/req", QoS::AtLeastOnce).await;
    let mut p = connect_on(&b, "requester", 1).await;
    let user = vec![
        ("b".to_string(), "1".to_string()),
        ("a".to_string(), "2".to_string()),
        ("b".to_string(), "3".to_string()),
    ];
    let sent = PublishProperties {
        payload_format_indicator: Some(1),
        response_topic: Some("rr/resp/42".into()),
        correlation_data: Some(Bytes::from_static(b"\x00corr\xff")),
        user_properties: user.clone(),
        content_type: Some("application/json".into()),
        ..Default::default()
    };
    p.publish_props_acked("rr/req", b"{\"q\":1}", sent).await;
    let m = s.next_publish().await;
    let got = props(&m);
    assert_eq!(got.payload_format_indicator, Some(1));
    assert_eq!(got.response_topic.as_deref(), Some("rr/resp/42"));
    assert_eq!(got.correlation_data.as_deref(), Some(&b"\x00corr\xff"[..]));
    assert_eq!(got.user_properties, user, "user properties in order");
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    assert_eq!(got.message_expiry_interval, None);
    assert_eq!(text(&m), "{\"q\":1}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_information_answered() {
    let b = TestBroker::start(2);
    let id = b.id_on_shard("asker", 1);
    let mut o = options(b.addr, &id);
    o.set_request_response_info(Some(1));
    let c = connect(o).await;
    let info = c
        .connack_props()
        .response_information
        .clone()
        .expect("Response Information in CONNACK");
    assert_eq!(info, format!("response/{id}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_alias_inbound() {
    let b = TestBroker::start(2);
    let mut s = connect_on(&b, "sub", 0).await;
    s.subscribe("ta/#", QoS::AtLeastOnce).await;
    let mut p = connect_on(&b, "pub", 1).await;
    assert_eq!(p.connack_props().topic_alias_max, Some(32));
    let alias = |a| PublishProperties {
        topic_alias: Some(a),
        ..Default::default()
    };
    p.publish_props_acked("ta/in", b"first", alias(1)).await;
    p.publish_props_acked("", b"second", alias(1)).await;
    p.publish_props_acked("ta/other", b"third", alias(2)).await;
    p.publish_props_acked("", b"fourth", alias(1)).await;
    for (t, pl) in [
        ("ta/in", "first"),
        ("ta/in", "second"),
        ("ta/other", "third"),
        ("ta/in", "fourth"),
    ] {
        let m = s.next_publish().await;
        assert_eq!((topic(&m).as_str(), text(&m).as_str()), (t, pl));
        assert_eq!(props(&m).topic_alias, None, "subscriber allows no aliases");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_alias_outbound() {
    let b = TestBroker::start(2);
    let mut o = options(b.addr, &b.id_on_shard("aliased", 0));
    o.set_topic_alias_max(Some(2));
    let mut s = connect(o).await;
    s.subscribe("tb/#", QoS::AtLeastOnce).await;
    let mut p = connect_on(&b, "pub", 1).await;
    let topics = ["tb/a", "tb/b", "tb/c", "tb/a", "tb/b", "tb/c", "tb/a"];
    for (i, t) in topics.iter().enumerate() {
        p.publish_acked(t, false, format!("{i}").as_bytes()).await;
    }
    let mut aliases = Vec::new();
    for (i, t) in topics.iter().enumerate() {
        let m = s.next_publish().await;
        assert_eq!((topic(&m), text(&m)), (t.to_string(), format!("{i}")));
        aliases.push(props(&m).topic_alias);
    }
    // tb/a and tb/b take the client's two aliases; tb/c goes in full.
    let want = [Some(1), Some(2), None, Some(1), Some(2), None, Some(1)];
    assert_eq!(aliases, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_delay_cancelled_by_reconnect() {
    let b = TestBroker::start(2);
    let mut s = connect_on(&b, "sub", 0).await;
    s.subscribe("wd/#", QoS::AtLeastOnce).await;
    // Both on shard 1, so their will timers run on the same shard.
    let back_id = b.id_on_shard("comes-back", 1);
    let control_id = b.id_on_shard("control", 1);
    let mut o = persistent(&b, &back_id, true, 10);
    o.set_last_will(will("wd/back", b"back", false, Some(2)));
    let back = connect(o).await;
    let mut o = persistent(&b, &control_id, true, 10);
    o.set_last_will(will("wd/control", b"control", false, Some(2)));
    let control = connect(o).await;

    back.events.abort();
    let mut o = persistent(&b, &back_id, false, 10);
    o.set_last_will(will("wd/back", b"back", false, Some(2)));
    let back_again = connect(o).await;
    assert!(back_again.connack.session_present);
    control.events.abort(); // its will is due after back's would have been

    let m = s.next_publish_within(Duration::from_secs(6)).await;
    assert_eq!(
        topic(&m),
        "wd/control",
        "the reconnect cancels the delayed will"
    );
    s.expect_no_publish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_delay_published_after_delay() {
    let b = TestBroker::start(2);
    let mut s = connect_on(&b, "sub", 0).await;
    s.subscribe("wd/#", QoS::AtLeastOnce).await;
    let mut o = persistent(&b, &b.id_on_shard("delayed", 1), true, 10);
    o.set_last_will(will("wd/delayed", b"delayed", false, Some(2)));
    let delayed = connect(o).await;
    let mut o = persistent(&b, &b.id_on_shard("prompt", 1), true, 10);
    o.set_last_will(will("wd/prompt", b"prompt", false, None));
    let prompt = connect(o).await;
    delayed.events.abort();
    prompt.events.abort();
    let m = s.next_publish().await;
    assert_eq!(topic(&m), "wd/prompt", "a will without delay goes first");
    let m = s.next_publish_within(Duration::from_secs(6)).await;
    assert_eq!(
        (topic(&m), text(&m)),
        ("wd/delayed".into(), "delayed".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_with_session_expiry_zero_published_immediately() {
    let b = TestBroker::start(2);
    let mut s = connect_on(&b, "sub", 0).await;
    s.subscribe("wz/t", QoS::AtLeastOnce).await;
    // Will delay 30 s, but the session ends with the connection.
    let mut o = options(b.addr, &b.id_on_shard("short-lived", 1));
    o.set_last_will(will("wz/t", b"now", false, Some(30)));
    let w = connect(o).await;
    w.events.abort();
    let m = s.next_publish().await; // WAIT (5 s) is far below the 30 s delay
    assert_eq!(text(&m), "now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_with_will_message_publishes_will() {
    let b = TestBroker::start(2);
    let mut s = connect_on(&b, "sub", 0).await;
    s.subscribe("dw/t", QoS::AtLeastOnce).await;
    let mut c = common::connect_packet(Version::V5, &b.id_on_shard("leaver", 1), true);
    c.will = Some(codec::Will {
        topic: "dw/t".into(),
        payload: Bytes::from_static(b"on purpose"),
        qos: codec::QoS::AtLeastOnce,
        retain: false,
        properties: codec::Properties::default(),
    });
    let (mut raw, ack) = Raw::connect_with(b.addr, c);
    assert_eq!(ack.reason, 0);
    raw.send(&codec::Packet::Disconnect(codec::Disconnect {
        reason: codec::reason::DISCONNECT_WITH_WILL,
        properties: codec::Properties::default().into(),
    }));
    let m = s.next_publish().await;
    assert_eq!((topic(&m), text(&m)), ("dw/t".into(), "on purpose".into()));
    assert_eq!(
        raw.expect_close(),
        None,
        "the server sends no DISCONNECT back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_sends_session_taken_over() {
    // The old connection is a raw client: rumqttc 0.24 cannot parse a
    // DISCONNECT whose body is only a reason code (remaining length 1, valid
    // per [MQTT-3.14.2.2.1]); it waits for a property length that never comes.
    let b = TestBroker::start(2);
    for shard in 0..2 {
        let id = b.id_on_shard("twin", shard);
        let (mut first, ack) = Raw::connect(b.addr, Version::V5, &id, true);
        assert_eq!(ack.reason, 0);
        let mut second = connect(options(b.addr, &id)).await;
        assert_eq!(
            first.expect_close(),
            Some(codec::reason::SESSION_TAKEN_OVER),
            "the old connection gets DISCONNECT 0x8E (home shard {shard})"
        );
        second.subscribe("tw/t", QoS::AtLeastOnce).await;
        let mut p = connect_on(&b, "pub", 1 - shard).await;
        p.publish_acked("tw/t", false, b"second works").await;
        assert_eq!(text(&second.next_publish().await), "second works");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_limits_unacked_publishes() {
    let b = TestBroker::start(2);
    let mut o = options(b.addr, &b.id_on_shard("slow", 0));
    o.set_receive_maximum(Some(2));
    o.set_manual_acks(true);
    let mut s = connect(o).await;
    s.subscribe("rm/t", QoS::AtLeastOnce).await;
    let mut p = connect_on(&b, "pub", 1).await;
    for i in 0..5 {
        p.publish_acked("rm/t", false, format!("m{i}").as_bytes())
            .await;
    }
    let m0 = s.next_publish().await;
    let m1 = s.next_publish().await;
    assert_eq!((text(&m0), text(&m1)), ("m0".into(), "m1".into()));
    s.expect_no_publish().await; // two unacknowledged: the window is full
    s.client.ack(&m0).await.expect("ack queued");
    let m2 = s.next_publish().await;
    assert_eq!(text(&m2), "m2");
    s.expect_no_publish().await;
    for m in [&m1, &m2] {
        s.client.ack(m).await.expect("ack queued");
    }
    let m3 = s.next_publish().await;
    let m4 = s.next_publish().await;
    assert_eq!((text(&m3), text(&m4)), ("m3".into(), "m4".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maximum_packet_size_respected() {
    let b = TestBroker::start(2);
    let mut o = options(b.addr, &b.id_on_shard("small", 0));
    o.set_max_packet_size(Some(100));
    let mut s = connect(o).await;
    s.subscribe("mp/t", QoS::AtLeastOnce).await;
    let mut p = connect_on(&b, "pub", 1).await;
    p.publish_acked("mp/t", false, &[b'x'; 200]).await;
    p.publish_acked("mp/t", false, b"small").await;
    let m = s.next_publish().await;
    assert_eq!(text(&m), "small", "the large publish must not be sent");
    s.expect_no_publish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_splits_across_shards() {
    scenarios::shared_subscription_splits_across_shards::<Client>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_member_disconnect_sends_all_to_other() {
    scenarios::shared_subscription_member_disconnect_sends_all_to_other::<Client>().await;
}
