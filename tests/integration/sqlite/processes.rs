//! What the SQLite backend promises about processes, with real processes:
//! one worker per file (a second is refused; a killed one's lock is freed at
//! once), and a durable demo that, killed with SIGKILL and started again on
//! the same file, finishes the same orders without running a recorded step
//! again.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support::bin::hephaestus_bin;
use crate::support::sqlite::TempDir;

/// A child whose stdout lines arrive on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(hephaestus_bin())
            .args(args)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hephaestus");
        let stdout = child.stdout.take().expect("a piped stdout");
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (at most a minute) for a line containing `needle`.
    fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.seen.iter().any(|l| l.contains(needle)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(e) => panic!("no line with {needle:?} ({e}); saw {:?}", self.seen),
            }
        }
    }

    fn kill(mut self) -> Vec<String> {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
        self.seen.extend(self.lines.try_iter());
        self.seen
    }
}

fn sqlite_url(path: &std::path::Path) -> String {
    format!("sqlite://{}", path.display())
}

#[test]
fn one_worker_per_file_and_a_killed_workers_lock_is_freed_at_once() {
    let dir = TempDir::new("sqlite-workers");
    let url = sqlite_url(&dir.join("jobs.db"));
    let mut first = Running::spawn(&["worker", "--database-url", &url]);
    first.wait_for("hephaestus worker ready");

    let second = Command::new(hephaestus_bin())
        .args(["worker", "--database-url", &url])
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .output()
        .expect("run a second worker");
    assert!(!second.status.success(), "a second worker must be refused");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("another hephaestus worker is running"),
        "{stderr}"
    );

    // Other commands still use the file while the worker runs.
    let migrate = Command::new(hephaestus_bin())
        .args(["migrate", "--database-url", &url, "status"])
        .output()
        .expect("run migrate status");
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );

    first.kill();
    let mut third = Running::spawn(&["worker", "--database-url", &url]);
    third.wait_for("hephaestus worker ready");
    third.kill();
}

/// Steps of order 1001 that run before its delivery is confirmed.
const BEFORE_DELIVERY: [&str; 5] = [
    "orders::Validate",
    "orders::ChargeCard",
    "orders::ReserveStock",
    "orders::Pack",
    "orders::Courier",
];

#[test]
fn a_killed_durable_demo_finishes_its_orders_without_running_a_recorded_step_again() {
    let dir = TempDir::new("sqlite-demo");
    let file = dir.join("demo.db");
    let file = file.to_str().expect("a UTF-8 path");
    let mut first = Running::spawn(&["demo", "--sqlite", file]);
    // Every step before the delivery has run and its result is applied
    // (the wait was reached); the one-second cool-off timer is pending.
    first.wait_for("the courier confirms delivery");
    let before = first.kill();
    for step in BEFORE_DELIVERY {
        assert!(
            before
                .iter()
                .any(|l| l.contains("[order::1001] ran") && l.contains(step)),
            "{step} ran before the kill: {before:?}"
        );
    }

    let second = Command::new(hephaestus_bin())
        .args(["demo", "--sqlite", file])
        .env("RUST_LOG", "error")
        .output()
        .expect("run the demo again");
    let out = String::from_utf8_lossy(&second.stdout);
    assert!(
        second.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(out.contains("found order::1001"), "the same order: {out}");
    assert!(out.contains("found order::1002"), "the same order: {out}");
    assert!(
        !out.contains("started order::"),
        "nothing new started: {out}"
    );
    for step in BEFORE_DELIVERY {
        assert!(
            !out.lines().any(|l| l.contains(" ran ") && l.contains(step)),
            "{step} ran again after the restart: {out}"
        );
    }
    assert!(out.contains("order::1001 is completed"), "{out}");
    assert!(out.contains("order::1002 is completed"), "{out}");
}
