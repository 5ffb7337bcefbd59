//! Reads: one job, filtered lists, live jobs by args, and queue depth.

use std::fmt::Write as _;

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

pub(super) const DEPTH: &str = r"select queue, state, count(*)
from {prefix}.hephaestus_jobs
group by queue, state
order by queue, state";

/// Which jobs to list: every given condition must hold; ordered by id.
#[derive(Debug, Clone, Default, PartialEq)]
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

/// How many jobs of a queue are in a state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDepth {
    /// The queue.
    pub queue: String,
    /// The state.
    pub state: JobState,
    /// How many.
    pub count: u64,
}

impl PgQueue {
    /// One job with every column.
    pub async fn job(&self, id: JobId) -> Result<Option<Job>, Error> {
        let row = sqlx::query(&self.sql().job)
            .bind(id.0)
            .fetch_optional(self.pool())
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
        let mut query = sqlx::query(&sql);
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
        let rows = query.fetch_all(self.pool()).await?;
        rows.iter().map(decode_job).collect()
    }

    /// Unfinished jobs that `matching` selects, by id (through the group
    /// index when it names a group).
    pub async fn live_jobs(&self, matching: &JobMatch) -> Result<Vec<Job>, Error> {
        let rows = match (&matching.group, &matching.args) {
            (Some(group), args) => {
                sqlx::query(&self.sql().live_by_group)
                    .bind(group)
                    .bind(args)
                    .fetch_all(self.pool())
                    .await?
            }
            (None, args) => {
                sqlx::query(&self.sql().live_by_args)
                    .bind(args)
                    .fetch_all(self.pool())
                    .await?
            }
        };
        rows.iter().map(decode_job).collect()
    }

    /// How many jobs each queue has in each state (states with no job are
    /// left out).
    pub async fn depth(&self) -> Result<Vec<QueueDepth>, Error> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(&self.sql().depth)
            .fetch_all(self.pool())
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
