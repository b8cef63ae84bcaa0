//! `GET /metrics` on the HTTP listener: known traffic from raw clients
//! (a subscriber and a publisher on different shards, a retained message,
//! a refused CONNECT), then the exact counts, per shard and summed; what
//! is not `GET /metrics` gets 404 or 405; and `promtool check metrics`
//! accepts the text where Prometheus's `promtool` is installed. The
//! admin API's status, with and without a bearer token, and `shardmq ctl
//! status` as a health check.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::{connect_packet, Raw, TestBroker};
use shardmq::codec::{QoS, Version};

/// Status and body of `method path` on `addr`.
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    common::http(addr, method, path, "", "")
}

/// [`http`] with extra header lines (each ending in CRLF).
fn http_with(addr: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    common::http(addr, method, path, headers, "")
}

/// The sum of `name` over its lines in `text`.
fn sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// The sum of `name` over its lines whose labels contain `label`.
fn sum_where(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn metrics_count_known_traffic_exactly() {
    let b = TestBroker::start(2);
    let http_addr = b
        .broker
        .as_ref()
        .unwrap()
        .http_addr()
        .expect("http listens");

    // An offline persistent session on the subscriber's shard: what it
    // subscribed to waits in its queue.
    let off = b.id_on_shard("m-off", 0);
    let (mut offline, _) = Raw::connect(b.addr, Version::V3_1_1, &off, false);
    offline.subscribe(1, "q/#", QoS::AtLeastOnce);
    offline.send(&shardmq::codec::Packet::Disconnect(Default::default()));
    assert_eq!(offline.expect_close(), None);
    let (mut sub, _) = Raw::connect(b.addr, Version::V5, &b.id_on_shard("m-sub", 0), true);
    sub.subscribe(1, "m/#", QoS::AtMostOnce);
    sub.subscribe(2, "q/#", QoS::AtLeastOnce);
    let (mut publisher, _) = Raw::connect(b.addr, Version::V5, &b.id_on_shard("m-pub", 1), true);
    for i in 0..5u8 {
        publisher.publish("m/x", &[i], QoS::AtMostOnce, false, 0);
    }
    publisher.publish("m/kept", b"r", QoS::AtMostOnce, true, 0);
    publisher.publish("nobody/x", b"n", QoS::AtMostOnce, false, 0);
    publisher.publish("$delayed/600/later/x", b"12345", QoS::AtMostOnce, false, 0);
    // Two QoS 1 messages of 10 bytes that the subscriber never
    // acknowledges, and the offline session queues.
    publisher.publish("q/1", &[1; 10], QoS::AtLeastOnce, false, 1);
    publisher.publish("q/1", &[2; 10], QoS::AtLeastOnce, false, 2);
    for _ in 0..8 {
        sub.recv_publish();
    }
    // A CONNECT refused before any session: an authentication method.
    let mut refused = connect_packet(Version::V5, "m-refused", true);
    refused.properties.authentication_method = Some("SCRAM".into());
    assert_eq!(Raw::connect_with(b.addr, refused).1.reason, 0x8C);

    let (status, text) = http(http_addr, "GET", "/metrics");
    assert_eq!(status, 200, "{text}");
    assert_eq!(sum(&text, "shardmq_shards"), 2);
    assert_eq!(sum(&text, "shardmq_scrape_shards_missing"), 0);
    assert_eq!(sum(&text, "shardmq_connections"), 2, "{text}");
    assert_eq!(sum(&text, "shardmq_sessions"), 3);
    assert_eq!(sum(&text, "shardmq_subscriptions"), 3);
    assert_eq!(sum(&text, "shardmq_retained_messages"), 1);
    assert_eq!(sum(&text, "shardmq_messages_routed_total"), 9, "{text}");
    assert_eq!(sum(&text, "shardmq_deliveries_total"), 10, "{text}");
    assert_eq!(sum(&text, "shardmq_connects_accepted_total"), 3, "{text}");
    assert_eq!(sum(&text, "shardmq_connects_refused_total"), 1, "{text}");
    let refused = "shardmq_connects_refused_total{shard=\"1\",reason=\"bad_auth_method\"} 1\n";
    let refused_0 = refused.replace("shard=\"1\"", "shard=\"0\"");
    assert!(
        text.contains(refused) || text.contains(&refused_0),
        "{text}"
    );
    // Per shard: the publisher's shard routed them, the subscriber's took
    // them in.
    assert!(
        text.contains("shardmq_messages_routed_total{shard=\"1\"} 9\n"),
        "{text}"
    );
    assert!(
        text.contains("shardmq_deliveries_total{shard=\"0\"} 10\n"),
        "{text}"
    );
    // By QoS, in and out, messages and payload bytes.
    let qos = |name: &str, q: u8| sum_where(&text, name, &format!("qos=\"{q}\""));
    assert_eq!(qos("shardmq_messages_received_total", 0), 8, "{text}");
    assert_eq!(qos("shardmq_message_bytes_received_total", 0), 12);
    assert_eq!(qos("shardmq_messages_received_total", 1), 2);
    assert_eq!(qos("shardmq_message_bytes_received_total", 1), 20);
    assert_eq!(qos("shardmq_messages_received_total", 2), 0);
    assert_eq!(qos("shardmq_messages_sent_total", 0), 6, "{text}");
    assert_eq!(qos("shardmq_message_bytes_sent_total", 0), 6);
    assert_eq!(qos("shardmq_messages_sent_total", 1), 2);
    assert_eq!(qos("shardmq_message_bytes_sent_total", 1), 20);
    assert!(
        text.contains("shardmq_messages_sent_total{shard=\"0\",qos=\"1\"} 2\n"),
        "{text}"
    );
    // Drops by reason: the one nobody subscribed to.
    let dropped = |reason: &str| {
        sum_where(
            &text,
            "shardmq_messages_dropped_total",
            &format!("reason=\"{reason}\""),
        )
    };
    assert_eq!(dropped("no_subscribers"), 1, "{text}");
    assert_eq!(sum(&text, "shardmq_messages_dropped_total"), 1, "{text}");
    // Queue and in flight: the offline session's two, the subscriber's
    // two unacknowledged.
    assert_eq!(sum(&text, "shardmq_queued_messages"), 2, "{text}");
    assert_eq!(sum(&text, "shardmq_inflight_messages"), 2, "{text}");
    // A delayed publish held; the retained message's bytes; the mesh.
    assert_eq!(sum(&text, "shardmq_delayed_messages"), 1, "{text}");
    assert!(sum(&text, "shardmq_delayed_bytes") >= "later/x".len() as u64 + 5);
    // The retained message's topic and its one-byte payload, at least.
    assert!(sum(&text, "shardmq_retained_bytes") > "m/kept".len() as u64);
    let mesh = |s: &str| sum_where(&text, "shardmq_mesh_messages_total", s);
    assert!(mesh("shard=\"1\"") >= 8, "{text}");
    assert!(sum(&text, "shardmq_mesh_batches_total") >= 1);
    assert_eq!(sum(&text, "shardmq_mesh_pauses_total"), 0);
    assert_eq!(sum(&text, "shardmq_mesh_lane_stalls_total"), 0);
    // Each of the 8 messages delivered crossed from shard 1 to shard 0.
    assert_eq!(
        sum(&text, "shardmq_delivery_latency_seconds_count"),
        8,
        "{text}"
    );
    // MQTT bytes on the wire: at least the payloads and topics.
    assert!(sum(&text, "shardmq_bytes_received_total") > 27 + 40);
    assert!(sum(&text, "shardmq_bytes_sent_total") > 26 + 24);

    assert_eq!(http(http_addr, "POST", "/metrics").0, 405);
    assert_eq!(http(http_addr, "GET", "/other").0, 404);
    // Not HTTP at all: 400, and the listener goes on.
    let mut junk = std::net::TcpStream::connect(http_addr).unwrap();
    junk.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    junk.write_all(b"\x16\x03\x01junk\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = junk.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    match promtool {
        Some(tool) => {
            let mut child = std::process::Command::new(tool)
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "promtool check metrics: {out:?}");
        }
        None => eprintln!("promtool is not installed: the format check is skipped"),
    }
}

#[test]
fn an_empty_http_bind_serves_nothing_and_a_bad_or_busy_one_stops_the_start() {
    let b = TestBroker::start_with(1, |c| c.http.bind = String::new());
    assert_eq!(b.broker.as_ref().unwrap().http_addr(), None);
    let e = common::start_refused({
        let mut c = shardmq::Config::default();
        c.server.listen = vec!["127.0.0.1:0".parse().unwrap()];
        c.http.bind = "nowhere".into();
        c
    });
    assert!(e.contains("http.bind"), "{e}");
    // A port in use stops the start (before any shard takes a client).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let e = common::start_refused({
        let mut c = shardmq::Config::default();
        c.server.listen = vec!["127.0.0.1:0".parse().unwrap()];
        c.http.bind = taken.local_addr().unwrap().to_string();
        c
    });
    assert!(e.contains("http.bind"), "{e}");
}

/// A client that trickles its request head a byte at a time gets 400 once
/// the head's time is up, instead of holding one of the 16 places for
/// hours; a scrape still works meanwhile.
#[test]
fn a_trickling_client_is_cut_off_when_its_head_time_is_up() {
    let b = TestBroker::start(1);
    let http_addr = b.broker.as_ref().unwrap().http_addr().unwrap();
    let mut slow = std::net::TcpStream::connect(http_addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nX: ").unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still open after 30 s"
        );
        // Look for the answer first, then send one more byte.
        let mut buf = [0u8; 256];
        match slow.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                continue;
            }
            Err(_) => {} // nothing yet
        }
        if !answer.is_empty() {
            continue;
        }
        slow.write_all(b"a").unwrap();
        assert_eq!(http(http_addr, "GET", "/metrics").0, 200);
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

/// `GET /api/v1/status` and `shardmq ctl status`: ready with the broker's
/// counts; with `http.api_token` set, 401 without the token (and ctl exits
/// 1), while `/metrics` stays open; an unreachable broker: ctl exits 1.
#[test]
fn the_status_api_and_ctl_status() {
    let ctl = |addr: SocketAddr, token: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_shardmq"));
        cmd.args(["ctl", "--http", &addr.to_string()]);
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        let out = cmd.arg("status").output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let b = TestBroker::start(2);
    let addr = b.broker.as_ref().unwrap().http_addr().unwrap();
    let (_c, _) = Raw::connect(b.addr, Version::V5, "status-client", true);
    let (status, body) = http(addr, "GET", "/api/v1/status");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "ready");
    assert_eq!(v["shards"], 2);
    assert_eq!(v["shards_answered"], 2);
    assert_eq!(v["connections"], 1);
    assert_eq!(v["sessions"], 1);
    let (code, out) = ctl(addr, None);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("\"ready\""), "{out}");
    drop(b);
    assert_eq!(ctl(addr, None).0, Some(1), "nobody listens any more");

    let b = TestBroker::start_with(1, |c| c.http.api_token = "s3cret".into());
    let addr = b.broker.as_ref().unwrap().http_addr().unwrap();
    assert_eq!(http(addr, "GET", "/api/v1/status").0, 401);
    let wrong = "Authorization: Bearer nope\r\n";
    assert_eq!(http_with(addr, "GET", "/api/v1/status", wrong).0, 401);
    let right = "Authorization: Bearer s3cret\r\n";
    assert_eq!(http_with(addr, "GET", "/api/v1/status", right).0, 200);
    assert_eq!(
        http(addr, "GET", "/metrics").0,
        200,
        "metrics need no token"
    );
    assert_eq!(ctl(addr, None).0, Some(1));
    assert_eq!(ctl(addr, Some("s3cret")).0, Some(0));
}

/// With a log, its metrics appear: bytes written grow with retained
/// QoS 1 publishes (which the log keeps), and the log is not full; without one (memory mode) they
/// are left out rather than shown as zeros.
#[test]
fn the_log_metrics_follow_the_log() {
    let dir = common::child::temp_dir("metrics-log");
    let b = TestBroker::start_with(1, |c| {
        c.storage.durability = "kill_safe".into();
        c.storage.data_dir = dir.to_path_buf();
    });
    let addr = b.broker.as_ref().unwrap().http_addr().unwrap();
    let before = sum(&http(addr, "GET", "/metrics").1, "shardmq_log_used_bytes");
    let (mut c, _) = Raw::connect(b.addr, Version::V5, "log-metrics", true);
    for id in 1..=20u16 {
        c.publish(&format!("l/{id}"), &[7u8; 1000], QoS::AtLeastOnce, true, id);
        assert!(matches!(c.recv(), Some(shardmq::codec::Packet::PubAck(_))));
    }
    let text = http(addr, "GET", "/metrics").1;
    assert!(
        sum(&text, "shardmq_log_used_bytes") >= before + 20_000,
        "{text}"
    );
    assert_eq!(sum(&text, "shardmq_log_full"), 0);
    assert_eq!(sum(&text, "shardmq_log_compactions_total"), 0, "{text}");
    // kill_safe syncs nothing: the histograms are there, empty.
    assert!(
        text.contains("shardmq_log_sync_seconds_count 0\n"),
        "{text}"
    );
    drop(c);
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
    // power_safe: every PUBACK of a logged message (retained, here) waited
    // for a group commit, each counted.
    let b = TestBroker::start_with(1, |c| {
        c.storage.durability = "power_safe".into();
        c.storage.data_dir = dir.to_path_buf();
    });
    let addr = b.broker.as_ref().unwrap().http_addr().unwrap();
    let (mut c, _) = Raw::connect(b.addr, Version::V5, "log-commits", true);
    for id in 1..=3u16 {
        c.publish("p/1", b"x", QoS::AtLeastOnce, true, id);
        assert!(matches!(c.recv(), Some(shardmq::codec::Packet::PubAck(_))));
    }
    let text = http(addr, "GET", "/metrics").1;
    let commits = sum(&text, "shardmq_log_commit_seconds_count");
    assert!((1..=4).contains(&commits), "{text}");
    assert_eq!(sum(&text, "shardmq_log_sync_seconds_count"), commits);
    drop(c);
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
    let memory = TestBroker::start(1);
    let addr = memory.broker.as_ref().unwrap().http_addr().unwrap();
    assert!(!http(addr, "GET", "/metrics")
        .1
        .contains("shardmq_log_used_bytes"));
}

/// After its answer a client that keeps sending a byte now and then is
/// cut off within the drain's second (before, each byte bought another
/// second, for up to 64 KiB of them: 16 such clients held every place).
/// Bodies are refused where no endpoint takes one, and an admin API
/// request that is not allowed is refused before its body is read.
#[test]
fn a_client_cannot_hold_the_listener_after_its_answer_or_send_unasked_bodies() {
    let b = TestBroker::start_with(1, |c| c.http.api_token = "s3cret".into());
    let addr = b.broker.as_ref().unwrap().http_addr().unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let started = std::time::Instant::now();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
        if s.write_all(b"x").is_err() {
            closed = true;
            break;
        }
    }
    assert!(closed, "still open after 20 s of trickling");

    // A body on /metrics: 413 (before, any request could carry a
    // publish-sized one).
    let big = "Content-Length: 100000\r\n";
    assert_eq!(common::http(addr, "GET", "/metrics", big, "").0, 413);
    // Without the token, a publish with a huge body is refused at once.
    let huge = format!("Content-Length: {}\r\n", 1 << 20);
    let (status, _) = common::http(addr, "POST", "/api/v1/publish", &huge, "");
    assert_eq!(status, 401);
}
