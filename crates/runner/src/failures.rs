//! What the runner does when a job fails: a step error retried or
//! discarded per its policy (and the discard's consequences committed with
//! it, G4), a job that failed outside user code, a job the queue discarded
//! on its own, and the rescue of jobs whose worker went silent.

use hephaestus_engine_core::Workflow;
use hephaestus_engine_core::instance::{AttemptRecord, FailureReason};
use hephaestus_engine_core::ports::{JobLease, ResultPayload};
use hephaestus_engine_core::retry::{Backoff, RetryDecision, RetryPolicy};
use hephaestus_engine_core::step::StepError;

use crate::backend::Backend;
use crate::error::RunnerError;
use crate::handle::Runtime;
use crate::jobs::{self, AdvanceArgs, ExecuteArgs, ResumeArgs, TimerArgs, decode};
use crate::outcome::JobOutcome;

/// The retry policy of a runner job that failed outside user code (a
/// backend error, bad args, a worker that died): exponential from 1 s to
/// 60 s with 10% jitter, over `max_attempts` (default 20). queue-pg's
/// rescuer applies it to rescued runner jobs too.
pub(crate) fn job_retry_policy(max_attempts: Option<u32>) -> RetryPolicy {
    RetryPolicy {
        max_attempts: max_attempts.unwrap_or(20).max(1),
        backoff: Backoff::Exponential,
        base_ms: 1_000,
        max_backoff_ms: 60_000,
        jitter_per_mille: 100,
    }
}

impl<B: Backend> Runtime<B> {
    /// A step error: retry per the resolved policy, or, when fatal or out of
    /// attempts, record the failure and enqueue the advance that fails the
    /// instance — in the same commit as the discard (G4).
    pub(crate) async fn step_failed(
        &self,
        lease: &JobLease,
        wf: &Workflow,
        args: &ExecuteArgs,
        error: StepError,
    ) -> Result<JobOutcome, RunnerError> {
        let b = &self.inner.backend;
        let now = self.now();
        let policy = wf.retry_policy_for(args.step.as_str());
        let mut tx = b.begin().await?;
        // The job's own limit (a snooze may have raised it) and the policy's.
        let max_attempts = lease.max_attempts.min(policy.max_attempts);
        let decision = policy.decide(lease.attempt, max_attempts, &error, Self::jitter_sample());
        if let RetryDecision::RetryAfter(after) = decision {
            let at = now + chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
            if !b.retry(&mut tx, lease, &error, at, now).await? {
                return Ok(JobOutcome::Fenced);
            }
            b.commit(tx).await?;
            return Ok(JobOutcome::Retried);
        }
        if !b.discard(&mut tx, lease, &error, now).await? {
            return Ok(JobOutcome::Fenced);
        }
        let mut attempts = lease.errors.clone();
        attempts.push(AttemptRecord {
            attempt: lease.attempt,
            at: now,
            error: error.clone(),
        });
        self.record_and_advance(
            tx,
            wf,
            args.instance_id,
            &args.step,
            args.activation,
            ResultPayload::Failed { error, attempts },
            &lease.meta,
        )
        .await?;
        Ok(JobOutcome::Discarded)
    }

    /// A job failed outside user code (backend down, unregistered workflow,
    /// bad args): retry with backoff, discard when out of attempts.
    pub(crate) async fn job_error(&self, lease: &JobLease, error: &RunnerError) -> JobOutcome {
        tracing::warn!(job_id = %lease.id, kind = %lease.kind, attempt = lease.attempt, error = %error, "job failed");
        let policy = job_retry_policy(Some(lease.max_attempts));
        // Undecodable arguments never get better: fatal. Anything else —
        // including a corrupt instance, which fails the instance once its
        // advance is out of attempts — is retried.
        let step_error = match error {
            RunnerError::InvalidInput(_) => StepError::fatal(error.to_string()),
            _ => StepError::retryable(error.to_string()),
        };
        // What the failure handler records if this discards the job.
        let step_error = match error {
            RunnerError::Corrupt(_) => step_error.with_cause(FailureReason::CorruptState),
            RunnerError::Registry(_) => step_error.with_cause(FailureReason::UnknownWorkflow),
            _ => step_error,
        };
        let now = self.now();
        let b = &self.inner.backend;
        let attempt = async {
            let mut tx = b.begin().await?;
            let decision = policy.decide(
                lease.attempt,
                policy.max_attempts,
                &step_error,
                Self::jitter_sample(),
            );
            let outcome = if let RetryDecision::RetryAfter(after) = decision {
                let at = now + chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
                if b.retry(&mut tx, lease, &step_error, at, now).await? {
                    JobOutcome::Retried
                } else {
                    JobOutcome::Fenced
                }
            } else if b.discard(&mut tx, lease, &step_error, now).await? {
                tracing::error!(job_id = %lease.id, kind = %lease.kind, error = %error, "job discarded");
                // The failure handler's consequences commit with the discard.
                // A workflow missing from this process's registry is left
                // alone: another deployment may still run it (the reconciler
                // reports such instances).
                if !matches!(error, RunnerError::Registry(_))
                    && let Err(e) = self.handle_discarded(&mut tx, lease, &step_error).await
                {
                    tracing::error!(job_id = %lease.id, kind = %lease.kind, error = %e, "the failure handler could not act on a discarded job");
                }
                JobOutcome::Discarded
            } else {
                JobOutcome::Fenced
            };
            b.commit(tx).await?;
            Ok::<_, hephaestus_engine_core::ports::PortError>(outcome)
        };
        match attempt.await {
            Ok(outcome) => outcome,
            Err(e) => {
                // The backend itself is failing: the job stays executing and
                // comes back through the queue's rescue.
                tracing::error!(job_id = %lease.id, error = %e, "could not record a job failure");
                JobOutcome::Fenced
            }
        }
    }

    /// In `tx`: marks an unfinished instance failed with `message` (no step
    /// to blame), closes its open steps and cancels its jobs. Returns
    /// whether it did (`false` for a missing or finished instance).
    async fn fail_instance_in(
        &self,
        tx: &mut B::Tx,
        instance_id: uuid::Uuid,
        message: &str,
        reason: FailureReason,
    ) -> Result<bool, RunnerError> {
        use hephaestus_engine_core::instance::{
            FailureRecord, HistoryEntry, HistoryKind, InstanceStatus, StepStatus,
        };
        let b = &self.inner.backend;
        let now = self.now();
        let Some(mut instance) = b.lock(tx, instance_id).await? else {
            return Ok(false);
        };
        if instance.status.is_terminal() {
            return Ok(false);
        }
        for state in instance.steps.values_mut() {
            if matches!(state.status, StepStatus::Active | StepStatus::Waiting) {
                state.status = StepStatus::Cancelled;
                state.timer = None;
            }
        }
        let error = StepError::fatal(message);
        instance.status = InstanceStatus::Failed;
        instance.history.push(HistoryEntry {
            at: now,
            step: None,
            activation: 0,
            kind: HistoryKind::Failed {
                message: error.message.clone(),
            },
        });
        instance.failure = Some(FailureRecord {
            reason,
            step: None,
            activation: 0,
            error,
            attempts: Vec::new(),
            at: now,
        });
        instance.revision += 1;
        instance.updated_at = now;
        b.update(tx, &instance).await?;
        self.close_ended(tx, instance_id, None).await?;
        // The same telemetry as a failure the engine applies: the
        // exception event, and the instance's root span ended with error
        // status (written in the discarding transaction, which the queue
        // commits next).
        self.inner.telemetry.engine_events(
            &instance,
            &[hephaestus_engine_core::EngineEvent::WorkflowFailed {
                step: None,
                message: message.to_owned(),
            }],
            now,
        );
        crate::observe::instance_ended(&instance, now);
        Ok(true)
    }

    /// The failure handler's work for a job the queue discarded on its own
    /// (its attempts ran out while its worker kept dying, so the rescuer
    /// discarded it), written in `tx`, the discarding transaction, so the
    /// discard and its consequences commit together (G4, G5):
    ///
    /// - an execute job records the step's failure (the error and every
    ///   attempt's error) and enqueues the instance's advance, which fails
    ///   the instance, closes its steps and cancels its other jobs;
    /// - an advance, timer or resume job fails its instance directly: the
    ///   orchestration or the event it carried cannot be delivered, and an
    ///   instance left waiting for it would be stuck for good.
    ///
    /// A job of a finished or missing instance needs nothing.
    pub async fn handle_discarded(
        &self,
        tx: &mut B::Tx,
        lease: &JobLease,
        error: &StepError,
    ) -> Result<(), RunnerError> {
        let discarded = format!(
            "{} job {} was discarded after {} attempts: {}",
            lease.kind, lease.id, lease.attempt, error.message
        );
        let reason = error
            .cause
            .clone()
            .unwrap_or_else(|| FailureReason::JobDiscarded {
                job: lease.kind.clone(),
            });
        let (instance_id, message) = match lease.kind.as_str() {
            jobs::EXECUTE => {
                return self.discarded_execution(tx, lease, error, &discarded).await;
            }
            jobs::ADVANCE => (
                decode::<AdvanceArgs>(lease)?.instance_id,
                format!("the instance cannot be advanced: {discarded}"),
            ),
            jobs::TIMER => {
                let args = decode::<TimerArgs>(lease)?;
                (
                    args.instance_id,
                    format!(
                        "the timer of step {} could not fire: {discarded}",
                        args.step
                    ),
                )
            }
            jobs::RESUME => {
                let args = decode::<ResumeArgs>(lease)?;
                (
                    args.instance_id,
                    format!(
                        "the scheduled resume of step {} could not be delivered: {discarded}",
                        args.step
                    ),
                )
            }
            _ => return Ok(()),
        };
        tracing::error!(instance_id = %instance_id, job_id = %lease.id, kind = %lease.kind, error = %error.message, "failing the instance of a discarded job");
        self.fail_instance_in(tx, instance_id, &message, reason)
            .await?;
        Ok(())
    }

    /// An execute job the queue discarded: the step's failure (the error
    /// and every attempt's error) is recorded with the instance's advance,
    /// which fails the instance; without the workflow's definition here,
    /// the instance is failed directly.
    async fn discarded_execution(
        &self,
        tx: &mut B::Tx,
        lease: &JobLease,
        error: &StepError,
        discarded: &str,
    ) -> Result<(), RunnerError> {
        // Discarded by the queue itself: its workers kept dying.
        let error = match &error.cause {
            Some(_) => error.clone(),
            None => error.clone().with_cause(FailureReason::WorkerLost),
        };
        let args: ExecuteArgs = decode(lease)?;
        let Some(instance) = self.get(args.instance_id).await? else {
            return Ok(());
        };
        if instance.status.is_terminal() {
            return Ok(());
        }
        let Ok(wf) = self.workflow_of(&instance).cloned() else {
            // No definition here to apply the failure with.
            let message = format!("step {} failed: {discarded}", args.step);
            let reason = error.cause.clone().unwrap_or(FailureReason::WorkerLost);
            self.fail_instance_in(tx, args.instance_id, &message, reason)
                .await?;
            return Ok(());
        };
        let mut attempts = lease.errors.clone();
        attempts.push(AttemptRecord {
            attempt: lease.attempt,
            at: self.now(),
            error: error.clone(),
        });
        self.record_and_enqueue_advance(
            tx,
            &wf,
            args.instance_id,
            &args.step,
            args.activation,
            ResultPayload::Failed {
                error: error.clone(),
                attempts,
            },
            &lease.meta,
        )
        .await?;
        Ok(())
    }

    /// Returns the jobs of dead workers (no heartbeat for `stale_after`) to
    /// work: retried per their policy, or, out of attempts, failed like a
    /// last failed attempt (an execute job then fails its instance). Fenced
    /// by the attempt, so any number of workers may rescue at once.
    ///
    /// This is the rescue of the runner's own worker loop ([`Runtime::run`],
    /// for backends without a worker runtime of their own, like the
    /// in-memory one). PostgreSQL workers run queue-pg's worker runtime,
    /// whose leader-elected rescuer is the one rescue path there.
    pub async fn rescue_stale(&self) -> Result<usize, RunnerError> {
        let stale_after = chrono::Duration::from_std(self.inner.config.stale_after)
            .unwrap_or(chrono::Duration::MAX);
        let before = self
            .now()
            .checked_sub_signed(stale_after)
            .unwrap_or_default();
        let stale = self.inner.backend.stale(before, 500).await?;
        let mut rescued = 0;
        for lease in stale {
            tracing::warn!(job_id = %lease.id, kind = %lease.kind, attempt = lease.attempt, "rescuing a job whose worker went silent");
            let error = StepError::retryable(format!(
                "the worker running attempt {} stopped heartbeating; rescued",
                lease.attempt
            ))
            .with_cause(FailureReason::WorkerLost);
            let outcome = if lease.kind == jobs::EXECUTE {
                match self.rescue_execute(&lease, error.clone()).await {
                    Ok(outcome) => outcome,
                    Err(e) => self.job_error(&lease, &e).await,
                }
            } else {
                self.job_error(
                    &lease,
                    &RunnerError::Backend(hephaestus_engine_core::ports::PortError::Unavailable(
                        error.message.into(),
                    )),
                )
                .await
            };
            if outcome != JobOutcome::Fenced {
                rescued += 1;
            }
        }
        Ok(rescued)
    }

    async fn rescue_execute(
        &self,
        lease: &JobLease,
        error: StepError,
    ) -> Result<JobOutcome, RunnerError> {
        let args: ExecuteArgs = decode(lease)?;
        let Some(instance) = self.get(args.instance_id).await? else {
            return self.finish(lease, JobOutcome::Skipped).await;
        };
        let wf = self.workflow_of(&instance)?.clone();
        self.step_failed(lease, &wf, &args, error).await
    }
}
