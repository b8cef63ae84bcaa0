//! Mesh hop: the cost of moving a publish from one shard to another through
//! shardmq's own `Mesh` (outbox, one batch per loop turn, glommio
//! `channel_mesh`).
//!
//! - `mesh/batched_hop`: a producer shard queues 64 publishes per loop turn;
//!   time per message delivered to the other shard.
//! - `mesh/ping_pong`: one message there and back at a time, which shows
//!   the cost of waking an idle shard.
//!
//! Run: `cargo bench --bench mesh`.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use glommio::channels::channel_mesh::{Full, MeshBuilder};
use glommio::{LocalExecutorBuilder, Placement};
use shardmq::codec::QoS;
use shardmq::message::Message;
use shardmq::shard::mesh::{Batch, Mesh, MeshMsg};
use shardmq::shard::runtime::flush_loop;
use smallvec::SmallVec;

fn message() -> Arc<Message> {
    Arc::new(Message {
        topic: "site/7/device/42/temp".into(),
        payload: Bytes::from(vec![7u8; 64]),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Default::default(),
        expires_at: None,
        publisher: None,
        id: 0,
        late: false,
    })
}

fn publish(m: &Arc<Message>) -> MeshMsg {
    MeshMsg::Publish {
        message: m.clone(),
        ordinary: true,
        shared: SmallVec::new(),
        hops: 0,
        origin: None,
        routed_at: std::time::Instant::now(),
        from: None,
    }
}

fn executor() -> LocalExecutorBuilder {
    LocalExecutorBuilder::new(Placement::Unbound).io_memory(128 << 10)
}

/// Send `n` messages from shard 0 to shard 1; returns the time from the
/// first send to the last receive.
fn batched_hop(n: u64) -> Duration {
    let mesh = MeshBuilder::<Batch, Full>::full(2, 1024);
    let (start_tx, start_rx) = crossbeam_channel::bounded(1);
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let m = mesh.clone();
    let producer = executor()
        .spawn(move || async move {
            let (senders, _r) = m.join().await.unwrap();
            let out = Rc::new(Mesh::new(0, 2, 1 << 20));
            let flusher = out.clone();
            glommio::spawn_local(async move { flush_loop(&flusher, senders).await }).detach();
            let msg = message();
            start_tx.send(Instant::now()).unwrap();
            let mut sent = 0;
            while sent < n {
                for _ in 0..64.min(n - sent) {
                    out.send(1, publish(&msg));
                    sent += 1;
                }
                futures_lite::future::yield_now().await;
            }
            // Keep the lane open until the consumer has everything.
            while done_rx.is_empty() {
                glommio::timer::sleep(Duration::from_micros(50)).await;
            }
            done_rx.recv().unwrap()
        })
        .unwrap();
    let consumer = executor()
        .spawn(move || async move {
            let (_s, mut receivers) = mesh.join().await.unwrap();
            let streams = receivers.streams();
            let (_, rx) = &streams[0];
            let mut got = 0u64;
            while got < n {
                let batch = rx.recv().await.unwrap();
                got += batch.len() as u64;
            }
            done_tx.send(Instant::now()).unwrap();
        })
        .unwrap();
    consumer.join().unwrap();
    let done = producer.join().unwrap();
    done - start_rx.recv().unwrap()
}

/// `n` round trips of a single message between two shards.
fn ping_pong(n: u64) -> Duration {
    let mesh = MeshBuilder::<Batch, Full>::full(2, 1024);
    let m = mesh.clone();
    let pinger = executor()
        .spawn(move || async move {
            let (senders, mut receivers) = m.join().await.unwrap();
            let streams = receivers.streams();
            let (_, rx) = &streams[0];
            let msg = message();
            let start = Instant::now();
            for _ in 0..n {
                senders.send_to(1, vec![publish(&msg)]).await.unwrap();
                rx.recv().await.unwrap();
            }
            start.elapsed()
        })
        .unwrap();
    let ponger = executor()
        .spawn(move || async move {
            let (senders, mut receivers) = mesh.join().await.unwrap();
            let streams = receivers.streams();
            let (_, rx) = &streams[0];
            for _ in 0..n {
                let batch = rx.recv().await.unwrap();
                senders.send_to(0, batch).await.unwrap();
            }
        })
        .unwrap();
    ponger.join().unwrap();
    pinger.join().unwrap()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("mesh");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    g.bench_function("batched_hop", |b| b.iter_custom(batched_hop));
    g.bench_function("ping_pong", |b| b.iter_custom(ping_pong));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
