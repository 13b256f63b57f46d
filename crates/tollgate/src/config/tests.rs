//! The configuration's unit tests: the design's example, errors with their file, line and field.

use std::path::PathBuf;
use std::time::Duration;

use http::Method;
use tollgate_core::{Algorithm, Quota};

use super::*;

const GOOD: &str = r#"
store: memory
headers: both
shadow: false
global:
  requests_per_second: 1000
  burst_limit: 2000
rate_limits:
  anonymous:  { requests_per_minute: 10,   burst_limit: 5 }
  basic:      { requests_per_minute: 100,  burst_limit: 20 }
  pro:        { requests_per_minute: 500,  burst_limit: 100 }
  enterprise: { requests_per_minute: 1000, burst_limit: 200, algorithm: sliding_window_log }
  windowed:   { limit: 30, window: 10s, algorithm: fixed_window }
routes:
  - { method: POST, path: /api/reports, cost: 5 }
  - { path: /api/search, limit: { requests_per_minute: 30, burst_limit: 10 } }
api_keys:
  key-alice: { user: alice, tier: basic }
  key-bob:   { user: bob,   tier: pro }
trusted_proxies: ["127.0.0.1/32"]
"#;

fn err(text: &str) -> ConfigError {
    Config::parse(text, "limits.yaml").unwrap_err()
}

#[test]
fn the_design_example_loads() {
    let c = Config::parse(GOOD, "limits.yaml").unwrap();
    let (_, basic) = c.policy.tier("basic").unwrap();
    assert_eq!(basic.limit(), 20);
    assert_eq!(basic.interval(), Duration::from_millis(600));
    let (_, ent) = c.policy.tier("enterprise").unwrap();
    assert_eq!(ent.algorithm(), Algorithm::SlidingWindowLog);
    assert_eq!(
        (ent.limit(), ent.interval()),
        (1000, Duration::from_secs(60))
    );
    assert_eq!(c.policy.global().unwrap().limit(), 2000);
    assert_eq!(
        c.policy
            .route(&Method::POST, "/api/reports")
            .unwrap()
            .request_cost(),
        5
    );
    assert_eq!(c.store, StoreConfig::Memory);
}

#[test]
fn errors_name_file_line_and_field() {
    let e = err(&GOOD.replace("100,  burst_limit: 20 }", "100,  burst_limit: 0 }"));
    assert_eq!(e.line, Some(10), "{e}");
    assert!(
        e.to_string()
            .starts_with("limits.yaml:10: rate_limits.basic.burst_limit"),
        "{e}"
    );

    let e = err(&GOOD.replace("requests_per_minute: 100,", "requests_per_minute: 0,"));
    assert_eq!(e.line, Some(10), "{e}");

    let e = err(&GOOD.replace("tier: pro }", "tier: platinum }"));
    assert_eq!(
        (e.line, e.field.as_deref()),
        (Some(19), Some("api_keys.key-bob.tier")),
        "{e}"
    );
    assert!(e.message.contains("platinum"));

    let e = err(&GOOD.replace("shadow: false", "shadow: false\nsurprise: 1"));
    assert_eq!(e.line, Some(5), "{e}");
    assert!(e.message.contains("surprise"), "{e}");

    let e = err(&GOOD.replace("window: 10s", "window: 10 parsecs"));
    assert_eq!(e.line, Some(13), "{e}");
    assert_eq!(e.field.as_deref(), Some("rate_limits.windowed.window"));

    let e = err(&GOOD.replace(
        "requests_per_minute: 30, burst_limit: 10",
        "requests_per_minute: 30, burst_limit: 0",
    ));
    assert_eq!(e.line, Some(16), "{e}");
    let e = err(&GOOD.replace(
        "cost: 5",
        "cost: 5, limit: { requests_per_minute: 1, burst_limit: 2 }",
    ));
    assert_eq!(
        (e.line, e.field.as_deref()),
        (Some(15), Some("routes[0].cost")),
        "{e}"
    );

    let e = err("rate_limits: [\n");
    assert!(e.line.is_some(), "{e}");
}

/// Found by the `config` fuzz target: a file with lone `\r` line ends (old Mac style) was
/// numbered by the parser one way and by the error locator another. Every line now comes from
/// the parser.
#[test]
fn lines_are_counted_as_the_parser_counts_them() {
    for eol in ["\n", "\r\n", "\r"] {
        let text = GOOD.replace('\n', eol);
        // Found after parsing: the unknown tier of key-bob, line 19.
        let e = err(&text.replace("tier: pro }", "tier: platinum }"));
        assert_eq!(e.line, Some(19), "{eol:?}: {e}");
        // Found by the parser: the unknown key, line 5.
        let e = err(&text.replace("shadow: false", &format!("shadow: false{eol}surprise: 1")));
        assert_eq!(e.line, Some(5), "{eol:?}: {e}");
    }
}

#[test]
fn a_key_given_twice_is_found_where_it_is_given_again() {
    let e = err(
        "rate_limits:\n  basic: { requests_per_hour: 1 }\n  pro: { requests_per_hour: 2 }\n  basic: { requests_per_hour: 3 }\n",
    );
    assert_eq!(
        (e.line, e.field.as_deref()),
        (Some(4), Some("rate_limits")),
        "{e}"
    );
    assert!(e.message.contains("`basic` is given twice"), "{e}");
    // Flow style: the same line.
    let e = err("rate_limits: { a: { requests_per_hour: 1 }, a: { requests_per_hour: 2 } }\n");
    assert_eq!(e.line, Some(1), "{e}");
    // Multi-byte characters before the mapping do not throw the search off a character.
    let e = err(
        "rate_limits:\n  \u{e9}t\u{e9}: { requests_per_hour: 1 }\n  \u{e9}t\u{e9}: { requests_per_hour: 2 }\n",
    );
    assert_eq!(e.line, Some(3), "{e}");
    let e = err(
        "rate_limits: { \u{e9}\u{e9}\u{e9}: { requests_per_hour: 1 }, \u{e9}\u{e9}\u{e9}: { requests_per_hour: 2 } }\n",
    );
    assert!(e.line.is_some(), "{e}");
    // A field of a struct given twice.
    let e = err(
        "rate_limits:\n  a:\n    requests_per_hour: 1\n    burst_limit: 2\n    requests_per_hour: 3\n",
    );
    assert_eq!(e.line, Some(5), "{e}");
}

#[test]
fn the_limits_section_builds_a_limiter() {
    let text = "limits:\n  slack:   { requests_per_second: 1, burst_limit: 20 }\n  webhook: { requests_per_second: 100, burst_limit: 10 }\n  events:  { limit: 30, window: 1m, algorithm: fixed_window }\n";
    let c = Config::parse(text, "limits.yaml").expect("a limits-only file loads");
    let names: Vec<&str> = c.limits.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["events", "slack", "webhook"]);
    let limiter = c.limiter().expect("a limiter");
    assert_eq!(limiter.quota("slack").map(Quota::limit), Some(20));
    assert_eq!(
        limiter.quota("events").map(Quota::algorithm),
        Some(Algorithm::FixedWindow)
    );
    // No tiers: the inbound layer cannot be built from it, and says why.
    let e = c.layer().expect_err("no tiers");
    assert!(e.to_string().contains("no tiers"), "{e}");
    // The same file:line:field errors as the tiers.
    let e = err(&text.replace("burst_limit: 10", "burst_limit: 0"));
    assert_eq!(
        (e.line, e.field.as_deref()),
        (Some(3), Some("limits.webhook.burst_limit")),
        "{e}"
    );
    let e = err(&format!("{text}  slack: {{ requests_per_second: 2 }}\n"));
    assert_eq!(e.line, Some(5), "{e}");
    assert!(e.message.contains("`slack` is given twice"), "{e}");
    let e = err("limits:\n  \"{x}\": { requests_per_second: 1 }\n");
    assert!(e.message.contains("invalid limit name"), "{e}");
    // Neither tiers nor limits: nothing to enforce.
    let e = err("headers: both\n");
    assert!(e.message.contains("at least one tier"), "{e}");
    // A file with tiers has no limiter unless it has limits.
    let tiers = Config::parse(GOOD, "limits.yaml").expect("loads");
    assert!(tiers.limiter().is_err());
}

#[test]
fn errors_without_a_file_have_no_empty_prefix() {
    let e = ConfigError {
        file: PathBuf::new(),
        line: None,
        field: Some("store.redis".to_owned()),
        message: "invalid redis url `x`".to_owned(),
    };
    assert_eq!(e.to_string(), "store.redis: invalid redis url `x`");
    let e = ConfigError { field: None, ..e };
    assert_eq!(e.to_string(), "invalid redis url `x`");
}

#[test]
fn line_of_finds_keys_elements_and_the_deepest_part_there() {
    use super::position::{FieldPath, line_of};
    let a = || FieldPath::top("a");
    let text = "a:\n  b:\n    - x\n    - { c: 1 }\n  d: 2\n";
    assert_eq!(line_of(text, &a().key("b").index(1).key("c")), Some(4));
    assert_eq!(line_of(text, &a().key("b").index(0)), Some(3));
    assert_eq!(line_of(text, &a().key("d")), Some(5));
    // Past the end of the sequence, a key the mapping lacks, a scalar or a sequence where the
    // path goes on: the deepest part that is there.
    assert_eq!(line_of(text, &a().key("b").index(2)), Some(2));
    assert_eq!(line_of(text, &a().key("zz").key("y")), Some(1));
    assert_eq!(line_of(text, &a().key("d").key("e")), Some(5));
    assert_eq!(line_of(text, &a().key("b").key("c")), Some(2));
    assert_eq!(line_of(text, &a().key("b").index(1).index(0)), Some(4));
    // Not even the first step.
    assert_eq!(line_of(text, &FieldPath::top("zz")), None);
    assert_eq!(line_of("", &a()), None);
    assert_eq!(a().key("b").index(1).key("c").to_string(), "a.b[1].c");
}

#[test]
fn store_passwords_never_show_in_debug() {
    assert_eq!(
        super::store::redact_url("redis://:s3cret@10.0.0.5:6379/2"),
        "redis://:<redacted>@10.0.0.5:6379/2"
    );
    assert_eq!(
        super::store::redact_url("rediss://app:s3cret@host:6380"),
        "rediss://app:<redacted>@host:6380"
    );
    assert_eq!(
        super::store::redact_url("redis://host:6379"),
        "redis://host:6379"
    );
    // A user without a password has nothing to hide; an `@` in the path is no user part.
    assert_eq!(
        super::store::redact_url("redis://app@host"),
        "redis://app@host"
    );
    assert_eq!(
        super::store::redact_url("redis+unix:///run/a@b.sock"),
        "redis+unix:///run/a@b.sock"
    );

    let stores = [
        StoreConfig::Redis {
            url: "redis://:s3cret@h:6379".into(),
            prefix: "p".into(),
        },
        StoreConfig::Cluster {
            nodes: vec!["redis://u:s3cret@h:7000".into()],
            prefix: "p".into(),
        },
        StoreConfig::Sentinel {
            master: "m".into(),
            nodes: vec!["redis://:s3cret@h:26379".into()],
            prefix: "p".into(),
            username: Some("app".into()),
            password: Some("s3cret".into()),
            db: 0,
        },
    ];
    for store in &stores {
        let shown = format!("{store:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}

#[test]
fn sentinel_master_credentials_are_read_and_checked() {
    let limits = "limits:\n  events: { requests_per_hour: 1 }\n";
    let parse = |sentinel: &str| {
        Config::parse(
            &format!("{limits}store:\n  redis:\n    sentinel: {sentinel}\n"),
            "limits.yaml",
        )
    };
    let config =
        parse("{ master: m, nodes: [\"redis://a:26379\"], username: app, password: pw, db: 3 }")
            .unwrap();
    assert_eq!(
        config.store,
        StoreConfig::Sentinel {
            master: "m".into(),
            nodes: vec!["redis://a:26379".into()],
            prefix: "tollgate".into(),
            username: Some("app".into()),
            password: Some("pw".into()),
            db: 3,
        }
    );
    let error = |sentinel: &str| parse(sentinel).unwrap_err().to_string();
    let e = error("{ master: m, nodes: [\"redis://a:26379\"], username: app }");
    assert!(
        e.contains("limits.yaml:5: store.redis.sentinel.username") && e.contains("password"),
        "{e}"
    );
    let e = error("{ master: m, nodes: [\"redis://a:26379\"], password: \"\" }");
    assert!(e.contains("store.redis.sentinel.password"), "{e}");
    let e = error("{ master: m, nodes: [\"redis://a:26379\"], db: -1 }");
    assert!(
        e.contains("store.redis.sentinel.db") && e.contains("0 or more"),
        "{e}"
    );
}
