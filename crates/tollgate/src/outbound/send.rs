//! The one send loop of the outbound layer, shared by its tower service and its
//! `reqwest-middleware` adapter: the upstream failure breaker, the wait for the buckets, the cap
//! on calls in flight, the upstream's signals, the bounded retries of a refused call.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};
use tollgate_core::Limit;

use super::bucket::Bucket;
use super::error::{BoxError, Error, RateLimited};
use super::failures::Failures;
use super::request::{OutboundRequest, OutboundResponse};
use super::upstream::signal;
use crate::limiter::guarded::GuardedStore;
use crate::limiter::wait::{self, Refused};
use crate::metrics as m;

/// How a call waits for its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Wait for a place, up to this long; beyond it fail at once with [`RateLimited`].
    Wait(Duration),
    /// Never wait: fail with [`RateLimited`] when there is no room now.
    Reject,
}

/// State shared by every clone of the layer, its services and its middleware.
pub(super) struct Shared {
    /// The store behind its timeout, breaker and local fallback.
    pub(super) store: Arc<GuardedStore>,
    pub(super) mode: Mode,
    pub(super) retries: u32,
    pub(super) in_flight: Option<Arc<tokio::sync::Semaphore>>,
    /// The upstream failure breaker, when on.
    pub(super) failures: Option<Failures>,
}

impl Shared {
    /// The limits of the buckets, in order.
    fn limits(buckets: &[Bucket]) -> Vec<Limit<'_>> {
        buckets
            .iter()
            .map(|b| Limit::new(&b.key, &b.quota, b.cost))
            .collect()
    }

    /// Waits for room in every bucket (or fails with `RateLimited`).
    async fn acquire(&self, buckets: &[Bucket]) -> Result<(), Error> {
        if buckets.is_empty() {
            return Ok(());
        }
        let max_wait = match self.mode {
            Mode::Wait(d) => d,
            Mode::Reject => Duration::ZERO,
        };
        let limited = |retry_after| {
            Error::from(RateLimited {
                bucket: buckets[0].key.clone(),
                retry_after,
            })
        };
        match wait::acquire(&self.store, &Self::limits(buckets), max_wait).await {
            Ok(waited) => {
                for b in buckets {
                    metrics::histogram!(m::WAIT_SECONDS, "bucket" => Arc::clone(&b.label))
                        .record(waited.as_secs_f64());
                }
                Ok(())
            }
            Err(Refused::Limited { retry_after }) => Err(limited(retry_after)),
            // The outbound layer decides locally while the store is away: never refused for it.
            Err(Refused::Unavailable) => Err(limited(Some(self.store.retry_after_unavailable()))),
        }
    }

    /// Whether any of the buckets is paused now.
    async fn paused(&self, buckets: &[Bucket]) -> bool {
        wait::paused(&self.store, &Self::limits(buckets)).await
    }

    /// Pauses every bucket for what the upstream said.
    async fn adapt(&self, buckets: &[Bucket], status: StatusCode, headers: &HeaderMap) -> bool {
        let Some(signal) = signal(status, headers, SystemTime::now()) else {
            return false;
        };
        for b in buckets {
            if signal.limited {
                metrics::counter!(m::UPSTREAM_LIMITED_TOTAL, "bucket" => Arc::clone(&b.label))
                    .increment(1);
            }
            if b.quota.algorithm().is_bucket() {
                wait::pause(&self.store, &b.key, &b.quota, signal.pause).await;
            } else {
                // Said, not silently dropped: a window's count cannot be moved to a later time.
                tracing::warn!(
                    bucket = %b.label,
                    algorithm = %b.quota.algorithm(),
                    pause = ?signal.pause,
                    "the upstream asked to slow down, but a window bucket cannot be paused: give \
                     this bucket a token_bucket or leaky_bucket quota to honour Retry-After"
                );
            }
        }
        tracing::debug!(pause = ?signal.pause, limited = signal.limited, "upstream asked to slow down");
        signal.limited
    }
}

/// One way of sending a request: the wrapped service, or the rest of a middleware chain.
pub(crate) trait Sender<Req> {
    type Response: OutboundResponse;

    fn send(
        &mut self,
        request: Req,
    ) -> impl Future<Output = Result<Self::Response, BoxError>> + Send;
}

impl Shared {
    /// Sends `request` within its buckets: the upstream failure breaker, the wait, the cap on
    /// calls in flight, the upstream's signals, the bounded retries of a refused call. The one
    /// loop of the tower service and the middleware.
    pub(crate) async fn send<Req, T>(
        &self,
        buckets: &[Bucket],
        mut request: Req,
        sender: &mut T,
    ) -> Result<T::Response, Error>
    where
        Req: OutboundRequest,
        T: Sender<Req>,
    {
        let mut attempt = 0;
        loop {
            if let Some(failures) = &self.failures {
                failures.check(&self.store, buckets).await?;
            }
            self.acquire(buckets).await?;
            let _permit = match &self.in_flight {
                Some(sem) => match Arc::clone(sem).try_acquire_owned() {
                    Ok(permit) => Some(permit),
                    Err(_) => {
                        let permit = Arc::clone(sem)
                            .acquire_owned()
                            .await
                            .map_err(Error::inner)?;
                        if self.paused(buckets).await {
                            // The upstream asked for a pause while this call queued for a slot:
                            // wait for a place after it instead of sending now.
                            continue;
                        }
                        Some(permit)
                    }
                },
                None => None,
            };
            let again = if attempt < self.retries {
                request.try_clone()
            } else {
                None
            };
            let sent = sender.send(request).await;
            if let Some(failures) = &self.failures {
                let failed = sent.as_ref().map_or(true, |r| r.status().is_server_error());
                failures.record(&self.store, buckets, failed).await;
            }
            let response = sent.map_err(Error::inner)?;
            let refused = self
                .adapt(buckets, response.status(), response.headers())
                .await;
            match again {
                Some(next) if refused => {
                    attempt += 1;
                    request = next;
                }
                _ => return Ok(response),
            }
        }
    }
}
