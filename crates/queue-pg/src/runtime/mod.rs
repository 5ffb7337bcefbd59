//! The worker runtime: producers per queue, a notifier, job tasks, batched
//! completion, heartbeats, and leader-only maintenance (rescuer, pruner,
//! depth gauge), each its own service with one lifecycle.

mod completer;
mod depth;
mod elector;
mod executor;
mod heartbeat;
mod notifier;
mod producer;
mod pruner;
mod rescuer;
pub(crate) mod running;
mod service;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hephaestus_engine_core::ports::JobId;
use tokio::sync::{broadcast, mpsc};

use crate::error::Error;
use crate::events::{EventCounts, Events, JobEvent, JobEventKind};
use crate::queue::PgQueue;
use crate::worker::Workers;

use completer::{Ack, Completer};
use depth::DepthReporter;
use elector::Elector;
use heartbeat::Heartbeat;
use notifier::Notifier;
use producer::Producer;
use pruner::Pruner;
pub use rescuer::RescueReport;
use rescuer::Rescuer;
use running::Running;

pub(crate) use hephaestus_engine_core::step::lock_ignoring_poison;

/// How a runtime behaves; every field has a default (see [`Default`]).
/// Start from [`RuntimeConfig::default`] and change what you need with the
/// `with_*` methods (new settings may be added without breaking you). The
/// settings are checked together when the runtime starts
/// ([`RuntimeBuilder::start`] fails with [`Error::Config`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RuntimeConfig {
    /// How often producers look for due jobs without a wake-up: the
    /// fallback for missed notifications, the pace of poll-only mode and
    /// the latency bound for scheduled and retried jobs. Default 1 s.
    pub poll_interval: Duration,
    /// No LISTEN connection: producers only poll, and running jobs learn of
    /// a cancel at their next heartbeat (works behind transaction-pooling
    /// PgBouncer). Default false, except for a queue under
    /// [`Pooling::Transaction`](crate::Pooling::Transaction) (see
    /// [`PgQueue::with_pooling`]): [`QueueRuntime::builder`] sets it, and
    /// [`RuntimeBuilder::start`] refuses to LISTEN through such a proxy.
    pub poll_only: bool,
    /// How often running jobs heartbeat. Default 5 s.
    pub heartbeat_interval: Duration,
    /// An executing job whose heartbeat is older than this is rescued.
    /// Must exceed twice the heartbeat interval. Default 30 s.
    pub rescue_after: Duration,
    /// How often the leader looks for jobs to rescue. Default 5 s.
    pub rescue_interval: Duration,
    /// Finished jobs are pruned after this (`None`: never). Default 1 day.
    pub retention: Option<Duration>,
    /// How often the leader prunes. Default 60 s.
    pub prune_interval: Duration,
    /// How often the queue-depth gauge is refreshed (`None`: never).
    /// Default 15 s.
    pub depth_interval: Option<Duration>,
    /// Whether this runtime campaigns for leadership of the maintenance
    /// services. Default true.
    pub maintenance: bool,
    /// How often a follower tries to become leader, and the leader renews
    /// its lease. Default 5 s.
    pub elect_interval: Duration,
    /// How long a leader's lease lasts without a renewal: a leader that
    /// stops renewing (stopped, frozen, cut off) is replaced this long after
    /// its last renewal at most, and itself stops acting as leader then.
    /// Must exceed twice `elect_interval`. Default 15 s.
    pub leader_ttl: Duration,
    /// Most completions in one statement. Default 1000.
    pub completion_batch: usize,
    /// Delete completed jobs in the completing statement instead of keeping
    /// them for [`RuntimeConfig::retention`] (as graphile-worker does): the
    /// fastest completion, with nothing left to inspect. Jobs unique among
    /// `completed` jobs are kept. Discarded and cancelled jobs are always
    /// kept. Default false.
    pub delete_completed: bool,
    /// After the grace period of a shutdown, how long cancelled jobs get to
    /// return before their tasks are aborted. Default 1 s.
    pub cancel_wait: Duration,
    /// Events kept for a lagging subscriber. Default 1024.
    pub events_capacity: usize,
    /// This process in `attempted_by`, and the holder named in the
    /// leadership lease: unique per runtime (default: host, pid and a
    /// random suffix).
    pub worker_id: Option<String>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            poll_only: false,
            heartbeat_interval: Duration::from_secs(5),
            rescue_after: Duration::from_secs(30),
            rescue_interval: Duration::from_secs(5),
            retention: Some(Duration::from_secs(24 * 3600)),
            prune_interval: Duration::from_secs(60),
            depth_interval: Some(Duration::from_secs(15)),
            maintenance: true,
            elect_interval: Duration::from_secs(5),
            leader_ttl: Duration::from_secs(15),
            completion_batch: 1000,
            delete_completed: false,
            cancel_wait: Duration::from_secs(1),
            events_capacity: 1024,
            worker_id: None,
        }
    }
}

impl RuntimeConfig {
    /// Sets how often producers look for due jobs without a wake-up (see [`RuntimeConfig::poll_interval`]).
    #[must_use]
    pub fn with_poll_interval(mut self, value: Duration) -> Self {
        self.poll_interval = value;
        self
    }

    /// Sets whether producers only poll (no LISTEN connection) (see [`RuntimeConfig::poll_only`]).
    #[must_use]
    pub fn with_poll_only(mut self, value: bool) -> Self {
        self.poll_only = value;
        self
    }

    /// Sets how often running jobs heartbeat (see [`RuntimeConfig::heartbeat_interval`]).
    #[must_use]
    pub fn with_heartbeat_interval(mut self, value: Duration) -> Self {
        self.heartbeat_interval = value;
        self
    }

    /// Sets the heartbeat age after which an executing job is rescued (see [`RuntimeConfig::rescue_after`]).
    #[must_use]
    pub fn with_rescue_after(mut self, value: Duration) -> Self {
        self.rescue_after = value;
        self
    }

    /// Sets how often the leader looks for jobs to rescue (see [`RuntimeConfig::rescue_interval`]).
    #[must_use]
    pub fn with_rescue_interval(mut self, value: Duration) -> Self {
        self.rescue_interval = value;
        self
    }

    /// Sets how long finished jobs are kept (`None`: forever) (see [`RuntimeConfig::retention`]).
    #[must_use]
    pub fn with_retention(mut self, value: Option<Duration>) -> Self {
        self.retention = value;
        self
    }

    /// Sets how often the leader prunes (see [`RuntimeConfig::prune_interval`]).
    #[must_use]
    pub fn with_prune_interval(mut self, value: Duration) -> Self {
        self.prune_interval = value;
        self
    }

    /// Sets how often the queue-depth gauge is refreshed (`None`: never) (see [`RuntimeConfig::depth_interval`]).
    #[must_use]
    pub fn with_depth_interval(mut self, value: Option<Duration>) -> Self {
        self.depth_interval = value;
        self
    }

    /// Sets whether this runtime campaigns for leadership of the maintenance services (see [`RuntimeConfig::maintenance`]).
    #[must_use]
    pub fn with_maintenance(mut self, value: bool) -> Self {
        self.maintenance = value;
        self
    }

    /// Sets how often a follower tries to become leader (see [`RuntimeConfig::elect_interval`]).
    #[must_use]
    pub fn with_elect_interval(mut self, value: Duration) -> Self {
        self.elect_interval = value;
        self
    }

    /// Sets how long a leader's lease lasts without a renewal (see [`RuntimeConfig::leader_ttl`]).
    #[must_use]
    pub fn with_leader_ttl(mut self, value: Duration) -> Self {
        self.leader_ttl = value;
        self
    }

    /// Sets the most completions in one statement (see [`RuntimeConfig::completion_batch`]).
    #[must_use]
    pub fn with_completion_batch(mut self, value: usize) -> Self {
        self.completion_batch = value;
        self
    }

    /// Sets whether completed jobs are deleted as they complete (see [`RuntimeConfig::delete_completed`]).
    #[must_use]
    pub fn with_delete_completed(mut self, value: bool) -> Self {
        self.delete_completed = value;
        self
    }

    /// Sets how long cancelled jobs get to return after the grace period (see [`RuntimeConfig::cancel_wait`]).
    #[must_use]
    pub fn with_cancel_wait(mut self, value: Duration) -> Self {
        self.cancel_wait = value;
        self
    }

    /// Sets the events kept for a lagging subscriber (see [`RuntimeConfig::events_capacity`]).
    #[must_use]
    pub fn with_events_capacity(mut self, value: usize) -> Self {
        self.events_capacity = value;
        self
    }

    /// Sets this process's name in `attempted_by` and in the leadership
    /// lease (see [`RuntimeConfig::worker_id`]).
    #[must_use]
    pub fn with_worker_id(mut self, value: impl Into<String>) -> Self {
        self.worker_id = Some(value.into());
        self
    }

    fn validate(&self, queues: &[(String, usize)]) -> Result<(), Error> {
        let bad = |what: String| Err(Error::Config(what));
        for (queue, concurrency) in queues {
            if *concurrency == 0 {
                return bad(format!("queue {queue:?} has concurrency 0"));
            }
            if queue.is_empty() || queue.chars().count() > 128 {
                return bad(format!("queue name {queue:?} must be 1 to 128 characters"));
            }
        }
        let mut names: Vec<&str> = queues.iter().map(|(q, _)| q.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return bad("a queue is listed twice".to_owned());
        }
        for (name, interval) in [
            ("poll_interval", self.poll_interval),
            ("heartbeat_interval", self.heartbeat_interval),
            ("rescue_interval", self.rescue_interval),
            ("prune_interval", self.prune_interval),
            ("elect_interval", self.elect_interval),
        ] {
            if interval.is_zero() {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.rescue_after <= self.heartbeat_interval * 2 {
            return bad(format!(
                "rescue_after ({:?}) must exceed twice the heartbeat interval ({:?})",
                self.rescue_after, self.heartbeat_interval
            ));
        }
        if self.leader_ttl <= self.elect_interval * 2 {
            return bad(format!(
                "leader_ttl ({:?}) must exceed twice the election interval ({:?})",
                self.leader_ttl, self.elect_interval
            ));
        }
        if self.completion_batch == 0 {
            return bad("completion_batch must be at least 1".to_owned());
        }
        Ok(())
    }
}

/// What the services of a runtime share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) queue: PgQueue,
    pub(crate) workers: Workers,
    pub(crate) events: Events,
    pub(crate) running: Arc<Running>,
    pub(crate) acks: mpsc::Sender<Ack>,
    pub(crate) worker_id: String,
    pub(crate) config: RuntimeConfig,
}

impl Shared {
    pub(crate) fn settler(&self) -> crate::execute::Settler<'_> {
        crate::execute::Settler {
            queue: &self.queue,
            workers: &self.workers,
            events: &self.events,
        }
    }
}

/// Builds a [`QueueRuntime`].
#[derive(Debug)]
pub struct RuntimeBuilder {
    queue: PgQueue,
    workers: Workers,
    queues: Vec<(String, usize)>,
    config: RuntimeConfig,
}

impl RuntimeBuilder {
    /// Runs jobs of `queue`, at most `concurrency` at a time.
    #[must_use]
    pub fn queue(mut self, queue: impl Into<String>, concurrency: usize) -> Self {
        self.queues.push((queue.into(), concurrency));
        self
    }

    /// Replaces the whole configuration.
    #[must_use]
    pub fn config(mut self, config: RuntimeConfig) -> Self {
        self.config = config;
        self
    }

    /// See [`RuntimeConfig::poll_interval`].
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.config.poll_interval = interval;
        self
    }

    /// See [`RuntimeConfig::poll_only`].
    #[must_use]
    pub fn poll_only(mut self, poll_only: bool) -> Self {
        self.config.poll_only = poll_only;
        self
    }

    /// See [`RuntimeConfig::heartbeat_interval`] and
    /// [`RuntimeConfig::rescue_after`].
    #[must_use]
    pub fn heartbeat(mut self, interval: Duration, rescue_after: Duration) -> Self {
        self.config.heartbeat_interval = interval;
        self.config.rescue_after = rescue_after;
        self
    }

    /// See [`RuntimeConfig::rescue_interval`].
    #[must_use]
    pub fn rescue_interval(mut self, interval: Duration) -> Self {
        self.config.rescue_interval = interval;
        self
    }

    /// See [`RuntimeConfig::retention`].
    #[must_use]
    pub fn retention(mut self, retention: Option<Duration>) -> Self {
        self.config.retention = retention;
        self
    }

    /// See [`RuntimeConfig::elect_interval`] and
    /// [`RuntimeConfig::leader_ttl`].
    #[must_use]
    pub fn election(mut self, interval: Duration, ttl: Duration) -> Self {
        self.config.elect_interval = interval;
        self.config.leader_ttl = ttl;
        self
    }

    /// See [`RuntimeConfig::depth_interval`].
    #[must_use]
    pub fn depth_interval(mut self, interval: Option<Duration>) -> Self {
        self.config.depth_interval = interval;
        self
    }

    /// See [`RuntimeConfig::maintenance`].
    #[must_use]
    pub fn maintenance(mut self, maintenance: bool) -> Self {
        self.config.maintenance = maintenance;
        self
    }

    /// Starts every service; returns once they run (LISTEN in effect, a
    /// first leadership attempt made).
    pub async fn start(self) -> Result<QueueRuntime, Error> {
        let Self {
            queue,
            workers,
            queues,
            config,
        } = self;
        config.validate(&queues)?;
        check_pool(&queue, &config)?;
        check_pooling(&queue, &config)?;
        let worker_id = config.worker_id.clone().unwrap_or_else(default_worker_id);
        let events = Events::new(config.events_capacity);
        let running = Running::new();
        let (acks, acks_rx) = mpsc::channel(config.completion_batch.saturating_mul(4));
        let completer = Completer::start(
            queue.clone(),
            events.clone(),
            acks_rx,
            config.completion_batch,
            config.delete_completed,
        );
        let shared = Arc::new(Shared {
            queue: queue.clone(),
            workers,
            events,
            running,
            acks,
            worker_id,
            config: config.clone(),
        });
        let producers: Vec<Producer> = queues
            .iter()
            .map(|(name, concurrency)| {
                Producer::start(Arc::clone(&shared), name.clone(), *concurrency)
            })
            .collect();
        let mut services = Services {
            producers,
            notifier: None,
            completer,
            heartbeat: Heartbeat::start(Arc::clone(&shared)),
            elector: None,
            rescuer: None,
            pruner: None,
            depth: None,
        };
        if !config.poll_only {
            let wakers: HashMap<String, _> = services
                .producers
                .iter()
                .map(|p| (p.queue().to_owned(), p.wakes()))
                .collect();
            match Notifier::start(Arc::clone(&shared), wakers).await {
                Ok(notifier) => services.notifier = Some(notifier),
                Err(error) => {
                    services.stop_all().await;
                    return Err(error);
                }
            }
            // Jobs inserted between the producers' first fetch and LISTEN.
            for producer in &services.producers {
                producer.wake();
            }
        }
        if config.maintenance {
            let elector = Elector::start(
                queue.clone(),
                shared.worker_id.clone(),
                config.elect_interval,
                config.leader_ttl,
            )
            .await;
            let leader = elector.leadership();
            services.rescuer = Some(Rescuer::start(Arc::clone(&shared), Arc::clone(&leader)));
            if let Some(retention) = config.retention {
                services.pruner = Some(Pruner::start(
                    queue.clone(),
                    retention,
                    config.prune_interval,
                    Arc::clone(&leader),
                ));
            }
            if let Some(interval) = config.depth_interval {
                services.depth = Some(DepthReporter::start(queue.clone(), interval, leader));
            }
            services.elector = Some(elector);
        }
        tracing::info!(
            target: "hephaestus_queue",
            worker = %shared.worker_id,
            queues = ?queues,
            poll_only = config.poll_only,
            "queue runtime started"
        );
        Ok(QueueRuntime {
            inner: Arc::new(Inner {
                shared,
                services,
                shutdown: tokio::sync::Mutex::new(None),
            }),
        })
    }
}

/// Every service of a runtime.
#[derive(Debug)]
struct Services {
    producers: Vec<Producer>,
    notifier: Option<Notifier>,
    completer: Completer,
    heartbeat: Heartbeat,
    elector: Option<Elector>,
    rescuer: Option<Rescuer>,
    pruner: Option<Pruner>,
    depth: Option<DepthReporter>,
}

impl Services {
    async fn stop_producers(&self) {
        for producer in &self.producers {
            producer.stop().await;
        }
    }

    /// Stops everything but the producers (stopped first) and job tasks.
    async fn stop_all(&self) {
        self.stop_producers().await;
        self.completer.stop().await;
        self.heartbeat.stop().await;
        if let Some(notifier) = &self.notifier {
            notifier.stop().await;
        }
        if let Some(rescuer) = &self.rescuer {
            rescuer.stop().await;
        }
        if let Some(pruner) = &self.pruner {
            pruner.stop().await;
        }
        if let Some(depth) = &self.depth {
            depth.stop().await;
        }
        if let Some(elector) = &self.elector {
            elector.stop().await;
        }
    }

    fn signal_stop_all(&self) {
        for producer in &self.producers {
            producer.signal_stop();
        }
        self.completer.signal_stop();
        self.heartbeat.signal_stop();
        if let Some(notifier) = &self.notifier {
            notifier.signal_stop();
        }
        if let Some(rescuer) = &self.rescuer {
            rescuer.signal_stop();
        }
        if let Some(pruner) = &self.pruner {
            pruner.signal_stop();
        }
        if let Some(depth) = &self.depth {
            depth.signal_stop();
        }
        if let Some(elector) = &self.elector {
            elector.signal_stop();
        }
    }
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    services: Services,
    shutdown: tokio::sync::Mutex<Option<ShutdownReport>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle went away without a shutdown: stop the services
        // (without waiting); jobs still running finish on their own.
        self.services.signal_stop_all();
    }
}

/// What a graceful shutdown did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Every job finished within the grace period.
    pub finished_in_grace: bool,
    /// Jobs told to stop when the grace period ran out.
    pub stop_requested: Vec<JobId>,
    /// Jobs whose tasks were aborted because they did not stop in time.
    pub aborted: Vec<JobId>,
    /// Of the aborted jobs, those handed back to the queue: available again
    /// at once, the attempt not counted (see
    /// [`PgQueue::release_interrupted`]). An aborted job missing here was
    /// settled meanwhile, or could not be handed back (the database was
    /// unreachable): the rescuer reclaims it after `rescue_after`.
    pub handed_back: Vec<JobId>,
}

/// A running queue runtime: cheap to clone; [`QueueRuntime::shutdown`]
/// stops it gracefully.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), hephaestus_queue_pg::Error> {
/// use std::time::Duration;
/// use hephaestus_queue_pg::{PgQueue, QueueRuntime, Workers};
/// use hephaestus_migrations_gen::SchemaPrefix;
///
/// let queue = PgQueue::new(pool, SchemaPrefix::default());
/// let runtime = QueueRuntime::builder(queue, Workers::new())
///     .queue("default", 10)
///     .start()
///     .await?;
/// runtime.shutdown(Duration::from_secs(10)).await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct QueueRuntime {
    inner: Arc<Inner>,
}

impl QueueRuntime {
    /// A runtime for `queue` running `workers`; add queues with
    /// [`RuntimeBuilder::queue`].
    pub fn builder(queue: PgQueue, workers: Workers) -> RuntimeBuilder {
        // LISTEN needs a session of its own: a queue behind a
        // transaction-pooling proxy polls unless told otherwise (and is
        // refused at start if told so).
        let config = RuntimeConfig::default().with_poll_only(queue.pooling().needs_transaction());
        RuntimeBuilder {
            queue,
            workers,
            queues: Vec::new(),
            config,
        }
    }

    /// Every job event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.inner.shared.events.subscribe()
    }

    /// How many job events of each kind this runtime emitted.
    pub fn counts(&self) -> EventCounts {
        self.inner.shared.events.counts()
    }

    /// The queue.
    pub fn queue(&self) -> &PgQueue {
        &self.inner.shared.queue
    }

    /// This process's `attempted_by`.
    pub fn worker_id(&self) -> &str {
        &self.inner.shared.worker_id
    }

    /// Whether this runtime leads the maintenance services.
    pub fn is_leader(&self) -> bool {
        self.inner
            .services
            .elector
            .as_ref()
            .is_some_and(Elector::is_leader)
    }

    /// The jobs running user code in this process.
    pub fn running_jobs(&self) -> Vec<JobId> {
        self.inner.shared.running.ids()
    }

    /// Runs one rescue pass now, leader or not.
    pub async fn rescue_now(&self) -> Result<RescueReport, Error> {
        rescuer::rescue_once(&self.inner.shared).await
    }

    /// Runs one heartbeat now.
    pub async fn heartbeat_now(&self) {
        heartbeat::beat(&self.inner.shared).await;
    }

    /// Prunes jobs finished longer than the retention ago, now, leader or
    /// not; returns how many (0 without a retention).
    pub async fn prune_now(&self) -> Result<u64, Error> {
        match self.inner.shared.config.retention {
            Some(retention) => pruner::prune_once(&self.inner.shared.queue, retention).await,
            None => Ok(0),
        }
    }

    /// Stops gracefully: no more fetching; running jobs get `grace` to
    /// finish; then they are told to stop and get
    /// [`RuntimeConfig::cancel_wait`] more before their tasks are aborted;
    /// finally pending completions are written and every service stops.
    /// Idempotent: later calls return the first report.
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let mut done = self.inner.shutdown.lock().await;
        if let Some(report) = &*done {
            return report.clone();
        }
        let shared = &self.inner.shared;
        let services = &self.inner.services;
        services.stop_producers().await;
        let mut report = ShutdownReport {
            finished_in_grace: shared.running.wait_idle(grace).await,
            ..ShutdownReport::default()
        };
        if !report.finished_in_grace {
            for job in shared.running.request_stop_all() {
                report.stop_requested.push(job.id());
                shared
                    .events
                    .emit(job.lease(), JobEventKind::StopRequested, None, None);
            }
            report.stop_requested.sort_unstable();
            if !shared.running.wait_idle(shared.config.cancel_wait).await {
                let aborted = shared.running.abort_all();
                report.aborted = aborted.iter().map(|(id, _)| *id).collect();
                // Aborted tasks end at their next await; settlements finish.
                shared.running.wait_idle(shared.config.cancel_wait).await;
                // What they did not settle goes back to the queue now,
                // instead of waiting for the rescuer.
                match shared
                    .queue
                    .release_interrupted(&aborted, &shared.worker_id)
                    .await
                {
                    Ok(mut released) => {
                        released.sort_unstable();
                        report.handed_back = released;
                    }
                    Err(error) => tracing::error!(
                        target: "hephaestus_queue",
                        worker = %shared.worker_id,
                        %error,
                        jobs = aborted.len(),
                        "could not hand interrupted jobs back; the rescuer will reclaim them"
                    ),
                }
            }
        }
        services.stop_all().await;
        tracing::info!(
            target: "hephaestus_queue",
            worker = %shared.worker_id,
            finished_in_grace = report.finished_in_grace,
            aborted = report.aborted.len(),
            handed_back = report.handed_back.len(),
            "queue runtime stopped"
        );
        *done = Some(report.clone());
        report
    }

    /// Stops like a crashed process: every service stops at once and the
    /// tasks of running jobs are aborted without settling them (they stay
    /// `executing` until rescued). For fault-injection tests.
    pub async fn abort(&self) -> Vec<JobId> {
        let mut done = self.inner.shutdown.lock().await;
        let aborted: Vec<JobId> = self
            .inner
            .shared
            .running
            .abort_all()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        self.inner.services.signal_stop_all();
        self.inner.services.stop_all().await;
        *done = Some(ShutdownReport {
            finished_in_grace: false,
            stop_requested: Vec::new(),
            aborted: aborted.clone(),
            handed_back: Vec::new(),
        });
        aborted
    }
}

/// Connections a runtime keeps for itself: the LISTEN connection (none in
/// poll-only mode). Leader election and every other service borrow one
/// per statement.
pub fn connections_held(config: &RuntimeConfig) -> u32 {
    u32::from(!config.poll_only)
}

/// Refuses a pool too small to run anything: it must hold what the runtime
/// keeps for itself plus one for jobs and services, or every job would wait
/// the pool's acquire timeout.
fn check_pool(queue: &PgQueue, config: &RuntimeConfig) -> Result<(), Error> {
    let max = queue.pool().options().get_max_connections();
    let needed = connections_held(config) + 1;
    if max < needed {
        return Err(Error::Config(format!(
            "the connection pool allows {max} connection(s); the queue runtime holds {} for itself (its LISTEN connection) and needs at least one more: use a pool of at least {needed} (concurrency + 4 recommended)",
            connections_held(config)
        )));
    }
    Ok(())
}

/// Refuses LISTEN through a transaction-pooling proxy: the server session
/// that ran `LISTEN` goes back to the proxy's pool at once, and the
/// notifications reach whichever client holds it next, or nobody.
fn check_pooling(queue: &PgQueue, config: &RuntimeConfig) -> Result<(), Error> {
    if queue.pooling().needs_transaction() && !config.poll_only {
        return Err(Error::Config(
            "the queue's connections go through a transaction-pooling proxy (Pooling::Transaction), where LISTEN cannot work: set poll_only"
                .to_owned(),
        ));
    }
    Ok(())
}

/// `<host>-<pid>-<8 hex>`.
fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &suffix[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_is_validated() {
        let ok = RuntimeConfig::default();
        assert!(ok.validate(&[("q".into(), 1)]).is_ok());
        assert!(ok.validate(&[("q".into(), 0)]).is_err());
        assert!(ok.validate(&[("q".into(), 1), ("q".into(), 2)]).is_err());
        assert!(ok.validate(&[(String::new(), 1)]).is_err());
        let tight = RuntimeConfig::default().with_rescue_after(Duration::from_secs(10));
        assert!(tight.validate(&[]).is_err());
        let zero = RuntimeConfig::default().with_poll_interval(Duration::ZERO);
        assert!(zero.validate(&[]).is_err());
        let short_lease = RuntimeConfig::default().with_leader_ttl(Duration::from_secs(10));
        assert!(
            short_lease.validate(&[]).is_err(),
            "a lease must outlast two renewal intervals"
        );
    }

    #[test]
    fn config_default_is_the_documented_one() {
        let secs = Duration::from_secs;
        assert_eq!(
            RuntimeConfig::default(),
            RuntimeConfig {
                poll_interval: secs(1),
                poll_only: false,
                heartbeat_interval: secs(5),
                rescue_after: secs(30),
                rescue_interval: secs(5),
                retention: Some(secs(24 * 3600)),
                prune_interval: secs(60),
                depth_interval: Some(secs(15)),
                maintenance: true,
                elect_interval: secs(5),
                leader_ttl: secs(15),
                completion_batch: 1000,
                delete_completed: false,
                cancel_wait: secs(1),
                events_capacity: 1024,
                worker_id: None,
            }
        );
    }

    #[test]
    fn config_setters_set_their_own_field() {
        // Every value differs from the default and from the other fields of
        // its type, so a setter writing the wrong field fails the comparison.
        let ms = Duration::from_millis;
        let config = RuntimeConfig::default()
            .with_poll_interval(ms(1))
            .with_poll_only(true)
            .with_heartbeat_interval(ms(2))
            .with_rescue_after(ms(3))
            .with_rescue_interval(ms(4))
            .with_retention(None)
            .with_prune_interval(ms(5))
            .with_depth_interval(Some(ms(6)))
            .with_maintenance(false)
            .with_elect_interval(ms(7))
            .with_leader_ttl(ms(8))
            .with_completion_batch(9)
            .with_delete_completed(true)
            .with_cancel_wait(ms(10))
            .with_events_capacity(11)
            .with_worker_id("w-12");
        assert_eq!(
            config,
            RuntimeConfig {
                poll_interval: ms(1),
                poll_only: true,
                heartbeat_interval: ms(2),
                rescue_after: ms(3),
                rescue_interval: ms(4),
                retention: None,
                prune_interval: ms(5),
                depth_interval: Some(ms(6)),
                maintenance: false,
                elect_interval: ms(7),
                leader_ttl: ms(8),
                completion_batch: 9,
                delete_completed: true,
                cancel_wait: ms(10),
                events_capacity: 11,
                worker_id: Some("w-12".to_owned()),
            }
        );
    }

    #[test]
    fn worker_ids_are_unique_per_runtime() {
        assert_ne!(default_worker_id(), default_worker_id());
    }
}
