//! The outbound layer as a [`reqwest_middleware::Middleware`] (feature `reqwest-middleware`), so
//! `client.get(url).send().await` keeps working.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::Extensions;
use reqwest_middleware::{Middleware, Next};

use super::bucket::SelectBuckets;
use super::error::{BoxError, Error};
use super::layer::RateLimitLayer;
use super::send::{Sender, Shared};

/// The outbound layer's behaviour (waits for the buckets, pauses on a 429 or a quota used up,
/// retries a refused call, the upstream failure breaker) as a `reqwest-middleware` middleware.
///
/// A call refused locally fails with `reqwest_middleware::Error::Middleware` holding a
/// [`RateLimited`](super::RateLimited) (or an
/// [`UpstreamUnavailable`](super::UpstreamUnavailable)): `err.downcast_ref::<RateLimited>()` on the
/// `anyhow::Error` tells it from a transport failure.
///
/// Needs tollgate's feature `reqwest-middleware` (which turns on `reqwest`).
///
/// ```no_run
/// use std::time::Duration;
/// use tollgate::core::Quota;
/// use tollgate::outbound::{Bucket, RateLimitLayer, RateLimitMiddleware};
///
/// #[tokio::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let layer = RateLimitLayer::builder(Bucket::new("github", Quota::per_hour(5000)?).fixed())
///         .max_wait(Duration::from_secs(30))
///         .build();
///     let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///         .with(RateLimitMiddleware::new(layer))
///         .build();
///     let response = client.get("https://api.github.com/rate_limit").send().await?;
///     println!("{}", response.status());
///     Ok(())
/// }
/// ```
#[derive(Clone)]
pub struct RateLimitMiddleware<Sel> {
    shared: Arc<Shared>,
    select: Sel,
}

impl<Sel> std::fmt::Debug for RateLimitMiddleware<Sel> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitMiddleware")
            .finish_non_exhaustive()
    }
}

impl<Sel> RateLimitMiddleware<Sel> {
    /// The middleware of a built layer: same buckets, same store, same settings.
    pub fn new(layer: RateLimitLayer<Sel>) -> RateLimitMiddleware<Sel> {
        RateLimitMiddleware {
            shared: layer.shared,
            select: layer.select,
        }
    }
}

/// The rest of the middleware chain as a [`Sender`].
struct NextSender<'a> {
    next: Next<'a>,
    extensions: &'a mut Extensions,
}

impl Sender<reqwest::Request> for NextSender<'_> {
    type Response = reqwest::Response;

    fn send(
        &mut self,
        request: reqwest::Request,
    ) -> impl Future<Output = Result<reqwest::Response, BoxError>> + Send {
        let next = self.next.clone();
        let extensions = &mut *self.extensions;
        async move {
            next.run(request, extensions).await.map_err(|e| match e {
                reqwest_middleware::Error::Reqwest(e) => Box::new(e) as BoxError,
                reqwest_middleware::Error::Middleware(e) => e.into(),
            })
        }
    }
}

/// A refusal or a failure as a middleware error, keeping the types users downcast to.
fn to_middleware_error(error: Error) -> reqwest_middleware::Error {
    if let Some(limited) = error.rate_limited() {
        return reqwest_middleware::Error::middleware(limited.clone());
    }
    if let Some(open) = error.upstream_unavailable() {
        return reqwest_middleware::Error::middleware(open.clone());
    }
    match error.into_inner().downcast::<reqwest::Error>() {
        Ok(e) => reqwest_middleware::Error::Reqwest(*e),
        Err(other) => reqwest_middleware::Error::Middleware(anyhow::Error::from_boxed(other)),
    }
}

impl<Sel> Middleware for RateLimitMiddleware<Sel>
where
    Sel: SelectBuckets<reqwest::Request>,
{
    fn handle<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        request: reqwest::Request,
        extensions: &'life1 mut Extensions,
        next: Next<'life2>,
    ) -> Pin<
        Box<
            dyn Future<Output = reqwest_middleware::Result<reqwest::Response>>
                + Send
                + 'async_trait,
        >,
    >
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let buckets = self.select.select(&request);
            let mut sender = NextSender { next, extensions };
            self.shared
                .send(&buckets, request, &mut sender)
                .await
                .map_err(to_middleware_error)
        })
    }
}
