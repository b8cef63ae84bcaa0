//! shardmq: a thread-per-core, shared-nothing MQTT 3.1 / 3.1.1 / 5.0 broker.
//!
//! ```text
//!  socket ─▶ shard::runtime (reader)  ─▶ codec::decode ─▶ session (sans-IO)
//!                                                              │ actions
//!        ┌─────────────────────────────────────────────────────┘
//!        ▼
//!  shard::routing: route replica match ─┬─▶ local subscriber trie ─▶ sessions
//!                                       └─▶ mesh batch per shard ─▶ their tries
//!  session transmit ─▶ codec::encode ─▶ shard::runtime (writer)  ─▶ socket
//!
//!  shard::durable ─▶ persist (records) ─▶ log (this shard's mmap segments)
//!  start: persist::recover reads every log ─▶ shard::restore
//! ```
//!
//! Each shard is a glommio executor pinned to a core with its own io_uring,
//! listener (SO_REUSEPORT), sessions, subscriber trie, route replica, part
//! of the retained store and append-only log. A connection moves to its client's home shard
//! (`hash(client_id) % shards`) once CONNECT is read. Shards exchange only
//! batched messages over bounded SPSC lanes. See `DESIGN.md` in the shared
//! folder for the whole picture.
//!
//! Nodes of a cluster find each other through `cluster::membership` (SWIM,
//! on shard 0) and link shard *i* to shard *i* mod *n* of every peer
//! (`cluster::link`, `cluster::frame`); route tables cross through shard 0
//! (`cluster::routes`), messages through each shard's links
//! (`shard::BridgeOut`).
//!
//! `codec`, `router`, `session`, `persist::record`, `cluster` (but for
//! the data directory's `NODE` file, through the log's disk) and the
//! shard's core (`shard::ShardCore`) do no I/O and read no clock; `shard::runtime` and
//! `broker` are the only modules that know the runtime (glommio);
//! `log` does plain blocking file I/O (mapped writes, `fallocate`) and
//! `persist::recover` reads and writes the logs before the shards start.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod auth;
pub mod broker;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod hash;
pub mod http;
pub mod listen;
pub mod log;
pub mod message;
pub mod metrics;
pub mod persist;
pub mod router;
pub mod session;
pub mod shard;
pub mod sys;
pub mod text;
pub mod tls;
pub mod ws;

pub use broker::{Broker, StartError, StopSummary};
pub use config::Config;
pub use shard::home_shard;
