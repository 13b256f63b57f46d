//! The rate-limit headers of a response and the `application/problem+json` body of a 429.
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
//! at least 1), `r` (remaining) and `t` (seconds until the quota is whole again, rounded up).
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
//! use tollgate::headers::{HeaderMode, RateLimitInfo, insert_headers, problem_json};
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
//! # Rate limited
//!
//! A denied request is answered with status 429 and a problem-details body (RFC 9457) of type
//! [`PROBLEM_CONTENT_TYPE`], built by [`problem_json`]:
//!
//! ```json
//! {
//!   "type": "https://docs.rs/tollgate/latest/tollgate/headers/index.html#rate-limited",
//!   "title": "Too Many Requests",
//!   "status": 429,
//!   "detail": "The rate limit of policy \"basic\" was exceeded; retry in 2 seconds.",
//!   "violated-policies": ["basic"],
//!   "retry_after": 2
//! }
//! ```
//!
//! `type` ([`PROBLEM_TYPE`]) points at this section. `violated-policies` names the policies that
//! denied the request, `retry_after` is the number of seconds the `Retry-After` header carries.

use std::error::Error;
use std::fmt::{self, Write as _};
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use tollgate_core::{Decision, Quota};

/// The media type of the body of a 429: `application/problem+json` (RFC 9457).
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// The `type` member of the body of a 429: the URI of the [section](self#rate-limited) of these
/// docs that describes it.
pub const PROBLEM_TYPE: &str =
    "https://docs.rs/tollgate/latest/tollgate/headers/index.html#rate-limited";

/// The `title` member of the body of a 429.
pub const PROBLEM_TITLE: &str = "Too Many Requests";

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
        let window = ceil_secs(quota.window_span()).max(1);
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

/// `n` in decimal, written at the end of `buf`.
fn digits(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// A problem+json body (RFC 9457) for another status, such as the 401 of an unknown API key or
/// the 503 of `fail_closed`: `type` is `about:blank`.
pub fn problem(status: u16, title: &str, detail: &str) -> String {
    let mut out = String::with_capacity(title.len() + detail.len() + 64);
    out.push_str("{\"type\":\"about:blank\",\"title\":");
    push_json_string(&mut out, title);
    let _ = write!(out, ",\"status\":{status},\"detail\":");
    push_json_string(&mut out, detail);
    out.push('}');
    out
}

/// The problem+json body of a 429.
///
/// `violated_policies` are the names of the policies that denied the request (any text: it is
/// escaped as JSON, non-ASCII kept as UTF-8); `retry_after` becomes the `retry_after` member in
/// seconds, the same value [`retry_after_header`] gives. See the
/// [module docs](self#rate-limited) for the members. Serve it with the content type
/// [`PROBLEM_CONTENT_TYPE`].
pub fn problem_json(violated_policies: &[&str], retry_after: Duration) -> String {
    let secs = retry_after_secs(retry_after);

    let names: usize = violated_policies.iter().map(|p| p.len() + 4).sum();
    let mut detail = String::with_capacity(names + 80);
    match violated_policies {
        [] => detail.push_str("The rate limit was exceeded"),
        [one] => {
            detail.push_str("The rate limit of policy ");
            push_quoted(&mut detail, one);
            detail.push_str(" was exceeded");
        }
        many => {
            detail.push_str("The rate limits of policies ");
            for (i, name) in many.iter().enumerate() {
                if i > 0 {
                    detail.push_str(", ");
                }
                push_quoted(&mut detail, name);
            }
            detail.push_str(" were exceeded");
        }
    }
    let unit = if secs == 1 { "second" } else { "seconds" };
    let _ = write!(detail, "; retry in {secs} {unit}.");

    let mut out = String::with_capacity(2 * (detail.len() + names) + 200);
    out.push_str("{\"type\":");
    push_json_string(&mut out, PROBLEM_TYPE);
    out.push_str(",\"title\":");
    push_json_string(&mut out, PROBLEM_TITLE);
    out.push_str(",\"status\":429,\"detail\":");
    push_json_string(&mut out, &detail);
    out.push_str(",\"violated-policies\":[");
    for (i, name) in violated_policies.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_string(&mut out, name);
    }
    let _ = write!(out, "],\"retry_after\":{secs}}}");
    out
}

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

/// Appends `name` between double quotes (for the human-readable `detail`).
fn push_quoted(out: &mut String, name: &str) {
    out.push('"');
    out.push_str(name);
    out.push('"');
}

/// Appends `s` as a JSON string: `"` and `\` escaped, control characters as `\u00XX`, the rest
/// (non-ASCII included) as is.
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use sfv::{BareItem, List, ListEntry, Parser};
    use tollgate_core::Outcome;

    use super::*;

    fn decision(outcome: Outcome, remaining: u32, reset_ms: u64, retry_ms: u64) -> Decision {
        Decision {
            outcome,
            limit: 20,
            remaining,
            reset_after: Duration::from_millis(reset_ms),
            retry_after: Duration::from_millis(retry_ms),
            delay: Duration::ZERO,
        }
    }

    fn basic() -> Quota {
        Quota::per_minute(100).unwrap().with_burst(20).unwrap()
    }

    fn written(mode: HeaderMode, policy: &str, quota: &Quota, decision: &Decision) -> HeaderMap {
        let mut headers = HeaderMap::new();
        insert_headers(
            &mut headers,
            mode,
            &RateLimitInfo {
                policy,
                quota,
                decision,
            },
        );
        headers
    }

    fn names(headers: &HeaderMap) -> BTreeSet<&str> {
        headers.keys().map(HeaderName::as_str).collect()
    }

    fn text<'h>(headers: &'h HeaderMap, name: &str) -> &'h str {
        headers[name].to_str().unwrap()
    }

    /// One parsed sf-list member: the string and its integer parameters.
    #[derive(Debug, PartialEq)]
    struct SfMember {
        name: String,
        params: Vec<(String, i64)>,
    }

    /// Parses a header value as an RFC 9651 List of exactly one Item with integer parameters.
    fn parse_sf(value: &str) -> SfMember {
        let list: List = Parser::new(value)
            .parse()
            .unwrap_or_else(|e| panic!("{value:?} is not an sf-list: {e}"));
        assert_eq!(list.len(), 1, "{value}");
        let ListEntry::Item(item) = &list[0] else {
            panic!("{value}: not an item");
        };
        let BareItem::String(name) = &item.bare_item else {
            panic!("{value}: not an sf-string");
        };
        let params = item
            .params
            .iter()
            .map(|(k, v)| {
                let int = v
                    .as_integer()
                    .unwrap_or_else(|| panic!("{value}: {k:?} not an integer"));
                (k.as_str().to_owned(), i64::from(int))
            })
            .collect();
        SfMember {
            name: name.as_str().to_owned(),
            params,
        }
    }

    fn member(name: &str, params: &[(&str, i64)]) -> SfMember {
        SfMember {
            name: name.to_owned(),
            params: params.iter().map(|&(k, v)| (k.to_owned(), v)).collect(),
        }
    }

    #[test]
    fn mode_names_round_trip() {
        for mode in HeaderMode::ALL {
            assert_eq!(mode.as_str().parse::<HeaderMode>(), Ok(mode));
            assert_eq!(mode.to_string(), mode.as_str());
        }
        assert_eq!(HeaderMode::default(), HeaderMode::Both);
        for bad in ["", "IETF", " both", "x-ratelimit", "all"] {
            let err = bad.parse::<HeaderMode>().unwrap_err();
            assert_eq!(err.input(), bad);
            let msg = err.to_string();
            for valid in ["ietf", "legacy", "both", "none"] {
                assert!(msg.contains(valid), "{msg}");
            }
            assert!(msg.contains(&format!("`{bad}`")), "{msg}");
        }
    }

    #[test]
    fn seconds_round_up() {
        let cases = [
            (Duration::ZERO, 0, 1),
            (Duration::from_nanos(1), 1, 1),
            (Duration::from_millis(1), 1, 1),
            (Duration::from_millis(1200), 2, 2),
            (Duration::from_secs(3), 3, 3),
            (Duration::from_millis(3001), 4, 4),
            (Duration::MAX, u64::MAX, u64::MAX),
        ];
        for (d, ceil, retry) in cases {
            assert_eq!(ceil_secs(d), ceil, "{d:?}");
            assert_eq!(retry_after_secs(d), retry, "{d:?}");
            assert_eq!(retry_after_header(d), HeaderValue::from(retry), "{d:?}");
        }
    }

    #[test]
    fn each_mode_writes_exactly_its_headers() {
        let quota = basic();
        let ietf = ["ratelimit", "ratelimit-policy"];
        let legacy = [
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
        ];
        let allowed = decision(Outcome::Allowed, 19, 600, 0);
        let denied = decision(Outcome::Denied, 0, 12_000, 600);
        let never = decision(Outcome::InsufficientCapacity, 20, 0, 0);
        for mode in HeaderMode::ALL {
            let mut expected: BTreeSet<&str> = BTreeSet::new();
            if matches!(mode, HeaderMode::Ietf | HeaderMode::Both) {
                expected.extend(ietf);
            }
            if matches!(mode, HeaderMode::Legacy | HeaderMode::Both) {
                expected.extend(legacy);
            }
            let headers = written(mode, "basic", &quota, &allowed);
            assert_eq!(names(&headers), expected, "{mode} allowed");
            assert_eq!(headers.len(), expected.len(), "{mode}: one value each");

            expected.insert("retry-after");
            for refused in [&denied, &never] {
                let headers = written(mode, "basic", &quota, refused);
                assert_eq!(names(&headers), expected, "{mode} {:?}", refused.outcome);
                assert_eq!(headers.len(), expected.len(), "{mode}: one value each");
            }
        }
        // `none` on a denial: Retry-After and nothing else.
        let headers = written(HeaderMode::None, "basic", &quota, &denied);
        assert_eq!(names(&headers), BTreeSet::from(["retry-after"]));
        assert_eq!(text(&headers, "retry-after"), "1");
    }

    #[test]
    fn ietf_headers_are_sf_lists_with_the_right_values() {
        let quota = basic();
        assert_eq!(quota.window_span(), Duration::from_secs(12));
        let headers = written(
            HeaderMode::Both,
            "basic",
            &quota,
            &decision(Outcome::Allowed, 19, 600, 0),
        );
        assert_eq!(text(&headers, "ratelimit-policy"), r#""basic";q=20;w=12"#);
        assert_eq!(text(&headers, "ratelimit"), r#""basic";r=19;t=1"#);
        assert_eq!(
            parse_sf(text(&headers, "ratelimit-policy")),
            member("basic", &[("q", 20), ("w", 12)])
        );
        assert_eq!(
            parse_sf(text(&headers, "ratelimit")),
            member("basic", &[("r", 19), ("t", 1)])
        );
        assert_eq!(text(&headers, "x-ratelimit-limit"), "20");
        assert_eq!(text(&headers, "x-ratelimit-remaining"), "19");
        assert_eq!(text(&headers, "x-ratelimit-reset"), "1");

        // A window algorithm: w is the window, rounded up and at least 1; t = 0 when whole.
        for (window, w) in [(500, 1), (1_500, 2), (60_000, 60)] {
            let quota = Quota::fixed_window(30, Duration::from_millis(window)).unwrap();
            let headers = written(
                HeaderMode::Ietf,
                "search",
                &quota,
                &decision(Outcome::Allowed, 30, 0, 0),
            );
            assert_eq!(
                parse_sf(text(&headers, "ratelimit-policy")),
                member("search", &[("q", 30), ("w", w)])
            );
            assert_eq!(
                parse_sf(text(&headers, "ratelimit")),
                member("search", &[("r", 30), ("t", 0)])
            );
        }
    }

    #[test]
    fn denial_reports_zero_remaining_and_rounds_retry_after_up() {
        let quota = basic();
        for (retry_ms, secs) in [(1_200, "2"), (1, "1"), (0, "1"), (3_000, "3")] {
            // The decision claims 5 remaining: a denial still reports 0.
            let denied = decision(Outcome::Denied, 5, 2_500, retry_ms);
            let headers = written(HeaderMode::Both, "basic", &quota, &denied);
            assert_eq!(text(&headers, "retry-after"), secs, "{retry_ms} ms");
            assert_eq!(text(&headers, "x-ratelimit-remaining"), "0");
            assert_eq!(text(&headers, "x-ratelimit-reset"), "3");
            assert_eq!(
                parse_sf(text(&headers, "ratelimit")),
                member("basic", &[("r", 0), ("t", 3)])
            );
        }
        let never = decision(Outcome::InsufficientCapacity, 20, 0, 0);
        let headers = written(HeaderMode::Both, "basic", &quota, &never);
        assert_eq!(text(&headers, "retry-after"), "1");
        assert_eq!(text(&headers, "x-ratelimit-remaining"), "0");
    }

    #[test]
    fn hostile_policy_names_still_parse() {
        let quota = basic();
        let cases = [
            ("", ""),
            (r#"say "hi""#, r#"say "hi""#),
            (r"back\slash\", r"back\slash\"),
            ("caf\u{e9} \u{1F600}", "caf_ _"),
            ("tab\there\r\nnul\0del\u{7f}", "tab_here__nul_del_"),
            (r#"\"\\""#, r#"\"\\""#),
            (
                "~ !#$%&'()*+,-./:;<=>?@[]^_`{|}",
                "~ !#$%&'()*+,-./:;<=>?@[]^_`{|}",
            ),
        ];
        for (name, sanitized) in cases {
            let headers = written(
                HeaderMode::Ietf,
                name,
                &quota,
                &decision(Outcome::Allowed, 7, 4_200, 0),
            );
            assert_eq!(
                parse_sf(text(&headers, "ratelimit-policy")),
                member(sanitized, &[("q", 20), ("w", 12)]),
                "{name:?}"
            );
            assert_eq!(
                parse_sf(text(&headers, "ratelimit")),
                member(sanitized, &[("r", 7), ("t", 5)]),
                "{name:?}"
            );
        }
    }

    #[test]
    fn huge_durations_stay_valid_sf_integers() {
        let quota = basic();
        let mut forever = decision(Outcome::Denied, 0, 0, 0);
        forever.reset_after = Duration::MAX;
        forever.retry_after = Duration::MAX;
        let headers = written(HeaderMode::Both, "basic", &quota, &forever);
        assert_eq!(
            parse_sf(text(&headers, "ratelimit")),
            member("basic", &[("r", 0), ("t", 999_999_999_999_999)])
        );
        assert_eq!(
            text(&headers, "x-ratelimit-reset"),
            u64::MAX.to_string().as_str()
        );
        assert_eq!(text(&headers, "retry-after"), u64::MAX.to_string().as_str());
    }

    #[test]
    fn existing_values_are_replaced() {
        let quota = basic();
        let mut headers = HeaderMap::new();
        for name in [
            RATELIMIT,
            RATELIMIT_POLICY,
            X_RATELIMIT_LIMIT,
            X_RATELIMIT_REMAINING,
            X_RATELIMIT_RESET,
            RETRY_AFTER,
        ] {
            headers.append(name.clone(), HeaderValue::from_static("stale"));
            headers.append(name, HeaderValue::from_static("older"));
        }
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        let denied = decision(Outcome::Denied, 0, 1_000, 1_000);
        insert_headers(
            &mut headers,
            HeaderMode::Both,
            &RateLimitInfo {
                policy: "basic",
                quota: &quota,
                decision: &denied,
            },
        );
        for name in headers.keys() {
            let values: Vec<_> = headers.get_all(name).iter().collect();
            assert_eq!(values.len(), 1, "{name}");
            assert!(values[0] != "stale" && values[0] != "older", "{name}");
        }
        assert_eq!(text(&headers, "content-type"), "text/plain");

        // An allowed response leaves the other family and an existing Retry-After alone.
        let mut headers = HeaderMap::new();
        headers.insert(X_RATELIMIT_LIMIT, HeaderValue::from_static("keep"));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("120"));
        let allowed = decision(Outcome::Allowed, 3, 1_000, 0);
        insert_headers(
            &mut headers,
            HeaderMode::Ietf,
            &RateLimitInfo {
                policy: "basic",
                quota: &quota,
                decision: &allowed,
            },
        );
        assert_eq!(text(&headers, "x-ratelimit-limit"), "keep");
        assert_eq!(text(&headers, "retry-after"), "120");
    }

    #[test]
    fn problem_json_has_the_members() {
        let body = problem_json(&["basic"], Duration::from_millis(1_200));
        let json = parse_json(&body).unwrap_or_else(|e| panic!("{body}: {e}"));
        assert_eq!(
            json,
            Json::Obj(vec![
                ("type".into(), Json::Str(PROBLEM_TYPE.into())),
                ("title".into(), Json::Str("Too Many Requests".into())),
                ("status".into(), Json::Num(429.0)),
                (
                    "detail".into(),
                    Json::Str(
                        "The rate limit of policy \"basic\" was exceeded; retry in 2 seconds."
                            .into()
                    )
                ),
                (
                    "violated-policies".into(),
                    Json::Arr(vec![Json::Str("basic".into())])
                ),
                ("retry_after".into(), Json::Num(2.0)),
            ])
        );
        assert_eq!(PROBLEM_CONTENT_TYPE, "application/problem+json");
    }

    #[test]
    fn problem_json_escapes_any_name() {
        let names = [
            "say \"hi\"",
            r"back\slash",
            "caf\u{e9} \u{1F600}",
            "ctl\0\u{1}\t\n\r\u{1f}\u{7f}",
            "/slash </script>",
        ];
        for retry in [Duration::ZERO, Duration::from_millis(1), Duration::MAX] {
            let secs = retry_after_secs(retry);
            let body = problem_json(&names, retry);
            let json = parse_json(&body).unwrap_or_else(|e| panic!("{body:?}: {e}"));
            let Json::Obj(members) = json else {
                panic!("{body}: not an object");
            };
            let get = |key: &str| {
                members
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v)
                    .unwrap_or_else(|| panic!("{body}: no {key}"))
            };
            assert_eq!(
                *get("violated-policies"),
                Json::Arr(names.iter().map(|n| Json::Str((*n).into())).collect())
            );
            assert_eq!(*get("retry_after"), Json::Num(secs as f64));
            assert_eq!(*get("status"), Json::Num(429.0));
            let Json::Str(detail) = get("detail") else {
                panic!("{body}: detail is not a string");
            };
            assert!(
                detail.contains(&format!("retry in {secs} second")),
                "{detail}"
            );
            for name in names {
                assert!(detail.contains(name), "{detail}");
            }
        }
        let none = parse_json(&problem_json(&[], Duration::from_secs(1))).unwrap();
        let Json::Obj(members) = none else {
            panic!("not an object");
        };
        assert!(members.contains(&("violated-policies".into(), Json::Arr(vec![]))));
        assert!(members.contains(&(
            "detail".into(),
            Json::Str("The rate limit was exceeded; retry in 1 second.".into())
        )));
    }

    #[test]
    fn integers_read_as_http_writes_them() {
        let big = [
            1_000,
            1_001,
            65_535,
            999_999,
            1_000_000,
            u64::from(u32::MAX),
            u64::MAX,
        ];
        for n in (0..2_000).chain(big) {
            assert_eq!(integer_value(n), HeaderValue::from(n), "{n}");
        }
    }

    #[test]
    fn precomputed_headers_match_a_fresh_build() {
        let quota = basic();
        let fixed = PolicyHeaders::new("ba\"sic", &quota);
        for d in [
            decision(Outcome::Allowed, 19, 600, 0),
            decision(Outcome::Denied, 0, 12_000, 1_200),
        ] {
            for mode in HeaderMode::ALL {
                let mut headers = written(mode, "ba\"sic", &quota, &d);
                // Twice into the same map: every value is replaced, none appended.
                fixed.insert(&mut headers, mode, &d);
                let mut fresh = HeaderMap::new();
                fixed.insert(&mut fresh, mode, &d);
                assert_eq!(headers, fresh, "{mode}");
            }
        }
    }

    #[test]
    fn json_checker_rejects_invalid_json() {
        for bad in [
            "",
            "{",
            "{\"a\":1,}",
            "[1 2]",
            "\"raw\ncontrol\"",
            "\"bad \\x escape\"",
            "\"\\ud800\"",
            "01",
            "1.",
            "{\"a\" 1}",
            "{} {}",
            "tru",
        ] {
            assert!(parse_json(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_json(r#" {"a": [true, false, null, -1.5e2, "\u00e9\ud83d\ude00\/"]} "#),
            Ok(Json::Obj(vec![(
                "a".into(),
                Json::Arr(vec![
                    Json::Bool(true),
                    Json::Bool(false),
                    Json::Null,
                    Json::Num(-150.0),
                    Json::Str("\u{e9}\u{1F600}/".into()),
                ])
            )]))
        );
    }

    /// A parsed JSON value (RFC 8259), for checking [`problem_json`] without a JSON crate.
    #[derive(Debug, PartialEq)]
    enum Json {
        Null,
        Bool(bool),
        Num(f64),
        Str(String),
        Arr(Vec<Json>),
        Obj(Vec<(String, Json)>),
    }

    /// Parses `s` as exactly one JSON value, strictly.
    fn parse_json(s: &str) -> Result<Json, String> {
        let mut p = JsonParser {
            bytes: s.as_bytes(),
            pos: 0,
        };
        let value = p.value()?;
        p.skip_ws();
        if p.pos != p.bytes.len() {
            return Err(format!("trailing data at {}", p.pos));
        }
        Ok(value)
    }

    struct JsonParser<'a> {
        bytes: &'a [u8],
        pos: usize,
    }

    impl JsonParser<'_> {
        fn peek(&self) -> Option<u8> {
            self.bytes.get(self.pos).copied()
        }

        fn next(&mut self) -> Result<u8, String> {
            let b = self.peek().ok_or("unexpected end")?;
            self.pos += 1;
            Ok(b)
        }

        fn expect(&mut self, b: u8) -> Result<(), String> {
            match self.next()? {
                got if got == b => Ok(()),
                got => Err(format!(
                    "expected {:?}, got {:?} at {}",
                    b as char, got as char, self.pos
                )),
            }
        }

        fn skip_ws(&mut self) {
            while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
                self.pos += 1;
            }
        }

        fn literal(&mut self, word: &str, value: Json) -> Result<Json, String> {
            for &b in word.as_bytes() {
                self.expect(b)?;
            }
            Ok(value)
        }

        fn value(&mut self) -> Result<Json, String> {
            self.skip_ws();
            match self.peek().ok_or("unexpected end")? {
                b'{' => self.object(),
                b'[' => self.array(),
                b'"' => self.string().map(Json::Str),
                b't' => self.literal("true", Json::Bool(true)),
                b'f' => self.literal("false", Json::Bool(false)),
                b'n' => self.literal("null", Json::Null),
                b'-' | b'0'..=b'9' => self.number(),
                b => Err(format!("unexpected {:?} at {}", b as char, self.pos)),
            }
        }

        fn object(&mut self) -> Result<Json, String> {
            self.expect(b'{')?;
            let mut members = Vec::new();
            self.skip_ws();
            if self.peek() == Some(b'}') {
                self.pos += 1;
                return Ok(Json::Obj(members));
            }
            loop {
                self.skip_ws();
                let key = self.string()?;
                self.skip_ws();
                self.expect(b':')?;
                members.push((key, self.value()?));
                self.skip_ws();
                match self.next()? {
                    b',' => {}
                    b'}' => return Ok(Json::Obj(members)),
                    b => return Err(format!("unexpected {:?} in object", b as char)),
                }
            }
        }

        fn array(&mut self) -> Result<Json, String> {
            self.expect(b'[')?;
            let mut items = Vec::new();
            self.skip_ws();
            if self.peek() == Some(b']') {
                self.pos += 1;
                return Ok(Json::Arr(items));
            }
            loop {
                items.push(self.value()?);
                self.skip_ws();
                match self.next()? {
                    b',' => {}
                    b']' => return Ok(Json::Arr(items)),
                    b => return Err(format!("unexpected {:?} in array", b as char)),
                }
            }
        }

        fn digits(&mut self) -> usize {
            let start = self.pos;
            while matches!(self.peek(), Some(b'0'..=b'9')) {
                self.pos += 1;
            }
            self.pos - start
        }

        fn number(&mut self) -> Result<Json, String> {
            let start = self.pos;
            if self.peek() == Some(b'-') {
                self.pos += 1;
            }
            let first = self.peek();
            match self.digits() {
                0 => return Err("a number needs digits".into()),
                n if n > 1 && first == Some(b'0') => return Err("leading zero".into()),
                _ => {}
            }
            if self.peek() == Some(b'.') {
                self.pos += 1;
                if self.digits() == 0 {
                    return Err("a fraction needs digits".into());
                }
            }
            if matches!(self.peek(), Some(b'e' | b'E')) {
                self.pos += 1;
                if matches!(self.peek(), Some(b'+' | b'-')) {
                    self.pos += 1;
                }
                if self.digits() == 0 {
                    return Err("an exponent needs digits".into());
                }
            }
            let text =
                std::str::from_utf8(&self.bytes[start..self.pos]).map_err(|e| e.to_string())?;
            text.parse()
                .map(Json::Num)
                .map_err(|e| format!("{text}: {e}"))
        }

        fn hex4(&mut self) -> Result<u32, String> {
            let mut v = 0;
            for _ in 0..4 {
                let digit = char::from(self.next()?)
                    .to_digit(16)
                    .ok_or("bad \\u escape")?;
                v = v * 16 + digit;
            }
            Ok(v)
        }

        fn string(&mut self) -> Result<String, String> {
            self.expect(b'"')?;
            let mut out = Vec::new();
            loop {
                match self.next()? {
                    b'"' => return String::from_utf8(out).map_err(|e| e.to_string()),
                    b'\\' => {
                        let c = match self.next()? {
                            b'"' => '"',
                            b'\\' => '\\',
                            b'/' => '/',
                            b'b' => '\u{8}',
                            b'f' => '\u{c}',
                            b'n' => '\n',
                            b'r' => '\r',
                            b't' => '\t',
                            b'u' => {
                                let hi = self.hex4()?;
                                let code = if (0xD800..0xDC00).contains(&hi) {
                                    self.expect(b'\\')?;
                                    self.expect(b'u')?;
                                    let lo = self.hex4()?;
                                    if !(0xDC00..0xE000).contains(&lo) {
                                        return Err("unpaired surrogate".into());
                                    }
                                    0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                                } else {
                                    hi
                                };
                                char::from_u32(code).ok_or("unpaired surrogate")?
                            }
                            b => return Err(format!("bad escape \\{}", b as char)),
                        };
                        out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                    }
                    b if b < 0x20 => return Err(format!("raw control byte {b:#04x} in a string")),
                    b => out.push(b),
                }
            }
        }
    }
}
