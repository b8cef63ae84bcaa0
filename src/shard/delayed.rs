//! Delayed publishes: a PUBLISH to `$delayed/{seconds}/{topic}` is routed to
//! `{topic}` that many seconds later, from the publisher's shard (after a
//! restart, from the shard recovery gave it: the topic's home shard).
//!
//! Shard-local. Bounded by this shard's share of
//! `storage.delayed_messages_max` (sessions refuse more with 0x97); logged
//! when the log is on, so they survive a restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::message::Message;

use super::routing::{Reach, Source};
use super::{ShardCore, State};

impl ShardCore {
    /// Hold `message` for `delay_s` seconds. False when a QoS 1/2 one could
    /// not be logged (the log is full): the publisher is refused.
    pub(super) fn delay(
        &self,
        st: &mut State,
        now: Instant,
        message: Arc<Message>,
        delay_s: u32,
        source: Source,
    ) -> bool {
        let id = st.next_delayed_id;
        st.next_delayed_id += 1;
        let due = now + Duration::from_secs(u64::from(delay_s));
        let from = source
            .qos2_packet_id
            .and_then(|pid| Some((Self::durable_sid(st, source.from?)?, pid)));
        if !Self::durable_delay(st, id, due, &message, from) {
            return false;
        }
        Self::hold_delayed(st, due, id, message);
        self.note_delayed_count(st);
        true
    }

    /// Hold delayed publish `id` until `due`, counting its bytes.
    pub(super) fn hold_delayed(st: &mut State, due: Instant, id: u64, message: Arc<Message>) {
        st.delayed_bytes += message.cost_bytes() as u64;
        st.delayed.insert((due, id), message);
    }

    /// Take out the first delayed publish due by `now`, if any.
    fn take_due_delayed(st: &mut State, now: Instant) -> Option<(u64, Arc<Message>)> {
        let entry = st.delayed.first_entry().filter(|e| e.key().0 <= now)?;
        let ((_, id), message) = entry.remove_entry();
        st.delayed_bytes -= message.cost_bytes() as u64;
        Some((id, message))
    }

    /// Route every delayed publish that is due.
    pub(super) fn send_due_delayed(&self, st: &mut State, now: Instant) {
        while let Some((id, message)) = Self::take_due_delayed(st, now) {
            let source = Source {
                delayed: Some(id),
                ..Source::default()
            };
            // (Numbered again if it has to wait again.)
            let message = Self::number_message(st, message);
            if !self.route(st, now, message.clone(), source, Reach::Cluster) {
                // The log is full: try again in a second.
                let due = now + Duration::from_secs(1);
                Self::durable_delay_moved(st, id, due);
                Self::hold_delayed(st, due, id, message);
                break;
            }
        }
        self.note_delayed_count(st);
    }

    /// Tell the sessions whether this shard holds its share of delayed
    /// publishes (count or bytes); count each time the byte share is reached.
    fn note_delayed_count(&self, st: &mut State) {
        let bytes_full = st.delayed_bytes >= self.delayed_bytes_max;
        let full = st.delayed.len() >= self.delayed_max || bytes_full;
        if bytes_full && !self.limits.status.delayed_full.get() {
            st.stats.delayed_bytes_full += 1;
        }
        self.limits.status.delayed_full.set(full);
    }
}
