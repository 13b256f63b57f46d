//! The store's operations (decide, peek, reserve, cancel, pause): each locks the shards of its
//! limits in index order and is all or nothing over them; a single bucket that exists is decided
//! in place under the read lock.

use std::borrow::Cow;
use std::sync::RwLockWriteGuard;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::table::Table;
use super::{MemoryStore, lock, read};
use crate::algorithm::{self, BucketState, Earliest, State, leaky_bucket, token_bucket};
#[cfg(doc)]
use crate::store::Store;
use crate::store::{Held, Limit, Reservation, Reserve, Verdict};
use crate::{Algorithm, Clock, Decision, Quota, Timestamp};

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
        self.report_now(limits, |d, _| d)
    }

    /// The limits as a denial reports them, charging nothing: a limit that would deny gives its
    /// denial, one that would pass its state as it stands (a peek at cost 0).
    pub(super) fn stand_now(&self, limits: &[Limit<'_>]) -> Verdict {
        self.report_now(
            limits,
            |d, as_it_stands| {
                if d.is_allowed() { as_it_stands() } else { d }
            },
        )
    }

    /// Each limit's decision at its cost, charging nothing, passed through `pick` with a way to
    /// get the decision at cost 0 instead.
    fn report_now(
        &self,
        limits: &[Limit<'_>],
        pick: impl Fn(Decision, &dyn Fn() -> Decision) -> Decision,
    ) -> Verdict {
        let now = self.now();
        let mut locked = self.lock_all(limits);
        let decisions = limits
            .iter()
            .enumerate()
            .map(|(i, limit)| {
                let (table, hash) = locked.table(i);
                let state = table.state(hash, limit.key, limit.quota, now);
                let at_cost = algorithm::decide(state.as_deref(), now, limit.quota, limit.cost).0;
                pick(at_cost, &|| {
                    algorithm::decide(state.as_deref(), now, limit.quota, 0).0
                })
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
