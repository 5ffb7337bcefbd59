//! An order workflow, end to end, on the in-memory backend (no database) or
//! on PostgreSQL. The workflow and the scripted run live in this package's
//! library (`order_flow`), which `hephaestus demo` runs too.
//!
//! Run: `cargo run -p order-flow` (in memory), or
//! `cargo run -p order-flow -- --database-url postgres://...` (PostgreSQL: it
//! creates and migrates the schema `order_flow_demo`).

use std::time::Duration;

use anyhow::{Context, Result};
use hephaestus_runner::Runtime;

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = order_flow::config();
    match args.as_slice() {
        [] => order_flow::run_in_memory().await,
        [flag, url] if flag == "--database-url" => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(12)
                .connect(url)
                .await
                .with_context(|| format!("cannot connect to {url}"))?;
            let prefix = hephaestus_migrations_gen::SchemaPrefix::new("order_flow_demo")?;
            sqlx::raw_sql(&format!("create schema if not exists {}", prefix.quoted()))
                .execute(&pool)
                .await?;
            hephaestus_storage_pg::migrate(&pool, &prefix).await?;
            hephaestus_queue_pg::migrate(&pool, &prefix).await?;
            let backend = hephaestus_runner::postgres::PgBackend::new(
                hephaestus_storage_pg::PgStore::new(pool.clone(), prefix.clone()),
                hephaestus_queue_pg::PgQueue::new(pool, prefix),
            );
            println!("on PostgreSQL, schema order_flow_demo");
            let runtime = Runtime::builder(backend)
                .discard_handler(hephaestus_failure_handler::FailureHandler::new())
                .config(config)
                .workflow(order_flow::checkout()?)
                .build()?;
            // Production workers on PostgreSQL: queue-pg's worker runtime
            // (LISTEN/NOTIFY, batched fetches, heartbeats, leader-elected
            // rescue), with the failure handler attached above.
            let workers = runtime.queue_runtime()?.start().await?;
            let outcome = order_flow::demo(&run_suffix(), &runtime).await;
            workers.shutdown(Duration::from_secs(10)).await;
            outcome
        }
        _ => anyhow::bail!("usage: order-flow [--database-url postgres://user@host/db]"),
    }
}

/// A database outlives a run: give each run its own order numbers, since a
/// business id is unique among active instances.
fn run_suffix() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{secs}")
}
