//! TLS listeners, through a real client (rumqttc over rustls) with
//! certificates made at test time (rcgen): publish and subscribe across
//! shards (the TLS state moves with the connection to its home shard),
//! mutual TLS with a required client certificate, and hostile bytes on the
//! TLS port.

#[path = "common/client.rs"]
mod client;
mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use client::v5::{connect, options, QoS};
use common::child::temp_dir;
use common::TestBroker;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rumqttc::v5::MqttOptions;
use rumqttc::{TlsConfiguration, Transport};
use shardmq::config::ListenerConfig;

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in
/// `dir` as PEM files.
struct Pki {
    ca: String,
    client_cert: String,
    client_key: String,
}

fn make_pki(dir: &Path) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "shardmq test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca, &ca_key)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params
        .distinguished_name
        .push(DnType::CommonName, "device-7");
    let client = client_params.signed_by(&client_key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    Pki {
        ca: ca.pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

fn tls_listener(dir: &Path, client_ca: bool) -> ListenerConfig {
    let mut l = ListenerConfig::tcp("127.0.0.1:0".parse().unwrap());
    l.transport = "tls".into();
    l.tls_cert_file = dir.join("server.pem");
    l.tls_key_file = dir.join("server.key");
    if client_ca {
        l.tls_client_ca_file = dir.join("ca.pem");
        l.tls_client_cert_required = true;
    }
    l
}

/// rumqttc options over TLS to `addr`, trusting `pki`'s CA, with the
/// client certificate when `with_cert`.
fn tls_options(b: &TestBroker, id: &str, pki: &Pki, with_cert: bool) -> MqttOptions {
    let mut o = options(b.addr, id);
    let client_auth = with_cert.then(|| {
        (
            pki.client_cert.clone().into_bytes(),
            pki.client_key.clone().into_bytes(),
        )
    });
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca: pki.ca.clone().into_bytes(),
        alpn: None,
        client_auth,
    }));
    o
}

/// A client with `o` fails its TLS handshake: no CONNACK, an error.
async fn handshake_fails(o: MqttOptions) {
    let (client, mut events) = rumqttc::v5::AsyncClient::new(o, 10);
    let outcome = tokio::time::timeout(Duration::from_secs(10), events.poll()).await;
    assert!(matches!(outcome, Ok(Err(_))), "{outcome:?}");
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_every_shard_publish_and_subscribe_over_tls() {
    let dir = temp_dir("tls-pubsub");
    let pki = make_pki(&dir);
    let b = TestBroker::start_with(2, |c| c.listeners = vec![tls_listener(&dir, false)]);
    // Two subscribers and five publishers per shard: the kernel spreads
    // the 14 connections over both shards, so all but about one in 16,000
    // runs move some of them, TLS state and all, to their home shard.
    let mut subs = Vec::new();
    for shard in 0..2 {
        for k in 0..2 {
            let id = b.id_on_shard(&format!("sub{k}"), shard);
            let mut s = connect(tls_options(&b, &id, &pki, false)).await;
            s.subscribe("t/#", QoS::AtLeastOnce).await;
            subs.push(s);
        }
    }
    let mut pubs = Vec::new();
    for shard in 0..2 {
        for k in 0..5 {
            let id = b.id_on_shard(&format!("pub{k}"), shard);
            let p = connect(tls_options(&b, &id, &pki, false)).await;
            for i in 0..10 {
                p.publish(
                    &format!("t/{shard}/{k}/{i}"),
                    QoS::AtLeastOnce,
                    false,
                    &[7u8; 300],
                )
                .await;
            }
            pubs.push(p);
        }
    }
    for s in &mut subs {
        let mut got = Vec::new();
        for _ in 0..100 {
            got.push(String::from_utf8(s.next_publish().await.topic.to_vec()).unwrap());
        }
        for shard in 0..2 {
            for k in 0..5 {
                let from = format!("t/{shard}/{k}/");
                let mine: Vec<_> = got
                    .iter()
                    .filter(|t| t.starts_with(&from))
                    .cloned()
                    .collect();
                let want: Vec<_> = (0..10).map(|i| format!("{from}{i}")).collect();
                assert_eq!(mine, want, "in order, all of them");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_client_certificate_lets_its_holders_in_and_no_one_else() {
    let dir = temp_dir("tls-mutual");
    let pki = make_pki(&dir);
    let b = TestBroker::start_with(2, |c| c.listeners = vec![tls_listener(&dir, true)]);
    let mut c = connect(tls_options(&b, "with-cert", &pki, true)).await;
    c.subscribe("m/#", QoS::AtMostOnce).await;
    c.publish("m/1", QoS::AtMostOnce, false, b"x").await;
    assert_eq!(&c.next_publish().await.payload[..], b"x");
    // Without a certificate the handshake fails: no CONNACK.
    handshake_fails(tls_options(&b, "no-cert", &pki, false)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_mqtt_and_garbage_on_the_tls_port_are_closed_and_nobody_else_notices() {
    let dir = temp_dir("tls-hostile");
    let pki = make_pki(&dir);
    let b = TestBroker::start_with(1, |c| c.listeners = vec![tls_listener(&dir, false)]);
    let mut good = connect(tls_options(&b, "good", &pki, false)).await;
    good.subscribe("g", QoS::AtMostOnce).await;
    let addr = b.addr;
    tokio::task::spawn_blocking(move || {
        // A plain CONNECT, then random bytes: each is closed, no panic.
        let mut connect = bytes::BytesMut::new();
        let packet = common::connect_packet(shardmq::codec::Version::V5, "plain", true);
        shardmq::codec::encode(
            &shardmq::codec::Packet::Connect(Box::new(packet)),
            shardmq::codec::Version::V5,
            &mut connect,
        );
        let junk: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for bytes in [&connect[..], &junk[..]] {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = s.write_all(bytes);
            let mut buf = [0u8; 256];
            let mut total = 0;
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
                assert!(total < 4096, "an alert at most, then the end");
            }
        }
    })
    .await
    .unwrap();
    good.publish("g", QoS::AtMostOnce, false, b"still here")
        .await;
    assert_eq!(&good.next_publish().await.payload[..], b"still here");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_certificate_or_key_stops_the_start_naming_the_file() {
    let dir = temp_dir("tls-bad");
    let mut config = shardmq::Config::default();
    config.storage.durability = "memory".into();
    config.listeners = vec![tls_listener(&dir, false)];
    std::fs::write(dir.join("server.pem"), "not a certificate\n").unwrap();
    let e = common::start_refused(config.clone());
    assert!(
        e.contains("tls_cert_file") && e.contains("no certificate"),
        "{e}"
    );
    make_pki(&dir);
    std::fs::write(
        dir.join("server.key"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let e = common::start_refused(config);
    assert!(e.contains("tls_key_file"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificates_common_name_is_the_user_the_acl_knows() {
    let dir = temp_dir("tls-identity");
    let pki = make_pki(&dir);
    std::fs::write(dir.join("acl"), "user device-7\ntopic readwrite d7/#\n").unwrap();
    let mut l = tls_listener(&dir, true);
    l.username_from_cert = "cn".into();
    let acl = dir.join("acl");
    let b = TestBroker::start_with(2, |c| {
        c.listeners = vec![l];
        c.auth.acl_file = acl;
    });
    let mut c = connect(tls_options(&b, "cert-user", &pki, true)).await;
    c.subscribe("d7/#", QoS::AtMostOnce).await;
    c.publish("d7/x", QoS::AtMostOnce, false, b"mine").await;
    assert_eq!(&c.next_publish().await.payload[..], b"mine");
    // Outside its ACL: SUBACK 0x87 (rumqttc then ends the connection).
    c.client
        .subscribe("other/#", QoS::AtMostOnce)
        .await
        .unwrap();
    let closed = format!("{:?}", c.closed().await);
    assert!(closed.contains("NotAuthorized"), "{closed}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_certificates_are_taken_on_reload_without_dropping_a_connection() {
    let dir = temp_dir("tls-reload");
    let old = make_pki(&dir);
    let b = TestBroker::start_with(1, |c| c.listeners = vec![tls_listener(&dir, false)]);
    let mut before = connect(tls_options(&b, "before", &old, false)).await;
    before.subscribe("r", QoS::AtMostOnce).await;
    let new = make_pki(&dir);
    let line = b.broker.as_ref().unwrap().reload_tls().unwrap();
    assert!(line.starts_with("1 TLS listener"), "{line}");
    // New connections get the new certificate: a client trusting only
    // the old CA fails, one trusting the new one connects.
    handshake_fails(tls_options(&b, "old-ca", &old, false)).await;
    let after = connect(tls_options(&b, "after", &new, false)).await;
    after.publish("r", QoS::AtMostOnce, false, b"both").await;
    // The connection from before the reload is still there.
    assert_eq!(&before.next_publish().await.payload[..], b"both");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `server.tls_handshakes_max` TLS connections may wait for their
/// handshake and CONNECT on a shard; one more is closed at accept, and
/// once one of them goes, a client gets in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_waiting_for_connect_are_bounded_per_shard() {
    let dir = temp_dir("tls-bound");
    let pki = make_pki(&dir);
    let b = TestBroker::start_with(1, |c| {
        c.listeners = vec![tls_listener(&dir, false)];
        c.server.tls_handshakes_max = 2;
    });
    let addr = b.addr;
    let first = tokio::task::spawn_blocking(move || {
        // Two silent connections take the two places.
        let silent: Vec<_> = (0..2)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let mut third = std::net::TcpStream::connect(addr).unwrap();
        third
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        match third.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("the third is closed at once: {other:?}"),
        }
        silent
    })
    .await
    .unwrap();
    // Still full: a real client fails too.
    handshake_fails(tls_options(&b, "full", &pki, false)).await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = connect(tls_options(&b, "room-again", &pki, false)).await;
    c.subscribe("r", QoS::AtMostOnce).await;
    let _ = std::fs::remove_dir_all(&dir);
}
