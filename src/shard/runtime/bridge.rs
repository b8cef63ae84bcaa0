//! The bridge's I/O on one shard: the sockets of its links and the tasks
//! that read, write, dial and accept them, and nothing that decides.
//!
//! Shard-local. What the links carry, when to dial and when to close is
//! [`Bridge`]'s (`shard::bridge`, without I/O); this module makes the
//! dials it asks for, feeds it what the sockets read, writes what it has
//! for them and shuts the sockets it closed.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use super::transport::Stream;
use crate::cluster::frame::Hello;
use crate::cluster::link::LinkSettings;
pub(crate) use crate::shard::bridge::PeerEvent;
use crate::shard::bridge::{Bridge, Dial, LinkId};
use crate::shard::notify::Notify;
use crate::shard::ShardCore;
use crate::text::quote;

use super::connection::{duplicate, listener_from, SharedStream};

/// What one shard's bridge starts with.
pub(crate) struct BridgeStart {
    /// This shard's bridge port, bound and listening.
    pub(crate) listener: socket2::Socket,
    /// This shard's Hello.
    pub(crate) me: Hello,
    /// Membership changes from shard 0.
    pub(crate) events: crossbeam_channel::Receiver<PeerEvent>,
    /// New CONNECTs are refused at start (no majority of the members
    /// the data directory knows is up yet).
    pub(crate) refuse_connects: bool,
    /// Dial peers from this address (`cluster.listen`'s, when it is a
    /// concrete one), so they see the address they know this node by.
    pub(crate) dial_from: Option<std::net::IpAddr>,
    /// Link limits.
    pub(crate) settings: LinkSettings,
    /// Routes taken from one peer at most.
    pub(crate) routes_max: usize,
    /// At an orderly stop: how many of the node's shards have handed
    /// their last will changes to their links (shard 0 leaves the
    /// membership after them).
    pub(crate) handed_over: Arc<AtomicUsize>,
}

/// A running bridge, for the shard's orderly stop.
pub(crate) struct BridgeHandle {
    io: Rc<Io>,
    handed_over: Arc<AtomicUsize>,
}

/// How long an orderly stop waits for the wills to reach the peers.
const HAND_OVER_WAIT: Duration = Duration::from_secs(1);

impl BridgeHandle {
    /// The bridge's links and message counters now.
    pub(crate) fn stats(&self) -> crate::shard::bridge::BridgeStats {
        self.io.bridge.stats()
    }

    /// The stopping shard has closed its connections: wait (at most
    /// `wait`, and [`HAND_OVER_WAIT`]) until every peer has read what that
    /// changed of its clients' wills (published, or waiting for their
    /// delay), so the peers publish only what is still due once this node
    /// leaves. A Ping after the changes is answered once the peer has read
    /// them.
    pub(crate) async fn hand_over(&self, wait: Duration) {
        let b = &self.io.bridge;
        let deadline = Instant::now() + wait.min(HAND_OVER_WAIT);
        while !b.core().bridge_idle() && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        let asked = b.ping_links(Instant::now());
        while !b.pings_answered(&asked) && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        self.handed_over.fetch_add(1, Ordering::AcqRel);
    }

    /// Shard 0: wait (at most [`HAND_OVER_WAIT`] more) until every shard
    /// of the node has handed over, before leaving the membership.
    pub(crate) async fn all_handed_over(&self, wait: Duration) {
        let shards = usize::from(self.io.bridge.me().shards);
        let deadline = Instant::now() + wait.min(HAND_OVER_WAIT);
        while self.handed_over.load(Ordering::Acquire) < shards && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// How often links are ticked and due dials made.
const TICK: Duration = Duration::from_millis(50);

/// A shard's bridge and the sockets of its links.
struct Io {
    bridge: Bridge,
    /// See [`BridgeStart::dial_from`].
    dial_from: Option<std::net::IpAddr>,
    /// A second handle on each link's socket, to shut it down from any
    /// task once the bridge closed the link.
    sockets: RefCell<HashMap<LinkId, socket2::Socket>>,
}

impl Io {
    /// After any call into the bridge: shut the sockets of the links it
    /// closed (a writer blocked on a peer that reads nothing included).
    fn settle(&self) {
        while let Some(id) = self.bridge.poll_closed() {
            if let Some(s) = self.sockets.borrow_mut().remove(&id) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// Start this shard's bridge: its accept loop, its control loop (peers,
/// dials, ticks) and the task that moves its core's outbox onto links.
pub(crate) fn start(core: Rc<ShardCore>, start: BridgeStart) -> std::io::Result<BridgeHandle> {
    let (listener, _handle) = listener_from(start.listener)?;
    let bridge = Bridge::new(
        core,
        start.me,
        start.settings,
        start.routes_max,
        start.refuse_connects,
        Instant::now(),
        crate::persist::WallClock::now(),
    );
    let io = Rc::new(Io {
        bridge,
        dial_from: start.dial_from,
        sockets: RefCell::new(HashMap::new()),
    });
    let handle = BridgeHandle {
        io: io.clone(),
        handed_over: start.handed_over,
    };
    glommio::spawn_local(accept_loop(io.clone(), listener)).detach();
    glommio::spawn_local(outbox_loop(io.clone())).detach();
    let events = start.events;
    glommio::spawn_local(async move {
        loop {
            while let Ok(ev) = events.try_recv() {
                io.bridge.on_peer_event(Instant::now(), ev);
            }
            for d in io.bridge.poll_dials(Instant::now()) {
                glommio::spawn_local(dial(io.clone(), d)).detach();
            }
            io.bridge.tick(Instant::now());
            io.settle();
            glommio::timer::sleep(TICK).await;
        }
    })
    .detach();
    Ok(handle)
}

async fn accept_loop(io: Rc<Io>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                log::warn!(
                    "cluster: shard {}: bridge accept failed: {e}",
                    io.bridge.me().shard
                );
                glommio::timer::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some((id, wake)) = io.bridge.accepted(Instant::now()) else {
            continue;
        };
        match set_up(&stream) {
            Ok(handle) => {
                io.sockets.borrow_mut().insert(id, handle);
                spawn_io(io.clone(), id, wake, stream);
            }
            Err(e) => {
                io.bridge
                    .io_closed(Instant::now(), id, &format!("cannot set up the link: {e}"));
                io.settle();
            }
        }
    }
}

/// `TCP_NODELAY` on a link's socket, and a second handle on it.
fn set_up(stream: &TcpStream) -> std::io::Result<socket2::Socket> {
    stream.set_nodelay(true)?;
    duplicate(stream)
}

async fn dial(io: Rc<Io>, d: Dial) {
    log::debug!(
        "cluster: shard {}: dialing node {} at {}",
        io.bridge.me().shard,
        quote(d.node.name.as_str()),
        d.addr
    );
    let addr = d.addr;
    // A peer of the other address family is dialed from any address.
    let from = io.dial_from.filter(|ip| ip.is_ipv4() == addr.is_ipv4());
    let stream = match from {
        None => TcpStream::connect_timeout(addr, DIAL_TIMEOUT)
            .await
            .map_err(|e| e.to_string()),
        Some(ip) => glommio::executor()
            .spawn_blocking(move || connect_from(ip, addr))
            .await
            .map(TcpStream::from)
            .map_err(|e| format!("from {ip}: {e}")),
    };
    let set = stream.and_then(|s| set_up(&s).map(|h| (s, h)).map_err(|e| e.to_string()));
    let (stream, handle) = match set {
        Ok(s) => s,
        Err(e) => {
            io.bridge.dial_failed(Instant::now(), &d, &e);
            return;
        }
    };
    let Some((id, wake)) = io.bridge.dialed(Instant::now(), &d) else {
        return;
    };
    io.sockets.borrow_mut().insert(id, handle);
    spawn_io(io, id, wake, stream);
}

/// How long a dial waits for the peer to answer.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);

/// A TCP connection to `addr` from address `ip` (blocking: run off the
/// shard's thread).
fn connect_from(ip: std::net::IpAddr, addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SocketAddr::new(ip, 0).into())?;
    socket.connect_timeout(&addr.into(), DIAL_TIMEOUT)?;
    Ok(socket)
}

fn spawn_io(io: Rc<Io>, id: LinkId, wake: Rc<Notify>, stream: TcpStream) {
    let stream = SharedStream(Rc::new(RefCell::new(Stream::plain(stream))));
    let (writer_io, mut writer) = (io.clone(), stream.clone());
    glommio::spawn_local(async move {
        let io = writer_io;
        while !io.bridge.is_closed(id) {
            wake.wait().await;
            while let Some(bytes) = io.bridge.poll_transmit(id) {
                if let Err(e) = writer.write_all(&bytes).await {
                    io.bridge
                        .io_closed(Instant::now(), id, &format!("write: {e}"));
                    io.settle();
                    return;
                }
            }
            io.bridge.written(Instant::now(), id);
            io.settle();
        }
    })
    .detach();
    glommio::spawn_local(async move {
        let mut reader = stream;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match reader.read(&mut buf).await {
                Ok(0) => {
                    io.bridge
                        .io_closed(Instant::now(), id, "closed by the peer");
                    io.settle();
                    return;
                }
                Ok(n) => n,
                Err(e) => {
                    io.bridge
                        .io_closed(Instant::now(), id, &format!("read: {e}"));
                    io.settle();
                    return;
                }
            };
            if io.bridge.is_closed(id) {
                return;
            }
            io.bridge.handle_bytes(Instant::now(), id, &buf[..n]);
            io.settle();
        }
    })
    .detach();
}

async fn outbox_loop(io: Rc<Io>) {
    let Some(wake) = io.bridge.core().bridge_wake() else {
        return;
    };
    loop {
        wake.wait().await;
        io.bridge.drain_outbox(Instant::now());
        io.settle();
        glommio::yield_if_needed().await;
    }
}
