//! Failure semantics against real servers: calls fail fast with a classified error while Redis is
//! down or unresponsive, the same store value recovers by itself, and a script flushed from the
//! server's cache is reloaded without charging twice or losing state.

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use tollgate_core::{Limit, Outcome, Quota, Store, StoreError, StoreErrorKind, Verdict};
use tollgate_redis::{RedisStore, Scripting};
use tollgate_testkit::{RedisServer, Reply};

/// The call timeout of the standalone fault tests.
const TIMEOUT: Duration = Duration::from_millis(200);
/// The call timeout of the cluster fault test.
const CLUSTER_TIMEOUT: Duration = Duration::from_millis(300);
/// Slack on top of the call timeout for a loaded CI machine.
const MARGIN: Duration = Duration::from_millis(400);
/// A backstop around every store call, far above any bound asserted, so a broken deadline fails
/// the test instead of hanging it.
const BACKSTOP: Duration = Duration::from_secs(10);

fn roomy() -> Quota {
    Quota::per_second(10_000).expect("valid quota")
}

/// One decision of cost 1, with the time it took.
async fn decide(
    store: &RedisStore,
    key: &str,
    quota: &Quota,
) -> (Result<Verdict, StoreError>, Duration) {
    let start = Instant::now();
    let result = backstop(store.decide(&[Limit::new(key, quota, 1)])).await;
    (result, start.elapsed())
}

async fn backstop<T>(f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(BACKSTOP, f).await {
        Ok(v) => v,
        Err(_) => panic!("a store call ran past {BACKSTOP:?}: its own deadline did not fire"),
    }
}

/// Asserts a call failed as a down or unresponsive Redis must make it fail: quickly, with a
/// timeout or unavailable error that says something.
fn assert_fast_failure(
    result: Result<Verdict, StoreError>,
    took: Duration,
    bound: Duration,
    what: &str,
) -> StoreError {
    let e = match result {
        Ok(v) => panic!("{what}: expected an error, got {v:?}"),
        Err(e) => e,
    };
    assert!(
        e.is_unavailable() || e.is_timeout(),
        "{what}: expected unavailable or timeout, got {:?}: {e}",
        e.kind()
    );
    assert!(!e.to_string().is_empty(), "{what}: empty error message");
    assert!(
        took <= bound + MARGIN,
        "{what}: took {took:?}, over {bound:?} + {MARGIN:?} ({e})"
    );
    e
}

/// Polls decisions until one succeeds (and allows), for at most `within`; returns the time it
/// took.
async fn until_allowed(store: &RedisStore, key: &str, quota: &Quota, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let last = match decide(store, key, quota).await.0 {
            Ok(v) => {
                assert!(v.is_allowed(), "after recovery {key} was denied: {v:?}");
                return start.elapsed();
            }
            Err(e) => e,
        };
        assert!(
            start.elapsed() < within,
            "no successful decision on {key} within {within:?}; last error: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn lazy_store(server: &RedisServer) -> RedisStore {
    RedisStore::builder(server.url())
        .timeout(TIMEOUT)
        .connect_timeout(TIMEOUT)
        .build()
        .expect("a lazy store builds")
}

/// Runs blocking test-kit code (process control, waiting for readiness) off the async workers.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_outage_fails_fast_and_recovers() {
    let mut server = common::server();
    let store = lazy_store(&server);
    let quota = roomy();

    let (first, _) = decide(&store, "outage", &quota).await;
    assert!(first.expect("redis is up").is_allowed());

    blocking(|| server.stop());
    let mut kinds = Vec::new();
    for i in 0..20 {
        let (result, took) = decide(&store, "outage", &quota).await;
        let e = assert_fast_failure(result, took, TIMEOUT, &format!("call {i} while down"));
        kinds.push(e.kind());
    }
    // A closed port refuses at once: that is `unavailable` (nothing was sent), not a timeout
    // (outcome unknown).
    assert!(
        kinds.contains(&StoreErrorKind::Unavailable),
        "no call reported the refused connection as unavailable: {kinds:?}"
    );

    blocking(|| server.restart()).expect("the server restarts");
    let took = until_allowed(&store, "outage", &quota, Duration::from_secs(10)).await;
    // And it stays up: the next calls succeed at once.
    for i in 0..5 {
        let (result, _) = decide(&store, "outage", &quota).await;
        match result {
            Ok(v) => assert!(v.is_allowed(), "call {i} after recovery: {v:?}"),
            Err(e) => panic!("call {i} after recovery ({took:?} to recover) failed: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_built_while_redis_is_down_works_once_it_is_up() {
    let mut server = common::server();
    blocking(|| server.stop());
    let store = lazy_store(&server);
    let quota = roomy();

    for i in 0..5 {
        let (result, took) = decide(&store, "late", &quota).await;
        assert_fast_failure(
            result,
            took,
            TIMEOUT,
            &format!("call {i} before redis started"),
        );
    }
    let ping = backstop(store.ping()).await;
    let e = ping.expect_err("ping while down");
    assert!(e.is_unavailable() || e.is_timeout(), "ping: {e}");

    blocking(|| server.restart()).expect("the server starts");
    until_allowed(&store, "late", &quota, Duration::from_secs(10)).await;
    backstop(store.ping()).await.expect("ping once up");
}

/// `n` decisions on `limit`, each answered (`when` says when, if one fails) and allowed: the
/// remaining count of each.
async fn allowed_remaining(
    store: &RedisStore,
    limit: &[Limit<'_>],
    n: usize,
    when: &str,
) -> Vec<u32> {
    let mut remaining = Vec::with_capacity(n);
    for _ in 0..n {
        let v = backstop(store.decide(limit))
            .await
            .unwrap_or_else(|e| panic!("{when}: {e}"));
        assert!(v.is_allowed(), "{v:?}");
        remaining.push(v.decisions()[0].remaining);
    }
    remaining
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flush_mid_run_reloads_without_double_charge() {
    let server = common::server();
    let store =
        common::connect(common::standalone_builder(&server).scripting(Scripting::Eval)).await;
    let quota = Quota::per_hour(1).unwrap().with_burst(5).unwrap();
    let limit = [Limit::new("flushed", &quota, 1)];
    let mut remaining = allowed_remaining(&store, &limit, 3, "before the flush").await;
    // The store loaded the script on first use; SCRIPT FLUSH removes it.
    let sha = common::script_sha1(&server);
    let exists = |server: &RedisServer| {
        server
            .cmd(&["SCRIPT", "EXISTS", &sha])
            .expect("SCRIPT EXISTS")
    };
    assert_eq!(exists(&server), Reply::Array(Some(vec![Reply::Int(1)])));
    assert_eq!(
        server.cmd(&["SCRIPT", "FLUSH"]).expect("SCRIPT FLUSH"),
        Reply::Status("OK".into())
    );
    assert_eq!(exists(&server), Reply::Array(Some(vec![Reply::Int(0)])));

    remaining.extend(
        allowed_remaining(
            &store,
            &limit,
            2,
            "after the flush: NOSCRIPT is handled by loading the script",
        )
        .await,
    );
    // 5, 4, ... down to 0: each call charged exactly once, across the flush.
    assert_eq!(remaining, [4, 3, 2, 1, 0]);
    let v = backstop(store.decide(&limit))
        .await
        .expect("after the flush");
    assert_eq!(v.outcome(), Outcome::Denied, "{v:?}");
}

/// The Functions analogue: `FUNCTION FLUSH` between calls makes the next `FCALL` answer
/// "Function not found"; the call loads the library and runs once more, charging once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_flush_mid_run_reloads_without_double_charge() {
    let server = common::server();
    let store =
        common::connect(common::standalone_builder(&server).scripting(Scripting::Functions)).await;
    let quota = Quota::per_hour(1).unwrap().with_burst(5).unwrap();
    let limit = [Limit::new("flushed", &quota, 1)];
    let mut remaining = allowed_remaining(&store, &limit, 3, "before the flush").await;
    let name = tollgate_redis::function_library_name();
    let listed = common::has_library;
    assert!(listed(&server), "the store loaded no library {name}");
    assert_eq!(
        server.cmd(&["FUNCTION", "FLUSH"]).expect("FUNCTION FLUSH"),
        Reply::Status("OK".into())
    );
    assert!(!listed(&server));
    remaining.extend(
        allowed_remaining(
            &store,
            &limit,
            2,
            "after the flush: \"Function not found\" is handled by loading the library",
        )
        .await,
    );
    assert!(listed(&server), "the library was not loaded again");
    assert_eq!(remaining, [4, 3, 2, 1, 0]);
    let v = backstop(store.decide(&limit))
        .await
        .expect("after the flush");
    assert_eq!(v.outcome(), Outcome::Denied, "{v:?}");
    // Only FCALL ran decisions: no EVALSHA behind the store's back.
    assert_eq!(common::calls(std::slice::from_ref(&server), "evalsha"), 0);
}

/// A server that refuses Functions (here: a user whose ACL denies `FCALL` and `FUNCTION`, as a
/// Redis before 7 refuses the unknown commands): `Auto` falls back to `EVALSHA` and decides,
/// and stays there; `Functions` forced fails, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_evalsha_where_functions_are_refused() {
    let server = common::server();
    let setuser = [
        "ACL",
        "SETUSER",
        "nofn",
        "on",
        ">nofn-pw",
        "~*",
        "&*",
        "+@all",
        "-fcall",
        "-function",
    ];
    assert_eq!(
        server.cmd(&setuser).expect("ACL SETUSER"),
        Reply::Status("OK".into())
    );
    let url = format!("redis://nofn:nofn-pw@127.0.0.1:{}", server.port());
    let builder = RedisStore::builder(url)
        .timeout(common::TEST_TIMEOUT)
        .connect_timeout(common::TEST_TIMEOUT);
    let nodes = std::slice::from_ref(&server);
    let quota = Quota::per_hour(1).unwrap().with_burst(3).unwrap();
    let limit = [Limit::new("fallback", &quota, 1)];

    let auto = common::connect(builder.clone()).await;
    let evalsha_before = common::calls(nodes, "evalsha");
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let v = backstop(auto.decide(&limit)).await.expect("auto decides");
        remaining.push(v.decisions()[0].remaining);
    }
    assert_eq!(
        remaining,
        [2, 1, 0],
        "each call charged once across the fallback"
    );
    // Three decisions, and the first one's NOSCRIPT (the script was not cached yet).
    assert_eq!(common::calls(nodes, "evalsha") - evalsha_before, 4);
    // One refused FCALL, on the first call; none after it.
    let info = server.cmd(&["INFO", "commandstats"]).expect("INFO");
    let fcall = info
        .as_str()
        .and_then(|text| text.lines().find(|l| l.starts_with("cmdstat_fcall:")))
        .unwrap_or_default()
        .to_owned();
    assert!(
        fcall.starts_with("cmdstat_fcall:calls=0,") && fcall.contains(",rejected_calls=1,"),
        "{fcall}"
    );

    let forced = common::connect(builder.scripting(Scripting::Functions)).await;
    let e = backstop(forced.decide(&limit))
        .await
        .expect_err("functions forced on a server refusing them");
    assert!(e.to_string().contains("fcall"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresponsive_server_times_out() {
    let server = common::server();
    let store = lazy_store(&server);
    let quota = roomy();

    let (first, _) = decide(&store, "paused", &quota).await;
    assert!(first.expect("redis is up").is_allowed());

    // CLIENT PAUSE ALL holds every client's commands (EVALSHA included) for 1.5 s; the
    // connection stays open, so only the deadline can end the call.
    let paused_at = Instant::now();
    let reply = server
        .cmd(&["CLIENT", "PAUSE", "1500", "ALL"])
        .expect("CLIENT PAUSE");
    assert_eq!(reply, Reply::Status("OK".into()));

    let (result, took) = decide(&store, "paused", &quota).await;
    let e = assert_fast_failure(result, took, TIMEOUT, "call during CLIENT PAUSE");
    assert!(
        e.is_timeout(),
        "expected a timeout, got {:?}: {e}",
        e.kind()
    );
    assert!(
        took >= TIMEOUT - Duration::from_millis(20),
        "gave up early: {took:?}"
    );
    // Still within the pause: a second call times out too.
    if paused_at.elapsed() < Duration::from_millis(1000) {
        let (result, took) = decide(&store, "paused", &quota).await;
        let e = assert_fast_failure(result, took, TIMEOUT, "second call during CLIENT PAUSE");
        assert!(
            e.is_timeout(),
            "expected a timeout, got {:?}: {e}",
            e.kind()
        );
    }

    let took = until_allowed(&store, "paused", &quota, Duration::from_secs(10)).await;
    assert!(
        paused_at.elapsed() >= Duration::from_millis(1400),
        "a call succeeded {:?} into a 1.5 s pause (after {took:?} of polling)",
        paused_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_node_outage_fails_fast_and_recovers() {
    let mut cluster = common::cluster();
    let store = RedisStore::cluster_builder(cluster.urls())
        .timeout(CLUSTER_TIMEOUT)
        .connect_timeout(CLUSTER_TIMEOUT)
        .build()
        .expect("a lazy cluster store builds");
    let quota = roomy();

    let owned_by = |node: usize| -> String {
        (0..10_000)
            .map(|i| format!("k{i}"))
            .find(|k| {
                cluster
                    .node_for_key(&store.redis_key(k))
                    .expect("CLUSTER SLOTS")
                    == node
            })
            .unwrap_or_else(|| panic!("no key found on node {node}"))
    };
    let down = owned_by(1);
    let up = owned_by(0);

    for key in [&down, &up] {
        let (result, _) = decide(&store, key, &quota).await;
        let v = result.unwrap_or_else(|e| panic!("{key} while healthy: {e}"));
        assert!(v.is_allowed(), "{key}: {v:?}");
    }

    blocking(|| cluster.stop_node(1));
    let stopped_at = Instant::now();
    // Until the other nodes notice (cluster-node-timeout, 2 s) the cluster stays `ok` and the
    // surviving nodes keep serving their slots.
    let (result, _) = decide(&store, &up, &quota).await;
    let v = result.unwrap_or_else(|e| {
        panic!(
            "{up} on a live node, {:?} after node 1 stopped: {e}",
            stopped_at.elapsed()
        )
    });
    assert!(v.is_allowed(), "{up}: {v:?}");

    for i in 0..10 {
        let (result, took) = decide(&store, &down, &quota).await;
        assert_fast_failure(
            result,
            took,
            CLUSTER_TIMEOUT,
            &format!("call {i} on the stopped node"),
        );
    }
    // Once the failure is detected, every node answers CLUSTERDOWN (full coverage is required):
    // that too is `unavailable`, and quick.
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let (result, took) = decide(&store, &up, &quota).await;
        match result {
            Ok(v) => assert!(v.is_allowed(), "{up}: {v:?}"),
            Err(e) => {
                assert!(
                    e.is_unavailable(),
                    "{up} once the cluster is down: {:?}: {e}",
                    e.kind()
                );
                assert!(took <= CLUSTER_TIMEOUT + MARGIN, "took {took:?}: {e}");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the cluster never reported the stopped node ({:?} since the stop)",
            stopped_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let restart_at = Instant::now();
    blocking(|| cluster.restart_node(1)).expect("node 1 rejoins");
    until_allowed(&store, &down, &quota, Duration::from_secs(15)).await;
    until_allowed(&store, &up, &quota, Duration::from_secs(5)).await;
    assert!(
        restart_at.elapsed() < Duration::from_secs(30),
        "recovery took {:?}",
        restart_at.elapsed()
    );
}

/// The `PREFIX:KEY` value of a key, read with the test kit's own connection.
fn raw_value(server: &RedisServer, key: &str) -> Option<String> {
    match server.cmd(&["GET", &format!("tollgate:{key}")]) {
        Ok(reply) => reply.as_str().map(str::to_owned),
        Err(e) => panic!("GET {key}: {e}"),
    }
}

/// A call the store gave up on (the server frozen by `SIGSTOP`) still sits in the server's input
/// buffer; when the server wakes it runs, past its deadline on the server's clock, and must
/// write nothing: the caller was answered by the failure policy already. With batching on (a
/// lone call is a batch of one) and off (the compact one-call layout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_run_after_its_deadline_charges_nothing() {
    let mut server = common::server();
    for batching in [true, false] {
        let store = RedisStore::builder(server.url())
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            .batching(batching)
            .build()
            .expect("a lazy store builds");
        let key = if batching { "late-b" } else { "late-d" };
        // Three an hour: every charge shows, and nothing refills while the test runs.
        let quota = Quota::per_hour(3).expect("valid quota");

        // One call in time, which also teaches the store the server's clock.
        let (first, _) = decide(&store, key, &quota).await;
        assert!(first.expect("redis is up").is_allowed());
        let before = raw_value(&server, key).expect("the first charge was written");

        blocking(|| server.pause()).expect("SIGSTOP");
        for i in 0..5 {
            let (result, took) = decide(&store, key, &quota).await;
            let e = assert_fast_failure(
                result,
                took,
                TIMEOUT,
                &format!("{key}: call {i} while frozen"),
            );
            assert!(e.is_timeout(), "{key}: call {i}: {:?}: {e}", e.kind());
        }
        blocking(|| server.resume()).expect("SIGCONT");

        // The five calls queued in the server run now, all past their deadline.
        let took = until_allowed(&store, key, &quota, Duration::from_secs(10)).await;
        let after = raw_value(&server, key);
        assert_ne!(
            after.as_deref(),
            Some(before.as_str()),
            "{key}: the call that succeeded after the pause was charged"
        );
        // Two of the three were spent (the first call and the one after the pause): one is left.
        let (third, _) = decide(&store, key, &quota).await;
        let third = third.expect("redis is up");
        assert!(
            third.is_allowed(),
            "{key}: the late calls charged the bucket (recovered after {took:?}): {third:?}"
        );
        let (fourth, _) = decide(&store, key, &quota).await;
        assert_eq!(
            fourth.expect("redis is up").outcome(),
            Outcome::Denied,
            "{key}: the bucket holds three"
        );
    }
}
