//! Instances: insert with atomic uniqueness (the partial unique index of
//! active claims), the single-writer lock, update fenced by the lock, reads.

use chrono::{DateTime, Utc};
use hephaestus_engine_core::business_id::{BusinessId, UniqueClaim};
use hephaestus_engine_core::context::contains_nul;
use hephaestus_engine_core::ids::WorkflowId;
use hephaestus_engine_core::instance::{FailureRecord, Instance, InstanceStatus};
use hephaestus_engine_core::ports::{InstanceFilter, InstanceStore, PortError, columns};
use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use uuid::Uuid;

use crate::backend::SqliteBackend;
use crate::error::{out_of_range, port_error};
use crate::time::{from_micros, micros};
use crate::tx::SqliteTx;

/// The columns every instance read selects, in the order [`decode_instance`]
/// reads them (plus `lock_version`).
pub(crate) const INSTANCE_COLUMNS: &str = "id, business_id, workflow_id, workflow_version, status, unique_claim, \
     state, failure, telemetry_metadata, revision, inserted_at, updated_at, lock_version";

const ACTIVE: &str = "('pending', 'running', 'waiting')";

/// JSON text of `value`, refusing U+0000 (PostgreSQL cannot store it, and
/// the backends agree on what they accept).
pub(crate) fn json_text<T: Serialize + ?Sized>(what: &str, value: &T) -> Result<String, PortError> {
    let json = serde_json::to_value(value)
        .map_err(|e| PortError::InvalidInput(format!("{what} cannot be encoded as JSON: {e}")))?;
    if contains_nul(&json) {
        return Err(PortError::InvalidInput(format!(
            "{what} contains U+0000, which cannot be stored"
        )));
    }
    Ok(json.to_string())
}

/// Refuses U+0000 in a text column.
pub(crate) fn check_text(what: &str, text: &str) -> Result<(), PortError> {
    if text.contains('\0') {
        return Err(PortError::InvalidInput(format!(
            "{what} contains U+0000, which cannot be stored"
        )));
    }
    Ok(())
}

/// An instance's values as bound by insert and update.
pub(crate) struct Encoded {
    pub(crate) id: String,
    pub(crate) version: i64,
    pub(crate) state: String,
    pub(crate) failure: Option<String>,
    pub(crate) telemetry: String,
    pub(crate) revision: i64,
    pub(crate) inserted_at: i64,
    pub(crate) updated_at: i64,
}

impl Encoded {
    pub(crate) fn of(instance: &Instance) -> Result<Self, PortError> {
        let what = |part: &str| format!("instance {} {part}", instance.id);
        check_text("business id", instance.business_id.as_str())?;
        let state = columns::state_of(instance);
        if i32::try_from(instance.workflow_version).is_err() {
            return Err(out_of_range("workflow version", instance.workflow_version));
        }
        Ok(Self {
            id: instance.id.to_string(),
            version: i64::from(instance.workflow_version),
            state: json_text(&what("state"), &state)?,
            failure: instance
                .failure
                .as_ref()
                .map(|f| json_text(&what("failure"), f))
                .transpose()?,
            telemetry: json_text(&what("telemetry metadata"), &instance.telemetry_metadata)?,
            revision: i64::try_from(instance.revision)
                .map_err(|_| out_of_range("revision", instance.revision))?,
            inserted_at: micros(instance.created_at),
            updated_at: micros(instance.updated_at),
        })
    }
}

/// Decodes a row selected with [`INSTANCE_COLUMNS`], with its
/// `lock_version`. A value that does not decode is [`PortError::Corrupt`],
/// naming the instance and the column.
pub(crate) fn decode_instance(row: &SqliteRow) -> Result<(Instance, i64), PortError> {
    let id_text: String = row.try_get("id").map_err(port_error)?;
    let corrupt = |column: &str, problem: &dyn std::fmt::Display| {
        PortError::Corrupt(format!("instance {id_text}, column {column}: {problem}"))
    };
    let get = |column: &'static str| {
        let id_text = id_text.clone();
        move |e: sqlx::Error| {
            PortError::Corrupt(format!("instance {id_text}, column {column}: {e}"))
        }
    };
    let id = Uuid::parse_str(&id_text).map_err(|e| corrupt("id", &e))?;
    let business_id: String = row.try_get("business_id").map_err(get("business_id"))?;
    let workflow_id: String = row.try_get("workflow_id").map_err(get("workflow_id"))?;
    let version: i64 = row
        .try_get("workflow_version")
        .map_err(get("workflow_version"))?;
    let status: String = row.try_get("status").map_err(get("status"))?;
    let claim: Option<String> = row.try_get("unique_claim").map_err(get("unique_claim"))?;
    let state: String = row.try_get("state").map_err(get("state"))?;
    let state: columns::InstanceState =
        serde_json::from_str(&state).map_err(|e| corrupt("state", &e))?;
    let failure: Option<String> = row.try_get("failure").map_err(get("failure"))?;
    let failure: Option<FailureRecord> = failure
        .map(|f| serde_json::from_str(&f))
        .transpose()
        .map_err(|e| corrupt("failure", &e))?;
    let telemetry: String = row
        .try_get("telemetry_metadata")
        .map_err(get("telemetry_metadata"))?;
    let telemetry: Map<String, Value> =
        serde_json::from_str(&telemetry).map_err(|e| corrupt("telemetry_metadata", &e))?;
    let revision: i64 = row.try_get("revision").map_err(get("revision"))?;
    let inserted_at: i64 = row.try_get("inserted_at").map_err(get("inserted_at"))?;
    let updated_at: i64 = row.try_get("updated_at").map_err(get("updated_at"))?;
    let lock_version: i64 = row.try_get("lock_version").map_err(get("lock_version"))?;
    let instance = Instance {
        id,
        business_id: BusinessId::parse(&business_id).map_err(|e| corrupt("business_id", &e))?,
        workflow_id: WorkflowId::new(&workflow_id).map_err(|e| corrupt("workflow_id", &e))?,
        workflow_version: u32::try_from(version)
            .map_err(|_| corrupt("workflow_version", &version))?,
        status: status
            .parse::<InstanceStatus>()
            .map_err(|e| corrupt("status", &e))?,
        unique_claim: claim.map(UniqueClaim::from_stored),
        context: state.context,
        step_configs: state.step_configs,
        runtime_metadata: state.runtime_metadata,
        steps: state.steps,
        history: state.history,
        failure,
        telemetry_metadata: telemetry,
        created_at: from_micros(inserted_at).map_err(|e| corrupt("inserted_at", &e))?,
        updated_at: from_micros(updated_at).map_err(|e| corrupt("updated_at", &e))?,
        revision: u64::try_from(revision).map_err(|_| corrupt("revision", &revision))?,
    };
    Ok((instance, lock_version))
}

/// The active instance holding `claim`, other than `except`.
async fn claim_holder(
    conn: &mut SqliteConnection,
    claim: Option<&str>,
    except: &str,
) -> Result<Option<Uuid>, PortError> {
    let Some(claim) = claim else {
        return Ok(None);
    };
    let holder: Option<String> = sqlx::query_scalar(&format!(
        "select id from hephaestus_instances where unique_claim = ?1 and status in {ACTIVE} and id <> ?2 limit 1"
    ))
    .bind(claim)
    .bind(except)
    .fetch_optional(conn)
    .await
    .map_err(port_error)?;
    holder
        .map(|h| {
            Uuid::parse_str(&h).map_err(|e| PortError::Corrupt(format!("instance id {h}: {e}")))
        })
        .transpose()
}

pub(crate) fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

impl SqliteBackend {
    /// Reads instances through the pool (the committed state).
    async fn select_one(&self, id: Uuid) -> Result<Option<(Instance, i64)>, PortError> {
        let row = sqlx::query(&format!(
            "select {INSTANCE_COLUMNS} from hephaestus_instances where id = ?1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.shared.pool)
        .await
        .map_err(port_error)?;
        row.as_ref().map(decode_instance).transpose()
    }
}

#[async_trait::async_trait]
impl InstanceStore for SqliteBackend {
    async fn insert(&self, tx: &mut SqliteTx, instance: &Instance) -> Result<(), PortError> {
        let e = Encoded::of(instance)?;
        let claim = instance.unique_claim.as_ref().map(UniqueClaim::as_str);
        let conn = tx.writer().await?;
        // `on conflict do nothing` without a target covers the primary key
        // and the partial unique index of active claims. The write lock is
        // held: no other writer can take the claim until this commits.
        let inserted: Option<String> = sqlx::query_scalar(
            r"insert into hephaestus_instances (id, business_id, workflow_id, workflow_version, status,
    unique_claim, state, failure, telemetry_metadata, revision, lock_version, inserted_at, updated_at)
values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 0, ?11, ?12)
on conflict do nothing
returning id",
        )
        .bind(&e.id)
        .bind(instance.business_id.as_str())
        .bind(instance.workflow_id.as_str())
        .bind(e.version)
        .bind(instance.status.as_str())
        .bind(claim)
        .bind(&e.state)
        .bind(e.failure.as_deref())
        .bind(&e.telemetry)
        .bind(e.revision)
        .bind(e.inserted_at)
        .bind(e.updated_at)
        .fetch_optional(&mut *conn)
        .await
        .map_err(port_error)?;
        if inserted.is_some() {
            tx.held.insert(instance.id, 0);
            tx.changed();
            return Ok(());
        }
        let id_taken: bool =
            sqlx::query_scalar("select exists (select 1 from hephaestus_instances where id = ?1)")
                .bind(&e.id)
                .fetch_one(&mut *conn)
                .await
                .map_err(port_error)?;
        let error = if id_taken {
            PortError::AlreadyExists(format!("instance {}", instance.id))
        } else {
            match claim_holder(conn, claim, &e.id).await? {
                Some(holder) => PortError::AlreadyRunning {
                    business_id: instance.business_id.clone(),
                    instance_id: holder,
                },
                None => PortError::Conflict(format!(
                    "instance {} conflicted with a row that no longer exists",
                    instance.id
                )),
            }
        };
        tx.abandon(&error).await;
        Err(error)
    }

    async fn lock(&self, tx: &mut SqliteTx, id: Uuid) -> Result<Option<Instance>, PortError> {
        let held_before = tx.held.contains_key(&id);
        tx.lock_instance(id).await?;
        // Read after the lock: the state the previous holder committed (or
        // this unit of work's own write).
        let sql = format!("select {INSTANCE_COLUMNS} from hephaestus_instances where id = ?1");
        let query = sqlx::query(&sql).bind(id.to_string());
        let row = match tx.write.as_mut() {
            Some(conn) => query.fetch_optional(&mut **conn).await,
            None => query.fetch_optional(&self.shared.pool).await,
        }
        .map_err(port_error)?;
        let Some(row) = row else {
            // A missing instance keeps no lock.
            if !held_before {
                tx.unlock_instance(id);
            }
            return Ok(None);
        };
        match decode_instance(&row) {
            Ok((instance, lock_version)) => {
                tx.held.insert(id, lock_version);
                Ok(Some(instance))
            }
            Err(e) => {
                // The lock is taken: `cancel_status_only` may still end it.
                let lock_version: i64 = row.try_get("lock_version").unwrap_or_default();
                tx.held.insert(id, lock_version);
                Err(e)
            }
        }
    }

    async fn update(&self, tx: &mut SqliteTx, instance: &Instance) -> Result<(), PortError> {
        let e = Encoded::of(instance)?;
        let Some(&seen) = tx.held.get(&instance.id) else {
            let exists = self.select_one(instance.id).await?.is_some();
            return Err(if exists {
                PortError::Conflict(format!(
                    "instance {} is not locked in this unit of work",
                    instance.id
                ))
            } else {
                PortError::NotFound(format!("instance {}", instance.id))
            });
        };
        let claim = instance.unique_claim.as_ref().map(UniqueClaim::as_str);
        let conn = tx.writer().await?;
        // Fenced by the lock version this unit of work saw: a write another
        // process made since (it does not share this process's instance
        // locks) is not overwritten.
        let written = sqlx::query_scalar::<_, i64>(
            r"update hephaestus_instances
set business_id = ?2, workflow_id = ?3, workflow_version = ?4, status = ?5, unique_claim = ?6,
    state = ?7, failure = ?8, telemetry_metadata = ?9, revision = ?10, inserted_at = ?11,
    updated_at = ?12, lock_version = lock_version + 1
where id = ?1 and lock_version = ?13
returning lock_version",
        )
        .bind(&e.id)
        .bind(instance.business_id.as_str())
        .bind(instance.workflow_id.as_str())
        .bind(e.version)
        .bind(instance.status.as_str())
        .bind(claim)
        .bind(&e.state)
        .bind(e.failure.as_deref())
        .bind(&e.telemetry)
        .bind(e.revision)
        .bind(e.inserted_at)
        .bind(e.updated_at)
        .bind(seen)
        .fetch_optional(&mut *conn)
        .await;
        let error = match written {
            Ok(Some(version)) => {
                tx.held.insert(instance.id, version);
                tx.changed();
                return Ok(());
            }
            Ok(None) => {
                let exists: bool = sqlx::query_scalar(
                    "select exists (select 1 from hephaestus_instances where id = ?1)",
                )
                .bind(&e.id)
                .fetch_one(&mut *conn)
                .await
                .map_err(port_error)?;
                if exists {
                    PortError::Conflict(format!(
                        "instance {} was changed by another process since it was locked",
                        instance.id
                    ))
                } else {
                    PortError::NotFound(format!("instance {}", instance.id))
                }
            }
            Err(err) if is_unique_violation(&err) => {
                match claim_holder(conn, claim, &e.id).await? {
                    Some(holder) => PortError::AlreadyRunning {
                        business_id: instance.business_id.clone(),
                        instance_id: holder,
                    },
                    None => port_error(err),
                }
            }
            Err(err) => return Err(port_error(err)),
        };
        tx.abandon(&error).await;
        Err(error)
    }

    async fn cancel_status_only(
        &self,
        tx: &mut SqliteTx,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<bool, PortError> {
        let conn = tx.writer().await?;
        let version: Option<i64> = sqlx::query_scalar(&format!(
            r"update hephaestus_instances
set status = 'cancelled', updated_at = ?2, lock_version = lock_version + 1
where id = ?1 and status in {ACTIVE}
returning lock_version"
        ))
        .bind(id.to_string())
        .bind(micros(now))
        .fetch_optional(&mut *conn)
        .await
        .map_err(port_error)?;
        if let Some(version) = version {
            tx.held.insert(id, version);
            tx.changed();
        } else {
            tx.release_if_clean().await;
        }
        Ok(version.is_some())
    }

    async fn get(&self, id: Uuid) -> Result<Option<Instance>, PortError> {
        Ok(self.select_one(id).await?.map(|(instance, _)| instance))
    }

    async fn list(&self, filter: &InstanceFilter) -> Result<Vec<Instance>, PortError> {
        let mut sql = instance_query(filter, None, None);
        let rows = sql
            .build()
            .fetch_all(&self.shared.pool)
            .await
            .map_err(port_error)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            match decode_instance(row) {
                Ok((instance, _)) => out.push(instance),
                // One bad row never hides the others.
                Err(e) => tracing::warn!(error = %e, "skipping an instance that cannot be decoded"),
            }
        }
        Ok(out)
    }
}

/// The select of the instances matching `filter`, created in `[since,
/// until)` when given, newest first (at most `filter.limit`): what listing
/// and inspecting share.
pub(crate) fn instance_query(
    filter: &InstanceFilter,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> QueryBuilder<'_, Sqlite> {
    let mut sql: QueryBuilder<'_, Sqlite> = QueryBuilder::new(format!(
        "select {INSTANCE_COLUMNS} from hephaestus_instances where 1 = 1"
    ));
    if let Some(business_id) = &filter.business_id {
        sql.push(" and business_id = ")
            .push_bind(business_id.as_str().to_owned());
    }
    if let Some(workflow_id) = &filter.workflow_id {
        sql.push(" and workflow_id = ")
            .push_bind(workflow_id.as_str().to_owned());
    }
    if let Some(version) = filter.workflow_version {
        sql.push(" and workflow_version = ")
            .push_bind(i64::from(version));
    }
    if !filter.statuses.is_empty() {
        sql.push(" and status in (");
        let mut list = sql.separated(", ");
        for status in &filter.statuses {
            list.push_bind(status.as_str());
        }
        sql.push(")");
    }
    if let Some(before) = filter.before_id {
        sql.push(" and id < ").push_bind(before.to_string());
    }
    if let Some(since) = since {
        sql.push(" and inserted_at >= ").push_bind(micros(since));
    }
    if let Some(until) = until {
        sql.push(" and inserted_at < ").push_bind(micros(until));
    }
    sql.push(" order by id desc");
    if let Some(limit) = filter.limit {
        sql.push(" limit ").push_bind(i64::from(limit));
    }
    sql
}
