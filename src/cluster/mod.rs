//! Several nodes acting as one broker.
//!
//! Node-wide. What is here so far: who a node is ([`node`]: its name,
//! address and incarnation, kept in the data directory and bumped at every
//! start) and which nodes are up ([`membership`]: SWIM failure detection
//! through the `foca` crate, driven without I/O by shard 0's runtime and by
//! the simulator in `tests/membership.rs`). The bridge links between shard
//! *i* of every node, route replication and session ownership build on
//! these (see the cluster issue for what remains).

pub mod frame;
pub mod link;
pub mod membership;
pub mod node;
pub mod routes;
