//! Test databases: one PostgreSQL server, a fresh schema (or database) per test.
//!
//! The server comes from `DATABASE_URL`. Without it, and with the `testcontainers` feature,
//! a throwaway PostgreSQL container is started once per test process with the
//! `testcontainers` crate; it outlives the process and is removed by the next run (see
//! `container`). Otherwise the tests panic with a message saying how to get a server: they
//! never skip silently.
//!
//! Schemas and databases are dropped by `teardown()` at the end of a passing test; a
//! failing test leaves its `t_<hex>` schema (or `hephaestus_t_<hex>` database) behind for
//! inspection.

use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use hephaestus_migrations_gen::SchemaPrefix;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The server's URL, resolved once per test process.
pub fn database_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("DATABASE_URL")
            && !url.is_empty()
        {
            return url;
        }
        #[cfg(feature = "testcontainers")]
        {
            container::start()
        }
        #[cfg(not(feature = "testcontainers"))]
        {
            panic!(
                "these tests need PostgreSQL: run `cargo xtask test` (it finds or starts one), \
                 or set DATABASE_URL=postgres://USER:PASSWORD@HOST:PORT/DATABASE, \
                 or enable the `testcontainers` feature of hephaestus-tests with Docker running"
            )
        }
    })
}

/// 16 random lower-case hex digits, for unique schema and database names.
pub fn unique_suffix() -> String {
    let simple = uuid::Uuid::new_v4().simple().to_string();
    simple[..16].to_owned()
}

/// The test database, with the session settings workers run with
/// (`hephaestus_runner::postgres::tuned`): what is tested is what runs.
fn connect_options() -> PgConnectOptions {
    hephaestus_runner::postgres::tuned(
        PgConnectOptions::from_str(database_url())
            .unwrap_or_else(|e| panic!("DATABASE_URL is not a valid PostgreSQL URL: {e}")),
    )
}

async fn pool(options: PgConnectOptions) -> PgPool {
    pool_of(options, 3).await
}

async fn pool_of(options: PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL: {e}"))
}

/// A fresh, empty schema `t_<hex>` in the test database.
///
/// Its pool's `search_path` names a schema that does not exist, so any SQL that forgets to
/// qualify a table name fails instead of silently using `public`.
#[derive(Debug)]
pub struct TestSchema {
    pub pool: PgPool,
    pub prefix: SchemaPrefix,
}

impl TestSchema {
    pub async fn new() -> Self {
        let prefix = SchemaPrefix::new(&format!("t_{}", unique_suffix()))
            .expect("t_<hex> is a valid prefix");
        let pool =
            pool(connect_options().options([("search_path", "hephaestus_no_such_schema")])).await;
        sqlx::raw_sql(&format!("create schema {}", prefix.quoted()))
            .execute(&pool)
            .await
            .expect("create the test schema");
        Self { pool, prefix }
    }

    /// Another pool on the same server, with up to `max_connections` (for
    /// tests that run many concurrent transactions).
    pub async fn pool_with(&self, max_connections: u32) -> PgPool {
        pool_of(
            connect_options().options([("search_path", "hephaestus_no_such_schema")]),
            max_connections,
        )
        .await
    }

    /// A schema-qualified name in this schema, e.g. `"t_0123".hephaestus_instances`.
    pub fn table(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix.quoted())
    }

    pub async fn teardown(self) {
        hephaestus_queue_pg::drop_schema(&self.pool, &self.prefix)
            .await
            .expect("drop the test schema");
        self.pool.close().await;
    }
}

/// A fresh database `hephaestus_t_<hex>` on the test server, for tests that need the
/// default `public` schema (the sqlx migrator) or a fixed schema name.
#[derive(Debug)]
pub struct TestDatabase {
    pub pool: PgPool,
    pub name: String,
}

impl TestDatabase {
    pub async fn new() -> Self {
        let name = format!("hephaestus_t_{}", unique_suffix());
        let admin = pool(connect_options()).await;
        sqlx::raw_sql(&format!("create database {name}"))
            .execute(&admin)
            .await
            .unwrap_or_else(|e| {
                panic!("create database {name} (the test user needs CREATEDB): {e}")
            });
        admin.close().await;
        let pool = pool(connect_options().database(&name)).await;
        Self { pool, name }
    }

    pub async fn teardown(self) {
        self.pool.close().await;
        let admin = pool(connect_options()).await;
        sqlx::raw_sql(&format!("drop database {} with (force)", self.name))
            .execute(&admin)
            .await
            .expect("drop the test database");
        admin.close().await;
    }
}

/// A PostgreSQL container started with the `testcontainers` crate, once per test process.
///
/// The container lives in a `static`, and statics are never dropped, so the crate's
/// remove-on-drop never runs: the container outlives the process. To keep them from piling
/// up, each container is labelled with the host name and process id of the test process
/// that started it, and every start first removes the containers of earlier processes on
/// this host that are gone (see [`remove_leftovers`]). At most one container per
/// concurrently running test process therefore remains between runs.
#[cfg(feature = "testcontainers")]
mod container {
    use std::collections::HashMap;
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::sync::OnceLock;
    use std::time::Duration;

    use testcontainers_modules::postgres::Postgres;
    use testcontainers_modules::testcontainers::bollard::query_parameters::{
        ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    };
    use testcontainers_modules::testcontainers::core::IntoContainerPort;
    use testcontainers_modules::testcontainers::core::client::docker_client_instance;
    use testcontainers_modules::testcontainers::runners::SyncRunner;
    use testcontainers_modules::testcontainers::{Container, ImageExt};

    const TAG: &str = "15-alpine";
    /// Start and readiness of the container (pulling the image is not counted).
    const STARTUP_LIMIT: Duration = Duration::from_secs(600);
    /// Marks our containers; the value is the host name of the test process.
    const HOST_LABEL: &str = "hephaestus-tests.host";
    /// The process id of the test process that started the container.
    const PID_LABEL: &str = "hephaestus-tests.pid";

    /// Kept for the life of the process (never dropped: see the module documentation).
    static CONTAINER: OnceLock<Container<Postgres>> = OnceLock::new();

    /// Starts the container and returns its URL. Called once, from `database_url()`.
    pub fn start() -> String {
        // The sync runner blocks on its own Tokio runtime, which panics on a thread that
        // already drives one (every `#[tokio::test]`): do the work on a thread of our own.
        let started = std::thread::Builder::new()
            .name("hephaestus-tests-container".to_owned())
            .spawn(start_on_this_thread)
            .and_then(|thread| {
                thread
                    .join()
                    .map_err(|_| std::io::Error::other("the container thread panicked"))
            });
        match started {
            Ok(Ok(url)) => url,
            Ok(Err(message)) => panic!(
                "the `testcontainers` feature could not start a PostgreSQL container \
                 (is Docker running?): {message}. Alternatively set \
                 DATABASE_URL=postgres://USER:PASSWORD@HOST:PORT/DATABASE or run `cargo xtask test`"
            ),
            Err(e) => panic!("starting the PostgreSQL container: {e}"),
        }
    }

    fn start_on_this_thread() -> Result<String, String> {
        let host_name = host_name();
        let pid = std::process::id();
        remove_leftovers(&host_name);
        let name = format!("hephaestus-tests-{pid}-{}", super::unique_suffix());
        // A fresh random password: the port is published on every interface of the
        // Docker host (so that tests running in a container or against a remote daemon
        // can reach it), and a leftover container stays up until the next run.
        let password = uuid::Uuid::new_v4().simple().to_string();
        eprintln!("hephaestus-tests: starting PostgreSQL container {name} (postgres:{TAG})");
        let container = Postgres::default()
            .with_password(&password)
            .with_tag(TAG)
            .with_container_name(&name)
            .with_label(HOST_LABEL, host_name)
            .with_label(PID_LABEL, pid.to_string())
            .with_startup_timeout(STARTUP_LIMIT)
            .start()
            .map_err(|e| format!("container {name}: {e}"))?;
        let port = container
            .get_host_port_ipv4(5432.tcp())
            .map_err(|e| format!("container {name} did not publish port 5432: {e}"))?;
        let host = container
            .get_host()
            .map_err(|e| format!("host of container {name}: {e}"))?
            .to_string();
        // The port is the IPv4 one, and "localhost" may resolve to ::1 first.
        let host = if host == "localhost" {
            "127.0.0.1".to_owned()
        } else {
            host
        };
        // Only this thread sets it, once.
        let _ = CONTAINER.set(container);
        Ok(format!(
            "postgres://postgres:{password}@{host}:{port}/postgres"
        ))
    }

    /// Removes (with their anonymous data volume) the containers that test processes on
    /// this host started and that outlived them. Best effort: failures are reported, not
    /// fatal (starting the new container says clearly whether Docker works at all).
    ///
    /// It uses the Docker client configured by `testcontainers` (same `DOCKER_HOST`
    /// resolution as the container start); the crate has no removal API of its own for
    /// containers it no longer holds.
    fn remove_leftovers(host_name: &str) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                eprintln!("hephaestus-tests: cannot look for leftover containers: {e}");
                return;
            }
        };
        runtime.block_on(async {
            let docker = match docker_client_instance().await {
                Ok(docker) => docker,
                Err(e) => {
                    eprintln!("hephaestus-tests: cannot look for leftover containers: {e}");
                    return;
                }
            };
            let filters = HashMap::from([(
                "label",
                vec![format!("{HOST_LABEL}={host_name}"), PID_LABEL.to_owned()],
            )]);
            let options = ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build();
            let containers = match docker.list_containers(Some(options)).await {
                Ok(containers) => containers,
                Err(e) => {
                    eprintln!("hephaestus-tests: cannot list leftover containers: {e}");
                    return;
                }
            };
            for container in containers {
                let (Some(id), Some(labels)) = (container.id, container.labels) else {
                    continue;
                };
                // The filter already says so; checked again as removal is not undoable.
                if labels.get(HOST_LABEL).map(String::as_str) != Some(host_name) {
                    continue;
                }
                let Some(pid) = labels
                    .get(PID_LABEL)
                    .and_then(|pid| pid.parse::<u32>().ok())
                else {
                    continue;
                };
                if process_is_alive(pid) {
                    continue;
                }
                let options = RemoveContainerOptionsBuilder::new()
                    .force(true)
                    .v(true)
                    .build();
                let outcome = match docker.remove_container(&id, Some(options)).await {
                    Ok(()) => format!("removed leftover container {id} of ended process {pid}"),
                    Err(e) => format!("cannot remove leftover container {id}: {e}"),
                };
                eprintln!("hephaestus-tests: {outcome}");
            }
        });
    }

    /// Whether a process with this id runs on this host. When in doubt, yes (its
    /// container is then kept until a later run).
    fn process_is_alive(pid: u32) -> bool {
        if pid == std::process::id() {
            return true;
        }
        if Path::new("/proc/self").exists() {
            return Path::new("/proc").join(pid.to_string()).exists();
        }
        // Without /proc (macOS, BSD): `ps -p` succeeds when the process exists, whoever
        // owns it.
        Command::new("ps")
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_or(true, |status| status.success())
    }

    /// This machine's name, so that process ids are only compared on the machine (or in
    /// the container) where they were taken.
    fn host_name() -> String {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| {
                Command::new("hostname")
                    .stderr(Stdio::null())
                    .output()
                    .ok()
                    .filter(|output| output.status.success())
                    .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
            })
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "unknown".to_owned())
    }
}
