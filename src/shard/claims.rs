//! The shard's side of claims (`cluster::claims`): one live connection
//! per client id in the cluster.
//!
//! Shard-local, no I/O. When a connection attaches on its home shard in a
//! cluster, the shard stamps the claim and puts it in the bridge outbox
//! ([`BridgeOut::Claim`]); a link that comes up sends every live
//! connection's claim, a part at a time ([`ShardCore::claims_snapshot`]). A claim from a
//! peer ([`ShardCore::handle_remote_claims`]) goes to this node's home
//! shard of its client id, which closes its own connection of that client
//! id if the peer's claim is later, as a takeover on one node would
//! (DISCONNECT 0x8E to a 5.0 client, the will as for any takeover). The
//! session stays here, offline, with what it holds; a will waiting for
//! its delay is cancelled, since its client is back.

use std::sync::Arc;
use std::time::Instant;

use crate::cluster::claims::wins;
use crate::cluster::frame::{ClaimEntry, Frame};
use crate::cluster::hlc::Hlc;
use crate::persist::WallClock;
use crate::text::quote;

use super::mesh::MeshMsg;
use super::remote::BridgeOut;
use super::{home_shard, SessionKey, ShardCore, State};

/// A link's progress through this shard's live connections' claims.
#[derive(Debug, Default)]
pub struct ClaimsSnapshot {
    next: u32,
    done: bool,
}

impl ClaimsSnapshot {
    /// True when every part was given.
    pub fn is_done(&self) -> bool {
        self.done
    }
}

/// A shard's claims (part of its cluster state).
pub(super) struct Claims {
    hlc: Hlc,
    wall: WallClock,
    /// This node's name (ties between equal stamps).
    me: Arc<str>,
    /// Connections closed here for a later one on another node.
    pub(super) taken_over: u64,
}

impl Claims {
    pub(super) fn new(wall: WallClock, me: Arc<str>) -> Claims {
        Claims {
            hlc: Hlc::new(),
            wall,
            me,
            taken_over: 0,
        }
    }
}

impl ShardCore {
    /// A connection attached to session `key` at `now`: stamp its claim
    /// and tell the peers.
    pub(super) fn claim_connection(st: &mut State, key: SessionKey, now: Instant) {
        let (Some(r), Some(slot)) = (st.remote.as_mut(), st.sessions.get_mut(key)) else {
            return;
        };
        let c = &mut r.claims;
        slot.claim = c.hlc.next(c.wall.to_ms(now));
        r.out.push_back(BridgeOut::Claim(ClaimEntry {
            client_id: slot.session.client_id().clone(),
            stamp: slot.claim,
        }));
        r.wake.notify();
    }

    /// Claims from peer node `node`: each to this node's home shard of its
    /// client id.
    pub fn handle_remote_claims(&self, now: Instant, node: &str, claims: Vec<ClaimEntry>) {
        let mut st = self.state.borrow_mut();
        let node: Arc<str> = Arc::from(node);
        for c in claims {
            let home = home_shard(&c.client_id, self.shards);
            if home == self.id {
                self.claimed_elsewhere(&mut st, now, &c.client_id, c.stamp, &node);
            } else {
                self.mesh.send(
                    home,
                    MeshMsg::PeerClaim {
                        client_id: c.client_id,
                        stamp: c.stamp,
                        node: node.clone(),
                    },
                );
            }
        }
        Self::debug_invariants(&st);
    }

    /// On the home shard: node `node` claimed `client_id` with `stamp`.
    /// A live connection here with an earlier claim closes.
    pub(super) fn claimed_elsewhere(
        &self,
        st: &mut State,
        now: Instant,
        client_id: &str,
        stamp: u64,
        node: &str,
    ) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        r.claims.hlc.observe(stamp);
        let me = r.claims.me.clone();
        let Some(&key) = st.by_client.get(client_id) else {
            return;
        };
        let Some(slot) = st.sessions.get_mut(key) else {
            return;
        };
        if slot.conn.is_none() || !wins((stamp, node), (slot.claim, &me)) {
            return;
        }
        slot.session.takeover(now);
        self.drive(st, key, now);
        // Its client is back (on the other node): a will waiting for its
        // delay does not go.
        let cancelled = st
            .sessions
            .get_mut(key)
            .is_some_and(|slot| slot.session.cancel_pending_will());
        if cancelled {
            Self::durable_will_done(st, Some(key));
            Self::after_step(st, key, now);
        }
        if let Some(r) = st.remote.as_mut() {
            r.claims.taken_over += 1;
        }
        shard_log!(
            self,
            log::Level::Info,
            "cluster: client {} connected on node {}: its connection here is closed \
             (session taken over)",
            quote(client_id),
            quote(node)
        );
    }

    /// The next part (at most `max` claims) of the live connections'
    /// claims for a link that came up; None once `snapshot` is done. A
    /// connection that attaches meanwhile reaches the link as a change.
    pub fn claims_snapshot(&self, snapshot: &mut ClaimsSnapshot, max: usize) -> Option<Frame> {
        let st = self.state.borrow();
        if st.remote.is_none() || snapshot.done {
            snapshot.done = true;
            return None;
        }
        let mut claims = Vec::new();
        let mut next = None;
        for (key, slot) in st.sessions.iter_from(snapshot.next) {
            if claims.len() == max {
                next = Some(key);
                break;
            }
            if slot.conn.is_some() {
                claims.push(ClaimEntry {
                    client_id: slot.session.client_id().clone(),
                    stamp: slot.claim,
                });
            }
        }
        match next {
            Some(k) => snapshot.next = k,
            None => snapshot.done = true,
        }
        (!claims.is_empty()).then_some(Frame::Claims(claims))
    }

    /// Connections closed here because their client connected later on
    /// another node.
    pub fn connections_taken_over_elsewhere(&self) -> u64 {
        let st = self.state.borrow();
        st.remote.as_ref().map_or(0, |r| r.claims.taken_over)
    }
}
