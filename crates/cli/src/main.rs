//! `hephaestus`: the command-line tool of Hephaestus for Rust, with the
//! fixture workflows registered. Build your own with your workflows: see the
//! `hephaestus_cli` library.

use std::process::ExitCode;

fn main() -> ExitCode {
    hephaestus_cli::App::default().run()
}
