//! What a full shard forgot: a conservative summary, so an evicted key never comes back fresher
//! than it left.

#[cfg(doc)]
use crate::MemoryStoreBuilder;
use crate::Timestamp;

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
pub(super) struct Evicted {
    slots: Box<[u64]>,
    /// [`MemoryStoreBuilder::remember_evicted`].
    on: bool,
}

impl Evicted {
    /// An empty summary; `on` is [`MemoryStoreBuilder::remember_evicted`].
    pub(super) fn new(on: bool) -> Evicted {
        Evicted {
            slots: Box::new([]),
            on,
        }
    }

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
    pub(super) fn fold(&mut self, hash: u64, expires: u64, capacity: usize) {
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
    pub(super) fn until(&self, hash: u64, now: Timestamp) -> Option<Timestamp> {
        let (a, b) = self.slots(hash)?;
        let until = self.slots[a].min(self.slots[b]);
        (until > now.as_micros()).then(|| Timestamp::from_micros(until))
    }
}
