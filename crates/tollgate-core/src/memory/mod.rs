//! [`MemoryStore`]: keyed limit state in this process, sharded, bounded.
//!
//! One job per file: this one holds the store type, its shards and the [`Store`] impl;
//! `builder.rs` the [`MemoryStoreBuilder`]; `ops.rs` the operations (decide, peek, reserve,
//! cancel, pause) over the shards they lock; `table.rs` a shard's hash table (keys, entries,
//! sweeping, eviction at the cap); `evicted.rs` the summary of what a full shard forgot.

use std::fmt;
use std::future::{Future, ready};
use std::hash::BuildHasher;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use crate::store::{Limit, Reservation, Reserve, Store, StoreError, Verdict};
use crate::{Clock, Lease, LeaseId, Leased, Quota, SystemClock, Timestamp};

mod builder;
mod evicted;
mod leases;
mod ops;
mod table;

pub use builder::MemoryStoreBuilder;
use leases::LeaseShard;
use table::{Put, Table};

/// The default maximum number of keys a [`MemoryStore`] holds.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// Limit state in this process's memory: the default store, nothing to install.
///
/// * **Keyed and concurrent.** Keys are spread over shards (by default four per core, at least
///   16), each a read-write lock around a hash table. A single-limit token- or leaky-bucket decision
///   on a key the shard already holds takes the read lock and updates the bucket's one number (its
///   theoretical arrival time) with a compare-and-swap, so threads on the same shard, or the same
///   key, do not wait for each other; a denial writes nothing. Everything else (a new key, the
///   window algorithms, several limits at once, reservations, pauses) takes the write lock for a
///   few hundred nanoseconds. A decision over several limits locks their shards in index order, so
///   it is atomic (all or nothing) without deadlock. Clones share the same state.
/// * **Forgets what carries no information.** A key whose state is back to fresh (a full bucket, a
///   window that has passed) is dropped: lazily, by an amortised sweep of its shard as keys are
///   added, or at once with [`purge`](Self::purge).
/// * **Bounded.** It holds at most [`max_keys`](MemoryStoreBuilder::max_keys) keys (default
///   [`DEFAULT_MAX_KEYS`]), so a flood of distinct keys cannot exhaust memory. When a new key arrives
///   at a full shard, expired keys are swept first; if the shard is still full, the store forgets
///   the sampled key that is closest to fresh (earliest expiry among 16).
/// * **Eviction is never more permissive than the quota.** A key forgotten while its state still
///   mattered is folded into a small summary of the shard (one 8-byte slot per key it holds, two
///   slots per key, each the latest expiry folded into it), and a key the shard does not hold
///   starts from the most spent state the summary allows: a forgotten bucket comes back with its
///   own arrival time or a later one, a window exhausted. So no key ever gets more than its quota
///   because it was forgotten. The price, paid only while more keys are live than the cap holds:
///   a new key whose slots are taken by forgotten ones is treated as one of them (refused until
///   they are fresh again). Measured (`eviction_never_gives_a_key_more_than_its_quota`, keys at
///   one request an hour into a cap of 10,000): of the keys beyond the cap, about 6 % are refused
///   at 1.25 × the cap, 34 % at 2 ×, 72 % at 4 ×; under a flood of 100 × the cap nearly every new
///   key is refused. [`MemoryStoreBuilder::remember_evicted`]`(false)` turns the summary off: a
///   forgotten key then starts fresh (one extra quota each time it is forgotten) and no new key is
///   ever refused. Size the cap above the number of keys active within one refill period and
///   neither ever happens.
/// * **Footprint** (64-bit Linux, measured by the `footprint` test with a counting allocator):
///   about 55 bytes per token-bucket key for keys of up to 22 bytes, which are kept inside the
///   entry; longer keys are allocated on their own: 82 bytes per key for the inbound layer's IPv4
///   caller keys (`{ip:10.0.3.57}:t:anonymous`, 25–26 bytes; about 100 bytes of resident memory
///   with the allocator's rounding), 91 for IPv6 ones (36 bytes). Right after a table has grown
///   its part (about 45 bytes a key) doubles. A window-algorithm key adds 32 bytes for its state,
///   and a sliding-window-log key also holds 16 bytes per admitted request still in its window.
///   The eviction summary adds 8 bytes per key of the cap, once the store has evicted.
/// * **Concurrency leases** ([`Store::decide_leased`]) live in tables of their own, sharded by
///   the same hash: per lease key, the id and expiry of each lease held. Expired leases are
///   dropped whenever the key is asked for a lease or one is given back, by an amortised sweep
///   of the shard as new lease keys arrive, and by [`purge`](Self::purge); a key left with none
///   is removed. Leases do not count toward [`max_keys`](MemoryStoreBuilder::max_keys) or
///   [`len`](Self::len): a key holds at most its `max` live leases, and outlives its last lease
///   only until the next sweep. Ids are unique within the store.
///
/// ```
/// use tollgate_core::{Limit, MemoryStore, Quota};
///
/// # fn main() -> Result<(), tollgate_core::QuotaError> {
/// let store = MemoryStore::new();
/// let tier = Quota::per_minute(100)?.with_burst(2)?;
/// let global = Quota::per_second(1000)?;
/// let limits = [Limit::new("user:alice", &tier, 1), Limit::new("global", &global, 1)];
/// assert!(store.decide_now(&limits).is_allowed());
/// assert!(store.decide_now(&limits).is_allowed());
/// let third = store.decide_now(&limits);
/// assert!(!third.is_allowed()); // alice's burst is spent; the global bucket was not charged
/// # Ok(())
/// # }
/// ```
pub struct MemoryStore<C = SystemClock> {
    inner: Arc<Inner<C>>,
}

impl<C> Clone for MemoryStore<C> {
    fn clone(&self) -> Self {
        MemoryStore {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C> fmt::Debug for MemoryStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.inner.shards.len())
            .field("max_keys", &self.inner.max_keys)
            .finish_non_exhaustive()
    }
}

struct Inner<C> {
    shards: Box<[Shard]>,
    hasher: hashbrown::DefaultHashBuilder,
    shard_capacity: usize,
    max_keys: usize,
    clock: C,
    /// The lease tables, one per bucket shard ([`MemoryStore::hash`] picks both).
    leases: Box<[LeaseShard]>,
    /// The next lease id.
    next_lease: AtomicU64,
}

/// One shard, alone on its cache lines so two cores never false-share.
#[repr(align(128))]
struct Shard {
    table: RwLock<Table>,
}

impl Shard {
    fn new(capacity: usize, remember_evicted: bool) -> Shard {
        Shard {
            table: RwLock::new(Table::new(capacity, remember_evicted)),
        }
    }
}

/// Write-locks a shard. A panic while holding a lock cannot leave a table half-written (every
/// update is one assignment), so a poisoned lock is safe to keep using.
fn lock(shard: &Shard) -> RwLockWriteGuard<'_, Table> {
    shard.table.write().unwrap_or_else(PoisonError::into_inner)
}

/// Read-locks a shard (see [`lock`] on poisoning).
fn read(shard: &Shard) -> RwLockReadGuard<'_, Table> {
    shard.table.read().unwrap_or_else(PoisonError::into_inner)
}

impl<C: Clock> MemoryStore<C> {
    /// The store's current time.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// The most keys the store holds.
    pub fn max_keys(&self) -> usize {
        self.inner.max_keys
    }

    /// The number of keys held now (including expired ones not yet swept).
    pub fn len(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| read(s).entries.len())
            .sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every key whose state is back to fresh, in every shard, and every expired
    /// lease.
    pub fn purge(&self) {
        let now = self.now();
        for shard in &*self.inner.shards {
            lock(shard).purge(now);
        }
        for shard in &*self.inner.leases {
            shard.purge(now);
        }
    }

    fn put_at(&self, now: Timestamp) -> Put<'_, hashbrown::DefaultHashBuilder> {
        Put {
            now,
            capacity: self.inner.shard_capacity,
            hasher: &self.inner.hasher,
        }
    }

    fn hash(&self, key: &str) -> (u64, usize) {
        let hash = self.inner.hasher.hash_one(key.as_bytes());
        // hashbrown uses the low bits for the bucket and the top 7 for its tag; take the shard from
        // bits in between so the tables stay evenly spread.
        let shard = (hash >> 32) as usize & (self.inner.shards.len() - 1);
        (hash, shard)
    }
}

impl<C: Clock> Store for MemoryStore<C> {
    fn decide(
        &self,
        limits: &[Limit<'_>],
    ) -> impl Future<Output = Result<Verdict, StoreError>> + Send {
        ready(Ok(self.decide_now(limits)))
    }

    fn peek(
        &self,
        limits: &[Limit<'_>],
    ) -> impl Future<Output = Result<Verdict, StoreError>> + Send {
        ready(Ok(self.peek_now(limits)))
    }

    fn reserve(
        &self,
        limits: &[Limit<'_>],
        max_wait: Duration,
    ) -> impl Future<Output = Result<Reserve, StoreError>> + Send {
        ready(Ok(self.reserve_now(limits, max_wait)))
    }

    fn cancel(
        &self,
        reservation: &Reservation,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.cancel_now(reservation);
        ready(Ok(()))
    }

    fn pause(
        &self,
        key: &str,
        quota: &Quota,
        duration: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        ready(Ok(self.pause_now(key, quota, duration)))
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn decide_now(&self, limits: &[Limit<'_>]) -> Option<Result<Verdict, StoreError>> {
        Some(Ok(MemoryStore::decide_now(self, limits)))
    }

    fn peek_now(&self, limits: &[Limit<'_>]) -> Option<Result<Verdict, StoreError>> {
        Some(Ok(MemoryStore::peek_now(self, limits)))
    }

    fn decide_leased(
        &self,
        limits: &[Limit<'_>],
        lease: &Lease<'_>,
    ) -> impl Future<Output = Result<Leased, StoreError>> + Send {
        ready(Ok(MemoryStore::decide_leased_now(self, limits, lease)))
    }

    fn release(
        &self,
        key: &str,
        id: LeaseId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        MemoryStore::release_now(self, key, id);
        ready(Ok(()))
    }

    fn decide_leased_now(
        &self,
        limits: &[Limit<'_>],
        lease: &Lease<'_>,
    ) -> Option<Result<Leased, StoreError>> {
        Some(Ok(MemoryStore::decide_leased_now(self, limits, lease)))
    }

    fn release_now(&self, key: &str, id: LeaseId) -> Option<Result<(), StoreError>> {
        MemoryStore::release_now(self, key, id);
        Some(Ok(()))
    }
}

#[cfg(test)]
mod tests;
