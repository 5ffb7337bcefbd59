//! Fault injection.
//!
//! - `chaos`: three `hephaestus worker` processes run the fixture workflows
//!   (`crates/cli/src/fixtures.rs`, compiled in here too) while the test
//!   SIGKILLs and restarts a random one every few hundred milliseconds,
//!   restarts PostgreSQL once in the middle, and resumes waiting instances;
//!   then it checks that every instance ended as its script says, that every
//!   step result was applied exactly once, and that user code ran at least
//!   once and at most `max_attempts` times per activation. The seed is
//!   printed; `HEPHAESTUS_FAULTS_SEED=<n>` replays a run's scripts and fault
//!   schedule (timing still varies). The test holds the server alone (see
//!   `support::exclusive`) because the restart breaks every connection.
//!   The restart needs a local Debian cluster (`pg_ctlcluster`) serving
//!   `DATABASE_URL` and the permission to restart it; otherwise that part is
//!   skipped with a printed reason (`HEPHAESTUS_FAULTS_NO_PG_RESTART=1`
//!   skips it on purpose).
//! - `bad_input`: corrupt job arguments, an instance whose workflow is no
//!   longer registered, a panicking step, a resume of a finished instance,
//!   in-process on both backends: each is a clear recorded error, and an
//!   instance running alongside completes.
//! - `boundary`: what enters at the boundary (JSON that is not an object,
//!   nested too deep or too large; zero delays) is refused with a typed
//!   error and nothing stored; every value at the limits reads back
//!   identically; a row the single writer refuses keeps its reason and
//!   never blocks a valid result. On both backends.
//!
//! Soak mode: `cargo xtask soak --soak-seconds 600 [--seed S]` (which builds
//! the release binary and sets `HEPHAESTUS_SOAK_SECONDS=600`,
//! `HEPHAESTUS_BIN` and `HEPHAESTUS_FAULTS_SEED` for `cargo test -p
//! hephaestus-tests -- faults::chaos --nocapture`) keeps starting workflows
//! (at the same rate as the normal run) and injecting faults for that long,
//! restarting PostgreSQL once halfway, then runs the same checks.
//!
//! The `hephaestus` binary: `HEPHAESTUS_BIN` when set (a path), else the test
//! builds it with `$CARGO build -p hephaestus-cli --bin hephaestus` (printed)
//! and takes the executable's path from cargo's JSON messages, so it works on
//! a clean clone and with any target directory.

mod bad_input;
mod boundary;
mod chaos;
#[allow(
    dead_code,
    reason = "the worker's half of the fixture (its CLI) does not run in the tests"
)]
#[path = "../../crates/cli/src/fixtures.rs"]
pub(crate) mod fixtures;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The `hephaestus` executable (see the module documentation).
pub fn hephaestus_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("HEPHAESTUS_BIN").filter(|p| !p.is_empty()) {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "HEPHAESTUS_BIN={} is not a file",
                path.display()
            );
            eprintln!("faults: using HEPHAESTUS_BIN={}", path.display());
            return path;
        }
        build_bin()
    })
    .clone()
}

fn build_bin() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(&cargo);
    command
        .args([
            "build",
            "-p",
            "hephaestus-cli",
            "--bin",
            "hephaestus",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(crate::support::repo_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!("faults: building the worker binary: {command:?}");
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
    assert!(
        output.status.success(),
        "building the hephaestus binary failed ({}); set HEPHAESTUS_BIN to a built one",
        output.status
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter(|message| message["target"]["name"] == "hephaestus")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported the hephaestus executable")
}
