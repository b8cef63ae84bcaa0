//! The state one shard's log describes, rebuilt by replaying its records in
//! order. Used by recovery, before the shards start.
//!
//! Replay is forgiving about records that refer to objects it does not know:
//! compaction rewrites an object whole into a later segment and deletes the
//! earlier ones, so a delta can outlive the record that created its object.
//! Such deltas are already part of the rewritten state and are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::hash::HashMap;

use super::record::{Origin, Rec, Scope, SessionRec, Sid, Target, TargetState};
use crate::message::Message;

/// A message stored for this shard's sessions.
#[derive(Debug, Clone)]
pub struct MessageImage {
    /// The message.
    pub message: Arc<Message>,
    /// Its deliveries not yet finished, by session.
    pub targets: BTreeMap<Sid, Target>,
}

/// A message accepted on this shard whose routing was not known settled.
#[derive(Debug, Clone)]
pub struct AcceptedImage {
    /// Which subscribers it is for.
    pub scope: Scope,
    /// The message.
    pub message: Arc<Message>,
    /// When it was accepted.
    pub stamp_ms: u64,
}

/// What one shard's log holds; see the module docs.
#[derive(Debug, Default)]
pub struct ShardImage {
    /// Shard index of the log.
    pub shard: usize,
    /// Persistent sessions by sid.
    pub sessions: BTreeMap<Sid, SessionRec>,
    /// Stored messages with unfinished deliveries, by message id (their
    /// order of arrival on the shard).
    pub messages: BTreeMap<u64, MessageImage>,
    /// Message ids each session holds.
    by_session: HashMap<Sid, BTreeSet<u64>>,
    /// Sessions that moved here whole from another node: the latest
    /// claim such a move answered (`Rec::MovedIn`).
    pub moved_in: BTreeMap<Sid, u64>,
    /// Sessions whose client was told about them: their birth stamp
    /// (`Rec::Told`, the latest).
    pub told: BTreeMap<Sid, u64>,
    /// Accepted messages not known settled, by accept id.
    pub accepted: BTreeMap<u64, AcceptedImage>,
    /// Accepted messages up to here were applied everywhere.
    pub settled_upto: u64,
    /// Routed messages this shard applied (from any origin), with what it
    /// served of each.
    pub applied: HashMap<Origin, Scope>,
    /// Routed retained messages this shard stored, by origin.
    pub applied_retain: crate::hash::HashSet<Origin>,
    /// Retained messages of the topics this shard owned, with their stamps.
    pub retained: HashMap<Arc<str>, (Arc<Message>, u64)>,
    /// Delayed publishes by id: due time and message.
    pub delayed: BTreeMap<u64, (u64, Arc<Message>)>,
    /// Latest wall clock record: about when the broker stopped.
    pub last_ms: u64,
}

impl ShardImage {
    /// An empty image of shard `shard`.
    pub fn new(shard: usize) -> ShardImage {
        ShardImage {
            shard,
            ..ShardImage::default()
        }
    }

    /// Apply one record.
    pub fn apply(&mut self, rec: Rec) {
        match rec {
            Rec::Start { .. } => {}
            Rec::Clock { ms } => self.last_ms = self.last_ms.max(ms),
            Rec::Session(s) => {
                self.sessions.insert(s.sid, *s);
            }
            Rec::Subscribe { sid, filter, sub } => {
                if let Some(s) = self.sessions.get_mut(&sid) {
                    match s.subscriptions.iter_mut().find(|(f, _)| *f == filter) {
                        Some(e) => e.1 = sub,
                        None => s.subscriptions.push((filter, sub)),
                    }
                }
            }
            Rec::Unsubscribe { sid, filter } => {
                if let Some(s) = self.sessions.get_mut(&sid) {
                    s.subscriptions.retain(|(f, _)| *f != filter);
                }
            }
            Rec::Online {
                sid,
                expiry_s,
                will,
            } => {
                if let Some(s) = self.sessions.get_mut(&sid) {
                    s.offline_since_ms = None;
                    s.expiry_s = expiry_s;
                    s.will = will.map(|w| *w);
                    s.will_due_ms = None;
                }
            }
            Rec::Offline {
                sid,
                at_ms,
                expiry_s,
                will_due_ms,
            } => {
                if let Some(s) = self.sessions.get_mut(&sid) {
                    s.offline_since_ms = Some(at_ms);
                    s.expiry_s = expiry_s;
                    s.will_due_ms = will_due_ms;
                    if will_due_ms.is_none() {
                        s.will = None;
                    }
                }
            }
            Rec::WillDone { sid } => {
                if let Some(s) = self.sessions.get_mut(&sid) {
                    s.will = None;
                    s.will_due_ms = None;
                }
            }
            Rec::SessionEnd { sid } => self.end_session(sid),
            Rec::Qos2Done { sid, packet_id } => {
                if let Some(s) = self.sessions.get_mut(&sid) {
                    s.qos2_in.retain(|&p| p != packet_id);
                }
            }
            Rec::MovedIn { sid, claim } => {
                if self.sessions.contains_key(&sid) {
                    let latest = self.moved_in.entry(sid).or_default();
                    *latest = (*latest).max(claim);
                }
            }
            Rec::Told { sid, born: 0 } => {
                self.told.remove(&sid);
            }
            Rec::Told { sid, born } => {
                if self.sessions.contains_key(&sid) {
                    self.told.insert(sid, born);
                }
            }
            Rec::Message {
                id,
                origin,
                scope,
                message,
                targets,
            } => self.apply_message(id, origin, scope, message, targets),
            Rec::Sent { sid, id, packet_id } => self.set_state(sid, id, |st| {
                *st = TargetState::Inflight {
                    packet_id,
                    released: false,
                }
            }),
            Rec::Released { sid, id } => self.set_state(sid, id, |st| {
                if let TargetState::Inflight { released, .. } = st {
                    *released = true;
                }
            }),
            Rec::Done { sid, id } => self.finish(sid, id),
            Rec::Accepted {
                id,
                scope,
                message,
                stamp_ms,
                causes,
            } => {
                self.remember_qos2(causes.qos2_from);
                if let Some(o) = causes.passes_on {
                    // Passing a pick on is applying it here.
                    let seen = self.applied.entry(o).or_default();
                    seen.shared.extend(scope.shared.iter().cloned());
                }
                if let Some(d) = causes.delayed {
                    self.delayed.remove(&d);
                }
                if let Some(s) = causes.will_of.and_then(|sid| self.sessions.get_mut(&sid)) {
                    s.will = None;
                    s.will_due_ms = None;
                }
                if id > self.settled_upto {
                    let a = AcceptedImage {
                        scope,
                        message,
                        stamp_ms,
                    };
                    self.accepted.insert(id, a);
                }
            }
            Rec::Settled { upto } => {
                self.settled_upto = self.settled_upto.max(upto);
                self.accepted = match self.settled_upto.checked_add(1) {
                    Some(after) => self.accepted.split_off(&after),
                    None => Default::default(),
                };
            }
            Rec::Retain {
                message,
                stamp_ms,
                origin,
            } => {
                if let Some(o) = origin {
                    self.applied_retain.insert(o);
                }
                if message.payload.is_empty() {
                    self.retained.remove(&message.topic);
                } else {
                    self.retained
                        .insert(message.topic.clone(), (message, stamp_ms));
                }
            }
            Rec::Delayed {
                id,
                due_ms,
                message,
                from,
            } => {
                self.remember_qos2(from);
                self.delayed.insert(id, (due_ms, message));
            }
            Rec::DelayedDone { id } => {
                self.delayed.remove(&id);
            }
        }
    }

    /// A QoS 2 publisher's packet id, remembered until its PUBREL.
    fn remember_qos2(&mut self, from: Option<(Sid, u16)>) {
        let Some((sid, pid)) = from else {
            return;
        };
        if let Some(s) = self.sessions.get_mut(&sid) {
            if !s.qos2_in.contains(&pid) {
                s.qos2_in.push(pid);
            }
        }
    }

    fn apply_message(
        &mut self,
        id: u64,
        origin: Option<Origin>,
        scope: Scope,
        message: Option<Arc<Message>>,
        targets: Vec<Target>,
    ) {
        if let Some(o) = origin {
            let seen = self.applied.entry(o).or_default();
            seen.ordinary |= scope.ordinary;
            seen.shared.extend(scope.shared);
        }
        let Some(message) = message else {
            return;
        };
        // Several records of one id merge: targets come in chunks, and a
        // rewrite carries each target's current state. A target's session
        // may be unknown here yet: compaction can write a session's whole
        // record after messages it holds (see `deliveries_of`).
        let entry = self.messages.entry(id).or_insert_with(|| MessageImage {
            message,
            targets: BTreeMap::new(),
        });
        for t in targets {
            self.by_session.entry(t.sid).or_default().insert(id);
            entry.targets.insert(t.sid, t);
        }
        if entry.targets.is_empty() {
            self.messages.remove(&id);
        }
    }

    fn set_state(&mut self, sid: Sid, id: u64, f: impl FnOnce(&mut TargetState)) {
        if let Some(t) = self
            .messages
            .get_mut(&id)
            .and_then(|m| m.targets.get_mut(&sid))
        {
            f(&mut t.state);
        }
    }

    fn finish(&mut self, sid: Sid, id: u64) {
        let Some(m) = self.messages.get_mut(&id) else {
            return;
        };
        m.targets.remove(&sid);
        if m.targets.is_empty() {
            self.messages.remove(&id);
        }
        if let Some(ids) = self.by_session.get_mut(&sid) {
            ids.remove(&id);
        }
    }

    fn end_session(&mut self, sid: Sid) {
        self.sessions.remove(&sid);
        self.moved_in.remove(&sid);
        self.told.remove(&sid);
        for id in self.by_session.remove(&sid).unwrap_or_default() {
            self.finish(sid, id);
        }
    }

    /// A session's stored deliveries with their message ids, in arrival
    /// order.
    pub fn deliveries_of(&self, sid: Sid) -> Vec<(u64, Arc<Message>, Target)> {
        self.by_session
            .get(&sid)
            .into_iter()
            .flatten()
            .filter_map(|id| {
                let m = self.messages.get(id)?;
                Some((*id, m.message.clone(), m.targets.get(&sid)?.clone()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use smallvec::SmallVec;

    use super::*;
    use crate::codec::QoS;
    use crate::persist::Causes;

    fn msg(topic: &str) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from_static(b"x"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
            expires_at: None,
            publisher: None,
            id: 0,
            late: false,
        })
    }

    fn session(sid: Sid) -> Rec {
        Rec::Session(Box::new(SessionRec {
            sid,
            client_id: format!("c{sid}"),
            expiry_s: 60,
            offline_since_ms: None,
            subscriptions: vec![],
            qos2_in: vec![],
            will: None,
            will_due_ms: None,
        }))
    }

    fn target(sid: Sid) -> Target {
        Target {
            sid,
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: SmallVec::new(),
            state: TargetState::Queued,
        }
    }

    #[test]
    fn deliveries_follow_sent_done_and_session_end() {
        let mut img = ShardImage::new(0);
        img.apply(session(1));
        img.apply(session(2));
        for id in [10, 11] {
            img.apply(Rec::Message {
                id,
                origin: Some(Origin {
                    shard: 1,
                    id: id + 100,
                }),
                scope: Scope::everyone(),
                message: Some(msg("t")),
                targets: vec![target(1), target(2), target(3)],
            });
        }
        img.apply(Rec::Sent {
            sid: 1,
            id: 10,
            packet_id: 7,
        });
        img.apply(Rec::Done { sid: 2, id: 10 });
        let d1 = img.deliveries_of(1);
        assert_eq!(d1.len(), 2);
        assert_eq!(
            d1[0].2.state,
            TargetState::Inflight {
                packet_id: 7,
                released: false
            }
        );
        assert_eq!(img.deliveries_of(2).len(), 1, "10 is done for session 2");
        // Session 3's whole record comes after its messages (compaction
        // rewrote it): its deliveries count once it appears.
        img.apply(session(3));
        assert_eq!(img.deliveries_of(3).len(), 2);
        for sid in 1..=3 {
            img.apply(Rec::SessionEnd { sid });
        }
        assert!(img.messages.is_empty(), "no target left");
        assert!(img.applied.contains_key(&Origin { shard: 1, id: 110 }));
    }

    #[test]
    fn a_session_s_marks_follow_it_and_end_with_it() {
        let mut img = ShardImage::new(0);
        // A mark before its session (or after its end) names nothing.
        img.apply(Rec::Told { sid: 1, born: 5 });
        img.apply(session(1));
        img.apply(Rec::MovedIn { sid: 1, claim: 9 });
        img.apply(Rec::MovedIn { sid: 1, claim: 8 });
        img.apply(Rec::Told { sid: 1, born: 7 });
        img.apply(Rec::Told { sid: 1, born: 6 });
        assert_eq!(img.moved_in.get(&1), Some(&9), "the latest claim");
        assert_eq!(img.told.get(&1), Some(&6), "the last birth told");
        img.apply(Rec::Told { sid: 1, born: 0 });
        assert!(img.told.is_empty(), "it took a birth never told");
        img.apply(Rec::Told { sid: 1, born: 6 });
        img.apply(Rec::SessionEnd { sid: 1 });
        img.apply(Rec::Told { sid: 1, born: 10 });
        assert!(img.moved_in.is_empty() && img.told.is_empty());
    }

    #[test]
    fn a_forward_that_passes_a_pick_on_is_proof_the_pick_was_applied() {
        let mut img = ShardImage::new(1);
        let pick = crate::router::SharedPick {
            group: "g".into(),
            filter: "t/+".into(),
        };
        let parent = Origin { shard: 0, id: 9 };
        img.apply(Rec::Accepted {
            id: 2,
            scope: Scope {
                ordinary: false,
                shared: SmallVec::from_buf([pick.clone()]),
                ..Scope::default()
            },
            message: msg("t/1"),
            stamp_ms: 1,
            causes: Causes {
                passes_on: Some(parent),
                ..Causes::default()
            },
        });
        // With no marker after it (a power cut took it), the forward
        // alone says this shard answers for the parent's pick.
        let seen = &img.applied[&parent];
        assert!(!seen.ordinary);
        assert_eq!(seen.shared.as_slice(), &[pick]);
        assert!(
            img.accepted.contains_key(&2),
            "the forward itself is unsettled"
        );
    }

    #[test]
    fn settled_accepts_go_and_a_compacted_rewrite_replaces() {
        let mut img = ShardImage::new(0);
        for id in 1..=3 {
            img.apply(Rec::Accepted {
                id,
                scope: Scope::everyone(),
                message: msg("a"),
                stamp_ms: id,
                causes: Default::default(),
            });
        }
        img.apply(Rec::Settled { upto: 2 });
        assert_eq!(img.accepted.keys().copied().collect::<Vec<_>>(), vec![3]);
        img.apply(session(4));
        img.apply(Rec::Subscribe {
            sid: 4,
            filter: "x".into(),
            sub: Default::default(),
        });
        // A compaction rewrite of the session replaces its state whole.
        img.apply(session(4));
        assert!(img.sessions[&4].subscriptions.is_empty());
    }
}
