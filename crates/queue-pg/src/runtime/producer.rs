//! The producer of one queue: fetches due jobs in batches sized to the free
//! slots of the queue's concurrency limit and spawns a task per job.
//!
//! It fetches when woken (a NOTIFY for its queue, or a slot freed while a
//! backlog remains), when the earliest announced due time of a scheduled or
//! retried job arrives (see [`Wakes::due_at`]), or when the poll interval
//! passes. While the last fetch
//! came back full (a backlog), it keeps fetching as slots free up, waiting
//! for at least an eighth of the slots so that fetches stay batched.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hephaestus_engine_core::ports::JobLease;
use hephaestus_engine_core::step::{CancellationSignal, lock_ignoring_poison};
use tokio::sync::{Notify, Semaphore};

use super::Shared;
use super::executor::run_job;
use super::service::{Service, sleep_or_stop};
use crate::worker::JobContext;

/// How a producer is woken from outside.
#[derive(Debug, Default)]
pub(crate) struct Wakes {
    /// Jobs are due now.
    jobs_available: Notify,
    /// The earliest announced due time changed.
    due_changed: Notify,
    /// The announced due times not reached yet (at most [`MAX_DUE_TIMES`];
    /// past that the latest are forgotten, and the poll finds their jobs).
    due: Mutex<BTreeSet<DateTime<Utc>>>,
}

/// How many future due times a producer remembers.
const MAX_DUE_TIMES: usize = 4096;

impl Wakes {
    /// Jobs are due now: fetch.
    pub(crate) fn jobs_available(&self) {
        self.jobs_available.notify_one();
    }

    /// A job becomes due at `at`: fetch then (the producer's own poll still
    /// runs if that is sooner).
    pub(crate) fn due_at(&self, at: DateTime<Utc>) {
        let mut due = lock_ignoring_poison(&self.due);
        let earliest = due.first().is_none_or(|first| at < *first);
        due.insert(at);
        if due.len() > MAX_DUE_TIMES {
            due.pop_last();
        }
        drop(due);
        if earliest {
            self.due_changed.notify_one();
        }
    }

    /// How long to sleep before the earliest announced due time (`None`
    /// when none is announced); forgets the due times that have arrived
    /// (zero when any had).
    fn until_due(&self, now: DateTime<Utc>) -> Option<Duration> {
        let mut due = lock_ignoring_poison(&self.due);
        let mut arrived = false;
        while due.first().is_some_and(|first| *first <= now) {
            due.pop_first();
            arrived = true;
        }
        if arrived {
            return Some(Duration::ZERO);
        }
        let next = *due.first()?;
        Some((next - now).to_std().unwrap_or(Duration::ZERO))
    }
}

/// The producer service of one queue.
#[derive(Debug)]
pub(crate) struct Producer {
    service: Service,
    queue: String,
    wakes: Arc<Wakes>,
}

struct ProducerLoop {
    shared: Arc<Shared>,
    queue: String,
    concurrency: usize,
    slots: Arc<Semaphore>,
    wakes: Arc<Wakes>,
    slot_freed: Arc<Notify>,
}

impl Producer {
    /// Starts fetching for `queue` with at most `concurrency` jobs running.
    pub(crate) fn start(shared: Arc<Shared>, queue: String, concurrency: usize) -> Self {
        let wakes = Arc::new(Wakes::default());
        let state = ProducerLoop {
            shared,
            queue: queue.clone(),
            concurrency,
            slots: Arc::new(Semaphore::new(concurrency)),
            wakes: Arc::clone(&wakes),
            slot_freed: Arc::new(Notify::new()),
        };
        let service = Service::spawn("producer", move |stop| state.run(stop));
        Self {
            service,
            queue,
            wakes,
        }
    }

    /// The queue.
    pub(crate) fn queue(&self) -> &str {
        &self.queue
    }

    /// The wake-ups the notifier raises for this queue.
    pub(crate) fn wakes(&self) -> Arc<Wakes> {
        Arc::clone(&self.wakes)
    }

    /// Wakes the producer: jobs may be due.
    pub(crate) fn wake(&self) {
        self.wakes.jobs_available();
    }

    /// Stops fetching (jobs already fetched keep running). Idempotent.
    pub(crate) async fn stop(&self) {
        self.service.stop().await;
    }

    pub(crate) fn signal_stop(&self) {
        self.service.signal_stop();
    }
}

impl ProducerLoop {
    async fn run(self, stop: CancellationSignal) {
        let min_batch = (self.concurrency / 8).max(1);
        let poll = self.shared.config.poll_interval;
        // Fetch at start: jobs may have been inserted while nobody listened.
        let mut backlog = true;
        while !stop.is_cancelled() {
            if !backlog {
                let wait = self
                    .wakes
                    .until_due(self.shared.queue.now())
                    .map_or(poll, |due| due.min(poll));
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = self.wakes.jobs_available.notified() => {}
                    () = tokio::time::sleep(wait) => {}
                    // Recompute the sleep without fetching.
                    () = self.wakes.due_changed.notified() => continue,
                }
                backlog = true;
                continue;
            }
            let free = self.slots.available_permits();
            let running = self.concurrency - free;
            if free == 0 || (running > 0 && free < min_batch) {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = self.slot_freed.notified() => {}
                }
                continue;
            }
            let limit = u32::try_from(free).unwrap_or(u32::MAX);
            let fetched = self
                .shared
                .queue
                .fetch(
                    &self.queue,
                    limit,
                    self.shared.queue.now(),
                    &self.shared.worker_id,
                )
                .await;
            match fetched {
                Ok(leases) => {
                    backlog = leases.len() >= free;
                    for lease in leases {
                        self.spawn_job(lease).await;
                    }
                }
                Err(error) => {
                    tracing::warn!(target: "hephaestus_queue", queue = %self.queue, %error, "fetching jobs failed");
                    if sleep_or_stop(&stop, poll).await {
                        return;
                    }
                }
            }
        }
    }

    async fn spawn_job(&self, lease: JobLease) {
        let slot = match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(slot) => slot,
            // Only this loop takes slots, and it fetched no more than were
            // free; waiting is a fallback that cannot deadlock.
            Err(_) => match Arc::clone(&self.slots).acquire_owned().await {
                Ok(slot) => slot,
                Err(_) => return,
            },
        };
        let job = Arc::new(
            JobContext::new(lease, CancellationSignal::new(), self.shared.queue.clone())
                .in_registry(Arc::clone(&self.shared.running)),
        );
        let id = job.id();
        let in_flight = self.shared.running.insert(Arc::clone(&job));
        let task = tokio::spawn(run_job(
            Arc::clone(&self.shared),
            job,
            slot,
            Arc::clone(&self.slot_freed),
            in_flight,
        ));
        self.shared.running.set_abort(id, task.abort_handle());
    }
}
