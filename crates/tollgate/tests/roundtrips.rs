//! Property tests: every parser that has a serialiser reads back what it wrote (issue 12). What
//! the inbound layer sends, the outbound layer understands; what a proxy chain writes, the
//! forwarding walk attributes to the right client.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod common;

use http::{HeaderMap, HeaderValue, StatusCode};
use proptest::prelude::*;
use tollgate::core::{Decision, Outcome, Quota};
use tollgate::http::forwarded::{ForwardedHeader, IpNet, TrustedProxies, client_ip, parse_cidr};
use tollgate::http::headers::{
    HeaderMode, RateLimitInfo, ceil_secs, insert_headers, retry_after_header, retry_after_secs,
};
use tollgate::outbound::{parse_http_date, parse_retry_after, signal};

fn any_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u16; 8]>().prop_map(IpAddr::from),
    ]
}

/// Addresses outside 10/8 (the trusted proxies below), IPv4-mapped IPv6 of 10/8 included.
fn client() -> impl Strategy<Value = IpAddr> {
    let trusted = TrustedProxies::parse(["10.0.0.0/8"]).expect("a block");
    any_ip().prop_filter("not a trusted proxy", move |ip| !trusted.contains(*ip))
}

fn proxy() -> impl Strategy<Value = IpAddr> {
    (any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(a, b, c)| IpAddr::from([10, a, b, c]))
}

/// How a hop is written: with a port or not, bracketed IPv6, padding.
fn written(ip: IpAddr, port: Option<u16>, forwarded: bool) -> String {
    let node = match (ip, port) {
        (IpAddr::V4(a), Some(p)) => format!("{a}:{p}"),
        (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, None) => a.to_string(),
    };
    if forwarded {
        format!("for=\"{node}\"")
    } else {
        node
    }
}

proptest! {
    #[test]
    fn cidr_display_parses_back(ip in any_ip(), prefix in 0u8..=128) {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let cidr = IpNet::new(ip, prefix.min(max)).expect("a valid prefix").trunc();
        let back = parse_cidr(&cidr.to_string()).expect("its own display parses");
        prop_assert_eq!(back, cidr);
        // A block given with host bits set is the same block.
        let written = format!("{ip}/{}", prefix.min(max));
        prop_assert_eq!(parse_cidr(&written).expect("a valid block"), cidr);
        prop_assert!(TrustedProxies::parse([written]).expect("a valid block").contains(ip));
    }

    /// Untrusted hops, then a chain of trusted proxies, each appending: the walk finds the last
    /// untrusted hop (the client the first trusted proxy saw), whichever header the proxies write
    /// and however the hops are written.
    #[test]
    fn the_walk_finds_the_client_the_proxies_saw(
        forged in prop::collection::vec(client(), 0..4),
        real in client(),
        chain in prop::collection::vec(proxy(), 0..6),
        ports in prop::collection::vec(prop::option::of(any::<u16>()), 11),
        forwarded in any::<bool>(),
        split in any::<bool>(),
    ) {
        let header = if forwarded { ForwardedHeader::Forwarded } else { ForwardedHeader::XForwardedFor };
        let trusted = TrustedProxies::parse(["10.0.0.0/8"]).expect("a block").with_header(header);
        let hops: Vec<String> = forged
            .iter()
            .chain(std::iter::once(&real))
            .chain(&chain)
            .zip(&ports)
            .map(|(ip, port)| written(*ip, *port, forwarded))
            .collect();
        let mut headers = HeaderMap::new();
        if split {
            // Each proxy's entry in its own header instance.
            for hop in &hops {
                headers.append(header.as_str(), HeaderValue::from_str(hop).expect("ASCII"));
            }
        } else {
            headers.append(header.as_str(), HeaderValue::from_str(&hops.join(", ")).expect("ASCII"));
        }
        let peer = IpAddr::from([10, 0, 0, 1]);
        prop_assert_eq!(client_ip(peer, &headers, &trusted), real);
        // The other header is never believed.
        let other = if forwarded { "x-forwarded-for" } else { "forwarded" };
        let mut forged_only = HeaderMap::new();
        forged_only.append(other, HeaderValue::from_str(&hops.join(", ")).expect("ASCII"));
        prop_assert_eq!(client_ip(peer, &forged_only, &trusted), peer);
    }

    /// `Retry-After` as the inbound layer writes it, read by the outbound layer: the same whole
    /// seconds, rounded up, never 0.
    #[test]
    fn retry_after_reads_back(micros in 0u64..10_000_000_000) {
        let d = Duration::from_micros(micros);
        let value = retry_after_header(d);
        let read = parse_retry_after(value.to_str().expect("ASCII"), SystemTime::now())
            .expect("its own value parses");
        prop_assert_eq!(read, Duration::from_secs(retry_after_secs(d)));
        prop_assert!(read >= d && read >= Duration::from_secs(1));
    }

    /// An HTTP-date written as RFC 9110 says senders must is read back to the second.
    #[test]
    fn http_dates_read_back(secs in 0u64..253_402_300_799) {
        let at = UNIX_EPOCH + Duration::from_secs(secs);
        let text = httpdate_fmt(at);
        prop_assert_eq!(parse_http_date(&text), Some(at));
    }

    /// The headers of a denial, as the inbound layer writes them in any mode, make an outbound
    /// client pause exactly until the quota would let a request through again.
    #[test]
    fn a_denial_written_is_a_pause_read(
        limit in 1u32..1_000,
        reset_ms in 1u64..3_600_000,
        retry_ms in 1u64..3_600_000,
        mode in prop::sample::select(vec![HeaderMode::Ietf, HeaderMode::Legacy, HeaderMode::Both]),
    ) {
        let quota = Quota::per_hour(limit).expect("a quota");
        let decision = Decision {
            outcome: Outcome::Denied,
            limit,
            remaining: 0,
            reset_after: Duration::from_millis(reset_ms),
            retry_after: Duration::from_millis(retry_ms),
            delay: Duration::ZERO,
        };
        let mut headers = HeaderMap::new();
        let info = RateLimitInfo { policy: "basic", quota: &quota, decision: &decision };
        insert_headers(&mut headers, mode, &info);
        let got = signal(StatusCode::TOO_MANY_REQUESTS, &headers, SystemTime::now())
            .expect("a 429 is a signal");
        prop_assert!(got.limited);
        // The longest of what the headers say: Retry-After, and the reset of the spent quota.
        let expected = Duration::from_secs(
            retry_after_secs(decision.retry_after).max(ceil_secs(decision.reset_after)),
        );
        prop_assert_eq!(got.pause, expected);
    }
}

/// An IMF-fixdate, as senders must write it.
fn httpdate_fmt(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
    let (year, month, day, weekday) = common::civil(secs);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        &common::WEEKDAYS[weekday as usize][..3],
        common::MONTHS[(month - 1) as usize],
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}
