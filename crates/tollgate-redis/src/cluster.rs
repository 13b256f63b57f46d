//! The cross-slot protocol: a request whose limits live in several cluster slots is decided one
//! atomic script call per slot, all or nothing in the end (undoing the groups already charged
//! when a later one denies); a reservation across slots agrees on one departure time first, then
//! holds it in every slot. See "Cluster" in the [crate docs](crate) for the trade-offs.
//!
//! On a standalone server every request is one group, so each operation is one call. Keys are
//! grouped by redis-rs' own [`Slot::for_key`], the function its cluster client routes with, so a
//! group is always one call to one node.

use std::time::Duration;

use redis::cluster_routing::Slot;
use tollgate_core::{
    Decision, Held, LEASE_RETRY_AFTER, Lease, LeaseId, Leased, Limit, MAX_SPAN_MICROS, Quota,
    Reservation, Reserve, StoreError, Verdict,
};

use crate::protocol::{Budget, Item, LeaseArgs, Row, fast_eligible, micros, protocol};
use crate::script::Mode;
use crate::store::RedisStore;

/// The counter of compensating writes (undoing a cross-slot charge, giving a reservation back)
/// that failed, leaving a charge in place: `tollgate::metrics::COMPENSATION_ERRORS_TOTAL`.
const COMPENSATION_ERRORS_TOTAL: &str = "rate_limiter_store_compensation_errors_total";

/// A compensating write (an undo, a give-back) failed: the charge stays, which errs toward
/// denial; said in the log and counted.
fn compensation_failed(op: &'static str, error: &StoreError) {
    tracing::warn!(%error, op, "redis: could not undo a charge; it stays until it expires");
    metrics::counter!(COMPENSATION_ERRORS_TOTAL, "store" => "redis", "op" => op).increment(1);
}

/// A lease's member in its sorted set: its id as 32 hex digits.
pub(crate) fn lease_member(id: LeaseId) -> String {
    format!("{:032x}", id.as_u128())
}

/// The indices of `keys` grouped by cluster slot, in order of first appearance.
fn slot_groups<'k>(keys: impl IntoIterator<Item = &'k str>) -> Vec<Vec<usize>> {
    let mut groups: Vec<(Slot, Vec<usize>)> = Vec::new();
    for (i, key) in keys.into_iter().enumerate() {
        let slot = Slot::for_key(key);
        match groups.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, members)) => members.push(i),
            None => groups.push((slot, vec![i])),
        }
    }
    groups.into_iter().map(|(_, members)| members).collect()
}

impl RedisStore {
    /// The limits grouped by cluster slot, in order of first appearance; one group on a
    /// standalone server.
    fn groups(&self, items: &[Item<'_>]) -> Vec<Vec<usize>> {
        if !self.is_cluster() {
            return vec![(0..items.len()).collect()];
        }
        slot_groups(items.iter().map(|item| item.key.as_str()))
    }

    fn subset<'a>(items: &[Item<'a>], group: &[usize]) -> Vec<Item<'a>> {
        group
            .iter()
            .map(|&i| Item {
                key: items[i].key.clone(),
                limit: items[i].limit,
                cost: items[i].cost,
                a: items[i].a,
                b: items[i].b,
                lease: items[i].lease,
            })
            .collect()
    }

    /// Decides `limits`: one call per slot group, a denial undoing the groups charged before.
    pub(crate) async fn decide_items(&self, limits: &[Limit<'_>]) -> Result<Verdict, StoreError> {
        self.decide_groups(limits, None, None).await
    }

    /// Decides `limits` and takes a lease of `lease`, all or nothing: the lease is one more key
    /// of the request, in its slot's group (the call of that group takes it, `Mode::Lease`), and
    /// the undo of that group gives it back.
    pub(crate) async fn decide_leased_items(
        &self,
        limits: &[Limit<'_>],
        lease: &Lease<'_>,
    ) -> Result<Leased, StoreError> {
        // The lease's item carries its key; the script reads its `LeaseArgs`, never this quota.
        let unused = Quota::per_second(1).map_err(|e| protocol(e.to_string()))?;
        let key = Limit::new(lease.key, &unused, 1);
        let args = LeaseArgs {
            max: lease.max,
            ttl: micros(lease.ttl),
            retry_after: micros(LEASE_RETRY_AFTER),
        };
        let id = self.inner.ids.lease();
        let verdict = self
            .decide_groups(limits, Some((&key, args)), Some(&lease_member(id)))
            .await?;
        let taken = verdict.is_allowed();
        Ok(Leased {
            verdict,
            lease: taken.then_some(id),
        })
    }

    /// Decides `limits`, and with `lease` takes it too (its decision comes last), under the call
    /// id `id` (a lease's member name when there is one; `None`: a new id, drawn only for a call
    /// that sends one, not for a batched decision).
    async fn decide_groups<'a>(
        &self,
        limits: &'a [Limit<'a>],
        lease: Option<(&'a Limit<'a>, LeaseArgs)>,
        id: Option<&str>,
    ) -> Result<Verdict, StoreError> {
        let mut items = self.items(limits);
        if let Some((key, args)) = lease {
            items.push(Item {
                key: self.redis_key(key.key),
                limit: key,
                cost: 1,
                a: 0,
                b: 0,
                lease: Some(args),
            });
        }
        // The lease is the last item, so the last of its group, where the script looks for it.
        let mode = |group: &[usize]| {
            if group.iter().any(|&i| items[i].lease.is_some()) {
                Mode::Lease
            } else {
                Mode::Decide
            }
        };
        // One group on a standalone server (not even a `Vec` for it), one per slot on a cluster.
        let groups = if self.is_cluster() {
            self.groups(&items)
        } else {
            Vec::new()
        };
        let one_group = !self.is_cluster() || groups.len() == 1;
        let deadline = self.deadline();
        if one_group
            && self.inner.batching
            && lease.is_none()
            && !items.is_empty()
            && fast_eligible(&items)
        {
            let answer = self.decide_batched(&mut items, deadline).await?;
            return Ok(Verdict::new(
                answer.rows.iter().map(|r| r.decision).collect(),
            ));
        }
        // The call's id (a batch carries none): the lease's member, or a new one.
        let new_id;
        let id = match id {
            Some(id) => id,
            None => {
                new_id = self.inner.ids.next();
                new_id.as_str()
            }
        };
        if one_group {
            let mode = if lease.is_some() {
                Mode::Lease
            } else {
                Mode::Decide
            };
            let answer = self
                .call(mode, &items, id, 0, 0, Budget::guarded(deadline))
                .await?;
            return Ok(Verdict::new(
                answer.rows.iter().map(|r| r.decision).collect(),
            ));
        }
        // Cross-slot on a cluster: one atomic call per slot, in order; a denial undoes the groups
        // already charged (see the crate docs).
        let mut decisions: Vec<Option<Decision>> = vec![None; items.len()];
        let mut charged: Vec<(Vec<Item<'_>>, Vec<Row>)> = Vec::new();
        for group in &groups {
            let sub = Self::subset(&items, group);
            let answer = match self
                .call(mode(group), &sub, id, 0, 0, Budget::guarded(deadline))
                .await
            {
                Ok(answer) => answer,
                Err(e) => {
                    self.undo(&charged, id).await;
                    return Err(e);
                }
            };
            let allowed = answer.rows.iter().all(|r| r.decision.is_allowed());
            for (&i, row) in group.iter().zip(&answer.rows) {
                decisions[i] = Some(row.decision);
            }
            if allowed {
                charged.push((sub, answer.rows));
                continue;
            }
            // Denied: give back what earlier groups took, then report every other limit as it
            // stands (a peek at cost 0, as the script does within a group).
            self.undo(&charged, id).await;
            let uncharged: Vec<Limit<'_>> = limits
                .iter()
                .map(|l| Limit::new(l.key, l.quota, 0))
                .collect();
            let mut uncharged = self.items(&uncharged);
            // A lease is peeked as it stands (its unexpired leases counted).
            uncharged.extend(items[limits.len()..].iter().map(|lease| Item {
                key: lease.key.clone(),
                limit: lease.limit,
                cost: lease.cost,
                a: 0,
                b: 0,
                lease: lease.lease,
            }));
            for other in &groups {
                if other == group {
                    continue;
                }
                let sub = Self::subset(&uncharged, other);
                let peek = self
                    .call(Mode::Peek, &sub, id, 0, 0, Budget::unguarded(deadline))
                    .await?;
                for (&i, row) in other.iter().zip(&peek.rows) {
                    decisions[i] = Some(row.decision);
                }
            }
            break;
        }
        decisions
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .map(Verdict::new)
            .ok_or_else(|| protocol("a limit got no decision".into()))
    }

    /// Undoes charged groups, best effort, each within a fresh timeout: a failure here leaves a
    /// charge in place, which only ever errs on the side of denial; it is logged and counted
    /// (`rate_limiter_store_compensation_errors_total{store="redis",op="undo"}`).
    async fn undo(&self, charged: &[(Vec<Item<'_>>, Vec<Row>)], id: &str) {
        for (items, rows) in charged {
            let undo: Vec<Item<'_>> = items
                .iter()
                .zip(rows)
                .enumerate()
                .map(|(i, (item, row))| {
                    let log =
                        item.limit.quota.algorithm() == tollgate_core::Algorithm::SlidingWindowLog;
                    Item {
                        key: item.key.clone(),
                        limit: item.limit,
                        cost: item.cost,
                        // A log's members are named after their index in the call that added them.
                        a: if log { i as u64 + 1 } else { row.a },
                        b: row.b,
                        // A lease's undo removes the member the call added (named by `id`).
                        lease: item.lease,
                    }
                })
                .collect();
            let budget = Budget::unguarded(self.deadline());
            if let Err(error) = self.call(Mode::Undo, &undo, id, 0, 0, budget).await {
                compensation_failed("undo", &error);
            }
        }
    }

    /// Reserves `limits`: on one slot one call; across slots one departure time held in every
    /// group, given back and tried again (three times) if another caller took it in between.
    pub(crate) async fn reserve_items(
        &self,
        limits: &[Limit<'_>],
        max_wait: Duration,
    ) -> Result<Reserve, StoreError> {
        let items = self.items(limits);
        let groups = self.groups(&items);
        let id = self.inner.ids.next();
        let max_wait = micros(max_wait);
        let deadline = self.deadline();
        if let [_] = groups.as_slice() {
            let answer = self
                .call(
                    Mode::Reserve,
                    &items,
                    &id,
                    max_wait,
                    0,
                    Budget::guarded(deadline),
                )
                .await?;
            return self.reserve_answer(&items, answer);
        }
        // Cross-slot: agree on one departure time, then hold it in every group; if someone took
        // it in between, give back and try again (a few times).
        for _ in 0..3 {
            let mut at = 0;
            let mut first_now = None;
            for group in &groups {
                let sub = Self::subset(&items, group);
                let answer = self
                    .call(Mode::Earliest, &sub, &id, 0, 0, Budget::unguarded(deadline))
                    .await?;
                match answer.status {
                    0 => {}
                    3 => return Ok(Reserve::Never),
                    status => {
                        return Err(protocol(format!(
                            "unexpected script reply: earliest status {status}"
                        )));
                    }
                }
                first_now.get_or_insert(answer.now);
                at = at.max(answer.now + answer.wait);
            }
            let now = first_now.unwrap_or(at);
            let wait = at.saturating_sub(now);
            if wait > max_wait {
                return Ok(Reserve::WouldExceed {
                    retry_after: Duration::from_micros(wait),
                });
            }
            if wait > 0 && !limits.iter().all(|l| l.quota.algorithm().is_bucket()) {
                return Ok(Reserve::Retry {
                    after: Duration::from_micros(wait),
                });
            }
            let mut held = Vec::new();
            let mut lost = false;
            for group in &groups {
                let sub = Self::subset(&items, group);
                let budget = Budget::guarded(deadline);
                let answer = match self
                    .call(Mode::Reserve, &sub, &id, MAX_SPAN_MICROS, at, budget)
                    .await
                {
                    Ok(answer) => answer,
                    Err(error) => {
                        // The places held in the groups before are given back.
                        if let Err(e) = self.cancel_held(&held).await {
                            compensation_failed("cancel", &e);
                        }
                        return Err(error);
                    }
                };
                match answer.status {
                    0 => {
                        if let Reserve::Granted(r) = self.reserve_answer(&sub, answer)? {
                            held.extend_from_slice(r.held());
                        }
                    }
                    _ => {
                        lost = true;
                        break;
                    }
                }
            }
            if !lost {
                return Ok(Reserve::Granted(Reservation::new(
                    Duration::from_micros(wait),
                    held,
                )));
            }
            self.cancel_held(&held).await?;
        }
        Ok(Reserve::Retry {
            after: Duration::ZERO,
        })
    }

    /// Gives back the places held, one call per slot group.
    pub(crate) async fn cancel_held(&self, held: &[Held]) -> Result<(), StoreError> {
        if held.is_empty() {
            return Ok(());
        }
        // The cancel script reads only the keys, the before/after times and the charge (given
        // as the cost, in µs).
        let quota = Quota::per_second(1).map_err(|e| protocol(e.to_string()))?;
        let limits: Vec<Limit<'_>> = held.iter().map(|h| Limit::new(&h.key, &quota, 0)).collect();
        let mut items = self.items(&limits);
        for (item, h) in items.iter_mut().zip(held) {
            item.a = h.before.as_micros();
            item.b = h.after.as_micros();
            item.cost = micros(h.charge);
        }
        let id = self.inner.ids.next();
        let budget = Budget::unguarded(self.deadline());
        for group in self.groups(&items) {
            let sub = Self::subset(&items, &group);
            self.call(Mode::Cancel, &sub, &id, 0, 0, budget).await?;
        }
        Ok(())
    }

    /// Reports `limits` as they stand, charging nothing: one call per slot group.
    pub(crate) async fn peek_items(&self, limits: &[Limit<'_>]) -> Result<Verdict, StoreError> {
        let items = self.items(limits);
        let id = self.inner.ids.next();
        let budget = Budget::unguarded(self.deadline());
        let mut decisions = vec![None; items.len()];
        for group in self.groups(&items) {
            let sub = Self::subset(&items, &group);
            let answer = self.call(Mode::Peek, &sub, &id, 0, 0, budget).await?;
            for (&i, row) in group.iter().zip(&answer.rows) {
                decisions[i] = Some(row.decision);
            }
        }
        decisions
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .map(Verdict::new)
            .ok_or_else(|| protocol("a limit got no decision".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots as a Redis server reports them (`CLUSTER KEYSLOT`, Redis 7): the grouping of limits
    /// into one call per slot must match the server's.
    const KNOWN: [(&str, u16); 15] = [
        ("123456789", 12_739),
        ("foo", 12_182),
        ("", 0),
        // A hash tag: only the part inside the first `{...}` is hashed.
        ("{user1000}.following", 3_443),
        ("{user1000}.followers", 3_443),
        ("user1000", 3_443),
        ("foo{bar}{zap}", 5_061),
        ("bar", 5_061),
        // An empty tag, or none closed, hashes the whole key.
        ("foo{}{bar}", 8_363),
        ("{}", 15_257),
        ("foo{bar", 15_278),
        // The tag ends at the first `}` after the first `{`.
        ("foo{{bar}}zap", 4_015),
        ("{bar", 4_015),
        // Keys as the store writes them.
        ("tollgate:{user:alice}:tier", 4_489),
        ("tollgate:global", 242),
    ];

    #[test]
    fn known_slots() {
        for (key, number) in KNOWN {
            let expected = Slot::new(number).expect("a slot number below 16384");
            assert_eq!(Slot::for_key(key), expected, "slot of {key:?}");
        }
    }

    #[test]
    fn keys_group_by_slot_in_order_of_first_appearance() {
        let groups = slot_groups([
            "tollgate:{user:alice}:tier",
            "tollgate:global",
            "tollgate:{user:alice}:route:/api/search",
            "{user1000}.following",
            "user1000",
            "foo{}{bar}",
            "foo{}{baz}",
        ]);
        assert_eq!(groups, [vec![0, 2], vec![1], vec![3, 4], vec![5], vec![6]]);
        assert!(slot_groups([]).is_empty());
    }
}
