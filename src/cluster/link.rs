//! One bridge link's protocol, without I/O: the handshake, framing,
//! keep-alive and the bound on what waits to be written.
//!
//! Shard-local: each shard owns the sessions of its links. The runtime
//! (or the simulator) hands [`LinkSession`] the bytes it reads and the
//! time, writes what [`LinkSession::poll_transmit`] gives, and closes the
//! socket when a method returns an error. The side that dialed sends its
//! [`Hello`] first; the side that accepted checks it (version, cluster),
//! reports it, and answers with its own Hello only when its owner
//! welcomes the peer ([`LinkSession::welcome`]; else a Refuse), so a
//! dialer that sees the answer knows it was taken. The dialer checks it
//! reached the node it meant (name and incarnation). Nothing but a Hello
//! is taken before the handshake.
//!
//! With a cluster secret (`cluster::secret`), each side proves it before
//! the other reports the link: the accepting side answers the dialer's
//! Hello with an [`Frame::Auth`] tag over that Hello, its own name and
//! incarnation and a number of its own (a keyed hash of a random seed of
//! the process, its shard and the link: fresh, and unpredictable without
//! the secret); the dialer checks it
//! and answers with its own tag over the same, and only then does the
//! accepting side report the Hello to its owner (who may welcome it). A
//! tag that does not check, or a Hello that says the other side has no
//! secret where this one has, refuses the link. After the proofs, each
//! side encrypts what it writes: the frames written before each
//! [`LinkSession::poll_transmit`] (sealed early once past
//! [`RECORD_BYTES_MAX`]) go as one [`Frame::Record`], AES-256-GCM under a
//! key of the secret and the handshake for that direction, numbered; the
//! receiver acts on a record's frames once it opens.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use thiserror::Error;

use super::frame::{self, Frame, FrameError, Hello, RefuseReason, BRIDGE_VERSION};
use super::node::{same_addr, NodeName};
use super::secret::{ClusterSecret, RecordCipher};

/// What the accepting side's tag is for.
const ACCEPT_LABEL: &[u8] = b"shardmq bridge: accepting";
/// What the dialing side's tag is for.
const DIAL_LABEL: &[u8] = b"shardmq bridge: dialing";
/// What the key of the dialer's records is for.
const DIALER_RECORDS: &[u8] = b"shardmq bridge: the dialer's records";
/// What the key of the accepting side's records is for.
const ACCEPTOR_RECORDS: &[u8] = b"shardmq bridge: the accepting side's records";
/// Bytes of frames after which a side seals its record (a record is at
/// most this plus one frame, its header and tag; one write may carry
/// several records).
pub const RECORD_BYTES_MAX: usize = 64 << 10;

/// A link's limits; see `[cluster]` in the default config.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// Largest frame taken from the peer, in bytes.
    pub frame_bytes_max: usize,
    /// Bytes that may wait to be written before [`LinkSession::send`]
    /// refuses more (the caller then holds its own input).
    pub out_bytes_max: usize,
    /// Silence after which a Ping is due, in ms.
    pub ping_after_ms: u64,
    /// Silence from the peer after which the link is dead, in ms.
    pub dead_after_ms: u64,
    /// The cluster secret each side of a link proves, if the cluster has
    /// one.
    pub secret: Option<Arc<ClusterSecret>>,
    /// Random bytes drawn once per process: with the secret, they make
    /// each link's number unpredictable to anyone without it (and unique
    /// across runs and shards).
    pub nonce_seed: [u8; 16],
}

/// The largest frame a node takes from a peer: a message (a packet of
/// `mqtt.packet_size_max_bytes` and its fields), or a chunk of a peer's
/// log holding one record, which may be as large as a segment (a
/// session's whole state). The same in every durability mode: a node
/// without a log takes a peer's chunk too, to refuse it.
pub fn frame_bytes_max(config: &crate::Config) -> usize {
    let message = config.mqtt.packet_size_max_bytes as usize + (64 << 10);
    message.max(config.storage.segment_bytes + (64 << 10))
}

/// How long a link may take to finish its handshake (and, with a secret,
/// prove it), whatever it sends meanwhile, in ms.
pub const HANDSHAKE_MS: u64 = 5_000;
/// The largest frame taken before the handshake is done, in bytes: a
/// Hello, an Auth or a Refuse fits.
pub const HANDSHAKE_FRAME_BYTES_MAX: usize = 4096;

/// What a link reports.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkEvent {
    /// The handshake is done: the peer's Hello.
    Up(Hello),
    /// A frame from the peer, after the handshake.
    Frame(Frame),
}

/// Why a link must close.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LinkError {
    /// The peer sent what cannot be read.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer refused the link.
    #[error("refused by the peer ({reason:?}): {text}")]
    Refused {
        /// Its reason.
        reason: RefuseReason,
        /// Its words.
        text: String,
    },
    /// The handshake failed here (a Refuse was queued for the peer).
    #[error("handshake: {0}")]
    Handshake(String),
    /// A frame other than Hello before the handshake, or a second Hello.
    #[error("{0} out of turn")]
    OutOfTurn(&'static str),
    /// Nothing heard from the peer for too long.
    #[error("nothing from the peer for {0} ms")]
    Silent(u64),
    /// With a cluster secret: a record did not open (changed, reordered or
    /// replayed on the way, or not under this link's key), or was not a
    /// record.
    #[error("the peer's link fails the cluster secret's encryption: {0}")]
    Unsealed(&'static str),
}

/// Output waiting past the bound: the frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("the link's output is full")]
pub struct Full;

/// One link; see the module docs.
#[derive(Debug)]
pub struct LinkSession {
    me: Hello,
    /// Whom a dialing side meant to reach: name, incarnation and
    /// membership address.
    expect: Option<(NodeName, u64, SocketAddr)>,
    peer: Option<Hello>,
    rx: BytesMut,
    tx: BytesMut,
    events: VecDeque<LinkEvent>,
    settings: LinkSettings,
    last_rx_ms: u64,
    last_tx_ms: u64,
    /// When the link was made: its handshake must be done within
    /// [`HANDSHAKE_MS`].
    started_ms: u64,
    epoch: Instant,
    /// Pings sent and Pongs received: the peer answers Pings in order,
    /// each after it read everything sent before it.
    pings: u64,
    pongs: u64,
    /// With a cluster secret, until the peer proved it: the handshake's
    /// proof under way.
    auth: Option<Auth>,
    /// With a cluster secret, after the handshake: the cipher of what
    /// this side writes, and where in `tx` its open record starts.
    tx_cipher: Option<RecordCipher>,
    open_record: Option<usize>,
    /// ... and of what the peer writes.
    rx_cipher: Option<RecordCipher>,
}

/// A link's proof of the cluster secret under way.
#[derive(Debug)]
struct Auth {
    secret: Arc<ClusterSecret>,
    /// The dialer's Hello, encoded: what both tags cover.
    dialer_hello: Option<BytesMut>,
    /// Accepting side: the dialer's Hello, reported once its tag checks.
    pending: Option<Hello>,
}

impl Auth {
    /// The tag under `label` over the dialer's Hello, the accepting
    /// node's name and incarnation, and the accepting side's `nonce`
    /// (which only that shard of that run gives).
    fn tag(&self, label: &[u8], acceptor: (&NodeName, u64), nonce: u64) -> [u8; 32] {
        let hello = self.dialer_hello.as_deref().unwrap_or_default();
        let parts: [&[u8]; 4] = [
            hello,
            acceptor.0.as_str().as_bytes(),
            &acceptor.1.to_be_bytes(),
            &nonce.to_be_bytes(),
        ];
        self.secret.tag(label, &parts)
    }

    /// Whether `tag` is [`Auth::tag`]'s (constant-time).
    fn verify(&self, label: &[u8], acceptor: (&NodeName, u64), nonce: u64, tag: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        let want = self.tag(label, acceptor, nonce);
        tag.len() == want.len() && bool::from(want.ct_eq(tag))
    }
}

impl LinkSession {
    /// The side that dialed `expect` (name, incarnation, address), at `now_ms` on
    /// the caller's clock whose zero is `epoch` (for message expiry);
    /// `link`: a number this shard's run gives no other link.
    pub fn dialed(
        me: Hello,
        expect: (NodeName, u64, SocketAddr),
        settings: LinkSettings,
        (epoch, now_ms): (Instant, u64),
        link: u64,
    ) -> LinkSession {
        Self::new(me, Some(expect), settings, (epoch, now_ms), link)
    }

    /// The side that accepted.
    pub fn accepted(
        me: Hello,
        settings: LinkSettings,
        (epoch, now_ms): (Instant, u64),
        link: u64,
    ) -> LinkSession {
        Self::new(me, None, settings, (epoch, now_ms), link)
    }

    fn new(
        mut me: Hello,
        expect: Option<(NodeName, u64, SocketAddr)>,
        settings: LinkSettings,
        (epoch, now_ms): (Instant, u64),
        link: u64,
    ) -> LinkSession {
        me.auth = settings.secret.is_some();
        // With a secret, the link's number is a keyed hash of the
        // process's random seed, the shard and the link: fresh, and
        // unpredictable to anyone without the secret.
        me.nonce = match &settings.secret {
            Some(s) => {
                let parts: [&[u8]; 3] = [
                    &settings.nonce_seed,
                    &me.shard.to_be_bytes(),
                    &link.to_be_bytes(),
                ];
                let tag = s.tag(b"shardmq bridge: nonce", &parts);
                u64::from_be_bytes(tag[..8].try_into().expect("8 bytes"))
            }
            None => link,
        };
        let auth = settings.secret.clone().map(|secret| Auth {
            secret,
            dialer_hello: None,
            pending: None,
        });
        let mut s = LinkSession {
            auth,
            tx_cipher: None,
            open_record: None,
            rx_cipher: None,
            me,
            expect,
            peer: None,
            rx: BytesMut::new(),
            tx: BytesMut::new(),
            events: VecDeque::new(),
            settings,
            last_rx_ms: now_ms,
            last_tx_ms: now_ms,
            started_ms: now_ms,
            epoch,
            pings: 0,
            pongs: 0,
        };
        if s.expect.is_some() {
            let hello = Frame::Hello(s.me.clone());
            s.push(&hello, now_ms);
            if let Some(a) = s.auth.as_mut() {
                a.dialer_hello = Some(encoded(&hello, epoch));
            }
        }
        s
    }

    /// The accepting side takes the peer whose Hello it reported: its own
    /// Hello goes out.
    pub fn welcome(&mut self, now_ms: u64) {
        let hello = Frame::Hello(self.me.clone());
        self.push(&hello, now_ms);
    }

    /// The peer's Hello, once the handshake is done.
    pub fn peer(&self) -> Option<&Hello> {
        self.peer.as_ref()
    }

    /// Whether the handshake is done.
    pub fn is_up(&self) -> bool {
        self.peer.is_some()
    }

    /// Milliseconds since the peer was last heard from (a healthy link
    /// hears a ping's answer at least every `ping_after_ms` or so).
    pub fn silent_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.last_rx_ms)
    }

    /// Bytes written to the link and not yet sent.
    pub fn out_bytes(&self) -> usize {
        self.tx.len()
    }

    /// Bytes read from the peer.
    pub fn handle_bytes(&mut self, now_ms: u64, data: &[u8]) -> Result<(), LinkError> {
        // Once encrypted, only a record that opens shows the peer alive
        // (bytes trickled by someone else do not keep a link open).
        if self.rx_cipher.is_none() {
            self.last_rx_ms = now_ms;
        }
        self.rx.extend_from_slice(data);
        let now = self.epoch + std::time::Duration::from_millis(now_ms);
        loop {
            let max = if self.rx_cipher.is_some() {
                // A record is sealed once past RECORD_BYTES_MAX: at most
                // one whole frame more, and its header and tag.
                RECORD_BYTES_MAX + self.settings.frame_bytes_max + 64
            } else if self.handshake_done() {
                self.settings.frame_bytes_max
            } else {
                HANDSHAKE_FRAME_BYTES_MAX
            };
            let Some(f) = frame::decode(&mut self.rx, now, max)? else {
                return Ok(());
            };
            let Some(cipher) = self.rx_cipher.as_mut() else {
                self.handle_frame(now_ms, f)?;
                continue;
            };
            let Frame::Record(mut body) = f else {
                return Err(LinkError::Unsealed("a frame outside a record"));
            };
            let Some(n) = cipher.open(&mut body) else {
                return Err(LinkError::Unsealed("a record does not open"));
            };
            body.truncate(n);
            self.last_rx_ms = now_ms;
            while let Some(f) = frame::decode(&mut body, now, self.settings.frame_bytes_max)? {
                if let Frame::Record(_) = f {
                    return Err(LinkError::Unsealed("a record inside a record"));
                }
                self.handle_frame(now_ms, f)?;
            }
            if !body.is_empty() {
                return Err(LinkError::Unsealed("a record that ends inside a frame"));
            }
        }
    }

    /// The peer's Hello taken (and, with a secret, the secret proved).
    fn handshake_done(&self) -> bool {
        self.peer.is_some() && self.auth.is_none()
    }

    fn handle_frame(&mut self, now_ms: u64, f: Frame) -> Result<(), LinkError> {
        if self.auth.is_some() {
            return self.handle_auth(now_ms, f);
        }
        match (f, self.peer.is_some()) {
            (Frame::Refuse { reason, text }, _) => Err(LinkError::Refused { reason, text }),
            (Frame::Hello(h), false) => {
                self.check_hello(now_ms, &h)?;
                self.peer = Some(h.clone());
                self.events.push_back(LinkEvent::Up(h));
                Ok(())
            }
            (Frame::Hello(_), true) => Err(LinkError::OutOfTurn("a second Hello")),
            (_, false) => Err(LinkError::OutOfTurn("a frame before Hello")),
            (f @ Frame::Ping { .. }, true) => {
                // The answer is ours; the owner checks the route digest.
                self.push(&Frame::Pong, now_ms);
                self.events.push_back(LinkEvent::Frame(f));
                Ok(())
            }
            (Frame::Pong, true) => {
                self.pongs += 1;
                Ok(())
            }
            (f, true) => {
                self.events.push_back(LinkEvent::Frame(f));
                Ok(())
            }
        }
    }

    /// A frame before the peer proved the secret: the dialer's Hello (the
    /// accepting side answers with its tag), the accepting side's tag
    /// (the dialer answers with its own), the dialer's tag (the accepting
    /// side reports the Hello), or a Refuse.
    fn handle_auth(&mut self, now_ms: u64, f: Frame) -> Result<(), LinkError> {
        let Some(a) = self.auth.as_mut() else {
            return Ok(());
        };
        let dialing = self.expect.is_some();
        match f {
            Frame::Refuse { reason, text } => Err(LinkError::Refused { reason, text }),
            Frame::Hello(h) if !dialing && a.pending.is_none() => {
                self.check_hello(now_ms, &h)?;
                let Some(a) = self.auth.as_mut() else {
                    return Ok(());
                };
                a.dialer_hello = Some(encoded(&Frame::Hello(h.clone()), self.epoch));
                let me = (&self.me.node, self.me.incarnation);
                let tag = a.tag(ACCEPT_LABEL, me, self.me.nonce);
                a.pending = Some(h);
                let answer = Frame::Auth {
                    nonce: self.me.nonce,
                    tag,
                };
                self.push(&answer, now_ms);
                Ok(())
            }
            Frame::Auth { nonce, tag } if dialing => {
                let Some((name, incarnation, _)) = self.expect.clone() else {
                    return Ok(());
                };
                if !a.verify(ACCEPT_LABEL, (&name, incarnation), nonce, &tag) {
                    return self.auth_failed(now_ms, "its tag");
                }
                let peer = (&name, incarnation);
                let answer = Frame::Auth {
                    nonce: 0,
                    tag: a.tag(DIAL_LABEL, peer, nonce),
                };
                let keys = (
                    a.tag(DIALER_RECORDS, peer, nonce),
                    a.tag(ACCEPTOR_RECORDS, peer, nonce),
                );
                self.auth = None;
                self.push(&answer, now_ms);
                // Everything after the proofs is encrypted.
                self.tx_cipher = Some(RecordCipher::new(keys.0));
                self.rx_cipher = Some(RecordCipher::new(keys.1));
                Ok(())
            }
            Frame::Auth { tag, .. } if a.pending.is_some() => {
                let (me, nonce) = ((&self.me.node, self.me.incarnation), self.me.nonce);
                // The dialer reads records from here on, its refusal too.
                self.tx_cipher = Some(RecordCipher::new(a.tag(ACCEPTOR_RECORDS, me, nonce)));
                if !a.verify(DIAL_LABEL, me, nonce, &tag) {
                    return self.auth_failed(now_ms, "its tag");
                }
                self.rx_cipher = Some(RecordCipher::new(a.tag(DIALER_RECORDS, me, nonce)));
                if let Some(h) = a.pending.take() {
                    self.peer = Some(h.clone());
                    self.events.push_back(LinkEvent::Up(h));
                }
                self.auth = None;
                Ok(())
            }
            Frame::Hello(h) if dialing && !h.auth && h.version == BRIDGE_VERSION => {
                // Taken by a node without the secret (it would have
                // refused a Hello that asks for one; an older version
                // answers as it does).
                self.auth_failed(now_ms, "a Hello without the cluster secret")
            }
            _ => Err(LinkError::OutOfTurn(
                "a frame before the cluster secret was proved",
            )),
        }
    }

    /// The peer did not prove the secret (`what` failed): refuse it (in a
    /// record when the dialer already reads records).
    fn auth_failed(&mut self, now_ms: u64, what: &str) -> Result<(), LinkError> {
        let text = format!("the peer did not prove the cluster secret ({what})");
        self.push(
            &Frame::Refuse {
                reason: RefuseReason::Other,
                text: "the cluster secret was not proved".into(),
            },
            now_ms,
        );
        Err(LinkError::Handshake(text))
    }

    fn check_hello(&mut self, now_ms: u64, h: &Hello) -> Result<(), LinkError> {
        let refuse = |s: &mut Self, reason, text: String| {
            s.push(
                &Frame::Refuse {
                    reason,
                    text: text.clone(),
                },
                now_ms,
            );
            Err(LinkError::Handshake(text))
        };
        if h.version != BRIDGE_VERSION {
            let text = format!(
                "bridge protocol version {} here, {} there",
                BRIDGE_VERSION, h.version
            );
            return refuse(self, RefuseReason::Version, text);
        }
        if h.cluster_tag != self.me.cluster_tag {
            return refuse(self, RefuseReason::Cluster, "another cluster name".into());
        }
        if h.auth != self.me.auth {
            let (here, there) = if self.me.auth {
                ("here", "not there")
            } else {
                ("not here", "there")
            };
            let text = format!("a cluster secret (cluster.secret_file) {here}, {there}");
            return refuse(self, RefuseReason::Other, text);
        }
        if h.shards == 0 || h.shard >= h.shards {
            return refuse(
                self,
                RefuseReason::Other,
                format!("shard {} of {}", h.shard, h.shards),
            );
        }
        if h.node == self.me.node {
            return refuse(self, RefuseReason::Other, "a link to itself".into());
        }
        if let Some((name, incarnation, addr)) = &self.expect {
            if &h.node != name || h.incarnation != *incarnation || !same_addr(h.addr, *addr) {
                let text = format!(
                    "dialed {name} incarnation {incarnation} at {addr}, reached {} incarnation {} \
                     at {}",
                    h.node, h.incarnation, h.addr
                );
                return refuse(self, RefuseReason::NotMember, text);
            }
        }
        Ok(())
    }

    /// Pings sent and Pongs received so far: when the Pongs reach the
    /// Pings sent by some moment, the peer has read everything sent
    /// before it.
    pub fn pings_answered(&self) -> (u64, u64) {
        (self.pings, self.pongs)
    }

    /// Queue `f` for the peer (after the handshake): [`Full`] when the
    /// output is past its bound (the caller keeps the frame or drops it).
    pub fn send(&mut self, now_ms: u64, f: &Frame) -> Result<(), Full> {
        if self.tx.len() >= self.settings.out_bytes_max {
            return Err(Full);
        }
        self.push(f, now_ms);
        Ok(())
    }

    /// Queue `f` past the output bound: for what must never be dropped
    /// (route changes); the caller watches [`LinkSession::out_bytes`].
    pub fn force_send(&mut self, now_ms: u64, f: &Frame) {
        self.push(f, now_ms);
    }

    /// Refuse the peer (its Hello was fine, but the owner will not have
    /// it): the frame is queued; close after writing it.
    pub fn refuse(&mut self, now_ms: u64, reason: RefuseReason, text: &str) {
        self.push(
            &Frame::Refuse {
                reason,
                text: text.to_string(),
            },
            now_ms,
        );
    }

    fn push(&mut self, f: &Frame, now_ms: u64) {
        if let Frame::Ping { .. } = f {
            self.pings += 1;
        }
        let now = self.epoch + std::time::Duration::from_millis(now_ms);
        if self.tx_cipher.is_some() && self.open_record.is_none() {
            self.open_record = Some(frame::begin_record(&mut self.tx));
        }
        frame::encode(f, now, &mut self.tx);
        self.last_tx_ms = now_ms;
        if self
            .open_record
            .is_some_and(|at| self.tx.len() - at >= RECORD_BYTES_MAX)
        {
            self.seal();
        }
    }

    /// Encrypt the open record (what was written since the last one).
    fn seal(&mut self) {
        if let (Some(at), Some(cipher)) = (self.open_record.take(), self.tx_cipher.as_mut()) {
            frame::end_record(&mut self.tx, at, |plain| cipher.seal(plain));
        }
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    /// Everything waiting to be written, taken.
    pub fn poll_transmit(&mut self) -> Option<BytesMut> {
        self.seal();
        (!self.tx.is_empty()).then(|| self.tx.split())
    }

    /// Time passes: an error when the peer has been silent too long; true
    /// when this side has been silent long enough that the owner should
    /// send a Ping.
    pub fn handle_tick(&mut self, now_ms: u64) -> Result<bool, LinkError> {
        let silent = now_ms.saturating_sub(self.last_rx_ms);
        if silent >= self.settings.dead_after_ms {
            return Err(LinkError::Silent(silent));
        }
        if !self.handshake_done() && now_ms.saturating_sub(self.started_ms) >= HANDSHAKE_MS {
            return Err(LinkError::Handshake(format!(
                "not done within {HANDSHAKE_MS} ms"
            )));
        }
        Ok(self.is_up() && now_ms.saturating_sub(self.last_tx_ms) >= self.settings.ping_after_ms)
    }
}

/// `f` as written on a link (what a tag covers).
fn encoded(f: &Frame, epoch: Instant) -> BytesMut {
    let mut out = BytesMut::new();
    frame::encode(f, epoch, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(name: &str, incarnation: u64) -> Hello {
        Hello {
            version: BRIDGE_VERSION,
            cluster_tag: 1,
            node: NodeName::new(name).unwrap(),
            incarnation,
            addr: "127.0.0.1:7946".parse().unwrap(),
            shard: 0,
            shards: 2,
            auth: false,
            nonce: 0,
        }
    }

    fn settings() -> LinkSettings {
        LinkSettings {
            frame_bytes_max: 1 << 20,
            out_bytes_max: 1 << 16,
            ping_after_ms: 1000,
            dead_after_ms: 5000,
            secret: None,
            nonce_seed: [7; 16],
        }
    }

    fn pair(expect_incarnation: u64) -> (LinkSession, LinkSession) {
        let epoch = Instant::now();
        let a = LinkSession::dialed(
            hello("a", 1),
            (
                NodeName::new("b").unwrap(),
                expect_incarnation,
                "127.0.0.1:7946".parse().unwrap(),
            ),
            settings(),
            (epoch, 0),
            1,
        );
        let b = LinkSession::accepted(hello("b", 7), settings(), (epoch, 0), 1);
        (a, b)
    }

    fn pump(from: &mut LinkSession, to: &mut LinkSession) -> Result<(), LinkError> {
        while let Some(bytes) = from.poll_transmit() {
            to.handle_bytes(0, &bytes)?;
        }
        Ok(())
    }

    /// The dialer's Hello to the acceptor, which welcomes it.
    fn greet(a: &mut LinkSession, b: &mut LinkSession) -> Result<(), LinkError> {
        pump(a, b)?;
        if matches!(b.events.back(), Some(LinkEvent::Up(_))) {
            b.welcome(0);
        }
        pump(b, a)
    }

    #[test]
    fn both_sides_come_up_and_frames_pass() {
        let (mut a, mut b) = pair(7);
        assert!(
            b.poll_transmit().is_none(),
            "the acceptor waits for the dialer's Hello"
        );
        greet(&mut a, &mut b).unwrap();
        assert!(matches!(a.poll_event(), Some(LinkEvent::Up(h)) if h.incarnation == 7));
        assert!(matches!(b.poll_event(), Some(LinkEvent::Up(h)) if h.node.as_str() == "a"));
        a.send(0, &Frame::RouteAck { seq: 3 }).unwrap();
        pump(&mut a, &mut b).unwrap();
        assert_eq!(
            b.poll_event(),
            Some(LinkEvent::Frame(Frame::RouteAck { seq: 3 }))
        );
    }

    /// A pair whose sides hold `a_secret` and `b_secret`.
    fn pair_with(a_secret: Option<&[u8]>, b_secret: Option<&[u8]>) -> (LinkSession, LinkSession) {
        let with = |s: Option<&[u8]>| LinkSettings {
            secret: s.map(|s| Arc::new(ClusterSecret::new(s).unwrap())),
            ..settings()
        };
        let epoch = Instant::now();
        let expect = (
            NodeName::new("b").unwrap(),
            7,
            "127.0.0.1:7946".parse().unwrap(),
        );
        let a = LinkSession::dialed(hello("a", 1), expect, with(a_secret), (epoch, 0), 3);
        let b = LinkSession::accepted(hello("b", 7), with(b_secret), (epoch, 0), 9);
        (a, b)
    }

    /// Both sides prove the secret before either reports the link: the
    /// accepting side reports the dialer's Hello only after the dialer's
    /// tag checked, and the dialer takes the Hello only after the
    /// accepting side's.
    #[test]
    fn with_the_same_secret_both_sides_prove_it_and_come_up() {
        let key: &[u8] = b"sixteen bytes ok";
        let (mut a, mut b) = pair_with(Some(key), Some(key));
        pump(&mut a, &mut b).unwrap();
        assert!(b.poll_event().is_none(), "not before the dialer's tag");
        pump(&mut b, &mut a).unwrap();
        pump(&mut a, &mut b).unwrap();
        assert!(matches!(b.poll_event(), Some(LinkEvent::Up(h)) if h.node.as_str() == "a"));
        b.welcome(0);
        pump(&mut b, &mut a).unwrap();
        assert!(matches!(a.poll_event(), Some(LinkEvent::Up(h)) if h.incarnation == 7));
        a.send(0, &Frame::RouteAck { seq: 3 }).unwrap();
        pump(&mut a, &mut b).unwrap();
        assert_eq!(
            b.poll_event(),
            Some(LinkEvent::Frame(Frame::RouteAck { seq: 3 }))
        );
    }

    /// With a secret, every frame after the handshake goes encrypted in a
    /// record: the receiver acts on a record only once it opens (read a
    /// byte at a time or whole), and a byte changed, or a record written
    /// again, closes the link.
    #[test]
    fn after_the_handshake_records_are_encrypted_and_checked() {
        let key: &[u8] = b"sixteen bytes ok";
        let up = || {
            let (mut a, mut b) = pair_with(Some(key), Some(key));
            pump(&mut a, &mut b).unwrap();
            pump(&mut b, &mut a).unwrap();
            pump(&mut a, &mut b).unwrap();
            b.poll_event().unwrap();
            b.welcome(0);
            pump(&mut b, &mut a).unwrap();
            a.poll_event().unwrap();
            (a, b)
        };
        let (mut a, mut b) = up();
        a.send(0, &Frame::RouteAck { seq: 1 }).unwrap();
        a.send(0, &Frame::RouteAck { seq: 2 }).unwrap();
        let record = a.poll_transmit().unwrap();
        let plain = encoded(&Frame::RouteAck { seq: 1 }, Instant::now());
        assert!(
            !record.windows(plain.len()).any(|w| w == &plain[..]),
            "the frames do not cross in the clear"
        );
        for (i, byte) in record.iter().enumerate() {
            b.handle_bytes(0, &[*byte]).unwrap();
            if i + 1 < record.len() {
                assert!(b.poll_event().is_none(), "nothing before the seal");
            }
        }
        assert_eq!(
            b.poll_event(),
            Some(LinkEvent::Frame(Frame::RouteAck { seq: 1 }))
        );
        assert_eq!(
            b.poll_event(),
            Some(LinkEvent::Frame(Frame::RouteAck { seq: 2 }))
        );
        assert!(
            matches!(b.handle_bytes(0, &record), Err(LinkError::Unsealed(_))),
            "a record written again"
        );
        let (mut a, mut b) = up();
        a.send(0, &Frame::RouteAck { seq: 7 }).unwrap();
        let mut record = a.poll_transmit().unwrap();
        record[9] ^= 1; // inside the RouteAck's number
        assert!(matches!(
            b.handle_bytes(0, &record),
            Err(LinkError::Unsealed(_))
        ));
        assert!(b.poll_event().is_none());
        // Bytes that never make a record that checks do not keep it alive.
        let (_, mut b) = up();
        b.handle_bytes(0, &[0, 0, 0x10, 0]).unwrap();
        for ms in (1000..5000).step_by(1000) {
            b.handle_bytes(ms, &[0]).unwrap();
            assert!(b.handle_tick(ms).is_ok());
        }
        assert!(matches!(b.handle_tick(5000), Err(LinkError::Silent(_))));
    }

    /// A recorded handshake does not replay: the dialer's Hello and tag,
    /// written again to an accepting side of another run (another seed)
    /// or another shard of the same run, with the same link number, do
    /// not check. A link that has not finished its handshake within
    /// HANDSHAKE_MS is closed whatever it sends, and takes no large frame
    /// before it.
    #[test]
    fn a_recorded_handshake_does_not_replay_and_a_slow_one_is_closed() {
        let key: &[u8] = b"sixteen bytes ok";
        let (mut a, mut b) = pair_with(Some(key), Some(key));
        let greeting = a.poll_transmit().unwrap();
        b.handle_bytes(0, &greeting).unwrap();
        pump(&mut b, &mut a).unwrap();
        let auth = a.poll_transmit().unwrap();
        b.handle_bytes(0, &auth).unwrap();
        assert!(matches!(b.poll_event(), Some(LinkEvent::Up(_))));
        let acceptor = |seed: u8, shard: u16| {
            let settings = LinkSettings {
                secret: Some(Arc::new(ClusterSecret::new(key).unwrap())),
                nonce_seed: [seed; 16],
                ..settings()
            };
            let mut me = hello("b", 7);
            me.shard = shard;
            LinkSession::accepted(me, settings, (Instant::now(), 0), 9)
        };
        for (seed, shard) in [(8, 0), (7, 1)] {
            let mut replayed = acceptor(seed, shard);
            replayed.handle_bytes(0, &greeting).unwrap();
            let err = replayed.handle_bytes(0, &auth).unwrap_err();
            assert!(matches!(err, LinkError::Handshake(_)), "{err:?}");
            assert!(replayed.poll_event().is_none());
        }
        // The same seed and shard (this run's own link 9) would check:
        // the replay fails only for what the seed and shard change.
        let mut same = acceptor(7, 0);
        same.handle_bytes(0, &greeting).unwrap();
        same.handle_bytes(0, &auth).unwrap();
        // Slow: a byte at a time keeps it from being silent, not alive.
        let mut slow = acceptor(1, 0);
        slow.handle_bytes(0, &[0, 0, 0x0f, 0]).unwrap();
        for ms in (0..HANDSHAKE_MS).step_by(1000) {
            slow.handle_bytes(ms, &[0]).unwrap();
            assert_eq!(slow.handle_tick(ms), Ok(false));
        }
        assert!(matches!(
            slow.handle_tick(HANDSHAKE_MS),
            Err(LinkError::Handshake(_))
        ));
        let mut big = acceptor(1, 0);
        let len = (HANDSHAKE_FRAME_BYTES_MAX as u32 + 1).to_be_bytes();
        assert!(matches!(
            big.handle_bytes(0, &len),
            Err(LinkError::Frame(FrameError::TooLarge { .. }))
        ));
    }

    /// Another secret: the dialer finds the accepting side's tag wrong
    /// and refuses it; a secret on one side only: the accepting side
    /// refuses the Hello, naming the setting. No side reports the link.
    #[test]
    fn another_secret_or_none_is_refused_and_nothing_comes_up() {
        let (mut a, mut b) = pair_with(Some(b"sixteen bytes ok"), Some(b"sixteen bytes no"));
        pump(&mut a, &mut b).unwrap();
        let err = pump(&mut b, &mut a).unwrap_err();
        assert!(matches!(err, LinkError::Handshake(ref t) if t.contains("cluster secret")));
        assert!(matches!(
            pump(&mut a, &mut b),
            Err(LinkError::Refused { .. })
        ));
        // The dialer's tag refused: the dialer, already decrypting, still
        // reads why.
        let (mut a, mut b) = pair_with(Some(b"sixteen bytes ok"), Some(b"sixteen bytes ok"));
        pump(&mut a, &mut b).unwrap();
        pump(&mut b, &mut a).unwrap();
        let mut auth = a.poll_transmit().unwrap();
        let last = auth.len() - 1;
        auth[last] ^= 1; // the dialer's tag
        assert!(matches!(
            b.handle_bytes(0, &auth),
            Err(LinkError::Handshake(_))
        ));
        let refused = pump(&mut b, &mut a).unwrap_err();
        assert!(
            matches!(refused, LinkError::Refused { ref text, .. } if text.contains("not proved")),
            "{refused:?}"
        );
        assert!(a.poll_event().is_none() && b.poll_event().is_none());
        for (x, y) in [
            (Some(&b"sixteen bytes ok"[..]), None),
            (None, Some(&b"sixteen bytes ok"[..])),
        ] {
            let (mut a, mut b) = pair_with(x, y);
            let err = pump(&mut a, &mut b).unwrap_err();
            assert!(
                matches!(err, LinkError::Handshake(ref t) if t.contains("cluster.secret_file")),
                "{err:?}"
            );
            assert!(matches!(
                pump(&mut b, &mut a),
                Err(LinkError::Refused { .. })
            ));
            assert!(a.poll_event().is_none() && b.poll_event().is_none());
        }
        // A dialer that sends anything but its Hello and tag is refused.
        let key: &[u8] = b"sixteen bytes ok";
        let (mut a, mut b) = pair_with(Some(key), Some(key));
        pump(&mut a, &mut b).unwrap();
        a.force_send(0, &Frame::RouteAck { seq: 1 });
        assert!(matches!(pump(&mut a, &mut b), Err(LinkError::OutOfTurn(_))));
        assert!(b.poll_event().is_none());
    }

    #[test]
    fn every_ping_is_answered_in_order_after_what_came_before_it() {
        let (mut a, mut b) = pair(7);
        greet(&mut a, &mut b).unwrap();
        a.send(0, &Frame::RouteAck { seq: 1 }).unwrap();
        a.send(0, &Frame::Ping { seq: 0, digest: 0 }).unwrap();
        a.send(0, &Frame::Ping { seq: 0, digest: 0 }).unwrap();
        assert_eq!(a.pings_answered(), (2, 0));
        pump(&mut a, &mut b).unwrap();
        pump(&mut b, &mut a).unwrap();
        assert_eq!(a.pings_answered(), (2, 2));
    }

    #[test]
    fn a_dialer_that_reached_another_run_refuses_it() {
        let (mut a, mut b) = pair(6);
        let err = greet(&mut a, &mut b).unwrap_err();
        assert!(
            matches!(err, LinkError::Handshake(ref t) if t.contains("reached b incarnation 7"))
        );
        // b reads a's Refuse and closes too.
        let err = pump(&mut a, &mut b).unwrap_err();
        assert!(matches!(
            err,
            LinkError::Refused {
                reason: RefuseReason::NotMember,
                ..
            }
        ));
    }

    #[test]
    fn nothing_but_hello_before_the_handshake() {
        let epoch = Instant::now();
        let mut b = LinkSession::accepted(hello("b", 1), settings(), (epoch, 0), 1);
        let mut bytes = BytesMut::new();
        frame::encode(&Frame::RouteAck { seq: 1 }, epoch, &mut bytes);
        assert_eq!(
            b.handle_bytes(0, &bytes),
            Err(LinkError::OutOfTurn("a frame before Hello"))
        );
        let mut other = hello("c", 1);
        other.version = BRIDGE_VERSION + 1;
        let mut b = LinkSession::accepted(hello("b", 1), settings(), (epoch, 0), 1);
        let mut bytes = BytesMut::new();
        frame::encode(&Frame::Hello(other), epoch, &mut bytes);
        assert!(matches!(
            b.handle_bytes(0, &bytes),
            Err(LinkError::Handshake(_))
        ));
    }

    #[test]
    fn silence_brings_a_ping_then_death_and_full_output_is_refused() {
        let (mut a, mut b) = pair(7);
        greet(&mut a, &mut b).unwrap();
        assert_eq!(a.handle_tick(999), Ok(false));
        assert_eq!(a.handle_tick(1000), Ok(true));
        assert_eq!(a.handle_tick(5000), Err(LinkError::Silent(5000)));
        let big = Frame::Refuse {
            reason: RefuseReason::Other,
            text: "x".repeat(400),
        };
        let mut sent = 0;
        while a.send(0, &big).is_ok() {
            sent += 1;
        }
        assert!(a.out_bytes() >= settings().out_bytes_max);
        assert!(sent > 100);
    }
}
