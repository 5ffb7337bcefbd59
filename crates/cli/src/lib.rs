//! # hephaestus-cli
//!
//! The `hephaestus` command, as a library: build your own `hephaestus`
//! binary with your workflows registered, so that `instances resume`,
//! `instances retry`, `instances cancel`, `worker` and `graph` know them.
//!
//! Commands: `migrate up|down|status`, `gen-migration`, `instances list`,
//! `instances show`, `instances resume`, `instances cancel`, `instances
//! retry`, `jobs`, `prune`, `graph`, `dashboard`, `worker`, `demo`, `bench
//! queue` and `bench workflow` (`hephaestus --help` says more). Reads take `--json` and
//! print one JSON object on stdout; errors go to stderr with a non-zero exit
//! code and say what is wrong and what to run. Logs go to stderr, filtered
//! by `RUST_LOG` ([`logging`]); a command whose stdout is closed early
//! (`| head`) ends quietly.
//!
//! Which commands need the workflow definitions: `instances list`,
//! `instances show`, `jobs`, `prune` and `migrate` work for any instance in
//! the schema (`show` draws the DAG from the instance's stored step states
//! when it does not know the definition). `instances resume` (the event is
//! validated against the step), `instances retry` (the engine restarts the
//! failed steps), `instances cancel` (the runner applies the cancel through
//! the engine, which checks the instance against its definition) and
//! `worker` need the instance's workflow version registered in the binary,
//! and fail with an error naming it otherwise.
//!
//! The stock binary registers the fixture workflows of the test suite
//! ([`FixtureWorkflows`]). Your own:
//!
//! ```no_run
//! use hephaestus_cli::{App, Setup};
//! use hephaestus_engine_core::prelude::*;
//! use hephaestus_engine_core::steps::{Done, FnStep};
//! use hephaestus_runner::RuntimeBuilder;
//! use hephaestus_runner::postgres::PgBackend;
//!
//! fn register(
//!     builder: RuntimeBuilder<PgBackend>,
//!     _setup: &Setup,
//! ) -> anyhow::Result<RuntimeBuilder<PgBackend>> {
//!     let ship = FnStep::new("orders::Ship", ["shipped"], |_| StepOutcome::complete("shipped"));
//!     let workflow = Workflow::builder("orders::Shipping")
//!         .unique("order", Scope::Workflow)
//!         .start(ship.clone())
//!         .on(ship, "shipped", Done)
//!         .build()?;
//!     Ok(builder.workflow(workflow))
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     App::new(register).run()
//! }
//! ```
//!
//! A registration that needs to await something (a client to connect, a
//! table to create) implements [`Workflows`] instead of being a closure;
//! [`Setup::runs_steps`] tells it whether steps will run in this process
//! (only in `worker`) or the definitions are only looked at.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod app;
mod bench;
mod dashboard;
mod database;
mod demo;
mod fixtures;
mod graph;
mod instances;
mod jobs;
pub mod logging;
mod migrate;
pub mod observe;
mod prune;
mod worker;

pub use app::{App, FixtureWorkflows, Setup, Workflows};

/// Hephaestus: durable workflows on PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "hephaestus", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Applies, reverts or shows the schema's migrations.
    Migrate(migrate::MigrateCommand),
    /// Writes the migration SQL files for your own migration tool.
    GenMigration(migrate::GenMigrationCommand),
    /// Lists, shows, resumes, cancels and retries workflow instances.
    Instances {
        #[command(subcommand)]
        command: instances::InstancesCommand,
    },
    /// Shows the job queue: jobs by queue and state, the oldest waiting job
    /// per queue, recent errors.
    Jobs(jobs::JobsCommand),
    /// Deletes finished jobs and processed step results older than a
    /// duration (with --instances, finished instances too).
    Prune(prune::PruneCommand),
    /// Serves the web dashboard: instances, their DAG, jobs and workflows,
    /// with resume, cancel, retry and start (behind a token) or read-only.
    Dashboard(dashboard::DashboardCommand),
    /// Prints a registered workflow's DAG (terminal drawing, or DOT with --dot).
    Graph(graph::GraphCommand),
    /// Runs a worker process for the registered workflows on PostgreSQL.
    Worker(worker::WorkerCommand),
    /// Runs the order-flow demo on the in-memory backend (no database).
    Demo(demo::DemoCommand),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        bench: bench::Bench,
    },
}

impl App {
    /// Parses the process's arguments, runs the command and returns the exit
    /// code (errors are printed on stderr).
    pub fn run(self) -> ExitCode {
        self.run_with_args(std::env::args_os())
    }

    /// [`App::run`] with the given arguments (the first is the program name).
    pub fn run_with_args<I, T>(self, args: I) -> ExitCode
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cli = Cli::parse_from(args);
        if !matches!(cli.command, Command::Worker(_)) {
            // A command printing into a closed pipe (`| head`) ends quietly
            // like any Unix tool, instead of panicking on the write. A
            // worker keeps ignoring SIGPIPE: its supervisor closing stdout
            // must not kill it without a graceful stop.
            sigpipe::reset();
        }
        // The worker installs its own subscriber (its log format, the trace
        // exporter) and the benchmarks only the exporter: their output is
        // their report.
        if !matches!(cli.command, Command::Worker(_) | Command::Bench { .. })
            && let Err(error) = logging::init(&logging::LogOptions::from_env())
        {
            eprintln!("hephaestus: {error}");
            return ExitCode::FAILURE;
        }
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
                Command::Migrate(migrate) => migrate.run().await,
                Command::GenMigration(generate) => generate.run(),
                Command::Instances { command } => command.run(&self).await,
                Command::Jobs(jobs) => jobs.run().await,
                Command::Prune(prune) => prune.run().await,
                Command::Dashboard(dashboard) => dashboard.run(&self).await,
                Command::Graph(graph) => graph.run(&self).await,
                Command::Worker(worker) => worker.run(&self).await,
                Command::Demo(demo) => demo.run().await,
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
}
