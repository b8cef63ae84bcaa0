//! The packet model: every MQTT 3.1 / 3.1.1 / 5.0 control packet as plain data.
//!
//! Pure data, no I/O. Shared by every shard; a `Packet` is `Send` so a decoded
//! CONNECT can travel with its connection to the client's home shard.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use bytes::Bytes;
use smallvec::SmallVec;

/// Protocol version, fixed by the CONNECT packet for the rest of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Version {
    /// MQTT 3.1: protocol name `MQIsdp`, level 3.
    V3_1,
    /// MQTT 3.1.1: protocol name `MQTT`, level 4.
    V3_1_1,
    /// MQTT 5.0: protocol name `MQTT`, level 5.
    V5,
}

impl Version {
    /// True for MQTT 5.0, the only version with properties and reason codes.
    pub fn is_v5(self) -> bool {
        self == Version::V5
    }
}

/// Quality of service of a PUBLISH or a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum QoS {
    /// At most once.
    #[default]
    AtMostOnce = 0,
    /// At least once.
    AtLeastOnce = 1,
    /// Exactly once.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for a wire value 0..=2, `None` for 3 and above.
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// A topic name: UTF-8, cheap to clone and `Send`, so one decoded topic is
/// shared by every delivery of a message on every shard.
pub type Topic = Arc<str>;

/// MQTT 5.0 properties. One struct serves every packet kind; the decoder
/// refuses a property that the packet kind does not allow
/// (`[MQTT-2.2.2-2]`), and the encoder writes only the fields that are set.
/// For MQTT 3.x packets it stays empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Properties {
    /// 0x01, PUBLISH / will: 0 = bytes, 1 = UTF-8.
    pub payload_format_indicator: Option<u8>,
    /// 0x02, PUBLISH / will: seconds.
    pub message_expiry_interval: Option<u32>,
    /// 0x03, PUBLISH / will.
    pub content_type: Option<String>,
    /// 0x08, PUBLISH / will.
    pub response_topic: Option<String>,
    /// 0x09, PUBLISH / will.
    pub correlation_data: Option<Bytes>,
    /// 0x0B, PUBLISH (several, server to client) / SUBSCRIBE (one); never 0.
    pub subscription_identifiers: SmallVec<[u32; 1]>,
    /// 0x11, CONNECT / CONNACK / DISCONNECT: seconds.
    pub session_expiry_interval: Option<u32>,
    /// 0x12, CONNACK.
    pub assigned_client_identifier: Option<String>,
    /// 0x13, CONNACK: seconds.
    pub server_keep_alive: Option<u16>,
    /// 0x15, CONNECT / CONNACK / AUTH.
    pub authentication_method: Option<String>,
    /// 0x16, CONNECT / CONNACK / AUTH.
    pub authentication_data: Option<Bytes>,
    /// 0x17, CONNECT: 0 or 1.
    pub request_problem_information: Option<u8>,
    /// 0x18, will: seconds.
    pub will_delay_interval: Option<u32>,
    /// 0x19, CONNECT: 0 or 1.
    pub request_response_information: Option<u8>,
    /// 0x1A, CONNACK.
    pub response_information: Option<String>,
    /// 0x1C, CONNACK / DISCONNECT.
    pub server_reference: Option<String>,
    /// 0x1F, CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, DISCONNECT, AUTH.
    pub reason_string: Option<String>,
    /// 0x21, CONNECT / CONNACK: never 0.
    pub receive_maximum: Option<u16>,
    /// 0x22, CONNECT / CONNACK.
    pub topic_alias_maximum: Option<u16>,
    /// 0x23, PUBLISH: never 0.
    pub topic_alias: Option<u16>,
    /// 0x24, CONNACK: 0 or 1.
    pub maximum_qos: Option<u8>,
    /// 0x25, CONNACK: 0 or 1.
    pub retain_available: Option<u8>,
    /// 0x26, every packet with properties; order is kept.
    pub user_properties: Vec<(String, String)>,
    /// 0x27, CONNECT / CONNACK: bytes, never 0.
    pub maximum_packet_size: Option<u32>,
    /// 0x28, CONNACK: 0 or 1.
    pub wildcard_subscription_available: Option<u8>,
    /// 0x29, CONNACK: 0 or 1.
    pub subscription_identifier_available: Option<u8>,
    /// 0x2A, CONNACK: 0 or 1.
    pub shared_subscription_available: Option<u8>,
}

/// Properties as a message or packet holds them: boxed when there are
/// any. Most have none (every 3.x packet), and a message is written once
/// and read on every shard it reaches: inline, the properties were three
/// quarters of its bytes. A decoded packet is moved several times on its
/// way through a shard: inline, they made every `Packet` 400 bytes, and
/// the moves a tenth of the broker's CPU on the pairs rows.
/// Reads of a message without properties see empty ones; a write boxes
/// them. Equal when the properties are, boxed or not.
///
/// A message whose only property is a Payload Format Indicator boxes it
/// too (one allocation more): holding that case unboxed made this type 16
/// bytes instead of 8, and every message measured 4 to 9 % more broker CPU
/// (`loadtest/before-after.sh`, 6 rounds).
#[derive(Debug, Clone, Default)]
pub struct BoxedProperties(Option<Box<Properties>>);

/// What a message without properties reads.
static NO_PROPERTIES: Properties = Properties::EMPTY;

impl From<Properties> for BoxedProperties {
    fn from(p: Properties) -> BoxedProperties {
        BoxedProperties((!p.is_empty()).then(|| Box::new(p)))
    }
}

impl Deref for BoxedProperties {
    type Target = Properties;

    fn deref(&self) -> &Properties {
        self.0.as_deref().unwrap_or(&NO_PROPERTIES)
    }
}

impl DerefMut for BoxedProperties {
    fn deref_mut(&mut self) -> &mut Properties {
        self.0.get_or_insert_with(Box::default)
    }
}

impl PartialEq for BoxedProperties {
    fn eq(&self, other: &BoxedProperties) -> bool {
        **self == **other
    }
}

impl Eq for BoxedProperties {}

impl BoxedProperties {
    /// The properties, copied.
    pub fn to_properties(&self) -> Properties {
        Properties::clone(self)
    }

    /// The properties, taken.
    pub fn into_properties(self) -> Properties {
        self.0.map_or_else(Properties::default, |p| *p)
    }

    /// The properties to change, if there are any. Unlike `deref_mut`,
    /// never boxes empty ones.
    pub fn get_mut(&mut self) -> Option<&mut Properties> {
        self.0.as_deref_mut()
    }

    /// Let go of the box when nothing in it is set any more.
    pub fn shrink(&mut self) {
        if self.0.as_deref().is_some_and(Properties::is_empty) {
            self.0 = None;
        }
    }
}

impl Properties {
    /// No property set: the default.
    pub const EMPTY: Properties = Properties {
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        subscription_identifiers: SmallVec::new_const(),
        session_expiry_interval: None,
        assigned_client_identifier: None,
        server_keep_alive: None,
        authentication_method: None,
        authentication_data: None,
        request_problem_information: None,
        will_delay_interval: None,
        request_response_information: None,
        response_information: None,
        server_reference: None,
        reason_string: None,
        receive_maximum: None,
        topic_alias_maximum: None,
        topic_alias: None,
        maximum_qos: None,
        retain_available: None,
        user_properties: Vec::new(),
        maximum_packet_size: None,
        wildcard_subscription_available: None,
        subscription_identifier_available: None,
        shared_subscription_available: None,
    };

    /// True when no property is set, so a 3.x encoder or a reader can skip it.
    pub fn is_empty(&self) -> bool {
        *self == Properties::EMPTY
    }
}

impl Default for Properties {
    fn default() -> Properties {
        Properties::EMPTY
    }
}

/// Every MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// 1: client → server, first packet of a connection.
    Connect(Box<Connect>),
    /// 2: server → client.
    ConnAck(ConnAck),
    /// 3: both ways.
    Publish(Publish),
    /// 4: QoS 1 acknowledgement.
    PubAck(PubResp),
    /// 5: QoS 2, first acknowledgement.
    PubRec(PubResp),
    /// 6: QoS 2 release (fixed header flags 0b0010).
    PubRel(PubResp),
    /// 7: QoS 2 completion.
    PubComp(PubResp),
    /// 8: client → server (fixed header flags 0b0010).
    Subscribe(Subscribe),
    /// 9: server → client.
    SubAck(SubAck),
    /// 10: client → server (fixed header flags 0b0010).
    Unsubscribe(Unsubscribe),
    /// 11: server → client.
    UnsubAck(UnsubAck),
    /// 12.
    PingReq,
    /// 13.
    PingResp,
    /// 14: both ways; MQTT 3.x has no body.
    Disconnect(Disconnect),
    /// 15: MQTT 5.0 only.
    Auth(Auth),
}

/// CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// From protocol name and level.
    pub version: Version,
    /// Clean Session (3.x) / Clean Start (5.0).
    pub clean_start: bool,
    /// Seconds; 0 disables keepalive.
    pub keep_alive: u16,
    /// May be empty.
    pub client_id: String,
    /// Present when the Will Flag is set.
    pub will: Option<Will>,
    /// Present when the User Name Flag is set.
    pub username: Option<String>,
    /// Present when the Password Flag is set.
    pub password: Option<Bytes>,
    /// 5.0 CONNECT properties.
    pub properties: Properties,
}

/// The will message carried by CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Will Topic.
    pub topic: Topic,
    /// Will Payload.
    pub payload: Bytes,
    /// Will QoS.
    pub qos: QoS,
    /// Will Retain.
    pub retain: bool,
    /// 5.0 will properties (will delay, expiry, content type, ...).
    pub properties: Properties,
}

/// CONNACK. `reason` is always an MQTT 5.0 reason code; the encoder maps it to
/// a 3.x return code (0x84 → 1, 0x85 → 2, 0x86 and 0x8C → 4, 0x87 and 0x8A →
/// 5, other failures → 3) and the decoder maps 3.x return codes back.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnAck {
    /// Session Present flag.
    pub session_present: bool,
    /// Reason code (5.0 numbering).
    pub reason: u8,
    /// 5.0 CONNACK properties.
    pub properties: BoxedProperties,
}

/// PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// DUP flag.
    pub dup: bool,
    /// QoS from the fixed header.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name; may be empty in 5.0 when a topic alias is set.
    pub topic: Topic,
    /// Packet identifier; 0 for QoS 0 (not on the wire).
    pub packet_id: u16,
    /// Application payload, shared (never copied) between deliveries.
    pub payload: Bytes,
    /// 5.0 PUBLISH properties.
    pub properties: BoxedProperties,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP: a packet id and, in 5.0, a reason code.
/// The 5.0 encoder omits reason and properties when the reason is 0 and there
/// are no properties; the decoder reads a missing reason as 0.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PubResp {
    /// Packet identifier, never 0.
    pub packet_id: u16,
    /// Reason code, 0x00 = success.
    pub reason: u8,
    /// 5.0 properties (reason string, user properties).
    pub properties: BoxedProperties,
}

/// Subscription options of one filter in SUBSCRIBE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubOptions {
    /// Maximum QoS.
    pub qos: QoS,
    /// 5.0 No Local.
    pub no_local: bool,
    /// 5.0 Retain As Published.
    pub retain_as_published: bool,
    /// 5.0 Retain Handling, 0..=2.
    pub retain_handling: u8,
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet identifier, never 0.
    pub packet_id: u16,
    /// Topic filters with their options; at least one.
    pub filters: Vec<(String, SubOptions)>,
    /// 5.0 properties (subscription identifier, user properties).
    pub properties: BoxedProperties,
}

/// SUBACK; one reason code per filter (3.x: 0, 1, 2 or 0x80).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// Packet identifier of the SUBSCRIBE.
    pub packet_id: u16,
    /// One per filter, in order.
    pub reasons: Vec<u8>,
    /// 5.0 properties.
    pub properties: BoxedProperties,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet identifier, never 0.
    pub packet_id: u16,
    /// Topic filters; at least one.
    pub filters: Vec<String>,
    /// 5.0 properties (user properties).
    pub properties: BoxedProperties,
}

/// UNSUBACK; 5.0 has one reason per filter, 3.x has none (empty vector).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    /// Packet identifier of the UNSUBSCRIBE.
    pub packet_id: u16,
    /// 5.0 reason codes, one per filter; empty for 3.x.
    pub reasons: Vec<u8>,
    /// 5.0 properties.
    pub properties: BoxedProperties,
}

/// DISCONNECT. 3.x: always reason 0 and no properties.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect {
    /// Reason code, 0x00 normal disconnection.
    pub reason: u8,
    /// 5.0 properties (session expiry, reason string, server reference).
    pub properties: BoxedProperties,
}

/// AUTH (5.0 only).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Auth {
    /// Reason code: 0x00 success, 0x18 continue, 0x19 re-authenticate.
    pub reason: u8,
    /// Properties (authentication method and data).
    pub properties: BoxedProperties,
}

/// MQTT 5.0 reason codes used by the broker, by name.
pub mod reason {
    #![allow(missing_docs)]
    pub const SUCCESS: u8 = 0x00;
    pub const GRANTED_QOS_1: u8 = 0x01;
    pub const GRANTED_QOS_2: u8 = 0x02;
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const CONTINUE_AUTHENTICATION: u8 = 0x18;
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const BANNED: u8 = 0x8A;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_IDENTIFIER_IN_USE: u8 = 0x91;
    pub const PACKET_IDENTIFIER_NOT_FOUND: u8 = 0x92;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    pub const USE_ANOTHER_SERVER: u8 = 0x9C;
    pub const SERVER_MOVED: u8 = 0x9D;
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
    pub const MAXIMUM_CONNECT_TIME: u8 = 0xA0;
    pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: u8 = 0xA1;
    pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;
}
