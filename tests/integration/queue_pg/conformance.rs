//! The engine-core `JobQueue` conformance suite on PostgreSQL: one test per
//! case, each on a fresh schema that is dropped after it.

use hephaestus_queue_pg::PgQueue;

use super::QueueDb;

async fn fresh() -> PgQueue {
    QueueDb::new().await.queue.clone()
}

/// Drops the case's schema.
async fn drop_schema(queue: PgQueue) {
    crate::support::conformance::drop_schema(queue.pool(), queue.prefix()).await;
}

mod job_queue {
    hephaestus_conformance::conformance_tests!(
        job_queue,
        make: super::fresh,
        run: crate::support::conformance::run,
        cleanup: super::drop_schema,
    );
}
