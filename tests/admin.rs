//! The admin API over a socket, and `shardmq ctl` on top of it: clients
//! paged over two shards, one client's detail, a kick that a 5.0 client
//! sees as DISCONNECT 0x98, subscriptions, a publish that subscribers
//! receive, retained messages read and deleted; bad requests get 4xx; a
//! client from a non-loopback address without a token gets 403.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use common::{Raw, TestBroker};
use serde_json::Value;
use shardmq::codec::{Packet, QoS, Version};

/// Status and JSON body of `method path` with `body`.
fn api(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, text) = common::http(addr, method, path, "", body);
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    (status, v)
}

fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    api(addr, "GET", path, "")
}

/// Every client id of the pages of `path` (a query string included), `limit` per page.
fn all_pages(addr: SocketAddr, path: &str, field: &str) -> Vec<String> {
    let mut cursor: Option<String> = None;
    let mut ids = Vec::new();
    for _ in 0..100 {
        let with_cursor = match &cursor {
            Some(c) => format!("{path}&cursor={c}"),
            None => path.to_string(),
        };
        let (status, v) = get(addr, &with_cursor);
        assert_eq!(status, 200, "{v}");
        let data = v["data"].as_array().unwrap();
        assert!(data.len() <= 2, "limit 2: {v}");
        ids.extend(data.iter().map(|c| c[field].as_str().unwrap().to_string()));
        match v["next"].as_str() {
            Some(n) => cursor = Some(n.to_string()),
            None => return ids,
        }
    }
    panic!("more than 100 pages");
}

/// The filters of client `id`'s subscriptions, as the API lists them.
fn filters_of(http: SocketAddr, id: &str) -> Vec<String> {
    let (_, v) = get(http, &format!("/api/v1/clients/{id}"));
    v["subscription_list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["filter"].as_str().unwrap().to_string())
        .collect()
}

fn ctl(http: SocketAddr, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .args(["ctl", "--http", &http.to_string()])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn the_admin_api_lists_inspects_kicks_and_publishes() {
    let b = TestBroker::start(2);
    let http = b.broker.as_ref().unwrap().http_addr().unwrap();

    // Five clients over both shards, one with a user name, and an offline
    // persistent session subscribed to t/#.
    let mut clients = Vec::new();
    for i in 0..5 {
        let id = b.id_on_shard(&format!("adm-{i}"), i % 2);
        let mut connect = common::connect_packet(Version::V5, &id, true);
        if i == 3 {
            connect.username = Some("alice".into());
        }
        let (c, ack) = Raw::connect_with(b.addr, connect);
        assert_eq!(ack.reason, 0);
        clients.push((id, c));
    }
    clients[0].1.subscribe(1, "t/#", QoS::AtMostOnce);
    let (mut off, _) = Raw::connect(b.addr, Version::V3_1_1, "keep-off", false);
    off.subscribe(1, "t/#", QoS::AtLeastOnce);
    off.send(&Packet::Disconnect(Default::default()));
    assert_eq!(off.expect_close(), None);

    // Pages of two over both shards: every adm- client once.
    let listed = all_pages(http, "/api/v1/clients?prefix=adm-&limit=2", "client_id");
    let wanted: BTreeSet<String> = clients.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(listed.len(), 5, "{listed:?}");
    assert_eq!(listed.into_iter().collect::<BTreeSet<_>>(), wanted);
    let (_, v) = get(http, "/api/v1/clients?user=alice");
    assert_eq!(v["data"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["data"][0]["client_id"], clients[3].0.as_str());
    assert_eq!(v["data"][0]["protocol"], "5.0");
    assert_eq!(v["data"][0]["username"], "alice");

    // One client's detail.
    let (status, v) = get(http, "/api/v1/clients/keep-off");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["connected"], false);
    assert_eq!(v["protocol"], Value::Null);
    assert_eq!(v["subscriptions"], 1);
    assert_eq!(v["subscription_list"][0]["filter"], "t/#");
    assert_eq!(v["subscription_list"][0]["qos"], 1);
    assert_eq!(v["queued"], 0);
    assert_eq!(get(http, "/api/v1/clients/nobody").0, 404);

    // Publish as the broker: the subscriber gets it, the offline session
    // queues it.
    let (status, v) = api(
        http,
        "POST",
        "/api/v1/publish",
        r#"{"topic":"t/1","payload":"hello","qos":1}"#,
    );
    assert_eq!(status, 200, "{v}");
    let p = clients[0].1.recv_publish();
    assert_eq!((&*p.topic, &p.payload[..]), ("t/1", &b"hello"[..]));
    let (_, v) = get(http, "/api/v1/clients/keep-off");
    assert_eq!(v["queued"], 1, "{v}");
    let (_, v) = get(http, "/api/v1/subscriptions?prefix=keep-&limit=10");
    assert_eq!(v["data"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["data"][0]["client_id"], "keep-off");
    let subs = all_pages(http, "/api/v1/subscriptions?limit=2", "filter");
    assert_eq!(subs, vec!["t/#", "t/#"]);

    // Retained: read (binary, so base64 only), delete, gone.
    let (status, _) = api(
        http,
        "POST",
        "/api/v1/publish",
        r#"{"topic":"r/a b","payload":"AP8=","payload_encoding":"base64","retain":true}"#,
    );
    assert_eq!(status, 200);
    let (status, v) = get(http, "/api/v1/retained/r/a%20b");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["payload_base64"], "AP8=");
    assert_eq!(v["payload"], Value::Null, "not UTF-8");
    assert_eq!(v["bytes"], 2);
    assert_eq!(api(http, "DELETE", "/api/v1/retained/r/a%20b", "").0, 200);
    assert_eq!(get(http, "/api/v1/retained/r/a%20b").0, 404);
    assert_eq!(api(http, "DELETE", "/api/v1/retained/r/a%20b", "").0, 404);
    let (mut late, _) = Raw::connect(b.addr, Version::V5, "adm-late", true);
    late.subscribe(1, "r/#", QoS::AtMostOnce);
    late.expect_silence(std::time::Duration::from_millis(300));

    // Kick: the 5.0 client hears 0x98; its session (expiry 0) is gone.
    let (kicked, c) = &mut clients[1];
    let (status, v) = api(http, "DELETE", &format!("/api/v1/clients/{kicked}"), "");
    assert_eq!(status, 200, "{v}");
    assert_eq!(c.expect_close(), Some(0x98));
    assert_eq!(get(http, &format!("/api/v1/clients/{kicked}")).0, 404);
    // An offline session: nothing to close unless it is discarded.
    assert_eq!(api(http, "DELETE", "/api/v1/clients/keep-off", "").0, 404);
    let (status, v) = api(http, "DELETE", "/api/v1/clients/keep-off?discard=true", "");
    assert_eq!(status, 200, "{v}");
    assert_eq!(get(http, "/api/v1/clients/keep-off").0, 404);

    // Bad requests.
    for (method, path, body, want) in [
        ("POST", "/api/v1/publish", r#"{"topic":"a/+"}"#, 400),
        ("POST", "/api/v1/publish", r#"{"topic":"$SYS/x"}"#, 400),
        ("POST", "/api/v1/publish", r#"{"topic":"a","qos":3}"#, 400),
        ("POST", "/api/v1/publish", r#"{"topic":"a","color":1}"#, 400),
        ("POST", "/api/v1/publish", "not json", 400),
        (
            "POST",
            "/api/v1/publish",
            r#"{"topic":"a","payload":"!","payload_encoding":"base64"}"#,
            400,
        ),
        ("GET", "/api/v1/clients?limit=0", "", 400),
        ("GET", "/api/v1/clients?cursor=junk", "", 400),
        ("GET", "/api/v1/clients?cursor=9.0", "", 400),
        ("GET", "/api/v1/retained/a/%23", "", 400),
        ("PUT", "/api/v1/clients/x", "", 405),
        ("GET", "/api/v1/publish", "", 405),
        ("GET", "/api/v1/nothing", "", 404),
    ] {
        let (status, v) = api(http, method, path, body);
        assert_eq!(status, want, "{method} {path} {body}: {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    // A body larger than any payload could need: 413 before it is read.
    let huge = format!("Content-Length: {}\r\n", 64 << 20);
    let (status, _) = common::http(http, "POST", "/api/v1/publish", &huge, "");
    assert_eq!(status, 413);
}

#[test]
fn ctl_speaks_the_admin_api() {
    let b = TestBroker::start(2);
    let http = b.broker.as_ref().unwrap().http_addr().unwrap();
    let id = b.id_on_shard("ctl-sub", 1);
    let (mut sub, _) = Raw::connect(b.addr, Version::V5, &id, true);
    sub.subscribe(1, "c/#", QoS::AtLeastOnce);

    let (code, out, err) = ctl(http, &["clients", "--prefix", "ctl-", "--all"]);
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[0]["client_id"], id.as_str());

    let (code, out, err) = ctl(http, &["client", &id]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"c/#\""), "{out}");

    let (code, _, err) = ctl(
        http,
        &["publish", "c/1", "from ctl", "--qos", "1", "--retain"],
    );
    assert_eq!(code, Some(0), "{err}");
    let p = sub.recv_publish();
    assert_eq!(&p.payload[..], b"from ctl");
    let (code, out, _) = ctl(http, &["retained", "c/1"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("\"from ctl\""), "{out}");
    assert_eq!(ctl(http, &["retained", "c/1", "--delete"]).0, Some(0));
    assert_eq!(ctl(http, &["retained", "c/1"]).0, Some(1), "gone");

    let (code, out, _) = ctl(http, &["subscriptions", "--all"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("\"c/#\""), "{out}");

    assert_eq!(ctl(http, &["kick", &id]).0, Some(0));
    assert_eq!(sub.expect_close(), Some(0x98));
    let (code, _, err) = ctl(http, &["kick", &id]);
    assert_eq!(code, Some(1), "no longer connected: {err}");
    assert!(err.contains("404"), "{err}");
}

/// Without `http.api_token`, the API answers loopback clients only: from
/// this machine's other address, 403 (skipped where it has none).
#[test]
fn without_a_token_the_api_refuses_other_addresses() {
    let b = TestBroker::start_with(1, |c| c.http.bind = "0.0.0.0:0".into());
    let port = b.broker.as_ref().unwrap().http_addr().unwrap().port();
    // The address this machine would send from (no packet is sent).
    let own = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("198.51.100.1:9").map(|_| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip());
    let ip = match own {
        Ok(ip) if !ip.is_loopback() && !ip.is_unspecified() => ip,
        _ => {
            eprintln!("no address besides loopback: the 403 check is skipped");
            return;
        }
    };
    let (status, _) = common::http(SocketAddr::new(ip, port), "GET", "/api/v1/status", "", "");
    assert_eq!(status, 403);
    let (status, _) = common::http(SocketAddr::new(ip, port), "GET", "/metrics", "", "");
    assert_eq!(status, 200, "metrics need no token");
    let loopback = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(
        common::http(loopback, "GET", "/api/v1/status", "", "").0,
        200
    );
}

/// `[[auto_subscribe]]`: subscriptions at CONNECT by client id pattern or
/// user name, `%c` / `%u` filled in, retained messages after the CONNACK;
/// an id that would widen the filter gets nothing; a bad rule stops the
/// start.
#[test]
fn auto_subscribe_rules_subscribe_clients_at_connect() {
    use shardmq::config::AutoSubscribe;
    let rule = |client_id: &str, username: &str, filter: &str, qos: u8| AutoSubscribe {
        client_id: client_id.into(),
        username: username.into(),
        filter: filter.into(),
        qos,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
    };
    let b = TestBroker::start_with(2, |c| {
        c.auto_subscribe = vec![
            rule("dev-*", "", "devices/%c/cmd", 1),
            rule("", "ops", "$share/ops/alerts/#", 0),
            rule("", "", "users/%u", 0),
        ]
    });
    let http = b.broker.as_ref().unwrap().http_addr().unwrap();
    let (mut publisher, _) = Raw::connect(b.addr, Version::V5, "auto-pub", true);
    publisher.publish("devices/dev-2/cmd", b"kept", QoS::AtLeastOnce, true, 1);
    assert!(matches!(publisher.recv(), Some(Packet::PubAck(_))));

    let (mut dev, ack) = Raw::connect(b.addr, Version::V5, "dev-2", true);
    assert_eq!(ack.reason, 0);
    let p = dev.recv_publish();
    assert_eq!(
        (&*p.topic, &p.payload[..], p.retain),
        ("devices/dev-2/cmd", &b"kept"[..], true)
    );
    publisher.publish("devices/dev-2/cmd", b"go", QoS::AtLeastOnce, false, 2);
    let p = dev.recv_publish();
    assert_eq!((&p.payload[..], p.qos), (&b"go"[..], QoS::AtLeastOnce));
    let filters = filters_of(http, "dev-2");
    assert_eq!(
        filters,
        vec!["devices/dev-2/cmd"],
        "no user name: no %u rule"
    );

    let mut ops = common::connect_packet(Version::V5, "console", true);
    ops.username = Some("ops".into());
    let (_ops, _) = Raw::connect_with(b.addr, ops);
    let filters = filters_of(http, "console");
    assert_eq!(filters, vec!["$share/ops/alerts/#", "users/ops"]);

    // A client id with a wildcard would subscribe to every device.
    let (_sly, ack) = Raw::connect(b.addr, Version::V5, "dev-+", true);
    assert_eq!(ack.reason, 0);
    let (_, v) = get(http, "/api/v1/clients/dev-%2B");
    assert_eq!(v["subscriptions"], 0, "{v}");

    let mut bad = shardmq::Config::default();
    bad.server.listen = vec!["127.0.0.1:0".parse().unwrap()];
    bad.http.bind = String::new();
    bad.auto_subscribe = vec![rule("", "", "a/#/b", 0)];
    let e = common::start_refused(bad);
    assert!(e.contains("auto_subscribe[0].filter"), "{e}");
}
