//! Metric names, emitted through the [`metrics`] facade: install any recorder (the example uses
//! `metrics-exporter-prometheus`) to collect them.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `rate_limiter_requests_total` | counter | `tier`, `outcome` = allowed / limited / shadow_limited / store_error |
//! | `rate_limiter_tokens_consumed_total` | counter | `tier` |
//! | `rate_limiter_breaches_total` | counter | `tier` (one per 429) |
//! | `rate_limiter_store_latency_seconds` | histogram | `store` = memory / redis |
//! | `rate_limiter_store_errors_total` | counter | `store` |
//! | `rate_limiter_circuit_open` | gauge | `store` (1 while the breaker is open) |
//! | `rate_limiter_wait_seconds` | histogram | `bucket` (outbound) |
//! | `rate_limiter_upstream_limited_total` | counter | `bucket` (outbound: upstream 429/503) |
//! | `rate_limiter_upstream_open_total` | counter | `bucket` (outbound: refused while the upstream's failure breaker is open) |
//! | `rate_limiter_rejections_total` | counter | `limit` (the plain limiter: a `RateLimited` returned) |
//! | `rate_limiter_misconfigured_total` | counter | `reason` = no_peer_address / unknown_tier (inbound: answered 500) |
//! | `rate_limiter_store_compensation_errors_total` | counter | `store`, `op` = undo / cancel (a charge that could not be given back) |

/// Requests decided, by `tier` and `outcome`.
pub const REQUESTS_TOTAL: &str = "rate_limiter_requests_total";
/// Tokens (cost) consumed by allowed requests, by `tier`.
pub const TOKENS_CONSUMED_TOTAL: &str = "rate_limiter_tokens_consumed_total";
/// 429 answers, by `tier`.
pub const BREACHES_TOTAL: &str = "rate_limiter_breaches_total";
/// Store call latency, by `store`.
pub const STORE_LATENCY_SECONDS: &str = "rate_limiter_store_latency_seconds";
/// Store calls that failed or timed out, by `store`.
pub const STORE_ERRORS_TOTAL: &str = "rate_limiter_store_errors_total";
/// 1 while the circuit breaker keeps the store aside, by `store`.
pub const CIRCUIT_OPEN: &str = "rate_limiter_circuit_open";
/// Time outbound calls (and the plain limiter's `acquire`) waited for a token, by `bucket` (the
/// bucket's label, or the limit's name).
pub const WAIT_SECONDS: &str = "rate_limiter_wait_seconds";
/// Upstream 429 / 503 answers seen by outbound calls, by `bucket`.
pub const UPSTREAM_LIMITED_TOTAL: &str = "rate_limiter_upstream_limited_total";

/// Outbound calls refused because their upstream's failure breaker is open, by `bucket`.
pub const UPSTREAM_OPEN_TOTAL: &str = "rate_limiter_upstream_open_total";
/// [`RateLimited`](crate::limiter::RateLimited) answers of the plain limiter, by `limit`.
pub const REJECTIONS_TOTAL: &str = "rate_limiter_rejections_total";
/// Requests the inbound layer could not decide as the server is set up (answered 500), by
/// `reason`: `no_peer_address` (the server gives no client address), `unknown_tier` (an
/// extractor returned a tier the policy lacks).
pub const MISCONFIGURED_TOTAL: &str = "rate_limiter_misconfigured_total";
/// Compensating writes that failed, by `store` and `op`: `undo` (a cross-slot charge taken back
/// after a later slot denied) or `cancel` (a reservation given back by a dropped wait). The
/// charge stays until it expires, which errs toward denial.
pub const COMPENSATION_ERRORS_TOTAL: &str = "rate_limiter_store_compensation_errors_total";

/// The `outcome` label values.
pub mod outcome {
    /// The request passed.
    pub const ALLOWED: &str = "allowed";
    /// The request was answered 429.
    pub const LIMITED: &str = "limited";
    /// Shadow mode: it would have been answered 429, and passed.
    pub const SHADOW_LIMITED: &str = "shadow_limited";
    /// The store failed and the failure policy decided.
    pub const STORE_ERROR: &str = "store_error";
}

/// The counters of one tier, registered once (on the tier's first request) instead of building
/// a labelled key on every request.
#[derive(Clone)]
pub(crate) struct TierMetrics {
    pub(crate) allowed: metrics::Counter,
    pub(crate) limited: metrics::Counter,
    pub(crate) shadow_limited: metrics::Counter,
    pub(crate) store_error: metrics::Counter,
    pub(crate) tokens: metrics::Counter,
    pub(crate) breaches: metrics::Counter,
}

impl TierMetrics {
    pub(crate) fn register(tier: &std::sync::Arc<str>) -> TierMetrics {
        use std::sync::Arc;
        let requests = |o: &'static str| metrics::counter!(REQUESTS_TOTAL, "tier" => Arc::clone(tier), "outcome" => o);
        TierMetrics {
            allowed: requests(outcome::ALLOWED),
            limited: requests(outcome::LIMITED),
            shadow_limited: requests(outcome::SHADOW_LIMITED),
            store_error: requests(outcome::STORE_ERROR),
            tokens: metrics::counter!(TOKENS_CONSUMED_TOTAL, "tier" => Arc::clone(tier)),
            breaches: metrics::counter!(BREACHES_TOTAL, "tier" => Arc::clone(tier)),
        }
    }
}

impl std::fmt::Debug for TierMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TierMetrics").finish_non_exhaustive()
    }
}
