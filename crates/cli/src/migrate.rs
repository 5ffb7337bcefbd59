//! `hephaestus migrate up|down|status` and `hephaestus gen-migration`: the
//! schema of the storage and queue components, applied from the command
//! line or generated as SQL files for another migration tool (the same
//! generator as `cargo xtask gen-migration`).

use std::path::PathBuf;
use std::str::FromStr;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use hephaestus_migrations_gen::files::{check_dir, render_files, write_dir};
use hephaestus_migrations_gen::{Component, Direction, Registry, SchemaPrefix};
use hephaestus_queue_pg::Pooling;
use serde_json::json;
use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};

/// Every component, in dependency order (storage before queue).
pub(crate) fn registry() -> Result<Registry> {
    Ok(Registry::new(vec![
        hephaestus_storage_pg::schema(),
        hephaestus_queue_pg::schema(),
    ])?)
}

/// `hephaestus migrate`.
#[derive(Debug, Args)]
pub struct MigrateCommand {
    /// PostgreSQL URL, or `sqlite://FILE` (a SQLite database file, created
    /// if missing; it has one component, `sqlite`, and no schema).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// The schema (prefix) holding Hephaestus's tables.
    #[arg(long, default_value = SchemaPrefix::DEFAULT)]
    schema: String,
    #[command(flatten)]
    pooling: crate::database::PoolingArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    action: MigrateAction,
}

impl MigrateCommand {
    /// `migrate` on a SQLite file: its one component, `sqlite`.
    async fn run_sqlite(&self) -> Result<()> {
        use hephaestus_sqlite::{SqliteBackend, SqliteOptions};
        let component = hephaestus_sqlite::schema();
        let name = component.name();
        let check_component = |given: &Option<String>| -> Result<()> {
            match given {
                Some(c) if c != name => {
                    bail!("unknown component {c:?} (a SQLite file has one: {name})")
                }
                _ => Ok(()),
            }
        };
        let options = SqliteOptions::from_url(&self.database_url)?;
        let file = options.path.display().to_string();
        let backend = SqliteBackend::open(options).await?;
        let outcome = match &self.action {
            MigrateAction::Status => {
                let db = backend.schema_version().await?;
                let latest = component.latest();
                if self.json {
                    println!(
                        "{}",
                        json!({"sqlite": file, "components": [{"component": name, "database": db, "latest": latest, "up_to_date": db == latest}]})
                    );
                } else {
                    let state = if db == latest {
                        "up to date".to_owned()
                    } else if db == 0 {
                        "not migrated: run `hephaestus migrate up`".to_owned()
                    } else {
                        format!("behind: run `hephaestus migrate up` to reach {latest}")
                    };
                    println!("sqlite {file}");
                    println!("  {name}: database {db}, this build {latest} ({state})");
                }
                Ok(())
            }
            MigrateAction::Up { component: c, to } => {
                check_component(c)?;
                if to.is_some_and(|to| to != component.latest()) {
                    bail!(
                        "a SQLite file migrates up to the latest version ({}) only",
                        component.latest()
                    );
                }
                let moved = backend.migrate().await?;
                self.print_moves(&[(name.to_owned(), moved.from, moved.to)]);
                Ok(())
            }
            MigrateAction::Down {
                component: c,
                to,
                force,
            } => {
                check_component(c)?;
                let moved = backend.migrate_down(*to, *force).await?;
                self.print_moves(&[(name.to_owned(), moved.from, moved.to)]);
                Ok(())
            }
        };
        backend.close().await;
        outcome
    }
}

#[derive(Debug, Subcommand)]
enum MigrateAction {
    /// Migrates every component (or one) up to its latest version (or --to).
    Up {
        /// Only this component (`storage` or `queue`).
        #[arg(long)]
        component: Option<String>,
        /// Stop at this version (default: the latest).
        #[arg(long)]
        to: Option<u32>,
    },
    /// Migrates down to version --to (0 drops the component's tables):
    /// every component (queue first) or one. Refused while instances are
    /// active or workers are alive, unless --force.
    Down {
        /// Only this component (`storage` or `queue`).
        #[arg(long)]
        component: Option<String>,
        /// The version to go down to.
        #[arg(long)]
        to: u32,
        /// Migrate down even while instances are active or workers run:
        /// what the dropped tables and columns hold is lost.
        #[arg(long)]
        force: bool,
    },
    /// Shows each component's version in the database and in this build.
    Status,
}

/// How long connecting may take before the worker gives up (as the other
/// commands do).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One connection attempt, so that an unreachable server fails the start
/// within [`CONNECT_TIMEOUT`] with its cause ("connection refused", a bad
/// password, an unknown database) instead of a pool timeout.
pub(crate) async fn probe(options: &PgConnectOptions) -> Result<()> {
    let target = format!(
        "PostgreSQL at {}:{}, database {}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("(default)")
    );
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(options)).await {
        Ok(Ok(conn)) => {
            // Closing says goodbye to the server; failing to is harmless.
            let _ = conn.close().await;
            Ok(())
        }
        // PgBouncer refuses startup parameters it does not know, such as
        // sqlx's `extra_float_digits`, which `--pgbouncer` leaves out.
        Ok(Err(error)) if error.to_string().contains("unsupported startup parameter") => {
            Err(anyhow::anyhow!("{error}").context(format!(
                "cannot connect to {target}: it refuses a startup parameter, as PgBouncer does: pass --pgbouncer to connect through PgBouncer (pool_mode = transaction)"
            )))
        }
        // The error's text already ends with its cause ("error
        // communicating with database: Connection refused"): kept as text,
        // so the chain does not repeat it.
        Ok(Err(error)) => Err(anyhow::anyhow!("{error}").context(format!(
            "cannot connect to {target}: is the server running and the URL right? (set --database-url or DATABASE_URL)"
        ))),
        Err(_) => anyhow::bail!(
            "cannot connect to {target}: no answer within {} s",
            CONNECT_TIMEOUT.as_secs()
        ),
    }
}

/// Connects, the `pooling` way, with a message that says what is wrong
/// (the server's or the network's own words) and what to do.
pub async fn connect(url: &str, pooling: Pooling) -> Result<PgPool> {
    let options = PgConnectOptions::from_str(url).with_context(|| {
        "the database URL is not a PostgreSQL URL (postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE)"
    })?;
    let options = pooling.connect_options(options);
    probe(&options).await?;
    let (host, port, db) = (
        options.get_host().to_owned(),
        options.get_port(),
        options.get_database().unwrap_or("(default)").to_owned(),
    );
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options)
        .await
        .with_context(|| {
            format!(
                "cannot connect to PostgreSQL at {host}:{port}, database {db}: is the server running and the URL right? (set --database-url or DATABASE_URL)"
            )
        })
}

/// The error for a schema a newer build migrated: the same advice from
/// every command (this build cannot read it, nor migrate it down: it does
/// not know the newer versions' down scripts).
pub(crate) fn ahead_message(schema: &str, component: &str, database: u32, latest: u32) -> String {
    format!(
        "schema {schema} is ahead of this build ({component} is at version {database}, this build knows {latest}): a newer hephaestus migrated it; use that version (its `hephaestus migrate --schema {schema} down --to {latest}` goes back to this build's schema)"
    )
}

/// Refuses a schema that a newer build migrated (a worker of this build
/// would start and claim nothing it understands).
pub(crate) async fn refuse_ahead(pool: &PgPool, prefix: &SchemaPrefix) -> Result<()> {
    let registry = registry()?;
    let mut tx = pool.begin().await.context("starting a transaction")?;
    for component in registry.components() {
        let database = current(&mut tx, prefix, component).await?;
        if database > component.latest() {
            bail!(ahead_message(
                prefix.as_str(),
                component.name(),
                database,
                component.latest()
            ));
        }
    }
    tx.rollback().await.context("ending the check")?;
    Ok(())
}

/// What a down migration would destroy and who is using the schema.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct AtStake {
    instances: i64,
    active_instances: i64,
    step_results: i64,
    jobs: i64,
    unfinished_jobs: i64,
    executing_jobs: i64,
    leader: Option<String>,
}

impl AtStake {
    /// Reads it; only the tables of components at `storage` / `queue`
    /// versions above 0 exist (the lease table from queue version 3).
    async fn read(
        tx: &mut Transaction<'_, Postgres>,
        db: &crate::database::Database,
        storage: u32,
        queue: u32,
    ) -> Result<Self> {
        let mut stake = Self::default();
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        if storage > 0 {
            let census = db
                .store()
                .census_using(&mut **tx)
                .await
                .context("counting instances and step results")?;
            stake.instances = count(census.instances);
            stake.active_instances = count(census.active_instances);
            stake.step_results = count(census.step_results);
        }
        let jobs = db.queue();
        if queue > 0 {
            let census = jobs
                .census_using(&mut **tx)
                .await
                .context("counting jobs")?;
            stake.jobs = count(census.jobs);
            stake.unfinished_jobs = count(census.unfinished_jobs);
            stake.executing_jobs = count(census.executing_jobs);
        }
        if queue >= 3 {
            stake.leader = jobs
                .maintenance_leader()
                .await
                .context("reading the maintenance lease")?
                .map(|(holder, _)| holder);
        }
        Ok(stake)
    }

    /// Why a down migration must not run now, if it must not.
    fn objection(&self) -> Option<String> {
        let mut users = Vec::new();
        if self.active_instances > 0 {
            users.push(format!("{} instances are active", self.active_instances));
        }
        if let Some(leader) = &self.leader {
            users.push(format!(
                "worker {leader} is alive (it holds the maintenance lease)"
            ));
        }
        if self.executing_jobs > 0 {
            users.push(format!("{} jobs are executing", self.executing_jobs));
        }
        if users.is_empty() {
            return None;
        }
        Some(format!(
            "{}; the schema holds {} instances ({} active), {} step results and {} jobs ({} unfinished)",
            users.join(", "),
            self.instances,
            self.active_instances,
            self.step_results,
            self.jobs,
            self.unfinished_jobs
        ))
    }
}

/// A component's version in the database (0 when never migrated).
pub(crate) async fn current(
    tx: &mut Transaction<'_, Postgres>,
    prefix: &SchemaPrefix,
    component: &Component,
) -> Result<u32> {
    Ok(match component.name() {
        hephaestus_storage_pg::COMPONENT => {
            hephaestus_storage_pg::schema_version(tx, prefix).await?
        }
        hephaestus_queue_pg::schema::COMPONENT => {
            hephaestus_queue_pg::schema_version(tx, prefix).await?
        }
        other => bail!("unknown component {other:?}"),
    })
}

/// Moves a component `direction` to `target` through the crate that owns
/// it (one transaction).
async fn migrate_component(
    pool: &PgPool,
    prefix: &SchemaPrefix,
    component: &Component,
    direction: Direction,
    target: u32,
) -> Result<hephaestus_migrations_gen::Migrated> {
    Ok(match component.name() {
        hephaestus_storage_pg::COMPONENT => {
            hephaestus_storage_pg::migrate_to(pool, prefix, direction, target).await?
        }
        hephaestus_queue_pg::schema::COMPONENT => {
            hephaestus_queue_pg::migrate_to(pool, prefix, direction, target).await?
        }
        other => bail!("unknown component {other:?}"),
    })
}

impl MigrateCommand {
    pub async fn run(self) -> Result<()> {
        if hephaestus_sqlite::SqliteOptions::is_sqlite_url(&self.database_url) {
            return self.run_sqlite().await;
        }
        let prefix = SchemaPrefix::new(&self.schema).context("--schema")?;
        let registry = registry()?;
        let chosen = |name: &Option<String>| -> Result<Vec<&Component>> {
            match name {
                None => Ok(registry.components().iter().collect()),
                Some(name) => Ok(vec![registry.get(name).with_context(|| {
                    format!("unknown component {name:?} (storage or queue)")
                })?]),
            }
        };
        let pooling = self.pooling.pooling();
        let pool = connect(&self.database_url, pooling).await?;
        let outcome = match &self.action {
            MigrateAction::Status => self.status(&pool, &prefix, &registry).await,
            MigrateAction::Up { component, to } => {
                let mut report = Vec::new();
                for c in chosen(component)? {
                    let target = to.unwrap_or_else(|| c.latest());
                    if target > c.latest() {
                        bail!(
                            "{} has no version {target} (latest: {})",
                            c.name(),
                            c.latest()
                        );
                    }
                    report.push(self.apply(&pool, &prefix, c, target, true).await?);
                }
                self.print_moves(&report);
                Ok(())
            }
            MigrateAction::Down {
                component,
                to,
                force,
            } => {
                let moving = chosen(component)?;
                let mut tx = pool.begin().await?;
                let mut versions = (0, 0);
                let mut moves = false;
                for c in registry.components() {
                    let v = current(&mut tx, &prefix, c).await?;
                    if v > c.latest() {
                        bail!(ahead_message(prefix.as_str(), c.name(), v, c.latest()));
                    }
                    if moving.iter().any(|m| m.name() == c.name()) && v > *to {
                        moves = true;
                    }
                    match c.name() {
                        "storage" => versions.0 = v,
                        _ => versions.1 = v,
                    }
                }
                if moves && !force {
                    let db = crate::database::Database {
                        pool: pool.clone(),
                        prefix: prefix.clone(),
                        pooling,
                    };
                    let stake = AtStake::read(&mut tx, &db, versions.0, versions.1).await?;
                    if let Some(objection) = stake.objection() {
                        bail!(
                            "refusing to migrate schema {} down: {objection}. A down migration drops tables or columns and what they hold. Stop the workers and let the instances finish (or cancel them) first, or pass --force to lose it",
                            prefix.as_str()
                        );
                    }
                }
                tx.rollback().await?;
                let mut report = Vec::new();
                // Dependents first: the queue before the storage.
                for c in chosen(component)?.into_iter().rev() {
                    report.push(self.apply(&pool, &prefix, c, *to, false).await?);
                }
                self.print_moves(&report);
                Ok(())
            }
        };
        pool.close().await;
        outcome
    }

    /// Moves one component to `target` in one transaction; returns
    /// (component, from, to).
    async fn apply(
        &self,
        pool: &PgPool,
        prefix: &SchemaPrefix,
        component: &Component,
        target: u32,
        up: bool,
    ) -> Result<(String, u32, u32)> {
        // Checked here for this command's advice; `migrate_component`
        // checks again in its own transaction.
        let mut tx = pool.begin().await?;
        let from = current(&mut tx, prefix, component).await?;
        tx.rollback().await?;
        if from > component.latest() {
            bail!(ahead_message(
                prefix.as_str(),
                component.name(),
                from,
                component.latest()
            ));
        }
        let direction = if up {
            if target < from {
                bail!(
                    "{} is at version {from}, above {target}: use `hephaestus migrate down --to {target}`",
                    component.name()
                );
            }
            Direction::Up
        } else {
            if target > from {
                bail!(
                    "{} is at version {from}, below {target}: use `hephaestus migrate up --to {target}`",
                    component.name()
                );
            }
            Direction::Down
        };
        let migrated = migrate_component(pool, prefix, component, direction, target)
            .await
            .with_context(|| format!("migrating {} from {from} to {target}", component.name()))?;
        Ok((component.name().to_owned(), migrated.from, migrated.to))
    }

    fn print_moves(&self, moves: &[(String, u32, u32)]) {
        if self.json {
            let out: Vec<_> = moves
                .iter()
                .map(|(c, from, to)| json!({"component": c, "from": from, "to": to}))
                .collect();
            println!("{}", json!({"schema": self.schema, "migrated": out}));
        } else {
            for (c, from, to) in moves {
                if from == to {
                    println!("{c}: already at version {to}");
                } else {
                    println!("{c}: {from} -> {to}");
                }
            }
        }
    }

    async fn status(
        &self,
        pool: &PgPool,
        prefix: &SchemaPrefix,
        registry: &Registry,
    ) -> Result<()> {
        let mut tx = pool.begin().await?;
        let mut rows = Vec::new();
        for c in registry.components() {
            rows.push((c.name(), current(&mut tx, prefix, c).await?, c.latest()));
        }
        tx.rollback().await?;
        if self.json {
            let out: Vec<_> = rows
                .iter()
                .map(|(c, db, latest)| {
                    json!({"component": c, "database": db, "latest": latest, "up_to_date": db == latest})
                })
                .collect();
            println!("{}", json!({"schema": self.schema, "components": out}));
            return Ok(());
        }
        println!("schema {}", self.schema);
        for (c, db, latest) in &rows {
            let state = match db.cmp(latest) {
                std::cmp::Ordering::Equal => "up to date".to_owned(),
                std::cmp::Ordering::Less if *db == 0 => {
                    format!(
                        "not migrated: run `hephaestus migrate --schema {} up`",
                        self.schema
                    )
                }
                std::cmp::Ordering::Less => {
                    format!(
                        "behind: run `hephaestus migrate --schema {} up`",
                        self.schema
                    )
                }
                std::cmp::Ordering::Greater => format!(
                    "ahead of this build: a newer hephaestus migrated it; use that version (its `migrate --schema {} down --to {latest}` goes back to this build's schema)",
                    self.schema
                ),
            };
            println!("  {c:<8} database v{db}, this build v{latest}: {state}");
        }
        Ok(())
    }
}

/// `hephaestus gen-migration`: SQL files for your own migration tool.
#[derive(Debug, Args)]
pub struct GenMigrationCommand {
    /// The schema (prefix) the SQL creates its tables in.
    #[arg(long, default_value = SchemaPrefix::DEFAULT)]
    prefix: String,
    /// Where to write the files.
    #[arg(long)]
    out: PathBuf,
    /// Write nothing; fail when files are missing, stale or extra.
    #[arg(long)]
    check: bool,
}

impl GenMigrationCommand {
    pub fn run(&self) -> Result<()> {
        let prefix = SchemaPrefix::new(&self.prefix).context("--prefix")?;
        let files = render_files(&registry()?, &prefix)?;
        if self.check {
            let status = check_dir(&self.out, &files)?;
            if status.is_clean() {
                println!(
                    "{} files in {} are up to date",
                    files.len(),
                    self.out.display()
                );
                return Ok(());
            }
            bail!(
                "{} is out of date:\n{}\nrun `hephaestus gen-migration --prefix {} --out {}`",
                self.out.display(),
                status.describe(),
                self.prefix,
                self.out.display()
            );
        }
        let report = write_dir(&self.out, &files)
            .with_context(|| format!("writing migrations into {}", self.out.display()))?;
        for name in &report.written {
            println!("wrote {}", self.out.join(name).display());
        }
        println!(
            "{} written, {} unchanged, in {}",
            report.written.len(),
            report.unchanged.len(),
            self.out.display()
        );
        Ok(())
    }
}
