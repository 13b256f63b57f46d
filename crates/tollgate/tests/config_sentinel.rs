//! A YAML configuration with `store.redis.sentinel` loads and decides through a live Sentinel
//! group (testkit: a master, its replica, three sentinels); its mistakes are named.

use tollgate::config::{Config, StoreConfig};
use tollgate_testkit::{RedisSentinel, Reply};

fn yaml(master: &str, nodes: &[String]) -> String {
    let nodes = nodes
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "limits:\n  events: {{ requests_per_hour: 1, burst_limit: 5 }}\n\
         store:\n  redis:\n    sentinel: {{ master: {master}, nodes: [{nodes}] }}\n    \
         prefix: yaml-sentinel\n    timeout_ms: 500\n    on_error: fail_closed\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_store_loads_and_decides_through_the_master() {
    let group = tokio::task::block_in_place(RedisSentinel::start).expect("a sentinel group starts");
    let text = yaml(group.master_name(), &group.sentinel_urls());
    let config = Config::parse(&text, "limits.yaml").expect("loads");
    assert_eq!(
        config.store,
        StoreConfig::Sentinel {
            master: group.master_name().to_owned(),
            nodes: group.sentinel_urls(),
            prefix: "yaml-sentinel".to_owned(),
            username: None,
            password: None,
            db: 0,
        }
    );
    let master = &group.nodes()[group.node_index(group.master_addr().unwrap()).unwrap()];
    assert_eq!(master.cmd(&["DBSIZE"]).unwrap(), Reply::Int(0));

    // Two limiters from the same file, as two processes would build them: one budget in Redis.
    let a = config.limiter().expect("the limiter builds");
    let b = config.limiter().expect("the limiter builds");
    let mut admitted = 0;
    for i in 0..4 {
        match a.check("events", "alice").await {
            Ok(_) => admitted += 1,
            Err(e) => assert!(e.is_rate_limited(), "call {i}: {e}"),
        }
    }
    for i in 0..4 {
        match b.check("events", "alice").await {
            Ok(_) => admitted += 1,
            Err(e) => assert!(e.is_rate_limited(), "call {i}: {e}"),
        }
    }
    assert_eq!(
        admitted, 5,
        "a burst of 5 shared by two limiters admitted {admitted}"
    );
    let keys = master.cmd(&["DBSIZE"]).unwrap().as_int().unwrap();
    assert!(keys > 0, "the decisions left no key on the master");
}

#[test]
fn sentinel_mistakes_are_named() {
    let err = |text: &str| Config::parse(text, "limits.yaml").unwrap_err().to_string();
    let limits = "limits:\n  events: { requests_per_hour: 1 }\n";
    let e = err(&format!(
        "{limits}store:\n  redis:\n    sentinel: {{ master: m, nodes: [] }}\n"
    ));
    assert!(
        e.contains("store.redis.sentinel.nodes") && e.contains("at least one sentinel"),
        "{e}"
    );
    let e = err(&format!(
        "{limits}store:\n  redis:\n    sentinel: {{ master: \"\", nodes: [\"redis://a:26379\"] }}\n"
    ));
    assert!(e.contains("store.redis.sentinel.master"), "{e}");
    let e = err(&format!(
        "{limits}store:\n  redis:\n    url: \"redis://a\"\n    sentinel: {{ master: m, nodes: [\"redis://a:26379\"] }}\n"
    ));
    assert!(e.contains("give one of url"), "{e}");
    let e = err(&format!(
        "{limits}store:\n  redis:\n    sentinel: {{ master: m, nodes: [\"redis://a:26379\"], database: 1 }}\n"
    ));
    assert!(e.contains("unknown field `database`"), "{e}");
}

/// `password` (and `db`) under `sentinel:` reach the master: decisions land in that database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_master_password_and_db_from_yaml() {
    let group = tokio::task::block_in_place(|| RedisSentinel::start_with_password("yaml-pw"))
        .expect("a sentinel group starts");
    let nodes = group
        .sentinel_urls()
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "limits:\n  events: {{ requests_per_hour: 1, burst_limit: 2 }}\n\
         store:\n  redis:\n    sentinel: {{ master: {}, nodes: [{nodes}], password: yaml-pw, db: 3 }}\n    \
         timeout_ms: 500\n    on_error: fail_closed\n",
        group.master_name()
    );
    let config = Config::parse(&text, "limits.yaml").expect("loads");
    assert!(!format!("{:?}", config.store).contains("yaml-pw"));
    let limiter = config.limiter().expect("the limiter builds");
    let mut admitted = 0;
    for i in 0..3 {
        match limiter.check("events", "bob").await {
            Ok(_) => admitted += 1,
            Err(e) => assert!(e.is_rate_limited(), "call {i}: {e}"),
        }
    }
    assert_eq!(admitted, 2);
    let master = &group.nodes()[group.node_index(group.master_addr().unwrap()).unwrap()];
    assert_eq!(
        master.cmd(&["DBSIZE"]).unwrap(),
        Reply::Int(0),
        "db 0 is untouched"
    );
    let keyspace = master.cmd(&["INFO", "keyspace"]).unwrap();
    let keyspace = keyspace.as_str().expect("INFO is text");
    assert!(keyspace.contains("db3:keys="), "{keyspace}");
}
