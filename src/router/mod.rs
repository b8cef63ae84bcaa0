//! Routing data structures of one shard.
//!
//! This module owns:
//! - [`topic`]: MQTT topic rules — validation of topic names and filters,
//!   shared subscription (`$share/{group}/{filter}`) parsing, and the
//!   reference matcher [`topic::matches`] that defines the semantics the
//!   other structures implement;
//! - [`FilterTrie`]: the subscription filter trie, used both as each
//!   shard's subscriber trie (key = session) and as the route replica
//!   (key = shard id, answering "which shards want this topic");
//! - [`RetainedStore`]: the retained-message store for the topics a shard
//!   owns, searchable by filter without a full scan;
//! - [`fanout`]: the one rule of who gets a message, at which QoS, with
//!   which subscription identifiers, and which shared member, used by live
//!   routing and recovery alike.
//!
//! - [`home_shard`]: which shard owns a client id's session or a retained
//!   topic (a stable hash, the same on every node and every run).
//!
//! Shard-local: each shard owns its own instances. They are plain
//! single-threaded data structures — no locks, no atomics, no I/O.

mod entries;
pub mod fanout;
pub mod retained;
pub mod topic;
pub mod trie;

#[cfg(test)]
mod tests;

pub use entries::EntriesIter;
pub use fanout::{choose_member, fan_out, Fan, FanOut, Match};
pub use retained::{MatchWalk, RetainedStore};
pub use topic::{
    has_wildcard, matches, parse_delayed, parse_shared, validate_topic_filter, validate_topic_name,
    TopicError,
};
pub use trie::FilterTrie;

use std::sync::Arc;

/// A full filter split into its share name (if `$share/{group}/...`) and
/// the filter inside; anything else is its own filter.
pub fn split_shared(filter: &str) -> (Option<Arc<str>>, &str) {
    match parse_shared(filter) {
        Ok(Some((g, f))) => (Some(Arc::<str>::from(g)), f),
        _ => (None, filter),
    }
}

/// One shared subscription: a share name and the filter inside
/// `$share/{group}/{filter}`. Members of one group with different filters
/// are different shared subscriptions.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SharedPick {
    /// Share name.
    pub group: Arc<str>,
    /// Filter inside `$share/{group}/`.
    pub filter: Arc<str>,
}

/// Stable hash used to place client ids and retained topics on shards
/// (FNV-1a, 64 bit): the same on every node and every run.
pub fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The home shard of a client id (where its session lives) or of a retained
/// topic (which shard stores it), among `shards`.
pub fn home_shard(key: &str, shards: usize) -> usize {
    (stable_hash(key) % shards as u64) as usize
}
