//! Configuration errors point at the line the YAML parser gives the field, wherever it is in the
//! file: no search of the text for a name that may also be somewhere else (a route `/api` is not
//! the line of `/api/reports`, a tier's missing field is not the next tier's).

use tollgate::config::{Config, ConfigError};

fn err(text: &str) -> ConfigError {
    match Config::parse(text, "limits.yaml") {
        Ok(_) => panic!("loaded, though it should not:\n{text}"),
        Err(e) => e,
    }
}

/// The error's (line, field), after checking that its text says `limits.yaml:LINE: FIELD`.
fn at(e: &ConfigError) -> (Option<usize>, Option<&str>) {
    if let (Some(line), Some(field)) = (e.line, &e.field) {
        assert!(
            e.to_string()
                .starts_with(&format!("limits.yaml:{line}: {field}: ")),
            "{e}"
        );
    }
    (e.line, e.field.as_deref())
}

/// The 1-based line of the first line of `text` containing `marker` (the tests' own way to say
/// which line they mean; the code under test never searches text).
fn line_with(text: &str, marker: &str) -> usize {
    text.lines()
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no line with {marker:?}"))
        + 1
}

/// Tiers, routes and keys enough to push the interesting line far down.
fn filler_tiers(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "  tier{i}: {{ requests_per_minute: {}, burst_limit: 5 }}\n",
                i + 10
            )
        })
        .collect()
}

#[test]
fn a_route_after_a_longer_one_with_the_same_start() {
    let text = format!(
        "rate_limits:\n  anonymous: {{ requests_per_minute: 10, burst_limit: 5 }}\n{}\
         routes:\n  - {{ method: POST, path: /api/reports, cost: 2 }}\n  \
         - {{ path: /api/reports/daily, cost: 1 }}\n  - {{ path: /api, cost: 50 }} # here\n",
        filler_tiers(30)
    );
    let e = err(&text);
    assert_eq!(
        at(&e),
        (Some(line_with(&text, "# here")), Some("routes[2].cost")),
        "{e}"
    );
    assert!(
        e.message.contains("more than any tier can ever allow"),
        "{e}"
    );
}

#[test]
fn a_route_whose_path_is_given_twice_for_two_methods() {
    // Same path, two methods: the second route is the bad one.
    let text = "rate_limits:\n  anonymous: { requests_per_minute: 10, burst_limit: 5 }\nroutes:\n  \
                - { method: GET, path: /api, cost: 1 }\n  - { method: POST, path: /api, cost: 9 }\n";
    assert_eq!(at(&err(text)), (Some(5), Some("routes[1].cost")));
    let e = err(&text.replace("method: POST", "method: \"NOT A METHOD\""));
    assert_eq!(at(&e), (Some(5), Some("routes[1].method")), "{e}");
}

#[test]
fn a_block_route_whose_cost_comes_before_its_path() {
    let text = "rate_limits:\n  anonymous: { requests_per_minute: 10, burst_limit: 5 }\n\
                routes:\n  - method: POST\n    cost: 50\n    path: /api\n  - path: /api/search\n    cost: 1\n";
    assert_eq!(at(&err(text)), (Some(5), Some("routes[0].cost")));
    // A limit the route's cost does not fit in: the route's own `cost` line, not the next one's.
    let text = "rate_limits:\n  anonymous: { requests_per_minute: 100, burst_limit: 50 }\n\
                routes:\n  - path: /a\n    limit:\n      requests_per_minute: 10\n      burst_limit: 2\n    \
                cost: 3\n  - path: /b\n    cost: 3\n";
    assert_eq!(at(&err(text)), (Some(8), Some("routes[0].cost")));
    // A route path that is not one, in block style.
    let text = "rate_limits:\n  anonymous: { requests_per_minute: 10, burst_limit: 5 }\n\
                routes:\n  - path: /fine\n  - cost: 1\n    path: api/oops\n";
    assert_eq!(at(&err(text)), (Some(6), Some("routes[1].path")));
}

#[test]
fn a_field_missing_from_a_tier_far_down() {
    // `pro` has a `limit` and no `window`; the next tier has a `window`. The error is at `pro`.
    let text = format!(
        "rate_limits:\n  anonymous: {{ requests_per_minute: 10, burst_limit: 5 }}\n{}\
         \x20 pro:\n    limit: 30\n    algorithm: fixed_window\n  \
         windowed:\n    limit: 30\n    window: 10s\n    algorithm: fixed_window\n",
        filler_tiers(40)
    );
    let e = err(&text);
    assert_eq!(
        at(&e),
        (
            Some(line_with(&text, "  pro:")),
            Some("rate_limits.pro.window")
        ),
        "{e}"
    );
    assert!(e.message.contains("needs a `window`"), "{e}");
}

#[test]
fn a_field_of_a_tier_far_down_whose_name_is_elsewhere_too() {
    // The tier `slack` is also a limit name, and its bad `max_delay` is the file's second.
    let text = format!(
        "limits:\n  slack: {{ requests_per_second: 1, burst_limit: 20, algorithm: leaky_bucket, max_delay: 1s }}\n\
         rate_limits:\n  anonymous: {{ requests_per_minute: 10, burst_limit: 5 }}\n{}\
         \x20 slack:\n    requests_per_second: 1\n    max_delay: 2s # here\n",
        filler_tiers(25)
    );
    let e = err(&text);
    assert_eq!(
        at(&e),
        (
            Some(line_with(&text, "# here")),
            Some("rate_limits.slack.max_delay")
        ),
        "{e}"
    );
    assert!(e.message.contains("leaky_bucket"), "{e}");
}

#[test]
fn an_api_key_as_the_parser_reads_it() {
    // Quoted and escaped: the key is `key-A`, written `"key-\x41"`.
    let text = "rate_limits:\n  anonymous: { requests_per_minute: 10, burst_limit: 5 }\napi_keys:\n  \
                key-a: { user: key-A, tier: anonymous }\n  'key-b': { user: b, tier: anonymous }\n  \
                \"key-\\x41\": { user: a, tier: gold }\n";
    let e = err(text);
    assert_eq!(at(&e), (Some(6), Some("api_keys.key-A.tier")), "{e}");
    assert!(e.message.contains("unknown tier `gold`"), "{e}");
}

#[test]
fn a_trusted_proxy_is_found_by_its_place_in_the_list() {
    let text = "rate_limits:\n  anonymous: { requests_per_minute: 10, burst_limit: 5 }\n\
                trusted_proxies:\n  - 10.0.0.0/8\n  - 10.0.0.0/33\n";
    let e = err(text);
    assert_eq!(at(&e), (Some(5), Some("trusted_proxies[1]")), "{e}");
}

#[test]
fn a_key_given_twice_is_found_at_its_second_occurrence() {
    let tiers = filler_tiers(20);
    // A tier, in block style, far down.
    let text = format!(
        "rate_limits:\n  anonymous: {{ requests_per_minute: 10, burst_limit: 5 }}\n{tiers}\
         \x20 tier3: {{ requests_per_minute: 99999 }} # again\n"
    );
    let e = err(&text);
    assert_eq!(
        at(&e),
        (Some(line_with(&text, "# again")), Some("rate_limits")),
        "{e}"
    );
    assert!(e.message.contains("`tier3` is given twice"), "{e}");
    // An API key, the second one on a line of its own, in flow style.
    let text = "rate_limits:\n  anonymous: { requests_per_minute: 10, burst_limit: 5 }\n\
                api_keys: { k1: { user: a, tier: anonymous },\n  k2: { user: b, tier: anonymous },\n  \
                k1: { user: c, tier: anonymous } }\n";
    let e = err(text);
    assert_eq!(at(&e), (Some(5), Some("api_keys")), "{e}");
    // A field of a route, flow style.
    let text = "rate_limits:\n  anonymous: { requests_per_minute: 10, burst_limit: 5 }\n\
                routes:\n  - { path: /a }\n  - { path: /b, cost: 1,\n      path: /c }\n";
    let e = err(text);
    assert_eq!(at(&e), (Some(6), Some("routes[1]")), "{e}");
    assert!(e.message.contains("`path` is given twice"), "{e}");
    // A top-level section.
    let text = "shadow: false\nrate_limits:\n  anonymous: { requests_per_minute: 10, burst_limit: 5 }\n\
                shadow: true\n";
    let e = err(text);
    assert_eq!(e.line, Some(4), "{e}");
    assert!(e.message.contains("`shadow` is given twice"), "{e}");
    // The store's `redis`, and a field of it.
    let text = "store:\n  redis: { url: \"redis://a\" }\n  redis: { url: \"redis://b\" }\n\
                rate_limits:\n  anonymous: { requests_per_minute: 10, burst_limit: 5 }\n";
    let e = err(text);
    assert_eq!(at(&e), (Some(3), Some("store")), "{e}");
    assert!(e.message.contains("`redis` is given twice"), "{e}");
    let text = "store:\n  redis:\n    url: \"redis://a\"\n    prefix: x\n    url: \"redis://b\"\n\
                rate_limits:\n  anonymous: { requests_per_minute: 10, burst_limit: 5 }\n";
    let e = err(text);
    assert_eq!(at(&e), (Some(5), Some("store.redis")), "{e}");
}

#[test]
fn line_ends_crlf_and_lone_cr_are_counted_as_the_parser_counts_them() {
    let text = format!(
        "rate_limits:\n  anonymous: {{ requests_per_minute: 10, burst_limit: 5 }}\n{}\
         \x20 pro:\n    limit: 30\n    algorithm: fixed_window\n\
         routes:\n  - {{ path: /api/reports, cost: 2 }}\n  - {{ path: /api, cost: 50 }}\n\
         api_keys:\n  k: {{ user: u, tier: pro }}\n",
        filler_tiers(10)
    );
    let pro = line_with(&text, "  pro:");
    let api = line_with(&text, "/api,");
    let key = line_with(&text, "user: u");
    for eol in ["\n", "\r\n", "\r"] {
        let text = text.replace('\n', eol);
        // Found after reading: the missing window, then the route's cost.
        assert_eq!(
            at(&err(&text)),
            (Some(pro), Some("rate_limits.pro.window")),
            "{eol:?}"
        );
        let text = text.replace(
            &format!("limit: 30{eol}"),
            &format!("limit: 30{eol}    window: 1m{eol}"),
        );
        assert_eq!(
            at(&err(&text)),
            (Some(api + 1), Some("routes[1].cost")),
            "{eol:?}"
        );
        // Found while reading: a key given twice.
        let first = format!("  k: {{ user: u, tier: pro }}{eol}");
        let text = text.replace("cost: 50", "cost: 5").replace(
            &first,
            &format!("{first}  k: {{ user: v, tier: pro }}{eol}"),
        );
        assert_eq!(
            at(&err(&text)),
            (Some(key + 2), Some("api_keys")),
            "{eol:?}"
        );
    }
}

#[test]
fn an_error_in_a_tier_given_by_an_alias_is_at_the_alias() {
    // `zeta` defines a limit without a window and `alpha` (checked first) reuses it: the error
    // is alpha's, at alpha's line.
    let text = "rate_limits:\n  anonymous: { requests_per_minute: 10, burst_limit: 5 }\n  \
                zeta: &bad { limit: 3, algorithm: fixed_window }\n  alpha: *bad\n";
    let e = err(text);
    assert_eq!(at(&e), (Some(4), Some("rate_limits.alpha.window")), "{e}");
}
