//! The answers the layer gives instead of calling the service: 429, 403, 503, 401, 400 and 500,
//! each with an `application/problem+json` body saying why.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use tollgate_core::Decision;

use super::policy::LimitInfo;
use crate::http::headers::{self, HeaderMode};
use crate::http::problem;

fn problem_response(status: StatusCode, body: String) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(problem::PROBLEM_CONTENT_TYPE),
    );
    response
}

/// 429: the request was denied by the limits named in `violated`; `binding` is the one the
/// headers report, `decision` its decision (with the time until a retry can pass).
pub(crate) fn too_many_requests(
    violated: &[&str],
    binding: &LimitInfo,
    mode: HeaderMode,
    decision: &Decision,
) -> Response<Bytes> {
    let mut response = problem_response(
        StatusCode::TOO_MANY_REQUESTS,
        problem::problem_json(violated, decision.retry_after),
    );
    binding
        .headers
        .insert(response.headers_mut(), mode, decision);
    response
}

/// 429 for a full concurrency cap: `Retry-After` (a second: nobody can know when a request in
/// flight ends) and a problem body naming the policies, without rate-limit headers (the cap is
/// not a rate).
pub(crate) fn too_many_in_flight(violated: &[&str], retry: Duration) -> Response<Bytes> {
    let mut response = problem_response(
        StatusCode::TOO_MANY_REQUESTS,
        problem::problem_json(violated, retry),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, headers::retry_after_header(retry));
    response
}

/// 403: a request costing more than one of its limits can ever hold. Waiting never helps, so it
/// is not a 429 (whose `Retry-After` promises a pass).
pub(crate) fn too_costly(cost: u32, limit: &str, capacity: u32) -> Response<Bytes> {
    let detail = format!(
        "This request costs {cost}, more than the policy \"{limit}\" can ever allow ({capacity} at once)."
    );
    problem_response(
        StatusCode::FORBIDDEN,
        problem::problem(403, "Request Too Costly", &detail),
    )
}

/// 503: the store cannot be reached and the failure policy refuses; `retry` is when to try again.
pub(crate) fn unavailable(retry: Duration) -> Response<Bytes> {
    let mut response = problem_response(
        StatusCode::SERVICE_UNAVAILABLE,
        problem::problem(
            503,
            "Service Unavailable",
            "The rate limiter cannot reach its store; try again shortly.",
        ),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, headers::retry_after_header(retry));
    response
}

/// 401: the request's credentials are not known.
pub(crate) fn unauthorized(detail: &str) -> Response<Bytes> {
    let mut response = problem_response(
        StatusCode::UNAUTHORIZED,
        problem::problem(401, "Unauthorized", detail),
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// 400: the request is ambiguous about who it is.
pub(crate) fn bad_request(detail: &str) -> Response<Bytes> {
    problem_response(
        StatusCode::BAD_REQUEST,
        problem::problem(400, "Bad Request", detail),
    )
}

/// 500: the request cannot be decided as the server is set up; `detail` says the fix.
pub(crate) fn misconfigured(detail: &str) -> Response<Bytes> {
    problem_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        problem::problem(500, "Rate Limiter Misconfigured", detail),
    )
}
