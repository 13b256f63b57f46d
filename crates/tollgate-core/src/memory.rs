//! [`MemoryStore`]: keyed limit state in this process, sharded, bounded.

use std::borrow::Cow;
use std::fmt;
use std::future::{Future, ready};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use hashbrown::HashTable;

use crate::algorithm::{self, BucketState, Earliest, State, leaky_bucket, token_bucket};
use crate::store::{Held, Limit, Reservation, Reserve, Store, StoreError, Verdict};
use crate::{Algorithm, Clock, Decision, Quota, SystemClock, Timestamp};

/// The default maximum number of keys a [`MemoryStore`] holds.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// How many entries are looked at to choose one to evict when a shard is full.
const EVICTION_SAMPLE: usize = 16;

/// A shard is swept for expired keys no more often than this many entries.
const MIN_SWEEP: usize = 64;

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
}

/// One shard, alone on its cache lines so two cores never false-share.
#[repr(align(128))]
struct Shard {
    table: RwLock<Table>,
}

/// The longest key kept inside its entry; longer keys are allocated.
const INLINE_KEY: usize = 22;

/// A key, inside the entry when short (no allocation to make or free, no pointer to follow when
/// comparing), else on the heap. 24 bytes either way.
enum Key {
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Heap(Box<str>),
}

impl Key {
    fn new(key: &str) -> Key {
        match u8::try_from(key.len()) {
            Ok(len) if key.len() <= INLINE_KEY => {
                let mut bytes = [0; INLINE_KEY];
                bytes[..key.len()].copy_from_slice(key.as_bytes());
                Key::Inline { len, bytes }
            }
            _ => Key::Heap(key.into()),
        }
    }

    /// The key's bytes, which is what the store hashes.
    fn bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Key::Heap(heap) => heap.as_bytes(),
        }
    }

    fn is(&self, key: &str) -> bool {
        self.bytes() == key.as_bytes()
    }
}

struct Entry {
    key: Key,
    /// When the key's state is back to fresh (µs). For a bucket this is its theoretical arrival
    /// time, which is its whole state: a single-limit decision updates it in place with a
    /// compare-and-swap under the shard's read lock. Everything else changes it under the write
    /// lock, which excludes those readers.
    expires: AtomicU64,
    /// The state of a window algorithm, boxed so that the common bucket entry stays small; `None`
    /// for a bucket, whose state is `expires`.
    window: Option<Box<State>>,
}

impl Entry {
    fn new(key: &str, state: State, expires: Timestamp) -> Entry {
        let mut entry = Entry {
            key: Key::new(key),
            expires: AtomicU64::new(0),
            window: None,
        };
        entry.set(state, expires);
        entry
    }

    fn expires(&self) -> Timestamp {
        Timestamp::from_micros(self.expires.load(Ordering::Relaxed))
    }

    /// The key's state (a bucket's is rebuilt from its arrival time).
    fn state(&self) -> Cow<'_, State> {
        match &self.window {
            None => Cow::Owned(State::Bucket(BucketState {
                tat: self.expires(),
            })),
            Some(state) => Cow::Borrowed(state),
        }
    }

    /// Replaces the state; `expires` is `state.expires_at(quota)`, which for a bucket is its
    /// arrival time.
    fn set(&mut self, state: State, expires: Timestamp) {
        match state {
            State::Bucket(bucket) => {
                *self.expires.get_mut() = bucket.tat.as_micros();
                self.window = None;
            }
            window => {
                *self.expires.get_mut() = expires.as_micros();
                match &mut self.window {
                    Some(boxed) => **boxed = window,
                    None => self.window = Some(Box::new(window)),
                }
            }
        }
    }
}

/// Where and when a [`Table::put`] happens.
struct Put<'a, S> {
    now: Timestamp,
    capacity: usize,
    hasher: &'a S,
}

impl<S> Clone for Put<'_, S> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<S> Copy for Put<'_, S> {}

struct Table {
    entries: HashTable<Entry>,
    /// Sweep when the table reaches this size ...
    sweep_at: usize,
    /// ... and at least half its size in keys was added since the last sweep (amortised O(1)).
    added_since_sweep: usize,
    /// What the shard forgot at the cap: see [`Evicted`]. Empty until the first eviction.
    evicted: Evicted,
}

/// A summary of the keys a full shard had to forget while their state still mattered, so that a
/// forgotten key never comes back fresher than it left (a flood of new keys must not hand every
/// evicted caller a new quota).
///
/// A small array of times, each the latest expiry (`State::expires_at`) of the evicted keys that
/// hash to it; a key maps to two slots. A key the shard does not hold is assumed to be exhausted
/// until the earlier of its two slots (when that is still ahead): an evicted key's own expiry is
/// in both its slots, so the assumption is never more permissive than the truth. The price is
/// paid only while more keys matter than the cap holds: a new key whose two slots are both taken
/// by live evicted keys is treated as one of them (denied until they are fresh again) — an error
/// toward denial, never toward over-admission. One 8-byte slot per key the shard holds, allocated
/// on the shard's first eviction.
struct Evicted {
    slots: Box<[u64]>,
    /// [`MemoryStoreBuilder::remember_evicted`].
    on: bool,
}

impl Evicted {
    fn slots(&self, hash: u64) -> Option<(usize, usize)> {
        let n = self.slots.len();
        if n == 0 {
            return None;
        }
        // Two indices from bits of the hash that neither the shard nor hashbrown uses alone.
        let a = (hash.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize % n;
        let b = (hash.rotate_left(23).wrapping_mul(0xc2b2_ae3d_27d4_eb4f) >> 32) as usize % n;
        Some((a, b))
    }

    /// Folds in a key forgotten while its state mattered until `expires` (µs).
    fn fold(&mut self, hash: u64, expires: u64, capacity: usize) {
        if !self.on {
            return;
        }
        if self.slots.is_empty() {
            self.slots = vec![0; capacity.clamp(64, 1 << 20)].into_boxed_slice();
        }
        if let Some((a, b)) = self.slots(hash) {
            self.slots[a] = self.slots[a].max(expires);
            self.slots[b] = self.slots[b].max(expires);
        }
    }

    /// Until when a key the shard does not hold may still be spent, if it may.
    fn until(&self, hash: u64, now: Timestamp) -> Option<Timestamp> {
        let (a, b) = self.slots(hash)?;
        let until = self.slots[a].min(self.slots[b]);
        (until > now.as_micros()).then(|| Timestamp::from_micros(until))
    }
}

/// Builds a [`MemoryStore`] with a cap, a shard count or a clock of your choosing.
#[derive(Debug, Clone)]
pub struct MemoryStoreBuilder<C = SystemClock> {
    max_keys: usize,
    shards: Option<usize>,
    remember_evicted: bool,
    clock: C,
}

impl MemoryStoreBuilder<SystemClock> {
    fn new() -> Self {
        MemoryStoreBuilder {
            max_keys: DEFAULT_MAX_KEYS,
            shards: None,
            remember_evicted: true,
            clock: SystemClock::new(),
        }
    }
}

impl<C: Clock> MemoryStoreBuilder<C> {
    /// The most keys the store holds (at least one per shard). Default [`DEFAULT_MAX_KEYS`].
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys.max(1);
        self
    }

    /// The number of shards, rounded up to a power of two. Default: four per core, at least 16.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = Some(shards.max(1));
        self
    }

    /// Whether a key forgotten at the cap while its state still mattered is remembered in a
    /// conservative summary (default `true`): it then never comes back fresher than it left, and,
    /// once more keys are live than the cap holds, some new keys are refused as if they were
    /// forgotten ones (see the type's docs). `false` lets a forgotten key start fresh, up to one
    /// extra quota each time it is forgotten, and never refuses a new key.
    pub fn remember_evicted(mut self, remember: bool) -> Self {
        self.remember_evicted = remember;
        self
    }

    /// The clock decisions are made with (a [`ManualClock`](crate::ManualClock) in tests).
    pub fn clock<C2: Clock>(self, clock: C2) -> MemoryStoreBuilder<C2> {
        MemoryStoreBuilder {
            max_keys: self.max_keys,
            shards: self.shards,
            remember_evicted: self.remember_evicted,
            clock,
        }
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore<C> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let wanted = self
            .shards
            .unwrap_or((cores * 4).max(16))
            .next_power_of_two();
        // A power of two no larger than the cap, so every shard holds at least one key and the
        // shards together never hold more than `max_keys`.
        let largest = 1usize << self.max_keys.ilog2();
        let shards = wanted.min(largest);
        let shard_capacity = self.max_keys / shards;
        MemoryStore {
            inner: Arc::new(Inner {
                shards: (0..shards)
                    .map(|_| Shard {
                        table: RwLock::new(Table {
                            entries: HashTable::new(),
                            sweep_at: MIN_SWEEP.min(shard_capacity),
                            added_since_sweep: 0,
                            evicted: Evicted {
                                slots: Box::new([]),
                                on: self.remember_evicted,
                            },
                        }),
                    })
                    .collect(),
                hasher: hashbrown::DefaultHashBuilder::default(),
                shard_capacity,
                max_keys: shard_capacity * shards,
                clock: self.clock,
            }),
        }
    }
}

impl MemoryStore<SystemClock> {
    /// A store with the system clock and the default cap.
    pub fn new() -> Self {
        MemoryStoreBuilder::new().build()
    }

    /// Configure the cap, the shards or the clock.
    pub fn builder() -> MemoryStoreBuilder<SystemClock> {
        MemoryStoreBuilder::new()
    }
}

impl Default for MemoryStore<SystemClock> {
    fn default() -> Self {
        MemoryStore::new()
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

impl Table {
    fn get(&self, hash: u64, key: &str) -> Option<Cow<'_, State>> {
        self.entries.find(hash, |e| e.key.is(key)).map(Entry::state)
    }

    /// The state a decision on `key` starts from: the key's own, or, for a key the shard does
    /// not hold, the conservative state [`Evicted`] says it may have had.
    fn state(&self, hash: u64, key: &str, quota: &Quota, now: Timestamp) -> Option<Cow<'_, State>> {
        self.get(hash, key).or_else(|| {
            self.evicted
                .until(hash, now)
                .map(|until| Cow::Owned(State::exhausted_until(quota, now, until)))
        })
    }

    fn take(&mut self, hash: u64, key: &str) {
        if let Ok(occupied) = self.entries.find_entry(hash, |e| e.key.is(key)) {
            occupied.remove();
        }
    }

    /// Stores `state` for `key`, or forgets the key if the state carries no information at `now`.
    fn put<S: BuildHasher>(
        &mut self,
        hash: u64,
        key: &str,
        state: State,
        expires: Timestamp,
        at: Put<'_, S>,
    ) {
        let Put {
            now,
            capacity,
            hasher,
        } = at;
        let rehash = |e: &Entry| hasher.hash_one(e.key.bytes());
        // `find_entry`, not `entry`: the latter reserves room before we know whether to sweep or
        // evict, and would grow a full table.
        match self.entries.find_entry(hash, |e| e.key.is(key)) {
            Ok(mut occupied) => {
                if expires <= now {
                    occupied.remove();
                } else {
                    occupied.get_mut().set(state, expires);
                }
            }
            Err(_) if expires <= now => {}
            Err(_) => {
                let len = self.entries.len();
                if len >= self.sweep_at && self.added_since_sweep >= len / 2 {
                    self.entries.retain(|e| e.expires() > now);
                    self.sweep_at =
                        (self.entries.len() * 2).clamp(MIN_SWEEP.min(capacity), capacity);
                    self.added_since_sweep = 0;
                }
                if self.entries.len() >= capacity {
                    self.evict_one(hasher, now, capacity);
                }
                let len = self.entries.len();
                if len == self.entries.capacity() && len >= capacity / 2 {
                    // No room left, often because removals left tombstones: rebuild at the size the
                    // cap needs rather than let the table double past it.
                    let old = std::mem::replace(
                        &mut self.entries,
                        HashTable::with_capacity(capacity.max(len + 1)),
                    );
                    for entry in old {
                        self.entries.insert_unique(rehash(&entry), entry, rehash);
                    }
                }
                self.added_since_sweep += 1;
                self.entries
                    .insert_unique(hash, Entry::new(key, state, expires), rehash);
            }
        }
    }

    /// Forgets the sampled entry closest to fresh, folding it into [`Evicted`] if its state
    /// still matters.
    fn evict_one<S: BuildHasher>(&mut self, hasher: &S, now: Timestamp, capacity: usize) {
        let victim = self
            .entries
            .iter()
            .take(EVICTION_SAMPLE)
            .min_by_key(|e| e.expires())
            .map(|e| (hasher.hash_one(e.key.bytes()), e.key.bytes().to_vec()));
        if let Some((hash, key)) = victim
            && let Ok(occupied) = self.entries.find_entry(hash, |e| e.key.bytes() == key)
        {
            let expires = occupied.get().expires();
            occupied.remove();
            if expires > now {
                self.evicted.fold(hash, expires.as_micros(), capacity);
            }
        }
    }
}

/// The shards a set of limits touches, locked in index order.
struct Locked<'a> {
    /// (shard index, guard), sorted by index.
    guards: Vec<(usize, RwLockWriteGuard<'a, Table>)>,
    /// Per limit: (hash, position in `guards`).
    slots: Vec<(u64, usize)>,
}

impl Locked<'_> {
    fn table(&mut self, limit: usize) -> (&mut Table, u64) {
        let (hash, g) = self.slots[limit];
        (&mut self.guards[g].1, hash)
    }
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

    /// Forgets every key whose state is back to fresh, in every shard.
    pub fn purge(&self) {
        let now = self.now();
        for shard in &*self.inner.shards {
            let mut table = lock(shard);
            table.entries.retain(|e| e.expires() > now);
            table.added_since_sweep = 0;
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

    fn lock_all(&self, limits: &[Limit<'_>]) -> Locked<'_> {
        let mut order: Vec<(usize, u64, usize)> = limits
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let (hash, shard) = self.hash(l.key);
                (shard, hash, i)
            })
            .collect();
        order.sort_unstable_by_key(|&(shard, _, _)| shard);
        let mut guards: Vec<(usize, RwLockWriteGuard<'_, Table>)> = Vec::with_capacity(order.len());
        let mut slots = vec![(0, 0); limits.len()];
        for (shard, hash, i) in order {
            if guards.last().is_none_or(|(s, _)| *s != shard) {
                guards.push((shard, lock(&self.inner.shards[shard])));
            }
            slots[i] = (hash, guards.len() - 1);
        }
        Locked { guards, slots }
    }

    /// [`Store::decide`] without the future: decides now, all or nothing.
    pub fn decide_now(&self, limits: &[Limit<'_>]) -> Verdict {
        let now = self.now();
        if let [limit] = limits {
            return Verdict::single(self.decide_one(limit, now));
        }
        let mut locked = self.lock_all(limits);
        let mut decisions = Vec::with_capacity(limits.len());
        let mut undo: Vec<Option<State>> = Vec::with_capacity(limits.len());
        for (i, limit) in limits.iter().enumerate() {
            let (table, hash) = locked.table(i);
            let old = table
                .state(hash, limit.key, limit.quota, now)
                .map(Cow::into_owned);
            let (decision, new) = algorithm::decide(old.as_ref(), now, limit.quota, limit.cost);
            if decision.is_allowed() && limit.cost > 0 {
                let expires = new.expires_at(limit.quota);
                table.put(hash, limit.key, new, expires, self.put_at(now));
            }
            decisions.push(decision);
            undo.push(old);
        }
        if decisions.iter().all(Decision::is_allowed) {
            return Verdict::new(decisions);
        }
        // Roll back, newest first (a key may appear twice), then report the state as it is.
        for (i, limit) in limits.iter().enumerate().rev() {
            if decisions[i].is_allowed() && limit.cost > 0 {
                let (table, hash) = locked.table(i);
                match undo[i].take() {
                    Some(old) => {
                        let expires = old.expires_at(limit.quota);
                        table.put(hash, limit.key, old, expires, self.put_at(now));
                    }
                    None => {
                        table.take(hash, limit.key);
                    }
                }
            }
        }
        for (i, limit) in limits.iter().enumerate() {
            if decisions[i].is_allowed() {
                let (table, hash) = locked.table(i);
                let state = table.state(hash, limit.key, limit.quota, now);
                decisions[i] = algorithm::decide(state.as_deref(), now, limit.quota, 0).0;
            }
        }
        Verdict::new(decisions)
    }

    /// The single-limit path: one shard. A bucket that exists is decided under the shard's read
    /// lock with a compare-and-swap on its arrival time (a denial writes nothing); anything else
    /// takes the write lock.
    fn decide_one(&self, limit: &Limit<'_>, now: Timestamp) -> Decision {
        let (hash, shard) = self.hash(limit.key);
        let shard = &self.inner.shards[shard];
        if limit.quota.algorithm().is_bucket() {
            let table = read(shard);
            if let Some(entry) = table.entries.find(hash, |e| e.key.is(limit.key))
                && entry.window.is_none()
            {
                return decide_bucket(&entry.expires, now, limit.quota, limit.cost);
            }
        }
        let mut table = lock(shard);
        if limit.cost == 0 {
            let state = table.state(hash, limit.key, limit.quota, now);
            return algorithm::decide(state.as_deref(), now, limit.quota, 0).0;
        }
        if let Some(entry) = table.entries.find_mut(hash, |e| e.key.is(limit.key)) {
            let old = match &mut entry.window {
                Some(window) => std::mem::replace(&mut **window, State::EMPTY),
                None => entry.state().into_owned(),
            };
            let (decision, new) = algorithm::decide_owned(Some(old), now, limit.quota, limit.cost);
            // Denied states are equivalent to the old one, so writing back is always right.
            let expires = new.expires_at(limit.quota);
            entry.set(new, expires);
            return decision;
        }
        let evicted = table
            .state(hash, limit.key, limit.quota, now)
            .map(Cow::into_owned);
        let (decision, new) = algorithm::decide(evicted.as_ref(), now, limit.quota, limit.cost);
        if decision.is_allowed() {
            let expires = new.expires_at(limit.quota);
            table.put(hash, limit.key, new, expires, self.put_at(now));
        }
        decision
    }

    /// [`Store::peek`] without the future.
    pub fn peek_now(&self, limits: &[Limit<'_>]) -> Verdict {
        let now = self.now();
        let mut locked = self.lock_all(limits);
        let decisions = limits
            .iter()
            .enumerate()
            .map(|(i, limit)| {
                let (table, hash) = locked.table(i);
                let state = table.state(hash, limit.key, limit.quota, now);
                algorithm::decide(state.as_deref(), now, limit.quota, limit.cost).0
            })
            .collect();
        Verdict::new(decisions)
    }

    /// [`Store::reserve`] without the future.
    pub fn reserve_now(&self, limits: &[Limit<'_>], max_wait: Duration) -> Reserve {
        let now = self.now();
        let mut locked = self.lock_all(limits);
        let mut at = now;
        for (i, limit) in limits.iter().enumerate() {
            let (table, hash) = locked.table(i);
            let state = table.state(hash, limit.key, limit.quota, now);
            match algorithm::earliest(state.as_deref(), now, limit.quota, limit.cost) {
                Earliest::At(t) => at = at.max(t),
                Earliest::Never => return Reserve::Never,
            }
        }
        let wait = at.saturating_since(now);
        if wait > max_wait {
            return Reserve::WouldExceed { retry_after: wait };
        }
        if wait > Duration::ZERO && !limits.iter().all(|l| l.quota.algorithm().is_bucket()) {
            return Reserve::Retry { after: wait };
        }
        let mut held = Vec::new();
        for (i, limit) in limits.iter().enumerate() {
            let (table, hash) = locked.table(i);
            let state = table
                .state(hash, limit.key, limit.quota, now)
                .map(Cow::into_owned);
            let state = state.as_ref();
            let new = if limit.quota.algorithm().is_bucket() {
                let before = state.map_or(Timestamp::ZERO, |s| s.expires_at(limit.quota));
                let new = algorithm::reserve_at(state, at, limit.quota, limit.cost);
                let Some(new) = new else { continue };
                held.push(Held {
                    key: limit.key.to_owned(),
                    before,
                    after: new.expires_at(limit.quota),
                    charge: limit.quota.interval() * limit.cost,
                });
                new
            } else {
                // wait == 0 here: the request passes now.
                algorithm::decide(state, now, limit.quota, limit.cost).1
            };
            let expires = new.expires_at(limit.quota);
            table.put(hash, limit.key, new, expires, self.put_at(now));
        }
        Reserve::Granted(Reservation::new(wait, held))
    }

    /// [`Store::cancel`] without the future.
    pub fn cancel_now(&self, reservation: &Reservation) {
        let now = self.now();
        for held in reservation.held() {
            let (hash, shard) = self.hash(&held.key);
            let mut table = lock(&self.inner.shards[shard]);
            let state = table.get(hash, &held.key).map(Cow::into_owned);
            if let Some(restored) =
                algorithm::cancel(state.as_ref(), held.before, held.after, held.charge)
            {
                // A bucket's state is its arrival time, which is also when it expires.
                let expires = match &restored {
                    algorithm::State::Bucket(b) => b.tat,
                    _ => held.before,
                };
                table.put(hash, &held.key, restored, expires, self.put_at(now));
            }
        }
    }
}

impl<C: Clock> MemoryStore<C> {
    /// [`Store::pause`] without the future.
    pub fn pause_now(&self, key: &str, quota: &Quota, duration: Duration) -> bool {
        let now = self.now();
        let (hash, shard) = self.hash(key);
        let mut table = lock(&self.inner.shards[shard]);
        let state = table.get(hash, key).map(Cow::into_owned);
        match algorithm::pause(state.as_ref(), quota, now + duration) {
            Some(paused) => {
                let expires = paused.expires_at(quota);
                table.put(hash, key, paused, expires, self.put_at(now));
                true
            }
            None => false,
        }
    }
}

/// Decides a bucket that exists, in place: a compare-and-swap loop on its arrival time. A denial,
/// or a cost of 0, changes nothing and writes nothing.
fn decide_bucket(tat: &AtomicU64, now: Timestamp, quota: &Quota, cost: u32) -> Decision {
    let mut current = tat.load(Ordering::Relaxed);
    loop {
        let state = BucketState {
            tat: Timestamp::from_micros(current),
        };
        let (decision, new) = match quota.algorithm() {
            Algorithm::LeakyBucket => leaky_bucket::decide(state, now, quota, cost),
            _ => token_bucket::decide(state, now, quota, cost),
        };
        let new = new.tat.as_micros();
        if new == current {
            return decision;
        }
        match tat.compare_exchange_weak(current, new, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return decision,
            Err(actual) => current = actual,
        }
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
}

#[cfg(test)]
mod tests;
