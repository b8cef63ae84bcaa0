//! The `shardmq` binary: parse flags, load the config, run the broker until
//! SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use shardmq::config::DEFAULT_CONFIG;
use shardmq::{Broker, Config};

const USAGE: &str = "\
shardmq: a thread-per-core MQTT 3.1 / 3.1.1 / 5.0 broker

USAGE: shardmq [OPTIONS]

OPTIONS:
  --config FILE            TOML config, merged over the embedded default
  --listen ADDR            listen on ADDR (host:port); repeat for several;
                           replaces server.listen from the config
  --shards N               shards (threads); 0 = one per CPU
  --data-dir DIR           directory of the logs (storage.data_dir)
  --durability MODE        kill_safe, power_safe or memory (storage.durability)
  --print-default-config   print the embedded default config and exit
  -h, --help               this text
  -V, --version            version

Logging: RUST_LOG=debug|info|warn (default info).";

/// What the command line asked for.
struct Args {
    config: Option<PathBuf>,
    listen: Vec<String>,
    shards: Option<usize>,
    data_dir: Option<PathBuf>,
    durability: Option<String>,
}

fn parse_args() -> anyhow::Result<Option<Args>> {
    let mut args = Args {
        config: None,
        listen: Vec::new(),
        shards: None,
        data_dir: None,
        durability: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--config" => args.config = Some(value("--config")?.into()),
            "--listen" => args.listen.push(value("--listen")?),
            "--shards" => {
                let v = value("--shards")?;
                args.shards = Some(
                    v.parse()
                        .with_context(|| format!("--shards {v}: not a number"))?,
                );
            }
            "--data-dir" => args.data_dir = Some(value("--data-dir")?.into()),
            "--durability" => args.durability = Some(value("--durability")?),
            "--print-default-config" => {
                print!("{DEFAULT_CONFIG}");
                return Ok(None);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "-V" | "--version" => {
                println!("shardmq {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    Ok(Some(args))
}

fn load_config(args: &Args) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if !args.listen.is_empty() {
        config.server.listen = args
            .listen
            .iter()
            .map(|a| {
                a.parse()
                    .with_context(|| format!("--listen {a}: not an address like 0.0.0.0:1883"))
            })
            .collect::<anyhow::Result<_>>()?;
    }
    if let Some(n) = args.shards {
        config.server.shards = n;
    }
    if let Some(d) = &args.data_dir {
        config.storage.data_dir = d.clone();
    }
    if let Some(d) = &args.durability {
        config.storage.durability = d.clone();
    }
    config.validate()?;
    Ok(config)
}

fn run() -> anyhow::Result<()> {
    let Some(args) = parse_args()? else {
        return Ok(());
    };
    let config = load_config(&args)?;
    let shards = config.shard_count();
    let config_timeout = config.server.shutdown_timeout_s;
    let broker = Broker::start(config)?;
    let addrs: Vec<String> = broker.local_addrs().iter().map(|a| a.to_string()).collect();
    log::info!(
        "shardmq listening on {} with {shards} shards",
        addrs.join(", ")
    );
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("cannot install signal handlers")?;
    if let Some(sig) = signals.forever().next() {
        log::info!(
            "signal {sig}: stopping (at most {} s; a second signal exits at once)",
            config_timeout
        );
    }
    // A second signal ends the process at once. Nothing acknowledged is
    // lost: kill_safe acknowledges after the copy into the mapping, which
    // outlives the process; power_safe after the sync.
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            log::warn!("signal {sig} during shutdown: exiting now");
            std::process::exit(128 + sig);
        }
    });
    let summary = broker.stop();
    log::info!("stopped: {summary}");
    Ok(())
}

/// A panic anywhere (a shard thread above all) ends the process at once,
/// non-zero, after logging the panic, the thread (`shard-N`) and the client
/// whose packets it was handling: a half-alive broker whose dead shard
/// leaves its clients waiting for a CONNACK forever is worse than a restart
/// (systemd's `Restart=on-failure`) that runs recovery.
fn exit_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let thread = std::thread::current();
        let client = shardmq::shard::last_client()
            .map(|c| format!(" while handling client {}", shardmq::text::quote(&c)))
            .unwrap_or_default();
        log::error!(
            "thread {} panicked{client}: {info}; exiting (code 101) so that the broker is \
             restarted and recovers",
            thread.name().unwrap_or("?")
        );
        std::process::exit(101);
    }));
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    exit_on_panic();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shardmq: {e}");
            ExitCode::from(2)
        }
    }
}
