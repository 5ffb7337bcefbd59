//! What the runner does when a job fails: a step error retried or
//! discarded per its policy (its last failed attempt recorded as the step's
//! result in the same commit, G4), a job that failed outside user code
//! (retried, or discarded with what the discard handler writes), the
//! primitives a discard handler composes (failing an instance, recording a
//! step's failure), and the rescue of jobs whose worker went silent.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use hephaestus_engine_core::instance::{AttemptRecord, FailureReason};
use hephaestus_engine_core::ports::{JobLease, ResultPayload};
use hephaestus_engine_core::retry::{Backoff, RetryDecision, RetryPolicy};
use hephaestus_engine_core::step::StepError;
use hephaestus_engine_core::{Engine, Workflow};
use uuid::Uuid;

use crate::backend::Backend;
use crate::discard::{AfterCommit, DiscardedJob, JobSubject, StepFailure};
use crate::error::RunnerError;
use crate::handle::{DiscardHandler, Runtime};
use crate::jobs::{self, ExecuteArgs, decode};
use crate::outcome::JobOutcome;

/// The error a runner job that failed outside user code is retried or
/// discarded with. Undecodable arguments never get better: fatal. Anything
/// else (a corrupt instance included, which fails the instance once its
/// advance is out of attempts) is retried. The cause tells the discard
/// handler why.
fn job_failure(error: &RunnerError) -> StepError {
    let step_error = match error {
        RunnerError::InvalidInput(_) => StepError::fatal(error.to_string()),
        _ => StepError::retryable(error.to_string()),
    };
    match error {
        RunnerError::Corrupt(_) => step_error.with_cause(FailureReason::CorruptState),
        RunnerError::Registry(_) => step_error.with_cause(FailureReason::UnknownWorkflow),
        _ => step_error,
    }
}

/// The retry policy of a runner job that failed outside user code (a
/// backend error, bad args, a worker that died): exponential from 1 s to
/// 60 s with 10% jitter, over `max_attempts` (default 20). queue-pg's
/// rescuer applies it to rescued runner jobs too.
pub(crate) fn job_retry_policy(max_attempts: Option<u32>) -> RetryPolicy {
    RetryPolicy::new(
        max_attempts.unwrap_or(20).max(1),
        Backoff::Exponential,
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(60),
    )
    .and_then(|policy| policy.with_jitter_per_mille(100))
    // At least one attempt, a base below the clamp, jitter within 100 %:
    // valid by construction.
    .expect("the runner's job retry policy is valid")
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
        let decision = policy.decide(lease.attempt, max_attempts, &error, lease.jitter_sample());
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
    /// bad args): retry with backoff; out of attempts, discard it with what
    /// the discard handler writes, in one commit.
    pub(crate) async fn job_error(&self, lease: &JobLease, error: &RunnerError) -> JobOutcome {
        tracing::warn!(job_id = %lease.id, kind = %lease.kind, attempt = lease.attempt, error = %error, "job failed");
        let step_error = job_failure(error);
        match self.retry_or_discard(lease, &step_error).await {
            Ok(outcome) => outcome,
            Err(e) => {
                // The backend itself is failing: the job stays executing and
                // comes back through the queue's rescue.
                tracing::error!(job_id = %lease.id, error = %e, "could not record a job failure");
                JobOutcome::Fenced
            }
        }
    }

    async fn retry_or_discard(
        &self,
        lease: &JobLease,
        error: &StepError,
    ) -> Result<JobOutcome, RunnerError> {
        let policy = job_retry_policy(Some(lease.max_attempts));
        let now = self.now();
        let b = &self.inner.backend;
        let mut tx = b.begin().await?;
        let decision = policy.decide(
            lease.attempt,
            policy.max_attempts,
            error,
            lease.jitter_sample(),
        );
        if let RetryDecision::RetryAfter(after) = decision {
            let at = now + chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
            if !b.retry(&mut tx, lease, error, at, now).await? {
                return Ok(JobOutcome::Fenced);
            }
            b.commit(tx).await?;
            return Ok(JobOutcome::Retried);
        }
        if !b.discard(&mut tx, lease, error, now).await? {
            return Ok(JobOutcome::Fenced);
        }
        tracing::error!(job_id = %lease.id, kind = %lease.kind, error = %error.message, "job discarded");
        match self.on_discarded(&mut tx, lease, error, now).await {
            Ok(after) => {
                b.commit(tx).await?;
                after.run();
                Ok(JobOutcome::Discarded)
            }
            Err(handler_error) => {
                // Neither the discard nor a partial consequence lands: the
                // job is retried, and the handler asked again then.
                drop(tx);
                tracing::error!(job_id = %lease.id, kind = %lease.kind, error = %handler_error, "the discard handler failed; the discard was rolled back");
                let recorded =
                    StepError::retryable(format!("the discard handler failed: {handler_error}"))
                        .with_details(serde_json::json!({ "error": error }));
                let after = policy.delay(lease.attempt, lease.jitter_sample());
                let at = now + chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
                let mut tx = b.begin().await?;
                if !b.retry(&mut tx, lease, &recorded, at, now).await? {
                    return Ok(JobOutcome::Fenced);
                }
                b.commit(tx).await?;
                Ok(JobOutcome::Retried)
            }
        }
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

impl<B: Backend> Runtime<B> {
    /// Asks the attached discard handler what the discard of `lease` (with
    /// its final `error`, at `at`) means, writing it in `tx`, the
    /// transaction that discards the job. Run the returned [`AfterCommit`]
    /// once `tx` has committed. The runner does this for the jobs it
    /// discards; a queue that discards runner jobs on its own (a rescuer
    /// giving up on a job whose workers kept dying) calls it from its
    /// discard path, as the PostgreSQL backend's discard hook does.
    pub async fn on_discarded(
        &self,
        tx: &mut B::Tx,
        lease: &JobLease,
        error: &StepError,
        at: DateTime<Utc>,
    ) -> Result<AfterCommit, RunnerError> {
        let handler = self.discard_handler()?;
        // Arguments that do not decode name no instance to act on.
        let subject = JobSubject::of(lease).unwrap_or(JobSubject::Other);
        let job = DiscardedJob {
            lease,
            error,
            subject: &subject,
            at,
        };
        handler.discarded(self, tx, job).await
    }

    /// The attached discard handler: workers need one.
    pub(crate) fn discard_handler(&self) -> Result<&Arc<dyn DiscardHandler<B>>, RunnerError> {
        self.inner
            .discards
            .as_ref()
            .ok_or(RunnerError::NoDiscardHandler)
    }

    /// In `tx`: fails the unfinished instance `instance_id` with `error`
    /// (no step to blame; its cause, when set, is the failure's reason),
    /// through the engine's [`Engine::fail_instance`]: every open step
    /// cancelled, every other job of the instance cancelled, every result
    /// still in its inbox closed. Needs no workflow definition. Returns
    /// what announces the failure once `tx` has committed (the
    /// `workflow.exception` event, the end of the instance's trace, the
    /// stop signal to its steps running here), or `None` for a missing or
    /// finished instance, which is left alone.
    pub async fn fail_instance(
        &self,
        tx: &mut B::Tx,
        instance_id: Uuid,
        error: StepError,
    ) -> Result<Option<AfterCommit>, RunnerError> {
        let b = &self.inner.backend;
        let now = self.now();
        let Some(mut instance) = b.lock(tx, instance_id).await? else {
            return Ok(None);
        };
        if instance.status.is_terminal() {
            return Ok(None);
        }
        let applied = Engine::fail_instance(&mut instance, error, now)?;
        b.update(tx, &instance).await?;
        self.close_ended(tx, instance_id, None).await?;
        let events: Vec<_> = applied
            .effects
            .into_iter()
            .filter_map(|effect| match effect {
                hephaestus_engine_core::Effect::Emit(event) => Some(event),
                _ => None,
            })
            .collect();
        let runtime = self.clone();
        Ok(Some(AfterCommit::once(move || {
            runtime.signal_cancelled(instance.id);
            runtime
                .inner
                .telemetry
                .engine_events(&instance, &events, now);
            crate::observe::instance_ended(&instance, now);
        })))
    }

    /// In `tx`: records that a step activation failed for good (its final
    /// error joins the earlier attempts' errors), and
    /// enqueues the instance's advance, which applies it (failing the
    /// instance). `trace` is the trace context the advance carries (the
    /// discarded job's meta).
    pub async fn record_step_failure(
        &self,
        tx: &mut B::Tx,
        workflow: &Workflow,
        failure: StepFailure<'_>,
    ) -> Result<(), RunnerError> {
        let StepFailure {
            instance_id,
            step,
            activation,
            attempt,
            error,
            attempts,
            trace,
        } = failure;
        let mut attempts = attempts.to_vec();
        attempts.push(AttemptRecord {
            attempt,
            at: self.now(),
            error: error.clone(),
        });
        let error = error.clone();
        self.record_and_enqueue_advance(
            tx,
            workflow,
            instance_id,
            step,
            activation,
            ResultPayload::Failed { error, attempts },
            trace,
        )
        .await
    }
}
