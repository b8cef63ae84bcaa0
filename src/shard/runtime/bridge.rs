//! The bridge's I/O on one shard: its links to the other nodes, and
//! nothing that decides.
//!
//! Shard-local. Shard `i` dials shard `i mod n` of every live peer (at the
//! peer's membership port + that shard) and sends it what its core routes
//! there; it accepts the links other nodes' shards dial to it and hands
//! the messages they bring to its core. Shard 0's link to each peer also
//! carries this node's routes (a snapshot when it comes up, then every
//! change: [`RouteFeed`]); shard 0 takes each peer's routes from the link
//! of the peer's shard 0 ([`RouteImport`]) and gives the changes to its
//! core, which broadcasts them to every shard's replica. Protocol and
//! framing are [`LinkSession`]'s; when to dial, the backoff and what waits
//! for a link are [`PeerLinks`]'; what goes on the links (messages, routes,
//! wills, retained messages, claims) is the core's. Peers come from shard
//! 0's membership as [`PeerEvent`]s.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use super::transport::Stream;
use crate::cluster::frame::{Frame, Hello, RefuseReason};
use crate::cluster::link::{LinkError, LinkEvent, LinkSession, LinkSettings};
use crate::cluster::node::{same_addr, Node};
use crate::cluster::peers::PeerLinks;
use crate::cluster::routes::{RouteFeed, RouteImport};
use crate::shard::notify::Notify;
use crate::shard::{BridgeOut, ClaimsSnapshot, RetainedSnapshot, ShardCore};
use crate::text::{quote, suppressed_note, LogGate};

use super::connection::{duplicate, listener_from, SharedStream};

/// A membership change, from shard 0 to every shard's bridge. Indices
/// are shard 0's, the same on every shard for the life of the process.
#[derive(Debug, Clone)]
pub(crate) enum PeerEvent {
    /// A node is up (or a newer run of it).
    Up {
        /// Its index.
        index: u16,
        /// The run.
        node: Node,
    },
    /// A node is down.
    Down {
        /// Its index.
        index: u16,
        /// The run that went down.
        node: Node,
    },
    /// New CONNECTs start (true) or stop being refused for want of a
    /// majority of the members (`cluster::quorum`).
    Quorum {
        /// Refuse them.
        refuse: bool,
    },
}

/// What one shard's bridge starts with.
pub(crate) struct BridgeStart {
    /// This shard's bridge port, bound and listening.
    pub(crate) listener: socket2::Socket,
    /// This shard's Hello.
    pub(crate) me: Hello,
    /// Membership changes from shard 0.
    pub(crate) events: crossbeam_channel::Receiver<PeerEvent>,
    /// New CONNECTs are refused at start (no majority of the members
    /// the data directory knows is up yet).
    pub(crate) refuse_connects: bool,
    /// Dial peers from this address (`cluster.listen`'s, when it is a
    /// concrete one), so they see the address they know this node by.
    pub(crate) dial_from: Option<std::net::IpAddr>,
    /// Link limits.
    pub(crate) settings: LinkSettings,
    /// Routes taken from one peer at most.
    pub(crate) routes_max: usize,
    /// At an orderly stop: how many of the node's shards have handed
    /// their last will changes to their links (shard 0 leaves the
    /// membership after them).
    pub(crate) handed_over: Arc<AtomicUsize>,
}

/// A running bridge, for the shard's orderly stop.
pub(crate) struct BridgeHandle {
    bridge: Rc<Bridge>,
    handed_over: Arc<AtomicUsize>,
}

/// How long an orderly stop waits for the wills to reach the peers.
const HAND_OVER_WAIT: Duration = Duration::from_secs(1);

impl BridgeHandle {
    /// The stopping shard has closed its connections: wait (at most
    /// `wait`, and [`HAND_OVER_WAIT`]) until every peer has read what that
    /// changed of its clients' wills (published, or waiting for their
    /// delay), so the peers publish only what is still due once this node
    /// leaves. A Ping after the changes is answered once the peer has read
    /// them.
    pub(crate) async fn hand_over(&self, wait: Duration) {
        let b = &self.bridge;
        let deadline = Instant::now() + wait.min(HAND_OVER_WAIT);
        while !b.core.bridge_idle() && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        let now = b.now_ms();
        let asked: Vec<(Rc<Link>, u64)> = b
            .up_links()
            .into_iter()
            .map(|l| {
                // Shard 0's Ping carries the route digest the peer checks.
                let ping = match b.me.shard {
                    0 => b.core.route_ping(),
                    _ => Frame::Ping { seq: 0, digest: 0 },
                };
                l.session.borrow_mut().force_send(now, &ping);
                l.wake.notify();
                let (pings, _) = l.session.borrow().pings_answered();
                (l, pings)
            })
            .collect();
        let answered = |(l, pings): &(Rc<Link>, u64)| {
            l.closed.get() || l.session.borrow().pings_answered().1 >= *pings
        };
        while !asked.iter().all(answered) && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        self.handed_over.fetch_add(1, Ordering::AcqRel);
    }

    /// Shard 0: wait (at most [`HAND_OVER_WAIT`] more) until every shard
    /// of the node has handed over, before leaving the membership.
    pub(crate) async fn all_handed_over(&self, wait: Duration) {
        let shards = usize::from(self.bridge.me.shards);
        let deadline = Instant::now() + wait.min(HAND_OVER_WAIT);
        while self.handed_over.load(Ordering::Acquire) < shards && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Claims per part of a link's first claims.
const CLAIMS_PER_FRAME: usize = 1024;
/// Bytes a link may hold unwritten before the next part of a claims or
/// retained snapshot is put on it.
const SNAPSHOT_BACKLOG_BYTES: usize = 1 << 20;
/// Links a shard accepts at once (beyond: closed at once).
const INBOUND_LINKS_MAX: usize = 1024;
/// Snapshot parts, in bytes of filters (routes) or wills.
const SNAPSHOT_CHUNK_BYTES: usize = 64 << 10;
/// How often links are ticked and due dials made.
const TICK: Duration = Duration::from_millis(50);

struct Link {
    id: u64,
    /// Outbound: the peer dialed. Inbound: the peer, once its Hello named a
    /// live member.
    peer: Cell<Option<u16>>,
    outbound: bool,
    session: RefCell<LinkSession>,
    stream: SharedStream,
    /// A second handle on the socket, to shut it down from any task.
    handle: socket2::Socket,
    wake: Notify,
    closed: Cell<bool>,
    /// Close once what is queued is written (after a Refuse).
    closing: Cell<bool>,
    /// The peer's Hello, once the link is up.
    hello: RefCell<Option<Hello>>,
    /// Outbound: how far this shard's claims have been sent.
    claims: RefCell<Option<ClaimsSnapshot>>,
    /// Outbound: how far this shard's retained messages have been sent.
    retained: RefCell<Option<RetainedSnapshot>>,
    /// Outbound on shard 0: the routes this link still needs.
    feed: RefCell<RouteFeed>,
    /// Outbound on shard 0: the route sequence number the peer has
    /// acknowledged.
    acked: Cell<u64>,
}

struct Bridge {
    core: Rc<ShardCore>,
    me: Hello,
    epoch: Instant,
    settings: LinkSettings,
    routes_max: usize,
    /// See [`BridgeStart::dial_from`].
    dial_from: Option<std::net::IpAddr>,
    /// Dials, backoff, frames waiting: which outbound link is whose.
    peers: RefCell<PeerLinks>,
    /// Outbound links by id.
    outbound: RefCell<HashMap<u64, Rc<Link>>>,
    inbound: RefCell<Vec<Rc<Link>>>,
    /// Shard 0: each peer's routes, and the link that carries them.
    imports: RefCell<HashMap<u16, (RouteImport, u64)>>,
    next_id: Cell<u64>,
    log_gate: RefCell<LogGate>,
    /// Messages for a peer with no link up, or whose link was full.
    dropped: Cell<u64>,
}

/// Start this shard's bridge: its accept loop, its control loop (peers,
/// dials, ticks) and the task that moves its core's outbox onto links.
pub(crate) fn start(core: Rc<ShardCore>, start: BridgeStart) -> std::io::Result<BridgeHandle> {
    core.enable_cluster(Instant::now(), crate::persist::WallClock::now());
    core.set_refusing_connects(start.refuse_connects);
    let (listener, _handle) = listener_from(start.listener)?;
    let peers = PeerLinks::new(start.me.shard, start.settings.out_bytes_max);
    let bridge = Rc::new(Bridge {
        core,
        epoch: Instant::now(),
        routes_max: start.routes_max,
        dial_from: start.dial_from,
        me: start.me,
        settings: start.settings,
        peers: RefCell::new(peers),
        outbound: RefCell::new(HashMap::new()),
        inbound: RefCell::new(Vec::new()),
        imports: RefCell::new(HashMap::new()),
        next_id: Cell::new(0),
        log_gate: RefCell::new(LogGate::new(10, Duration::from_secs(10))),
        dropped: Cell::new(0),
    });
    bridge.recompute_acks();
    let handle = BridgeHandle {
        bridge: bridge.clone(),
        handed_over: start.handed_over,
    };
    glommio::spawn_local(accept_loop(bridge.clone(), listener)).detach();
    glommio::spawn_local(outbox_loop(bridge.clone())).detach();
    let events = start.events;
    glommio::spawn_local(async move {
        loop {
            while let Ok(ev) = events.try_recv() {
                bridge.on_peer_event(ev);
            }
            bridge.dial_due();
            bridge.tick_links();
            glommio::timer::sleep(TICK).await;
        }
    })
    .detach();
    Ok(handle)
}

impl Bridge {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn warn(&self, line: std::fmt::Arguments<'_>) {
        if let Some(n) = self.log_gate.borrow_mut().allow(Instant::now()) {
            log::warn!(
                "cluster: shard {}: {line}{}",
                self.me.shard,
                suppressed_note(n)
            );
        }
    }

    fn on_peer_event(&self, ev: PeerEvent) {
        log::debug!("cluster: shard {}: {ev:?}", self.me.shard);
        match ev {
            PeerEvent::Up { index, node } => {
                self.core.peer_named(index, node.name.as_str());
                let incarnation_up = node.incarnation;
                let replaced = self.peers.borrow_mut().up(index, node, self.now_ms());
                if let Some(incarnation) = replaced.ended_run {
                    // Restarted before it was declared down: the old run
                    // ended all the same, and its wills go out.
                    self.core.peer_run_ended(Instant::now(), index, incarnation);
                }
                // A run that rejoined after being declared down: its will
                // frames count again.
                self.core.peer_run_up(index, incarnation_up);
                self.count_dropped(replaced.dropped);
                if let Some(id) = replaced.close {
                    self.close_outbound(id, "a newer run of the node is up");
                }
                self.recompute_acks();
            }
            PeerEvent::Down { index, node } => {
                let Some((link, dropped)) = self.peers.borrow_mut().down(index, &node) else {
                    return;
                };
                self.core
                    .peer_run_ended(Instant::now(), index, node.incarnation);
                self.count_dropped(dropped);
                if let Some(id) = link {
                    self.close_outbound(id, "the node is down");
                }
                if let Some((mut import, _)) = self.imports.borrow_mut().remove(&index) {
                    let removals = import.clear();
                    self.core.remote_routes(index, &removals, None);
                }
                // Every link from that run: nothing it still sends counts.
                let from_it: Vec<Rc<Link>> = self
                    .inbound
                    .borrow()
                    .iter()
                    .filter(|l| l.peer.get() == Some(index))
                    .cloned()
                    .collect();
                for l in from_it {
                    self.close(&l, "the node is down");
                }
                self.recompute_acks();
            }
            PeerEvent::Quorum { refuse } => self.core.set_refusing_connects(refuse),
        }
    }

    fn close_outbound(&self, id: u64, why: &str) {
        let link = self.outbound.borrow().get(&id).cloned();
        if let Some(l) = link {
            self.close(&l, why);
        }
    }

    /// Messages that waited for a peer's link and will not be sent.
    fn count_dropped(&self, n: usize) {
        if n > 0 {
            self.dropped.set(self.dropped.get() + n as u64);
            self.warn(format_args!(
                "{n} messages that waited for a node's link were dropped: that run of the node \
                 ended ({} so far)",
                self.dropped.get()
            ));
        }
    }

    /// Tell the core how many peers have a link up from this shard (a
    /// CONNACK waits for their acknowledgements of its claim), and on
    /// shard 0 how far every such peer has acknowledged this node's routes
    /// (subscribers' SUBACKs wait for it). A peer without a link up is not
    /// waited for: its link starts from a snapshot that has the route and
    /// the claim.
    fn recompute_acks(&self) {
        self.core.set_peer_links_up(self.up_links().len());
        if self.me.shard != 0 {
            return;
        }
        let upto = self
            .outbound
            .borrow()
            .values()
            .filter(|l| !l.closed.get() && l.session.borrow().is_up())
            .map(|l| l.acked.get())
            .min()
            .unwrap_or(u64::MAX);
        self.core.routes_acked(upto);
    }

    fn dial_due(self: &Rc<Self>) {
        let due = self.peers.borrow_mut().due(self.now_ms());
        for (index, addr, node) in due {
            glommio::spawn_local(dial(self.clone(), index, addr, node)).detach();
        }
    }

    /// Keep a message for a peer whose link is not up yet, within the
    /// link's output bound; false (dropped) past it or for a peer not up.
    fn hold_for_link(&self, index: u16, frame: Frame) -> bool {
        let bytes = match &frame {
            Frame::Publish(m) => m.message.cost_bytes() + 64,
            _ => 64,
        };
        self.peers.borrow_mut().hold(index, frame, bytes)
    }

    /// The outbound links whose handshake is done.
    fn up_links(&self) -> Vec<Rc<Link>> {
        self.outbound
            .borrow()
            .values()
            .filter(|l| !l.closed.get() && l.session.borrow().is_up())
            .cloned()
            .collect()
    }

    /// Put a change of this shard's (a will, a retained message) on every
    /// outbound link up. Like routes, never dropped: a link that falls
    /// this far behind is closed and starts over from a snapshot.
    /// Returns how many links it went on.
    fn to_every_link(&self, now: u64, frame: &Frame, what: &str) -> usize {
        let links = self.up_links();
        for l in &links {
            self.force_on(l, now, frame, what);
        }
        links.len()
    }

    /// Put `frame` (a change of `what`) on link `l` past its output bound;
    /// a link four times past it is closed (its peer resyncs).
    fn force_on(&self, l: &Rc<Link>, now: u64, frame: &Frame, what: &str) {
        l.session.borrow_mut().force_send(now, frame);
        l.wake.notify();
        if l.session.borrow().out_bytes() > self.settings.out_bytes_max.saturating_mul(4) {
            self.close(l, &format!("{what} changes not read"));
        }
    }

    /// The outbound link to peer `node`, once its handshake is done.
    fn up_link_to(&self, node: u16) -> Option<Rc<Link>> {
        let id = self.peers.borrow().up_link(node)?;
        let link = self.outbound.borrow().get(&id).cloned();
        link.filter(|l| l.session.borrow().is_up())
    }

    /// Put the next parts of this shard's claims, then of its retained
    /// messages, on an outbound link that came up, while it holds little
    /// unwritten.
    fn feed_snapshots(&self, link: &Rc<Link>) {
        let now = self.now_ms();
        while !link.closed.get() && link.session.borrow().out_bytes() < SNAPSHOT_BACKLOG_BYTES {
            let Some(part) = self.next_snapshot_part(link) else {
                return;
            };
            if let Some(f) = part {
                link.session.borrow_mut().force_send(now, &f);
                link.wake.notify();
            }
        }
    }

    /// The next part of what a link that came up still needs (it may be
    /// empty); None when nothing is left.
    fn next_snapshot_part(&self, link: &Link) -> Option<Option<Frame>> {
        let mut claims = link.claims.borrow_mut();
        if let Some(progress) = claims.as_mut() {
            let part = self.core.claims_snapshot(progress, CLAIMS_PER_FRAME);
            if progress.is_done() {
                *claims = None;
            }
            return Some(part);
        }
        let mut retained = link.retained.borrow_mut();
        let progress = retained.as_mut()?;
        let part = self
            .core
            .retained_snapshot(progress, SNAPSHOT_CHUNK_BYTES, Instant::now());
        if progress.is_done() {
            *retained = None;
        }
        Some(part)
    }

    fn tick_links(&self) {
        let now = self.now_ms();
        let mut links: Vec<Rc<Link>> = self.inbound.borrow().clone();
        links.extend(self.outbound.borrow().values().cloned());
        for link in links {
            if link.claims.borrow().is_some() || link.retained.borrow().is_some() {
                self.feed_snapshots(&link);
            }
            let tick = link.session.borrow_mut().handle_tick(now);
            match tick {
                Err(e) => self.close(&link, &e.to_string()),
                Ok(true) => {
                    let ping = if link.outbound && self.me.shard == 0 {
                        self.core.route_ping()
                    } else {
                        Frame::Ping { seq: 0, digest: 0 }
                    };
                    let _ = link.session.borrow_mut().send(now, &ping);
                    link.wake.notify();
                }
                Ok(false) => {}
            }
        }
    }

    fn new_link(
        &self,
        stream: TcpStream,
        outbound: Option<(u16, &Node)>,
    ) -> std::io::Result<Rc<Link>> {
        stream.set_nodelay(true)?;
        let handle = duplicate(&stream)?;
        let id = self.next_id.get() + 1;
        self.next_id.set(id);
        let now = self.now_ms();
        let session = match outbound {
            Some((_, node)) => LinkSession::dialed(
                self.me.clone(),
                (node.name.clone(), node.incarnation, node.addr),
                self.settings.clone(),
                self.epoch,
                now,
            ),
            None => LinkSession::accepted(self.me.clone(), self.settings.clone(), self.epoch, now),
        };
        Ok(Rc::new(Link {
            id,
            peer: Cell::new(outbound.map(|(i, _)| i)),
            outbound: outbound.is_some(),
            session: RefCell::new(session),
            stream: SharedStream(Rc::new(RefCell::new(Stream::plain(stream)))),
            handle,
            wake: Notify::default(),
            closed: Cell::new(false),
            closing: Cell::new(false),
            hello: RefCell::new(None),
            claims: RefCell::new(None),
            retained: RefCell::new(None),
            feed: RefCell::new(RouteFeed::new()),
            acked: Cell::new(0),
        }))
    }

    fn close(&self, link: &Rc<Link>, why: &str) {
        if link.closed.replace(true) {
            return;
        }
        let _ = link.handle.shutdown(std::net::Shutdown::Both);
        link.wake.notify();
        self.inbound.borrow_mut().retain(|l| l.id != link.id);
        let peer = link.peer.get();
        if link.outbound {
            self.outbound.borrow_mut().remove(&link.id);
            if let Some(index) = peer {
                // Dial again after the backoff (started over if the link
                // had been up a while).
                self.peers
                    .borrow_mut()
                    .link_closed(index, link.id, self.now_ms());
            }
            self.recompute_acks();
        }
        let name = peer
            .and_then(|i| self.peers.borrow().node(i).map(|n| n.name.to_string()))
            .unwrap_or_else(|| "?".into());
        let dir = if link.outbound { "to" } else { "from" };
        log::debug!(
            "cluster: shard {}: link {dir} node {} closed: {why}",
            self.me.shard,
            quote(&name)
        );
    }

    /// Act on what a link's session reported.
    fn process(&self, link: &Rc<Link>) {
        loop {
            let ev = link.session.borrow_mut().poll_event();
            let Some(ev) = ev else {
                break;
            };
            match ev {
                LinkEvent::Up(h) => self.link_up(link, h),
                LinkEvent::Frame(f) => self.frame(link, f),
            }
            if link.closed.get() {
                return;
            }
        }
        link.wake.notify();
    }

    fn link_up(&self, link: &Rc<Link>, h: Hello) {
        let now = self.now_ms();
        if link.outbound {
            let Some(index) = link.peer.get() else {
                return;
            };
            *link.hello.borrow_mut() = Some(h.clone());
            // The wills of this shard's clients, whole, before any change.
            let wills = self
                .core
                .will_snapshot(SNAPSHOT_CHUNK_BYTES, Instant::now());
            let mut s = link.session.borrow_mut();
            for f in &wills {
                s.force_send(now, f);
            }
            drop(s);
            // Its live connections' claims (so connections a partition
            // let live on both sides meet) and its retained messages, a
            // part at a time as the link drains (`feed_snapshots`).
            *link.claims.borrow_mut() = Some(ClaimsSnapshot::default());
            *link.retained.borrow_mut() = Some(RetainedSnapshot::default());
            self.feed_snapshots(link);
            if self.me.shard == 0 {
                let frames = self
                    .core
                    .start_route_feed(&mut link.feed.borrow_mut(), SNAPSHOT_CHUNK_BYTES);
                let mut s = link.session.borrow_mut();
                for f in &frames {
                    // Past the output bound too: routes are never dropped.
                    s.force_send(now, f);
                }
                drop(s);
            }
            self.recompute_acks();
            // Messages that waited for the link, in order, before any new
            // one (they were taken within the output bound).
            let pending = self
                .peers
                .borrow_mut()
                .link_up(index, link.id, self.now_ms());
            let mut s = link.session.borrow_mut();
            for f in &pending {
                s.force_send(now, f);
            }
            drop(s);
            log::info!(
                "cluster: shard {}: link to node {} (its shard {}) is up",
                self.me.shard,
                quote(h.node.as_str()),
                h.shard
            );
            return;
        }
        let peers = self.peers.borrow();
        let index = peers
            .index_of(h.node.as_str(), h.incarnation)
            // The node membership knows by that id, not another given it.
            .filter(|&i| peers.node(i).is_some_and(|n| same_addr(n.addr, h.addr)))
            // Its shard count as its membership says: a peer cannot make
            // room for more tables (of wills) than it has shards.
            .filter(|&i| peers.node(i).is_some_and(|n| n.shards == h.shards));
        drop(peers);
        let Some(index) = index else {
            link.session.borrow_mut().refuse(
                now,
                RefuseReason::NotMember,
                "not a live member here (yet)",
            );
            // The writer closes the link once the Refuse is out.
            link.closing.set(true);
            link.wake.notify();
            return;
        };
        link.peer.set(Some(index));
        *link.hello.borrow_mut() = Some(h.clone());
        link.session.borrow_mut().welcome(now);
        if self.me.shard == 0 && h.shard == 0 {
            let mut imports = self.imports.borrow_mut();
            let entry = imports
                .entry(index)
                .or_insert_with(|| (RouteImport::new(self.routes_max), link.id));
            let older = std::mem::replace(&mut entry.1, link.id);
            drop(imports);
            if older != link.id {
                let old = self
                    .inbound
                    .borrow()
                    .iter()
                    .find(|l| l.id == older)
                    .cloned();
                if let Some(old) = old {
                    self.close(&old, "replaced by a newer link");
                }
            }
        }
    }

    fn frame(&self, link: &Rc<Link>, f: Frame) {
        if link.closing.get() {
            return;
        }
        if let (Frame::Claims { .. } | Frame::ClaimAcks(_), false) = (&f, link.outbound) {
            let node = link.hello.borrow().as_ref().map(|h| h.node.clone());
            let (Some(node), Some(index)) = (node, link.peer.get()) else {
                return;
            };
            match f {
                Frame::Claims { claims, answer } => {
                    let from = (node.as_str(), index);
                    self.core
                        .handle_remote_claims(Instant::now(), from, claims, answer);
                }
                Frame::ClaimAcks(acks) => self.core.handle_claim_acks(acks),
                _ => {}
            }
            return;
        }
        if let (Frame::Retained(_), false) = (&f, link.outbound) {
            if let (Frame::Retained(entries), Some(_)) = (f, link.peer.get()) {
                self.core.handle_remote_retained(Instant::now(), entries);
            }
            return;
        }
        match (&f, link.outbound) {
            (Frame::Publish(m), false) if link.peer.get().is_some() => {
                self.core.handle_remote_publish(Instant::now(), m.clone());
            }
            (
                Frame::RouteSnapshot { .. } | Frame::RouteDelta { .. } | Frame::Ping { .. },
                false,
            ) => {
                let Some(index) = link.peer.get() else {
                    return;
                };
                let mut imports = self.imports.borrow_mut();
                let Some((import, route_link)) = imports.get_mut(&index) else {
                    return;
                };
                if *route_link != link.id {
                    return;
                }
                match import.apply(&f) {
                    Ok(applied) => {
                        drop(imports);
                        // Acknowledged once every shard here has them
                        // (BridgeOut::RouteAck).
                        self.core
                            .remote_routes(index, &applied.changes, applied.ack);
                    }
                    Err(e) => {
                        drop(imports);
                        self.warn(format_args!("routes from a peer refused: {e}; resyncing"));
                        self.close(link, "route error");
                    }
                }
            }
            (Frame::WillSnapshot { .. } | Frame::WillSet(_) | Frame::WillClear { .. }, false) => {
                let (Some(index), Some(h)) = (link.peer.get(), link.hello.borrow().clone()) else {
                    return;
                };
                let taken = self
                    .core
                    .peer_wills(Instant::now(), index, h.incarnation, h.shard, &f);
                if let Err(e) = taken {
                    self.warn(format_args!(
                        "wills from node {} refused: {e}; resyncing",
                        quote(h.node.as_str())
                    ));
                    self.close(link, "will error");
                }
            }
            (Frame::RouteAck { seq }, true) => {
                if self.me.shard == 0 && *seq > link.acked.get() {
                    link.acked.set(*seq);
                    self.recompute_acks();
                }
            }
            (Frame::Ping { .. }, true) => {}
            _ => {
                self.warn(format_args!("unexpected bridge frame; closing the link"));
                self.close(link, "unexpected frame");
            }
        }
    }
}

async fn accept_loop(bridge: Rc<Bridge>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                bridge.warn(format_args!("bridge accept failed: {e}"));
                glommio::timer::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if bridge.inbound.borrow().len() >= INBOUND_LINKS_MAX {
            drop(stream);
            bridge.warn(format_args!(
                "more than {INBOUND_LINKS_MAX} bridge links; a new one was closed"
            ));
            continue;
        }
        match bridge.new_link(stream, None) {
            Ok(link) => {
                bridge.inbound.borrow_mut().push(link.clone());
                spawn_io(bridge.clone(), link);
            }
            Err(e) => bridge.warn(format_args!("cannot set up a bridge link: {e}")),
        }
    }
}

async fn dial(bridge: Rc<Bridge>, index: u16, addr: SocketAddr, node: Node) {
    log::debug!(
        "cluster: shard {}: dialing node {} at {addr}",
        bridge.me.shard,
        quote(node.name.as_str())
    );
    // A peer of the other address family is dialed from any address.
    let from = bridge.dial_from.filter(|ip| ip.is_ipv4() == addr.is_ipv4());
    let stream = match from {
        None => TcpStream::connect_timeout(addr, DIAL_TIMEOUT)
            .await
            .map_err(|e| e.to_string()),
        Some(ip) => glommio::executor()
            .spawn_blocking(move || connect_from(ip, addr))
            .await
            .map(TcpStream::from)
            .map_err(|e| format!("from {ip}: {e}")),
    };
    let link = stream.and_then(|s| {
        bridge
            .new_link(s, Some((index, &node)))
            .map_err(|e| e.to_string())
    });
    let link = match link {
        Ok(l) => l,
        Err(e) => {
            log::debug!(
                "cluster: shard {}: cannot reach node {} at {addr}: {e}",
                bridge.me.shard,
                quote(node.name.as_str())
            );
            bridge
                .peers
                .borrow_mut()
                .dial_failed(index, bridge.now_ms());
            return;
        }
    };
    let still = bridge.peers.borrow_mut().dialed(index, &node, link.id);
    if still {
        bridge.outbound.borrow_mut().insert(link.id, link.clone());
    } else {
        bridge.close(&link, "the node went away while dialing");
        return;
    }
    spawn_io(bridge, link);
}

/// How long a dial waits for the peer to answer.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);

/// A TCP connection to `addr` from address `ip` (blocking: run off the
/// shard's thread).
fn connect_from(ip: std::net::IpAddr, addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SocketAddr::new(ip, 0).into())?;
    socket.connect_timeout(&addr.into(), DIAL_TIMEOUT)?;
    Ok(socket)
}

fn spawn_io(bridge: Rc<Bridge>, link: Rc<Link>) {
    // The Hello is queued already.
    link.wake.notify();
    let (b, l) = (bridge.clone(), link.clone());
    glommio::spawn_local(async move {
        let mut stream = l.stream.clone();
        while !l.closed.get() {
            l.wake.wait().await;
            loop {
                let out = l.session.borrow_mut().poll_transmit();
                let Some(bytes) = out else {
                    break;
                };
                if let Err(e) = stream.write_all(&bytes).await {
                    b.close(&l, &format!("write: {e}"));
                    return;
                }
            }
            if l.closing.get() {
                b.close(&l, "refused");
                return;
            }
            if l.claims.borrow().is_some() || l.retained.borrow().is_some() {
                b.feed_snapshots(&l);
            }
        }
    })
    .detach();
    glommio::spawn_local(async move {
        let mut stream = link.stream.clone();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match stream.read(&mut buf).await {
                Ok(0) => {
                    bridge.close(&link, "closed by the peer");
                    return;
                }
                Ok(n) => n,
                Err(e) => {
                    bridge.close(&link, &format!("read: {e}"));
                    return;
                }
            };
            if link.closed.get() {
                return;
            }
            let now = bridge.now_ms();
            let read = link.session.borrow_mut().handle_bytes(now, &buf[..n]);
            // Events before the error (a Hello, then garbage) still count.
            bridge.process(&link);
            if let Err(e) = read {
                // A peer that does not know this node yet refuses it: the
                // usual race at a join, retried after a backoff.
                let expected = matches!(
                    e,
                    LinkError::Refused {
                        reason: RefuseReason::NotMember,
                        ..
                    }
                );
                if !expected {
                    bridge.warn(format_args!("bridge link error: {e}"));
                }
                bridge.close(&link, &e.to_string());
                return;
            }
        }
    })
    .detach();
}

async fn outbox_loop(bridge: Rc<Bridge>) {
    let Some(wake) = bridge.core.bridge_wake() else {
        return;
    };
    loop {
        wake.wait().await;
        while let Some(out) = bridge.core.poll_bridge() {
            let now = bridge.now_ms();
            match out {
                BridgeOut::Publish { node, publish } => {
                    let frame = Frame::Publish(publish);
                    let sent = match bridge.up_link_to(node) {
                        Some(l) => {
                            let ok = l.session.borrow_mut().send(now, &frame).is_ok();
                            l.wake.notify();
                            ok
                        }
                        None => bridge.hold_for_link(node, frame),
                    };
                    if !sent {
                        bridge.dropped.set(bridge.dropped.get() + 1);
                        bridge.warn(format_args!(
                            "a message for node {node} was dropped: no link up, or its output full \
                             ({} so far)",
                            bridge.dropped.get()
                        ));
                    }
                }
                BridgeOut::RouteAck { node, seq } => {
                    let route_link = bridge.imports.borrow().get(&node).map(|(_, id)| *id);
                    let link = route_link.and_then(|id| {
                        bridge.inbound.borrow().iter().find(|l| l.id == id).cloned()
                    });
                    if let Some(l) = link {
                        l.session
                            .borrow_mut()
                            .force_send(now, &Frame::RouteAck { seq });
                        l.wake.notify();
                    }
                }
                BridgeOut::Retained(entry) => {
                    bridge.to_every_link(now, &Frame::Retained(vec![entry]), "retained");
                }
                BridgeOut::Will(frame) => {
                    bridge.to_every_link(now, &frame, "will");
                }
                BridgeOut::Claim(claim) => {
                    let stamp = claim.stamp;
                    let frame = Frame::Claims {
                        claims: vec![claim],
                        answer: true,
                    };
                    let links = bridge.to_every_link(now, &frame, "claim");
                    // Its CONNACK waits for that many acknowledgements.
                    bridge.core.claim_sent(stamp, links);
                }
                BridgeOut::ClaimAck { node, claim } => {
                    let frame = Frame::ClaimAcks(vec![claim]);
                    match bridge.up_link_to(node) {
                        Some(l) => bridge.force_on(&l, now, &frame, "claim"),
                        None => {
                            // Dropped past the bound: the claimant's CONNACK
                            // then waits its CLAIM_WAIT.
                            bridge.hold_for_link(node, frame);
                        }
                    }
                }
                BridgeOut::Route { seq, change } => {
                    let links: Vec<Rc<Link>> = bridge.outbound.borrow().values().cloned().collect();
                    for l in links {
                        // Routes are never dropped; a peer that reads none
                        // of them loses the link and resyncs.
                        let frame = l.feed.borrow_mut().change(seq, &change);
                        if let Some(f) = frame {
                            bridge.force_on(&l, now, &f, "route");
                        }
                    }
                }
            }
        }
        glommio::yield_if_needed().await;
    }
}
