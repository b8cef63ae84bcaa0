//! Passwords and ACLs as Mosquitto users have them: password files written
//! by `mosquitto_passwd` and by `shardmq passwd` (each read by the other
//! broker), every CONNACK refusal code, and an ACL file deciding what each
//! client may subscribe to, publish and receive (5.0 and 3.1.1, raw
//! packets for the exact codes; rumqttc as the real client).
//!
//! The Mosquitto parts need Debian's `mosquitto` package (`.ci/run`
//! installs it); without it they say so and check the rest.

#[path = "common/client.rs"]
mod client;
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::child::temp_dir;
use common::{connect_packet, Raw, TestBroker};
use shardmq::codec::{Packet, PubResp, QoS, Version};

/// Run `shardmq passwd ARGS`; panics with its output if it fails.
fn shardmq_passwd(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .arg("passwd")
        .args(args)
        .output()
        .expect("run shardmq passwd");
    assert!(out.status.success(), "shardmq passwd {args:?}: {out:?}");
}

/// `mosquitto_passwd` or `mosquitto`, when installed.
fn mosquitto_tool(name: &str) -> Option<PathBuf> {
    ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// CONNECT as `user` (None: anonymous) with `password`; the CONNACK code.
fn login(addr: std::net::SocketAddr, version: Version, user: Option<&str>, password: &str) -> u8 {
    let mut c = connect_packet(version, "login", true);
    c.username = user.map(str::to_string);
    c.password = user.map(|_| bytes::Bytes::copy_from_slice(password.as_bytes()));
    Raw::connect_with(addr, c).1.reason
}

/// As `login` for 3.1.1, the return code as it is on the wire (the codec
/// reads it back as the 5.0 code it stands for).
fn login_v3_wire(addr: std::net::SocketAddr, user: Option<&str>, password: &str) -> u8 {
    use std::io::{Read, Write};
    let mut c = connect_packet(Version::V3_1_1, "login", true);
    c.username = user.map(str::to_string);
    c.password = user.map(|_| bytes::Bytes::copy_from_slice(password.as_bytes()));
    let mut out = bytes::BytesMut::new();
    shardmq::codec::encode(&Packet::Connect(Box::new(c)), Version::V3_1_1, &mut out);
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&out).unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(&ack[..2], &[0x20, 2], "CONNACK");
    ack[3]
}

/// A raw client logged in as `user`.
fn raw_as(addr: std::net::SocketAddr, version: Version, id: &str, user: Option<&str>) -> Raw {
    let mut c = connect_packet(version, id, true);
    c.username = user.map(str::to_string);
    let (raw, ack) = Raw::connect_with(addr, c);
    assert_eq!(ack.reason, 0, "{id} logs in");
    raw
}

#[test]
fn passwords_from_mosquitto_passwd_and_shardmq_passwd_let_their_users_in_and_no_one_else() {
    let dir = temp_dir("auth-passwd");
    let file = dir.join("passwd");
    let f = file.to_str().unwrap();
    shardmq_passwd(&["-c", "-b", f, "alice", "secret"]);
    shardmq_passwd(&["-b", f, "bob", "two words"]);
    shardmq_passwd(&["-b", f, "gone", "x"]);
    shardmq_passwd(&["-D", f, "gone"]);
    // Mosquitto's tool adds a user to the file shardmq wrote (so it read
    // it), and shardmq reads the line it wrote.
    let mosquitto = mosquitto_tool("mosquitto_passwd");
    match &mosquitto {
        Some(tool) => {
            let st = Command::new(tool)
                .args(["-b", f, "carol", "c4rol"])
                .status()
                .unwrap();
            assert!(st.success());
        }
        None => eprintln!("mosquitto_passwd not installed: its half of this test skipped"),
    }
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("gone:"), "{text}");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "the file is its owner's only");

    let b = TestBroker::start_with(2, |c| c.auth.password_file = file.clone());
    use Version::V5;
    assert_eq!(login(b.addr, V5, Some("alice"), "secret"), 0);
    assert_eq!(login(b.addr, V5, Some("bob"), "two words"), 0);
    if mosquitto.is_some() {
        assert_eq!(login(b.addr, V5, Some("carol"), "c4rol"), 0);
    }
    assert_eq!(login(b.addr, V5, Some("alice"), "Secret"), 0x86);
    assert_eq!(login(b.addr, V5, Some("gone"), "x"), 0x86);
    assert_eq!(login(b.addr, V5, Some("nobody"), "secret"), 0x86);
    assert_eq!(
        login(b.addr, V5, None, ""),
        0x87,
        "a password file: no anonymous"
    );
    assert_eq!(login_v3_wire(b.addr, Some("alice"), "secret"), 0);
    assert_eq!(login_v3_wire(b.addr, Some("alice"), "nope"), 4);
    assert_eq!(login_v3_wire(b.addr, None, ""), 5);
    // A real client with the right password.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut o = client::v5::options(b.addr, "real");
            o.set_credentials("bob", "two words");
            let mut c = client::v5::connect(o).await;
            c.subscribe("x/#", client::v5::QoS::AtLeastOnce).await;
            c.publish("x/1", client::v5::QoS::AtLeastOnce, false, b"hi")
                .await;
            assert_eq!(&c.next_publish().await.payload[..], b"hi");
        });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn mosquitto_lets_in_the_users_shardmq_passwd_wrote() {
    let Some(mosquitto) = mosquitto_tool("mosquitto") else {
        eprintln!("mosquitto not installed: test skipped");
        return;
    };
    let dir = temp_dir("auth-mosquitto");
    let file = dir.join("passwd");
    shardmq_passwd(&["-c", "-b", file.to_str().unwrap(), "alice", "secret"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            // `user root`: as root, Mosquitto would otherwise drop to
            // its own user, who cannot read a file made 0600 by root.
            "user root\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n",
            file.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(mosquitto)
        .args(["-c", conf.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "mosquitto did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let right = login_v3_wire(addr, Some("alice"), "secret");
    let wrong = login_v3_wire(addr, Some("alice"), "secreT");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(right, 0, "mosquitto accepts shardmq's $7$ line");
    assert_ne!(wrong, 0);
}

#[test]
fn anonymous_clients_are_refused_when_the_config_says_so() {
    let b = TestBroker::start_with(1, |c| c.auth.allow_anonymous = Some(false));
    assert_eq!(login(b.addr, Version::V5, None, ""), 0x87);
    assert_eq!(login_v3_wire(b.addr, None, ""), 5);
    // Without a password file a user name is taken as given.
    assert_eq!(login(b.addr, Version::V5, Some("anyone"), "x"), 0);
}

const ACL: &str = "\
# anonymous clients
topic read public/#

user alice
topic readwrite alice/#
topic read public/#
topic deny alice/private/#

user admin
topic read #

user writer
topic write #

pattern readwrite devices/%c/#
";

/// Every PUBLISH `raw` gets within a short quiet time, as (topic,
/// payload).
fn drain(raw: &mut Raw) -> Vec<(String, String)> {
    let mut got = Vec::new();
    while let Ok(Some(p)) = raw.recv_within(Duration::from_millis(700)) {
        match p {
            Packet::Publish(p) => {
                if p.qos != QoS::AtMostOnce {
                    raw.send(&Packet::PubAck(PubResp {
                        packet_id: p.packet_id,
                        reason: 0,
                        properties: Default::default(),
                    }));
                }
                got.push((
                    p.topic.to_string(),
                    String::from_utf8_lossy(&p.payload).into(),
                ));
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    got.sort();
    got
}

/// The acknowledgement code of a QoS 1 publish.
fn puback(raw: &mut Raw, topic: &str, id: u16) -> u8 {
    raw.publish(topic, topic.as_bytes(), QoS::AtLeastOnce, false, id);
    match raw.recv() {
        Some(Packet::PubAck(a)) => {
            assert_eq!(a.packet_id, id);
            a.reason
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

#[test]
fn the_acl_file_decides_what_each_client_subscribes_to_publishes_and_receives() {
    let dir = temp_dir("auth-acl");
    let acl = dir.join("acl");
    std::fs::write(&acl, ACL).unwrap();
    let b = TestBroker::start_with(2, |c| {
        c.auth.acl_file = acl.clone();
        c.auth.allow_anonymous = Some(true);
    });
    use Version::{V3_1_1, V5};
    let mut admin = raw_as(b.addr, V5, "admin", Some("admin"));
    assert_eq!(admin.subscribe(1, "#", QoS::AtLeastOnce), vec![1]);
    let mut reader = raw_as(b.addr, V5, "alice-reader", Some("alice"));
    assert_eq!(reader.subscribe(1, "alice/#", QoS::AtLeastOnce), vec![1]);
    assert_eq!(
        reader.subscribe(2, "secret/#", QoS::AtLeastOnce),
        vec![0x87]
    );
    assert_eq!(
        reader.subscribe(3, "alice/private/#", QoS::AtLeastOnce),
        vec![0x87]
    );
    assert_eq!(
        reader.subscribe(4, "$share/g/public/+", QoS::AtLeastOnce),
        vec![1]
    );
    let mut reader3 = raw_as(b.addr, V3_1_1, "alice-3", Some("alice"));
    assert_eq!(
        reader3.subscribe(1, "secret/#", QoS::AtLeastOnce),
        vec![0x80]
    );

    // Writing: 5.0 QoS 1 is told 0x87; QoS 0 and 3.1.1 are acknowledged
    // and dropped.
    let mut alice = raw_as(b.addr, V5, "alice", Some("alice"));
    assert_eq!(puback(&mut alice, "alice/a", 1), 0);
    assert_eq!(puback(&mut alice, "public/x", 2), 0x87);
    assert_eq!(puback(&mut alice, "alice/private/k", 3), 0x87);
    alice.publish("public/y", b"public/y", QoS::AtMostOnce, false, 0);
    let mut alice3 = raw_as(b.addr, V3_1_1, "alice-3w", Some("alice"));
    assert_eq!(puback(&mut alice3, "public/z", 1), 0);
    // Patterns: a device writes under its own client id only.
    let mut dev = raw_as(b.addr, V5, "dev1", None);
    assert_eq!(puback(&mut dev, "devices/dev1/up", 1), 0);
    assert_eq!(puback(&mut dev, "devices/dev2/up", 2), 0x87);
    // Reading: the writer may write anywhere; a subscriber gets only what
    // it may read.
    let mut writer = raw_as(b.addr, V5, "writer", Some("writer"));
    assert_eq!(puback(&mut writer, "alice/private/x", 1), 0);
    assert_eq!(puback(&mut writer, "alice/b", 2), 0);
    assert_eq!(puback(&mut writer, "public/w", 3), 0);

    // A will is published as its client: written only where it may write.
    for (id, will_topic) in [
        ("dev2", "devices/dev2/gone"),
        ("dev3", "devices/other/gone"),
    ] {
        let mut c = connect_packet(V5, id, true);
        c.will = Some(shardmq::codec::Will {
            topic: will_topic.into(),
            payload: bytes::Bytes::from(will_topic.as_bytes().to_vec()),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Default::default(),
        });
        let (raw, ack) = Raw::connect_with(b.addr, c);
        assert_eq!(ack.reason, 0);
        drop(raw); // no DISCONNECT: the will goes (or not)
    }

    let s = |v: &[&str]| -> Vec<(String, String)> {
        let mut v: Vec<_> = v.iter().map(|t| (t.to_string(), t.to_string())).collect();
        v.sort();
        v
    };
    assert_eq!(
        drain(&mut admin),
        s(&[
            "alice/a",
            "alice/b",
            "alice/private/x",
            "devices/dev1/up",
            "devices/dev2/gone",
            "public/w"
        ])
    );
    assert_eq!(drain(&mut reader), s(&["alice/a", "alice/b", "public/w"]));

    // Retained messages are read-checked too.
    writer.publish(
        "alice/private/r",
        b"alice/private/r",
        QoS::AtMostOnce,
        true,
        0,
    );
    writer.publish("alice/r", b"alice/r", QoS::AtMostOnce, true, 0);
    // Both stored before the new subscription looks (admin sees them).
    assert_eq!(drain(&mut admin), s(&["alice/private/r", "alice/r"]));
    let mut late = raw_as(b.addr, V5, "alice-late", Some("alice"));
    assert_eq!(late.subscribe(1, "alice/#", QoS::AtMostOnce), vec![0]);
    assert_eq!(drain(&mut late), s(&["alice/r"]));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_acl_or_password_file_stops_the_start_naming_the_line() {
    let dir = temp_dir("auth-bad");
    let acl = dir.join("acl");
    std::fs::write(&acl, "user a\ntopic read a/#/b\n").unwrap();
    let mut config = shardmq::Config::default();
    config.server.listen = vec!["127.0.0.1:0".parse().unwrap()];
    config.storage.durability = "memory".into();
    config.auth.acl_file = acl.clone();
    let e = common::start_refused(config.clone());
    assert!(e.contains("auth.acl_file") && e.contains("line 2"), "{e}");
    config.auth.acl_file = PathBuf::new();
    config.auth.password_file = dir.join("missing");
    let e = common::start_refused(config);
    assert!(e.contains("auth.password_file"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The reader's next PUBLISH's topic within a short wait (None: none).
fn next_topic(raw: &mut Raw) -> Option<String> {
    match raw.recv_within(Duration::from_millis(700)) {
        Ok(Some(Packet::Publish(p))) => Some(p.topic.to_string()),
        Ok(None) | Err(()) => None,
        Ok(Some(other)) => panic!("expected PUBLISH, got {other:?}"),
    }
}

#[test]
fn sighup_reloads_the_files_without_dropping_a_connection_and_keeps_the_rules_when_a_file_is_bad() {
    let dir = temp_dir("auth-reload");
    let passwd = dir.join("passwd");
    let acl = dir.join("acl");
    let p = passwd.to_str().unwrap();
    shardmq_passwd(&["-c", "-b", p, "alice", "old"]);
    shardmq_passwd(&["-b", p, "writer", "w"]);
    std::fs::write(
        &acl,
        "user alice\ntopic read a/#\nuser writer\ntopic write #\n",
    )
    .unwrap();
    let config = common::child::config_file(
        &dir,
        &format!(
            "[storage]\ndurability = \"memory\"\n[auth]\npassword_file = \"{}\"\nacl_file = \"{}\"\n",
            passwd.display(),
            acl.display()
        ),
    );
    let b = common::child::ChildBroker::start(&["--config", config.to_str().unwrap()]);
    let pid = b.pid().unwrap();
    let as_user = |id: &str, user: &str, password: &str| {
        let mut c = connect_packet(Version::V5, id, true);
        c.username = Some(user.into());
        c.password = Some(bytes::Bytes::copy_from_slice(password.as_bytes()));
        let (raw, ack) = Raw::connect_with(b.addr, c);
        assert_eq!(ack.reason, 0, "{user} logs in");
        raw
    };
    let mut reader = as_user("reader", "alice", "old");
    assert_eq!(reader.subscribe(1, "a/#", QoS::AtMostOnce), vec![0]);
    let mut writer = as_user("writer", "writer", "w");
    writer.publish("a/1", b"1", QoS::AtMostOnce, false, 0);
    assert_eq!(next_topic(&mut reader).as_deref(), Some("a/1"));

    // New password, and alice may read a/open/# only.
    shardmq_passwd(&["-b", p, "alice", "new"]);
    std::fs::write(
        &acl,
        "user alice\ntopic read a/open/#\nuser writer\ntopic write #\n",
    )
    .unwrap();
    common::child::signal(pid, libc::SIGHUP);
    b.wait_for_log("SIGHUP: reloaded").unwrap();
    writer.publish("a/2", b"2", QoS::AtMostOnce, false, 0);
    writer.publish("a/open/3", b"3", QoS::AtMostOnce, false, 0);
    assert_eq!(
        next_topic(&mut reader).as_deref(),
        Some("a/open/3"),
        "the same connection, the new ACL"
    );
    assert_eq!(login(b.addr, Version::V5, Some("alice"), "old"), 0x86);
    assert_eq!(login(b.addr, Version::V5, Some("alice"), "new"), 0);

    // A bad ACL file: the rules in force stay.
    std::fs::write(&acl, "user alice\ntopic read a/#/x\n").unwrap();
    common::child::signal(pid, libc::SIGHUP);
    let log = b.wait_for_log("the rules in force stay").unwrap();
    assert!(log.contains("line 2"), "{log}");
    writer.publish("a/4", b"4", QoS::AtMostOnce, false, 0);
    writer.publish("a/open/5", b"5", QoS::AtMostOnce, false, 0);
    assert_eq!(next_topic(&mut reader).as_deref(), Some("a/open/5"));
    assert_eq!(login(b.addr, Version::V5, Some("alice"), "new"), 0);
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn wrong_passwords_from_one_address_are_answered_ever_more_slowly() {
    let dir = temp_dir("auth-slow");
    let file = dir.join("passwd");
    shardmq_passwd(&["-c", "-b", file.to_str().unwrap(), "alice", "secret"]);
    // One shard: every attempt meets the same count.
    let b = TestBroker::start_with(1, |c| c.auth.password_file = file.clone());
    let timed = |password: &str| {
        let started = std::time::Instant::now();
        let code = login(b.addr, Version::V5, Some("alice"), password);
        (code, started.elapsed())
    };
    for _ in 0..shardmq::auth::FREE_FAILURES {
        assert_eq!(timed("guess").0, 0x86);
    }
    // Lower bounds only: a busy machine makes them longer, never shorter.
    let (code, took) = timed("guess");
    assert_eq!(code, 0x86);
    assert!(took >= Duration::from_millis(240), "{took:?}");
    let (code, took) = timed("guess");
    assert_eq!(code, 0x86);
    assert!(took >= Duration::from_millis(490), "{took:?}");
    // The right password is let in, and starts the count afresh.
    assert_eq!(timed("secret").0, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The CONNACK code a 5.0 CONNECT for `id` as `user` gets from `from`.
fn connect_from(addr: std::net::SocketAddr, from: &str, id: &str, user: Option<&str>) -> u8 {
    use std::io::{Read, Write};
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: std::net::SocketAddr = format!("{from}:0").parse().unwrap();
    socket.bind(&local.into()).unwrap();
    socket.connect(&addr.into()).unwrap();
    let mut s: std::net::TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut c = connect_packet(Version::V5, id, true);
    c.username = user.map(str::to_string);
    let mut out = bytes::BytesMut::new();
    shardmq::codec::encode(&Packet::Connect(Box::new(c)), Version::V5, &mut out);
    s.write_all(&out).unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head[0], 0x20, "CONNACK");
    head[3]
}

#[test]
fn client_id_and_address_rules_come_before_any_password() {
    let b = TestBroker::start_with(2, |c| {
        c.auth.allow_anonymous = Some(true);
        c.auth.client_id_allow = vec!["dev-*".into(), "gw-*".into()];
        c.auth.client_id_deny = vec!["dev-bad*".into()];
        c.auth
            .client_id_users
            .insert("gw-*".into(), "gateway".into());
        c.auth.address_deny = vec!["127.0.0.2/32".parse().unwrap()];
    });
    assert_eq!(connect_from(b.addr, "127.0.0.1", "dev-1", None), 0);
    assert_eq!(
        connect_from(b.addr, "127.0.0.2", "dev-1", None),
        0x8A,
        "banned address"
    );
    assert_eq!(connect_from(b.addr, "127.0.0.1", "other", None), 0x85);
    assert_eq!(connect_from(b.addr, "127.0.0.1", "dev-bad7", None), 0x85);
    assert_eq!(
        connect_from(b.addr, "127.0.0.1", "gw-1", Some("gateway")),
        0
    );
    assert_eq!(
        connect_from(b.addr, "127.0.0.1", "gw-1", Some("mallory")),
        0x87
    );
    assert_eq!(connect_from(b.addr, "127.0.0.1", "gw-2", None), 0x87);
}

#[test]
fn no_client_writes_sys_topics() {
    let b = TestBroker::start_with(1, |_| {});
    let mut watcher = raw_as(b.addr, Version::V5, "watcher", None);
    assert_eq!(watcher.subscribe(1, "$SYS/#", QoS::AtMostOnce), vec![0]);
    let mut spoof = raw_as(b.addr, Version::V5, "spoof", None);
    assert_eq!(puback(&mut spoof, "$SYS/broker/uptime", 1), 0x87);
    spoof.publish("$SYS/broker/version", b"fake", QoS::AtMostOnce, true, 0);
    assert_eq!(drain(&mut watcher), vec![]);
    // Nor is a fake one retained for later subscribers.
    let mut late = raw_as(b.addr, Version::V5, "late", None);
    assert_eq!(late.subscribe(1, "$SYS/#", QoS::AtMostOnce), vec![0]);
    assert_eq!(drain(&mut late), vec![]);
}

/// JSON Web Tokens as passwords: a token signed with the configured secret
/// logs in (the client id claim must match), its ACL claim names the
/// client's topics (SUBACK and PUBACK 0x87 outside them), a bad, foreign
/// or expired token gets 0x86 (3.1.1: 4), a user name without a token
/// gets 0x86, a user name the token does not bind is no one in the ACL
/// file, and the token's exp ends the connection with DISCONNECT 0xA0.
#[test]
fn jwt_passwords_log_in_name_their_topics_and_end_at_exp() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;
    let dir = temp_dir("jwt");
    let secret = b"an HMAC secret of at least 32 bytes, for tests";
    std::fs::write(dir.join("jwt.secret"), [&secret[..], b"\n"].concat()).unwrap();
    std::fs::write(dir.join("acl"), "user admin\ntopic readwrite secret/#\n").unwrap();
    let b = TestBroker::start_with(2, |c| {
        c.auth.jwt_secret_file = dir.join("jwt.secret");
        c.auth.acl_file = dir.join("acl");
        c.auth.jwt_verify_claims = [("clientid".to_string(), "%c".to_string())].into();
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let signed = |claims: serde_json::Value, key: &[u8]| {
        encode(&Header::default(), &claims, &EncodingKey::from_secret(key)).unwrap()
    };
    let connect = |version, id: &str, token: &str| {
        let mut c = connect_packet(version, id, true);
        c.username = Some("device".into());
        c.password = Some(bytes::Bytes::copy_from_slice(token.as_bytes()));
        Raw::connect_with(b.addr, c)
    };

    let good = signed(
        json!({"clientid": "dev-1", "exp": now + 600,
               "acl": {"sub": ["down/%c/#"], "pub": ["up/%c"]}}),
        secret,
    );
    let (mut dev, ack) = connect(Version::V5, "dev-1", &good);
    assert_eq!(ack.reason, 0);
    assert_eq!(dev.subscribe(1, "down/dev-1/#", QoS::AtLeastOnce), [1]);
    assert_eq!(dev.subscribe(2, "down/dev-2/#", QoS::AtLeastOnce), [0x87]);
    assert_eq!(puback(&mut dev, "up/dev-1", 3), 0);
    assert_eq!(puback(&mut dev, "up/dev-2", 4), 0x87);

    for (id, token, why) in [
        ("dev-2", good.clone(), "another client's token"),
        (
            "dev-1",
            signed(json!({"clientid": "dev-1", "exp": now - 1}), secret),
            "expired",
        ),
        (
            "dev-1",
            signed(
                json!({"clientid": "dev-1"}),
                b"not the secret, but as long as it",
            ),
            "another key",
        ),
        ("dev-1", "a plain password".to_string(), "no token"),
    ] {
        assert_eq!(connect(Version::V5, id, &token).1.reason, 0x86, "{why}");
    }
    assert_eq!(login_v3_wire(b.addr, Some("device"), &good), 4, "3.1.1");

    // A token that does not bind the user name does not make its client
    // the ACL file's "admin": it is anonymous there (no rules here).
    let unbound = signed(json!({"clientid": "dev-4"}), secret);
    let mut c = connect_packet(Version::V5, "dev-4", true);
    c.username = Some("admin".into());
    c.password = Some(bytes::Bytes::copy_from_slice(unbound.as_bytes()));
    let (mut pretender, ack) = Raw::connect_with(b.addr, c);
    assert_eq!(ack.reason, 0);
    assert_eq!(pretender.subscribe(1, "secret/#", QoS::AtLeastOnce), [0x87]);

    // A token that ends in two seconds ends its connection then.
    let short = signed(json!({"clientid": "dev-3", "exp": now + 2}), secret);
    let (mut brief, ack) = connect(Version::V5, "dev-3", &short);
    assert_eq!(ack.reason, 0);
    let started = std::time::Instant::now();
    assert_eq!(brief.expect_close(), Some(0xA0));
    assert!(started.elapsed() < Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}
