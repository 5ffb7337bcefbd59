//! `hephaestus bench workflow`: burn-down and latency of workflows on
//! PostgreSQL. (Being built: see issue 6.)

use anyhow::{Result, bail};
use clap::Args;

/// Workflow benchmark options.
#[derive(Debug, Args)]
pub struct WorkflowBench {
    /// Instances to start.
    #[arg(long, default_value_t = 1000)]
    instances: usize,
}

impl WorkflowBench {
    pub async fn run(self) -> Result<()> {
        bail!("bench workflow is not built yet ({} instances asked)", self.instances)
    }
}
