//! Heartbeats, rescue of jobs whose worker stopped heartbeating, pruning
//! of finished jobs, and queue wake-ups.

use chrono::{DateTime, Utc};
use hephaestus_engine_core::instance::AttemptRecord;
use hephaestus_engine_core::ports::{JobId, JobLease};
use sqlx::Row;
use sqlx::types::Json;

use super::PgQueue;
use crate::error::Error;
use crate::job::decode_lease;

/// `$1` ids, `$2` attempts, `$3` now. Returns the leases that still hold.
/// (The state subquery: see `COMPLETE`.)
pub(super) const HEARTBEAT: &str = r"update {prefix}.hephaestus_jobs as j
set heartbeat_at = $3
from unnest($1::bigint[], $2::integer[]) as beat(id, attempt)
where j.id = beat.id and j.attempt = beat.attempt and j.state = (select 'executing'::text)
returning j.id";

/// `$1` heartbeat older than this, `$2` limit.
pub(super) const STALE: &str = r"select {lease_columns}, attempted_by, heartbeat_at
from {prefix}.hephaestus_jobs
where heartbeat_at < $1 and state = 'executing'
order by heartbeat_at
limit $2";

/// `$1` ids, `$2` attempts, `$3` error records (JSON arrays), `$4` now
/// (due again), `$5` stale cut-off (a job that heartbeated meanwhile is
/// left alone).
pub(super) const RESCUE: &str = r"update {prefix}.hephaestus_jobs as j
set state = 'retryable', scheduled_at = $4, errors = j.errors || rescued.record, heartbeat_at = null
from unnest($1::bigint[], $2::integer[], $3::jsonb[]) as rescued(id, attempt, record)
where j.id = rescued.id
  and j.attempt = rescued.attempt
  and j.state = (select 'executing'::text)
  and j.heartbeat_at < $5
returning j.id, j.queue";

/// `$1` ids, `$2` attempts, `$3` error records (JSON arrays), `$4` now.
/// Jobs a graceful shutdown cut off: available again at once. The attempt
/// is not counted against the job's budget (`max_attempts` grows by one,
/// as for a snooze), because the attempt number must stay monotonic: it
/// fences every later update of the job.
pub(super) const RELEASE: &str = r"update {prefix}.hephaestus_jobs as j
set state = 'available', scheduled_at = $4, max_attempts = j.max_attempts + 1,
    errors = j.errors || released.record, heartbeat_at = null
from unnest($1::bigint[], $2::integer[], $3::jsonb[]) as released(id, attempt, record)
where j.id = released.id
  and j.attempt = released.attempt
  and j.state = (select 'executing'::text)
returning j.id, j.queue";

/// `$1` lease name. The holder of an unexpired lease and its deadline.
pub(super) const LEASE_HOLDER: &str = r"select holder, expires_at
from {prefix}.hephaestus_leases
where name = $1 and expires_at >= clock_timestamp()";

/// `$1` finished before, `$2` batch size.
pub(super) const PRUNE: &str = r"with doomed as (
    select id
    from {prefix}.hephaestus_jobs
    where state in ('completed', 'discarded', 'cancelled')
      and coalesce(completed_at, discarded_at, cancelled_at) < $1
    limit $2
    for update skip locked
)
delete from {prefix}.hephaestus_jobs as j
using doomed
where j.id = doomed.id";

/// `$1` groups. Every job of the groups, whatever its state: waiting jobs
/// through the group index, the others (finished jobs the pruner has not
/// deleted yet, executing ones) by a scan of the rest.
pub(super) const DELETE_GROUPS: &str = r"delete from {prefix}.hephaestus_jobs
where group_key = any($1::text[])";

/// `$1` channel, `$2` queues.
pub(super) const NOTIFY_QUEUES: &str =
    r"select count(pg_notify($1::text, 'i:' || queue)) from unnest($2::text[]) as queue";

/// How many finished jobs one prune statement deletes.
const PRUNE_BATCH: i64 = 10_000;

/// An executing job whose heartbeat is older than the rescue cut-off.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StaleJob {
    /// Its lease (the attempt that stopped heartbeating).
    pub lease: JobLease,
    /// The worker process that ran it.
    pub attempted_by: Option<String>,
    /// Its last heartbeat.
    pub heartbeat_at: DateTime<Utc>,
}

impl PgQueue {
    /// Refreshes the heartbeat of running leases in one statement; returns
    /// the ids whose lease still holds (the others were cancelled or
    /// rescued: their workers should stop).
    pub async fn heartbeat(&self, leases: &[(JobId, u32)]) -> Result<Vec<JobId>, Error> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = leases.iter().map(|(id, _)| id.0).collect();
        let attempts: Vec<i32> = leases
            .iter()
            .map(|(_, a)| i32::try_from(*a).unwrap_or(i32::MAX))
            .collect();
        let held: Vec<i64> = sqlx::query_scalar(&self.sql().heartbeat)
            .persistent(self.persistent())
            .bind(&ids)
            .bind(&attempts)
            .bind(self.now())
            .fetch_all(self.db())
            .await?;
        Ok(held.into_iter().map(JobId).collect())
    }

    /// Executing jobs whose last heartbeat is before `before`, oldest first.
    pub async fn stale_jobs(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<StaleJob>, Error> {
        let rows = sqlx::query(&self.sql().stale)
            .persistent(self.persistent())
            .bind(before)
            .bind(i64::from(limit))
            .fetch_all(self.db())
            .await?;
        rows.iter()
            .map(|row| {
                Ok(StaleJob {
                    lease: decode_lease(row)?,
                    attempted_by: row.try_get("attempted_by")?,
                    heartbeat_at: row.try_get("heartbeat_at")?,
                })
            })
            .collect()
    }

    /// Makes stale jobs that have attempts left due again now, recording
    /// why; fenced by attempt and by the heartbeat still being older than
    /// `before`. Wakes their queues. Returns the rescued ids.
    pub async fn rescue(
        &self,
        stale: &[StaleJob],
        before: DateTime<Utc>,
    ) -> Result<Vec<JobId>, Error> {
        if stale.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.now();
        let ids: Vec<i64> = stale.iter().map(|s| s.lease.id.0).collect();
        let attempts: Vec<i32> = stale
            .iter()
            .map(|s| i32::try_from(s.lease.attempt).unwrap_or(i32::MAX))
            .collect();
        let records: Vec<Json<[AttemptRecord; 1]>> = stale
            .iter()
            .map(|s| Json([rescue_record(s, now)]))
            .collect();
        let mut tx = self.pool().begin().await?;
        let rescued: Vec<(i64, String)> = sqlx::query_as(&self.sql().rescue)
            .persistent(self.persistent())
            .bind(&ids)
            .bind(&attempts)
            .bind(&records)
            .bind(now)
            .bind(before)
            .fetch_all(&mut *tx)
            .await?;
        self.wake_and_commit(tx, rescued).await
    }

    /// Wakes the queues of the jobs a statement made available again
    /// (`(id, queue)` rows), commits, and returns their ids.
    async fn wake_and_commit(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        rows: Vec<(i64, String)>,
    ) -> Result<Vec<JobId>, Error> {
        let mut queues: Vec<&str> = rows.iter().map(|(_, q)| q.as_str()).collect();
        queues.sort_unstable();
        queues.dedup();
        if !queues.is_empty() {
            sqlx::query(&self.sql().notify_queues)
                .persistent(self.persistent())
                .bind(self.channel())
                .bind(&queues)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(rows.into_iter().map(|(id, _)| JobId(id)).collect())
    }

    /// Hands executing jobs back to the queue (a graceful shutdown ran out
    /// of time for them): available again now, the interruption recorded in
    /// their errors, and their attempt not counted (`max_attempts` grows by
    /// one; the attempt number stays the fence). Fenced by attempt: a job
    /// settled or rescued meanwhile is left alone. Wakes their queues.
    /// Returns the ids handed back.
    pub async fn release_interrupted(
        &self,
        leases: &[(JobId, u32)],
        worker: &str,
    ) -> Result<Vec<JobId>, Error> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.now();
        let (ids, attempts) = super::settle::lease_columns(leases)?;
        let records: Vec<Json<[AttemptRecord; 1]>> = leases
            .iter()
            .map(|(_, attempt)| {
                Json([AttemptRecord {
                    attempt: *attempt,
                    at: now,
                    error: hephaestus_engine_core::step::StepError::retryable(format!(
                        "interrupted: worker {worker} shut down before the job finished; handed back (the attempt does not count)"
                    )),
                }])
            })
            .collect();
        let mut tx = self.pool().begin().await?;
        let released: Vec<(i64, String)> = sqlx::query_as(&self.sql().release)
            .persistent(self.persistent())
            .bind(&ids)
            .bind(&attempts)
            .bind(&records)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
        self.wake_and_commit(tx, released).await
    }

    /// The runtime holding the maintenance lease (its worker id) and until
    /// when, or `None` when no runtime leads (the lease is free or lapsed).
    pub async fn maintenance_leader(&self) -> Result<Option<(String, DateTime<Utc>)>, Error> {
        Ok(sqlx::query_as(&self.sql().lease_holder)
            .persistent(self.persistent())
            .bind("maintenance")
            .fetch_optional(self.db())
            .await?)
    }

    /// Deletes jobs that finished before `before`, in batches; returns how
    /// many.
    pub async fn prune(&self, before: DateTime<Utc>) -> Result<u64, Error> {
        let mut total = 0;
        loop {
            let deleted = sqlx::query(&self.sql().prune)
                .persistent(self.persistent())
                .bind(before)
                .bind(PRUNE_BATCH)
                .execute(self.db())
                .await?
                .rows_affected();
            total += deleted;
            if deleted < u64::try_from(PRUNE_BATCH).unwrap_or(u64::MAX) {
                return Ok(total);
            }
        }
    }

    /// Deletes every job of `groups` (any state) through `executor`;
    /// returns how many. For retention of what the jobs belonged to (the
    /// runner groups an instance's jobs under its id): run it in the
    /// transaction that deletes the instances.
    pub async fn delete_groups_using<'e, E: sqlx::PgExecutor<'e>>(
        &self,
        executor: E,
        groups: &[String],
    ) -> Result<u64, Error> {
        if groups.is_empty() {
            return Ok(0);
        }
        Ok(sqlx::query(&self.sql().delete_groups)
            .persistent(self.persistent())
            .bind(groups)
            .execute(executor)
            .await?
            .rows_affected())
    }

    /// Wakes the producers of `queues` (at commit when run in a
    /// transaction).
    pub async fn notify_queues(&self, queues: &[&str]) -> Result<(), Error> {
        sqlx::query(&self.sql().notify_queues)
            .persistent(self.persistent())
            .bind(self.channel())
            .bind(queues)
            .execute(self.db())
            .await?;
        Ok(())
    }
}

/// The error recorded for an attempt whose worker stopped heartbeating.
pub(crate) fn rescue_record(stale: &StaleJob, now: DateTime<Utc>) -> AttemptRecord {
    AttemptRecord {
        attempt: stale.lease.attempt,
        at: now,
        error: rescue_error(stale),
    }
}

/// Why a stale job is rescued (or discarded when out of attempts).
pub(crate) fn rescue_error(stale: &StaleJob) -> hephaestus_engine_core::step::StepError {
    hephaestus_engine_core::step::StepError::retryable(format!(
        "rescued: worker {} stopped heartbeating (last heartbeat {})",
        stale.attempted_by.as_deref().unwrap_or("unknown"),
        stale.heartbeat_at.to_rfc3339()
    ))
}
