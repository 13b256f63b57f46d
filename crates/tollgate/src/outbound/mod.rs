//! The outbound layer: rate-limits the requests a client sends, so an upstream's limits are
//! respected by a whole fleet.
//!
//! Wrap any client service — `reqwest::Client` (feature `reqwest`), a hyper client, any
//! `Service<http::Request<B>>` — in [`RateLimitLayer`]. Every call draws from one or more
//! [`Bucket`]s, all or nothing (an API-wide bucket + an endpoint bucket + a per-user bucket), chosen
//! per request by a [`SelectBuckets`] (a closure will do).
//!
//! * **Wait** (default): reserve a place and sleep until it; if the wait would exceed `max_wait`,
//!   fail at once with [`RateLimited`] without consuming anything. Dropping the call while it
//!   waits gives its place back (when nobody reserved after it).
//! * **Reject**: fail fast with [`RateLimited`] when the bucket is empty.
//!
//! [`RateLimited`] is its own error type (`err.is::<RateLimited>()`), never a transport error:
//! *rate-limited is not failed* — reschedule the work without counting a failure.
//!
//! With a [`RedisStore`](tollgate_redis::RedisStore) every process draws from the same buckets;
//! with the default [`MemoryStore`], one process.
//!
//! **Adaptive**: every response is read. A `429` (or a `503` with `Retry-After`) pauses all the
//! request's buckets, fleet-wide through Redis, until the time the upstream gave (`Retry-After`
//! in seconds or as an HTTP-date; one second without a hint); a response saying the upstream's
//! quota is used up (`RateLimit: ...;r=0;t=N`, `X-RateLimit-Remaining: 0` with
//! `X-RateLimit-Reset` as delta, epoch seconds or epoch ms) pauses them the same way before a 429
//! happens. After a pause the bucket refills from empty, so the fleet resumes at the configured
//! rate instead of in a storm. Optionally a refused call is retried after the pause (a bounded
//! number of times, for requests that can be cloned), and the calls in flight are capped.
//!
//! ```
//! use std::time::Duration;
//! use tollgate::core::Quota;
//! use tollgate::outbound::{Bucket, RateLimitLayer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let github = Bucket::new("github:{installation-42}", Quota::per_hour(5000)?.with_burst(100)?);
//! let layer = RateLimitLayer::builder(github.fixed())
//!     .max_wait(Duration::from_secs(30))
//!     .retry_limited(2)
//!     .build();
//! // let client = tower::ServiceBuilder::new().layer(layer).service(reqwest::Client::new());
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```

mod failures;
#[cfg(feature = "reqwest-middleware")]
mod middleware;
mod upstream;

pub use failures::{UpstreamBreaker, UpstreamUnavailable};
#[cfg(feature = "reqwest-middleware")]
pub use middleware::RateLimitMiddleware;
pub use upstream::{
    MAX_PAUSE, UpstreamSignal, parse_http_date, parse_retry_after, reset_delay, signal,
};

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};
use tollgate_core::{DynStore, Limit, MemoryStore, Quota, Store};
use tower_layer::Layer;
use tower_service::Service;

use crate::limiter::BreakerConfig;
use crate::limiter::OnStoreError;
use crate::limiter::guarded::{Guard, GuardedStore};
use crate::limiter::wait::{self, Refused};
use crate::metrics as m;

/// A boxed error, as the outbound service returns ([`RateLimited`] or the inner service's error).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One bucket a call draws from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// The key shared by every process, such as `slack:tier2:workspace-a`. On Redis Cluster, give
    /// the buckets of one call the same hash tag (`{workspace-a}`) to decide them in one step.
    pub key: String,
    /// Its quota.
    pub quota: Quota,
    /// What one call costs (default 1).
    pub cost: u32,
    /// The `bucket` label of the metrics (default: the key). Keep it low-cardinality.
    pub label: Arc<str>,
}

impl Bucket {
    /// A bucket `key` with `quota`, cost 1.
    pub fn new(key: impl Into<String>, quota: Quota) -> Bucket {
        let key = key.into();
        Bucket {
            label: key.as_str().into(),
            key,
            quota,
            cost: 1,
        }
    }

    /// Each call costs `cost`.
    pub fn cost(mut self, cost: u32) -> Bucket {
        self.cost = cost;
        self
    }

    /// The `bucket` label of the metrics.
    pub fn label(mut self, label: &str) -> Bucket {
        self.label = label.into();
        self
    }

    /// A selector giving this bucket to every call.
    pub fn fixed(self) -> FixedBuckets {
        FixedBuckets(Arc::new(vec![self]))
    }
}

/// Chooses the buckets of a call. Implemented for closures `Fn(&Req) -> Vec<Bucket>`.
pub trait SelectBuckets<Req>: Clone + Send + Sync + 'static {
    /// The buckets `request` draws from (all or nothing).
    fn select(&self, request: &Req) -> Vec<Bucket>;
}

impl<Req, F> SelectBuckets<Req> for F
where
    F: Fn(&Req) -> Vec<Bucket> + Clone + Send + Sync + 'static,
{
    fn select(&self, request: &Req) -> Vec<Bucket> {
        self(request)
    }
}

/// The same buckets for every call.
#[derive(Debug, Clone)]
pub struct FixedBuckets(Arc<Vec<Bucket>>);

impl FixedBuckets {
    /// Every call draws from all of `buckets`.
    pub fn new(buckets: Vec<Bucket>) -> FixedBuckets {
        FixedBuckets(Arc::new(buckets))
    }
}

impl<Req> SelectBuckets<Req> for FixedBuckets {
    fn select(&self, _request: &Req) -> Vec<Bucket> {
        self.0.as_ref().clone()
    }
}

/// One bucket per upstream host: `PREFIX:HOST` with `quota`.
#[derive(Debug, Clone)]
pub struct PerHost {
    prefix: Arc<str>,
    quota: Quota,
}

impl PerHost {
    /// Buckets `prefix:host`.
    pub fn new(prefix: &str, quota: Quota) -> PerHost {
        PerHost {
            prefix: prefix.into(),
            quota,
        }
    }
}

impl<Req: OutboundRequest> SelectBuckets<Req> for PerHost {
    fn select(&self, request: &Req) -> Vec<Bucket> {
        let host = request.host().unwrap_or("unknown");
        vec![Bucket::new(format!("{}:{host}", self.prefix), self.quota).label(&self.prefix)]
    }
}

/// A request the outbound layer can send: where it goes, and whether it can be sent twice.
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

/// The call was not sent: its bucket has no room in time. Not a transport failure; reschedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimited {
    /// The bucket that had no room (the first of the call's buckets).
    pub bucket: String,
    /// When a call of the same cost could go, if it can at all (`None`: the cost exceeds the
    /// bucket's capacity).
    pub retry_after: Option<Duration>,
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.retry_after {
            Some(d) => write!(
                f,
                "rate limited by bucket `{}`: retry in {d:?}",
                self.bucket
            ),
            None => write!(
                f,
                "rate limited by bucket `{}`: the call costs more than the bucket holds",
                self.bucket
            ),
        }
    }
}

impl std::error::Error for RateLimited {}

/// How a call waits for its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Wait for a place, up to this long; beyond it fail at once with [`RateLimited`].
    Wait(Duration),
    /// Never wait: fail with [`RateLimited`] when there is no room now.
    Reject,
}

struct Shared {
    /// The store behind its timeout, breaker and local fallback.
    store: Arc<GuardedStore>,
    mode: Mode,
    retries: u32,
    in_flight: Option<Arc<tokio::sync::Semaphore>>,
    /// The upstream failure breaker, when on.
    failures: Option<failures::Failures>,
}

/// Rate-limits the calls of the client services it wraps. Clones share one state.
#[derive(Clone)]
pub struct RateLimitLayer<Sel> {
    shared: Arc<Shared>,
    select: Sel,
}

impl<Sel> fmt::Debug for RateLimitLayer<Sel> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("mode", &self.shared.mode)
            .field("retries", &self.shared.retries)
            .finish_non_exhaustive()
    }
}

/// Builds an outbound [`RateLimitLayer`].
pub struct RateLimitLayerBuilder<Sel> {
    select: Sel,
    store: Option<Arc<dyn DynStore>>,
    mode: Mode,
    retries: u32,
    in_flight: Option<usize>,
    timeout: Duration,
    breaker: BreakerConfig,
    upstream_breaker: Option<UpstreamBreaker>,
}

impl<Sel> fmt::Debug for RateLimitLayerBuilder<Sel> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayerBuilder")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl<Sel> RateLimitLayer<Sel> {
    /// Starts a layer whose calls draw from the buckets `select` chooses.
    pub fn builder(select: Sel) -> RateLimitLayerBuilder<Sel> {
        RateLimitLayerBuilder {
            select,
            store: None,
            mode: Mode::Wait(Duration::from_secs(30)),
            retries: 0,
            in_flight: None,
            timeout: DEFAULT_OUTBOUND_STORE_TIMEOUT,
            breaker: BreakerConfig::default(),
            upstream_breaker: None,
        }
    }
}

/// The default bound on one store call of the outbound layer: generous, as calls wait anyway;
/// a Redis store's own timeout (50 ms by default) usually answers first.
pub const DEFAULT_OUTBOUND_STORE_TIMEOUT: Duration = Duration::from_secs(5);

impl<Sel> RateLimitLayerBuilder<Sel> {
    /// Where the buckets live (default: this process's memory). A Redis store shares them with
    /// every process.
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// Wait for a place up to `max_wait` (the default mode, 30 s).
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.mode = Mode::Wait(max_wait);
        self
    }

    /// Fail fast instead of waiting.
    pub fn reject(mut self) -> Self {
        self.mode = Mode::Reject;
        self
    }

    /// Send a call the upstream refused (429 / 503 + `Retry-After`) again after the pause, up to
    /// `attempts` more times, when the request can be cloned (default 0: hand the refusal back).
    pub fn retry_limited(mut self, attempts: u32) -> Self {
        self.retries = attempts;
        self
    }

    /// At most `max` calls in flight at once (default: no cap).
    pub fn max_in_flight(mut self, max: usize) -> Self {
        self.in_flight = Some(max.max(1));
        self
    }

    /// The longest one store call may take before the call decides in this process's memory
    /// instead (default [`DEFAULT_OUTBOUND_STORE_TIMEOUT`], at most
    /// [`MAX_STORE_TIMEOUT`](crate::limiter::MAX_STORE_TIMEOUT)).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.min(crate::limiter::MAX_STORE_TIMEOUT);
        self
    }

    /// When the circuit breaker in front of the store opens and how long before it probes the
    /// store again; while it is open, calls are limited in this process's memory.
    pub fn breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = config;
        self
    }

    /// Leaves an upstream alone for a while after it failed too often in a row (off by default):
    /// see [`UpstreamBreaker`].
    pub fn upstream_breaker(mut self, config: UpstreamBreaker) -> Self {
        self.upstream_breaker = Some(config);
        self
    }

    /// Builds the layer.
    pub fn build(self) -> RateLimitLayer<Sel> {
        let store = self.store.unwrap_or_else(|| Arc::new(MemoryStore::new()));
        RateLimitLayer {
            shared: Arc::new(Shared {
                store: Arc::new(GuardedStore::new(
                    store,
                    Guard {
                        on_error: OnStoreError::Local,
                        timeout: self.timeout,
                        breaker: self.breaker,
                        fallback_max_keys: tollgate_core::DEFAULT_MAX_KEYS,
                    },
                )),
                mode: self.mode,
                retries: self.retries,
                in_flight: self
                    .in_flight
                    .map(|n| Arc::new(tokio::sync::Semaphore::new(n))),
                failures: self.upstream_breaker.map(failures::Failures::new),
            }),
            select: self.select,
        }
    }
}

impl<S, Sel: Clone> Layer<S> for RateLimitLayer<Sel> {
    type Service = RateLimit<S, Sel>;

    fn layer(&self, inner: S) -> RateLimit<S, Sel> {
        RateLimit {
            inner,
            shared: Arc::clone(&self.shared),
            select: self.select.clone(),
        }
    }
}

/// A client service whose calls wait for (or are refused by) their buckets.
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
    async fn acquire(&self, buckets: &[Bucket]) -> Result<(), BoxError> {
        if buckets.is_empty() {
            return Ok(());
        }
        let max_wait = match self.mode {
            Mode::Wait(d) => d,
            Mode::Reject => Duration::ZERO,
        };
        let limited = |retry_after| -> BoxError {
            Box::new(RateLimited {
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
    ) -> Result<T::Response, BoxError>
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
                            .map_err(|e| -> BoxError { Box::new(e) })?;
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
            let response = sent?;
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
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = Arc::clone(&self.shared);
        let buckets = self.select.select(&request);
        Box::pin(async move {
            // `poll_ready` was called on `inner` before `call`.
            let mut sender = ServiceSender { inner, ready: true };
            shared.send(&buckets, request, &mut sender).await
        })
    }
}
