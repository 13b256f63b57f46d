//! [`ResponseFuture`]: the outbound service's call in progress.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::error::Error;

/// The response future of the outbound [`RateLimit`](super::RateLimit).
///
/// Boxed, unlike the inbound layer's: a call may wait for its buckets, for a slot in flight and
/// for an upstream's pause, then be sent again, which is an `async` loop; one allocation beside a
/// network round trip costs nothing measurable. Naming it keeps the service's type nameable.
pub struct ResponseFuture<R> {
    inner: Pin<Box<dyn Future<Output = Result<R, Error>> + Send>>,
}

impl<R> ResponseFuture<R> {
    pub(super) fn new(call: impl Future<Output = Result<R, Error>> + Send + 'static) -> Self {
        ResponseFuture {
            inner: Box::pin(call),
        }
    }
}

impl<R> Future for ResponseFuture<R> {
    type Output = Result<R, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<R> fmt::Debug for ResponseFuture<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
