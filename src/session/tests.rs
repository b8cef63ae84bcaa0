//! Session tests on a virtual clock: every timeout is driven by passing
//! `now`, nothing sleeps.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::codec::{reason, BoxedProperties, Connect, Disconnect, Properties, PubResp, Publish};

const S: Duration = Duration::from_secs(1);

fn limits() -> Rc<SessionLimits> {
    Rc::new(SessionLimits::default())
}

fn connect(version: Version, clean: bool, keep_alive: u16, expiry: Option<u32>) -> Connect {
    Connect {
        version,
        clean_start: clean,
        keep_alive,
        client_id: "c".into(),
        will: None,
        username: None,
        password: None,
        properties: Properties {
            session_expiry_interval: expiry,
            ..Properties::default()
        },
    }
}

fn will(delay: Option<u32>) -> Will {
    Will {
        topic: "will/t".into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties {
            will_delay_interval: delay,
            ..Properties::default()
        },
    }
}

fn message(qos: QoS, expires_at: Option<Instant>) -> Arc<Message> {
    Arc::new(Message {
        topic: "a/b".into(),
        payload: Bytes::from_static(b"x"),
        qos,
        retain: false,
        properties: Default::default(),
        expires_at,
        publisher: None,
        id: 0,
        late: false,
    })
}

fn delivery(qos: QoS) -> Delivery {
    Delivery {
        qos,
        retain: false,
        subscription_ids: SubIds::new(),
        stored: None,
    }
}

fn session(t0: Instant) -> Session {
    Session::new("c".into(), limits(), t0)
}

fn drain(s: &mut Session) -> (Vec<Packet>, Vec<Action>) {
    let mut p = Vec::new();
    while let Some(x) = s.poll_transmit() {
        p.push(x);
    }
    let mut a = Vec::new();
    while let Some(x) = s.poll_action() {
        a.push(x);
    }
    (p, a)
}

fn will_published(actions: &[Action]) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::Publish { message, .. } if &*message.topic == "will/t"))
}

fn publishes(packets: &[Packet]) -> Vec<&Publish> {
    packets
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(p),
            _ => None,
        })
        .collect()
}

#[test]
fn connack_advertises_limits_for_v5() {
    let t0 = Instant::now();
    let mut s = session(t0);
    s.connect(
        t0,
        connect(Version::V5, true, 30, None),
        false,
        Some("auto-1"),
    );
    let (p, _) = drain(&mut s);
    let Packet::ConnAck(ack) = &p[0] else {
        panic!("{p:?}")
    };
    assert_eq!(ack.reason, 0);
    assert_eq!(ack.properties.receive_maximum, Some(128));
    assert_eq!(
        ack.properties.assigned_client_identifier.as_deref(),
        Some("auto-1")
    );
    assert_eq!(ack.properties.shared_subscription_available, Some(1));
}

#[test]
fn keepalive_expires_at_one_and_a_half_times_and_publishes_will() {
    let t0 = Instant::now();
    let mut s = session(t0);
    let mut c = connect(Version::V5, true, 10, None);
    c.will = Some(will(None));
    s.connect(t0, c, false, None);
    drain(&mut s);
    assert_eq!(s.next_timeout(), Some(t0 + 15 * S));
    s.handle_timeout(t0 + 14 * S);
    assert!(s.is_connected());
    s.handle_packet(t0 + 14 * S, Packet::PingReq);
    assert_eq!(drain(&mut s).0, vec![Packet::PingResp]);
    s.handle_timeout(t0 + 28 * S);
    assert!(
        s.is_connected(),
        "the PINGREQ at 14 s moved the deadline to 29 s"
    );
    s.handle_timeout(t0 + 29 * S);
    assert!(!s.is_connected());
    let (p, a) = drain(&mut s);
    assert!(matches!(&p[..], [Packet::Disconnect(d)] if d.reason == reason::KEEP_ALIVE_TIMEOUT));
    assert!(will_published(&a));
    assert!(a.contains(&Action::Close));
    assert!(
        a.contains(&Action::End),
        "session expiry 0 ends the session"
    );
}

#[test]
fn silence_the_broker_did_not_read_does_not_count_against_the_keepalive() {
    let t0 = Instant::now();
    let mut s = session(t0);
    s.connect(t0, connect(Version::V5, true, 10, None), false, None);
    drain(&mut s);
    // Due at 15 s; the shard had stopped reading until then.
    s.excuse_silence(t0 + 15 * S);
    s.handle_timeout(t0 + 15 * S);
    assert!(s.is_connected());
    assert_eq!(s.next_timeout(), Some(t0 + 30 * S));
    s.handle_timeout(t0 + 30 * S);
    assert!(!s.is_connected(), "then the client's own silence counts");
}

#[test]
fn server_keep_alive_caps_v5_clients() {
    let t0 = Instant::now();
    let mut s = session(t0);
    s.connect(t0, connect(Version::V5, true, 0, None), false, None);
    let (p, _) = drain(&mut s);
    let Packet::ConnAck(ack) = &p[0] else {
        panic!()
    };
    assert_eq!(ack.properties.server_keep_alive, Some(3600));
    assert_eq!(s.next_timeout(), Some(t0 + 5400 * S));
}

#[test]
fn will_delay_publishes_after_the_delay() {
    let t0 = Instant::now();
    let mut s = session(t0);
    let mut c = connect(Version::V5, true, 0, Some(100));
    c.will = Some(will(Some(5)));
    s.connect(t0, c, false, None);
    drain(&mut s);
    s.connection_lost(t0, s.generation());
    let (_, a) = drain(&mut s);
    assert!(!will_published(&a));
    assert_eq!(s.next_timeout(), Some(t0 + 5 * S));
    s.handle_timeout(t0 + 4 * S);
    assert!(!will_published(&drain(&mut s).1));
    s.handle_timeout(t0 + 5 * S);
    assert!(will_published(&drain(&mut s).1));
    assert!(!s.is_ended());
}

#[test]
fn will_delay_is_cut_short_by_session_end() {
    let t0 = Instant::now();
    let mut s = session(t0);
    let mut c = connect(Version::V5, true, 0, Some(5));
    c.will = Some(will(Some(100)));
    s.connect(t0, c, false, None);
    drain(&mut s);
    s.connection_lost(t0, s.generation());
    drain(&mut s);
    s.handle_timeout(t0 + 5 * S);
    let (_, a) = drain(&mut s);
    assert!(will_published(&a));
    assert!(a.contains(&Action::End));
}

#[test]
fn reconnect_within_will_delay_cancels_the_will() {
    let t0 = Instant::now();
    let mut s = session(t0);
    let mut c = connect(Version::V5, false, 0, Some(100));
    c.will = Some(will(Some(10)));
    s.connect(t0, c, false, None);
    drain(&mut s);
    s.connection_lost(t0 + S, s.generation());
    drain(&mut s);
    s.connect(
        t0 + 3 * S,
        connect(Version::V5, false, 0, Some(100)),
        true,
        None,
    );
    s.handle_timeout(t0 + 60 * S);
    assert!(!will_published(&drain(&mut s).1));
}

#[test]
fn normal_disconnect_drops_the_will_and_other_reasons_send_it() {
    for (code, sent) in [
        (reason::SUCCESS, false),
        (reason::DISCONNECT_WITH_WILL, true),
        (reason::UNSPECIFIED_ERROR, true),
        (reason::PROTOCOL_ERROR, true),
    ] {
        let t0 = Instant::now();
        let mut s = session(t0);
        let mut c = connect(Version::V5, true, 0, None);
        c.will = Some(will(None));
        s.connect(t0, c, false, None);
        drain(&mut s);
        let d = Disconnect {
            reason: code,
            properties: BoxedProperties::default(),
        };
        s.handle_packet(t0, Packet::Disconnect(d));
        assert_eq!(will_published(&drain(&mut s).1), sent, "reason {code:#x}");
    }
}

#[test]
fn a_will_that_goes_at_once_is_published_before_the_close() {
    // The shard logs the will's Accepted record (the will is gone) as it
    // routes the Publish, and the Offline record (no will waits) at the
    // Close: in this order, a power cut between the two still leaves the
    // will in the log.
    let t0 = Instant::now();
    let mut s = session(t0);
    let mut c = connect(Version::V5, false, 0, Some(60));
    c.will = Some(will(None));
    s.connect(t0, c, false, None);
    drain(&mut s);
    s.connection_lost(t0 + S, s.generation());
    let actions = drain(&mut s).1;
    let publish = actions
        .iter()
        .position(|a| matches!(a, Action::Publish { will: true, .. }));
    let close = actions.iter().position(|a| *a == Action::Close);
    assert!(publish.is_some() && close.is_some(), "{actions:?}");
    assert!(publish < close, "{actions:?}");
}

#[test]
fn session_expiry_ends_an_offline_session() {
    let t0 = Instant::now();
    let mut s = session(t0);
    s.connect(t0, connect(Version::V5, false, 0, Some(10)), false, None);
    drain(&mut s);
    s.connection_lost(t0 + S, s.generation());
    assert!(!drain(&mut s).1.contains(&Action::End));
    s.handle_timeout(t0 + 10 * S);
    assert!(!s.is_ended());
    s.handle_timeout(t0 + 11 * S);
    assert!(s.is_ended());
    assert!(drain(&mut s).1.contains(&Action::End));
}

#[test]
fn v311_persistent_session_never_expires_and_clean_one_ends_at_once() {
    let t0 = Instant::now();
    let mut s = session(t0);
    s.connect(t0, connect(Version::V3_1_1, false, 0, None), false, None);
    s.connection_lost(t0, s.generation());
    assert_eq!(s.next_timeout(), None);
    let mut s = session(t0);
    s.connect(t0, connect(Version::V3_1_1, true, 0, None), false, None);
    s.connection_lost(t0, s.generation());
    assert!(s.is_ended());
}

#[test]
fn disconnect_may_not_raise_a_zero_session_expiry() {
    let t0 = Instant::now();
    let mut s = session(t0);
    s.connect(t0, connect(Version::V5, true, 0, None), false, None);
    drain(&mut s);
    let d = Disconnect {
        reason: 0,
        properties: Properties {
            session_expiry_interval: Some(30),
            ..Properties::default()
        }
        .into(),
    };
    s.handle_packet(t0, Packet::Disconnect(d));
    let (p, _) = drain(&mut s);
    assert!(matches!(&p[..], [Packet::Disconnect(d)] if d.reason == reason::PROTOCOL_ERROR));
}

#[test]
fn expired_messages_are_dropped_and_live_ones_carry_the_remaining_interval() {
    let t0 = Instant::now();
    let mut s = session(t0);
    s.connect(t0, connect(Version::V5, false, 0, Some(1000)), false, None);
    s.connection_lost(t0, s.generation());
    drain(&mut s);
    s.deliver(
        t0,
        &message(QoS::AtLeastOnce, Some(t0 + 5 * S)),
        delivery(QoS::AtLeastOnce),
    );
    s.deliver(
        t0,
        &message(QoS::AtLeastOnce, Some(t0 + 60 * S)),
        delivery(QoS::AtLeastOnce),
    );
    assert_eq!(s.queued_len(), 2);
    s.connect(
        t0 + 20 * S,
        connect(Version::V5, false, 0, Some(1000)),
        true,
        None,
    );
    let (p, _) = drain(&mut s);
    let pubs = publishes(&p);
    assert_eq!(pubs.len(), 1);
    assert_eq!(pubs[0].properties.message_expiry_interval, Some(40));
    assert_eq!(s.stats().dropped_expired, 1);
}

#[test]
fn unacknowledged_messages_are_redelivered_with_dup_on_resume() {
    let t0 = Instant::now();
    let mut s = session(t0);
    s.connect(t0, connect(Version::V3_1_1, false, 0, None), false, None);
    drain(&mut s);
    s.deliver(
        t0,
        &message(QoS::AtLeastOnce, None),
        delivery(QoS::AtLeastOnce),
    );
    s.deliver(
        t0,
        &message(QoS::ExactlyOnce, None),
        delivery(QoS::ExactlyOnce),
    );
    let (p, _) = drain(&mut s);
    let ids: Vec<u16> = publishes(&p).iter().map(|p| p.packet_id).collect();
    assert_eq!(ids, vec![1, 2]);
    s.handle_packet(
        t0,
        Packet::PubRec(PubResp {
            packet_id: 2,
            ..PubResp::default()
        }),
    );
    assert!(matches!(&drain(&mut s).0[..], [Packet::PubRel(r)] if r.packet_id == 2));
    s.connection_lost(t0, s.generation());
    s.connect(t0 + S, connect(Version::V3_1_1, false, 0, None), true, None);
    let (p, _) = drain(&mut s);
    assert!(matches!(&p[0], Packet::ConnAck(a) if a.session_present));
    assert!(matches!(&p[1], Packet::Publish(x) if x.dup && x.packet_id == 1));
    assert!(
        matches!(&p[2], Packet::PubRel(r) if r.packet_id == 2),
        "{p:?}"
    );
    s.handle_packet(
        t0,
        Packet::PubAck(PubResp {
            packet_id: 1,
            ..PubResp::default()
        }),
    );
    s.handle_packet(
        t0,
        Packet::PubComp(PubResp {
            packet_id: 2,
            ..PubResp::default()
        }),
    );
    assert_eq!(s.inflight_len(), 0);
}

#[test]
fn the_window_follows_the_clients_receive_maximum() {
    let t0 = Instant::now();
    let mut s = session(t0);
    let mut c = connect(Version::V5, true, 0, None);
    c.properties.receive_maximum = Some(2);
    s.connect(t0, c, false, None);
    drain(&mut s);
    for _ in 0..3 {
        s.deliver(
            t0,
            &message(QoS::AtLeastOnce, None),
            delivery(QoS::AtLeastOnce),
        );
    }
    assert_eq!(publishes(&drain(&mut s).0).len(), 2);
    assert_eq!(s.queued_len(), 1);
    s.handle_packet(
        t0,
        Packet::PubAck(PubResp {
            packet_id: 1,
            ..PubResp::default()
        }),
    );
    let (p, _) = drain(&mut s);
    assert_eq!(publishes(&p)[0].packet_id, 3);
}

#[test]
fn delivery_qos_is_the_lower_of_publish_and_granted() {
    let t0 = Instant::now();
    let mut s = session(t0);
    s.connect(t0, connect(Version::V3_1_1, true, 0, None), false, None);
    drain(&mut s);
    s.deliver(
        t0,
        &message(QoS::ExactlyOnce, None),
        delivery(QoS::AtLeastOnce),
    );
    s.deliver(
        t0,
        &message(QoS::AtMostOnce, None),
        delivery(QoS::ExactlyOnce),
    );
    let (p, _) = drain(&mut s);
    let qos: Vec<QoS> = publishes(&p).iter().map(|p| p.qos).collect();
    assert_eq!(qos, vec![QoS::AtLeastOnce, QoS::AtMostOnce]);
}

#[test]
fn inbound_qos2_is_routed_once() {
    let t0 = Instant::now();
    let mut s = session(t0);
    s.connect(t0, connect(Version::V5, true, 0, None), false, None);
    drain(&mut s);
    let p = Publish {
        dup: false,
        qos: QoS::ExactlyOnce,
        retain: false,
        topic: "t".into(),
        packet_id: 9,
        payload: Bytes::new(),
        properties: BoxedProperties::default(),
    };
    s.handle_packet(t0, Packet::Publish(p.clone()));
    // The shard routes (and logs) it, then gives its verdict.
    let Some(Action::Publish { packet_id, .. }) = s.poll_action() else {
        panic!("a publish action")
    };
    assert_eq!(packet_id, Some(9));
    s.publish_done(t0, QoS::ExactlyOnce, 9, true);
    s.handle_packet(t0, Packet::Publish(Publish { dup: true, ..p }));
    let (out, actions) = drain(&mut s);
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Publish { .. })),
        "a duplicate is not routed again"
    );
    assert_eq!(
        out.iter()
            .filter(|p| matches!(p, Packet::PubRec(_)))
            .count(),
        2
    );
    s.handle_packet(
        t0,
        Packet::PubRel(PubResp {
            packet_id: 9,
            ..PubResp::default()
        }),
    );
    s.handle_packet(
        t0,
        Packet::PubRel(PubResp {
            packet_id: 9,
            ..PubResp::default()
        }),
    );
    let (out, _) = drain(&mut s);
    let reasons: Vec<u8> = out
        .iter()
        .filter_map(|p| match p {
            Packet::PubComp(c) => Some(c.reason),
            _ => None,
        })
        .collect();
    assert_eq!(reasons, vec![0, reason::PACKET_IDENTIFIER_NOT_FOUND]);
}

#[test]
fn outbound_topic_aliases_are_assigned_then_reused() {
    let t0 = Instant::now();
    let mut s = session(t0);
    let mut c = connect(Version::V5, true, 0, None);
    c.properties.topic_alias_maximum = Some(1);
    s.connect(t0, c, false, None);
    drain(&mut s);
    for _ in 0..2 {
        s.deliver(
            t0,
            &message(QoS::AtMostOnce, None),
            delivery(QoS::AtMostOnce),
        );
    }
    let (p, _) = drain(&mut s);
    let pubs = publishes(&p);
    assert_eq!(
        (&*pubs[0].topic, pubs[0].properties.topic_alias),
        ("a/b", Some(1))
    );
    assert_eq!(
        (&*pubs[1].topic, pubs[1].properties.topic_alias),
        ("", Some(1))
    );
}

#[test]
fn messages_over_the_clients_maximum_packet_size_are_dropped() {
    let t0 = Instant::now();
    let mut s = session(t0);
    let mut c = connect(Version::V5, true, 0, None);
    c.properties.maximum_packet_size = Some(20);
    s.connect(t0, c, false, None);
    drain(&mut s);
    let big = Arc::new(Message {
        payload: Bytes::from(vec![0u8; 100]),
        ..(*message(QoS::AtLeastOnce, None)).clone()
    });
    s.deliver(t0, &big, delivery(QoS::AtLeastOnce));
    s.deliver(
        t0,
        &message(QoS::AtLeastOnce, None),
        delivery(QoS::AtLeastOnce),
    );
    let (p, _) = drain(&mut s);
    assert_eq!(publishes(&p).len(), 1);
    assert_eq!(s.stats().dropped_too_large, 1);
    assert_eq!(s.inflight_len(), 1);
}

#[test]
fn a_full_queue_drops_new_or_oldest_and_counts() {
    for (policy, first_kept) in [
        (OverflowPolicy::DropNew, 0u8),
        (OverflowPolicy::DropOldest, 2u8),
    ] {
        let t0 = Instant::now();
        let limits = SessionLimits {
            queue_messages_max: 3,
            overflow: policy,
            ..SessionLimits::default()
        };
        let mut s = offline_session(t0, limits);
        for i in 0..5u8 {
            let m = Arc::new(Message {
                payload: Bytes::from(vec![i]),
                ..(*message(QoS::AtLeastOnce, None)).clone()
            });
            s.deliver(t0, &m, delivery(QoS::AtLeastOnce));
        }
        assert_eq!(s.queued_len(), 3);
        assert_eq!(s.stats().dropped_queue_full, 2);
        s.connect(t0, connect(Version::V3_1_1, false, 0, None), true, None);
        let (p, _) = drain(&mut s);
        assert_eq!(publishes(&p)[0].payload[0], first_kept, "{policy:?}");
        s.check_invariants();
    }
}

#[test]
fn offline_qos0_is_dropped_by_default() {
    let t0 = Instant::now();
    let mut s = session(t0);
    s.connect(t0, connect(Version::V3_1_1, false, 0, None), false, None);
    s.connection_lost(t0, s.generation());
    s.deliver(
        t0,
        &message(QoS::AtMostOnce, None),
        delivery(QoS::AtMostOnce),
    );
    assert_eq!(s.queued_len(), 0);
    assert_eq!(s.stats().dropped_offline_qos0, 1);
}

#[test]
fn takeover_sends_0x8e_and_keeps_the_session() {
    let t0 = Instant::now();
    let mut s = session(t0);
    s.connect(t0, connect(Version::V5, false, 0, Some(60)), false, None);
    drain(&mut s);
    s.takeover(t0);
    let (p, a) = drain(&mut s);
    assert!(matches!(&p[..], [Packet::Disconnect(d)] if d.reason == reason::SESSION_TAKEN_OVER));
    assert_eq!(a, vec![Action::Close]);
    assert!(!s.is_ended());
}

#[test]
fn second_connect_is_a_protocol_error() {
    let t0 = Instant::now();
    let mut s = session(t0);
    s.connect(t0, connect(Version::V5, true, 0, None), false, None);
    drain(&mut s);
    s.handle_packet(
        t0,
        Packet::Connect(Box::new(connect(Version::V5, true, 0, None))),
    );
    let (p, _) = drain(&mut s);
    assert!(matches!(&p[..], [Packet::Disconnect(d)] if d.reason == reason::PROTOCOL_ERROR));
}

#[test]
fn live_messages_wait_behind_a_retained_gather() {
    let t0 = Instant::now();
    let mut s = session(t0);
    s.connect(t0, connect(Version::V3_1_1, true, 0, None), false, None);
    drain(&mut s);
    s.begin_retained_gather();
    let live = Arc::new(Message {
        payload: Bytes::from_static(b"live"),
        ..(*message(QoS::AtMostOnce, None)).clone()
    });
    s.deliver(t0, &live, delivery(QoS::AtMostOnce));
    assert!(!s.has_transmit(), "held until the retained messages arrive");
    let retained = Delivery {
        retain: true,
        ..delivery(QoS::AtMostOnce)
    };
    s.deliver_retained(t0, &message(QoS::AtMostOnce, None), retained.clone());
    s.end_retained_gather(t0);
    let (p, _) = drain(&mut s);
    let pubs = publishes(&p);
    assert_eq!((pubs[0].retain, &pubs[0].payload[..]), (true, &b"x"[..]));
    assert_eq!(
        (pubs[1].retain, &pubs[1].payload[..]),
        (false, &b"live"[..])
    );
}

#[test]
fn fan_out_shares_one_payload_buffer() {
    let t0 = Instant::now();
    let m = message(QoS::AtMostOnce, None);
    let mut payloads = Vec::new();
    for _ in 0..3 {
        let mut s = session(t0);
        s.connect(t0, connect(Version::V5, true, 0, None), false, None);
        drain(&mut s);
        s.deliver(t0, &m, delivery(QoS::AtMostOnce));
        let (p, _) = drain(&mut s);
        payloads.push(publishes(&p)[0].payload.as_ptr());
    }
    assert!(
        payloads.iter().all(|&p| p == m.payload.as_ptr()),
        "every delivery points at the message's one buffer"
    );
}

#[test]
fn shutdown_publishes_the_will() {
    let t0 = Instant::now();
    let mut s = session(t0);
    let mut c = connect(Version::V5, true, 0, None);
    c.will = Some(will(None));
    s.connect(t0, c, false, None);
    drain(&mut s);
    s.shutdown(t0);
    let (p, a) = drain(&mut s);
    assert!(matches!(&p[..], [Packet::Disconnect(d)] if d.reason == reason::SERVER_SHUTTING_DOWN));
    assert!(will_published(&a));
}

#[test]
fn a_publish_the_shard_cannot_store_is_refused() {
    let t0 = Instant::now();
    for version in [Version::V5, Version::V3_1_1] {
        let mut s = session(t0);
        s.connect(t0, connect(version, true, 0, None), false, None);
        drain(&mut s);
        let p = Publish {
            dup: false,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: "t".into(),
            packet_id: 4,
            payload: Bytes::new(),
            properties: BoxedProperties::default(),
        };
        s.handle_packet(t0, Packet::Publish(p.clone()));
        assert!(matches!(s.poll_action(), Some(Action::Publish { .. })));
        s.publish_done(t0, QoS::ExactlyOnce, 4, false);
        let (out, actions) = drain(&mut s);
        if version.is_v5() {
            assert!(
                matches!(&out[..], [Packet::PubRec(r)] if r.reason == reason::QUOTA_EXCEEDED),
                "{out:?}"
            );
            // The id is forgotten: the same PUBLISH sent again is new.
            s.handle_packet(t0, Packet::Publish(p));
            assert!(matches!(s.poll_action(), Some(Action::Publish { .. })));
        } else {
            assert!(out.is_empty(), "3.x has no refusal code: {out:?}");
            assert!(actions.contains(&Action::Close), "3.x is closed");
        }
    }
}

/// A message whose payload is `i` (big-endian, 4 bytes).
fn numbered(i: u32) -> Arc<Message> {
    Arc::new(Message {
        payload: Bytes::copy_from_slice(&i.to_be_bytes()),
        ..(*message(QoS::AtLeastOnce, None)).clone()
    })
}

fn stored(id: u64) -> Delivery {
    Delivery {
        stored: Some(id),
        ..delivery(QoS::AtLeastOnce)
    }
}

/// A persistent 3.1.1 session that pages out past 4 messages in memory and
/// holds `log_bytes` in all, now offline.
fn paging_session(t0: Instant, log_bytes: usize, policy: OverflowPolicy) -> Session {
    let limits = SessionLimits {
        queue_messages_max: 4,
        queue_log_bytes_max: log_bytes,
        inflight_max: 2,
        overflow: policy,
        ..SessionLimits::default()
    };
    offline_session(t0, limits)
}

/// A persistent 3.1.1 session with `limits` that connected once and is
/// offline now.
fn offline_session(t0: Instant, limits: SessionLimits) -> Session {
    let mut s = Session::new("c".into(), Rc::new(limits), t0);
    s.connect(t0, connect(Version::V3_1_1, false, 0, None), false, None);
    s.connection_lost(t0, s.generation());
    drain(&mut s);
    s
}

fn payload_ids(p: &[Packet]) -> Vec<u32> {
    publishes(p)
        .iter()
        .map(|x| u32::from_be_bytes(x.payload[..4].try_into().unwrap()))
        .collect()
}

fn ack_all(s: &mut Session, t0: Instant, p: &[Packet]) {
    for x in publishes(p) {
        let ack = PubResp {
            packet_id: x.packet_id,
            reason: 0,
            properties: BoxedProperties::default(),
        };
        s.handle_packet(t0, Packet::PubAck(ack));
    }
}

#[test]
fn stored_deliveries_past_the_memory_limits_page_out_and_come_back_in_order() {
    let t0 = Instant::now();
    let cost = numbered(0).cost_bytes();
    let each = cost + QUEUE_ENTRY_INDEX_BYTES;
    let mut s = paging_session(t0, 100 * each, OverflowPolicy::DropNew);
    for i in 0..20 {
        s.deliver(t0, &numbered(i), stored(u64::from(i)));
    }
    assert_eq!(s.queued_len(), 20, "nothing dropped");
    assert_eq!(s.out.paged, 16, "only 4 in memory");
    s.check_invariants();
    assert!(!s.wants_page_in(), "offline: nothing to read back for");
    s.connect(t0, connect(Version::V3_1_1, false, 0, None), true, None);
    let mut got = Vec::new();
    let mut loads = Vec::new();
    for _ in 0..40 {
        if s.wants_page_in() {
            s.page_in(t0, |id| {
                loads.push(id);
                Ok(numbered(id as u32))
            });
        }
        s.check_invariants();
        let (p, _) = drain(&mut s);
        got.extend(payload_ids(&p));
        ack_all(&mut s, t0, &p);
        if got.len() == 20 {
            break;
        }
    }
    assert_eq!(got, (0..20).collect::<Vec<_>>());
    assert_eq!(loads, (4..20).collect::<Vec<_>>(), "each read back once");
    assert_eq!(s.queued_len() + s.inflight_len(), 0);
    assert_eq!(s.stats().dropped_queue_full, 0);
}

#[test]
fn the_log_budget_bounds_the_whole_queue_and_each_drop_is_counted() {
    let t0 = Instant::now();
    let cost = numbered(0).cost_bytes();
    for (policy, first) in [
        (OverflowPolicy::DropNew, 0),
        (OverflowPolicy::DropOldest, 4),
    ] {
        let each = cost + QUEUE_ENTRY_INDEX_BYTES;
        let mut s = paging_session(t0, 10 * each, policy);
        for i in 0..14 {
            s.deliver(t0, &numbered(i), stored(u64::from(i)));
        }
        assert_eq!(s.queued_len(), 10, "{policy:?}");
        assert_eq!(s.stats().dropped_queue_full, 4);
        let mut done = Vec::new();
        while let Some(j) = s.poll_journal() {
            if let Journal::Done { id } = j {
                done.push(id);
            }
        }
        let want: Vec<u64> = match policy {
            OverflowPolicy::DropNew => (10..14).collect(),
            OverflowPolicy::DropOldest => (0..4).collect(),
        };
        assert_eq!(done, want, "drops are journaled as done");
        s.connect(t0, connect(Version::V3_1_1, false, 0, None), true, None);
        s.page_in(t0, |id| Ok(numbered(id as u32)));
        let (p, _) = drain(&mut s);
        assert_eq!(payload_ids(&p)[0], first, "{policy:?}");
        s.check_invariants();
    }
}

#[test]
fn what_cannot_page_out_never_jumps_the_paged_queue() {
    let t0 = Instant::now();
    let limits = SessionLimits {
        queue_qos0_offline: true,
        ..(*paging_session(t0, 1 << 20, OverflowPolicy::DropOldest).limits).clone()
    };
    let mut s = offline_session(t0, limits);
    for i in 0..6 {
        s.deliver(t0, &numbered(i), stored(u64::from(i)));
    }
    // Not stored (QoS 0): nowhere to wait behind the paged ones.
    s.deliver(t0, &numbered(99), delivery(QoS::AtMostOnce));
    assert_eq!(
        s.queued_len(),
        6,
        "dropped, not queued, and nothing older dropped for it"
    );
    assert_eq!(s.stats().dropped_queue_full, 1);
    s.check_invariants();
}

#[test]
fn a_message_the_log_cannot_give_back_is_counted_lost_and_the_rest_go_on() {
    let t0 = Instant::now();
    let mut s = paging_session(t0, 1 << 20, OverflowPolicy::DropNew);
    for i in 0..8 {
        s.deliver(t0, &numbered(i), stored(u64::from(i)));
    }
    while s.poll_journal().is_some() {}
    s.connect(t0, connect(Version::V3_1_1, false, 0, None), true, None);
    let mut got = Vec::new();
    for _ in 0..20 {
        s.page_in(t0, |id| {
            if id == 5 {
                Err("checksum mismatch".into())
            } else {
                Ok(numbered(id as u32))
            }
        });
        let (p, _) = drain(&mut s);
        got.extend(payload_ids(&p));
        ack_all(&mut s, t0, &p);
    }
    assert_eq!(got, vec![0, 1, 2, 3, 4, 6, 7]);
    assert_eq!(s.stats().lost_unreadable, 1);
    let done: Vec<u64> = std::iter::from_fn(|| s.poll_journal())
        .filter_map(|j| match j {
            Journal::Done { id } => Some(id),
            _ => None,
        })
        .collect();
    assert!(done.contains(&5), "the lost one is done with: {done:?}");
    s.check_invariants();
}

#[test]
fn a_restored_queue_keeps_only_the_memory_limits_in_memory() {
    let t0 = Instant::now();
    let limits = paging_session(t0, 1 << 20, OverflowPolicy::DropNew)
        .limits
        .clone();
    let restored = Restored {
        expiry_s: u32::MAX,
        offline_since: t0,
        subscriptions: Vec::new(),
        qos2_in: Vec::new(),
        pending_will: None,
        inflight: Vec::new(),
        queue: (0..10)
            .map(|i| (numbered(i), stored(u64::from(i))))
            .collect(),
    };
    let s = Session::restore("c".into(), limits, restored);
    assert_eq!(s.queued_len(), 10);
    assert_eq!(s.out.paged, 6);
    s.check_invariants();
}

#[test]
fn live_messages_past_the_held_limit_during_a_gather_are_queued_in_order_not_dropped() {
    let t0 = Instant::now();
    let mut s = paging_session(t0, 1 << 20, OverflowPolicy::DropNew);
    s.begin_retained_gather();
    for i in 0..10 {
        s.deliver(t0, &numbered(i), stored(u64::from(i)));
    }
    s.deliver_retained(t0, &numbered(100), stored(100));
    s.check_invariants();
    assert_eq!(s.stats().dropped_queue_full, 0);
    s.end_retained_gather(t0);
    s.deliver(t0, &numbered(10), stored(10));
    s.connect(t0, connect(Version::V3_1_1, false, 0, None), true, None);
    let mut got = Vec::new();
    for _ in 0..20 {
        s.page_in(t0, |id| Ok(numbered(id as u32)));
        let (p, _) = drain(&mut s);
        got.extend(payload_ids(&p));
        ack_all(&mut s, t0, &p);
    }
    // The 4 held ones, then the rest of the live ones in order; the
    // retained message came after the held limit was passed.
    assert_eq!(got, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 100, 10]);
    s.check_invariants();
}

/// Found by the simulator (seed 42): a retained QoS 0 message was dropped
/// because its chunk arrived while earlier ones still waited for the
/// socket. The credit now leaves room in the transmit backlog too.
#[test]
fn retained_credit_stops_at_the_transmit_backlog_qos0_deliveries_would_be_dropped_past() {
    let t0 = Instant::now();
    let mut s = paging_session(t0, 1 << 20, OverflowPolicy::DropNew);
    s.connect(t0, connect(Version::V3_1_1, false, 0, None), true, None);
    drain(&mut s);
    // Paging, but no more than the backlog takes: 4 while nothing waits.
    assert_eq!(s.retained_credit(256, true), 4);
    // Not paging (a clean session): the queue's room, here 4 as well.
    assert_eq!(s.retained_credit(256, false), 4);
    s.begin_retained_gather();
    for i in 0..3 {
        let qos0 = Delivery {
            retain: true,
            ..delivery(QoS::AtMostOnce)
        };
        s.deliver_retained(t0, &numbered(i), qos0);
    }
    // Three packets wait for the writer; the limit is 4 messages.
    assert_eq!(s.retained_credit(256, true), 1);
    s.deliver_retained(t0, &numbered(3), delivery(QoS::AtMostOnce));
    assert_eq!(s.retained_credit(256, true), 0, "the backlog is full");
    assert_eq!(s.stats().dropped_queue_full, 0);
    let (p, _) = drain(&mut s);
    assert_eq!(payload_ids(&p), vec![0, 1, 2, 3]);
    assert_eq!(s.retained_credit(256, true), 4, "written: room again");
    s.end_retained_gather(t0);
    s.check_invariants();
}

/// Found by the simulator (seed 160 of its version with the log-filling
/// seeds): a clean session on a broker with a log was granted a whole
/// chunk on the log's budget, though its deliveries cannot page out, and
/// dropped what its queue did not take.
#[test]
fn retained_credit_counts_the_log_only_for_sessions_whose_deliveries_page_out() {
    let t0 = Instant::now();
    let limits = SessionLimits {
        queue_messages_max: 1000,
        queue_log_bytes_max: 64 << 20,
        inflight_max: 2,
        ..SessionLimits::default()
    };
    let mut s = Session::new("c".into(), Rc::new(limits), t0);
    s.connect(t0, connect(Version::V5, true, 0, None), false, None);
    drain(&mut s);
    for i in 0..998 {
        s.deliver(t0, &numbered(i), delivery(QoS::AtLeastOnce));
    }
    // 2 in flight (waiting for the writer), 996 queued: room for 4.
    assert_eq!(s.retained_credit(256, false), 4);
    assert_eq!(s.retained_credit(256, true), 256);
}

fn with_id(qos: QoS, id: u64) -> Arc<Message> {
    Arc::new(Message {
        id,
        ..(*message(qos, None)).clone()
    })
}

/// How many of `ids` (of origin 1) reach a connected session that took
/// `marks` of origin 1 (ranges, in order) for `a/#`, `whole` or not,
/// each delivered at `qos`.
fn reaching(marks: &[(u64, u64)], whole: bool, qos: QoS, ids: &[u64]) -> usize {
    let t0 = Instant::now();
    let mut s = session(t0);
    s.connect(t0, connect(Version::V5, false, 0, Some(60)), false, None);
    for &(low, high) in marks {
        let m = crate::cluster::frame::OriginMark {
            origin: 1,
            low: 1 << 32 | low,
            high: 1 << 32 | high,
        };
        s.take_marks(&[m], vec!["a/#".to_string()], whole);
    }
    drain(&mut s);
    for &id in ids {
        s.deliver(t0, &with_id(qos, 1 << 32 | id), delivery(qos));
    }
    let (packets, _) = drain(&mut s);
    publishes(&packets).len()
}

#[test]
fn a_move_given_up_skips_only_qos_2_copies_within_the_offers_marks() {
    // The copy there lives on (or died with its node): at QoS 1 a copy
    // here may be the only one left.
    assert_eq!(reaching(&[(1, 9)], false, QoS::AtLeastOnce, &[5, 6]), 2);
    assert_eq!(reaching(&[(1, 9)], false, QoS::ExactlyOnce, &[5, 6]), 0);
    assert_eq!(reaching(&[(1, 9)], false, QoS::ExactlyOnce, &[10]), 1);
    // A whole move: the session had them there, at every QoS.
    assert_eq!(reaching(&[(1, 9)], true, QoS::AtLeastOnce, &[5, 6]), 0);
}

#[test]
fn two_copies_ranges_merge_only_when_they_overlap() {
    // Apart: the ids between reached neither copy; the later range stays.
    assert_eq!(
        reaching(&[(10, 20), (30, 40)], true, QoS::AtLeastOnce, &[15]),
        1
    );
    assert_eq!(
        reaching(&[(10, 20), (30, 40)], true, QoS::AtLeastOnce, &[35]),
        0
    );
    assert_eq!(
        reaching(&[(10, 20), (30, 40)], true, QoS::AtLeastOnce, &[25]),
        1
    );
    // Overlapping: one range.
    assert_eq!(
        reaching(&[(30, 40), (35, 50)], true, QoS::AtLeastOnce, &[45, 32]),
        0
    );
}

/// How 9, of origin 1, reaches a session before its 12 (see
/// [`after_a_merge`]).
#[derive(Clone, Copy)]
enum Nine {
    /// In its origin's order.
    InOrder,
    /// Late: a link's replay.
    Late,
    /// While a move into the session was on (12 after it).
    Held,
    /// With a move (12 too).
    Brought,
    /// Late, after 5 in order.
    LateAfterFive,
}

/// How many of origin 1's messages 9 and 10, brought by a merge with
/// another copy of a session subscribed to `a/#` at QoS 2, reach its
/// client, once the client went through 9 and 12 there (`nine`: how 9
/// came).
fn after_a_merge(nine: Nine) -> usize {
    let t0 = Instant::now();
    let mut s = session(t0);
    s.connect(t0, connect(Version::V5, false, 0, Some(60)), false, None);
    drain(&mut s);
    let options = crate::codec::SubOptions {
        qos: QoS::ExactlyOnce,
        ..Default::default()
    };
    let sub = Subscription {
        options,
        subscription_id: None,
    };
    assert!(s.take_subscription("a/#", sub));
    let one = |id: u64| with_id(QoS::ExactlyOnce, 1 << 32 | id);
    let late = |id: u64| moving::late(&one(id));
    let d = || delivery(QoS::ExactlyOnce);
    match nine {
        Nine::InOrder => s.deliver(t0, &one(9), d()),
        Nine::Late => s.deliver(t0, &late(9), d()),
        Nine::LateAfterFive => {
            s.deliver(t0, &one(5), d());
            s.deliver(t0, &late(9), d());
        }
        Nine::Held => {
            s.begin_move_in();
            s.deliver(t0, &one(9), d());
            s.end_move_in(t0, HashSet::default());
        }
        Nine::Brought => {
            s.begin_move_in();
            s.take_deliveries(t0, Vec::new(), vec![(one(9), d()), (one(12), d())]);
            s.end_move_in(t0, HashSet::default());
        }
    }
    if !matches!(nine, Nine::Brought) {
        s.deliver(t0, &one(12), d());
    }
    // The client goes through what it got (PUBREC, PUBCOMP).
    let (packets, _) = drain(&mut s);
    let ids: Vec<u16> = publishes(&packets).iter().map(|p| p.packet_id).collect();
    for packet_id in ids {
        let resp = PubResp {
            packet_id,
            ..PubResp::default()
        };
        s.handle_packet(t0, Packet::PubRec(resp.clone()));
        s.handle_packet(t0, Packet::PubComp(resp));
    }
    drain(&mut s);
    let marked = s.begin_merge();
    let brought = [9, 10].map(|id| (one(id), d()));
    s.take_deliveries(t0, Vec::new(), brought.to_vec());
    if marked {
        s.end_merge();
    }
    let (packets, _) = drain(&mut s);
    s.check_invariants();
    publishes(&packets).len()
}

/// Seeds 69617 and 87072 of the cluster simulator: a copy of the session
/// took a message of an origin that its node had been sent by a route to
/// it for an older copy, then that origin's later ones; a merge brought a
/// QoS 2 message of that origin between the two, which the copy never
/// had, and it was dropped as one the copy had gone through.
#[test]
fn a_late_message_says_nothing_of_what_came_before_it() {
    // 9 went through this copy already; 10 never reached it.
    assert_eq!(after_a_merge(Nine::Late), 1, "a link's replay");
    assert_eq!(after_a_merge(Nine::Held), 1, "during a move in");
    assert_eq!(after_a_merge(Nine::Brought), 1, "with a move");
    assert_eq!(after_a_merge(Nine::LateAfterFive), 1, "after a range");
    // In its origin's order, the ids between reached the copy, or were
    // not for it (another node's route is never stale by more than that).
    assert_eq!(after_a_merge(Nine::InOrder), 0);
}

/// Seed 87998 of the cluster simulator (with the fix above): a QoS 2
/// message reached a session late and its client went through it; the
/// session moved to another node, and a copy of the message that reached
/// that node by another path went to the client again. The marks a move
/// carries name each single message outside the ranges.
#[test]
fn a_late_message_goes_with_the_session_as_a_single_mark() {
    let t0 = Instant::now();
    let mut from = session(t0);
    for (id, late) in [(9, true), (12, false), (13, false)] {
        let m = with_id(QoS::ExactlyOnce, 1 << 32 | id);
        let m = if late { moving::late(&m) } else { m };
        from.deliver(t0, &m, delivery(QoS::ExactlyOnce));
    }
    let marks = from.seen_marks();
    let mark = |low: u64, high: u64| crate::cluster::frame::OriginMark {
        origin: 1,
        low: 1 << 32 | low,
        high: 1 << 32 | high,
    };
    assert_eq!(marks, vec![mark(9, 9), mark(12, 13)]);
    let mut to = session(t0);
    to.connect(t0, connect(Version::V5, false, 0, Some(60)), false, None);
    to.take_marks(&marks, vec!["a/#".to_string()], true);
    drain(&mut to);
    for id in [9, 10, 12] {
        to.deliver(
            t0,
            &with_id(QoS::ExactlyOnce, 1 << 32 | id),
            delivery(QoS::ExactlyOnce),
        );
    }
    let (packets, _) = drain(&mut to);
    assert_eq!(publishes(&packets).len(), 1, "10 alone");
    // And where it goes next, the single goes too.
    assert!(to.seen_marks().contains(&mark(9, 9)));
}

/// Every connection holds a session, idle ones too: what only some
/// connections use (topic aliases, a log gate) is boxed and made on first
/// use, so the session stays small (`loadtest/compare.sh`'s idle row).
#[test]
fn a_session_keeps_what_few_connections_use_out_of_line() {
    let size = std::mem::size_of::<Session>();
    assert!(size <= 560, "Session is {size} bytes");
}
