//! The latency histograms a shard keeps (hdrhistogram, nanoseconds, two
//! significant figures, 1 µs to 60 s; longer values count as 60 s),
//! copied into its report and merged over the shards at a scrape.
//!
//! Shard-local; the times are handed in (the core reads no clock).

use std::time::Duration;

use hdrhistogram::Histogram;

/// Largest value kept, nanoseconds.
const HIGH_NS: u64 = 60_000_000_000;

/// One shard's histograms.
#[derive(Debug, Clone)]
pub struct Latencies {
    /// From routing a PUBLISH on its publisher's shard (or passing on a
    /// shared one) to handing it to this shard's subscriber sessions: 0 on
    /// the same shard, the crossing between shards otherwise.
    pub delivery: Histogram<u64>,
    /// One `fdatasync` of the log's files (power_safe).
    pub log_sync: Histogram<u64>,
    /// From the first record waiting for a sync to the sync done: the
    /// longest an acknowledgement (PUBACK, PUBREC) of that group was held
    /// (power_safe; kill_safe acknowledges in the step that logs).
    pub log_commit: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Latencies {
        let h = || Histogram::new_with_bounds(1, HIGH_NS, 2).expect("valid bounds");
        Latencies {
            delivery: h(),
            log_sync: h(),
            log_commit: h(),
        }
    }
}

impl Latencies {
    /// Add `other`'s counts to these (a scrape's merge).
    pub fn add(&mut self, other: &Latencies) {
        // Same bounds on every shard: adding cannot fail.
        let _ = self.delivery.add(&other.delivery);
        let _ = self.log_sync.add(&other.log_sync);
        let _ = self.log_commit.add(&other.log_commit);
    }
}

/// Count `d` in `h` (past the top: as the top).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(u64::try_from(d.as_nanos()).unwrap_or(HIGH_NS).max(1));
}
