//! [`Error`], the outbound service's error, and the two refusals it can hold: [`RateLimited`]
//! and [`UpstreamUnavailable`].

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

/// A boxed error: what [`Error::into_inner`] gives, and what the inner service's errors are
/// carried as (the same type as `tower::BoxError`).
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Why an outbound call gave no response.
///
/// Either the layer did not send it, and that is **not a failure of the call** (reschedule it,
/// do not count an attempt): [`rate_limited`](Error::rate_limited) (its buckets had no room in
/// time) or [`upstream_unavailable`](Error::upstream_unavailable) (the upstream failure breaker is
/// open). Or the inner service failed (a transport error, a timeout): [`downcast_ref`] or
/// [`into_inner`](Error::into_inner) reach its error.
///
/// It implements [`std::error::Error`] (its `Display` and `source` are the held error's), so `?`
/// turns it into a `Box<dyn std::error::Error>` (see the [module docs](super)) or a
/// `tower::BoxError` like any other error:
///
/// ```no_run
/// use tollgate::core::Quota;
/// use tollgate::outbound::{Bucket, RateLimitLayer};
/// use tower::{Service, ServiceBuilder, ServiceExt};
///
/// #[tokio::main]
/// async fn main() -> Result<(), tower::BoxError> {
///     let layer = RateLimitLayer::builder(Bucket::new("api", Quota::per_second(5)?).fixed()).build();
///     let mut client = ServiceBuilder::new().layer(layer).service(reqwest::Client::new());
///     let request = reqwest::Request::new(reqwest::Method::GET, "https://example.com/".parse()?);
///     let response = client.ready().await?.call(request).await?;
///     println!("{}", response.status());
///     Ok(())
/// }
/// ```
///
/// A refusal is told apart without downcasting:
///
/// ```
/// use std::time::Duration;
/// use tollgate::outbound::{Error, RateLimited};
///
/// fn reschedule_or_fail(error: Error) -> Result<Duration, Error> {
///     match error.rate_limited() {
///         // Not a failure: try again later.
///         Some(limited) => Ok(limited.retry_after.unwrap_or(Duration::from_secs(60))),
///         None => Err(error),
///     }
/// }
///
/// let limited = Error::from(RateLimited { bucket: "api".into(), retry_after: Some(Duration::from_secs(2)) });
/// assert!(limited.is::<RateLimited>());
/// assert_eq!(reschedule_or_fail(limited).ok(), Some(Duration::from_secs(2)));
/// ```
///
/// [`downcast_ref`]: Error::downcast_ref
pub struct Error {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    RateLimited(RateLimited),
    UpstreamUnavailable(UpstreamUnavailable),
    Inner(BoxError),
}

impl Error {
    /// The inner service's error (or an error of the layer's own machinery).
    pub(crate) fn inner(error: impl Into<BoxError>) -> Error {
        Error {
            kind: Kind::Inner(error.into()),
        }
    }

    /// Whether the call was not sent because its buckets had no room in time: reschedule it.
    pub fn is_rate_limited(&self) -> bool {
        matches!(self.kind, Kind::RateLimited(_))
    }

    /// The refusal, when the call was not sent because its buckets had no room in time.
    pub fn rate_limited(&self) -> Option<&RateLimited> {
        match &self.kind {
            Kind::RateLimited(limited) => Some(limited),
            _ => None,
        }
    }

    /// The refusal, when the call was not sent because the upstream failure breaker is open.
    pub fn upstream_unavailable(&self) -> Option<&UpstreamUnavailable> {
        match &self.kind {
            Kind::UpstreamUnavailable(open) => Some(open),
            _ => None,
        }
    }

    /// Whether the error is a `T`: [`RateLimited`], [`UpstreamUnavailable`], or the inner
    /// service's error type (such as `reqwest::Error`).
    pub fn is<T: StdError + 'static>(&self) -> bool {
        self.downcast_ref::<T>().is_some()
    }

    /// The error as a `T`, if it is one: [`RateLimited`], [`UpstreamUnavailable`], or the inner
    /// service's error type (such as `reqwest::Error`).
    pub fn downcast_ref<T: StdError + 'static>(&self) -> Option<&T> {
        self.as_dyn().downcast_ref::<T>()
    }

    /// The error itself, boxed: the [`RateLimited`] or [`UpstreamUnavailable`], or the inner
    /// service's error as it gave it (so `downcast::<reqwest::Error>()` works on it).
    pub fn into_inner(self) -> BoxError {
        match self.kind {
            Kind::RateLimited(limited) => Box::new(limited),
            Kind::UpstreamUnavailable(open) => Box::new(open),
            Kind::Inner(inner) => inner,
        }
    }

    fn as_dyn(&self) -> &(dyn StdError + 'static) {
        match &self.kind {
            Kind::RateLimited(limited) => limited,
            Kind::UpstreamUnavailable(open) => open,
            Kind::Inner(inner) => &**inner,
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The error it holds, as `{:?}` of a `Box<dyn Error>` would show it.
        match &self.kind {
            Kind::RateLimited(limited) => fmt::Debug::fmt(limited, f),
            Kind::UpstreamUnavailable(open) => fmt::Debug::fmt(open, f),
            Kind::Inner(inner) => fmt::Debug::fmt(inner, f),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.as_dyn(), f)
    }
}

/// Transparent: `source` is the held error's own source, so a chain printed by a reporter does
/// not say the same message twice.
impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.as_dyn().source()
    }
}

impl From<RateLimited> for Error {
    fn from(limited: RateLimited) -> Error {
        Error {
            kind: Kind::RateLimited(limited),
        }
    }
}

impl From<UpstreamUnavailable> for Error {
    fn from(open: UpstreamUnavailable) -> Error {
        Error {
            kind: Kind::UpstreamUnavailable(open),
        }
    }
}

/// The call was not sent: its bucket has no room in time. Not a transport failure; reschedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimited {
    /// The bucket that had no room (the first of the call's buckets).
    pub bucket: String,
    /// When a call of the same cost could go, if it can at all (`None`: the cost exceeds the
    /// bucket's capacity).
    pub retry_after: Option<Duration>,
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.retry_after {
            Some(d) => write!(
                f,
                "rate limited by bucket `{}`: retry in {d:?}",
                self.bucket
            ),
            None => write!(
                f,
                "rate limited by bucket `{}`: the call costs more than the bucket holds",
                self.bucket
            ),
        }
    }
}

impl StdError for RateLimited {}

/// The call was not sent: its upstream failed too often lately and the breaker is open. Not a
/// failure of this call; try again after `retry_after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUnavailable {
    /// The bucket whose upstream is left alone.
    pub bucket: String,
    /// When the breaker lets calls through again.
    pub retry_after: Duration,
}

impl fmt::Display for UpstreamUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the upstream of bucket `{}` failed too often: left alone for {:?} more",
            self.bucket, self.retry_after
        )
    }
}

impl StdError for UpstreamUnavailable {}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    fn limited() -> RateLimited {
        RateLimited {
            bucket: "api".into(),
            retry_after: Some(Duration::from_secs(2)),
        }
    }

    /// An error with a source, as a transport error is.
    #[derive(Debug)]
    struct Outer(io::Error);

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("request failed")
        }
    }

    impl StdError for Outer {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_refusal_is_told_apart_from_a_failure() {
        let refused = Error::from(limited());
        assert!(refused.is_rate_limited());
        assert_eq!(refused.rate_limited(), Some(&limited()));
        assert!(refused.is::<RateLimited>());
        assert!(refused.upstream_unavailable().is_none());
        assert_eq!(refused.to_string(), limited().to_string());
        assert!(refused.source().is_none());
        let back = refused.into_inner().downcast::<RateLimited>().unwrap();
        assert_eq!(*back, limited());

        let open = Error::from(UpstreamUnavailable {
            bucket: "api".into(),
            retry_after: Duration::from_secs(5),
        });
        assert!(!open.is_rate_limited());
        assert_eq!(
            open.upstream_unavailable().unwrap().retry_after,
            Duration::from_secs(5)
        );
        assert!(open.is::<UpstreamUnavailable>() && !open.is::<RateLimited>());
    }

    #[test]
    fn an_inner_error_is_forwarded() {
        let failed = Error::inner(Outer(io::Error::other("connection refused")));
        assert!(!failed.is_rate_limited() && failed.rate_limited().is_none());
        assert!(failed.is::<Outer>() && !failed.is::<RateLimited>());
        assert_eq!(failed.to_string(), "request failed");
        assert_eq!(failed.source().unwrap().to_string(), "connection refused");
        assert_eq!(
            format!("{failed:?}"),
            format!("{:?}", Outer(io::Error::other("connection refused")))
        );
        let inner = failed.into_inner();
        assert!(inner.downcast_ref::<Outer>().is_some());
    }

    #[test]
    fn question_mark_converts_it() {
        fn boxed() -> Result<(), Box<dyn StdError>> {
            Err(Error::from(limited()))?
        }
        fn tower_boxed() -> Result<(), BoxError> {
            Err(Error::from(limited()))?
        }
        let e = boxed().unwrap_err();
        assert!(
            e.downcast_ref::<Error>()
                .is_some_and(Error::is_rate_limited)
        );
        let e = tower_boxed().unwrap_err();
        assert_eq!(e.to_string(), limited().to_string());
    }
}
