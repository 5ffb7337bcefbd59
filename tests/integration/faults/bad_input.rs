//! Bad input, in-process on both backends: each case is a clear recorded
//! error (a job's errors, an instance's failure record, a typed
//! `RunnerError`), and an instance running alongside completes.

use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_engine_core::ports::{JobQueue, JobState, NewJob};
use hephaestus_engine_core::prelude::*;
use hephaestus_engine_core::steps::{Done, FnStep, WAIT_FOR_EVENT_ID, WaitForEvent};
use hephaestus_failure_handler::{Reconciler, Repair};
use hephaestus_memory::MemoryBackend;
use hephaestus_queue_pg::PgQueue;
use hephaestus_runner::postgres::PgBackend;
use hephaestus_runner::{Backend, RunnerError, Runtime, RuntimeBuilder, StartOptions, jobs};
use hephaestus_storage_pg::PgStore;
use serde_json::json;
use uuid::Uuid;

use crate::support::db::TestSchema;

/// Generates `<name>::memory` and `<name>::postgres` running `<name>`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn memory() {
                    super::$name(hephaestus_memory::MemoryBackend::new()).await;
                }

                #[tokio::test]
                async fn postgres() {
                    let (backend, schema) = super::postgres_backend().await;
                    super::$name(backend).await;
                    schema.teardown().await;
                }
            }
        )*
    };
}
pub(super) use on_both_backends;

on_both_backends!(
    undecodable_job_args_are_discarded_with_the_decode_error,
    an_unregistered_workflow_leaves_its_instance_alone_with_the_error_recorded,
    a_panicking_step_fails_its_instance_with_the_panic_recorded,
    a_resume_of_a_finished_instance_is_a_typed_error_and_changes_nothing,
);

/// Keeps the memory backend's type in use when only the macro names it.
const _: fn() -> MemoryBackend = MemoryBackend::new;

pub(super) async fn postgres_backend() -> (PgBackend, TestSchema) {
    let schema = TestSchema::new().await;
    hephaestus_storage_pg::migrate(&schema.pool, &schema.prefix)
        .await
        .expect("migrate storage");
    hephaestus_queue_pg::migrate(&schema.pool, &schema.prefix)
        .await
        .expect("migrate the queue");
    let pool = schema.pool_with(8).await;
    let backend = PgBackend::new(
        PgStore::new(pool.clone(), schema.prefix.clone()),
        PgQueue::new(pool, schema.prefix.clone()),
    );
    (backend, schema)
}

/// `Work → Done`: the bystander that must complete whatever else happens.
fn plain(id: &str) -> Workflow {
    let work = FnStep::new("Work", ["done"], |_| StepOutcome::complete("done"));
    Workflow::builder(id)
        .unique("run", Scope::Workflow)
        .start(work.clone())
        .on(work, "done", Done)
        .build()
        .expect("a valid workflow")
}

pub(super) fn runtime<B: Backend>(backend: &B, workflows: Vec<Workflow>) -> Runtime<B> {
    workflows
        .into_iter()
        .fold(
            Runtime::builder(backend.clone())
                .discard_handler(hephaestus_failure_handler::FailureHandler::new()),
            RuntimeBuilder::workflow,
        )
        .build()
        .expect("a runtime")
}

async fn status<B: Backend>(rt: &Runtime<B>, id: Uuid) -> InstanceStatus {
    rt.get(id)
        .await
        .unwrap()
        .expect("the instance exists")
        .status
}

async fn undecodable_job_args_are_discarded_with_the_decode_error<B: Backend>(backend: B) {
    let rt = runtime(&backend, vec![plain("plain")]);
    let bystander = rt
        .start("plain", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    let corrupt = rt
        .enqueue_raw(NewJob::new(
            jobs::EXECUTE,
            &rt.config().queues.execute,
            json!({"instance_id": "not-a-uuid", "step": 7}),
        ))
        .await
        .unwrap();
    let report = rt.drain().await.unwrap();
    assert_eq!(report.discarded, 1, "{report:?}");
    let job = backend
        .job(corrupt)
        .await
        .unwrap()
        .expect("the job is kept");
    assert_eq!(job.state, JobState::Discarded);
    let error = &job.errors.last().expect("its error is recorded").error;
    assert!(!error.is_retryable(), "never retried: {error:?}");
    assert!(
        error.message.contains("undecodable args"),
        "the error says why: {error:?}"
    );
    assert_eq!(status(&rt, bystander.id).await, InstanceStatus::Completed);
}

/// PostgreSQL only: the arguments of a real job rewritten in the jobs
/// table. The job is discarded with the decode error; its instance, left
/// without work, is repaired by the reconciler and completes.
#[tokio::test]
async fn corrupted_args_in_the_jobs_table_are_discarded_and_the_reconciler_recovers_the_instance() {
    let (backend, schema) = postgres_backend().await;
    let rt = runtime(&backend, vec![plain("plain")]);
    let victim = rt
        .start("plain", "victim", json!({}), StartOptions::default())
        .await
        .unwrap();
    let bystander = rt
        .start("plain", "bystander", json!({}), StartOptions::default())
        .await
        .unwrap();
    // The start enqueued the victim's first execution.
    let first = rt.jobs_of(victim.id).await.unwrap();
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].kind, jobs::EXECUTE);
    let first = first[0].id;
    let changed = sqlx::query(&format!(
        "update {} set args = '{{\"instance_id\": 12, \"garbage\": true}}'::jsonb where id = $1",
        schema.table("hephaestus_jobs")
    ))
    .bind(first.0)
    .execute(&schema.pool)
    .await
    .unwrap();
    assert_eq!(changed.rows_affected(), 1);

    rt.drain().await.unwrap();
    let job = backend.job(first).await.unwrap().expect("the job is kept");
    assert_eq!(job.state, JobState::Discarded);
    assert!(
        job.errors
            .last()
            .is_some_and(|e| e.error.message.contains("undecodable args")),
        "{job:?}"
    );
    assert_eq!(status(&rt, bystander.id).await, InstanceStatus::Completed);
    assert_eq!(status(&rt, victim.id).await, InstanceStatus::Running);

    let repairs = Reconciler::new(rt.clone()).run_once().await.unwrap();
    assert!(
        matches!(
            repairs.repaired.as_slice(),
            [Repair::Execute { activation: 1, .. }]
        ),
        "{repairs:?}"
    );
    rt.drain().await.unwrap();
    assert_eq!(status(&rt, victim.id).await, InstanceStatus::Completed);
    schema.teardown().await;
}

async fn an_unregistered_workflow_leaves_its_instance_alone_with_the_error_recorded<B: Backend>(
    backend: B,
) {
    let hold = FnStep::new("Hold", ["done"], |_| StepOutcome::complete("done"));
    let retired = Workflow::builder("retired")
        .unique("run", Scope::Workflow)
        .start(hold.clone())
        .on(hold, "done", Done)
        .build()
        .unwrap();
    let before = runtime(&backend, vec![retired, plain("plain")]);
    let orphan = before
        .start("retired", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    // A new deployment without the workflow.
    let rt = runtime(&backend, vec![plain("plain")]);
    let bystander = rt
        .start("plain", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    let report = rt.drain().await.unwrap();
    assert_eq!(
        report.retried, 1,
        "the orphan's first execution is retried: {report:?}"
    );
    assert_eq!(status(&rt, bystander.id).await, InstanceStatus::Completed);

    let orphan_now = rt.get(orphan.id).await.unwrap().unwrap();
    assert_eq!(orphan_now.status, InstanceStatus::Running, "left untouched");
    assert!(orphan_now.is_step_active("Hold", 1), "{orphan_now:?}");
    assert!(orphan_now.failure.is_none());
    let jobs = rt.jobs_of(orphan.id).await.unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].state, JobState::Retryable);
    let error = &jobs[0].errors.last().expect("the error is recorded").error;
    assert!(error.is_retryable(), "retried until registered again");
    assert!(
        error.message.contains("retired"),
        "names the workflow: {error:?}"
    );

    assert!(matches!(
        rt.resume(orphan.id, "Hold", "done", json!({})).await,
        Err(RunnerError::Registry(_))
    ));
    let pass = Reconciler::new(rt.clone()).run_once().await.unwrap();
    assert_eq!(pass.unregistered, vec![orphan.id]);
    assert!(pass.repaired.is_empty(), "{pass:?}");
}

async fn a_panicking_step_fails_its_instance_with_the_panic_recorded<B: Backend>(backend: B) {
    let explode = FnStep::new("Explode", ["done"], |_| panic!("the fixture exploded"))
        .with_retry_policy(RetryPolicy::no_retries());
    let fragile = Workflow::builder("fragile")
        .unique("run", Scope::Workflow)
        .start(explode.clone())
        .on(explode, "done", Done)
        .build()
        .unwrap();
    let rt = runtime(&backend, vec![fragile, plain("plain")]);
    let doomed = rt
        .start("fragile", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    let bystander = rt
        .start("plain", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    rt.drain().await.unwrap();

    let failed = rt.get(doomed.id).await.unwrap().unwrap();
    assert_eq!(failed.status, InstanceStatus::Failed);
    let failure = failed.failure.expect("a failure record");
    assert_eq!(
        failure.reason,
        hephaestus_engine_core::instance::FailureReason::StepPanicked
    );
    assert_eq!(failure.step.as_ref().map(StepId::as_str), Some("Explode"));
    assert!(
        failure.error.message.contains("panicked") && failure.error.message.contains("exploded"),
        "the panic is recorded: {failure:?}"
    );
    assert_eq!(status(&rt, bystander.id).await, InstanceStatus::Completed);
    assert!(rt.jobs_of(doomed.id).await.unwrap().is_empty());
}

async fn a_resume_of_a_finished_instance_is_a_typed_error_and_changes_nothing<B: Backend>(
    backend: B,
) {
    let start = FnStep::new("Begin", ["done"], |_| StepOutcome::complete("done"));
    let approval = Workflow::builder("approval")
        .unique("run", Scope::Workflow)
        .start(start.clone())
        .on(start, "done", WaitForEvent)
        .on(WaitForEvent, "received", Done)
        .build()
        .unwrap();
    let rt = runtime(&backend, vec![approval, plain("plain")]);
    let s = rt
        .start("approval", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    rt.drain().await.unwrap();
    assert_eq!(status(&rt, s.id).await, InstanceStatus::Waiting);
    rt.resume(s.id, WAIT_FOR_EVENT_ID, "received", json!({"ok": true}))
        .await
        .unwrap();
    rt.drain().await.unwrap();
    let done = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(done.status, InstanceStatus::Completed);

    let bystander = rt
        .start("plain", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    let again = rt
        .resume(s.id, WAIT_FOR_EVENT_ID, "received", json!({"ok": false}))
        .await;
    assert!(
        matches!(again, Err(RunnerError::Finished(InstanceStatus::Completed))),
        "{again:?}"
    );
    assert!(
        rt.jobs_of(s.id).await.unwrap().is_empty(),
        "nothing enqueued"
    );
    rt.drain().await.unwrap();
    assert_eq!(rt.get(s.id).await.unwrap().unwrap(), done, "unchanged");
    assert_eq!(status(&rt, bystander.id).await, InstanceStatus::Completed);
}
