//! DISCONNECT (packet type 14). 3.x: no body at all. 5.0: remaining length
//! 0 means reason 0 and no properties, 1 means a reason and no properties;
//! the encoder writes the shortest form.

use bytes::{BufMut, Bytes, BytesMut};

use super::header::{self, kind};
use super::primitives::Reader;
use super::properties::{self, PropKind};
use super::{DecodeError, Disconnect, Version};

/// Decodes a DISCONNECT body.
pub(crate) fn decode(body: &Bytes, version: Version) -> Result<Disconnect, DecodeError> {
    let mut r = Reader::new(body);
    let mut d = Disconnect::default();
    if version.is_v5() && r.remaining() > 0 {
        d.reason = r.u8()?;
        if r.remaining() > 0 {
            d.properties = properties::decode_boxed(&mut r, PropKind::Disconnect)?;
        }
    }
    r.finish()?;
    Ok(d)
}

/// Remaining length of a reason + properties body in its shortest form, given
/// the property list length (shared with AUTH).
pub(crate) fn short_lens(reason: u8, props: usize) -> usize {
    match (reason, props) {
        (0, 0) => 0,
        (_, 0) => 1,
        _ => 1 + properties::prefixed_len(props),
    }
}

fn lens(d: &Disconnect, version: Version) -> (usize, usize) {
    if !version.is_v5() {
        return (0, 0);
    }
    let props = properties::len(&d.properties, PropKind::Disconnect);
    (short_lens(d.reason, props), props)
}

/// Remaining length of the encoding of `d`.
pub(crate) fn remaining_len(d: &Disconnect, version: Version) -> usize {
    lens(d, version).0
}

/// Appends DISCONNECT.
pub(crate) fn encode(d: &Disconnect, version: Version, out: &mut BytesMut) {
    let (remaining, props) = lens(d, version);
    header::write(out, kind::DISCONNECT << 4, remaining);
    if remaining > 0 {
        out.put_u8(d.reason);
    }
    if remaining > 1 {
        properties::encode(&d.properties, PropKind::Disconnect, props, out);
    }
}
