//! SQLite test databases: each test its own file in a temporary directory,
//! removed after it.

use std::path::PathBuf;

use hephaestus_engine_core::clock::Clock;
use hephaestus_sqlite::{SqliteBackend, SqliteOptions};

/// A temporary directory, removed when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new empty directory under the system's temporary directory.
    pub fn new(label: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "hephaestus-{label}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        Self(dir)
    }

    /// `name` inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A migrated database in a fresh file of its own (`<dir>/test.db`), with
/// `clock` if given; enough connections for the conformance suites' eight
/// concurrent units of work.
pub async fn fresh(dir: &TempDir, clock: Option<impl Clock>) -> SqliteBackend {
    let mut options = SqliteOptions::new(dir.join("test.db")).with_max_connections(20);
    if let Some(clock) = clock {
        options = options.with_clock(clock);
    }
    SqliteBackend::open_migrated(options)
        .await
        .expect("open and migrate a SQLite test database")
}

/// A migrated database in a fresh temporary directory of its own, which
/// [`remove`] deletes.
pub async fn fresh_alone() -> SqliteBackend {
    let dir = TempDir::new("sqlite");
    let backend = fresh(&dir, None::<hephaestus_engine_core::clock::SystemClock>).await;
    // The directory is removed by `remove`, after the case.
    std::mem::forget(dir);
    backend
}

/// Closes a database of [`fresh_alone`] and deletes its directory.
pub async fn remove(backend: SqliteBackend) {
    backend.close().await;
    if let Some(dir) = backend.path().parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}
