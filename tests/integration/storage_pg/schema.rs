//! The schema: `migrate()` versus the generated files, and custom schema prefixes.

use std::fs;

use hephaestus_engine_core::business_id::Scope;
use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_engine_core::ports::{
    InstanceFilter, InstanceStore, Recorded, StepResultStore, UnitOfWork,
};
use hephaestus_migrations_gen::SchemaPrefix;
use hephaestus_storage_pg::{InstanceQuery, Migrated, PgStore, migrate, schema};
use sqlx::PgPool;

use super::{Db, instance, sid};
use crate::storage_pg::inbox::completed;
use crate::support::catalog::{Catalog, describe};
use crate::support::db::{TestDatabase, TestSchema};
use crate::support::repo_root;

/// Applies the committed `migrations/*_hephaestus_storage_v*.up.sql` files in order, each
/// in one transaction, as sqlx does.
async fn apply_generated_files(pool: &PgPool) -> usize {
    let dir = repo_root().join("migrations");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("_hephaestus_storage_v") && n.ends_with(".up.sql"))
        .collect();
    names.sort();
    for name in &names {
        let sql = fs::read_to_string(dir.join(name)).unwrap();
        let mut tx = pool.begin().await.unwrap();
        sqlx::raw_sql(&sql)
            .execute(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        tx.commit().await.unwrap();
    }
    names.len()
}

#[track_caller]
fn assert_same(actual: &Catalog, expected: &Catalog, context: &str) {
    assert!(
        actual == expected,
        "{context}: schemas differ (- actual, + expected):\n{}",
        actual.diff(expected)
    );
}

#[tokio::test]
async fn migrate_creates_exactly_what_the_generated_files_create() {
    let public = SchemaPrefix::default();
    let from_files = TestDatabase::new().await;
    let applied = apply_generated_files(&from_files.pool).await;
    assert_eq!(
        applied,
        schema().versions().len(),
        "one file per storage version"
    );
    let files_catalog = describe(&from_files.pool, "public").await;

    let at_runtime = TestDatabase::new().await;
    let latest = schema().latest();
    assert_eq!(
        migrate(&at_runtime.pool, &public).await.unwrap(),
        Migrated {
            from: 0,
            to: latest
        }
    );
    let runtime_catalog = describe(&at_runtime.pool, "public").await;
    assert_same(&runtime_catalog, &files_catalog, "migrate() vs migrations/");
    assert!(runtime_catalog.has_table("hephaestus_instances"));

    // Either way the version is recorded: migrating again does nothing.
    for pool in [&from_files.pool, &at_runtime.pool] {
        let again = migrate(pool, &public).await.unwrap();
        assert_eq!(
            again,
            Migrated {
                from: latest,
                to: latest
            }
        );
        assert!(!again.changed());
    }
    assert_same(
        &describe(&at_runtime.pool, "public").await,
        &files_catalog,
        "after migrating again",
    );
    from_files.teardown().await;
    at_runtime.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_of_one_schema_are_safe() {
    let db = TestSchema::new().await;
    let pool = super::big_pool(&db).await;
    let prefix = SchemaPrefix::new(&format!("{}_race", db.prefix)).unwrap();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (pool, prefix) = (pool.clone(), prefix.clone());
            tokio::spawn(async move { migrate(&pool, &prefix).await })
        })
        .collect();
    let mut changed = 0;
    for task in tasks {
        let outcome = task.await.unwrap().expect("a concurrent migration failed");
        assert_eq!(outcome.to, schema().latest());
        changed += usize::from(outcome.changed());
    }
    assert!(changed >= 1);
    let store = PgStore::new(pool.clone(), prefix.clone());
    assert_eq!(
        store.migrate().await.unwrap(),
        Migrated {
            from: schema().latest(),
            to: schema().latest()
        }
    );
    sqlx::raw_sql(&format!("drop schema {} cascade", prefix.quoted()))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    db.teardown().await;
}

#[tokio::test]
async fn a_custom_prefix_works_end_to_end_and_tenants_are_isolated() {
    // The pool's search_path names a schema that does not exist: every statement must
    // qualify its tables with the prefix.
    let db = Db::new().await;
    let tenants: Vec<PgStore> = ["tenant_a", "tenant_b"]
        .iter()
        .map(|t| {
            let prefix = SchemaPrefix::new(&format!("{}_{t}", db.prefix())).unwrap();
            PgStore::new(db.pool.clone(), prefix)
        })
        .collect();
    let mut started = Vec::new();
    for store in &tenants {
        assert!(
            store.migrate().await.unwrap().changed(),
            "creates the schema"
        );
        // The same business id is active in both tenants: claims are per schema.
        let mut inst = instance(
            "order::1",
            "shop.orders",
            1,
            Scope::Global,
            InstanceStatus::Pending,
        );
        let mut tx = store.begin().await.unwrap();
        store.insert(&mut tx, &inst).await.unwrap();
        let recorded = store
            .record(&mut tx, &completed(inst.id, "a", 1))
            .await
            .unwrap();
        let Recorded::Inserted(seq) = recorded else {
            panic!("a new row")
        };
        store.commit(tx).await.unwrap();

        let mut tx = store.begin().await.unwrap();
        assert_eq!(
            store.lock(&mut tx, inst.id).await.unwrap().as_ref(),
            Some(&inst)
        );
        let pending = store.pending(&mut tx, inst.id).await.unwrap();
        assert_eq!(pending.iter().map(|r| r.seq).collect::<Vec<_>>(), [seq]);
        inst.status = InstanceStatus::Running;
        inst.revision = 1;
        store.update(&mut tx, &inst).await.unwrap();
        store
            .mark_processed(&mut tx, inst.id, &[seq])
            .await
            .unwrap();
        store.commit(tx).await.unwrap();

        assert!(store.is_recorded(inst.id, &sid("a"), 1).await.unwrap());
        let family = InstanceQuery::default().with_workflow_family("shop.");
        assert_eq!(
            store.query(&family).await.unwrap().instances,
            vec![inst.clone()]
        );
        assert_eq!(
            store.list(&InstanceFilter::default()).await.unwrap(),
            vec![inst.clone()]
        );
        assert_eq!(
            store
                .prune_processed(chrono::Utc::now() + chrono::TimeDelta::hours(1))
                .await
                .unwrap(),
            1
        );
        started.push(inst);
    }
    // Neither tenant sees the other's instance.
    assert_eq!(tenants[0].get(started[1].id).await.unwrap(), None);
    assert_eq!(tenants[1].get(started[0].id).await.unwrap(), None);
    for store in &tenants {
        let catalog = describe(&db.pool, store.prefix().as_str()).await;
        assert_eq!(
            catalog.tables,
            [
                "hephaestus_instances",
                "hephaestus_schema_versions",
                "hephaestus_step_results"
            ]
        );
        sqlx::raw_sql(&format!("drop schema {} cascade", store.prefix().quoted()))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    db.teardown().await;
}

#[tokio::test]
async fn migrate_to_goes_down_and_up_again_and_refuses_the_wrong_direction() {
    use hephaestus_engine_core::ports::PortError;
    use hephaestus_migrations_gen::Direction;
    use hephaestus_storage_pg::{StorageCensus, migrate_to, schema_version};

    let db = TestSchema::new().await;
    let latest = schema().latest();
    let mut conn = db.pool.acquire().await.unwrap();
    assert_eq!(schema_version(&mut conn, &db.prefix).await.unwrap(), 0);
    assert_eq!(
        migrate_to(&db.pool, &db.prefix, Direction::Up, latest)
            .await
            .unwrap(),
        Migrated {
            from: 0,
            to: latest
        }
    );
    assert_eq!(schema_version(&mut conn, &db.prefix).await.unwrap(), latest);
    let store = PgStore::new(db.pool.clone(), db.prefix.clone());
    let mut tx = store.begin().await.unwrap();
    for status in [InstanceStatus::Running, InstanceStatus::Completed] {
        let one = instance("census::1", "orders", 1, Scope::None, status);
        store.insert(&mut tx, &one).await.unwrap();
    }
    store.commit(tx).await.unwrap();
    let census = store.census().await.unwrap();
    assert_eq!(
        (
            census.instances,
            census.active_instances,
            census.step_results
        ),
        (2, 1, 0),
        "instances, active instances, step results"
    );

    // Up to a lower version is refused, and nothing changes.
    let refused = migrate_to(&db.pool, &db.prefix, Direction::Up, 0)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, PortError::Conflict(m) if m.contains("migrate down instead")),
        "{refused}"
    );
    assert_eq!(schema_version(&mut conn, &db.prefix).await.unwrap(), latest);

    // Down to 0 drops the tables; up again recreates them empty.
    assert_eq!(
        migrate_to(&db.pool, &db.prefix, Direction::Down, 0)
            .await
            .unwrap(),
        Migrated {
            from: latest,
            to: 0
        }
    );
    assert_eq!(schema_version(&mut conn, &db.prefix).await.unwrap(), 0);
    assert!(store.census().await.is_err(), "the tables are gone");
    migrate_to(&db.pool, &db.prefix, Direction::Up, latest)
        .await
        .unwrap();
    assert_eq!(store.census().await.unwrap(), StorageCensus::default());
    drop(conn);
    db.teardown().await;
}
