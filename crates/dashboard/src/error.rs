//! The dashboard's errors: [`Error`] for building a dashboard, and
//! [`PageError`], what a request ends with when it cannot be served (each
//! becomes an HTML page with its HTTP status and a sentence saying what is
//! wrong).

use axum::http::StatusCode;
use hephaestus_engine_core::ports::PortError;
use hephaestus_runner::RunnerError;

/// Why a dashboard cannot be built from its configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Actions are served (not read-only) but no token protects them.
    #[error(
        "the dashboard serves actions only behind a token: give one (--token-file) or make it read-only (--read-only)"
    )]
    ActionsNeedToken,
    /// The token is empty or has characters a header cannot carry.
    #[error("the token must be 16 to 512 visible ASCII characters (no spaces)")]
    BadToken,
    /// The mount path is not `""` or `/segment[/segment...]`.
    #[error(
        "the mount path {0:?} must be empty or start with `/`, not end with `/`, and hold only letters, digits, `-`, `_`, `.` and `/`"
    )]
    BadMountPath(String),
}

/// A request that cannot be served: the page says why.
#[derive(Debug)]
pub(crate) enum PageError {
    /// A parameter is missing or invalid (400); each line names one.
    BadRequest(Vec<String>),
    /// Authentication is needed or failed (401).
    Unauthorized(String),
    /// Refused: a missing or wrong CSRF token, or an action of a read-only
    /// dashboard (403).
    Forbidden(String),
    /// No such instance, job, workflow or page (404).
    NotFound(String),
    /// The page exists, not with this method (405).
    MethodNotAllowed(String),
    /// The action does not apply in the current state (409).
    Conflict(String),
    /// The database cannot be reached (503): the page says the dashboard
    /// recovers by itself.
    Unavailable(String),
    /// Anything else (500): stored data that cannot be decoded.
    Internal(String),
}

impl PageError {
    /// A 400 with one reason.
    pub fn bad(reason: impl Into<String>) -> Self {
        Self::BadRequest(vec![reason.into()])
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The page's title.
    pub fn title(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "Bad request",
            Self::Unauthorized(_) => "Sign in",
            Self::Forbidden(_) => "Refused",
            Self::NotFound(_) => "Not found",
            Self::MethodNotAllowed(_) => "Method not allowed",
            Self::Conflict(_) => "Not possible now",
            Self::Unavailable(_) => "Database unavailable",
            Self::Internal(_) => "Internal error",
        }
    }

    /// The lines that say what is wrong.
    pub fn lines(&self) -> Vec<String> {
        match self {
            Self::BadRequest(lines) => lines.clone(),
            Self::Unauthorized(line)
            | Self::Forbidden(line)
            | Self::NotFound(line)
            | Self::MethodNotAllowed(line)
            | Self::Conflict(line)
            | Self::Internal(line) => vec![line.clone()],
            Self::Unavailable(line) => vec![
                format!("The database cannot be reached: {line}."),
                "Nothing was changed. The dashboard reconnects by itself: reload this page once the database is back.".to_owned(),
            ],
        }
    }

    /// A backend error met while doing `what`.
    pub fn port(what: &str, error: &PortError) -> Self {
        match error {
            PortError::Unavailable(_) => Self::Unavailable(format!("{what}: {error}")),
            PortError::NotFound(_) => Self::NotFound(format!("{what}: {error}")),
            PortError::InvalidInput(_) => Self::bad(format!("{what}: {error}")),
            PortError::Conflict(_)
            | PortError::AlreadyExists(_)
            | PortError::AlreadyRunning { .. } => Self::Conflict(format!("{what}: {error}")),
            _ => Self::Internal(format!("{what}: {error}")),
        }
    }

    /// A queue error met while doing `what`.
    pub fn queue(what: &str, error: &hephaestus_queue_pg::Error) -> Self {
        use hephaestus_queue_pg::Error as Q;
        match error {
            Q::Unavailable(_) => Self::Unavailable(format!("{what}: {error}")),
            Q::NotFound(_) => Self::NotFound(format!("{what}: {error}")),
            Q::InvalidInput(_) => Self::bad(format!("{what}: {error}")),
            Q::Conflict(_) => Self::Conflict(format!("{what}: {error}")),
            _ => Self::Internal(format!("{what}: {error}")),
        }
    }

    /// The runner's typed error of an action, with its own message.
    pub fn runner(what: &str, error: &RunnerError) -> Self {
        let text = format!("{what}: {error}");
        match error {
            RunnerError::NotFound(_) | RunnerError::Registry(_) => Self::NotFound(text),
            RunnerError::NotFailed { .. }
            | RunnerError::AlreadyRunning { .. }
            | RunnerError::NotWaiting { .. }
            | RunnerError::AlreadyResumed(_)
            | RunnerError::Finished(_)
            | RunnerError::TimerAlreadyFinished(_) => Self::Conflict(text),
            RunnerError::BusinessId(_)
            | RunnerError::Id(_)
            | RunnerError::UnknownStep(_)
            | RunnerError::UndeclaredEvent { .. }
            | RunnerError::InvalidInput(_) => Self::BadRequest(vec![text]),
            RunnerError::Backend(port) => Self::port(what, port),
            _ => Self::Internal(text),
        }
    }
}
