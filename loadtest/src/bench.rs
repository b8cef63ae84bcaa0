//! `shardmq-bench bench`: publishers and subscribers in one process, for
//! throughput, end-to-end latency and loss / duplicate / reorder counts.
//!
//! Links: a (publisher, subscriber) pair that should see every message.
//! pairs: link i = (pub i, sub i); fanout: link j = (pub 0, sub j);
//! fanin: link i = (pub i, sub 0); shared: link i = (pub i, whichever
//! subscriber of the group gets each message), tracked across the
//! subscribers (a message may overtake the one before it when the two go
//! to different subscribers: counted as reordered).
//!
//! Timeline: subscribers connect and subscribe (SUBACK), publishers connect,
//! then all publishers start at t0. Messages sent before t0 + warmup are
//! delivered but not measured. Publishing stops at t0 + warmup + duration
//! (or when every publisher sent --messages); then up to --drain for the
//! in-flight messages, then the subscribers stop and loss is counted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardmq::codec::Publish;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::args::{Args, Mode};
use crate::engine::{run_publisher, run_subscriber, PubPlan, Sink, Window};
use crate::mqtt::{parse_header, Conn, ConnectOpts, PubTemplate};
use crate::stats::{
    self, errors_json, merged_latencies, now_ns, record_latencies, Counters, CpuSample, Json,
};

/// Gaps remembered per link; beyond, the oldest is counted lost for good
/// (a late arrival for it then counts as a duplicate).
const MAX_GAPS: usize = 100_000;

/// Sequence tracking of one link at its subscriber.
#[derive(Debug, Default, Clone)]
pub struct SeqTrack {
    /// Next expected sequence: highest seen + 1.
    pub next: u64,
    /// Every arrival, duplicates included.
    pub received: u64,
    /// Missing ranges [start, end) below `next`.
    gaps: BTreeMap<u64, u64>,
    gap_total: u64,
    untracked: u64,
    pub dup: u64,
    pub reorder: u64,
}

impl SeqTrack {
    #[inline]
    pub fn on_seq(&mut self, s: u64) {
        self.received += 1;
        match s.cmp(&self.next) {
            std::cmp::Ordering::Equal => self.next += 1,
            std::cmp::Ordering::Greater => {
                self.gaps.insert(self.next, s);
                self.gap_total += s - self.next;
                self.next = s + 1;
                if self.gaps.len() > MAX_GAPS {
                    let (a, b) = self.gaps.pop_first().unwrap();
                    self.gap_total -= b - a;
                    self.untracked += b - a;
                }
            }
            std::cmp::Ordering::Less => self.on_late(s),
        }
    }

    /// A sequence number below the next expected: a reordered message that
    /// fills a gap, or a duplicate.
    fn on_late(&mut self, s: u64) {
        if let Some((&a, &b)) = self.gaps.range(..=s).next_back() {
            if s < b {
                self.gaps.remove(&a);
                if a < s {
                    self.gaps.insert(a, s);
                }
                if s + 1 < b {
                    self.gaps.insert(s + 1, b);
                }
                self.gap_total -= 1;
                self.reorder += 1;
                return;
            }
        }
        self.dup += 1;
    }

    /// Every sequence number below this one arrived.
    pub fn contiguous(&self) -> u64 {
        match self.gaps.first_key_value() {
            Some((&start, _)) => start,
            None if self.untracked > 0 => 0,
            None => self.next,
        }
    }

    /// Messages of the `sent` the publisher sent that never arrived.
    pub fn lost(&self, sent: u64) -> u64 {
        self.gap_total + self.untracked + sent.saturating_sub(self.next)
    }
}

/// What the tasks share.
struct Shared {
    mode: Mode,
    pubs: usize,
    /// Per publisher: messages sent so far.
    sent: Vec<AtomicU64>,
    /// Per link: the subscriber's next expected sequence.
    progress: Arc<[AtomicU64]>,
    /// Per publisher: woken when one of its subscribers advances.
    notify: Vec<Arc<Notify>>,
    /// Shared mode, per publisher: its link's track, which every
    /// subscriber of the group updates.
    fleet: Vec<Mutex<SeqTrack>>,
    counters: Arc<Counters>,
    warm_ns: AtomicU64,
    pubs_done: AtomicUsize,
}

impl Shared {
    fn links_of_pub(&self, p: usize, subs: usize) -> Vec<usize> {
        match self.mode {
            Mode::Pairs | Mode::Fanin | Mode::Shared => vec![p],
            Mode::Fanout => (0..subs).collect(),
        }
    }
    fn pub_of_link(&self, l: usize) -> usize {
        match self.mode {
            Mode::Pairs | Mode::Fanin | Mode::Shared => l,
            Mode::Fanout => 0,
        }
    }
}

/// A subscriber's sink: sequence tracking, latency, closed-loop progress.
struct BenchSink {
    shared: Arc<Shared>,
    sub: usize,
    /// Local tracks; fanin: one per publisher, shared: none (the
    /// publishers' tracks are in `Shared::fleet`), else one.
    tracks: Vec<SeqTrack>,
    touched: Vec<bool>,
    touched_list: Vec<usize>,
    lat: Vec<u64>,
    warm_ns: u64,
    delivered: u64,
    unexpected: u64,
}

impl BenchSink {
    fn new(shared: Arc<Shared>, sub: usize) -> BenchSink {
        let n = match shared.mode {
            Mode::Fanin | Mode::Shared => shared.pubs,
            Mode::Pairs | Mode::Fanout => 1,
        };
        let tracks = match shared.mode {
            Mode::Shared => Vec::new(),
            _ => vec![SeqTrack::default(); n],
        };
        BenchSink {
            shared,
            sub,
            tracks,
            touched: vec![false; n],
            touched_list: Vec::new(),
            lat: Vec::with_capacity(1024),
            warm_ns: u64::MAX,
            delivered: 0,
            unexpected: 0,
        }
    }

    /// (local track, global link) of a publisher id.
    #[inline]
    fn link(&self, pub_id: usize) -> Option<(usize, usize)> {
        match self.shared.mode {
            Mode::Pairs => (pub_id == self.sub).then_some((0, self.sub)),
            Mode::Fanout => (pub_id == 0).then_some((0, self.sub)),
            Mode::Fanin | Mode::Shared => (pub_id < self.shared.pubs).then_some((pub_id, pub_id)),
        }
    }

    fn global_link(&self, local: usize) -> usize {
        match self.shared.mode {
            Mode::Fanin | Mode::Shared => local,
            Mode::Pairs | Mode::Fanout => self.sub,
        }
    }

    /// How far link `local` has every message: the next sequence number
    /// it expects; in shared mode the first one still missing (a message
    /// may overtake the one before it through another subscriber, which
    /// then still counts as on its way).
    fn next_of(&self, local: usize) -> u64 {
        match self.shared.mode {
            Mode::Shared => lock(&self.shared.fleet[local]).contiguous(),
            _ => self.tracks[local].next,
        }
    }
}

impl Sink for BenchSink {
    #[inline]
    fn on_publish(&mut self, p: &Publish) {
        let Some((pub_id, seq, ts)) = parse_header(&p.payload) else {
            self.unexpected += 1;
            return;
        };
        let Some((local, _)) = self.link(pub_id as usize) else {
            self.unexpected += 1;
            return;
        };
        match self.shared.mode {
            Mode::Shared => lock(&self.shared.fleet[local]).on_seq(seq),
            _ => self.tracks[local].on_seq(seq),
        }
        if !self.touched[local] {
            self.touched[local] = true;
            self.touched_list.push(local);
        }
        if self.warm_ns == u64::MAX {
            self.warm_ns = self.shared.warm_ns.load(Relaxed);
        }
        if ts >= self.warm_ns {
            self.delivered += 1;
            self.lat.push(now_ns().saturating_sub(ts) / 1000);
        }
    }

    fn after_batch(&mut self, _n: u64) {
        record_latencies(&self.lat);
        self.lat.clear();
        for i in 0..self.touched_list.len() {
            let local = self.touched_list[i];
            self.touched[local] = false;
            let link = self.global_link(local);
            // fetch_max: in shared mode two subscribers may race here.
            self.shared.progress[link].fetch_max(self.next_of(local), Relaxed);
            self.shared.notify[self.shared.pub_of_link(link)].notify_one();
        }
        self.touched_list.clear();
    }
}

struct SubResult {
    sub: usize,
    tracks: Vec<SeqTrack>,
    delivered: u64,
    unexpected: u64,
}

struct PubResult {
    stalls: u64,
    error: Option<String>,
}

/// Add link track `t` (its publisher sent `sent`) to a publisher's
/// received, lost, duplicated and reordered counts.
fn tally(e: &mut [u64; 4], t: &SeqTrack, sent: u64) {
    e[0] += t.received;
    e[1] += t.lost(sent);
    e[2] += t.dup;
    e[3] += t.reorder;
}

/// A shared-mode track (a poisoned lock: a subscriber task panicked, and
/// its counts so far still stand).
fn lock(t: &Mutex<SeqTrack>) -> std::sync::MutexGuard<'_, SeqTrack> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

fn client_id(args: &Args, kind: &str, i: usize) -> String {
    format!("{}_{kind}_{}_{}", args.prefix, std::process::id(), i)
}

/// Run `bench`; the exit code.
pub async fn run(args: Args, opts: ConnectOpts) -> Result<i32, String> {
    let (npub, nsub) = (args.pubs, args.subs);
    let nlinks = match args.mode {
        Mode::Pairs => npub,
        Mode::Fanout => nsub,
        Mode::Fanin | Mode::Shared => npub,
    };
    let counters = Arc::new(Counters::default());
    let shared = Arc::new(Shared {
        mode: args.mode,
        pubs: npub,
        sent: (0..npub).map(|_| AtomicU64::new(0)).collect(),
        progress: (0..nlinks).map(|_| AtomicU64::new(0)).collect(),
        notify: (0..npub).map(|_| Arc::new(Notify::new())).collect(),
        fleet: match args.mode {
            Mode::Shared => (0..npub).map(|_| Mutex::default()).collect(),
            _ => Vec::new(),
        },
        counters: counters.clone(),
        warm_ns: AtomicU64::new(u64::MAX),
        pubs_done: AtomicUsize::new(0),
    });
    let (progress_stop_tx, progress_stop) = watch::channel(false);
    let (pub_stop_tx, pub_stop) = watch::channel(false);
    let (sub_stop_tx, sub_stop) = watch::channel(false);
    let (start_tx, start_rx) = watch::channel::<Option<u64>>(None);
    let sem = Arc::new(Semaphore::new(args.max_connecting));
    let overall_deadline = tokio::time::Instant::now()
        + args.connect_timeout * 3
        + args.warmup
        + args.duration
        + args.drain
        + Duration::from_secs(10);
    let printer = (!args.quiet).then(|| {
        stats::spawn_progress(
            counters.clone(),
            (npub + nsub) as u64,
            progress_stop.clone(),
        )
    });

    println!(
        "bench {}: {npub} publisher(s) -> {nsub} subscriber(s), QoS {}, {} B, {}, MQTT {:?}, {}:{}",
        args.mode.name(),
        args.qos as u8,
        args.size,
        pacing(&args),
        args.version,
        args.host,
        match args.sub_port {
            Some(s) => format!("{} (subscribers on {s})", args.port),
            None => args.port.to_string(),
        }
    );

    // Subscribers first: every SUBACK before the first publish.
    let sub_opts = match args.sub_port {
        Some(port) => ConnectOpts {
            addr: std::net::SocketAddr::new(opts.addr.ip(), port),
            ..opts.clone()
        },
        None => opts.clone(),
    };
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let mut sub_tasks: Vec<JoinHandle<SubResult>> = Vec::with_capacity(nsub);
    for s in 0..nsub {
        let (shared, opts, sem, ready, stop) = (
            shared.clone(),
            sub_opts.clone(),
            sem.clone(),
            ready_tx.clone(),
            sub_stop.clone(),
        );
        let filter = match args.mode {
            Mode::Pairs => format!("{}/{s}", args.topic_prefix),
            Mode::Fanout => format!("{}/0", args.topic_prefix),
            Mode::Fanin => format!("{}/#", args.topic_prefix),
            Mode::Shared => format!("$share/bench/{}/#", args.topic_prefix),
        };
        let (id, qos, timeout) = (client_id(&args, "bs", s), args.qos, args.connect_timeout);
        sub_tasks.push(tokio::spawn(async move {
            let counters = shared.counters.clone();
            let mut sink = BenchSink::new(shared, s);
            let permit = sem.acquire_owned().await.unwrap();
            let conn = match Conn::connect(&opts, &id).await {
                Ok(mut c) => match c.subscribe(&filter, qos, timeout).await {
                    Ok(()) => Ok(c),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            drop(permit);
            let mut conn = match conn {
                Ok(c) => {
                    counters.connected.fetch_add(1, Relaxed);
                    let _ = ready.send(Ok(()));
                    c
                }
                Err(e) => {
                    counters.conn_failed.fetch_add(1, Relaxed);
                    let _ = ready.send(Err(format!("subscriber {s}: {e}")));
                    return SubResult {
                        sub: s,
                        tracks: sink.tracks,
                        delivered: 0,
                        unexpected: 0,
                    };
                }
            };
            let r = run_subscriber(&mut conn, &mut sink, &counters, stop).await;
            if let Err(e) = &r {
                counters.disconnected.fetch_add(1, Relaxed);
                counters.error(format!("subscriber: {e}"));
            }
            SubResult {
                sub: s,
                tracks: sink.tracks,
                delivered: sink.delivered,
                unexpected: sink.unexpected,
            }
        }));
    }
    let t_conn = now_ns();
    let setup = wait_ready(&mut ready_rx, nsub, overall_deadline).await;
    let mut failure = setup.err();

    // Publishers.
    let mut pub_tasks: Vec<JoinHandle<PubResult>> = Vec::with_capacity(npub);
    if failure.is_none() {
        for p in 0..npub {
            let (shared, opts, sem, ready) =
                (shared.clone(), opts.clone(), sem.clone(), ready_tx.clone());
            let (stop, finish, mut start) = (pub_stop.clone(), sub_stop.clone(), start_rx.clone());
            let topic = match args.mode {
                Mode::Pairs | Mode::Fanin | Mode::Shared => format!("{}/{p}", args.topic_prefix),
                Mode::Fanout => format!("{}/0", args.topic_prefix),
            };
            let id = client_id(&args, "bp", p);
            let template = PubTemplate::new(&topic, args.qos, args.size, args.version);
            let (rate, messages, inflight, qos) =
                (args.rate, args.messages, args.inflight, args.qos);
            let window = args.closed_loop.map(|w| Window {
                window: w,
                progress: shared.progress.clone(),
                links: shared.links_of_pub(p, nsub),
                notify: shared.notify[p].clone(),
            });
            pub_tasks.push(tokio::spawn(async move {
                let counters = shared.counters.clone();
                let permit = sem.acquire_owned().await.unwrap();
                let conn = Conn::connect(&opts, &id).await;
                drop(permit);
                let mut conn = match conn {
                    Ok(c) => {
                        counters.connected.fetch_add(1, Relaxed);
                        let _ = ready.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        counters.conn_failed.fetch_add(1, Relaxed);
                        let _ = ready.send(Err(format!("publisher {p}: {e}")));
                        return PubResult {
                            stalls: 0,
                            error: Some(e),
                        };
                    }
                };
                // Wait for the common start.
                let t0 = loop {
                    if let Some(t0) = *start.borrow_and_update() {
                        break Some(t0);
                    }
                    if start.changed().await.is_err() {
                        break None;
                    }
                };
                let Some(t0) = t0 else {
                    conn.disconnect();
                    return PubResult {
                        stalls: 0,
                        error: None,
                    };
                };
                tokio::time::sleep_until(stats::instant_at(t0).into()).await;
                let (interval_ns, first_due_ns) = match rate {
                    Some(r) => (
                        Some(npub as f64 * 1e9 / r),
                        t0 + (p as f64 * 1e9 / r) as u64,
                    ),
                    None => (None, t0),
                };
                let plan = PubPlan {
                    pub_id: p as u32,
                    template,
                    qos,
                    interval_ns,
                    first_due_ns,
                    limit: if messages == 0 { u64::MAX } else { messages },
                    inflight_max: inflight,
                    window,
                };
                let out = run_publisher(
                    &mut conn,
                    &plan,
                    &counters,
                    Some(&shared.sent[p]),
                    stop,
                    finish,
                )
                .await;
                shared.pubs_done.fetch_add(1, Relaxed);
                if let Some(e) = &out.error {
                    counters.disconnected.fetch_add(1, Relaxed);
                    counters.error(format!("publisher: {e}"));
                }
                PubResult {
                    stalls: out.stalls,
                    error: out.error,
                }
            }));
        }
        if let Err(e) = wait_ready(&mut ready_rx, npub, overall_deadline).await {
            failure = Some(e);
        }
    }
    drop(ready_tx);
    let connect_s = (now_ns() - t_conn) as f64 / 1e9;

    let mut measured_s = 0.0;
    let mut cpu0 = CpuSample::default();
    let mut cpu1 = CpuSample::default();
    let mut drained = true;
    let mut drain_s = 0.0;
    if failure.is_none() {
        println!(
            "{} connections ready in {connect_s:.2} s; publishing{}",
            npub + nsub,
            if args.warmup.is_zero() {
                String::new()
            } else {
                format!(" ({:.1} s warmup first)", args.warmup.as_secs_f64())
            }
        );
        let t0 = now_ns() + 2_000_000;
        let warm = t0 + args.warmup.as_nanos() as u64;
        shared.warm_ns.store(warm, Relaxed);
        let _ = start_tx.send(Some(t0));
        let deadline = warm + args.duration.as_nanos() as u64;
        let mut sampled = false;
        loop {
            let now = now_ns();
            if !sampled && now >= warm {
                cpu0 = CpuSample::take_all(args.broker_pid, &args.also_broker_pids);
                sampled = true;
            }
            if now >= deadline || shared.pubs_done.load(Relaxed) == npub {
                break;
            }
            let next = if sampled { deadline } else { warm };
            tokio::time::sleep(Duration::from_nanos((next - now).min(10_000_000))).await;
        }
        if !sampled {
            cpu0 = CpuSample::take_all(args.broker_pid, &args.also_broker_pids);
        }
        let end = now_ns();
        let _ = pub_stop_tx.send(true);
        measured_s = end.saturating_sub(warm) as f64 / 1e9;
        // Drain: every link caught up with its publisher, or --drain.
        let drain_deadline = now_ns() + args.drain.as_nanos() as u64;
        loop {
            // Publishers update `sent` right after producing; give a stopping
            // one a moment to see the flag.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let caught_up = (0..nlinks).all(|l| {
                shared.progress[l].load(Relaxed) >= shared.sent[shared.pub_of_link(l)].load(Relaxed)
            });
            if caught_up && shared.pubs_done.load(Relaxed) == npub {
                break;
            }
            if now_ns() >= drain_deadline {
                drained = caught_up;
                break;
            }
        }
        drain_s = (now_ns() - end) as f64 / 1e9;
        cpu1 = CpuSample::take_all(args.broker_pid, &args.also_broker_pids);
    }
    let _ = pub_stop_tx.send(true);
    let _ = sub_stop_tx.send(true);
    drop(start_tx);

    // Collect.
    let mut pubs_res = Vec::with_capacity(npub);
    for t in pub_tasks {
        match tokio::time::timeout_at(overall_deadline, t).await {
            Ok(Ok(r)) => pubs_res.push(r),
            _ => pubs_res.push(PubResult {
                stalls: 0,
                error: Some("task did not finish".into()),
            }),
        }
    }
    let mut subs_res = Vec::with_capacity(nsub);
    for t in sub_tasks {
        if let Ok(Ok(r)) = tokio::time::timeout_at(overall_deadline, t).await {
            subs_res.push(r);
        }
    }
    let _ = progress_stop_tx.send(true);
    if let Some(p) = printer {
        let _ = p.await;
    }

    if let Some(e) = failure {
        let kinds = counters.error_kinds();
        eprintln!("bench: setup failed: {e}");
        let mut j = Json::default();
        j.set("command", "bench")
            .set("ok", &false)
            .set("error", &e)
            .set("connected", &counters.connected.load(Relaxed))
            .set("conn_failed", &counters.conn_failed.load(Relaxed))
            .raw("errors_by_kind", errors_json(&kinds));
        stats::write_json(args.json.as_deref(), &j)?;
        return Ok(1);
    }

    // Per publisher: sent, received, lost, dup, reorder over its links.
    let sent: Vec<u64> = shared.sent.iter().map(|s| s.load(Relaxed)).collect();
    let mut per_pub = vec![[0u64; 4]; npub]; // received, lost, dup, reorder
    let mut delivered = 0;
    let mut unexpected = 0;
    for r in &subs_res {
        delivered += r.delivered;
        unexpected += r.unexpected;
        for (local, t) in r.tracks.iter().enumerate() {
            let p = match args.mode {
                Mode::Pairs => r.sub,
                Mode::Fanout => 0,
                Mode::Fanin => local,
                Mode::Shared => unreachable!("a shared-mode subscriber keeps no track"),
            };
            tally(&mut per_pub[p], t, sent[p]);
        }
    }
    for (p, t) in shared.fleet.iter().enumerate() {
        tally(&mut per_pub[p], &lock(t), sent[p]);
    }
    let subs_per_pub = if args.mode == Mode::Fanout {
        nsub as u64
    } else {
        1
    };
    let total_sent: u64 = sent.iter().sum();
    let expected = total_sent * subs_per_pub;
    let received: u64 = per_pub.iter().map(|e| e[0]).sum();
    let lost: u64 = per_pub.iter().map(|e| e[1]).sum();
    let dup: u64 = per_pub.iter().map(|e| e[2]).sum();
    let reorder: u64 = per_pub.iter().map(|e| e[3]).sum();
    let stalls: u64 = pubs_res.iter().map(|r| r.stalls).sum();
    let rate = if measured_s > 0.0 {
        delivered as f64 / measured_s
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
    let (p50, p99, p999, pmax) = (q(0.5), q(0.99), q(0.999), h.max());
    let tck = stats::clk_tck();
    let cpu_s = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / tck as f64),
        _ => None,
    };
    let broker_cpu = cpu_s(cpu0.broker_ticks, cpu1.broker_ticks);
    let bench_cpu = cpu_s(cpu0.self_ticks, cpu1.self_ticks);
    let per_msg = |c: Option<f64>| {
        c.filter(|_| delivered > 0)
            .map(|c| c * 1e6 / delivered as f64)
    };
    let kinds = counters.error_kinds();

    println!("---- summary ----");
    println!(
        "measured window  {measured_s:.2} s (after {:.1} s warmup), drain {drain_s:.2} s{}",
        args.warmup.as_secs_f64(),
        if drained {
            ""
        } else {
            " (timed out: messages still missing)"
        }
    );
    println!("sent             {total_sent} (whole run), expected deliveries {expected}");
    println!("received         {received} (whole run, duplicates included)");
    println!("delivered        {delivered} in the window = {rate:.0} msg/s");
    println!(
        "latency µs       p50 {p50}  p99 {p99}  p99.9 {p999}  max {pmax}  mean {:.0}  (n = {})",
        h.mean(),
        h.len()
    );
    println!(
        "lost {lost}  duplicated {dup}  reordered {reorder}  foreign {unexpected}  window stalls {stalls}"
    );
    if let Some(c) = broker_cpu {
        println!(
            "broker CPU       {c:.2} s in the window = {:.2} µs/msg",
            per_msg(Some(c)).unwrap_or(f64::NAN)
        );
    }
    if let Some(c) = bench_cpu {
        println!(
            "bench CPU        {c:.2} s in the window = {:.2} µs/msg",
            per_msg(Some(c)).unwrap_or(f64::NAN)
        );
    }
    let bad: Vec<usize> = (0..npub)
        .filter(|&p| per_pub[p][1] + per_pub[p][2] + per_pub[p][3] > 0)
        .collect();
    for &p in bad.iter().take(10) {
        let e = per_pub[p];
        println!(
            "  publisher {p}: sent {} received {} lost {} dup {} reorder {}",
            sent[p], e[0], e[1], e[2], e[3]
        );
    }
    if bad.len() > 10 {
        println!("  ... {} more publishers with anomalies", bad.len() - 10);
    }
    println!(
        "errors           {} {:?}",
        counters.errors.load(Relaxed),
        kinds
    );

    let mut j = Json::default();
    j.set("command", "bench")
        .set("ok", &true)
        .set("mode", args.mode.name())
        .set("host", &args.host)
        .set("port", &(args.port as u64))
        .set("mqtt_version", &format!("{:?}", args.version))
        .set("qos", &(args.qos as u8 as u64))
        .set("size", &args.size)
        .set("pubs", &npub)
        .set("subs", &nsub)
        .set("rate", &args.rate)
        .set("closed_loop", &args.closed_loop)
        .set("inflight", &args.inflight)
        .set("warmup_s", &args.warmup.as_secs_f64())
        .set("duration_s", &args.duration.as_secs_f64())
        .set("connect_s", &connect_s)
        .set("measured_s", &measured_s)
        .set("drain_s", &drain_s)
        .set("drained", &drained)
        .set("sent", &total_sent)
        .set("expected", &expected)
        .set("received", &received)
        .set("delivered", &delivered)
        .set("delivered_rate", &rate)
        .set("lost", &lost)
        .set("duplicated", &dup)
        .set("reordered", &reorder)
        .set("foreign", &unexpected)
        .set("window_stalls", &stalls)
        .set("latency_count", &h.len())
        .set("latency_us_p50", &p50)
        .set("latency_us_p99", &p99)
        .set("latency_us_p999", &p999)
        .set("latency_us_max", &pmax)
        .set("latency_us_mean", &h.mean())
        .set("clk_tck", &tck)
        .set("broker_pid", &args.broker_pid.map(u64::from))
        .set("broker_cpu_s", &broker_cpu)
        .set("broker_cpu_us_per_msg", &per_msg(broker_cpu))
        .set("bench_cpu_s", &bench_cpu)
        .set("bench_cpu_us_per_msg", &per_msg(bench_cpu))
        .set("connected", &counters.connected.load(Relaxed))
        .set("conn_failed", &counters.conn_failed.load(Relaxed))
        .set("disconnected", &counters.disconnected.load(Relaxed))
        .set("errors", &counters.errors.load(Relaxed))
        .raw("errors_by_kind", errors_json(&kinds));
    let per: Vec<String> = (0..npub)
        .map(|p| {
            let e = per_pub[p];
            let mut o = Json::default();
            o.set("id", &p)
                .set("sent", &sent[p])
                .set("received", &e[0])
                .set("lost", &e[1])
                .set("duplicated", &e[2])
                .set("reordered", &e[3])
                .set("error", &pubs_res.get(p).and_then(|r| r.error.clone()));
            o.inline()
        })
        .collect();
    j.raw("publishers", format!("[\n    {}\n  ]", per.join(",\n    ")));
    stats::write_json(args.json.as_deref(), &j)?;
    Ok(0)
}

fn pacing(args: &Args) -> String {
    match (args.rate, args.closed_loop) {
        (Some(r), _) => format!("fixed rate {r} msg/s total"),
        (None, Some(0)) => "unthrottled".into(),
        (None, Some(w)) => format!("closed loop, window {w}"),
        (None, None) => "unthrottled".into(),
    }
}

/// Wait for `n` ready reports; the first failure ends the wait.
async fn wait_ready(
    rx: &mut mpsc::UnboundedReceiver<Result<(), String>>,
    n: usize,
    deadline: tokio::time::Instant,
) -> Result<(), String> {
    for _ in 0..n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => return Err("setup: tasks ended early".into()),
            Err(_) => return Err("setup: timeout".into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::SeqTrack;

    #[test]
    fn in_order() {
        let mut t = SeqTrack::default();
        (0..10).for_each(|s| t.on_seq(s));
        assert_eq!((t.lost(10), t.dup, t.reorder), (0, 0, 0));
        assert_eq!(t.lost(12), 2, "tail loss");
    }

    #[test]
    fn gaps_reorder_and_dups() {
        let mut t = SeqTrack::default();
        for s in [0, 1, 4, 5, 2, 9, 2, 7, 0] {
            t.on_seq(s);
        }
        // missing: 3, 6, 8; 2 and 7 arrived late; 2 and 0 twice.
        assert_eq!(t.reorder, 2);
        assert_eq!(t.dup, 2);
        assert_eq!(t.lost(10), 3);
        assert_eq!(t.received, 9);
    }
}
