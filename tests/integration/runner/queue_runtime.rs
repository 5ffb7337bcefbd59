//! The runner's jobs on queue-pg's worker runtime (PostgreSQL only: the
//! production way to run workers): LISTEN/NOTIFY wake-ups across runtimes,
//! the failure handler's discard hook for a job whose worker kept dying,
//! leader-only reconciliation, and a cancel reaching a step running in
//! another runtime.

use std::time::Duration;

use hephaestus_engine_core::instance::{InstanceStatus, StepStatus};
use hephaestus_engine_core::ports::{JobQueue, JobState};
use hephaestus_engine_core::prelude::*;
use hephaestus_engine_core::steps::Done;
use hephaestus_failure_handler::Reconciler;
use hephaestus_queue_pg::QueueRuntime;
use hephaestus_runner::postgres::PgBackend;
use hephaestus_runner::testing::{DrainOptions, ScriptedStep};
use hephaestus_runner::{RunnerConfig, Runtime, StartOptions, jobs};
use serde_json::json;

use super::harness::{FanOut, Harness, until_status};
use crate::support::wait;

/// A config whose poll never fires within a test: only NOTIFY delivers.
fn notify_only() -> RunnerConfig {
    RunnerConfig::default()
        .with_poll_interval(Duration::from_secs(3600))
        .with_concurrency(16)
}

async fn start_queue_runtime(rt: &Runtime<PgBackend>) -> QueueRuntime {
    rt.queue_runtime()
        .expect("the runtime has a discard handler")
        .start()
        .await
        .expect("the queue runtime starts")
}

#[tokio::test]
async fn two_queue_runtimes_complete_fan_outs_woken_only_by_notifications() {
    let h = Harness::postgres().await;
    let FanOut {
        workflow: wf,
        begin,
        branches,
        join,
    } = FanOut::new(4);
    // Two worker "processes", each with its own runner and queue runtime.
    let a = h.runtime_with(notify_only(), vec![wf.clone()], Vec::new());
    let b = h.runtime_with(notify_only(), vec![wf], Vec::new());
    let (qa, qb) = (start_queue_runtime(&a).await, start_queue_runtime(&b).await);
    let mut ids = Vec::new();
    for i in 0..20 {
        let started = a
            .start("fan", &i.to_string(), json!({}), StartOptions::default())
            .await
            .unwrap();
        ids.push(started.id);
    }
    for id in &ids {
        until_status(&[&a, &b], *id, InstanceStatus::Completed).await;
    }
    // Every step ran exactly once per instance, across both runtimes.
    assert_eq!(begin.runs(), 20);
    assert_eq!(join.runs(), 20);
    for branch in &branches {
        assert_eq!(branch.runs(), 20, "{branch:?}");
    }
    let counts = (qa.counts(), qb.counts());
    assert!(
        counts.0.settled_by_worker > 0 && counts.1.settled_by_worker > 0,
        "both runtimes ran jobs: {counts:?}"
    );
    assert_eq!(
        counts.0.completed + counts.1.completed,
        0,
        "the runner settles its own jobs"
    );
    for id in &ids {
        assert!(a.jobs_of(*id).await.unwrap().is_empty(), "no live job left");
    }
    qa.shutdown(Duration::from_secs(5)).await;
    qb.shutdown(Duration::from_secs(5)).await;
    h.teardown().await;
}

#[tokio::test]
async fn an_execute_job_whose_worker_kept_dying_fails_its_instance_through_the_discard_hook() {
    let h = Harness::postgres().await;
    let charge = ScriptedStep::new("Charge", ["charged"]).with_retry_policy(
        RetryPolicy::new(
            1,
            Backoff::Constant,
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .unwrap(),
    );
    let wf = Workflow::builder("pay")
        .unique("key", Scope::Workflow)
        .start(charge.clone())
        .on(charge.clone(), "charged", Done)
        .build()
        .unwrap();
    let config = notify_only()
        .with_queues(
            hephaestus_runner::QueueNames::shared("advance")
                .with_execute("execute")
                .with_timer("timer"),
        )
        .with_stale_after(Duration::from_secs(30))
        .with_rescue_interval(Duration::from_millis(50));
    let rt = h.runtime_with(config.clone(), vec![wf], Vec::new());
    let s = rt
        .start("pay", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    // The first advance enqueues the execute job...
    rt.drain_with(&DrainOptions::default().with_kind(jobs::ADVANCE))
        .await
        .unwrap();
    // ...which a worker claims and then dies with: no heartbeat ever again.
    let claimed = h
        .backend
        .fetch(&config.queues.execute, 10, h.clock.now())
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        (claimed[0].kind.as_str(), claimed[0].max_attempts),
        (jobs::EXECUTE, 1)
    );
    h.clock.advance(Duration::from_secs(31));
    // A live worker process: its leader's rescuer finds the silent job with
    // no attempt left and discards it; the hook records the step's failure
    // in that transaction, and the advance it enqueued fails the instance.
    let q = start_queue_runtime(&rt).await;
    until_status(&[&rt], s.id, InstanceStatus::Failed).await;
    let inst = rt.get(s.id).await.unwrap().unwrap();
    let failure = inst.failure.clone().expect("a failure record");
    assert_eq!(
        failure
            .step
            .as_ref()
            .map(hephaestus_engine_core::StepId::as_str),
        Some("Charge")
    );
    assert!(
        failure.error.message.contains("stopped heartbeating")
            || failure.error.message.contains("rescued"),
        "{failure:?}"
    );
    assert_eq!(failure.attempts.len(), 1, "{failure:?}");
    assert_eq!(
        failure.reason,
        hephaestus_engine_core::instance::FailureReason::WorkerLost,
        "the discard hook in the worker process records the same reason"
    );
    assert_eq!(inst.step("Charge").unwrap().status, StepStatus::Failed);
    assert_eq!(charge.runs(), 0, "the dead worker never ran user code here");
    let job = h.backend.job(claimed[0].id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Discarded);
    q.shutdown(Duration::from_secs(5)).await;
    h.teardown().await;
}

/// A step that runs until told to stop, and signals when it starts and
/// when it was told to stop.
#[derive(Debug, Clone, Default)]
struct UntilStopped {
    started: std::sync::Arc<tokio::sync::Notify>,
    stopped: std::sync::Arc<tokio::sync::Notify>,
}

#[async_trait::async_trait]
impl Step for UntilStopped {
    fn id(&self) -> StepId {
        StepId::new("UntilStopped").unwrap()
    }

    fn events(&self, _config: Option<&serde_json::Value>) -> Vec<Event> {
        vec![Event::new("done").unwrap()]
    }

    async fn execute(&self, input: StepInput<'_>) -> StepOutcome {
        self.started.notify_one();
        input.cancellation.cancelled().await;
        self.stopped.notify_one();
        StepOutcome::retry("stopped")
    }
}

#[tokio::test]
async fn a_cancel_reaches_a_step_running_in_another_runtime() {
    let h = Harness::postgres().await;
    let step = UntilStopped::default();
    let wf = Workflow::builder("slow")
        .unique("key", Scope::Workflow)
        .start(step.clone())
        .on(step.clone(), "done", Done)
        .build()
        .unwrap();
    let worker = h.runtime_with(notify_only(), vec![wf.clone()], Vec::new());
    let api = h.runtime_with(notify_only(), vec![wf], Vec::new());
    let q = start_queue_runtime(&worker).await;
    let s = api
        .start("slow", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    wait::for_signal(&step.started, "the step to start").await;
    // Another runtime (an API process) cancels: its cancel of the executing
    // job is notified, and the worker's step sees its cancellation signal.
    api.cancel(s.id, Some("the customer called".to_owned()))
        .await
        .unwrap();
    wait::for_signal(&step.stopped, "the running step to be told to stop").await;
    let inst = api.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.status, InstanceStatus::Cancelled);
    assert!(
        api.jobs_of(s.id).await.unwrap().is_empty(),
        "no live job left"
    );
    q.shutdown(Duration::from_secs(5)).await;
    h.teardown().await;
}

#[tokio::test]
async fn only_the_leader_reconciles() {
    let h = Harness::postgres().await;
    let step = ScriptedStep::new("Step", ["done"]);
    let wf = Workflow::builder("r")
        .unique("key", Scope::Workflow)
        .start(step.clone())
        .on(step, "done", Done)
        .build()
        .unwrap();
    let rt = h.runtime_with(notify_only(), vec![wf], Vec::new());
    let leader = start_queue_runtime(&rt).await;
    let follower = start_queue_runtime(&rt).await;
    wait::until_holds("a leader to be elected", || leader.is_leader()).await;
    assert!(!follower.is_leader());
    let (leader, follower) = (std::sync::Arc::new(leader), std::sync::Arc::new(follower));
    let on_leader = {
        let q = std::sync::Arc::clone(&leader);
        Reconciler::new(rt.clone()).leader_only(move || q.is_leader())
    };
    let on_follower = {
        let q = std::sync::Arc::clone(&follower);
        Reconciler::new(rt.clone()).leader_only(move || q.is_leader())
    };
    assert!(on_leader.leads());
    assert!(!on_follower.leads());
    leader.shutdown(Duration::from_secs(5)).await;
    follower.shutdown(Duration::from_secs(5)).await;
    h.teardown().await;
}
