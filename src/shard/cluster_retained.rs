//! The shard's side of retained messages across nodes
//! (`cluster::retained`): every node keeps every retained message, and
//! the last writer wins by hybrid logical clock.
//!
//! Shard-local, no I/O. The owner shard of a topic stamps each retained
//! store or delete made on this node and puts it in the bridge outbox
//! ([`BridgeOut::Retained`]) for every link up; a link that comes up sends
//! the shard's whole part, topic by topic and a part at a time
//! ([`ShardCore::retained_snapshot`]), deletes still remembered included.
//! A version from a peer ([`ShardCore::handle_remote_retained`]) goes to
//! this node's owner shard of its topic, which keeps it only if it is newer
//! than its own, and then passes it on to its other peers (so a version
//! reaches every node even when the node that made it dies first). A
//! delete is remembered as a tombstone for `cluster.retained_tombstone_s`,
//! so an older copy on a node that was away cannot bring the message back
//! within that time.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use crate::cluster::frame::{Frame, RetainedEntry};
use crate::cluster::retained::wins;
use crate::hash::HashMap;
use crate::message::Message;
use crate::router::MatchWalk;

use super::mesh::MeshMsg;
use super::remote::BridgeOut;
use super::{ShardCore, State};

/// Bytes a retained entry takes in a snapshot part, besides its topic and
/// payload.
const ENTRY_OVERHEAD_BYTES: usize = 48;

/// A shard's retained messages across nodes (part of its cluster state).
pub(super) struct ClusterRetained {
    /// Deletes remembered: topic → stamp and the delete itself.
    tombstones: HashMap<Arc<str>, (u64, Arc<Message>)>,
    /// The same, oldest first, to forget them.
    tombstone_order: BTreeSet<(u64, Arc<str>)>,
    tombstone_ms: u64,
    /// Tombstones kept at most (the shard's share of
    /// `mqtt.retained_messages_max`): past it the oldest is forgotten
    /// early, and counted.
    tombstones_max: usize,
    pub(super) tombstones_forgotten_early: u64,
    /// Versions from peers not kept: older than this shard's.
    pub(super) stale: u64,
}

impl ClusterRetained {
    pub(super) fn new(tombstone_ms: u64, tombstones_max: usize) -> ClusterRetained {
        ClusterRetained {
            tombstones_max: tombstones_max.max(1),
            tombstones_forgotten_early: 0,
            tombstones: HashMap::default(),
            tombstone_order: BTreeSet::new(),
            tombstone_ms,
            stale: 0,
        }
    }

    fn forget_tombstone(&mut self, topic: &str) {
        if let Some((stamp, _)) = self.tombstones.remove(topic) {
            self.tombstone_order.remove(&(stamp, Arc::from(topic)));
        }
    }
}

/// A link's progress through this shard's retained messages.
#[derive(Debug)]
pub struct RetainedSnapshot {
    /// The tombstones went first.
    tombstones_sent: bool,
    walk: MatchWalk,
}

impl Default for RetainedSnapshot {
    fn default() -> Self {
        RetainedSnapshot {
            tombstones_sent: false,
            walk: MatchWalk::all(),
        }
    }
}

impl RetainedSnapshot {
    /// True when every part was given.
    pub fn is_done(&self) -> bool {
        self.tombstones_sent && self.walk.is_done()
    }
}

/// What the owner shard does with a retained store or delete.
pub(super) enum Version {
    /// Made on this node: stamp it and tell the peers.
    Local,
    /// From peer `from` (its index), with its stamp: keep it if it is
    /// newer (and pass it on to the other peers).
    Peer {
        /// The version's stamp.
        stamp: u64,
        /// The peer it came from.
        from: u16,
    },
}

impl Version {
    /// The peer a version came from, which has it already.
    pub(super) fn source(&self) -> Option<u16> {
        match self {
            Version::Local => None,
            Version::Peer { from, .. } => Some(*from),
        }
    }
}

impl ShardCore {
    /// The stamp a retained store or delete gets on its owner shard, or
    /// None when a peer's version is older than what is here (it is
    /// dropped). Outside a cluster: `stamp_ms` as given.
    pub(super) fn retained_version(
        st: &mut State,
        now: Instant,
        message: &Message,
        stamp_ms: u64,
        version: &Version,
    ) -> Option<u64> {
        let Some(r) = st.remote.as_mut() else {
            return Some(stamp_ms);
        };
        let topic = &*message.topic;
        let kept = st.retained.get(topic).map(|k| (k.stamp, &*k.message));
        let held = kept.or_else(|| r.retained.tombstones.get(topic).map(|(s, m)| (*s, &**m)));
        match *version {
            Version::Local => {
                // After the version it replaces, even one stamped by a
                // clock that was ahead before a restart.
                if let Some((old, _)) = held {
                    r.hlc.observe(old);
                }
                Some(r.hlc.next(r.wall.to_ms(now)))
            }
            Version::Peer { stamp, .. } => {
                r.hlc.observe(stamp);
                let newer = held.is_none_or(|old| wins((stamp, message), old));
                // Stale only when what is here wins: the same version
                // again (a peer passing on what it got from this node or a
                // third one; its expiry, rebuilt, may differ) is not.
                if !newer && held.is_some_and(|old| wins(old, (stamp, message))) {
                    r.retained.stale += 1;
                }
                newer.then_some(stamp)
            }
        }
    }

    /// The owner shard kept (`stored`) or deleted a retained topic with
    /// `stamp`: remember it, and tell the peers. A peer's version that won
    /// here is passed on too: the node that made it may die (or its link
    /// to a third node break) before every node has it, and a node sends
    /// its whole store only when its own links come up, so without this a
    /// node that missed it would keep an older version for as long as its
    /// links to the others stay up. Each node passes a version on once
    /// (only when it wins), so a change crosses each link at most once.
    /// `from`: the peer it came from, which is not told again.
    pub(super) fn retained_kept(
        st: &mut State,
        message: &Arc<Message>,
        stamp: u64,
        from: Option<u16>,
    ) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        if crate::sys::is_sys_topic(&message.topic) {
            return; // each node's own
        }
        let c = &mut r.retained;
        let topic = message.topic.clone();
        c.forget_tombstone(&topic);
        if message.payload.is_empty() {
            if c.tombstones.len() >= c.tombstones_max {
                if let Some((_, oldest)) = c.tombstone_order.pop_first() {
                    c.tombstones.remove(&oldest);
                    c.tombstones_forgotten_early += 1;
                }
            }
            c.tombstone_order.insert((stamp, topic.clone()));
            c.tombstones.insert(topic, (stamp, message.clone()));
        }
        let entry = RetainedEntry {
            stamp,
            message: message.clone(),
        };
        r.out.push_back(BridgeOut::Retained {
            entry,
            except: from,
        });
        r.wake.notify();
    }

    /// Retained versions from peer `from` (its index): each to this
    /// node's owner shard of its topic, which keeps it if it is newer than
    /// its own.
    pub fn handle_remote_retained(&self, now: Instant, from: u16, entries: Vec<RetainedEntry>) {
        let mut st = self.state.borrow_mut();
        for e in entries {
            // Each node's $SYS is its own (an older peer may send its).
            if e.message.is_expired(now) || crate::sys::is_sys_topic(&e.message.topic) {
                continue;
            }
            let owner = self.topic_owner(&e.message.topic);
            if owner == self.id {
                let version = Version::Peer {
                    stamp: e.stamp,
                    from,
                };
                self.store_retained(&mut st, now, e.message, None, e.stamp, version);
            } else {
                self.mesh.send(
                    owner,
                    MeshMsg::Retain {
                        message: e.message,
                        ack_to: None,
                        origin: None,
                        stamp_ms: e.stamp,
                        from_peer: Some(from),
                    },
                );
            }
        }
        Self::debug_invariants(&st);
    }

    /// The next part (about `chunk_bytes`) of this shard's retained
    /// messages for a link that came up: the tombstones first, then every
    /// topic; None once `snapshot` is done. Topics stored or deleted while
    /// it goes on reach the link as changes.
    pub fn retained_snapshot(
        &self,
        snapshot: &mut RetainedSnapshot,
        chunk_bytes: usize,
        now: Instant,
    ) -> Option<Frame> {
        let st = self.state.borrow();
        let r = st.remote.as_ref()?;
        let c = &r.retained;
        let mut entries = Vec::new();
        if !snapshot.tombstones_sent {
            snapshot.tombstones_sent = true;
            entries.extend(c.tombstones.values().map(|(stamp, m)| RetainedEntry {
                stamp: *stamp,
                message: m.clone(),
            }));
            if !entries.is_empty() {
                return Some(Frame::Retained(entries));
            }
        }
        let mut bytes = 0;
        while !snapshot.walk.is_done() && bytes < chunk_bytes {
            st.retained.walk(&mut snapshot.walk, 256, 64, |topic, k| {
                if k.message.is_expired(now) || crate::sys::is_sys_topic(topic) {
                    return; // $SYS: this node's own
                }
                bytes += topic.len() + k.message.payload.len() + ENTRY_OVERHEAD_BYTES;
                entries.push(RetainedEntry {
                    stamp: k.stamp,
                    message: k.message.clone(),
                });
            });
        }
        (!entries.is_empty()).then_some(Frame::Retained(entries))
    }

    /// Forget the tombstones older than `cluster.retained_tombstone_s`.
    pub(super) fn expire_tombstones(st: &mut State, now: Instant) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let horizon = r.wall.to_ms(now).saturating_sub(r.retained.tombstone_ms);
        let c = &mut r.retained;
        while let Some((stamp, topic)) = c.tombstone_order.first().cloned() {
            if stamp >= horizon {
                break;
            }
            c.tombstone_order.pop_first();
            c.tombstones.remove(&topic);
        }
    }
}
