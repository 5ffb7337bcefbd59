//! The engine-core `JobQueue` conformance suite on PostgreSQL.

use std::sync::Mutex;

use hephaestus_engine_core::ports::conformance;

use super::QueueDb;

#[tokio::test]
async fn pg_queue_passes_the_job_queue_conformance_suite() {
    let made: Mutex<Vec<QueueDb>> = Mutex::new(Vec::new());
    let report = conformance::job_queue(|| async {
        let db = QueueDb::new().await;
        let queue = db.queue.clone();
        made.lock().unwrap().push(db);
        queue
    })
    .await;
    for db in made.into_inner().unwrap() {
        db.teardown().await;
    }
    report.assert_ok();
}
