//! HTTP/2 streams run by their connection's own task.
//!
//! hyper hands each HTTP/2 stream (the request's future and the piping of its response) to
//! an executor. With tokio's, every stream is a task of its own: an allocation aligned to
//! 128 bytes (glibc's slow path), a schedule, and for every response a wake-up of the
//! connection's task from the stream's. On a worker's current-thread runtime the two tasks
//! run on the same thread anyway, so here the streams are kept in a [`FuturesUnordered`]
//! that the connection's task polls each time it runs ([`WithStreams`]): the same
//! concurrency, without the task per stream (h2tls: 49.3k -> 47.5k instructions per
//! request). A stream still costs two allocations: its box and the set's node for it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt as _};

/// A stream's future (or an upgraded stream's pipe), boxed: hyper's stream types name their
/// executor, so the set cannot name them.
type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// hyper's executor for one HTTP/2 connection: what it is given waits here until the
/// connection's [`WithStreams`] polls it.
#[derive(Debug, Clone)]
pub(crate) struct Streams(Arc<Mutex<FuturesUnordered<StreamFuture>>>);

impl Streams {
    pub(crate) fn new() -> Self {
        Self(Arc::new(Mutex::new(FuturesUnordered::new())))
    }

    /// Runs every stream that can make progress; finished ones are dropped.
    fn run(&self, cx: &mut Context<'_>) {
        let mut set = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // `Ready(None)`: none left; `Pending`: the rest wait (or the set yielded, having
        // woken the task to go on).
        while let Poll::Ready(Some(())) = set.poll_next_unpin(cx) {}
    }

    /// Streams not finished yet.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

impl<F> hyper::rt::Executor<F> for Streams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::pin(stream));
    }
}

pin_project_lite::pin_project! {
    /// A connection together with the streams its executor was given: polling it runs both.
    /// It ends when the connection does; a stream still there then has lost its connection.
    #[derive(Debug)]
    pub(crate) struct WithStreams<C> {
        #[pin]
        conn: C,
        streams: Streams,
    }
}

impl<C> WithStreams<C> {
    pub(crate) fn new(conn: C, streams: Streams) -> Self {
        Self { conn, streams }
    }

    pub(crate) fn conn(self: Pin<&mut Self>) -> Pin<&mut C> {
        self.project().conn
    }
}

impl<C: Future> Future for WithStreams<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.project();
        // Streams first: what they answer is then written by the connection in the same poll.
        this.streams.run(cx);
        let polled = this.conn.poll(cx);
        if polled.is_pending() {
            // Streams the connection just accepted start at once.
            this.streams.run(cx);
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicUsize, Ordering};

    use hyper::rt::Executor as _;

    use super::*;

    #[tokio::test]
    async fn streams_run_with_their_connection_and_end_with_it() {
        let done = Arc::new(AtomicUsize::new(0));
        let streams = Streams::new();
        let (open, opened) = tokio::sync::oneshot::channel::<()>();
        let (release, released) = tokio::sync::watch::channel(false);
        // The "connection": hands over three streams, two that end after a wait and one that
        // never ends, then ends itself once told to.
        let conn = {
            let streams = streams.clone();
            let done = Arc::clone(&done);
            async move {
                for forever in [false, false, true] {
                    let done = Arc::clone(&done);
                    let mut released = released.clone();
                    streams.execute(async move {
                        if forever {
                            std::future::pending::<()>().await;
                        }
                        let _ = released.wait_for(|r| *r).await;
                        done.fetch_add(1, Ordering::SeqCst);
                    });
                }
                opened.await.unwrap();
                7
            }
        };
        let mut both = Box::pin(WithStreams::new(conn, streams.clone()));
        // Nothing finishes before it is released.
        let polled = std::future::poll_fn(|cx| Poll::Ready(both.as_mut().poll(cx))).await;
        assert!(polled.is_pending());
        assert_eq!(streams.len(), 3);
        release.send(true).unwrap();
        let polled = std::future::poll_fn(|cx| Poll::Ready(both.as_mut().poll(cx))).await;
        assert!(polled.is_pending());
        assert_eq!(
            done.load(Ordering::SeqCst),
            2,
            "woken streams ran and were dropped"
        );
        assert_eq!(streams.len(), 1);
        open.send(()).unwrap();
        assert_eq!(both.await, 7);
    }
}
