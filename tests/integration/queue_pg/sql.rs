//! The SQL layer: every state transition with its timestamp, batch and
//! transactional inserts, unique-insert races, fetch races, fencing of a
//! stale worker after a rescue, cancel by predicate, prune and depth.

use std::collections::BTreeSet;
use std::sync::Arc;

use std::time::Duration;

use chrono::{TimeDelta, TimeZone, Utc};
use hephaestus_engine_core::ports::{Enqueued, JobId, JobMatch, JobState, NewJob, UniqueJob};
use hephaestus_engine_core::step::StepError;
use hephaestus_queue_pg::{CancelFilter, JobFilter, ManualClock};
use serde_json::json;
use sqlx::postgres::PgListener;
use tokio::sync::Barrier;

use super::{QueueDb, SAFETY_NET};

fn t0() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 1, 12, 0, 0).unwrap()
}

fn job(n: i64) -> NewJob {
    NewJob::new("work", "q", json!({"n": n}))
}

#[tokio::test]
async fn every_state_transition_records_its_time() {
    let db = QueueDb::with_connections(3).await;
    let clock = ManualClock::new(t0());
    let q = db.queue.with_clock(clock.clone());
    let mut later = job(2);
    later.scheduled_at = Some(t0() + TimeDelta::seconds(60));
    let ids: Vec<JobId> = q
        .insert_many(&[job(1), later, job(3), job(4)])
        .await
        .unwrap()
        .into_iter()
        .map(Enqueued::id)
        .collect();
    let [now_id, later_id, cancel_id, snooze_id] = ids[..] else {
        unreachable!()
    };
    let fresh = q.job(now_id).await.unwrap().unwrap();
    assert_eq!(
        (
            fresh.state,
            fresh.inserted_at,
            fresh.scheduled_at,
            fresh.attempt
        ),
        (JobState::Available, t0(), t0(), 0)
    );
    let scheduled = q.job(later_id).await.unwrap().unwrap();
    assert_eq!(scheduled.state, JobState::Scheduled);

    // available -> executing -> retryable -> executing -> completed
    clock.advance(Duration::from_secs(1));
    let leases = q.fetch("q", 3, q.now(), "w1").await.unwrap();
    assert_eq!(
        leases.iter().map(|l| l.id).collect::<Vec<_>>(),
        [now_id, cancel_id, snooze_id],
        "the scheduled job is not due"
    );
    let running = q.job(now_id).await.unwrap().unwrap();
    let t1 = t0() + TimeDelta::seconds(1);
    assert_eq!(
        (
            running.state,
            running.attempt,
            running.attempted_at,
            running.heartbeat_at,
            running.attempted_by.as_deref()
        ),
        (JobState::Executing, 1, Some(t1), Some(t1), Some("w1"))
    );
    let mut conn = db.pool.acquire().await.unwrap();
    let retry_at = t1 + TimeDelta::seconds(30);
    assert!(
        q.retry_using(
            &mut conn,
            &leases[0],
            &StepError::retryable("e1"),
            retry_at,
            t1
        )
        .await
        .unwrap()
    );
    let retried = q.job(now_id).await.unwrap().unwrap();
    assert_eq!(
        (retried.state, retried.scheduled_at, retried.errors.len()),
        (JobState::Retryable, retry_at, 1)
    );
    clock.set(retry_at);
    let second = q.fetch("q", 10, q.now(), "w2").await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!((second[0].id, second[0].attempt), (now_id, 2));
    assert!(q.complete_using(&mut conn, &second[0]).await.unwrap());
    let done = q.job(now_id).await.unwrap().unwrap();
    assert_eq!(
        (done.state, done.completed_at, done.attempted_by.as_deref()),
        (JobState::Completed, Some(retry_at), Some("w2"))
    );

    // executing -> cancelled (by id, while running)
    assert!(q.cancel(cancel_id).await.unwrap());
    let cancelled = q.job(cancel_id).await.unwrap().unwrap();
    assert_eq!(
        (cancelled.state, cancelled.cancelled_at),
        (JobState::Cancelled, Some(retry_at))
    );

    // executing -> scheduled (snooze) -> executing -> discarded
    let until = retry_at + TimeDelta::minutes(1);
    assert!(q.snooze_using(&mut conn, &leases[2], until).await.unwrap());
    let snoozed = q.job(snooze_id).await.unwrap().unwrap();
    assert_eq!(
        (snoozed.state, snoozed.scheduled_at, snoozed.max_attempts),
        (JobState::Scheduled, until, 21)
    );
    clock.set(until);
    // The scheduled job is due too by now; both come back, in due order.
    let third = q.fetch("q", 10, q.now(), "w3").await.unwrap();
    assert_eq!(
        third.iter().map(|l| l.id).collect::<Vec<_>>(),
        [later_id, snooze_id]
    );
    assert!(
        q.discard_using(&mut conn, &third[1], &StepError::fatal("no"), until)
            .await
            .unwrap()
    );
    let discarded = q.job(snooze_id).await.unwrap().unwrap();
    assert_eq!(
        (discarded.state, discarded.discarded_at, discarded.attempt),
        (JobState::Discarded, Some(until), 2)
    );
    // scheduled (now executing) -> cancelled -> pruned after the retention.
    assert!(q.cancel(later_id).await.unwrap());
    assert!(!q.cancel(later_id).await.unwrap(), "finished jobs stay");
    assert_eq!(q.prune(until).await.unwrap(), 2, "finished before `until`");
    assert_eq!(q.prune(until + TimeDelta::seconds(1)).await.unwrap(), 2);
    assert!(q.jobs(&JobFilter::default()).await.unwrap().is_empty());
    drop(conn);
    db.teardown().await;
}

#[tokio::test]
async fn batches_insert_in_one_statement_and_notify_at_commit() {
    let db = QueueDb::with_connections(4).await;
    let mut listener = PgListener::connect_with(&db.pool).await.unwrap();
    listener.listen(db.queue.channel()).await.unwrap();

    let jobs: Vec<NewJob> = (0..5_000).map(job).collect();
    let mut tx = db.pool.begin().await.unwrap();
    let out = db.queue.insert_many_using(&mut tx, &jobs).await.unwrap();
    assert_eq!(out.len(), 5_000);
    assert!(
        out.windows(2).all(|w| w[0].id() < w[1].id()),
        "ids increase"
    );
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), listener.recv())
            .await
            .is_err(),
        "no wake-up before commit"
    );
    tx.commit().await.unwrap();
    let note = tokio::time::timeout(SAFETY_NET, listener.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(note.payload(), "i:q", "one wake-up per queue");

    // A rolled-back insert leaves nothing and wakes nobody.
    let mut tx = db.pool.begin().await.unwrap();
    let gone = db.queue.insert_using(&mut tx, &job(9)).await.unwrap().id();
    drop(tx);
    assert!(db.queue.job(gone).await.unwrap().is_none());
    let depth: Vec<(String, JobState, u64)> = db
        .queue
        .depth()
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.queue, d.state, d.count))
        .collect();
    assert_eq!(depth, [("q".to_owned(), JobState::Available, 5_000)]);
    // The listener holds a pooled connection: closing the pool waits for it.
    drop(listener);
    db.teardown().await;
}

#[tokio::test]
async fn concurrent_unique_inserts_create_exactly_one_job() {
    const INSERTERS: usize = 16;
    let db = QueueDb::with_connections(20).await;
    let barrier = Arc::new(Barrier::new(INSERTERS));
    let unique = |key: &str| {
        let mut job = job(0);
        job.unique = Some(UniqueJob {
            key: key.to_owned(),
            states: vec![
                JobState::Available,
                JobState::Scheduled,
                JobState::Executing,
                JobState::Retryable,
            ],
        });
        job
    };
    let mut tasks = Vec::new();
    for i in 0..INSERTERS {
        let (queue, pool, barrier) = (db.queue.clone(), db.pool.clone(), Arc::clone(&barrier));
        let job = unique("advance:instance-1");
        tasks.push(tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            barrier.wait().await;
            let out = queue.insert_using(&mut tx, &job).await.unwrap();
            // Hold some transactions open so others block on the index.
            if i % 2 == 0 {
                tokio::task::yield_now().await;
            }
            tx.commit().await.unwrap();
            out
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    let inserted: Vec<_> = outcomes
        .iter()
        .filter(|o| matches!(o, Enqueued::Inserted(_)))
        .collect();
    assert_eq!(inserted.len(), 1, "{outcomes:?}");
    let ids: BTreeSet<JobId> = outcomes.iter().map(|o| o.id()).collect();
    assert_eq!(
        ids.len(),
        1,
        "every inserter got the same job: {outcomes:?}"
    );
    assert_eq!(
        db.queue.jobs(&JobFilter::default()).await.unwrap().len(),
        1,
        "exactly one row"
    );

    // The key frees up once the job leaves the listed states.
    let id = *ids.first().unwrap();
    let lease = db.queue.fetch("q", 1, db.queue.now(), "w").await.unwrap();
    assert_eq!(
        db.queue
            .insert(&unique("advance:instance-1"))
            .await
            .unwrap(),
        Enqueued::Existing(id),
        "still held while executing"
    );
    let mut conn = db.pool.acquire().await.unwrap();
    assert!(db.queue.complete_using(&mut conn, &lease[0]).await.unwrap());
    drop(conn);
    assert!(matches!(
        db.queue.insert(&unique("advance:instance-1")).await.unwrap(),
        Enqueued::Inserted(next) if next != id
    ));
    db.teardown().await;
}

#[tokio::test]
async fn two_fetchers_racing_for_one_job_get_it_once() {
    let db = QueueDb::with_connections(12).await;
    for round in 0..20 {
        let id = db.queue.insert(&job(round)).await.unwrap().id();
        let barrier = Arc::new(Barrier::new(2));
        let fetchers: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|name| {
                let (queue, barrier) = (db.queue.clone(), Arc::clone(&barrier));
                tokio::spawn(async move {
                    barrier.wait().await;
                    queue.fetch("q", 1, queue.now(), name).await.unwrap()
                })
            })
            .collect();
        let mut got = Vec::new();
        for fetcher in fetchers {
            got.extend(fetcher.await.unwrap());
        }
        assert_eq!(got.len(), 1, "round {round}: {got:?}");
        assert_eq!((got[0].id, got[0].attempt), (id, 1));
    }
    db.teardown().await;
}

#[tokio::test]
async fn a_stale_worker_cannot_complete_a_rescued_job() {
    let db = QueueDb::with_connections(3).await;
    let clock = ManualClock::new(t0());
    let q = db.queue.with_clock(clock.clone());
    let id = q.insert(&job(1)).await.unwrap().id();
    let stale = q.fetch("q", 1, q.now(), "dead-worker").await.unwrap();
    assert_eq!(stale.len(), 1);

    // The worker stops heartbeating; 31 s later the rescuer finds it.
    clock.advance(Duration::from_secs(31));
    let cutoff = q.now() - TimeDelta::seconds(30);
    let found = q.stale_jobs(cutoff, 10).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].attempted_by.as_deref(), Some("dead-worker"));
    assert_eq!(q.rescue(&found, cutoff).await.unwrap(), [id]);
    let rescued = q.job(id).await.unwrap().unwrap();
    assert_eq!(rescued.state, JobState::Retryable);
    assert!(
        rescued.errors[0]
            .error
            .message
            .contains("worker dead-worker stopped heartbeating")
    );
    assert!(
        q.rescue(&found, cutoff).await.unwrap().is_empty(),
        "a second rescue of the same attempt is fenced"
    );

    let fresh = q.fetch("q", 1, q.now(), "live-worker").await.unwrap();
    assert_eq!((fresh[0].id, fresh[0].attempt), (id, 2));
    let mut conn = db.pool.acquire().await.unwrap();
    assert!(
        !q.complete_using(&mut conn, &stale[0]).await.unwrap(),
        "the stale attempt is fenced off"
    );
    assert!(
        !q.retry_using(
            &mut conn,
            &stale[0],
            &StepError::retryable("late"),
            q.now(),
            q.now()
        )
        .await
        .unwrap()
    );
    assert_eq!(
        q.heartbeat(&[(id, 1), (id, 2)]).await.unwrap(),
        [id],
        "only the current attempt's heartbeat holds"
    );
    assert!(q.complete_using(&mut conn, &fresh[0]).await.unwrap());
    let done = q.job(id).await.unwrap().unwrap();
    assert_eq!((done.state, done.attempt), (JobState::Completed, 2));
    drop(conn);
    db.teardown().await;
}

/// Settling jobs whose consequences are new jobs is one statement: the
/// new jobs are inserted (the flagged one claimed, a unique one merged into
/// its holder), the held leases complete and a stale lease is fenced out,
/// all visible at commit only.
#[tokio::test]
async fn insert_and_complete_in_one_statement_fences_each_lease() {
    let db = QueueDb::with_connections(3).await;
    let clock = ManualClock::new(t0());
    let q = db.queue.with_clock(clock.clone());
    let ids: Vec<JobId> = q
        .insert_many(&[job(1), job(2)])
        .await
        .unwrap()
        .into_iter()
        .map(Enqueued::id)
        .collect();
    let leases = q.fetch("q", 2, q.now(), "w").await.unwrap();
    assert_eq!(leases.len(), 2);
    // The second lease goes stale and is rescued (retryable again).
    clock.advance(Duration::from_secs(31));
    let cutoff = q.now() - TimeDelta::seconds(30);
    let stale = q.stale_jobs(cutoff, 10).await.unwrap();
    let second = stale.iter().find(|s| s.lease.id == ids[1]).unwrap().clone();
    assert_eq!(q.rescue(&[second], cutoff).await.unwrap(), [ids[1]]);
    let holder = {
        let mut unique = job(9);
        unique.unique = Some(UniqueJob {
            key: "only-one".into(),
            states: JobState::ALL.to_vec(),
        });
        unique
    };
    let held = q.insert(&holder).await.unwrap().id();

    let mut tx = db.pool.begin().await.unwrap();
    let (enqueued, settled) = q
        .insert_claiming_and_complete_using(
            &mut tx,
            &[job(3), job(4), holder.clone()],
            &[true, false, true],
            "settler",
            &[(ids[0], leases[0].attempt), (ids[1], leases[1].attempt)],
        )
        .await
        .unwrap();
    assert_eq!(settled.completed, [ids[0]]);
    assert_eq!(
        settled.fenced_out,
        [ids[1]],
        "the rescued attempt is fenced"
    );
    assert!(matches!(enqueued[0], (Enqueued::Inserted(_), Some(_))));
    assert!(matches!(enqueued[1], (Enqueued::Inserted(_), None)));
    assert_eq!(
        enqueued[2],
        (Enqueued::Existing(held), None),
        "a merged job is not claimed"
    );
    // Nothing is visible before the commit.
    assert_eq!(
        q.job(ids[0]).await.unwrap().unwrap().state,
        JobState::Executing
    );
    tx.commit().await.unwrap();
    assert_eq!(
        q.job(ids[0]).await.unwrap().unwrap().state,
        JobState::Completed
    );
    assert_eq!(
        q.job(ids[1]).await.unwrap().unwrap().state,
        JobState::Retryable
    );
    let claimed = q.job(enqueued[0].0.id()).await.unwrap().unwrap();
    assert_eq!(
        (
            claimed.state,
            claimed.attempt,
            claimed.attempted_by.as_deref()
        ),
        (JobState::Executing, 1, Some("settler"))
    );
    let waiting = q.job(enqueued[1].0.id()).await.unwrap().unwrap();
    assert_eq!(waiting.state, JobState::Available);

    // With no new jobs, only the completion runs.
    let mut tx = db.pool.begin().await.unwrap();
    let (none, settled) = q
        .insert_claiming_and_complete_using(
            &mut tx,
            &[],
            &[],
            "settler",
            &[(enqueued[0].0.id(), 1)],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(none.is_empty());
    assert_eq!(settled.completed, [enqueued[0].0.id()]);
    db.teardown().await;
}

#[tokio::test]
async fn cancel_by_predicate_over_args_and_meta() {
    let db = QueueDb::with_connections(4).await;
    let q = &db.queue;
    let mut listener = PgListener::connect_with(&db.pool).await.unwrap();
    listener.listen(q.channel()).await.unwrap();
    let with_meta = |n: i64, instance: &str, queue: &str| {
        let mut job = NewJob::new("step", queue, json!({"n": n, "instance": instance}));
        job.meta.insert("instance_id".into(), json!(instance));
        job.meta.insert("workflow".into(), json!("orders@1"));
        job
    };
    let ids: Vec<JobId> = q
        .insert_many(&[
            with_meta(1, "i1", "a"),
            with_meta(2, "i1", "b"),
            with_meta(3, "i2", "a"),
            with_meta(4, "i1", "a"),
        ])
        .await
        .unwrap()
        .into_iter()
        .map(Enqueued::id)
        .collect();
    // One i1 job is executing: cancelling it notifies its worker.
    let executing = q.fetch("b", 1, q.now(), "w").await.unwrap();
    assert_eq!(executing[0].id, ids[1]);
    while tokio::time::timeout(std::time::Duration::from_millis(50), listener.recv())
        .await
        .is_ok()
    {}

    let filter = CancelFilter::meta(json!({"instance_id": "i1"})).with_except(ids[3]);
    let cancelled = q.cancel_where(&filter).await.unwrap();
    assert_eq!(
        cancelled.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([ids[0], ids[1]])
    );
    let note = tokio::time::timeout(SAFETY_NET, listener.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(note.payload(), format!("c:{}", ids[1].0));

    let by_args = q
        .cancel_where(
            &CancelFilter::args(json!({"instance": "i2"}))
                .with_queue("a")
                .with_kind("step"),
        )
        .await
        .unwrap();
    assert_eq!(by_args, [ids[2]]);
    let live: Vec<JobId> = q
        .live_jobs(&JobMatch::args(json!({})))
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(live, [ids[3]], "only the excepted job is live");
    let cancelled_jobs = q
        .jobs(
            &JobFilter::default()
                .with_states([JobState::Cancelled])
                .with_meta(json!({"workflow": "orders@1"})),
        )
        .await
        .unwrap();
    assert_eq!(cancelled_jobs.len(), 3);
    assert!(matches!(
        q.cancel_where(&CancelFilter::args(json!({"x": "\u{0}"})))
            .await,
        Err(hephaestus_queue_pg::Error::InvalidInput(_))
    ));
    // The listener holds a pooled connection: closing the pool waits for it.
    drop(listener);
    db.teardown().await;
}

#[tokio::test]
async fn finished_jobs_are_counted_per_minute_and_state() {
    let db = QueueDb::with_connections(3).await;
    let clock = ManualClock::new(t0() + TimeDelta::seconds(5));
    let q = db.queue.with_clock(clock.clone());
    let ids: Vec<JobId> = q
        .insert_many(&[job(1), job(2), job(3), job(4), job(5)])
        .await
        .unwrap()
        .into_iter()
        .map(Enqueued::id)
        .collect();
    let leases = q.fetch("q", 5, q.now(), "w1").await.unwrap();
    let lease = |id: JobId| {
        let l = leases.iter().find(|l| l.id == id).unwrap();
        (l.id, l.attempt)
    };
    // Two complete in the first minute, one in the third; one is cancelled
    // in the third; one is still executing.
    q.complete_many(&[lease(ids[0]), lease(ids[1])])
        .await
        .unwrap();
    clock.advance(Duration::from_secs(2 * 60));
    q.complete_many(&[lease(ids[2])]).await.unwrap();
    assert!(q.cancel(ids[3]).await.unwrap());
    let minute = |m: i64, state: JobState, count: u64| (t0() + TimeDelta::minutes(m), state, count);
    let finished_since = |since| {
        let q = q.clone();
        async move {
            q.finished_per_minute(since)
                .await
                .unwrap()
                .into_iter()
                .map(|f| (f.minute, f.state, f.count))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        finished_since(t0() - TimeDelta::hours(1)).await,
        vec![
            minute(0, JobState::Completed, 2),
            minute(2, JobState::Cancelled, 1),
            minute(2, JobState::Completed, 1),
        ]
    );
    assert_eq!(
        finished_since(t0() + TimeDelta::minutes(1)).await,
        vec![
            minute(2, JobState::Cancelled, 1),
            minute(2, JobState::Completed, 1),
        ],
        "only what finished since"
    );
    db.teardown().await;
}

#[tokio::test]
async fn the_census_counts_jobs_by_state_and_latency_reads_completed_ones() {
    let db = QueueDb::with_connections(2).await;
    let clock = ManualClock::new(t0());
    let q = db.queue.with_clock(clock.clone());
    q.insert_many(&[job(1), job(2), job(3)]).await.unwrap();
    assert_eq!(q.latency_seconds("work", &[0.5, 0.99]).await.unwrap(), None);
    let leases = q.fetch("q", 2, t0(), "w").await.unwrap();
    clock.advance(Duration::from_secs(10));
    q.complete_many(&[(leases[0].id, leases[0].attempt)])
        .await
        .unwrap();
    let census = q.census().await.unwrap();
    assert_eq!(
        (census.jobs, census.unfinished_jobs, census.executing_jobs),
        (3, 2, 1),
        "jobs, unfinished, executing"
    );
    // Due at t0, completed 10 s later.
    assert_eq!(
        q.latency_seconds("work", &[0.5, 0.99]).await.unwrap(),
        Some(vec![10.0, 10.0])
    );
    assert_eq!(q.latency_seconds("other", &[0.5]).await.unwrap(), None);
    q.analyze().await.unwrap();
    q.vacuum_analyze().await.unwrap();
    db.teardown().await;
}
