//! proptest strategies for valid packets, respecting per-version rules: no
//! properties in 3.x, no AUTH in 3.x, no packet identifier 0, 3.x-only return
//! codes, only allowed properties with legal values.

use std::sync::Arc;

use bytes::Bytes;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

use crate::codec::properties::{id, PropKind};
use crate::codec::*;

/// Any of the three versions.
pub(super) fn version() -> impl Strategy<Value = Version> {
    prop_oneof![
        Just(Version::V3_1),
        Just(Version::V3_1_1),
        Just(Version::V5)
    ]
}

/// A short string without U+0000 (and without other control characters).
fn text() -> impl Strategy<Value = String> {
    "\\PC{0,10}"
}

fn binary() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..20).prop_map(Bytes::from)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

/// One property with a legal value.
#[derive(Debug, Clone)]
enum Prop {
    Byte(u8, u8),
    Two(u8, u16),
    Four(u8, u32),
    Str(u8, String),
    Bin(u8, Bytes),
    SubId(u32),
    User(String, String),
}

fn prop() -> impl Strategy<Value = Prop> {
    let flags = prop::sample::select(vec![
        id::PAYLOAD_FORMAT_INDICATOR,
        id::REQUEST_PROBLEM_INFORMATION,
        id::REQUEST_RESPONSE_INFORMATION,
        id::MAXIMUM_QOS,
        id::RETAIN_AVAILABLE,
        id::WILDCARD_SUBSCRIPTION_AVAILABLE,
        id::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        id::SHARED_SUBSCRIPTION_AVAILABLE,
    ]);
    let twos = prop::sample::select(vec![
        id::SERVER_KEEP_ALIVE,
        id::RECEIVE_MAXIMUM,
        id::TOPIC_ALIAS_MAXIMUM,
        id::TOPIC_ALIAS,
    ]);
    let fours = prop::sample::select(vec![
        id::MESSAGE_EXPIRY_INTERVAL,
        id::SESSION_EXPIRY_INTERVAL,
        id::WILL_DELAY_INTERVAL,
        id::MAXIMUM_PACKET_SIZE,
    ]);
    let strs = prop::sample::select(vec![
        id::CONTENT_TYPE,
        id::RESPONSE_TOPIC,
        id::ASSIGNED_CLIENT_IDENTIFIER,
        id::AUTHENTICATION_METHOD,
        id::RESPONSE_INFORMATION,
        id::SERVER_REFERENCE,
        id::REASON_STRING,
    ]);
    let bins = prop::sample::select(vec![id::CORRELATION_DATA, id::AUTHENTICATION_DATA]);
    prop_oneof![
        (flags, 0u8..=1).prop_map(|(i, v)| Prop::Byte(i, v)),
        (twos, 1u16..).prop_map(|(i, v)| Prop::Two(i, v)),
        (fours, 1u32..).prop_map(|(i, v)| Prop::Four(i, v)),
        (strs, text()).prop_map(|(i, v)| Prop::Str(i, v)),
        (bins, binary()).prop_map(|(i, v)| Prop::Bin(i, v)),
        (1u32..=268_435_455).prop_map(Prop::SubId),
        (text(), text()).prop_map(|(k, v)| Prop::User(k, v)),
    ]
}

fn set<T>(slot: &mut Option<T>, v: T) {
    if slot.is_none() {
        *slot = Some(v);
    }
}

fn apply_byte(p: &mut Properties, i: u8, v: u8) {
    let slot = match i {
        id::PAYLOAD_FORMAT_INDICATOR => &mut p.payload_format_indicator,
        id::REQUEST_PROBLEM_INFORMATION => &mut p.request_problem_information,
        id::REQUEST_RESPONSE_INFORMATION => &mut p.request_response_information,
        id::MAXIMUM_QOS => &mut p.maximum_qos,
        id::RETAIN_AVAILABLE => &mut p.retain_available,
        id::WILDCARD_SUBSCRIPTION_AVAILABLE => &mut p.wildcard_subscription_available,
        id::SUBSCRIPTION_IDENTIFIER_AVAILABLE => &mut p.subscription_identifier_available,
        _ => &mut p.shared_subscription_available,
    };
    set(slot, v);
}

fn apply_str(p: &mut Properties, i: u8, v: String) {
    let slot = match i {
        id::CONTENT_TYPE => &mut p.content_type,
        id::RESPONSE_TOPIC => &mut p.response_topic,
        id::ASSIGNED_CLIENT_IDENTIFIER => &mut p.assigned_client_identifier,
        id::AUTHENTICATION_METHOD => &mut p.authentication_method,
        id::RESPONSE_INFORMATION => &mut p.response_information,
        id::SERVER_REFERENCE => &mut p.server_reference,
        _ => &mut p.reason_string,
    };
    set(slot, v);
}

fn apply(p: &mut Properties, kind: PropKind, prop: Prop) {
    let pid = match &prop {
        Prop::Byte(i, _) | Prop::Two(i, _) | Prop::Four(i, _) => *i,
        Prop::Str(i, _) | Prop::Bin(i, _) => *i,
        Prop::SubId(_) => id::SUBSCRIPTION_IDENTIFIER,
        Prop::User(..) => id::USER_PROPERTY,
    };
    if !kind.allows(pid) {
        return;
    }
    match prop {
        Prop::Byte(i, v) => apply_byte(p, i, v),
        Prop::Two(i, v) => match i {
            id::SERVER_KEEP_ALIVE => set(&mut p.server_keep_alive, v),
            id::RECEIVE_MAXIMUM => set(&mut p.receive_maximum, v),
            id::TOPIC_ALIAS_MAXIMUM => set(&mut p.topic_alias_maximum, v),
            _ => set(&mut p.topic_alias, v),
        },
        Prop::Four(i, v) => match i {
            id::MESSAGE_EXPIRY_INTERVAL => set(&mut p.message_expiry_interval, v),
            id::SESSION_EXPIRY_INTERVAL => set(&mut p.session_expiry_interval, v),
            id::WILL_DELAY_INTERVAL => set(&mut p.will_delay_interval, v),
            _ => set(&mut p.maximum_packet_size, v),
        },
        Prop::Str(i, v) => apply_str(p, i, v),
        Prop::Bin(id::CORRELATION_DATA, v) => set(&mut p.correlation_data, v),
        Prop::Bin(_, v) => set(&mut p.authentication_data, v),
        Prop::SubId(v) => {
            if kind == PropKind::Publish || p.subscription_identifiers.is_empty() {
                p.subscription_identifiers.push(v);
            }
        }
        Prop::User(k, v) => p.user_properties.push((k, v)),
    }
}

/// Valid properties for `kind` in `version` (always empty for 3.x).
pub(super) fn properties(kind: PropKind, version: Version) -> BoxedStrategy<Properties> {
    if !version.is_v5() {
        return Just(Properties::default()).boxed();
    }
    vec(prop(), 0..6)
        .prop_map(move |props| {
            let mut p = Properties::default();
            for prop in props {
                apply(&mut p, kind, prop);
            }
            p
        })
        .boxed()
}

fn will(v: Version) -> impl Strategy<Value = Will> {
    (
        text(),
        binary(),
        qos(),
        any::<bool>(),
        properties(PropKind::Will, v),
    )
        .prop_map(|(topic, payload, qos, retain, properties)| Will {
            topic: Arc::from(topic),
            payload,
            qos,
            retain,
            properties,
        })
}

fn connect(v: Version) -> impl Strategy<Value = Packet> {
    (
        (any::<bool>(), any::<u16>(), text()),
        option::of(will(v)),
        option::of(text()),
        option::of(binary()),
        properties(PropKind::Connect, v),
    )
        .prop_map(
            move |((clean_start, keep_alive, client_id), will, username, password, properties)| {
                // 3.x: a password needs a user name ([MQTT-3.1.2-22]).
                let username = match (&username, &password) {
                    (None, Some(_)) if !v.is_v5() => Some("u".to_owned()),
                    _ => username,
                };
                Packet::Connect(Box::new(Connect {
                    version: v,
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties,
                }))
            },
        )
}

fn connack(v: Version) -> impl Strategy<Value = Packet> {
    let reason = if v.is_v5() {
        any::<u8>().boxed()
    } else {
        prop::sample::select(vec![0x00, 0x84, 0x85, 0x88, 0x86, 0x87]).boxed()
    };
    (any::<bool>(), reason, properties(PropKind::ConnAck, v)).prop_map(
        |(session_present, reason, properties)| {
            Packet::ConnAck(ConnAck {
                session_present,
                reason,
                properties: properties.into(),
            })
        },
    )
}

/// A valid PUBLISH for `v` with a payload of up to `max_payload` bytes.
pub(super) fn publish(v: Version, max_payload: usize) -> impl Strategy<Value = Publish> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        text(),
        1u16..,
        vec(any::<u8>(), 0..max_payload),
        properties(PropKind::Publish, v),
    )
        .prop_map(|(qos, dup, retain, topic, id, payload, properties)| {
            let qos0 = qos == QoS::AtMostOnce;
            Publish {
                dup: dup && !qos0,
                qos,
                retain,
                topic: Arc::from(topic),
                packet_id: if qos0 { 0 } else { id },
                payload: Bytes::from(payload),
                properties: properties.into(),
            }
        })
}

fn pubresp(v: Version) -> impl Strategy<Value = PubResp> {
    let reason = if v.is_v5() {
        any::<u8>().boxed()
    } else {
        Just(0).boxed()
    };
    (1u16.., reason, properties(PropKind::PubResp, v)).prop_map(
        |(packet_id, reason, properties)| PubResp {
            packet_id,
            reason,
            properties: properties.into(),
        },
    )
}

fn sub_options(v: Version) -> impl Strategy<Value = SubOptions> {
    let v5 = v.is_v5();
    (qos(), any::<bool>(), any::<bool>(), 0u8..=2).prop_map(move |(qos, nl, rap, rh)| SubOptions {
        qos,
        no_local: nl && v5,
        retain_as_published: rap && v5,
        retain_handling: if v5 { rh } else { 0 },
    })
}

fn subscribe(v: Version) -> impl Strategy<Value = Packet> {
    (
        1u16..,
        vec((text(), sub_options(v)), 1..4),
        properties(PropKind::Subscribe, v),
    )
        .prop_map(|(packet_id, filters, properties)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                filters,
                properties: properties.into(),
            })
        })
}

fn suback(v: Version) -> impl Strategy<Value = Packet> {
    let code = if v.is_v5() {
        any::<u8>().boxed()
    } else {
        prop::sample::select(vec![0u8, 1, 2, 0x80]).boxed()
    };
    (1u16.., vec(code, 1..5), properties(PropKind::SubAck, v)).prop_map(
        |(packet_id, reasons, properties)| {
            Packet::SubAck(SubAck {
                packet_id,
                reasons,
                properties: properties.into(),
            })
        },
    )
}

fn unsubscribe(v: Version) -> impl Strategy<Value = Packet> {
    (
        1u16..,
        vec(text(), 1..4),
        properties(PropKind::Unsubscribe, v),
    )
        .prop_map(|(packet_id, filters, properties)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties: properties.into(),
            })
        })
}

fn unsuback(v: Version) -> impl Strategy<Value = Packet> {
    let n = if v.is_v5() { 1..5 } else { 0..1 };
    (
        1u16..,
        vec(any::<u8>(), n),
        properties(PropKind::UnsubAck, v),
    )
        .prop_map(|(packet_id, reasons, properties)| {
            Packet::UnsubAck(UnsubAck {
                packet_id,
                reasons,
                properties: properties.into(),
            })
        })
}

fn disconnect(v: Version) -> impl Strategy<Value = Packet> {
    let reason = if v.is_v5() {
        any::<u8>().boxed()
    } else {
        Just(0).boxed()
    };
    (reason, properties(PropKind::Disconnect, v)).prop_map(|(reason, properties)| {
        Packet::Disconnect(Disconnect {
            reason,
            properties: properties.into(),
        })
    })
}

fn auth() -> impl Strategy<Value = Packet> {
    (any::<u8>(), properties(PropKind::Auth, Version::V5)).prop_map(|(reason, properties)| {
        Packet::Auth(Auth {
            reason,
            properties: properties.into(),
        })
    })
}

/// Any valid packet for `v`.
pub(super) fn packet(v: Version) -> BoxedStrategy<Packet> {
    let common = prop_oneof![
        connect(v),
        connack(v),
        publish(v, 64).prop_map(Packet::Publish),
        pubresp(v).prop_map(Packet::PubAck),
        pubresp(v).prop_map(Packet::PubRec),
        pubresp(v).prop_map(Packet::PubRel),
        pubresp(v).prop_map(Packet::PubComp),
        subscribe(v),
        suback(v),
        unsubscribe(v),
        unsuback(v),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        disconnect(v),
    ];
    if v.is_v5() {
        prop_oneof![14 => common, 1 => auth()].boxed()
    } else {
        common.boxed()
    }
}

/// A version and a valid packet for it.
pub(super) fn versioned_packet() -> impl Strategy<Value = (Version, Packet)> {
    version().prop_flat_map(|v| (Just(v), packet(v)))
}
