//! The batched `Backend` suite on PostgreSQL (`PgBackend`: storage-pg and
//! queue-pg, each batched operation one statement): one test per case, each
//! on a fresh, migrated schema dropped after it.

use hephaestus_queue_pg::PgQueue;
use hephaestus_runner::postgres::PgBackend;
use hephaestus_storage_pg::PgStore;

use crate::support::db::TestSchema;

async fn fresh() -> PgBackend {
    let schema = TestSchema::new().await;
    hephaestus_storage_pg::migrate(&schema.pool, &schema.prefix)
        .await
        .expect("migrate storage");
    hephaestus_queue_pg::migrate(&schema.pool, &schema.prefix)
        .await
        .expect("migrate the queue");
    let pool = schema.pool_with(8).await;
    PgBackend::new(
        PgStore::new(pool.clone(), schema.prefix.clone()),
        PgQueue::new(pool, schema.prefix.clone()),
    )
}

/// Drops the case's schema.
async fn drop_schema(backend: PgBackend) {
    let store = backend.store();
    crate::support::conformance::drop_schema(store.pool(), store.prefix()).await;
}

hephaestus_conformance::backend_conformance_tests!(
    make: fresh,
    run: crate::support::conformance::run,
    cleanup: drop_schema,
);
