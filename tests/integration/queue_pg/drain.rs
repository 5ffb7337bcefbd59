//! The drain helper and everything an attempt can end in: success, retry
//! with the configured backoff (injected clock), discard with the discard
//! hook (atomic: a failing hook rolls the discard back), snooze, cancel,
//! and bad input (unknown kind, undecodable args, panics).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{TimeDelta, TimeZone, Utc};
use hephaestus_engine_core::ports::{Enqueued, JobId, JobState, NewJob};
use hephaestus_engine_core::retry::{Backoff, RetryPolicy};
use hephaestus_engine_core::step::ErrorKind;
use hephaestus_queue_pg::{
    BoxError, DiscardHook, DiscardedJob, DrainOptions, JobContext, JobError, JobFilter,
    ManualClock, PgQueue, Worker, Workers, drain,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{Postgres, Transaction};

use super::QueueDb;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

/// Adds and counts; fails while `fail_first` attempts remain.
#[derive(Clone, Default)]
struct Adder {
    runs: Arc<AtomicUsize>,
    fail_first: u32,
}

#[async_trait::async_trait]
impl Worker for Adder {
    const KIND: &'static str = "add";
    type Args = Add;

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::new(
            5,
            Backoff::Exponential,
            Duration::from_secs(10),
            Duration::from_secs(300),
        )
        .unwrap()
    }

    async fn perform(&self, job: &JobContext, args: Add) -> Result<(), JobError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        assert_eq!(args.a + args.b, 3);
        if job.attempt() <= self.fail_first {
            return Err(JobError::retryable(format!("flaky {}", job.attempt())));
        }
        Ok(())
    }
}

fn add_job() -> NewJob {
    Adder::new_job(&Add { a: 1, b: 2 }).unwrap()
}

fn t0() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 1, 12, 0, 0).unwrap()
}

#[tokio::test]
async fn drain_runs_due_jobs_and_reports_counts() {
    let db = QueueDb::with_connections(3).await;
    let adder = Adder::default();
    let workers = Workers::new().register(adder.clone());
    let jobs: Vec<NewJob> = (0..5).map(|_| add_job()).collect();
    db.queue.insert_many(&jobs).await.unwrap();
    let mut other = add_job();
    other.queue = "other".into();
    db.queue.insert(&other).await.unwrap();

    let report = drain(&db.queue, &workers, &DrainOptions::queue("default"))
        .await
        .unwrap();
    assert_eq!(
        (report.succeeded, report.total()),
        (5, 5),
        "five attempts, all succeeded: {report:?}"
    );
    let limited = drain(&db.queue, &workers, &DrainOptions::all().with_max_jobs(0))
        .await
        .unwrap();
    assert_eq!(limited.total(), 0, "max_jobs 0 runs nothing");
    let rest = drain(&db.queue, &workers, &DrainOptions::all())
        .await
        .unwrap();
    assert_eq!(rest.succeeded, 1, "the other queue's job");
    assert_eq!(adder.runs.load(Ordering::SeqCst), 6);
    db.teardown().await;
}

#[tokio::test]
async fn retries_follow_the_configured_backoff_on_the_injected_clock() {
    let db = QueueDb::with_connections(3).await;
    let clock = ManualClock::new(t0());
    let queue = db.queue.with_clock(clock.clone());
    let adder = Adder {
        fail_first: 2,
        ..Adder::default()
    };
    let workers = Workers::new().register(adder.clone());
    let id = queue.insert(&add_job()).await.unwrap().id();

    let report = drain(&queue, &workers, &DrainOptions::all()).await.unwrap();
    assert_eq!((report.failed, report.succeeded), (1, 0));
    let job = queue.job(id).await.unwrap().unwrap();
    // Exponential, base 10 s, no jitter: 10 s after the first attempt.
    assert_eq!(job.state, JobState::Retryable);
    assert_eq!(job.scheduled_at, t0() + TimeDelta::seconds(10));
    assert_eq!(job.errors.len(), 1);
    assert_eq!(job.errors[0].attempt, 1);
    assert_eq!(job.errors[0].at, t0());
    assert_eq!(job.errors[0].error.message, "flaky 1");

    clock.advance(Duration::from_secs(9));
    let early = drain(&queue, &workers, &DrainOptions::all()).await.unwrap();
    assert_eq!(early.total(), 0, "not due one second early");

    clock.advance(Duration::from_secs(1));
    let second = drain(&queue, &workers, &DrainOptions::all()).await.unwrap();
    assert_eq!(second.failed, 1);
    let job = queue.job(id).await.unwrap().unwrap();
    // 20 s after the second attempt.
    assert_eq!(job.scheduled_at, t0() + TimeDelta::seconds(30));
    assert_eq!(job.attempt, 2);

    clock.advance(Duration::from_secs(20));
    let third = drain(&queue, &workers, &DrainOptions::all()).await.unwrap();
    assert_eq!(third.succeeded, 1);
    let job = queue.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(job.attempt, 3);
    assert_eq!(job.completed_at, Some(t0() + TimeDelta::seconds(30)));
    assert_eq!(job.errors.len(), 2);
    assert_eq!(adder.runs.load(Ordering::SeqCst), 3);
    db.teardown().await;
}

#[tokio::test]
async fn jitter_spreads_retries_within_its_bounds() {
    struct Jittery;
    #[async_trait::async_trait]
    impl Worker for Jittery {
        const KIND: &'static str = "jittery";
        type Args = serde_json::Value;
        fn retry_policy(&self) -> RetryPolicy {
            RetryPolicy::new(
                5,
                Backoff::Constant,
                Duration::from_secs(100),
                Duration::from_secs(1000),
            )
            .unwrap()
            .with_jitter_per_mille(200)
            .unwrap()
        }
        async fn perform(&self, _: &JobContext, _: serde_json::Value) -> Result<(), JobError> {
            Err(JobError::retryable("again"))
        }
    }
    let db = QueueDb::with_connections(3).await;
    let clock = ManualClock::new(t0());
    let queue = db.queue.with_clock(clock);
    let workers = Workers::new().register(Jittery);
    let jobs: Vec<NewJob> = (0..20)
        .map(|_| NewJob::new("jittery", "default", json!({})))
        .collect();
    let ids: Vec<JobId> = queue
        .insert_many(&jobs)
        .await
        .unwrap()
        .into_iter()
        .map(Enqueued::id)
        .collect();
    assert_eq!(
        drain(&queue, &workers, &DrainOptions::all())
            .await
            .unwrap()
            .failed,
        20
    );
    let mut delays = Vec::new();
    for id in ids {
        let job = queue.job(id).await.unwrap().unwrap();
        delays.push((job.scheduled_at - t0()).num_milliseconds());
    }
    assert!(
        delays.iter().all(|d| (80_000..=120_000).contains(d)),
        "within ±20 %: {delays:?}"
    );
    delays.dedup();
    assert!(delays.len() > 1, "jitter spreads the retries: {delays:?}");
    db.teardown().await;
}

/// Records discards by enqueueing a follow-up job in the discarding
/// transaction, and counts them again once it commits; fails while
/// `failures_left` > 0.
#[derive(Clone, Default)]
struct RecordDiscard {
    failures_left: Arc<AtomicU32>,
    calls: Arc<AtomicUsize>,
    committed: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl DiscardHook for RecordDiscard {
    async fn on_discard(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        job: DiscardedJob<'_>,
    ) -> Result<(), BoxError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        // The hook's write happens first, so a later failure must undo it.
        let follow_up = NewJob::new(
            "on_discard",
            "failures",
            json!({"job": job.lease.id.0, "error": job.error.message}),
        );
        job.queue.insert_using(tx, &follow_up).await?;
        let committed = Arc::clone(&self.committed);
        job.after_commit(move || {
            committed.fetch_add(1, Ordering::SeqCst);
        });
        if self
            .failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err("the failure store is down".into());
        }
        Ok(())
    }
}

struct Fails;

#[async_trait::async_trait]
impl Worker for Fails {
    const KIND: &'static str = "fails";
    type Args = serde_json::Value;
    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::new(
            3,
            Backoff::Constant,
            Duration::from_secs(5),
            Duration::from_secs(5),
        )
        .unwrap()
    }
    async fn perform(&self, _: &JobContext, args: serde_json::Value) -> Result<(), JobError> {
        if args["fatal"] == json!(true) {
            Err(JobError::fatal("bad request"))
        } else {
            Err(JobError::retryable("still broken"))
        }
    }
}

async fn follow_ups(queue: &PgQueue) -> usize {
    queue
        .jobs(&JobFilter::default().with_kind("on_discard"))
        .await
        .unwrap()
        .len()
}

#[tokio::test]
async fn exhausted_jobs_are_discarded_with_the_hook_in_the_same_transaction() {
    let db = QueueDb::with_connections(3).await;
    let clock = ManualClock::new(t0());
    let queue = db.queue.with_clock(clock.clone());
    let hook = RecordDiscard::default();
    let workers = Workers::new().register(Fails).discard_hook(hook.clone());
    let mut job = NewJob::new("fails", "default", json!({}));
    job.max_attempts = 2;
    let id = queue.insert(&job).await.unwrap().id();

    assert_eq!(
        drain(&queue, &workers, &DrainOptions::queue("default"))
            .await
            .unwrap()
            .failed,
        1
    );
    clock.advance(Duration::from_secs(5));
    let report = drain(&queue, &workers, &DrainOptions::queue("default"))
        .await
        .unwrap();
    assert_eq!(report.discarded, 1);
    let discarded = queue.job(id).await.unwrap().unwrap();
    assert_eq!(discarded.state, JobState::Discarded);
    assert_eq!(discarded.discarded_at, Some(t0() + TimeDelta::seconds(5)));
    assert_eq!(
        discarded
            .errors
            .iter()
            .map(|e| (e.attempt, e.error.message.as_str()))
            .collect::<Vec<_>>(),
        [(1, "still broken"), (2, "still broken")]
    );
    assert_eq!(hook.calls.load(Ordering::SeqCst), 1);
    assert_eq!(follow_ups(&queue).await, 1, "the hook's job committed");
    assert_eq!(
        hook.committed.load(Ordering::SeqCst),
        1,
        "what the hook asked for after the commit ran"
    );

    // A fatal error discards at once, whatever attempts remain.
    let fatal = queue
        .insert(&NewJob::new("fails", "default", json!({"fatal": true})))
        .await
        .unwrap()
        .id();
    let report = drain(&queue, &workers, &DrainOptions::queue("default"))
        .await
        .unwrap();
    assert_eq!(report.discarded, 1);
    let job = queue.job(fatal).await.unwrap().unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Discarded, 1));
    assert_eq!(job.errors[0].error.kind, ErrorKind::Fatal);
    db.teardown().await;
}

#[tokio::test]
async fn a_failing_discard_hook_rolls_the_discard_back() {
    let db = QueueDb::with_connections(3).await;
    let clock = ManualClock::new(t0());
    let queue = db.queue.with_clock(clock.clone());
    let hook = RecordDiscard {
        failures_left: Arc::new(AtomicU32::new(1)),
        ..RecordDiscard::default()
    };
    let workers = Workers::new().register(Fails).discard_hook(hook.clone());
    let id = queue
        .insert(&NewJob::new("fails", "default", json!({"fatal": true})))
        .await
        .unwrap()
        .id();

    let report = drain(&queue, &workers, &DrainOptions::queue("default"))
        .await
        .unwrap();
    assert_eq!((report.failed, report.discarded), (1, 0));
    let job = queue.job(id).await.unwrap().unwrap();
    assert_eq!(
        job.state,
        JobState::Retryable,
        "the discard was rolled back"
    );
    assert_eq!(job.discarded_at, None);
    assert_eq!(
        follow_ups(&queue).await,
        0,
        "the hook's write was rolled back"
    );
    assert_eq!(
        hook.committed.load(Ordering::SeqCst),
        0,
        "nothing of a rolled-back discard runs after it"
    );
    assert_eq!(job.errors.len(), 1);
    let recorded = &job.errors[0].error;
    assert!(
        recorded
            .message
            .contains("discard hook failed: the failure store is down"),
        "{recorded:?}"
    );
    assert_eq!(
        recorded.details.as_ref().unwrap()["error"]["message"],
        "bad request"
    );
    assert_eq!(
        job.scheduled_at,
        t0() + TimeDelta::seconds(5),
        "after the backoff"
    );

    // Next time the hook works: discard and hook commit together.
    clock.advance(Duration::from_secs(5));
    let report = drain(&queue, &workers, &DrainOptions::queue("default"))
        .await
        .unwrap();
    assert_eq!(report.discarded, 1);
    assert_eq!(
        queue.job(id).await.unwrap().unwrap().state,
        JobState::Discarded
    );
    assert_eq!(follow_ups(&queue).await, 1);
    assert_eq!(hook.calls.load(Ordering::SeqCst), 2);
    assert_eq!(hook.committed.load(Ordering::SeqCst), 1);
    db.teardown().await;
}

struct Moody;

#[async_trait::async_trait]
impl Worker for Moody {
    const KIND: &'static str = "moody";
    type Args = String;
    async fn perform(&self, _: &JobContext, mood: String) -> Result<(), JobError> {
        match mood.as_str() {
            "snooze" => Err(JobError::snooze(Duration::from_secs(60))),
            "cancel" => Err(JobError::cancel("not worth it")),
            "panic" => panic!("the worker panicked on purpose"),
            _ => Ok(()),
        }
    }
}

#[tokio::test]
async fn snooze_and_cancel_outcomes() {
    let db = QueueDb::with_connections(3).await;
    let clock = ManualClock::new(t0());
    let queue = db.queue.with_clock(clock.clone());
    let workers = Workers::new().register(Moody);
    let napper = queue
        .insert(&Moody::new_job(&"snooze".to_owned()).unwrap())
        .await
        .unwrap()
        .id();
    let quitter = queue
        .insert(&Moody::new_job(&"cancel".to_owned()).unwrap())
        .await
        .unwrap()
        .id();
    let report = drain(&queue, &workers, &DrainOptions::all()).await.unwrap();
    assert_eq!((report.snoozed, report.cancelled), (1, 1));

    let snoozed = queue.job(napper).await.unwrap().unwrap();
    assert_eq!(snoozed.state, JobState::Scheduled);
    assert_eq!(snoozed.scheduled_at, t0() + TimeDelta::seconds(60));
    assert_eq!(
        (snoozed.attempt, snoozed.max_attempts),
        (1, 21),
        "a snooze does not use up an attempt"
    );
    assert!(snoozed.errors.is_empty());

    let cancelled = queue.job(quitter).await.unwrap().unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(cancelled.cancelled_at, Some(t0()));
    assert!(cancelled.errors[0].error.message.contains("not worth it"));

    let report = drain(
        &queue,
        &workers,
        &DrainOptions::all().with_scheduled(true).with_max_jobs(1),
    )
    .await
    .unwrap();
    assert_eq!(report.snoozed, 1, "with_scheduled runs the snoozed job now");
    db.teardown().await;
}

#[tokio::test]
async fn bad_input_is_recorded_and_follows_the_retry_policy() {
    let db = QueueDb::with_connections(3).await;
    let clock = ManualClock::new(t0());
    let queue = db.queue.with_clock(clock);
    let workers = Workers::new()
        .register(Moody)
        .register(Adder::default())
        .fallback_retry_policy(
            RetryPolicy::new(
                5,
                Backoff::Constant,
                Duration::from_secs(7),
                Duration::from_secs(7),
            )
            .unwrap(),
        );
    let unknown = queue
        .insert(&NewJob::new("no_such_worker", "default", json!({})))
        .await
        .unwrap()
        .id();
    let undecodable = queue
        .insert(&NewJob::new("add", "default", json!({"a": "one"})))
        .await
        .unwrap()
        .id();
    let panics = queue
        .insert(&Moody::new_job(&"panic".to_owned()).unwrap())
        .await
        .unwrap()
        .id();
    let fine = queue.insert(&add_job()).await.unwrap().id();

    let report = drain(&queue, &workers, &DrainOptions::all()).await.unwrap();
    assert_eq!(
        (report.failed, report.succeeded),
        (3, 1),
        "the queue keeps going"
    );
    for (id, expected) in [
        (
            unknown,
            "no worker is registered for job kind \"no_such_worker\"",
        ),
        (undecodable, "cannot decode the args of job"),
        (panics, "panicked: the worker panicked on purpose"),
    ] {
        let job = queue.job(id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Retryable, "job {id}");
        assert!(
            job.errors[0].error.message.contains(expected),
            "job {id}: {:?}",
            job.errors[0].error
        );
        assert!(job.errors[0].error.is_retryable());
    }
    let unknown = queue.job(unknown).await.unwrap().unwrap();
    assert_eq!(
        unknown.scheduled_at,
        t0() + TimeDelta::seconds(7),
        "unknown kinds use the fallback policy"
    );
    assert_eq!(
        queue.job(fine).await.unwrap().unwrap().state,
        JobState::Completed
    );
    db.teardown().await;
}
