//! Shared helpers: real servers from tollgate-testkit and stores on them.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use tollgate_redis::{RedisStore, RedisStoreBuilder, Scripting};
use tollgate_testkit::{RedisCluster, RedisSentinel, RedisServer, Reply};

/// A generous timeout for tests about decisions, so a loaded CI machine does not turn a slow
/// answer into a failure; the fault tests set their own.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(2);

pub fn server() -> RedisServer {
    match RedisServer::start() {
        Ok(s) => s,
        Err(e) => panic!("cannot start redis-server: {e}"),
    }
}

pub fn cluster() -> RedisCluster {
    match RedisCluster::start() {
        Ok(c) => c,
        Err(e) => panic!("cannot start a redis cluster: {e}"),
    }
}

/// Three masters, each with one replica (6 nodes), for failover tests.
pub fn cluster_with_replicas() -> RedisCluster {
    match RedisCluster::start_with_replicas(3, 1) {
        Ok(c) => c,
        Err(e) => panic!("cannot start a redis cluster with replicas: {e}"),
    }
}

pub fn sentinel() -> RedisSentinel {
    match RedisSentinel::start() {
        Ok(s) => s,
        Err(e) => panic!("cannot start a redis sentinel group: {e}"),
    }
}

pub fn sentinel_builder(group: &RedisSentinel) -> RedisStoreBuilder {
    RedisStore::sentinel_builder(group.master_name(), group.sentinel_urls())
        .timeout(TEST_TIMEOUT)
        .connect_timeout(TEST_TIMEOUT)
}

pub fn standalone_builder(server: &RedisServer) -> RedisStoreBuilder {
    RedisStore::builder(server.url())
        .timeout(TEST_TIMEOUT)
        .connect_timeout(TEST_TIMEOUT)
}

pub fn cluster_builder(cluster: &RedisCluster) -> RedisStoreBuilder {
    RedisStore::cluster_builder(cluster.urls())
        .timeout(TEST_TIMEOUT)
        .connect_timeout(TEST_TIMEOUT)
}

pub async fn connect(builder: RedisStoreBuilder) -> RedisStore {
    match builder.connect().await {
        Ok(s) => s,
        Err(e) => panic!("cannot connect: {e}"),
    }
}

/// Both ways the store runs its Lua code, each forced (no silent fallback), with a label: the
/// suites that must answer the same on both run once per path.
pub const PATHS: [(Scripting, &str); 2] = [
    (Scripting::Functions, "fcall"),
    (Scripting::Eval, "evalsha"),
];

/// How many times `nodes` ran `command` (`fcall`, `evalsha`), from `INFO commandstats`.
pub fn calls(nodes: &[RedisServer], command: &str) -> u64 {
    let field = format!("cmdstat_{command}:calls=");
    nodes
        .iter()
        .map(|node| {
            let info = node
                .cmd(&["INFO", "commandstats"])
                .expect("INFO commandstats");
            let text = info.as_str().expect("INFO is a string").to_owned();
            text.lines()
                .find_map(|l| l.strip_prefix(field.as_str()))
                .and_then(|rest| rest.split(',').next())
                .map_or(0, |n| n.parse::<u64>().expect("a call count"))
        })
        .sum()
}

/// Runs `run` with `scripting`, and checks from the servers' own counts that its calls went
/// that way: `FCALL` only, or `EVALSHA` only.
pub async fn on_path<F: Future<Output = ()>>(
    nodes: &[RedisServer],
    scripting: Scripting,
    run: impl FnOnce() -> F,
) {
    let before = (calls(nodes, "fcall"), calls(nodes, "evalsha"));
    run().await;
    let after = (calls(nodes, "fcall"), calls(nodes, "evalsha"));
    let (fcalls, evalshas) = (after.0 - before.0, after.1 - before.1);
    match scripting {
        Scripting::Functions => assert!(
            fcalls > 0 && evalshas == 0,
            "functions path: {fcalls} FCALL, {evalshas} EVALSHA"
        ),
        _ => assert!(
            evalshas > 0 && fcalls == 0,
            "eval path: {fcalls} FCALL, {evalshas} EVALSHA"
        ),
    }
}

/// Whether `node` holds this version's function library (`FUNCTION LIST LIBRARYNAME`).
pub fn has_library(node: &RedisServer) -> bool {
    let name = tollgate_redis::function_library_name();
    match node.cmd(&["FUNCTION", "LIST", "LIBRARYNAME", name]) {
        Ok(Reply::Array(Some(libraries))) => !libraries.is_empty(),
        other => panic!("FUNCTION LIST answered {other:?}"),
    }
}

/// A fresh key with burst 5 (per hour) admits exactly 5 of 10 calls, every call answered.
pub async fn burst_is_exact(store: &RedisStore, key: &str) {
    use tollgate_core::{Limit, Quota, Store};
    let quota = Quota::per_hour(1).unwrap().with_burst(5).unwrap();
    let mut admitted = 0;
    for i in 0..10 {
        match store.decide(&[Limit::new(key, &quota, 1)]).await {
            Ok(v) if v.is_allowed() => admitted += 1,
            Ok(_) => {}
            Err(e) => panic!("call {i} on {key} failed after recovery: {e}"),
        }
    }
    assert_eq!(admitted, 5, "{key}: a burst of 5 admitted {admitted} of 10");
}

/// The SHA1 of tollgate's script (what `EVALSHA` names it), computed by the server's Lua.
pub fn script_sha1(node: &RedisServer) -> String {
    let reply = node
        .cmd(&[
            "EVAL",
            "return redis.sha1hex(ARGV[1])",
            "0",
            tollgate_redis::script_source(),
        ])
        .expect("EVAL sha1hex");
    reply.as_str().expect("a hex digest").to_owned()
}

/// Whether `node` has the script of SHA1 `sha` in its cache (`SCRIPT EXISTS`).
pub fn script_cached(node: &RedisServer, sha: &str) -> bool {
    match node.cmd(&["SCRIPT", "EXISTS", sha]).expect("SCRIPT EXISTS") {
        Reply::Array(Some(items)) => items == [Reply::Int(1)],
        other => panic!("unexpected SCRIPT EXISTS reply {other:?}"),
    }
}
