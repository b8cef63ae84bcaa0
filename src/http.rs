//! The operator's HTTP listener (`[http] bind`): `GET /metrics` in
//! Prometheus text, and `GET /api/v1/status` (JSON; with `http.api_token`
//! set it needs `Authorization: Bearer TOKEN`, without one it answers
//! loopback clients only).
//!
//! It serves from before the logs are recovered: until every shard
//! listens it answers 503 (`/api/v1/status`: `{"status": "starting"}`),
//! which is what a readiness probe wants to hear.
//!
//! One thread of its own, not a shard's: scrapes are rare, and HTTP
//! parsing stays off the shards' io_uring loops. A request asks every
//! shard for its counters through its control channel; each shard answers
//! at its next tick (50 ms), copying a handful of integers, so a scrape
//! never stalls one. Every input is bounded: at most
//! [`CONNECTIONS_MAX`] clients at once (each on a short-lived thread), a
//! request head of [`REQUEST_BYTES_MAX`], [`IO_TIMEOUT`] per read and
//! write, one request per connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::Api;
use crate::shard::runtime::gather_reports;

/// Clients served at once; more are closed at accept.
pub const CONNECTIONS_MAX: usize = 16;
/// Largest request head read, bytes.
pub const REQUEST_BYTES_MAX: usize = 8192;
/// Longest a client may take to send its request head, and a write of
/// the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The running listener: its address, and a handle that stops it.
pub struct HttpServer {
    addr: SocketAddr,
    /// A second handle on the listening socket: shutting it down ends the
    /// accept loop.
    socket: socket2::Socket,
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    /// Serve on `listener` (bound before the shards start, so a busy port
    /// stops the start before any MQTT client is taken) until it is
    /// dropped; `api` reaches the shards, and until `ready` every request
    /// is answered 503.
    pub(crate) fn start(
        listener: TcpListener,
        api_token: Option<String>,
        api: Api,
        ready: Arc<AtomicBool>,
    ) -> std::io::Result<HttpServer> {
        // A payload in base64 inside JSON, with room for the rest.
        let body_bytes_max = api.payload_bytes_max / 3 * 4 + 64 * 1024;
        let site = Arc::new(Site {
            api_token,
            api,
            body_bytes_max,
            ready,
        });
        let addr = listener.local_addr()?;
        let socket = socket2::Socket::from(listener.try_clone()?);
        let stopping = Arc::new(AtomicBool::new(false));
        let flag = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || accept_loop(listener, site, &flag))?;
        Ok(HttpServer {
            addr,
            socket,
            stopping,
            thread: Some(thread),
        })
    }

    /// The address it listens on (port 0 resolved).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Dropped: it stops accepting (requests in progress finish on their own
/// threads).
impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What every request may need.
struct Site {
    /// `http.api_token`; None: the API answers loopback clients only.
    api_token: Option<String>,
    api: Api,
    /// The largest request body read.
    body_bytes_max: usize,
    /// Every shard listens (until then the logs are being recovered, and
    /// everything is answered 503).
    ready: Arc<AtomicBool>,
}

/// What the server reads of a request.
struct Request {
    method: String,
    /// Path and query.
    path: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

fn accept_loop(listener: TcpListener, site: Arc<Site>, stopping: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stopping.load(Ordering::Relaxed) {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("http: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        if active.load(Ordering::Relaxed) >= CONNECTIONS_MAX {
            continue; // dropped: closed at once
        }
        let slot = Slot::take(&active);
        let site = site.clone();
        let spawned = std::thread::Builder::new()
            .name("http-client".into())
            .spawn(move || {
                let _slot = slot; // given back however serve() ends
                serve(stream, &site);
            });
        if spawned.is_err() {
            log::warn!("http: cannot start a thread for a client");
        }
    }
}

/// One of the [`CONNECTIONS_MAX`] places, given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(active: &Arc<AtomicUsize>) -> Slot {
        active.fetch_add(1, Ordering::Relaxed);
        Slot(active.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Read one request, answer it, close. The request has [`IO_TIMEOUT`]
/// to arrive whole, the answer as long to be taken, and a client still
/// sending gets one second more (see below), each a deadline for the whole
/// step however the bytes trickle.
fn serve(mut stream: TcpStream, site: &Site) {
    let loopback = stream
        .peer_addr()
        .is_ok_and(|a| a.ip().to_canonical().is_loopback());
    let deadline = Instant::now() + IO_TIMEOUT;
    let (status, content_type, body) = match read_request(&mut stream, site, loopback, deadline) {
        Err((status, why)) => (status, "text/plain", format!("{why}\n")),
        Ok(req) => route(site, &req),
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let challenge = match status {
        401 => "WWW-Authenticate: Bearer\r\n",
        _ => "",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{challenge}Connection: close\r\n\r\n",
        body.len()
    );
    let deadline = Instant::now() + IO_TIMEOUT;
    let _ = write_by(&mut stream, head.as_bytes(), deadline)
        .and_then(|()| write_by(&mut stream, body.as_bytes(), deadline));
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Read what the client still sends for a moment: closing with unread
    // input makes the kernel send a reset, which can destroy the answer.
    let until = Instant::now() + Duration::from_secs(1);
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < 64 * 1024 {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// Write all of `bytes` by `deadline`.
fn write_by(stream: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The request on `stream` by `deadline`: its head, then, once the
/// client may use what it asks for (the admin API's token or loopback
/// check), a body of `Content-Length` bytes, which only `POST
/// /api/v1/publish` may have (at most `site.body_bytes_max`); Err(status,
/// why) otherwise.
fn read_request(
    stream: &mut TcpStream,
    site: &Site,
    loopback: bool,
    deadline: Instant,
) -> Result<Request, (u16, String)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let mut read_more = |buf: &mut Vec<u8>| -> Result<(), (u16, String)> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err((400, format!("no whole request within {IO_TIMEOUT:?}")));
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut chunk) {
            Ok(0) => Err((400, "closed before the request ended".into())),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => Err((400, format!("read: {e}"))),
        }
    };
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(head)) => {
                let header = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .and_then(|h| std::str::from_utf8(h.value).ok())
                };
                let chunked = header("transfer-encoding").is_some();
                let length = header("content-length").map(|l| l.trim().parse::<usize>());
                let mut request = Request {
                    method: req.method.unwrap_or("").to_string(),
                    path: req.path.unwrap_or("").to_string(),
                    authorization: header("authorization").map(str::to_string),
                    body: Vec::new(),
                };
                let path = request.path.split('?').next().unwrap_or("");
                if path.starts_with("/api/") {
                    api_allowed(site, &request, loopback)?;
                }
                let body_max = match (request.method.as_str(), path) {
                    ("POST", "/api/v1/publish") => site.body_bytes_max,
                    _ => 0,
                };
                let length = match length {
                    _ if chunked => {
                        return Err((411, "send the body with a Content-Length".into()))
                    }
                    None => 0,
                    Some(Ok(l)) if l <= body_max => l,
                    Some(Ok(_)) => {
                        return Err((413, format!("a body of at most {body_max} bytes here")))
                    }
                    Some(Err(_)) => return Err((400, "a bad Content-Length".into())),
                };
                while buf.len() < head + length {
                    read_more(&mut buf)?;
                }
                buf.truncate(head + length);
                buf.drain(..head);
                request.body = buf;
                return Ok(request);
            }
            Ok(httparse::Status::Partial) if buf.len() < REQUEST_BYTES_MAX => {}
            Ok(httparse::Status::Partial) => return Err((400, "request head too large".into())),
            Err(e) => return Err((400, format!("not an HTTP request: {e}"))),
        }
        read_more(&mut buf)?;
    }
}

/// Status, content type and body for `req` (an admin API request comes
/// here allowed).
fn route(site: &Site, req: &Request) -> (u16, &'static str, String) {
    let path = req.path.split('?').next().unwrap_or("");
    let controls = &site.api.controls;
    if !site.ready.load(Ordering::Acquire) {
        let why = "starting: the logs are being recovered";
        return match path {
            "/api/v1/status" => {
                let body = serde_json::json!({ "status": "starting", "why": why });
                (503, "application/json", format!("{body}\n"))
            }
            _ => (503, "text/plain", format!("{why}\n")),
        };
    }
    if path.starts_with("/api/") {
        let (status, body) = site.api.route(&req.method, &req.path, &req.body);
        return (status, "application/json", format!("{body}\n"));
    }
    match (req.method.as_str(), path) {
        ("GET", "/metrics") => {
            let mut text = crate::metrics::render(&gather_reports(controls), controls.len());
            if let Some(q) = &site.api.cluster {
                text.push_str(&q.metrics());
            }
            (200, "text/plain; version=0.0.4; charset=utf-8", text)
        }
        (_, "/metrics") => (405, "text/plain", "GET only\n".into()),
        _ => (
            404,
            "text/plain",
            "not found: GET /metrics, /api/v1/...\n".into(),
        ),
    }
}

/// Err(status, why) unless `req` may use the API: the bearer token when
/// `http.api_token` is set (compared in constant time), else a loopback
/// client.
fn api_allowed(site: &Site, req: &Request, loopback: bool) -> Result<(), (u16, String)> {
    match &site.api_token {
        Some(token) => {
            let given = req
                .authorization
                .as_deref()
                .and_then(|a| a.strip_prefix("Bearer "))
                .unwrap_or("");
            let same: bool =
                subtle::ConstantTimeEq::ct_eq(given.as_bytes(), token.as_bytes()).into();
            match same {
                true => Ok(()),
                false => Err((401, "a bearer token is needed".into())),
            }
        }
        None if loopback => Ok(()),
        None => Err((
            403,
            "set http.api_token to use the API from other addresses".into(),
        )),
    }
}
