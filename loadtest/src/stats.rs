//! Shared counters, the per-second progress line, latency histograms,
//! `/proc` sampling of the broker and a tiny JSON writer.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::watch;

static START: OnceLock<Instant> = OnceLock::new();

/// The process-wide origin of every timestamp.
pub fn start_instant() -> Instant {
    *START.get_or_init(Instant::now)
}

/// Nanoseconds since [`start_instant`].
#[inline]
pub fn now_ns() -> u64 {
    start_instant().elapsed().as_nanos() as u64
}

/// The `Instant` of a [`now_ns`] value.
pub fn instant_at(ns: u64) -> Instant {
    start_instant() + Duration::from_nanos(ns)
}

/// Counters every task adds to (once per batch, not per message).
#[derive(Default)]
pub struct Counters {
    pub connected: AtomicU64,
    pub conn_failed: AtomicU64,
    pub disconnected: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub recv: AtomicU64,
    pub errors: AtomicU64,
    error_kinds: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    /// Count an error, grouped by its message.
    pub fn error(&self, msg: impl Into<String>) {
        self.errors.fetch_add(1, Relaxed);
        let mut m = self.error_kinds.lock().unwrap();
        let msg = msg.into();
        if m.len() < 64 || m.contains_key(&msg) {
            *m.entry(msg).or_default() += 1;
        } else {
            *m.entry("(other errors)".into()).or_default() += 1;
        }
    }

    pub fn error_kinds(&self) -> BTreeMap<String, u64> {
        self.error_kinds.lock().unwrap().clone()
    }
}

/// Print a progress line every second until `stop` turns true.
pub fn spawn_progress(
    counters: Arc<Counters>,
    target_conns: u64,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let t0 = Instant::now();
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let (mut last_sent, mut last_recv, mut last_conn) = (0, 0, 0);
        let mut last_t = t0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let now = Instant::now();
            let dt = (now - last_t).as_secs_f64().max(1e-9);
            let conn = counters.connected.load(Relaxed);
            let sent = counters.sent.load(Relaxed);
            let recv = counters.recv.load(Relaxed);
            println!(
                "[{:>4.0}s] conn {conn}/{target_conns} ({:.0}/s, failed {}, lost {})  \
                 sent {sent} ({:.0}/s)  recv {recv} ({:.0}/s)  errors {}",
                (now - t0).as_secs_f64(),
                (conn - last_conn.min(conn)) as f64 / dt,
                counters.conn_failed.load(Relaxed),
                counters.disconnected.load(Relaxed),
                (sent - last_sent) as f64 / dt,
                (recv - last_recv) as f64 / dt,
                counters.errors.load(Relaxed),
            );
            (last_sent, last_recv, last_conn, last_t) = (sent, recv, conn, now);
        }
    })
}

/// Latency histograms in µs, one per runtime thread: a subscriber records a
/// read's batch into its thread's histogram (an uncontended lock), and the
/// summary merges them. One per subscriber would cost ~140 KB each.
static REGISTRY: Mutex<Vec<Arc<Mutex<Histogram<u64>>>>> = Mutex::new(Vec::new());

thread_local! {
    static LOCAL: Arc<Mutex<Histogram<u64>>> = {
        let h = Arc::new(Mutex::new(new_histogram()));
        REGISTRY.lock().unwrap().push(h.clone());
        h
    };
}

/// 1 µs .. 1 hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap()
}

/// Record latencies (µs) into this thread's histogram.
pub fn record_latencies(us: &[u64]) {
    if us.is_empty() {
        return;
    }
    LOCAL.with(|h| {
        let mut h = h.lock().unwrap();
        for &v in us {
            h.saturating_record(v.max(1));
        }
    })
}

/// Every thread's histogram merged.
pub fn merged_latencies() -> Histogram<u64> {
    let mut all = new_histogram();
    for h in REGISTRY.lock().unwrap().iter() {
        all.add(&*h.lock().unwrap()).unwrap();
    }
    all
}

/// utime + stime of a process, clock ticks (`/proc/PID/stat` fields 14, 15).
pub fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 (comm) may hold spaces and parentheses: split after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3; fields 14 and 15 are at 11 and 12.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// VmRSS of a process in KiB.
pub fn proc_rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// CPU time of the broker (if a pid was given) and of this process.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    pub broker_ticks: Option<u64>,
    pub self_ticks: Option<u64>,
}

impl CpuSample {
    pub fn take(broker: Option<u32>) -> CpuSample {
        Self::take_all(broker, &[])
    }

    /// As `take`, the CPU time of the `more` broker processes added.
    pub fn take_all(broker: Option<u32>, more: &[u32]) -> CpuSample {
        let broker_ticks = broker.and_then(proc_cpu_ticks).and_then(|t| {
            more.iter()
                .try_fold(t, |sum, &pid| Some(sum + proc_cpu_ticks(pid)?))
        });
        CpuSample {
            broker_ticks,
            self_ticks: proc_cpu_ticks(std::process::id()),
        }
    }
}

/// Raise RLIMIT_NOFILE to its hard limit; returns the soft limit in force.
pub fn raise_nofile() -> u64 {
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
        r.rlim_cur
    }
}

/// A JSON object written key by key, one top-level key per line (so shell
/// scripts can grep a value out without a JSON tool).
#[derive(Default)]
pub struct Json {
    fields: Vec<(String, String)>,
}

/// A value that can be written as JSON.
pub trait ToJson {
    fn to_json(&self) -> String;
}

impl ToJson for u64 {
    fn to_json(&self) -> String {
        self.to_string()
    }
}
impl ToJson for usize {
    fn to_json(&self) -> String {
        self.to_string()
    }
}
impl ToJson for f64 {
    fn to_json(&self) -> String {
        if self.is_finite() {
            format!("{self:.3}")
        } else {
            "null".into()
        }
    }
}
impl ToJson for bool {
    fn to_json(&self) -> String {
        self.to_string()
    }
}
impl ToJson for str {
    fn to_json(&self) -> String {
        let mut s = String::with_capacity(self.len() + 2);
        s.push('"');
        for c in self.chars() {
            match c {
                '"' => s.push_str("\\\""),
                '\\' => s.push_str("\\\\"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(s, "\\u{:04x}", c as u32);
                }
                c => s.push(c),
            }
        }
        s.push('"');
        s
    }
}
impl ToJson for String {
    fn to_json(&self) -> String {
        self.as_str().to_json()
    }
}
impl<T: ToJson> ToJson for Option<T> {
    fn to_json(&self) -> String {
        match self {
            Some(v) => v.to_json(),
            None => "null".into(),
        }
    }
}

impl Json {
    pub fn set<V: ToJson + ?Sized>(&mut self, key: &str, v: &V) -> &mut Self {
        self.fields.push((key.to_string(), v.to_json()));
        self
    }

    /// A nested value already rendered (an array of objects, a map).
    pub fn raw(&mut self, key: &str, json: String) -> &mut Self {
        self.fields.push((key.to_string(), json));
        self
    }

    /// Render on one line (for nesting).
    pub fn inline(&self) -> String {
        let parts: Vec<String> = self
            .fields
            .iter()
            .map(|(k, v)| format!("{}: {v}", k.to_json()))
            .collect();
        format!("{{{}}}", parts.join(", "))
    }

    pub fn render(&self) -> String {
        let parts: Vec<String> = self
            .fields
            .iter()
            .map(|(k, v)| format!("  {}: {v}", k.to_json()))
            .collect();
        format!("{{\n{}\n}}\n", parts.join(",\n"))
    }
}

/// A JSON map of error message → count.
pub fn errors_json(m: &BTreeMap<String, u64>) -> String {
    let mut j = Json::default();
    for (k, v) in m {
        j.set(k, v);
    }
    j.inline()
}

/// Write the JSON summary if asked.
pub fn write_json(path: Option<&std::path::Path>, j: &Json) -> Result<(), String> {
    if let Some(p) = path {
        std::fs::write(p, j.render()).map_err(|e| format!("--json {}: {e}", p.display()))?;
        println!("summary written to {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_self() {
        let pid = std::process::id();
        assert!(proc_cpu_ticks(pid).is_some());
        assert!(proc_rss_kb(pid).unwrap() > 0);
    }

    #[test]
    fn json_escapes() {
        let mut j = Json::default();
        j.set("a", "x\"y\n").set("n", &3u64).set("f", &f64::NAN);
        assert_eq!(j.inline(), r#"{"a": "x\"y\u000a", "n": 3, "f": null}"#);
    }
}
