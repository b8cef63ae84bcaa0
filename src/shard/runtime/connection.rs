//! Connection tasks: accept, read CONNECT, move to the home shard, then one
//! reader and one writer task per connection.
//!
//! Shard-local runtime code. These tasks are the only code that touches a
//! socket, and they make no protocol decisions: bytes go to the codec,
//! packets to the core ([`ShardCore::handshake`], [`ShardCore::attach`],
//! [`ShardCore::handle_packet`]); packets to send come back from the session
//! ([`ShardCore::poll_transmit`]).
//!
//! The broker's `unsafe` code outside the log is here: borrowing a socket's
//! descriptor to duplicate it for the move to the home shard, and handing a
//! listening socket set up with socket2 to glommio.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt, FutureExt};
use glommio::net::{TcpListener, TcpStream};

use crate::codec::{self, reason, ConnAck, Connect, DecodeError, Packet, Version};

use super::super::connect::{Arrival, Handshake};
use super::super::mesh::{Handoff, MeshMsg};
use super::super::{ConnHandle, ConnectRefusal, ShardCore};
use super::transport::Stream;
use super::TlsListeners;
use crate::shard::CertLogin;
use crate::tls::{cert_user, CertIdentity};
use crate::ws;

/// Why a connection ended before it became a session.
#[derive(Debug)]
enum HandshakeError {
    Io(io::Error),
    Closed,
    TimedOut,
    NotConnect,
    Decode(DecodeError),
    WebSocket(String),
}

/// Accept connections on `listener` until the task is cancelled.
/// When listener `index` is a TLS one in `tls` (the shard's current
/// configurations, replaced on reload), each connection starts its TLS
/// handshake; with `ws_path`, its WebSocket upgrade.
pub(crate) async fn accept_loop(
    shard: Rc<ShardCore>,
    listener: TcpListener,
    index: usize,
    tls: Rc<RefCell<TlsListeners>>,
    ws_path: Option<Rc<str>>,
) {
    loop {
        match listener.accept().await {
            Ok(stream) if shard.handshakes.get() >= shard.connections_max => {
                shard.count_refused(ConnectRefusal::Unavailable);
                shard_log!(
                    shard,
                    log::Level::Warn,
                    "shard {}: {} connections are waiting to send CONNECT; closing a new one",
                    shard.id,
                    shard.handshakes.get()
                );
                drop(stream);
            }
            Ok(tcp) => {
                let tls = tls.borrow().get(index).cloned().flatten();
                let identity = tls.as_ref().map_or(CertIdentity::None, |t| t.identity);
                let (stream, counted) = match tls {
                    None => (Stream::plain(tcp), None),
                    Some(_)
                        if shard.tls_handshakes.get() >= shard.config.server.tls_handshakes_max =>
                    {
                        shard.state.borrow_mut().stats.tls_handshakes_refused += 1;
                        shard_log!(
                            shard,
                            log::Level::Warn,
                            "shard {}: {} TLS connections are waiting for their handshake and CONNECT (server.tls_handshakes_max); closing a new one",
                            shard.id,
                            shard.tls_handshakes.get()
                        );
                        continue;
                    }
                    Some(t) => match Stream::tls(tcp, t.config.clone()) {
                        Ok(s) => {
                            // Counted at accept, so a burst of accepts
                            // cannot pass the bound.
                            let n = &shard.tls_handshakes;
                            n.set(n.get() + 1);
                            let counted = shard.clone();
                            let uncount = move || {
                                let n = &counted.tls_handshakes;
                                n.set(n.get() - 1);
                            };
                            (s, Some(scopeguard(uncount)))
                        }
                        Err(e) => {
                            shard_log!(shard, log::Level::Warn, "cannot start TLS: {e}");
                            continue;
                        }
                    },
                };
                let (ws, on) = (ws_path.clone(), shard.clone());
                let task = async move {
                    let _counted = counted;
                    handshake(on, stream, identity, ws).await
                };
                glommio::spawn_local(task).detach();
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                shard_log!(
                    shard,
                    log::Level::Warn,
                    "shard {}: accept failed: {e}",
                    shard.id
                );
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Read CONNECT within the connect timeout, check the client id, and serve
/// the connection here or hand it to its home shard.
async fn handshake(
    shard: Rc<ShardCore>,
    mut stream: Stream,
    identity: CertIdentity,
    ws_path: Option<Rc<str>>,
) {
    shard.handshakes.set(shard.handshakes.get() + 1);
    let counted = shard.clone();
    let _counted = scopeguard(move || counted.handshakes.set(counted.handshakes.get() - 1));
    let _ = stream.tcp().set_nodelay(true);
    let peer = stream.tcp().peer_addr().ok();
    let mut arrival = Arrival {
        peer,
        local: stream.tcp().local_addr().ok(),
        certificate: CertLogin::NotUsed,
        unix_s: 0,
    };
    let max = shard.config.mqtt.packet_size_max_bytes as usize;
    let timeout = Duration::from_millis(shard.config.server.connect_timeout_ms);
    let mut buf = BytesMut::new();
    let read = async {
        if let Some(path) = &ws_path {
            websocket_upgrade(&mut stream, path).await?;
        }
        read_connect(&mut stream, &mut buf, max).await
    };
    let expired = async {
        glommio::timer::sleep(timeout).await;
        Err(HandshakeError::TimedOut)
    };
    let mut connect = match read.or(expired).await {
        Ok(c) => c,
        Err(e) => return refuse_handshake(&shard, &mut stream, peer, e).await,
    };
    // The wall clock once CONNECT is here: a login token's exp and nbf are
    // judged by it.
    arrival.unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if identity != CertIdentity::None {
        // The certificate names the user (its password is not checked).
        let user = stream
            .peer_certificate()
            .and_then(|c| cert_user(c, identity));
        arrival.certificate = match user {
            Some(_) => CertLogin::Identified,
            None => CertLogin::Missing,
        };
        connect.username = user;
    }
    let (home, assigned, grant) = match shard.handshake(&connect, arrival, Instant::now()) {
        Handshake::Serve { assigned, grant } => {
            // Served by a task of its own: this handshake's future is
            // freed now.
            serve(shard, stream, connect, buf, assigned, grant);
            return;
        }
        Handshake::MoveTo {
            home,
            assigned,
            grant,
        } => (home, assigned, grant),
        Handshake::Refuse {
            code,
            answer: true,
            delay,
        } => {
            if !delay.is_zero() {
                glommio::timer::sleep(delay).await;
            }
            return send_connack_error(&shard, &mut stream, connect.version, code).await;
        }
        Handshake::Refuse { answer: false, .. } => {
            // Only CONNECT checks without a login come here: nothing to
            // slow down.
            let _ = stream.shutdown().await;
            return;
        }
    };
    let (tcp, tls, ws) = stream.into_parts();
    match duplicate(&tcp) {
        Ok(socket) => {
            let handoff = Handoff {
                socket,
                connect,
                buffered: buf,
                assigned_client_id: assigned,
                tls,
                ws,
                grant,
            };
            shard.mesh.send(home, MeshMsg::Handoff(Box::new(handoff)));
        }
        Err(e) => shard_log!(
            shard,
            log::Level::Warn,
            "{peer:?}: cannot move connection to shard {home}: {e}"
        ),
    }
}

/// Read the WebSocket upgrade request and answer it; from then on the
/// stream's bytes are frames. Refused: the HTTP error is sent.
async fn websocket_upgrade(stream: &mut Stream, path: &str) -> Result<(), HandshakeError> {
    let mut request = Vec::new();
    let mut chunk = vec![0u8; 2048]; // heap: only WebSocket handshakes pay for it
    loop {
        match ws::upgrade(&request, path) {
            ws::Upgrade::Incomplete => {}
            ws::Upgrade::Accept { response, consumed } => {
                stream
                    .write_raw(&response)
                    .await
                    .map_err(HandshakeError::Io)?;
                let mut framer = ws::Framer::new();
                framer.feed(&request[consumed..]);
                stream.start_websocket(framer);
                return Ok(());
            }
            ws::Upgrade::Refuse { response, why } => {
                let _ = stream.write_raw(&response).await;
                return Err(HandshakeError::WebSocket(why));
            }
        }
        match stream.read_raw(&mut chunk).await {
            Ok(0) => return Err(HandshakeError::Closed),
            Ok(n) => request.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(HandshakeError::Io(e)),
        }
    }
}

async fn read_connect(
    stream: &mut Stream,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Box<Connect>, HandshakeError> {
    loop {
        match codec::decode(buf, Version::V5, max) {
            Ok(Some(Packet::Connect(c))) => return Ok(c),
            Ok(Some(_)) => return Err(HandshakeError::NotConnect),
            Ok(None) => {}
            Err(e) => return Err(HandshakeError::Decode(e)),
        }
        match read_into(stream, buf, 4096).await {
            Ok(0) => return Err(HandshakeError::Closed),
            Ok(_) => {}
            Err(e) => return Err(HandshakeError::Io(e)),
        }
    }
}

thread_local! {
    /// The client whose packets this shard is handling now, for the panic
    /// report: set around each batch of packets read, not per packet.
    /// An `Rc` of the connection: setting it costs no atomic operation.
    static CURRENT_CLIENT: RefCell<Option<Rc<ConnHandle>>> = const { RefCell::new(None) };
    /// The shard's one read buffer (one thread per shard). glommio's
    /// non-buffered read tries `recv` and otherwise waits for readiness with
    /// an io_uring poll that keeps no reference to the buffer, so the buffer
    /// is borrowed only during a poll: an idle connection holds none.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Read what the socket has (up to `max` bytes) onto the end of `buf`.
async fn read_into(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    max: usize,
) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        READ_BUF.with(|shared| {
            let mut shared = shared.borrow_mut();
            if shared.len() < max {
                shared.resize(max, 0);
            }
            let poll = Pin::new(&mut *stream).poll_read(cx, &mut shared[..max]);
            if let Poll::Ready(Ok(n)) = poll {
                buf.extend_from_slice(&shared[..n]);
            }
            poll
        })
    })
    .await
}

/// Answer a failed handshake where the protocol allows an answer, and close.
async fn refuse_handshake(
    shard: &ShardCore,
    stream: &mut Stream,
    peer: Option<std::net::SocketAddr>,
    e: HandshakeError,
) {
    if !matches!(e, HandshakeError::Io(_) | HandshakeError::Closed) {
        shard.count_refused(ConnectRefusal::Protocol);
    }
    match e {
        HandshakeError::Decode(DecodeError::UnsupportedProtocolVersion(level)) => {
            shard_log!(
                shard,
                log::Level::Info,
                "{peer:?}: unsupported protocol level {level}"
            );
            let version = if level >= 5 {
                Version::V5
            } else {
                Version::V3_1_1
            };
            send_connack_error(shard, stream, version, reason::UNSUPPORTED_PROTOCOL_VERSION).await;
            return;
        }
        HandshakeError::Decode(e) => {
            shard_log!(shard, log::Level::Info, "{peer:?}: bad CONNECT: {e}")
        }
        HandshakeError::NotConnect => shard_log!(
            shard,
            log::Level::Info,
            "{peer:?}: [MQTT-3.1.0-1] first packet is not CONNECT; closing"
        ),
        HandshakeError::TimedOut => shard_log!(
            shard,
            log::Level::Debug,
            "{peer:?}: no CONNECT within the connect timeout"
        ),
        HandshakeError::Io(e) => shard_log!(
            shard,
            log::Level::Debug,
            "{peer:?}: read error before CONNECT: {e}"
        ),
        HandshakeError::WebSocket(why) => shard_log!(
            shard,
            log::Level::Info,
            "{peer:?}: WebSocket upgrade refused: {why}"
        ),
        HandshakeError::Closed => {}
    }
    let _ = stream.shutdown().await;
}

/// Send a refusing CONNACK, then close in order (see [`close_drained`]),
/// all within `server.close_drain_ms`.
async fn send_connack_error(shard: &ShardCore, stream: &mut Stream, version: Version, code: u8) {
    let mut out = BytesMut::new();
    let ack = ConnAck {
        session_present: false,
        reason: code,
        properties: Default::default(),
    };
    codec::encode(&Packet::ConnAck(ack), version, &mut out);
    let answer = async {
        if stream.write_all(&out).await.is_ok() {
            drain_after_close(shard, stream).await;
        }
    };
    within_close_drain(shard, answer).await;
}

/// End a connection the broker closes: shut the write side (the client
/// reads what was sent, then EOF), then read and discard its input; all
/// within `server.close_drain_ms`, and at most `server.close_drain_bytes`
/// read. Closing a socket with unread input makes the kernel send a reset,
/// which can destroy the reason code before the client reads it.
async fn close_drained(shard: &ShardCore, stream: &mut Stream) {
    within_close_drain(shard, drain_after_close(shard, stream)).await;
}

/// [`close_drained`] of a stream it owns.
async fn close_owned(shard: Rc<ShardCore>, mut stream: Stream) {
    close_drained(&shard, &mut stream).await
}

/// Run `f` for at most `server.close_drain_ms`.
async fn within_close_drain(shard: &ShardCore, f: impl std::future::Future<Output = ()>) {
    let time = Duration::from_millis(shard.config.server.close_drain_ms);
    f.or(async {
        glommio::timer::sleep(time).await;
    })
    .await;
}

/// Shut the write side (TLS and WebSocket say goodbye first), then read
/// and discard up to `server.close_drain_bytes`; unbounded in time.
async fn drain_after_close(shard: &ShardCore, stream: &mut Stream) {
    if stream.shutdown_write().await.is_err() {
        return;
    }
    let bytes_max = shard.config.server.close_drain_bytes;
    // On the heap, and only now: an array here would sit in every
    // connection's task for its whole life (this future is part of it).
    let mut buf = vec![0u8; 4096];
    let mut total = 0usize;
    while total < bytes_max {
        // Under any WebSocket framing: it has ended, and reads nothing.
        match stream.read_raw(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => total = total.saturating_add(n),
        }
    }
}

/// This shard's glommio listener on a socket bound and set listening by
/// `listen::open`, and a second handle on the same socket: shutting that
/// one down at stop takes the socket out of the port at once.
#[allow(unsafe_code)]
pub(crate) fn listener_from(socket: socket2::Socket) -> io::Result<(TcpListener, socket2::Socket)> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let handle = socket.try_clone()?;
    // SAFETY: the descriptor is owned by `socket`, bound and listening; its
    // ownership passes to the glommio listener.
    let listener = unsafe { TcpListener::from_raw_fd(socket.into_raw_fd()) };
    Ok((listener, handle))
}

/// Duplicate the socket's descriptor so the connection can move to another
/// shard; the caller drops its own stream afterwards.
#[allow(unsafe_code)]
pub(super) fn duplicate(stream: &TcpStream) -> io::Result<socket2::Socket> {
    // SAFETY: the descriptor is owned by `stream`, which is alive for the
    // whole (immediate) use of the borrow: it is duplicated at once.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let owned = std::net::TcpStream::from(fd.try_clone_to_owned()?);
    Ok(socket2::Socket::from(owned))
}

/// A connection handed over by another shard.
pub(crate) fn spawn_handoff(shard: Rc<ShardCore>, h: Handoff) {
    let stream = Stream::from_parts(TcpStream::from(h.socket), h.tls, h.ws);
    serve(
        shard,
        stream,
        h.connect,
        h.buffered,
        h.assigned_client_id,
        h.grant,
    );
}

/// Serve an accepted (or handed over) connection on its home shard: attach
/// it, then a task serves it (or answers its refusal).
///
/// That task lives as long as the connection, so its future is kept small
/// (bytes per idle connection): it starts from what the connection needs
/// once attached, and the closing and pausing paths are boxed, allocated
/// only when taken.
fn serve(
    shard: Rc<ShardCore>,
    mut stream: Stream,
    connect: Box<Connect>,
    buffered: BytesMut,
    assigned: Option<String>,
    grant: crate::auth::Grant,
) {
    let version = connect.version;
    match shard.attach_granted(Instant::now(), connect, assigned, grant) {
        Ok(handle) => {
            // Counted at once (a stop waits for the sockets it counts to
            // flush); `connected` counts it down.
            shard.sockets.set(shard.sockets.get() + 1);
            stream.split(handle.clone());
            let stream = SharedStream(Rc::new(RefCell::new(stream)));
            glommio::spawn_local(connected(shard, handle, stream, buffered)).detach();
        }
        Err(code) => {
            let refuse =
                async move { send_connack_error(&shard, &mut stream, version, code).await };
            glommio::spawn_local(refuse).detach();
        }
    }
}

/// Serve connection `handle` until it closes: its writer task beside,
/// its reader here.
async fn connected(
    shard: Rc<ShardCore>,
    handle: Rc<ConnHandle>,
    stream: SharedStream,
    buffered: BytesMut,
) {
    let _open = scopeguard(|| shard.sockets.set(shard.sockets.get() - 1));
    let writer = glommio::spawn_local(write_loop(shard.clone(), handle.clone(), stream.clone()));
    let peer_ended = read_loop(&shard, &handle, stream.clone(), buffered).await;
    if !handle.is_closing() {
        shard.handle_connection_lost(&handle, Instant::now());
    }
    let wrote_all = writer.await;
    // Both tasks have ended, so the socket is this task's alone again. A
    // client that closed its WebSocket still has TCP (and TLS) open.
    let closed_ws = stream.0.borrow().closed_by_peer();
    if wrote_all && (!peer_ended || closed_ws) {
        if let Ok(cell) = Rc::try_unwrap(stream.0) {
            Box::pin(close_owned(shard.clone(), cell.into_inner())).await;
        }
    }
}

/// The client whose packets the calling shard thread was handling, if it
/// was handling any: the broker's panic hook names it.
pub fn last_client() -> Option<crate::message::ClientId> {
    CURRENT_CLIENT.with(|c| {
        c.try_borrow()
            .ok()
            .and_then(|c| c.as_ref().map(|conn| conn.client_id.clone()))
    })
}

/// Handle the packets decoded from `buf` with [`CURRENT_CLIENT`] naming
/// the client; Err on undecodable bytes (the session was told).
/// `last_topic` is the connection's last new PUBLISH topic, which the next
/// PUBLISH to the same topic shares. Stops when a peer node falls
/// behind ([`ShardCore::links_full`]: one read holds many small
/// publishes), or a subscriber of the connection's (`shard::pressure`),
/// leaving the rest in `buf`: Ok(true) then.
fn handle_packets(
    shard: &ShardCore,
    conn: &Rc<ConnHandle>,
    buf: &mut BytesMut,
    last_topic: &mut Option<Arc<str>>,
) -> Result<bool, ()> {
    let max = shard.config.mqtt.packet_size_max_bytes as usize;
    let now = Instant::now();
    let hold = shard.publisher_hold();
    CURRENT_CLIENT.with(|c| *c.borrow_mut() = Some(conn.clone()));
    let result = loop {
        if !buf.is_empty() && (shard.links_full() || conn.held(now, hold).is_some()) {
            break Ok(true);
        }
        match codec::decode_sharing(buf, conn.version, max, last_topic) {
            Ok(Some(packet)) => {
                #[cfg(debug_assertions)]
                test_panic_trigger(shard, conn);
                shard.handle_packet(conn, now, packet)
            }
            Ok(None) => break Ok(false),
            Err(e) => {
                let why = e.to_string();
                shard.handle_bad_bytes(conn, now, e.reason_code(), &why);
                break Err(());
            }
        }
        if conn.is_closing() {
            break Ok(false);
        }
    };
    CURRENT_CLIENT.with(|c| *c.borrow_mut() = None);
    result
}

/// Debug builds only, for the test that a shard's panic ends the process:
/// a packet from the client named by `SHARDMQ_TEST_PANIC_CLIENT_ID` panics.
#[cfg(debug_assertions)]
fn test_panic_trigger(shard: &ShardCore, conn: &ConnHandle) {
    if shard.test_panic_client.as_deref() == Some(&*conn.client_id) {
        panic!("test-only panic trigger (SHARDMQ_TEST_PANIC_CLIENT_ID)");
    }
}

/// How often a reader paused for a peer that fell behind looks again by
/// itself (the end of the pause wakes it at once): rarely, since a shard
/// may hold thousands of paused readers.
const LINK_PAUSE_LOOK: Duration = Duration::from_millis(20);

/// Read and decode until the connection closes; true when the peer ended
/// it (EOF or a socket error), false when the broker did.
async fn read_loop(
    shard: &ShardCore,
    conn: &Rc<ConnHandle>,
    mut stream: SharedStream,
    mut buf: BytesMut,
) -> bool {
    let read_max = shard.config.server.read_buffer_bytes;
    let hold = shard.publisher_hold();
    let mut last_topic = None;
    loop {
        let Ok(stopped) = handle_packets(shard, conn, &mut buf, &mut last_topic) else {
            return false;
        };
        if conn.is_closing() {
            return false;
        }
        if shard.mesh.congested() {
            shard.state.borrow_mut().stats.mesh_pauses += 1;
        }
        if shard.links_full() {
            shard.state.borrow_mut().stats.link_pauses += 1;
        }
        // Paused (rarely): the wait is a future of its own, so that an
        // idle connection's task does not carry its room.
        if pause_needed(shard, conn, hold).is_some() && Box::pin(pause(shard, conn, hold)).await {
            return false;
        }
        if stopped {
            continue; // what is left in the buffer goes before more is read
        }
        if buf.is_empty() && buf.capacity() > 0 {
            buf = BytesMut::new(); // an idle connection keeps no buffer
        }
        let read = async { Some(read_into(&mut stream, &mut buf, read_max).await) };
        let closed = async {
            conn.closed.wait().await;
            None
        };
        match read.or(closed).await {
            Some(Ok(0) | Err(_)) => return true,
            Some(Ok(n)) => shard.state.borrow_mut().stats.bytes_received += n as u64,
            None => return false,
        }
        if conn.is_closing() {
            return false;
        }
    }
}

/// Why the reader must wait before it reads again.
enum Pause {
    /// The mesh to the other shards is congested.
    Mesh,
    /// A peer node is behind.
    Links,
    /// A subscriber of the connection's is behind: for at most this long.
    Held(Duration),
    /// The client does not read what it is sent.
    Backlog,
}

/// Whether the reader must wait before it reads again, and why.
fn pause_needed(shard: &ShardCore, conn: &ConnHandle, hold: Duration) -> Option<Pause> {
    if shard.mesh.congested() {
        Some(Pause::Mesh)
    } else if shard.links_full() {
        Some(Pause::Links)
    } else if let Some(left) = (conn.is_held())
        .then(|| conn.held(Instant::now(), hold))
        .flatten()
    {
        Some(Pause::Held(left))
    } else {
        shard.transmit_backlogged(conn).then_some(Pause::Backlog)
    }
}

/// Wait until [`pause_needed`] says the reader may read again; true when
/// the connection is closing meanwhile.
async fn pause(shard: &ShardCore, conn: &Rc<ConnHandle>, hold: Duration) -> bool {
    // Whether a subscriber behind held it during this pause (counted
    // once).
    let mut held = false;
    while let Some(why) = pause_needed(shard, conn, hold) {
        if conn.is_closing() {
            return true;
        }
        match why {
            Pause::Mesh => glommio::timer::sleep(Duration::from_millis(1)).await,
            Pause::Links => {
                // Woken when the pause ends; looks again now and then
                // all the same.
                let ended = conn.drained.wait();
                let look = glommio::timer::sleep(LINK_PAUSE_LOOK);
                ended.or(look).await;
            }
            Pause::Held(left) => {
                if !held {
                    held = true;
                    shard.state.borrow_mut().stats.publisher_holds += 1;
                }
                // Woken when the last session that holds it releases it.
                let released = conn.drained.wait();
                released.or(glommio::timer::sleep(left)).await;
            }
            // A client that does not read what we send it is not read
            // either.
            Pause::Backlog => conn.drained.wait().await,
        }
    }
    if held && conn.is_held() {
        // Read again with a session still behind: the hold ran out.
        shard.state.borrow_mut().stats.publisher_holds_expired += 1;
    }
    conn.is_closing()
}

/// Write the session's packets until the connection closes; true when
/// everything, the last packets included, was written. A write that waits
/// `server.send_timeout_ms` for the client to read ends the connection.
async fn write_loop(shard: Rc<ShardCore>, conn: Rc<ConnHandle>, mut stream: SharedStream) -> bool {
    let limit = shard.config.server.write_buffer_bytes;
    let timeout = Duration::from_millis(shard.config.server.send_timeout_ms);
    let mut out = BytesMut::new();
    let watched = stream.clone();
    loop {
        let closing = conn.is_closing();
        if closing && shard.closing_waits_for_sync(&conn) {
            conn.wake.wait().await;
            continue;
        }
        if closing {
            for p in conn.poll_last_packets() {
                codec::encode(&p, conn.version, &mut out);
            }
        } else {
            shard.poll_transmit(&conn, &mut out, limit);
        }
        // TLS and WebSocket bytes the reader's input made (handshake
        // messages, pongs) go out with the packets, or alone.
        let flush = !out.is_empty() || stream.0.borrow().wants_flush();
        if flush {
            // The watch starts only if the socket does not take it all
            // at once (a future is not polled before it is awaited).
            let write = async {
                stream.write_all(&out).await?;
                stream.flush().await
            };
            match write.or(stalled(&watched, timeout)).await {
                Ok(()) => {}
                Err(e) => {
                    if e.kind() == io::ErrorKind::TimedOut {
                        send_timed_out(&shard, &conn, timeout);
                    }
                    // The reader may be paused on the backlog: end the
                    // connection for it too.
                    if !conn.is_closing() {
                        shard.handle_connection_lost(&conn, Instant::now());
                    }
                    return false;
                }
            }
            if !out.is_empty() {
                shard.state.borrow_mut().stats.bytes_sent += out.len() as u64;
                out.clear();
                conn.drained.notify();
                if out.capacity() > 8192 {
                    out = BytesMut::new(); // give back what a burst grew
                }
                continue;
            }
        }
        if closing {
            return true;
        }
        conn.wake.wait().await;
    }
}

/// Err(TimedOut) once the client's TCP has acknowledged no byte for
/// `timeout`: checked every fifth of it, so it fires between 1 and 1.2
/// times `timeout` after the last acknowledgement, and never while the
/// client keeps reading, however slowly (the kernel's acknowledgements
/// count, not the writes, which a full send buffer makes rare).
async fn stalled(stream: &SharedStream, timeout: Duration) -> io::Result<()> {
    let acked = || bytes_acked(stream.0.borrow().tcp());
    let period = timeout / 5;
    let mut seen = acked();
    let mut idle = 0;
    while idle < 5 {
        glommio::timer::sleep(period).await;
        let now = acked();
        idle = if now == seen { idle + 1 } else { 0 };
        seen = now;
    }
    Err(io::ErrorKind::TimedOut.into())
}

/// The bytes the peer's TCP has acknowledged on `tcp` (`TCP_INFO`'s
/// `tcpi_bytes_acked`); 0 if the kernel does not say.
#[allow(unsafe_code)]
fn bytes_acked(tcp: &TcpStream) -> u64 {
    // SAFETY: `info` is a plain C struct the kernel fills up to `len`
    // bytes; the descriptor belongs to `tcp`, alive for the call.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        if rc == 0 {
            info.tcpi_bytes_acked
        } else {
            0
        }
    }
}

/// A write waited `server.send_timeout_ms` for the client to take a byte:
/// count it and say so (the caller ends the connection).
fn send_timed_out(shard: &ShardCore, conn: &ConnHandle, timeout: Duration) {
    shard.state.borrow_mut().stats.send_timeouts += 1;
    shard_log!(
        shard,
        log::Level::Info,
        "client {}: took no byte for {} ms; closing the connection",
        crate::text::quote(&conn.client_id),
        timeout.as_millis()
    );
}

/// Runs `f` when dropped (counts open sockets even if a task is cancelled).
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// One socket used by a reader and a writer task on the same shard. Each
/// poll borrows the stream only for its own duration, and a shard runs one
/// poll at a time, so the borrows never overlap.
#[derive(Clone)]
pub(super) struct SharedStream(pub(super) Rc<RefCell<Stream>>);

impl AsyncRead for SharedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_read(cx, buf)
    }
}

impl AsyncWrite for SharedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_close(cx)
    }
}
