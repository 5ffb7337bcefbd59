//! The crate's error type, and the mapping of SQLite's errors to the ports'
//! [`PortError`].

use std::path::PathBuf;

use hephaestus_engine_core::ports::PortError;

/// What can go wrong opening, migrating or locking a SQLite database. Every
/// variant names the file it is about.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL is not a `sqlite://` URL this crate understands.
    #[error("not a SQLite URL: {0}")]
    InvalidUrl(String),
    /// The database file does not exist and cannot be created (a missing
    /// directory, no permission, a read-only file system, ...).
    #[error("cannot create the SQLite database {path}: {source}")]
    CannotCreate {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file exists but is not a SQLite database.
    #[error("{path} is not a SQLite database")]
    NotADatabase {
        /// The file.
        path: PathBuf,
    },
    /// The file (or its directory, where SQLite keeps its write-ahead log)
    /// cannot be written: a backend needs to write even to read (WAL).
    #[error("the SQLite database {path} is read-only: {reason}")]
    ReadOnly {
        /// The file.
        path: PathBuf,
        /// What refused the write.
        reason: String,
    },
    /// The database was migrated by a newer release of Hephaestus: this
    /// build does not know its tables and leaves it untouched.
    #[error(
        "the SQLite database {path} has schema version {found} of {component}, newer than the {supported} this build knows: use a newer hephaestus"
    )]
    NewerSchema {
        /// The file.
        path: PathBuf,
        /// The component (`sqlite`).
        component: &'static str,
        /// The version recorded in the file.
        found: u32,
        /// The latest version this build knows.
        supported: u32,
    },
    /// The database has no Hephaestus tables yet, or older ones: run
    /// [`SqliteBackend::migrate`](crate::SqliteBackend::migrate) (or
    /// `hephaestus migrate`).
    #[error(
        "the SQLite database {path} is at schema version {found} of {component}, this build needs {needed}: run `hephaestus migrate --database-url sqlite://{path_display} up`",
        path_display = path.display()
    )]
    NotMigrated {
        /// The file.
        path: PathBuf,
        /// The component (`sqlite`).
        component: &'static str,
        /// The version recorded (0: none).
        found: u32,
        /// The version this build needs.
        needed: u32,
    },
    /// Another worker process (or another worker in this process) runs jobs
    /// on this database: one worker per file (see the crate docs).
    #[error(
        "another hephaestus worker is running on {path} (it holds {lock_path}); one worker per SQLite file"
    )]
    WorkerRunning {
        /// The database file.
        path: PathBuf,
        /// The lock file the other worker holds.
        lock_path: PathBuf,
    },
    /// A down migration was refused: active instances would lose their
    /// tables.
    #[error(
        "refusing to migrate {path} down: {active} instances are active (a down migration drops tables and what they hold); let them finish or cancel them, or pass --force"
    )]
    InUse {
        /// The file.
        path: PathBuf,
        /// Active instances.
        active: u64,
    },
    /// A rendered migration could not be planned.
    #[error(transparent)]
    Migration(#[from] hephaestus_migrations_gen::Error),
    /// SQLite failed otherwise (busy beyond the busy timeout, I/O error, ...).
    #[error("SQLite database {path}: {source}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
}

impl From<Error> for PortError {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidUrl(_)
            | Error::CannotCreate { .. }
            | Error::NotADatabase { .. }
            | Error::ReadOnly { .. } => PortError::InvalidInput(error.to_string()),
            Error::NewerSchema { .. } | Error::NotMigrated { .. } => {
                PortError::Unavailable(Box::new(error))
            }
            Error::WorkerRunning { .. } | Error::InUse { .. } => {
                PortError::Conflict(error.to_string())
            }
            Error::Migration(e) => PortError::InvalidInput(e.to_string()),
            Error::Sqlite { source, .. } => port_error(source),
        }
    }
}

/// SQLite's primary result codes this crate tells apart.
pub(crate) mod code {
    /// The database file is locked (another connection writes).
    pub(crate) const BUSY: i32 = 5;
    /// A write to a read-only database.
    pub(crate) const READONLY: i32 = 8;
    /// The database file cannot be opened.
    pub(crate) const CANTOPEN: i32 = 14;
    /// The file is not a database.
    pub(crate) const NOTADB: i32 = 26;
}

/// The primary result code of a SQLite error (its extended code's low byte).
pub(crate) fn primary_code(error: &sqlx::Error) -> Option<i32> {
    let sqlx::Error::Database(db) = error else {
        return None;
    };
    let extended: i32 = db.code()?.parse().ok()?;
    Some(extended & 0xff)
}

/// Maps a driver error of a store or queue operation to the ports' error.
pub(crate) fn port_error(error: sqlx::Error) -> PortError {
    match primary_code(&error) {
        Some(code::READONLY) => {
            PortError::Unavailable(format!("the SQLite database is read-only: {error}").into())
        }
        Some(code::NOTADB) => PortError::Corrupt(format!("not a SQLite database: {error}")),
        _ => match &error {
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
                PortError::Corrupt(error.to_string())
            }
            _ => PortError::Unavailable(Box::new(error)),
        },
    }
}

/// A value that does not fit the column it is stored in.
pub(crate) fn out_of_range(what: &str, value: impl std::fmt::Display) -> PortError {
    PortError::InvalidInput(format!("{what} {value} is out of range"))
}
