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

mod upstream;

pub use upstream::{
    MAX_PAUSE, UpstreamSignal, parse_http_date, parse_retry_after, reset_delay, signal,
};

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, StatusCode};
use tollgate_core::{DynStore, Limit, MemoryStore, Quota, Reservation, Reserve, Store};
use tower_layer::Layer;
use tower_service::Service;

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
    store: Arc<dyn DynStore>,
    fallback: MemoryStore,
    mode: Mode,
    retries: u32,
    in_flight: Option<Arc<tokio::sync::Semaphore>>,
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
        }
    }
}

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

    /// Builds the layer.
    pub fn build(self) -> RateLimitLayer<Sel> {
        RateLimitLayer {
            shared: Arc::new(Shared {
                store: self.store.unwrap_or_else(|| Arc::new(MemoryStore::new())),
                fallback: MemoryStore::new(),
                mode: self.mode,
                retries: self.retries,
                in_flight: self
                    .in_flight
                    .map(|n| Arc::new(tokio::sync::Semaphore::new(n))),
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

/// Gives a reservation back if the call is dropped while it waits.
struct CancelOnDrop {
    store: Arc<dyn DynStore>,
    reservation: Option<Reservation>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        if reservation.held().is_empty() {
            return;
        }
        let store = Arc::clone(&self.store);
        let kind = store.kind_dyn();
        // A place that cannot be given back stays taken until its time passes: later calls wait
        // longer than they need to. Said and counted, never dropped in silence.
        let failed = move |why: &dyn fmt::Display| {
            tracing::warn!(
                store = kind,
                "cannot give a dropped call's place back: {why}"
            );
            metrics::counter!(m::COMPENSATION_ERRORS_TOTAL, "store" => kind, "op" => "cancel")
                .increment(1);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    if let Err(e) = store.cancel_boxed(&reservation).await {
                        failed(&e);
                    }
                });
            }
            Err(e) => failed(&e),
        }
    }
}

impl Shared {
    /// Waits for room in every bucket (or fails with `RateLimited`).
    async fn acquire(&self, buckets: &[Bucket]) -> Result<(), BoxError> {
        if buckets.is_empty() {
            return Ok(());
        }
        let limits: Vec<Limit<'_>> = buckets
            .iter()
            .map(|b| Limit::new(&b.key, &b.quota, b.cost))
            .collect();
        let limited = |retry_after| -> BoxError {
            Box::new(RateLimited {
                bucket: buckets[0].key.clone(),
                retry_after,
            })
        };
        let started = Instant::now();
        let max_wait = match self.mode {
            Mode::Wait(d) => d,
            Mode::Reject => Duration::ZERO,
        };
        let deadline = started + max_wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = match self.store.reserve_boxed(&limits, left).await {
                Ok(answer) => answer,
                Err(error) => {
                    // The shared store is down: keep the process within its buckets on its own.
                    tracing::warn!(%error, "outbound rate-limit store failed; limiting locally");
                    self.fallback.reserve_now(&limits, left)
                }
            };
            match answer {
                Reserve::Granted(reservation) => {
                    let wait = reservation.wait();
                    let mut guard = CancelOnDrop {
                        store: Arc::clone(&self.store),
                        reservation: Some(reservation),
                    };
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                        // The place's time has come: it is not given back from here on.
                        guard.reservation = None;
                        if self.paused(buckets).await {
                            // An upstream paused a bucket while this call waited (here or in
                            // another process): its place is before the pause end, so it must
                            // not be used. Forget it (giving it back could undo part of the
                            // pause) and take a place after the pause.
                            continue;
                        }
                    }
                    guard.reservation = None;
                    for b in buckets {
                        metrics::histogram!(m::WAIT_SECONDS, "bucket" => Arc::clone(&b.label))
                            .record(started.elapsed().as_secs_f64());
                    }
                    return Ok(());
                }
                Reserve::Retry { after } if after <= left => tokio::time::sleep(after).await,
                Reserve::Retry { after } => return Err(limited(Some(after))),
                Reserve::WouldExceed { retry_after } => return Err(limited(Some(retry_after))),
                Reserve::Never => return Err(limited(None)),
            }
        }
    }

    /// Whether any of the buckets is paused now (its pause marker has no room), as a call that
    /// held a place while it slept checks before it is sent.
    async fn paused(&self, buckets: &[Bucket]) -> bool {
        let markers: Vec<String> = buckets.iter().map(|b| pause_marker(&b.key)).collect();
        let limits: Vec<Limit<'_>> = markers
            .iter()
            .zip(buckets)
            .map(|(key, b)| Limit::new(key, &b.quota, 1))
            .collect();
        let verdict = match self.store.peek_boxed(&limits).await {
            Ok(verdict) => verdict,
            Err(_) => self.fallback.peek_now(&limits),
        };
        // A shaping (leaky) bucket admits with a delay what a token bucket refuses.
        !verdict.is_allowed() || !verdict.delay().is_zero()
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
            // The bucket itself, so new calls take places after the pause, and its marker, so
            // the calls already holding a place before the pause end see it and wait too.
            for key in [b.key.clone(), pause_marker(&b.key)] {
                if let Err(error) = self.store.pause_boxed(&key, &b.quota, signal.pause).await {
                    tracing::warn!(%error, bucket = %b.label, "cannot pause the bucket in the store");
                    self.fallback.pause_now(&key, &b.quota, signal.pause);
                }
            }
        }
        tracing::debug!(pause = ?signal.pause, limited = signal.limited, "upstream asked to slow down");
        signal.limited
    }
}

/// The key marking a bucket's pause: only `Shared::adapt` writes it (a pause), so a peek of one
/// unit is refused exactly until the pause ends (a token bucket paused until `t` lets its first
/// unit through at `t`). The suffix keeps any `{hash tag}` of the key, so on Redis Cluster the
/// marker lives in the bucket's slot.
fn pause_marker(key: &str) -> String {
    format!("{key}:paused")
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
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = Arc::clone(&self.shared);
        let buckets = self.select.select(&request);
        Box::pin(async move {
            let mut request = request;
            let mut ready = true; // `poll_ready` was called on `inner` before `call`
            let mut attempt = 0;
            loop {
                shared.acquire(&buckets).await?;
                let _permit = match &shared.in_flight {
                    Some(sem) => match Arc::clone(sem).try_acquire_owned() {
                        Ok(permit) => Some(permit),
                        Err(_) => {
                            let permit = Arc::clone(sem)
                                .acquire_owned()
                                .await
                                .map_err(|e| -> BoxError { Box::new(e) })?;
                            if shared.paused(&buckets).await {
                                // The upstream asked for a pause while this call queued for a
                                // slot: wait for a place after it instead of sending now.
                                continue;
                            }
                            Some(permit)
                        }
                    },
                    None => None,
                };
                let again = if attempt < shared.retries {
                    request.try_clone()
                } else {
                    None
                };
                if !ready {
                    poll_fn(|cx| inner.poll_ready(cx))
                        .await
                        .map_err(Into::into)?;
                }
                let response = inner.call(request).await.map_err(Into::into)?;
                ready = false;
                let refused = shared
                    .adapt(&buckets, response.status(), response.headers())
                    .await;
                match again {
                    Some(next) if refused => {
                        attempt += 1;
                        request = next;
                    }
                    _ => return Ok(response),
                }
            }
        })
    }
}
