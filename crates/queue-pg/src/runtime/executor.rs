//! The task of one job: run user code outside any transaction (panics
//! captured), free the slot, then settle: a success goes to the batched
//! completer, anything else is settled at once.

use std::sync::Arc;

use tokio::sync::{Notify, OwnedSemaphorePermit};
use tracing::Instrument as _;

use super::Shared;
use super::completer::Ack;
use super::running::InFlight;
use crate::events::{JobEventKind, record_wait};
use crate::execute::{self, Attempt};
use crate::worker::JobContext;

pub(crate) async fn run_job(
    shared: Arc<Shared>,
    job: Arc<JobContext>,
    slot: OwnedSemaphorePermit,
    slot_freed: Arc<Notify>,
    in_flight: InFlight,
) {
    let lease = job.lease();
    record_wait(lease, shared.queue.now());
    shared.events.emit(lease, JobEventKind::Started, None, None);
    let span = tracing::info_span!(
        target: "hephaestus_queue",
        "hephaestus.job",
        job = lease.id.0,
        kind = %lease.kind,
        queue = %lease.queue,
        attempt = lease.attempt
    );
    let ran = execute::run(&shared.workers, &job).instrument(span).await;
    shared.running.finished(job.id());
    drop(slot);
    slot_freed.notify_one();
    if ran.outcome == Attempt::Completed {
        let ack = Ack {
            job: Arc::clone(&job),
            run_time: ran.run_time,
        };
        if shared.acks.send(ack).await.is_err() {
            tracing::warn!(
                target: "hephaestus_queue",
                job = job.id().0,
                "the completer has stopped; the job will be rescued"
            );
        }
    } else if let Err(error) = shared.settler().settle_failure(lease, &ran).await {
        tracing::error!(
            target: "hephaestus_queue",
            job = job.id().0,
            %error,
            "settling a failed attempt failed; the job will be rescued"
        );
    }
    drop(in_flight);
}
