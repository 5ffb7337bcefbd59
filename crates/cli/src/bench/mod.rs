//! `hephaestus bench ...`.

pub mod queue;

use clap::Subcommand;

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Burn-down benchmark of the job queue: insert N no-op jobs in
    /// batches, then start W workers and time the drain.
    Queue(queue::QueueBench),
}

impl Bench {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Queue(bench) => bench.run().await,
        }
    }
}
