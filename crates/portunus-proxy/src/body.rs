//! The response body type: an upstream's streamed body or a small local answer, carrying the
//! guards that count the request as in flight until the body is finished or dropped.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::client::{ResponseBody, UpstreamError};
use crate::conn::{BodyEnd, RequestGuard};
use crate::upstream::ActiveGuard;

/// A response body sent to a client.
#[derive(Debug)]
pub struct ProxyBody {
    inner: Inner,
    /// Counts the request as in flight on its upstream until the body has been read.
    upstream: Option<ActiveGuard>,
    request: Option<RequestGuard>,
}

#[derive(Debug)]
enum Inner {
    Upstream(ResponseBody),
    Full(Option<Bytes>),
}

impl ProxyBody {
    /// A complete body held in memory.
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        Self {
            inner: Inner::Full((!data.is_empty()).then_some(data)),
            upstream: None,
            request: None,
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    /// An upstream's response body; it counts on `guard`'s upstream until read to its end.
    pub(crate) fn upstream(body: ResponseBody, guard: ActiveGuard) -> Self {
        let complete = body.is_end_stream();
        Self {
            inner: Inner::Upstream(body),
            upstream: (!complete).then_some(guard),
            request: None,
        }
    }

    pub(crate) fn with_request_guard(mut self, guard: RequestGuard) -> Self {
        self.request = Some(guard);
        self
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Inner::Upstream(body) => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                if body.is_end_stream() {
                    this.upstream.take();
                }
                polled
            }
            Inner::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        };
        if let Poll::Ready(None | Some(Err(_))) = polled {
            // Finished: the request no longer counts as in flight.
            this.upstream.take();
            this.request.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream(body) => body.is_end_stream(),
            Inner::Full(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(body) => body.size_hint(),
            Inner::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

pin_project_lite::pin_project! {
    /// A client's request body on its way upstream: at most `limit` bytes (0 = unlimited),
    /// and no gap longer than `gap` between two frames. Either breach ends the body with an
    /// error, which aborts the upstream request; `exceeded` tells the handler to answer 413.
    #[derive(Debug)]
    pub(crate) struct LimitedBody {
        #[pin]
        inner: Incoming,
        limit: u64,
        seen: u64,
        gap: std::time::Duration,
        // Armed only when a read has to wait: most bodies never need it.
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
        // Shared with the handler; none for a body that has already ended (nothing to cut).
        exceeded: Option<std::sync::Arc<std::sync::atomic::AtomicU8>>,
        // A frame read ahead (before the upstream was contacted), given out first.
        first: Option<Frame<Bytes>>,
        done: bool,
        // Told when the body has been read to its end.
        end: Option<BodyEnd>,
    }
}

/// Tells the handler why the body was cut.
fn cut(exceeded: &Option<std::sync::Arc<std::sync::atomic::AtomicU8>>, why: u8) {
    if let Some(exceeded) = exceeded {
        exceeded.store(why, std::sync::atomic::Ordering::Relaxed);
    }
}

/// [`LimitedBody`] cut the body: it was too large.
pub(crate) const CUT_TOO_LARGE: u8 = 1;
/// [`LimitedBody`] cut the body: the client stopped sending it.
pub(crate) const CUT_STALLED: u8 = 2;
/// [`LimitedBody`] cut the body: it could not be decoded (an invalid chunk).
pub(crate) const CUT_MALFORMED: u8 = 3;

/// Why a request body was cut off.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("request body larger than {0} bytes")]
    TooLarge(u64),
    #[error("request body stalled for longer than {0:?}")]
    Stalled(std::time::Duration),
    #[error("request body")]
    Client(#[source] hyper::Error),
}

impl LimitedBody {
    pub(crate) fn new(
        inner: Incoming,
        end: Option<BodyEnd>,
        limit: u64,
        gap: std::time::Duration,
        exceeded: Option<std::sync::Arc<std::sync::atomic::AtomicU8>>,
    ) -> Self {
        Self {
            inner,
            limit,
            seen: 0,
            gap,
            timer: None,
            exceeded,
            first: None,
            done: false,
            end,
        }
    }

    /// Reads the first frame before anything is forwarded, so a body that is broken from its
    /// first byte (an invalid chunk size) is refused without contacting an upstream.
    pub(crate) async fn read_ahead(&mut self) -> Result<(), BodyError> {
        if self.inner.is_end_stream() {
            return Ok(());
        }
        match std::future::poll_fn(|cx| Pin::new(&mut *self).poll_frame(cx)).await {
            Some(Ok(frame)) => self.first = Some(frame),
            Some(Err(e)) => return Err(e),
            None => self.done = true,
        }
        Ok(())
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut this = self.project();
        if let Some(frame) = this.first.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if *this.done {
            return Poll::Ready(None);
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.seen += data.len() as u64;
                    if *this.limit > 0 && *this.seen > *this.limit {
                        cut(this.exceeded, CUT_TOO_LARGE);
                        return Poll::Ready(Some(Err(BodyError::TooLarge(*this.limit))));
                    }
                }
                *this.timer = None;
                // hyper's client stops asking once the body says it has ended.
                if this.inner.is_end_stream()
                    && let Some(end) = this.end.take()
                {
                    end.reached();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                cut(this.exceeded, CUT_MALFORMED);
                Poll::Ready(Some(Err(BodyError::Client(e))))
            }
            Poll::Ready(None) => {
                if let Some(end) = this.end.take() {
                    end.reached();
                }
                Poll::Ready(None)
            }
            Poll::Pending => match this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(*this.gap)))
                .as_mut()
                .poll(cx)
            {
                Poll::Ready(()) => {
                    cut(this.exceeded, CUT_STALLED);
                    Poll::Ready(Some(Err(BodyError::Stalled(*this.gap))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && (self.done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let buffered = self
            .first
            .as_ref()
            .and_then(|f| f.data_ref())
            .map_or(0, |d| d.len() as u64);
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + buffered);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + buffered);
        }
        hint
    }
}
