//! The one fan-out rule: who gets a message, at which QoS, with which
//! subscription identifiers, and which member of a shared subscription.
//!
//! Pure functions over the subscriptions a topic matched. Live routing (a
//! shard's subscriber trie) and recovery (every recovered session's
//! subscriptions) both call them, so a message routed again after a crash
//! reaches exactly whom it would have reached live.

use std::sync::Arc;

use smallvec::SmallVec;

use crate::codec::{QoS, SubOptions};
use crate::message::Message;

use super::SharedPick;

/// One subscription the message's topic matched.
#[derive(Debug, Clone, Copy)]
pub struct Match<'a, K> {
    /// Who holds it.
    pub session: K,
    /// Share name of a `$share/{group}/...` subscription.
    pub group: Option<&'a Arc<str>>,
    /// The filter (inside `$share/{group}/` for a shared one).
    pub filter: &'a Arc<str>,
    /// Its options as granted.
    pub options: &'a SubOptions,
    /// Its 5.0 Subscription Identifier.
    pub subscription_id: Option<u32>,
}

/// One delivery of a message to one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<K> {
    /// The session.
    pub session: K,
    /// The message's QoS lowered to the highest granted one.
    pub qos: QoS,
    /// RETAIN flag to send: Retain As Published on any of the merged
    /// subscriptions.
    pub retain: bool,
    /// Every merged subscription's identifier.
    pub subscription_ids: SmallVec<[u32; 1]>,
}

/// The members of one shared subscription a message matched.
pub type Members<K> = SmallVec<[Target<K>; 2]>;

/// The ordinary targets of one message. Two inline: the common message
/// has one or two subscribers on a shard, and a fan-out's list is moved
/// a few times on its way (eight inline made it 330 bytes, a tenth of the
/// memory moves on the pairs rows); a larger fan-out allocates once.
pub type Targets<K> = SmallVec<[Target<K>; 2]>;

/// What a message's fan-out over one set of subscriptions is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FanOut<K> {
    /// Ordinary subscribers, one target per session (overlapping
    /// subscriptions merged), ordered by session.
    pub ordinary: Targets<K>,
    /// For each shared subscription asked for, its members that matched,
    /// ordered by session ([`choose_member`] picks one). Empty (no
    /// allocation) for most messages.
    pub shared: Vec<(SharedPick, Members<K>)>,
}

/// Fan `message` out over the subscriptions its topic matched:
/// ordinary subscribers when `ordinary` (less a publisher's own No Local
/// subscriptions: `is_publisher`), and the members of each shared
/// subscription for which `wants_shared` says yes.
pub fn fan_out<'a, K: Copy + Ord>(
    message: &Message,
    matches: impl IntoIterator<Item = Match<'a, K>>,
    ordinary: bool,
    wants_shared: impl Fn(&SharedPick) -> bool,
    is_publisher: impl Fn(K) -> bool,
) -> FanOut<K> {
    let mut fan = Fan::new(message, ordinary, wants_shared, is_publisher);
    for m in matches {
        fan.add(m);
    }
    fan.finish()
}

/// [`fan_out`] one match at a time, for a caller whose matches come from
/// a walk (a trie's `for_each_match`) rather than an iterator.
pub struct Fan<'m, K, W, P> {
    message: &'m Message,
    ordinary: bool,
    wants_shared: W,
    is_publisher: P,
    out: FanOut<K>,
}

impl<'m, K, W, P> Fan<'m, K, W, P>
where
    K: Copy + Ord,
    W: Fn(&SharedPick) -> bool,
    P: Fn(K) -> bool,
{
    /// A fan-out of `message`; see [`fan_out`].
    pub fn new(message: &'m Message, ordinary: bool, wants_shared: W, is_publisher: P) -> Self {
        Fan {
            message,
            ordinary,
            wants_shared,
            is_publisher,
            out: FanOut {
                ordinary: SmallVec::new(),
                shared: Vec::new(),
            },
        }
    }

    /// One matched subscription.
    pub fn add(&mut self, m: Match<'_, K>) {
        let target = Target {
            session: m.session,
            qos: m.options.qos.min(self.message.qos),
            retain: self.message.retain && m.options.retain_as_published,
            subscription_ids: m.subscription_id.into_iter().collect(),
        };
        let Some(group) = m.group else {
            if self.ordinary && !(m.options.no_local && (self.is_publisher)(m.session)) {
                self.out.ordinary.push(target);
            }
            return;
        };
        let found = self
            .out
            .shared
            .iter_mut()
            .find(|(p, _)| *p.group == **group && *p.filter == **m.filter);
        match found {
            Some((_, members)) => members.push(target),
            None => {
                let pick = SharedPick {
                    group: group.clone(),
                    filter: m.filter.clone(),
                };
                if (self.wants_shared)(&pick) {
                    let mut members = SmallVec::new();
                    members.push(target);
                    self.out.shared.push((pick, members));
                }
            }
        }
    }

    /// The fan-out of everything added.
    pub fn finish(mut self) -> FanOut<K> {
        merge(&mut self.out.ordinary);
        for (_, members) in &mut self.out.shared {
            members.sort_by_key(|t| t.session);
        }
        self.out
    }
}

/// One target per session: the highest QoS, Retain As Published if any
/// says so, every subscription identifier. Ordered by session. In place,
/// not into a new list.
fn merge<K: Copy + Ord>(targets: &mut Targets<K>) {
    if targets.len() < 2 {
        return;
    }
    targets.sort_by_key(|t| t.session);
    let mut last = 0;
    for i in 1..targets.len() {
        if targets[i].session == targets[last].session {
            let ids = std::mem::take(&mut targets[i].subscription_ids);
            let (qos, retain) = (targets[i].qos, targets[i].retain);
            let kept = &mut targets[last];
            kept.qos = kept.qos.max(qos);
            kept.retain |= retain;
            kept.subscription_ids.extend(ids);
        } else {
            last += 1;
            targets.swap(last, i);
        }
    }
    targets.truncate(last + 1);
}

/// Which member of a shared subscription gets the message: round-robin
/// (`next` is the subscription's counter) over the members `preferred`
/// says yes to, or over all of them when it says yes to none. The index
/// into `members`, None when there are none.
pub fn choose_member<K>(
    members: &[Target<K>],
    next: &mut usize,
    preferred: impl Fn(&K) -> bool,
) -> Option<usize> {
    if members.is_empty() {
        return None;
    }
    let liked: SmallVec<[usize; 4]> = (0..members.len())
        .filter(|&i| preferred(&members[i].session))
        .collect();
    *next = next.wrapping_add(1);
    Some(if liked.is_empty() {
        *next % members.len()
    } else {
        liked[*next % liked.len()]
    })
}
