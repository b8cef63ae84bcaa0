//! Codec tests: byte literals from the specs (positive and negative),
//! property-based round trips, split-buffer decoding and fuzzing.

use bytes::{Bytes, BytesMut};

use super::{
    decode, encode, encoded_len, BoxedProperties, DecodeError, Packet, Publish, QoS, Version,
    MAX_PACKET_SIZE,
};

mod errors;
mod fuzz;
mod literals;
mod roundtrip;
mod strategies;

/// Concatenates byte slices, so literals can mix numbers and `b"..."`.
fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Decodes `bytes` (with no size limit to speak of) without checking the result.
fn try_decode(bytes: &[u8], v: Version) -> Result<Option<Packet>, DecodeError> {
    decode(&mut BytesMut::from(bytes), v, MAX_PACKET_SIZE)
}

/// `bytes` decodes to exactly `expected` (consuming all of it) and `expected`
/// encodes back to exactly `bytes`.
#[track_caller]
fn roundtrip(bytes: &[u8], v: Version, expected: &Packet) {
    decodes_to(bytes, v, expected);
    encodes_to(expected, v, bytes);
}

/// `bytes` decodes to exactly `expected`, consuming all of it.
#[track_caller]
fn decodes_to(bytes: &[u8], v: Version, expected: &Packet) {
    let mut buf = BytesMut::from(bytes);
    let got = decode(&mut buf, v, MAX_PACKET_SIZE);
    assert_eq!(got, Ok(Some(expected.clone())), "decoding {bytes:02x?}");
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
}

/// `packet` encodes to exactly `bytes`, and `encoded_len` agrees.
#[track_caller]
fn encodes_to(packet: &Packet, v: Version, bytes: &[u8]) {
    let mut out = BytesMut::new();
    encode(packet, v, &mut out);
    assert_eq!(&out[..], bytes, "encoding {packet:?}");
    assert_eq!(encoded_len(packet, v), bytes.len());
}

/// Decoding `bytes` fails with `Malformed` naming `rule`.
#[track_caller]
fn malformed(bytes: &[u8], v: Version, rule: &str) {
    match try_decode(bytes, v) {
        Err(DecodeError::Malformed(m)) if m.contains(rule) => {}
        other => panic!("expected Malformed({rule}) for {bytes:02x?}, got {other:?}"),
    }
}

/// Decoding `bytes` fails with `Protocol` naming `rule`.
#[track_caller]
fn protocol(bytes: &[u8], v: Version, rule: &str) {
    match try_decode(bytes, v) {
        Err(DecodeError::Protocol(m)) if m.contains(rule) => {}
        other => panic!("expected Protocol({rule}) for {bytes:02x?}, got {other:?}"),
    }
}

/// A `Bytes` from a static slice.
fn b(s: &'static [u8]) -> Bytes {
    Bytes::from_static(s)
}

/// A decoded packet is moved several times on its way through a shard, so
/// its size is a cost per message: properties boxed, it is the PUBLISH's
/// fields (was 400 bytes with them inline). Also: a 3.1.1 PUBLISH and a
/// 5.0 one without properties decode without boxing any.
#[test]
fn packets_stay_small_and_publishes_without_properties_box_none() {
    assert!(
        std::mem::size_of::<Packet>() <= 96,
        "Packet is {} bytes",
        std::mem::size_of::<Packet>()
    );
    for v in [Version::V3_1_1, Version::V5] {
        let mut bytes = BytesMut::new();
        let publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "a/b".into(),
            packet_id: 7,
            payload: Bytes::from_static(b"x"),
            properties: BoxedProperties::default(),
        };
        encode(&Packet::Publish(publish), v, &mut bytes);
        let Ok(Some(Packet::Publish(p))) = decode(&mut bytes, v, MAX_PACKET_SIZE) else {
            panic!("no PUBLISH");
        };
        assert!(p.properties.is_empty());
        let mut p = p.properties;
        assert!(p.get_mut().is_none(), "{v:?}: empty properties boxed");
    }
    // A 5.0 PUBACK in its long form with an empty property list.
    let Ok(Some(Packet::PubAck(mut ack))) = try_decode(&[0x40, 4, 0, 7, 0, 0], Version::V5) else {
        panic!("no PUBACK");
    };
    assert!(ack.properties.get_mut().is_none(), "an empty list boxed");
}
