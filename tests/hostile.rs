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
    let dir = temp_dir("silent-sockets");
    let config = child::config_file(&dir, "[server]\nconnect_timeout_ms = 1000\n");
    let b = ChildBroker::start(&[
        "--shards",
        "2",
        "--durability",
        "memory",
        "--config",
        config.to_str().unwrap(),
    ]);
    let silent: Vec<std::net::TcpStream> = (0..2000)
        .map(|_| std::net::TcpStream::connect(b.addr).expect("connect"))
        .collect();
    every_shard_serves(b.addr, 2, "silent");
    let rss = b.rss_bytes();
    assert!(
        rss < 256 << 20,
        "RSS {} MiB with 2,000 silent sockets",
        rss >> 20
    );
    for mut s in silent {
        // Closed by the broker: EOF (or a reset) well within the wait.
        assert_eq!(read_until_close(&mut s), Vec::<u8>::new());
    }
    every_shard_serves(b.addr, 2, "after-silent");
    let _ = std::fs::remove_dir_all(&dir);
}
