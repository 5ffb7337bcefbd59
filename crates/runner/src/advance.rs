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

use hephaestus_engine_core::engine::{Disposition, Effect, Engine, EngineEvent, Input};
use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_engine_core::ports::{JobId, JobLease, NewJob};
use uuid::Uuid;

use crate::error::RunnerError;
use crate::jobs;
use crate::runtime::{Backend, Runtime};

/// What one advance did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
        let b = &self.inner.backend;
        let round_started = self.now();
        let mut tx = b.begin().await?;
        let Some(mut instance) = b.lock(&mut tx, instance_id).await? else {
            return Err(RunnerError::NotFound(instance_id.to_string()));
        };
        // A missing definition is a typed error; the instance stays untouched
        // and the job retries until the workflow is registered again.
        let wf = self.workflow_of(&instance)?.clone();
        let engine = Engine::new(&wf);
        // A state that does not match its definition is an error of the job
        // (retried, then the instance fails with the reason), not of a result.
        engine.check(&instance)?;
        let status_before = instance.status;
        let pending = b.pending(&mut tx, instance_id).await?;
        let now = self.now();
        let mut effects: Vec<Effect> = Vec::new();
        let mut changed = false;
        if instance.status == InstanceStatus::Pending {
            let applied = engine.apply(&mut instance, Input::Start, now)?;
            changed = true;
            effects.extend(applied.effects);
        }
        for row in &pending {
            let input = match row.result.to_input() {
                Ok(input) => input,
                Err(e) => {
                    tracing::warn!(instance_id = %instance_id, seq = row.seq, error = %e, "step result cannot be decoded; skipped");
                    report.ignored += 1;
                    continue;
                }
            };
            match engine.apply(&mut instance, input, now) {
                Ok(applied) => match applied.disposition {
                    Disposition::Applied | Disposition::Deferred => {
                        changed = true;
                        report.applied += 1;
                        effects.extend(applied.effects);
                    }
                    Disposition::Ignored(why) => {
                        tracing::debug!(instance_id = %instance_id, seq = row.seq, reason = ?why, "step result ignored");
                        report.ignored += 1;
                    }
                },
                Err(e) => {
                    tracing::warn!(instance_id = %instance_id, seq = row.seq, error = %e, "step result rejected");
                    report.ignored += 1;
                }
            }
        }
        if !changed && pending.is_empty() {
            report.status = Some(instance.status);
            if let Some(lease) = lease {
                report.job_completed = b.complete(&mut tx, lease).await?;
                b.commit(tx).await?;
            }
            return Ok(false);
        }
        if changed {
            b.update(&mut tx, &instance).await?;
        }
        if !pending.is_empty() {
            let seqs: Vec<i64> = pending.iter().map(|r| r.seq).collect();
            b.mark_processed(&mut tx, instance_id, &seqs).await?;
        }
        let config = &self.inner.config;
        let mut new_jobs: Vec<NewJob> = Vec::new();
        let mut cancel_all = false;
        let mut events: Vec<EngineEvent> = Vec::new();
        for effect in effects {
            match effect {
                Effect::Execute { step, activation } => {
                    report.executions += 1;
                    new_jobs.push(jobs::execute(config, &wf, instance_id, &step, activation));
                }
                Effect::ScheduleTimer {
                    step,
                    activation,
                    fire_at,
                    event,
                } => new_jobs.push(jobs::timer(
                    config,
                    &wf,
                    instance_id,
                    &step,
                    activation,
                    &event,
                    fire_at,
                )),
                Effect::CancelTimer { step, activation } => {
                    b.cancel_matching(
                        &mut tx,
                        &jobs::timer_of(instance_id, &step, activation),
                        None,
                    )
                    .await?;
                }
                Effect::CancelJobs => cancel_all = true,
                Effect::Emit(event) => events.push(event),
            }
        }
        if cancel_all {
            // The instance ended: nothing else of it may run (its executions,
            // timers and scheduled resumes); this job finishes on its own.
            new_jobs.clear();
            b.cancel_matching(&mut tx, &jobs::of_instance(instance_id), current_job)
                .await?;
        }
        if !new_jobs.is_empty() {
            b.enqueue(&mut tx, &new_jobs).await?;
        }
        if let Some(lease) = lease {
            // A fenced lease (rescued meanwhile) still commits the round: it
            // ran under the instance lock, so what it applied is applied once,
            // and the rescued attempt will find nothing left to do.
            report.job_completed = b.complete(&mut tx, lease).await?;
        }
        b.commit(tx).await?;
        if cancel_all {
            self.signal_cancelled(instance_id);
        }
        if !new_jobs.is_empty() {
            self.inner.wake.notify_waiters();
        }
        let telemetry = &self.inner.telemetry;
        telemetry.engine_events(&instance, &events, now);
        telemetry.emit(
            crate::telemetry::names::ENGINE_ADVANCE,
            serde_json::json!({
                "duration": u64::try_from((self.now() - round_started).num_milliseconds()).unwrap_or(0),
                "active_steps_count": instance.open_steps().count(),
            }),
            crate::telemetry::instance_metadata(
                &instance,
                serde_json::Map::from_iter([
                    ("status_before".to_owned(), serde_json::json!(status_before)),
                    (
                        "status_after".to_owned(),
                        serde_json::json!(instance.status),
                    ),
                    ("iteration".to_owned(), serde_json::json!(report.rounds)),
                ]),
            ),
        );
        report.status = Some(instance.status);
        Ok(true)
    }
}
