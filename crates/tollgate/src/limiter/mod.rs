//! The plain [`Limiter`]: rate-limit any work, not only HTTP stacks: an SDK call, a webhook
//! delivery, a queue consumer.
//!
//! A limiter holds **named limits**, each a [`Quota`](tollgate_core::Quota), over a store (this process's memory by
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
//! are ([`bounded_key`](crate::http::key::bounded_key)); an empty one, or one over
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

pub mod breaker;
pub(crate) mod guarded;
pub(crate) mod wait;

mod blocking;
mod error;
mod limits;
mod plain;
mod request;
mod reserved;
mod runtime;

pub use blocking::{Blocking, BlockingRequest};
pub use breaker::BreakerConfig;
pub use error::{LimitError, RateLimited};
pub use guarded::{DEFAULT_STORE_TIMEOUT, MAX_STORE_TIMEOUT, OnStoreError};
pub use limits::MAX_IDENTITY_LEN;
pub use plain::{Limiter, LimiterBuilder};
pub use request::{Grant, Request};
pub use reserved::Reserved;
