//! tollgate: rate limiting for HTTP traffic in both directions, and for any other work.
//!
//! * [`inbound`]: the tower layer for axum / hyper servers: callers keyed by API key, user or IP,
//!   tiers, per-route costs and limits, a whole-service limit, 429 with the standard headers;
//! * [`outbound`]: the tower layer for `reqwest` (feature `reqwest`) and other clients: calls wait
//!   for their buckets, shared by a fleet through Redis, and slow down when the upstream says so;
//! * [`limiter`]: the plain [`Limiter`] for work that is not an HTTP stack
//!   (`check`, `acquire`, `reserve`, `pause`, blocking forms), and the decision path all three
//!   stand on (timeout, circuit breaker, failure policy);
//! * [`config`] (feature `yaml`): the YAML configuration;
//! * the building blocks, each usable on its own: [`http`] (`RateLimit`, `X-RateLimit-*`,
//!   `Retry-After`, problem+json, the client behind trusted proxies, bounded keys), [`limiter::breaker`]
//!   (the circuit breaker), [`metrics`] (the metric names).
//!
//! The algorithms and stores live in `tollgate-core` (re-exported as [`core`]) and
//! `tollgate-redis` (feature `redis`, re-exported as `redis`).

pub use tollgate_core as core;

pub use limiter::Limiter;

/// The server layer, [`inbound::RateLimitLayer`]: limits the requests a server *receives*.
///
/// The same type under a name that cannot be mistaken for the client layer's where both are in
/// scope; the module path (`inbound::RateLimitLayer`) works as well.
pub type InboundRateLimitLayer<K> = inbound::RateLimitLayer<K>;

/// The client layer, [`outbound::RateLimitLayer`]: limits the requests a client *sends*.
///
/// The same type under a name that cannot be mistaken for the server layer's where both are in
/// scope; the module path (`outbound::RateLimitLayer`) works as well.
///
/// ```
/// use tollgate::core::Quota;
/// use tollgate::http::TrustedProxies;
/// use tollgate::inbound::{ClientIp, Policy};
/// use tollgate::outbound::Bucket;
/// use tollgate::{InboundRateLimitLayer, OutboundRateLimitLayer};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let policy = Policy::builder().tier("anonymous", Quota::per_minute(60)?).build()?;
/// let server = InboundRateLimitLayer::builder(policy, ClientIp::new("anonymous", TrustedProxies::none()))
///     .build()?;
/// let client = OutboundRateLimitLayer::builder(Bucket::new("upstream", Quota::per_second(10)?).fixed())
///     .build();
/// # let _ = (server, client);
/// # Ok(())
/// # }
/// ```
pub type OutboundRateLimitLayer<Sel> = outbound::RateLimitLayer<Sel>;

#[cfg(feature = "yaml")]
pub mod config;
pub mod http;
pub mod inbound;
pub mod limiter;
pub mod metrics;
pub mod outbound;

#[cfg(feature = "redis")]
pub use tollgate_redis as redis;

/// The README's Rust samples, compiled and run as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
