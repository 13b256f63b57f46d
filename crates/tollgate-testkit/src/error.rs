//! The crate's error type.

use std::io;

/// Shorthand for results whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while starting, driving or stopping Redis processes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A required program (`redis-server`, `redis-cli`, `iptables`) is not on `PATH`.
    #[error(
        "{program} not found on PATH: install it with `apt-get install {}` \
         (or run scripts/test, which installs it)",
        package_of(program)
    )]
    NotInstalled {
        /// The program that was looked for.
        program: &'static str,
    },

    /// A program was found but could not be started.
    #[error("failed to spawn {program}: {source}")]
    Spawn {
        /// The program (path) that failed to start.
        program: String,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },

    /// Any other I/O failure: temp dir creation, TCP connect/read/write, timeouts.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),

    /// Something did not become ready in time (or its process exited while we waited).
    #[error("{what}\n--- log tail ---\n{log}")]
    NotReady {
        /// What was being waited for, and why it failed.
        what: String,
        /// The tail of the relevant Redis log file(s).
        log: String,
    },

    /// An external command (e.g. `redis-cli --cluster create`) failed.
    #[error("`{command}` failed ({status}):\n{output}")]
    Command {
        /// The command line that was run.
        command: String,
        /// How it ended (exit status, or "timed out").
        status: String,
        /// Its combined stdout and stderr.
        output: String,
    },

    /// The server sent something that is not valid RESP2.
    #[error("RESP protocol error: {0}")]
    Protocol(String),
}

/// The Debian package that installs `program`.
fn package_of(program: &str) -> &'static str {
    match program {
        "iptables" => "iptables",
        // redis-cli comes with redis-server (through redis-tools).
        _ => "redis-server",
    }
}
