//! `hephaestus demo`: the order-flow example (`examples/order_flow`, its
//! library) on the embedded in-memory backend — no database. Two orders run
//! through branching, a fan-out and its join, a dynamic route, an event
//! resumed from outside and a durable timer; every step is printed as it
//! runs, then each instance's final state.

use anyhow::Result;
use clap::Args;

/// `demo` options (none yet).
#[derive(Debug, Args)]
pub struct DemoCommand {}

impl DemoCommand {
    pub async fn run(self) -> Result<()> {
        println!("the order-flow demo, on the in-memory backend (no database)");
        order_flow::run_in_memory().await
    }
}
