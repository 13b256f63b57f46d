//! [`RateLimit`]: the client service the layer wraps around yours.

use std::fmt;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use super::bucket::SelectBuckets;
use super::error::{BoxError, Error};
use super::future::ResponseFuture;
use super::request::{OutboundRequest, OutboundResponse};
use super::send::{Sender, Shared};

/// A client service whose calls wait for (or are refused by) their buckets: see the
/// [module docs](super).
///
/// Its error is [`Error`]: a refusal ([`RateLimited`](super::RateLimited),
/// [`UpstreamUnavailable`](super::UpstreamUnavailable)) or the inner service's error. Clones share
/// one state (store, buckets, breakers) behind an `Arc`.
#[derive(Clone)]
pub struct RateLimit<S, Sel> {
    inner: S,
    shared: Arc<Shared>,
    select: Sel,
}

impl<S: fmt::Debug, Sel> fmt::Debug for RateLimit<S, Sel> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, Sel> RateLimit<S, Sel> {
    pub(super) fn from_parts(inner: S, shared: Arc<Shared>, select: Sel) -> Self {
        RateLimit {
            inner,
            shared,
            select,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// The wrapped service as a [`Sender`]: made ready before every call but the first (`poll_ready`
/// was called on it before `call`).
struct ServiceSender<S> {
    inner: S,
    ready: bool,
}

impl<S, Req> Sender<Req> for ServiceSender<S>
where
    S: Service<Req> + Send,
    S::Response: OutboundResponse,
    S::Error: Into<BoxError>,
    S::Future: Send,
    Req: Send,
{
    type Response = S::Response;

    async fn send(&mut self, request: Req) -> Result<S::Response, BoxError> {
        if !self.ready {
            poll_fn(|cx| self.inner.poll_ready(cx))
                .await
                .map_err(Into::into)?;
        }
        self.ready = false;
        self.inner.call(request).await.map_err(Into::into)
    }
}

impl<S, Sel, Req> Service<Req> for RateLimit<S, Sel>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Response: OutboundResponse + Send,
    S::Error: Into<BoxError>,
    S::Future: Send,
    Sel: SelectBuckets<Req>,
    Req: OutboundRequest,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx).map_err(Error::inner)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = Arc::clone(&self.shared);
        let buckets = self.select.select(&request);
        ResponseFuture::new(async move {
            // `poll_ready` was called on `inner` before `call`.
            let mut sender = ServiceSender { inner, ready: true };
            shared.send(&buckets, request, &mut sender).await
        })
    }
}
