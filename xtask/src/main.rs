//! Repository automation, run as `cargo xtask <command>` (an alias in `.cargo/config.toml`).
//!
//! - `gen-migration [--prefix P] [--out DIR] [--check]`: write (or check) the generated SQL
//!   migration files; see [`gen_migration`].
//! - `test [--] [cargo test args...]`: find or start a PostgreSQL for the tests, then run
//!   `cargo test --workspace`; see [`run_tests`].
//! - `soak --soak-seconds N [--seed S]`: the fault-injection test's soak mode with the
//!   release binary; see [`run_tests::soak`].

mod args;
mod gen_migration;
mod run_tests;

use std::path::PathBuf;
use std::process::ExitCode;

use args::Args;

const USAGE: &str = "usage:
  cargo xtask gen-migration [--prefix P] [--out DIR] [--check]
  cargo xtask test [-- extra cargo test args]
  cargo xtask soak --soak-seconds N [--seed S]";

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1);
    let command = argv.next();
    let rest: Vec<String> = argv.collect();
    let result = match command.as_deref() {
        Some("gen-migration") => gen_migration::run(Args::new(rest)),
        Some("test") => run_tests::run(rest),
        Some("soak") => run_tests::soak(Args::new(rest)),
        Some("help" | "--help" | "-h") => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        Some(other) => Err(anyhow::anyhow!("unknown command {other:?}\n{USAGE}")),
        None => Err(anyhow::anyhow!("no command given\n{USAGE}")),
    };
    result.unwrap_or_else(|error| {
        eprintln!("xtask: error: {error:#}");
        ExitCode::FAILURE
    })
}

/// The workspace root: the parent of this package's directory.
fn repo_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.clone(), PathBuf::from)
}
