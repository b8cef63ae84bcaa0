//! A subscriber that falls behind slows its publishers down rather than
//! have their messages dropped.
//!
//! Shard-local, no I/O; on every shard, for the sessions it owns. When a
//! message read from a client's connection reaches an online session that
//! is behind ([`crate::session::Session::presses`]: half of
//! `mqtt.queue_messages_max` or `queue_bytes_max` waiting to be written or
//! in its queue's memory), the session's shard holds that connection: at
//! once when it is its own, with a [`MeshMsg::Hold`] when it is another
//! shard's. A held connection is not read (between two packets, by the
//! runtime) until every session that holds it releases it, which each
//! does once it is below a quarter of both limits, offline, or gone.
//! While a session holds connections, its bounds are twice the limits:
//! what publishers on other shards sent before the hold reached them is
//! taken rather than dropped.
//!
//! A hold lasts `mqtt.publisher_hold_ms` at most: then the connection is
//! read again (counted), and what does not fit the session's queue is
//! dropped as before (counted, and logged with the subscriber's client
//! id); a session that falls behind later, or another one, holds it again.
//! So a client that stopped reading but is not yet timed out, or two
//! clients each publishing to the other's full queue (whose reader, held,
//! does not read the acknowledgements that would make room), slow their
//! publishers down that long at a time, never for good. Time held does not
//! count against the publisher's keep-alive.
//!
//! Not held by anyone: a session by its own publishes; messages from other
//! nodes (their links have their own bound), wills, delayed publishes, and
//! a shared subscription's message passed on to another shard.

use std::num::NonZeroU64;
use std::time::{Duration, Instant};

use crate::hash::HashSet;

use super::mesh::{MeshMsg, Publisher};
use super::{ConnHandle, SessionKey, ShardCore, State};

/// An online session of this shard that is behind, and the connections
/// it holds.
#[derive(Debug)]
pub(super) struct Pressing {
    /// The session's connection when it fell behind (a later one under
    /// the same key starts afresh).
    conn: u64,
    /// The connections it holds, with their shard.
    held: HashSet<(usize, Publisher)>,
}

/// A hold or a release of a connection: when held, since when, and for
/// how long at most.
#[derive(Debug, Clone, Copy)]
pub(super) enum HoldChange {
    Hold { now: Instant, limit: Duration },
    Release,
}

impl ConnHandle {
    /// This connection as the publisher of what is read from it.
    pub(super) fn publisher(&self) -> Option<Publisher> {
        NonZeroU64::new(self.id).map(|conn| Publisher {
            key: self.key,
            conn,
        })
    }

    /// One session more holds this connection, or one releases it: the
    /// reader looks again when none is left. A new hold after the last
    /// one ran out holds it again from now.
    fn hold(&self, hold: HoldChange) {
        let holds = self.holds.get();
        match hold {
            HoldChange::Hold { now, limit } => {
                // Not held (yet), or the last hold ran out: held from now.
                if self.held(now, limit).is_none() {
                    self.held_since.set(Some(now));
                }
                self.holds.set(holds + 1);
            }
            HoldChange::Release if holds > 0 => {
                self.holds.set(holds - 1);
                if holds == 1 {
                    self.held_since.set(None);
                    self.drained.notify();
                }
            }
            HoldChange::Release => {}
        }
    }

    /// How much longer this connection's reader waits for the sessions
    /// that hold it (`limit`: `mqtt.publisher_hold_ms`); None when it
    /// reads.
    pub fn held(&self, now: Instant, limit: Duration) -> Option<Duration> {
        let since = self.held_since.get()?;
        limit
            .checked_sub(now.saturating_duration_since(since))
            .filter(|left| !left.is_zero())
    }

    /// True while some session holds this connection (waited for or not).
    pub fn is_held(&self) -> bool {
        self.holds.get() > 0
    }
}

impl ShardCore {
    /// `mqtt.publisher_hold_ms`: how long one hold lasts at most.
    pub fn publisher_hold(&self) -> Duration {
        Duration::from_millis(self.config.mqtt.publisher_hold_ms)
    }

    /// Session `key` just took a message read from connection `from` (on
    /// shard `from.0`): if it is behind, it holds `from` (once).
    pub(super) fn press(
        &self,
        st: &mut State,
        key: SessionKey,
        from: (usize, Publisher),
        now: Instant,
    ) {
        if self.config.mqtt.publisher_hold_ms == 0 || (from.0 == self.id && from.1.key == key) {
            return;
        }
        let Some(slot) = st.sessions.get(key) else {
            return;
        };
        let Some(conn) = slot.conn.as_ref().map(|c| c.id) else {
            return;
        };
        let pressing =
            !st.pressure.is_empty() && st.pressure.get(&key).is_some_and(|p| p.conn == conn);
        if !slot.session.presses(pressing) {
            if pressing {
                self.ease(st, key);
            }
            return;
        }
        if !pressing {
            // A session under this key whose connection went is not
            // behind: what it held goes.
            self.release_all(st, key);
            let pressing = Pressing {
                conn,
                held: HashSet::default(),
            };
            st.pressure.insert(key, pressing);
            if let Some(slot) = st.sessions.get_mut(key) {
                slot.session.set_holding(true);
            }
        }
        if st
            .pressure
            .get_mut(&key)
            .is_some_and(|p| p.held.insert(from))
        {
            let limit = self.publisher_hold();
            self.send_hold(st, from, HoldChange::Hold { now, limit });
        }
    }

    /// Session `key`, if it held connections, releases them once it is no
    /// longer behind (caught up, offline, gone).
    pub(super) fn ease(&self, st: &mut State, key: SessionKey) {
        if st.pressure.is_empty() {
            return; // the common case, on every step of every session
        }
        let Some(p) = st.pressure.get(&key) else {
            return;
        };
        let still = st.sessions.get(key).is_some_and(|slot| {
            slot.conn.as_ref().is_some_and(|c| c.id == p.conn) && slot.session.presses(true)
        });
        if !still {
            self.release_all(st, key);
        }
    }

    /// Session `key` holds nothing any more: every connection it held is
    /// released, and its bounds are the limits again.
    fn release_all(&self, st: &mut State, key: SessionKey) {
        let Some(p) = st.pressure.remove(&key) else {
            return;
        };
        if let Some(slot) = st.sessions.get_mut(key) {
            slot.session.set_holding(false);
        }
        for from in p.held {
            self.send_hold(st, from, HoldChange::Release);
        }
    }

    /// [`ShardCore::ease`] for every session that holds connections (the
    /// tick's look, for those whose end nothing else saw).
    pub(super) fn ease_all(&self, st: &mut State) {
        let keys: Vec<SessionKey> = st.pressure.keys().copied().collect();
        for key in keys {
            self.ease(st, key);
        }
    }

    /// Hold or release connection `to` (with its shard), here or there.
    fn send_hold(&self, st: &State, (shard, to): (usize, Publisher), hold: HoldChange) {
        if shard == self.id {
            Self::hold_connection(st, to, hold);
        } else {
            let hold = matches!(hold, HoldChange::Hold { .. });
            self.mesh.send(shard, MeshMsg::Hold { to, hold });
        }
    }

    /// Hold or release this shard's connection `to`, if it is still open.
    pub(super) fn hold_connection(st: &State, to: Publisher, hold: HoldChange) {
        let conn = st.sessions.get(to.key).and_then(|slot| slot.conn.as_ref());
        if let Some(conn) = conn.filter(|c| c.id == to.conn.get()) {
            conn.hold(hold);
        }
    }
}
