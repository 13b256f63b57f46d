//! What the layer decided for a request: [`RateLimitDecision`] (for handlers), and what the
//! service does next ([`Planned`], [`Next`], [`After`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, header};
use tollgate_core::Decision;

use super::adaptive::InFlight;
use super::decide::Shared;
use super::plan::{Plan, Slot};
use super::policy::{LimitInfo, Policy};
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
///
/// Kept under 128 bytes (a test checks), like [`Plan`]: what only some requests carry is boxed.
pub(crate) enum Next {
    /// Call the inner service (after `delay`), adding headers to its response.
    Forward {
        after: Option<After>,
        delay: Duration,
        /// The decision for the handler, when the layer hands it on (opt-in).
        extension: Option<Box<RateLimitDecision>>,
        /// What only some requests carry (a lease, a charge on failure, the adaptive
        /// controller's count), boxed so the common request moves less.
        extra: Option<Box<Extra>>,
    },
    /// Answer without calling it.
    Respond(Box<Response<Bytes>>),
}

impl Next {
    /// Answer `response` without calling the inner service.
    pub(crate) fn respond(response: Response<Bytes>) -> Next {
        Next::Respond(Box::new(response))
    }

    /// Call the inner service at once, with nothing to add.
    pub(crate) fn pass() -> Next {
        Next::Forward {
            after: None,
            delay: Duration::ZERO,
            extension: None,
            extra: None,
        }
    }
}

/// What a forwarded request carries besides its headers, when it has any of it.
pub(crate) struct Extra {
    /// The caller's concurrency lease: given back when the response body ends or is dropped.
    pub(crate) lease: Option<LeaseGuard>,
    /// The route's limits to charge if the response fails.
    pub(crate) charge: Option<DeferredCharge>,
    /// The request in flight, for the adaptive controller: its drop records the latency.
    pub(crate) in_flight: Option<InFlight>,
}

/// A concurrency lease held by a request; dropping it gives the lease back: at once on a store
/// without I/O or in the local fallback, else in a task (a lease that cannot be given back
/// expires with its lease time).
pub(crate) struct LeaseGuard {
    pub(crate) shared: Arc<Shared>,
    pub(crate) key: String,
    pub(crate) id: tollgate_core::LeaseId,
    /// Taken in the local fallback, not the store.
    pub(crate) local: bool,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if self
            .shared
            .store
            .release_now(&self.key, self.id, self.local)
        {
            return;
        }
        let shared = Arc::clone(&self.shared);
        let key = std::mem::take(&mut self.key);
        let id = self.id;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { shared.store.release(&key, id, false).await });
            }
            Err(_) => tracing::warn!(
                "a concurrency lease was dropped outside a tokio runtime and cannot be given \
                 back; it frees itself after its lease time"
            ),
        }
    }
}

/// The limits of a route that charges only failures, to charge once the response status is
/// known.
pub(crate) struct DeferredCharge {
    pub(crate) shared: Arc<Shared>,
    pub(crate) plan: Plan,
}

/// The headers to add to the response of a forwarded request.
#[derive(Debug, Clone)]
pub(crate) struct After {
    pub(crate) mode: HeaderMode,
    /// The policy of the request, and which of its limits the headers report.
    pub(crate) policy: Arc<Policy>,
    pub(crate) slot: Slot,
    /// The tier's limit as the adaptive controller lowered it, when the tier binds.
    pub(crate) effective: Option<Arc<LimitInfo>>,
    pub(crate) decision: Decision,
    pub(crate) shadow: bool,
}

impl After {
    pub(crate) fn apply(&self, headers: &mut http::HeaderMap) {
        let limit = self
            .effective
            .as_ref()
            .or_else(|| self.slot.limit(&self.policy));
        if let Some(limit) = limit {
            limit.headers.insert(headers, self.mode, &self.decision);
        }
        if self.shadow {
            // The request passed: no Retry-After on it.
            headers.remove(header::RETRY_AFTER);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `call` builds and hands on for every request stays under 128 bytes: larger, each
    /// move of it is a call to `memcpy` (about 30 instructions) where a smaller one is a few
    /// vector stores.
    #[test]
    fn what_a_request_moves_is_small() {
        assert!(
            std::mem::size_of::<Plan>() <= 128,
            "Plan: {}",
            std::mem::size_of::<Plan>()
        );
        assert!(
            std::mem::size_of::<Next>() <= 128,
            "Next: {}",
            std::mem::size_of::<Next>()
        );
        assert!(
            std::mem::size_of::<Slot>() <= 6,
            "Slot: {}",
            std::mem::size_of::<Slot>()
        );
    }
}
