//! What the admin API asks one shard, and its answers: pages of clients
//! and subscriptions, one client's detail, a kick, a publish, a retained
//! message read or deleted.
//!
//! Shard-local code over [`State`], sans-IO: the HTTP thread sends an
//! [`AdminRequest`] through the shard's control channel and the shard
//! answers at its next tick. Every answer is bounded so that no request
//! stalls a shard: a page walks at most [`SCAN_MAX`] session slots and
//! returns where to go on (the cursor), as Redis's SCAN does, and holds at
//! most [`PAGE_MAX`] entries (a session's subscriptions are not split, so a
//! subscription page may pass the limit by one session's).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;

use super::routing::{Reach, Source};
use super::{SessionSlot, ShardCore};
use crate::codec::{QoS, Version};
use crate::message::Message;

/// Session slots one page request looks at, at most.
pub const SCAN_MAX: u32 = 4096;
/// Entries one page holds, at most.
pub const PAGE_MAX: usize = 1000;

/// A question to one shard.
#[derive(Debug, Clone)]
pub enum AdminRequest {
    /// Sessions from slot `from` on whose client id starts with `prefix`
    /// and whose user is `user` (when given), at most `limit`.
    Clients {
        /// The first session slot to look at.
        from: u32,
        /// Entries wanted (capped at [`PAGE_MAX`]).
        limit: usize,
        /// Client id prefix.
        prefix: Option<String>,
        /// User name.
        user: Option<String>,
    },
    /// One session in detail.
    Client {
        /// Its client id.
        client_id: String,
    },
    /// Close a client's connection (5.0: DISCONNECT 0x98); with
    /// `discard`, end its session too.
    Kick {
        /// Its client id.
        client_id: String,
        /// End the session as well.
        discard: bool,
    },
    /// The subscriptions of sessions from slot `from` on, of clients whose
    /// id starts with `prefix` (when given), at most about `limit`.
    Subscriptions {
        /// The first session slot to look at.
        from: u32,
        /// Entries wanted (capped at [`PAGE_MAX`]).
        limit: usize,
        /// Client id prefix.
        prefix: Option<String>,
    },
    /// Publish as the broker (no ACL, no publishing client).
    Publish {
        /// Topic name (checked by the caller: no wildcards, not `$SYS`).
        topic: String,
        /// Payload.
        payload: Bytes,
        /// QoS.
        qos: QoS,
        /// Retain flag.
        retain: bool,
    },
    /// The retained message of a topic this shard owns.
    Retained {
        /// Topic name.
        topic: String,
    },
    /// Delete the retained message of a topic this shard owns (logged and,
    /// in a cluster, replicated as an empty retained publish would be;
    /// nothing is delivered).
    DeleteRetained {
        /// Topic name.
        topic: String,
    },
}

/// A shard's answer.
#[derive(Debug, Clone)]
pub enum AdminAnswer {
    /// A page of clients, and the slot to go on from (None: the shard's
    /// sessions are done).
    Clients(Vec<ClientInfo>, Option<u32>),
    /// One client, if it has a session here.
    Client(Option<ClientDetail>),
    /// Whether there was a connection to close or a session to discard.
    Kicked(bool),
    /// A page of subscriptions, and the slot to go on from.
    Subscriptions(Vec<SubscriptionInfo>, Option<u32>),
    /// Whether the message was accepted (false: the log refused a QoS 1/2
    /// message).
    Published(bool),
    /// The retained message, if there is one.
    Retained(Option<RetainedInfo>),
    /// Whether there was one to delete.
    RetainedDeleted(bool),
}

/// One session as a page lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ClientInfo {
    /// Client id.
    pub client_id: String,
    /// The user its last connection logged in as (None: anonymous, or
    /// restored from the log and not connected since).
    pub username: Option<String>,
    /// Whether a connection is attached.
    pub connected: bool,
    /// "3.1", "3.1.1" or "5.0" while connected.
    pub protocol: Option<&'static str>,
    /// The shard that holds it.
    pub shard: usize,
    /// Session Expiry Interval, seconds (4294967295: never).
    pub session_expiry_s: u32,
    /// Subscriptions.
    pub subscriptions: usize,
    /// Messages waiting in its queue.
    pub queued: usize,
    /// Messages sent and not yet acknowledged.
    pub inflight: usize,
}

/// One session in detail.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ClientDetail {
    /// What a page says of it.
    #[serde(flatten)]
    pub info: ClientInfo,
    /// Its subscriptions, by filter.
    pub subscription_list: Vec<SubscriptionInfo>,
}

/// One subscription.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SubscriptionInfo {
    /// The subscribing client.
    pub client_id: String,
    /// The filter as subscribed (`$share/{group}/...` included).
    pub filter: String,
    /// Granted QoS.
    pub qos: u8,
    /// 5.0 No Local.
    pub no_local: bool,
    /// 5.0 Retain As Published.
    pub retain_as_published: bool,
    /// 5.0 Retain Handling.
    pub retain_handling: u8,
    /// 5.0 Subscription Identifier.
    pub subscription_id: Option<u32>,
}

/// A retained message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedInfo {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: u8,
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::V3_1 => "3.1",
        Version::V3_1_1 => "3.1.1",
        Version::V5 => "5.0",
    }
}

impl ShardCore {
    /// Answer an admin API request (see the module docs).
    pub fn admin(&self, now: Instant, request: AdminRequest) -> AdminAnswer {
        match request {
            AdminRequest::Clients {
                from,
                limit,
                prefix,
                user,
            } => {
                let wanted = |slot: &SessionSlot| {
                    prefix
                        .as_deref()
                        .is_none_or(|p| slot.session.client_id().starts_with(p))
                        && user
                            .as_deref()
                            .is_none_or(|u| slot.username.as_deref() == Some(u))
                };
                let (page, next) = self.scan(from, limit, |slot, out: &mut Vec<ClientInfo>| {
                    if wanted(slot) {
                        out.push(self.client_info(slot));
                    }
                });
                AdminAnswer::Clients(page, next)
            }
            AdminRequest::Client { client_id } => {
                let st = self.state.borrow();
                let slot = st
                    .by_client
                    .get(client_id.as_str())
                    .and_then(|&k| st.sessions.get(k));
                AdminAnswer::Client(slot.map(|slot| ClientDetail {
                    info: self.client_info(slot),
                    subscription_list: subscriptions_of(slot),
                }))
            }
            AdminRequest::Kick { client_id, discard } => {
                let mut st = self.state.borrow_mut();
                let Some(&key) = st.by_client.get(client_id.as_str()) else {
                    return AdminAnswer::Kicked(false);
                };
                let slot = st.sessions.get_mut(key).expect("indexed session exists");
                let kicked = slot.session.kick(now, discard);
                self.drive(&mut st, key, now);
                Self::debug_invariants(&st);
                AdminAnswer::Kicked(kicked)
            }
            AdminRequest::Subscriptions {
                from,
                limit,
                prefix,
            } => {
                let (page, next) = self.scan(from, limit, |slot, out| {
                    let id = slot.session.client_id();
                    if prefix.as_deref().is_none_or(|p| id.starts_with(p)) {
                        out.extend(subscriptions_of(slot));
                    }
                });
                AdminAnswer::Subscriptions(page, next)
            }
            AdminRequest::Publish {
                topic,
                payload,
                qos,
                retain,
            } => {
                let message = Message::from_broker(&topic, payload, qos, retain);
                let mut st = self.state.borrow_mut();
                let source = Source::default();
                let accepted = self.route(&mut st, now, Arc::new(message), source, Reach::Cluster);
                Self::debug_invariants(&st);
                AdminAnswer::Published(accepted)
            }
            AdminRequest::Retained { topic } => {
                let st = self.state.borrow();
                let kept = st.retained.get(&topic).map(|k| RetainedInfo {
                    topic: topic.clone(),
                    payload: k.message.payload.clone(),
                    qos: k.message.qos as u8,
                });
                AdminAnswer::Retained(kept)
            }
            AdminRequest::DeleteRetained { topic } => {
                let mut st = self.state.borrow_mut();
                if st.retained.get(&topic).is_none() {
                    return AdminAnswer::RetainedDeleted(false);
                }
                let empty = Message::from_broker(&topic, Bytes::new(), QoS::AtMostOnce, true);
                // Stamped as a client's delete is (the log's clock).
                let stamp_ms = st.store.as_ref().map_or(0, |s| s.wall_ms(now));
                let version = super::cluster_retained::Version::Local;
                self.store_retained(&mut st, now, Arc::new(empty), None, stamp_ms, version);
                Self::debug_invariants(&st);
                AdminAnswer::RetainedDeleted(true)
            }
        }
    }

    /// Walk at most [`SCAN_MAX`] session slots from `from`, letting `take`
    /// add each one's entries, until about `limit` (at most [`PAGE_MAX`])
    /// are taken; the slot to go on from, None when the walk ended.
    fn scan<T>(
        &self,
        from: u32,
        limit: usize,
        mut take: impl FnMut(&SessionSlot, &mut Vec<T>),
    ) -> (Vec<T>, Option<u32>) {
        let limit = limit.clamp(1, PAGE_MAX);
        let st = self.state.borrow();
        let mut page = Vec::new();
        for (looked, (key, slot)) in st.sessions.iter_from(from).enumerate() {
            if page.len() >= limit || looked >= SCAN_MAX as usize {
                return (page, Some(key));
            }
            take(slot, &mut page);
        }
        (page, None)
    }

    fn client_info(&self, slot: &SessionSlot) -> ClientInfo {
        let s = &slot.session;
        ClientInfo {
            client_id: s.client_id().to_string(),
            username: slot.username.as_deref().map(str::to_string),
            connected: slot.conn.is_some(),
            protocol: slot.conn.as_ref().map(|c| protocol(c.version)),
            shard: self.id,
            session_expiry_s: s.expiry_s(),
            subscriptions: s.subscriptions().len(),
            queued: s.queued_len(),
            inflight: s.inflight_len(),
        }
    }
}

/// A session's subscriptions, sorted by filter.
fn subscriptions_of(slot: &SessionSlot) -> Vec<SubscriptionInfo> {
    let id = slot.session.client_id();
    let mut subs: Vec<SubscriptionInfo> = slot
        .session
        .subscriptions()
        .iter()
        .map(|(filter, s)| SubscriptionInfo {
            client_id: id.to_string(),
            filter: filter.clone(),
            qos: s.options.qos as u8,
            no_local: s.options.no_local,
            retain_as_published: s.options.retain_as_published,
            retain_handling: s.options.retain_handling,
            subscription_id: s.subscription_id,
        })
        .collect();
    subs.sort_by(|a, b| a.filter.cmp(&b.filter));
    subs
}
