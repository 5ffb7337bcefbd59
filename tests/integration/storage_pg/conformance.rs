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
    crate::support::conformance::drop_schema(store.pool(), store.prefix()).await;
}

mod instance_store {
    hephaestus_conformance::conformance_tests!(
        instance_store,
        make: super::fresh,
        run: crate::support::conformance::run,
        cleanup: super::drop_schema,
    );
}

mod step_result_store {
    hephaestus_conformance::conformance_tests!(
        step_result_store,
        make: super::fresh,
        run: crate::support::conformance::run,
        cleanup: super::drop_schema,
    );
}
