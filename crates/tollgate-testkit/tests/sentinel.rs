//! Smoke tests of the Sentinel topology against real processes.

use std::time::{Duration, Instant};

use tollgate_testkit::{RedisSentinel, Reply};

fn role(group: &RedisSentinel, i: usize) -> String {
    let reply = group.nodes()[i].cmd(&["ROLE"]).unwrap();
    let first = reply.as_array().and_then(|a| a.first().cloned());
    first
        .and_then(|r| r.as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("unexpected ROLE reply {reply:?}"))
}

#[test]
fn forced_failover_promotes_the_replica() {
    let mut group = RedisSentinel::start().unwrap();
    assert_eq!(group.sentinel_urls().len(), 3);
    let old = group.master_addr().unwrap();
    assert_eq!(old, group.nodes()[0].addr(), "node 0 starts as the master");
    assert_eq!(role(&group, 0), "master");
    assert_eq!(role(&group, 1), "slave");

    // A write on the master reaches the replica.
    assert_eq!(
        group.nodes()[0].cmd(&["SET", "k", "v"]).unwrap(),
        Reply::Status("OK".into())
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while group.nodes()[1].cmd(&["GET", "k"]).unwrap().as_str() != Some("v") {
        assert!(
            Instant::now() < deadline,
            "the write never reached the replica"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let started = Instant::now();
    group.failover().unwrap();
    let new = group
        .wait_for_new_master(old, Duration::from_secs(20))
        .unwrap();
    eprintln!("failover took {:?}", started.elapsed());
    assert_eq!(
        new,
        group.nodes()[1].addr(),
        "the replica is the new master"
    );
    assert_eq!(group.node_index(new), Some(1));
    assert_eq!(role(&group, 1), "master");
    assert_eq!(
        group.nodes()[1].cmd(&["GET", "k"]).unwrap().as_str(),
        Some("v")
    );
    // The new master takes writes.
    assert_eq!(
        group.nodes()[1].cmd(&["SET", "k2", "v2"]).unwrap(),
        Reply::Status("OK".into())
    );
}

#[test]
fn a_killed_master_is_replaced_by_its_replica() {
    let mut group = RedisSentinel::start().unwrap();
    let old = group.master_addr().unwrap();
    group.node_mut(0).stop();
    let new = group
        .wait_for_new_master(old, Duration::from_secs(30))
        .unwrap();
    assert_eq!(new, group.nodes()[1].addr());
    assert_eq!(role(&group, 1), "master");
}

#[test]
fn a_group_with_a_password_forms_and_fails_over() {
    let mut group = RedisSentinel::start_with_password("pw-2").unwrap();
    let old = group.master_addr().unwrap();
    group.failover().unwrap();
    let new = group
        .wait_for_new_master(old, Duration::from_secs(20))
        .unwrap();
    assert_ne!(new, old);
    let i = group.node_index(new).unwrap();
    assert_eq!(role(&group, i), "master");
}
