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

async fn drop_schema(backend: PgBackend) {
    let store = backend.store();
    sqlx::raw_sql(&format!("drop schema {} cascade", store.prefix().quoted()))
        .execute(store.pool())
        .await
        .expect("drop the case's schema");
    store.pool().close().await;
}

fn run<F: std::future::Future>(case: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(case)
}

hephaestus_conformance::backend_conformance_tests!(
    make: fresh,
    run: run,
    cleanup: drop_schema,
);
