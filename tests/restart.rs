//! A restart always comes back: the broker stopped by SIGTERM or killed
//! with SIGKILL starts again at once on the same port and data directory;
//! a second broker on a port or data directory in use is refused; SIGTERM
//! is an orderly stop that loses nothing acknowledged.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::child::{temp_dir, ChildBroker};
use common::*;
use shardmq::codec::{Packet, QoS, Version};

/// A loopback address with a port nobody listens on now.
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Read until the broker closes; the DISCONNECT reason if one came, and
/// the payloads of the publishes before it.
fn read_to_close(c: &mut Raw) -> (Option<u8>, Vec<String>) {
    let (mut reason, mut payloads) = (None, Vec::new());
    loop {
        match c.recv() {
            None => return (reason, payloads),
            Some(Packet::Disconnect(d)) => reason = Some(d.reason),
            Some(Packet::Publish(p)) => {
                payloads.push(String::from_utf8_lossy(&p.payload).into_owned())
            }
            Some(other) => panic!("expected publishes and a close, got {other:?}"),
        }
    }
}

/// Receive publishes, acknowledging each, until every payload in
/// `expected` came (redeliveries of earlier ones may come too); panics with
/// what is missing after the wait.
fn collect(c: &mut Raw, expected: &BTreeSet<String>) -> BTreeSet<String> {
    let mut got = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !expected.is_subset(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv_within(left) {
            Ok(Some(Packet::Publish(p))) => {
                if p.qos != QoS::AtMostOnce {
                    c.send(&raw::puback(p.packet_id));
                }
                got.insert(String::from_utf8_lossy(&p.payload).into_owned());
            }
            other => panic!(
                "missing {:?} (got {other:?})",
                expected.difference(&got).collect::<Vec<_>>()
            ),
        }
    }
    got
}

#[test]
fn fifty_restarts_on_one_port_all_listen_at_once_and_serve() {
    let addr = free_addr();
    let dir = temp_dir("restart-fifty");
    let data = dir.to_str().unwrap();
    let mut kills = 0;
    for cycle in 0..50 {
        let t0 = Instant::now();
        let started = Instant::now();
        let mut b = ChildBroker::try_start_on(&addr, &["--shards", "2", "--data-dir", data])
            .unwrap_or_else(|log| panic!("cycle {cycle}: the broker did not start:\n{log}"));
        let took = started.elapsed();
        // The previous run's sockets closed while this one waited for them
        // (a wall-clock bound would measure the machine's load, not this).
        let log = b.log_text();
        assert!(
            !log.contains("serving anyway") && !log.contains("retrying the bind"),
            "cycle {cycle}: the previous run's sockets were in the way:\n{log}"
        );
        // A persistent subscriber resumes its session every cycle, so every
        // start recovers it (and its subscription) from the log.
        let (mut sub, ack) = Raw::connect_with(b.addr, v5_connect("restart-sub", false, 3600));
        assert_eq!(ack.reason, 0, "cycle {cycle}");
        assert_eq!(ack.session_present, cycle > 0, "cycle {cycle}");
        if cycle == 0 {
            assert_eq!(sub.subscribe(1, "restart/t", QoS::AtLeastOnce), vec![1]);
        }
        let (mut publisher, ack) = Raw::connect(b.addr, Version::V3_1_1, "restart-pub", true);
        assert_eq!(ack.reason, 0, "cycle {cycle}");
        let payload = format!("cycle-{cycle}");
        raw::publish_qos1(&mut publisher, "restart/t", payload.as_bytes(), 1);
        collect(&mut sub, &BTreeSet::from([payload]));
        // Stop with both clients connected: SIGKILL every fifth cycle.
        if cycle % 5 == 4 {
            b.kill9();
            kills += 1;
        } else {
            // Clients close when the broker has closed, as real ones do.
            b.terminate();
            assert_eq!(read_to_close(&mut sub).0, Some(0x8B), "cycle {cycle}");
            drop(sub);
            assert_eq!(read_to_close(&mut publisher), (None, vec![]));
            drop(publisher);
            b.wait_stopped();
        }
        eprintln!("cycle {cycle}: {:?} (start {took:?})", t0.elapsed());
    }
    assert_eq!(kills, 10);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The start was refused, and its log holds `needle`.
fn refused_naming(start: Result<ChildBroker, String>, needle: &str) {
    let log = start.err().expect("the second broker is refused");
    assert!(log.contains(needle), "{needle:?} in:\n{log}");
}

#[test]
fn a_second_broker_on_a_port_or_data_dir_in_use_is_refused_naming_the_holder() {
    let addr = free_addr();
    let (dir_a, dir_b) = (temp_dir("second-a"), temp_dir("second-b"));
    let first = ChildBroker::try_start_on(&addr, &["--data-dir", dir_a.to_str().unwrap()])
        .expect("the first broker starts");
    let pid = first.pid().unwrap();

    let same_port = ChildBroker::try_start_on(&addr, &["--durability", "memory"]);
    let holder = format!("held by another shardmq (pid {pid} (shardmq))");
    refused_naming(same_port, &holder);
    // Every address of the port overlaps the first's, IPv4-mapped too;
    // another address of the port does not.
    let port = addr.rsplit(':').next().unwrap();
    for every in [
        format!("0.0.0.0:{port}"),
        format!("[::ffff:0.0.0.0]:{port}"),
    ] {
        let all = ChildBroker::try_start_on(&every, &["--durability", "memory"]);
        refused_naming(all, &holder);
    }
    let other =
        ChildBroker::try_start_on(&format!("127.0.0.2:{port}"), &["--durability", "memory"])
            .expect("another address of the port is fine");
    let other_pid = other.pid().unwrap();
    drop(first);
    let all = ChildBroker::try_start_on(&format!("0.0.0.0:{port}"), &["--durability", "memory"]);
    refused_naming(all, &format!("(pid {other_pid} (shardmq))"));
    drop(other);
    let first = ChildBroker::try_start_on(&addr, &["--data-dir", dir_a.to_str().unwrap()])
        .expect("the first broker starts again");
    let pid = first.pid().unwrap();

    let same_dir = ChildBroker::try_start(&["--data-dir", dir_b.to_str().unwrap()])
        .expect("another port and directory are fine");
    drop(same_dir);
    let same_dir = ChildBroker::try_start(&["--data-dir", dir_a.to_str().unwrap()]);
    refused_naming(same_dir, &format!("in use by another shardmq (pid {pid})"));

    raw::assert_round_trip(first.addr, "first-sub", "first-pub", "still/first");
    let _ = std::fs::remove_dir_all(&dir_a);
    let _ = std::fs::remove_dir_all(&dir_b);
}

#[test]
fn sigterm_sends_0x8b_and_every_acknowledged_message_is_delivered_after_the_restart() {
    for mode in ["kill_safe", "power_safe"] {
        let addr = free_addr();
        let dir = temp_dir(&format!("sigterm-keeps-{mode}"));
        let args = [
            "--shards",
            "2",
            "--durability",
            mode,
            "--data-dir",
            dir.to_str().unwrap(),
        ];
        let mut b = ChildBroker::try_start_on(&addr, &args).unwrap();
        // One persistent subscriber stays connected and does not read, one
        // is offline: both must get every acknowledged message.
        let (mut online, _) = Raw::connect_with(b.addr, v5_connect("keep-online", false, 3600));
        assert_eq!(online.subscribe(1, "keep/#", QoS::AtLeastOnce), vec![1]);
        let (mut offline, _) = Raw::connect_with(b.addr, v5_connect("keep-offline", false, 3600));
        assert_eq!(offline.subscribe(1, "keep/#", QoS::AtLeastOnce), vec![1]);
        offline.send(&Packet::Disconnect(Default::default()));
        drop(offline);
        let (mut publisher, _) = Raw::connect(b.addr, Version::V5, "keep-pub", true);
        let mut sent = BTreeSet::new();
        for i in 0..300u16 {
            let payload = format!("m{i}");
            raw::publish_qos1(
                &mut publisher,
                &format!("keep/{}", i % 7),
                payload.as_bytes(),
                i + 1,
            );
            sent.insert(payload);
        }
        b.terminate();
        assert_eq!(read_to_close(&mut publisher).0, Some(0x8B), "{mode}");
        drop(publisher);
        let (reason, _) = read_to_close(&mut online);
        assert_eq!(reason, Some(0x8B), "{mode}");
        drop(online);
        b.wait_stopped();
        let log = b.log_text();
        assert!(
            log.contains("stopped: closed 2 connections (2 sent DISCONNECT 0x8B"),
            "{mode}:\n{log}"
        );

        let b = ChildBroker::try_start_on(&addr, &args).unwrap();
        for id in ["keep-online", "keep-offline"] {
            let (mut c, ack) = Raw::connect_with(b.addr, v5_connect(id, false, 3600));
            assert!(ack.session_present, "{mode} {id}");
            collect(&mut c, &sent);
        }
        drop(b);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
