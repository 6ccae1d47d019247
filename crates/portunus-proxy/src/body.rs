//! The response body type: an upstream's streamed body or a small local answer, carrying the
//! guards that count the request as in flight until the body is finished or dropped.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::conn::RequestGuard;
use crate::upstream::ActiveGuard;

pin_project_lite::pin_project! {
    /// A response body sent to a client.
    #[derive(Debug)]
    pub struct ProxyBody {
        #[pin]
        inner: Inner,
        upstream: Option<ActiveGuard>,
        request: Option<RequestGuard>,
    }
}

pin_project_lite::pin_project! {
    #[project = InnerProj]
    #[derive(Debug)]
    enum Inner {
        Upstream { #[pin] body: Incoming },
        Full { data: Option<Bytes> },
    }
}

impl ProxyBody {
    /// A complete body held in memory.
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        Self {
            inner: Inner::Full {
                data: (!data.is_empty()).then_some(data),
            },
            upstream: None,
            request: None,
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    pub(crate) fn upstream(body: Incoming, guard: ActiveGuard) -> Self {
        Self {
            inner: Inner::Upstream { body },
            upstream: Some(guard),
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
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let polled = match this.inner.project() {
            InnerProj::Upstream { body } => body.poll_frame(cx),
            InnerProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
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
            Inner::Upstream { body } => body.is_end_stream(),
            Inner::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream { body } => body.size_hint(),
            Inner::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
