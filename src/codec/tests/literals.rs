//! Hand-written packets from the specs, decoded and encoded back byte for byte.

use std::sync::Arc;

use smallvec::smallvec;

use super::{b, cat, decodes_to, encodes_to, roundtrip};
use crate::codec::*;

const V31: Version = Version::V3_1;
const V311: Version = Version::V3_1_1;
const V5: Version = Version::V5;

fn topic(s: &str) -> Topic {
    Arc::from(s)
}

fn user(k: &str, v: &str) -> (String, String) {
    (k.to_owned(), v.to_owned())
}

#[test]
fn connect_3_1_1_minimal() {
    let bytes = cat(&[&[0x10, 15, 0, 4], b"MQTT", &[4, 0x02, 0, 60, 0, 3], b"abc"]);
    let c = Connect {
        version: V311,
        clean_start: true,
        keep_alive: 60,
        client_id: "abc".into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    };
    // The connection version passed to decode/encode does not matter for CONNECT.
    roundtrip(&bytes, V311, &Packet::Connect(Box::new(c.clone())));
    roundtrip(&bytes, V5, &Packet::Connect(Box::new(c)));
}

#[test]
fn connect_3_1_with_will_and_credentials() {
    let bytes = cat(&[
        &[0x10, 36, 0, 6],
        b"MQIsdp",
        &[3, 0xEE, 0, 10],
        &[0, 2],
        b"c1",
        &[0, 3],
        b"w/t",
        &[0, 3],
        b"bye",
        &[0, 4],
        b"user",
        &[0, 2],
        b"pw",
    ]);
    let c = Connect {
        version: V31,
        clean_start: true,
        keep_alive: 10,
        client_id: "c1".into(),
        will: Some(Will {
            topic: topic("w/t"),
            payload: b(b"bye"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Properties::default(),
        }),
        username: Some("user".into()),
        password: Some(b(b"pw")),
        properties: Properties::default(),
    };
    roundtrip(&bytes, V31, &Packet::Connect(Box::new(c)));
}

#[test]
fn connect_5_with_will_and_properties() {
    let bytes = cat(&[
        &[0x10, 49, 0, 4],
        b"MQTT",
        &[5, 0x96, 0, 30],
        // properties: session expiry 120, receive maximum 20, user property k=v
        &[
            15, 0x11, 0, 0, 0, 120, 0x21, 0, 20, 0x26, 0, 1, b'k', 0, 1, b'v',
        ],
        &[0, 3],
        b"cid",
        // will properties: payload format 1, will delay 5
        &[7, 0x01, 1, 0x18, 0, 0, 0, 5],
        &[0, 1, b'w', 0, 2, 0xDE, 0xAD],
        &[0, 1, b'u'],
    ]);
    let c = Connect {
        version: V5,
        clean_start: true,
        keep_alive: 30,
        client_id: "cid".into(),
        will: Some(Will {
            topic: topic("w"),
            payload: b(&[0xDE, 0xAD]),
            qos: QoS::ExactlyOnce,
            retain: false,
            properties: Properties {
                payload_format_indicator: Some(1),
                will_delay_interval: Some(5),
                ..Default::default()
            },
        }),
        username: Some("u".into()),
        password: None,
        properties: Properties {
            session_expiry_interval: Some(120),
            receive_maximum: Some(20),
            user_properties: vec![user("k", "v")],
            ..Default::default()
        },
    };
    roundtrip(&bytes, V5, &Packet::Connect(Box::new(c)));
}

#[test]
fn connect_5_password_without_username_is_allowed() {
    let bytes = cat(&[
        &[0x10, 17, 0, 4],
        b"MQTT",
        &[5, 0x40, 0, 0, 0, 0, 0, 0, 2],
        b"pw",
    ]);
    let c = Connect {
        version: V5,
        clean_start: false,
        keep_alive: 0,
        client_id: String::new(),
        will: None,
        username: None,
        password: Some(b(b"pw")),
        properties: Properties::default(),
    };
    roundtrip(&bytes, V5, &Packet::Connect(Box::new(c)));
}

#[test]
fn connack_3_x() {
    for v in [V31, V311] {
        let ok = ConnAck {
            session_present: true,
            reason: reason::SUCCESS,
            properties: BoxedProperties::default(),
        };
        roundtrip(&[0x20, 2, 1, 0], v, &Packet::ConnAck(ok));
        let codes = [0x00, 0x84, 0x85, 0x88, 0x86, 0x87];
        for (rc, reason) in codes.into_iter().enumerate() {
            let ack = ConnAck {
                reason,
                ..ConnAck::default()
            };
            roundtrip(&[0x20, 2, 0, rc as u8], v, &Packet::ConnAck(ack));
        }
    }
}

#[test]
fn connack_3_x_encoder_maps_other_5_0_codes() {
    for (reason, rc) in [(0x8C, 4), (0x8A, 5), (0x80, 3), (0x89, 3), (0x9F, 3)] {
        let ack = Packet::ConnAck(ConnAck {
            reason,
            ..ConnAck::default()
        });
        encodes_to(&ack, V311, &[0x20, 2, 0, rc]);
    }
}

#[test]
fn connack_5_with_properties() {
    let bytes = [
        0x20, 13, 0, 0, 10, 0x12, 0, 2, b'a', b'b', 0x22, 0, 10, 0x24, 1,
    ];
    let ack = ConnAck {
        session_present: false,
        reason: 0,
        properties: Properties {
            assigned_client_identifier: Some("ab".into()),
            topic_alias_maximum: Some(10),
            maximum_qos: Some(1),
            ..Default::default()
        }
        .into(),
    };
    roundtrip(&bytes, V5, &Packet::ConnAck(ack));
    let refused = ConnAck {
        reason: reason::NOT_AUTHORIZED,
        ..ConnAck::default()
    };
    roundtrip(&[0x20, 3, 0, 0x87, 0], V5, &Packet::ConnAck(refused));
}

fn publish(qos: QoS, topic_: &str, packet_id: u16, payload: &'static [u8]) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic(topic_),
        packet_id,
        payload: b(payload),
        properties: BoxedProperties::default(),
    }
}

#[test]
fn publish_3_x() {
    for v in [V31, V311] {
        let bytes = cat(&[&[0x30, 7, 0, 3], b"a/b", b"hi"]);
        roundtrip(
            &bytes,
            v,
            &Packet::Publish(publish(QoS::AtMostOnce, "a/b", 0, b"hi")),
        );
        let bytes = cat(&[&[0x33, 8, 0, 3], b"a/b", &[0, 10], b"x"]);
        let p = Publish {
            retain: true,
            ..publish(QoS::AtLeastOnce, "a/b", 10, b"x")
        };
        roundtrip(&bytes, v, &Packet::Publish(p));
        let p = Publish {
            dup: true,
            ..publish(QoS::ExactlyOnce, "t", 0x1234, b"")
        };
        roundtrip(&[0x3C, 5, 0, 1, b't', 0x12, 0x34], v, &Packet::Publish(p));
    }
}

#[test]
fn publish_5_without_properties() {
    let bytes = [0x30, 5, 0, 1, b't', 0, b'p'];
    roundtrip(
        &bytes,
        V5,
        &Packet::Publish(publish(QoS::AtMostOnce, "t", 0, b"p")),
    );
    let bytes = [0x34, 7, 0, 1, b't', 0, 9, 0, b'p'];
    roundtrip(
        &bytes,
        V5,
        &Packet::Publish(publish(QoS::ExactlyOnce, "t", 9, b"p")),
    );
}

#[test]
fn publish_5_with_properties() {
    let bytes = cat(&[
        &[0x32, 38, 0, 1, b't', 0, 7, 29],
        &[0x01, 1, 0x02, 0, 0, 0, 60, 0x03, 0, 4],
        b"json",
        &[0x0B, 1, 0x0B, 0x80, 0x01, 0x23, 0, 5],
        &[0x26, 0, 1, b'a', 0, 1, b'b'],
        b"hey",
    ]);
    let p = Publish {
        properties: Properties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            content_type: Some("json".into()),
            subscription_identifiers: smallvec![1, 128],
            topic_alias: Some(5),
            user_properties: vec![user("a", "b")],
            ..Default::default()
        }
        .into(),
        ..publish(QoS::AtLeastOnce, "t", 7, b"hey")
    };
    roundtrip(&bytes, V5, &Packet::Publish(p));
}

#[test]
fn publish_5_empty_topic_with_alias() {
    let bytes = [0x30, 7, 0, 0, 3, 0x23, 0, 1, b'x'];
    let p = Publish {
        properties: Properties {
            topic_alias: Some(1),
            ..Default::default()
        }
        .into(),
        ..publish(QoS::AtMostOnce, "", 0, b"x")
    };
    roundtrip(&bytes, V5, &Packet::Publish(p));
}

#[test]
fn publish_topic_wildcards_are_left_to_the_session() {
    let bytes = cat(&[&[0x30, 5, 0, 3], b"a/#"]);
    decodes_to(
        &bytes,
        V311,
        &Packet::Publish(publish(QoS::AtMostOnce, "a/#", 0, b"")),
    );
}

fn resp(packet_id: u16, reason: u8) -> PubResp {
    PubResp {
        packet_id,
        reason,
        properties: BoxedProperties::default(),
    }
}

type Wrap = fn(PubResp) -> Packet;
const RESPONSES: [(u8, Wrap); 4] = [
    (0x40, Packet::PubAck),
    (0x50, Packet::PubRec),
    (0x62, Packet::PubRel),
    (0x70, Packet::PubComp),
];

#[test]
fn pub_responses_3_x() {
    for v in [V31, V311] {
        for (byte0, wrap) in RESPONSES {
            roundtrip(&[byte0, 2, 0x12, 0x34], v, &wrap(resp(0x1234, 0)));
        }
    }
}

#[test]
fn pub_responses_5_short_forms() {
    for (byte0, wrap) in RESPONSES {
        roundtrip(&[byte0, 2, 0, 1], V5, &wrap(resp(1, 0)));
        roundtrip(&[byte0, 3, 0, 2, 0x10], V5, &wrap(resp(2, 0x10)));
        // Reason 0 and an empty property list: decoded, re-encoded short.
        decodes_to(&[byte0, 4, 0, 3, 0, 0], V5, &wrap(resp(3, 0)));
        decodes_to(&[byte0, 3, 0, 3, 0], V5, &wrap(resp(3, 0)));
        encodes_to(&wrap(resp(3, 0)), V5, &[byte0, 2, 0, 3]);
    }
}

#[test]
fn pub_responses_5_long_forms() {
    for (byte0, wrap) in RESPONSES {
        let bytes = cat(&[&[byte0, 11, 0, 3, 0x92, 7, 0x1F, 0, 4], b"gone"]);
        let p = PubResp {
            properties: Properties {
                reason_string: Some("gone".into()),
                ..Default::default()
            }
            .into(),
            ..resp(3, 0x92)
        };
        roundtrip(&bytes, V5, &wrap(p));
        let bytes = [byte0, 11, 0, 4, 0, 7, 0x26, 0, 1, b'k', 0, 1, b'v'];
        let p = PubResp {
            properties: Properties {
                user_properties: vec![user("k", "v")],
                ..Default::default()
            }
            .into(),
            ..resp(4, 0)
        };
        roundtrip(&bytes, V5, &wrap(p));
    }
}

#[test]
fn subscribe_3_x() {
    for v in [V31, V311] {
        let bytes = cat(&[&[0x82, 14, 0, 10, 0, 3], b"a/b", &[1, 0, 3], b"c/#", &[2]]);
        let s = Subscribe {
            packet_id: 10,
            filters: vec![
                (
                    "a/b".into(),
                    SubOptions {
                        qos: QoS::AtLeastOnce,
                        ..Default::default()
                    },
                ),
                (
                    "c/#".into(),
                    SubOptions {
                        qos: QoS::ExactlyOnce,
                        ..Default::default()
                    },
                ),
            ],
            properties: BoxedProperties::default(),
        };
        roundtrip(&bytes, v, &Packet::Subscribe(s));
    }
}

#[test]
fn subscribe_5_with_options_and_identifier() {
    let bytes = [0x82, 9, 0, 11, 2, 0x0B, 5, 0, 1, b'x', 0x2D];
    let s = Subscribe {
        packet_id: 11,
        filters: vec![(
            "x".into(),
            SubOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
            },
        )],
        properties: Properties {
            subscription_identifiers: smallvec![5],
            ..Default::default()
        }
        .into(),
    };
    roundtrip(&bytes, V5, &Packet::Subscribe(s));
}

#[test]
fn suback_all_versions() {
    for v in [V31, V311] {
        let s = SubAck {
            packet_id: 10,
            reasons: vec![0, 1, 2, 0x80],
            properties: BoxedProperties::default(),
        };
        roundtrip(&[0x90, 6, 0, 10, 0, 1, 2, 0x80], v, &Packet::SubAck(s));
        // 5.0 failure codes are written as 0x80 for 3.x.
        let s = SubAck {
            packet_id: 10,
            reasons: vec![0x8F, 1, 0xA2],
            properties: BoxedProperties::default(),
        };
        encodes_to(&Packet::SubAck(s), v, &[0x90, 5, 0, 10, 0x80, 1, 0x80]);
    }
    let s = SubAck {
        packet_id: 11,
        reasons: vec![2, 0xA2],
        properties: Properties {
            reason_string: Some("r".into()),
            ..Default::default()
        }
        .into(),
    };
    roundtrip(
        &[0x90, 9, 0, 11, 4, 0x1F, 0, 1, b'r', 2, 0xA2],
        V5,
        &Packet::SubAck(s),
    );
}

#[test]
fn unsubscribe_all_versions() {
    for v in [V31, V311] {
        let u = Unsubscribe {
            packet_id: 12,
            filters: vec!["a/b".into()],
            properties: BoxedProperties::default(),
        };
        roundtrip(
            &cat(&[&[0xA2, 7, 0, 12, 0, 3], b"a/b"]),
            v,
            &Packet::Unsubscribe(u),
        );
    }
    let u = Unsubscribe {
        packet_id: 12,
        filters: vec!["x".into(), "y".into()],
        properties: BoxedProperties::default(),
    };
    let bytes = [0xA2, 9, 0, 12, 0, 0, 1, b'x', 0, 1, b'y'];
    roundtrip(&bytes, V5, &Packet::Unsubscribe(u));
}

#[test]
fn unsuback_all_versions() {
    for v in [V31, V311] {
        let u = UnsubAck {
            packet_id: 12,
            reasons: vec![],
            properties: BoxedProperties::default(),
        };
        roundtrip(&[0xB0, 2, 0, 12], v, &Packet::UnsubAck(u));
    }
    let u = UnsubAck {
        packet_id: 12,
        reasons: vec![0, 0x11],
        properties: BoxedProperties::default(),
    };
    roundtrip(&[0xB0, 5, 0, 12, 0, 0, 0x11], V5, &Packet::UnsubAck(u));
}

#[test]
fn ping_all_versions() {
    for v in [V31, V311, V5] {
        roundtrip(&[0xC0, 0], v, &Packet::PingReq);
        roundtrip(&[0xD0, 0], v, &Packet::PingResp);
    }
}

#[test]
fn disconnect_all_versions() {
    for v in [V31, V311, V5] {
        roundtrip(&[0xE0, 0], v, &Packet::Disconnect(Disconnect::default()));
    }
    // 3.x ignores reason and properties when encoding.
    let d = Disconnect {
        reason: 0x8E,
        properties: Properties {
            reason_string: Some("x".into()),
            ..Default::default()
        }
        .into(),
    };
    encodes_to(&Packet::Disconnect(d.clone()), V311, &[0xE0, 0]);
    let with_will = Disconnect {
        reason: reason::DISCONNECT_WITH_WILL,
        ..Disconnect::default()
    };
    roundtrip(&[0xE0, 1, 0x04], V5, &Packet::Disconnect(with_will));
    let bytes = cat(&[&[0xE0, 11, 0x8E, 9, 0x11, 0, 0, 0, 0, 0x1F, 0, 1], b"x"]);
    let d = Disconnect {
        properties: Properties {
            session_expiry_interval: Some(0),
            ..d.properties.into_properties()
        }
        .into(),
        ..d
    };
    roundtrip(&bytes, V5, &Packet::Disconnect(d));
}

#[test]
fn auth_5() {
    roundtrip(&[0xF0, 0], V5, &Packet::Auth(Auth::default()));
    let a = Auth {
        reason: reason::CONTINUE_AUTHENTICATION,
        properties: BoxedProperties::default(),
    };
    roundtrip(&[0xF0, 1, 0x18], V5, &Packet::Auth(a));
    let bytes = cat(&[
        &[0xF0, 15, 0x18, 13, 0x15, 0, 5],
        b"SCRAM",
        &[0x16, 0, 2, 1, 2],
    ]);
    let a = Auth {
        reason: reason::CONTINUE_AUTHENTICATION,
        properties: Properties {
            authentication_method: Some("SCRAM".into()),
            authentication_data: Some(b(&[1, 2])),
            ..Default::default()
        }
        .into(),
    };
    roundtrip(&bytes, V5, &Packet::Auth(a));
}

#[test]
fn remaining_length_of_several_bytes() {
    // 200-byte payload: remaining length 205 takes two bytes (0xCD 0x01).
    let payload: &'static [u8] = &[7u8; 200];
    let mut bytes = vec![0x30, 0xCD, 0x01, 0, 3];
    bytes.extend_from_slice(b"a/b");
    bytes.extend_from_slice(payload);
    roundtrip(
        &bytes,
        V311,
        &Packet::Publish(publish(QoS::AtMostOnce, "a/b", 0, payload)),
    );
}

#[test]
fn user_properties_keep_order_and_repeat() {
    let bytes = cat(&[
        &[0x40, 25, 0, 1, 0, 21],
        &[0x26, 0, 1, b'z', 0, 1, b'1'],
        &[0x26, 0, 1, b'a', 0, 1, b'2'],
        &[0x26, 0, 1, b'z', 0, 1, b'3'],
    ]);
    let p = PubResp {
        properties: Properties {
            user_properties: vec![user("z", "1"), user("a", "2"), user("z", "3")],
            ..Default::default()
        }
        .into(),
        ..resp(1, 0)
    };
    roundtrip(&bytes, V5, &Packet::PubAck(p));
}

#[test]
fn encoder_skips_properties_the_packet_does_not_allow() {
    let p = Publish {
        properties: Properties {
            session_expiry_interval: Some(5),
            reason_string: Some("no".into()),
            ..Default::default()
        }
        .into(),
        ..publish(QoS::AtMostOnce, "t", 0, b"")
    };
    encodes_to(&Packet::Publish(p), V5, &[0x30, 4, 0, 1, b't', 0]);
}

#[test]
fn payload_is_a_slice_of_the_input_buffer() {
    let mut buf = bytes::BytesMut::from(&cat(&[&[0x30, 7, 0, 3], b"a/b", b"hi"])[..]);
    let start = buf.as_ptr() as usize;
    let Ok(Some(Packet::Publish(p))) = decode(&mut buf, V311, 1024) else {
        panic!("no publish");
    };
    assert_eq!(p.payload.as_ptr() as usize, start + 7);
}

#[test]
fn partial_input_leaves_the_buffer_untouched() {
    let bytes = cat(&[&[0x30, 7, 0, 3], b"a/b", b"hi"]);
    for n in 0..bytes.len() {
        let mut buf = bytes::BytesMut::from(&bytes[..n]);
        assert_eq!(decode(&mut buf, V311, 1024), Ok(None));
        assert_eq!(&buf[..], &bytes[..n]);
    }
}

#[test]
fn reason_codes_of_errors() {
    let too_large = DecodeError::PacketTooLarge { size: 10, max: 5 };
    assert_eq!(too_large.reason_code(), 0x95);
    assert_eq!(DecodeError::MalformedRemainingLength.reason_code(), 0x81);
    assert_eq!(DecodeError::Malformed("x").reason_code(), 0x81);
    assert_eq!(DecodeError::Protocol("x").reason_code(), 0x82);
    assert_eq!(
        DecodeError::UnsupportedProtocolVersion(6).reason_code(),
        0x84
    );
}
