//! [`SqliteBackend`]: opening a database file, its options, migration, and
//! the write lock.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hephaestus_engine_core::clock::{Clock, SharedClock, SystemClock};
use hephaestus_engine_core::ports::PortError;
use hephaestus_migrations_gen::{
    SchemaPrefix, render_up, sqlite_current_version_sql, sqlite_versions_table_exists_sql,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};
use tokio::sync::Notify;

use crate::error::{Error, code, primary_code};
use crate::locks::{Locks, Resource};
use crate::schema::{COMPONENT, schema};

/// How durable a commit is (SQLite's `synchronous` pragma, in WAL mode).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=FULL`: every commit is on disk (the write-ahead log is
    /// synced) before it returns. Survives a power loss. The default.
    #[default]
    Full,
    /// `synchronous=NORMAL`: a commit survives the process being killed but
    /// the last ones may be lost in a power loss or an OS crash.
    Normal,
}

/// How to open a SQLite database: [`SqliteOptions::new`] with the file,
/// then the `with_*` methods for what you change (new settings may be added
/// without breaking you).
#[derive(Clone)]
#[non_exhaustive]
pub struct SqliteOptions {
    /// The database file (created, with its tables' directory existing, if
    /// missing).
    pub path: PathBuf,
    /// How durable a commit is.
    pub durability: Durability,
    /// How long a statement waits for another process's write lock (SQLite's
    /// `busy_timeout`), and a unit of work for this process's write lock,
    /// before failing with [`PortError::Unavailable`].
    pub busy_timeout: Duration,
    /// Connections in the pool: units of work that write use one each while
    /// they write, readers one per statement.
    pub max_connections: u32,
    /// Where the backend reads the current time: every time the engine or
    /// the queue decides on (due times, heartbeats, rescue and prune
    /// cut-offs, when a result was recorded) is bound from it, never read
    /// from SQLite. Give the runtime the same one.
    pub clock: SharedClock,
}

impl fmt::Debug for SqliteOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteOptions")
            .field("path", &self.path)
            .field("durability", &self.durability)
            .field("busy_timeout", &self.busy_timeout)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

impl SqliteOptions {
    /// Defaults for the database file `path`: full durability, a 5 s busy
    /// timeout, 16 connections, the wall clock.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            durability: Durability::Full,
            busy_timeout: Duration::from_secs(5),
            max_connections: 16,
            clock: Arc::new(SystemClock),
        }
    }

    /// Options for a `sqlite://PATH` URL (`sqlite:PATH` too): a relative
    /// path is relative to the working directory; `sqlite:///abs/file.db`
    /// is absolute. Query parameters are not accepted.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .ok_or_else(|| Error::InvalidUrl(format!("{url:?} does not start with sqlite://")))?;
        if path.is_empty() {
            return Err(Error::InvalidUrl(format!("{url:?} names no file")));
        }
        if path.contains('?') || path == ":memory:" {
            return Err(Error::InvalidUrl(format!(
                "{url:?}: give the path of a file, without parameters (an in-memory database would not be durable: use the memory backend)"
            )));
        }
        Ok(Self::new(path))
    }

    /// Whether `url` is a SQLite URL (`sqlite:` scheme).
    pub fn is_sqlite_url(url: &str) -> bool {
        url.starts_with("sqlite:")
    }

    /// The same options with `clock`.
    #[must_use]
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The same options with `durability`.
    #[must_use]
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// The same options with `busy_timeout` (see [`SqliteOptions::busy_timeout`]).
    #[must_use]
    pub fn with_busy_timeout(mut self, busy_timeout: Duration) -> Self {
        self.busy_timeout = busy_timeout;
        self
    }

    /// The same options with `max_connections` in the pool (see
    /// [`SqliteOptions::max_connections`]).
    #[must_use]
    pub fn with_max_connections(mut self, max_connections: u32) -> Self {
        self.max_connections = max_connections;
        self
    }
}

/// What the clones of a backend share.
pub(crate) struct Shared {
    pub(crate) pool: SqlitePool,
    pub(crate) path: PathBuf,
    pub(crate) locks: Arc<Locks>,
    pub(crate) clock: SharedClock,
    pub(crate) busy_timeout: Duration,
    /// Woken when a commit enqueued jobs.
    pub(crate) enqueued: Notify,
}

impl Shared {
    pub(crate) fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Takes this process's write lock for `owner`, then SQLite's
    /// (`begin immediate`). Each waits at most the busy timeout.
    pub(crate) async fn begin_immediate(
        &self,
        owner: u64,
    ) -> Result<Transaction<'static, Sqlite>, PortError> {
        let busy = || {
            PortError::Unavailable(
                format!(
                    "the SQLite database {} stayed locked by another writer for {:?}",
                    self.path.display(),
                    self.busy_timeout
                )
                .into(),
            )
        };
        tokio::time::timeout(
            self.busy_timeout,
            self.locks.acquire(owner, Resource::Writer),
        )
        .await
        .map_err(|_| busy())??;
        match self.pool.begin_with("begin immediate").await {
            Ok(tx) => Ok(tx),
            Err(e) => {
                self.locks.release_all(owner);
                Err(match primary_code(&e) {
                    Some(code::BUSY) => busy(),
                    _ => crate::error::port_error(e),
                })
            }
        }
    }

    /// A write transaction of its own (a statement's worth of writing
    /// outside any unit of work: a claim, heartbeats, pruning, migration).
    pub(crate) async fn own_write(&self) -> Result<OwnWrite, PortError> {
        let owner = self.locks.owner();
        let release = ReleaseOnDrop {
            locks: Arc::clone(&self.locks),
            owner,
        };
        let tx = self.begin_immediate(owner).await?;
        Ok(OwnWrite {
            tx: Some(tx),
            _release: release,
        })
    }
}

/// A write transaction outside any unit of work; dropping it rolls back and
/// releases the write lock.
pub(crate) struct OwnWrite {
    tx: Option<Transaction<'static, Sqlite>>,
    // Dropped after `tx` (fields drop in order).
    _release: ReleaseOnDrop,
}

impl OwnWrite {
    /// Its connection.
    pub(crate) fn conn(&mut self) -> &mut sqlx::SqliteConnection {
        // Cannot fail: `tx` is only taken by `commit`, which consumes self.
        self.tx.as_mut().expect("an open write transaction")
    }

    /// Commits and releases the write lock.
    pub(crate) async fn commit(mut self) -> Result<(), sqlx::Error> {
        match self.tx.take() {
            Some(tx) => tx.commit().await,
            None => Ok(()),
        }
    }
}

struct ReleaseOnDrop {
    locks: Arc<Locks>,
    owner: u64,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.locks.release_all(self.owner);
    }
}

/// Instances, step results and jobs in one SQLite file. A cheap handle:
/// clones share the pool and the locks. Open a file once per process and
/// clone the handle (two handles on one file still exclude each other
/// through SQLite's own lock and the instances' fences, only more slowly).
#[derive(Clone)]
pub struct SqliteBackend {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

/// What [`SqliteBackend::migrate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Migrated {
    /// The version recorded before (0: none).
    pub from: u32,
    /// The version recorded now.
    pub to: u32,
}

impl Migrated {
    /// Whether any DDL ran.
    pub fn changed(&self) -> bool {
        self.from != self.to
    }
}

impl SqliteBackend {
    /// Opens (creating it if missing) the database file of `options`, in
    /// WAL mode with the options' durability and busy timeout, and checks
    /// that this build can use it. It does not create the tables: see
    /// [`SqliteBackend::migrate`] (or [`SqliteBackend::open_migrated`]).
    ///
    /// Bad input is a typed error that changes nothing:
    /// [`Error::CannotCreate`] (no such directory, no permission),
    /// [`Error::NotADatabase`], [`Error::ReadOnly`],
    /// [`Error::NewerSchema`] (written by a newer release).
    pub async fn open(options: SqliteOptions) -> Result<Self, Error> {
        let path = options.path.clone();
        check_file(&path)?;
        let connect = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(false)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match options.durability {
                Durability::Full => SqliteSynchronous::Full,
                Durability::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(options.busy_timeout)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections.max(2))
            .min_connections(0)
            // A local file has no connection to lose: no ping (a round trip
            // to the connection's thread) before every statement's acquire.
            .test_before_acquire(false)
            .connect_with(connect)
            .await
            .map_err(|e| open_error(&path, e))?;
        let backend = Self {
            shared: Arc::new(Shared {
                pool,
                path: path.clone(),
                locks: Arc::new(Locks::default()),
                clock: options.clock,
                busy_timeout: options.busy_timeout,
                enqueued: Notify::new(),
            }),
        };
        let version = backend.schema_version().await?;
        let latest = schema().latest();
        if version > latest {
            return Err(Error::NewerSchema {
                path,
                component: COMPONENT,
                found: version,
                supported: latest,
            });
        }
        Ok(backend)
    }

    /// [`SqliteBackend::open`], then [`SqliteBackend::migrate`]: a database
    /// ready to use (the embedded default).
    pub async fn open_migrated(options: SqliteOptions) -> Result<Self, Error> {
        let backend = Self::open(options).await?;
        backend.migrate().await?;
        Ok(backend)
    }

    /// [`SqliteBackend::open`] for a `sqlite://PATH` URL, with default options.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::open(SqliteOptions::from_url(url)?).await
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// The connection pool (for reads of your own; write through the ports).
    pub fn pool(&self) -> &SqlitePool {
        &self.shared.pool
    }

    /// The current time of the backend's clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.shared.now()
    }

    /// Woken (`notify_waiters`) whenever a unit of work that enqueued jobs
    /// commits: the in-process wake-up of a worker loop, instead of
    /// PostgreSQL's LISTEN/NOTIFY. Jobs enqueued by another process are seen
    /// at the next poll.
    pub fn enqueued(&self) -> &Notify {
        &self.shared.enqueued
    }

    /// The version of the SQLite library (compiled in).
    pub async fn sqlite_version(&self) -> Result<String, PortError> {
        sqlx::query_scalar("select sqlite_version()")
            .fetch_one(&self.shared.pool)
            .await
            .map_err(crate::error::port_error)
    }

    /// The schema version recorded in the file (0: not migrated).
    pub async fn schema_version(&self) -> Result<u32, Error> {
        let path = &self.shared.path;
        let exists: bool = sqlx::query_scalar(&sqlite_versions_table_exists_sql())
            .fetch_one(&self.shared.pool)
            .await
            .map_err(|e| open_error(path, e))?;
        if !exists {
            return Ok(0);
        }
        let version: i64 = sqlx::query_scalar(&sqlite_current_version_sql())
            .bind(COMPONENT)
            .fetch_one(&self.shared.pool)
            .await
            .map_err(|e| open_error(path, e))?;
        u32::try_from(version).map_err(|_| Error::NotADatabase { path: path.clone() })
    }

    /// Fails with [`Error::NotMigrated`] unless the file's schema is the one
    /// this build needs (what commands that only read or change instances
    /// check before they start).
    pub async fn check_migrated(&self) -> Result<(), Error> {
        let found = self.schema_version().await?;
        let needed = schema().latest();
        if found < needed {
            return Err(Error::NotMigrated {
                path: self.shared.path.clone(),
                component: COMPONENT,
                found,
                needed,
            });
        }
        Ok(())
    }

    /// Brings the tables from their recorded version to the latest, in one
    /// `begin immediate` transaction (SQLite serializes migrators): the same
    /// SQL `cargo xtask gen-migration` writes into `migrations/sqlite/`.
    /// Running it again is a no-op; a newer schema is
    /// [`Error::NewerSchema`] and is left alone.
    pub async fn migrate(&self) -> Result<Migrated, Error> {
        let component = schema();
        let latest = component.latest();
        let path = &self.shared.path;
        let mut tx = self.shared.own_write().await.map_err(|e| Error::Sqlite {
            path: path.clone(),
            source: sqlx::Error::Protocol(e.to_string()),
        })?;
        let exists: bool = sqlx::query_scalar(&sqlite_versions_table_exists_sql())
            .fetch_one(tx.conn())
            .await
            .map_err(|e| open_error(path, e))?;
        let from = if exists {
            let v: i64 = sqlx::query_scalar(&sqlite_current_version_sql())
                .bind(COMPONENT)
                .fetch_one(tx.conn())
                .await
                .map_err(|e| open_error(path, e))?;
            u32::try_from(v).map_err(|_| Error::NotADatabase { path: path.clone() })?
        } else {
            0
        };
        if from > latest {
            return Err(Error::NewerSchema {
                path: path.clone(),
                component: COMPONENT,
                found: from,
                supported: latest,
            });
        }
        let script = render_up(&component, &SchemaPrefix::default(), from, latest)?;
        if script.is_empty() {
            return Ok(Migrated { from, to: from });
        }
        for statement in script.statements() {
            sqlx::query(statement)
                .execute(tx.conn())
                .await
                .map_err(|e| open_error(path, e))?;
        }
        tx.commit().await.map_err(|e| open_error(path, e))?;
        tracing::info!(path = %path.display(), from, to = latest, "hephaestus SQLite schema migrated");
        Ok(Migrated { from, to: latest })
    }

    /// Takes the tables down to version `to` (0 drops them: what they hold
    /// is lost), in one `begin immediate` transaction. Refused with
    /// [`Error::InUse`] while instances are active, unless `force`.
    pub async fn migrate_down(&self, to: u32, force: bool) -> Result<Migrated, Error> {
        let component = schema();
        let path = &self.shared.path;
        let from = self.schema_version().await?;
        if from > component.latest() {
            return Err(Error::NewerSchema {
                path: path.clone(),
                component: COMPONENT,
                found: from,
                supported: component.latest(),
            });
        }
        let script = hephaestus_migrations_gen::render_down(
            &component,
            &SchemaPrefix::default(),
            from,
            to.min(from),
        )?;
        if script.is_empty() {
            return Ok(Migrated { from, to: from });
        }
        let sqlite = |e: PortError| Error::Sqlite {
            path: path.clone(),
            source: sqlx::Error::Protocol(e.to_string()),
        };
        let mut tx = self.shared.own_write().await.map_err(sqlite)?;
        if !force {
            let active: i64 = sqlx::query_scalar(
                "select count(*) from hephaestus_instances where status in ('pending', 'running', 'waiting')",
            )
            .fetch_one(tx.conn())
            .await
            .map_err(|e| open_error(path, e))?;
            if active > 0 {
                return Err(Error::InUse {
                    path: path.clone(),
                    active: u64::try_from(active).unwrap_or_default(),
                });
            }
        }
        for statement in script.statements() {
            sqlx::query(statement)
                .execute(tx.conn())
                .await
                .map_err(|e| open_error(path, e))?;
        }
        tx.commit().await.map_err(|e| open_error(path, e))?;
        Ok(Migrated { from, to })
    }

    /// Closes the pool (waits for connections in use to come back).
    pub async fn close(&self) {
        self.shared.pool.close().await;
    }
}

/// Checks the file before SQLite opens it: a missing file is created (an
/// empty file is an empty database), so that a path that cannot be created
/// is reported with the operating system's reason; an existing one must be
/// writable.
fn check_file(path: &Path) -> Result<(), Error> {
    match std::fs::metadata(path) {
        Ok(meta) => {
            if meta.is_dir() {
                return Err(Error::CannotCreate {
                    path: path.to_owned(),
                    source: std::io::Error::other("it is a directory"),
                });
            }
            if meta.permissions().readonly() {
                return Err(Error::ReadOnly {
                    path: path.to_owned(),
                    reason: "the file is marked read-only".to_owned(),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map(drop)
            .map_err(|source| Error::CannotCreate {
                path: path.to_owned(),
                source,
            }),
        Err(source) => Err(Error::CannotCreate {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Maps an error of opening or migrating the file.
pub(crate) fn open_error(path: &Path, error: sqlx::Error) -> Error {
    let path = path.to_owned();
    match primary_code(&error) {
        Some(code::NOTADB) => Error::NotADatabase { path },
        Some(code::READONLY) => Error::ReadOnly {
            path,
            reason: error.to_string(),
        },
        Some(code::CANTOPEN) => Error::CannotCreate {
            path,
            source: std::io::Error::other(error.to_string()),
        },
        _ => Error::Sqlite {
            path,
            source: error,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hephaestus_engine_core::clock::ManualClock;

    #[test]
    fn options_new_has_the_documented_defaults() {
        let options = SqliteOptions::new("/tmp/x.db");
        assert_eq!(options.path, PathBuf::from("/tmp/x.db"));
        assert_eq!(options.durability, Durability::Full);
        assert_eq!(options.busy_timeout, Duration::from_secs(5));
        assert_eq!(options.max_connections, 16);
    }

    #[test]
    fn options_setters_set_their_own_field() {
        let at = DateTime::parse_from_rfc3339("2024-05-06T07:08:09Z")
            .unwrap()
            .with_timezone(&Utc);
        let options = SqliteOptions::new("/tmp/x.db")
            .with_durability(Durability::Normal)
            .with_busy_timeout(Duration::from_millis(250))
            .with_max_connections(3)
            .with_clock(ManualClock::new(at));
        assert_eq!(options.path, PathBuf::from("/tmp/x.db"));
        assert_eq!(options.durability, Durability::Normal);
        assert_eq!(options.busy_timeout, Duration::from_millis(250));
        assert_eq!(options.max_connections, 3);
        assert_eq!(options.clock.now(), at);
    }
}
