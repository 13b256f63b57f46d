//! `axum-tiers` refuses to start on a bad configuration, a bad flag or a taken port: it exits
//! non-zero within a few seconds with exactly one line on stderr, `axum-tiers: …`, naming the
//! problem (the file and line for configuration errors, the flag for a bad flag or value), and
//! never panics. `--help` is no error: it lists every flag and exits 0.

use tollgate_e2e::{Exited, Server, TempDir, run_to_exit};

/// A valid configuration; the cases below break one line of it. Line numbers:
/// 1 `rate_limits:`, 2 anonymous, 3 basic, 4 `routes:`, 5 the search route, 6 `api_keys:`,
/// 7 key-alice.
const GOOD: &str = "rate_limits:
  anonymous: { requests_per_minute: 10,  burst_limit: 5 }
  basic:     { requests_per_minute: 100, burst_limit: 20 }
routes:
  - { path: /api/search, limit: { requests_per_minute: 30, burst_limit: 10 } }
api_keys:
  key-alice: { user: alice, tier: basic }
";

/// The one stderr line of a failed start, after checking everything common to all cases.
fn single_error_line(run: &Exited) -> &str {
    assert!(!run.stdout.contains("listening on"), "{}", run.stdout);
    run.refusal_line("axum-tiers")
}

/// Starts the server on `GOOD` with `from` replaced by `to` and checks the error line names
/// `limits.yaml:LINE` and contains every one of `words`.
fn assert_config_error(from: &str, to: &str, line: usize, words: &[&str]) {
    assert!(GOOD.contains(from), "{from}");
    let dir = TempDir::new();
    let path = dir.write("limits.yaml", &GOOD.replacen(from, to, 1));
    let path = path.to_str().expect("UTF-8 temp path");
    let run = run_to_exit(&["--config", path, "--addr", "127.0.0.1:0"]);
    let error = single_error_line(&run);
    assert!(
        error.starts_with(&format!("axum-tiers: {path}:{line}: ")),
        "expected {path}:{line}: {error}"
    );
    for word in words {
        assert!(error.contains(word), "`{word}` missing from: {error}");
    }
}

#[test]
fn the_good_config_is_good() {
    // Guard for the cases below: only the broken line makes them fail.
    let server = Server::start(GOOD);
    assert!(server.url("/").starts_with("http://127.0.0.1:"));
    assert_eq!(server.stderr().matches("axum-tiers: ").count(), 0);
}

#[test]
fn yaml_syntax_error() {
    assert_config_error(
        "burst_limit: 20 }",
        "burst_limit: 20 ]",
        3,
        &["did not find expected"],
    );
}

#[test]
fn unknown_field() {
    assert_config_error(
        "burst_limit: 20 }",
        "burst_limit: 20, bursty: 3 }",
        3,
        &["rate_limits.basic", "unknown field `bursty`"],
    );
}

#[test]
fn unknown_top_level_field() {
    assert_config_error(
        "tier: basic }\n",
        "tier: basic }\nsurprise: 1\n",
        8,
        &["unknown field `surprise`"],
    );
}

#[test]
fn zero_rate() {
    assert_config_error(
        "requests_per_minute: 100,",
        "requests_per_minute: 0,",
        3,
        &["rate_limits.basic.requests_per_minute", "0"],
    );
}

#[test]
fn negative_rate() {
    assert_config_error(
        "requests_per_minute: 100,",
        "requests_per_minute: -100,",
        3,
        &["rate_limits.basic.requests_per_minute", "-100"],
    );
}

#[test]
fn zero_burst_limit() {
    assert_config_error(
        "burst_limit: 20 }",
        "burst_limit: 0 }",
        3,
        &["rate_limits.basic.burst_limit", "0"],
    );
}

#[test]
fn zero_burst_limit_in_a_route() {
    assert_config_error("burst_limit: 10 }", "burst_limit: 0 }", 5, &["burst_limit"]);
}

#[test]
fn unknown_tier_in_api_keys() {
    assert_config_error(
        "tier: basic }",
        "tier: platinum }",
        7,
        &["api_keys.key-alice.tier", "platinum"],
    );
}

/// Defect 7 of issue 12: configurations that used to load and then misbehave.
#[test]
fn a_tier_given_twice() {
    // The second `basic` used to replace the first silently (10/min became 99999/min).
    assert_config_error(
        "  basic:     { requests_per_minute: 100, burst_limit: 20 }\n",
        "  basic:     { requests_per_minute: 100, burst_limit: 20 }\n  basic:     { requests_per_minute: 99999 }\n",
        4,
        &["rate_limits", "`basic` is given twice"],
    );
}

#[test]
fn an_api_key_given_twice() {
    assert_config_error(
        "  key-alice: { user: alice, tier: basic }\n",
        "  key-alice: { user: alice, tier: basic }\n  key-alice: { user: mallory, tier: anonymous }\n",
        8,
        &["api_keys", "`key-alice` is given twice"],
    );
}

#[test]
fn an_empty_api_key() {
    assert_config_error(
        "  key-alice: { user: alice, tier: basic }",
        "  \"\": { user: alice, tier: basic }",
        6,
        &["api_keys", "empty"],
    );
}

#[test]
fn a_route_cost_no_tier_can_hold() {
    // It used to load, then answer 403 to every request of the route.
    assert_config_error(
        "  - { path: /api/search, limit: { requests_per_minute: 30, burst_limit: 10 } }",
        "  - { path: /api, cost: 50 }\n  - { path: /api/search, cost: 2 }",
        5,
        &["routes[0].cost", "more than any tier can ever allow", "20"],
    );
}

#[test]
fn an_absurd_store_timeout() {
    assert_config_error(
        "rate_limits:",
        "store: { redis: { url: \"redis://127.0.0.1:1\", timeout_ms: 18446744073709551615 } }\nrate_limits:",
        1,
        &["store.redis.timeout_ms", "too long", "60000"],
    );
}

#[test]
fn a_store_that_is_neither_memory_nor_redis() {
    for (store, words) in [
        ("store: mongo", &["unknown store `mongo`", "memory"][..]),
        (
            "store: { memcached: { url: x } }",
            &["unknown store `memcached`", "redis"],
        ),
        (
            "store: { redis: { url: \"redis://h\", tls: true } }",
            &["store.redis", "unknown field `tls`"],
        ),
    ] {
        let dir = TempDir::new();
        let path = dir.write("limits.yaml", &format!("{store}\n{GOOD}"));
        let path = path.to_str().expect("UTF-8 temp path");
        let run = run_to_exit(&["--config", path, "--addr", "127.0.0.1:0"]);
        let error = single_error_line(&run);
        assert!(
            error.starts_with(&format!("axum-tiers: {path}:1: ")),
            "{error}"
        );
        assert!(!error.contains("untagged"), "{error}");
        for word in words {
            assert!(error.contains(word), "`{word}` missing from: {error}");
        }
    }
}

#[test]
fn bad_duration() {
    assert_config_error(
        "requests_per_minute: 100, burst_limit: 20",
        "limit: 10, window: 10 parsecs",
        3,
        &["rate_limits.basic.window", "10 parsecs"],
    );
}

#[test]
fn missing_file() {
    let dir = TempDir::new();
    let path = dir.path().join("no-such-limits.yaml");
    let path = path.to_str().expect("UTF-8 temp path");
    let run = run_to_exit(&["--config", path, "--addr", "127.0.0.1:0"]);
    let error = single_error_line(&run);
    assert!(
        error.starts_with(&format!("axum-tiers: {path}: ")),
        "{error}"
    );
    assert!(error.contains("No such file"), "{error}");
}

#[test]
fn bad_flag() {
    let run = run_to_exit(&["--port", "8080"]);
    let error = single_error_line(&run);
    assert!(error.contains("unexpected argument '--port'"), "{error}");
    assert!(error.ends_with("(see axum-tiers --help)"), "{error}");

    let run = run_to_exit(&["--addr"]);
    let error = single_error_line(&run);
    assert!(error.contains("a value is required for '--addr"), "{error}");
}

#[test]
fn help_lists_every_flag_and_exits_0() {
    for flag in ["--help", "-h"] {
        let run = run_to_exit(&[flag]);
        run.assert_help(
            flag,
            "axum-tiers [--config PATH] [--addr HOST:PORT] [--redis URL] \
                 [--header-read-timeout SECS]",
            &[
                (
                    "--config",
                    &["YAML", "[default: examples/axum-tiers/limits.yaml]"][..],
                ),
                ("--addr", &["port 0", "[default: 127.0.0.1:3000]"]),
                ("--redis", &["Redis"]),
                ("--header-read-timeout", &["[default: 10]"]),
            ],
        );
    }
}

#[test]
fn bad_header_read_timeout() {
    for bad in ["soon", "0", "-1", "NaN", "1e9"] {
        let flag = format!("--header-read-timeout={bad}");
        let run = run_to_exit(&["--addr", "127.0.0.1:0", &flag]);
        let error = single_error_line(&run);
        assert!(error.contains("--header-read-timeout"), "{error}");
        assert!(error.contains(bad), "`{bad}` missing from: {error}");
    }
}

#[test]
fn bad_redis_url() {
    let dir = TempDir::new();
    let path = dir.write("limits.yaml", GOOD);
    let path = path.to_str().expect("UTF-8");
    let run = run_to_exit(&[
        "--config",
        path,
        "--addr",
        "127.0.0.1:0",
        "--redis",
        "notaurl",
    ]);
    let error = single_error_line(&run);
    // The flag's fault, not the file's: checked when the flags are parsed.
    assert!(error.starts_with("axum-tiers: "), "{error}");
    assert!(error.contains("--redis"), "{error}");
    assert!(error.contains("invalid redis url `notaurl`"), "{error}");
    assert!(!error.contains("limits.yaml"), "{error}");
}

#[test]
fn bad_address() {
    let dir = TempDir::new();
    let path = dir.write("limits.yaml", GOOD);
    let run = run_to_exit(&[
        "--config",
        path.to_str().expect("UTF-8"),
        "--addr",
        "nowhere",
    ]);
    let error = single_error_line(&run);
    assert!(error.contains("nowhere"), "{error}");
    assert!(error.contains("'--addr <HOST:PORT>'"), "{error}");
    assert!(error.contains("expected HOST:PORT"), "{error}");
}

#[test]
fn taken_port() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local_addr").to_string();
    let dir = TempDir::new();
    let path = dir.write("limits.yaml", GOOD);
    let run = run_to_exit(&["--config", path.to_str().expect("UTF-8"), "--addr", &addr]);
    let error = single_error_line(&run);
    assert!(
        error.starts_with(&format!("axum-tiers: cannot listen on {addr}: ")),
        "{error}"
    );
    assert!(error.contains("in use"), "{error}");
    drop(listener);
}
