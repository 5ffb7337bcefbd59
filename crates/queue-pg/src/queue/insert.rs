//! Insert: one statement for a whole batch (UNNEST arrays), unique jobs
//! through the partial unique index, and transactional NOTIFYs: `i:<queue>`
//! per queue with jobs due now, `s:<queue>:<unix ms>` with the earliest due
//! time per queue with scheduled jobs (so producers wake when it arrives
//! instead of at their next poll).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use hephaestus_engine_core::ports::{Enqueued, JobId, JobLease, NewJob};
use serde_json::{Map, Value};
use sqlx::types::Json;
use sqlx::{PgConnection, Row};

use super::PgQueue;
use super::settle::Settled;
use crate::error::Error;
use crate::job::{check_new_job, states_mask, tags_literal};

/// The batch insert, for [`insert_statement`]. Ids are drawn in input order
/// before the insert, so the outcome of every input row is known by id even
/// when `on conflict do nothing` skips it, and the ids of one batch increase
/// in input order. `{on_conflict}`, `{returning}` and `{outcome}` differ
/// between batches with and without unique jobs; `{complete}` and
/// `{completed}` add the fenced completion of other jobs (`$16` ids, `$17`
/// attempts) to the same statement.
const INSERT_TEMPLATE: &str = r"with {complete}input as materialized (
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

/// The completion CTE of a combined statement: [`super::settle::COMPLETE`]
/// with `$11` as now.
const COMPLETE_CTE: &str = r"completed as (
    update {prefix}.hephaestus_jobs as j
    set state = 'completed', completed_at = $11::timestamptz, heartbeat_at = null
    from unnest($16::bigint[], $17::integer[]) as done(id, attempt)
    where j.id = done.id and j.attempt = done.attempt and j.state = (select 'executing'::text)
    returning j.id
),
";

/// The batch insert (`$1`..`$15`, see `insert_rows`), still holding the
/// `{prefix}` placeholder. With `unique`, rows whose key is held are skipped
/// (`on conflict do nothing`) and reported as not inserted; without, every
/// row is inserted and no conflict arbiter is checked.
/// With `complete`, the statement also completes `$16`/`$17`'s leases
/// (fenced like [`super::settle::COMPLETE`]) and every row carries the ids
/// completed.
pub(super) fn insert_statement(unique: bool, complete: bool) -> String {
    let (on_conflict, returning, outcome) = if unique {
        (
            "
    on conflict (unique_key)
        where unique_key is not null and {prefix}.hephaestus_jobs_unique_held(unique_states, state)
        do nothing",
            "id, queue, state, scheduled_at",
            "select input.id, inserted.id is not null as inserted, (select n from notified) as notified{completed}
from input left join inserted on inserted.id = input.id",
        )
    } else {
        (
            "",
            "queue, state, scheduled_at",
            "select input.id, true as inserted, (select n from notified) as notified{completed}
from input",
        )
    };
    let (cte, completed) = if complete {
        (
            COMPLETE_CTE,
            ", (select coalesce(array_agg(id), '{}') from completed) as completed",
        )
    } else {
        ("", "")
    };
    // `{complete}` first: the CTE itself holds `{prefix}`.
    INSERT_TEMPLATE
        .replace("{complete}", cte)
        .replace("{on_conflict}", on_conflict)
        .replace("{returning}", returning)
        .replace("{outcome}", outcome)
        .replace("{completed}", completed)
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
            let mut conn = self.acquire().await?;
            let out = self.insert_many_using(&mut conn, jobs).await?;
            conn.finish().await?;
            Ok(out)
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
        Ok(self
            .insert_claiming_and_complete_using(conn, jobs, claim, worker, &[])
            .await?
            .0)
    }

    /// [`PgQueue::insert_claiming_using`] and
    /// [`PgQueue::complete_many_using`] of `leases` in ONE statement (one
    /// round trip): what a worker does when it settles jobs whose
    /// consequences are new jobs.
    pub async fn insert_claiming_and_complete_using(
        &self,
        conn: &mut PgConnection,
        jobs: &[NewJob],
        claim: &[bool],
        worker: &str,
        leases: &[(JobId, u32)],
    ) -> Result<(Vec<(Enqueued, Option<JobLease>)>, Settled), Error> {
        for job in jobs {
            check_new_job(job)?;
        }
        if jobs.is_empty() {
            let settled = self.complete_many_using(conn, leases).await?;
            return Ok((Vec::new(), settled));
        }
        let (lease_ids, lease_attempts) = super::settle::lease_columns(leases)?;
        let mut completing = (!leases.is_empty()).then_some((&lease_ids[..], &lease_attempts[..]));
        let mut completed: Option<Vec<i64>> = None;
        let now = self.now();
        let mut outcomes: Vec<Option<Enqueued>> = vec![None; jobs.len()];
        let mut pending: Vec<usize> = (0..jobs.len()).collect();
        for _ in 0..UNIQUE_ROUNDS {
            let batch: Vec<&NewJob> = pending.iter().map(|&i| &jobs[i]).collect();
            let claims: Vec<bool> = pending
                .iter()
                .map(|&i| claim.get(i).copied().unwrap_or(false))
                .collect();
            // The completion runs with the first round only.
            let (rows, done) = self
                .insert_rows(conn, &batch, &claims, now, worker, completing.take())
                .await?;
            completed = completed.or(done);
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
                    .persistent(self.persistent())
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
        let done: std::collections::HashSet<i64> =
            completed.unwrap_or_default().into_iter().collect();
        let (completed, fenced_out) = leases
            .iter()
            .map(|(id, _)| *id)
            .partition(|id| done.contains(&id.0));
        let settled = Settled {
            completed,
            fenced_out,
        };
        let enqueued = outcomes
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
            .collect();
        Ok((enqueued, settled))
    }

    /// Runs the batch insert; returns `(id, inserted)` per job, in order,
    /// and, with `complete` (ids, attempts), the ids it completed.
    #[allow(clippy::type_complexity)]
    async fn insert_rows(
        &self,
        conn: &mut PgConnection,
        jobs: &[&NewJob],
        claims: &[bool],
        now: DateTime<Utc>,
        worker: &str,
        complete: Option<(&[i64], &[i32])>,
    ) -> Result<(Vec<(i64, bool)>, Option<Vec<i64>>), Error> {
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
        let unique = unique_keys.iter().any(Option::is_some);
        let sql = match (unique, complete.is_some()) {
            (true, false) => &self.sql().insert,
            (false, false) => &self.sql().insert_plain,
            (true, true) => &self.sql().insert_complete,
            (false, true) => &self.sql().insert_plain_complete,
        };
        let query = sqlx::query(sql)
            .persistent(self.persistent())
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
            .bind(worker);
        let query = match complete {
            Some((ids, attempts)) => query.bind(ids).bind(attempts),
            None => query,
        };
        let rows = query.fetch_all(&mut *conn).await?;
        if rows.len() != n {
            return Err(Error::Corrupt(format!(
                "an insert of {n} jobs returned {} rows",
                rows.len()
            )));
        }
        let completed = match (complete, rows.first()) {
            (Some(_), Some(row)) => Some(row.try_get::<Vec<i64>, _>("completed")?),
            _ => None,
        };
        let outcomes = rows
            .iter()
            .map(|row| {
                Ok((
                    row.try_get::<i64, _>("id")?,
                    row.try_get::<bool, _>("inserted")?,
                ))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok((outcomes, completed))
    }
}
