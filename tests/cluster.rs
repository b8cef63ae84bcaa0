//! Cluster membership on real sockets: broker processes on loopback, each
//! with its own client port, data directory and membership port. The
//! protocol itself runs first in the simulator (`tests/membership.rs`).

#[path = "common/client.rs"]
mod client;
mod common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::child::{temp_dir, ChildBroker};
use shardmq::cluster::membership::envelope;

/// A loopback UDP port free now (the tests that need ports known before
/// a node starts).
/// A cluster port P for a node of 2 shards: UDP P and TCP P and P + 1
/// free now, below the kernel's ephemeral range (which starts at 32768
/// by default). An ephemeral port is no good: the bridge's P + 1 may be
/// any other test's socket by the time the node binds it.
fn free_udp_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Spread over processes (each test binary starts at its own place).
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = 20_000 + (std::process::id() % 300) as u16 * 20;
    for _ in 0..3000 {
        // 20000 + 5980 + 5998 < 32768.
        let port = start + NEXT.fetch_add(2, Ordering::Relaxed) % 6000;
        let free = UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok();
        if free {
            return port;
        }
    }
    panic!("no free cluster port below 32000");
}

/// Wait (at most `secs`) until the broker's log holds `needle`; how long
/// it took.
fn wait_log(b: &ChildBroker, needle: &str, secs: u64) -> Duration {
    wait_log_count(b, needle, 1, secs)
}

/// The membership port a node bound (from its start line).
fn membership_port(b: &ChildBroker) -> u16 {
    let log = b.log_text();
    let rest = log
        .split("membership on 127.0.0.1:")
        .nth(1)
        .expect("the cluster start line");
    rest.split(' ').next().unwrap().parse().unwrap()
}

fn node(name: &str, dir: &std::path::Path, port: u16, join: &[u16]) -> ChildBroker {
    node_env(name, dir, port, join, &[])
}

/// [`node`] with environment variables `env` for the broker.
fn node_env(
    name: &str,
    dir: &std::path::Path,
    port: u16,
    join: &[u16],
    env: &[(&str, &str)],
) -> ChildBroker {
    let join: Vec<String> = join.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let cluster = format!("127.0.0.1:{port}");
    start_node_env(name, dir, "127.0.0.1:0", &cluster, &join.join(","), env)
}

/// Node `name` of 2 shards, its data under `dir`, clients on `listen`,
/// membership on `cluster`, joining `join` (comma-separated).
fn start_node(
    name: &str,
    dir: &std::path::Path,
    listen: &str,
    cluster: &str,
    join: &str,
) -> ChildBroker {
    start_node_env(name, dir, listen, cluster, join, &[])
}

/// [`start_node`] with environment variables `env` for the broker.
fn start_node_env(
    name: &str,
    dir: &std::path::Path,
    listen: &str,
    cluster: &str,
    join: &str,
    env: &[(&str, &str)],
) -> ChildBroker {
    let data = dir.join(name);
    ChildBroker::try_start_env(
        listen,
        &[
            "--shards",
            "2",
            "--data-dir",
            data.to_str().unwrap(),
            "--node-id",
            name,
            "--cluster-listen",
            cluster,
            "--join",
            join,
        ],
        env,
    )
    .unwrap_or_else(|log| panic!("node {name} did not start:\n{log}"))
}

/// Start nodes a, b and c (2 shards each, b and c joining a) under `dir`
/// and wait until they see each other and every bridge link between them
/// is up.
fn three_nodes(dir: &std::path::Path) -> [ChildBroker; 3] {
    three_nodes_env(dir, &[])
}

/// [`three_nodes`] with environment variables `env` for every broker.
fn three_nodes_env(dir: &std::path::Path, env: &[(&str, &str)]) -> [ChildBroker; 3] {
    let a = node_env("a", dir, 0, &[], env);
    let pa = membership_port(&a);
    let b = node_env("b", dir, 0, &[pa], env);
    let c = node_env("c", dir, 0, &[pa], env);
    wait_links(&a, &b, &c);
    [a, b, c]
}

/// Wait until nodes a, b and c (2 shards each) see each other, every
/// bridge link between them is up and each takes CONNECTs (a node refuses
/// them with 0x88 until every shard has its peers' routes).
fn wait_links(a: &ChildBroker, b: &ChildBroker, c: &ChildBroker) {
    wait_links_up(a, b, c);
    for n in [a, b, c] {
        wait_serving(n);
        // The line operators (and loadtest/cluster-bench.sh) wait for.
        for shard in 0..2 {
            let line = format!("shard {shard}: the routes of every node up are here");
            wait_log(n, &line, 30);
        }
    }
}

/// Wait (at most 30 s) until `b` accepts CONNECTs, on every shard (the
/// client ids of the probes are spread over them).
fn wait_serving(b: &ChildBroker) {
    let start = Instant::now();
    loop {
        let refused = (0..8).map(|i| {
            let id = format!("ready-probe-{i}");
            let v = shardmq::codec::Version::V3_1_1;
            common::Raw::connect(b.addr, v, &id, true).1.reason
        });
        let refused = refused.filter(|&r| r != 0).max();
        let Some(reason) = refused else {
            return;
        };
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} refused CONNECTs for 30 s (CONNACK {}):\n{}",
            b.addr,
            reason,
            b.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until nodes a, b and c (2 shards each) see each other and every
/// bridge link between them is up.
fn wait_links_up(a: &ChildBroker, b: &ChildBroker, c: &ChildBroker) {
    for n in [a, b, c] {
        wait_log(n, "2 peers up", 30);
    }
    for (n, peers) in [(a, ["b", "c"]), (b, ["a", "c"]), (c, ["a", "b"])] {
        for peer in peers {
            for shard in 0..2 {
                let line =
                    format!("shard {shard}: link to node \"{peer}\" (its shard {shard}) is up");
                wait_log(n, &line, 30);
            }
        }
    }
}

/// Three nodes started in the reverse of their join order find each
/// other; a node killed with SIGKILL is declared down on both others; it
/// restarts with its next incarnation and is known as such; garbage sent to
/// a membership port is logged and changes nothing; an orderly stop is
/// known at once.
#[test]
fn three_nodes_join_in_any_order_and_a_killed_node_is_declared_down_and_comes_back() {
    let dir = temp_dir("cluster-three");
    let [pa, pb, pc] = [free_udp_port(), free_udp_port(), free_udp_port()];
    // c joins through a, which is not up yet; b through c; a through b.
    let mut c = node("c", &dir, pc, &[pa]);
    let b = node("b", &dir, pb, &[pc]);
    let a = node("a", &dir, pa, &[pb]);
    for n in [&a, &b, &c] {
        wait_log(n, "2 peers up", 30);
    }
    assert!(c.log_text().contains("node \"c\" incarnation 1,"));

    let killed = Instant::now();
    c.kill9();
    let down = "node \"c\" at 127.0.0.1";
    for n in [&a, &b] {
        let line = format!("{down}:{pc} (incarnation 1) is down");
        wait_log(n, &line, 30);
    }
    // Printed, not asserted: the 3 s bound is the simulator's
    // (tests/membership.rs); this machine's timing is not.
    eprintln!(
        "cluster: killed node declared down on both peers after {} ms",
        killed.elapsed().as_millis()
    );

    let c = node("c", &dir, pc, &[pa]);
    assert!(c.log_text().contains("node \"c\" incarnation 2,"));
    for n in [&a, &b] {
        wait_log(
            n,
            &format!("{down}:{pc} restarted (incarnation 1 -> 2)"),
            30,
        );
    }
    wait_log(&c, "2 peers up", 30);

    // Garbage at a membership port: logged with its sender, ignored.
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut ours = envelope("shardmq").to_vec();
    ours.extend_from_slice(&[0xff; 40]);
    for d in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        b"SM\x01\x01\0\0\0\0\xff\xff",
        &ours,
    ] {
        junk.send_to(d, ("127.0.0.1", pa)).unwrap();
    }
    wait_log(&a, "ignored a 18-byte datagram from 127.0.0.1", 10);
    wait_log(&a, "from a node of another cluster", 10);
    wait_log(&a, "malformed membership datagram", 10);

    // Garbage at a bridge port: a frame longer than allowed, a frame
    // before Hello, a Hello from a node that is no member. Each link is
    // closed; the cluster goes on.
    {
        use std::io::{Read, Write};
        let bridge = ("127.0.0.1", pa);
        let mut huge = std::net::TcpStream::connect(bridge).unwrap();
        huge.write_all(&[0xff, 0xff, 0xff, 0xff, 1]).unwrap();
        let mut early = std::net::TcpStream::connect(bridge).unwrap();
        early
            .write_all(&[0, 0, 0, 9, 5, 0, 0, 0, 0, 0, 0, 0, 1])
            .unwrap();
        // A node it does not know, and one of another protocol version.
        let version = shardmq::cluster::frame::BRIDGE_VERSION;
        let strangers = [version, version + 1].map(|version| {
            let mut stranger = std::net::TcpStream::connect(bridge).unwrap();
            let mut hello = vec![1u8];
            hello.extend_from_slice(&version.to_be_bytes());
            hello.extend_from_slice(&envelope("shardmq")[4..8]);
            hello.extend_from_slice(&[0, 1, b'x']);
            hello.extend_from_slice(&1u64.to_be_bytes());
            hello.extend_from_slice(&[0, 0, 0, 1]);
            let addr = b"127.0.0.1:1";
            hello.extend_from_slice(&(addr.len() as u16).to_be_bytes());
            hello.extend_from_slice(addr);
            // No secret; the link's number.
            hello.push(0);
            hello.extend_from_slice(&1u64.to_be_bytes());
            let mut frame = (hello.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(&hello);
            stranger.write_all(&frame).unwrap();
            stranger
        });
        wait_log(&a, "more than the", 10);
        wait_log(&a, "a frame before Hello out of turn", 10);
        for s in [&mut huge, &mut early] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = [0u8; 256];
            // Closed, without a Hello.
            assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
        }
        wait_log(
            &a,
            &format!(
                "bridge protocol version {version} here, {} there",
                version + 1
            ),
            10,
        );
        // Each stranger gets a Refuse (kind 2) saying why, and no Hello.
        for (mut stranger, why) in strangers.into_iter().zip(["not a live member", "version"]) {
            stranger
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut got = Vec::new();
            let _ = stranger.read_to_end(&mut got);
            let mut kinds = Vec::new();
            let mut rest = &got[..];
            while rest.len() >= 5 {
                let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
                kinds.push(rest[4]);
                rest = &rest[(4 + len).min(rest.len())..];
            }
            assert_eq!(kinds, vec![2], "a Refuse only");
            assert!(
                String::from_utf8_lossy(&got).contains(why),
                "{why}: {got:?}"
            );
        }
    }

    // An orderly stop tells the others at once (well before failure
    // detection would).
    let mut b = b;
    let pb = membership_port(&b);
    b.stop();
    let line = format!("node \"b\" at 127.0.0.1:{pb} (incarnation 1) is down");
    wait_log(&a, &line, 30);
    wait_log(&c, &line, 30);
    assert!(
        !a.log_text().contains("is down; 0 peers up"),
        "a lost c too:\n{}",
        a.log_text()
    );
    drop((a, c));
    let _ = std::fs::remove_dir_all(&dir);
}

/// With a cluster secret (`SHARDMQ_CLUSTER_SECRET_FILE`), the nodes that
/// hold it form the cluster and route between them; a node with another
/// secret never joins (its datagrams are ignored, logged); a secret file
/// too short stops the start, naming the setting.
#[test]
fn only_nodes_that_hold_the_cluster_secret_form_the_cluster() {
    use shardmq::codec::{QoS, Version};
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("cluster-secret");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path.to_str().unwrap().to_string()
    };
    let key = write("secret", "k3y-of-the-cluster-32-bytes-long\n");
    let other = write("other", "an0ther-key-of-32-bytes-long-too\n");
    let short = write("short", "too short\n");
    let env = |path: &str| [("SHARDMQ_CLUSTER_SECRET_FILE", path.to_string())];
    let cluster = |port: u16| format!("127.0.0.1:{port}");
    let log = ChildBroker::try_start_env(
        "127.0.0.1:0",
        &[
            "--node-id",
            "s",
            "--cluster-listen",
            &cluster(free_udp_port()),
        ],
        &[("SHARDMQ_CLUSTER_SECRET_FILE", short.as_str())],
    )
    .err()
    .expect("a short secret is refused");
    assert!(log.contains("cluster.secret_file"), "{log}");
    let node = |name: &str, port: u16, join: &str, secret: &str| {
        let e = env(secret);
        let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
        start_node_env(name, &dir, "127.0.0.1:0", &cluster(port), join, &e)
    };
    let pa = free_udp_port();
    let a = node("a", pa, "", &key);
    let b = node("b", free_udp_port(), &cluster(pa), &key);
    for (n, peer) in [(&a, "b"), (&b, "a")] {
        for shard in 0..2 {
            let line = format!("shard {shard}: link to node \"{peer}\" (its shard {shard}) is up");
            wait_log(n, &line, 30);
            // New CONNECTs are taken once the peer's routes are here.
            let line = format!("shard {shard}: the routes of every node up are here");
            wait_log(n, &line, 30);
        }
    }
    let (mut sub, _) = common::Raw::connect(b.addr, Version::V3_1_1, "sec-sub", true);
    sub.subscribe(1, "sec/t", QoS::AtLeastOnce);
    let (mut publisher, _) = common::Raw::connect(a.addr, Version::V3_1_1, "sec-pub", true);
    common::raw::publish_qos1(&mut publisher, "sec/t", b"proved", 1);
    assert_eq!(&sub.recv_publish().payload[..], b"proved");
    let x = node("x", free_udp_port(), &cluster(pa), &other);
    wait_log(&a, "without the cluster secret's tag", 10);
    std::thread::sleep(Duration::from_secs(2));
    assert!(!a.log_text().contains("node \"x\""), "{}", a.log_text());
    assert!(!x.log_text().contains("is up"), "{}", x.log_text());
    let refused = "shardmq_cluster_datagrams_refused_total{reason=\"unauthenticated\"}";
    assert!(metric_sum(&a, refused) > 0);
    assert_eq!(metric_sum(&b, refused), 0, "b heard only a");
    drop((a, b, x));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Cluster settings that cannot work are refused at start, naming the
/// setting; a data directory keeps the name of the node that made it.
#[test]
fn bad_cluster_settings_are_refused_with_the_setting_named() {
    let dir = temp_dir("cluster-refusals");
    let data = dir.join("data");
    let data = data.to_str().unwrap();
    let refused = |args: &[&str]| {
        ChildBroker::try_start(args)
            .err()
            .unwrap_or_else(|| panic!("started with {args:?}"))
    };
    let log = refused(&["--node-id", "a b", "--cluster-listen", "127.0.0.1:0"]);
    assert!(log.contains("cluster.node_id"), "{log}");
    let log = refused(&["--node-id", "a", "--cluster-listen", "0.0.0.0:0"]);
    assert!(log.contains("cluster.advertise"), "{log}");
    let log = refused(&[
        "--node-id",
        "a",
        "--cluster-listen",
        "127.0.0.1:0",
        "--join",
        "x",
    ]);
    assert!(log.contains("--join x"), "{log}");

    // The directory remembers its node.
    let mut a = ChildBroker::start(&[
        "--data-dir",
        data,
        "--node-id",
        "a",
        "--cluster-listen",
        "127.0.0.1:0",
    ]);
    a.stop();
    let log = refused(&[
        "--data-dir",
        data,
        "--node-id",
        "b",
        "--cluster-listen",
        "127.0.0.1:0",
    ]);
    assert!(log.contains("belongs to node \"a\", not \"b\""), "{log}");

    // A membership port in use is named.
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let log = refused(&[
        "--node-id",
        "c",
        "--durability",
        "memory",
        "--cluster-listen",
        &port,
    ]);
    assert!(
        log.contains(&format!("cannot listen on {port} (udp)")),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A second node started with a node id in use (another data directory
/// and address) is ignored by the nodes that know the first, each saying
/// so; it sees them as duplicates of itself. The first keeps its links
/// and its messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_with_a_node_id_in_use_is_ignored_with_a_clear_line() {
    use client::v3::{connect, options, QoS};
    let dir = temp_dir("cluster-duplicate");
    let a = node("a", &dir, 0, &[]);
    let pa = membership_port(&a);
    // b below the kernel's ephemeral ports, the twin in them: equal
    // incarnations, so every node keeps the lower address, b's.
    let b = node("b", &dir, free_udp_port(), &[pa]);
    for n in [&a, &b] {
        wait_log(n, "1 peers up", 30);
    }
    let pb = membership_port(&b);
    let twin = node("b", &dir.join("twin"), 0, &[pa]);
    let pt = membership_port(&twin);
    assert!(pb < pt);
    let line = format!(
        "cluster: two nodes have node id \"b\": the one at 127.0.0.1:{pb} (incarnation 1) \
         is kept, the one at 127.0.0.1:{pt} (incarnation 1) is ignored"
    );
    wait_log(&a, &line, 30);
    for n in [&b, &twin] {
        wait_log(n, "has this node's own id: it is ignored", 30);
    }
    let (status, view) = get_json(a.http_addr(), "/api/v1/cluster");
    assert_eq!(status, 200);
    let nodes = view["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{view}");
    assert_eq!(nodes[1]["addr"], format!("127.0.0.1:{pb}"), "{view}");
    // a still reaches the first b.
    let mut sub = connect(options(b.addr, "sub-b")).await;
    sub.subscribe("dup/t", QoS::AtLeastOnce).await;
    let mut publisher = connect(options(a.addr, "pub-a")).await;
    publisher
        .publish_acked("dup/t", false, b"to the first b")
        .await;
    assert_eq!(&sub.next_publish().await.payload[..], b"to the first b");
    assert!(!a
        .log_text()
        .contains(&format!("127.0.0.1:{pt} (incarnation 1) is up")));
    drop((sub, publisher, a, b, twin));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A message published on one node reaches the subscribers of another,
/// and only those: at QoS 0 and 1, 3.1.1 and 5.0 clients, in order, with
/// the 5.0 properties it was published with; a node with no matching
/// subscriber gets nothing. Once the links are up, a SUBACK waits until
/// every other node can route the new subscription: a publish on another
/// node right after it is delivered (twenty times over, each with a new
/// filter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_on_one_node_reaches_subscribers_on_another() {
    use client::v3::{connect, options, QoS};
    let dir = temp_dir("cluster-route");
    let [a, b, c] = three_nodes(&dir);
    let mut sub_a = connect(options(a.addr, "sub-a")).await;
    let mut publisher = connect(options(b.addr, "pub-b")).await;
    for i in 0..20 {
        let filter = format!("r/{i}/#");
        sub_a.subscribe(&filter, QoS::AtLeastOnce).await;
        publisher
            .publish_acked(&format!("r/{i}/x"), false, b"right after")
            .await;
        let p = sub_a.next_publish().await;
        assert_eq!(&*p.topic, format!("r/{i}/x").as_str());
    }
    sub_a.subscribe("t/#", QoS::AtLeastOnce).await;
    let mut sub_c = connect(options(c.addr, "sub-c")).await;
    sub_c.subscribe("other/#", QoS::AtLeastOnce).await;

    for i in 0..200u32 {
        let qos = if i % 2 == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        publisher
            .publish(&format!("t/{i}"), qos, false, format!("m{i}").as_bytes())
            .await;
    }
    for i in 0..200u32 {
        let p = sub_a.next_publish().await;
        assert_eq!(&*p.topic, format!("t/{i}").as_str());
        assert_eq!(&p.payload[..], format!("m{i}").as_bytes());
    }
    sub_c.expect_no_publish().await;

    // 5.0: properties cross with the message.
    {
        use client::v5::{connect, options, QoS};
        use rumqttc::v5::mqttbytes::v5::PublishProperties;
        let mut sub5 = connect(options(c.addr, "sub5-c")).await;
        sub5.subscribe("p/+", QoS::AtLeastOnce).await;
        let pub5 = connect(options(a.addr, "pub5-a")).await;
        let props = PublishProperties {
            content_type: Some("text/plain".into()),
            user_properties: vec![("k".into(), "v".into())],
            message_expiry_interval: Some(600),
            ..Default::default()
        };
        pub5.client
            .publish_with_properties("p/1", QoS::AtLeastOnce, false, "x", props)
            .await
            .unwrap();
        let got = sub5.next_publish().await;
        let got = got.properties.expect("properties");
        assert_eq!(got.content_type.as_deref(), Some("text/plain"));
        assert_eq!(
            got.user_properties,
            vec![("k".to_string(), "v".to_string())]
        );
        let left = got.message_expiry_interval.expect("the expiry left");
        assert!((590..=600).contains(&left), "{left}");
    }

    // A shared subscription with members on a and c: each message from b
    // to exactly one of them, and both take turns.
    let mut m_a = connect(options(a.addr, "member-a")).await;
    m_a.subscribe("$share/g/s/#", QoS::AtLeastOnce).await;
    let mut m_c = connect(options(c.addr, "member-c")).await;
    m_c.subscribe("$share/g/s/#", QoS::AtLeastOnce).await;
    for i in 0..100u32 {
        publisher
            .publish_acked(&format!("s/{i}"), false, b"s")
            .await;
    }
    let mut got = Vec::new();
    for m in [&mut m_a, &mut m_c] {
        let mut n = 0;
        while let Some(p) = m.try_next_publish(Duration::from_millis(500)).await {
            got.push(p.topic.to_string());
            n += 1;
        }
        assert!(n > 0, "both members take turns");
    }
    got.sort();
    let mut want: Vec<String> = (0..100).map(|i| format!("s/{i}")).collect();
    want.sort();
    assert_eq!(got, want, "each message to exactly one member");
    drop((a, b, c));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The wills of a killed node's clients are published by the nodes that
/// survive it, each to its own subscribers: a 3.1.1 will at once (and
/// kept as retained there), a 5.0 will after its delay; a client that left
/// with DISCONNECT leaves none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wills_of_a_killed_nodes_clients_are_published_by_the_others() {
    use client::v3::{connect, options, LastWill, QoS};
    let dir = temp_dir("cluster-wills");
    let [a, b, mut c] = three_nodes(&dir);
    let mut sub_a = connect(options(a.addr, "sub-a")).await;
    sub_a.subscribe("will/#", QoS::AtLeastOnce).await;
    let mut sub_b = connect(options(b.addr, "sub-b")).await;
    sub_b.subscribe("will/#", QoS::AtLeastOnce).await;

    // Each client's will travels on its home shard's links; so does what
    // it publishes after, which tells the test the will got there.
    let mut o = options(c.addr, "dev-1");
    o.set_last_will(LastWill::new(
        "will/dev-1",
        b"dev-1 gone".to_vec(),
        QoS::AtLeastOnce,
        true,
    ));
    let dev1 = connect(o).await;
    dev1.publish("will/sync", QoS::AtLeastOnce, false, b"dev-1")
        .await;
    let mut o = options(c.addr, "dev-2");
    o.set_last_will(LastWill::new(
        "will/dev-2",
        b"dev-2 gone".to_vec(),
        QoS::AtLeastOnce,
        false,
    ));
    connect(o).await.disconnect().await;
    let dev2 = connect(options(c.addr, "dev-2")).await;
    dev2.publish("will/sync", QoS::AtLeastOnce, false, b"dev-2")
        .await;
    let dev3 = {
        use client::v5::{connect, options, set_session_expiry, will};
        let mut o = options(c.addr, "dev-3");
        set_session_expiry(&mut o, 60);
        o.set_last_will(will("will/dev-3", b"dev-3 gone", false, Some(3)));
        let dev3 = connect(o).await;
        dev3.client
            .publish("will/sync", client::v5::QoS::AtLeastOnce, false, "dev-3")
            .await
            .unwrap();
        dev3
    };
    for sub in [&mut sub_a, &mut sub_b] {
        let mut synced: Vec<String> = Vec::new();
        for _ in 0..3 {
            let p = sub.next_publish().await;
            assert_eq!(&*p.topic, "will/sync");
            synced.push(String::from_utf8_lossy(&p.payload).into());
        }
        synced.sort();
        assert_eq!(synced, ["dev-1", "dev-2", "dev-3"]);
    }

    let killed = Instant::now();
    c.kill9();
    for sub in [&mut sub_a, &mut sub_b] {
        let p = sub.next_publish_within(Duration::from_secs(30)).await;
        assert_eq!(
            (&*p.topic, &p.payload[..]),
            ("will/dev-1", &b"dev-1 gone"[..])
        );
    }
    // Printed, not asserted (this machine's timing is not the bound).
    eprintln!(
        "cluster: a killed node's will published on both peers after {} ms",
        killed.elapsed().as_millis()
    );
    for sub in [&mut sub_a, &mut sub_b] {
        let p = sub.next_publish_within(Duration::from_secs(30)).await;
        assert_eq!(
            (&*p.topic, &p.payload[..]),
            ("will/dev-3", &b"dev-3 gone"[..])
        );
    }
    // dev-3's will waited for its 3 s delay after the death was known.
    assert!(killed.elapsed() >= Duration::from_secs(3));
    sub_a.expect_no_publish().await;
    sub_b.expect_no_publish().await;
    // The retained will is kept on each survivor.
    for n in [&a, &b] {
        let mut late = connect(options(n.addr, "late")).await;
        late.subscribe("will/dev-1", QoS::AtLeastOnce).await;
        let p = late.next_publish().await;
        assert!(p.retain);
        assert_eq!(&p.payload[..], b"dev-1 gone");
    }
    drop((dev1, dev2, dev3));

    // An orderly stop: b publishes its clients' wills itself (on both of
    // its shards), and tells a before it leaves, so a does not publish
    // them again.
    let mut devs = Vec::new();
    for i in 4..10 {
        let id = format!("dev-{i}");
        let mut o = options(b.addr, &id);
        o.set_last_will(LastWill::new(
            format!("will/{id}"),
            format!("{id} gone").into_bytes(),
            QoS::AtLeastOnce,
            false,
        ));
        let dev = connect(o).await;
        dev.publish("will/sync", QoS::AtLeastOnce, false, id.as_bytes())
            .await;
        assert_eq!(sub_a.next_publish().await.payload, id.as_bytes());
        devs.push(dev);
    }
    let mut b = b;
    let pb = membership_port(&b);
    b.stop();
    let mut wills = Vec::new();
    for _ in 4..10 {
        let p = sub_a.next_publish_within(Duration::from_secs(30)).await;
        wills.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    wills.sort();
    let want: Vec<String> = (4..10).map(|i| format!("dev-{i} gone")).collect();
    assert_eq!(wills, want, "each will once");
    wait_log(
        &a,
        &format!("node \"b\" at 127.0.0.1:{pb} (incarnation 1) is down"),
        30,
    );
    sub_a.expect_no_publish().await;
    drop((devs, a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The retained message of `topic` a new subscriber at `addr` gets now
/// (None: none within half a second).
async fn retained_at(addr: std::net::SocketAddr, topic: &str) -> Option<Vec<u8>> {
    use client::v3::{connect, options, QoS};
    let mut c = connect(options(addr, "retained-reader")).await;
    c.subscribe(topic, QoS::AtLeastOnce).await;
    let got = c.try_next_publish(Duration::from_millis(500)).await;
    c.disconnect().await;
    got.map(|p| {
        assert!(p.retain, "a retained message");
        p.payload.to_vec()
    })
}

/// Poll (at most 30 s) until a new subscriber at `addr` gets `want` as
/// the retained message of `topic`.
async fn wait_retained(addr: std::net::SocketAddr, topic: &str, want: Option<&[u8]>) {
    let start = Instant::now();
    loop {
        let got = retained_at(addr, topic).await;
        if got.as_deref() == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{topic} at {addr}: {got:?}, not {want:?}"
        );
    }
}

/// Every node keeps every retained message: one stored on a is given to a
/// new subscriber on b, a delete on c removes it everywhere, and a node
/// that joins later gets the cluster's retained messages when its links
/// come up (and not the deleted one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_kept_on_every_node() {
    use client::v3::{connect, options};
    let dir = temp_dir("cluster-retained");
    let [a, b, c] = three_nodes(&dir);
    let pub_a = connect(options(a.addr, "pub-a")).await;
    let mut pub_a = pub_a;
    pub_a.publish_acked("ret/1", true, b"from a").await;
    pub_a.publish_acked("ret/2", true, b"kept").await;
    wait_retained(b.addr, "ret/1", Some(b"from a")).await;
    wait_retained(c.addr, "ret/2", Some(b"kept")).await;
    // A newer version written on b replaces it everywhere.
    let mut pub_b = connect(options(b.addr, "pub-b")).await;
    pub_b.publish_acked("ret/1", true, b"from b").await;
    for n in [&a, &c] {
        wait_retained(n.addr, "ret/1", Some(b"from b")).await;
    }
    // A delete on c.
    let mut pub_c = connect(options(c.addr, "pub-c")).await;
    pub_c.publish_acked("ret/1", true, b"").await;
    for n in [&a, &b] {
        wait_retained(n.addr, "ret/1", None).await;
    }
    // d joins later: it gets what the cluster keeps, not what it deleted.
    let d = node("d", &dir, 0, &[membership_port(&a)]);
    wait_log(&d, "3 peers up", 30);
    // Up is not serving: CONNECTs are refused (0x88) until the peers'
    // routes are here.
    wait_serving(&d);
    wait_retained(d.addr, "ret/2", Some(b"kept")).await;
    assert_eq!(retained_at(d.addr, "ret/1").await, None);
    drop((pub_a, pub_b, pub_c));
    drop((a, b, c, d));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Until both of `b`'s shards wait for their standby: the copies caught
/// up, and what `b` acknowledges from now on is in them (a new standby is
/// not waited for while it catches up).
async fn wait_standbys_waited(b: &ChildBroker) {
    let metric = "shardmq_cluster_log_standbys_waited";
    wait_metric(b, metric, 2, 30, "no standby caught up").await;
}

/// Until `metric_sum(b, name)` reaches `at_least`, for at most `secs`
/// seconds (then fails with `what`).
async fn wait_metric(b: &ChildBroker, name: &str, at_least: u64, secs: u64, what: &str) {
    let start = Instant::now();
    while metric_sum(b, name) < at_least {
        assert!(start.elapsed() < Duration::from_secs(secs), "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sum over shards of the metric lines starting with `name` (its
/// labels included, as far as given) in `/metrics` of `b`.
fn metric_sum(b: &ChildBroker, name: &str) -> u64 {
    common::metric_sum(b.http_addr(), name)
}

/// Messages `prefix/i` for each `i` of `range` reach `sub`, in that order
/// (none lost); on a mismatch, the log of `publishers` (their node).
async fn expect_topics(
    sub: &mut client::v3::Client,
    prefix: &str,
    range: std::ops::Range<usize>,
    publishers: &ChildBroker,
) {
    for i in range {
        let p = sub.next_publish().await;
        let want = format!("{prefix}/{i}");
        let log = || publishers.log_text();
        assert_eq!(&*p.topic, want.as_str(), "in order, none lost:\n{}", log());
    }
}

/// Publishers faster than a link: their node stops reading them while a
/// peer leaves half of `cluster.link_queue_bytes_max` (here 256 KiB)
/// unconfirmed, instead of dropping what goes past the bound
/// and acknowledging it. 2,000 QoS 1 messages of 16 KiB, 100 in flight
/// (1.6 MiB, past twice the bound), from a to a subscriber on b, with b stopped (SIGSTOP) for
/// 1.5 s in the middle (its failure detection set to 10 s, so that it
/// stays up): every one arrives in order, none is dropped, and the pauses
/// are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_faster_than_a_link_are_paused_not_dropped() {
    use client::v3::{connect, options, QoS};
    let dir = temp_dir("cluster-link-full");
    let config = common::child::config_file(
        &dir,
        "[mqtt]\npacket_size_max_bytes = 65536\n[storage]\nsegment_bytes = 4194304\n\
         [cluster]\nlink_queue_bytes_max = 262144\nsuspect_timeout_ms = 10000\n",
    );
    let env = [("SHARDMQ_CONFIG", config.to_str().unwrap())];
    let [a, b, c] = three_nodes_env(&dir, &env);
    // A SUBACK waits until every node can route the subscription.
    let big = |addr, id| {
        let mut o = options(addr, id);
        o.set_max_packet_size(64 << 10, 64 << 10);
        o
    };
    let mut sub = connect(big(b.addr, "sub-b")).await;
    sub.subscribe("big/#", QoS::AtLeastOnce).await;
    let mut publisher = connect(big(a.addr, "pub-a")).await;
    const N: usize = 2000;
    let publishing = tokio::spawn(async move {
        let payload = vec![7u8; 16 << 10];
        for i in 0..N {
            publisher
                .publish(&format!("big/{i}"), QoS::AtLeastOnce, false, &payload)
                .await;
        }
        for _ in 0..N {
            publisher.puback().await;
        }
    });
    let first = sub.next_publish().await;
    assert_eq!(&*first.topic, "big/0");
    let pid = b.pid().unwrap();
    common::child::sigstop_and_wait(pid);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    common::child::signal(pid, libc::SIGCONT);
    expect_topics(&mut sub, "big", 1..N, &a).await;
    publishing.await.unwrap();
    assert_eq!(
        metric_sum(&a, "shardmq_cluster_messages_dropped_total"),
        0,
        "nothing dropped:\n{}",
        a.log_text()
    );
    assert!(metric_sum(&a, "shardmq_cluster_link_pauses_total") > 0);
    drop((a, b, c));
}

/// With `power_safe` logs, a node confirms a message to its peer once
/// its log is synced (a power cut there must not lose what the publisher
/// was told is safe): 300 QoS 1 messages from a to a persistent
/// subscriber on b all arrive and are acknowledged, every acknowledgement
/// because b confirmed the message (none after the 10 s wait), and b
/// counts confirmations that waited for its sync; every node's standby
/// answered for its copy of the node's log after syncing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_safe_nodes_confirm_messages_once_their_log_is_synced() {
    use client::v3::{connect, options, QoS};
    let dir = temp_dir("cluster-power-safe");
    let env = [("SHARDMQ_DURABILITY", "power_safe")];
    let [a, b, c] = three_nodes_env(&dir, &env);
    // A persistent session: its deliveries are logged.
    let mut o = options(b.addr, "sub-b");
    o.set_clean_session(false);
    let mut sub = connect(o).await;
    sub.subscribe("ps/#", QoS::AtLeastOnce).await;
    let mut publisher = connect(options(a.addr, "pub-a")).await;
    for i in 0..300 {
        publisher
            .publish(&format!("ps/{i}"), QoS::AtLeastOnce, false, b"x")
            .await;
    }
    expect_topics(&mut sub, "ps", 0..300, &a).await;
    for _ in 0..300 {
        publisher.puback().await;
    }
    assert_eq!(
        metric_sum(&a, "shardmq_cluster_acks_unconfirmed_total"),
        0,
        "every acknowledgement waited for b's confirmation:\n{}",
        a.log_text()
    );
    assert!(metric_sum(&b, "shardmq_cluster_confirms_after_sync_total") > 0);
    // Each node's standby answers for its copy after syncing it too.
    for n in [&a, &b, &c] {
        assert!(metric_sum(n, "shardmq_cluster_log_copy_syncs_total") > 0);
    }
    drop((a, b, c));
}

/// One live connection per client id in the cluster: a client id that
/// connects on another node takes the first connection over (5.0:
/// DISCONNECT 0x8E), and the later one works. The node that closed it
/// counts it, and shows its links, in its metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_connecting_on_another_node_takes_the_first_connection_over() {
    use client::v5::{connect, options, QoS};
    use shardmq::codec::{reason, Version};
    let dir = temp_dir("cluster-claims");
    let [a, b, c] = three_nodes(&dir);
    let (mut first, ack) = common::Raw::connect(a.addr, Version::V5, "twin", true);
    assert_eq!(ack.reason, 0);
    let mut second = connect(options(b.addr, "twin")).await;
    let closed = tokio::task::spawn_blocking(move || first.expect_close())
        .await
        .unwrap();
    assert_eq!(closed, Some(reason::SESSION_TAKEN_OVER));
    wait_log(&a, "cluster: client \"twin\" connected on node \"b\"", 30);
    second.subscribe("tw/t", QoS::AtLeastOnce).await;
    let mut publisher = connect(options(c.addr, "pub")).await;
    publisher
        .publish_props_acked("tw/t", b"second works", Default::default())
        .await;
    assert_eq!(&second.next_publish().await.payload[..], b"second works");
    assert_eq!(metric_sum(&a, "shardmq_cluster_takeovers_total{"), 1);
    assert_eq!(metric_sum(&b, "shardmq_cluster_takeovers_total{"), 0);
    // 2 shards, each linked to both peers.
    let out = "shardmq_cluster_links{shard=";
    let links: Vec<String> = common::http(a.http_addr(), "GET", "/metrics", "", "")
        .1
        .lines()
        .filter(|l| l.starts_with(out) && l.contains("direction=\"out\""))
        .map(str::to_string)
        .collect();
    assert_eq!(links.len(), 2, "{links:?}");
    assert!(links.iter().all(|l| l.ends_with(" 2")), "{links:?}");
    assert_eq!(metric_sum(&a, "shardmq_cluster_messages_dropped_total{"), 0);
    drop((second, publisher, a, b, c));
    let _ = std::fs::remove_dir_all(&dir);
}

/// One session per client id in the cluster: a persistent session
/// follows its client to another node. A QoS 1 subscriber on a goes
/// away; 100 messages published on c wait in its session there; it
/// connects on b: Session Present, all 100 in order, and the
/// subscription works from b. Back on a, the session moves back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_follows_its_client_to_another_node() {
    use shardmq::codec::{PubResp, QoS, Version};
    let dir = temp_dir("cluster-move");
    let [a, b, c] = three_nodes(&dir);
    let v = Version::V3_1_1;
    let (mut sub, ack) = common::Raw::connect(a.addr, v, "mover", false);
    assert!(!ack.session_present);
    sub.subscribe(1, "mv/#", QoS::AtLeastOnce);
    drop(sub);
    let mut publisher = client::v3::connect(client::v3::options(c.addr, "pub-c")).await;
    for i in 0..100 {
        publisher
            .publish_acked(&format!("mv/{i}"), false, format!("m{i}").as_bytes())
            .await;
    }
    fn take(sub: &mut common::Raw, want: &str) {
        let p = sub.recv_publish();
        assert_eq!(&p.payload[..], want.as_bytes());
        sub.send(&shardmq::codec::Packet::PubAck(PubResp {
            packet_id: p.packet_id,
            reason: 0,
            properties: Default::default(),
        }));
    }
    let addr = b.addr;
    let mut sub = tokio::task::spawn_blocking(move || {
        let (mut sub, ack) = common::Raw::connect(addr, v, "mover", false);
        assert!(ack.session_present, "the session came from a");
        for i in 0..100 {
            take(&mut sub, &format!("m{i}"));
        }
        sub
    })
    .await
    .unwrap();
    wait_log(
        &a,
        "cluster: client \"mover\" connected on node \"b\": its session moves there (100 deliveries)",
        10,
    );
    assert_eq!(
        metric_sum(&a, "shardmq_cluster_sessions_moved_out_total{"),
        1
    );
    assert_eq!(
        metric_sum(&b, "shardmq_cluster_sessions_moved_in_total{"),
        1
    );
    assert_eq!(
        metric_sum(&b, "shardmq_cluster_move_deliveries_lost_total{"),
        0
    );
    publisher.publish_acked("mv/after", false, b"after").await;
    let sub = tokio::task::spawn_blocking(move || {
        take(&mut sub, "after");
        sub
    })
    .await
    .unwrap();
    drop(sub);
    publisher.publish_acked("mv/back", false, b"back").await;
    let addr = a.addr;
    tokio::task::spawn_blocking(move || {
        let (mut sub, ack) = common::Raw::connect(addr, v, "mover", false);
        assert!(ack.session_present, "the session came back from b");
        take(&mut sub, "back");
        sub.expect_silence(Duration::from_millis(500));
    })
    .await
    .unwrap();
    assert_eq!(
        metric_sum(&a, "shardmq_cluster_sessions_moved_in_total{"),
        1
    );
    drop((publisher, a, b, c));
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a node acknowledges is in its standby's log too (`cluster.replicas
/// = 2`, the default): a's log is copied to b (the next name), and a
/// QoS 1 PUBACK waits until b holds the records: while b is stopped
/// (SIGSTOP) none comes, and it comes once b runs again. Node a is killed
/// right after 300 messages for an offline persistent session there were
/// acknowledged; once a is declared down, b takes its sessions over from
/// that copy, and the client, connecting to c, resumes its session with
/// every one of them, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_node_acknowledged_is_in_its_standbys_copy_of_its_log() {
    use client::v3::{connect, options, QoS};
    let dir = temp_dir("cluster-replica");
    let [mut a, b, c] = three_nodes(&dir);
    let mut o = options(a.addr, "kept");
    o.set_clean_session(false);
    let mut sub = connect(o).await;
    sub.subscribe("rep/#", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let mut publisher = connect(options(a.addr, "pub-a")).await;
    for i in 0..300 {
        publisher
            .publish_acked(&format!("rep/{i}"), false, format!("m{i}").as_bytes())
            .await;
    }
    // Under load (the whole suite at once) b may still be catching up
    // here, and a's acknowledgements not yet waiting for it.
    wait_standbys_waited(&a).await;
    let b_pid = b.pid().unwrap();
    common::child::sigstop_and_wait(b_pid);
    publisher
        .publish("rep/300", QoS::AtLeastOnce, false, b"m300")
        .await;
    let early = publisher.puback_within(Duration::from_millis(700)).await;
    common::child::signal(b_pid, libc::SIGCONT);
    assert!(
        !early,
        "a PUBACK while the standby could not hold the message"
    );
    assert!(publisher.puback_within(Duration::from_secs(8)).await);
    a.kill9();
    assert_eq!(
        metric_sum(&b, "shardmq_cluster_log_copies{"),
        2,
        "{}",
        b.log_text()
    );
    assert_eq!(
        metric_sum(&b, "shardmq_cluster_log_chunks_refused_total{"),
        0
    );
    wait_log(
        &b,
        "cluster: node \"a\" is down: this node takes over its sessions",
        15,
    );
    // The line comes as the takeover starts; the count once it is done.
    let adopted = "shardmq_cluster_sessions_adopted_total{";
    wait_metric(&b, adopted, 1, 15, "no session adopted").await;
    assert_eq!(metric_sum(&b, "shardmq_cluster_sessions_adopted_total{"), 1);
    let mut o = options(c.addr, "kept");
    o.set_clean_session(false);
    let mut sub = connect(o).await;
    for i in 0..=300 {
        let p = sub.next_publish_within(Duration::from_secs(10)).await;
        assert_eq!(
            &p.payload[..],
            format!("m{i}").as_bytes(),
            "message {i} from the copy"
        );
    }
    drop((publisher, sub, b, c));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client that connects with Clean Start on another node ends the
/// session it had on the first, as a Clean Start there would: coming back
/// to the first node finds no session.
#[test]
fn a_clean_start_on_another_node_ends_the_session_on_the_first() {
    use shardmq::codec::{QoS, Version};
    let dir = temp_dir("cluster-clean");
    let [a, b, c] = three_nodes(&dir);
    let (mut first, ack) = common::Raw::connect(a.addr, Version::V3_1_1, "roamer", false);
    assert!(!ack.session_present);
    first.subscribe(1, "cs/t", QoS::AtLeastOnce);
    drop(first);
    let (on_b, ack) = common::Raw::connect(b.addr, Version::V3_1_1, "roamer", true);
    assert!(!ack.session_present);
    wait_log(
        &a,
        "cluster: client \"roamer\" started clean on node \"b\": its session here is discarded",
        10,
    );
    assert_eq!(
        metric_sum(&a, "shardmq_cluster_sessions_discarded_total{"),
        1
    );
    drop(on_b);
    let (_back, ack) = common::Raw::connect(a.addr, Version::V3_1_1, "roamer", false);
    assert!(!ack.session_present, "the session on a ended");
    drop((a, b, c));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Measured, not asserted (run with `--ignored`): how long a node that
/// joins takes to hold the cluster's retained messages. 100,000 retained
/// messages of 64 bytes are stored on a; b starts and joins; a subscriber
/// on b to `#` is asked again until it gets all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_how_fast_a_joining_node_gets_the_retained_messages() {
    use client::v3::{connect, options, QoS};
    const N: usize = 100_000;
    let dir = temp_dir("cluster-retained-sync");
    let a = node("a", &dir, 0, &[]);
    let pa = membership_port(&a);
    let mut publisher = connect(options(a.addr, "pub")).await;
    for i in 0..N {
        let topic = format!("m/{}/{}", i % 100, i);
        publisher
            .publish(&topic, QoS::AtMostOnce, true, &[b'x'; 64])
            .await;
    }
    publisher
        .publish_acked("m/last", true, b"after the others")
        .await;
    wait_retained(a.addr, "m/last", Some(b"after the others")).await;
    let started = Instant::now();
    let b = node("b", &dir, 0, &[pa]);
    wait_log(&b, "1 peers up", 30);
    let mut tries = 0;
    loop {
        tries += 1;
        let mut c = connect(options(b.addr, "counter")).await;
        c.subscribe("m/#", QoS::AtMostOnce).await;
        let mut n = 0;
        while c
            .try_next_publish(Duration::from_millis(300))
            .await
            .is_some()
        {
            n += 1;
        }
        c.disconnect().await;
        if n > N {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{n} after 2 min"
        );
    }
    eprintln!(
        "cluster: a joining node held {} retained messages {} ms after it started ({tries} reads)",
        N + 1,
        started.elapsed().as_millis()
    );
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A node killed and restarted at once: the peers publish its client's
/// will (after its delay) to their subscribers, and the restarted node,
/// whose log kept the client's session and its will, publishes it to its
/// own subscribers only; every subscriber gets it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_nodes_recovered_will_goes_to_its_own_subscribers_only() {
    use client::v5::{connect, options, set_session_expiry, will, QoS};
    let dir = temp_dir("cluster-will-restart");
    let a = node("a", &dir, 0, &[]);
    let pa = membership_port(&a);
    let mut c = node("c", &dir, 0, &[pa]);
    let pc = membership_port(&c);
    for n in [&a, &c] {
        wait_log(n, "1 peers up", 30);
        for shard in 0..2 {
            let peer = if std::ptr::eq(n, &a) { "c" } else { "a" };
            let line = format!("shard {shard}: link to node \"{peer}\" (its shard {shard}) is up");
            wait_log(n, &line, 30);
        }
    }
    let mut sub_a = connect(options(a.addr, "sub-a")).await;
    sub_a.subscribe("will/#", QoS::AtLeastOnce).await;
    // A persistent subscriber on c, offline while c restarts.
    let persistent = |addr, id: &str| {
        let mut o = options(addr, id);
        o.set_clean_start(false);
        set_session_expiry(&mut o, 300);
        o
    };
    let mut sub_c = connect(persistent(c.addr, "sub-c")).await;
    sub_c.subscribe("will/#", QoS::AtLeastOnce).await;
    sub_c.disconnect().await;
    // A persistent client on c whose will waits 4 s.
    let mut o = persistent(c.addr, "dev");
    o.set_last_will(will("will/dev", b"dev gone", false, Some(4)));
    let dev = connect(o).await;
    dev.client
        .publish("will/sync", QoS::AtLeastOnce, false, "dev")
        .await
        .unwrap();
    assert_eq!(&sub_a.next_publish().await.payload[..], b"dev");

    c.kill9();
    drop(dev);
    let c = node("c", &dir, pc, &[pa]);
    wait_log(&c, "node \"c\" incarnation 2,", 30);
    let p = sub_a.next_publish_within(Duration::from_secs(30)).await;
    assert_eq!(
        (&p.topic[..], &p.payload[..]),
        (&b"will/dev"[..], &b"dev gone"[..])
    );
    // c's own publication of the recovered will reaches no other node.
    tokio::time::sleep(Duration::from_secs(5)).await;
    sub_a.expect_no_publish().await;
    let mut sub_c = connect(persistent(c.addr, "sub-c")).await;
    // What it missed while offline: the sync message, then the will.
    let p = sub_c.next_publish_within(Duration::from_secs(30)).await;
    assert_eq!(&p.topic[..], b"will/sync");
    let p = sub_c.next_publish_within(Duration::from_secs(30)).await;
    assert_eq!(
        (&p.topic[..], &p.payload[..]),
        (&b"will/dev"[..], &b"dev gone"[..])
    );
    sub_c.expect_no_publish().await;
    drop((sub_a, sub_c, a, c));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A network namespace of the calling thread's own (processes it starts
/// inherit it), with its loopback up: nodes on 127.0.0.11, .12 and .13
/// use fixed ports there, and iptables rules there cut them apart.
fn enter_own_network_namespace() {
    // SAFETY: unshare(2) only changes the calling thread's namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "the partition test makes a network namespace of its own and needs root \
         (CAP_SYS_ADMIN): {}",
        std::io::Error::last_os_error()
    );
    run(&["ip", "link", "set", "lo", "up"]);
}

fn run(args: &[&str]) {
    let status = std::process::Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap_or_else(|e| {
            panic!("{args:?}: {e} (the partition test needs iproute2 and iptables)")
        });
    assert!(status.success(), "{args:?}: {status}");
}

/// Cut (iptables DROP, both ways) every packet between `x` and each of
/// `others`.
fn cut(x: &str, others: &[&str]) {
    for o in others {
        for (s, d) in [(x, *o), (*o, x)] {
            run(&["iptables", "-A", "INPUT", "-s", s, "-d", d, "-j", "DROP"]);
        }
    }
}

/// Node `name` of 2 shards on loopback address `ip`: clients on port
/// 1883, membership on 7946, bridge links on 7946-7947; joining `join`.
fn node_on(name: &str, dir: &std::path::Path, ip: &str, join: &str) -> ChildBroker {
    start_node(
        name,
        dir,
        &format!("{ip}:1883"),
        &format!("{ip}:7946"),
        join,
    )
}

/// Wait (at most `secs`) until `needle` is in the broker's log `n`
/// times.
fn wait_log_count(b: &ChildBroker, needle: &str, n: usize, secs: u64) -> Duration {
    let start = Instant::now();
    while b.log_text().matches(needle).count() < n {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "not {n} × {needle:?} in the log within {secs} s:\n{}",
            b.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

/// A partition, made with iptables in a network namespace the test
/// creates, cuts node c off from a and b. The majority side (a, b) keeps
/// full service; c, alone, refuses new CONNECTs (5.0: 0x88; 3.1.1: return
/// code 3; counted) and keeps serving the clients it had. A client id
/// that connected again on the majority side meanwhile has two
/// connections until the heal, when the older one (on c) is closed with
/// 0x8E. The cluster heals by itself once the rules are gone. The admin
/// API shows the members and forgets a down one.
#[test]
fn a_partitioned_minority_refuses_new_clients_and_the_cluster_heals() {
    // On a thread of its own: the namespace (and its iptables rules) goes
    // with the thread and the processes it started, whatever happens.
    let run = std::thread::spawn(partition_and_heal);
    if let Err(panic) = run.join() {
        std::panic::resume_unwind(panic);
    }
}

fn partition_and_heal() {
    use shardmq::codec::{reason, Packet, QoS, Version};
    enter_own_network_namespace();
    let dir = temp_dir("cluster-partition");
    let a = node_on("a", &dir, "127.0.0.11", "");
    let b = node_on("b", &dir, "127.0.0.12", "127.0.0.11:7946");
    let c = node_on("c", &dir, "127.0.0.13", "127.0.0.11:7946");
    wait_links(&a, &b, &c);
    wait_file(&dir.join("c/MEMBERS"), "shardmq-members 1\nc\na\nb\n");

    // Clients on c before the partition: a subscriber, a publisher and
    // the first connection of "twin". A subscriber on a.
    let (mut sub_c, _) = common::Raw::connect(c.addr, Version::V5, "sub-c", true);
    sub_c.subscribe(1, "p/#", QoS::AtLeastOnce);
    let (mut pub_c, _) = common::Raw::connect(c.addr, Version::V5, "pub-c", true);
    let (mut twin_c, _) = common::Raw::connect(c.addr, Version::V5, "twin", true);
    let (mut sub_a, _) = common::Raw::connect(a.addr, Version::V5, "sub-a", true);
    sub_a.subscribe(1, "p/#", QoS::AtLeastOnce);
    common::raw::publish_qos1(&mut pub_c, "p/before", b"before", 1);
    for s in [&mut sub_c, &mut sub_a] {
        assert_eq!(&s.recv_publish().payload[..], b"before");
    }

    cut("127.0.0.13", &["127.0.0.11", "127.0.0.12"]);
    let cut_at = Instant::now();
    wait_log(&c, "not a majority: new connections are refused", 30);
    println!("c refuses new clients {:?} after the cut", cut_at.elapsed());
    wait_log(
        &a,
        "node \"c\" at 127.0.0.13:7946 (incarnation 1) is down",
        30,
    );
    wait_log(
        &b,
        "node \"c\" at 127.0.0.13:7946 (incarnation 1) is down",
        30,
    );

    // The minority refuses new clients, 5.0 and 3.1.1 (each shard hears
    // of it within its bridge's next tick, 50 ms: each is tried until
    // refused, and the refusals counted) ...
    let mut refusals = 0;
    let mut tries = 0;
    let mut refused = |version: Version, id: &str| {
        tries += 1;
        assert!(tries < 100, "c still takes new clients");
        let mut raw = common::Raw::open(c.addr, version);
        raw.send(&Packet::Connect(Box::new(common::connect_packet(
            version, id, true,
        ))));
        let mut connack = [0u8; 4];
        raw.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        std::io::Read::read_exact(&mut raw.stream, &mut connack).unwrap();
        // 5.0: reason 0x88 (with or without properties); 3.1.1: return
        // code 3.
        let no = match version {
            Version::V5 => connack[0] == 0x20 && connack[2..] == [0, reason::SERVER_UNAVAILABLE],
            _ => connack == [0x20, 2, 0, 3],
        };
        refusals += u64::from(no);
        no
    };
    while !refused(Version::V5, "new-on-c") {
        std::thread::sleep(Duration::from_millis(20));
    }
    while !refused(Version::V3_1_1, "old-on-c") {
        std::thread::sleep(Duration::from_millis(20));
    }
    // ... and serves the ones it has.
    common::raw::publish_qos1(&mut pub_c, "p/during", b"on c", 2);
    assert_eq!(&sub_c.recv_publish().payload[..], b"on c");
    let (status, view) = get_json(c.http_addr(), "/api/v1/cluster");
    assert_eq!(status, 200);
    assert_eq!(
        (&view["members"], &view["members_up"], &view["majority"]),
        (&3.into(), &1.into(), &false.into()),
        "{view}"
    );
    let metrics = common::http(c.http_addr(), "GET", "/metrics", "", "").1;
    let refused: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("shardmq_connects_refused_total{") && l.contains("minority"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(refused, refusals, "{metrics}");
    assert!(
        metrics.contains("shardmq_cluster_refusing_connects 1"),
        "{metrics}"
    );

    // The majority serves new clients; "twin" connects again there.
    let (mut twin_a, ack) = common::Raw::connect(a.addr, Version::V5, "twin", true);
    assert_eq!(ack.reason, 0);
    let (mut pub_b, ack) = common::Raw::connect(b.addr, Version::V5, "pub-b", true);
    assert_eq!(ack.reason, 0);
    common::raw::publish_qos1(&mut pub_b, "p/majority", b"on b", 1);
    assert_eq!(&sub_a.recv_publish().payload[..], b"on b");
    // The API: c is down on a; a member that is up, or unknown, stays.
    let (status, view) = get_json(a.http_addr(), "/api/v1/cluster");
    assert_eq!((status, &view["majority"]), (200, &true.into()), "{view}");
    let forget = |name: &str| {
        let path = format!("/api/v1/cluster/members/{name}");
        common::http(a.http_addr(), "DELETE", &path, "", "").0
    };
    assert_eq!(forget("b"), 409);
    assert_eq!(forget("zz"), 404);

    // Heal.
    run(&["iptables", "-F", "INPUT"]);
    let healed_at = Instant::now();
    wait_log(&c, "members up: new connections are served again", 30);
    for (n, peer) in [(&a, "c"), (&b, "c"), (&c, "a"), (&c, "b")] {
        for shard in 0..2 {
            let line = format!("shard {shard}: link to node \"{peer}\" (its shard {shard}) is up");
            wait_log_count(n, &line, 2, 30);
        }
    }
    println!(
        "healed (c serves new clients, every link up again) {:?} after the rules went",
        healed_at.elapsed()
    );
    // The older "twin" (on c) is closed; the one on a stays.
    assert_eq!(twin_c.expect_close(), Some(reason::SESSION_TAKEN_OVER));
    twin_a.expect_silence(Duration::from_millis(200));
    let (_, ack) = common::Raw::connect(c.addr, Version::V5, "new-on-c", true);
    assert_eq!(ack.reason, 0);
    common::raw::publish_qos1(&mut pub_c, "p/after", b"after", 3);
    for s in [&mut sub_c, &mut sub_a] {
        assert_eq!(&s.recv_publish().payload[..], b"after");
    }

    // Forgetting: c stopped for good is forgotten on a.
    drop(c);
    wait_log_count(
        &a,
        "node \"c\" at 127.0.0.13:7946 (incarnation 1) is down",
        2,
        30,
    );
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardmq"))
            .args(["ctl", "--http", &a.http_addr().to_string(), "cluster"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    assert_eq!(ctl(&["--forget", "c"])["forgotten"], "c");
    let view = ctl(&[]);
    assert_eq!(
        (&view["members"], &view["members_up"]),
        (&2.into(), &2.into()),
        "{view}"
    );
    wait_file(&dir.join("a/MEMBERS"), "shardmq-members 1\na\nb\n");
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Wait (at most 10 s) until `path` holds `text` (a MEMBERS file is
/// written on a thread of its own, soon after the change).
fn wait_file(path: &std::path::Path, text: &str) {
    let start = Instant::now();
    loop {
        let now = std::fs::read_to_string(path).unwrap_or_default();
        if now == text {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{path:?} holds {now:?}, not {text:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn get_json(addr: std::net::SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let (status, text) = common::http(addr, "GET", path, "", "");
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    (status, v)
}

/// Publish QoS 1 messages `first..` on `addr` as client `id` (a clean
/// session, 100 in flight, about 10,000 a second at most) until the connection ends: the ids the broker
/// acknowledged (the broker acknowledges in the order it got them, so the
/// k-th PUBACK is the k-th message), counted in `acks` as they come; None
/// when the CONNECT was refused or failed.
async fn publish_until_closed(
    addr: std::net::SocketAddr,
    id: &str,
    first: u64,
    acks: &std::sync::atomic::AtomicU64,
) -> Option<Vec<u64>> {
    use rumqttc::{AsyncClient, ConnectReturnCode, Event, Packet, QoS};
    use std::sync::atomic::Ordering;
    let mut o = client::v3::options(addr, id);
    o.set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(o, 100);
    let producer = tokio::spawn(async move {
        for i in first.. {
            // At most about 10,000 a second, so that the load (debug
            // builds, 2 cores) does not stall membership.
            if i % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let payload = i.to_string().into_bytes();
            if client
                .publish("k/x", QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut acked = Vec::new();
    let mut connected = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(a))) => {
                if a.code != ConnectReturnCode::Success {
                    break;
                }
                connected = true;
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                acked.push(first + acked.len() as u64);
                acks.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    producer.abort();
    connected.then_some(acked)
}

/// A QoS 1 publisher `id` on node `addr` from message number `first`,
/// connecting again while refused (30 s at most) until the flag returned
/// is set: the counter of its acknowledgements, that flag, and the task,
/// which ends with the numbers acknowledged on the connection that ended.
#[allow(clippy::type_complexity)]
fn spawn_publisher(
    addr: std::net::SocketAddr,
    id: &'static str,
    first: u64,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicU64>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<Vec<u64>>,
) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let acks = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (count, stopped) = (acks.clone(), stop.clone());
    let task = tokio::spawn(async move {
        let start = Instant::now();
        loop {
            if let Some(got) = publish_until_closed(addr, id, first, &count).await {
                return got;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{addr} took no CONNECT"
            );
            if stopped.load(Ordering::Relaxed) {
                return Vec::new();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    (acks, stop, task)
}

/// Wait until `acks` counts `n` (30 s at most).
async fn wait_acks(acks: &std::sync::atomic::AtomicU64, n: u64) {
    let start = Instant::now();
    while acks.load(std::sync::atomic::Ordering::Relaxed) < n {
        assert!(start.elapsed() < Duration::from_secs(30), "no PUBACK");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Node a, where the publisher is, is killed with SIGKILL under QoS 1
/// load, 20 times, and comes back each time (a node without the routes
/// of every peer it sees up refuses CONNECTs: the publisher tries again).
/// The subscribers are on b and c (persistent sessions, one ordinary
/// subscriber on each and a shared group with a member on each): every
/// message a acknowledged reached both ordinary subscribers and one
/// member of the group. A PUBACK for a message with subscribers on other
/// nodes waits until those nodes confirm they have it, so the publisher's
/// node can die at any moment without taking an acknowledged message with
/// it. (The subscribers' node dying:
/// `killing_the_subscribers_node_20_times_under_qos1_loses_nothing_it_acknowledged`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_publishers_node_20_times_under_qos1_loses_nothing_it_acknowledged() {
    use std::collections::BTreeSet;
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};
    let dir = temp_dir("cluster-kill-publishers");
    let [pa, pb, pc] = [free_udp_port(), free_udp_port(), free_udp_port()];
    let mut a = node("a", &dir, pa, &[pb, pc]);
    let b = node("b", &dir, pb, &[pa]);
    let c = node("c", &dir, pc, &[pa]);
    wait_links(&a, &b, &c);
    let mut subs = Vec::new();
    for (id, at, filter) in [
        ("ord-b", b.addr, "k/#"),
        ("ord-c", c.addr, "k/#"),
        ("grp-b", b.addr, "$share/g/k/#"),
        ("grp-c", c.addr, "$share/g/k/#"),
    ] {
        use client::v3::{connect, options, QoS};
        let mut o = options(at, id);
        o.set_clean_session(false);
        let mut client = connect(o).await;
        client.subscribe(filter, QoS::AtLeastOnce).await;
        let got: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
        let seen = got.clone();
        let task = tokio::spawn(async move {
            loop {
                let p = client.next_publish_within(Duration::from_secs(3600)).await;
                let n: u64 = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
                seen.lock().unwrap().insert(n);
            }
        });
        subs.push((id, got, task));
    }
    let mut acked = Vec::new();
    for cycle in 1..=20u64 {
        let (acks, killed, publisher) = spawn_publisher(a.addr, "pub-a", cycle * 1_000_000);
        // Kill a at some moment under load: a while after its first
        // acknowledgement.
        wait_acks(&acks, 1).await;
        tokio::time::sleep(Duration::from_millis(50 + cycle * 53 % 300)).await;
        killed.store(true, Ordering::Relaxed);
        a.kill9();
        let got = tokio::time::timeout(Duration::from_secs(30), publisher)
            .await
            .expect("the publisher sees its node die")
            .unwrap();
        acked.extend(got);
        a = node("a", &dir, pa, &[pb, pc]);
        for n in [&b, &c] {
            wait_log_count(n, "restarted (incarnation", cycle as usize, 30);
        }
        wait_links(&a, &b, &c);
    }
    assert!(
        acked.len() > 1000,
        "only {} messages acknowledged",
        acked.len()
    );
    // Everything acknowledged arrives: at each ordinary subscriber, and at
    // one member of the group.
    let want: BTreeSet<u64> = acked.iter().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let missing = |ids: &[&str]| -> Vec<u64> {
            let mut have = BTreeSet::new();
            for (id, got, _) in &subs {
                if ids.contains(id) {
                    have.extend(got.lock().unwrap().iter().copied());
                }
            }
            want.difference(&have).copied().take(5).collect()
        };
        let lost = [
            ("ord-b", missing(&["ord-b"])),
            ("ord-c", missing(&["ord-c"])),
            ("the group", missing(&["grp-b", "grp-c"])),
        ];
        if lost.iter().all(|(_, m)| m.is_empty()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} messages acknowledged; lost (the first few): {lost:?}",
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "cluster: the publishers' node killed 20 times, {} messages acknowledged, none lost",
        want.len()
    );
    for (_, _, task) in subs {
        task.abort();
    }
    drop((a, b, c));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Subscriber `id` (a persistent session, `k/#` at QoS 1, subscribed on
/// its first connection) on node `addr` until its connection ends:
/// every message number it gets goes into `got`. None when it was not
/// connected (refused, or no answer); else whether its CONNACK said its
/// session was there.
async fn receive_until_closed(
    addr: std::net::SocketAddr,
    id: &str,
    subscribe: bool,
    got: &std::sync::Mutex<std::collections::BTreeSet<u64>>,
) -> Option<bool> {
    use rumqttc::{AsyncClient, ConnectReturnCode, Event, Packet, QoS};
    let mut o = client::v3::options(addr, id);
    o.set_clean_session(false);
    let (client, mut eventloop) = AsyncClient::new(o, 100);
    let mut present = None;
    loop {
        let polled = tokio::time::timeout(Duration::from_secs(20), eventloop.poll()).await;
        match polled {
            Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) => {
                if a.code != ConnectReturnCode::Success {
                    return None;
                }
                present = Some(a.session_present);
                if subscribe {
                    let _ = client.subscribe("k/#", QoS::AtLeastOnce).await;
                }
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let n: u64 = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
                got.lock().unwrap().insert(n);
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return present,
        }
    }
}

/// The node holding a persistent subscriber's session (and its publisher)
/// is killed with SIGKILL under QoS 1 load, 20 times. Each time the
/// subscriber connects again to a survivor (the node next after the dead
/// one, which takes its sessions over from its copy of the dead node's
/// log, or the third, to which the session then moves), tried again while
/// refused, and the dead node starts again. The subscriber's session is
/// present every time, and every message a node acknowledged reached it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_subscribers_node_20_times_under_qos1_loses_nothing_it_acknowledged() {
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    let dir = temp_dir("cluster-kill-subscribers");
    let names = ["a", "b", "c"];
    let ports = [free_udp_port(), free_udp_port(), free_udp_port()];
    let join = |i: usize| -> Vec<u16> { (0..3).filter(|&j| j != i).map(|j| ports[j]).collect() };
    let mut nodes: Vec<ChildBroker> = (0..3)
        .map(|i| node(names[i], &dir, ports[i], &join(i)))
        .collect();
    wait_links(&nodes[0], &nodes[1], &nodes[2]);
    // The subscriber, on whichever node `target` names.
    let got: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let target = Arc::new(Mutex::new(nodes[0].addr));
    let (told_gone, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let subscriber = {
        let (got, target, told_gone, stop) =
            (got.clone(), target.clone(), told_gone.clone(), stop.clone());
        tokio::spawn(async move {
            let mut subscribed = false;
            while !stop.load(Ordering::Relaxed) {
                let addr = *target.lock().unwrap();
                match receive_until_closed(addr, "sub", !subscribed, &got).await {
                    Some(present) => {
                        if subscribed && !present {
                            told_gone.fetch_add(1, Ordering::Relaxed);
                        }
                        subscribed = true;
                    }
                    None => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
    };
    let mut acked = Vec::new();
    let mut at = 0;
    let mut down_seen = [[0usize; 3]; 3];
    for cycle in 1..=20u64 {
        wait_standbys_waited(&nodes[at]).await;
        let (acks, killed, publisher) = spawn_publisher(nodes[at].addr, "pub", cycle * 1_000_000);
        wait_acks(&acks, 100).await;
        tokio::time::sleep(Duration::from_millis(50 + cycle * 53 % 300)).await;
        // Next: the node after it by name (which takes the sessions over)
        // or the third (the session moves there from the first).
        let next = (at + 1 + usize::from(cycle % 2 == 0)) % 3;
        *target.lock().unwrap() = nodes[next].addr;
        killed.store(true, Ordering::Relaxed);
        nodes[at].kill9();
        let got_acked = tokio::time::timeout(Duration::from_secs(30), publisher)
            .await
            .expect("the publisher sees its node die")
            .unwrap();
        acked.extend(got_acked);
        // Declared down by both survivors, then started again.
        for s in (0..3).filter(|&s| s != at) {
            down_seen[s][at] += 1;
            let who = format!("cluster: node \"{}\" at ", names[at]);
            let start = Instant::now();
            while (nodes[s].log_text().lines())
                .filter(|l| l.contains(&who) && l.contains(") is down; "))
                .count()
                < down_seen[s][at]
            {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "{} not declared down on {}:\n{}",
                    names[at],
                    names[s],
                    nodes[s].log_text()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        nodes[at] = node(names[at], &dir, ports[at], &join(at));
        // Its log starts again.
        down_seen[at] = [0; 3];
        wait_links(&nodes[0], &nodes[1], &nodes[2]);
        at = next;
    }
    assert!(
        acked.len() > 2000,
        "only {} messages acknowledged",
        acked.len()
    );
    let want: BTreeSet<u64> = acked.iter().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let missing: Vec<u64> = want
            .difference(&got.lock().unwrap())
            .copied()
            .take(5)
            .collect();
        if missing.is_empty() {
            break;
        }
        let adopted: Vec<u64> = (nodes.iter())
            .map(|n| metric_sum(n, "shardmq_cluster_sessions_adopted_total{"))
            .collect();
        assert!(
            Instant::now() < deadline,
            "{} acknowledged; lost (the first few): {missing:?}; sessions adopted since the \
             last starts: {adopted:?}",
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        told_gone.load(Ordering::Relaxed),
        0,
        "a CONNACK said the session was gone"
    );
    eprintln!(
        "cluster: the subscriber's node killed 20 times, {} messages acknowledged, none lost",
        want.len()
    );
    stop.store(true, Ordering::Relaxed);
    subscriber.abort();
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}
