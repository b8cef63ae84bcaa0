//! MQTT over WebSocket (RFC 6455, server side), sans-IO: the HTTP upgrade
//! of a `ws` / `wss` listener and the framing of its connections.
//!
//! Plain data in, plain data out: the runtime feeds the bytes it reads and
//! writes the bytes this gives it (`shard::runtime::transport`). The state
//! ([`Framer`]) is plain data, so a connection moves to its home shard
//! with it, as it does with its TLS state.
//!
//! - The upgrade: `GET` on the listener's path with `Upgrade: websocket`,
//!   `Sec-WebSocket-Version: 13` and a key; the subprotocol `mqtt` (or the
//!   3.1 names `mqttv3.1`, `mqttv3.1.1`) is echoed when the client offers
//!   one. Anything else gets an HTTP error and the connection closes.
//! - Frames: binary frames (or their continuations) carry MQTT bytes, which
//!   may split packets anywhere or hold several; a text frame closes the
//!   connection (1003), as the MQTT spec requires ([MQTT-6.0.0-1]); pings
//!   are answered; a close is answered and ends the stream. Client frames
//!   must be masked (1002 otherwise); a frame longer than the limit closes
//!   the connection (1009) before its payload is read.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::{Buf, BufMut, BytesMut};
use sha1::{Digest, Sha1};

/// Largest HTTP upgrade request read, bytes.
pub const REQUEST_BYTES_MAX: usize = 8192;

/// The subprotocols accepted, in order of preference.
const SUBPROTOCOLS: [&str; 3] = ["mqtt", "mqttv3.1", "mqttv3.1.1"];

/// What an upgrade request comes to.
#[derive(Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// Not all of it has arrived.
    Incomplete,
    /// Accepted: send `response`; the request took `consumed` bytes (what
    /// follows is WebSocket frames).
    Accept {
        /// The 101 response.
        response: Vec<u8>,
        /// Bytes of the request.
        consumed: usize,
    },
    /// Refused: send `response` and close; `why` for the log.
    Refuse {
        /// The HTTP error response.
        response: Vec<u8>,
        /// Why.
        why: String,
    },
}

/// Read the upgrade request at the start of `buf` for a listener whose
/// WebSocket path is `path`.
pub fn upgrade(buf: &[u8], path: &str) -> Upgrade {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < REQUEST_BYTES_MAX => {
            return Upgrade::Incomplete
        }
        Ok(httparse::Status::Partial) => return refuse(431, "request headers too large"),
        Err(e) => return refuse(400, &format!("not an HTTP request: {e}")),
    };
    if req.method != Some("GET") {
        return refuse(405, "not GET");
    }
    let target = req.path.unwrap_or("");
    let target = target.split('?').next().unwrap_or("");
    if target != path {
        return refuse(404, &format!("path {target:?} is not {path:?}"));
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .collect::<Vec<_>>()
            .join(",")
    };
    let has_token = |name: &str, token: &str| {
        header(name)
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return refuse(400, "no Upgrade: websocket");
    }
    if header("sec-websocket-version").trim() != "13" {
        return refuse(400, "Sec-WebSocket-Version is not 13");
    }
    let key = header("sec-websocket-key");
    let key = key.trim();
    if B64.decode(key).map(|k| k.len()) != Ok(16) {
        return refuse(400, "no valid Sec-WebSocket-Key");
    }
    let offered = header("sec-websocket-protocol");
    let offered: Vec<&str> = offered
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let chosen = SUBPROTOCOLS.iter().find(|p| offered.contains(p));
    if !offered.is_empty() && chosen.is_none() {
        return refuse(400, "no MQTT subprotocol offered");
    }
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    if let Some(p) = chosen {
        response.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    response.push_str("\r\n");
    Upgrade::Accept {
        response: response.into_bytes(),
        consumed,
    }
}

fn refuse(code: u16, why: &str) -> Upgrade {
    let text = match code {
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Bad Request",
    };
    Upgrade::Refuse {
        response: format!(
            "HTTP/1.1 {code} {text}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
        .into_bytes(),
        why: why.to_string(),
    }
}

/// `Sec-WebSocket-Accept` for `key` (RFC 6455 §4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    B64.encode(sha.finalize())
}

/// Why a WebSocket connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client closed it.
    Closed,
    /// A protocol error: the close code sent.
    Error(u16),
}

/// One connection's framing state.
#[derive(Debug, Default)]
pub struct Framer {
    /// Bytes read and not yet parsed as frames.
    inbound: BytesMut,
    /// MQTT bytes from binary frames, not yet taken.
    data: BytesMut,
    /// Frames to send (pongs, close, and the broker's binary frames).
    outbound: BytesMut,
    /// Inside a fragmented text message (its continuations are refused
    /// too).
    in_text: bool,
    ended: Option<Ended>,
    /// Largest frame payload accepted, bytes.
    frame_max: usize,
}

impl Framer {
    /// A framer that accepts frames of at most `frame_max` payload bytes
    /// (the MQTT packet limit, plus room for the rest of a frame).
    pub fn new(frame_max: usize) -> Framer {
        Framer {
            frame_max,
            ..Framer::default()
        }
    }

    /// Bytes read from the connection (after the upgrade).
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.ended.is_none() {
            self.inbound.extend_from_slice(bytes);
            self.parse();
        }
    }

    /// Move the MQTT bytes received so far into `out`.
    pub fn take_data(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data.advance(n);
        n
    }

    /// True when MQTT bytes wait to be taken.
    pub fn has_data(&self) -> bool {
        !self.data.is_empty()
    }

    /// Why the connection ended, once it has (after the data is taken).
    pub fn ended(&self) -> Option<Ended> {
        self.ended
    }

    /// Send `data` (MQTT bytes) as one binary frame.
    pub fn send(&mut self, data: &[u8]) {
        if self.ended.is_none() {
            put_frame(&mut self.outbound, 0x2, data);
        }
    }

    /// Frames waiting to be written.
    pub fn outbound(&mut self) -> &mut BytesMut {
        &mut self.outbound
    }

    /// Close the connection from this side (code 1000).
    pub fn close(&mut self) {
        if self.ended.is_none() {
            self.end(Ended::Closed, 1000);
        }
    }

    fn end(&mut self, how: Ended, code: u16) {
        put_frame(&mut self.outbound, 0x8, &code.to_be_bytes());
        self.ended = Some(how);
        self.inbound.clear();
    }

    fn parse(&mut self) {
        while self.ended.is_none() {
            let b = &self.inbound[..];
            if b.len() < 2 {
                return;
            }
            let (fin, opcode) = (b[0] & 0x80 != 0, b[0] & 0x0F);
            if b[0] & 0x70 != 0 {
                return self.end(Ended::Error(1002), 1002); // no extensions
            }
            if b[1] & 0x80 == 0 {
                return self.end(Ended::Error(1002), 1002); // clients mask
            }
            let (len, header) = match b[1] & 0x7F {
                126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
                127 if b.len() >= 10 => {
                    let mut l = [0u8; 8];
                    l.copy_from_slice(&b[2..10]);
                    (u64::from_be_bytes(l), 10)
                }
                126 | 127 => return,
                n => (u64::from(n), 2),
            };
            let control = opcode & 0x8 != 0;
            if (control && (len > 125 || !fin)) || len > self.frame_max as u64 {
                let code = if control { 1002 } else { 1009 };
                return self.end(Ended::Error(code), code);
            }
            let total = header + 4 + len as usize;
            if b.len() < total {
                return;
            }
            let mask = [b[header], b[header + 1], b[header + 2], b[header + 3]];
            let mut frame = self.inbound.split_to(total);
            frame.advance(header + 4);
            for (i, byte) in frame.iter_mut().enumerate() {
                *byte ^= mask[i % 4];
            }
            match opcode {
                0x2 => self.data.extend_from_slice(&frame),
                0x0 if !self.in_text => self.data.extend_from_slice(&frame),
                // [MQTT-6.0.0-1] text frames close the connection.
                0x1 | 0x0 => return self.end(Ended::Error(1003), 1003),
                0x8 => return self.end(Ended::Closed, 1000),
                0x9 => put_frame(&mut self.outbound, 0xA, &frame),
                0xA => {}
                _ => return self.end(Ended::Error(1002), 1002),
            }
            if opcode == 0x1 {
                self.in_text = !fin;
            }
        }
    }
}

/// An unmasked (server) frame with `opcode` and `payload`, FIN set.
fn put_frame(out: &mut BytesMut, opcode: u8, payload: &[u8]) {
    out.put_u8(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.put_u8(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUEST: &str = "GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqttv3.1, mqtt\r\n\r\n";

    #[test]
    fn the_rfc_example_key_and_the_subprotocol() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        match upgrade(REQUEST.as_bytes(), "/mqtt") {
            Upgrade::Accept { response, consumed } => {
                let r = String::from_utf8(response).unwrap();
                assert!(r.starts_with("HTTP/1.1 101"), "{r}");
                assert!(r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
                assert!(r.contains("Sec-WebSocket-Protocol: mqtt\r\n"), "{r}");
                assert_eq!(consumed, REQUEST.len());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            upgrade(&REQUEST.as_bytes()[..40], "/mqtt"),
            Upgrade::Incomplete
        );
    }

    #[test]
    fn bad_upgrades_get_an_http_error() {
        let cases = [
            (REQUEST.replace("GET /mqtt", "GET /other"), "404"),
            (REQUEST.replace("GET", "POST"), "405"),
            (REQUEST.replace("Version: 13", "Version: 8"), "400"),
            (REQUEST.replace("mqttv3.1, mqtt", "chat"), "400"),
            (REQUEST.replace("Upgrade: websocket\r\n", ""), "400"),
            ("\x16\x03\x01 not http".to_string(), "400"),
            (
                format!("GET /mqtt HTTP/1.1\r\nX: {}", "a".repeat(REQUEST_BYTES_MAX)),
                "431",
            ),
        ];
        for (req, code) in cases {
            match upgrade(req.as_bytes(), "/mqtt") {
                Upgrade::Refuse { response, .. } => {
                    let r = String::from_utf8(response).unwrap();
                    assert!(r.starts_with(&format!("HTTP/1.1 {code}")), "{req}: {r}");
                }
                other => panic!("{req}: {other:?}"),
            }
        }
    }

    /// A masked client frame.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_frame(&mut out, opcode, payload);
        let mut f = out.to_vec();
        if !fin {
            f[0] &= 0x7F;
        }
        let header = f.len() - payload.len();
        f[1] |= 0x80;
        let mask = [1u8, 2, 3, 4];
        let mut masked = f[..header].to_vec();
        masked.extend_from_slice(&mask);
        masked.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        masked
    }

    fn take_all(f: &mut Framer) -> Vec<u8> {
        let mut buf = [0u8; 4096];
        let n = f.take_data(&mut buf);
        buf[..n].to_vec()
    }

    #[test]
    fn binary_frames_split_anywhere_and_continuations_join() {
        let mut f = Framer::new(1 << 20);
        let mut bytes = client_frame(false, 0x2, b"hel");
        bytes.extend(client_frame(true, 0x0, b"lo"));
        bytes.extend(client_frame(true, 0x2, &[7u8; 300]));
        for chunk in bytes.chunks(3) {
            f.feed(chunk);
        }
        let mut want = b"hello".to_vec();
        want.extend([7u8; 300]);
        let mut got = Vec::new();
        while f.has_data() {
            got.extend(take_all(&mut f));
        }
        assert_eq!(got, want);
        assert_eq!(f.ended(), None);
    }

    #[test]
    fn pings_are_answered_and_text_unmasked_and_huge_frames_close() {
        let mut f = Framer::new(1 << 20);
        f.feed(&client_frame(true, 0x9, b"p"));
        assert_eq!(&f.outbound()[..], &[0x8A, 1, b'p']);
        f.outbound().clear();
        f.feed(&client_frame(true, 0x1, b"text"));
        assert_eq!(f.ended(), Some(Ended::Error(1003)));
        assert_eq!(&f.outbound()[..], &[0x88, 2, 0x03, 0xEB]);

        let mut f = Framer::new(1 << 20);
        let mut unmasked = BytesMut::new();
        put_frame(&mut unmasked, 0x2, b"x");
        f.feed(&unmasked);
        assert_eq!(f.ended(), Some(Ended::Error(1002)));

        let mut f = Framer::new(100);
        f.feed(&[0x82, 0xFF, 0, 0, 0, 0, 0xFF, 0, 0, 0]);
        assert_eq!(
            f.ended(),
            Some(Ended::Error(1009)),
            "refused from the header alone"
        );

        let mut f = Framer::new(100);
        f.feed(&client_frame(true, 0x8, &1000u16.to_be_bytes()));
        assert_eq!(f.ended(), Some(Ended::Closed));
    }

    #[test]
    fn the_broker_sends_unmasked_binary_frames() {
        let mut f = Framer::new(100);
        f.send(&[1, 2, 3]);
        f.send(&[9u8; 200]);
        let out = f.outbound().to_vec();
        assert_eq!(&out[..5], &[0x82, 3, 1, 2, 3]);
        assert_eq!(&out[5..9], &[0x82, 126, 0, 200]);
        assert_eq!(out.len(), 9 + 200);
    }

    proptest::proptest! {
        /// Any bytes: no panic, and the state stays bounded.
        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(
            proptest::collection::vec(proptest::num::u8::ANY, 0..64), 0..16)) {
            let mut f = Framer::new(256);
            for c in &chunks {
                f.feed(c);
                let _ = take_all(&mut f);
            }
            proptest::prop_assert!(f.inbound.len() <= 256 + 14 + chunks.iter().map(Vec::len).max().unwrap_or(0));
        }
    }
}
