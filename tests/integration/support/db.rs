//! Test databases: one PostgreSQL server, a fresh schema (or database) per test.
//!
//! The server comes from `DATABASE_URL`. Without it, and with the `testcontainers` feature,
//! a throwaway PostgreSQL container is started once per test process (`docker run`; it
//! stops and removes itself when the process exits). Otherwise the tests panic with a
//! message saying how to get a server: they never skip silently.
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

fn connect_options() -> PgConnectOptions {
    PgConnectOptions::from_str(database_url())
        .unwrap_or_else(|e| panic!("DATABASE_URL is not a valid PostgreSQL URL: {e}"))
}

async fn pool(options: PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(3)
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

    /// A schema-qualified name in this schema, e.g. `"t_0123".hephaestus_instances`.
    pub fn table(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix.quoted())
    }

    pub async fn teardown(self) {
        sqlx::raw_sql(&format!("drop schema {} cascade", self.prefix.quoted()))
            .execute(&self.pool)
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

/// A PostgreSQL container started with the Docker CLI, once per test process.
///
/// The container runs attached (`docker run -i`) with a shell that waits for its stdin to
/// close, then stops PostgreSQL; `--rm` removes it. The stdin pipe is held by this process,
/// so however the process ends (success, panic, kill), the container goes away with it.
#[cfg(feature = "testcontainers")]
mod container {
    use std::process::{Child, Command, Stdio};
    use std::sync::Mutex;
    use std::thread::sleep;
    use std::time::{Duration, Instant};

    const IMAGE: &str = "postgres:15-alpine";
    const STARTUP_LIMIT: Duration = Duration::from_secs(600);

    /// Kept for the life of the process: dropping nothing here, the pipe closes at exit.
    static CHILD: Mutex<Option<Child>> = Mutex::new(None);

    pub fn start() -> String {
        let name = format!(
            "hephaestus-tests-{}-{}",
            std::process::id(),
            super::unique_suffix()
        );
        eprintln!("hephaestus-tests: starting PostgreSQL container {name} ({IMAGE})");
        let child = Command::new("docker")
            .args(["run", "--rm", "-i", "--name", &name])
            .args(["--label", "hephaestus-tests=1", "-p", "127.0.0.1::5432"])
            .args([
                "-e",
                "POSTGRES_HOST_AUTH_METHOD=trust",
                "--entrypoint",
                "sh",
                IMAGE,
            ])
            .args([
                "-c",
                "docker-entrypoint.sh postgres & pid=$!; cat >/dev/null; kill -INT $pid; wait $pid",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `docker`: {e}"));
        *CHILD
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(child);

        let deadline = Instant::now() + STARTUP_LIMIT;
        let port = loop {
            if let Some(port) = published_port(&name) {
                break port;
            }
            assert!(
                Instant::now() < deadline,
                "container {name} did not publish port 5432"
            );
            sleep(Duration::from_millis(250));
        };
        // The image's entrypoint runs a temporary server on the Unix socket only while it
        // initializes; TCP answers once the real server is up.
        loop {
            let ready = Command::new("docker")
                .args([
                    "exec",
                    &name,
                    "pg_isready",
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL in container {name} did not become ready"
            );
            sleep(Duration::from_millis(250));
        }
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    }

    fn published_port(name: &str) -> Option<u16> {
        let output = Command::new("docker")
            .args(["port", name, "5432/tcp"])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !output.status.success() {
            return None;
        }
        // e.g. "127.0.0.1:49153"
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()?
            .rsplit(':')
            .next()?
            .trim()
            .parse()
            .ok()
    }
}
