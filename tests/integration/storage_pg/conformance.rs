//! The engine-core conformance suites on PostgreSQL: one test per case,
//! each on a fresh, migrated schema that is dropped after it.

use hephaestus_storage_pg::PgStore;

use super::Db;

/// A store over a fresh schema, on a pool large enough for the concurrency
/// cases.
async fn fresh() -> PgStore {
    let db = Db::new().await;
    db.store.clone()
}

/// Drops the case's schema.
async fn drop_schema(store: PgStore) {
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

mod instance_store {
    hephaestus_conformance::conformance_tests!(
        instance_store,
        make: super::fresh,
        run: super::run,
        cleanup: super::drop_schema,
    );
}

mod step_result_store {
    hephaestus_conformance::conformance_tests!(
        step_result_store,
        make: super::fresh,
        run: super::run,
        cleanup: super::drop_schema,
    );
}
