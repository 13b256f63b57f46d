//! Smoke tests against real `redis-server` processes.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use tollgate_testkit::{Error, RedisCluster, RedisServer, Reply};

fn ok() -> Reply {
    Reply::Status("OK".into())
}

fn cluster_info(node: &RedisServer) -> String {
    node.cmd(&["CLUSTER", "INFO"])
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn single_node_roundtrip_stop_restart() {
    let mut server = RedisServer::start().unwrap();
    let port = server.port();
    assert_eq!(server.url(), format!("redis://127.0.0.1:{port}"));
    assert_eq!(server.addr().port(), port);
    assert!(server.dir().join("redis.log").is_file());
    assert!(
        server.log().contains("Ready to accept connections"),
        "{}",
        server.log()
    );
    assert!(server.is_running());

    assert_eq!(server.cmd(&["PING"]).unwrap(), Reply::Status("PONG".into()));
    assert_eq!(server.cmd(&["SET", "tollgate:k", "v 1\r\n"]).unwrap(), ok());
    assert_eq!(
        server.cmd(&["GET", "tollgate:k"]).unwrap(),
        Reply::Bulk(Some(b"v 1\r\n".to_vec()))
    );
    assert_eq!(
        server.cmd(&["INCRBY", "tollgate:n", "5"]).unwrap(),
        Reply::Int(5)
    );
    assert_eq!(
        server.cmd(&["GET", "tollgate:missing"]).unwrap(),
        Reply::Bulk(None)
    );
    assert!(server.cmd(&["NOSUCHCOMMAND"]).unwrap().is_error());
    // Nothing is persisted.
    let save = server.cmd(&["CONFIG", "GET", "save"]).unwrap();
    assert_eq!(save.as_array().unwrap()[1].as_str(), Some(""), "{save:?}");
    let aof = server.cmd(&["CONFIG", "GET", "appendonly"]).unwrap();
    assert_eq!(aof.as_array().unwrap()[1].as_str(), Some("no"), "{aof:?}");

    server.stop();
    assert!(!server.is_running());
    let refused = TcpStream::connect(server.addr()).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);
    assert!(matches!(server.cmd(&["PING"]), Err(Error::Io(_))));
    server.stop(); // idempotent

    server.restart().unwrap();
    assert!(server.is_running());
    assert_eq!(server.port(), port);
    assert_eq!(server.cmd(&["PING"]).unwrap(), Reply::Status("PONG".into()));
    assert_eq!(
        server.cmd(&["GET", "tollgate:k"]).unwrap(),
        Reply::Bulk(None)
    );
    assert_eq!(server.cmd(&["DBSIZE"]).unwrap(), Reply::Int(0));

    let dir = server.dir().to_owned();
    drop(server);
    assert!(!dir.exists(), "temp dir {} not removed", dir.display());
    let refused = TcpStream::connect(("127.0.0.1", port)).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);
}

#[test]
fn servers_in_parallel_are_independent() {
    let servers: Vec<RedisServer> = thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| RedisServer::start().unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, server) in servers.iter().enumerate() {
        assert_eq!(server.cmd(&["SET", "who", &i.to_string()]).unwrap(), ok());
    }
    for (i, server) in servers.iter().enumerate() {
        assert_eq!(
            server.cmd(&["GET", "who"]).unwrap().as_str(),
            Some(i.to_string().as_str())
        );
    }
}

#[test]
fn cluster_forms_routes_keys_and_heals() {
    let mut cluster = RedisCluster::start().unwrap();
    assert_eq!(cluster.nodes().len(), 3);
    assert_eq!(cluster.urls().len(), 3);
    for node in cluster.nodes() {
        let info = cluster_info(node);
        assert!(info.contains("cluster_state:ok"), "{info}");
        assert!(info.contains("cluster_known_nodes:3"), "{info}");
        assert!(info.contains("cluster_slots_assigned:16384"), "{info}");
    }

    // Each key is written through node 0, following one MOVED redirection if needed; the
    // node that accepts it must be the one `node_for_key` names. 30 keys hit all 3 nodes.
    let mut owners = [0usize; 3];
    for k in 0..30 {
        let key = format!("tollgate:key:{k}");
        let owner = cluster.node_for_key(&key).unwrap();
        owners[owner] += 1;
        let value = format!("value {k}");
        let reply = cluster.nodes()[0].cmd(&["SET", &key, &value]).unwrap();
        let target = match reply {
            Reply::Status(s) if s == "OK" => 0,
            Reply::Error(e) if e.starts_with("MOVED ") => {
                // MOVED <slot> <host>:<port>
                let addr = e.rsplit(' ').next().unwrap();
                let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
                let i = cluster
                    .nodes()
                    .iter()
                    .position(|n| n.port() == port)
                    .unwrap();
                assert_eq!(
                    cluster.nodes()[i].cmd(&["SET", &key, &value]).unwrap(),
                    ok()
                );
                i
            }
            other => panic!("unexpected SET reply {other:?}"),
        };
        assert_eq!(target, owner, "{key}");
        assert_eq!(
            cluster.nodes()[owner].cmd(&["GET", &key]).unwrap().as_str(),
            Some(value.as_str())
        );
    }
    assert!(owners.iter().all(|&n| n > 0), "keys per node: {owners:?}");

    // Outage of node 1: the others notice and declare the cluster failed...
    cluster.stop_node(1);
    assert!(!cluster.node_mut(1).is_running());
    assert!(matches!(
        cluster.wait_ok(Duration::from_millis(300)),
        Err(Error::NotReady { .. })
    ));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster_info(&cluster.nodes()[0]).contains("cluster_state:fail") {
        assert!(
            Instant::now() < deadline,
            "node 0 never noticed node 1 is down"
        );
        thread::sleep(Duration::from_millis(100));
    }

    // ...and it heals once node 1 is back with its old identity.
    let port = cluster.nodes()[1].port();
    cluster.restart_node(1).unwrap();
    assert_eq!(cluster.nodes()[1].port(), port);
    cluster.wait_ok(Duration::from_secs(5)).unwrap();
    for node in cluster.nodes() {
        let info = cluster_info(node);
        assert!(info.contains("cluster_state:ok"), "{info}");
        assert!(info.contains("cluster_known_nodes:3"), "{info}");
    }
    // Node 1 serves its slots again, without its old data.
    let key = (0..)
        .map(|k| format!("tollgate:key:{k}"))
        .find(|key| cluster.node_for_key(key).unwrap() == 1)
        .unwrap();
    let node1 = &cluster.nodes()[1];
    assert_eq!(node1.cmd(&["GET", &key]).unwrap(), Reply::Bulk(None));
    assert_eq!(node1.cmd(&["SET", &key, "again"]).unwrap(), ok());
    assert_eq!(node1.cmd(&["GET", &key]).unwrap().as_str(), Some("again"));
}

#[test]
fn not_installed_says_how_to_install() {
    for program in ["redis-server", "redis-cli"] {
        let message = Error::NotInstalled { program }.to_string();
        assert!(
            message.starts_with(&format!("{program} not found on PATH")),
            "{message}"
        );
        assert!(
            message.contains("apt-get install redis-server"),
            "{message}"
        );
    }
}

/// A test process killed with `SIGKILL` (a harness timeout, `kill -9`) never runs `Drop`; its
/// `redis-server` must not outlive it anyway.
#[test]
fn a_server_does_not_outlive_a_killed_owner() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mut owner = Command::new(env!("CARGO_BIN_EXE_tollgate-testkit-hold"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("the helper starts");
    let mut line = String::new();
    BufReader::new(owner.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the helper prints its port");
    let port: u16 = line
        .trim()
        .strip_prefix("port ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected helper output {line:?}"));
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "the server answers while its owner lives"
    );
    owner.kill().expect("SIGKILL the owner");
    owner.wait().expect("reap the owner");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
            _ if Instant::now() >= deadline => {
                panic!("redis-server on port {port} still runs 10 s after its owner was killed")
            }
            _ => thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn a_server_with_a_password_asks_for_it() {
    let server = RedisServer::start_with_password("pw-1").unwrap();
    // The kit authenticates its own commands.
    assert_eq!(server.cmd(&["SET", "k", "v"]).unwrap(), ok());
    // Anyone else is refused until they do.
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    std::io::Write::write_all(&mut stream, b"GET k\r\n").unwrap();
    let mut reply = [0u8; 7];
    std::io::Read::read_exact(&mut stream, &mut reply).unwrap();
    assert_eq!(&reply, b"-NOAUTH");
}
