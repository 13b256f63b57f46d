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
fn uneven_rates_do_not_gain_a_second_of_window() {
    let cases = [
        (Quota::per_second(3).unwrap(), "q=3;w=1"),
        (Quota::per_minute(7).unwrap(), "q=7;w=60"),
        (Quota::per_second(1000).unwrap(), "q=1000;w=1"),
        (
            Quota::per_minute(100).unwrap().with_burst(20).unwrap(),
            "q=20;w=12",
        ),
        (Quota::per_hour(5).unwrap(), "q=5;w=3600"),
    ];
    for (quota, expected) in cases {
        let fixed = PolicyHeaders::new("p", &quota);
        let mut headers = HeaderMap::new();
        fixed.insert(
            &mut headers,
            HeaderMode::Ietf,
            &decision(Outcome::Allowed, 1, 0, 0),
        );
        assert_eq!(
            headers[&RATELIMIT_POLICY].to_str().unwrap(),
            format!("\"p\";{expected}"),
            "{quota:?}"
        );
    }
}

#[test]
fn digits_are_decimal_at_every_width() {
    let mut cases: Vec<u64> = vec![
        0,
        9,
        10,
        99,
        100,
        999,
        1000,
        1001,
        999_999,
        1_000_000,
        u64::MAX,
    ];
    for exp in 0..20 {
        let p = 10u64.pow(exp);
        cases.extend([
            p.saturating_sub(1),
            p,
            p.saturating_add(1),
            p.saturating_mul(7) / 3,
        ]);
    }
    for n in cases {
        let mut buf = [0; 20];
        assert_eq!(digits(n, &mut buf), n.to_string().as_bytes(), "{n}");
    }
}

proptest::proptest! {
    #[test]
    fn digits_match_to_string(n: u64) {
        let mut buf = [0; 20];
        let expected = n.to_string();
        proptest::prop_assert_eq!(digits(n, &mut buf), expected.as_bytes());
    }
}
