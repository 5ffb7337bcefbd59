//! The SQLite migrations: the committed files are what migrations-gen
//! renders, sqlx's own migrator applies them, and `migrate` and the files
//! agree.

use hephaestus_migrations_gen::files::{check_dir, render_files};
use hephaestus_migrations_gen::{Registry, SchemaPrefix};
use hephaestus_sqlite::{SqliteBackend, SqliteOptions};
use sqlx::migrate::Migrator;
use sqlx::sqlite::SqliteConnectOptions;

use crate::support::repo_root;
use crate::support::sqlite::TempDir;

#[test]
fn committed_sqlite_migration_files_are_up_to_date() {
    // The same code path as `cargo xtask gen-migration --check`.
    let dir = repo_root().join("migrations").join("sqlite");
    let registry = Registry::new(vec![hephaestus_sqlite::schema()]).expect("a valid registry");
    let files = render_files(&registry, &SchemaPrefix::default()).expect("render files");
    let status = check_dir(&dir, &files).expect("read migrations/sqlite");
    assert!(
        status.is_clean(),
        "{} is out of date:\n{}\nrun `cargo xtask gen-migration` and commit the result",
        dir.display(),
        status.describe()
    );
}

/// Table and index definitions of a database, as SQLite keeps them.
async fn catalog(pool: &sqlx::SqlitePool) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as(
        "select type, name, sql from sqlite_master
         where name not like 'sqlite_%' and name <> '_sqlx_migrations'
         order by type, name",
    )
    .fetch_all(pool)
    .await
    .expect("read the catalog")
}

#[tokio::test]
async fn sqlx_applies_the_files_and_migrate_agrees_with_them() {
    let dir = TempDir::new("sqlite-schema");
    // Through the generated files, with sqlx's migrator.
    let by_files = dir.join("files.db");
    let pool = sqlx::SqlitePool::connect_with(
        SqliteConnectOptions::new()
            .filename(&by_files)
            .create_if_missing(true),
    )
    .await
    .unwrap();
    let migrator = Migrator::new(repo_root().join("migrations").join("sqlite"))
        .await
        .expect("read migrations/sqlite");
    migrator.run(&pool).await.expect("sqlx applies the files");
    let from_files = catalog(&pool).await;
    pool.close().await;

    // Through the backend.
    let backend = SqliteBackend::open(SqliteOptions::new(dir.join("migrate.db")))
        .await
        .unwrap();
    assert_eq!(backend.schema_version().await.unwrap(), 0);
    assert!(backend.check_migrated().await.is_err(), "not migrated yet");
    let migrated = backend.migrate().await.unwrap();
    assert_eq!((migrated.from, migrated.to), (0, 1));
    assert!(migrated.changed());
    assert!(
        !backend.migrate().await.unwrap().changed(),
        "a second migrate is a no-op"
    );
    backend.check_migrated().await.unwrap();
    assert_eq!(
        catalog(backend.pool()).await,
        from_files,
        "same tables and indexes"
    );
    backend.close().await;

    // A database migrated by the files is one the backend can use.
    let reopened = SqliteBackend::open(SqliteOptions::new(&by_files))
        .await
        .unwrap();
    assert_eq!(reopened.schema_version().await.unwrap(), 1);
    reopened.check_migrated().await.unwrap();
    reopened.close().await;

    // And the down file takes everything away but the versions table.
    let pool = sqlx::SqlitePool::connect_with(SqliteConnectOptions::new().filename(&by_files))
        .await
        .unwrap();
    migrator
        .undo(&pool, 0)
        .await
        .expect("sqlx reverts the files");
    let left: Vec<String> = catalog(&pool)
        .await
        .into_iter()
        .filter(|(kind, _, _)| kind == "table")
        .map(|(_, name, _)| name)
        .collect();
    assert_eq!(left, ["hephaestus_schema_versions"]);
    pool.close().await;
}
