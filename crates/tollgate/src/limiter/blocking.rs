//! [`Blocking`]: the [`Limiter`]'s calls for synchronous code.

use std::time::Duration;

use tollgate_core::Decision;

use super::{Grant, LimitError, Limiter};

/// The blocking forms of a [`Limiter`]'s calls (from [`Limiter::blocking`]), for code that has no
/// async runtime: a synchronous SDK hook, a worker thread.
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
    limiter: &'a Limiter,
}

/// A blocking call over several limits: see [`Blocking::request`].
#[derive(Debug, Clone, Copy)]
pub struct BlockingRequest<'a> {
    blocking: Blocking<'a>,
    limits: &'a [&'a str],
    identity: &'a str,
    cost: u32,
}

/// The runtime of the blocking forms. Dropped, it shuts down in the background: a limiter may be
/// dropped anywhere, an async task included, where dropping a runtime the usual way (waiting for
/// its threads) would panic.
#[derive(Debug)]
pub(super) struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl OwnRuntime {
    pub(super) fn start() -> Result<OwnRuntime, LimitError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tollgate-limiter")
            .enable_all()
            .build()
            .map(|runtime| OwnRuntime(Some(runtime)))
            .map_err(|e| LimitError::Runtime(e.to_string()))
    }

    pub(super) fn get(&self) -> Result<&tokio::runtime::Runtime, LimitError> {
        self.0
            .as_ref()
            .ok_or_else(|| LimitError::Runtime("the runtime was shut down".into()))
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl<'a> Blocking<'a> {
    pub(super) fn new(limiter: &'a Limiter) -> Blocking<'a> {
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
        let inner = &self.limiter.inner;
        let runtime = match inner.runtime.get() {
            Some(runtime) => runtime,
            None => {
                // Another thread may start one meanwhile: either serves, the other is dropped.
                let _ = inner.runtime.set(OwnRuntime::start()?);
                inner
                    .runtime
                    .get()
                    .ok_or_else(|| LimitError::Runtime("no runtime after starting one".into()))?
            }
        };
        runtime.get()?.block_on(call)
    }

    /// [`Limiter::check`], blocking.
    pub fn check(&self, limit: &str, identity: &str) -> Result<Grant, LimitError> {
        self.run(self.limiter.check(limit, identity))
    }

    /// [`Limiter::acquire`], blocking: sleeps this thread up to `max_wait`.
    pub fn acquire(
        &self,
        limit: &str,
        identity: &str,
        max_wait: Duration,
    ) -> Result<Grant, LimitError> {
        self.run(self.limiter.acquire(limit, identity, max_wait))
    }

    /// [`Limiter::pause`], blocking.
    pub fn pause(&self, limit: &str, identity: &str, duration: Duration) -> Result<(), LimitError> {
        self.run(self.limiter.pause(limit, identity, duration))
    }

    /// [`Limiter::peek`], blocking.
    pub fn peek(&self, limit: &str, identity: &str) -> Result<Decision, LimitError> {
        self.run(self.limiter.peek(limit, identity))
    }

    /// [`Limiter::request`], blocking.
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
        let request = self
            .blocking
            .limiter
            .request(self.limits, self.identity)
            .cost(self.cost);
        self.blocking.run(request.check())
    }

    /// Waits up to `max_wait` for room in every limit, blocking this thread.
    pub fn acquire(self, max_wait: Duration) -> Result<Grant, LimitError> {
        let request = self
            .blocking
            .limiter
            .request(self.limits, self.identity)
            .cost(self.cost);
        self.blocking.run(request.acquire(max_wait))
    }
}
