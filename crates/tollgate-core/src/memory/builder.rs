//! [`MemoryStoreBuilder`]: the cap, the shards, the eviction summary and the clock of a
//! [`MemoryStore`].

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use super::leases::LeaseShard;
use super::{DEFAULT_MAX_KEYS, Inner, MemoryStore, Shard};
use crate::{Clock, SystemClock};

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
                    .map(|_| Shard::new(shard_capacity, self.remember_evicted))
                    .collect(),
                hasher: hashbrown::DefaultHashBuilder::default(),
                shard_capacity,
                max_keys: shard_capacity * shards,
                clock: self.clock,
                leases: (0..shards).map(|_| LeaseShard::default()).collect(),
                next_lease: AtomicU64::new(1),
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
