//! The shard's side of wills across nodes (`cluster::wills`): what it
//! tells its peers of its own clients' wills, and the wills it holds for
//! the peers' clients until their node's run ends.
//!
//! Shard-local, no I/O. After each of a session's own steps the shard compares
//! the will the session would leave now with what its export holds and
//! puts the change in the bridge outbox ([`BridgeOut::Will`]), which the
//! runtime writes to every link up; a link that comes up starts with
//! [`ShardCore::will_snapshot`]. The wills peers send arrive through
//! [`ShardCore::peer_wills`], one table per peer shard whose links come
//! here. When a peer's run ends (declared down, or replaced by a newer run
//! before that), [`ShardCore::peer_run_ended`] schedules its wills, each
//! after the delay it had left, and [`ShardCore::handle_tick`] publishes
//! them to this node's subscribers only: every node does the same, so each
//! subscriber in the cluster gets a will once.
//!
//! A session restored from the log holds a will of the node's previous
//! run. The peers had that will and published it when that run ended, so
//! this node publishes it to its own subscribers only and does not export
//! it again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use crate::cluster::frame::{Frame, WillEntry};
use crate::cluster::wills::{millis, WillError, WillExport, WillImport};
use crate::codec::Will;
use crate::hash::HashMap;
use crate::message::Message;
use crate::session::WillDue;

use super::mesh::RouteKey;
use super::remote::BridgeOut;
use super::routing::{Reach, Source};
use super::{SessionKey, SessionSlot, ShardCore, State};

/// A shard's wills across nodes (part of its cluster state).
pub(super) struct Wills {
    /// Its own clients' wills, as the peers hold them.
    export: WillExport,
    /// What the peers' shards linked here sent: by (peer index, its
    /// shard), the run they belong to and the table.
    imports: HashMap<(u16, u16), (u64, WillImport)>,
    /// Wills of ended runs waiting for their delay: by due time and a
    /// count (to keep equal times apart).
    due: BTreeMap<(Instant, u64), (u16, Arc<str>, Will)>,
    /// The same by client id: a client that connects again (here, or on
    /// a node whose claim arrives) cancels its will.
    due_by_client: HashMap<Arc<str>, (Instant, u64)>,
    next: u64,
    /// Wills, and bytes of wills, taken from one peer shard at most.
    max: usize,
    bytes_max: usize,
    /// Wills of ended runs published here.
    pub(super) published: u64,
    /// Wills of ended runs cancelled: their clients came back in time.
    pub(super) cancelled: u64,
    /// Wills of ended runs not kept: more waiting for their delays than
    /// `max` (peers restarting again and again with long will delays).
    pub(super) dropped: u64,
    /// The latest run of each peer known to have ended: a late frame of
    /// it (or an older one) is ignored, so its wills cannot come back.
    ended: HashMap<u16, u64>,
}

impl Wills {
    pub(super) fn new(max: usize, bytes_max: usize) -> Wills {
        Wills {
            bytes_max,
            export: WillExport::new(),
            imports: HashMap::default(),
            due: BTreeMap::new(),
            due_by_client: HashMap::default(),
            next: 0,
            max,
            published: 0,
            cancelled: 0,
            dropped: 0,
            ended: HashMap::default(),
        }
    }

    /// Wills held: in the peers' tables and waiting for their delays.
    pub(super) fn held(&self) -> usize {
        self.imports.values().map(|(_, i)| i.len()).sum::<usize>() + self.due.len()
    }

    /// The wills of a run that ended at `now`: each due its delay from
    /// now, or, when it was waiting already, when it was due.
    fn schedule(&mut self, now: Instant, peer: u16, entries: Vec<(WillEntry, Option<Instant>)>) {
        for (e, due) in entries {
            if self.due.len() >= self.max {
                self.dropped += 1;
                continue;
            }
            self.next += 1;
            let at = match due {
                Some(t) => t.max(now),
                None => now + std::time::Duration::from_millis(e.delay_ms),
            };
            let key = (at, self.next);
            if let Some(old) = self.due_by_client.insert(e.client_id.clone(), key) {
                self.due.remove(&old);
            }
            self.due.insert(key, (peer, e.client_id, e.will));
        }
    }
}

/// What a slot's export holds for its session's will: the connection
/// generation and, for a will waiting for its delay, when it is due.
pub(super) type WillMark = Option<(u64, Option<Instant>)>;

impl ShardCore {
    /// After a step of session `key`: tell the peers if the will it would
    /// leave changed.
    pub(super) fn export_will(st: &mut State, key: SessionKey, now: Instant) {
        let (Some(r), Some(slot)) = (st.remote.as_mut(), st.sessions.get_mut(key)) else {
            return;
        };
        let will = slot.session.will_now().filter(|_| !slot.will_of_last_run);
        let mark = will.map(|(_, due)| {
            let at = match due {
                WillDue::At(t) => Some(t),
                WillDue::AfterEnd(_) => None,
            };
            (slot.session.generation(), at)
        });
        if mark == slot.will_mark {
            return;
        }
        slot.will_mark = mark;
        let frame = match will {
            Some((will, due)) => {
                let (delay_ms, at) = match due {
                    WillDue::AfterEnd(s) => (u64::from(s) * 1000, None),
                    WillDue::At(t) => (millis(t.saturating_duration_since(now)), Some(t)),
                };
                let entry = WillEntry {
                    client_id: slot.session.client_id().clone(),
                    will: will.clone(),
                    delay_ms,
                    waiting: at.is_some(),
                };
                Some(r.wills.export.set(entry, at))
            }
            None => r.wills.export.clear(slot.session.client_id()),
        };
        if let Some(f) = frame {
            r.out.push_back(BridgeOut::Will(f));
            r.wake.notify();
        }
    }

    /// A session's slot is gone: its will, if the peers held one, too.
    pub(super) fn unexport_will(st: &mut State, slot: &SessionSlot) {
        let Some(r) = st.remote.as_mut().filter(|_| slot.will_mark.is_some()) else {
            return;
        };
        if let Some(f) = r.wills.export.clear(slot.session.client_id()) {
            r.out.push_back(BridgeOut::Will(f));
            r.wake.notify();
        }
    }

    /// A link to a peer came up at `now`: the wills it starts with, in
    /// parts of about `chunk_bytes`.
    pub fn will_snapshot(&self, chunk_bytes: usize, now: Instant) -> Vec<Frame> {
        let st = self.state.borrow();
        match st.remote.as_ref() {
            Some(r) => r.wills.export.snapshot(chunk_bytes, now),
            None => Vec::new(),
        }
    }

    /// A will frame from shard `shard` of peer `peer` (its index), run
    /// `incarnation`. A table of an older run of that peer is that run's
    /// end (its wills are scheduled); a frame of an older run than the
    /// table's is ignored. An error (too many wills) should close the
    /// link: the next one starts from a snapshot.
    pub fn peer_wills(
        &self,
        now: Instant,
        peer: u16,
        incarnation: u64,
        shard: u16,
        frame: &Frame,
    ) -> Result<(), WillError> {
        let mut st = self.state.borrow_mut();
        let Some(r) = st.remote.as_mut() else {
            return Ok(());
        };
        let w = &mut r.wills;
        if w.ended.get(&peer).is_some_and(|&e| incarnation <= e) {
            return Ok(());
        }
        let (run, import) = w
            .imports
            .entry((peer, shard))
            .or_insert_with(|| (incarnation, WillImport::new(w.max, w.bytes_max)));
        if *run > incarnation {
            return Ok(());
        }
        let mut ended = Vec::new();
        if *run < incarnation {
            ended = import.take();
            *run = incarnation;
        }
        let applied = import.apply(frame, now);
        if !ended.is_empty() {
            w.schedule(now, peer, ended);
            drop(st);
            self.publish_due_peer_wills(now);
        }
        applied
    }

    /// Run `incarnation` of peer `peer` is up: when it is a run already
    /// held ended (declared down by mistake, it rejoined), its frames
    /// count again (its wills went out when it was declared down; the ones
    /// it has now are held anew), and the sessions adopted from it go back
    /// (`adopt`).
    pub fn peer_run_up(&self, now: Instant, peer: u16, incarnation: u64) {
        let mut st = self.state.borrow_mut();
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        if r.wills.ended.get(&peer) == Some(&incarnation) {
            r.wills.ended.remove(&peer);
            self.give_adopted_back(&mut st, now, peer, incarnation);
            Self::debug_invariants(&st);
        }
    }

    /// Run `incarnation` of peer `peer` ended without it (declared down,
    /// or replaced by a newer run): its wills held here go out after the
    /// delay each had left, to this node's subscribers.
    pub fn peer_run_ended(&self, now: Instant, peer: u16, incarnation: u64) {
        let mut st = self.state.borrow_mut();
        self.peer_moves_ended(&mut st, now, peer);
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        let ended = r.wills.ended.entry(peer).or_insert(incarnation);
        *ended = (*ended).max(incarnation);
        let keys: Vec<(u16, u16)> = r
            .wills
            .imports
            .iter()
            .filter(|((p, _), (run, _))| *p == peer && *run <= incarnation)
            .map(|(k, _)| *k)
            .collect();
        let mut ended = Vec::new();
        for k in keys {
            if let Some((_, mut import)) = r.wills.imports.remove(&k) {
                ended.extend(import.take());
            }
        }
        if ended.is_empty() {
            return;
        }
        shard_log!(
            self,
            log::Level::Info,
            "cluster: shard {}: {} wills of node index {peer} (incarnation {incarnation}) to \
             publish: its run ended",
            self.id,
            ended.len()
        );
        r.wills.schedule(now, peer, ended);
        drop(st);
        self.publish_due_peer_wills(now);
    }

    /// `client_id` connected again (on this node, or on the node whose
    /// claim arrived): a will of its from an ended run that still waits
    /// for its delay does not go ([MQTT-3.1.3-9]).
    pub(super) fn cancel_peer_will(st: &mut State, client_id: &str) {
        let Some(r) = st.remote.as_mut() else {
            return;
        };
        if let Some(key) = r.wills.due_by_client.remove(client_id) {
            r.wills.due.remove(&key);
            r.wills.cancelled += 1;
        }
    }

    /// Publish the wills of ended runs that are due, here only.
    pub(super) fn publish_due_peer_wills(&self, now: Instant) {
        let mut st = self.state.borrow_mut();
        let mut published = false;
        loop {
            let Some(r) = st.remote.as_mut() else {
                return;
            };
            let Some(entry) = r.wills.due.first_entry() else {
                break;
            };
            if entry.key().0 > now {
                break;
            }
            published = true;
            let (peer, client_id, will) = entry.remove();
            r.wills.due_by_client.remove(&client_id);
            r.wills.published += 1;
            let message = Arc::new(Message::from_will(will, now));
            self.route_peer_will(&mut st, now, message, peer);
        }
        if published {
            self.send_applied(&mut st);
        }
    }

    /// Publish the will of a client of dead peer `dead` here: to this
    /// node's ordinary subscribers, and to a shared subscription only if
    /// this node has the lowest name among the surviving nodes with
    /// members (each survivor decides the same from its route replica), so
    /// the group gets it once.
    ///
    /// The sessions this node took over from `dead` (`adopt`), its own
    /// subscribers, get it too, once taken over: numbered, a copy that
    /// reached one already by the route above is skipped there while it
    /// holds it.
    fn route_peer_will(&self, st: &mut State, now: Instant, message: Arc<Message>, dead: u16) {
        let message = Self::number_message(st, message);
        let run = (st.remote.as_ref())
            .and_then(|r| Some((r.peer_names.get(&dead)?.clone(), *r.wills.ended.get(&dead)?)));
        if let Some(of) = run {
            let p = super::adopt::Pending::will(now, of, message.clone());
            self.held_for_adopted(st, p);
        }
        let mut plan = self.plan(st, &message, Reach::Here);
        let Some(r) = st.remote.as_ref() else {
            return;
        };
        let me = r.claims.me();
        let names = &r.peer_names;
        plan.restrict_picks(|pick| {
            let mut lowest = true;
            st.routes.for_each_match(&message.topic, |key, _| {
                if let RouteKey::NodeShared { pick: p, node } = key {
                    let other = names.get(node).filter(|_| *node != dead && p == pick);
                    if other.is_some_and(|n| **n < *me) {
                        lowest = false;
                    }
                }
            });
            lowest
        });
        self.route_planned(st, now, message, Source::default(), plan);
    }

    /// Peer `index` is the node named `name` (shared subscriptions'
    /// wills are served by the lowest name).
    pub fn peer_named(&self, index: u16, name: &str) {
        if let Some(r) = self.state.borrow_mut().remote.as_mut() {
            r.peer_names.insert(index, Arc::from(name));
        }
    }

    /// An orderly stop handed this shard's will changes to the peers,
    /// which publish the wills still waiting once this node has left: a
    /// will that comes due here from now on goes to this node's
    /// subscribers only.
    pub fn leaving_cluster(&self) {
        if let Some(r) = self.state.borrow_mut().remote.as_mut() {
            r.leaving = true;
        }
    }

    /// How far a will of session `slot` goes: to this node's subscribers
    /// only when the peers published it, or will (see `leaving_cluster`).
    pub(super) fn will_reach(remote: Option<&super::remote::Remote>, slot: &SessionSlot) -> Reach {
        match remote.is_some_and(|r| r.leaving || slot.will_of_last_run) {
            true => Reach::Here,
            false => Reach::Cluster,
        }
    }
}
