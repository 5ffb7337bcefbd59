//! What a discarded job means for its step and instance: the failure
//! handler every worker runs with.

use hephaestus_engine_core::instance::FailureReason;
use hephaestus_engine_core::step::StepError;
use hephaestus_runner::{
    AfterCommit, Backend, DiscardHandler, DiscardedJob, JobSubject, RunnerError, Runtime,
    StepFailure,
};
use uuid::Uuid;

/// The failure handler: attach it to every runtime that runs workers, with
/// [`RuntimeBuilder::discard_handler`](hephaestus_runner::RuntimeBuilder::discard_handler).
/// It writes what a runner job discarded for good means, in the
/// transaction that discards it, so the two commit together (G4, G5):
///
/// - an execute job records its step's failure (the final error, with
///   every attempt's error) and enqueues the instance's advance, which
///   fails the instance, cancels its other steps and closes its jobs; if
///   the workflow's definition is not registered here, the instance is
///   failed directly;
/// - an advance, timer or resume job fails its instance directly: the
///   orchestration or the event it carried can never be delivered, and an
///   instance left waiting for it would be stuck for good;
/// - a job of a workflow this process does not know (its cause
///   [`FailureReason::UnknownWorkflow`]) is left alone: another deployment
///   may still run it, and the reconciler reports such instances;
/// - a job of a finished or missing instance needs nothing.
///
/// Where the final error names no cause, the failure's reason says the job
/// was discarded; an execute job the queue discarded on its own (its
/// workers kept dying) says the worker was lost.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct FailureHandler;

impl FailureHandler {
    /// The failure handler.
    pub fn new() -> Self {
        Self
    }
}

#[async_trait::async_trait]
impl<B: Backend> DiscardHandler<B> for FailureHandler {
    async fn discarded(
        &self,
        runtime: &Runtime<B>,
        tx: &mut B::Tx,
        job: DiscardedJob<'_>,
    ) -> Result<AfterCommit, RunnerError> {
        if job.error.cause == Some(FailureReason::UnknownWorkflow) {
            return Ok(AfterCommit::nothing());
        }
        let lease = job.lease;
        let discarded = format!(
            "{} job {} was discarded after {} attempts: {}",
            lease.kind, lease.id, lease.attempt, job.error.message
        );
        let (instance_id, message) = match job.subject {
            JobSubject::Execute {
                instance_id,
                step,
                activation,
            } => {
                let failed = Failed {
                    instance_id: *instance_id,
                    step,
                    activation: *activation,
                    discarded: &discarded,
                };
                return failed.record(runtime, tx, job).await;
            }
            JobSubject::Advance { instance_id } => (
                *instance_id,
                format!("the instance cannot be advanced: {discarded}"),
            ),
            JobSubject::Timer {
                instance_id, step, ..
            } => (
                *instance_id,
                format!("the timer of step {step} could not fire: {discarded}"),
            ),
            JobSubject::Resume { instance_id, step } => (
                *instance_id,
                format!("the scheduled resume of step {step} could not be delivered: {discarded}"),
            ),
            _ => return Ok(AfterCommit::nothing()),
        };
        let reason = job
            .error
            .cause
            .clone()
            .unwrap_or_else(|| FailureReason::JobDiscarded {
                job: lease.kind.clone(),
            });
        tracing::error!(instance_id = %instance_id, job_id = %lease.id, kind = %lease.kind, error = %job.error.message, "failing the instance of a discarded job");
        fail(runtime, tx, instance_id, message, reason).await
    }
}

/// An execute job discarded for good.
struct Failed<'a> {
    instance_id: Uuid,
    step: &'a hephaestus_engine_core::StepId,
    activation: u32,
    discarded: &'a str,
}

impl Failed<'_> {
    /// Records the step's failure with the instance's advance; without the
    /// workflow's definition here, fails the instance directly.
    async fn record<B: Backend>(
        self,
        runtime: &Runtime<B>,
        tx: &mut B::Tx,
        job: DiscardedJob<'_>,
    ) -> Result<AfterCommit, RunnerError> {
        // No cause named: the queue discarded it because its workers kept
        // dying.
        let error = match &job.error.cause {
            Some(_) => job.error.clone(),
            None => job.error.clone().with_cause(FailureReason::WorkerLost),
        };
        let Some(instance) = runtime.get(self.instance_id).await? else {
            return Ok(AfterCommit::nothing());
        };
        if instance.status.is_terminal() {
            return Ok(AfterCommit::nothing());
        }
        let Ok(workflow) = runtime.workflow_of(&instance) else {
            let message = format!("step {} failed: {}", self.step, self.discarded);
            let reason = error.cause.clone().unwrap_or(FailureReason::WorkerLost);
            return fail(runtime, tx, self.instance_id, message, reason).await;
        };
        let failure = StepFailure {
            instance_id: self.instance_id,
            step: self.step,
            activation: self.activation,
            attempt: job.lease.attempt,
            error: &error,
            attempts: &job.lease.errors,
            trace: &job.lease.meta,
        };
        runtime.record_step_failure(tx, workflow, failure).await?;
        // The advance applies the failure and announces it.
        Ok(AfterCommit::nothing())
    }
}

/// Fails the instance with `message` for `reason` (no step to blame).
async fn fail<B: Backend>(
    runtime: &Runtime<B>,
    tx: &mut B::Tx,
    instance_id: Uuid,
    message: String,
    reason: FailureReason,
) -> Result<AfterCommit, RunnerError> {
    let error = StepError::fatal(message).with_cause(reason);
    Ok(runtime
        .fail_instance(tx, instance_id, error)
        .await?
        .unwrap_or_else(AfterCommit::nothing))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hephaestus_engine_core::instance::{InstanceStatus, StepStatus};
    use hephaestus_engine_core::ports::{JobLease, JobQueue, UnitOfWork};
    use hephaestus_engine_core::prelude::*;
    use hephaestus_engine_core::steps::{Done, FnStep, WaitForEvent};
    use hephaestus_memory::MemoryBackend;
    use hephaestus_runner::telemetry::names::WORKFLOW_EXCEPTION;
    use hephaestus_runner::{ManualClock, StartOptions, jobs};
    use serde_json::json;

    use super::*;

    fn ask() -> Workflow {
        let ask = FnStep::new("Ask", ["asked"], |_| StepOutcome::complete("asked"));
        Workflow::builder("ask")
            .unique("q", Scope::Workflow)
            .start(ask.clone())
            .on_with(ask, "asked", WaitForEvent, json!({ "timeout_ms": 60_000 }))
            .on(WaitForEvent, "received", Done)
            .on(WaitForEvent, "timeout", Done)
            .build()
            .unwrap()
    }

    fn runtime(clock: &ManualClock) -> Runtime<MemoryBackend> {
        Runtime::builder(MemoryBackend::with_clock(clock.clone()))
            .clock(clock.clone())
            .discard_handler(FailureHandler::new())
            .workflow(ask())
            .build()
            .unwrap()
    }

    /// The one due job of `queue`, as a worker would fetch it.
    async fn fetch(rt: &Runtime<MemoryBackend>, clock: &ManualClock, queue: &str) -> JobLease {
        let leases = rt.backend().fetch(queue, 10, clock.now()).await.unwrap();
        let [lease] = leases.as_slice() else {
            panic!("one due job in {queue}: {leases:?}")
        };
        lease.clone()
    }

    /// An instance waiting at `WaitForEvent`, and its timer, due and
    /// fetched.
    async fn waiting_with_a_due_timer(
        rt: &Runtime<MemoryBackend>,
        clock: &ManualClock,
    ) -> (hephaestus_runner::Started, JobLease) {
        let started = rt
            .start("ask", "1", json!({}), StartOptions::default())
            .await
            .unwrap();
        rt.drain().await.unwrap();
        clock.advance(Duration::from_secs(61));
        let timer = fetch(rt, clock, &rt.config().queues.timer).await;
        (started, timer)
    }

    /// Discards `lease` as a queue giving up on it does, with the handler's
    /// consequences in the same commit; returns what runs after it.
    async fn discard(
        rt: &Runtime<MemoryBackend>,
        clock: &ManualClock,
        lease: &JobLease,
        error: &StepError,
    ) -> AfterCommit {
        let b = rt.backend();
        let mut tx = b.begin().await.unwrap();
        assert!(b.discard(&mut tx, lease, error, clock.now()).await.unwrap());
        let after = rt
            .on_discarded(&mut tx, lease, error, clock.now())
            .await
            .unwrap();
        b.commit(tx).await.unwrap();
        after
    }

    fn exceptions(
        events: &mut tokio::sync::broadcast::Receiver<hephaestus_runner::TelemetryEvent>,
    ) -> usize {
        std::iter::from_fn(|| events.try_recv().ok())
            .filter(|e| e.name == WORKFLOW_EXCEPTION)
            .count()
    }

    #[tokio::test]
    async fn a_discarded_timer_fails_its_instance_and_announces_it_after_the_commit() {
        let clock = ManualClock::default();
        let rt = runtime(&clock);
        let (s, timer) = waiting_with_a_due_timer(&rt, &clock).await;
        assert_eq!(timer.kind, jobs::TIMER);
        let mut events = rt.subscribe();

        let after = discard(
            &rt,
            &clock,
            &timer,
            &StepError::retryable("the worker died"),
        )
        .await;

        let failed = rt.get(s.id).await.unwrap().unwrap();
        assert_eq!(failed.status, InstanceStatus::Failed);
        let failure = failed.failure.clone().unwrap();
        assert_eq!(
            failure.reason,
            FailureReason::JobDiscarded {
                job: jobs::TIMER.to_owned()
            }
        );
        assert!(
            failure
                .error
                .message
                .starts_with("the timer of step hephaestus::WaitForEvent could not fire"),
            "{failure:?}"
        );
        assert_eq!(
            failed.step("hephaestus::WaitForEvent").unwrap().status,
            StepStatus::Cancelled
        );
        let live = rt
            .backend()
            .live_jobs(&jobs::of_instance(s.id))
            .await
            .unwrap();
        assert!(
            live.is_empty(),
            "the instance's jobs are cancelled: {live:?}"
        );
        assert_eq!(
            exceptions(&mut events),
            0,
            "nothing announced before the commit is done"
        );
        after.run();
        assert_eq!(exceptions(&mut events), 1);
    }

    #[tokio::test]
    async fn a_job_of_a_workflow_unknown_here_is_left_alone() {
        let clock = ManualClock::default();
        let rt = runtime(&clock);
        let (s, timer) = waiting_with_a_due_timer(&rt, &clock).await;
        let error = StepError::retryable("workflow ask is not registered")
            .with_cause(FailureReason::UnknownWorkflow);

        discard(&rt, &clock, &timer, &error).await.run();

        let instance = rt.get(s.id).await.unwrap().unwrap();
        assert_eq!(instance.status, InstanceStatus::Waiting);
        assert!(instance.failure.is_none());
    }

    #[tokio::test]
    async fn an_execute_job_given_up_on_fails_its_step_with_every_attempt() {
        let clock = ManualClock::default();
        let rt = runtime(&clock);
        let s = rt
            .start("ask", "1", json!({}), StartOptions::default())
            .await
            .unwrap();
        let execute = fetch(&rt, &clock, &rt.config().queues.execute).await;
        assert_eq!(execute.kind, jobs::EXECUTE);

        let after = discard(
            &rt,
            &clock,
            &execute,
            &StepError::retryable("heartbeat lost"),
        )
        .await;
        after.run();
        // The failure is recorded with the advance, which applies it.
        assert_eq!(
            rt.get(s.id).await.unwrap().unwrap().status,
            InstanceStatus::Running
        );
        rt.drain().await.unwrap();

        let failed = rt.get(s.id).await.unwrap().unwrap();
        assert_eq!(failed.status, InstanceStatus::Failed);
        let failure = failed.failure.unwrap();
        assert_eq!(failure.reason, FailureReason::WorkerLost);
        assert_eq!(
            failure
                .step
                .as_ref()
                .map(hephaestus_engine_core::StepId::as_str),
            Some("Ask")
        );
        assert_eq!(failure.attempts.len(), 1);
        assert_eq!(failure.attempts[0].attempt, execute.attempt);
        assert_eq!(failure.attempts[0].error.message, "heartbeat lost");
    }
}
