//! The discard hook: user code that runs inside the transaction that
//! discards a job, so its writes and the discard commit together or not at
//! all.

use std::fmt;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use hephaestus_engine_core::ports::JobLease;
use hephaestus_engine_core::step::StepError;
use sqlx::{Postgres, Transaction};

use crate::error::BoxError;
use crate::queue::PgQueue;

/// A job being discarded (attempts exhausted, a fatal error, or rescued
/// with no attempt left).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct DiscardedJob<'a> {
    /// The lease of the final attempt.
    pub lease: &'a JobLease,
    /// The final error (already recorded in the transaction).
    pub error: &'a StepError,
    /// When it is discarded (the queue's clock).
    pub at: DateTime<Utc>,
    /// The queue (use its `*_using` forms with `tx` to enqueue atomically).
    pub queue: &'a PgQueue,
    pub(crate) after_commit: &'a AfterCommit,
}

impl DiscardedJob<'_> {
    /// Runs `action` once the discarding transaction has committed, after
    /// the hook returns (telemetry about what the hook wrote, say): never if
    /// it rolls back, so nothing is announced that did not happen.
    pub fn after_commit(&self, action: impl FnOnce() + Send + 'static) {
        crate::runtime::lock_ignoring_poison(&self.after_commit.0).push(Box::new(action));
    }
}

/// What hooks asked to run once a discard has committed, in order.
#[derive(Default)]
pub(crate) struct AfterCommit(Mutex<Vec<Box<dyn FnOnce() + Send>>>);

impl AfterCommit {
    /// Runs every action, in order: call it only after the commit.
    pub(crate) fn run(self) {
        let actions = self
            .0
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for action in actions {
            action();
        }
    }
}

impl fmt::Debug for AfterCommit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let queued = crate::runtime::lock_ignoring_poison(&self.0).len();
        f.debug_tuple("AfterCommit").field(&queued).finish()
    }
}

/// Called inside the discarding transaction. An error rolls the discard
/// back: the job stays `retryable` (the hook failure is recorded as that
/// attempt's error) and the discard is tried again after the backoff.
#[async_trait::async_trait]
pub trait DiscardHook: Send + Sync + 'static {
    /// Runs in `tx`, which already holds the discard.
    async fn on_discard(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        job: DiscardedJob<'_>,
    ) -> Result<(), BoxError>;
}
