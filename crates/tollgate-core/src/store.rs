//! The [`Store`] trait: where limit state lives and is updated atomically.
//!
//! A store answers for a **set of limits at once, all or nothing**: a request that must pass its
//! tier limit, a route limit and the whole-service limit either consumes from all of them or from
//! none. Implementations: [`MemoryStore`](crate::MemoryStore) here, `RedisStore` in
//! `tollgate-redis`.
//!
//! # Static or dynamic dispatch
//!
//! [`Store`] uses `async fn`-style methods returning `Send` futures, so generic code pays nothing
//! for it. It is not object safe; for `Arc<dyn …>` use [`DynStore`], which every store implements
//! and which `Arc<dyn DynStore>` turns back into a [`Store`] (one boxed future per call):
//!
//! ```
//! use std::sync::Arc;
//! use tollgate_core::{DynStore, MemoryStore, Store};
//!
//! fn takes_any_store<S: Store>(_store: S) {}
//!
//! let store: Arc<dyn DynStore> = Arc::new(MemoryStore::new());
//! takes_any_store(store);
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::{Decision, Lease, LeaseId, Leased, Outcome, Quota, Timestamp};

/// One limit a request must pass: a key, its quota and the cost to charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit<'a> {
    /// The bucket's key, such as `"tier:basic:user:alice"`. Keys of one request must differ.
    pub key: &'a str,
    /// The quota to enforce.
    pub quota: &'a Quota,
    /// How much the request costs under this limit; 0 only peeks.
    pub cost: u32,
}

impl<'a> Limit<'a> {
    /// A limit charging `cost` to `key` under `quota`.
    pub const fn new(key: &'a str, quota: &'a Quota, cost: u32) -> Limit<'a> {
        Limit { key, quota, cost }
    }
}

/// The answer for a set of limits: one [`Decision`] per limit, in the order given.
///
/// When any limit denies, nothing was consumed, and the decisions of the limits that would have
/// passed describe their state as it is (what a peek reports), not as if the request had passed.
#[derive(Debug, Clone)]
pub struct Verdict {
    decisions: Decisions,
}

/// Two verdicts are equal when their decisions are, however they are stored.
impl PartialEq for Verdict {
    fn eq(&self, other: &Verdict) -> bool {
        self.slice() == other.slice()
    }
}

impl Eq for Verdict {}

/// One decision inline (the common single-limit request allocates nothing), more on the heap.
#[derive(Debug, Clone)]
enum Decisions {
    One(Decision),
    Many(Vec<Decision>),
}

impl Verdict {
    /// Wraps the decisions of a set of limits, in the order of the limits.
    pub fn new(decisions: Vec<Decision>) -> Verdict {
        Verdict {
            decisions: Decisions::Many(decisions),
        }
    }

    /// The verdict of a single limit (no allocation).
    #[inline]
    pub fn single(decision: Decision) -> Verdict {
        Verdict {
            decisions: Decisions::One(decision),
        }
    }

    #[inline]
    fn slice(&self) -> &[Decision] {
        match &self.decisions {
            Decisions::One(d) => std::slice::from_ref(d),
            Decisions::Many(v) => v,
        }
    }

    /// [`Outcome::InsufficientCapacity`] if any limit can never hold the cost, else
    /// [`Outcome::Denied`] if any limit denies, else [`Outcome::Allowed`]. An empty set allows.
    pub fn outcome(&self) -> Outcome {
        let mut outcome = Outcome::Allowed;
        for d in self.slice() {
            match d.outcome {
                Outcome::InsufficientCapacity => return Outcome::InsufficientCapacity,
                Outcome::Denied => outcome = Outcome::Denied,
                Outcome::Allowed => {}
            }
        }
        outcome
    }

    /// Whether every limit passed (and so every one was charged).
    #[inline]
    pub fn is_allowed(&self) -> bool {
        self.slice().iter().all(Decision::is_allowed)
    }

    /// The decisions, in the order of the limits.
    #[inline]
    pub fn decisions(&self) -> &[Decision] {
        self.slice()
    }

    /// The time until the same request would pass every limit: the longest `retry_after` (each
    /// limit only gets more permissive as time passes, so this is exact when nobody else spends).
    pub fn retry_after(&self) -> Duration {
        self.slice()
            .iter()
            .map(|d| d.retry_after)
            .max()
            .unwrap_or_default()
    }

    /// The longest shaping delay among the limits (leaky buckets).
    pub fn delay(&self) -> Duration {
        self.slice()
            .iter()
            .map(|d| d.delay)
            .max()
            .unwrap_or_default()
    }

    /// The limit closest to denial, for the response headers: among denying limits the one to wait
    /// longest for; otherwise the one with the fewest requests remaining (the first on a tie).
    pub fn binding(&self) -> Option<(usize, &Decision)> {
        let denied = self
            .slice()
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.is_allowed())
            .max_by_key(|(_, d)| d.retry_after);
        denied.or_else(|| {
            self.slice()
                .iter()
                .enumerate()
                .min_by_key(|(_, d)| d.remaining)
        })
    }
}

/// One bucket held by a [`Reservation`]: what giving it back restores.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Held {
    /// The bucket's key.
    pub key: String,
    /// Its theoretical arrival time before the reservation.
    pub before: Timestamp,
    /// Its theoretical arrival time after the reservation.
    pub after: Timestamp,
    /// What the reservation's cost took of the bucket (its interval × the cost): the most that
    /// giving it back can return once others reserved after it.
    pub charge: Duration,
}

/// A place held in one or more buckets, to be used after [`wait`](Reservation::wait).
///
/// Dropping it does nothing; pass it to [`Store::cancel`] to give the place back when the call will
/// not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a reservation holds a place: wait for it, or give it back with Store::cancel"]
pub struct Reservation {
    wait: Duration,
    held: Vec<Held>,
}

impl Reservation {
    /// A reservation to use after `wait`, holding `held`.
    pub fn new(wait: Duration, held: Vec<Held>) -> Reservation {
        Reservation { wait, held }
    }

    /// How long to wait before sending the request.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// The buckets it holds a place in (empty when the request passed at once under window
    /// algorithms: there is nothing to give back).
    pub fn held(&self) -> &[Held] {
        &self.held
    }
}

/// The answer to [`Store::reserve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserve {
    /// Charged: send the request after the reservation's wait.
    Granted(Reservation),
    /// Not charged: the request could not pass within `max_wait`. It would pass after
    /// `retry_after` if nobody else spent the quota.
    WouldExceed {
        /// When the request could pass.
        retry_after: Duration,
    },
    /// Not charged: a window algorithm cannot hold a place ahead of time. The request passes after
    /// `after` (within `max_wait`): wait, then reserve again.
    Retry {
        /// How long to wait before asking again.
        after: Duration,
    },
    /// Not charged: the cost exceeds a limit's capacity; waiting never helps.
    Never,
}

/// What kind of failure a [`StoreError`] is, so a caller can apply its failure policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The call did not finish in time. If the command was sent its outcome is unknown: it may or
    /// may not have been applied.
    Timeout,
    /// The backend cannot be reached (connection refused or lost, cluster down).
    Unavailable,
    /// Anything else: a protocol error, a script error, a malformed reply.
    Other,
}

impl fmt::Display for StoreErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreErrorKind::Timeout => "store timed out",
            StoreErrorKind::Unavailable => "store unavailable",
            StoreErrorKind::Other => "store error",
        })
    }
}

/// A store call failed. Opaque; ask [`is_timeout`](Self::is_timeout) /
/// [`is_unavailable`](Self::is_unavailable), and walk [`source`](StdError::source) for the cause.
#[derive(Debug)]
pub struct StoreError {
    kind: StoreErrorKind,
    source: Option<Box<dyn StdError + Send + Sync>>,
}

impl StoreError {
    /// An error of `kind` caused by `source`.
    pub fn new(kind: StoreErrorKind, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        StoreError {
            kind,
            source: Some(source.into()),
        }
    }

    /// A timeout with no further cause.
    pub fn timeout() -> Self {
        StoreError {
            kind: StoreErrorKind::Timeout,
            source: None,
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// Whether the call timed out (its outcome may be unknown).
    pub fn is_timeout(&self) -> bool {
        self.kind == StoreErrorKind::Timeout
    }

    /// Whether the backend could not be reached.
    pub fn is_unavailable(&self) -> bool {
        self.kind == StoreErrorKind::Unavailable
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {source}", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

impl StdError for StoreError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// Where limit state lives: decides sets of limits atomically.
///
/// Every method reads the store's own clock once (Redis: its `TIME`), so all processes sharing a
/// store agree on time.
pub trait Store: Send + Sync + 'static {
    /// Decides a request against every limit in `limits`, all or nothing: if any limit denies,
    /// none is charged.
    fn decide(
        &self,
        limits: &[Limit<'_>],
    ) -> impl Future<Output = Result<Verdict, StoreError>> + Send;

    /// What [`decide`](Self::decide) would answer, without charging anything.
    fn peek(
        &self,
        limits: &[Limit<'_>],
    ) -> impl Future<Output = Result<Verdict, StoreError>> + Send;

    /// Holds a place for the request in every limit if it can pass within `max_wait`, for a caller
    /// that will wait (the outbound side). Charges nothing unless it answers
    /// [`Reserve::Granted`].
    ///
    /// Buckets (token, leaky) can hold a place in the future. Window algorithms can only pass a
    /// request now; when one needs waiting the answer is [`Reserve::Retry`].
    fn reserve(
        &self,
        limits: &[Limit<'_>],
        max_wait: Duration,
    ) -> impl Future<Output = Result<Reserve, StoreError>> + Send;

    /// Gives a reservation back, where the algorithm allows: a bucket returns to its state before
    /// the reservation if nobody reserved after it; otherwise it is kept (see
    /// [`algorithm::cancel`](crate::algorithm::cancel)).
    fn cancel(
        &self,
        reservation: &Reservation,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Pauses the bucket `key` for `duration` from now (the store's now): nothing passes before
    /// then, and it refills from empty afterwards (see [`algorithm::pause`](crate::algorithm::pause)).
    /// For an upstream's `Retry-After`. Returns `false`, changing nothing, for window algorithms.
    fn pause(
        &self,
        key: &str,
        quota: &Quota,
        duration: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// A short name for metrics labels, such as `"memory"` or `"redis"`.
    fn kind(&self) -> &'static str;

    /// Decides without waiting, if this store can: a store that answers from local memory returns
    /// `Some`, and callers (the tower layers) then skip boxing a future and arming a timer. The
    /// default, for stores that do I/O, is `None`.
    fn decide_now(&self, limits: &[Limit<'_>]) -> Option<Result<Verdict, StoreError>> {
        let _ = limits;
        None
    }

    /// [`peek`](Self::peek) without waiting, for stores without I/O (like
    /// [`decide_now`](Self::decide_now)). The default, for stores that do I/O, is `None`.
    fn peek_now(&self, limits: &[Limit<'_>]) -> Option<Result<Verdict, StoreError>> {
        let _ = limits;
        None
    }

    /// Decides `limits` like [`decide`](Self::decide) and, in the same atomic step, takes one
    /// lease of `lease`: all or nothing. The lease is taken only if every limit allows and fewer
    /// than `lease.max` unexpired leases are held; the limits are charged only if the lease is
    /// taken. `limits` may be empty (a lease only); a `max` of 0 denies always.
    ///
    /// The verdict has one decision per limit, in order, then one for the lease: `limit` = `max`,
    /// `remaining` = leases still free after this one (or as it stands when not taken), outcome
    /// [`Outcome::Denied`] with `retry_after` = [`LEASE_RETRY_AFTER`](crate::LEASE_RETRY_AFTER)
    /// when the lease is full, `reset_after` and `delay` 0. When the lease is full the limits are
    /// not decided at all and report themselves as they stand (as after any denial). The answer's
    /// `lease` is `Some` exactly when the verdict allows: give it back with
    /// [`release`](Self::release), or it expires `lease.ttl` after it was taken, on the store's
    /// clock.
    ///
    /// The default, for stores without leases, fails with an error of kind
    /// [`StoreErrorKind::Other`].
    fn decide_leased(
        &self,
        limits: &[Limit<'_>],
        lease: &Lease<'_>,
    ) -> impl Future<Output = Result<Leased, StoreError>> + Send {
        let _ = (limits, lease);
        std::future::ready(Err(leases_unsupported(self.kind())))
    }

    /// Gives a lease back. Idempotent: an expired or unknown id is `Ok`. The default does
    /// nothing (a store without leases holds none).
    fn release(
        &self,
        key: &str,
        id: LeaseId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = (key, id);
        std::future::ready(Ok(()))
    }

    /// [`decide_leased`](Self::decide_leased) without waiting, for stores without I/O (like
    /// [`decide_now`](Self::decide_now)). The default is `None`.
    fn decide_leased_now(
        &self,
        limits: &[Limit<'_>],
        lease: &Lease<'_>,
    ) -> Option<Result<Leased, StoreError>> {
        let _ = (limits, lease);
        None
    }

    /// [`release`](Self::release) without waiting, for stores without I/O. The default is `None`.
    fn release_now(&self, key: &str, id: LeaseId) -> Option<Result<(), StoreError>> {
        let _ = (key, id);
        None
    }
}

/// The error of [`Store::decide_leased`] on a store that does not implement it.
fn leases_unsupported(kind: &'static str) -> StoreError {
    StoreError::new(
        StoreErrorKind::Other,
        format!("the {kind} store does not support concurrency leases"),
    )
}

/// A boxed, `Send` future, as [`DynStore`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe form of [`Store`], implemented for every store; `Arc<dyn DynStore>` is a
/// [`Store`] again.
pub trait DynStore: Send + Sync + 'static {
    /// [`Store::decide`], boxed.
    fn decide_boxed<'a>(
        &'a self,
        limits: &'a [Limit<'a>],
    ) -> BoxFuture<'a, Result<Verdict, StoreError>>;
    /// [`Store::peek`], boxed.
    fn peek_boxed<'a>(
        &'a self,
        limits: &'a [Limit<'a>],
    ) -> BoxFuture<'a, Result<Verdict, StoreError>>;
    /// [`Store::reserve`], boxed.
    fn reserve_boxed<'a>(
        &'a self,
        limits: &'a [Limit<'a>],
        max_wait: Duration,
    ) -> BoxFuture<'a, Result<Reserve, StoreError>>;
    /// [`Store::cancel`], boxed.
    fn cancel_boxed<'a>(
        &'a self,
        reservation: &'a Reservation,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// [`Store::pause`], boxed.
    fn pause_boxed<'a>(
        &'a self,
        key: &'a str,
        quota: &'a Quota,
        duration: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// [`Store::kind`].
    fn kind_dyn(&self) -> &'static str;
    /// [`Store::decide_now`].
    fn decide_now_dyn(&self, limits: &[Limit<'_>]) -> Option<Result<Verdict, StoreError>>;
    /// [`Store::peek_now`].
    fn peek_now_dyn(&self, limits: &[Limit<'_>]) -> Option<Result<Verdict, StoreError>>;
    /// [`Store::decide_leased`], boxed.
    fn decide_leased_boxed<'a>(
        &'a self,
        limits: &'a [Limit<'a>],
        lease: &'a Lease<'a>,
    ) -> BoxFuture<'a, Result<Leased, StoreError>>;
    /// [`Store::release`], boxed.
    fn release_boxed<'a>(
        &'a self,
        key: &'a str,
        id: LeaseId,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// [`Store::decide_leased_now`].
    fn decide_leased_now_dyn(
        &self,
        limits: &[Limit<'_>],
        lease: &Lease<'_>,
    ) -> Option<Result<Leased, StoreError>>;
    /// [`Store::release_now`].
    fn release_now_dyn(&self, key: &str, id: LeaseId) -> Option<Result<(), StoreError>>;
}

impl<S: Store> DynStore for S {
    fn decide_boxed<'a>(
        &'a self,
        limits: &'a [Limit<'a>],
    ) -> BoxFuture<'a, Result<Verdict, StoreError>> {
        Box::pin(self.decide(limits))
    }

    fn peek_boxed<'a>(
        &'a self,
        limits: &'a [Limit<'a>],
    ) -> BoxFuture<'a, Result<Verdict, StoreError>> {
        Box::pin(self.peek(limits))
    }

    fn reserve_boxed<'a>(
        &'a self,
        limits: &'a [Limit<'a>],
        max_wait: Duration,
    ) -> BoxFuture<'a, Result<Reserve, StoreError>> {
        Box::pin(self.reserve(limits, max_wait))
    }

    fn cancel_boxed<'a>(
        &'a self,
        reservation: &'a Reservation,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.cancel(reservation))
    }

    fn pause_boxed<'a>(
        &'a self,
        key: &'a str,
        quota: &'a Quota,
        duration: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.pause(key, quota, duration))
    }

    fn kind_dyn(&self) -> &'static str {
        self.kind()
    }

    fn decide_now_dyn(&self, limits: &[Limit<'_>]) -> Option<Result<Verdict, StoreError>> {
        self.decide_now(limits)
    }

    fn peek_now_dyn(&self, limits: &[Limit<'_>]) -> Option<Result<Verdict, StoreError>> {
        self.peek_now(limits)
    }

    fn decide_leased_boxed<'a>(
        &'a self,
        limits: &'a [Limit<'a>],
        lease: &'a Lease<'a>,
    ) -> BoxFuture<'a, Result<Leased, StoreError>> {
        Box::pin(self.decide_leased(limits, lease))
    }

    fn release_boxed<'a>(
        &'a self,
        key: &'a str,
        id: LeaseId,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.release(key, id))
    }

    fn decide_leased_now_dyn(
        &self,
        limits: &[Limit<'_>],
        lease: &Lease<'_>,
    ) -> Option<Result<Leased, StoreError>> {
        self.decide_leased_now(limits, lease)
    }

    fn release_now_dyn(&self, key: &str, id: LeaseId) -> Option<Result<(), StoreError>> {
        self.release_now(key, id)
    }
}

impl Store for Arc<dyn DynStore> {
    async fn decide(&self, limits: &[Limit<'_>]) -> Result<Verdict, StoreError> {
        self.as_ref().decide_boxed(limits).await
    }

    async fn peek(&self, limits: &[Limit<'_>]) -> Result<Verdict, StoreError> {
        self.as_ref().peek_boxed(limits).await
    }

    async fn reserve(
        &self,
        limits: &[Limit<'_>],
        max_wait: Duration,
    ) -> Result<Reserve, StoreError> {
        self.as_ref().reserve_boxed(limits, max_wait).await
    }

    async fn cancel(&self, reservation: &Reservation) -> Result<(), StoreError> {
        self.as_ref().cancel_boxed(reservation).await
    }

    async fn pause(
        &self,
        key: &str,
        quota: &Quota,
        duration: Duration,
    ) -> Result<bool, StoreError> {
        self.as_ref().pause_boxed(key, quota, duration).await
    }

    fn kind(&self) -> &'static str {
        self.as_ref().kind_dyn()
    }

    fn decide_now(&self, limits: &[Limit<'_>]) -> Option<Result<Verdict, StoreError>> {
        self.as_ref().decide_now_dyn(limits)
    }

    fn peek_now(&self, limits: &[Limit<'_>]) -> Option<Result<Verdict, StoreError>> {
        self.as_ref().peek_now_dyn(limits)
    }

    async fn decide_leased(
        &self,
        limits: &[Limit<'_>],
        lease: &Lease<'_>,
    ) -> Result<Leased, StoreError> {
        self.as_ref().decide_leased_boxed(limits, lease).await
    }

    async fn release(&self, key: &str, id: LeaseId) -> Result<(), StoreError> {
        self.as_ref().release_boxed(key, id).await
    }

    fn decide_leased_now(
        &self,
        limits: &[Limit<'_>],
        lease: &Lease<'_>,
    ) -> Option<Result<Leased, StoreError>> {
        self.as_ref().decide_leased_now_dyn(limits, lease)
    }

    fn release_now(&self, key: &str, id: LeaseId) -> Option<Result<(), StoreError>> {
        self.as_ref().release_now_dyn(key, id)
    }
}
