//! A shard's table: the keys (short ones kept inside their entry), each with its state and
//! expiry; sweeping expired keys as new ones arrive, and evicting at the cap into [`Evicted`].

use std::borrow::Cow;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

use hashbrown::HashTable;

use super::evicted::Evicted;
use crate::algorithm::{BucketState, State};
use crate::{Quota, Timestamp};

/// How many entries are looked at to choose one to evict when a shard is full.
const EVICTION_SAMPLE: usize = 16;

/// A shard is swept for expired keys no more often than this many entries.
const MIN_SWEEP: usize = 64;

/// The longest key kept inside its entry; longer keys are allocated.
const INLINE_KEY: usize = 22;

/// A key, inside the entry when short (no allocation to make or free, no pointer to follow when
/// comparing), else on the heap. 24 bytes either way.
pub(super) enum Key {
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

    pub(super) fn is(&self, key: &str) -> bool {
        self.bytes() == key.as_bytes()
    }
}

pub(super) struct Entry {
    pub(super) key: Key,
    /// When the key's state is back to fresh (µs). For a bucket this is its theoretical arrival
    /// time, which is its whole state: a single-limit decision updates it in place with a
    /// compare-and-swap under the shard's read lock. Everything else changes it under the write
    /// lock, which excludes those readers.
    pub(super) expires: AtomicU64,
    /// The state of a window algorithm, boxed so that the common bucket entry stays small; `None`
    /// for a bucket, whose state is `expires`.
    pub(super) window: Option<Box<State>>,
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
    pub(super) fn state(&self) -> Cow<'_, State> {
        match &self.window {
            None => Cow::Owned(State::Bucket(BucketState {
                tat: self.expires(),
            })),
            Some(state) => Cow::Borrowed(state),
        }
    }

    /// Replaces the state; `expires` is `state.expires_at(quota)`, which for a bucket is its
    /// arrival time.
    pub(super) fn set(&mut self, state: State, expires: Timestamp) {
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
pub(super) struct Put<'a, S> {
    pub(super) now: Timestamp,
    pub(super) capacity: usize,
    pub(super) hasher: &'a S,
}

impl<S> Clone for Put<'_, S> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<S> Copy for Put<'_, S> {}

pub(super) struct Table {
    pub(super) entries: HashTable<Entry>,
    /// Sweep when the table reaches this size ...
    sweep_at: usize,
    /// ... and at least half its size in keys was added since the last sweep (amortised O(1)).
    added_since_sweep: usize,
    /// What the shard forgot at the cap: see [`Evicted`]. Empty until the first eviction.
    evicted: Evicted,
}

impl Table {
    pub(super) fn new(capacity: usize, remember_evicted: bool) -> Table {
        Table {
            entries: HashTable::new(),
            sweep_at: MIN_SWEEP.min(capacity),
            added_since_sweep: 0,
            evicted: Evicted::new(remember_evicted),
        }
    }

    /// Forgets every key whose state is back to fresh at `now`.
    pub(super) fn purge(&mut self, now: Timestamp) {
        self.entries.retain(|e| e.expires() > now);
        self.added_since_sweep = 0;
    }

    pub(super) fn get(&self, hash: u64, key: &str) -> Option<Cow<'_, State>> {
        self.entries.find(hash, |e| e.key.is(key)).map(Entry::state)
    }

    /// The state a decision on `key` starts from: the key's own, or, for a key the shard does
    /// not hold, the conservative state [`Evicted`] says it may have had.
    pub(super) fn state(
        &self,
        hash: u64,
        key: &str,
        quota: &Quota,
        now: Timestamp,
    ) -> Option<Cow<'_, State>> {
        self.get(hash, key).or_else(|| {
            self.evicted
                .until(hash, now)
                .map(|until| Cow::Owned(State::exhausted_until(quota, now, until)))
        })
    }

    pub(super) fn take(&mut self, hash: u64, key: &str) {
        if let Ok(occupied) = self.entries.find_entry(hash, |e| e.key.is(key)) {
            occupied.remove();
        }
    }

    /// Stores `state` for `key`, or forgets the key if the state carries no information at `now`.
    pub(super) fn put<S: BuildHasher>(
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
