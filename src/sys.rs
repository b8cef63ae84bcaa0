//! `$SYS` topics with Mosquitto's names (`$SYS/broker/clients/connected`,
//! `.../load/messages/received/1min`, ...), so `mosquitto_sub -t '$SYS/#'`
//! and the dashboards built for it work.
//!
//! [`SysTree`] is sans-IO: the shards' reports and the time in, the
//! topics whose value changed out. The broker's `sys` thread (not a
//! shard's) gathers the reports every `mqtt.sys_interval_s` and hands the
//! changes to shard 0, which publishes them retained at QoS 0 to this
//! node's subscribers. `$SYS` messages are never written to the log (a
//! restart does not bring back the last run's figures) nor sent to other
//! nodes, and no client may publish to `$SYS` (`Session::may_write`).
//!
//! Where the meaning differs from Mosquitto's: `messages/received` and
//! `messages/sent` count PUBLISH packets (Mosquitto counts every packet),
//! the same as `publish/messages/...`; `clients/disconnected` is the
//! persistent sessions without a connection.

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::hash::HashMap;
use crate::shard::runtime::{gather_reports, Control};
use crate::shard::ShardReport;

/// True for the broker's own topics, `$SYS` and below.
pub fn is_sys_topic(topic: &str) -> bool {
    topic == "$SYS" || topic.starts_with("$SYS/")
}

/// Largest `mqtt.sys_interval_s`.
pub const INTERVAL_S_MAX: u64 = 86_400;

/// The broker-wide counts one update reads from the reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    connected: u64,
    sessions: u64,
    subscriptions: u64,
    retained: u64,
    stored: u64,
    received: u64,
    sent: u64,
    dropped: u64,
    bytes_received: u64,
    bytes_sent: u64,
    connects: u64,
}

impl Totals {
    fn of(reports: &[ShardReport]) -> Totals {
        let mut t = Totals::default();
        for r in reports {
            let s = &r.stats;
            let m = &r.messages;
            t.connected += s.connections as u64;
            t.sessions += r.sessions as u64;
            t.subscriptions += r.subscriptions as u64;
            t.retained += r.retained as u64;
            t.stored += s.queued + s.inflight;
            t.received += m.received.iter().sum::<u64>();
            t.sent += m.sent.iter().sum::<u64>();
            t.dropped += crate::metrics::dropped_by_reason(r).iter().sum::<u64>();
            t.bytes_received += s.bytes_received;
            t.bytes_sent += s.bytes_sent;
            t.connects += s.connects_accepted;
        }
        t
    }
}

/// One of the totals.
type Counter = fn(&Totals) -> u64;

/// The counters that have a `load/.../{1min,5min,15min}` average, with
/// the topic part Mosquitto gives them.
const LOADS: [(&str, Counter); 8] = [
    ("messages/received", |t| t.received),
    ("messages/sent", |t| t.sent),
    ("publish/received", |t| t.received),
    ("publish/sent", |t| t.sent),
    ("publish/dropped", |t| t.dropped),
    ("bytes/received", |t| t.bytes_received),
    ("bytes/sent", |t| t.bytes_sent),
    ("connections", |t| t.connects),
];

/// The averaging windows, seconds, and their topic suffix.
const WINDOWS: [(f64, &str); 3] = [(60.0, "1min"), (300.0, "5min"), (900.0, "15min")];

/// What the `$SYS` tree last said, and the state of its load averages.
#[derive(Debug)]
pub struct SysTree {
    version: String,
    started: Instant,
    /// The totals and time of the last update (None before the first).
    last: Option<(Instant, Totals)>,
    /// Per `LOADS` entry and window: the average, per minute.
    loads: [[f64; 3]; LOADS.len()],
    /// The most connections seen at an update.
    connected_max: u64,
    /// The payload last published per topic: only changes go out.
    published: HashMap<String, String>,
}

impl SysTree {
    /// A tree for a broker that started at `started`.
    pub fn new(started: Instant) -> SysTree {
        SysTree {
            version: format!("shardmq version {}", env!("CARGO_PKG_VERSION")),
            started,
            last: None,
            loads: [[0.0; 3]; LOADS.len()],
            connected_max: 0,
            published: HashMap::default(),
        }
    }

    /// The topics whose payload changed since the last update (all of
    /// them at the first), from the shards' `reports` at `now`.
    pub fn update(&mut self, now: Instant, reports: &[ShardReport]) -> Vec<(String, String)> {
        let t = Totals::of(reports);
        self.connected_max = self.connected_max.max(t.connected);
        let uptime = now.saturating_duration_since(self.started).as_secs();
        let offline = t.sessions.saturating_sub(t.connected);
        let mut values: Vec<(String, String)> = vec![
            ("version".into(), self.version.clone()),
            ("uptime".into(), format!("{uptime} seconds")),
            ("clients/connected".into(), t.connected.to_string()),
            ("clients/active".into(), t.connected.to_string()),
            ("clients/disconnected".into(), offline.to_string()),
            ("clients/inactive".into(), offline.to_string()),
            ("clients/total".into(), t.sessions.to_string()),
            ("clients/maximum".into(), self.connected_max.to_string()),
            ("messages/received".into(), t.received.to_string()),
            ("messages/sent".into(), t.sent.to_string()),
            ("messages/stored".into(), t.stored.to_string()),
            ("store/messages/count".into(), t.stored.to_string()),
            ("publish/messages/received".into(), t.received.to_string()),
            ("publish/messages/sent".into(), t.sent.to_string()),
            ("publish/messages/dropped".into(), t.dropped.to_string()),
            ("bytes/received".into(), t.bytes_received.to_string()),
            ("bytes/sent".into(), t.bytes_sent.to_string()),
            ("subscriptions/count".into(), t.subscriptions.to_string()),
            ("retained messages/count".into(), t.retained.to_string()),
        ];
        if let Some((then, before)) = self.last {
            let elapsed = now.saturating_duration_since(then);
            if elapsed >= Duration::from_millis(1) {
                self.average(elapsed.as_secs_f64(), &before, &t);
            }
        }
        for (i, (name, _)) in LOADS.iter().enumerate() {
            for (w, (_, suffix)) in WINDOWS.iter().enumerate() {
                let v = self.loads[i][w];
                values.push((format!("load/{name}/{suffix}"), format!("{v:.2}")));
            }
        }
        self.last = Some((now, t));
        let mut changed = Vec::new();
        for (name, payload) in values {
            let topic = format!("$SYS/broker/{name}");
            if self.published.get(&topic) != Some(&payload) {
                self.published.insert(topic.clone(), payload.clone());
                changed.push((topic, payload));
            }
        }
        changed
    }

    /// Mosquitto's load averages: the rate over the last `elapsed_s`, per
    /// minute, folded into each window's exponential moving average
    /// (`new = rate + e^(-elapsed/window) * (old - rate)`).
    fn average(&mut self, elapsed_s: f64, before: &Totals, now: &Totals) {
        for (i, (_, counter)) in LOADS.iter().enumerate() {
            let delta = counter(now).saturating_sub(counter(before)) as f64;
            let rate = delta * 60.0 / elapsed_s;
            for (w, (window_s, _)) in WINDOWS.iter().enumerate() {
                let e = (-elapsed_s / window_s).exp();
                let old = self.loads[i][w];
                self.loads[i][w] = rate + e * (old - rate);
            }
        }
    }
}

/// The `sys` thread: every `interval`, the shards' reports in, the
/// changed topics to shard 0; it ends when [`SysThread::stop`] is called
/// or the broker drops it.
pub(crate) struct SysThread {
    stop: Option<Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SysThread {
    /// Start publishing every `interval` through `controls` (shard 0
    /// publishes), counting uptime from `started`.
    pub(crate) fn start(
        controls: Vec<Sender<Control>>,
        interval: Duration,
        started: Instant,
    ) -> std::io::Result<SysThread> {
        let (stop, stopped) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name("sys".into())
            .spawn(move || run(&controls, interval, started, &stopped))?;
        Ok(SysThread {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stop the thread and wait for it (at most one gather, 2 s).
    pub(crate) fn stop(mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(controls: &[Sender<Control>], interval: Duration, started: Instant, stop: &Receiver<()>) {
    let mut tree = SysTree::new(started);
    let mut next = Instant::now();
    loop {
        match stop.recv_deadline(next) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            _ => return, // stopped (the sender is dropped)
        }
        next += interval;
        let reports = gather_reports(controls);
        if reports.len() < controls.len() {
            // A shard did not answer in time: sums would dip; try later.
            continue;
        }
        let changed = tree.update(Instant::now(), &reports);
        if !changed.is_empty() && controls[0].send(Control::Sys(changed)).is_err() {
            return;
        }
        // A slow gather does not make the updates bunch up.
        next = next.max(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(connections: usize, sessions: usize, received: u64) -> ShardReport {
        let mut r = ShardReport {
            sessions,
            ..Default::default()
        };
        r.stats.connections = connections;
        r.messages.received[1] = received;
        r
    }

    fn value<'a>(changed: &'a [(String, String)], name: &str) -> Option<&'a str> {
        let topic = format!("$SYS/broker/{name}");
        changed
            .iter()
            .find(|(t, _)| *t == topic)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn the_first_update_says_everything_then_only_changes() {
        let t0 = Instant::now();
        let mut tree = SysTree::new(t0);
        let first = tree.update(
            t0 + Duration::from_secs(10),
            &[report(2, 3, 5), report(1, 1, 0)],
        );
        assert_eq!(value(&first, "clients/connected"), Some("3"));
        assert_eq!(value(&first, "clients/total"), Some("4"));
        assert_eq!(value(&first, "clients/disconnected"), Some("1"));
        assert_eq!(value(&first, "messages/received"), Some("5"));
        assert_eq!(value(&first, "uptime"), Some("10 seconds"));
        assert_eq!(value(&first, "load/messages/received/1min"), Some("0.00"));
        assert!(value(&first, "version")
            .unwrap()
            .starts_with("shardmq version "));
        assert_eq!(first.len(), 19 + LOADS.len() * WINDOWS.len());
        // Nothing moved but the clock: only the uptime.
        let second = tree.update(
            t0 + Duration::from_secs(20),
            &[report(2, 3, 5), report(1, 1, 0)],
        );
        assert_eq!(
            second,
            vec![("$SYS/broker/uptime".into(), "20 seconds".into())]
        );
        // One client left: connected down, the maximum kept.
        let third = tree.update(
            t0 + Duration::from_secs(30),
            &[report(2, 3, 5), report(0, 1, 0)],
        );
        assert_eq!(value(&third, "clients/connected"), Some("2"));
        assert_eq!(value(&third, "clients/maximum"), None, "still 3");
    }

    #[test]
    fn load_averages_follow_mosquittos_formula() {
        let t0 = Instant::now();
        let mut tree = SysTree::new(t0);
        tree.update(t0, &[report(0, 0, 0)]);
        // 600 messages in 60 s: 600 per minute; the 1-minute average moves
        // 1 - e^-1 of the way there, the 5-minute one 1 - e^-0.2.
        let c = tree.update(t0 + Duration::from_secs(60), &[report(0, 0, 600)]);
        let one = 600.0 * (1.0 - (-1.0f64).exp());
        let five = 600.0 * (1.0 - (-0.2f64).exp());
        assert_eq!(
            value(&c, "load/messages/received/1min"),
            Some(format!("{one:.2}").as_str())
        );
        assert_eq!(
            value(&c, "load/publish/received/5min"),
            Some(format!("{five:.2}").as_str())
        );
        assert_eq!(value(&c, "load/messages/sent/1min"), None, "still 0.00");
        // A steady rate converges on it.
        for m in 2..40u64 {
            tree.update(t0 + Duration::from_secs(60 * m), &[report(0, 0, 600 * m)]);
        }
        let v: f64 = tree.published["$SYS/broker/load/messages/received/1min"]
            .parse()
            .unwrap();
        assert!((v - 600.0).abs() < 0.01, "{v}");
    }

    #[test]
    fn sys_topics_are_sys_and_below_only() {
        assert!(is_sys_topic("$SYS"));
        assert!(is_sys_topic("$SYS/broker/uptime"));
        assert!(!is_sys_topic("$SYSTEM/x"));
        assert!(!is_sys_topic("a/$SYS"));
    }
}
