//! The advance job: the single writer of an instance.
//!
//! Under the instance lock it loads the instance, applies every pending step
//! result in sequence order with the pure engine, persists the instance, marks
//! the results processed and enqueues the jobs for what became due (execute
//! jobs for NEWLY activated steps only, timers, cancellations), all in one
//! commit. An advance job completes in that same commit, after one round: a
//! result that commits later enqueued a fresh advance (an executing advance
//! holds no uniqueness), and one that merged into this job's key while it
//! was still available kept it locked (queue-pg locks a unique holder
//! `for share` until the merging commit), so the job could not start
//! before that result was visible. No wake-up is lost (G3). A direct
//! [`Runtime::advance`] (no job) loops while rounds apply something.

use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_engine_core::ports::{JobId, JobLease};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::backend::Backend;
use crate::error::RunnerError;
use crate::handle::Runtime;
use crate::outcome::JobOutcome;
use crate::round::{self, RoundInput};

/// What one advance did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AdvanceReport {
    /// Rounds run (each one commit).
    pub rounds: u32,
    /// Results applied.
    pub applied: usize,
    /// Results ignored as stale or duplicate, or rejected.
    pub ignored: usize,
    /// Step executions enqueued.
    pub executions: usize,
    /// The status after the last round.
    pub status: Option<InstanceStatus>,
    /// Whether the advance job itself was completed by the last round.
    pub job_completed: bool,
}

impl<B: Backend> Runtime<B> {
    /// Runs the advance of one instance (what an advance job does).
    pub async fn advance(
        &self,
        instance_id: Uuid,
        current_job: Option<JobId>,
    ) -> Result<AdvanceReport, RunnerError> {
        self.advance_with(instance_id, current_job, None).await
    }

    /// The advance of an advance job: the job completes in the commit of
    /// the last (empty) round rather than in a transaction of its own.
    pub(crate) async fn advance_job(
        &self,
        instance_id: Uuid,
        lease: &JobLease,
    ) -> Result<AdvanceReport, RunnerError> {
        self.advance_with(instance_id, Some(lease.id), Some(lease))
            .await
    }

    async fn advance_with(
        &self,
        instance_id: Uuid,
        current_job: Option<JobId>,
        lease: Option<&JobLease>,
    ) -> Result<AdvanceReport, RunnerError> {
        let mut report = AdvanceReport::default();
        loop {
            report.rounds += 1;
            let worked = self
                .advance_round(instance_id, current_job, lease, &mut report)
                .await?;
            // An advance job ends with its first round, whose commit also
            // completes it: a result that arrives while the job runs enqueues
            // a fresh advance (an executing advance holds no uniqueness), so
            // no wake-up is lost without a second, usually empty, round.
            if !worked
                || report.job_completed
                || report.rounds >= self.inner.config.advance_loop_limit
            {
                return Ok(report);
            }
        }
    }

    /// One locked round; returns whether it applied anything. `lease` (if
    /// any) is completed in the round's commit.
    async fn advance_round(
        &self,
        instance_id: Uuid,
        current_job: Option<JobId>,
        lease: Option<&JobLease>,
        report: &mut AdvanceReport,
    ) -> Result<bool, RunnerError> {
        let span = crate::observe::round_span(instance_id, lease.map(|l| &l.meta));
        self.advance_round_in(instance_id, current_job, lease, report)
            .instrument(span)
            .await
    }

    async fn advance_round_in(
        &self,
        instance_id: Uuid,
        current_job: Option<JobId>,
        lease: Option<&JobLease>,
        report: &mut AdvanceReport,
    ) -> Result<bool, RunnerError> {
        let b = &self.inner.backend;
        let round_started = self.now();
        let mut tx = b.begin().await?;
        let mut instance = self.lock_existing(&mut tx, instance_id).await?;
        // A missing definition is a typed error; the instance stays untouched
        // and the job retries until the workflow is registered again.
        let wf = self.workflow_of(&instance)?.clone();
        let pending = b.pending(&mut tx, instance_id).await?;
        let inputs: Vec<RoundInput<'_>> = pending
            .iter()
            .map(|row| RoundInput {
                seq: Some(row.seq),
                result: &row.result,
            })
            .collect();
        let round = round::plan(&wf, &mut instance, &inputs, self.now(), &self.inner.config)?;
        report.applied += round.applied;
        report.ignored += round.ignored;
        report.executions += round.executions;
        if !round.changed && pending.is_empty() {
            report.status = Some(instance.status);
            if let Some(lease) = lease {
                report.job_completed = b.complete(&mut tx, lease).await?;
                b.commit(tx).await?;
            }
            return Ok(false);
        }
        if round.changed {
            b.update(&mut tx, &instance).await?;
        }
        if round.refused_stored.is_empty() {
            b.mark_processed(&mut tx, instance_id, &round.seqs).await?;
        } else {
            // A refusal marks its row processed too, keeping the reason and
            // freeing the slot (a refused row never blocks a valid result).
            let applied: Vec<i64> = round
                .seqs
                .iter()
                .copied()
                .filter(|seq| !round.refused_stored.iter().any(|(r, _)| r == seq))
                .collect();
            b.mark_processed(&mut tx, instance_id, &applied).await?;
            b.refuse(&mut tx, instance_id, &round.refused_stored)
                .await?;
        }
        self.cancel_round_jobs(&mut tx, instance_id, &round, current_job)
            .await?;
        if !round.new_jobs.is_empty() {
            b.enqueue(&mut tx, &round.new_jobs).await?;
        }
        if let Some(lease) = lease {
            // A fenced lease (rescued meanwhile) still commits the round: it
            // ran under the instance lock, so what it applied is applied once,
            // and the rescued attempt will find nothing left to do.
            report.job_completed = b.complete(&mut tx, lease).await?;
        }
        let settle = tracing::Span::current();
        crate::observe::record_round(&settle, instance.status);
        b.commit(tx)
            .instrument(crate::observe::commit_span(&settle, 1))
            .await?;
        self.after_round(&instance, &round, round_started, report.rounds);
        report.status = Some(instance.status);
        Ok(true)
    }

    /// An advance job on its own, waiting for the instance's lock.
    pub(crate) async fn advance_alone(
        &self,
        lease: &JobLease,
        instance_id: Uuid,
    ) -> Result<JobOutcome, RunnerError> {
        match self.advance_job(instance_id, lease).await {
            Ok(report) if report.job_completed => Ok(JobOutcome::Succeeded),
            Ok(_) => self.finish(lease, JobOutcome::Succeeded).await,
            Err(RunnerError::NotFound(_)) => self.finish(lease, JobOutcome::Skipped).await,
            Err(e) => Err(e),
        }
    }
}
