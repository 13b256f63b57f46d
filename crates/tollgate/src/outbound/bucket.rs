//! [`Bucket`]: what a call draws from, and the [`SelectBuckets`] that choose them per call.

use std::sync::Arc;

use tollgate_core::Quota;

use super::request::OutboundRequest;

/// One bucket a call draws from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// The key shared by every process, such as `slack:tier2:workspace-a`. On Redis Cluster, give
    /// the buckets of one call the same hash tag (`{workspace-a}`) to decide them in one step.
    pub key: String,
    /// Its quota.
    pub quota: Quota,
    /// What one call costs (default 1).
    pub cost: u32,
    /// The `bucket` label of the metrics (default: the key). Keep it low-cardinality.
    pub label: Arc<str>,
}

impl Bucket {
    /// A bucket `key` with `quota`, cost 1.
    pub fn new(key: impl Into<String>, quota: Quota) -> Bucket {
        let key = key.into();
        Bucket {
            label: key.as_str().into(),
            key,
            quota,
            cost: 1,
        }
    }

    /// Each call costs `cost`.
    pub fn cost(mut self, cost: u32) -> Bucket {
        self.cost = cost;
        self
    }

    /// The `bucket` label of the metrics.
    pub fn label(mut self, label: &str) -> Bucket {
        self.label = label.into();
        self
    }

    /// A selector giving this bucket to every call.
    pub fn fixed(self) -> FixedBuckets {
        FixedBuckets(Arc::new(vec![self]))
    }
}

/// Chooses the buckets of a call. Implemented for closures `Fn(&Req) -> Vec<Bucket>`.
pub trait SelectBuckets<Req>: Clone + Send + Sync + 'static {
    /// The buckets `request` draws from (all or nothing).
    fn select(&self, request: &Req) -> Vec<Bucket>;
}

impl<Req, F> SelectBuckets<Req> for F
where
    F: Fn(&Req) -> Vec<Bucket> + Clone + Send + Sync + 'static,
{
    fn select(&self, request: &Req) -> Vec<Bucket> {
        self(request)
    }
}

/// The same buckets for every call.
#[derive(Debug, Clone)]
pub struct FixedBuckets(Arc<Vec<Bucket>>);

impl FixedBuckets {
    /// Every call draws from all of `buckets`.
    pub fn new(buckets: Vec<Bucket>) -> FixedBuckets {
        FixedBuckets(Arc::new(buckets))
    }
}

impl<Req> SelectBuckets<Req> for FixedBuckets {
    fn select(&self, _request: &Req) -> Vec<Bucket> {
        self.0.as_ref().clone()
    }
}

/// One bucket per upstream host: `PREFIX:HOST` with `quota`.
#[derive(Debug, Clone)]
pub struct PerHost {
    prefix: Arc<str>,
    quota: Quota,
}

impl PerHost {
    /// Buckets `prefix:host`.
    pub fn new(prefix: &str, quota: Quota) -> PerHost {
        PerHost {
            prefix: prefix.into(),
            quota,
        }
    }
}

impl<Req: OutboundRequest> SelectBuckets<Req> for PerHost {
    fn select(&self, request: &Req) -> Vec<Bucket> {
        let host = request.host().unwrap_or_else(|| {
            // Said, not guessed in silence: every such request shares the one bucket.
            tracing::warn!(
                prefix = %self.prefix,
                "a request without a host: it draws from the shared `{}:unknown` bucket",
                self.prefix
            );
            "unknown"
        });
        vec![Bucket::new(format!("{}:{host}", self.prefix), self.quota).label(&self.prefix)]
    }
}
