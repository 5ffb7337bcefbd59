//! Insert: one statement for a whole batch (UNNEST arrays), unique jobs
//! through the partial unique index, and transactional NOTIFYs: `i:<queue>`
//! per queue with jobs due now, `s:<queue>:<unix ms>` with the earliest due
//! time per queue with scheduled jobs (so producers wake when it arrives
//! instead of at their next poll).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use hephaestus_engine_core::ports::{Enqueued, JobId, JobLease, NewJob};
use serde_json::{Map, Value};
use sqlx::PgConnection;
use sqlx::types::Json;

use super::PgQueue;
use crate::error::Error;
use crate::job::{check_new_job, states_mask, tags_literal};

/// The batch insert, for [`insert_statement`]. Ids are drawn in input order
/// before the insert, so the outcome of every input row is known by id even
/// when `on conflict do nothing` skips it, and the ids of one batch increase
/// in input order. `{on_conflict}`, `{returning}` and `{outcome}` differ
/// between batches with and without unique jobs.
const INSERT_TEMPLATE: &str = r"with input as materialized (
    select nextval('{prefix}.hephaestus_jobs_id_seq') as id, t.*
    from unnest($1::text[], $2::text[], $3::jsonb[], $4::jsonb[], $5::text[], $6::smallint[],
                $7::integer[], $8::timestamptz[], $9::text[], $10::smallint[], $13::text[],
                $14::boolean[])
        with ordinality as t(kind, queue, args, meta, tags, priority, max_attempts, scheduled_at,
                             unique_key, unique_states, group_key, claimed, ord)
),
inserted as (
    insert into {prefix}.hephaestus_jobs
        (id, state, queue, kind, args, meta, tags, priority, max_attempts, inserted_at,
         scheduled_at, unique_key, unique_states, group_key, attempt, attempted_at, attempted_by,
         heartbeat_at)
    select id,
           case when claimed then 'executing'
                when coalesce(scheduled_at, $11::timestamptz) > $11::timestamptz
                then 'scheduled' else 'available' end,
           queue, kind, args, meta, tags::text[], priority, max_attempts, $11::timestamptz,
           coalesce(scheduled_at, $11::timestamptz), unique_key, unique_states, group_key,
           case when claimed then 1 else 0 end,
           case when claimed then $11::timestamptz end,
           case when claimed then $15::text end,
           case when claimed then $11::timestamptz end
    from input
    order by ord{on_conflict}
    returning {returning}
),
notified as (
    select count(pg_notify($12::text, wake)) as n
    from (
        select distinct 'i:' || queue as wake from inserted where state = 'available'
        union all
        select 's:' || queue || ':' || (extract(epoch from min(scheduled_at)) * 1000)::bigint as wake
        from inserted where state = 'scheduled'
        group by queue
    ) as wakes
)
{outcome}
order by input.ord";

/// The batch insert (`$1`..`$15`, see `insert_rows`), still holding the
/// `{prefix}` placeholder. With `unique`, rows whose key is held are skipped
/// (`on conflict do nothing`) and reported as not inserted; without, every
/// row is inserted and no conflict arbiter is checked.
pub(super) fn insert_statement(unique: bool) -> String {
    let (on_conflict, returning, outcome) = if unique {
        (
            "
    on conflict (unique_key)
        where unique_key is not null and {prefix}.hephaestus_jobs_unique_held(unique_states, state)
        do nothing",
            "id, queue, state, scheduled_at",
            "select input.id, inserted.id is not null as inserted, (select n from notified) as notified
from input left join inserted on inserted.id = input.id",
        )
    } else {
        (
            "",
            "queue, state, scheduled_at",
            "select input.id, true as inserted, (select n from notified) as notified
from input",
        )
    };
    INSERT_TEMPLATE
        .replace("{on_conflict}", on_conflict)
        .replace("{returning}", returning)
        .replace("{outcome}", outcome)
}

/// The jobs holding these unique keys (the rows the unique index covers),
/// locked `for share` until the inserting transaction ends: a job merged
/// into its holder may carry work the holder must see (a step result that
/// enqueued its instance's advance), and the claim (`for update skip
/// locked`) passes over a locked holder, so the holder cannot start before
/// the merging transaction's writes are visible. A holder claimed between
/// the conflict and this look-up no longer matches (`unique_held` is
/// rechecked on the newest version) and the job is inserted again. A
/// producer that fetched while the holder was locked passed over it, so an
/// available holder's queue is notified again (`i:<queue>`, delivered when
/// the lock is released at commit).
pub(super) const FIND_UNIQUE: &str = r"select unique_key, id,
       case when state = 'available' then pg_notify($2::text, 'i:' || queue) end is null as quiet
from {prefix}.hephaestus_jobs
where unique_key = any($1::text[])
  and unique_key is not null
  and {prefix}.hephaestus_jobs_unique_held(unique_states, state)
for share";

/// How often a unique insert is retried when the conflicting job left the
/// unique states between the conflict and the look-up.
const UNIQUE_ROUNDS: usize = 5;

impl PgQueue {
    /// Inserts one job (its own transaction).
    pub async fn insert(&self, job: &NewJob) -> Result<Enqueued, Error> {
        let mut out = self.insert_many(std::slice::from_ref(job)).await?;
        out.pop()
            .ok_or_else(|| Error::Corrupt("an insert returned no outcome".to_owned()))
    }

    /// Inserts one job on the caller's connection or transaction.
    pub async fn insert_using(
        &self,
        conn: &mut PgConnection,
        job: &NewJob,
    ) -> Result<Enqueued, Error> {
        let mut out = self
            .insert_many_using(conn, std::slice::from_ref(job))
            .await?;
        out.pop()
            .ok_or_else(|| Error::Corrupt("an insert returned no outcome".to_owned()))
    }

    /// Inserts jobs in one statement (one transaction), in order: one
    /// outcome per job. A unique job whose key is held returns the existing
    /// job (also for a repeated key within the batch).
    pub async fn insert_many(&self, jobs: &[NewJob]) -> Result<Vec<Enqueued>, Error> {
        if jobs.iter().any(|j| j.unique.is_some()) {
            // A conflict needs a second statement: keep both in one transaction.
            let mut tx = self.pool().begin().await?;
            let out = self.insert_many_using(&mut tx, jobs).await?;
            tx.commit().await?;
            Ok(out)
        } else {
            let mut conn = self.pool().acquire().await?;
            self.insert_many_using(&mut conn, jobs).await
        }
    }

    /// [`PgQueue::insert_many`] on the caller's connection or transaction
    /// (`&mut *tx`): the jobs, and their wake-up notification, become
    /// visible when the caller commits.
    pub async fn insert_many_using(
        &self,
        conn: &mut PgConnection,
        jobs: &[NewJob],
    ) -> Result<Vec<Enqueued>, Error> {
        Ok(self
            .insert_claiming_using(conn, jobs, &[], "")
            .await?
            .into_iter()
            .map(|(enqueued, _)| enqueued)
            .collect())
    }

    /// [`PgQueue::insert_many_using`] where the jobs flagged in `claim` are
    /// inserted already claimed by `worker` (executing, attempt 1, heartbeat
    /// started, no wake-up sent): a worker enqueuing work it will run itself
    /// right after its commit. Returns each job's outcome and, for a claimed
    /// job that was inserted, its lease (a unique job merged into an
    /// existing one is not claimed). The claimer must heartbeat and settle
    /// the claimed jobs like fetched ones.
    pub async fn insert_claiming_using(
        &self,
        conn: &mut PgConnection,
        jobs: &[NewJob],
        claim: &[bool],
        worker: &str,
    ) -> Result<Vec<(Enqueued, Option<JobLease>)>, Error> {
        for job in jobs {
            check_new_job(job)?;
        }
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.now();
        let mut outcomes: Vec<Option<Enqueued>> = vec![None; jobs.len()];
        let mut pending: Vec<usize> = (0..jobs.len()).collect();
        for _ in 0..UNIQUE_ROUNDS {
            let batch: Vec<&NewJob> = pending.iter().map(|&i| &jobs[i]).collect();
            let claims: Vec<bool> = pending
                .iter()
                .map(|&i| claim.get(i).copied().unwrap_or(false))
                .collect();
            let rows = self.insert_rows(conn, &batch, &claims, now, worker).await?;
            let mut conflicted: Vec<usize> = Vec::new();
            for (&index, (id, inserted)) in pending.iter().zip(rows) {
                if inserted {
                    outcomes[index] = Some(Enqueued::Inserted(JobId(id)));
                } else {
                    conflicted.push(index);
                }
            }
            if conflicted.is_empty() {
                break;
            }
            let keys: Vec<&str> = conflicted
                .iter()
                .filter_map(|&i| jobs[i].unique.as_ref().map(|u| u.key.as_str()))
                .collect();
            let holders: HashMap<String, i64> =
                sqlx::query_as::<_, (String, i64, bool)>(&self.sql().find_unique)
                    .bind(&keys)
                    .bind(self.channel())
                    .fetch_all(&mut *conn)
                    .await?
                    .into_iter()
                    .map(|(key, id, _)| (key, id))
                    .collect();
            pending.clear();
            for index in conflicted {
                let holder = jobs[index]
                    .unique
                    .as_ref()
                    .and_then(|u| holders.get(&u.key));
                match holder {
                    Some(&id) => outcomes[index] = Some(Enqueued::Existing(JobId(id))),
                    // The holder left its unique states meanwhile: insert again.
                    None => pending.push(index),
                }
            }
            if pending.is_empty() {
                break;
            }
        }
        let outcomes = outcomes
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                Error::Conflict(format!(
                    "unique keys kept changing hands for {UNIQUE_ROUNDS} rounds"
                ))
            })?;
        Ok(outcomes
            .into_iter()
            .zip(jobs)
            .enumerate()
            .map(|(i, (enqueued, job))| {
                let lease = match enqueued {
                    Enqueued::Inserted(id) if claim.get(i).copied().unwrap_or(false) => {
                        Some(JobLease {
                            id,
                            kind: job.kind.clone(),
                            queue: job.queue.clone(),
                            args: job.args.clone(),
                            meta: job.meta.clone(),
                            attempt: 1,
                            max_attempts: job.max_attempts,
                            scheduled_at: job.scheduled_at.unwrap_or(now),
                            errors: Vec::new(),
                        })
                    }
                    _ => None,
                };
                (enqueued, lease)
            })
            .collect())
    }

    /// Runs the batch insert; returns `(id, inserted)` per job, in order.
    async fn insert_rows(
        &self,
        conn: &mut PgConnection,
        jobs: &[&NewJob],
        claims: &[bool],
        now: DateTime<Utc>,
        worker: &str,
    ) -> Result<Vec<(i64, bool)>, Error> {
        let n = jobs.len();
        let mut kinds: Vec<&str> = Vec::with_capacity(n);
        let mut queues: Vec<&str> = Vec::with_capacity(n);
        let mut args: Vec<Json<&Value>> = Vec::with_capacity(n);
        let mut metas: Vec<Json<&Map<String, Value>>> = Vec::with_capacity(n);
        let mut tags: Vec<String> = Vec::with_capacity(n);
        let mut priorities: Vec<i16> = Vec::with_capacity(n);
        let mut max_attempts: Vec<i32> = Vec::with_capacity(n);
        let mut scheduled: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
        let mut unique_keys: Vec<Option<&str>> = Vec::with_capacity(n);
        let mut unique_states: Vec<i16> = Vec::with_capacity(n);
        let mut groups: Vec<Option<&str>> = Vec::with_capacity(n);
        for job in jobs {
            kinds.push(&job.kind);
            queues.push(&job.queue);
            args.push(Json(&job.args));
            metas.push(Json(&job.meta));
            tags.push(tags_literal(&job.tags));
            priorities.push(job.priority);
            // Checked by `check_new_job`.
            max_attempts.push(i32::try_from(job.max_attempts).unwrap_or(i32::MAX));
            scheduled.push(job.scheduled_at);
            unique_keys.push(job.unique.as_ref().map(|u| u.key.as_str()));
            unique_states.push(job.unique.as_ref().map_or(0, |u| states_mask(&u.states)));
            groups.push(job.group.as_deref());
        }
        let sql = if unique_keys.iter().any(Option::is_some) {
            &self.sql().insert
        } else {
            &self.sql().insert_plain
        };
        let rows: Vec<(i64, bool, Option<i64>)> = sqlx::query_as(sql)
            .bind(&kinds)
            .bind(&queues)
            .bind(&args)
            .bind(&metas)
            .bind(&tags)
            .bind(&priorities)
            .bind(&max_attempts)
            .bind(&scheduled)
            .bind(&unique_keys)
            .bind(&unique_states)
            .bind(now)
            .bind(self.channel())
            .bind(&groups)
            .bind(claims)
            .bind(worker)
            .fetch_all(&mut *conn)
            .await?;
        if rows.len() != n {
            return Err(Error::Corrupt(format!(
                "an insert of {n} jobs returned {} rows",
                rows.len()
            )));
        }
        Ok(rows.into_iter().map(|(id, ins, _)| (id, ins)).collect())
    }
}
