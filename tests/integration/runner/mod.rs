//! The runner end to end, every scenario on every backend (memory, PostgreSQL and
//! SQLite): the spec's ★ behaviours, with user-code executions counted.

mod backend_conformance;
pub(crate) mod harness;
mod orchestration;
mod queue_runtime;
mod telemetry;

use std::time::Duration;

use hephaestus_engine_core::instance::{FailureReason, InstanceStatus, StepStatus};
use hephaestus_engine_core::ports::JobState;
use hephaestus_engine_core::prelude::*;
use hephaestus_engine_core::steps::{Done, FnStep, WAIT_FOR_EVENT_ID, Wait, WaitForEvent};
use hephaestus_engine_core::workflow::WorkflowFamily;
use hephaestus_runner::telemetry::names;
use hephaestus_runner::testing::ScriptedStep;
use hephaestus_runner::{Backend, RunnerConfig, RunnerError, StartOptions, jobs};
use serde_json::json;
use uuid::Uuid;

use harness::{Harness, on_both_backends};

on_both_backends!(
    a_one_step_workflow_runs_in_one_job,
    uniqueness_among_active_instances_keeps_history,
    fan_out_fan_in_keeps_every_branch,
    exclusive_branch_join_runs_once,
    dynamic_routing_picks_a_declared_target,
    async_step_resumes_with_validation,
    resume_before_the_async_marker_is_kept,
    durable_timer_fires_after_a_restart,
    wait_for_event_timeout_is_cancelled_by_resume,
    retry_then_success,
    retry_then_fail_cancels_other_jobs,
    cancel_mid_run_stops_everything,
    versioned_instances_keep_their_version,
    start_inside_a_callers_transaction,
    scheduled_resume_fires_or_is_cancelled,
    an_undeliverable_scheduled_resume_fails_its_instance,
    wide_fan_out_with_a_slow_branch_runs_each_step_once,
);

fn opts() -> StartOptions {
    StartOptions::default()
}

fn done_step(id: &str, event: &str) -> ScriptedStep {
    ScriptedStep::new(id, [event])
}

async fn status<B: Backend>(rt: &hephaestus_runner::Runtime<B>, id: Uuid) -> InstanceStatus {
    rt.get(id).await.unwrap().unwrap().status
}

async fn a_one_step_workflow_runs_in_one_job<B: Backend>(h: &Harness<B>) {
    let pass = ScriptedStep::new("PassStep", ["done"]).otherwise(StepOutcome::complete_with(
        "done",
        json!({"processed": true}),
    ));
    let wf = Workflow::builder("linear")
        .unique("order", Scope::Workflow)
        .start(pass.clone())
        .on(pass.clone(), "done", Done)
        .build()
        .unwrap();
    let rt = h.runtime(vec![wf]);
    let s = rt.start("linear", "1", json!({}), opts()).await.unwrap();
    let report = rt.drain().await.unwrap();
    // The start applies its first round (the step's execute job); that
    // job's settling commit applies the result and `Done` (whose outcome is
    // fixed) inline.
    assert_eq!(
        report.succeeded, 1,
        "execute (+ inline advance and Done): {report:?}"
    );
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.status, InstanceStatus::Completed);
    assert_eq!(inst.context.steps["pass_step"], json!({"processed": true}));
    assert_eq!(pass.runs(), 1);
    assert!(
        rt.jobs_of(s.id).await.unwrap().is_empty(),
        "no live job is left"
    );
}

async fn uniqueness_among_active_instances_keeps_history<B: Backend>(h: &Harness<B>) {
    let a = done_step("A", "done");
    let wf = Workflow::builder("uniq")
        .unique("order", Scope::Workflow)
        .start(a.clone())
        .on(a, "done", Done)
        .build()
        .unwrap();
    let rt = h.runtime(vec![wf]);
    let first = rt.start("uniq", "7", json!({}), opts()).await.unwrap();
    match rt.start("uniq", "7", json!({}), opts()).await {
        Err(RunnerError::AlreadyRunning { instance_id, .. }) => assert_eq!(instance_id, first.id),
        other => panic!("expected AlreadyRunning, got {other:?}"),
    }
    rt.drain().await.unwrap();
    let second = rt.start("uniq", "7", json!({}), opts()).await.unwrap();
    assert_ne!(first.id, second.id);
    assert_eq!(
        status(&rt, first.id).await,
        InstanceStatus::Completed,
        "history is kept"
    );
    let latest = rt
        .workflow("uniq")
        .unwrap()
        .get("7")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(latest.id, second.id, "the active instance first");
}

async fn fan_out_fan_in_keeps_every_branch<B: Backend>(h: &Harness<B>) {
    let start = done_step("Start", "done");
    let join = done_step("Join", "done");
    let branches: Vec<ScriptedStep> = (0..4)
        .map(|i| {
            ScriptedStep::new(&format!("Branch{i}"), ["done"])
                .otherwise(StepOutcome::complete_with("done", json!({ "branch": i })))
        })
        .collect();
    let mut b = Workflow::builder("fan")
        .unique("f", Scope::Workflow)
        .start(start.clone())
        .fan_out(start.clone(), "done", branches.iter().cloned().map(target));
    for br in &branches {
        b = b.on(br.clone(), "done", join.clone());
    }
    let wf = b.on(join.clone(), "done", Done).build().unwrap();
    let rt = h.runtime(vec![wf]);
    let s = rt.start("fan", "1", json!({}), opts()).await.unwrap();
    rt.drain().await.unwrap();
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.status, InstanceStatus::Completed);
    for (i, br) in branches.iter().enumerate() {
        assert_eq!(
            inst.context.steps[&format!("branch{i}")],
            json!({ "branch": i })
        );
        assert_eq!(br.runs(), 1);
    }
    assert_eq!(join.runs(), 1);
}

async fn exclusive_branch_join_runs_once<B: Backend>(h: &Harness<B>) {
    for choice in ["ok", "ko"] {
        let split = ScriptedStep::new("A", ["ok", "ko"]).otherwise(StepOutcome::complete(choice));
        let left = done_step("B", "done");
        let right = done_step("C", "done");
        let join = done_step("D", "done");
        let name = format!("branch_{choice}");
        let wf = Workflow::builder(name.as_str())
            .unique("x", Scope::Workflow)
            .start(split.clone())
            .on(split.clone(), "ok", left.clone())
            .on(split, "ko", right.clone())
            .on(left.clone(), "done", join.clone())
            .on(right.clone(), "done", join.clone())
            .on(join.clone(), "done", Done)
            .build()
            .unwrap();
        let rt = h.runtime(vec![wf]);
        let s = rt.start(&name, "1", json!({}), opts()).await.unwrap();
        rt.drain().await.unwrap();
        let inst = rt.get(s.id).await.unwrap().unwrap();
        assert_eq!(inst.status, InstanceStatus::Completed, "{choice}");
        assert_eq!(join.runs(), 1, "{choice}: the join runs exactly once (G1)");
        let (ran, dead) = if choice == "ok" {
            (&left, "C")
        } else {
            (&right, "B")
        };
        assert_eq!(ran.runs(), 1);
        assert_eq!(inst.step(dead).unwrap().status, StepStatus::Dead);
    }
}

async fn dynamic_routing_picks_a_declared_target<B: Backend>(h: &Harness<B>) {
    let a = ScriptedStep::new("A", ["done"])
        .otherwise(StepOutcome::complete_with("done", json!({"amount": 150})));
    let big = done_step("Big", "done");
    let small = done_step("Small", "done");
    let wf = Workflow::builder("route")
        .unique("r", Scope::Workflow)
        .start(a.clone())
        .route(
            a,
            "done",
            [target(big.clone()), target(small.clone())],
            |ctx| {
                let amount = ctx
                    .step("a")
                    .and_then(|o| o["amount"].as_u64())
                    .unwrap_or(0);
                vec![Pick::step(if amount > 100 { "Big" } else { "Small" })]
            },
        )
        .on(big.clone(), "done", Done)
        .on(small.clone(), "done", Done)
        .build()
        .unwrap();
    let rt = h.runtime(vec![wf]);
    let s = rt.start("route", "1", json!({}), opts()).await.unwrap();
    rt.drain().await.unwrap();
    assert_eq!(status(&rt, s.id).await, InstanceStatus::Completed);
    assert_eq!((big.runs(), small.runs()), (1, 0));
}

fn approval() -> (Workflow, ScriptedStep) {
    let hold = ScriptedStep::new("Hold", ["approved", "rejected"]).otherwise(StepOutcome::wait());
    let wf = Workflow::builder("approval")
        .unique("req", Scope::Workflow)
        .start(hold.clone())
        .on(hold.clone(), "approved", Done)
        .on(hold.clone(), "rejected", Done)
        .build()
        .unwrap();
    (wf, hold)
}

async fn async_step_resumes_with_validation<B: Backend>(h: &Harness<B>) {
    let (wf, hold) = approval();
    let rt = h.runtime(vec![wf]);
    let s = rt.start("approval", "9", json!({}), opts()).await.unwrap();
    rt.drain().await.unwrap();
    assert_eq!(status(&rt, s.id).await, InstanceStatus::Waiting);
    assert!(matches!(
        rt.resume(s.id, "Hold", "maybe", json!({})).await,
        Err(RunnerError::UndeclaredEvent { .. })
    ));
    assert!(matches!(
        rt.resume(s.id, "Ghost", "approved", json!({})).await,
        Err(RunnerError::UnknownStep(_))
    ));
    assert!(matches!(
        rt.resume(Uuid::now_v7(), "Hold", "approved", json!({}))
            .await,
        Err(RunnerError::NotFound(_))
    ));
    rt.workflow("approval")
        .unwrap()
        .resume("9", "Hold", "approved", json!({"by": "ann"}))
        .await
        .unwrap();
    assert!(matches!(
        rt.resume(s.id, "Hold", "rejected", json!({})).await,
        Err(RunnerError::AlreadyResumed(_))
    ));
    rt.drain().await.unwrap();
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.status, InstanceStatus::Completed);
    assert_eq!(inst.context.steps["hold"], json!({"by": "ann"}));
    assert_eq!(hold.runs(), 1, "the async step never runs again");
    assert!(matches!(
        rt.resume(s.id, "Hold", "approved", json!({})).await,
        Err(RunnerError::Finished(InstanceStatus::Completed))
    ));
}

async fn resume_before_the_async_marker_is_kept<B: Backend>(h: &Harness<B>) {
    let (wf, _hold) = approval();
    let config = RunnerConfig::default().with_queues(
        hephaestus_runner::QueueNames::shared("advance")
            .with_execute("execute")
            .with_timer("timer"),
    );
    let rt = h.runtime_with(config, vec![wf], vec![]);
    let s = rt.start("approval", "1", json!({}), opts()).await.unwrap();
    // Only the advance: the step is active, its execution not yet run.
    let only = hephaestus_runner::testing::DrainOptions::default().with_kind(jobs::ADVANCE);
    rt.drain_with(&only).await.unwrap();
    rt.resume(s.id, "Hold", "approved", json!({"early": true}))
        .await
        .unwrap();
    rt.drain().await.unwrap();
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(
        inst.status,
        InstanceStatus::Completed,
        "the early resume was kept (G6)"
    );
    assert_eq!(inst.context.steps["hold"], json!({"early": true}));
}

async fn durable_timer_fires_after_a_restart<B: Backend>(h: &Harness<B>) {
    let wf = Workflow::builder("pause")
        .unique("p", Scope::Workflow)
        .start_with(Wait, json!({"duration": 1, "unit": "hour"}))
        .on(Wait, "timeout", Done)
        .build()
        .unwrap();
    let rt = h.runtime(vec![wf.clone()]);
    let s = rt.start("pause", "1", json!({}), opts()).await.unwrap();
    rt.drain().await.unwrap();
    assert_eq!(status(&rt, s.id).await, InstanceStatus::Waiting);
    let jobs_now = rt.jobs_of(s.id).await.unwrap();
    assert_eq!(jobs_now.len(), 1);
    assert_eq!(
        (jobs_now[0].kind.as_str(), jobs_now[0].state),
        (jobs::TIMER, JobState::Scheduled)
    );
    drop(rt);
    let restarted = h.runtime(vec![wf]);
    assert_eq!(restarted.drain().await.unwrap().total(), 0, "not due yet");
    h.clock.advance(Duration::from_secs(3601));
    restarted.drain().await.unwrap();
    assert_eq!(status(&restarted, s.id).await, InstanceStatus::Completed);
}

async fn wait_for_event_timeout_is_cancelled_by_resume<B: Backend>(h: &Harness<B>) {
    let wf = Workflow::builder("wfe")
        .unique("w", Scope::Workflow)
        .start_with(WaitForEvent, json!({"timeout_ms": 60_000}))
        .on(WaitForEvent, "received", Done)
        .on(WaitForEvent, "timeout", Done)
        .build()
        .unwrap();
    let rt = h.runtime(vec![wf]);
    let s = rt.start("wfe", "1", json!({}), opts()).await.unwrap();
    rt.drain().await.unwrap();
    rt.resume(s.id, WAIT_FOR_EVENT_ID, "received", json!({}))
        .await
        .unwrap();
    rt.drain().await.unwrap();
    assert!(
        rt.jobs_of(s.id).await.unwrap().is_empty(),
        "the timer was cancelled"
    );
    h.clock.advance(Duration::from_secs(120));
    assert_eq!(rt.drain().await.unwrap().total(), 0);
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.status, InstanceStatus::Completed);
    assert_eq!(
        inst.step(WAIT_FOR_EVENT_ID)
            .unwrap()
            .event
            .as_ref()
            .unwrap()
            .as_str(),
        "received"
    );
}

fn payment(charge: &ScriptedStep) -> (Workflow, ScriptedStep) {
    let begin = done_step("Begin", "done");
    let other = ScriptedStep::new("Other", ["done"]).otherwise(StepOutcome::wait());
    let join = done_step("Join", "done");
    let wf = Workflow::builder("pay")
        .unique("pay", Scope::Workflow)
        .start(begin.clone())
        .fan_out(
            begin,
            "done",
            [target(charge.clone()), target(other.clone())],
        )
        .on(charge.clone(), "charged", join.clone())
        .on(other.clone(), "done", join.clone())
        .on(join, "done", Done)
        .build()
        .unwrap();
    (wf, other)
}

fn constant(attempts: u32) -> RetryPolicy {
    RetryPolicy::new(
        attempts,
        Backoff::Constant,
        Duration::from_secs(10),
        Duration::from_secs(10),
    )
    .unwrap()
}

async fn retry_then_success<B: Backend>(h: &Harness<B>) {
    let charge = ScriptedStep::new("Charge", ["charged"])
        .on_attempt(1, StepOutcome::retry("network down"))
        .on_attempt(2, StepOutcome::retry("still down"))
        .with_retry_policy(constant(5));
    let (wf, _) = payment(&charge);
    let rt = h.runtime(vec![wf]);
    let s = rt.start("pay", "1", json!({}), opts()).await.unwrap();
    assert_eq!(rt.drain().await.unwrap().retried, 1);
    h.clock.advance(Duration::from_secs(9));
    assert_eq!(rt.drain().await.unwrap().total(), 0, "backoff not elapsed");
    h.clock.advance(Duration::from_secs(1));
    rt.drain().await.unwrap();
    h.clock.advance(Duration::from_secs(10));
    rt.drain().await.unwrap();
    assert_eq!(charge.attempts(), vec![1, 2, 3]);
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.step("Charge").unwrap().status, StepStatus::Completed);
    assert_eq!(
        inst.status,
        InstanceStatus::Waiting,
        "the other branch still waits"
    );
}

async fn retry_then_fail_cancels_other_jobs<B: Backend>(h: &Harness<B>) {
    let charge = ScriptedStep::new("Charge", ["charged"])
        .otherwise(StepOutcome::retry("card declined upstream"))
        .with_retry_policy(constant(2));
    let (wf, other) = payment(&charge);
    let rt = h.runtime(vec![wf]);
    let s = rt.start("pay", "1", json!({}), opts()).await.unwrap();
    rt.drain().await.unwrap();
    h.clock.advance(Duration::from_secs(10));
    let report = rt.drain().await.unwrap();
    assert_eq!(report.discarded, 1, "{report:?}");
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.status, InstanceStatus::Failed);
    let failure = inst.failure.clone().unwrap();
    assert_eq!(
        failure.reason,
        FailureReason::AttemptsExhausted { attempts: 2 }
    );
    assert_eq!(failure.step.unwrap().as_str(), "Charge");
    assert_eq!(failure.attempts.len(), 2, "every attempt's error is kept");
    assert_eq!(inst.steps["Other"].status, StepStatus::Cancelled);
    assert_eq!(other.runs(), 1);
    assert!(
        rt.jobs_of(s.id).await.unwrap().is_empty(),
        "no job of a failed instance is left"
    );
    assert_eq!(charge.attempts(), vec![1, 2]);
}

async fn cancel_mid_run_stops_everything<B: Backend>(h: &Harness<B>) {
    let gate = hephaestus_runner::testing::Gate::new();
    let slow = ScriptedStep::new("Slow", ["done"]).gated(&gate);
    let after = done_step("After", "done");
    let wf = Workflow::builder("cancel")
        .unique("c", Scope::Workflow)
        .start(slow.clone())
        .on(slow.clone(), "done", after.clone())
        .on(after.clone(), "done", Done)
        .build()
        .unwrap();
    let rt = h.runtime(vec![wf]);
    let s = rt.start("cancel", "1", json!({}), opts()).await.unwrap();
    let running = rt
        .drain_with(
            &hephaestus_runner::testing::DrainOptions::default()
                .with_settle(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    assert_eq!(running.in_flight.len(), 1, "the slow step is running");
    rt.workflow("cancel")
        .unwrap()
        .cancel("1", Some("customer left".into()))
        .await
        .unwrap();
    assert_eq!(status(&rt, s.id).await, InstanceStatus::Cancelled);
    gate.release();
    for handle in running.in_flight {
        let outcome = handle.await.unwrap();
        assert_eq!(
            outcome,
            hephaestus_runner::JobOutcome::Fenced,
            "its result is dropped"
        );
    }
    rt.drain().await.unwrap();
    assert_eq!(after.runs(), 0, "nothing runs after cancel");
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.status, InstanceStatus::Cancelled);
    assert_eq!(inst.steps["Slow"].status, StepStatus::Cancelled);
}

async fn versioned_instances_keep_their_version<B: Backend>(h: &Harness<B>) {
    let v = |n: u32, out: &'static str| {
        let s = FnStep::new("S", ["done"], move |_| {
            StepOutcome::complete_with("done", json!({"v": out}))
        });
        Workflow::builder("signup")
            .version(n)
            .unique("user", Scope::Version)
            .start(s.clone())
            .on(s, "done", Done)
            .build()
            .unwrap()
    };
    let family = WorkflowFamily::builder("signup")
        .version(v(1, "one"))
        .version(v(2, "two"))
        .current(1)
        .build()
        .unwrap();
    let rt = h.runtime_with(RunnerConfig::default(), vec![], vec![family]);
    let old = rt.start("signup", "a", json!({}), opts()).await.unwrap();
    let new = rt
        .start("signup", "a", json!({}), opts().with_version(2))
        .await
        .unwrap();
    assert_eq!((old.version, new.version), (1, 2));
    assert!(matches!(
        rt.start("signup", "a", json!({}), opts()).await,
        Err(RunnerError::AlreadyRunning { .. })
    ));
    rt.drain().await.unwrap();
    assert_eq!(
        rt.get(old.id).await.unwrap().unwrap().context.steps["s"],
        json!({"v": "one"})
    );
    assert_eq!(
        rt.get(new.id).await.unwrap().unwrap().context.steps["s"],
        json!({"v": "two"})
    );
}

async fn start_inside_a_callers_transaction<B: Backend>(h: &Harness<B>) {
    let (wf, _) = approval();
    let rt = h.runtime(vec![wf]);
    let mut tx = rt.backend().begin().await.unwrap();
    let s = rt
        .start_in(&mut tx, "approval", "1", json!({}), opts())
        .await
        .unwrap();
    drop(tx);
    assert!(
        rt.get(s.id).await.unwrap().is_none(),
        "rolled back with the caller"
    );
    assert_eq!(rt.drain().await.unwrap().total(), 0);
    let mut tx = rt.backend().begin().await.unwrap();
    let s = rt
        .start_in(&mut tx, "approval", "1", json!({}), opts())
        .await
        .unwrap();
    rt.backend().commit(tx).await.unwrap();
    rt.drain().await.unwrap();
    assert_eq!(status(&rt, s.id).await, InstanceStatus::Waiting);
}

async fn scheduled_resume_fires_or_is_cancelled<B: Backend>(h: &Harness<B>) {
    let (wf, _) = approval();
    let rt = h.runtime(vec![wf]);
    let s = rt.start("approval", "1", json!({}), opts()).await.unwrap();
    rt.drain().await.unwrap();
    let job = rt
        .schedule_resume(s.id, "Hold", "rejected", Duration::from_secs(30))
        .await
        .unwrap();
    rt.cancel_scheduled_resume(job).await.unwrap();
    assert!(matches!(
        rt.cancel_scheduled_resume(job).await,
        Err(RunnerError::TimerAlreadyFinished(_))
    ));
    rt.schedule_resume(s.id, "Hold", "rejected", Duration::from_secs(30))
        .await
        .unwrap();
    h.clock.advance(Duration::from_secs(31));
    rt.drain().await.unwrap();
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.status, InstanceStatus::Completed);
    assert_eq!(
        inst.step("Hold").unwrap().event.as_ref().unwrap().as_str(),
        "rejected"
    );
}

/// The failure handler's work for a scheduled resume whose attempts ran
/// out (its worker died each time, or the backend kept failing): the
/// instance, which would otherwise wait for it forever, fails with the
/// reason, in the transaction that discards the job.
async fn an_undeliverable_scheduled_resume_fails_its_instance<B: Backend>(h: &Harness<B>) {
    let (wf, _) = approval();
    let rt = h.runtime(vec![wf]);
    let s = rt.start("approval", "1", json!({}), opts()).await.unwrap();
    rt.drain().await.unwrap();
    h.discard_a_due_resume(&rt, s.id, "Hold", "approved").await;
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.status, InstanceStatus::Failed);
    assert_eq!(inst.step("Hold").unwrap().status, StepStatus::Cancelled);
    let failure = inst.failure.unwrap();
    assert!(
        failure
            .error
            .message
            .contains("the scheduled resume of step Hold could not be delivered"),
        "{failure:?}"
    );
    assert!(failure.error.message.contains("the worker died again"));
    assert_eq!(
        failure.reason,
        FailureReason::JobDiscarded {
            job: jobs::RESUME.to_owned()
        }
    );
    assert!(
        rt.jobs_of(s.id).await.unwrap().is_empty(),
        "nothing left to run"
    );
    assert_eq!(rt.drain().await.unwrap().total(), 0);
}

async fn wide_fan_out_with_a_slow_branch_runs_each_step_once<B: Backend>(h: &Harness<B>) {
    let gate = hephaestus_runner::testing::Gate::new();
    let start = done_step("Start", "done");
    let join = done_step("Join", "done");
    let branches: Vec<ScriptedStep> = (0..50)
        .map(|i| {
            let s = ScriptedStep::new(&format!("B{i}"), ["done"]);
            if i == 0 { s.gated(&gate) } else { s }
        })
        .collect();
    let mut b = Workflow::builder("wide")
        .unique("w", Scope::Workflow)
        .start(start.clone())
        .fan_out(start, "done", branches.iter().cloned().map(target));
    for br in &branches {
        b = b.on(br.clone(), "done", join.clone());
    }
    let wf = b.on(join.clone(), "done", Done).build().unwrap();
    let config = RunnerConfig::default()
        .with_concurrency(8)
        .with_poll_interval(Duration::from_millis(10));
    let rt = h.runtime_with(config, vec![wf], vec![]);
    let mut events = rt.subscribe();
    let s = rt.start("wide", "1", json!({}), opts()).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = {
        let rt = rt.clone();
        tokio::spawn(async move {
            rt.run(async {
                stopped.await.ok();
            })
            .await
        })
    };
    // Every fast branch completes while B0 is held at its gate.
    let mut fast_done = 0;
    let mut slow_started = false;
    while fast_done < 49 || !slow_started {
        let event = next_event(&mut events).await;
        let step_id = event
            .metadata
            .get("step")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        match event.name {
            names::STEP_STOP if step_id.starts_with('B') && step_id != "B0" => fast_done += 1,
            names::STEP_START if step_id == "B0" => slow_started = true,
            _ => {}
        }
    }
    assert_eq!(join.runs(), 0, "the join waits for the slow branch");
    gate.release();
    loop {
        if next_event(&mut events).await.name == names::WORKFLOW_STOP {
            break;
        }
    }
    assert_eq!(status(&rt, s.id).await, InstanceStatus::Completed);
    stop.send(()).ok();
    worker.await.unwrap().unwrap();
    for br in &branches {
        assert_eq!(br.runs(), 1, "a branch ran twice");
    }
    assert_eq!(join.runs(), 1, "the join ran once");
}

async fn next_event(
    events: &mut tokio::sync::broadcast::Receiver<hephaestus_runner::TelemetryEvent>,
) -> hephaestus_runner::TelemetryEvent {
    tokio::time::timeout(Duration::from_secs(60), events.recv())
        .await
        .expect("the run stalled")
        .expect("telemetry channel open")
}

on_both_backends!(several_workers_apply_every_result_exactly_once);

/// Three runtimes (worker processes) share one store and complete 1,000
/// workflows of two shapes; every step runs once per instance and every
/// instance completes.
async fn several_workers_apply_every_result_exactly_once<B: Backend>(h: &Harness<B>) {
    const INSTANCES: usize = 1_000;
    let a = done_step("A", "done");
    let b1 = done_step("B1", "done");
    let b2 = done_step("B2", "done");
    let b3 = done_step("B3", "done");
    let c = done_step("C", "done");
    let diamond = Workflow::builder("diamond")
        .unique("d", Scope::Workflow)
        .start(a.clone())
        .fan_out(
            a.clone(),
            "done",
            [target(b1.clone()), target(b2.clone()), target(b3.clone())],
        )
        .on(b1.clone(), "done", c.clone())
        .on(b2.clone(), "done", c.clone())
        .on(b3.clone(), "done", c.clone())
        .on(c.clone(), "done", Done)
        .build()
        .unwrap();
    let l1 = done_step("L1", "done");
    let l2 = done_step("L2", "done");
    let chain = Workflow::builder("chain")
        .unique("c", Scope::Workflow)
        .start(l1.clone())
        .on(l1.clone(), "done", l2.clone())
        .on(l2.clone(), "done", Done)
        .build()
        .unwrap();
    let config = RunnerConfig::default()
        .with_concurrency(6)
        .with_poll_interval(Duration::from_millis(20));
    let runtimes: Vec<_> = (0..3)
        .map(|_| h.runtime_with(config.clone(), vec![diamond.clone(), chain.clone()], vec![]))
        .collect();
    // Every runtime reports the completions it applies; count them all.
    let (tx, mut finished) = tokio::sync::mpsc::unbounded_channel::<Uuid>();
    for rt in &runtimes {
        let mut events = rt.subscribe();
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(e) if e.name == names::WORKFLOW_STOP => {
                        let id = e.metadata["instance_id"]
                            .as_str()
                            .and_then(|s| s.parse().ok());
                        if tx.send(id.unwrap_or_default()).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        panic!("telemetry lagged by {n} events")
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
    let mut ids = Vec::with_capacity(INSTANCES);
    for n in 0..INSTANCES {
        let (wf, rt) = if n % 2 == 0 {
            ("diamond", &runtimes[n % 3])
        } else {
            ("chain", &runtimes[n % 3])
        };
        ids.push(
            rt.start(wf, &n.to_string(), json!({}), opts())
                .await
                .unwrap()
                .id,
        );
    }
    let mut stops = Vec::new();
    let mut workers = Vec::new();
    for rt in &runtimes {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let rt = rt.clone();
        workers.push(tokio::spawn(async move {
            rt.run(async {
                stopped.await.ok();
            })
            .await
        }));
        stops.push(stop);
    }
    let mut completed = 0;
    while completed < INSTANCES {
        let stop_event = tokio::time::timeout(Duration::from_secs(120), finished.recv())
            .await
            .unwrap_or_else(|_| panic!("only {completed} of {INSTANCES} completed"));
        assert!(stop_event.is_some(), "telemetry forwarders ended early");
        completed += 1;
    }
    for stop in stops {
        stop.send(()).ok();
    }
    for w in workers {
        w.await.unwrap().unwrap();
    }
    for step in [&a, &b1, &b2, &b3, &c] {
        let per_instance = count_by_instance(step);
        assert_eq!(per_instance.len(), INSTANCES / 2, "{step:?}");
        assert!(
            per_instance.values().all(|n| *n == 1),
            "{step:?} ran twice for an instance"
        );
    }
    for step in [&l1, &l2] {
        let per_instance = count_by_instance(step);
        assert_eq!(per_instance.len(), INSTANCES / 2);
        assert!(per_instance.values().all(|n| *n == 1));
    }
    for id in ids.iter().step_by(97) {
        let inst = runtimes[1].get(*id).await.unwrap().unwrap();
        assert_eq!(inst.status, InstanceStatus::Completed);
        assert!(runtimes[2].jobs_of(*id).await.unwrap().is_empty());
    }
}

fn count_by_instance(step: &ScriptedStep) -> std::collections::BTreeMap<Uuid, usize> {
    let mut out = std::collections::BTreeMap::new();
    for e in step.executions() {
        *out.entry(e.instance_id).or_insert(0) += 1;
    }
    out
}

on_both_backends!(
    a_dead_workers_job_is_rescued,
    a_dead_workers_last_attempt_fails_the_instance
);

fn split_queues() -> RunnerConfig {
    RunnerConfig::default().with_queues(
        hephaestus_runner::QueueNames::shared("advance")
            .with_execute("execute")
            .with_timer("timer"),
    )
}

/// Takes the next execute job as a worker would, then "dies" with it.
async fn take_and_die<B: Backend>(h: &Harness<B>, rt: &hephaestus_runner::Runtime<B>) {
    let only = hephaestus_runner::testing::DrainOptions::default().with_kind(jobs::ADVANCE);
    rt.drain_with(&only).await.unwrap();
    let leases = rt
        .backend()
        .fetch("execute", 1, h.clock.now())
        .await
        .unwrap();
    assert_eq!(leases.len(), 1, "the execute job is taken");
}

async fn a_dead_workers_job_is_rescued<B: Backend>(h: &Harness<B>) {
    let step = ScriptedStep::new("Work", ["done"]).with_retry_policy(constant(3));
    let wf = Workflow::builder("rescue")
        .unique("r", Scope::Workflow)
        .start(step.clone())
        .on(step.clone(), "done", Done)
        .build()
        .unwrap();
    let rt = h.runtime_with(split_queues(), vec![wf], vec![]);
    let s = rt.start("rescue", "1", json!({}), opts()).await.unwrap();
    take_and_die(h, &rt).await;
    assert_eq!(rt.rescue_stale().await.unwrap(), 0, "not stale yet");
    h.clock.advance(Duration::from_secs(31));
    assert_eq!(
        rt.rescue_stale().await.unwrap(),
        1,
        "the silent job is rescued"
    );
    assert_eq!(
        rt.rescue_stale().await.unwrap(),
        0,
        "rescuing twice is a no-op"
    );
    h.clock.advance(Duration::from_secs(10));
    rt.drain().await.unwrap();
    assert_eq!(status(&rt, s.id).await, InstanceStatus::Completed);
    assert_eq!(
        step.attempts(),
        vec![2],
        "the dead attempt never ran user code here"
    );
}

async fn a_dead_workers_last_attempt_fails_the_instance<B: Backend>(h: &Harness<B>) {
    let step = ScriptedStep::new("Work", ["done"]).with_retry_policy(RetryPolicy::no_retries());
    let wf = Workflow::builder("rescue")
        .unique("r", Scope::Workflow)
        .start(step.clone())
        .on(step.clone(), "done", Done)
        .build()
        .unwrap();
    let rt = h.runtime_with(split_queues(), vec![wf], vec![]);
    let s = rt.start("rescue", "1", json!({}), opts()).await.unwrap();
    take_and_die(h, &rt).await;
    h.clock.advance(Duration::from_secs(31));
    assert_eq!(rt.rescue_stale().await.unwrap(), 1);
    rt.drain().await.unwrap();
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.status, InstanceStatus::Failed);
    let failure = inst.failure.unwrap();
    assert!(
        failure.error.message.contains("stopped heartbeating"),
        "{failure:?}"
    );
    assert_eq!(failure.reason, FailureReason::WorkerLost);
    assert_eq!(step.runs(), 0);
}

on_both_backends!(a_corrupt_instance_fails_after_retries_with_the_reason);

async fn a_corrupt_instance_fails_after_retries_with_the_reason<B: Backend>(h: &Harness<B>) {
    use hephaestus_engine_core::instance::StepState;
    use hephaestus_engine_core::ports::{NewStepResult, ResultPayload};
    let (wf, _) = approval();
    let config = RunnerConfig::default().with_advance_max_attempts(2);
    let rt = h.runtime_with(config, vec![wf], vec![]);
    let s = rt.start("approval", "1", json!({}), opts()).await.unwrap();
    rt.drain().await.unwrap();
    // Corrupt the stored state: a step the workflow does not define.
    let mut tx = rt.backend().begin().await.unwrap();
    let mut inst = rt.backend().lock(&mut tx, s.id).await.unwrap().unwrap();
    let state: StepState = inst.steps.values().next().cloned().unwrap();
    inst.steps.insert(StepId::new("Ghost").unwrap(), state);
    rt.backend().update(&mut tx, &inst).await.unwrap();
    rt.backend().commit(tx).await.unwrap();
    assert!(matches!(
        rt.resume(s.id, "Hold", "approved", json!({})).await,
        Err(RunnerError::Corrupt(_))
    ));
    // A result arrives anyway (recorded before the corruption, say): the
    // advance cannot apply it; it retries, then fails the instance.
    let mut tx = rt.backend().begin().await.unwrap();
    rt.backend()
        .record(
            &mut tx,
            &NewStepResult {
                instance_id: s.id,
                step: Some(StepId::new("Hold").unwrap()),
                activation: 1,
                payload: ResultPayload::Resume {
                    event: Event::new("approved").unwrap(),
                    payload: json!({}),
                },
            },
        )
        .await
        .unwrap();
    rt.backend().commit(tx).await.unwrap();
    rt.enqueue_raw(jobs::advance(
        rt.config(),
        rt.registry().get("approval", 1).unwrap(),
        s.id,
        None,
    ))
    .await
    .unwrap();
    let first = rt.drain().await.unwrap();
    assert_eq!(first.retried, 1, "{first:?}");
    h.clock.advance(Duration::from_secs(120));
    let second = rt.drain().await.unwrap();
    assert_eq!(second.discarded, 1, "{second:?}");
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.status, InstanceStatus::Failed);
    let failure = inst.failure.unwrap();
    assert!(
        failure.error.message.contains("cannot be advanced"),
        "{failure:?}"
    );
    assert!(
        failure.error.message.contains("Ghost"),
        "the reason names the problem: {failure:?}"
    );
    assert_eq!(failure.reason, FailureReason::CorruptState);
    assert!(rt.jobs_of(s.id).await.unwrap().is_empty());
}

on_both_backends!(uniqueness_scopes_through_the_api);

/// The four scopes, through `start`: `workflow` and `version` coexist across
/// workflows and versions as documented, `global` spans workflows, `none`
/// never conflicts and suffixes every business id.
async fn uniqueness_scopes_through_the_api<B: Backend>(h: &Harness<B>) {
    let wf = |id: &str, version: u32, scope: Scope| {
        let s = ScriptedStep::new("Hold", ["go"]).otherwise(StepOutcome::wait());
        Workflow::builder(id)
            .version(version)
            .unique("k", scope)
            .start(s.clone())
            .on(s, "go", Done)
            .build()
            .unwrap()
    };
    let versioned = WorkflowFamily::builder("by_version")
        .version(wf("by_version", 1, Scope::Version))
        .version(wf("by_version", 2, Scope::Version))
        .current(1)
        .build()
        .unwrap();
    let rt = h.runtime_with(
        RunnerConfig::default(),
        vec![
            wf("by_workflow_a", 1, Scope::Workflow),
            wf("by_workflow_b", 1, Scope::Workflow),
            wf("global_a", 1, Scope::Global),
            wf("global_b", 1, Scope::Global),
            wf("free", 1, Scope::None),
        ],
        vec![versioned],
    );
    let already = |r: Result<hephaestus_runner::Started, RunnerError>| {
        matches!(r, Err(RunnerError::AlreadyRunning { .. }))
    };
    // workflow: one per workflow, two workflows may share the value.
    rt.start("by_workflow_a", "1", json!({}), opts())
        .await
        .unwrap();
    rt.start("by_workflow_b", "1", json!({}), opts())
        .await
        .unwrap();
    assert!(already(
        rt.start("by_workflow_a", "1", json!({}), opts()).await
    ));
    // version: one per version.
    rt.start("by_version", "1", json!({}), opts())
        .await
        .unwrap();
    let v2 = opts().with_version(2);
    rt.start("by_version", "1", json!({}), v2.clone())
        .await
        .unwrap();
    assert!(already(rt.start("by_version", "1", json!({}), v2).await));
    // global: one across workflows.
    rt.start("global_a", "1", json!({}), opts()).await.unwrap();
    assert!(already(rt.start("global_b", "1", json!({}), opts()).await));
    // none: never conflicts; business ids carry a random suffix.
    let a = rt.start("free", "1", json!({}), opts()).await.unwrap();
    let b = rt.start("free", "1", json!({}), opts()).await.unwrap();
    assert_ne!(a.business_id, b.business_id);
    assert_eq!(a.business_id.value(), "1");
    assert!(a.business_id.suffix().is_some());
    // Addressing by value is refused for scope none (no addressable id).
    assert!(matches!(
        rt.workflow("free").unwrap().cancel("1", None).await,
        Err(RunnerError::NotFound(_))
    ));
}

/// Getting started on PostgreSQL in three lines: connect, migrate (twice is
/// harmless), build the runtime; bad URLs and unreachable servers are typed
/// errors.
#[tokio::test]
async fn a_postgres_backend_connects_migrates_and_runs_in_three_lines() {
    use hephaestus_engine_core::ports::PortError;
    use hephaestus_runner::postgres::PgBackend;

    let schema = crate::support::db::TestSchema::new().await;
    let url = crate::support::db::database_url();
    let backend = PgBackend::connect(url, schema.prefix.clone(), 4)
        .await
        .unwrap();
    backend.migrate().await.unwrap();
    backend
        .migrate()
        .await
        .expect("migrating again changes nothing");
    let a = done_step("A", "done");
    let wf = Workflow::builder("three_lines")
        .unique("run", Scope::Workflow)
        .start(a.clone())
        .on(a.clone(), "done", Done)
        .build()
        .unwrap();
    let rt = hephaestus_runner::Runtime::builder(backend)
        .discard_handler(hephaestus_failure_handler::FailureHandler::new())
        .workflow(wf)
        .build()
        .unwrap();
    let s = rt
        .start("three_lines", "1", json!({}), opts())
        .await
        .unwrap();
    rt.drain().await.unwrap();
    assert_eq!(status(&rt, s.id).await, InstanceStatus::Completed);
    assert_eq!(a.runs(), 1);

    let prefix = schema.prefix.clone();
    assert!(matches!(
        PgBackend::connect("not a url", prefix.clone(), 1).await,
        Err(PortError::InvalidInput(_))
    ));
    match PgBackend::connect("postgres://postgres@127.0.0.1:1/nowhere", prefix, 1).await {
        Err(PortError::Unavailable(cause)) => assert!(
            cause.to_string().to_lowercase().contains("refused"),
            "the cause is kept: {cause}"
        ),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    schema.teardown().await;
}
