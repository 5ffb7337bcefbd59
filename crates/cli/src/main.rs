//! `hephaestus`: the command-line tool of Hephaestus for Rust.
//!
//! Today it has one command, `hephaestus bench queue`, a burn-down benchmark
//! of the PostgreSQL job queue (see [`bench::queue`]).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;

/// Hephaestus: durable workflows on PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "hephaestus", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        bench: bench::Bench,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("hephaestus: cannot start the Tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Bench { bench } => bench.run().await,
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hephaestus: {error:#}");
            ExitCode::FAILURE
        }
    }
}
