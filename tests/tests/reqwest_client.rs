//! End-to-end tests of the `reqwest-client` example's command line: the real binary against a
//! local upstream, its flags and defaults, the JSON summary as its last line of stdout, and the
//! one-line error (`reqwest-client: …`, naming the flag) for a bad flag or value. The outbound
//! layer's own behaviour (429s, pauses, a fleet on Redis) is tested in
//! `crates/tollgate/tests/outbound_fleet.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use tollgate_e2e::{Exited, reqwest_client_bin, serve_on_loopback};

/// The summary's fields, as the contract lists them.
const FIELDS: [&str; 6] = [
    "sent",
    "ok",
    "rate_limited_locally",
    "upstream_429",
    "errors",
    "elapsed_ms",
];

/// Starts an upstream on 127.0.0.1:0 answering `GET /ok` with 200; its base URL and how many
/// requests it answered.
async fn upstream() -> (String, Arc<AtomicU64>) {
    let hits = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route(
            "/ok",
            axum::routing::get(|State(hits): State<Arc<AtomicU64>>| async move {
                hits.fetch_add(1, Ordering::Relaxed);
                "ok"
            }),
        )
        .with_state(Arc::clone(&hits));
    let addr = serve_on_loopback(app).await;
    (format!("http://{addr}"), hits)
}

/// Runs `reqwest-client ARGS` to completion (at most 30 s).
async fn run(args: &[&str]) -> Exited {
    // Built before the clock starts (Cargo may wait for the build lock).
    let bin = tokio::task::block_in_place(reqwest_client_bin);
    let started = Instant::now();
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(bin)
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("reqwest-client {args:?} still running after 30 s"))
    .expect("reqwest-client ran");
    Exited {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

/// The summary of a successful run: its last line of stdout, a JSON object with exactly the
/// contract's fields, each a number.
fn summary(run: &Exited) -> serde_json::Value {
    assert!(
        run.status.success(),
        "exited with {}\nstdout:\n{}\nstderr:\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
    let last = run.stdout.lines().last().expect("a summary line");
    let json: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {last}"));
    let object = json.as_object().expect("a JSON object");
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut want = FIELDS.to_vec();
    want.sort_unstable();
    assert_eq!(keys, want, "{last}");
    assert!(object.values().all(serde_json::Value::is_u64), "{last}");
    json
}

fn count(summary: &serde_json::Value, field: &str) -> u64 {
    summary[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no `{field}` in {summary}"))
}

/// The one stderr line of a refused command line, after checking what every refusal shares: a
/// non-zero exit (not a signal), quickly, no summary, no panic.
fn error_line(run: &Exited) -> &str {
    assert!(run.stdout.is_empty(), "stdout: {}", run.stdout);
    run.refusal_line("reqwest-client")
}

/// Only `--url` given: 10 requests (the default), every one answered, and the summary last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_defaults_send_ten_requests_and_print_the_summary_last() {
    let (base, hits) = upstream().await;
    let url = format!("{base}/ok");
    let done = summary(&run(&["--url", &url]).await);
    for (field, want) in [
        ("sent", 10),
        ("ok", 10),
        ("rate_limited_locally", 0),
        ("upstream_429", 0),
        ("errors", 0),
    ] {
        assert_eq!(count(&done, field), want, "{field} in {done}");
    }
    assert_eq!(hits.load(Ordering::Relaxed), 10);
}

/// `--rate` in each unit, with `--burst 1`, spaces the requests: 3 at 2/s (and at 120/m) take
/// a second, 2 at 3600/h take a second. `--flag=value` works as `--flag value` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_and_burst_space_the_requests() {
    let (base, hits) = upstream().await;
    let url = format!("{base}/ok");
    let per_second = [
        "--url",
        &url,
        "--requests",
        "3",
        "--rate",
        "2/s",
        "--burst",
        "1",
    ];
    let url_flag = format!("--url={url}");
    let per_minute = [
        url_flag.as_str(),
        "--requests=3",
        "--rate=120/m",
        "--burst=1",
        "--concurrency=2",
    ];
    let per_hour = [
        "--url",
        &url,
        "--requests",
        "2",
        "--rate",
        "3600/h",
        "--burst",
        "1",
        "--concurrency",
        "1",
    ];
    let (a, b, c) = tokio::join!(run(&per_second), run(&per_minute), run(&per_hour));
    for (name, run, sent) in [("2/s", a, 3), ("120/m", b, 3), ("3600/h", c, 2)] {
        let done = summary(&run);
        assert_eq!(
            (count(&done, "sent"), count(&done, "ok")),
            (sent, sent),
            "{name}: {done}"
        );
        let ms = count(&done, "elapsed_ms");
        assert!(
            (950..5_000).contains(&ms),
            "{name}: {ms} ms for {sent} requests"
        );
    }
    assert_eq!(hits.load(Ordering::Relaxed), 8);
}

/// `--max-wait 0`: a call that would have to wait for a token is refused by the client's own
/// bucket and never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_wait_zero_refuses_locally_instead_of_waiting() {
    let (base, hits) = upstream().await;
    let url = format!("{base}/ok");
    let done = summary(
        &run(&[
            "--url",
            &url,
            "--requests",
            "3",
            "--rate",
            "1/m",
            "--burst",
            "1",
            "--concurrency",
            "1",
            "--max-wait",
            "0",
        ])
        .await,
    );
    assert_eq!(
        (
            count(&done, "sent"),
            count(&done, "ok"),
            count(&done, "rate_limited_locally")
        ),
        (3, 1, 2),
        "{done}"
    );
    assert!(count(&done, "elapsed_ms") < 5_000, "{done}");
    assert_eq!(hits.load(Ordering::Relaxed), 1);
}

/// Every bad flag or value is refused before anything is sent, in one line naming the flag and
/// (where there is one) the value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_and_values_are_one_line_naming_the_flag() {
    let (base, hits) = upstream().await;
    let url = format!("{base}/ok");
    let url = url.as_str();
    let cases: [(&[&str], &[&str]); 14] = [
        (&["--requests", "3"], &["--url"]),
        (&["--url", url, "--rate", "5/x"], &["--rate", "5/x"]),
        (&["--url", url, "--rate", "5"], &["--rate", "5"]),
        (&["--url", url, "--rate", "x/s"], &["--rate", "x/s"]),
        (&["--url", url, "--rate", "0/s"], &["--rate"]),
        (
            &["--url", url, "--requests", "many"],
            &["--requests", "many"],
        ),
        (&["--url", url, "--burst", "1.5"], &["--burst", "1.5"]),
        (&["--url", url, "--burst", "0"], &["--burst"]),
        (&["--url", url, "--max-wait=-1"], &["--max-wait", "-1"]),
        (
            &["--url", url, "--redis", "redis://127.0.0.1:1"],
            &["--bucket"],
        ),
        (&["--url", url, "--bucket", "shared"], &["--redis"]),
        (&["--url", url, "--nope"], &["--nope"]),
        (&["--url", "not a url"], &["--url", "not a url"]),
        (
            &["--url", url, "--concurrency", "0"],
            &["--concurrency", "0"],
        ),
    ];
    for (args, words) in cases {
        let done = run(args).await;
        let line = error_line(&done);
        for word in words {
            assert!(
                line.contains(word),
                "{args:?}: `{word}` missing from: {line}"
            );
        }
    }
    assert_eq!(
        hits.load(Ordering::Relaxed),
        0,
        "a refused command line sent requests"
    );
}

/// `--help` is no error: it lists every flag of the contract with a description (and the
/// defaults), on stdout, and exits 0 without sending anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_lists_every_flag_and_exits_0() {
    for flag in ["--help", "-h"] {
        let done = run(&[flag]).await;
        done.assert_help(
            flag,
            "reqwest-client --url URL [--requests N] [--rate N/s|N/m] [--burst B] \
                 [--concurrency C] [--max-wait SECS] [--redis URL --bucket NAME]",
            &[
                ("--url", &["URL"][..]),
                ("--requests", &["[default: 10]"]),
                ("--rate", &["N/s", "N/m", "[default: 10/s]"]),
                ("--burst", &["at once", "[default: the rate's N]"]),
                ("--concurrency", &["[default: 4]"]),
                ("--max-wait", &["seconds", "[default: 60]"]),
                ("--redis", &["Redis", "--bucket"]),
                ("--bucket", &["--redis"]),
            ],
        );
    }
}
