//! `$SYS` topics seen through an independent client (rumqttc) and
//! Mosquitto's own `mosquitto_sub` where it is installed: known traffic,
//! then the exact figures under Mosquitto's names; retained for a late
//! subscriber; not matched by `#`; not writable by clients; not brought
//! back from the log after a restart.

#[path = "common/client.rs"]
mod client;
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use client::v3::*;
use common::child::temp_dir;
use common::{Raw, TestBroker};
use shardmq::codec::{self, Packet, Version};

/// Read `$SYS` publishes into `seen` (topic → latest payload) until `done`
/// holds; panics after 15 s with what was seen.
async fn watch(
    c: &mut Client,
    seen: &mut HashMap<String, String>,
    done: impl Fn(&HashMap<String, String>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done(seen) {
        assert!(Instant::now() < deadline, "$SYS so far: {seen:#?}");
        if let Some(p) = c.try_next_publish(Duration::from_millis(200)).await {
            let topic = p.topic.clone();
            seen.insert(topic, String::from_utf8_lossy(&p.payload).to_string());
        }
    }
}

fn is(seen: &HashMap<String, String>, name: &str, value: &str) -> bool {
    seen.get(&format!("$SYS/broker/{name}"))
        .is_some_and(|v| v == value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_topics_count_known_traffic() {
    let b = TestBroker::start_with(2, |c| c.mqtt.sys_interval_s = 1);
    let mut sys = connect(options(b.addr, &b.id_on_shard("sys-watch", 0))).await;
    sys.subscribe("$SYS/broker/#", QoS::AtMostOnce).await;
    let mut all = connect(options(b.addr, &b.id_on_shard("sys-hash", 1))).await;
    all.subscribe("#", QoS::AtMostOnce).await;
    let mut publisher = connect(options(b.addr, &b.id_on_shard("sys-pub", 1))).await;
    for i in 0..3u8 {
        publisher.publish_acked("nobody/here", false, &[i; 4]).await;
    }
    assert_eq!(all.next_publish().await.payload.len(), 4);
    for _ in 0..2 {
        all.next_publish().await;
    }
    // No client writes $SYS: 0x87, and nobody sees it.
    let (mut raw, _) = Raw::connect(b.addr, Version::V5, "sys-forger", true);
    raw.publish(
        "$SYS/broker/uptime",
        b"forged",
        codec::QoS::AtLeastOnce,
        true,
        7,
    );
    match raw.recv() {
        Some(Packet::PubAck(a)) => assert_eq!((a.packet_id, a.reason), (7, 0x87)),
        other => panic!("expected PUBACK 0x87, got {other:?}"),
    }

    let mut seen = HashMap::new();
    watch(&mut sys, &mut seen, |s| {
        is(s, "clients/connected", "4")
            && is(s, "publish/messages/received", "3")
            && is(s, "messages/received", "3")
            // The $SYS messages to `sys` count as sent too.
            && s.get("$SYS/broker/messages/sent")
                .is_some_and(|v| v.parse::<u64>().unwrap() >= 3)
            && is(s, "publish/messages/dropped", "1")
            && is(s, "clients/total", "4")
            && is(s, "clients/disconnected", "0")
            && is(s, "subscriptions/count", "2")
            && s.contains_key("$SYS/broker/load/publish/received/15min")
    })
    .await;
    let version = &seen["$SYS/broker/version"];
    assert_eq!(
        version,
        &format!("shardmq version {}", env!("CARGO_PKG_VERSION"))
    );
    assert!(seen["$SYS/broker/uptime"].ends_with(" seconds"));
    assert!(seen.values().all(|v| v != "forged"));
    for window in ["1min", "5min", "15min"] {
        let load = &seen[&format!("$SYS/broker/load/publish/received/{window}")];
        assert!(load.parse::<f64>().is_ok(), "{window}: {load}");
    }
    // Retained: a late subscriber gets the last value at once, flagged.
    let mut late = connect(options(b.addr, "sys-late")).await;
    late.subscribe("$SYS/broker/version", QoS::AtMostOnce).await;
    let p = late.next_publish().await;
    assert!(p.retain);
    assert_eq!(&String::from_utf8_lossy(&p.payload), version);
    // `#` does not match $SYS ([MQTT-4.7.2-1]), updates included.
    assert!(
        all.try_next_publish(Duration::from_millis(1500))
            .await
            .is_none(),
        "# got a $SYS message"
    );

    // Mosquitto's client reads it the same way, where it is installed.
    match std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &b.addr.port().to_string()])
        .args(["-t", "$SYS/broker/version", "-v", "-C", "1", "-W", "10"])
        .output()
    {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            assert_eq!(text.trim(), format!("$SYS/broker/version {version}"));
        }
        Err(_) => eprintln!("mosquitto_sub is not installed: that check is skipped"),
    }
}

/// `$SYS` figures are this run's: a restart on the same log brings none
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_topics_are_not_kept_in_the_log() {
    let dir = temp_dir("sys-log");
    let durable = |c: &mut shardmq::Config, interval: u64| {
        c.storage.durability = "kill_safe".into();
        c.storage.data_dir = dir.to_path_buf();
        c.mqtt.sys_interval_s = interval;
    };
    let mut b = TestBroker::start_with(1, |c| durable(c, 1));
    let mut sys = connect(options(b.addr, "sys-first-run")).await;
    sys.subscribe("$SYS/broker/uptime", QoS::AtMostOnce).await;
    sys.next_publish().await;
    // A client's retained message is kept, as a control.
    let mut publisher = connect(options(b.addr, "sys-keeper")).await;
    publisher.publish_acked("kept/x", true, b"k").await;
    drop((sys, publisher));
    b.stop();

    let b = TestBroker::start_with(1, |c| durable(c, 0));
    let mut c = connect(options(b.addr, "sys-second-run")).await;
    c.subscribe("kept/x", QoS::AtMostOnce).await;
    assert_eq!(&c.next_publish().await.payload[..], b"k");
    c.subscribe("$SYS/#", QoS::AtMostOnce).await;
    c.expect_no_publish().await;
}
