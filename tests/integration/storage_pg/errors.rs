//! Every failure is a typed `PortError` (G15): nothing is swallowed, no `sqlx::Error`
//! leaks.

use std::time::Duration;

use hephaestus_engine_core::ports::{
    InstanceStore, NewStepResult, PortError, ResultPayload, StepResultStore, UnitOfWork,
};
use hephaestus_migrations_gen::SchemaPrefix;
use hephaestus_storage_pg::PgStore;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use super::{Db, insert_committed, pending, sid};
use crate::storage_pg::inbox::completed;

#[tokio::test]
async fn an_unreachable_database_is_unavailable() {
    // Port 1 on the loopback: nothing listens there.
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy("postgres://postgres@127.0.0.1:1/nothing")
        .unwrap();
    let store = PgStore::new(pool, SchemaPrefix::default());
    assert!(matches!(
        store.begin().await,
        Err(PortError::Unavailable(_))
    ));
    assert!(matches!(
        store.get(Uuid::now_v7()).await,
        Err(PortError::Unavailable(_))
    ));
    assert!(matches!(
        store.migrate().await,
        Err(PortError::Unavailable(_))
    ));
}

#[tokio::test]
async fn a_schema_without_the_tables_is_unavailable() {
    let db = Db::new().await;
    let bare = PgStore::new(
        db.pool.clone(),
        SchemaPrefix::new(&format!("{}_missing", db.prefix())).unwrap(),
    );
    let outcome = bare.get(Uuid::now_v7()).await;
    match outcome {
        Err(PortError::Unavailable(source)) => {
            assert!(source.to_string().contains("does not exist"), "{source}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    db.teardown().await;
}

#[tokio::test]
async fn corrupt_rows_are_reported_with_what_is_wrong() {
    let db = Db::new().await;
    let instances = db.table("hephaestus_instances");
    let cases = [
        ("state = '{\"context\": 5}'", "column state"),
        ("business_id = 'Not Valid'", "column business_id"),
        ("failure = '{\"nope\": true}'", "column failure"),
        ("telemetry_metadata = '[1]'", "column telemetry_metadata"),
    ];
    for (n, (change, expected)) in cases.into_iter().enumerate() {
        let inst = pending(&format!("order::{n}"));
        insert_committed(&db.store, &inst).await;
        sqlx::query(&format!("update {instances} set {change} where id = $1"))
            .bind(inst.id)
            .execute(&db.pool)
            .await
            .unwrap();
        match db.store.get(inst.id).await {
            Err(PortError::Corrupt(message)) => {
                assert!(message.contains(&inst.id.to_string()), "{message}");
                assert!(message.contains(expected), "{message}");
            }
            other => panic!("{change}: expected Corrupt, got {other:?}"),
        }
        // The same for the single writer.
        let mut tx = db.store.begin().await.unwrap();
        assert!(matches!(
            db.store.lock(&mut tx, inst.id).await,
            Err(PortError::Corrupt(_))
        ));
    }

    let inst = pending("user::1");
    insert_committed(&db.store, &inst).await;
    sqlx::query(&format!(
        "insert into {} (instance_id, step_id, activation, kind) values ($1, 'a', 1, 'resume')",
        db.table("hephaestus_step_results")
    ))
    .bind(inst.id)
    .execute(&db.pool)
    .await
    .unwrap();
    let mut tx = db.store.begin().await.unwrap();
    match db.store.pending(&mut tx, inst.id).await {
        Err(PortError::Corrupt(message)) => {
            assert!(message.contains("resume row without an event"), "{message}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    drop(tx);
    db.teardown().await;
}

#[tokio::test]
async fn values_postgres_cannot_hold_are_invalid_input() {
    let db = Db::new().await;
    let store = &db.store;
    let mut tx = store.begin().await.unwrap();
    for (what, change) in [
        (
            "a version beyond i32",
            Box::new(|i: &mut hephaestus_engine_core::Instance| i.workflow_version = u32::MAX)
                as Box<dyn Fn(&mut _)>,
        ),
        (
            "a revision beyond i64",
            Box::new(|i: &mut hephaestus_engine_core::Instance| i.revision = u64::MAX),
        ),
    ] {
        let mut inst = pending("order::1");
        change(&mut inst);
        let outcome = store.insert(&mut tx, &inst).await;
        assert!(
            matches!(outcome, Err(PortError::InvalidInput(_))),
            "{what}: {outcome:?}"
        );
    }
    let inst = pending("order::1");
    store.insert(&mut tx, &inst).await.unwrap();
    let huge = NewStepResult {
        activation: u32::MAX,
        ..completed(inst.id, "a", 1)
    };
    assert!(matches!(
        store.record(&mut tx, &huge).await,
        Err(PortError::InvalidInput(_))
    ));
    assert!(
        !store
            .is_recorded(inst.id, &sid("a"), u32::MAX)
            .await
            .unwrap()
    );
    store.commit(tx).await.unwrap();

    // Rejected by a check constraint: version 0.
    let mut zero = pending("order::2");
    zero.workflow_version = 0;
    let mut tx = store.begin().await.unwrap();
    match store.insert(&mut tx, &zero).await {
        Err(PortError::InvalidInput(message)) => {
            assert!(
                message.contains("hephaestus_instances_workflow_version_check"),
                "{message}"
            );
        }
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    drop(tx);

    // A step result whose instance does not exist.
    let mut tx = store.begin().await.unwrap();
    let ghost = NewStepResult {
        instance_id: Uuid::now_v7(),
        step: None,
        activation: 0,
        payload: ResultPayload::Cancel { reason: None },
    };
    assert!(matches!(
        store.record(&mut tx, &ghost).await,
        Err(PortError::NotFound(_))
    ));
    drop(tx);
    db.teardown().await;
}
