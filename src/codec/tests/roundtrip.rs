//! Property tests: encode → decode round trips, split buffers, back-to-back
//! packets.

use bytes::BytesMut;
use proptest::prelude::*;

use proptest::collection::vec;

use super::strategies::{packet, publish, version, versioned_packet};
use crate::codec::*;

fn encoded(p: &Packet, v: Version) -> BytesMut {
    let mut out = BytesMut::new();
    encode(p, v, &mut out);
    out
}

proptest! {
    #[test]
    fn decoding_a_stream_sharing_topics_gives_the_same_packets(
        v in version(),
        ps in version().prop_flat_map(|v| vec(publish(v, 64), 1..12)),
        repeat in vec(any::<bool>(), 12),
    ) {
        // Runs of one topic, as a client publishes: each packet takes the
        // topic of the one before it when `repeat` says so.
        let mut packets = ps;
        for i in 1..packets.len() {
            if repeat[i] {
                packets[i].topic = packets[i - 1].topic.clone();
            }
        }
        let mut stream = BytesMut::new();
        for p in &packets {
            encode(&Packet::Publish(p.clone()), v, &mut stream);
        }
        let mut plain = stream.clone();
        let mut last = None;
        loop {
            let shared = decode_sharing(&mut stream, v, MAX_PACKET_SIZE, &mut last);
            let alone = decode(&mut plain, v, MAX_PACKET_SIZE);
            prop_assert_eq!(&shared, &alone);
            if !matches!(alone, Ok(Some(_))) {
                break;
            }
        }
    }

    #[test]
    fn a_publish_view_decodes_to_the_equivalent_publish(
        v in version(),
        p in version().prop_flat_map(|v| publish(v, 256)),
    ) {
        let mut base = p.properties.clone();
        let expiry = base.message_expiry_interval.take();
        let alias = base.topic_alias.take();
        let ids = std::mem::take(&mut base.subscription_identifiers);
        let view = PublishView {
            dup: p.dup,
            qos: p.qos,
            retain: p.retain,
            topic: &p.topic,
            packet_id: p.packet_id,
            payload: &p.payload,
            properties: Some(&base),
            message_expiry_interval: expiry,
            topic_alias: alias,
            subscription_identifiers: &ids,
        };
        let mut out = BytesMut::new();
        encode_publish(&view, v, &mut out);
        prop_assert_eq!(out.len(), publish_len(&view, v));
        let mut expected = p.clone();
        if !v.is_v5() {
            expected.properties = BoxedProperties::default();
        }
        if expected.qos == QoS::AtMostOnce {
            expected.dup = false;
        }
        let mut direct = BytesMut::new();
        encode(&Packet::Publish(expected.clone()), v, &mut direct);
        prop_assert_eq!(out.len(), direct.len());
        let got = decode(&mut out, v, MAX_PACKET_SIZE);
        prop_assert_eq!(got, decode(&mut direct, v, MAX_PACKET_SIZE));
    }

    #[test]
    fn encode_then_decode_is_identity((v, p) in versioned_packet()) {
        let mut buf = encoded(&p, v);
        prop_assert_eq!(buf.len(), encoded_len(&p, v));
        let got = decode(&mut buf, v, MAX_PACKET_SIZE);
        prop_assert_eq!(got, Ok(Some(p)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn encode_appends_after_existing_bytes((v, p) in versioned_packet(), prefix in 0usize..8) {
        let mut out = BytesMut::from(&vec![0xAAu8; prefix][..]);
        encode(&p, v, &mut out);
        prop_assert_eq!(out.len(), prefix + encoded_len(&p, v));
        prop_assert_eq!(&out[prefix..], &encoded(&p, v)[..]);
    }

    #[test]
    fn every_prefix_needs_more_bytes((v, p) in versioned_packet()) {
        let bytes = encoded(&p, v);
        for n in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..n]);
            prop_assert_eq!(decode(&mut buf, v, MAX_PACKET_SIZE), Ok(None));
            prop_assert_eq!(&buf[..], &bytes[..n]);
        }
        let mut buf = bytes.clone();
        prop_assert_eq!(decode(&mut buf, v, MAX_PACKET_SIZE), Ok(Some(p)));
    }

    #[test]
    fn split_feeding_decodes_the_same((v, p) in versioned_packet(), at in any::<prop::sample::Index>()) {
        // Feed a prefix, then the rest, into one growing buffer.
        let bytes = encoded(&p, v);
        let at = at.index(bytes.len() + 1);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&bytes[..at]);
        if at < bytes.len() {
            prop_assert_eq!(decode(&mut buf, v, MAX_PACKET_SIZE), Ok(None));
            prop_assert_eq!(buf.len(), at);
            buf.extend_from_slice(&bytes[at..]);
        }
        prop_assert_eq!(decode(&mut buf, v, MAX_PACKET_SIZE), Ok(Some(p)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn back_to_back_packets_decode_in_order(
        (v, packets) in version().prop_flat_map(|v| (Just(v), vec(packet(v), 1..5)))
    ) {
        let mut buf = BytesMut::new();
        for p in &packets {
            encode(p, v, &mut buf);
        }
        for p in &packets {
            prop_assert_eq!(decode(&mut buf, v, MAX_PACKET_SIZE), Ok(Some(p.clone())));
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(decode(&mut buf, v, MAX_PACKET_SIZE), Ok(None));
    }

    #[test]
    fn two_packets_then_a_partial_one(
        (v, a, b) in version().prop_flat_map(|v| (Just(v), packet(v), packet(v))),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut buf = encoded(&a, v);
        buf.extend_from_slice(&encoded(&b, v));
        let third = encoded(&a, v);
        let cut = cut.index(third.len());
        buf.extend_from_slice(&third[..cut]);
        prop_assert_eq!(decode(&mut buf, v, MAX_PACKET_SIZE), Ok(Some(a)));
        prop_assert_eq!(decode(&mut buf, v, MAX_PACKET_SIZE), Ok(Some(b)));
        prop_assert_eq!(decode(&mut buf, v, MAX_PACKET_SIZE), Ok(None));
        prop_assert_eq!(&buf[..], &third[..cut]);
    }

    #[test]
    fn large_publish_round_trips(v in version(), p in version().prop_flat_map(|v| publish(v, 40_000))) {
        // Payloads past 16 KiB take a 3-byte remaining length.
        let v = if p.properties.is_empty() { v } else { Version::V5 };
        let p = Packet::Publish(p);
        let mut buf = encoded(&p, v);
        prop_assert_eq!(buf.len(), encoded_len(&p, v));
        prop_assert_eq!(decode(&mut buf, v, MAX_PACKET_SIZE), Ok(Some(p)));
    }

    #[test]
    fn max_packet_size_is_inclusive((v, p) in versioned_packet()) {
        let bytes = encoded(&p, v);
        let n = bytes.len();
        prop_assert_eq!(decode(&mut bytes.clone(), v, n), Ok(Some(p)));
        let too_large = decode(&mut bytes.clone(), v, n - 1);
        prop_assert_eq!(too_large, Err(DecodeError::PacketTooLarge { size: n, max: n - 1 }));
    }
}
