//! [`ResponseBody`]: the inner service's body, or one the limiter wrote (a 429, 401 or 503).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The body of a response passing through a rate-limit layer: the inner service's, or a
    /// complete one the limiter wrote.
    ///
    /// It may hold something until it ends, such as a concurrency lease: given back when the
    /// last frame has been read, or when the body is dropped unread.
    ///
    /// The common body (the inner one, holding nothing) is the inner body itself and a tag the
    /// compiler keeps in the body's own spare bits: with axum's `Body` this is 16 bytes, and a
    /// response of it as small as axum's own (a test checks), so moving it through hyper and
    /// axum costs no more than moving theirs. Everything else is boxed.
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        /// The inner service's body, holding nothing.
        Inner {
            #[pin]
            body: B,
        },
        /// A body the limiter wrote, or the inner one with what it holds.
        Other {
            other: Pin<Box<Other<B>>>,
        },
    }
}

pin_project! {
    #[project = OtherProj]
    #[derive(Debug)]
    enum Other<B> {
        /// A complete body (`None` once read).
        Full {
            data: Option<Bytes>,
        },
        /// The inner service's body and what it holds until it ends.
        Holding {
            #[pin]
            body: B,
            held: Held,
        },
    }
}

/// A store call to finish before the body's first frame.
type Before = std::sync::Mutex<Pin<Box<dyn Future<Output = ()> + Send>>>;

/// What a body holds until it ends (`None` once it has).
struct Held(Option<Holding>);

struct Holding {
    /// Let go of (dropped) when the body ends.
    keep: Option<Box<dyn Send + Sync>>,
    /// Finished before the body's first frame, so the client has the whole response only after
    /// it (a charge that the caller's next request must see). A body dropped before hands it to
    /// a task.
    before: Option<Before>,
}

impl Drop for Holding {
    fn drop(&mut self) {
        if let Some(before) = self.before.take() {
            let future = before
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(future);
                }
                Err(_) => tracing::warn!(
                    "a response body was dropped outside a tokio runtime before its store call \
                     finished; the call is abandoned"
                ),
            }
        }
    }
}

impl Held {
    /// Drives the call to finish before the first frame; `Ready` once there is none.
    fn poll_before(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(holding) = &mut self.0 else {
            return Poll::Ready(());
        };
        if let Some(before) = &mut holding.before {
            let future = before
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            std::task::ready!(future.as_mut().poll(cx));
            holding.before = None;
        }
        Poll::Ready(())
    }

    fn pending_before(&self) -> bool {
        self.0.as_ref().is_some_and(|h| h.before.is_some())
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("Nothing"),
            Some(h) => f
                .debug_struct("Held")
                .field("keeps", &h.keep.is_some())
                .field("before", &h.before.is_some())
                .finish(),
        }
    }
}

impl<B> ResponseBody<B> {
    /// Wraps the inner service's body.
    pub fn inner(body: B) -> Self {
        ResponseBody {
            kind: Kind::Inner { body },
        }
    }

    /// Wraps the inner service's body, holding `keep` until the body ends or is dropped, and
    /// finishing `before` ahead of its first frame.
    pub(crate) fn holding(
        body: B,
        keep: Option<Box<dyn Send + Sync>>,
        before: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    ) -> Self {
        ResponseBody {
            kind: Kind::Other {
                other: Box::pin(Other::Holding {
                    body,
                    held: Held(Some(Holding {
                        keep,
                        before: before.map(std::sync::Mutex::new),
                    })),
                }),
            },
        }
    }

    /// A complete body.
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        ResponseBody {
            kind: Kind::Other {
                other: Box::pin(Other::Full {
                    data: (!data.is_empty()).then_some(data),
                }),
            },
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Other { other } => match other.as_mut().project() {
                OtherProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
                OtherProj::Holding { body, held } => {
                    std::task::ready!(held.poll_before(cx));
                    let frame = body.poll_frame(cx);
                    if let Poll::Ready(None) = frame {
                        // The end: let go of what the body held.
                        held.0 = None;
                    }
                    frame
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Other { other } => match &**other {
                Other::Full { data } => data.is_none(),
                Other::Holding { body, held } => !held.pending_before() && body.is_end_stream(),
            },
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Other { other } => match &**other {
                Other::Full { data } => {
                    SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
                }
                Other::Holding { body, .. } => body.size_hint(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A boxed body, as axum's `Body` is.
    type Boxed = Pin<Box<dyn Body<Data = Bytes, Error = std::io::Error> + Send>>;

    /// The common body is the inner one and nothing more: a response of it moves as cheaply as
    /// the inner service's own (at 128 bytes, without a call to `memcpy`).
    #[test]
    fn a_body_holding_nothing_is_as_small_as_the_inner_one() {
        use std::mem::size_of;
        assert_eq!(size_of::<ResponseBody<Boxed>>(), size_of::<Boxed>());
        assert_eq!(
            size_of::<http::Response<ResponseBody<Boxed>>>(),
            size_of::<http::Response<Boxed>>()
        );
    }

    fn frames<B: Body<Data = Bytes> + Unpin>(mut body: B) -> Vec<Bytes>
    where
        B::Error: std::fmt::Debug,
    {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut out = Vec::new();
        while let Poll::Ready(Some(frame)) = Pin::new(&mut body).poll_frame(&mut cx) {
            if let Ok(data) = frame.expect("a frame").into_data() {
                out.push(data);
            }
        }
        assert!(body.is_end_stream());
        out
    }

    #[test]
    fn each_kind_of_body_gives_its_frames_and_ends() {
        let inner = || -> Boxed {
            use http_body_util::BodyExt;
            Box::pin(
                http_body_util::Full::new(Bytes::from_static(b"inner")).map_err(|e| match e {}),
            )
        };
        assert_eq!(
            frames(ResponseBody::inner(inner())),
            [Bytes::from_static(b"inner")]
        );
        assert_eq!(
            frames(ResponseBody::<Boxed>::full("429")),
            [Bytes::from_static(b"429")]
        );
        assert!(frames(ResponseBody::<Boxed>::full("")).is_empty());
        let let_go = std::sync::Arc::new(());
        let kept: Box<dyn Send + Sync> = Box::new(std::sync::Arc::clone(&let_go));
        let mut held = ResponseBody::holding(inner(), Some(kept), None);
        assert_eq!(std::sync::Arc::strong_count(&let_go), 2);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(matches!(
            Pin::new(&mut held).poll_frame(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
        assert_eq!(
            std::sync::Arc::strong_count(&let_go),
            2,
            "held until the end"
        );
        assert!(matches!(
            Pin::new(&mut held).poll_frame(&mut cx),
            Poll::Ready(None)
        ));
        assert_eq!(
            std::sync::Arc::strong_count(&let_go),
            1,
            "let go at the end"
        );
    }
}
