//! The worker lock in one process: a second lock on the file is refused
//! until the first is released, and taking it marks the jobs a dead worker
//! left executing for rescue at once.

use chrono::TimeDelta;
use hephaestus_engine_core::ports::{JobQueue, NewJob, UnitOfWork};
use hephaestus_sqlite::Error;
use serde_json::json;

use crate::support::sqlite::{fresh_alone, remove};

#[tokio::test]
async fn one_worker_lock_at_a_time_and_a_dead_workers_jobs_are_rescued_at_once() {
    let backend = fresh_alone().await;
    let first = backend.lock_worker().await.expect("the first worker");
    let refused = backend.lock_worker().await.expect_err("a second worker");
    assert!(
        matches!(refused, Error::WorkerRunning { .. }),
        "{refused:?}"
    );
    assert!(
        refused.to_string().contains("one worker per SQLite file"),
        "{refused}"
    );

    // The first worker claims a job, then dies (its lock goes with it).
    let mut tx = backend.begin().await.unwrap();
    backend
        .enqueue(&mut tx, &[NewJob::new("work", "q", json!({}))])
        .await
        .unwrap();
    backend.commit(tx).await.unwrap();
    let now = backend.now();
    let [lease] = backend
        .fetch("q", 1, now)
        .await
        .unwrap()
        .try_into()
        .unwrap();
    // Freshly claimed: not stale by heartbeat age.
    let cut_off = now - TimeDelta::seconds(30);
    assert!(backend.stale(cut_off, 10).await.unwrap().is_empty());
    first.release().await;

    // The next worker's lock marks it for rescue without waiting 30 s.
    let second = backend.lock_worker().await.expect("the lock is free again");
    let stale = backend.stale(cut_off, 10).await.unwrap();
    assert_eq!(
        stale.iter().map(|l| (l.id, l.attempt)).collect::<Vec<_>>(),
        vec![(lease.id, 1)]
    );
    second.release().await;
    remove(backend).await;
}

/// A worker loop that would otherwise sleep for an hour (poll, heartbeat
/// and rescue intervals all an hour) runs an instance another runtime of
/// the process starts on the same file at once: the backend's enqueue
/// wake-up (`Backend::enqueued_wake`) reaches the loop.
#[tokio::test]
async fn a_worker_loop_wakes_for_an_instance_another_runtime_starts() {
    use std::time::Duration;

    use hephaestus_engine_core::prelude::*;
    use hephaestus_engine_core::steps::{Done, FnStep};
    use hephaestus_runner::{RunnerConfig, Runtime, StartOptions};

    fn one_step() -> Workflow {
        let only = FnStep::new("Only", ["done"], |_| StepOutcome::complete("done"));
        Workflow::builder("one_step")
            .unique("k", Scope::Workflow)
            .start(only.clone())
            .on(only, "done", Done)
            .build()
            .unwrap()
    }
    let hour = Duration::from_secs(3600);
    let backend = fresh_alone().await;
    let worker = Runtime::builder(backend.clone())
        .discard_handler(hephaestus_failure_handler::FailureHandler::new())
        .config(
            RunnerConfig::default()
                .with_poll_interval(hour)
                .with_heartbeat_interval(hour)
                .with_stale_after(3 * hour)
                .with_rescue_interval(hour),
        )
        .workflow(one_step())
        .build()
        .unwrap();
    let starter = Runtime::builder(backend.clone())
        .workflow(one_step())
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let loop_task = tokio::spawn({
        let worker = worker.clone();
        async move {
            worker
                .run(async {
                    let _ = stopped.await;
                })
                .await
        }
    });
    // The first instance goes through the worker's own runtime (its own
    // commits wake it); once it completes, the loop is idle in its wait.
    let first = worker
        .start(
            "one_step",
            "1",
            serde_json::json!({}),
            StartOptions::default(),
        )
        .await
        .unwrap();
    until_completed(&worker, first.id).await;

    let second = starter
        .start(
            "one_step",
            "2",
            serde_json::json!({}),
            StartOptions::default(),
        )
        .await
        .unwrap();
    until_completed(&worker, second.id).await;

    let _ = stop.send(());
    loop_task.await.unwrap().unwrap();
    remove(backend).await;
}

async fn until_completed<B: hephaestus_runner::Backend>(
    rt: &hephaestus_runner::Runtime<B>,
    id: uuid::Uuid,
) {
    crate::support::wait::until(format!("instance {id} completed"), || async {
        rt.get(id).await.unwrap().map(|i| i.status)
            == Some(hephaestus_engine_core::instance::InstanceStatus::Completed)
    })
    .await;
}
