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
use tokio::net::TcpStream;
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
    /// Requests received so far: the number of the latest.
    requests: AtomicU64,
    /// The number of the request whose body has not been read to its end (hyper is still
    /// reading it), or 0. Over HTTP/1 a new request means the one before was read to its end.
    unread_body: AtomicU64,
    /// The connection was upgraded (a WebSocket): never parked.
    upgraded: AtomicBool,
    /// Everything answered has been written and flushed to the client.
    flushed: AtomicBool,
    /// Set by [`ParkableIo`] when the connection should be parked; taken by its driver.
    park_now: AtomicBool,
    /// The request in flight asked to close the connection after its answer (HTTP/1:
    /// `Connection: close`, or HTTP/1.0 without `keep-alive`).
    closes: AtomicBool,
}

impl Activity {
    pub(crate) fn new(track_heads: bool) -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            track_heads: AtomicBool::new(track_heads),
            requests: AtomicU64::new(0),
            unread_body: AtomicU64::new(0),
            upgraded: AtomicBool::new(false),
            flushed: AtomicBool::new(true),
            park_now: AtomicBool::new(false),
            closes: AtomicBool::new(false),
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
    ///
    /// A request with a body not yet read (`body_pending`) keeps its HTTP/1 connection from
    /// being parked until the [`BodyEnd`] of [`Activity::body_end`] says the body was read to
    /// its end, or the next request arrives; an upgrade keeps it from being parked for good.
    pub(crate) fn begin_request(
        self: &Arc<Self>,
        body_pending: bool,
        upgrade: bool,
    ) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
        let number = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        self.unread_body
            .store(if body_pending { number } else { 0 }, Ordering::Relaxed);
        if upgrade {
            self.upgraded.store(true, Ordering::Relaxed);
        }
        RequestGuard(Arc::clone(self))
    }

    /// The request just begun closes the connection after its answer (hyper will shut the
    /// connection down once it has written it).
    pub(crate) fn closes_after_answer(&self) {
        self.closes.store(true, Ordering::Relaxed);
    }

    /// Whether the connection's last answer has been handed over (its request is no longer
    /// in flight) and the connection closes next.
    fn closing(&self) -> bool {
        self.closes.load(Ordering::Relaxed) && self.in_flight.load(Ordering::Relaxed) == 0
    }

    /// The token of the latest request's body, announced to [`Activity::begin_request`] as
    /// pending.
    pub(crate) fn body_end(self: &Arc<Self>) -> BodyEnd {
        BodyEnd(Arc::clone(self), self.requests.load(Ordering::Relaxed))
    }

    /// Whether an HTTP/1 connection whose read just found nothing to read may be parked: no
    /// request in flight or half read, everything answered flushed.
    fn parkable(&self) -> bool {
        !self.upgraded.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.unread_body.load(Ordering::Relaxed) == 0
            && self.head_started.load(Ordering::Relaxed) == 0
            && self.flushed.load(Ordering::Relaxed)
    }

    /// When the connection will have been without traffic for `idle`.
    pub(crate) fn idle_deadline(&self, idle: Duration) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed)) + idle
    }

    /// Whether [`ParkableIo`] asked for the connection to be parked (and forgets the request).
    pub(crate) fn take_park(&self) -> bool {
        self.park_now.swap(false, Ordering::Relaxed)
    }

    /// A parked connection came back with bytes of a request head (`head`) or without. A
    /// head starts the header-read timeout, and the connection is not parked again before the
    /// request has arrived.
    fn unparked(&self, head: bool) {
        if head {
            self.head_started
                .store(self.now_ms().saturating_add(1), Ordering::Relaxed);
        }
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

pin_project_lite::pin_project! {
    /// A future polled only after it has woken its task (and once at first): for what a
    /// connection's task waits on beside the connection itself (the server draining, its
    /// watchdog), which would otherwise be polled again on every wake-up of the connection,
    /// each poll of a `CancellationToken`'s future taking its `Notify`'s lock.
    pub(crate) struct WhenWoken<F> {
        #[pin]
        inner: F,
        flag: Arc<WakeFlag>,
        waker: std::task::Waker,
    }
}

/// Whether a [`WhenWoken`] future has been woken since it was last polled, and the task to
/// wake in its turn.
#[derive(Debug, Default)]
pub(crate) struct WakeFlag {
    woken: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: std::future::Future> WhenWoken<F> {
    pub(crate) fn new(inner: F) -> Self {
        let flag = Arc::new(WakeFlag {
            woken: AtomicBool::new(true),
            task: futures_util::task::AtomicWaker::new(),
        });
        let waker = std::task::Waker::from(Arc::clone(&flag));
        Self { inner, flag, waker }
    }
}

impl<F: std::future::Future> std::future::Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.inner.poll(&mut Context::from_waker(this.waker))
    }
}

/// Counts one request as in flight on its connection until dropped.
#[derive(Debug)]
pub(crate) struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        // The end of the answer may still sit in hyper's buffer.
        self.0.flushed.store(false, Ordering::Relaxed);
        self.0.on_traffic(false);
    }
}

/// Held by a request body until it has been read to its end: until then, the HTTP/1
/// connection is not parked (hyper is still reading the body). A body dropped before its end
/// does not release the connection (hyper drains it or closes the connection, unseen); the
/// next request does.
#[derive(Debug)]
pub(crate) struct BodyEnd(Arc<Activity>, u64);

impl BodyEnd {
    /// The body has been read to its end.
    pub(crate) fn reached(self) {
        let _ =
            self.0
                .unread_body
                .compare_exchange(self.1, 0, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// How long an HTTP/1 connection waits for its next request before it is parked (hyper's
/// connection state and buffers, some 20 KiB, are freed, and only the socket is watched until
/// the client sends again) while its listener has many connections open: memory matters then.
pub(crate) const PARK_AFTER: Duration = Duration::from_millis(10);

/// The same with few connections open: a client that sends a request every few hundred
/// milliseconds is then not parked between them (a park and the new hyper connection after it
/// cost some 14 µs of CPU).
pub(crate) const PARK_AFTER_FEW: Duration = Duration::from_secs(1);

/// How many open connections on a listener make "many" for [`ParkPolicy`].
pub(crate) const PARK_CROWD: usize = 256;

/// How many connections one listener has open (over all its workers; its connection cap
/// counts them here), and from that, how soon its quiet HTTP/1 connections are parked.
#[derive(Debug, Default)]
pub(crate) struct ParkPolicy {
    open: AtomicUsize,
}

impl ParkPolicy {
    pub(crate) fn opened(&self) {
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// [`PARK_AFTER`] with more than [`PARK_CROWD`] connections open, else [`PARK_AFTER_FEW`].
    fn delay(&self) -> Duration {
        if self.open() > PARK_CROWD {
            PARK_AFTER
        } else {
            PARK_AFTER_FEW
        }
    }
}

/// The longest wait between two looks at a connection that could not be parked when it had
/// been quiet for long enough (a slow upstream, a body still arriving): the waits double from
/// the park delay up to this.
const PARK_RETRY_MAX: Duration = Duration::from_secs(1);

pin_project_lite::pin_project! {
    /// The I/O of an HTTP/1 connection, as hyper sees it: first the bytes hyper had read but
    /// not used when the connection was last parked, then the stream. When a read finds
    /// nothing, the connection is [`Activity::parkable`] and has been quiet for its
    /// [`ParkPolicy`]'s delay, it asks its driver to park it (see [`Activity::take_park`]).
    #[derive(Debug)]
    pub(crate) struct ParkableIo<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
        policy: Arc<ParkPolicy>,
        prefix: bytes::Bytes,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
        // The wait before the next look while the connection cannot be parked.
        retry: Duration,
    }
}

impl<T> ParkableIo<T> {
    pub(crate) fn new(inner: T, activity: Arc<Activity>, policy: Arc<ParkPolicy>) -> Self {
        Self {
            inner,
            activity,
            policy,
            prefix: bytes::Bytes::new(),
            timer: None,
            retry: PARK_AFTER,
        }
    }

    /// Takes back the bytes hyper had read but not used when it gave the stream back; true
    /// when there are none, and the connection can wait for its client with no buffer.
    pub(crate) fn parked(&mut self, unread: bytes::Bytes) -> bool {
        self.timer = None;
        self.activity.unparked(!unread.is_empty());
        // Even empty, hyper's bytes hold on to its whole read buffer.
        self.prefix = if unread.is_empty() {
            bytes::Bytes::new()
        } else {
            unread
        };
        self.prefix.is_empty()
    }

    pub(crate) fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead> AsyncRead for ParkableIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            if this.prefix.is_empty() {
                // Let go of the buffer it was part of.
                *this.prefix = bytes::Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        let polled = this.inner.poll_read(cx, buf);
        // hyper reads again only when woken: the timer wakes it once the connection has been
        // quiet long enough, whatever was in flight when it last read. A tunnel never parks,
        // and is never woken for it. The timer is not moved with each request (that was some
        // 300 instructions a request): when it fires after traffic, it is set again from the
        // last traffic, at most once per park delay.
        if polled.is_pending() && !this.activity.upgraded.load(Ordering::Relaxed) {
            let timer = this.timer.get_or_insert_with(|| {
                let delay = this.policy.delay();
                *this.retry = delay;
                Box::pin(tokio::time::sleep_until(this.activity.idle_deadline(delay)))
            });
            while timer.as_mut().poll(cx).is_ready() {
                let delay = this.policy.delay();
                let quiet = this.activity.idle_deadline(delay);
                if quiet > timer.deadline() {
                    // Traffic since the timer was set: the quiet time counts from it.
                    *this.retry = delay;
                    timer.as_mut().reset(quiet);
                } else if this.activity.parkable() {
                    this.activity.park_now.store(true, Ordering::Relaxed);
                    break;
                } else {
                    // Busy (a slow upstream, a body still arriving): look again, less and less
                    // often.
                    *this.retry = (*this.retry * 2).min(PARK_RETRY_MAX);
                    timer.as_mut().reset(Instant::now() + *this.retry);
                }
            }
        }
        polled
    }
}

impl<T: AsyncWrite> AsyncWrite for ParkableIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        this.activity.flushed.store(false, Ordering::Relaxed);
        this.inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        this.activity.flushed.store(false, Ordering::Relaxed);
        this.inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    /// hyper flushes the stream only once its own buffer is empty: a flush that completes
    /// after the last answer means all of it reached the stream.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let polled = this.inner.poll_flush(cx);
        if matches!(polled, Poll::Ready(Ok(()))) {
            this.activity.flushed.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// A client connection's socket as the layers above it see it: it reports its traffic to an
/// [`Activity`], fails a write that cannot make progress for `write_timeout` (a client that
/// stopped reading), and sends the last answer of a connection that closes after it, the TLS
/// `close_notify` and the FIN in one TCP segment, not three (see [`TrackedIo::cork_last`]).
#[derive(Debug)]
pub(crate) struct TrackedIo {
    inner: TcpStream,
    activity: Arc<Activity>,
    write_timeout: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    /// `TCP_CORK` is on: partial segments wait in the kernel.
    corked: bool,
}

impl TrackedIo {
    pub(crate) fn get_ref(&self) -> &TcpStream {
        &self.inner
    }

    pub(crate) fn new(inner: TcpStream, activity: Arc<Activity>, write_timeout: Duration) -> Self {
        Self {
            inner,
            activity,
            write_timeout,
            stalled: None,
            corked: false,
        }
    }

    /// Before a write: once the answer to a request that closes the connection has been
    /// handed over, what is written from then on (its last bytes, TLS's `close_notify`) waits
    /// in the kernel, corked, for the FIN of the shutdown that follows, and leaves with it in
    /// one segment. A client connecting for one request (`Connection: close`, HTTP/1.0) then
    /// costs two fewer segments through both TCP stacks. Streamed answers are unaffected: the
    /// cork comes only after their end.
    fn cork_last(&mut self) {
        if !self.corked && self.activity.closing() {
            self.set_cork(true);
        }
    }

    /// Before waiting for the client: nothing may stay corked then (were the connection kept
    /// after all, the client would wait for an answer held back).
    fn uncork(&mut self) {
        if self.corked {
            self.set_cork(false);
            self.activity.closes.store(false, Ordering::Relaxed);
        }
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn set_cork(&mut self, on: bool) {
        self.corked = socket2::SockRef::from(&self.inner).set_tcp_cork(on).is_ok() && on;
    }

    /// Elsewhere there is no `TCP_CORK`: each write goes out as it comes.
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn set_cork(&mut self, _on: bool) {}

    /// Counts a write's traffic; fails it once it has been stuck for `write_timeout`.
    fn wrote(
        &mut self,
        polled: Poll<io::Result<usize>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.on_traffic(false);
        }
        self.unless_stalled(polled, cx)
    }

    /// `polled` (a write or a flush), or an error once writes have been pending for longer
    /// than `write_timeout`: the client stopped reading.
    fn unless_stalled<R>(
        &mut self,
        polled: Poll<io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<R>> {
        if !polled.is_pending() {
            self.stalled = None;
            return polled;
        }
        let timeout = self.write_timeout;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        match polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => this.activity.on_traffic(true),
            Poll::Pending => this.uncork(),
            _ => {}
        }
        polled
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.cork_last();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(polled, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.cork_last();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.unless_stalled(polled, cx)
    }

    /// The FIN takes what waits corked along.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts how often a task is woken.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_when_woken_future_is_polled_only_after_waking_its_task() {
        let notify = Arc::new(tokio::sync::Notify::new());
        let polls = Arc::new(AtomicUsize::new(0));
        let (n, p) = (Arc::clone(&notify), Arc::clone(&polls));
        let mut notified = Box::pin(async move { n.notified().await });
        let inner = std::future::poll_fn(move |cx| {
            p.fetch_add(1, Ordering::Relaxed);
            notified.as_mut().poll(cx).map(|()| 7)
        });
        let mut future = Box::pin(WhenWoken::new(inner));
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);

        assert!(future.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 1, "polled once at first");
        for _ in 0..3 {
            assert!(future.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1, "not again until woken");
        assert_eq!(wakes.0.load(Ordering::Relaxed), 0);

        notify.notify_one();
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            1,
            "its wake reaches the task"
        );
        assert_eq!(future.as_mut().poll(&mut cx), Poll::Ready(7));
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    /// Our end and the peer's of a loopback TCP connection, ours tracked by `activity`.
    async fn tracked_pair(activity: &Arc<Activity>) -> (TrackedIo, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        let io = TrackedIo::new(ours, Arc::clone(activity), Duration::from_secs(5));
        (io, peer)
    }

    fn corked(io: &TrackedIo) -> bool {
        socket2::SockRef::from(io.get_ref()).tcp_cork().unwrap()
    }

    #[tokio::test]
    async fn the_end_of_a_last_answer_is_corked_until_the_fin() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let activity = Activity::new(true);
        let (mut io, mut peer) = tracked_pair(&activity).await;
        let guard = activity.begin_request(false, false);
        activity.closes_after_answer();
        // While the answer is in flight, what it writes goes out as it comes.
        io.write_all(b"head, ").await.unwrap();
        assert!(!corked(&io));
        let mut first = [0u8; 6];
        peer.read_exact(&mut first).await.unwrap();
        drop(guard);
        io.write_all(b"end, ").await.unwrap();
        assert!(corked(&io), "the answer's end waits");
        io.write_all(b"close_notify").await.unwrap();
        io.shutdown().await.unwrap();
        let mut rest = String::new();
        peer.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "end, close_notify", "all of it, then the end");
    }

    #[tokio::test]
    async fn a_connection_kept_after_all_is_uncorked_before_it_waits_for_its_client() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let activity = Activity::new(true);
        let (mut io, mut peer) = tracked_pair(&activity).await;
        drop(activity.begin_request(false, false));
        activity.closes_after_answer();
        io.write_all(b"answer").await.unwrap();
        assert!(corked(&io));
        // The server reads on instead of closing: nothing to read yet.
        let mut buf = [0u8; 16];
        let waits = std::future::poll_fn(|cx| {
            let mut read = ReadBuf::new(&mut buf);
            Poll::Ready(Pin::new(&mut io).poll_read(cx, &mut read).is_pending())
        })
        .await;
        assert!(waits);
        assert!(!corked(&io), "nothing held while waiting for the client");
        let mut got = [0u8; 6];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"answer");
        io.write_all(b"more").await.unwrap();
        assert!(!corked(&io), "and the connection is an ordinary one again");
    }

    #[tokio::test]
    async fn answers_on_a_kept_connection_are_never_corked() {
        use tokio::io::AsyncWriteExt as _;
        let activity = Activity::new(true);
        let (mut io, _peer) = tracked_pair(&activity).await;
        for _ in 0..2 {
            let guard = activity.begin_request(false, false);
            io.write_all(b"head").await.unwrap();
            drop(guard);
            io.write_all(b"end").await.unwrap();
            assert!(!corked(&io));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_fires_only_without_requests() {
        let a = Activity::new(true);
        let guard = a.begin_request(false, false);
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

    /// Counts how often a connection waiting to read is woken by its park timer over `span`,
    /// polling it only when woken (as hyper does), with a request in flight all along.
    async fn park_wakes(upgrade: bool, open: usize, span: Duration) -> usize {
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let activity = Activity::new(true);
        let _in_flight = activity.begin_request(false, upgrade);
        let (_client, server) = tokio::io::duplex(64);
        let policy = Arc::new(ParkPolicy::default());
        for _ in 0..open {
            policy.opened();
        }
        let mut io = Box::pin(ParkableIo::new(server, Arc::clone(&activity), policy));
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        let mut buf = [0u8; 16];
        let end = Instant::now() + span;
        let mut polled_at = usize::MAX;
        while Instant::now() < end {
            let woken = count.0.load(Ordering::Relaxed);
            if woken != polled_at {
                polled_at = woken;
                let mut read = ReadBuf::new(&mut buf);
                assert!(io.as_mut().poll_read(&mut cx, &mut read).is_pending());
                assert!(!activity.take_park(), "a request is in flight");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        count.0.load(Ordering::Relaxed)
    }

    #[tokio::test(start_paused = true)]
    async fn busy_connections_are_looked_at_less_and_less_and_tunnels_never() {
        // A crowded listener: 10, 20, 40 ... ms, then once a second: about a dozen looks in
        // 5 s, not 500. A quiet one: once a second.
        let crowded = park_wakes(false, PARK_CROWD + 1, Duration::from_secs(5)).await;
        assert!((8..=15).contains(&crowded), "{crowded} wake-ups");
        let few = park_wakes(false, 1, Duration::from_secs(5)).await;
        assert!((4..=6).contains(&few), "{few} wake-ups");
        assert_eq!(
            park_wakes(true, PARK_CROWD + 1, Duration::from_secs(5)).await,
            0
        );
        assert_eq!(park_wakes(true, 1, Duration::from_secs(5)).await, 0);
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
