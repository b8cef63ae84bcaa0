//! Cluster membership: which nodes are up, through SWIM (the `foca`
//! crate), driven without I/O.
//!
//! Node-wide, served by shard 0: `shard::runtime` hands [`Membership`] the
//! datagrams it reads and the time, sends what [`Membership::poll_transmit`]
//! gives it, sleeps until [`Membership::poll_timeout`], and acts on
//! [`Membership::poll_event`]. The deterministic simulator drives the same
//! value over a simulated network (`tests/membership.rs`).
//!
//! Every datagram starts with an 8-byte envelope: `S` `M`, the protocol
//! version, the kind (1: membership), and a 32-bit tag of the cluster name,
//! so a node of another cluster or another version on the same network is
//! counted and ignored rather than joined. The rest is foca's message, in
//! its postcard encoding, with every node name checked. With a cluster
//! secret (`cluster::secret`) the kind is 2 and the datagram ends with
//! the first 16 bytes of an HMAC-SHA256 tag of all before it: a datagram
//! without a tag that checks is counted and ignored (and a node without
//! the secret ignores tagged ones).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU8, NonZeroUsize};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use foca::{Codec, Foca, Header, Member, NoCustomBroadcast, Notification, PostcardCodec, Timer};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use thiserror::Error;

use super::node::{Node, NodeName};

/// Largest membership datagram, envelope included, in bytes: below an
/// Ethernet MTU, so no datagram is fragmented.
pub const DATAGRAM_MAX: usize = 1400;
/// Bytes of the envelope before foca's message.
pub const ENVELOPE_BYTES: usize = 8;
/// The membership protocol's version in the envelope.
pub const VERSION: u8 = 1;
const KIND_MEMBERSHIP: u8 = 1;
/// The kind of a datagram that ends with a tag of the cluster secret.
const KIND_TAGGED: u8 = 2;
/// Bytes of the tag at the end of a tagged datagram.
pub const TAG_BYTES: usize = 16;
/// What a membership datagram's tag is for.
const TAG_LABEL: &[u8] = b"shardmq membership";

/// The timings of failure detection; see `[cluster]` in the default config.
#[derive(Debug, Clone)]
pub struct MembershipSettings {
    /// How often a node probes one of its peers.
    pub probe_interval: Duration,
    /// How long a probe waits for the direct answer before asking others
    /// to probe for it (less than `probe_interval`).
    pub probe_timeout: Duration,
    /// How long a suspected node has to refute before it is declared down.
    pub suspect_timeout: Duration,
    /// How often a node that knows no live peer announces itself to the
    /// join addresses, and how often it tries the nodes it holds down (how
    /// a healed partition finds itself again).
    pub join_interval: Duration,
    /// `cluster.name`: nodes of different names ignore each other.
    pub cluster_name: String,
    /// The cluster secret every datagram proves, if the cluster has one.
    pub secret: Option<std::sync::Arc<super::secret::ClusterSecret>>,
}

/// A change of membership, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    /// A node is up (joined, or came back).
    Up(Node),
    /// A node was declared down: it stopped answering, or left.
    Down(Node),
    /// A newer run of a node replaced the one known at its address: a
    /// restart (a higher incarnation) or a rejoin.
    Replaced {
        /// The run known before.
        old: Node,
        /// The run now known.
        new: Node,
    },
    /// This node is known to a live peer: it is in the cluster.
    Joined,
    /// Every peer this node knew is down or gone.
    Alone,
    /// The others had declared this node down; it rejoined as the given
    /// (renewed) identity.
    Rejoined(Node),
    /// Two live runs have one node id at two addresses: two nodes were
    /// given one id, or a node moved to another address and its earlier
    /// run is not declared down yet. Every node keeps the same one (the
    /// newer incarnation and rejoin; for equal ones the lower address) and
    /// ignores the other (no `Up`) while it stays up; a run with this
    /// node's own id is always ignored.
    Duplicate {
        /// The node ignored.
        node: Node,
        /// The node whose id it has; None: this one.
        known: Option<Node>,
    },
}

/// What became of datagrams that were not used, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MembershipCounters {
    /// Datagrams handed in.
    pub datagrams_in: u64,
    /// Datagrams handed out to send.
    pub datagrams_out: u64,
    /// Not ours: too short, no `SM` magic, not a membership message.
    pub refused_foreign: u64,
    /// Another protocol version.
    pub refused_version: u64,
    /// Another cluster's name.
    pub refused_cluster: u64,
    /// Ours, but malformed: too long, undecodable, a bad node name.
    pub refused_malformed: u64,
    /// Without a tag of the cluster secret that checks (or tagged, where
    /// this node has no secret).
    pub refused_unauthenticated: u64,
    /// Nodes ignored for having the node id of another
    /// ([`MemberEvent::Duplicate`]).
    pub duplicates: u64,
}

/// Why a datagram was not used (the counters say how many).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Refused {
    /// Not a shardmq membership datagram.
    #[error("not a shardmq membership datagram")]
    Foreign,
    /// Another protocol version.
    #[error("membership protocol version {0}, this node speaks {VERSION}")]
    Version(u8),
    /// Another cluster.
    #[error("from a node of another cluster (cluster.name differs)")]
    Cluster,
    /// Malformed.
    #[error("malformed membership datagram")]
    Malformed,
    /// Its tag of the cluster secret is missing or does not check.
    #[error("membership datagram without the cluster secret's tag (cluster.secret_file)")]
    Unauthenticated,
}

/// A datagram to send.
#[derive(Debug, Clone)]
pub struct Transmit {
    /// Where to.
    pub to: SocketAddr,
    /// The datagram, envelope included.
    pub data: Bytes,
}

type Swim = Foca<Node, Wire, SmallRng, NoCustomBroadcast>;

/// Membership of one node; see the module docs. Time is milliseconds on
/// the caller's monotonic clock, never read here.
pub struct Membership {
    swim: Swim,
    join: Vec<SocketAddr>,
    join_interval_ms: u64,
    next_join_ms: u64,
    envelope: [u8; ENVELOPE_BYTES],
    /// The cluster secret datagrams are tagged with, if any.
    secret: Option<std::sync::Arc<super::secret::ClusterSecret>>,
    timers: BTreeMap<(u64, u64), Timer<Node>>,
    timer_seq: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<MemberEvent>,
    counters: MembershipCounters,
    /// The run reported up for each node id (foca's live members, one run
    /// kept per id), and the live runs ignored for having the id of
    /// another; events are what changes here after each call into foca.
    up: BTreeMap<NodeName, Node>,
    ignored: Vec<Node>,
    /// The last run kept of each node id, up or not, and since when it is
    /// down: a new run of it is a `Replaced` (a restart), not a first
    /// `Up`, and an older run is ignored until [`STALE_RUN_MS`] after it
    /// went down.
    last: BTreeMap<NodeName, (Node, Option<u64>)>,
    /// foca said its members changed since the last reconcile.
    members_changed: bool,
    /// Joined, Alone and Rejoined, held until the member events of the
    /// same step are out (so they come in the order they happened).
    notes: VecDeque<MemberEvent>,
}

/// How long after a node id's latest run went down an older run of it
/// (one that moved away and is not declared down yet, or a node whose
/// data directory was wiped) stays ignored, in ms.
pub const STALE_RUN_MS: u64 = 60_000;

/// Of two live runs with one node id, whether `a` is kept over `b`: the
/// newer (incarnation, rejoin), then the lower address, the same choice
/// on every node.
fn kept_over(a: &Node, b: &Node) -> bool {
    (a.incarnation, a.rejoin, std::cmp::Reverse(a.addr))
        > (b.incarnation, b.rejoin, std::cmp::Reverse(b.addr))
}

impl Membership {
    /// Membership for `me`, which will join through the addresses in
    /// `join` (its own among them is skipped). `seed` seeds the protocol's
    /// random choices.
    pub fn new(
        me: Node,
        join: &[SocketAddr],
        settings: &MembershipSettings,
        seed: u64,
    ) -> Membership {
        let mut config = foca::Config::new_lan(NonZeroU32::new(16).expect("non-zero"));
        config.probe_period = settings.probe_interval;
        config.probe_rtt = settings.probe_timeout;
        config.suspect_to_down_after = settings.suspect_timeout;
        config.max_packet_size =
            NonZeroUsize::new(DATAGRAM_MAX - ENVELOPE_BYTES - TAG_BYTES).expect("non-zero");
        // Each change rides on this many messages. foca's default for 16
        // nodes (4) let a join go unseen for 15 s when the piggybacks went
        // to the joining node itself (simulator, seed 15).
        config.max_transmissions = NonZeroU8::new(10).expect("non-zero");
        // Anti-entropy: every five join intervals, one random peer sends
        // its whole view back (foca's Announce / Feed), repairing whatever
        // gossip missed.
        config.periodic_announce = Some(foca::PeriodicParams {
            frequency: settings.join_interval * 5,
            num_members: NonZeroUsize::new(1).expect("non-zero"),
        });
        config.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: settings.join_interval,
            num_members: NonZeroUsize::new(2).expect("non-zero"),
        });
        let mut envelope = envelope(&settings.cluster_name);
        if settings.secret.is_some() {
            envelope[3] = KIND_TAGGED;
        }
        let own = me.addr;
        Membership {
            swim: Foca::new(me, config, SmallRng::seed_from_u64(seed), Wire),
            join: join.iter().copied().filter(|a| *a != own).collect(),
            join_interval_ms: millis(settings.join_interval),
            next_join_ms: 0,
            envelope,
            secret: settings.secret.clone(),
            timers: BTreeMap::new(),
            timer_seq: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            counters: MembershipCounters::default(),
            up: BTreeMap::new(),
            ignored: Vec::new(),
            last: BTreeMap::new(),
            members_changed: false,
            notes: VecDeque::new(),
        }
    }

    /// This node as its peers know it now.
    pub fn me(&self) -> &Node {
        self.swim.identity()
    }

    /// The live peers (one run per node id: see
    /// [`MemberEvent::Duplicate`]).
    pub fn members(&self) -> impl Iterator<Item = &Node> {
        self.up.values()
    }

    /// How many peers are live.
    pub fn live_peers(&self) -> usize {
        self.up.len()
    }

    /// After a call into foca at `now_ms`: the events of what changed
    /// among its live members (one run kept per node id), then its other
    /// notes.
    fn after_foca(&mut self, now_ms: u64) {
        // An ignored run may be due to be taken (see `STALE_RUN_MS`).
        if std::mem::take(&mut self.members_changed) || !self.ignored.is_empty() {
            self.reconcile(now_ms);
        }
        self.events.append(&mut self.notes);
    }

    fn reconcile(&mut self, now_ms: u64) {
        let me = self.swim.identity().name.clone();
        let stale = |n: &Node| match self.last.get(&n.name) {
            Some((l, down)) => {
                (n.incarnation, n.rejoin) < (l.incarnation, l.rejoin)
                    && down.is_none_or(|t| now_ms.saturating_sub(t) < STALE_RUN_MS)
            }
            None => false,
        };
        let mut best: BTreeMap<NodeName, Node> = BTreeMap::new();
        let live: Vec<Node> = self.swim.iter_members().map(|m| m.id().clone()).collect();
        for n in &live {
            if n.name == me || n.name.is_unknown() || stale(n) {
                continue;
            }
            match best.get(&n.name) {
                Some(b) if !kept_over(n, b) => {}
                _ => {
                    best.insert(n.name.clone(), n.clone());
                }
            }
        }
        for (name, old) in &self.up {
            match best.get(name) {
                None => {
                    self.events.push_back(MemberEvent::Down(old.clone()));
                    self.last.insert(name.clone(), (old.clone(), Some(now_ms)));
                }
                Some(new) if new != old => self.events.push_back(MemberEvent::Replaced {
                    old: old.clone(),
                    new: new.clone(),
                }),
                Some(_) => {}
            }
        }
        for (name, new) in &best {
            if self.up.contains_key(name) {
                continue;
            }
            let event = match self.last.get(name) {
                Some((old, _)) if old != new => MemberEvent::Replaced {
                    old: old.clone(),
                    new: new.clone(),
                },
                _ => MemberEvent::Up(new.clone()),
            };
            self.events.push_back(event);
        }
        for (name, new) in &best {
            self.last.insert(name.clone(), (new.clone(), None));
        }
        let ignored: Vec<Node> = live
            .into_iter()
            .filter(|n| !n.name.is_unknown() && best.get(&n.name) != Some(n))
            .collect();
        for n in &ignored {
            if !self.ignored.contains(n) {
                self.counters.duplicates += 1;
                let known = match n.name == me {
                    true => None,
                    false => best
                        .get(&n.name)
                        .or(self.last.get(&n.name).map(|l| &l.0))
                        .cloned(),
                };
                self.events.push_back(MemberEvent::Duplicate {
                    node: n.clone(),
                    known,
                });
            }
        }
        self.ignored = ignored;
        self.up = best;
    }

    /// The counters.
    pub fn counters(&self) -> MembershipCounters {
        self.counters
    }

    /// Announce this node to the join addresses; again every
    /// `join_interval` to those where no live peer is known.
    pub fn start(&mut self, now_ms: u64) {
        self.announce_to_join(now_ms);
        self.after_foca(now_ms);
    }

    /// Tell the peers this node leaves (an orderly stop), so they do not
    /// wait for failure detection.
    pub fn leave(&mut self, now_ms: u64) {
        let mut io = self.io(now_ms);
        let _ = io.swim.leave_cluster(&mut io.rt);
        self.events.append(&mut self.notes);
    }

    /// A datagram read from `from`.
    pub fn handle_datagram(&mut self, now_ms: u64, data: &[u8]) -> Result<(), Refused> {
        self.counters.datagrams_in += 1;
        let body = match self.check_envelope(data) {
            Ok(body) => body,
            Err(r) => {
                let c = &mut self.counters;
                match r {
                    Refused::Foreign => c.refused_foreign += 1,
                    Refused::Version(_) => c.refused_version += 1,
                    Refused::Cluster => c.refused_cluster += 1,
                    Refused::Malformed => c.refused_malformed += 1,
                    Refused::Unauthenticated => c.refused_unauthenticated += 1,
                }
                return Err(r);
            }
        };
        let mut io = self.io(now_ms);
        let handled = io.swim.handle_data(body, &mut io.rt);
        self.after_foca(now_ms);
        match handled {
            Ok(()) => Ok(()),
            // A datagram of ours that came back (a join address that is
            // this node under another name): not an attack, not counted.
            Err(foca::Error::DataFromOurselves) => Ok(()),
            Err(_) => {
                self.counters.refused_malformed += 1;
                Err(Refused::Malformed)
            }
        }
    }

    /// Run the timers due at `now_ms`.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            let timer = entry.remove();
            if self.is_refuted_suspicion(&timer) {
                continue;
            }
            let mut io = self.io(now_ms);
            // An error here is foca refusing a stale timer; nothing to do.
            let _ = io.swim.handle_timer(timer, &mut io.rt);
        }
        if now_ms >= self.next_join_ms {
            self.announce_to_join(now_ms);
        }
        self.after_foca(now_ms);
    }

    /// When [`Membership::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> u64 {
        let timer = self.timers.keys().next().map_or(u64::MAX, |k| k.0);
        timer.min(self.next_join_ms)
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next membership change.
    pub fn poll_event(&mut self) -> Option<MemberEvent> {
        self.events.pop_front()
    }

    /// Whether `timer` would declare down a node that refuted the
    /// suspicion since (or is no longer the one suspected). foca (1.0, 2.0)
    /// then changes nothing but still sends the node `TurnUndead`, which
    /// makes a live node believe it was declared down and rejoin under a
    /// new identity: the simulator found it (seed 2). Such a timer is
    /// dropped here; foca would ignore it otherwise.
    fn is_refuted_suspicion(&self, timer: &Timer<Node>) -> bool {
        let Timer::ChangeSuspectToDown {
            member_id,
            incarnation,
            ..
        } = timer
        else {
            return false;
        };
        !self.swim.iter_membership_state().any(|m| {
            m.id() == member_id
                && m.incarnation() == *incarnation
                && m.state() == foca::State::Suspect
        })
    }

    /// Announce this node to every join address where no live peer is
    /// known: two groups that started apart (each member joining through
    /// one that was not up yet) still find each other.
    fn announce_to_join(&mut self, now_ms: u64) {
        self.next_join_ms = now_ms.saturating_add(self.join_interval_ms);
        for i in 0..self.join.len() {
            let at = self.join[i];
            if self.swim.iter_members().any(|m| m.id().addr == at) {
                continue;
            }
            let mut io = self.io(now_ms);
            let _ = io.swim.announce(Node::at(at), &mut io.rt);
        }
    }

    /// The foca message inside datagram `data`, or why it is refused.
    fn check_envelope<'d>(&self, data: &'d [u8]) -> Result<&'d [u8], Refused> {
        if data.len() < ENVELOPE_BYTES
            || data[..2] != self.envelope[..2]
            || !matches!(data[3], KIND_MEMBERSHIP | KIND_TAGGED)
        {
            return Err(Refused::Foreign);
        }
        if data[2] != VERSION {
            return Err(Refused::Version(data[2]));
        }
        if data[4..8] != self.envelope[4..8] {
            return Err(Refused::Cluster);
        }
        if data.len() > DATAGRAM_MAX {
            return Err(Refused::Malformed);
        }
        match (&self.secret, data[3]) {
            (None, KIND_MEMBERSHIP) => Ok(&data[ENVELOPE_BYTES..]),
            (Some(s), KIND_TAGGED) if data.len() >= ENVELOPE_BYTES + TAG_BYTES => {
                let (signed, tag) = data.split_at(data.len() - TAG_BYTES);
                match s.verify(TAG_LABEL, &[signed], tag) {
                    true => Ok(&signed[ENVELOPE_BYTES..]),
                    false => Err(Refused::Unauthenticated),
                }
            }
            _ => Err(Refused::Unauthenticated),
        }
    }

    fn io(&mut self, now_ms: u64) -> Io<'_> {
        let Membership {
            swim,
            envelope,
            secret,
            timers,
            timer_seq,
            transmits,
            notes,
            counters,
            members_changed,
            ..
        } = self;
        Io {
            swim,
            rt: Rt {
                now_ms,
                envelope,
                secret: secret.as_deref(),
                timers,
                timer_seq,
                transmits,
                notes,
                counters,
                members_changed,
            },
        }
    }
}

/// foca and the runtime it reports to, borrowed apart.
struct Io<'a> {
    swim: &'a mut Swim,
    rt: Rt<'a>,
}

/// What foca asks for, gathered for the `poll_*` methods.
struct Rt<'a> {
    now_ms: u64,
    envelope: &'a [u8; ENVELOPE_BYTES],
    secret: Option<&'a super::secret::ClusterSecret>,
    timers: &'a mut BTreeMap<(u64, u64), Timer<Node>>,
    timer_seq: &'a mut u64,
    transmits: &'a mut VecDeque<Transmit>,
    notes: &'a mut VecDeque<MemberEvent>,
    counters: &'a mut MembershipCounters,
    members_changed: &'a mut bool,
}

impl foca::Runtime<Node> for Rt<'_> {
    fn notify(&mut self, n: Notification<'_, Node>) {
        let event = match n {
            // Members: what changed is worked out once foca is done
            // (`Membership::reconcile`).
            Notification::MemberUp(_) | Notification::MemberDown(_) | Notification::Rename(..) => {
                *self.members_changed = true;
                return;
            }
            Notification::Active => MemberEvent::Joined,
            Notification::Idle => MemberEvent::Alone,
            Notification::Rejoin(me) => MemberEvent::Rejoined(me.clone()),
            // Only when `Identity::renew` gives nothing, which takes 2^32
            // rejoins of one run.
            Notification::Defunct => return,
        };
        self.notes.push_back(event);
    }

    fn send_to(&mut self, to: Node, data: &[u8]) {
        let mut out = BytesMut::with_capacity(ENVELOPE_BYTES + data.len() + TAG_BYTES);
        out.put_slice(self.envelope);
        out.put_slice(data);
        if let Some(s) = self.secret {
            let tag = s.tag(TAG_LABEL, &[&out]);
            out.put_slice(&tag[..TAG_BYTES]);
        }
        self.counters.datagrams_out += 1;
        self.transmits.push_back(Transmit {
            to: to.addr,
            data: out.freeze(),
        });
    }

    fn submit_after(&mut self, event: Timer<Node>, after: Duration) {
        *self.timer_seq += 1;
        let due = self.now_ms.saturating_add(millis(after));
        self.timers.insert((due, *self.timer_seq), event);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The envelope that starts every membership datagram of the cluster
/// named `cluster_name` (see the module docs).
pub fn envelope(cluster_name: &str) -> [u8; ENVELOPE_BYTES] {
    let mut e = [b'S', b'M', VERSION, KIND_MEMBERSHIP, 0, 0, 0, 0];
    e[4..].copy_from_slice(&crc32c::crc32c(cluster_name.as_bytes()).to_be_bytes());
    e
}

/// foca's postcard codec, refusing a peer that claims no name.
struct Wire;

/// A membership message that could not be read.
#[derive(Debug, Error)]
#[error("undecodable membership message")]
struct WireError;

impl Codec<Node> for Wire {
    type Error = WireError;

    fn encode_header(&mut self, header: &Header<Node>, buf: impl BufMut) -> Result<(), WireError> {
        PostcardCodec
            .encode_header(header, buf)
            .map_err(|_| WireError)
    }

    fn decode_header(&mut self, buf: impl Buf) -> Result<Header<Node>, WireError> {
        let header: Header<Node> = PostcardCodec.decode_header(buf).map_err(|_| WireError)?;
        if header.src.name.is_unknown() {
            return Err(WireError);
        }
        Ok(header)
    }

    fn encode_member(&mut self, member: &Member<Node>, buf: impl BufMut) -> Result<(), WireError> {
        PostcardCodec
            .encode_member(member, buf)
            .map_err(|_| WireError)
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<Member<Node>, WireError> {
        let member: Member<Node> = PostcardCodec.decode_member(buf).map_err(|_| WireError)?;
        if member.id().name.is_unknown() {
            return Err(WireError);
        }
        Ok(member)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(name: &str) -> MembershipSettings {
        MembershipSettings {
            probe_interval: Duration::from_millis(500),
            probe_timeout: Duration::from_millis(200),
            suspect_timeout: Duration::from_millis(1000),
            join_interval: Duration::from_millis(1000),
            cluster_name: name.into(),
            secret: None,
        }
    }

    fn with_secret(name: &str, secret: &[u8]) -> MembershipSettings {
        let secret = crate::cluster::secret::ClusterSecret::new(secret).unwrap();
        MembershipSettings {
            secret: Some(std::sync::Arc::new(secret)),
            ..settings(name)
        }
    }

    /// Nodes that hold the same secret find each other; a node with
    /// another secret, or none, is refused by the others (counted), and
    /// refuses their tagged datagrams; a tag changed in one byte does not
    /// check.
    #[test]
    fn only_nodes_with_the_cluster_secret_join() {
        let key = b"a secret of 24 bytes ...";
        let a = node("a", 1);
        let mut nodes = vec![
            Membership::new(a.clone(), &[], &with_secret("c", key), 1),
            Membership::new(node("b", 2), &[a.addr], &with_secret("c", key), 2),
        ];
        nodes[1].start(0);
        exchange(&mut nodes, 0);
        assert_eq!(nodes[0].members().count(), 1, "b joined");
        nodes.push(Membership::new(
            node("x", 3),
            &[a.addr],
            &with_secret("c", b"another secret, 24 bytes"),
            3,
        ));
        nodes.push(Membership::new(node("y", 4), &[a.addr], &settings("c"), 4));
        nodes[2].start(0);
        nodes[3].start(0);
        exchange(&mut nodes, 0);
        let names: Vec<_> = nodes[0].members().map(|n| n.name.to_string()).collect();
        assert_eq!(names, ["b"]);
        assert_eq!(nodes[0].counters().refused_unauthenticated, 2);
        assert_eq!(nodes[2].members().count(), 0);
        assert_eq!(nodes[3].members().count(), 0);
        // A tag changed in its last byte.
        let mut x = Membership::new(node("z", 5), &[a.addr], &with_secret("c", key), 5);
        x.start(0);
        let mut data = x.poll_transmit().unwrap().data.to_vec();
        *data.last_mut().unwrap() ^= 1;
        assert_eq!(
            nodes[0].handle_datagram(0, &data),
            Err(Refused::Unauthenticated)
        );
    }

    fn node(name: &str, port: u16) -> Node {
        Node::new(
            NodeName::new(name).unwrap(),
            SocketAddr::from(([127, 0, 0, 1], port)),
            1,
            2,
        )
    }

    /// Deliver every datagram at once, in order, until none is left.
    fn exchange(nodes: &mut [Membership], now: u64) {
        loop {
            let mut sent = Vec::new();
            for m in nodes.iter_mut() {
                while let Some(t) = m.poll_transmit() {
                    sent.push(t);
                }
            }
            if sent.is_empty() {
                return;
            }
            for t in sent {
                if let Some(m) = nodes.iter_mut().find(|m| m.me().addr == t.to) {
                    let _ = m.handle_datagram(now, &t.data);
                }
            }
        }
    }

    /// Nodes a (port 1) and b (port 2, joining through a), exchanged until
    /// quiet.
    fn a_and_b() -> Vec<Membership> {
        let a = node("a", 1);
        let mut nodes = vec![
            Membership::new(a.clone(), &[], &settings("c"), 1),
            Membership::new(node("b", 2), &[a.addr], &settings("c"), 2),
        ];
        nodes[1].start(0);
        exchange(&mut nodes, 0);
        nodes
    }

    #[test]
    fn two_nodes_find_each_other_through_one_join_address() {
        let mut nodes = a_and_b();
        assert_eq!(
            nodes[0].members().next().map(|n| n.name.as_str()),
            Some("b")
        );
        assert_eq!(
            nodes[1].members().next().map(|n| n.name.as_str()),
            Some("a")
        );
        let up: Vec<_> = std::iter::from_fn(|| nodes[0].poll_event()).collect();
        assert!(
            up.contains(&MemberEvent::Up(nodes[1].me().clone())),
            "{up:?}"
        );
    }

    /// Node b and a second node given the id "b" (another address, the
    /// same incarnation), then one given a's own id: a keeps the first b,
    /// ignores the others with an event each, and a later run of b at a
    /// new address replaces the first.
    #[test]
    fn a_second_node_with_an_id_in_use_is_ignored() {
        let mut nodes = a_and_b();
        let a = nodes[0].me().clone();
        let b = nodes[1].me().clone();
        nodes.push(Membership::new(node("b", 3), &[a.addr], &settings("c"), 3));
        nodes[2].start(0);
        exchange(&mut nodes, 0);
        nodes.push(Membership::new(node("a", 4), &[a.addr], &settings("c"), 4));
        nodes[3].start(0);
        exchange(&mut nodes, 0);
        let events: Vec<_> = std::iter::from_fn(|| nodes[0].poll_event()).collect();
        let ups: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                MemberEvent::Up(n) => Some(n.addr.port()),
                _ => None,
            })
            .collect();
        assert_eq!(ups, [2], "{events:?}");
        assert!(events.contains(&MemberEvent::Duplicate {
            node: nodes[2].me().clone(),
            known: Some(b.clone()),
        }));
        assert!(events.contains(&MemberEvent::Duplicate {
            node: nodes[3].me().clone(),
            known: None,
        }));
        assert_eq!(nodes[0].counters().duplicates, 2);
        // b restarted at port 5 (incarnation 2): it replaces port 2.
        let mut restarted = node("b", 5);
        restarted.incarnation = 2;
        nodes.push(Membership::new(
            restarted.clone(),
            &[a.addr],
            &settings("c"),
            5,
        ));
        nodes[4].start(0);
        exchange(&mut nodes, 0);
        let events: Vec<_> = std::iter::from_fn(|| nodes[0].poll_event()).collect();
        let moved = nodes[4].me().clone();
        assert!(
            events.contains(&MemberEvent::Replaced {
                old: b.clone(),
                new: moved.clone()
            }),
            "{events:?}"
        );
        // The new run leaves: the old one, still live here, does not come
        // back in its place (not within STALE_RUN_MS).
        nodes[4].leave(0);
        exchange(&mut nodes, 0);
        let events: Vec<_> = std::iter::from_fn(|| nodes[0].poll_event()).collect();
        assert_eq!(events, [MemberEvent::Down(moved)]);
        assert!(nodes[0].members().all(|n| n.name.as_str() != "b"));
    }

    #[test]
    fn datagrams_of_other_clusters_versions_and_programs_are_counted_and_ignored() {
        let a = node("a", 1);
        let mut ours = Membership::new(a.clone(), &[], &settings("c"), 1);
        let mut theirs = Membership::new(node("b", 2), &[a.addr], &settings("other"), 2);
        theirs.start(0);
        let hello = theirs.poll_transmit().unwrap().data;
        assert_eq!(ours.handle_datagram(0, &hello), Err(Refused::Cluster));
        let mut newer = hello.to_vec();
        newer[2] = VERSION + 1;
        assert_eq!(
            ours.handle_datagram(0, &newer),
            Err(Refused::Version(VERSION + 1))
        );
        assert_eq!(
            ours.handle_datagram(0, b"GET / HTTP/1.1"),
            Err(Refused::Foreign)
        );
        assert_eq!(ours.handle_datagram(0, b"SM"), Err(Refused::Foreign));
        let mut ours_envelope = ours.envelope.to_vec();
        ours_envelope.extend_from_slice(&[0xff; 40]);
        assert_eq!(
            ours.handle_datagram(0, &ours_envelope),
            Err(Refused::Malformed)
        );
        let mut too_long = ours.envelope.to_vec();
        too_long.resize(DATAGRAM_MAX + 1, 0);
        assert_eq!(ours.handle_datagram(0, &too_long), Err(Refused::Malformed));
        let c = ours.counters();
        assert_eq!(
            (
                c.refused_cluster,
                c.refused_version,
                c.refused_foreign,
                c.refused_malformed
            ),
            (1, 1, 2, 2)
        );
        assert_eq!(ours.live_peers(), 0);
    }

    #[test]
    fn a_peer_that_claims_no_name_is_refused() {
        let a = node("a", 1);
        let mut ours = Membership::new(a.clone(), &[], &settings("c"), 1);
        let mut nameless = node("x", 2);
        nameless.name = NodeName::unknown();
        let mut theirs = Membership::new(nameless, &[a.addr], &settings("c"), 2);
        theirs.start(0);
        let hello = theirs.poll_transmit().unwrap().data;
        assert_eq!(ours.handle_datagram(0, &hello), Err(Refused::Malformed));
        assert_eq!(ours.live_peers(), 0);
    }

    /// Random bytes behind a valid envelope never panic and never add a
    /// member.
    #[test]
    fn garbage_behind_a_valid_envelope_is_harmless() {
        let mut ours = Membership::new(node("a", 1), &[], &settings("c"), 1);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..2000usize {
            let mut d = ours.envelope.to_vec();
            for _ in 0..(len % 300) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                d.push(x as u8);
            }
            let _ = ours.handle_datagram(0, &d);
        }
        assert_eq!(ours.live_peers(), 0);
    }
}
