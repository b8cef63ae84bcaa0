//! The session: one client's MQTT state machine, sans-IO.
//!
//! Shard-local: a session lives on its client's home shard
//! (`hash(client_id) % shards`) and never moves while the broker runs. It is
//! `!Send` (it holds an `Rc` to the shard's limits).
//!
//! Inputs are decoded packets, deliveries from the router and `now`; outputs
//! are packets to transmit ([`Session::poll_transmit`], or encoded straight
//! into a buffer by [`Session::encode_transmit`]), actions for the shard
//! ([`Session::poll_action`]): publish a message, change a subscription,
//! close the connection, end the session; and the journal of changes to
//! stored deliveries the shard must log ([`Session::poll_journal`]). The session never
//! reads the clock or touches a socket, so every timeout (keepalive, will
//! delay, session expiry, message expiry) is tested with a virtual clock.
//!
//! Invariants (checked by [`Session::check_invariants`] in debug builds):
//! in-flight packet ids are unique and non-zero; the in-flight window never
//! exceeds the client's Receive Maximum; `queue_bytes` is the sum of the
//! queued messages' costs; inbound QoS 2 ids never exceed the server's
//! Receive Maximum.

/// Log a line the client caused, naming it (quoted), if the session's log
/// gate lets it through; the level is checked first, so a disabled level
/// spends nothing.
macro_rules! client_log {
    ($s:expr, $now:expr, $level:expr, $($arg:tt)+) => {
        if log::log_enabled!($level) {
            let gate = $s.log_gate.get_or_insert_with(|| Box::new($crate::text::LogGate::per_client()));
            if let Some(n) = gate.allow($now) {
                log::log!(
                    $level,
                    "client {}: {}{}",
                    $crate::text::quote(&$s.client_id),
                    format_args!($($arg)+),
                    $crate::text::suppressed_note(n)
                );
            }
        }
    };
}

mod durable;
mod inbound;
mod lifecycle;
mod moving;
mod outbound;
pub use outbound::{PAGE_IN_BATCH_MAX, QUEUE_ENTRY_INDEX_BYTES};
#[cfg(test)]
mod tests;
mod transmit;

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::hash::{HashMap, HashSet};
use smallvec::SmallVec;

use crate::codec::{Packet, QoS, SubOptions, Topic, Version, Will};
use crate::message::{ClientId, Message};

pub use durable::{DurableState, Lifetime, Restored, RestoredInflight, StoredDelivery};
pub use lifecycle::{expires_after_s, will_delay_s, WillDue};
pub use moving::Leaving;
use outbound::Outbound;
use transmit::{Outgoing, TransmitQueue};

/// Subscription identifiers attached to one delivery.
pub type SubIds = SmallVec<[u32; 1]>;

/// What to do with a message when a session's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverflowPolicy {
    /// Keep what is queued, drop the new message (counted).
    DropNew,
    /// Drop the oldest queued message to make room (counted).
    DropOldest,
}

/// Per-session limits, from the broker config; shared by every session of a
/// shard.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// The server's Receive Maximum: QoS 1/2 publishes a client may have
    /// unacknowledged towards us; more is DISCONNECT 0x93.
    pub receive_maximum: u16,
    /// Cap on our outbound in-flight window (the client's Receive Maximum
    /// lowers it further).
    pub inflight_max: u16,
    /// Messages queued per session (offline, or waiting for the window).
    pub queue_messages_max: usize,
    /// Bytes (topic + payload) queued per session, including QoS 0 waiting
    /// for the socket.
    pub queue_bytes_max: usize,
    /// Bytes a session's queue may hold when its QoS 1/2 deliveries are
    /// stored in the shard's log (a persistent session with a log): past
    /// the memory limits above, they wait in the log, not in memory. Each
    /// message counts its cost and [`QUEUE_ENTRY_INDEX_BYTES`]. 0: never
    /// paged out.
    pub queue_log_bytes_max: usize,
    /// What to drop when the queue is full.
    pub overflow: OverflowPolicy,
    /// Queue QoS 0 messages for offline persistent sessions.
    pub queue_qos0_offline: bool,
    /// Topic aliases a client may use towards us (CONNACK Topic Alias Maximum).
    pub topic_alias_max: u16,
    /// Bytes of topics the outbound alias map keeps.
    pub topic_alias_out_bytes_max: usize,
    /// Bytes of user properties one inbound packet may carry.
    pub user_properties_bytes_max: usize,
    /// Levels allowed in a topic name or filter.
    pub topic_levels_max: usize,
    /// Subscriptions per session.
    pub subscriptions_max: usize,
    /// Largest packet we accept (CONNACK Maximum Packet Size).
    pub packet_size_max_bytes: u32,
    /// Largest keepalive a client gets; 5.0 clients asking for more (or 0)
    /// are told this value in Server Keep Alive. 0 = no cap.
    pub keep_alive_s_max: u16,
    /// Largest session expiry interval granted, seconds.
    pub session_expiry_s_max: u32,
    /// Prefix of the Response Information sent to clients that request it;
    /// the client id is appended after a `/`.
    pub response_topic_prefix: String,
    /// What the shard can take right now, set by the shard.
    pub status: Rc<ShardStatus>,
}

/// Conditions of the shard a session must know when it answers a PUBLISH.
/// Shard-local; the shard sets them, its sessions read them.
#[derive(Debug, Default)]
pub struct ShardStatus {
    /// This shard's log, or another shard's, has no room for new messages
    /// (a disk is full): QoS 1/2 publishes are refused with 0x97 (3.x: the
    /// connection is closed).
    pub store_full: std::cell::Cell<bool>,
    /// The shard holds its share of `storage.delayed_messages_max`.
    pub delayed_full: std::cell::Cell<bool>,
    /// The counters of every session of the shard, live and ended: each
    /// session adds to them as it goes (plain integers, one shard's), so a
    /// scrape reads them without walking the sessions.
    pub stats: std::cell::RefCell<SessionStats>,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            receive_maximum: 128,
            inflight_max: 128,
            queue_messages_max: 1000,
            queue_bytes_max: 16 << 20,
            queue_log_bytes_max: 0,
            overflow: OverflowPolicy::DropNew,
            queue_qos0_offline: false,
            topic_alias_max: 32,
            topic_alias_out_bytes_max: 64 << 10,
            user_properties_bytes_max: 64 << 10,
            topic_levels_max: 32,
            subscriptions_max: 1000,
            packet_size_max_bytes: 1 << 20,
            keep_alive_s_max: 3600,
            session_expiry_s_max: u32::MAX,
            response_topic_prefix: "response".to_string(),
            status: Rc::default(),
        }
    }
}

/// A stored subscription of this session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscription {
    /// Options as granted.
    pub options: SubOptions,
    /// 5.0 Subscription Identifier.
    pub subscription_id: Option<u32>,
}

/// How one message reaches this session: the router has already merged
/// overlapping subscriptions into one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Highest granted QoS among the matching subscriptions.
    pub qos: QoS,
    /// RETAIN flag to send (retained on subscribe, or Retain As Published).
    pub retain: bool,
    /// Every matching subscription's identifier.
    pub subscription_ids: SubIds,
    /// The message's id in the shard's log when this delivery is stored
    /// there (a QoS 1/2 delivery to a persistent session). The session
    /// reports what becomes of it through [`Session::poll_journal`].
    pub stored: Option<u64>,
}

/// A change to a stored delivery or to inbound QoS 2 state that the shard
/// must write to its log (see [`Session::poll_journal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Journal {
    /// A stored message was sent for the first time, with this packet id.
    Sent {
        /// Stored message id.
        id: u64,
        /// Its packet id.
        packet_id: u16,
    },
    /// A stored QoS 2 message got its PUBREC: PUBREL stage.
    Released {
        /// Stored message id.
        id: u64,
    },
    /// The session is done with a stored message: acknowledged, refused,
    /// expired, too large for the client, or dropped from a full queue.
    Done {
        /// Stored message id.
        id: u64,
    },
    /// An inbound QoS 2 packet id was released by PUBREL.
    Qos2Done {
        /// The packet id.
        packet_id: u16,
    },
}

/// What a session asks its shard to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Route this message to its subscribers (a client PUBLISH or a will).
    Publish {
        /// The message.
        message: Arc<Message>,
        /// The client's packet id of a QoS 1/2 PUBLISH. Its PUBACK / PUBREC
        /// waits for the shard's verdict: [`Session::publish_done`]. For
        /// QoS 2 the session remembers the id until PUBREL (the shard stores
        /// it with the message).
        packet_id: Option<u16>,
        /// A delayed publish (`$delayed/{seconds}/{topic}`): route it after
        /// this many seconds. The message already has its final topic.
        delay_s: Option<u32>,
        /// It is this session's will (the session no longer holds it).
        will: bool,
    },
    /// Add or replace a subscription in the shard's subscriber trie; send
    /// retained messages as the options say.
    Subscribe {
        /// The full filter as the client sent it (may be `$share/...`).
        filter: String,
        /// The stored subscription.
        subscription: Subscription,
        /// False when it replaced an existing subscription (Retain Handling 1).
        is_new: bool,
    },
    /// Remove a subscription from the shard's subscriber trie.
    Unsubscribe {
        /// The full filter as the client sent it.
        filter: String,
    },
    /// Close the network connection once the queued transmits are written.
    Close,
    /// The session has ended (expired, or clean and disconnected): the shard
    /// drops it and all its subscriptions.
    End,
}

/// Counters kept per session and summed by the shard for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Messages accepted from the client, by QoS.
    pub received: [u64; 3],
    /// Their payload bytes, by QoS.
    pub received_bytes: [u64; 3],
    /// Messages sent to the client (first transmissions), by the QoS they
    /// were sent with.
    pub sent: [u64; 3],
    /// Their payload bytes, by QoS.
    pub sent_bytes: [u64; 3],
    /// Messages dropped because a queue was full.
    pub dropped_queue_full: u64,
    /// Queued messages lost because the log could not give them back.
    pub lost_unreadable: u64,
    /// QoS 0 messages dropped while the session was offline.
    pub dropped_offline_qos0: u64,
    /// Messages dropped because they expired before delivery.
    pub dropped_expired: u64,
    /// Messages dropped because they exceed the client's Maximum Packet Size.
    pub dropped_too_large: u64,
    /// Topics sent in full because the outbound alias map reached
    /// `mqtt.topic_alias_out_bytes_max`.
    pub alias_bytes_full: u64,
    /// Packets refused for carrying more than
    /// `mqtt.user_properties_bytes_max` of user properties.
    pub refused_user_properties: u64,
    /// PUBLISHes the ACL did not let the client write (dropped, or
    /// refused with 0x87).
    pub denied_publish: u64,
    /// SUBSCRIBE filters the ACL did not let the client read.
    pub denied_subscribe: u64,
    /// Deliveries the ACL did not let the client read (dropped).
    pub denied_delivery: u64,
    /// PUBLISHes refused because a log was full (disk or
    /// `storage.log_bytes_max`; 5.0 QoS 1/2: 0x97).
    pub refused_store_full: u64,
    /// Delayed publishes refused because `storage.delayed_messages_max` or
    /// `delayed_bytes_max` was reached.
    pub refused_delayed_full: u64,
}

/// A connection's topic aliases (MQTT 5.0).
#[derive(Debug, Default)]
struct Aliases {
    /// Those we assigned towards the client.
    out: HashMap<Topic, u16>,
    /// Bytes of the topics in `out`.
    out_bytes: usize,
    /// Those the client set.
    inbound: HashMap<u16, Topic>,
}

/// The part of a session that exists only while a connection is attached.
#[derive(Debug)]
struct Conn {
    version: Version,
    /// Keepalive granted (zero = none).
    keep_alive: Duration,
    last_activity: Instant,
    /// Outbound in-flight window: min(client Receive Maximum, inflight_max).
    window: u16,
    /// Client's Maximum Packet Size.
    max_packet_out: u32,
    /// Topic aliases we may assign towards the client.
    alias_out_max: u16,
    /// Made by the first alias either way: most connections use none.
    aliases: Option<Box<Aliases>>,
    /// Boxed: most connections have none, and a will is large.
    will: Option<Box<Will>>,
    /// The session expiry sent in CONNECT was 0: a DISCONNECT may not raise it.
    expiry_was_zero: bool,
    /// When the login's grant ends (a token's `exp`): the connection is
    /// closed then (5.0: DISCONNECT 0xA0).
    deadline: Option<Instant>,
}

/// Whether a connection is attached; each state holds its own data.
#[derive(Debug)]
enum Presence {
    /// A connection is attached.
    Connected(Conn),
    /// No connection since `since`.
    Offline {
        /// When the last connection ended (or the session was made).
        since: Instant,
        /// A will waiting for its delay, and when it is due.
        pending_will: Option<Box<(Will, Instant)>>,
    },
}

/// One client's session. See the module docs.
#[derive(Debug)]
pub struct Session {
    client_id: ClientId,
    limits: Rc<SessionLimits>,
    /// Connected (with the connection's state) or offline.
    presence: Presence,
    /// Incremented at every connect, so a shard can tell a stale connection.
    generation: u64,
    /// Session Expiry Interval in force, seconds (`u32::MAX` = never).
    expiry_s: u32,
    subscriptions: HashMap<String, Subscription>,
    out: Outbound,
    /// Inbound QoS 2 packet ids received and not yet released (PUBREL).
    inbound_qos2: HashSet<u16>,
    /// What `inbound_qos2` may hold: the Receive Maximum, or more when a
    /// restart under a lower one restored more.
    inbound_qos2_max: usize,
    /// Rate limit of the log lines this client causes (made by the first
    /// one: most clients cause none).
    log_gate: Option<Box<crate::text::LogGate>>,
    transmit: TransmitQueue,
    actions: VecDeque<Action>,
    journal: VecDeque<Journal>,
    /// Retained-message gathers from other shards still outstanding.
    gathers_pending: u32,
    /// Live deliveries that arrived during a gather: they go out after the
    /// retained messages, which come first.
    held: VecDeque<(Arc<Message>, Delivery)>,
    /// `held` reached the queue limit during the gathers outstanding: live
    /// deliveries go to the queue at once until they have all ended.
    held_released: bool,
    /// Cluster mode: its connections' claims not answered yet, and the
    /// moves into it that are on (how many of each): while either is not
    /// 0, what it has queued stays queued and a new delivery queues behind
    /// it, so that what another node's copy of it brings can be merged
    /// with it in each publisher's order (`moving`).
    queue_waits: (u32, u32),
    /// Messages this session took from another node when it moved here
    /// (their [`Message::id`]s): a copy that reaches it directly too is
    /// skipped, for a while after the move (`shard::moves`).
    moved_ids: Option<Box<HashSet<u64>>>,
    /// Cluster mode: per message origin (the high half of
    /// [`Message::id`]), the lowest and highest id that reached the
    /// session in its origin's order, and single ones outside those ranges
    /// (`moving::Seen`); a move to another node carries them.
    seen: Option<Box<moving::Seen>>,
    /// What the last move here brought of the other node's `seen`, and
    /// the subscriptions the session had there: a live copy of a message
    /// of those within its origin's marks was had there, and is
    /// skipped (one that a long partition held back on its way here).
    moved_marks: Option<Box<moving::MovedMarks>>,
    /// The marks of offers whose move was given up: QoS 2 copies within
    /// them are skipped ([`Session::take_marks`]).
    given_up_marks: Option<Box<moving::MovedMarks>>,
    /// Its own marks and subscriptions when a move into it began.
    pre_move: Option<Box<moving::MovedMarks>>,
    ended: bool,
    /// It holds its publishers (`shard::pressure`): what they sent before
    /// the hold reached them may take its queue's bounds twice over.
    holding: bool,
    /// What the current (or last) connection's user may read and write;
    /// None: everything (no ACL file, or a session restored from the log
    /// whose client has not connected since).
    acl: Option<Box<crate::auth::ClientAcl>>,
}

/// Bytes of a waiting packet beyond its topic, payload and properties,
/// about: a fixed header (2 to 5), the topic's length (2), a packet id (2)
/// and 5.0's property length (1 to 4); an acknowledgement is 2 to 6 in all.
const PACKET_OVERHEAD_BYTES: usize = 12;

impl Session {
    /// A new, empty, offline session for `client_id`.
    pub fn new(client_id: ClientId, limits: Rc<SessionLimits>, now: Instant) -> Session {
        let inbound_qos2_max = usize::from(limits.receive_maximum);
        Session {
            client_id,
            limits,
            generation: 0,
            expiry_s: 0,
            presence: Presence::Offline {
                since: now,
                pending_will: None,
            },
            subscriptions: HashMap::default(),
            out: Outbound::default(),
            inbound_qos2: HashSet::default(),
            inbound_qos2_max,
            log_gate: None,
            transmit: TransmitQueue::default(),
            actions: VecDeque::new(),
            journal: VecDeque::new(),
            gathers_pending: 0,
            held: VecDeque::new(),
            held_released: false,
            queue_waits: (0, 0),
            moved_ids: None,
            seen: None,
            moved_marks: None,
            given_up_marks: None,
            pre_move: None,
            ended: false,
            holding: false,
            acl: None,
        }
    }

    /// The client identifier.
    pub fn client_id(&self) -> &ClientId {
        &self.client_id
    }

    /// Generation of the current (or last) connection.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Protocol version of the attached connection.
    pub fn version(&self) -> Option<Version> {
        self.conn().map(|c| c.version)
    }

    /// The attached connection's state.
    fn conn(&self) -> Option<&Conn> {
        match &self.presence {
            Presence::Connected(c) => Some(c),
            Presence::Offline { .. } => None,
        }
    }

    fn conn_mut(&mut self) -> Option<&mut Conn> {
        match &mut self.presence {
            Presence::Connected(c) => Some(c),
            Presence::Offline { .. } => None,
        }
    }

    /// When the last connection ended; None while connected.
    fn offline_since(&self) -> Option<Instant> {
        match &self.presence {
            Presence::Connected(_) => None,
            Presence::Offline { since, .. } => Some(*since),
        }
    }

    /// The will waiting for its delay (offline only), and when it is due.
    fn pending_will(&self) -> Option<&(Will, Instant)> {
        match &self.presence {
            Presence::Offline {
                pending_will: Some(w),
                ..
            } => Some(w),
            _ => None,
        }
    }

    fn take_pending_will(&mut self) -> Option<Box<(Will, Instant)>> {
        match &mut self.presence {
            Presence::Offline { pending_will, .. } => pending_will.take(),
            Presence::Connected(_) => None,
        }
    }

    /// True while a connection is attached.
    pub fn is_connected(&self) -> bool {
        self.conn().is_some()
    }

    /// True once the session has ended; the shard should drop it.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// The session's subscriptions, by full filter.
    pub fn subscriptions(&self) -> &HashMap<String, Subscription> {
        &self.subscriptions
    }

    /// The counters this session adds to: its shard's, shared by all of
    /// its sessions (a session alone in its `SessionLimits`, as in the
    /// tests, has them to itself).
    pub fn stats(&self) -> SessionStats {
        *self.limits.status.stats.borrow()
    }

    /// The shard's counters, to add to (held for one statement).
    fn counters(&self) -> std::cell::RefMut<'_, SessionStats> {
        self.limits.status.stats.borrow_mut()
    }

    /// The Session Expiry Interval in force, seconds (0: ends with its
    /// connection; `u32::MAX`: never).
    pub fn expiry_s(&self) -> u32 {
        self.expiry_s
    }

    /// Messages waiting in the queue (not in flight).
    pub fn queued_len(&self) -> usize {
        self.out.queue.len()
    }

    /// Messages sent and not yet fully acknowledged.
    pub fn inflight_len(&self) -> usize {
        self.out.inflight.len()
    }

    /// Next packet to write to the connection, in order.
    pub fn poll_transmit(&mut self) -> Option<Packet> {
        self.transmit.pop().map(Outgoing::into_packet)
    }

    /// Encode waiting packets for `version` into `out` until it holds about
    /// `limit` bytes: the writer's fast path (no `Packet` per delivery).
    pub fn encode_transmit(&mut self, version: Version, out: &mut bytes::BytesMut, limit: usize) {
        // One allocation for what is waiting (up to `limit`, and the
        // packet that crosses it), not a doubling after every few packets:
        // its topics, payloads and properties, and about the headers of
        // each packet.
        let n = self.transmit.len();
        if n > 0 {
            let waiting = self.transmit.publish_bytes() + PACKET_OVERHEAD_BYTES * n;
            let room = limit.saturating_sub(out.len());
            out.reserve(if waiting > room {
                room + waiting / n
            } else {
                waiting
            });
        }
        while out.len() < limit {
            match self.transmit.pop() {
                Some(o) => o.encode(version, out),
                None => return,
            }
        }
    }

    /// True when packets are waiting in [`Session::poll_transmit`].
    pub fn has_transmit(&self) -> bool {
        !self.transmit.is_empty()
    }

    /// True when the packets waiting for the socket reach the session's
    /// queue limits (twice them while it holds its publishers): the shard
    /// stops reading from a client that does not read its
    /// acknowledgements, and QoS 0 deliveries are dropped.
    pub fn transmit_backlog_full(&self) -> bool {
        let (len, bytes) = self.queue_bounds();
        self.transmit.len() >= len || self.transmit.publish_bytes() >= bytes
    }

    /// `mqtt.queue_messages_max` and `queue_bytes_max`, twice them while
    /// the session holds its publishers: the messages they sent before
    /// the hold reached them (from other shards, through the lanes) are
    /// taken rather than dropped.
    fn queue_bounds(&self) -> (usize, usize) {
        let factor = if self.holding { 2 } else { 1 };
        (
            self.limits.queue_messages_max * factor,
            self.limits.queue_bytes_max * factor,
        )
    }

    /// The shard says whether this session holds its publishers
    /// (`shard::pressure`).
    pub fn set_holding(&mut self, holding: bool) {
        self.holding = holding;
    }

    /// Next action for the shard.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Next change the shard must log, in order.
    pub fn poll_journal(&mut self) -> Option<Journal> {
        self.journal.pop_front()
    }

    /// Stored delivery `id` is done with (the shard forgets it).
    pub fn journal_done(&mut self, id: u64) {
        self.done(Some(id));
    }

    /// Journal that a stored delivery is finished with, if it was stored.
    pub(super) fn done(&mut self, stored: Option<u64>) {
        if let Some(id) = stored {
            self.journal.push_back(Journal::Done { id });
        }
    }

    /// The earliest moment [`Session::handle_timeout`] has work to do.
    pub fn next_timeout(&self) -> Option<Instant> {
        if self.ended {
            return None;
        }
        let keepalive = self.conn().and_then(|c| {
            (!c.keep_alive.is_zero()).then(|| c.last_activity + c.keep_alive * 3 / 2)
        });
        let will = self.pending_will().map(|w| w.1);
        let expiry = self.expiry_deadline();
        let login = self.conn().and_then(|c| c.deadline);
        [keepalive, will, expiry, login].into_iter().flatten().min()
    }

    /// Check the invariants in the module docs (panics naming the first
    /// that does not hold): the shard's debug-build checks and the
    /// simulator call it.
    pub fn check_invariants(&self) {
        self.out.check_invariants();
        assert!(self.inbound_qos2.len() <= self.inbound_qos2_max);
    }
}

impl Session {
    /// When the connection attached now must end (its login token's
    /// expiry); None: never for that reason.
    pub fn set_connection_deadline(&mut self, at: Option<Instant>) {
        if let Some(c) = self.conn_mut() {
            c.deadline = at;
        }
    }

    /// The ACL of the connection attaching now (None: everything allowed);
    /// it stays with the session while it is offline.
    pub fn set_acl(&mut self, acl: Option<crate::auth::ClientAcl>) {
        self.acl = acl.map(Box::new);
    }

    /// True when an ACL applies to the session.
    pub fn has_acl(&self) -> bool {
        self.acl.is_some()
    }

    /// True when the session's ACL lets its client read `topic`. The shard
    /// asks before it makes a session a target (fan-out, retained
    /// gathers); the session asks again only for what it queued before
    /// its connection's ACL was known (`pump`).
    pub fn may_read(&self, topic: &str) -> bool {
        self.acl
            .as_ref()
            .is_none_or(|a| a.allows(topic, crate::auth::Want::Read))
    }
}
