//! The workspace's integration tests: one binary, one module per concern.
//!
//! PostgreSQL tests need a server: `DATABASE_URL`, or the `testcontainers` feature with
//! Docker; `cargo xtask test` finds one by itself. They never skip silently.

mod cli;
mod cli_ops;
mod dashboard;
mod faults;
mod migrations;
mod observe;
mod pgbouncer;
mod queue_pg;
mod runner;
mod sqlite;
mod storage_pg;
mod support;
mod tidy;
mod worker_ops;

// The fixtures at the crate root, where the chaos target (which shares
// `support`) mounts them too.
use faults::fixtures;
