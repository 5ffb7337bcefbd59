//! The discard hook: user code that runs inside the transaction that
//! discards a job, so its writes and the discard commit together or not at
//! all.

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
