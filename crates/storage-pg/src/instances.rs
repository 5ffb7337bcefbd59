//! Instances: insert with atomic uniqueness, the single-writer lock, update, reads.

use chrono::{DateTime, Utc};
use hephaestus_engine_core::business_id::{BusinessId, UniqueClaim};
use hephaestus_engine_core::ids::WorkflowId;
use hephaestus_engine_core::instance::{FailureRecord, Instance, InstanceStatus};
use hephaestus_engine_core::ports::{InstanceFilter, PortError, columns};
use serde_json::{Map, Value};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor, Postgres, Row};
use uuid::Uuid;

use crate::error::{ACTIVE_CLAIM_INDEX, out_of_range, port_error, unique_violation};
use crate::json::to_jsonb_text;
use crate::lock::instance_lock_key;
use crate::query::{Cursor, InstanceQuery, Order, SortKey};
use crate::store::PgStore;

/// How often an insert is retried when the holder of its claim finished between the
/// conflict and the lookup of the holder.
const INSERT_ATTEMPTS: usize = 5;

/// An instance's values as bound to `$1..$12` of the insert and update statements.
struct Encoded {
    version: i32,
    state: String,
    failure: Option<String>,
    telemetry: String,
    revision: i64,
}

impl Encoded {
    fn of(instance: &Instance) -> Result<Self, PortError> {
        let what = |part: &str| format!("instance {} {part}", instance.id);
        let state = columns::state_of(instance);
        Ok(Self {
            version: i32::try_from(instance.workflow_version)
                .map_err(|_| out_of_range("workflow version", instance.workflow_version))?,
            state: to_jsonb_text(&what("state"), &state)?,
            failure: instance
                .failure
                .as_ref()
                .map(|f| to_jsonb_text(&what("failure"), f))
                .transpose()?,
            telemetry: to_jsonb_text(&what("telemetry metadata"), &instance.telemetry_metadata)?,
            revision: i64::try_from(instance.revision)
                .map_err(|_| out_of_range("revision", instance.revision))?,
        })
    }

    /// Binds `$1..$12` in the column order of the insert and update statements.
    fn bind<'q>(
        &'q self,
        query: Query<'q, Postgres, PgArguments>,
        instance: &'q Instance,
    ) -> Query<'q, Postgres, PgArguments> {
        query
            .bind(instance.id)
            .bind(instance.business_id.as_str())
            .bind(instance.workflow_id.as_str())
            .bind(self.version)
            .bind(instance.status.as_str())
            .bind(instance.unique_claim.as_ref().map(UniqueClaim::as_str))
            .bind(self.state.as_str())
            .bind(self.failure.as_deref())
            .bind(self.telemetry.as_str())
            .bind(self.revision)
            .bind(instance.created_at)
            .bind(instance.updated_at)
    }
}

/// The `state` and `failure` documents of an instance, as bound by the batched
/// update (`crate::batch`).
pub(crate) fn encode_state(instance: &Instance) -> Result<(String, Option<String>), PortError> {
    let encoded = Encoded::of(instance)?;
    Ok((encoded.state, encoded.failure))
}

/// Decodes a row selected with [`crate::store::INSTANCE_COLUMNS`]. A value that does
/// not decode is [`PortError::Corrupt`], naming the instance and the column.
pub(crate) fn decode_instance(row: &PgRow) -> Result<Instance, PortError> {
    let id: Uuid = row.try_get("id").map_err(port_error)?;
    let corrupt = |column: &str, problem: &dyn std::fmt::Display| {
        PortError::Corrupt(format!("instance {id}, column {column}: {problem}"))
    };
    let get = |column: &'static str| {
        move |e: sqlx::Error| PortError::Corrupt(format!("instance {id}, column {column}: {e}"))
    };
    let business_id: String = row.try_get("business_id").map_err(get("business_id"))?;
    let workflow_id: String = row.try_get("workflow_id").map_err(get("workflow_id"))?;
    let version: i32 = row
        .try_get("workflow_version")
        .map_err(get("workflow_version"))?;
    let status: String = row.try_get("status").map_err(get("status"))?;
    let claim: Option<String> = row.try_get("unique_claim").map_err(get("unique_claim"))?;
    let Json(state): Json<columns::InstanceState> = row.try_get("state").map_err(get("state"))?;
    let failure: Option<Json<FailureRecord>> = row.try_get("failure").map_err(get("failure"))?;
    let Json(telemetry): Json<Map<String, Value>> = row
        .try_get("telemetry_metadata")
        .map_err(get("telemetry_metadata"))?;
    let revision: i64 = row.try_get("revision").map_err(get("revision"))?;
    let created_at: DateTime<Utc> = row.try_get("inserted_at").map_err(get("inserted_at"))?;
    let updated_at: DateTime<Utc> = row.try_get("updated_at").map_err(get("updated_at"))?;
    Ok(Instance {
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
        failure: failure.map(|Json(f)| f),
        telemetry_metadata: telemetry,
        created_at,
        updated_at,
        revision: u64::try_from(revision).map_err(|_| corrupt("revision", &revision))?,
    })
}

impl PgStore {
    /// Inserts a new instance on `conn` (a transaction of the caller's, or a plain
    /// connection): [`InstanceStore::insert`](hephaestus_engine_core::ports::InstanceStore::insert)
    /// for callers that start a workflow inside their own transaction.
    ///
    /// One statement (`insert .. on conflict do nothing`) when there is no conflict. With
    /// a conflict the transaction stays usable: a second statement tells
    /// [`PortError::AlreadyExists`] (the id) from [`PortError::AlreadyRunning`] (the
    /// claim, naming the active instance holding it). Of concurrent inserts with one
    /// claim, the later ones wait for the first to commit or roll back, so exactly one
    /// commits.
    pub async fn insert_using(
        &self,
        conn: &mut PgConnection,
        instance: &Instance,
    ) -> Result<(), PortError> {
        let encoded = Encoded::of(instance)?;
        let claim = instance.unique_claim.as_ref().map(UniqueClaim::as_str);
        for _ in 0..INSERT_ATTEMPTS {
            let inserted = encoded
                .bind(
                    sqlx::query(&self.sql.insert_instance).persistent(self.persistent()),
                    instance,
                )
                .fetch_optional(&mut *conn)
                .await
                .map_err(port_error)?;
            if inserted.is_some() {
                return Ok(());
            }
            let (id_taken, holder): (bool, Option<Uuid>) =
                sqlx::query_as(&self.sql.insert_conflict)
                    .persistent(self.persistent())
                    .bind(instance.id)
                    .bind(claim)
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(port_error)?;
            if id_taken {
                return Err(PortError::AlreadyExists(format!(
                    "instance {}",
                    instance.id
                )));
            }
            if let Some(holder) = holder {
                return Err(PortError::AlreadyRunning {
                    business_id: instance.business_id.clone(),
                    instance_id: holder,
                });
            }
            // The holder finished between the conflict and the lookup: try again.
        }
        Err(PortError::Conflict(format!(
            "the claim of instance {} kept changing hands",
            instance.id
        )))
    }

    /// Takes the single-writer lock of instance `id` and loads it, on `conn`, which must
    /// be inside a transaction: the lock is held until that transaction ends.
    ///
    /// One statement: `pg_advisory_xact_lock` with the key of
    /// [`instance_lock_key`](crate::instance_lock_key), and the row read
    /// `for no key update`, so the instance returned is the one the previous holder
    /// committed. `None` when the instance does not exist (no lock is then taken).
    pub async fn lock_using(
        &self,
        conn: &mut PgConnection,
        id: Uuid,
    ) -> Result<Option<Instance>, PortError> {
        let row = sqlx::query(&self.sql.lock_instance)
            .persistent(self.persistent())
            .bind(id)
            .bind(instance_lock_key(&self.prefix, id))
            .fetch_optional(conn)
            .await
            .map_err(port_error)?;
        row.as_ref().map(decode_instance).transpose()
    }

    /// Writes every field of an instance that this transaction locked or inserted
    /// ([`PortError::Conflict`] otherwise, [`PortError::NotFound`] if it does not
    /// exist). One statement.
    ///
    /// Which instances a transaction holds is kept in the transaction-local setting
    /// `hephaestus.held_instances`, appended to by the lock and insert statements; it
    /// vanishes when the transaction ends (and with a rolled-back savepoint).
    pub async fn update_using(
        &self,
        conn: &mut PgConnection,
        instance: &Instance,
    ) -> Result<(), PortError> {
        let encoded = Encoded::of(instance)?;
        let outcome = encoded
            .bind(
                sqlx::query(&self.sql.update_instance).persistent(self.persistent()),
                instance,
            )
            .fetch_one(conn)
            .await
            .and_then(|row| Ok((row.try_get("found")?, row.try_get("written")?)));
        match outcome {
            Ok((_, true)) => Ok(()),
            Ok((true, false)) => Err(PortError::Conflict(format!(
                "instance {} is not locked in this transaction",
                instance.id
            ))),
            Ok((false, false)) => Err(PortError::NotFound(format!("instance {}", instance.id))),
            Err(e) if unique_violation(&e) == Some(ACTIVE_CLAIM_INDEX) => {
                // The transaction is aborted: look the holder up on another connection.
                let holder: Option<Uuid> = sqlx::query_scalar(&self.sql.claim_holder)
                    .persistent(self.persistent())
                    .bind(instance.unique_claim.as_ref().map(UniqueClaim::as_str))
                    .bind(instance.id)
                    .fetch_optional(self.pooled())
                    .await
                    .map_err(port_error)?;
                Err(match holder {
                    Some(holder) => PortError::AlreadyRunning {
                        business_id: instance.business_id.clone(),
                        instance_id: holder,
                    },
                    None => PortError::Conflict(format!(
                        "the claim of instance {} is held by an uncommitted instance",
                        instance.id
                    )),
                })
            }
            Err(e) => Err(port_error(e)),
        }
    }

    /// Reads an instance through any executor (the pool: the committed state; a
    /// transaction: what it sees).
    pub async fn get_using<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
        id: Uuid,
    ) -> Result<Option<Instance>, PortError> {
        let row = sqlx::query(&self.sql.get_instance)
            .persistent(self.persistent())
            .bind(id)
            .fetch_optional(executor)
            .await
            .map_err(port_error)?;
        row.as_ref().map(decode_instance).transpose()
    }

    /// [`InstanceStore::list`](hephaestus_engine_core::ports::InstanceStore::list)
    /// through any executor: newest first (by id), filters pushed into SQL.
    pub async fn list_using<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
        filter: &InstanceFilter,
    ) -> Result<Vec<Instance>, PortError> {
        let query = InstanceQuery {
            business_id: filter.business_id.clone(),
            workflow_id: filter.workflow_id.clone(),
            workflow_version: filter.workflow_version,
            statuses: filter.statuses.clone(),
            order: Order::default(),
            after: filter.before_id.map(|id| Cursor::at_id(SortKey::Id, id)),
            limit: filter.limit,
            ..InstanceQuery::default()
        };
        // Rows that cannot be decoded are skipped (and logged by the query).
        Ok(self.run_query(executor, &query, false).await?.instances)
    }

    /// What can be read of an instance without decoding its state: the plain
    /// columns, the state and failure documents as JSON text (cut to
    /// `max_text` characters), and the error decoding it gives, if any. For
    /// operators looking at an instance that [`PgStore::get_using`] reports
    /// as [`PortError::Corrupt`].
    pub async fn get_raw_using<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
        id: Uuid,
        max_text: u32,
    ) -> Result<Option<RawInstance>, PortError> {
        let Some(row) = sqlx::query(&self.sql.get_raw)
            .persistent(self.persistent())
            .bind(id)
            .bind(i32::try_from(max_text).unwrap_or(i32::MAX))
            .fetch_optional(executor)
            .await
            .map_err(port_error)?
        else {
            return Ok(None);
        };
        let version: i32 = row.try_get("workflow_version").map_err(port_error)?;
        let revision: i64 = row.try_get("revision").map_err(port_error)?;
        Ok(Some(RawInstance {
            id: row.try_get("id").map_err(port_error)?,
            business_id: row.try_get("business_id").map_err(port_error)?,
            workflow_id: row.try_get("workflow_id").map_err(port_error)?,
            workflow_version: u32::try_from(version).unwrap_or(0),
            status: row.try_get("status").map_err(port_error)?,
            revision: u64::try_from(revision).unwrap_or(0),
            inserted_at: row.try_get("inserted_at").map_err(port_error)?,
            updated_at: row.try_get("updated_at").map_err(port_error)?,
            state: row.try_get("state").map_err(port_error)?,
            failure: row.try_get("failure").map_err(port_error)?,
        }))
    }
}

/// An instance row read without decoding its state (see
/// [`PgStore::get_raw_using`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RawInstance {
    /// The id.
    pub id: Uuid,
    /// The business id, as stored.
    pub business_id: String,
    /// The workflow id, as stored.
    pub workflow_id: String,
    /// The version.
    pub workflow_version: u32,
    /// The status, as stored.
    pub status: String,
    /// The revision.
    pub revision: u64,
    /// When it was created.
    pub inserted_at: DateTime<Utc>,
    /// When it was last written.
    pub updated_at: DateTime<Utc>,
    /// The state document as JSON text, cut to the length asked for.
    pub state: String,
    /// The failure document as JSON text, cut likewise.
    pub failure: Option<String>,
}
