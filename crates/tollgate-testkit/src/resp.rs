//! A deliberately tiny RESP2 client: encode one command, parse one reply.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::error::{Error, Result};

/// Longest simple line (status, error, integer, length header) we accept.
const MAX_LINE: u64 = 64 * 1024;
/// Largest bulk string we accept (Redis' own limit).
const MAX_BULK: i64 = 512 * 1024 * 1024;
/// Deepest array nesting we accept.
const MAX_DEPTH: usize = 64;

/// A RESP2 reply, as sent by Redis.
///
/// Note that a Redis error reply (e.g. `MOVED 1234 127.0.0.1:7001`) is a successful
/// [`RedisServer::cmd`](crate::RedisServer::cmd) call returning [`Reply::Error`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Simple string, e.g. `+OK`.
    Status(String),
    /// Error reply, e.g. `-ERR unknown command` (without the leading `-`).
    Error(String),
    /// Integer reply, e.g. `:42`.
    Int(i64),
    /// Bulk string; `None` is the null bulk string (`$-1`).
    Bulk(Option<Vec<u8>>),
    /// Array; `None` is the null array (`*-1`).
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The text of a status reply, or of a bulk string that is valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Reply::Status(s) => Some(s),
            Reply::Bulk(Some(b)) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// The value of an integer reply.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Reply::Int(n) => Some(*n),
            _ => None,
        }
    }

    /// The bytes of a non-null bulk string.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Reply::Bulk(Some(b)) => Some(b),
            _ => None,
        }
    }

    /// The elements of a non-null array.
    pub fn as_array(&self) -> Option<&[Reply]> {
        match self {
            Reply::Array(Some(items)) => Some(items),
            _ => None,
        }
    }

    /// The message of an error reply.
    pub fn as_error(&self) -> Option<&str> {
        match self {
            Reply::Error(e) => Some(e),
            _ => None,
        }
    }

    /// Whether this is an error reply.
    pub fn is_error(&self) -> bool {
        matches!(self, Reply::Error(_))
    }

    /// Whether this is a null bulk string or a null array.
    pub fn is_nil(&self) -> bool {
        matches!(self, Reply::Bulk(None) | Reply::Array(None))
    }
}

/// Encodes a command as a RESP2 array of bulk strings.
pub(crate) fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads exactly one reply.
pub(crate) fn read_reply<R: BufRead>(r: &mut R) -> Result<Reply> {
    read_at_depth(r, 0)
}

fn read_at_depth<R: BufRead>(r: &mut R, depth: usize) -> Result<Reply> {
    if depth > MAX_DEPTH {
        return Err(Error::Protocol(format!(
            "arrays nested deeper than {MAX_DEPTH}"
        )));
    }
    let line = read_line(r)?;
    let kind = line.as_bytes()[0];
    if !kind.is_ascii() {
        return Err(Error::Protocol(format!("unknown reply type in {line:?}")));
    }
    let rest = &line[1..];
    match kind {
        b'+' => Ok(Reply::Status(rest.to_owned())),
        b'-' => Ok(Reply::Error(rest.to_owned())),
        b':' => Ok(Reply::Int(parse_int(rest)?)),
        b'$' => {
            let len = parse_int(rest)?;
            if len == -1 {
                return Ok(Reply::Bulk(None));
            }
            if !(0..=MAX_BULK).contains(&len) {
                return Err(Error::Protocol(format!("bad bulk length {len}")));
            }
            let len = usize::try_from(len).map_err(|_| Error::Protocol("bulk too long".into()))?;
            let mut buf = vec![0; len + 2];
            r.read_exact(&mut buf)?;
            if !buf.ends_with(b"\r\n") {
                return Err(Error::Protocol("bulk string not terminated by CRLF".into()));
            }
            buf.truncate(len);
            Ok(Reply::Bulk(Some(buf)))
        }
        b'*' => {
            let count = parse_int(rest)?;
            if count == -1 {
                return Ok(Reply::Array(None));
            }
            if count < 0 {
                return Err(Error::Protocol(format!("bad array length {count}")));
            }
            // Do not trust the header for the allocation size.
            let mut items = Vec::with_capacity(usize::try_from(count.min(1024)).unwrap_or(0));
            for _ in 0..count {
                items.push(read_at_depth(r, depth + 1)?);
            }
            Ok(Reply::Array(Some(items)))
        }
        _ => Err(Error::Protocol(format!("unknown reply type in {line:?}"))),
    }
}

/// Reads one CRLF-terminated, non-empty line and returns it without the CRLF.
fn read_line<R: BufRead>(r: &mut R) -> Result<String> {
    let mut buf = Vec::new();
    r.by_ref().take(MAX_LINE).read_until(b'\n', &mut buf)?;
    if buf.is_empty() {
        return Err(Error::Protocol("connection closed before a reply".into()));
    }
    if !buf.ends_with(b"\r\n") {
        return Err(Error::Protocol(format!(
            "line not terminated by CRLF (or longer than {MAX_LINE} bytes): {:?}",
            String::from_utf8_lossy(&buf)
        )));
    }
    buf.truncate(buf.len() - 2);
    if buf.is_empty() {
        return Err(Error::Protocol("empty line".into()));
    }
    String::from_utf8(buf).map_err(|e| Error::Protocol(format!("line is not UTF-8: {e}")))
}

fn parse_int(s: &str) -> Result<i64> {
    s.parse()
        .map_err(|_| Error::Protocol(format!("bad integer {s:?}")))
}

/// Sends one command over a fresh connection and reads one reply, each step bounded by
/// `timeout`.
pub(crate) fn request(
    addr: SocketAddr,
    password: Option<&str>,
    args: &[&[u8]],
    timeout: Duration,
) -> Result<Reply> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    if let Some(password) = password {
        stream.write_all(&encode(&[b"AUTH", password.as_bytes()]))?;
        stream.flush()?;
        match read_reply(&mut reader)? {
            Reply::Status(ok) if ok == "OK" => {}
            other => return Err(Error::Protocol(format!("AUTH refused: {other:?}"))),
        }
    }
    stream.write_all(&encode(args))?;
    stream.flush()?;
    read_reply(&mut reader)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Reply> {
        read_reply(&mut &bytes[..])
    }

    #[test]
    fn encodes_commands() {
        assert_eq!(
            encode(&[b"SET", b"k", b""]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n".to_vec()
        );
    }

    #[test]
    fn parses_scalars() {
        assert_eq!(parse(b"+PONG\r\n").unwrap(), Reply::Status("PONG".into()));
        assert_eq!(
            parse(b"-ERR no\r\n").unwrap(),
            Reply::Error("ERR no".into())
        );
        assert_eq!(parse(b":-7\r\n").unwrap(), Reply::Int(-7));
        assert_eq!(parse(b"$-1\r\n").unwrap(), Reply::Bulk(None));
        assert_eq!(
            parse(b"$4\r\na\r\nb\r\n").unwrap(),
            Reply::Bulk(Some(b"a\r\nb".to_vec()))
        );
        assert_eq!(parse(b"$0\r\n\r\n").unwrap(), Reply::Bulk(Some(Vec::new())));
    }

    #[test]
    fn parses_nested_arrays() {
        let reply = parse(b"*3\r\n:1\r\n*-1\r\n*2\r\n$1\r\nx\r\n+y\r\n").unwrap();
        assert_eq!(
            reply,
            Reply::Array(Some(vec![
                Reply::Int(1),
                Reply::Array(None),
                Reply::Array(Some(vec![
                    Reply::Bulk(Some(b"x".to_vec())),
                    Reply::Status("y".into())
                ])),
            ]))
        );
        assert_eq!(
            reply.as_array().unwrap()[2].as_array().unwrap()[0].as_str(),
            Some("x")
        );
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            &b""[..],
            b"\r\n",
            b"?x\r\n",
            "\u{e9}x\r\n".as_bytes(),
            b":12a\r\n",
            b"+no-crlf\n",
            b"$3\r\nabcd\r\n",
            b"$-2\r\n",
            b"*-5\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(Error::Protocol(_))),
                "{:?} parsed as {:?}",
                String::from_utf8_lossy(bad),
                parse(bad)
            );
        }
        // Truncated bulk: the reader runs dry, an I/O error.
        assert!(matches!(parse(b"$5\r\nab"), Err(Error::Io(_))));
    }
}
