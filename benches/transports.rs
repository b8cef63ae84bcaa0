//! What the transports cost the broker per connection and per packet,
//! without sockets: a TLS handshake's server side (rustls, *ring*, an
//! ECDSA P-256 certificate, TLS 1.3) and the WebSocket framing of one
//! 64-byte PUBLISH each way.
//!
//! Run briefly: `cargo bench --bench transports -- --warm-up-time 1 --measurement-time 2`.

use std::hint::black_box;
use std::io::Write;
use std::sync::Arc;

use criterion::{criterion_group, Criterion};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use shardmq::ws::Framer;

fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

fn tls(c: &mut Criterion) {
    let (server, client) = configs();
    // The client's flights, recorded once: each iteration replays them
    // into a new server connection, so only the server's work is timed.
    let mut s = ServerConnection::new(server.clone()).unwrap();
    let mut cl = ClientConnection::new(client, "localhost".try_into().unwrap()).unwrap();
    let mut flights: Vec<Vec<u8>> = Vec::new();
    while cl.is_handshaking() || s.is_handshaking() {
        let mut buf = Vec::new();
        while cl.wants_write() {
            cl.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().unwrap();
            flights.push(buf);
        }
        let mut back = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut back).unwrap();
        }
        if !back.is_empty() {
            cl.read_tls(&mut &back[..]).unwrap();
            cl.process_new_packets().unwrap();
        }
    }
    c.bench_function(
        "tls: server side of a TLS 1.3 handshake (ECDSA P-256)",
        |b| {
            b.iter(|| {
                let mut s = ServerConnection::new(server.clone()).unwrap();
                // The first flight (ClientHello) drives the server's whole
                // first reply (key exchange and signature).
                s.read_tls(&mut &flights[0][..]).unwrap();
                s.process_new_packets().unwrap();
                let mut out = Vec::new();
                while s.wants_write() {
                    s.write_tls(&mut out).unwrap();
                }
                black_box(out.len())
            })
        },
    );
    // Traffic: an 80-byte packet (a PUBLISH with a 64-byte payload)
    // through the connection established above, server to client.
    let packet = [0x30u8; 80];
    let mut sink = Vec::with_capacity(4096);
    c.bench_function("tls: encrypt one 80-byte packet (server to client)", |b| {
        b.iter(|| {
            s.writer().write_all(&packet).unwrap();
            sink.clear();
            while s.wants_write() {
                s.write_tls(&mut sink).unwrap();
            }
            black_box(sink.len())
        })
    });
}

fn ws(c: &mut Criterion) {
    let packet = [0x30u8; 80];
    // A masked client frame carrying the packet.
    let mut frame = vec![0x82u8, 0x80 | 80, 1, 2, 3, 4];
    frame.extend(
        packet
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ [1u8, 2, 3, 4][i % 4]),
    );
    let mut f = Framer::new();
    let mut out = [0u8; 256];
    c.bench_function("ws: unmask and take one 80-byte packet", |b| {
        b.iter(|| {
            f.feed(black_box(&frame));
            black_box(f.take_data(&mut out))
        })
    });
    c.bench_function("ws: frame one 80-byte packet", |b| {
        b.iter(|| {
            f.send(black_box(&packet));
            let n = f.outbound().len();
            f.outbound().clear();
            black_box(n)
        })
    });
}

criterion_group!(benches, tls, ws);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
