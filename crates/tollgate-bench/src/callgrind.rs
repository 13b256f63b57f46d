//! Instructions per request, counted by valgrind's callgrind: the http suite's deterministic
//! measure.
//!
//! On a shared VM the timings of one case move by 25 % from run to run, more than the few percent
//! that separate a hello-world route with and without a rate limiter. The number of user-space
//! instructions the server executes per request hardly moves: the same case gives the same count
//! to within about 1 % (2 % in quick runs: what is left is the fixed cost of a run, such as wrk's
//! connections, spread over a number of requests that varies). So, when `valgrind` is installed,
//! the http suite serves each case once more under callgrind, loads it with wrk (a warm-up, then the counters zeroed with
//! `callgrind_control -z`, then the measured run, then `callgrind_control -d`), and divides the
//! dumped instruction total by the requests wrk counted. The kernel's share of a request (its TCP
//! work, most of the CPU time on this route) is not counted, so these ratios are further from 1
//! than the throughput ratios; they tell apart where a request's user-space work goes.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::BoxError;

/// Whether `valgrind` and `callgrind_control` both run.
pub(crate) fn installed() -> bool {
    ["valgrind", "callgrind_control"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// A scratch directory for one run's callgrind files and valgrind's gdbserver pipes, made fresh
/// (never an existing directory) and removed when dropped.
pub(crate) struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    pub(crate) fn new() -> Result<Scratch, BoxError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "tollgate-bench-callgrind-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir(&dir)?;
        Ok(Scratch { dir })
    }

    /// Where valgrind's gdbserver (which `callgrind_control` talks to) puts its pipes: here, so
    /// a server killed at the end of its measurement leaves nothing behind in the temp dir.
    fn vgdb_prefix(&self) -> String {
        format!("--vgdb-prefix={}", self.dir.join("vgdb").display())
    }

    /// The valgrind command line that runs a server of `case` under callgrind, writing into
    /// this directory.
    pub(crate) fn wrapper(&self, case: &str) -> Vec<String> {
        vec![
            "valgrind".to_owned(),
            "--quiet".to_owned(),
            "--tool=callgrind".to_owned(),
            self.vgdb_prefix(),
            format!(
                "--callgrind-out-file={}",
                self.dir.join(format!("{case}.out")).display()
            ),
        ]
    }

    /// Sends `callgrind_control <action> <pid>` (`-z` zeroes the counters, `-d` dumps them) and
    /// waits for callgrind to carry it out, at most 30 s. `callgrind_control` exits with 0 even
    /// when it reached no callgrind run, so success is its `OK.` line.
    pub(crate) fn control(&self, action: &str, pid: u32) -> Result<(), BoxError> {
        let mut child = Command::new("callgrind_control")
            .args([self.vgdb_prefix().as_str(), action, &pid.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(
                    format!("callgrind_control {action} {pid} did not finish in 30 s").into(),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output()?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if said.contains("OK.") && !said.contains("Error") {
            Ok(())
        } else {
            Err(format!("callgrind_control {action} {pid}: {}", said.trim()).into())
        }
    }

    /// The instruction total of the last dump of `case` (`<case>.out.<n>`, the highest `n`).
    pub(crate) fn last_dump_total(&self, case: &str) -> Result<u64, BoxError> {
        let prefix = format!("{case}.out.");
        let mut last: Option<(u32, PathBuf)> = None;
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let n = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|n| n.parse::<u32>().ok());
            if let Some(n) = n
                && last.as_ref().is_none_or(|(m, _)| n > *m)
            {
                last = Some((n, path));
            }
        }
        let (_, path) = last.ok_or_else(|| format!("callgrind wrote no dump for `{case}`"))?;
        let text = std::fs::read_to_string(&path)?;
        total_of(&text).ok_or_else(|| format!("no instruction total in {}", path.display()).into())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `totals:` line of a callgrind file (the `summary:` line when there is none): the event
/// count, here instructions (`Ir`).
fn total_of(text: &str) -> Option<u64> {
    let line = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    line("totals:").or_else(|| line("summary:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_instruction_total() {
        let file = "# callgrind format\nversion: 1\ncmd: tollgate-bench --serve bare\n\
                    events: Ir\nsummary: 532118449\nfn=(1) main\n3 15\ntotals: 532120129\n";
        assert_eq!(total_of(file), Some(532_120_129));
        assert_eq!(total_of("events: Ir\nsummary: 42\n"), Some(42));
        assert_eq!(total_of("events: Ir\n"), None);
    }
}
