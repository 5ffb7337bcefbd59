//! Through a real PgBouncer in transaction pooling (`pool_mode =
//! transaction`, two server connections shared by every client, no
//! `ignore_startup_parameters`), which each test starts on a free port in
//! front of the test server:
//!
//! - two `hephaestus worker --pgbouncer` processes, and a runtime connected
//!   with `Pooling::Transaction` for the API side (start, resume, cancel),
//!   run three dozen instances with parallel steps, retries and failures:
//!   each ends as its script says, every step result is recorded once and
//!   applied, no attempt runs twice, both workers ran steps, and PgBouncer
//!   never opened more than its two server connections;
//! - a worker runtime refuses to LISTEN through it;
//! - `hephaestus migrate --pgbouncer` migrates a schema through it, the
//!   other commands read through it, and without `--pgbouncer` a command
//!   fails at once saying to pass it.
//!
//! PgBouncer must be installed (Debian: `apt-get install pgbouncer`, which
//! `.ci/run` does): without it these tests fail, saying so.
//! `HEPHAESTUS_PGBOUNCER` names the binary when it is elsewhere than
//! `/usr/sbin/pgbouncer` or the `PATH`.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr as _;
use std::sync::Mutex;
use std::time::Duration;

use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_migrations_gen::SchemaPrefix;
use hephaestus_queue_pg::Error as QueueError;
use hephaestus_runner::postgres::{PgBackend, PoolSettings, Pooling};
use hephaestus_runner::{Runtime, StartOptions};
use serde_json::{Value, json};
use sqlx::Row as _;
use sqlx::postgres::PgConnectOptions;
use uuid::Uuid;

use crate::faults::fixtures::{self, Script};
use crate::support::bin::hephaestus_bin;
use crate::support::db::{TestSchema, database_url};
use crate::support::plans::{Plan, check_instance, recorded_executions, recorded_results};
use crate::support::sqlite::TempDir;
use crate::support::wait::{SAFETY_NET, holds_within, until_within};
use crate::support::worker::Worker;

/// Server connections PgBouncer may open to PostgreSQL: fewer than the
/// clients, so they are shared.
const SERVER_CONNECTIONS: i64 = 2;
/// How long every instance may take to end, on a busy shared machine.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

/// The PgBouncer binary: `HEPHAESTUS_PGBOUNCER`, else Debian's
/// `/usr/sbin/pgbouncer` (not on a normal user's `PATH`), else the `PATH`.
fn pgbouncer_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("HEPHAESTUS_PGBOUNCER").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "HEPHAESTUS_PGBOUNCER={} is not a file",
            path.display()
        );
        return path;
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    ["/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/usr/bin"]
        .into_iter()
        .map(PathBuf::from)
        .chain(on_path)
        .map(|dir| dir.join("pgbouncer"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "PgBouncer is not installed: these tests run workers through it. Install it \
                 (Debian: `apt-get install pgbouncer`; `.ci/run` does) or set \
                 HEPHAESTUS_PGBOUNCER to its binary"
            )
        })
}

/// The password in a `postgres://user:password@host/...` URL, if any
/// (percent-encoding is not undone: the test servers' passwords are plain).
fn url_password(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let userinfo = authority.rsplit_once('@')?.0;
    userinfo
        .split_once(':')
        .map(|(_, password)| password.to_owned())
}

/// A PgBouncer process in transaction pooling in front of the test server,
/// killed when dropped.
struct PgBouncer {
    child: Mutex<Child>,
    port: u16,
    user: String,
    database: String,
    log: PathBuf,
    _dir: TempDir,
}

impl PgBouncer {
    /// Starts one on a free port and waits until it accepts connections
    /// (tried again on another port if the one picked was taken).
    async fn start() -> Self {
        let bin = pgbouncer_bin();
        let mut tries = 0;
        loop {
            tries += 1;
            let bouncer = Self::spawn(&bin);
            let child = &bouncer.child;
            let up = holds_within(SAFETY_NET, || async {
                let exited = child
                    .lock()
                    .expect("the child's lock")
                    .try_wait()
                    .expect("poll PgBouncer");
                exited.is_some()
                    || tokio::net::TcpStream::connect(("127.0.0.1", bouncer.port))
                        .await
                        .is_ok()
            })
            .await;
            let exited = child
                .lock()
                .expect("the child's lock")
                .try_wait()
                .expect("poll PgBouncer");
            match exited {
                None if up => return bouncer,
                Some(_) if tries < 3 && bouncer.log().contains("Address already in use") => {}
                _ => panic!(
                    "PgBouncer ({}) did not start ({exited:?}); its log:\n{}",
                    bin.display(),
                    bouncer.log()
                ),
            }
        }
    }

    fn spawn(bin: &std::path::Path) -> Self {
        let server = PgConnectOptions::from_str(database_url()).expect("DATABASE_URL parses");
        let host = server.get_socket().map_or_else(
            || server.get_host().to_owned(),
            |socket| socket.display().to_string(),
        );
        let user = server.get_username().to_owned();
        let database = server
            .get_database()
            .expect("DATABASE_URL names a database")
            .to_owned();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let dir = TempDir::new("pgbouncer");
        let mut target = format!(
            "host={host} port={} dbname={database} user={user}",
            server.get_port()
        );
        if let Some(password) = url_password(database_url()) {
            write!(target, " password={password}").expect("a string");
        }
        let auth_file = dir.join("users.txt");
        std::fs::write(&auth_file, format!("\"{user}\" \"\"\n")).expect("write the users file");
        let mut config = format!(
            "[databases]\n\
             {database} = {target}\n\
             \n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {}\n\
             admin_users = {user}\n\
             pool_mode = transaction\n\
             default_pool_size = {SERVER_CONNECTIONS}\n\
             max_db_connections = {SERVER_CONNECTIONS}\n\
             reserve_pool_size = 0\n\
             max_client_conn = 500\n",
            auth_file.display()
        );
        // PgBouncer refuses to run as root; it gives up root for this user
        // (the configuration is readable by all).
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if root {
            let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
            let as_user = if passwd.lines().any(|l| l.starts_with("postgres:")) {
                "postgres"
            } else {
                "nobody"
            };
            writeln!(config, "user = {as_user}").expect("a string");
        }
        let ini = dir.join("pgbouncer.ini");
        std::fs::write(&ini, config).expect("write pgbouncer.ini");
        let log = dir.join("pgbouncer.log");
        let log_file = std::fs::File::create(&log).expect("create the log");
        let child = Command::new(bin)
            .arg(&ini)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("the log twice"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        Self {
            child: Mutex::new(child),
            port,
            user,
            database,
            log,
            _dir: dir,
        }
    }

    /// The URL of the test database through PgBouncer.
    fn url(&self) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{}",
            self.user, self.port, self.database
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `show pools` for the test database, from PgBouncer's admin console:
    /// (client connections, server connections).
    async fn pool_use(&self) -> (i64, i64) {
        let url = format!("postgres://{}@127.0.0.1:{}/pgbouncer", self.user, self.port);
        let options = Pooling::Transaction
            .connect_options(PgConnectOptions::from_str(&url).expect("a valid URL"));
        let mut console = <sqlx::PgConnection as sqlx::Connection>::connect_with(&options)
            .await
            .expect("connect to the admin console");
        let rows: Vec<sqlx::postgres::PgRow> = sqlx::raw_sql("show pools")
            .fetch_all(&mut console)
            .await
            .expect("show pools");
        let int = |row: &sqlx::postgres::PgRow, column: &str| -> i64 {
            row.try_get::<i32, _>(column)
                .map(i64::from)
                .or_else(|_| row.try_get::<i64, _>(column))
                .unwrap_or_else(|e| panic!("show pools: {column}: {e}"))
        };
        let row = rows
            .iter()
            .find(|row| {
                row.try_get::<String, _>("database").ok().as_deref() == Some(&self.database)
            })
            .expect("a pool for the test database");
        let clients = ["cl_active", "cl_waiting"]
            .iter()
            .map(|c| int(row, c))
            .sum();
        let servers = ["sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"]
            .iter()
            .map(|c| int(row, c))
            .sum();
        (clients, servers)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Ok(child) = self.child.get_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A migrated schema (migrated directly, as a deployment would before its
/// workers start) with the fixture's table, and a runtime of the fixture
/// workflows connected through `bouncer` as an application's API side is.
async fn schema_and_api(bouncer: &PgBouncer) -> (TestSchema, Runtime<PgBackend>) {
    let schema = TestSchema::new().await;
    hephaestus_storage_pg::migrate(&schema.pool, &schema.prefix)
        .await
        .expect("migrate storage");
    hephaestus_queue_pg::migrate(&schema.pool, &schema.prefix)
        .await
        .expect("migrate the queue");
    fixtures::Recorder::new(schema.pool.clone(), &schema.prefix)
        .await
        .expect("create the fixture table");
    let backend = PgBackend::connect_with(
        &bouncer.url(),
        schema.prefix.clone(),
        PoolSettings::new(6).with_pooling(Pooling::Transaction),
    )
    .await
    .expect("connect through PgBouncer");
    assert_eq!(backend.pooling(), Pooling::Transaction);
    let mut builder = Runtime::builder(backend)
        .discard_handler(hephaestus_failure_handler::FailureHandler::new());
    // No step runs in this process: the workers run them.
    for workflow in fixtures::workflows(&fixtures::Recorder::detached()).expect("the fixtures") {
        builder = builder.workflow(workflow);
    }
    (schema, builder.build().expect("a runtime"))
}

/// The instances of the run: diamonds (two parallel steps) and chains, some
/// retried, two failing for good, and waiting ones the API resumes.
fn plans() -> Vec<Plan> {
    let plan = |index: usize, workflow: &'static str, script: Script| Plan {
        id: Uuid::now_v7(),
        business_value: format!("bounced{index}"),
        workflow,
        script,
    };
    let mut plans = Vec::new();
    for i in 0..24 {
        let mut script = Script {
            sleep_ms: 10,
            ..Script::default()
        };
        if i % 3 == 0 {
            script.fail.insert("Left".to_owned(), 1);
        }
        if i % 5 == 0 {
            script.fail.insert("Right".to_owned(), 2);
        }
        if i == 7 {
            script.fatal = Some("Merge".to_owned());
        }
        plans.push(plan(i, fixtures::DIAMOND, script));
    }
    for i in 24..30 {
        let mut script = Script {
            sleep_ms: 5,
            ..Script::default()
        };
        if i % 2 == 0 {
            script.fail.insert("Transform".to_owned(), 1);
        }
        if i == 29 {
            script.fatal = Some("Store".to_owned());
        }
        plans.push(plan(i, fixtures::LINEAR, script));
    }
    for i in 30..36 {
        plans.push(plan(i, fixtures::WAIT, Script::default()));
    }
    plans
}

/// Waits until `id` waits for its event, read through PgBouncer.
async fn until_waiting(runtime: &Runtime<PgBackend>, id: Uuid) {
    until_within(SETTLE_LIMIT, format!("instance {id} to wait"), || async {
        runtime
            .get(id)
            .await
            .expect("read an instance through PgBouncer")
            .is_some_and(|i| i.status == InstanceStatus::Waiting)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_and_the_api_through_pgbouncer_run_every_step_once() {
    let bouncer = PgBouncer::start().await;
    let (schema, runtime) = schema_and_api(&bouncer).await;
    let name = schema.prefix.as_str().to_owned();

    // LISTEN cannot work through transaction pooling: refused, not hung.
    let listening = runtime
        .queue_runtime()
        .expect("a discard handler")
        .poll_only(false)
        .start()
        .await;
    assert!(
        matches!(&listening, Err(QueueError::Config(m)) if m.contains("poll_only")),
        "{listening:?}"
    );

    let url = bouncer.url();
    let worker_args = ["--pgbouncer", "--poll-ms", "20", "--concurrency", "6"];
    let workers = [
        Worker::spawn_on(&url, &name, &worker_args),
        Worker::spawn_on(&url, &name, &worker_args),
    ];

    let plans = plans();
    for plan in &plans {
        runtime
            .start(
                plan.workflow,
                &plan.business_value,
                plan.script.to_input(),
                StartOptions::default().with_id(plan.id),
            )
            .await
            .unwrap_or_else(|e| panic!("start {} through PgBouncer: {e}", plan.id));
    }
    // Three more waiting instances, which the API cancels.
    let mut cancelled = Vec::new();
    for i in 0..3 {
        let started = runtime
            .start(
                fixtures::WAIT,
                &format!("cancelled{i}"),
                Script::default().to_input(),
                StartOptions::default(),
            )
            .await
            .expect("start through PgBouncer");
        cancelled.push(started.id);
    }
    for id in &cancelled {
        until_waiting(&runtime, *id).await;
        runtime
            .cancel(*id, Some("cancelled through PgBouncer".to_owned()))
            .await
            .expect("cancel through PgBouncer");
    }
    for plan in plans.iter().filter(|p| p.workflow == fixtures::WAIT) {
        until_waiting(&runtime, plan.id).await;
        runtime
            .resume(
                plan.id,
                fixtures::WAITING_STEP,
                fixtures::RESUME_EVENT,
                json!({"through": "pgbouncer"}),
            )
            .await
            .expect("resume through PgBouncer");
    }

    let ids: Vec<Uuid> = plans
        .iter()
        .map(|p| p.id)
        .chain(cancelled.clone())
        .collect();
    let ended = format!(
        "select count(*) from {} where id = any($1) and status in ('completed', 'failed', 'cancelled')",
        schema.table("hephaestus_instances")
    );
    until_within(SETTLE_LIMIT, "every instance to end", || async {
        let n: i64 = sqlx::query_scalar(&ended)
            .bind(&ids)
            .fetch_one(&schema.pool)
            .await
            .expect("count the ended instances");
        usize::try_from(n).ok() == Some(ids.len())
    })
    .await;

    // While the workers still run: their connections (and the API's) were
    // many clients of PgBouncer, which shared two server connections.
    let (clients, servers) = bouncer.pool_use().await;
    assert!(
        clients > SERVER_CONNECTIONS && servers <= SERVER_CONNECTIONS,
        "{clients} clients, {servers} server connections"
    );

    for worker in &workers {
        worker.signal("TERM");
    }
    let mut logs = String::new();
    for worker in workers {
        let (rest, success, stderr) = worker.wait();
        assert!(
            success
                && rest
                    .iter()
                    .any(|l| l.starts_with("hephaestus worker stopped")),
            "{rest:?} {stderr}"
        );
        logs.push_str(&stderr);
    }

    let executions = recorded_executions(&schema.pool, &schema.prefix).await;
    let results = recorded_results(&schema.pool, &schema.prefix).await;
    let mut problems = Vec::new();
    for plan in &plans {
        let instance = runtime
            .get(plan.id)
            .await
            .expect("read through PgBouncer")
            .expect("the instance exists");
        check_instance(
            plan,
            &instance,
            executions.get(&plan.id).map_or(&[][..], Vec::as_slice),
            &results.get(&plan.id).cloned().unwrap_or_default(),
            &mut problems,
        );
    }
    for id in &cancelled {
        let instance = runtime.get(*id).await.expect("read").expect("exists");
        if instance.status != InstanceStatus::Cancelled {
            problems.push(format!(
                "{id}: expected cancelled, got {:?}",
                instance.status
            ));
        }
        let ran: Vec<&str> = executions
            .get(id)
            .into_iter()
            .flatten()
            .map(|e| e.step.as_str())
            .collect();
        if ran != ["Prepare"] {
            problems.push(format!("{id}: cancelled while waiting, yet ran {ran:?}"));
        }
    }
    let pids: BTreeSet<u32> = executions
        .values()
        .flatten()
        .map(|e| e.worker_pid)
        .collect();
    eprintln!(
        "pgbouncer: {} step executions in workers {pids:?}; {clients} clients on {servers} server connections",
        executions.values().map(Vec::len).sum::<usize>()
    );
    if pids.len() != 2 {
        problems.push(format!(
            "steps ran in {} worker processes, not both",
            pids.len()
        ));
    }
    assert!(
        problems.is_empty(),
        "{} problems through PgBouncer:\n{}\nworker logs:\n{logs}\nPgBouncer's log:\n{}",
        problems.len(),
        problems.join("\n"),
        bouncer.log()
    );
    schema.teardown().await;
}

/// Runs `hephaestus ARGS` with `DATABASE_URL=url`; its output.
fn hephaestus(url: &str, args: &[&str]) -> std::process::Output {
    Command::new(hephaestus_bin())
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run hephaestus")
}

#[tokio::test]
async fn migrations_and_commands_run_through_pgbouncer_with_the_flag() {
    let bouncer = PgBouncer::start().await;
    let schema = TestSchema::new().await;
    let name = schema.prefix.as_str();
    let url = bouncer.url();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();

    // Without the flag: refused at once, with what to do.
    let refused = hephaestus(&url, &["migrate", "--schema", name, "up"]);
    assert!(
        !refused.status.success() && text(&refused.stderr).contains("pass --pgbouncer"),
        "{}",
        text(&refused.stderr)
    );

    let up = hephaestus(&url, &["migrate", "--pgbouncer", "--schema", name, "up"]);
    assert!(up.status.success(), "{}", text(&up.stderr));
    let status = hephaestus(
        &url,
        &[
            "migrate",
            "--pgbouncer",
            "--schema",
            name,
            "--json",
            "status",
        ],
    );
    assert!(status.status.success(), "{}", text(&status.stderr));
    let report: Value = serde_json::from_slice(&status.stdout).expect("JSON");
    let components = report["components"].as_array().expect("components");
    assert!(
        components.len() == 2 && components.iter().all(|c| c["up_to_date"] == true),
        "{report}"
    );
    // What the server holds, read directly.
    let mut direct = schema.pool.acquire().await.expect("a direct connection");
    let prefix = SchemaPrefix::new(name).expect("a valid prefix");
    assert_eq!(
        hephaestus_storage_pg::schema_version(&mut direct, &prefix)
            .await
            .expect("the storage version"),
        hephaestus_storage_pg::schema().latest()
    );
    assert_eq!(
        hephaestus_queue_pg::schema_version(&mut direct, &prefix)
            .await
            .expect("the queue version"),
        hephaestus_queue_pg::schema().latest()
    );
    drop(direct);

    for args in [
        &["instances", "list", "--pgbouncer", "--schema", name][..],
        &["jobs", "--pgbouncer", "--schema", name],
        &["prune", "--pgbouncer", "--schema", name, "--instances"],
    ] {
        let out = hephaestus(&url, args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    schema.teardown().await;
}
