//! The client behind trusted proxies.
//!
//! A request's TCP peer is the last hop that connected to us. Behind a load balancer or a reverse
//! proxy that peer is the proxy, and the client address travels in a forwarding header
//! (`Forwarded: for=…`, [RFC 7239], or the de facto `X-Forwarded-For`). Anyone can send those
//! headers, so one is believed only when the peer is one of the [`TrustedProxies`], only the one
//! they write ([`ForwardedHeader`]; the other could be the client's own), and then only as far
//! back as the chain of trusted proxies reaches: [`client_ip`] walks the hops from the right and
//! stops at the first one it does not trust.
//!
//! Address blocks are [`ipnet::IpNet`]s (re-exported here as [`IpNet`]); [`parse_cidr`] reads
//! one with an error that names the input.
//!
//! ```
//! use std::net::IpAddr;
//! use http::HeaderMap;
//! use tollgate::http::forwarded::{client_ip, TrustedProxies};
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
//! ```
//!
//! [RFC 7239]: https://www.rfc-editor.org/rfc/rfc7239

use std::error::Error;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::ControlFlow;
use std::str::FromStr;

use http::HeaderMap;
use http::header::{FORWARDED, HeaderName};
pub use ipnet::IpNet;

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
// Address blocks
// ---------------------------------------------------------------------------------------------

/// Parses a block of addresses: `ADDRESS/PREFIX` (`10.0.0.0/8`, `fd00::/8`) or a bare address
/// (one host: `/32` or `/128`); surrounding whitespace is ignored and host bits below the prefix
/// are cleared, so `10.1.2.3/8` is `10.0.0.0/8`.
///
/// ```
/// use tollgate::http::forwarded::parse_cidr;
///
/// assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
/// assert_eq!(parse_cidr("::1").unwrap().to_string(), "::1/128");
/// assert_eq!(
///     parse_cidr("10.0.0.0/33").unwrap_err().to_string(),
///     r#"invalid CIDR "10.0.0.0/33": the prefix length 33 is longer than 32"#
/// );
/// ```
pub fn parse_cidr(s: &str) -> Result<IpNet, CidrError> {
    let text = s.trim();
    let error = |reason| CidrError {
        input: s.to_owned(),
        reason,
    };
    match text.split_once('/') {
        None => text
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| error(Reason::BadAddress)),
        Some((addr, prefix)) => {
            let addr: IpAddr = addr.parse().map_err(|_| error(Reason::BadAddress))?;
            let max = match addr {
                IpAddr::V4(_) => 32,
                IpAddr::V6(_) => 128,
            };
            // ipnet reads the prefix itself; the checks here only choose the message.
            if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
                return Err(error(Reason::BadPrefix));
            }
            match prefix.parse::<u16>() {
                Ok(p) if p > u16::from(max) => {
                    return Err(error(Reason::PrefixTooLong { prefix: p, max }));
                }
                Ok(_) => {}
                Err(_) => return Err(error(Reason::BadPrefix)),
            }
            text.parse::<IpNet>()
                .map(|net| net.trunc())
                .map_err(|_| error(Reason::BadPrefix))
        }
    }
}

/// The error of [`parse_cidr`]: the input was not an IP address, optionally followed by `/` and
/// a prefix length that fits the address.
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

/// Whether `net` holds `ip`, an IPv4 block also holding the IPv4-mapped IPv6 form of its
/// addresses (`::ffff:a.b.c.d`, how dual-stack sockets report IPv4 peers) and an IPv6 block the
/// IPv4 addresses whose mapped form it holds.
fn holds(net: &IpNet, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpNet::V4(n), IpAddr::V4(a)) => n.contains(&a),
        (IpNet::V4(n), IpAddr::V6(a)) => a.to_ipv4_mapped().is_some_and(|a| n.contains(&a)),
        (IpNet::V6(n), IpAddr::V6(a)) => n.contains(&a),
        (IpNet::V6(n), IpAddr::V4(a)) => n.contains(&a.to_ipv6_mapped()),
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
/// use tollgate::http::forwarded::ForwardedHeader;
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

/// The proxies whose forwarding header is believed: a set of address blocks ([`IpNet`]), and which header
/// they write ([`ForwardedHeader`], `X-Forwarded-For` unless told otherwise).
///
/// [`TrustedProxies::none`] (the default) trusts nobody, so [`client_ip`] always answers the peer
/// address. Build one from strings with [`TrustedProxies::parse`] or from [`IpNet`]s with
/// [`FromIterator`]. IPv4 blocks also hold the IPv4-mapped IPv6 form of their addresses.
///
/// ```
/// use tollgate::http::forwarded::{IpNet, TrustedProxies};
///
/// let trusted = TrustedProxies::parse(&["127.0.0.1", "10.0.0.0/8", "fd00::/8"]).unwrap();
/// assert!(trusted.contains("10.9.8.7".parse().unwrap()));
/// assert!(!trusted.contains("192.0.2.1".parse().unwrap()));
///
/// let same: TrustedProxies = ["127.0.0.1/32".parse::<IpNet>().unwrap()].into_iter().collect();
/// assert!(same.contains("127.0.0.1".parse().unwrap()));
/// assert!(TrustedProxies::none().is_empty());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    ranges: Vec<IpNet>,
    header: ForwardedHeader,
}

impl TrustedProxies {
    /// Trusts nobody: forwarding headers are always ignored.
    pub fn none() -> TrustedProxies {
        TrustedProxies::default()
    }

    /// Parses each string with [`parse_cidr`] (`"10.0.0.0/8"`, `"::1"`, …); fails on the first
    /// one that does not parse.
    pub fn parse<I>(ranges: I) -> Result<TrustedProxies, CidrError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        ranges.into_iter().map(|s| parse_cidr(s.as_ref())).collect()
    }

    /// Whether `ip` lies in one of the trusted blocks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| holds(r, ip))
    }

    /// Whether no block is trusted.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The trusted blocks, in the order given.
    pub fn ranges(&self) -> &[IpNet] {
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

impl FromIterator<IpNet> for TrustedProxies {
    fn from_iter<I: IntoIterator<Item = IpNet>>(iter: I) -> TrustedProxies {
        TrustedProxies {
            ranges: iter.into_iter().collect(),
            header: ForwardedHeader::default(),
        }
    }
}

impl Extend<IpNet> for TrustedProxies {
    fn extend<I: IntoIterator<Item = IpNet>>(&mut self, iter: I) {
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
/// The address is returned as written; [`ip_key`](super::key::ip_key) folds IPv4-mapped IPv6 into IPv4.
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

#[cfg(test)]
mod tests;
