//! The job queue: enqueue (unique jobs through the partial unique index),
//! the claim (`begin immediate` and ONE `update .. returning` that marks due
//! jobs executing, bumps their attempt and starts their heartbeat), fenced
//! settlement, heartbeats, rescue of stale jobs, cancel and prune.

use chrono::{DateTime, Utc};
use hephaestus_engine_core::instance::AttemptRecord;
use hephaestus_engine_core::ports::{
    Enqueued, JobId, JobInfo, JobLease, JobMatch, JobQueue, JobState, NewJob, PortError, UnitOfWork,
};
use hephaestus_engine_core::step::StepError;
use serde_json::{Map, Value};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use crate::backend::SqliteBackend;
use crate::error::port_error;
use crate::instances::json_text;
use crate::time::{from_micros, micros};
use crate::tx::SqliteTx;

/// How many finished jobs one `delete` of the pruning removes at most.
const PRUNE_BATCH: i64 = 10_000;

/// The `attempted_by` of jobs claimed through the port.
const WORKER: &str = "sqlite";

const WAITING: &str = "('available', 'scheduled', 'retryable')";
const LIVE: &str = "('available', 'scheduled', 'executing', 'retryable')";

/// The columns [`decode_lease`] and [`decode_info`] read.
pub(crate) const JOB_COLUMNS: &str = "id, kind, queue, args, meta, tags, priority, state, attempt, \
     max_attempts, scheduled_at, errors, group_key";

/// The bit of `state` in a unique-states mask, as the unique index reads it.
pub(crate) fn state_bit(state: JobState) -> i64 {
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

/// The holder of a unique key: the job whose state is among the key's.
const FIND_HOLDER: &str = r"select id from hephaestus_jobs
where unique_key = ?1 and (unique_states & (case state
    when 'available' then 1 when 'scheduled' then 2 when 'executing' then 4
    when 'retryable' then 8 when 'completed' then 16 when 'discarded' then 32
    when 'cancelled' then 64 else 0 end)) <> 0
limit 1";

fn decode_json<T: serde::de::DeserializeOwned>(
    id: i64,
    column: &str,
    text: &str,
) -> Result<T, PortError> {
    serde_json::from_str(text)
        .map_err(|e| PortError::Corrupt(format!("job {id}, column {column}: {e}")))
}

fn int_u32(id: i64, column: &str, value: i64) -> Result<u32, PortError> {
    u32::try_from(value)
        .map_err(|_| PortError::Corrupt(format!("job {id}, column {column}: {value}")))
}

fn decode_lease(row: &SqliteRow) -> Result<JobLease, PortError> {
    Ok(lease_of(decode_info(row)?))
}

fn lease_of(info: JobInfo) -> JobLease {
    JobLease {
        id: info.id,
        kind: info.kind,
        queue: info.queue,
        args: info.args,
        meta: info.meta,
        attempt: info.attempt,
        max_attempts: info.max_attempts,
        scheduled_at: info.scheduled_at,
        errors: info.errors,
    }
}

pub(crate) fn decode_info(row: &SqliteRow) -> Result<JobInfo, PortError> {
    let id: i64 = row.try_get("id").map_err(port_error)?;
    let get = |column: &'static str| {
        move |e: sqlx::Error| PortError::Corrupt(format!("job {id}, column {column}: {e}"))
    };
    let state: String = row.try_get("state").map_err(get("state"))?;
    let state = JobState::ALL
        .into_iter()
        .find(|s| s.as_str() == state)
        .ok_or_else(|| PortError::Corrupt(format!("job {id}: unknown state {state:?}")))?;
    let args: String = row.try_get("args").map_err(get("args"))?;
    let meta: String = row.try_get("meta").map_err(get("meta"))?;
    let tags: String = row.try_get("tags").map_err(get("tags"))?;
    let errors: String = row.try_get("errors").map_err(get("errors"))?;
    let priority: i64 = row.try_get("priority").map_err(get("priority"))?;
    let scheduled_at: i64 = row.try_get("scheduled_at").map_err(get("scheduled_at"))?;
    Ok(JobInfo {
        id: JobId(id),
        kind: row.try_get("kind").map_err(get("kind"))?,
        queue: row.try_get("queue").map_err(get("queue"))?,
        args: decode_json(id, "args", &args)?,
        meta: decode_json::<Map<String, Value>>(id, "meta", &meta)?,
        tags: decode_json(id, "tags", &tags)?,
        priority: i16::try_from(priority)
            .map_err(|_| PortError::Corrupt(format!("job {id}, column priority: {priority}")))?,
        state,
        attempt: int_u32(
            id,
            "attempt",
            row.try_get("attempt").map_err(get("attempt"))?,
        )?,
        max_attempts: int_u32(
            id,
            "max_attempts",
            row.try_get("max_attempts").map_err(get("max_attempts"))?,
        )?,
        scheduled_at: from_micros(scheduled_at)
            .map_err(|e| PortError::Corrupt(format!("job {id}, column scheduled_at: {e}")))?,
        errors: decode_json::<Vec<AttemptRecord>>(id, "errors", &errors)?,
        group: row.try_get("group_key").map_err(get("group_key"))?,
    })
}

/// A job's values as bound by the insert.
pub(crate) struct EncodedJob {
    pub(crate) args: String,
    pub(crate) meta: String,
    pub(crate) tags: String,
}

impl EncodedJob {
    pub(crate) fn of(job: &NewJob) -> Result<Self, PortError> {
        let what = format!("the args or meta of a {} job", job.kind);
        Ok(Self {
            args: json_text(&what, &job.args)?,
            meta: json_text(&what, &job.meta)?,
            tags: json_text("job tags", &job.tags)?,
        })
    }
}

/// Inserts `job`; `None` when its unique key is held (nothing inserted).
async fn insert_job(
    conn: &mut SqliteConnection,
    job: &NewJob,
    now: DateTime<Utc>,
) -> Result<Option<i64>, PortError> {
    let encoded = EncodedJob::of(job)?;
    let scheduled_at = job.scheduled_at.unwrap_or(now);
    let state = if scheduled_at > now {
        JobState::Scheduled
    } else {
        JobState::Available
    };
    sqlx::query_scalar(
        r"insert into hephaestus_jobs (state, queue, kind, args, meta, tags, priority, max_attempts,
    inserted_at, scheduled_at, unique_key, unique_states, group_key)
values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
on conflict do nothing
returning id",
    )
    .bind(state.as_str())
    .bind(&job.queue)
    .bind(&job.kind)
    .bind(&encoded.args)
    .bind(&encoded.meta)
    .bind(&encoded.tags)
    .bind(i64::from(job.priority))
    .bind(i64::from(job.max_attempts))
    .bind(micros(now))
    .bind(micros(scheduled_at))
    .bind(job.unique.as_ref().map(|u| u.key.as_str()))
    .bind(
        job.unique
            .as_ref()
            .map_or(0, |u| u.states.iter().fold(0, |m, s| m | state_bit(*s))),
    )
    .bind(job.group.as_deref())
    .fetch_optional(conn)
    .await
    .map_err(port_error)
}

/// At commit, for a unit of work that merged unique jobs into a holder
/// before it took the write lock: each job whose key is no longer held is
/// inserted now (its holder was claimed meanwhile and may have missed this
/// unit of work's writes).
pub(crate) async fn insert_merged_if_free(
    tx: &mut SqliteTx,
    merged: &[NewJob],
) -> Result<(), PortError> {
    let now = tx.shared.now();
    let conn = tx.writer().await?;
    let mut inserted = false;
    for job in merged {
        if insert_job(&mut *conn, job, now).await?.is_some() {
            inserted = true;
        }
    }
    tx.enqueued |= inserted;
    tx.dirty |= inserted;
    Ok(())
}

/// Ends a write of `tx` that `changed` something or not (see
/// [`SqliteTx::release_if_clean`]); returns `changed`.
async fn settle(tx: &mut SqliteTx, changed: bool) -> Result<bool, PortError> {
    if changed {
        tx.changed();
    } else {
        tx.release_if_clean().await;
    }
    Ok(changed)
}

fn attempt_record(
    lease: &JobLease,
    error: &StepError,
    now: DateTime<Utc>,
) -> Result<String, PortError> {
    json_text(
        &format!("the error of job {}", lease.id),
        &AttemptRecord {
            attempt: lease.attempt,
            at: now,
            error: error.clone(),
        },
    )
}

impl SqliteBackend {
    async fn select_jobs(&self, sql: &str, binds: &[&str]) -> Result<Vec<JobInfo>, PortError> {
        let mut query = sqlx::query(sql);
        for bind in binds {
            query = query.bind(*bind);
        }
        let rows = query
            .fetch_all(&self.shared.pool)
            .await
            .map_err(port_error)?;
        rows.iter().map(decode_info).collect()
    }
}

#[async_trait::async_trait]
impl JobQueue for SqliteBackend {
    async fn enqueue(
        &self,
        tx: &mut SqliteTx,
        jobs: &[NewJob],
    ) -> Result<Vec<Enqueued>, PortError> {
        for job in jobs {
            job.check()?;
            EncodedJob::of(job)?;
        }
        let now = self.shared.now();
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            // A unit of work that writes already tries the insert first (a
            // conflict looks the holder up); one that has not written yet
            // looks first, so that a merge takes no write lock.
            if let (Some(unique), None) = (&job.unique, tx.write.as_ref()) {
                // A holder found before this unit of work writes: merged,
                // and rechecked at commit (see `insert_merged_if_free`).
                let holder: Option<i64> = sqlx::query_scalar(FIND_HOLDER)
                    .bind(&unique.key)
                    .fetch_optional(&self.shared.pool)
                    .await
                    .map_err(port_error)?;
                if let Some(holder) = holder {
                    tx.merged.push(job.clone());
                    out.push(Enqueued::Existing(JobId(holder)));
                    continue;
                }
            }
            let conn = tx.writer().await?;
            if let Some(id) = insert_job(&mut *conn, job, now).await? {
                tx.enqueued = true;
                tx.changed();
                out.push(Enqueued::Inserted(JobId(id)));
            } else {
                // Its key is held: merged into the holder.
                let key = job.unique.as_ref().map(|u| u.key.as_str());
                let holder: Option<i64> = sqlx::query_scalar(FIND_HOLDER)
                    .bind(key)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(port_error)?;
                let holder = holder.ok_or_else(|| {
                    PortError::Conflict(format!(
                        "a {} job conflicted with no holder of its unique key",
                        job.kind
                    ))
                })?;
                // A unit of work that changed something keeps the write
                // lock to its commit: the holder cannot move meanwhile. One
                // that did not may give the lock back: recheck at commit.
                if !tx.dirty {
                    tx.merged.push(job.clone());
                }
                out.push(Enqueued::Existing(JobId(holder)));
            }
        }
        tx.release_if_clean().await;
        Ok(out)
    }

    async fn cancel(&self, tx: &mut SqliteTx, id: JobId) -> Result<bool, PortError> {
        let now = micros(self.shared.now());
        let conn = tx.writer().await?;
        let cancelled = sqlx::query(&format!(
            r"update hephaestus_jobs set state = 'cancelled', cancelled_at = ?2, heartbeat_at = null
where id = ?1 and state in {LIVE}"
        ))
        .bind(id.0)
        .bind(now)
        .execute(conn)
        .await
        .map_err(port_error)?
        .rows_affected();
        settle(tx, cancelled == 1).await
    }

    async fn cancel_matching(
        &self,
        tx: &mut SqliteTx,
        matching: &JobMatch,
        except: Option<JobId>,
    ) -> Result<u64, PortError> {
        let now = micros(self.shared.now());
        let conn = tx.writer().await?;
        // The group index narrows the candidates; args containment is
        // checked here (SQLite has no JSON containment operator).
        let rows =
            match &matching.group {
                Some(group) => sqlx::query(&format!(
                    "select id, args from hephaestus_jobs where group_key = ?1 and state in {LIVE}"
                ))
                .bind(group)
                .fetch_all(&mut *conn)
                .await,
                None => {
                    sqlx::query(&format!(
                        "select id, args from hephaestus_jobs where state in {LIVE}"
                    ))
                    .fetch_all(&mut *conn)
                    .await
                }
            }
            .map_err(port_error)?;
        let mut cancelled = 0_u64;
        for row in rows {
            let id: i64 = row.try_get("id").map_err(port_error)?;
            if except == Some(JobId(id)) {
                continue;
            }
            if let Some(wanted) = &matching.args {
                let args: String = row.try_get("args").map_err(port_error)?;
                let args: Value = decode_json(id, "args", &args)?;
                if !hephaestus_engine_core::ports::json_contains(&args, wanted) {
                    continue;
                }
            }
            cancelled += sqlx::query(
                r"update hephaestus_jobs set state = 'cancelled', cancelled_at = ?2, heartbeat_at = null
where id = ?1",
            )
            .bind(id)
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(port_error)?
            .rows_affected();
        }
        settle(tx, cancelled > 0).await?;
        Ok(cancelled)
    }

    async fn fetch(
        &self,
        queue: &str,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<JobLease>, PortError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = micros(now);
        // Nothing due (an idle poll): no write lock taken.
        let due: bool = sqlx::query_scalar(&format!(
            r"select exists (
    select 1 from hephaestus_jobs
    where queue = ?1 and state in {WAITING} and scheduled_at <= ?2
)"
        ))
        .bind(queue)
        .bind(now)
        .fetch_one(&self.shared.pool)
        .await
        .map_err(port_error)?;
        if !due {
            return Ok(Vec::new());
        }
        let mut write = self.shared.own_write().await?;
        // The claim: one statement under the write lock (`begin immediate`),
        // so no other claimer, in this process or another, sees these jobs
        // as due. The attempt it bumps fences every later update.
        let rows = sqlx::query(&format!(
            r"update hephaestus_jobs
set state = 'executing', attempt = attempt + 1, attempted_at = ?2, heartbeat_at = ?2,
    attempted_by = ?4
where id in (
    select id from hephaestus_jobs
    where queue = ?1 and state in {WAITING} and scheduled_at <= ?2
    order by priority, scheduled_at, id
    limit ?3
)
returning {JOB_COLUMNS}"
        ))
        .bind(queue)
        .bind(now)
        .bind(i64::from(limit))
        .bind(WORKER)
        .fetch_all(write.conn())
        .await
        .map_err(port_error)?;
        write.commit().await.map_err(port_error)?;
        let mut leases = rows
            .iter()
            .map(|row| {
                let priority: i64 = row.try_get("priority").map_err(port_error)?;
                Ok((priority, decode_lease(row)?))
            })
            .collect::<Result<Vec<_>, PortError>>()?;
        // `returning` has no order: the claim's own.
        leases.sort_by_key(|(priority, lease)| (*priority, lease.scheduled_at, lease.id));
        Ok(leases.into_iter().map(|(_, lease)| lease).collect())
    }

    async fn complete(&self, tx: &mut SqliteTx, lease: &JobLease) -> Result<bool, PortError> {
        let now = micros(self.shared.now());
        let conn = tx.writer().await?;
        let done = sqlx::query(
            r"update hephaestus_jobs set state = 'completed', completed_at = ?3, heartbeat_at = null
where id = ?1 and attempt = ?2 and state = 'executing'",
        )
        .bind(lease.id.0)
        .bind(i64::from(lease.attempt))
        .bind(now)
        .execute(conn)
        .await
        .map_err(port_error)?
        .rows_affected();
        settle(tx, done == 1).await
    }

    async fn retry(
        &self,
        tx: &mut SqliteTx,
        lease: &JobLease,
        error: &StepError,
        retry_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool, PortError> {
        end_attempt(tx, lease, error, now, FailedAttempt::RetryAt(retry_at)).await
    }

    async fn discard(
        &self,
        tx: &mut SqliteTx,
        lease: &JobLease,
        error: &StepError,
        now: DateTime<Utc>,
    ) -> Result<bool, PortError> {
        end_attempt(tx, lease, error, now, FailedAttempt::Discard).await
    }

    async fn prune_finished(&self, before: DateTime<Utc>) -> Result<u64, PortError> {
        let mut total = 0_u64;
        loop {
            let mut write = self.shared.own_write().await?;
            let deleted = sqlx::query(
                r"delete from hephaestus_jobs
where id in (
    select id from hephaestus_jobs
    where state in ('completed', 'discarded', 'cancelled')
      and coalesce(completed_at, discarded_at, cancelled_at) < ?1
    limit ?2
)",
            )
            .bind(micros(before))
            .bind(PRUNE_BATCH)
            .execute(write.conn())
            .await
            .map_err(port_error)?
            .rows_affected();
            write.commit().await.map_err(port_error)?;
            total += deleted;
            if deleted < u64::try_from(PRUNE_BATCH).unwrap_or(u64::MAX) {
                return Ok(total);
            }
        }
    }

    async fn heartbeat(&self, leases: &[(JobId, u32)]) -> Result<Vec<JobId>, PortError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let now = micros(self.shared.now());
        let mut write = self.shared.own_write().await?;
        let mut held = Vec::with_capacity(leases.len());
        for (id, attempt) in leases {
            let beat = sqlx::query(
                r"update hephaestus_jobs set heartbeat_at = ?3
where id = ?1 and attempt = ?2 and state = 'executing'",
            )
            .bind(id.0)
            .bind(i64::from(*attempt))
            .bind(now)
            .execute(write.conn())
            .await
            .map_err(port_error)?
            .rows_affected();
            if beat == 1 {
                held.push(*id);
            }
        }
        write.commit().await.map_err(port_error)?;
        Ok(held)
    }

    async fn stale(&self, before: DateTime<Utc>, limit: u32) -> Result<Vec<JobLease>, PortError> {
        let rows = sqlx::query(&format!(
            r"select {JOB_COLUMNS} from hephaestus_jobs
where heartbeat_at < ?1 and state = 'executing'
order by heartbeat_at
limit ?2"
        ))
        .bind(micros(before))
        .bind(i64::from(limit))
        .fetch_all(&self.shared.pool)
        .await
        .map_err(port_error)?;
        rows.iter().map(decode_lease).collect()
    }

    async fn job(&self, id: JobId) -> Result<Option<JobInfo>, PortError> {
        let row = sqlx::query(&format!(
            "select {JOB_COLUMNS} from hephaestus_jobs where id = ?1"
        ))
        .bind(id.0)
        .fetch_optional(&self.shared.pool)
        .await
        .map_err(port_error)?;
        row.as_ref().map(decode_info).transpose()
    }

    async fn live_jobs(&self, matching: &JobMatch) -> Result<Vec<JobInfo>, PortError> {
        let jobs = match &matching.group {
            Some(group) => {
                self.select_jobs(
                    &format!(
                        "select {JOB_COLUMNS} from hephaestus_jobs where group_key = ?1 and state in {LIVE} order by id"
                    ),
                    &[group.as_str()],
                )
                .await?
            }
            None => {
                self.select_jobs(
                    &format!(
                        "select {JOB_COLUMNS} from hephaestus_jobs where state in {LIVE} order by id"
                    ),
                    &[],
                )
                .await?
            }
        };
        Ok(jobs
            .into_iter()
            .filter(|job| matching.matches(job.group.as_deref(), &job.args))
            .collect())
    }
}

#[async_trait::async_trait]
impl UnitOfWork for SqliteBackend {
    type Tx = SqliteTx;

    async fn begin(&self) -> Result<SqliteTx, PortError> {
        Ok(SqliteTx::new(std::sync::Arc::clone(&self.shared)))
    }

    async fn commit(&self, tx: SqliteTx) -> Result<(), PortError> {
        tx.commit().await
    }
}

/// What a failed attempt ends as.
enum FailedAttempt {
    /// Retried at the time given.
    RetryAt(DateTime<Utc>),
    /// Discarded now.
    Discard,
}

/// Ends `lease`'s attempt as `ending`, its error appended to the job's
/// errors, fenced by the attempt; whether it held.
async fn end_attempt(
    tx: &mut SqliteTx,
    lease: &JobLease,
    error: &StepError,
    now: DateTime<Utc>,
    ending: FailedAttempt,
) -> Result<bool, PortError> {
    let record = attempt_record(lease, error, now)?;
    let (statement, at) = match ending {
        FailedAttempt::RetryAt(at) => (
            r"update hephaestus_jobs
set state = 'retryable', scheduled_at = ?4, errors = json_insert(errors, '$[#]', json(?3)),
    heartbeat_at = null
where id = ?1 and attempt = ?2 and state = 'executing'",
            at,
        ),
        FailedAttempt::Discard => (
            r"update hephaestus_jobs
set state = 'discarded', discarded_at = ?4, errors = json_insert(errors, '$[#]', json(?3)),
    heartbeat_at = null
where id = ?1 and attempt = ?2 and state = 'executing'",
            now,
        ),
    };
    let conn = tx.writer().await?;
    let done = sqlx::query(statement)
        .bind(lease.id.0)
        .bind(i64::from(lease.attempt))
        .bind(&record)
        .bind(micros(at))
        .execute(conn)
        .await
        .map_err(port_error)?
        .rows_affected();
    settle(tx, done == 1).await
}
