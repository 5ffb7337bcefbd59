//! Step results: concurrent inserts, idempotency, payload columns, pruning, and
//! recording inside the caller's transaction.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use hephaestus_engine_core::Event;
use hephaestus_engine_core::instance::AttemptRecord;
use hephaestus_engine_core::ports::{
    InstanceFilter, InstanceStore, NewStepResult, PortError, Recorded, ResultPayload,
    StepResultStore, UnitOfWork,
};
use hephaestus_engine_core::step::{EventName, StepError};
use serde_json::{Map, json};
use tokio::sync::Barrier;
use uuid::Uuid;

use super::{Db, insert_committed, pending, sid, t0};

/// A completion of `step`'s activation.
pub fn completed(instance_id: Uuid, step: &str, activation: u32) -> NewStepResult {
    let mut metadata = Map::new();
    metadata.insert("worker".to_owned(), json!(step));
    NewStepResult {
        instance_id,
        step: Some(sid(step)),
        activation,
        payload: ResultPayload::Completed {
            event: EventName("done".to_owned()),
            output: json!({"step": step, "activation": activation}),
            metadata,
        },
    }
}

/// One result of every kind and shape, for one instance.
fn every_kind(instance_id: Uuid) -> Vec<NewStepResult> {
    let on = |step: Option<&str>, activation: u32, payload: ResultPayload| NewStepResult {
        instance_id,
        step: step.map(sid),
        activation,
        payload,
    };
    vec![
        completed(instance_id, "charge", 1),
        on(
            Some("charge"),
            2,
            ResultPayload::Completed {
                event: EventName("not an identifier!".to_owned()),
                output: json!(null),
                metadata: Map::new(),
            },
        ),
        on(
            Some("wait"),
            1,
            ResultPayload::Async {
                timer_after_ms: Some(u64::MAX),
                timer_event: Some(EventName("timeout".to_owned())),
            },
        ),
        on(
            Some("wait"),
            2,
            ResultPayload::Async {
                timer_after_ms: None,
                timer_event: None,
            },
        ),
        on(
            Some("wait"),
            3,
            ResultPayload::Async {
                timer_after_ms: Some(5),
                timer_event: None,
            },
        ),
        on(
            Some("wait"),
            1,
            ResultPayload::Resume {
                event: Event::new("approved").unwrap(),
                payload: json!({"by": "ada", "ü": [1.5, null, {}]}),
            },
        ),
        on(
            Some("wait"),
            1,
            ResultPayload::Timer {
                event: Event::new("timeout").unwrap(),
            },
        ),
        on(
            Some("ship"),
            1,
            ResultPayload::Failed {
                error: StepError::retry_after("gateway «down»", Duration::from_millis(1500))
                    .with_details(json!({"code": 503})),
                attempts: vec![AttemptRecord {
                    attempt: 1,
                    at: t0(),
                    error: StepError::retryable("timeout"),
                }],
            },
        ),
        on(
            None,
            0,
            ResultPayload::Failed {
                error: StepError::fatal("corrupt state"),
                attempts: Vec::new(),
            },
        ),
        on(
            None,
            0,
            ResultPayload::Cancel {
                reason: Some("customer asked".to_owned()),
            },
        ),
        on(None, 1, ResultPayload::Cancel { reason: None }),
    ]
}

#[tokio::test]
async fn every_payload_round_trips_and_fills_the_operator_columns() {
    let db = Db::new().await;
    let inst = pending("order::1");
    insert_committed(&db.store, &inst).await;
    let results = every_kind(inst.id);
    let mut tx = db.store.begin().await.unwrap();
    for result in &results {
        assert!(matches!(
            db.store.record(&mut tx, result).await.unwrap(),
            Recorded::Inserted(_)
        ));
    }
    db.store.commit(tx).await.unwrap();

    let mut tx = db.store.begin().await.unwrap();
    let rows = db.store.pending(&mut tx, inst.id).await.unwrap();
    drop(tx);
    let got: Vec<&NewStepResult> = rows.iter().map(|r| &r.result).collect();
    assert_eq!(got, results.iter().collect::<Vec<_>>());

    let columns: Vec<(String, String, Option<String>)> = sqlx::query_as(&format!(
        "select step_id, kind, event from {} order by seq",
        db.table("hephaestus_step_results")
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let expected = [
        ("charge", "completed", Some("done")),
        ("charge", "completed", Some("not an identifier!")),
        ("wait", "async", Some("timeout")),
        ("wait", "async", None),
        ("wait", "async", None),
        ("wait", "resume", Some("approved")),
        ("wait", "timer", Some("timeout")),
        ("ship", "failed", None),
        ("", "failed", None),
        ("", "cancel", None),
        ("", "cancel", None),
    ];
    let columns: Vec<(&str, &str, Option<&str>)> = columns
        .iter()
        .map(|(s, k, e)| (s.as_str(), k.as_str(), e.as_deref()))
        .collect();
    assert_eq!(columns, expected);
    db.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_records_from_many_tasks_are_all_pending_in_seq_order() {
    const TASKS: usize = 16;
    let db = Db::new().await;
    let inst = pending("order::1");
    insert_committed(&db.store, &inst).await;
    let barrier = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|n| {
            let (store, barrier) = (db.store.clone(), Arc::clone(&barrier));
            tokio::spawn(async move {
                let mut tx = store.begin().await.unwrap();
                barrier.wait().await;
                // Two results per task: a completion and its async marker.
                let step = format!("step{n}");
                let mut mine = Vec::new();
                for result in [completed(inst.id, &step, 1), {
                    let mut marker = completed(inst.id, &step, 2);
                    marker.payload = ResultPayload::Async {
                        timer_after_ms: None,
                        timer_event: None,
                    };
                    marker
                }] {
                    match store.record(&mut tx, &result).await.unwrap() {
                        Recorded::Inserted(seq) => mine.push((seq, result)),
                        Recorded::Duplicate => panic!("{step} is new"),
                    }
                }
                store.commit(tx).await.unwrap();
                mine
            })
        })
        .collect();
    let mut recorded = Vec::new();
    for task in tasks {
        recorded.extend(task.await.unwrap());
    }
    recorded.sort_by_key(|(seq, _)| *seq);

    let mut tx = db.store.begin().await.unwrap();
    let rows = db.store.pending(&mut tx, inst.id).await.unwrap();
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let got: Vec<(i64, NewStepResult)> = rows.into_iter().map(|r| (r.seq, r.result)).collect();
    assert_eq!(got, recorded, "every committed result, in seq order");

    // Marked in one statement, inside the writer's transaction.
    db.store
        .mark_processed(&mut tx, inst.id, &seqs)
        .await
        .unwrap();
    assert!(db.store.pending(&mut tx, inst.id).await.unwrap().is_empty());
    db.store.commit(tx).await.unwrap();
    let mut tx = db.store.begin().await.unwrap();
    assert!(db.store.pending(&mut tx, inst.id).await.unwrap().is_empty());
    drop(tx);
    db.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_records_are_idempotent() {
    const TASKS: usize = 16;
    let db = Db::new().await;
    let inst = pending("order::1");
    insert_committed(&db.store, &inst).await;

    // Every kind, twice: the second is a duplicate, even with another payload.
    let results = every_kind(inst.id);
    for result in &results {
        let mut tx = db.store.begin().await.unwrap();
        assert!(matches!(
            db.store.record(&mut tx, result).await.unwrap(),
            Recorded::Inserted(_)
        ));
        db.store.commit(tx).await.unwrap();
        let mut again = result.clone();
        if let ResultPayload::Completed { output, .. } = &mut again.payload {
            *output = json!("another output");
        }
        let mut tx = db.store.begin().await.unwrap();
        assert_eq!(
            db.store.record(&mut tx, &again).await.unwrap(),
            Recorded::Duplicate,
            "{again:?}"
        );
        db.store.commit(tx).await.unwrap();
    }

    // Many tasks recording one result at once: exactly one row, one `Inserted`.
    let barrier = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (store, barrier) = (db.store.clone(), Arc::clone(&barrier));
            tokio::spawn(async move {
                let mut tx = store.begin().await.unwrap();
                barrier.wait().await;
                let recorded = store
                    .record(&mut tx, &completed(inst.id, "racy", 1))
                    .await
                    .unwrap();
                store.commit(tx).await.unwrap();
                recorded
            })
        })
        .collect();
    let mut inserted = 0;
    for task in tasks {
        if matches!(task.await.unwrap(), Recorded::Inserted(_)) {
            inserted += 1;
        }
    }
    assert_eq!(inserted, 1, "one insert wins, the others wait and see it");

    let mut tx = db.store.begin().await.unwrap();
    let rows = db.store.pending(&mut tx, inst.id).await.unwrap();
    assert_eq!(rows.len(), results.len() + 1);
    let keys: BTreeSet<_> = rows
        .iter()
        .map(|r| {
            (
                r.result.step.clone(),
                r.result.activation,
                r.result.payload.kind(),
            )
        })
        .collect();
    assert_eq!(keys.len(), rows.len(), "one row per key");
    drop(tx);
    db.teardown().await;
}

#[tokio::test]
async fn prune_deletes_processed_results_in_batches() {
    let db = Db::new().await;
    let inst = pending("order::1");
    insert_committed(&db.store, &inst).await;
    let mut tx = db.store.begin().await.unwrap();
    let mut seqs = Vec::new();
    for n in 0..30 {
        match db
            .store
            .record(&mut tx, &completed(inst.id, &format!("s{n}"), 1))
            .await
            .unwrap()
        {
            Recorded::Inserted(seq) => seqs.push(seq),
            Recorded::Duplicate => unreachable!(),
        }
    }
    db.store
        .mark_processed(&mut tx, inst.id, &seqs[..25])
        .await
        .unwrap();
    db.store.commit(tx).await.unwrap();

    let hour = TimeDelta::hours(1);
    assert_eq!(
        db.store
            .prune_processed_in_batches(Utc::now() - hour, 4)
            .await
            .unwrap(),
        0,
        "nothing was processed an hour ago"
    );
    assert_eq!(
        db.store
            .prune_processed_in_batches(Utc::now() + hour, 4)
            .await
            .unwrap(),
        25,
        "seven batches of at most four"
    );
    let mut tx = db.store.begin().await.unwrap();
    let left: Vec<i64> = db
        .store
        .pending(&mut tx, inst.id)
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(left, seqs[25..]);
    let total: i64 = sqlx::query_scalar(&format!(
        "select count(*) from {}",
        db.table("hephaestus_step_results")
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(total, 5);
    drop(tx);
    db.teardown().await;
}

#[tokio::test]
async fn a_workflow_starts_inside_the_callers_transaction() {
    let db = Db::new().await;
    let orders = db.table("app_orders");
    sqlx::raw_sql(&format!("create table {orders} (id bigint primary key)"))
        .execute(&db.pool)
        .await
        .unwrap();

    // Rolled back: neither the application's row nor the instance nor its result.
    let inst = pending("order::1");
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query(&format!("insert into {orders} values (1)"))
        .execute(&mut *tx)
        .await
        .unwrap();
    db.store.insert_using(&mut tx, &inst).await.unwrap();
    db.store
        .record_using(&mut tx, &completed(inst.id, "a", 1))
        .await
        .unwrap();
    assert_eq!(
        db.store
            .get_using(&mut *tx, inst.id)
            .await
            .unwrap()
            .as_ref(),
        Some(&inst),
        "the transaction sees its own instance"
    );
    tx.rollback().await.unwrap();
    assert_eq!(db.store.get(inst.id).await.unwrap(), None);

    // Committed: all of it.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query(&format!("insert into {orders} values (1)"))
        .execute(&mut *tx)
        .await
        .unwrap();
    db.store.insert_using(&mut tx, &inst).await.unwrap();
    db.store
        .record_using(&mut tx, &completed(inst.id, "a", 1))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(db.store.get(inst.id).await.unwrap(), Some(inst.clone()));
    assert_eq!(
        db.store
            .pending_using(&db.pool, inst.id)
            .await
            .unwrap()
            .len(),
        1
    );

    // A start refused inside the caller's transaction leaves it usable.
    let mut tx = db.pool.begin().await.unwrap();
    let outcome = db.store.insert_using(&mut tx, &pending("order::1")).await;
    assert!(matches!(outcome, Err(PortError::AlreadyRunning { .. })));
    let missing = db
        .store
        .record_using(&mut tx, &completed(Uuid::now_v7(), "a", 1))
        .await;
    assert!(
        matches!(missing, Err(PortError::NotFound(_))),
        "{missing:?}"
    );
    sqlx::query(&format!("insert into {orders} values (2)"))
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let count: i64 = sqlx::query_scalar(&format!("select count(*) from {orders}"))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 2);
    assert_eq!(
        db.store
            .list(&InstanceFilter::default())
            .await
            .unwrap()
            .len(),
        1,
        "the refused start left nothing"
    );
    db.teardown().await;
}

/// The store writes the injected clock's time, never the server's: a result
/// recorded and processed in 2030 (on a virtual clock) is pruned by a 2030
/// cut-off, and its arrival time reads back exactly.
#[tokio::test]
async fn arrival_and_processing_times_come_from_the_injected_clock() {
    use hephaestus_engine_core::clock::ManualClock;
    use hephaestus_engine_core::ports::RoundResult;

    let db = Db::new().await;
    let clock = ManualClock::default();
    let store = db.store.clone().with_clock(clock.clone());
    let inst = pending("order::clocked");
    insert_committed(&store, &inst).await;
    let arrived = clock.now();
    let mut tx = store.begin().await.unwrap();
    let Recorded::Inserted(first) = store
        .record(&mut tx, &completed(inst.id, "a", 1))
        .await
        .unwrap()
    else {
        unreachable!("a new result")
    };
    store.commit(tx).await.unwrap();

    clock.advance(Duration::from_secs(60));
    let mut tx = store.begin().await.unwrap();
    let rows = store.pending(&mut tx, inst.id).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].inserted_at, arrived, "arrival is the clock's time");
    store
        .mark_processed(&mut tx, inst.id, &[first])
        .await
        .unwrap();
    // The batched write stamps its rows with the clock too.
    store
        .write_rounds_using(
            &mut tx,
            &[RoundResult {
                result: completed(inst.id, "b", 1),
                processed: true,
                refusal: None,
            }],
            &[],
            &[],
        )
        .await
        .unwrap();
    store.commit(tx).await.unwrap();

    // Processed one minute into 2030: a cut-off one second earlier keeps
    // both rows, one second later removes them (the server's clock, years
    // away, decides nothing).
    let processed = clock.now();
    assert_eq!(
        store
            .prune_processed(processed - TimeDelta::seconds(1))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .prune_processed(processed + TimeDelta::seconds(1))
            .await
            .unwrap(),
        2
    );
    db.teardown().await;
}
