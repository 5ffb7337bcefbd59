//! The generated migrations, applied to a real PostgreSQL.
//!
//! Tests that walk versions are generic over every registered component and version, so
//! they keep covering new versions as they are added.

use hephaestus_migrations_gen::files::{check_dir, render_files};
use hephaestus_migrations_gen::{
    Component, Registry, SchemaPrefix, current_version_sql, render_down, render_up,
    versions_table_exists_sql,
};
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use uuid::Uuid;

use crate::support::catalog::{Catalog, describe};
use crate::support::db::{TestDatabase, TestSchema};
use crate::support::repo_root;

const VERSIONS_TABLE: &str = "hephaestus_schema_versions";

fn registry() -> Registry {
    Registry::new(vec![
        hephaestus_storage_pg::schema(),
        hephaestus_queue_pg::schema(),
    ])
    .expect("the registry is valid")
}

fn storage() -> Component {
    *registry().get("storage").expect("storage is registered")
}

/// Runs `sql` in one transaction, as sqlx does with a migration file.
async fn apply(pool: &PgPool, sql: &str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::raw_sql(sql).execute(&mut *tx).await?;
    tx.commit().await
}

async fn up(pool: &PgPool, component: &Component, prefix: &SchemaPrefix, from: u32, to: u32) {
    let script = render_up(component, prefix, from, to).expect("render up");
    apply(pool, &script.to_sql())
        .await
        .unwrap_or_else(|e| panic!("{} up {from}->{to} failed: {e}", component.name()));
}

async fn down(pool: &PgPool, component: &Component, prefix: &SchemaPrefix, from: u32, to: u32) {
    let script = render_down(component, prefix, from, to).expect("render down");
    apply(pool, &script.to_sql())
        .await
        .unwrap_or_else(|e| panic!("{} down {from}->{to} failed: {e}", component.name()));
}

/// Every component up to its latest version, in registry order.
async fn up_all(pool: &PgPool, prefix: &SchemaPrefix) {
    for component in registry().components() {
        up(pool, component, prefix, 0, component.latest()).await;
    }
}

/// The recorded version, read with the SQL the runtime crates embed.
async fn recorded_version(pool: &PgPool, prefix: &SchemaPrefix, component: &str) -> i32 {
    let exists: bool = sqlx::query_scalar(&versions_table_exists_sql(prefix))
        .fetch_one(pool)
        .await
        .expect("check the versions table");
    if !exists {
        return 0;
    }
    sqlx::query_scalar(&current_version_sql(prefix))
        .bind(component)
        .fetch_one(pool)
        .await
        .expect("read the recorded version")
}

fn version_i32(version: u32) -> i32 {
    i32::try_from(version).expect("versions fit in an integer")
}

/// The catalog of a schema where every component is at its latest version.
async fn full_catalog() -> Catalog {
    let db = TestSchema::new().await;
    up_all(&db.pool, &db.prefix).await;
    let catalog = describe(&db.pool, db.prefix.as_str()).await;
    db.teardown().await;
    catalog
}

#[track_caller]
fn assert_same_schema(actual: &Catalog, expected: &Catalog, context: &str) {
    assert!(
        actual == expected,
        "{context}: schemas differ (- actual, + expected):\n{}",
        actual.diff(expected)
    );
}

fn sql_state(error: &sqlx::Error) -> (String, String) {
    match error {
        sqlx::Error::Database(e) => (
            e.code()
                .map(std::borrow::Cow::into_owned)
                .unwrap_or_default(),
            e.constraint().unwrap_or_default().to_owned(),
        ),
        other => panic!("expected a database error, got {other:?}"),
    }
}

#[test]
fn committed_migration_files_are_up_to_date() {
    // The same code path as `cargo xtask gen-migration --check`.
    let dir = repo_root().join("migrations");
    let files = render_files(&registry(), &SchemaPrefix::default()).expect("render files");
    let status = check_dir(&dir, &files).expect("read migrations/");
    assert!(
        status.is_clean(),
        "{} is out of date:\n{}\nrun `cargo xtask gen-migration` and commit the result",
        dir.display(),
        status.describe()
    );
}

#[test]
fn invalid_prefixes_are_rejected() {
    for bad in [
        "",
        "Public",
        "1st",
        "a-b",
        "x\"; drop schema public; --",
        "pg_toast",
    ] {
        let err = SchemaPrefix::new(bad).expect_err(bad);
        assert!(
            err.to_string().starts_with(&format!(
                "invalid prefix \"{bad}\" — must match ^[a-z_][a-z0-9_]*$"
            )),
            "{err}"
        );
    }
}

#[tokio::test]
async fn full_up_creates_the_storage_schema_and_records_the_version() {
    let db = TestSchema::new().await;
    let storage = storage();
    up(&db.pool, &storage, &db.prefix, 0, storage.latest()).await;
    let catalog = describe(&db.pool, db.prefix.as_str()).await;

    for table in [
        "hephaestus_instances",
        "hephaestus_step_results",
        VERSIONS_TABLE,
    ] {
        assert!(
            catalog.has_table(table),
            "{table} missing: {:?}",
            catalog.tables
        );
    }

    let id = catalog.column("hephaestus_instances", "id");
    assert_eq!((id.data_type.as_str(), id.nullable), ("uuid", false));
    let status = catalog.column("hephaestus_instances", "status");
    assert_eq!(status.default.as_deref(), Some("'pending'::text"));
    assert!(
        catalog
            .column("hephaestus_instances", "unique_claim")
            .nullable
    );
    assert!(catalog.column("hephaestus_instances", "failure").nullable);
    let state = catalog.column("hephaestus_instances", "state");
    assert_eq!((state.data_type.as_str(), state.nullable), ("jsonb", false));
    assert_eq!(
        catalog.column("hephaestus_instances", "revision").data_type,
        "bigint"
    );
    assert_eq!(
        catalog
            .column("hephaestus_instances", "updated_at")
            .data_type,
        "timestamp with time zone"
    );
    let seq = catalog.column("hephaestus_step_results", "seq");
    assert_eq!(
        (seq.data_type.as_str(), seq.identity.as_str()),
        ("bigint", "ALWAYS")
    );
    assert_eq!(
        catalog
            .column("hephaestus_step_results", "inserted_at")
            .default
            .as_deref(),
        Some("clock_timestamp()")
    );
    assert!(
        catalog
            .column("hephaestus_step_results", "processed_at")
            .nullable
    );

    let claim = &catalog
        .index("hephaestus_instances_active_claim_uidx")
        .definition;
    assert!(claim.starts_with("CREATE UNIQUE INDEX"), "{claim}");
    assert!(claim.contains("unique_claim IS NOT NULL"), "{claim}");
    assert!(
        claim.contains("'pending'")
            && claim.contains("'waiting'")
            && !claim.contains("'completed'")
    );
    let dedupe = &catalog
        .index("hephaestus_step_results_activation_uidx")
        .definition;
    assert!(
        dedupe.ends_with(
            "(instance_id, step_id, activation, kind, (\nCASE\n    WHEN (refusal IS NULL) THEN (0)::bigint\n    ELSE seq\nEND))"
        ),
        "a refused row gives up its slot: {dedupe}"
    );
    assert!(
        catalog
            .index("hephaestus_step_results_pending_idx")
            .definition
            .ends_with("(instance_id, seq) WHERE (processed_at IS NULL)")
    );
    for index in [
        "hephaestus_instances_pkey",
        "hephaestus_instances_business_id_idx",
        "hephaestus_instances_workflow_idx",
        "hephaestus_instances_active_status_idx",
        "hephaestus_instances_inserted_at_idx",
        "hephaestus_step_results_pkey",
        "hephaestus_step_results_processed_at_idx",
    ] {
        catalog.index(index);
    }

    let fk = &catalog
        .constraint("hephaestus_step_results_instance_id_fkey")
        .definition;
    assert_eq!(
        fk,
        "FOREIGN KEY (instance_id) REFERENCES hephaestus_instances(id) ON DELETE CASCADE"
    );
    for check in [
        "hephaestus_instances_status_check",
        "hephaestus_instances_workflow_version_check",
        "hephaestus_step_results_kind_check",
        "hephaestus_step_results_activation_check",
    ] {
        assert!(catalog.constraint(check).definition.starts_with("CHECK"));
    }

    assert_eq!(
        recorded_version(&db.pool, &db.prefix, "storage").await,
        version_i32(storage.latest())
    );
    db.teardown().await;
}

#[tokio::test]
async fn down_to_zero_drops_everything_and_up_again_restores_it() {
    let db = TestSchema::new().await;
    up_all(&db.pool, &db.prefix).await;
    let full = describe(&db.pool, db.prefix.as_str()).await;

    for component in registry().components().iter().rev() {
        down(&db.pool, component, &db.prefix, component.latest(), 0).await;
        assert_eq!(
            recorded_version(&db.pool, &db.prefix, component.name()).await,
            0
        );
    }
    let empty = describe(&db.pool, db.prefix.as_str()).await;
    assert_eq!(
        empty.tables,
        vec![VERSIONS_TABLE.to_owned()],
        "down to 0 must drop every table except the shared versions table"
    );
    let rows: i64 = sqlx::query_scalar(&format!(
        "select count(*) from {}",
        db.table(VERSIONS_TABLE)
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows, 0, "down to 0 deletes the component's version row");

    // Down again from 0 is an empty plan, and it is harmless to run.
    for component in registry().components() {
        let script = render_down(component, &db.prefix, 0, 0).unwrap();
        assert!(script.is_empty());
        apply(&db.pool, &script.to_sql()).await.unwrap();
    }

    up_all(&db.pool, &db.prefix).await;
    let again = describe(&db.pool, db.prefix.as_str()).await;
    assert_same_schema(&again, &full, "up after down to 0");
    db.teardown().await;
}

#[tokio::test]
async fn running_an_up_twice_is_idempotent() {
    let db = TestSchema::new().await;
    up_all(&db.pool, &db.prefix).await;
    let first = describe(&db.pool, db.prefix.as_str()).await;

    // The same scripts again, as after a lost version record.
    up_all(&db.pool, &db.prefix).await;
    sqlx::raw_sql(&format!("delete from {}", db.table(VERSIONS_TABLE)))
        .execute(&db.pool)
        .await
        .unwrap();
    up_all(&db.pool, &db.prefix).await;

    let again = describe(&db.pool, db.prefix.as_str()).await;
    assert_same_schema(&again, &first, "up run again");
    for component in registry().components() {
        assert_eq!(
            recorded_version(&db.pool, &db.prefix, component.name()).await,
            version_i32(component.latest())
        );
        // Already at the latest version: an empty plan, harmless to run.
        let script = render_up(
            component,
            &db.prefix,
            component.latest(),
            component.latest(),
        )
        .unwrap();
        assert!(script.is_empty());
        apply(&db.pool, &script.to_sql()).await.unwrap();
    }
    db.teardown().await;
}

#[tokio::test]
async fn partial_ranges_reach_the_same_schema_as_a_full_up() {
    let full = full_catalog().await;
    let components = registry().components().to_vec();
    for (index, component) in components.iter().enumerate() {
        let latest = component.latest();
        for n in 0..=latest {
            // up to n, then n -> latest
            let db = TestSchema::new().await;
            for earlier in &components[..index] {
                up(&db.pool, earlier, &db.prefix, 0, earlier.latest()).await;
            }
            up(&db.pool, component, &db.prefix, 0, n).await;
            assert_eq!(
                recorded_version(&db.pool, &db.prefix, component.name()).await,
                version_i32(n)
            );
            up(&db.pool, component, &db.prefix, n, latest).await;
            for later in &components[index + 1..] {
                up(&db.pool, later, &db.prefix, 0, later.latest()).await;
            }
            assert_same_schema(
                &describe(&db.pool, db.prefix.as_str()).await,
                &full,
                &format!("{} up 0->{n}->{latest}", component.name()),
            );

            // latest -> down to n -> up to latest again (later components first: they
            // may depend on this one)
            for later in components[index + 1..].iter().rev() {
                down(&db.pool, later, &db.prefix, later.latest(), 0).await;
            }
            down(&db.pool, component, &db.prefix, latest, n).await;
            assert_eq!(
                recorded_version(&db.pool, &db.prefix, component.name()).await,
                version_i32(n)
            );
            up(&db.pool, component, &db.prefix, n, latest).await;
            for later in &components[index + 1..] {
                up(&db.pool, later, &db.prefix, 0, later.latest()).await;
            }
            assert_same_schema(
                &describe(&db.pool, db.prefix.as_str()).await,
                &full,
                &format!("{} down {latest}->{n}, up {n}->{latest}", component.name()),
            );
            db.teardown().await;
        }
    }
}

#[tokio::test]
async fn a_reserved_word_prefix_is_quoted_and_nothing_lands_in_public() {
    let db = TestDatabase::new().await;
    let prefix = SchemaPrefix::new("user").unwrap();
    up_all(&db.pool, &prefix).await;

    let catalog = describe(&db.pool, "user").await;
    assert!(catalog.has_table("hephaestus_instances"));
    assert!(catalog.has_table("hephaestus_step_results"));
    assert_eq!(
        recorded_version(&db.pool, &prefix, "storage").await,
        version_i32(storage().latest())
    );
    assert!(
        describe(&db.pool, "public").await.tables.is_empty(),
        "nothing may be created outside the prefix"
    );

    for component in registry().components().iter().rev() {
        down(&db.pool, component, &prefix, component.latest(), 0).await;
    }
    assert_eq!(
        describe(&db.pool, "user").await.tables,
        vec![VERSIONS_TABLE.to_owned()]
    );
    db.teardown().await;
}

async fn insert_instance(
    db: &TestSchema,
    status: &str,
    claim: Option<&str>,
) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    sqlx::query(&format!(
        "insert into {} (id, business_id, workflow_id, workflow_version, status, unique_claim)
         values ($1, 'order::42', 'order_flow', 1, $2, $3)",
        db.table("hephaestus_instances")
    ))
    .bind(id)
    .bind(status)
    .bind(claim)
    .execute(&db.pool)
    .await?;
    Ok(id)
}

async fn insert_result(
    db: &TestSchema,
    instance: Uuid,
    step: &str,
    activation: i32,
    kind: &str,
) -> Result<u64, sqlx::Error> {
    let result = sqlx::query(&format!(
        "insert into {} (instance_id, step_id, activation, kind)
         values ($1, $2, $3, $4)
         on conflict do nothing",
        db.table("hephaestus_step_results")
    ))
    .bind(instance)
    .bind(step)
    .bind(activation)
    .bind(kind)
    .execute(&db.pool)
    .await?;
    Ok(result.rows_affected())
}

#[tokio::test]
async fn only_one_active_instance_per_unique_claim() {
    let db = TestSchema::new().await;
    up_all(&db.pool, &db.prefix).await;

    let first = insert_instance(&db, "pending", Some("order::42"))
        .await
        .unwrap();
    let err = insert_instance(&db, "pending", Some("order::42"))
        .await
        .unwrap_err();
    assert_eq!(
        sql_state(&err),
        (
            "23505".to_owned(),
            "hephaestus_instances_active_claim_uidx".to_owned()
        )
    );
    for active in ["running", "waiting"] {
        assert!(
            insert_instance(&db, active, Some("order::42"))
                .await
                .is_err()
        );
    }

    // Finished instances are history: they do not hold the claim.
    sqlx::query(&format!(
        "update {} set status = 'completed' where id = $1",
        db.table("hephaestus_instances")
    ))
    .bind(first)
    .execute(&db.pool)
    .await
    .unwrap();
    for finished in ["completed", "failed", "cancelled"] {
        insert_instance(&db, finished, Some("order::42"))
            .await
            .unwrap();
    }
    insert_instance(&db, "pending", Some("order::42"))
        .await
        .unwrap();
    assert!(
        insert_instance(&db, "running", Some("order::42"))
            .await
            .is_err()
    );

    // No claim (uniqueness scope none): any number of active instances.
    insert_instance(&db, "pending", None).await.unwrap();
    insert_instance(&db, "pending", None).await.unwrap();
    // Another claim is independent.
    insert_instance(&db, "running", Some("order::43"))
        .await
        .unwrap();
    db.teardown().await;
}

#[tokio::test]
async fn check_constraints_reject_invalid_values() {
    let db = TestSchema::new().await;
    up_all(&db.pool, &db.prefix).await;

    let err = insert_instance(&db, "paused", None).await.unwrap_err();
    assert_eq!(
        sql_state(&err),
        (
            "23514".to_owned(),
            "hephaestus_instances_status_check".to_owned()
        )
    );
    let err = sqlx::query(&format!(
        "insert into {} (id, business_id, workflow_id, workflow_version) values ($1, 'a::b', 'wf', 0)",
        db.table("hephaestus_instances")
    ))
    .bind(Uuid::now_v7())
    .execute(&db.pool)
    .await
    .unwrap_err();
    assert_eq!(
        sql_state(&err).1,
        "hephaestus_instances_workflow_version_check"
    );

    let instance = insert_instance(&db, "running", None).await.unwrap();
    let err = insert_result(&db, instance, "a", 0, "done")
        .await
        .unwrap_err();
    assert_eq!(sql_state(&err).1, "hephaestus_step_results_kind_check");
    let err = insert_result(&db, instance, "a", -1, "completed")
        .await
        .unwrap_err();
    assert_eq!(
        sql_state(&err).1,
        "hephaestus_step_results_activation_check"
    );
    let err = insert_result(&db, Uuid::now_v7(), "a", 0, "completed")
        .await
        .unwrap_err();
    assert_eq!(
        sql_state(&err),
        (
            "23503".to_owned(),
            "hephaestus_step_results_instance_id_fkey".to_owned()
        )
    );
    db.teardown().await;
}

#[tokio::test]
async fn step_results_are_deduplicated_per_activation_and_kind() {
    let db = TestSchema::new().await;
    up_all(&db.pool, &db.prefix).await;
    let instance = insert_instance(&db, "running", None).await.unwrap();

    assert_eq!(
        insert_result(&db, instance, "charge", 0, "completed")
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        insert_result(&db, instance, "charge", 0, "completed")
            .await
            .unwrap(),
        0,
        "a duplicate result for the same activation is ignored"
    );
    // Another kind, activation or step is a different row.
    assert_eq!(
        insert_result(&db, instance, "charge", 0, "async")
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        insert_result(&db, instance, "charge", 1, "completed")
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        insert_result(&db, instance, "ship", 0, "completed")
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        insert_result(&db, instance, "", 0, "cancel").await.unwrap(),
        1
    );

    // Without `on conflict` the unique index reports the duplicate.
    let err = sqlx::query(&format!(
        "insert into {} (instance_id, step_id, activation, kind) values ($1, 'charge', 0, 'completed')",
        db.table("hephaestus_step_results")
    ))
    .bind(instance)
    .execute(&db.pool)
    .await
    .unwrap_err();
    assert_eq!(
        sql_state(&err),
        (
            "23505".to_owned(),
            "hephaestus_step_results_activation_uidx".to_owned()
        )
    );

    // Arrival order is the identity sequence.
    let order: Vec<(i64, String, i32, String)> = sqlx::query_as(&format!(
        "select seq, step_id, activation, kind from {} where instance_id = $1 and processed_at is null order by seq",
        db.table("hephaestus_step_results")
    ))
    .bind(instance)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let steps: Vec<(&str, i32, &str)> = order
        .iter()
        .map(|(_, step, activation, kind)| (step.as_str(), *activation, kind.as_str()))
        .collect();
    assert_eq!(
        steps,
        [
            ("charge", 0, "completed"),
            ("charge", 0, "async"),
            ("charge", 1, "completed"),
            ("ship", 0, "completed"),
            ("", 0, "cancel"),
        ]
    );
    assert!(order.windows(2).all(|w| w[0].0 < w[1].0));
    db.teardown().await;
}

#[tokio::test]
async fn deleting_an_instance_cascades_to_its_step_results() {
    let db = TestSchema::new().await;
    up_all(&db.pool, &db.prefix).await;
    let doomed = insert_instance(&db, "running", None).await.unwrap();
    let kept = insert_instance(&db, "running", None).await.unwrap();
    for instance in [doomed, kept] {
        insert_result(&db, instance, "a", 0, "completed")
            .await
            .unwrap();
        insert_result(&db, instance, "b", 0, "completed")
            .await
            .unwrap();
    }

    sqlx::query(&format!(
        "delete from {} where id = $1",
        db.table("hephaestus_instances")
    ))
    .bind(doomed)
    .execute(&db.pool)
    .await
    .unwrap();

    let remaining: Vec<Uuid> = sqlx::query_scalar(&format!(
        "select instance_id from {} order by seq",
        db.table("hephaestus_step_results")
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(remaining, [kept, kept]);
    db.teardown().await;
}

#[tokio::test]
async fn committed_files_apply_with_the_sqlx_migrator_and_match_the_library() {
    let migrator = Migrator::new(repo_root().join("migrations"))
        .await
        .expect("read migrations/");
    let expected_count = registry()
        .components()
        .iter()
        .map(|c| c.versions().len())
        .sum::<usize>();
    assert_eq!(
        migrator
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .count(),
        expected_count
    );

    let db = TestDatabase::new().await;
    migrator.run(&db.pool).await.expect("sqlx migrator run");
    let applied = describe(&db.pool, "public").await;
    assert_same_schema(
        &applied,
        &full_catalog().await,
        "migrations/ applied by sqlx vs the library",
    );
    let public = SchemaPrefix::default();
    for component in registry().components() {
        assert_eq!(
            recorded_version(&db.pool, &public, component.name()).await,
            version_i32(component.latest())
        );
    }

    // Running again is a no-op; reverting everything drops everything.
    migrator.run(&db.pool).await.expect("second run");
    migrator
        .undo(&db.pool, 0)
        .await
        .expect("sqlx migrator undo to 0");
    let reverted = describe(&db.pool, "public").await;
    assert_eq!(reverted.tables, vec![VERSIONS_TABLE.to_owned()]);
    for component in registry().components() {
        assert_eq!(
            recorded_version(&db.pool, &public, component.name()).await,
            0
        );
    }
    migrator.run(&db.pool).await.expect("run after undo");
    assert_same_schema(
        &describe(&db.pool, "public").await,
        &applied,
        "sqlx run after undo",
    );
    db.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrators_of_one_schema_serialize() {
    // Without the scripts' advisory lock, concurrent `create table if not exists` of the
    // same table can fail with a unique violation in the catalog.
    let db = TestSchema::new().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with(db.pool.connect_options().as_ref().clone())
        .await
        .unwrap();
    let prefix = SchemaPrefix::new(&format!("{}_race", db.prefix)).unwrap();
    let scripts: Vec<String> = registry()
        .components()
        .iter()
        .map(|c| render_up(c, &prefix, 0, c.latest()).unwrap().to_sql())
        .collect();
    let script = scripts.concat();
    let migrators: Vec<_> = (0..4)
        .map(|_| {
            let (pool, script) = (pool.clone(), script.clone());
            // One simple-protocol query: PostgreSQL runs it as one implicit transaction.
            tokio::spawn(async move { sqlx::raw_sql(&script).execute(&pool).await })
        })
        .collect();
    for migrator in migrators {
        migrator
            .await
            .expect("migrator task")
            .expect("a concurrent migrator failed");
    }
    assert_same_schema(
        &describe(&pool, prefix.as_str()).await,
        &full_catalog().await,
        "after concurrent migrators",
    );
    sqlx::raw_sql(&format!("drop schema {} cascade", prefix.quoted()))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    db.teardown().await;
}
