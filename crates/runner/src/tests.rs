//! The runner on the in-memory backend: the spec's behaviours end to end.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use hephaestus_engine_core::instance::{InstanceStatus, StepStatus};
use hephaestus_engine_core::ports::memory::MemoryBackend;
use hephaestus_engine_core::ports::{JobQueue, JobState};
use hephaestus_engine_core::prelude::*;
use hephaestus_engine_core::steps::{DONE_ID, Done, FnStep, WAIT_FOR_EVENT_ID, Wait, WaitForEvent};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{RunnerConfig, RunnerError, Runtime, StartOptions};

/// A virtual clock tests move by hand.
#[derive(Clone)]
struct TestClock(Arc<Mutex<DateTime<Utc>>>);

impl TestClock {
    fn new() -> Self {
        Self(Arc::new(Mutex::new(
            Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        )))
    }
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
    fn advance(&self, d: Duration) {
        *self.0.lock().unwrap() += chrono::Duration::from_std(d).unwrap();
    }
    fn as_clock(&self) -> crate::Clock {
        let me = self.clone();
        Arc::new(move || me.now())
    }
}

/// Counts executions per step id.
#[derive(Clone, Default)]
struct Counter(Arc<Mutex<std::collections::BTreeMap<String, usize>>>);

impl Counter {
    fn hit(&self, step: &str) {
        *self.0.lock().unwrap().entry(step.to_owned()).or_default() += 1;
    }
    fn get(&self, step: &str) -> usize {
        self.0.lock().unwrap().get(step).copied().unwrap_or(0)
    }
}

fn counting(counter: &Counter, id: &'static str, event: &'static str, output: Value) -> FnStep {
    let c = counter.clone();
    FnStep::new(id, [event], move |_| {
        c.hit(id);
        StepOutcome::complete_with(event, output.clone())
    })
}

fn runtime_with(workflows: Vec<Workflow>, clock: &TestClock) -> Runtime<MemoryBackend> {
    let backend = MemoryBackend::with_clock(clock.as_clock());
    let mut b = Runtime::builder(backend).clock(clock.as_clock());
    for wf in workflows {
        b = b.workflow(wf);
    }
    b.build().unwrap()
}

fn linear(counter: &Counter) -> Workflow {
    let a = counting(counter, "PassStep", "done", json!({"processed": true}));
    Workflow::builder("linear")
        .unique("order", Scope::Workflow)
        .start(a.clone())
        .on(a, "done", Done)
        .build()
        .unwrap()
}

#[tokio::test]
async fn linear_workflow_runs_in_five_jobs() {
    let clock = TestClock::new();
    let counter = Counter::default();
    let rt = runtime_with(vec![linear(&counter)], &clock);
    let started = rt
        .start("linear", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    assert_eq!(started.business_id.as_str(), "order::1");
    let report = rt.drain().await.unwrap();
    // Advance, Execute(PassStep), Advance, Execute(Done), Advance — the
    // original's reference trace.
    assert_eq!(report.succeeded, 5, "{report:?}");
    let inst = rt.get(started.id).await.unwrap().unwrap();
    assert_eq!(inst.status, InstanceStatus::Completed);
    assert_eq!(inst.context.steps["pass_step"], json!({"processed": true}));
    assert_eq!(counter.get("PassStep"), 1);
    assert!(rt.backend().live_jobs(&json!({})).await.unwrap().is_empty());
}

#[tokio::test]
async fn uniqueness_holds_among_active_instances_and_history_is_kept() {
    let clock = TestClock::new();
    let counter = Counter::default();
    let rt = runtime_with(vec![linear(&counter)], &clock);
    let first = rt
        .start("linear", "7", json!({}), StartOptions::default())
        .await
        .unwrap();
    let err = rt
        .start("linear", "7", json!({}), StartOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, RunnerError::AlreadyRunning { instance_id, .. } if instance_id == first.id),
        "{err:?}"
    );
    rt.drain().await.unwrap();
    let second = rt
        .start("linear", "7", json!({}), StartOptions::default())
        .await
        .unwrap();
    assert_ne!(first.id, second.id);
    assert_eq!(
        rt.get(first.id).await.unwrap().unwrap().status,
        InstanceStatus::Completed
    );
    let bad = rt
        .start("linear", "Not Valid", json!({}), StartOptions::default())
        .await;
    assert!(matches!(bad, Err(RunnerError::BusinessId(_))));
    let unknown = rt
        .start("nope", "1", json!({}), StartOptions::default())
        .await;
    assert!(matches!(unknown, Err(RunnerError::Registry(_))));
}

fn fan_out(counter: &Counter, width: usize) -> Workflow {
    let start = counting(counter, "Start", "done", json!({}));
    let join = counting(counter, "Join", "done", json!({}));
    let branches: Vec<FnStep> = (0..width)
        .map(|i| {
            let c = counter.clone();
            let id: &'static str = Box::leak(format!("Branch{i}").into_boxed_str());
            FnStep::new(id, ["done"], move |_| {
                c.hit(id);
                StepOutcome::complete_with("done", json!({ "branch": i }))
            })
        })
        .collect();
    let mut b = Workflow::builder("fan")
        .unique("job", Scope::Workflow)
        .start(start.clone())
        .fan_out(start, "done", branches.iter().cloned().map(target));
    for br in branches {
        b = b.on(br, "done", join.clone());
    }
    b.on(join, "done", Done).build().unwrap()
}

#[tokio::test]
async fn fan_out_and_join_with_every_branch_in_the_context() {
    let clock = TestClock::new();
    let counter = Counter::default();
    let rt = runtime_with(vec![fan_out(&counter, 5)], &clock);
    let s = rt
        .start("fan", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    rt.drain().await.unwrap();
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.status, InstanceStatus::Completed);
    for i in 0..5 {
        assert_eq!(
            inst.context.steps[&format!("branch{i}")],
            json!({ "branch": i })
        );
        assert_eq!(counter.get(&format!("Branch{i}")), 1);
    }
    assert_eq!(counter.get("Join"), 1);
}

#[tokio::test]
async fn parallel_workers_run_a_wide_fan_out_once_per_step() {
    let clock = TestClock::new();
    let counter = Counter::default();
    let config = RunnerConfig {
        concurrency: 8,
        poll_interval: Duration::from_millis(5),
        ..RunnerConfig::default()
    };
    let backend = MemoryBackend::with_clock(clock.as_clock());
    let rt = Runtime::builder(backend)
        .clock(clock.as_clock())
        .config(config)
        .workflow(fan_out(&counter, 50))
        .build()
        .unwrap();
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(
            rt.start("fan", &n.to_string(), json!({}), StartOptions::default())
                .await
                .unwrap()
                .id,
        );
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let worker = {
        let rt = rt.clone();
        tokio::spawn(async move {
            rt.run(async {
                rx.await.ok();
            })
            .await
        })
    };
    let worker2 = {
        let rt = rt.clone();
        let (_keep, rx2) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            tokio::time::timeout(
                Duration::from_secs(30),
                rt.run(async {
                    rx2.await.ok();
                }),
            )
            .await
        })
    };
    // Wait for completion (bounded safety net), checking by state, not sleeps.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut done = 0;
        for id in &ids {
            if rt.get(*id).await.unwrap().unwrap().status == InstanceStatus::Completed {
                done += 1;
            }
        }
        if done == ids.len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "fan-outs did not complete"
        );
        tokio::task::yield_now().await;
    }
    tx.send(()).ok();
    worker.await.unwrap().unwrap();
    worker2.abort();
    for i in 0..50 {
        assert_eq!(counter.get(&format!("Branch{i}")), 10, "Branch{i}");
    }
    assert_eq!(counter.get("Join"), 10);
}

fn branching(choice: &'static str, counter: &Counter) -> Workflow {
    let c = counter.clone();
    let a = FnStep::new("A", ["ok", "ko"], move |_| {
        c.hit("A");
        StepOutcome::complete(choice)
    });
    let b = counting(counter, "B", "done", json!({}));
    let cc = counting(counter, "C", "done", json!({}));
    let d = counting(counter, "D", "done", json!({}));
    Workflow::builder("branch")
        .unique("x", Scope::Workflow)
        .start(a.clone())
        .on(a.clone(), "ok", b.clone())
        .on(a, "ko", cc.clone())
        .on(b, "done", d.clone())
        .on(cc, "done", d.clone())
        .on(d, "done", Done)
        .build()
        .unwrap()
}

#[tokio::test]
async fn the_join_after_exclusive_branches_runs_once() {
    for (choice, ran, skipped) in [("ok", "B", "C"), ("ko", "C", "B")] {
        let clock = TestClock::new();
        let counter = Counter::default();
        let rt = runtime_with(vec![branching(choice, &counter)], &clock);
        let s = rt
            .start("branch", "1", json!({}), StartOptions::default())
            .await
            .unwrap();
        rt.drain().await.unwrap();
        let inst = rt.get(s.id).await.unwrap().unwrap();
        assert_eq!(inst.status, InstanceStatus::Completed);
        assert_eq!(
            (counter.get(ran), counter.get(skipped), counter.get("D")),
            (1, 0, 1)
        );
        assert_eq!(inst.step(skipped).unwrap().status, StepStatus::Dead);
    }
}

fn approval() -> Workflow {
    let hold = FnStep::new("Hold", ["approved", "rejected"], |_| StepOutcome::wait());
    Workflow::builder("approval")
        .unique("req", Scope::Workflow)
        .start(hold.clone())
        .on(hold.clone(), "approved", Done)
        .on(hold, "rejected", Done)
        .build()
        .unwrap()
}

#[tokio::test]
async fn async_step_waits_and_resumes_with_validation() {
    let clock = TestClock::new();
    let rt = runtime_with(vec![approval()], &clock);
    let s = rt
        .start("approval", "9", json!({}), StartOptions::default())
        .await
        .unwrap();
    rt.drain().await.unwrap();
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.status, InstanceStatus::Waiting);
    let err = rt
        .resume(s.id, "Hold", "maybe", json!({}))
        .await
        .unwrap_err();
    assert!(matches!(err, RunnerError::UndeclaredEvent { .. }), "{err}");
    let err = rt
        .resume(s.id, "Ghost", "approved", json!({}))
        .await
        .unwrap_err();
    assert!(matches!(err, RunnerError::UnknownStep(_)), "{err}");
    let err = rt
        .resume(Uuid::now_v7(), "Hold", "approved", json!({}))
        .await
        .unwrap_err();
    assert!(matches!(err, RunnerError::NotFound(_)), "{err}");
    rt.resume_by_business_value("approval", "9", "Hold", "approved", json!({"by": "ann"}))
        .await
        .unwrap();
    let again = rt
        .resume(s.id, "Hold", "rejected", json!({}))
        .await
        .unwrap_err();
    assert!(matches!(again, RunnerError::AlreadyResumed(_)), "{again}");
    rt.drain().await.unwrap();
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.status, InstanceStatus::Completed);
    assert_eq!(inst.context.steps["hold"], json!({"by": "ann"}));
    let late = rt
        .resume(s.id, "Hold", "approved", json!({}))
        .await
        .unwrap_err();
    assert!(
        matches!(late, RunnerError::Finished(InstanceStatus::Completed)),
        "{late}"
    );
}

#[tokio::test]
async fn a_resume_before_the_async_marker_is_applied_is_kept() {
    let clock = TestClock::new();
    let rt = runtime_with(vec![approval()], &clock);
    let s = rt
        .start("approval", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    // Run only the first advance: the step is active, its job not yet run.
    let lease = rt
        .backend()
        .fetch("hephaestus", 1, clock.now())
        .await
        .unwrap()
        .remove(0);
    rt.perform(lease).await;
    rt.resume(s.id, "Hold", "approved", json!({"early": true}))
        .await
        .unwrap();
    rt.drain().await.unwrap();
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.status, InstanceStatus::Completed);
    assert_eq!(inst.context.steps["hold"], json!({"early": true}));
}

#[tokio::test]
async fn wait_timers_are_durable_jobs_that_fire_on_the_clock() {
    let clock = TestClock::new();
    let wf = Workflow::builder("pause")
        .unique("p", Scope::Workflow)
        .start_with(Wait, json!({"duration": 1, "unit": "hour"}))
        .on(Wait, "timeout", Done)
        .build()
        .unwrap();
    let backend = MemoryBackend::with_clock(clock.as_clock());
    let rt = Runtime::builder(backend.clone())
        .clock(clock.as_clock())
        .workflow(wf.clone())
        .build()
        .unwrap();
    let s = rt
        .start("pause", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    rt.drain().await.unwrap();
    assert_eq!(
        rt.get(s.id).await.unwrap().unwrap().status,
        InstanceStatus::Waiting
    );
    let timers: Vec<_> = backend
        .jobs()
        .into_iter()
        .filter(|j| j.kind == crate::jobs::TIMER)
        .collect();
    assert_eq!(timers.len(), 1);
    assert_eq!(timers[0].state, JobState::Scheduled);
    // A new runtime over the same store (a restart) still fires it.
    drop(rt);
    let rt2 = Runtime::builder(backend)
        .clock(clock.as_clock())
        .workflow(wf)
        .build()
        .unwrap();
    assert_eq!(rt2.drain().await.unwrap().total(), 0, "not due yet");
    clock.advance(Duration::from_secs(3601));
    rt2.drain().await.unwrap();
    assert_eq!(
        rt2.get(s.id).await.unwrap().unwrap().status,
        InstanceStatus::Completed
    );
}

#[tokio::test]
async fn wait_for_event_timeout_is_cancelled_by_a_resume() {
    let clock = TestClock::new();
    let wf = Workflow::builder("wfe")
        .unique("w", Scope::Workflow)
        .start_with(WaitForEvent, json!({"timeout_ms": 60_000}))
        .on(WaitForEvent, "received", Done)
        .on(WaitForEvent, "timeout", Done)
        .build()
        .unwrap();
    let rt = runtime_with(vec![wf], &clock);
    let s = rt
        .start("wfe", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    rt.drain().await.unwrap();
    rt.resume(s.id, WAIT_FOR_EVENT_ID, "received", json!({}))
        .await
        .unwrap();
    rt.drain().await.unwrap();
    let timer = rt
        .backend()
        .jobs()
        .into_iter()
        .find(|j| j.kind == crate::jobs::TIMER)
        .unwrap();
    assert_eq!(timer.state, JobState::Cancelled);
    clock.advance(Duration::from_secs(120));
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

fn flaky(failures: usize, attempts_seen: &Arc<Mutex<Vec<u32>>>, max_attempts: u32) -> Workflow {
    let seen = attempts_seen.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let step = FnStep::new("Charge", ["charged"], move |input| {
        seen.lock().unwrap().push(input.attempt);
        if calls.fetch_add(1, Ordering::SeqCst) < failures {
            StepOutcome::retry("card network down")
        } else {
            StepOutcome::complete("charged")
        }
    })
    .with_retry_policy(
        RetryPolicy::new(
            max_attempts,
            Backoff::Constant,
            Duration::from_secs(10),
            Duration::from_secs(10),
        )
        .unwrap(),
    );
    let other = FnStep::new("Other", ["done"], |_| StepOutcome::wait());
    let start = FnStep::new("Begin", ["done"], |_| StepOutcome::complete("done"));
    let join = FnStep::new("Join", ["done"], |_| StepOutcome::complete("done"));
    Workflow::builder("pay")
        .unique("pay", Scope::Workflow)
        .start(start.clone())
        .fan_out(start, "done", [target(step.clone()), target(other.clone())])
        .on(step, "charged", join.clone())
        .on(other, "done", join.clone())
        .on(join, "done", Done)
        .build()
        .unwrap()
}

#[tokio::test]
async fn retries_follow_the_policy_then_succeed() {
    let clock = TestClock::new();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let rt = runtime_with(vec![flaky(2, &attempts, 5)], &clock);
    let s = rt
        .start("pay", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    let first = rt.drain().await.unwrap();
    assert_eq!(first.retried, 1);
    assert_eq!(*attempts.lock().unwrap(), vec![1]);
    clock.advance(Duration::from_secs(9));
    assert_eq!(rt.drain().await.unwrap().total(), 0, "backoff not elapsed");
    clock.advance(Duration::from_secs(1));
    rt.drain().await.unwrap();
    clock.advance(Duration::from_secs(10));
    rt.drain().await.unwrap();
    assert_eq!(*attempts.lock().unwrap(), vec![1, 2, 3]);
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.step("Charge").unwrap().status, StepStatus::Completed);
}

#[tokio::test]
async fn exhausted_retries_fail_the_instance_and_cancel_its_other_jobs() {
    let clock = TestClock::new();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let rt = runtime_with(vec![flaky(10, &attempts, 2)], &clock);
    let s = rt
        .start("pay", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    rt.drain().await.unwrap();
    clock.advance(Duration::from_secs(10));
    let report = rt.drain().await.unwrap();
    assert_eq!(report.discarded, 1);
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.status, InstanceStatus::Failed);
    let failure = inst.failure.unwrap();
    assert_eq!(failure.step.unwrap().as_str(), "Charge");
    assert_eq!(failure.attempts.len(), 2, "every attempt's error is kept");
    assert_eq!(inst.steps["Other"].status, StepStatus::Cancelled);
    assert!(
        rt.backend()
            .live_jobs(&crate::jobs::of_instance(s.id))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn cancel_really_stops_the_instance() {
    let clock = TestClock::new();
    let rt = runtime_with(vec![approval()], &clock);
    let s = rt
        .start("approval", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    rt.drain().await.unwrap();
    rt.cancel_by_business_value("approval", "1", Some("changed mind".into()))
        .await
        .unwrap();
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.status, InstanceStatus::Cancelled);
    assert_eq!(rt.drain().await.unwrap().succeeded, 0);
    let err = rt.cancel(s.id, None).await.unwrap_err();
    assert!(matches!(
        err,
        RunnerError::Finished(InstanceStatus::Cancelled)
    ));
    let err = rt
        .resume(s.id, "Hold", "approved", json!({}))
        .await
        .unwrap_err();
    assert!(matches!(err, RunnerError::Finished(_)));
    let none = rt
        .cancel_by_business_value("approval", "1", None)
        .await
        .unwrap_err();
    assert!(matches!(none, RunnerError::NotFound(_)));
}

#[tokio::test]
async fn a_step_result_after_cancel_is_ignored() {
    let clock = TestClock::new();
    let counter = Counter::default();
    let rt = runtime_with(vec![linear(&counter)], &clock);
    let s = rt
        .start("linear", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    let advance = rt
        .backend()
        .fetch("hephaestus", 1, clock.now())
        .await
        .unwrap()
        .remove(0);
    rt.perform(advance).await;
    let execute = rt
        .backend()
        .fetch("hephaestus", 1, clock.now())
        .await
        .unwrap()
        .remove(0);
    rt.cancel(s.id, None).await.unwrap();
    // The execute job was cancelled while fetched: its work is fenced off.
    let outcome = rt.perform(execute).await;
    assert!(
        matches!(
            outcome,
            crate::JobOutcome::Skipped | crate::JobOutcome::Fenced
        ),
        "{outcome:?}"
    );
    assert_eq!(counter.get("PassStep"), 0, "no step runs after cancel");
    assert_eq!(
        rt.get(s.id).await.unwrap().unwrap().status,
        InstanceStatus::Cancelled
    );
}

#[tokio::test]
async fn panicking_steps_are_retried_as_errors() {
    let clock = TestClock::new();
    let step = FnStep::new("Boom", ["done"], |_| panic!("kaboom"))
        .with_retry_policy(RetryPolicy::no_retries());
    let wf = Workflow::builder("boom")
        .unique("b", Scope::Workflow)
        .start(step.clone())
        .on(step, "done", Done)
        .build()
        .unwrap();
    let rt = runtime_with(vec![wf], &clock);
    let s = rt
        .start("boom", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    rt.drain().await.unwrap();
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.status, InstanceStatus::Failed);
    assert!(inst.failure.unwrap().error.message.contains("kaboom"));
}

#[tokio::test]
async fn versioned_families_keep_each_instance_on_its_version() {
    let clock = TestClock::new();
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
    let backend = MemoryBackend::with_clock(clock.as_clock());
    let rt = Runtime::builder(backend)
        .clock(clock.as_clock())
        .family(family)
        .build()
        .unwrap();
    let old = rt
        .start("signup", "a", json!({}), StartOptions::default())
        .await
        .unwrap();
    let new = rt
        .start(
            "signup",
            "a",
            json!({}),
            StartOptions {
                version: Some(2),
                ..StartOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (old.version, new.version),
        (1, 2),
        "scope version: both may be active"
    );
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

#[tokio::test]
async fn an_unregistered_workflow_leaves_the_instance_untouched() {
    let clock = TestClock::new();
    let backend = MemoryBackend::with_clock(clock.as_clock());
    let rt = Runtime::builder(backend.clone())
        .clock(clock.as_clock())
        .workflow(approval())
        .build()
        .unwrap();
    let s = rt
        .start("approval", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    let other = Runtime::builder(backend.clone())
        .clock(clock.as_clock())
        .build()
        .unwrap();
    let report = other.drain().await.unwrap();
    assert_eq!(report.retried, 1);
    assert_eq!(
        other.get(s.id).await.unwrap().unwrap().status,
        InstanceStatus::Pending
    );
    let err = other
        .resume(s.id, "Hold", "approved", json!({}))
        .await
        .unwrap_err();
    assert!(matches!(err, RunnerError::Registry(_)), "{err}");
    // Registered again: it continues.
    clock.advance(Duration::from_secs(120));
    rt.drain().await.unwrap();
    assert_eq!(
        rt.get(s.id).await.unwrap().unwrap().status,
        InstanceStatus::Waiting
    );
}

#[tokio::test]
async fn start_inside_a_callers_unit_of_work() {
    use hephaestus_engine_core::ports::UnitOfWork;
    let clock = TestClock::new();
    let counter = Counter::default();
    let rt = runtime_with(vec![linear(&counter)], &clock);
    let mut tx = rt.backend().begin().await.unwrap();
    let s = rt
        .start_in(&mut tx, "linear", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    drop(tx); // rolled back: nothing exists
    assert!(rt.get(s.id).await.unwrap().is_none());
    assert_eq!(rt.drain().await.unwrap().total(), 0);
    let mut tx = rt.backend().begin().await.unwrap();
    let s = rt
        .start_in(&mut tx, "linear", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    rt.backend().commit(tx).await.unwrap();
    rt.drain().await.unwrap();
    assert_eq!(
        rt.get(s.id).await.unwrap().unwrap().status,
        InstanceStatus::Completed
    );
}

#[tokio::test]
async fn scheduled_resumes_fire_and_can_be_cancelled() {
    let clock = TestClock::new();
    let rt = runtime_with(vec![approval()], &clock);
    let s = rt
        .start("approval", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
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
    let job = rt
        .schedule_resume(s.id, "Hold", "rejected", Duration::from_secs(30))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(31));
    rt.drain().await.unwrap();
    let inst = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(inst.status, InstanceStatus::Completed);
    assert_eq!(
        inst.step("Hold").unwrap().event.as_ref().unwrap().as_str(),
        "rejected"
    );
    assert!(matches!(
        rt.cancel_scheduled_resume(job).await,
        Err(RunnerError::TimerAlreadyFinished(_))
    ));
    let _ = DONE_ID;
}

#[tokio::test]
async fn the_typed_facade_addresses_instances_by_business_value() {
    #[derive(serde::Serialize)]
    struct Request {
        amount: u32,
    }
    let clock = TestClock::new();
    let rt = runtime_with(vec![approval()], &clock);
    assert!(matches!(rt.workflow("nope"), Err(RunnerError::Registry(_))));
    let approvals = rt.workflow("approval").unwrap();
    let started = approvals.start("42", Request { amount: 10 }).await.unwrap();
    rt.drain().await.unwrap();
    let inst = approvals.get("42").await.unwrap().unwrap();
    assert_eq!(inst.id, started.id);
    assert_eq!(inst.context.initial, json!({"amount": 10}));
    approvals
        .resume("42", "Hold", "approved", json!({}))
        .await
        .unwrap();
    rt.drain().await.unwrap();
    assert_eq!(
        approvals.get("42").await.unwrap().unwrap().status,
        InstanceStatus::Completed
    );
    assert!(matches!(
        approvals.cancel("42", None).await,
        Err(RunnerError::NotFound(_))
    ));
    let all = approvals
        .list(hephaestus_engine_core::ports::InstanceFilter::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
}

#[test]
fn telemetry_emits_the_original_events_with_protected_fields_and_metrics() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use crate::telemetry::names;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let clock = TestClock::new();
            let counter = Counter::default();
            let builder = Runtime::builder(MemoryBackend::with_clock(clock.as_clock()))
                .clock(clock.as_clock())
                .workflow(linear(&counter))
                .workflow(approval());
            let mut events = builder.subscribe();
            let runtime = builder.build().unwrap();
            let mut meta = serde_json::Map::new();
            meta.insert("request_id".into(), json!("r-1"));
            meta.insert("instance_id".into(), json!("forged"));
            let s = runtime
                .start(
                    "linear",
                    "1",
                    json!({"a": 1}),
                    StartOptions {
                        telemetry_metadata: meta,
                        ..StartOptions::default()
                    },
                )
                .await
                .unwrap();
            runtime.drain().await.unwrap();
            let a = runtime
                .start("approval", "1", json!({}), StartOptions::default())
                .await
                .unwrap();
            runtime.drain().await.unwrap();
            clock.advance(Duration::from_secs(5));
            runtime
                .resume(a.id, "Hold", "approved", json!({}))
                .await
                .unwrap();
            runtime.drain().await.unwrap();
            let mut seen = Vec::new();
            while let Ok(e) = events.try_recv() {
                seen.push(e);
            }
            let names_seen: std::collections::BTreeSet<&str> =
                seen.iter().map(|e| e.name).collect();
            for name in [
                names::RUNNER_INIT,
                names::WORKFLOW_START,
                names::WORKFLOW_STOP,
                names::WORKFLOW_TRANSITION,
                names::STEP_START,
                names::STEP_STOP,
                names::STEP_ASYNC,
                names::STEP_RESUME,
                names::ENGINE_ADVANCE,
            ] {
                assert!(
                    names_seen.contains(name),
                    "{name} not emitted: {names_seen:?}"
                );
            }
            let start = seen
                .iter()
                .find(|e| e.name == names::WORKFLOW_START)
                .unwrap();
            assert_eq!(
                start.metadata["request_id"], "r-1",
                "caller metadata is carried"
            );
            assert_eq!(
                start.metadata["instance_id"],
                json!(s.id),
                "caller metadata cannot override system fields"
            );
            assert_eq!(start.metadata["business_id"], "order::1");
            assert_eq!(start.metadata["initial_step"], "PassStep");
            let stop = seen
                .iter()
                .find(|e| e.name == names::WORKFLOW_STOP)
                .unwrap();
            assert_eq!(stop.measurements["step_count"], 2);
            let step_async = seen.iter().find(|e| e.name == names::STEP_ASYNC).unwrap();
            assert_eq!(step_async.metadata["instance_status"], "waiting");
            let resume = seen.iter().find(|e| e.name == names::STEP_RESUME).unwrap();
            assert_eq!(resume.measurements["wait_duration"], 5000);
            assert_eq!(resume.metadata["source"], "external");
        });
    });
    let metrics: Vec<(String, DebugValue)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| (key.key().name().to_owned(), value))
        .collect();
    let find = |name: &str| metrics.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let total = |name: &str| -> u64 {
        metrics
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| match v {
                DebugValue::Counter(c) => *c,
                _ => 0,
            })
            .sum()
    };
    assert_eq!(
        total("hephaestus.workflow.start.count"),
        2,
        "one per workflow label"
    );
    assert_eq!(total("hephaestus.workflow.stop.count"), 2);
    assert_eq!(
        find("hephaestus.step.async.count"),
        Some(&DebugValue::Counter(1))
    );
    assert!(
        matches!(find("hephaestus.step.resume.wait_duration"), Some(DebugValue::Histogram(v)) if v.len() == 1)
    );
    assert!(matches!(
        find("hephaestus.engine.advance.active_steps_count"),
        Some(DebugValue::Gauge(_))
    ));
}

#[tokio::test]
async fn failures_emit_exceptions() {
    let clock = TestClock::new();
    let step = FnStep::new("Bad", ["done"], |_| StepOutcome::fatal("nope"));
    let wf = Workflow::builder("bad")
        .unique("b", Scope::Workflow)
        .start(step.clone())
        .on(step, "done", Done)
        .build()
        .unwrap();
    let rt = runtime_with(vec![wf], &clock);
    let mut events = rt.subscribe();
    rt.start("bad", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    rt.drain().await.unwrap();
    let mut names = Vec::new();
    while let Ok(e) = events.try_recv() {
        if e.name == crate::telemetry::names::WORKFLOW_EXCEPTION {
            assert_eq!(e.metadata["failed_step"], "Bad");
            assert_eq!(e.metadata["reason"], "nope");
        }
        if e.name == crate::telemetry::names::STEP_EXCEPTION {
            assert_eq!(e.metadata["kind"], "fatal");
            assert_eq!(e.metadata["attempt"], 1);
        }
        names.push(e.name);
    }
    assert!(names.contains(&crate::telemetry::names::STEP_EXCEPTION));
    assert!(names.contains(&crate::telemetry::names::WORKFLOW_EXCEPTION));
}

mod testing_tools {
    use super::*;
    use crate::QueueNames;
    use crate::testing::{DrainOptions, Gate, ScriptedStep, VirtualClock};

    fn rt_with(wf: Workflow, clock: &VirtualClock, queues: QueueNames) -> Runtime<MemoryBackend> {
        Runtime::builder(MemoryBackend::with_clock(clock.clock()))
            .clock(clock.clock())
            .config(RunnerConfig {
                queues,
                ..RunnerConfig::default()
            })
            .workflow(wf)
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn scripted_steps_see_attempts_and_a_stable_idempotency_key() {
        let clock = VirtualClock::default();
        let step = ScriptedStep::new("charge", ["charged"])
            .on_attempt(1, StepOutcome::retry("down"))
            .on_attempt(2, StepOutcome::retry("still down"))
            .with_retry_policy(
                RetryPolicy::new(
                    5,
                    Backoff::Exponential,
                    Duration::from_secs(1),
                    Duration::from_secs(60),
                )
                .unwrap(),
            );
        let wf = Workflow::builder("pay")
            .unique("p", Scope::Workflow)
            .start(step.clone())
            .on(step.clone(), "charged", Done)
            .build()
            .unwrap();
        let rt = rt_with(wf, &clock, QueueNames::default());
        let s = rt
            .start("pay", "1", json!({}), StartOptions::default())
            .await
            .unwrap();
        rt.drain().await.unwrap();
        clock.advance(Duration::from_millis(1100)); // 1 s ± 10 %
        rt.drain().await.unwrap();
        assert_eq!(step.attempts(), vec![1, 2]);
        clock.advance(Duration::from_millis(2200)); // 2 s ± 10 %
        rt.drain().await.unwrap();
        assert_eq!(step.attempts(), vec![1, 2, 3]);
        let keys: std::collections::BTreeSet<String> = step
            .executions()
            .into_iter()
            .map(|e| e.idempotency_key)
            .collect();
        assert_eq!(keys.len(), 1, "one idempotency key across attempts");
        assert_eq!(
            rt.get(s.id).await.unwrap().unwrap().status,
            InstanceStatus::Completed
        );
    }

    #[tokio::test]
    async fn drains_report_gated_jobs_in_flight_and_filter_by_kind() {
        let clock = VirtualClock::default();
        let gate = Gate::new();
        let step = ScriptedStep::new("slow", ["done"]).gated(&gate);
        let wf = Workflow::builder("slow")
            .unique("s", Scope::Workflow)
            .start(step.clone())
            .on(step.clone(), "done", Done)
            .build()
            .unwrap();
        let queues = QueueNames {
            advance: "advance".into(),
            execute: "execute".into(),
            timer: "timer".into(),
        };
        let rt = rt_with(wf, &clock, queues);
        let s = rt
            .start("slow", "1", json!({}), StartOptions::default())
            .await
            .unwrap();
        let only_advance = DrainOptions {
            kind: Some(crate::jobs::ADVANCE.into()),
            ..DrainOptions::default()
        };
        let first = rt.drain_with(&only_advance).await.unwrap();
        assert_eq!(first.report.succeeded, 1);
        let jobs = rt.jobs_of(s.id).await.unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].kind, crate::jobs::EXECUTE, "the execute job waits");
        let blocked = rt
            .drain_with(&DrainOptions {
                settle: Duration::from_millis(50),
                ..DrainOptions::default()
            })
            .await
            .unwrap();
        assert_eq!(blocked.in_flight.len(), 1, "the gated step is in flight");
        assert_eq!(gate.waiting(), 1);
        gate.release();
        for handle in blocked.in_flight {
            assert_eq!(handle.await.unwrap(), crate::JobOutcome::Succeeded);
        }
        rt.drain().await.unwrap();
        assert_eq!(
            rt.get(s.id).await.unwrap().unwrap().status,
            InstanceStatus::Completed
        );
        // A kind filter on a shared queue is refused rather than mis-draining.
        let shared = rt_with(approval(), &clock, QueueNames::default());
        assert!(matches!(
            shared.drain_with(&only_advance).await,
            Err(RunnerError::InvalidInput(_))
        ));
        let limited = shared
            .drain_with(&DrainOptions {
                max_jobs: Some(0),
                ..DrainOptions::default()
            })
            .await
            .unwrap();
        assert_eq!(limited.report.total(), 0);
    }

    #[tokio::test]
    async fn corrupt_jobs_are_recorded_errors_and_nothing_else_is_affected() {
        let clock = VirtualClock::default();
        let rt = rt_with(approval(), &clock, QueueNames::default());
        let s = rt
            .start("approval", "1", json!({}), StartOptions::default())
            .await
            .unwrap();
        let bad = rt
            .enqueue_raw(hephaestus_engine_core::ports::NewJob::new(
                crate::jobs::EXECUTE,
                "hephaestus",
                json!({"instance_id": 42}),
            ))
            .await
            .unwrap();
        let unknown = rt
            .enqueue_raw(hephaestus_engine_core::ports::NewJob::new(
                "mystery",
                "hephaestus",
                json!({}),
            ))
            .await
            .unwrap();
        let report = rt.drain().await.unwrap();
        assert_eq!(report.discarded, 2, "{report:?}");
        for id in [bad, unknown] {
            let job = rt.backend().job(id).await.unwrap().unwrap();
            assert_eq!(job.state, JobState::Discarded);
            assert!(!job.errors.is_empty(), "the error is recorded");
        }
        assert_eq!(
            rt.get(s.id).await.unwrap().unwrap().status,
            InstanceStatus::Waiting
        );
    }
}
