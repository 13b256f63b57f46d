//! The inbound layer: rate-limits the requests an axum (or any tower / hyper) server receives.
//!
//! ```
//! use axum::{Router, routing::get};
//! use tollgate::http::TrustedProxies;
//! use tollgate::core::Quota;
//! use tollgate::inbound::{ClientIp, Policy, RateLimitLayer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let policy = Policy::builder()
//!     .tier("anonymous", Quota::per_minute(60)?.with_burst(10)?)
//!     .exempt_path("/healthz")
//!     .build()?;
//! let limiter = RateLimitLayer::builder(policy, ClientIp::new("anonymous", TrustedProxies::none()))
//!     .build()?;
//! let app: Router = Router::new()
//!     .route("/api/hello", get(|| async { "hello" }))
//!     .route("/healthz", get(|| async { "ok" }))
//!     .layer(limiter);
//! # let _ = app;
//! # Ok(())
//! # }
//! ```
//!
//! # What happens to a request
//!
//! 1. An exempt path passes untouched (no headers).
//! 2. The [`KeyExtractor`] finds the caller: a key (`user:alice`, `ip:203.0.113.7`) and a tier.
//!    An unknown API key is answered **401**, two credentials in one request **400**; a caller
//!    that cannot be known as the server is set up (no peer address, a tier the policy lacks) is
//!    **500** with a problem body naming the fix, logged once and counted
//!    (`rate_limiter_misconfigured_total`), never a guess.
//! 3. The limits of the request are gathered: the caller's tier (charged the route's cost), the
//!    route's per-caller limit (the same for every tier, or one per tier) and its limit shared by
//!    every caller, if any (same cost), the whole-service limit (one per request), and the
//!    tier's concurrency cap (one place while the request is in flight, given back when its
//!    response body ends). They are decided **in one store call, all or nothing**. A route that
//!    [charges only failures](Charge::Failures) has its own limits checked first and charged
//!    after a response of 400 or more. With [adaptive limits](PolicyBuilder::adaptive), a tier's
//!    quota may be lowered while the service is overloaded.
//! 4. If the caller was denied moments ago, the **denied-until cache** answers 429 locally until
//!    the known retry time, without a store call (exact: nothing can make that time earlier under
//!    the same policy; entries are keyed by the tier bucket and route, and a reload empties it).
//! 5. Allowed: the handler runs (after a leaky bucket's shaping delay), with the
//!    [`RateLimitDecision`] in the request's extensions if the layer was built with
//!    [`decision_extension(true)`](RateLimitLayerBuilder::decision_extension) (off by default:
//!    it costs an allocation per request), and the response gets the rate-limit
//!    headers of the limit closest to denial. Denied: **429** with `Retry-After`, the headers and
//!    an `application/problem+json` body. In shadow mode the request passes with the headers,
//!    counted as `shadow_limited`.
//! 6. If the store fails or times out (after `timeout`, 50 ms by default), the [`OnStoreError`]
//!    policy decides: let it through, answer 503 with `Retry-After`, or decide in a local
//!    in-memory store while a circuit breaker keeps the store aside and probes it. Never a 500,
//!    never a hang.
//!
//! Rejections are ordinary responses, so the service's error type is the inner one's: axum needs
//! no `HandleErrorLayer`. `poll_ready` only forwards. The decision is made in `call` when the
//! caller's identity and the store answer at once (the built-in extractors with `MemoryStore`),
//! else in the response future.
//!
//! # Two `RateLimitLayer`s
//!
//! This module's [`RateLimitLayer`] limits the requests a server *receives*;
//! [`outbound::RateLimitLayer`](crate::outbound::RateLimitLayer) limits the requests a client
//! *sends*. Where both are in scope, write the module path (`inbound::RateLimitLayer`) or use the
//! crate root's aliases [`InboundRateLimitLayer`](crate::InboundRateLimitLayer) and
//! [`OutboundRateLimitLayer`](crate::OutboundRateLimitLayer).

// Adaptive limits (AIMD): the tiers' rates lowered while the inner service is overloaded.
pub mod adaptive;
mod decide;
mod decision;
mod denied;
mod error;
mod future;
mod identity;
mod layer;
mod plan;
mod policy;
mod response;
mod service;
mod shedding;

pub use crate::limiter::{DEFAULT_STORE_TIMEOUT, MAX_STORE_TIMEOUT, OnStoreError};
pub use decision::RateLimitDecision;
pub use error::BuildError;
pub use future::ResponseFuture;
pub use identity::{
    ApiKeyEntry, ApiKeys, ClientIp, Global, HeaderValueKey, Identity, KeyExtractor, PeerAddr,
    Rejection, peer_ip,
};
pub use layer::{DEFAULT_DENIED_CACHE, RateLimitLayer, RateLimitLayerBuilder};
pub use policy::{
    Charge, DEFAULT_LEASE_TIME, PathPattern, Policy, PolicyBuilder, PolicyError, PolicyHandle,
    Route,
};
pub use service::RateLimit;
