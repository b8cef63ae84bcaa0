//! Command line parsing, emqtt-bench compatible where the flags overlap.
//!
//! Hand-rolled (no parser crate): `-x VALUE`, `--long VALUE` and
//! `--long=VALUE` are accepted. `-h` is the host, as in emqtt-bench; help is
//! `--help`.

use std::path::PathBuf;
use std::time::Duration;

use shardmq::codec::{QoS, Version};

/// The subcommand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Conn,
    Pub,
    Sub,
    Bench,
}

impl Command {
    pub fn name(self) -> &'static str {
        match self {
            Command::Conn => "conn",
            Command::Pub => "pub",
            Command::Sub => "sub",
            Command::Bench => "bench",
        }
    }
}

/// Topology of `bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Publisher i → subscriber i on `bench/{i}`.
    Pairs,
    /// One publisher → every subscriber on one topic.
    Fanout,
    /// Every publisher → one subscriber on `bench/#`.
    Fanin,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Pairs => "pairs",
            Mode::Fanout => "fanout",
            Mode::Fanin => "fanin",
        }
    }
}

/// Everything the command line can say; each subcommand reads its part.
#[derive(Debug, Clone)]
pub struct Args {
    pub command: Command,
    pub host: String,
    pub port: u16,
    pub count: usize,
    pub start: u64,
    pub interval_ms: f64,
    pub pub_interval_ms: f64,
    pub topic: Option<String>,
    pub qos: QoS,
    pub size: usize,
    pub version: Version,
    pub keepalive: u16,
    /// Clean session (3.x) / Clean Start (5.0).
    pub clean: bool,
    /// 5.0 Session Expiry Interval, seconds (3.x: a persistent session when
    /// `clean` is false).
    pub session_expiry: u32,
    pub username: Option<String>,
    pub password: Option<String>,
    /// 0 = no limit.
    pub limit: u64,
    pub prefix: String,
    pub duration: Duration,
    pub json: Option<PathBuf>,
    pub inflight: usize,
    pub broker_pid: Option<u32>,
    pub threads: usize,
    pub max_connecting: usize,
    pub connect_timeout: Duration,
    pub quiet: bool,
    // bench only
    pub mode: Mode,
    pub pubs: usize,
    pub subs: usize,
    pub rate: Option<f64>,
    pub closed_loop: Option<u64>,
    /// Per publisher, 0 = no limit.
    pub messages: u64,
    pub warmup: Duration,
    pub drain: Duration,
    pub topic_prefix: String,
}

pub const USAGE: &str = "\
shardmq-bench: MQTT load generator (emqtt-bench style) for shardmq and other brokers

USAGE:
  shardmq-bench conn  [OPTIONS]   open -c connections and hold them
  shardmq-bench pub   [OPTIONS]   -c publishers, each publishing every -I ms
  shardmq-bench sub   [OPTIONS]   -c subscribers on -t
  shardmq-bench bench [OPTIONS]   publishers and subscribers in one process:
                                  throughput, end-to-end latency, loss
  shardmq-bench help | --help

COMMON OPTIONS (emqtt-bench names):
  -h, --host HOST          broker host (default localhost)
  -p, --port PORT          broker port (default 1883)
  -c, --count N            clients (conn/pub/sub; default 200)
  -n, --startnumber N      first client sequence number (default 0)
  -i, --interval MS        delay between two connects (default 10; 0 = as fast
                           as --max-connecting allows)
  -V, --version 3|4|5      MQTT 3.1, 3.1.1 or 5.0 (default 5)
  -k, --keepalive SECS     keepalive (default 300)
  -C, --clean true|false   clean session / Clean Start (default true); false
                           with -x > 0 (5.0) keeps a persistent session
  -x, --session-expiry S   5.0 Session Expiry Interval (default 0)
  -u, --username USER      username
  -P, --password PASS      password
      --prefix PREFIX      client id prefix (default smqb); ids are
                           PREFIX_KIND_PID_SEQ
  -q, --qos 0|1|2          QoS (default 0)
  -s, --size BYTES         payload size (default 256 for pub, 64 for bench)
      --duration SECS      stop after SECS (default 60); every run is bounded
      --inflight N         max unacknowledged QoS 1/2 publishes per publisher
                           (default 64)
      --json FILE          write the summary as JSON
      --broker-pid PID     sample the broker's CPU time (/proc/PID/stat) and
                           RSS (/proc/PID/status) over the measured window
      --threads N          runtime worker threads (default: CPUs)
      --max-connecting N   connects in progress at once (default 100)
      --connect-timeout S  per-connection TCP + CONNACK (+ SUBACK) timeout
                           (default 10)
      --quiet              no per-second progress lines

PUB / SUB:
  -t, --topic TOPIC        topic (pub) or filter (sub), required; %i = client
                           sequence number, %c = client id, %u = username
  -I, --interval_of_msg MS publish interval per client (pub; default 1000;
                           0 = as fast as the socket takes)
  -L, --limit N            pub: messages per publisher; sub: total messages
                           received, then stop (default: no limit)

BENCH:
      --mode pairs|fanout|fanin
                           pairs: publisher i -> subscriber i on PREFIX/{i};
                           fanout: 1 publisher -> --subs subscribers;
                           fanin: --pubs publishers -> 1 subscriber (PREFIX/#)
                           (default pairs)
      --pubs N / --subs M  publishers / subscribers (default 10; pairs: N = M)
      --rate R             fixed rate: R msg/s in total, evenly paced over the
                           publishers (for latency at a given load)
      --closed-loop W      each publisher pauses while it is more than W
                           messages ahead of the slowest of its subscribers
                           (default when --rate is not given: W = 100;
                           W = 0: unthrottled)
      --messages N         messages per publisher (default: until --duration)
      --warmup SECS        not measured (default 0); --duration counts after it
      --drain SECS         wait at most this long for in-flight messages after
                           the publishers stop (default 2)
      --topic-prefix P     topic prefix (default bench)
  Payload (-s >= 20): publisher id u32, sequence u64, send time u64 (ns since
  the process started), big-endian, then zeros.

EXAMPLES:
  shardmq-bench conn -c 1000 -i 0 --duration 10
  shardmq-bench sub -c 10 -t 't/%i' -q 1 --duration 30
  shardmq-bench pub -c 10 -t 't/%i' -I 10 -q 1 -L 1000
  shardmq-bench bench --mode pairs --pubs 100 --subs 100 -q 0 -s 64 \\
      --closed-loop 200 --warmup 2 --duration 10 --json out.json
  shardmq-bench bench --mode pairs --pubs 100 --subs 100 --rate 20000 --duration 10";

fn parse_num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{flag} {v:?}: not a valid number"))
}

fn parse_secs(flag: &str, v: &str) -> Result<Duration, String> {
    let s: f64 = parse_num(flag, v)?;
    if !(0.0..=86_400.0).contains(&s) {
        return Err(format!("{flag} {v}: must be in 0..=86400 seconds"));
    }
    Ok(Duration::from_secs_f64(s))
}

/// `Ok(None)` means help was printed.
pub fn parse(argv: Vec<String>) -> Result<Option<Args>, String> {
    let mut it = argv.into_iter().skip(1).peekable();
    let command = match it.next().as_deref() {
        Some("conn") => Command::Conn,
        Some("pub") => Command::Pub,
        Some("sub") => Command::Sub,
        Some("bench") => Command::Bench,
        Some("help" | "--help") | None => {
            println!("{USAGE}");
            return Ok(None);
        }
        Some(other) => return Err(format!("unknown command {other:?} (see --help)")),
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let mut a = Args {
        command,
        host: "localhost".into(),
        port: 1883,
        count: 200,
        start: 0,
        interval_ms: 10.0,
        pub_interval_ms: 1000.0,
        topic: None,
        qos: QoS::AtMostOnce,
        size: if command == Command::Bench { 64 } else { 256 },
        version: Version::V5,
        keepalive: 300,
        clean: true,
        session_expiry: 0,
        username: None,
        password: None,
        limit: 0,
        prefix: "smqb".into(),
        duration: Duration::from_secs(60),
        json: None,
        inflight: 64,
        broker_pid: None,
        threads,
        max_connecting: 100,
        connect_timeout: Duration::from_secs(10),
        quiet: false,
        mode: Mode::Pairs,
        pubs: 10,
        subs: 10,
        rate: None,
        closed_loop: None,
        messages: 0,
        warmup: Duration::ZERO,
        drain: Duration::from_secs(2),
        topic_prefix: "bench".into(),
    };
    let mut pubs_set = false;
    let mut subs_set = false;
    while let Some(raw) = it.next() {
        let (flag, inline) = match raw.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (raw.clone(), None),
        };
        if flag == "--help" {
            println!("{USAGE}");
            return Ok(None);
        }
        if flag == "--quiet" {
            a.quiet = true;
            continue;
        }
        let mut value = || -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it.next().ok_or_else(|| format!("{flag} needs a value")),
            }
        };
        let bench_only = [
            "--mode",
            "--pubs",
            "--subs",
            "--rate",
            "--closed-loop",
            "--messages",
            "--warmup",
            "--drain",
            "--topic-prefix",
        ];
        let pubsub_only = ["-t", "--topic", "-I", "--interval_of_msg", "-L", "--limit"];
        if command != Command::Bench && bench_only.contains(&flag.as_str()) {
            return Err(format!("{flag} is a `bench` option"));
        }
        if command == Command::Bench && pubsub_only.contains(&flag.as_str()) {
            return Err(format!(
                "{flag} is a pub/sub option (bench picks its own topics; see --help)"
            ));
        }
        match flag.as_str() {
            "-h" | "--host" => a.host = value()?,
            "-p" | "--port" => a.port = parse_num(&flag, &value()?)?,
            "-c" | "--count" => a.count = parse_num(&flag, &value()?)?,
            "-n" | "--startnumber" => a.start = parse_num(&flag, &value()?)?,
            "-i" | "--interval" => a.interval_ms = parse_num(&flag, &value()?)?,
            "-I" | "--interval_of_msg" => a.pub_interval_ms = parse_num(&flag, &value()?)?,
            "-t" | "--topic" => a.topic = Some(value()?),
            "-q" | "--qos" => {
                let v: u8 = parse_num(&flag, &value()?)?;
                a.qos = QoS::from_u8(v).ok_or_else(|| format!("{flag} {v}: must be 0, 1 or 2"))?;
            }
            "-s" | "--size" => a.size = parse_num(&flag, &value()?)?,
            "-V" | "--version" => {
                a.version = match value()?.as_str() {
                    "3" => Version::V3_1,
                    "4" => Version::V3_1_1,
                    "5" => Version::V5,
                    v => return Err(format!("{flag} {v}: must be 3 (3.1), 4 (3.1.1) or 5")),
                }
            }
            "-k" | "--keepalive" => a.keepalive = parse_num(&flag, &value()?)?,
            "-C" | "--clean" => {
                a.clean = match value()?.as_str() {
                    "true" => true,
                    "false" => false,
                    v => return Err(format!("{flag} {v:?}: true or false")),
                }
            }
            "-x" | "--session-expiry" => a.session_expiry = parse_num(&flag, &value()?)?,
            "-u" | "--username" => a.username = Some(value()?),
            "-P" | "--password" => a.password = Some(value()?),
            "-L" | "--limit" => a.limit = parse_num(&flag, &value()?)?,
            "--prefix" => a.prefix = value()?,
            "--duration" => a.duration = parse_secs(&flag, &value()?)?,
            "--json" => a.json = Some(value()?.into()),
            "--inflight" => a.inflight = parse_num(&flag, &value()?)?,
            "--broker-pid" => a.broker_pid = Some(parse_num(&flag, &value()?)?),
            "--threads" => a.threads = parse_num(&flag, &value()?)?,
            "--max-connecting" => a.max_connecting = parse_num(&flag, &value()?)?,
            "--connect-timeout" => a.connect_timeout = parse_secs(&flag, &value()?)?,
            "--mode" => {
                a.mode = match value()?.as_str() {
                    "pairs" => Mode::Pairs,
                    "fanout" => Mode::Fanout,
                    "fanin" => Mode::Fanin,
                    v => return Err(format!("--mode {v}: must be pairs, fanout or fanin")),
                }
            }
            "--pubs" => {
                a.pubs = parse_num(&flag, &value()?)?;
                pubs_set = true;
            }
            "--subs" => {
                a.subs = parse_num(&flag, &value()?)?;
                subs_set = true;
            }
            "--rate" => a.rate = Some(parse_num(&flag, &value()?)?),
            "--closed-loop" => a.closed_loop = Some(parse_num(&flag, &value()?)?),
            "--messages" => a.messages = parse_num(&flag, &value()?)?,
            "--warmup" => a.warmup = parse_secs(&flag, &value()?)?,
            "--drain" => a.drain = parse_secs(&flag, &value()?)?,
            "--topic-prefix" => a.topic_prefix = value()?,
            other => return Err(format!("unknown option {other:?} (see --help)")),
        }
    }
    validate(&mut a, pubs_set, subs_set)?;
    Ok(Some(a))
}

fn validate(a: &mut Args, pubs_set: bool, subs_set: bool) -> Result<(), String> {
    if a.duration.is_zero() {
        return Err("--duration must be > 0: every run is bounded".into());
    }
    if a.threads == 0 {
        return Err("--threads must be > 0".into());
    }
    if a.max_connecting == 0 {
        return Err("--max-connecting must be > 0".into());
    }
    if a.inflight == 0 || a.inflight > 65_535 {
        return Err("--inflight must be in 1..=65535".into());
    }
    let bad = |v: f64| v.is_nan() || v < 0.0;
    if bad(a.interval_ms) || bad(a.pub_interval_ms) {
        return Err("-i and -I must be >= 0".into());
    }
    match a.command {
        Command::Pub | Command::Sub if a.topic.is_none() => {
            return Err(format!("{} needs -t TOPIC", a.command.name()));
        }
        Command::Bench => {
            if a.size < crate::mqtt::HEADER_LEN {
                return Err(format!(
                    "-s {}: bench payloads carry a {}-byte header (publisher id u32, \
                     sequence u64, timestamp u64): use -s {} or more",
                    a.size,
                    crate::mqtt::HEADER_LEN,
                    crate::mqtt::HEADER_LEN
                ));
            }
            if a.rate.is_some() && a.closed_loop.is_some() {
                return Err("--rate and --closed-loop exclude each other".into());
            }
            if let Some(r) = a.rate {
                if r.is_nan() || r <= 0.0 {
                    return Err("--rate must be > 0".into());
                }
            }
            if a.rate.is_none() && a.closed_loop.is_none() {
                a.closed_loop = Some(100);
            }
            match a.mode {
                Mode::Pairs => {
                    if pubs_set && subs_set && a.pubs != a.subs {
                        return Err("--mode pairs needs --pubs = --subs".into());
                    }
                    if pubs_set && !subs_set {
                        a.subs = a.pubs;
                    } else if subs_set && !pubs_set {
                        a.pubs = a.subs;
                    }
                }
                Mode::Fanout => {
                    if pubs_set && a.pubs != 1 {
                        return Err("--mode fanout has 1 publisher (--pubs 1)".into());
                    }
                    a.pubs = 1;
                }
                Mode::Fanin => {
                    if subs_set && a.subs != 1 {
                        return Err("--mode fanin has 1 subscriber (--subs 1)".into());
                    }
                    a.subs = 1;
                }
            }
            if a.pubs == 0 || a.subs == 0 {
                return Err("--pubs and --subs must be > 0".into());
            }
        }
        _ => {}
    }
    Ok(())
}

/// emqtt-bench style topic substitution.
pub fn subst_topic(pattern: &str, seq: u64, client_id: &str, username: Option<&str>) -> String {
    pattern
        .replace("%i", &seq.to_string())
        .replace("%c", client_id)
        .replace("%u", username.unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Option<Args>, String> {
        parse(
            std::iter::once("shardmq-bench".to_string())
                .chain(s.split_whitespace().map(String::from))
                .collect(),
        )
    }

    #[test]
    fn emqtt_bench_flags() {
        let a = p("pub -h 127.0.0.1 -p 1884 -c 5 -n 3 -i 0 -I 20 -t t/%i -q 1 -s 32 -V 4 -L 9")
            .unwrap()
            .unwrap();
        assert_eq!(a.host, "127.0.0.1");
        assert_eq!(a.port, 1884);
        assert_eq!(a.count, 5);
        assert_eq!(a.start, 3);
        assert_eq!(a.qos, QoS::AtLeastOnce);
        assert_eq!(a.version, Version::V3_1_1);
        assert_eq!(a.limit, 9);
        assert_eq!(a.pub_interval_ms, 20.0);
    }

    #[test]
    fn bench_defaults_and_checks() {
        let a = p("bench --mode fanout --subs 7").unwrap().unwrap();
        assert_eq!((a.pubs, a.subs), (1, 7));
        assert_eq!(a.closed_loop, Some(100));
        assert!(p("bench -s 8").is_err());
        assert!(p("bench --rate 10 --closed-loop 5").is_err());
        assert!(p("bench -t x").is_err());
        assert!(p("conn --mode pairs").is_err());
        assert!(p("pub -c 1").is_err(), "pub needs -t");
        let a = p("bench --pubs=3 --duration=1.5").unwrap().unwrap();
        assert_eq!((a.pubs, a.subs), (3, 3));
        assert_eq!(a.duration, Duration::from_millis(1500));
    }

    #[test]
    fn topic_substitution() {
        assert_eq!(
            subst_topic("a/%i/%c/%u", 7, "cid", Some("bob")),
            "a/7/cid/bob"
        );
    }
}
