//! The one error type of the decoder.

use super::packet::reason;

/// Why [`decode`](super::decode) refused the bytes it was given.
///
/// Every variant is fatal for the connection: the caller sends a CONNACK or
/// DISCONNECT carrying [`DecodeError::reason_code`] (MQTT 5.0) or just closes the
/// connection (MQTT 3.x). The `&'static str` of `Malformed` and `Protocol` names
/// the spec rule that was broken, where the spec numbers one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fixed header plus remaining length exceed the negotiated maximum packet
    /// size. Reported as soon as the fixed header is read.
    #[error("packet of {size} bytes exceeds the maximum packet size of {max} bytes")]
    PacketTooLarge {
        /// Total size announced by the fixed header (header included).
        size: usize,
        /// The limit the caller passed.
        max: usize,
    },
    /// The remaining length field runs past its maximum of 4 bytes.
    #[error("malformed packet: remaining length longer than 4 bytes")]
    MalformedRemainingLength,
    /// The bytes do not form a valid packet (reason code 0x81).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// The packet is well formed but breaks a protocol rule (reason code 0x82).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// CONNECT with a protocol name of `MQTT` or `MQIsdp` but a protocol level
    /// this codec does not speak; carries the level.
    #[error("unsupported protocol version (level {0})")]
    UnsupportedProtocolVersion(u8),
}

impl DecodeError {
    /// The MQTT 5.0 reason code for this error: 0x95 packet too large, 0x81
    /// malformed packet, 0x82 protocol error, 0x84 unsupported protocol version.
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::PacketTooLarge { .. } => reason::PACKET_TOO_LARGE,
            DecodeError::MalformedRemainingLength | DecodeError::Malformed(_) => {
                reason::MALFORMED_PACKET
            }
            DecodeError::Protocol(_) => reason::PROTOCOL_ERROR,
            DecodeError::UnsupportedProtocolVersion(_) => reason::UNSUPPORTED_PROTOCOL_VERSION,
        }
    }
}
