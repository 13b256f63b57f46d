//! The YAML configuration (feature `yaml`): tiers, routes, the global limit, API keys, trusted
//! proxies, headers, shadow mode and the store.
//!
//! ```yaml
//! store: memory                      # or: { redis: { url: "redis://127.0.0.1:6379", prefix: "tollgate", timeout_ms: 50, on_error: local } }
//!                                    #     { redis: { cluster: ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"] } }
//! headers: both                      # ietf | legacy | both | none
//! shadow: false                      # true: decide, count and send headers, but never deny
//! global: { requests_per_second: 1000, burst_limit: 2000 }
//! rate_limits:
//!   anonymous:  { requests_per_minute: 10,   burst_limit: 5 }
//!   basic:      { requests_per_minute: 100,  burst_limit: 20 }
//!   enterprise: { requests_per_minute: 1000, burst_limit: 200, algorithm: sliding_window_log }
//! routes:
//!   - { method: POST, path: /api/reports, cost: 5 }
//!   - { path: /api/search, limit: { requests_per_minute: 30, burst_limit: 10 } }
//! api_keys:
//!   key-alice: { user: alice, tier: basic }
//! trusted_proxies: ["127.0.0.1/32"]
//! client_ip_header: x-forwarded-for     # or forwarded: the one header the proxies write
//! exempt_paths: [/healthz, /metrics]
//! ```
//!
//! `rate_limits` must have a tier `anonymous` (or the one `anonymous_tier: NAME` names): callers
//! without an API key are limited by it, keyed by their address.
//!
//! ```
//! use tollgate::config::Config;
//!
//! # fn main() -> Result<(), tollgate::config::ConfigError> {
//! let config: Config = "
//! rate_limits:
//!   anonymous: { requests_per_minute: 10,  burst_limit: 5 }
//!   basic:     { requests_per_minute: 100, burst_limit: 20 }
//! api_keys:
//!   key-alice: { user: alice, tier: basic }
//! ".parse()?;
//! assert_eq!(config.policy.tier("basic").map(|(_, q)| q.limit()), Some(20));
//! # Ok(())
//! # }
//! ```
//!
//! # Limits
//!
//! A limit (a tier, `global`, a route's `limit`) is written as a rate, `requests_per_second`,
//! `requests_per_minute` or `requests_per_hour` (exactly one), or as `limit` + `window` (`10s`,
//! `1m`, `250ms`...). `algorithm` is `token_bucket` (default), `leaky_bucket`, `fixed_window`,
//! `sliding_window_log` or `sliding_window_counter`.
//!
//! * Token bucket: capacity `burst_limit` (default: the rate's count), refilled at the rate; a
//!   new key starts full. With `limit` + `window`, the capacity is `limit`, refilled over `window`.
//! * Leaky bucket: requests leave at the rate's spacing; `max_delay` (default: the time
//!   `burst_limit` requests take to leave, or none) bounds how long one may wait.
//! * Window algorithms: `limit` requests per `window`; the rate form means `n` per second, minute
//!   or hour. `burst_limit` is accepted and has no effect on them (the window is the burst).
//!
//! Zero or negative rates, a `burst_limit` of 0, unknown keys, a key given twice (a tier, an API
//! key, a field), an unknown tier in `api_keys`, an empty API key, a route `cost` that no tier can
//! hold, a `timeout_ms` over [`MAX_STORE_TIMEOUT`](crate::limiter::MAX_STORE_TIMEOUT), a `store`
//! that is neither `memory` nor `{ redis: ... }`, and a bad duration are errors naming the file,
//! the line and the field. The line is the YAML parser's own: where it met the problem, or, for
//! what is found after reading (a tier an API key names but the file lacks), where the parser
//! finds the field the error names. Errors of [`Config::layer`] and [`Config::limiter`] name the
//! file too ([`Config::source`]).
//!
//! # Reloading
//!
//! A reload swaps the policy ([`PolicyHandle::set`](crate::inbound::PolicyHandle::set)) and the
//! API keys ([`ApiKeys::replace_with`](crate::inbound::ApiKeys::replace_with)); the store,
//! `on_error` and `timeout_ms` are fixed when the layer is built, and [`Config::needs_restart`]
//! lists what of a new file cannot apply. Bucket state is kept: a bucket's state is the time it
//! is full again, read under the new quota, so a caller keeps what it spent (a raised tier
//! refills at its new rate; a tier whose `burst_limit` shrank below what a caller spent is empty
//! for that caller until the debt refills). The denied-until cache is emptied.

mod duration;
mod error;
mod limit;
mod load;
mod position;
mod schema;
mod store;
mod unique;
mod validate;

#[cfg(test)]
mod tests;

pub use duration::{DurationError, parse_duration};
pub use error::ConfigError;
pub use load::Config;
pub use store::StoreConfig;
