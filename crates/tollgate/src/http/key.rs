//! Rate-limit keys: an address as a key, and keys of bounded length.
//!
//! [`ip_key`] turns an address into a rate-limit key, grouping IPv6 by network prefix (one host
//! usually owns a whole `/64`), and [`bounded_key`] caps the length of any key by replacing long
//! ones with a [`fingerprint`].
//!
//! ```
//! use std::net::IpAddr;
//! use tollgate::http::key::{bounded_key, ip_key, DEFAULT_V6_PREFIX};
//!
//! // IPv6 clients are keyed by their /64.
//! let v6: IpAddr = "2001:db8:1:2:aaaa:bbbb:cccc:dddd".parse().unwrap();
//! assert_eq!(ip_key(v6, DEFAULT_V6_PREFIX), "2001:db8:1:2::/64");
//!
//! // Short keys pass through; long ones are hashed to a fixed size.
//! assert_eq!(bounded_key("203.0.113.7"), "203.0.113.7");
//! assert_eq!(bounded_key(&"x".repeat(10_000)).len(), 34);
//! ```

use std::borrow::Cow;
use std::hash::Hasher as _;
use std::net::IpAddr;

use ipnet::Ipv6Net;
use siphasher::sip128::{Hasher128 as _, SipHasher24};

/// The IPv6 prefix length [`ip_key`] groups addresses by, unless told otherwise.
pub const DEFAULT_V6_PREFIX: u8 = 64;

/// The longest key, in bytes, that [`bounded_key`] passes through unchanged.
pub const MAX_KEY_LEN: usize = 128;

/// The fixed, public key of [`fingerprint`]: the 16 ASCII bytes `tollgate-fp-v1.0`.
///
/// Keys are shared between processes through Redis, so the fingerprint must be the same
/// everywhere; the key is therefore a constant rather than a per-process secret. Changing it
/// changes every hashed key.
pub const FINGERPRINT_KEY: [u8; 16] = *b"tollgate-fp-v1.0";

/// The rate-limit key of an address.
///
/// IPv4 addresses are keyed as they are (`203.0.113.7`). IPv6 addresses are grouped by their first
/// `v6_prefix` bits (clamped to 128), written as a block (`2001:db8:1:2::/64`): a single host
/// usually controls a whole `/64` and could otherwise rotate through it to dodge the limit. An
/// IPv4-mapped IPv6 address (`::ffff:203.0.113.7`) is keyed as the IPv4 address it carries.
///
/// ```
/// use tollgate::http::key::ip_key;
///
/// assert_eq!(ip_key("203.0.113.7".parse().unwrap(), 64), "203.0.113.7");
/// assert_eq!(ip_key("::ffff:203.0.113.7".parse().unwrap(), 64), "203.0.113.7");
/// assert_eq!(ip_key("2001:db8:1:2:3:4:5:6".parse().unwrap(), 48), "2001:db8:1::/48");
/// ```
pub fn ip_key(ip: IpAddr, v6_prefix: u8) -> String {
    let mut key = String::new();
    push_ip_key(&mut key, ip, v6_prefix);
    key
}

/// Appends [`ip_key`]`(ip, v6_prefix)` to `out`.
pub(crate) fn push_ip_key(out: &mut String, ip: IpAddr, v6_prefix: u8) {
    use std::fmt::Write as _;
    // Writing into a String cannot fail.
    let _ = match ip {
        IpAddr::V4(a) => write!(out, "{a}"),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => write!(out, "{v4}"),
            None => {
                let prefix = v6_prefix.min(128);
                // Cannot fail: the prefix is at most 128.
                let net = Ipv6Net::new(a, prefix).map_or(a, |net| net.trunc().addr());
                write!(out, "{net}/{prefix}")
            }
        },
    };
}

/// `key` itself if it is at most [`MAX_KEY_LEN`] bytes long, otherwise `"h:"` followed by the
/// 32 lowercase hex digits of its [`fingerprint`].
///
/// Keys can come from request data (a header, a token) of any size; bounding them keeps the
/// memory of in-process stores and the size of Redis keys in check. A 34-byte key starting with
/// `h:` may stand for a longer one, so derive keys that cannot take that form when the
/// distinction matters (an IP key never does).
///
/// ```
/// use std::borrow::Cow;
/// use tollgate::http::key::bounded_key;
///
/// assert!(matches!(bounded_key("user:42"), Cow::Borrowed("user:42")));
/// let token = "a".repeat(1000);
/// let long = bounded_key(&token);
/// assert!(matches!(long, Cow::Owned(_)));
/// assert!(long.starts_with("h:") && long.len() == 34);
/// ```
pub fn bounded_key(key: &str) -> Cow<'_, str> {
    if key.len() <= MAX_KEY_LEN {
        Cow::Borrowed(key)
    } else {
        Cow::Owned(format!("h:{:032x}", fingerprint(key.as_bytes())))
    }
}

/// A stable 128-bit fingerprint of `bytes`: SipHash-2-4 with 128-bit output under the fixed key
/// [`FINGERPRINT_KEY`].
///
/// The result is the same in every process, build and platform, so keys hashed by one instance
/// match those hashed by another sharing a Redis. It is the number whose little-endian bytes are
/// the 16 output bytes of the SipHash reference implementation. As the key is public, this is not
/// a secret MAC; it serves to shorten keys and to log one without revealing it.
///
/// ```
/// use tollgate::http::key::fingerprint;
///
/// assert_eq!(fingerprint(b"key"), fingerprint(b"key"));
/// assert_ne!(fingerprint(b"key"), fingerprint(b"kez"));
/// println!("rate limited {:032x}", fingerprint(b"api-token-123"));
/// ```
pub fn fingerprint(bytes: &[u8]) -> u128 {
    let mut hasher = SipHasher24::new_with_key(&FINGERPRINT_KEY);
    hasher.write(bytes);
    // `as_u128` reads the two 64-bit halves as the reference implementation's 16 output bytes,
    // little-endian: the value tollgate has always stored.
    hasher.finish128().as_u128()
}

#[cfg(test)]
mod tests;
