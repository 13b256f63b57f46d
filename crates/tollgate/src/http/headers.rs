//! The rate-limit headers of a response: `RateLimit`, `RateLimit-Policy`, `X-RateLimit-*` and
//! `Retry-After`.
//!
//! Every response of a limited route tells the client where it stands, in the header families
//! chosen by [`HeaderMode`] (the `headers` setting):
//!
//! | mode | headers |
//! |---|---|
//! | `ietf` | `RateLimit-Policy: "basic";q=20;w=12` and `RateLimit: "basic";r=19;t=1` |
//! | `legacy` | `X-RateLimit-Limit: 20`, `X-RateLimit-Remaining: 19`, `X-RateLimit-Reset: 1` |
//! | `both` (default) | all of the above |
//! | `none` | none of the above |
//!
//! The IETF pair follows draft-ietf-httpapi-ratelimit-headers: both are RFC 9651 structured-field
//! Lists of one Item, the policy name as an sf-string, with the parameters `q` (the quota's
//! [`limit`](Quota::limit)), `w` (its [`window_span`](Quota::window_span) in seconds, rounded up,
//! at least 1; the span is first cut to whole milliseconds, so the microsecond an uneven refill
//! interval is rounded up by does not add a second: 3 per second is `w=1`, not `w=2`), `r` (remaining) and `t` (seconds until the quota is whole again, rounded up).
//! When several policies apply, the caller reports the one closest to denial; this module formats
//! one.
//!
//! "Remaining" (`r`, `X-RateLimit-Remaining`) is how many more unit-cost requests would pass right
//! now, and it is always 0 on a denial. `X-RateLimit-Reset` is a delta in seconds, like `t`.
//!
//! A denied response also carries `Retry-After` in whole seconds, rounded up and never 0, **in
//! every mode, `none` included**: `none` only silences the informational headers, not the one a
//! 429 needs to tell the client when to come back.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use http::HeaderMap;
//! use tollgate::core::{Decision, Outcome, Quota};
//! use tollgate::http::headers::{HeaderMode, RateLimitInfo, insert_headers};
//! use tollgate::http::problem::problem_json;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // 100 requests a minute, at most 20 at once: an empty bucket fills in 12 s.
//! let quota = Quota::per_minute(100)?.with_burst(20)?;
//! let decision = Decision {
//!     outcome: Outcome::Allowed,
//!     limit: 20,
//!     remaining: 19,
//!     reset_after: Duration::from_millis(600),
//!     retry_after: Duration::ZERO,
//!     delay: Duration::ZERO,
//! };
//! let info = RateLimitInfo { policy: "basic", quota: &quota, decision: &decision };
//!
//! let mut headers = HeaderMap::new();
//! insert_headers(&mut headers, "both".parse::<HeaderMode>()?, &info);
//! assert_eq!(headers["ratelimit-policy"], r#""basic";q=20;w=12"#);
//! assert_eq!(headers["ratelimit"], r#""basic";r=19;t=1"#);
//! assert_eq!(headers["x-ratelimit-remaining"], "19");
//! assert!(!headers.contains_key("retry-after"));
//!
//! // A denial: remaining is 0 and Retry-After is rounded up.
//! let denied = Decision {
//!     outcome: Outcome::Denied,
//!     remaining: 0,
//!     retry_after: Duration::from_millis(1200),
//!     ..decision
//! };
//! let info = RateLimitInfo { decision: &denied, ..info };
//! insert_headers(&mut headers, HeaderMode::Ietf, &info);
//! assert_eq!(headers["ratelimit"], r#""basic";r=0;t=1"#);
//! assert_eq!(headers["retry-after"], "2");
//!
//! let body = problem_json(&["basic"], denied.retry_after);
//! assert!(body.contains(r#""status":429"#));
//! assert!(body.contains(r#""retry_after":2"#));
//! # Ok(())
//! # }
//! ```
//!
//!
//! A denial's body is written by [`problem_json`](super::problem::problem_json).

use std::error::Error;
use std::fmt::{self, Write as _};
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use tollgate_core::{Decision, Quota};

/// `RateLimit`: the remaining quota and the time until it is whole (IETF draft).
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// `RateLimit-Policy`: the quota and its window (IETF draft).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// `X-RateLimit-Limit`: the quota (legacy).
pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");

/// `X-RateLimit-Remaining`: how many more unit-cost requests would pass now (legacy).
pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");

/// `X-RateLimit-Reset`: the seconds until the quota is whole again, as a delta (legacy).
pub const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// The largest integer an RFC 9651 sf-integer may hold (15 digits).
const SF_INTEGER_MAX: u64 = 999_999_999_999_999;

/// Which rate-limit header families a response carries: the `headers` setting.
///
/// Parses from and prints as `ietf`, `legacy`, `both` or `none`. Whatever the mode, a denied
/// response carries `Retry-After` (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum HeaderMode {
    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
    Ietf,
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset`.
    Legacy,
    /// Both the IETF and the legacy headers.
    #[default]
    Both,
    /// No rate-limit headers (a denial still gets `Retry-After`).
    None,
}

impl HeaderMode {
    /// Every mode, in a fixed order.
    pub const ALL: [HeaderMode; 4] = [
        HeaderMode::Ietf,
        HeaderMode::Legacy,
        HeaderMode::Both,
        HeaderMode::None,
    ];

    /// The configuration name of the mode: `"ietf"`, `"legacy"`, `"both"` or `"none"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            HeaderMode::Ietf => "ietf",
            HeaderMode::Legacy => "legacy",
            HeaderMode::Both => "both",
            HeaderMode::None => "none",
        }
    }

    /// Whether the mode sends `RateLimit-Policy` and `RateLimit`.
    pub const fn sends_ietf(self) -> bool {
        matches!(self, HeaderMode::Ietf | HeaderMode::Both)
    }

    /// Whether the mode sends the `X-RateLimit-*` headers.
    pub const fn sends_legacy(self) -> bool {
        matches!(self, HeaderMode::Legacy | HeaderMode::Both)
    }
}

impl fmt::Display for HeaderMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HeaderMode {
    type Err = ParseHeaderModeError;

    /// Parses a configuration name exactly as [`as_str`](HeaderMode::as_str) prints it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HeaderMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| ParseHeaderModeError {
                input: s.to_owned(),
            })
    }
}

/// A `headers` setting that is not one of `ietf`, `legacy`, `both` or `none`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseHeaderModeError {
    input: String,
}

impl ParseHeaderModeError {
    /// The text that failed to parse.
    pub fn input(&self) -> &str {
        &self.input
    }
}

impl fmt::Display for ParseHeaderModeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown header mode `{}`: expected one of ietf, legacy, both, none",
            self.input.escape_debug()
        )
    }
}

impl Error for ParseHeaderModeError {}

/// What the headers of one response report: the policy closest to denial, its quota and the
/// decision it gave.
#[derive(Debug, Clone, Copy)]
pub struct RateLimitInfo<'a> {
    /// The policy name (from the configuration). Any text is accepted: it is made a valid
    /// sf-string (see [`insert_headers`]).
    pub policy: &'a str,
    /// The policy's quota: gives `q` and `w`.
    pub quota: &'a Quota,
    /// The policy's decision for this request: gives `r`, `t` and, on a denial, `Retry-After`.
    pub decision: &'a Decision,
}

/// `d` in whole seconds, rounded up: 1.2 s is 2, 3 s is 3, and zero stays 0.
///
/// Saturates at `u64::MAX` instead of overflowing.
pub const fn ceil_secs(d: Duration) -> u64 {
    let secs = d.as_secs();
    if d.subsec_nanos() > 0 {
        secs.saturating_add(1)
    } else {
        secs
    }
}

/// The `Retry-After` seconds for a wait of `d`: rounded up and never 0 (a 0 would invite an
/// immediate retry that is denied again).
pub const fn retry_after_secs(d: Duration) -> u64 {
    match ceil_secs(d) {
        0 => 1,
        secs => secs,
    }
}

/// The `Retry-After` value for a wait of `d`, in seconds per [`retry_after_secs`].
pub fn retry_after_header(d: Duration) -> HeaderValue {
    integer_value(retry_after_secs(d))
}

/// Writes the rate-limit headers for one response (allowed or denied) into `headers` per `mode`,
/// replacing existing ones; adds Retry-After when the decision is not allowed.
///
/// * IETF: `RateLimit-Policy: "<policy>";q=<limit>;w=<window>` and
///   `RateLimit: "<policy>";r=<remaining>;t=<reset>`.
/// * legacy: `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset` (delta seconds).
/// * `Retry-After` whenever the outcome is not [`Allowed`](tollgate_core::Outcome::Allowed), in
///   every mode: [`Denied`](tollgate_core::Outcome::Denied) and
///   [`InsufficientCapacity`](tollgate_core::Outcome::InsufficientCapacity) alike (the latter
///   has no real retry time, so it gets the minimum, 1 s).
///
/// Remaining is forced to 0 when the request is not allowed. Seconds are rounded up; `w` is at
/// least 1. The policy name becomes a valid sf-string whatever it holds: `"` and `\` are escaped
/// and every character outside printable ASCII (`0x20..=0x7E`) is replaced with `_`. Integers in
/// the structured fields are capped at the sf-integer maximum (999 999 999 999 999), so the
/// values always parse.
///
/// A header written here replaces every value it had before; headers of a family `mode` does not
/// send are left untouched, and so is an existing `Retry-After` when the request is allowed.
pub fn insert_headers(headers: &mut HeaderMap, mode: HeaderMode, info: &RateLimitInfo<'_>) {
    PolicyHeaders::new(info.policy, info.quota).insert(headers, mode, info.decision);
}

/// The part of the rate-limit headers that depends only on a policy's name and quota, computed
/// once per policy (the inbound layer builds one per tier, route and whole-service limit when the
/// [`Policy`](crate::inbound::Policy) is built) rather than on every response.
#[derive(Debug, Clone)]
pub(crate) struct PolicyHeaders {
    /// The policy name as an sf-string (`"basic"`): how `RateLimit` starts.
    sf_name: Box<str>,
    /// The whole `RateLimit-Policy` value; `None` only if it were not a valid header value, which
    /// printable ASCII always is.
    policy: Option<HeaderValue>,
    /// The `X-RateLimit-Limit` value.
    limit: HeaderValue,
}

impl PolicyHeaders {
    /// The fixed headers of `policy` limited by `quota`.
    pub(crate) fn new(policy: &str, quota: &Quota) -> PolicyHeaders {
        let mut sf_name = String::with_capacity(policy.len() + 2);
        push_sf_string(&mut sf_name, policy);
        // Whole milliseconds first: 3/s refills every 333,334 µs, a span of 1.000002 s, which
        // is `w=1`, not `w=2`.
        let span = quota.window_span();
        let window = ceil_secs(Duration::from_millis(
            span.as_millis().try_into().unwrap_or(u64::MAX),
        ))
        .max(1);
        let mut value = String::with_capacity(sf_name.len() + 40);
        value.push_str(&sf_name);
        // Writing into a String cannot fail.
        let _ = write!(
            value,
            ";q={};w={}",
            sf_integer(u64::from(quota.limit())),
            sf_integer(window)
        );
        PolicyHeaders {
            sf_name: sf_name.into_boxed_str(),
            policy: HeaderValue::try_from(value).ok(),
            limit: integer_value(u64::from(quota.limit())),
        }
    }

    /// [`insert_headers`] for this policy and `decision`.
    pub(crate) fn insert(&self, headers: &mut HeaderMap, mode: HeaderMode, decision: &Decision) {
        let allowed = decision.is_allowed();
        let remaining = if allowed { decision.remaining } else { 0 };
        let reset = ceil_secs(decision.reset_after);

        if mode.sends_ietf() {
            match &self.policy {
                Some(policy) => {
                    headers.insert(RATELIMIT_POLICY, policy.clone());
                }
                // Unreachable (see `policy`). Never leave a stale value behind.
                None => {
                    headers.remove(RATELIMIT_POLICY);
                }
            }
            let mut r = [0; 20];
            let mut t = [0; 20];
            let current = [
                self.sf_name.as_bytes(),
                b";r=",
                digits(sf_integer(u64::from(remaining)), &mut r),
                b";t=",
                digits(sf_integer(reset), &mut t),
            ]
            .concat();
            // `concat` allocates exactly the length, so the bytes are handed over as they are.
            match HeaderValue::from_maybe_shared(Bytes::from(current)) {
                Ok(current) => {
                    headers.insert(RATELIMIT, current);
                }
                // Unreachable: printable ASCII only. Never leave a stale value behind.
                Err(_) => {
                    headers.remove(RATELIMIT);
                }
            }
        }

        if mode.sends_legacy() {
            headers.insert(X_RATELIMIT_LIMIT, self.limit.clone());
            headers.insert(X_RATELIMIT_REMAINING, integer_value(u64::from(remaining)));
            headers.insert(X_RATELIMIT_RESET, integer_value(reset));
        }

        if !allowed {
            headers.insert(RETRY_AFTER, retry_after_header(decision.retry_after));
        }
    }
}

/// Integers below this are header values without an allocation (see [`SMALL_INTEGERS`]).
const SMALL_INTEGER_END: usize = 1000;

/// `000` to `999`, three digits each: the text of every small integer, so its header value can
/// point at static bytes.
static SMALL_INTEGERS: [u8; 3 * SMALL_INTEGER_END] = {
    let mut out = [0; 3 * SMALL_INTEGER_END];
    let mut n = 0;
    while n < SMALL_INTEGER_END {
        out[3 * n] = b'0' + (n / 100) as u8;
        out[3 * n + 1] = b'0' + (n / 10 % 10) as u8;
        out[3 * n + 2] = b'0' + (n % 10) as u8;
        n += 1;
    }
    out
};

/// `n` in decimal, as a header value (what `HeaderValue::from(n)` gives), without allocating
/// for small numbers and with one exact allocation otherwise.
fn integer_value(n: u64) -> HeaderValue {
    if let Ok(small) = usize::try_from(n)
        && small < SMALL_INTEGER_END
    {
        let width = match small {
            0..=9 => 1,
            10..=99 => 2,
            _ => 3,
        };
        let end = 3 * small + 3;
        if let Ok(text) = std::str::from_utf8(&SMALL_INTEGERS[end - width..end]) {
            return HeaderValue::from_static(text);
        }
    }
    let mut buf = [0; 20];
    HeaderValue::from_bytes(digits(n, &mut buf)).unwrap_or_else(|_| HeaderValue::from(n))
}

/// `n` in decimal, written at the end of `buf`: three digits at a time from [`SMALL_INTEGERS`]
/// (a third of the divisions of one digit at a time; a remaining of 999,999 takes two).
pub(crate) fn digits(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    while n >= 1000 {
        // Below 1000, so the cast is exact.
        let group = (n % 1000) as usize;
        n /= 1000;
        at -= 3;
        // Byte by byte: `copy_from_slice` of three bytes is a call to `memcpy`.
        buf[at] = SMALL_INTEGERS[3 * group];
        buf[at + 1] = SMALL_INTEGERS[3 * group + 1];
        buf[at + 2] = SMALL_INTEGERS[3 * group + 2];
    }
    // The leading group, without its leading zeros. (u64::MAX has 20 digits: six groups of
    // three and two, which `buf` holds.)
    let lead = n as usize;
    let width = match lead {
        0..=9 => 1,
        10..=99 => 2,
        _ => 3,
    };
    for i in 0..width {
        buf[at - width + i] = SMALL_INTEGERS[3 * lead + 3 - width + i];
    }
    &buf[at - width..]
}

// The RFC 9651 serialiser is our own, for the one shape these headers have (a List of one Item:
// an sf-string and integer parameters). Measured on 2026-12-01 (release build, 2 M rounds, the
// two IETF headers into a HeaderMap): `insert_headers` 420-490 ns, sfv 0.15's `ListSerializer`
// into a reused buffer 520-580 ns (1.1-1.4x slower), sfv's `List` value serialised 1.7-2.0 µs;
// and the inbound layer does better still, writing `RateLimit-Policy` once per policy
// (`PolicyHeaders`). sfv stays a dev-dependency: the tests parse every value written here with it.

/// Caps `v` at the largest sf-integer.
fn sf_integer(v: u64) -> u64 {
    v.min(SF_INTEGER_MAX)
}

/// Appends `name` as an RFC 9651 sf-string: quoted, `"` and `\` escaped, anything outside
/// printable ASCII replaced with `_`.
fn push_sf_string(out: &mut String, name: &str) {
    out.push('"');
    for c in name.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('_'),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests;
