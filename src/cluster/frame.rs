//! The bridge's frames: what one node's shard says to a peer's shard over
//! their TCP link, and their binary form.
//!
//! Sans-IO and runtime-free, like `codec`: [`encode`] appends one frame to
//! a buffer, [`decode`] takes one complete frame off the front of a buffer
//! (or says it needs more bytes). Everything read is hostile until checked:
//! lengths are bounded before anything is allocated, strings are UTF-8 and
//! bounded, node names are checked, and a frame must be used up exactly.
//!
//! A frame is a 4-byte big-endian length (of what follows), a kind byte and
//! the body. Integers are big-endian; a string is a 2-byte length and
//! UTF-8. A message travels as its remaining expiry (ms; nodes share no
//! clock), its publisher, and an MQTT 5.0 PUBLISH of the rest, through the
//! codec's own encoder and decoder. [`Hello`] opens every link and carries
//! the protocol version; within one version every kind is known, so an
//! unknown kind is an error.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use thiserror::Error;

use super::node::NodeName;
use crate::codec::{self, Packet, Version};
use crate::log::ship::{Chunk, Have};
use crate::log::RecordAt;
use crate::message::Message;
use crate::router::SharedPick;

/// The bridge protocol version this node speaks.
pub const BRIDGE_VERSION: u16 = 12;
/// Bytes before a frame's body: its length and kind.
pub const FRAME_HEADER_BYTES: usize = 5;
/// Longest topic filter or other string in a frame, in bytes (the MQTT
/// limit).
pub const STRING_MAX: usize = 65_535;

/// Most levels in a topic or filter a frame may carry: the most
/// `mqtt.topic_levels_max` allows.
pub const LEVELS_MAX: usize = 65_535;

mod kind {
    pub const HELLO: u8 = 1;
    pub const REFUSE: u8 = 2;
    pub const ROUTE_SNAPSHOT: u8 = 3;
    pub const ROUTE_DELTA: u8 = 4;
    pub const ROUTE_ACK: u8 = 5;
    pub const PUBLISH: u8 = 6;
    pub const PING: u8 = 7;
    pub const PONG: u8 = 8;
    pub const WILL_SNAPSHOT: u8 = 9;
    pub const WILL_SET: u8 = 10;
    pub const WILL_CLEAR: u8 = 11;
    pub const RETAINED: u8 = 12;
    pub const CLAIMS: u8 = 13;
    pub const CLAIM_ACKS: u8 = 14;
    pub const DELIVERED: u8 = 15;
    pub const AUTH: u8 = 16;
    pub const RECORD: u8 = 17;
    pub const SESSION_OFFER: u8 = 18;
    pub const SESSION_TAKE: u8 = 19;
    pub const SESSION_MOVED: u8 = 20;
    pub const MOVE_FENCE: u8 = 21;
    pub const MOVE_FENCE_DONE: u8 = 22;
    pub const LOG_CHUNK: u8 = 23;
    pub const LOG_HAVE: u8 = 24;
    pub const ADOPTED: u8 = 25;
    pub const SESSION_STORED: u8 = 26;
    pub const ORPHANED: u8 = 27;
}

/// The first frame each side of a link sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// [`BRIDGE_VERSION`] of the sender.
    pub version: u16,
    /// The sender's cluster-name tag (`membership::envelope`'s).
    pub cluster_tag: u32,
    /// The sending node.
    pub node: NodeName,
    /// Its incarnation.
    pub incarnation: u64,
    /// The address its membership is reached at (two nodes given one
    /// id differ here).
    pub addr: SocketAddr,
    /// The sending shard.
    pub shard: u16,
    /// Shards on the sending node.
    pub shards: u16,
    /// The sender holds a cluster secret (`cluster.secret_file`) and
    /// wants the link's handshake to prove it ([`Frame::Auth`]).
    pub auth: bool,
    /// The sending side's number for this link, unique within its run:
    /// with its incarnation it makes each proof of the secret fresh.
    pub nonce: u64,
}

/// Why a side refuses a link (it closes after the frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// Another protocol version.
    Version,
    /// Another cluster.
    Cluster,
    /// The sender is not a live member (or an older run of one).
    NotMember,
    /// Something else; the text says what.
    Other,
}

/// One route change of a node: it gained (`add`) or lost its last
/// ordinary subscriber of `filter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteChange {
    /// Gained (true) or lost (false).
    pub add: bool,
    /// The filter.
    pub filter: Arc<str>,
}

/// A frame; see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Opens a link.
    Hello(Hello),
    /// Refuses a link, with a reason and a line of text.
    Refuse {
        /// Why.
        reason: RefuseReason,
        /// For the peer's log.
        text: String,
    },
    /// Part of the sender's whole route table, as of `seq`. A snapshot is
    /// one or more of these; `last` ends it, and `digest` (of the whole
    /// table) is set there.
    RouteSnapshot {
        /// The sequence number the table is at.
        seq: u64,
        /// Filters in this part.
        filters: Vec<Arc<str>>,
        /// The last part.
        last: bool,
        /// [`route_digest`] of the whole table, on the last part.
        digest: u64,
    },
    /// One change after the table at `seq - 1`.
    RouteDelta {
        /// Its sequence number.
        seq: u64,
        /// The change.
        change: RouteChange,
    },
    /// The receiver applied everything up to `seq`.
    RouteAck {
        /// The highest sequence number applied.
        seq: u64,
    },
    /// A message for the receiving node's own subscribers.
    Publish(RemotePublish),
    /// Keep-alive, with the sender's route sequence and digest so the
    /// receiver can check its copy.
    Ping {
        /// The sender's route sequence number.
        seq: u64,
        /// [`route_digest`] of its table at `seq`.
        digest: u64,
    },
    /// Answer to a Ping.
    Pong,
    /// The receiver of a link's messages has handed every one up to
    /// [`RemotePublish::seq`] `seq` to its shards: the sender forgets
    /// them.
    Delivered {
        /// The highest message number handed on.
        seq: u64,
    },
    /// Part of the sending shard's wills: a snapshot is one or more of
    /// these, from `first` (the receiver starts a new table) to `last`
    /// (the new table replaces the old one).
    WillSnapshot {
        /// The wills in this part.
        wills: Vec<WillEntry>,
        /// The first part.
        first: bool,
        /// The last part.
        last: bool,
    },
    /// A client of the sending shard has this will now (replacing any).
    WillSet(Box<WillEntry>),
    /// A client of the sending shard has no will any more.
    WillClear {
        /// The client id.
        client_id: Arc<str>,
    },
    /// Retained messages (an empty payload: a delete) with their stamps,
    /// for the receiver to keep where they are newer than its own: a
    /// change as it happens, or part of the sender's store when a link
    /// comes up.
    Retained(Vec<RetainedEntry>),
    /// Client ids with a live connection on the sending node, each with
    /// the stamp of its claim (`cluster::claims`): one as it connects
    /// (`answer`: the receiver acknowledges it once it closed any older
    /// connection of that client id), or every one when a link comes up
    /// (unanswered, but for a connection still waiting to resume a
    /// session: asked alone, answered).
    Claims {
        /// The claims.
        claims: Vec<ClaimEntry>,
        /// Acknowledge each ([`Frame::ClaimAcks`]).
        answer: bool,
    },
    /// Claims of the receiving node that the sender has applied (its own
    /// older connections of those client ids are closed), numbered in the
    /// sender's stream ([`Frame::stream_seq`]): an acknowledgement follows
    /// the offer of a session sent before it, even across a new link.
    ClaimAcks {
        /// Its number in the sender's stream.
        seq: u64,
        /// The claims.
        acks: Vec<ClaimEntry>,
    },
    /// Proof of the cluster secret in a link's handshake (`link`): the
    /// accepting side's first answer, then the dialing side's.
    Auth {
        /// The accepting side's number for this link (0 from the dialer).
        nonce: u64,
        /// The HMAC-SHA256 tag (`cluster::secret`).
        tag: [u8; 32],
    },
    /// With a cluster secret, after the handshake: frames written at
    /// once, encrypted with their tag at the end
    /// (`cluster::secret::RecordCipher`); nothing else crosses the link.
    Record(BytesMut),
    /// The sender holds a session for a client that connected on the
    /// receiver (its answered claim): the session's subscriptions, for the
    /// receiver to route before it takes the rest
    /// ([`Frame::SessionTake`]); sent before the claim's acknowledgement.
    SessionOffer(Box<SessionOffer>),
    /// The receiver routes what the sender offered for `client_id`: send
    /// the rest of the session and end it there.
    SessionTake {
        /// Its number in the sender's stream ([`Frame::stream_seq`]).
        seq: u64,
        /// The client id.
        client_id: Arc<str>,
        /// The claim the offer answered.
        claim: u64,
    },
    /// Part of a session that moves from the sender to the receiver (the
    /// answer to a [`Frame::SessionTake`]); `last` ends it.
    SessionMoved(Box<SessionMoved>),
    /// Answer with [`Frame::MoveFenceDone`] behind every message sent to
    /// the sender so far (a session there is about to move away).
    MoveFence {
        /// Its number in the sender's stream ([`Frame::stream_seq`]).
        seq: u64,
        /// Chosen by the sender.
        id: u64,
    },
    /// The answer to a [`Frame::MoveFence`], numbered in the stream of
    /// the answering shard's messages to the receiver (so it follows
    /// them, replayed ones included).
    MoveFenceDone {
        /// Its number in that stream.
        seq: u64,
        /// The fence's id.
        id: u64,
    },
    /// Records of shard `shard`'s log for the receiver's copy of it
    /// (`log::ship`): the receiver is a standby of the sender.
    LogChunk {
        /// The sending node's shard whose log it is.
        shard: u16,
        /// The records.
        chunk: Box<Chunk>,
    },
    /// What the receiver's copy of shard `shard`'s log holds: the answer
    /// to each [`Frame::LogChunk`].
    LogHave {
        /// The receiving node's shard whose log it is.
        shard: u16,
        /// What the copy holds.
        have: Have,
    },
    /// The sender, next after a node declared down, is done with that
    /// run's sessions (`shard::adopt`): taken over, or not taken at all. A
    /// CONNECT that resumes a session may be served from now on.
    Adopted {
        /// The dead node.
        node: NodeName,
        /// Its run.
        incarnation: u64,
    },
    /// The session of `client_id` that moved from the receiver to the
    /// sender for claim `claim` is in the sender's log and in its
    /// standbys' copies of it: the receiver forgets the copy it kept.
    SessionStored {
        /// Its number in the sender's stream ([`Frame::stream_seq`]).
        seq: u64,
        /// The client id.
        client_id: Arc<str>,
        /// The claim the move answered.
        claim: u64,
    },
    /// Part of a session the sender moved to a node that was declared
    /// down before it said the session was in its standbys' copies: for
    /// the receiver, next after that node, to take in unless it took the
    /// same session over from its copy of that node's log.
    Orphaned(Box<Orphaned>),
}

impl Frame {
    /// Its number in the sending shard's stream of frames to the
    /// receiving node, for the frames kept until the receiver confirms
    /// them ([`Frame::Delivered`]) and replayed on the next link: messages
    /// and what moves a session. None for the others.
    pub fn stream_seq(&self) -> Option<u64> {
        match self {
            Frame::Publish(p) => Some(p.seq),
            Frame::SessionOffer(o) => Some(o.seq),
            Frame::SessionMoved(m) => Some(m.seq),
            Frame::SessionTake { seq, .. }
            | Frame::MoveFence { seq, .. }
            | Frame::MoveFenceDone { seq, .. }
            | Frame::SessionStored { seq, .. }
            | Frame::ClaimAcks { seq, .. } => Some(*seq),
            Frame::Orphaned(o) => Some(o.seq),
            _ => None,
        }
    }

    /// Give it its number in that stream (frames without one: nothing).
    pub fn set_stream_seq(&mut self, to: u64) {
        match self {
            Frame::Publish(p) => p.seq = to,
            Frame::SessionOffer(o) => o.seq = to,
            Frame::SessionMoved(m) => m.seq = to,
            Frame::SessionTake { seq, .. }
            | Frame::MoveFence { seq, .. }
            | Frame::MoveFenceDone { seq, .. }
            | Frame::SessionStored { seq, .. }
            | Frame::ClaimAcks { seq, .. } => *seq = to,
            Frame::Orphaned(o) => o.seq = to,
            _ => {}
        }
    }
}

/// A session offered to the node its client connected to.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionOffer {
    /// Its number in the sender's stream to the receiver
    /// ([`Frame::stream_seq`]).
    pub seq: u64,
    /// The client id.
    pub client_id: Arc<str>,
    /// The stamp of the claim it answers (names the move).
    pub claim: u64,
    /// The stamp of the claim that created the session (0: unknown): of
    /// two copies of a session that a partition let live, the one born
    /// later is the one its client was last told about.
    pub born: u64,
    /// The session's subscriptions by full filter.
    pub subscriptions: Vec<(String, crate::session::Subscription)>,
    /// What had reached the session when it was offered (as
    /// [`SessionMoved::seen`]): what the receiver skips even if the rest
    /// never comes.
    pub seen: Vec<OriginMark>,
}

/// The messages of one origin (the high half of
/// [`crate::message::Message::id`]) that reached a session: the lowest
/// and the highest id. Those between that its subscriptions matched
/// reached it (taken as had: a copy merged from elsewhere keeps its own
/// range unless the two overlap); those below came before it had any. A
/// mark whose lowest and highest are the same is that one message alone
/// (one that reached the session outside its origin's order, say): the
/// receiver widens no range with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginMark {
    /// The origin.
    pub origin: u32,
    /// The first id that reached the session.
    pub low: u64,
    /// The last.
    pub high: u64,
}

/// Part of a moving session: its deliveries in order (in flight first,
/// then queued), and with the last part its inbound QoS 2 state.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionMoved {
    /// Its number in the sender's stream of messages to the receiver
    /// (as [`RemotePublish::seq`]): kept until confirmed, replayed on the
    /// next link.
    pub seq: u64,
    /// The client id.
    pub client_id: Arc<str>,
    /// The claim the move answers.
    pub claim: u64,
    /// Deliveries in this part.
    pub deliveries: Vec<MovedDelivery>,
    /// Inbound QoS 2 packet ids not yet released (the last part).
    pub qos2_in: Vec<u16>,
    /// The last part: what reached the session on the sender, per
    /// message origin. A copy within it, of a topic the session's
    /// subscriptions there match, was had there.
    pub seen: Vec<OriginMark>,
    /// The last part: the session has ended on the sender.
    pub last: bool,
    /// Nothing moves: the session stays on the sender (its client came
    /// back there), and the receiver drops the subscriptions it took from
    /// the offer.
    pub stays: bool,
}

/// Part of a session orphaned by a node's death ([`Frame::Orphaned`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Orphaned {
    /// Its number in the sender's stream ([`Frame::stream_seq`]).
    pub seq: u64,
    /// The node the session moved to, declared down.
    pub node: NodeName,
    /// That node's run.
    pub incarnation: u64,
    /// The client id.
    pub client_id: Arc<str>,
    /// The claim the move answered.
    pub claim: u64,
    /// Session Expiry Interval, seconds.
    pub expiry_s: u32,
    /// Its subscriptions by full filter (the first part).
    pub subscriptions: Vec<(String, crate::session::Subscription)>,
    /// Inbound QoS 2 packet ids not yet released (the last part).
    pub qos2_in: Vec<u16>,
    /// Deliveries in this part, in order (in flight first).
    pub deliveries: Vec<MovedDelivery>,
}

/// One delivery of a moving session.
#[derive(Debug, Clone, PartialEq)]
pub struct MovedDelivery {
    /// The message.
    pub message: Arc<Message>,
    /// Delivery QoS.
    pub qos: crate::codec::QoS,
    /// RETAIN flag to send.
    pub retain: bool,
    /// Subscription identifiers.
    pub subscription_ids: crate::session::SubIds,
    /// In flight: the packet id it was sent with (0: queued).
    pub packet_id: u16,
    /// QoS 2 past PUBREC (PUBREL is what is resent).
    pub released: bool,
}

/// A live connection's claim of its client id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimEntry {
    /// The client id.
    pub client_id: Arc<str>,
    /// Its hybrid-logical-clock stamp (Unix ms).
    pub stamp: u64,
    /// The client connected with Clean Start (in a link's snapshot: or
    /// was told it had no session): a node where the client id has an
    /// older session ends it.
    pub clean_start: bool,
}

/// One version of a retained topic (`cluster::retained`).
#[derive(Debug, Clone, PartialEq)]
pub struct RetainedEntry {
    /// Its hybrid-logical-clock stamp (Unix ms).
    pub stamp: u64,
    /// The message; an empty payload deletes the topic's.
    pub message: Arc<Message>,
}

/// A will a node holds for one of its clients, as its peers keep it: what
/// they publish if the node's run ends without it.
#[derive(Debug, Clone, PartialEq)]
pub struct WillEntry {
    /// The client id.
    pub client_id: Arc<str>,
    /// The will (its Will Delay Interval left out: `delay_ms` says when).
    pub will: crate::codec::Will,
    /// When the will is due, in ms: for a connected client, its will
    /// delay (or session expiry, if earlier) after the end of the node's
    /// run; for a client already gone (`waiting`), what is left of its
    /// delay from when this was sent.
    pub delay_ms: u64,
    /// The will is waiting for its delay already: `delay_ms` counts from
    /// now, not from the end of the run.
    pub waiting: bool,
}

/// A message for a remote node, and for whom there: its ordinary
/// subscribers, and one member of each shared subscription listed (the
/// publishing node chose that node to serve them).
#[derive(Debug, Clone, PartialEq)]
pub struct RemotePublish {
    /// Its number in the stream of messages from the sending shard's run
    /// to the receiving node (1, 2, ...; given by the sender's bridge, 0
    /// before): a link that breaks is replayed on the next from the first
    /// message not [`Frame::Delivered`], and the receiver skips those it
    /// had.
    pub seq: u64,
    /// The message.
    pub message: Arc<Message>,
    /// For the node's ordinary subscribers.
    pub ordinary: bool,
    /// Shared subscriptions the node serves for this message.
    pub shared: Vec<SharedPick>,
    /// The sender was given these shared subscriptions by another node
    /// and had no member of them (its member left, or the route it was
    /// picked by was stale): the receiver serves them with a member of
    /// its own or drops them (counted), never passing them on again.
    pub passed_on: bool,
    /// For the sessions the receiver took over from that node's run
    /// (name, incarnation), declared down before it confirmed the message
    /// (`shard::adopt`): only those take it (`ordinary` and `shared`
    /// aside).
    pub adopted_of: Option<(NodeName, u64)>,
    /// Sent again on a link that came up after it was routed (a broken
    /// link's replay, or one that waited for the link): the peer's routes
    /// may have changed meanwhile, and its sessions do not take it as a
    /// sign of what came before it from its origin ([`Message::late`]).
    pub late: bool,
}

/// A frame that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// Longer than the receiver takes.
    #[error("a {len}-byte frame, more than the {max} bytes allowed")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// Not a frame of this version.
    #[error("malformed bridge frame: {0}")]
    Malformed(&'static str),
}

/// Bytes of a [`Frame::Record`]'s header: the length and the kind; the
/// record's frames follow.
pub const RECORD_HEADER_BYTES: usize = 5;

/// Start a [`Frame::Record`] at the end of `out`: its header, the length
/// filled in by [`end_record`]. Frames encoded after it are its plaintext.
pub fn begin_record(out: &mut BytesMut) -> usize {
    let at = out.len();
    out.put_u32(0);
    out.put_u8(kind::RECORD);
    at
}

/// End the record begun at `at`: `seal` encrypts the plaintext in place
/// and gives the tag, appended; the length is filled in.
pub fn end_record(out: &mut BytesMut, at: usize, seal: impl FnOnce(&mut [u8]) -> [u8; 16]) {
    let tag = seal(&mut out[at + RECORD_HEADER_BYTES..]);
    out.put_slice(&tag);
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// An order-independent digest of a route table: the XOR of each filter's
/// CRC-32C, spread to 64 bits. Equal tables give equal digests; a mismatch
/// makes the receiver ask for a new snapshot.
pub fn route_digest<'a>(filters: impl IntoIterator<Item = &'a str>) -> u64 {
    filters.into_iter().fold(0, |d, f| d ^ filter_digest(f))
}

/// One filter's share of [`route_digest`] (XOR it in or out).
pub fn filter_digest(filter: &str) -> u64 {
    let c = u64::from(crc32c::crc32c(filter.as_bytes()));
    (c << 32 | c.rotate_left(13) & 0xffff_ffff) ^ filter.len() as u64
}

/// Append `frame` to `out`. `now` turns a message's expiry into the time
/// left.
pub fn encode(frame: &Frame, now: Instant, out: &mut BytesMut) {
    let start = out.len();
    out.put_u32(0);
    match frame {
        Frame::Hello(h) => {
            out.put_u8(kind::HELLO);
            out.put_u16(h.version);
            out.put_u32(h.cluster_tag);
            put_str(out, h.node.as_str());
            out.put_u64(h.incarnation);
            out.put_u16(h.shard);
            out.put_u16(h.shards);
            // (A node of version 1 reads its six fields and finds bytes
            // left over: it logs a malformed frame, not the version.)
            put_str(out, &h.addr.to_string());
            out.put_u8(u8::from(h.auth));
            out.put_u64(h.nonce);
        }
        Frame::Auth { nonce, tag } => {
            out.put_u8(kind::AUTH);
            out.put_u64(*nonce);
            out.put_slice(tag);
        }
        Frame::Record(body) => {
            out.put_u8(kind::RECORD);
            out.put_slice(body);
        }
        Frame::Refuse { reason, text } => {
            out.put_u8(kind::REFUSE);
            out.put_u8(match reason {
                RefuseReason::Version => 1,
                RefuseReason::Cluster => 2,
                RefuseReason::NotMember => 3,
                RefuseReason::Other => 0,
            });
            put_str(out, crate::text::cut(text, 512));
        }
        Frame::RouteSnapshot {
            seq,
            filters,
            last,
            digest,
        } => {
            out.put_u8(kind::ROUTE_SNAPSHOT);
            out.put_u64(*seq);
            out.put_u8(u8::from(*last));
            out.put_u64(*digest);
            out.put_u32(filters.len() as u32);
            for f in filters {
                put_str(out, f);
            }
        }
        Frame::RouteDelta { seq, change } => {
            out.put_u8(kind::ROUTE_DELTA);
            out.put_u64(*seq);
            out.put_u8(u8::from(change.add));
            put_str(out, &change.filter);
        }
        Frame::RouteAck { seq } => {
            out.put_u8(kind::ROUTE_ACK);
            out.put_u64(*seq);
        }
        Frame::Publish(p) => {
            out.put_u8(kind::PUBLISH);
            out.put_u64(p.seq);
            let adopted = u8::from(p.adopted_of.is_some()) << 2;
            let late = u8::from(p.late) << 3;
            out.put_u8(u8::from(p.ordinary) | u8::from(p.passed_on) << 1 | adopted | late);
            if let Some((node, run)) = &p.adopted_of {
                put_str(out, node.as_str());
                out.put_u64(*run);
            }
            out.put_u16(p.shared.len().min(usize::from(u16::MAX)) as u16);
            for pick in p.shared.iter().take(usize::from(u16::MAX)) {
                put_str(out, &pick.group);
                put_str(out, &pick.filter);
            }
            put_message(out, &p.message, now);
        }
        Frame::Ping { seq, digest } => {
            out.put_u8(kind::PING);
            out.put_u64(*seq);
            out.put_u64(*digest);
        }
        Frame::Pong => out.put_u8(kind::PONG),
        Frame::Delivered { seq } => {
            out.put_u8(kind::DELIVERED);
            out.put_u64(*seq);
        }
        Frame::WillSnapshot { wills, first, last } => {
            out.put_u8(kind::WILL_SNAPSHOT);
            out.put_u8(u8::from(*first));
            out.put_u8(u8::from(*last));
            out.put_u32(wills.len() as u32);
            for w in wills {
                put_will(out, w);
            }
        }
        Frame::WillSet(w) => {
            out.put_u8(kind::WILL_SET);
            put_will(out, w);
        }
        Frame::WillClear { client_id } => {
            out.put_u8(kind::WILL_CLEAR);
            put_str(out, client_id);
        }
        Frame::Claims { claims, answer } => {
            out.put_u8(kind::CLAIMS);
            out.put_u8(u8::from(*answer));
            put_claims(out, claims);
        }
        Frame::ClaimAcks { seq, acks: claims } => {
            out.put_u8(kind::CLAIM_ACKS);
            out.put_u64(*seq);
            put_claims(out, claims);
        }
        Frame::SessionOffer(o) => {
            out.put_u8(kind::SESSION_OFFER);
            out.put_u64(o.seq);
            put_str(out, &o.client_id);
            out.put_u64(o.claim);
            out.put_u64(o.born);
            put_subscriptions(out, &o.subscriptions);
            put_marks(out, &o.seen);
        }
        Frame::MoveFence { seq, id } => {
            out.put_u8(kind::MOVE_FENCE);
            out.put_u64(*seq);
            out.put_u64(*id);
        }
        Frame::MoveFenceDone { seq, id } => {
            out.put_u8(kind::MOVE_FENCE_DONE);
            out.put_u64(*seq);
            out.put_u64(*id);
        }
        Frame::LogChunk { shard, chunk: c } => {
            out.put_u8(kind::LOG_CHUNK);
            out.put_u16(*shard);
            out.put_u64(c.id);
            out.put_u64(c.generation);
            out.put_u64(c.segment_bytes);
            out.put_u64(c.at.segment);
            out.put_u64(c.at.offset);
            out.put_u64(c.seq);
            out.put_u8(u8::from(c.start.is_some()) | u8::from(c.waited) << 1);
            out.put_u64(c.start.unwrap_or(0));
            out.put_u64(c.oldest);
            out.put_u32(c.bytes.len() as u32);
            out.put_slice(&c.bytes);
        }
        Frame::Adopted { node, incarnation } => {
            out.put_u8(kind::ADOPTED);
            put_str(out, node.as_str());
            out.put_u64(*incarnation);
        }
        Frame::LogHave { shard, have: h } => {
            out.put_u8(kind::LOG_HAVE);
            out.put_u16(*shard);
            out.put_u64(h.id);
            out.put_u64(h.generation);
            let flags =
                u8::from(h.at.is_some()) | u8::from(h.whole) << 1 | u8::from(h.refused) << 2;
            out.put_u8(flags);
            let (at, next_seq) = h.at.unwrap_or_default();
            out.put_u64(at.segment);
            out.put_u64(at.offset);
            out.put_u64(next_seq);
        }
        Frame::SessionTake {
            seq,
            client_id,
            claim,
        } => {
            out.put_u8(kind::SESSION_TAKE);
            out.put_u64(*seq);
            put_str(out, client_id);
            out.put_u64(*claim);
        }
        Frame::SessionMoved(m) => {
            out.put_u8(kind::SESSION_MOVED);
            out.put_u64(m.seq);
            put_str(out, &m.client_id);
            out.put_u64(m.claim);
            out.put_u8(u8::from(m.last));
            out.put_u8(u8::from(m.stays));
            put_packet_ids(out, &m.qos2_in);
            put_marks(out, &m.seen);
            put_deliveries(out, &m.deliveries, now);
        }
        Frame::SessionStored {
            seq,
            client_id,
            claim,
        } => {
            out.put_u8(kind::SESSION_STORED);
            out.put_u64(*seq);
            put_str(out, client_id);
            out.put_u64(*claim);
        }
        Frame::Orphaned(o) => {
            out.put_u8(kind::ORPHANED);
            out.put_u64(o.seq);
            put_str(out, o.node.as_str());
            out.put_u64(o.incarnation);
            put_str(out, &o.client_id);
            out.put_u64(o.claim);
            out.put_u32(o.expiry_s);
            put_subscriptions(out, &o.subscriptions);
            put_packet_ids(out, &o.qos2_in);
            put_deliveries(out, &o.deliveries, now);
        }
        Frame::Retained(entries) => {
            out.put_u8(kind::RETAINED);
            out.put_u32(entries.len() as u32);
            for e in entries {
                out.put_u64(e.stamp);
                put_sized(out, |out| put_message(out, &e.message, now));
            }
        }
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Take one frame off the front of `buf`: `Ok(None)` while it is not all
/// there. A frame longer than `max_bytes` (body and kind) is refused as
/// soon as its length is read.
pub fn decode(
    buf: &mut BytesMut,
    now: Instant,
    max_bytes: usize,
) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max_bytes {
        return Err(FrameError::TooLarge {
            len,
            max: max_bytes,
        });
    }
    if len == 0 {
        return Err(FrameError::Malformed("empty frame"));
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    let mut body = buf.split_to(len);
    let frame = read_frame(&mut body, now)?;
    if !body.is_empty() {
        return Err(FrameError::Malformed("bytes left over after the frame"));
    }
    Ok(Some(frame))
}

fn read_frame(b: &mut BytesMut, now: Instant) -> Result<Frame, FrameError> {
    let k = u8_(b)?;
    Ok(match k {
        kind::HELLO => {
            let version = u16_(b)?;
            if version != BRIDGE_VERSION {
                // Another version's Hello: its layout is not ours, and
                // the link refuses it by its version alone.
                b.clear();
                return Ok(Frame::Hello(Hello {
                    version,
                    cluster_tag: 0,
                    node: NodeName::unknown(),
                    incarnation: 0,
                    addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                    shard: 0,
                    shards: 0,
                    auth: false,
                    nonce: 0,
                }));
            }
            let cluster_tag = u32_(b)?;
            let node =
                NodeName::new(&string(b)?).map_err(|_| FrameError::Malformed("node name"))?;
            let (incarnation, shard, shards) = (u64_(b)?, u16_(b)?, u16_(b)?);
            let addr = string(b)?
                .parse()
                .map_err(|_| FrameError::Malformed("node address"))?;
            let (auth, nonce) = (bool_(b)?, u64_(b)?);
            Frame::Hello(Hello {
                version,
                cluster_tag,
                node,
                incarnation,
                addr,
                shard,
                shards,
                auth,
                nonce,
            })
        }
        kind::AUTH => {
            let nonce = u64_(b)?;
            need(b, 32)?;
            let mut tag = [0u8; 32];
            b.copy_to_slice(&mut tag);
            Frame::Auth { nonce, tag }
        }
        kind::RECORD => Frame::Record(b.split()),
        kind::REFUSE => Frame::Refuse {
            reason: match u8_(b)? {
                1 => RefuseReason::Version,
                2 => RefuseReason::Cluster,
                3 => RefuseReason::NotMember,
                _ => RefuseReason::Other,
            },
            text: string(b)?,
        },
        kind::ROUTE_SNAPSHOT => {
            let seq = u64_(b)?;
            let last = bool_(b)?;
            let digest = u64_(b)?;
            let filters = list(b, 2, "snapshot count beyond the frame", filter)?;
            Frame::RouteSnapshot {
                seq,
                filters,
                last,
                digest,
            }
        }
        kind::ROUTE_DELTA => Frame::RouteDelta {
            seq: u64_(b)?,
            change: RouteChange {
                add: bool_(b)?,
                filter: filter(b)?,
            },
        },
        kind::ROUTE_ACK => Frame::RouteAck { seq: u64_(b)? },
        kind::PUBLISH => {
            let seq = u64_(b)?;
            let flags = u8_(b)?;
            if flags > 15 {
                return Err(FrameError::Malformed("unknown message flags"));
            }
            let (ordinary, passed_on, late) = (flags & 1 != 0, flags & 2 != 0, flags & 8 != 0);
            let adopted_of = match flags & 4 {
                0 => None,
                _ => {
                    let node = NodeName::new(&string(b)?)
                        .map_err(|_| FrameError::Malformed("node name"))?;
                    Some((node, u64_(b)?))
                }
            };
            let n = usize::from(u16_(b)?);
            if n > b.len() / 4 {
                return Err(FrameError::Malformed("shared count beyond the frame"));
            }
            let mut shared = Vec::with_capacity(n);
            for _ in 0..n {
                let group = string(b)?;
                let filter = string(b)?;
                let full = format!("$share/{group}/{filter}");
                if crate::router::topic::parse_shared(&full)
                    .ok()
                    .flatten()
                    .is_none()
                {
                    return Err(FrameError::Malformed("shared subscription"));
                }
                shared.push(SharedPick {
                    group: Arc::from(group),
                    filter: Arc::from(filter),
                });
            }
            Frame::Publish(RemotePublish {
                seq,
                message: Arc::new(message(b, now)?),
                ordinary,
                shared,
                passed_on,
                adopted_of,
                late,
            })
        }
        kind::PING => Frame::Ping {
            seq: u64_(b)?,
            digest: u64_(b)?,
        },
        kind::PONG => Frame::Pong,
        kind::DELIVERED => Frame::Delivered { seq: u64_(b)? },
        kind::WILL_SNAPSHOT => {
            let first = bool_(b)?;
            let last = bool_(b)?;
            let wills = list(b, 16, "will count beyond the frame", will)?;
            Frame::WillSnapshot { wills, first, last }
        }
        kind::WILL_SET => Frame::WillSet(Box::new(will(b)?)),
        kind::WILL_CLEAR => Frame::WillClear {
            client_id: client_id(b)?,
        },
        kind::CLAIMS => Frame::Claims {
            answer: bool_(b)?,
            claims: claims(b)?,
        },
        kind::CLAIM_ACKS => Frame::ClaimAcks {
            seq: u64_(b)?,
            acks: claims(b)?,
        },
        kind::RETAINED => {
            let entries = list(b, 16, "retained count beyond the frame", |b| {
                let stamp = u64_(b)?;
                let message = message(&mut sized(b)?, now)?;
                if !message.retain {
                    return Err(FrameError::Malformed("a retained entry without RETAIN"));
                }
                Ok(RetainedEntry {
                    stamp,
                    message: Arc::new(message),
                })
            })?;
            Frame::Retained(entries)
        }
        kind::SESSION_OFFER => {
            let seq = u64_(b)?;
            let client_id = client_id(b)?;
            let claim = u64_(b)?;
            let born = u64_(b)?;
            let subscriptions = subscriptions(b)?;
            Frame::SessionOffer(Box::new(SessionOffer {
                seq,
                client_id,
                claim,
                born,
                subscriptions,
                seen: marks(b)?,
            }))
        }
        kind::MOVE_FENCE => Frame::MoveFence {
            seq: u64_(b)?,
            id: u64_(b)?,
        },
        kind::MOVE_FENCE_DONE => Frame::MoveFenceDone {
            seq: u64_(b)?,
            id: u64_(b)?,
        },
        kind::ADOPTED => Frame::Adopted {
            node: NodeName::new(&string(b)?).map_err(|_| FrameError::Malformed("node name"))?,
            incarnation: u64_(b)?,
        },
        kind::LOG_CHUNK => {
            let shard = u16_(b)?;
            let (id, generation, segment_bytes) = (u64_(b)?, u64_(b)?, u64_(b)?);
            let at = RecordAt {
                segment: u64_(b)?,
                offset: u64_(b)?,
            };
            let seq = u64_(b)?;
            let (flags, whole_at) = (u8_(b)?, u64_(b)?);
            if flags > 3 {
                return Err(FrameError::Malformed("log chunk flags"));
            }
            let start = (flags & 1 != 0).then_some(whole_at);
            let waited = flags & 2 != 0;
            let oldest = u64_(b)?;
            let n = u32_(b)? as usize;
            need(b, n)?;
            let bytes = b.split_to(n).to_vec();
            Frame::LogChunk {
                shard,
                chunk: Box::new(Chunk {
                    id,
                    generation,
                    segment_bytes,
                    at,
                    seq,
                    start,
                    oldest,
                    bytes,
                    waited,
                }),
            }
        }
        kind::LOG_HAVE => {
            let shard = u16_(b)?;
            let (id, generation, flags) = (u64_(b)?, u64_(b)?, u8_(b)?);
            if flags > 7 {
                return Err(FrameError::Malformed("log have flags"));
            }
            let at = RecordAt {
                segment: u64_(b)?,
                offset: u64_(b)?,
            };
            let next_seq = u64_(b)?;
            Frame::LogHave {
                shard,
                have: Have {
                    id,
                    generation,
                    at: (flags & 1 != 0).then_some((at, next_seq)),
                    whole: flags & 2 != 0,
                    refused: flags & 4 != 0,
                },
            }
        }
        kind::SESSION_TAKE => Frame::SessionTake {
            seq: u64_(b)?,
            client_id: client_id(b)?,
            claim: u64_(b)?,
        },
        kind::SESSION_MOVED => {
            let seq = u64_(b)?;
            let client_id = client_id(b)?;
            let claim = u64_(b)?;
            let last = bool_(b)?;
            let stays = bool_(b)?;
            let qos2_in = packet_ids(b)?;
            let seen = marks(b)?;
            let deliveries = deliveries(b, now)?;
            Frame::SessionMoved(Box::new(SessionMoved {
                seq,
                client_id,
                claim,
                deliveries,
                qos2_in,
                seen,
                last,
                stays,
            }))
        }
        kind::SESSION_STORED => Frame::SessionStored {
            seq: u64_(b)?,
            client_id: client_id(b)?,
            claim: u64_(b)?,
        },
        kind::ORPHANED => Frame::Orphaned(Box::new(Orphaned {
            seq: u64_(b)?,
            node: NodeName::new(&string(b)?).map_err(|_| FrameError::Malformed("node name"))?,
            incarnation: u64_(b)?,
            client_id: client_id(b)?,
            claim: u64_(b)?,
            expiry_s: u32_(b)?,
            subscriptions: subscriptions(b)?,
            qos2_in: packet_ids(b)?,
            deliveries: deliveries(b, now)?,
        })),
        _ => return Err(FrameError::Malformed("unknown frame kind")),
    })
}

/// A session's subscriptions by full filter.
fn put_subscriptions(out: &mut BytesMut, subs: &[(String, crate::session::Subscription)]) {
    out.put_u32(subs.len() as u32);
    for (filter, sub) in subs {
        put_str(out, filter);
        out.put_u8(codec::encode_options(&sub.options, Version::V5));
        out.put_u32(sub.subscription_id.unwrap_or(0));
    }
}

/// What [`put_subscriptions`] wrote.
fn subscriptions(
    b: &mut BytesMut,
) -> Result<Vec<(String, crate::session::Subscription)>, FrameError> {
    list(b, 7, "subscription count beyond the frame", |b| {
        let filter = filter(b)?.to_string();
        let options = codec::decode_options(u8_(b)?, Version::V5)
            .map_err(|_| FrameError::Malformed("subscription options"))?;
        let id = u32_(b)?;
        let sub = crate::session::Subscription {
            options,
            subscription_id: (id != 0).then_some(id),
        };
        Ok((filter, sub))
    })
}

/// Inbound QoS 2 packet ids.
fn put_packet_ids(out: &mut BytesMut, ids: &[u16]) {
    out.put_u32(ids.len() as u32);
    for id in ids {
        out.put_u16(*id);
    }
}

/// What [`put_packet_ids`] wrote (none is 0).
fn packet_ids(b: &mut BytesMut) -> Result<Vec<u16>, FrameError> {
    list(b, 2, "packet id count beyond the frame", |b| {
        match u16_(b)? {
            0 => Err(FrameError::Malformed("packet id 0")),
            id => Ok(id),
        }
    })
}

/// A moving session's deliveries.
fn put_deliveries(out: &mut BytesMut, deliveries: &[MovedDelivery], now: Instant) {
    out.put_u32(deliveries.len() as u32);
    for d in deliveries {
        out.put_u8(d.qos as u8 | u8::from(d.retain) << 2 | u8::from(d.released) << 3);
        out.put_u16(d.packet_id);
        out.put_u32(d.subscription_ids.len() as u32);
        for id in &d.subscription_ids {
            out.put_u32(*id);
        }
        put_sized(out, |out| put_message(out, &d.message, now));
    }
}

/// What [`put_deliveries`] wrote.
fn deliveries(b: &mut BytesMut, now: Instant) -> Result<Vec<MovedDelivery>, FrameError> {
    list(b, 11, "delivery count beyond the frame", |b| {
        let flags = u8_(b)?;
        let qos = codec::QoS::from_u8(flags & 3).ok_or(FrameError::Malformed("QoS 3"))?;
        let packet_id = u16_(b)?;
        let ids = list(b, 4, "subscription id count beyond the frame", u32_)?;
        let message = message(&mut sized(b)?, now)?;
        Ok(MovedDelivery {
            message: Arc::new(message),
            qos,
            retain: flags & 4 != 0,
            subscription_ids: ids.into_iter().collect(),
            packet_id,
            released: flags & 8 != 0,
        })
    })
}

/// What reached a session, per origin ([`OriginMark`]).
fn put_marks(out: &mut BytesMut, marks: &[OriginMark]) {
    out.put_u32(marks.len() as u32);
    for m in marks {
        out.put_u32(m.origin);
        out.put_u64(m.low);
        out.put_u64(m.high);
    }
}

/// What [`put_marks`] wrote.
fn marks(b: &mut BytesMut) -> Result<Vec<OriginMark>, FrameError> {
    list(b, 20, "origin count beyond the frame", |b| {
        Ok(OriginMark {
            origin: u32_(b)?,
            low: u64_(b)?,
            high: u64_(b)?,
        })
    })
}

/// What `put` writes, behind its length in 4 bytes.
fn put_sized(out: &mut BytesMut, put: impl FnOnce(&mut BytesMut)) {
    let at = out.len();
    out.put_u32(0);
    put(out);
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// What [`put_sized`] wrote: the bytes its length names.
fn sized(b: &mut BytesMut) -> Result<BytesMut, FrameError> {
    let len = u32_(b)? as usize;
    need(b, len)?;
    Ok(b.split_to(len))
}

/// A message: its remaining expiry (ms), its publisher, its number in
/// the cluster, and the rest (to the end of `b` when read) as a 5.0
/// PUBLISH.
fn put_message(out: &mut BytesMut, m: &Message, now: Instant) {
    match m.expires_at {
        Some(t) => {
            let left = t.saturating_duration_since(now).as_millis();
            out.put_u8(1);
            out.put_u64(u64::try_from(left).unwrap_or(u64::MAX));
        }
        None => out.put_u8(0),
    }
    match &m.publisher {
        Some(p) => {
            out.put_u8(1);
            put_str(out, p);
        }
        None => out.put_u8(0),
    }
    out.put_u64(m.id);
    codec::encode_publish(&m.publish_view(), Version::V5, out);
}

fn message(b: &mut BytesMut, now: Instant) -> Result<Message, FrameError> {
    let expires_at = match u8_(b)? {
        0 => None,
        1 => {
            let left = u64_(b)?.min(u64::from(u32::MAX) * 1000);
            Some(now + Duration::from_millis(left))
        }
        _ => return Err(FrameError::Malformed("expiry flag")),
    };
    let publisher = match u8_(b)? {
        0 => None,
        1 => Some(shared_str(b)?),
        _ => return Err(FrameError::Malformed("publisher flag")),
    };
    let id = u64_(b)?;
    let mut rest = b.split();
    let mut p = match codec::decode(&mut rest, Version::V5, codec::MAX_PACKET_SIZE) {
        Ok(Some(Packet::Publish(p))) if rest.is_empty() => p,
        _ => return Err(FrameError::Malformed("the PUBLISH inside does not decode")),
    };
    if crate::router::topic::validate_topic_name(&p.topic, LEVELS_MAX).is_err() {
        return Err(FrameError::Malformed("topic name"));
    }
    crate::message::strip_per_delivery(&mut p.properties);
    let mut payload = p.payload;
    let mut properties = p.properties;
    crate::message::own_buffers(&mut payload, properties.get_mut());
    Ok(Message {
        topic: p.topic,
        payload,
        qos: p.qos,
        retain: p.retain,
        properties,
        expires_at,
        publisher,
        id,
        late: false,
    })
}

/// A will: its client id, its delay, and the rest as a 5.0 PUBLISH
/// (with the will's Message Expiry Interval, which counts from its
/// publication) in a 4-byte length.
fn put_will(out: &mut BytesMut, w: &WillEntry) {
    put_str(out, &w.client_id);
    out.put_u64(w.delay_ms);
    out.put_u8(u8::from(w.waiting));
    let mut properties = w.will.properties.clone();
    properties.will_delay_interval = None;
    let view = codec::PublishView {
        dup: false,
        qos: w.will.qos,
        retain: w.will.retain,
        topic: &w.will.topic,
        packet_id: 1,
        payload: &w.will.payload,
        properties: Some(&properties),
        message_expiry_interval: None,
        topic_alias: None,
        subscription_identifiers: &[],
    };
    put_sized(out, |out| codec::encode_publish(&view, Version::V5, out));
}

fn will(b: &mut BytesMut) -> Result<WillEntry, FrameError> {
    let client_id = client_id(b)?;
    let delay_ms = u64_(b)?;
    let waiting = bool_(b)?;
    let mut packet = sized(b)?;
    let p = match codec::decode(&mut packet, Version::V5, codec::MAX_PACKET_SIZE) {
        Ok(Some(Packet::Publish(p))) if packet.is_empty() => p,
        _ => return Err(FrameError::Malformed("the will's PUBLISH does not decode")),
    };
    if crate::router::topic::validate_topic_name(&p.topic, LEVELS_MAX).is_err() {
        return Err(FrameError::Malformed("will topic"));
    }
    let mut properties = p.properties.into_properties();
    properties.topic_alias = None;
    properties.subscription_identifiers.clear();
    let mut payload = p.payload;
    crate::message::own_buffers(&mut payload, Some(&mut properties));
    Ok(WillEntry {
        client_id,
        will: crate::codec::Will {
            topic: p.topic,
            payload,
            qos: p.qos,
            retain: p.retain,
            properties,
        },
        delay_ms,
        waiting,
    })
}

fn put_claims(out: &mut BytesMut, claims: &[ClaimEntry]) {
    out.put_u32(claims.len() as u32);
    for c in claims {
        put_str(out, &c.client_id);
        out.put_u64(c.stamp);
        out.put_u8(u8::from(c.clean_start));
    }
}

fn claims(b: &mut BytesMut) -> Result<Vec<ClaimEntry>, FrameError> {
    list(b, 12, "claim count beyond the frame", |b| {
        Ok(ClaimEntry {
            client_id: client_id(b)?,
            stamp: u64_(b)?,
            clean_start: bool_(b)?,
        })
    })
}

/// A u32 count, then that many items read by `item`, each at least
/// `min_each` bytes long: a count beyond what is left of the frame is a
/// lie (`beyond`), and nothing is allocated for it.
fn list<T>(
    b: &mut BytesMut,
    min_each: usize,
    beyond: &'static str,
    mut item: impl FnMut(&mut BytesMut) -> Result<T, FrameError>,
) -> Result<Vec<T>, FrameError> {
    let n = u32_(b)? as usize;
    if n > b.len() / min_each {
        return Err(FrameError::Malformed(beyond));
    }
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        items.push(item(b)?);
    }
    Ok(items)
}

/// A client id: a non-empty string.
fn client_id(b: &mut BytesMut) -> Result<Arc<str>, FrameError> {
    let id = shared_str(b)?;
    if id.is_empty() {
        return Err(FrameError::Malformed("an empty client id"));
    }
    Ok(id)
}

fn put_str(out: &mut BytesMut, s: &str) {
    let s = crate::text::cut(s, STRING_MAX);
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn need(b: &BytesMut, n: usize) -> Result<(), FrameError> {
    if b.len() < n {
        return Err(FrameError::Malformed("frame ends inside a field"));
    }
    Ok(())
}

fn u8_(b: &mut BytesMut) -> Result<u8, FrameError> {
    need(b, 1)?;
    Ok(b.get_u8())
}

fn bool_(b: &mut BytesMut) -> Result<bool, FrameError> {
    match u8_(b)? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(FrameError::Malformed("a flag other than 0 or 1")),
    }
}

fn u16_(b: &mut BytesMut) -> Result<u16, FrameError> {
    need(b, 2)?;
    Ok(b.get_u16())
}

fn u32_(b: &mut BytesMut) -> Result<u32, FrameError> {
    need(b, 4)?;
    Ok(b.get_u32())
}

fn u64_(b: &mut BytesMut) -> Result<u64, FrameError> {
    need(b, 8)?;
    Ok(b.get_u64())
}

/// A string as [`string`] reads it, straight into an `Arc<str>` (one
/// allocation: every message from a peer carries its publisher's id).
fn shared_str(b: &mut BytesMut) -> Result<Arc<str>, FrameError> {
    let n = usize::from(u16_(b)?);
    need(b, n)?;
    let s = std::str::from_utf8(&b[..n])
        .map(Arc::<str>::from)
        .map_err(|_| FrameError::Malformed("a string not UTF-8"))?;
    b.advance(n);
    Ok(s)
}

fn string(b: &mut BytesMut) -> Result<String, FrameError> {
    let n = usize::from(u16_(b)?);
    need(b, n)?;
    let bytes = b.split_to(n);
    String::from_utf8(bytes.to_vec()).map_err(|_| FrameError::Malformed("a string not UTF-8"))
}

/// A topic filter, or a shared subscription (`$share/{group}/{filter}`):
/// checked as a SUBSCRIBE's would be.
fn filter(b: &mut BytesMut) -> Result<Arc<str>, FrameError> {
    let f = string(b)?;
    let inner = match crate::router::topic::parse_shared(&f) {
        Ok(Some((_, inner))) => inner,
        Ok(None) => &f,
        Err(_) => return Err(FrameError::Malformed("shared subscription")),
    };
    if crate::router::topic::validate_topic_filter(inner, LEVELS_MAX).is_err() {
        return Err(FrameError::Malformed("topic filter"));
    }
    Ok(Arc::from(f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Properties, QoS};
    use bytes::Bytes;

    fn roundtrip(f: &Frame) -> Frame {
        let now = Instant::now();
        let mut buf = BytesMut::new();
        encode(f, now, &mut buf);
        // Byte by byte: nothing before the last byte.
        let whole = buf.clone();
        let mut partial = BytesMut::new();
        for &byte in &whole[..whole.len() - 1] {
            partial.put_u8(byte);
            assert_eq!(decode(&mut partial, now, 1 << 20), Ok(None));
        }
        let got = decode(&mut buf, now, 1 << 20).unwrap().unwrap();
        assert!(buf.is_empty());
        got
    }

    fn sub(qos: u8, id: Option<u32>) -> crate::session::Subscription {
        crate::session::Subscription {
            options: crate::codec::SubOptions {
                qos: QoS::from_u8(qos).unwrap(),
                no_local: qos == 2,
                retain_as_published: true,
                retain_handling: qos,
            },
            subscription_id: id,
        }
    }

    fn message() -> Message {
        Message {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Properties {
                content_type: Some("text/plain".into()),
                correlation_data: Some(Bytes::from_static(b"c")),
                user_properties: vec![("k".into(), "v".into())],
                ..Properties::default()
            }
            .into(),
            expires_at: None,
            publisher: Some(Arc::from("pub1")),
            id: 0x0123_4567_89ab_cdef,
            late: false,
        }
    }

    fn will_entry(client: &str, delay_ms: u64) -> WillEntry {
        let waiting = delay_ms % 2 == 0;
        let m = message();
        let mut properties = m.properties.to_properties();
        properties.message_expiry_interval = Some(60);
        WillEntry {
            client_id: Arc::from(client),
            will: crate::codec::Will {
                topic: m.topic.clone(),
                payload: m.payload.clone(),
                qos: QoS::ExactlyOnce,
                retain: true,
                properties,
            },
            delay_ms,
            waiting,
        }
    }

    #[test]
    fn every_frame_survives_the_round_trip() {
        let frames = [
            Frame::Hello(Hello {
                version: BRIDGE_VERSION,
                cluster_tag: 7,
                node: NodeName::new("n-1").unwrap(),
                incarnation: 42,
                addr: "[::1]:7946".parse().unwrap(),
                shard: 1,
                shards: 4,
                auth: true,
                nonce: 77,
            }),
            Frame::Auth {
                nonce: 5,
                tag: [9; 32],
            },
            Frame::Record(BytesMut::from(&[1u8, 2, 3][..])),
            Frame::Refuse {
                reason: RefuseReason::Cluster,
                text: "other cluster".into(),
            },
            Frame::RouteSnapshot {
                seq: 9,
                filters: vec![Arc::from("a/+"), Arc::from("#")],
                last: true,
                digest: route_digest(["a/+", "#"]),
            },
            Frame::RouteDelta {
                seq: 10,
                change: RouteChange {
                    add: false,
                    filter: Arc::from("x/#"),
                },
            },
            Frame::RouteAck { seq: 10 },
            Frame::Publish(RemotePublish {
                seq: 7,
                message: Arc::new(message()),
                ordinary: false,
                shared: vec![SharedPick {
                    group: Arc::from("g"),
                    filter: Arc::from("a/+"),
                }],
                passed_on: true,
                adopted_of: None,
                late: false,
            }),
            Frame::Publish(RemotePublish {
                seq: 8,
                message: Arc::new(message()),
                ordinary: true,
                shared: Vec::new(),
                passed_on: false,
                adopted_of: Some((NodeName::new("n-2").unwrap(), 9)),
                late: true,
            }),
            Frame::RouteDelta {
                seq: 11,
                change: RouteChange {
                    add: true,
                    filter: Arc::from("$share/g/a/+"),
                },
            },
            Frame::Ping { seq: 3, digest: 5 },
            Frame::Pong,
            Frame::Delivered { seq: 9 },
            Frame::WillSnapshot {
                wills: vec![will_entry("c1", 0), will_entry("c2", 5_000)],
                first: true,
                last: false,
            },
            Frame::WillSnapshot {
                wills: Vec::new(),
                first: false,
                last: true,
            },
            Frame::WillSet(Box::new(will_entry("c3", 1))),
            Frame::WillClear {
                client_id: Arc::from("c3"),
            },
            Frame::Claims {
                claims: vec![
                    ClaimEntry {
                        client_id: Arc::from("dev-1"),
                        stamp: 1_700_000_000_000,
                        clean_start: true,
                    },
                    ClaimEntry {
                        client_id: Arc::from("d"),
                        stamp: 2,
                        clean_start: false,
                    },
                ],
                answer: true,
            },
            Frame::ClaimAcks {
                seq: 8,
                acks: vec![ClaimEntry {
                    client_id: Arc::from("dev-1"),
                    stamp: 1_700_000_000_000,
                    clean_start: true,
                }],
            },
            Frame::Retained(vec![
                RetainedEntry {
                    stamp: 1_700_000_000_123,
                    message: Arc::new(message()),
                },
                RetainedEntry {
                    stamp: 7,
                    message: Arc::new(Message {
                        payload: Bytes::new(),
                        publisher: None,
                        id: 0,
                        ..message()
                    }),
                },
            ]),
            Frame::SessionOffer(Box::new(SessionOffer {
                seq: 9,
                client_id: Arc::from("dev-1"),
                claim: 17,
                born: 11,
                subscriptions: vec![
                    ("a/#".to_string(), sub(1, None)),
                    ("$share/g/b".to_string(), sub(2, Some(268_435_455))),
                ],
                seen: vec![OriginMark {
                    origin: 7,
                    low: 7 << 32 | 2,
                    high: 7 << 32 | 9,
                }],
            })),
            Frame::SessionTake {
                seq: 10,
                client_id: Arc::from("dev-1"),
                claim: 17,
            },
            Frame::MoveFence { seq: 11, id: 3 },
            Frame::MoveFenceDone { seq: 4, id: 3 },
            Frame::Adopted {
                node: NodeName::new("n-3").unwrap(),
                incarnation: 12,
            },
            Frame::LogChunk {
                shard: 1,
                chunk: Box::new(Chunk {
                    id: 9,
                    generation: 4,
                    segment_bytes: 1 << 20,
                    at: RecordAt {
                        segment: 3,
                        offset: 128,
                    },
                    seq: 77,
                    start: Some(90),
                    oldest: 2,
                    bytes: vec![1, 2, 3],
                    waited: true,
                }),
            },
            Frame::LogHave {
                shard: 1,
                have: Have {
                    id: 9,
                    generation: 4,
                    at: Some((
                        RecordAt {
                            segment: 3,
                            offset: 131,
                        },
                        78,
                    )),
                    whole: true,
                    refused: false,
                },
            },
            Frame::LogHave {
                shard: 0,
                have: Have {
                    refused: true,
                    ..Have::default()
                },
            },
            Frame::SessionMoved(Box::new(SessionMoved {
                seq: 12,
                client_id: Arc::from("dev-1"),
                claim: 17,
                deliveries: vec![
                    MovedDelivery {
                        message: Arc::new(message()),
                        qos: QoS::ExactlyOnce,
                        retain: false,
                        subscription_ids: [3, 9].into_iter().collect(),
                        packet_id: 65_535,
                        released: true,
                    },
                    MovedDelivery {
                        message: Arc::new(message()),
                        qos: QoS::AtLeastOnce,
                        retain: true,
                        subscription_ids: Default::default(),
                        packet_id: 0,
                        released: false,
                    },
                ],
                qos2_in: vec![1, 7],
                seen: vec![
                    OriginMark {
                        origin: 1,
                        low: 1 << 32,
                        high: 1 << 32 | 5,
                    },
                    OriginMark {
                        origin: u32::MAX,
                        low: u64::MAX,
                        high: u64::MAX,
                    },
                ],
                last: true,
                stays: false,
            })),
            Frame::SessionStored {
                seq: 13,
                client_id: Arc::from("dev-1"),
                claim: 17,
            },
            Frame::Orphaned(Box::new(Orphaned {
                seq: 14,
                node: NodeName::new("n-2").unwrap(),
                incarnation: 5,
                client_id: Arc::from("dev-1"),
                claim: 17,
                expiry_s: 3600,
                subscriptions: vec![("a/#".to_string(), sub(1, Some(4)))],
                qos2_in: vec![9],
                deliveries: vec![MovedDelivery {
                    message: Arc::new(message()),
                    qos: QoS::ExactlyOnce,
                    retain: false,
                    subscription_ids: [4].into_iter().collect(),
                    packet_id: 3,
                    released: false,
                }],
            })),
        ];
        for f in &frames {
            assert_eq!(&roundtrip(f), f);
        }
    }

    #[test]
    fn a_message_keeps_the_time_it_has_left() {
        let now = Instant::now();
        let mut m = message();
        m.expires_at = Some(now + Duration::from_millis(1500));
        let mut buf = BytesMut::new();
        let p = RemotePublish {
            seq: 1,
            message: Arc::new(m),
            ordinary: true,
            shared: Vec::new(),
            passed_on: false,
            adopted_of: None,
            late: false,
        };
        encode(&Frame::Publish(p), now, &mut buf);
        let later = now + Duration::from_secs(10);
        let Some(Frame::Publish(got)) = decode(&mut buf, later, 1 << 20).unwrap() else {
            panic!("a publish");
        };
        assert_eq!(
            got.message.expires_at,
            Some(later + Duration::from_millis(1500))
        );
        assert_eq!(buf.len(), 0);
    }

    #[test]
    fn a_frame_too_long_is_refused_from_its_length_alone() {
        let mut buf = BytesMut::from(&[0u8, 0, 4, 1][..]);
        assert_eq!(
            decode(&mut buf, Instant::now(), 1024),
            Err(FrameError::TooLarge {
                len: 1025,
                max: 1024
            })
        );
        let mut at_bound = BytesMut::new();
        // kind, seq, flag, length: 12 bytes before the filter.
        let change = RouteChange {
            add: true,
            filter: Arc::from("x".repeat(1024 - 12)),
        };
        encode(
            &Frame::RouteDelta { seq: 1, change },
            Instant::now(),
            &mut at_bound,
        );
        assert_eq!(at_bound.len(), 4 + 1024);
        assert!(decode(&mut at_bound, Instant::now(), 1024)
            .unwrap()
            .is_some());
    }

    #[test]
    fn lies_inside_frames_are_refused() {
        let now = Instant::now();
        let bad = |body: &[u8]| {
            let mut buf = BytesMut::new();
            buf.put_u32(body.len() as u32);
            buf.put_slice(body);
            decode(&mut buf, now, 1 << 20)
        };
        assert!(bad(&[99]).is_err(), "unknown kind");
        assert!(bad(&[kind::ROUTE_ACK, 0, 0]).is_err(), "short field");
        assert!(bad(&[kind::PONG, 0]).is_err(), "bytes left over");
        // A snapshot claiming four billion filters in a few bytes.
        let mut snap = vec![kind::ROUTE_SNAPSHOT];
        snap.extend_from_slice(&[0; 8]);
        snap.push(1);
        snap.extend_from_slice(&[0; 8]);
        snap.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(bad(&snap).is_err());
        // The same lie in every other counted list.
        let lie = u32::MAX.to_be_bytes();
        let wills = [&[kind::WILL_SNAPSHOT, 1, 1][..], &lie].concat();
        let retained = [&[kind::RETAINED][..], &lie].concat();
        let claims = [&[kind::CLAIM_ACKS][..], &[0; 8], &lie].concat();
        for (body, what) in [(wills, "will"), (retained, "retained"), (claims, "claim")] {
            match bad(&body) {
                Err(FrameError::Malformed(m)) => assert!(m.starts_with(what), "{m}"),
                other => panic!("{what}: {other:?}"),
            }
        }
        // A filter that is no filter.
        let mut delta = vec![kind::ROUTE_DELTA, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 3];
        delta.extend_from_slice(b"a#b");
        assert!(bad(&delta).is_err());
        // A node name with a space.
        let [v0, v1] = BRIDGE_VERSION.to_be_bytes();
        let mut hello = vec![kind::HELLO, v0, v1, 0, 0, 0, 0, 0, 3];
        hello.extend_from_slice(b"a b");
        hello.extend_from_slice(&[0; 12]);
        assert!(bad(&hello).is_err());
        // The same from another version is read as far as its version, for
        // the link to refuse it by that.
        hello[2] = 1;
        assert!(matches!(bad(&hello), Ok(Some(Frame::Hello(h))) if h.version == 1));
        assert!(bad(&[]).is_err(), "empty");
    }

    #[test]
    fn digests_ignore_order_and_see_a_difference() {
        assert_eq!(
            route_digest(["a", "b/#", "c"]),
            route_digest(["c", "a", "b/#"])
        );
        assert_ne!(route_digest(["a", "b"]), route_digest(["a"]));
        assert_ne!(route_digest(["a", "b"]), route_digest(["a", "c"]));
        assert_eq!(
            route_digest(["a", "b"]) ^ filter_digest("b"),
            route_digest(["a"])
        );
    }

    proptest::proptest! {
        /// Whatever follows a length and a known kind, decoding returns
        /// (a frame or an error) and never panics.
        #[test]
        fn arbitrary_bodies_never_panic(
            k in 1u8..=9,
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
        ) {
            let mut buf = BytesMut::new();
            buf.put_u32(body.len() as u32 + 1);
            buf.put_u8(k);
            buf.put_slice(&body);
            let _ = decode(&mut buf, Instant::now(), 1 << 20);
        }
    }
}
