//! Delayed publishes: a PUBLISH to `$delayed/{seconds}/{topic}` is routed to
//! `{topic}` that many seconds later, from the publisher's shard.
//!
//! Shard-local. Bounded by this shard's share of
//! `storage.delayed_messages_max` (sessions refuse more with 0x97); logged
//! when the log is on, so they survive a restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::message::Message;

use super::routing::Source;
use super::{Shard, State};

impl Shard {
    /// Hold `message` for `delay_s` seconds.
    pub(super) fn delay(
        &self,
        st: &mut State,
        now: Instant,
        message: Arc<Message>,
        delay_s: u32,
        source: Source,
    ) {
        let id = st.next_delayed_id;
        st.next_delayed_id += 1;
        let due = now + Duration::from_secs(u64::from(delay_s));
        let from = source.qos2_packet_id.and_then(|pid| {
            let key = source.from?;
            Some((st.sessions.get(key)?.durable?.sid, pid))
        });
        Self::durable_delay(st, id, due, &message, from);
        st.delayed.insert((due, id), message);
        self.limits
            .status
            .delayed_full
            .set(st.delayed.len() >= self.delayed_max);
    }

    /// Route every delayed publish that is due.
    pub(super) fn send_due_delayed(&self, st: &mut State, now: Instant) {
        while let Some(entry) = st.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, id), message) = entry.remove_entry();
            let source = Source {
                delayed: Some(id),
                ..Source::default()
            };
            self.route(st, now, message, source);
        }
        self.limits
            .status
            .delayed_full
            .set(st.delayed.len() >= self.delayed_max);
    }
}
