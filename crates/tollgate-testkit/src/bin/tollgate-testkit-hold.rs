//! Starts one `redis-server` with tollgate-testkit, prints `port N` and waits to be killed: used
//! by the tests to check that a server does not outlive a test process killed without `Drop`
//! running (`SIGKILL`).

use std::io::Write;

fn main() -> std::process::ExitCode {
    let server = match tollgate_testkit::RedisServer::start() {
        Ok(server) => server,
        Err(e) => {
            eprintln!("cannot start redis-server: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("port {}", server.port());
    let _ = std::io::stdout().flush();
    loop {
        std::thread::park();
    }
}
