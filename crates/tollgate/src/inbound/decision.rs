//! What the layer decided for a request: [`RateLimitDecision`] (for handlers), and what the
//! service does next ([`Planned`], [`Next`], [`After`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, header};
use tollgate_core::Decision;

use super::plan::{Plan, Slot};
use super::policy::Policy;
use crate::http::headers::HeaderMode;

/// The decision a handler can read from the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitDecision {
    /// The caller's tier.
    pub tier: Arc<str>,
    /// The policy closest to denial (the one reported in the headers).
    pub policy: Arc<str>,
    /// Its decision.
    pub decision: Decision,
    /// Whether the store failed and the failure policy let the request through.
    pub store_error: bool,
}

/// What [`Shared::plan`](super::decide::Shared::plan) found for a request.
pub(crate) enum Planned {
    /// Decided without waiting (an exempt caller, a misconfiguration, the denied-until cache, a
    /// store that answers without I/O): what to do with the request.
    Decided(Next),
    /// The store does I/O: the response future decides the plan
    /// ([`Shared::decide`](super::decide::Shared::decide)).
    ToDecide(Plan),
}

/// What to do with the request.
pub(crate) enum Next {
    /// Call the inner service (after `delay`), adding headers to its response.
    Forward {
        after: Option<After>,
        delay: Duration,
        extension: Option<RateLimitDecision>,
    },
    /// Answer without calling it.
    Respond(Response<Bytes>),
}

impl Next {
    /// Call the inner service at once, with nothing to add.
    pub(crate) fn pass() -> Next {
        Next::Forward {
            after: None,
            delay: Duration::ZERO,
            extension: None,
        }
    }
}

/// The headers to add to the response of a forwarded request.
#[derive(Debug, Clone)]
pub(crate) struct After {
    pub(crate) mode: HeaderMode,
    /// The policy of the request, and which of its limits the headers report.
    pub(crate) policy: Arc<Policy>,
    pub(crate) slot: Slot,
    pub(crate) decision: Decision,
    pub(crate) shadow: bool,
}

impl After {
    pub(crate) fn apply(&self, headers: &mut http::HeaderMap) {
        if let Some(limit) = self.slot.limit(&self.policy) {
            limit.headers.insert(headers, self.mode, &self.decision);
        }
        if self.shadow {
            // The request passed: no Retry-After on it.
            headers.remove(header::RETRY_AFTER);
        }
    }
}
