//! tollgate: rate limiting for HTTP traffic in both directions.
//!
//! This crate grows into the tower layers (inbound for axum / hyper servers, outbound for
//! `reqwest` and other clients). What is here so far are the building blocks those layers are made
//! of, each usable on its own:
//!
//! * [`headers`]: the IETF `RateLimit` / `RateLimit-Policy` headers, the legacy `X-RateLimit-*`
//!   ones and `Retry-After`, plus the `application/problem+json` body of a 429;
//! * [`client_ip`]: the client address of a request, believing `X-Forwarded-For` / `Forwarded`
//!   only from trusted proxies, and bounded keys;
//! * [`breaker`]: the circuit breaker that puts a failing store aside.
//!
//! The algorithms and stores live in `tollgate-core` (re-exported as [`core`]) and
//! `tollgate-redis`.

pub use tollgate_core as core;

pub mod body;
pub mod breaker;
pub mod client_ip;
#[cfg(feature = "yaml")]
pub mod config;
mod denied;
pub mod headers;
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
