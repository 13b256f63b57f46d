//! The `application/problem+json` bodies (RFC 9457) of the answers a limiter gives: the 429 of
//! a denial, and the other statuses (401 of an unknown key, 503 of `fail_closed`, ...).
//!
//! The writer is our own rather than serde_json: the bodies have a fixed shape of a handful of
//! members, tollgate has no JSON dependency outside its tests (which check every body with
//! serde_json), and a denial is written without an intermediate value tree.
//!
//! # Rate limited
//!
//! A denied request is answered with status 429 and a problem-details body (RFC 9457) of type
//! [`PROBLEM_CONTENT_TYPE`], built by [`problem_json`]:
//!
//! ```json
//! {
//!   "type": "https://docs.rs/tollgate/latest/tollgate/http/problem/index.html#rate-limited",
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

use std::fmt::Write as _;
use std::time::Duration;

use super::headers::retry_after_secs;

/// The media type of the body of a 429: `application/problem+json` (RFC 9457).
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// The `type` member of the body of a 429: the URI of the [section](self#rate-limited) of these
/// docs that describes it (the page of this module on docs.rs).
pub const PROBLEM_TYPE: &str =
    "https://docs.rs/tollgate/latest/tollgate/http/problem/index.html#rate-limited";

/// The `title` member of the body of a 429.
pub const PROBLEM_TITLE: &str = "Too Many Requests";

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
/// seconds, the same value [`retry_after_header`](super::headers::retry_after_header) gives. See the
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
mod tests;
