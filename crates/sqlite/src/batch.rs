//! Batched operations: what the runner's settling unit of work and its
//! execution pre-checks ask for, each a bounded number of statements for a
//! whole batch instead of one per row. SQLite has no array binds: a batch is
//! ONE JSON array parameter, read with `json_each` (one prepared statement
//! whatever the batch size). Every statement is a round trip to the
//! connection's thread (that is how sqlx drives SQLite), so the statement
//! count per batch is what these save.
//!
//! Each keeps the semantics of the port operations it replaces (the
//! runner's `Backend` defaults, checked by the backend conformance suite):
//! the same fences, the same idempotence, the same errors.

use std::collections::HashMap;
use std::sync::Arc;

use hephaestus_engine_core::business_id::UniqueClaim;
use hephaestus_engine_core::ids::StepId;
use hephaestus_engine_core::instance::Instance;
use hephaestus_engine_core::ports::{
    Consumed, Enqueued, InstanceStore, JobId, JobLease, JobState, NewJob, PortError, RoundResult,
    StepResult, StepResultStore,
};
use serde_json::{Value, json};
use sqlx::Row;
use uuid::Uuid;

use crate::backend::SqliteBackend;
use crate::error::{out_of_range, port_error};
use crate::instances::{Encoded, INSTANCE_COLUMNS, check_text, decode_instance};
use crate::jobs::{EncodedJob, state_bit};
use crate::locks::Resource;
use crate::results::{Columns, RESULT_COLUMNS, decode_result};
use crate::time::micros;
use crate::tx::SqliteTx;

/// The instances and recorded flags of execution requests (`?1`: a JSON
/// array of `[instance id, step, activation]`), in request order.
const EXECUTION_CHECKS: &str = r"with req as (
    select key as ord, value ->> 0 as req_id, value ->> 1 as req_step, value ->> 2 as req_activation
    from json_each(?1)
)
select req.ord, req.req_id, {columns},
    exists (
        select 1 from hephaestus_step_results as r
        where r.instance_id = req.req_id and r.step_id = req.req_step
            and r.activation = req.req_activation
            and r.kind in ('completed', 'async', 'failed') and r.refusal is null
    ) as recorded
from req left join hephaestus_instances on hephaestus_instances.id = req.req_id
order by req.ord";

/// The locked instances (`?1`: a JSON array of ids), each with whether its
/// inbox holds an unprocessed result.
const LOCKED_READ: &str = r"select {columns},
    exists (
        select 1 from hephaestus_step_results as r
        where r.instance_id = hephaestus_instances.id and r.processed_at is null
    ) as inbox
from hephaestus_instances
where id in (select value from json_each(?1))";

/// The unprocessed results of the instances in `?1` (a JSON array of ids).
const PENDING_MANY: &str = r"select {columns} from hephaestus_step_results
where instance_id in (select value from json_each(?1)) and processed_at is null
order by seq";

/// New results (`?1`: a JSON array of `[instance, step, activation, kind,
/// event, output, metadata, detail, processed]`), idempotently, those of
/// missing instances skipped; processed ones marked at `?2`.
const RECORD_MANY: &str = r"insert into hephaestus_step_results
    (instance_id, step_id, activation, kind, event, output, metadata, detail, inserted_at,
     processed_at)
select j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3, j.value ->> 4, j.value ->> 5,
    j.value ->> 6, j.value ->> 7, ?2, case when j.value ->> 8 then ?2 end
from json_each(?1) as j
where exists (select 1 from hephaestus_instances where id = j.value ->> 0)
order by j.key
on conflict do nothing";

/// Consumed inbox rows (`?1`: a JSON array of `[seq, instance, refusal]`)
/// marked processed at `?2`, refused ones with their reason.
const CONSUME_MANY: &str = r"update hephaestus_step_results
set processed_at = ?2, refusal = j.value ->> 2
from json_each(?1) as j
where hephaestus_step_results.seq = j.value ->> 0
    and hephaestus_step_results.instance_id = j.value ->> 1
    and hephaestus_step_results.processed_at is null";

/// Instances written, each fenced by the lock version this unit of work saw
/// (`?1`: a JSON array of `[id, business id, workflow, version, status,
/// claim, state, failure, telemetry, revision, inserted, updated, seen]`).
const UPDATE_MANY: &str = r"update hephaestus_instances
set business_id = j.value ->> 1, workflow_id = j.value ->> 2, workflow_version = j.value ->> 3,
    status = j.value ->> 4, unique_claim = j.value ->> 5, state = j.value ->> 6,
    failure = j.value ->> 7, telemetry_metadata = j.value ->> 8, revision = j.value ->> 9,
    inserted_at = j.value ->> 10, updated_at = j.value ->> 11,
    lock_version = hephaestus_instances.lock_version + 1
from json_each(?1) as j
where hephaestus_instances.id = j.value ->> 0 and hephaestus_instances.lock_version = j.value ->> 12
returning id, lock_version";

/// The holders of the unique keys in `?1` (a JSON array): the jobs whose
/// state is among their key's (the rows the unique index covers).
const FIND_HOLDERS: &str = r"select unique_key, id from hephaestus_jobs
where unique_key in (select value from json_each(?1)) and (unique_states & (case state
    when 'available' then 1 when 'scheduled' then 2 when 'executing' then 4
    when 'retryable' then 8 when 'completed' then 16 when 'discarded' then 32
    when 'cancelled' then 64 else 0 end)) <> 0";

/// Jobs inserted in input order (`?1`: a JSON array of `[state, queue,
/// kind, args, meta, tags, priority, max attempts, scheduled at, unique key,
/// unique states, group, claimed]`) at `?2`; claimed ones executing at
/// attempt 1 for worker `?3`. Ids increase in input order (the write lock
/// is held, and the table is `autoincrement`).
const INSERT_MANY: &str = r"insert into hephaestus_jobs
    (state, queue, kind, args, meta, tags, priority, max_attempts, inserted_at, scheduled_at,
     unique_key, unique_states, group_key, attempt, attempted_at, attempted_by, heartbeat_at)
select j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3, j.value ->> 4, j.value ->> 5,
    j.value ->> 6, j.value ->> 7, ?2, j.value ->> 8, j.value ->> 9, j.value ->> 10, j.value ->> 11,
    case when j.value ->> 12 then 1 else 0 end,
    case when j.value ->> 12 then ?2 end,
    case when j.value ->> 12 then ?3 end,
    case when j.value ->> 12 then ?2 end
from json_each(?1) as j
where true
order by j.key
on conflict do nothing
returning id";

/// Leases completed (`?1`: a JSON array of `[id, attempt]`) at `?2`, each
/// fenced by its attempt.
const COMPLETE_MANY: &str = r"update hephaestus_jobs
set state = 'completed', completed_at = ?2, heartbeat_at = null
from json_each(?1) as j
where hephaestus_jobs.id = j.value ->> 0 and hephaestus_jobs.attempt = j.value ->> 1
    and hephaestus_jobs.state = 'executing'
returning id";

fn ids_json(ids: &[Uuid]) -> String {
    Value::from(ids.iter().map(Uuid::to_string).collect::<Vec<_>>()).to_string()
}

fn parse_id(text: &str) -> Result<Uuid, PortError> {
    Uuid::parse_str(text).map_err(|e| PortError::Corrupt(format!("instance id {text}: {e}")))
}

/// What settling a batch of jobs did ([`SqliteBackend::enqueue_claiming_and_complete`]).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct EnqueuedAndCompleted {
    /// Each job, in order: what the enqueue did, and its lease when it was
    /// inserted claimed.
    pub enqueued: Vec<(Enqueued, Option<JobLease>)>,
    /// For each lease, whether it held (its job is now completed).
    pub held: Vec<bool>,
}

/// What one job of a batch insert becomes, before the insert.
enum Planned {
    /// Inserted, the `n`-th row of the insert.
    Insert(usize),
    /// Merged into a job already stored.
    Holder(i64),
    /// Merged into the `n`-th row of this insert.
    Earlier(usize),
}

impl SqliteBackend {
    /// The runner's execution pre-checks in ONE read statement: for each
    /// `(instance, step, activation)`, in order, the instance as committed
    /// (requests of one instance share it) and whether a result is recorded
    /// for the step's activation (only while that activation is active,
    /// else `false`); `None` for a missing instance.
    pub async fn get_for_execution_many(
        &self,
        requests: &[(Uuid, &StepId, u32)],
    ) -> Result<Vec<Option<(Arc<Instance>, bool)>>, PortError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let param = Value::from(
            requests
                .iter()
                .map(|(id, step, activation)| json!([id.to_string(), step.as_str(), activation]))
                .collect::<Vec<_>>(),
        )
        .to_string();
        let sql = EXECUTION_CHECKS.replace("{columns}", &qualified_instance_columns());
        let rows = sqlx::query(&sql)
            .bind(param)
            .fetch_all(&self.shared.pool)
            .await
            .map_err(port_error)?;
        if rows.len() != requests.len() {
            return Err(PortError::Corrupt(format!(
                "{} execution checks answered {} rows",
                requests.len(),
                rows.len()
            )));
        }
        let mut seen: HashMap<Uuid, Arc<Instance>> = HashMap::new();
        let mut out = Vec::with_capacity(requests.len());
        for (row, (id, step, activation)) in rows.iter().zip(requests) {
            let found: Option<String> = row.try_get("id").map_err(port_error)?;
            if found.is_none() {
                out.push(None);
                continue;
            }
            let instance = if let Some(instance) = seen.get(id) {
                Arc::clone(instance)
            } else {
                let (instance, _) = decode_instance(row)?;
                let instance = Arc::new(instance);
                seen.insert(*id, Arc::clone(&instance));
                instance
            };
            let recorded: bool = row.try_get("recorded").map_err(port_error)?;
            let recorded = recorded && instance.is_step_active(step.as_str(), *activation);
            out.push(Some((instance, recorded)));
        }
        Ok(out)
    }

    /// Locks, in `tx`, every instance of `ids` whose single-writer lock is
    /// free in this process (or already `tx`'s), without waiting, and reads
    /// them in ONE statement: each locked instance that exists (in id
    /// order, each once), with whether its inbox held an unprocessed result
    /// when it was read (after the lock was taken). Missing instances keep
    /// no lock. The update of a returned instance is fenced by the
    /// `lock_version` read here, as after [`InstanceStore::lock`].
    pub async fn try_lock_many_in(
        &self,
        tx: &mut SqliteTx,
        ids: &[Uuid],
    ) -> Result<Vec<(Instance, bool)>, PortError> {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let mut taken = Vec::with_capacity(ids.len());
        let mut held_before = Vec::with_capacity(ids.len());
        for id in ids {
            if self
                .shared
                .locks
                .try_acquire(tx.owner, Resource::Instance(id))
            {
                held_before.push(tx.held.contains_key(&id));
                taken.push(id);
            }
        }
        if taken.is_empty() {
            return Ok(Vec::new());
        }
        let sql = LOCKED_READ.replace("{columns}", INSTANCE_COLUMNS);
        let query = sqlx::query(&sql).bind(ids_json(&taken));
        let rows = match tx.write.as_mut() {
            Some(conn) => query.fetch_all(&mut **conn).await,
            None => query.fetch_all(&self.shared.pool).await,
        };
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                for (id, before) in taken.iter().zip(&held_before) {
                    if !before {
                        tx.unlock_instance(*id);
                    }
                }
                return Err(port_error(e));
            }
        };
        let mut found: HashMap<Uuid, (Instance, bool)> = HashMap::with_capacity(rows.len());
        let mut failed = None;
        for row in &rows {
            let id_text: String = row.try_get("id").map_err(port_error)?;
            let id = parse_id(&id_text)?;
            match decode_instance(row) {
                Ok((instance, lock_version)) => {
                    let inbox: bool = row.try_get("inbox").map_err(port_error)?;
                    tx.held.insert(id, lock_version);
                    found.insert(id, (instance, inbox));
                }
                Err(e) => {
                    // Locked: `cancel_status_only` may still end it.
                    let lock_version: i64 = row.try_get("lock_version").unwrap_or_default();
                    tx.held.insert(id, lock_version);
                    failed.get_or_insert(e);
                }
            }
        }
        let mut out = Vec::with_capacity(found.len());
        for (id, before) in taken.iter().zip(&held_before) {
            match found.remove(id) {
                Some(locked) => out.push(locked),
                None if !tx.held.contains_key(id) && !before => tx.unlock_instance(*id),
                None => {}
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// The unprocessed results of the instances `ids`, each in `seq` order,
    /// in ONE statement (in `tx`: its own writes included). Instances with
    /// none are left out.
    pub async fn pending_many_in(
        &self,
        tx: &mut SqliteTx,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Vec<StepResult>>, PortError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let sql = PENDING_MANY.replace("{columns}", RESULT_COLUMNS);
        let query = sqlx::query(&sql).bind(ids_json(ids));
        let rows = match tx.write.as_mut() {
            Some(conn) => query.fetch_all(&mut **conn).await,
            None => query.fetch_all(&self.shared.pool).await,
        }
        .map_err(port_error)?;
        let mut out: HashMap<Uuid, Vec<StepResult>> = HashMap::new();
        for row in &rows {
            let result = decode_result(row)?;
            out.entry(result.result.instance_id)
                .or_default()
                .push(result);
        }
        Ok(out)
    }

    /// What a batch of advance rounds writes, in `tx`, in at most three
    /// statements: the new `results` (idempotently: duplicates and results
    /// of missing instances skipped; `processed` ones recorded processed),
    /// the `consumed` inbox rows of each instance marked processed (refused
    /// ones with their reason), and the `instances`, which `tx` must hold
    /// (locked or inserted), each fenced by the lock version it saw. A
    /// batch with a refused new result records its results one by one (a
    /// refused row holds no slot, so its idempotence is decided in order).
    /// An instance `tx` does not hold is [`PortError::Conflict`]; a write
    /// refused by a fence, a missing instance or a taken business id fails
    /// as [`InstanceStore::update`] does.
    pub async fn write_rounds_in(
        &self,
        tx: &mut SqliteTx,
        results: &[RoundResult],
        consumed: &[(Uuid, &[Consumed])],
        instances: &[&Instance],
    ) -> Result<(), PortError> {
        self.record_round_results_batched(tx, results).await?;
        self.consume(tx, consumed).await?;
        self.update_many(tx, instances).await
    }

    async fn record_round_results_batched(
        &self,
        tx: &mut SqliteTx,
        results: &[RoundResult],
    ) -> Result<(), PortError> {
        if results.is_empty() {
            return Ok(());
        }
        if results.iter().any(|r| r.refusal.is_some()) {
            return StepResultStore::record_round_results(self, tx, results).await;
        }
        let mut rows = Vec::with_capacity(results.len());
        for RoundResult {
            result, processed, ..
        } in results
        {
            let columns = Columns::of(&result.payload)?;
            if i32::try_from(result.activation).is_err() {
                return Err(out_of_range("activation", result.activation));
            }
            rows.push(json!([
                result.instance_id.to_string(),
                result.step.as_ref().map_or("", StepId::as_str),
                result.activation,
                result.payload.kind().as_str(),
                columns.event,
                columns.output,
                columns.metadata,
                columns.detail,
                processed,
            ]));
        }
        let now = micros(self.shared.now());
        let conn = tx.writer().await?;
        let inserted = sqlx::query(RECORD_MANY)
            .bind(Value::from(rows).to_string())
            .bind(now)
            .execute(conn)
            .await
            .map_err(port_error)?
            .rows_affected();
        if inserted > 0 {
            tx.changed();
        }
        Ok(())
    }

    async fn consume(
        &self,
        tx: &mut SqliteTx,
        consumed: &[(Uuid, &[Consumed])],
    ) -> Result<(), PortError> {
        let mut rows = Vec::new();
        for (instance_id, consumed) in consumed {
            for Consumed { seq, refusal } in *consumed {
                if let Some(reason) = refusal {
                    check_text("refusal reason", reason)?;
                }
                rows.push(json!([seq, instance_id.to_string(), refusal]));
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        let now = micros(self.shared.now());
        let conn = tx.writer().await?;
        sqlx::query(CONSUME_MANY)
            .bind(Value::from(rows).to_string())
            .bind(now)
            .execute(conn)
            .await
            .map_err(port_error)?;
        tx.changed();
        Ok(())
    }

    async fn update_many(
        &self,
        tx: &mut SqliteTx,
        instances: &[&Instance],
    ) -> Result<(), PortError> {
        let mut distinct: Vec<Uuid> = instances.iter().map(|i| i.id).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let one_by_one = instances.len() < 2
            || distinct.len() != instances.len()
            || instances.iter().any(|i| !tx.held.contains_key(&i.id));
        if one_by_one {
            // One instance, one written twice, or one not held (whose
            // error `update` reports): the port, one at a time.
            for instance in instances {
                self.update(tx, instance).await?;
            }
            return Ok(());
        }
        let mut rows = Vec::with_capacity(instances.len());
        for instance in instances {
            let e = Encoded::of(instance)?;
            rows.push(json!([
                e.id,
                instance.business_id.as_str(),
                instance.workflow_id.as_str(),
                e.version,
                instance.status.as_str(),
                instance.unique_claim.as_ref().map(UniqueClaim::as_str),
                e.state,
                e.failure,
                e.telemetry,
                e.revision,
                e.inserted_at,
                e.updated_at,
                tx.held.get(&instance.id),
            ]));
        }
        let conn = tx.writer().await?;
        let written = sqlx::query(UPDATE_MANY)
            .bind(Value::from(rows).to_string())
            .fetch_all(conn)
            .await;
        let written = match written {
            Ok(rows) => rows,
            // A taken business id (the statement changed nothing): the
            // port, one at a time, names the holder.
            Err(e) if crate::instances::is_unique_violation(&e) => {
                for instance in instances {
                    self.update(tx, instance).await?;
                }
                return Ok(());
            }
            Err(e) => return Err(port_error(e)),
        };
        if !written.is_empty() {
            tx.changed();
        }
        for row in &written {
            let id: String = row.try_get("id").map_err(port_error)?;
            let version: i64 = row.try_get("lock_version").map_err(port_error)?;
            tx.held.insert(parse_id(&id)?, version);
        }
        if written.len() != instances.len() {
            // Fenced or missing: the port's update of the first one not
            // written fails as it would have (and abandons the unit of work).
            let done: std::collections::HashSet<String> = written
                .iter()
                .filter_map(|row| row.try_get::<String, _>("id").ok())
                .collect();
            for instance in instances {
                if !done.contains(&instance.id.to_string()) {
                    self.update(tx, instance).await?;
                }
            }
        }
        Ok(())
    }

    /// Enqueues `jobs` and completes `leases` in `tx`, in at most three
    /// statements (the holders of the jobs' unique keys, the insert, the
    /// completion). The jobs flagged in `claim` are inserted claimed by
    /// `worker` (executing at attempt 1, heartbeat started, no wake-up
    /// sent) and come back with their lease; a unique job whose key is held
    /// (by a stored job or an earlier one of `jobs`) is merged into its
    /// holder and never claimed. Each lease completes only if its job is
    /// still executing at its attempt (`held`).
    pub async fn enqueue_claiming_and_complete(
        &self,
        tx: &mut SqliteTx,
        jobs: &[NewJob],
        claim: &[bool],
        worker: &str,
        leases: &[(JobId, u32)],
    ) -> Result<EnqueuedAndCompleted, PortError> {
        let mut encoded = Vec::with_capacity(jobs.len());
        for job in jobs {
            job.check()?;
            encoded.push(EncodedJob::of(job)?);
        }
        check_text("worker", worker)?;
        if jobs.is_empty() && leases.is_empty() {
            return Ok(EnqueuedAndCompleted::default());
        }
        let now = self.shared.now();
        let at = micros(now);
        let conn = tx.writer().await?;
        let keys: Vec<&str> = jobs
            .iter()
            .filter_map(|j| j.unique.as_ref().map(|u| u.key.as_str()))
            .collect();
        let mut holders: HashMap<String, i64> = HashMap::new();
        if !keys.is_empty() {
            let rows = sqlx::query(FIND_HOLDERS)
                .bind(Value::from(keys).to_string())
                .fetch_all(&mut *conn)
                .await
                .map_err(port_error)?;
            for row in &rows {
                holders.insert(
                    row.try_get("unique_key").map_err(port_error)?,
                    row.try_get("id").map_err(port_error)?,
                );
            }
        }
        // What each job becomes: the unique index decides as the rows go in,
        // in order, and nothing else writes while the write lock is held.
        let mut plan = Vec::with_capacity(jobs.len());
        let mut rows = Vec::new();
        let mut claimed_in_batch: HashMap<&str, usize> = HashMap::new();
        for (i, job) in jobs.iter().enumerate() {
            let claimed = claim.get(i).copied().unwrap_or(false);
            let key = job.unique.as_ref().map(|u| u.key.as_str());
            if let Some(key) = key {
                if let Some(&holder) = holders.get(key) {
                    plan.push(Planned::Holder(holder));
                    continue;
                }
                if let Some(&earlier) = claimed_in_batch.get(key) {
                    plan.push(Planned::Earlier(earlier));
                    continue;
                }
            }
            let scheduled_at = job.scheduled_at.unwrap_or(now);
            let state = if claimed {
                JobState::Executing
            } else if scheduled_at > now {
                JobState::Scheduled
            } else {
                JobState::Available
            };
            let mask = job
                .unique
                .as_ref()
                .map_or(0, |u| u.states.iter().fold(0, |m, s| m | state_bit(*s)));
            if let Some(key) = key
                && mask & state_bit(state) != 0
            {
                claimed_in_batch.insert(key, rows.len());
            }
            let e = &encoded[i];
            plan.push(Planned::Insert(rows.len()));
            rows.push(json!([
                state.as_str(),
                job.queue,
                job.kind,
                e.args,
                e.meta,
                e.tags,
                job.priority,
                job.max_attempts,
                micros(scheduled_at),
                key,
                mask,
                job.group,
                claimed,
            ]));
        }
        let mut ids: Vec<i64> = Vec::new();
        if !rows.is_empty() {
            let expected = rows.len();
            ids = sqlx::query_scalar(INSERT_MANY)
                .bind(Value::from(rows).to_string())
                .bind(at)
                .bind(worker)
                .fetch_all(&mut *conn)
                .await
                .map_err(port_error)?;
            if ids.len() != expected {
                return Err(PortError::Conflict(format!(
                    "an insert of {expected} jobs inserted {} (a unique key changed hands under the write lock)",
                    ids.len()
                )));
            }
            // `returning` has no order; the ids follow the input's.
            ids.sort_unstable();
        }
        let mut held = vec![false; leases.len()];
        if !leases.is_empty() {
            let pairs: Vec<Value> = leases
                .iter()
                .map(|(id, attempt)| json!([id.0, attempt]))
                .collect();
            let done: Vec<i64> = sqlx::query_scalar(COMPLETE_MANY)
                .bind(Value::from(pairs).to_string())
                .bind(at)
                .fetch_all(&mut *conn)
                .await
                .map_err(port_error)?;
            for (slot, (id, _)) in held.iter_mut().zip(leases) {
                *slot = done.contains(&id.0);
            }
        }
        let mut enqueued = Vec::with_capacity(jobs.len());
        let mut waiting_inserted = false;
        let mut merged = Vec::new();
        for (i, (job, planned)) in jobs.iter().zip(plan).enumerate() {
            let claimed = claim.get(i).copied().unwrap_or(false);
            let outcome = match planned {
                Planned::Insert(n) => {
                    let id = JobId(ids[n]);
                    let lease = claimed.then(|| JobLease {
                        id,
                        kind: job.kind.clone(),
                        queue: job.queue.clone(),
                        args: job.args.clone(),
                        meta: job.meta.clone(),
                        attempt: 1,
                        max_attempts: job.max_attempts,
                        scheduled_at: job.scheduled_at.unwrap_or(now),
                        errors: Vec::new(),
                    });
                    waiting_inserted |= !claimed;
                    (Enqueued::Inserted(id), lease)
                }
                Planned::Holder(holder) => {
                    merged.push(job.clone());
                    (Enqueued::Existing(JobId(holder)), None)
                }
                Planned::Earlier(n) => (Enqueued::Existing(JobId(ids[n])), None),
            };
            enqueued.push(outcome);
        }
        if !ids.is_empty() || held.iter().any(|h| *h) {
            tx.changed();
        }
        tx.enqueued |= waiting_inserted;
        if !tx.dirty {
            // Nothing written: the write lock is given back, so a holder may
            // move before the commit; recheck the merges then.
            tx.merged.extend(merged);
            tx.release_if_clean().await;
        }
        Ok(EnqueuedAndCompleted { enqueued, held })
    }
}

/// [`INSTANCE_COLUMNS`] qualified by the table (for joins).
fn qualified_instance_columns() -> String {
    INSTANCE_COLUMNS
        .split(',')
        .map(|c| format!("hephaestus_instances.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}
