//! [`LimitError`] and [`RateLimited`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The call was refused by a limit: not a failure; reschedule it. Its `Display` says when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimited {
    /// The limit that refused (the one whose wait is longest).
    pub limit: Arc<str>,
    /// When a call of the same cost could pass; `None` when it never can (the cost is more than
    /// the limit holds).
    pub retry_after: Option<Duration>,
    /// When the limit is whole again (a window resets, a bucket is full) if nothing else arrives.
    pub reset_after: Duration,
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.retry_after {
            Some(d) => write!(
                f,
                "rate limit `{}` reached: retry in {} (whole again in {})",
                self.limit,
                Seconds(d),
                Seconds(self.reset_after)
            ),
            None => write!(
                f,
                "rate limit `{}`: the call costs more than the limit can ever hold",
                self.limit
            ),
        }
    }
}

impl std::error::Error for RateLimited {}

/// A duration as a person reads it: whole seconds rounded up, or milliseconds below a second.
struct Seconds(Duration);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 >= Duration::from_secs(1) || self.0.is_zero() {
            let secs = crate::http::headers::ceil_secs(self.0);
            write!(f, "{secs} s")
        } else {
            write!(f, "{} ms", self.0.as_micros().div_ceil(1000))
        }
    }
}

/// Why a [`Limiter`](super::Limiter) call did not pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitError {
    /// A limit refused the call: reschedule it ([`RateLimited`] says when).
    #[error(transparent)]
    RateLimited(RateLimited),
    /// The call names a limit the limiter does not have.
    #[error("unknown limit `{name}`")]
    UnknownLimit {
        /// The name.
        name: String,
    },
    /// The call names no limit.
    #[error("the call names no limit")]
    NoLimit,
    /// The identity cannot be a key.
    #[error("invalid identity: {reason}")]
    InvalidIdentity {
        /// Why.
        reason: &'static str,
    },
    /// The call costs more than a limit can ever hold: waiting never helps.
    #[error("the call costs {cost}, more than limit `{limit}` can ever hold ({capacity})")]
    CostTooHigh {
        /// The limit.
        limit: String,
        /// The call's cost.
        cost: u32,
        /// What the limit holds at most.
        capacity: u32,
    },
    /// [`pause`](super::Limiter::pause) was asked of a window limit: only a token or leaky
    /// bucket can be paused (a window's count cannot be moved to a later time).
    #[error(
        "limit `{limit}` is a {algorithm} limit, which cannot be paused: only token_bucket and \
         leaky_bucket limits can"
    )]
    CannotPause {
        /// The limit.
        limit: String,
        /// Its algorithm.
        algorithm: tollgate_core::Algorithm,
    },
    /// The store is unavailable and the failure policy refuses (`fail_closed`).
    #[error("the rate limiter's store is unavailable")]
    Unavailable,
    /// A blocking form was called from inside an async runtime, where blocking would stall (or
    /// deadlock) the runtime's own threads.
    #[error(
        "the Limiter's blocking forms cannot run inside an async runtime: `.await` the async \
         methods instead (or, from a `spawn_blocking` thread, `Handle::current().block_on(..)`)"
    )]
    InsideRuntime,
    /// [`LimiterBuilder::store_with`](super::LimiterBuilder::store_with) could not build the
    /// store.
    #[error("cannot build the Limiter's store: {0}")]
    Store(String),
    /// The blocking forms' runtime could not be started.
    #[error("cannot start the Limiter's runtime for blocking calls: {0}")]
    Runtime(String),
    /// A limit name given twice to the builder.
    #[error("limit `{name}` is given twice")]
    DuplicateLimit {
        /// The name.
        name: String,
    },
    /// A limit name that cannot be part of a key (empty, or with `{` or `}`).
    #[error("invalid limit name `{name}`: it must be non-empty, without `{{` or `}}`")]
    InvalidLimitName {
        /// The name.
        name: String,
    },
}

impl LimitError {
    /// Whether a limit refused the call (reschedule it), as opposed to a mistake or an outage.
    pub fn is_rate_limited(&self) -> bool {
        matches!(self, LimitError::RateLimited(_))
    }

    /// The refusal, when a limit refused the call.
    pub fn rate_limited(&self) -> Option<&RateLimited> {
        match self {
            LimitError::RateLimited(r) => Some(r),
            _ => None,
        }
    }
}
