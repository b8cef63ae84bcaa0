//! Log hot path: what a stored QoS 1 delivery costs a shard in kill-safe
//! mode. Encoding a Message record (64-byte payload, one target) and
//! appending it (checksum, copy into the mapped segment), and one of the
//! small records that follow a delivery (Sent; Done is two bytes shorter).
//! Records go through `persist::Writer`, as the shard's store writes them.
//!
//! Segments are 64 MiB as by default; the bench deletes sealed ones as it
//! goes, so it needs only a few of them on disk.

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use shardmq::codec::QoS;
use shardmq::log::Log;
use shardmq::message::Message;
use shardmq::persist::{Rec, Scope, Target, TargetState, WallClock, Writer};
use smallvec::SmallVec;

const SEGMENT_BYTES: usize = 64 << 20;

fn fresh_log(name: &str) -> (Log, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("shardmq-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut log = Log::create(&dir, SEGMENT_BYTES, 0, 1).unwrap();
    // As the kill-safe store: no directory syncs when segments come and go.
    log.set_sync_dirs(false);
    (log, dir)
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
        properties: Default::default(),
        expires_at: None,
        publisher: Some("device-17".into()),
        id: 0,
        late: false,
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

/// Time encoding and appending `rec` through a store's writer.
fn bench_append(g: &mut BenchmarkGroup<'_, WallTime>, name: &str, rec: &Rec) {
    let clock = WallClock::now();
    let (mut log, dir) = fresh_log(name);
    let mut writer = Writer::default();
    g.bench_function(name, |b| {
        b.iter(|| {
            writer.append(&mut log, &clock, black_box(rec)).unwrap();
            trim(&mut log);
        })
    });
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
}

fn bench_log(c: &mut Criterion) {
    let mut g = c.benchmark_group("log");
    g.throughput(Throughput::Elements(1));
    bench_append(&mut g, "message_record_encode_append", &message_record());
    let sent = Rec::Sent {
        sid: 42,
        id: 123_456,
        packet_id: 7,
    };
    bench_append(&mut g, "sent_record_encode_append", &sent);
    g.finish();
}

criterion_group!(benches, bench_log);
criterion_main!(benches);
