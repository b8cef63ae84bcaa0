//! MQTT 5.0 properties: decoding with the allowed set of each packet kind,
//! length computation and encoding.
//!
//! The length and the encoding are produced by one walk over the fields
//! ([`walk`]) so that [`len`] and [`encode`] can never disagree. Properties
//! are written in ascending identifier order; a field that the packet kind
//! does not allow is skipped by the encoder, so the codec never emits a
//! `[MQTT-2.2.2-2]` violation.

use bytes::{BufMut, BytesMut};

use super::primitives::{field_len, put_prefixed, put_vbi, vbi_len, Reader};
use super::{BoxedProperties, DecodeError, Properties};

/// Property identifiers.
#[allow(missing_docs)]
pub mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

const fn bit(id: u8) -> u64 {
    1u64 << id
}

const fn mask(ids: &[u8]) -> u64 {
    let mut m = 0;
    let mut i = 0;
    while i < ids.len() {
        m |= bit(ids[i]);
        i += 1;
    }
    m
}

use id::*;

/// Every property identifier defined by MQTT 5.0.
const KNOWN: u64 = mask(&[
    PAYLOAD_FORMAT_INDICATOR,
    MESSAGE_EXPIRY_INTERVAL,
    CONTENT_TYPE,
    RESPONSE_TOPIC,
    CORRELATION_DATA,
    SUBSCRIPTION_IDENTIFIER,
    SESSION_EXPIRY_INTERVAL,
    ASSIGNED_CLIENT_IDENTIFIER,
    SERVER_KEEP_ALIVE,
    AUTHENTICATION_METHOD,
    AUTHENTICATION_DATA,
    REQUEST_PROBLEM_INFORMATION,
    WILL_DELAY_INTERVAL,
    REQUEST_RESPONSE_INFORMATION,
    RESPONSE_INFORMATION,
    SERVER_REFERENCE,
    REASON_STRING,
    RECEIVE_MAXIMUM,
    TOPIC_ALIAS_MAXIMUM,
    TOPIC_ALIAS,
    MAXIMUM_QOS,
    RETAIN_AVAILABLE,
    USER_PROPERTY,
    MAXIMUM_PACKET_SIZE,
    WILDCARD_SUBSCRIPTION_AVAILABLE,
    SUBSCRIPTION_IDENTIFIER_AVAILABLE,
    SHARED_SUBSCRIPTION_AVAILABLE,
]);

const MESSAGE: u64 = mask(&[
    PAYLOAD_FORMAT_INDICATOR,
    MESSAGE_EXPIRY_INTERVAL,
    CONTENT_TYPE,
    RESPONSE_TOPIC,
    CORRELATION_DATA,
    USER_PROPERTY,
]);
const ACK: u64 = mask(&[REASON_STRING, USER_PROPERTY]);

/// The packet (or part of CONNECT) a property list belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropKind {
    /// CONNECT properties.
    Connect,
    /// Will properties inside CONNECT.
    Will,
    /// CONNACK.
    ConnAck,
    /// PUBLISH.
    Publish,
    /// PUBACK, PUBREC, PUBREL, PUBCOMP.
    PubResp,
    /// SUBSCRIBE.
    Subscribe,
    /// SUBACK.
    SubAck,
    /// UNSUBSCRIBE.
    Unsubscribe,
    /// UNSUBACK.
    UnsubAck,
    /// DISCONNECT.
    Disconnect,
    /// AUTH.
    Auth,
}

impl PropKind {
    /// Bit set (bit n = identifier n) of the properties this kind allows.
    pub const fn allowed(self) -> u64 {
        match self {
            PropKind::Connect => mask(&[
                SESSION_EXPIRY_INTERVAL,
                RECEIVE_MAXIMUM,
                MAXIMUM_PACKET_SIZE,
                TOPIC_ALIAS_MAXIMUM,
                REQUEST_RESPONSE_INFORMATION,
                REQUEST_PROBLEM_INFORMATION,
                USER_PROPERTY,
                AUTHENTICATION_METHOD,
                AUTHENTICATION_DATA,
            ]),
            PropKind::Will => MESSAGE | bit(WILL_DELAY_INTERVAL),
            PropKind::ConnAck => mask(&[
                SESSION_EXPIRY_INTERVAL,
                RECEIVE_MAXIMUM,
                MAXIMUM_QOS,
                RETAIN_AVAILABLE,
                MAXIMUM_PACKET_SIZE,
                ASSIGNED_CLIENT_IDENTIFIER,
                TOPIC_ALIAS_MAXIMUM,
                REASON_STRING,
                USER_PROPERTY,
                WILDCARD_SUBSCRIPTION_AVAILABLE,
                SUBSCRIPTION_IDENTIFIER_AVAILABLE,
                SHARED_SUBSCRIPTION_AVAILABLE,
                SERVER_KEEP_ALIVE,
                RESPONSE_INFORMATION,
                SERVER_REFERENCE,
                AUTHENTICATION_METHOD,
                AUTHENTICATION_DATA,
            ]),
            PropKind::Publish => MESSAGE | bit(TOPIC_ALIAS) | bit(SUBSCRIPTION_IDENTIFIER),
            PropKind::PubResp | PropKind::SubAck | PropKind::UnsubAck => ACK,
            PropKind::Subscribe => bit(SUBSCRIPTION_IDENTIFIER) | bit(USER_PROPERTY),
            PropKind::Unsubscribe => bit(USER_PROPERTY),
            PropKind::Disconnect => mask(&[
                SESSION_EXPIRY_INTERVAL,
                REASON_STRING,
                USER_PROPERTY,
                SERVER_REFERENCE,
            ]),
            PropKind::Auth => mask(&[
                AUTHENTICATION_METHOD,
                AUTHENTICATION_DATA,
                REASON_STRING,
                USER_PROPERTY,
            ]),
        }
    }

    /// True when `id` may appear more than once in this kind.
    const fn repeatable(self, id: u8) -> bool {
        id == USER_PROPERTY || (id == SUBSCRIPTION_IDENTIFIER && matches!(self, PropKind::Publish))
    }

    /// True when `id` is allowed in this kind.
    #[cfg(test)]
    pub const fn allows(self, id: u8) -> bool {
        id < 64 && self.allowed() & bit(id) != 0
    }
}

/// [`decode`] into the form packets hold: a list that sets nothing (a
/// length of 0 included) boxes nothing.
pub(crate) fn decode_boxed(
    r: &mut Reader<'_>,
    kind: PropKind,
) -> Result<BoxedProperties, DecodeError> {
    let mut props = Properties::default();
    decode(r, kind, &mut props)?;
    Ok(props.into())
}

/// Reads a property length and the property list that follows it into
/// `props` (which starts empty; filled in place because `Properties` is
/// large).
pub(crate) fn decode(
    r: &mut Reader<'_>,
    kind: PropKind,
    props: &mut Properties,
) -> Result<(), DecodeError> {
    let len = r.vbi()? as usize;
    if len == 0 {
        return Ok(());
    }
    if len > r.remaining() {
        return Err(DecodeError::Malformed(
            "[MQTT-2.2.2] property length exceeds the remaining packet",
        ));
    }
    let mut pr = r.sub(len)?;
    let allowed = kind.allowed();
    let mut seen = 0u64;
    while pr.remaining() > 0 {
        let id = pr.vbi()?;
        let b = if id < 64 { bit(id as u8) } else { 0 };
        if KNOWN & b == 0 {
            return Err(DecodeError::Malformed(
                "[MQTT-2.2.2] unknown property identifier",
            ));
        }
        if allowed & b == 0 {
            return Err(DecodeError::Protocol(
                "[MQTT-2.2.2-2] property not allowed in this packet",
            ));
        }
        if seen & b != 0 && !kind.repeatable(id as u8) {
            return Err(DecodeError::Protocol(
                "[MQTT-2.2.2] property included more than once",
            ));
        }
        seen |= b;
        read_value(&mut pr, id as u8, props)?;
    }
    Ok(())
}

/// A byte property whose only legal values are 0 and 1.
fn flag(r: &mut Reader<'_>, err: &'static str) -> Result<u8, DecodeError> {
    match r.u8()? {
        v @ (0 | 1) => Ok(v),
        _ => Err(DecodeError::Protocol(err)),
    }
}

fn nonzero_u16(r: &mut Reader<'_>, err: &'static str) -> Result<u16, DecodeError> {
    match r.u16()? {
        0 => Err(DecodeError::Protocol(err)),
        v => Ok(v),
    }
}

fn subscription_identifier(r: &mut Reader<'_>) -> Result<u32, DecodeError> {
    match r.vbi()? {
        0 => Err(DecodeError::Protocol(
            "[MQTT-3.8.2.1.2] Subscription Identifier is 0",
        )),
        v => Ok(v),
    }
}

fn maximum_packet_size(r: &mut Reader<'_>) -> Result<u32, DecodeError> {
    match r.u32()? {
        0 => Err(DecodeError::Protocol(
            "[MQTT-3.1.2.11.4] Maximum Packet Size is 0",
        )),
        v => Ok(v),
    }
}

/// Reads the value of property `id` (known and allowed) into `p`.
fn read_value(r: &mut Reader<'_>, id: u8, p: &mut Properties) -> Result<(), DecodeError> {
    match id {
        PAYLOAD_FORMAT_INDICATOR => {
            p.payload_format_indicator = Some(flag(
                r,
                "[MQTT-3.3.2.3.2] Payload Format Indicator is not 0 or 1",
            )?)
        }
        MESSAGE_EXPIRY_INTERVAL => p.message_expiry_interval = Some(r.u32()?),
        CONTENT_TYPE => p.content_type = Some(r.string()?),
        RESPONSE_TOPIC => p.response_topic = Some(r.string()?),
        CORRELATION_DATA => p.correlation_data = Some(r.binary()?),
        SUBSCRIPTION_IDENTIFIER => p.subscription_identifiers.push(subscription_identifier(r)?),
        SESSION_EXPIRY_INTERVAL => p.session_expiry_interval = Some(r.u32()?),
        ASSIGNED_CLIENT_IDENTIFIER => p.assigned_client_identifier = Some(r.string()?),
        SERVER_KEEP_ALIVE => p.server_keep_alive = Some(r.u16()?),
        AUTHENTICATION_METHOD => p.authentication_method = Some(r.string()?),
        AUTHENTICATION_DATA => p.authentication_data = Some(r.binary()?),
        REQUEST_PROBLEM_INFORMATION => {
            p.request_problem_information = Some(flag(
                r,
                "[MQTT-3.1.2.11.7] Request Problem Information is not 0 or 1",
            )?)
        }
        WILL_DELAY_INTERVAL => p.will_delay_interval = Some(r.u32()?),
        REQUEST_RESPONSE_INFORMATION => {
            p.request_response_information = Some(flag(
                r,
                "[MQTT-3.1.2.11.6] Request Response Information is not 0 or 1",
            )?)
        }
        RESPONSE_INFORMATION => p.response_information = Some(r.string()?),
        SERVER_REFERENCE => p.server_reference = Some(r.string()?),
        REASON_STRING => p.reason_string = Some(r.string()?),
        RECEIVE_MAXIMUM => {
            p.receive_maximum = Some(nonzero_u16(r, "[MQTT-3.1.2.11.3] Receive Maximum is 0")?)
        }
        TOPIC_ALIAS_MAXIMUM => p.topic_alias_maximum = Some(r.u16()?),
        // Alias 0 ([MQTT-3.3.2-8]) is left to the session, which answers
        // it like any alias outside 1..=maximum: DISCONNECT 0x94.
        TOPIC_ALIAS => p.topic_alias = Some(r.u16()?),
        MAXIMUM_QOS => p.maximum_qos = Some(flag(r, "[MQTT-3.2.2.3.4] Maximum QoS is not 0 or 1")?),
        RETAIN_AVAILABLE => {
            p.retain_available = Some(flag(r, "[MQTT-3.2.2.3.5] Retain Available is not 0 or 1")?)
        }
        USER_PROPERTY => p.user_properties.push(r.string_pair()?),
        MAXIMUM_PACKET_SIZE => p.maximum_packet_size = Some(maximum_packet_size(r)?),
        WILDCARD_SUBSCRIPTION_AVAILABLE => {
            p.wildcard_subscription_available = Some(flag(
                r,
                "[MQTT-3.2.2.3.11] Wildcard Subscription Available is not 0 or 1",
            )?)
        }
        SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
            p.subscription_identifier_available = Some(flag(
                r,
                "[MQTT-3.2.2.3.12] Subscription Identifiers Available is not 0 or 1",
            )?)
        }
        SHARED_SUBSCRIPTION_AVAILABLE => {
            p.shared_subscription_available = Some(flag(
                r,
                "[MQTT-3.2.2.3.13] Shared Subscription Available is not 0 or 1",
            )?)
        }
        _ => {
            return Err(DecodeError::Malformed(
                "[MQTT-2.2.2] unknown property identifier",
            ))
        }
    }
    Ok(())
}

/// Receives the properties [`walk`] visits.
trait Sink {
    fn byte(&mut self, id: u8, v: u8);
    fn two(&mut self, id: u8, v: u16);
    fn four(&mut self, id: u8, v: u32);
    fn vbi(&mut self, id: u8, v: u32);
    fn field(&mut self, id: u8, v: &[u8]);
    fn pair(&mut self, id: u8, k: &str, v: &str);
}

/// Sums the encoded size of the visited properties.
struct Len(usize);

impl Sink for Len {
    fn byte(&mut self, _: u8, _: u8) {
        self.0 += 2;
    }
    fn two(&mut self, _: u8, _: u16) {
        self.0 += 3;
    }
    fn four(&mut self, _: u8, _: u32) {
        self.0 += 5;
    }
    fn vbi(&mut self, _: u8, v: u32) {
        self.0 += 1 + vbi_len(v as usize);
    }
    fn field(&mut self, _: u8, v: &[u8]) {
        self.0 += 1 + field_len(v.len());
    }
    fn pair(&mut self, _: u8, k: &str, v: &str) {
        self.0 += 1 + field_len(k.len()) + field_len(v.len());
    }
}

/// Writes the visited properties.
struct Write<'a>(&'a mut BytesMut);

impl Sink for Write<'_> {
    fn byte(&mut self, id: u8, v: u8) {
        self.0.put_slice(&[id, v]);
    }
    fn two(&mut self, id: u8, v: u16) {
        let b = v.to_be_bytes();
        self.0.put_slice(&[id, b[0], b[1]]);
    }
    fn four(&mut self, id: u8, v: u32) {
        let b = v.to_be_bytes();
        self.0.put_slice(&[id, b[0], b[1], b[2], b[3]]);
    }
    fn vbi(&mut self, id: u8, v: u32) {
        self.0.put_u8(id);
        put_vbi(self.0, v as usize);
    }
    fn field(&mut self, id: u8, v: &[u8]) {
        self.0.put_u8(id);
        put_prefixed(self.0, v);
    }
    fn pair(&mut self, id: u8, k: &str, v: &str) {
        self.0.put_u8(id);
        put_prefixed(self.0, k.as_bytes());
        put_prefixed(self.0, v.as_bytes());
    }
}

/// Visits, in identifier order, every set property that `kind` allows.
fn walk<S: Sink>(p: &Properties, kind: PropKind, s: &mut S) {
    let allowed = kind.allowed();
    let ok = |id: u8| allowed & bit(id) != 0;
    let byte = |s: &mut S, id: u8, v: Option<u8>| match v {
        Some(v) if ok(id) => s.byte(id, v),
        _ => {}
    };
    let two = |s: &mut S, id: u8, v: Option<u16>| match v {
        Some(v) if ok(id) => s.two(id, v),
        _ => {}
    };
    let four = |s: &mut S, id: u8, v: Option<u32>| match v {
        Some(v) if ok(id) => s.four(id, v),
        _ => {}
    };
    let field = |s: &mut S, id: u8, v: Option<&[u8]>| match v {
        Some(v) if ok(id) => s.field(id, v),
        _ => {}
    };
    byte(s, PAYLOAD_FORMAT_INDICATOR, p.payload_format_indicator);
    four(s, MESSAGE_EXPIRY_INTERVAL, p.message_expiry_interval);
    field(
        s,
        CONTENT_TYPE,
        p.content_type.as_deref().map(str::as_bytes),
    );
    field(
        s,
        RESPONSE_TOPIC,
        p.response_topic.as_deref().map(str::as_bytes),
    );
    field(s, CORRELATION_DATA, p.correlation_data.as_deref());
    if ok(SUBSCRIPTION_IDENTIFIER) {
        let n = if kind.repeatable(SUBSCRIPTION_IDENTIFIER) {
            usize::MAX
        } else {
            1
        };
        for &v in p.subscription_identifiers.iter().take(n) {
            s.vbi(SUBSCRIPTION_IDENTIFIER, v);
        }
    }
    four(s, SESSION_EXPIRY_INTERVAL, p.session_expiry_interval);
    field(
        s,
        ASSIGNED_CLIENT_IDENTIFIER,
        p.assigned_client_identifier.as_deref().map(str::as_bytes),
    );
    two(s, SERVER_KEEP_ALIVE, p.server_keep_alive);
    field(
        s,
        AUTHENTICATION_METHOD,
        p.authentication_method.as_deref().map(str::as_bytes),
    );
    field(s, AUTHENTICATION_DATA, p.authentication_data.as_deref());
    byte(
        s,
        REQUEST_PROBLEM_INFORMATION,
        p.request_problem_information,
    );
    four(s, WILL_DELAY_INTERVAL, p.will_delay_interval);
    byte(
        s,
        REQUEST_RESPONSE_INFORMATION,
        p.request_response_information,
    );
    field(
        s,
        RESPONSE_INFORMATION,
        p.response_information.as_deref().map(str::as_bytes),
    );
    field(
        s,
        SERVER_REFERENCE,
        p.server_reference.as_deref().map(str::as_bytes),
    );
    field(
        s,
        REASON_STRING,
        p.reason_string.as_deref().map(str::as_bytes),
    );
    two(s, RECEIVE_MAXIMUM, p.receive_maximum);
    two(s, TOPIC_ALIAS_MAXIMUM, p.topic_alias_maximum);
    two(s, TOPIC_ALIAS, p.topic_alias);
    byte(s, MAXIMUM_QOS, p.maximum_qos);
    byte(s, RETAIN_AVAILABLE, p.retain_available);
    if ok(USER_PROPERTY) {
        for (k, v) in &p.user_properties {
            s.pair(USER_PROPERTY, k, v);
        }
    }
    four(s, MAXIMUM_PACKET_SIZE, p.maximum_packet_size);
    byte(
        s,
        WILDCARD_SUBSCRIPTION_AVAILABLE,
        p.wildcard_subscription_available,
    );
    byte(
        s,
        SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        p.subscription_identifier_available,
    );
    byte(
        s,
        SHARED_SUBSCRIPTION_AVAILABLE,
        p.shared_subscription_available,
    );
}

/// Size of the property list of `p` for `kind`, without its length prefix.
#[inline]
pub(crate) fn len(p: &Properties, kind: PropKind) -> usize {
    if kind == PropKind::Publish && !has_message_properties(p) {
        // The hot path: a PUBLISH without properties.
        return 0;
    }
    let mut l = Len(0);
    walk(p, kind, &mut l);
    l.0
}

/// True when any property a PUBLISH may carry is set.
#[inline]
fn has_message_properties(p: &Properties) -> bool {
    p.payload_format_indicator.is_some()
        || p.message_expiry_interval.is_some()
        || p.content_type.is_some()
        || p.response_topic.is_some()
        || p.correlation_data.is_some()
        || !p.subscription_identifiers.is_empty()
        || p.topic_alias.is_some()
        || !p.user_properties.is_empty()
}

/// Per-delivery PUBLISH properties laid over a message's own (which never
/// hold them): the remaining expiry, a topic alias, subscription ids.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PublishExtra<'a> {
    pub(crate) message_expiry_interval: Option<u32>,
    pub(crate) topic_alias: Option<u16>,
    pub(crate) subscription_identifiers: &'a [u32],
}

fn walk_extra<S: Sink>(e: &PublishExtra, s: &mut S) {
    if let Some(v) = e.message_expiry_interval {
        s.four(MESSAGE_EXPIRY_INTERVAL, v);
    }
    if let Some(v) = e.topic_alias {
        s.two(TOPIC_ALIAS, v);
    }
    for &v in e.subscription_identifiers {
        s.vbi(SUBSCRIPTION_IDENTIFIER, v);
    }
}

/// Size of the per-delivery properties, without a length prefix.
#[inline]
pub(crate) fn extra_len(e: &PublishExtra) -> usize {
    let mut l = Len(0);
    walk_extra(e, &mut l);
    l.0
}

/// Writes the length prefix `base_len + extra_len`, then the message's own
/// PUBLISH properties and the per-delivery ones.
pub(crate) fn encode_publish_view(
    base: Option<&Properties>,
    base_len: usize,
    extra: &PublishExtra,
    extra_len: usize,
    out: &mut BytesMut,
) {
    put_vbi(out, base_len + extra_len);
    if let Some(p) = base.filter(|_| base_len > 0) {
        walk(p, PropKind::Publish, &mut Write(out));
    }
    walk_extra(extra, &mut Write(out));
}

/// Size of the property length prefix plus a list of `len` bytes.
#[inline]
pub(crate) fn prefixed_len(len: usize) -> usize {
    vbi_len(len) + len
}

/// Writes the property length `len` (from [`len`]) and the property list.
pub(crate) fn encode(p: &Properties, kind: PropKind, len: usize, out: &mut BytesMut) {
    put_vbi(out, len);
    if len > 0 {
        walk(p, kind, &mut Write(out));
    }
}
