//! `hephaestus`: the command-line tool of Hephaestus for Rust, with the
//! fixture workflows registered. Build your own with your workflows: see the
//! `hephaestus_cli` library.

use std::process::ExitCode;

/// A worker allocates and frees per step (instances, JSON, rows): mimalloc
/// does that at a fraction of glibc's cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    hephaestus_cli::App::default().run()
}
