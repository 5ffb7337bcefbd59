//! The test helper: run due jobs synchronously, in this task, until none is
//! due, and count how each attempt ended.

use chrono::{DateTime, Utc};
use hephaestus_engine_core::step::CancellationSignal;

use crate::error::Error;
use crate::events::{Events, JobEventKind, record_wait};
use crate::execute::{self, Attempt, Settlement, Settler};
use crate::queue::PgQueue;
use crate::worker::{JobContext, Workers};

/// What to drain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainOptions {
    /// Only this queue (`None`: every queue).
    pub queue: Option<String>,
    /// Stop after this many attempts (`None`: until none is due).
    pub max_jobs: Option<usize>,
    /// Also run jobs scheduled in the future (and retries as soon as they
    /// are scheduled), like Oban's `with_scheduled`.
    pub with_scheduled: bool,
}

impl DrainOptions {
    /// Only this queue.
    #[must_use]
    pub fn with_queue(mut self, value: impl Into<String>) -> Self {
        self.queue = Some(value.into());
        self
    }

    /// Stop after this many attempts.
    #[must_use]
    pub fn with_max_jobs(mut self, value: usize) -> Self {
        self.max_jobs = Some(value);
        self
    }

    /// Also run jobs scheduled in the future.
    #[must_use]
    pub fn with_scheduled(mut self, value: bool) -> Self {
        self.with_scheduled = value;
        self
    }
}

impl DrainOptions {
    /// Every due job of every queue.
    pub fn all() -> Self {
        Self::default()
    }

    /// Every due job of `queue`.
    pub fn queue(queue: impl Into<String>) -> Self {
        Self {
            queue: Some(queue.into()),
            ..Self::default()
        }
    }
}

/// How the drained attempts ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainReport {
    /// Completed.
    pub succeeded: usize,
    /// Failed and due again later (retryable), including failed discard
    /// hooks.
    pub failed: usize,
    /// Discarded.
    pub discarded: usize,
    /// Cancelled by their worker.
    pub cancelled: usize,
    /// Snoozed.
    pub snoozed: usize,
    /// Acknowledgements that did not hold (cancelled while running).
    pub fenced: usize,
}

impl DrainReport {
    /// Attempts run.
    pub fn total(&self) -> usize {
        self.succeeded + self.failed + self.discarded + self.cancelled + self.snoozed + self.fenced
    }
}

/// Runs due jobs one at a time (priority, due time, id), each attempt
/// settled before the next starts, until no job is due at the queue's clock
/// (or at any time, with `with_scheduled`) or `max_jobs` attempts ran.
/// User code runs outside any transaction, as in the runtime; retries,
/// discards (with the discard hook) and snoozes follow the same rules.
pub async fn drain(
    queue: &PgQueue,
    workers: &Workers,
    options: &DrainOptions,
) -> Result<DrainReport, Error> {
    drain_with_events(queue, workers, options, &Events::new(1)).await
}

/// [`drain`], emitting job events on `events`.
pub async fn drain_with_events(
    queue: &PgQueue,
    workers: &Workers,
    options: &DrainOptions,
    events: &Events,
) -> Result<DrainReport, Error> {
    let mut report = DrainReport::default();
    loop {
        if options.max_jobs.is_some_and(|max| report.total() >= max) {
            return Ok(report);
        }
        let now = if options.with_scheduled {
            DateTime::<Utc>::MAX_UTC
        } else {
            queue.now()
        };
        let mut leases = match &options.queue {
            Some(name) => queue.fetch(name, 1, now, "drain").await?,
            None => queue.fetch_any_queue(1, now, "drain").await?,
        };
        let Some(lease) = leases.pop() else {
            return Ok(report);
        };
        let job = JobContext::new(lease, CancellationSignal::new(), queue.clone());
        record_wait(job.lease(), queue.now());
        events.emit(job.lease(), JobEventKind::Started, None, None);
        let ran = execute::run(workers, &job).await;
        let settler = Settler {
            queue,
            workers,
            events,
        };
        let settlement = if ran.outcome == Attempt::Completed {
            settler.complete_now(job.lease(), &ran).await?
        } else {
            settler.settle_failure(job.lease(), &ran).await?
        };
        match settlement {
            Settlement::Completed | Settlement::SettledByWorker => report.succeeded += 1,
            Settlement::Retried | Settlement::HookFailed => report.failed += 1,
            Settlement::Discarded => report.discarded += 1,
            Settlement::Cancelled => report.cancelled += 1,
            Settlement::Snoozed => report.snoozed += 1,
            Settlement::Fenced => report.fenced += 1,
        }
    }
}
