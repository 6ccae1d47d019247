//! Per-connection bookkeeping: traffic and requests in flight, for the idle and
//! header-read timeouts that hyper does not enforce the way we need.
//!
//! hyper's own `header_read_timeout` also runs while an HTTP/1 connection waits for its next
//! request, which would cap keep-alive at the header timeout, and HTTP/2 has no idle timeout
//! at all. So each connection tracks when it last moved a byte, whether a request head has
//! started arriving, and how many requests are in flight; a watchdog closes it when it has
//! been idle for `idle`, or when a request head takes longer than `header_read`.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// What the watchdog decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    /// No request in flight and no traffic for `idle`: close gracefully.
    Idle,
    /// A request head started arriving more than `header_read` ago: drop the connection.
    HeaderRead,
}

/// Shared between a connection's I/O, its service and its watchdog.
#[derive(Debug)]
pub(crate) struct Activity {
    start: Instant,
    /// Milliseconds since `start` of the last byte read or written.
    last: AtomicU64,
    /// Milliseconds since `start` + 1 of the first byte of a request head not yet handed to
    /// the service; 0 when none is pending.
    head_started: AtomicU64,
    in_flight: AtomicUsize,
    /// Whether request heads are tracked (HTTP/1 only: HTTP/2 sends frames all the time).
    track_heads: AtomicBool,
}

impl Activity {
    pub(crate) fn new(track_heads: bool) -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            track_heads: AtomicBool::new(track_heads),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn on_traffic(&self, read: bool) {
        let now = self.now_ms();
        self.last.store(now, Ordering::Relaxed);
        if read
            && self.track_heads.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_started.load(Ordering::Relaxed) == 0
        {
            self.head_started.store(now + 1, Ordering::Relaxed);
        }
    }

    /// Stops tracking request heads (the connection turned out to speak HTTP/2), and forgets
    /// the bytes of the TLS handshake.
    pub(crate) fn set_track_heads(&self, track: bool) {
        self.track_heads.store(track, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
    }

    /// Called when the service receives a request: it counts as in flight until the guard
    /// (held by the response body) is dropped.
    pub(crate) fn begin_request(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
        RequestGuard(Arc::clone(self))
    }

    /// Waits until the connection has been idle for `idle`, or a request head has been
    /// arriving for longer than `header_read`.
    pub(crate) async fn expired(&self, idle: Duration, header_read: Duration) -> Expired {
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        let head_ms = u64::try_from(header_read.as_millis()).unwrap_or(u64::MAX);
        loop {
            let now = self.now_ms();
            let head = self.head_started.load(Ordering::Relaxed);
            let busy = self.in_flight.load(Ordering::Relaxed) > 0;
            if head != 0 && !busy && now >= (head - 1).saturating_add(head_ms) {
                return Expired::HeaderRead;
            }
            let last = self.last.load(Ordering::Relaxed);
            if !busy && head == 0 && now >= last.saturating_add(idle_ms) {
                return Expired::Idle;
            }
            let mut wake = if busy {
                now.saturating_add(idle_ms)
            } else {
                last.saturating_add(idle_ms)
            };
            if head != 0 && !busy {
                wake = wake.min((head - 1).saturating_add(head_ms));
            } else if !busy {
                // A head may start while this sleeps: look again within `header_read`, so
                // a slow head is cut between one and two `header_read` after its first byte.
                // (Waking this task on every request head would cost more than it saves.)
                wake = wake.min(now.saturating_add(head_ms));
            }
            // Never spin: wake at least a few milliseconds later.
            let wait = wake.saturating_sub(now).max(5);
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }
}

/// Counts one request as in flight on its connection until dropped.
#[derive(Debug)]
pub(crate) struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.on_traffic(false);
    }
}

pin_project_lite::pin_project! {
    /// An I/O stream that reports its traffic to an [`Activity`], and fails a write that
    /// cannot make progress for `write_timeout` (a client that stopped reading).
    #[derive(Debug)]
    pub(crate) struct TrackedIo<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
        write_timeout: Duration,
        stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<T> TrackedIo<T> {
    pub(crate) fn new(inner: T, activity: Arc<Activity>, write_timeout: Duration) -> Self {
        Self {
            inner,
            activity,
            write_timeout,
            stalled: None,
        }
    }
}

/// Tracks how long writes have been pending; an error once that exceeds the timeout.
fn check_stall(
    stalled: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    timeout: Duration,
    pending: bool,
    cx: &mut Context<'_>,
) -> Option<io::Error> {
    if !pending {
        *stalled = None;
        return None;
    }
    let timer = stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
    match timer.as_mut().poll(cx) {
        Poll::Ready(()) => Some(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading",
        )),
        Poll::Pending => None,
    }
}

impl<T: AsyncRead> AsyncRead for TrackedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.on_traffic(true);
        }
        polled
    }
}

impl<T: AsyncWrite> AsyncWrite for TrackedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.on_traffic(false);
        }
        if let Some(e) = check_stall(this.stalled, *this.write_timeout, polled.is_pending(), cx) {
            return Poll::Ready(Err(e));
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.on_traffic(false);
        }
        if let Some(e) = check_stall(this.stalled, *this.write_timeout, polled.is_pending(), cx) {
            return Poll::Ready(Err(e));
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let polled = this.inner.poll_flush(cx);
        if let Some(e) = check_stall(this.stalled, *this.write_timeout, polled.is_pending(), cx) {
            return Poll::Ready(Err(e));
        }
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_fires_only_without_requests() {
        let a = Activity::new(true);
        let guard = a.begin_request();
        let waiting = tokio::time::timeout(
            Duration::from_secs(5),
            a.expired(Duration::from_secs(1), Duration::from_secs(1)),
        )
        .await;
        assert!(
            waiting.is_err(),
            "a request in flight must keep the connection"
        );
        drop(guard);
        let started = Instant::now();
        let got = a
            .expired(Duration::from_secs(1), Duration::from_secs(10))
            .await;
        assert_eq!(got, Expired::Idle);
        assert!(started.elapsed() >= Duration::from_millis(990));
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_starting_while_the_watchdog_sleeps_still_times_out() {
        let a = Activity::new(true);
        let watchdog = tokio::spawn({
            let a = Arc::clone(&a);
            async move {
                a.expired(Duration::from_secs(60), Duration::from_secs(1))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        a.on_traffic(true);
        let got = tokio::time::timeout(Duration::from_secs(3), watchdog).await;
        assert_eq!(got.unwrap().unwrap(), Expired::HeaderRead);
    }

    #[tokio::test(start_paused = true)]
    async fn partial_head_hits_header_timeout() {
        let a = Activity::new(true);
        a.on_traffic(true);
        let got = a
            .expired(Duration::from_secs(60), Duration::from_secs(2))
            .await;
        assert_eq!(got, Expired::HeaderRead);
        // HTTP/2 does not track heads: only idle applies.
        let b = Activity::new(false);
        b.on_traffic(true);
        let got = b
            .expired(Duration::from_secs(3), Duration::from_secs(1))
            .await;
        assert_eq!(got, Expired::Idle);
    }
}
