//! Mapping of driver errors to [`PortError`]: `sqlx::Error` never leaves this crate.

use hephaestus_engine_core::ports::PortError;

/// The unique index that holds business ids unique among active instances.
pub(crate) const ACTIVE_CLAIM_INDEX: &str = "hephaestus_instances_active_claim_uidx";

/// SQLSTATE codes we tell apart.
mod sqlstate {
    pub const UNIQUE_VIOLATION: &str = "23505";
    pub const FOREIGN_KEY_VIOLATION: &str = "23503";
    pub const NOT_NULL_VIOLATION: &str = "23502";
    pub const CHECK_VIOLATION: &str = "23514";
    pub const SERIALIZATION_FAILURE: &str = "40001";
    pub const DEADLOCK_DETECTED: &str = "40P01";
    pub const LOCK_NOT_AVAILABLE: &str = "55P03";
}

/// Maps a driver error to a domain error:
///
/// - unique violation: [`PortError::AlreadyExists`] (callers that can name the holder of
///   an active claim turn the claim index's violation into
///   [`PortError::AlreadyRunning`] before calling this);
/// - foreign-key violation: [`PortError::NotFound`] (the referenced instance);
/// - check, not-null and data exceptions (class 22): [`PortError::InvalidInput`];
/// - serialization failure, deadlock, lock not available: [`PortError::Conflict`];
/// - a row that cannot be decoded: [`PortError::Corrupt`];
/// - everything else (connection, pool, I/O, protocol, server errors):
///   [`PortError::Unavailable`], keeping the source.
pub(crate) fn port_error(error: sqlx::Error) -> PortError {
    match &error {
        sqlx::Error::Database(db) => {
            let code = db
                .code()
                .map(std::borrow::Cow::into_owned)
                .unwrap_or_default();
            let constraint = db.constraint().unwrap_or("unknown").to_owned();
            match code.as_str() {
                sqlstate::UNIQUE_VIOLATION => {
                    PortError::AlreadyExists(format!("a row violating {constraint}"))
                }
                sqlstate::FOREIGN_KEY_VIOLATION => {
                    PortError::NotFound(format!("the row referenced through {constraint}"))
                }
                sqlstate::CHECK_VIOLATION | sqlstate::NOT_NULL_VIOLATION => {
                    PortError::InvalidInput(format!("{constraint}: {}", db.message()))
                }
                sqlstate::SERIALIZATION_FAILURE
                | sqlstate::DEADLOCK_DETECTED
                | sqlstate::LOCK_NOT_AVAILABLE => PortError::Conflict(db.message().to_owned()),
                data if data.starts_with("22") => {
                    PortError::InvalidInput(format!("{} (sqlstate {data})", db.message()))
                }
                _ => PortError::Unavailable(Box::new(error)),
            }
        }
        sqlx::Error::RowNotFound => PortError::NotFound("row".to_owned()),
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. } => PortError::Corrupt(error.to_string()),
        _ => PortError::Unavailable(Box::new(error)),
    }
}

/// The constraint a unique violation is about, if `error` is one.
pub(crate) fn unique_violation(error: &sqlx::Error) -> Option<&str> {
    match error {
        sqlx::Error::Database(db) if db.code().as_deref() == Some(sqlstate::UNIQUE_VIOLATION) => {
            db.constraint()
        }
        _ => None,
    }
}

/// A value that does not fit the column it is stored in.
pub(crate) fn out_of_range(what: &str, value: impl std::fmt::Display) -> PortError {
    PortError::InvalidInput(format!("{what} {value} is out of range for PostgreSQL"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_failures_are_unavailable_or_corrupt() {
        assert!(matches!(
            port_error(sqlx::Error::PoolTimedOut),
            PortError::Unavailable(_)
        ));
        assert!(matches!(
            port_error(sqlx::Error::Io(std::io::Error::other("reset"))),
            PortError::Unavailable(_)
        ));
        assert!(matches!(
            port_error(sqlx::Error::ColumnNotFound("state".to_owned())),
            PortError::Corrupt(_)
        ));
        assert!(matches!(
            port_error(sqlx::Error::RowNotFound),
            PortError::NotFound(_)
        ));
        assert!(unique_violation(&sqlx::Error::PoolClosed).is_none());
    }
}
