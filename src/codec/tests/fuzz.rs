//! Arbitrary and mutated input never panics, and whatever decodes re-encodes
//! to an equal packet.

use bytes::BytesMut;
use proptest::collection::vec;
use proptest::prelude::*;

use super::strategies::{version, versioned_packet};
use crate::codec::*;

/// Decodes everything in `bytes`; every decoded packet must survive an
/// encode → decode round trip.
fn drain(bytes: &[u8], v: Version, max: usize) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::from(bytes);
    loop {
        let before = buf.len();
        match decode(&mut buf, v, max) {
            Ok(Some(p)) => {
                prop_assert!(buf.len() < before);
                let mut out = BytesMut::new();
                encode(&p, v, &mut out);
                prop_assert_eq!(out.len(), encoded_len(&p, v));
                prop_assert_eq!(decode(&mut out, v, MAX_PACKET_SIZE), Ok(Some(p)));
            }
            Ok(None) => {
                prop_assert_eq!(buf.len(), before);
                return Ok(());
            }
            Err(_) => return Ok(()),
        }
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..4096), v in version()) {
        drain(&bytes, v, MAX_PACKET_SIZE)?;
        drain(&bytes, v, 64)?;
    }

    #[test]
    fn arbitrary_bodies_behind_a_valid_header_never_panic(
        byte0 in prop::sample::select(vec![
            0x10u8, 0x20, 0x30, 0x32, 0x34, 0x3B, 0x40, 0x50, 0x62, 0x70,
            0x82, 0x90, 0xA2, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0,
        ]),
        body in vec(any::<u8>(), 0..300),
        v in version(),
    ) {
        let mut bytes = vec![byte0];
        let mut len = body.len();
        loop {
            let b = (len & 0x7F) as u8;
            len >>= 7;
            bytes.push(if len > 0 { b | 0x80 } else { b });
            if len == 0 { break; }
        }
        bytes.extend_from_slice(&body);
        drain(&bytes, v, MAX_PACKET_SIZE)?;
    }

    #[test]
    fn mutated_packets_never_panic(
        (v, p) in versioned_packet(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        decode_as in version(),
    ) {
        let mut bytes = BytesMut::new();
        encode(&p, v, &mut bytes);
        for (i, x) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= x;
        }
        drain(&bytes, decode_as, MAX_PACKET_SIZE)?;
    }
}
