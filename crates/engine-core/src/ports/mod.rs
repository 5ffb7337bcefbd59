//! Port traits: what a runner needs from a backend, in domain types only.
//!
//! A backend offers a unit of work ([`UnitOfWork`]: `begin` / `commit`,
//! rollback on drop) and three stores whose writes take `&mut` that unit of
//! work, so "apply results + persist instance + mark processed + enqueue next
//! jobs" and "insert step result + enqueue advance" are each ONE atomic
//! commit. Postgres backends use a database transaction as the unit of work;
//! the in-memory backend (crate `hephaestus-memory`) a journal applied under
//! one lock at commit.
//!
//! Every backend must pass the conformance suites of crate
//! `hephaestus-conformance`, written once and generic over these traits.

pub mod columns;
mod containment;

pub use containment::json_contains;

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::business_id::BusinessId;
use crate::engine::Input;
use crate::ids::{Event, StepId, WorkflowId};
use crate::instance::{AttemptRecord, Instance, InstanceStatus};
use crate::step::{AsyncWait, Completion, EventName, StepError, TimerSpec};

/// A backend failure, mapped from the driver's own errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PortError {
    /// The business id is held by another active instance.
    #[error("business id {business_id} is already running as instance {instance_id}")]
    AlreadyRunning {
        /// The business id.
        business_id: BusinessId,
        /// The active instance holding it.
        instance_id: Uuid,
    },
    /// A row with this id already exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The row does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A concurrent writer got there first (for example a stale revision).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The value cannot be stored (for example JSON with U+0000).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Stored data cannot be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The backend cannot be reached or failed; retrying may help.
    #[error("backend unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl PortError {
    /// An error of the same kind and message, for answering several callers
    /// of one failed batched operation (the source of an `Unavailable` is
    /// kept as its message).
    #[must_use]
    pub fn same_kind(&self) -> Self {
        match self {
            Self::AlreadyRunning {
                business_id,
                instance_id,
            } => Self::AlreadyRunning {
                business_id: business_id.clone(),
                instance_id: *instance_id,
            },
            Self::AlreadyExists(m) => Self::AlreadyExists(m.clone()),
            Self::NotFound(m) => Self::NotFound(m.clone()),
            Self::Conflict(m) => Self::Conflict(m.clone()),
            Self::InvalidInput(m) => Self::InvalidInput(m.clone()),
            Self::Corrupt(m) => Self::Corrupt(m.clone()),
            Self::Unavailable(source) => Self::Unavailable(source.to_string().into()),
        }
    }
}

/// Begin and commit a unit of work. Dropping a unit of work without
/// committing rolls it back (and releases its instance locks).
#[async_trait::async_trait]
pub trait UnitOfWork: Send + Sync {
    /// The unit of work (a database transaction, a journal, ...).
    type Tx: Send;

    /// Starts a unit of work.
    async fn begin(&self) -> Result<Self::Tx, PortError>;

    /// Commits it atomically: all of its writes become visible, or none.
    async fn commit(&self, tx: Self::Tx) -> Result<(), PortError>;
}

/// Instances: insert with atomic uniqueness, single-writer lock, reads.
#[async_trait::async_trait]
pub trait InstanceStore: UnitOfWork {
    /// Inserts a new instance. Fails with [`PortError::AlreadyRunning`] when
    /// its `unique_claim` is held by another ACTIVE instance (atomically: of
    /// concurrent inserts with one claim exactly one commits), and
    /// [`PortError::AlreadyExists`] when its id exists.
    async fn insert(&self, tx: &mut Self::Tx, instance: &Instance) -> Result<(), PortError>;

    /// Loads an instance and holds its single-writer lock until the unit of
    /// work ends: two units of work locking one instance run one after the
    /// other. `None` when it does not exist.
    async fn lock(&self, tx: &mut Self::Tx, id: Uuid) -> Result<Option<Instance>, PortError>;

    /// Writes an instance locked (or inserted) in this unit of work: it is
    /// [`PortError::Conflict`] otherwise, [`PortError::NotFound`] if it does
    /// not exist.
    async fn update(&self, tx: &mut Self::Tx, instance: &Instance) -> Result<(), PortError>;

    /// Cancels an ACTIVE instance by its status alone, without reading or
    /// writing its state: the last resort for an instance whose stored state
    /// cannot be decoded (its claim is released with its active status; the
    /// state stays as it is for an operator to inspect). Call it holding the
    /// instance's lock (a `lock` whose decoding failed still took it).
    /// Returns whether the instance was active.
    async fn cancel_status_only(
        &self,
        tx: &mut Self::Tx,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<bool, PortError>;

    /// Reads the committed state of an instance.
    async fn get(&self, id: Uuid) -> Result<Option<Instance>, PortError>;

    /// Instances matching `filter`, newest first (by id: v7 ids are time-ordered).
    async fn list(&self, filter: &InstanceFilter) -> Result<Vec<Instance>, PortError>;
}

/// Filters for [`InstanceStore::list`], all ANDed. The type makes unknown
/// filters impossible. Start from [`InstanceFilter::default`] (every
/// instance) and add filters with the `with_*` methods (a filter may be
/// added without breaking callers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InstanceFilter {
    /// Exact business id.
    pub business_id: Option<BusinessId>,
    /// Exact workflow id.
    pub workflow_id: Option<WorkflowId>,
    /// Exact version.
    pub workflow_version: Option<u32>,
    /// Status among these (empty = any).
    pub statuses: Vec<InstanceStatus>,
    /// Only ids strictly below this one (keyset pagination, newest first).
    pub before_id: Option<Uuid>,
    /// At most this many (`None` = no limit).
    pub limit: Option<u32>,
}

impl InstanceFilter {
    /// Only the instances with `business_id` (see [`InstanceFilter::business_id`]).
    #[must_use]
    pub fn with_business_id(mut self, business_id: BusinessId) -> Self {
        self.business_id = Some(business_id);
        self
    }

    /// Only instances of `workflow_id` (see [`InstanceFilter::workflow_id`]).
    #[must_use]
    pub fn with_workflow_id(mut self, workflow_id: WorkflowId) -> Self {
        self.workflow_id = Some(workflow_id);
        self
    }

    /// Only instances of version `version` (see [`InstanceFilter::workflow_version`]).
    #[must_use]
    pub fn with_workflow_version(mut self, version: u32) -> Self {
        self.workflow_version = Some(version);
        self
    }

    /// Only instances with one of `statuses` (see [`InstanceFilter::statuses`]).
    #[must_use]
    pub fn with_statuses(mut self, statuses: impl IntoIterator<Item = InstanceStatus>) -> Self {
        self.statuses = statuses.into_iter().collect();
        self
    }

    /// Only ids strictly below `id` (see [`InstanceFilter::before_id`]).
    #[must_use]
    pub fn with_before_id(mut self, id: Uuid) -> Self {
        self.before_id = Some(id);
        self
    }

    /// At most `limit` instances (see [`InstanceFilter::limit`]).
    #[must_use]
    pub fn with_limit(mut self, limit: u32) -> Self {
        self.limit = Some(limit);
        self
    }
}

/// The kind of a step-result row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultKind {
    /// A completion.
    Completed,
    /// An async marker.
    Async,
    /// An external resume.
    Resume,
    /// A timer that fired.
    Timer,
    /// A final failure.
    Failed,
    /// A cancel request.
    Cancel,
}

impl ResultKind {
    /// The kind stored as `name`.
    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::Completed,
            Self::Async,
            Self::Resume,
            Self::Timer,
            Self::Failed,
            Self::Cancel,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == name)
    }

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Async => "async",
            Self::Resume => "resume",
            Self::Timer => "timer",
            Self::Failed => "failed",
            Self::Cancel => "cancel",
        }
    }
}

/// What a step-result row carries, by kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ResultPayload {
    /// The step completed.
    Completed {
        /// The raw event (validated when applied).
        event: EventName,
        /// Its output.
        output: Value,
        /// Its metadata updates.
        metadata: Map<String, Value>,
    },
    /// The step went async.
    Async {
        /// Its timer: delay in ms and event.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timer_after_ms: Option<u64>,
        /// The timer's event.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timer_event: Option<EventName>,
    },
    /// A caller resumed the step.
    Resume {
        /// The event.
        event: Event,
        /// Stored as the step's output.
        payload: Value,
    },
    /// The step's timer fired.
    Timer {
        /// The timer's event.
        event: Event,
    },
    /// The step (or, without a step, the instance) failed for good.
    Failed {
        /// The final error.
        error: StepError,
        /// Every attempt's error.
        attempts: Vec<AttemptRecord>,
    },
    /// A caller cancelled the instance.
    Cancel {
        /// Why.
        reason: Option<String>,
    },
}

impl ResultPayload {
    /// The row kind.
    pub fn kind(&self) -> ResultKind {
        match self {
            Self::Completed { .. } => ResultKind::Completed,
            Self::Async { .. } => ResultKind::Async,
            Self::Resume { .. } => ResultKind::Resume,
            Self::Timer { .. } => ResultKind::Timer,
            Self::Failed { .. } => ResultKind::Failed,
            Self::Cancel { .. } => ResultKind::Cancel,
        }
    }
}

/// A step result to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewStepResult {
    /// The instance.
    pub instance_id: Uuid,
    /// The step (`None` for instance-level rows: cancel, instance failure).
    pub step: Option<StepId>,
    /// The step activation (0 for instance-level rows).
    pub activation: u32,
    /// What it carries.
    pub payload: ResultPayload,
}

impl NewStepResult {
    /// The engine input this result stands for.
    pub fn to_input(&self) -> Result<Input, PortError> {
        let need_step = || {
            self.step.clone().ok_or_else(|| {
                PortError::Corrupt(format!(
                    "{} result without a step",
                    self.payload.kind().as_str()
                ))
            })
        };
        Ok(match &self.payload {
            ResultPayload::Completed {
                event,
                output,
                metadata,
            } => Input::Completed {
                step: need_step()?,
                activation: self.activation,
                completion: Completion {
                    event: event.clone(),
                    output: output.clone(),
                    metadata: metadata.clone(),
                },
            },
            ResultPayload::Async {
                timer_after_ms,
                timer_event,
            } => Input::Async {
                step: need_step()?,
                activation: self.activation,
                wait: AsyncWait {
                    timer: match (timer_after_ms, timer_event) {
                        (Some(ms), Some(event)) => Some(TimerSpec {
                            after: std::time::Duration::from_millis(*ms),
                            event: event.clone(),
                        }),
                        _ => None,
                    },
                },
            },
            ResultPayload::Resume { event, payload } => Input::Resume {
                step: need_step()?,
                activation: Some(self.activation),
                event: event.clone(),
                payload: payload.clone(),
            },
            ResultPayload::Timer { event } => Input::TimerFired {
                step: need_step()?,
                activation: self.activation,
                event: event.clone(),
            },
            ResultPayload::Failed { error, attempts } => Input::Failed {
                step: self.step.clone(),
                activation: self.activation,
                error: error.clone(),
                attempts: attempts.clone(),
            },
            ResultPayload::Cancel { reason } => Input::Cancel {
                reason: reason.clone(),
            },
        })
    }
}

/// A recorded step result, with its arrival sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct StepResult {
    /// Increasing in recording order (a database sequence): unique, with
    /// gaps after rollbacks; commit order may differ from it.
    pub seq: i64,
    /// The result.
    pub result: NewStepResult,
    /// When it was recorded.
    pub inserted_at: DateTime<Utc>,
}

/// A result the single writer refused to apply (an event its step does not
/// declare, an activation that is not active, a row it cannot decode, ...):
/// processed, kept with the reason for operators, and no longer holding its
/// (instance, step, activation, kind) slot, so a valid result for the same
/// activation can still be recorded and applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Its arrival sequence number.
    pub seq: i64,
    /// Its step (`None` for instance-level rows).
    pub step: Option<StepId>,
    /// The step activation it named.
    pub activation: u32,
    /// Its kind.
    pub kind: ResultKind,
    /// Why it was refused.
    pub reason: String,
}

/// A step result a batch of advance rounds records (the runner's batched
/// write).
#[derive(Debug, Clone, PartialEq)]
pub struct RoundResult {
    /// The result.
    pub result: NewStepResult,
    /// Its instance is held by the batch, whose round applied (or refused)
    /// it: recorded as processed.
    pub processed: bool,
    /// Why the round refused it (recorded processed, without holding its
    /// slot: see [`Refused`]).
    pub refusal: Option<String>,
}

/// An inbox row a round consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    /// Its sequence number.
    pub seq: i64,
    /// Why the round refused it, if it did (see [`Refused`]).
    pub refusal: Option<String>,
}

/// Whether an insert recorded a new row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// A new row, with its sequence number.
    Inserted(i64),
    /// A row for the same (instance, step, activation, kind) exists already.
    Duplicate,
}

/// Step results: the zero-contention inbox of each instance.
#[async_trait::async_trait]
pub trait StepResultStore: UnitOfWork {
    /// Records a result, idempotently per (instance, step, activation, kind).
    async fn record(
        &self,
        tx: &mut Self::Tx,
        result: &NewStepResult,
    ) -> Result<Recorded, PortError>;

    /// The unprocessed results of an instance, in arrival order.
    async fn pending(
        &self,
        tx: &mut Self::Tx,
        instance_id: Uuid,
    ) -> Result<Vec<StepResult>, PortError>;

    /// Marks results processed (they are never returned by `pending` again).
    async fn mark_processed(
        &self,
        tx: &mut Self::Tx,
        instance_id: Uuid,
        seqs: &[i64],
    ) -> Result<(), PortError>;

    /// Marks unprocessed results processed as refused, each with its reason
    /// (see [`Refused`]): they are never returned by `pending` again, and no
    /// longer hold their slot, so `record` accepts a new result for the same
    /// (instance, step, activation, kind).
    async fn refuse(
        &self,
        tx: &mut Self::Tx,
        instance_id: Uuid,
        refused: &[(i64, String)],
    ) -> Result<(), PortError>;

    /// The refused results of an instance, in arrival order.
    async fn refused(&self, instance_id: Uuid) -> Result<Vec<Refused>, PortError>;

    /// Whether a completion, async marker or failure is recorded (processed or
    /// not, and not refused) for this step activation: its user code must not
    /// run again.
    async fn is_recorded(
        &self,
        instance_id: Uuid,
        step: &StepId,
        activation: u32,
    ) -> Result<bool, PortError>;

    /// Deletes processed results older than `before`; returns how many.
    async fn prune_processed(&self, before: DateTime<Utc>) -> Result<u64, PortError>;

    /// Records the results of a batch of rounds one by one through
    /// [`StepResultStore::record`]: each new one that its round applied is
    /// marked processed, or refused with its round's reason; a duplicate or
    /// a result of a missing instance is skipped. What a backend without a
    /// batched write does (and one with it, for a batch it cannot batch).
    async fn record_round_results(
        &self,
        tx: &mut Self::Tx,
        results: &[RoundResult],
    ) -> Result<(), PortError> {
        for round_result in results {
            let result = &round_result.result;
            match self.record(tx, result).await {
                Ok(Recorded::Inserted(seq)) if round_result.processed => {
                    if let Some(reason) = &round_result.refusal {
                        self.refuse(tx, result.instance_id, &[(seq, reason.clone())])
                            .await?;
                    } else {
                        self.mark_processed(tx, result.instance_id, &[seq]).await?;
                    }
                }
                Ok(_) | Err(PortError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A job id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub i64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Due now.
    Available,
    /// Due later.
    Scheduled,
    /// Running in a worker.
    Executing,
    /// Failed; due again later.
    Retryable,
    /// Done.
    Completed,
    /// Attempts exhausted (or fatal).
    Discarded,
    /// Cancelled.
    Cancelled,
}

impl JobState {
    /// Every state.
    pub const ALL: [Self; 7] = [
        Self::Available,
        Self::Scheduled,
        Self::Executing,
        Self::Retryable,
        Self::Completed,
        Self::Discarded,
        Self::Cancelled,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Available => "available",
            Self::Scheduled => "scheduled",
            Self::Executing => "executing",
            Self::Retryable => "retryable",
            Self::Completed => "completed",
            Self::Discarded => "discarded",
            Self::Cancelled => "cancelled",
        }
    }

    /// Completed, discarded or cancelled.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::Discarded | Self::Cancelled)
    }
}

/// Uniqueness of a job: at most one job with `key` in any of `states`; a
/// conflicting insert returns the existing job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniqueJob {
    /// The key.
    pub key: String,
    /// The states among which it is unique.
    pub states: Vec<JobState>,
}

/// A job to enqueue: [`NewJob::new`] with what every job needs, then the
/// `with_*` methods (an option may be added without breaking callers).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct NewJob {
    /// The worker kind.
    pub kind: String,
    /// The queue.
    pub queue: String,
    /// Arguments.
    pub args: Value,
    /// Metadata (observability).
    pub meta: Map<String, Value>,
    /// Tags.
    pub tags: Vec<String>,
    /// Lower runs first.
    pub priority: i16,
    /// Attempts in all.
    pub max_attempts: u32,
    /// Not before this time (`None` = now).
    pub scheduled_at: Option<DateTime<Utc>>,
    /// Uniqueness.
    pub unique: Option<UniqueJob>,
    /// A caller-chosen key grouping related jobs (the runner uses the
    /// workflow instance id), so that they can be found and cancelled
    /// together through an index ([`JobMatch::group`]).
    pub group: Option<String>,
}

impl NewJob {
    /// Checks what no backend stores, before anything is written: a queue
    /// name of 1 to 128 characters, a kind of 1 to 255, `max_attempts`
    /// from 1 to `i32::MAX`, no U+0000 in the kind, queue, tags, unique key
    /// or group, and no empty group. A backend adds what only it cannot
    /// store.
    pub fn check(&self) -> Result<(), PortError> {
        let invalid = |what: String| Err(PortError::InvalidInput(what));
        if self.queue.is_empty() || self.queue.chars().count() > 128 {
            return invalid(format!(
                "queue name must be 1 to 128 characters, got {:?}",
                self.queue
            ));
        }
        if self.kind.is_empty() || self.kind.chars().count() > 255 {
            return invalid(format!(
                "job kind must be 1 to 255 characters, got {:?}",
                self.kind
            ));
        }
        if self.max_attempts == 0 || i32::try_from(self.max_attempts).is_err() {
            return invalid(format!(
                "max_attempts must be between 1 and {}, got {}",
                i32::MAX,
                self.max_attempts
            ));
        }
        let texts = [self.kind.as_str(), self.queue.as_str()]
            .into_iter()
            .chain(self.tags.iter().map(String::as_str))
            .chain(self.unique.as_ref().map(|u| u.key.as_str()))
            .chain(self.group.as_deref());
        for text in texts {
            if text.contains('\0') {
                return invalid(format!("U+0000 in job text {text:?}"));
            }
        }
        if self.group.as_deref().is_some_and(str::is_empty) {
            return invalid(format!("the group of a {} job is empty", self.kind));
        }
        Ok(())
    }

    /// A job of `kind` on `queue` with `args`, defaults elsewhere.
    pub fn new(kind: impl Into<String>, queue: impl Into<String>, args: Value) -> Self {
        Self {
            kind: kind.into(),
            queue: queue.into(),
            args,
            meta: Map::new(),
            tags: Vec::new(),
            priority: 0,
            max_attempts: 20,
            scheduled_at: None,
            unique: None,
            group: None,
        }
    }

    /// The same job in `group` (see [`NewJob::group`]).
    #[must_use]
    pub fn in_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// The same job with `meta` (see [`NewJob::meta`]).
    #[must_use]
    pub fn with_meta(mut self, meta: Map<String, Value>) -> Self {
        self.meta = meta;
        self
    }

    /// The same job with `tags` (see [`NewJob::tags`]).
    #[must_use]
    pub fn with_tags(mut self, tags: impl IntoIterator<Item = String>) -> Self {
        self.tags = tags.into_iter().collect();
        self
    }

    /// The same job with `priority`, lower first (see [`NewJob::priority`]).
    #[must_use]
    pub fn with_priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// The same job with `max_attempts` in all (see [`NewJob::max_attempts`]).
    #[must_use]
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// The same job, not run before `at` (see [`NewJob::scheduled_at`]).
    #[must_use]
    pub fn with_scheduled_at(mut self, at: DateTime<Utc>) -> Self {
        self.scheduled_at = Some(at);
        self
    }

    /// The same job, unique as `unique` says (see [`NewJob::unique`]).
    #[must_use]
    pub fn with_unique(mut self, unique: UniqueJob) -> Self {
        self.unique = Some(unique);
        self
    }
}

/// Which unfinished jobs [`JobQueue::cancel_matching`] and
/// [`JobQueue::live_jobs`] apply to: every given condition must hold.
/// Built with [`JobMatch::group`] or [`JobMatch::args`] (a condition may be
/// added without breaking callers).
///
/// Matching by group is the fast path (database backends index the group
/// key of waiting jobs); args containment alone is meant for rare,
/// operator-driven use and may scan every unfinished job.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct JobMatch {
    /// In this group ([`NewJob::group`]).
    pub group: Option<String>,
    /// Args contain this JSON (containment: every key of an object is
    /// present with a containing value; arrays contain the listed elements).
    pub args: Option<Value>,
}

impl JobMatch {
    /// Every unfinished job of `group`.
    pub fn group(group: impl Into<String>) -> Self {
        Self {
            group: Some(group.into()),
            args: None,
        }
    }

    /// Every unfinished job whose args contain `args`.
    pub fn args(args: Value) -> Self {
        Self {
            group: None,
            args: Some(args),
        }
    }

    /// Narrows the match to jobs whose args also contain `args`.
    #[must_use]
    pub fn with_args(mut self, args: Value) -> Self {
        self.args = Some(args);
        self
    }

    /// Whether a job with `group` and `args` matches.
    pub fn matches(&self, group: Option<&str>, args: &Value) -> bool {
        self.group.as_deref().is_none_or(|g| group == Some(g))
            && self.args.as_ref().is_none_or(|a| json_contains(args, a))
    }
}

/// The outcome of enqueueing one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Inserted.
    Inserted(JobId),
    /// A unique job exists already.
    Existing(JobId),
}

impl Enqueued {
    /// The job id either way.
    pub fn id(self) -> JobId {
        match self {
            Self::Inserted(id) | Self::Existing(id) => id,
        }
    }
}

/// A job fetched by a worker: the attempt number fences every later update.
#[derive(Debug, Clone, PartialEq)]
pub struct JobLease {
    /// The job.
    pub id: JobId,
    /// Its kind.
    pub kind: String,
    /// Its queue.
    pub queue: String,
    /// Its arguments.
    pub args: Value,
    /// Its metadata.
    pub meta: Map<String, Value>,
    /// This attempt (1-based).
    pub attempt: u32,
    /// Attempts in all.
    pub max_attempts: u32,
    /// When it was due.
    pub scheduled_at: DateTime<Utc>,
    /// Earlier attempts' errors.
    pub errors: Vec<AttemptRecord>,
}

impl JobLease {
    /// The jitter sample of this attempt's retry delay
    /// ([`crate::retry::jitter_sample`] of the job and the attempt).
    pub fn jitter_sample(&self) -> u32 {
        crate::retry::jitter_sample(self.id.0, self.attempt)
    }
}

/// A job's state as seen by inspection.
#[derive(Debug, Clone, PartialEq)]
pub struct JobInfo {
    /// The job.
    pub id: JobId,
    /// Its kind.
    pub kind: String,
    /// Its queue.
    pub queue: String,
    /// Its arguments.
    pub args: Value,
    /// Its metadata.
    pub meta: Map<String, Value>,
    /// Its tags.
    pub tags: Vec<String>,
    /// Its priority (lower runs first).
    pub priority: i16,
    /// Its state.
    pub state: JobState,
    /// Attempts made.
    pub attempt: u32,
    /// Attempts in all.
    pub max_attempts: u32,
    /// When it is (was) due.
    pub scheduled_at: DateTime<Utc>,
    /// Errors recorded.
    pub errors: Vec<AttemptRecord>,
    /// Its group ([`NewJob::group`]).
    pub group: Option<String>,
}

/// The job queue the runner drives.
#[async_trait::async_trait]
pub trait JobQueue: UnitOfWork {
    /// Enqueues jobs in the unit of work, in order (one round trip on
    /// database backends). A job without `scheduled_at` is due at the
    /// backend's own clock (injectable in memory). An `Inserted` outcome of a
    /// unique job can still be dropped at commit if a concurrent unit of work
    /// committed the same key first (the memory backend); database backends
    /// block on the conflicting insert instead.
    async fn enqueue(&self, tx: &mut Self::Tx, jobs: &[NewJob])
    -> Result<Vec<Enqueued>, PortError>;

    /// Cancels one job unless finished. Returns whether it was cancelled.
    async fn cancel(&self, tx: &mut Self::Tx, id: JobId) -> Result<bool, PortError>;

    /// Cancels every unfinished job that `matching` selects, except
    /// `except`. Returns how many.
    async fn cancel_matching(
        &self,
        tx: &mut Self::Tx,
        matching: &JobMatch,
        except: Option<JobId>,
    ) -> Result<u64, PortError>;

    /// Takes up to `limit` due jobs of `queue` (due at or before `now`),
    /// marking them executing and bumping their attempt.
    async fn fetch(
        &self,
        queue: &str,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<JobLease>, PortError>;

    /// Completes a job, fenced by its attempt: `false` when the job is no
    /// longer executing at that attempt (rescued, cancelled).
    async fn complete(&self, tx: &mut Self::Tx, lease: &JobLease) -> Result<bool, PortError>;

    /// Records a failed attempt and schedules the next at `retry_at`; fenced.
    async fn retry(
        &self,
        tx: &mut Self::Tx,
        lease: &JobLease,
        error: &StepError,
        retry_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool, PortError>;

    /// Records the final error and discards the job; fenced.
    async fn discard(
        &self,
        tx: &mut Self::Tx,
        lease: &JobLease,
        error: &StepError,
        now: DateTime<Utc>,
    ) -> Result<bool, PortError>;

    /// Deletes jobs that finished (completed, discarded, cancelled) before
    /// `before`; returns how many.
    async fn prune_finished(&self, before: DateTime<Utc>) -> Result<u64, PortError>;

    /// Refreshes the heartbeat of running leases (job id, attempt); returns
    /// the ids whose lease still holds (the others were cancelled or
    /// rescued: their workers should stop).
    async fn heartbeat(&self, leases: &[(JobId, u32)]) -> Result<Vec<JobId>, PortError>;

    /// Executing jobs whose last heartbeat (or fetch) is before `before`:
    /// their worker died. The caller retries or discards each lease; those
    /// updates are fenced by the attempt, so racing rescuers are harmless.
    async fn stale(&self, before: DateTime<Utc>, limit: u32) -> Result<Vec<JobLease>, PortError>;

    /// A job's current state.
    async fn job(&self, id: JobId) -> Result<Option<JobInfo>, PortError>;

    /// Unfinished jobs that `matching` selects, by id.
    async fn live_jobs(&self, matching: &JobMatch) -> Result<Vec<JobInfo>, PortError>;
}

#[cfg(test)]
mod tests {

    #[test]
    fn same_kind_keeps_the_kind_and_the_message() {
        let errors = [
            PortError::NotFound("instance 1".into()),
            PortError::Conflict("held".into()),
            PortError::Corrupt("state".into()),
            PortError::Unavailable("connection refused".into()),
        ];
        for error in errors {
            let copy = error.same_kind();
            assert_eq!(
                std::mem::discriminant(&copy),
                std::mem::discriminant(&error)
            );
            assert_eq!(copy.to_string(), error.to_string());
        }
    }

    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::step::ErrorKind;

    fn sid(s: &str) -> StepId {
        StepId::new(s).unwrap()
    }

    #[test]
    fn jobs_no_backend_stores_are_refused_with_the_reason() {
        let ok = NewJob::new("send", "mail", serde_json::json!({}));
        assert!(ok.check().is_ok());
        let refused = |job: NewJob, says: &str| match job.check() {
            Err(PortError::InvalidInput(why)) => assert!(why.contains(says), "{why}"),
            other => panic!("{says}: {other:?}"),
        };
        refused(NewJob::new("send", "", serde_json::json!({})), "queue name");
        refused(
            NewJob::new("send", "q".repeat(129), serde_json::json!({})),
            "queue name",
        );
        refused(NewJob::new("", "mail", serde_json::json!({})), "job kind");
        refused(ok.clone().with_max_attempts(0), "max_attempts");
        refused(ok.clone().with_max_attempts(u32::MAX), "max_attempts");
        refused(ok.clone().with_tags(vec!["a\0b".into()]), "U+0000");
        refused(ok.clone().in_group(""), "group");
        refused(ok.clone().in_group("g\0"), "U+0000");
    }

    #[test]
    fn new_job_defaults_and_setters_set_their_own_field() {
        let job = NewJob::new("k", "q", json!({"a": 1}));
        assert_eq!(
            job,
            NewJob {
                kind: "k".to_owned(),
                queue: "q".to_owned(),
                args: json!({"a": 1}),
                meta: Map::new(),
                tags: Vec::new(),
                priority: 0,
                max_attempts: 20,
                scheduled_at: None,
                unique: None,
                group: None,
            }
        );
        let at = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let unique = UniqueJob {
            key: "u".to_owned(),
            states: vec![JobState::Available],
        };
        let mut meta = Map::new();
        meta.insert("m".to_owned(), json!(2));
        let job = job
            .with_meta(meta.clone())
            .with_tags(["t".to_owned()])
            .with_priority(-3)
            .with_max_attempts(4)
            .with_scheduled_at(at)
            .with_unique(unique.clone())
            .in_group("g");
        assert_eq!(
            job,
            NewJob {
                kind: "k".to_owned(),
                queue: "q".to_owned(),
                args: json!({"a": 1}),
                meta,
                tags: vec!["t".to_owned()],
                priority: -3,
                max_attempts: 4,
                scheduled_at: Some(at),
                unique: Some(unique),
                group: Some("g".to_owned()),
            }
        );
    }

    #[test]
    fn instance_filter_setters_set_their_own_filter() {
        let before = Uuid::from_u128(9);
        let filter = InstanceFilter::default()
            .with_business_id(BusinessId::parse("order::1").unwrap())
            .with_workflow_id(WorkflowId::new("orders").unwrap())
            .with_workflow_version(2)
            .with_statuses([InstanceStatus::Failed])
            .with_before_id(before)
            .with_limit(5);
        assert_eq!(
            filter,
            InstanceFilter {
                business_id: Some(BusinessId::parse("order::1").unwrap()),
                workflow_id: Some(WorkflowId::new("orders").unwrap()),
                workflow_version: Some(2),
                statuses: vec![InstanceStatus::Failed],
                before_id: Some(before),
                limit: Some(5),
            }
        );
    }

    fn result(step: Option<&str>, payload: ResultPayload) -> NewStepResult {
        NewStepResult {
            instance_id: Uuid::nil(),
            step: step.map(sid),
            activation: 2,
            payload,
        }
    }

    #[test]
    fn each_payload_maps_to_its_engine_input() {
        let completed = result(
            Some("a"),
            ResultPayload::Completed {
                event: EventName("done".into()),
                output: json!({"x": 1}),
                metadata: Map::new(),
            },
        );
        assert!(matches!(
            completed.to_input().unwrap(),
            Input::Completed { activation: 2, .. }
        ));
        let with_timer = result(
            Some("a"),
            ResultPayload::Async {
                timer_after_ms: Some(1500),
                timer_event: Some(EventName("timeout".into())),
            },
        );
        let Input::Async { wait, .. } = with_timer.to_input().unwrap() else {
            panic!("async")
        };
        assert_eq!(wait.timer.unwrap().after, Duration::from_millis(1500));
        let resume = result(
            Some("a"),
            ResultPayload::Resume {
                event: Event::new("go").unwrap(),
                payload: json!({}),
            },
        );
        assert!(matches!(
            resume.to_input().unwrap(),
            Input::Resume {
                activation: Some(2),
                ..
            }
        ));
        let timer = result(
            Some("a"),
            ResultPayload::Timer {
                event: Event::new("timeout").unwrap(),
            },
        );
        assert!(matches!(
            timer.to_input().unwrap(),
            Input::TimerFired { .. }
        ));
        let failed = result(
            None,
            ResultPayload::Failed {
                error: StepError::fatal("x"),
                attempts: vec![],
            },
        );
        assert!(matches!(
            failed.to_input().unwrap(),
            Input::Failed { step: None, .. }
        ));
        let cancel = result(None, ResultPayload::Cancel { reason: None });
        assert_eq!(cancel.to_input().unwrap(), Input::Cancel { reason: None });
    }

    #[test]
    fn step_results_without_a_step_are_corrupt() {
        let bad = result(
            None,
            ResultPayload::Timer {
                event: Event::new("t").unwrap(),
            },
        );
        assert!(matches!(bad.to_input(), Err(PortError::Corrupt(_))));
    }

    #[test]
    fn payloads_have_a_tagged_persisted_form() {
        let p = ResultPayload::Failed {
            error: StepError::fatal("boom"),
            attempts: vec![],
        };
        assert_eq!(p.kind(), ResultKind::Failed);
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["kind"], "failed");
        assert_eq!(json["error"]["kind"], "fatal");
        let back: ResultPayload = serde_json::from_value(json).unwrap();
        assert_eq!(back, p);
        assert!(matches!(
            StepError::retry_after("x", Duration::from_secs(2)).kind,
            ErrorKind::Retryable {
                after_ms: Some(2000)
            }
        ));
    }

    #[test]
    fn job_states_and_enqueue_outcomes() {
        let finished: Vec<&str> = JobState::ALL
            .into_iter()
            .filter(|s| s.is_finished())
            .map(JobState::as_str)
            .collect();
        assert_eq!(finished, ["completed", "discarded", "cancelled"]);
        assert_eq!(Enqueued::Existing(JobId(4)).id(), JobId(4));
        let job = NewJob::new("advance", "hephaestus", json!({"instance_id": "x"}));
        assert_eq!(
            (job.priority, job.max_attempts, job.scheduled_at),
            (0, 20, None)
        );
        assert_eq!(
            serde_json::to_value(JobState::Retryable).unwrap(),
            "retryable"
        );
    }
}
