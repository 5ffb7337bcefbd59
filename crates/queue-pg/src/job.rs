//! Job rows as the queue reads them, and the checks a job passes before it
//! is stored.

use chrono::{DateTime, Utc};
use hephaestus_engine_core::instance::AttemptRecord;
use hephaestus_engine_core::ports::{JobId, JobInfo, JobLease, JobState, NewJob, PortError};
use serde_json::{Map, Value};
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::types::Json;

use crate::error::Error;

/// Every column of a job, for inspection: state, attempts, errors and the
/// time of every transition.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The id.
    pub id: JobId,
    /// The state.
    pub state: JobState,
    /// The queue.
    pub queue: String,
    /// The worker kind.
    pub kind: String,
    /// Arguments.
    pub args: Value,
    /// Metadata.
    pub meta: Map<String, Value>,
    /// Tags.
    pub tags: Vec<String>,
    /// Lower runs first.
    pub priority: i16,
    /// Attempts made (the attempt being run while executing).
    pub attempt: u32,
    /// Attempts in all.
    pub max_attempts: u32,
    /// Every failed attempt's error.
    pub errors: Vec<AttemptRecord>,
    /// When it was inserted.
    pub inserted_at: DateTime<Utc>,
    /// When it is (was) due.
    pub scheduled_at: DateTime<Utc>,
    /// When the last attempt started.
    pub attempted_at: Option<DateTime<Utc>>,
    /// Which worker process ran the last attempt.
    pub attempted_by: Option<String>,
    /// The last heartbeat of the running attempt (`None` unless executing).
    pub heartbeat_at: Option<DateTime<Utc>>,
    /// When it completed.
    pub completed_at: Option<DateTime<Utc>>,
    /// When it was discarded.
    pub discarded_at: Option<DateTime<Utc>>,
    /// When it was cancelled.
    pub cancelled_at: Option<DateTime<Utc>>,
    /// Its unique key, if any.
    pub unique_key: Option<String>,
    /// Its group ([`NewJob::group`]), if any.
    pub group: Option<String>,
}

impl Job {
    /// The port's view of the job.
    pub fn info(&self) -> JobInfo {
        JobInfo {
            id: self.id,
            kind: self.kind.clone(),
            queue: self.queue.clone(),
            args: self.args.clone(),
            meta: self.meta.clone(),
            tags: self.tags.clone(),
            priority: self.priority,
            state: self.state,
            attempt: self.attempt,
            max_attempts: self.max_attempts,
            scheduled_at: self.scheduled_at,
            errors: self.errors.clone(),
            group: self.group.clone(),
        }
    }
}

/// The columns [`decode_job`] reads.
pub(crate) const JOB_COLUMNS: &str = "id, state, queue, kind, args, meta, tags, priority, attempt, \
     max_attempts, errors, inserted_at, scheduled_at, attempted_at, attempted_by, heartbeat_at, \
     completed_at, discarded_at, cancelled_at, unique_key, group_key";

/// The columns [`decode_lease`] reads.
pub(crate) const LEASE_COLUMNS: &str =
    "id, kind, queue, args, meta, attempt, max_attempts, scheduled_at, errors";

pub(crate) fn parse_state(state: &str) -> Result<JobState, Error> {
    JobState::ALL
        .into_iter()
        .find(|s| s.as_str() == state)
        .ok_or_else(|| Error::Corrupt(format!("unknown job state {state:?}")))
}

/// The bit of `state` in a unique-states mask (`JobState::ALL` order), as
/// the schema's `hephaestus_jobs_unique_held` function reads it.
pub(crate) fn state_bit(state: JobState) -> i16 {
    match state {
        JobState::Available => 1,
        JobState::Scheduled => 2,
        JobState::Executing => 4,
        JobState::Retryable => 8,
        JobState::Completed => 16,
        JobState::Discarded => 32,
        JobState::Cancelled => 64,
    }
}

pub(crate) fn states_mask(states: &[JobState]) -> i16 {
    states.iter().fold(0, |mask, s| mask | state_bit(*s))
}

fn count(value: i32, what: &str) -> Result<u32, Error> {
    u32::try_from(value).map_err(|_| Error::Corrupt(format!("negative {what} {value}")))
}

pub(crate) fn decode_job(row: &PgRow) -> Result<Job, Error> {
    let state: String = row.try_get("state")?;
    let Json(meta): Json<Map<String, Value>> = row.try_get("meta")?;
    let Json(errors): Json<Vec<AttemptRecord>> = row.try_get("errors")?;
    Ok(Job {
        id: JobId(row.try_get("id")?),
        state: parse_state(&state)?,
        queue: row.try_get("queue")?,
        kind: row.try_get("kind")?,
        args: row.try_get("args")?,
        meta,
        tags: row.try_get("tags")?,
        priority: row.try_get("priority")?,
        attempt: count(row.try_get("attempt")?, "attempt")?,
        max_attempts: count(row.try_get("max_attempts")?, "max_attempts")?,
        errors,
        inserted_at: row.try_get("inserted_at")?,
        scheduled_at: row.try_get("scheduled_at")?,
        attempted_at: row.try_get("attempted_at")?,
        attempted_by: row.try_get("attempted_by")?,
        heartbeat_at: row.try_get("heartbeat_at")?,
        completed_at: row.try_get("completed_at")?,
        discarded_at: row.try_get("discarded_at")?,
        cancelled_at: row.try_get("cancelled_at")?,
        unique_key: row.try_get("unique_key")?,
        group: row.try_get("group_key")?,
    })
}

pub(crate) fn decode_lease(row: &PgRow) -> Result<JobLease, Error> {
    let Json(meta): Json<Map<String, Value>> = row.try_get("meta")?;
    let Json(errors): Json<Vec<AttemptRecord>> = row.try_get("errors")?;
    Ok(JobLease {
        id: JobId(row.try_get("id")?),
        kind: row.try_get("kind")?,
        queue: row.try_get("queue")?,
        args: row.try_get("args")?,
        meta,
        attempt: count(row.try_get("attempt")?, "attempt")?,
        max_attempts: count(row.try_get("max_attempts")?, "max_attempts")?,
        scheduled_at: row.try_get("scheduled_at")?,
        errors,
    })
}

/// Rejects what no backend stores ([`NewJob::check`]) and what PostgreSQL
/// cannot store (U+0000 in the args or meta), with a clear message, before
/// any SQL runs.
pub(crate) fn check_new_job(job: &NewJob) -> Result<(), Error> {
    job.check().map_err(|e| match e {
        PortError::InvalidInput(what) => Error::InvalidInput(what),
        other => Error::InvalidInput(other.to_string()),
    })?;
    let invalid = |what: String| Err(Error::InvalidInput(what));
    if has_nul(&job.args) || job.meta.iter().any(|(k, v)| k.contains('\0') || has_nul(v)) {
        return invalid(format!(
            "U+0000 in the args or meta of a {} job (PostgreSQL cannot store it)",
            job.kind
        ));
    }
    Ok(())
}

/// Whether a JSON value contains U+0000 in a string or key.
pub(crate) fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// Tags as a PostgreSQL array literal (`{"a","b"}`), so a batch of
/// variable-length tag lists travels as one `text[]` of literals.
pub(crate) fn tags_literal(tags: &[String]) -> String {
    let mut out = String::with_capacity(2 + tags.iter().map(|t| t.len() + 3).sum::<usize>());
    out.push('{');
    for (i, tag) in tags.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in tag.chars() {
            if matches!(c, '"' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tags_become_quoted_array_literals() {
        assert_eq!(tags_literal(&[]), "{}");
        assert_eq!(
            tags_literal(&["a".into(), "b c".into(), r#"q"\"#.into(), "NULL".into()]),
            r#"{"a","b c","q\"\\","NULL"}"#
        );
    }

    #[test]
    fn masks_follow_the_state_order() {
        assert_eq!(states_mask(&JobState::ALL), 127);
        assert_eq!(
            states_mask(&[JobState::Available, JobState::Executing]),
            1 | 4
        );
        for (i, state) in JobState::ALL.into_iter().enumerate() {
            assert_eq!(state_bit(state), 1 << i);
            assert_eq!(parse_state(state.as_str()).unwrap(), state);
        }
        assert!(parse_state("nope").is_err());
    }

    #[test]
    fn bad_jobs_are_rejected_before_sql() {
        let ok = NewJob::new("k", "q", json!({"a": [1, "x"]}));
        assert!(check_new_job(&ok).is_ok());
        let mut nul = ok.clone();
        nul.args = json!({"a": ["\u{0}"]});
        assert!(matches!(check_new_job(&nul), Err(Error::InvalidInput(_))));
        let mut key = ok.clone();
        key.meta.insert("k\u{0}".into(), json!(1));
        assert!(check_new_job(&key).is_err());
        let mut zero = ok.clone();
        zero.max_attempts = 0;
        assert!(check_new_job(&zero).is_err());
        let mut huge = ok.clone();
        huge.max_attempts = u32::MAX;
        assert!(check_new_job(&huge).is_err());
        let mut empty = ok;
        empty.queue = String::new();
        assert!(check_new_job(&empty).is_err());
    }
}
