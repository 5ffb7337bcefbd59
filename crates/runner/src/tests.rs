//! The runner on the in-memory backend: the spec's behaviours end to end.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_engine_core::ports::{JobQueue, JobState, NewJob};
use hephaestus_engine_core::prelude::*;
use hephaestus_engine_core::steps::{Done, FnStep};
use hephaestus_memory::MemoryBackend;
use serde_json::{Value, json};

use crate::{
    AfterCommit, Backend, DiscardHandler, DiscardedJob, JobSubject, ManualClock, RunnerConfig,
    RunnerError, Runtime, StartOptions,
};

/// The discard handler of the runner's own tests (the failure handler's
/// crate sits above the runner): records what it is handed, fails the
/// job's instance through [`Runtime::fail_instance`], and refuses on
/// demand, after writing, to show that a refusal rolls everything back.
#[derive(Debug, Clone, Default)]
pub(crate) struct Discards {
    seen: Arc<Mutex<Vec<JobSubject>>>,
    refuse: Arc<std::sync::atomic::AtomicBool>,
}

impl Discards {
    fn seen(&self) -> Vec<JobSubject> {
        self.seen.lock().unwrap().clone()
    }

    fn refuse(&self, refuse: bool) {
        self.refuse
            .store(refuse, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl<B: Backend> DiscardHandler<B> for Discards {
    async fn discarded(
        &self,
        runtime: &Runtime<B>,
        tx: &mut B::Tx,
        job: DiscardedJob<'_>,
    ) -> Result<AfterCommit, RunnerError> {
        self.seen.lock().unwrap().push(job.subject.clone());
        let after = match job.subject.instance_id() {
            Some(id) => runtime
                .fail_instance(tx, id, job.error.clone())
                .await?
                .unwrap_or_else(AfterCommit::nothing),
            None => AfterCommit::nothing(),
        };
        if self.refuse.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(RunnerError::InvalidInput("refused by the test".into()));
        }
        Ok(after)
    }
}

/// A virtual clock tests move by hand, stopped at 2026-01-01.
fn test_clock() -> ManualClock {
    ManualClock::new(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap())
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

fn runtime_with(workflows: Vec<Workflow>, clock: &ManualClock) -> Runtime<MemoryBackend> {
    let backend = MemoryBackend::with_clock(clock.clone());
    let mut b = Runtime::builder(backend)
        .clock(clock.clone())
        .discard_handler(Discards::default());
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
async fn parallel_workers_run_a_wide_fan_out_once_per_step() {
    let clock = test_clock();
    let counter = Counter::default();
    let config = RunnerConfig::default()
        .with_concurrency(8)
        .with_poll_interval(Duration::from_millis(5));
    let backend = MemoryBackend::with_clock(clock.clone());
    let rt = Runtime::builder(backend)
        .discard_handler(crate::tests::Discards::default())
        .clock(clock.clone())
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
async fn cancel_really_stops_the_instance() {
    let clock = test_clock();
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
    let clock = test_clock();
    let counter = Counter::default();
    let rt = runtime_with(vec![linear(&counter)], &clock);
    let s = rt
        .start("linear", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
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
    let clock = test_clock();
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
async fn an_unregistered_workflow_leaves_the_instance_untouched() {
    let clock = test_clock();
    let backend = MemoryBackend::with_clock(clock.clone());
    let rt = Runtime::builder(backend.clone())
        .clock(clock.clone())
        .discard_handler(Discards::default())
        .workflow(approval())
        .build()
        .unwrap();
    let s = rt
        .start("approval", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    let other = Runtime::builder(backend.clone())
        .clock(clock.clone())
        .discard_handler(Discards::default())
        .build()
        .unwrap();
    let report = other.drain().await.unwrap();
    assert_eq!(report.retried, 1);
    let untouched = other.get(s.id).await.unwrap().unwrap();
    assert_eq!(untouched.status, InstanceStatus::Running);
    assert!(untouched.is_step_active("Hold", 1), "{untouched:?}");
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
async fn the_typed_facade_addresses_instances_by_business_value() {
    #[derive(serde::Serialize)]
    struct Request {
        amount: u32,
    }
    let clock = test_clock();
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
            let clock = test_clock();
            let counter = Counter::default();
            let builder = Runtime::builder(MemoryBackend::with_clock(clock.clone()))
                .discard_handler(crate::tests::Discards::default())
                .clock(clock.clone())
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
                    StartOptions::default().with_telemetry_metadata(meta),
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
    let clock = test_clock();
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
    use crate::testing::{DrainOptions, Gate, ManualClock, ScriptedStep};

    fn rt_with(wf: Workflow, clock: &ManualClock, queues: QueueNames) -> Runtime<MemoryBackend> {
        Runtime::builder(MemoryBackend::with_clock(clock.clone()))
            .clock(clock.clone())
            .discard_handler(Discards::default())
            .config(RunnerConfig::default().with_queues(queues))
            .workflow(wf)
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn scripted_steps_see_attempts_and_a_stable_idempotency_key() {
        let clock = ManualClock::default();
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
        let clock = ManualClock::default();
        let gate = Gate::new();
        let step = ScriptedStep::new("slow", ["done"]).gated(&gate);
        let wf = Workflow::builder("slow")
            .unique("s", Scope::Workflow)
            .start(step.clone())
            .on(step.clone(), "done", Done)
            .build()
            .unwrap();
        let queues = QueueNames::shared("advance")
            .with_execute("execute")
            .with_timer("timer");
        let rt = rt_with(wf, &clock, queues);
        let s = rt
            .start("slow", "1", json!({}), StartOptions::default())
            .await
            .unwrap();
        let only_advance = DrainOptions::default().with_kind(crate::jobs::ADVANCE);
        // The start enqueued its step's execute job only: an advance-only
        // drain leaves it.
        let first = rt.drain_with(&only_advance).await.unwrap();
        assert_eq!(first.report.succeeded, 0, "{:?}", first.report);
        let jobs = rt.jobs_of(s.id).await.unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].kind, crate::jobs::EXECUTE, "the execute job waits");
        assert_eq!(
            jobs[0].state,
            hephaestus_engine_core::ports::JobState::Available
        );
        let blocked = rt
            .drain_with(&DrainOptions::default().with_settle(Duration::from_millis(50)))
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
            .drain_with(&DrainOptions::default().with_max_jobs(0))
            .await
            .unwrap();
        assert_eq!(limited.report.total(), 0);
    }

    #[tokio::test]
    async fn corrupt_jobs_are_recorded_errors_and_nothing_else_is_affected() {
        let clock = ManualClock::default();
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

#[tokio::test]
async fn telemetry_durations_read_the_runtime_clock() {
    let clock = test_clock();
    let during = clock.clone();
    // The step takes 250 ms of the runtime's (virtual) time.
    let slow = FnStep::new("Slow", ["done"], move |_| {
        during.advance(Duration::from_millis(250));
        StepOutcome::complete("done")
    });
    let wf = Workflow::builder("timed")
        .unique("t", Scope::Workflow)
        .start(slow.clone())
        .on(slow, "done", Done)
        .build()
        .unwrap();
    let rt = Runtime::builder(MemoryBackend::with_clock(clock.clone()))
        .discard_handler(crate::tests::Discards::default())
        .clock(clock.clone())
        .workflow(wf)
        .build()
        .unwrap();
    let mut events = rt.subscribe();
    rt.start("timed", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    rt.drain().await.unwrap();
    let mut step_ms = None;
    let mut workflow_ms = None;
    while let Ok(e) = events.try_recv() {
        if e.name == crate::telemetry::names::STEP_STOP && e.metadata["step"] == "Slow" {
            step_ms = e.measurements.get("duration").and_then(Value::as_u64);
        }
        if e.name == crate::telemetry::names::WORKFLOW_STOP {
            workflow_ms = e.measurements.get("duration").and_then(Value::as_u64);
        }
    }
    assert_eq!(step_ms, Some(250), "exactly the virtual time the step took");
    assert_eq!(workflow_ms, Some(250), "start to stop on the virtual clock");
}

/// An instance that ends must not strand a result recorded meanwhile: its
/// advance job is cancelled with the instance's other jobs, so closing the
/// instance marks what is still in the inbox processed (read after the
/// cancel). Here the result and its advance were committed before the
/// ending unit of work, which did not read the inbox itself (as a batch
/// that saw no unprocessed result when it took the lock).
#[tokio::test]
async fn closing_an_ended_instance_leaves_no_result_in_its_inbox() {
    use hephaestus_engine_core::ports::{
        InstanceStore, ResultPayload, StepResultStore, UnitOfWork,
    };
    use hephaestus_engine_core::step::EventName;

    let clock = test_clock();
    let counter = Counter::default();
    let rt = runtime_with(vec![linear(&counter)], &clock);
    let b = rt.backend().clone();
    let s = rt
        .start("linear", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    let wf = rt
        .workflow_of(&rt.get(s.id).await.unwrap().unwrap())
        .unwrap()
        .clone();
    let mut tx = b.begin().await.unwrap();
    rt.record_and_enqueue_advance(
        &mut tx,
        &wf,
        s.id,
        &hephaestus_engine_core::StepId::new("PassStep").unwrap(),
        1,
        ResultPayload::Completed {
            event: EventName("done".to_owned()),
            output: json!({}),
            metadata: serde_json::Map::new(),
        },
        &serde_json::Map::new(),
    )
    .await
    .unwrap();
    b.commit(tx).await.unwrap();

    let mut tx = b.begin().await.unwrap();
    assert!(b.lock(&mut tx, s.id).await.unwrap().is_some());
    rt.close_ended(&mut tx, s.id, None).await.unwrap();
    b.commit(tx).await.unwrap();

    let mut tx = b.begin().await.unwrap();
    let left = b.pending(&mut tx, s.id).await.unwrap();
    b.commit(tx).await.unwrap();
    assert!(left.is_empty(), "stranded: {left:?}");
    let jobs = rt.jobs_of(s.id).await.unwrap();
    assert!(
        jobs.iter().all(|j| j.state == JobState::Cancelled),
        "{jobs:?}"
    );
}

/// An approval instance, waiting, and an advance of it allowed one attempt,
/// enqueued for `other`, a runtime on the same backend that does not know
/// the workflow (so the advance can only fail) with `handler` attached.
struct Doomed {
    clock: ManualClock,
    rt: Runtime<MemoryBackend>,
    other: Runtime<MemoryBackend>,
    id: uuid::Uuid,
    job: hephaestus_engine_core::ports::JobId,
    events: tokio::sync::broadcast::Receiver<crate::TelemetryEvent>,
}

async fn doomed_advance(handler: Discards) -> Doomed {
    let clock = test_clock();
    let backend = MemoryBackend::with_clock(clock.clone());
    let rt = runtime_on(&backend, &clock, Some(approval()), Discards::default());
    let id = rt
        .start("approval", "1", json!({}), StartOptions::default())
        .await
        .unwrap()
        .id;
    rt.drain().await.unwrap();
    let other = runtime_on(&backend, &clock, None, handler);
    let job = other.enqueue_raw(advance_once(&other, id)).await.unwrap();
    let events = other.subscribe();
    Doomed {
        clock,
        rt,
        other,
        id,
        job,
        events,
    }
}

/// An advance job of `instance_id` allowed one attempt.
fn advance_once(rt: &Runtime<MemoryBackend>, instance_id: uuid::Uuid) -> NewJob {
    let mut job = NewJob::new(
        crate::jobs::ADVANCE,
        rt.config().queues.advance.clone(),
        json!({ "instance_id": instance_id }),
    );
    job.max_attempts = 1;
    job
}

fn exceptions(events: &mut tokio::sync::broadcast::Receiver<crate::TelemetryEvent>) -> usize {
    let mut n = 0;
    while let Ok(e) = events.try_recv() {
        n += usize::from(e.name == crate::telemetry::names::WORKFLOW_EXCEPTION);
    }
    n
}

#[tokio::test]
async fn a_discarded_job_goes_to_the_discard_handler_in_the_discarding_commit() {
    let handler = Discards::default();
    let Doomed {
        rt,
        other,
        id,
        job,
        mut events,
        ..
    } = doomed_advance(handler.clone()).await;

    let report = other.drain().await.unwrap();

    assert_eq!(report.discarded, 1, "{report:?}");
    assert_eq!(
        handler.seen(),
        vec![JobSubject::Advance { instance_id: id }]
    );
    assert_eq!(
        other.backend().job(job).await.unwrap().unwrap().state,
        JobState::Discarded
    );
    let failed = rt.get(id).await.unwrap().unwrap();
    assert_eq!(failed.status, InstanceStatus::Failed);
    assert_eq!(
        failed.failure.unwrap().reason,
        hephaestus_engine_core::instance::FailureReason::UnknownWorkflow
    );
    assert_eq!(
        exceptions(&mut events),
        1,
        "announced once, after the commit"
    );
}

#[tokio::test]
async fn a_refusing_discard_handler_rolls_the_discard_back_and_announces_nothing() {
    let handler = Discards::default();
    handler.refuse(true);
    let Doomed {
        clock,
        rt,
        other,
        id,
        job,
        mut events,
    } = doomed_advance(handler.clone()).await;

    let report = other.drain().await.unwrap();

    // The handler failed the instance, then refused: none of it landed.
    assert_eq!(report.retried, 1, "{report:?}");
    let info = other.backend().job(job).await.unwrap().unwrap();
    assert_eq!(info.state, JobState::Retryable);
    let last = &info.errors.last().unwrap().error;
    assert!(
        last.message.contains("the discard handler failed"),
        "{last:?}"
    );
    assert_eq!(
        rt.get(id).await.unwrap().unwrap().status,
        InstanceStatus::Waiting
    );
    assert_eq!(
        exceptions(&mut events),
        0,
        "nothing announced of a rollback"
    );

    // Asked again after the backoff, it acts.
    handler.refuse(false);
    clock.advance(Duration::from_secs(120));
    let report = other.drain().await.unwrap();
    assert_eq!(report.discarded, 1, "{report:?}");
    assert_eq!(handler.seen().len(), 2);
    assert_eq!(
        rt.get(id).await.unwrap().unwrap().status,
        InstanceStatus::Failed
    );
    assert_eq!(exceptions(&mut events), 1);
}

#[tokio::test]
async fn workers_refuse_to_start_without_a_discard_handler() {
    let clock = test_clock();
    let rt = Runtime::builder(MemoryBackend::with_clock(clock.clone()))
        .clock(clock.clone())
        .workflow(approval())
        .build()
        .unwrap();
    // Starting instances needs no handler; running their jobs does.
    let s = rt
        .start("approval", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    assert!(matches!(
        rt.drain().await,
        Err(RunnerError::NoDiscardHandler)
    ));
    assert!(matches!(
        rt.run(std::future::ready(())).await,
        Err(RunnerError::NoDiscardHandler)
    ));
    assert!(matches!(
        rt.drain_with(&crate::testing::DrainOptions::default())
            .await,
        Err(RunnerError::NoDiscardHandler)
    ));
    // Nothing ran: the start's job is still there.
    let live = rt
        .backend()
        .live_jobs(&crate::jobs::of_instance(s.id))
        .await
        .unwrap();
    assert_eq!(live.len(), 1, "{live:?}");
}

fn runtime_on(
    backend: &MemoryBackend,
    clock: &ManualClock,
    workflow: Option<Workflow>,
    handler: Discards,
) -> Runtime<MemoryBackend> {
    let mut builder = Runtime::builder(backend.clone())
        .clock(clock.clone())
        .discard_handler(handler);
    if let Some(wf) = workflow {
        builder = builder.workflow(wf);
    }
    builder.build().unwrap()
}

#[test]
fn runner_jobs_retry_exponentially_from_one_second_to_a_minute() {
    use hephaestus_engine_core::retry::Backoff;
    let policy = crate::failures::job_retry_policy(None);
    assert_eq!(
        (
            policy.max_attempts,
            policy.backoff,
            policy.base_ms,
            policy.max_backoff_ms,
            policy.jitter_per_mille
        ),
        (20, Backoff::Exponential, 1_000, 60_000, 100)
    );
    assert_eq!(crate::failures::job_retry_policy(Some(3)).max_attempts, 3);
    assert_eq!(
        crate::failures::job_retry_policy(Some(0)).max_attempts,
        1,
        "at least one attempt"
    );
}
