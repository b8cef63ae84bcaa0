//! Client text made safe to put in a log line or a packet, and a rate
//! limit for log lines a client can cause.
//!
//! Pure helpers with no clock reads; a [`LogGate`] lives with whatever it
//! limits (a session, a shard) and is shard-local like its owner.
//!
//! Anything a client sends (client ids, topics, filters, property strings)
//! is hostile in a log line: it may hold newlines that forge other lines,
//! terminal escapes, or 65,535 bytes. [`quote`] escapes every control
//! character and keeps a short prefix; [`cut`] bounds a string at a
//! character boundary for a packet field.

use std::fmt;
use std::time::{Duration, Instant};

/// Characters of client text a log line or reason string quotes at most.
pub const QUOTE_CHARS_MAX: usize = 64;

/// Bytes of a reason string the broker sends at most.
pub const REASON_STRING_BYTES_MAX: usize = 256;

/// `s` quoted for a log line: in double quotes, control characters, quotes
/// and backslashes escaped, at most [`QUOTE_CHARS_MAX`] characters, then
/// `…(+N bytes)` for what was left out.
pub fn quote(s: &str) -> Quoted<'_> {
    Quoted(s)
}

/// See [`quote`].
#[derive(Clone, Copy)]
pub struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for (shown, (i, c)) in self.0.char_indices().enumerate() {
            if shown == QUOTE_CHARS_MAX {
                write!(f, "…(+{} bytes)", self.0.len() - i)?;
                break;
            }
            if c.is_control() || c == '"' || c == '\\' {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        f.write_str("\"")
    }
}

/// The longest prefix of `s` of at most `max_bytes` bytes that ends on a
/// character boundary.
pub fn cut(s: &str, max_bytes: usize) -> &str {
    if s.len() <= max_bytes {
        return s;
    }
    let mut end = max_bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A token bucket for log lines: `burst` lines at once, then one per
/// `every`. Lines refused are counted and reported with the next one let
/// through.
#[derive(Debug, Clone)]
pub struct LogGate {
    every: Duration,
    burst: u32,
    tokens: u32,
    refilled: Option<Instant>,
    suppressed: u64,
    /// The time [`LogGate::tick`] last gave.
    ticked: Option<Instant>,
}

impl LogGate {
    /// A gate that lets `burst` lines through at once and one more per
    /// `every` after that.
    pub const fn new(burst: u32, every: Duration) -> LogGate {
        LogGate {
            every,
            burst,
            tokens: burst,
            refilled: None,
            suppressed: 0,
            ticked: None,
        }
    }

    /// The default for what one client causes: 5 lines, then one per 10 s.
    pub const fn per_client() -> LogGate {
        LogGate::new(5, Duration::from_secs(10))
    }

    /// May a line be logged at `now`? `Some(n)` says yes, `n` lines having
    /// been refused since the last one let through; `None` says no (and
    /// counts it).
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let since = self.refilled.get_or_insert(now);
        let elapsed = now.saturating_duration_since(*since);
        if !self.every.is_zero() && elapsed >= self.every {
            let periods = elapsed.as_nanos() / self.every.as_nanos();
            let add = u32::try_from(periods).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(add).min(self.burst);
            *since = now;
        }
        self.take_token()
    }

    /// Spend a token if there is one.
    fn take_token(&mut self) -> Option<u64> {
        if self.tokens == 0 {
            self.suppressed = self.suppressed.saturating_add(1);
            return None;
        }
        self.tokens -= 1;
        Some(std::mem::take(&mut self.suppressed))
    }

    /// May a line be logged now, the time being that of the caller's last
    /// [`LogGate::tick`]? For code that reads no clock: its gate refills
    /// as its ticks come.
    pub fn allow_ticked(&mut self) -> Option<u64> {
        match self.ticked {
            Some(now) => self.allow(now),
            None => self.take_token(),
        }
    }

    /// The caller's clock reading, for [`LogGate::allow_ticked`].
    pub fn tick(&mut self, now: Instant) {
        self.ticked = Some(now);
    }
}

/// ` (N similar lines suppressed)` when `n > 0`, for the end of a line.
pub fn suppressed_note(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} earlier lines suppressed)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_escapes_control_characters_and_cuts_long_text() {
        assert_eq!(quote("a\nb\"c\\").to_string(), r#""a\nb\"c\\""#);
        assert_eq!(quote("\u{1b}[31m").to_string(), r#""\u{1b}[31m""#);
        let long = "é".repeat(100);
        let q = quote(&long).to_string();
        assert!(q.starts_with("\"éé"), "{q}");
        assert!(q.ends_with("…(+72 bytes)\""), "{q}");
        assert_eq!(q.matches('é').count(), QUOTE_CHARS_MAX);
    }

    #[test]
    fn cut_stops_on_a_character_boundary() {
        assert_eq!(cut("abc", 10), "abc");
        assert_eq!(cut("aé", 2), "a");
        assert_eq!(cut("aé", 3), "aé");
        assert_eq!(cut("", 0), "");
    }

    #[test]
    fn the_gate_lets_a_burst_through_then_one_per_period_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut g = LogGate::new(2, Duration::from_secs(10));
        assert_eq!(g.allow(t0), Some(0));
        assert_eq!(g.allow(t0), Some(0));
        assert_eq!(g.allow(t0), None);
        assert_eq!(g.allow(t0 + Duration::from_secs(9)), None);
        assert_eq!(g.allow(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(g.allow(t0 + Duration::from_secs(10)), None);
        // A long quiet period refills only up to the burst.
        let later = t0 + Duration::from_secs(1000);
        assert_eq!(g.allow(later), Some(1));
        assert_eq!(g.allow(later), Some(0));
        assert_eq!(g.allow(later), None);
    }
}
