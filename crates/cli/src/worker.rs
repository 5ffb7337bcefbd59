//! `hephaestus worker`: a worker process for the registered workflows (the
//! stock binary's are the fixture workflows, [`crate::fixtures`]) on
//! PostgreSQL, run the production way: the runner's jobs on queue-pg's
//! `QueueRuntime` with the failure handler's discard hook, and a leader-only
//! reconciler.
//!
//! It migrates storage and queue into `--schema` (a no-op when they are up to
//! date), registers the workflows (for the fixtures: creates their execution
//! table), starts, and prints one line starting with `hephaestus worker
//! ready` on stdout. With
//! `--exit-on-stdin-close` it shuts down gracefully (stop fetching, let
//! running jobs finish within `--grace-ms`, stop the services) when its
//! standard input reaches end of file: how a supervising process (the
//! fault-injection tests) stops it. Any other end (SIGTERM, Ctrl-C, SIGKILL)
//! is a crash, which the design tolerates: its running jobs are rescued once
//! their heartbeats are `--stale-after-ms` old.

use std::io::Read as _;
use std::str::FromStr as _;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args;
use hephaestus_failure_handler::Reconciler;
use hephaestus_migrations_gen::SchemaPrefix;
use hephaestus_runner::RunnerConfig;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::sync::watch;

use crate::App;

/// Worker options.
#[derive(Debug, Args)]
pub struct WorkerCommand {
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// The schema (prefix) of the tables; migrated on start.
    #[arg(long, default_value = "hephaestus")]
    schema: String,
    /// Jobs run at once.
    #[arg(long, default_value_t = 10)]
    concurrency: usize,
    /// How often running jobs' heartbeats are refreshed, in ms.
    #[arg(long, default_value_t = 5_000)]
    heartbeat_ms: u64,
    /// A running job whose heartbeat is older than this is rescued, in ms.
    #[arg(long, default_value_t = 30_000)]
    stale_after_ms: u64,
    /// How often the leader looks for stale jobs, in ms.
    #[arg(long, default_value_t = 15_000)]
    rescue_interval_ms: u64,
    /// How often an idle worker polls for due jobs, in ms.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
    /// How often the leader's reconciler looks for stuck instances, in ms.
    #[arg(long, default_value_t = 10_000)]
    reconcile_ms: u64,
    /// How long a graceful shutdown waits for running jobs, in ms.
    #[arg(long, default_value_t = 5_000)]
    grace_ms: u64,
    /// Shut down gracefully when standard input is closed.
    #[arg(long)]
    exit_on_stdin_close: bool,
    #[command(flatten)]
    observe: crate::observe::ObserveArgs,
}

impl WorkerCommand {
    pub async fn run(self, app: &App) -> Result<()> {
        let _telemetry = crate::observe::init_logs(self.observe.log_format)?;
        let metrics = self
            .observe
            .metrics_addr
            .map(|addr| crate::observe::install_recorder().map(|handle| (addr, handle)))
            .transpose()?;
        let prefix = SchemaPrefix::new(&self.schema)
            .with_context(|| format!("invalid --schema {:?}", self.schema))?;
        let pool = PgPoolOptions::new()
            // Every job slot may hold a connection, plus the recorder, the
            // reconciler and the queue's services.
            .max_connections(
                u32::try_from(self.concurrency)
                    .unwrap_or(u32::MAX)
                    .saturating_add(8),
            )
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(hephaestus_runner::postgres::tuned(
                PgConnectOptions::from_str(&self.database_url).context("invalid --database-url")?,
            ))
            .await
            .context("connecting to PostgreSQL")?;
        hephaestus_storage_pg::migrate(&pool, &prefix)
            .await
            .context("migrating the storage tables")?;
        hephaestus_queue_pg::migrate(&pool, &prefix)
            .await
            .context("migrating the queue tables")?;
        let config = RunnerConfig {
            concurrency: self.concurrency.max(1),
            poll_interval: Duration::from_millis(self.poll_ms),
            heartbeat_interval: Duration::from_millis(self.heartbeat_ms),
            stale_after: Duration::from_millis(self.stale_after_ms),
            rescue_interval: Duration::from_millis(self.rescue_interval_ms),
            ..RunnerConfig::default()
        };
        let runtime = app.runtime(&pool, &prefix, config, true).await?;
        let queue = runtime
            .queue_runtime(hephaestus_failure_handler::workers(&runtime))
            .depth_interval(Some(Duration::from_millis(self.observe.depth_ms.max(1))))
            .start()
            .await
            .context("starting the queue runtime")?;

        let readiness = crate::observe::Readiness::new(pool.clone(), prefix.clone());
        readiness.set_running(true);
        let _server = match metrics {
            Some((addr, handle)) => {
                let server = crate::observe::serve(addr, handle, readiness.clone()).await?;
                println!(
                    "hephaestus worker metrics: http://{}/metrics",
                    server.addr()
                );
                Some(server)
            }
            None => None,
        };

        let (stop, stopped) = watch::channel(false);
        let leader = queue.clone();
        let reconciler = Reconciler::new(runtime.clone()).leader_only(move || leader.is_leader());
        let reconcile_every = Duration::from_millis(self.reconcile_ms);
        let reconciling = tokio::spawn({
            let mut stopped = stopped.clone();
            async move {
                reconciler
                    .run_every(reconcile_every, async move {
                        // An error means the sender is gone: stop too.
                        let _ = stopped.wait_for(|stop| *stop).await;
                    })
                    .await;
            }
        });

        println!(
            "hephaestus worker ready: pid {}, schema {}, worker {}, concurrency {}",
            std::process::id(),
            prefix.as_str(),
            queue.worker_id(),
            self.concurrency.max(1),
        );

        shutdown_requested(self.exit_on_stdin_close).await;
        tracing::info!("hephaestus worker: shutting down");
        readiness.set_running(false);
        let _ = stop.send(true);
        let report = queue.shutdown(Duration::from_millis(self.grace_ms)).await;
        // The reconciler stops at its next await point; a panic in it was
        // already reported by the task.
        let _ = reconciling.await;
        pool.close().await;
        println!(
            "hephaestus worker stopped: finished in grace {}, stop requested {}, aborted {}",
            report.finished_in_grace,
            report.stop_requested.len(),
            report.aborted.len()
        );
        Ok(())
    }
}

/// Resolves when a graceful shutdown is asked for: SIGTERM or Ctrl-C, or
/// standard input closed (with `on_stdin_close`).
async fn shutdown_requested(on_stdin_close: bool) {
    tokio::select! {
        () = signalled() => {}
        () = stdin_closed(on_stdin_close) => {}
    }
}

/// SIGTERM (what process managers send) or Ctrl-C.
async fn signalled() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                eprintln!("hephaestus worker: cannot listen for SIGTERM ({e}); Ctrl-C still works");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Standard input closed (only with `on_stdin_close`; else never).
async fn stdin_closed(on_stdin_close: bool) {
    if !on_stdin_close {
        return std::future::pending().await;
    }
    let (closed, on_closed) = tokio::sync::oneshot::channel::<()>();
    // Blocking reads on a thread of their own: the runtime's threads stay free.
    let spawned = std::thread::Builder::new()
        .name("stdin-watch".to_owned())
        .spawn(move || {
            let mut buf = [0_u8; 256];
            let mut stdin = std::io::stdin().lock();
            while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
            let _ = closed.send(());
        });
    match spawned {
        // Either end of the channel means stdin closed (or its reader died).
        Ok(_) => {
            let _ = on_closed.await;
        }
        Err(e) => {
            eprintln!("hephaestus worker: cannot watch stdin ({e}); stop it with a signal");
            std::future::pending::<()>().await;
        }
    }
}
