//! The crate's error type: driver errors mapped to domain variants.

use hephaestus_engine_core::ports::PortError;

/// A boxed error from user code (a discard hook).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What can go wrong in the queue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The job (or value) cannot be stored: U+0000 in text or JSON, a value
    /// out of range, a violated check constraint.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The row does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A concurrent writer kept winning (for example a unique key that kept
    /// changing hands while inserting).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A stored row cannot be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The database cannot be reached (connection, pool or I/O failure);
    /// retrying may help.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The database rejected a statement.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// The schema migration could not be rendered.
    #[error("migration: {0}")]
    Migration(#[from] hephaestus_migrations_gen::Error),
    /// A discard hook failed; the discard was rolled back.
    #[error("discard hook failed: {0}")]
    DiscardHook(#[source] BoxError),
    /// The runtime configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The runtime is shut down.
    #[error("the queue runtime is shut down")]
    ShutDown,
}

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                // 22xxx: data exception (bad encoding, U+0000, out of range);
                // 23514: check violation.
                if code.starts_with("22") || code == "23514" {
                    Self::InvalidInput(db.message().to_owned())
                } else if code.starts_with("08") || code.starts_with("57P") {
                    // Connection exceptions; admin shutdown / crash.
                    Self::Unavailable(error)
                } else {
                    Self::Database(error)
                }
            }
            sqlx::Error::RowNotFound => Self::NotFound("row".to_owned()),
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
                Self::Corrupt(error.to_string())
            }
            _ => Self::Unavailable(error),
        }
    }
}

impl From<Error> for PortError {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidInput(message) => Self::InvalidInput(message),
            Error::NotFound(what) => Self::NotFound(what),
            Error::Conflict(what) => Self::Conflict(what),
            Error::Corrupt(what) => Self::Corrupt(what),
            other => Self::Unavailable(Box::new(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_errors_map_to_port_errors() {
        assert!(matches!(
            PortError::from(Error::InvalidInput("x".into())),
            PortError::InvalidInput(_)
        ));
        assert!(matches!(
            PortError::from(Error::Conflict("x".into())),
            PortError::Conflict(_)
        ));
        assert!(matches!(
            PortError::from(Error::from(sqlx::Error::PoolTimedOut)),
            PortError::Unavailable(_)
        ));
        assert!(matches!(
            Error::from(sqlx::Error::RowNotFound),
            Error::NotFound(_)
        ));
    }
}
