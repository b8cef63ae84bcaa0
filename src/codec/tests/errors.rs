//! One byte literal per decoder rule, asserting the exact error.

use bytes::BytesMut;

use super::{cat, malformed, protocol, try_decode};
use crate::codec::*;

const V31: Version = Version::V3_1;
const V311: Version = Version::V3_1_1;
const V5: Version = Version::V5;
const ALL: [Version; 3] = [V31, V311, V5];

// ---- fixed header ----

#[test]
fn packet_type_0_is_malformed() {
    for v in ALL {
        malformed(&[0x00, 0], v, "[MQTT-2.1.2]");
    }
}

#[test]
fn packet_type_15_is_malformed_in_3_x() {
    for v in [V31, V311] {
        malformed(&[0xF0, 0], v, "packet type 15");
    }
}

#[test]
fn reserved_flags_must_be_0010_for_pubrel_subscribe_unsubscribe() {
    for v in ALL {
        malformed(&[0x60, 2, 0, 1], v, "[MQTT-3.6.1-1]");
        malformed(&[0x6A, 2, 0, 1], v, "[MQTT-3.6.1-1]");
        malformed(&[0x80, 6, 0, 1, 0, 1, b'a', 0], v, "[MQTT-3.8.1-1]");
        malformed(&[0xA0, 5, 0, 1, 0, 1, b'a'], v, "[MQTT-3.10.1-1]");
    }
}

#[test]
fn reserved_flags_must_be_0_for_the_others() {
    let firsts = [0x11, 0x22, 0x41, 0x52, 0x74, 0x98, 0xB1, 0xC1, 0xD2, 0xE4];
    for v in ALL {
        for byte0 in firsts {
            malformed(&[byte0, 0], v, "[MQTT-2.2.2-2]");
        }
    }
    malformed(&[0xF1, 0], V5, "[MQTT-2.2.2-2]");
}

#[test]
fn remaining_length_longer_than_4_bytes() {
    for v in ALL {
        let e = try_decode(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], v);
        assert_eq!(e, Err(DecodeError::MalformedRemainingLength));
        let e = try_decode(&[0xC0, 0x80, 0x80, 0x80, 0x80], v);
        assert_eq!(e, Err(DecodeError::MalformedRemainingLength));
    }
}

#[test]
fn trailing_bytes_are_malformed() {
    for v in ALL {
        malformed(&[0xC0, 1, 0], v, "[MQTT-2.1.4]");
        malformed(&[0xD0, 1, 0], v, "[MQTT-2.1.4]");
    }
    for v in [V31, V311] {
        malformed(&[0x40, 3, 0, 1, 0], v, "[MQTT-2.1.4]");
        malformed(&[0xB0, 3, 0, 1, 0], v, "[MQTT-2.1.4]");
        malformed(&[0x20, 3, 0, 0, 0], v, "[MQTT-2.1.4]");
        malformed(&[0xE0, 1, 0], v, "[MQTT-2.1.4]");
    }
    malformed(&[0x40, 5, 0, 1, 0, 0, 0], V5, "[MQTT-2.1.4]");
    malformed(&[0xE0, 3, 0, 0, 0], V5, "[MQTT-2.1.4]");
    let connect = cat(&[
        &[0x10, 16, 0, 4],
        b"MQTT",
        &[4, 0x02, 0, 60, 0, 3],
        b"abc",
        &[0],
    ]);
    malformed(&connect, V311, "[MQTT-2.1.4]");
}

#[test]
fn body_shorter_than_its_fields_is_malformed() {
    for v in ALL {
        malformed(&[0x40, 1, 0], v, "[MQTT-1.5]");
        malformed(&[0x30, 3, 0, 5, b'a'], v, "[MQTT-1.5]");
        malformed(&[0x32, 3, 0, 1, b'a'], v, "[MQTT-1.5]");
        malformed(&[0x82, 5, 0, 1, 0, 1, b'a'], v, "[MQTT-1.5]");
        malformed(&[0x20, 1, 0], v, "[MQTT-1.5]");
    }
    malformed(&cat(&[&[0x10, 6, 0, 4], b"MQTT"]), V5, "[MQTT-1.5]");
}

#[test]
fn too_large_is_refused_from_the_fixed_header_alone() {
    let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F][..]);
    let e = decode(&mut buf, V5, 1024);
    assert_eq!(
        e,
        Err(DecodeError::PacketTooLarge {
            size: 5 + 268_435_455,
            max: 1024
        })
    );
    assert_eq!(e.unwrap_err().reason_code(), 0x95);
    // The limit counts the fixed header: 2 + 8 = 10 bytes.
    let mut buf = BytesMut::from(&[0x30, 8, 0, 1][..]);
    assert_eq!(
        decode(&mut buf, V311, 9),
        Err(DecodeError::PacketTooLarge { size: 10, max: 9 })
    );
    let mut buf = BytesMut::from(&[0x30, 8, 0, 1, b't', 1, 2, 3, 4, 5][..]);
    assert!(matches!(decode(&mut buf, V311, 10), Ok(Some(_))));
}

// ---- strings ----

#[test]
fn strings_must_be_utf8_without_nul() {
    for v in ALL {
        malformed(&[0x30, 4, 0, 2, 0xC3, 0x28], v, "[MQTT-1.5.4-1]");
        malformed(&[0x30, 5, 0, 3, 0xED, 0xA0, 0x80], v, "[MQTT-1.5.4-1]");
        malformed(&[0x30, 3, 0, 1, 0x00], v, "[MQTT-1.5.4-2]");
    }
    for v in [V31, V311] {
        malformed(&[0xA2, 5, 0, 1, 0, 1, 0], v, "[MQTT-1.5.4-2]");
    }
    malformed(&[0xA2, 6, 0, 1, 0, 0, 1, 0], V5, "[MQTT-1.5.4-2]");
    let connect = cat(&[
        &[0x10, 14, 0, 4],
        b"MQTT",
        &[4, 0x02, 0, 60, 0, 2, 0xFF, 0xFE],
    ]);
    malformed(&connect, V311, "[MQTT-1.5.4-1]");
    // In a property: reason string with a NUL.
    malformed(
        &[0x40, 8, 0, 1, 0x80, 4, 0x1F, 0, 1, 0],
        V5,
        "[MQTT-1.5.4-2]",
    );
}

// ---- PUBLISH ----

#[test]
fn publish_qos_3_is_malformed() {
    for v in ALL {
        malformed(&[0x36, 5, 0, 1, b't', 0, 1], v, "[MQTT-3.3.1-4]");
    }
}

#[test]
fn publish_dup_with_qos_0_is_malformed() {
    for v in ALL {
        malformed(&[0x38, 3, 0, 1, b't'], v, "[MQTT-3.3.1-2]");
    }
}

#[test]
fn publish_packet_id_0_with_qos_is_a_protocol_error() {
    for v in ALL {
        protocol(&[0x32, 6, 0, 1, b't', 0, 0, 0], v, "[MQTT-2.2.1-3]");
        protocol(&[0x34, 6, 0, 1, b't', 0, 0, 0], v, "[MQTT-2.2.1-3]");
    }
}

// ---- CONNECT ----

fn connect(name: &[u8], level: u8, flags: u8, tail: &[u8]) -> Vec<u8> {
    let mut body = cat(&[&[0, name.len() as u8], name, &[level, flags, 0, 10]]);
    if level == 5 && name == b"MQTT" {
        body.push(0);
    }
    body.extend_from_slice(&[0, 1, b'c']);
    body.extend_from_slice(tail);
    cat(&[&[0x10, body.len() as u8], &body])
}

#[test]
fn connect_unknown_protocol_name_is_a_protocol_error() {
    protocol(&connect(b"MQTX", 4, 0, &[]), V5, "[MQTT-3.1.2-1]");
    protocol(&connect(b"MQIsdp2", 3, 0, &[]), V5, "[MQTT-3.1.2-1]");
}

#[test]
fn connect_unknown_level_is_unsupported() {
    for (name, level) in [
        (&b"MQTT"[..], 3),
        (b"MQTT", 6),
        (b"MQTT", 0x84),
        (b"MQIsdp", 4),
    ] {
        let e = try_decode(&connect(name, level, 0, &[]), V5);
        assert_eq!(e, Err(DecodeError::UnsupportedProtocolVersion(level)));
        assert_eq!(e.unwrap_err().reason_code(), 0x84);
    }
}

#[test]
fn connect_reserved_flag_is_malformed() {
    for (name, level) in [(&b"MQIsdp"[..], 3), (b"MQTT", 4), (b"MQTT", 5)] {
        malformed(&connect(name, level, 0x03, &[]), V5, "[MQTT-3.1.2-3]");
    }
}

#[test]
fn connect_will_qos_and_retain_need_the_will_flag() {
    for (name, level) in [(&b"MQIsdp"[..], 3), (b"MQTT", 4), (b"MQTT", 5)] {
        malformed(&connect(name, level, 0x08, &[]), V5, "[MQTT-3.1.2-13]");
        malformed(&connect(name, level, 0x10, &[]), V5, "[MQTT-3.1.2-13]");
        malformed(&connect(name, level, 0x20, &[]), V5, "[MQTT-3.1.2-15]");
    }
}

#[test]
fn connect_will_qos_3_is_malformed() {
    let will = [0, 1, b'w', 0, 0];
    malformed(&connect(b"MQTT", 4, 0x1C, &will), V311, "[MQTT-3.1.2-14]");
    malformed(&connect(b"MQIsdp", 3, 0x1C, &will), V311, "[MQTT-3.1.2-14]");
    let will5 = [0, 0, 1, b'w', 0, 0];
    malformed(&connect(b"MQTT", 5, 0x1C, &will5), V5, "[MQTT-3.1.2-14]");
}

#[test]
fn connect_3_x_password_needs_username() {
    malformed(
        &connect(b"MQTT", 4, 0x40, &[0, 1, b'p']),
        V311,
        "[MQTT-3.1.2-22]",
    );
    malformed(
        &connect(b"MQIsdp", 3, 0x40, &[0, 1, b'p']),
        V31,
        "[MQTT-3.1.2-22]",
    );
    assert!(matches!(
        try_decode(&connect(b"MQTT", 5, 0x40, &[0, 1, b'p']), V5),
        Ok(Some(_))
    ));
}

// ---- CONNACK ----

#[test]
fn connack_reserved_bits_are_malformed() {
    for v in ALL {
        malformed(&[0x20, 3, 0x02, 0, 0], v, "[MQTT-3.2.2-1]");
        malformed(&[0x20, 3, 0x81, 0, 0], v, "[MQTT-3.2.2-1]");
    }
}

#[test]
fn connack_3_x_reserved_return_code_is_malformed() {
    for v in [V31, V311] {
        malformed(&[0x20, 2, 0, 6], v, "[MQTT-3.2.2.3]");
        malformed(&[0x20, 2, 0, 0x80], v, "[MQTT-3.2.2.3]");
    }
}

// ---- SUBSCRIBE / UNSUBSCRIBE / acks ----

#[test]
fn subscribe_needs_a_filter() {
    for v in [V31, V311] {
        protocol(&[0x82, 2, 0, 1], v, "[MQTT-3.8.3-3]");
    }
    protocol(&[0x82, 3, 0, 1, 0], V5, "[MQTT-3.8.3-3]");
}

#[test]
fn subscribe_packet_id_0_is_a_protocol_error() {
    protocol(&[0x82, 6, 0, 0, 0, 1, b'a', 0], V311, "[MQTT-2.2.1-3]");
    protocol(&[0x82, 7, 0, 0, 0, 0, 1, b'a', 0], V5, "[MQTT-2.2.1-3]");
}

#[test]
fn subscribe_3_x_options_reserved_bits() {
    for v in [V31, V311] {
        for opts in [0x04, 0x08, 0x10, 0x40, 0x80] {
            malformed(&[0x82, 6, 0, 1, 0, 1, b'a', opts], v, "[MQTT-3.8.3-4]");
        }
        malformed(&[0x82, 6, 0, 1, 0, 1, b'a', 3], v, "[MQTT-3.8.3-4]");
    }
}

#[test]
fn subscribe_5_options() {
    for opts in [0x40, 0x80, 0xC1] {
        malformed(&[0x82, 7, 0, 1, 0, 0, 1, b'a', opts], V5, "[MQTT-3.8.3-5]");
    }
    protocol(&[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x30], V5, "Retain Handling");
    malformed(&[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x03], V5, "[MQTT-3.8.3-4]");
}

#[test]
fn unsubscribe_needs_a_filter_and_an_id() {
    for v in [V31, V311] {
        protocol(&[0xA2, 2, 0, 1], v, "[MQTT-3.10.3-2]");
        protocol(&[0xA2, 5, 0, 0, 0, 1, b'a'], v, "[MQTT-2.2.1-3]");
    }
    protocol(&[0xA2, 3, 0, 1, 0], V5, "[MQTT-3.10.3-2]");
}

#[test]
fn suback_codes() {
    for v in [V31, V311] {
        malformed(&[0x90, 3, 0, 1, 3], v, "[MQTT-3.9.3-2]");
        malformed(&[0x90, 3, 0, 1, 0x8F], v, "[MQTT-3.9.3-2]");
        protocol(&[0x90, 2, 0, 1], v, "[MQTT-3.9.3-1]");
    }
    protocol(&[0x90, 3, 0, 1, 0], V5, "[MQTT-3.9.3-1]");
    protocol(&[0xB0, 3, 0, 1, 0], V5, "[MQTT-3.11.3-1]");
}

#[test]
fn auth_is_reserved_in_3_x() {
    malformed(&[0xF0, 1, 0x18], V311, "packet type 15");
    malformed(&[0xF0, 1, 0x18], V31, "packet type 15");
}

// ---- properties ----

#[test]
fn property_unknown_id_is_malformed() {
    for id in [0x00, 0x04, 0x2B, 0x7F] {
        malformed(&[0x40, 6, 0, 1, 0x80, 2, id, 0], V5, "unknown property");
    }
    // A two-byte identifier (0x80 0x01 = 128).
    malformed(
        &[0x40, 7, 0, 1, 0x80, 3, 0x80, 0x01, 0],
        V5,
        "unknown property",
    );
}

#[test]
fn property_not_allowed_is_a_protocol_error() {
    // Session expiry in PUBLISH.
    protocol(
        &[0x30, 9, 0, 1, b't', 5, 0x11, 0, 0, 0, 1],
        V5,
        "[MQTT-2.2.2-2]",
    );
    // Will delay in PUBLISH.
    protocol(
        &[0x30, 9, 0, 1, b't', 5, 0x18, 0, 0, 0, 1],
        V5,
        "[MQTT-2.2.2-2]",
    );
    // Reason string in CONNECT.
    protocol(
        &connect_with_props(&[0x1F, 0, 0], &[]),
        V5,
        "[MQTT-2.2.2-2]",
    );
    // Topic alias and subscription identifier in the will.
    protocol(
        &connect_with_props(&[], &[0x23, 0, 1]),
        V5,
        "[MQTT-2.2.2-2]",
    );
    protocol(&connect_with_props(&[], &[0x0B, 1]), V5, "[MQTT-2.2.2-2]");
    // Topic alias in PUBACK, subscription identifier in UNSUBSCRIBE.
    protocol(&[0x40, 7, 0, 1, 0, 3, 0x23, 0, 1], V5, "[MQTT-2.2.2-2]");
    protocol(
        &[0xA2, 8, 0, 1, 2, 0x0B, 1, 0, 1, b'a'],
        V5,
        "[MQTT-2.2.2-2]",
    );
    // Server reference in AUTH, auth method in DISCONNECT.
    protocol(&[0xF0, 5, 0x18, 3, 0x1C, 0, 0], V5, "[MQTT-2.2.2-2]");
    protocol(&[0xE0, 5, 0, 3, 0x15, 0, 0], V5, "[MQTT-2.2.2-2]");
}

/// A 5.0 CONNECT with the given CONNECT properties and, when `will` is not
/// empty, a will with those will properties.
fn connect_with_props(props: &[u8], will: &[u8]) -> Vec<u8> {
    let flags: u8 = if will.is_empty() { 0 } else { 0x04 };
    let mut body = cat(&[
        &[0, 4],
        b"MQTT",
        &[5, flags, 0, 10, props.len() as u8],
        props,
    ]);
    body.extend_from_slice(&[0, 1, b'c']);
    if !will.is_empty() {
        body.push(will.len() as u8);
        body.extend_from_slice(will);
        body.extend_from_slice(&[0, 1, b'w', 0, 0]);
    }
    cat(&[&[0x10, body.len() as u8], &body])
}

#[test]
fn property_twice_is_a_protocol_error() {
    let twice = [0x30, 11, 0, 1, b't', 7, 0x03, 0, 1, b'a', 0x03, 0, 0];
    protocol(&twice, V5, "more than once");
    protocol(
        &[0x82, 11, 0, 1, 4, 0x0B, 1, 0x0B, 2, 0, 1, b'a', 0],
        V5,
        "more than once",
    );
    protocol(
        &connect_with_props(&[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2], &[]),
        V5,
        "more than once",
    );
    protocol(
        &connect_with_props(&[], &[0x18, 0, 0, 0, 1, 0x18, 0, 0, 0, 1]),
        V5,
        "more than once",
    );
    // User properties and PUBLISH subscription identifiers may repeat.
    let ok = [0x30, 8, 0, 1, b't', 4, 0x0B, 1, 0x0B, 2];
    assert!(matches!(try_decode(&ok, V5), Ok(Some(_))));
}

#[test]
fn property_zero_values_are_protocol_errors() {
    protocol(
        &[0x30, 6, 0, 1, b't', 2, 0x0B, 0],
        V5,
        "Subscription Identifier is 0",
    );
    protocol(
        &[0x82, 9, 0, 1, 2, 0x0B, 0, 0, 1, b'a', 0],
        V5,
        "Subscription Identifier is 0",
    );
    // Topic Alias 0 decodes: the session answers it with DISCONNECT 0x94.
    let mut buf = bytes::BytesMut::from(&[0x30, 7, 0, 1, b't', 3, 0x23, 0, 0][..]);
    match crate::codec::decode(&mut buf, V5, 1 << 20) {
        Ok(Some(crate::codec::Packet::Publish(p))) => assert_eq!(p.properties.topic_alias, Some(0)),
        other => panic!("{other:?}"),
    }
    protocol(
        &connect_with_props(&[0x21, 0, 0], &[]),
        V5,
        "Receive Maximum is 0",
    );
    protocol(
        &connect_with_props(&[0x27, 0, 0, 0, 0], &[]),
        V5,
        "Maximum Packet Size is 0",
    );
    protocol(&[0x20, 6, 0, 0, 3, 0x21, 0, 0], V5, "Receive Maximum is 0");
}

#[test]
fn property_flags_must_be_0_or_1() {
    protocol(
        &connect_with_props(&[0x17, 2], &[]),
        V5,
        "Request Problem Information",
    );
    protocol(
        &connect_with_props(&[0x19, 2], &[]),
        V5,
        "Request Response Information",
    );
    protocol(
        &[0x30, 6, 0, 1, b't', 2, 0x01, 2],
        V5,
        "Payload Format Indicator",
    );
    protocol(
        &connect_with_props(&[], &[0x01, 0xFF]),
        V5,
        "Payload Format Indicator",
    );
    for (id, what) in [
        (0x24, "Maximum QoS"),
        (0x25, "Retain Available"),
        (0x28, "Wildcard Subscription Available"),
        (0x29, "Subscription Identifiers Available"),
        (0x2A, "Shared Subscription Available"),
    ] {
        protocol(&[0x20, 5, 0, 0, 2, id, 2], V5, what);
        assert!(matches!(
            try_decode(&[0x20, 5, 0, 0, 2, id, 1], V5),
            Ok(Some(_))
        ));
    }
}

#[test]
fn property_length_past_the_packet_is_malformed() {
    malformed(
        &[0x40, 5, 0, 1, 0x80, 9, 0x1F],
        V5,
        "property length exceeds",
    );
    malformed(
        &[0x30, 5, 0, 1, b't', 0x80, 0x01],
        V5,
        "property length exceeds",
    );
    malformed(&[0x30, 4, 0, 1, b't', 0x80], V5, "[MQTT-1.5]");
    // A value running past the property list.
    malformed(&[0x40, 7, 0, 1, 0x80, 2, 0x1F, 0, 1], V5, "[MQTT-1.5]");
    // Property length as a 5-byte variable byte integer.
    malformed(
        &[0x40, 8, 0, 1, 0, 0x80, 0x80, 0x80, 0x80, 0x01],
        V5,
        "[MQTT-1.5.5]",
    );
}

#[test]
fn nul_is_found_at_every_position() {
    for len in 1..=24usize {
        for at in 0..len {
            let mut topic = vec![b'a'; len];
            topic[at] = 0;
            let bytes = cat(&[&[0x30, 2 + len as u8, 0, len as u8], &topic]);
            malformed(&bytes, V311, "[MQTT-1.5.4-2]");
        }
        let bytes = cat(&[
            &[0x30, 2 + len as u8, 0, len as u8],
            &vec![0xFFu8 >> 1; len],
        ]);
        assert!(matches!(try_decode(&bytes, V311), Ok(Some(_))));
    }
}
