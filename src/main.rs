//! The `shardmq` binary: parse the command line (clap), load the config,
//! run the broker until SIGINT or SIGTERM; or one of the subcommands.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use sd_notify::NotifyState;
use shardmq::config::DEFAULT_CONFIG;
use shardmq::{Broker, Config};

/// A thread-per-core MQTT 3.1 / 3.1.1 / 5.0 broker.
///
/// Without a subcommand, runs the broker: the embedded default config,
/// merged with --config FILE, then the flags (each also read from its
/// SHARDMQ_* environment variable). Logging: RUST_LOG=debug|info|warn
/// (default info).
#[derive(Debug, Parser)]
#[command(name = "shardmq", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

/// The flags that shape a running broker.
#[derive(Debug, Args)]
struct RunArgs {
    /// TOML config, merged over the embedded default.
    #[arg(long, value_name = "FILE", env = "SHARDMQ_CONFIG")]
    config: Option<PathBuf>,
    /// Listen on ADDR (host:port) over plain TCP; repeat for several (the
    /// variable takes a comma-separated list). Replaces server.listen, or,
    /// when the config has [[listeners]], adds to them.
    #[arg(
        long,
        value_name = "ADDR",
        env = "SHARDMQ_LISTEN",
        value_delimiter = ','
    )]
    listen: Vec<String>,
    /// Shards (threads); 0 = one per CPU. Replaces server.shards.
    #[arg(long, value_name = "N", env = "SHARDMQ_SHARDS")]
    shards: Option<usize>,
    /// Directory of the logs. Replaces storage.data_dir.
    #[arg(long, value_name = "DIR", env = "SHARDMQ_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// kill_safe, power_safe or memory. Replaces storage.durability.
    #[arg(long, value_name = "MODE", env = "SHARDMQ_DURABILITY")]
    durability: Option<String>,
    /// This node's name in a cluster. Replaces cluster.node_id; without
    /// it (and without cluster.node_id) the broker runs alone.
    #[arg(long, value_name = "ID", env = "SHARDMQ_NODE_ID")]
    node_id: Option<String>,
    /// Where cluster membership listens (UDP, ip:port). Replaces
    /// cluster.listen.
    #[arg(long, value_name = "ADDR", env = "SHARDMQ_CLUSTER_LISTEN")]
    cluster_listen: Option<String>,
    /// The address peers reach this node at, when cluster.listen is
    /// 0.0.0.0. Replaces cluster.advertise.
    #[arg(long, value_name = "ADDR", env = "SHARDMQ_CLUSTER_ADVERTISE")]
    cluster_advertise: Option<String>,
    /// Addresses (ip:port) of existing cluster members, comma-separated;
    /// any of them will do, and they need not be up yet. Replaces
    /// cluster.join.
    #[arg(
        long,
        value_name = "ADDR[,ADDR...]",
        env = "SHARDMQ_JOIN",
        value_delimiter = ','
    )]
    join: Vec<String>,
    /// A file holding the cluster's shared secret (at least 16 bytes):
    /// only nodes that hold it join and link. Replaces
    /// cluster.secret_file.
    #[arg(long, value_name = "PATH", env = "SHARDMQ_CLUSTER_SECRET_FILE")]
    cluster_secret_file: Option<String>,
    /// Serve GET /metrics on ADDR (host:port; port 0: any free one, named
    /// in the log); an empty value: no HTTP listener. Replaces http.bind.
    #[arg(long, value_name = "ADDR", env = "SHARDMQ_HTTP")]
    http: Option<String>,
    /// Print the embedded default config (every key commented) and exit.
    #[arg(long)]
    print_default_config: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Parse and validate a config file as the broker would at start, and
    /// print the merged config; exit 2 naming the bad key.
    CheckConfig {
        /// The TOML file.
        file: PathBuf,
    },
    /// Manage a password file (Mosquitto's format, `mosquitto_passwd`'s
    /// options): add or change USER (the password is asked twice on the
    /// terminal, or given with -b), delete USER (-D), or hash every plain
    /// password of a `user:password` file (-U). Writes $7$ (PBKDF2-SHA512,
    /// 101 iterations) lines, which Mosquitto reads too.
    Passwd(PasswdArgs),
    /// Ask a running broker through its HTTP listener's admin API (JSON
    /// out): status, clients, client, kick, subscriptions, publish,
    /// retained, cluster. Exit 0 on success; 1 when the broker says no, is not
    /// ready (status: for health checks) or cannot be reached.
    Ctl(CtlArgs),
    /// Print a shell completion script, e.g. `shardmq completions bash >
    /// /etc/bash_completion.d/shardmq`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// `shardmq ctl`.
#[derive(Debug, Args)]
struct CtlArgs {
    /// The broker's HTTP listener (its http.bind).
    #[arg(
        long,
        value_name = "ADDR",
        env = "SHARDMQ_HTTP",
        default_value = "127.0.0.1:8080"
    )]
    http: String,
    /// The bearer token (the broker's http.api_token).
    #[arg(long, value_name = "TOKEN", env = "SHARDMQ_API_TOKEN")]
    token: Option<String>,
    /// What to ask.
    #[command(subcommand)]
    action: CtlAction,
}

/// `shardmq ctl` actions.
#[derive(Debug, Subcommand)]
enum CtlAction {
    /// The broker's status: ready, shards, connections, sessions, uptime.
    Status,
    /// A page of clients (sessions), as JSON; --all follows every page.
    Clients {
        /// Only client ids that start with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Only sessions whose last login was this user.
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// One client: its connection, session and subscriptions.
    Client {
        /// Client id.
        id: String,
    },
    /// Disconnect a client (5.0: DISCONNECT 0x98, administrative action);
    /// its will is published as for any abnormal end.
    Kick {
        /// Client id.
        id: String,
        /// End its session too (subscriptions and queued messages go).
        #[arg(long)]
        discard: bool,
    },
    /// A page of subscriptions, as JSON; --all follows every page.
    Subscriptions {
        /// Only clients whose id starts with this.
        #[arg(long)]
        prefix: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Publish a message as the broker (no ACL applies).
    Publish {
        /// Topic name.
        topic: String,
        /// Payload (text; --base64: base64 of the bytes).
        message: String,
        /// QoS 0, 1 or 2.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
        qos: u8,
        /// Retain it.
        #[arg(long)]
        retain: bool,
        /// MESSAGE is base64.
        #[arg(long)]
        base64: bool,
    },
    /// Show the retained message of a topic; --delete removes it.
    Retained {
        /// Topic name.
        topic: String,
        /// Delete it instead.
        #[arg(long)]
        delete: bool,
    },
    /// A cluster node's members, which are up, and whether they are a
    /// majority; --forget NAME removes a member that is down for good
    /// (on this node: ask each node).
    Cluster {
        /// Forget this member (it must be down).
        #[arg(long, value_name = "NAME")]
        forget: Option<String>,
    },
}

/// The paging flags of `ctl clients` and `ctl subscriptions`.
#[derive(Debug, Args)]
struct PageArgs {
    /// Entries per page (1-1000).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Where to go on from (the `next` of an earlier page).
    #[arg(long, conflicts_with = "all")]
    cursor: Option<String>,
    /// Every page, as one JSON array.
    #[arg(long)]
    all: bool,
}

/// Characters left as they are in a path segment (RFC 3986 unreserved).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `s` as one path segment.
fn segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

/// A topic as path segments, its `/` kept.
fn topic_path(topic: &str) -> String {
    topic.split('/').map(segment).collect::<Vec<_>>().join("/")
}

/// `name=value` for each given query parameter, joined.
fn query(params: &[(&str, Option<String>)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (name, value) in params {
        if let Some(v) = value {
            q.append_pair(name, v);
        }
    }
    q.finish()
}

/// `shardmq ctl`: exit 0 when the answer is 2xx, 1 otherwise (or when
/// the broker cannot be reached).
fn ctl(args: CtlArgs) -> ExitCode {
    let ask = |method: &str, path: &str, body: Option<String>| {
        ctl_request(&args.http, args.token.as_deref(), method, path, body)
    };
    // One page, or with --all every page from the first as one array.
    let page = |resource: &str, filters: Vec<(&str, Option<String>)>, page: &PageArgs| {
        let mut cursor = page.cursor.clone();
        let mut items: Vec<serde_json::Value> = Vec::new();
        loop {
            let mut p = filters.clone();
            p.push(("limit", Some(page.limit.to_string())));
            p.push(("cursor", cursor.clone()));
            let (status, body) = ask("GET", &format!("/api/v1/{resource}?{}", query(&p)), None)?;
            if !page.all || status != 200 {
                return Ok((status, body));
            }
            let v: serde_json::Value = serde_json::from_str(&body).context("not JSON")?;
            items.extend(v["data"].as_array().cloned().unwrap_or_default());
            match v["next"].as_str() {
                Some(n) => cursor = Some(n.to_string()),
                None => return Ok((200, serde_json::Value::from(items).to_string())),
            }
        }
    };
    let answer: anyhow::Result<(u16, String)> = match args.action {
        CtlAction::Status => ask("GET", "/api/v1/status", None),
        CtlAction::Clients {
            ref prefix,
            ref user,
            page: ref p,
        } => {
            let filters = vec![("prefix", prefix.clone()), ("user", user.clone())];
            page("clients", filters, p)
        }
        CtlAction::Client { ref id } => {
            ask("GET", &format!("/api/v1/clients/{}", segment(id)), None)
        }
        CtlAction::Kick { ref id, discard } => {
            let q = if discard { "?discard=true" } else { "" };
            ask(
                "DELETE",
                &format!("/api/v1/clients/{}{q}", segment(id)),
                None,
            )
        }
        CtlAction::Subscriptions {
            ref prefix,
            page: ref p,
        } => page("subscriptions", vec![("prefix", prefix.clone())], p),
        CtlAction::Publish {
            ref topic,
            ref message,
            qos,
            retain,
            base64,
        } => {
            let body = serde_json::json!({
                "topic": topic,
                "payload": message,
                "payload_encoding": if base64 { "base64" } else { "plain" },
                "qos": qos,
                "retain": retain,
            });
            ask("POST", "/api/v1/publish", Some(body.to_string()))
        }
        CtlAction::Cluster { ref forget } => match forget {
            None => ask("GET", "/api/v1/cluster", None),
            Some(name) => ask(
                "DELETE",
                &format!("/api/v1/cluster/members/{}", segment(name)),
                None,
            ),
        },
        CtlAction::Retained { ref topic, delete } => {
            let method = if delete { "DELETE" } else { "GET" };
            ask(
                method,
                &format!("/api/v1/retained/{}", topic_path(topic)),
                None,
            )
        }
    };
    match answer {
        Ok((200..=299, body)) => {
            println!("{body}");
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!("shardmq ctl: HTTP {status}: {body}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("shardmq ctl: cannot reach the broker: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// One request to the broker's HTTP listener at `http`: status and body.
fn ctl_request(
    http: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<String>,
) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let addr: SocketAddr = http
        .parse()
        .with_context(|| format!("--http {http}: not an address like 127.0.0.1:8080"))?;
    let timeout = std::time::Duration::from_secs(5);
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("{addr}"))?;
    // A page may ask several shards, each given 2 s.
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    s.set_write_timeout(Some(timeout))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let body = body.unwrap_or_default();
    let kind = match body.is_empty() {
        true => "",
        false => "Content-Type: application/json\r\n",
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}{kind}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    s.take(64 << 20).read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .context("not an HTTP answer")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("not an HTTP answer")?;
    Ok((status, body.trim_end().to_string()))
}

/// `shardmq passwd`.
#[derive(Debug, Args)]
struct PasswdArgs {
    /// Create FILE (replacing an existing one) with USER only.
    #[arg(short = 'c', conflicts_with_all = ["delete", "upgrade"])]
    create: bool,
    /// Take PASSWORD from the command line (it shows in `ps` and shell
    /// history: for scripts and tests).
    #[arg(short = 'b', conflicts_with_all = ["delete", "upgrade"])]
    batch: bool,
    /// Delete USER from FILE.
    #[arg(short = 'D', conflicts_with = "upgrade")]
    delete: bool,
    /// Hash the plain passwords of FILE (`user:password` lines) in place.
    #[arg(short = 'U')]
    upgrade: bool,
    /// The password file.
    file: PathBuf,
    /// The user name (not with -U).
    #[arg(required_unless_present = "upgrade")]
    user: Option<String>,
    /// The password (-b only).
    #[arg(requires = "batch")]
    password: Option<String>,
}

/// The config the flags describe: the file (or the default), then the flags.
fn load_config(args: &RunArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if !args.listen.is_empty() {
        let addrs: Vec<SocketAddr> = args
            .listen
            .iter()
            .map(|a| parse_listen(a))
            .collect::<anyhow::Result<_>>()?;
        // Beside [[listeners]] they add plain TCP listeners; otherwise
        // they replace server.listen.
        match config.listeners.is_empty() {
            true => config.server.listen = addrs,
            false => config
                .listeners
                .extend(addrs.into_iter().map(shardmq::config::ListenerConfig::tcp)),
        }
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
    if let Some(id) = &args.node_id {
        config.cluster.node_id = id.clone();
    }
    if let Some(a) = &args.cluster_listen {
        config.cluster.listen = parse_addr("--cluster-listen", a)?;
    }
    if let Some(a) = &args.http {
        config.http.bind = a.trim().to_string();
    }
    if let Some(a) = &args.cluster_advertise {
        config.cluster.advertise = a.trim().to_string();
    }
    if let Some(f) = &args.cluster_secret_file {
        config.cluster.secret_file = f.clone();
    }
    if !args.join.is_empty() {
        config.cluster.join = args
            .join
            .iter()
            .filter(|a| !a.trim().is_empty())
            .map(|a| parse_addr("--join", a))
            .collect::<anyhow::Result<_>>()?;
    }
    config.validate()?;
    Ok(config)
}

fn parse_listen(a: &str) -> anyhow::Result<SocketAddr> {
    a.trim()
        .parse()
        .with_context(|| format!("--listen {a}: not an address like 0.0.0.0:1883"))
}

fn parse_addr(flag: &str, a: &str) -> anyhow::Result<SocketAddr> {
    a.trim()
        .parse()
        .with_context(|| format!("{flag} {a}: not an address like 127.0.0.1:7946"))
}

/// `shardmq check-config FILE`.
fn check_config(file: &Path) -> anyhow::Result<()> {
    // Parsing validates, as at start.
    let config = Config::from_file(file)?;
    let auth = shardmq::auth::Auth::load(&config.auth)?;
    let secret = shardmq::cluster::secret::ClusterSecret::from_setting(&config.cluster.secret_file)
        .map_err(anyhow::Error::msg)?;
    if let Some((_, Some(w))) = secret {
        eprintln!("shardmq: {w}");
    }
    print!("{}", config.to_toml());
    eprintln!("shardmq: {}", auth.describe());
    eprintln!("shardmq: {}: valid", file.display());
    Ok(())
}

fn passwd(args: PasswdArgs) -> anyhow::Result<()> {
    use shardmq::auth::passwd::{edit_file, hash_pbkdf2, hash_plain_file, lists, new_salt, Edit};
    let file = &args.file;
    let read =
        || std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()));
    let text = if args.upgrade {
        hash_plain_file(&read()?, new_salt).with_context(|| format!("{}", file.display()))?
    } else {
        let user = args.user.as_deref().expect("clap requires it without -U");
        if user.is_empty() || user.contains(':') {
            anyhow::bail!("a user name must be non-empty and without ':'");
        }
        let old = match args.create {
            true => String::new(),
            false => read()?,
        };
        let edit = match args.delete {
            true => {
                if !lists(&old, user) {
                    anyhow::bail!("user {user:?} is not in {}", file.display());
                }
                Edit::Delete
            }
            false => {
                let password = match args.password {
                    Some(p) => p,
                    None => ask_password()?,
                };
                Edit::Set(hash_pbkdf2(password.as_bytes(), &new_salt()?))
            }
        };
        edit_file(&old, user, edit)
    };
    write_private(file, &text)
}

/// Ask for a password twice on the terminal, without echo.
fn ask_password() -> anyhow::Result<String> {
    let first = rpassword::prompt_password("Password: ").context("cannot read the password")?;
    let again =
        rpassword::prompt_password("Reenter password: ").context("cannot read the password")?;
    if first != again {
        anyhow::bail!("the passwords do not match");
    }
    Ok(first)
}

/// Replace `path` with `text` atomically (a temporary file renamed over
/// it), readable by its owner only: it holds password hashes.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .context("the password file needs a file name")?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.print_default_config {
        print!("{DEFAULT_CONFIG}");
        return Ok(());
    }
    let config = load_config(&args)?;
    let shards = config.shard_count();
    let config_timeout = config.server.shutdown_timeout_s;
    // Before the start: a signal during recovery, or right after the
    // "listening" line, is an orderly stop too.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])
    .context("cannot install signal handlers")?;
    let broker = Broker::start(config)?;
    let addrs: Vec<String> = broker.local_addrs().iter().map(|a| a.to_string()).collect();
    log::info!(
        "shardmq listening on {} with {shards} shards",
        addrs.join(", ")
    );
    // Recovery is done and every shard listens: ready (systemd's
    // Type=notify; nothing happens outside systemd).
    let status = format!("listening on {}", addrs.join(", "));
    systemd(&[NotifyState::Ready, NotifyState::Status(&status)]);
    // SIGHUP: read the password and ACL files again.
    let stop = signals.forever().find(|&sig| {
        if sig != signal_hook::consts::SIGHUP {
            return true;
        }
        let now = NotifyState::monotonic_usec_now();
        systemd(&[
            NotifyState::Reloading,
            now.unwrap_or(NotifyState::Status("reloading")),
        ]);
        match broker.reload_auth() {
            Ok(now) => log::info!("SIGHUP: reloaded {now}"),
            Err(e) => log::error!("SIGHUP: {e}; the rules in force stay"),
        }
        match broker.reload_tls() {
            Ok(now) => log::info!("SIGHUP: reloaded {now}"),
            Err(e) => log::error!("SIGHUP: {e}; the certificates in use stay"),
        }
        systemd(&[NotifyState::Ready, NotifyState::Status(&status)]);
        false
    });
    systemd(&[NotifyState::Stopping]);
    if let Some(sig) = stop {
        log::info!(
            "signal {sig}: stopping (at most {config_timeout} s; a second signal exits at once)"
        );
    }
    // A second signal ends the process at once. Nothing acknowledged is
    // lost: kill_safe acknowledges after the copy into the mapping, which
    // outlives the process; power_safe after the sync.
    std::thread::spawn(move || {
        let hup = signal_hook::consts::SIGHUP;
        if let Some(sig) = signals.forever().find(|&s| s != hup) {
            log::warn!("signal {sig} during shutdown: exiting now");
            std::process::exit(128 + sig);
        }
    });
    let summary = broker.stop();
    log::info!("stopped: {summary}");
    Ok(())
}

/// Tell systemd (`$NOTIFY_SOCKET`, set for `Type=notify` units) how the
/// broker is; without systemd there is no socket and nothing is sent.
fn systemd(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        log::warn!("cannot notify systemd: {e}");
    }
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
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::CheckConfig { file }) => check_config(&file),
        Some(Command::Passwd(args)) => passwd(args),
        Some(Command::Ctl(args)) => return ctl(args),
        Some(Command::Completions { shell }) => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "shardmq",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        None => run(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shardmq: {e}");
            ExitCode::from(2)
        }
    }
}
