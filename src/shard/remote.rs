//! The shard's side of the cluster: messages for other nodes, messages
//! from them, and the routes they have.
//!
//! Shard-local, no I/O. Remote nodes are route replica entries
//! ([`RouteKey::Node`]) like local shards: routing a message published on
//! this node puts one copy per remote node with matching subscribers in
//! this shard's bridge outbox ([`ShardCore::poll_bridge`]), which the
//! runtime writes to this shard's link to that node; the receiving node
//! fans it out to its own subscribers only ([`ShardCore::handle_remote_publish`]),
//! never on to a third node but for a shared subscription's pick it has no
//! member of (passed on once). A publisher's acknowledgement waits until
//! every node the message went to confirmed it (or will never get it: then
//! its shared picks are served again, [`ShardCore::remote_undeliverable`]).
//! Shard 0 also keeps the node's route export:
//! each change of the node as a whole goes out as [`BridgeOut::Route`], and
//! the routes a peer reports arrive through [`ShardCore::remote_routes`]
//! and are broadcast to every shard's replica.

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use smallvec::SmallVec;

use crate::cluster::frame::{ClaimEntry, Frame, RemotePublish, RetainedEntry, RouteChange};
use crate::cluster::routes::{RouteExport, RouteFeed};
use crate::codec::QoS;
use crate::message::Message;
use crate::persist::WallClock;

use super::mesh::SharedPick;
use super::mesh::{AckTo, MeshMsg, RouteKey};
use super::notify::Notify;
use super::routing::{Plan, Reach, Source};
use super::{SessionKey, ShardCore, State};

/// How many times a message's shared subscriptions are served again when
/// the nodes picked will never get it (down, their run ended, or the link's
/// bound reached): then it is dropped (counted).
pub const SERVED_AGAIN_MAX: u8 = 4;

/// What a shard has for the bridge.
#[derive(Debug, Clone)]
pub enum BridgeOut {
    /// A message for remote node `node` (its index).
    Publish {
        /// The node's index (see `ShardCore::remote_routes`).
        node: u16,
        /// The message, and for whom on that node.
        publish: RemotePublish,
        /// The publisher whose acknowledgement (PUBACK, PUBREC) waits
        /// until that node has the message: give it to
        /// [`ShardCore::remote_confirmed`] once the node confirms it, or
        /// once it will never be sent there (dropped, counted).
        ack: Option<AckTo>,
        /// How many times the shared subscriptions it serves were served
        /// again (the nodes picked before will never get it): at most
        /// [`SERVED_AGAIN_MAX`], then it is dropped.
        again: u8,
        /// What it counts against `cluster.link_queue_bytes_max`
        /// ([`link_bytes`]), worked out once when it was routed.
        bytes: usize,
    },
    /// Shard 0: the node's routes changed as a whole; tell every peer.
    Route {
        /// The change's sequence number.
        seq: u64,
        /// The change.
        change: RouteChange,
    },
    /// Shard 0: every shard of this node applied remote node `node`'s
    /// routes up to `to.seq`, as they came on link `to.link`: acknowledge
    /// them to it on that link (an answer for a link that is no longer the
    /// node's route link is dropped: the routes it brought were replaced).
    RouteAck {
        /// The node's index.
        node: u16,
        /// The link and the route sequence number.
        to: RouteAckTo,
    },
    /// A client of this shard has a new will or none
    /// ([`Frame::WillSet`], [`Frame::WillClear`]): for every link up.
    Will(Frame),
    /// A retained store or delete made on this node, stamped by its owner
    /// shard: for every link up.
    Retained {
        /// The version.
        entry: RetainedEntry,
        /// The peer it came from (not told again).
        except: Option<u16>,
    },
    /// A connection attached here: its claim of its client id, for every
    /// link up; the runtime says to how many ([`ShardCore::claim_sent`]).
    Claim(ClaimEntry),
    /// Ask every peer with a link up to answer behind what it sent
    /// ([`Frame::MoveFence`]); tell [`ShardCore::move_fence_passed`]
    /// once all have (or their links closed).
    MoveFence {
        /// The fence.
        id: u64,
        /// The shard that waits for it.
        home: usize,
    },
    /// This node, next after a peer's run declared down, is done with
    /// that run's sessions: every peer with a link up is told
    /// ([`Frame::Adopted`]).
    Adopted {
        /// The run (the node's name and incarnation).
        of: (Arc<str>, u64),
    },
    /// Peer `node` asked to be answered behind what this shard sent it
    /// ([`Frame::MoveFenceDone`]): the answer goes through the outbox, so
    /// every message this shard routed before the question is ahead of it.
    MoveFenceDone {
        /// The peer (its index).
        node: u16,
        /// Its fence.
        id: u64,
    },
    /// A frame for peer `node` (its index) alone: a session moving
    /// between the two nodes (`moves`).
    Peer {
        /// The node's index.
        node: u16,
        /// The frame.
        frame: Frame,
    },
    /// Peer `node` (its index) claimed a client id here and this node has
    /// applied it: acknowledge it to that node.
    ClaimAck {
        /// The node's index.
        node: u16,
        /// The claim.
        claim: ClaimEntry,
    },
}

/// A cluster node's shard in a metrics scrape: its core's counters and
/// its bridge's (the runtime fills those in).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterReport {
    /// The core's cluster counters.
    pub core: ClusterStats,
    /// The bridge's links and messages.
    pub bridge: super::bridge::BridgeStats,
}

/// A shard's cluster counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterStats {
    /// Messages from other nodes dropped (expired on the way, or the log
    /// could not take them).
    pub remote_dropped: u64,
    /// Wills held for peers' clients (all peers, all their shards, those
    /// waiting for their delays included).
    pub peer_wills_held: usize,
    /// Wills of ended runs of peers published here.
    pub peer_wills_published: u64,
    /// Wills of ended runs cancelled: their clients came back in time.
    pub peer_wills_cancelled: u64,
    /// Wills of ended runs not kept: more were waiting for their delays
    /// than `cluster.peer_wills_max`.
    pub peer_wills_dropped: u64,
    /// Retained versions from peers not kept (older than this node's).
    pub retained_stale: u64,
    /// Deletes forgotten before `cluster.retained_tombstone_s`: more of
    /// them than the shard keeps retained messages.
    pub tombstones_forgotten_early: u64,
    /// CONNACKs released after `CLAIM_WAIT` without every peer's
    /// acknowledgement.
    pub claims_unanswered: u64,
    /// Connections closed here because their client connected later on
    /// another node.
    pub connections_taken_over: u64,
    /// Sessions ended here because their client started clean on another
    /// node.
    pub sessions_discarded: u64,
    /// Sessions that moved here from another node, whole.
    pub sessions_moved_in: u64,
    /// Sessions that moved from here to another node.
    pub sessions_moved_out: u64,
    /// Moves here given up (the other node down, or `MOVE_GIVE_UP`).
    pub moves_given_up: u64,
    /// Offers of sessions that came after the connection's CONNACK went.
    pub moves_declined: u64,
    /// Moves here that found the session staying on the other node (its
    /// client went back there first).
    pub moves_stayed: u64,
    /// Deliveries of older copies of sessions dropped on arrival (a
    /// partition let two copies live; the client was told about the
    /// newer one).
    pub stale_deliveries_dropped: u64,
    /// Deliveries lost in moves (past `MOVE_BYTES_MAX`, unreadable from
    /// the log, or their session gone before they came).
    pub move_deliveries_lost: u64,
    /// Sessions taken over from dead nodes' log copies (`adopt`), of
    /// those merged into a session here, and their deliveries.
    pub sessions_adopted: u64,
    /// Of those, taken into a session of the same client id here.
    pub sessions_adopted_merged: u64,
    /// Their deliveries.
    pub adopted_deliveries: u64,
    /// Adopted sessions given back (their node's run came back), and the
    /// deliveries queued meanwhile that they dropped.
    pub adopted_given_back: u64,
    /// The deliveries those dropped.
    pub adopted_given_back_deliveries: u64,
    /// Adopted sessions refused (`limits.sessions_max`).
    pub adopted_refused: u64,
    /// Adopted sessions dropped because their client came back first and
    /// was told its session is new, and their deliveries.
    pub adopted_stale: u64,
    /// The deliveries those dropped.
    pub adopted_stale_deliveries: u64,
    /// Messages a peer routed to a node declared down before it confirmed
    /// them, given to the sessions taken over from it here.
    pub adopted_messages: u64,
    /// Such messages that found no session here (this node took none of
    /// that run's, or they waited too long for the decision).
    pub adopted_messages_dropped: u64,
    /// Sessions that moved away kept here now (`orphans`), until the node
    /// they went to has them in its standbys' copies.
    pub sessions_kept: u64,
    /// Kept sessions that node confirmed, and those dropped without its
    /// word (60 s, the byte bound, or a newer run of it recovered its
    /// log).
    pub kept_confirmed: u64,
    /// See [`ClusterStats::kept_confirmed`].
    pub kept_unconfirmed: u64,
    /// Kept sessions sent to the node that took over from the node they
    /// went to, declared down first.
    pub sessions_orphaned: u64,
    /// Parts of such sessions taken in here, those not needed (the copy
    /// taken over held the move), and those dropped (no decision on their
    /// node in time, or past the byte bound).
    pub orphan_parts_taken: u64,
    /// See [`ClusterStats::orphan_parts_taken`].
    pub orphan_parts_superseded: u64,
    /// See [`ClusterStats::orphan_parts_taken`].
    pub orphan_parts_dropped: u64,
    /// The log's copies on standbys, and the copies kept here.
    pub replication: super::ReplicationStats,
}

/// A shard's cluster state (None on a broker that runs alone).
pub(super) struct Remote {
    /// Shard 0: this node's routes as its peers know them.
    pub(super) export: Option<RouteExport>,
    pub(super) out: VecDeque<BridgeOut>,
    pub(super) wake: Rc<Notify>,
    /// Messages from other nodes that expired on the way or that the
    /// log could not take.
    pub(super) remote_dropped: u64,
    /// Shard 0: the route sequence number every peer with a link up has
    /// acknowledged.
    pub(super) acked_everywhere: u64,
    /// Shard 0: acknowledgements of new routes (a subscriber's SUBACK
    /// waits) held until the peers have the node's table up to the
    /// number.
    pub(super) waiting: VecDeque<(u64, AckTo)>,
    /// Shard 0: the route sequence number every peer up by membership
    /// has acknowledged (0 while one has no link up).
    pub(super) acked_by_members: u64,
    /// Shard 0: the routes a session moving here waits for, held until
    /// every peer up has the node's table up to the number: one without
    /// a link up may still route the session's messages to the node it
    /// leaves only, which must keep it until then.
    pub(super) waiting_members: VecDeque<(u64, AckTo)>,
    /// Shard 0: fences out for remote routes: id → (shards yet to answer,
    /// node, where the acknowledgement goes).
    pub(super) fences: hashbrown::HashMap<u64, (usize, u16, RouteAckTo)>,
    pub(super) next_fence: u64,
    /// Wills across nodes.
    pub(super) wills: super::wills::Wills,
    /// The shard's hybrid logical clock (retained versions, claims), and
    /// the wall clock under it.
    pub(super) hlc: crate::cluster::hlc::Hlc,
    pub(super) wall: WallClock,
    /// Retained messages across nodes.
    pub(super) retained: super::cluster_retained::ClusterRetained,
    /// Claims of client ids.
    pub(super) claims: super::claims::Claims,
    /// Sessions moving between this node and others.
    pub(super) moves: super::moves::Moves,
    /// Sessions taken over from dead nodes.
    pub(super) adoptions: super::adopt::Adoptions,
    /// Sessions moved away and kept, and those orphaned by a death.
    pub(super) orphans: super::orphans::Orphans,
    /// This node handed its wills over and is leaving: the peers publish
    /// what it still holds, so a will it publishes now goes to its own
    /// subscribers only.
    pub(super) leaving: bool,
    /// Peers' names by index.
    pub(super) peer_names: hashbrown::HashMap<u16, Arc<str>>,
}

/// Where the acknowledgement of a peer's routes goes: the bridge's id of
/// the link they came on, and the route sequence number they reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteAckTo {
    /// The link (the bridge's [`crate::shard::bridge::LinkId`]).
    pub link: u64,
    /// The peer's route sequence number.
    pub seq: u64,
}

/// Bytes a message's frame to a peer takes besides the message's cost
/// (`Message::cost_bytes`), about.
pub const FRAME_OVERHEAD_BYTES: usize = 64;

/// What a message for a peer counts against `cluster.link_queue_bytes_max`
/// (its cost and the frame around it).
pub fn link_bytes(message: &Message) -> usize {
    message.cost_bytes() + FRAME_OVERHEAD_BYTES
}

impl ShardCore {
    /// Join a cluster at `now` (`wall` maps it to Unix time, for retained
    /// stamps): remote routes and the bridge outbox start working. Shard 0
    /// builds its route export from the replica (restored from the log, or
    /// empty); every shard its will export from its sessions and the
    /// stamps of its retained messages.
    pub fn enable_cluster(&self, now: Instant, wall: WallClock) {
        let mut st = self.state.borrow_mut();
        let wake: Rc<Notify> = Rc::default();
        if let Some(store) = st.store.as_mut() {
            // New records wake the bridge, which copies them to the
            // standbys.
            store.set_ship_wake(wake.clone());
        }
        let export = (self.id == 0).then(|| {
            let mut e = RouteExport::new();
            st.routes.for_each(|filter, key, _| {
                if let Some(name) = exported_name(filter, key) {
                    e.shard_changed(&name, true);
                }
            });
            e
        });
        st.remote = Some(Remote {
            export,
            out: VecDeque::new(),
            wake,
            remote_dropped: 0,
            acked_everywhere: 0,
            waiting: VecDeque::new(),
            acked_by_members: 0,
            waiting_members: VecDeque::new(),
            fences: hashbrown::HashMap::new(),
            next_fence: 0,
            wills: super::wills::Wills::new(
                self.config.cluster.peer_wills_max,
                self.config.cluster.peer_wills_bytes_max,
            ),
            hlc: crate::cluster::hlc::Hlc::new(),
            wall,
            retained: super::cluster_retained::ClusterRetained::new(
                self.config
                    .cluster
                    .retained_tombstone_s
                    .saturating_mul(1000),
                self.retained_max,
            ),
            leaving: false,
            peer_names: hashbrown::HashMap::new(),
            claims: super::claims::Claims::new(Arc::from(self.config.cluster.node_id.as_str())),
            moves: super::moves::Moves::new(&self.config.cluster.node_id, self.boot_stamp, self.id),
            adoptions: Default::default(),
            orphans: Default::default(),
        });
        // Sessions restored from the log: their wills. (A connection
        // attached before the cluster started would be claimed too; the
        // runtime starts it before it listens.)
        let keys: Vec<_> = st.sessions.keys().collect();
        for key in keys {
            Self::export_will(&mut st, key, now);
            if st.sessions.get(key).is_some_and(|s| s.conn.is_some()) {
                self.claim_connection(&mut st, key, now, (false, false));
            }
        }
    }

    /// Node-wide messages this shard sent for its publishers were
    /// confirmed by the nodes they went to, or will never be sent there
    /// ([`BridgeOut::Publish`]'s `ack`): the publishers' acknowledgements
    /// wait for them no more.
    pub fn remote_confirmed(&self, acks: impl IntoIterator<Item = AckTo>) {
        let mut st = self.state.borrow_mut();
        for ack in acks {
            self.ack(&mut st, ack);
        }
        Self::debug_invariants(&st);
    }

    /// A message this shard sent to node `node` (its index) will never
    /// reach it: that run of the node ended or was declared down before it
    /// confirmed the message, or the bridge dropped it (the node not up,
    /// or past `cluster.link_queue_bytes_max`). Each shared subscription
    /// it was to serve there is served by another member in the cluster
    /// (the node takes no turn); the node's ordinary subscribers lose it
    /// (counted by the bridge). The publisher's acknowledgement (`ack`)
    /// then waits for wherever those picks went instead. Returns the
    /// picks no other member could serve.
    pub fn remote_undeliverable(
        &self,
        now: Instant,
        node: u16,
        publish: RemotePublish,
        ack: Option<AckTo>,
        again: u8,
    ) -> Vec<SharedPick> {
        let mut st = self.state.borrow_mut();
        let RemotePublish {
            message, shared, ..
        } = publish;
        // QoS 2 too, though the member picked may have had it before its
        // node went (MQTT 5.0 4.8.2 would leave it with that member): a
        // second member getting it is the lesser harm than an
        // acknowledged message lost when the node did not deliver it.
        let serve_again =
            !shared.is_empty() && again < SERVED_AGAIN_MAX && !message.is_expired(now);
        let mut unserved = match serve_again {
            true => Vec::new(),
            false => shared.clone(),
        };
        if serve_again {
            // Neither that node nor one this shard does not see up.
            let up = |n: u16| self.peer_routes.borrow().get(&n).is_some_and(|p| p.up);
            let without = |n: u16| n == node || !up(n);
            let mut plan = self.plan_picks(&mut st, &message, &shared, without);
            plan.again = again + 1;
            let planned = |p: &SharedPick| {
                (plan.picks.iter().any(|(_, q)| q == p))
                    || (plan.node_picks.iter().any(|(_, q)| q == p))
            };
            unserved = shared.iter().filter(|p| !planned(p)).cloned().collect();
            if !plan.picks.is_empty() || !plan.node_picks.is_empty() {
                let from = ack
                    .filter(|a| a.shard == self.id && Self::acked_slot(&mut st, a).is_some())
                    .map(|a| a.session);
                let source = Source {
                    from,
                    ..Source::default()
                };
                self.route_planned(&mut st, now, message, source, plan);
            }
        }
        if let Some(ack) = ack {
            self.ack(&mut st, ack);
        }
        Self::debug_invariants(&st);
        unserved
    }

    /// Where shared subscriptions `picks` of `message` go in the whole
    /// cluster, the nodes `without` names taking no turn; nothing else
    /// (no ordinary subscriber, no retained copy).
    pub(super) fn plan_picks(
        &self,
        st: &mut State,
        message: &Message,
        picks: &[SharedPick],
        without: impl Fn(u16) -> bool,
    ) -> Plan {
        let mut plan = self.plan_without(st, message, Reach::Cluster, without);
        plan.owner = None;
        plan.drop_ordinary();
        plan.nodes.clear();
        plan.restrict_picks(|p| picks.contains(p));
        plan
    }

    /// Wakes the runtime's bridge task when the outbox has something.
    pub fn bridge_wake(&self) -> Option<Rc<Notify>> {
        self.state.borrow().remote.as_ref().map(|r| r.wake.clone())
    }

    /// True when the bridge outbox is empty.
    pub fn bridge_idle(&self) -> bool {
        self.state
            .borrow()
            .remote
            .as_ref()
            .is_none_or(|r| r.out.is_empty())
    }

    /// The next thing for the bridge.
    pub fn poll_bridge(&self) -> Option<BridgeOut> {
        let mut st = self.state.borrow_mut();
        let r = st.remote.as_mut()?;
        let out = r.out.pop_front()?;
        if let BridgeOut::Publish { bytes, .. } = &out {
            let routed = self.routed_bytes.get();
            debug_assert!(routed >= *bytes, "taking more than was routed");
            self.routed_bytes.set(routed - bytes);
        }
        Some(out)
    }

    /// Shard 0: a link came up: start its route feed from this node's
    /// table; the snapshot frames to send, parts of at most `chunk_bytes`.
    pub fn start_route_feed(&self, feed: &mut RouteFeed, chunk_bytes: usize) -> Vec<Frame> {
        let st = self.state.borrow();
        match st.remote.as_ref().and_then(|r| r.export.as_ref()) {
            Some(e) => feed.start(e, chunk_bytes),
            None => Vec::new(),
        }
    }

    /// Shard 0: a Ping carrying the route sequence and digest.
    pub fn route_ping(&self) -> Frame {
        let st = self.state.borrow();
        match st.remote.as_ref().and_then(|r| r.export.as_ref()) {
            Some(e) => Frame::Ping {
                seq: e.seq(),
                digest: e.digest(),
            },
            None => Frame::Ping { seq: 0, digest: 0 },
        }
    }

    /// A message from node `from` (its index): deliver it to this node's
    /// ordinary subscribers (if it is for them) and to one member of each
    /// shared subscription the other node chose this node for, which goes
    /// on once to a node with members if this one has none (back to
    /// `from` when it knows none); no retained copy (its node keeps that).
    pub fn handle_remote_publish(&self, now: Instant, from: u16, publish: RemotePublish) {
        let mut st = self.state.borrow_mut();
        let RemotePublish {
            mut message,
            ordinary,
            shared,
            passed_on,
            adopted_of,
            late,
            ..
        } = publish;
        if late {
            Arc::make_mut(&mut message).late = true;
        }
        if let Some((node, run)) = adopted_of {
            drop(st);
            self.for_adopted(now, (node.as_str(), run), message, ordinary, shared);
            return;
        }
        let routed = !message.is_expired(now) && {
            let mut plan = self.plan(&mut st, &message, Reach::FromPeer);
            if !ordinary {
                plan.drop_ordinary();
            }
            plan.restrict_picks(|p| shared.contains(p));
            // A pick this node has no member of (its member left, or the
            // sender's route was stale: this node's run ended since) goes
            // on once to another node with members: dropped, it would be
            // lost though the publisher was told it arrived.
            let unserved: SmallVec<[SharedPick; 1]> = shared
                .iter()
                .filter(|p| !plan.picks.iter().any(|(_, q)| q == *p))
                .cloned()
                .collect();
            if !unserved.is_empty() && passed_on {
                if let Some(r) = st.remote.as_mut() {
                    r.remote_dropped += 1;
                }
            } else if !unserved.is_empty() {
                let again = self.plan_picks(&mut st, &message, &unserved, |_| false);
                plan.picks.extend(again.picks);
                plan.node_picks = again.node_picks;
                // No server known here (this node's run may not have the
                // other nodes' routes yet): the sender had one.
                for p in unserved {
                    let known = |(_, q): &(u16, SharedPick)| *q == p;
                    if !plan.picks.iter().any(known) && !plan.node_picks.iter().any(known) {
                        plan.node_picks.push((from, p));
                    }
                }
                plan.passed_on = true;
            }
            self.route_planned(&mut st, now, message, Source::default(), plan)
        };
        if !routed {
            if let Some(r) = st.remote.as_mut() {
                r.remote_dropped += 1;
            }
        }
        self.send_applied(&mut st);
        Self::debug_invariants(&st);
    }

    /// Shard 0: route changes of remote node `node` (an index this node
    /// gives its peers), for every shard's replica. With `ack`, the link
    /// they came on and the node's route sequence number they bring it to:
    /// [`BridgeOut::RouteAck`]
    /// follows once every shard has applied them (a fence over the mesh,
    /// whose lanes keep order), so the node's SUBACK waits until a publish
    /// on any shard here reaches its subscriber.
    pub fn remote_routes(&self, node: u16, changes: &[RouteChange], ack: Option<RouteAckTo>) {
        let mut st = self.state.borrow_mut();
        for c in changes {
            let (group, inner) = crate::router::split_shared(&c.filter);
            let filter: Arc<str> = Arc::from(inner);
            let key = match group {
                None => RouteKey::Node(node),
                Some(group) => RouteKey::NodeShared {
                    pick: SharedPick {
                        group,
                        filter: filter.clone(),
                    },
                    node,
                },
            };
            Self::apply_route(&mut st, &filter, key.clone(), c.add);
            self.mesh.broadcast(|| MeshMsg::Route {
                filter: filter.clone(),
                key: key.clone(),
                add: c.add,
                ack_to: None,
            });
        }
        let (Some(to), Some(r)) = (ack, st.remote.as_mut()) else {
            return;
        };
        if self.shards == 1 {
            r.out.push_back(BridgeOut::RouteAck { node, to });
            r.wake.notify();
            return;
        }
        r.next_fence += 1;
        let id = r.next_fence;
        r.fences.insert(id, (self.shards - 1, node, to));
        self.mesh.broadcast(|| MeshMsg::Fence { id });
    }

    /// A shard answered fence `id`.
    pub(super) fn fence_done(st: &mut State, id: u64) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let Some(f) = r.fences.get_mut(&id) else {
            return;
        };
        f.0 -= 1;
        if f.0 == 0 {
            if let Some((_, node, to)) = r.fences.remove(&id) {
                r.out.push_back(BridgeOut::RouteAck { node, to });
            }
            r.wake.notify();
        }
    }

    /// Shard 0: every peer whose link is up has acknowledged this node's
    /// routes up to `upto` (`u64::MAX`: no link is up), and every peer up
    /// by membership up to `by_members` (0 while one has no link up).
    /// Releases the subscribers and the moves waiting for that.
    pub fn routes_acked(&self, upto: u64, by_members: u64) {
        let mut st = self.state.borrow_mut();
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        r.acked_everywhere = upto;
        r.acked_by_members = by_members;
        let mut released = Vec::new();
        for (queue, upto) in [(&mut r.waiting, upto), (&mut r.waiting_members, by_members)] {
            while let Some(&(seq, ack)) = queue.front() {
                if seq > upto {
                    break;
                }
                queue.pop_front();
                released.push(ack);
            }
        }
        for ack in released {
            self.ack(&mut st, ack);
        }
    }

    /// Shard 0: acknowledge a new route once the peers can route it too:
    /// at once when they have the table as it is now, else when they do
    /// (every peer with a link up; for a session moving here, every peer
    /// up). Returns false (the caller acknowledges at once) off shard 0
    /// or outside a cluster.
    pub(super) fn ack_when_peers_have(st: &mut State, ack: AckTo) -> bool {
        let Some(r) = st.remote.as_mut() else {
            return false;
        };
        let Some(e) = r.export.as_ref() else {
            return false;
        };
        let seq = e.seq();
        let (acked, queue) = match ack.move_in != 0 {
            true => (r.acked_by_members, &mut r.waiting_members),
            false => (r.acked_everywhere, &mut r.waiting),
        };
        if acked >= seq {
            return false;
        }
        queue.push_back((seq, ack));
        true
    }

    /// The shard's cluster counters (all zero outside a cluster).
    pub fn cluster_stats(&self) -> ClusterStats {
        Self::cluster_stats_of(&self.state.borrow()).unwrap_or_default()
    }

    /// The cluster counters of `st`; None outside a cluster.
    pub(super) fn cluster_stats_of(st: &State) -> Option<ClusterStats> {
        let r = st.remote.as_ref()?;
        let (w, c) = (&r.wills, &r.claims);
        Some(ClusterStats {
            remote_dropped: r.remote_dropped,
            peer_wills_held: w.held(),
            peer_wills_published: w.published,
            peer_wills_cancelled: w.cancelled,
            peer_wills_dropped: w.dropped,
            retained_stale: r.retained.stale,
            tombstones_forgotten_early: r.retained.tombstones_forgotten_early,
            claims_unanswered: c.unanswered,
            connections_taken_over: c.taken_over,
            sessions_discarded: c.discarded,
            sessions_moved_in: r.moves.moved_in,
            sessions_moved_out: r.moves.moved_out,
            moves_given_up: r.moves.unfinished,
            moves_declined: r.moves.declined,
            moves_stayed: r.moves.stayed,
            stale_deliveries_dropped: r.moves.stale_dropped,
            move_deliveries_lost: r.moves.lost,
            sessions_adopted: r.adoptions.sessions,
            sessions_adopted_merged: r.adoptions.merged,
            adopted_deliveries: r.adoptions.deliveries,
            adopted_given_back: r.adoptions.given_back,
            adopted_given_back_deliveries: r.adoptions.given_back_deliveries,
            adopted_refused: r.adoptions.refused,
            adopted_stale: r.adoptions.stale,
            adopted_stale_deliveries: r.adoptions.stale_deliveries,
            adopted_messages: r.adoptions.messages_delivered,
            adopted_messages_dropped: r.adoptions.messages_dropped,
            sessions_kept: r.orphans.kept_len() as u64,
            kept_confirmed: r.orphans.confirmed,
            kept_unconfirmed: r.orphans.unconfirmed,
            sessions_orphaned: r.orphans.orphaned,
            orphan_parts_taken: r.orphans.taken,
            orphan_parts_superseded: r.orphans.superseded,
            orphan_parts_dropped: r.orphans.dropped,
            replication: (st.store.as_ref())
                .map_or_else(Default::default, |s| s.replication_stats()),
        })
    }

    /// Queue `message` for each remote node the plan names: once per
    /// node, for its ordinary subscribers and the shared subscriptions
    /// whose turn is its.
    pub(super) fn to_nodes(
        &self,
        st: &mut State,
        message: &Arc<Message>,
        plan: &Plan,
        from: Option<SessionKey>,
    ) {
        if st.remote.is_none() {
            return;
        }
        let mut nodes: SmallVec<[u16; 4]> = plan.nodes.clone();
        for (n, _) in &plan.node_picks {
            if !nodes.contains(n) {
                nodes.push(*n);
            }
        }
        // The publisher's acknowledgement waits for every node it goes to.
        let ack = from
            .filter(|_| message.qos != QoS::AtMostOnce)
            .and_then(|key| self.hold_output(st, key, nodes.len() as u32));
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let bytes = link_bytes(message);
        self.routed_bytes
            .set(self.routed_bytes.get() + bytes * nodes.len());
        for node in nodes {
            let shared = plan
                .node_picks
                .iter()
                .filter(|(n, _)| *n == node)
                .map(|(_, p)| p.clone())
                .collect();
            r.out.push_back(BridgeOut::Publish {
                node,
                publish: RemotePublish {
                    seq: 0,
                    message: message.clone(),
                    ordinary: plan.nodes.contains(&node),
                    shared,
                    passed_on: plan.passed_on,
                    adopted_of: None,
                    // Passed on, it reaches that node out of its origin's
                    // order.
                    late: message.late || plan.passed_on,
                },
                ack,
                again: plan.again,
                bytes,
            });
        }
        r.wake.notify();
    }

    /// Shard 0: a replica change of a local shard may change the node's
    /// routes as a whole.
    pub(super) fn export_route(st: &mut State, filter: &str, key: &RouteKey, add: bool) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let (Some(e), Some(name)) = (r.export.as_mut(), exported_name(filter, key)) else {
            return;
        };
        if let Some((seq, change)) = e.shard_changed(&name, add) {
            r.out.push_back(BridgeOut::Route { seq, change });
            r.wake.notify();
        }
    }
}

/// The name a local route has in the node's export: its filter, or
/// `$share/{group}/{filter}` for a shared subscription; None for a remote
/// node's route (never exported again) and for a persistent-subscriber mark
/// (the node's own business).
fn exported_name<'a>(filter: &'a str, key: &RouteKey) -> Option<std::borrow::Cow<'a, str>> {
    match key {
        RouteKey::Shard(_) => Some(std::borrow::Cow::Borrowed(filter)),
        RouteKey::Shared { pick, .. } => Some(std::borrow::Cow::Owned(format!(
            "$share/{}/{}",
            pick.group, pick.filter
        ))),
        RouteKey::Kept(_) | RouteKey::Node(_) | RouteKey::NodeShared { .. } => None,
    }
}
