//! Concurrency leases: a cap on work in flight, shared by every process of a store.
//!
//! A rate limit counts requests as they arrive; a lease counts the ones still running. A caller
//! takes a lease with [`Store::decide_leased`](crate::Store::decide_leased) (in the same atomic
//! step as its limits), and gives it back with [`Store::release`](crate::Store::release) when the
//! work is done. A lease not given back (the holder crashed, or lost the answer to a timeout)
//! expires `ttl` after it was taken, on the store's clock, so the cap heals by itself.
//!
//! ```
//! use std::time::Duration;
//! use tollgate_core::{Lease, MemoryStore, Outcome};
//!
//! let store = MemoryStore::new();
//! let lease = Lease::new("{user:alice}:c:basic", 2, Duration::from_secs(30));
//! let first = store.decide_leased_now(&[], &lease);
//! let second = store.decide_leased_now(&[], &lease);
//! let third = store.decide_leased_now(&[], &lease);
//! assert!(first.lease.is_some() && second.lease.is_some());
//! assert_eq!(third.verdict.outcome(), Outcome::Denied);
//! assert!(third.lease.is_none());
//! // Giving one back frees a place.
//! store.release_now(lease.key, first.lease.unwrap());
//! assert!(store.decide_leased_now(&[], &lease).lease.is_some());
//! ```

use std::time::Duration;

use crate::store::Verdict;

/// A cap on work in flight: at most `max` leases held at once on `key`; a lease not given back
/// expires `ttl` after it was taken (on the store's clock), so a crashed holder frees its leases.
///
/// A `max` of 0 denies every request. The key lives in its own namespace in memory; in Redis it is
/// a key of its own (a sorted set), so it must differ from every limit's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease<'a> {
    /// The key the leases are counted under, such as `"{user:alice}:c:basic"`.
    pub key: &'a str,
    /// The most leases held at once; 0 denies always.
    pub max: u32,
    /// How long a lease lives if it is not given back.
    pub ttl: Duration,
}

impl<'a> Lease<'a> {
    /// At most `max` leases on `key` at once, each expiring `ttl` after it was taken.
    pub const fn new(key: &'a str, max: u32, ttl: Duration) -> Lease<'a> {
        Lease { key, max, ttl }
    }
}

/// One lease held (opaque, unique across processes); give it back with
/// [`Store::release`](crate::Store::release).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(u128);

impl LeaseId {
    /// The id whose number is `v` (a store's own ids come from its `decide_leased`).
    pub const fn from_u128(v: u128) -> LeaseId {
        LeaseId(v)
    }

    /// The id's number, to carry it elsewhere and back with [`from_u128`](Self::from_u128).
    pub const fn as_u128(self) -> u128 {
        self.0
    }
}

/// The answer to [`Store::decide_leased`](crate::Store::decide_leased).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leased {
    /// One decision per limit, in order, then one for the lease.
    pub verdict: Verdict,
    /// The lease taken: `Some` exactly when the verdict allows.
    pub lease: Option<LeaseId>,
}

/// The retry_after a lease denial reports (a store cannot know when a holder finishes).
pub const LEASE_RETRY_AFTER: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;
    use crate::{Limit, Quota, Reservation, Reserve, Store, StoreError, StoreErrorKind};

    /// A store that implements only the required methods, as stores written before leases do.
    struct NoLeases;

    impl Store for NoLeases {
        async fn decide(&self, _: &[Limit<'_>]) -> Result<Verdict, StoreError> {
            Ok(Verdict::new(Vec::new()))
        }
        async fn peek(&self, _: &[Limit<'_>]) -> Result<Verdict, StoreError> {
            Ok(Verdict::new(Vec::new()))
        }
        async fn reserve(&self, _: &[Limit<'_>], _: Duration) -> Result<Reserve, StoreError> {
            Ok(Reserve::Never)
        }
        async fn cancel(&self, _: &Reservation) -> Result<(), StoreError> {
            Ok(())
        }
        async fn pause(&self, _: &str, _: &Quota, _: Duration) -> Result<bool, StoreError> {
            Ok(false)
        }
        fn kind(&self) -> &'static str {
            "plain"
        }
    }

    fn ready_now<F: Future>(f: F) -> F::Output {
        let mut f = pin!(f);
        match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(out) => out,
            Poll::Pending => panic!("the defaults are ready at once"),
        }
    }

    #[test]
    fn a_store_without_leases_says_so() {
        let lease = Lease::new("c", 1, Duration::from_secs(1));
        let e = ready_now(NoLeases.decide_leased(&[], &lease)).expect_err("unsupported");
        assert_eq!(e.kind(), StoreErrorKind::Other);
        assert!(
            e.to_string()
                .contains("does not support concurrency leases"),
            "{e}"
        );
        assert!(e.to_string().contains("plain"), "{e}");
        // Nothing was taken, so there is nothing to give back; no synchronous forms.
        assert!(ready_now(NoLeases.release("c", LeaseId::from_u128(1))).is_ok());
        assert!(NoLeases.decide_leased_now(&[], &lease).is_none());
        assert!(NoLeases.release_now("c", LeaseId::from_u128(1)).is_none());
    }

    #[test]
    fn an_id_round_trips_through_its_number() {
        for v in [0, 1, u128::from(u64::MAX) + 7, u128::MAX] {
            assert_eq!(LeaseId::from_u128(v).as_u128(), v);
        }
        assert_ne!(LeaseId::from_u128(1), LeaseId::from_u128(2));
    }
}
