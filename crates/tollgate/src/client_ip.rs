//! Who is the client: the address behind trusted proxies, and bounded keys.
//!
//! A request's TCP peer is the last hop that connected to us. Behind a load balancer or a reverse
//! proxy that peer is the proxy, and the client address travels in a forwarding header
//! (`Forwarded: for=…`, [RFC 7239], or the de facto `X-Forwarded-For`). Anyone can send those
//! headers, so one is believed only when the peer is one of the [`TrustedProxies`], only the one
//! they write ([`ForwardedHeader`]; the other could be the client's own), and then only as far
//! back as the chain of trusted proxies reaches: [`client_ip`] walks the hops from the right and
//! stops at the first one it does not trust.
//!
//! [`ip_key`] turns the address into a rate-limit key, grouping IPv6 by network prefix (one host
//! usually owns a whole `/64`), and [`bounded_key`] caps the length of any key by replacing long
//! ones with a [`fingerprint`].
//!
//! ```
//! use std::net::IpAddr;
//! use http::HeaderMap;
//! use tollgate::client_ip::{bounded_key, client_ip, ip_key, TrustedProxies, DEFAULT_V6_PREFIX};
//!
//! let trusted = TrustedProxies::parse(&["10.0.0.0/8", "::1"]).unwrap();
//! let mut headers = HeaderMap::new();
//! // The first entry is forged by the client; 198.51.100.9 is what our proxy 10.0.0.2 saw.
//! headers.insert("x-forwarded-for", "1.2.3.4, 198.51.100.9, 10.0.0.2".parse().unwrap());
//!
//! let peer: IpAddr = "10.0.0.1".parse().unwrap();
//! let client = client_ip(peer, &headers, &trusted);
//! assert_eq!(client, "198.51.100.9".parse::<IpAddr>().unwrap());
//!
//! // The same headers from an untrusted peer are ignored.
//! let stranger: IpAddr = "203.0.113.7".parse().unwrap();
//! assert_eq!(client_ip(stranger, &headers, &trusted), stranger);
//!
//! // IPv6 clients are keyed by their /64.
//! let v6: IpAddr = "2001:db8:1:2:aaaa:bbbb:cccc:dddd".parse().unwrap();
//! assert_eq!(ip_key(v6, DEFAULT_V6_PREFIX), "2001:db8:1:2::/64");
//!
//! // Short keys pass through; long ones are hashed to a fixed size.
//! assert_eq!(bounded_key("203.0.113.7"), "203.0.113.7");
//! assert_eq!(bounded_key(&"x".repeat(10_000)).len(), 34);
//! ```
//!
//! [RFC 7239]: https://www.rfc-editor.org/rfc/rfc7239

use std::borrow::Cow;
use std::error::Error;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::ControlFlow;
use std::str::FromStr;

use http::HeaderMap;
use http::header::{FORWARDED, HeaderName};

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

/// At most this many hops are examined, counting from the right.
const MAX_HOPS: usize = 64;

/// How far back from a comma the walk over `X-Forwarded-For` looks for the previous one: an
/// entry longer than this (no address is) is garbage, so each hop costs at most this many bytes,
/// whatever the length of the value.
const MAX_ENTRY_SCAN: usize = 256;

/// No valid node (`[` IPv6 `]:` port) is longer than this; longer ones are rejected unparsed.
const MAX_NODE_LEN: usize = 64;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

// ---------------------------------------------------------------------------------------------
// Cidr
// ---------------------------------------------------------------------------------------------

/// A block of IP addresses: an address and a prefix length, as in `10.0.0.0/8` or `fd00::/8`.
///
/// Parsed from `ADDRESS/PREFIX` or a bare address (a single host: `/32` or `/128`). Host bits
/// below the prefix are cleared, so `10.1.2.3/8` is `10.0.0.0/8`. An IPv4 block also contains the
/// IPv4-mapped IPv6 form of its addresses (`::ffff:10.1.2.3`), which is how dual-stack sockets
/// report IPv4 peers.
///
/// ```
/// use std::net::IpAddr;
/// use tollgate::client_ip::Cidr;
///
/// let lan: Cidr = "10.0.0.0/8".parse().unwrap();
/// assert!(lan.contains("10.200.0.1".parse().unwrap()));
/// assert!(lan.contains("::ffff:10.200.0.1".parse().unwrap()));
/// assert!(!lan.contains("11.0.0.1".parse().unwrap()));
/// assert_eq!(lan.to_string(), "10.0.0.0/8");
/// assert!("10.0.0.0/33".parse::<Cidr>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The network address, host bits cleared.
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The block of `prefix` leading bits of `addr` (host bits are cleared). Fails if `prefix` is
    /// longer than the address (32 bits for IPv4, 128 for IPv6).
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, CidrError> {
        let max = max_prefix(addr);
        if prefix > max {
            return Err(CidrError {
                input: format!("{addr}/{prefix}"),
                reason: Reason::PrefixTooLong {
                    prefix: u16::from(prefix),
                    max,
                },
            });
        }
        Ok(Cidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// The network address (host bits cleared).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in this block. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are matched
    /// against IPv4 blocks as the IPv4 address they carry, and IPv4 addresses against IPv6 blocks
    /// in their mapped form.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => mask_v4(a, self.prefix) == net,
            (IpAddr::V4(net), IpAddr::V6(a)) => a
                .to_ipv4_mapped()
                .is_some_and(|a| mask_v4(a, self.prefix) == net),
            (IpAddr::V6(net), IpAddr::V6(a)) => mask_v6(a, self.prefix) == net,
            (IpAddr::V6(net), IpAddr::V4(a)) => mask_v6(a.to_ipv6_mapped(), self.prefix) == net,
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Parses `ADDRESS/PREFIX` or a bare `ADDRESS`; surrounding whitespace is ignored.
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let error = |reason| CidrError {
            input: s.to_owned(),
            reason,
        };
        let text = s.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| error(Reason::BadAddress))?;
        let max = max_prefix(addr);
        let prefix = match prefix {
            None => max,
            Some(p) => {
                let digits_only =
                    !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit());
                if !digits_only {
                    return Err(error(Reason::BadPrefix));
                }
                let p: u16 = p.parse().map_err(|_| error(Reason::BadPrefix))?;
                match u8::try_from(p) {
                    Ok(p) if p <= max => p,
                    _ => return Err(error(Reason::PrefixTooLong { prefix: p, max })),
                }
            }
        };
        Ok(Cidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }
}

impl fmt::Display for Cidr {
    /// `ADDRESS/PREFIX`, always with the prefix: `10.0.0.0/8`, `::1/128`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The error of parsing a [`Cidr`]: the input was not an IP address, optionally followed by `/`
/// and a prefix length that fits the address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrError {
    input: String,
    reason: Reason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    BadAddress,
    BadPrefix,
    PrefixTooLong { prefix: u16, max: u8 },
}

impl CidrError {
    /// The text that failed to parse.
    pub fn input(&self) -> &str {
        &self.input
    }
}

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid CIDR {:?}: ", self.input)?;
        match self.reason {
            Reason::BadAddress => {
                f.write_str("expected an IP address, optionally followed by /PREFIX")
            }
            Reason::BadPrefix => f.write_str("the prefix length is not a number"),
            Reason::PrefixTooLong { prefix, max } => {
                write!(f, "the prefix length {prefix} is longer than {max}")
            }
        }
    }
}

impl Error for CidrError {}

fn max_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// Clears the bits of `a` after the first `prefix` (which must be at most 32).
fn mask_v4(a: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let keep = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    Ipv4Addr::from(u32::from(a) & keep)
}

/// Clears the bits of `a` after the first `prefix` (which must be at most 128).
fn mask_v6(a: Ipv6Addr, prefix: u8) -> Ipv6Addr {
    let keep = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    Ipv6Addr::from(u128::from(a) & keep)
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => IpAddr::V4(mask_v4(a, prefix)),
        IpAddr::V6(a) => IpAddr::V6(mask_v6(a, prefix)),
    }
}

// ---------------------------------------------------------------------------------------------
// TrustedProxies
// ---------------------------------------------------------------------------------------------

/// The one forwarding header believed from trusted proxies (the other is ignored).
///
/// A client can send both headers; a proxy appends its hop to one of them. Were both read, the
/// client could write the one the proxy does not touch and choose its own address. So the header
/// your proxies write is named, and only that one is walked: `x-forwarded-for` (the default,
/// what nginx, HAProxy and most load balancers write) or `forwarded` (RFC 7239).
///
/// ```
/// use tollgate::client_ip::ForwardedHeader;
///
/// assert_eq!("forwarded".parse::<ForwardedHeader>().unwrap(), ForwardedHeader::Forwarded);
/// assert_eq!(ForwardedHeader::default().to_string(), "x-forwarded-for");
/// assert!("x-real-ip".parse::<ForwardedHeader>().is_err());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2`.
    #[default]
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239).
    Forwarded,
}

impl ForwardedHeader {
    /// The header's name, lowercase.
    pub const fn as_str(self) -> &'static str {
        match self {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        }
    }
}

impl fmt::Display for ForwardedHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ForwardedHeader {
    type Err = String;

    /// `x-forwarded-for` or `forwarded`, in any case.
    fn from_str(s: &str) -> Result<ForwardedHeader, String> {
        if s.eq_ignore_ascii_case("x-forwarded-for") {
            Ok(ForwardedHeader::XForwardedFor)
        } else if s.eq_ignore_ascii_case("forwarded") {
            Ok(ForwardedHeader::Forwarded)
        } else {
            Err(format!(
                "unknown forwarding header `{s}`: expected x-forwarded-for or forwarded"
            ))
        }
    }
}

/// The proxies whose forwarding header is believed: a set of [`Cidr`] blocks, and which header
/// they write ([`ForwardedHeader`], `X-Forwarded-For` unless told otherwise).
///
/// [`TrustedProxies::none`] (the default) trusts nobody, so [`client_ip`] always answers the peer
/// address. Build one from strings with [`TrustedProxies::parse`] or from [`Cidr`]s with
/// [`FromIterator`].
///
/// ```
/// use tollgate::client_ip::{Cidr, TrustedProxies};
///
/// let trusted = TrustedProxies::parse(&["127.0.0.1", "10.0.0.0/8", "fd00::/8"]).unwrap();
/// assert!(trusted.contains("10.9.8.7".parse().unwrap()));
/// assert!(!trusted.contains("192.0.2.1".parse().unwrap()));
///
/// let same: TrustedProxies = ["127.0.0.1/32".parse::<Cidr>().unwrap()].into_iter().collect();
/// assert!(same.contains("127.0.0.1".parse().unwrap()));
/// assert!(TrustedProxies::none().is_empty());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    ranges: Vec<Cidr>,
    header: ForwardedHeader,
}

impl TrustedProxies {
    /// Trusts nobody: forwarding headers are always ignored.
    pub fn none() -> TrustedProxies {
        TrustedProxies::default()
    }

    /// Parses each string as a [`Cidr`] (`"10.0.0.0/8"`, `"::1"`, …); fails on the first one
    /// that does not parse.
    pub fn parse<I>(ranges: I) -> Result<TrustedProxies, CidrError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        ranges
            .into_iter()
            .map(|s| s.as_ref().parse::<Cidr>())
            .collect()
    }

    /// Whether `ip` lies in one of the trusted blocks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip))
    }

    /// Whether no block is trusted.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The trusted blocks, in the order given.
    pub fn ranges(&self) -> &[Cidr] {
        &self.ranges
    }

    /// Believes `header` from these proxies instead of `X-Forwarded-For`; the other forwarding
    /// header is ignored.
    pub fn with_header(mut self, header: ForwardedHeader) -> TrustedProxies {
        self.header = header;
        self
    }

    /// The forwarding header believed.
    pub fn header(&self) -> ForwardedHeader {
        self.header
    }
}

impl FromIterator<Cidr> for TrustedProxies {
    fn from_iter<I: IntoIterator<Item = Cidr>>(iter: I) -> TrustedProxies {
        TrustedProxies {
            ranges: iter.into_iter().collect(),
            header: ForwardedHeader::default(),
        }
    }
}

impl Extend<Cidr> for TrustedProxies {
    fn extend<I: IntoIterator<Item = Cidr>>(&mut self, iter: I) {
        self.ranges.extend(iter);
    }
}

// ---------------------------------------------------------------------------------------------
// client_ip
// ---------------------------------------------------------------------------------------------

/// The client address of a request that arrived from `peer` with `headers`.
///
/// * If `peer` is not one of the `trusted` proxies, the answer is `peer`: forwarding headers from
///   anyone else are ignored, as a client can write whatever it likes in them.
/// * Otherwise the hops of the forwarding header the proxies write ([`TrustedProxies::header`]:
///   `X-Forwarded-For`, or the `for=` parameters of RFC 7239 `Forwarded`) are walked from the
///   right (the hop our proxy appended) to the left, and the first address that is not a trusted
///   proxy is the client. The other forwarding header is never read. Every instance of the header
///   counts, in order, as one comma-separated list.
/// * If every hop is trusted, the answer is the leftmost one.
/// * A hop that is not an address (malformed, `unknown`, an obfuscated `_identifier`, a
///   `Forwarded` element without `for=`) stops the walk: the last trusted address seen is the
///   answer, since nothing further to the left can be attributed to a known party.
///
/// Ports (`203.0.113.7:8080`, `[2001:db8::1]:443`), quoted `Forwarded` values, case-insensitive
/// parameter names, optional whitespace and empty list entries are accepted. The work is bounded:
/// at most 64 hops are examined from the right (the walk ends at the 64th as if it were
/// malformed), however long the value: a client padding the header with kilobytes of its own
/// entries cannot push the hop our proxy appended out of reach. `X-Forwarded-For` is read from
/// the right, at most 256 bytes per hop (a longer entry is garbage); `Forwarded`, whose quoted
/// strings can only be told apart from the left, is scanned once in linear time keeping only its
/// last 64 elements.
///
/// The address is returned as written; [`ip_key`] folds IPv4-mapped IPv6 into IPv4.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
    if !trusted.contains(peer) {
        return peer;
    }
    let mut walk = Walk {
        trusted,
        current: peer,
        hops: 0,
    };
    let outcome = match trusted.header {
        ForwardedHeader::Forwarded => headers
            .get_all(FORWARDED)
            .iter()
            .rev()
            .try_for_each(|value| walk.forwarded_value(value.as_bytes())),
        ForwardedHeader::XForwardedFor => headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .rev()
            .try_for_each(|value| walk.x_forwarded_for_value(value.as_bytes())),
    };
    match outcome {
        ControlFlow::Break(ip) => ip,
        ControlFlow::Continue(()) => walk.current,
    }
}

/// One entry of a forwarding list.
enum Hop {
    /// An empty list element, which lists may contain; skipped.
    Empty,
    Addr(IpAddr),
    /// Anything that is not an address; stops the walk.
    Bad,
}

/// The state of a right-to-left walk over the hops.
struct Walk<'a> {
    trusted: &'a TrustedProxies,
    /// The last trusted address seen (initially the peer).
    current: IpAddr,
    hops: usize,
}

impl Walk<'_> {
    fn step(&mut self, hop: Hop) -> ControlFlow<IpAddr> {
        match hop {
            Hop::Empty => ControlFlow::Continue(()),
            Hop::Bad => ControlFlow::Break(self.current),
            Hop::Addr(ip) => {
                if !self.trusted.contains(ip) {
                    return ControlFlow::Break(ip);
                }
                self.current = ip;
                self.hops += 1;
                if self.hops >= MAX_HOPS {
                    ControlFlow::Break(ip)
                } else {
                    ControlFlow::Continue(())
                }
            }
        }
    }

    /// Walks one `X-Forwarded-For` value from the right, looking at most [`MAX_ENTRY_SCAN`]
    /// bytes back for each entry's start.
    fn x_forwarded_for_value(&mut self, value: &[u8]) -> ControlFlow<IpAddr> {
        let mut rest = value;
        loop {
            let window = rest.len().saturating_sub(MAX_ENTRY_SCAN);
            let (entry, before) = match rest[window..].iter().rposition(|&b| b == b',') {
                Some(i) => (&rest[window + i + 1..], Some(&rest[..window + i])),
                None if window == 0 => (rest, None),
                // No comma within reach: an entry longer than any address.
                None => return self.step(Hop::Bad),
            };
            let entry = trim(entry);
            let hop = if entry.is_empty() {
                Hop::Empty
            } else {
                parse_node(entry).map_or(Hop::Bad, Hop::Addr)
            };
            self.step(hop)?;
            match before {
                Some(before) => rest = before,
                None => return ControlFlow::Continue(()),
            }
        }
    }

    fn forwarded_value(&mut self, value: &[u8]) -> ControlFlow<IpAddr> {
        // Quoted strings may contain commas, so elements are found left to right; only the last
        // MAX_HOPS non-empty ones can ever be looked at, so a ring of that size holds them.
        let mut ring: [&[u8]; MAX_HOPS] = [&[]; MAX_HOPS];
        let mut count = 0usize;
        for element in QuotedSplit::new(value, b',') {
            let element = trim(element);
            if !element.is_empty() {
                ring[count % MAX_HOPS] = element;
                count += 1;
            }
        }
        (count.saturating_sub(MAX_HOPS)..count)
            .rev()
            .try_for_each(|i| self.step(forwarded_element(ring[i % MAX_HOPS])))
    }
}

/// The `for=` node of one (trimmed, non-empty) `Forwarded` element.
fn forwarded_element(element: &[u8]) -> Hop {
    let mut node = None;
    for pair in QuotedSplit::new(element, b';') {
        let pair = trim(pair);
        if pair.is_empty() {
            continue;
        }
        let Some(eq) = pair.iter().position(|&b| b == b'=') else {
            return Hop::Bad;
        };
        let name = trim(&pair[..eq]);
        if name.is_empty() {
            return Hop::Bad;
        }
        if name.eq_ignore_ascii_case(b"for") {
            if node.is_some() {
                // RFC 7239 §4: a parameter must not occur twice in one element.
                return Hop::Bad;
            }
            node = Some(trim(&pair[eq + 1..]));
        }
    }
    let Some(node) = node else {
        return Hop::Bad;
    };
    let mut buf = [0u8; MAX_NODE_LEN];
    let node = if node.first() == Some(&b'"') {
        match unquote(node, &mut buf) {
            Some(n) => n,
            None => return Hop::Bad,
        }
    } else {
        node
    };
    parse_node(node).map_or(Hop::Bad, Hop::Addr)
}

/// The content of the quoted-string `quoted` (which starts with `"`), written into `buf`; `None`
/// if it is unterminated, followed by anything, or longer than `buf`.
fn unquote<'b>(quoted: &[u8], buf: &'b mut [u8; MAX_NODE_LEN]) -> Option<&'b [u8]> {
    let mut len = 0;
    let mut bytes = quoted.iter().skip(1);
    while let Some(&b) = bytes.next() {
        let b = match b {
            b'"' => {
                return if bytes.next().is_none() {
                    Some(&buf[..len])
                } else {
                    None
                };
            }
            b'\\' => *bytes.next()?,
            b => b,
        };
        *buf.get_mut(len)? = b;
        len += 1;
    }
    None
}

/// An address with an optional port: `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:443`. A port may also be an RFC 7239 obfuscated `_port`.
fn parse_node(node: &[u8]) -> Option<IpAddr> {
    if node.len() > MAX_NODE_LEN {
        return None;
    }
    let node = std::str::from_utf8(node).ok()?;
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = node.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        if !after.is_empty() && !after.strip_prefix(':').is_some_and(is_port) {
            return None;
        }
        return v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let (v4, port) = node.split_once(':')?;
    if !is_port(port) {
        return None;
    }
    v4.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// A decimal port, or an RFC 7239 obfuscated port (`_` followed by ALPHA / DIGIT / `.` / `_` / `-`).
fn is_port(port: &str) -> bool {
    if let Some(obfuscated) = port.strip_prefix('_') {
        return !obfuscated.is_empty()
            && obfuscated
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    }
    !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok()
}

/// `bytes` without leading and trailing spaces and tabs (HTTP optional whitespace).
fn trim(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// Splits on `sep` outside of quoted strings (with backslash escapes). An unterminated quote runs
/// to the end of the input, which then fails to parse as a node.
struct QuotedSplit<'a> {
    rest: Option<&'a [u8]>,
    sep: u8,
}

impl<'a> QuotedSplit<'a> {
    fn new(bytes: &'a [u8], sep: u8) -> QuotedSplit<'a> {
        QuotedSplit {
            rest: Some(bytes),
            sep,
        }
    }
}

impl<'a> Iterator for QuotedSplit<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let rest = self.rest?;
        let mut quoted = false;
        let mut escaped = false;
        for (i, &b) in rest.iter().enumerate() {
            if escaped {
                escaped = false;
            } else if quoted {
                match b {
                    b'\\' => escaped = true,
                    b'"' => quoted = false,
                    _ => {}
                }
            } else if b == b'"' {
                quoted = true;
            } else if b == self.sep {
                self.rest = Some(&rest[i + 1..]);
                return Some(&rest[..i]);
            }
        }
        self.rest = None;
        Some(rest)
    }
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// The rate-limit key of an address.
///
/// IPv4 addresses are keyed as they are (`203.0.113.7`). IPv6 addresses are grouped by their first
/// `v6_prefix` bits (clamped to 128), written as a block (`2001:db8:1:2::/64`): a single host
/// usually controls a whole `/64` and could otherwise rotate through it to dodge the limit. An
/// IPv4-mapped IPv6 address (`::ffff:203.0.113.7`) is keyed as the IPv4 address it carries.
///
/// ```
/// use tollgate::client_ip::ip_key;
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
                write!(out, "{}/{}", mask_v6(a, prefix), prefix)
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
/// use tollgate::client_ip::bounded_key;
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
/// use tollgate::client_ip::fingerprint;
///
/// assert_eq!(fingerprint(b"key"), fingerprint(b"key"));
/// assert_ne!(fingerprint(b"key"), fingerprint(b"kez"));
/// println!("rate limited {:032x}", fingerprint(b"api-token-123"));
/// ```
pub fn fingerprint(bytes: &[u8]) -> u128 {
    u128::from_le_bytes(siphash_2_4_128(&FINGERPRINT_KEY, bytes))
}

/// SipHash-2-4 with 128-bit output (Aumasson and Bernstein), as the reference implementation
/// computes it: two little-endian 64-bit halves.
fn siphash_2_4_128(key: &[u8; 16], msg: &[u8]) -> [u8; 16] {
    let mut k0 = [0u8; 8];
    let mut k1 = [0u8; 8];
    k0.copy_from_slice(&key[..8]);
    k1.copy_from_slice(&key[8..]);
    let (k0, k1) = (u64::from_le_bytes(k0), u64::from_le_bytes(k1));

    let mut s = SipState {
        v0: k0 ^ 0x736f_6d65_7073_6575,
        v1: k1 ^ 0x646f_7261_6e64_6f6d ^ 0xee,
        v2: k0 ^ 0x6c79_6765_6e65_7261,
        v3: k1 ^ 0x7465_6462_7974_6573,
    };

    let words = msg.chunks_exact(8);
    let tail = words.remainder();
    for word in words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        s.compress(u64::from_le_bytes(w));
    }
    // The last word: the remaining bytes, and the length modulo 256 in the top byte.
    let mut last = (msg.len() as u64) << 56;
    for (i, &b) in tail.iter().enumerate() {
        last |= u64::from(b) << (8 * i);
    }
    s.compress(last);

    s.v2 ^= 0xee;
    s.rounds(4);
    let low = s.v0 ^ s.v1 ^ s.v2 ^ s.v3;
    s.v1 ^= 0xdd;
    s.rounds(4);
    let high = s.v0 ^ s.v1 ^ s.v2 ^ s.v3;

    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&low.to_le_bytes());
    out[8..].copy_from_slice(&high.to_le_bytes());
    out
}

struct SipState {
    v0: u64,
    v1: u64,
    v2: u64,
    v3: u64,
}

impl SipState {
    /// Absorbs one message word with the 2 compression rounds.
    fn compress(&mut self, m: u64) {
        self.v3 ^= m;
        self.rounds(2);
        self.v0 ^= m;
    }

    fn rounds(&mut self, n: usize) {
        for _ in 0..n {
            self.v0 = self.v0.wrapping_add(self.v1);
            self.v1 = self.v1.rotate_left(13) ^ self.v0;
            self.v0 = self.v0.rotate_left(32);
            self.v2 = self.v2.wrapping_add(self.v3);
            self.v3 = self.v3.rotate_left(16) ^ self.v2;
            self.v0 = self.v0.wrapping_add(self.v3);
            self.v3 = self.v3.rotate_left(21) ^ self.v0;
            self.v2 = self.v2.wrapping_add(self.v1);
            self.v1 = self.v1.rotate_left(17) ^ self.v2;
            self.v2 = self.v2.rotate_left(32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
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

    // --- Cidr ---------------------------------------------------------------------------------

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
            let err = bad.parse::<Cidr>().unwrap_err();
            assert_eq!(err.input(), bad);
            let msg = err.to_string();
            assert!(msg.starts_with("invalid CIDR "), "{msg}");
            assert!(msg.contains(&format!("{bad:?}")), "{msg}");
            assert!(msg.chars().next().unwrap().is_lowercase());
        }
        assert_eq!(
            "10.0.0.0/33".parse::<Cidr>().unwrap_err().to_string(),
            r#"invalid CIDR "10.0.0.0/33": the prefix length 33 is longer than 32"#
        );
        assert_eq!(
            "nope".parse::<Cidr>().unwrap_err().to_string(),
            r#"invalid CIDR "nope": expected an IP address, optionally followed by /PREFIX"#
        );
        assert!(Cidr::new(ip("::1"), 129).is_err());
        assert_eq!(Cidr::new(ip("10.9.9.9"), 8).unwrap(), cidr("10.0.0.0/8"));
    }

    #[test]
    fn cidr_contains() {
        let lan = cidr("10.0.0.0/8");
        assert!(lan.contains(ip("10.0.0.0")));
        assert!(lan.contains(ip("10.255.255.255")));
        assert!(!lan.contains(ip("11.0.0.0")));
        assert!(!lan.contains(ip("9.255.255.255")));
        assert!(!lan.contains(ip("::a00:1")));

        let host = cidr("127.0.0.1");
        assert!(host.contains(ip("127.0.0.1")));
        assert!(!host.contains(ip("127.0.0.2")));

        let ula = cidr("fd00::/8");
        assert!(ula.contains(ip("fd12:3456::1")));
        assert!(!ula.contains(ip("fe80::1")));
        assert!(!ula.contains(ip("10.0.0.1")));

        assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.7")));
        assert!(cidr("::/0").contains(ip("2001:db8::1")));
    }

    #[test]
    fn ipv4_mapped_addresses_match_ipv4_blocks() {
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert!(!cidr("10.0.0.0/8").contains(ip("::ffff:11.1.2.3")));
        assert!(cidr("127.0.0.1").contains(ip("::ffff:127.0.0.1")));
        // IPv4-compatible (deprecated) addresses are not IPv4.
        assert!(!cidr("0.0.0.0/0").contains(ip("::1")));
        // And an IPv4 address is in the mapped IPv6 block.
        assert!(cidr("::ffff:0:0/96").contains(ip("192.0.2.1")));
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

    #[test]
    fn fingerprint_is_pinned() {
        // A change of algorithm or key would silently split every shared Redis key; pin it.
        let expected = u128::from_le_bytes(siphash_2_4_128(&FINGERPRINT_KEY, b"tollgate"));
        assert_eq!(fingerprint(b"tollgate"), expected);
        assert_eq!(&FINGERPRINT_KEY, b"tollgate-fp-v1.0");
        assert_ne!(fingerprint(b""), fingerprint(b"\0"));
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// `vectors_sip128` of the SipHash reference implementation (veorq/SipHash, vectors.h):
    /// key 00 01 .. 0f, message of length i = 00 01 .. (i-1). Lengths 0 to 16 cover an empty
    /// message, every partial last word, and whole words.
    const SIP128_VECTORS: [&str; 17] = [
        "a3817f04ba25a8e66df67214c7550293",
        "da87c1d86b99af44347659119b22fc45",
        "8177228da4a45dc7fca38bdef60affe4",
        "9c70b60c5267a94e5f33b6b02985ed51",
        "f88164c12d9c8faf7d0f6e7c7bcd5579",
        "1368875980776f8854527a07690e9627",
        "14eeca338b208613485ea0308fd7a15e",
        "a1f1ebbed8dbc153c0b84aa61ff08239",
        "3b62a9ba6258f5610f83e264f31497b4",
        "264499060ad9baabc47f8b02bb6d71ed",
        "00110dc378146956c95447d3f3d0fbba",
        "0151c568386b6677a2b4dc6f81e5dc18",
        "d626b266905ef35882634df68532c125",
        "9869e247e9c08b10d029934fc4b952f7",
        "31fcefac66d7de9c7ec7485fe4494902",
        "5493e99933b0a8117e08ec0f97cfc3d9",
        "6ee2a4ca67b054bbfd3315bf85230577",
    ];

    #[test]
    fn siphash_128_reference_vectors() {
        let mut key = [0u8; 16];
        for (i, k) in key.iter_mut().enumerate() {
            *k = i as u8;
        }
        let msg: Vec<u8> = (0..16).collect();
        for (len, expected) in SIP128_VECTORS.iter().enumerate() {
            assert_eq!(
                siphash_2_4_128(&key, &msg[..len]).to_vec(),
                unhex(expected),
                "length {len}"
            );
        }
    }
}
