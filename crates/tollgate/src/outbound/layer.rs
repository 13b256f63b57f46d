//! The outbound [`RateLimitLayer`] and its builder.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tollgate_core::{DynStore, MemoryStore, Store};
use tower_layer::Layer;

use super::failures::{Failures, UpstreamBreaker};
use super::send::{Mode, Shared};
use super::service::RateLimit;
use crate::limiter::guarded::{Guard, GuardedStore};
use crate::limiter::{BreakerConfig, OnStoreError};

/// Rate-limits the calls of the client services it wraps. Clones share one state.
#[derive(Clone)]
pub struct RateLimitLayer<Sel> {
    pub(super) shared: Arc<Shared>,
    pub(super) select: Sel,
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
        if max == 0 {
            tracing::warn!("max_in_flight(0) would never send a call: using 1");
        }
        self.in_flight = Some(max.max(1));
        self
    }

    /// The longest one store call may take before the call decides in this process's memory
    /// instead (default [`DEFAULT_OUTBOUND_STORE_TIMEOUT`], at most
    /// [`MAX_STORE_TIMEOUT`](crate::limiter::MAX_STORE_TIMEOUT)).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = crate::limiter::guarded::capped_timeout(timeout);
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
                failures: self.upstream_breaker.map(Failures::new),
            }),
            select: self.select,
        }
    }
}

impl<S, Sel: Clone> Layer<S> for RateLimitLayer<Sel> {
    type Service = RateLimit<S, Sel>;

    fn layer(&self, inner: S) -> RateLimit<S, Sel> {
        RateLimit::from_parts(inner, Arc::clone(&self.shared), self.select.clone())
    }
}
