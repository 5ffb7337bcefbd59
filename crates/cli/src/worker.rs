//! `hephaestus worker`: a worker process for the registered workflows (the
//! stock binary's are the fixture workflows, [`crate::fixtures`]) on
//! PostgreSQL, run the production way: the runner's jobs on queue-pg's
//! `QueueRuntime`, with the failure handler attached to the runtime, and a
//! leader-only reconciler.
//!
//! It installs its SIGTERM and Ctrl-C handlers first, connects (failing
//! within 5 s with the cause when the server cannot be reached), refuses a
//! schema migrated by a newer version and a pool too small to run jobs,
//! migrates storage and queue into `--schema` (a no-op when they are up to
//! date), registers the workflows (for the fixtures: creates their execution
//! table), starts, and prints one line starting with `hephaestus worker
//! ready` on stdout.
//!
//! SIGTERM, Ctrl-C, or (with `--exit-on-stdin-close`) its standard input
//! reaching end of file shut it down gracefully: stop fetching and
//! reconciling at once, let running jobs finish within `--grace-ms`, hand
//! the ones that did not back to the queue, stop the services, and print a
//! `hephaestus worker stopped` line. SIGKILL is a crash, which the design
//! tolerates: its running jobs are rescued once their heartbeats are
//! `--stale-after-ms` old.
//!
//! Logs (failed claims, rescues, leadership changes, reconciler repairs) go
//! to stderr, filtered by `RUST_LOG` (see [`crate::logging`]).
//!
//! With `--pgbouncer` the URL is a PgBouncer in transaction pooling
//! (`pool_mode = transaction`): the pool keeps no prepared statement, runs
//! every statement inside a transaction and sends no startup parameter
//! PgBouncer refuses (no `plan_cache_mode` either), and the worker polls
//! (`--poll-only`, at `--poll-ms`) instead of listening. Migrating at start
//! works through it too (one transaction per component).
//!
//! On SQLite (`--database-url sqlite://FILE`) the worker runs the runner's
//! own loop (`Runtime::run`: in-process wake-ups, polling for another
//! process's jobs, heartbeats, rescue) and the reconciler, after taking the
//! file's worker lock: one worker per file, a second one exits with an error
//! saying so. Jobs a killed worker left running are rescued at start.

use std::io::{Read as _, Write as _};
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
    /// PostgreSQL URL, or `sqlite://FILE` for a SQLite database file
    /// (created and migrated if needed).
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
    /// How often the leader renews its lease and followers try to take it,
    /// in ms (default: a third of the lease).
    #[arg(long)]
    elect_ms: Option<u64>,
    /// How long the leader's lease lasts without a renewal, in ms: a
    /// stopped or killed leader is replaced after this (default: half of
    /// --stale-after-ms, at most 15 s, so a dead leader is replaced before
    /// its jobs are due for rescue).
    #[arg(long)]
    leader_ttl_ms: Option<u64>,
    /// Connections in the pool (default: concurrency + 8). The queue
    /// runtime refuses a pool that cannot hold its LISTEN connection plus
    /// one more.
    #[arg(long)]
    max_connections: Option<u32>,
    /// How long a graceful shutdown waits for running jobs, in ms.
    #[arg(long, default_value_t = 5_000)]
    grace_ms: u64,
    /// Poll for jobs instead of listening for notifications (no LISTEN
    /// connection). Leader election needs no session state either way.
    #[arg(long)]
    poll_only: bool,
    #[command(flatten)]
    pooling: crate::database::PoolingArgs,
    /// Shut down gracefully when standard input is closed.
    #[arg(long)]
    exit_on_stdin_close: bool,
    #[command(flatten)]
    observe: crate::observe::ObserveArgs,
}

impl WorkerCommand {
    pub async fn run(self, app: &App) -> Result<()> {
        // Before anything that takes time: a SIGTERM from now on is a
        // graceful stop, never the default (immediate) death.
        let signals = Signals::install();
        let _telemetry = crate::observe::init_logs(self.observe.log_format)?;
        let metrics = self
            .observe
            .metrics_addr
            .map(|addr| crate::observe::install_recorder().map(|handle| (addr, handle)))
            .transpose()?;
        if hephaestus_sqlite::SqliteOptions::is_sqlite_url(&self.database_url) {
            return self.run_sqlite(app, signals).await;
        }
        let prefix = SchemaPrefix::new(&self.schema)
            .with_context(|| format!("invalid --schema {:?}", self.schema))?;
        let pooling = self.pooling.pooling();
        let options = hephaestus_runner::postgres::connect_options(
            PgConnectOptions::from_str(&self.database_url).context("invalid --database-url")?,
            pooling,
        );
        crate::migrate::probe(&options).await?;
        let max_connections = self.max_connections.unwrap_or_else(|| {
            // Every job slot may hold a connection, plus the recorder, the
            // reconciler and the queue's services.
            u32::try_from(self.concurrency)
                .unwrap_or(u32::MAX)
                .saturating_add(8)
        });
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            // Every acquire under load waits this long, not only the first:
            // the probe above already failed fast on an unreachable server.
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .context("connecting to PostgreSQL")?;
        crate::migrate::refuse_ahead(&pool, &prefix).await?;
        hephaestus_storage_pg::migrate(&pool, &prefix)
            .await
            .context("migrating the storage tables")?;
        hephaestus_queue_pg::migrate(&pool, &prefix)
            .await
            .context("migrating the queue tables")?;
        let db = crate::database::Database {
            pool: pool.clone(),
            prefix: prefix.clone(),
            pooling,
        };
        let runtime = app.runtime(&db, self.config(), true).await?;
        let queue = runtime
            .queue_runtime()?
            .election(self.elect_interval(), self.leader_ttl())
            // LISTEN needs a session of its own, which PgBouncer's
            // transaction pooling does not give.
            .poll_only(self.poll_only || pooling.needs_transaction())
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

        say(&format!(
            "hephaestus worker ready: pid {}, schema {}, worker {}, concurrency {}",
            std::process::id(),
            prefix.as_str(),
            queue.worker_id(),
            self.concurrency.max(1),
        ));

        tokio::select! {
            () = signals.received() => {}
            () = stdin_closed(self.exit_on_stdin_close) => {}
        }
        tracing::info!("hephaestus worker: shutting down");
        readiness.set_running(false);
        let _ = stop.send(true);
        let report = queue.shutdown(Duration::from_millis(self.grace_ms)).await;
        // The reconciler's pass was dropped at its await point when the
        // stop was sent; a panic in it was already reported by the task.
        let _ = reconciling.await;
        pool.close().await;
        say(&format!(
            "hephaestus worker stopped: finished in grace {}, stop requested {}, aborted {}, handed back {}",
            report.finished_in_grace,
            report.stop_requested.len(),
            report.aborted.len(),
            report.handed_back.len()
        ));
        Ok(())
    }
}

impl WorkerCommand {
    fn config(&self) -> RunnerConfig {
        RunnerConfig::default()
            .with_concurrency(self.concurrency.max(1))
            .with_poll_interval(Duration::from_millis(self.poll_ms))
            .with_heartbeat_interval(Duration::from_millis(self.heartbeat_ms))
            .with_stale_after(Duration::from_millis(self.stale_after_ms))
            .with_rescue_interval(Duration::from_millis(self.rescue_interval_ms))
    }

    /// The worker on a SQLite file (see the module docs).
    async fn run_sqlite(self, app: &App, signals: Signals) -> Result<()> {
        let options = hephaestus_sqlite::SqliteOptions::from_url(&self.database_url)?
            .with_max_connections(self.max_connections.unwrap_or_else(|| {
                u32::try_from(self.concurrency)
                    .unwrap_or(u32::MAX)
                    .saturating_add(8)
            }));
        let path = options.path.clone();
        let backend = hephaestus_sqlite::SqliteBackend::open_migrated(options).await?;
        let lock = backend.lock_worker().await?;
        let runtime = app
            .sqlite_runtime(backend.clone(), self.config(), true)
            .await?;
        let (stop, stopped) = watch::channel(false);
        let reconciler = Reconciler::new(runtime.clone());
        let reconcile_every = Duration::from_millis(self.reconcile_ms);
        let reconciling = tokio::spawn({
            let mut stopped = stopped.clone();
            async move {
                reconciler
                    .run_every(reconcile_every, async move {
                        let _ = stopped.wait_for(|stop| *stop).await;
                    })
                    .await;
            }
        });
        say(&format!(
            "hephaestus worker ready: pid {}, sqlite {}, concurrency {}",
            std::process::id(),
            path.display(),
            self.concurrency.max(1),
        ));
        let exit_on_stdin_close = self.exit_on_stdin_close;
        let report = runtime
            .run(async move {
                tokio::select! {
                    () = signals.received() => {}
                    () = stdin_closed(exit_on_stdin_close) => {}
                }
                tracing::info!("hephaestus worker: shutting down");
            })
            .await?;
        let _ = stop.send(true);
        let _ = reconciling.await;
        lock.release().await;
        backend.close().await;
        say(&format!(
            "hephaestus worker stopped: ran {} jobs ({} succeeded, {} retried, {} discarded)",
            report.total(),
            report.succeeded,
            report.retried,
            report.discarded
        ));
        Ok(())
    }

    /// `--leader-ttl-ms`, or half of `--stale-after-ms` between 300 ms and
    /// 15 s.
    fn leader_ttl(&self) -> Duration {
        Duration::from_millis(
            self.leader_ttl_ms
                .unwrap_or_else(|| (self.stale_after_ms / 2).clamp(300, 15_000)),
        )
    }

    /// `--elect-ms`, or a third of the lease.
    fn elect_interval(&self) -> Duration {
        self.elect_ms
            .map_or_else(|| self.leader_ttl() / 3, Duration::from_millis)
    }
}

/// Prints a line on stdout; a closed stdout (the supervisor went away) is
/// not a reason to fail a worker.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// [`say`] on stderr.
fn note(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The shutdown signals, listened for from [`Signals::install`] on: SIGTERM
/// (what process managers send) and SIGINT (Ctrl-C). A signal that arrives
/// before [`Signals::received`] is awaited is kept, not lost.
pub(crate) struct Signals {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    pub(crate) fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(stream) => Some(stream),
                Err(e) => {
                    note(&format!(
                        "hephaestus worker: cannot listen for {name} ({e})"
                    ));
                    None
                }
            };
            Self {
                terminate: listen(SignalKind::terminate(), "SIGTERM"),
                interrupt: listen(SignalKind::interrupt(), "SIGINT"),
            }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    /// Resolves at the first shutdown signal.
    pub(crate) async fn received(mut self) {
        #[cfg(unix)]
        {
            async fn next(stream: Option<&mut tokio::signal::unix::Signal>) {
                match stream {
                    Some(stream) => {
                        stream.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = next(self.terminate.as_mut()) => {}
                () = next(self.interrupt.as_mut()) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
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
            note(&format!(
                "hephaestus worker: cannot watch stdin ({e}); stop it with a signal"
            ));
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{Args as _, FromArgMatches as _};

    use super::*;

    fn parse(args: &[&str]) -> WorkerCommand {
        let command = WorkerCommand::augment_args(clap::Command::new("worker"));
        let matches = command
            .try_get_matches_from(
                ["worker", "--database-url", "postgres://h/db"]
                    .into_iter()
                    .chain(args.iter().copied()),
            )
            .unwrap();
        WorkerCommand::from_arg_matches(&matches).unwrap()
    }

    #[test]
    fn the_lease_follows_stale_after_unless_given() {
        let default = parse(&[]);
        assert_eq!(default.leader_ttl(), Duration::from_secs(15));
        assert_eq!(default.elect_interval(), Duration::from_secs(5));
        // A dead leader is replaced before its jobs are due for rescue.
        let fast = parse(&["--stale-after-ms", "1000"]);
        assert_eq!(fast.leader_ttl(), Duration::from_millis(500));
        assert!(fast.elect_interval() * 2 < fast.leader_ttl());
        let given = parse(&["--leader-ttl-ms", "2000", "--elect-ms", "100"]);
        assert_eq!(given.leader_ttl(), Duration::from_secs(2));
        assert_eq!(given.elect_interval(), Duration::from_millis(100));
    }
}
