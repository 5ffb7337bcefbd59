//! What the conformance suites' generated tests need on PostgreSQL: a
//! runtime per case, and the case's schema dropped after it.

use hephaestus_migrations_gen::SchemaPrefix;
use sqlx::PgPool;

/// Runs one case to completion on a runtime of its own.
pub fn run<F: std::future::Future>(case: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(case)
}

/// Drops a case's schema and closes its pool.
pub async fn drop_schema(pool: &PgPool, prefix: &SchemaPrefix) {
    hephaestus_queue_pg::drop_schema(pool, prefix)
        .await
        .expect("drop the case's schema");
    pool.close().await;
}
