//! `hephaestus bench workflow`: burn-down and latency of workflows on
//! PostgreSQL.
//!
//! 1. Creates and migrates its own schema (`hephaestus_bench_<hex>`,
//!    dropped at the end unless `--keep`).
//! 2. Starts `--workers` worker "processes": each a runner [`Runtime`] with
//!    its own connection pool running the runner's jobs on a queue-pg
//!    [`QueueRuntime`] with the failure handler's discard hook, as a
//!    production worker does.
//! 3. Burn-down: starts `--instances` instances of the `--shape` (no-op steps
//!    completing with `done`) over `--starters` connections, `--batch`
//!    instances per transaction, and times from the first start until every
//!    instance is completed (polled from the instances table; any failed
//!    instance or the deadline aborts the benchmark).
//!    `pg_stat_database.xact_commit` and the WAL position are read before
//!    and after, with every other connection closed so the statistics are
//!    flushed, for commits and WAL bytes per step.
//! 4. Latency: on the idle (vacuumed) system, `--samples` instances run one
//!    at a time; start to completed (the `workflow.stop` telemetry event) is
//!    timed, and divided by the steps of the shape for the per-step
//!    orchestration latency.
//!
//! Prints one JSON object with `--json`, a short table otherwise.
//!
//! With `--database-url sqlite://FILE` (a file that does not exist yet,
//! deleted afterwards unless `--keep`) the same burn-down and latency run on
//! a SQLite file, with ONE worker (one per file): the runner's own loop
//! (`Runtime::run`) with `--concurrency` slots. Commits, WAL bytes and the
//! server's CPU are PostgreSQL's counters and are not reported there; CPU
//! per step is this process's, which then holds the whole database.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::common::{
    BenchSchema, Components, CpuSnapshot, percentile, pool, ratio, ratio_i64, server_counters,
};
use anyhow::{Context, Result, bail, ensure};
use hephaestus_engine_core::InstanceStatus;
use hephaestus_engine_core::prelude::*;
use hephaestus_engine_core::steps::{Done, FnStep};
use hephaestus_migrations_gen::SchemaPrefix;
use hephaestus_queue_pg::{PgQueue, QueueRuntime};
use hephaestus_runner::postgres::PgBackend;
use hephaestus_runner::telemetry::names;
use hephaestus_runner::{RunnerConfig, Runtime, StartOptions};
use hephaestus_storage_pg::PgStore;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;

/// The workflow every shape is registered as.
const WORKFLOW: &str = "bench";
/// Longest the burn-down may take before the benchmark gives up.
const BURN_DOWN_LIMIT: Duration = Duration::from_secs(900);
/// Longest one latency sample may take.
const SAMPLE_LIMIT: Duration = Duration::from_secs(30);

/// The shape of the benchmark workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// A, then B1..B8 in parallel, then C once all of them completed.
    Diamond,
    /// A chain of ten steps.
    Linear,
    /// A, then B1..B50 in parallel, then C.
    Wide,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Self::Diamond => "diamond",
            Self::Linear => "linear",
            Self::Wide => "wide",
        }
    }

    /// Steps one instance executes.
    fn steps(self) -> usize {
        match self {
            // A, eight branches, C; or ten in a row.
            Self::Diamond | Self::Linear => 10,
            Self::Wide => 52,
        }
    }

    /// The workflow: no-op steps, each completing with `done`.
    fn workflow(self) -> Result<Workflow> {
        let noop = |id: &str| FnStep::new(id, ["done"], |_| StepOutcome::complete("done"));
        let builder = Workflow::builder(WORKFLOW).unique("key", Scope::None);
        let wf = match self {
            Self::Linear => {
                let chain: Vec<FnStep> = (1..=10).map(|i| noop(&format!("S{i}"))).collect();
                let mut builder = builder.start(chain[0].clone());
                for pair in chain.windows(2) {
                    builder = builder.on(pair[0].clone(), "done", pair[1].clone());
                }
                builder.on(chain[9].clone(), "done", Done)
            }
            Self::Diamond | Self::Wide => {
                let width = self.steps() - 2;
                let (a, c) = (noop("A"), noop("C"));
                let branches: Vec<FnStep> = (1..=width).map(|i| noop(&format!("B{i}"))).collect();
                let mut builder = builder.start(a.clone()).fan_out(
                    a,
                    "done",
                    branches
                        .iter()
                        .map(|b| target(b.clone()))
                        .collect::<Vec<_>>(),
                );
                for branch in &branches {
                    builder = builder.on(branch.clone(), "done", c.clone());
                }
                builder.on(c, "done", Done)
            }
        };
        wf.build()
            .map_err(|e| anyhow::anyhow!("the {} workflow is invalid: {e}", self.name()))
    }
}

/// Options of `hephaestus bench workflow`.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkflowBench {
    /// Instances to start in the burn-down.
    #[arg(long, default_value_t = 1_000)]
    instances: usize,
    /// The workflow's shape.
    #[arg(long, value_enum, default_value_t = Shape::Diamond)]
    shape: Shape,
    /// Worker "processes", each a runtime with its own connection pool
    /// (default: 2 on PostgreSQL; a SQLite file has exactly one).
    #[arg(long)]
    workers: Option<usize>,
    /// Jobs in flight per worker (no-op steps: the more in flight, the
    /// larger each settling batch).
    #[arg(long, default_value_t = 400)]
    concurrency: usize,
    /// Most jobs settled in one unit of work (`RunnerConfig::max_batch`).
    #[arg(long, default_value_t = RunnerConfig::default().max_batch)]
    max_batch: usize,
    /// Settling units of work in flight per worker
    /// (`RunnerConfig::batch_flushers`).
    #[arg(long, default_value_t = RunnerConfig::default().batch_flushers)]
    flushers: usize,
    /// Every step through the queue: no continuations
    /// (`RunnerConfig::continuations`).
    #[arg(long)]
    no_continuations: bool,
    /// Connections per worker's pool.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// Instances started per transaction.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Connections starting instances at once.
    #[arg(long, default_value_t = 2)]
    starters: usize,
    /// Instances run (and the tables analyzed, as autovacuum does on a live
    /// system) before the measured burn-down (0 to measure a cold, fresh
    /// schema).
    #[arg(long, default_value_t = 500)]
    warm_up: usize,
    /// Instances run one at a time on the idle system for the latency (0 to
    /// skip).
    #[arg(long, default_value_t = 50)]
    samples: usize,
    /// The PostgreSQL server, or `sqlite://FILE` (a new SQLite file).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// The schema to create and use (default: a fresh `hephaestus_bench_<hex>`).
    #[arg(long)]
    schema: Option<String>,
    /// Keep the schema afterwards.
    #[arg(long)]
    keep: bool,
    /// Print one JSON object (and no progress bar).
    #[arg(long)]
    json: bool,
}

/// What was measured.
#[derive(Debug, Clone)]
struct Report {
    burn_down: Duration,
    commits: i64,
    wal_bytes: i64,
    checkpoints: Option<i64>,
    /// Start to completed of every burn-down instance, from the table.
    p50: Option<Duration>,
    p99: Option<Duration>,
    /// Start to completed of the one-at-a-time instances, sorted.
    samples: Vec<Duration>,
    server: String,
    /// CPU per step of the burn-down: this process (the workers and the
    /// starters) and the local PostgreSQL, in microseconds.
    cpu_us_per_step: (Option<f64>, Option<f64>),
}

/// The worker "processes" of a run.
struct Workers {
    pools: Vec<PgPool>,
    runtimes: Vec<Runtime<PgBackend>>,
    queues: Vec<QueueRuntime>,
}

impl Workers {
    async fn stop(self) {
        for queue in &self.queues {
            queue.shutdown(Duration::from_secs(10)).await;
        }
        drop(self.queues);
        drop(self.runtimes);
        for pool in self.pools {
            pool.close().await;
        }
    }
}

impl WorkflowBench {
    pub async fn run(self) -> Result<()> {
        ensure!(self.instances > 0, "--instances must be at least 1");
        ensure!(self.workers() > 0, "--workers must be at least 1");
        ensure!(self.concurrency > 0, "--concurrency must be at least 1");
        ensure!(self.max_batch > 0, "--max-batch must be at least 1");
        ensure!(self.flushers > 0, "--flushers must be at least 1");
        ensure!(self.connections > 0, "--connections must be at least 1");
        ensure!(self.batch > 0, "--batch must be at least 1");
        ensure!(self.starters > 0, "--starters must be at least 1");
        if hephaestus_sqlite::SqliteOptions::is_sqlite_url(&self.database_url) {
            return self.run_sqlite().await;
        }
        let schema = BenchSchema::open(
            &self.database_url,
            self.schema.as_deref(),
            Components::StorageAndQueue,
            self.keep,
        )
        .await?;
        let outcome = self.measure(&schema.options, &schema.prefix).await;
        schema.finish().await?;
        let report = outcome?;
        self.print(&report);
        Ok(())
    }

    async fn measure(&self, options: &PgConnectOptions, prefix: &SchemaPrefix) -> Result<Report> {
        let workflow = self.shape.workflow()?;
        let admin = pool(options, 1).await?;
        let server = hephaestus_queue_pg::server_version(&admin).await?;
        admin.close().await;

        // 0. Warm-up: a live system's tables have planner statistics, and
        //    its connections' cached plans were made with them. A fresh
        //    schema has neither: plans cached while the tables are tiny scan
        //    them whole once they have grown, until autovacuum's first
        //    analyze (a minute or more) invalidates them. The warm-up runs
        //    instances, then analyzes the tables as autovacuum would.
        if self.warm_up > 0 {
            let workers = self.start_workers(options, prefix, &workflow).await?;
            let warmed = self
                .burn_down(options, prefix, &workflow, self.warm_up, "w", true)
                .await;
            workers.stop().await;
            warmed.context("the warm-up")?;
            let admin = pool(options, 1).await?;
            PgQueue::new(admin.clone(), prefix.clone())
                .analyze()
                .await?;
            PgStore::new(admin.clone(), prefix.clone())
                .analyze()
                .await?;
            admin.close().await;
        }

        // 1. Burn-down, between two readings of the server's counters.
        let before = server_counters(options).await?;
        let workers = self.start_workers(options, prefix, &workflow).await?;
        let cpu_before = CpuSnapshot::now();
        let burn_down = self
            .burn_down(options, prefix, &workflow, self.instances, "b", self.json)
            .await;
        let cpu_us_per_step =
            CpuSnapshot::now().per_unit_since(&cpu_before, self.instances * self.shape.steps());
        workers.stop().await;
        let burn_down = burn_down?;
        let after = server_counters(options).await?;

        // 2. Start to completed of every instance, from the table.
        let admin = pool(options, 1).await?;
        let store = PgStore::new(admin.clone(), prefix.clone());
        let (p50, p99) = match store
            .completion_seconds("key::b", &[0.5, 0.99])
            .await?
            .as_deref()
        {
            Some(&[p50, p99]) => (Some(p50), Some(p99)),
            _ => (None, None),
        };
        // 3. One at a time on the idle system, vacuumed first as autovacuum
        //    would have done after the burst.
        PgQueue::new(admin.clone(), prefix.clone())
            .vacuum_analyze()
            .await?;
        store.vacuum_analyze().await?;
        admin.close().await;
        let samples = if self.samples == 0 {
            Vec::new()
        } else {
            let workers = self.start_workers(options, prefix, &workflow).await?;
            let samples = self.latency(&workers).await;
            workers.stop().await;
            samples?
        };
        Ok(Report {
            burn_down,
            commits: after.commits - before.commits,
            wal_bytes: after.wal_bytes - before.wal_bytes,
            checkpoints: after
                .checkpoints
                .zip(before.checkpoints)
                .map(|(a, b)| a - b),
            p50: p50.map(|s| Duration::from_secs_f64(s.max(0.0))),
            p99: p99.map(|s| Duration::from_secs_f64(s.max(0.0))),
            samples,
            server,
            cpu_us_per_step,
        })
    }

    fn config(&self) -> RunnerConfig {
        RunnerConfig::default()
            .with_concurrency(self.concurrency)
            .with_max_batch(self.max_batch)
            .with_batch_flushers(self.flushers)
            .with_continuations(!self.no_continuations)
    }

    async fn start_workers(
        &self,
        options: &PgConnectOptions,
        prefix: &SchemaPrefix,
        workflow: &Workflow,
    ) -> Result<Workers> {
        let mut workers = Workers {
            pools: Vec::new(),
            runtimes: Vec::new(),
            queues: Vec::new(),
        };
        for i in 0..self.workers() {
            let pool = pool(options, self.connections).await?;
            let runtime = runtime(&pool, prefix, workflow, self.config())?;
            let queue = runtime
                .queue_runtime()?
                .retention(None)
                .maintenance(i == 0)
                .start()
                .await
                .context("starting a worker")?;
            workers.pools.push(pool);
            workers.runtimes.push(runtime);
            workers.queues.push(queue);
        }
        Ok(workers)
    }

    /// Starts `count` instances (business values `<label><n>`) and waits
    /// until all of them are completed.
    async fn burn_down(
        &self,
        options: &PgConnectOptions,
        prefix: &SchemaPrefix,
        workflow: &Workflow,
        count: usize,
        label: &'static str,
        quiet: bool,
    ) -> Result<Duration> {
        let starters = u32::try_from(self.starters).context("--starters")?;
        let start_pool = pool(options, starters).await?;
        let start_runtime = runtime(&start_pool, prefix, workflow, self.config())?;
        let watch = pool(options, 1).await?;
        // Open every connection before the clock starts.
        let mut warm = Vec::new();
        for _ in 0..self.starters {
            warm.push(start_pool.acquire().await?);
        }
        drop(warm);
        let progress = if quiet {
            ProgressBar::hidden()
        } else {
            let bar = ProgressBar::new(u64::try_from(count)?);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} completed ({per_sec}) {msg}",
                )
                .context("the progress template")?,
            );
            bar
        };
        let batches = count.div_ceil(self.batch);
        let next = Arc::new(AtomicUsize::new(0));
        let launched = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..self.starters {
            let (rt, pool, next) = (start_runtime.clone(), start_pool.clone(), Arc::clone(&next));
            let launched = Arc::clone(&launched);
            let batch = self.batch;
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= batches {
                        return Ok::<(), anyhow::Error>(());
                    }
                    let mut tx = pool.begin().await?;
                    let range = i * batch..((i + 1) * batch).min(count);
                    let n = range.len();
                    for k in range {
                        rt.start_in(
                            &mut tx,
                            WORKFLOW,
                            &format!("{label}{k}"),
                            json!({}),
                            StartOptions::default(),
                        )
                        .await?;
                    }
                    tx.commit().await?;
                    launched.fetch_add(n, Ordering::Relaxed);
                }
            }));
        }
        // Polls the active instances through their partial index (cheap,
        // and shrinking): a count over the whole table every few
        // milliseconds would itself cost the server a good share of a core.
        let active = PgStore::new(watch.clone(), prefix.clone());
        let mut starting = tasks;
        let elapsed = loop {
            if !starting.is_empty() && starting.iter().all(tokio::task::JoinHandle::is_finished) {
                for task in starting.drain(..) {
                    task.await.context("a start task panicked")??;
                }
            }
            let open = i64::try_from(active.active_count().await?)?;
            let launched = launched.load(Ordering::Relaxed);
            let finished = i64::try_from(launched)?.saturating_sub(open);
            progress.set_position(u64::try_from(finished).unwrap_or(0));
            if starting.is_empty() && open == 0 {
                break started.elapsed();
            }
            ensure!(
                started.elapsed() < BURN_DOWN_LIMIT,
                "the burn-down did not finish within {BURN_DOWN_LIMIT:?} ({finished} of {count} instances finished)"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let statuses = active.status_counts(&format!("key::{label}")).await?;
        let of = |status| i64::try_from(statuses.get(&status).copied().unwrap_or(0));
        let completed = of(InstanceStatus::Completed)?;
        let failed = of(InstanceStatus::Failed)? + of(InstanceStatus::Cancelled)?;
        ensure!(failed == 0, "{failed} instances failed or were cancelled");
        ensure!(
            completed == i64::try_from(count)?,
            "{completed} of {count} instances completed"
        );
        progress.finish_and_clear();
        drop(start_runtime);
        start_pool.close().await;
        watch.close().await;
        Ok(elapsed)
    }

    /// Runs instances one at a time; start to completed of each, sorted.
    async fn latency(&self, workers: &Workers) -> Result<Vec<Duration>> {
        let mut events: Vec<_> = workers.runtimes.iter().map(Runtime::subscribe).collect();
        sample_latencies(&workers.runtimes[0], &mut events, self.samples).await
    }

    fn print(&self, report: &Report) {
        let ms = |d: Duration| d.as_secs_f64() * 1_000.0;
        let seconds = report.burn_down.as_secs_f64();
        let steps = self.instances * self.shape.steps();
        let per_step =
            |d: Duration| ms(d) / f64::from(u32::try_from(self.shape.steps()).unwrap_or(u32::MAX));
        let sample_p50 = percentile(&report.samples, 500);
        let sample_p99 = percentile(&report.samples, 990);
        let out = json!({
            "bench": "workflow",
            "backend": if hephaestus_sqlite::SqliteOptions::is_sqlite_url(&self.database_url) { "sqlite" } else { "postgres" },
            "method": "warm-up instances then analyze; burn-down: workers running, start all instances in batches, time until every one is completed; then latency one instance at a time on the idle system",
            "shape": self.shape.name(),
            "instances": self.instances,
            "warm_up_instances": self.warm_up,
            "steps_per_instance": self.shape.steps(),
            "steps": steps,
            "workers": self.workers(),
            "concurrency_per_worker": self.concurrency,
            "max_batch": self.max_batch,
            "flushers": self.flushers,
            "continuations": !self.no_continuations,
            "connections_per_worker": self.connections,
            "seconds": seconds,
            "workflows_per_sec": ratio(self.instances, seconds),
            "steps_per_sec": ratio(steps, seconds),
            "p50_ms": report.p50.map(ms),
            "p99_ms": report.p99.map(ms),
            "commits": report.commits,
            "commits_per_step": ratio_i64(report.commits, steps),
            "wal_bytes_per_step": ratio_i64(report.wal_bytes, steps),
            "cpu_us_per_step": {
                "bench_process": report.cpu_us_per_step.0,
                "postgres": report.cpu_us_per_step.1,
            },
            "checkpoints_during_burn_down": report.checkpoints,
            "latency_samples": report.samples.len(),
            "latency_p50_ms": sample_p50.map(ms),
            "latency_p99_ms": sample_p99.map(ms),
            "step_latency_p50_ms": sample_p50.map(per_step),
            "postgres": report.server,
            "cpus": std::thread::available_parallelism().map(std::num::NonZero::get).ok(),
        });
        let mut out = out;
        if hephaestus_sqlite::SqliteOptions::is_sqlite_url(&self.database_url) {
            // PostgreSQL's counters: not measured on SQLite.
            for key in [
                "commits",
                "commits_per_step",
                "wal_bytes_per_step",
                "postgres",
            ] {
                out[key] = Value::Null;
            }
            out["sqlite"] = json!(report.server);
            out["method"] = json!(
                "warm-up instances; burn-down: one worker (the runner's loop) running, start all instances in batches, time until every one is completed; then latency one instance at a time on the idle system"
            );
        }
        if self.json {
            println!("{out}");
            return;
        }
        let num = |key: &str| out.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN);
        println!(
            "workflow burn-down: {} {} instances ({} steps), {} workers x {} slots (PostgreSQL {})",
            self.instances,
            self.shape.name(),
            steps,
            self.workers(),
            self.concurrency,
            report.server
        );
        println!(
            "  burn-down {seconds:>8.3} s  {:>8.0} workflows/s  {:>8.0} steps/s",
            num("workflows_per_sec"),
            num("steps_per_sec")
        );
        println!(
            "  start->completed p50 {:.1} ms, p99 {:.1} ms",
            num("p50_ms"),
            num("p99_ms")
        );
        println!(
            "  {:.3} commits/step, {:.0} WAL bytes/step",
            num("commits_per_step"),
            num("wal_bytes_per_step")
        );
        if let (Some(own), postgres) = report.cpu_us_per_step {
            println!(
                "  CPU per step: {own:.0} us in this process, {} in PostgreSQL",
                postgres.map_or_else(|| "not measured".to_owned(), |p| format!("{p:.0} us"))
            );
        }
        if !report.samples.is_empty() {
            println!(
                "  one at a time: start->completed p50 {:.2} ms, p99 {:.2} ms; per step p50 {:.2} ms ({} samples)",
                num("latency_p50_ms"),
                num("latency_p99_ms"),
                num("step_latency_p50_ms"),
                report.samples.len()
            );
        }
    }
}

impl WorkflowBench {
    /// The worker "processes": as asked, else 2 on PostgreSQL and 1 on a
    /// SQLite file (which has exactly one worker).
    fn workers(&self) -> usize {
        self.workers.unwrap_or(
            if hephaestus_sqlite::SqliteOptions::is_sqlite_url(&self.database_url) {
                1
            } else {
                2
            },
        )
    }

    /// The benchmark on a new SQLite file (see the module docs).
    async fn run_sqlite(&self) -> Result<()> {
        use hephaestus_engine_core::ports::UnitOfWork as _;
        use hephaestus_sqlite::{SqliteBackend, SqliteOptions};
        ensure!(
            self.workers() == 1,
            "a SQLite file has exactly one worker: --workers 1 (or leave it out)"
        );
        let options = SqliteOptions::from_url(&self.database_url)?
            .with_max_connections(self.connections.max(2));
        ensure!(
            !options.path.exists(),
            "{} exists: the benchmark writes a new file (and deletes it unless --keep)",
            options.path.display()
        );
        let path = options.path.clone();
        let backend = SqliteBackend::open_migrated(options).await?;
        let workflow = self.shape.workflow()?;
        let build = || {
            Runtime::builder(backend.clone())
                .discard_handler(hephaestus_failure_handler::FailureHandler::new())
                .workflow(workflow.clone())
                .config(self.config())
                .build()
                .context("building a runtime")
        };
        let worker = build()?;
        let starter = build()?;
        let lock = backend.lock_worker().await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn({
            let worker = worker.clone();
            async move {
                worker
                    .run(async {
                        stopped.await.ok();
                    })
                    .await
            }
        });
        let burn = async |count: usize, label: &str, quiet: bool| -> Result<Duration> {
            let progress = if quiet {
                ProgressBar::hidden()
            } else {
                ProgressBar::new(u64::try_from(count)?)
            };
            let began = Instant::now();
            for chunk in (0..count).collect::<Vec<_>>().chunks(self.batch) {
                let mut tx = backend.begin().await?;
                for k in chunk {
                    starter
                        .start_in(
                            &mut tx,
                            WORKFLOW,
                            &format!("{label}{k}"),
                            json!({}),
                            StartOptions::default(),
                        )
                        .await?;
                }
                backend.commit(tx).await?;
            }
            loop {
                let open = backend.active_instances().await?;
                progress.set_position(u64::try_from(count)?.saturating_sub(open));
                if open == 0 {
                    break;
                }
                ensure!(
                    began.elapsed() < BURN_DOWN_LIMIT,
                    "the burn-down did not finish within {BURN_DOWN_LIMIT:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            progress.finish_and_clear();
            Ok(began.elapsed())
        };
        let measured = async {
            if self.warm_up > 0 {
                burn(self.warm_up, "w", true).await.context("the warm-up")?;
            }
            let cpu_before = CpuSnapshot::now();
            let burn_down = burn(self.instances, "b", self.json).await?;
            let cpu =
                CpuSnapshot::now().per_unit_since(&cpu_before, self.instances * self.shape.steps());
            let (instances, _) = backend
                .instances(
                    &hephaestus_engine_core::ports::InstanceFilter::default(),
                    None,
                    None,
                )
                .await?;
            let failed = instances
                .iter()
                .filter(|i| i.status != InstanceStatus::Completed)
                .count();
            ensure!(failed == 0, "{failed} instances did not complete");
            let mut burn_times: Vec<Duration> = instances
                .iter()
                .filter(|i| i.business_id.as_str().starts_with("key::b"))
                .filter_map(|i| (i.updated_at - i.created_at).to_std().ok())
                .collect();
            burn_times.sort_unstable();
            let samples = if self.samples == 0 {
                Vec::new()
            } else {
                let mut events = vec![worker.subscribe()];
                sample_latencies(&starter, &mut events, self.samples).await?
            };
            Ok::<_, anyhow::Error>(Report {
                burn_down,
                commits: 0,
                wal_bytes: 0,
                checkpoints: None,
                p50: percentile(&burn_times, 500),
                p99: percentile(&burn_times, 990),
                samples,
                server: format!("SQLite {}", sqlite_version(&backend).await),
                cpu_us_per_step: (cpu.0, None),
            })
        }
        .await;
        stop.send(()).ok();
        running.await.context("the worker panicked")??;
        lock.release().await;
        backend.close().await;
        if !self.keep {
            for suffix in ["", "-wal", "-shm", "-worker.lock"] {
                let mut name = path.as_os_str().to_owned();
                name.push(suffix);
                let _ = std::fs::remove_file(std::path::PathBuf::from(name));
            }
        }
        self.print(&measured?);
        Ok(())
    }
}

/// The SQLite library's version.
async fn sqlite_version(backend: &hephaestus_sqlite::SqliteBackend) -> String {
    backend.sqlite_version().await.unwrap_or_default()
}

/// Waits for the `workflow.stop` event of instance `id` on any worker.
/// Starts instances one at a time from `starter`, each once the one
/// before it stopped (seen on `events`): start to stop of each of
/// `samples`, after five to warm up, sorted.
async fn sample_latencies<B: hephaestus_runner::Backend>(
    starter: &Runtime<B>,
    events: &mut [tokio::sync::broadcast::Receiver<hephaestus_runner::telemetry::TelemetryEvent>],
    samples: usize,
) -> Result<Vec<Duration>> {
    let warm_up = 5;
    let mut taken = Vec::with_capacity(samples);
    for i in 0..samples + warm_up {
        let began = Instant::now();
        let id = starter
            .start(
                WORKFLOW,
                &format!("sample{i}"),
                json!({}),
                StartOptions::default(),
            )
            .await?
            .id
            .to_string();
        wait_for_stop(events, &id).await?;
        if i >= warm_up {
            taken.push(began.elapsed());
        }
    }
    taken.sort_unstable();
    Ok(taken)
}

async fn wait_for_stop(
    events: &mut [tokio::sync::broadcast::Receiver<hephaestus_runner::telemetry::TelemetryEvent>],
    id: &str,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + SAMPLE_LIMIT;
    loop {
        let next = futures_first(events);
        let event = tokio::time::timeout_at(deadline, next)
            .await
            .with_context(|| format!("instance {id} did not complete within {SAMPLE_LIMIT:?}"))??;
        let of_it = event.metadata.get("instance_id").and_then(Value::as_str) == Some(id);
        if of_it && event.name == names::WORKFLOW_STOP {
            return Ok(());
        }
        if of_it && event.name == names::WORKFLOW_EXCEPTION {
            bail!("instance {id} failed");
        }
    }
}

/// The next event of any receiver (lagging receivers skip ahead).
async fn futures_first(
    events: &mut [tokio::sync::broadcast::Receiver<hephaestus_runner::telemetry::TelemetryEvent>],
) -> Result<hephaestus_runner::telemetry::TelemetryEvent> {
    use tokio::sync::broadcast::error::TryRecvError;
    loop {
        for rx in events.iter_mut() {
            match rx.try_recv() {
                Ok(event) => return Ok(event),
                Err(TryRecvError::Empty | TryRecvError::Lagged(_)) => {}
                Err(TryRecvError::Closed) => bail!("a worker stopped"),
            }
        }
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
}

fn runtime(
    pool: &PgPool,
    prefix: &SchemaPrefix,
    workflow: &Workflow,
    config: RunnerConfig,
) -> Result<Runtime<PgBackend>> {
    let backend = PgBackend::new(
        PgStore::new(pool.clone(), prefix.clone()),
        PgQueue::new(pool.clone(), prefix.clone()),
    );
    Runtime::builder(backend)
        .discard_handler(hephaestus_failure_handler::FailureHandler::new())
        .workflow(workflow.clone())
        .config(config)
        .build()
        .context("building a runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_builds_with_its_step_count() {
        for shape in [Shape::Diamond, Shape::Linear, Shape::Wide] {
            let wf = shape.workflow().expect("a valid workflow");
            // The user steps plus the terminal `Done`.
            assert_eq!(wf.steps().len(), shape.steps() + 1, "{shape:?}");
        }
    }
}
