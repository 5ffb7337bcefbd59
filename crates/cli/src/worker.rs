//! `hephaestus worker`: a worker process for the registered example
//! workflows. (Being built: see issue 6.)

use anyhow::{Result, bail};
use clap::Args;

/// Worker options.
#[derive(Debug, Args)]
pub struct WorkerCommand {
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
}

impl WorkerCommand {
    pub async fn run(self) -> Result<()> {
        bail!("worker is not built yet ({})", self.database_url.len())
    }
}
