//! [`GuardedStore`]: a store behind its timeout, circuit breaker and failure policy, with the
//! store metrics. Every front end (the inbound layer, the outbound layer, the [`Limiter`]) decides
//! through one of these, so the failure policy exists once.
//!
//! [`Limiter`]: super::Limiter

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tollgate_core::{
    DynStore, Lease, LeaseId, Leased, Limit, MemoryStore, Quota, Reservation, Reserve, Stopwatch,
    StoreError, Verdict,
};

use super::breaker::{Admission, BreakerConfig, CircuitBreaker};
use crate::metrics as m;

/// The default bound on one store call, failure policy included (the inbound layer's and the
/// [`Limiter`](super::Limiter)'s).
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_millis(50);

/// The longest store timeout accepted; longer ones are cut to it. A rate limiter that waits
/// minutes for its store has stopped protecting anything.
pub const MAX_STORE_TIMEOUT: Duration = Duration::from_secs(60);

/// `timeout` cut to [`MAX_STORE_TIMEOUT`], with a warning when it is (the builders' `timeout`;
/// the YAML refuses a longer `timeout_ms` outright).
pub(crate) fn capped_timeout(timeout: Duration) -> Duration {
    if timeout > MAX_STORE_TIMEOUT {
        tracing::warn!(
            asked = ?timeout,
            used = ?MAX_STORE_TIMEOUT,
            "store timeout longer than the maximum: using the maximum"
        );
    }
    timeout.min(MAX_STORE_TIMEOUT)
}

/// What a front end does when its store fails or times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnStoreError {
    /// Let the request through (counted as `store_error`).
    FailOpen,
    /// Refuse it (the inbound layer answers 503 with `Retry-After`).
    FailClosed,
    /// Decide in a local in-memory store while a circuit breaker keeps the failing store aside;
    /// the breaker probes it again and closes once it answers.
    #[default]
    Local,
}

impl std::str::FromStr for OnStoreError {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fail_open" => Ok(OnStoreError::FailOpen),
            "fail_closed" => Ok(OnStoreError::FailClosed),
            "local" => Ok(OnStoreError::Local),
            other => Err(format!(
                "unknown on_error `{other}`: expected fail_open, fail_closed or local"
            )),
        }
    }
}

/// The answer of a guarded store call.
#[derive(Debug)]
pub(crate) enum Guarded<T> {
    /// The store's own.
    Store(T),
    /// The local fallback's, while the store is unavailable (`OnStoreError::Local`).
    Local(T),
    /// The store is unavailable and the policy lets the request through.
    Open,
    /// The store is unavailable and the policy refuses the request.
    Closed,
}

impl<T> Guarded<T> {
    /// The same answer with its value mapped.
    pub(crate) fn map<U>(self, f: impl FnOnce(T) -> U) -> Guarded<U> {
        match self {
            Guarded::Store(t) => Guarded::Store(f(t)),
            Guarded::Local(t) => Guarded::Local(f(t)),
            Guarded::Open => Guarded::Open,
            Guarded::Closed => Guarded::Closed,
        }
    }
}

/// A store behind its timeout, circuit breaker and failure policy.
pub(crate) struct GuardedStore {
    store: Arc<dyn DynStore>,
    kind: &'static str,
    fallback: MemoryStore,
    breaker: CircuitBreaker,
    on_error: OnStoreError,
    timeout: Duration,
    /// `rate_limiter_store_latency_seconds{store}`, registered on first use.
    latency: OnceLock<metrics::Histogram>,
}

impl std::fmt::Debug for GuardedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedStore")
            .field("store", &self.kind)
            .field("on_error", &self.on_error)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// How a [`GuardedStore`] is set up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Guard {
    pub(crate) on_error: OnStoreError,
    pub(crate) timeout: Duration,
    pub(crate) breaker: BreakerConfig,
    pub(crate) fallback_max_keys: usize,
}

impl GuardedStore {
    pub(crate) fn new(store: Arc<dyn DynStore>, guard: Guard) -> GuardedStore {
        GuardedStore {
            kind: store.kind_dyn(),
            store,
            fallback: MemoryStore::builder()
                .max_keys(guard.fallback_max_keys)
                .build(),
            breaker: CircuitBreaker::new(guard.breaker),
            on_error: guard.on_error,
            timeout: guard.timeout,
            latency: OnceLock::new(),
        }
    }

    /// The store's kind (`memory`, `redis`), the `store` label of the metrics.
    pub(crate) fn kind(&self) -> &'static str {
        self.kind
    }

    /// The failure policy.
    pub(crate) fn on_error(&self) -> OnStoreError {
        self.on_error
    }

    /// How long a caller refused under `fail_closed` should wait: until the breaker probes the
    /// store again, and at least a second.
    pub(crate) fn retry_after_unavailable(&self) -> Duration {
        self.breaker.config().open_for.max(Duration::from_secs(1))
    }

    /// Decides at once when the store needs no I/O (`MemoryStore`); `None` otherwise.
    pub(crate) fn decide_now(&self, limits: &[Limit<'_>]) -> Option<Guarded<Verdict>> {
        let started = Stopwatch::start();
        let result = self.store.decide_now_dyn(limits)?;
        self.latency().record(started.elapsed().as_secs_f64());
        Some(match result {
            Ok(verdict) => Guarded::Store(verdict),
            Err(error) => {
                self.failed(&error, Admission::Store);
                self.unavailable(|fallback| fallback.decide_now(limits))
            }
        })
    }

    /// Peeks at once when the store needs no I/O (`MemoryStore`); `None` otherwise.
    pub(crate) fn peek_now(&self, limits: &[Limit<'_>]) -> Option<Guarded<Verdict>> {
        let result = self.store.peek_now_dyn(limits)?;
        Some(match result {
            Ok(verdict) => Guarded::Store(verdict),
            Err(error) => {
                self.failed(&error, Admission::Store);
                self.unavailable(|fallback| fallback.peek_now(limits))
            }
        })
    }

    /// Decides `limits` and takes a lease of `lease`, at once, when the store needs no I/O;
    /// `None` otherwise.
    pub(crate) fn decide_leased_now(
        &self,
        limits: &[Limit<'_>],
        lease: &Lease<'_>,
    ) -> Option<Guarded<Leased>> {
        let started = Stopwatch::start();
        let result = self.store.decide_leased_now_dyn(limits, lease)?;
        self.latency().record(started.elapsed().as_secs_f64());
        Some(match result {
            Ok(leased) => Guarded::Store(leased),
            Err(error) => {
                self.failed(&error, Admission::Store);
                self.unavailable(|fallback| fallback.decide_leased_now(limits, lease))
            }
        })
    }

    /// Decides `limits` and takes a lease of `lease` in one atomic step, guarded like
    /// [`decide`](Self::decide). A lease taken in the fallback ([`Guarded::Local`]) is given back
    /// to the fallback ([`release`](Self::release) with `local`).
    pub(crate) async fn decide_leased(
        &self,
        limits: &[Limit<'_>],
        lease: &Lease<'_>,
    ) -> Guarded<Leased> {
        self.call(self.store.decide_leased_boxed(limits, lease), |fallback| {
            fallback.decide_leased_now(limits, lease)
        })
        .await
    }

    /// Gives a lease back without waiting, if it can: taken in the fallback (`local`), or in a
    /// store that needs no I/O. `false` when it needs [`release`](Self::release).
    pub(crate) fn release_now(&self, key: &str, id: LeaseId, local: bool) -> bool {
        if local {
            self.fallback.release_now(key, id);
            return true;
        }
        let result = self.store.release_now_dyn(key, id);
        match result {
            Some(Ok(())) => true,
            Some(Err(error)) => {
                self.compensation_failed("release", &error);
                true
            }
            None => false,
        }
    }

    /// Gives a lease back. Best effort: a failure leaves the lease held until it expires (the
    /// caller has one request fewer until then), and is logged and counted
    /// (`rate_limiter_store_compensation_errors_total{op="release"}`).
    pub(crate) async fn release(&self, key: &str, id: LeaseId, local: bool) {
        if self.release_now(key, id, local) {
            return;
        }
        let result = tokio::time::timeout(self.timeout, self.store.release_boxed(key, id))
            .await
            .unwrap_or_else(|_| Err(StoreError::timeout()));
        if let Err(error) = result {
            self.compensation_failed("release", &error);
        }
    }

    /// Decides `limits`, all or nothing, under the breaker, the timeout and the failure policy.
    pub(crate) async fn decide(&self, limits: &[Limit<'_>]) -> Guarded<Verdict> {
        self.call(self.store.decide_boxed(limits), |fallback| {
            fallback.decide_now(limits)
        })
        .await
    }

    /// Reserves a place for `limits` within `max_wait`, guarded like [`decide`](Self::decide).
    /// A place reserved in the fallback ([`Guarded::Local`]) is given back to the fallback
    /// ([`cancel`](Self::cancel) with `local`).
    pub(crate) async fn reserve(
        &self,
        limits: &[Limit<'_>],
        max_wait: Duration,
    ) -> Guarded<Reserve> {
        self.call(self.store.reserve_boxed(limits, max_wait), |fallback| {
            fallback.reserve_now(limits, max_wait)
        })
        .await
    }

    /// What `limits` would say now, without charging (a store failure asks the fallback).
    pub(crate) async fn peek(&self, limits: &[Limit<'_>]) -> Guarded<Verdict> {
        self.call(self.store.peek_boxed(limits), |fallback| {
            fallback.peek_now(limits)
        })
        .await
    }

    /// Gives a reserved place back where it was taken. Best effort: a failure leaves the place
    /// taken until its time passes (later callers wait longer than they need to), and is logged
    /// and counted (`rate_limiter_store_compensation_errors_total{op="cancel"}`).
    pub(crate) async fn cancel(&self, reservation: &Reservation, local: bool) {
        if reservation.held().is_empty() {
            return;
        }
        if local {
            self.fallback.cancel_now(reservation);
            return;
        }
        let result = tokio::time::timeout(self.timeout, self.store.cancel_boxed(reservation))
            .await
            .unwrap_or_else(|_| Err(StoreError::timeout()));
        if let Err(error) = result {
            self.compensation_failed("cancel", &error);
        }
    }

    /// Pauses `key` for `duration` in the store (fleet-wide through a shared store); if the store
    /// fails, in the fallback, so this process pauses at least.
    pub(crate) async fn pause(&self, key: &str, quota: &Quota, duration: Duration) {
        let result =
            tokio::time::timeout(self.timeout, self.store.pause_boxed(key, quota, duration))
                .await
                .unwrap_or_else(|_| Err(StoreError::timeout()));
        if let Err(error) = result {
            tracing::warn!(%error, store = self.kind, "cannot pause a key in the store; pausing it here");
            self.fallback.pause_now(key, quota, duration);
        }
    }

    /// A compensating write (a give-back) failed: said and counted, never dropped in silence.
    pub(crate) fn compensation_failed(&self, op: &'static str, error: &dyn std::fmt::Display) {
        tracing::warn!(store = self.kind, op, "cannot give a charge back: {error}");
        metrics::counter!(m::COMPENSATION_ERRORS_TOTAL, "store" => self.kind, "op" => op)
            .increment(1);
    }

    /// One guarded store call: the breaker admits it (or the fallback answers), the timeout bounds
    /// it, its latency is recorded and its failure counted; the failure policy answers a failure.
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
        fallback: impl FnOnce(&MemoryStore) -> T,
    ) -> Guarded<T> {
        let admission = self.breaker.admit();
        if admission == Admission::Fallback {
            return self.unavailable(fallback);
        }
        let started = Stopwatch::start();
        let result = tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or_else(|_| Err(StoreError::timeout()));
        self.latency().record(started.elapsed().as_secs_f64());
        match result {
            Ok(answer) => {
                self.breaker.on_success(admission);
                self.circuit_gauge();
                Guarded::Store(answer)
            }
            Err(error) => {
                self.failed(&error, admission);
                self.unavailable(fallback)
            }
        }
    }

    fn failed(&self, error: &StoreError, admission: Admission) {
        metrics::counter!(m::STORE_ERRORS_TOTAL, "store" => self.kind).increment(1);
        tracing::warn!(store = self.kind, error = %error, "rate-limit store failed");
        self.breaker.on_failure(admission);
        self.circuit_gauge();
    }

    fn unavailable<T>(&self, fallback: impl FnOnce(&MemoryStore) -> T) -> Guarded<T> {
        match self.on_error {
            OnStoreError::Local => Guarded::Local(fallback(&self.fallback)),
            OnStoreError::FailOpen => Guarded::Open,
            OnStoreError::FailClosed => Guarded::Closed,
        }
    }

    fn latency(&self) -> &metrics::Histogram {
        self.latency
            .get_or_init(|| metrics::histogram!(m::STORE_LATENCY_SECONDS, "store" => self.kind))
    }

    fn circuit_gauge(&self) {
        metrics::gauge!(m::CIRCUIT_OPEN, "store" => self.kind).set(if self.breaker.is_open() {
            1.0
        } else {
            0.0
        });
    }
}
