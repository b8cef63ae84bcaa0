//! A connection's byte stream on its shard: plain TCP, or TLS over TCP
//! with the rustls state machine driven by the reads and writes of the
//! connection's tasks; either with WebSocket framing on top
//! ([`crate::ws::Framer`]).
//!
//! Runtime code of one shard. The TLS state is plain data
//! (`rustls::ServerConnection`): the handshake and the first reads happen
//! on the accepting shard, and [`Stream::into_parts`] lets the connection
//! move to its home shard with the socket, where [`Stream::from_parts`]
//! goes on with the same state.
//!
//! Who writes: until CONNECT one task reads and writes. Once a connection
//! has a reader and a writer task ([`Stream::split`]), only the writer
//! writes to the socket (glommio keeps one write waker per socket, which a
//! second writing task would take from the first). What a read makes for
//! the peer (TLS handshake messages, alerts, WebSocket pongs and close
//! answers) waits in the TLS or WebSocket state, bounded there, and the
//! read wakes the writer, which sends it at its next flush.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use std::rc::Rc;

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use rustls::ServerConnection;

use super::super::ConnHandle;
use crate::ws::Framer;

/// A connection's stream: its bytes, and WebSocket framing over them.
pub(crate) struct Stream {
    io: Io,
    ws: Option<Box<Framer>>,
    /// Set by [`Stream::split`]: reads never write, and wake this writer.
    writer: Option<Rc<ConnHandle>>,
}

/// A connection's bytes.
enum Io {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream>),
}

/// Frames the WebSocket layer buffers for the socket before a write waits.
const WS_OUT_MAX: usize = 64 * 1024;

/// TLS over a TCP stream.
pub(crate) struct TlsStream {
    tcp: TcpStream,
    conn: ServerConnection,
    /// The peer closed TCP (its TLS data is all in `conn`).
    eof: bool,
}

impl Stream {
    /// A new TLS connection with `config` on `tcp`.
    pub(crate) fn tls(
        tcp: TcpStream,
        config: std::sync::Arc<rustls::ServerConfig>,
    ) -> io::Result<Stream> {
        let conn = ServerConnection::new(config).map_err(io::Error::other)?;
        Ok(Stream::from_parts(tcp, Some(Box::new(conn)), None))
    }

    /// Plain TCP.
    pub(crate) fn plain(tcp: TcpStream) -> Stream {
        Stream::from_parts(tcp, None, None)
    }

    /// The TCP stream, the TLS state and the WebSocket state, if any.
    pub(crate) fn into_parts(self) -> Parts {
        let ws = self.ws;
        match self.io {
            Io::Plain(tcp) => (tcp, None, ws),
            Io::Tls(t) => {
                let TlsStream { tcp, conn, .. } = *t;
                (tcp, Some(Box::new(conn)), ws)
            }
        }
    }

    /// A stream from a TCP stream and the TLS and WebSocket states it
    /// carries, if any.
    pub(crate) fn from_parts(
        tcp: TcpStream,
        tls: Option<Box<ServerConnection>>,
        ws: Option<Box<Framer>>,
    ) -> Stream {
        let io = match tls {
            None => Io::Plain(tcp),
            Some(conn) => Io::Tls(Box::new(TlsStream {
                tcp,
                conn: *conn,
                eof: false,
            })),
        };
        Stream {
            io,
            ws,
            writer: None,
        }
    }

    /// True when the client closed the WebSocket (its close frame came, and
    /// was answered): TCP, and TLS, are still to be closed in order.
    pub(crate) fn closed_by_peer(&self) -> bool {
        self.ws
            .as_ref()
            .is_some_and(|ws| ws.ended() == Some(crate::ws::Ended::Closed))
    }

    /// From now on `conn`'s writer task alone writes; reads wake it when
    /// they leave something for the peer.
    pub(crate) fn split(&mut self, conn: Rc<ConnHandle>) {
        self.writer = Some(conn);
    }

    /// True when TLS or WebSocket bytes wait for a flush.
    pub(crate) fn wants_flush(&self) -> bool {
        let tls = matches!(&self.io, Io::Tls(t) if t.conn.wants_write());
        tls || self.ws.as_ref().is_some_and(|ws| ws.wants_write())
    }

    /// From now on the bytes are WebSocket frames, handled by `framer`.
    pub(crate) fn start_websocket(&mut self, framer: Framer) {
        self.ws = Some(Box::new(framer));
    }

    /// The client's certificate (DER), when TLS checked one.
    pub(crate) fn peer_certificate(&self) -> Option<&[u8]> {
        match &self.io {
            Io::Plain(_) => None,
            Io::Tls(t) => t.conn.peer_certificates()?.first().map(|c| c.as_ref()),
        }
    }

    /// The TCP stream underneath.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match &self.io {
            Io::Plain(tcp) => tcp,
            Io::Tls(t) => &t.tcp,
        }
    }

    /// Read bytes as they come, under any WebSocket framing (the upgrade
    /// request).
    pub(crate) async fn read_raw(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.io.poll_read(cx, buf, true)).await
    }

    /// Write bytes as they are, under any WebSocket framing (the upgrade
    /// response).
    pub(crate) async fn write_raw(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = std::future::poll_fn(|cx| self.io.poll_write(cx, buf)).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n..];
        }
        std::future::poll_fn(|cx| self.io.poll_flush(cx)).await
    }

    /// End the sending side: WebSocket sends its close frame, then TLS its
    /// close_notify (after the frames, which it encrypts).
    pub(crate) async fn shutdown_write(&mut self) -> io::Result<()> {
        if let Some(ws) = &mut self.ws {
            ws.close();
            futures_lite::AsyncWriteExt::flush(self).await?;
        }
        if let Io::Tls(t) = &mut self.io {
            t.conn.send_close_notify();
            futures_lite::AsyncWriteExt::flush(self).await?;
        }
        let tcp = self.tcp();
        tcp.shutdown(std::net::Shutdown::Write)
            .await
            .map_err(Into::into)
    }

    /// Close both ways at once.
    pub(crate) async fn shutdown(&mut self) -> io::Result<()> {
        let tcp = self.tcp();
        tcp.shutdown(std::net::Shutdown::Both)
            .await
            .map_err(Into::into)
    }
}

/// `std::io` over the async TCP stream for rustls: Pending is WouldBlock.
struct SyncIo<'a, 'b> {
    tcp: &'a mut TcpStream,
    cx: &'a mut Context<'b>,
}

impl Read for SyncIo<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.tcp).poll_read(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for SyncIo<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.tcp).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match Pin::new(&mut *self.tcp).poll_flush(self.cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl TlsStream {
    /// Write what rustls has for the peer; Ready(Ok) once it has none.
    fn poll_send_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.conn.wants_write() {
            let mut io = SyncIo {
                tcp: &mut self.tcp,
                cx,
            };
            match self.conn.write_tls(&mut io) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Read plaintext; with `writes`, send what the reads make for the peer
    /// (handshake messages, alerts) as it is made.
    fn poll_read_plain(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
        writes: bool,
    ) -> Poll<io::Result<usize>> {
        loop {
            // A full socket does not stop the reading.
            if writes {
                if let Poll::Ready(Err(e)) = self.poll_send_tls(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            match self.conn.reader().read(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed TCP without close_notify: an end too.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Poll::Ready(Ok(0)),
                Err(e) => return Poll::Ready(Err(e)),
            }
            if self.eof {
                return Poll::Ready(Ok(0));
            }
            let mut io = SyncIo {
                tcp: &mut self.tcp,
                cx,
            };
            match self.conn.read_tls(&mut io) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
            if let Err(e) = self.conn.process_new_packets() {
                // Tell the peer why (the alert rustls queued), then end.
                if writes {
                    let _ = self.poll_send_tls(cx);
                }
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
    }

    fn poll_write_plain(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            let n = self.conn.writer().write(buf)?;
            let sent = self.poll_send_tls(cx);
            match (n, sent) {
                (_, Poll::Ready(Err(e))) => return Poll::Ready(Err(e)),
                // Taken by rustls; the rest goes out at the next write or
                // flush.
                (1.., _) => return Poll::Ready(Ok(n)),
                // Its buffer was full and is sent now: room again.
                (0, Poll::Ready(Ok(()))) => {}
                (0, Poll::Pending) => return Poll::Pending,
            }
        }
    }
}

/// What a connection's stream is made of when it moves to another shard.
pub(crate) type Parts = (
    TcpStream,
    Option<Box<ServerConnection>>,
    Option<Box<Framer>>,
);

impl Io {
    /// Read; with `writes`, TLS sends what the reads make as it is made.
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
        writes: bool,
    ) -> Poll<io::Result<usize>> {
        match self {
            Io::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Io::Tls(t) => t.poll_read_plain(cx, buf, writes),
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self {
            Io::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Io::Tls(t) => t.poll_write_plain(cx, buf),
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Io::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Io::Tls(t) => match t.poll_send_tls(cx) {
                Poll::Ready(Ok(())) => Pin::new(&mut t.tcp).poll_flush(cx),
                other => other,
            },
        }
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Io::Plain(tcp) => Pin::new(tcp).poll_close(cx),
            Io::Tls(t) => {
                t.conn.send_close_notify();
                match t.poll_send_tls(cx) {
                    Poll::Ready(Ok(())) => Pin::new(&mut t.tcp).poll_close(cx),
                    other => other,
                }
            }
        }
    }
}

/// Read MQTT bytes from WebSocket frames; with `writes`, pongs and a
/// close answer go out as they are made.
fn poll_read_frames(
    io: &mut Io,
    ws: &mut Framer,
    cx: &mut Context<'_>,
    buf: &mut [u8],
    writes: bool,
) -> Poll<io::Result<usize>> {
    let mut raw = [0u8; 8192];
    loop {
        if writes {
            if let Poll::Ready(Err(e)) = poll_send_frames(io, ws, cx) {
                return Poll::Ready(Err(e));
            }
        }
        if ws.has_data() {
            return Poll::Ready(Ok(ws.take_data(buf)));
        }
        if ws.ended().is_some() {
            return Poll::Ready(Ok(0));
        }
        match io.poll_read(cx, &mut raw, writes) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Ok(0)),
            Poll::Ready(Ok(n)) => ws.feed(&raw[..n]),
            other => return other,
        }
    }
}

/// Write the WebSocket frames waiting in `ws` to `io`; Ready(Ok) once
/// none wait.
fn poll_send_frames(io: &mut Io, ws: &mut Framer, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    loop {
        // Asked each turn: the last pong joins once the rest is written.
        let out = ws.outbound();
        if out.is_empty() {
            return Poll::Ready(Ok(()));
        }
        match io.poll_write(cx, out) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => bytes::Buf::advance(out, n),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let writes = this.writer.is_none();
        let poll = match &mut this.ws {
            None => this.io.poll_read(cx, buf, writes),
            Some(ws) => poll_read_frames(&mut this.io, ws, cx, buf, writes),
        };
        if let Some(conn) = this.writer.as_ref().filter(|_| this.wants_flush()) {
            conn.wake.notify();
        }
        poll
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let Stream { io, ws, .. } = self.get_mut();
        let Some(ws) = ws else {
            return io.poll_write(cx, buf);
        };
        if ws.outbound().len() >= WS_OUT_MAX {
            match poll_send_frames(io, ws, cx) {
                Poll::Ready(Ok(())) => {}
                other => return other.map(|r| r.map(|()| 0)),
            }
        }
        ws.send(buf);
        // Sent as far as the socket takes it now; the rest at the next
        // write or flush.
        if let Poll::Ready(Err(e)) = poll_send_frames(io, ws, cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Stream { io, ws, .. } = self.get_mut();
        if let Some(ws) = ws {
            match poll_send_frames(io, ws, cx) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
        }
        io.poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Stream { io, ws, .. } = self.get_mut();
        if let Some(ws) = ws {
            ws.close();
            match poll_send_frames(io, ws, cx) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
        }
        io.poll_close(cx)
    }
}
