//! Heartbeats: one batched UPDATE per interval for every job this process
//! runs. A lease that no longer holds (the job was cancelled, or rescued
//! after a stall) gets its stop signal: this is also how a worker learns of
//! a cancel in poll-only mode.

use std::collections::HashSet;
use std::sync::Arc;

use hephaestus_engine_core::ports::JobId;

use super::Shared;
use super::service::{Service, sleep_or_stop};
use crate::events::JobEventKind;

/// The heartbeat service.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    service: Service,
}

impl Heartbeat {
    pub(crate) fn start(shared: Arc<Shared>) -> Self {
        let interval = shared.config.heartbeat_interval;
        let service = Service::spawn("heartbeat", move |stop| async move {
            while !sleep_or_stop(&stop, interval).await {
                beat(&shared).await;
            }
        });
        Self { service }
    }

    /// Stops beating. Idempotent.
    pub(crate) async fn stop(&self) {
        self.service.stop().await;
    }

    pub(crate) fn signal_stop(&self) {
        self.service.signal_stop();
    }
}

/// One heartbeat of every running lease.
pub(crate) async fn beat(shared: &Shared) {
    let leases = shared.running.leases();
    if leases.is_empty() {
        return;
    }
    match shared.queue.heartbeat(&leases).await {
        Ok(held) => {
            let held: HashSet<JobId> = held.into_iter().collect();
            for (id, attempt) in leases {
                if !held.contains(&id)
                    && let Some(job) = shared.running.request_stop(id, Some(attempt))
                {
                    shared
                        .events
                        .emit(job.lease(), JobEventKind::StopRequested, None, None);
                }
            }
        }
        Err(error) => {
            tracing::warn!(target: "hephaestus_queue", %error, jobs = leases.len(), "heartbeat failed");
        }
    }
}
