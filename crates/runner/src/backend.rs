//! The backend seam: what a runtime needs from a backend.

use std::collections::HashMap;
use std::sync::Arc;

use hephaestus_engine_core::StepId;
use hephaestus_engine_core::instance::Instance;
use hephaestus_engine_core::ports::{
    Consumed, Enqueued, InstanceFilter, InstanceStore, JobLease, JobQueue, NewJob, PortError,
    RoundResult, StepResult, StepResultStore,
};
use uuid::Uuid;

/// A step activation an execution is about to run.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExecutionRequest {
    /// Its instance.
    pub instance_id: Uuid,
    /// The step.
    pub step: StepId,
    /// The activation.
    pub activation: u32,
}

/// What an execution checks before running user code.
#[derive(Debug, Clone)]
pub struct ExecutionCheck {
    /// The instance as stored (requests of one instance may share it).
    pub instance: Arc<Instance>,
    /// A result is recorded for the requested activation (only looked up
    /// while that activation is active; `false` otherwise).
    pub recorded: bool,
}

/// An instance locked by [`Backend::try_lock_many`].
#[derive(Debug, Clone)]
pub struct Locked {
    /// The instance, as stored when the lock was taken.
    pub instance: Instance,
    /// Its inbox may hold unprocessed results: `false` only when none was
    /// committed before the lock was taken (a result committed later has
    /// its own advance job), so the caller can skip reading it.
    pub inbox: bool,
}

/// The inbox rows of one instance that a round consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxRows {
    /// The instance.
    pub instance_id: Uuid,
    /// Its rows, refused ones with their reason.
    pub rows: Vec<Consumed>,
}

/// What a batch of advance rounds writes ([`Backend::write_rounds`]).
#[derive(Debug, Clone, Copy)]
pub struct RoundWrites<'a> {
    /// The new results, in order.
    pub results: &'a [RoundResult],
    /// The inbox rows the rounds consumed.
    pub consumed: &'a [InboxRows],
    /// The locked instances that changed.
    pub instances: &'a [&'a Instance],
}

/// What settling a batch ends with ([`Backend::enqueue_and_complete`]).
#[derive(Debug, Clone, Copy)]
pub struct Settlement<'a> {
    /// Jobs to enqueue, in order.
    pub jobs: &'a [NewJob],
    /// For each of `jobs`, whether this worker would take it claimed.
    pub claim: &'a [bool],
    /// Leases to complete, each fenced by its attempt.
    pub leases: &'a [&'a JobLease],
}

/// What [`Backend::enqueue_and_complete`] did.
#[derive(Debug, Clone, Default)]
pub struct SettlementDone {
    /// Each job of [`Settlement::jobs`], in order: what the enqueue did,
    /// and its lease when it came back claimed by this worker.
    pub enqueued: Vec<(Enqueued, Option<JobLease>)>,
    /// For each of [`Settlement::leases`], whether it held (the job was
    /// still this attempt's and is now completed).
    pub held: Vec<bool>,
}

/// What a runtime needs from a backend: the three ports over one unit of
/// work, plus reads the runner makes often enough that a backend may answer
/// them in one round trip (each has a default built from the ports).
///
/// A backend of your own implements the ports, then `impl Backend for
/// MyBackend {}`.
#[async_trait::async_trait]
pub trait Backend: InstanceStore + StepResultStore + JobQueue + Clone + 'static {
    /// What step executions check before running user code, for many step
    /// activations at once (in order): the instance (requests of one
    /// instance may share it), and whether a result is recorded for the
    /// step's activation (only looked up while that activation is active;
    /// `false` otherwise); `None` for a missing instance.
    async fn load_for_execution_many(
        &self,
        requests: &[ExecutionRequest],
    ) -> Result<Vec<Option<ExecutionCheck>>, PortError> {
        let mut out = Vec::with_capacity(requests.len());
        for request in requests {
            let Some(instance) = self.get(request.instance_id).await? else {
                out.push(None);
                continue;
            };
            let recorded = instance.is_step_active(request.step.as_str(), request.activation)
                && self
                    .is_recorded(request.instance_id, &request.step, request.activation)
                    .await?;
            out.push(Some(ExecutionCheck {
                instance: Arc::new(instance),
                recorded,
            }));
        }
        Ok(out)
    }

    /// Takes the single-writer lock of each instance in `ids` that can be had
    /// without waiting for another writer, and returns those (a backend may
    /// also wait and lock them all, in id order). Missing ones are skipped.
    /// The default says every inbox may hold results ([`Locked::inbox`]).
    async fn try_lock_many(
        &self,
        tx: &mut Self::Tx,
        ids: &[Uuid],
    ) -> Result<Vec<Locked>, PortError> {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(instance) = self.lock(tx, id).await? {
                out.push(Locked {
                    instance,
                    inbox: true,
                });
            }
        }
        Ok(out)
    }

    /// The unprocessed results of many locked instances, each in `seq` order.
    async fn pending_many(
        &self,
        tx: &mut Self::Tx,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Vec<StepResult>>, PortError> {
        let mut out = HashMap::with_capacity(ids.len());
        for id in ids {
            let pending = self.pending(tx, *id).await?;
            if !pending.is_empty() {
                out.insert(*id, pending);
            }
        }
        Ok(out)
    }

    /// What a batch of advance rounds writes, in `tx`: the new results in
    /// order, idempotently (duplicates and results of missing instances are
    /// skipped; those flagged `processed` are recorded as already
    /// processed: their instance is locked and applies, or refuses, them in
    /// this unit of work), the inbox rows the rounds consumed (refused ones
    /// with their reason), and the locked instances.
    async fn write_rounds(
        &self,
        tx: &mut Self::Tx,
        writes: RoundWrites<'_>,
    ) -> Result<(), PortError> {
        self.record_round_results(tx, writes.results).await?;
        for InboxRows { instance_id, rows } in writes.consumed {
            let id = instance_id;
            let applied: Vec<i64> = rows
                .iter()
                .filter(|c| c.refusal.is_none())
                .map(|c| c.seq)
                .collect();
            self.mark_processed(tx, *id, &applied).await?;
            let refused: Vec<(i64, String)> = rows
                .iter()
                .filter_map(|c| c.refusal.clone().map(|reason| (c.seq, reason)))
                .collect();
            self.refuse(tx, *id, &refused).await?;
        }
        for instance in writes.instances {
            self.update(tx, instance).await?;
        }
        Ok(())
    }

    /// One page of the reconciler's scan: the active instances (pending,
    /// running, waiting) with ids below `before` (from the newest when
    /// `None`), newest first, at most `limit`, each with its workflow and
    /// whether it may need a repair (no live job for work it has). Only the
    /// flagged ones are read and checked one by one, so a pass over many
    /// healthy instances costs a statement per page. The default flags
    /// every one; PostgreSQL decides in the statement, without decoding any
    /// instance.
    async fn reconcile_page(
        &self,
        before: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<ReconcileRow>, PortError> {
        let mut filter = InstanceFilter::default()
            .with_statuses(hephaestus_engine_core::instance::InstanceStatus::ACTIVE)
            .with_limit(limit);
        filter.before_id = before;
        let page = self.list(&filter).await?;
        Ok(page
            .into_iter()
            .map(|i| ReconcileRow {
                id: i.id,
                workflow_id: i.workflow_id.as_str().to_owned(),
                workflow_version: i.workflow_version,
                candidate: true,
            })
            .collect())
    }

    /// A wake-up for the worker loop ([`Runtime::run`](crate::Runtime::run)):
    /// resolves when a commit through this backend, from any runtime of
    /// this process, enqueued jobs (the loop already wakes at its own
    /// runtime's commits; this covers another runtime, an application's
    /// starter say, on the same backend). It counts from its creation, so
    /// the loop takes it before looking for work. The default never
    /// resolves: the loop polls (`poll_interval`).
    fn enqueued_wake(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(std::future::pending())
    }

    /// What settling a batch ends with, in `tx`: enqueues the jobs (those
    /// flagged in [`Settlement::claim`] may come back claimed by this
    /// worker, already executing at attempt 1, to run right after the
    /// commit), then completes the leases, each fenced by its attempt,
    /// telling whether each held. The default claims none (they wait for a
    /// fetch) and completes one lease at a time; PostgreSQL claims and does
    /// it all in one statement.
    async fn enqueue_and_complete(
        &self,
        tx: &mut Self::Tx,
        settlement: Settlement<'_>,
    ) -> Result<SettlementDone, PortError> {
        let enqueued = if settlement.jobs.is_empty() {
            Vec::new()
        } else {
            self.enqueue(tx, settlement.jobs)
                .await?
                .into_iter()
                .map(|enqueued| (enqueued, None))
                .collect()
        };
        let mut held = Vec::with_capacity(settlement.leases.len());
        for lease in settlement.leases {
            held.push(self.complete(tx, lease).await?);
        }
        Ok(SettlementDone { enqueued, held })
    }
}

impl Backend for hephaestus_memory::MemoryBackend {}

/// An active instance as the reconciler's page query sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReconcileRow {
    /// The instance.
    pub id: Uuid,
    /// Its workflow.
    pub workflow_id: String,
    /// Its workflow version.
    pub workflow_version: u32,
    /// Whether it may need a repair (it is then read and checked).
    pub candidate: bool,
}
