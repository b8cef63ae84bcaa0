//! Retained messages across nodes: every node keeps every retained
//! message of the cluster, and the last writer wins by hybrid logical
//! clock.
//!
//! Sans-IO, the rules only. A retained store or delete gets a stamp from
//! the owning shard's [`Hlc`]: the wall clock in milliseconds, pushed past
//! every stamp the shard has stored or seen, so a write made after seeing
//! another is newer than it even when this node's clock is behind. The
//! stamp travels with the message ([`Frame::Retained`](super::frame::Frame::Retained))
//! and is kept in the log with it. Between two versions of a topic,
//! [`wins`] decides: the greater stamp, and for equal stamps (two nodes,
//! the same millisecond) the greater message bytes, so every node picks
//! the same one. A delete is a version too (an empty payload, kept as a
//! tombstone for a while so an older copy elsewhere cannot bring the
//! message back).

use std::cmp::Ordering;

use crate::message::Message;

/// A shard's hybrid logical clock, in Unix milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hlc {
    last: u64,
}

impl Hlc {
    /// A clock that has seen nothing.
    pub fn new() -> Hlc {
        Hlc::default()
    }

    /// The stamp of a write at wall time `wall_ms`: later than every
    /// stamp given or seen before.
    pub fn next(&mut self, wall_ms: u64) -> u64 {
        self.last = wall_ms.max(self.last.saturating_add(1));
        self.last
    }

    /// A stamp stored or received: later writes here come after it.
    pub fn observe(&mut self, stamp: u64) {
        self.last = self.last.max(stamp);
    }

    /// The last stamp given or seen.
    pub fn last(&self) -> u64 {
        self.last
    }
}

/// True when version `new` (its stamp and message) replaces `old`: a
/// greater stamp, or an equal one with greater message bytes (topic
/// aside, they are the same topic). Total and the same on every node.
pub fn wins(new: (u64, &Message), old: (u64, &Message)) -> bool {
    match new.0.cmp(&old.0) {
        Ordering::Greater => true,
        Ordering::Less => false,
        Ordering::Equal => tie_break(new.1, old.1) == Ordering::Greater,
    }
}

fn tie_break(a: &Message, b: &Message) -> Ordering {
    a.payload
        .cmp(&b.payload)
        .then((a.qos as u8).cmp(&(b.qos as u8)))
        .then_with(|| format!("{:?}", a.properties).cmp(&format!("{:?}", b.properties)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Properties, QoS};
    use bytes::Bytes;

    fn m(payload: &'static str) -> Message {
        Message {
            topic: "t".into(),
            payload: Bytes::from_static(payload.as_bytes()),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: Properties::default(),
            expires_at: None,
            publisher: None,
        }
    }

    #[test]
    fn a_write_after_seeing_another_is_newer_even_with_a_clock_behind() {
        let mut h = Hlc::new();
        assert_eq!(h.next(1_000), 1_000);
        assert_eq!(h.next(1_000), 1_001, "two writes in one millisecond");
        assert_eq!(h.next(900), 1_002, "the wall clock went back");
        h.observe(5_000);
        assert_eq!(h.next(1_100), 5_001, "after a stamp from a clock ahead");
        assert_eq!(h.last(), 5_001);
        h.observe(10);
        assert_eq!(h.next(6_000), 6_000);
    }

    #[test]
    fn the_last_writer_wins_and_ties_go_the_same_way_everywhere() {
        let (a, b) = (m("a"), m("b"));
        assert!(wins((2, &a), (1, &b)));
        assert!(!wins((1, &b), (2, &a)));
        // Equal stamps: the same answer from either side.
        assert!(wins((5, &b), (5, &a)));
        assert!(!wins((5, &a), (5, &b)));
        // The same version does not replace itself.
        assert!(!wins((5, &a), (5, &a.clone())));
        // A delete is a version like any other.
        let gone = m("");
        assert!(wins((6, &gone), (5, &a)));
        assert!(!wins((4, &gone), (5, &a)));
    }
}
