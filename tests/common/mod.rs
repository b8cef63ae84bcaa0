//! Shared test support: a real broker on a loopback ephemeral port, and a
//! raw-packet client built on our codec for malformed and edge-case input.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use shardmq::codec::{self, Connect, Packet, Properties, QoS, SubOptions, Subscribe, Version};
use shardmq::{Broker, Config};

pub mod child;
pub mod raw;

/// A broker owned by one test; stopped when dropped.
pub struct TestBroker {
    pub broker: Option<Broker>,
    pub addr: SocketAddr,
    pub shards: usize,
}

impl TestBroker {
    pub fn start(shards: usize) -> TestBroker {
        Self::start_with(shards, |_| {})
    }

    pub fn start_with(shards: usize, tweak: impl FnOnce(&mut Config)) -> TestBroker {
        let _ = env_logger_init();
        let mut config = Config::default();
        config.server.listen = vec!["127.0.0.1:0".parse().unwrap()];
        config.http.bind = "127.0.0.1:0".into();
        config.server.shards = shards;
        config.server.pin_cpus = false;
        config.server.io_memory_bytes = 128 << 10;
        // Tests that are not about durability run without a log.
        config.storage.durability = "memory".into();
        // Nor with $SYS topics (retained messages a test would count).
        config.mqtt.sys_interval_s = 0;
        tweak(&mut config);
        let broker = Broker::start(config).expect("broker starts");
        let addr = broker.local_addrs()[0];
        TestBroker {
            broker: Some(broker),
            addr,
            shards,
        }
    }

    pub fn stop(&mut self) {
        if let Some(b) = self.broker.take() {
            b.stop();
        }
    }

    /// A client id whose session lives on `shard`.
    pub fn id_on_shard(&self, prefix: &str, shard: usize) -> String {
        id_on(prefix, shard, self.shards)
    }
}

/// Why `Broker::start` refuses `config` (panics if it starts).
#[allow(dead_code)]
pub fn start_refused(config: Config) -> String {
    match Broker::start(config) {
        Ok(b) => {
            b.stop();
            panic!("the broker started")
        }
        Err(e) => e.to_string(),
    }
}

/// A client id (`{prefix}-{n}`) whose session lives on `shard` of `shards`.
pub fn id_on(prefix: &str, shard: usize, shards: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| shardmq::home_shard(id, shards) == shard)
        .unwrap()
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Tests log only when RUST_LOG is set.
fn env_logger_init() -> Result<(), log::SetLoggerError> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("off"))
        .is_test(true)
        .try_init()
}

/// A blocking client that speaks bytes and packets, for edge cases.
pub struct Raw {
    pub stream: TcpStream,
    pub version: Version,
    buf: BytesMut,
}

pub const WAIT: Duration = Duration::from_secs(5);

impl Raw {
    pub fn open(addr: SocketAddr, version: Version) -> Raw {
        Self::try_open(addr, version).expect("connect")
    }

    /// A client on a stream already connected.
    pub fn from_stream(stream: TcpStream, version: Version) -> Raw {
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            version,
            buf: BytesMut::new(),
        }
    }

    /// As `open`, but a broker that is not there is an error.
    pub fn try_open(addr: SocketAddr, version: Version) -> std::io::Result<Raw> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Raw {
            stream,
            version,
            buf: BytesMut::new(),
        })
    }

    /// Open and complete CONNECT/CONNACK; returns the CONNACK.
    pub fn connect(
        addr: SocketAddr,
        version: Version,
        client_id: &str,
        clean: bool,
    ) -> (Raw, codec::ConnAck) {
        Self::connect_with(addr, connect_packet(version, client_id, clean))
    }

    pub fn connect_with(addr: SocketAddr, connect: Connect) -> (Raw, codec::ConnAck) {
        let mut raw = Raw::open(addr, connect.version);
        raw.send(&Packet::Connect(Box::new(connect)));
        match raw.recv() {
            Some(Packet::ConnAck(a)) => (raw, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub fn send(&mut self, p: &Packet) {
        self.try_send(p).expect("write");
    }

    /// As `send`, but a closed connection is an error.
    pub fn try_send(&mut self, p: &Packet) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        codec::encode(p, self.version, &mut out);
        self.stream.write_all(&out)
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Next packet within WAIT; None if the broker closed the connection.
    pub fn recv(&mut self) -> Option<Packet> {
        self.recv_within(WAIT)
            .expect("a packet or a close within the wait")
    }

    /// Err(()) on timeout, Ok(None) on close.
    pub fn recv_within(&mut self, wait: Duration) -> Result<Option<Packet>, ()> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(p) = codec::decode(&mut self.buf, self.version, 1 << 28)
                .expect("broker sends valid packets")
            {
                return Ok(Some(p));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(());
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Ok(None),
            }
        }
    }

    /// Assert nothing arrives for `wait`.
    pub fn expect_silence(&mut self, wait: Duration) {
        if let Ok(p) = self.recv_within(wait) {
            panic!("expected nothing, got {p:?}");
        }
    }

    /// Expect the broker to close the connection, possibly after a
    /// DISCONNECT; returns the DISCONNECT reason if one was sent.
    pub fn expect_close(&mut self) -> Option<u8> {
        let mut reason = None;
        loop {
            match self.recv() {
                None => return reason,
                Some(Packet::Disconnect(d)) => reason = Some(d.reason),
                Some(other) => panic!("expected a close, got {other:?}"),
            }
        }
    }

    pub fn subscribe(&mut self, packet_id: u16, filter: &str, qos: QoS) -> Vec<u8> {
        self.subscribe_opts(
            packet_id,
            filter,
            SubOptions {
                qos,
                ..Default::default()
            },
            Properties::default(),
        )
    }

    pub fn subscribe_opts(
        &mut self,
        packet_id: u16,
        filter: &str,
        options: SubOptions,
        properties: Properties,
    ) -> Vec<u8> {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id,
            filters: vec![(filter.to_string(), options)],
            properties: properties.into(),
        }));
        match self.recv() {
            Some(Packet::SubAck(a)) => {
                assert_eq!(a.packet_id, packet_id);
                a.reasons
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    pub fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, retain: bool, packet_id: u16) {
        self.send(&Packet::Publish(publish(
            topic, payload, qos, retain, packet_id,
        )));
    }

    /// Next PUBLISH (skipping nothing: any other packet fails the test).
    pub fn recv_publish(&mut self) -> codec::Publish {
        match self.recv() {
            Some(Packet::Publish(p)) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
}

/// A 5.0 CONNECT with a Session Expiry Interval.
pub fn v5_connect(id: &str, clean: bool, expiry: u32) -> Connect {
    let mut c = connect_packet(Version::V5, id, clean);
    c.properties.session_expiry_interval = Some(expiry);
    c
}

pub fn connect_packet(version: Version, client_id: &str, clean: bool) -> Connect {
    Connect {
        version,
        clean_start: clean,
        keep_alive: 60,
        client_id: client_id.to_string(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

pub fn publish(
    topic: &str,
    payload: &[u8],
    qos: QoS,
    retain: bool,
    packet_id: u16,
) -> codec::Publish {
    codec::Publish {
        dup: false,
        qos,
        retain,
        topic: topic.into(),
        packet_id,
        payload: bytes::Bytes::copy_from_slice(payload),
        properties: Properties::default().into(),
    }
}

/// xorshift64: a tiny seeded generator, so a failing run can be replayed.
pub struct XorShift(u64);

impl XorShift {
    /// Scramble the seed (splitmix64) so that close seeds give unrelated
    /// streams; the state must not be 0.
    pub fn new(seed: u64) -> XorShift {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        XorShift((z ^ (z >> 31)) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

/// A seed for a randomized test: `var` from the environment to replay a
/// run, else the clock.
pub fn seed_from_env(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

/// A self-signed certificate for 127.0.0.1, written to `dir` as
/// `server.pem` and `server.key`: its PEM, and a rustls client
/// configuration that trusts it.
pub fn self_signed(dir: &std::path::Path) -> (String, std::sync::Arc<rustls::ClientConfig>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    (cert.pem(), std::sync::Arc::new(config))
}

/// The sum over shards of the metric lines starting with `name` (its
/// labels included, as far as given) in `/metrics` at `http`.
#[allow(dead_code)]
pub fn metric_sum(http: SocketAddr, name: &str) -> u64 {
    let text = self::http(http, "GET", "/metrics", "", "").1;
    text.lines()
        .filter(|l| l.starts_with(name))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Status and body of one HTTP/1.1 request to `addr`: `method path`, extra
/// header lines (each ending in CRLF), and `body` (sent with its length).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let length = body.len();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{headers}Content-Length: {length}\r\n\r\n{body}"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}
