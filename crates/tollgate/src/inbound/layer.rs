//! [`RateLimitLayer`] and its builder.

use std::sync::Arc;
use std::time::Duration;

use tollgate_core::{DynStore, MemoryStore, Store};
use tower_layer::Layer;

use super::decide::Shared;
use super::denied::DeniedCache;
use super::error::BuildError;
use super::identity::{ApiKeys, ClientIp, Global, HeaderValueKey};
use super::policy::{Policy, PolicyHandle};
use super::service::RateLimit;
use super::shedding::Shedding;
use crate::limiter::BreakerConfig;
use crate::limiter::guarded::{Guard, GuardedStore};
use crate::limiter::{DEFAULT_STORE_TIMEOUT, OnStoreError};

/// The default number of denials the denied-until cache remembers.
pub const DEFAULT_DENIED_CACHE: usize = 100_000;

/// Rate-limits the requests of the services it wraps. `Clone`; every clone and every service it
/// makes share one state.
#[derive(Clone)]
pub struct RateLimitLayer<K> {
    shared: Arc<Shared>,
    extractor: K,
}

impl<K> std::fmt::Debug for RateLimitLayer<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("store", &self.shared.store.kind())
            .field("on_error", &self.shared.store.on_error())
            .finish_non_exhaustive()
    }
}

impl<K> RateLimitLayer<K> {
    /// Starts a layer enforcing `policy`, identifying callers with `extractor`.
    pub fn builder(policy: Policy, extractor: K) -> RateLimitLayerBuilder<K> {
        RateLimitLayerBuilder {
            policy,
            extractor,
            store: None,
            on_error: OnStoreError::default(),
            timeout: DEFAULT_STORE_TIMEOUT,
            breaker: BreakerConfig::default(),
            denied_cache: Some(DEFAULT_DENIED_CACHE),
            fallback_max_keys: tollgate_core::DEFAULT_MAX_KEYS,
            decision_extension: false,
        }
    }

    /// The policy in force; [`PolicyHandle::set`] replaces it for every service of this layer
    /// (a configuration reload), keeping the bucket state.
    pub fn policy(&self) -> &PolicyHandle {
        &self.shared.policy
    }
}

impl<S, K: Clone> Layer<S> for RateLimitLayer<K> {
    type Service = RateLimit<S, K>;

    fn layer(&self, inner: S) -> RateLimit<S, K> {
        RateLimit::from_parts(inner, Arc::clone(&self.shared), self.extractor.clone())
    }
}

/// Builds a [`RateLimitLayer`].
pub struct RateLimitLayerBuilder<K> {
    policy: Policy,
    extractor: K,
    store: Option<Arc<dyn DynStore>>,
    on_error: OnStoreError,
    timeout: Duration,
    breaker: BreakerConfig,
    denied_cache: Option<usize>,
    fallback_max_keys: usize,
    decision_extension: bool,
}

impl<K> std::fmt::Debug for RateLimitLayerBuilder<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayerBuilder")
            .field("on_error", &self.on_error)
            .field("timeout", &self.timeout)
            .field("decision_extension", &self.decision_extension)
            .finish_non_exhaustive()
    }
}

impl<K> RateLimitLayerBuilder<K> {
    /// Where the limit state lives (default: a [`MemoryStore`] of this process).
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// A store already shared as `Arc<dyn DynStore>`.
    pub fn shared_store(mut self, store: Arc<dyn DynStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// What to do when the store fails or times out (default [`OnStoreError::Local`]).
    pub fn on_store_error(mut self, on_error: OnStoreError) -> Self {
        self.on_error = on_error;
        self
    }

    /// The longest a store call may take before the failure policy applies (default 50 ms, at
    /// most [`MAX_STORE_TIMEOUT`](crate::limiter::MAX_STORE_TIMEOUT)). It bounds the latency the
    /// layer adds to a request (a leaky bucket's shaping delay aside). Give a Redis store the
    /// same timeout (the YAML config does):
    /// its calls carry the store's own deadline to Redis, past which a late script writes nothing,
    /// so a store timeout longer than this one would let a call the layer gave up on still charge.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = crate::limiter::guarded::capped_timeout(timeout);
        self
    }

    /// When the circuit breaker opens and how long before it probes the store again.
    pub fn breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = config;
        self
    }

    /// How many denials the denied-until cache remembers; `None` turns it off.
    pub fn denied_cache(mut self, capacity: Option<usize>) -> Self {
        self.denied_cache = capacity;
        self
    }

    /// Whether a request that passes carries its [`RateLimitDecision`](super::RateLimitDecision)
    /// in its extensions, for the handler to read (default **off**). Off, the layer adds no
    /// extension: inserting one is the dearest single step of an allowed request (a boxed value
    /// and, behind axum's own extensions, a bigger table: about 700 instructions of the roughly
    /// 4,000 the layer costs; see `docs/BENCHMARKS.md`). On, every request that reaches the
    /// handler has one, `fail_open`'s unchecked passes included (`store_error: true`).
    pub fn decision_extension(mut self, on: bool) -> Self {
        self.decision_extension = on;
        self
    }

    /// The key cap of the in-memory store used while the store is unavailable (`local`).
    pub fn fallback_max_keys(mut self, max_keys: usize) -> Self {
        self.fallback_max_keys = max_keys;
        self
    }

    /// Builds the layer, checking the built-in key extractors ([`ApiKeys`], [`ClientIp`],
    /// [`HeaderValueKey`], [`Global`]) against the policy: every tier they can put a caller in
    /// must be defined, and no API key may be empty. (Your own extractors are not known here: a
    /// tier one of them returns that the policy lacks is answered 500, logged and counted.)
    pub fn build(self) -> Result<RateLimitLayer<K>, BuildError>
    where
        K: 'static,
    {
        check_extractor(&self.extractor, &self.policy)?;
        let store: Arc<dyn DynStore> = self.store.unwrap_or_else(|| Arc::new(MemoryStore::new()));
        Ok(RateLimitLayer {
            shared: Arc::new(Shared {
                adaptive: Shedding::new(&self.policy),
                policy: PolicyHandle::new(self.policy),
                store: GuardedStore::new(
                    store,
                    Guard {
                        on_error: self.on_error,
                        timeout: self.timeout,
                        breaker: self.breaker,
                        fallback_max_keys: self.fallback_max_keys,
                    },
                ),
                denied: self.denied_cache.map(DeniedCache::new),
                misconfigured: std::sync::Mutex::new(Vec::new()),
                decision_extension: self.decision_extension,
            }),
            extractor: self.extractor,
        })
    }
}

/// Checks a built-in extractor against the policy (others pass: they cannot be looked into).
fn check_extractor(extractor: &dyn std::any::Any, policy: &Policy) -> Result<(), BuildError> {
    let known = |tier: &str| policy.tier(tier).is_some();
    let single = |tier: &Arc<str>, kind: &str| {
        if known(tier) {
            Ok(())
        } else {
            Err(BuildError::UnknownTier {
                tier: tier.to_string(),
                used_by: format!("every caller of the {kind} extractor"),
            })
        }
    };
    if let Some(keys) = extractor.downcast_ref::<ApiKeys>() {
        keys.check(known)
    } else if let Some(ip) = extractor.downcast_ref::<ClientIp>() {
        single(ip.tier(), "ClientIp")
    } else if let Some(header) = extractor.downcast_ref::<HeaderValueKey>() {
        single(header.tier(), "HeaderValueKey")
    } else if let Some(global) = extractor.downcast_ref::<Global>() {
        single(global.tier(), "Global")
    } else {
        Ok(())
    }
}
