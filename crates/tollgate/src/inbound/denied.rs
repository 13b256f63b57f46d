//! The denied-until cache: once a caller is denied, its next requests are answered locally until
//! the known retry time, without a store round trip.
//!
//! Exact, not a heuristic: a denial says when a request of the same cost could pass at the
//! earliest (`retry_after`), and nothing anyone does can make that earlier (other requests only
//! spend more). So answering 429 locally before that instant never denies a request the store
//! would have allowed, **under the policy that decided it**. A reload can make it earlier (a tier
//! raised, a caller moved to another tier), so an entry is keyed by what decided it (the caller's
//! tier bucket and the route) and remembers the policy it was decided under: a denial of another
//! policy is never answered, and the first request under a new policy empties the cache.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tollgate_core::Decision;

const SHARDS: usize = 16;

type Shard = Mutex<HashMap<Box<str>, Denied>>;

/// A bounded map from a caller (and route) to the instant its denial ends.
#[derive(Debug)]
pub(crate) struct DeniedCache {
    shards: Box<[Shard]>,
    hasher: RandomState,
    per_shard: usize,
    /// How many denials the shards hold (expired ones included until they are dropped): with
    /// none, a lookup is skipped without hashing the key or taking a lock.
    len: AtomicUsize,
    /// The id of the policy the entries were decided under (see [`DeniedCache::follow`]).
    policy: AtomicU64,
}

/// A remembered denial: what to answer until `until`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Denied {
    pub(crate) until: Instant,
    pub(crate) reset_until: Instant,
    /// The binding decision at the time, for the headers.
    pub(crate) decision: Decision,
    /// Which limit bound it (index into the request's limits).
    pub(crate) binding: usize,
    /// The id of the policy that decided it.
    pub(crate) policy: u64,
}

impl Denied {
    /// The decision as it stands at `now`: the same denial, with its times counted down.
    pub(crate) fn at(&self, now: Instant) -> Decision {
        Decision {
            retry_after: self.until.saturating_duration_since(now),
            reset_after: self.reset_until.saturating_duration_since(now),
            ..self.decision
        }
    }
}

impl DeniedCache {
    /// A cache remembering at most `capacity` denials (at least one per shard).
    pub(crate) fn new(capacity: usize) -> Self {
        DeniedCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            len: AtomicUsize::new(0),
            policy: AtomicU64::new(0),
        }
    }

    /// Makes the cache follow the policy in force: the first call with a new policy id (a
    /// reload) forgets every denial remembered under another one. One relaxed load otherwise.
    pub(crate) fn follow(&self, policy: u64) {
        let seen = self.policy.load(Ordering::Relaxed);
        if seen == policy
            || self
                .policy
                .compare_exchange(seen, policy, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        for shard in &*self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            self.len.fetch_sub(shard.len(), Ordering::Relaxed);
            shard.clear();
        }
    }

    /// Whether no denial is remembered. A request racing the first insertion may miss it and ask
    /// the store, which gives the same answer.
    pub(crate) fn is_empty(&self) -> bool {
        self.len.load(Ordering::Relaxed) == 0
    }

    fn shard(&self, key: &str) -> &Shard {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    /// The denial in force for `key` at `now` under the policy `policy`, if any. A denial of
    /// another policy (a request that raced a reload) is dropped.
    pub(crate) fn get(&self, key: &str, now: Instant, policy: u64) -> Option<Denied> {
        let mut shard = self
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match shard.get(key) {
            Some(d) if d.until > now && d.policy == policy => Some(*d),
            Some(_) => {
                shard.remove(key);
                self.len.fetch_sub(1, Ordering::Relaxed);
                None
            }
            None => None,
        }
    }

    /// Remembers a denial of `key` by the policy `policy`, lasting `retry_after` from `now`.
    /// When the shard is full and nothing in it has expired, the denial is not remembered (the
    /// store stays the authority).
    pub(crate) fn insert(
        &self,
        key: &str,
        now: Instant,
        decision: Decision,
        binding: usize,
        retry_after: Duration,
        policy: u64,
    ) {
        if retry_after.is_zero() {
            return;
        }
        let mut shard = self
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shard.len() >= self.per_shard && !shard.contains_key(key) {
            let before = shard.len();
            shard.retain(|_, d| d.until > now);
            self.len.fetch_sub(before - shard.len(), Ordering::Relaxed);
            if shard.len() >= self.per_shard {
                return;
            }
        }
        let replaced = shard.insert(
            key.into(),
            Denied {
                until: now + retry_after,
                reset_until: now + decision.reset_after,
                decision,
                binding,
                policy,
            },
        );
        if replaced.is_none() {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use tollgate_core::Outcome;

    use super::*;

    fn denial() -> Decision {
        Decision {
            outcome: Outcome::Denied,
            limit: 5,
            remaining: 0,
            reset_after: Duration::from_secs(10),
            retry_after: Duration::from_secs(2),
            delay: Duration::ZERO,
        }
    }

    #[test]
    fn remembers_until_the_retry_time() {
        let cache = DeniedCache::new(100);
        let t0 = Instant::now();
        cache.insert("k", t0, denial(), 0, Duration::from_secs(2), 1);
        let hit = cache.get("k", t0 + Duration::from_millis(500), 1).unwrap();
        let d = hit.at(t0 + Duration::from_millis(500));
        assert_eq!(d.retry_after, Duration::from_millis(1500));
        assert_eq!(d.reset_after, Duration::from_millis(9500));
        assert!(cache.get("k", t0 + Duration::from_secs(2), 1).is_none());
        assert!(cache.get("other", t0, 1).is_none());
    }

    #[test]
    fn bounded() {
        let cache = DeniedCache::new(SHARDS);
        let t0 = Instant::now();
        for i in 0..1_000 {
            cache.insert(&format!("k{i}"), t0, denial(), 0, Duration::from_secs(2), 1);
        }
        let held: usize = cache.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(held <= SHARDS, "{held}");
        // Once they expire, room is made again.
        cache.insert(
            "late",
            t0 + Duration::from_secs(3),
            denial(),
            0,
            Duration::from_secs(2),
            1,
        );
        assert!(cache.get("late", t0 + Duration::from_secs(3), 1).is_some());
    }

    #[test]
    fn follows_the_policy_in_force() {
        let cache = DeniedCache::new(100);
        let t0 = Instant::now();
        cache.follow(1);
        cache.insert("k", t0, denial(), 0, Duration::from_secs(2), 1);
        // A request still deciding under policy 1 sees it; one under policy 2 does not.
        assert!(cache.get("k", t0, 1).is_some());
        assert!(cache.get("k", t0, 2).is_none());
        cache.insert("k", t0, denial(), 0, Duration::from_secs(2), 1);
        cache.insert("j", t0, denial(), 0, Duration::from_secs(2), 1);
        // The first request under policy 2 forgets everything.
        cache.follow(2);
        assert!(cache.is_empty());
        assert!(cache.get("j", t0, 1).is_none());
        cache.follow(2);
        cache.insert("k", t0, denial(), 0, Duration::from_secs(2), 2);
        assert!(cache.get("k", t0, 2).is_some());
    }

    #[test]
    fn counts_what_it_holds() {
        let cache = DeniedCache::new(SHARDS);
        let t0 = Instant::now();
        assert!(cache.is_empty());
        cache.insert("k", t0, denial(), 0, Duration::from_secs(2), 1);
        cache.insert("k", t0, denial(), 0, Duration::from_secs(2), 1);
        assert!(!cache.is_empty());
        // Expired: dropped when looked up.
        assert!(cache.get("k", t0 + Duration::from_secs(2), 1).is_none());
        assert!(cache.is_empty());
        // Expired entries dropped to make room are counted out too.
        for i in 0..1_000 {
            cache.insert(&format!("k{i}"), t0, denial(), 0, Duration::from_secs(2), 1);
        }
        let held = |c: &DeniedCache| {
            c.shards
                .iter()
                .map(|s| s.lock().unwrap().len())
                .sum::<usize>()
        };
        assert_eq!(cache.len.load(Ordering::Relaxed), held(&cache));
        let later = t0 + Duration::from_secs(3);
        for i in 0..1_000 {
            cache.insert(
                &format!("j{i}"),
                later,
                denial(),
                0,
                Duration::from_secs(2),
                1,
            );
        }
        assert_eq!(cache.len.load(Ordering::Relaxed), held(&cache));
    }
}
