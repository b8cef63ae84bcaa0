//! PINGREQ and PINGRESP (packet types 12 and 13): no body.

use bytes::{Bytes, BytesMut};

use super::header;
use super::DecodeError;

/// Checks that a PINGREQ or PINGRESP body is empty.
pub(crate) fn decode(body: &Bytes) -> Result<(), DecodeError> {
    if body.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::Malformed(
            "[MQTT-2.1.4] PINGREQ or PINGRESP has a body",
        ))
    }
}

/// Appends a bodiless packet whose first byte is `byte0`.
pub(crate) fn encode(byte0: u8, out: &mut BytesMut) {
    header::write(out, byte0, 0);
}
