//! Bad input to the SQLite backend: each a typed error that changes
//! nothing.

use hephaestus_sqlite::{Error, SqliteBackend, SqliteOptions};

use crate::support::sqlite::TempDir;

#[tokio::test]
async fn a_path_that_cannot_be_created_is_a_typed_error() {
    let dir = TempDir::new("sqlite-bad");
    let missing_dir = dir.join("no-such-dir").join("x.db");
    let err = SqliteBackend::open(SqliteOptions::new(&missing_dir))
        .await
        .expect_err("no such directory");
    assert!(
        matches!(&err, Error::CannotCreate { path, .. } if *path == missing_dir),
        "{err:?}"
    );
    assert!(err.to_string().contains("cannot create"), "{err}");
    assert!(!missing_dir.exists());
    // A directory where the file should be.
    let err = SqliteBackend::open(SqliteOptions::new(dir.join("")))
        .await
        .expect_err("a directory");
    assert!(matches!(err, Error::CannotCreate { .. }), "{err:?}");
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_a_typed_error_and_is_left_alone() {
    let dir = TempDir::new("sqlite-bad");
    let path = dir.join("notes.txt");
    let text = "these are my notes, not a database\n".repeat(40);
    std::fs::write(&path, &text).unwrap();
    let err = SqliteBackend::open(SqliteOptions::new(&path))
        .await
        .expect_err("not a database");
    assert!(
        matches!(&err, Error::NotADatabase { path: p } if *p == path),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("is not a SQLite database"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        text,
        "the file is untouched"
    );
}

#[tokio::test]
async fn a_database_of_a_newer_schema_is_a_typed_error_and_is_left_alone() {
    let dir = TempDir::new("sqlite-bad");
    let path = dir.join("newer.db");
    let backend = SqliteBackend::open_migrated(SqliteOptions::new(&path))
        .await
        .unwrap();
    // What a newer release would record.
    sqlx::query("update hephaestus_schema_versions set version = 7 where component = 'sqlite'")
        .execute(backend.pool())
        .await
        .unwrap();
    backend.close().await;
    let err = SqliteBackend::open(SqliteOptions::new(&path))
        .await
        .expect_err("newer schema");
    assert!(
        matches!(
            err,
            Error::NewerSchema {
                found: 7,
                supported: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("use a newer hephaestus"), "{err}");
    // Still version 7: nothing was migrated down or over.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let version: i64 = sqlx::query_scalar(
        "select version from hephaestus_schema_versions where component = 'sqlite'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(version, 7);
    pool.close().await;
}

#[tokio::test]
async fn a_read_only_file_is_a_typed_error_and_is_left_alone() {
    let dir = TempDir::new("sqlite-bad");
    let path = dir.join("frozen.db");
    let backend = SqliteBackend::open_migrated(SqliteOptions::new(&path))
        .await
        .unwrap();
    backend.close().await;
    // The last connection's close checkpoints the WAL into the file and
    // removes the WAL; that can finish after `close` returns.
    let wal = dir.join("frozen.db-wal");
    crate::support::wait::until_holds(
        "the closed file's last checkpoint (its WAL removed)",
        || !wal.exists(),
    )
    .await;
    let before = std::fs::read(&path).unwrap();
    let mut permissions = std::fs::metadata(&path).unwrap().permissions();
    permissions.set_readonly(true);
    std::fs::set_permissions(&path, permissions.clone()).unwrap();
    let err = SqliteBackend::open(SqliteOptions::new(&path))
        .await
        .expect_err("read-only");
    assert!(matches!(&err, Error::ReadOnly { .. }), "{err:?}");
    assert!(err.to_string().contains("is read-only"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file is untouched"
    );
    #[allow(clippy::permissions_set_readonly_false)]
    permissions.set_readonly(false);
    std::fs::set_permissions(&path, permissions).unwrap();
}

#[test]
fn urls_are_checked() {
    assert_eq!(
        SqliteOptions::from_url("sqlite://data/app.db")
            .unwrap()
            .path,
        std::path::PathBuf::from("data/app.db")
    );
    assert_eq!(
        SqliteOptions::from_url("sqlite:///var/lib/app.db")
            .unwrap()
            .path,
        std::path::PathBuf::from("/var/lib/app.db")
    );
    for bad in [
        "postgres://x/y",
        "sqlite://",
        "sqlite://:memory:",
        "sqlite://a.db?mode=ro",
    ] {
        assert!(
            matches!(SqliteOptions::from_url(bad), Err(Error::InvalidUrl(_))),
            "{bad}"
        );
    }
}
