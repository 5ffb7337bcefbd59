//! What a job ends as, and what a settled job hands its worker: the
//! vocabulary every other module of the runner shares (a leaf: it imports
//! nothing of the runner).

use std::sync::Arc;

use hephaestus_engine_core::Workflow;
use hephaestus_engine_core::instance::Instance;
use hephaestus_engine_core::ports::{JobLease, NewStepResult};
use tokio::sync::OwnedSemaphorePermit;
use uuid::Uuid;

/// What became of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    /// It did its work and completed.
    Succeeded,
    /// It had nothing to do (stale, duplicate, instance gone) and completed.
    Skipped,
    /// It failed and will be retried.
    Retried,
    /// It failed for good and was discarded.
    Discarded,
    /// Its lease was no longer valid (cancelled or rescued): nothing landed.
    Fenced,
}

/// Counts of a drain, by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainReport {
    /// Jobs that did their work.
    pub succeeded: usize,
    /// Jobs with nothing to do.
    pub skipped: usize,
    /// Jobs that failed and were rescheduled.
    pub retried: usize,
    /// Jobs discarded.
    pub discarded: usize,
    /// Jobs whose lease was fenced off.
    pub fenced: usize,
}

impl DrainReport {
    pub(crate) fn add(&mut self, outcome: JobOutcome) {
        match outcome {
            JobOutcome::Succeeded => self.succeeded += 1,
            JobOutcome::Skipped => self.skipped += 1,
            JobOutcome::Retried => self.retried += 1,
            JobOutcome::Discarded => self.discarded += 1,
            JobOutcome::Fenced => self.fenced += 1,
        }
    }

    /// Every job run.
    pub fn total(&self) -> usize {
        self.succeeded + self.skipped + self.retried + self.discarded + self.fenced
    }
}

/// A write settled by the batched orchestration.
#[derive(Debug)]
pub(crate) enum Settle {
    /// A step execution's result (completed or async): recorded, applied,
    /// and its job completed.
    Result {
        lease: JobLease,
        wf: Workflow,
        result: NewStepResult,
        /// The caller can run a continuation.
        chain: bool,
        /// The span of the job being settled (its step attempt).
        origin: tracing::Span,
    },
    /// An advance job.
    Advance {
        lease: JobLease,
        instance_id: Uuid,
        /// The caller can run a continuation.
        chain: bool,
        /// The span of the job being settled.
        origin: tracing::Span,
    },
}

impl Settle {
    pub(crate) fn lease(&self) -> &JobLease {
        match self {
            Self::Result { lease, .. } | Self::Advance { lease, .. } => lease,
        }
    }

    pub(crate) fn instance_id(&self) -> Uuid {
        match self {
            Self::Result { result, .. } => result.instance_id,
            Self::Advance { instance_id, .. } => *instance_id,
        }
    }

    pub(crate) fn chain(&self) -> bool {
        match self {
            Self::Result { chain, .. } | Self::Advance { chain, .. } => *chain,
        }
    }

    pub(crate) fn origin(&self) -> &tracing::Span {
        match self {
            Self::Result { origin, .. } | Self::Advance { origin, .. } => origin,
        }
    }
}

/// A step activation this worker claimed while settling, to run next in the
/// same slot: the job, and the instance as the settling unit of work wrote
/// it (the step is active, nothing is recorded for it).
#[derive(Debug)]
pub(crate) struct Continuation {
    pub lease: JobLease,
    pub instance: Arc<Instance>,
    pub wf: Workflow,
    /// One of the runtime's extra slots, for a continuation beyond the
    /// first (it runs in a task of its own).
    pub permit: Option<OwnedSemaphorePermit>,
}

/// How a settled job ended, and what its worker runs next.
#[derive(Debug)]
pub(crate) struct Settled {
    pub outcome: JobOutcome,
    /// Run next in this slot.
    pub next: Option<Continuation>,
    /// Run at once, each in a task of its own (fan-out branches).
    pub extra: Vec<Continuation>,
}

impl From<JobOutcome> for Settled {
    fn from(outcome: JobOutcome) -> Self {
        Self {
            outcome,
            next: None,
            extra: Vec::new(),
        }
    }
}

/// The continuations a worker runs after a settled job.
#[derive(Debug, Default)]
pub(crate) struct ChainStart {
    pub next: Option<Continuation>,
    pub extra: Vec<Continuation>,
}

impl From<Settled> for ChainStart {
    fn from(settled: Settled) -> Self {
        Self {
            next: settled.next,
            extra: settled.extra,
        }
    }
}

/// An execution pre-check: the instance (shared by the requests of one
/// batch) and whether a result is recorded for the activation.
pub(crate) type Preflight = Option<(Arc<Instance>, bool)>;
