//! The outbound layer: rate-limits the requests a client sends, so an upstream's limits are
//! respected by a whole fleet.
//!
//! Wrap any client service — `reqwest::Client` (feature `reqwest`), a hyper client, any
//! `Service<http::Request<B>>` — in [`RateLimitLayer`]. Every call draws from one or more
//! [`Bucket`]s, all or nothing (an API-wide bucket + an endpoint bucket + a per-user bucket), chosen
//! per request by a [`SelectBuckets`] (a closure will do).
//!
//! * **Wait** (default): reserve a place and sleep until it; if the wait would exceed `max_wait`,
//!   fail at once with [`RateLimited`] without consuming anything. Dropping the call while it
//!   waits gives its place back (when nobody reserved after it).
//! * **Reject**: fail fast with [`RateLimited`] when the bucket is empty.
//!
//! The service's error is [`Error`]: *rate-limited is not failed*. [`Error::rate_limited`] says
//! the call was not sent (reschedule it without counting a failure), never a transport error;
//! anything else is the inner service's error. `Error` implements [`std::error::Error`], so `?`
//! turns it into the `Box<dyn std::error::Error>` of a typical `main` (or a `tower::BoxError`).
//!
//! With a `RedisStore` (feature `redis`) every process draws from the same buckets; with the
//! default [`MemoryStore`](tollgate_core::MemoryStore), one process.
//!
//! **Adaptive**: every response is read. A `429` (or a `503` with `Retry-After`) pauses all the
//! request's buckets, fleet-wide through Redis, until the time the upstream gave (`Retry-After`
//! in seconds or as an HTTP-date; one second without a hint); a response saying the upstream's
//! quota is used up (`RateLimit: ...;r=0;t=N`, `X-RateLimit-Remaining: 0` with
//! `X-RateLimit-Reset` as delta, epoch seconds or epoch ms) pauses them the same way before a 429
//! happens. After a pause the bucket refills from empty, so the fleet resumes at the configured
//! rate instead of in a storm. Optionally a refused call is retried after the pause (a bounded
//! number of times, for requests that can be cloned), and the calls in flight are capped.
//!
//! # With reqwest
//!
//! What the example needs in `Cargo.toml`: tollgate's feature `reqwest` (the layer's support for
//! `reqwest::Request` / `reqwest::Response`), and `tower` with its feature `util`
//! (`ServiceBuilder`, `ServiceExt::ready`):
//!
//! ```toml
//! [dependencies]
//! tollgate = { version = "0.1", features = ["reqwest"] }
//! tower = { version = "0.5", features = ["util"] }
//! reqwest = "0.13"
//! tokio = { version = "1", features = ["macros", "rt-multi-thread"] }
//! ```
//!
//! ```no_run
//! use std::time::Duration;
//! use tollgate::core::Quota;
//! use tollgate::outbound::{Bucket, RateLimitLayer};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let github = Bucket::new("github:{installation-42}", Quota::per_hour(5000)?.with_burst(100)?);
//!     let layer = RateLimitLayer::builder(github.fixed())
//!         .max_wait(Duration::from_secs(30))
//!         .retry_limited(2)
//!         .build();
//!     let mut client = ServiceBuilder::new()
//!         .layer(layer)
//!         .service(reqwest::Client::new());
//!
//!     let request = reqwest::Request::new(
//!         reqwest::Method::GET,
//!         "https://api.github.com/rate_limit".parse()?,
//!     );
//!     match client.ready().await?.call(request).await {
//!         Ok(response) => println!("{}", response.status()),
//!         // Not sent: no room in the bucket within 30 s. Not a failure; try again later.
//!         Err(e) if e.is_rate_limited() => println!("later: {e}"),
//!         Err(e) => return Err(e.into()),
//!     }
//!     Ok(())
//! }
//! ```
//!
//! Without the feature `reqwest`, the compiler says "`reqwest::Request: OutboundRequest` not
//! satisfied" ([`OutboundRequest`]; where it reports the bound itself, E0277, it also says to
//! enable the feature). To keep `client.get(url).send()`, use `RateLimitMiddleware` (feature
//! `reqwest-middleware`).
//!
//! # Two `RateLimitLayer`s
//!
//! This module's [`RateLimitLayer`] limits the requests a client *sends*;
//! [`inbound::RateLimitLayer`](crate::inbound::RateLimitLayer) limits the requests a server
//! *receives*. Where both are in scope, write the module path (`outbound::RateLimitLayer`) or use
//! the crate root's aliases [`OutboundRateLimitLayer`](crate::OutboundRateLimitLayer) and
//! [`InboundRateLimitLayer`](crate::InboundRateLimitLayer).

mod bucket;
mod error;
mod failures;
mod future;
mod layer;
#[cfg(feature = "reqwest-middleware")]
mod middleware;
mod request;
mod send;
mod service;
mod upstream;

pub use bucket::{Bucket, FixedBuckets, PerHost, SelectBuckets};
pub use error::{BoxError, Error, RateLimited, UpstreamUnavailable};
pub use failures::UpstreamBreaker;
pub use future::ResponseFuture;
pub use layer::{DEFAULT_OUTBOUND_STORE_TIMEOUT, RateLimitLayer, RateLimitLayerBuilder};
#[cfg(feature = "reqwest-middleware")]
pub use middleware::RateLimitMiddleware;
pub use request::{OutboundRequest, OutboundResponse};
pub use send::Mode;
pub use service::RateLimit;
pub use upstream::{
    MAX_PAUSE, UpstreamSignal, parse_http_date, parse_retry_after, reset_delay, signal,
};
