//! Workers: the typed [`Worker`] trait, its object-safe form [`DynWorker`]
//! (kinds chosen at run time), the [`JobContext`] a job runs with, the
//! classified [`JobError`], and the [`Workers`] registry (plus the discard
//! hook) that the runtime and the drain helper share.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hephaestus_engine_core::instance::AttemptRecord;
use hephaestus_engine_core::ports::{JobId, JobLease, NewJob};
use hephaestus_engine_core::retry::RetryPolicy;
use hephaestus_engine_core::step::{CancellationSignal, StepError};
use serde::de::DeserializeOwned;
use serde::{Deserialize as _, Serialize};
use serde_json::{Map, Value};

use crate::error::Error;
use crate::hook::DiscardHook;
use crate::queue::PgQueue;
use crate::runtime::running::Running;

/// A typed worker: one job kind, typed args decoded with serde.
///
/// User code runs outside any transaction. Returning `Err` classifies the
/// failure ([`JobError`]); a panic is recorded as a retryable error.
#[async_trait::async_trait]
pub trait Worker: Send + Sync + 'static {
    /// The job kind this worker runs (stored in the `kind` column).
    const KIND: &'static str;
    /// The queue its jobs go to by default ([`Worker::new_job`]).
    const QUEUE: &'static str = "default";
    /// Attempts in all for jobs built by [`Worker::new_job`].
    const MAX_ATTEMPTS: u32 = 20;

    /// The arguments.
    type Args: DeserializeOwned + Send + 'static;

    /// Delays between attempts (its `max_attempts` is not used: the job's
    /// own `max_attempts` decides when it is exhausted).
    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::default()
    }

    /// Runs one attempt.
    async fn perform(&self, job: &JobContext, args: Self::Args) -> Result<(), JobError>;

    /// A job of this kind on [`Worker::QUEUE`] with [`Worker::MAX_ATTEMPTS`].
    fn new_job(args: &Self::Args) -> Result<NewJob, Error>
    where
        Self: Sized,
        Self::Args: Serialize,
    {
        let args = serde_json::to_value(args)
            .map_err(|e| Error::InvalidInput(format!("{} args: {e}", Self::KIND)))?;
        let mut job = NewJob::new(Self::KIND, Self::QUEUE, args);
        job.max_attempts = Self::MAX_ATTEMPTS;
        Ok(job)
    }
}

/// A worker whose kind is chosen at run time, with raw JSON args
/// ([`JobContext::args`]). Every [`Worker`] is one through [`Workers::register`].
#[async_trait::async_trait]
pub trait DynWorker: Send + Sync + 'static {
    /// The job kind.
    fn kind(&self) -> &str;

    /// Delays between attempts.
    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::default()
    }

    /// Runs one attempt.
    async fn perform(&self, job: &JobContext) -> Result<(), JobError>;
}

/// Adapts a typed [`Worker`].
struct Typed<W>(W, PhantomData<fn() -> W>);

#[async_trait::async_trait]
impl<W: Worker> DynWorker for Typed<W> {
    fn kind(&self) -> &str {
        W::KIND
    }

    fn retry_policy(&self) -> RetryPolicy {
        self.0.retry_policy()
    }

    async fn perform(&self, job: &JobContext) -> Result<(), JobError> {
        let args = W::Args::deserialize(job.args()).map_err(|e| {
            JobError::retryable(format!(
                "cannot decode the args of job {} (kind {:?}): {e}",
                job.id(),
                W::KIND
            ))
        })?;
        self.0.perform(job, args).await
    }
}

/// Why an attempt did not complete, and what happens next.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum JobError {
    /// Failed: retried with backoff while attempts remain if the error is
    /// retryable (an explicit `after` overrides the backoff), discarded
    /// otherwise.
    Failed(StepError),
    /// Not now: run again after this delay, without using up an attempt.
    Snooze(Duration),
    /// Give up: the job becomes `cancelled`, with this reason recorded.
    Cancel(String),
}

impl JobError {
    /// A retryable failure.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::Failed(StepError::retryable(message))
    }

    /// A retryable failure with an explicit delay before the next attempt.
    pub fn retry_after(message: impl Into<String>, after: Duration) -> Self {
        Self::Failed(StepError::retry_after(message, after))
    }

    /// A fatal failure: the job is discarded now.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self::Failed(StepError::fatal(message))
    }

    /// Run again after `delay`, without using up an attempt.
    pub fn snooze(delay: Duration) -> Self {
        Self::Snooze(delay)
    }

    /// Cancel the job.
    pub fn cancel(reason: impl Into<String>) -> Self {
        Self::Cancel(reason.into())
    }
}

impl From<StepError> for JobError {
    fn from(error: StepError) -> Self {
        Self::Failed(error)
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Failed(error) => write!(f, "{}", error.message),
            Self::Snooze(delay) => write!(f, "snoozed for {delay:?}"),
            Self::Cancel(reason) => write!(f, "cancelled: {reason}"),
        }
    }
}

impl std::error::Error for JobError {}

/// What a running job sees: its lease (id, attempt, args, meta, earlier
/// errors), a cancellation signal and the queue (to enqueue follow-ups).
#[derive(Debug)]
pub struct JobContext {
    lease: JobLease,
    cancel: CancellationSignal,
    queue: PgQueue,
    settled: AtomicBool,
    /// The running jobs of the runtime running this one (none in a drain).
    registry: Option<Arc<Running>>,
}

/// A job that a running job's worker claimed itself (for example with
/// [`PgQueue::insert_claiming_using`]) and runs in the same task, registered
/// with the runtime like a fetched job: the runtime heartbeats it and
/// forwards stop requests to [`AdoptedJob::cancellation`] until this is
/// dropped. The worker settles it itself.
#[derive(Debug)]
pub struct AdoptedJob {
    job: Arc<JobContext>,
    registry: Arc<Running>,
}

impl AdoptedJob {
    /// The adopted job's context.
    pub fn context(&self) -> &JobContext {
        &self.job
    }

    /// Raised when the adopted job is asked to stop.
    pub fn cancellation(&self) -> &CancellationSignal {
        self.job.cancellation()
    }
}

/// Adopts jobs into a queue runtime's running jobs (see
/// [`JobContext::adopter`]). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Adopter {
    registry: Arc<Running>,
    queue: PgQueue,
}

impl Adopter {
    /// Registers `lease` (see [`JobContext::adopter`]) until the returned
    /// guard is dropped.
    pub fn adopt(&self, lease: JobLease) -> AdoptedJob {
        let job = Arc::new(
            JobContext::new(lease, CancellationSignal::new(), self.queue.clone())
                .in_registry(Arc::clone(&self.registry)),
        );
        self.registry.adopt(Arc::clone(&job));
        AdoptedJob {
            job,
            registry: Arc::clone(&self.registry),
        }
    }
}

impl Drop for AdoptedJob {
    fn drop(&mut self) {
        self.registry.finished(self.job.id());
    }
}

impl JobContext {
    pub(crate) fn new(lease: JobLease, cancel: CancellationSignal, queue: PgQueue) -> Self {
        Self {
            lease,
            cancel,
            queue,
            settled: AtomicBool::new(false),
            registry: None,
        }
    }

    pub(crate) fn in_registry(mut self, registry: Arc<Running>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Adopts jobs into the runtime running this one: a job this worker
    /// claimed itself (for example with [`PgQueue::insert_claiming_using`])
    /// and runs in this job's task or in tasks of its own is heartbeated and
    /// receives stop requests until its [`AdoptedJob`] is dropped. `None`
    /// outside a runtime (a drain): the worker then keeps such jobs alive
    /// itself.
    pub fn adopter(&self) -> Option<Adopter> {
        Some(Adopter {
            registry: Arc::clone(self.registry.as_ref()?),
            queue: self.queue.clone(),
        })
    }

    /// Tells the runtime that the worker settled this attempt itself —
    /// completed, retried or discarded it with the queue's fenced
    /// `*_using` forms ([`PgQueue::complete_using`] and friends) inside its
    /// own transaction, together with its own writes — so the runtime must
    /// not settle it again. Transactional completion: the job's outcome and
    /// the work it did commit together or not at all.
    ///
    /// Whatever `perform` then returns, the runtime only reports the attempt
    /// (event `settled_by_worker`). If the worker's transaction did not
    /// commit, the job stays executing and comes back through the rescuer
    /// once its heartbeats stop.
    pub fn mark_settled(&self) {
        self.settled.store(true, Ordering::Release);
    }

    /// Whether [`JobContext::mark_settled`] was called.
    pub fn is_settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }

    /// The job id.
    pub fn id(&self) -> JobId {
        self.lease.id
    }

    /// The job kind.
    pub fn kind(&self) -> &str {
        &self.lease.kind
    }

    /// The queue name.
    pub fn queue_name(&self) -> &str {
        &self.lease.queue
    }

    /// This attempt (1-based).
    pub fn attempt(&self) -> u32 {
        self.lease.attempt
    }

    /// Attempts in all.
    pub fn max_attempts(&self) -> u32 {
        self.lease.max_attempts
    }

    /// The raw args.
    pub fn args(&self) -> &Value {
        &self.lease.args
    }

    /// The metadata.
    pub fn meta(&self) -> &Map<String, Value> {
        &self.lease.meta
    }

    /// When the job was due.
    pub fn scheduled_at(&self) -> DateTime<Utc> {
        self.lease.scheduled_at
    }

    /// Earlier attempts' errors.
    pub fn errors(&self) -> &[AttemptRecord] {
        &self.lease.errors
    }

    /// The lease (the attempt fences every update of the job).
    pub fn lease(&self) -> &JobLease {
        &self.lease
    }

    /// Whether the job was asked to stop: cancelled, its lease lost (it was
    /// rescued elsewhere), or the runtime's grace period ran out.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves when the job is asked to stop.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// The cancellation signal (to pass on to code that takes one).
    pub fn cancellation(&self) -> &CancellationSignal {
        &self.cancel
    }

    /// The queue the job came from.
    pub fn queue(&self) -> &PgQueue {
        &self.queue
    }
}

/// The workers of a runtime (or a drain), by kind, and the discard hook.
#[derive(Clone, Default)]
pub struct Workers {
    by_kind: HashMap<String, Arc<dyn DynWorker>>,
    hook: Option<Arc<dyn DiscardHook>>,
    fallback_policy: Option<RetryPolicy>,
}

impl fmt::Debug for Workers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kinds: Vec<&str> = self.by_kind.keys().map(String::as_str).collect();
        kinds.sort_unstable();
        f.debug_struct("Workers")
            .field("kinds", &kinds)
            .field("discard_hook", &self.hook.is_some())
            .finish_non_exhaustive()
    }
}

impl Workers {
    /// No workers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a typed worker (replacing any worker of the same kind).
    #[must_use]
    pub fn register<W: Worker>(self, worker: W) -> Self {
        self.register_dyn(Arc::new(Typed(worker, PhantomData)))
    }

    /// Registers a worker whose kind is chosen at run time.
    #[must_use]
    pub fn register_dyn(mut self, worker: Arc<dyn DynWorker>) -> Self {
        self.by_kind.insert(worker.kind().to_owned(), worker);
        self
    }

    /// Sets the hook run inside every discarding transaction.
    #[must_use]
    pub fn discard_hook(mut self, hook: impl DiscardHook) -> Self {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// Sets the hook from a shared handle.
    #[must_use]
    pub fn discard_hook_arc(mut self, hook: Arc<dyn DiscardHook>) -> Self {
        self.hook = Some(hook);
        self
    }

    /// The retry policy for jobs of an unknown kind (default:
    /// [`RetryPolicy::default`]).
    #[must_use]
    pub fn fallback_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.fallback_policy = Some(policy);
        self
    }

    /// The registered kinds, sorted.
    pub fn kinds(&self) -> Vec<&str> {
        let mut kinds: Vec<&str> = self.by_kind.keys().map(String::as_str).collect();
        kinds.sort_unstable();
        kinds
    }

    pub(crate) fn get(&self, kind: &str) -> Option<&Arc<dyn DynWorker>> {
        self.by_kind.get(kind)
    }

    pub(crate) fn hook(&self) -> Option<&Arc<dyn DiscardHook>> {
        self.hook.as_ref()
    }

    pub(crate) fn fallback_policy(&self) -> RetryPolicy {
        self.fallback_policy.unwrap_or_default()
    }
}
