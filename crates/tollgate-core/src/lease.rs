//! Concurrency leases: a cap on work in flight, taken with a decision.

use std::time::Duration;

use crate::Verdict;

/// A cap on work in flight: at most `max` leases held at once on `key`; a lease not given back
/// expires `ttl` after it was taken (on the store's clock), so a crashed holder frees its leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease<'a> {
    /// The key of the lease set.
    pub key: &'a str,
    /// The most leases held at once.
    pub max: u32,
    /// How long a lease lives if it is never given back.
    pub ttl: Duration,
}

impl<'a> Lease<'a> {
    /// At most `max` leases on `key`, each expiring after `ttl`.
    pub const fn new(key: &'a str, max: u32, ttl: Duration) -> Lease<'a> {
        Lease { key, max, ttl }
    }
}

/// One lease held (opaque, unique across processes); give it back with
/// [`Store::release`](crate::Store::release).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(u128);

impl LeaseId {
    /// The id with this value.
    pub const fn from_u128(v: u128) -> LeaseId {
        LeaseId(v)
    }

    /// The id's value.
    pub const fn as_u128(self) -> u128 {
        self.0
    }
}

/// The answer to [`Store::decide_leased`](crate::Store::decide_leased).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leased {
    /// The decisions of the limits, then the lease's.
    pub verdict: Verdict,
    /// The lease taken, exactly when the verdict allows.
    pub lease: Option<LeaseId>,
}

/// The `retry_after` a lease denial reports (a store cannot know when a holder finishes).
pub const LEASE_RETRY_AFTER: Duration = Duration::from_secs(1);
