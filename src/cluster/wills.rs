//! Wills across nodes: every shard tells each peer the wills of its
//! clients, so that when a node's run ends without it (killed, crashed,
//! cut off for good) the survivors publish them.
//!
//! Sans-IO. The sending side is a shard's [`WillExport`]: the will each of
//! its clients has now, sent whole when a link to a peer comes up
//! ([`WillExport::snapshot`]) and then change by change
//! ([`Frame::WillSet`], [`Frame::WillClear`]) on that link, in order. No
//! sequence numbers are needed: a change is the new value of one client's
//! entry, so one that reaches the peer twice (queued before the snapshot
//! that already has it) leaves the same table. The receiving side is a
//! [`WillImport`] per sending shard of each peer, on the shard that link
//! arrives at; it keeps the table it had while a link is down, and a new
//! snapshot replaces it whole.
//!
//! Each surviving node publishes a dead run's wills to its own
//! subscribers only (see `shard::remote`), so every subscriber in the
//! cluster gets each will once without the survivors agreeing on anything.

use std::sync::Arc;
use std::time::Instant;

use thiserror::Error;

use super::frame::{Frame, WillEntry};
use crate::hash::HashMap;

/// Bytes a will takes in a snapshot part, besides its topic and payload.
const ENTRY_OVERHEAD_BYTES: usize = 32;

/// The wills of one shard's clients, as its peers hold them.
#[derive(Debug, Default)]
pub struct WillExport {
    /// By client id: the entry, and for a will already waiting for its
    /// delay, when it is due (a snapshot sends the time left then).
    entries: HashMap<Arc<str>, (WillEntry, Option<Instant>)>,
}

impl WillExport {
    /// An empty export.
    pub fn new() -> WillExport {
        WillExport::default()
    }

    /// `entry.client_id` has this will now (due at `due_at`, if it waits
    /// for its delay already): the change for every link up.
    pub fn set(&mut self, mut entry: WillEntry, due_at: Option<Instant>) -> Frame {
        entry.waiting = due_at.is_some();
        self.entries
            .insert(entry.client_id.clone(), (entry.clone(), due_at));
        Frame::WillSet(Box::new(entry))
    }

    /// `client_id` has no will now: the change for every link up, if it
    /// had one.
    pub fn clear(&mut self, client_id: &str) -> Option<Frame> {
        let (client_id, _) = self.entries.remove_entry(client_id)?;
        Some(Frame::WillClear { client_id })
    }

    /// The wills held now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no client has a will.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What a link that comes up at `now` sends first: every will, in
    /// parts of about `chunk_bytes` (at least one part, so an empty table
    /// replaces a stale one too).
    pub fn snapshot(&self, chunk_bytes: usize, now: Instant) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut part = Vec::new();
        let mut bytes = 0;
        for (e, due_at) in self.entries.values() {
            bytes += entry_bytes(e);
            let mut e = e.clone();
            if let Some(at) = due_at {
                e.delay_ms = millis(at.saturating_duration_since(now));
            }
            part.push(e);
            if bytes >= chunk_bytes {
                frames.push(Frame::WillSnapshot {
                    wills: std::mem::take(&mut part),
                    first: frames.is_empty(),
                    last: false,
                });
                bytes = 0;
            }
        }
        frames.push(Frame::WillSnapshot {
            wills: part,
            first: frames.is_empty(),
            last: true,
        });
        frames
    }
}

/// A duration in whole milliseconds.
pub fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn entry_bytes(e: &WillEntry) -> usize {
    let p = &e.will.properties;
    let properties = crate::message::user_properties_bytes(p)
        + p.correlation_data.as_ref().map_or(0, |c| c.len())
        + p.response_topic.as_ref().map_or(0, |t| t.len())
        + p.content_type.as_ref().map_or(0, |t| t.len());
    e.client_id.len()
        + e.will.topic.len()
        + e.will.payload.len()
        + properties
        + ENTRY_OVERHEAD_BYTES
}

/// A will frame that cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WillError {
    /// More wills than one peer shard may leave here.
    #[error("more than {max} wills from one shard of a peer (cluster.peer_wills_max)")]
    TooMany {
        /// The bound.
        max: usize,
    },
    /// More bytes of wills than one peer shard may leave here.
    #[error(
        "more than {max} bytes of wills from one shard of a peer (cluster.peer_wills_bytes_max)"
    )]
    TooLarge {
        /// The bound.
        max: usize,
    },
    /// A snapshot part without its first part.
    #[error("a will snapshot part without its start")]
    OutOfOrder,
    /// Not a will frame.
    #[error("not a will frame")]
    NotWills,
}

/// What this shard holds of one peer shard's wills.
#[derive(Debug)]
pub struct WillImport {
    entries: Table,
    /// A snapshot being received.
    loading: Option<Table>,
    max: usize,
    bytes_max: usize,
}

/// Wills by client id (with, for one already waiting for its delay, when
/// it is due), and their bytes.
#[derive(Debug, Default)]
struct Table {
    wills: HashMap<Arc<str>, (WillEntry, Option<Instant>)>,
    bytes: usize,
}

impl Table {
    /// Keep `w`, received at `now`; the will it replaces.
    fn insert(&mut self, w: &WillEntry, now: Instant) -> Option<(WillEntry, Option<Instant>)> {
        let due = w
            .waiting
            .then(|| now + std::time::Duration::from_millis(w.delay_ms));
        self.insert_due(w.clone(), due)
    }

    fn insert_due(
        &mut self,
        w: WillEntry,
        due: Option<Instant>,
    ) -> Option<(WillEntry, Option<Instant>)> {
        self.bytes += entry_bytes(&w);
        let old = self.wills.insert(w.client_id.clone(), (w, due));
        if let Some((old, _)) = &old {
            self.bytes -= entry_bytes(old);
        }
        old
    }

    fn remove(&mut self, client_id: &str) {
        if let Some((old, _)) = self.wills.remove(client_id) {
            self.bytes -= entry_bytes(&old);
        }
    }

    /// Whether the table is within `max` wills and `bytes_max` bytes.
    fn check(&self, max: usize, bytes_max: usize) -> Result<(), WillError> {
        if self.wills.len() > max {
            return Err(WillError::TooMany { max });
        }
        if self.bytes > bytes_max {
            return Err(WillError::TooLarge { max: bytes_max });
        }
        Ok(())
    }
}

impl WillImport {
    /// An empty table that takes at most `max` wills of at most
    /// `bytes_max` bytes in all (topics, payloads, client ids).
    pub fn new(max: usize, bytes_max: usize) -> WillImport {
        WillImport {
            entries: Table::default(),
            loading: None,
            max,
            bytes_max,
        }
    }

    /// Apply a will frame from the peer shard's link, read at `now`.
    pub fn apply(&mut self, frame: &Frame, now: Instant) -> Result<(), WillError> {
        let (max, bytes_max) = (self.max, self.bytes_max);
        match frame {
            Frame::WillSnapshot { wills, first, last } => {
                if *first {
                    self.loading = Some(Table::default());
                }
                let table = self.loading.as_mut().ok_or(WillError::OutOfOrder)?;
                for w in wills {
                    table.insert(w, now);
                }
                if let Err(e) = table.check(max, bytes_max) {
                    self.loading = None;
                    return Err(e);
                }
                if *last {
                    self.entries = self.loading.take().unwrap_or_default();
                }
            }
            Frame::WillSet(w) => {
                let table = self.loading.as_mut().unwrap_or(&mut self.entries);
                let old = table.insert(w, now);
                if let Err(e) = table.check(max, bytes_max) {
                    // Refused: the will it would replace stays.
                    table.remove(&w.client_id);
                    if let Some((old, due)) = old {
                        table.insert_due(old, due);
                    }
                    return Err(e);
                }
            }
            Frame::WillClear { client_id } => {
                let table = self.loading.as_mut().unwrap_or(&mut self.entries);
                table.remove(client_id);
            }
            _ => return Err(WillError::NotWills),
        }
        Ok(())
    }

    /// The wills held (of the last complete snapshot and the changes
    /// since).
    pub fn entries(&self) -> impl Iterator<Item = &WillEntry> {
        self.entries.wills.values().map(|(w, _)| w)
    }

    /// How many wills are held.
    pub fn len(&self) -> usize {
        self.entries.wills.len()
    }

    /// Their bytes (topics, payloads, client ids and a fixed overhead).
    pub fn bytes(&self) -> usize {
        self.entries.bytes
    }

    /// True when none are held.
    pub fn is_empty(&self) -> bool {
        self.entries.wills.is_empty()
    }

    /// The peer's run ended: every will held, to publish, with when it is
    /// due if it was waiting for its delay already (else its delay counts
    /// from now); the table is empty after.
    pub fn take(&mut self) -> Vec<(WillEntry, Option<Instant>)> {
        self.loading = None;
        let table = std::mem::take(&mut self.entries);
        table.wills.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Properties, QoS, Will};
    use bytes::Bytes;

    impl WillImport {
        fn apply_now(&mut self, frame: &Frame) -> Result<(), WillError> {
            self.apply(frame, Instant::now())
        }
    }

    fn entry(client: &str, payload: &'static str) -> WillEntry {
        WillEntry {
            client_id: Arc::from(client),
            will: Will {
                topic: Arc::from("status"),
                payload: Bytes::from_static(payload.as_bytes()),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Properties::default(),
            },
            delay_ms: 0,
            waiting: false,
        }
    }

    fn payloads(import: &WillImport) -> Vec<String> {
        let mut v: Vec<String> = import
            .entries()
            .map(|e| {
                format!(
                    "{}={}",
                    e.client_id,
                    String::from_utf8_lossy(&e.will.payload)
                )
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_snapshot_then_changes_rebuild_the_table_and_a_repeat_changes_nothing() {
        let mut export = WillExport::new();
        let mut import = WillImport::new(100, 1 << 20);
        for i in 0..10 {
            export.set(entry(&format!("c{i}"), "gone"), None);
        }
        let set = export.set(entry("c1", "again"), None);
        let clear = export.clear("c2").unwrap();
        assert!(export.clear("c2").is_none(), "nothing to clear twice");
        // A link comes up with the table as it is now, in small parts ...
        let parts = export.snapshot(40, Instant::now());
        assert!(parts.len() > 2);
        for f in &parts {
            import.apply_now(f).unwrap();
        }
        // ... and the changes queued before it arrive after it.
        import.apply_now(&set).unwrap();
        import.apply_now(&clear).unwrap();
        assert_eq!(import.len(), 9);
        assert!(payloads(&import).contains(&"c1=again".to_string()));
        assert!(!payloads(&import).iter().any(|p| p.starts_with("c2=")));
    }

    #[test]
    fn the_old_table_stays_until_a_new_snapshot_is_whole() {
        let mut import = WillImport::new(100, 1 << 20);
        let mut export = WillExport::new();
        export.set(entry("a", "1"), None);
        for f in export.snapshot(1 << 20, Instant::now()) {
            import.apply_now(&f).unwrap();
        }
        export.clear("a");
        export.set(entry("b", "2"), None);
        export.set(entry("c", "3"), None);
        let parts = export.snapshot(1, Instant::now());
        import.apply_now(&parts[0]).unwrap();
        assert_eq!(
            payloads(&import),
            ["a=1"],
            "a half snapshot changes nothing yet"
        );
        for f in &parts[1..] {
            import.apply_now(f).unwrap();
        }
        assert_eq!(payloads(&import), ["b=2", "c=3"]);
        // An empty snapshot empties it.
        import
            .apply_now(&WillExport::new().snapshot(10, Instant::now())[0])
            .unwrap();
        assert!(import.is_empty());
    }

    #[test]
    fn a_peer_shard_leaves_at_most_its_bound_of_wills() {
        let mut import = WillImport::new(3, 1 << 20);
        for c in ["a", "b", "c"] {
            import
                .apply_now(&Frame::WillSet(Box::new(entry(c, "x"))))
                .unwrap();
        }
        // Replacing one is not one more.
        import
            .apply_now(&Frame::WillSet(Box::new(entry("a", "y"))))
            .unwrap();
        assert_eq!(
            import.apply_now(&Frame::WillSet(Box::new(entry("d", "x")))),
            Err(WillError::TooMany { max: 3 })
        );
        assert_eq!(import.len(), 3);
        let mut export = WillExport::new();
        for c in ["a", "b", "c", "d"] {
            export.set(entry(c, "x"), None);
        }
        let mut fresh = WillImport::new(3, 1 << 20);
        let err = export
            .snapshot(1 << 20, Instant::now())
            .iter()
            .try_for_each(|f| fresh.apply_now(f));
        assert_eq!(err, Err(WillError::TooMany { max: 3 }));
        assert_eq!(
            WillImport::new(3, 1 << 20).apply_now(&Frame::WillSnapshot {
                wills: Vec::new(),
                first: false,
                last: true
            }),
            Err(WillError::OutOfOrder)
        );
    }

    #[test]
    fn a_snapshot_sends_the_time_a_waiting_will_has_left() {
        let now = Instant::now();
        let mut export = WillExport::new();
        let mut e = entry("a", "x");
        e.delay_ms = 10_000;
        export.set(e, Some(now + std::time::Duration::from_secs(10)));
        let later = now + std::time::Duration::from_secs(4);
        let Frame::WillSnapshot { wills, .. } = &export.snapshot(1 << 20, later)[0] else {
            panic!("a snapshot");
        };
        assert_eq!(wills[0].delay_ms, 6_000);
    }

    #[test]
    fn a_peer_shard_leaves_at_most_its_bound_of_bytes() {
        // Each test will takes 1 + 6 + 1 + 32 = 40 bytes.
        let mut import = WillImport::new(100, 80);
        import
            .apply_now(&Frame::WillSet(Box::new(entry("a", "x"))))
            .unwrap();
        import
            .apply_now(&Frame::WillSet(Box::new(entry("b", "x"))))
            .unwrap();
        assert_eq!(import.bytes(), 80);
        assert_eq!(
            import.apply_now(&Frame::WillSet(Box::new(entry("c", "x")))),
            Err(WillError::TooLarge { max: 80 })
        );
        // A larger will replacing one counts what it adds.
        assert_eq!(
            import.apply_now(&Frame::WillSet(Box::new(entry("a", "xx")))),
            Err(WillError::TooLarge { max: 80 })
        );
        assert_eq!(import.bytes(), 80);
        import
            .apply_now(&Frame::WillClear {
                client_id: "a".into(),
            })
            .unwrap();
        assert_eq!(import.bytes(), 40);
        import
            .apply_now(&Frame::WillSet(Box::new(entry("c", "x"))))
            .unwrap();
    }

    #[test]
    fn a_will_already_waiting_is_due_its_delay_after_it_was_received() {
        let t0 = Instant::now();
        let mut import = WillImport::new(10, 1 << 20);
        let mut waiting = entry("gone", "x");
        waiting.delay_ms = 10_000;
        waiting.waiting = true;
        let mut connected = entry("here", "x");
        connected.delay_ms = 10_000;
        import
            .apply(&Frame::WillSet(Box::new(waiting)), t0)
            .unwrap();
        import
            .apply(&Frame::WillSet(Box::new(connected)), t0)
            .unwrap();
        let mut taken = import.take();
        taken.sort_by_key(|(w, _)| w.client_id.clone());
        let due: Vec<_> = taken.iter().map(|(w, d)| (&*w.client_id, *d)).collect();
        // The connected client's will counts from the end of the run.
        assert_eq!(
            due,
            [
                ("gone", Some(t0 + std::time::Duration::from_secs(10))),
                ("here", None)
            ]
        );
    }

    #[test]
    fn a_run_that_ends_hands_over_every_will_once() {
        let mut import = WillImport::new(10, 1 << 20);
        import
            .apply_now(&Frame::WillSet(Box::new(entry("a", "x"))))
            .unwrap();
        import
            .apply_now(&Frame::WillSet(Box::new(entry("b", "x"))))
            .unwrap();
        assert_eq!(import.take().len(), 2);
        assert!(import.take().is_empty());
    }
}
