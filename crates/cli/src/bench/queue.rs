//! `hephaestus bench queue`: a burn-down benchmark of the job queue.
//!
//! 1. Creates and migrates its own schema (`hephaestus_bench_<hex>`,
//!    dropped at the end unless `--keep`).
//! 2. Inserts `--jobs` no-op jobs in batches of `--batch` over `--inserters`
//!    connections (timed), then runs `ANALYZE` on the jobs table (not timed).
//! 3. Starts `--workers` runtimes, each with its own pool (like separate
//!    processes) and `--concurrency` slots, and times the drain until every
//!    job's completion is committed (completed jobs are kept, or deleted with
//!    `--delete-completed`). `pg_stat_database.xact_commit` is read
//!    before and after (with every other connection of the benchmark closed,
//!    so their statistics are flushed) to give commits per job.
//! 4. Reads the scheduled-to-completed latency percentiles from the table.
//! 5. Vacuums the table (not timed), then times `--pickups` single jobs on
//!    the idle queue, from just before the insert to the start of the worker
//!    (LISTEN/NOTIFY wake-up).
//!
//! Prints one JSON object with `--json`, a short table otherwise.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::common::{BenchSchema, Components, percentile, pool, ratio, ratio_i64, server_counters};
use anyhow::{Context, Result, ensure};
use hephaestus_engine_core::ports::NewJob;
use hephaestus_migrations_gen::SchemaPrefix;
use hephaestus_queue_pg::{
    DynWorker, JobContext, JobError, JobEventKind, PgQueue, QueueRuntime, RuntimeConfig, Workers,
};
use serde_json::{Map, Value, json};
use sqlx::postgres::PgConnectOptions;
use tokio::sync::mpsc;

const QUEUE: &str = "bench";
const NOOP: &str = "noop";
const PICKUP: &str = "pickup";
/// Longest the drain may take before the benchmark gives up.
const DRAIN_LIMIT: Duration = Duration::from_secs(600);

/// Options of `hephaestus bench queue`.
#[derive(Debug, Clone, clap::Args)]
pub struct QueueBench {
    /// Jobs to insert and drain.
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// Worker runtimes, each with its own connection pool.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Jobs in flight per worker runtime.
    #[arg(long, default_value_t = 1_000)]
    concurrency: usize,
    /// Jobs per insert statement.
    #[arg(long, default_value_t = 5_000)]
    batch: usize,
    /// Connections inserting at once.
    #[arg(long, default_value_t = 2)]
    inserters: usize,
    /// Delete jobs as they complete (like graphile-worker) instead of keeping
    /// them (the default, like Oban and River); the latency percentiles are
    /// then not available.
    #[arg(long)]
    delete_completed: bool,
    /// Single-job pickups timed on the idle queue (0 to skip).
    #[arg(long, default_value_t = 200)]
    pickups: usize,
    /// The PostgreSQL server.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// The schema to create and use (default: a fresh `hephaestus_bench_<hex>`).
    #[arg(long)]
    schema: Option<String>,
    /// Keep the schema and its jobs afterwards.
    #[arg(long)]
    keep: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// What was measured.
#[derive(Debug, Clone)]
struct Report {
    insert: Duration,
    drain: Duration,
    commits: i64,
    /// WAL written during the drain (the whole server's).
    wal_bytes: i64,
    /// Checkpoints during the drain (`None` when unreadable).
    checkpoints: Option<i64>,
    /// `None` when completed jobs were deleted.
    latency_p50: Option<Duration>,
    latency_p99: Option<Duration>,
    /// Insert to start, and the insert alone.
    pickups: Vec<(Duration, Duration)>,
    server: String,
}

impl QueueBench {
    pub async fn run(self) -> Result<()> {
        ensure!(self.jobs > 0, "--jobs must be at least 1");
        ensure!(self.workers > 0, "--workers must be at least 1");
        ensure!(self.concurrency > 0, "--concurrency must be at least 1");
        ensure!(self.batch > 0, "--batch must be at least 1");
        ensure!(self.inserters > 0, "--inserters must be at least 1");
        let schema = BenchSchema::open(
            &self.database_url,
            self.schema.as_deref(),
            Components::Queue,
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
        // 1. Insert, timed.
        let insert = self.insert_all(options, prefix).await?;
        let admin = pool(options, 1).await?;
        hephaestus_queue_pg::PgQueue::new(admin.clone(), prefix.clone())
            .analyze()
            .await?;
        let server = hephaestus_queue_pg::server_version(&admin).await?;
        admin.close().await;

        // 2. Drain, timed, between two readings of the commit counter.
        let before = server_counters(options).await?;
        let drain = self.drain_all(options, prefix).await?;
        let after = server_counters(options).await?;

        // 3. Latency of every job, from the table.
        let admin = pool(options, 1).await?;
        let quantiles = hephaestus_queue_pg::PgQueue::new(admin.clone(), prefix.clone())
            .latency_seconds(NOOP, &[0.5, 0.99])
            .await?;
        let (p50, p99) = match quantiles.as_deref() {
            Some(&[p50, p99]) => (Some(p50), Some(p99)),
            _ => (None, None),
        };
        admin.close().await;

        // 4. Pickup latency on the idle queue, vacuumed first as autovacuum
        //    would have done after the burst (its dead index entries
        //    otherwise slow every fetch down until then).
        let admin = pool(options, 1).await?;
        hephaestus_queue_pg::PgQueue::new(admin.clone(), prefix.clone())
            .vacuum_analyze()
            .await?;
        admin.close().await;
        let pickups = self.pickups(options, prefix).await?;
        Ok(Report {
            insert,
            drain,
            commits: after.commits - before.commits,
            wal_bytes: after.wal_bytes - before.wal_bytes,
            checkpoints: after
                .checkpoints
                .zip(before.checkpoints)
                .map(|(a, b)| a - b),
            latency_p50: p50.map(|s| Duration::from_secs_f64(s.max(0.0))),
            latency_p99: p99.map(|s| Duration::from_secs_f64(s.max(0.0))),
            pickups,
            server,
        })
    }

    async fn insert_all(
        &self,
        options: &PgConnectOptions,
        prefix: &SchemaPrefix,
    ) -> Result<Duration> {
        let inserters = u32::try_from(self.inserters).context("--inserters")?;
        let pool = pool(options, inserters).await?;
        let queue = PgQueue::new(pool.clone(), prefix.clone());
        let job = NewJob::new(NOOP, QUEUE, Value::Object(Map::new()));
        let batches: Arc<Vec<Vec<NewJob>>> = Arc::new(
            (0..self.jobs)
                .step_by(self.batch)
                .map(|start| vec![job.clone(); self.batch.min(self.jobs - start)])
                .collect(),
        );
        // Open every connection before the clock starts.
        let mut warm = Vec::new();
        for _ in 0..self.inserters {
            warm.push(pool.acquire().await?);
        }
        drop(warm);
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..self.inserters {
            let (queue, batches, next) = (queue.clone(), Arc::clone(&batches), Arc::clone(&next));
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(batch) = batches.get(i) else {
                        return Ok::<(), hephaestus_queue_pg::Error>(());
                    };
                    queue.insert_many(batch).await?;
                }
            }));
        }
        for task in tasks {
            task.await.context("an insert task panicked")??;
        }
        let elapsed = started.elapsed();
        pool.close().await;
        Ok(elapsed)
    }

    async fn drain_all(
        &self,
        options: &PgConnectOptions,
        prefix: &SchemaPrefix,
    ) -> Result<Duration> {
        let workers = Workers::new().register_dyn(Arc::new(Noop));
        let mut pools = Vec::new();
        let mut runtimes = Vec::new();
        let started = Instant::now();
        for i in 0..self.workers {
            let pool = pool(options, 8).await?;
            let queue = PgQueue::new(pool.clone(), prefix.clone());
            let runtime = QueueRuntime::builder(queue, workers.clone())
                .queue(QUEUE, self.concurrency)
                .config(bench_config(i == 0).with_delete_completed(self.delete_completed))
                .start()
                .await?;
            pools.push(pool);
            runtimes.push(runtime);
        }
        let target = u64::try_from(self.jobs)?;
        let drained = loop {
            let done: u64 = runtimes.iter().map(|r| r.counts().completed).sum();
            if done >= target {
                break started.elapsed();
            }
            let failed: u64 = runtimes
                .iter()
                .map(|r| {
                    let c = r.counts();
                    c.retried + c.discarded + c.fenced
                })
                .sum();
            ensure!(failed == 0, "{failed} no-op attempts did not complete");
            ensure!(
                started.elapsed() < DRAIN_LIMIT,
                "the drain did not finish within {DRAIN_LIMIT:?} ({done} of {target} jobs)"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        for runtime in &runtimes {
            runtime.shutdown(Duration::from_secs(10)).await;
        }
        drop(runtimes);
        for pool in pools {
            pool.close().await;
        }
        Ok(drained)
    }

    /// Per pickup: insert to start, and the insert alone.
    async fn pickups(
        &self,
        options: &PgConnectOptions,
        prefix: &SchemaPrefix,
    ) -> Result<Vec<(Duration, Duration)>> {
        if self.pickups == 0 {
            return Ok(Vec::new());
        }
        let (tx, mut started) = mpsc::unbounded_channel();
        let workers = Workers::new().register_dyn(Arc::new(Pickup(tx)));
        let pool = pool(options, 8).await?;
        let queue = PgQueue::new(pool.clone(), prefix.clone());
        let runtime = QueueRuntime::builder(queue.clone(), workers)
            .queue(QUEUE, 10)
            .config(bench_config(true))
            .start()
            .await?;
        let mut events = runtime.subscribe();
        let job = NewJob::new(PICKUP, QUEUE, Value::Object(Map::new()));
        // Warm the pool's connections and statement caches.
        let mut samples = Vec::with_capacity(self.pickups);
        for i in 0..self.pickups + 10 {
            let before = Instant::now();
            let id = queue.insert(&job).await?.id();
            let inserted = before.elapsed();
            let at = tokio::time::timeout(Duration::from_secs(10), started.recv())
                .await
                .context("a job was not picked up within 10 s")?
                .context("the pickup worker stopped")?;
            if i >= 10 {
                samples.push((at.saturating_duration_since(before), inserted));
            }
            // Let its completion commit before the next sample.
            loop {
                let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
                    .await
                    .context("a pickup job did not complete within 10 s")??;
                if event.job == id && event.kind == JobEventKind::Completed {
                    break;
                }
            }
        }
        runtime.shutdown(Duration::from_secs(5)).await;
        pool.close().await;
        Ok(samples)
    }

    fn print(&self, report: &Report) {
        let secs = |d: Duration| d.as_secs_f64();
        let ms = |d: Duration| d.as_secs_f64() * 1_000.0;
        let per_sec = |d: Duration| ratio(self.jobs, secs(d));
        let mut pickups: Vec<Duration> = report.pickups.iter().map(|p| p.0).collect();
        pickups.sort_unstable();
        let mut inserts: Vec<Duration> = report.pickups.iter().map(|p| p.1).collect();
        inserts.sort_unstable();
        let pickup_p50 = percentile(&pickups, 500).map(ms);
        let pickup_p99 = percentile(&pickups, 990).map(ms);
        let insert_p50 = percentile(&inserts, 500).map(ms);
        let commits_per_job = ratio_i64(report.commits, self.jobs);
        if self.json {
            let out = json!({
                "bench": "queue",
                "method": "burn-down: insert all jobs, then start the workers and time the drain",
                "jobs": self.jobs,
                "workers": self.workers,
                "concurrency_per_worker": self.concurrency,
                "insert_batch": self.batch,
                "inserters": self.inserters,
                "insert_seconds": secs(report.insert),
                "insert_jobs_per_sec": per_sec(report.insert),
                "drain_seconds": secs(report.drain),
                "jobs_per_sec": per_sec(report.drain),
                "commits": report.commits,
                "commits_per_job": commits_per_job,
                "wal_bytes_per_job": ratio_i64(report.wal_bytes, self.jobs),
                "checkpoints_during_drain": report.checkpoints,
                "completed_jobs": if self.delete_completed { "deleted" } else { "kept" },
                "p50_ms": report.latency_p50.map(ms),
                "p99_ms": report.latency_p99.map(ms),
                "pickup_samples": pickups.len(),
                "pickup_p50_ms": pickup_p50,
                "pickup_p99_ms": pickup_p99,
                "pickup_insert_p50_ms": insert_p50,
                "postgres": report.server,
                "cpus": std::thread::available_parallelism().map(std::num::NonZero::get).ok(),
            });
            println!("{out}");
        } else {
            println!(
                "queue burn-down: {} jobs, {} workers x {} slots (PostgreSQL {})",
                self.jobs, self.workers, self.concurrency, report.server
            );
            println!(
                "  insert  {:>9.3} s  {:>10.0} jobs/s  (batches of {}, {} connections)",
                secs(report.insert),
                per_sec(report.insert),
                self.batch,
                self.inserters
            );
            println!(
                "  drain   {:>9.3} s  {:>10.0} jobs/s  {:.4} commits/job",
                secs(report.drain),
                per_sec(report.drain),
                commits_per_job
            );
            if let (Some(p50), Some(p99)) = (report.latency_p50, report.latency_p99) {
                println!(
                    "  latency scheduled->completed p50 {:.1} ms, p99 {:.1} ms",
                    ms(p50),
                    ms(p99)
                );
            }
            if let (Some(p50), Some(p99), Some(insert)) = (pickup_p50, pickup_p99, insert_p50) {
                println!(
                    "  pickup  insert->start on an idle queue p50 {p50:.3} ms, p99 {p99:.3} ms ({} samples; the insert alone p50 {insert:.3} ms)",
                    pickups.len()
                );
            }
        }
    }
}

fn bench_config(maintenance: bool) -> RuntimeConfig {
    RuntimeConfig::default()
        .with_maintenance(maintenance)
        .with_retention(None)
        .with_depth_interval(None)
        .with_completion_batch(2_000)
        .with_events_capacity(64)
}

/// The no-op job.
struct Noop;

#[async_trait::async_trait]
impl DynWorker for Noop {
    fn kind(&self) -> &str {
        NOOP
    }

    async fn perform(&self, _job: &JobContext) -> Result<(), JobError> {
        Ok(())
    }
}

/// Reports when it starts.
struct Pickup(mpsc::UnboundedSender<Instant>);

#[async_trait::async_trait]
impl DynWorker for Pickup {
    fn kind(&self) -> &str {
        PICKUP
    }

    async fn perform(&self, _job: &JobContext) -> Result<(), JobError> {
        let _ = self.0.send(Instant::now());
        Ok(())
    }
}
