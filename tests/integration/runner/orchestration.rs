//! The batched orchestration on PostgreSQL: continuations (a worker runs
//! the steps its result activated, claimed in its settling commit, instead
//! of waiting for the queue), fan-out continuations, and a result whose
//! instance another writer holds going to the inbox without waiting.

use std::time::Duration;

use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_engine_core::ports::{JobQueue, NewJob};
use hephaestus_engine_core::prelude::*;
use hephaestus_engine_core::steps::Done;
use hephaestus_queue_pg::{JobEvent, JobEventKind, QueueRuntime};
use hephaestus_runner::postgres::PgBackend;
use hephaestus_runner::testing::{DrainOptions, Gate, ScriptedStep};
use hephaestus_runner::{RunnerConfig, Runtime, StartOptions, jobs};
use serde_json::json;
use uuid::Uuid;

use super::harness::{FanOut, Harness, until_status};
use crate::support::wait;

/// `attempted_by` of the jobs a runner claims in its settling commit.
const CONTINUATION: &str = "hephaestus-runner (continuation)";

fn config(continuations: bool) -> RunnerConfig {
    // Only NOTIFY (and continuations) deliver work within a test.
    RunnerConfig::default()
        .with_poll_interval(Duration::from_secs(3600))
        .with_concurrency(16)
        .with_continuations(continuations)
}

async fn start_queue_runtime(rt: &Runtime<PgBackend>) -> QueueRuntime {
    rt.queue_runtime()
        .expect("the runtime has a discard handler")
        .start()
        .await
        .expect("the queue runtime starts")
}

async fn wait_completed(rt: &Runtime<PgBackend>, id: Uuid) {
    until_status(&[rt], id, InstanceStatus::Completed).await;
}

/// (kind, step, state, attempt, attempted_by) of an instance's jobs, oldest
/// first.
async fn jobs_table(
    h: &Harness<PgBackend>,
    id: Uuid,
) -> Vec<(String, Option<String>, String, i32, Option<String>)> {
    let queue = h.backend.queue();
    sqlx::query_as(&format!(
        "select kind, args->>'step', state, attempt, attempted_by
         from {}.hephaestus_jobs where group_key = $1 order by id",
        queue.prefix().quoted()
    ))
    .bind(id.to_string())
    .fetch_all(queue.pool())
    .await
    .unwrap()
}

fn chain(len: usize) -> (Workflow, Vec<ScriptedStep>) {
    let steps: Vec<ScriptedStep> = (1..=len)
        .map(|i| ScriptedStep::new(&format!("Step{i}"), ["done"]))
        .collect();
    let mut builder = Workflow::builder("chain")
        .unique("key", Scope::Workflow)
        .start(steps[0].clone());
    for pair in steps.windows(2) {
        builder = builder.on(pair[0].clone(), "done", pair[1].clone());
    }
    let wf = builder
        .on(steps[len - 1].clone(), "done", Done)
        .build()
        .unwrap();
    (wf, steps)
}

/// Runs a four-step chain on a queue runtime; returns its jobs and how many
/// the queue delivered.
async fn run_chain(
    continuations: bool,
) -> (
    Vec<(String, Option<String>, String, i32, Option<String>)>,
    u64,
) {
    let h = Harness::postgres().await;
    let (wf, steps) = chain(4);
    let rt = h.runtime_with(config(continuations), vec![wf], Vec::new());
    let q = start_queue_runtime(&rt).await;
    let s = rt
        .start("chain", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    wait_completed(&rt, s.id).await;
    for step in &steps {
        assert_eq!(step.runs(), 1, "{step:?}");
    }
    let table = jobs_table(&h, s.id).await;
    // The job that ran the chain reports when its task ends (after the
    // instance completed): count once every task has ended.
    q.shutdown(Duration::from_secs(5)).await;
    let delivered = q.counts().settled_by_worker;
    h.teardown().await;
    (table, delivered)
}

#[tokio::test]
async fn a_chain_of_steps_runs_as_continuations_of_the_first_job() {
    let (table, delivered) = run_chain(true).await;
    // The first step's execute job (enqueued by the start) is the only job
    // the queue delivered; each later step's execute job was claimed in the
    // commit that activated it, and `Done` cost no job at all.
    assert_eq!(table.len(), 4, "{table:?}");
    assert_ne!(table[0].4.as_deref(), Some(CONTINUATION), "{table:?}");
    for (kind, step, state, attempt, by) in &table[1..] {
        assert_eq!(kind, jobs::EXECUTE);
        assert_eq!(state, "completed", "{step:?}");
        assert_eq!(*attempt, 1, "{step:?}");
        assert_eq!(by.as_deref(), Some(CONTINUATION), "{step:?}");
    }
    assert_eq!(delivered, 1);
}

#[tokio::test]
async fn without_continuations_every_step_goes_through_the_queue() {
    let (table, delivered) = run_chain(false).await;
    assert_eq!(table.len(), 4, "{table:?}");
    assert!(
        table
            .iter()
            .all(|job| job.4.as_deref() != Some(CONTINUATION)),
        "{table:?}"
    );
    assert_eq!(delivered, 4);
}

#[tokio::test]
async fn a_fan_out_runs_its_branches_in_the_worker_that_activated_them() {
    let h = Harness::postgres().await;
    let FanOut {
        workflow: wf,
        begin,
        branches,
        join,
    } = FanOut::new(4);
    let rt = h.runtime_with(config(true), vec![wf], Vec::new());
    let q = start_queue_runtime(&rt).await;
    let s = rt
        .start("fan", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    wait_completed(&rt, s.id).await;
    assert_eq!(begin.runs(), 1);
    assert_eq!(join.runs(), 1);
    let table = jobs_table(&h, s.id).await;
    for branch in &branches {
        assert_eq!(branch.runs(), 1, "{branch:?}");
        let name = branch.id().to_string();
        let job = table
            .iter()
            .find(|job| job.1.as_deref() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("no job of {name}: {table:?}"));
        // Begin's result activated all four: its worker claimed them all in
        // that commit (one in its slot, three in extra slots).
        assert_eq!(job.4.as_deref(), Some(CONTINUATION), "{table:?}");
        assert_eq!((job.2.as_str(), job.3), ("completed", 1), "{table:?}");
    }
    assert!(
        rt.jobs_of(s.id).await.unwrap().is_empty(),
        "no live job left"
    );
    q.shutdown(Duration::from_secs(5)).await;
    h.teardown().await;
}

#[tokio::test]
async fn a_result_whose_instance_another_writer_holds_waits_in_the_inbox_without_blocking() {
    let h = Harness::postgres().await;
    let (wf, steps) = chain(1);
    let split = config(true).with_queues(super::split_queues().queues);
    let rt = h.runtime_with(split, vec![wf], Vec::new());
    let s = rt
        .start("chain", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    rt.drain_with(&DrainOptions::default().with_kind(jobs::ADVANCE))
        .await
        .unwrap();
    let queue = &rt.config().queues.execute;
    let mut leases = h.backend.fetch(queue, 10, h.clock.now()).await.unwrap();
    assert_eq!(leases.len(), 1);
    let lease = leases.pop().unwrap();

    // Another writer (an advance, a cancel) holds the instance's lock.
    let store = h.backend.store();
    let mut holder = store.pool().begin().await.unwrap();
    assert!(store.lock_using(&mut holder, s.id).await.unwrap().is_some());

    // The step's result is settled at once, not after the holder commits.
    let outcome = tokio::time::timeout(Duration::from_secs(10), rt.perform(lease))
        .await
        .expect("settling waited for the holder of the lock");
    assert_eq!(outcome, hephaestus_runner::JobOutcome::Succeeded);
    assert_eq!(steps[0].runs(), 1);
    let pending = store.pending_using(store.pool(), s.id).await.unwrap();
    assert_eq!(
        pending.len(),
        1,
        "the result waits in the inbox: {pending:?}"
    );
    let live = rt.jobs_of(s.id).await.unwrap();
    assert!(
        live.iter().any(|job| job.kind == jobs::ADVANCE),
        "an advance is enqueued for it: {live:?}"
    );
    assert_eq!(
        rt.get(s.id).await.unwrap().unwrap().status,
        InstanceStatus::Running
    );

    // Once the holder is done, the advance applies it.
    holder.rollback().await.unwrap();
    rt.drain().await.unwrap();
    let done = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(done.status, InstanceStatus::Completed);
    assert!(
        store
            .pending_using(store.pool(), s.id)
            .await
            .unwrap()
            .is_empty()
    );
    h.teardown().await;
}

#[tokio::test]
async fn a_continuation_is_heartbeated_and_not_rescued_while_it_runs() {
    let h = Harness::postgres().await;
    let gate = Gate::new();
    let first = ScriptedStep::new("First", ["done"]);
    let slow = ScriptedStep::new("Slow", ["done"]).gated(&gate);
    let wf = Workflow::builder("slow")
        .unique("key", Scope::Workflow)
        .start(first.clone())
        .on(first.clone(), "done", slow.clone())
        .on(slow.clone(), "done", Done)
        .build()
        .unwrap();
    let rt = h.runtime_with(
        config(true)
            .with_heartbeat_interval(Duration::from_millis(50))
            .with_stale_after(Duration::from_secs(30))
            .with_rescue_interval(Duration::from_millis(50)),
        vec![wf],
        Vec::new(),
    );
    let q = start_queue_runtime(&rt).await;
    let mut job_events = q.subscribe();
    let s = rt
        .start("slow", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    wait::until_holds("Slow to start", || gate.waiting() > 0).await;
    // A canary: a job that a worker took as Slow started, then went silent
    // with. Once time has moved past `stale_after` the rescuer must rescue
    // it; the pass that does looks at Slow too, which has run as long.
    let canary = {
        let mut job = NewJob::new("canary", "canary", json!({}));
        job.max_attempts = 2;
        h.backend.queue().insert(&job).await.unwrap().id()
    };
    let taken = h.backend.fetch("canary", 1, h.clock.now()).await.unwrap();
    assert_eq!(taken.iter().map(|l| l.id).collect::<Vec<_>>(), [canary]);
    // Slow runs as First's continuation: the queue never fetched it. Time
    // passes well beyond `stale_after`, a few seconds at a time; after each
    // step the runtime heartbeats Slow at the new time.
    let (harness, id) = (&h, s.id);
    for _ in 0..12 {
        h.clock.advance(Duration::from_secs(5));
        let now = h.clock.now();
        wait::until(format!("a heartbeat of Slow at {now}"), || async move {
            slow_heartbeat(harness, id)
                .await
                .is_some_and(|at| at >= now)
        })
        .await;
    }
    // The rescuer ran a pass with Slow as old as the canary: it rescued the
    // canary and left Slow alone...
    let is_rescue = |e: &JobEvent| matches!(e.kind, JobEventKind::Rescued);
    let rescued =
        wait::for_event(&mut job_events, "a rescue pass (of the canary)", is_rescue).await;
    assert_eq!(
        rescued.job, canary,
        "the rescuer took a running job: {rescued:?}"
    );
    while let Ok(later) = job_events.try_recv() {
        assert!(
            !is_rescue(&later),
            "the rescuer took a running job: {later:?}"
        );
    }
    // ...and Slow still runs its first attempt, as a continuation.
    let table = jobs_table(&h, s.id).await;
    let slow_job = table
        .iter()
        .find(|job| job.1.as_deref() == Some("Slow"))
        .unwrap();
    assert_eq!(slow_job.4.as_deref(), Some(CONTINUATION), "{table:?}");
    assert_eq!(
        (slow_job.2.as_str(), slow_job.3),
        ("executing", 1),
        "{table:?}"
    );
    gate.release();
    wait_completed(&rt, s.id).await;
    assert_eq!(slow.runs(), 1);
    assert_eq!(slow.attempts(), vec![1]);
    q.shutdown(Duration::from_secs(5)).await;
    h.teardown().await;
}

/// When Slow's job last heartbeated.
async fn slow_heartbeat(h: &Harness<PgBackend>, id: Uuid) -> Option<chrono::DateTime<chrono::Utc>> {
    let queue = h.backend.queue();
    sqlx::query_scalar(&format!(
        "select heartbeat_at from {}.hephaestus_jobs
         where group_key = $1 and args->>'step' = 'Slow'",
        queue.prefix().quoted()
    ))
    .bind(id.to_string())
    .fetch_one(queue.pool())
    .await
    .unwrap()
}

/// `postgres::tuned` connections plan the hot-path statements once
/// (generic plans), where a default session re-plans them at every
/// execution.
#[tokio::test]
async fn tuned_connections_use_generic_plans() {
    use std::str::FromStr;

    let url = crate::support::db::database_url();
    let plain = sqlx::postgres::PgConnectOptions::from_str(url).unwrap();
    let mode = |options: sqlx::postgres::PgConnectOptions| async move {
        let mut conn = sqlx::ConnectOptions::connect(&options).await.unwrap();
        let mode: String = sqlx::query_scalar("show plan_cache_mode")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        mode
    };
    assert_eq!(
        mode(hephaestus_runner::postgres::tuned(plain.clone())).await,
        "force_generic_plan"
    );
    assert_eq!(mode(plain).await, "auto", "the server default is untouched");
}
