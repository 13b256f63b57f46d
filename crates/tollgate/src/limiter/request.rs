//! [`Request`]: one call over one or more limits of one identity, and the [`Grant`] it answers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate_core::{Decision, Limit, Quota, Reserve, Verdict};

use super::error::{LimitError, RateLimited};
use super::guarded::Guarded;
use super::limits::Limits;
use super::reserved::Reserved;
use super::wait::{self, Place, Refused};
use crate::metrics as m;

/// What a call that passed learns: the binding limit (the one closest to denial) as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The binding limit's name.
    pub limit: Arc<str>,
    /// How many more unit-cost calls would pass right now.
    pub remaining: u32,
    /// The time until the limit is whole again if nothing else arrives.
    pub reset_after: Duration,
    /// For a shaping (leaky bucket) limit, how long the call must wait for its turn before it
    /// goes ([`check`](super::Limiter::check) does not wait; [`acquire`](super::Limiter::acquire) did).
    pub delay: Duration,
    /// Whether the store failed and the failure policy let the call through (`fail_open`).
    pub store_error: bool,
}

/// A call over one or more limits of one identity: see [`Limiter::request`](super::Limiter::request).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    limiter: &'a Limits,
    limits: &'a [&'a str],
    identity: &'a str,
    cost: u32,
}

impl<'a> Request<'a> {
    /// A call of `identity` over `limits`, cost 1.
    pub(super) fn new(limiter: &'a Limits, limits: &'a [&'a str], identity: &'a str) -> Self {
        Request {
            limiter,
            limits,
            identity,
            cost: 1,
        }
    }

    /// What the call costs under each of its limits (default 1). A cost above what a limit can
    /// ever hold is [`LimitError::CostTooHigh`].
    pub fn cost(mut self, cost: u32) -> Self {
        self.cost = cost;
        self
    }

    /// The keys and the cost checked against the quotas.
    fn prepare(&self) -> Result<Vec<(String, Quota)>, LimitError> {
        let keys = self.limiter.keys(self.limits, self.identity)?;
        for (name, (_, quota)) in self.limits.iter().zip(&keys) {
            if self.cost > quota.limit() {
                return Err(LimitError::CostTooHigh {
                    limit: (*name).to_owned(),
                    cost: self.cost,
                    capacity: quota.limit(),
                });
            }
        }
        Ok(keys)
    }

    /// Decides the call now, all or nothing.
    pub async fn check(self) -> Result<Grant, LimitError> {
        let keys = self.prepare()?;
        let limits = as_limits(&keys, self.cost);
        match self.limiter.store.decide(&limits).await {
            Guarded::Store(verdict) | Guarded::Local(verdict) => self.answer(&verdict),
            Guarded::Open => Ok(self.open()),
            Guarded::Closed => Err(LimitError::Unavailable),
        }
    }

    /// Waits up to `max_wait` for room in every limit: see [`Limiter::acquire`](super::Limiter::acquire).
    pub async fn acquire(self, max_wait: Duration) -> Result<Grant, LimitError> {
        let keys = self.prepare()?;
        let limits = as_limits(&keys, self.cost);
        let store = &self.limiter.store;
        match wait::acquire(store, &limits, max_wait).await {
            Ok(waited) => {
                for name in self.limits {
                    metrics::histogram!(m::WAIT_SECONDS, "bucket" => self.limiter.name(name))
                        .record(waited.as_secs_f64());
                }
                // Where the limits stand now (the charge is made; this reads it back).
                match store.peek(&as_limits(&keys, 0)).await {
                    Guarded::Store(verdict) | Guarded::Local(verdict) => Ok(Grant {
                        // The wait is over: the call goes now.
                        delay: Duration::ZERO,
                        ..self.granted(&verdict, false)
                    }),
                    Guarded::Open | Guarded::Closed => Ok(self.open()),
                }
            }
            Err(Refused::Limited { retry_after }) => {
                // How long until the limits are whole, for the error: read, not charged.
                let reset_after = match store.peek(&as_limits(&keys, 0)).await {
                    Guarded::Store(v) | Guarded::Local(v) => {
                        v.decisions().iter().map(|d| d.reset_after).max()
                    }
                    _ => None,
                }
                .unwrap_or_default();
                Err(self.limiter.rejected(RateLimited {
                    limit: self.limiter.name(self.limits[0]),
                    retry_after,
                    reset_after,
                }))
            }
            Err(Refused::Unavailable) => Err(LimitError::Unavailable),
        }
    }

    /// Takes a place in line at most `max_wait` ahead: see [`Reserved`].
    pub async fn reserve(self, max_wait: Duration) -> Result<Reserved, LimitError> {
        let keys = self.prepare()?;
        let limits = as_limits(&keys, self.cost);
        let store = &self.limiter.store;
        let (reserve, local) = match store.reserve(&limits, max_wait).await {
            Guarded::Store(reserve) => (reserve, false),
            Guarded::Local(reserve) => (reserve, true),
            Guarded::Open => {
                return Ok(Reserved {
                    place: None,
                    at: Instant::now(),
                });
            }
            Guarded::Closed => return Err(LimitError::Unavailable),
        };
        let limited = |retry_after| {
            self.limiter.rejected(RateLimited {
                limit: self.limiter.name(self.limits[0]),
                retry_after,
                reset_after: Duration::ZERO,
            })
        };
        match reserve {
            Reserve::Granted(reservation) => Ok(Reserved {
                at: Instant::now() + reservation.wait(),
                place: Some(Place::new(store, reservation, local)),
            }),
            Reserve::WouldExceed { retry_after } | Reserve::Retry { after: retry_after } => {
                Err(limited(Some(retry_after)))
            }
            Reserve::Never => Err(limited(None)),
        }
    }

    /// Where the call's limits stand, charging nothing: the binding limit's decision for a call
    /// of this cost (cost 0 reports where they stand without a call).
    pub async fn peek(self) -> Result<Decision, LimitError> {
        let keys = self.prepare()?;
        let limits = as_limits(&keys, self.cost);
        match self.limiter.store.peek(&limits).await {
            Guarded::Store(verdict) | Guarded::Local(verdict) => verdict
                .binding()
                .map(|(_, d)| *d)
                .ok_or(LimitError::NoLimit),
            Guarded::Open | Guarded::Closed => Err(LimitError::Unavailable),
        }
    }

    fn answer(&self, verdict: &Verdict) -> Result<Grant, LimitError> {
        if verdict.is_allowed() {
            return Ok(self.granted(verdict, false));
        }
        let Some((i, binding)) = verdict.binding() else {
            return Err(LimitError::NoLimit);
        };
        let retry_after = match binding.outcome {
            tollgate_core::Outcome::InsufficientCapacity => None,
            _ => Some(verdict.retry_after()),
        };
        Err(self.limiter.rejected(RateLimited {
            limit: self.limiter.name(self.limits[i]),
            retry_after,
            reset_after: binding.reset_after,
        }))
    }

    fn granted(&self, verdict: &Verdict, store_error: bool) -> Grant {
        let (i, d) = verdict.binding().map_or((0, None), |(i, d)| (i, Some(*d)));
        Grant {
            limit: self.limiter.name(self.limits[i]),
            remaining: d.map_or(0, |d| d.remaining),
            reset_after: d.map_or(Duration::ZERO, |d| d.reset_after),
            delay: verdict.delay(),
            store_error,
        }
    }

    /// The grant of `fail_open` while the store is away.
    fn open(&self) -> Grant {
        Grant {
            limit: self.limiter.name(self.limits[0]),
            remaining: 0,
            reset_after: Duration::ZERO,
            delay: Duration::ZERO,
            store_error: true,
        }
    }
}

fn as_limits(keys: &[(String, Quota)], cost: u32) -> Vec<Limit<'_>> {
    keys.iter()
        .map(|(key, quota)| Limit::new(key, quota, cost))
        .collect()
}
