use super::*;
use http::HeaderValue;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cidr(s: &str) -> IpNet {
    parse_cidr(s).unwrap()
}

fn holds_ip(net: &str, addr: &str) -> bool {
    holds(&cidr(net), ip(addr))
}

/// Trusts loopback, 10/8 and fd00::/8, which write `X-Forwarded-For`.
fn proxies() -> TrustedProxies {
    TrustedProxies::parse(&["127.0.0.1", "10.0.0.0/8", "fd00::/8"]).unwrap()
}

/// The same proxies, writing `Forwarded`.
fn fwd_proxies() -> TrustedProxies {
    proxies().with_header(ForwardedHeader::Forwarded)
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(*name, HeaderValue::from_str(value).unwrap());
    }
    map
}

fn xff(value: &str) -> HeaderMap {
    headers(&[("x-forwarded-for", value)])
}

fn fwd(value: &str) -> HeaderMap {
    headers(&[("forwarded", value)])
}

const PROXY: &str = "10.0.0.1";

// --- Address blocks ---------------------------------------------------------------------------------

#[test]
fn cidr_parses_blocks_and_bare_addresses() {
    assert_eq!(cidr("127.0.0.1/32").to_string(), "127.0.0.1/32");
    assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
    assert_eq!(cidr("::1/128").to_string(), "::1/128");
    assert_eq!(cidr("fd00::/8").to_string(), "fd00::/8");
    assert_eq!(cidr("192.0.2.1").to_string(), "192.0.2.1/32");
    assert_eq!(cidr("2001:db8::1").to_string(), "2001:db8::1/128");
    assert_eq!(cidr(" 10.1.2.3/8 ").to_string(), "10.0.0.0/8");
    assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
    assert_eq!(cidr("::/0").prefix_len(), 0);
    assert_eq!(cidr("10.0.0.0/8").addr(), ip("10.0.0.0"));
}

#[test]
fn cidr_rejects_garbage_with_a_clear_message() {
    for bad in [
        "",
        "/8",
        "10.0.0.0/",
        "10.0.0.0/33",
        "::/129",
        "10.0.0.0/-1",
        "10.0.0.0/+8",
        "10.0.0.0/8/8",
        "10.0.0.0/ 8",
        "10.0.0.0/99999",
        "hello",
        "10.0.0/8",
        "[::1]/128",
        "10.0.0.0/1000",
    ] {
        let err = parse_cidr(bad).unwrap_err();
        assert_eq!(err.input(), bad);
        let msg = err.to_string();
        assert!(msg.starts_with("invalid CIDR "), "{msg}");
        assert!(msg.contains(&format!("{bad:?}")), "{msg}");
        assert!(msg.chars().next().unwrap().is_lowercase());
    }
    assert_eq!(
        parse_cidr("10.0.0.0/33").unwrap_err().to_string(),
        r#"invalid CIDR "10.0.0.0/33": the prefix length 33 is longer than 32"#
    );
    assert_eq!(
        parse_cidr("nope").unwrap_err().to_string(),
        r#"invalid CIDR "nope": expected an IP address, optionally followed by /PREFIX"#
    );
}

#[test]
fn cidr_contains() {
    let lan = cidr("10.0.0.0/8");
    assert!(holds(&lan, ip("10.0.0.0")));
    assert!(holds(&lan, ip("10.255.255.255")));
    assert!(!holds(&lan, ip("11.0.0.0")));
    assert!(!holds(&lan, ip("9.255.255.255")));
    assert!(!holds(&lan, ip("::a00:1")));

    let host = cidr("127.0.0.1");
    assert!(holds(&host, ip("127.0.0.1")));
    assert!(!holds(&host, ip("127.0.0.2")));

    let ula = cidr("fd00::/8");
    assert!(holds(&ula, ip("fd12:3456::1")));
    assert!(!holds(&ula, ip("fe80::1")));
    assert!(!holds(&ula, ip("10.0.0.1")));

    assert!(holds_ip("0.0.0.0/0", "203.0.113.7"));
    assert!(holds_ip("::/0", "2001:db8::1"));
}

#[test]
fn ipv4_mapped_addresses_match_ipv4_blocks() {
    assert!(holds_ip("10.0.0.0/8", "::ffff:10.1.2.3"));
    assert!(!holds_ip("10.0.0.0/8", "::ffff:11.1.2.3"));
    assert!(holds_ip("127.0.0.1", "::ffff:127.0.0.1"));
    // IPv4-compatible (deprecated) addresses are not IPv4.
    assert!(!holds_ip("0.0.0.0/0", "::1"));
    // And an IPv4 address is in the mapped IPv6 block.
    assert!(holds_ip("::ffff:0:0/96", "192.0.2.1"));
    let trusted = proxies();
    assert_eq!(
        client_ip(ip("::ffff:10.0.0.1"), &xff("203.0.113.7"), &trusted),
        ip("203.0.113.7")
    );
    assert_eq!(
        client_ip(ip(PROXY), &xff("203.0.113.7, ::ffff:10.0.0.2"), &trusted),
        ip("203.0.113.7")
    );
}

#[test]
fn trusted_proxies_construction() {
    assert!(TrustedProxies::none().is_empty());
    assert!(!TrustedProxies::none().contains(ip("127.0.0.1")));
    let t: TrustedProxies = [cidr("10.0.0.0/8"), cidr("::1")].into_iter().collect();
    assert_eq!(t.ranges().len(), 2);
    assert!(t.contains(ip("::1")));
    assert!(t.contains(ip("10.2.3.4")));
    let owned = vec![String::from("10.0.0.0/8"), String::from("::1")];
    assert_eq!(TrustedProxies::parse(&owned).unwrap(), t);
    let err = TrustedProxies::parse(&["10.0.0.0/8", "bogus/8"]).unwrap_err();
    assert_eq!(err.input(), "bogus/8");
    let mut t = TrustedProxies::none();
    t.extend([cidr("192.0.2.0/24")]);
    assert!(t.contains(ip("192.0.2.99")));
}

// --- client_ip ----------------------------------------------------------------------------

#[test]
fn forged_header_from_an_untrusted_peer_is_ignored() {
    let peer = ip("203.0.113.7");
    assert_eq!(client_ip(peer, &xff("1.2.3.4"), &proxies()), peer);
    assert_eq!(client_ip(peer, &fwd("for=1.2.3.4"), &fwd_proxies()), peer);
    // Trusting nobody ignores headers from loopback too.
    let lo = ip("127.0.0.1");
    assert_eq!(client_ip(lo, &xff("1.2.3.4"), &TrustedProxies::none()), lo);
}

#[test]
fn no_header_from_a_trusted_peer_is_the_peer() {
    let peer = ip(PROXY);
    assert_eq!(client_ip(peer, &HeaderMap::new(), &proxies()), peer);
    assert_eq!(client_ip(peer, &xff(""), &proxies()), peer);
    assert_eq!(client_ip(peer, &xff(" , ,"), &proxies()), peer);
}

#[test]
fn rightmost_untrusted_hop_wins() {
    let got = client_ip(ip(PROXY), &xff("6.6.6.6, 198.51.100.9"), &proxies());
    assert_eq!(got, ip("198.51.100.9"));
}

#[test]
fn chain_of_trusted_proxies_is_skipped() {
    let got = client_ip(
        ip(PROXY),
        &xff("6.6.6.6, 198.51.100.9, 10.0.0.3, 127.0.0.1,fd00::7"),
        &proxies(),
    );
    assert_eq!(got, ip("198.51.100.9"));
}

#[test]
fn all_trusted_gives_the_leftmost() {
    let got = client_ip(ip(PROXY), &xff("10.0.0.9, 10.0.0.3"), &proxies());
    assert_eq!(got, ip("10.0.0.9"));
}

#[test]
fn all_header_instances_are_read_in_order() {
    let h = headers(&[
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-for", "198.51.100.9, 10.0.0.4"),
        ("x-forwarded-for", "10.0.0.3"),
    ]);
    assert_eq!(client_ip(ip(PROXY), &h, &proxies()), ip("198.51.100.9"));
    let h = headers(&[
        ("x-forwarded-for", "198.51.100.9"),
        ("x-forwarded-for", "10.0.0.4"),
    ]);
    assert_eq!(client_ip(ip(PROXY), &h, &proxies()), ip("198.51.100.9"));
    let h = headers(&[
        ("forwarded", "for=198.51.100.9"),
        ("forwarded", "for=10.0.0.4"),
    ]);
    assert_eq!(client_ip(ip(PROXY), &h, &fwd_proxies()), ip("198.51.100.9"));
}

#[test]
fn only_the_header_the_proxies_write_is_read() {
    // Our proxy appended 198.51.100.9 to X-Forwarded-For; the client wrote its own Forwarded.
    let h = headers(&[
        ("x-forwarded-for", "198.51.100.9"),
        ("forwarded", "for=192.0.2.1;proto=https"),
    ]);
    assert_eq!(client_ip(ip(PROXY), &h, &proxies()), ip("198.51.100.9"));
    // The other way round for proxies that write Forwarded.
    let h = headers(&[
        ("x-forwarded-for", "192.0.2.1"),
        ("forwarded", "for=198.51.100.9;proto=https"),
    ]);
    assert_eq!(client_ip(ip(PROXY), &h, &fwd_proxies()), ip("198.51.100.9"));
    // Even when the believed header is missing, the other is not consulted.
    let h = headers(&[("x-forwarded-for", "192.0.2.1")]);
    assert_eq!(client_ip(ip(PROXY), &h, &fwd_proxies()), ip(PROXY));
    let h = headers(&[("forwarded", "for=192.0.2.1")]);
    assert_eq!(client_ip(ip(PROXY), &h, &proxies()), ip(PROXY));
    assert_eq!(
        "X-Forwarded-For".parse::<ForwardedHeader>(),
        Ok(ForwardedHeader::XForwardedFor)
    );
    assert!(
        "x-real-ip"
            .parse::<ForwardedHeader>()
            .unwrap_err()
            .contains("x-real-ip")
    );
}

#[test]
fn garbage_stops_the_walk_at_the_last_trusted_hop() {
    let t = proxies();
    for value in [
        "198.51.100.9, garbage, 10.0.0.3",
        "198.51.100.9, unknown, 10.0.0.3",
        "198.51.100.9, _hidden, 10.0.0.3",
        "198.51.100.9, 10.0.0.3:99999, 10.0.0.3",
        "198.51.100.9, 1.2.3.4:, 10.0.0.3",
        "198.51.100.9, fe80::1%eth0, 10.0.0.3",
        "198.51.100.9, [10.0.0.2], 10.0.0.3",
        "198.51.100.9, \"10.0.0.2\", 10.0.0.3",
    ] {
        assert_eq!(
            client_ip(ip(PROXY), &xff(value), &t),
            ip("10.0.0.3"),
            "{value}"
        );
    }
    // Garbage right at the end: the peer is the last trusted address.
    assert_eq!(
        client_ip(ip(PROXY), &xff("198.51.100.9, nonsense"), &t),
        ip(PROXY)
    );
    for value in [
        "for=198.51.100.9, for=unknown, for=10.0.0.3",
        "for=198.51.100.9, for=_hidden, for=10.0.0.3",
        "for=198.51.100.9, proto=https, for=10.0.0.3",
        "for=198.51.100.9, for=10.0.0.2;for=10.0.0.2, for=10.0.0.3",
        "for=198.51.100.9, for=\"10.0.0.2, for=10.0.0.3",
        "for=198.51.100.9, for, for=10.0.0.3",
        "for=198.51.100.9, =x;for=10.0.0.2, for=10.0.0.3",
        "for=198.51.100.9, for=\"10.0.0.2\"x, for=10.0.0.3",
    ] {
        let expected = if value.contains("\"10.0.0.2, ") {
            // The unterminated quote swallows the rest: the last element is garbage.
            ip(PROXY)
        } else {
            ip("10.0.0.3")
        };
        assert_eq!(
            client_ip(ip(PROXY), &fwd(value), &fwd_proxies()),
            expected,
            "{value}"
        );
    }
}

#[test]
fn ports_are_accepted() {
    let t = proxies();
    assert_eq!(
        client_ip(ip(PROXY), &xff("203.0.113.7:8080"), &t),
        ip("203.0.113.7")
    );
    assert_eq!(
        client_ip(ip(PROXY), &xff("[2001:db8::1]:443, 10.0.0.2:1"), &t),
        ip("2001:db8::1")
    );
    assert_eq!(
        client_ip(ip(PROXY), &xff("[2001:db8::1]"), &t),
        ip("2001:db8::1")
    );
    assert_eq!(
        client_ip(ip(PROXY), &xff("2001:db8::1"), &t),
        ip("2001:db8::1")
    );
    assert_eq!(
        client_ip(ip(PROXY), &fwd("for=\"203.0.113.7:_port\""), &fwd_proxies()),
        ip("203.0.113.7")
    );
}

#[test]
fn forwarded_syntax_variants() {
    let t = fwd_proxies();
    let cases = [
        ("for=\"[2001:db8::1]:80\"", "2001:db8::1"),
        ("for=\"[2001:db8::1]\"", "2001:db8::1"),
        ("For=203.0.113.7", "203.0.113.7"),
        ("FOR=\"203.0.113.7\"", "203.0.113.7"),
        ("proto=https;for=203.0.113.7;by=10.0.0.1", "203.0.113.7"),
        ("host=\"a;b,c\";for=203.0.113.7", "203.0.113.7"),
        ("for=198.51.100.1, for=203.0.113.7", "203.0.113.7"),
        ("for=198.51.100.1,for=203.0.113.7;proto=http", "203.0.113.7"),
        ("  for = 203.0.113.7 ;  proto=http  ", "203.0.113.7"),
        ("for=203.0.113.7,, ,for=10.0.0.5,", "203.0.113.7"),
        ("for=\"\\203.0.113.7\"", "203.0.113.7"),
        ("for=203.0.113.7;;", "203.0.113.7"),
        ("for=203.0.113.7, for=\"[fd00::1]:8443\"", "203.0.113.7"),
    ];
    for (value, expected) in cases {
        assert_eq!(
            client_ip(ip(PROXY), &fwd(value), &t),
            ip(expected),
            "{value}"
        );
    }
}

#[test]
fn whitespace_and_empty_entries_are_tolerated() {
    let t = proxies();
    assert_eq!(
        client_ip(ip(PROXY), &xff(" \t203.0.113.7 ,,\t, 10.0.0.2 , "), &t),
        ip("203.0.113.7")
    );
    let h = headers(&[
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-for", ""),
        ("x-forwarded-for", ","),
    ]);
    assert_eq!(client_ip(ip(PROXY), &h, &t), ip("203.0.113.7"));
}

#[test]
fn non_utf8_header_bytes_do_not_panic() {
    for name in ["x-forwarded-for", "forwarded"] {
        let t = if name == "forwarded" {
            fwd_proxies()
        } else {
            proxies()
        };
        let mut h = HeaderMap::new();
        let v = HeaderValue::from_bytes(b"203.0.113.7, \xff\xfe10.0.0.2, 10.0.0.3").unwrap();
        h.append(name, v);
        assert_eq!(
            client_ip(ip(PROXY), &h, &t),
            ip(if name == "forwarded" {
                PROXY
            } else {
                "10.0.0.3"
            })
        );
        let mut h = HeaderMap::new();
        let v = HeaderValue::from_bytes(b"for=\"\xc3\x28\", for=\"\xe2\x82\"").unwrap();
        h.append(name, v);
        assert_eq!(client_ip(ip(PROXY), &h, &t), ip(PROXY));
    }
    let v = HeaderValue::from_bytes(b"for=\"10.0.0.2\\\xff\"").unwrap();
    let mut h = HeaderMap::new();
    h.append("forwarded", v);
    assert_eq!(client_ip(ip(PROXY), &h, &fwd_proxies()), ip(PROXY));
}

#[test]
fn long_values_are_walked_from_the_right() {
    let t = proxies();
    // A client pads X-Forwarded-For with 64 KiB of its own entries; our proxy appended
    // 192.0.2.5: that is the client, not the proxy (whose bucket the client would drain).
    let padding = "203.0.113.7,".repeat(64 * 1024 / 12);
    let big = format!("{padding}192.0.2.5");
    assert!(big.len() > 60 * 1024);
    assert_eq!(client_ip(ip(PROXY), &xff(&big), &t), ip("192.0.2.5"));
    let big = format!("{padding}192.0.2.5, 10.0.0.2");
    assert_eq!(client_ip(ip(PROXY), &xff(&big), &t), ip("192.0.2.5"));
    let h = headers(&[
        ("x-forwarded-for", &padding),
        ("x-forwarded-for", "10.0.0.7"),
    ]);
    assert_eq!(client_ip(ip(PROXY), &h, &t), ip("203.0.113.7"));
    // The same in Forwarded.
    let fpad = "for=203.0.113.7,".repeat(64 * 1024 / 16);
    let fbig = format!("{fpad}for=192.0.2.5");
    assert_eq!(
        client_ip(ip(PROXY), &fwd(&fbig), &fwd_proxies()),
        ip("192.0.2.5")
    );
    // One entry longer than any address, right before our proxy's: garbage, so the walk
    // stops at the last trusted hop, however long the entry.
    let long = format!("{}, 10.0.0.3", "1".repeat(64 * 1024));
    assert_eq!(client_ip(ip(PROXY), &xff(&long), &t), ip("10.0.0.3"));
    let fbig = format!("for=\"{}\", for=10.0.0.3", "a".repeat(64 * 1024));
    assert_eq!(
        client_ip(ip(PROXY), &fwd(&fbig), &fwd_proxies()),
        ip("10.0.0.3")
    );
    let long_node = format!("198.51.100.9, {}, 10.0.0.3", "1".repeat(4000));
    assert_eq!(client_ip(ip(PROXY), &xff(&long_node), &t), ip("10.0.0.3"));
    let long_node = format!("for=1.2.3.4, for=\"{}\", for=10.0.0.3", "1".repeat(4000));
    assert_eq!(
        client_ip(ip(PROXY), &fwd(&long_node), &fwd_proxies()),
        ip("10.0.0.3")
    );
    // Long runs of whitespace around an entry are garbage too (no address needs them).
    let spaced = format!("198.51.100.9,{}203.0.113.9", " ".repeat(300));
    assert_eq!(client_ip(ip(PROXY), &xff(&spaced), &t), ip(PROXY));
}

#[test]
fn thousands_of_hops_are_bounded() {
    let t = proxies();
    // Trusted all the way: the walk ends at the 64th hop from the right.
    let hops: Vec<String> = (0..5000)
        .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
        .collect();
    let many = headers(
        &hops
            .iter()
            .map(|h| ("x-forwarded-for", h.as_str()))
            .collect::<Vec<_>>(),
    );
    let got = client_ip(ip(PROXY), &many, &t);
    let expected = ip(&hops[hops.len() - MAX_HOPS]);
    assert_eq!(got, expected);

    // The same in one value and as Forwarded elements.
    let list = hops.join(",");
    assert_eq!(client_ip(ip(PROXY), &xff(&list), &t), expected);
    let flist = hops
        .iter()
        .map(|h| format!("for={h}"))
        .collect::<Vec<_>>()
        .join(",");
    assert_eq!(client_ip(ip(PROXY), &fwd(&flist), &fwd_proxies()), expected);

    // An untrusted hop within reach is found; beyond it, it is not.
    let mut near = hops[..63].to_vec();
    near.insert(0, "198.51.100.9".into());
    assert_eq!(
        client_ip(ip(PROXY), &xff(&near.join(",")), &t),
        ip("198.51.100.9")
    );
    let mut far = hops[..64].to_vec();
    far.insert(0, "198.51.100.9".into());
    assert_eq!(client_ip(ip(PROXY), &xff(&far.join(",")), &t), ip(&far[1]));

    // Thousands of empty instances and entries are skipped cheaply.
    let mut h = xff("203.0.113.7");
    for _ in 0..5000 {
        h.append("x-forwarded-for", HeaderValue::from_static(" , "));
    }
    assert_eq!(client_ip(ip(PROXY), &h, &t), ip("203.0.113.7"));
    let commas = format!("203.0.113.7{}", ",".repeat(8000));
    assert_eq!(client_ip(ip(PROXY), &xff(&commas), &t), ip("203.0.113.7"));
    assert_eq!(
        client_ip(
            ip(PROXY),
            &fwd(&commas.replace("203", "for=203")),
            &fwd_proxies()
        ),
        ip("203.0.113.7")
    );
}

#[test]
fn pathological_inputs_never_panic() {
    let t = proxies();
    let inputs: &[&[u8]] = &[
        b"\"",
        b"\\",
        b"\"\\",
        b"for=\"",
        b"for=\"\\",
        b"for=\"\\\"",
        b"for==",
        b"=",
        b";;;,,,",
        b"[",
        b"]",
        b"[]:",
        b"[::1",
        b"[::1]:",
        b"[::1]x",
        b":",
        b"::::::::::",
        b"1.2.3.4:5:6",
        b"for=[::1]:80",
        b"\x80\x81\xfe\xff",
        b"for=\"[\xff]\"",
        b"\t \t",
    ];
    for input in inputs {
        for (name, trusted) in [("x-forwarded-for", &t), ("forwarded", &fwd_proxies())] {
            let mut h = HeaderMap::new();
            h.append(name, HeaderValue::from_bytes(input).unwrap());
            let _ = client_ip(ip(PROXY), &h, trusted);
        }
    }
    // Unquoted bracketed IPv6 in Forwarded is accepted leniently.
    let mut h = HeaderMap::new();
    h.append(
        "forwarded",
        HeaderValue::from_static("for=[2001:db8::2]:80"),
    );
    assert_eq!(client_ip(ip(PROXY), &h, &fwd_proxies()), ip("2001:db8::2"));
}

#[test]
fn node_parsing() {
    assert_eq!(parse_node(b"1.2.3.4"), Some(ip("1.2.3.4")));
    assert_eq!(parse_node(b"1.2.3.4:65535"), Some(ip("1.2.3.4")));
    assert_eq!(parse_node(b"1.2.3.4:65536"), None);
    assert_eq!(parse_node(b"1.2.3.4:080"), Some(ip("1.2.3.4")));
    assert_eq!(parse_node(b"1.2.3.4:_x-y.z"), Some(ip("1.2.3.4")));
    assert_eq!(parse_node(b"1.2.3.4:_"), None);
    assert_eq!(parse_node(b"1.2.3.4:+80"), None);
    assert_eq!(parse_node(b"[::1]:443"), Some(ip("::1")));
    assert_eq!(parse_node(b"[1.2.3.4]:443"), None);
    assert_eq!(parse_node(b"::1:443"), Some(ip("::1:443")));
    assert_eq!(parse_node(b""), None);
    let mut buf = [0u8; MAX_NODE_LEN];
    assert_eq!(unquote(b"\"a\\\"b\"", &mut buf), Some(&b"a\"b"[..]));
    let mut buf = [0u8; MAX_NODE_LEN];
    assert_eq!(unquote(b"\"abc", &mut buf), None);
    let mut buf = [0u8; MAX_NODE_LEN];
    let long = format!("\"{}\"", "a".repeat(MAX_NODE_LEN + 1));
    assert_eq!(unquote(long.as_bytes(), &mut buf), None);
    assert_eq!(trim(b"  \t "), b"");
    assert_eq!(trim(b" a b\t"), b"a b");
}
