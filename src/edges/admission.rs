//! How much work the handler takes at once. A burst — Event Grid redelivering a day of heartbeats
//! after an outage, 2,000 deliveries at a time — must be served at a steady pace with bounded
//! memory, not all at once: unbounded, 2,000 concurrent deliveries opened 2,800 storage
//! connections and left the handler at 177 MiB.
//!
//! Two bounds. Invocations carried out at once match what the Functions host forwards per
//! instance (`extensions.http.maxConcurrentRequests` in host.json, 100); the rest wait their turn.
//! Connections held at once are bounded too: a connection beyond the bound waits in the kernel's
//! accept queue, where it costs the handler nothing, rather than in the handler with its buffers.

use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, SemaphorePermit};

/// Invocations carried out at once (host.json's `extensions.http.maxConcurrentRequests`).
pub const MAX_CONCURRENT_INVOCATIONS: usize = 100;

/// Connections held at once: the host's concurrent requests, and as many again idle in its pool.
pub const MAX_CONNECTIONS: usize = 2 * MAX_CONCURRENT_INVOCATIONS;

/// The kernel's queue of connections not yet accepted (capped by `net.core.somaxconn`).
const ACCEPT_BACKLOG: u32 = 4096;

static INVOCATIONS: Semaphore = Semaphore::const_new(MAX_CONCURRENT_INVOCATIONS);
static CONNECTIONS: Semaphore = Semaphore::const_new(MAX_CONNECTIONS);

/// Whether few connection slots are left: an answer then closes its connection (`Connection:
/// close`), so that connections a client keeps idle cannot hold every slot while others wait in
/// the kernel's queue.
pub fn crowded() -> bool {
    CONNECTIONS.available_permits() < MAX_CONNECTIONS / 4
}

/// Waits for a turn to carry out an invocation; the turn ends when the permit is dropped.
pub async fn invocation() -> Option<SemaphorePermit<'static>> {
    // The semaphore is never closed, so a permit always comes.
    INVOCATIONS.acquire().await.ok()
}

/// A listener that holds at most [`MAX_CONNECTIONS`] connections at once.
#[derive(Debug)]
pub struct Connections {
    listener: TcpListener,
    slots: &'static Semaphore,
}

/// Listens on 127.0.0.1:`port` (the Functions host is the only caller).
pub async fn bind(port: u16) -> std::io::Result<Connections> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(std::net::SocketAddr::from(([127, 0, 0, 1], port)))?;
    Ok(Connections {
        listener: socket.listen(ACCEPT_BACKLOG)?,
        slots: &CONNECTIONS,
    })
}

impl axum::serve::Listener for Connections {
    type Io = Admitted;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // A slot first: until one frees, connections wait in the kernel's queue.
            let Ok(slot) = self.slots.acquire().await else {
                continue;
            };
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    return (
                        Admitted {
                            stream,
                            _slot: slot,
                        },
                        addr,
                    )
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::error!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// An accepted connection, holding its slot until it closes.
#[derive(Debug)]
pub struct Admitted {
    stream: TcpStream,
    _slot: SemaphorePermit<'static>,
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;

    #[tokio::test]
    async fn a_connection_beyond_the_bound_is_taken_once_one_closes() {
        let mut listener = bind(0).await.unwrap();
        listener.slots = Box::leak(Box::new(Semaphore::new(2)));
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let (first, _) = listener.accept().await;
        let (second, _) = listener.accept().await;
        assert_eq!(
            listener.slots.available_permits(),
            0,
            "the bound is reached"
        );
        drop(first);
        let (third, _) = listener.accept().await;
        assert_eq!(listener.slots.available_permits(), 0);
        drop((second, third));
        assert_eq!(
            listener.slots.available_permits(),
            2,
            "slots come back as connections close"
        );
    }
}
