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
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
        held: Held,
    }
}

/// A store call to finish before the body's first frame.
type Before = std::sync::Mutex<Pin<Box<dyn Future<Output = ()> + Send>>>;

/// What a body holds until it ends, boxed so the common body carries one pointer.
#[derive(Default)]
pub(crate) struct Held(Option<Box<Holding>>);

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

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        Inner {
            #[pin]
            body: B,
        },
        Full {
            data: Option<Bytes>,
        },
    }
}

impl<B> ResponseBody<B> {
    /// Wraps the inner service's body.
    pub fn inner(body: B) -> Self {
        ResponseBody {
            kind: Kind::Inner { body },
            held: Held(None),
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
            kind: Kind::Inner { body },
            held: Held(Some(Box::new(Holding {
                keep,
                before: before.map(std::sync::Mutex::new),
            }))),
        }
    }

    /// A complete body.
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        ResponseBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
            held: Held(None),
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
        let this = self.project();
        match this.kind.project() {
            KindProj::Inner { body } => {
                std::task::ready!(this.held.poll_before(cx));
                let frame = body.poll_frame(cx);
                if let Poll::Ready(None) = frame {
                    // The end: let go of what the body held.
                    this.held.0 = None;
                }
                frame
            }
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => !self.held.pending_before() && body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
