use serde_json::{Value, json};

use super::*;

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{body:?} is not JSON: {e}"))
}

#[test]
fn problem_json_has_the_members() {
    let body = problem_json(&["basic"], Duration::from_millis(1_200));
    assert_eq!(
        parse(&body),
        json!({
            "type": PROBLEM_TYPE,
            "title": "Too Many Requests",
            "status": 429,
            "detail": "The rate limit of policy \"basic\" was exceeded; retry in 2 seconds.",
            "violated-policies": ["basic"],
            "retry_after": 2,
        })
    );
    // `type` comes first (a JSON value compares without order, so check the text).
    assert!(body.starts_with("{\"type\":"), "{body}");
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
        let json = parse(&body);
        assert_eq!(json["violated-policies"], json!(names), "{body}");
        assert_eq!(json["retry_after"], json!(secs), "{body}");
        assert_eq!(json["status"], json!(429), "{body}");
        let detail = json["detail"].as_str().expect("detail is a string");
        assert!(
            detail.contains(&format!("retry in {secs} second")),
            "{detail}"
        );
        for name in names {
            assert!(detail.contains(name), "{detail}");
        }
    }
    let none = parse(&problem_json(&[], Duration::from_secs(1)));
    assert_eq!(none["violated-policies"], json!([]));
    assert_eq!(
        none["detail"],
        json!("The rate limit was exceeded; retry in 1 second.")
    );
}

#[test]
fn other_statuses_are_about_blank() {
    let body = problem(401, "Unauthorized", "unknown API key \"k\\1\"\n");
    assert_eq!(
        parse(&body),
        json!({
            "type": "about:blank",
            "title": "Unauthorized",
            "status": 401,
            "detail": "unknown API key \"k\\1\"\n",
        })
    );
}
