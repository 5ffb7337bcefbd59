//! Batched completion: job tasks hand successful attempts over; one loop
//! completes everything that queued up while the previous statement ran,
//! in ONE fenced statement (group commit). Under load batches grow by
//! themselves; on an idle queue a completion is written at once.

use std::sync::Arc;
use std::time::Duration;

use hephaestus_engine_core::ports::JobId;
use tokio::sync::mpsc;

use super::service::{Service, sleep_or_stop};
use crate::events::{Events, JobEventKind, record_attempt};
use crate::execute::fenced;
use crate::queue::PgQueue;
use crate::worker::JobContext;

/// A successful attempt waiting to be completed.
#[derive(Debug)]
pub(crate) struct Ack {
    pub job: Arc<JobContext>,
    pub run_time: Duration,
}

/// How often a failed completion statement is tried again before the jobs
/// are left to the rescuer.
const FLUSH_TRIES: u32 = 4;

/// The completer service.
#[derive(Debug)]
pub(crate) struct Completer {
    service: Service,
}

impl Completer {
    /// Starts completing what arrives on `acks`, up to `batch` per statement
    /// (deleting the completed rows with `delete`).
    pub(crate) fn start(
        queue: PgQueue,
        events: Events,
        mut acks: mpsc::Receiver<Ack>,
        batch: usize,
        delete: bool,
    ) -> Self {
        let service = Service::spawn("completer", move |stop| async move {
            let mut buffer: Vec<Ack> = Vec::with_capacity(batch);
            loop {
                tokio::select! {
                    biased;
                    received = acks.recv_many(&mut buffer, batch) => {
                        if received == 0 {
                            return;
                        }
                    }
                    () = stop.cancelled() => {
                        // Complete what was handed over, then stop taking more.
                        acks.close();
                        while acks.recv_many(&mut buffer, batch).await > 0 {
                            flush(&queue, &events, &mut buffer, None, delete).await;
                        }
                        return;
                    }
                }
                flush(&queue, &events, &mut buffer, Some(&stop), delete).await;
            }
        });
        Self { service }
    }

    /// Completes what was handed over, then stops. Idempotent.
    pub(crate) async fn stop(&self) {
        self.service.stop().await;
    }

    pub(crate) fn signal_stop(&self) {
        self.service.signal_stop();
    }
}

async fn flush(
    queue: &PgQueue,
    events: &Events,
    buffer: &mut Vec<Ack>,
    stop: Option<&hephaestus_engine_core::step::CancellationSignal>,
    delete: bool,
) {
    if buffer.is_empty() {
        return;
    }
    let leases: Vec<(JobId, u32)> = buffer
        .iter()
        .map(|ack| (ack.job.id(), ack.job.attempt()))
        .collect();
    let mut tries = 0;
    let settled = loop {
        tries += 1;
        let completed = if delete {
            queue.complete_and_delete_many(&leases).await
        } else {
            queue.complete_many(&leases).await
        };
        match completed {
            Ok(settled) => break Some(settled),
            Err(error) if tries < FLUSH_TRIES => {
                tracing::warn!(target: "hephaestus_queue", %error, jobs = leases.len(), "completing jobs failed; trying again");
                let delay = Duration::from_millis(100 << tries);
                match stop {
                    Some(stop) if sleep_or_stop(stop, delay).await => {}
                    _ => tokio::time::sleep(delay).await,
                }
            }
            Err(error) => {
                tracing::error!(target: "hephaestus_queue", %error, jobs = leases.len(), "completing jobs failed; the rescuer will return them");
                break None;
            }
        }
    };
    if let Some(settled) = settled {
        let fenced_out: std::collections::HashSet<JobId> = settled.fenced_out.into_iter().collect();
        for ack in buffer.iter() {
            let lease = ack.job.lease();
            if fenced_out.contains(&lease.id) {
                fenced(events, lease, ack.run_time);
                record_attempt(lease, "fenced", ack.run_time);
            } else {
                events.emit(lease, JobEventKind::Completed, None, Some(ack.run_time));
                record_attempt(lease, "completed", ack.run_time);
            }
        }
    }
    buffer.clear();
}
