//! [`Decision`]: what an algorithm answers for one limit, and [`Outcome`].

use std::time::Duration;

/// Whether a request passes one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The request passes (after [`Decision::delay`] for a leaky bucket).
    Allowed,
    /// Not now: a request of this cost passes after [`Decision::retry_after`], if nobody else spends
    /// the quota in between.
    Denied,
    /// Never: the cost is larger than the quota can ever hold ([`Quota::limit`](crate::Quota::limit)).
    /// Waiting does not help, so [`Decision::retry_after`] is zero.
    InsufficientCapacity,
}

/// The answer of one algorithm for one limit: everything the HTTP headers and an outbound waiter
/// need.
///
/// ```
/// use tollgate_core::{algorithm, Outcome, Quota, Timestamp};
///
/// # fn main() -> Result<(), tollgate_core::QuotaError> {
/// let quota = Quota::per_second(1)?.with_burst(2)?;
/// let now = Timestamp::from_micros(0);
/// let (first, state) = algorithm::decide(None, now, &quota, 1);
/// assert_eq!((first.outcome, first.remaining), (Outcome::Allowed, 1));
/// let (second, state) = algorithm::decide(Some(&state), now, &quota, 1);
/// let (third, _) = algorithm::decide(Some(&state), now, &quota, 1);
/// assert!(second.is_allowed());
/// assert_eq!(third.outcome, Outcome::Denied);
/// assert_eq!(third.retry_after.as_secs(), 1);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Decision {
    /// Allowed, denied, or never possible.
    pub outcome: Outcome,
    /// The quota's [`limit`](crate::Quota::limit): burst, queue length or window limit.
    pub limit: u32,
    /// How many more unit-cost requests would pass right now, after this decision.
    pub remaining: u32,
    /// The time until the quota is whole again (bucket full, window empty) if nothing else arrives.
    pub reset_after: Duration,
    /// For a denial, the time until a request of the same cost would pass; zero otherwise.
    pub retry_after: Duration,
    /// For an allowed request of a leaky bucket, how long it must wait for its turn; zero otherwise.
    pub delay: Duration,
}

impl Decision {
    /// Whether the request passes.
    pub const fn is_allowed(&self) -> bool {
        matches!(self.outcome, Outcome::Allowed)
    }

    pub(crate) const fn from_micros(
        outcome: Outcome,
        limit: u32,
        remaining: u64,
        reset_after: u64,
        retry_after: u64,
        delay: u64,
    ) -> Decision {
        Decision {
            outcome,
            limit,
            remaining: if remaining > u32::MAX as u64 {
                u32::MAX
            } else {
                remaining as u32
            },
            reset_after: Duration::from_micros(reset_after),
            retry_after: Duration::from_micros(retry_after),
            delay: Duration::from_micros(delay),
        }
    }
}
