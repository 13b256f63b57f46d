//! The forwarding-header walk: any bytes in `X-Forwarded-For` / `Forwarded` give an address,
//! never a panic; an untrusted peer is always answered as itself; the answer is the peer or an
//! address that appears in the believed header.

#![no_main]

use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tollgate::http::forwarded::{ForwardedHeader, TrustedProxies, client_ip};
use tollgate::http::key::ip_key;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let header = if selector & 1 == 0 {
        ForwardedHeader::XForwardedFor
    } else {
        ForwardedHeader::Forwarded
    };
    let trusted = match selector >> 1 & 3 {
        0 => Ok(TrustedProxies::none()),
        1 => TrustedProxies::parse(["127.0.0.1/32"]),
        2 => TrustedProxies::parse(["10.0.0.0/8", "fd00::/8", "127.0.0.1"]),
        _ => TrustedProxies::parse(["0.0.0.0/0", "::/0"]),
    }
    .expect("valid blocks")
    .with_header(header);
    let peer: IpAddr = if selector & 8 == 0 {
        "127.0.0.1".parse().expect("an address")
    } else {
        "10.1.2.3".parse().expect("an address")
    };
    // Values separated by a 0 byte become separate header instances, alternately of the believed
    // header and of X-Forwarded-For.
    let mut headers = HeaderMap::new();
    for (i, part) in rest.split(|&b| b == 0).enumerate() {
        if let Ok(value) = HeaderValue::from_bytes(part) {
            let name = if i % 2 == 0 {
                header.as_str()
            } else {
                "x-forwarded-for"
            };
            headers.append(name, value);
        }
    }
    let ip = client_ip(peer, &headers, &trusted);
    if !trusted.contains(peer) {
        assert_eq!(ip, peer);
    }
    let _ = ip_key(ip, 64);
});
