//! Cluster membership's I/O, on shard 0: the UDP socket, the clock and
//! the log lines; every decision is [`Membership`]'s.
//!
//! Two tasks share the membership: the receiver hands it each datagram
//! and wakes the driver; the driver runs its timers, sends what it gives,
//! logs its events and sleeps until its next timer or the next wake.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::net::UdpSocket;

use std::collections::HashMap;

use crate::cluster::membership::{MemberEvent, Membership, DATAGRAM_MAX};
use crate::cluster::node::{Node, NodeName};

use super::bridge::PeerEvent;
use super::quorum::Quorum;
use crate::shard::notify::Notify;
use crate::text::{quote, suppressed_note, LogGate};

/// What shard 0 runs membership with: the bound socket, the value, and
/// a lane to every shard's bridge (its own included).
pub(crate) struct ClusterStart {
    pub(crate) socket: socket2::Socket,
    pub(crate) membership: Membership,
    pub(crate) bridges: Vec<crossbeam_channel::Sender<PeerEvent>>,
    /// The node's members and majority (shared with the admin API).
    pub(crate) quorum: Arc<Quorum>,
}

/// Live peers by index, as told to the bridges: each node name keeps its
/// index for the life of the process; each change is told once.
#[derive(Default)]
struct Peers {
    indices: HashMap<NodeName, u16>,
    live: HashMap<u16, Node>,
}

impl Peers {
    fn index(&mut self, name: &NodeName) -> u16 {
        let next = self.indices.len() as u16;
        *self.indices.entry(name.clone()).or_insert(next)
    }

    fn up(&mut self, node: &Node, out: &mut Vec<PeerEvent>) {
        let index = self.index(&node.name);
        if self.live.get(&index) == Some(node) {
            return;
        }
        let up = PeerEvent::Up {
            index,
            node: node.clone(),
        };
        match self.live.insert(index, node.clone()) {
            // A new run (a restart) replaces the old one first: the old
            // run's end is handled with the new one's start, and its Down
            // after that changes nothing (it would make the node after it
            // take over sessions that the new run recovered from its own
            // log).
            Some(old) if old.incarnation != node.incarnation => {
                out.push(up);
                out.push(PeerEvent::Down { index, node: old });
            }
            Some(old) => {
                out.push(PeerEvent::Down { index, node: old });
                out.push(up);
            }
            None => out.push(up),
        }
    }

    fn down(&mut self, node: &Node, out: &mut Vec<PeerEvent>) {
        let index = self.index(&node.name);
        if self.live.get(&index) == Some(node) {
            self.live.remove(&index);
            out.push(PeerEvent::Down {
                index,
                node: node.clone(),
            });
        }
    }
}

/// The running membership, for the shard's stop.
pub(crate) struct MembershipTask {
    state: Rc<State>,
    tasks: Vec<glommio::task::JoinHandle<()>>,
}

struct State {
    membership: RefCell<Membership>,
    peers: RefCell<Peers>,
    bridges: Vec<crossbeam_channel::Sender<PeerEvent>>,
    quorum: Arc<Quorum>,
    socket: UdpSocket,
    wake: Notify,
    epoch: Instant,
}

impl State {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Send what the membership has queued and log its events.
    async fn flush(&self) {
        let (out, events) = {
            let mut m = self.membership.borrow_mut();
            let out: Vec<_> = std::iter::from_fn(|| m.poll_transmit()).collect();
            let events: Vec<_> = std::iter::from_fn(|| m.poll_event()).collect();
            (out, events)
        };
        self.quorum.member_events(&events);
        let counters = self.membership.borrow().counters();
        self.quorum.datagram_counters(counters);
        let mut told = Vec::new();
        for e in events {
            let m = self.membership.borrow();
            log_event(&m, &e);
            let mut peers = self.peers.borrow_mut();
            match &e {
                MemberEvent::Up(n) => peers.up(n, &mut told),
                MemberEvent::Down(n) => peers.down(n, &mut told),
                MemberEvent::Replaced { old, new } => {
                    peers.down(old, &mut told);
                    if m.members().any(|x| x == new) {
                        peers.up(new, &mut told);
                    }
                }
                MemberEvent::Joined
                | MemberEvent::Alone
                | MemberEvent::Rejoined(_)
                | MemberEvent::Duplicate { .. } => {}
            }
        }
        for ev in told {
            for b in &self.bridges {
                let _ = b.send(ev.clone());
            }
        }
        for t in out {
            // A lost datagram is what SWIM is built for; an unreachable
            // peer shows as a failed probe, not here.
            if let Err(e) = self.socket.send_to(&t.data, t.to).await {
                log::debug!("cluster: cannot send to {}: {e}", t.to);
            }
        }
    }
}

/// Start membership on this shard: announce to the join addresses and
/// spawn the receiver and the driver.
pub(crate) fn start(cluster: ClusterStart) -> MembershipTask {
    let ClusterStart {
        socket,
        membership,
        bridges,
        quorum,
    } = cluster;
    let socket = UdpSocket::from(socket);
    let state = Rc::new(State {
        membership: RefCell::new(membership),
        peers: RefCell::new(Peers::default()),
        bridges,
        quorum,
        socket,
        wake: Notify::default(),
        epoch: Instant::now(),
    });
    state.membership.borrow_mut().start(state.now_ms());
    let receiver = glommio::spawn_local(receive_loop(state.clone())).detach();
    let driver = glommio::spawn_local(drive_loop(state.clone())).detach();
    MembershipTask {
        state,
        tasks: vec![receiver, driver],
    }
}

impl MembershipTask {
    /// An orderly stop: tell the peers this node leaves, then stop.
    pub(crate) async fn leave(self) {
        for t in &self.tasks {
            t.cancel();
        }
        let now = self.state.now_ms();
        self.state.membership.borrow_mut().leave(now);
        self.state.flush().await;
        log::info!("cluster: left the cluster");
    }
}

async fn receive_loop(state: Rc<State>) {
    let mut buf = vec![0u8; DATAGRAM_MAX + 1];
    let mut refused_log = LogGate::new(5, Duration::from_secs(10));
    loop {
        let (n, from): (usize, SocketAddr) = match state.socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                log::warn!("cluster: reading the membership socket failed: {e}");
                glommio::timer::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let now = state.now_ms();
        let handled = state
            .membership
            .borrow_mut()
            .handle_datagram(now, &buf[..n]);
        if let Err(why) = handled {
            if let Some(suppressed) = refused_log.allow(Instant::now()) {
                log::warn!(
                    "cluster: ignored a {n}-byte datagram from {from}: {why}{}",
                    suppressed_note(suppressed)
                );
            }
        }
        state.wake.notify();
    }
}

async fn drive_loop(state: Rc<State>) {
    loop {
        state.membership.borrow_mut().handle_timeout(state.now_ms());
        state.flush().await;
        let due = state.membership.borrow().poll_timeout();
        let wait = due.saturating_sub(state.now_ms()).min(1_000);
        futures_lite::future::or(
            state.wake.wait(),
            glommio::timer::sleep(Duration::from_millis(wait)),
        )
        .await;
    }
}

fn log_event(m: &Membership, e: &MemberEvent) {
    let peers = m.live_peers();
    match e {
        MemberEvent::Up(n) => log::info!(
            "cluster: node {} at {} (incarnation {}) is up; {peers} peers up",
            quote(n.name.as_str()),
            n.addr,
            n.incarnation
        ),
        MemberEvent::Down(n) => log::warn!(
            "cluster: node {} at {} (incarnation {}) is down; {peers} peers up",
            quote(n.name.as_str()),
            n.addr,
            n.incarnation
        ),
        MemberEvent::Replaced { old, new }
            if old.rejoin == new.rejoin && old.incarnation == new.incarnation =>
        {
            log::warn!(
                "cluster: node {} is now the one at {} (incarnation {}), not the one at {}: two \
             nodes have that id",
                quote(new.name.as_str()),
                new.addr,
                new.incarnation,
                old.addr
            )
        }
        MemberEvent::Replaced { old, new } if old.incarnation != new.incarnation => log::info!(
            "cluster: node {} at {} restarted (incarnation {} -> {}){}",
            quote(new.name.as_str()),
            new.addr,
            old.incarnation,
            new.incarnation,
            match old.addr == new.addr {
                true => String::new(),
                false => format!(", moved from {}", old.addr),
            }
        ),
        MemberEvent::Replaced { new, .. } => log::info!(
            "cluster: node {} at {} rejoined after being declared down",
            quote(new.name.as_str()),
            new.addr
        ),
        MemberEvent::Joined => log::info!("cluster: joined; {peers} peers up"),
        MemberEvent::Alone => log::warn!("cluster: no peer is up"),
        MemberEvent::Rejoined(me) => {
            log::warn!("cluster: the other nodes had declared this node down; rejoined as {me}")
        }
        MemberEvent::Duplicate { node, known: None } => log::error!(
            "cluster: node {} at {} (incarnation {}) has this node's own id: it is ignored; \
             give every node its own --node-id (cluster.node_id)",
            quote(node.name.as_str()),
            node.addr,
            node.incarnation
        ),
        MemberEvent::Duplicate {
            node,
            known: Some(k),
        } => log::error!(
            "cluster: two nodes have node id {}: the one at {} (incarnation {}) is kept, the \
             one at {} (incarnation {}) is ignored; if that is an earlier run of a node that \
             moved, it is declared down shortly, else give every node its own --node-id \
             (cluster.node_id)",
            quote(node.name.as_str()),
            k.addr,
            k.incarnation,
            node.addr,
            node.incarnation
        ),
    }
}
