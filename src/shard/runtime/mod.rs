//! The glommio side of a shard: its executor's body, the tasks that do
//! I/O for the core, and nothing that decides.
//!
//! Shard-local. [`run_shard`] builds the shard's [`ShardCore`], restores it
//! from recovery, and runs its tasks: the accept loops and connection tasks
//! (`connection`), a receiver per mesh lane, the mesh flusher that moves
//! the core's outbox onto the lanes, the retained-gather task, the
//! group-commit task (`sync`, power-safe), the tick, and on shard 0 of a
//! cluster node, membership (`membership`). Each task hands
//! what it read to the core and writes what the core gives it; protocol
//! decisions (CONNECT rules, takeover, quotas, routing, durability) are
//! the core's. This module and `broker` (start-up) are the only ones that
//! import glommio.

mod bridge;
mod connection;
mod membership;
pub(crate) mod quorum;
mod sync;
mod transport;

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};

use crate::config::{Config, Durability};
use crate::persist::recover::ShardStart;
use crate::persist::WallClock;

use super::mesh::{Batch, Mesh};
use super::{ShardCore, StopReport};

pub(crate) use bridge::BridgeStart;
pub use connection::last_client;
use connection::{accept_loop, listener_from, spawn_handoff};
pub(crate) use membership::ClusterStart;

/// A message from the broker handle to a shard.
#[derive(Debug, Clone)]
pub(crate) enum Control {
    /// Close the listeners and connections, sync the log, exit.
    Stop,
    /// Apply these authentication rules from now on (a reload), then say
    /// so.
    Auth(Arc<crate::auth::Auth>, crossbeam_channel::Sender<()>),
    /// New connections on the TLS listeners use these (a reload), then
    /// say so.
    Tls(TlsListeners, crossbeam_channel::Sender<()>),
    /// Send the shard's counters (a metrics scrape).
    Report(crossbeam_channel::Sender<crate::shard::ShardReport>),
    /// Answer an admin API request. The shard drops a request it takes
    /// after the deadline (the asker waits a little longer, so that a 503
    /// means "not done").
    Admin(
        crate::shard::admin::AdminRequest,
        Instant,
        crossbeam_channel::Sender<crate::shard::admin::AdminAnswer>,
    ),
    /// Publish these `$SYS` topics and payloads (retained, QoS 0, this
    /// node only, not logged).
    Sys(Vec<(String, String)>),
}

/// Longest [`gather_reports`] waits for the shards' answers.
pub const SCRAPE_WAIT: Duration = Duration::from_secs(2);

/// Every shard's report that comes within [`SCRAPE_WAIT`] (each shard
/// answers at its next tick).
pub(crate) fn gather_reports(
    controls: &[crossbeam_channel::Sender<Control>],
) -> Vec<crate::shard::ShardReport> {
    ask_shards(controls, Control::Report, SCRAPE_WAIT)
}

/// Send every shard the control `make` builds around an answer channel,
/// and the answers that come within `wait` (each shard answers at its
/// next tick).
pub(crate) fn ask_shards<T>(
    controls: &[crossbeam_channel::Sender<Control>],
    make: impl Fn(crossbeam_channel::Sender<T>) -> Control,
    wait: Duration,
) -> Vec<T> {
    let (tx, rx) = crossbeam_channel::bounded(controls.len());
    let asked = controls
        .iter()
        .filter(|c| c.send(make(tx.clone())).is_ok())
        .count();
    drop(tx); // all shards gone: the wait ends at once
    let deadline = Instant::now() + wait;
    (0..asked)
        .map_while(|_| rx.recv_deadline(deadline).ok())
        .collect()
}

/// Per listening socket, in order: its TLS configuration (None: plain
/// TCP).
pub(crate) type TlsListeners = Arc<Vec<Option<Arc<crate::tls::TlsListener>>>>;

/// What a shard starts from when the log is on.
pub(crate) struct Durable {
    pub(crate) start: ShardStart,
    pub(crate) routes: Arc<Vec<(usize, String)>>,
    pub(crate) clock: WallClock,
}

/// What a shard of a cluster node starts with: its bridge, and on shard
/// 0 membership.
pub(crate) struct ShardCluster {
    pub(crate) bridge: BridgeStart,
    pub(crate) membership: Option<ClusterStart>,
}

/// The channels one shard's executor is started with, and the broker's
/// authentication rules (shared, read-only).
pub(crate) struct Lanes {
    pub(crate) auth: std::sync::Arc<crate::auth::Auth>,
    /// Per listening socket, in order: its TLS configuration (None: plain
    /// TCP).
    pub(crate) tls: TlsListeners,
    /// Per listening socket, in order: its WebSocket path (None: MQTT
    /// bytes directly).
    pub(crate) ws: Arc<Vec<Option<String>>>,
    pub(crate) mesh: MeshBuilder<Batch, Full>,
    pub(crate) control: Receiver<Control>,
    pub(crate) ready: Sender<Result<(), (usize, String)>>,
    pub(crate) stopped: Sender<StopReport>,
}

/// The body of one shard's executor.
pub(crate) async fn run_shard(
    id: usize,
    shards: usize,
    config: Config,
    lanes: Lanes,
    sockets: Vec<socket2::Socket>,
    durable: Option<Durable>,
    cluster: Option<ShardCluster>,
) {
    let Lanes {
        auth,
        tls,
        ws,
        mesh,
        control,
        ready,
        stopped,
    } = lanes;
    let (senders, mut receivers) = match mesh.join().await {
        Ok(joined) => joined,
        Err(_) => {
            let _ = ready.send(Err((id, "cannot join the shard mesh".into())));
            return;
        }
    };
    let outbox_max = config.mesh.outbox_messages_max;
    let shard = Rc::new(ShardCore::new(
        id,
        shards,
        config,
        Mesh::new(id, shards, outbox_max),
        boot_stamp(),
    ));
    shard.set_auth(auth);
    let power_safe = shard.config().durability() == Durability::PowerSafe;
    if let Some(d) = durable {
        shard.restore(d.start, &d.routes, d.clock, Instant::now());
    }
    if power_safe {
        glommio::spawn_local(sync::sync_loop(shard.clone())).detach();
    }
    for (from, rx) in receivers.streams() {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            while let Some(batch) = rx.recv().await {
                // Connections moved here are served by tasks of their own.
                for handoff in shard.handle_mesh(batch, from, Instant::now()) {
                    spawn_handoff(shard.clone(), handoff);
                }
            }
        })
        .detach();
    }
    let gatherer = shard.clone();
    glommio::spawn_local(async move {
        let wake = gatherer.gather_wake();
        loop {
            wake.wait().await;
            // A few chunks per loop turn, then the other tasks run.
            while gatherer.run_gathers(Instant::now(), 8) {
                glommio::yield_if_needed().await;
            }
        }
    })
    .detach();
    let flusher = shard.clone();
    glommio::spawn_local(async move { flush_loop(flusher.mesh(), senders).await }).detach();
    let mut accepts = Vec::new();
    let mut listening = Vec::new();
    let tls = Rc::new(std::cell::RefCell::new(tls));
    for (i, socket) in sockets.into_iter().enumerate() {
        match listener_from(socket) {
            Ok((listener, handle)) => {
                listening.push(handle);
                let ws_path = ws.get(i).cloned().flatten().map(Rc::from);
                let accept = accept_loop(shard.clone(), listener, i, tls.clone(), ws_path);
                accepts.push(glommio::spawn_local(accept).detach());
            }
            Err(e) => {
                let _ = ready.send(Err((id, format!("cannot take a listening socket: {e}"))));
                return;
            }
        }
    }
    let mut membership = None;
    let mut bridge = None;
    if let Some(c) = cluster {
        match bridge::start(shard.clone(), c.bridge) {
            Ok(b) => bridge = Some(b),
            Err(e) => {
                let _ = ready.send(Err((id, format!("cannot start the bridge: {e}"))));
                return;
            }
        }
        membership = c.membership.map(membership::start);
    }
    let _ = ready.send(Ok(()));
    'ticks: loop {
        glommio::timer::sleep(ShardCore::TICK).await;
        shard.handle_tick(Instant::now());
        // Every control waiting, so scrapes queued ahead of a Stop or a
        // reload do not delay it by a tick each.
        loop {
            match control.try_recv() {
                Ok(Control::Stop) | Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    break 'ticks
                }
                Ok(Control::Auth(auth, done)) => {
                    shard.set_auth(auth);
                    let _ = done.send(());
                }
                Ok(Control::Tls(listeners, done)) => {
                    *tls.borrow_mut() = listeners;
                    let _ = done.send(());
                }
                Ok(Control::Report(to)) => {
                    let mut report = shard.report();
                    if let (Some(c), Some(b)) = (report.cluster.as_mut(), bridge.as_ref()) {
                        c.bridge = b.stats();
                    }
                    let _ = to.send(report);
                }
                Ok(Control::Sys(topics)) => shard.publish_sys(Instant::now(), topics),
                Ok(Control::Admin(request, deadline, to)) => {
                    let now = Instant::now();
                    if now < deadline {
                        let _ = to.send(shard.admin(now, request));
                    }
                }
                Err(crossbeam_channel::TryRecvError::Empty) => break,
            }
        }
    }
    // Listeners first: shutting a listening socket down takes it out of the
    // port at once (even while io_uring still holds an accept on it), so a
    // restart never races this run's sockets.
    for a in accepts {
        a.cancel();
    }
    for l in &listening {
        let _ = l.shutdown(std::net::Shutdown::Both);
    }
    drop(listening);
    let started = Instant::now();
    let report = shard.begin_stop(started);
    // In a cluster the peers learn what the stop did to the clients' wills
    // before they learn that this node left (and publish what is still
    // due).
    if let Some(b) = &bridge {
        // A quarter of the shutdown timeout at most (1 s each at most):
        // the connections still need the rest to flush.
        let wait = Duration::from_secs(shard.config().server.shutdown_timeout_s) / 4;
        b.hand_over(wait).await;
        shard.leaving_cluster();
        if membership.is_some() {
            b.all_handed_over(wait).await;
        }
    }
    if let Some(m) = membership {
        m.leave().await;
    }
    let report = stop_shard(&shard, started, report).await;
    log::debug!("shard {id} stopped");
    let _ = stopped.send(report);
}

/// A stopping shard whose connections were told to close at `started`:
/// wait for their output to be flushed (until shortly before the shutdown
/// timeout), and sync the log.
async fn stop_shard(shard: &ShardCore, started: Instant, mut report: StopReport) -> StopReport {
    let timeout = Duration::from_secs(shard.config().server.shutdown_timeout_s);
    // Leave a tenth of the timeout for the sync and the exit.
    let deadline = started + timeout.mul_f32(0.9);
    while shard.open_sockets() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    report.sockets_left = shard.open_sockets();
    shard.handle_tick(Instant::now());
    sync::sync_now(shard).await;
    report.logs_synced = usize::from(shard.config().durability() != Durability::Memory);
    report
}

/// The mesh flusher: after each loop turn, a shard's outbox onto the
/// lanes, one batch per destination.
pub async fn flush_loop(mesh: &Mesh, senders: Senders<Batch>) {
    loop {
        mesh.queued().await;
        futures_lite::future::yield_now().await;
        for (to, batch) in mesh.poll_batches() {
            let n = batch.len();
            let mut send = std::pin::pin!(senders.send_to(to, batch));
            let sent = match futures_lite::future::poll_once(&mut send).await {
                Some(sent) => sent,
                None => {
                    mesh.stalled(); // the lane is full: wait for room
                    send.await
                }
            };
            if sent.is_err() {
                log::debug!("mesh lane to shard {to} is closed; dropped {n} messages");
            }
            mesh.sent(n);
        }
    }
}

/// This run's start in Unix microseconds: assigned client ids carry it,
/// so they differ from those of earlier runs.
fn boot_stamp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
