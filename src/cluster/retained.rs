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

pub use super::hlc::Hlc;

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

/// Equal stamps: the payloads, then the whole messages as the log and
/// the bridge encode them (a 5.0 PUBLISH), byte by byte.
fn tie_break(a: &Message, b: &Message) -> Ordering {
    a.payload.cmp(&b.payload).then_with(|| {
        let encoded = |m: &Message| {
            let mut out = bytes::BytesMut::new();
            crate::codec::encode_publish(&m.publish_view(), crate::codec::Version::V5, &mut out);
            out
        };
        encoded(a).cmp(&encoded(b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(payload: &'static str) -> Message {
        Message::retained_for_test("t", payload.as_bytes())
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
        // Same payload, other properties: still one answer.
        let mut typed = m("a");
        typed.properties.content_type = Some("text/plain".into());
        assert_ne!(wins((5, &typed), (5, &a)), wins((5, &a), (5, &typed)));
        // A delete is a version like any other.
        let gone = m("");
        assert!(wins((6, &gone), (5, &a)));
        assert!(!wins((4, &gone), (5, &a)));
    }
}
