//! The discard hook for PostgreSQL: when queue-pg discards a runner job on
//! its own (a job whose worker kept dying until its attempts ran out), the
//! failure handler writes the consequences in the discarding transaction.

use hephaestus_queue_pg::{BoxError, DiscardHook, DiscardedJob, RuntimeBuilder, Workers};
use hephaestus_runner::Runtime;
use hephaestus_runner::postgres::PgBackend;
use sqlx::{Postgres, Transaction};

/// Fails the step or the instance of a discarded runner job, atomically
/// with the discard: see [`Runtime::handle_discarded`]. An error rolls the
/// discard back, and queue-pg tries again after the backoff.
#[derive(Debug, Clone)]
pub struct FailureHook {
    runtime: Runtime<PgBackend>,
}

impl FailureHook {
    /// The hook for `runtime`'s workflows.
    pub fn new(runtime: Runtime<PgBackend>) -> Self {
        Self { runtime }
    }
}

#[async_trait::async_trait]
impl DiscardHook for FailureHook {
    async fn on_discard(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        job: DiscardedJob<'_>,
    ) -> Result<(), BoxError> {
        self.runtime
            .handle_discarded(tx, job.lease, job.error)
            .await
            .map_err(|e| Box::new(e) as BoxError)
    }
}

/// The runner's workers for `runtime` with the failure handler's discard
/// hook: what a PostgreSQL worker process runs, through
/// [`Runtime::queue_runtime`] (or use [`queue_runtime`], which does both).
pub fn workers(runtime: &Runtime<PgBackend>) -> Workers {
    runtime.queue_workers(FailureHook::new(runtime.clone()))
}

/// The worker runtime of a PostgreSQL worker process: every runner job
/// kind, with the failure handler's discard hook, on the runtime's queues,
/// concurrency, heartbeats and rescue. Adjust it, then `.start().await`.
///
/// This is the one way to start PostgreSQL workers: the runner's workers
/// cannot be had without a discard hook.
pub fn queue_runtime(runtime: &Runtime<PgBackend>) -> RuntimeBuilder {
    runtime.queue_runtime(workers(runtime))
}
