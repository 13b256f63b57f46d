//! [`ResponseFuture`]: finds the caller, decides, then calls the inner service or answers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::decide::Shared;
use super::decision::{After, Extra, Next, Planned};
use super::identity::{Identity, Rejection};
use super::plan::Plan;
use super::policy::Policy;
use crate::http::body::ResponseBody;

type Decision = Pin<Box<dyn Future<Output = Next> + Send>>;

/// The panic of a future polled again after it returned `Ready` (a state's request or response
/// was handed on already), as tower's futures say it: returning `Pending` instead would hang the
/// caller, since no waker was registered.
const POLLED_AFTER_COMPLETION: &str = "tollgate's ResponseFuture polled after completion";

/// What a request carries between states: the ready inner service and the request itself.
struct Pending<S, B> {
    inner: S,
    request: Request<B>,
    shared: Arc<Shared>,
}

pin_project! {
    /// The response future of [`RateLimit`](super::RateLimit).
    ///
    /// A hand-written state machine. With a built-in key extractor and the in-memory store the
    /// decision is made in `call` and the future only carries the inner service's call (or the
    /// answer, or a shaping delay); an extractor that may wait is polled here first; a store
    /// that does I/O (Redis) is awaited through one boxed future.
    pub struct ResponseFuture<F, S, B, KF> {
        #[pin]
        state: State<F, S, B, KF>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, S, B, KF> {
        Identify {
            #[pin]
            identify: KF,
            // The policy is handed over to the decision.
            pending: Option<(Pending<S, B>, Arc<Policy>)>,
        },
        Decide {
            decision: Decision,
            pending: Option<Pending<S, B>>,
        },
        Delay {
            sleep: Pin<Box<tokio::time::Sleep>>,
            pending: Option<Pending<S, B>>,
            after: Option<After>,
            extra: Option<Box<Extra>>,
        },
        Call {
            #[pin]
            call: F,
            after: Option<After>,
            extra: Option<Box<Extra>>,
        },
        Respond {
            // Boxed: a state as big as a response would make every request's future bigger.
            response: Option<Box<Response<Bytes>>>,
        },
    }
}

impl<F, S, B, KF> ResponseFuture<F, S, B, KF> {
    pub(crate) fn identify(
        identify: KF,
        inner: S,
        request: Request<B>,
        shared: Arc<Shared>,
        policy: Arc<Policy>,
    ) -> Self {
        ResponseFuture {
            state: State::Identify {
                identify,
                pending: Some((
                    Pending {
                        inner,
                        request,
                        shared,
                    },
                    policy,
                )),
            },
        }
    }

    pub(crate) fn call(call: F) -> Self {
        ResponseFuture {
            state: State::Call {
                call,
                after: None,
                extra: None,
            },
        }
    }

    /// The inner service was called already; `after` adds the headers to its response.
    pub(crate) fn forwarded(call: F, after: Option<After>, extra: Option<Box<Extra>>) -> Self {
        ResponseFuture {
            state: State::Call { call, after, extra },
        }
    }

    /// Answered without the inner service.
    pub(crate) fn respond(response: Box<Response<Bytes>>) -> Self {
        ResponseFuture {
            state: State::Respond {
                response: Some(response),
            },
        }
    }

    /// Decided already (`next`), by the caller of `call`, with the inner service still to call.
    pub(crate) fn decided(next: Next, inner: S, request: Request<B>, shared: Arc<Shared>) -> Self
    where
        S: Service<Request<B>, Future = F>,
    {
        ResponseFuture {
            state: Self::advance(
                next,
                Pending {
                    inner,
                    request,
                    shared,
                },
            ),
        }
    }

    /// To decide on a store that does I/O.
    pub(crate) fn deciding(plan: Plan, inner: S, request: Request<B>, shared: Arc<Shared>) -> Self {
        ResponseFuture {
            state: State::Decide {
                decision: Box::pin(Arc::clone(&shared).decide(plan)),
                pending: Some(Pending {
                    inner,
                    request,
                    shared,
                }),
            },
        }
    }
}

impl<F, S, B, KF, ResBody, E> Future for ResponseFuture<F, S, B, KF>
where
    S: Service<Request<B>, Response = Response<ResBody>, Error = E, Future = F>,
    F: Future<Output = Result<Response<ResBody>, E>>,
    KF: Future<Output = Result<Identity, Rejection>>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let next = match this.state.as_mut().project() {
                StateProj::Identify { identify, pending } => {
                    let identity = ready!(identify.poll(cx));
                    let (p, policy) = pending.take().expect(POLLED_AFTER_COMPLETION);
                    match identity {
                        Err(rejection) => State::Respond {
                            response: Some(Box::new(p.shared.reject(&rejection))),
                        },
                        Ok(identity) => match p.shared.plan(policy, identity, &p.request) {
                            Planned::Decided(next) => Self::advance(next, p),
                            Planned::ToDecide(plan) => State::Decide {
                                decision: Box::pin(Arc::clone(&p.shared).decide(plan)),
                                pending: Some(p),
                            },
                        },
                    }
                }
                StateProj::Decide { decision, pending } => {
                    let next = ready!(decision.as_mut().poll(cx));
                    let p = pending.take().expect(POLLED_AFTER_COMPLETION);
                    Self::advance(next, p)
                }
                StateProj::Delay {
                    sleep,
                    pending,
                    after,
                    extra,
                } => {
                    ready!(sleep.as_mut().poll(cx));
                    let mut p = pending.take().expect(POLLED_AFTER_COMPLETION);
                    State::Call {
                        call: p.inner.call(p.request),
                        after: after.take(),
                        extra: extra.take(),
                    }
                }
                StateProj::Call { call, after, extra } => {
                    let response = ready!(call.poll(cx))?;
                    let (mut parts, body) = response.into_parts();
                    if let Some(after) = after.take() {
                        after.apply(&mut parts.headers);
                    }
                    let body = match extra.take() {
                        None => ResponseBody::inner(body),
                        Some(extra) => finish(*extra, parts.status, body),
                    };
                    return Poll::Ready(Ok(Response::from_parts(parts, body)));
                }
                StateProj::Respond { response } => {
                    let response = response.take().expect(POLLED_AFTER_COMPLETION);
                    return Poll::Ready(Ok((*response).map(ResponseBody::full)));
                }
            };
            this.state.set(next);
        }
    }
}

impl<F, S, B, KF> ResponseFuture<F, S, B, KF>
where
    S: Service<Request<B>, Future = F>,
{
    fn advance(next: Next, mut p: Pending<S, B>) -> State<F, S, B, KF> {
        match next {
            Next::Respond(response) => State::Respond {
                response: Some(response),
            },
            Next::Forward {
                after,
                delay,
                extension,
                extra,
            } => {
                if let Some(extension) = extension {
                    p.request.extensions_mut().insert(*extension);
                }
                if delay.is_zero() {
                    State::Call {
                        call: p.inner.call(p.request),
                        after,
                        extra,
                    }
                } else {
                    State::Delay {
                        sleep: Box::pin(tokio::time::sleep(delay)),
                        pending: Some(p),
                        after,
                        extra,
                    }
                }
            }
        }
    }
}

/// The end of a request that carried extras: the adaptive controller learns its latency, a
/// failure is charged to a route that charges failures (finished before the body's first frame),
/// and the body holds the lease until it ends.
fn finish<ResBody>(extra: Extra, status: http::StatusCode, body: ResBody) -> ResponseBody<ResBody> {
    let Extra {
        lease,
        charge,
        in_flight,
    } = extra;
    drop(in_flight);
    let before = charge
        .filter(|_| status.as_u16() >= 400)
        .and_then(|charge| {
            if charge.shared.charge_now(&charge.plan) {
                None
            } else {
                let future: Pin<Box<dyn Future<Output = ()> + Send>> =
                    Box::pin(charge.shared.charge(charge.plan));
                Some(future)
            }
        });
    if lease.is_none() && before.is_none() {
        return ResponseBody::inner(body);
    }
    let keep = lease.map(|lease| -> Box<dyn Send + Sync> { Box::new(lease) });
    ResponseBody::holding(body, keep, before)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::Ready;
    use std::task::Waker;

    use super::*;

    type Identify = Ready<Result<Identity, Rejection>>;

    fn answered<S>(_inner: &S) -> ResponseFuture<S::Future, S, (), Identify>
    where
        S: Service<Request<()>>,
    {
        ResponseFuture::respond(Box::new(Response::new(Bytes::from_static(b"no"))))
    }

    #[test]
    #[should_panic(expected = "polled after completion")]
    fn polling_a_finished_future_panics_instead_of_hanging() {
        let inner =
            tower::service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
        let mut future = Box::pin(answered(&inner));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(future.as_mut().poll(&mut cx).is_ready());
        // Returning Pending here, with no waker registered, would hang the caller forever.
        let _ = future.as_mut().poll(&mut cx);
    }
}
