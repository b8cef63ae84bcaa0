//! One live connection per client id in the cluster: when a client
//! connects, its node claims the client id, and a node where the same
//! client id has a connection whose claim is older closes that one (5.0:
//! DISCONNECT 0x8E, session taken over).
//!
//! Sans-IO, the rule only. A claim is stamped by the home shard's
//! hybrid logical clock ([`Hlc`](super::hlc::Hlc)) when the connection
//! attaches, and sent to every peer as it happens
//! ([`Frame::Claims`](super::frame::Frame::Claims), acknowledged once
//! applied, so CONNACK can wait for every peer whose link is up) and
//! again, with every
//! live connection's, when a link comes up, so two connections that a
//! partition let live side by side meet when it heals. Peers keep no table
//! of claims: each compares a claim with its own live connection of that
//! client id, and [`wins`] orders them the same way on every node (the
//! greater stamp; for equal stamps the greater node name), so exactly the
//! latest connection stays.

use std::cmp::Ordering;

/// True when claim `new` (its stamp and node name) is later than `old`,
/// whose connection then closes.
pub fn wins(new: (u64, &str), old: (u64, &str)) -> bool {
    match new.0.cmp(&old.0) {
        Ordering::Greater => true,
        Ordering::Less => false,
        Ordering::Equal => new.1 > old.1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_later_claim_wins_and_a_tie_goes_the_same_way_on_both_nodes() {
        assert!(wins((2, "a"), (1, "b")));
        assert!(!wins((1, "b"), (2, "a")));
        assert!(wins((5, "b"), (5, "a")));
        assert!(!wins((5, "a"), (5, "b")));
        assert!(!wins((5, "a"), (5, "a")), "a claim does not close itself");
    }
}
