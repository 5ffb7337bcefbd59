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
