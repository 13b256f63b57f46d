//! [`Blackhole`] against a real `redis-server`: silence while it holds, traffic again after.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tollgate_testkit::{Blackhole, Error, RedisServer, Reply};

fn ping(stream: &mut TcpStream) -> std::io::Result<String> {
    stream.write_all(b"PING\r\n")?;
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply)?;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

#[test]
fn a_blackholed_port_is_silent_until_lifted() {
    let server = RedisServer::start().unwrap();
    let mut open = TcpStream::connect(server.addr()).unwrap();
    open.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert_eq!(ping(&mut open).unwrap(), "+PONG\r\n");

    let hole = Blackhole::port(server.port()).unwrap();
    assert_eq!(hole.cut_port(), server.port());
    // The open connection carries nothing: no reply, and no reset either.
    let e = ping(&mut open).unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{e}"
    );
    // A new connection never completes its handshake.
    let e = TcpStream::connect_timeout(&server.addr(), Duration::from_millis(300)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");

    hole.lift().unwrap();
    // New connections work at once; the old one too, once TCP retransmits what it held.
    assert_eq!(server.cmd(&["PING"]).unwrap(), Reply::Status("PONG".into()));
    open.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = [0u8; 7];
    open.read_exact(&mut rest).unwrap();
    assert_eq!(&rest, b"+PONG\r\n");
}

#[test]
fn dropping_a_blackhole_lifts_it() {
    let server = RedisServer::start().unwrap();
    {
        let _hole = Blackhole::port(server.port()).unwrap();
        assert!(matches!(server_ping(&server), Err(Error::Io(_))));
    }
    assert_eq!(server_ping(&server).unwrap(), Reply::Status("PONG".into()));
}

fn server_ping(server: &RedisServer) -> tollgate_testkit::Result<Reply> {
    server.cmd(&["PING"])
}

#[test]
fn iptables_missing_says_how_to_install() {
    let message = Error::NotInstalled {
        program: "iptables",
    }
    .to_string();
    assert!(message.contains("apt-get install iptables"), "{message}");
}
