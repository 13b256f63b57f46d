//! Concurrency leases in memory: per lease key a small list of (id, expiry), in tables of their
//! own (sharded by the same hash as the buckets), locked around the limits' decision so the two
//! are one atomic step.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::MemoryStore;
#[cfg(doc)]
use crate::store::Store;
use crate::store::{Limit, Verdict};
use crate::{Clock, Decision, LEASE_RETRY_AFTER, Lease, LeaseId, Leased, Outcome, Timestamp};

/// A shard's lease table is swept for keys whose leases all expired no more often than this
/// many keys.
const MIN_SWEEP: usize = 64;

/// A shard's leases: per key, the leases held and when each expires.
#[derive(Default)]
struct Held {
    keys: HashMap<Box<str>, Vec<(LeaseId, Timestamp)>>,
    /// The number of keys at which the next new key sweeps the table first: twice the keys left
    /// after the last sweep, so sweeping costs O(1) per key added, amortised. A key whose holders
    /// never gave their leases back and that nobody asks again is dropped by the next sweep.
    sweep_at: usize,
}

impl Held {
    /// Forgets every expired lease, and the keys left with none.
    fn sweep(&mut self, now: Timestamp) {
        self.keys.retain(|_, leases| {
            leases.retain(|&(_, expires)| expires > now);
            !leases.is_empty()
        });
        self.sweep_at = (self.keys.len() * 2).max(MIN_SWEEP);
    }
}

/// One shard of the lease tables, alone on its cache lines as the bucket shards are.
#[derive(Default)]
#[repr(align(128))]
pub(super) struct LeaseShard {
    held: Mutex<Held>,
}

impl LeaseShard {
    /// Locks the shard. Every update is a single push, retain or removal, so a panic while
    /// holding the lock cannot leave a list half-written: a poisoned lock is safe to keep using.
    fn lock(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets every expired lease, and the keys left with none.
    pub(super) fn purge(&self, now: Timestamp) {
        self.lock().sweep(now);
    }
}

/// The lease's row of a verdict: `held` leases held before this request, `taken` whether it took
/// one.
fn lease_decision(lease: &Lease<'_>, held: usize, taken: bool) -> Decision {
    let max = lease.max as usize;
    let full = held >= max;
    let after = if taken { held + 1 } else { held };
    Decision {
        outcome: if full {
            Outcome::Denied
        } else {
            Outcome::Allowed
        },
        limit: lease.max,
        remaining: u32::try_from(max.saturating_sub(after)).unwrap_or(u32::MAX),
        reset_after: Duration::ZERO,
        retry_after: if full {
            LEASE_RETRY_AFTER
        } else {
            Duration::ZERO
        },
        delay: Duration::ZERO,
    }
}

impl<C: Clock> MemoryStore<C> {
    fn lease_shard(&self, key: &str) -> &LeaseShard {
        &self.inner.leases[self.hash(key).1]
    }

    /// [`Store::decide_leased`] without the future: decides `limits` and takes one lease of
    /// `lease`, all or nothing.
    ///
    /// The lease key's shard stays locked while the limits are decided (their shards are locked
    /// after it, never before, so no two calls wait for each other in a cycle), which makes the
    /// count of leases and the limits' charge one atomic step.
    pub fn decide_leased_now(&self, limits: &[Limit<'_>], lease: &Lease<'_>) -> Leased {
        let shard = self.lease_shard(lease.key);
        let mut table = shard.lock();
        let now = self.now();
        let held = match table.keys.get_mut(lease.key) {
            Some(leases) => {
                leases.retain(|&(_, expires)| expires > now);
                if leases.is_empty() {
                    table.keys.remove(lease.key);
                    0
                } else {
                    leases.len()
                }
            }
            None => 0,
        };
        if held >= lease.max as usize {
            // Full: the limits are not decided, only reported as they stand.
            let mut decisions = self.stand_now(limits).decisions().to_vec();
            decisions.push(lease_decision(lease, held, false));
            return Leased {
                verdict: Verdict::new(decisions),
                lease: None,
            };
        }
        let verdict = self.decide_now(limits);
        let taken = verdict.is_allowed();
        let mut decisions = verdict.decisions().to_vec();
        decisions.push(lease_decision(lease, held, taken));
        let id = taken.then(|| {
            let id = LeaseId::from_u128(u128::from(
                self.inner.next_lease.fetch_add(1, Ordering::Relaxed),
            ));
            if held == 0 && table.keys.len() >= table.sweep_at {
                table.sweep(now);
            }
            table
                .keys
                .entry(lease.key.into())
                .or_default()
                .push((id, now + lease.ttl));
            id
        });
        Leased {
            verdict: Verdict::new(decisions),
            lease: id,
        }
    }

    /// [`Store::release`] without the future: gives the lease `id` on `key` back. An expired or
    /// unknown id changes nothing.
    pub fn release_now(&self, key: &str, id: LeaseId) {
        let now = self.now();
        let mut table = self.lease_shard(key).lock();
        if let Some(leases) = table.keys.get_mut(key) {
            leases.retain(|&(held, expires)| held != id && expires > now);
            if leases.is_empty() {
                table.keys.remove(key);
            }
        }
    }

    /// How many unexpired leases are held on `key` now.
    pub fn leases_held(&self, key: &str) -> usize {
        let now = self.now();
        self.lease_shard(key)
            .lock()
            .keys
            .get(key)
            .map_or(0, |leases| leases.iter().filter(|&&(_, e)| e > now).count())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::pin::pin;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;
    use std::task::{Context, Poll, Waker};

    use super::*;
    use crate::{DynStore, ManualClock, Quota, Store};

    const T0: Timestamp = Timestamp::from_micros(1_795_305_600_000_000);
    const TTL: Duration = Duration::from_millis(300);

    fn store() -> (MemoryStore<ManualClock>, ManualClock) {
        let clock = ManualClock::new(T0);
        (MemoryStore::builder().clock(clock.clone()).build(), clock)
    }

    /// The number of keys the lease tables hold, expired leases included.
    fn lease_keys<C>(store: &MemoryStore<C>) -> usize {
        store.inner.leases.iter().map(|s| s.lock().keys.len()).sum()
    }

    #[test]
    fn the_cap_is_exact_from_many_threads() {
        let (store, _) = store();
        let lease = Lease::new("{user:alice}:c:basic", 7, TTL);
        let granted = std::sync::Mutex::new(Vec::new());
        let denied = AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..200 {
                        let leased = store.decide_leased_now(&[], &lease);
                        assert_eq!(leased.lease.is_some(), leased.verdict.is_allowed());
                        match leased.lease {
                            Some(id) => granted.lock().unwrap().push(id),
                            None => {
                                denied.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        let granted = granted.into_inner().unwrap();
        assert_eq!(
            granted.len(),
            7,
            "the clock did not move: exactly max leases"
        );
        assert_eq!(denied.into_inner(), 8 * 200 - 7);
        let distinct: HashSet<LeaseId> = granted.iter().copied().collect();
        assert_eq!(distinct.len(), 7, "ids are unique");
        assert_eq!(store.leases_held(lease.key), 7);
    }

    #[test]
    fn the_lease_row_reports_max_and_what_is_free() {
        let (store, _) = store();
        let lease = Lease::new("c", 2, TTL);
        let first = store.decide_leased_now(&[], &lease);
        let row = first.verdict.decisions()[0];
        assert_eq!(first.verdict.decisions().len(), 1, "lease only: one row");
        assert_eq!(
            (row.outcome, row.limit, row.remaining),
            (Outcome::Allowed, 2, 1)
        );
        assert_eq!(
            (row.retry_after, row.reset_after, row.delay),
            (Duration::ZERO, Duration::ZERO, Duration::ZERO)
        );
        let second = store.decide_leased_now(&[], &lease);
        assert_eq!(second.verdict.decisions()[0].remaining, 0);
        let third = store.decide_leased_now(&[], &lease);
        let row = third.verdict.decisions()[0];
        assert_eq!(
            (row.outcome, row.limit, row.remaining),
            (Outcome::Denied, 2, 0)
        );
        assert_eq!(row.retry_after, LEASE_RETRY_AFTER);
        assert_eq!(third.verdict.retry_after(), LEASE_RETRY_AFTER);
        assert!(third.lease.is_none());
    }

    #[test]
    fn a_release_frees_one_and_is_idempotent() {
        let (store, _) = store();
        let lease = Lease::new("c", 2, TTL);
        let a = store.decide_leased_now(&[], &lease).lease.expect("first");
        let b = store.decide_leased_now(&[], &lease).lease.expect("second");
        assert_ne!(a, b);
        assert!(store.decide_leased_now(&[], &lease).lease.is_none());
        store.release_now("c", a);
        assert_eq!(store.leases_held("c"), 1);
        // Twice, an unknown id, another key: nothing more is freed.
        store.release_now("c", a);
        store.release_now("c", LeaseId::from_u128(u128::MAX));
        store.release_now("other", b);
        assert_eq!(store.leases_held("c"), 1);
        let c = store
            .decide_leased_now(&[], &lease)
            .lease
            .expect("the freed place");
        assert!(store.decide_leased_now(&[], &lease).lease.is_none());
        store.release_now("c", b);
        store.release_now("c", c);
        assert_eq!(store.leases_held("c"), 0);
        assert_eq!(lease_keys(&store), 0, "a key with no leases is removed");
    }

    #[test]
    fn leases_not_given_back_expire_on_the_store_clock() {
        let (store, clock) = store();
        let lease = Lease::new("c", 3, TTL);
        for _ in 0..3 {
            assert!(store.decide_leased_now(&[], &lease).lease.is_some());
        }
        clock.advance(TTL - Duration::from_micros(1));
        assert!(
            store.decide_leased_now(&[], &lease).lease.is_none(),
            "not yet expired"
        );
        clock.advance(Duration::from_micros(1));
        assert_eq!(store.leases_held("c"), 0, "expired at taken + ttl");
        let leased = store.decide_leased_now(&[], &lease);
        assert!(leased.lease.is_some());
        assert_eq!(
            leased.verdict.decisions()[0].remaining,
            2,
            "the expired ones were pruned"
        );
        // Expired leases of a key nobody asks again are dropped by purge.
        clock.advance(TTL);
        assert_eq!(lease_keys(&store), 1);
        store.purge();
        assert_eq!(lease_keys(&store), 0);
    }

    #[test]
    fn keys_whose_leases_all_expired_are_swept_as_new_keys_arrive() {
        let clock = ManualClock::new(T0);
        let store = MemoryStore::builder()
            .clock(clock.clone())
            .shards(1)
            .build();
        // Holders that never give back, on keys nobody asks again.
        for i in 0..1_000 {
            let key = format!("crashed:{i}");
            assert!(
                store
                    .decide_leased_now(&[], &Lease::new(&key, 1, TTL))
                    .lease
                    .is_some()
            );
        }
        assert_eq!(lease_keys(&store), 1_000, "all live");
        clock.advance(TTL);
        for i in 0..1_000 {
            let key = format!("new:{i}");
            assert!(
                store
                    .decide_leased_now(&[], &Lease::new(&key, 1, TTL))
                    .lease
                    .is_some()
            );
        }
        // The expired keys went with a sweep; what is left is the new keys (all live) and at most
        // the few expired ones added since the last sweep.
        let left = lease_keys(&store);
        assert!(
            (1_000..1_000 + MIN_SWEEP).contains(&left),
            "{left} keys left"
        );
    }

    #[test]
    fn a_full_lease_charges_no_limit() {
        let (store, _) = store();
        let quota = Quota::per_hour(1).and_then(|q| q.with_burst(5)).unwrap();
        let limits = [Limit::new("{alice}:tier", &quota, 1)];
        let lease = Lease::new("{alice}:c", 1, TTL);
        let first = store.decide_leased_now(&limits, &lease);
        assert!(first.lease.is_some());
        assert_eq!(
            first.verdict.decisions().len(),
            2,
            "one row per limit, then the lease"
        );
        assert_eq!(first.verdict.decisions()[0].remaining, 4);
        for _ in 0..3 {
            let full = store.decide_leased_now(&limits, &lease);
            assert!(full.lease.is_none());
            assert_eq!(full.verdict.outcome(), Outcome::Denied);
            let [limit, lease_row] = full.verdict.decisions() else {
                panic!("two rows expected");
            };
            // The limit would pass; it reports itself as it stands, uncharged.
            assert_eq!((limit.outcome, limit.remaining), (Outcome::Allowed, 4));
            assert_eq!(
                (lease_row.outcome, lease_row.remaining),
                (Outcome::Denied, 0)
            );
        }
        let left = store.peek_now(&[Limit::new("{alice}:tier", &quota, 0)]);
        assert_eq!(
            left.decisions()[0].remaining,
            4,
            "no denial charged the limit"
        );
    }

    #[test]
    fn a_denied_limit_takes_no_lease() {
        let (store, _) = store();
        let quota = Quota::per_hour(1).and_then(|q| q.with_burst(1)).unwrap();
        let roomy = Quota::per_hour(1).and_then(|q| q.with_burst(100)).unwrap();
        let limits = [
            Limit::new("roomy", &roomy, 1),
            Limit::new("tight", &quota, 1),
        ];
        let lease = Lease::new("c", 3, TTL);
        assert!(store.decide_leased_now(&limits, &lease).lease.is_some());
        let denied = store.decide_leased_now(&limits, &lease);
        assert!(denied.lease.is_none());
        assert_eq!(denied.verdict.outcome(), Outcome::Denied);
        let rows = denied.verdict.decisions();
        assert_eq!(rows.len(), 3);
        assert_eq!(
            (rows[0].outcome, rows[0].remaining),
            (Outcome::Allowed, 99),
            "uncharged"
        );
        assert_eq!(rows[1].outcome, Outcome::Denied);
        // The lease would have been free: it says so, as it stands.
        assert_eq!((rows[2].outcome, rows[2].remaining), (Outcome::Allowed, 2));
        assert_eq!(store.leases_held("c"), 1);
        let roomy_left = store.peek_now(&[Limit::new("roomy", &roomy, 0)]);
        assert_eq!(roomy_left.decisions()[0].remaining, 99);
    }

    #[test]
    fn a_max_of_zero_denies_always() {
        let (store, _) = store();
        let quota = Quota::per_hour(1).and_then(|q| q.with_burst(5)).unwrap();
        let lease = Lease::new("c", 0, TTL);
        for limits in [&[][..], &[Limit::new("k", &quota, 1)][..]] {
            let leased = store.decide_leased_now(limits, &lease);
            assert!(leased.lease.is_none());
            let row = leased.verdict.decisions().last().copied().unwrap();
            assert_eq!(
                (row.outcome, row.limit, row.remaining),
                (Outcome::Denied, 0, 0)
            );
        }
        let left = store.peek_now(&[Limit::new("k", &quota, 0)]);
        assert_eq!(left.decisions()[0].remaining, 5);
        assert_eq!(lease_keys(&store), 0);
    }

    /// Polls a future that is ready at once (the memory store's are).
    fn ready_now<F: Future>(f: F) -> F::Output {
        let mut f = pin!(f);
        match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(out) => out,
            Poll::Pending => panic!("the memory store's futures are ready at once"),
        }
    }

    #[test]
    fn the_trait_and_dyn_store_forward_to_the_leases() {
        let (store, _) = store();
        let lease = Lease::new("c", 1, TTL);
        let id = ready_now(Store::decide_leased(&store, &[], &lease))
            .unwrap()
            .lease
            .expect("taken");
        let dynamic: Arc<dyn DynStore> = Arc::new(store.clone());
        let full = ready_now(dynamic.decide_leased(&[], &lease)).unwrap();
        assert!(full.lease.is_none());
        assert!(Store::decide_leased_now(&dynamic, &[], &lease).is_some());
        ready_now(dynamic.release("c", id)).unwrap();
        assert_eq!(store.leases_held("c"), 0);
        let again = Store::decide_leased_now(&dynamic, &[], &lease)
            .unwrap()
            .unwrap();
        let again = again.lease.expect("freed");
        assert!(matches!(
            Store::release_now(&dynamic, "c", again),
            Some(Ok(()))
        ));
        assert_eq!(store.leases_held("c"), 0);
    }
}
