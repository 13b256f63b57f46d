//! [`RateLimit`]: the client service the layer wraps around yours, and the one send loop it
//! shares with the `reqwest-middleware` adapter.

use std::fmt;
use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};
use tollgate_core::Limit;
use tower_service::Service;

use super::bucket::{Bucket, SelectBuckets};
use super::error::{BoxError, Error, RateLimited};
use super::failures::Failures;
use super::future::ResponseFuture;
use super::layer::Mode;
use super::upstream::signal;
use crate::limiter::guarded::GuardedStore;
use crate::limiter::wait::{self, Refused};
use crate::metrics as m;

/// A request the outbound layer can send: where it goes, and whether it can be sent twice.
///
/// Implemented for `http::Request<B>` (with a `Clone` body) and, with tollgate's feature
/// `reqwest`, for `reqwest::Request`.
#[diagnostic::on_unimplemented(
    message = "the outbound rate limiter cannot send a `{Self}`",
    label = "not an `OutboundRequest`",
    note = "for `reqwest::Request`, enable tollgate's feature `reqwest`: tollgate = {{ version = \"..\", features = [\"reqwest\"] }}",
    note = "an `http::Request<B>` needs a body `B: Clone + Send + 'static`; for another request type, implement `tollgate::outbound::OutboundRequest` for it"
)]
pub trait OutboundRequest: Send + 'static {
    /// The upstream host, if known.
    fn host(&self) -> Option<&str>;
    /// A copy to send again after a refusal, if the body allows.
    fn try_clone(&self) -> Option<Self>
    where
        Self: Sized;
}

impl<B: Clone + Send + 'static> OutboundRequest for http::Request<B> {
    fn host(&self) -> Option<&str> {
        self.uri().host()
    }

    fn try_clone(&self) -> Option<Self> {
        let mut copy = http::Request::new(self.body().clone());
        *copy.method_mut() = self.method().clone();
        *copy.uri_mut() = self.uri().clone();
        *copy.version_mut() = self.version();
        *copy.headers_mut() = self.headers().clone();
        Some(copy)
    }
}

/// A response the outbound layer can read the upstream's limits from.
///
/// Implemented for `http::Response<B>` and, with tollgate's feature `reqwest`, for
/// `reqwest::Response`.
#[diagnostic::on_unimplemented(
    message = "the outbound rate limiter cannot read a `{Self}`",
    label = "not an `OutboundResponse`",
    note = "for `reqwest::Response`, enable tollgate's feature `reqwest`: tollgate = {{ version = \"..\", features = [\"reqwest\"] }}",
    note = "for another response type, implement `tollgate::outbound::OutboundResponse` for it"
)]
pub trait OutboundResponse {
    /// Its status.
    fn status(&self) -> StatusCode;
    /// Its headers.
    fn headers(&self) -> &HeaderMap;
}

impl<B> OutboundResponse for http::Response<B> {
    fn status(&self) -> StatusCode {
        http::Response::status(self)
    }

    fn headers(&self) -> &HeaderMap {
        http::Response::headers(self)
    }
}

#[cfg(feature = "reqwest")]
impl OutboundRequest for reqwest::Request {
    fn host(&self) -> Option<&str> {
        self.url().host_str()
    }

    fn try_clone(&self) -> Option<Self> {
        reqwest::Request::try_clone(self)
    }
}

#[cfg(feature = "reqwest")]
impl OutboundResponse for reqwest::Response {
    fn status(&self) -> StatusCode {
        reqwest::Response::status(self)
    }

    fn headers(&self) -> &HeaderMap {
        reqwest::Response::headers(self)
    }
}

/// State shared by every clone of the layer, its services and its middleware.
pub(super) struct Shared {
    /// The store behind its timeout, breaker and local fallback.
    pub(super) store: Arc<GuardedStore>,
    pub(super) mode: Mode,
    pub(super) retries: u32,
    pub(super) in_flight: Option<Arc<tokio::sync::Semaphore>>,
    /// The upstream failure breaker, when on.
    pub(super) failures: Option<Failures>,
}

/// A client service whose calls wait for (or are refused by) their buckets: see the
/// [module docs](super).
///
/// Its error is [`Error`]: a refusal ([`RateLimited`], [`UpstreamUnavailable`](super::UpstreamUnavailable)) or the inner
/// service's error. Clones share one state (store, buckets, breakers) behind an `Arc`.
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

impl Shared {
    /// The limits of the buckets, in order.
    fn limits(buckets: &[Bucket]) -> Vec<Limit<'_>> {
        buckets
            .iter()
            .map(|b| Limit::new(&b.key, &b.quota, b.cost))
            .collect()
    }

    /// Waits for room in every bucket (or fails with `RateLimited`).
    async fn acquire(&self, buckets: &[Bucket]) -> Result<(), Error> {
        if buckets.is_empty() {
            return Ok(());
        }
        let max_wait = match self.mode {
            Mode::Wait(d) => d,
            Mode::Reject => Duration::ZERO,
        };
        let limited = |retry_after| {
            Error::from(RateLimited {
                bucket: buckets[0].key.clone(),
                retry_after,
            })
        };
        match wait::acquire(&self.store, &Self::limits(buckets), max_wait).await {
            Ok(waited) => {
                for b in buckets {
                    metrics::histogram!(m::WAIT_SECONDS, "bucket" => Arc::clone(&b.label))
                        .record(waited.as_secs_f64());
                }
                Ok(())
            }
            Err(Refused::Limited { retry_after }) => Err(limited(retry_after)),
            // The outbound layer decides locally while the store is away: never refused for it.
            Err(Refused::Unavailable) => Err(limited(Some(self.store.retry_after_unavailable()))),
        }
    }

    /// Whether any of the buckets is paused now.
    async fn paused(&self, buckets: &[Bucket]) -> bool {
        wait::paused(&self.store, &Self::limits(buckets)).await
    }

    /// Pauses every bucket for what the upstream said.
    async fn adapt(&self, buckets: &[Bucket], status: StatusCode, headers: &HeaderMap) -> bool {
        let Some(signal) = signal(status, headers, SystemTime::now()) else {
            return false;
        };
        for b in buckets {
            if signal.limited {
                metrics::counter!(m::UPSTREAM_LIMITED_TOTAL, "bucket" => Arc::clone(&b.label))
                    .increment(1);
            }
            wait::pause(&self.store, &b.key, &b.quota, signal.pause).await;
        }
        tracing::debug!(pause = ?signal.pause, limited = signal.limited, "upstream asked to slow down");
        signal.limited
    }
}

/// One way of sending a request: the wrapped service, or the rest of a middleware chain.
pub(crate) trait Sender<Req> {
    type Response: OutboundResponse;

    fn send(
        &mut self,
        request: Req,
    ) -> impl Future<Output = Result<Self::Response, BoxError>> + Send;
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

impl Shared {
    /// Sends `request` within its buckets: the upstream failure breaker, the wait, the cap on
    /// calls in flight, the upstream's signals, the bounded retries of a refused call. The one
    /// loop of the tower service and the middleware.
    pub(crate) async fn send<Req, T>(
        &self,
        buckets: &[Bucket],
        mut request: Req,
        sender: &mut T,
    ) -> Result<T::Response, Error>
    where
        Req: OutboundRequest,
        T: Sender<Req>,
    {
        let mut attempt = 0;
        loop {
            if let Some(failures) = &self.failures {
                failures.check(&self.store, buckets).await?;
            }
            self.acquire(buckets).await?;
            let _permit = match &self.in_flight {
                Some(sem) => match Arc::clone(sem).try_acquire_owned() {
                    Ok(permit) => Some(permit),
                    Err(_) => {
                        let permit = Arc::clone(sem)
                            .acquire_owned()
                            .await
                            .map_err(Error::inner)?;
                        if self.paused(buckets).await {
                            // The upstream asked for a pause while this call queued for a slot:
                            // wait for a place after it instead of sending now.
                            continue;
                        }
                        Some(permit)
                    }
                },
                None => None,
            };
            let again = if attempt < self.retries {
                request.try_clone()
            } else {
                None
            };
            let sent = sender.send(request).await;
            if let Some(failures) = &self.failures {
                let failed = sent.as_ref().map_or(true, |r| r.status().is_server_error());
                failures.record(&self.store, buckets, failed).await;
            }
            let response = sent.map_err(Error::inner)?;
            let refused = self
                .adapt(buckets, response.status(), response.headers())
                .await;
            match again {
                Some(next) if refused => {
                    attempt += 1;
                    request = next;
                }
                _ => return Ok(response),
            }
        }
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
