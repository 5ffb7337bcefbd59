//! Running jobs: dispatch by kind, a synchronous drain for tests and demos,
//! and a worker loop with bounded concurrency.

use std::future::Future;

use std::collections::HashMap;

use hephaestus_engine_core::instance::{AttemptRecord, FailureReason};
use hephaestus_engine_core::ports::{JobId, JobLease, ResultPayload};
use hephaestus_engine_core::retry::{Backoff, RetryDecision, RetryPolicy};
use hephaestus_engine_core::step::StepError;
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::error::RunnerError;
use crate::jobs::{self, AdvanceArgs, ExecuteArgs, ResumeArgs, TimerArgs};
use crate::runtime::{Backend, Runtime};

/// What became of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    /// It did its work and completed.
    Succeeded,
    /// It had nothing to do (stale, duplicate, instance gone) and completed.
    Skipped,
    /// It failed and will be retried.
    Retried,
    /// It failed for good and was discarded.
    Discarded,
    /// Its lease was no longer valid (cancelled or rescued): nothing landed.
    Fenced,
}

/// Counts of a drain, by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Jobs that did their work.
    pub succeeded: usize,
    /// Jobs with nothing to do.
    pub skipped: usize,
    /// Jobs that failed and were rescheduled.
    pub retried: usize,
    /// Jobs discarded.
    pub discarded: usize,
    /// Jobs whose lease was fenced off.
    pub fenced: usize,
}

impl DrainReport {
    pub(crate) fn add(&mut self, outcome: JobOutcome) {
        match outcome {
            JobOutcome::Succeeded => self.succeeded += 1,
            JobOutcome::Skipped => self.skipped += 1,
            JobOutcome::Retried => self.retried += 1,
            JobOutcome::Discarded => self.discarded += 1,
            JobOutcome::Fenced => self.fenced += 1,
        }
    }

    /// Every job run.
    pub fn total(&self) -> usize {
        self.succeeded + self.skipped + self.retried + self.discarded + self.fenced
    }
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(lease: &JobLease) -> Result<T, RunnerError> {
    serde_json::from_value(lease.args.clone()).map_err(|e| {
        RunnerError::InvalidInput(format!(
            "job {} ({}) has undecodable args: {e}",
            lease.id, lease.kind
        ))
    })
}

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
    /// Runs one fetched job to its end (completed, retried or discarded).
    pub async fn perform(&self, lease: JobLease) -> JobOutcome {
        // One job at a time, as a drain counts them: no continuations.
        self.perform_job(lease, None, None, false).await
    }

    /// [`Runtime::perform`] for a job whose queue can ask it to stop (a
    /// cancel from another process): when `stop` fires, a running step is
    /// told to stop through its own cancellation signal. Every outcome is
    /// settled by the runtime itself, in the transaction that writes its
    /// consequences.
    pub async fn perform_linked(
        &self,
        lease: JobLease,
        stop: Option<&hephaestus_engine_core::step::CancellationSignal>,
    ) -> JobOutcome {
        self.perform_job(lease, stop, None, self.inner.config.continuations)
            .await
    }

    /// Runs one job; with `chain`, then the continuations it claimed
    /// (adopted through `adopt` when given).
    pub(crate) async fn perform_job(
        &self,
        lease: JobLease,
        stop: Option<&hephaestus_engine_core::step::CancellationSignal>,
        adopt: Option<&crate::execute::Adopt>,
        chain: bool,
    ) -> JobOutcome {
        let result = match lease.kind.as_str() {
            jobs::ADVANCE => match decode::<AdvanceArgs>(&lease) {
                Ok(args) => {
                    let span = crate::observe::job_span(&lease);
                    let settled = self
                        .settle(crate::batch::Settle::Advance {
                            lease: lease.clone(),
                            instance_id: args.instance_id,
                            chain,
                            origin: span.clone(),
                        })
                        .instrument(span)
                        .await;
                    match settled {
                        Ok(settled) => {
                            let outcome = settled.outcome;
                            self.run_chain(settled.into(), stop, adopt).await;
                            Ok(outcome)
                        }
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            },
            jobs::EXECUTE => match decode::<ExecuteArgs>(&lease) {
                Ok(args) => self.perform_execute(&lease, args, stop, adopt, chain).await,
                Err(e) => Err(e),
            },
            jobs::TIMER => match decode::<TimerArgs>(&lease) {
                Ok(args) => {
                    self.perform_timer(&lease, args)
                        .instrument(crate::observe::job_span(&lease))
                        .await
                }
                Err(e) => Err(e),
            },
            jobs::RESUME => match decode::<ResumeArgs>(&lease) {
                Ok(args) => {
                    self.perform_resume(&lease, args)
                        .instrument(crate::observe::job_span(&lease))
                        .await
                }
                Err(e) => Err(e),
            },
            other => Err(RunnerError::InvalidInput(format!(
                "unknown job kind {other:?}"
            ))),
        };
        match result {
            Ok(outcome) => outcome,
            Err(e) => self.job_error(&lease, &e).await,
        }
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
                return Ok(());
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

    /// Returns the jobs of dead workers (no heartbeat for `stale_after`) to
    /// work: retried per their policy, or, out of attempts, failed like a
    /// last failed attempt (an execute job then fails its instance). Fenced
    /// by the attempt, so any number of workers may rescue at once.
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

    /// Runs due jobs one at a time, in every queue of this runtime, until none
    /// is due at the runtime's clock. Deterministic: for tests and demos.
    pub async fn drain(&self) -> Result<DrainReport, RunnerError> {
        let mut report = DrainReport::default();
        let queues = self.inner.config.queues.distinct();
        loop {
            let mut ran = 0;
            for queue in &queues {
                let leases = self.inner.backend.fetch(queue, 1, self.now()).await?;
                for lease in leases {
                    ran += 1;
                    report.add(self.perform(lease).await);
                }
            }
            if ran == 0 {
                return Ok(report);
            }
        }
    }

    /// Runs jobs with up to `concurrency` at once until `shutdown` resolves,
    /// then waits for the running ones.
    pub async fn run(
        &self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<DrainReport, RunnerError> {
        let mut report = DrainReport::default();
        let mut running: JoinSet<(JobId, JobOutcome)> = JoinSet::new();
        let mut leases_held: HashMap<JobId, u32> = HashMap::new();
        let queues = self.inner.config.queues.distinct();
        let concurrency = self.inner.config.concurrency.max(1);
        let poll = self.inner.config.poll_interval;
        let mut heartbeat = tokio::time::interval(self.inner.config.heartbeat_interval);
        let mut rescue = tokio::time::interval(self.inner.config.rescue_interval);
        tokio::pin!(shutdown);
        loop {
            let mut fetched = 0;
            for queue in &queues {
                let free = concurrency.saturating_sub(running.len());
                if free == 0 {
                    break;
                }
                let limit = u32::try_from(free).unwrap_or(u32::MAX);
                let leases = match self.inner.backend.fetch(queue, limit, self.now()).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, queue, "fetch failed");
                        Vec::new()
                    }
                };
                for lease in leases {
                    fetched += 1;
                    leases_held.insert(lease.id, lease.attempt);
                    let rt = self.clone();
                    running.spawn(async move {
                        let id = lease.id;
                        (id, rt.perform(lease).await)
                    });
                }
            }
            if fetched > 0 {
                continue;
            }
            let notified = self.inner.wake.notified();
            tokio::select! {
                () = &mut shutdown => break,
                Some(done) = running.join_next(), if !running.is_empty() => {
                    if let Ok((id, outcome)) = done {
                        leases_held.remove(&id);
                        report.add(outcome);
                    }
                }
                _ = heartbeat.tick() => {
                    let leases: Vec<(JobId, u32)> = leases_held.iter().map(|(id, a)| (*id, *a)).collect();
                    if let Err(e) = self.inner.backend.heartbeat(&leases).await {
                        tracing::warn!(error = %e, "heartbeat failed");
                    }
                }
                _ = rescue.tick() => {
                    if let Err(e) = self.rescue_stale().await {
                        tracing::warn!(error = %e, "rescue pass failed");
                    }
                }
                () = notified => {}
                () = tokio::time::sleep(poll) => {}
            }
        }
        while let Some(done) = running.join_next().await {
            if let Ok((_, outcome)) = done {
                report.add(outcome);
            }
        }
        Ok(report)
    }
}
