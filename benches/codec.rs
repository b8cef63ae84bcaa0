//! Codec hot path: PUBLISH decode and encode. `decode` allocates each
//! topic; `decode_sharing` is what a connection's reader does, sharing
//! the topic of its last PUBLISH when the next has the same one.

use std::hint::black_box;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use shardmq::codec::{self, Packet, Properties, Publish, QoS, Version};

const BATCH: usize = 1000;

fn qos0() -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: Arc::from("sensors/room-42/temp"),
        packet_id: 0,
        payload: Bytes::from(vec![0x5A; 64]),
        properties: Properties::default().into(),
    })
}

fn qos1_props() -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: Arc::from("sensors/room-42/temp"),
        packet_id: 4711,
        payload: Bytes::from(vec![0x5A; 64]),
        properties: Properties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(3600),
            content_type: Some("application/json".into()),
            topic_alias: Some(3),
            ..Default::default()
        }
        .into(),
    })
}

/// A read buffer holding `BATCH` copies of `p`, already in the shared
/// representation a long-lived connection buffer is in after its first split.
fn filled(p: &Packet, v: Version) -> BytesMut {
    let n = codec::encoded_len(p, v);
    let mut buf = BytesMut::with_capacity(1 + n * BATCH);
    buf.put_u8(0);
    for _ in 0..BATCH {
        codec::encode(p, v, &mut buf);
    }
    drop(buf.split_to(1));
    buf
}

fn bench(c: &mut Criterion) {
    let cases = [
        ("qos0_64B/v3.1.1", qos0(), Version::V3_1_1),
        ("qos0_64B/v5", qos0(), Version::V5),
        ("qos1_64B_props/v5", qos1_props(), Version::V5),
    ];
    for (group, sharing) in [("decode", false), ("decode_sharing", true)] {
        let mut g = c.benchmark_group(group);
        g.throughput(Throughput::Elements(BATCH as u64));
        for (name, p, v) in &cases {
            g.bench_function(*name, |b| {
                b.iter_batched(
                    || filled(p, *v),
                    |mut buf| {
                        let mut last = None;
                        let mut next = |buf: &mut BytesMut| match sharing {
                            true => codec::decode_sharing(buf, *v, 1 << 20, &mut last),
                            false => codec::decode(buf, *v, 1 << 20),
                        };
                        while let Some(p) = next(&mut buf).unwrap() {
                            black_box(p);
                        }
                    },
                    BatchSize::LargeInput,
                )
            });
        }
        g.finish();
    }
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(1));
    for (name, p, v) in &cases {
        let mut out = BytesMut::with_capacity(4096);
        g.bench_function(*name, |b| {
            b.iter(|| {
                out.clear();
                codec::encode(black_box(p), *v, &mut out);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
