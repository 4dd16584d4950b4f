//! Bounds on the agent's two servers (gRPC on `api.listen`, HTTP on `api.http_listen`):
//! how many client connections each holds at once and how long an idle one is kept.
//!
//! A connection holds a permit of its server's semaphore from accept to close; at the
//! limit the server stops accepting until one closes (the rest wait in the kernel's
//! backlog). A connection that neither reads nor writes for the idle timeout is closed.
//! Members' channels are never idle that long: they send HTTP/2 keep-alive pings every few
//! seconds (`dial.rs`), which count as traffic; a dead peer is found by TCP keep-alive.
//! Per gRPC connection, concurrent requests and HTTP/2 streams are bounded too.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// Client connections the gRPC server holds at once.
pub const MAX_GRPC_CONNECTIONS: usize = 512;
/// Client connections the HTTP server holds at once (health checks, metrics, writes).
pub const MAX_HTTP_CONNECTIONS: usize = 256;
/// A connection with no traffic for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// TCP keep-alive on accepted gRPC connections: a vanished member's connection is found
/// and closed although its pings stop only with it. (An HTTP connection whose client
/// vanished is closed by the idle timeout.)
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(15);
/// Concurrent requests (and HTTP/2 streams) per gRPC connection.
pub const MAX_REQUESTS_PER_CONNECTION: usize = 64;

/// The gRPC server builder with the per-connection bounds.
pub fn grpc_server(builder: tonic::transport::Server) -> tonic::transport::Server {
    builder
        .concurrency_limit_per_connection(MAX_REQUESTS_PER_CONNECTION)
        .max_concurrent_streams(MAX_REQUESTS_PER_CONNECTION as u32)
}

/// The gRPC listener's accepted connections, bounded in number and idle time.
pub fn grpc_incoming(
    listener: TcpListener,
) -> impl Stream<Item = io::Result<Bounded<TcpStream>>> + Send + 'static {
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE));
    let permits = Arc::new(Semaphore::new(MAX_GRPC_CONNECTIONS));
    futures::stream::unfold(
        (Box::pin(incoming), permits),
        |(mut incoming, permits)| async move {
            let permit = permits.clone().acquire_owned().await.ok()?;
            let next = incoming.next().await?;
            let item = next.map(|io| Bounded::new(io, permit, IDLE_TIMEOUT));
            Some((item, (incoming, permits)))
        },
    )
}

/// The HTTP listener, bounded the same way (for `axum::serve`, plain HTTP).
pub fn http_listener(listener: TcpListener) -> BoundedListener {
    BoundedListener {
        inner: listener,
        permits: Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS)),
        idle: IDLE_TIMEOUT,
    }
}

/// The HTTPS server's bound: axum-server accepts the TCP connections itself, so here a
/// connection over the limit is held unread until a permit frees (at most the idle
/// timeout, then it is closed) before its TLS handshake; once served it closes when idle
/// like a plain one.
pub fn https_limit() -> HttpsLimit {
    HttpsLimit {
        permits: Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS)),
        idle: IDLE_TIMEOUT,
    }
}

/// The acceptor of [`https_limit`] (runs before the TLS acceptor).
#[derive(Clone)]
pub struct HttpsLimit {
    permits: Arc<Semaphore>,
    idle: Duration,
}

impl<S: Send + 'static> axum_server::accept::Accept<TcpStream, S> for HttpsLimit {
    type Stream = Bounded<TcpStream>;
    type Service = S;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Self::Stream, S)>> + Send>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let permits = self.permits.clone();
        let idle = self.idle;
        Box::pin(async move {
            let _ = stream.set_nodelay(true);
            let permit = tokio::time::timeout(idle, permits.acquire_owned())
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        "too many HTTPS connections held for too long",
                    )
                })?
                .map_err(|_| io::Error::other("the HTTPS connection limit was closed"))?;
            Ok((Bounded::new(stream, permit, idle), service))
        })
    }
}

/// A TCP listener whose connections hold a permit and close when idle.
pub struct BoundedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    idle: Duration,
}

impl axum::serve::Listener for BoundedListener {
    type Io = Bounded<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // The semaphore is never closed.
        let permit = loop {
            if let Ok(p) = self.permits.clone().acquire_owned().await {
                break p;
            }
        };
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        let _ = io.set_nodelay(true);
        (Bounded::new(io, permit, self.idle), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection that holds its server's permit until dropped and fails with `TimedOut`
/// once it has neither read nor written for its idle timeout.
pub struct Bounded<T> {
    io: T,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl<T> Bounded<T> {
    fn new(io: T, permit: OwnedSemaphorePermit, idle: Duration) -> Self {
        Bounded {
            io,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            _permit: permit,
        }
    }

    fn touch(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.idle);
    }

    /// `Pending` while within the idle timeout (the waker is registered with it).
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn idle_error() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection idle for too long")
}

impl<T: AsyncRead + Unpin> AsyncRead for Bounded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending if self.idle_expired(cx) => Poll::Ready(Err(idle_error())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Bounded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.touch();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending if self.idle_expired(cx) => Poll::Ready(Err(idle_error())),
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.touch();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending if self.idle_expired(cx) => Poll::Ready(Err(idle_error())),
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl Connected for Bounded<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn an_idle_connection_is_closed_and_its_permit_returned() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut l = BoundedListener {
            inner: listener,
            permits: Arc::new(Semaphore::new(1)),
            idle: Duration::from_millis(300),
        };
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = axum::serve::Listener::accept(&mut l).await;
        assert_eq!(l.permits.available_permits(), 0);
        // Traffic keeps it open past the idle timeout...
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            client.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            server.read_exact(&mut b).await.unwrap();
        }
        // ...silence closes it.
        let started = std::time::Instant::now();
        let mut b = [0u8; 1];
        let err = server.read(&mut b).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(250));
        drop(server);
        assert_eq!(l.permits.available_permits(), 1);
        drop(client);
    }

    #[tokio::test]
    async fn at_the_limit_accepting_waits_for_a_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut l = BoundedListener {
            inner: listener,
            permits: Arc::new(Semaphore::new(1)),
            idle: Duration::from_secs(30),
        };
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let (first, _) = axum::serve::Listener::accept(&mut l).await;
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let second = tokio::time::timeout(
            Duration::from_millis(200),
            axum::serve::Listener::accept(&mut l),
        )
        .await;
        assert!(
            second.is_err(),
            "a second connection was accepted over the limit"
        );
        drop(first);
        let second = tokio::time::timeout(
            Duration::from_secs(5),
            axum::serve::Listener::accept(&mut l),
        )
        .await;
        assert!(second.is_ok());
    }

    #[tokio::test]
    async fn https_over_the_limit_waits_for_a_close_at_most_the_idle_timeout() {
        use axum_server::accept::Accept;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limit = HttpsLimit {
            permits: Arc::new(Semaphore::new(1)),
            idle: Duration::from_millis(1500),
        };
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let (s1, _) = listener.accept().await.unwrap();
        let (first, ()) = limit.accept(s1, ()).await.unwrap();
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let (s2, _) = listener.accept().await.unwrap();
        let mut second = limit.accept(s2, ());
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut second)
                .await
                .is_err(),
            "a second HTTPS connection was served over the limit"
        );
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), second).await;
        assert!(matches!(second, Ok(Ok(_))));
        // At the limit for longer than the idle timeout: the waiting one is closed.
        let _c3 = TcpStream::connect(addr).await.unwrap();
        let (s3, _) = listener.accept().await.unwrap();
        let started = std::time::Instant::now();
        let third = tokio::time::timeout(Duration::from_secs(10), limit.accept(s3, ())).await;
        match third {
            Ok(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::TimedOut),
            _ => panic!("an over-limit HTTPS connection was not closed after the idle timeout"),
        }
        assert!(started.elapsed() >= Duration::from_millis(1400));
    }
}
