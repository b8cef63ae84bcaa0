//! Every transport (tcp, tls, ws, wss) under a client that stops reading:
//! the broker's socket fills, the client pings it meanwhile, then reads
//! again and gets every message, and a takeover still ends the connection
//! in order (DISCONNECT 0x8E, then the WebSocket close frame, then TLS
//! close_notify). And a client that never reads again is closed after
//! `server.send_timeout_ms`, without stopping its publisher.
//!
//! Our own clients over real sockets (rustls for TLS, tungstenite for
//! WebSocket), since the point is what the bytes on the wire do.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::child::temp_dir;
use common::TestBroker;
use shardmq::codec::{self, Packet, QoS, SubOptions, Subscribe, Version};
use shardmq::config::ListenerConfig;
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

/// Messages the publisher sends, and their payload size: 12.8 MB, more
/// than loopback's socket buffers hold.
const MESSAGES: usize = 400;
const PAYLOAD: usize = 32 * 1024;

trait Duplex: Read + Write + Send {}
impl<T: Read + Write + Send> Duplex for T {}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Tcp,
    Tls,
    Ws,
    Wss,
}

/// A broker with one listener of `kind`, and what a client needs to
/// reach it.
struct Setup {
    broker: TestBroker,
    kind: Kind,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Holds the certificates; removed when the setup ends.
    _dir: common::child::TestDir,
}

fn start(kind: Kind, tweak: impl FnOnce(&mut shardmq::Config)) -> Setup {
    let dir = temp_dir(&format!("transport-{kind:?}"));
    let tls = matches!(kind, Kind::Tls | Kind::Wss).then(|| common::self_signed(&dir).1);
    let broker = TestBroker::start_with(2, |c| {
        let mut l = ListenerConfig::tcp("127.0.0.1:0".parse().unwrap());
        l.transport = format!("{kind:?}").to_lowercase();
        if tls.is_some() {
            l.tls_cert_file = dir.join("server.pem");
            l.tls_key_file = dir.join("server.key");
        }
        c.listeners = vec![l];
        // Several publishes in one WebSocket frame are more than one packet.
        c.mqtt.packet_size_max_bytes = 64 * 1024;
        c.mqtt.queue_bytes_max = 64 << 20;
        tweak(c);
    });
    Setup {
        broker,
        kind,
        tls,
        _dir: dir,
    }
}

/// An MQTT 5 client over one of the transports.
struct Client {
    /// The TCP socket underneath (a second handle on it).
    tcp: TcpStream,
    link: Link,
    buf: BytesMut,
    /// WebSocket pongs received.
    pongs: usize,
}

enum Link {
    Bytes(Box<dyn Duplex>),
    Ws(Box<WebSocket<Box<dyn Duplex>>>),
}

impl Client {
    /// Connect as `id` (clean start) and read the CONNACK.
    fn connect(s: &Setup, id: &str) -> Client {
        Client::connect_with(s, common::connect_packet(Version::V5, id, true), None)
    }

    /// Send `connect` (from a socket with `rcvbuf` bytes of receive
    /// buffer, if given) and read the CONNACK.
    fn connect_with(s: &Setup, connect: codec::Connect, rcvbuf: Option<usize>) -> Client {
        let addr: SocketAddr = s.broker.addr;
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        if let Some(n) = rcvbuf {
            socket.set_recv_buffer_size(n).unwrap();
        }
        socket.connect(&addr.into()).unwrap();
        let tcp = TcpStream::from(socket);
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let handle = tcp.try_clone().unwrap();
        let bytes: Box<dyn Duplex> = match &s.tls {
            None => Box::new(tcp),
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
                let conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
                Box::new(rustls::StreamOwned::new(conn, tcp))
            }
        };
        let link = match s.kind {
            Kind::Tcp | Kind::Tls => Link::Bytes(bytes),
            Kind::Ws | Kind::Wss => {
                let mut req = format!("ws://{addr}/mqtt").into_client_request().unwrap();
                req.headers_mut()
                    .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
                let (ws, _) = tungstenite::client(req, bytes).expect("upgrade");
                Link::Ws(Box::new(ws))
            }
        };
        let mut c = Client {
            tcp: handle,
            link,
            buf: BytesMut::new(),
            pongs: 0,
        };
        c.send(&[Packet::Connect(Box::new(connect))]);
        match c.recv() {
            Some(Packet::ConnAck(a)) => assert_eq!(a.reason, 0),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        c
    }

    /// Send `packets` in one write (one WebSocket frame).
    fn send(&mut self, packets: &[Packet]) {
        let mut out = BytesMut::new();
        for p in packets {
            codec::encode(p, Version::V5, &mut out);
        }
        match &mut self.link {
            Link::Bytes(s) => {
                s.write_all(&out).unwrap();
                s.flush().unwrap();
            }
            Link::Ws(ws) => ws.send(Message::binary(out.to_vec())).unwrap(),
        }
    }

    /// WebSocket pings (nothing on the other transports).
    fn ping_frames(&mut self, n: usize) {
        if let Link::Ws(ws) = &mut self.link {
            for i in 0..n {
                ws.write(Message::Ping((i as u32).to_be_bytes().to_vec()))
                    .unwrap();
            }
            ws.flush().unwrap();
        }
    }

    /// The next packet; None when the broker ended the connection in
    /// order (EOF after TLS close_notify, a WebSocket close frame).
    fn recv(&mut self) -> Option<Packet> {
        self.try_recv().expect("a packet or an orderly end")
    }

    fn try_recv(&mut self) -> io::Result<Option<Packet>> {
        loop {
            if let Some(p) = codec::decode(&mut self.buf, Version::V5, 1 << 20).unwrap() {
                return Ok(Some(p));
            }
            match &mut self.link {
                Link::Bytes(s) => {
                    let mut chunk = [0u8; 65536];
                    match s.read(&mut chunk)? {
                        0 => return Ok(None),
                        n => self.buf.extend_from_slice(&chunk[..n]),
                    }
                }
                Link::Ws(ws) => match ws.read() {
                    Ok(Message::Binary(b)) => self.buf.extend_from_slice(&b),
                    Ok(Message::Pong(_)) => self.pongs += 1,
                    Ok(Message::Ping(_)) => {}
                    Ok(Message::Close(_)) | Err(tungstenite::Error::ConnectionClosed) => {
                        return Ok(None)
                    }
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(tungstenite::Error::Io(e)) => return Err(e),
                    Err(e) => return Err(io::Error::other(e)),
                },
            }
        }
    }
}

fn subscribe(c: &mut Client, filter: &str) {
    subscribe_qos(c, filter, QoS::AtMostOnce)
}

fn subscribe_qos(c: &mut Client, filter: &str, qos: QoS) {
    c.send(&[Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            filter.into(),
            SubOptions {
                qos,
                ..Default::default()
            },
        )],
        properties: Default::default(),
    })]);
    assert!(matches!(c.recv(), Some(Packet::SubAck(_))));
}

/// Publish `count` messages on `bp/<n>` from another thread, four per
/// write, at QoS 0.
fn flood(publisher: Client, count: usize) -> std::thread::JoinHandle<Client> {
    flood_qos(publisher, count, QoS::AtMostOnce)
}

/// [`flood`] at `qos` (the acknowledgements are left unread).
fn flood_qos(mut publisher: Client, count: usize, qos: QoS) -> std::thread::JoinHandle<Client> {
    std::thread::spawn(move || {
        for batch in 0..count / 4 {
            let packets: Vec<Packet> = (0..4)
                .map(|i| {
                    let n = batch * 4 + i;
                    let mut payload = vec![n as u8; PAYLOAD];
                    payload[..4].copy_from_slice(&(n as u32).to_be_bytes());
                    Packet::Publish(common::publish(
                        &format!("bp/{n}"),
                        &payload,
                        qos,
                        false,
                        if qos == QoS::AtMostOnce {
                            0
                        } else {
                            n as u16 + 1
                        },
                    ))
                })
                .collect();
            publisher.send(&packets);
        }
        publisher
    })
}

/// The scenario of the module docs, on one transport.
fn stall_then_resume(kind: Kind) {
    let s = start(kind, |_| {});
    let sub_id = s.broker.id_on_shard("stall-sub", 0);
    let mut sub = Client::connect(&s, &sub_id);
    subscribe(&mut sub, "bp/#");
    let publisher = Client::connect(&s, &s.broker.id_on_shard("stall-pub", 1));
    let publishing = flood(publisher, MESSAGES);
    // The sub's socket fills while the broker reads from it now and then
    // (its writer waiting for room meanwhile).
    const PINGS: usize = 50;
    for _ in 0..PINGS {
        sub.send(&[Packet::PingReq]);
        sub.ping_frames(100);
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));

    let mut next = 0usize;
    let mut pingresps = 0;
    while next < MESSAGES || pingresps < PINGS {
        match sub.recv() {
            Some(Packet::Publish(p)) => {
                assert_eq!(&*p.topic, format!("bp/{next}"), "{kind:?}: in order");
                assert_eq!(p.payload.len(), PAYLOAD);
                assert_eq!(p.payload[..4], (next as u32).to_be_bytes());
                next += 1;
            }
            Some(Packet::PingResp) => pingresps += 1,
            other => panic!("{kind:?}: after {next} messages: {other:?}"),
        }
    }
    if matches!(kind, Kind::Ws | Kind::Wss) {
        // Only the last ping waiting is answered (some, not 5,000).
        sub.send(&[Packet::PingReq]);
        assert!(matches!(sub.recv(), Some(Packet::PingResp)));
        assert!(
            (1..2500).contains(&sub.pongs),
            "{kind:?}: {} pongs",
            sub.pongs
        );
    }
    let mut publisher = publishing.join().unwrap();
    publisher.send(&[Packet::PingReq]);
    assert!(matches!(publisher.recv(), Some(Packet::PingResp)));

    // A takeover: DISCONNECT 0x8E, then the orderly end of each layer.
    let _taker = Client::connect(&s, &sub_id);
    match sub.recv() {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, 0x8E, "{kind:?}"),
        other => panic!("{kind:?}: expected DISCONNECT, got {other:?}"),
    }
    assert!(sub.recv().is_none(), "{kind:?}: then the end");
}

#[test]
fn a_subscriber_that_stops_reading_then_resumes_gets_everything_over_tcp() {
    stall_then_resume(Kind::Tcp);
}

#[test]
fn a_subscriber_that_stops_reading_then_resumes_gets_everything_over_tls() {
    stall_then_resume(Kind::Tls);
}

#[test]
fn a_subscriber_that_stops_reading_then_resumes_gets_everything_over_ws() {
    stall_then_resume(Kind::Ws);
}

#[test]
fn a_subscriber_that_stops_reading_then_resumes_gets_everything_over_wss() {
    stall_then_resume(Kind::Wss);
}

/// A subscriber that never reads again is closed once a write has waited
/// `server.send_timeout_ms`; its publisher goes on.
fn never_reads_again(kind: Kind) {
    let s = start(kind, |c| c.server.send_timeout_ms = 1000);
    let mut sub = Client::connect(&s, &s.broker.id_on_shard("never-sub", 0));
    subscribe(&mut sub, "bp/#");
    let publisher = Client::connect(&s, &s.broker.id_on_shard("never-pub", 1));
    let mut publisher = flood(publisher, MESSAGES).join().unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    // What the socket still holds, then the end (an orderly one may not
    // be possible: the broker could not write it).
    let started = Instant::now();
    let mut received = 0;
    loop {
        match sub.try_recv() {
            Ok(Some(Packet::Publish(_))) => received += 1,
            Ok(Some(other)) => panic!("{kind:?}: {other:?}"),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!("{kind:?}: still open after {:?}", started.elapsed())
            }
            Ok(None) | Err(_) => break,
        }
    }
    assert!(received < MESSAGES, "{kind:?}: closed before the end");
    publisher.send(&[Packet::PingReq]);
    assert!(matches!(publisher.recv(), Some(Packet::PingResp)));
}

#[test]
fn a_subscriber_that_never_reads_again_is_closed_after_the_send_timeout() {
    never_reads_again(Kind::Tcp);
    never_reads_again(Kind::Wss);
}

/// A subscriber that reads slowly but steadily (8 KB every 10 ms from a
/// 16 KB receive buffer) for about 4 s is not cut off by a send timeout
/// of 100 ms: its TCP acknowledges bytes all along, whether or not the
/// broker's writes wait (on loopback the kernel's send buffer takes them
/// in small steps here; on a slow link one write can take seconds).
#[test]
fn a_slow_reader_that_keeps_reading_outlives_the_send_timeout() {
    const COUNT: usize = 100; // 3.2 MB
    let s = start(Kind::Tcp, |c| c.server.send_timeout_ms = 100);
    let connect = common::connect_packet(Version::V5, &s.broker.id_on_shard("slow-sub", 0), true);
    let mut sub = Client::connect_with(&s, connect, Some(16 * 1024));
    subscribe(&mut sub, "bp/#");
    let publisher = Client::connect(&s, &s.broker.id_on_shard("slow-pub", 1));
    let publishing = flood(publisher, COUNT);
    let Link::Bytes(raw) = &mut sub.link else {
        unreachable!()
    };
    let want = COUNT * (PAYLOAD + 10);
    let mut total = 0;
    let mut chunk = vec![0u8; 8 * 1024];
    while total < want {
        std::thread::sleep(Duration::from_millis(10));
        match raw.read(&mut chunk) {
            Ok(0) => panic!("closed after {total} bytes"),
            Ok(n) => total += n,
            Err(e) => panic!("after {total} bytes: {e}"),
        }
    }
    publishing.join().unwrap();
}

/// A subscriber killed (TCP reset) while the broker waits to write to it,
/// with its reader paused on the backlog (100 messages here) and no
/// keepalive: the failed write ends the connection, and its will goes
/// out.
#[test]
fn a_stalled_subscriber_that_dies_leaves_its_will() {
    let s = start(Kind::Tcp, |c| c.mqtt.queue_messages_max = 100);
    let mut watcher = Client::connect(&s, &s.broker.id_on_shard("will-watch", 1));
    subscribe(&mut watcher, "will/#");
    let mut connect =
        common::connect_packet(Version::V5, &s.broker.id_on_shard("dying-sub", 0), true);
    connect.keep_alive = 0;
    connect.will = Some(codec::Will {
        topic: "will/dying".into(),
        payload: bytes::Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Default::default(),
    });
    let mut sub = Client::connect_with(&s, connect, None);
    subscribe_qos(&mut sub, "bp/#", QoS::AtLeastOnce);
    let publisher = Client::connect(&s, &s.broker.id_on_shard("dying-pub", 1));
    let publishing = flood_qos(publisher, MESSAGES, QoS::AtLeastOnce);
    // A packet once the backlog is full: the reader reads it, then pauses.
    std::thread::sleep(Duration::from_millis(500));
    sub.send(&[Packet::PingReq]);
    std::thread::sleep(Duration::from_millis(300));
    socket2::SockRef::from(&sub.tcp)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(sub);
    match watcher.recv() {
        Some(Packet::Publish(p)) => {
            assert_eq!((&*p.topic, &p.payload[..]), ("will/dying", &b"gone"[..]))
        }
        other => panic!("expected the will, got {other:?}"),
    }
    publishing.join().unwrap();
}
