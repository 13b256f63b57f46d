//! A Redis Cluster with replicas against real processes: it forms with every master paired with
//! a replica, a killed master is replaced by its replica, and the killed node, restarted, rejoins
//! as a replica of the node that replaced it.

use std::time::{Duration, Instant};

use tollgate_testkit::{RedisCluster, RedisServer, Reply};

/// How long a promotion may take: 2 s node timeout, failure agreement, election; usually 3-6 s.
const FAILOVER: Duration = Duration::from_secs(15);

fn cluster() -> RedisCluster {
    RedisCluster::start_with_replicas(3, 1)
        .unwrap_or_else(|e| panic!("cannot start a cluster with replicas: {e}"))
}

fn cluster_info(node: &RedisServer) -> String {
    node.cmd(&["CLUSTER", "INFO"])
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

/// A key whose slot node `master` serves.
fn key_on(cluster: &RedisCluster, master: usize) -> String {
    (0..10_000)
        .map(|k| format!("key:{k}"))
        .find(|key| cluster.node_for_key(key).unwrap() == master)
        .unwrap_or_else(|| panic!("no key found on node {master}"))
}

/// An integer field of `node`'s `INFO replication`.
fn replication_offset(node: &RedisServer, field: &str) -> i64 {
    let reply = node.cmd(&["INFO", "replication"]).unwrap();
    let text = reply.as_str().unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {text}"))
}

/// Writes `key` on `master` and waits until every replica has applied it: its
/// `slave_repl_offset` reaches the master's offset after the write. (`WAIT` would need the
/// write's connection, and `cmd` opens one per command.)
fn write_replicated(cluster: &RedisCluster, master: usize, key: &str, value: &str) {
    let node = &cluster.nodes()[master];
    assert_eq!(
        node.cmd(&["SET", key, value]).unwrap(),
        Reply::Status("OK".into())
    );
    let written = replication_offset(node, "master_repl_offset");
    let replicas = cluster.replicas_of(master).unwrap();
    assert!(!replicas.is_empty(), "node {master} has no replica");
    let deadline = Instant::now() + Duration::from_secs(5);
    for replica in replicas {
        let replica_node = &cluster.nodes()[replica];
        while replication_offset(replica_node, "slave_repl_offset") < written {
            assert!(
                Instant::now() < deadline,
                "replica {replica} of node {master} did not apply the write (offset {written})"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The only replica of `master`.
fn replica_of(cluster: &RedisCluster, master: usize) -> usize {
    match cluster.replicas_of(master).unwrap().as_slice() {
        [replica] => *replica,
        other => panic!("node {master} has replicas {other:?}, want exactly one"),
    }
}

#[test]
fn a_cluster_with_replicas_starts_with_every_master_paired() {
    let cluster = cluster();
    assert_eq!(cluster.nodes().len(), 6);
    assert_eq!(cluster.urls().len(), 6);
    for node in cluster.nodes() {
        let info = cluster_info(node);
        assert!(info.contains("cluster_state:ok"), "{info}");
        assert!(info.contains("cluster_known_nodes:6"), "{info}");
        assert!(info.contains("cluster_size:3"), "{info}");
        assert!(info.contains("cluster_slots_ok:16384"), "{info}");
    }
    let masters = cluster.masters().unwrap();
    assert_eq!(masters.len(), 3, "masters: {masters:?}");
    assert_eq!(cluster.master_urls().unwrap().len(), 3);
    let mut seen = masters.clone();
    for &master in &masters {
        assert_eq!(cluster.master_of(master).unwrap(), None, "node {master}");
        let replica = replica_of(&cluster, master);
        assert!(!masters.contains(&replica), "{replica} is a master too");
        assert_eq!(cluster.master_of(replica).unwrap(), Some(master));
        seen.push(replica);
        // The replica holds the master's writes; it does not serve them (MOVED to the master).
        let key = key_on(&cluster, master);
        write_replicated(&cluster, master, &key, "v");
        let reply = cluster.nodes()[replica].cmd(&["GET", &key]).unwrap();
        let moved = reply.as_error().unwrap_or_default();
        let port = cluster.nodes()[master].port().to_string();
        assert!(
            moved.starts_with("MOVED ") && moved.ends_with(&port),
            "GET on the replica: {reply:?}"
        );
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        [0, 1, 2, 3, 4, 5],
        "every node is a master or a replica"
    );
    cluster.wait_ok(Duration::from_secs(1)).unwrap();
}

#[test]
fn a_killed_master_is_replaced_by_its_replica() {
    let mut cluster = cluster();
    let old = cluster.masters().unwrap()[0];
    let replica = replica_of(&cluster, old);
    let key = key_on(&cluster, old);
    write_replicated(&cluster, old, &key, "before the kill");

    cluster.stop_node(old);
    let stopped = Instant::now();
    // The slots of the killed master are not covered until the promotion.
    assert!(
        cluster.wait_ok(Duration::from_millis(300)).is_err(),
        "healthy with a master killed and not replaced"
    );
    let new = cluster.wait_for_failover(old, FAILOVER).unwrap();
    let took = stopped.elapsed();
    eprintln!("promotion {took:?} after the kill");
    assert_eq!(new, replica, "the killed master's replica is promoted");
    assert!(took < FAILOVER, "promotion took {took:?}");

    assert_eq!(cluster.master_of(new).unwrap(), None);
    assert_eq!(cluster.node_for_key(&key).unwrap(), new);
    let masters = cluster.masters().unwrap();
    assert_eq!(masters.len(), 3);
    assert!(
        masters.contains(&new) && !masters.contains(&old),
        "{masters:?}"
    );
    // The replicated write survived; the new master takes writes.
    let node = &cluster.nodes()[new];
    assert_eq!(
        node.cmd(&["GET", &key]).unwrap().as_str(),
        Some("before the kill")
    );
    assert_eq!(
        node.cmd(&["SET", &key, "after"]).unwrap(),
        Reply::Status("OK".into())
    );
    // With the killed node left stopped, the cluster is healthy again.
    cluster.wait_ok(Duration::from_secs(5)).unwrap();
    for (i, node) in cluster.nodes().iter().enumerate() {
        if i != old {
            let info = cluster_info(node);
            assert!(info.contains("cluster_state:ok"), "node {i}: {info}");
        }
    }
}

#[test]
fn a_restarted_old_master_rejoins_as_a_replica_and_can_take_over_again() {
    let mut cluster = cluster();
    let first = cluster.masters().unwrap()[1];
    cluster.stop_node(first);
    let second = cluster.wait_for_failover(first, FAILOVER).unwrap();

    let port = cluster.nodes()[first].port();
    cluster.restart_node(first).unwrap();
    assert_eq!(cluster.nodes()[first].port(), port);
    assert_eq!(
        cluster.master_of(first).unwrap(),
        Some(second),
        "the old master rejoins as a replica of the node that replaced it"
    );
    assert_eq!(cluster.replicas_of(second).unwrap(), [first]);
    assert!(!cluster.masters().unwrap().contains(&first));
    // It is a real replica: it follows the new master's writes.
    let key = key_on(&cluster, second);
    write_replicated(&cluster, second, &key, "v");

    // And it can take over in turn.
    cluster.stop_node(second);
    let third = cluster.wait_for_failover(second, FAILOVER).unwrap();
    assert_eq!(third, first);
    assert_eq!(cluster.node_for_key(&key).unwrap(), first);
    assert_eq!(
        cluster.nodes()[first].cmd(&["GET", &key]).unwrap().as_str(),
        Some("v")
    );
}

#[test]
fn waiting_for_a_failover_of_a_replica_says_why_it_cannot_happen() {
    let mut cluster = cluster();
    let master = cluster.masters().unwrap()[0];
    let replica = replica_of(&cluster, master);
    cluster.stop_node(replica);
    let err = cluster
        .wait_for_failover(replica, Duration::from_millis(200))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("no failover of node {replica} to wait for")),
        "{err}"
    );
    // A stopped replica does not make the cluster unhealthy.
    cluster.wait_ok(Duration::from_secs(5)).unwrap();
}
