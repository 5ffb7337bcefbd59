//! Job events: every transition a runtime (or the drain helper) makes is
//! a `tracing` event (target `hephaestus_queue`) and a typed [`JobEvent`]
//! on a broadcast subscription ([`Events::subscribe`]), plus metrics
//! through the `metrics` facade:
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `hephaestus_queue_jobs` | gauge: jobs per queue and state (leader, periodic) | `queue`, `state` |
//! | `hephaestus_queue_job_wait_seconds` | histogram: due (`scheduled_at`) to start | `queue` |
//! | `hephaestus_queue_job_run_seconds` | histogram: user code run time | `queue`, `kind`, `outcome` |
//! | `hephaestus_queue_jobs_finished_total` | counter: attempts by outcome | `queue`, `kind`, `outcome` |
//!
//! A subscriber that falls more than the channel capacity behind misses
//! events (`RecvError::Lagged`); the database stays the source of truth.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hephaestus_engine_core::ports::{JobId, JobLease};
use hephaestus_engine_core::step::StepError;
use tokio::sync::broadcast;

/// What happened to a job.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum JobEventKind {
    /// An attempt started (the job was claimed and its worker called).
    Started,
    /// The attempt completed and the completion was committed.
    Completed,
    /// The attempt failed; the job is due again at `retry_at`.
    Retried {
        /// When it is due again.
        retry_at: DateTime<Utc>,
    },
    /// The job was discarded (and the discard hook committed with it).
    Discarded,
    /// The discard hook failed: the discard was rolled back and the job is
    /// due again at `retry_at`.
    DiscardHookFailed {
        /// When it is due again.
        retry_at: DateTime<Utc>,
    },
    /// The worker snoozed the job until `until`.
    Snoozed {
        /// When it is due again.
        until: DateTime<Utc>,
    },
    /// The worker gave up on the job ([`crate::JobError::Cancel`]). (A job
    /// cancelled from outside while running reports `StopRequested`, then
    /// `Fenced` when its worker returns.)
    Cancelled,
    /// The running worker was told to stop (cancelled, lease lost, or the
    /// grace period of a shutdown ran out).
    StopRequested,
    /// The rescuer made a job whose worker stopped heartbeating due again.
    Rescued,
    /// An acknowledgement did not hold: the job was no longer executing at
    /// this attempt (rescued, cancelled), so nothing changed.
    Fenced,
    /// The worker settled the attempt itself, in its own transaction
    /// ([`crate::JobContext::mark_settled`]).
    SettledByWorker,
}

impl JobEventKind {
    /// A short name (`started`, `completed`, ...), used as the `outcome`
    /// label and in tracing events.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Completed => "completed",
            Self::Retried { .. } => "retried",
            Self::Discarded => "discarded",
            Self::DiscardHookFailed { .. } => "discard_hook_failed",
            Self::Snoozed { .. } => "snoozed",
            Self::Cancelled => "cancelled",
            Self::StopRequested => "stop_requested",
            Self::Rescued => "rescued",
            Self::Fenced => "fenced",
            Self::SettledByWorker => "settled_by_worker",
        }
    }
}

/// One job transition.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct JobEvent {
    /// What happened.
    pub kind: JobEventKind,
    /// The job.
    pub job: JobId,
    /// Its queue.
    pub queue: String,
    /// Its worker kind.
    pub worker: String,
    /// The attempt concerned.
    pub attempt: u32,
    /// The attempt's error, for failures.
    pub error: Option<StepError>,
    /// How long user code ran, for finished attempts.
    pub run_time: Option<Duration>,
}

/// How many events of each kind were emitted (cheap counters, always on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventCounts {
    /// Attempts started.
    pub started: u64,
    /// Attempts completed.
    pub completed: u64,
    /// Attempts failed and retried (discard-hook failures included).
    pub retried: u64,
    /// Jobs discarded.
    pub discarded: u64,
    /// Jobs snoozed.
    pub snoozed: u64,
    /// Jobs cancelled by their worker.
    pub cancelled: u64,
    /// Stop requests delivered to running jobs.
    pub stop_requested: u64,
    /// Jobs rescued.
    pub rescued: u64,
    /// Acknowledgements fenced off.
    pub fenced: u64,
    /// Attempts their worker settled itself.
    pub settled_by_worker: u64,
}

#[derive(Debug, Default)]
struct Counters([AtomicU64; 10]);

impl Counters {
    fn slot(kind: &JobEventKind) -> usize {
        match kind {
            JobEventKind::Started => 0,
            JobEventKind::Completed => 1,
            JobEventKind::Retried { .. } | JobEventKind::DiscardHookFailed { .. } => 2,
            JobEventKind::Discarded => 3,
            JobEventKind::Snoozed { .. } => 4,
            JobEventKind::Cancelled => 5,
            JobEventKind::StopRequested => 6,
            JobEventKind::Rescued => 7,
            JobEventKind::Fenced => 8,
            JobEventKind::SettledByWorker => 9,
        }
    }
}

/// The broadcast side of a runtime's job events, with counters.
#[derive(Debug, Clone)]
pub struct Events {
    tx: broadcast::Sender<JobEvent>,
    counts: Arc<Counters>,
}

impl Events {
    /// A channel keeping up to `capacity` events per lagging subscriber.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self {
            tx,
            counts: Arc::default(),
        }
    }

    /// The counts so far.
    pub fn counts(&self) -> EventCounts {
        let c = |i: usize| self.counts.0[i].load(Ordering::Relaxed);
        EventCounts {
            started: c(0),
            completed: c(1),
            retried: c(2),
            discarded: c(3),
            snoozed: c(4),
            cancelled: c(5),
            stop_requested: c(6),
            rescued: c(7),
            fenced: c(8),
            settled_by_worker: c(9),
        }
    }

    /// Every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.tx.subscribe()
    }

    /// Emits an event about `lease` (tracing always; the broadcast only when
    /// someone listens).
    pub(crate) fn emit(
        &self,
        lease: &JobLease,
        kind: JobEventKind,
        error: Option<&StepError>,
        run_time: Option<Duration>,
    ) {
        let (job, queue, worker, attempt) = (lease.id, &lease.queue, &lease.kind, lease.attempt);
        self.counts.0[Counters::slot(&kind)].fetch_add(1, Ordering::Relaxed);
        match kind {
            JobEventKind::Rescued => {
                metrics::counter!("hephaestus_queue_jobs_rescued_total", "queue" => queue.clone())
                    .increment(1);
            }
            JobEventKind::Fenced => {
                metrics::counter!("hephaestus_queue_jobs_fenced_total", "queue" => queue.clone())
                    .increment(1);
            }
            _ => {}
        }
        if let Some(error) = &error {
            tracing::info!(
                target: "hephaestus_queue",
                event = kind.name(),
                job = job.0,
                queue,
                worker,
                attempt,
                error = %error.message,
                "job {}",
                kind.name()
            );
        } else {
            tracing::debug!(
                target: "hephaestus_queue",
                event = kind.name(),
                job = job.0,
                queue,
                worker,
                attempt,
                "job {}",
                kind.name()
            );
        }
        if self.tx.receiver_count() > 0 {
            // Nobody listening between the check and the send is fine.
            let _ = self.tx.send(JobEvent {
                kind,
                job,
                queue: queue.to_owned(),
                worker: worker.to_owned(),
                attempt,
                error: error.cloned(),
                run_time,
            });
        }
    }
}

impl Default for Events {
    fn default() -> Self {
        Self::new(1024)
    }
}

/// Records the run time and outcome of a finished attempt.
pub(crate) fn record_attempt(lease: &JobLease, outcome: &'static str, run_time: Duration) {
    let labels = [
        ("queue", lease.queue.clone()),
        ("kind", lease.kind.clone()),
        ("outcome", outcome.to_owned()),
    ];
    metrics::histogram!("hephaestus_queue_job_run_seconds", &labels).record(run_time.as_secs_f64());
    metrics::counter!("hephaestus_queue_jobs_finished_total", &labels).increment(1);
}

/// Records how long a job waited between being due and starting.
pub(crate) fn record_wait(lease: &JobLease, started: DateTime<Utc>) {
    let wait = (started - lease.scheduled_at)
        .to_std()
        .unwrap_or(Duration::ZERO);
    metrics::histogram!("hephaestus_queue_job_wait_seconds", "queue" => lease.queue.clone())
        .record(wait.as_secs_f64());
}
