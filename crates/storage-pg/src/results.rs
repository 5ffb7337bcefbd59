//! Step results: the idempotent inbox of each instance.
//!
//! A [`ResultPayload`] maps to columns so operators can read the table
//! directly, as every SQL backend lays them out
//! ([`hephaestus_engine_core::ports::columns`]); here they are `jsonb`.
//!
//! `step_id` is `''` for instance-level rows (a step id is never empty).

use chrono::{DateTime, Utc};
use hephaestus_engine_core::ids::StepId;
use hephaestus_engine_core::ports::{
    NewStepResult, PortError, Recorded, Refused, ResultPayload, StepResult, columns,
};
use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor, Row};
use uuid::Uuid;

use crate::error::{out_of_range, port_error};
use crate::json::{check_text, to_jsonb_text};
use crate::store::PgStore;

/// A payload as bound to the `event`, `output`, `metadata` and `detail` columns.
#[derive(Default)]
pub(crate) struct Columns<'a> {
    pub(crate) event: Option<&'a str>,
    pub(crate) output: Option<String>,
    pub(crate) metadata: Option<String>,
    pub(crate) detail: Option<String>,
}

/// The columns of a payload (checked for text PostgreSQL cannot store).
pub(crate) fn columns_of(payload: &ResultPayload) -> Result<Columns<'_>, PortError> {
    Columns::of(payload)
}

impl<'a> Columns<'a> {
    fn of(payload: &'a ResultPayload) -> Result<Self, PortError> {
        let shared = hephaestus_engine_core::ports::columns::columns(payload)
            .map_err(|e| PortError::InvalidInput(format!("step result: {e}")))?;
        let columns = Self {
            event: shared.event,
            output: shared.output.map(json).transpose()?,
            metadata: shared.metadata.map(json).transpose()?,
            detail: shared.detail.as_ref().map(json).transpose()?,
        };
        if let Some(event) = columns.event {
            check_text("step result event", event)?;
        }
        Ok(columns)
    }
}

fn json<T: Serialize + ?Sized>(value: &T) -> Result<String, PortError> {
    to_jsonb_text("step result", value)
}

pub(crate) fn decode_result(row: &PgRow) -> Result<StepResult, PortError> {
    let seq: i64 = row.try_get("seq").map_err(port_error)?;
    let corrupt = |problem: String| PortError::Corrupt(format!("step result {seq}: {problem}"));
    let get = |column: &'static str| {
        move |e: sqlx::Error| PortError::Corrupt(format!("step result {seq}, column {column}: {e}"))
    };
    let instance_id: Uuid = row.try_get("instance_id").map_err(get("instance_id"))?;
    let step: String = row.try_get("step_id").map_err(get("step_id"))?;
    let activation: i32 = row.try_get("activation").map_err(get("activation"))?;
    let kind: String = row.try_get("kind").map_err(get("kind"))?;
    let event: Option<String> = row.try_get("event").map_err(get("event"))?;
    let output: Option<Json<Value>> = row.try_get("output").map_err(get("output"))?;
    let metadata: Option<Json<Map<String, Value>>> =
        row.try_get("metadata").map_err(get("metadata"))?;
    let detail: Option<Json<Value>> = row.try_get("detail").map_err(get("detail"))?;
    let inserted_at: DateTime<Utc> = row.try_get("inserted_at").map_err(get("inserted_at"))?;

    let payload = columns::payload(
        &kind,
        event,
        output.map(|Json(v)| v),
        metadata.map(|Json(m)| m),
        detail.map(|Json(v)| v),
    )
    .map_err(corrupt)?;
    Ok(StepResult {
        seq,
        result: NewStepResult {
            instance_id,
            step: columns::step_of(&step).map_err(corrupt)?,
            activation: columns::activation_of(i64::from(activation)).map_err(corrupt)?,
            payload,
        },
        inserted_at,
    })
}

impl PgStore {
    /// Records a step result on `conn` (a transaction of the caller's, or a plain
    /// connection), idempotently per (instance, step, activation, kind):
    /// [`StepResultStore::record`](hephaestus_engine_core::ports::StepResultStore::record)
    /// for callers that record inside their own transaction.
    ///
    /// One statement for a new row; a duplicate or a missing instance takes a second one
    /// to tell [`Recorded::Duplicate`] from [`PortError::NotFound`]. Neither aborts the
    /// transaction. Of concurrent records with one key, the later ones wait for the
    /// first to commit (then they are duplicates) or roll back (then one of them
    /// inserts).
    pub async fn record_using(
        &self,
        conn: &mut PgConnection,
        result: &NewStepResult,
    ) -> Result<Recorded, PortError> {
        let columns = Columns::of(&result.payload)?;
        let activation = i32::try_from(result.activation)
            .map_err(|_| out_of_range("activation", result.activation))?;
        let seq: Option<i64> = sqlx::query_scalar(&self.sql.record_result)
            .persistent(self.persistent())
            .bind(result.instance_id)
            .bind(result.step.as_ref().map_or("", StepId::as_str))
            .bind(activation)
            .bind(result.payload.kind().as_str())
            .bind(columns.event)
            .bind(columns.output.as_deref())
            .bind(columns.metadata.as_deref())
            .bind(columns.detail.as_deref())
            .bind(self.clock.now())
            .fetch_optional(&mut *conn)
            .await
            .map_err(port_error)?;
        if let Some(seq) = seq {
            return Ok(Recorded::Inserted(seq));
        }
        let exists: bool = sqlx::query_scalar(&self.sql.instance_exists)
            .persistent(self.persistent())
            .bind(result.instance_id)
            .fetch_one(&mut *conn)
            .await
            .map_err(port_error)?;
        if exists {
            Ok(Recorded::Duplicate)
        } else {
            Err(PortError::NotFound(format!(
                "instance {}",
                result.instance_id
            )))
        }
    }

    /// The unprocessed results of an instance in `seq` order, through any executor (in
    /// the single writer's transaction: including what it recorded and excluding what
    /// it marked). One statement, served by the partial index of unprocessed rows.
    pub async fn pending_using<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
        instance_id: Uuid,
    ) -> Result<Vec<StepResult>, PortError> {
        let rows = sqlx::query(&self.sql.pending_results)
            .persistent(self.persistent())
            .bind(instance_id)
            .fetch_all(executor)
            .await
            .map_err(port_error)?;
        rows.iter().map(decode_result).collect()
    }

    /// Marks results of `instance_id` processed, in one statement (none for an empty
    /// list). Seqs of other instances are left alone.
    pub async fn mark_processed_using<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
        instance_id: Uuid,
        seqs: &[i64],
    ) -> Result<(), PortError> {
        if seqs.is_empty() {
            return Ok(());
        }
        sqlx::query(&self.sql.mark_processed)
            .persistent(self.persistent())
            .bind(instance_id)
            .bind(seqs)
            .bind(self.clock.now())
            .execute(executor)
            .await
            .map_err(port_error)?;
        Ok(())
    }

    /// Marks unprocessed results of `instance_id` processed as refused, each with its
    /// reason, in one statement (none for an empty list): they keep their row and no
    /// longer hold their slot in the dedupe index.
    pub async fn refuse_using<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
        instance_id: Uuid,
        refused: &[(i64, String)],
    ) -> Result<(), PortError> {
        if refused.is_empty() {
            return Ok(());
        }
        let seqs: Vec<i64> = refused.iter().map(|(seq, _)| *seq).collect();
        let reasons: Vec<String> = refused
            .iter()
            .map(|(_, reason)| reason.replace('\0', "\u{fffd}"))
            .collect();
        sqlx::query(&self.sql.refuse_results)
            .persistent(self.persistent())
            .bind(instance_id)
            .bind(&seqs)
            .bind(&reasons)
            .bind(self.clock.now())
            .execute(executor)
            .await
            .map_err(port_error)?;
        Ok(())
    }

    /// The refused results of an instance, in arrival order, through any executor.
    pub async fn refused_using<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
        instance_id: Uuid,
    ) -> Result<Vec<Refused>, PortError> {
        let rows = sqlx::query(&self.sql.refused_results)
            .persistent(self.persistent())
            .bind(instance_id)
            .fetch_all(executor)
            .await
            .map_err(port_error)?;
        rows.iter()
            .map(|row| {
                let seq: i64 = row.try_get("seq").map_err(port_error)?;
                let step: String = row.try_get("step_id").map_err(port_error)?;
                let activation: i32 = row.try_get("activation").map_err(port_error)?;
                let kind: String = row.try_get("kind").map_err(port_error)?;
                let reason: String = row.try_get("refusal").map_err(port_error)?;
                columns::refused(seq, &step, i64::from(activation), &kind, reason)
                    .map_err(|problem| PortError::Corrupt(format!("step result {seq}: {problem}")))
            })
            .collect()
    }

    /// Whether a completion, async marker or failure is recorded for this step
    /// activation (processed or not, and not refused), through any executor.
    pub async fn is_recorded_using<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
        instance_id: Uuid,
        step: &StepId,
        activation: u32,
    ) -> Result<bool, PortError> {
        let Ok(activation) = i32::try_from(activation) else {
            // No stored activation is that large.
            return Ok(false);
        };
        sqlx::query_scalar(&self.sql.is_recorded)
            .persistent(self.persistent())
            .bind(instance_id)
            .bind(step.as_str())
            .bind(activation)
            .fetch_one(executor)
            .await
            .map_err(port_error)
    }

    /// Deletes results processed before `before`, at most `batch` rows per statement
    /// (each its own short transaction, so pruning never holds many row locks), until
    /// none is left; returns how many.
    pub async fn prune_processed_in_batches(
        &self,
        before: DateTime<Utc>,
        batch: u32,
    ) -> Result<u64, PortError> {
        let batch = batch.max(1);
        let mut total = 0;
        loop {
            let deleted = sqlx::query(&self.sql.prune_processed)
                .persistent(self.persistent())
                .bind(before)
                .bind(i64::from(batch))
                .execute(self.pooled())
                .await
                .map_err(port_error)?
                .rows_affected();
            total += deleted;
            if deleted < u64::from(batch) {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hephaestus_engine_core::step::EventName;

    #[test]
    fn payloads_map_to_columns() {
        let completed = ResultPayload::Completed {
            event: EventName("done".to_owned()),
            output: serde_json::json!({"a": 1}),
            metadata: Map::new(),
        };
        let c = Columns::of(&completed).unwrap();
        assert_eq!(
            (c.event, c.output.as_deref(), c.metadata.as_deref()),
            (Some("done"), Some(r#"{"a":1}"#), Some("{}"))
        );
        let with_timer = ResultPayload::Async {
            timer_after_ms: Some(1500),
            timer_event: Some(EventName("timeout".to_owned())),
        };
        let c = Columns::of(&with_timer).unwrap();
        assert_eq!(
            (c.event, c.detail.as_deref()),
            (Some("timeout"), Some(r#"{"timer_after_ms":1500}"#))
        );
        let bare = ResultPayload::Cancel { reason: None };
        let c = Columns::of(&bare).unwrap();
        assert!(c.event.is_none() && c.output.is_none() && c.detail.is_none());
        let nul_event = ResultPayload::Completed {
            event: EventName("d\u{0}".to_owned()),
            output: Value::Null,
            metadata: Map::new(),
        };
        assert!(matches!(
            Columns::of(&nul_event),
            Err(PortError::InvalidInput(_))
        ));
    }
}
