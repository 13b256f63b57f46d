//! What the outbound layer sends and reads: [`OutboundRequest`] and [`OutboundResponse`], for
//! `http` types and (feature `reqwest`) reqwest's.

use http::{HeaderMap, StatusCode};

/// A request the outbound layer can send: where it goes, and whether it can be sent twice.
///
/// Implemented for `http::Request<B>` (with a `Clone` body) and, with tollgate's feature
/// `reqwest`, for `reqwest::Request`. **"`reqwest::Request: OutboundRequest` not satisfied"**
/// (E0599 on `ready` / `call` / `oneshot`, or E0277) means the feature is off: enable it,
/// `tollgate = { version = "..", features = ["reqwest"] }`.
#[diagnostic::on_unimplemented(
    message = "the outbound rate limiter cannot send a `{Self}`",
    label = "not an `OutboundRequest`",
    note = "for `reqwest::Request`, enable tollgate's feature `reqwest`: tollgate = {{ version = \"..\", features = [\"reqwest\"] }}",
    note = "an `http::Request<B>` needs a body `B: Clone + Send + 'static`; for another request type, implement `tollgate::outbound::OutboundRequest` for it"
)]
pub trait OutboundRequest: Send + 'static {
    /// The upstream host, if known.
    fn host(&self) -> Option<&str>;
    /// A copy to send again after a refusal, if the body allows.
    fn try_clone(&self) -> Option<Self>
    where
        Self: Sized;
}

impl<B: Clone + Send + 'static> OutboundRequest for http::Request<B> {
    fn host(&self) -> Option<&str> {
        self.uri().host()
    }

    fn try_clone(&self) -> Option<Self> {
        let mut copy = http::Request::new(self.body().clone());
        *copy.method_mut() = self.method().clone();
        *copy.uri_mut() = self.uri().clone();
        *copy.version_mut() = self.version();
        *copy.headers_mut() = self.headers().clone();
        Some(copy)
    }
}

/// A response the outbound layer can read the upstream's limits from.
///
/// Implemented for `http::Response<B>` and, with tollgate's feature `reqwest`, for
/// `reqwest::Response` ("`reqwest::Response: OutboundResponse` not satisfied": enable it).
#[diagnostic::on_unimplemented(
    message = "the outbound rate limiter cannot read a `{Self}`",
    label = "not an `OutboundResponse`",
    note = "for `reqwest::Response`, enable tollgate's feature `reqwest`: tollgate = {{ version = \"..\", features = [\"reqwest\"] }}",
    note = "for another response type, implement `tollgate::outbound::OutboundResponse` for it"
)]
pub trait OutboundResponse {
    /// Its status.
    fn status(&self) -> StatusCode;
    /// Its headers.
    fn headers(&self) -> &HeaderMap;
}

impl<B> OutboundResponse for http::Response<B> {
    fn status(&self) -> StatusCode {
        http::Response::status(self)
    }

    fn headers(&self) -> &HeaderMap {
        http::Response::headers(self)
    }
}

#[cfg(feature = "reqwest")]
impl OutboundRequest for reqwest::Request {
    fn host(&self) -> Option<&str> {
        self.url().host_str()
    }

    fn try_clone(&self) -> Option<Self> {
        reqwest::Request::try_clone(self)
    }
}

#[cfg(feature = "reqwest")]
impl OutboundResponse for reqwest::Response {
    fn status(&self) -> StatusCode {
        reqwest::Response::status(self)
    }

    fn headers(&self) -> &HeaderMap {
        reqwest::Response::headers(self)
    }
}
