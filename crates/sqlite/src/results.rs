//! Step results: the idempotent inbox of each instance. A payload maps to
//! the same columns as in PostgreSQL (`event`, `output`, `metadata`,
//! `detail`), so operators read both alike; `step_id` is `''` for
//! instance-level rows.

use chrono::{DateTime, Utc};
use hephaestus_engine_core::ids::StepId;
use hephaestus_engine_core::ports::{
    NewStepResult, PortError, Recorded, Refused, ResultPayload, StepResult, StepResultStore,
    columns,
};
use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use uuid::Uuid;

use crate::backend::SqliteBackend;
use crate::error::{out_of_range, port_error};
use crate::instances::{check_text, json_text};
use crate::time::{from_micros, micros};
use crate::tx::SqliteTx;

/// How many processed results one `delete` of the pruning removes at most.
const PRUNE_BATCH: i64 = 5_000;

/// A payload as bound to the `event`, `output`, `metadata` and `detail`
/// columns.
#[derive(Default)]
pub(crate) struct Columns<'a> {
    pub(crate) event: Option<&'a str>,
    pub(crate) output: Option<String>,
    pub(crate) metadata: Option<String>,
    pub(crate) detail: Option<String>,
}

impl<'a> Columns<'a> {
    pub(crate) fn of(payload: &'a ResultPayload) -> Result<Self, PortError> {
        fn json<T: Serialize + ?Sized>(value: &T) -> Result<String, PortError> {
            json_text("step result", value)
        }
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

pub(crate) const RESULT_COLUMNS: &str =
    "seq, instance_id, step_id, activation, kind, event, output, metadata, detail, inserted_at";

pub(crate) fn decode_result(row: &SqliteRow) -> Result<StepResult, PortError> {
    let seq: i64 = row.try_get("seq").map_err(port_error)?;
    let corrupt = |problem: String| PortError::Corrupt(format!("step result {seq}: {problem}"));
    let get = |column: &'static str| {
        move |e: sqlx::Error| PortError::Corrupt(format!("step result {seq}, column {column}: {e}"))
    };
    let instance_id: String = row.try_get("instance_id").map_err(get("instance_id"))?;
    let step: String = row.try_get("step_id").map_err(get("step_id"))?;
    let activation: i64 = row.try_get("activation").map_err(get("activation"))?;
    let kind: String = row.try_get("kind").map_err(get("kind"))?;
    let event: Option<String> = row.try_get("event").map_err(get("event"))?;
    let output: Option<String> = row.try_get("output").map_err(get("output"))?;
    let metadata: Option<String> = row.try_get("metadata").map_err(get("metadata"))?;
    let detail: Option<String> = row.try_get("detail").map_err(get("detail"))?;
    let inserted_at: i64 = row.try_get("inserted_at").map_err(get("inserted_at"))?;

    let parse = |column: &str, text: Option<String>| -> Result<Option<Value>, PortError> {
        text.map(|t| serde_json::from_str::<Value>(&t))
            .transpose()
            .map_err(|e| corrupt(format!("{column}: {e}")))
    };
    let output = parse("output", output)?;
    let metadata: Option<Map<String, Value>> = match parse("metadata", metadata)? {
        None => None,
        Some(Value::Object(m)) => Some(m),
        Some(other) => return Err(corrupt(format!("metadata is not an object: {other}"))),
    };
    let detail = parse("detail", detail)?;
    let payload = columns::payload(&kind, event, output, metadata, detail).map_err(corrupt)?;
    Ok(StepResult {
        seq,
        result: NewStepResult {
            instance_id: Uuid::parse_str(&instance_id)
                .map_err(|e| corrupt(format!("instance_id: {e}")))?,
            step: columns::step_of(&step).map_err(corrupt)?,
            activation: columns::activation_of(activation).map_err(corrupt)?,
            payload,
        },
        inserted_at: from_micros(inserted_at).map_err(|e| corrupt(format!("inserted_at: {e}")))?,
    })
}

/// A JSON array of `seqs`, for `json_each` (SQLite has no array binds).
fn seq_list(seqs: &[i64]) -> String {
    Value::from(seqs.to_vec()).to_string()
}

#[async_trait::async_trait]
impl StepResultStore for SqliteBackend {
    async fn record(
        &self,
        tx: &mut SqliteTx,
        result: &NewStepResult,
    ) -> Result<Recorded, PortError> {
        let columns = Columns::of(&result.payload)?;
        if i32::try_from(result.activation).is_err() {
            return Err(out_of_range("activation", result.activation));
        }
        let now = micros(self.shared.now());
        let conn = tx.writer().await?;
        // `where exists`: a missing instance inserts nothing (and the unit of
        // work stays usable); `on conflict do nothing`: a duplicate neither.
        let seq: Option<i64> = sqlx::query_scalar(
            r"insert into hephaestus_step_results
    (instance_id, step_id, activation, kind, event, output, metadata, detail, inserted_at)
select ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9
where exists (select 1 from hephaestus_instances where id = ?1)
on conflict do nothing
returning seq",
        )
        .bind(result.instance_id.to_string())
        .bind(result.step.as_ref().map_or("", StepId::as_str))
        .bind(i64::from(result.activation))
        .bind(result.payload.kind().as_str())
        .bind(columns.event)
        .bind(columns.output.as_deref())
        .bind(columns.metadata.as_deref())
        .bind(columns.detail.as_deref())
        .bind(now)
        .fetch_optional(&mut *conn)
        .await
        .map_err(port_error)?;
        if let Some(seq) = seq {
            tx.changed();
            return Ok(Recorded::Inserted(seq));
        }
        let exists: bool =
            sqlx::query_scalar("select exists (select 1 from hephaestus_instances where id = ?1)")
                .bind(result.instance_id.to_string())
                .fetch_one(&mut *conn)
                .await
                .map_err(port_error)?;
        tx.release_if_clean().await;
        if exists {
            Ok(Recorded::Duplicate)
        } else {
            Err(PortError::NotFound(format!(
                "instance {}",
                result.instance_id
            )))
        }
    }

    async fn pending(
        &self,
        tx: &mut SqliteTx,
        instance_id: Uuid,
    ) -> Result<Vec<StepResult>, PortError> {
        let sql = format!(
            "select {RESULT_COLUMNS} from hephaestus_step_results
where instance_id = ?1 and processed_at is null
order by seq"
        );
        let query = sqlx::query(&sql).bind(instance_id.to_string());
        let rows = match tx.write.as_mut() {
            Some(conn) => query.fetch_all(&mut **conn).await,
            None => query.fetch_all(&self.shared.pool).await,
        }
        .map_err(port_error)?;
        rows.iter().map(decode_result).collect()
    }

    async fn mark_processed(
        &self,
        tx: &mut SqliteTx,
        instance_id: Uuid,
        seqs: &[i64],
    ) -> Result<(), PortError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let now = micros(self.shared.now());
        let conn = tx.writer().await?;
        sqlx::query(
            r"update hephaestus_step_results set processed_at = ?3
where instance_id = ?1 and seq in (select value from json_each(?2)) and processed_at is null",
        )
        .bind(instance_id.to_string())
        .bind(seq_list(seqs))
        .bind(now)
        .execute(conn)
        .await
        .map_err(port_error)?;
        tx.changed();
        Ok(())
    }

    async fn refuse(
        &self,
        tx: &mut SqliteTx,
        instance_id: Uuid,
        refused: &[(i64, String)],
    ) -> Result<(), PortError> {
        if refused.is_empty() {
            return Ok(());
        }
        for (_, reason) in refused {
            check_text("refusal reason", reason)?;
        }
        let now = micros(self.shared.now());
        let conn = tx.writer().await?;
        for (seq, reason) in refused {
            sqlx::query(
                r"update hephaestus_step_results set processed_at = ?3, refusal = ?4
where instance_id = ?1 and seq = ?2 and processed_at is null",
            )
            .bind(instance_id.to_string())
            .bind(seq)
            .bind(now)
            .bind(reason)
            .execute(&mut *conn)
            .await
            .map_err(port_error)?;
        }
        tx.changed();
        Ok(())
    }

    async fn refused(&self, instance_id: Uuid) -> Result<Vec<Refused>, PortError> {
        let rows = sqlx::query(
            r"select seq, step_id, activation, kind, refusal from hephaestus_step_results
where instance_id = ?1 and refusal is not null
order by seq",
        )
        .bind(instance_id.to_string())
        .fetch_all(&self.shared.pool)
        .await
        .map_err(port_error)?;
        rows.iter()
            .map(|row| {
                let seq: i64 = row.try_get("seq").map_err(port_error)?;
                let step: String = row.try_get("step_id").map_err(port_error)?;
                let activation: i64 = row.try_get("activation").map_err(port_error)?;
                let kind: String = row.try_get("kind").map_err(port_error)?;
                let reason: String = row.try_get("refusal").map_err(port_error)?;
                columns::refused(seq, &step, activation, &kind, reason)
                    .map_err(|problem| PortError::Corrupt(format!("step result {seq}: {problem}")))
            })
            .collect()
    }

    async fn is_recorded(
        &self,
        instance_id: Uuid,
        step: &StepId,
        activation: u32,
    ) -> Result<bool, PortError> {
        sqlx::query_scalar(
            r"select exists (
    select 1 from hephaestus_step_results
    where instance_id = ?1 and step_id = ?2 and activation = ?3
        and kind in ('completed', 'async', 'failed') and refusal is null
)",
        )
        .bind(instance_id.to_string())
        .bind(step.as_str())
        .bind(i64::from(activation))
        .fetch_one(&self.shared.pool)
        .await
        .map_err(port_error)
    }

    async fn prune_processed(&self, before: DateTime<Utc>) -> Result<u64, PortError> {
        let mut total = 0_u64;
        loop {
            let mut write = self.shared.own_write().await?;
            let deleted = sqlx::query(
                r"delete from hephaestus_step_results
where seq in (
    select seq from hephaestus_step_results where processed_at < ?1 limit ?2
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
}
