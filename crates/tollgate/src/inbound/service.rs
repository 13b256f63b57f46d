//! [`RateLimit`]: the service the layer wraps around yours.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::decide::Shared;
use super::decision::{Next, Planned};
use super::future::ResponseFuture;
use super::identity::KeyExtractor;
use crate::http::body::ResponseBody;

/// Rate-limits the requests to an inner service: see the [module docs](super).
///
/// Clones share one state (store, policy, breaker, cache) behind an `Arc`, so the limit holds
/// however the service is cloned or buffered.
#[derive(Clone)]
pub struct RateLimit<S, K> {
    inner: S,
    pub(crate) shared: Arc<Shared>,
    pub(crate) extractor: K,
}

impl<S, K> std::fmt::Debug for RateLimit<S, K>
where
    S: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, K> RateLimit<S, K> {
    pub(crate) fn from_parts(inner: S, shared: Arc<Shared>, extractor: K) -> Self {
        RateLimit {
            inner,
            shared,
            extractor,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The inner service, made ready by `poll_ready`, for a future to call later; a fresh clone
    /// takes its place (made ready by the next `poll_ready`).
    fn take_inner(&mut self) -> S
    where
        S: Clone,
    {
        let clone = self.inner.clone();
        std::mem::replace(&mut self.inner, clone)
    }
}

impl<S, K, B, ResBody> Service<Request<B>> for RateLimit<S, K>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    K: KeyExtractor<B>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, S, B, K::Future>;

    /// Only forwards: inbound limiting never waits for readiness; the decision is made in `call`
    /// or in the response future.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let policy = self.shared.policy.get();
        if policy.is_exempt_path(request.uri().path()) {
            return ResponseFuture::call(self.inner.call(request));
        }
        // An identity known at once and a store that decides without I/O: decided here, and a
        // request that passes calls the inner service (made ready by `poll_ready`) right away.
        if let Some(identity) = self.extractor.extract_now(&request) {
            let identity = match identity {
                Ok(identity) => identity,
                Err(rejection) => {
                    return ResponseFuture::respond(Box::new(self.shared.reject(&rejection)));
                }
            };
            return match self.shared.plan(policy, identity, &request) {
                Planned::Decided(Next::Forward {
                    after,
                    delay,
                    extension,
                    extra,
                }) if delay.is_zero() => {
                    if let Some(extension) = extension {
                        request.extensions_mut().insert(*extension);
                    }
                    ResponseFuture::forwarded(self.inner.call(request), after, extra)
                }
                Planned::Decided(Next::Respond(response)) => ResponseFuture::respond(response),
                // A delay (shaping) or a store that does I/O: the future calls the inner service
                // later.
                Planned::Decided(next) => {
                    let inner = self.take_inner();
                    ResponseFuture::decided(next, inner, request, Arc::clone(&self.shared))
                }
                Planned::ToDecide(plan) => {
                    let inner = self.take_inner();
                    ResponseFuture::deciding(plan, inner, request, Arc::clone(&self.shared))
                }
            };
        }
        let inner = self.take_inner();
        let identify = self.extractor.extract(&request);
        ResponseFuture::identify(identify, inner, request, Arc::clone(&self.shared), policy)
    }
}
