//! Wall-clock milliseconds for the log: deadlines (message expiry, session
//! expiry, will delay, delayed publishes) are stored as Unix time so they
//! count across a restart, and turned back into `Instant`s when read.
//!
//! A `WallClock` is a pair (instant, Unix ms) taken once; conversions go
//! through the monotonic clock, so a wall-clock step while running does not
//! move deadlines. Plain data, any thread.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Converts between `Instant` and Unix milliseconds; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WallClock {
    base: Instant,
    base_ms: u64,
}

impl WallClock {
    /// A clock anchored now.
    pub fn now() -> WallClock {
        let base_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        WallClock::at(Instant::now(), base_ms)
    }

    /// A clock where `instant` is `unix_ms` (tests use a fixed pair).
    pub fn at(instant: Instant, unix_ms: u64) -> WallClock {
        WallClock {
            base: instant,
            base_ms: unix_ms,
        }
    }

    /// Unix milliseconds of `t`.
    pub fn to_ms(&self, t: Instant) -> u64 {
        if t >= self.base {
            self.base_ms + (t - self.base).as_millis() as u64
        } else {
            self.base_ms
                .saturating_sub((self.base - t).as_millis() as u64)
        }
    }

    /// The `Instant` of Unix milliseconds `ms` (times before the anchor that
    /// `Instant` cannot express become the earliest it can).
    pub fn to_instant(&self, ms: u64) -> Instant {
        if ms >= self.base_ms {
            self.base + Duration::from_millis(ms - self.base_ms)
        } else {
            let back = Duration::from_millis(self.base_ms - ms);
            self.base.checked_sub(back).unwrap_or(self.base)
        }
    }

    /// The `Instant` of the anchor.
    pub fn anchor(&self) -> Instant {
        self.base
    }

    /// Unix milliseconds of the anchor.
    pub fn anchor_ms(&self) -> u64 {
        self.base_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_within_a_millisecond() {
        let t0 = Instant::now();
        let c = WallClock::at(t0, 1_000_000);
        assert_eq!(c.to_ms(t0), 1_000_000);
        assert_eq!(c.to_ms(t0 + Duration::from_millis(2500)), 1_002_500);
        assert_eq!(c.to_instant(1_002_500), t0 + Duration::from_millis(2500));
        // A later start reads the same deadline as the same wall time.
        let later = WallClock::at(t0 + Duration::from_secs(10), 1_010_000);
        assert_eq!(
            later.to_instant(1_002_500),
            t0 + Duration::from_millis(2500)
        );
    }
}
