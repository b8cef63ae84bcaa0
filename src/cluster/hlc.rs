//! A hybrid logical clock: what orders writes made on different nodes
//! (retained messages, connection claims) without synchronised clocks.
//!
//! Sans-IO; each shard keeps its own. A stamp is the wall clock in Unix
//! milliseconds, pushed past every stamp the clock gave or saw, so an
//! event that follows another it knew of gets a greater stamp even when
//! its node's clock is behind.

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
