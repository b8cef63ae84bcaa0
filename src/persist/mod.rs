//! Durability: what the per-shard logs hold and how the broker's state is
//! rebuilt from them at start.
//!
//! - [`record`]: the record kinds and their binary form (sans-IO);
//! - [`image`]: one shard log replayed into the state it describes;
//! - [`recover`]: node-wide recovery before the shards start: replay every
//!   log, finish what a crash interrupted, re-home for the shard count in
//!   force, write the next generation;
//! - [`clock`]: Unix-time deadlines, so expiry counts across a restart;
//! - [`writer`]: appending records to a log.
//!
//! The shards write records through `shard::durable` while they run; each
//! writes only its own log.

pub mod clock;
pub mod image;
pub mod record;
pub mod recover;
pub mod writer;

pub use clock::WallClock;
pub use record::{Causes, Origin, Rec, Scope, Sid, Target, TargetState};
pub use writer::Writer;
