//! Retrying a failed instance: [`Runtime::retry`].
//!
//! An operator fixed what made a step fail (a bad credential, a service that
//! was down, a bug now deployed) and wants the instance to carry on where it
//! stopped instead of starting a new one. Under the instance lock, in one
//! commit: the engine's [`Input::Retry`] gives the failed step, and every
//! step the failure cancelled, a new activation; the instance goes back to
//! `running` with its failure record moved into the history; an execute job
//! is enqueued for each restarted step. The old activations stay fenced off:
//! their late results and jobs are stale and ignored.

use hephaestus_engine_core::engine::{Effect, Engine, EngineError, Input};
use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_engine_core::{StepId, Workflow};
use uuid::Uuid;

use crate::backend::Backend;
use crate::error::RunnerError;
use crate::handle::Runtime;
use crate::jobs;

/// What a retry did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retried {
    /// The steps activated again, each with its new activation; an execute
    /// job was enqueued for each.
    pub steps: Vec<(StepId, u32)>,
    /// The status after the retry (`running`).
    pub status: InstanceStatus,
}

impl<B: Backend> Runtime<B> {
    /// Restarts a failed instance where it failed: the failed step (and
    /// every step its failure cancelled) gets a new activation, the status
    /// goes back to `running`, the failure record is kept in the history,
    /// and an execute job is enqueued for each restarted step — one commit,
    /// serialized with advances by the instance lock.
    ///
    /// Needs the instance's workflow version registered (the engine restarts
    /// steps through its definition). A retried step runs again from its
    /// first attempt, so, as always, steps must be idempotent (their
    /// idempotency key names the new activation).
    pub async fn retry(&self, id: Uuid) -> Result<Retried, RunnerError> {
        let b = &self.inner.backend;
        let mut tx = b.begin().await?;
        let mut instance = self.lock_existing(&mut tx, id).await?;
        let wf: Workflow = self.workflow_of(&instance)?.clone();
        let now = self.now();
        let applied = match Engine::new(&wf).apply(&mut instance, Input::Retry, now) {
            Ok(applied) => applied,
            Err(EngineError::NotFailed(status)) => {
                return Err(RunnerError::NotFailed { id, status });
            }
            Err(e) => return Err(e.into()),
        };
        b.update(&mut tx, &instance).await?;
        let config = &self.inner.config;
        let mut steps = Vec::new();
        let mut new_jobs = Vec::new();
        let mut events = Vec::new();
        for effect in applied.effects {
            match effect {
                Effect::Execute { step, activation } => {
                    new_jobs.push(crate::observe::carried(
                        jobs::execute(config, &wf, id, &step, activation),
                        &instance.telemetry_metadata,
                    ));
                    steps.push((step, activation));
                }
                Effect::Emit(event) => events.push(event),
                // A retry only activates steps; the rest cannot come out of it.
                Effect::ScheduleTimer { .. } | Effect::CancelTimer { .. } | Effect::CancelJobs => {
                    tracing::warn!(instance_id = %id, effect = ?effect, "a retry produced an unexpected effect; ignored");
                }
            }
        }
        b.enqueue(&mut tx, &new_jobs).await?;
        b.commit(tx).await?;
        self.inner.wake.notify_waiters();
        self.inner.telemetry.engine_events(&instance, &events, now);
        tracing::info!(
            target: "hephaestus.workflow.retry",
            instance_id = %id,
            steps = ?steps,
            "Workflow retried"
        );
        Ok(Retried {
            steps,
            status: instance.status,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use hephaestus_engine_core::instance::{HistoryKind, StepStatus};
    use hephaestus_engine_core::ports::JobState;
    use hephaestus_engine_core::prelude::*;
    use hephaestus_engine_core::steps::{Done, FnStep, WaitForEvent};
    use hephaestus_memory::MemoryBackend;
    use serde_json::json;

    use crate::{RunnerError, Runtime, StartOptions};

    /// `Charge → Ship → Done`; `Charge` fails fatally while `broken` is set.
    fn shop(broken: &Arc<AtomicBool>) -> Workflow {
        let broken = Arc::clone(broken);
        let charge = FnStep::new("Charge", ["charged"], move |input| {
            if broken.load(Ordering::SeqCst) {
                StepOutcome::fatal("card processor down")
            } else {
                StepOutcome::complete_with("charged", json!({"activation": input.activation}))
            }
        });
        let ship = FnStep::new("Ship", ["shipped"], |_| StepOutcome::complete("shipped"));
        Workflow::builder("shop")
            .unique("order", Scope::Workflow)
            .start(charge.clone())
            .on(charge, "charged", ship.clone())
            .on(ship, "shipped", Done)
            .build()
            .unwrap()
    }

    /// A `shop` instance that failed at `Charge`.
    struct Failed {
        broken: Arc<AtomicBool>,
        backend: MemoryBackend,
        rt: Runtime<MemoryBackend>,
        id: uuid::Uuid,
    }

    async fn failed_shop() -> Failed {
        let broken = Arc::new(AtomicBool::new(true));
        let backend = MemoryBackend::new();
        let rt = Runtime::builder(backend.clone())
            .discard_handler(crate::tests::Discards::default())
            .workflow(shop(&broken))
            .build()
            .unwrap();
        let id = rt
            .start("shop", "7", json!({}), StartOptions::default())
            .await
            .unwrap()
            .id;
        rt.drain().await.unwrap();
        Failed {
            broken,
            backend,
            rt,
            id,
        }
    }

    #[tokio::test]
    async fn a_failed_instance_is_retried_from_its_failed_step_and_completes() {
        let Failed {
            broken,
            backend,
            rt,
            id,
        } = failed_shop().await;
        let failed = rt.get(id).await.unwrap().unwrap();
        assert_eq!(failed.status, InstanceStatus::Failed);
        let failure = failed.failure.clone().unwrap();

        broken.store(false, Ordering::SeqCst);
        let retried = rt.retry(id).await.unwrap();
        assert_eq!(retried.steps, vec![(StepId::new("Charge").unwrap(), 2)]);
        assert_eq!(retried.status, InstanceStatus::Running);
        let jobs = backend.jobs();
        assert!(
            jobs.iter().any(|j| j.kind == crate::jobs::EXECUTE
                && j.state == JobState::Available
                && j.args["step"] == "Charge"
                && j.args["activation"] == 2),
            "an execute job for the new activation: {jobs:?}"
        );

        rt.drain().await.unwrap();
        let done = rt.get(id).await.unwrap().unwrap();
        assert_eq!(done.status, InstanceStatus::Completed);
        assert_eq!(done.failure, None);
        assert_eq!(done.context.step("charge"), Some(&json!({"activation": 2})));
        assert_eq!(done.step("Charge").unwrap().status, StepStatus::Completed);
        assert!(
            done.history.iter().any(|h| h.kind
                == HistoryKind::Retried {
                    failure: Some(Box::new(failure.clone())),
                    steps: vec![StepId::new("Charge").unwrap()],
                }),
            "the failure is kept in the history"
        );
    }

    #[tokio::test]
    async fn only_failed_instances_are_retried() {
        let waits = Workflow::builder("waits")
            .unique("order", Scope::Workflow)
            .start(WaitForEvent)
            .on(WaitForEvent, "received", Done)
            .build()
            .unwrap();
        let rt = Runtime::builder(MemoryBackend::new())
            .discard_handler(crate::tests::Discards::default())
            .workflow(waits)
            .build()
            .unwrap();
        let started = rt
            .start("waits", "1", json!({}), StartOptions::default())
            .await
            .unwrap();
        rt.drain().await.unwrap();
        let err = rt.retry(started.id).await.unwrap_err();
        assert!(
            matches!(err, RunnerError::NotFailed { id, status: InstanceStatus::Waiting } if id == started.id),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "instance {} is waiting, not failed: only a failed instance can be retried",
                started.id
            )
        );
        let missing = uuid::Uuid::now_v7();
        assert!(matches!(
            rt.retry(missing).await.unwrap_err(),
            RunnerError::NotFound(_)
        ));
    }

    #[tokio::test]
    async fn a_retry_needs_the_workflow_registered() {
        let Failed { backend, id, .. } = failed_shop().await;
        let other = Runtime::builder(backend)
            .discard_handler(crate::tests::Discards::default())
            .build()
            .unwrap();
        let err = other.retry(id).await.unwrap_err();
        assert!(matches!(err, RunnerError::Registry(_)), "{err:?}");
        let still = other.get(id).await.unwrap().unwrap();
        assert_eq!(still.status, InstanceStatus::Failed, "left untouched");
    }
}
