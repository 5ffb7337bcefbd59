//! Reads: one job, filtered lists, live jobs by args, and queue depth.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use hephaestus_engine_core::ports::{JobId, JobMatch, JobState};
use serde_json::Value;

use super::PgQueue;
use crate::error::Error;
use crate::job::{Job, decode_job, parse_state};

/// `$1` id.
pub(super) const JOB: &str = r"select {job_columns} from {prefix}.hephaestus_jobs where id = $1";

/// `{conditions}` from fixed fragments; the last bind is the limit.
pub(super) const JOBS_BASE: &str =
    r"select {job_columns} from {prefix}.hephaestus_jobs where true{conditions} order by id";

/// `$1` args (containment): waiting jobs through the args index, executing
/// ones through the rescue index.
/// `$1` group, `$2` args (nullable): through the group and rescue indexes.
pub(super) const LIVE_BY_GROUP: &str = r"select {job_columns}
from {prefix}.hephaestus_jobs
where ((group_key = $1 and state in ('available', 'scheduled', 'retryable'))
       or (heartbeat_at is not null and state = 'executing' and group_key = $1))
  and ($2::jsonb is null or args @> $2::jsonb)
order by id";

/// `$1` args (nullable: every unfinished job): scans the unfinished jobs.
pub(super) const LIVE_BY_ARGS: &str = r"select {job_columns}
from {prefix}.hephaestus_jobs
where state in ('available', 'scheduled', 'executing', 'retryable')
  and ($1::jsonb is null or args @> $1::jsonb)
order by id";

/// `$1` since: finished jobs per minute and state, through the prune index.
pub(super) const FINISHED_PER_MINUTE: &str = r"select date_trunc('minute', coalesce(completed_at, discarded_at, cancelled_at)) as minute,
       state, count(*)
from {prefix}.hephaestus_jobs
where state in ('completed', 'discarded', 'cancelled')
  and coalesce(completed_at, discarded_at, cancelled_at) >= $1
group by 1, 2
order by 1, 2";

pub(super) const DEPTH: &str = r"select queue, state, count(*)
from {prefix}.hephaestus_jobs
group by queue, state
order by queue, state";

/// Which jobs to list: every given condition must hold; ordered by id.
/// Start from [`JobFilter::default`] (every job) and add conditions with the
/// `with_*` methods (new conditions may be added without breaking you).
///
/// ```
/// use hephaestus_engine_core::ports::JobState;
/// use hephaestus_queue_pg::JobFilter;
///
/// let oldest_waiting = JobFilter::default()
///     .with_states([JobState::Available])
///     .with_queue("default")
///     .with_limit(1);
/// # let _ = oldest_waiting;
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct JobFilter {
    /// In one of these states (empty = any).
    pub states: Vec<JobState>,
    /// In this queue.
    pub queue: Option<String>,
    /// Of this kind.
    pub kind: Option<String>,
    /// In this group.
    pub group: Option<String>,
    /// Args contain this JSON.
    pub args: Option<Value>,
    /// Meta contains this JSON.
    pub meta: Option<Value>,
    /// Ids strictly above this one (keyset pagination).
    pub after: Option<JobId>,
    /// At most this many.
    pub limit: Option<u32>,
}

impl JobFilter {
    /// Only jobs in one of `states` (see [`JobFilter::states`]).
    #[must_use]
    pub fn with_states(mut self, states: impl IntoIterator<Item = JobState>) -> Self {
        self.states = states.into_iter().collect();
        self
    }

    /// Only jobs in `queue` (see [`JobFilter::queue`]).
    #[must_use]
    pub fn with_queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Only jobs of `kind` (see [`JobFilter::kind`]).
    #[must_use]
    pub fn with_kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = Some(kind.into());
        self
    }

    /// Only jobs in `group` (see [`JobFilter::group`]).
    #[must_use]
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Only jobs whose args contain `args` (see [`JobFilter::args`]).
    #[must_use]
    pub fn with_args(mut self, args: Value) -> Self {
        self.args = Some(args);
        self
    }

    /// Only jobs whose meta contains `meta` (see [`JobFilter::meta`]).
    #[must_use]
    pub fn with_meta(mut self, meta: Value) -> Self {
        self.meta = Some(meta);
        self
    }

    /// Only jobs with an id strictly above `after` (see [`JobFilter::after`]).
    #[must_use]
    pub fn with_after(mut self, after: JobId) -> Self {
        self.after = Some(after);
        self
    }

    /// At most `limit` jobs (see [`JobFilter::limit`]).
    #[must_use]
    pub fn with_limit(mut self, limit: u32) -> Self {
        self.limit = Some(limit);
        self
    }
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

/// How many jobs finished (completed, discarded or cancelled) in one minute.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FinishedCount {
    /// The start of the minute.
    pub minute: DateTime<Utc>,
    /// How they finished: completed, discarded or cancelled.
    pub state: JobState,
    /// How many.
    pub count: u64,
}

/// One recorded error of a job ([`PgQueue::recent_errors`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RecentError {
    /// The job.
    pub job_id: JobId,
    /// Its kind.
    pub kind: String,
    /// Its queue.
    pub queue: String,
    /// Its state now.
    pub state: JobState,
    /// The attempt that failed.
    pub attempt: u32,
    /// When.
    pub at: DateTime<Utc>,
    /// The error's message.
    pub message: String,
}

/// Jobs read per statement while looking for errors.
const ERROR_PAGE: u32 = 500;

impl PgQueue {
    /// One job with every column.
    pub async fn job(&self, id: JobId) -> Result<Option<Job>, Error> {
        let row = sqlx::query(&self.sql().job)
            .persistent(self.persistent())
            .bind(id.0)
            .fetch_optional(self.db())
            .await?;
        row.as_ref().map(decode_job).transpose()
    }

    /// Jobs matching `filter`, by id.
    pub async fn jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, Error> {
        let mut conditions = super::Conditions::new(1);
        if !filter.states.is_empty() {
            conditions.add("state = any(", ")");
        }
        if filter.queue.is_some() {
            conditions.add("queue = ", "");
        }
        if filter.kind.is_some() {
            conditions.add("kind = ", "");
        }
        if filter.group.is_some() {
            conditions.add("group_key = ", "");
        }
        if filter.args.is_some() {
            conditions.add("args @> ", "");
        }
        if filter.meta.is_some() {
            conditions.add("meta @> ", "");
        }
        if filter.after.is_some() {
            conditions.add("id > ", "");
        }
        let mut sql = self
            .sql()
            .jobs_base
            .replace("{conditions}", &conditions.sql);
        if filter.limit.is_some() {
            let _ = write!(sql, " limit ${}", conditions.next);
        }
        let states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
        let mut query = sqlx::query(&sql).persistent(self.persistent());
        if !states.is_empty() {
            query = query.bind(&states);
        }
        if let Some(queue) = &filter.queue {
            query = query.bind(queue);
        }
        if let Some(kind) = &filter.kind {
            query = query.bind(kind);
        }
        if let Some(group) = &filter.group {
            query = query.bind(group);
        }
        if let Some(args) = &filter.args {
            query = query.bind(args);
        }
        if let Some(meta) = &filter.meta {
            query = query.bind(meta);
        }
        if let Some(after) = filter.after {
            query = query.bind(after.0);
        }
        if let Some(limit) = filter.limit {
            query = query.bind(i64::from(limit));
        }
        let rows = query.fetch_all(self.db()).await?;
        rows.iter().map(decode_job).collect()
    }

    /// Unfinished jobs that `matching` selects, by id (through the group
    /// index when it names a group).
    pub async fn live_jobs(&self, matching: &JobMatch) -> Result<Vec<Job>, Error> {
        let rows = match (&matching.group, &matching.args) {
            (Some(group), args) => {
                sqlx::query(&self.sql().live_by_group)
                    .persistent(self.persistent())
                    .bind(group)
                    .bind(args)
                    .fetch_all(self.db())
                    .await?
            }
            (None, args) => {
                sqlx::query(&self.sql().live_by_args)
                    .persistent(self.persistent())
                    .bind(args)
                    .fetch_all(self.db())
                    .await?
            }
        };
        rows.iter().map(decode_job).collect()
    }

    /// How many jobs finished in each minute since `since`, by minute and
    /// state (minutes and states with none left out). Pruned jobs are not
    /// counted.
    pub async fn finished_per_minute(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<FinishedCount>, Error> {
        let rows: Vec<(DateTime<Utc>, String, i64)> =
            sqlx::query_as(&self.sql().finished_per_minute)
                .persistent(self.persistent())
                .bind(since)
                .fetch_all(self.db())
                .await?;
        rows.into_iter()
            .map(|(minute, state, count)| {
                Ok(FinishedCount {
                    minute,
                    state: parse_state(&state)?,
                    count: u64::try_from(count)
                        .map_err(|_| Error::Corrupt(format!("negative count {count}")))?,
                })
            })
            .collect()
    }

    /// The `limit` most recent recorded errors of the jobs that are not
    /// completed (a job that ended well is not a problem, and completed jobs
    /// are most of the table), newest first. Reads those jobs page by page.
    pub async fn recent_errors(&self, limit: usize) -> Result<Vec<RecentError>, Error> {
        let mut found: Vec<RecentError> = Vec::new();
        if limit == 0 {
            return Ok(found);
        }
        let mut filter = JobFilter::default()
            .with_states(
                JobState::ALL
                    .into_iter()
                    .filter(|s| *s != JobState::Completed),
            )
            .with_limit(ERROR_PAGE);
        loop {
            let page = self.jobs(&filter).await?;
            let Some(last) = page.last() else { break };
            filter.after = Some(last.id);
            let full = page.len() == usize::try_from(ERROR_PAGE).unwrap_or(usize::MAX);
            for job in page {
                for record in &job.errors {
                    found.push(RecentError {
                        job_id: job.id,
                        kind: job.kind.clone(),
                        queue: job.queue.clone(),
                        state: job.state,
                        attempt: record.attempt,
                        at: record.at,
                        message: record.error.message.clone(),
                    });
                }
            }
            // Keep only the newest `limit` between pages.
            found.sort_by(|a, b| b.at.cmp(&a.at).then(b.job_id.0.cmp(&a.job_id.0)));
            found.truncate(limit);
            if !full {
                break;
            }
        }
        Ok(found)
    }

    /// How many jobs each queue has in each state (states with no job are
    /// left out).
    pub async fn depth(&self) -> Result<Vec<QueueDepth>, Error> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(&self.sql().depth)
            .persistent(self.persistent())
            .fetch_all(self.db())
            .await?;
        rows.into_iter()
            .map(|(queue, state, count)| {
                Ok(QueueDepth {
                    queue,
                    state: parse_state(&state)?,
                    count: u64::try_from(count)
                        .map_err(|_| Error::Corrupt(format!("negative count {count}")))?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_filter_default_filters_nothing_and_setters_set_their_own_condition() {
        assert_eq!(
            JobFilter::default(),
            JobFilter {
                states: Vec::new(),
                queue: None,
                kind: None,
                group: None,
                args: None,
                meta: None,
                after: None,
                limit: None,
            }
        );
        let filter = JobFilter::default()
            .with_states([JobState::Available, JobState::Retryable])
            .with_queue("q")
            .with_kind("k")
            .with_group("g")
            .with_args(serde_json::json!({"a": 1}))
            .with_meta(serde_json::json!({"m": 2}))
            .with_after(JobId(3))
            .with_limit(4);
        assert_eq!(
            filter,
            JobFilter {
                states: vec![JobState::Available, JobState::Retryable],
                queue: Some("q".to_owned()),
                kind: Some("k".to_owned()),
                group: Some("g".to_owned()),
                args: Some(serde_json::json!({"a": 1})),
                meta: Some(serde_json::json!({"m": 2})),
                after: Some(JobId(3)),
                limit: Some(4),
            }
        );
    }
}
