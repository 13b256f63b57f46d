//! Network faults: [`Blackhole`], a port whose packets are dropped.

use std::process::Command;

use crate::error::{Error, Result};
use crate::server::find_program;

/// Every TCP packet to or from a local port dropped, as on a network partition: connections
/// already open stay open but carry nothing (no reset, no error, only silence), and new ones
/// never finish their handshake. Dropping the value lifts the fault.
///
/// Made of two `iptables` rules on the `INPUT` chain (loopback traffic passes it both ways):
/// `--dport PORT -j DROP` and `--sport PORT -j DROP`, each tagged with a comment naming this
/// process, so a rule is easy to find in `iptables -S` if a test is killed before it cleans up.
/// Needs `iptables` and the right to change the rules (root, or `CAP_NET_ADMIN`). Rules for
/// different ports do not interfere, so tests in parallel can each cut their own server off.
#[derive(Debug)]
pub struct Blackhole {
    port: u16,
    /// The rules added, as `iptables` arguments after the `-I`/`-D` chain name.
    rules: Vec<Vec<String>>,
}

impl Blackhole {
    /// Starts dropping every packet to and from `port` on this host.
    ///
    /// # Errors
    ///
    /// [`Error::NotInstalled`] if `iptables` is missing, [`Error::Command`] if it refuses the
    /// rule (not root, no `CAP_NET_ADMIN`, no `iptables` kernel support); then no rule is left.
    pub fn port(port: u16) -> Result<Blackhole> {
        find_program("iptables")?;
        let comment = format!("tollgate-testkit pid {}", std::process::id());
        let mut hole = Blackhole {
            port,
            rules: Vec::new(),
        };
        for direction in ["--dport", "--sport"] {
            let rule: Vec<String> = [
                "-p",
                "tcp",
                direction,
                &port.to_string(),
                "-m",
                "comment",
                "--comment",
                &comment,
                "-j",
                "DROP",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            // On failure, the rules added so far are removed when `hole` is dropped.
            iptables("-I", &rule)?;
            hole.rules.push(rule);
        }
        Ok(hole)
    }

    /// The port cut off.
    pub fn cut_port(&self) -> u16 {
        self.port
    }

    /// Lifts the fault now (what dropping does), reporting a rule that could not be removed.
    ///
    /// # Errors
    ///
    /// [`Error::Command`] if `iptables` refuses to delete a rule.
    pub fn lift(mut self) -> Result<()> {
        self.remove()
    }

    fn remove(&mut self) -> Result<()> {
        let mut first_error = None;
        for rule in self.rules.drain(..) {
            if let Err(e) = iptables("-D", &rule) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!(
                "tollgate-testkit: could not lift the blackhole on port {}: {e}",
                self.port
            );
        }
    }
}

/// Runs `iptables -w <op> INPUT <rule...>`; `-w` waits for the xtables lock, which parallel
/// tests may hold.
fn iptables(op: &str, rule: &[String]) -> Result<()> {
    let mut command = Command::new("iptables");
    command.args(["-w", op, "INPUT"]).args(rule);
    let command_line = format!("iptables -w {op} INPUT {}", rule.join(" "));
    let output = command.output().map_err(|source| Error::Spawn {
        program: command_line.clone(),
        source,
    })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            command: command_line,
            status: output.status.to_string(),
            output: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}
