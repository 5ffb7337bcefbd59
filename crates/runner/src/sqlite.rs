//! The SQLite backend (crate `hephaestus-sqlite`): instances, step results
//! and jobs in one file. The runner takes it through the ports, with the
//! hot-path batched operations of the [`Backend`] trait answered by the
//! crate's batched statements (one JSON array parameter per batch, read
//! with `json_each`), and the settling enqueue claiming continuations, as
//! on PostgreSQL.

use std::collections::HashMap;

use hephaestus_engine_core::StepId;
use hephaestus_engine_core::ports::{Consumed, JobId, PortError, StepResult};
use uuid::Uuid;

use crate::backend::{
    Backend, ExecutionCheck, ExecutionRequest, Locked, RoundWrites, Settlement, SettlementDone,
};

pub use hephaestus_sqlite::{SqliteBackend, SqliteOptions, WorkerLock};

/// `attempted_by` of the jobs a runner claims to continue a chain of steps.
const CONTINUATION_WORKER: &str = "hephaestus-runner (continuation)";

#[async_trait::async_trait]
impl Backend for SqliteBackend {
    /// One read statement, each instance decoded once.
    async fn load_for_execution_many(
        &self,
        requests: &[ExecutionRequest],
    ) -> Result<Vec<Option<ExecutionCheck>>, PortError> {
        let keys: Vec<(Uuid, &StepId, u32)> = requests
            .iter()
            .map(|r| (r.instance_id, &r.step, r.activation))
            .collect();
        Ok(self
            .get_for_execution_many(&keys)
            .await?
            .into_iter()
            .map(|check| check.map(|(instance, recorded)| ExecutionCheck { instance, recorded }))
            .collect())
    }

    /// The free instance locks taken without waiting, then one read
    /// statement (instances and inbox flags).
    async fn try_lock_many(
        &self,
        tx: &mut <Self as hephaestus_engine_core::ports::UnitOfWork>::Tx,
        ids: &[Uuid],
    ) -> Result<Vec<Locked>, PortError> {
        Ok(self
            .try_lock_many_in(tx, ids)
            .await?
            .into_iter()
            .map(|(instance, inbox)| Locked { instance, inbox })
            .collect())
    }

    /// One read statement.
    async fn pending_many(
        &self,
        tx: &mut <Self as hephaestus_engine_core::ports::UnitOfWork>::Tx,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Vec<StepResult>>, PortError> {
        self.pending_many_in(tx, ids).await
    }

    /// Three statements (results, consumed rows, instances).
    async fn write_rounds(
        &self,
        tx: &mut <Self as hephaestus_engine_core::ports::UnitOfWork>::Tx,
        writes: RoundWrites<'_>,
    ) -> Result<(), PortError> {
        let consumed: Vec<(Uuid, &[Consumed])> = writes
            .consumed
            .iter()
            .map(|inbox| (inbox.instance_id, inbox.rows.as_slice()))
            .collect();
        self.write_rounds_in(tx, writes.results, &consumed, writes.instances)
            .await
    }

    /// The backend's in-process wake-up ([`SqliteBackend::enqueued`]): a
    /// worker loop wakes at once for jobs another runtime of this process
    /// enqueued, instead of at its next poll.
    fn enqueued_wake(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.enqueued().notified())
    }

    /// At most three statements (unique holders, insert, completion);
    /// claimed jobs are inserted executing, with no wake-up for them.
    async fn enqueue_and_complete(
        &self,
        tx: &mut <Self as hephaestus_engine_core::ports::UnitOfWork>::Tx,
        settlement: Settlement<'_>,
    ) -> Result<SettlementDone, PortError> {
        let pairs: Vec<(JobId, u32)> = settlement
            .leases
            .iter()
            .map(|l| (l.id, l.attempt))
            .collect();
        let done = self
            .enqueue_claiming_and_complete(
                tx,
                settlement.jobs,
                settlement.claim,
                CONTINUATION_WORKER,
                &pairs,
            )
            .await?;
        Ok(SettlementDone {
            enqueued: done.enqueued,
            held: done.held,
        })
    }
}
