//! tollgate: rate limiting for HTTP traffic in both directions, and for any other work.
//!
//! One set of algorithms (token bucket / GCRA, leaky bucket, fixed window, sliding window log and
//! counter, from [`tollgate-core`](core)), one decision path (a store behind a timeout, a circuit
//! breaker and a failure policy), and three front ends on it:
//!
//! | front end | for | module |
//! |---|---|---|
//! | the server layer, [`InboundRateLimitLayer`] | the requests an axum / hyper server *receives*: callers keyed by API key, user or IP, tiers, per-route costs and limits (per caller, per tier, shared, or on failures only), a whole-service limit, concurrency caps, adaptive limits under load, 429 with `Retry-After`, `RateLimit` and `X-RateLimit-*` | [`inbound`] |
//! | the client layer, [`OutboundRateLimitLayer`] | the requests a `reqwest` (or any tower) client *sends*: wait for a token up to a deadline or fail fast with a typed `RateLimited`, buckets shared by a fleet, slowing down when the upstream says so | [`outbound`] |
//! | the plain [`Limiter`] | any other work (an SDK call, a webhook delivery, a queue consumer): `check`, `acquire`, `reserve`, `pause`, blocking forms | [`limiter`] |
//!
//! State lives in this process's memory by default ([`MemoryStore`](core::MemoryStore), nothing
//! to install) or in Redis / Redis Cluster (feature `redis`: [`tollgate-redis`](https://docs.rs/tollgate-redis),
//! each decision one atomic Lua script on Redis' clock). When the store fails or is slow, the
//! configured policy answers (fail open, fail closed, or a local fallback behind a circuit
//! breaker): never a 500, never a hang. [`config`] (feature `yaml`) builds all of it from a YAML
//! file; [`http`] holds the pieces any HTTP front end needs (headers, problem+json, the client
//! behind trusted proxies, bounded keys); [`metrics`] names the metrics.
//!
//! The [user guide](https://github.com/tollgate-rs/tollgate/blob/main/docs/guide.md) explains the
//! choices: which algorithm, which store, which failure policy, the headers, deployment behind
//! proxies, observability.
//!
//! # Features
//!
//! None is on by default.
//!
//! | feature | adds | needed for |
//! |---|---|---|
//! | `axum` | reads axum's `ConnectInfo<SocketAddr>` as the client address | the server layer on axum |
//! | `reqwest` | `reqwest::Request` / `Response` in the client layer | the client layer on `reqwest` (with `tower`'s feature `util` for `ServiceBuilder` / `ServiceExt`) |
//! | `reqwest-middleware` | `outbound::RateLimitMiddleware` (implies `reqwest`) | `client.get(url).send()` through `reqwest-middleware` |
//! | `redis` | `tollgate::redis`, the Redis store (standalone and Cluster) | limits shared by a fleet |
//! | `yaml` | [`config`]: the YAML configuration | configuration files |
//!
//! # The server layer
//!
//! ```
//! use axum::{Router, body::Body, routing::get};
//! use http::Request;
//! use tollgate::InboundRateLimitLayer;
//! use tollgate::core::Quota;
//! use tollgate::http::TrustedProxies;
//! use tollgate::inbound::{ApiKeyEntry, ApiKeys, ClientIp, PeerAddr, Policy};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let policy = Policy::builder()
//!     // Required: the tier of callers without an API key, keyed by client IP.
//!     .tier("anonymous", Quota::per_minute(10)?.with_burst(5)?)
//!     .tier("basic", Quota::per_minute(100)?.with_burst(20)?)
//!     .build()?;
//! let keys = ApiKeys::new(
//!     [("key-alice".to_owned(), ApiKeyEntry { user: "alice".into(), tier: "basic".into() })],
//!     ClientIp::new("anonymous", TrustedProxies::none()),
//! );
//! let app = Router::new()
//!     .route("/api/hello", get(|| async { "hello" }))
//!     .layer(InboundRateLimitLayer::builder(policy, keys).build()?);
//!
//! // Served with `into_make_service_with_connect_info::<SocketAddr>()`, each request carries its
//! // peer address; here one request is sent by hand, with a `PeerAddr`.
//! let request = Request::get("/api/hello")
//!     .header("x-api-key", "key-alice")
//!     .extension(PeerAddr("203.0.113.7:50000".parse()?))
//!     .body(Body::empty())?;
//! let response = app.oneshot(request).await?;
//! assert_eq!(response.status(), 200);
//! assert_eq!(response.headers()["ratelimit-policy"], r#""basic";q=20;w=12"#);
//! # Ok(())
//! # }
//! ```
//!
//! `q` is the burst (20 requests at once) and `w` the seconds an empty bucket takes to fill again
//! (20 × 0.6 s): the token-bucket reading of the IETF draft's quota and window, so `q` per `w` is
//! the rate. See [`inbound`] for what happens to a request, and [`http::headers`] for every header.
//!
//! # The client layer
//!
//! ```no_run
//! use std::time::Duration;
//! use tollgate::OutboundRateLimitLayer;
//! use tollgate::core::Quota;
//! use tollgate::outbound::Bucket;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let github = Bucket::new("github:{installation-42}", Quota::per_hour(5000)?.with_burst(100)?);
//!     let client = ServiceBuilder::new()
//!         .layer(OutboundRateLimitLayer::builder(github.fixed()).max_wait(Duration::from_secs(30)).build())
//!         .service(reqwest::Client::new());
//!     let request = reqwest::Request::new(reqwest::Method::GET, "https://api.github.com/rate_limit".parse()?);
//!     match client.oneshot(request).await {
//!         Ok(response) => println!("{}", response.status()),
//!         // Not sent: rate-limited is not failed; reschedule the work.
//!         Err(e) if e.is_rate_limited() => println!("later: {e}"),
//!         Err(e) => return Err(e.into()),
//!     }
//!     Ok(())
//! }
//! ```
//!
//! # The plain Limiter
//!
//! ```
//! use std::time::Duration;
//! use tollgate::Limiter;
//! use tollgate::core::Quota;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let limiter = Limiter::builder()
//!     .limit("webhook", Quota::per_second(10)?.with_burst(2)?)
//!     .build()?;
//! // Wait up to 5 s for a token of this destination.
//! limiter.acquire("webhook", "https://example.com/hook", Duration::from_secs(5)).await?;
//! // Or decide now: rate-limited is not failed, reschedule the delivery.
//! match limiter.check("webhook", "https://example.com/hook").await {
//!     Ok(_grant) => { /* deliver */ }
//!     Err(e) if e.is_rate_limited() => println!("later: {e}"),
//!     Err(e) => return Err(e.into()),
//! }
//! # Ok(())
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]
// `config` exists with the `yaml` feature only: the links point at it when it does, and at the
// features table when it does not.
#![cfg_attr(feature = "yaml", doc = "\n[`config`]: crate::config")]
#![cfg_attr(not(feature = "yaml"), doc = "\n[`config`]: crate#features")]

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

/// The samples of this crate's own README (its crates.io page), likewise.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct CrateReadmeDoctests;

/// The samples of the user guide, likewise.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/guide.md")]
struct GuideDoctests;
