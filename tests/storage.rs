//! Durability beyond the crash test: damaged logs (a torn tail, a corrupt
//! record), a full disk, a restart with another shard count, wall-clock
//! expiry across a restart, delayed publishes, wills, compaction, power-safe
//! mode and the data directory lock. The broker runs as a child process on
//! a data directory of the test's own.
//!
//! Every wait is bounded; lower bounds on elapsed time are the only timing
//! checks (a slow machine can only make them hold more easily).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::child::{config_file, temp_dir, ChildBroker, TestDir};
use common::raw::*;
use common::*;
use shardmq::codec::{reason, Disconnect, Packet, Properties, QoS, Version, Will};
use shardmq::log::record::{read, Read};
use shardmq::log::scan::segment_files;

/// A test's directory, config and broker arguments.
struct Setup {
    /// Removed with everything in it when the setup ends.
    _dir: TestDir,
    data: PathBuf,
    config: PathBuf,
}

impl Setup {
    fn new(name: &str, extra_config: &str) -> Setup {
        let dir = temp_dir(name);
        Self::in_dir(dir, extra_config)
    }

    fn in_dir(dir: TestDir, extra_config: &str) -> Setup {
        Self::with_mqtt(dir, "", extra_config)
    }

    /// With `mqtt` added to `[mqtt]` and `storage` to `[storage]` (and any
    /// later sections).
    fn with_mqtt(dir: TestDir, mqtt: &str, storage: &str) -> Setup {
        let text = format!(
            "[mqtt]\npacket_size_max_bytes = 65536\n{mqtt}\n[storage]\nsegment_bytes = 1048576\n{storage}"
        );
        let config = config_file(&dir, &text);
        Setup {
            data: dir.join("data"),
            config,
            _dir: dir,
        }
    }

    fn args(&self, shards: usize) -> Vec<String> {
        vec![
            "--shards".into(),
            shards.to_string(),
            "--config".into(),
            self.config.display().to_string(),
            "--data-dir".into(),
            self.data.display().to_string(),
        ]
    }

    fn start(&self, shards: usize) -> ChildBroker {
        let args = self.args(shards);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ChildBroker::start(&args)
    }

    /// Log directory of `shard` in the generation in force.
    fn shard_dir(&self, shard: usize) -> PathBuf {
        let current = std::fs::read_to_string(self.data.join("CURRENT")).unwrap();
        self.data
            .join(current.trim())
            .join(format!("shard-{shard}"))
    }
}

/// A persistent session subscribed to `filter` at QoS 1, then offline.
fn offline_subscriber(b: &ChildBroker, id: &str, filter: &str) {
    let (mut s, ack) = Raw::connect_with(b.addr, v5_connect(id, true, 3600));
    assert_eq!(ack.reason, 0);
    assert_eq!(s.subscribe(1, filter, QoS::AtLeastOnce), vec![1]);
    s.send(&Packet::Disconnect(Disconnect::default()));
    assert_eq!(s.expect_close(), None);
}

/// Publish QoS 1 messages `{prefix}{i}` for i in `range` and await each
/// PUBACK.
fn publish_acked(p: &mut Raw, topic: &str, prefix: &str, range: std::ops::Range<u32>) {
    for i in range {
        publish_qos1(p, topic, format!("{prefix}{i}").as_bytes(), 1);
    }
}

/// Resume `id`'s session and collect the payloads that arrive until quiet.
fn drain(b: &ChildBroker, id: &str) -> (bool, Vec<String>) {
    let (mut s, ack) = Raw::connect_with(b.addr, v5_connect(id, false, 3600));
    assert_eq!(ack.reason, 0);
    let mut got = Vec::new();
    while let Ok(Some(p)) = s.recv_within(Duration::from_millis(700)) {
        match p {
            Packet::Publish(m) => {
                got.push(String::from_utf8(m.payload.to_vec()).unwrap());
                if m.qos != QoS::AtMostOnce {
                    s.send(&puback(m.packet_id));
                }
            }
            other => panic!("{id}: expected PUBLISH, got {other:?}"),
        }
    }
    (ack.session_present, got)
}

fn numbered(prefix: &str, range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

/// The offset after the last valid record of the last segment holding any,
/// and that segment.
fn log_end(shard_dir: &Path) -> (PathBuf, usize) {
    let mut last = None;
    for (_, path) in segment_files(shard_dir).unwrap() {
        let bytes = std::fs::read(&path).unwrap();
        let mut off = 0;
        while let Read::Record(_, next) = read(&bytes, off) {
            off = next;
        }
        if off > 0 {
            last = Some((path, off));
        }
    }
    last.expect("a log with records")
}

// ---------------------------------------------------------------------------
// Damaged logs.
// ---------------------------------------------------------------------------

#[test]
fn a_torn_tail_is_cut_and_everything_before_it_recovered() {
    let s = Setup::new("torn", "");
    let mut b = s.start(2);
    let sub = id_on("torn-sub", 0, 2);
    offline_subscriber(&b, &sub, "torn/#");
    let (mut p, _) = Raw::connect(b.addr, Version::V5, &id_on("torn-pub", 1, 2), true);
    publish_acked(&mut p, "torn/t", "m", 0..5);
    b.kill9();

    // A record half written when the process died: a length, then garbage.
    let (seg, end) = log_end(&s.shard_dir(0));
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[end..end + 4].copy_from_slice(&200u32.to_le_bytes());
    bytes[end + 4..end + 40].fill(0xA5);
    std::fs::write(&seg, bytes).unwrap();

    let b = s.start(2);
    let log = b.log_text();
    assert!(log.contains("torn tail at"), "the cut is reported:\n{log}");
    assert!(
        log.contains(&format!("offset {end} (")),
        "with its offset:\n{log}"
    );
    let (present, got) = drain(&b, &sub);
    assert!(present);
    assert_eq!(got, numbered("m", 0..5));
}

#[test]
fn a_corrupt_record_is_reported_with_its_position_and_kept_aside() {
    let s = Setup::new("corrupt", "");
    let mut b = s.start(2);
    let sub = id_on("corrupt-sub", 0, 2);
    offline_subscriber(&b, &sub, "corrupt/#");
    // On the subscriber's shard: its deliveries are logged before PUBACK.
    let (mut p, _) = Raw::connect(b.addr, Version::V5, &id_on("corrupt-pub", 0, 2), true);
    publish_acked(&mut p, "corrupt/t", "m", 0..20);
    b.kill9();

    // Flip one byte of a record in the middle of shard 0's log.
    let dir = s.shard_dir(0);
    let (seg, _) = log_end(&dir);
    let mut bytes = std::fs::read(&seg).unwrap();
    let mut offsets = Vec::new();
    let mut off = 0;
    while let Read::Record(_, next) = read(&bytes, off) {
        offsets.push(off);
        off = next;
    }
    assert!(offsets.len() > 10, "enough records: {}", offsets.len());
    let victim = offsets[offsets.len() / 2];
    bytes[victim + 20] ^= 0x10;
    std::fs::write(&seg, bytes).unwrap();

    let b = s.start(2);
    let log = b.log_text();
    assert!(log.contains("corrupt record"), "reported:\n{log}");
    let after = offsets.len() - offsets.len() / 2 - 1;
    assert!(
        log.contains(&format!("offset {victim}:"))
            && log.contains(&format!("{after} valid records after it were NOT replayed")),
        "with its position and what was cut:\n{log}"
    );
    let kept = s.data.join("damaged");
    let files: Vec<_> = std::fs::read_dir(&kept)
        .expect("damaged segments are kept")
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .collect();
    assert!(!files.is_empty(), "segment copies in {}", kept.display());
    assert_round_trip(b.addr, "after-damage", "after-damage-pub", "alive/x");
}

// ---------------------------------------------------------------------------
// A full disk.
// ---------------------------------------------------------------------------

/// A size-capped tmpfs mounted for one test, unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "the full-disk test mounts a {size} tmpfs at {} and needs root (CAP_SYS_ADMIN)",
            dir.display()
        );
        SmallDisk(dir.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The persistent session `id` resumes and receives exactly `acked`, once
/// each, in order.
fn assert_drains(b: &ChildBroker, id: &str, acked: &[String]) {
    let (present, got) = drain(b, id);
    assert!(present);
    assert!(
        got == acked,
        "every acknowledged message, once, in order: {} delivered, {} acknowledged",
        got.len(),
        acked.len()
    );
}

/// Publish `small` at QoS 1 on `topic` until the broker takes it (the log
/// has room again after compaction), for at most 20 s.
fn publish_until_taken(b: &ChildBroker, p: &mut Raw, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        p.publish(topic, b"small", QoS::AtLeastOnce, false, 3);
        match p.recv() {
            Some(Packet::PubAck(a)) if a.reason == 0 => return,
            Some(Packet::PubAck(_)) => {}
            other => panic!("expected PUBACK, got {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "the log never had room again:\n{}",
            b.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Publish numbered 16 KiB payloads at QoS 1 until the broker refuses one
/// with 0x97 (the log is full); returns those acknowledged, in order.
fn fill_until_refused(p: &mut Raw, topic: &str) -> Vec<String> {
    let mut acked = Vec::new();
    let refused = loop {
        assert!(acked.len() < 2000, "the disk never filled");
        let payload = format!("{:<16384}", format!("m{}", acked.len()));
        p.publish(topic, payload.as_bytes(), QoS::AtLeastOnce, false, 1);
        match p.recv() {
            Some(Packet::PubAck(a)) if a.reason == 0 => acked.push(payload),
            Some(Packet::PubAck(a)) => break a.reason,
            other => panic!("expected PUBACK, got {other:?}"),
        }
    };
    assert_eq!(refused, reason::QUOTA_EXCEEDED);
    assert!(acked.len() > 50, "only {} messages fitted", acked.len());
    acked
}

#[test]
fn a_full_disk_refuses_new_messages_with_0x97_and_loses_nothing() {
    let root = temp_dir("full-disk");
    let disk = SmallDisk::mount(&root.join("disk"), "10m");
    let s = Setup::in_dir(TestDir::adopt(disk.0.clone()), "");
    let mut b = s.start(2);
    let sub = id_on("full-sub", 1, 2);
    offline_subscriber(&b, &sub, "full/#");
    let mut watcher = Raw::connect(b.addr, Version::V5, &id_on("full-watch", 1, 2), true).0;
    assert_eq!(watcher.subscribe(1, "qos0/#", QoS::AtMostOnce), vec![0]);
    let (mut p, _) = Raw::connect(b.addr, Version::V5, &id_on("full-pub", 0, 2), true);

    let acked = fill_until_refused(&mut p, "full/t");
    let payload = vec![b'x'; 16 << 10];
    if let Err(log) = b.wait_for_log("no disk space for a new log segment") {
        panic!("the full disk is logged:\n{log}");
    }
    // QoS 0 still flows, and the publisher's connection is still open.
    p.publish("qos0/t", b"still here", QoS::AtMostOnce, false, 0);
    assert_eq!(&watcher.recv_publish().payload[..], b"still here");
    p.publish("full/t", &payload, QoS::AtLeastOnce, false, 2);
    match p.recv() {
        Some(Packet::PubAck(a)) => assert_eq!((a.packet_id, a.reason), (2, 0x97)),
        other => panic!("expected PUBACK 0x97, got {other:?}"),
    }
    // Both refusals are counted.
    let (_, metrics) = common::http(b.http_addr(), "GET", "/metrics", "", "");
    let refused: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("shardmq_publishes_refused_total{") && l.contains("store_full"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(refused, 2, "{metrics}");

    // Every acknowledged message reaches the offline session.
    assert_drains(&b, &sub, &acked);

    // Once they are consumed, compaction frees the disk and messages are
    // taken again.
    publish_until_taken(&b, &mut p, "full/t");
    let before = b.log_text();
    b.kill9();
    let b = s.start(2);
    let (_, got) = drain(&b, &sub);
    assert!(
        got == vec!["small".to_string()],
        "and it survives a restart, alone: got {} messages ({:?}...)\nfirst run:\n{before}\nrestart:\n{}",
        got.len(),
        got.iter().map(|g| &g[..g.len().min(8)]).collect::<Vec<_>>(),
        b.log_text()
    );
    drop(b);
    drop(disk);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_restart_on_a_disk_too_full_for_recovery_refuses_and_loses_nothing() {
    let root = temp_dir("full-restart");
    let disk = SmallDisk::mount(&root.join("disk"), "10m");
    let s = Setup::in_dir(TestDir::adopt(disk.0.clone()), "");
    let mut b = s.start(2);
    let sub = id_on("fr-sub", 1, 2);
    offline_subscriber(&b, &sub, "fr/#");
    let (mut p, _) = Raw::connect(b.addr, Version::V5, &id_on("fr-pub", 0, 2), true);
    let acked = fill_until_refused(&mut p, "fr/t");
    b.kill9();

    // No room for a copy of the live state: the broker says so and stops.
    let args = s.args(2);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log = match ChildBroker::try_start(&args) {
        Err(log) => log,
        Ok(_) => panic!("the broker started on a disk too full to recover"),
    };
    assert!(
        log.contains("recovery needs free room") && log.contains("free some space"),
        "the refusal says why:\n{log}"
    );
    let generations: Vec<_> = std::fs::read_dir(&s.data)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    assert_eq!(
        generations.len(),
        1,
        "the partial generation is removed: {generations:?}"
    );

    // Room again: every acknowledged message is there.
    let status = std::process::Command::new("mount")
        .args(["-o", "remount,size=40m"])
        .arg(&disk.0)
        .status()
        .expect("run mount");
    assert!(status.success());
    let b = s.start(2);
    assert_drains(&b, &sub, &acked);
    drop(b);
    drop(disk);
    let _ = std::fs::remove_dir_all(&root);
}

// ---------------------------------------------------------------------------
// Restarts.
// ---------------------------------------------------------------------------

#[test]
fn sessions_rehome_when_the_shard_count_changes() {
    let s = Setup::new("rehome", "");
    let mut b = s.start(2);
    let ids: Vec<String> = (0..6).map(|i| format!("rehome-{i}")).collect();
    for id in &ids {
        offline_subscriber(&b, id, "rehome/#");
    }
    let (mut p, _) = Raw::connect(b.addr, Version::V5, "rehome-pub", true);
    publish_acked(&mut p, "rehome/t", "q", 0..3);
    p.publish("rh-retained/x", b"kept", QoS::AtLeastOnce, true, 1);
    expect_puback(&mut p, 1);
    b.kill9();

    for shards in [3, 1] {
        let mut b = s.start(shards);
        for id in &ids {
            let (present, got) = drain(&b, id);
            assert!(present, "{id} with {shards} shards");
            let want = if shards == 3 {
                numbered("q", 0..3)
            } else {
                vec![]
            };
            assert_eq!(got, want, "{id} with {shards} shards");
        }
        let (mut w, _) = Raw::connect(b.addr, Version::V5, &format!("rehome-w{shards}"), true);
        w.subscribe(1, "rh-retained/+", QoS::AtLeastOnce);
        assert_eq!(&w.recv_publish().payload[..], b"kept");
        b.stop();
    }
}

#[test]
fn expiry_counts_wall_clock_time_across_a_restart() {
    let s = Setup::new("expiry", "");
    let mut b = s.start(2);
    // A session that expires 2 s after it disconnects.
    let (mut short, _) = Raw::connect_with(b.addr, v5_connect("exp-short", true, 2));
    short.subscribe(1, "exp/#", QoS::AtLeastOnce);
    short.send(&Packet::Disconnect(Disconnect::default()));
    short.expect_close();
    offline_subscriber(&b, "exp-long", "exp/#");
    let (mut p, _) = Raw::connect(b.addr, Version::V5, "exp-pub", true);
    for (payload, expiry) in [("soon", 2u32), ("later", 600)] {
        let mut m = publish("exp/t", payload.as_bytes(), QoS::AtLeastOnce, false, 1);
        m.properties.message_expiry_interval = Some(expiry);
        p.send(&Packet::Publish(m));
        expect_puback(&mut p, 1);
    }
    let published = Instant::now();
    b.kill9();
    std::thread::sleep(Duration::from_millis(3000));

    let b = s.start(2);
    let (_, ack) = Raw::connect_with(b.addr, v5_connect("exp-short", false, 2));
    assert!(
        !ack.session_present,
        "the 2 s session expired while stopped"
    );
    let (mut long, ack) = Raw::connect_with(b.addr, v5_connect("exp-long", false, 3600));
    assert!(ack.session_present);
    let m = long.recv_publish();
    assert_eq!(
        &m.payload[..],
        b"later",
        "the 2 s message expired while stopped"
    );
    let left = m.properties.message_expiry_interval.unwrap();
    let waited = published.elapsed().as_secs() as u32;
    assert!(left <= 600 - waited + 1, "{left} s left after {waited} s");
    long.expect_silence(QUIET);
}

#[test]
fn a_delayed_publish_survives_a_restart() {
    let s = Setup::new("delayed", "");
    let mut b = s.start(2);
    offline_subscriber(&b, "delayed-sub", "del/#");
    let (mut p, _) = Raw::connect(b.addr, Version::V5, "delayed-pub", true);
    publish_qos1(&mut p, "$delayed/2/del/t", b"later", 1);
    let published = Instant::now();
    b.kill9();

    let b = s.start(2);
    let (mut sub, ack) = Raw::connect_with(b.addr, v5_connect("delayed-sub", false, 3600));
    assert!(ack.session_present);
    let m = sub.recv_publish();
    assert_eq!((&*m.topic, &m.payload[..]), ("del/t", &b"later"[..]));
    assert!(
        published.elapsed() >= Duration::from_millis(1900),
        "not before its time: {:?}",
        published.elapsed()
    );
    sub.send(&puback(m.packet_id));
    sub.expect_silence(QUIET);
}

#[test]
fn wills_survive_a_restart() {
    let s = Setup::new("wills", "");
    let mut b = s.start(2);
    offline_subscriber(&b, "will-watch", "w/#");
    let will = |topic: &str, delay: u32| Will {
        topic: topic.into(),
        payload: bytes::Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties {
            will_delay_interval: Some(delay),
            ..Properties::default()
        },
    };
    // w/delayed: its connection ends with 0x04 (with will); the will waits
    // 2 s for its delay.
    let mut c = v5_connect("will-delayed", true, 60);
    c.will = Some(will("w/delayed", 2));
    let (mut leaving, _) = Raw::connect_with(b.addr, c);
    leaving.send(&Packet::Disconnect(Disconnect {
        reason: reason::DISCONNECT_WITH_WILL,
        properties: Properties::default().into(),
    }));
    assert_eq!(leaving.expect_close(), None);
    let left = Instant::now();
    // w/crash: still connected when the broker dies.
    let mut c = v5_connect("will-crash", true, 60);
    c.will = Some(will("w/crash", 0));
    let (_connected, _) = Raw::connect_with(b.addr, c);
    b.kill9();

    let b = s.start(2);
    let (mut w, ack) = Raw::connect_with(b.addr, v5_connect("will-watch", false, 3600));
    assert!(ack.session_present);
    let mut topics = Vec::new();
    while topics.len() < 2 {
        let m = w.recv_publish();
        w.send(&puback(m.packet_id));
        if &*m.topic == "w/delayed" {
            assert!(
                left.elapsed() >= Duration::from_millis(1900),
                "the will waited its delay: {:?}",
                left.elapsed()
            );
        }
        topics.push(m.topic.to_string());
    }
    topics.sort();
    assert_eq!(topics, vec!["w/crash", "w/delayed"]);
    w.expect_silence(QUIET);
}

#[test]
fn compaction_keeps_the_log_bounded() {
    let s = Setup::new("compact", "");
    let b = s.start(2);
    let sub = id_on("compact-sub", 1, 2);
    let (mut c, _) = Raw::connect_with(b.addr, v5_connect(&sub, true, 3600));
    c.subscribe(1, "compact/#", QoS::AtLeastOnce);
    let (mut p, _) = Raw::connect(b.addr, Version::V5, &id_on("compact-pub", 0, 2), true);
    // 24 MiB through a persistent subscriber that acks everything, with
    // 1 MiB segments.
    let payload = vec![b'c'; 4096];
    for _ in 0..6000u32 {
        p.publish("compact/t", &payload, QoS::AtLeastOnce, false, 1);
        expect_puback(&mut p, 1);
        let m = c.recv_publish();
        c.send(&puback(m.packet_id));
    }
    // Compaction runs on the shards' ticks: wait for it, bounded.
    let log_bytes = || -> u64 {
        (0..2)
            .flat_map(|shard| segment_files(&s.shard_dir(shard)).unwrap())
            .map(|(_, p)| std::fs::metadata(p).unwrap().len())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while log_bytes() > 10 << 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        log_bytes() <= 10 << 20,
        "the logs hold {} MiB after 24 MiB went through",
        log_bytes() >> 20
    );
}

#[test]
fn a_second_broker_on_the_same_data_dir_is_refused() {
    let s = Setup::new("lock", "");
    let _first = s.start(1);
    let args = s.args(1);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log = match ChildBroker::try_start(&args) {
        Ok(_) => panic!("a second broker started on the same data directory"),
        Err(log) => log,
    };
    assert!(log.contains("is in use by another shardmq"), "{log}");
}

#[test]
fn power_safe_mode_acknowledges_after_sync_and_survives_kill_9() {
    // Records wait 100 ms for company before a sync, and a PUBACK waits for
    // the sync. (One may ride on a sync another record started earlier,
    // such as the clock's each second: most wait the whole interval.)
    let s = Setup::new(
        "power",
        "durability = \"power_safe\"\nsync_interval_ms = 100\n",
    );
    let mut b = s.start(2);
    let sub = id_on("power-sub", 0, 2);
    offline_subscriber(&b, &sub, "power/#");
    let (mut p, _) = Raw::connect(b.addr, Version::V5, &id_on("power-pub", 1, 2), true);
    let mut waits = Vec::new();
    for i in 0..10u32 {
        let sent = Instant::now();
        publish_qos1(&mut p, "power/t", format!("p{i}").as_bytes(), 1);
        waits.push(sent.elapsed());
    }
    let waited = waits
        .iter()
        .filter(|w| **w >= Duration::from_millis(90))
        .count();
    assert!(waited >= 5, "PUBACKs came before a sync: {waits:?}");
    for i in 0..5u16 {
        p.publish(
            "power/t2",
            format!("x{i}").as_bytes(),
            QoS::ExactlyOnce,
            false,
            100 + i,
        );
        match p.recv() {
            Some(Packet::PubRec(r)) => assert_eq!(r.reason, 0),
            other => panic!("expected PUBREC, got {other:?}"),
        }
        p.send(&Packet::PubRel(pub_resp(100 + i)));
        assert!(matches!(p.recv(), Some(Packet::PubComp(_))));
    }
    b.kill9();
    let b = s.start(2);
    let (present, got) = drain(&b, &sub);
    assert!(present);
    let mut want = numbered("p", 0..10);
    want.extend(numbered("x", 0..5));
    assert_eq!(got, want);
}

/// One shard with 1 MiB segments and `storage.log_bytes_max` =
/// `log_bytes`, an offline subscriber `{name}-sub` of `{name}/#`, and a
/// 5.0 publisher `{name}-pub`.
fn at_a_log_bound(name: &str, log_bytes: u64) -> (Setup, ChildBroker, Raw, String) {
    let s = Setup::new(name, &format!("log_bytes_max = {log_bytes}\n"));
    let b = s.start(1);
    let sub = format!("{name}-sub");
    offline_subscriber(&b, &sub, &format!("{name}/#"));
    let (p, _) = Raw::connect(b.addr, Version::V5, &format!("{name}-pub"), true);
    (s, b, p, sub)
}

#[test]
fn the_log_at_log_bytes_max_refuses_with_0x97_as_a_full_disk_does_and_loses_nothing() {
    // 1 MiB segments and a 4 MiB bound: the shard keeps at most 4 segments
    // (the one written, the spare and two sealed) whatever the disk holds.
    let (s, b, mut p, sub) = at_a_log_bound("budget", 4 << 20);
    let sub = sub.as_str();
    let acked = fill_until_refused(&mut p, "budget/t");
    assert!(
        acked.len() < 256,
        "{} messages of 16 KiB in 4 MiB",
        acked.len()
    );
    if let Err(log) = b.wait_for_log("storage.log_bytes_max reached") {
        panic!("the bound is named in the log:\n{log}");
    }
    let segments = std::fs::read_dir(s.shard_dir(0)).unwrap().count();
    assert!(segments <= 4, "{segments} segments on disk");
    assert_drains(&b, sub, &acked);
    // Consumed, compacted: there is room again.
    publish_until_taken(&b, &mut p, "budget/t");
}

/// At the smallest bound (3 segments) with something live in the oldest
/// segment for good (a retained message), compaction still frees room
/// once the queue is consumed. (The simulator found a deadlock near here,
/// seed 861: a full log whose current segment was past its half kept
/// half a segment for bookkeeping and so had no room to compact at all;
/// this test does not reach that state, the seed does.)
#[test]
fn the_log_at_its_bound_compacts_what_stays_live_and_takes_messages_again() {
    // The smallest bound: 3 segments (the one written, the spare, one more).
    let (_s, b, mut p, sub) = at_a_log_bound("bound", 3 << 20);
    let sub = sub.as_str();
    // Live for as long as the broker runs: it stays in the oldest segment.
    p.publish("kept/retained", b"kept", QoS::AtLeastOnce, true, 1);
    assert!(matches!(p.recv(), Some(Packet::PubAck(a)) if a.reason == 0));
    let acked = fill_until_refused(&mut p, "bound/t");
    assert_drains(&b, sub, &acked);
    publish_until_taken(&b, &mut p, "bound/t");
    // And the retained message moved with compaction.
    let (mut r, _) = Raw::connect(b.addr, Version::V5, "bound-reader", true);
    r.subscribe(1, "kept/#", QoS::AtMostOnce);
    match r.recv() {
        Some(Packet::Publish(m)) => assert_eq!(&m.payload[..], b"kept"),
        other => panic!("the retained message survives compaction: got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Offline queues in the log.
// ---------------------------------------------------------------------------

/// Publish `n` numbered QoS 1 messages of `size` bytes (`{prefix}{i}`
/// padded with dots), each acknowledged; returns them in order.
fn publish_padded(p: &mut Raw, topic: &str, prefix: &str, n: u32, size: usize) -> Vec<String> {
    let mut acked = Vec::new();
    for i in 0..n {
        let payload = format!("{:.<size$}", format!("{prefix}{i}"));
        publish_qos1(p, topic, payload.as_bytes(), 1);
        acked.push(payload);
    }
    acked
}

#[test]
fn an_offline_session_keeps_every_acknowledged_message_past_the_memory_limits_in_the_log() {
    // 100 messages or 256 KiB in memory per queue; the rest waits in the
    // log (1 MiB segments, so reads cross sealed segments and compaction).
    let s = Setup::with_mqtt(
        temp_dir("paged-queue"),
        "queue_messages_max = 100\nqueue_bytes_max = 262144",
        "",
    );
    let mut b = s.start(2);
    let sub = id_on("paged-sub", 1, 2);
    offline_subscriber(&b, &sub, "paged/#");
    let (mut p, _) = Raw::connect(b.addr, Version::V5, &id_on("paged-pub", 0, 2), true);
    let anon_before = b.rss_anon_bytes();
    // 2,000 x 16 KiB = 31 MiB queued for one offline session.
    let acked = publish_padded(&mut p, "paged/t", "a", 2000, 16 << 10);
    let grown = b.rss_anon_bytes().saturating_sub(anon_before);
    eprintln!("31 MiB queued, anonymous memory grew {} KiB", grown >> 10);
    assert!(
        grown < 12 << 20,
        "31 MiB queued grew the broker's own memory by {} MiB: the queue is not in the log",
        grown >> 20
    );
    assert_drains(&b, &sub, &acked);
    // Again, and this time the broker is killed before the client is back.
    offline_subscriber(&b, &sub, "paged/#");
    let acked = publish_padded(&mut p, "paged/t", "b", 1500, 16 << 10);
    drop(p);
    b.kill9();
    let b = s.start(2);
    assert_drains(&b, &sub, &acked);
    assert!(!b.log_text().contains("queue full"), "{}", b.log_text());
}

#[test]
fn a_queue_at_session_queue_bytes_max_drops_counted_and_logged_with_the_client_id() {
    // Each message costs its topic (7 bytes), payload (993) and index.
    let each = 1000 + shardmq::session::QUEUE_ENTRY_INDEX_BYTES;
    let budget = format!("session_queue_bytes_max = {}", 50 * each);
    let s = Setup::with_mqtt(temp_dir("paged-full"), "queue_messages_max = 10", &budget);
    let b = s.start(1);
    let sub = "paged-full-sub";
    offline_subscriber(&b, sub, "paged/#");
    let (mut p, _) = Raw::connect(b.addr, Version::V5, "paged-full-pub", true);
    let acked = publish_padded(&mut p, "paged/t", "m", 60, 993);
    // Exactly 50 fit: 10 in memory, 40 in the log; every publisher was
    // answered, the 10 beyond the bound were dropped for this subscriber.
    assert_drains(&b, sub, &acked[..50]);
    let log = b.wait_for_log("queue full").unwrap();
    assert!(
        log.contains(sub) && log.contains(&format!("storage.{budget}").replace(" = ", " ")),
        "{log}"
    );
}

/// A measurement, not a check (memory figures belong to measurements):
/// the memory one paged-out message costs, which
/// `shardmq::session::QUEUE_ENTRY_INDEX_BYTES` charges. Run with
/// `cargo test --test storage -- --ignored --nocapture memory_per_paged_message`.
#[test]
#[ignore]
fn memory_per_paged_message() {
    let s = Setup::with_mqtt(temp_dir("paged-measure"), "queue_messages_max = 100", "");
    let b = s.start(1);
    offline_subscriber(&b, "measure-sub", "m/#");
    let (mut p, _) = Raw::connect(b.addr, Version::V5, "measure-pub", true);
    publish_padded(&mut p, "m/t", "", 2000, 8);
    std::thread::sleep(Duration::from_millis(500));
    let before = b.rss_anon_bytes();
    let n = 100_000;
    publish_padded(&mut p, "m/t", "", n, 8);
    std::thread::sleep(Duration::from_millis(500));
    let grown = b.rss_anon_bytes().saturating_sub(before);
    eprintln!(
        "{} bytes of anonymous memory per paged-out 8-byte message ({n} queued; charged: {})",
        grown / u64::from(n),
        shardmq::session::QUEUE_ENTRY_INDEX_BYTES
    );
}
