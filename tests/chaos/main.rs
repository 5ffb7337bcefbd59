//! The fault-injection test, a test target of its own: worker processes
//! SIGKILLed and restarted and PostgreSQL restarted under load; nothing is
//! lost, stuck or applied twice.
//!
//! Three `hephaestus worker` processes run the fixture workflows
//! (`crates/cli/src/fixtures.rs`, compiled in here too) while the test
//! SIGKILLs and restarts a random one every few hundred milliseconds,
//! restarts PostgreSQL once in the middle, and resumes waiting instances;
//! then it checks that every instance ended as its script says, that every
//! step result was applied exactly once, and that user code ran at least
//! once and at most `max_attempts` times per activation. The seed is
//! printed; `HEPHAESTUS_FAULTS_SEED=<n>` replays a run's scripts and fault
//! schedule (timing still varies). The restart needs a local Debian cluster
//! (`pg_ctlcluster`) serving `DATABASE_URL` and the permission to restart
//! it; otherwise that part is skipped with a printed reason
//! (`HEPHAESTUS_FAULTS_NO_PG_RESTART=1` skips it on purpose).
//!
//! Being its own test binary is what keeps the restart away from every other
//! test: `cargo test` runs test binaries one after another, so no guard
//! around the server is needed.
//!
//! Soak mode: `cargo xtask soak --soak-seconds 600 [--seed S]` (which builds
//! the release binary and sets `HEPHAESTUS_SOAK_SECONDS=600`,
//! `HEPHAESTUS_BIN` and `HEPHAESTUS_FAULTS_SEED` for `cargo test -p
//! hephaestus-tests --test chaos -- --nocapture`) keeps starting workflows
//! (at the same rate as the normal run) and injecting faults for that long,
//! restarting PostgreSQL once halfway, then runs the same checks.

#[allow(
    dead_code,
    reason = "helpers shared with the integration binary; this one uses a few"
)]
#[path = "../integration/support/mod.rs"]
mod support;

#[allow(
    dead_code,
    reason = "the worker's half of the fixture (its CLI) does not run in the tests"
)]
#[path = "../../crates/cli/src/fixtures.rs"]
mod fixtures;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hephaestus_engine_core::WorkflowId;
use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_engine_core::ports::InstanceFilter;
use hephaestus_migrations_gen::SchemaPrefix;
use hephaestus_queue_pg::PgQueue;
use hephaestus_runner::postgres::PgBackend;
use hephaestus_runner::{RunnerError, Runtime, StartOptions};
use hephaestus_storage_pg::PgStore;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;

use crate::fixtures::Execution;
use crate::support::bin::hephaestus_bin;
use crate::support::db::{database_url, unique_suffix};
use crate::support::plans::{Plan, check_instance, recorded_executions, recorded_results};
use crate::support::rng::Rng;
use crate::support::worker::KillableWorker;

/// Instances of a normal run.
const INSTANCES: usize = 500;
/// Instances started per second (normal run and soak).
const STARTS_PER_SECOND: usize = 50;
/// Worker processes.
const WORKERS: usize = 3;
/// How long every instance may take to finish once the load stopped.
const SETTLE_LIMIT: Duration = Duration::from_secs(180);
/// Faults go on after the last start until workers were killed and
/// restarted this many more times (a kill every 200 to 600 ms: about 2 s).
const KILLS_AFTER_LOAD: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_workers_and_a_server_restart_lose_nothing_and_apply_nothing_twice() {
    let began = Instant::now();
    let soak = std::env::var("HEPHAESTUS_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs);
    let seed = std::env::var("HEPHAESTUS_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            let bytes = Uuid::new_v4().into_bytes();
            u64::from_le_bytes([
                bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
            ])
        });
    let total = soak.map_or(INSTANCES, |d| {
        usize::try_from(d.as_secs())
            .unwrap_or(usize::MAX)
            .saturating_mul(STARTS_PER_SECOND)
    });
    eprintln!(
        "chaos: seed {seed} (replay the scripts and faults with HEPHAESTUS_FAULTS_SEED={seed}), \
         {total} instances, {WORKERS} workers{}",
        soak.map_or(String::new(), |d| format!(", soak for {d:?}"))
    );
    let restart = match pg_restart_plan() {
        Ok(cluster) => Some(cluster),
        Err(reason) => {
            eprintln!("chaos: SKIPPING the PostgreSQL restart: {reason}");
            None
        }
    };
    let bin = tokio::task::spawn_blocking(hephaestus_bin)
        .await
        .expect("locating the binary");

    let env = Env::new().await;
    let mut rng = Rng(seed);
    let plans: Vec<Plan> = (0..total).map(|i| Plan::random(&mut rng, i)).collect();
    let chaos_seed = rng.next();

    let workers = tokio::task::spawn_blocking({
        let (bin, schema) = (bin.clone(), env.prefix.as_str().to_owned());
        move || {
            (0..WORKERS)
                .map(|_| spawn_worker(&bin, &schema).expect("a worker starts"))
                .collect::<Vec<_>>()
        }
    })
    .await
    .expect("starting the workers");

    let stop_chaos = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    let (kills, mut killed) = tokio::sync::watch::channel(0_usize);
    let chaos = std::thread::spawn({
        let chaos = Chaos {
            bin: bin.clone(),
            schema: env.prefix.as_str().to_owned(),
            rng: Rng(chaos_seed),
            stop: Arc::clone(&stop_chaos),
            started: Arc::clone(&started),
            kills,
            restart_at: total / 2,
            restart,
        };
        move || chaos.run(workers)
    });

    let stop_resumer = Arc::new(AtomicBool::new(false));
    let resumer = tokio::spawn(resume_waiting(
        env.runtime.clone(),
        Arc::clone(&stop_resumer),
    ));

    // The load: STARTS_PER_SECOND, in ticks of a tenth of a second.
    let load_began = Instant::now();
    let per_tick = (STARTS_PER_SECOND / 10).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for chunk in plans.chunks(per_tick) {
        tick.tick().await;
        for plan in chunk {
            start(&env.runtime, plan).await;
        }
        started.fetch_add(chunk.len(), Ordering::SeqCst);
    }
    let load = load_began.elapsed();
    eprintln!("chaos: {total} instances started in {load:?}");
    // The last instances run under faults too: the chaos thread reports
    // each kill and restart; stop it a few kills after the load.
    let kills_at_load = *killed.borrow_and_update();
    let enough = kills_at_load + KILLS_AFTER_LOAD;
    match tokio::time::timeout(SETTLE_LIMIT, killed.wait_for(|kills| *kills >= enough)).await {
        // Enough kills; or the chaos thread ended early (it panicked), which
        // joining it below reports.
        Ok(_) => {}
        Err(tokio::time::error::Elapsed { .. }) => panic!(
            "the chaos thread did not kill {KILLS_AFTER_LOAD} workers within {SETTLE_LIMIT:?} of the load's end"
        ),
    }
    stop_chaos.store(true, Ordering::SeqCst);
    let (workers, report) = tokio::task::spawn_blocking(move || chaos.join())
        .await
        .expect("joining the chaos thread")
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    eprintln!(
        "chaos: {} workers killed and restarted; PostgreSQL restart: {}",
        report.kills,
        report.restart.as_deref().unwrap_or("not done")
    );

    // Every instance finishes, in bounded time. The workers are other
    // processes: the database is all that tells.
    let settle_began = Instant::now();
    let last_report = std::cell::Cell::new(Instant::now());
    let settled = support::wait::holds_within(SETTLE_LIMIT, || async {
        let counts = env.status_counts().await;
        if last_report.get().elapsed() > Duration::from_secs(5) {
            eprintln!("chaos: settling, {counts:?}");
            last_report.set(Instant::now());
        }
        active(&counts) == 0
    })
    .await;
    if !settled {
        let counts = env.status_counts().await;
        let stuck = env.describe_active(20).await;
        panic!(
            "{} instances still active {SETTLE_LIMIT:?} after the load (seed {seed}): {counts:?}\n{}",
            active(&counts),
            stuck.join("\n")
        );
    }
    let settle = settle_began.elapsed();
    stop_resumer.store(true, Ordering::SeqCst);
    let sent = resumer.await.expect("the resumer task");
    eprintln!(
        "chaos: every instance finished {settle:?} after the load; {} resumes sent, {} transient resume errors",
        sent.sent, sent.transient
    );

    let stopped = tokio::task::spawn_blocking(move || {
        workers
            .into_iter()
            .map(|worker| worker.stop(Duration::from_secs(20)))
            .collect::<Vec<_>>()
    })
    .await
    .expect("stopping the workers");
    for status in &stopped {
        assert!(
            status.as_ref().is_ok_and(std::process::ExitStatus::success),
            "a worker did not stop gracefully when its stdin closed: {stopped:?}"
        );
    }

    let problems = env.check(&plans).await;
    assert!(
        problems.is_empty(),
        "seed {seed}: {} problems, first ones:\n{}",
        problems.len(),
        problems
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let live = env.live_jobs().await;
    eprintln!(
        "chaos: checks passed; unfinished jobs left (kind, state, count): {live:?}; total {:?}",
        began.elapsed()
    );
    env.teardown().await;
}

/// How many instances `counts` (instances by status) has not ended.
fn active(counts: &BTreeMap<String, i64>) -> i64 {
    ["pending", "running", "waiting"]
        .iter()
        .filter_map(|s| counts.get(*s))
        .sum()
}

/// Starts `plan`'s instance, retrying through a server restart once the
/// server answers again; a start whose commit was lost in the restart is
/// found by its id.
async fn start(rt: &Runtime<PgBackend>, plan: &Plan) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let pool = rt.backend().store().pool();
    loop {
        let options = StartOptions::default().with_id(plan.id);
        let outcome = rt
            .start(
                plan.workflow,
                &plan.business_value,
                plan.script.to_input(),
                options,
            )
            .await;
        let Err(error) = outcome else { return };
        if let Ok(Some(_)) = rt.get(plan.id).await {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "cannot start instance {}: {error}",
            plan.id
        );
        let what = format!("the server to answer again (starting {}: {error})", plan.id);
        support::wait::until_within(left, what, || async {
            sqlx::query("select 1").execute(pool).await.is_ok()
        })
        .await;
    }
}

#[derive(Debug, Default)]
struct Resumes {
    sent: usize,
    transient: usize,
}

/// Resumes every waiting instance of the `fixture_wait` workflow until told
/// to stop.
async fn resume_waiting(rt: Runtime<PgBackend>, stop: Arc<AtomicBool>) -> Resumes {
    let mut resumes = Resumes::default();
    let filter = InstanceFilter::default()
        .with_workflow_id(WorkflowId::new(fixtures::WAIT).expect("a valid workflow id"))
        .with_statuses([InstanceStatus::Waiting])
        .with_limit(500);
    while !stop.load(Ordering::SeqCst) {
        match rt.list(&filter).await {
            Ok(waiting) => {
                for instance in waiting {
                    match rt
                        .resume(
                            instance.id,
                            fixtures::WAITING_STEP,
                            fixtures::RESUME_EVENT,
                            json!({"resumed_by": "faults::chaos"}),
                        )
                        .await
                    {
                        Ok(()) => resumes.sent += 1,
                        // Raced with another resume or the instance's end.
                        Err(
                            RunnerError::NotWaiting { .. }
                            | RunnerError::AlreadyResumed(_)
                            | RunnerError::Finished(_),
                        ) => {}
                        Err(_) => resumes.transient += 1,
                    }
                }
            }
            Err(_) => resumes.transient += 1,
        }
        // not a wait: the resumer stands in for an outside system, which
        // looks for waiting instances at its own pace
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    resumes
}

/// A `hephaestus worker` on `schema`, tuned to notice dead workers fast.
fn spawn_worker(bin: &Path, schema: &str) -> Result<KillableWorker, String> {
    let args = [
        "worker",
        "--schema",
        schema,
        "--concurrency",
        "6",
        "--heartbeat-ms",
        "100",
        "--stale-after-ms",
        "1000",
        "--rescue-interval-ms",
        "200",
        "--poll-ms",
        "100",
        "--reconcile-ms",
        "1000",
        "--grace-ms",
        "2000",
        "--exit-on-stdin-close",
    ];
    KillableWorker::spawn(bin, &args, &[("DATABASE_URL", database_url())])
}

/// The fault injector: runs on a thread of its own.
struct Chaos {
    bin: PathBuf,
    schema: String,
    rng: Rng,
    stop: Arc<AtomicBool>,
    started: Arc<AtomicUsize>,
    /// Workers killed and restarted so far, for the test to wait on.
    kills: tokio::sync::watch::Sender<usize>,
    restart_at: usize,
    restart: Option<Cluster>,
}

#[derive(Debug, Default)]
struct ChaosReport {
    kills: usize,
    restart: Option<String>,
}

impl Chaos {
    fn run(mut self, mut workers: Vec<KillableWorker>) -> (Vec<KillableWorker>, ChaosReport) {
        let mut report = ChaosReport::default();
        while !self.stop.load(Ordering::SeqCst) {
            // not a wait: the fault schedule, a kill every 200 to 600 ms
            std::thread::sleep(Duration::from_millis(200 + self.rng.below(400)));
            let victim = self.rng.pick(workers.len());
            workers[victim].kill();
            report.kills += 1;
            workers[victim] = self.respawn();
            self.kills.send_replace(report.kills);
            if self.started.load(Ordering::SeqCst) >= self.restart_at
                && let Some(cluster) = self.restart.take()
            {
                let began = Instant::now();
                let outcome = cluster.restart();
                let line = match outcome {
                    Ok(()) => format!("restarted {} in {:?}", cluster.name(), began.elapsed()),
                    Err(reason) => format!("SKIPPED, the restart failed: {reason}"),
                };
                eprintln!("chaos: PostgreSQL {line}");
                report.restart = Some(line);
            }
        }
        (workers, report)
    }

    /// A new worker; retried while the server restarts.
    fn respawn(&self) -> KillableWorker {
        let mut last = String::new();
        for _ in 0..60 {
            match spawn_worker(&self.bin, &self.schema) {
                Ok(worker) => return worker,
                Err(e) => last = e,
            }
            // not a wait: the pace of retrying a worker that could not start
            // (the server restarting); each try waits for its ready line
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("a worker could not be restarted: {last}");
    }
}

/// A local Debian cluster serving `DATABASE_URL`.
#[derive(Debug, Clone)]
struct Cluster {
    version: String,
    name: String,
}

impl Cluster {
    fn name(&self) -> String {
        format!("{}/{}", self.version, self.name)
    }

    fn restart(&self) -> Result<(), String> {
        let output = Command::new("pg_ctlcluster")
            .args([
                "--skip-systemctl-redirect",
                "-m",
                "fast",
                &self.version,
                &self.name,
                "restart",
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run pg_ctlcluster: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctlcluster {} restart: {}: {}",
                self.name(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }
}

/// The cluster to restart, or why the restart part is skipped.
fn pg_restart_plan() -> Result<Cluster, String> {
    if std::env::var_os("HEPHAESTUS_FAULTS_NO_PG_RESTART").is_some_and(|v| !v.is_empty()) {
        return Err("HEPHAESTUS_FAULTS_NO_PG_RESTART is set".to_owned());
    }
    let options = PgConnectOptions::from_str(database_url())
        .map_err(|e| format!("DATABASE_URL does not parse: {e}"))?;
    let host = options.get_host();
    if !(host.starts_with('/') || matches!(host, "127.0.0.1" | "localhost" | "::1" | "[::1]")) {
        return Err(format!("the server at {host} is not local"));
    }
    let port = options.get_port().to_string();
    let output = Command::new("pg_lsclusters")
        .arg("--no-header")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!("pg_lsclusters is not available ({e}): not a Debian-packaged server")
        })?;
    if !output.status.success() {
        return Err(format!("pg_lsclusters failed: {}", output.status));
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.len() >= 4 && fields[2] == port && fields[3].starts_with("online"))
        .map(|fields| Cluster {
            version: fields[0].to_owned(),
            name: fields[1].to_owned(),
        })
        .ok_or_else(|| format!("no online local cluster listens on port {port}"))
}

/// The test's schema, pool and in-process runtime (for starts, resumes and
/// reads; it runs no jobs).
struct Env {
    pool: PgPool,
    prefix: SchemaPrefix,
    runtime: Runtime<PgBackend>,
}

impl Env {
    /// A fresh schema, migrated, with the fixture's table (its own pools, so
    /// a server restart does not break a pool a helper holds).
    async fn new() -> Self {
        let options = PgConnectOptions::from_str(database_url())
            .expect("DATABASE_URL is a valid PostgreSQL URL")
            .options([("search_path", "hephaestus_no_such_schema")]);
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .expect("connect to the test PostgreSQL");
        let prefix = SchemaPrefix::new(&format!("t_{}", unique_suffix())).expect("a valid prefix");
        hephaestus_storage_pg::migrate(&pool, &prefix)
            .await
            .expect("migrate storage");
        hephaestus_queue_pg::migrate(&pool, &prefix)
            .await
            .expect("migrate the queue");
        let recorder = fixtures::Recorder::new(pool.clone(), &prefix)
            .await
            .expect("create the fixture table");
        let backend = PgBackend::new(
            PgStore::new(pool.clone(), prefix.clone()),
            PgQueue::new(pool.clone(), prefix.clone()),
        );
        let mut builder = Runtime::builder(backend)
            .discard_handler(hephaestus_failure_handler::FailureHandler::new());
        for workflow in fixtures::workflows(&recorder).expect("valid fixture workflows") {
            builder = builder.workflow(workflow);
        }
        let runtime = builder.build().expect("a runtime");
        Self {
            pool,
            prefix,
            runtime,
        }
    }

    fn table(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix.quoted())
    }

    /// Instances per status; a failed read (a restart) counts as "unknown".
    async fn status_counts(&self) -> BTreeMap<String, i64> {
        let sql = format!(
            "select status, count(*) from {} group by status",
            self.table("hephaestus_instances")
        );
        match sqlx::query_as::<_, (String, i64)>(&sql)
            .fetch_all(&self.pool)
            .await
        {
            Ok(rows) => rows.into_iter().collect(),
            Err(_) => BTreeMap::from([("unknown".to_owned(), 1)]),
        }
    }

    async fn describe_active(&self, limit: i64) -> Vec<String> {
        let sql = format!(
            "select id from {} where status in ('pending', 'running', 'waiting') order by id limit $1",
            self.table("hephaestus_instances")
        );
        let ids: Vec<(Uuid,)> = sqlx::query_as(&sql)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .unwrap_or_default();
        let mut out = Vec::new();
        for (id,) in ids {
            let instance = self.runtime.get(id).await.ok().flatten();
            let jobs = self.runtime.jobs_of(id).await.unwrap_or_default();
            out.push(format!(
                "{id} {:?} steps {:?} live jobs {:?}",
                instance.as_ref().map(|i| (&i.workflow_id, i.status)),
                instance.as_ref().map(|i| &i.steps),
                jobs.iter()
                    .map(|j| (&j.kind, j.state, j.attempt, j.scheduled_at, &j.errors))
                    .collect::<Vec<_>>()
            ));
        }
        out
    }

    /// Unfinished jobs by kind and state (reported, not asserted: a job of
    /// a finished instance may wait out a retry backoff and then find
    /// nothing to do).
    async fn live_jobs(&self) -> Vec<(String, String, i64)> {
        let sql = format!(
            "select kind, state, count(*) from {}
             where state in ('available', 'scheduled', 'executing', 'retryable')
             group by 1, 2 order by 1, 2",
            self.table("hephaestus_jobs")
        );
        sqlx::query_as(&sql)
            .fetch_all(&self.pool)
            .await
            .unwrap_or_default()
    }

    /// Every check of the end state; returns the problems found.
    async fn check(&self, plans: &[Plan]) -> Vec<String> {
        let mut problems = Vec::new();
        let executions = self.executions().await;
        let results = self.results().await;
        for plan in plans {
            let Some(instance) = self.runtime.get(plan.id).await.expect("read an instance") else {
                problems.push(format!("{}: missing", plan.id));
                continue;
            };
            let execs = executions.get(&plan.id).cloned().unwrap_or_default();
            let res = results.get(&plan.id).cloned().unwrap_or_default();
            check_instance(plan, &instance, &execs, &res, &mut problems);
        }
        problems
    }

    /// `fixture_executions` by instance.
    async fn executions(&self) -> HashMap<Uuid, Vec<Execution>> {
        recorded_executions(&self.pool, &self.prefix).await
    }

    /// `hephaestus_step_results` by instance: (step, activation, kind) →
    /// (rows, processed rows).
    async fn results(&self) -> HashMap<Uuid, BTreeMap<(String, i64, String), (i64, i64)>> {
        recorded_results(&self.pool, &self.prefix).await
    }

    /// Drops the schema; retried, as connections of killed workers may
    /// still hold locks for a moment.
    async fn teardown(self) {
        let sql = format!("drop schema {} cascade", self.prefix.quoted());
        let mut attempts = 0;
        while let Err(e) = sqlx::raw_sql(&sql).execute(&self.pool).await {
            attempts += 1;
            eprintln!("chaos: dropping the schema failed ({e}), retrying");
            assert!(attempts < 10, "cannot drop the test schema: {e}");
            // not a wait: the pace of retrying the drop (bounded to 10 tries)
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        self.pool.close().await;
    }
}
