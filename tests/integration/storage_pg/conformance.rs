//! The engine-core conformance suites, each case on a fresh schema.

use std::sync::Mutex;

use hephaestus_engine_core::ports::conformance::{self, Report};
use hephaestus_migrations_gen::SchemaPrefix;
use hephaestus_storage_pg::PgStore;

use super::Db;

/// Fresh, migrated schemas for the cases of one suite, all on one pool.
struct Cases {
    db: Db,
    created: Mutex<Vec<SchemaPrefix>>,
}

impl Cases {
    async fn new() -> Self {
        Self {
            db: Db::new().await,
            created: Mutex::new(Vec::new()),
        }
    }

    /// A store over a new schema (`PgStore::migrate` creates it).
    async fn fresh(&self) -> PgStore {
        let prefix = {
            let mut created = self.created.lock().unwrap();
            let name = format!("{}_c{}", self.db.prefix(), created.len());
            let prefix = SchemaPrefix::new(&name).unwrap();
            created.push(prefix.clone());
            prefix
        };
        let store = PgStore::new(self.db.pool.clone(), prefix);
        store.migrate().await.expect("migrate a case schema");
        store
    }

    async fn finish(self, report: &Report, cases: usize) {
        assert!(report.is_ok(), "{report}");
        assert_eq!(report.passed.len(), cases, "{report}");
        let created = std::mem::take(&mut *self.created.lock().unwrap());
        assert_eq!(created.len(), cases, "one schema per case");
        for prefix in created {
            sqlx::raw_sql(&format!("drop schema {} cascade", prefix.quoted()))
                .execute(&self.db.pool)
                .await
                .unwrap();
        }
        self.db.teardown().await;
    }
}

#[tokio::test]
async fn instance_store_conforms() {
    let cases = Cases::new().await;
    let report = conformance::instance_store(|| cases.fresh()).await;
    cases.finish(&report, 15).await;
}

#[tokio::test]
async fn step_result_store_conforms() {
    let cases = Cases::new().await;
    let report = conformance::step_result_store(|| cases.fresh()).await;
    cases.finish(&report, 11).await;
}
