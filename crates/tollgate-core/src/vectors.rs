//! The shared test vectors: sequences of requests with the decisions every store must give.
//!
//! Enabled by the `vectors` feature. The file `tests/vectors.txt` of this crate is produced from
//! the Rust model by `cargo test -p tollgate-core --test vectors` with
//! `TOLLGATE_REGENERATE_VECTORS=1`; its textbook cases were checked by hand. This crate replays it
//! against the algorithms and the [`MemoryStore`](crate::MemoryStore); `tollgate-redis` replays the
//! same file against the Lua scripts on a real Redis.
//!
//! # Format
//!
//! Plain text, one item per line, `#` starts a comment, a blank line ends a vector:
//!
//! ```text
//! vector token_bucket_textbook
//! quota token_bucket limit=3 interval=1000000
//! # time_µs cost => outcome limit remaining reset_after_µs retry_after_µs delay_µs
//! step 0 1 => allow 3 2 1000000 0 0
//! ```
//!
//! Each vector starts from a key never seen; `time` is the store's clock in microseconds.
//!
//! ```
//! let vectors = tollgate_core::vectors::load()?;
//! assert!(vectors.iter().any(|v| v.name == "token_bucket_textbook"));
//! # Ok::<(), tollgate_core::vectors::ParseError>(())
//! ```

use std::fmt::Write as _;
use std::time::Duration;

use crate::algorithm::{self, State};
use crate::{Algorithm, Decision, Outcome, Quota, Timestamp};

/// The checked-in vector file.
pub const VECTORS: &str = include_str!("../tests/vectors.txt");

/// A sequence of requests against one fresh key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vector {
    /// A unique name.
    pub name: String,
    /// The quota every step is decided with.
    pub quota: Quota,
    /// The requests, in time order.
    pub steps: Vec<Step>,
}

/// One request of a [`Vector`] and its expected decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// The store's clock when it is decided.
    pub now: Timestamp,
    /// Its cost.
    pub cost: u32,
    /// What the store must answer.
    pub expected: Decision,
}

/// A line of the vector file that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("vectors line {line}: {reason}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// Parses [`VECTORS`].
pub fn load() -> Result<Vec<Vector>, ParseError> {
    parse(VECTORS)
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Allowed => "allow",
        Outcome::Denied => "deny",
        Outcome::InsufficientCapacity => "never",
    }
}

/// Parses a vector file.
pub fn parse(text: &str) -> Result<Vec<Vector>, ParseError> {
    let mut vectors = Vec::new();
    let mut current: Option<(String, Option<Quota>, Vec<Step>)> = None;
    let mut finish = |current: &mut Option<(String, Option<Quota>, Vec<Step>)>,
                      line: usize|
     -> Result<(), ParseError> {
        if let Some((name, quota, steps)) = current.take() {
            let quota = quota.ok_or_else(|| ParseError {
                line,
                reason: format!("vector `{name}` has no quota"),
            })?;
            vectors.push(Vector { name, quota, steps });
        }
        Ok(())
    };
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let err = |reason: String| ParseError {
            line: line_no,
            reason,
        };
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            if raw.trim().is_empty() {
                finish(&mut current, line_no)?;
            }
            continue;
        }
        let mut words = line.split_whitespace();
        match words.next() {
            Some("vector") => {
                finish(&mut current, line_no)?;
                let name = words
                    .next()
                    .ok_or_else(|| err("a vector needs a name".into()))?;
                current = Some((name.to_owned(), None, Vec::new()));
            }
            Some("quota") => {
                let Some((_, quota, _)) = current.as_mut() else {
                    return Err(err("quota outside a vector".into()));
                };
                *quota = Some(parse_quota(words).map_err(err)?);
            }
            Some("step") => {
                let Some((_, _, steps)) = current.as_mut() else {
                    return Err(err("step outside a vector".into()));
                };
                steps.push(parse_step(words).map_err(err)?);
            }
            Some(other) => return Err(err(format!("unknown item `{other}`"))),
            None => {}
        }
    }
    finish(&mut current, text.lines().count())?;
    Ok(vectors)
}

fn number<T: std::str::FromStr>(word: Option<&str>, what: &str) -> Result<T, String> {
    let word = word.ok_or_else(|| format!("{what} is missing"))?;
    word.parse()
        .map_err(|_| format!("{what} `{word}` is not a number"))
}

fn parse_quota<'a>(mut words: impl Iterator<Item = &'a str>) -> Result<Quota, String> {
    let algorithm: Algorithm = words
        .next()
        .ok_or("the algorithm is missing")?
        .parse()
        .map_err(|e: crate::QuotaError| e.to_string())?;
    let (mut limit, mut interval, mut max_delay) = (None, None, 0u64);
    for word in words {
        let (k, v) = word
            .split_once('=')
            .ok_or(format!("`{word}` is not key=value"))?;
        match k {
            "limit" => limit = Some(number::<u32>(Some(v), "limit")?),
            "interval" => interval = Some(number::<u64>(Some(v), "interval")?),
            "max_delay" => max_delay = number(Some(v), "max_delay")?,
            _ => return Err(format!("unknown quota field `{k}`")),
        }
    }
    Quota::from_parts(
        algorithm,
        limit.ok_or("limit is missing")?,
        Duration::from_micros(interval.ok_or("interval is missing")?),
        Duration::from_micros(max_delay),
    )
    .map_err(|e| e.to_string())
}

fn parse_step<'a>(mut words: impl Iterator<Item = &'a str>) -> Result<Step, String> {
    let now = Timestamp::from_micros(number(words.next(), "time")?);
    let cost = number(words.next(), "cost")?;
    if words.next() != Some("=>") {
        return Err("expected `=>` after the cost".into());
    }
    let outcome = match words.next() {
        Some("allow") => Outcome::Allowed,
        Some("deny") => Outcome::Denied,
        Some("never") => Outcome::InsufficientCapacity,
        other => return Err(format!("unknown outcome {other:?}")),
    };
    let limit = number(words.next(), "limit")?;
    let remaining = number(words.next(), "remaining")?;
    let reset: u64 = number(words.next(), "reset_after")?;
    let retry: u64 = number(words.next(), "retry_after")?;
    let delay: u64 = number(words.next(), "delay")?;
    if let Some(extra) = words.next() {
        return Err(format!("unexpected `{extra}` at the end"));
    }
    Ok(Step {
        now,
        cost,
        expected: Decision {
            outcome,
            limit,
            remaining,
            reset_after: Duration::from_micros(reset),
            retry_after: Duration::from_micros(retry),
            delay: Duration::from_micros(delay),
        },
    })
}

/// Runs a vector's requests through the Rust model ([`algorithm::decide`]), returning the
/// decisions it gives.
pub fn replay_model(quota: &Quota, requests: &[(Timestamp, u32)]) -> Vec<Decision> {
    let mut state: Option<State> = None;
    requests
        .iter()
        .map(|&(now, cost)| {
            let (d, s) = algorithm::decide(state.as_ref(), now, quota, cost);
            state = Some(s);
            d
        })
        .collect()
}

/// Writes one step line (without `step`'s trailing newline).
pub fn render_step(step: &Step) -> String {
    let d = &step.expected;
    format!(
        "step {} {} => {} {} {} {} {} {}",
        step.now.as_micros(),
        step.cost,
        outcome_name(d.outcome),
        d.limit,
        d.remaining,
        d.reset_after.as_micros(),
        d.retry_after.as_micros(),
        d.delay.as_micros(),
    )
}

/// Writes vectors in the file format (the inverse of [`parse`]).
pub fn render(vectors: &[Vector]) -> String {
    let mut out = String::new();
    for v in vectors {
        let _ = writeln!(out, "vector {}", v.name);
        let _ = writeln!(out, "quota {}", v.quota);
        for step in &v.steps {
            let _ = writeln!(out, "{}", render_step(step));
        }
        out.push('\n');
    }
    out
}
