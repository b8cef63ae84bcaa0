//! Helpers shared by the raw-packet tests (`raw_protocol.rs`, `raw_limits.rs`,
//! `raw_sessions.rs`, `storage.rs`):
//! hand-built frames, reading a socket until the broker closes it, and the
//! per-version "send these bytes, expect this end" checks.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use shardmq::codec::{self, Connect, Packet, PubResp, QoS, Version};

use super::{Raw, TestBroker, WAIT};

/// Short wait used to check that nothing (more) arrives.
pub const QUIET: Duration = Duration::from_millis(300);

/// A packet with fixed header byte `byte0` and `body`.
pub fn frame(byte0: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte0];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// A length-prefixed string or binary field.
pub fn field(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// A PUBLISH in 5.0 layout with raw topic bytes, flags and properties.
pub fn v5_publish_bytes(
    byte0: u8,
    topic: &[u8],
    packet_id: Option<u16>,
    props: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut body = field(topic);
    if let Some(id) = packet_id {
        body.extend_from_slice(&id.to_be_bytes());
    }
    body.push(props.len() as u8);
    body.extend_from_slice(props);
    body.extend_from_slice(payload);
    frame(byte0, &body)
}

/// A PUBLISH in 3.1.1 layout with raw topic bytes and flags.
pub fn v311_publish_bytes(
    byte0: u8,
    topic: &[u8],
    packet_id: Option<u16>,
    payload: &[u8],
) -> Vec<u8> {
    let mut body = field(topic);
    if let Some(id) = packet_id {
        body.extend_from_slice(&id.to_be_bytes());
    }
    body.extend_from_slice(payload);
    frame(byte0, &body)
}

/// `p` encoded by our codec.
pub fn encode(p: &Packet, version: Version) -> Vec<u8> {
    let mut out = BytesMut::new();
    codec::encode(p, version, &mut out);
    out.to_vec()
}

/// A PUBACK, PUBREC, PUBREL or PUBCOMP body for `id`, reason 0.
pub fn pub_resp(id: u16) -> PubResp {
    PubResp {
        packet_id: id,
        ..Default::default()
    }
}

pub fn puback(id: u16) -> Packet {
    Packet::PubAck(pub_resp(id))
}

/// A read that ran out of time rather than failed.
pub fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Every byte the broker sends until it closes the connection; `Err` with
/// what arrived if it does not close within `WAIT`.
pub fn try_read_until_close(s: &mut TcpStream) -> Result<Vec<u8>, Vec<u8>> {
    let deadline = Instant::now() + WAIT;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(out);
        }
        s.set_read_timeout(Some(left)).unwrap();
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) => return Err(out),
            Err(_) => return Ok(out), // reset: closed
        }
    }
}

/// Every byte the broker sends until it closes the connection. Fails if it
/// does not close within `WAIT`.
pub fn read_until_close(s: &mut TcpStream) -> Vec<u8> {
    try_read_until_close(s).unwrap_or_else(|got| {
        panic!("broker did not close the connection within {WAIT:?}; received {got:02X?}")
    })
}

/// Send `connect` as the first packet; returns every byte the broker sends
/// until it closes the connection (for a refused CONNECT).
pub fn connect_reply(b: &TestBroker, connect: Connect) -> Vec<u8> {
    let mut raw = Raw::open(b.addr, connect.version);
    raw.send(&Packet::Connect(Box::new(connect)));
    read_until_close(&mut raw.stream)
}

/// The next packet is a PUBACK for `id` with reason 0.
pub fn expect_puback(p: &mut Raw, id: u16) {
    match p.recv() {
        Some(Packet::PubAck(a)) => assert_eq!((a.packet_id, a.reason), (id, 0)),
        other => panic!("expected PUBACK {id}, got {other:?}"),
    }
}

/// Publish QoS 1 and wait for its PUBACK (the message has been routed).
pub fn publish_qos1(p: &mut Raw, topic: &str, payload: &[u8], id: u16) {
    p.publish(topic, payload, QoS::AtLeastOnce, false, id);
    expect_puback(p, id);
}

/// 5.0 client: send `bytes`, expect DISCONNECT with `code`, then close.
pub fn v5_bytes_disconnect(b: &TestBroker, id: &str, bytes: &[u8], code: u8) {
    let (mut c, ack) = Raw::connect(b.addr, Version::V5, id, true);
    assert_eq!(ack.reason, 0);
    c.send_bytes(bytes);
    assert_eq!(
        c.expect_close(),
        Some(code),
        "expected DISCONNECT 0x{code:02X} after {bytes:02X?}"
    );
}

/// 3.1.1 client: send `bytes`, expect a close without any DISCONNECT.
pub fn v311_bytes_close(b: &TestBroker, id: &str, bytes: &[u8]) {
    let (mut c, ack) = Raw::connect(b.addr, Version::V3_1_1, id, true);
    assert_eq!(ack.reason, 0);
    c.send_bytes(bytes);
    assert_eq!(
        read_until_close(&mut c.stream),
        Vec::<u8>::new(),
        "3.1.1: expected a plain close after {bytes:02X?}"
    );
}

/// 5.0 clients `{name}-sub` on shard 0, subscribed to `filter` at `qos`, and
/// `{name}-pub` on shard 1.
pub fn v5_sub_and_pub(b: &TestBroker, name: &str, filter: &str, qos: QoS) -> (Raw, Raw) {
    let sub_id = b.id_on_shard(&format!("{name}-sub"), 0);
    let (mut s, ack) = Raw::connect(b.addr, Version::V5, &sub_id, true);
    assert_eq!(ack.reason, 0);
    assert_eq!(s.subscribe(1, filter, qos), vec![qos as u8]);
    let pub_id = b.id_on_shard(&format!("{name}-pub"), 1);
    let (p, ack) = Raw::connect(b.addr, Version::V5, &pub_id, true);
    assert_eq!(ack.reason, 0);
    (s, p)
}

/// Subscribe to each filter in turn, with packet ids 1, 2, ...; each SUBACK
/// carries the one code given.
pub fn subscribe_each(c: &mut Raw, cases: &[(&str, QoS, u8)]) {
    for (packet_id, &(filter, qos, code)) in (1..).zip(cases) {
        assert_eq!(c.subscribe(packet_id, filter, qos), vec![code], "{filter}");
    }
}

/// A fresh 5.0 subscriber `sub_id` and 3.1.1 publisher `pub_id` still
/// round-trip a QoS 1 message on `topic`: the broker survived whatever the
/// test did.
pub fn assert_round_trip(addr: SocketAddr, sub_id: &str, pub_id: &str, topic: &str) {
    let (mut s, ack) = Raw::connect(addr, Version::V5, sub_id, true);
    assert_eq!(ack.reason, 0, "fresh subscriber refused");
    assert_eq!(s.subscribe(1, topic, QoS::AtLeastOnce), vec![1]);
    let (mut p, ack) = Raw::connect(addr, Version::V3_1_1, pub_id, true);
    assert_eq!(ack.reason, 0, "fresh publisher refused");
    publish_qos1(&mut p, topic, b"still here", 1);
    let m = s.recv_publish();
    assert_eq!(&*m.topic, topic);
    assert_eq!(&m.payload[..], b"still here");
}
