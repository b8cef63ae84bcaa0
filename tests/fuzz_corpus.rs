//! The fuzz targets' committed corpus and regressions, replayed as ordinary
//! tests: every input the fuzzers kept, and every input that once found a
//! bug, must still run without a panic.
//!
//! `SHARDMQ_WRITE_SEEDS=1 cargo test --test fuzz_corpus seeds` rewrites the
//! seed inputs (`seed-*` files) from packets and from the log of a real
//! broker run.

mod common;

#[path = "fuzz/src/lib.rs"]
#[allow(dead_code)]
mod targets;

use std::path::{Path, PathBuf};

use bytes::BytesMut;
use common::*;
use shardmq::codec::{self, Packet, Properties, QoS, Version};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz")
}

/// Every file of `corpus/{target}` and `regressions/{target}`.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in ["corpus", "regressions"] {
        let dir = fuzz_dir().join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_file() {
                let data = std::fs::read(&path).unwrap();
                out.push((path, data));
            }
        }
    }
    out.sort();
    out
}

fn replay(target: &str, f: fn(&[u8])) {
    let inputs = inputs(target);
    assert!(
        inputs.len() >= 5,
        "tests/fuzz/corpus/{target} holds {} inputs",
        inputs.len()
    );
    for (path, data) in inputs {
        let result = std::panic::catch_unwind(|| f(&data));
        assert!(result.is_ok(), "{} panics", path.display());
    }
}

#[test]
fn decode_corpus_replays() {
    replay("decode", targets::decode);
}

#[test]
fn session_corpus_replays() {
    replay("session", targets::session);
}

#[test]
fn log_corpus_replays() {
    replay("log", targets::log);
    // The seed built from a real run's records recovers what that run held
    // (its sessions never expire, so this holds whenever the test runs).
    let framed = std::fs::read(fuzz_dir().join("corpus/log/seed-02")).unwrap();
    let summary = targets::recover_input(&framed).unwrap().unwrap();
    assert!(summary.contains("recovered 2 sessions"), "{summary}");
}

fn encoded(p: &Packet, version: Version) -> Vec<u8> {
    let mut out = BytesMut::new();
    codec::encode(p, version, &mut out);
    out.to_vec()
}

/// A few packets of every kind, in each version.
fn seed_packets() -> Vec<(Version, Packet)> {
    let mut v5_props = Properties {
        session_expiry_interval: Some(60),
        receive_maximum: Some(2),
        maximum_packet_size: Some(300),
        topic_alias_maximum: Some(2),
        request_response_information: Some(1),
        ..Properties::default()
    };
    v5_props
        .user_properties
        .push(("k".to_string(), "v".to_string()));
    let mut c5 = v5_connect("seed", false, 60);
    c5.properties = v5_props;
    let mut pub5 = publish("a/b", b"hello", QoS::ExactlyOnce, true, 7);
    pub5.properties.topic_alias = Some(1);
    pub5.properties.response_topic = Some("r/t".into());
    pub5.properties.message_expiry_interval = Some(5);
    let mut out = vec![
        (Version::V5, Packet::Connect(Box::new(c5))),
        (Version::V5, Packet::Publish(pub5)),
        (
            Version::V3_1_1,
            Packet::Connect(Box::new(connect_packet(Version::V3_1_1, "s", true))),
        ),
        (
            Version::V3_1,
            Packet::Connect(Box::new(connect_packet(Version::V3_1, "s", false))),
        ),
        (Version::V5, Packet::PingReq),
        (Version::V5, Packet::Disconnect(Default::default())),
        (Version::V5, raw::puback(3)),
    ];
    for (version, qos) in [
        (Version::V3_1_1, QoS::AtLeastOnce),
        (Version::V5, QoS::AtMostOnce),
    ] {
        out.push((
            version,
            Packet::Publish(publish("x/y", b"p", qos, false, 1)),
        ));
    }
    out
}

/// Session inputs: a version byte, a CONNECT, then operations.
fn seed_sessions() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (vbyte, version) in [(0u8, Version::V3_1), (1, Version::V3_1_1), (2, Version::V5)] {
        let mut c = connect_packet(version, "seed", false);
        if version == Version::V5 {
            c = v5_connect("seed", false, 60);
            c.properties.receive_maximum = Some(2);
            c.properties.topic_alias_maximum = Some(2);
        }
        let mut s = vec![vbyte];
        s.extend(encoded(&Packet::Connect(Box::new(c)), version));
        let mut sub = BytesMut::new();
        let packet_sub = shardmq::codec::Subscribe {
            packet_id: 1,
            filters: vec![(
                "t/#".to_string(),
                shardmq::codec::SubOptions {
                    qos: QoS::ExactlyOnce,
                    ..Default::default()
                },
            )],
            properties: Properties::default().into(),
        };
        codec::encode(&Packet::Subscribe(packet_sub), version, &mut sub);
        s.push(0x00);
        s.extend_from_slice(&sub);
        for op in [0x61u8, 0x62, 0x71, 0x45] {
            s.extend([op, 20]);
        }
        s.push(0x00);
        s.extend(encoded(&raw::puback(1), version));
        s.push(0x00);
        s.extend(encoded(
            &Packet::Publish(publish("t/1", b"q2", QoS::ExactlyOnce, false, 9)),
            version,
        ));
        s.extend([0x80, 0x61, 9, 0x90, 0x5F, 0xA0]);
        seeds.push(s);
    }
    seeds
}

/// Log inputs: the records of a real broker run, framed for the target,
/// and the raw first segment of one shard.
fn seed_logs() -> Vec<Vec<u8>> {
    let dir = child::temp_dir("fuzz-seeds");
    let data = dir.to_str().unwrap();
    let mut b = child::ChildBroker::start(&["--shards", "2", "--data-dir", data]);
    let (mut s, _) = Raw::connect_with(b.addr, v5_connect("seed-sub", false, u32::MAX));
    assert_eq!(s.subscribe(1, "seed/#", QoS::ExactlyOnce), vec![2]);
    let mut will = v5_connect("seed-will", false, u32::MAX);
    will.will = Some(shardmq::codec::Will {
        topic: "seed/will".into(),
        payload: bytes::Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: Properties {
            will_delay_interval: Some(30),
            ..Properties::default()
        },
    });
    let (_w, _) = Raw::connect_with(b.addr, will);
    let (mut p, _) = Raw::connect(b.addr, Version::V5, "seed-pub", true);
    for i in 1..=6u16 {
        raw::publish_qos1(&mut p, &format!("seed/{i}"), b"payload", i);
    }
    p.publish("seed/retained", b"kept", QoS::AtLeastOnce, true, 20);
    p.publish(
        "$delayed/60/seed/later",
        b"later",
        QoS::AtLeastOnce,
        false,
        21,
    );
    b.kill9();
    let current = std::fs::read_to_string(dir.join("CURRENT")).unwrap();
    let mut seeds = Vec::new();
    let mut framed = vec![0x01u8]; // two shards then, one now: re-homing
    for shard in 0..2u8 {
        let shard_dir = dir.join(current.trim()).join(format!("shard-{shard}"));
        shardmq::log::scan::scan(&shard_dir, |r| {
            framed.push((shard << 6) | r.kind);
            framed.extend((r.body.len() as u16).to_le_bytes());
            framed.extend_from_slice(r.body);
        })
        .unwrap();
        let first = std::fs::read(shard_dir.join(shardmq::log::file_name(0))).unwrap();
        let end = first.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        let mut raw_seed = vec![0x80u8];
        raw_seed.extend_from_slice(&first[..end]);
        seeds.push(raw_seed);
    }
    seeds.push(framed);
    let _ = std::fs::remove_dir_all(&dir);
    seeds
}

#[test]
fn seeds() {
    if std::env::var_os("SHARDMQ_WRITE_SEEDS").is_none() {
        return;
    }
    let write = |target: &str, i: usize, data: &[u8]| {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{i:02}")), data).unwrap();
    };
    let packets = seed_packets();
    for (i, (version, p)) in packets.iter().enumerate() {
        write("decode", i, &encoded(p, *version));
    }
    for (i, s) in seed_sessions().into_iter().enumerate() {
        write("session", i, &s);
    }
    // Plain packet streams as session inputs too.
    for (i, (version, p)) in packets.iter().enumerate() {
        let vbyte = match version {
            Version::V3_1 => 0,
            Version::V3_1_1 => 1,
            Version::V5 => 2,
        };
        let mut s = vec![vbyte];
        s.extend(encoded(p, *version));
        write("session", 10 + i, &s);
    }
    for (i, s) in seed_logs().into_iter().enumerate() {
        write("log", i, &s);
    }
    // Small hand-made log inputs: empty, torn, garbage.
    write("log", 10, &[0x80]);
    write("log", 11, &[0x80, 0x20, 0, 0, 0]);
    write("log", 12, &[0x05, 0x01, 0x04, 0x00, 1, 2, 3, 4]);
}
