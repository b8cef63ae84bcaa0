//! A connection's byte stream on its shard: plain TCP, or TLS over TCP
//! with the rustls state machine driven by the reads and writes of the
//! connection's tasks.
//!
//! Runtime code of one shard. The TLS state is plain data
//! (`rustls::ServerConnection`): the handshake and the first reads happen
//! on the accepting shard, and [`Stream::into_parts`] lets the connection
//! move to its home shard with the socket, where [`Stream::from_parts`]
//! goes on with the same state.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use rustls::ServerConnection;

/// A connection's stream.
pub(crate) enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream>),
}

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
        Ok(Stream::from_parts(tcp, Some(Box::new(conn))))
    }

    /// The TCP stream, and the TLS state if any.
    pub(crate) fn into_parts(self) -> (TcpStream, Option<Box<ServerConnection>>) {
        match self {
            Stream::Plain(tcp) => (tcp, None),
            Stream::Tls(t) => {
                let TlsStream { tcp, conn, .. } = *t;
                (tcp, Some(Box::new(conn)))
            }
        }
    }

    /// A stream from a TCP stream and the TLS state it carries, if any.
    pub(crate) fn from_parts(tcp: TcpStream, tls: Option<Box<ServerConnection>>) -> Stream {
        match tls {
            None => Stream::Plain(tcp),
            Some(conn) => Stream::Tls(Box::new(TlsStream {
                tcp,
                conn: *conn,
                eof: false,
            })),
        }
    }

    /// The client's certificate (DER), when TLS checked one.
    pub(crate) fn peer_certificate(&self) -> Option<&[u8]> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(t) => t.conn.peer_certificates()?.first().map(|c| c.as_ref()),
        }
    }

    /// The TCP stream underneath.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(t) => &t.tcp,
        }
    }

    /// End the sending side: TLS says close_notify first.
    pub(crate) async fn shutdown_write(&mut self) -> io::Result<()> {
        if let Stream::Tls(t) = self {
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

    fn poll_read_plain(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            // Handshake messages and alerts go out as they are made; a
            // full socket does not stop the reading.
            if let Poll::Ready(Err(e)) = self.poll_send_tls(cx) {
                return Poll::Ready(Err(e));
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
                let _ = self.poll_send_tls(cx);
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

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(t) => t.poll_read_plain(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Stream::Tls(t) => t.poll_write_plain(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(t) => match t.poll_send_tls(cx) {
                Poll::Ready(Ok(())) => Pin::new(&mut t.tcp).poll_flush(cx),
                other => other,
            },
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_close(cx),
            Stream::Tls(t) => {
                t.conn.send_close_notify();
                match t.poll_send_tls(cx) {
                    Poll::Ready(Ok(())) => Pin::new(&mut t.tcp).poll_close(cx),
                    other => other,
                }
            }
        }
    }
}
