//! The rescuer (leader only): executing jobs whose heartbeat is older than
//! `rescue_after` belong to a worker that died or stalled. With attempts
//! left they become due again now (the stall recorded as that attempt's
//! error); without, they are discarded through the discard hook. Their old
//! attempt is fenced off either way.

use std::sync::Arc;

use chrono::TimeDelta;

use super::Shared;
use super::elector::Leadership;
use super::service::{Service, sleep_or_stop};
use crate::error::Error;
use crate::events::JobEventKind;
use crate::execute::Settlement;
use crate::queue::rescue_error;

/// How many stale jobs one pass handles.
const RESCUE_BATCH: u32 = 1_000;

/// The rescuer service.
#[derive(Debug)]
pub(crate) struct Rescuer {
    service: Service,
}

/// What one rescue pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RescueReport {
    /// Jobs made due again.
    pub rescued: usize,
    /// Jobs discarded (no attempt left).
    pub discarded: usize,
}

impl Rescuer {
    pub(crate) fn start(shared: Arc<Shared>, leader: Arc<Leadership>) -> Self {
        let interval = shared.config.rescue_interval;
        let service = Service::spawn("rescuer", move |stop| async move {
            while !sleep_or_stop(&stop, interval).await {
                if leader.is_leader()
                    && let Err(error) = rescue_once(&shared).await
                {
                    tracing::warn!(target: "hephaestus_queue", %error, "rescue pass failed");
                }
            }
        });
        Self { service }
    }

    /// Stops rescuing. Idempotent.
    pub(crate) async fn stop(&self) {
        self.service.stop().await;
    }

    pub(crate) fn signal_stop(&self) {
        self.service.signal_stop();
    }
}

/// One rescue pass.
pub(crate) async fn rescue_once(shared: &Shared) -> Result<RescueReport, Error> {
    let queue = &shared.queue;
    let before =
        queue.now() - TimeDelta::from_std(shared.config.rescue_after).unwrap_or(TimeDelta::MAX);
    let stale = queue.stale_jobs(before, RESCUE_BATCH).await?;
    let (retry, exhausted): (Vec<_>, Vec<_>) = stale
        .into_iter()
        .partition(|s| s.lease.attempt < s.lease.max_attempts);
    let mut report = RescueReport::default();
    let rescued = queue.rescue(&retry, before).await?;
    for job in retry.iter().filter(|s| rescued.contains(&s.lease.id)) {
        report.rescued += 1;
        let error = rescue_error(job);
        tracing::warn!(
            target: "hephaestus_queue",
            job = job.lease.id.0,
            kind = %job.lease.kind,
            error = %error.message,
            "rescued a job whose worker stopped heartbeating"
        );
        shared
            .events
            .emit(&job.lease, JobEventKind::Rescued, Some(&error), None);
    }
    for job in &exhausted {
        let error = rescue_error(job);
        let policy = shared
            .workers
            .get(&job.lease.kind)
            .map_or_else(|| shared.workers.fallback_policy(), |w| w.retry_policy());
        let settled = shared
            .settler()
            .discard_with_hook(&job.lease, &error, &policy, None)
            .await?;
        if settled == Settlement::Discarded {
            report.discarded += 1;
        }
    }
    Ok(report)
}
