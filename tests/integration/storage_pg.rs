//! hephaestus-storage-pg against PostgreSQL: the engine-core conformance suites, then
//! what the suites cannot see (concurrency at scale, the lock key, JSON fidelity, the
//! query API, schema prefixes, migrations and error mapping).

mod conformance;
mod errors;
mod inbox;
mod json;
mod lock;
mod query;
mod schema;
mod uniqueness;

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use hephaestus_engine_core::business_id::{BusinessId, Scope, UniqueClaim};
use hephaestus_engine_core::context::Context;
use hephaestus_engine_core::ids::{StepId, WorkflowId};
use hephaestus_engine_core::instance::{Instance, InstanceStatus};
use hephaestus_engine_core::ports::{InstanceStore, UnitOfWork};
use hephaestus_migrations_gen::SchemaPrefix;
use hephaestus_storage_pg::PgStore;
use serde_json::{Map, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use crate::support::db::TestSchema;

/// Connections per test pool: the conformance suites run 8 units of work at once and
/// read through the pool meanwhile; the uniqueness tests run 16 starts at once.
const CONNECTIONS: u32 = 20;

/// A fresh schema with the storage tables created by `PgStore::migrate`, and a pool
/// large enough for the concurrency tests. Its `search_path` names a schema that does
/// not exist, so unqualified SQL fails.
pub struct Db {
    pub store: PgStore,
    pub pool: PgPool,
    schema: TestSchema,
}

impl Db {
    pub async fn new() -> Self {
        let schema = TestSchema::new().await;
        let pool = big_pool(&schema).await;
        let store = PgStore::new(pool.clone(), schema.prefix.clone());
        store.migrate().await.expect("migrate");
        Self {
            store,
            pool,
            schema,
        }
    }

    pub fn prefix(&self) -> &SchemaPrefix {
        &self.schema.prefix
    }

    /// A schema-qualified table name.
    pub fn table(&self, name: &str) -> String {
        self.schema.table(name)
    }

    pub async fn teardown(self) {
        self.pool.close().await;
        self.schema.teardown().await;
    }
}

pub async fn big_pool(schema: &TestSchema) -> PgPool {
    PgPoolOptions::new()
        .max_connections(CONNECTIONS)
        .connect_with(schema.pool.connect_options().as_ref().clone())
        .await
        .expect("connect the test pool")
}

pub fn bid(s: &str) -> BusinessId {
    BusinessId::parse(s).expect("valid business id")
}

pub fn wid(s: &str) -> WorkflowId {
    WorkflowId::new(s).expect("valid workflow id")
}

pub fn sid(s: &str) -> StepId {
    StepId::new(s).expect("valid step id")
}

/// A fixed instant with whole microseconds (what `timestamptz` keeps).
pub fn t0() -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH + TimeDelta::microseconds(1_750_000_000_654_321)
}

/// A minimal instance; it claims `business` under `scope` when the scope has claims.
pub fn instance(
    business: &str,
    workflow: &str,
    version: u32,
    scope: Scope,
    status: InstanceStatus,
) -> Instance {
    let business_id = bid(business);
    let workflow_id = wid(workflow);
    Instance {
        id: Uuid::now_v7(),
        unique_claim: UniqueClaim::for_scope(scope, &business_id, &workflow_id, version),
        business_id,
        workflow_id,
        workflow_version: version,
        status,
        context: Context::new(json!({"n": 1})),
        step_configs: BTreeMap::new(),
        runtime_metadata: Map::new(),
        steps: BTreeMap::new(),
        history: Vec::new(),
        failure: None,
        telemetry_metadata: Map::new(),
        created_at: t0(),
        updated_at: t0(),
        revision: 0,
    }
}

/// A pending instance of workflow `orders` v1 claiming `business` within the workflow.
pub fn pending(business: &str) -> Instance {
    instance(
        business,
        "orders",
        1,
        Scope::Workflow,
        InstanceStatus::Pending,
    )
}

pub async fn insert_committed(store: &PgStore, instance: &Instance) {
    let mut tx = store.begin().await.expect("begin");
    store.insert(&mut tx, instance).await.expect("insert");
    store.commit(tx).await.expect("commit");
}
