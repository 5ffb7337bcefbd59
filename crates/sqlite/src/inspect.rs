//! Operators' reads: instances by time range, an instance's jobs with every
//! column, queue depth, the oldest due job of a queue, recent errors. What
//! `hephaestus instances`, `jobs` and `prune` show on a SQLite file.

use chrono::{DateTime, Utc};
use hephaestus_engine_core::instance::{AttemptRecord, Instance};
use hephaestus_engine_core::ports::{InstanceFilter, JobInfo, JobState, PortError};
use sqlx::Row;

use crate::backend::SqliteBackend;
use crate::error::port_error;
use crate::instances::decode_instance;
use crate::jobs::{JOB_COLUMNS, decode_info};
use crate::time::from_micros;

/// Every column of a job: the port's view and the time of each transition.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct JobRecord {
    /// The port's view (state, attempts, errors, args, ...).
    pub info: JobInfo,
    /// When it was inserted.
    pub inserted_at: DateTime<Utc>,
    /// When the last attempt started.
    pub attempted_at: Option<DateTime<Utc>>,
    /// Who ran the last attempt.
    pub attempted_by: Option<String>,
    /// The last heartbeat of the running attempt.
    pub heartbeat_at: Option<DateTime<Utc>>,
    /// When it completed.
    pub completed_at: Option<DateTime<Utc>>,
    /// When it was discarded.
    pub discarded_at: Option<DateTime<Utc>>,
    /// When it was cancelled.
    pub cancelled_at: Option<DateTime<Utc>>,
    /// Its unique key.
    pub unique_key: Option<String>,
}

/// How many jobs of a queue are in a state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueDepth {
    /// The queue.
    pub queue: String,
    /// The state.
    pub state: JobState,
    /// How many.
    pub count: u64,
}

/// A job's most recent error.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct JobError {
    /// The job.
    pub job: JobInfo,
    /// Its last recorded error.
    pub error: AttemptRecord,
}

fn time_of(
    row: &sqlx::sqlite::SqliteRow,
    column: &str,
) -> Result<Option<DateTime<Utc>>, PortError> {
    let value: Option<i64> = row.try_get(column).map_err(port_error)?;
    value
        .map(|v| from_micros(v).map_err(|e| PortError::Corrupt(format!("{column}: {e}"))))
        .transpose()
}

impl SqliteBackend {
    /// Instances matching `filter`, created in `[since, until)` when given,
    /// newest first. Rows that cannot be decoded are returned apart, with
    /// their id and error, so that one bad row never hides the others.
    pub async fn instances(
        &self,
        filter: &InstanceFilter,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
    ) -> Result<(Vec<Instance>, Vec<(String, String)>), PortError> {
        let mut sql = crate::instances::instance_query(filter, since, until);
        let rows = sql
            .build()
            .fetch_all(&self.shared.pool)
            .await
            .map_err(port_error)?;
        let mut good = Vec::with_capacity(rows.len());
        let mut bad = Vec::new();
        for row in &rows {
            match decode_instance(row) {
                Ok((instance, _)) => good.push(instance),
                Err(e) => bad.push((
                    row.try_get::<String, _>("id").unwrap_or_default(),
                    e.to_string(),
                )),
            }
        }
        Ok((good, bad))
    }

    /// How many instances are active (pending, running or waiting).
    pub async fn active_instances(&self) -> Result<u64, PortError> {
        let n: i64 = sqlx::query_scalar(
            "select count(*) from hephaestus_instances where status in ('pending', 'running', 'waiting')",
        )
        .fetch_one(&self.shared.pool)
        .await
        .map_err(port_error)?;
        Ok(u64::try_from(n).unwrap_or_default())
    }

    /// Every job of `group` (an instance's: its id), finished ones
    /// included, oldest first.
    pub async fn jobs_of_group(&self, group: &str) -> Result<Vec<JobRecord>, PortError> {
        let rows = sqlx::query(&format!(
            "select {JOB_COLUMNS}, inserted_at, attempted_at, attempted_by, heartbeat_at,
                completed_at, discarded_at, cancelled_at, unique_key
             from hephaestus_jobs where group_key = ?1 order by id"
        ))
        .bind(group)
        .fetch_all(&self.shared.pool)
        .await
        .map_err(port_error)?;
        rows.iter()
            .map(|row| {
                Ok(JobRecord {
                    info: decode_info(row)?,
                    inserted_at: time_of(row, "inserted_at")?.unwrap_or_default(),
                    attempted_at: time_of(row, "attempted_at")?,
                    attempted_by: row.try_get("attempted_by").map_err(port_error)?,
                    heartbeat_at: time_of(row, "heartbeat_at")?,
                    completed_at: time_of(row, "completed_at")?,
                    discarded_at: time_of(row, "discarded_at")?,
                    cancelled_at: time_of(row, "cancelled_at")?,
                    unique_key: row.try_get("unique_key").map_err(port_error)?,
                })
            })
            .collect()
    }

    /// How many jobs each queue has in each state.
    pub async fn queue_depth(&self) -> Result<Vec<QueueDepth>, PortError> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "select queue, state, count(*) from hephaestus_jobs group by queue, state order by queue, state",
        )
        .fetch_all(&self.shared.pool)
        .await
        .map_err(port_error)?;
        rows.into_iter()
            .map(|(queue, state, count)| {
                let state = JobState::ALL
                    .into_iter()
                    .find(|s| s.as_str() == state)
                    .ok_or_else(|| PortError::Corrupt(format!("unknown job state {state:?}")))?;
                Ok(QueueDepth {
                    queue,
                    state,
                    count: u64::try_from(count).unwrap_or_default(),
                })
            })
            .collect()
    }

    /// The available job of `queue` due the longest.
    pub async fn oldest_available(&self, queue: &str) -> Result<Option<JobInfo>, PortError> {
        let row = sqlx::query(&format!(
            "select {JOB_COLUMNS} from hephaestus_jobs
             where queue = ?1 and state = 'available'
             order by scheduled_at, id limit 1"
        ))
        .bind(queue)
        .fetch_optional(&self.shared.pool)
        .await
        .map_err(port_error)?;
        row.as_ref().map(decode_info).transpose()
    }

    /// The latest errors of jobs that did not complete, newest first, at
    /// most `limit`.
    pub async fn recent_errors(&self, limit: usize) -> Result<Vec<JobError>, PortError> {
        let rows = sqlx::query(&format!(
            "select {JOB_COLUMNS} from hephaestus_jobs
             where state <> 'completed' and errors <> '[]'
             order by id desc limit ?1"
        ))
        .bind(i64::try_from(limit.saturating_mul(4)).unwrap_or(i64::MAX))
        .fetch_all(&self.shared.pool)
        .await
        .map_err(port_error)?;
        let mut out = Vec::new();
        for row in &rows {
            let job = decode_info(row)?;
            if let Some(error) = job.errors.last().cloned() {
                out.push(JobError { job, error });
            }
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.error.at));
        out.truncate(limit);
        Ok(out)
    }
}
