//! Every key of the load-aware limits and route shapes (`concurrency`, `lease_time`,
//! `shared_limit`, `limits_by_tier`, `charge`, `adaptive`) is checked, and a mistake names the
//! file, the line the parser gives the field, and the field.

use tollgate::config::{Config, ConfigError};

const TIERS: &str = "\
rate_limits:
  anonymous: { requests_per_minute: 10, burst_limit: 5 }
  basic:     { requests_per_minute: 100, burst_limit: 20 }
";

fn err(text: &str) -> ConfigError {
    match Config::parse(text, "limits.yaml") {
        Ok(_) => panic!("loaded, though it should not:\n{text}"),
        Err(e) => e,
    }
}

/// The 1-based line of the first line of `text` containing `marker`.
fn line_with(text: &str, marker: &str) -> usize {
    text.lines()
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no line with {marker:?}"))
        + 1
}

/// Asserts the error of `text` is at the line marked `# here`, names `field`, says `says`, and
/// reads `limits.yaml:LINE: FIELD: ...`.
fn assert_at(text: &str, field: &str, says: &str) {
    let e = err(text);
    let line = line_with(text, "# here");
    assert_eq!(
        (e.line, e.field.as_deref()),
        (Some(line), Some(field)),
        "{e}"
    );
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("limits.yaml:{line}: {field}: ")),
        "{shown}"
    );
    assert!(shown.contains(says), "{shown}");
}

#[test]
fn the_new_keys_load() {
    let text = format!(
        "{TIERS}  pro: {{ requests_per_minute: 500, burst_limit: 100, concurrency: 3, lease_time: 90s }}
routes:
  - {{ path: /a, shared_limit: {{ requests_per_second: 5 }} }}
  - {{ path: /b, limit: {{ requests_per_second: 5 }}, limits_by_tier: {{ pro: {{ requests_per_second: 9 }} }} }}
  - {{ method: POST, path: /login, charge: failures, limit: {{ requests_per_minute: 3 }} }}
adaptive: {{ target_latency: 200ms, priority: [anonymous, basic] }}
"
    );
    Config::parse(&text, "limits.yaml").expect("loads");
    // The example's own file shows every key, and loads.
    let example = include_str!("../../../examples/axum-tiers/limits.yaml");
    for key in [
        "concurrency:",
        "lease_time:",
        "shared_limit:",
        "limits_by_tier:",
        "charge: failures",
        "adaptive:",
    ] {
        assert!(example.contains(key), "limits.yaml shows {key}");
    }
    Config::parse(example, "limits.yaml").expect("the example's file loads");
}

#[test]
fn concurrency_mistakes() {
    assert_at(
        "rate_limits:\n  anonymous: { requests_per_minute: 10 }\n  basic:\n    requests_per_minute: 10\n    concurrency: 0 # here\n",
        "rate_limits.basic.concurrency",
        "at least 1",
    );
    assert_at(
        "rate_limits:\n  anonymous: { requests_per_minute: 10 }\n  basic:\n    requests_per_minute: 10\n    lease_time: 30s # here\n",
        "rate_limits.basic.lease_time",
        "needs a `concurrency`",
    );
    assert_at(
        "rate_limits:\n  anonymous: { requests_per_minute: 10 }\n  basic:\n    requests_per_minute: 10\n    concurrency: 2\n    lease_time: soon # here\n",
        "rate_limits.basic.lease_time",
        "soon",
    );
    assert_at(
        &format!(
            "{TIERS}routes:\n  - path: /x\n    limit:\n      requests_per_second: 5\n      concurrency: 2 # here\n"
        ),
        "routes[0].limit.concurrency",
        "tiers (rate_limits) only",
    );
    assert_at(
        &format!("{TIERS}global:\n  requests_per_second: 5\n  concurrency: 2 # here\n"),
        "global.concurrency",
        "tiers (rate_limits) only",
    );
}

#[test]
fn route_shape_mistakes() {
    assert_at(
        &format!("{TIERS}routes:\n  - path: /x\n    shared_limit: # here\n      burst_limit: 5\n"),
        "routes[0].shared_limit",
        "missing rate",
    );
    assert_at(
        &format!(
            "{TIERS}routes:\n  - path: /x\n    cost: 9\n    shared_limit: {{ requests_per_second: 5 }} # here\n"
        ),
        "routes[0].shared_limit",
        "cost 9",
    );
    assert_at(
        &format!(
            "{TIERS}routes:\n  - path: /x\n    limits_by_tier:\n      gold: {{ requests_per_second: 5 }} # here\n"
        ),
        "routes[0].limits_by_tier.gold",
        "unknown tier `gold` (tiers: anonymous, basic)",
    );
    assert_at(
        &format!(
            "{TIERS}routes:\n  - path: /x\n    limits_by_tier:\n      basic: {{ requests_per_second: 5 }}\n      basic: {{ requests_per_second: 6 }} # here\n"
        ),
        "routes[0].limits_by_tier",
        "given twice",
    );
    assert_at(
        &format!(
            "{TIERS}routes:\n  - path: /x\n    limit: {{ requests_per_second: 5 }}\n    charge: sometimes # here\n"
        ),
        "routes[0].charge",
        "expected always or failures",
    );
    assert_at(
        &format!("{TIERS}routes:\n  - path: /x\n    charge: failures # here\n"),
        "routes[0].charge",
        "needs a route limit",
    );
}

#[test]
fn adaptive_mistakes() {
    assert_at(
        &format!("{TIERS}adaptive: # here\n  priority: [basic]\n"),
        "adaptive",
        "load signal",
    );
    assert_at(
        &format!("{TIERS}adaptive:\n  target_latency: fast # here\n  priority: [basic]\n"),
        "adaptive.target_latency",
        "fast",
    );
    assert_at(
        &format!(
            "{TIERS}adaptive:\n  target_latency: 100ms\n  decrease: 1.5 # here\n  priority: [basic]\n"
        ),
        "adaptive.decrease",
        "1.5",
    );
    assert_at(
        &format!(
            "{TIERS}adaptive:\n  max_in_flight: 10\n  min_factor: 0 # here\n  priority: [basic]\n"
        ),
        "adaptive.min_factor",
        "min_factor",
    );
    assert_at(
        &format!(
            "{TIERS}adaptive:\n  max_in_flight: 10\n  priority:\n    - basic\n    - gold # here\n"
        ),
        "adaptive.priority[1]",
        "unknown tier `gold`",
    );
    assert_at(
        &format!("{TIERS}adaptive:\n  max_in_flight: 10\n  priority: [] # here\n"),
        "adaptive.priority",
        "name the tiers",
    );
    let e = err(&format!(
        "{TIERS}adaptive:\n  max_in_flight: 10\n  speed: 3\n  priority: [basic]\n"
    ));
    assert_eq!(e.line, Some(6), "{e}");
    assert!(e.to_string().contains("speed"), "{e}");
    let e = err(&format!(
        "{TIERS}adaptive:\n  max_in_flight: 10\n  max_in_flight: 20\n  priority: [basic]\n"
    ));
    assert_eq!(e.line, Some(6), "{e}");
    assert!(e.to_string().contains("given twice"), "{e}");
}
