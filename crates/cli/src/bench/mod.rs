//! `hephaestus bench ...`.

mod common;
pub mod queue;
pub mod workflow;

use clap::Subcommand;

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Burn-down benchmark of the job queue: insert N no-op jobs in
    /// batches, then start W workers and time the drain.
    Queue(queue::QueueBench),
    /// Workflow benchmark: burn-down of N instances of a shape (diamond,
    /// linear, wide) and per-step orchestration latency.
    Workflow(workflow::WorkflowBench),
}

impl Bench {
    pub async fn run(self) -> anyhow::Result<()> {
        // With the `otel` feature and the `OTEL_*` variables asking for it,
        // the benchmark's workers export their traces (to measure the cost).
        let _traces = crate::observe::init_traces()?;
        match self {
            Self::Queue(bench) => bench.run().await,
            Self::Workflow(bench) => bench.run().await,
        }
    }
}
