//! The jobs this process runs: their contexts (for heartbeats and stop
//! requests) while user code runs, and a count of job tasks in flight
//! (user code plus settlement) for graceful shutdown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hephaestus_engine_core::ports::JobId;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::lock_ignoring_poison;
use crate::worker::JobContext;

#[derive(Debug)]
struct Entry {
    job: Arc<JobContext>,
    abort: Option<AbortHandle>,
}

/// The running jobs of one runtime.
#[derive(Debug)]
pub(crate) struct Running {
    jobs: Mutex<HashMap<JobId, Entry>>,
    in_flight: watch::Sender<usize>,
}

/// Decrements the in-flight count when the job task ends, however it ends.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Running>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Running {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            jobs: Mutex::new(HashMap::new()),
            in_flight: watch::Sender::new(0),
        })
    }

    /// Registers a job whose task is about to start.
    pub(crate) fn insert(self: &Arc<Self>, job: Arc<JobContext>) -> InFlight {
        self.in_flight.send_modify(|n| *n += 1);
        lock_ignoring_poison(&self.jobs).insert(job.id(), Entry { job, abort: None });
        InFlight(Arc::clone(self))
    }

    /// Lets a job's user code be aborted at the end of a shutdown.
    pub(crate) fn set_abort(&self, id: JobId, abort: AbortHandle) {
        if let Some(entry) = lock_ignoring_poison(&self.jobs).get_mut(&id) {
            entry.abort = Some(abort);
        }
    }

    /// The job's user code returned: no more heartbeats or stop requests.
    pub(crate) fn finished(&self, id: JobId) {
        lock_ignoring_poison(&self.jobs).remove(&id);
    }

    /// Every running lease, for the heartbeat.
    pub(crate) fn leases(&self) -> Vec<(JobId, u32)> {
        lock_ignoring_poison(&self.jobs)
            .values()
            .map(|e| (e.job.id(), e.job.attempt()))
            .collect()
    }

    /// The ids of the running jobs.
    pub(crate) fn ids(&self) -> Vec<JobId> {
        let mut ids: Vec<JobId> = lock_ignoring_poison(&self.jobs).keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Raises the stop signal of a running job (at `attempt`, if given);
    /// returns its context when it was running and not yet told.
    pub(crate) fn request_stop(&self, id: JobId, attempt: Option<u32>) -> Option<Arc<JobContext>> {
        let jobs = lock_ignoring_poison(&self.jobs);
        let entry = jobs.get(&id)?;
        if attempt.is_some_and(|a| a != entry.job.attempt()) || entry.job.is_cancelled() {
            return None;
        }
        entry.job.cancellation().cancel();
        Some(Arc::clone(&entry.job))
    }

    /// Raises every running job's stop signal; returns those newly told.
    pub(crate) fn request_stop_all(&self) -> Vec<Arc<JobContext>> {
        lock_ignoring_poison(&self.jobs)
            .values()
            .filter(|e| !e.job.is_cancelled())
            .map(|e| {
                e.job.cancellation().cancel();
                Arc::clone(&e.job)
            })
            .collect()
    }

    /// Aborts the tasks still running user code; returns their ids.
    pub(crate) fn abort_all(&self) -> Vec<JobId> {
        let mut jobs = lock_ignoring_poison(&self.jobs);
        let mut ids = Vec::with_capacity(jobs.len());
        for (id, entry) in jobs.drain() {
            if let Some(abort) = entry.abort {
                abort.abort();
            }
            ids.push(id);
        }
        ids.sort_unstable();
        ids
    }

    /// Waits until no job task is in flight, up to `limit`; returns
    /// whether none is.
    pub(crate) async fn wait_idle(&self, limit: Duration) -> bool {
        let mut rx = self.in_flight.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}
