//! Several nodes acting as one broker.
//!
//! Node-wide values and sans-IO protocols; the runtime (`shard::runtime`)
//! does their I/O and the shard core (`shard::ShardCore`, `shard::BridgeOut`)
//! their routing. Here:
//!
//! - [`node`]: who a node is (name, address, shards) and its incarnation,
//!   kept in the data directory and bumped at every start;
//! - [`membership`]: which nodes are up, SWIM through the `foca` crate,
//!   served by shard 0 (simulated in `tests/membership.rs`);
//! - [`frame`] and [`link`]: the bridge's wire format and one link's
//!   protocol between shard *i* of a node and shard *i* mod *n* of a peer;
//! - [`peers`]: a shard's outbound links to its peers (dials, backoff,
//!   frames waiting for a link, which run a link belongs to);
//! - [`routes`]: a node's route table as its peers hold it, replicated by
//!   snapshot and numbered changes (simulated in `tests/bridge.rs`);
//! - [`wills`]: the wills of a shard's clients as its peers hold them, to
//!   publish if the node's run ends without it (simulated there too);
//! - [`hlc`]: the hybrid logical clock that orders writes across nodes;
//! - [`retained`]: the rules that keep every node's copy of the retained
//!   messages the same (the last writer wins);
//! - [`claims`]: which of two connections with one client id on two nodes
//!   stays (the later claim);
//! - [`quorum`]: the cluster's members, and whether the nodes up are a
//!   majority (the minority side of a partition refuses new CONNECTs);
//! - [`secret`]: the shared secret that membership datagrams and link
//!   handshakes prove (`cluster.secret_file`).
//!
//! Not yet: sessions and replication across nodes (the cluster issue
//! lists them).

pub mod claims;
pub mod frame;
pub mod hlc;
pub mod link;
pub mod membership;
pub mod node;
pub mod peers;
pub mod quorum;
pub mod retained;
pub mod routes;
pub mod secret;
pub mod wills;
