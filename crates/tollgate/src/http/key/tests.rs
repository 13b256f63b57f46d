use std::borrow::Cow;
use std::net::IpAddr;

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

// --- Keys ---------------------------------------------------------------------------------

#[test]
fn ip_key_of_ipv4_is_the_address() {
    assert_eq!(ip_key(ip("203.0.113.7"), DEFAULT_V6_PREFIX), "203.0.113.7");
    assert_eq!(ip_key(ip("203.0.113.7"), 0), "203.0.113.7");
}

#[test]
fn ip_key_groups_ipv6_by_prefix() {
    let a = ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd");
    let b = ip("2001:db8:1:2::1");
    assert_eq!(ip_key(a, DEFAULT_V6_PREFIX), "2001:db8:1:2::/64");
    assert_eq!(ip_key(a, 64), ip_key(b, 64));
    assert_ne!(ip_key(a, 64), ip_key(ip("2001:db8:1:3::1"), 64));
    assert_eq!(ip_key(a, 56), "2001:db8:1::/56");
    assert_eq!(ip_key(a, 0), "::/0");
    assert_eq!(ip_key(a, 128), "2001:db8:1:2:aaaa:bbbb:cccc:dddd/128");
    assert_eq!(ip_key(a, 129), ip_key(a, 128));
    assert_eq!(ip_key(a, 255), "2001:db8:1:2:aaaa:bbbb:cccc:dddd/128");
    assert_eq!(ip_key(ip("::1"), 64), "::/64");
    assert_eq!(ip_key(a, 1), "::/1");
    assert_eq!(ip_key(ip("ffff::1"), 1), "8000::/1");
}

#[test]
fn ip_key_folds_ipv4_mapped() {
    assert_eq!(ip_key(ip("::ffff:203.0.113.7"), 64), "203.0.113.7");
    assert_eq!(ip_key(ip("::ffff:203.0.113.7"), 0), "203.0.113.7");
    // IPv4-compatible addresses are plain IPv6.
    assert_eq!(ip_key(ip("::203.0.113.7"), 64), "::/64");
}

#[test]
fn bounded_key_borrows_short_keys() {
    for key in ["", "203.0.113.7", &"k".repeat(MAX_KEY_LEN)] {
        assert!(matches!(bounded_key(key), Cow::Borrowed(k) if k == key));
    }
}

#[test]
fn bounded_key_hashes_long_keys() {
    let a = "a".repeat(MAX_KEY_LEN + 1);
    let ka = bounded_key(&a);
    assert!(matches!(ka, Cow::Owned(_)));
    assert_eq!(ka.len(), 34);
    assert!(ka.starts_with("h:"));
    assert!(
        ka[2..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    // Deterministic.
    assert_eq!(bounded_key(&a), ka);
    assert_eq!(ka, format!("h:{:032x}", fingerprint(a.as_bytes())));
    // Different inputs, different outputs; the whole key counts, not a prefix.
    let mut b = a.clone();
    b.push('b');
    let mut c = a.clone();
    c.replace_range(0..1, "c");
    let keys = [ka.clone(), bounded_key(&b), bounded_key(&c)];
    assert_ne!(keys[0], keys[1]);
    assert_ne!(keys[0], keys[2]);
    assert_ne!(keys[1], keys[2]);
    let huge = "x".repeat(64 * 1024);
    assert_eq!(bounded_key(&huge).len(), 34);
    // Multi-byte characters are measured in bytes.
    let wide = "é".repeat(65);
    assert_eq!(bounded_key(&wide).len(), 34);
}

/// The fingerprints tollgate computed before it used the `siphasher` crate (its own
/// SipHash-2-4-128, checked against the reference vectors): a change of algorithm, key or byte
/// order would silently split every key shared through Redis, so they are pinned.
#[test]
fn fingerprint_is_pinned() {
    assert_eq!(&FINGERPRINT_KEY, b"tollgate-fp-v1.0");
    let pins: [(&[u8], &str); 5] = [
        (b"", "71662a713dfd8c824aeb828bd3c4f333"),
        (b"tollgate", "89ff95fed5309562cb4e3d9f1d886273"),
        (b"api-token-123", "b51533adda7d3eeb3faa447ea353d0ac"),
        (&[b'a'; 129], "462ea222a6dddc528d4f49c8527b3c49"),
        (&[b'x'; 10_000], "48e4563f2f91d26d98669a02588305f3"),
    ];
    for (input, hex) in pins {
        assert_eq!(
            format!("{:032x}", fingerprint(input)),
            hex,
            "{} bytes",
            input.len()
        );
    }
    assert_eq!(
        bounded_key(&"k".repeat(200)),
        "h:e23da5805e48a9bd1ed3e0478bce015c"
    );
    assert_ne!(fingerprint(b""), fingerprint(b"\0"));
}
