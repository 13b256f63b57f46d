//! The plain [`Limiter`]: rate-limit any work, not only HTTP stacks: an SDK call, a webhook
//! delivery, a queue consumer.
//!
//! A limiter holds **named limits**, each a [`Quota`], over a store (this process's memory by
//! default, or Redis to share the limits with a fleet). A call names a limit (or several) and an
//! **identity** (`"workspace-a"`, `"tenant-7:channel-3"`), and is decided all or nothing:
//!
//! | seed word | method | what it does |
//! |---|---|---|
//! | `Allow()` | [`check`](Limiter::check) | decide now: a [`Grant`], or [`RateLimited`] saying when to retry |
//! | `acquire(tokens, timeout)`, `Wait()` | [`acquire`](Limiter::acquire) | wait up to `max_wait` for the grant; fail at once, consuming nothing, if that is not enough |
//! | `Reserve()` | [`reserve`](Limiter::reserve) | a place in line ([`Reserved`]): `delay()`, `wait()`, `cancel()`; dropped unused, it is given back |
//! | upstream `Retry-After` | [`pause`](Limiter::pause) | nobody passes this identity's limit until then (fleet-wide through Redis) |
//! | several limits | [`request`](Limiter::request) | all or nothing, with a cost |
//!
//! ```
//! use std::time::Duration;
//! use tollgate::core::Quota;
//! use tollgate::limiter::Limiter;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let limiter = Limiter::builder()
//!     .limit("slack", Quota::per_second(1)?.with_burst(20)?)
//!     .limit("webhook", Quota::per_second(100)?.with_burst(10)?)
//!     .build()?;
//!
//! // Before each Slack call: wait up to 30 s for a token of this workspace.
//! limiter.acquire("slack", "tier2:workspace-a", Duration::from_secs(30)).await?;
//!
//! // A webhook delivery: decide now; rate-limited is not failed, reschedule it.
//! match limiter.check("webhook", "https://example.com/hook").await {
//!     Ok(_grant) => { /* deliver */ }
//!     Err(e) if e.is_rate_limited() => println!("later: {e}"),
//!     Err(e) => return Err(e.into()),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Keys
//!
//! Limit `NAME` of identity `ID` is stored under the key `{ID}:l:NAME`: every limit of one
//! identity shares the hash tag `{ID}`, so on Redis Cluster they live in one slot and a call
//! over several of them is one atomic script call. The identity is kept exactly (no lossy
//! decoding); one longer than 128 bytes is replaced by its 128-bit fingerprint, as inbound keys
//! are ([`bounded_key`]); an empty one, or one over
//! [`MAX_IDENTITY_LEN`] bytes, is an error.
//!
//! # Failures
//!
//! The store is behind the same timeout, circuit breaker and failure policy ([`OnStoreError`])
//! as the inbound layer: `local` (the default) decides in memory while the store is away,
//! `fail_open` grants, `fail_closed` answers [`LimitError::Unavailable`]. Never a panic, never a
//! hang past the timeout (a wait aside).
//!
//! # Metrics
//!
//! `rate_limiter_rejections_total{limit}` counts the [`RateLimited`] answers;
//! `rate_limiter_wait_seconds{bucket}` (the limit's name) how long [`acquire`](Limiter::acquire)
//! waited. The store metrics are the inbound layer's (`rate_limiter_store_*`,
//! `rate_limiter_circuit_open`).

pub(crate) mod guarded;
pub(crate) mod wait;

mod blocking;
mod error;

pub use blocking::{Blocking, BlockingRequest};
pub use error::{LimitError, RateLimited};
pub use guarded::{DEFAULT_STORE_TIMEOUT, MAX_STORE_TIMEOUT, OnStoreError};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate_core::{Decision, DynStore, Limit, MemoryStore, Quota, Reserve, Store, Verdict};

use crate::breaker::BreakerConfig;
use crate::http::key::bounded_key;
use crate::metrics as m;
use guarded::{Guard, Guarded, GuardedStore};
use wait::{Place, Refused};

/// The longest identity accepted, in bytes; longer ones are refused ([`LimitError::InvalidIdentity`]).
pub const MAX_IDENTITY_LEN: usize = 4096;

/// Limits any work by named limits and identities: see the [module docs](self). Cheap to clone;
/// clones share one store and one set of limits.
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<GuardedStore>,
    limits: HashMap<Arc<str>, Quota>,
    /// The runtime of the blocking forms, started on first use (or by
    /// [`LimiterBuilder::store_with`]).
    runtime: std::sync::OnceLock<blocking::OwnRuntime>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&str> = self.inner.limits.keys().map(|n| &**n).collect();
        names.sort_unstable();
        f.debug_struct("Limiter")
            .field("limits", &names)
            .field("store", &self.inner.store.kind())
            .finish_non_exhaustive()
    }
}

/// Builds a [`Limiter`].
pub struct LimiterBuilder {
    limits: Vec<(String, Quota)>,
    store: Option<Arc<dyn DynStore>>,
    guard: Guard,
    runtime: Option<blocking::OwnRuntime>,
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
            None => blocking::OwnRuntime::start()?,
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
    /// most [`MAX_STORE_TIMEOUT`]). Give a Redis store the
    /// same timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.guard.timeout = timeout.min(MAX_STORE_TIMEOUT);
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
        let runtime = std::sync::OnceLock::new();
        if let Some(own) = self.runtime {
            let _ = runtime.set(own);
        }
        Ok(Limiter {
            inner: Arc::new(Inner {
                store: Arc::new(GuardedStore::new(store, self.guard)),
                limits,
                runtime,
            }),
        })
    }
}

/// What a call that passed learns: the binding limit (the one closest to denial) as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The binding limit's name.
    pub limit: Arc<str>,
    /// How many more unit-cost calls would pass right now.
    pub remaining: u32,
    /// The time until the limit is whole again if nothing else arrives.
    pub reset_after: Duration,
    /// For a shaping (leaky bucket) limit, how long the call must wait for its turn before it
    /// goes ([`check`](Limiter::check) does not wait; [`acquire`](Limiter::acquire) did).
    pub delay: Duration,
    /// Whether the store failed and the failure policy let the call through (`fail_open`).
    pub store_error: bool,
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
        Blocking::new(self)
    }

    /// The quota of a limit, if there is one by that name.
    pub fn quota(&self, limit: &str) -> Option<&Quota> {
        self.inner.limits.get(limit)
    }

    /// A call over several limits of one identity (all or nothing), with a cost.
    pub fn request<'a>(&'a self, limits: &'a [&'a str], identity: &'a str) -> Request<'a> {
        Request {
            limiter: self,
            limits,
            identity,
            cost: 1,
        }
    }

    /// Decides one call of `identity` under `limit` now.
    pub async fn check(&self, limit: &str, identity: &str) -> Result<Grant, LimitError> {
        self.request(&[limit], identity).check().await
    }

    /// Waits up to `max_wait` for `identity`'s turn under `limit`. When the wait would be longer,
    /// fails at once with [`RateLimited`], consuming nothing; dropping the future while it waits
    /// gives its place back.
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
        let keys = self.keys(&[limit], identity)?;
        let (key, quota) = &keys[0];
        wait::pause(&self.inner.store, key, quota, duration).await;
        Ok(())
    }

    /// Where `identity` stands under `limit`, charging nothing: `remaining` is how many unit-cost
    /// calls would pass now, `reset_after` when the limit is whole again.
    pub async fn peek(&self, limit: &str, identity: &str) -> Result<Decision, LimitError> {
        self.request(&[limit], identity).cost(0).peek().await
    }

    /// The store keys and quotas of `limits` for `identity`, checked.
    fn keys(&self, limits: &[&str], identity: &str) -> Result<Vec<(String, Quota)>, LimitError> {
        if identity.is_empty() {
            return Err(LimitError::InvalidIdentity {
                reason: "it is empty",
            });
        }
        if identity.len() > MAX_IDENTITY_LEN {
            return Err(LimitError::InvalidIdentity {
                reason: "it is longer than MAX_IDENTITY_LEN bytes",
            });
        }
        if limits.is_empty() {
            return Err(LimitError::NoLimit);
        }
        let id = bounded_key(identity);
        limits
            .iter()
            .map(|name| {
                let quota =
                    self.inner
                        .limits
                        .get(*name)
                        .ok_or_else(|| LimitError::UnknownLimit {
                            name: (*name).to_owned(),
                        })?;
                let mut key = String::with_capacity(id.len() + name.len() + 5);
                key.push('{');
                key.push_str(&id);
                key.push_str("}:l:");
                key.push_str(name);
                Ok((key, *quota))
            })
            .collect()
    }

    /// The name the limiter holds for `name` (shared, for errors and metrics).
    fn name(&self, name: &str) -> Arc<str> {
        self.inner
            .limits
            .get_key_value(name)
            .map_or_else(|| name.into(), |(k, _)| Arc::clone(k))
    }

    fn rejected(&self, limited: RateLimited) -> LimitError {
        metrics::counter!(m::REJECTIONS_TOTAL, "limit" => Arc::clone(&limited.limit)).increment(1);
        LimitError::RateLimited(limited)
    }
}

/// A call over one or more limits of one identity: see [`Limiter::request`].
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    limiter: &'a Limiter,
    limits: &'a [&'a str],
    identity: &'a str,
    cost: u32,
}

impl Request<'_> {
    /// What the call costs under each of its limits (default 1). A cost above what a limit can
    /// ever hold is [`LimitError::CostTooHigh`].
    pub fn cost(mut self, cost: u32) -> Self {
        self.cost = cost;
        self
    }

    /// The keys and the cost checked against the quotas.
    fn prepare(&self) -> Result<Vec<(String, Quota)>, LimitError> {
        let keys = self.limiter.keys(self.limits, self.identity)?;
        for (name, (_, quota)) in self.limits.iter().zip(&keys) {
            if self.cost > quota.limit() {
                return Err(LimitError::CostTooHigh {
                    limit: (*name).to_owned(),
                    cost: self.cost,
                    capacity: quota.limit(),
                });
            }
        }
        Ok(keys)
    }

    /// Decides the call now, all or nothing.
    pub async fn check(self) -> Result<Grant, LimitError> {
        let keys = self.prepare()?;
        let limits = as_limits(&keys, self.cost);
        match self.limiter.inner.store.decide(&limits).await {
            Guarded::Store(verdict) | Guarded::Local(verdict) => self.answer(&verdict),
            Guarded::Open => Ok(self.open()),
            Guarded::Closed => Err(LimitError::Unavailable),
        }
    }

    /// Waits up to `max_wait` for room in every limit: see [`Limiter::acquire`].
    pub async fn acquire(self, max_wait: Duration) -> Result<Grant, LimitError> {
        let keys = self.prepare()?;
        let limits = as_limits(&keys, self.cost);
        let store = &self.limiter.inner.store;
        match wait::acquire(store, &limits, max_wait).await {
            Ok(waited) => {
                for name in self.limits {
                    metrics::histogram!(m::WAIT_SECONDS, "bucket" => self.limiter.name(name))
                        .record(waited.as_secs_f64());
                }
                // Where the limits stand now (the charge is made; this reads it back).
                match store.peek(&as_limits(&keys, 0)).await {
                    Guarded::Store(verdict) | Guarded::Local(verdict) => Ok(Grant {
                        // The wait is over: the call goes now.
                        delay: Duration::ZERO,
                        ..self.granted(&verdict, false)
                    }),
                    Guarded::Open | Guarded::Closed => Ok(self.open()),
                }
            }
            Err(Refused::Limited { retry_after }) => {
                // How long until the limits are whole, for the error: read, not charged.
                let reset_after = match store.peek(&as_limits(&keys, 0)).await {
                    Guarded::Store(v) | Guarded::Local(v) => {
                        v.decisions().iter().map(|d| d.reset_after).max()
                    }
                    _ => None,
                }
                .unwrap_or_default();
                Err(self.limiter.rejected(RateLimited {
                    limit: self.limiter.name(self.limits[0]),
                    retry_after,
                    reset_after,
                }))
            }
            Err(Refused::Unavailable) => Err(LimitError::Unavailable),
        }
    }

    /// Takes a place in line at most `max_wait` ahead: see [`Reserved`].
    pub async fn reserve(self, max_wait: Duration) -> Result<Reserved, LimitError> {
        let keys = self.prepare()?;
        let limits = as_limits(&keys, self.cost);
        let store = &self.limiter.inner.store;
        let (reserve, local) = match store.reserve(&limits, max_wait).await {
            Guarded::Store(reserve) => (reserve, false),
            Guarded::Local(reserve) => (reserve, true),
            Guarded::Open => {
                return Ok(Reserved {
                    place: None,
                    at: Instant::now(),
                });
            }
            Guarded::Closed => return Err(LimitError::Unavailable),
        };
        let limited = |retry_after| {
            self.limiter.rejected(RateLimited {
                limit: self.limiter.name(self.limits[0]),
                retry_after,
                reset_after: Duration::ZERO,
            })
        };
        match reserve {
            Reserve::Granted(reservation) => Ok(Reserved {
                at: Instant::now() + reservation.wait(),
                place: Some(Place::new(store, reservation, local)),
            }),
            Reserve::WouldExceed { retry_after } | Reserve::Retry { after: retry_after } => {
                Err(limited(Some(retry_after)))
            }
            Reserve::Never => Err(limited(None)),
        }
    }

    /// Where the call's limits stand, charging nothing: the binding limit's decision for a call
    /// of this cost (cost 0 reports where they stand without a call).
    pub async fn peek(self) -> Result<Decision, LimitError> {
        let keys = self.prepare()?;
        let limits = as_limits(&keys, self.cost);
        match self.limiter.inner.store.peek(&limits).await {
            Guarded::Store(verdict) | Guarded::Local(verdict) => verdict
                .binding()
                .map(|(_, d)| *d)
                .ok_or(LimitError::NoLimit),
            Guarded::Open | Guarded::Closed => Err(LimitError::Unavailable),
        }
    }

    fn answer(&self, verdict: &Verdict) -> Result<Grant, LimitError> {
        if verdict.is_allowed() {
            return Ok(self.granted(verdict, false));
        }
        let Some((i, binding)) = verdict.binding() else {
            return Err(LimitError::NoLimit);
        };
        let retry_after = match binding.outcome {
            tollgate_core::Outcome::InsufficientCapacity => None,
            _ => Some(verdict.retry_after()),
        };
        Err(self.limiter.rejected(RateLimited {
            limit: self.limiter.name(self.limits[i]),
            retry_after,
            reset_after: binding.reset_after,
        }))
    }

    fn granted(&self, verdict: &Verdict, store_error: bool) -> Grant {
        let (i, d) = verdict.binding().map_or((0, None), |(i, d)| (i, Some(*d)));
        Grant {
            limit: self.limiter.name(self.limits[i]),
            remaining: d.map_or(0, |d| d.remaining),
            reset_after: d.map_or(Duration::ZERO, |d| d.reset_after),
            delay: verdict.delay(),
            store_error,
        }
    }

    /// The grant of `fail_open` while the store is away.
    fn open(&self) -> Grant {
        Grant {
            limit: self.limiter.name(self.limits[0]),
            remaining: 0,
            reset_after: Duration::ZERO,
            delay: Duration::ZERO,
            store_error: true,
        }
    }
}

fn as_limits(keys: &[(String, Quota)], cost: u32) -> Vec<Limit<'_>> {
    keys.iter()
        .map(|(key, quota)| Limit::new(key, quota, cost))
        .collect()
}

/// A place in line ([`Limiter::reserve`]): the call may go [`delay`](Self::delay) from now.
/// [`wait`](Self::wait) for it, or [`commit`](Self::commit) to keep it and time the call
/// yourself; [`cancel`](Self::cancel) it, or drop it unused, and the place is given back (when
/// nobody reserved after it).
#[must_use = "a reservation holds a place: wait for it, commit it, or cancel it"]
pub struct Reserved {
    /// `None` when the failure policy granted without a store (`fail_open`).
    place: Option<Place>,
    /// When the place comes.
    at: Instant,
}

impl std::fmt::Debug for Reserved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reserved")
            .field("delay", &self.delay())
            .finish_non_exhaustive()
    }
}

impl Reserved {
    /// How long from now until the call may go (zero when it may go now).
    pub fn delay(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Sleeps until the place comes, and uses it.
    pub async fn wait(mut self) {
        tokio::time::sleep(self.delay()).await;
        if let Some(place) = self.place.take() {
            place.keep();
        }
    }

    /// Keeps the place without waiting for it: the caller goes at [`delay`](Self::delay).
    pub fn commit(mut self) {
        if let Some(place) = self.place.take() {
            place.keep();
        }
    }

    /// Gives the place back now (when nobody reserved after it, the next caller takes it).
    pub async fn cancel(mut self) {
        if let Some(place) = self.place.take() {
            place.give_back().await;
        }
    }
}
