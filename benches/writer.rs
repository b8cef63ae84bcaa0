//! The writer's hot path: a connection's waiting deliveries encoded into
//! one buffer for one socket write (`ShardCore::poll_transmit`, which
//! coalesces what waits up to `server.write_buffer_bytes`).
//!
//! `cargo bench --bench writer`: 100 QoS 0 deliveries of 64-byte payloads
//! queued for one subscriber by a publisher on the same shard (memory
//! mode, as the runtime drives a `ShardCore`), then encoded in one call;
//! per 3.1.1 and 5.0. The figure is per delivery.

use std::hint::black_box;
use std::rc::Rc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use shardmq::codec::{Connect, Packet, Properties, Publish, QoS, SubOptions, Subscribe, Version};
use shardmq::shard::mesh::Mesh;
use shardmq::shard::{ConnHandle, ShardCore};
use shardmq::Config;

/// Deliveries waiting when the writer runs.
const WAITING: usize = 100;

fn connect(core: &ShardCore, id: &str, version: Version, now: Instant) -> Rc<ConnHandle> {
    let connect = Connect {
        version,
        clean_start: true,
        keep_alive: 0,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    };
    let conn = core.attach(now, Box::new(connect), None).expect("attached");
    core.poll_transmit(&conn, &mut BytesMut::new(), 1 << 20); // CONNACK
    conn
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("writer");
    g.throughput(Throughput::Elements(WAITING as u64));
    for (name, version) in [
        (
            "100 QoS 0 deliveries into one write, 3.1.1",
            Version::V3_1_1,
        ),
        ("100 QoS 0 deliveries into one write, 5.0", Version::V5),
    ] {
        let mut config = Config::default();
        config.server.shards = 1;
        config.storage.durability = "memory".into();
        config.validate().expect("a valid config");
        let mesh = Mesh::new(0, 1, config.mesh.outbox_messages_max);
        let core = ShardCore::new(0, 1, config, mesh, 1);
        let now = Instant::now();
        let sub = connect(&core, "sub", version, now);
        let publisher = connect(&core, "pub", version, now);
        core.handle_packet(
            &sub,
            now,
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters: vec![("w/#".into(), SubOptions::default())],
                properties: Properties::default().into(),
            }),
        );
        // The retained messages' walk a subscription starts (none here):
        // live deliveries wait for its end.
        while core.run_gathers(now, 8) {}
        core.poll_transmit(&sub, &mut BytesMut::new(), 1 << 20); // SUBACK
        let payload = Bytes::from(vec![7u8; 64]);
        let fill = || {
            for _ in 0..WAITING {
                let publish = Publish {
                    dup: false,
                    qos: QoS::AtMostOnce,
                    retain: false,
                    topic: "w/bench".into(),
                    packet_id: 0,
                    payload: payload.clone(),
                    properties: Properties::default().into(),
                };
                core.handle_packet(&publisher, now, Packet::Publish(publish));
            }
        };
        let mut out = BytesMut::with_capacity(64 << 10);
        fill();
        core.poll_transmit(&sub, &mut out, 64 << 10);
        let mut packets = 0;
        while let Some(p) = shardmq::codec::decode(&mut out, version, 1 << 20).unwrap() {
            assert!(matches!(p, Packet::Publish(_)), "{p:?}");
            packets += 1;
        }
        assert_eq!(packets, WAITING, "every delivery in one write");
        g.bench_function(name, |b| {
            b.iter_batched(
                fill,
                |()| {
                    out.clear();
                    core.poll_transmit(&sub, &mut out, 64 << 10);
                    black_box(out.len())
                },
                // One fill per timed call: 100 waiting, not a batch of fills
                // drained by the first calls.
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
