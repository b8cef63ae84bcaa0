//! Starting and stopping the broker: one glommio executor per shard.
//!
//! Node-wide: [`Broker`] lives on the thread that started it (the main
//! thread, or a test), owns the executors' join handles and a control lane to
//! each shard. Shards get their config by value and join the mesh themselves;
//! nothing but the control lanes and the join handles is shared.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use glommio::channels::channel_mesh::{Full, MeshBuilder};
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use thiserror::Error;

use crate::config::{Config, ConfigError, Durability};
use crate::log::dir::DataDir;
use crate::persist::recover::{recover, RecoveryError, RecoverySettings, ShardStart};
use crate::persist::WallClock;
use crate::shard::mesh::{Batch, Mesh};
use crate::shard::{accept_loop, Shard};

/// Why the broker could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listen address cannot be used.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// An operating system limit is too low and could not be raised.
    #[error("{0}")]
    Limit(String),
    /// The logs could not be recovered.
    #[error(transparent)]
    Recovery(#[from] RecoveryError),
    /// A shard failed to start.
    #[error("shard {shard} failed to start: {why}")]
    Shard {
        /// Which shard.
        shard: usize,
        /// Why.
        why: String,
    },
}

/// A message from the broker handle to a shard.
#[derive(Debug, Clone, Copy)]
enum Control {
    Stop,
}

/// A running broker; see the module docs.
pub struct Broker {
    addrs: Vec<SocketAddr>,
    controls: Vec<Sender<Control>>,
    executors: Vec<ExecutorJoinHandle<()>>,
    /// The locked data directory, held while the broker runs.
    _data_dir: Option<DataDir>,
}

/// What a shard starts from when the log is on.
struct Durable {
    start: ShardStart,
    routes: Arc<Vec<(usize, String)>>,
    clock: WallClock,
}

impl Broker {
    /// Start every shard and return once all of them listen.
    pub fn start(config: Config) -> Result<Broker, StartError> {
        config.validate()?;
        let shards = config.shard_count();
        check_os_limits(&config, shards)?;
        let addrs = resolve_listen(&config.server.listen)?;
        let (data_dir, mut durables) = recover_logs(&config, shards)?;
        let mesh = MeshBuilder::<Batch, Full>::full(shards, config.mesh.lane_capacity);
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(shards);
        let cpus = allowed_cpus();
        let mut broker = Broker {
            addrs: addrs.clone(),
            controls: Vec::new(),
            executors: Vec::new(),
            _data_dir: data_dir,
        };
        for id in 0..shards {
            let durable = durables.as_mut().map(|d| d.remove(0));
            let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
            let placement = match &cpus {
                Some(cpus) if config.server.pin_cpus && shards <= cpus.len() => {
                    Placement::Fixed(cpus[id])
                }
                _ => Placement::Unbound,
            };
            let (config, mesh, addrs, ready) = (
                config.clone(),
                mesh.clone(),
                addrs.clone(),
                ready_tx.clone(),
            );
            let executor = LocalExecutorBuilder::new(placement)
                .name(&format!("shard-{id}"))
                .io_memory(config.server.io_memory_bytes)
                .spawn(move || run_shard(id, shards, config, mesh, addrs, ctl_rx, ready, durable))
                .map_err(|e| StartError::Shard {
                    shard: id,
                    why: e.to_string(),
                })?;
            broker.controls.push(ctl_tx);
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
        Ok(broker)
    }

    /// The addresses the broker listens on (port 0 resolved).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Stop accepting, DISCONNECT 0x8B every 5.0 client, close every
    /// connection and wait for the shards to exit.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        for c in &self.controls {
            let _ = c.send(Control::Stop);
        }
        for e in self.executors.drain(..) {
            if let Err(err) = e.join() {
                log::error!("a shard ended with an error: {err}");
            }
        }
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
        self.stop_inner();
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

/// The body of one shard's executor.
#[allow(clippy::too_many_arguments)]
async fn run_shard(
    id: usize,
    shards: usize,
    config: Config,
    mesh: MeshBuilder<Batch, Full>,
    addrs: Vec<SocketAddr>,
    control: Receiver<Control>,
    ready: Sender<Result<(), (usize, String)>>,
    durable: Option<Durable>,
) {
    let (senders, mut receivers) = match mesh.join().await {
        Ok(joined) => joined,
        Err(_) => {
            let _ = ready.send(Err((id, "cannot join the shard mesh".into())));
            return;
        }
    };
    let outbox_max = config.mesh.outbox_messages_max;
    let shard = Rc::new(Shard::new(
        id,
        shards,
        config,
        Mesh::new(senders, shards, outbox_max),
    ));
    let power_safe = shard.config().durability() == Durability::PowerSafe;
    if let Some(d) = durable {
        shard.restore(d.start, &d.routes, d.clock);
    }
    if power_safe {
        glommio::spawn_local(shard.clone().sync_loop()).detach();
    }
    for (from, rx) in receivers.streams() {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            while let Some(batch) = rx.recv().await {
                shard.on_mesh_batch(batch, from, Instant::now());
            }
        })
        .detach();
    }
    let flusher = shard.clone();
    glommio::spawn_local(async move { flusher.mesh().flush_loop().await }).detach();
    let mut accepts = Vec::new();
    for addr in &addrs {
        match crate::shard::bind_listener(*addr) {
            Ok(l) => accepts.push(glommio::spawn_local(accept_loop(shard.clone(), l)).detach()),
            Err(e) => {
                let _ = ready.send(Err((id, format!("cannot listen on {addr}: {e}"))));
                return;
            }
        }
    }
    let _ = ready.send(Ok(()));
    loop {
        glommio::timer::sleep(Shard::TICK).await;
        shard.on_tick(Instant::now());
        match control.try_recv() {
            Ok(Control::Stop) | Err(crossbeam_channel::TryRecvError::Disconnected) => break,
            Err(crossbeam_channel::TryRecvError::Empty) => {}
        }
    }
    for a in accepts {
        a.cancel();
    }
    shard.begin_stop(Instant::now());
    let deadline = Instant::now() + Duration::from_secs(2);
    while shard.open_sockets() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    shard.on_tick(Instant::now());
    shard.sync_now().await;
    log::debug!("shard {id} stopped");
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

/// Check each address is free (a plain bind, without SO_REUSEPORT, fails if
/// another process listens there: with SO_REUSEPORT it would silently share
/// the port) and resolve port 0 to a real port.
fn resolve_listen(listen: &[SocketAddr]) -> Result<Vec<SocketAddr>, StartError> {
    listen
        .iter()
        .map(|&addr| {
            let probe =
                StdListener::bind(addr).map_err(|source| StartError::Listen { addr, source })?;
            probe
                .local_addr()
                .map_err(|source| StartError::Listen { addr, source })
        })
        .collect()
}

/// Raise the locked-memory and open-file limits where allowed, and refuse
/// to start (saying what to change) when locked memory stays too low.
fn check_os_limits(config: &Config, shards: usize) -> Result<(), StartError> {
    use rlimit::Resource;
    // io_memory per shard plus room for three rings per shard.
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
