//! Metric names, emitted through the [`metrics`] facade: install any recorder (the example uses
//! `metrics-exporter-prometheus`) to collect them, then call [`describe`] so each metric carries
//! its unit and help text (Prometheus' `# HELP` line; `promtool check metrics` wants one).
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
//! | `rate_limiter_store_compensation_errors_total` | counter | `store`, `op` = undo / cancel / release (a charge or lease that could not be given back) |
//! | `rate_limiter_adaptive_factor` | gauge | `tier` (the adaptive limits: the share of the tier's quota in force, 1 = all of it) |
//!
//! [`ALL`] lists them (name, type, unit, help text) for code that needs the whole set, such as a
//! check that a dashboard names only metrics that exist.
//!
//! # Histograms
//!
//! The two latency metrics span very different ranges: a store call takes tens of microseconds
//! (memory) to milliseconds (Redis), up to its timeout; an outbound call may wait minutes for a
//! token. [`STORE_LATENCY_BUCKETS`] and [`WAIT_BUCKETS`] are bucket bounds suited to each, for a
//! recorder that exports histograms with buckets (so `histogram_quantile` can aggregate a
//! fleet). With `metrics-exporter-prometheus`, as the example server `examples/axum-tiers` does
//! (its `install_metrics`, compiled there; tollgate itself does not depend on the exporter):
//!
//! ```text
//! use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
//! use tollgate::metrics;
//!
//! let handle = PrometheusBuilder::new()
//!     .set_buckets_for_metric(
//!         Matcher::Full(metrics::STORE_LATENCY_SECONDS.to_owned()),
//!         metrics::STORE_LATENCY_BUCKETS,
//!     )?
//!     .set_buckets_for_metric(Matcher::Full(metrics::WAIT_SECONDS.to_owned()), metrics::WAIT_BUCKETS)?
//!     .install_recorder()?;
//! metrics::describe(); // after the recorder is installed: it describes to the installed one
//! ```
//!
//! # Example
//!
//! [`describe`] talks to whichever recorder is installed; here a local one shows what it got:
//!
//! ```
//! use metrics_util::debugging::DebuggingRecorder;
//!
//! let recorder = DebuggingRecorder::new();
//! let snapshotter = recorder.snapshotter();
//! metrics::with_local_recorder(&recorder, || {
//!     tollgate::metrics::describe();
//!     metrics::counter!(tollgate::metrics::BREACHES_TOTAL, "tier" => "basic").increment(1);
//! });
//! let snapshot = snapshotter.snapshot().into_vec();
//! let (key, unit, help, _) = &snapshot[0];
//! assert_eq!(key.key().name(), "rate_limiter_breaches_total");
//! assert_eq!(*unit, Some(metrics::Unit::Count));
//! assert_eq!(help.as_deref(), Some("Requests answered 429 Too Many Requests, by tier."));
//! ```

use metrics::Unit;

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

/// The share of a tier's quota the adaptive limits leave in force (1 = all of it), by `tier`.
pub const ADAPTIVE_FACTOR: &str = "rate_limiter_adaptive_factor";

/// What kind of metric a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetricKind {
    /// A monotonic counter (`_total`).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A distribution of observations.
    Histogram,
}

/// One metric tollgate emits: its name, kind, unit and one-line help text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricInfo {
    /// The metric name (one of this module's constants).
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// The unit of its values.
    pub unit: Unit,
    /// The help text [`describe`] gives it.
    pub help: &'static str,
}

const fn info(name: &'static str, kind: MetricKind, unit: Unit, help: &'static str) -> MetricInfo {
    MetricInfo {
        name,
        kind,
        unit,
        help,
    }
}

/// Every metric tollgate emits (`tollgate-redis` included: its compensation counter is
/// [`COMPENSATION_ERRORS_TOTAL`]), in the order of the table above. [`describe`] describes
/// exactly these.
pub const ALL: &[MetricInfo] = {
    use MetricKind::{Counter, Gauge, Histogram};
    &[
        info(
            REQUESTS_TOTAL,
            Counter,
            Unit::Count,
            "Requests decided by the inbound layer, by tier and outcome \
             (allowed, limited, shadow_limited, store_error).",
        ),
        info(
            TOKENS_CONSUMED_TOTAL,
            Counter,
            Unit::Count,
            "Tokens (request cost) consumed by allowed requests, by tier.",
        ),
        info(
            BREACHES_TOTAL,
            Counter,
            Unit::Count,
            "Requests answered 429 Too Many Requests, by tier.",
        ),
        info(
            STORE_LATENCY_SECONDS,
            Histogram,
            Unit::Seconds,
            "Duration of rate-limit store calls (failed and timed-out ones included), by store.",
        ),
        info(
            STORE_ERRORS_TOTAL,
            Counter,
            Unit::Count,
            "Rate-limit store calls that failed or timed out, by store.",
        ),
        info(
            CIRCUIT_OPEN,
            Gauge,
            Unit::Count,
            "1 while the circuit breaker keeps the store aside (the failure policy decides), \
             else 0, by store.",
        ),
        info(
            WAIT_SECONDS,
            Histogram,
            Unit::Seconds,
            "Time outbound calls and Limiter::acquire waited for a token, by bucket.",
        ),
        info(
            UPSTREAM_LIMITED_TOTAL,
            Counter,
            Unit::Count,
            "Upstream 429 and 503 answers seen by outbound calls, by bucket.",
        ),
        info(
            UPSTREAM_OPEN_TOTAL,
            Counter,
            Unit::Count,
            "Outbound calls refused while their upstream's failure breaker is open, by bucket.",
        ),
        info(
            REJECTIONS_TOTAL,
            Counter,
            Unit::Count,
            "RateLimited answers of the plain Limiter, by limit.",
        ),
        info(
            MISCONFIGURED_TOTAL,
            Counter,
            Unit::Count,
            "Requests the inbound layer answered 500 because the server is set up wrong, by reason.",
        ),
        info(
            COMPENSATION_ERRORS_TOTAL,
            Counter,
            Unit::Count,
            "Compensating store writes that failed (op undo, cancel or release), leaving a charge \
             or a lease until it expires, by store and op.",
        ),
        info(
            ADAPTIVE_FACTOR,
            Gauge,
            Unit::Count,
            "The share of the tier's quota the adaptive limits leave in force (1 = all of it), \
             by tier.",
        ),
    ]
};

/// Bucket upper bounds, in seconds, for [`STORE_LATENCY_SECONDS`]: 25 µs (an in-memory decision)
/// through the milliseconds of a Redis round trip up to 5 s, the outbound layer's default store
/// timeout ([`DEFAULT_OUTBOUND_STORE_TIMEOUT`](crate::outbound::DEFAULT_OUTBOUND_STORE_TIMEOUT));
/// the inbound default, 50 ms, is a bound too. Slower calls land in `+Inf`.
pub const STORE_LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Bucket upper bounds, in seconds, for [`WAIT_SECONDS`]: 1 ms up to 10 minutes, as an outbound
/// call may wait out an upstream's `Retry-After` of minutes.
pub const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0,
];

/// Describes every metric of [`ALL`] (unit and help text) to the installed recorder.
///
/// Call it once after installing the recorder (a recorder installed later has not heard it); it
/// registers no series, so nothing appears before tollgate records a value. Calling it again is
/// harmless.
pub fn describe() {
    for m in ALL {
        match m.kind {
            MetricKind::Counter => metrics::describe_counter!(m.name, m.unit, m.help),
            MetricKind::Gauge => metrics::describe_gauge!(m.name, m.unit, m.help),
            MetricKind::Histogram => metrics::describe_histogram!(m.name, m.unit, m.help),
        }
    }
}

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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString};

    use super::*;

    /// One description a recorder was given: kind, name, unit, help text.
    type Described = (MetricKind, String, Option<Unit>, String);

    /// A recorder that keeps the descriptions it is given.
    #[derive(Default)]
    struct Descriptions(Mutex<Vec<Described>>);

    impl Descriptions {
        fn push(&self, kind: MetricKind, key: KeyName, unit: Option<Unit>, help: SharedString) {
            self.0
                .lock()
                .unwrap()
                .push((kind, key.as_str().to_owned(), unit, help.to_string()));
        }
    }

    impl Recorder for Descriptions {
        fn describe_counter(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
            self.push(MetricKind::Counter, key, unit, help);
        }
        fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
            self.push(MetricKind::Gauge, key, unit, help);
        }
        fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
            self.push(MetricKind::Histogram, key, unit, help);
        }
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    /// The `pub const NAME: &str = "rate_limiter_…";` values of this file.
    fn name_constants() -> BTreeSet<&'static str> {
        include_str!("metrics.rs")
            .lines()
            .filter(|line| line.starts_with("pub const ") && line.contains(": &str = "))
            .filter_map(|line| line.split('"').nth(1))
            .filter(|name| name.starts_with("rate_limiter_"))
            .collect()
    }

    #[test]
    fn describe_gives_every_metric_its_unit_and_help() {
        let recorder = Descriptions::default();
        metrics::with_local_recorder(&recorder, describe);
        let got = recorder.0.into_inner().unwrap();
        let want: Vec<_> = ALL
            .iter()
            .map(|m| (m.kind, m.name.to_owned(), Some(m.unit), m.help.to_owned()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(got.len(), ALL.len(), "{got:?}");
    }

    #[test]
    fn every_metric_name_constant_is_in_all_and_in_the_table() {
        let listed: BTreeSet<&str> = ALL.iter().map(|m| m.name).collect();
        assert_eq!(listed.len(), ALL.len(), "a name is listed twice in ALL");
        let constants = name_constants();
        assert!(
            constants.contains(COMPENSATION_ERRORS_TOTAL),
            "{constants:?}"
        );
        assert_eq!(listed, constants, "ALL and the name constants differ");
        let docs = include_str!("metrics.rs");
        for m in ALL {
            let row = format!("//! | `{}` | ", m.name);
            let kind = match m.kind {
                MetricKind::Counter => "counter",
                MetricKind::Gauge => "gauge",
                MetricKind::Histogram => "histogram",
            };
            assert!(
                docs.contains(&format!("{row}{kind} |")),
                "the module table has no `{}` row of type {kind}",
                m.name
            );
        }
    }

    #[test]
    fn metric_names_and_help_follow_prometheus_conventions() {
        for m in ALL {
            assert!(m.name.starts_with("rate_limiter_"), "{}", m.name);
            assert!(
                m.name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{} is not snake_case",
                m.name
            );
            match m.kind {
                MetricKind::Counter => {
                    assert!(m.name.ends_with("_total"), "{}", m.name);
                    assert_eq!(m.unit, Unit::Count, "{}", m.name);
                }
                MetricKind::Gauge => assert!(!m.name.ends_with("_total"), "{}", m.name),
                MetricKind::Histogram => {
                    assert!(m.name.ends_with("_seconds"), "{}", m.name);
                    assert_eq!(m.unit, Unit::Seconds, "{}", m.name);
                }
            }
            assert!(!m.help.is_empty() && !m.help.contains('\n'), "{}", m.name);
            assert!(!m.help.contains("  "), "{}: {:?}", m.name, m.help);
            assert!(m.help.ends_with('.'), "{}: {:?}", m.name, m.help);
        }
    }

    fn assert_increasing(name: &str, buckets: &[f64]) {
        assert!(!buckets.is_empty(), "{name}");
        assert!(buckets.iter().all(|b| b.is_finite() && *b > 0.0), "{name}");
        for pair in buckets.windows(2) {
            assert!(pair[0] < pair[1], "{name}: {pair:?} out of order");
        }
    }

    #[test]
    fn metric_buckets_cover_their_range() {
        assert_increasing("STORE_LATENCY_BUCKETS", STORE_LATENCY_BUCKETS);
        assert!(
            STORE_LATENCY_BUCKETS[0] <= 50e-6,
            "{STORE_LATENCY_BUCKETS:?}"
        );
        let inbound = crate::limiter::DEFAULT_STORE_TIMEOUT.as_secs_f64();
        assert!(
            STORE_LATENCY_BUCKETS.contains(&inbound),
            "the inbound default timeout {inbound} s is no bound"
        );
        let outbound = crate::outbound::DEFAULT_OUTBOUND_STORE_TIMEOUT.as_secs_f64();
        assert_eq!(STORE_LATENCY_BUCKETS.last(), Some(&outbound));

        assert_increasing("WAIT_BUCKETS", WAIT_BUCKETS);
        assert!(WAIT_BUCKETS[0] <= 0.001, "{WAIT_BUCKETS:?}");
        assert!(WAIT_BUCKETS.last().is_some_and(|b| *b >= 600.0));
    }
}
