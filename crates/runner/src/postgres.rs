//! The PostgreSQL backend: `storage-pg` for instances and step results,
//! `queue-pg` for jobs, sharing one transaction type so every runner commit
//! spans both.

use chrono::{DateTime, Utc};
use hephaestus_engine_core::StepId;
use hephaestus_engine_core::instance::Instance;
use hephaestus_engine_core::ports::{
    Consumed, Enqueued, InstanceFilter, InstanceStore, JobId, JobInfo, JobLease, JobMatch,
    JobQueue, NewJob, NewStepResult, PortError, Recorded, Refused, StepResult, StepResultStore,
    UnitOfWork,
};
use hephaestus_engine_core::step::StepError;
use std::collections::HashMap;
use std::sync::Arc;

use hephaestus_engine_core::retry::RetryPolicy;
pub use hephaestus_queue_pg::Pooling;
use hephaestus_queue_pg::{
    DynWorker, JobContext, JobError, PgQueue, QueueRuntime, RuntimeBuilder, Workers,
};
use hephaestus_storage_pg::PgStore;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

pub use hephaestus_migrations_gen::SchemaPrefix;

use crate::error::RunnerError;
use crate::handle::Runtime;
use crate::jobs;

/// `options` with the session settings the runner's statements are tuned
/// for; connect the workers' pool with them:
///
/// ```no_run
/// # async fn f() -> Result<(), sqlx::Error> {
/// use std::str::FromStr;
/// use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
/// let options = PgConnectOptions::from_str("postgres://localhost/app")?;
/// let pool = PgPoolOptions::new()
///     .connect_with(hephaestus_runner::postgres::tuned(options))
///     .await?;
/// # Ok(()) }
/// ```
///
/// `plan_cache_mode=force_generic_plan`: the hot-path statements take
/// arrays (one statement per batch), and PostgreSQL's default keeps
/// re-planning them at every execution because a plan for the actual array
/// sizes looks cheaper; planning then costs more than executing (measured:
/// 0.2 to 0.6 ms of a 0.3 ms statement, about a third of a step's time in
/// the database). Their generic plans are the ones they were written for
/// (key lookups per array element). Set in the startup packet: no round
/// trip. Leave it off pools used for ad-hoc reads with optional filters,
/// and off connections through PgBouncer (which refuses the `options`
/// startup parameter): see [`connect_options`].
pub fn tuned(options: sqlx::postgres::PgConnectOptions) -> sqlx::postgres::PgConnectOptions {
    options.options([("plan_cache_mode", "force_generic_plan")])
}

/// The workers' connection options for `pooling`: [`tuned`] for
/// [`Pooling::Session`] (direct connections); for
/// [`Pooling::Transaction`] (PgBouncer's `pool_mode = transaction`),
/// [`Pooling::connect_options`] and no `plan_cache_mode`: PgBouncer refuses
/// the `options` startup parameter, and a generic plan would help nothing,
/// since every statement is then prepared unnamed, and planned, at each
/// execution (the price of transaction pooling: see
/// `hephaestus_pg_pooling`).
pub fn connect_options(
    options: sqlx::postgres::PgConnectOptions,
    pooling: Pooling,
) -> sqlx::postgres::PgConnectOptions {
    if pooling.needs_transaction() {
        pooling.connect_options(options)
    } else {
        tuned(options)
    }
}

/// The pool [`PgBackend::connect_with`] opens: its size and how its
/// connections reach PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolSettings {
    /// Connections at most (at least one is opened).
    pub max_connections: u32,
    /// Direct connections ([`Pooling::Session`], the default) or through
    /// PgBouncer's transaction pooling ([`Pooling::Transaction`]).
    pub pooling: Pooling,
}

impl PoolSettings {
    /// At most `max_connections` direct connections.
    pub fn new(max_connections: u32) -> Self {
        Self {
            max_connections,
            pooling: Pooling::Session,
        }
    }

    /// The same pool with connections that reach PostgreSQL the `pooling`
    /// way.
    #[must_use]
    pub fn with_pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = pooling;
        self
    }
}

/// Instances, step results and jobs in one PostgreSQL schema.
#[derive(Debug, Clone)]
pub struct PgBackend {
    store: PgStore,
    queue: PgQueue,
}

impl PgBackend {
    /// Combines a store and a queue on the same database.
    pub fn new(store: PgStore, queue: PgQueue) -> Self {
        Self { store, queue }
    }

    /// Instances, step results and jobs in schema `prefix` of `pool`'s
    /// database (the pool is shared by the store and the queue).
    pub fn on_pool(pool: sqlx::PgPool, prefix: SchemaPrefix) -> Self {
        Self::new(
            PgStore::new(pool.clone(), prefix.clone()),
            PgQueue::new(pool, prefix),
        )
    }

    /// The same backend for a pool whose connections reach PostgreSQL the
    /// `pooling` way, for both components (see
    /// [`PgStore::with_pooling`] and [`PgQueue::with_pooling`]). Through
    /// PgBouncer with `pool_mode = transaction`, give it
    /// [`Pooling::Transaction`] and connect the pool with
    /// [`connect_options`]; the worker runtime then polls instead of
    /// listening ([`Runtime::queue_runtime`]).
    #[must_use]
    pub fn with_pooling(self, pooling: Pooling) -> Self {
        Self {
            store: self.store.with_pooling(pooling),
            queue: self.queue.with_pooling(pooling),
        }
    }

    /// How the pool's connections reach PostgreSQL.
    pub fn pooling(&self) -> Pooling {
        self.queue.pooling()
    }

    /// Connects to the database at `url` with the hot path's connection
    /// options ([`tuned`]) and a pool of at most `max_connections` direct
    /// connections, for schema `prefix`: [`PgBackend::connect_with`] with
    /// [`PoolSettings::new`].
    pub async fn connect(
        url: &str,
        prefix: SchemaPrefix,
        max_connections: u32,
    ) -> Result<Self, PortError> {
        Self::connect_with(url, prefix, PoolSettings::new(max_connections)).await
    }

    /// Connects to the database at `url` for schema `prefix` with the pool
    /// `settings` describe, and the options of [`connect_options`] for its
    /// pooling (through PgBouncer: [`Pooling::Transaction`], and the URL of
    /// PgBouncer). A URL that does not parse is
    /// [`PortError::InvalidInput`]; a server that cannot be reached is
    /// [`PortError::Unavailable`] with its cause.
    pub async fn connect_with(
        url: &str,
        prefix: SchemaPrefix,
        settings: PoolSettings,
    ) -> Result<Self, PortError> {
        use sqlx::Connection as _;
        let options: sqlx::postgres::PgConnectOptions = url
            .parse()
            .map_err(|e| PortError::InvalidInput(format!("not a PostgreSQL URL: {e}")))?;
        let options = connect_options(options, settings.pooling);
        let max_connections = settings.max_connections;
        // One direct attempt first: an unreachable server fails at once with
        // its cause ("connection refused"), not after a pool's wait.
        let probe = sqlx::PgConnection::connect_with(&options)
            .await
            .map_err(|e| PortError::Unavailable(Box::new(e)))?;
        let _ = probe.close().await;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(options)
            .await
            .map_err(|e| PortError::Unavailable(Box::new(e)))?;
        Ok(Self::on_pool(pool, prefix).with_pooling(settings.pooling))
    }

    /// Migrates both components this backend uses (storage, then the
    /// queue) to this build's versions; idempotent, and serialized with
    /// other migrators by an advisory lock. Each component migrates in one
    /// transaction with a transaction-scoped lock and unnamed statements,
    /// so this works through PgBouncer's transaction pooling too.
    pub async fn migrate(&self) -> Result<(), PortError> {
        hephaestus_storage_pg::migrate(self.store.pool(), self.store.prefix()).await?;
        hephaestus_queue_pg::migrate(self.queue.pool(), self.queue.prefix()).await?;
        Ok(())
    }

    /// The same backend with another clock for both components (the times
    /// the store writes, every due, retry and rescue time of the queue).
    /// Give the runtime the same clock.
    #[must_use]
    pub fn with_clock(self, clock: impl hephaestus_engine_core::clock::Clock + Clone) -> Self {
        Self {
            store: self.store.with_clock(clock.clone()),
            queue: self.queue.with_clock(clock),
        }
    }

    /// The instance store.
    pub fn store(&self) -> &PgStore {
        &self.store
    }

    /// The job queue.
    pub fn queue(&self) -> &PgQueue {
        &self.queue
    }
}

type Tx = Transaction<'static, Postgres>;

/// What one [`PgBackend::prune_instances`] call deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InstanceRetention {
    /// Finished instances deleted.
    pub instances: u64,
    /// Their step results.
    pub step_results: u64,
    /// Their jobs.
    pub jobs: u64,
}

impl PgBackend {
    /// Instance retention: deletes the finished instances (completed,
    /// failed, cancelled) that ended before `before`, with their step
    /// results and their jobs, `batch` instances per transaction, until none
    /// is left. Never an active instance (see storage-pg's
    /// `prune_finished_instances_using`).
    pub async fn prune_instances(
        &self,
        before: DateTime<Utc>,
        batch: u32,
    ) -> Result<InstanceRetention, PortError> {
        let mut total = InstanceRetention::default();
        loop {
            let mut tx = <PgStore as UnitOfWork>::begin(&self.store).await?;
            let pruned = self
                .store
                .prune_finished_instances_using(&mut *tx, before, batch)
                .await?;
            let groups: Vec<String> = pruned.instances.iter().map(|id| jobs::group(*id)).collect();
            let deleted_jobs = self.queue.delete_groups_using(&mut *tx, &groups).await?;
            <PgStore as UnitOfWork>::commit(&self.store, tx).await?;
            let n = u64::try_from(pruned.instances.len()).unwrap_or(u64::MAX);
            total.instances += n;
            total.step_results += pruned.step_results;
            total.jobs += deleted_jobs;
            if n < u64::from(batch.max(1)) {
                return Ok(total);
            }
        }
    }
}

/// `attempted_by` of the jobs a runner claims to continue a chain of steps.
const CONTINUATION_WORKER: &str = "hephaestus-runner (continuation)";

#[async_trait::async_trait]
impl crate::backend::Backend for PgBackend {
    /// One statement, each instance read once.
    async fn load_for_execution_many(
        &self,
        requests: &[crate::ExecutionRequest],
    ) -> Result<Vec<Option<crate::ExecutionCheck>>, PortError> {
        let keys: Vec<(Uuid, &StepId, u32)> = requests
            .iter()
            .map(|r| (r.instance_id, &r.step, r.activation))
            .collect();
        let checks = self
            .store
            .get_for_execution_many_using(self.store.pooled(), &keys)
            .await?;
        Ok(checks
            .into_iter()
            .map(|check| {
                check.map(|(instance, recorded)| crate::ExecutionCheck { instance, recorded })
            })
            .collect())
    }

    /// One statement; instances held by another writer are skipped at once.
    async fn try_lock_many(
        &self,
        tx: &mut Tx,
        ids: &[Uuid],
    ) -> Result<Vec<crate::Locked>, PortError> {
        Ok(self
            .store
            .try_lock_many_using(tx, ids)
            .await?
            .into_iter()
            .map(|(instance, inbox)| crate::Locked { instance, inbox })
            .collect())
    }

    async fn pending_many(
        &self,
        tx: &mut Tx,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Vec<StepResult>>, PortError> {
        self.store.pending_many_using(&mut **tx, ids).await
    }

    /// One statement (three data-modifying CTEs).
    async fn write_rounds(
        &self,
        tx: &mut Tx,
        writes: crate::RoundWrites<'_>,
    ) -> Result<(), PortError> {
        let rows: Vec<Consumed> = writes
            .consumed
            .iter()
            .flat_map(|inbox| inbox.rows.iter().cloned())
            .collect();
        self.store
            .write_rounds_using(tx, writes.results, &rows, writes.instances)
            .await
    }

    /// One statement per page: it reads the step states as JSON and the
    /// live jobs by group, and decodes no instance.
    async fn reconcile_page(
        &self,
        before: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<crate::ReconcileRow>, PortError> {
        let page = hephaestus_storage_pg::ReconcilePage {
            before,
            limit,
            advance_kind: jobs::ADVANCE,
            execute_kind: jobs::EXECUTE,
            timer_kind: jobs::TIMER,
            done_step: hephaestus_engine_core::steps::DONE_ID,
        };
        Ok(self
            .store
            .reconcile_page(&page)
            .await?
            .into_iter()
            .map(|row| crate::ReconcileRow {
                id: row.id,
                workflow_id: row.workflow_id,
                workflow_version: row.workflow_version,
                candidate: row.candidate,
            })
            .collect())
    }

    /// One statement (queue-pg's `insert_claiming_and_complete_using`):
    /// claimed jobs are inserted executing, with no wake-up sent for them.
    async fn enqueue_and_complete(
        &self,
        tx: &mut Tx,
        settlement: crate::Settlement<'_>,
    ) -> Result<crate::SettlementDone, PortError> {
        let pairs: Vec<(JobId, u32)> = settlement
            .leases
            .iter()
            .map(|l| (l.id, l.attempt))
            .collect();
        let (enqueued, settled) = self
            .queue
            .insert_claiming_and_complete_using(
                tx,
                settlement.jobs,
                settlement.claim,
                CONTINUATION_WORKER,
                &pairs,
            )
            .await?;
        let held = pairs
            .iter()
            .map(|(id, _)| settled.completed.contains(id))
            .collect();
        Ok(crate::SettlementDone { enqueued, held })
    }
}

#[async_trait::async_trait]
impl UnitOfWork for PgBackend {
    type Tx = Tx;

    async fn begin(&self) -> Result<Tx, PortError> {
        <PgStore as UnitOfWork>::begin(&self.store).await
    }

    async fn commit(&self, tx: Tx) -> Result<(), PortError> {
        <PgStore as UnitOfWork>::commit(&self.store, tx).await
    }
}

#[async_trait::async_trait]
impl InstanceStore for PgBackend {
    async fn insert(&self, tx: &mut Tx, instance: &Instance) -> Result<(), PortError> {
        <PgStore as InstanceStore>::insert(&self.store, tx, instance).await
    }

    async fn lock(&self, tx: &mut Tx, id: Uuid) -> Result<Option<Instance>, PortError> {
        <PgStore as InstanceStore>::lock(&self.store, tx, id).await
    }

    async fn update(&self, tx: &mut Tx, instance: &Instance) -> Result<(), PortError> {
        <PgStore as InstanceStore>::update(&self.store, tx, instance).await
    }

    async fn cancel_status_only(
        &self,
        tx: &mut Tx,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<bool, PortError> {
        <PgStore as InstanceStore>::cancel_status_only(&self.store, tx, id, now).await
    }

    async fn get(&self, id: Uuid) -> Result<Option<Instance>, PortError> {
        <PgStore as InstanceStore>::get(&self.store, id).await
    }

    async fn list(&self, filter: &InstanceFilter) -> Result<Vec<Instance>, PortError> {
        <PgStore as InstanceStore>::list(&self.store, filter).await
    }
}

#[async_trait::async_trait]
impl StepResultStore for PgBackend {
    async fn record(&self, tx: &mut Tx, result: &NewStepResult) -> Result<Recorded, PortError> {
        <PgStore as StepResultStore>::record(&self.store, tx, result).await
    }

    async fn pending(&self, tx: &mut Tx, instance_id: Uuid) -> Result<Vec<StepResult>, PortError> {
        <PgStore as StepResultStore>::pending(&self.store, tx, instance_id).await
    }

    async fn mark_processed(
        &self,
        tx: &mut Tx,
        instance_id: Uuid,
        seqs: &[i64],
    ) -> Result<(), PortError> {
        <PgStore as StepResultStore>::mark_processed(&self.store, tx, instance_id, seqs).await
    }

    async fn refuse(
        &self,
        tx: &mut Tx,
        instance_id: Uuid,
        refused: &[(i64, String)],
    ) -> Result<(), PortError> {
        <PgStore as StepResultStore>::refuse(&self.store, tx, instance_id, refused).await
    }

    async fn refused(&self, instance_id: Uuid) -> Result<Vec<Refused>, PortError> {
        <PgStore as StepResultStore>::refused(&self.store, instance_id).await
    }

    async fn is_recorded(
        &self,
        instance_id: Uuid,
        step: &StepId,
        activation: u32,
    ) -> Result<bool, PortError> {
        <PgStore as StepResultStore>::is_recorded(&self.store, instance_id, step, activation).await
    }

    async fn prune_processed(&self, before: DateTime<Utc>) -> Result<u64, PortError> {
        <PgStore as StepResultStore>::prune_processed(&self.store, before).await
    }
}

#[async_trait::async_trait]
impl JobQueue for PgBackend {
    async fn enqueue(&self, tx: &mut Tx, jobs: &[NewJob]) -> Result<Vec<Enqueued>, PortError> {
        <PgQueue as JobQueue>::enqueue(&self.queue, tx, jobs).await
    }

    async fn cancel(&self, tx: &mut Tx, id: JobId) -> Result<bool, PortError> {
        <PgQueue as JobQueue>::cancel(&self.queue, tx, id).await
    }

    async fn cancel_matching(
        &self,
        tx: &mut Tx,
        matching: &JobMatch,
        except: Option<JobId>,
    ) -> Result<u64, PortError> {
        <PgQueue as JobQueue>::cancel_matching(&self.queue, tx, matching, except).await
    }

    async fn fetch(
        &self,
        queue: &str,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<JobLease>, PortError> {
        <PgQueue as JobQueue>::fetch(&self.queue, queue, limit, now).await
    }

    async fn complete(&self, tx: &mut Tx, lease: &JobLease) -> Result<bool, PortError> {
        <PgQueue as JobQueue>::complete(&self.queue, tx, lease).await
    }

    async fn retry(
        &self,
        tx: &mut Tx,
        lease: &JobLease,
        error: &StepError,
        retry_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool, PortError> {
        <PgQueue as JobQueue>::retry(&self.queue, tx, lease, error, retry_at, now).await
    }

    async fn discard(
        &self,
        tx: &mut Tx,
        lease: &JobLease,
        error: &StepError,
        now: DateTime<Utc>,
    ) -> Result<bool, PortError> {
        <PgQueue as JobQueue>::discard(&self.queue, tx, lease, error, now).await
    }

    async fn prune_finished(&self, before: DateTime<Utc>) -> Result<u64, PortError> {
        <PgQueue as JobQueue>::prune_finished(&self.queue, before).await
    }

    async fn heartbeat(&self, leases: &[(JobId, u32)]) -> Result<Vec<JobId>, PortError> {
        <PgQueue as JobQueue>::heartbeat(&self.queue, leases).await
    }

    async fn stale(&self, before: DateTime<Utc>, limit: u32) -> Result<Vec<JobLease>, PortError> {
        <PgQueue as JobQueue>::stale(&self.queue, before, limit).await
    }

    async fn job(&self, id: JobId) -> Result<Option<JobInfo>, PortError> {
        <PgQueue as JobQueue>::job(&self.queue, id).await
    }

    async fn live_jobs(&self, matching: &JobMatch) -> Result<Vec<JobInfo>, PortError> {
        <PgQueue as JobQueue>::live_jobs(&self.queue, matching).await
    }
}

/// One runner job kind as a queue-pg worker.
struct RunnerJob {
    runtime: Runtime<PgBackend>,
    kind: &'static str,
}

#[async_trait::async_trait]
impl DynWorker for RunnerJob {
    fn kind(&self) -> &str {
        self.kind
    }

    fn retry_policy(&self) -> RetryPolicy {
        crate::failures::job_retry_policy(None)
    }

    async fn perform(&self, job: &JobContext) -> Result<(), JobError> {
        // The runtime settles every outcome itself, in the transaction that
        // writes its consequences (a result, the next advance, a retry).
        // A continuation this job's worker claims is adopted by the queue
        // runtime: heartbeats and stop requests as for a fetched job.
        let adopt: Option<crate::execute::Adopt> = job.adopter().map(|adopter| {
            Arc::new(move |lease: &JobLease| {
                let adopted = adopter.adopt(lease.clone());
                Some(crate::execute::Adoption {
                    stop: adopted.cancellation().clone(),
                    _guard: Box::new(adopted),
                })
            }) as crate::execute::Adopt
        });
        self.runtime
            .perform_job(
                job.lease().clone(),
                Some(job.cancellation()),
                adopt.as_ref(),
                self.runtime.config().continuations,
            )
            .await;
        job.mark_settled();
        Ok(())
    }
}

/// queue-pg's discard hook for the runner's jobs: a job the queue discards
/// on its own (its workers kept dying until its attempts ran out) gets what
/// the runtime's discard handler writes, in the discarding transaction; its
/// telemetry follows the commit.
#[derive(Debug)]
struct QueueDiscards {
    runtime: Runtime<PgBackend>,
}

#[async_trait::async_trait]
impl hephaestus_queue_pg::DiscardHook for QueueDiscards {
    async fn on_discard(
        &self,
        tx: &mut Tx,
        job: hephaestus_queue_pg::DiscardedJob<'_>,
    ) -> Result<(), hephaestus_queue_pg::BoxError> {
        let after = self
            .runtime
            .on_discarded(tx, job.lease, job.error, job.at)
            .await
            .map_err(|e| Box::new(e) as hephaestus_queue_pg::BoxError)?;
        job.after_commit(move || after.run());
        Ok(())
    }
}

impl Runtime<PgBackend> {
    /// The runner's job kinds (advance, execute, timer, resume) as queue-pg
    /// workers, with the runtime's discard handler as the queue's discard
    /// hook. Refused without a discard handler
    /// ([`RunnerError::NoDiscardHandler`]): without one, a job the queue
    /// discards would leave its instance stuck. Add workers of your own to
    /// them, then run them with [`Runtime::queue_runtime_with`].
    pub fn queue_workers(&self) -> Result<Workers, RunnerError> {
        self.discard_handler()?;
        Ok([jobs::ADVANCE, jobs::EXECUTE, jobs::TIMER, jobs::RESUME]
            .into_iter()
            .fold(Workers::new(), |workers, kind| {
                workers.register_dyn(Arc::new(RunnerJob {
                    runtime: self.clone(),
                    kind,
                }))
            })
            .fallback_retry_policy(crate::failures::job_retry_policy(None))
            .discard_hook(QueueDiscards {
                runtime: self.clone(),
            }))
    }

    /// The worker runtime of a PostgreSQL worker process: the runner's
    /// workers ([`Runtime::queue_workers`]) on every queue of
    /// [`RunnerConfig::queues`](crate::RunnerConfig) with
    /// [`RunnerConfig::concurrency`](crate::RunnerConfig) slots, the
    /// configured poll interval, heartbeats and rescue: LISTEN/NOTIFY
    /// wake-ups across processes (polling only under
    /// [`Pooling::Transaction`]), batched fetches, and leader-elected
    /// rescue and pruning. Adjust it, then `.start().await`. Refused without
    /// a discard handler ([`RunnerError::NoDiscardHandler`]).
    pub fn queue_runtime(&self) -> Result<RuntimeBuilder, RunnerError> {
        Ok(self.queue_runtime_with(self.queue_workers()?))
    }

    /// [`Runtime::queue_runtime`] running `workers`: the runner's
    /// ([`Runtime::queue_workers`]) with workers of your own added.
    pub fn queue_runtime_with(&self, workers: Workers) -> RuntimeBuilder {
        let config = &self.inner.config;
        let mut builder = QueueRuntime::builder(self.inner.backend.queue().clone(), workers);
        for queue in config.queues.distinct() {
            builder = builder.queue(queue, config.concurrency.max(1));
        }
        builder
            .poll_interval(config.poll_interval)
            .heartbeat(config.heartbeat_interval, config.stale_after)
            .rescue_interval(config.rescue_interval)
    }
}

/// One recorded failed attempt of a step, as operators see it: from one of
/// its jobs' error records or, once the jobs are pruned, from the instance's
/// failure record.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StepAttempt {
    /// The job that made it (`None`: from the failure record).
    pub job_id: Option<i64>,
    /// That job's kind.
    pub job_kind: String,
    /// The step activation it ran.
    pub activation: Option<u32>,
    /// The attempt number.
    pub number: u32,
    /// When it failed.
    pub at: DateTime<Utc>,
    /// How.
    pub error: StepError,
}

/// Each step's recorded failed attempts, oldest first, from the instance's
/// jobs (`jobs`, as queue-pg lists them) and its failure record, which keeps
/// the failed activation's attempts after its jobs are pruned. What
/// `hephaestus instances show` and the dashboard show.
pub fn failed_attempts(
    instance: &Instance,
    jobs: &[hephaestus_queue_pg::Job],
) -> std::collections::BTreeMap<String, Vec<StepAttempt>> {
    let mut out: std::collections::BTreeMap<String, Vec<StepAttempt>> =
        std::collections::BTreeMap::new();
    for job in jobs {
        let Some(step) = job.args.get("step").and_then(serde_json::Value::as_str) else {
            continue;
        };
        let activation = job
            .args
            .get("activation")
            .and_then(serde_json::Value::as_u64)
            .and_then(|a| u32::try_from(a).ok());
        for record in &job.errors {
            out.entry(step.to_owned()).or_default().push(StepAttempt {
                job_id: Some(job.id.0),
                job_kind: job.kind.clone(),
                activation,
                number: record.attempt,
                at: record.at,
                error: record.error.clone(),
            });
        }
    }
    if let Some(failure) = &instance.failure
        && let Some(step) = &failure.step
    {
        let entry = out.entry(step.to_string()).or_default();
        if entry.is_empty() {
            entry.extend(failure.attempts.iter().map(|record| StepAttempt {
                job_id: None,
                job_kind: jobs::EXECUTE.to_owned(),
                activation: Some(failure.activation),
                number: record.attempt,
                at: record.at,
                error: record.error.clone(),
            }));
        }
    }
    for list in out.values_mut() {
        list.sort_by_key(|a| a.at);
    }
    out
}
