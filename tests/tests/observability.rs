//! The observability assets against what tollgate emits:
//!
//! - the example server's `/metrics`, after allowed, limited and refused requests, passes
//!   `promtool check metrics` (every metric has its help text) and exports the store latency as
//!   a histogram with `tollgate::metrics::STORE_LATENCY_BUCKETS`;
//! - the Grafana dashboard (`deploy/grafana/tollgate.json`) and the alerting rules
//!   (`deploy/prometheus/alerts.yaml`, and the series of their tests) name only metrics in
//!   `tollgate::metrics::ALL`, with `_bucket` / `_sum` / `_count` only on histograms, and the
//!   dashboard's queries parse as PromQL;
//! - every `"rate_limiter_…"` name in the workspace's sources (tollgate-redis keeps its own
//!   literal) is in `ALL`, so [`tollgate::metrics::describe`] describes it.
//!
//! `promtool` must be on `PATH` (Debian's `prometheus` package; `scripts/test` installs it): a
//! missing one fails the tests that need it, with that hint.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;
use tollgate::metrics::{ALL, MetricKind, STORE_LATENCY_BUCKETS, STORE_LATENCY_SECONDS};
use tollgate_e2e::{Server, TempDir, client, metric, send, workspace_root};

/// Runs `promtool ARGS`, feeding `stdin`; panics when promtool is not installed.
fn promtool(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): it comes with Debian's `prometheus` package, which \
                 scripts/test installs (apt-get install --no-install-recommends prometheus)"
            )
        });
    let mut pipe = child.stdin.take().expect("piped");
    pipe.write_all(stdin.as_bytes())
        .expect("cannot write to promtool");
    drop(pipe);
    child.wait_with_output().expect("cannot wait for promtool")
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const LIMITS: &str = r#"store: memory
headers: both
rate_limits:
  anonymous: { requests_per_hour: 10,  burst_limit: 2 }
  basic:     { requests_per_hour: 100, burst_limit: 20 }
api_keys:
  key-alice: { user: alice, tier: basic }
"#;

#[tokio::test]
async fn metrics_endpoint_passes_promtool_check_metrics() {
    let server = Server::start(LIMITS);
    let c = client();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(send(c.get(server.url("/api/hello"))).await.status);
    }
    let alice = c
        .get(server.url("/api/hello"))
        .header("x-api-key", "key-alice");
    statuses.push(send(alice).await.status);
    let stranger = c
        .get(server.url("/api/hello"))
        .header("x-api-key", "no-such-key");
    statuses.push(send(stranger).await.status);
    assert_eq!(statuses, [200, 200, 429, 200, 401]);

    let reply = send(c.get(server.url("/metrics"))).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let text = reply.body;

    let checked = promtool(&["check", "metrics"], &text);
    let problems = output_text(&checked);
    assert!(
        checked.status.success() && problems.trim().is_empty(),
        "promtool check metrics ({}):\n{problems}\n/metrics:\n{text}",
        checked.status
    );

    // The metrics this traffic recorded, with their type and the help text describe() gave.
    for name in [
        "rate_limiter_requests_total",
        "rate_limiter_breaches_total",
        "rate_limiter_tokens_consumed_total",
        STORE_LATENCY_SECONDS,
    ] {
        let info = ALL.iter().find(|m| m.name == name).expect("in ALL");
        let kind = match info.kind {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            _ => "histogram",
        };
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "no `# TYPE {name} {kind}` in:\n{text}"
        );
        assert!(
            text.contains(&format!("# HELP {name} {}\n", info.help)),
            "no help text for {name} in:\n{text}"
        );
    }
    let breaches = metric(
        &text,
        "rate_limiter_breaches_total",
        &[("tier", "anonymous")],
    );
    assert_eq!(breaches, Some(1.0), "{text}");

    // The store latency is a histogram with tollgate's buckets, not a summary.
    let bucket = format!("{STORE_LATENCY_SECONDS}_bucket");
    let bounds: Vec<f64> = text
        .lines()
        .filter(|line| line.starts_with(&format!("{bucket}{{")))
        .filter_map(|line| line.split("le=\"").nth(1)?.split('"').next())
        .filter(|le| *le != "+Inf")
        .map(|le| le.parse().unwrap_or_else(|_| panic!("bad le {le:?}")))
        .collect();
    assert_eq!(bounds, STORE_LATENCY_BUCKETS, "{text}");
    let count = metric(
        &text,
        &format!("{STORE_LATENCY_SECONDS}_count"),
        &[("store", "memory")],
    );
    let infinite = metric(&text, &bucket, &[("store", "memory"), ("le", "+Inf")]);
    assert!(count.is_some_and(|n| n >= 1.0), "{text}");
    assert_eq!(infinite, count, "{text}");
    assert!(
        !text.contains(&format!(
            "{STORE_LATENCY_SECONDS}{{store=\"memory\",quantile="
        )),
        "store latency still exported as a summary:\n{text}"
    );
}

fn read(path: &str) -> String {
    let full = workspace_root().join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// Every `rate_limiter_*` identifier in a PromQL expression (or any text).
fn metric_names(text: &str) -> Vec<&str> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = Vec::new();
    for (at, _) in text.match_indices("rate_limiter_") {
        if text[..at].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let rest = &text[at..];
        let end = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
        names.push(&rest[..end]);
    }
    names
}

/// Panics unless `name` is a metric tollgate emits, or a `_bucket` / `_sum` / `_count` series of
/// one of its histograms; returns the metric's name.
fn emitted(name: &str, context: &str) -> &'static str {
    if let Some(m) = ALL.iter().find(|m| m.name == name) {
        return m.name;
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && let Some(m) = ALL.iter().find(|m| m.name == base)
        {
            assert_eq!(
                m.kind,
                MetricKind::Histogram,
                "{name} in {context}: {base} is not a histogram"
            );
            return m.name;
        }
    }
    panic!("{name} in {context} is not a metric tollgate emits (tollgate::metrics::ALL)");
}

/// The strings under the keys `keys` anywhere in `json`.
fn strings_under<'a>(json: &'a Json, keys: &[&str], out: &mut Vec<&'a str>) {
    match json {
        Json::Object(map) => {
            for (key, value) in map {
                if let (true, Some(s)) = (keys.contains(&key.as_str()), value.as_str()) {
                    out.push(s);
                }
                strings_under(value, keys, out);
            }
        }
        Json::Array(items) => items.iter().for_each(|v| strings_under(v, keys, out)),
        _ => {}
    }
}

fn dashboard() -> Json {
    serde_json::from_str(&read("deploy/grafana/tollgate.json"))
        .unwrap_or_else(|e| panic!("deploy/grafana/tollgate.json is not JSON: {e}"))
}

fn yaml(path: &str) -> Yaml {
    serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn seq<'a>(value: &'a Yaml, key: &str, context: &str) -> &'a [Yaml] {
    value[key]
        .as_sequence()
        .unwrap_or_else(|| panic!("{context}: no `{key}` list"))
}

fn string<'a>(value: &'a Yaml, key: &str, context: &str) -> &'a str {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("{context}: no `{key}` string"))
}

/// The query expressions of the dashboard's panels.
fn dashboard_queries(dash: &Json) -> Vec<&str> {
    let panels = dash["panels"].as_array().expect("panels");
    let mut exprs = Vec::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap_or("?");
        assert_eq!(
            panel["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {title:?}: the data source is not the DS_PROMETHEUS variable"
        );
        let before = exprs.len();
        strings_under(&panel["targets"], &["expr"], &mut exprs);
        assert!(exprs.len() > before, "panel {title:?} has no query");
    }
    exprs
}

#[test]
fn dashboard_names_only_emitted_metrics() {
    let dash = dashboard();
    let vars = dash["templating"]["list"].as_array().expect("templating");
    assert!(
        vars.iter()
            .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource"),
        "no DS_PROMETHEUS data source variable"
    );
    let exprs = dashboard_queries(&dash);
    let mut used = BTreeSet::new();
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "query names no tollgate metric: {expr}");
        used.extend(names.into_iter().map(|n| emitted(n, "the dashboard")));
        if expr.contains("histogram_quantile") {
            assert!(
                expr.contains("_bucket[") && expr.contains("by (le"),
                "a quantile over something else than the summed buckets: {expr}"
            );
        }
    }
    // The variables' queries (label_values(...)) too.
    let mut definitions = Vec::new();
    strings_under(
        &dash["templating"],
        &["definition", "query"],
        &mut definitions,
    );
    for def in definitions {
        for name in metric_names(def) {
            used.insert(emitted(name, "the dashboard's variables"));
        }
    }
    for wanted in [
        "rate_limiter_requests_total",
        "rate_limiter_breaches_total",
        "rate_limiter_store_latency_seconds",
        "rate_limiter_circuit_open",
        "rate_limiter_wait_seconds",
        "rate_limiter_upstream_limited_total",
    ] {
        assert!(used.contains(wanted), "the dashboard shows no {wanted}");
    }
}

#[test]
fn alerts_name_only_emitted_metrics_and_each_is_tested_both_ways() {
    let rules = yaml("deploy/prometheus/alerts.yaml");
    let mut used = BTreeSet::new();
    let mut alerts = BTreeSet::new();
    for group in seq(&rules, "groups", "alerts.yaml") {
        for rule in seq(group, "rules", "alerts.yaml group") {
            let alert = string(rule, "alert", "alerts.yaml rule");
            let expr = string(rule, "expr", alert);
            let names = metric_names(expr);
            assert!(
                !names.is_empty(),
                "{alert} names no tollgate metric: {expr}"
            );
            used.extend(names.into_iter().map(|n| emitted(n, alert)));
            assert!(alerts.insert(alert), "{alert} twice");
        }
    }
    for wanted in [
        "rate_limiter_store_errors_total",
        "rate_limiter_circuit_open",
        "rate_limiter_breaches_total",
        "rate_limiter_upstream_limited_total",
    ] {
        assert!(used.contains(wanted), "no alert on {wanted}");
    }

    let tests = yaml("deploy/prometheus/alerts_test.yaml");
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for case in seq(&tests, "tests", "alerts_test.yaml") {
        for series in seq(case, "input_series", "alerts_test.yaml test") {
            let series = string(series, "series", "input_series");
            for name in metric_names(series) {
                emitted(name, "alerts_test.yaml");
            }
        }
        for check in seq(case, "alert_rule_test", "alerts_test.yaml test") {
            let alert = string(check, "alertname", "alert_rule_test");
            assert!(
                alerts.contains(alert),
                "alerts_test.yaml tests unknown {alert}"
            );
            let expected = seq(check, "exp_alerts", alert);
            if expected.is_empty() {
                &mut quiet
            } else {
                &mut firing
            }
            .insert(alert);
        }
    }
    assert_eq!(firing, alerts, "alerts never tested firing");
    assert_eq!(quiet, alerts, "alerts never tested not firing");
}

#[test]
fn dashboard_queries_parse_as_promql() {
    let dash = dashboard();
    let rules: Vec<Json> = dashboard_queries(&dash)
        .iter()
        .enumerate()
        .map(|(i, expr)| {
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$tier", ".*");
            assert!(!expr.contains('$'), "a variable left in {expr}");
            serde_json::json!({ "record": format!("dashboard:query_{i}"), "expr": expr })
        })
        .collect();
    let file = serde_json::json!({ "groups": [{ "name": "dashboard", "rules": rules }] });
    let dir = TempDir::new();
    let text = serde_yaml_ng::to_string(&file).expect("YAML");
    let path = dir.write("dashboard-rules.yaml", &text);
    let out = promtool(&["check", "rules", path.to_str().expect("UTF-8")], "");
    assert!(
        out.status.success(),
        "the dashboard's queries do not parse:\n{}\n{text}",
        output_text(&out)
    );
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_metric_name_in_the_sources_is_described() {
    let root = workspace_root();
    let mut files = Vec::new();
    for top in ["crates", "examples"] {
        for package in std::fs::read_dir(root.join(top)).expect("workspace folder") {
            let src = package.expect("entry").path().join("src");
            if src.is_dir() {
                rust_files(&src, &mut files);
            }
        }
    }
    let mut literals = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).expect("source file");
        for (at, _) in text.match_indices("\"rate_limiter_") {
            let name: String = text[at + 1..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name == "rate_limiter_" {
                continue; // the prefix itself (a test's filter), not a name
            }
            let place = file
                .strip_prefix(&root)
                .unwrap_or(file)
                .display()
                .to_string();
            assert!(
                ALL.iter().any(|m| m.name == name),
                "{place}: metric {name} is not in tollgate::metrics::ALL (so it has no help text)"
            );
            literals += 1;
        }
    }
    // metrics.rs alone holds one per metric: fewer means the scan read nothing.
    assert!(literals >= ALL.len(), "only {literals} metric names found");
}
