//! Concurrency leases against real servers, on both scripting paths: the cap holds exactly for
//! concurrent callers on separate connections (two stores, as two application servers would
//! have), a release frees one, a lease not given back expires by its ttl, the lease and the limits
//! are all or nothing both ways; on a cluster, with the lease in another slot than a limit, the
//! cross-slot undo gives the lease back.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use tollgate_core::{
    LEASE_RETRY_AFTER, Lease, LeaseId, Leased, Limit, Outcome, Quota, Store, StoreErrorKind,
};
use tollgate_redis::{RedisStore, RedisStoreBuilder};
use tollgate_testkit::{RedisCluster, RedisServer, Reply};

const TTL: Duration = Duration::from_secs(30);

async fn leased(store: &RedisStore, limits: &[Limit<'_>], lease: &Lease<'_>) -> Leased {
    match tokio::time::timeout(Duration::from_secs(10), store.decide_leased(limits, lease)).await {
        Ok(Ok(answer)) => {
            assert_eq!(
                answer.lease.is_some(),
                answer.verdict.is_allowed(),
                "a lease exactly when the verdict allows: {answer:?}"
            );
            assert_eq!(
                answer.verdict.decisions().len(),
                limits.len() + 1,
                "one row per limit, then the lease's"
            );
            answer
        }
        Ok(Err(e)) => panic!("decide_leased {}: {e}", lease.key),
        Err(_) => panic!("decide_leased {}: no answer in 10 s", lease.key),
    }
}

async fn release(store: &RedisStore, key: &str, id: LeaseId) {
    if let Err(e) = store.release(key, id).await {
        panic!("release {key}: {e}");
    }
}

async fn remaining(store: &RedisStore, key: &str, quota: &Quota) -> u32 {
    match store.peek(&[Limit::new(key, quota, 0)]).await {
        Ok(v) => v.decisions()[0].remaining,
        Err(e) => panic!("peek {key}: {e}"),
    }
}

fn cmd(node: &RedisServer, args: &[&str]) -> Reply {
    match node.cmd(args) {
        Ok(Reply::Error(e)) => panic!("{args:?}: error reply {e}"),
        Ok(reply) => reply,
        Err(e) => panic!("{args:?}: {e}"),
    }
}

fn int(node: &RedisServer, args: &[&str]) -> i64 {
    let reply = cmd(node, args);
    reply
        .as_int()
        .unwrap_or_else(|| panic!("{args:?}: not an integer: {reply:?}"))
}

/// The members (leases, expired ones included) of the lease key `key` (a Redis key) on `node`.
fn members(node: &RedisServer, key: &str) -> i64 {
    int(node, &["ZCARD", key])
}

fn quota(burst: u32) -> Quota {
    Quota::per_hour(1).unwrap().with_burst(burst).unwrap()
}

/// The node suite: every lease behaviour on one server, through `builder`, in namespace `ns`.
async fn node_suite(server: &RedisServer, builder: RedisStoreBuilder, ns: &str) {
    // Two stores, two connections: two application servers sharing the cap.
    let one = common::connect(builder.clone()).await;
    let two = common::connect(builder).await;

    // 20 concurrent acquisitions, 10 from each store, on a cap of 3.
    let key = format!("{{{ns}:alice}}:c:basic");
    let lease = Lease::new(&key, 3, TTL);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = if i % 2 == 0 { one.clone() } else { two.clone() };
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let lease = Lease::new(&key, 3, TTL);
            (i % 2, leased(&store, &[], &lease).await.lease)
        }));
    }
    let mut granted = Vec::new();
    for t in tasks {
        if let (store, Some(id)) = t.await.expect("task") {
            granted.push((store, id));
        }
    }
    assert_eq!(
        granted.len(),
        3,
        "{ns}: 20 acquisitions on a cap of 3: {granted:?}"
    );
    let ids: HashSet<LeaseId> = granted.iter().map(|&(_, id)| id).collect();
    assert_eq!(ids.len(), 3, "{ns}: lease ids are unique");
    let redis_key = one.redis_key(&key);
    assert_eq!(members(server, &redis_key), 3);
    assert_eq!(cmd(server, &["TYPE", &redis_key]).as_str(), Some("zset"));

    // The lease's row when full.
    let full = leased(&one, &[], &lease).await;
    let row = full.verdict.decisions()[0];
    assert_eq!(
        (row.outcome, row.limit, row.remaining),
        (Outcome::Denied, 3, 0)
    );
    assert_eq!(row.retry_after, LEASE_RETRY_AFTER);
    assert_eq!(
        (row.reset_after, row.delay),
        (Duration::ZERO, Duration::ZERO)
    );

    // A release frees one, whichever store took it; again, or an unknown id, frees nothing.
    let (_, freed) = granted[0];
    release(&two, &key, freed).await;
    release(&one, &key, freed).await;
    release(&one, &key, LeaseId::from_u128(7)).await;
    release(&one, "nobody:holds:this", freed).await;
    assert_eq!(members(server, &redis_key), 2);
    let again = leased(&one, &[], &lease).await;
    let row = again.verdict.decisions()[0];
    assert_eq!((row.outcome, row.remaining), (Outcome::Allowed, 0));
    assert!(leased(&two, &[], &lease).await.lease.is_none());
    // Give them all back: the key goes with its last member.
    for id in granted[1..].iter().map(|&(_, id)| id).chain(again.lease) {
        release(&one, &key, id).await;
    }
    assert_eq!(int(server, &["EXISTS", &redis_key]), 0);

    // Ids differ between stores: each draws its own 64-bit seed.
    let a = leased(&one, &[], &Lease::new(&key, 10, TTL))
        .await
        .lease
        .expect("a lease");
    let b = leased(&two, &[], &Lease::new(&key, 10, TTL))
        .await
        .lease
        .expect("a lease");
    assert_ne!(
        a.as_u128() >> 64,
        b.as_u128() >> 64,
        "{ns}: two stores, one seed"
    );
    let a2 = leased(&one, &[], &Lease::new(&key, 10, TTL))
        .await
        .lease
        .expect("a lease");
    assert_eq!(a.as_u128() >> 64, a2.as_u128() >> 64);
    assert_ne!(a, a2);
    for id in [a, b, a2] {
        release(&one, &key, id).await;
    }

    // A crashed holder: its leases expire by their ttl, without a release.
    let short = Lease::new(&key, 2, Duration::from_millis(300));
    assert!(leased(&one, &[], &short).await.lease.is_some());
    assert!(leased(&two, &[], &short).await.lease.is_some());
    assert!(leased(&one, &[], &short).await.lease.is_none());
    let pttl = int(server, &["PTTL", &redis_key]);
    assert!(
        (300..=1_300).contains(&pttl),
        "{ns}: the key outlives its newest lease by at most the margin: {pttl} ms"
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    let after = leased(&two, &[], &short).await;
    assert!(
        after.lease.is_some(),
        "{ns}: the expired leases freed their places"
    );
    assert_eq!(
        after.verdict.decisions()[0].remaining,
        1,
        "the expired ones were dropped"
    );
    assert_eq!(members(server, &redis_key), 1);
    release(&two, &key, after.lease.expect("a lease")).await;

    // A full lease charges no limit.
    let tier = quota(5);
    let tier_key = format!("{{{ns}:bob}}:tier");
    let lease_key = format!("{{{ns}:bob}}:c:basic");
    let limits = [Limit::new(&tier_key, &tier, 1)];
    let single = Lease::new(&lease_key, 1, TTL);
    let first = leased(&one, &limits, &single).await;
    assert!(first.lease.is_some());
    assert_eq!(first.verdict.decisions()[0].remaining, 4);
    for _ in 0..3 {
        let denied = leased(&two, &limits, &single).await;
        let rows = denied.verdict.decisions();
        assert_eq!(
            (rows[0].outcome, rows[0].remaining),
            (Outcome::Allowed, 4),
            "as it stands"
        );
        assert_eq!(rows[1].outcome, Outcome::Denied);
        assert_eq!(denied.verdict.retry_after(), LEASE_RETRY_AFTER);
    }
    assert_eq!(
        remaining(&one, &tier_key, &tier).await,
        4,
        "{ns}: no denial charged the tier"
    );

    // A denied limit takes no lease.
    let tight = quota(1);
    let tight_key = format!("{{{ns}:carol}}:tier");
    let lease_key = format!("{{{ns}:carol}}:c:basic");
    let limits = [
        Limit::new(&tier_key, &tier, 1),
        Limit::new(&tight_key, &tight, 1),
    ];
    let roomy = Lease::new(&lease_key, 3, TTL);
    assert!(leased(&one, &limits, &roomy).await.lease.is_some());
    assert_eq!(remaining(&one, &tier_key, &tier).await, 3);
    let denied = leased(&two, &limits, &roomy).await;
    let rows = denied.verdict.decisions();
    assert_eq!(
        (rows[0].outcome, rows[0].remaining),
        (Outcome::Allowed, 3),
        "uncharged"
    );
    assert_eq!(rows[1].outcome, Outcome::Denied);
    assert_eq!(
        (rows[2].outcome, rows[2].limit, rows[2].remaining),
        (Outcome::Allowed, 3, 2)
    );
    assert_eq!(
        members(server, &one.redis_key(&lease_key)),
        1,
        "{ns}: no lease taken"
    );
    assert_eq!(remaining(&one, &tier_key, &tier).await, 3);

    // A max of 0 denies always, and creates no key.
    let none = Lease::new("zero", 0, TTL);
    for _ in 0..2 {
        let denied = leased(&one, &[], &none).await;
        let row = denied.verdict.decisions()[0];
        assert_eq!(
            (row.outcome, row.limit, row.remaining),
            (Outcome::Denied, 0, 0)
        );
    }
    assert_eq!(int(server, &["EXISTS", &one.redis_key("zero")]), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_on_a_node_on_both_paths() {
    let server = common::server();
    for (scripting, path) in common::PATHS {
        let builder = common::standalone_builder(&server).scripting(scripting);
        common::on_path(std::slice::from_ref(&server), scripting, || {
            node_suite(&server, builder, path)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_on_a_server_that_is_down_fails_as_unavailable() {
    let mut server = common::server();
    let store =
        common::connect(common::standalone_builder(&server).timeout(Duration::from_millis(300)))
            .await;
    let lease = Lease::new("c", 1, TTL);
    let id = leased(&store, &[], &lease).await.lease.expect("a lease");
    tokio::task::block_in_place(|| server.stop());
    for _ in 0..3 {
        let e = store.decide_leased(&[], &lease).await.expect_err("down");
        assert!(e.is_unavailable() || e.is_timeout(), "decide_leased: {e}");
        let e = store.release("c", id).await.expect_err("down");
        assert!(e.is_unavailable() || e.is_timeout(), "release: {e}");
        assert_ne!(e.kind(), StoreErrorKind::Other, "{e}");
    }
}

/// The node of `cluster` that holds the Redis key `key`.
fn node_of<'c>(cluster: &'c RedisCluster, key: &str) -> &'c RedisServer {
    let i = cluster.node_for_key(key).expect("the slot's node");
    &cluster.nodes()[i]
}

async fn cluster_suite(cluster: &RedisCluster, store: &RedisStore, ns: &str) {
    let roomy = quota(100);
    let tight = quota(1);
    // The caller's tier and the lease share a hash tag; the shared limit is in another slot.
    let tier_key = format!("{{{ns}:dave}}:tier");
    let lease_key = format!("{{{ns}:dave}}:c:basic");
    let global_key = format!("{ns}:global");
    let lease_redis = store.redis_key(&lease_key);
    let lease_node = node_of(cluster, &lease_redis);
    let slot = |key: &str| int(lease_node, &["CLUSTER", "KEYSLOT", &store.redis_key(key)]);
    assert_ne!(
        slot(&lease_key),
        slot(&global_key),
        "the test needs two slots"
    );
    assert_ne!(
        slot(&tier_key),
        slot(&format!("{ns}:c:solo")),
        "the test needs two slots"
    );

    // Lease and tier first (one group), global after (another): all allow, all are charged.
    let lease = Lease::new(&lease_key, 2, TTL);
    let limits = [
        Limit::new(&tier_key, &roomy, 1),
        Limit::new(&global_key, &tight, 1),
    ];
    let first = leased(store, &limits, &lease).await;
    let id = first.lease.expect("every group allows");
    assert_eq!(members(lease_node, &lease_redis), 1);
    assert_eq!(remaining(store, &tier_key, &roomy).await, 99);
    release(store, &lease_key, id).await;
    assert_eq!(members(lease_node, &lease_redis), 0);

    // The global is spent: its group denies after the lease's group took the lease; the undo
    // gives back both the lease and the tier's charge.
    for _ in 0..3 {
        let denied = leased(store, &limits, &lease).await;
        assert!(denied.lease.is_none());
        let rows = denied.verdict.decisions();
        assert_eq!(
            (rows[0].outcome, rows[0].remaining),
            (Outcome::Allowed, 99),
            "undone"
        );
        assert_eq!(rows[1].outcome, Outcome::Denied);
        assert_eq!(
            (rows[2].outcome, rows[2].remaining),
            (Outcome::Allowed, 2),
            "undone"
        );
        assert_eq!(
            members(lease_node, &lease_redis),
            0,
            "{ns}: the undo released the lease"
        );
        assert_eq!(remaining(store, &tier_key, &roomy).await, 99);
    }

    // The lease in a slot of its own, after the limit: a full lease undoes the limit's charge.
    let solo_key = format!("{ns}:c:solo");
    let solo_redis = store.redis_key(&solo_key);
    let solo_node = node_of(cluster, &solo_redis);
    let solo = Lease::new(&solo_key, 1, TTL);
    let limits = [Limit::new(&tier_key, &roomy, 1)];
    let held = leased(store, &limits, &solo).await.lease.expect("free");
    assert_eq!(remaining(store, &tier_key, &roomy).await, 98);
    for _ in 0..3 {
        let full = leased(store, &limits, &solo).await;
        let rows = full.verdict.decisions();
        assert_eq!(
            (rows[0].outcome, rows[0].remaining),
            (Outcome::Allowed, 98),
            "undone"
        );
        assert_eq!(
            (rows[1].outcome, rows[1].retry_after),
            (Outcome::Denied, LEASE_RETRY_AFTER)
        );
    }
    assert_eq!(
        remaining(store, &tier_key, &roomy).await,
        98,
        "{ns}: all or nothing"
    );
    assert_eq!(members(solo_node, &solo_redis), 1);
    release(store, &solo_key, held).await;
    assert_eq!(members(solo_node, &solo_redis), 0);
    assert!(
        leased(store, &[], &solo).await.lease.is_some(),
        "lease only, across the cluster"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_on_a_cluster_are_all_or_nothing_across_slots() {
    let cluster = common::cluster();
    for (scripting, path) in common::PATHS {
        let store = common::connect(common::cluster_builder(&cluster).scripting(scripting)).await;
        common::on_path(cluster.nodes(), scripting, || {
            cluster_suite(&cluster, &store, path)
        })
        .await;
    }
}
