//! Node-level routes between nodes: which filters a node has ordinary
//! subscribers of, as the node tells its peers ([`RouteExport`]) and as a
//! peer holds them ([`RouteImport`]).
//!
//! Sans-IO, on shard 0 of each node. The export counts, per filter, the
//! shards of this node with ordinary subscribers of it (from the route
//! replica) and numbers each change of the node as a whole (0 ↔ 1 shards).
//! A link that comes up gets a snapshot of the table at its sequence
//! number, then every later change in order; the peer checks that each
//! change follows the one before (so a stale delete can never swallow a
//! newer subscribe), acknowledges it, and compares digests on every Ping.
//! Any gap or mismatch is an error that closes the link, and the next link
//! starts again from a snapshot. Shared subscriptions stay on their node
//! (not exported).

use std::sync::Arc;

use hashbrown::{HashMap, HashSet};
use thiserror::Error;

use super::frame::{filter_digest, Frame, RouteChange};

/// This node's routes; see the module docs.
#[derive(Debug, Default)]
pub struct RouteExport {
    /// Filter → shards of this node with ordinary subscribers of it.
    shards: HashMap<Arc<str>, u32>,
    seq: u64,
    digest: u64,
}

impl RouteExport {
    /// An empty table at sequence 0.
    pub fn new() -> RouteExport {
        RouteExport::default()
    }

    /// A shard gained (`add`) or lost its ordinary subscribers of
    /// `filter`. The change of the node as a whole, numbered, when there
    /// is one (the first shard to gain it, the last to lose it).
    pub fn shard_changed(&mut self, filter: &str, add: bool) -> Option<(u64, RouteChange)> {
        let node_changed = if add {
            let n = self.shards.entry_ref(filter).or_insert(0);
            *n += 1;
            *n == 1
        } else {
            match self.shards.get_mut(filter) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    self.shards.remove(filter);
                    true
                }
                // A removal the replica never added: nothing to tell.
                None => false,
            }
        };
        if !node_changed {
            return None;
        }
        self.seq += 1;
        self.digest ^= filter_digest(filter);
        let filter = match self.shards.get_key_value(filter) {
            Some((k, _)) => k.clone(),
            None => Arc::from(filter),
        };
        Some((self.seq, RouteChange { add, filter }))
    }

    /// The sequence number of the latest change.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The digest of the table now.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// Filters in the table.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// The whole table as snapshot frames of at most `chunk_bytes` of
    /// filters each (at least one frame, the last marked).
    pub fn snapshot(&self, chunk_bytes: usize) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut part = Vec::new();
        let mut bytes = 0;
        for f in self.shards.keys() {
            if bytes + f.len() + 2 > chunk_bytes && !part.is_empty() {
                frames.push(Frame::RouteSnapshot {
                    seq: self.seq,
                    filters: std::mem::take(&mut part),
                    last: false,
                    digest: 0,
                });
                bytes = 0;
            }
            bytes += f.len() + 2;
            part.push(f.clone());
        }
        frames.push(Frame::RouteSnapshot {
            seq: self.seq,
            filters: part,
            last: true,
            digest: self.digest,
        });
        frames
    }
}

/// The route frames one outbound link still needs: a snapshot when it
/// comes up, then each change numbered after it. A change queued before
/// the snapshot was taken (and so already in it) is skipped, never sent
/// twice.
#[derive(Debug, Default)]
pub struct RouteFeed {
    /// The sequence number the peer has (or will have, once the frames
    /// given are written); None before the snapshot.
    sent: Option<u64>,
}

impl RouteFeed {
    /// A link not up yet.
    pub fn new() -> RouteFeed {
        RouteFeed::default()
    }

    /// The link came up: the snapshot of `export`, in parts of at most
    /// `chunk_bytes`.
    pub fn start(&mut self, export: &RouteExport, chunk_bytes: usize) -> Vec<Frame> {
        self.sent = Some(export.seq());
        export.snapshot(chunk_bytes)
    }

    /// A change of the export: the frame to send, unless the link is not
    /// up yet or the snapshot already had it.
    pub fn change(&mut self, seq: u64, change: &RouteChange) -> Option<Frame> {
        let sent = self.sent?;
        if seq <= sent {
            return None;
        }
        self.sent = Some(seq);
        Some(Frame::RouteDelta {
            seq,
            change: change.clone(),
        })
    }
}

/// A peer's route frame that does not fit what came before: the link must
/// close and start over from a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RouteError {
    /// A change that does not follow the last one applied.
    #[error("route change {got} after {had}: out of sequence")]
    Gap {
        /// The sequence number applied last.
        had: u64,
        /// The one received.
        got: u64,
    },
    /// A change before any snapshot.
    #[error("route change before the snapshot")]
    NoSnapshot,
    /// An add of a filter held, or a removal of one not held.
    #[error("route change contradicts the table ({0})")]
    Contradiction(&'static str),
    /// A snapshot whose filters do not give its digest.
    #[error("route snapshot does not match its digest")]
    Digest,
    /// More filters than this node holds for one peer.
    #[error("more than {0} routes from one peer")]
    TooMany(usize),
    /// The digests differ at the same sequence number: drift.
    #[error("route digest differs at sequence {0}")]
    Drift(u64),
}

/// What applying a route frame asks of the node.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Route changes for the node's replicas, in order.
    pub changes: Vec<RouteChange>,
    /// Acknowledge up to this sequence number.
    pub ack: Option<u64>,
}

/// One peer's routes as this node holds them; see the module docs.
#[derive(Debug)]
pub struct RouteImport {
    filters: HashSet<Arc<str>>,
    digest: u64,
    /// The sequence number applied last; None before the first snapshot.
    seq: Option<u64>,
    /// A snapshot being received: its filters so far.
    incoming: Option<HashSet<Arc<str>>>,
    max_filters: usize,
}

impl RouteImport {
    /// Nothing known yet; at most `max_filters` routes taken from the
    /// peer.
    pub fn new(max_filters: usize) -> RouteImport {
        RouteImport {
            filters: HashSet::new(),
            digest: 0,
            seq: None,
            incoming: None,
            max_filters,
        }
    }

    /// The filters held.
    pub fn filters(&self) -> impl Iterator<Item = &Arc<str>> {
        self.filters.iter()
    }

    /// Whether `filter` is held.
    pub fn contains(&self, filter: &str) -> bool {
        self.filters.contains(filter)
    }

    /// Apply a route frame (snapshot part, delta, ping); other frames are
    /// not its business and change nothing.
    pub fn apply(&mut self, frame: &Frame) -> Result<Applied, RouteError> {
        match frame {
            Frame::RouteSnapshot {
                seq,
                filters,
                last,
                digest,
            } => {
                let incoming = self.incoming.get_or_insert_with(HashSet::new);
                if incoming.len() + filters.len() > self.max_filters {
                    return Err(RouteError::TooMany(self.max_filters));
                }
                incoming.extend(filters.iter().cloned());
                if !*last {
                    return Ok(Applied::default());
                }
                let new = self.incoming.take().unwrap_or_default();
                let new_digest = super::frame::route_digest(new.iter().map(|f| &**f));
                if new_digest != *digest {
                    return Err(RouteError::Digest);
                }
                let mut changes: Vec<RouteChange> = self
                    .filters
                    .iter()
                    .filter(|f| !new.contains(*f))
                    .map(|f| RouteChange {
                        add: false,
                        filter: f.clone(),
                    })
                    .collect();
                changes.extend(new.iter().filter(|f| !self.filters.contains(*f)).map(|f| {
                    RouteChange {
                        add: true,
                        filter: f.clone(),
                    }
                }));
                self.filters = new;
                self.digest = new_digest;
                self.seq = Some(*seq);
                Ok(Applied {
                    changes,
                    ack: Some(*seq),
                })
            }
            Frame::RouteDelta { seq, change } => {
                let had = self.seq.ok_or(RouteError::NoSnapshot)?;
                if *seq != had.wrapping_add(1) {
                    return Err(RouteError::Gap { had, got: *seq });
                }
                if change.add {
                    if self.filters.len() >= self.max_filters {
                        return Err(RouteError::TooMany(self.max_filters));
                    }
                    if !self.filters.insert(change.filter.clone()) {
                        return Err(RouteError::Contradiction("an add of a filter held"));
                    }
                } else if !self.filters.remove(&change.filter) {
                    return Err(RouteError::Contradiction("a removal of a filter not held"));
                }
                self.digest ^= filter_digest(&change.filter);
                self.seq = Some(*seq);
                Ok(Applied {
                    changes: vec![change.clone()],
                    ack: Some(*seq),
                })
            }
            Frame::Ping { seq, digest } => {
                if self.seq == Some(*seq) && self.digest != *digest {
                    return Err(RouteError::Drift(*seq));
                }
                Ok(Applied::default())
            }
            _ => Ok(Applied::default()),
        }
    }

    /// The link closed and the peer is gone for good (declared down, or
    /// replaced by a newer run): every route it had, as removals.
    pub fn clear(&mut self) -> Vec<RouteChange> {
        self.seq = None;
        self.incoming = None;
        self.digest = 0;
        self.filters
            .drain()
            .map(|filter| RouteChange { add: false, filter })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(i: &RouteImport) -> Vec<String> {
        let mut v: Vec<String> = i.filters().map(|f| f.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn only_the_first_shard_in_and_the_last_out_change_the_node() {
        let mut e = RouteExport::new();
        assert_eq!(e.shard_changed("a/#", true).map(|c| c.0), Some(1));
        assert_eq!(e.shard_changed("a/#", true), None);
        assert_eq!(e.shard_changed("a/#", false), None);
        let (seq, change) = e.shard_changed("a/#", false).unwrap();
        assert_eq!((seq, change.add), (2, false));
        assert_eq!(e.shard_changed("never", false), None);
        assert!(e.is_empty());
        assert_eq!(e.digest(), 0);
    }

    #[test]
    fn a_snapshot_then_deltas_in_order_give_the_same_table() {
        let mut e = RouteExport::new();
        for i in 0..100 {
            e.shard_changed(&format!("t/{i}/#"), true);
        }
        let mut imp = RouteImport::new(1000);
        let frames = e.snapshot(200);
        assert!(frames.len() > 1, "chunked");
        let mut adds = 0;
        for f in &frames {
            let a = imp.apply(f).unwrap();
            adds += a.changes.len();
        }
        assert_eq!(adds, 100);
        let (seq, change) = e.shard_changed("t/5/#", false).unwrap();
        let a = imp.apply(&Frame::RouteDelta { seq, change }).unwrap();
        assert_eq!(a.ack, Some(101));
        assert_eq!(imp.filters().count(), 99);
        imp.apply(&Frame::Ping {
            seq: e.seq(),
            digest: e.digest(),
        })
        .unwrap();
    }

    #[test]
    fn a_stale_delete_never_swallows_a_newer_subscribe() {
        let mut e = RouteExport::new();
        let mut imp = RouteImport::new(10);
        imp.apply(&e.snapshot(1 << 16)[0]).unwrap();
        let add = e.shard_changed("x", true).unwrap();
        let del = e.shard_changed("x", false).unwrap();
        let add2 = e.shard_changed("x", true).unwrap();
        let frame = |(seq, change): &(u64, RouteChange)| Frame::RouteDelta {
            seq: *seq,
            change: change.clone(),
        };
        imp.apply(&frame(&add)).unwrap();
        // The newer add arriving before the delete (reordered) is refused.
        assert_eq!(
            imp.apply(&frame(&add2)),
            Err(RouteError::Gap { had: 1, got: 3 })
        );
        let mut imp = RouteImport::new(10);
        imp.apply(&e.snapshot(1 << 16)[0]).unwrap();
        assert_eq!(names(&imp), vec!["x"]);
        assert_eq!(
            imp.apply(&frame(&del)),
            Err(RouteError::Gap { had: 3, got: 2 })
        );
    }

    #[test]
    fn drift_a_bad_digest_and_too_many_routes_are_errors() {
        let mut e = RouteExport::new();
        e.shard_changed("a", true);
        let mut imp = RouteImport::new(1);
        imp.apply(&e.snapshot(1 << 16)[0]).unwrap();
        assert_eq!(
            imp.apply(&Frame::Ping { seq: 1, digest: 99 }),
            Err(RouteError::Drift(1))
        );
        let bad = Frame::RouteSnapshot {
            seq: 1,
            filters: vec![Arc::from("a")],
            last: true,
            digest: 5,
        };
        assert_eq!(RouteImport::new(5).apply(&bad), Err(RouteError::Digest));
        let (seq, change) = e.shard_changed("b", true).unwrap();
        assert_eq!(
            imp.apply(&Frame::RouteDelta { seq, change }),
            Err(RouteError::TooMany(1))
        );
        assert_eq!(
            RouteImport::new(5).apply(&Frame::RouteDelta {
                seq: 1,
                change: RouteChange {
                    add: true,
                    filter: Arc::from("z")
                }
            }),
            Err(RouteError::NoSnapshot)
        );
    }
}
