//! The publish path on a shard: route replica match, local fan-out with
//! overlapping subscriptions merged, shared-subscription choice, retained
//! messages, and the mesh messages that carry all of these between shards.
//!
//! Shard-local code over [`State`]; every function runs to completion
//! without awaiting.

use std::sync::Arc;
use std::time::Instant;

use smallvec::SmallVec;

use crate::codec::QoS;
use crate::message::Message;
use crate::router::fanout::{self, Fan, FanOut, Match};
use crate::router::split_shared;
use crate::session::{Delivery, Subscription};

use super::cluster_retained::Version;
use super::durable::{Forward, Logged};
use super::gather::Gather;
use super::mesh::{AckTo, MeshMsg, Publisher, RouteKey, SharedPick};
use super::pressure::HoldChange;
use super::{SessionKey, ShardCore, State, SubEntry, SubKey};
use crate::persist::{Origin, Scope};

/// Where a routed message comes from: for acknowledgements and the log.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Source {
    /// The publishing session (its ack may wait for a retained store).
    pub(super) from: Option<SessionKey>,
    /// An inbound QoS 2 packet id the publisher's session now remembers.
    pub(super) qos2_packet_id: Option<u16>,
    /// The delayed publish being sent.
    pub(super) delayed: Option<u64>,
    /// The session whose will this is.
    pub(super) will_of: Option<SessionKey>,
    /// This shard's connection it was read from: subscribers that fall
    /// behind hold its reading (`shard::pressure`).
    pub(super) read_from: Option<Publisher>,
}

/// How far a message routed on this shard goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reach {
    /// Every subscriber in the cluster, its retained copy kept here (it was
    /// published on this node).
    Cluster,
    /// This node's subscribers only, no retained copy (another node sent
    /// it; the publisher's node keeps that, and sends it on).
    FromPeer,
    /// This node's subscribers only, its retained copy kept here (a will
    /// every node publishes for itself).
    Here,
}

/// One session's delivery of a routed message (the fan-out's target).
type Target = fanout::Target<SessionKey>;

/// Routing's decision for a message published on this shard: which shards
/// get it, and for what. Durability reads it (`durable_accept`) to tell
/// whether an Accepted record is needed; `route` then sends it.
pub(super) struct Plan {
    /// The shard that keeps its retained copy (retained messages only).
    pub(super) owner: Option<usize>,
    /// Shards with ordinary subscribers of the topic.
    pub(super) ordinary: SmallVec<[u16; 8]>,
    /// Those of them whose subscribers include persistent sessions
    /// ([`RouteKey::Kept`]).
    pub(super) kept: SmallVec<[u16; 4]>,
    /// Each matching shared subscription, with the shard chosen to serve it.
    pub(super) picks: SmallVec<[(u16, SharedPick); 1]>,
    /// Remote nodes with ordinary subscribers of the topic (none for a
    /// message from another node).
    pub(super) nodes: SmallVec<[u16; 4]>,
    /// Shared subscriptions whose turn went to a remote node, with it.
    pub(super) node_picks: SmallVec<[(u16, SharedPick); 1]>,
    /// The node picks were given to this node by another, which had no
    /// member of them ([`RemotePublish::passed_on`]).
    pub(super) passed_on: bool,
    /// How many times the node picks were served again: the nodes picked
    /// before will never get the message ([`ShardCore::remote_undeliverable`]).
    pub(super) again: u8,
    /// For the topic's ordinary subscribers (false: only the shared
    /// subscriptions planned, [`Plan::drop_ordinary`]).
    pub(super) for_ordinary: bool,
    /// Every shared subscription of the topic took a turn (false: only
    /// those another node or an earlier turn chose, [`Plan::restrict_picks`]).
    pub(super) every_pick: bool,
}

/// Who may serve a shared subscription: a shard here, or another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Server {
    Shard(u16),
    Node(u16),
}

impl Plan {
    /// The shards other than `me` whose part of the message a crash there
    /// could lose after its publisher was answered, each once: those with
    /// persistent ordinary subscribers, those serving a shared
    /// subscription (its member is chosen there) and the retained copy's
    /// owner. A shard whose subscribers of it all end with their
    /// connections (clean sessions) is not one: a crash ends them too.
    pub(super) fn kept_by(&self, me: u16) -> SmallVec<[u16; 4]> {
        let mut others: SmallVec<[u16; 4]> = SmallVec::new();
        let kept = self.kept.iter().filter(|s| self.ordinary.contains(s));
        let all = kept.copied().chain(self.picks.iter().map(|(s, _)| *s));
        for d in all.chain(self.owner.map(|o| o as u16)) {
            if d != me && !others.contains(&d) {
                others.push(d);
            }
        }
        others
    }

    /// No ordinary subscriber gets it (only the shared subscriptions
    /// planned).
    pub(super) fn drop_ordinary(&mut self) {
        self.ordinary.clear();
        self.kept.clear();
        self.for_ordinary = false;
    }

    /// Only the shared subscriptions `keep` names take a turn.
    pub(super) fn restrict_picks(&mut self, keep: impl Fn(&SharedPick) -> bool) {
        self.picks.retain(|(_, p)| keep(p));
        self.node_picks.retain(|(_, p)| keep(p));
        self.every_pick = false;
    }

    /// Whom the Accepted record of `message` says it is for: what
    /// recovery routes it to again if it is not known applied. A message
    /// served again or passed on names its picks; as "everyone" it would
    /// reach the ordinary subscribers and groups that had it (a QoS 2
    /// message delivered twice, found by the cluster simulator, seed
    /// 42371). A peer's retained message is not for this node's retained
    /// store.
    pub(super) fn scope(&self, message: &Message) -> Scope {
        // Each pick has one server: here or on another node.
        let shared = match self.every_pick {
            true => SmallVec::new(),
            false => (self.picks.iter().chain(&self.node_picks))
                .map(|(_, p)| p.clone())
                .collect(),
        };
        Scope {
            ordinary: self.for_ordinary,
            shared,
            every_pick: self.every_pick,
            retained_elsewhere: message.retain && self.for_ordinary && self.owner.is_none(),
        }
    }
}

/// Routing's decision on a shard that delivers a message: one delivery per
/// target session, and what of the message this shard applies. Durability
/// reads it (`durable_deliver`) to store what must survive a crash.
pub(super) struct Local {
    /// The sessions that get it; the first `distinct` are different
    /// sessions, a later one may repeat one (an ordinary and a shared
    /// subscription of the same session).
    pub(super) targets: fanout::Targets<SessionKey>,
    pub(super) distinct: usize,
    /// The ordinary subscribers and the shared picks served here.
    pub(super) scope: Scope,
}

impl ShardCore {
    /// Publish the broker's `$SYS` `topics` (retained, QoS 0) to this
    /// node's subscribers; their retained copies are kept in memory only
    /// (see [`crate::sys`]). Shared subscriptions (`$share/g/$SYS/...`)
    /// get none: a message that stays on its node leaves them to the
    /// peers.
    pub fn publish_sys(&self, now: Instant, topics: Vec<(String, String)>) {
        let mut st = self.state.borrow_mut();
        for (topic, payload) in topics {
            debug_assert!(crate::sys::is_sys_topic(&topic));
            let message = Message::from_broker(&topic, payload.into(), QoS::AtMostOnce, true);
            self.route(
                &mut st,
                now,
                Arc::new(message),
                Source::default(),
                Reach::Here,
            );
        }
        Self::debug_invariants(&st);
    }

    /// Route a message accepted on this shard to every shard with
    /// subscribers, and its retained copy to the topic's owner. When the
    /// owner is another shard and the publisher (`from`) waits for an ack,
    /// its output is held until the owner has stored the message, so that
    /// after PUBACK any new subscription on the node sees it. Durability
    /// sees the plan first (it may log the message as Accepted); a plain
    /// QoS 0 publish does not reach it at all. False when the log could
    /// not take the message (it is full): it is not routed, and the
    /// publisher is refused.
    ///
    /// With `Reach::Here` (a will every node publishes for itself) it goes
    /// to this node's subscribers only, its retained copy kept here, and
    /// shared subscriptions are left to the peers, which publish it too.
    pub(super) fn route(
        &self,
        st: &mut State,
        now: Instant,
        message: Arc<Message>,
        source: Source,
        reach: Reach,
    ) -> bool {
        let mut plan = self.plan(st, &message, reach);
        if reach == Reach::Here {
            plan.restrict_picks(|_| false);
        }
        self.route_planned(st, now, message, source, plan)
    }

    /// `route` with the plan made (or narrowed, for a message from
    /// another node).
    pub(super) fn route_planned(
        &self,
        st: &mut State,
        now: Instant,
        message: Arc<Message>,
        source: Source,
        plan: Plan,
    ) -> bool {
        let durable = message.qos != QoS::AtMostOnce
            || message.retain
            || source.will_of.is_some()
            || source.delayed.is_some();
        let logged = if durable {
            match self.durable_accept(st, now, &message, source, &plan) {
                Ok(logged) => logged,
                // A will goes out even when the log cannot take it (nobody
                // waits for its acknowledgement); its session forgets it.
                Err(_) if source.will_of.is_some() => {
                    Self::durable_will_done(st, source.will_of);
                    Logged::default()
                }
                Err(_) => return false,
            }
        } else {
            Logged::default()
        };
        let Logged { origin, stamp_ms } = logged;
        st.stats.routed += 1;
        let matched = !plan.ordinary.is_empty()
            || !plan.picks.is_empty()
            || !plan.nodes.is_empty()
            || !plan.node_picks.is_empty();
        if !matched && !message.retain {
            st.stats.no_subscribers += 1;
        }
        if let Some(owner) = plan.owner {
            if owner == self.id {
                self.store_retained(st, now, message.clone(), origin, stamp_ms, Version::Local);
            } else {
                let ack_to = source
                    .from
                    .filter(|_| message.qos != QoS::AtMostOnce)
                    .and_then(|key| self.hold_output(st, key, 1));
                let retain = MeshMsg::Retain {
                    message: message.clone(),
                    ack_to,
                    origin,
                    stamp_ms,
                    from_peer: None,
                };
                self.send_routed(st, owner, retain, origin);
            }
        }
        for dest in 0..self.shards as u16 {
            let to_ordinary = plan.ordinary.contains(&dest);
            let to_shared: SmallVec<[SharedPick; 1]> = plan
                .picks
                .iter()
                .filter(|(s, _)| *s == dest)
                .map(|(_, p)| p.clone())
                .collect();
            if !to_ordinary && to_shared.is_empty() {
                continue;
            }
            if usize::from(dest) == self.id {
                let hop = Hop {
                    hops: 0,
                    origin,
                    routed_at: now,
                    from: source.read_from.map(|p| (self.id, p)),
                };
                self.deliver_local(st, now, &message, to_ordinary, &to_shared, hop);
            } else {
                let publish = MeshMsg::Publish {
                    message: message.clone(),
                    ordinary: to_ordinary,
                    shared: to_shared,
                    hops: 0,
                    origin,
                    routed_at: now,
                    from: source.read_from,
                };
                self.send_routed(st, usize::from(dest), publish, origin);
            }
        }
        if !plan.nodes.is_empty() || !plan.node_picks.is_empty() {
            self.to_nodes(st, &message, &plan, source.from);
        }
        if let Some(id) = source.delayed {
            Self::durable_delay_done(st, id, origin.is_some());
        }
        true
    }

    /// Where `message` goes: its retained copy's owner, the shards with
    /// ordinary subscribers of its topic, and for each shared subscription
    /// matching it the shard chosen (round-robin) to serve it; and the
    /// remote nodes with subscribers, as far as `reach` goes.
    pub(super) fn plan(&self, st: &mut State, message: &Message, reach: Reach) -> Plan {
        self.plan_without(st, message, reach, |_| false)
    }

    /// [`ShardCore::plan`], with the remote nodes `without` names (by
    /// index) taking no turn at serving a shared subscription (they will
    /// never get the message).
    pub(super) fn plan_without(
        &self,
        st: &mut State,
        message: &Message,
        reach: Reach,
        without: impl Fn(u16) -> bool,
    ) -> Plan {
        let topic = &*message.topic;
        let owner = (message.retain && reach != Reach::FromPeer).then(|| self.topic_owner(topic));
        let remote = reach != Reach::Cluster;
        let mut ordinary: SmallVec<[u16; 8]> = SmallVec::new();
        let mut kept: SmallVec<[u16; 4]> = SmallVec::new();
        let mut nodes: SmallVec<[u16; 4]> = SmallVec::new();
        let mut shared: SmallVec<[(SharedPick, SmallVec<[Server; 4]>); 1]> = SmallVec::new();
        let mut serve =
            |pick: &SharedPick, by: Server| match shared.iter_mut().find(|(p, _)| p == pick) {
                Some((_, servers)) => servers.push(by),
                None => shared.push((pick.clone(), SmallVec::from_slice(&[by]))),
            };
        st.routes.for_each_match(topic, |key, _| match key {
            RouteKey::Shard(s) => {
                if !ordinary.contains(s) {
                    ordinary.push(*s);
                }
            }
            RouteKey::Kept(s) => {
                if !kept.contains(s) {
                    kept.push(*s);
                }
            }
            RouteKey::Shared { pick, shard } => serve(pick, Server::Shard(*shard)),
            RouteKey::Node(n) => {
                if !remote && !nodes.contains(n) {
                    nodes.push(*n);
                }
            }
            RouteKey::NodeShared { pick, node } => {
                if !remote && !without(*node) {
                    serve(pick, Server::Node(*node));
                }
            }
        });
        // One turn per message over every shard and node with members:
        // each message to exactly one member in the cluster.
        let mut picks: SmallVec<[(u16, SharedPick); 1]> = SmallVec::new();
        let mut node_picks: SmallVec<[(u16, SharedPick); 1]> = SmallVec::new();
        for (pick, mut servers) in shared {
            servers.sort_unstable();
            let next = st.shared_shard_next.entry(pick.clone()).or_insert(0);
            *next = next.wrapping_add(1);
            match servers[*next % servers.len()] {
                Server::Shard(s) => picks.push((s, pick)),
                Server::Node(n) => node_picks.push((n, pick)),
            }
        }
        Plan {
            owner,
            ordinary,
            kept,
            picks,
            nodes,
            node_picks,
            passed_on: false,
            again: 0,
            for_ordinary: true,
            every_pick: true,
        }
    }

    /// Deliver to this shard's sessions: every ordinary subscriber (one copy
    /// per session, at the highest granted QoS, with every matching
    /// subscription identifier) and one member of each shared subscription
    /// in `shared`.
    #[allow(clippy::too_many_arguments)]
    fn deliver_local(
        &self,
        st: &mut State,
        now: Instant,
        message: &Arc<Message>,
        ordinary: bool,
        shared: &[SharedPick],
        hop: Hop,
    ) {
        let Hop {
            hops,
            origin,
            routed_at,
            from,
        } = hop;
        let waited = now.saturating_duration_since(routed_at);
        super::latency::record(&mut self.latency.borrow_mut().delivery, waited);
        let sessions = &st.sessions;
        let publisher = message.publisher.as_deref();
        let is_publisher = |key: SessionKey| {
            publisher.is_some() && sessions.get(key).map(|s| &**s.session.client_id()) == publisher
        };
        let mut fan = Fan::new(message, ordinary, |p| shared.contains(p), is_publisher);
        // With an ACL file, a subscriber that may not read the topic is no
        // target (nor a shared group's member).
        let acl = self.auth.borrow().has_acl();
        let may_read = |key: SessionKey| {
            !acl || sessions
                .get(key)
                .is_none_or(|s| s.session.may_read(&message.topic))
        };
        st.subscribers.for_each_match(&message.topic, |key, entry| {
            if !may_read(key.session) {
                return;
            }
            fan.add(Match {
                session: key.session,
                group: key.group.as_ref(),
                filter: &entry.filter,
                options: &entry.subscription.options,
                subscription_id: entry.subscription.subscription_id,
            });
        });
        let FanOut {
            ordinary: mut merged,
            shared: mut groups,
        } = fan.finish();
        let distinct = merged.len();
        // The picks served here. One passed on is not: its forward's own
        // Accepted record answers for it, and that may wait for room; a
        // proof of it here (a marker, or this shard's Message records)
        // would let recovery skip a pick that a crash left unserved
        // (found by the simulator: a full disk, then a death).
        let mut served: SmallVec<[SharedPick; 1]> = SmallVec::new();
        for pick in shared {
            let members = groups.iter_mut().find(|(p, _)| p == pick).map(|(_, m)| m);
            match members.and_then(|m| self.choose_member(st, message, pick, hops, m)) {
                Some(t) => {
                    merged.push(t);
                    served.push(pick.clone());
                }
                None => self.forward_shared(st, now, message, pick, hops, origin),
            }
        }
        let local = Local {
            targets: merged,
            distinct,
            scope: Scope {
                ordinary,
                shared: served,
                ..Scope::default()
            },
        };
        self.deliver_targets(st, now, message, local, origin, from);
    }

    /// Hand `message` to each target session. Durability sees the targets
    /// first, unless there is nothing it could keep (QoS 0, no origin): it
    /// stores deliveries to persistent sessions, holds back those whose
    /// records wait for room, and answers the origin. A target that falls
    /// behind holds the connection `from` (`shard::pressure`).
    fn deliver_targets(
        &self,
        st: &mut State,
        now: Instant,
        message: &Arc<Message>,
        local: Local,
        origin: Option<Origin>,
        from: Option<(usize, Publisher)>,
    ) {
        let mut keys: SmallVec<[SessionKey; 8]> = SmallVec::new();
        if origin.is_none() && message.qos == QoS::AtMostOnce {
            // Straight from the targets: no list of deliveries to build
            // and copy (a few hundred bytes moved per message otherwise).
            for target in local.targets {
                let (key, delivery) = unstored(target);
                if Self::hand_over(st, key, now, message, delivery) {
                    keys.push(key);
                }
            }
        } else {
            for (key, delivery) in self.durable_deliver(st, message, origin, local) {
                if Self::hand_over(st, key, now, message, delivery) {
                    keys.push(key);
                }
            }
        }
        for key in keys {
            if let Some(from) = from {
                self.press(st, key, from, now);
            }
            Self::after_step(st, key, now);
        }
    }

    /// Give session `key` (if it is still there) `delivery` of `message`;
    /// false when it is gone. The caller runs `after_step` for it.
    pub(super) fn hand_over(
        st: &mut State,
        key: SessionKey,
        now: Instant,
        message: &Arc<Message>,
        delivery: Delivery,
    ) -> bool {
        let Some(slot) = st.sessions.get_mut(key) else {
            return false;
        };
        slot.session.deliver(now, message, delivery);
        st.stats.delivered += 1;
        true
    }

    /// Other shards with members of a shared subscription for this topic,
    /// in ring order starting after this shard.
    fn shared_ring(&self, st: &State, topic: &str, pick: &SharedPick) -> SmallVec<[u16; 4]> {
        let mut shards: SmallVec<[u16; 4]> = SmallVec::new();
        st.routes.for_each_match(topic, |key, _| {
            if let RouteKey::Shared { pick: p, shard } = key {
                if p == pick && usize::from(*shard) != self.id && !shards.contains(shard) {
                    shards.push(*shard);
                }
            }
        });
        let me = self.id as u16;
        let n = self.shards as u16;
        shards.sort_unstable_by_key(|&s| (s + n - me) % n);
        shards
    }

    /// Pass a shared-subscription message on to the next shard in ring
    /// order that has members: this shard has no member left (one left
    /// while the message was on its way) or none connected. `hops` counts
    /// the shards already visited, so every shard is tried at most once.
    ///
    /// A durable message (QoS 1/2 with a log) is logged again here as
    /// Accepted for the one shared subscription: this shard answers for it
    /// from now on. When that record cannot be written (the log is full),
    /// the forward waits for room and the origin's answer, if any, with it.
    fn forward_shared(
        &self,
        st: &mut State,
        now: Instant,
        message: &Arc<Message>,
        pick: &SharedPick,
        hops: u8,
        origin: Option<Origin>,
    ) {
        let ring = self.shared_ring(st, &message.topic, pick);
        let Some(&to) = ring.first().filter(|_| usize::from(hops) + 1 < self.shards) else {
            shard_log!(
                self,
                log::Level::Debug,
                "shared subscription {}/{} has no member for {}",
                crate::text::quote(&pick.group),
                crate::text::quote(&pick.filter),
                crate::text::quote(&message.topic)
            );
            return;
        };
        if origin.is_none() && message.qos == QoS::AtMostOnce {
            let forward = shared_forward(message, pick, hops + 1, None, now);
            return self.mesh.send(usize::from(to), forward);
        }
        let forward = Forward {
            message: message.clone(),
            pick: pick.clone(),
            hops: hops + 1,
            to,
            parent: origin,
        };
        self.durable_forward(st, now, forward);
    }

    /// Round-robin over the local members of one shared subscription,
    /// connected ones only. With none connected here, another shard with
    /// members gets its chance first (None: forward); an offline member
    /// (whose queue takes the message) is chosen only when no shard has a
    /// connected one.
    fn choose_member(
        &self,
        st: &mut State,
        message: &Arc<Message>,
        pick: &SharedPick,
        hops: u8,
        members: &mut SmallVec<[Target; 2]>,
    ) -> Option<Target> {
        let sessions = &st.sessions;
        let connected =
            |key: &SessionKey| sessions.get(*key).is_some_and(|s| s.session.is_connected());
        if !members.iter().any(|t| connected(&t.session)) {
            let others = self.shared_ring(st, &message.topic, pick).len();
            if usize::from(hops) < others && usize::from(hops) + 1 < self.shards {
                return None;
            }
        }
        let next = st.shared_member_next.entry(pick.clone()).or_insert(0);
        let i = fanout::choose_member(members, next, connected)?;
        Some(members.swap_remove(i))
    }

    /// Apply a subscription to the subscriber trie and the route replica,
    /// then gather retained messages as its Retain Handling says.
    pub(super) fn subscribe(
        &self,
        st: &mut State,
        key: SessionKey,
        filter: &str,
        subscription: Subscription,
        is_new: bool,
    ) {
        let (group, inner) =
            self.add_subscriber(st, key, filter, subscription.clone(), Hold::Output);
        let handling = subscription.options.retain_handling;
        if group.is_none() && (handling == 0 || (handling == 1 && is_new)) {
            self.gather_retained(st, key, &inner, &subscription);
        }
    }

    /// Route a subscription session `key` brought from another node
    /// (`moves`): no retained messages are gathered (the session is not
    /// new), and the acknowledgements go to the move, not the output.
    pub(super) fn route_moved(
        &self,
        st: &mut State,
        key: SessionKey,
        filter: &str,
        subscription: Subscription,
    ) {
        self.add_subscriber(st, key, filter, subscription, Hold::Move);
    }

    /// Put session `key`'s subscription into the subscriber trie and, if
    /// the session had none to that filter, count its route (`hold`: what
    /// waits for the acknowledgements). Returns its share name and the
    /// filter inside.
    fn add_subscriber(
        &self,
        st: &mut State,
        key: SessionKey,
        filter: &str,
        subscription: Subscription,
        hold: Hold,
    ) -> (Option<Arc<str>>, Arc<str>) {
        let (group, inner, added) = Self::insert_subscriber(st, key, filter, subscription);
        if added {
            for route in self.route_keys(st, key, group.clone(), inner.clone()) {
                self.route_count(st, inner.clone(), route, true, key, hold);
            }
        }
        (group, inner)
    }

    /// Session `key` became persistent with subscriptions (its first
    /// write to the log, at an earlier connect, found the log full): mark
    /// its ordinary subscriptions' routes, its output (the CONNACK)
    /// waiting until every shard has the marks, so that what is
    /// acknowledged after it is logged for it.
    pub(super) fn keep_routes(&self, st: &mut State, key: SessionKey) {
        let Some(slot) = st.sessions.get(key) else {
            return;
        };
        let routed = |f: &&String| {
            let mut entries = st.subscribers.entries(f);
            entries.any(|(k, _)| k.session == key && k.group.is_none())
        };
        let filters: Vec<Arc<str>> = (slot.session.subscriptions().keys())
            .filter(routed)
            .map(|f| Arc::from(f.as_str()))
            .collect();
        let mark = RouteKey::Kept(self.id as u16);
        for filter in filters {
            self.route_count(st, filter, mark.clone(), true, key, Hold::Output);
        }
    }

    /// Put session `key`'s subscription to `filter` into the subscriber
    /// trie. Returns its share name, the filter inside, and whether the
    /// session had no subscription to it before.
    pub(super) fn insert_subscriber(
        st: &mut State,
        key: SessionKey,
        filter: &str,
        subscription: Subscription,
    ) -> (Option<Arc<str>>, Arc<str>, bool) {
        let (group, inner) = split_shared(filter);
        let inner: Arc<str> = Arc::from(inner);
        let sub_key = SubKey {
            session: key,
            group: group.clone(),
        };
        let entry = SubEntry {
            subscription,
            filter: inner.clone(),
        };
        let (previous, _) = st.subscribers.insert(&inner, sub_key, entry);
        (group, inner, previous.is_none())
    }

    /// Remove a subscription from the subscriber trie and the route replica.
    pub(super) fn unsubscribe(&self, st: &mut State, key: SessionKey, filter: &str) {
        let (group, inner) = split_shared(filter);
        let sub_key = SubKey {
            session: key,
            group: group.clone(),
        };
        if st.subscribers.remove(inner, &sub_key).0.is_some() {
            let inner: Arc<str> = Arc::from(inner);
            // The mark goes first: no shard sees it without the route.
            for route in self
                .route_keys(st, key, group, inner.clone())
                .into_iter()
                .rev()
            {
                self.route_count(st, inner.clone(), route, false, key, Hold::Output);
            }
        }
    }

    /// The route replica keys session `key`'s subscription counts in.
    fn route_keys(
        &self,
        st: &State,
        key: SessionKey,
        group: Option<Arc<str>>,
        filter: Arc<str>,
    ) -> SmallVec<[RouteKey; 2]> {
        let persistent = Self::durable_sid(st, key).is_some();
        route_keys_of(self.id, group, filter, persistent)
    }

    /// Count local subscriptions per route key; broadcast on 0↔1. A new
    /// subscriber's output (its SUBACK) waits until every other shard has
    /// the route, so a publish that follows the SUBACK anywhere on the node
    /// reaches the new subscription (`hold`: or the session's move here):
    /// when this shard had the route already, it is sent again to wait on,
    /// as the change that added it may still be on its way. Other nodes
    /// learn of routes but the persistent-subscriber marks, which are this
    /// node's own.
    fn route_count(
        &self,
        st: &mut State,
        filter: Arc<str>,
        key: RouteKey,
        add: bool,
        subscriber: SessionKey,
        hold: Hold,
    ) {
        let entry = st
            .local_routes
            .entry((filter.clone(), key.clone()))
            .or_insert(0);
        let transition = if add {
            *entry += 1;
            *entry == 1
        } else {
            *entry -= 1;
            *entry == 0
        };
        let local = key.is_node_local();
        if !transition && !add {
            return;
        }
        if !add {
            st.local_routes.remove(&(filter.clone(), key.clone()));
            // This shard's last member of a shared subscription left.
            if let RouteKey::Shared { pick, .. } = &key {
                st.shared_member_next.remove(pick);
            }
        }
        if transition {
            Self::apply_route(st, &filter, key.clone(), add);
        }
        // On shard 0 of a cluster node, the other nodes must have the
        // route too: one more acknowledgement, from the bridge (a
        // subscriber's SUBACK waits for every peer with a link up, a move
        // for every peer up; other shards send their routes' waits there).
        let remote = add && !local && st.remote.as_ref().is_some_and(|r| r.export.is_some());
        let count = self.shards as u32 - 1 + u32::from(remote);
        let ack_to = match (add, hold) {
            (false, _) => None,
            (true, Hold::Output) => self.hold_output(st, subscriber, count),
            (true, Hold::Move) => self.hold_move(st, subscriber, count),
        };
        if let Some(ack) = ack_to.filter(|_| remote) {
            if !Self::ack_when_peers_have(st, ack) {
                Self::acked(st, ack);
            }
        }
        if transition || ack_to.is_some() {
            self.mesh.broadcast(|| MeshMsg::Route {
                filter: filter.clone(),
                key: key.clone(),
                add,
                ack_to,
            });
        }
    }

    /// Hold a connected session's output until `count` acknowledgements
    /// arrive; the `AckTo` to send along. None when there is nothing to
    /// hold. The hold stays with the session, not the connection: one that
    /// resumes the session waits for it too.
    pub(super) fn hold_output(&self, st: &mut State, key: SessionKey, count: u32) -> Option<AckTo> {
        let slot = st.sessions.get_mut(key)?;
        if slot.conn.is_none() || count == 0 {
            return None;
        }
        slot.held_acks += count;
        Some(AckTo {
            shard: self.id,
            session: key,
            uid: slot.uid,
            move_in: 0,
        })
    }

    /// The session `ack` waits for, if it is still that one.
    pub(super) fn acked_slot<'a>(
        st: &'a mut State,
        ack: &AckTo,
    ) -> Option<&'a mut super::SessionSlot> {
        st.sessions
            .get_mut(ack.session)
            .filter(|s| s.uid == ack.uid)
    }

    /// Send `ack` to its shard, or take it here when it is this shard's.
    pub(super) fn ack(&self, st: &mut State, ack: AckTo) {
        if ack.shard == self.id {
            Self::acked(st, ack);
        } else {
            self.mesh.send(ack.shard, MeshMsg::Ack(ack));
        }
    }

    /// Another shard applied a route delta or stored a retained message
    /// this session waits for.
    fn acked(st: &mut State, ack: AckTo) {
        if ack.move_in != 0 {
            Self::move_route_acked(st, ack);
            return;
        }
        let Some(slot) = Self::acked_slot(st, &ack) else {
            return;
        };
        if slot.held_acks > 0 {
            slot.held_acks -= 1;
            if let Some(conn) = slot.conn.as_ref().filter(|_| slot.held_acks == 0) {
                conn.wake.notify();
            }
        }
    }

    /// Apply a route delta to the replica (an add it has already changes
    /// nothing: `route_count` sends one again for a subscriber to wait
    /// on). When the last shard with members of a shared subscription
    /// leaves, its round-robin position goes too: nothing is kept for a
    /// group that no longer exists.
    pub(super) fn apply_route(st: &mut State, filter: &str, key: RouteKey, add: bool) {
        if add {
            if st.routes.insert(filter, key.clone(), ()).0.is_none() {
                Self::export_route(st, filter, &key, add);
            }
            return;
        }
        if st.routes.remove(filter, &key).0.is_some() {
            Self::export_route(st, filter, &key, add);
        }
        if let RouteKey::Shared { pick, .. } | RouteKey::NodeShared { pick, .. } = &key {
            let same_pick = |k: &RouteKey| {
                matches!(k, RouteKey::Shared { pick: p, .. } | RouteKey::NodeShared { pick: p, .. }
                    if p == pick)
            };
            if !st.routes.entries(filter).any(|(k, _)| same_pick(k)) {
                st.shared_shard_next.remove(pick);
            }
        }
    }

    /// The shard that owns a retained topic.
    pub(super) fn topic_owner(&self, topic: &str) -> usize {
        super::home_shard(topic, self.shards)
    }

    /// Store, replace or (empty payload) delete a retained message. In a
    /// cluster the version is stamped (made here) or weighed against this
    /// shard's (from a peer) first; see `cluster_retained`.
    pub(super) fn store_retained(
        &self,
        st: &mut State,
        now: Instant,
        message: Arc<Message>,
        origin: Option<Origin>,
        stamp_ms: u64,
        version: Version,
    ) {
        let Some(stamp_ms) = Self::retained_version(st, now, &message, stamp_ms, &version) else {
            return;
        };
        if message.payload.is_empty() {
            Self::remove_retained(st, &message.topic);
            Self::durable_retain(st, &message, origin, stamp_ms);
            Self::retained_kept(st, &message, stamp_ms, version.source());
            return;
        }
        if let Some(why) = self.retained_refusal(st, &message) {
            st.stats.retained_dropped += 1;
            shard_log!(
                self,
                log::Level::Warn,
                "shard {}: not retaining {} ({} bytes): {why}",
                self.id,
                crate::text::quote(&message.topic),
                message.cost_bytes()
            );
            return;
        }
        let topic = message.topic.clone();
        Self::durable_retain(st, &message, origin, stamp_ms);
        Self::retained_kept(st, &message, stamp_ms, version.source());
        Self::insert_retained(st, &topic, message, stamp_ms);
    }

    /// Why `message` cannot be retained here, if it cannot: too large for
    /// one retained message, or the shard's share of the store is full
    /// (a replacement counts the bytes it frees).
    fn retained_refusal(&self, st: &State, message: &Message) -> Option<String> {
        if crate::sys::is_sys_topic(&message.topic) {
            // The broker's few dozen topics: never refused, since they are
            // not published again until they change (they do take a few
            // dozen of the store's places).
            return None;
        }
        let cost = message.cost_bytes();
        let per_message = self.config.mqtt.retained_message_bytes_max;
        if cost > per_message {
            return Some(format!(
                "larger than mqtt.retained_message_bytes_max ({per_message})"
            ));
        }
        let old = st
            .retained
            .get(&message.topic)
            .map(|k| k.message.cost_bytes());
        if old.is_none() && st.retained.len() >= self.retained_max {
            return Some(format!(
                "the shard's share of mqtt.retained_messages_max ({}) is in use",
                self.retained_max
            ));
        }
        let after = st.retained_bytes - old.unwrap_or(0) as u64 + cost as u64;
        if after > self.retained_bytes_max {
            return Some(format!(
                "the shard's share of mqtt.retained_bytes_max ({}) is in use",
                self.retained_bytes_max
            ));
        }
        None
    }

    /// Keep `message` as the retained message of `topic`, counting bytes.
    pub(super) fn insert_retained(st: &mut State, topic: &str, message: Arc<Message>, stamp: u64) {
        st.retained_bytes += message.cost_bytes() as u64;
        if let Some(old) = st.retained.insert(topic, super::Kept { message, stamp }) {
            st.retained_bytes -= old.message.cost_bytes() as u64;
        }
    }

    /// Drop the retained message of `topic`, counting bytes.
    pub(super) fn remove_retained(st: &mut State, topic: &str) {
        if let Some(old) = st.retained.remove(topic) {
            st.retained_bytes -= old.message.cost_bytes() as u64;
        }
    }

    /// Handle one batch from shard `from`; returns the connections moved
    /// here, for the runtime to serve.
    pub fn handle_mesh(
        &self,
        batch: super::mesh::Batch,
        from: usize,
        now: Instant,
    ) -> Vec<super::mesh::Handoff> {
        let mut handoffs = Vec::new();
        let mut st = self.state.borrow_mut();
        for msg in batch {
            match msg {
                MeshMsg::Publish {
                    message,
                    ordinary,
                    shared,
                    hops,
                    origin,
                    routed_at,
                    from: read_from,
                } => {
                    let hop = Hop {
                        hops,
                        origin,
                        routed_at,
                        from: read_from.map(|p| (from, p)),
                    };
                    self.deliver_local(&mut st, now, &message, ordinary, &shared, hop)
                }
                MeshMsg::Retain {
                    message,
                    ack_to,
                    origin,
                    stamp_ms,
                    from_peer,
                } => {
                    let version = match from_peer {
                        Some(from) => Version::Peer {
                            stamp: stamp_ms,
                            from,
                        },
                        None => Version::Local,
                    };
                    self.store_retained(&mut st, now, message, origin, stamp_ms, version);
                    Self::applied(&mut st, origin);
                    if let Some(ack) = ack_to {
                        self.mesh.send(ack.shard, MeshMsg::Ack(ack));
                    }
                }
                MeshMsg::PeerClaim(c) => self.claimed_elsewhere(&mut st, now, &c),
                MeshMsg::ClaimAck(a) => self.claim_acked(&mut st, now, &a),
                MeshMsg::MoveFence { id, home } => Self::move_fence_asked(&mut st, id, home),
                MeshMsg::MoveFencePassed { id } => self.move_fence_part(&mut st, now, id),
                MeshMsg::SessionMove { from, frame } => {
                    self.session_frame(&mut st, now, from, *frame)
                }
                MeshMsg::Adopt {
                    peer,
                    node,
                    run,
                    sessions,
                    orphan,
                } => self.adopt_here(&mut st, now, peer, (node, run), sessions, orphan),
                MeshMsg::Orphaned(part) => self.orphan_at_zero(&mut st, now, *part),
                MeshMsg::ForAdopted(p) => self.held_for_adopted(&mut st, *p),
                MeshMsg::AdoptDone { of } => self.adopt_done(&mut st, now, of),
                MeshMsg::Adopted { of } => self.adoption_over(&mut st, &of),
                MeshMsg::AdoptionNoted { of } => self.note_adoption_over(&of.0, of.1),
                MeshMsg::AdoptedPublish { of, message } => {
                    self.deliver_adopted(&mut st, now, &of, &message)
                }
                MeshMsg::Applied { upto } => Self::on_applied(&mut st, from, upto),
                MeshMsg::Settled { upto } => Self::on_settled(&mut st, from, upto),
                MeshMsg::StoreFull { full } => self.on_store_full(&mut st, from, full),
                MeshMsg::RetainedQuery {
                    waiter,
                    walk,
                    credit,
                } => Self::on_retained_query(&mut st, waiter, walk, credit),
                MeshMsg::RetainedReply {
                    waiter,
                    messages,
                    credit,
                    rest,
                } => {
                    let rest = rest.map(|walk| Gather {
                        owner: from,
                        waiter: waiter.clone(),
                        walk,
                    });
                    Self::deliver_retained(&mut st, now, &waiter, &messages, credit, rest)
                }
                MeshMsg::Route {
                    filter,
                    key,
                    add,
                    ack_to,
                } => {
                    let local = key.is_node_local();
                    Self::apply_route(&mut st, &filter, key, add);
                    if let Some(ack) = ack_to {
                        // Shard 0 of a cluster node answers once the
                        // other nodes have the route too (a mark of
                        // persistent subscribers is not theirs).
                        if !(add && !local && Self::ack_when_peers_have(&mut st, ack)) {
                            self.mesh.send(ack.shard, MeshMsg::Ack(ack));
                        }
                    }
                }
                MeshMsg::Ack(ack) => Self::acked(&mut st, ack),
                MeshMsg::Fence { id } => self.mesh.send(from, MeshMsg::FenceDone { id }),
                MeshMsg::FenceDone { id } => Self::fence_done(&mut st, id),
                MeshMsg::RoutesKnown { node, run } => {
                    self.note_routes_known(node, run);
                }
                MeshMsg::Hold { to, hold } => {
                    let hold = match hold {
                        true => HoldChange::Hold {
                            now,
                            limit: self.publisher_hold(),
                        },
                        false => HoldChange::Release,
                    };
                    Self::hold_connection(&st, to, hold)
                }
                MeshMsg::Handoff(h) => handoffs.push(*h),
            }
        }
        self.send_applied(&mut st);
        Self::debug_invariants(&st);
        handoffs
    }
}

/// A delivery of nothing the log keeps (QoS 0, or no log).
pub(super) fn unstored(t: Target) -> (SessionKey, Delivery) {
    let delivery = Delivery {
        qos: t.qos,
        retain: t.retain,
        subscription_ids: t.subscription_ids,
        stored: None,
    };
    (t.session, delivery)
}

/// A message passed on for one shared subscription only.
pub(super) fn shared_forward(
    message: &Arc<Message>,
    pick: &SharedPick,
    hops: u8,
    origin: Option<Origin>,
    now: Instant,
) -> MeshMsg {
    MeshMsg::Publish {
        message: message.clone(),
        ordinary: false,
        shared: SmallVec::from_buf([pick.clone()]),
        hops,
        origin,
        routed_at: now,
        from: None,
    }
}

/// How a message came to a shard's `deliver_local`: shared-pick hops so
/// far, where it was logged, and when it was routed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Hop {
    pub(super) hops: u8,
    pub(super) origin: Option<Origin>,
    pub(super) routed_at: Instant,
    /// The connection it was read from, and its shard
    /// (`shard::pressure`).
    pub(super) from: Option<(usize, Publisher)>,
}

/// The route replica keys a subscription on shard `shard` counts in: its
/// route, and for an ordinary subscription of a persistent session the
/// shard's mark ([`RouteKey::Kept`]), in that order.
pub(super) fn route_keys_of(
    shard: usize,
    group: Option<Arc<str>>,
    filter: Arc<str>,
    persistent: bool,
) -> SmallVec<[RouteKey; 2]> {
    let shard = shard as u16;
    let marked = persistent && group.is_none();
    let route = match group {
        None => RouteKey::Shard(shard),
        Some(group) => RouteKey::Shared {
            pick: SharedPick { group, filter },
            shard,
        },
    };
    let mut keys = SmallVec::new();
    keys.push(route);
    if marked {
        keys.push(RouteKey::Kept(shard));
    }
    keys
}

/// What a new route's acknowledgements release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// The subscriber's output (its SUBACK).
    Output,
    /// The Take of a session moving here (`moves`).
    Move,
}
