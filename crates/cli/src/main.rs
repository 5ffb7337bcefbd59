//! `hephaestus`: the command-line tool of Hephaestus for Rust.
//!
//! Commands: `bench queue` (the job queue's burn-down benchmark), `bench
//! workflow` (workflows end to end) and `worker` (a worker process for the
//! example workflows, used by the fault-injection tests).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod fixtures;
mod graph;
mod migrate;
mod worker;

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
    /// Runs a worker process for the example workflows on PostgreSQL.
    Worker(worker::WorkerCommand),
    /// Prints a registered workflow's DAG (terminal drawing, or DOT with --dot).
    Graph(graph::GraphCommand),
    /// Applies, reverts or shows the schema's migrations.
    Migrate(migrate::MigrateCommand),
    /// Writes the migration SQL files for your own migration tool.
    GenMigration(migrate::GenMigrationCommand),
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
            Command::Worker(worker) => worker.run().await,
            Command::Graph(graph) => graph.run(),
            Command::Migrate(migrate) => migrate.run().await,
            Command::GenMigration(generate) => generate.run(),
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
