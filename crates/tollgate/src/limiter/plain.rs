//! The plain [`Limiter`] and its builder: named limits over a guarded store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tollgate_core::{Decision, DynStore, MemoryStore, Quota, Store};

use super::blocking::Blocking;
use super::breaker::BreakerConfig;
use super::error::LimitError;
use super::guarded::{DEFAULT_STORE_TIMEOUT, Guard, GuardedStore, OnStoreError};
use super::limits::Limits;
use super::request::{Grant, Request};
use super::reserved::Reserved;
use super::runtime::OwnRuntime;

/// Limits any work by named limits and identities: see the [module docs](super). Cheap to clone;
/// clones share one store and one set of limits.
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Limits>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.inner, f)
    }
}

/// Builds a [`Limiter`].
pub struct LimiterBuilder {
    limits: Vec<(String, Quota)>,
    store: Option<Arc<dyn DynStore>>,
    guard: Guard,
    runtime: Option<OwnRuntime>,
}

impl std::fmt::Debug for LimiterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimiterBuilder")
            .field("limits", &self.limits.len())
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}

impl LimiterBuilder {
    /// Adds the limit `name`: every identity gets its own `quota` under it.
    pub fn limit(mut self, name: &str, quota: Quota) -> Self {
        self.limits.push((name.to_owned(), quota));
        self
    }

    /// Where the limit state lives (default: a [`MemoryStore`] of this process). A Redis store
    /// shares it with every process using the same server and prefix.
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// A store already shared as `Arc<dyn DynStore>`.
    pub fn shared_store(mut self, store: Arc<dyn DynStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Builds the store with `make` inside the runtime of the [blocking forms](Limiter::blocking),
    /// for a limiter used from synchronous code with a store that needs a runtime (a Redis store
    /// opens its connection on the runtime it is built in). Starts that runtime: one worker
    /// thread, `tollgate-limiter`.
    pub fn store_with<S: Store, E>(
        mut self,
        make: impl FnOnce() -> Result<S, E>,
    ) -> Result<Self, LimitError>
    where
        E: std::fmt::Display,
    {
        let runtime = match self.runtime.take() {
            Some(runtime) => runtime,
            None => OwnRuntime::start()?,
        };
        let store = {
            let _entered = runtime.get()?.enter();
            make().map_err(|e| LimitError::Store(e.to_string()))?
        };
        self.store = Some(Arc::new(store));
        self.runtime = Some(runtime);
        Ok(self)
    }

    /// What to do when the store fails or times out (default [`OnStoreError::Local`]).
    pub fn on_store_error(mut self, on_error: OnStoreError) -> Self {
        self.guard.on_error = on_error;
        self
    }

    /// The longest one store call may take before the failure policy answers (default 50 ms, at
    /// most [`MAX_STORE_TIMEOUT`](super::MAX_STORE_TIMEOUT)). Give a Redis store the
    /// same timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.guard.timeout = super::guarded::capped_timeout(timeout);
        self
    }

    /// When the circuit breaker in front of the store opens and how long before it probes again.
    pub fn breaker(mut self, config: BreakerConfig) -> Self {
        self.guard.breaker = config;
        self
    }

    /// Builds the limiter; a limit name given twice, or an empty one, is an error.
    pub fn build(self) -> Result<Limiter, LimitError> {
        let mut limits = HashMap::with_capacity(self.limits.len());
        for (name, quota) in self.limits {
            if name.is_empty() || name.contains(['{', '}']) {
                return Err(LimitError::InvalidLimitName { name });
            }
            if limits
                .insert(Arc::<str>::from(name.as_str()), quota)
                .is_some()
            {
                return Err(LimitError::DuplicateLimit { name });
            }
        }
        let store = self.store.unwrap_or_else(|| Arc::new(MemoryStore::new()));
        Ok(Limiter {
            inner: Arc::new(Limits::new(
                Arc::new(GuardedStore::new(store, self.guard)),
                limits,
                self.runtime,
            )),
        })
    }
}

impl Limiter {
    /// Starts a limiter.
    pub fn builder() -> LimiterBuilder {
        LimiterBuilder {
            limits: Vec::new(),
            store: None,
            guard: Guard {
                on_error: OnStoreError::default(),
                timeout: DEFAULT_STORE_TIMEOUT,
                breaker: BreakerConfig::default(),
                fallback_max_keys: tollgate_core::DEFAULT_MAX_KEYS,
            },
            runtime: None,
        }
    }

    /// The blocking forms of the calls, for synchronous code with no async runtime of its own
    /// (an SDK hook, a thread pool): see [`Blocking`].
    pub fn blocking(&self) -> Blocking<'_> {
        Blocking::new(&self.inner)
    }

    /// The quota of a limit, if there is one by that name.
    pub fn quota(&self, limit: &str) -> Option<&Quota> {
        self.inner.quota(limit)
    }

    /// A call over several limits of one identity (all or nothing), with a cost.
    pub fn request<'a>(&'a self, limits: &'a [&'a str], identity: &'a str) -> Request<'a> {
        Request::new(&self.inner, limits, identity)
    }

    /// Decides one call of `identity` under `limit` now.
    pub async fn check(&self, limit: &str, identity: &str) -> Result<Grant, LimitError> {
        self.request(&[limit], identity).check().await
    }

    /// Waits up to `max_wait` for `identity`'s turn under `limit`. When the wait would be longer,
    /// fails at once with [`RateLimited`](super::RateLimited), consuming nothing; dropping the
    /// future while it waits gives its place back.
    ///
    /// The [`Grant`]'s figures are read back from the store after the wait (one store call more
    /// than [`reserve`](Self::reserve) followed by [`Reserved::wait`], which reports none).
    pub async fn acquire(
        &self,
        limit: &str,
        identity: &str,
        max_wait: Duration,
    ) -> Result<Grant, LimitError> {
        self.request(&[limit], identity).acquire(max_wait).await
    }

    /// Takes a place in line for `identity` under `limit`, at most `max_wait` ahead: see
    /// [`Reserved`].
    pub async fn reserve(
        &self,
        limit: &str,
        identity: &str,
        max_wait: Duration,
    ) -> Result<Reserved, LimitError> {
        self.request(&[limit], identity).reserve(max_wait).await
    }

    /// Lets nobody pass `identity`'s `limit` for `duration` (fleet-wide through a shared store),
    /// as when an upstream answers 429 with `Retry-After`. Waits in progress take a place after
    /// the pause.
    pub async fn pause(
        &self,
        limit: &str,
        identity: &str,
        duration: Duration,
    ) -> Result<(), LimitError> {
        self.inner.pause(limit, identity, duration).await
    }

    /// Where `identity` stands under `limit`, charging nothing: `remaining` is how many unit-cost
    /// calls would pass now, `reset_after` when the limit is whole again.
    pub async fn peek(&self, limit: &str, identity: &str) -> Result<Decision, LimitError> {
        self.request(&[limit], identity).cost(0).peek().await
    }
}
