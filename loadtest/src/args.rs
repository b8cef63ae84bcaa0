//! Command line parsing on clap, emqtt-bench compatible where the flags
//! overlap: `-x VALUE`, `--long VALUE` and `--long=VALUE` are accepted; `-h`
//! is the host, as in emqtt-bench; help is `--help`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Publisher i → subscriber i on `bench/{i}`.
    Pairs,
    /// One publisher → every subscriber on one topic.
    Fanout,
    /// Every publisher → one subscriber on `bench/#`.
    Fanin,
    /// Publisher i on `bench/{i}`, every subscriber in one shared
    /// subscription `$share/bench/bench/#`: each message to exactly one of
    /// them (a fleet of devices and its backends). Needs --rate.
    Shared,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Pairs => "pairs",
            Mode::Fanout => "fanout",
            Mode::Fanin => "fanin",
            Mode::Shared => "shared",
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
    /// More broker processes whose CPU time is added (cluster nodes).
    pub also_broker_pids: Vec<u32>,
    pub threads: usize,
    pub max_connecting: usize,
    pub connect_timeout: Duration,
    pub quiet: bool,
    /// TLS, and the CA file to check the broker's certificate with.
    pub ssl: bool,
    pub cacertfile: Option<PathBuf>,
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
    /// bench: the port subscribers connect to (None: `port`).
    pub sub_port: Option<u16>,
}

/// What `--help` shows after the options.
const EXAMPLES: &str = "\
Payload of bench (-s >= 20): publisher id u32, sequence u64, send time u64 (ns
since the process started), big-endian, then zeros.

EXAMPLES:
  shardmq-bench conn -c 1000 -i 0 --duration 10
  shardmq-bench sub -c 10 -t 't/%i' -q 1 --duration 30
  shardmq-bench pub -c 10 -t 't/%i' -I 10 -q 1 -L 1000
  shardmq-bench bench --mode pairs --pubs 100 --subs 100 -q 0 -s 64 \\
      --closed-loop 200 --warmup 2 --duration 10 --json out.json
  shardmq-bench bench --mode pairs --pubs 100 --subs 100 --rate 20000 --duration 10";

/// MQTT load generator (emqtt-bench style) for shardmq and other brokers.
///
/// emqtt-bench's commands and flags (`-h` is the host, as there; help is
/// `--help`), plus `bench`: publishers and subscribers in one process,
/// measuring throughput, end-to-end latency and loss. Every run is bounded
/// by --duration.
#[derive(Debug, Parser)]
#[command(name = "shardmq-bench", arg_required_else_help = true, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Open -c connections and hold them.
    #[command(disable_help_flag = true)]
    Conn {
        #[command(flatten)]
        common: Common,
    },
    /// -c publishers, each publishing every -I ms.
    #[command(disable_help_flag = true)]
    Pub {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        pubsub: PubSub,
    },
    /// -c subscribers on -t.
    #[command(disable_help_flag = true)]
    Sub {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        pubsub: PubSub,
    },
    /// Publishers and subscribers in one process: throughput, end-to-end
    /// latency, loss.
    #[command(disable_help_flag = true, after_help = EXAMPLES)]
    Bench {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        bench: BenchOnly,
    },
}

/// Options of every command (emqtt-bench names).
#[derive(Debug, clap::Args)]
struct Common {
    /// Broker host.
    #[arg(short = 'h', long, default_value = "localhost")]
    host: String,
    /// Broker port.
    #[arg(short, long, default_value_t = 1883)]
    port: u16,
    /// Clients (conn/pub/sub).
    #[arg(short, long, default_value_t = 200)]
    count: usize,
    /// First client sequence number.
    #[arg(short = 'n', long = "startnumber", default_value_t = 0)]
    start: u64,
    /// Delay between two connects, ms (0 = as fast as --max-connecting allows).
    #[arg(short = 'i', long = "interval", default_value_t = 10.0)]
    interval_ms: f64,
    /// MQTT 3.1 (3), 3.1.1 (4) or 5.0 (5).
    #[arg(short = 'V', long = "version", default_value = "5", value_parser = parse_version)]
    version: Version,
    /// Keepalive, seconds.
    #[arg(short, long, default_value_t = 300)]
    keepalive: u16,
    /// Clean session / Clean Start; false with -x > 0 (5.0) keeps a
    /// persistent session.
    #[arg(short = 'C', long, default_value = "true", action = clap::ArgAction::Set)]
    clean: bool,
    /// 5.0 Session Expiry Interval, seconds.
    #[arg(short = 'x', long = "session-expiry", default_value_t = 0)]
    session_expiry: u32,
    /// Username.
    #[arg(short, long)]
    username: Option<String>,
    /// Password.
    #[arg(short = 'P', long)]
    password: Option<String>,
    /// Client id prefix; ids are PREFIX_KIND_PID_SEQ.
    #[arg(long, default_value = "smqb")]
    prefix: String,
    /// QoS 0, 1 or 2.
    #[arg(short, long, default_value = "0", value_parser = parse_qos)]
    qos: QoS,
    /// Payload size, bytes (default 256 for pub, 64 for bench).
    #[arg(short, long)]
    size: Option<usize>,
    /// Stop after SECS; every run is bounded.
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_secs)]
    duration: Duration,
    /// Unacknowledged QoS 1/2 publishes per publisher at most.
    #[arg(long, default_value_t = 64)]
    inflight: usize,
    /// Write the summary as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Sample the broker's CPU time (/proc/PID/stat) and RSS
    /// (/proc/PID/status) over the measured window.
    #[arg(long = "broker-pid", value_name = "PID")]
    broker_pid: Option<u32>,
    /// Another broker process whose CPU time counts as the broker's (the
    /// other nodes of a cluster); may be given more than once.
    #[arg(long = "also-broker-pid", value_name = "PID")]
    also_broker_pid: Vec<u32>,
    /// Runtime worker threads (default: CPUs).
    #[arg(long)]
    threads: Option<usize>,
    /// Connects in progress at once.
    #[arg(long = "max-connecting", default_value_t = 100)]
    max_connecting: usize,
    /// Per-connection TCP + CONNACK (+ SUBACK) timeout, seconds.
    #[arg(long = "connect-timeout", value_name = "SECS", default_value = "10", value_parser = parse_secs)]
    connect_timeout: Duration,
    /// No per-second progress lines.
    #[arg(long)]
    quiet: bool,
    /// TLS (emqtt-bench's --ssl); without --cacertfile the broker's
    /// certificate is not checked (loopback benchmarks).
    #[arg(short = 'S', long = "ssl")]
    ssl: bool,
    /// CA certificates (PEM) the broker's certificate must chain to.
    #[arg(long = "cacertfile", value_name = "FILE")]
    cacertfile: Option<PathBuf>,
    /// Print help (-h is the host, as in emqtt-bench).
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
}

/// Options of `pub` and `sub`.
#[derive(Debug, clap::Args)]
struct PubSub {
    /// Topic (pub) or filter (sub); %i = client sequence number, %c = client
    /// id, %u = username.
    #[arg(short, long, required = true)]
    topic: Option<String>,
    /// Publish interval per client, ms (pub; 0 = as fast as the socket takes).
    #[arg(short = 'I', long = "interval_of_msg", default_value_t = 1000.0)]
    pub_interval_ms: f64,
    /// pub: messages per publisher; sub: total messages received, then stop
    /// (0 = no limit).
    #[arg(short = 'L', long, default_value_t = 0)]
    limit: u64,
}

/// Options of `bench`.
#[derive(Debug, clap::Args)]
struct BenchOnly {
    /// pairs: publisher i -> subscriber i; fanout: 1 publisher -> --subs
    /// subscribers; fanin: --pubs publishers -> 1 subscriber (PREFIX/#).
    #[arg(long, value_enum, default_value = "pairs")]
    mode: Mode,
    /// Publishers (default 10; pairs: --pubs = --subs).
    #[arg(long)]
    pubs: Option<usize>,
    /// Subscribers (default 10).
    #[arg(long)]
    subs: Option<usize>,
    /// Fixed rate: R msg/s in total, evenly paced over the publishers.
    #[arg(long, value_name = "R")]
    rate: Option<f64>,
    /// Each publisher pauses while it is more than W messages ahead of the
    /// slowest of its subscribers (default without --rate: 100; 0 =
    /// unthrottled).
    #[arg(long = "closed-loop", value_name = "W")]
    closed_loop: Option<u64>,
    /// Messages per publisher (default: until --duration).
    #[arg(long, default_value_t = 0)]
    messages: u64,
    /// Seconds not measured; --duration counts after them.
    #[arg(long, value_name = "SECS", default_value = "0", value_parser = parse_secs)]
    warmup: Duration,
    /// Wait at most this long for in-flight messages after the publishers
    /// stop, seconds.
    #[arg(long, value_name = "SECS", default_value = "2", value_parser = parse_secs)]
    drain: Duration,
    /// Topic prefix.
    #[arg(long = "topic-prefix", default_value = "bench")]
    topic_prefix: String,
    /// Subscribers connect to this port of the host (another node of a
    /// cluster) instead of --port.
    #[arg(long = "sub-port", value_name = "PORT")]
    sub_port: Option<u16>,
}

fn parse_secs(v: &str) -> Result<Duration, String> {
    let s: f64 = v
        .parse()
        .map_err(|_| format!("{v:?}: not a number of seconds"))?;
    if !(0.0..=86_400.0).contains(&s) {
        return Err(format!("{v}: must be in 0..=86400 seconds"));
    }
    Ok(Duration::from_secs_f64(s))
}

fn parse_version(v: &str) -> Result<Version, String> {
    match v {
        "3" => Ok(Version::V3_1),
        "4" => Ok(Version::V3_1_1),
        "5" => Ok(Version::V5),
        _ => Err(format!("{v}: must be 3 (3.1), 4 (3.1.1) or 5")),
    }
}

fn parse_qos(v: &str) -> Result<QoS, String> {
    v.parse::<u8>()
        .ok()
        .and_then(QoS::from_u8)
        .ok_or_else(|| format!("{v}: must be 0, 1 or 2"))
}

/// `Ok(None)` means help was printed.
pub fn parse(argv: Vec<String>) -> Result<Option<Args>, String> {
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    Ok(None)
                }
                _ => Err(e.to_string()),
            };
        }
    };
    let (command, common, pubsub, bench) = match cli.command {
        Cmd::Conn { common } => (Command::Conn, common, None, None),
        Cmd::Pub { common, pubsub } => (Command::Pub, common, Some(pubsub), None),
        Cmd::Sub { common, pubsub } => (Command::Sub, common, Some(pubsub), None),
        Cmd::Bench { common, bench } => (Command::Bench, common, None, Some(bench)),
    };
    let threads = common.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let mut a = Args {
        command,
        host: common.host,
        port: common.port,
        count: common.count,
        start: common.start,
        interval_ms: common.interval_ms,
        pub_interval_ms: pubsub.as_ref().map_or(1000.0, |p| p.pub_interval_ms),
        topic: pubsub.as_ref().and_then(|p| p.topic.clone()),
        qos: common.qos,
        size: common
            .size
            .unwrap_or(if command == Command::Bench { 64 } else { 256 }),
        version: common.version,
        keepalive: common.keepalive,
        clean: common.clean,
        session_expiry: common.session_expiry,
        username: common.username,
        password: common.password,
        limit: pubsub.as_ref().map_or(0, |p| p.limit),
        prefix: common.prefix,
        duration: common.duration,
        json: common.json,
        inflight: common.inflight,
        broker_pid: common.broker_pid,
        also_broker_pids: common.also_broker_pid,
        threads,
        max_connecting: common.max_connecting,
        connect_timeout: common.connect_timeout,
        quiet: common.quiet,
        ssl: common.ssl || common.cacertfile.is_some(),
        cacertfile: common.cacertfile,
        mode: bench.as_ref().map_or(Mode::Pairs, |b| b.mode),
        pubs: bench.as_ref().and_then(|b| b.pubs).unwrap_or(10),
        subs: bench.as_ref().and_then(|b| b.subs).unwrap_or(10),
        rate: bench.as_ref().and_then(|b| b.rate),
        closed_loop: bench.as_ref().and_then(|b| b.closed_loop),
        messages: bench.as_ref().map_or(0, |b| b.messages),
        warmup: bench.as_ref().map_or(Duration::ZERO, |b| b.warmup),
        drain: bench.as_ref().map_or(Duration::from_secs(2), |b| b.drain),
        topic_prefix: bench
            .as_ref()
            .map_or_else(|| "bench".into(), |b| b.topic_prefix.clone()),
        sub_port: bench.as_ref().and_then(|b| b.sub_port),
    };
    let pubs_set = bench.as_ref().is_some_and(|b| b.pubs.is_some());
    let subs_set = bench.as_ref().is_some_and(|b| b.subs.is_some());
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
                Mode::Shared => {
                    if a.rate.is_none() {
                        return Err("--mode shared needs --rate (no closed loop: a message \
                                    may go to any subscriber)"
                            .into());
                    }
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
        // A shared group has no closed loop: a message may go to any member.
        assert!(p("bench --mode shared --pubs 10 --subs 2").is_err());
        let a = p("bench --mode shared --pubs 10 --subs 2 --rate 100")
            .unwrap()
            .unwrap();
        assert_eq!((a.pubs, a.subs, a.closed_loop), (10, 2, None));
        assert!(p("bench -t x").is_err());
        assert!(p("conn --mode pairs").is_err());
        assert!(p("pub -c 1").is_err(), "pub needs -t");
        let a = p("bench --pubs=3 --duration=1.5").unwrap().unwrap();
        assert_eq!((a.pubs, a.subs), (3, 3));
        assert_eq!(a.duration, Duration::from_millis(1500));
    }

    /// Every command line the READMEs and loadtest/compare.sh use parses,
    /// and means what it says.
    #[test]
    fn the_documented_command_lines_parse() {
        for line in [
            "conn -h 127.0.0.1 -c 1000 -i 0 --duration 10 --broker-pid 42",
            "sub -h 127.0.0.1 -c 10 -t load/%i -q 1 --duration 30",
            "pub -h 127.0.0.1 -c 10 -t load/%i -q 1 -I 10 -L 1000 --duration 30",
            "bench -h 127.0.0.1 --mode pairs --pubs 100 -q 0 -s 64 --closed-loop 200 --warmup 2 \
             --duration 10 --json pairs.json",
            "bench -h 127.0.0.1 --mode pairs --pubs 100 --rate 20000 --duration 10",
            "bench -h 127.0.0.1 --mode fanout --subs 100 --duration 10",
            "bench -h 127.0.0.1 --mode fanin --pubs 100 --closed-loop 8 --duration 10",
            "bench --mode pairs --pubs 100 --subs 100 -q 1 --closed-loop 200 --inflight 64 -s 64 \
             --warmup 2 --duration 10 --drain 2 --quiet -p 28883 --json f.json",
            "bench --mode pairs --pubs 100 --subs 100 -q 1 --closed-loop 200 --inflight 64 -V 5 \
             -C false -x 600 -s 64 --warmup 2 --duration 10 --drain 2 --quiet",
            "pub -t t -u user -P pass -k 30 -n 5 --prefix x --threads 2 --max-connecting 7 \
             --connect-timeout 3 --topic-prefix-is-not-here",
        ] {
            let last = line.ends_with("--topic-prefix-is-not-here");
            let r = p(line);
            if last {
                assert!(r.is_err(), "an unknown flag is refused: {line}");
                continue;
            }
            assert!(matches!(r, Ok(Some(_))), "{line}: {r:?}");
        }
        let a = p("bench --mode pairs --pubs 100 --subs 100 -q 1 --closed-loop 200 --inflight 64 -V 5 -C false -x 600 -s 64 --warmup 2 --duration 10 --drain 2 --quiet")
            .unwrap()
            .unwrap();
        assert_eq!((a.pubs, a.subs, a.inflight), (100, 100, 64));
        assert_eq!(
            (a.clean, a.session_expiry, a.version),
            (false, 600, Version::V5)
        );
        assert_eq!((a.closed_loop, a.quiet), (Some(200), true));
        assert_eq!(
            (a.warmup, a.drain),
            (Duration::from_secs(2), Duration::from_secs(2))
        );
        let a = p("pub -t t -u user -P pass -k 30 -n 5 --prefix x --threads 2")
            .unwrap()
            .unwrap();
        assert_eq!(a.username.as_deref(), Some("user"));
        assert_eq!(a.password.as_deref(), Some("pass"));
        assert_eq!((a.keepalive, a.start, a.threads), (30, 5, 2));
        assert!(matches!(p("--help"), Ok(None)));
        assert!(matches!(p("bench --help"), Ok(None)));
        assert!(matches!(p(""), Ok(None)), "no command: help");
    }

    #[test]
    fn topic_substitution() {
        assert_eq!(
            subst_topic("a/%i/%c/%u", 7, "cid", Some("bob")),
            "a/7/cid/bob"
        );
    }
}
