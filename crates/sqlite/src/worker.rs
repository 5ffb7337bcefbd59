//! One worker process per database file.
//!
//! A worker takes [`WorkerLock`] before it runs jobs: an exclusive lock on a
//! small file beside the database (`<file>-worker.lock`), held by an open
//! SQLite connection in exclusive locking mode. The operating system drops
//! it when the process ends, however it ends (a `kill -9` included), so the
//! next worker can start at once. A second worker (in another process or in
//! this one) is refused with [`Error::WorkerRunning`].
//!
//! Since at most one worker runs, every job still `executing` when a worker
//! takes the lock belongs to a dead one: the lock marks their heartbeats as
//! long gone, so the new worker's first rescue pass returns them to work
//! (retried, or failed when out of attempts) instead of after the stale
//! timeout.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteLockingMode};
use sqlx::{ConnectOptions, Connection, SqliteConnection};

use crate::backend::{SqliteBackend, open_error};
use crate::error::{Error, code, primary_code};

/// The lock of the one worker of a database file; released when dropped (or
/// when the process ends).
pub struct WorkerLock {
    conn: Option<SqliteConnection>,
    lock_path: PathBuf,
}

impl fmt::Debug for WorkerLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerLock")
            .field("lock_path", &self.lock_path)
            .finish_non_exhaustive()
    }
}

impl WorkerLock {
    /// The lock file.
    pub fn lock_path(&self) -> &Path {
        &self.lock_path
    }

    /// Releases the lock now.
    pub async fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.close().await;
        }
    }
}

/// The lock file of the database file `path`.
pub fn worker_lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-worker.lock");
    PathBuf::from(name)
}

impl SqliteBackend {
    /// Takes the worker lock of this database file, or fails with
    /// [`Error::WorkerRunning`] if another worker holds it; then marks the
    /// jobs a dead worker left executing for rescue (see the module docs).
    pub async fn lock_worker(&self) -> Result<WorkerLock, Error> {
        let path = self.path().to_owned();
        let lock_path = worker_lock_path(&path);
        let running = || Error::WorkerRunning {
            path: path.clone(),
            lock_path: lock_path.clone(),
        };
        let map = |e: sqlx::Error| match primary_code(&e) {
            Some(code::BUSY) => running(),
            _ => open_error(&lock_path, e),
        };
        let mut conn = SqliteConnectOptions::new()
            .filename(&lock_path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Delete)
            .locking_mode(SqliteLockingMode::Exclusive)
            .busy_timeout(Duration::ZERO)
            .connect()
            .await
            .map_err(map)?;
        // The first write takes the file's exclusive lock; in exclusive
        // locking mode it is kept until the connection closes.
        sqlx::query(
            "create table if not exists hephaestus_worker (pid integer not null, started_at text not null)",
        )
        .execute(&mut conn)
        .await
        .map_err(map)?;
        sqlx::query("delete from hephaestus_worker")
            .execute(&mut conn)
            .await
            .map_err(map)?;
        sqlx::query("insert into hephaestus_worker (pid, started_at) values (?1, ?2)")
            .bind(i64::from(std::process::id()))
            .bind(self.now().to_rfc3339())
            .execute(&mut conn)
            .await
            .map_err(map)?;
        let orphans = self.release_orphans().await.map_err(|e| Error::Sqlite {
            path: path.clone(),
            source: sqlx::Error::Protocol(e.to_string()),
        })?;
        if orphans > 0 {
            tracing::warn!(path = %path.display(), jobs = orphans, "jobs left executing by a dead worker are marked for rescue");
        }
        Ok(WorkerLock {
            conn: Some(conn),
            lock_path,
        })
    }
}
