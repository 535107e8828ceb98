//! At most `limits.max_connections` client connections at once: each accepted connection
//! holds a permit until it closes, and one accepted while none is left is closed at once (its
//! client sees UNAVAILABLE) and logged, without touching the connections already open.
//!
//! An accept that fails for want of a resource (file descriptors, memory) pauses accepting a
//! moment: the pending connection stays queued, and retrying at once would fail the same way
//! in a loop that takes a whole core (the server only traces such errors and asks again).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

use crate::activity::{Activity, Held, Open};
use crate::throttle::Throttle;

/// How long accepting pauses after it failed for want of a resource.
const RESOURCE_PAUSE: Duration = Duration::from_millis(100);

static FAILED_ACCEPTS: Throttle = Throttle::new();

/// An accepted connection, counted until it is dropped.
pub struct Counted {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    _open: Held,
}

/// Accepted connections, at most `most` open at once, each counted in `activity`.
pub fn limit(
    incoming: TcpIncoming,
    most: u32,
    activity: Arc<Activity>,
) -> impl Stream<Item = io::Result<Counted>> {
    let permits = Arc::new(Semaphore::new(most as usize));
    incoming
        .then(pause_if_starved)
        .filter_map(move |accepted| match accepted {
            Err(e) => Some(Err(e)),
            Ok(stream) => match permits.clone().try_acquire_owned() {
                Ok(permit) => Some(Ok(Counted {
                    stream,
                    _permit: permit,
                    _open: activity.open(Open::Connection),
                })),
                Err(_) => {
                    tracing::warn!(
                        peer = ?stream.peer_addr().ok(),
                        limit = most,
                        "a connection was closed at once: limits.max_connections reached"
                    );
                    None
                }
            },
        })
}

/// Passes an accept's result on, after a pause if it failed for want of a resource.
async fn pause_if_starved(accepted: io::Result<TcpStream>) -> io::Result<TcpStream> {
    if let Err(e) = &accepted {
        use rustix::io::Errno;
        let starved = matches!(
            Errno::from_io_error(e),
            Some(Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM)
        );
        if starved {
            if let Some(left_out) = FAILED_ACCEPTS.pass() {
                tracing::warn!(error = %e, left_out, "cannot accept a connection; pausing accepts for {RESOURCE_PAUSE:?}");
            }
            tokio::time::sleep(RESOURCE_PAUSE).await;
        }
    }
    accepted
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
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

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}
