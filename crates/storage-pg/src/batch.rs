//! Batched forms of the hot-path operations: one statement for many instances.
//!
//! The runner's batched orchestration (several finished steps and advances of
//! different instances settled in one transaction) calls these instead of
//! one statement per instance:
//!
//! | operation | statement |
//! | --- | --- |
//! | [`PgStore::try_lock_many_using`] | `pg_try_advisory_xact_lock` per instance + rows `for no key update` |
//! | [`PgStore::pending_many_using`] | unprocessed results of many instances |
//! | [`PgStore::write_rounds_using`] | new results, consumed inbox rows and many held instances, in one statement (three data-modifying CTEs) |
//! | [`PgStore::get_for_execution_many_using`] | many execution pre-checks, each instance read once |
//!
//! `try_lock_many_using` never waits for another writer: an instance whose lock is held
//! elsewhere is simply not returned, so a batch never queues behind (or deadlocks with)
//! another writer. Callers record such instances' results in the inbox and leave them to
//! that instance's advance.

use std::collections::HashMap;
use std::sync::Arc;

use hephaestus_engine_core::business_id::UniqueClaim;
use hephaestus_engine_core::ids::StepId;
use hephaestus_engine_core::instance::Instance;
use hephaestus_engine_core::ports::{Consumed, PortError, RoundResult, StepResult};
use hephaestus_migrations_gen::SchemaPrefix;
use sqlx::{PgConnection, PgExecutor, Row};
use uuid::Uuid;

use crate::error::{out_of_range, port_error};
use crate::instances::{decode_instance, encode_state};
use crate::lock::instance_lock_key;
use crate::results::{columns_of, decode_result};
use crate::store::{HELD_SETTING, INSTANCE_COLUMNS, PgStore};

/// The batched statements, rendered once per store.
#[derive(Debug)]
pub(crate) struct BatchSql {
    try_lock: String,
    pending: String,
    write: String,
    for_execution: String,
}

impl BatchSql {
    pub(crate) fn render(prefix: &SchemaPrefix) -> Self {
        let p = prefix.quoted();
        let instances = format!("{p}.hephaestus_instances");
        let results = format!("{p}.hephaestus_step_results");
        let held = HELD_SETTING;
        Self {
            // The try-lock filters the input rows before the join, so an instance held
            // elsewhere is skipped without waiting; the rows of the locked ones are then
            // read `for no key update`, which returns the newest committed version even
            // when the previous holder committed after this statement's snapshot.
            //
            // `inbox` says whether unprocessed results were visible when the statement
            // began (its snapshot predates the lock). `false` is exact for everything
            // committed before then; a result committed later carries its own advance
            // job (every inbox row is inserted with one), exactly as a result committed
            // just after a separate inbox read would. `true` may be stale (the previous
            // holder applied them meanwhile): the caller then reads the inbox with a
            // fresh snapshot.
            try_lock: format!(
                r"select {INSTANCE_COLUMNS},
    set_config('{held}', coalesce(current_setting('{held}', true), '') || ' ' || i.id::text, true),
    exists (select 1 from {results} r where r.instance_id = i.id and r.processed_at is null)
        as inbox
from unnest($1::uuid[], $2::bigint[]) as k(id, lock_key)
join {instances} i on i.id = k.id
where pg_try_advisory_xact_lock(k.lock_key)
order by i.id
for no key update of i"
            ),
            pending: format!(
                r"select seq, instance_id, step_id, activation, kind, event, output, metadata, detail, inserted_at
from {results}
where instance_id = any($1) and processed_at is null
order by instance_id, seq"
            ),
            // Everything a batch of rounds writes, in one statement: the new results
            // (those of locked instances already processed), the inbox rows the rounds
            // consumed, and the instances (only ones this transaction holds; the ids
            // written are returned).
            write: format!(
                r"with recorded as (
    insert into {results} (instance_id, step_id, activation, kind, event, output, metadata,
        detail, inserted_at, processed_at, refusal)
    select r.instance_id, r.step_id, r.activation, r.kind, r.event, r.output::jsonb,
           r.metadata::jsonb, r.detail::jsonb, $20::timestamptz, case when r.processed then $20::timestamptz end, r.refusal
    from unnest($1::uuid[], $2::text[], $3::integer[], $4::text[], $5::text[], $6::text[],
                $7::text[], $8::text[], $9::boolean[], $10::text[])
         with ordinality as r(instance_id, step_id, activation, kind, event, output, metadata,
                              detail, processed, refusal, ord)
    where exists (select 1 from {instances} where id = r.instance_id)
    order by r.ord
    on conflict do nothing
    returning 1
),
marked as (
    update {results} as m set processed_at = $20::timestamptz, refusal = c.refusal
    from unnest($11::bigint[], $12::text[]) as c(seq, refusal)
    where m.seq = c.seq and m.processed_at is null
    returning 1
),
written as (
    update {instances} as i
    set status = u.status, unique_claim = u.unique_claim, state = u.state::jsonb,
        failure = u.failure::jsonb, revision = u.revision, updated_at = u.updated_at
    from unnest($13::uuid[], $14::text[], $15::text[], $16::text[], $17::text[], $18::bigint[],
                $19::timestamptz[]) as u(id, status, unique_claim, state, failure, revision,
                                        updated_at)
    where i.id = u.id
      and coalesce(strpos(current_setting('{held}', true), i.id::text) > 0, false)
    returning i.id
)
select array(select id from written) as written"
            ),
            // Each instance once, with the positions (1-based) of the requests whose
            // activation already has a result.
            for_execution: format!(
                r"with k as (
    select * from unnest($1::uuid[], $2::text[], $3::integer[]) with ordinality as k(id, step, activation, ord)
),
recorded as (
    select coalesce(array_agg(k.ord), '{{}}') as ords
    from k
    where exists (
        select 1 from {results} r
        where r.instance_id = k.id and r.step_id = k.step and r.activation = k.activation
          and r.kind in ('completed', 'async', 'failed')
    )
)
select {INSTANCE_COLUMNS}, (select ords from recorded) as recorded
from {instances} i
where i.id in (select id from k)"
            ),
        }
    }
}

/// One execution pre-check of [`PgStore::get_for_execution_many_using`].
pub type ExecutionCheck = Option<(Arc<Instance>, bool)>;

impl PgStore {
    /// Takes the single-writer lock of each instance in `ids` that no other
    /// transaction holds, without waiting, and loads the ones it locked (sorted by
    /// id), each with whether its inbox may hold unprocessed results (`false`: none
    /// was committed when the statement began, so reading the inbox can be skipped;
    /// a later one has its own advance job). Instances held elsewhere, and missing
    /// ones, are not returned. `conn` must be inside a transaction: the locks are
    /// held until it ends. One statement.
    pub async fn try_lock_many_using(
        &self,
        conn: &mut PgConnection,
        ids: &[Uuid],
    ) -> Result<Vec<(Instance, bool)>, PortError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let keys: Vec<i64> = ids
            .iter()
            .map(|id| instance_lock_key(&self.prefix, *id))
            .collect();
        let rows = sqlx::query(&self.sql.batch.try_lock)
            .persistent(self.persistent())
            .bind(&ids)
            .bind(&keys)
            .fetch_all(conn)
            .await
            .map_err(port_error)?;
        rows.iter()
            .map(|row| {
                let inbox: bool = row.try_get("inbox").map_err(port_error)?;
                Ok((decode_instance(row)?, inbox))
            })
            .collect()
    }

    /// The unprocessed results of many instances, by instance, each in `seq` order.
    /// One statement.
    pub async fn pending_many_using<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Vec<StepResult>>, PortError> {
        let mut by_instance: HashMap<Uuid, Vec<StepResult>> = HashMap::new();
        if ids.is_empty() {
            return Ok(by_instance);
        }
        let rows = sqlx::query(&self.sql.batch.pending)
            .persistent(self.persistent())
            .bind(ids)
            .fetch_all(executor)
            .await
            .map_err(port_error)?;
        for row in &rows {
            let result = decode_result(row)?;
            by_instance
                .entry(result.result.instance_id)
                .or_default()
                .push(result);
        }
        Ok(by_instance)
    }

    /// Everything a batch of advance rounds writes, in one statement:
    ///
    /// - `results`: new step results, in order (so `seq` follows it), idempotently (a
    ///   result already recorded for its (instance, step, activation, kind), or whose
    ///   instance does not exist, is skipped); one flagged `processed` is recorded as
    ///   already processed (its instance is locked by this transaction, which applies
    ///   it), with its refusal if the round refused it (a refused row holds no slot);
    /// - `consumed`: inbox rows (by `seq`, of any instances) to mark processed, with
    ///   their refusal if the round refused them;
    /// - `instances`: their status, claim, state, failure, revision and update time,
    ///   all held by this transaction (locked or inserted in it):
    ///   [`PortError::Conflict`] when any of them is not (nothing is then meant to
    ///   commit: the caller rolls back).
    pub async fn write_rounds_using(
        &self,
        conn: &mut PgConnection,
        results: &[RoundResult],
        consumed: &[Consumed],
        instances: &[&Instance],
    ) -> Result<(), PortError> {
        if results.is_empty() && consumed.is_empty() && instances.is_empty() {
            return Ok(());
        }
        let n = results.len();
        let mut instance_ids = Vec::with_capacity(n);
        let mut steps = Vec::with_capacity(n);
        let mut activations = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        let mut events: Vec<Option<String>> = Vec::with_capacity(n);
        let mut outputs: Vec<Option<String>> = Vec::with_capacity(n);
        let mut metadata: Vec<Option<String>> = Vec::with_capacity(n);
        let mut details: Vec<Option<String>> = Vec::with_capacity(n);
        let mut processed = Vec::with_capacity(n);
        let mut refusals: Vec<Option<String>> = Vec::with_capacity(n);
        for RoundResult {
            result,
            processed: done,
            refusal,
        } in results
        {
            processed.push(*done);
            refusals.push(refusal.as_ref().map(|r| r.replace('\0', "\u{fffd}")));
            let columns = columns_of(&result.payload)?;
            instance_ids.push(result.instance_id);
            steps.push(result.step.as_ref().map_or("", StepId::as_str));
            activations.push(
                i32::try_from(result.activation)
                    .map_err(|_| out_of_range("activation", result.activation))?,
            );
            kinds.push(result.payload.kind().as_str());
            events.push(columns.event.map(ToOwned::to_owned));
            outputs.push(columns.output);
            metadata.push(columns.metadata);
            details.push(columns.detail);
        }
        let m = instances.len();
        let mut ids = Vec::with_capacity(m);
        let mut statuses = Vec::with_capacity(m);
        let mut claims: Vec<Option<&str>> = Vec::with_capacity(m);
        let mut states = Vec::with_capacity(m);
        let mut failures = Vec::with_capacity(m);
        let mut revisions = Vec::with_capacity(m);
        let mut updated = Vec::with_capacity(m);
        for instance in instances {
            let (state, failure) = encode_state(instance)?;
            ids.push(instance.id);
            statuses.push(instance.status.as_str());
            claims.push(instance.unique_claim.as_ref().map(UniqueClaim::as_str));
            states.push(state);
            failures.push(failure);
            revisions.push(
                i64::try_from(instance.revision)
                    .map_err(|_| out_of_range("revision", instance.revision))?,
            );
            updated.push(instance.updated_at);
        }
        let written: Vec<Uuid> = sqlx::query_scalar(&self.sql.batch.write)
            .persistent(self.persistent())
            .bind(&instance_ids)
            .bind(&steps)
            .bind(&activations)
            .bind(&kinds)
            .bind(&events)
            .bind(&outputs)
            .bind(&metadata)
            .bind(&details)
            .bind(&processed)
            .bind(&refusals)
            .bind(consumed.iter().map(|c| c.seq).collect::<Vec<i64>>())
            .bind(
                consumed
                    .iter()
                    .map(|c| c.refusal.as_ref().map(|r| r.replace('\0', "\u{fffd}")))
                    .collect::<Vec<Option<String>>>(),
            )
            .bind(&ids)
            .bind(&statuses)
            .bind(&claims)
            .bind(&states)
            .bind(&failures)
            .bind(&revisions)
            .bind(&updated)
            .bind(self.clock.now())
            .fetch_one(conn)
            .await
            .map_err(port_error)?;
        if written.len() == m {
            return Ok(());
        }
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| !written.contains(id))
            .map(Uuid::to_string)
            .collect();
        Err(PortError::Conflict(format!(
            "instances not locked in this transaction (or missing): {}",
            missing.join(", ")
        )))
    }

    /// Many execution pre-checks (what a step execution checks before running user
    /// code) in one statement, reading each instance once: for each `(instance, step,
    /// activation)` in order, the instance (shared between requests of one instance) and whether a
    /// result is recorded for that activation, or `None` when the instance does not
    /// exist.
    pub async fn get_for_execution_many_using<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
        requests: &[(Uuid, &StepId, u32)],
    ) -> Result<Vec<ExecutionCheck>, PortError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = requests.iter().map(|(id, _, _)| *id).collect();
        let steps: Vec<&str> = requests.iter().map(|(_, s, _)| s.as_str()).collect();
        // No stored activation is that large: nothing can be recorded for it.
        let activations: Vec<i32> = requests
            .iter()
            .map(|(_, _, a)| i32::try_from(*a).unwrap_or(-1))
            .collect();
        let rows = sqlx::query(&self.sql.batch.for_execution)
            .persistent(self.persistent())
            .bind(&ids)
            .bind(&steps)
            .bind(&activations)
            .fetch_all(executor)
            .await
            .map_err(port_error)?;
        let mut recorded: Vec<i64> = Vec::new();
        let mut by_id: HashMap<Uuid, Arc<Instance>> = HashMap::with_capacity(rows.len());
        for row in &rows {
            recorded = row.try_get("recorded").map_err(port_error)?;
            let instance = decode_instance(row)?;
            by_id.insert(instance.id, Arc::new(instance));
        }
        Ok(requests
            .iter()
            .enumerate()
            .map(|(i, (id, _, _))| {
                by_id.get(id).map(|instance| {
                    let position = i64::try_from(i + 1).unwrap_or(i64::MAX);
                    (Arc::clone(instance), recorded.contains(&position))
                })
            })
            .collect())
    }
}
