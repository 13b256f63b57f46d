//! tollgate's benchmark runner: tollgate measured side by side with its peers, in the same run, on
//! the same machine, under the same load.
//!
//! ```text
//! cargo run --release -p tollgate-bench -- <memory|redis|http|flood|all> [--quick] [--chart]
//! ```
//!
//! * `memory`: a keyed token-bucket decision in `MemoryStore` against governor's keyed (DashMap)
//!   limiter, 1 and 2 threads, one hot key and 100k keys; ns per decision.
//! * `redis`: decisions per second and p50 / p99 latency on a `redis-server` this runner starts, at
//!   1, 16 and 128 concurrent tasks, 1 and 3 limits per decision; against `redis-benchmark` running
//!   tollgate's own script with `EVALSHA` (the ceiling) and against the naive approach of a
//!   `GET` and a `SET` per limit (on one shared connection, and with a connection per task).
//! * `http`: requests per second and p99 of an axum hello-world route: bare, behind tollgate (in
//!   memory and on Redis) and behind `tower_governor`, loaded by wrk when it is installed (on its
//!   own CPU), else by a built-in hyper client; the server's CPU time per request; with valgrind
//!   installed, its instructions per request under callgrind.
//! * `flood`: the share of store calls the denied-until cache saves while one caller floods past
//!   its limit.
//!
//! Each suite prints a Markdown table (`case | tollgate | peer | peer value | ratio`, ratio higher
//! = better for tollgate) and writes the same rows to `target/bench/<suite>.json`. After `all`, or
//! with `--chart` (alone it only redraws), the ratios of every suite file present are drawn as a bar
//! chart in `target/bench/ratios.svg` and `docs/bench-ratios.svg`. `--quick` shortens every
//! measurement so `all` takes about a minute.

mod callgrind;
mod flood;
mod http_suite;
mod load;
mod memory;
mod redis_suite;
mod report;
mod wrk;

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use report::Row;

/// Every error the runner reports and stops on.
pub(crate) type BoxError = Box<dyn Error + Send + Sync>;

/// The suites, in the order `all` runs them.
const SUITES: [&str; 4] = ["memory", "redis", "http", "flood"];

/// What the command line asked for.
#[derive(Debug, PartialEq, Eq)]
struct Args {
    suites: Vec<&'static str>,
    quick: bool,
    chart: bool,
}

const USAGE: &str = "usage: cargo run --release -p tollgate-bench -- <memory|redis|http|flood|all> [--quick] [--chart]";

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut suites = Vec::new();
    let mut quick = false;
    let mut chart = false;
    let mut all = false;
    for arg in args {
        match arg.as_str() {
            "--quick" => quick = true,
            "--chart" => chart = true,
            "all" => all = true,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => match SUITES.iter().find(|s| **s == other) {
                Some(suite) => suites.push(*suite),
                None => return Err(format!("unknown argument `{other}`\n{USAGE}")),
            },
        }
    }
    if all {
        suites = SUITES.to_vec();
    }
    if suites.is_empty() && !chart {
        return Err(USAGE.to_owned());
    }
    Ok(Args {
        suites,
        quick,
        chart: chart || all,
    })
}

/// The workspace root (this crate lives in `crates/tollgate-bench`).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// `target/bench` of the workspace, or under `CARGO_TARGET_DIR` when set.
fn bench_dir() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    };
    target.join("bench")
}

fn run_suite(suite: &str, quick: bool) -> Result<Vec<Row>, BoxError> {
    match suite {
        "memory" => memory::run(quick),
        "redis" => redis_suite::run(quick),
        "http" => http_suite::run(quick),
        "flood" => flood::run(quick),
        other => Err(format!("unknown suite `{other}`").into()),
    }
}

/// Draws the ratios of every suite file present in `dir`.
fn write_chart(dir: &Path, to_docs: bool) -> Result<(), BoxError> {
    let mut suites = Vec::new();
    for suite in SUITES {
        let path = dir.join(format!("{suite}.json"));
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let rows = report::from_json(&serde_json::from_str(&text)?);
        if !rows.is_empty() {
            suites.push((suite.to_owned(), rows));
        }
    }
    if suites.is_empty() {
        return Err(format!("no suite results in {} to chart", dir.display()).into());
    }
    let svg = report::svg_chart(&suites, "tollgate vs peers (tollgate-bench)");
    let path = dir.join("ratios.svg");
    std::fs::write(&path, &svg)?;
    eprintln!("chart: {}", path.display());
    if to_docs {
        let docs = workspace_root().join("docs");
        std::fs::create_dir_all(&docs)?;
        let path = docs.join("bench-ratios.svg");
        std::fs::write(&path, &svg)?;
        eprintln!("chart: {}", path.display());
    }
    Ok(())
}

fn run(args: &Args) -> Result<(), BoxError> {
    let dir = bench_dir();
    std::fs::create_dir_all(&dir)?;
    for suite in &args.suites {
        eprintln!(
            "running suite `{suite}`{}",
            if args.quick { " (quick)" } else { "" }
        );
        let started = std::time::Instant::now();
        let rows = run_suite(suite, args.quick)?;
        eprintln!(
            "suite `{suite}` took {:.1} s",
            started.elapsed().as_secs_f64()
        );
        println!("\n## {suite}\n\n{}", report::markdown(&rows));
        let path = dir.join(format!("{suite}.json"));
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&report::to_json(&rows))? + "\n",
        )?;
        eprintln!("wrote {}", path.display());
    }
    if args.chart {
        write_chart(&dir, true)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    // The http suite's server children (see `http_suite::SERVE_FLAG`).
    if raw.first().map(String::as_str) == Some(http_suite::SERVE_FLAG) {
        return match http_suite::serve_child(&raw[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("server error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let args = match parse_args(raw) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, String> {
        parse_args(list.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn all_runs_every_suite_and_charts() {
        let parsed = args(&["all", "--quick"]).expect("valid");
        assert_eq!(parsed.suites, SUITES.to_vec());
        assert!(parsed.quick && parsed.chart);
    }

    #[test]
    fn one_suite_and_bad_arguments() {
        assert_eq!(
            args(&["memory"]),
            Ok(Args {
                suites: vec!["memory"],
                quick: false,
                chart: false
            })
        );
        assert!(args(&[]).is_err());
        assert!(args(&["disk"]).is_err());
    }

    #[test]
    fn results_go_to_the_workspace_target() {
        // Without CARGO_TARGET_DIR the files land in <workspace>/target/bench.
        if std::env::var_os("CARGO_TARGET_DIR").is_none() {
            assert!(bench_dir().ends_with("target/bench"));
        }
        assert!(workspace_root().join("Cargo.toml").is_file());
    }
}
