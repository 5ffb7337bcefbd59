//! `hephaestus demo`: the order-flow example (`examples/order_flow`, its
//! library) on the embedded in-memory backend — no database. Two orders run
//! through branching, a fan-out and its join, a dynamic route, an event
//! resumed from outside and a durable timer; every step is printed as it
//! runs, then each instance's final state.
//!
//! `hephaestus demo --sqlite FILE` runs it durably, on a SQLite file: kill
//! it (`kill -9`) in the middle and start it again with the same file, and it
//! finishes the same two orders, without running a step whose result was
//! recorded again.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

/// `demo` options.
#[derive(Debug, Args)]
pub struct DemoCommand {
    /// Run on this SQLite database file (created if missing) instead of in
    /// memory: a second run with the same file finishes the first run's
    /// orders.
    #[arg(long, value_name = "FILE")]
    sqlite: Option<PathBuf>,
}

impl DemoCommand {
    pub async fn run(self) -> Result<()> {
        let Some(path) = self.sqlite else {
            println!("the order-flow demo, on the in-memory backend (no database)");
            return order_flow::run_in_memory().await;
        };
        let backend = hephaestus_sqlite::SqliteBackend::open_migrated(
            hephaestus_sqlite::SqliteOptions::new(&path),
        )
        .await?;
        let lock = backend.lock_worker().await?;
        println!(
            "the order-flow demo, on the SQLite file {} (durable: kill it and run it again)",
            path.display()
        );
        let runtime = hephaestus_runner::Runtime::builder(backend.clone())
            .discard_handler(hephaestus_failure_handler::FailureHandler::new())
            .config(order_flow::config())
            .workflow(order_flow::checkout()?)
            .build()?;
        let outcome = order_flow::run_durable(&runtime).await;
        lock.release().await;
        backend.close().await;
        outcome
    }
}
