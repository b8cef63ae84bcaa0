//! What the log's records mean: the broker state each one adds, changes or
//! ends, and their binary form.
//!
//! Sans-IO and runtime-free: `encode` appends a record body to a buffer,
//! `decode` turns one back into a [`Rec`]. Messages and wills are stored as
//! MQTT 5.0 PUBLISH packets (the codec's own encoder and decoder), with the
//! few fields a PUBLISH has no room for before them. Times are Unix
//! milliseconds (see [`WallClock`]) so deadlines count across a restart.
//!
//! Objects are named by numbers that are never reused within one log:
//! `sid` (a persistent session), message ids (a message stored for this
//! shard's sessions), accept ids (a message accepted from a publisher here
//! and routed elsewhere) and delayed ids.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use smallvec::SmallVec;
use thiserror::Error;

use super::clock::WallClock;
use crate::codec::{self, Packet, QoS, Version, Will};
use crate::message::Message;
use crate::router::SharedPick;
use crate::session::{SubIds, Subscription};

/// A persistent session's number in its shard's log.
pub type Sid = u64;

/// Record kinds (the byte after the sequence number).
pub mod kind {
    /// First record of a shard log.
    pub const START: u8 = 1;
    /// The wall clock, written now and then (a crash's time, roughly).
    pub const CLOCK: u8 = 2;
    /// A session's whole state.
    pub const SESSION: u8 = 10;
    /// A subscription added or replaced.
    pub const SUBSCRIBE: u8 = 11;
    /// A subscription removed.
    pub const UNSUBSCRIBE: u8 = 12;
    /// A connection attached to the session.
    pub const ONLINE: u8 = 13;
    /// The connection ended.
    pub const OFFLINE: u8 = 14;
    /// The session ended.
    pub const SESSION_END: u8 = 15;
    /// A pending will was published or cancelled.
    pub const WILL_DONE: u8 = 16;
    /// An inbound QoS 2 packet id was released (PUBREL).
    pub const QOS2_DONE: u8 = 17;
    /// A session moving here from another node came whole.
    pub const MOVED_IN: u8 = 18;
    /// A session's client was told about it (its birth stamp).
    pub const TOLD: u8 = 19;
    /// A message stored for sessions of this shard.
    pub const MESSAGE: u8 = 20;
    /// A stored message was sent to a session with a packet id.
    pub const SENT: u8 = 21;
    /// A session's QoS 2 message reached PUBREC (PUBREL stage).
    pub const RELEASED: u8 = 22;
    /// A session is done with a stored message.
    pub const DONE: u8 = 23;
    /// A message accepted here and routed to other shards.
    pub const ACCEPTED: u8 = 30;
    /// Accepted messages up to an id have been applied everywhere.
    pub const SETTLED: u8 = 31;
    /// A retained message stored (or, empty, deleted).
    pub const RETAIN: u8 = 40;
    /// A delayed publish waiting for its time.
    pub const DELAYED: u8 = 50;
    /// A delayed publish was sent.
    pub const DELAYED_DONE: u8 = 51;
}

/// Where a routed message came from: the shard that accepted it and its
/// accept id there. Destinations record it, so recovery can tell which
/// shards already applied a message that was still in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Origin {
    /// The accepting shard.
    pub shard: u16,
    /// Its accept id there.
    pub id: u64,
}

/// Which subscribers of a shard a routed message is for: the ordinary ones
/// and/or one member of each listed shared subscription (or of every one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Every ordinary (non-shared) subscriber.
    pub ordinary: bool,
    /// Shared subscriptions to serve.
    pub shared: SmallVec<[SharedPick; 1]>,
    /// Every shared subscription, listed or not: a fresh publish's
    /// Accepted record. Not one whose shared subscriptions were decided
    /// elsewhere or before (a peer's message, a pick served again): routed
    /// again, it would reach groups that had it.
    pub every_pick: bool,
    /// A retained message for ordinary subscribers whose retained copy
    /// another node keeps (a peer's message): routed again, this node's
    /// retained store does not take it (a newer version may be there).
    pub retained_elsewhere: bool,
}

impl Scope {
    /// Ordinary subscribers and every shared subscription (a fresh publish).
    pub fn everyone() -> Scope {
        Scope {
            ordinary: true,
            shared: SmallVec::new(),
            every_pick: true,
            retained_elsewhere: false,
        }
    }
}

/// What an Accepted record settles, atomically with the message: the
/// record is written once, so replay sees both or neither.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Causes {
    /// A QoS 2 publisher's session and packet id, remembered until PUBREL.
    pub qos2_from: Option<(Sid, u16)>,
    /// The delayed publish it was (now sent).
    pub delayed: Option<u64>,
    /// The session whose pending will it is (now published).
    pub will_of: Option<Sid>,
    /// The accept (of another shard) whose shared-subscription pick this
    /// record passes on: in the same record, proof that this shard applied
    /// that origin for the record's scope, so no cut of the log shows the
    /// forward without the proof (recovery would serve the pick twice).
    /// Written after the message; a record of an older version, without
    /// it, reads as `None`.
    pub passes_on: Option<Origin>,
}

/// How far one session got with one stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    /// Waiting in the session's queue.
    Queued,
    /// Sent with a packet id, not yet acknowledged.
    Inflight {
        /// Its packet id.
        packet_id: u16,
        /// QoS 2 past PUBREC (PUBREL stage).
        released: bool,
    },
}

/// One session's delivery of a stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The session.
    pub sid: Sid,
    /// Delivery QoS (1 or 2).
    pub qos: QoS,
    /// RETAIN flag of the delivery.
    pub retain: bool,
    /// Matching subscription identifiers.
    pub subscription_ids: SubIds,
    /// How far it got.
    pub state: TargetState,
}

/// A persistent session's whole state.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRec {
    /// Its number in this log.
    pub sid: Sid,
    /// Client identifier.
    pub client_id: String,
    /// Session Expiry Interval in force, seconds.
    pub expiry_s: u32,
    /// When the last connection ended; None while connected.
    pub offline_since_ms: Option<u64>,
    /// Subscriptions by full filter.
    pub subscriptions: Vec<(String, Subscription)>,
    /// Inbound QoS 2 packet ids received and not released.
    pub qos2_in: Vec<u16>,
    /// The connection's will (connected) or the pending will (offline).
    pub will: Option<Will>,
    /// Offline: when the pending will is due.
    pub will_due_ms: Option<u64>,
}

/// One record, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Rec {
    /// First record of a shard log.
    Start {
        /// The shard.
        shard: u16,
        /// Shards of the broker that wrote it.
        shards: u16,
    },
    /// The wall clock.
    Clock {
        /// Unix milliseconds.
        ms: u64,
    },
    /// A session's whole state (created, or rewritten by compaction).
    Session(Box<SessionRec>),
    /// A subscription added or replaced.
    Subscribe {
        /// The session.
        sid: Sid,
        /// Full filter.
        filter: String,
        /// Options and identifier.
        sub: Subscription,
    },
    /// A subscription removed.
    Unsubscribe {
        /// The session.
        sid: Sid,
        /// Full filter.
        filter: String,
    },
    /// A connection attached.
    Online {
        /// The session.
        sid: Sid,
        /// Session Expiry Interval the connection set.
        expiry_s: u32,
        /// The connection's will.
        will: Option<Box<Will>>,
    },
    /// The connection ended.
    Offline {
        /// The session.
        sid: Sid,
        /// When.
        at_ms: u64,
        /// Session Expiry Interval in force (a DISCONNECT may change it).
        expiry_s: u32,
        /// When the connection's will is due, if it waits for its delay.
        will_due_ms: Option<u64>,
    },
    /// A pending will was published or cancelled.
    WillDone {
        /// The session.
        sid: Sid,
    },
    /// The session ended; everything it held goes.
    SessionEnd {
        /// The session.
        sid: Sid,
    },
    /// An inbound QoS 2 packet id was released.
    Qos2Done {
        /// The session.
        sid: Sid,
        /// The packet id.
        packet_id: u16,
    },
    /// Every part of a session moving here from another node came, and
    /// is in the records before this one (cluster mode: a copy of this
    /// log that holds this record holds the whole move, `shard::orphans`).
    MovedIn {
        /// The session.
        sid: Sid,
        /// The claim the move answered.
        claim: u64,
    },
    /// The session's client was told about it: the CONNACK that said it
    /// was new went, or it took the birth of a copy its client knew
    /// (cluster mode: of two copies of one session, the one born later is
    /// the one the client knows, `shard::adopt`).
    Told {
        /// The session.
        sid: Sid,
        /// Its birth stamp (a claim's hybrid-clock stamp); 0: it took the
        /// birth of a copy its client was never told about.
        born: u64,
    },
    /// A message stored for sessions of this shard. With no message it is a
    /// marker that the origin's message was applied here (kept until the
    /// origin has settled it).
    Message {
        /// Message id in this log.
        id: u64,
        /// Where it was accepted, when it came through routing of a QoS 1/2
        /// publish.
        origin: Option<Origin>,
        /// What this shard served.
        scope: Scope,
        /// The message.
        message: Option<Arc<Message>>,
        /// Sessions it is for.
        targets: Vec<Target>,
    },
    /// A stored message was sent with a packet id.
    Sent {
        /// The session.
        sid: Sid,
        /// The message.
        id: u64,
        /// Packet id.
        packet_id: u16,
    },
    /// A stored QoS 2 message reached the PUBREL stage.
    Released {
        /// The session.
        sid: Sid,
        /// The message.
        id: u64,
    },
    /// A session is done with a stored message (acknowledged or dropped).
    Done {
        /// The session.
        sid: Sid,
        /// The message.
        id: u64,
    },
    /// A message accepted here (from a publisher, a will, a delayed publish
    /// or a shared-subscription forward) before it was routed on.
    Accepted {
        /// Accept id.
        id: u64,
        /// Which subscribers it is for.
        scope: Scope,
        /// The message.
        message: Arc<Message>,
        /// When it was accepted (orders retained messages).
        stamp_ms: u64,
        /// What its record settles besides its routing.
        causes: Causes,
    },
    /// Every accepted message up to this id has been applied everywhere.
    Settled {
        /// Accept id.
        upto: u64,
    },
    /// A retained message stored; an empty payload deletes the topic's.
    Retain {
        /// The message.
        message: Arc<Message>,
        /// When it was stored (orders it against messages routed again).
        stamp_ms: u64,
        /// The routed message's origin, when it had one.
        origin: Option<Origin>,
    },
    /// A delayed publish.
    Delayed {
        /// Delayed id.
        id: u64,
        /// When it is due.
        due_ms: u64,
        /// The message (its final topic).
        message: Arc<Message>,
        /// A QoS 2 publisher's session and packet id.
        from: Option<(Sid, u16)>,
    },
    /// A delayed publish was sent.
    DelayedDone {
        /// Delayed id.
        id: u64,
    },
}

/// Targets per Message record; more continue in further records of the
/// same id, which replay merges.
pub const TARGETS_PER_RECORD: usize = 1024;

/// A session's whole state as records that each fit a segment: a Session
/// record, and its subscriptions past `budget_bytes` in Subscribe records
/// after it.
pub fn session_records(mut rec: SessionRec, budget_bytes: usize) -> Vec<Rec> {
    let mut used = 0;
    let keep = rec
        .subscriptions
        .iter()
        .position(|(filter, _)| {
            used += filter.len() + 16;
            used >= budget_bytes
        })
        .map_or(rec.subscriptions.len(), |i| i + 1);
    let rest = rec.subscriptions.split_off(keep);
    let sid = rec.sid;
    let mut out = vec![Rec::Session(Box::new(rec))];
    out.extend(
        rest.into_iter()
            .map(|(filter, sub)| Rec::Subscribe { sid, filter, sub }),
    );
    out
}

/// A stored message's records, its targets in chunks of
/// [`TARGETS_PER_RECORD`].
pub fn message_records(
    id: u64,
    origin: Option<Origin>,
    scope: &Scope,
    message: &Arc<Message>,
    targets: &[Target],
) -> Vec<Rec> {
    targets
        .chunks(TARGETS_PER_RECORD)
        .map(|chunk| Rec::Message {
            id,
            origin,
            scope: scope.clone(),
            message: Some(message.clone()),
            targets: chunk.to_vec(),
        })
        .collect()
}

/// A record body that cannot be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    /// The body ends early.
    #[error("record body ends early")]
    Short,
    /// A field holds a value it cannot.
    #[error("record field: {0}")]
    Invalid(&'static str),
    /// An unknown kind byte.
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
}

impl Rec {
    /// The kind byte of this record.
    pub fn kind(&self) -> u8 {
        match self {
            Rec::Start { .. } => kind::START,
            Rec::Clock { .. } => kind::CLOCK,
            Rec::Session(_) => kind::SESSION,
            Rec::Subscribe { .. } => kind::SUBSCRIBE,
            Rec::Unsubscribe { .. } => kind::UNSUBSCRIBE,
            Rec::Online { .. } => kind::ONLINE,
            Rec::Offline { .. } => kind::OFFLINE,
            Rec::WillDone { .. } => kind::WILL_DONE,
            Rec::SessionEnd { .. } => kind::SESSION_END,
            Rec::Qos2Done { .. } => kind::QOS2_DONE,
            Rec::MovedIn { .. } => kind::MOVED_IN,
            Rec::Told { .. } => kind::TOLD,
            Rec::Message { .. } => kind::MESSAGE,
            Rec::Sent { .. } => kind::SENT,
            Rec::Released { .. } => kind::RELEASED,
            Rec::Done { .. } => kind::DONE,
            Rec::Accepted { .. } => kind::ACCEPTED,
            Rec::Settled { .. } => kind::SETTLED,
            Rec::Retain { .. } => kind::RETAIN,
            Rec::Delayed { .. } => kind::DELAYED,
            Rec::DelayedDone { .. } => kind::DELAYED_DONE,
        }
    }

    /// Append this record's body to `out`; returns its kind.
    pub fn encode(&self, clock: &WallClock, out: &mut BytesMut) -> u8 {
        let w = &mut Writer(out);
        match self {
            Rec::Start { shard, shards } => {
                w.u16(*shard);
                w.u16(*shards);
            }
            Rec::Clock { ms } => w.u64(*ms),
            Rec::Session(s) => w.session(s, clock),
            Rec::Subscribe { sid, filter, sub } => {
                w.u64(*sid);
                w.str(filter);
                w.subscription(sub);
            }
            Rec::Unsubscribe { sid, filter } => {
                w.u64(*sid);
                w.str(filter);
            }
            Rec::Online {
                sid,
                expiry_s,
                will,
            } => {
                w.u64(*sid);
                w.u32(*expiry_s);
                w.opt_will(will.as_deref(), clock);
            }
            Rec::Offline {
                sid,
                at_ms,
                expiry_s,
                will_due_ms,
            } => {
                w.u64(*sid);
                w.u64(*at_ms);
                w.u32(*expiry_s);
                w.opt_u64(*will_due_ms);
            }
            Rec::WillDone { sid } | Rec::SessionEnd { sid } => w.u64(*sid),
            Rec::Qos2Done { sid, packet_id } => {
                w.u64(*sid);
                w.u16(*packet_id);
            }
            Rec::MovedIn { sid, claim } => {
                w.u64(*sid);
                w.u64(*claim);
            }
            Rec::Told { sid, born } => {
                w.u64(*sid);
                w.u64(*born);
            }
            Rec::Message {
                id,
                origin,
                scope,
                message,
                targets,
            } => {
                w.u64(*id);
                w.opt_origin(*origin);
                w.scope(scope);
                match message {
                    Some(m) => {
                        w.u8(1);
                        w.message(m, clock);
                    }
                    None => w.u8(0),
                }
                w.u32(targets.len() as u32);
                for t in targets {
                    w.target(t);
                }
            }
            Rec::Sent { sid, id, packet_id } => {
                w.u64(*sid);
                w.u64(*id);
                w.u16(*packet_id);
            }
            Rec::Released { sid, id } | Rec::Done { sid, id } => {
                w.u64(*sid);
                w.u64(*id);
            }
            Rec::Accepted {
                id,
                scope,
                message,
                stamp_ms,
                causes,
            } => {
                w.u64(*id);
                w.scope(scope);
                w.u64(*stamp_ms);
                w.opt_from(causes.qos2_from);
                w.opt_u64(causes.delayed);
                w.opt_u64(causes.will_of);
                w.message(message, clock);
                w.opt_origin(causes.passes_on);
            }
            Rec::Settled { upto } => w.u64(*upto),
            Rec::Retain {
                message,
                stamp_ms,
                origin,
            } => {
                w.u64(*stamp_ms);
                w.opt_origin(*origin);
                w.message(message, clock);
            }
            Rec::Delayed {
                id,
                due_ms,
                message,
                from,
            } => {
                w.u64(*id);
                w.u64(*due_ms);
                w.opt_from(*from);
                w.message(message, clock);
            }
            Rec::DelayedDone { id } => w.u64(*id),
        }
        self.kind()
    }

    /// Read a record body of kind `kind`.
    pub fn decode(kind: u8, body: &[u8], clock: &WallClock) -> Result<Rec, RecordError> {
        let r = &mut Reader { b: body, pos: 0 };
        let rec = match kind {
            kind::START => Rec::Start {
                shard: r.u16()?,
                shards: r.u16()?,
            },
            kind::CLOCK => Rec::Clock { ms: r.u64()? },
            kind::SESSION => Rec::Session(Box::new(r.session(clock)?)),
            kind::SUBSCRIBE => Rec::Subscribe {
                sid: r.u64()?,
                filter: r.string()?,
                sub: r.subscription()?,
            },
            kind::UNSUBSCRIBE => Rec::Unsubscribe {
                sid: r.u64()?,
                filter: r.string()?,
            },
            kind::ONLINE => Rec::Online {
                sid: r.u64()?,
                expiry_s: r.u32()?,
                will: r.opt_will(clock)?.map(Box::new),
            },
            kind::OFFLINE => Rec::Offline {
                sid: r.u64()?,
                at_ms: r.u64()?,
                expiry_s: r.u32()?,
                will_due_ms: r.opt_u64()?,
            },
            kind::WILL_DONE => Rec::WillDone { sid: r.u64()? },
            kind::SESSION_END => Rec::SessionEnd { sid: r.u64()? },
            kind::QOS2_DONE => Rec::Qos2Done {
                sid: r.u64()?,
                packet_id: r.u16()?,
            },
            kind::MOVED_IN => Rec::MovedIn {
                sid: r.u64()?,
                claim: r.u64()?,
            },
            kind::TOLD => Rec::Told {
                sid: r.u64()?,
                born: r.u64()?,
            },
            kind::MESSAGE => {
                let id = r.u64()?;
                let origin = r.opt_origin()?;
                let scope = r.scope()?;
                let message = match r.u8()? {
                    0 => None,
                    _ => Some(Arc::new(r.message(clock)?)),
                };
                let n = r.u32()? as usize;
                let mut targets = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    targets.push(r.target()?);
                }
                Rec::Message {
                    id,
                    origin,
                    scope,
                    message,
                    targets,
                }
            }
            kind::SENT => Rec::Sent {
                sid: r.u64()?,
                id: r.u64()?,
                packet_id: r.u16()?,
            },
            kind::RELEASED => Rec::Released {
                sid: r.u64()?,
                id: r.u64()?,
            },
            kind::DONE => Rec::Done {
                sid: r.u64()?,
                id: r.u64()?,
            },
            kind::ACCEPTED => {
                let id = r.u64()?;
                let scope = r.scope()?;
                let stamp_ms = r.u64()?;
                let mut causes = Causes {
                    qos2_from: r.opt_from()?,
                    delayed: r.opt_u64()?,
                    will_of: r.opt_u64()?,
                    passes_on: None,
                };
                let message = Arc::new(r.message(clock)?);
                if r.pos < body.len() {
                    causes.passes_on = r.opt_origin()?;
                }
                Rec::Accepted {
                    id,
                    scope,
                    stamp_ms,
                    causes,
                    message,
                }
            }
            kind::SETTLED => Rec::Settled { upto: r.u64()? },
            kind::RETAIN => Rec::Retain {
                stamp_ms: r.u64()?,
                origin: r.opt_origin()?,
                message: Arc::new(r.message(clock)?),
            },
            kind::DELAYED => Rec::Delayed {
                id: r.u64()?,
                due_ms: r.u64()?,
                from: r.opt_from()?,
                message: Arc::new(r.message(clock)?),
            },
            kind::DELAYED_DONE => Rec::DelayedDone { id: r.u64()? },
            other => return Err(RecordError::UnknownKind(other)),
        };
        if r.pos != body.len() {
            return Err(RecordError::Invalid("bytes after the last field"));
        }
        Ok(rec)
    }
}

/// Little-endian field writer.
struct Writer<'a>(&'a mut BytesMut);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.put_u8(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.put_u16_le(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.put_u32_le(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.put_u64_le(v);
    }
    fn opt_u64(&mut self, v: Option<u64>) {
        match v {
            Some(v) => {
                self.u8(1);
                self.u64(v);
            }
            None => self.u8(0),
        }
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.put_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn opt_from(&mut self, from: Option<(Sid, u16)>) {
        match from {
            Some((sid, pid)) => {
                self.u8(1);
                self.u64(sid);
                self.u16(pid);
            }
            None => self.u8(0),
        }
    }
    fn opt_origin(&mut self, o: Option<Origin>) {
        match o {
            Some(o) => {
                self.u8(1);
                self.u16(o.shard);
                self.u64(o.id);
            }
            None => self.u8(0),
        }
    }
    fn scope(&mut self, s: &Scope) {
        // Bit 0: ordinary; bit 1: every pick differs from ordinary (logs
        // written before the flag hold 0 or 1, which meant both or
        // neither); bit 2: retained elsewhere.
        self.u8(u8::from(s.ordinary)
            | (u8::from(s.every_pick != s.ordinary) << 1)
            | (u8::from(s.retained_elsewhere) << 2));
        self.u32(s.shared.len() as u32);
        for p in &s.shared {
            self.str(&p.group);
            self.str(&p.filter);
        }
    }
    fn subscription(&mut self, s: &Subscription) {
        // The 5.0 subscription options byte, as in SUBSCRIBE.
        self.u8(codec::encode_options(&s.options, Version::V5));
        self.u32(s.subscription_id.unwrap_or(0));
    }
    fn target(&mut self, t: &Target) {
        self.u64(t.sid);
        self.u8(t.qos as u8 | (u8::from(t.retain) << 2));
        self.u32(t.subscription_ids.len() as u32);
        for id in &t.subscription_ids {
            self.u32(*id);
        }
        match t.state {
            TargetState::Queued => self.u8(0),
            TargetState::Inflight {
                packet_id,
                released,
            } => {
                self.u8(1 + u8::from(released));
                self.u16(packet_id);
            }
        }
    }
    /// A message: expiry, publisher, flags (bit 0: a publisher; bit 1:
    /// its id in the cluster follows, [`Message::id`]: a copy of the
    /// session on another node skips what it has by it), then a 5.0
    /// PUBLISH of the rest.
    fn message(&mut self, m: &Message, clock: &WallClock) {
        self.opt_u64(m.expires_at.map(|t| clock.to_ms(t)));
        self.str(m.publisher.as_deref().unwrap_or(""));
        self.u8(u8::from(m.publisher.is_some()) | (u8::from(m.id != 0) << 1));
        if m.id != 0 {
            self.u64(m.id);
        }
        let view = m.publish_view();
        self.u32(codec::publish_len(&view, Version::V5) as u32);
        codec::encode_publish(&view, Version::V5, self.0);
    }
    fn opt_will(&mut self, will: Option<&Will>, clock: &WallClock) {
        let Some(w) = will else {
            return self.u8(0);
        };
        self.u8(1);
        let mut properties = w.properties.clone();
        self.opt_u64(properties.will_delay_interval.take().map(u64::from));
        let expiry = properties.message_expiry_interval.take();
        self.opt_u64(expiry.map(u64::from));
        let m = Message {
            topic: w.topic.clone(),
            payload: w.payload.clone(),
            qos: w.qos,
            retain: w.retain,
            properties: properties.into(),
            expires_at: None,
            publisher: None,
            id: 0,
            late: false,
        };
        self.message(&m, clock);
    }
    fn session(&mut self, s: &SessionRec, clock: &WallClock) {
        self.u64(s.sid);
        self.str(&s.client_id);
        self.u32(s.expiry_s);
        self.opt_u64(s.offline_since_ms);
        self.u32(s.subscriptions.len() as u32);
        for (filter, sub) in &s.subscriptions {
            self.str(filter);
            self.subscription(sub);
        }
        self.u32(s.qos2_in.len() as u32);
        for id in &s.qos2_in {
            self.u16(*id);
        }
        self.opt_will(s.will.as_ref(), clock);
        self.opt_u64(s.will_due_ms);
    }
}

/// Little-endian field reader.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        let s = self
            .b
            .get(self.pos..self.pos + n)
            .ok_or(RecordError::Short)?;
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn opt_u64(&mut self) -> Result<Option<u64>, RecordError> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some(self.u64()?),
        })
    }
    fn bytes(&mut self) -> Result<&'a [u8], RecordError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, RecordError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| RecordError::Invalid("string is not UTF-8"))
    }
    fn opt_from(&mut self) -> Result<Option<(Sid, u16)>, RecordError> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some((self.u64()?, self.u16()?)),
        })
    }
    fn opt_origin(&mut self) -> Result<Option<Origin>, RecordError> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some(Origin {
                shard: self.u16()?,
                id: self.u64()?,
            }),
        })
    }
    fn scope(&mut self) -> Result<Scope, RecordError> {
        let flags = self.u8()?;
        if flags > 7 {
            return Err(RecordError::Invalid("scope flags"));
        }
        let ordinary = flags & 1 != 0;
        let every_pick = ordinary != (flags & 2 != 0);
        let retained_elsewhere = flags & 4 != 0;
        let n = self.u32()? as usize;
        let mut shared = SmallVec::new();
        for _ in 0..n {
            shared.push(SharedPick {
                group: Arc::from(self.string()?),
                filter: Arc::from(self.string()?),
            });
        }
        Ok(Scope {
            ordinary,
            shared,
            every_pick,
            retained_elsewhere,
        })
    }
    fn qos(b: u8) -> Result<QoS, RecordError> {
        QoS::from_u8(b & 3).ok_or(RecordError::Invalid("QoS 3"))
    }
    fn subscription(&mut self) -> Result<Subscription, RecordError> {
        let b = self.u8()?;
        let id = self.u32()?;
        let options = codec::decode_options(b, Version::V5)
            .map_err(|_| RecordError::Invalid("subscription options"))?;
        Ok(Subscription {
            options,
            subscription_id: (id != 0).then_some(id),
        })
    }
    fn target(&mut self) -> Result<Target, RecordError> {
        let sid = self.u64()?;
        let flags = self.u8()?;
        let n = self.u32()? as usize;
        let mut subscription_ids = SubIds::new();
        for _ in 0..n {
            subscription_ids.push(self.u32()?);
        }
        let state = match self.u8()? {
            0 => TargetState::Queued,
            s => TargetState::Inflight {
                packet_id: self.u16()?,
                released: s == 2,
            },
        };
        Ok(Target {
            sid,
            qos: Self::qos(flags)?,
            retain: flags & 4 != 0,
            subscription_ids,
            state,
        })
    }
    fn publish(&mut self) -> Result<codec::Publish, RecordError> {
        let packet = self.bytes()?;
        let mut buf = BytesMut::from(packet);
        match codec::decode(&mut buf, Version::V5, codec::MAX_PACKET_SIZE) {
            Ok(Some(Packet::Publish(p))) if buf.is_empty() => Ok(p),
            _ => Err(RecordError::Invalid("stored PUBLISH does not decode")),
        }
    }
    fn message(&mut self, clock: &WallClock) -> Result<Message, RecordError> {
        let expires_ms = self.opt_u64()?;
        let publisher = self.string()?;
        let flags = self.u8()?;
        if flags > 3 {
            return Err(RecordError::Invalid("unknown message flags"));
        }
        let has_publisher = flags & 1 != 0;
        let id = match flags & 2 {
            0 => 0,
            _ => self.u64()?,
        };
        let mut p = self.publish()?;
        // The record's own expiry stands; a damaged record must not make
        // per-delivery properties appear twice when a copy is sent.
        crate::message::strip_per_delivery(&mut p.properties);
        Ok(Message {
            topic: p.topic,
            // A slice of this record's own copy of the packet (never of
            // the log's mapping).
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties: p.properties,
            expires_at: expires_ms.map(|ms| clock.to_instant(ms)),
            publisher: has_publisher.then(|| Arc::from(publisher)),
            id,
            late: false,
        })
    }
    fn opt_will(&mut self, clock: &WallClock) -> Result<Option<Will>, RecordError> {
        if self.u8()? == 0 {
            return Ok(None);
        }
        let delay = self.opt_u64()?;
        let expiry = self.opt_u64()?;
        let m = self.message(clock)?;
        let mut properties = m.properties.into_properties();
        properties.will_delay_interval = delay.map(|d| d as u32);
        properties.message_expiry_interval = expiry.map(|e| e as u32);
        Ok(Some(Will {
            topic: m.topic,
            payload: m.payload,
            qos: m.qos,
            retain: m.retain,
            properties,
        }))
    }
    fn session(&mut self, clock: &WallClock) -> Result<SessionRec, RecordError> {
        let sid = self.u64()?;
        let client_id = self.string()?;
        let expiry_s = self.u32()?;
        let offline_since_ms = self.opt_u64()?;
        let n = self.u32()? as usize;
        let mut subscriptions = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            subscriptions.push((self.string()?, self.subscription()?));
        }
        let n = self.u32()? as usize;
        let mut qos2_in = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            qos2_in.push(self.u16()?);
        }
        Ok(SessionRec {
            sid,
            client_id,
            expiry_s,
            offline_since_ms,
            subscriptions,
            qos2_in,
            will: self.opt_will(clock)?,
            will_due_ms: self.opt_u64()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use bytes::Bytes;

    use crate::codec::Properties;

    use crate::codec::SubOptions;

    use super::*;

    /// One clock for the whole test run, so encoding and decoding agree.
    fn clock() -> WallClock {
        static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        WallClock::at(*BASE.get_or_init(Instant::now), 1_700_000_000_000)
    }

    fn message(c: &WallClock) -> Arc<Message> {
        Arc::new(Message {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"payload"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: Properties {
                content_type: Some("text/plain".into()),
                user_properties: vec![("k".into(), "v".into())],
                correlation_data: Some(Bytes::from_static(b"corr")),
                ..Properties::default()
            }
            .into(),
            expires_at: Some(c.to_instant(1_700_000_060_000)),
            publisher: Some("pub-1".into()),
            id: 0,
            late: false,
        })
    }

    fn round_trip(rec: Rec) {
        let c = clock();
        let mut buf = BytesMut::new();
        let kind = rec.encode(&c, &mut buf);
        assert_eq!(kind, rec.kind());
        let back = Rec::decode(kind, &buf, &c).expect("decodes");
        assert_eq!(back, rec);
        // An Accepted record of an older version ends before `passes_on`.
        let older = match &rec {
            Rec::Accepted { causes, .. } => {
                let trailing = if causes.passes_on.is_some() { 11 } else { 1 };
                Some(buf.len() - trailing)
            }
            _ => None,
        };
        for cut in 0..buf.len() {
            match Rec::decode(kind, &buf[..cut], &c) {
                Err(_) => {}
                Ok(Rec::Accepted { causes, .. }) if Some(cut) == older => {
                    assert_eq!(causes.passes_on, None, "an older Accepted record");
                }
                Ok(other) => panic!("cut at {cut} decoded as {other:?}"),
            }
        }
    }

    #[test]
    fn every_record_kind_round_trips_and_refuses_a_short_body() {
        let c = clock();
        let sub = Subscription {
            options: SubOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
            },
            subscription_id: Some(77),
        };
        let will = Will {
            topic: "w/t".into(),
            payload: Bytes::from_static(b"bye"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties {
                will_delay_interval: Some(30),
                message_expiry_interval: Some(600),
                ..Properties::default()
            },
        };
        let scope = Scope {
            ordinary: false,
            shared: SmallVec::from_buf([SharedPick {
                group: "g".into(),
                filter: "a/#".into(),
            }]),
            ..Scope::default()
        };
        let target = Target {
            sid: 3,
            qos: QoS::ExactlyOnce,
            retain: true,
            subscription_ids: SmallVec::from_slice(&[1, 9]),
            state: TargetState::Inflight {
                packet_id: 513,
                released: true,
            },
        };
        let cases = vec![
            Rec::Start {
                shard: 1,
                shards: 4,
            },
            Rec::Clock { ms: 5 },
            Rec::Session(Box::new(SessionRec {
                sid: 9,
                client_id: "dev-1".into(),
                expiry_s: 3600,
                offline_since_ms: Some(1_699_999_999_000),
                subscriptions: vec![("a/+".into(), sub.clone())],
                qos2_in: vec![4, 5],
                will: Some(will.clone()),
                will_due_ms: Some(1_700_000_030_000),
            })),
            Rec::Subscribe {
                sid: 1,
                filter: "$share/g/x".into(),
                sub,
            },
            Rec::Unsubscribe {
                sid: 1,
                filter: "x".into(),
            },
            Rec::Online {
                sid: 2,
                expiry_s: 10,
                will: Some(Box::new(will)),
            },
            Rec::Online {
                sid: 2,
                expiry_s: 10,
                will: None,
            },
            Rec::Offline {
                sid: 2,
                at_ms: 7,
                expiry_s: 0,
                will_due_ms: None,
            },
            Rec::WillDone { sid: 2 },
            Rec::SessionEnd { sid: 2 },
            Rec::Qos2Done {
                sid: 2,
                packet_id: 65535,
            },
            Rec::MovedIn {
                sid: 2,
                claim: 1_700_000_000_000,
            },
            Rec::Told {
                sid: 2,
                born: 1_700_000_000_001,
            },
            Rec::Message {
                id: 11,
                origin: Some(Origin { shard: 1, id: 99 }),
                scope: scope.clone(),
                message: Some(message(&c)),
                targets: vec![
                    target.clone(),
                    Target {
                        state: TargetState::Queued,
                        ..target
                    },
                ],
            },
            Rec::Message {
                id: 12,
                origin: Some(Origin { shard: 0, id: 1 }),
                scope: Scope::everyone(),
                message: None,
                targets: vec![],
            },
            Rec::Sent {
                sid: 1,
                id: 2,
                packet_id: 3,
            },
            Rec::Released { sid: 1, id: 2 },
            Rec::Done { sid: 1, id: 2 },
            Rec::Accepted {
                id: 4,
                scope: scope.clone(),
                message: message(&c),
                stamp_ms: 8,
                causes: Causes {
                    qos2_from: Some((3, 17)),
                    delayed: Some(2),
                    will_of: Some(4),
                    passes_on: Some(Origin { shard: 2, id: 9 }),
                },
            },
            Rec::Accepted {
                id: 5,
                scope: Scope {
                    ordinary: true,
                    retained_elsewhere: true,
                    ..scope.clone()
                },
                message: message(&c),
                stamp_ms: 9,
                causes: Causes::default(),
            },
            Rec::Accepted {
                id: 6,
                scope: Scope {
                    every_pick: true,
                    shared: SmallVec::new(),
                    ..scope.clone()
                },
                message: message(&c),
                stamp_ms: 9,
                causes: Causes::default(),
            },
            Rec::Settled { upto: 44 },
            Rec::Retain {
                message: message(&c),
                stamp_ms: 1,
                origin: Some(Origin { shard: 3, id: 8 }),
            },
            Rec::Delayed {
                id: 5,
                due_ms: 1_700_000_100_000,
                message: message(&c),
                from: Some((1, 2)),
            },
            Rec::DelayedDone { id: 5 },
        ];
        for rec in cases {
            round_trip(rec);
        }
    }

    /// The scope's flags byte as logs written before `every_pick` hold it
    /// (0: nobody but the listed picks, 1: everyone) means what it meant.
    #[test]
    fn a_scope_reads_as_it_did_before_every_pick_had_a_bit() {
        let c = clock();
        let at = |scope: Scope| {
            let rec = Rec::Message {
                id: 1,
                origin: None,
                scope,
                message: None,
                targets: vec![],
            };
            let mut buf = BytesMut::new();
            let kind = rec.encode(&c, &mut buf);
            (kind, buf)
        };
        // After the id (8 bytes) and an absent origin (1).
        const FLAGS: usize = 9;
        let scope_of = |kind, buf: &[u8]| match Rec::decode(kind, buf, &c) {
            Ok(Rec::Message { scope, .. }) => Ok(scope),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        let (kind, everyone) = at(Scope::everyone());
        assert_eq!(everyone[FLAGS], 1);
        let (_, listed) = at(Scope::default());
        assert_eq!(listed[FLAGS], 0);
        let ordinary_only = Scope {
            ordinary: true,
            ..Scope::default()
        };
        let (_, buf) = at(ordinary_only.clone());
        assert_eq!(buf[FLAGS], 3);
        assert_eq!(scope_of(kind, &buf).unwrap(), ordinary_only);
        let peers = Scope {
            retained_elsewhere: true,
            ..ordinary_only
        };
        let (_, buf) = at(peers.clone());
        assert_eq!(buf[FLAGS], 7);
        assert_eq!(scope_of(kind, &buf).unwrap(), peers);
        let mut bad = buf.to_vec();
        bad[FLAGS] = 8;
        assert!(scope_of(kind, &bad).is_err());
    }

    #[test]
    fn expiry_is_wall_time_across_a_restart() {
        let before = WallClock::at(Instant::now(), 1_000_000);
        let m = message(&before);
        let rec = Rec::Retain {
            message: Arc::new(Message {
                expires_at: Some(before.to_instant(1_060_000)),
                ..(*m).clone()
            }),
            stamp_ms: 0,
            origin: None,
        };
        let mut buf = BytesMut::new();
        let kind = rec.encode(&before, &mut buf);
        // Read back 20 s later (wall and monotonic): 40 s are left.
        let t = Instant::now() + Duration::from_secs(100);
        let after = WallClock::at(t, 1_020_000);
        let Rec::Retain { message, .. } = Rec::decode(kind, &buf, &after).unwrap() else {
            panic!()
        };
        assert_eq!(message.remaining_expiry_s(t), Some(40));
    }

    #[test]
    fn garbage_never_panics() {
        let c = clock();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let len = (x % 64) as usize;
            let body: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = Rec::decode((x % 60) as u8, &body, &c);
        }
    }
}
