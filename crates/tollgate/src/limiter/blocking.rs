//! [`Blocking`]: the [`Limiter`](super::Limiter)'s calls for synchronous code.

use std::time::Duration;

use tollgate_core::Decision;

use super::error::LimitError;
use super::limits::Limits;
use super::request::{Grant, Request};

/// The blocking forms of a [`Limiter`](super::Limiter)'s calls (from
/// [`Limiter::blocking`](super::Limiter::blocking)), for code that has no async runtime: a
/// synchronous SDK hook, a worker thread.
///
/// The calls run on the limiter's own runtime (one worker thread named `tollgate-limiter`,
/// started on first use), so they work from any plain thread, several at once. Called from
/// inside an async runtime, where blocking would stall the runtime's own threads, they refuse at
/// once with [`LimitError::InsideRuntime`] instead of deadlocking: `.await` the async methods
/// there.
///
/// ```
/// use std::time::Duration;
/// use tollgate::core::Quota;
/// use tollgate::limiter::Limiter;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let limiter = Limiter::builder()
///     .limit("slack", Quota::per_second(1)?.with_burst(20)?)
///     .build()?;
/// // In a synchronous hook, before each Slack call (seed 000's `acquire(tokens=1, timeout=30)`):
/// limiter
///     .blocking()
///     .acquire("slack", "tier2:workspace-a", Duration::from_secs(30))?;
/// # Ok(())
/// # }
/// ```
///
/// With a store that needs a runtime (Redis), build it in the limiter's runtime with
/// [`LimiterBuilder::store_with`](super::LimiterBuilder::store_with).
#[derive(Debug, Clone, Copy)]
pub struct Blocking<'a> {
    limiter: &'a Limits,
}

/// A blocking call over several limits: see [`Blocking::request`].
#[derive(Debug, Clone, Copy)]
pub struct BlockingRequest<'a> {
    blocking: Blocking<'a>,
    limits: &'a [&'a str],
    identity: &'a str,
    cost: u32,
}

impl<'a> Blocking<'a> {
    pub(super) fn new(limiter: &'a Limits) -> Blocking<'a> {
        Blocking { limiter }
    }

    /// Runs `call` on the limiter's runtime, blocking this thread until it ends.
    fn run<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, LimitError>>,
    ) -> Result<T, LimitError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(LimitError::InsideRuntime);
        }
        self.limiter.runtime()?.block_on(call)
    }

    /// [`Limiter::check`](super::Limiter::check), blocking.
    pub fn check(&self, limit: &str, identity: &str) -> Result<Grant, LimitError> {
        self.run(Request::new(self.limiter, &[limit], identity).check())
    }

    /// [`Limiter::acquire`](super::Limiter::acquire), blocking: sleeps this thread up to
    /// `max_wait`.
    pub fn acquire(
        &self,
        limit: &str,
        identity: &str,
        max_wait: Duration,
    ) -> Result<Grant, LimitError> {
        self.run(Request::new(self.limiter, &[limit], identity).acquire(max_wait))
    }

    /// [`Limiter::pause`](super::Limiter::pause), blocking.
    pub fn pause(&self, limit: &str, identity: &str, duration: Duration) -> Result<(), LimitError> {
        self.run(self.limiter.pause(limit, identity, duration))
    }

    /// [`Limiter::peek`](super::Limiter::peek), blocking.
    pub fn peek(&self, limit: &str, identity: &str) -> Result<Decision, LimitError> {
        self.run(
            Request::new(self.limiter, &[limit], identity)
                .cost(0)
                .peek(),
        )
    }

    /// [`Limiter::request`](super::Limiter::request), blocking.
    pub fn request(&self, limits: &'a [&'a str], identity: &'a str) -> BlockingRequest<'a> {
        BlockingRequest {
            blocking: *self,
            limits,
            identity,
            cost: 1,
        }
    }
}

impl BlockingRequest<'_> {
    /// What the call costs under each of its limits (default 1).
    pub fn cost(mut self, cost: u32) -> Self {
        self.cost = cost;
        self
    }

    /// Decides the call now, all or nothing.
    pub fn check(self) -> Result<Grant, LimitError> {
        let request =
            Request::new(self.blocking.limiter, self.limits, self.identity).cost(self.cost);
        self.blocking.run(request.check())
    }

    /// Waits up to `max_wait` for room in every limit, blocking this thread.
    pub fn acquire(self, max_wait: Duration) -> Result<Grant, LimitError> {
        let request =
            Request::new(self.blocking.limiter, self.limits, self.identity).cost(self.cost);
        self.blocking.run(request.acquire(max_wait))
    }
}
