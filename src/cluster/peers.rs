//! One shard's outbound links to its peers: when to dial each, how long
//! to back off, which run of a node a link belongs to, and the messages
//! sent to each run that it has not confirmed (replayed when a link to it
//! comes up again).
//!
//! Sans-IO and clock-free (times are milliseconds the caller gives). The
//! runtime (`shard::runtime::bridge`) owns the sockets and tasks; it
//! tells this table what happened (a node up or down, a dial made or
//! failed, a link up or closed) and does what it answers (close this link,
//! dial that address, replay these messages). Links are named by the
//! runtime's ids.

use std::collections::VecDeque;
use std::net::SocketAddr;

use crate::hash::HashMap;

use super::frame::{Frame, RemotePublish};
use super::node::Node;

/// First and longest wait before dialing a peer again, in ms.
pub const BACKOFF_MIN_MS: u64 = 100;
/// See [`BACKOFF_MIN_MS`].
pub const BACKOFF_MAX_MS: u64 = 5_000;
/// How long a link must have been up for its failure to start the backoff
/// over (dial again at once), in ms; one that fails sooner keeps backing
/// off rather than redialing ten times a second.
pub const LINK_SETTLED_MS: u64 = 10_000;

/// Where a peer's outbound link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    /// None; dial at `dial_at_ms`.
    Idle,
    /// A dial is under way.
    Dialing,
    /// Link `link` exists; up (handshake done) since the time given.
    Open { link: u64, up_since_ms: Option<u64> },
}

impl Out {
    /// The link, once its handshake is done.
    fn up(self) -> Option<u64> {
        match self {
            Out::Open {
                link,
                up_since_ms: Some(_),
            } => Some(link),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Peer {
    node: Node,
    out: Out,
    backoff_ms: u64,
    dial_at_ms: u64,
    /// Frames numbered for this run and not yet [`Frame::Delivered`],
    /// with their sizes: written again, in order, on every link that
    /// comes up to it.
    unacked: VecDeque<(u64, Frame, usize)>,
    /// Bytes of the messages ([`Frame::Publish`]) among them.
    unacked_bytes: usize,
    /// Bytes of the other frames among them (moves, answers).
    other_bytes: usize,
}

impl Peer {
    /// The count `frame`'s bytes are kept in: messages or the rest.
    fn kept_bytes(&mut self, frame: &Frame) -> &mut usize {
        if matches!(frame, Frame::Publish(_)) {
            &mut self.unacked_bytes
        } else {
            &mut self.other_bytes
        }
    }

    /// Forget a frame of `bytes` (confirmed, or dropped with its run).
    fn forget(&mut self, frame: &Frame, bytes: usize) {
        let count = self.kept_bytes(frame);
        debug_assert!(*count >= bytes, "forgetting more than was kept");
        *count -= bytes;
    }
}

/// What the runtime does when a node comes up.
#[derive(Debug, Default, PartialEq)]
pub struct Replaced {
    /// The run it replaces ended (its incarnation): its wills go out.
    pub ended_run: Option<u64>,
    /// The link to the replaced run, to close.
    pub close: Option<u64>,
    /// Frames that waited for the replaced run, dropped: in order, for
    /// the caller to count (and to serve elsewhere what can be).
    pub dropped: Vec<Frame>,
}

/// A shard's outbound links, by peer index; see the module docs.
#[derive(Debug)]
pub struct PeerLinks {
    shard: u16,
    /// Bytes of messages one peer's run may leave unconfirmed (twice it
    /// with a link up).
    unconfirmed_bytes_max: usize,
    /// Bytes of other frames (a session's move, the protocol's answers)
    /// one peer's run may leave unconfirmed.
    others_bytes_max: usize,
    peers: HashMap<u16, Peer>,
    /// The last message number given to each peer index, for the life of
    /// this process: a peer that declared this node down and back keeps
    /// its count of what it had from this shard, so numbering must not
    /// start over when this side sees that peer leave and come back.
    seqs: HashMap<u16, u64>,
}

impl PeerLinks {
    /// The table of shard `shard`, keeping at most `unconfirmed_bytes_max`
    /// bytes of messages a peer's run has not confirmed (see
    /// [`PeerLinks::number`]), and `others_bytes_max` of other frames.
    pub fn new(shard: u16, unconfirmed_bytes_max: usize, others_bytes_max: usize) -> PeerLinks {
        PeerLinks {
            shard,
            unconfirmed_bytes_max,
            others_bytes_max,
            peers: HashMap::default(),
            seqs: HashMap::default(),
        }
    }

    /// Node `index` is up as run `node` at `now_ms`: dial it at once. A
    /// different run held before ended (its link closes, what waited for
    /// it is dropped); the same run again changes nothing.
    pub fn up(&mut self, index: u16, node: Node, now_ms: u64) -> Replaced {
        let fresh = Peer {
            node,
            out: Out::Idle,
            backoff_ms: BACKOFF_MIN_MS,
            dial_at_ms: now_ms,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            other_bytes: 0,
        };
        let node = &fresh.node;
        if let Some(p) = self.peers.get(&index) {
            if &p.node == node {
                return Replaced::default();
            }
        }
        let old = self.peers.insert(index, fresh);
        match old {
            None => Replaced::default(),
            Some(old) => Replaced {
                ended_run: Some(old.node.incarnation),
                close: link_of(&old.out),
                dropped: old.unacked.into_iter().map(|(_, f, _)| f).collect(),
            },
        }
    }

    /// Run `node` of node `index` is down. None when that is not the run
    /// held (an older one); else the link to close and the frames dropped,
    /// in order.
    pub fn down(&mut self, index: u16, node: &Node) -> Option<(Option<u64>, Vec<Frame>)> {
        if self.peers.get(&index).is_none_or(|p| &p.node != node) {
            return None;
        }
        let p = self.peers.remove(&index)?;
        let dropped = p.unacked.into_iter().map(|(_, f, _)| f).collect();
        Some((link_of(&p.out), dropped))
    }

    /// The peers whose dial is due at `now_ms`, marked as dialing: their
    /// index, the address of this shard's counterpart there (shard
    /// `shard mod n`) and the run dialed.
    pub fn due(&mut self, now_ms: u64) -> Vec<(u16, SocketAddr, Node)> {
        let mut due = Vec::new();
        for (&index, p) in self.peers.iter_mut() {
            if p.out != Out::Idle || now_ms < p.dial_at_ms {
                continue;
            }
            let shard = self.shard % p.node.shards.max(1);
            if let Some(addr) = p.node.bridge_addr(shard) {
                p.out = Out::Dialing;
                due.push((index, addr, p.node.clone()));
            }
        }
        due
    }

    /// A dial to run `node` of `index` made link `link`: false when that
    /// run is no longer the one held (the caller closes the link).
    pub fn dialed(&mut self, index: u16, node: &Node, link: u64) -> bool {
        match self.peers.get_mut(&index) {
            Some(p) if &p.node == node && p.out == Out::Dialing => {
                p.out = Out::Open {
                    link,
                    up_since_ms: None,
                };
                true
            }
            _ => false,
        }
    }

    /// A dial to `index` failed at `now_ms`: try again after the backoff,
    /// which doubles (to [`BACKOFF_MAX_MS`]).
    pub fn dial_failed(&mut self, index: u16, now_ms: u64) {
        if let Some(p) = self.peers.get_mut(&index) {
            if p.out == Out::Dialing {
                p.out = Out::Idle;
                Self::back_off(p, now_ms);
            }
        }
    }

    fn back_off(p: &mut Peer, now_ms: u64) {
        p.dial_at_ms = now_ms + p.backoff_ms;
        p.backoff_ms = (p.backoff_ms * 2).min(BACKOFF_MAX_MS);
    }

    /// Link `link` of `index` finished its handshake at `now_ms` (nothing
    /// for a link that is not the peer's): what the run has not confirmed
    /// goes on it next ([`PeerLinks::unconfirmed`]).
    pub fn link_up(&mut self, index: u16, link: u64, now_ms: u64) {
        if let Some(p) = self.peers.get_mut(&index) {
            if link_of(&p.out) == Some(link) {
                p.out = Out::Open {
                    link,
                    up_since_ms: Some(now_ms),
                };
            }
        }
    }

    /// Link `link` of `index` closed at `now_ms`: dial again after the
    /// backoff, started over if the link had been up [`LINK_SETTLED_MS`].
    /// Nothing for a link that is not the peer's.
    pub fn link_closed(&mut self, index: u16, link: u64, now_ms: u64) {
        let Some(p) = self.peers.get_mut(&index) else {
            return;
        };
        let Out::Open {
            link: l,
            up_since_ms,
        } = p.out
        else {
            return;
        };
        if l != link {
            return;
        }
        if up_since_ms.is_some_and(|t| now_ms.saturating_sub(t) >= LINK_SETTLED_MS) {
            p.backoff_ms = BACKOFF_MIN_MS;
        }
        p.out = Out::Idle;
        Self::back_off(p, now_ms);
    }

    /// Number `frame` (`bytes` long) for `index`'s run and keep it until
    /// that run confirms it: the kept frame, to write now if a link is up
    /// (else it goes when one comes up). The frame back (the caller drops
    /// and counts it) for a node not up, or, for a message
    /// ([`Frame::Publish`]), past the bound of what a run may leave
    /// unconfirmed: the bound with no link up, twice the bound with one
    /// (the shard's clients are not read from half of it, see
    /// `ShardCore::links_full`, but messages from elsewhere, a will or a
    /// delayed publish, still come; a live link confirms them). Other
    /// frames (a session's move, the protocol's answers) have a bound of
    /// their own, so that a large move does not crowd messages out.
    pub fn number(&mut self, index: u16, mut frame: Frame, bytes: usize) -> Result<&Frame, Frame> {
        let Some(p) = self.peers.get_mut(&index) else {
            return Err(frame);
        };
        let bound = match (&frame, p.out.up()) {
            (Frame::Publish(_), Some(_)) => self.unconfirmed_bytes_max.saturating_mul(2),
            (Frame::Publish(_), None) => self.unconfirmed_bytes_max,
            _ => self.others_bytes_max,
        };
        let kept = p.kept_bytes(&frame);
        if *kept + bytes > bound {
            return Err(frame);
        }
        *kept += bytes;
        let seq = self.seqs.entry(index).or_insert(0);
        *seq += 1;
        frame.set_stream_seq(*seq);
        p.unacked.push_back((*seq, frame, bytes));
        Ok(&p.unacked.back().expect("just pushed").1)
    }

    /// `index`'s run confirmed every message up to `seq`: false when
    /// `seq` is beyond the last one given (nothing is forgotten then).
    pub fn delivered(&mut self, index: u16, seq: u64) -> bool {
        if seq > self.seqs.get(&index).copied().unwrap_or(0) {
            return false;
        }
        let Some(p) = self.peers.get_mut(&index) else {
            return true;
        };
        while p.unacked.front().is_some_and(|(s, _, _)| *s <= seq) {
            if let Some((_, frame, bytes)) = p.unacked.pop_front() {
                p.forget(&frame, bytes);
            }
        }
        true
    }

    /// The messages `index`'s run has not confirmed, in order: for a link
    /// that came up (the run skips those it had). Each message among them
    /// says it is late: routed before this link came up, by what this
    /// node knew of the peer's routes then (`Message::late`).
    pub fn unconfirmed(&self, index: u16) -> Vec<Frame> {
        let again = |f: &Frame| match f {
            Frame::Publish(p) => Frame::Publish(RemotePublish {
                late: true,
                ..p.clone()
            }),
            other => other.clone(),
        };
        self.peers
            .get(&index)
            .map(|p| p.unacked.iter().map(|(_, f, _)| again(f)).collect())
            .unwrap_or_default()
    }

    /// The link of `index`, once its handshake is done.
    pub fn up_link(&self, index: u16) -> Option<u64> {
        self.peers.get(&index)?.out.up()
    }

    /// Per peer: its index, the bytes of messages it has not confirmed,
    /// and whether its link is up.
    pub fn fills(&self) -> impl Iterator<Item = (u16, usize, bool)> + '_ {
        (self.peers.iter()).map(|(&i, p)| (i, p.unacked_bytes, p.out.up().is_some()))
    }

    /// Bytes of frames kept until their peers confirm them (messages and
    /// the rest), all peers.
    pub fn unconfirmed_bytes(&self) -> usize {
        self.peers
            .values()
            .map(|p| p.unacked_bytes + p.other_bytes)
            .sum()
    }

    /// Every peer's link, up or still in its handshake: (peer, link).
    pub fn links(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.peers
            .iter()
            .filter_map(|(&i, p)| link_of(&p.out).map(|l| (i, l)))
    }

    /// Peers up (by membership), linked or not.
    pub fn count(&self) -> usize {
        self.peers.len()
    }

    /// Their indices, in order.
    pub fn indices(&self) -> Vec<u16> {
        let mut i: Vec<u16> = self.peers.keys().copied().collect();
        i.sort_unstable();
        i
    }

    /// The run held for `index`.
    pub fn node(&self, index: u16) -> Option<&Node> {
        self.peers.get(&index).map(|p| &p.node)
    }

    /// The peer whose run is `name` at `incarnation`.
    pub fn index_of(&self, name: &str, incarnation: u64) -> Option<u16> {
        self.peers
            .iter()
            .find(|(_, p)| p.node.name.as_str() == name && p.node.incarnation == incarnation)
            .map(|(&i, _)| i)
    }
}

fn link_of(out: &Out) -> Option<u64> {
    match out {
        Out::Open { link, .. } => Some(*link),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::node::NodeName;

    fn node(name: &str, incarnation: u64) -> Node {
        Node {
            name: NodeName::new(name).unwrap(),
            addr: "127.0.0.1:7000".parse().unwrap(),
            incarnation,
            rejoin: 0,
            shards: 2,
        }
    }

    #[test]
    fn a_node_is_dialed_at_once_then_after_a_backoff_that_doubles_to_its_cap() {
        let mut t = PeerLinks::new(3, 1 << 20, 1 << 20);
        t.up(1, node("b", 1), 1_000);
        let due = t.due(1_000);
        assert_eq!(due.len(), 1);
        // Shard 3 dials shard 3 mod 2 = 1: the membership port + 1.
        assert_eq!(due[0].1, "127.0.0.1:7001".parse().unwrap());
        assert!(t.due(1_000).is_empty(), "one dial at a time");
        let mut now = 1_000;
        let mut waits = Vec::new();
        for _ in 0..8 {
            t.dial_failed(1, now);
            let mut at = now;
            while t.due(at).is_empty() {
                at += 1;
            }
            waits.push(at - now);
            now = at;
        }
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn the_backoff_starts_over_only_after_a_link_stayed_up_a_while() {
        let mut t = PeerLinks::new(0, 1 << 20, 1 << 20);
        t.up(1, node("b", 1), 0);
        let n = node("b", 1);
        for round in 0..3u64 {
            let at = (round + 1) * 100_000;
            let mut now = at;
            while t.due(now).is_empty() {
                now += 1;
            }
            assert!(t.dialed(1, &n, round));
            t.link_up(1, round, now);
            assert_eq!(t.up_link(1), Some(round));
            // Up only briefly: the next wait is longer.
            t.link_closed(1, round, now + 10);
        }
        let mut now = 1_000_000;
        while t.due(now).is_empty() {
            now += 1;
        }
        assert!(t.dialed(1, &n, 9));
        t.link_up(1, 9, now);
        t.link_closed(1, 9, now + LINK_SETTLED_MS);
        assert!(t.due(now + LINK_SETTLED_MS + BACKOFF_MIN_MS - 1).is_empty());
        assert_eq!(t.due(now + LINK_SETTLED_MS + BACKOFF_MIN_MS).len(), 1);
    }

    fn message() -> Frame {
        use crate::message::Message;
        Frame::Publish(RemotePublish {
            seq: 0,
            message: std::sync::Arc::new(Message::from_broker(
                "t",
                bytes::Bytes::from_static(b"x"),
                crate::codec::QoS::AtLeastOnce,
                false,
            )),
            ordinary: true,
            shared: Vec::new(),
            passed_on: false,
            adopted_of: None,
            late: false,
        })
    }

    fn seqs(frames: &[Frame]) -> Vec<u64> {
        frames
            .iter()
            .map(|f| match f {
                Frame::Publish(m) => m.seq,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn messages_and_other_frames_have_bounds_of_their_own_and_a_link_doubles_the_first() {
        let mut t = PeerLinks::new(0, 100, 50);
        t.up(1, node("b", 1), 0);
        assert!(t.number(1, message(), 90).is_ok());
        let acks = || Frame::ClaimAcks {
            seq: 0,
            acks: Vec::new(),
        };
        assert!(t.number(1, acks(), 50).is_ok(), "a bound of its own");
        assert!(t.number(1, acks(), 1).is_err(), "past it");
        assert_eq!(t.unconfirmed_bytes(), 140, "both kept");
        assert_eq!(t.fills().collect::<Vec<_>>(), [(1, 90, false)]);
        assert!(t.number(1, message(), 11).is_err(), "past the bound");
        assert!(t.number(1, message(), 10).is_ok());
        // With a link up, twice the bound.
        t.due(0);
        assert!(t.dialed(1, &node("b", 1), 9));
        t.link_up(1, 9, 0);
        assert_eq!(t.fills().collect::<Vec<_>>(), [(1, 100, true)]);
        assert!(t.number(1, message(), 100).is_ok());
        assert!(t.number(1, message(), 1).is_err());
        assert!(t.delivered(1, 4));
        assert_eq!(t.unconfirmed_bytes(), 0);
    }

    #[test]
    fn messages_are_numbered_kept_until_confirmed_within_the_bound_and_dropped_with_their_run() {
        let mut t = PeerLinks::new(0, 100, 100);
        assert!(t.number(1, message(), 10).is_err(), "no such node");
        t.up(1, node("b", 1), 0);
        let sent: Vec<Frame> = (0..3)
            .filter_map(|_| t.number(1, message(), 30).ok().cloned())
            .collect();
        assert_eq!(seqs(&sent), [1, 2, 3]);
        assert!(t.number(1, message(), 11).is_err(), "past the bound");
        assert_eq!(seqs(&t.unconfirmed(1)), [1, 2, 3]);
        let late = |f: &Frame| matches!(f, Frame::Publish(p) if p.late);
        assert!(!sent.iter().any(late), "written on a link up");
        assert!(t.unconfirmed(1).iter().all(late), "written again");
        // Confirmed up to 2: only 3 is written again on the next link, and
        // there is room for more.
        assert!(t.delivered(1, 2));
        assert_eq!(seqs(&t.unconfirmed(1)), [3]);
        assert_eq!(seqs(&[t.number(1, message(), 60).unwrap().clone()]), [4]);
        assert!(t.delivered(1, 4));
        assert!(t.unconfirmed(1).is_empty());
        // What a run did not confirm is dropped (and counted) when it ends.
        // The numbers go on across runs (a peer that saw this node leave and
        // come back kept its count), and a confirmation beyond them is
        // refused.
        t.number(1, message(), 10).unwrap();
        assert_eq!(seqs(&t.up(1, node("b", 2), 5).dropped), [5]);
        assert_eq!(seqs(&[t.number(1, message(), 10).unwrap().clone()]), [6]);
        assert!(!t.delivered(1, 7));
        assert_eq!(seqs(&t.unconfirmed(1)), [6]);
        let (link, dropped) = t.down(1, &node("b", 2)).unwrap();
        assert_eq!((link, seqs(&dropped)), (None, vec![6]));
    }

    #[test]
    fn a_newer_run_ends_the_older_and_a_late_down_or_dial_of_it_changes_nothing() {
        let mut t = PeerLinks::new(0, 1 << 20, 1 << 20);
        let (old, new) = (node("b", 1), node("b", 2));
        t.up(1, old.clone(), 0);
        t.due(0);
        assert!(t.dialed(1, &old, 5));
        assert!(t.number(1, message(), 1).is_ok());
        assert_eq!(t.up(1, old.clone(), 1), Replaced::default(), "the same run");
        let replaced = t.up(1, new.clone(), 2);
        assert_eq!((replaced.ended_run, replaced.close), (Some(1), Some(5)));
        assert_eq!(seqs(&replaced.dropped), [1]);
        assert_eq!(t.down(1, &old), None, "the old run's down is stale");
        t.due(2);
        assert!(!t.dialed(1, &old, 6), "a dial to the old run is closed");
        assert!(t.dialed(1, &new, 7));
        assert_eq!(t.index_of("b", 2), Some(1));
        assert_eq!(t.index_of("b", 1), None);
        assert_eq!(t.links().collect::<Vec<_>>(), [(1, 7)]);
        assert_eq!(t.down(1, &new), Some((Some(7), Vec::new())));
        assert!(t.node(1).is_none());
    }
}
