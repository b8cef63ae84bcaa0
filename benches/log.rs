//! Log hot path: what a stored QoS 1 delivery costs a shard in kill-safe
//! mode. Encoding a Message record (64-byte payload, one target) and
//! appending it (checksum, copy into the mapped segment), and one of the
//! small records that follow a delivery (Sent; Done is the same size).
//!
//! Segments are 64 MiB as by default; the bench deletes sealed ones as it
//! goes, so it needs only a few of them on disk.

use std::hint::black_box;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shardmq::codec::{Properties, QoS};
use shardmq::log::Log;
use shardmq::message::Message;
use shardmq::persist::{Rec, Scope, Target, TargetState, WallClock};
use smallvec::SmallVec;

const SEGMENT_BYTES: usize = 64 << 20;

fn fresh_log(name: &str) -> (Log, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("shardmq-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    (Log::create(&dir, SEGMENT_BYTES, 0, 1).unwrap(), dir)
}

/// Keep at most one sealed segment on disk.
fn trim(log: &mut Log) {
    if log.sealed_count() > 1 {
        let keep = log.current_index() - 1;
        log.remove_through(keep - 1).unwrap();
    }
}

fn message_record() -> Rec {
    let message = Arc::new(Message {
        topic: "sensors/room-42/temp".into(),
        payload: Bytes::from(vec![0x5A; 64]),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
        expires_at: None,
        publisher: Some("device-17".into()),
    });
    Rec::Message {
        id: 123_456,
        origin: None,
        scope: Scope::everyone(),
        message: Some(message),
        targets: vec![Target {
            sid: 42,
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: SmallVec::new(),
            state: TargetState::Queued,
        }],
    }
}

fn bench_log(c: &mut Criterion) {
    let clock = WallClock::now();
    let mut g = c.benchmark_group("log");
    g.throughput(Throughput::Elements(1));

    let rec = message_record();
    let (mut log, dir) = fresh_log("message");
    let mut scratch = BytesMut::new();
    g.bench_function("message_record_encode_append", |b| {
        b.iter(|| {
            scratch.clear();
            let kind = black_box(&rec).encode(&clock, &mut scratch);
            log.append(kind, &scratch).unwrap();
            trim(&mut log);
        })
    });
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);

    let (mut log, dir) = fresh_log("small");
    let sent = Rec::Sent {
        sid: 42,
        id: 123_456,
        packet_id: 7,
    };
    g.bench_function("sent_record_encode_append", |b| {
        b.iter(|| {
            scratch.clear();
            let kind = black_box(&sent).encode(&clock, &mut scratch);
            log.append(kind, &scratch).unwrap();
            trim(&mut log);
        })
    });
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
    g.finish();
}

criterion_group!(benches, bench_log);
criterion_main!(benches);
