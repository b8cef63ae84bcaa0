//! The emqtt-bench style commands: `conn`, `pub` and `sub`.
//!
//! Clients are started `-i` ms apart (at most --max-connecting handshakes at
//! once), from sequence number `-n`; each runs in its own task until the
//! command's end (--duration, or -L).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use shardmq::codec::Publish;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::args::{subst_topic, Args, Command};
use crate::engine::{hold, run_publisher, run_subscriber, PubPlan, Sink};
use crate::mqtt::{Conn, ConnectOpts, PubTemplate};
use crate::stats::{
    self, errors_json, merged_latencies, now_ns, proc_rss_kb, record_latencies, Counters,
    CpuSample, Json,
};

/// Timing shared by the client tasks.
struct Timing {
    first_start: AtomicU64,
    last_connack: AtomicU64,
    first_recv: AtomicU64,
    last_recv: AtomicU64,
    attempts_done: AtomicU64,
    pubs_done: AtomicU64,
}

impl Timing {
    fn new() -> Timing {
        Timing {
            first_start: AtomicU64::new(u64::MAX),
            last_connack: AtomicU64::new(0),
            first_recv: AtomicU64::new(u64::MAX),
            last_recv: AtomicU64::new(0),
            attempts_done: AtomicU64::new(0),
            pubs_done: AtomicU64::new(0),
        }
    }
}

fn client_id(args: &Args, seq: u64) -> String {
    let kind = match args.command {
        Command::Conn => "c",
        Command::Pub => "p",
        Command::Sub => "s",
        Command::Bench => "b",
    };
    format!("{}_{kind}_{}_{seq}", args.prefix, std::process::id())
}

/// Run `conn`, `pub` or `sub`; the exit code.
pub async fn run(args: Args, opts: ConnectOpts) -> Result<i32, String> {
    let args = Arc::new(args);
    let counters = Arc::new(Counters::default());
    let timing = Arc::new(Timing::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (finish_tx, finish_rx) = watch::channel(false);
    let (pstop_tx, pstop_rx) = watch::channel(false);
    let sem = Arc::new(Semaphore::new(args.max_connecting));
    let count = args.count as u64;
    let printer = (!args.quiet).then(|| stats::spawn_progress(counters.clone(), count, pstop_rx));
    let rss0 = args.broker_pid.and_then(proc_rss_kb);
    let cpu0 = CpuSample::take(args.broker_pid);
    let t_start = now_ns();
    let deadline = t_start + args.duration.as_nanos() as u64;
    println!(
        "{}: {} client(s) to {}:{}, MQTT {:?}, -i {} ms, for at most {:.0} s",
        args.command.name(),
        count,
        args.host,
        args.port,
        args.version,
        args.interval_ms,
        args.duration.as_secs_f64()
    );

    // The spawner paces connects; it stops early at the deadline.
    let spawner = {
        let (args, counters, timing, sem) =
            (args.clone(), counters.clone(), timing.clone(), sem.clone());
        let (stop_rx, finish_rx) = (stop_rx.clone(), finish_rx.clone());
        let opts = opts.clone();
        tokio::spawn(async move {
            let mut tasks = JoinSet::new();
            for k in 0..count {
                let due = t_start + (k as f64 * args.interval_ms * 1e6) as u64;
                let now = now_ns();
                if due > now {
                    tokio::time::sleep(Duration::from_nanos(due - now)).await;
                }
                let permit = tokio::select! {
                    p = sem.clone().acquire_owned() => p.unwrap(),
                    _ = tokio::time::sleep(Duration::from_nanos(deadline.saturating_sub(now_ns()))) => break,
                };
                if *stop_rx.borrow() {
                    break;
                }
                let seq = args.start + k;
                let (args, counters, timing, opts) =
                    (args.clone(), counters.clone(), timing.clone(), opts.clone());
                let (stop, finish) = (stop_rx.clone(), finish_rx.clone());
                tasks.spawn(async move {
                    client(seq, &args, &opts, &counters, &timing, permit, stop, finish).await
                });
                // Reap finished tasks as we go (failed connects).
                while tasks.try_join_next().is_some() {}
            }
            tasks
        })
    };

    // Wait for the end: deadline, -L reached (sub), every publisher done (pub).
    let mut all_connected_at: Option<u64> = None;
    let mut rss1 = None;
    let mut cpu_connected = None;
    loop {
        let now = now_ns();
        if now >= deadline {
            break;
        }
        let done = timing.attempts_done.load(Relaxed);
        if all_connected_at.is_none() && done >= count {
            all_connected_at = Some(now);
        }
        if args.command == Command::Conn {
            if let Some(t) = all_connected_at {
                // RSS after the broker settled with every connection open.
                if rss1.is_none() && now >= t + 1_000_000_000 {
                    rss1 = args.broker_pid.and_then(proc_rss_kb);
                    cpu_connected = Some(CpuSample::take(args.broker_pid));
                }
            }
        }
        if args.command == Command::Sub
            && args.limit > 0
            && counters.recv.load(Relaxed) >= args.limit
        {
            break;
        }
        if args.command == Command::Pub
            && done >= count
            && timing.pubs_done.load(Relaxed) + counters.conn_failed.load(Relaxed) >= count
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let end = now_ns();
    if args.command == Command::Conn && rss1.is_none() {
        rss1 = args.broker_pid.and_then(proc_rss_kb);
        cpu_connected = Some(CpuSample::take(args.broker_pid));
    }
    let cpu1 = CpuSample::take(args.broker_pid);
    let _ = stop_tx.send(true);
    // Publishers get a moment for their last acks.
    let grace = now_ns() + 2_000_000_000;
    let mut tasks = match tokio::time::timeout(Duration::from_secs(5), spawner).await {
        Ok(Ok(t)) => t,
        _ => JoinSet::new(),
    };
    while now_ns() < grace && !tasks.is_empty() {
        if tokio::time::timeout(Duration::from_millis(50), tasks.join_next())
            .await
            .is_ok_and(|r| r.is_none())
        {
            break;
        }
    }
    let _ = finish_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let _ = pstop_tx.send(true);
    if let Some(p) = printer {
        let _ = p.await;
    }

    // Summary.
    let elapsed = (end - t_start) as f64 / 1e9;
    let connected = counters.connected.load(Relaxed);
    let failed = counters.conn_failed.load(Relaxed);
    let first = timing.first_start.load(Relaxed);
    let last = timing.last_connack.load(Relaxed);
    let connect_s = if last > first {
        (last - first) as f64 / 1e9
    } else {
        0.0
    };
    let connect_rate = if connect_s > 0.0 {
        connected as f64 / connect_s
    } else {
        0.0
    };
    let h = merged_latencies();
    let q = |x: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(x)
        }
    };
    let sent = counters.sent.load(Relaxed);
    let acked = counters.acked.load(Relaxed);
    let recv = counters.recv.load(Relaxed);
    let (fr, lr) = (
        timing.first_recv.load(Relaxed),
        timing.last_recv.load(Relaxed),
    );
    let recv_s = if lr > fr { (lr - fr) as f64 / 1e9 } else { 0.0 };
    let recv_rate = if recv_s > 0.0 {
        recv as f64 / recv_s
    } else {
        0.0
    };
    let pub_s = elapsed;
    let sent_rate = if pub_s > 0.0 {
        sent as f64 / pub_s
    } else {
        0.0
    };
    let tck = stats::clk_tck();
    let broker_cpu = match (cpu0.broker_ticks, cpu1.broker_ticks) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / tck as f64),
        _ => None,
    };
    let kinds = counters.error_kinds();

    println!("---- summary ----");
    println!(
        "connected {connected}/{count}, failed {failed}, dropped by the broker later {}",
        counters.disconnected.load(Relaxed)
    );
    println!(
        "connect: {connect_rate:.0} conn/s ({connected} in {connect_s:.2} s, first start to last CONNACK); \
         latency µs p50 {} p99 {} max {}",
        q(0.5),
        q(0.99),
        h.max()
    );
    let mut j = Json::default();
    j.set("command", args.command.name())
        .set("ok", &true)
        .set("host", &args.host)
        .set("port", &(args.port as u64))
        .set("mqtt_version", &format!("{:?}", args.version))
        .set("count", &count)
        .set("elapsed_s", &elapsed)
        .set("connected", &connected)
        .set("conn_failed", &failed)
        .set("disconnected", &counters.disconnected.load(Relaxed))
        .set("connect_s", &connect_s)
        .set("connect_rate", &connect_rate)
        .set("connect_latency_us_p50", &q(0.5))
        .set("connect_latency_us_p99", &q(0.99))
        .set("connect_latency_us_max", &h.max());
    match args.command {
        Command::Conn => {
            let per_conn = match (rss0, rss1) {
                (Some(a), Some(b)) if connected > 0 => {
                    Some((b as f64 - a as f64) * 1024.0 / connected as f64)
                }
                _ => None,
            };
            let cpu_conn = match (
                cpu0.broker_ticks,
                cpu_connected.and_then(|c| c.broker_ticks),
            ) {
                (Some(a), Some(b)) if connected > 0 => {
                    Some((b - a) as f64 / tck as f64 * 1e6 / connected as f64)
                }
                _ => None,
            };
            if let (Some(a), Some(b)) = (rss0, rss1) {
                println!(
                    "broker RSS {a} KiB -> {b} KiB = {:.0} bytes per connection",
                    per_conn.unwrap_or(f64::NAN)
                );
            }
            if let Some(c) = cpu_conn {
                println!("broker CPU {c:.1} µs per connection (until all connected)");
            }
            j.set("broker_rss_kb_before", &rss0)
                .set("broker_rss_kb_after", &rss1)
                .set("broker_rss_bytes_per_conn", &per_conn)
                .set("broker_cpu_us_per_conn", &cpu_conn);
        }
        Command::Pub => {
            println!("sent {sent} ({sent_rate:.0} msg/s over {pub_s:.2} s), acked {acked}");
            j.set("sent", &sent)
                .set("sent_rate", &sent_rate)
                .set("acked", &acked);
        }
        Command::Sub => {
            println!("received {recv} ({recv_rate:.0} msg/s, first to last message {recv_s:.2} s)");
            j.set("received", &recv).set("recv_rate", &recv_rate);
        }
        Command::Bench => unreachable!(),
    }
    if let Some(c) = broker_cpu {
        let work = match args.command {
            Command::Conn => connected,
            Command::Pub => sent,
            _ => recv,
        };
        println!("broker CPU {c:.2} s over the run");
        j.set("broker_cpu_s", &c).set(
            "broker_cpu_us_per_unit",
            &(work > 0).then(|| c * 1e6 / work as f64),
        );
    }
    println!("errors {} {:?}", counters.errors.load(Relaxed), kinds);
    j.set("errors", &counters.errors.load(Relaxed))
        .raw("errors_by_kind", errors_json(&kinds));
    stats::write_json(args.json.as_deref(), &j)?;
    Ok(0)
}

/// One client: connect, then hold / publish / subscribe until stopped.
#[allow(clippy::too_many_arguments)]
async fn client(
    seq: u64,
    args: &Args,
    opts: &ConnectOpts,
    counters: &Counters,
    timing: &Timing,
    permit: tokio::sync::OwnedSemaphorePermit,
    stop: watch::Receiver<bool>,
    finish: watch::Receiver<bool>,
) {
    let id = client_id(args, seq);
    let t0 = now_ns();
    timing.first_start.fetch_min(t0, Relaxed);
    let conn = Conn::connect(opts, &id).await;
    let mut conn = match conn {
        Ok(c) => c,
        Err(e) => {
            drop(permit);
            counters.conn_failed.fetch_add(1, Relaxed);
            counters.error(e);
            timing.attempts_done.fetch_add(1, Relaxed);
            return;
        }
    };
    let topic = args
        .topic
        .as_deref()
        .map(|t| subst_topic(t, seq, &id, args.username.as_deref()));
    if args.command == Command::Sub {
        if let Err(e) = conn
            .subscribe(topic.as_deref().unwrap(), args.qos, args.connect_timeout)
            .await
        {
            drop(permit);
            counters.conn_failed.fetch_add(1, Relaxed);
            counters.error(e);
            timing.attempts_done.fetch_add(1, Relaxed);
            return;
        }
    }
    let t1 = now_ns();
    drop(permit);
    timing.last_connack.fetch_max(t1, Relaxed);
    record_latencies(&[(t1 - t0) / 1000]);
    counters.connected.fetch_add(1, Relaxed);
    timing.attempts_done.fetch_add(1, Relaxed);
    let r = match args.command {
        Command::Conn => hold(&mut conn, stop).await,
        Command::Sub => run_subscriber(&mut conn, &mut CountSink { timing }, counters, stop).await,
        Command::Pub => {
            let plan = PubPlan {
                pub_id: seq as u32,
                template: PubTemplate::new(
                    topic.as_deref().unwrap(),
                    args.qos,
                    args.size,
                    args.version,
                ),
                qos: args.qos,
                interval_ns: (args.pub_interval_ms > 0.0).then_some(args.pub_interval_ms * 1e6),
                first_due_ns: now_ns(),
                limit: if args.limit == 0 {
                    u64::MAX
                } else {
                    args.limit
                },
                inflight_max: args.inflight,
                window: None,
            };
            let out = run_publisher(&mut conn, &plan, counters, None, stop, finish).await;
            timing.pubs_done.fetch_add(1, Relaxed);
            out.error.map_or(Ok(()), Err)
        }
        Command::Bench => unreachable!(),
    };
    if let Err(e) = r {
        counters.disconnected.fetch_add(1, Relaxed);
        counters.error(e);
    }
}

/// Counts deliveries for `sub` (the counting itself is in the loop).
struct CountSink<'a> {
    timing: &'a Timing,
}

impl Sink for CountSink<'_> {
    fn on_publish(&mut self, _: &Publish) {}
    fn after_batch(&mut self, _: u64) {
        let t = now_ns();
        self.timing.first_recv.fetch_min(t, Relaxed);
        self.timing.last_recv.fetch_max(t, Relaxed);
    }
}
