//! The IP TTL (IPv6 hop limit) of IMDSv2 token responses, as EC2's `HttpPutResponseHopLimit`: with the
//! default of 1 the token reaches the pod's own network namespace but dies at the next router, so a
//! container nested behind another hop (docker-in-pod, a bridge inside the pod) cannot get a token.
//!
//! The handler asks for a limit through the [`HopLimit`] it finds in the request's extensions; the
//! connection's [`Io`] applies it to the socket before the first byte of the response is written.
//! The limit then stays for the rest of the connection: a TCP retransmission takes the socket's
//! current TTL, so setting it back after the token was written could let a retransmitted token travel
//! further. Later answers on that connection go to the client that got the token anyway.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A connection's requested hop limit, shared between its requests and its socket; 0 = system default.
#[derive(Debug, Clone, Default)]
pub struct HopLimit(Arc<AtomicU8>);

impl HopLimit {
    /// Limits every later write on this connection to `hops` (1-255).
    pub fn limit(&self, hops: u8) {
        self.0.store(hops, Ordering::Release);
    }

    fn wanted(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }
}

/// A TCP stream that applies its [`HopLimit`] before writing.
pub struct Io {
    stream: TcpStream,
    hops: HopLimit,
    applied: u8,
}

impl Io {
    /// Wraps an accepted stream.
    pub fn new(stream: TcpStream, hops: HopLimit) -> Self {
        Self {
            stream,
            hops,
            applied: 0,
        }
    }

    /// Sets the socket's TTL if a new limit was asked for. Fails closed: if the limit cannot be set,
    /// the write fails and the token is never sent.
    fn apply(&mut self) -> io::Result<()> {
        let wanted = self.hops.wanted();
        if wanted == 0 || wanted == self.applied {
            return Ok(());
        }
        if self.stream.local_addr()?.is_ipv6() {
            nix::sys::socket::setsockopt(&self.stream, nix::sys::socket::sockopt::Ipv6Ttl, &i32::from(wanted))
                .map_err(io::Error::from)?;
            // IPv4 peers of a dual-stack socket (`::ffff:a.b.c.d`) take the IPv4 TTL.
            let _ = self.stream.set_ttl(u32::from(wanted));
        } else {
            self.stream.set_ttl(u32::from(wanted))?;
        }
        self.applied = wanted;
        Ok(())
    }
}

impl AsyncRead for Io {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Io {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.apply()?;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.apply()?;
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn a_requested_limit_is_on_the_socket_before_the_next_write_and_stays() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let default_ttl = stream.ttl().unwrap();
        let hops = HopLimit::default();
        let mut io = Io::new(stream, hops.clone());
        io.write_all(b"a").await.unwrap();
        assert_eq!(io.stream.ttl().unwrap(), default_ttl, "untouched until asked");
        hops.limit(1);
        io.write_all(b"b").await.unwrap();
        assert_eq!(io.stream.ttl().unwrap(), 1);
        io.write_all(b"c").await.unwrap();
        assert_eq!(io.stream.ttl().unwrap(), 1, "sticky for the connection");
        let mut got = [0; 3];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abc");
    }
}
