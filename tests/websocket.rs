//! MQTT over WebSocket and secure WebSocket, through an independent
//! WebSocket client (tungstenite) carrying our codec's packets: packets
//! split across frames and several in one frame, connections that move to
//! their home shard with their framing state, the subprotocol echoed, a
//! text frame closing the connection, a wrong path refused; and rumqttc's
//! own WebSocket transport (async-tungstenite) over ws and wss.

#[path = "common/client.rs"]
mod client;
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::BytesMut;
use common::child::temp_dir;
use common::{connect_packet, TestBroker};
use shardmq::codec::{self, Packet, QoS, SubOptions, Subscribe, Version};
use shardmq::config::ListenerConfig;
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

fn ws_listener(transport: &str, dir: Option<&std::path::Path>) -> ListenerConfig {
    let mut l = ListenerConfig::tcp("127.0.0.1:0".parse().unwrap());
    l.transport = transport.into();
    if let Some(dir) = dir {
        l.tls_cert_file = dir.join("server.pem");
        l.tls_key_file = dir.join("server.key");
    }
    l
}

fn encode(p: &Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    codec::encode(p, Version::V5, &mut out);
    out.to_vec()
}

/// A WebSocket MQTT client over any byte stream.
struct WsClient<S: Read + Write> {
    ws: WebSocket<S>,
    buf: BytesMut,
}

impl<S: Read + Write> WsClient<S> {
    fn handshake(
        stream: S,
        addr: std::net::SocketAddr,
        path: &str,
    ) -> (WsClient<S>, Option<String>) {
        let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
        let (ws, response) = tungstenite::client(req, stream).expect("upgrade");
        let proto = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap().to_string());
        (
            WsClient {
                ws,
                buf: BytesMut::new(),
            },
            proto,
        )
    }

    fn send_frames(&mut self, bytes: &[u8], pieces: usize) {
        let size = bytes.len().div_ceil(pieces);
        for chunk in bytes.chunks(size) {
            self.ws.send(Message::binary(chunk.to_vec())).unwrap();
        }
    }

    fn recv(&mut self) -> Packet {
        loop {
            if let Some(p) = codec::decode(&mut self.buf, Version::V5, 1 << 20).unwrap() {
                return p;
            }
            match self.ws.read().expect("a frame") {
                Message::Binary(b) => self.buf.extend_from_slice(&b),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn connect_as(&mut self, id: &str) {
        let connect = encode(&Packet::Connect(Box::new(connect_packet(
            Version::V5,
            id,
            true,
        ))));
        // CONNECT split over three frames.
        self.send_frames(&connect, 3);
        match self.recv() {
            Packet::ConnAck(a) => assert_eq!(a.reason, 0),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }
}

fn tcp(addr: std::net::SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Subscribe on one client, publish from the other (two PUBLISH packets
/// in one frame), both received in order.
fn pub_sub<A: Read + Write, B: Read + Write>(sub: &mut WsClient<A>, publisher: &mut WsClient<B>) {
    sub.send_frames(
        &encode(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(
                "w/#".into(),
                SubOptions {
                    qos: QoS::AtMostOnce,
                    ..Default::default()
                },
            )],
            properties: Default::default(),
        })),
        1,
    );
    assert!(matches!(sub.recv(), Packet::SubAck(_)));
    let mut two = encode(&Packet::Publish(common::publish(
        "w/1",
        b"one",
        QoS::AtMostOnce,
        false,
        0,
    )));
    two.extend(encode(&Packet::Publish(common::publish(
        "w/2",
        b"two",
        QoS::AtMostOnce,
        false,
        0,
    ))));
    publisher.send_frames(&two, 1);
    for (topic, payload) in [("w/1", &b"one"[..]), ("w/2", b"two")] {
        match sub.recv() {
            Packet::Publish(p) => {
                assert_eq!((&*p.topic, &p.payload[..]), (topic, payload));
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
}

#[test]
fn mqtt_over_websocket_on_every_shard() {
    let b = TestBroker::start_with(2, |c| c.listeners = vec![ws_listener("ws", None)]);
    // Clients whose sessions live on either shard: the kernel spreads the
    // connections, so some move with their framing state.
    for round in 0..4 {
        let (mut sub, proto) = WsClient::handshake(tcp(b.addr), b.addr, "/mqtt");
        assert_eq!(proto.as_deref(), Some("mqtt"), "the subprotocol echoed");
        sub.connect_as(&b.id_on_shard(&format!("sub{round}"), round % 2));
        let (mut publisher, _) = WsClient::handshake(tcp(b.addr), b.addr, "/mqtt");
        publisher.connect_as(&b.id_on_shard(&format!("pub{round}"), (round / 2) % 2));
        pub_sub(&mut sub, &mut publisher);
    }
}

#[test]
fn a_text_frame_or_a_wrong_path_ends_the_connection() {
    let b = TestBroker::start_with(1, |c| c.listeners = vec![ws_listener("ws", None)]);
    let (mut c, _) = WsClient::handshake(tcp(b.addr), b.addr, "/mqtt");
    c.connect_as("texter");
    c.ws.send(Message::text("hello")).unwrap();
    match c.ws.read() {
        Ok(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1003),
        other => panic!("expected a close frame, got {other:?}"),
    }
    let req = format!("ws://{}/elsewhere", b.addr)
        .into_client_request()
        .unwrap();
    match tungstenite::client(req, tcp(b.addr)) {
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
            assert_eq!(r.status(), 404)
        }
        other => panic!("expected HTTP 404, got {:?}", other.map(|_| ())),
    }
    // Plain MQTT bytes on the WebSocket port: an HTTP error, then the end.
    let mut raw = tcp(b.addr);
    raw.write_all(&encode(&Packet::Connect(Box::new(connect_packet(
        Version::V5,
        "x",
        true,
    )))))
    .unwrap();
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer);
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

#[test]
fn mqtt_over_secure_websocket() {
    let dir = temp_dir("wss");
    let (_, config) = common::self_signed(&dir);
    let b = TestBroker::start_with(2, |c| c.listeners = vec![ws_listener("wss", Some(&dir))]);
    let tls = |addr| {
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
        rustls::StreamOwned::new(conn, tcp(addr))
    };
    let (mut sub, _) = WsClient::handshake(tls(b.addr), b.addr, "/mqtt");
    sub.connect_as(&b.id_on_shard("wss-sub", 0));
    let (mut publisher, _) = WsClient::handshake(tls(b.addr), b.addr, "/mqtt");
    publisher.connect_as(&b.id_on_shard("wss-pub", 1));
    pub_sub(&mut sub, &mut publisher);
    let _ = std::fs::remove_dir_all(&dir);
}

/// rumqttc (async-tungstenite underneath) over ws and wss: clients on
/// both shards subscribe, publish QoS 1 and receive each other's messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_over_websocket_and_secure_websocket() {
    use client::v5::{connect, QoS};
    use rumqttc::{TlsConfiguration, Transport};
    let dir = temp_dir("rumqttc-ws");
    let (ca, _) = common::self_signed(&dir);
    let b = TestBroker::start_with(2, |c| {
        let mut wss = ws_listener("wss", Some(&dir));
        wss.bind = "127.0.0.1:0".parse().unwrap();
        c.listeners = vec![ws_listener("ws", None), wss];
    });
    let addrs = b.broker.as_ref().unwrap().local_addrs().to_vec();
    let opts = |scheme: &str, id: &str| {
        let (addr, transport) = match scheme {
            "ws" => (addrs[0], Transport::Ws),
            _ => (
                addrs[1],
                Transport::wss_with_config(TlsConfiguration::Simple {
                    ca: ca.clone().into_bytes(),
                    alpn: None,
                    client_auth: None,
                }),
            ),
        };
        let url = format!("{scheme}://127.0.0.1:{}/mqtt", addr.port());
        let mut o = client::v5::MqttOptions::new(id, url, addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_start(true);
        o.set_transport(transport);
        o
    };
    for (round, (sub_scheme, pub_scheme)) in [("ws", "wss"), ("wss", "ws")].into_iter().enumerate()
    {
        let topic = format!("rq/{round}");
        let mut sub = connect(opts(
            sub_scheme,
            &b.id_on_shard(&format!("rq-sub{round}"), round),
        ))
        .await;
        sub.subscribe(&topic, QoS::AtLeastOnce).await;
        let mut publisher = connect(opts(
            pub_scheme,
            &b.id_on_shard(&format!("rq-pub{round}"), 1 - round),
        ))
        .await;
        publisher
            .publish_acked(&topic, false, b"over websocket")
            .await;
        let p = sub.next_publish().await;
        assert_eq!(
            (&p.topic[..], &p.payload[..]),
            (topic.as_bytes(), &b"over websocket"[..])
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
