//! AUTH (packet type 15, MQTT 5.0 only; the fixed header check refuses it
//! for 3.x). Remaining length 0 means reason 0 (success) and no properties,
//! 1 means a reason and no properties; the encoder writes the shortest form
//! and always uses the 5.0 layout.

use bytes::{BufMut, Bytes, BytesMut};

use super::disconnect::short_lens;
use super::header::{self, kind};
use super::primitives::Reader;
use super::properties::{self, PropKind};
use super::{Auth, DecodeError};

/// Decodes an AUTH body.
pub(crate) fn decode(body: &Bytes) -> Result<Auth, DecodeError> {
    let mut r = Reader::new(body);
    let mut a = Auth::default();
    if r.remaining() > 0 {
        a.reason = r.u8()?;
        if r.remaining() > 0 {
            a.properties = properties::decode_boxed(&mut r, PropKind::Auth)?;
        }
    }
    r.finish()?;
    Ok(a)
}

fn lens(a: &Auth) -> (usize, usize) {
    let props = properties::len(&a.properties, PropKind::Auth);
    (short_lens(a.reason, props), props)
}

/// Remaining length of the encoding of `a`.
pub(crate) fn remaining_len(a: &Auth) -> usize {
    lens(a).0
}

/// Appends AUTH.
pub(crate) fn encode(a: &Auth, out: &mut BytesMut) {
    let (remaining, props) = lens(a);
    header::write(out, kind::AUTH << 4, remaining);
    if remaining > 0 {
        out.put_u8(a.reason);
    }
    if remaining > 1 {
        properties::encode(&a.properties, PropKind::Auth, props, out);
    }
}
