//! `shardmq-floor`: the floor of the broker comparison (issue 18). A relay
//! on shardmq's runtime (glommio, io_uring) that does the least any MQTT
//! broker must do for `shardmq-bench`'s rows: accept, read, find a
//! PUBLISH's subscribers by its topic, write its bytes to them unchanged
//! (one write per connection per loop turn), and answer what the load
//! generator waits for (CONNACK, SUBACK, PUBACK, PUBREC / PUBREL /
//! PUBCOMP, UNSUBACK, PINGRESP), each message of a
//! `$share/{group}/{filter}` subscription to one member in turn. No
//! sessions, no queues, no limits, no log, no QoS downgrade, no retained
//! messages, no second thread: on the closed-loop rows its broker CPU per
//! delivered message is a reference that no broker on the same machine
//! can beat (at low fixed rates, where each message is a wake-up, a
//! single-threaded broker that batches differently can: see the fixed-rate
//! and fleet rows of `loadtest/compare.sh`). Not a broker. Never expose
//! it: it trusts its clients.
//!
//! ```text
//! shardmq-floor --listen 127.0.0.1:1883
//! ```
//!
//! One glommio executor serves every connection; a broker with two
//! threads pays for the cross-thread hand-off this one never makes, so
//! the floor is lower than any two-thread broker could reach.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};

use clap::Parser;
use futures_lite::io::{ReadHalf, WriteHalf};
use futures_lite::{AsyncRead, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use shardmq::codec::{Packet, SubAck, UnsubAck, Version};

/// A relay that does the least an MQTT broker must do for shardmq-bench.
#[derive(Parser)]
#[command(name = "shardmq-floor", version)]
struct Args {
    /// Address to listen on (only ever a loopback address: no checks).
    #[arg(long, default_value = "127.0.0.1:1883")]
    listen: SocketAddr,
}

/// Largest packet taken (remaining length); a larger one closes the
/// connection. The rows send 64-byte payloads.
const PACKET_BYTES_MAX: usize = 1 << 20;

/// Bytes asked of the socket per read.
const READ_BYTES: usize = 64 << 10;

thread_local! {
    /// The one read buffer (one thread), borrowed only during a poll (like
    /// the broker's): an idle connection holds no buffer.
    static READ_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_BYTES]);
}

fn main() {
    let args = Args::parse();
    let executor = LocalExecutorBuilder::new(Placement::Unbound)
        .name("floor")
        .spawn(move || serve(args.listen))
        .expect("start the executor");
    if let Err(e) = executor.join().expect("executor") {
        eprintln!("shardmq-floor: {e}");
        std::process::exit(1);
    }
}

async fn serve(addr: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    eprintln!("shardmq-floor listening on {}", listener.local_addr()?);
    let relay = Rc::new(Relay::default());
    let mut next_id = 0u64;
    loop {
        let stream = listener.accept().await?;
        stream.set_nodelay(true)?;
        next_id += 1;
        let conn = Rc::new(Conn {
            id: next_id,
            out: RefCell::new(Vec::new()),
            waker: Cell::new(None),
            closed: Cell::new(false),
            v5: Cell::new(false),
        });
        // Read by one task, written by another.
        let (reader, writer) = futures_lite::io::split(stream);
        glommio::spawn_local(write_loop(conn.clone(), writer)).detach();
        let relay = relay.clone();
        glommio::spawn_local(async move {
            let _ = read_loop(&relay, &conn, reader).await;
            relay.forget(&conn);
            conn.closed.set(true);
            conn.wake();
        })
        .detach();
    }
}

/// Who is subscribed to what: exact topics in a map, filters with
/// wildcards in a list, shared subscriptions with their members.
#[derive(Default)]
struct Relay {
    exact: RefCell<HashMap<Vec<u8>, Vec<Rc<Conn>>>>,
    wild: RefCell<Vec<(String, Rc<Conn>)>>,
    shared: RefCell<Vec<Group>>,
}

/// One `$share/{group}/{filter}`: its members, served in turn.
struct Group {
    /// `{group}/{filter}`, as subscribed after `$share/`.
    name: Vec<u8>,
    filter: String,
    members: Vec<Rc<Conn>>,
    next: usize,
}

impl Relay {
    /// Subscribe `conn` to `filter`; false for a malformed shared
    /// subscription (refused in the SUBACK, as the broker's
    /// `router::topic::parse_shared` says).
    fn subscribe(&self, filter: &[u8], conn: &Rc<Conn>) -> bool {
        let text = String::from_utf8_lossy(filter);
        let Ok(shared) = shardmq::router::topic::parse_shared(&text) else {
            return false;
        };
        if let Some((_, inner)) = shared {
            let name = &filter[b"$share/".len()..];
            let mut groups = self.shared.borrow_mut();
            match groups.iter_mut().find(|g| g.name == name) {
                Some(g) if g.members.iter().any(|c| c.id == conn.id) => {}
                Some(g) => g.members.push(conn.clone()),
                None => groups.push(Group {
                    name: name.to_vec(),
                    filter: inner.to_string(),
                    members: vec![conn.clone()],
                    next: 0,
                }),
            }
        } else if filter.iter().any(|&b| b == b'+' || b == b'#') {
            let filter = text.into_owned();
            let mut wild = self.wild.borrow_mut();
            if !wild.iter().any(|(f, c)| c.id == conn.id && *f == filter) {
                wild.push((filter, conn.clone()));
            }
        } else {
            let mut exact = self.exact.borrow_mut();
            let subs = exact.entry(filter.to_vec()).or_default();
            if !subs.iter().any(|c| c.id == conn.id) {
                subs.push(conn.clone());
            }
        }
        true
    }

    fn unsubscribe(&self, filter: &[u8], conn: &Conn) {
        if let Some(subs) = self.exact.borrow_mut().get_mut(filter) {
            subs.retain(|c| c.id != conn.id);
        }
        (self.wild.borrow_mut()).retain(|(f, c)| !(c.id == conn.id && f.as_bytes() == filter));
        if let Some(name) = filter.strip_prefix(b"$share/") {
            for g in self
                .shared
                .borrow_mut()
                .iter_mut()
                .filter(|g| g.name == name)
            {
                g.members.retain(|c| c.id != conn.id);
            }
        }
    }

    fn forget(&self, conn: &Conn) {
        self.exact.borrow_mut().retain(|_, subs| {
            subs.retain(|c| c.id != conn.id);
            !subs.is_empty()
        });
        self.wild.borrow_mut().retain(|(_, c)| c.id != conn.id);
        for g in self.shared.borrow_mut().iter_mut() {
            g.members.retain(|c| c.id != conn.id);
        }
    }

    /// Write `packet` (a whole PUBLISH) to every subscriber of `topic`.
    fn publish(&self, topic: &[u8], packet: &[u8]) {
        if let Some(subs) = self.exact.borrow().get(topic) {
            for c in subs {
                c.send(packet);
            }
        }
        let wild = self.wild.borrow();
        let mut groups = self.shared.borrow_mut();
        if wild.is_empty() && groups.is_empty() {
            return;
        }
        let topic = String::from_utf8_lossy(topic);
        for (filter, c) in wild.iter() {
            if shardmq::router::topic::matches(filter, &topic) {
                c.send(packet);
            }
        }
        for g in groups.iter_mut() {
            if !g.members.is_empty() && shardmq::router::topic::matches(&g.filter, &topic) {
                g.members[g.next % g.members.len()].send(packet);
                g.next = g.next.wrapping_add(1);
            }
        }
    }
}

/// One client connection: the bytes waiting for its socket.
struct Conn {
    id: u64,
    out: RefCell<Vec<u8>>,
    waker: Cell<Option<Waker>>,
    closed: Cell<bool>,
    v5: Cell<bool>,
}

impl Conn {
    fn send(&self, bytes: &[u8]) {
        self.out.borrow_mut().extend_from_slice(bytes);
        self.wake();
    }

    fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// Everything queued for the connection, in one write per wake-up.
async fn write_loop(conn: Rc<Conn>, mut stream: WriteHalf<TcpStream>) {
    let mut spare = Vec::new();
    loop {
        let batch = std::future::poll_fn(|cx| {
            let mut out = conn.out.borrow_mut();
            if !out.is_empty() {
                return Poll::Ready(Some(std::mem::replace(
                    &mut *out,
                    std::mem::take(&mut spare),
                )));
            }
            if conn.closed.get() {
                return Poll::Ready(None);
            }
            conn.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        let Some(mut batch) = batch else {
            return;
        };
        if stream.write_all(&batch).await.is_err() {
            return;
        }
        batch.clear();
        spare = batch;
    }
}

/// Read packets and act on each; Err or Ok at the end of the connection.
async fn read_loop(
    relay: &Relay,
    conn: &Rc<Conn>,
    mut stream: ReadHalf<TcpStream>,
) -> io::Result<()> {
    let mut input: Vec<u8> = Vec::new();
    loop {
        let n = std::future::poll_fn(|cx| {
            READ_BUF.with(|buf| {
                let mut buf = buf.borrow_mut();
                let poll = Pin::new(&mut stream).poll_read(cx, &mut buf[..]);
                if let Poll::Ready(Ok(n)) = poll {
                    input.extend_from_slice(&buf[..n]);
                }
                poll
            })
        })
        .await?;
        if n == 0 {
            return Ok(());
        }
        let mut at = 0;
        while let Some((body_at, len)) = fixed_header(&input[at..])? {
            let end = at + body_at + len;
            if input.len() < end {
                break;
            }
            if !handle(
                relay,
                conn,
                input[at],
                &input[at + body_at..end],
                &input[at..end],
            ) {
                return Ok(());
            }
            at = end;
        }
        input.drain(..at);
        if input.is_empty() && input.capacity() > 4096 {
            input = Vec::new(); // give back what a burst grew
        }
    }
}

/// Where a packet's body starts and its length, once the fixed header is
/// whole.
fn fixed_header(b: &[u8]) -> io::Result<Option<(usize, usize)>> {
    let mut len = 0usize;
    for i in 1..5 {
        let Some(&byte) = b.get(i) else {
            return Ok(None);
        };
        len |= ((byte & 0x7f) as usize) << (7 * (i - 1));
        if byte & 0x80 == 0 {
            if len > PACKET_BYTES_MAX {
                return Err(io::Error::other("packet too large"));
            }
            return Ok(Some((i + 1, len)));
        }
    }
    Err(io::Error::other("malformed remaining length"))
}

/// A variable byte integer at the start of `b`: value and length.
fn varint(b: &[u8]) -> Option<(usize, usize)> {
    let mut v = 0usize;
    for (i, &byte) in b.iter().take(4).enumerate() {
        v |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Act on one packet (`first` its first byte, `body` after the fixed
/// header, `whole` all of it); false ends the connection.
fn handle(relay: &Relay, conn: &Rc<Conn>, first: u8, body: &[u8], whole: &[u8]) -> bool {
    let id = |at| u16_at(body, at).map(u16::to_be_bytes);
    match first >> 4 {
        // CONNECT: protocol name, then its level (5: MQTT 5.0).
        1 => {
            let Some(name_len) = u16_at(body, 0) else {
                return false;
            };
            let v5 = body.get(2 + name_len as usize) == Some(&5);
            conn.v5.set(v5);
            conn.send(if v5 {
                &[0x20, 3, 0, 0, 0]
            } else {
                &[0x20, 2, 0, 0]
            });
            true
        }
        // PUBLISH: answer by its QoS, then relay it.
        3 => {
            let Some(topic_len) = u16_at(body, 0) else {
                return false;
            };
            let Some(topic) = body.get(2..2 + topic_len as usize) else {
                return false;
            };
            match (first >> 1) & 3 {
                0 => {}
                // QoS 3 is malformed: close.
                3 => return false,
                qos => {
                    let Some([hi, lo]) = id(2 + topic_len as usize) else {
                        return false;
                    };
                    conn.send(&[if qos == 1 { 0x40 } else { 0x50 }, 2, hi, lo]);
                }
            }
            relay.publish(topic, whole);
            true
        }
        // PUBREC from a subscriber: PUBREL. PUBREL from a publisher:
        // PUBCOMP. PUBACK and PUBCOMP from subscribers: nothing.
        5 | 6 => {
            let Some([hi, lo]) = id(0) else {
                return false;
            };
            conn.send(&[if first >> 4 == 5 { 0x62 } else { 0x70 }, 2, hi, lo]);
            true
        }
        4 | 7 => true,
        // SUBSCRIBE: every filter granted the QoS asked for.
        8 => {
            let Some(([hi, lo], mut at)) = filters_at(conn, body) else {
                return false;
            };
            let mut codes = Vec::new();
            while at < body.len() {
                let Some(len) = u16_at(body, at) else {
                    return false;
                };
                let Some(filter) = body.get(at + 2..at + 2 + len as usize) else {
                    return false;
                };
                let Some(&options) = body.get(at + 2 + len as usize) else {
                    return false;
                };
                // 0x80: refused (a malformed shared subscription).
                codes.push(match relay.subscribe(filter, conn) {
                    true => options & 3,
                    false => 0x80,
                });
                at += 3 + len as usize;
            }
            let packet_id = u16::from_be_bytes([hi, lo]);
            let suback = SubAck {
                packet_id,
                reasons: codes,
                properties: Default::default(),
            };
            ack(conn, Packet::SubAck(suback));
            true
        }
        // UNSUBSCRIBE.
        10 => {
            let Some(([hi, lo], mut at)) = filters_at(conn, body) else {
                return false;
            };
            let mut codes = Vec::new();
            while let Some(len) = u16_at(body, at) {
                let Some(filter) = body.get(at + 2..at + 2 + len as usize) else {
                    return false;
                };
                relay.unsubscribe(filter, conn);
                codes.push(0);
                at += 2 + len as usize;
            }
            let unsuback = UnsubAck {
                packet_id: u16::from_be_bytes([hi, lo]),
                reasons: codes,
                properties: Default::default(),
            };
            ack(conn, Packet::UnsubAck(unsuback));
            true
        }
        // PINGREQ.
        12 => {
            conn.send(&[0xD0, 0]);
            true
        }
        // DISCONNECT, or anything else.
        _ => false,
    }
}

/// A SUBSCRIBE's or UNSUBSCRIBE's packet id, and where its filters start
/// (after the 5.0 properties).
fn filters_at(conn: &Conn, body: &[u8]) -> Option<([u8; 2], usize)> {
    let id = u16_at(body, 0)?.to_be_bytes();
    if !conn.v5.get() {
        return Some((id, 2));
    }
    let (props, n) = varint(&body[2..])?;
    Some((id, 2 + n + props))
}

/// SUBACK or UNSUBACK, as the broker's codec encodes it (a 3.x UNSUBACK
/// carries no codes).
fn ack(conn: &Conn, packet: Packet) {
    let version = match conn.v5.get() {
        true => Version::V5,
        false => Version::V3_1_1,
    };
    let mut out = bytes::BytesMut::new();
    shardmq::codec::encode(&packet, version, &mut out);
    conn.send(&out);
}
