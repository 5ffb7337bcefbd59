//! Fenced updates of a running job: complete (batched), retry, discard,
//! snooze and cancel-by-the-worker. Each holds only while the job is still
//! `executing` at the lease's attempt: a late acknowledgement from a
//! rescued, cancelled or already settled attempt changes nothing and reports
//! `false`.

use chrono::{DateTime, Utc};
use hephaestus_engine_core::instance::AttemptRecord;
use hephaestus_engine_core::ports::{JobId, JobLease};
use hephaestus_engine_core::step::StepError;
use sqlx::PgConnection;
use sqlx::types::Json;

use super::PgQueue;
use crate::error::Error;
use crate::job::has_nul;

/// `$1` ids, `$2` attempts, `$3` now.
///
/// The state is compared with a one-row subquery, not a literal: the
/// statistics of `state` on this hot table are always stale (an `analyze`
/// after a bulk insert says "nothing executes"), and with a literal a
/// generic plan may scan the jobs as the outer side of a nested loop over
/// the input array, one pass of the array per executing job (seconds for
/// thousands). Through the subquery the planner cannot believe that few
/// rows match, so it hashes or probes the primary key per input row.
pub(super) const COMPLETE: &str = r"update {prefix}.hephaestus_jobs as j
set state = 'completed', completed_at = $3, heartbeat_at = null
from unnest($1::bigint[], $2::integer[]) as done(id, attempt)
where j.id = done.id and j.attempt = done.attempt and j.state = (select 'executing'::text)
returning j.id";

/// [`COMPLETE`], deleting the rows instead of keeping them as `completed`,
/// except jobs unique among completed jobs (bit 16 of `unique_states`),
/// which must keep holding their key.
pub(super) const COMPLETE_DELETE: &str = r"with done as (
    select id, attempt from unnest($1::bigint[], $2::integer[]) as input(id, attempt)
),
deleted as (
    delete from {prefix}.hephaestus_jobs as j
    using done
    where j.id = done.id and j.attempt = done.attempt and j.state = (select 'executing'::text)
      and (j.unique_states & 16::smallint) = 0
    returning j.id
),
kept as (
    update {prefix}.hephaestus_jobs as j
    set state = 'completed', completed_at = $3, heartbeat_at = null
    from done
    where j.id = done.id and j.attempt = done.attempt and j.state = (select 'executing'::text)
      and (j.unique_states & 16::smallint) <> 0
    returning j.id
)
select id from deleted
union all
select id from kept";

/// `$1` id, `$2` attempt, `$3` errors to append (a JSON array), `$4` retry
/// at, `$5` channel. Returns how many jobs it settled (0 or 1), and tells
/// the producers of the job's queue when it is due again (at commit).
pub(super) const RETRY: &str = r"with settled as (
    update {prefix}.hephaestus_jobs
    set state = 'retryable', scheduled_at = $4, errors = errors || $3::jsonb, heartbeat_at = null
    where id = $1 and attempt = $2 and state = 'executing'
    returning queue, scheduled_at
)
select count(pg_notify($5::text, 's:' || queue || ':' || (extract(epoch from scheduled_at) * 1000)::bigint))
from settled";

/// `$1` id, `$2` attempt, `$3` errors to append, `$4` now.
pub(super) const DISCARD: &str = r"update {prefix}.hephaestus_jobs
set state = 'discarded', discarded_at = $4, errors = errors || $3::jsonb, heartbeat_at = null
where id = $1 and attempt = $2 and state = 'executing'";

/// `$1` id, `$2` attempt, `$3` due again at, `$4` channel. A snooze does
/// not use up an attempt: the attempt number stays monotonic (it is the
/// fence), so the job gets one more attempt instead. Notifies like
/// [`RETRY`].
pub(super) const SNOOZE: &str = r"with settled as (
    update {prefix}.hephaestus_jobs
    set state = 'scheduled', scheduled_at = $3, max_attempts = max_attempts + 1, heartbeat_at = null
    where id = $1 and attempt = $2 and state = 'executing'
    returning queue, scheduled_at
)
select count(pg_notify($4::text, 's:' || queue || ':' || (extract(epoch from scheduled_at) * 1000)::bigint))
from settled";

/// `$1` id, `$2` attempt, `$3` errors to append, `$4` now.
pub(super) const CANCEL_OWN: &str = r"update {prefix}.hephaestus_jobs
set state = 'cancelled', cancelled_at = $4, errors = errors || $3::jsonb, heartbeat_at = null
where id = $1 and attempt = $2 and state = 'executing'";

/// The result of a fenced batch completion.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settled {
    /// Jobs completed.
    pub completed: Vec<JobId>,
    /// Jobs whose lease no longer held (rescued, cancelled, settled).
    pub fenced_out: Vec<JobId>,
}

fn record_json(
    lease: &JobLease,
    error: &StepError,
    at: DateTime<Utc>,
) -> Result<Json<[AttemptRecord; 1]>, Error> {
    if error.message.contains('\0') || error.details.as_ref().is_some_and(has_nul) {
        return Err(Error::InvalidInput(format!(
            "U+0000 in the error of job {} (PostgreSQL cannot store it)",
            lease.id
        )));
    }
    Ok(Json([AttemptRecord {
        attempt: lease.attempt,
        at,
        error: error.clone(),
    }]))
}

/// The id and attempt columns of a fenced batch update.
pub(super) fn lease_columns(leases: &[(JobId, u32)]) -> Result<(Vec<i64>, Vec<i32>), Error> {
    let ids = leases.iter().map(|(id, _)| id.0).collect();
    let attempts = leases
        .iter()
        .map(|(id, attempt)| {
            i32::try_from(*attempt)
                .map_err(|_| Error::InvalidInput(format!("attempt of job {id} out of range")))
        })
        .collect::<Result<_, _>>()?;
    Ok((ids, attempts))
}

fn attempt_i32(lease: &JobLease) -> Result<i32, Error> {
    i32::try_from(lease.attempt)
        .map_err(|_| Error::InvalidInput(format!("attempt {} out of range", lease.attempt)))
}

impl PgQueue {
    /// Completes many leases in one statement, each fenced by its attempt.
    pub async fn complete_many(&self, leases: &[(JobId, u32)]) -> Result<Settled, Error> {
        let mut conn = self.acquire().await?;
        let settled = self.complete_many_using(&mut conn, leases).await?;
        conn.finish().await?;
        Ok(settled)
    }

    /// [`PgQueue::complete_many`] on the caller's connection or transaction.
    pub async fn complete_many_using(
        &self,
        conn: &mut PgConnection,
        leases: &[(JobId, u32)],
    ) -> Result<Settled, Error> {
        self.complete_leases(conn, leases, &self.sql().complete)
            .await
    }

    /// Completes many leases in one statement (fenced) and deletes their
    /// rows, like a queue without retention (graphile-worker): the fastest
    /// completion, with nothing left to inspect. Jobs unique among
    /// `completed` jobs are kept, so they keep holding their key.
    pub async fn complete_and_delete_many(
        &self,
        leases: &[(JobId, u32)],
    ) -> Result<Settled, Error> {
        let mut conn = self.acquire().await?;
        let settled = self
            .complete_leases(&mut conn, leases, &self.sql().complete_delete)
            .await?;
        conn.finish().await?;
        Ok(settled)
    }

    async fn complete_leases(
        &self,
        conn: &mut PgConnection,
        leases: &[(JobId, u32)],
        sql: &str,
    ) -> Result<Settled, Error> {
        if leases.is_empty() {
            return Ok(Settled::default());
        }
        let (ids, attempts) = lease_columns(leases)?;
        let done: Vec<i64> = sqlx::query_scalar(sql)
            .persistent(self.persistent())
            .bind(&ids)
            .bind(&attempts)
            .bind(self.now())
            .fetch_all(&mut *conn)
            .await?;
        let done: std::collections::HashSet<i64> = done.into_iter().collect();
        let (completed, fenced_out) = leases
            .iter()
            .map(|(id, _)| *id)
            .partition(|id| done.contains(&id.0));
        Ok(Settled {
            completed,
            fenced_out,
        })
    }

    /// Completes one lease (fenced); `false` when it no longer holds.
    pub async fn complete_using(
        &self,
        conn: &mut PgConnection,
        lease: &JobLease,
    ) -> Result<bool, Error> {
        let settled = self
            .complete_many_using(conn, &[(lease.id, lease.attempt)])
            .await?;
        Ok(!settled.completed.is_empty())
    }

    /// Records the failed attempt and makes the job due again at `retry_at`
    /// (state `retryable`); fenced.
    pub async fn retry_using(
        &self,
        conn: &mut PgConnection,
        lease: &JobLease,
        error: &StepError,
        retry_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool, Error> {
        let settled: i64 = sqlx::query_scalar(&self.sql().retry)
            .persistent(self.persistent())
            .bind(lease.id.0)
            .bind(attempt_i32(lease)?)
            .bind(record_json(lease, error, now)?)
            .bind(retry_at)
            .bind(self.channel())
            .fetch_one(&mut *conn)
            .await?;
        Ok(settled == 1)
    }

    /// Records the final error and discards the job; fenced. (The runtime
    /// also runs the discard hook in the same transaction: see
    /// [`crate::DiscardHook`].)
    pub async fn discard_using(
        &self,
        conn: &mut PgConnection,
        lease: &JobLease,
        error: &StepError,
        now: DateTime<Utc>,
    ) -> Result<bool, Error> {
        let done = sqlx::query(&self.sql().discard)
            .persistent(self.persistent())
            .bind(lease.id.0)
            .bind(attempt_i32(lease)?)
            .bind(record_json(lease, error, now)?)
            .bind(now)
            .execute(&mut *conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Puts the job back to `scheduled` until `until` without using up an
    /// attempt (its `max_attempts` grows by one); fenced.
    pub async fn snooze_using(
        &self,
        conn: &mut PgConnection,
        lease: &JobLease,
        until: DateTime<Utc>,
    ) -> Result<bool, Error> {
        let settled: i64 = sqlx::query_scalar(&self.sql().snooze)
            .persistent(self.persistent())
            .bind(lease.id.0)
            .bind(attempt_i32(lease)?)
            .bind(until)
            .bind(self.channel())
            .fetch_one(&mut *conn)
            .await?;
        Ok(settled == 1)
    }

    /// The worker cancels its own job, recording why; fenced.
    pub async fn cancel_lease_using(
        &self,
        conn: &mut PgConnection,
        lease: &JobLease,
        reason: &StepError,
        now: DateTime<Utc>,
    ) -> Result<bool, Error> {
        let done = sqlx::query(&self.sql().cancel_own)
            .persistent(self.persistent())
            .bind(lease.id.0)
            .bind(attempt_i32(lease)?)
            .bind(record_json(lease, reason, now)?)
            .bind(now)
            .execute(&mut *conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}
