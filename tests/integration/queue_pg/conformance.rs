//! The engine-core `JobQueue` conformance suite on PostgreSQL: one test per
//! case, each on a fresh schema that is dropped after it.

use hephaestus_queue_pg::PgQueue;

use super::QueueDb;

async fn fresh() -> PgQueue {
    QueueDb::new().await.queue.clone()
}

/// Drops the case's schema.
async fn drop_schema(queue: PgQueue) {
    sqlx::raw_sql(&format!("drop schema {} cascade", queue.prefix().quoted()))
        .execute(queue.pool())
        .await
        .expect("drop the case's schema");
    queue.pool().close().await;
}

fn run<F: std::future::Future>(case: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(case)
}

mod job_queue {
    hephaestus_conformance::conformance_tests!(
        job_queue,
        make: super::fresh,
        run: super::run,
        cleanup: super::drop_schema,
    );
}
