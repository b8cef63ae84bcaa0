//! Starting and stopping the broker: one glommio executor per shard.
//!
//! Node-wide: [`Broker`] lives on the thread that started it (the main
//! thread, or a test), owns the executors' join handles and a control lane to
//! each shard. Shards get their config by value and join the mesh themselves;
//! nothing but the control lanes and the join handles is shared.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use glommio::channels::channel_mesh::{Full, MeshBuilder};
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use thiserror::Error;

use crate::auth::{Auth, AuthError};
use crate::cluster::frame::{Hello, BRIDGE_VERSION};
use crate::cluster::link::LinkSettings;
use crate::cluster::membership::Membership;
use crate::cluster::node::{bump_incarnation, clock_incarnation, Node, NodeName};
use crate::config::{AuthConfig, Config, ConfigError, Durability, Transport};
use crate::listen::{self, ListenError, PortLock};
use crate::log::dir::DataDir;
use crate::persist::recover::{recover, RecoveryError, RecoverySettings};
use crate::shard::mesh::Batch;
use crate::shard::runtime::quorum::{starting_members, MembersFile, Quorum};
use crate::shard::runtime::{
    run_shard, BridgeStart, ClusterStart, Control, Durable, Lanes, ShardCluster,
};
use crate::shard::StopReport;

/// Entries of each io_uring ring a shard's executor makes (glommio's
/// default is 128). Every socket that waits to be readable holds a poll
/// request in the main ring, and each turn of the executor's loop cancels
/// and sets again its preemption timer; the kernel looks a cancel up among
/// the polls of one bucket of a table whose size follows the ring's (8
/// buckets at 128 entries, 256, its most, from 4,096). With 10,000 idle
/// connections on one shard, that lookup was a third of the shard's CPU
/// while clients connected, and the fleet rows (10,000 publishers) spent
/// about a third more CPU per message than with 4,096 entries (README,
/// "Fastest per core"). The cost: about 1.2 MB more of ring memory per
/// shard, and glommio's throughput preemption (counted in completions, as
/// many as the ring has entries) comes later; no task here waits on it.
pub const RING_DEPTH: usize = 4096;

/// Why the broker could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listen address cannot be used.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// An operating system limit is too low and could not be raised.
    #[error("{0}")]
    Limit(String),
    /// The kernel refuses io_uring to this process.
    #[error("{0}")]
    IoUring(String),
    /// The logs could not be recovered.
    #[error(transparent)]
    Recovery(#[from] RecoveryError),
    /// The password or ACL file is unreadable or invalid.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A TLS listener's certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// Cluster membership could not start.
    #[error("cluster: {0}")]
    Cluster(String),
    /// The HTTP listener cannot listen.
    #[error("http.bind {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A shard failed to start.
    #[error("shard {shard} failed to start: {why}")]
    Shard {
        /// Which shard.
        shard: usize,
        /// Why.
        why: String,
    },
}

/// A running broker; see the module docs.
pub struct Broker {
    addrs: Vec<SocketAddr>,
    cluster_addr: Option<SocketAddr>,
    controls: Vec<Sender<Control>>,
    executors: Vec<ExecutorJoinHandle<()>>,
    /// Each shard's report once it has stopped.
    stopped: Receiver<StopReport>,
    /// `server.shutdown_timeout_s`.
    shutdown_timeout: Duration,
    /// `[auth]`: where the password and ACL files are, for a reload.
    auth: AuthConfig,
    /// The listeners, for a reload of their certificates.
    listeners: Vec<crate::config::ListenerConfig>,
    /// The locked data directory, held while the broker runs.
    _data_dir: Option<DataDir>,
    /// The listen-port locks, held while the broker runs.
    _ports: Vec<PortLock>,
    /// The HTTP listener (metrics), when `[http] bind` names one.
    http: Option<crate::http::HttpServer>,
    /// The `$SYS` publisher, unless `mqtt.sys_interval_s` is 0.
    sys: Option<crate::sys::SysThread>,
}

/// What an orderly stop closed, summed over the shards.
#[derive(Debug, Clone, Copy, Default)]
pub struct StopSummary {
    /// Shards that finished stopping in time.
    pub shards_stopped: usize,
    /// Shards still busy at the shutdown timeout.
    pub shards_late: usize,
    /// The parts of every shard's report that did finish.
    pub closed: StopReport,
    /// How long the stop took.
    pub took: Duration,
}

impl std::fmt::Display for StopSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.closed;
        write!(
            f,
            "closed {} connections ({} sent DISCONNECT 0x8B, {} still flushing at the deadline), \
             {} sessions kept, {} shard logs synced, in {} ms",
            c.connections,
            c.disconnects_sent,
            c.sockets_left,
            c.sessions,
            c.logs_synced,
            self.took.as_millis()
        )?;
        if self.shards_late > 0 {
            write!(
                f,
                "; {} shards did not finish within the shutdown timeout",
                self.shards_late
            )?;
        }
        Ok(())
    }
}

impl Broker {
    /// Start every shard and return once all of them listen.
    pub fn start(config: Config) -> Result<Broker, StartError> {
        let started = Instant::now();
        config.validate()?;
        let shards = config.shard_count();
        // (Limits first: the probe's ring is as large as the shards'.)
        check_os_limits(&config, shards)?;
        check_io_uring()?;
        let auth = Arc::new(Auth::load(&config.auth)?);
        log::info!("{}", auth.describe());
        let wanted = config.effective_listeners();
        let binds: Vec<SocketAddr> = wanted.iter().map(|l| l.bind).collect();
        let tls = Arc::new(crate::tls::listeners(&wanted)?);
        let ws: Arc<Vec<Option<String>>> = Arc::new(
            wanted
                .iter()
                .map(|l| {
                    matches!(l.transport(), Transport::Ws | Transport::Wss)
                        .then(|| l.ws_path.clone())
                })
                .collect(),
        );
        let listeners = listen::open(&binds, shards)?;
        // The shards' control channels, made now so that the HTTP listener
        // can serve while the logs are recovered (503 until every shard
        // listens: a readiness probe's answer).
        let (controls, control_rxs): (Vec<_>, Vec<_>) =
            (0..shards).map(|_| crossbeam_channel::unbounded()).unzip();
        let mut control_rxs = control_rxs.into_iter();
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let quorum = Arc::new(crate::shard::runtime::quorum::Quorum::default());
        let http = match config.http.addr() {
            Ok(None) => None,
            Ok(Some(addr)) => {
                let listener = std::net::TcpListener::bind(addr)
                    .map_err(|source| StartError::Http { addr, source })?;
                let token = Some(config.http.api_token.clone()).filter(|t| !t.is_empty());
                let api = crate::api::Api {
                    controls: controls.clone(),
                    started,
                    topic_levels_max: config.mqtt.topic_levels_max,
                    payload_bytes_max: config.mqtt.packet_size_max_bytes as usize,
                    cluster: config.cluster.enabled().then(|| quorum.clone()),
                };
                let server = crate::http::HttpServer::start(listener, token, api, ready.clone())
                    .map_err(|source| StartError::Http { addr, source })?;
                log::info!("http: GET /metrics on {}", server.addr());
                Some(server)
            }
            Err(why) => {
                return Err(StartError::Config(ConfigError::Invalid {
                    key: "http.bind".into(),
                    value: config.http.bind.clone(),
                    why,
                }))
            }
        };
        #[cfg(debug_assertions)]
        if let Some(ms) = std::env::var("SHARDMQ_TEST_RECOVERY_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            // Debug builds: a slow recovery, for the readiness test.
            std::thread::sleep(Duration::from_millis(ms));
        }
        let (data_dir, mut durables) = recover_logs(&config, shards)?;
        let cluster = start_cluster(&config, shards, data_dir.as_ref(), quorum)?;
        let cluster_addr = cluster.as_ref().map(|c| c.bound);
        let (mut membership, mut bridges) = match cluster {
            Some(c) => (Some(c.membership), Some(c.bridges.into_iter())),
            None => (None, None),
        };
        let mesh = MeshBuilder::<Batch, Full>::full(shards, config.mesh.lane_capacity);
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(shards);
        let (stopped_tx, stopped_rx) = crossbeam_channel::bounded(shards);
        let cpus = allowed_cpus();
        let mut broker = Broker {
            addrs: listeners.addrs,
            cluster_addr,
            controls,
            executors: Vec::new(),
            stopped: stopped_rx,
            shutdown_timeout: Duration::from_secs(config.server.shutdown_timeout_s),
            auth: config.auth.clone(),
            listeners: wanted.clone(),
            _data_dir: data_dir,
            _ports: listeners.locks,
            http,
            sys: None,
        };
        let mut sockets = listeners.sockets.into_iter();
        for id in 0..shards {
            let sockets = sockets.next().unwrap_or_default();
            let durable = durables.as_mut().map(|d| d.remove(0));
            // Membership is served by shard 0.
            let cluster = bridges
                .as_mut()
                .and_then(Iterator::next)
                .map(|bridge| ShardCluster {
                    bridge,
                    membership: membership.take(),
                });
            let ctl_rx = control_rxs.next().expect("one per shard");
            let placement = match &cpus {
                Some(cpus) if config.server.pin_cpus && shards <= cpus.len() => {
                    Placement::Fixed(cpus[id])
                }
                _ => Placement::Unbound,
            };
            let lanes = Lanes {
                auth: auth.clone(),
                tls: tls.clone(),
                ws: ws.clone(),
                mesh: mesh.clone(),
                control: ctl_rx,
                ready: ready_tx.clone(),
                stopped: stopped_tx.clone(),
            };
            let config = config.clone();
            let mut builder = LocalExecutorBuilder::new(placement)
                .name(&format!("shard-{id}"))
                .io_memory(config.server.io_memory_bytes)
                .ring_depth(RING_DEPTH);
            if config.cluster.enabled() {
                // The bridge dials peers on the blocking pool: a dial that
                // waits for an unanswered SYN must not hold up the others.
                builder =
                    builder.blocking_thread_pool_placement(glommio::PoolPlacement::Unbound(4));
            }
            let executor = builder
                .spawn(move || run_shard(id, shards, config, lanes, sockets, durable, cluster))
                .map_err(|e| StartError::Shard {
                    shard: id,
                    why: e.to_string(),
                })?;
            broker.executors.push(executor);
        }
        for _ in 0..shards {
            match ready_rx.recv_timeout(Duration::from_secs(30)) {
                Ok(Ok(())) => {}
                Ok(Err((shard, why))) => {
                    broker.stop();
                    return Err(StartError::Shard { shard, why });
                }
                Err(_) => {
                    let why = "did not start within 30 s (is the locked-memory limit high enough?)";
                    broker.stop();
                    return Err(StartError::Shard {
                        shard: usize::MAX,
                        why: why.into(),
                    });
                }
            }
        }
        if config.mqtt.sys_interval_s > 0 {
            let interval = Duration::from_secs(config.mqtt.sys_interval_s);
            let controls = broker.controls.clone();
            match crate::sys::SysThread::start(controls, interval, started) {
                Ok(t) => broker.sys = Some(t),
                Err(e) => log::error!("cannot start the $SYS thread: {e}; no $SYS topics"),
            }
        }
        // Every shard listens: metrics and the API answer from now on.
        ready.store(true, std::sync::atomic::Ordering::Release);
        Ok(broker)
    }

    /// Where the HTTP listener (metrics) listens, if there is one.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|h| h.addr())
    }

    /// Read the password and ACL files again and hand the new rules to
    /// every shard (SIGHUP). Connections stay; each session's ACL is
    /// rebuilt for its user. A file that cannot be used leaves every shard
    /// with the rules it has: the error says why. Returns what the new
    /// rules are (the start-up line), once every shard applies them (or
    /// after 5 s, saying how many do not yet).
    pub fn reload_auth(&self) -> Result<String, AuthError> {
        let auth = Arc::new(Auth::load(&self.auth)?);
        let late = self.tell_shards(|done| Control::Auth(auth.clone(), done));
        Ok(format!("{}{late}", auth.describe()))
    }

    /// Read the TLS listeners' certificates and keys again (SIGHUP): new
    /// connections use them, connections already up keep theirs. Files
    /// that cannot be used leave every listener as it was. Returns the
    /// log line: how many TLS listeners were reloaded.
    pub fn reload_tls(&self) -> Result<String, crate::tls::TlsError> {
        let tls = crate::tls::listeners(&self.listeners)?;
        let n = tls.iter().flatten().count();
        let tls = Arc::new(tls);
        let late = self.tell_shards(|done| Control::Tls(tls.clone(), done));
        Ok(format!("{n} TLS listeners' certificates{late}"))
    }

    /// Send every shard the control `make` builds and wait (5 s at most)
    /// until each says it applied it; "" or how many had not.
    fn tell_shards(&self, make: impl Fn(crossbeam_channel::Sender<()>) -> Control) -> String {
        let wait = Duration::from_secs(5);
        let applied = crate::shard::runtime::ask_shards(&self.controls, make, wait).len();
        match self.controls.len() - applied {
            0 => String::new(),
            late => format!(" ({late} shards had not applied them after 5 s)"),
        }
    }

    /// The addresses the broker listens on (port 0 resolved).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The address cluster membership listens on (port 0 resolved), when
    /// this node is part of a cluster.
    pub fn cluster_addr(&self) -> Option<SocketAddr> {
        self.cluster_addr
    }

    /// Stop in order: close the listeners, DISCONNECT 0x8B every 5.0
    /// client, flush what each connection has queued, sync the log, and
    /// wait (at most `server.shutdown_timeout_s`) for the shards to exit.
    pub fn stop(mut self) -> StopSummary {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> StopSummary {
        drop(self.http.take()); // stops accepting
        if let Some(s) = self.sys.take() {
            s.stop();
        }
        let started = Instant::now();
        let deadline = started + self.shutdown_timeout;
        for c in &self.controls {
            let _ = c.send(Control::Stop);
        }
        let mut summary = StopSummary::default();
        let running = self.executors.len();
        while summary.shards_stopped < running {
            match self.stopped.recv_deadline(deadline) {
                Ok(report) => {
                    summary.shards_stopped += 1;
                    summary.closed.add(&report);
                }
                Err(_) => break,
            }
        }
        summary.shards_late = running - summary.shards_stopped;
        if summary.shards_late == 0 {
            for e in self.executors.drain(..) {
                if let Err(err) = e.join() {
                    log::error!("a shard ended with an error: {err}");
                }
            }
        } else {
            // Their threads end with the process; nothing acknowledged
            // depends on them (acks follow the log write or its sync).
            self.executors.clear();
        }
        summary.took = started.elapsed();
        summary
    }

    /// Block until the shards exit (they only do after [`Broker::stop`] or a
    /// failure).
    pub fn join(mut self) {
        for e in self.executors.drain(..) {
            let _ = e.join();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if !self.executors.is_empty() {
            self.stop_inner();
        }
    }
}

/// Recover the logs (when durability is on): the locked data directory and
/// one start per shard.
fn recover_logs(
    config: &Config,
    shards: usize,
) -> Result<(Option<DataDir>, Option<Vec<Durable>>), StartError> {
    if config.durability() == Durability::Memory {
        return Ok((None, None));
    }
    let settings = RecoverySettings {
        data_dir: config.storage.data_dir.clone(),
        shards,
        segment_bytes: config.storage.segment_bytes,
        clock: None,
        disk: None,
    };
    let recovery = recover(&settings)?;
    for line in recovery.summary.lines() {
        log::info!("{line}");
    }
    let routes = Arc::new(recovery.routes);
    let clock = recovery.clock;
    let durables = recovery
        .shards
        .into_iter()
        .map(|start| Durable {
            start,
            routes: routes.clone(),
            clock,
        })
        .collect();
    Ok((Some(recovery.dir), Some(durables)))
}

/// A cluster node's start: membership for shard 0, a bridge for each
/// shard, and the membership address bound.
struct ClusterParts {
    membership: ClusterStart,
    bridges: Vec<BridgeStart>,
    bound: SocketAddr,
}

/// Bind the membership socket and each shard's bridge port, bump the
/// incarnation, and build what the shards run. None without
/// `cluster.node_id`.
fn start_cluster(
    config: &Config,
    shards: usize,
    data_dir: Option<&DataDir>,
    quorum: Arc<Quorum>,
) -> Result<Option<ClusterParts>, StartError> {
    let c = &config.cluster;
    if !c.enabled() {
        return Ok(None);
    }
    let name = NodeName::new(&c.node_id).map_err(|e| StartError::Cluster(e.to_string()))?;
    let loaded = crate::cluster::secret::ClusterSecret::from_setting(&c.secret_file)
        .map_err(StartError::Cluster)?;
    let secret = loaded.map(|(secret, warning)| {
        if let Some(w) = warning {
            log::warn!("{w}");
        }
        Arc::new(secret)
    });
    let (socket, listeners, bound) = bind_cluster(c.listen, shards)?;
    let incarnation = match data_dir {
        Some(dir) => {
            bump_incarnation(dir, &name).map_err(|e| StartError::Cluster(e.to_string()))?
        }
        None => clock_incarnation(),
    };
    let shard_count = u16::try_from(shards).unwrap_or(u16::MAX);
    let members_file = data_dir.map(MembersFile::of);
    let members = starting_members(name.clone(), members_file.as_ref(), c.on_minority())
        .map_err(StartError::Cluster)?;
    let refuse_connects = members.refuses_connects();
    let me = Node::new(name, c.advertise_addr(bound), incarnation, shard_count);
    let seed = incarnation
        ^ u64::from(std::process::id()).rotate_left(32)
        ^ clock_incarnation().wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let join: Vec<String> = c.join.iter().map(|a| a.to_string()).collect();
    log::info!(
        "cluster: node {} incarnation {incarnation}, membership on {bound} (udp), bridge on ports \
         {}-{} (tcp), reached at {}; joining through [{}]",
        crate::text::quote(me.name.as_str()),
        bound.port(),
        u32::from(bound.port()) + shards as u32 - 1,
        me.addr,
        join.join(", ")
    );
    let tag = u32::from_be_bytes(
        crate::cluster::membership::envelope(&c.name)[4..8]
            .try_into()
            .unwrap_or_default(),
    );
    let settings = LinkSettings {
        frame_bytes_max: crate::cluster::link::frame_bytes_max(config),
        out_bytes_max: c.link_queue_bytes_max,
        ping_after_ms: 1_000,
        dead_after_ms: 5_000,
        secret: secret.clone(),
        nonce_seed: {
            let mut seed = [0u8; 16];
            getrandom::fill(&mut seed)
                .map_err(|e| StartError::Cluster(format!("no random seed for the links: {e}")))?;
            seed
        },
    };
    let mut senders = Vec::new();
    let mut bridges = Vec::new();
    let handed_over = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for (i, listener) in listeners.into_iter().enumerate() {
        let (tx, rx) = crossbeam_channel::unbounded();
        senders.push(tx);
        bridges.push(BridgeStart {
            listener,
            me: Hello {
                version: BRIDGE_VERSION,
                cluster_tag: tag,
                node: me.name.clone(),
                incarnation,
                addr: me.addr,
                shard: i as u16,
                shards: shard_count,
                auth: false,
                nonce: 0,
            },
            events: rx,
            refuse_connects,
            dial_from: Some(c.listen.ip()).filter(|ip| !ip.is_unspecified()),
            settings: settings.clone(),
            routes_max: c.routes_max,
            handed_over: handed_over.clone(),
        });
    }
    let mut membership_settings = c.membership_settings();
    membership_settings.secret = secret;
    let membership = Membership::new(me, &c.join, &membership_settings, seed);
    quorum.start(members, senders.clone(), members_file);
    Ok(Some(ClusterParts {
        membership: ClusterStart {
            socket,
            membership,
            bridges: senders,
            quorum,
        },
        bridges,
        bound,
    }))
}

/// Bind membership (UDP) on `listen` and shard j's bridge (TCP) on its
/// port + j. With port 0, ports are picked until a run of free ones is
/// found.
fn bind_cluster(
    listen: SocketAddr,
    shards: usize,
) -> Result<(socket2::Socket, Vec<socket2::Socket>, SocketAddr), StartError> {
    let tries = if listen.port() == 0 { 50 } else { 1 };
    let mut last = String::new();
    for _ in 0..tries {
        let udp = bind_udp(listen)
            .map_err(|e| StartError::Cluster(format!("cannot listen on {listen} (udp): {e}")))?;
        let bound = udp
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or(listen);
        let mut tcp = Vec::new();
        for j in 0..shards {
            let port = u16::try_from(usize::from(bound.port()) + j).ok();
            let Some(port) = port else {
                last = format!("bridge port of shard {j} past 65535");
                break;
            };
            let addr = SocketAddr::new(bound.ip(), port);
            match bind_tcp(addr) {
                Ok(s) => tcp.push(s),
                Err(e) => {
                    last = format!("cannot listen on {addr} (tcp, bridge of shard {j}): {e}");
                    break;
                }
            }
        }
        if tcp.len() == shards {
            return Ok((udp, tcp, bound));
        }
    }
    Err(StartError::Cluster(last))
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket)
}

/// The CPUs this process may run on (its affinity mask, which a cgroup or
/// `taskset` may have narrowed), from `/proc/self/status`.
fn allowed_cpus() -> Option<Vec<usize>> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    parse_cpu_list(list.trim())
}

/// Parse a kernel CPU list such as `0-3,8,10-11`.
fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().ok()?..=b.parse::<usize>().ok()?),
            None => cpus.push(part.parse().ok()?),
        }
    }
    (!cpus.is_empty()).then_some(cpus)
}

/// Err naming the fix when the kernel refuses io_uring (which every shard
/// runs on): a container's seccomp profile, the `kernel.io_uring_disabled`
/// sysctl, or a kernel without it. A one-entry ring is set up and closed
/// on a thread of its own: the ring's teardown runs as task work on the
/// thread that made it, and interrupts that thread's next blocking socket
/// call with EINTR (the caller's, here, would be an embedding program's).
fn check_io_uring() -> Result<(), StartError> {
    std::thread::Builder::new()
        .name("io_uring-probe".into())
        .spawn(probe_io_uring)
        .map_err(|e| StartError::IoUring(format!("cannot start a thread: {e}")))?
        .join()
        .unwrap_or_else(|_| Err(StartError::IoUring("the io_uring probe panicked".into())))
}

#[allow(unsafe_code)]
fn probe_io_uring() -> Result<(), StartError> {
    // struct io_uring_params: 120 bytes, zeroed (no flags).
    let mut params = [0u8; 120];
    // A ring as large as the shards' (a kernel that counts rings as
    // locked memory refuses it here, with the line below).
    let entries = RING_DEPTH as u32;
    // SAFETY: io_uring_setup(2) with a valid, writable params buffer of
    // the kernel's struct size; the returned descriptor is closed below.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, entries, params.as_mut_ptr()) };
    if fd >= 0 {
        // SAFETY: the descriptor was just returned to us and is not shared.
        unsafe { libc::close(fd as i32) };
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    let fix = match e.raw_os_error() {
        Some(libc::ENOSYS) => {
            "this kernel has no io_uring (Linux 5.8 or newer with \
             CONFIG_IO_URING is needed), or a seccomp filter reports it missing: \
             in Docker, run with --security-opt seccomp=tuning/seccomp-io_uring.json"
        }
        Some(libc::EPERM) if sysctl == "2" => {
            "the sysctl kernel.io_uring_disabled is 2: \
             set it to 0 (sysctl -w kernel.io_uring_disabled=0)"
        }
        Some(libc::EPERM) if sysctl == "1" => {
            "the sysctl kernel.io_uring_disabled is 1: \
             set it to 0, or put the broker's user in the group kernel.io_uring_group names"
        }
        Some(libc::EPERM) => {
            "a seccomp filter blocks it: Docker's default profile does \
             since 25.0; run with --security-opt seccomp=tuning/seccomp-io_uring.json \
             (Docker's default profile plus io_uring_setup, io_uring_enter and \
             io_uring_register), or allow those three calls in your runtime's profile"
        }
        Some(libc::ENOMEM) => {
            "the locked-memory limit is too low for a ring: raise it \
             (ulimit -l, LimitMEMLOCK= in the unit, --ulimit memlock=-1 in Docker)"
        }
        _ => {
            "see io_uring_setup(2) for this error; an LSM (SELinux, AppArmor) may \
             deny it, or the process may be out of file descriptors"
        }
    };
    Err(StartError::IoUring(format!(
        "io_uring is not available to this process (io_uring_setup: {e}); {fix}"
    )))
}

/// Raise the locked-memory and open-file limits where allowed, and refuse
/// to start (saying what to change) when locked memory stays too low.
fn check_os_limits(config: &Config, shards: usize) -> Result<(), StartError> {
    use rlimit::Resource;
    // io_memory per shard plus some room. Kernels since 5.12 do not count
    // the rings as locked memory; older ones do (about 1.2 MiB a shard at
    // RING_DEPTH), and refuse the ring with ENOMEM, which
    // `check_io_uring` finds (its probe ring is as large) and explains.
    let need = (shards * (config.server.io_memory_bytes + (256 << 10))) as u64;
    let (soft, hard) = Resource::MEMLOCK.get().unwrap_or((0, 0));
    if soft < need
        && Resource::MEMLOCK
            .set(need.max(soft), need.max(hard))
            .is_err()
        && hard < need
    {
        return Err(StartError::Limit(format!(
            "locked memory limit is {} KiB but {shards} shards need {} KiB \
             ({} bytes of server.io_memory_bytes each, plus rings): raise it \
             (`ulimit -l {}`, or LimitMEMLOCK= in a systemd unit; see tuning/README.md) \
             or lower server.io_memory_bytes / server.shards",
            soft / 1024,
            need / 1024,
            config.server.io_memory_bytes,
            need / 1024
        )));
    }
    let want_files = config.server.connections_max as u64 + 1024;
    let (soft, hard) = Resource::NOFILE.get().unwrap_or((0, 0));
    if soft < want_files {
        let _ = Resource::NOFILE.set(want_files.min(hard), hard);
        let (now, _) = Resource::NOFILE.get().unwrap_or((soft, hard));
        if now < want_files {
            log::warn!(
                "open file limit is {now} but server.connections_max is {}: the broker will refuse \
                 connections past about {} (raise `ulimit -n` / LimitNOFILE=, see tuning/README.md)",
                config.server.connections_max,
                now.saturating_sub(64)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_cpu_list;

    #[test]
    fn cpu_lists_parse_like_the_kernel_prints_them() {
        assert_eq!(parse_cpu_list("0-1"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0-2,5,8-9"), Some(vec![0, 1, 2, 5, 8, 9]));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("x"), None);
    }
}
