//! The upstream failure breaker: an upstream that keeps failing (transport errors, 5xx) is left
//! alone for a while, fleet-wide, instead of being hammered by retries.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tollgate_core::{Limit, Quota};

use super::bucket::Bucket;
use super::error::UpstreamUnavailable;
use crate::limiter::guarded::{Guarded, GuardedStore};
use crate::metrics as m;

/// When the upstream failure breaker opens, and for how long ([`RateLimitLayerBuilder::upstream_breaker`](super::RateLimitLayerBuilder::upstream_breaker); off by default).
///
/// After `failures` consecutive failed calls (a transport error or a 5xx) on a call's first
/// bucket, the breaker opens for `recovery`: calls fail at once with [`UpstreamUnavailable`],
/// nothing is sent, and every process sharing the store sees it open (it is a pause of a marker
/// key next to the bucket's). After `recovery` calls go through again (half-open): the first
/// success closes it, a failure opens it again at once. While on, every call costs one store read
/// more (the marker is peeked before the wait).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamBreaker {
    /// Consecutive failures that open it (at least 1).
    pub failures: u32,
    /// How long it stays open.
    pub recovery: Duration,
}

/// The breaker's state in this process: consecutive failures per first bucket.
#[derive(Debug)]
pub(super) struct Failures {
    config: UpstreamBreaker,
    /// Consecutive failures by bucket key; `failures - 1` right after it opened, so that one
    /// failure when it half-opens opens it again.
    counts: Mutex<HashMap<String, u32>>,
}

/// The key marking an open breaker: paused for `recovery` when it opens.
fn marker(key: &str) -> String {
    format!("{key}:upstream-open")
}

impl Failures {
    pub(super) fn new(config: UpstreamBreaker) -> Failures {
        Failures {
            config: UpstreamBreaker {
                failures: config.failures.max(1),
                recovery: config.recovery,
            },
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// `Err` when the breaker of the call's first bucket is open (here or in another process).
    pub(super) async fn check(
        &self,
        store: &GuardedStore,
        buckets: &[Bucket],
    ) -> Result<(), UpstreamUnavailable> {
        let Some(first) = buckets.first() else {
            return Ok(());
        };
        let key = marker(&first.key);
        let quota = marker_quota();
        let peek = [Limit::new(&key, &quota, 1)];
        let verdict = match store.peek(&peek).await {
            Guarded::Store(v) | Guarded::Local(v) => v,
            Guarded::Open | Guarded::Closed => return Ok(()),
        };
        if verdict.is_allowed() && verdict.delay().is_zero() {
            return Ok(());
        }
        metrics::counter!(m::UPSTREAM_OPEN_TOTAL, "bucket" => std::sync::Arc::clone(&first.label))
            .increment(1);
        Err(UpstreamUnavailable {
            bucket: first.key.clone(),
            retry_after: verdict.retry_after().max(verdict.delay()),
        })
    }

    /// Counts the outcome of a sent call; opens the breaker after too many failures in a row.
    pub(super) async fn record(&self, store: &GuardedStore, buckets: &[Bucket], failed: bool) {
        let Some(first) = buckets.first() else {
            return;
        };
        let open = {
            let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
            if !failed {
                counts.remove(&first.key);
                return;
            }
            let count = counts.entry(first.key.clone()).or_insert(0);
            *count += 1;
            if *count >= self.config.failures {
                *count = self.config.failures - 1;
                true
            } else {
                false
            }
        };
        if open {
            tracing::warn!(
                bucket = %first.label,
                recovery = ?self.config.recovery,
                "upstream failed {} times in a row: leaving it alone",
                self.config.failures
            );
            store
                .pause(&marker(&first.key), &marker_quota(), self.config.recovery)
                .await;
        }
    }
}

/// The quota of the breaker's marker key: a token bucket of one, whatever the bucket's own
/// algorithm (a window limit cannot be paused, and the marker only has to say "open until").
fn marker_quota() -> Quota {
    // 1 per second, burst 1: valid by construction.
    Quota::per_second(1).unwrap_or_else(|_| unreachable!("1/s is a valid quota"))
}
