//! Raw-packet protocol tests: malformed input and edge cases, checked against
//! the exact bytes and reason codes MQTT 3.1.1 and 5.0 require.
//!
//! Every wait is bounded by `WAIT` (5 s) or less; no test asserts on timing.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::raw::*;
use common::*;
use shardmq::codec::{
    reason, Auth, Disconnect, Packet, Properties, QoS, SubOptions, Subscribe, Unsubscribe, Version,
};

// ---------------------------------------------------------------------------
// Helpers (local to this file; shared ones are in common/raw.rs).
// ---------------------------------------------------------------------------

/// A CONNECT with explicit protocol name, level and flags; a property length
/// of 0 is written for level 5 and above.
fn connect_frame(name: &[u8], level: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut body = field(name);
    body.push(level);
    body.push(flags);
    body.extend_from_slice(&60u16.to_be_bytes());
    if level >= 5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    frame(0x10, &body)
}

/// Exactly `n` bytes from the socket, within `WAIT`.
fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let deadline = Instant::now() + WAIT;
    let mut out = vec![0u8; n];
    let mut got = 0;
    while got < n {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out after {:02X?}", &out[..got]);
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut out[got..]) {
            Ok(0) => panic!("closed after {:02X?}, wanted {n} bytes", &out[..got]),
            Ok(k) => got += k,
            Err(e) if is_timeout(&e) => {
                panic!("timed out after {:02X?}, wanted {n} bytes", &out[..got])
            }
            Err(e) => panic!("read error {e} after {:02X?}", &out[..got]),
        }
    }
    out
}

/// Assert the socket stays silent (no byte, no close) for `wait`.
fn expect_no_bytes(s: &mut TcpStream, wait: Duration) {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut chunk = [0u8; 64];
    match s.read(&mut chunk) {
        Ok(0) => panic!("connection closed, expected it to stay open"),
        Ok(n) => panic!("expected nothing, got {:02X?}", &chunk[..n]),
        Err(e) if is_timeout(&e) => {}
        Err(e) => panic!("expected silence, got error {e}"),
    }
}

/// Open a connection, send `bytes` as the first bytes, return what the broker
/// sends until it closes.
fn first_bytes_reply(b: &TestBroker, bytes: &[u8]) -> Vec<u8> {
    let mut raw = Raw::open(b.addr, Version::V5);
    raw.send_bytes(bytes);
    read_until_close(&mut raw.stream)
}

/// A fresh subscriber (shard 0) and publisher (shard 1) still round-trip a
/// QoS 1 message: the broker survived whatever the test did.
fn assert_broker_serves(b: &TestBroker) {
    let sub_id = b.id_on_shard("alive-sub", 0);
    let pub_id = b.id_on_shard("alive-pub", 1);
    assert_round_trip(b.addr, &sub_id, &pub_id, "alive/check");
}

fn ack(c: &mut Raw, packet: Packet) {
    c.send(&packet);
}

fn pubrec(id: u16) -> Packet {
    Packet::PubRec(pub_resp(id))
}

fn pubrel(id: u16) -> Packet {
    Packet::PubRel(pub_resp(id))
}

fn pubcomp(id: u16) -> Packet {
    Packet::PubComp(pub_resp(id))
}

/// The next packet is a PUBREC for `id` with reason 0.
fn expect_pubrec(c: &mut Raw, id: u16) {
    match c.recv() {
        Some(Packet::PubRec(r)) => assert_eq!((r.packet_id, r.reason), (id, 0)),
        other => panic!("expected PUBREC {id}, got {other:?}"),
    }
}

/// The next packet is a PUBREL for `id`.
fn expect_pubrel(c: &mut Raw, id: u16) {
    match c.recv() {
        Some(Packet::PubRel(r)) => assert_eq!(r.packet_id, id),
        other => panic!("expected PUBREL, got {other:?}"),
    }
}

/// Publish QoS 2 and complete the handshake as the sender.
fn publish_qos2(p: &mut Raw, topic: &str, payload: &[u8], id: u16) {
    p.publish(topic, payload, QoS::ExactlyOnce, false, id);
    expect_pubrec(p, id);
    p.send(&pubrel(id));
    match p.recv() {
        Some(Packet::PubComp(c)) => assert_eq!((c.packet_id, c.reason), (id, 0)),
        other => panic!("expected PUBCOMP {id}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Connection establishment.
// ---------------------------------------------------------------------------

#[test]
fn first_packet_not_connect_is_closed_without_connack() {
    let b = TestBroker::start(2);
    // PINGREQ, PUBLISH and SUBSCRIBE as the first packet: [MQTT-3.1.0-1].
    assert_eq!(first_bytes_reply(&b, &[0xC0, 0x00]), Vec::<u8>::new());
    let publish = v311_publish_bytes(0x30, b"a/b", None, b"x");
    assert_eq!(first_bytes_reply(&b, &publish), Vec::<u8>::new());
    let subscribe = frame(0x82, &[0x00, 0x01, 0x00, 0x01, b'a', 0x00]);
    assert_eq!(first_bytes_reply(&b, &subscribe), Vec::<u8>::new());
    assert_broker_serves(&b);
}

#[test]
fn no_connect_within_connect_timeout_is_closed() {
    let b = TestBroker::start_with(2, |cfg| cfg.server.connect_timeout_ms = 300);
    // Nothing at all.
    let mut silent = Raw::open(b.addr, Version::V5);
    assert_eq!(read_until_close(&mut silent.stream), Vec::<u8>::new());
    // Half a CONNECT.
    let mut partial = Raw::open(b.addr, Version::V5);
    partial.send_bytes(&[0x10, 0x10, 0x00, 0x04, b'M']);
    assert_eq!(read_until_close(&mut partial.stream), Vec::<u8>::new());
    assert_broker_serves(&b);
}

/// A connected client that has sent a second CONNECT.
fn connect_twice(b: &TestBroker, version: Version, id: &str) -> Raw {
    let (mut c, ack) = Raw::connect(b.addr, version, id, true);
    assert_eq!(ack.reason, 0);
    let again = connect_packet(version, id, true);
    c.send(&Packet::Connect(Box::new(again)));
    c
}

#[test]
fn second_connect_v5_gets_disconnect_0x82() {
    let b = TestBroker::start(2);
    let mut c = connect_twice(&b, Version::V5, "twice-5");
    assert_eq!(c.expect_close(), Some(reason::PROTOCOL_ERROR));
}

#[test]
fn second_connect_v311_is_closed() {
    let b = TestBroker::start(2);
    let mut c = connect_twice(&b, Version::V3_1_1, "twice-4");
    assert_eq!(read_until_close(&mut c.stream), Vec::<u8>::new());
}

#[test]
fn unsupported_protocol_level_6_gets_v5_connack_0x84() {
    let b = TestBroker::start(2);
    let reply = first_bytes_reply(&b, &connect_frame(b"MQTT", 6, 0x02, &field(b"lvl6")));
    assert_eq!(reply, vec![0x20, 0x03, 0x00, 0x84, 0x00]);
}

#[test]
fn unsupported_protocol_level_mqisdp_4_gets_return_code_1() {
    let b = TestBroker::start(2);
    let reply = first_bytes_reply(&b, &connect_frame(b"MQIsdp", 4, 0x02, &field(b"lvl4")));
    assert_eq!(reply, vec![0x20, 0x02, 0x00, 0x01]);
}

#[test]
fn unsupported_protocol_level_mqtt_3_gets_return_code_1() {
    let b = TestBroker::start(2);
    let reply = first_bytes_reply(&b, &connect_frame(b"MQTT", 3, 0x02, &field(b"lvl3")));
    assert_eq!(reply, vec![0x20, 0x02, 0x00, 0x01]);
}

#[test]
fn unknown_protocol_name_is_closed() {
    let b = TestBroker::start(2);
    // [MQTT-3.1.2-1]: the server MAY disconnect (3.1.1) or MAY answer 0x84
    // (5.0); it must never accept.
    let reply = first_bytes_reply(&b, &connect_frame(b"MQXX", 4, 0x02, &field(b"name")));
    assert!(
        reply.is_empty() || reply == [0x20, 0x02, 0x00, 0x01],
        "unexpected reply {reply:02X?}"
    );
    assert_broker_serves(&b);
}

#[test]
fn connect_reserved_flag_is_closed() {
    let b = TestBroker::start(2);
    // 3.1.1 [MQTT-3.1.2-3]: disconnect, no CONNACK.
    let reply = first_bytes_reply(&b, &connect_frame(b"MQTT", 4, 0x03, &field(b"resv")));
    assert_eq!(reply, Vec::<u8>::new());
    // 5.0: close, optionally after a failure CONNACK (0x81).
    let reply = first_bytes_reply(&b, &connect_frame(b"MQTT", 5, 0x03, &field(b"resv5")));
    assert!(
        reply.is_empty() || (reply.len() >= 4 && reply[0] == 0x20 && reply[3] >= 0x80),
        "unexpected reply {reply:02X?}"
    );
    assert_broker_serves(&b);
}

#[test]
fn connect_will_qos_3_is_closed() {
    let b = TestBroker::start(2);
    let mut payload = field(b"wq3");
    payload.extend(field(b"will/t"));
    payload.extend(field(b"bye"));
    // Will flag + Will QoS 3 + clean session: [MQTT-3.1.2-14].
    let reply = first_bytes_reply(&b, &connect_frame(b"MQTT", 4, 0x04 | 0x18 | 0x02, &payload));
    assert_eq!(reply, Vec::<u8>::new());
    assert_broker_serves(&b);
}

#[test]
fn connect_will_retain_without_will_flag_is_closed() {
    let b = TestBroker::start(2);
    // [MQTT-3.1.2-15]: Will Retain 1 while Will Flag 0.
    let reply = first_bytes_reply(&b, &connect_frame(b"MQTT", 4, 0x20 | 0x02, &field(b"wr")));
    assert_eq!(reply, Vec::<u8>::new());
    // [MQTT-3.1.2-13]: Will QoS 1 while Will Flag 0.
    let reply = first_bytes_reply(&b, &connect_frame(b"MQTT", 4, 0x08 | 0x02, &field(b"wq")));
    assert_eq!(reply, Vec::<u8>::new());
    assert_broker_serves(&b);
}

#[test]
fn connect_v311_password_without_username_is_closed() {
    let b = TestBroker::start(2);
    let mut payload = field(b"pw");
    payload.extend(field(b"secret"));
    // [MQTT-3.1.2-22].
    let reply = first_bytes_reply(&b, &connect_frame(b"MQTT", 4, 0x40 | 0x02, &payload));
    assert_eq!(reply, Vec::<u8>::new());
    assert_broker_serves(&b);
}

#[test]
fn empty_client_id_v311_clean_is_accepted() {
    let b = TestBroker::start(2);
    let (mut c, ack) = Raw::connect(b.addr, Version::V3_1_1, "", true);
    assert_eq!(ack.reason, 0);
    assert!(!ack.session_present);
    assert_eq!(c.subscribe(1, "anon/t", QoS::AtMostOnce), vec![0]);
    c.publish("anon/t", b"me", QoS::AtMostOnce, false, 0);
    let m = c.recv_publish();
    assert_eq!(&*m.topic, "anon/t");
    assert_eq!(&m.payload[..], b"me");
}

#[test]
fn empty_client_id_v311_persistent_gets_return_code_2() {
    let b = TestBroker::start(2);
    // [MQTT-3.1.3-8]: CONNACK 0x02 (identifier rejected), then close.
    let reply = first_bytes_reply(&b, &connect_frame(b"MQTT", 4, 0x00, &field(b"")));
    assert_eq!(reply, vec![0x20, 0x02, 0x00, 0x02]);
}

#[test]
fn empty_client_id_v31_gets_return_code_2() {
    let b = TestBroker::start(2);
    let reply = first_bytes_reply(&b, &connect_frame(b"MQIsdp", 3, 0x02, &field(b"")));
    assert_eq!(reply, vec![0x20, 0x02, 0x00, 0x02]);
}

#[test]
fn empty_client_id_v5_gets_assigned_identifier_and_works() {
    let b = TestBroker::start(2);
    let (mut s, ack) = Raw::connect(b.addr, Version::V5, "", true);
    assert_eq!(ack.reason, 0);
    let assigned = ack
        .properties
        .assigned_client_identifier
        .clone()
        .expect("CONNACK carries an Assigned Client Identifier");
    assert!(!assigned.is_empty());
    assert_eq!(s.subscribe(1, "assigned/t", QoS::AtLeastOnce), vec![1]);
    for shard in 0..2 {
        let pub_id = b.id_on_shard("assigned-pub", shard);
        let (mut p, ack) = Raw::connect(b.addr, Version::V5, &pub_id, true);
        assert_eq!(ack.reason, 0);
        publish_qos1(&mut p, "assigned/t", format!("from {shard}").as_bytes(), 1);
        let m = s.recv_publish();
        assert_eq!(&*m.topic, "assigned/t");
        assert_eq!(&m.payload[..], format!("from {shard}").as_bytes());
        s.send(&puback(m.packet_id));
    }
    // A second anonymous client gets a different identifier.
    let (_other, ack2) = Raw::connect(b.addr, Version::V5, "", true);
    assert_eq!(ack2.reason, 0);
    assert_ne!(
        ack2.properties.assigned_client_identifier.as_deref(),
        Some(assigned.as_str())
    );
}

// ---------------------------------------------------------------------------
// Authentication.
// ---------------------------------------------------------------------------

#[test]
fn connect_with_authentication_method_gets_connack_0x8c() {
    let b = TestBroker::start(2);
    let mut c = connect_packet(Version::V5, "auth-method", true);
    c.properties.authentication_method = Some("SCRAM-SHA-1".into());
    let reply = connect_reply(&b, c);
    assert_eq!(reply, vec![0x20, 0x03, 0x00, 0x8C, 0x00]);
}

#[test]
fn auth_packet_with_method_after_connect_gets_disconnect_0x8c() {
    let b = TestBroker::start(2);
    let (mut c, ack) = Raw::connect(b.addr, Version::V5, "auth-after", true);
    assert_eq!(ack.reason, 0);
    c.send(&Packet::Auth(Auth {
        reason: reason::CONTINUE_AUTHENTICATION,
        properties: Properties {
            authentication_method: Some("SCRAM-SHA-1".into()),
            ..Default::default()
        }
        .into(),
    }));
    assert_eq!(c.expect_close(), Some(reason::BAD_AUTHENTICATION_METHOD));
}

#[test]
fn auth_packet_without_method_after_connect_gets_disconnect_0x82() {
    let b = TestBroker::start(2);
    let (mut c, ack) = Raw::connect(b.addr, Version::V5, "auth-none", true);
    assert_eq!(ack.reason, 0);
    // [MQTT-4.12.0-7]: AUTH when CONNECT had no Authentication Method.
    c.send(&Packet::Auth(Auth::default()));
    assert_eq!(c.expect_close(), Some(reason::PROTOCOL_ERROR));
}

// ---------------------------------------------------------------------------
// PUBLISH validation.
// ---------------------------------------------------------------------------

#[test]
fn publish_wildcard_topic_v5_gets_disconnect_0x90() {
    let b = TestBroker::start(2);
    for (i, topic) in [&b"a/+"[..], b"a/#", b"+", b"#"].into_iter().enumerate() {
        let bytes = v5_publish_bytes(0x30, topic, None, &[], b"x");
        v5_bytes_disconnect(
            &b,
            &format!("wild5-{i}"),
            &bytes,
            reason::TOPIC_NAME_INVALID,
        );
    }
    assert_broker_serves(&b);
}

#[test]
fn publish_wildcard_topic_v311_is_closed() {
    let b = TestBroker::start(2);
    for (i, topic) in [&b"a/+"[..], b"a/#"].into_iter().enumerate() {
        v311_bytes_close(
            &b,
            &format!("wild4-{i}"),
            &v311_publish_bytes(0x30, topic, None, b"x"),
        );
    }
    assert_broker_serves(&b);
}

/// The same PUBLISH (header byte `byte0`, payload "x") in each version's
/// layout: client `id5` (5.0) gets DISCONNECT 0x81, client `id4` (3.1.1) a
/// plain close.
fn publish_is_malformed(
    b: &TestBroker,
    [id5, id4]: [&str; 2],
    byte0: u8,
    topic: &[u8],
    packet_id: Option<u16>,
) {
    let bytes = v5_publish_bytes(byte0, topic, packet_id, &[], b"x");
    v5_bytes_disconnect(b, id5, &bytes, reason::MALFORMED_PACKET);
    v311_bytes_close(b, id4, &v311_publish_bytes(byte0, topic, packet_id, b"x"));
}

#[test]
fn publish_qos_3_is_malformed() {
    let b = TestBroker::start(2);
    // 0x36: QoS bits 11 [MQTT-3.3.1-4].
    publish_is_malformed(&b, ["qos3-5", "qos3-4"], 0x36, b"a/b", Some(1));
    assert_broker_serves(&b);
}

#[test]
fn publish_qos_0_with_dup_is_malformed() {
    let b = TestBroker::start(2);
    // 0x38: DUP with QoS 0 [MQTT-3.3.1-2].
    publish_is_malformed(&b, ["dup0-5", "dup0-4"], 0x38, b"a/b", None);
    assert_broker_serves(&b);
}

#[test]
fn publish_topic_with_nul_is_malformed() {
    let b = TestBroker::start(2);
    // [MQTT-1.5.4-2]: U+0000 in a UTF-8 string.
    publish_is_malformed(&b, ["nul-5", "nul-4"], 0x30, b"a\0b", None);
    assert_broker_serves(&b);
}

#[test]
fn publish_topic_invalid_utf8_is_malformed() {
    let b = TestBroker::start(2);
    // [MQTT-1.5.4-1]: an invalid sequence, a lone continuation byte and an
    // encoded surrogate.
    for (i, topic) in [&b"a/\xC3\x28"[..], b"\x80", b"\xED\xA0\x80"]
        .into_iter()
        .enumerate()
    {
        let (id5, id4) = (format!("utf5-{i}"), format!("utf4-{i}"));
        publish_is_malformed(&b, [&id5, &id4], 0x30, topic, None);
    }
    assert_broker_serves(&b);
}

#[test]
fn publish_qos1_with_packet_id_zero_is_closed() {
    let b = TestBroker::start(2);
    // [MQTT-2.2.1-3]: QoS > 0 needs a non-zero packet identifier; no reason
    // code is prescribed, so accept malformed or protocol error.
    let (mut c, _) = Raw::connect(b.addr, Version::V5, "pid0-5", true);
    c.send_bytes(&v5_publish_bytes(0x32, b"a/b", Some(0), &[], b"x"));
    let code = c.expect_close();
    assert!(
        matches!(
            code,
            Some(reason::MALFORMED_PACKET | reason::PROTOCOL_ERROR)
        ),
        "expected DISCONNECT 0x81 or 0x82, got {code:?}"
    );
    v311_bytes_close(
        &b,
        "pid0-4",
        &v311_publish_bytes(0x32, b"a/b", Some(0), b"x"),
    );
    assert_broker_serves(&b);
}

#[test]
fn pubrel_with_wrong_fixed_header_flags_is_malformed() {
    let b = TestBroker::start(2);
    // [MQTT-3.6.1-1]: PUBREL flags must be 0010.
    v5_bytes_disconnect(
        &b,
        "relflags5",
        &[0x60, 0x02, 0x00, 0x01],
        reason::MALFORMED_PACKET,
    );
    v311_bytes_close(&b, "relflags4", &[0x60, 0x02, 0x00, 0x01]);
    assert_broker_serves(&b);
}

#[test]
fn publish_larger_than_client_maximum_packet_size_is_not_sent() {
    let b = TestBroker::start(2);
    let mut connect = connect_packet(Version::V5, &b.id_on_shard("small-sub", 0), true);
    connect.properties.maximum_packet_size = Some(64);
    let (mut s, _) = Raw::connect_with(b.addr, connect);
    assert_eq!(s.subscribe(1, "small/t", QoS::AtLeastOnce), vec![1]);
    let (mut p, _) = Raw::connect(b.addr, Version::V5, &b.id_on_shard("small-pub", 1), true);
    // [MQTT-3.1.2-24] / [MQTT-3.1.2-25]: too large for the client: discarded.
    publish_qos1(&mut p, "small/t", &[b'x'; 100], 1);
    publish_qos1(&mut p, "small/t", b"fits", 2);
    let m = s.recv_publish();
    assert_eq!(&m.payload[..], b"fits");
    s.send(&puback(m.packet_id));
    s.expect_silence(QUIET);
}

#[test]
fn payload_format_utf8_with_invalid_payload_qos1_gets_puback_0x99() {
    let b = TestBroker::start(2);
    let (mut s, mut p) = v5_sub_and_pub(&b, "pfi", "pfi/t", QoS::AtLeastOnce);
    // Payload Format Indicator (0x01) = 1, payload not UTF-8.
    let bytes = v5_publish_bytes(0x32, b"pfi/t", Some(9), &[0x01, 0x01], &[0xFF, 0xFE, 0x00]);
    p.send_bytes(&bytes);
    assert_eq!(read_n(&mut p.stream, 5), vec![0x40, 0x03, 0x00, 0x09, 0x99]);
    // The message is not delivered, and the connection stays usable.
    s.expect_silence(QUIET);
    p.send_bytes(&[0xC0, 0x00]);
    assert_eq!(read_n(&mut p.stream, 2), vec![0xD0, 0x00]);
}

#[test]
fn payload_format_utf8_with_invalid_payload_qos2_gets_pubrec_0x99() {
    let b = TestBroker::start(2);
    let (mut s, mut p) = v5_sub_and_pub(&b, "pfi2", "pfi2/t", QoS::ExactlyOnce);
    let bytes = v5_publish_bytes(0x34, b"pfi2/t", Some(4), &[0x01, 0x01], &[0xC3, 0x28]);
    p.send_bytes(&bytes);
    assert_eq!(read_n(&mut p.stream, 5), vec![0x50, 0x03, 0x00, 0x04, 0x99]);
    s.expect_silence(QUIET);
}

#[test]
fn payload_format_utf8_with_invalid_payload_qos0_gets_disconnect_0x99() {
    let b = TestBroker::start(2);
    let bytes = v5_publish_bytes(0x30, b"pfi/t", None, &[0x01, 0x01], &[0xC3, 0x28]);
    v5_bytes_disconnect(&b, "pfi0", &bytes, reason::PAYLOAD_FORMAT_INVALID);
}

// ---------------------------------------------------------------------------
// SUBSCRIBE / UNSUBSCRIBE.
// ---------------------------------------------------------------------------

fn subscribe_many(c: &mut Raw, packet_id: u16, filters: &[&str]) {
    c.send(&Packet::Subscribe(Subscribe {
        packet_id,
        filters: filters
            .iter()
            .map(|f| {
                (
                    f.to_string(),
                    SubOptions {
                        qos: QoS::AtLeastOnce,
                        ..Default::default()
                    },
                )
            })
            .collect(),
        properties: Properties::default().into(),
    }));
}

const BAD_FILTERS: [&str; 4] = ["a/#/b", "a+", "#/", ""];

/// One SUBSCRIBE with valid filters around `BAD_FILTERS`, from client
/// `name` on shard 0: the SUBACK is exactly `suback`, and the valid filters
/// deliver publishes from client `{name}-pub` on shard 1.
fn subscribe_invalid_filters(version: Version, name: &str, packet_id: u16, suback: &[u8]) {
    let b = TestBroker::start(2);
    let (mut c, _) = Raw::connect(b.addr, version, &b.id_on_shard(name, 0), true);
    let mut filters = vec!["good/+"];
    filters.extend(BAD_FILTERS);
    filters.push("good2/#");
    subscribe_many(&mut c, packet_id, &filters);
    assert_eq!(read_n(&mut c.stream, suback.len()), suback);
    let pub_id = b.id_on_shard(&format!("{name}-pub"), 1);
    let (mut p, _) = Raw::connect(b.addr, version, &pub_id, true);
    p.publish("good/x", b"1", QoS::AtMostOnce, false, 0);
    p.publish("good2/y/z", b"2", QoS::AtMostOnce, false, 0);
    let m1 = c.recv_publish();
    let m2 = c.recv_publish();
    assert_eq!((&*m1.topic, &m1.payload[..]), ("good/x", &b"1"[..]));
    assert_eq!((&*m2.topic, &m2.payload[..]), ("good2/y/z", &b"2"[..]));
}

#[test]
fn subscribe_invalid_filters_v311_get_0x80_valid_ones_succeed() {
    subscribe_invalid_filters(
        Version::V3_1_1,
        "badf4",
        3,
        &[0x90, 0x08, 0x00, 0x03, 0x01, 0x80, 0x80, 0x80, 0x80, 0x01],
    );
}

#[test]
fn subscribe_invalid_filters_v5_get_0x8f_valid_ones_succeed() {
    subscribe_invalid_filters(
        Version::V5,
        "badf5",
        4,
        &[
            0x90, 0x09, 0x00, 0x04, 0x00, 0x01, 0x8F, 0x8F, 0x8F, 0x8F, 0x01,
        ],
    );
}

#[test]
fn shared_subscription_with_no_local_gets_disconnect_0x82() {
    let b = TestBroker::start(2);
    let (mut c, _) = Raw::connect(b.addr, Version::V5, "share-nolocal", true);
    c.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            "$share/g/a/b".into(),
            SubOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                ..Default::default()
            },
        )],
        properties: Properties::default().into(),
    }));
    // [MQTT-3.8.3-4].
    assert_eq!(c.expect_close(), Some(reason::PROTOCOL_ERROR));
    assert_broker_serves(&b);
}

#[test]
fn shared_subscription_without_filter_gets_failure_code() {
    let b = TestBroker::start(2);
    let (mut c, _) = Raw::connect(b.addr, Version::V5, "share-nofilter", true);
    subscribe_many(
        &mut c,
        2,
        &["$share/g", "$share/g/", "$share//a", "$share/g/ok"],
    );
    match c.recv() {
        Some(Packet::SubAck(a)) => {
            assert_eq!(a.packet_id, 2);
            assert_eq!(
                a.reasons,
                vec![
                    reason::TOPIC_FILTER_INVALID,
                    reason::TOPIC_FILTER_INVALID,
                    reason::TOPIC_FILTER_INVALID,
                    reason::GRANTED_QOS_1
                ]
            );
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    let (mut c4, _) = Raw::connect(b.addr, Version::V3_1_1, "share-nofilter-4", true);
    subscribe_many(&mut c4, 3, &["$share/g"]);
    assert_eq!(
        read_n(&mut c4.stream, 5),
        vec![0x90, 0x03, 0x00, 0x03, 0x80]
    );
}

#[test]
fn subscribe_reserved_option_bits_is_closed() {
    let b = TestBroker::start(2);
    // 5.0: bits 6-7 of the subscription options are reserved [MQTT-3.8.3-5].
    let mut body = vec![0x00, 0x01, 0x00];
    body.extend(field(b"a/b"));
    body.push(0xC1);
    v5_bytes_disconnect(&b, "subopt5", &frame(0x82, &body), reason::MALFORMED_PACKET);
    // 3.1.1: bits 2-7 of the requested QoS byte are reserved [MQTT-3-8.3-4].
    let mut body = vec![0x00, 0x01];
    body.extend(field(b"a/b"));
    body.push(0x05);
    v311_bytes_close(&b, "subopt4", &frame(0x82, &body));
    assert_broker_serves(&b);
}

#[test]
fn subscribe_without_filters_is_closed() {
    let b = TestBroker::start(2);
    // [MQTT-3.8.3-3] (3.1.1) / [MQTT-3.8.3-2] (5.0): protocol error.
    v5_bytes_disconnect(
        &b,
        "nofilt5",
        &frame(0x82, &[0x00, 0x01, 0x00]),
        reason::PROTOCOL_ERROR,
    );
    v311_bytes_close(&b, "nofilt4", &frame(0x82, &[0x00, 0x01]));
    assert_broker_serves(&b);
}

#[test]
fn subscribe_wrong_fixed_header_flags_is_closed() {
    let b = TestBroker::start(2);
    // [MQTT-3.8.1-1]: SUBSCRIBE flags must be 0010.
    let mut body = vec![0x00, 0x01];
    body.extend(field(b"a/b"));
    body.push(0x00);
    v311_bytes_close(&b, "subflags4", &frame(0x80, &body));
    assert_broker_serves(&b);
}

#[test]
fn unsubscribe_unknown_filter_v5_gets_0x11() {
    let b = TestBroker::start(2);
    let (mut c, _) = Raw::connect(b.addr, Version::V5, "unsub5", true);
    assert_eq!(c.subscribe(1, "known/t", QoS::AtMostOnce), vec![0]);
    c.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 5,
        filters: vec!["nope/t".into(), "known/t".into()],
        properties: Properties::default().into(),
    }));
    assert_eq!(
        read_n(&mut c.stream, 7),
        vec![0xB0, 0x05, 0x00, 0x05, 0x00, 0x11, 0x00]
    );
}

#[test]
fn unsubscribe_unknown_filter_v311_gets_unsuback_without_codes() {
    let b = TestBroker::start(2);
    let (mut c, _) = Raw::connect(b.addr, Version::V3_1_1, "unsub4", true);
    c.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 6,
        filters: vec!["nope/t".into()],
        properties: Properties::default().into(),
    }));
    assert_eq!(read_n(&mut c.stream, 4), vec![0xB0, 0x02, 0x00, 0x06]);
    expect_no_bytes(&mut c.stream, QUIET);
}

// ---------------------------------------------------------------------------
// Packets only a server may send, and PING.
// ---------------------------------------------------------------------------

/// A packet only a server may send, in each version's layout: client
/// `{name}-5` gets DISCONNECT 0x82, client `{name}-4` (3.1.1) a plain close.
fn server_only_packet_is_refused(b: &TestBroker, name: &str, v5: &[u8], v311: &[u8]) {
    v5_bytes_disconnect(b, &format!("{name}-5"), v5, reason::PROTOCOL_ERROR);
    v311_bytes_close(b, &format!("{name}-4"), v311);
}

#[test]
fn client_sending_connack_is_closed() {
    let b = TestBroker::start(2);
    // Each version gets a CONNACK in its own layout.
    let v5 = [0x20, 0x03, 0x00, 0x00, 0x00];
    server_only_packet_is_refused(&b, "connack", &v5, &[0x20, 0x02, 0x00, 0x00]);
    assert_broker_serves(&b);
}

#[test]
fn client_sending_suback_is_closed() {
    let b = TestBroker::start(2);
    // 3.1.1 layout (id 1, granted QoS 0); 5.0 layout differs, so send each
    // version its own.
    let v5 = [0x90, 0x04, 0x00, 0x01, 0x00, 0x00];
    server_only_packet_is_refused(&b, "suback", &v5, &[0x90, 0x03, 0x00, 0x01, 0x00]);
    assert_broker_serves(&b);
}

#[test]
fn client_sending_pingresp_is_closed() {
    let b = TestBroker::start(2);
    server_only_packet_is_refused(&b, "pingresp", &[0xD0, 0x00], &[0xD0, 0x00]);
    assert_broker_serves(&b);
}

#[test]
fn client_sending_unsuback_is_closed() {
    let b = TestBroker::start(2);
    let v5 = [0xB0, 0x04, 0x00, 0x01, 0x00, 0x00];
    server_only_packet_is_refused(&b, "unsuback", &v5, &[0xB0, 0x02, 0x00, 0x01]);
    assert_broker_serves(&b);
}

#[test]
fn pingreq_gets_pingresp() {
    let b = TestBroker::start(2);
    for (v, id) in [(Version::V5, "ping5"), (Version::V3_1_1, "ping4")] {
        let (mut c, _) = Raw::connect(b.addr, v, id, true);
        c.send_bytes(&[0xC0, 0x00]);
        assert_eq!(read_n(&mut c.stream, 2), vec![0xD0, 0x00]);
        c.send_bytes(&[0xC0, 0x00, 0xC0, 0x00]);
        assert_eq!(read_n(&mut c.stream, 4), vec![0xD0, 0x00, 0xD0, 0x00]);
        expect_no_bytes(&mut c.stream, QUIET);
    }
}

// ---------------------------------------------------------------------------
// QoS 2 and redelivery.
// ---------------------------------------------------------------------------

#[test]
fn qos2_inbound_duplicate_is_delivered_exactly_once() {
    let b = TestBroker::start(2);
    let (mut s, _) = Raw::connect(b.addr, Version::V3_1_1, &b.id_on_shard("q2in-sub", 0), true);
    assert_eq!(s.subscribe(1, "q2in/t", QoS::ExactlyOnce), vec![2]);
    let (mut p, _) = Raw::connect(b.addr, Version::V5, &b.id_on_shard("q2in-pub", 1), true);

    let first = v5_publish_bytes(0x34, b"q2in/t", Some(7), &[], b"once");
    let dup = v5_publish_bytes(0x3C, b"q2in/t", Some(7), &[], b"once");
    p.send_bytes(&first);
    assert_eq!(
        read_n(&mut p.stream, 4),
        vec![0x50, 0x02, 0x00, 0x07],
        "PUBREC"
    );
    p.send_bytes(&dup);
    assert_eq!(
        read_n(&mut p.stream, 4),
        vec![0x50, 0x02, 0x00, 0x07],
        "PUBREC again"
    );

    // The subscriber receives one copy and completes its own handshake.
    let m = s.recv_publish();
    assert_eq!(
        (&*m.topic, &m.payload[..], m.qos),
        ("q2in/t", &b"once"[..], QoS::ExactlyOnce)
    );
    s.send(&pubrec(m.packet_id));
    expect_pubrel(&mut s, m.packet_id);
    s.send(&pubcomp(m.packet_id));

    p.send(&pubrel(7));
    assert_eq!(
        read_n(&mut p.stream, 4),
        vec![0x70, 0x02, 0x00, 0x07],
        "PUBCOMP success"
    );
    s.expect_silence(QUIET);

    // After PUBREL the id is free: a PUBREL for it (or any unknown id) gets
    // PUBCOMP 0x92.
    p.send(&pubrel(7));
    assert_eq!(read_n(&mut p.stream, 5), vec![0x70, 0x03, 0x00, 0x07, 0x92]);
    p.send(&pubrel(99));
    assert_eq!(read_n(&mut p.stream, 5), vec![0x70, 0x03, 0x00, 0x63, 0x92]);
    s.expect_silence(QUIET);
}

#[test]
fn qos2_pubrel_unknown_id_v311_gets_pubcomp() {
    let b = TestBroker::start(2);
    let (mut p, _) = Raw::connect(b.addr, Version::V3_1_1, "q2-unknown-4", true);
    p.send(&pubrel(42));
    assert_eq!(read_n(&mut p.stream, 4), vec![0x70, 0x02, 0x00, 42]);
}

#[test]
fn qos2_outbound_full_handshake() {
    let b = TestBroker::start(2);
    let sub_id = b.id_on_shard("q2out-sub", 0);
    let (mut s, _) = Raw::connect(b.addr, Version::V3_1_1, &sub_id, true);
    assert_eq!(s.subscribe(1, "q2out/t", QoS::ExactlyOnce), vec![2]);
    let (mut p, _) = Raw::connect(b.addr, Version::V5, &b.id_on_shard("q2out-pub", 1), true);
    publish_qos2(&mut p, "q2out/t", b"hs", 1);
    let m = s.recv_publish();
    assert_eq!(
        (m.qos, m.dup, &m.payload[..]),
        (QoS::ExactlyOnce, false, &b"hs"[..])
    );
    assert_ne!(m.packet_id, 0);
    s.send(&pubrec(m.packet_id));
    let [hi, lo] = m.packet_id.to_be_bytes();
    assert_eq!(read_n(&mut s.stream, 4), vec![0x62, 0x02, hi, lo], "PUBREL");
    s.send(&pubcomp(m.packet_id));
    expect_no_bytes(&mut s.stream, QUIET);
}

#[test]
fn qos2_outbound_publish_redelivered_with_dup_after_reconnect() {
    let b = TestBroker::start(2);
    let sub_id = b.id_on_shard("q2re-sub", 0);
    let (mut s, ack) = Raw::connect_with(b.addr, v5_connect(&sub_id, true, 300));
    assert_eq!(ack.reason, 0);
    assert_eq!(s.subscribe(1, "q2re/t", QoS::ExactlyOnce), vec![2]);
    let (mut p, _) = Raw::connect(b.addr, Version::V5, &b.id_on_shard("q2re-pub", 1), true);
    publish_qos2(&mut p, "q2re/t", b"again", 1);
    let m = s.recv_publish();
    assert!(!m.dup);
    drop(s); // no PUBREC

    let (mut s, ack) = Raw::connect_with(b.addr, v5_connect(&sub_id, false, 300));
    assert_eq!(ack.reason, 0);
    assert!(ack.session_present);
    let again = s.recv_publish();
    assert!(again.dup, "redelivered PUBLISH must have DUP=1");
    assert_eq!(again.packet_id, m.packet_id);
    assert_eq!(again.qos, QoS::ExactlyOnce);
    assert_eq!(
        (&*again.topic, &again.payload[..]),
        ("q2re/t", &b"again"[..])
    );
    s.send(&pubrec(again.packet_id));
    expect_pubrel(&mut s, m.packet_id);
    s.send(&pubcomp(again.packet_id));
    s.expect_silence(QUIET);
}

#[test]
fn qos2_outbound_pubrel_resent_after_reconnect() {
    let b = TestBroker::start(2);
    let sub_id = b.id_on_shard("q2rel-sub", 1);
    // 3.1.1 persistent session this time.
    let (mut s, _) = Raw::connect(b.addr, Version::V3_1_1, &sub_id, false);
    assert_eq!(s.subscribe(1, "q2rel/t", QoS::ExactlyOnce), vec![2]);
    let (mut p, _) = Raw::connect(b.addr, Version::V5, &b.id_on_shard("q2rel-pub", 0), true);
    publish_qos2(&mut p, "q2rel/t", b"rel", 1);
    let m = s.recv_publish();
    s.send(&pubrec(m.packet_id));
    expect_pubrel(&mut s, m.packet_id);
    drop(s); // no PUBCOMP

    // Raw bytes: CONNACK (session present) then the PUBREL, not the PUBLISH
    // [MQTT-4.4.0-1].
    let mut s = Raw::open(b.addr, Version::V3_1_1);
    s.send_bytes(&connect_frame(b"MQTT", 4, 0x00, &field(sub_id.as_bytes())));
    let [hi, lo] = m.packet_id.to_be_bytes();
    assert_eq!(
        read_n(&mut s.stream, 8),
        vec![0x20, 0x02, 0x01, 0x00, 0x62, 0x02, hi, lo]
    );
    s.send(&pubcomp(m.packet_id));
    expect_no_bytes(&mut s.stream, QUIET);
}

#[test]
fn qos1_unacked_redelivered_with_dup_acked_not() {
    let b = TestBroker::start(2);
    let sub_id = b.id_on_shard("q1re-sub", 0);
    let (mut s, _) = Raw::connect(b.addr, Version::V3_1_1, &sub_id, false);
    assert_eq!(s.subscribe(1, "q1re/t", QoS::AtLeastOnce), vec![1]);
    let (mut p, _) = Raw::connect(b.addr, Version::V5, &b.id_on_shard("q1re-pub", 1), true);
    for i in 0..3u16 {
        publish_qos1(&mut p, "q1re/t", format!("m{i}").as_bytes(), i + 1);
    }
    let got: Vec<_> = (0..3).map(|_| s.recv_publish()).collect();
    for (i, m) in got.iter().enumerate() {
        assert_eq!(&m.payload[..], format!("m{i}").as_bytes());
        assert!(!m.dup);
    }
    ack(&mut s, puback(got[1].packet_id));
    // Make sure the PUBACK was processed before the connection drops.
    s.send_bytes(&[0xC0, 0x00]);
    assert!(matches!(s.recv(), Some(Packet::PingResp)));
    drop(s);

    let (mut s, ack2) = Raw::connect(b.addr, Version::V3_1_1, &sub_id, false);
    assert!(ack2.session_present);
    for i in [0usize, 2] {
        let m = s.recv_publish();
        assert!(m.dup, "redelivery must set DUP");
        assert_eq!(m.packet_id, got[i].packet_id);
        assert_eq!(&m.payload[..], format!("m{i}").as_bytes());
        s.send(&puback(m.packet_id));
    }
    s.send_bytes(&[0xC0, 0x00]);
    assert!(
        matches!(s.recv(), Some(Packet::PingResp)),
        "m1 was acked and must not come back"
    );
    drop(s);

    // Everything acked: nothing is redelivered.
    let (mut s, ack3) = Raw::connect(b.addr, Version::V3_1_1, &sub_id, false);
    assert!(ack3.session_present);
    s.expect_silence(QUIET);
}

// ---------------------------------------------------------------------------
// Session takeover.
// ---------------------------------------------------------------------------

#[test]
fn session_takeover_disconnects_first_with_0x8e_and_resumes_session() {
    let b = TestBroker::start(2);
    for shard in 0..2 {
        let id = b.id_on_shard("takeover", shard);
        let topic = format!("takeover/{shard}");
        let (mut first, ack) = Raw::connect_with(b.addr, v5_connect(&id, true, 300));
        assert_eq!(ack.reason, 0);
        assert!(!ack.session_present);
        assert_eq!(first.subscribe(1, &topic, QoS::AtLeastOnce), vec![1]);

        let (mut second, ack) = Raw::connect_with(b.addr, v5_connect(&id, false, 300));
        assert_eq!(ack.reason, 0);
        assert!(
            ack.session_present,
            "clean start 0 resumes the taken-over session"
        );
        assert_eq!(first.expect_close(), Some(reason::SESSION_TAKEN_OVER));

        // The subscription moved with the session.
        let (mut p, _) = Raw::connect(
            b.addr,
            Version::V5,
            &b.id_on_shard("takeover-pub", 1 - shard),
            true,
        );
        publish_qos1(&mut p, &topic, b"to second", 1);
        let m = second.recv_publish();
        assert_eq!(&m.payload[..], b"to second");
        second.send(&puback(m.packet_id));

        // A third connection with clean start 1 takes over with a new session.
        let (_third, ack) = Raw::connect_with(b.addr, v5_connect(&id, true, 0));
        assert_eq!(ack.reason, 0);
        assert!(!ack.session_present);
        assert_eq!(second.expect_close(), Some(reason::SESSION_TAKEN_OVER));
    }
}

// ---------------------------------------------------------------------------
// Topic aliases (inbound).
// ---------------------------------------------------------------------------

fn alias_publish(topic: &str, alias: u16, payload: &[u8]) -> Packet {
    let mut p = publish(topic, payload, QoS::AtMostOnce, false, 0);
    p.properties.topic_alias = Some(alias);
    Packet::Publish(p)
}

#[test]
fn topic_alias_zero_gets_disconnect_0x94() {
    let b = TestBroker::start(2);
    let (mut c, _) = Raw::connect(b.addr, Version::V5, "alias0", true);
    c.send(&alias_publish("al/t", 0, b"x"));
    assert_eq!(c.expect_close(), Some(reason::TOPIC_ALIAS_INVALID));
}

#[test]
fn topic_alias_above_maximum_gets_disconnect_0x94() {
    let b = TestBroker::start(2);
    let (mut c, ack) = Raw::connect(b.addr, Version::V5, "alias-max", true);
    let max = ack
        .properties
        .topic_alias_maximum
        .expect("CONNACK Topic Alias Maximum");
    assert_eq!(max, 32);
    c.send(&alias_publish("al/t", max, b"ok"));
    c.send(&alias_publish("al/t", max + 1, b"x"));
    assert_eq!(c.expect_close(), Some(reason::TOPIC_ALIAS_INVALID));
}

#[test]
fn topic_alias_unknown_with_empty_topic_gets_disconnect_0x82() {
    let b = TestBroker::start(2);
    let (mut c, _) = Raw::connect(b.addr, Version::V5, "alias-unknown", true);
    c.send(&alias_publish("", 5, b"x"));
    assert_eq!(c.expect_close(), Some(reason::PROTOCOL_ERROR));
}

#[test]
fn topic_alias_set_then_used_delivers_full_topic() {
    let b = TestBroker::start(2);
    let (mut s, mut p) = v5_sub_and_pub(&b, "alias", "alias/#", QoS::AtMostOnce);
    p.send(&alias_publish("alias/full/topic", 3, b"one"));
    p.send(&alias_publish("", 3, b"two"));
    // Re-point alias 3, then use it again.
    p.send(&alias_publish("alias/other", 3, b"three"));
    p.send(&alias_publish("", 3, b"four"));
    let want = [
        ("alias/full/topic", &b"one"[..]),
        ("alias/full/topic", b"two"),
        ("alias/other", b"three"),
        ("alias/other", b"four"),
    ];
    for (topic, payload) in want {
        let m = s.recv_publish();
        assert_eq!((&*m.topic, &m.payload[..]), (topic, payload));
        assert_eq!(
            m.properties.topic_alias, None,
            "subscriber did not allow aliases"
        );
    }
}

#[test]
fn topic_alias_does_not_survive_a_reconnect() {
    let b = TestBroker::start(2);
    let id = b.id_on_shard("alias-reconnect", 0);
    let (mut c, _) = Raw::connect_with(b.addr, v5_connect(&id, true, 300));
    c.send(&alias_publish("alias/r", 2, b"set"));
    c.send_bytes(&[0xC0, 0x00]);
    assert!(matches!(c.recv(), Some(Packet::PingResp)));
    drop(c);
    // Aliases belong to the network connection, not the session.
    let (mut c, ack) = Raw::connect_with(b.addr, v5_connect(&id, false, 300));
    assert!(ack.session_present);
    c.send(&alias_publish("", 2, b"use"));
    assert_eq!(c.expect_close(), Some(reason::PROTOCOL_ERROR));
}

// ---------------------------------------------------------------------------
// Flow control and DISCONNECT.
// ---------------------------------------------------------------------------

#[test]
fn receive_maximum_exceeded_gets_disconnect_0x93() {
    let b = TestBroker::start_with(2, |cfg| cfg.mqtt.receive_maximum = 2);
    let (mut c, ack) = Raw::connect(b.addr, Version::V5, "recvmax", true);
    assert_eq!(ack.properties.receive_maximum, Some(2));
    for id in 1..=3u16 {
        c.publish("rm/t", b"x", QoS::ExactlyOnce, false, id);
    }
    for id in 1..=2u16 {
        expect_pubrec(&mut c, id);
    }
    assert_eq!(c.expect_close(), Some(reason::RECEIVE_MAXIMUM_EXCEEDED));
    assert_broker_serves(&b);
}

#[test]
fn disconnect_raising_session_expiry_from_zero_gets_disconnect_0x82() {
    let b = TestBroker::start(2);
    let (mut c, _) = Raw::connect(b.addr, Version::V5, "expiry-raise", true);
    c.send(&Packet::Disconnect(Disconnect {
        reason: 0,
        properties: Properties {
            session_expiry_interval: Some(60),
            ..Default::default()
        }
        .into(),
    }));
    // [MQTT-3.14.2-2].
    assert_eq!(c.expect_close(), Some(reason::PROTOCOL_ERROR));
}

#[test]
fn normal_disconnect_closes_without_reply() {
    let b = TestBroker::start(2);
    let (mut c, _) = Raw::connect(b.addr, Version::V5, "bye", true);
    c.send(&Packet::Disconnect(Disconnect::default()));
    assert_eq!(read_until_close(&mut c.stream), Vec::<u8>::new());
}

#[test]
fn encode_helper_matches_codec() {
    // The literal builders (common/raw.rs, and connect_frame above) agree
    // with the codec for a plain PUBLISH.
    let p = Packet::Publish(publish("a/b", b"x", QoS::AtLeastOnce, false, 1));
    assert_eq!(
        encode(&p, Version::V5),
        v5_publish_bytes(0x32, b"a/b", Some(1), &[], b"x")
    );
    assert_eq!(
        encode(&p, Version::V3_1_1),
        v311_publish_bytes(0x32, b"a/b", Some(1), b"x")
    );
    let c = Packet::Connect(Box::new(connect_packet(Version::V3_1_1, "id", true)));
    assert_eq!(
        encode(&c, Version::V3_1_1),
        connect_frame(b"MQTT", 4, 0x02, &field(b"id"))
    );
    let c = Packet::Connect(Box::new(connect_packet(Version::V5, "id", false)));
    assert_eq!(
        encode(&c, Version::V5),
        connect_frame(b"MQTT", 5, 0x00, &field(b"id"))
    );
}
