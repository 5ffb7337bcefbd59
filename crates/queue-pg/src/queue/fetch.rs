//! The claim: ONE statement that picks due jobs with `for update skip
//! locked`, marks them executing, bumps their attempt (the fence of every
//! later update) and starts their heartbeat.

use chrono::{DateTime, Utc};
use hephaestus_engine_core::ports::JobLease;

use super::PgQueue;
use crate::error::Error;
use crate::job::decode_lease;

/// `$1` queue, `$2` now, `$3` limit, `$4` worker id.
///
/// The locked rows are handed to the update by their tuple address
/// (`ctid = any(array(select ctid ... for update skip locked))`): a TID scan
/// reads each row straight from its heap page, with no primary-key descent
/// per job (about a tenth of the drain rate). This is safe because this
/// statement holds the row lock on exactly those tuple versions until it
/// commits, so none of them can be updated, moved or vacuumed meanwhile. A
/// row that the lock step had to follow to a version newer than the
/// statement's snapshot is simply not visible to the TID scan: it stays
/// unclaimed, and the next fetch takes it.
///
/// Joined as a CTE instead, the planner estimated the join from the table's
/// statistics and, with a thousand rows, hashed a sequential scan of the
/// whole jobs table: four times slower on a 100,000-job backlog.
pub(super) const FETCH: &str = r"with claimed as (
    update {prefix}.hephaestus_jobs as j
    set state = 'executing',
        attempt = j.attempt + 1,
        attempted_at = $2,
        heartbeat_at = $2,
        attempted_by = $4
    where j.ctid = any(array(
        select ctid
        from {prefix}.hephaestus_jobs
        where queue = $1
          and state in ('available', 'scheduled', 'retryable')
          and scheduled_at <= $2
        order by priority, scheduled_at, id
        limit $3
        for update skip locked
    ))
    returning j.id, j.kind, j.queue, j.args, j.meta, j.attempt, j.max_attempts,
              j.scheduled_at, j.errors, j.priority
)
select {lease_columns}
from claimed
order by priority, scheduled_at, id";

/// [`FETCH`] across every queue: `$1` now, `$2` limit, `$3` worker id.
pub(super) const FETCH_ANY_QUEUE: &str = r"with claimed as (
    update {prefix}.hephaestus_jobs as j
    set state = 'executing',
        attempt = j.attempt + 1,
        attempted_at = $1,
        heartbeat_at = $1,
        attempted_by = $3
    where j.ctid = any(array(
        select ctid
        from {prefix}.hephaestus_jobs
        where state in ('available', 'scheduled', 'retryable')
          and scheduled_at <= $1
        order by priority, scheduled_at, id
        limit $2
        for update skip locked
    ))
    returning j.id, j.kind, j.queue, j.args, j.meta, j.attempt, j.max_attempts,
              j.scheduled_at, j.errors, j.priority
)
select {lease_columns}
from claimed
order by priority, scheduled_at, id";

impl PgQueue {
    /// Claims up to `limit` jobs of `queue` due at `now` (priority, then due
    /// time, then id), in one statement; `worker` is recorded as
    /// `attempted_by`. Concurrent fetchers never get the same job.
    pub async fn fetch(
        &self,
        queue: &str,
        limit: u32,
        now: DateTime<Utc>,
        worker: &str,
    ) -> Result<Vec<JobLease>, Error> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(&self.sql().fetch)
            .persistent(self.persistent())
            .bind(queue)
            .bind(now)
            .bind(i64::from(limit))
            .bind(worker)
            .fetch_all(self.db())
            .await?;
        rows.iter().map(decode_lease).collect()
    }

    /// [`PgQueue::fetch`] from every queue at once (the test drain).
    pub async fn fetch_any_queue(
        &self,
        limit: u32,
        now: DateTime<Utc>,
        worker: &str,
    ) -> Result<Vec<JobLease>, Error> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(&self.sql().fetch_any_queue)
            .persistent(self.persistent())
            .bind(now)
            .bind(i64::from(limit))
            .bind(worker)
            .fetch_all(self.db())
            .await?;
        rows.iter().map(decode_lease).collect()
    }
}
