//! A minimal MQTT client connection on top of shardmq's codec: connect,
//! subscribe, non-blocking reads and writes, and a publish template that is
//! copied and patched per message instead of re-encoded. Over plain TCP,
//! or TLS with a rustls client driven by the same non-blocking reads and
//! writes (`--ssl`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use shardmq::codec::{
    decode, encode, ConnAck, Connect, Packet, PubResp, Publish, QoS, SubOptions, Subscribe,
    Version, MAX_PACKET_SIZE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bytes of the bench payload header: publisher id u32, sequence u64,
/// send timestamp u64 (ns since [`crate::stats::now_ns`]'s origin).
pub const HEADER_LEN: usize = 20;

const READ_CHUNK: usize = 64 * 1024;

/// What every connection of a run shares.
#[derive(Debug, Clone)]
pub struct ConnectOpts {
    pub addr: SocketAddr,
    pub version: Version,
    pub keepalive: u16,
    pub clean: bool,
    pub session_expiry: u32,
    pub username: Option<String>,
    pub password: Option<String>,
    pub timeout: Duration,
    /// TLS with this client configuration (the host name for SNI and the
    /// certificate check beside it).
    pub tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
}

/// One MQTT connection: the socket and its read and write buffers.
pub struct Conn {
    pub stream: TcpStream,
    /// The TLS state, when the connection is TLS: plaintext goes in and
    /// out of it, the socket carries its records.
    tls: Option<Box<rustls::ClientConnection>>,
    pub rbuf: BytesMut,
    pub wbuf: BytesMut,
    pub version: Version,
    /// Keepalive in force (the 5.0 Server Keep Alive wins).
    pub keepalive: Duration,
    /// The server's Receive Maximum (5.0), else 65535.
    pub server_receive_max: u16,
}

fn err(ctx: &str, e: impl std::fmt::Display) -> String {
    format!("{ctx}: {e}")
}

impl Conn {
    /// TCP connect, CONNECT, wait for a successful CONNACK; all within
    /// `opts.timeout`.
    pub async fn connect(opts: &ConnectOpts, client_id: &str) -> Result<Conn, String> {
        match tokio::time::timeout(opts.timeout, Self::connect_inner(opts, client_id)).await {
            Ok(r) => r,
            Err(_) => Err("connect: timeout".into()),
        }
    }

    async fn connect_inner(opts: &ConnectOpts, client_id: &str) -> Result<Conn, String> {
        let stream = TcpStream::connect(opts.addr)
            .await
            .map_err(|e| err("tcp connect", io_kind(&e)))?;
        let _ = stream.set_nodelay(true);
        let tls = match &opts.tls {
            None => None,
            Some((config, name)) => Some(Box::new(
                rustls::ClientConnection::new(config.clone(), name.clone())
                    .map_err(|e| err("tls", e))?,
            )),
        };
        let mut conn = Conn {
            stream,
            tls,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(16 * 1024),
            version: opts.version,
            keepalive: Duration::from_secs(opts.keepalive.into()),
            server_receive_max: u16::MAX,
        };
        conn.tls_handshake().await?;
        let connect = Connect {
            version: opts.version,
            clean_start: opts.clean,
            keep_alive: opts.keepalive,
            client_id: client_id.to_string(),
            will: None,
            username: opts.username.clone(),
            password: opts.password.clone().map(Bytes::from),
            properties: shardmq::codec::Properties {
                session_expiry_interval: (opts.version.is_v5() && opts.session_expiry > 0)
                    .then_some(opts.session_expiry),
                ..Default::default()
            },
        };
        encode(
            &Packet::Connect(Box::new(connect)),
            opts.version,
            &mut conn.wbuf,
        );
        conn.flush().await?;
        match conn.read_packet().await? {
            Packet::ConnAck(ConnAck {
                reason: 0,
                properties,
                ..
            }) => {
                if let Some(k) = properties.server_keep_alive {
                    conn.keepalive = Duration::from_secs(k.into());
                }
                if let Some(r) = properties.receive_maximum {
                    conn.server_receive_max = r;
                }
                Ok(conn)
            }
            Packet::ConnAck(c) => Err(format!("connack: refused, reason 0x{:02x}", c.reason)),
            other => Err(format!("connect: expected CONNACK, got {}", kind(&other))),
        }
    }

    /// SUBSCRIBE one filter and wait for its SUBACK.
    pub async fn subscribe(
        &mut self,
        filter: &str,
        qos: QoS,
        timeout: Duration,
    ) -> Result<(), String> {
        let sub = Subscribe {
            packet_id: 1,
            filters: vec![(
                filter.to_string(),
                SubOptions {
                    qos,
                    ..Default::default()
                },
            )],
            properties: Default::default(),
        };
        encode(&Packet::Subscribe(sub), self.version, &mut self.wbuf);
        let fut = async {
            self.flush().await?;
            match self.read_packet().await? {
                Packet::SubAck(s) if s.packet_id == 1 => match s.reasons.first() {
                    Some(&r) if r < 0x80 => Ok(()),
                    r => Err(format!("suback: refused {filter:?}, reason {r:?}")),
                },
                other => Err(format!("subscribe: expected SUBACK, got {}", kind(&other))),
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err("subscribe: timeout".into()),
        }
    }

    /// Write all of `wbuf` (blocking on the socket).
    pub async fn flush(&mut self) -> Result<(), String> {
        if self.tls.is_some() {
            while self.wants_write() {
                self.stream
                    .writable()
                    .await
                    .map_err(|e| err("write", io_kind(&e)))?;
                self.try_flush()?;
            }
            return Ok(());
        }
        self.stream
            .write_all(&self.wbuf)
            .await
            .map_err(|e| err("write", io_kind(&e)))?;
        self.wbuf.clear();
        Ok(())
    }

    /// Complete the TLS handshake, if the connection is TLS.
    async fn tls_handshake(&mut self) -> Result<(), String> {
        let Some(tls) = &mut self.tls else {
            return Ok(());
        };
        // The same non-blocking steps as afterwards, with no plaintext yet.
        let step = |e: String| err("tls handshake", e);
        while tls.is_handshaking() {
            if tls.wants_write() {
                self.stream
                    .writable()
                    .await
                    .map_err(|e| step(io_kind(&e)))?;
                tls_flush(&self.stream, tls, &mut BytesMut::new()).map_err(step)?;
            } else {
                self.stream
                    .readable()
                    .await
                    .map_err(|e| step(io_kind(&e)))?;
                tls_fill(&self.stream, tls, &mut self.rbuf).map_err(step)?;
            }
        }
        Ok(())
    }

    /// True when bytes wait for the socket: packets, or TLS records.
    #[inline]
    pub fn wants_write(&self) -> bool {
        !self.wbuf.is_empty() || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Read until one whole packet is decoded.
    pub async fn read_packet(&mut self) -> Result<Packet, String> {
        loop {
            if let Some(p) = self.decode()? {
                return Ok(p);
            }
            if self.tls.is_some() {
                // The handshake's records (and alerts) go out meanwhile.
                self.flush().await?;
                self.stream
                    .readable()
                    .await
                    .map_err(|e| err("read", io_kind(&e)))?;
                self.try_fill()?;
                continue;
            }
            self.rbuf.reserve(READ_CHUNK);
            let n = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| err("read", io_kind(&e)))?;
            if n == 0 {
                return Err("read: closed by the broker".into());
            }
        }
    }

    /// Decode one packet from `rbuf` if a whole one is there.
    #[inline]
    pub fn decode(&mut self) -> Result<Option<Packet>, String> {
        decode(&mut self.rbuf, self.version, MAX_PACKET_SIZE).map_err(|e| err("decode", e))
    }

    /// Non-blocking read into `rbuf`. `Ok(false)`: nothing there now.
    /// End of stream is an error.
    pub fn try_fill(&mut self) -> Result<bool, String> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        if let Some(tls) = &mut self.tls {
            return tls_fill(&self.stream, tls, &mut self.rbuf);
        }
        match self.stream.try_read_buf(&mut self.rbuf) {
            Ok(0) => Err("read: closed by the broker".into()),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(err("read", io_kind(&e))),
        }
    }

    /// Non-blocking write of as much of `wbuf` as the socket takes.
    pub fn try_flush(&mut self) -> Result<(), String> {
        if let Some(tls) = &mut self.tls {
            return tls_flush(&self.stream, tls, &mut self.wbuf);
        }
        while !self.wbuf.is_empty() {
            match self.stream.try_write(&self.wbuf) {
                Ok(n) => self.wbuf.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(err("write", io_kind(&e))),
            }
        }
        if self.wbuf.is_empty() {
            // Reuse the allocation from its start.
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Queue an acknowledgement (PUBACK, PUBREC, PUBREL, PUBCOMP) or other
    /// small packet.
    #[inline]
    pub fn queue(&mut self, p: &Packet) {
        encode(p, self.version, &mut self.wbuf);
    }

    /// Best effort DISCONNECT, never blocks.
    pub fn disconnect(&mut self) {
        self.queue(&Packet::Disconnect(Default::default()));
        let _ = self.try_flush();
    }
}

/// `std::io` over a tokio socket's non-blocking calls, for rustls.
struct SyncSocket<'a>(&'a TcpStream);

impl io::Read for SyncSocket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl io::Write for SyncSocket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Read what the socket has through `tls`, plaintext onto `rbuf`;
/// `Ok(false)`: nothing new. End of stream is an error.
fn tls_fill(
    stream: &TcpStream,
    tls: &mut rustls::ClientConnection,
    rbuf: &mut BytesMut,
) -> Result<bool, String> {
    let mut got = false;
    loop {
        match tls.read_tls(&mut SyncSocket(stream)) {
            Ok(0) => return Err("read: closed by the broker".into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(got),
            Err(e) => return Err(err("read", io_kind(&e))),
        }
        tls.process_new_packets().map_err(|e| err("tls", e))?;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match io::Read::read(&mut tls.reader(), &mut chunk) {
                Ok(0) => return Err("read: TLS closed by the broker".into()),
                Ok(n) => {
                    rbuf.extend_from_slice(&chunk[..n]);
                    got = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(err("tls read", e)),
            }
        }
    }
}

/// Encrypt `wbuf` once `tls` has sent what it had, and send as much as
/// the socket takes (what is left of `wbuf` waits: it is the backlog the
/// publishers pace themselves by).
fn tls_flush(
    stream: &TcpStream,
    tls: &mut rustls::ClientConnection,
    wbuf: &mut BytesMut,
) -> Result<(), String> {
    loop {
        while tls.wants_write() {
            match tls.write_tls(&mut SyncSocket(stream)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(err("write", io_kind(&e))),
            }
        }
        if wbuf.is_empty() {
            return Ok(());
        }
        let n = io::Write::write(&mut tls.writer(), wbuf).map_err(|e| err("tls write", e))?;
        wbuf.advance(n);
        if wbuf.is_empty() {
            wbuf.clear();
        }
    }
}

/// A TLS client configuration: checking the broker's certificate against
/// the CA certificates in `cafile`, or (None) not at all, as emqtt-bench
/// does without --cacertfile.
pub fn tls_config(cafile: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("tls", e))?;
    let config = match cafile {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls::pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| err(&path.display().to_string(), e))?
            {
                roots
                    .add(cert.map_err(|e| err(&path.display().to_string(), e))?)
                    .map_err(|e| err(&path.display().to_string(), e))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoCheck(provider)))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Accepts any server certificate (signatures are still checked, so the
/// handshake costs what it costs).
#[derive(Debug)]
struct NoCheck(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoCheck {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An acknowledgement packet with only a packet id.
#[inline]
pub fn ack(make: fn(PubResp) -> Packet, packet_id: u16) -> Packet {
    make(PubResp {
        packet_id,
        ..Default::default()
    })
}

/// Short name of a packet kind for messages.
pub fn kind(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect(_) => "DISCONNECT",
        Packet::Auth(_) => "AUTH",
    }
}

/// An io error by its kind (so the summary groups them), with the errno.
pub fn io_kind(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => format!("{:?} (os error {code})", e.kind()),
        None => format!("{:?}", e.kind()),
    }
}

/// A PUBLISH encoded once by the codec; each message copies it and patches
/// the packet id and the payload header in place, so sending allocates
/// nothing.
pub struct PubTemplate {
    bytes: Vec<u8>,
    payload_off: usize,
    pid_off: Option<usize>,
    header: bool,
}

impl PubTemplate {
    pub fn new(topic: &str, qos: QoS, size: usize, version: Version) -> PubTemplate {
        let publish = Publish {
            dup: false,
            qos,
            retain: false,
            topic: Arc::from(topic),
            packet_id: if qos == QoS::AtMostOnce { 0 } else { 0x0102 },
            payload: Bytes::from(vec![0u8; size]),
            properties: Default::default(),
        };
        let mut b = BytesMut::new();
        encode(&Packet::Publish(publish), version, &mut b);
        // Fixed header: 1 byte + the remaining length as a variable byte integer.
        let vbi = b[1..].iter().position(|&x| x & 0x80 == 0).unwrap() + 1;
        let pid_off = (qos != QoS::AtMostOnce).then_some(1 + vbi + 2 + topic.len());
        if let Some(o) = pid_off {
            assert_eq!(&b[o..o + 2], &[1, 2], "packet id where MQTT puts it");
        }
        PubTemplate {
            payload_off: b.len() - size,
            bytes: b.to_vec(),
            pid_off,
            header: size >= HEADER_LEN,
        }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Append one PUBLISH.
    #[inline]
    pub fn write(&self, out: &mut BytesMut, packet_id: u16, pub_id: u32, seq: u64, ts_ns: u64) {
        let start = out.len();
        out.extend_from_slice(&self.bytes);
        let msg = &mut out[start..];
        if let Some(o) = self.pid_off {
            msg[o..o + 2].copy_from_slice(&packet_id.to_be_bytes());
        }
        if self.header {
            let p = &mut msg[self.payload_off..self.payload_off + HEADER_LEN];
            p[0..4].copy_from_slice(&pub_id.to_be_bytes());
            p[4..12].copy_from_slice(&seq.to_be_bytes());
            p[12..20].copy_from_slice(&ts_ns.to_be_bytes());
        }
    }
}

/// The bench header of a payload: (publisher id, sequence, send ns).
#[inline]
pub fn parse_header(payload: &[u8]) -> Option<(u32, u64, u64)> {
    if payload.len() < HEADER_LEN {
        return None;
    }
    Some((
        u32::from_be_bytes(payload[0..4].try_into().unwrap()),
        u64::from_be_bytes(payload[4..12].try_into().unwrap()),
        u64::from_be_bytes(payload[12..20].try_into().unwrap()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_round_trips_through_the_codec() {
        for version in [Version::V3_1, Version::V3_1_1, Version::V5] {
            for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                for size in [0, 19, 20, 64, 200, 20_000] {
                    let t = PubTemplate::new("bench/42", qos, size, version);
                    let mut buf = BytesMut::new();
                    t.write(&mut buf, 777, 9, 123_456, 987);
                    t.write(&mut buf, 778, 9, 123_457, 988);
                    for (pid, seq) in [(777, 123_456), (778, 123_457)] {
                        let Some(Packet::Publish(p)) =
                            decode(&mut buf, version, MAX_PACKET_SIZE).unwrap()
                        else {
                            panic!("not a publish")
                        };
                        assert_eq!(&*p.topic, "bench/42");
                        assert_eq!(p.qos, qos);
                        assert_eq!(p.payload.len(), size);
                        if qos != QoS::AtMostOnce {
                            assert_eq!(p.packet_id, pid);
                        }
                        if size >= HEADER_LEN {
                            assert_eq!(
                                parse_header(&p.payload),
                                Some((9, seq, seq - 123_456 + 987))
                            );
                        }
                    }
                    assert!(buf.is_empty());
                }
            }
        }
    }
}
