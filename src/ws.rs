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
//!   must be masked (1002 otherwise). A data frame may be of any length:
//!   its payload is passed on as it arrives, and the MQTT packet limit
//!   applies to the packets it carries.

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
///
/// Bounded whatever the client sends: a data frame's payload is unmasked
/// and passed on as it arrives (a frame may be of any length: the MQTT
/// codec's packet limit applies to what it carries), only the start of a
/// frame that has not all arrived is kept (at most 14 header bytes and a
/// control frame's 125), and of the pings not yet answered only the last
/// is, as RFC 6455 5.5.3 allows.
#[derive(Debug, Default)]
pub struct Framer {
    /// The start of a frame whose header (or control payload) has not all
    /// arrived.
    partial: BytesMut,
    /// The data frame whose payload is arriving.
    payload: Option<Payload>,
    /// MQTT bytes from binary frames, not yet taken.
    data: BytesMut,
    /// Frames to send (the broker's binary frames, pongs, close).
    outbound: BytesMut,
    /// The last ping's payload, not answered yet.
    pong: Option<Vec<u8>>,
    /// Inside a fragmented binary message (its continuations are due).
    fragmented: bool,
    ended: Option<Ended>,
}

/// The rest of a data frame's payload.
#[derive(Debug)]
struct Payload {
    left: u64,
    mask: [u8; 4],
    /// Where in the mask the next byte is.
    at: usize,
}

/// What a frame's start needs to be read whole: its header with the mask
/// key, and a control frame's payload.
fn frame_start_len(b: &[u8]) -> usize {
    // Reserved bits or no mask: refused from the first two bytes.
    if b.len() < 2 || b[0] & 0x70 != 0 || b[1] & 0x80 == 0 {
        return 2;
    }
    match b[1] & 0x7F {
        126 => 8,
        127 => 14,
        n if b[0] & 0x08 != 0 => 6 + usize::from(n), // control
        _ => 6,
    }
}

/// Unmask `buf` with `mask`, starting at mask byte `at`.
fn unmask(buf: &mut [u8], mask: [u8; 4], at: usize) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte ^= mask[(at + i) & 3];
    }
}

impl Framer {
    /// A framer for a connection just upgraded.
    pub fn new() -> Framer {
        Framer::default()
    }

    /// Bytes read from the connection (after the upgrade).
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.ended.is_none() {
            if let Some(p) = &mut self.payload {
                let n = bytes
                    .len()
                    .min(usize::try_from(p.left).unwrap_or(usize::MAX));
                let start = self.data.len();
                self.data.extend_from_slice(&bytes[..n]);
                unmask(&mut self.data[start..], p.mask, p.at);
                p.at = (p.at + n) & 3;
                p.left -= n as u64;
                if p.left == 0 {
                    self.payload = None;
                }
                bytes = &bytes[n..];
                continue;
            }
            if self.partial.is_empty() && bytes.len() >= frame_start_len(bytes) {
                let n = frame_start_len(bytes);
                self.frame_start(&bytes[..n]);
                bytes = &bytes[n..];
                continue;
            }
            // Collect the frame's start, a few bytes at a time.
            loop {
                let need = frame_start_len(&self.partial);
                if self.partial.len() >= need {
                    break;
                }
                if bytes.is_empty() {
                    return;
                }
                let n = (need - self.partial.len()).min(bytes.len());
                self.partial.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
            }
            let start = std::mem::take(&mut self.partial);
            self.frame_start(&start);
        }
    }

    /// Move the MQTT bytes received so far into `out`.
    pub fn take_data(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data.advance(n);
        if self.data.is_empty() {
            self.data = BytesMut::new(); // an idle connection keeps no buffer
        }
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

    /// True when frames wait to be written (see [`Framer::outbound`]).
    pub fn wants_write(&self) -> bool {
        !self.outbound.is_empty() || self.pong.is_some()
    }

    /// Frames waiting to be written: the caller advances past what it
    /// wrote. The pong for the last ping joins them once they are all
    /// written, so pings from a client that does not read grow nothing.
    pub fn outbound(&mut self) -> &mut BytesMut {
        if self.outbound.is_empty() {
            if self.outbound.capacity() > 0 {
                self.outbound = BytesMut::new(); // keep no buffer when idle
            }
            if let Some(p) = self.pong.take() {
                put_frame(&mut self.outbound, 0xA, &p);
            }
        }
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
        self.pong = None;
        self.partial = BytesMut::new();
        self.payload = None;
    }

    /// A frame's header with its mask key (and a control frame's payload),
    /// `frame_start_len(b)` bytes.
    fn frame_start(&mut self, b: &[u8]) {
        let (fin, opcode) = (b[0] & 0x80 != 0, b[0] & 0x0F);
        if b[0] & 0x70 != 0 {
            return self.end(Ended::Error(1002), 1002); // no extensions
        }
        if b[1] & 0x80 == 0 {
            return self.end(Ended::Error(1002), 1002); // clients mask
        }
        let (len, header) = match b[1] & 0x7F {
            126 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 => {
                let mut l = [0u8; 8];
                l.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(l), 10)
            }
            n => (u64::from(n), 2),
        };
        let mask = [b[header], b[header + 1], b[header + 2], b[header + 3]];
        if opcode & 0x8 != 0 {
            if len > 125 || !fin {
                return self.end(Ended::Error(1002), 1002);
            }
            let mut payload = b[header + 4..].to_vec();
            unmask(&mut payload, mask, 0);
            match opcode {
                // The client's close: its code echoed (RFC 6455 5.5.1).
                0x8 => match close_code(&payload) {
                    Some(code) => self.end(Ended::Closed, code),
                    None => self.end(Ended::Error(1002), 1002),
                },
                0x9 => self.pong = Some(payload),
                0xA => {}
                _ => self.end(Ended::Error(1002), 1002),
            }
            return;
        }
        match opcode {
            // Binary, or its continuation (text frames never start a
            // message that continues: they close the connection).
            0x2 | 0x0 if (opcode == 0x0) == self.fragmented => {
                self.fragmented = !fin;
                if len > 0 {
                    self.payload = Some(Payload {
                        left: len,
                        mask,
                        at: 0,
                    });
                }
            }
            // [MQTT-6.0.0-1] text frames close the connection.
            0x1 => self.end(Ended::Error(1003), 1003),
            // A continuation with nothing to continue, a new message
            // before the last one ended, or an unknown opcode.
            _ => self.end(Ended::Error(1002), 1002),
        }
    }
}

/// The code to answer a close frame's `payload` with: the client's own
/// (1000 when it gave none); None for a payload RFC 6455 7.4 refuses (one
/// byte, or a code no endpoint may send).
fn close_code(payload: &[u8]) -> Option<u16> {
    match payload {
        [] => Some(1000),
        [_] => None,
        [a, b, ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            let defined = matches!(code, 1000..=1003 | 1007..=1011);
            (defined || (3000..=4999).contains(&code)).then_some(code)
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
        let mut f = Framer::new();
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
    fn pings_are_answered_and_text_and_unmasked_frames_close() {
        let mut f = Framer::new();
        f.feed(&client_frame(true, 0x9, b"p"));
        assert!(f.wants_write());
        assert_eq!(&f.outbound()[..], &[0x8A, 1, b'p']);
        f.outbound().clear();
        assert!(!f.wants_write());
        f.feed(&client_frame(true, 0x1, b"text"));
        assert_eq!(f.ended(), Some(Ended::Error(1003)));
        assert_eq!(&f.outbound()[..], &[0x88, 2, 0x03, 0xEB]);

        let mut f = Framer::new();
        let mut unmasked = BytesMut::new();
        put_frame(&mut unmasked, 0x2, b"x");
        f.feed(&unmasked);
        assert_eq!(f.ended(), Some(Ended::Error(1002)));

        let mut f = Framer::new();
        f.feed(&client_frame(true, 0x8, &1001u16.to_be_bytes()));
        assert_eq!(f.ended(), Some(Ended::Closed));
        assert_eq!(&f.outbound()[..], &[0x88, 2, 0x03, 0xE9], "its code echoed");
        for bad in [&[3u8][..], &1005u16.to_be_bytes(), &999u16.to_be_bytes()] {
            let mut f = Framer::new();
            f.feed(&client_frame(true, 0x8, bad));
            assert_eq!(f.ended(), Some(Ended::Error(1002)), "{bad:?}");
        }
    }

    #[test]
    fn fragments_must_continue_a_message_and_only_one() {
        let mut f = Framer::new();
        f.feed(&client_frame(true, 0x0, b"orphan"));
        assert_eq!(f.ended(), Some(Ended::Error(1002)));
        let mut f = Framer::new();
        f.feed(&client_frame(false, 0x2, b"a"));
        f.feed(&client_frame(true, 0x2, b"b"));
        assert_eq!(f.ended(), Some(Ended::Error(1002)));
        let mut f = Framer::new();
        f.feed(&client_frame(false, 0x2, b"a"));
        f.feed(&client_frame(true, 0x9, b"p")); // control frames may interleave
        f.feed(&client_frame(false, 0x0, b"b"));
        f.feed(&client_frame(true, 0x0, b"c"));
        f.feed(&client_frame(true, 0x2, b"d"));
        assert_eq!(f.ended(), None);
        assert_eq!(take_all(&mut f), b"abcd");
    }

    #[test]
    fn only_the_last_ping_waiting_is_answered_and_after_the_data() {
        let mut f = Framer::new();
        f.send(&[1, 2, 3]);
        for i in 0..10_000u32 {
            f.feed(&client_frame(true, 0x9, &i.to_be_bytes()));
        }
        // The data goes first; the pong joins once it is written.
        assert_eq!(&f.outbound()[..], &[0x82, 3, 1, 2, 3]);
        f.outbound().clear();
        assert_eq!(&f.outbound()[..], &[0x8A, 4, 0, 0, 0x27, 0x0F]);
        f.outbound().clear();
        assert!(!f.wants_write());
    }

    #[test]
    fn a_frame_of_any_length_streams_its_payload() {
        // One 1 MiB binary frame carrying several packets' worth of bytes,
        // fed in 8 KiB reads: what is held never exceeds one read.
        let payload: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let bytes = client_frame(true, 0x2, &payload);
        let mut f = Framer::new();
        let mut got = Vec::new();
        for chunk in bytes.chunks(8192) {
            f.feed(chunk);
            assert!(f.data.len() <= 8192 && f.partial.len() <= 14);
            while f.has_data() {
                got.extend(take_all(&mut f));
            }
        }
        assert_eq!(got, payload);
        assert_eq!(f.ended(), None);
        assert_eq!(f.data.capacity(), 0, "an idle framer keeps no buffer");
    }

    #[test]
    fn the_broker_sends_unmasked_binary_frames() {
        let mut f = Framer::new();
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
            let mut f = Framer::new();
            for c in &chunks {
                f.feed(c);
                proptest::prop_assert!(f.partial.len() <= 14 + 125);
                proptest::prop_assert!(f.data.len() <= c.len());
                proptest::prop_assert!(f.pong.as_ref().map_or(0, Vec::len) <= 125);
                while f.has_data() {
                    let _ = take_all(&mut f);
                }
            }
        }
    }
}
