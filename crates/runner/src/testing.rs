//! Tools to test workflows deterministically, on either backend (feature
//! `testing`).
//!
//! - [`ManualClock`]: inject it into the runtime (and the backend); move it
//!   with [`ManualClock::advance`] to make timers and retries due, with no
//!   sleeping.
//! - [`ScriptedStep`]: a step whose outcome is scripted per attempt; it
//!   records every execution (attempt, activation, idempotency key) and can
//!   wait on a [`Gate`] the test releases.
//! - [`Runtime::drain_with`]: run due jobs until none is due, optionally only
//!   one kind or queue, at most N jobs; jobs blocked in user code longer than
//!   the settle time are reported in flight instead of blocking the drain.
//! - Inspection: [`Runtime::jobs_of`] lists an instance's live jobs;
//!   [`Runtime::enqueue_raw`] inserts any job (duplicates, corrupt args).
//!
//! ```
//! use std::time::Duration;
//! use hephaestus_memory::MemoryBackend;
//! use hephaestus_engine_core::prelude::*;
//! use hephaestus_engine_core::steps::Done;
//! use hephaestus_runner::testing::{ScriptedStep, ManualClock};
//! use hephaestus_failure_handler::FailureHandler;
//! use hephaestus_runner::{Runtime, StartOptions};
//! use serde_json::json;
//!
//! let clock = ManualClock::default();
//! let charge = ScriptedStep::new("charge", ["charged"])
//!     .on_attempt(1, StepOutcome::retry("card network down"))
//!     .otherwise(StepOutcome::complete("charged"))
//!     .with_retry_policy(RetryPolicy::new(3, Backoff::Constant, Duration::from_secs(30), Duration::from_secs(30)).unwrap());
//! let wf = Workflow::builder("pay").unique("pay", Scope::Workflow)
//!     .start(charge.clone()).on(charge.clone(), "charged", Done).build().unwrap();
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
//! rt.block_on(async {
//!     let runtime = Runtime::builder(MemoryBackend::with_clock(clock.clone()))
//!         .clock(clock.clone()).discard_handler(FailureHandler::new())
//!         .workflow(wf).build().unwrap();
//!     let s = runtime.start("pay", "1", json!({}), StartOptions::default()).await.unwrap();
//!     assert_eq!(runtime.drain().await.unwrap().retried, 1);
//!     clock.advance(Duration::from_secs(30));
//!     runtime.drain().await.unwrap();
//!     assert_eq!(charge.attempts(), vec![1, 2]);
//!     assert_eq!(runtime.get(s.id).await.unwrap().unwrap().status, InstanceStatus::Completed);
//! });
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hephaestus_engine_core::ports::{JobInfo, NewJob};
use hephaestus_engine_core::retry::RetryPolicy;
use hephaestus_engine_core::step::{Step, StepInput, StepOutcome};
use hephaestus_engine_core::{Event, StepId};
use serde_json::Value;
use uuid::Uuid;

use crate::backend::Backend;
use crate::error::RunnerError;
use crate::handle::Runtime;
use crate::jobs;
use crate::outcome::{DrainReport, JobOutcome};
pub use hephaestus_engine_core::clock::ManualClock;

use hephaestus_engine_core::step::lock_ignoring_poison as lock;

/// A latch: steps wait on it until the test releases it.
#[derive(Debug, Clone, Default)]
pub struct Gate {
    inner: Arc<(
        tokio::sync::Notify,
        std::sync::atomic::AtomicBool,
        std::sync::atomic::AtomicUsize,
    )>,
}

impl Gate {
    /// A closed gate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens the gate for every current and future waiter.
    pub fn release(&self) {
        self.inner
            .1
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.0.notify_waiters();
    }

    /// How many are waiting now.
    pub fn waiting(&self) -> usize {
        self.inner.2.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until the gate is open.
    pub async fn wait(&self) {
        use std::sync::atomic::Ordering;
        self.inner.2.fetch_add(1, Ordering::SeqCst);
        loop {
            let notified = self.inner.0.notified();
            if self.inner.1.load(Ordering::SeqCst) {
                break;
            }
            notified.await;
        }
        self.inner.2.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One recorded execution of a [`ScriptedStep`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Execution {
    /// The instance.
    pub instance_id: Uuid,
    /// The activation.
    pub activation: u32,
    /// The attempt.
    pub attempt: u32,
    /// The idempotency key, as a string.
    pub idempotency_key: String,
}

struct Script {
    id: StepId,
    events: Vec<Event>,
    by_attempt: BTreeMap<u32, StepOutcome>,
    otherwise: StepOutcome,
    retry: Option<RetryPolicy>,
    gate: Option<Gate>,
    log: Mutex<Vec<Execution>>,
}

/// A step whose outcome is scripted per attempt, which records every
/// execution and can wait on a gate. Clones share the script and the log.
#[derive(Clone)]
pub struct ScriptedStep {
    script: Arc<Script>,
}

impl fmt::Debug for ScriptedStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptedStep")
            .field("id", &self.script.id)
            .field("executions", &self.executions().len())
            .finish_non_exhaustive()
    }
}

impl ScriptedStep {
    /// A step `id` declaring `events`; by default it completes with the first.
    ///
    /// # Panics
    /// On an invalid id or event (a literal in test code).
    pub fn new<I, E>(id: &str, events: I) -> Self
    where
        I: IntoIterator<Item = E>,
        E: AsRef<str>,
    {
        let events: Vec<Event> = events
            .into_iter()
            .map(|e| {
                Event::new(e.as_ref()).unwrap_or_else(|err| panic!("ScriptedStep::new: {err}"))
            })
            .collect();
        let first = events.first().map_or("done", Event::as_str).to_owned();
        Self {
            script: Arc::new(Script {
                id: StepId::new(id).unwrap_or_else(|err| panic!("ScriptedStep::new: {err}")),
                events,
                by_attempt: BTreeMap::new(),
                otherwise: StepOutcome::complete(first),
                retry: None,
                gate: None,
                log: Mutex::new(Vec::new()),
            }),
        }
    }

    fn edit(self, f: impl FnOnce(&mut Script)) -> Self {
        let mut script = Arc::try_unwrap(self.script).unwrap_or_else(|shared| Script {
            id: shared.id.clone(),
            events: shared.events.clone(),
            by_attempt: shared.by_attempt.clone(),
            otherwise: shared.otherwise.clone(),
            retry: shared.retry,
            gate: shared.gate.clone(),
            log: Mutex::new(Vec::new()),
        });
        f(&mut script);
        Self {
            script: Arc::new(script),
        }
    }

    /// The outcome of attempt `attempt`.
    #[must_use]
    pub fn on_attempt(self, attempt: u32, outcome: StepOutcome) -> Self {
        self.edit(|s| {
            s.by_attempt.insert(attempt, outcome);
        })
    }

    /// The outcome of every attempt not scripted otherwise.
    #[must_use]
    pub fn otherwise(self, outcome: StepOutcome) -> Self {
        self.edit(|s| s.otherwise = outcome)
    }

    /// The step's own retry policy.
    #[must_use]
    pub fn with_retry_policy(self, policy: RetryPolicy) -> Self {
        self.edit(|s| s.retry = Some(policy))
    }

    /// Waits on `gate` before returning its outcome.
    #[must_use]
    pub fn gated(self, gate: &Gate) -> Self {
        let gate = gate.clone();
        self.edit(|s| s.gate = Some(gate))
    }

    /// Every execution so far.
    pub fn executions(&self) -> Vec<Execution> {
        lock(&self.script.log).clone()
    }

    /// The attempt numbers of every execution so far.
    pub fn attempts(&self) -> Vec<u32> {
        self.executions().iter().map(|e| e.attempt).collect()
    }

    /// How many times user code ran.
    pub fn runs(&self) -> usize {
        lock(&self.script.log).len()
    }
}

#[async_trait::async_trait]
impl Step for ScriptedStep {
    fn id(&self) -> StepId {
        self.script.id.clone()
    }

    fn events(&self, _config: Option<&Value>) -> Vec<Event> {
        self.script.events.clone()
    }

    fn retry_policy(&self) -> Option<RetryPolicy> {
        self.script.retry
    }

    async fn execute(&self, input: StepInput<'_>) -> StepOutcome {
        lock(&self.script.log).push(Execution {
            instance_id: input.instance_id,
            activation: input.activation,
            attempt: input.attempt,
            idempotency_key: input.idempotency_key.to_string(),
        });
        if let Some(gate) = &self.script.gate {
            gate.wait().await;
        }
        self.script
            .by_attempt
            .get(&input.attempt)
            .cloned()
            .unwrap_or_else(|| self.script.otherwise.clone())
    }
}

/// What a drain may run.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DrainOptions {
    /// Only jobs of this kind (`jobs::ADVANCE`, ...).
    pub kind: Option<String>,
    /// Only this queue.
    pub queue: Option<String>,
    /// At most this many jobs.
    pub max_jobs: Option<usize>,
    /// A job still running after this long is reported in flight and left
    /// running (blocked on a gate, say) — the drain goes on without it.
    pub settle: Duration,
}

impl DrainOptions {
    /// Only jobs of this kind.
    #[must_use]
    pub fn with_kind(mut self, value: impl Into<String>) -> Self {
        self.kind = Some(value.into());
        self
    }

    /// Only this queue.
    #[must_use]
    pub fn with_queue(mut self, value: impl Into<String>) -> Self {
        self.queue = Some(value.into());
        self
    }

    /// At most this many jobs.
    #[must_use]
    pub fn with_max_jobs(mut self, value: usize) -> Self {
        self.max_jobs = Some(value);
        self
    }

    /// How long a running job may take before it is reported in flight.
    #[must_use]
    pub fn with_settle(mut self, value: Duration) -> Self {
        self.settle = value;
        self
    }
}

impl Default for DrainOptions {
    fn default() -> Self {
        Self {
            kind: None,
            queue: None,
            max_jobs: None,
            settle: Duration::from_secs(5),
        }
    }
}

/// The counts of [`Runtime::drain_with`].
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct DrainResult {
    /// Finished jobs by outcome.
    pub report: DrainReport,
    /// Jobs still running in user code when the drain returned.
    pub in_flight: Vec<tokio::task::JoinHandle<JobOutcome>>,
}

impl<B: Backend> Runtime<B> {
    /// Runs due jobs until none is due (or `max_jobs` ran), per `options`.
    /// Refused without a discard handler ([`RunnerError::NoDiscardHandler`]).
    pub async fn drain_with(&self, options: &DrainOptions) -> Result<DrainResult, RunnerError> {
        self.discard_handler()?;
        let mut result = DrainResult::default();
        let queues = self.drain_queues(options)?;
        let mut ran = 0usize;
        loop {
            let mut progressed = false;
            for queue in &queues {
                if options.max_jobs.is_some_and(|max| ran >= max) {
                    return Ok(result);
                }
                let leases = self.backend().fetch(queue, 1, self.now()).await?;
                for lease in leases {
                    progressed = true;
                    ran += 1;
                    let rt = self.clone();
                    let mut handle = tokio::spawn(async move { rt.perform(lease).await });
                    match tokio::time::timeout(options.settle, &mut handle).await {
                        Ok(Ok(outcome)) => result.report.add(outcome),
                        Ok(Err(join)) => {
                            return Err(RunnerError::Corrupt(format!("job task failed: {join}")));
                        }
                        Err(_) => result.in_flight.push(handle),
                    }
                }
            }
            if !progressed {
                return Ok(result);
            }
        }
    }

    /// The queues a drain looks at. A kind filter needs that kind to have a
    /// queue of its own (see [`crate::QueueNames`]): a queue is the unit a
    /// worker fetches from, so jobs of other kinds are never taken by mistake.
    fn drain_queues(&self, options: &DrainOptions) -> Result<Vec<String>, RunnerError> {
        let names = &self.config().queues;
        let Some(kind) = &options.kind else {
            return Ok(match &options.queue {
                Some(q) => vec![q.clone()],
                None => names.distinct(),
            });
        };
        let queue = match kind.as_str() {
            jobs::ADVANCE => &names.advance,
            jobs::EXECUTE => &names.execute,
            jobs::TIMER | jobs::RESUME => &names.timer,
            other => {
                return Err(RunnerError::InvalidInput(format!(
                    "unknown job kind {other:?}"
                )));
            }
        };
        let shared = [
            (jobs::ADVANCE, &names.advance),
            (jobs::EXECUTE, &names.execute),
            (jobs::TIMER, &names.timer),
        ]
        .iter()
        .any(|(k, q)| {
            *q == queue && *k != kind.as_str() && !(kind == jobs::RESUME && *k == jobs::TIMER)
        });
        if shared {
            return Err(RunnerError::InvalidInput(format!(
                "draining only {kind} jobs needs them on a queue of their own; {queue:?} is shared (configure QueueNames)"
            )));
        }
        Ok(vec![queue.clone()])
    }

    /// The live jobs of an instance (kind, state, due time, attempt).
    pub async fn jobs_of(&self, instance_id: Uuid) -> Result<Vec<JobInfo>, RunnerError> {
        Ok(self
            .backend()
            .live_jobs(&jobs::of_instance(instance_id))
            .await?)
    }

    /// Inserts any job as is (to test duplicates and corrupt input).
    pub async fn enqueue_raw(
        &self,
        job: NewJob,
    ) -> Result<hephaestus_engine_core::ports::JobId, RunnerError> {
        let b = self.backend();
        let mut tx = b.begin().await?;
        let out = b.enqueue(&mut tx, &[job]).await?;
        b.commit(tx).await?;
        Ok(out[0].id())
    }
}

/// What an enqueued-job assertion looks for among an instance's live jobs:
/// every given condition must hold.
///
/// ```
/// use hephaestus_runner::jobs;
/// use hephaestus_runner::testing::JobExpectation;
///
/// let timer = JobExpectation::kind(jobs::TIMER).step("approve");
/// assert_eq!(timer.to_string(), "a hephaestus.timer job of step approve");
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct JobExpectation {
    /// Of this kind (`jobs::ADVANCE`, `jobs::EXECUTE`, `jobs::TIMER`,
    /// `jobs::RESUME`).
    pub kind: Option<String>,
    /// For this step (execute, timer and resume jobs name their step).
    pub step: Option<String>,
    /// In this state.
    pub state: Option<hephaestus_engine_core::ports::JobState>,
    /// Due exactly at this time.
    pub due_at: Option<DateTime<Utc>>,
}

impl JobExpectation {
    /// Any live job.
    pub fn any() -> Self {
        Self::default()
    }

    /// A live job of `kind`.
    pub fn kind(kind: &str) -> Self {
        Self {
            kind: Some(kind.to_owned()),
            ..Self::default()
        }
    }

    /// ...for `step`.
    #[must_use]
    pub fn step(mut self, step: &str) -> Self {
        self.step = Some(step.to_owned());
        self
    }

    /// ...in `state`.
    #[must_use]
    pub fn state(mut self, state: hephaestus_engine_core::ports::JobState) -> Self {
        self.state = Some(state);
        self
    }

    /// ...due at `at`.
    #[must_use]
    pub fn due_at(mut self, at: DateTime<Utc>) -> Self {
        self.due_at = Some(at);
        self
    }

    /// Whether `job` meets the expectation.
    pub fn matches(&self, job: &JobInfo) -> bool {
        self.kind.as_deref().is_none_or(|k| job.kind == k)
            && self
                .step
                .as_deref()
                .is_none_or(|s| job.args.get("step").and_then(Value::as_str) == Some(s))
            && self.state.is_none_or(|s| job.state == s)
            && self.due_at.is_none_or(|at| job.scheduled_at == at)
    }
}

impl fmt::Display for JobExpectation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a")?;
        if let Some(state) = self.state {
            write!(f, " {}", state.as_str())?;
        }
        match &self.kind {
            Some(kind) => write!(f, " {kind} job")?,
            None => write!(f, " job")?,
        }
        if let Some(step) = &self.step {
            write!(f, " of step {step}")?;
        }
        if let Some(at) = self.due_at {
            write!(f, " due at {}", at.to_rfc3339())?;
        }
        Ok(())
    }
}

/// One line per job, for assertion messages.
fn describe(jobs: &[JobInfo]) -> String {
    if jobs.is_empty() {
        return "  (none)".to_owned();
    }
    jobs.iter()
        .map(|j| {
            format!(
                "  #{} {} {} step={} attempt {}/{} due {}",
                j.id,
                j.kind,
                j.state.as_str(),
                j.args.get("step").and_then(Value::as_str).unwrap_or("-"),
                j.attempt,
                j.max_attempts,
                j.scheduled_at.to_rfc3339()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl<B: Backend> Runtime<B> {
    /// The live jobs of `instance_id` meeting `expected`.
    pub async fn enqueued(
        &self,
        instance_id: Uuid,
        expected: &JobExpectation,
    ) -> Result<Vec<JobInfo>, RunnerError> {
        Ok(self
            .jobs_of(instance_id)
            .await?
            .into_iter()
            .filter(|job| expected.matches(job))
            .collect())
    }

    /// Asserts that `instance_id` has a live job meeting `expected` and
    /// returns it (the first by id).
    ///
    /// # Panics
    ///
    /// When none does (listing the instance's live jobs), or the backend
    /// fails.
    pub async fn assert_enqueued(&self, instance_id: Uuid, expected: &JobExpectation) -> JobInfo {
        let live = self
            .jobs_of(instance_id)
            .await
            .unwrap_or_else(|e| panic!("listing the jobs of {instance_id}: {e}"));
        match live.iter().find(|job| expected.matches(job)) {
            Some(job) => job.clone(),
            None => panic!(
                "expected {expected} for instance {instance_id}; its live jobs:\n{}",
                describe(&live)
            ),
        }
    }

    /// Asserts that `instance_id` has no live job meeting `expected`.
    ///
    /// # Panics
    ///
    /// When one does (listing them), or the backend fails.
    pub async fn refute_enqueued(&self, instance_id: Uuid, expected: &JobExpectation) {
        let live = self
            .jobs_of(instance_id)
            .await
            .unwrap_or_else(|e| panic!("listing the jobs of {instance_id}: {e}"));
        let found: Vec<JobInfo> = live.into_iter().filter(|j| expected.matches(j)).collect();
        assert!(
            found.is_empty(),
            "expected no {expected} for instance {instance_id}, found:\n{}",
            describe(&found)
        );
    }
}

/// A PostgreSQL schema of its own for one test (features `testing` and
/// `postgres`): created with a random, validated name, migrated (storage
/// and queue), and dropped by [`PgTestSchema::drop`], so suites run in
/// parallel on one database without seeing each other.
///
/// ```no_run
/// # async fn example() -> Result<(), hephaestus_runner::RunnerError> {
/// use hephaestus_runner::testing::{PgTestSchema, ManualClock};
///
/// let schema = PgTestSchema::new("postgres://postgres@127.0.0.1:5432/test").await?;
/// let clock = ManualClock::default();
/// let backend = schema.backend(&clock); // reads time from the virtual clock
/// // ... build a Runtime over `backend` with `.clock(clock.clone())` ...
/// schema.drop().await?;
/// # Ok(()) }
/// ```
#[cfg(feature = "postgres")]
#[derive(Debug, Clone)]
pub struct PgTestSchema {
    pool: sqlx::PgPool,
    prefix: hephaestus_migrations_gen::SchemaPrefix,
}

#[cfg(feature = "postgres")]
impl PgTestSchema {
    /// Connects to `database_url` (pool of 16), creates and migrates a new
    /// schema `hephaestus_test_<12 hex digits>`.
    pub async fn new(database_url: &str) -> Result<Self, RunnerError> {
        let backend_error = |e: &dyn fmt::Display| {
            RunnerError::Backend(hephaestus_engine_core::ports::PortError::Unavailable(
                e.to_string().into(),
            ))
        };
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(16)
            .connect(database_url)
            .await
            .map_err(|e| backend_error(&e))?;
        let suffix = Uuid::new_v4().simple().to_string();
        let prefix = hephaestus_migrations_gen::SchemaPrefix::new(&format!(
            "hephaestus_test_{}",
            &suffix[..12]
        ))
        .map_err(|e| RunnerError::InvalidInput(e.to_string()))?;
        hephaestus_storage_pg::migrate(&pool, &prefix)
            .await
            .map_err(|e| backend_error(&e))?;
        hephaestus_queue_pg::migrate(&pool, &prefix)
            .await
            .map_err(|e| backend_error(&e))?;
        Ok(Self { pool, prefix })
    }

    /// The schema.
    pub fn prefix(&self) -> &hephaestus_migrations_gen::SchemaPrefix {
        &self.prefix
    }

    /// The connection pool.
    pub fn pool(&self) -> &sqlx::PgPool {
        &self.pool
    }

    /// A backend over the schema whose queue reads time from `clock`. Build
    /// as many as you like (a restart is a new runtime over a new backend
    /// on the same schema).
    pub fn backend(&self, clock: &ManualClock) -> crate::postgres::PgBackend {
        crate::postgres::PgBackend::new(
            hephaestus_storage_pg::PgStore::new(self.pool.clone(), self.prefix.clone())
                .with_clock(clock.clone()),
            hephaestus_queue_pg::PgQueue::new(self.pool.clone(), self.prefix.clone())
                .with_clock(clock.clone()),
        )
    }

    /// Drops the schema and everything in it, and closes the pool.
    pub async fn drop(self) -> Result<(), RunnerError> {
        hephaestus_queue_pg::drop_schema(&self.pool, &self.prefix)
            .await
            .map_err(|e| RunnerError::Backend(e.into()))?;
        self.pool.close().await;
        Ok(())
    }
}
