//! The jobs this process runs: their contexts (for heartbeats and stop
//! requests) while user code runs, and a count of job tasks in flight
//! (user code plus settlement) for graceful shutdown.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hephaestus_engine_core::ports::JobId;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use super::lock_ignoring_poison;
use crate::worker::JobContext;

#[derive(Debug)]
struct Entry {
    job: Arc<JobContext>,
    abort: Option<AbortHandle>,
}

/// Hashes job ids (already unique integers) with one multiplication
/// instead of SipHash: the map is touched twice per job.
#[derive(Debug, Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_i64(&mut self, n: i64) {
        self.0 = u64::from_ne_bytes(n.to_ne_bytes()).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type JobMap = HashMap<JobId, Entry, BuildHasherDefault<IdHasher>>;

/// The running jobs of one runtime.
#[derive(Debug)]
pub(crate) struct Running {
    jobs: Mutex<JobMap>,
    in_flight: AtomicUsize,
    idle: Notify,
}

/// Decrements the in-flight count when the job task ends, however it ends.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Running>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Running {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            jobs: Mutex::new(JobMap::default()),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
        })
    }

    /// Registers a job whose task is about to start.
    pub(crate) fn insert(self: &Arc<Self>, job: Arc<JobContext>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        lock_ignoring_poison(&self.jobs).insert(job.id(), Entry { job, abort: None });
        InFlight(Arc::clone(self))
    }

    /// Registers a job a running job's worker claimed itself (it runs in
    /// that job's task, which the in-flight count already covers): it gets
    /// heartbeats and stop requests until [`Running::finished`].
    pub(crate) fn adopt(&self, job: Arc<JobContext>) {
        lock_ignoring_poison(&self.jobs).insert(job.id(), Entry { job, abort: None });
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

    /// Aborts the tasks still running user code; returns their leases
    /// (id and attempt), by id.
    pub(crate) fn abort_all(&self) -> Vec<(JobId, u32)> {
        let mut jobs = lock_ignoring_poison(&self.jobs);
        let mut leases = Vec::with_capacity(jobs.len());
        for (id, entry) in jobs.drain() {
            if let Some(abort) = entry.abort {
                abort.abort();
            }
            leases.push((id, entry.job.attempt()));
        }
        leases.sort_unstable();
        leases
    }

    /// Waits until no job task is in flight, up to `limit`; returns
    /// whether none is.
    pub(crate) async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            // Registered before the check: a task ending in between wakes us.
            idle.as_mut().enable();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.in_flight.load(Ordering::Acquire) == 0;
            }
        }
    }
}
