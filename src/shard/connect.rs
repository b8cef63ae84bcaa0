//! A connection's arrival: the CONNECT rules the codec cannot check
//! alone, the choice of the shard that serves it, and attaching it to its
//! session (takeover, clean start, resume, quotas); and what its writer
//! takes from the session.
//!
//! Shard-local core code: no socket, no clock read. The runtime's
//! connection tasks call [`ShardCore::handshake`] when CONNECT is read and
//! [`ShardCore::attach`] on the home shard.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use std::sync::Arc;

use super::PeerRoutes;
use crate::auth::clients::ClientRefusal;
use crate::auth::{user_for_log, Auth, ClientAcl, Grant, LoginThrottle, Refused};
use crate::codec::{self, reason, Connect, Version};
use crate::hash::HashMap;
use crate::message::user_properties_bytes;
use crate::router::topic::validate_topic_name;
use crate::session::Session;
use crate::text::quote;

use super::{home_shard, ConnHandle, ConnectRefusal, SessionSlot, ShardCore};

/// What to do with a connection whose CONNECT was read.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    /// Serve it here: this is its client's home shard.
    Serve {
        /// The client id the broker assigned (empty id in CONNECT).
        assigned: Option<String>,
        /// What its login token grants.
        grant: Grant,
    },
    /// Move it to its client's home shard.
    MoveTo {
        /// The home shard.
        home: usize,
        /// The client id the broker assigned.
        assigned: Option<String>,
        /// What its login token grants.
        grant: Grant,
    },
    /// Refuse it with this CONNACK reason code.
    Refuse {
        /// The reason code.
        code: u8,
        /// False: the protocol has no CONNACK code for it (a bad will in
        /// 3.x, [MQTT-4.8.0-1]); close without answering.
        answer: bool,
        /// How long the refusal waits before it is sent (failed logins
        /// from one address slow down, see `auth::LoginThrottle`).
        delay: Duration,
    },
}

/// Where a connection arrived: its peer (for the log) and the local
/// address it reached (anonymous clients are allowed on loopback addresses
/// only, by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// The client's address.
    pub peer: Option<SocketAddr>,
    /// The broker's address it connected to; None: unknown (not
    /// loopback).
    pub local: Option<SocketAddr>,
    /// Whether a client certificate names the user (the listener's
    /// `username_from_cert`).
    pub certificate: CertLogin,
    /// The wall clock when it arrived, Unix seconds (login tokens' `exp`
    /// and `nbf` are judged by it).
    pub unix_s: u64,
}

/// A client certificate as the login: on a listener whose
/// `username_from_cert` is `cn` or `dn`, the certificate's identity is
/// the user name (already in the CONNECT), and no password is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertLogin {
    /// The listener does not use certificates as logins.
    NotUsed,
    /// The certificate named the user.
    Identified,
    /// It should have, but the client sent none (or it names nobody).
    Missing,
}

impl Arrival {
    /// A connection to 127.0.0.1 from an unknown peer (tests and the
    /// simulator).
    pub const LOOPBACK: Arrival = Arrival {
        peer: None,
        local: Some(SocketAddr::new(
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            1883,
        )),
        certificate: CertLogin::NotUsed,
        unix_s: 0,
    };

    /// True when it reached a loopback address (IPv4-mapped included).
    pub fn loopback(&self) -> bool {
        self.local
            .is_some_and(|a| a.ip().to_canonical().is_loopback())
    }
}

impl ShardCore {
    /// The authentication and authorization rules this shard applies from
    /// now on (the broker loads them at start).
    /// Sessions take the new ACL at once, each for the user its last
    /// connection logged in as; connections stay (a user removed from the
    /// password file is refused at its next CONNECT).
    pub fn set_auth(&self, auth: Arc<Auth>) {
        let mut st = self.state.borrow_mut();
        for slot in st.sessions.values_mut() {
            if slot.conn.is_none() && slot.username.is_none() && !slot.session.has_acl() {
                // Restored from the log, not connected since: its ACL
                // comes with its next connection.
                continue;
            }
            if slot.token_rules.is_some() {
                continue; // its login token's topics, not the files'
            }
            let id = slot.session.client_id().clone();
            slot.session
                .set_acl(auth.client_acl(&id, slot.username.as_deref()));
        }
        *self.auth.borrow_mut() = auth;
        self.logins.borrow_mut().verified.clear();
    }

    /// CONNECT was read at `now` from a connection that `arrival`
    /// describes: refuse it, serve it here, or move it to its home shard.
    pub fn handshake(&self, connect: &Connect, arrival: Arrival, now: Instant) -> Handshake {
        let peer = arrival.peer;
        let checked = check_connect(self, connect, now).and_then(|a| {
            let id = a.as_deref().unwrap_or(&connect.client_id);
            let grant = self.login(connect, id, arrival, now)?;
            Ok((a, grant))
        });
        let (assigned, grant) = match checked {
            Ok(a) => a,
            Err(Refusal {
                code,
                why,
                delay,
                counted,
            }) => {
                self.count_refused(counted);
                shard_log!(
                    self,
                    log::Level::Info,
                    "{peer:?}: CONNECT refused (reason 0x{code:02X}), client id {}: {why}",
                    quote(&connect.client_id)
                );
                let answer = connect.version.is_v5() || code < 0x90;
                return Handshake::Refuse {
                    code,
                    answer,
                    delay,
                };
            }
        };
        let client_id = assigned.as_deref().unwrap_or(&connect.client_id);
        let home = home_shard(client_id, self.shards);
        if home == self.id {
            Handshake::Serve { assigned, grant }
        } else {
            Handshake::MoveTo {
                home,
                assigned,
                grant,
            }
        }
    }

    /// Check the CONNECT's client id, address, user name and password.
    /// Failures slow down per client address; a success starts the
    /// address afresh.
    fn login(
        &self,
        connect: &Connect,
        client_id: &str,
        arrival: Arrival,
        now: Instant,
    ) -> Result<Grant, Refusal> {
        let ip = arrival.peer.map(|p| p.ip().to_canonical());
        let mut logins = self.logins.borrow_mut();
        match self.credentials(connect, client_id, arrival, ip, &mut logins) {
            Ok(grant) => {
                if let (Some(ip), Some(_)) = (ip, &connect.username) {
                    logins.throttle.succeeded(ip);
                }
                Ok(grant)
            }
            Err((code, why)) => {
                let delay = ip.map_or(Duration::ZERO, |ip| logins.throttle.failed(ip, now));
                Err(Refusal {
                    counted: ConnectRefusal::of_code(code),
                    code,
                    why,
                    delay,
                })
            }
        }
    }

    /// The client id and address rules first (a refused client costs no
    /// password check), then the certificate, the token or the password. A
    /// password verified once is remembered (keyed digest) until the rules
    /// are reloaded, so a reconnect does not pay for PBKDF2 or argon2
    /// again (tokens are checked each time: they expire). Err: the
    /// CONNACK code and why.
    fn credentials(
        &self,
        connect: &Connect,
        client_id_now: &str,
        arrival: Arrival,
        ip: Option<std::net::IpAddr>,
        logins: &mut Logins,
    ) -> Result<Grant, (u8, String)> {
        let auth = self.auth.borrow();
        let user = connect.username.as_deref();
        let password = connect.password.as_deref();
        let client_id = Some(connect.client_id.as_str()).filter(|c| !c.is_empty());
        let token = auth.is_token(password);
        // A user name the login does not prove binds no client id.
        let proven = user.filter(|_| !token || auth.tokens_bind_user());
        auth.clients()
            .check(ip, client_id, proven)
            .map_err(|r| match r {
                ClientRefusal::Address => (
                    reason::BANNED,
                    "its address is not allowed (auth.address_allow, address_deny)".to_string(),
                ),
                ClientRefusal::ClientId => (
                    reason::CLIENT_IDENTIFIER_NOT_VALID,
                    "client id not allowed (auth.client_id_allow, client_id_deny)".to_string(),
                ),
                ClientRefusal::BoundToOther(u) => (
                    reason::NOT_AUTHORIZED,
                    format!(
                        "client id bound to user {}, not {} (auth.client_id_users)",
                        quote(&u),
                        user_for_log(user)
                    ),
                ),
            })?;
        let seen = match (user, password) {
            (Some(u), Some(p)) if auth.has_passwords() && !token => Some((u, logins.digest(u, p))),
            _ => None,
        };
        let known = seen.is_some_and(|(u, d)| logins.verified.get(u) == Some(&d));
        let result = match (arrival.certificate, known) {
            (CertLogin::Identified, _) | (CertLogin::NotUsed, true) => Ok(Grant::default()),
            (CertLogin::Missing, _) => Err(Refused::NoCertificate),
            (CertLogin::NotUsed, false) => auth.login(
                arrival.loopback(),
                client_id_now,
                user,
                password,
                arrival.unix_s,
            ),
        };
        let grant = result.map_err(|r| match r {
            Refused::BadCredentials => (
                reason::BAD_USER_NAME_OR_PASSWORD,
                format!(
                    "user {}: unknown user or wrong password",
                    user_for_log(user)
                ),
            ),
            Refused::BadToken(why) => (
                reason::BAD_USER_NAME_OR_PASSWORD,
                format!("user {}: login token refused: {why}", user_for_log(user)),
            ),
            Refused::NoCertificate => (
                reason::NOT_AUTHORIZED,
                "no client certificate naming a user (the listener's username_from_cert)"
                    .to_string(),
            ),
            Refused::NotAuthorized => (
                reason::NOT_AUTHORIZED,
                "no user name, and anonymous clients are not allowed here \
                 (auth.allow_anonymous)"
                    .to_string(),
            ),
        })?;
        if let Some((u, d)) = seen.filter(|_| !known) {
            logins.remember(u, d);
        }
        Ok(grant)
    }

    /// A client id unique in this broker's lifetime: the shard, the
    /// runtime's start stamp and a count.
    fn assign_client_id(&self) -> String {
        let mut st = self.state.borrow_mut();
        st.last_assigned_id += 1;
        format!(
            "shardmq-{}-{:x}-{}",
            self.id, self.boot_stamp, st.last_assigned_id
        )
    }

    /// Attach a connection to its session on this (home) shard: takeover,
    /// clean start, resume or create; queue the CONNACK.
    pub fn attach(
        &self,
        now: Instant,
        connect: Box<Connect>,
        assigned: Option<String>,
    ) -> Result<Rc<ConnHandle>, u8> {
        self.attach_granted(now, connect, assigned, Grant::default())
    }

    /// [`ShardCore::attach`] for a login that `grant`s more: a token's
    /// topics replace the ACL file for the connection, and its expiry
    /// ends the connection (5.0: DISCONNECT 0xA0).
    pub fn attach_granted(
        &self,
        now: Instant,
        connect: Box<Connect>,
        assigned: Option<String>,
        grant: Grant,
    ) -> Result<Rc<ConnHandle>, u8> {
        let attached = self.attach_checked(now, connect, assigned, grant);
        if let Err(code) = attached {
            self.count_refused(ConnectRefusal::of_code(code));
        }
        attached
    }

    /// [`ShardCore::attach_granted`] before its refusals are counted.
    fn attach_checked(
        &self,
        now: Instant,
        connect: Box<Connect>,
        assigned: Option<String>,
        grant: Grant,
    ) -> Result<Rc<ConnHandle>, u8> {
        let mut st = self.state.borrow_mut();
        let client_id: &str = assigned.as_deref().unwrap_or(&connect.client_id);
        let existing = st.by_client.get(client_id).copied();
        let live = existing.is_some_and(|k| st.sessions.get(k).is_some_and(|s| s.conn.is_some()));
        if self.stopping.get() {
            return Err(reason::SERVER_UNAVAILABLE);
        }
        if !live && st.stats.connections >= self.connections_max {
            return Err(self.refuse_attach(client_id, format_args!("connections_max reached")));
        }
        let mut resumed = None;
        if let Some(key) = existing {
            let slot = st.sessions.get_mut(key).expect("indexed session exists");
            slot.session.takeover(now);
            self.drive(&mut st, key, now);
            if let Some(slot) = st.sessions.get_mut(key) {
                if connect.clean_start {
                    slot.session.discard(now);
                    self.drive(&mut st, key, now);
                } else {
                    slot.adopted_from = None;
                    resumed = Some(key);
                }
            }
        }
        let key = match resumed {
            Some(k) => k,
            None if self.limits.status.store_full.get() && asks_persistence(&connect) => {
                let why = format_args!("the log is full: no new persistent session");
                return Err(self.refuse_attach(client_id, why));
            }
            None if st.sessions.len() >= self.sessions_max => {
                let why = format_args!("sessions_max reached ({})", self.sessions_max);
                return Err(self.refuse_attach(client_id, why));
            }
            None => {
                let id: crate::message::ClientId = client_id.into();
                let session = Session::new(id.clone(), self.limits.clone(), now);
                st.last_session_uid += 1;
                let uid = st.last_session_uid;
                let key = st.sessions.insert(SessionSlot::new(session, uid, None));
                st.by_client.insert(id, key);
                key
            }
        };
        let (version, clean_start) = (connect.version, connect.clean_start);
        // A user name the login did not prove is no one's in the files.
        let user = connect
            .username
            .as_deref()
            .filter(|_| !grant.user_unverified);
        // Filled in now: the CONNECT moves into the session below.
        let auto: Vec<_> = self
            .config
            .auto_subscribe
            .iter()
            .filter(|a| a.applies(client_id, user))
            .filter_map(|a| Some((a.filter_for(client_id, user)?, a.options())))
            .collect();
        let acl = match &grant.rules {
            Some(rules) => Some(ClientAcl::from_rules(rules)),
            None => self.auth.borrow().client_acl(client_id, user),
        };
        st.last_conn_id += 1;
        let conn_id = st.last_conn_id;
        let cluster = st.remote.is_some();
        let slot = st.sessions.get_mut(key).expect("just inserted or resumed");
        // In a cluster, what it has queued waits for the claim's answers
        // (`claim_connection`): a move of its copy on another node may
        // come with them.
        if cluster {
            slot.session.hold_queue();
        }
        // The new connection's will is this run's.
        slot.will_of_last_run = false;
        slot.session.set_acl(acl);
        slot.token_rules = grant.rules;
        slot.username = user.map(Box::from);
        let attached = slot
            .session
            .connect(now, *connect, resumed.is_some(), assigned.as_deref());
        slot.session
            .set_connection_deadline(grant.valid_for.and_then(|d| now.checked_add(d)));
        if !auto.is_empty() {
            slot.session.auto_subscribe(now, auto);
        }
        let handle = Rc::new(ConnHandle {
            key,
            client_id: slot.session.client_id().clone(),
            id: conn_id,
            generation: attached.generation,
            version,
            wake: Default::default(),
            drained: Default::default(),
            closed: Default::default(),
            holds: Default::default(),
            held_since: Default::default(),
            phase: Default::default(),
        });
        slot.conn = Some(handle.clone());
        st.stats.connections += 1;
        st.stats.connects_accepted += 1;
        self.claim_connection(&mut st, key, now, (clean_start, resumed.is_none()));
        if Self::durable_connect(&mut st, key) {
            self.keep_routes(&mut st, key);
        }
        self.drive(&mut st, key, now);
        Self::debug_invariants(&st);
        Ok(handle)
    }

    /// The bytes of this shard's messages the peer node furthest behind
    /// has not confirmed (of the peers still waited for: linked, or not
    /// for long); set by the bridge. See [`ShardCore::links_full`].
    pub fn set_links_fill(&self, bytes: usize) {
        self.links_fill.set(bytes);
        self.links_full();
    }

    /// Whether the shard's connections stop reading (their publishers
    /// wait rather than have messages for a peer dropped): from when the
    /// bridge's fill ([`ShardCore::set_links_fill`]) and the messages
    /// routed to peers that the bridge has not taken yet (a connection's
    /// reads can route many before the bridge runs) reach half of
    /// `cluster.link_queue_bytes_max`, until they are down to a quarter.
    /// The runtime counts each pause in `link_pauses`.
    pub fn links_full(&self) -> bool {
        let bytes = self.links_fill.get() + self.routed_bytes.get();
        let max = self.config.cluster.link_queue_bytes_max;
        let mark = if self.links_paused.get() {
            super::links_resume_mark(max)
        } else {
            max / 2
        };
        // Nothing kept: nothing to wait for (alone, the bound is not
        // checked and may be anything).
        let full = bytes > 0 && bytes >= mark;
        if self.links_paused.replace(full) && !full {
            // The pause ended: every reader looks again now rather than
            // at its next look (`runtime::connection::LINK_PAUSE_LOOK`).
            let st = self.state.borrow();
            for (_, slot) in st.sessions.iter() {
                if let Some(c) = slot.conn.as_ref() {
                    c.drained.notify();
                }
            }
        }
        full
    }

    /// Whether new CONNECTs are refused for want of a majority of the
    /// cluster's members (`cluster::quorum`); connected clients stay.
    pub fn set_refusing_connects(&self, refuse: bool) {
        self.refusing_connects.set(refuse);
    }

    /// Whether new CONNECTs are refused here for want of the routes of a
    /// node seen up.
    pub fn routes_pending(&self) -> bool {
        self.peer_routes.borrow().values().any(|e| e.up && !e.known)
    }

    /// Log when this shard starts taking new CONNECTs again because the
    /// routes of every node it sees up are here (an operator, or a script
    /// that starts a cluster, waits for that line); a debug line when it
    /// stops for a node that came up.
    fn routes_gate_moved(&self) {
        let open = !self.routes_pending();
        if self.routes_gate_open.replace(open) == open {
            return;
        }
        if open {
            log::info!(
                "cluster: shard {}: the routes of every node up are here: new CONNECTs are taken",
                self.id
            );
        } else {
            log::debug!(
                "cluster: shard {}: new CONNECTs wait for the routes of a node that came up",
                self.id
            );
        }
    }

    /// The entry of node `node` for run `run`: a newer run replaces the
    /// entry (`fresh`), the same run is changed by `same`, an older one is
    /// stale and changes nothing. True when something changed.
    fn peer_run(
        &self,
        node: u16,
        run: u64,
        fresh: PeerRoutes,
        same: impl FnOnce(&mut PeerRoutes) -> bool,
    ) -> bool {
        let mut peers = self.peer_routes.borrow_mut();
        match peers.get_mut(&node) {
            Some(e) if e.run == run => same(e),
            Some(e) if e.run > run => false,
            _ => {
                peers.insert(node, fresh);
                true
            }
        }
    }

    /// This shard's bridge saw run `run` of node `node` (its index) up at
    /// `now`: new CONNECTs wait until shard 0 says every shard has its
    /// routes, or [`ShardCore::routes_wait_tick`] gives up.
    pub fn peer_routes_expected(&self, node: u16, run: u64, now: Instant) {
        let fresh = PeerRoutes {
            run,
            up: true,
            known: false,
            up_at: Some(now),
        };
        self.peer_run(node, run, fresh, |e| {
            e.up = true;
            e.up_at = Some(now);
            true
        });
        self.routes_gate_moved();
    }

    /// This shard's bridge saw run `run` of node `node` go down: its
    /// routes are no longer waited for.
    pub fn peer_routes_gone(&self, node: u16, run: u64) {
        let mut peers = self.peer_routes.borrow_mut();
        if peers.get(&node).is_some_and(|e| e.run == run) {
            peers.remove(&node);
        }
        drop(peers);
        self.routes_gate_moved();
    }

    /// Shard 0: every shard has the routes of run `run` of node `node`:
    /// tell every shard (once).
    pub fn routes_known(&self, node: u16, run: u64) {
        if self.note_routes_known(node, run) {
            self.tell_routes_known(node, run);
        }
    }

    /// Shard 0: tell every other shard that the routes of run `run` of
    /// node `node` are here (or no longer waited for).
    fn tell_routes_known(&self, node: u16, run: u64) {
        self.mesh
            .broadcast(|| super::mesh::MeshMsg::RoutesKnown { node, run });
    }

    /// See [`ShardCore::routes_known`]; the order in which this and the
    /// bridge's [`ShardCore::peer_routes_expected`] come does not matter.
    /// True when the run was not known here yet.
    pub(super) fn note_routes_known(&self, node: u16, run: u64) -> bool {
        let seen = PeerRoutes {
            run,
            up: false,
            known: true,
            up_at: None,
        };
        let changed = self.peer_run(node, run, seen, |e| !std::mem::replace(&mut e.known, true));
        self.routes_gate_moved();
        changed
    }

    /// Stop waiting for the routes of a run this shard saw up `wait` ago
    /// (a shard that saw the run leave and come back after shard 0 had its
    /// routes would otherwise wait for a word that does not come again):
    /// the nodes and runs given up, which shard 0 tells every shard.
    pub fn routes_wait_tick(&self, now: Instant, wait: Duration) -> Vec<(u16, u64)> {
        let mut late = Vec::new();
        for (&node, e) in self.peer_routes.borrow_mut().iter_mut() {
            let due = e
                .up_at
                .is_some_and(|at| now.saturating_duration_since(at) >= wait);
            if e.up && !e.known && due {
                e.known = true;
                late.push((node, e.run));
            }
        }
        self.routes_gate_moved();
        if self.id == 0 {
            for &(node, run) in &late {
                self.tell_routes_known(node, run);
            }
        }
        late
    }

    /// Count a connection refused for `why`.
    pub(crate) fn count_refused(&self, why: ConnectRefusal) {
        self.state.borrow_mut().stats.connects_refused[why as usize] += 1;
    }

    /// Log why `client_id` is refused a session here (rate limited with
    /// the other lines clients cause); the CONNACK reason code.
    fn refuse_attach(&self, client_id: &str, why: std::fmt::Arguments) -> u8 {
        shard_log!(
            self,
            log::Level::Warn,
            "shard {}: {why}; refusing {}",
            self.id,
            quote(client_id)
        );
        reason::QUOTA_EXCEEDED
    }

    /// True when the session's transmit backlog is at its limit.
    pub fn transmit_backlogged(&self, conn: &ConnHandle) -> bool {
        let st = self.state.borrow();
        st.sessions
            .get(conn.key)
            .is_some_and(|slot| slot.session.transmit_backlog_full())
    }

    /// Encode the session's waiting packets into `out`, up to about
    /// `limit` bytes. Nothing while route acknowledgements are awaited.
    pub fn poll_transmit(&self, conn: &ConnHandle, out: &mut BytesMut, limit: usize) {
        let mut st = self.state.borrow_mut();
        let Some(slot) = st.sessions.get_mut(conn.key) else {
            return;
        };
        let current = slot.conn.as_ref().is_some_and(|c| c.id == conn.id);
        if !current || slot.held_acks > 0 {
            return;
        }
        if Self::output_waits_for_sync(&mut st, conn.key, conn.id) {
            return;
        }
        let st = &mut *st;
        let Some(slot) = st.sessions.get_mut(conn.key) else {
            return;
        };
        slot.session.encode_transmit(conn.version, out, limit);
        slot.account(&mut st.stats);
        if slot.session.has_transmit() {
            conn.wake.notify();
        }
        // Room for the socket may be room for a parked retained gather.
        Self::resume_gathers(st, conn.key);
        // And may end a hold on its publishers (`pressure`).
        self.ease(st, conn.key);
    }
}

/// True when the CONNECT asks for a session that outlives the connection.
fn asks_persistence(connect: &Connect) -> bool {
    if connect.version.is_v5() {
        connect.properties.session_expiry_interval.unwrap_or(0) > 0
    } else {
        !connect.clean_start
    }
}

/// Why a CONNECT is refused: the CONNACK reason code, a log line, how
/// long the answer waits, and the reason it is counted under.
struct Refusal {
    code: u8,
    why: String,
    delay: Duration,
    counted: ConnectRefusal,
}

impl Refusal {
    fn new(code: u8, why: impl Into<String>) -> Refusal {
        Refusal {
            code,
            why: why.into(),
            delay: Duration::ZERO,
            counted: ConnectRefusal::of_code(code),
        }
    }
}

/// Passwords verified on this shard (until the rules are reloaded) and
/// failed logins by address.
pub(super) struct Logins {
    /// User name → keyed digest of the password that verified.
    verified: HashMap<Box<str>, [u8; 64]>,
    /// Random per shard: the digests mean nothing outside this process.
    key: [u8; 32],
    throttle: LoginThrottle,
}

/// Verified passwords a shard remembers; past it, it starts over.
const VERIFIED_MAX: usize = 65_536;

impl Logins {
    pub(super) fn new() -> Logins {
        let mut key = [0u8; 32];
        // Without OS randomness the digests still work, only keyed less well.
        let _ = getrandom::fill(&mut key);
        Logins {
            verified: HashMap::default(),
            key,
            throttle: LoginThrottle::default(),
        }
    }

    fn digest(&self, user: &str, password: &[u8]) -> [u8; 64] {
        use sha2::{Digest, Sha512};
        let mut d = Sha512::new();
        d.update(self.key);
        d.update((user.len() as u64).to_be_bytes());
        d.update(user.as_bytes());
        d.update(password);
        d.finalize().into()
    }

    fn remember(&mut self, user: &str, digest: [u8; 64]) {
        if self.verified.len() >= VERIFIED_MAX {
            self.verified.clear();
        }
        self.verified.insert(Box::from(user), digest);
    }
}

/// CONNECT rules the codec cannot check alone: the client id (an empty id
/// gets one assigned: 5.0 always, 3.1.1 with clean session only; 3.1
/// requires one; a too long id is refused), no enhanced authentication
/// (none is supported), and a will whose topic, response topic and payload
/// format are valid. Returns the assigned client id, if any.
fn check_connect(
    shard: &ShardCore,
    connect: &Connect,
    now: Instant,
) -> Result<Option<String>, Refusal> {
    if shard.refusing_connects.get() {
        let why = "this node sees no majority of the cluster's members \
                   (cluster.on_minority = refuse_connects)";
        return Err(Refusal {
            counted: ConnectRefusal::Minority,
            ..Refusal::new(reason::SERVER_UNAVAILABLE, why)
        });
    }
    if shard.routes_pending() {
        let why = "this node does not have the routes of every node it sees up yet";
        return Err(Refusal {
            counted: ConnectRefusal::Unavailable,
            ..Refusal::new(reason::SERVER_UNAVAILABLE, why)
        });
    }
    if !connect.clean_start && shard.adoption_awaited(now) {
        let why = "a node was declared down and the node next after it may still be taking \
                   its sessions over";
        return Err(Refusal {
            counted: ConnectRefusal::Unavailable,
            ..Refusal::new(reason::SERVER_UNAVAILABLE, why)
        });
    }
    if connect.properties.authentication_method.is_some() {
        let why = "no authentication method is supported";
        return Err(Refusal::new(reason::BAD_AUTHENTICATION_METHOD, why));
    }
    if let Some(will) = &connect.will {
        check_will(will, shard.config.mqtt.topic_levels_max)?;
    }
    let user_bytes = user_properties_bytes(&connect.properties)
        + connect
            .will
            .as_ref()
            .map_or(0, |w| user_properties_bytes(&w.properties));
    let user_max = shard.config.mqtt.user_properties_bytes_max;
    if user_bytes > user_max {
        let why = format!(
            "{user_bytes} bytes of user properties (CONNECT and will), more than \
             mqtt.user_properties_bytes_max ({user_max})"
        );
        return Err(Refusal::new(reason::QUOTA_EXCEEDED, why));
    }
    if connect.client_id.len() > shard.config.mqtt.client_id_bytes_max {
        let why = format!(
            "client id longer than mqtt.client_id_bytes_max ({})",
            shard.config.mqtt.client_id_bytes_max
        );
        return Err(Refusal::new(reason::CLIENT_IDENTIFIER_NOT_VALID, why));
    }
    if !connect.client_id.is_empty() {
        return Ok(None);
    }
    let why = "[MQTT-3.1.3-8] empty client id without clean session";
    match connect.version {
        Version::V3_1 => Err(Refusal::new(reason::CLIENT_IDENTIFIER_NOT_VALID, why)),
        Version::V3_1_1 if !connect.clean_start => {
            Err(Refusal::new(reason::CLIENT_IDENTIFIER_NOT_VALID, why))
        }
        _ => Ok(Some(shard.assign_client_id())),
    }
}

/// A will is published like any PUBLISH, so it must be one that could be.
fn check_will(will: &codec::Will, levels_max: usize) -> Result<(), Refusal> {
    if let Err(e) = validate_topic_name(&will.topic, levels_max) {
        let why = format!("[MQTT-3.3.2-2] will topic {}: {e}", quote(&will.topic));
        return Err(Refusal::new(reason::TOPIC_NAME_INVALID, why));
    }
    if let Some(rt) = &will.properties.response_topic {
        if let Err(e) = validate_topic_name(rt, levels_max) {
            let why = format!("[MQTT-3.3.2-14] will response topic {}: {e}", quote(rt));
            return Err(Refusal::new(reason::TOPIC_NAME_INVALID, why));
        }
    }
    if will.properties.payload_format_indicator == Some(1)
        && std::str::from_utf8(&will.payload).is_err()
    {
        let why = "will payload is not UTF-8 but its Payload Format Indicator says it is";
        return Err(Refusal::new(reason::PAYLOAD_FORMAT_INVALID, why));
    }
    Ok(())
}
