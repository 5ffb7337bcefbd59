//! A worker that stops, logs and leads safely, and an operator who cannot
//! lose data by accident (issue 14, sections 4 and 5), with real
//! `hephaestus` processes where the claim is about processes:
//!
//! - SIGTERM the instant "ready" appears, many times in a row: always a
//!   graceful stop;
//! - SIGTERM while the reconciler works through a large backlog: the worker
//!   is gone within the grace period plus a small bound;
//! - the leader SIGSTOPped: the other worker takes the lease over and
//!   rescues; the old leader, SIGCONTed, knows it lost the lease;
//! - errors are logged on stderr; refusals at start (schema ahead, pool too
//!   small, server unreachable);
//! - `migrate down` refused while instances are active, one advice for a
//!   schema ahead of the binary, a closed stdout ends a command quietly,
//!   instance retention;
//! - in process: the reconciler's page query and an undecodable instance.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hephaestus_engine_core::prelude::*;
use hephaestus_failure_handler::Reconciler;
use hephaestus_queue_pg::PgQueue;
use hephaestus_runner::postgres::PgBackend;
use hephaestus_runner::{Backend, Runtime, StartOptions};
use hephaestus_storage_pg::PgStore;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::faults::fixtures::{self, Script};
use crate::faults::hephaestus_bin;
use crate::support::db::{TestSchema, database_url};
use crate::support::worker::Worker;

/// Longest any wait in these tests may take before it is a failure.
const SAFETY_NET: Duration = Duration::from_secs(60);

/// A migrated schema and a runtime (the fixture workflows) that does not
/// run jobs unless told to.
struct Env {
    schema: TestSchema,
    runtime: Runtime<PgBackend>,
}

impl Env {
    async fn new() -> Self {
        let schema = TestSchema::new().await;
        hephaestus_storage_pg::migrate(&schema.pool, &schema.prefix)
            .await
            .unwrap();
        hephaestus_queue_pg::migrate(&schema.pool, &schema.prefix)
            .await
            .unwrap();
        let recorder = fixtures::Recorder::new(schema.pool.clone(), &schema.prefix)
            .await
            .unwrap();
        let backend = PgBackend::new(
            PgStore::new(schema.pool.clone(), schema.prefix.clone()),
            PgQueue::new(schema.pool.clone(), schema.prefix.clone()),
        );
        let mut builder = Runtime::builder(backend)
            .discard_handler(hephaestus_failure_handler::FailureHandler::new());
        for workflow in fixtures::workflows(&recorder).unwrap() {
            builder = builder.workflow(workflow);
        }
        Self {
            runtime: builder.build().unwrap(),
            schema,
        }
    }

    fn name(&self) -> &str {
        self.schema.prefix.as_str()
    }

    fn table(&self, name: &str) -> String {
        self.schema.table(name)
    }

    async fn start(&self, value: &str, input: Value) -> Uuid {
        self.runtime
            .start(fixtures::LINEAR, value, input, StartOptions::default())
            .await
            .unwrap()
            .id
    }

    async fn execute(&self, sql: &str) {
        sqlx::raw_sql(sql).execute(&self.schema.pool).await.unwrap();
    }

    async fn scalar_i64(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.schema.pool)
            .await
            .unwrap()
    }

    async fn leader(&self) -> Option<String> {
        self.runtime
            .backend()
            .queue()
            .maintenance_leader()
            .await
            .unwrap()
            .map(|(holder, _)| holder)
    }

    async fn teardown(self) {
        self.schema.teardown().await;
    }
}

/// Waits until `check` holds (the worker is another process: the database
/// and its output are all it tells); fails after [`SAFETY_NET`].
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    crate::support::wait::until_within(SAFETY_NET, what, check).await;
}

/// Runs `hephaestus ARGS` (DATABASE_URL set); its output.
fn hephaestus(args: &[&str]) -> std::process::Output {
    Command::new(hephaestus_bin())
        .args(args)
        .env("DATABASE_URL", database_url())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn sigterm_the_instant_ready_appears_is_always_a_graceful_stop() {
    let env = Env::new().await;
    for round in 0..20 {
        let mut child = Command::new(hephaestus_bin())
            .args(["worker", "--schema", env.name()])
            .env("DATABASE_URL", database_url())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines.next().expect("a ready line").unwrap();
        // No delay at all between seeing the line and signalling.
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        assert!(ready.starts_with("hephaestus worker ready"), "{ready}");
        let rest: Vec<String> = lines.map(Result::unwrap).collect();
        let status = child.wait().unwrap();
        assert!(
            status.success()
                && rest
                    .iter()
                    .any(|l| l.starts_with("hephaestus worker stopped")),
            "round {round}: {status:?}, {rest:?}"
        );
    }
    env.teardown().await;
}

#[tokio::test]
async fn sigterm_during_a_reconciler_pass_over_a_large_backlog_stops_within_the_grace() {
    let env = Env::new().await;
    // 20,000 running instances that lost their jobs: every one needs a
    // repair, so a pass has a lot to do (cloned from one real instance).
    let template = env.start("template", json!({})).await;
    let instances = env.table("hephaestus_instances");
    let jobs = env.table("hephaestus_jobs");
    env.execute(&format!(
        "insert into {instances} (id, business_id, workflow_id, workflow_version, status, state, telemetry_metadata)
         select gen_random_uuid(), 'run::b' || n, workflow_id, workflow_version, 'running', state, telemetry_metadata
         from {instances} cross join generate_series(1, 20000) as n where id = '{template}';
         delete from {jobs};"
    ))
    .await;
    let worker = Worker::spawn(
        env.name(),
        &[
            "--reconcile-ms",
            "100",
            "--grace-ms",
            "1000",
            "--poll-ms",
            "50",
        ],
    );
    // The reconciler's pass is under way: it has started repairing.
    eventually("the reconciler's first repairs", || async {
        env.scalar_i64(&format!("select count(*) from {jobs}"))
            .await
            > 0
    })
    .await;
    let asked = Instant::now();
    worker.signal("TERM");
    let (rest, success, stderr) = worker.wait();
    let took = asked.elapsed();
    assert!(success, "{rest:?} {stderr}");
    // Grace 1 s, cancel wait 1 s, plus a bound for closing.
    assert!(
        took < Duration::from_secs(6),
        "the worker took {took:?} to stop ({rest:?})"
    );
    let repaired = env
        .scalar_i64(&format!("select count(*) from {jobs}"))
        .await;
    assert!(
        repaired < 20_001,
        "the pass was cut short, not finished: {repaired}"
    );
    env.teardown().await;
}

#[tokio::test]
async fn a_stopped_leader_is_replaced_and_rescue_goes_on_and_it_does_not_lead_when_back() {
    let env = Env::new().await;
    // A lease of 3 s renewed every 200 ms: short for the test, long enough
    // that a healthy leader on a busy machine keeps it.
    let fast = [
        "--elect-ms",
        "200",
        "--leader-ttl-ms",
        "3000",
        "--heartbeat-ms",
        "200",
        "--stale-after-ms",
        "1000",
        "--rescue-interval-ms",
        "100",
    ];
    let first = Worker::spawn(env.name(), &fast);
    eventually("the first worker to lead", || async {
        env.leader().await.as_deref() == Some(first.id.as_str())
    })
    .await;
    let second = Worker::spawn(env.name(), &fast);
    first.signal("STOP");
    // A job whose worker died long ago: only a leader rescues it.
    let jobs = env.table("hephaestus_jobs");
    let stale = |label: &str| {
        format!(
            "insert into {jobs} (state, queue, kind, args, attempt, max_attempts, attempted_at, attempted_by, heartbeat_at)
             values ('executing', 'nobody', 'test.stale', '{{\"label\": \"{label}\"}}', 1, 5,
                     now() - interval '1 hour', 'ghost', now() - interval '1 hour')"
        )
    };
    env.execute(&stale("while stopped")).await;
    let rescued = |label: &'static str| {
        let sql = format!(
            "select count(*) from {jobs} where args ->> 'label' = '{label}' and state = 'retryable'"
        );
        let env = &env;
        move || {
            let sql = sql.clone();
            async move { env.scalar_i64(&sql).await == 1 }
        }
    };
    eventually(
        "the stale job rescued while the leader is stopped",
        rescued("while stopped"),
    )
    .await;
    assert_eq!(env.leader().await.as_deref(), Some(second.id.as_str()));

    first.signal("CONT");
    eventually("the old leader to notice it lost the lease", || async {
        first.stderr().contains("lost the maintenance lease")
    })
    .await;
    env.execute(&stale("after the return")).await;
    eventually(
        "a stale job rescued after the old leader returned",
        rescued("after the return"),
    )
    .await;
    assert_eq!(
        env.leader().await.as_deref(),
        Some(second.id.as_str()),
        "the old leader did not take the lease back"
    );
    assert_eq!(
        first
            .stderr()
            .matches("became the maintenance leader")
            .count(),
        1,
        "{}",
        first.stderr()
    );
    for worker in [first, second] {
        worker.signal("TERM");
        let (rest, success, stderr) = worker.wait();
        assert!(success, "{rest:?} {stderr}");
    }
    env.teardown().await;
}

#[tokio::test]
async fn a_worker_logs_errors_on_stderr() {
    let env = Env::new().await;
    let worker = Worker::spawn(env.name(), &["--poll-ms", "50"]);
    // Every fetch fails from now on.
    env.execute(&format!(
        "alter table {} rename to hephaestus_jobs_gone",
        env.table("hephaestus_jobs")
    ))
    .await;
    eventually("the failed fetch logged", || async {
        worker.stderr().contains("fetching jobs failed")
    })
    .await;
    assert!(worker.stderr().contains("WARN"), "{}", worker.stderr());
    worker.signal("KILL");
    drop(worker);
    env.teardown().await;
}

#[tokio::test]
async fn a_worker_refuses_what_cannot_work_at_start() {
    let env = Env::new().await;
    let worker = |extra: &[&str]| {
        Command::new(hephaestus_bin())
            .args(["worker", "--schema", env.name()])
            .args(extra)
            .env("DATABASE_URL", database_url())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // A pool that cannot hold the LISTEN connection plus one.
    let small = worker(&["--max-connections", "1"]);
    assert!(!small.status.success());
    assert!(
        text(&small.stderr).contains("at least 2") && !text(&small.stdout).contains("ready"),
        "{}",
        text(&small.stderr)
    );
    // An unreachable server: fast, with the cause.
    let started = Instant::now();
    let refused = worker(&["--database-url", "postgres://postgres@127.0.0.1:1/nowhere"]);
    assert!(!refused.status.success());
    assert!(started.elapsed() < Duration::from_secs(8));
    let stderr = text(&refused.stderr).to_lowercase();
    assert!(
        stderr.contains("cannot connect to postgresql at 127.0.0.1:1")
            && stderr.contains("refused"),
        "{stderr}"
    );
    // The other commands too.
    let started = Instant::now();
    let listed = hephaestus(&[
        "instances",
        "list",
        "--database-url",
        "postgres://postgres@127.0.0.1:1/nowhere",
    ]);
    assert!(!listed.status.success());
    assert!(started.elapsed() < Duration::from_secs(8));
    assert!(
        text(&listed.stderr).contains("Connection refused"),
        "{}",
        text(&listed.stderr)
    );
    // A schema a newer version migrated.
    env.execute(&format!(
        "update {} set version = 99 where component = 'queue'",
        env.table("hephaestus_schema_versions")
    ))
    .await;
    let ahead = worker(&[]);
    assert!(!ahead.status.success());
    assert!(
        text(&ahead.stderr).contains("is ahead of this build (queue is at version 99")
            && !text(&ahead.stdout).contains("ready"),
        "{}",
        text(&ahead.stderr)
    );
    env.teardown().await;
}

#[tokio::test]
async fn migrate_down_is_refused_while_instances_are_active_unless_forced() {
    let env = Env::new().await;
    let s = env.name().to_owned();
    env.start("active", json!({})).await;
    let refused = hephaestus(&["migrate", "--schema", &s, "down", "--to", "0"]);
    assert!(!refused.status.success());
    let message = text(&refused.stderr);
    assert!(
        message.contains("refusing to migrate schema")
            && message.contains("1 instances are active")
            && message.contains("--force"),
        "{message}"
    );
    assert_eq!(
        env.scalar_i64(&format!(
            "select count(*) from {}",
            env.table("hephaestus_instances")
        ))
        .await,
        1,
        "nothing was dropped"
    );
    // A live worker (the lease) counts too, even with no active instance.
    env.execute(&format!(
        "update {} set status = 'cancelled'",
        env.table("hephaestus_instances")
    ))
    .await;
    let worker = Worker::spawn(&s, &[]);
    let with_worker = hephaestus(&[
        "migrate",
        "--schema",
        &s,
        "down",
        "--component",
        "queue",
        "--to",
        "2",
    ]);
    assert!(
        text(&with_worker.stderr).contains(&format!("worker {} is alive", worker.id)),
        "{}",
        text(&with_worker.stderr)
    );
    worker.signal("TERM");
    assert!(worker.wait().1);
    let forced = hephaestus(&["migrate", "--schema", &s, "down", "--to", "0", "--force"]);
    assert!(forced.status.success(), "{}", text(&forced.stderr));
    env.teardown().await;
}

#[tokio::test]
async fn a_schema_ahead_of_the_binary_gets_one_advice_from_every_command() {
    let env = Env::new().await;
    let s = env.name().to_owned();
    env.execute(&format!(
        "update {} set version = 3 + 1 where component = 'queue'",
        env.table("hephaestus_schema_versions")
    ))
    .await;
    for args in [
        vec!["migrate", "--schema", &s, "up"],
        vec!["migrate", "--schema", &s, "down", "--to", "1"],
        vec!["instances", "list", "--schema", &s],
    ] {
        let out = hephaestus(&args);
        assert!(!out.status.success(), "{args:?}");
        let message = text(&out.stderr);
        assert!(
            message.contains("is ahead of this build (queue is at version 4, this build knows 3)")
                && message.contains("a newer hephaestus migrated it")
                && !message.contains("unknown version"),
            "{args:?}: {message}"
        );
    }
    let status = hephaestus(&["migrate", "--schema", &s, "status"]);
    assert!(
        text(&status.stdout).contains("a newer hephaestus migrated it"),
        "{}",
        text(&status.stdout)
    );
    env.teardown().await;
}

#[tokio::test]
async fn commands_writing_into_a_closed_pipe_end_quietly() {
    use std::os::unix::process::ExitStatusExt as _;

    let env = Env::new().await;
    let s = env.name().to_owned();
    env.start("one", json!({})).await;
    for args in [
        vec!["instances", "list", "--schema", &s],
        vec!["jobs", "--schema", &s],
        vec!["migrate", "--schema", &s, "status"],
    ] {
        let mut child = Command::new(hephaestus_bin())
            .args(&args)
            .env("DATABASE_URL", database_url())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before the command has connected, let alone
        // printed (as `| head` does after its lines).
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = text(&out.stderr);
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
        assert!(
            out.status.success() || out.status.signal() == Some(13),
            "{args:?}: {:?}",
            out.status
        );
    }
    env.teardown().await;
}

#[tokio::test]
async fn prune_instances_deletes_finished_ones_with_their_results_and_jobs_never_active_ones() {
    let env = Env::new().await;
    let s = env.name().to_owned();
    let done = env.start("done", json!({})).await;
    let fatal = Script {
        fatal: Some("Store".to_owned()),
        ..Script::default()
    }
    .to_input();
    let failed = env.start("failed", fatal).await;
    env.runtime.drain().await.unwrap();
    let recent = env.start("recent", json!({})).await;
    env.runtime.drain().await.unwrap();
    let active = env.start("active", json!({})).await;
    for (id, status) in [
        (done, InstanceStatus::Completed),
        (failed, InstanceStatus::Failed),
        (recent, InstanceStatus::Completed),
    ] {
        assert_eq!(env.runtime.get(id).await.unwrap().unwrap().status, status);
    }
    let instances = env.table("hephaestus_instances");
    let results = env.table("hephaestus_step_results");
    let jobs = env.table("hephaestus_jobs");
    // Everything but `recent` ended (or started) 40 days ago.
    env.execute(&format!(
        "update {instances} set updated_at = now() - interval '40 days' where id <> '{recent}'"
    ))
    .await;
    let count = |table: &str, id: Uuid| {
        let column = if table == jobs {
            "group_key"
        } else {
            "instance_id"
        };
        format!("select count(*) from {table} where {column} = '{id}'")
    };
    assert!(env.scalar_i64(&count(&results, done)).await > 0);
    assert!(env.scalar_i64(&count(&jobs, done)).await > 0);

    let out = hephaestus(&[
        "prune",
        "--schema",
        &s,
        "--instances",
        "--older-than",
        "30d",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["instances"], 2, "{report}");
    for gone in [done, failed] {
        assert!(env.runtime.get(gone).await.unwrap().is_none());
        assert_eq!(env.scalar_i64(&count(&results, gone)).await, 0);
        assert_eq!(env.scalar_i64(&count(&jobs, gone)).await, 0);
    }
    for kept in [recent, active] {
        assert!(env.runtime.get(kept).await.unwrap().is_some());
    }
    assert!(
        env.scalar_i64(&count(&jobs, active)).await > 0,
        "an active instance keeps its jobs"
    );
    env.teardown().await;
}

#[tokio::test]
async fn the_reconciler_finds_candidates_in_one_page_and_skips_an_undecodable_instance() {
    let env = Env::new().await;
    let healthy = env.start("healthy", json!({})).await;
    let lost = env.start("lost", json!({})).await;
    let corrupt = env.start("corrupt", json!({})).await;
    let jobs = env.table("hephaestus_jobs");
    env.execute(&format!(
        "delete from {jobs} where group_key in ('{lost}', '{corrupt}')"
    ))
    .await;
    // Its history is not a list: the instance cannot be decoded.
    env.execute(&format!(
        "update {} set state = jsonb_set(state, '{{history}}', '\"garbage\"') where id = '{corrupt}'",
        env.table("hephaestus_instances")
    ))
    .await;
    let mut page: Vec<(Uuid, bool)> = env
        .runtime
        .backend()
        .reconcile_page(None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|row| (row.id, row.candidate))
        .collect();
    page.sort();
    let mut expected = vec![(healthy, false), (lost, true), (corrupt, true)];
    expected.sort();
    assert_eq!(page, expected, "one statement flags the instances to check");

    let active_step = env
        .runtime
        .get(lost)
        .await
        .unwrap()
        .unwrap()
        .steps
        .iter()
        .find(|(_, state)| state.status == StepStatus::Active)
        .map(|(step, _)| step.to_string())
        .expect("the lost instance has an active step");
    let report = Reconciler::new(env.runtime.clone())
        .run_once()
        .await
        .unwrap();
    assert_eq!(report.scanned, 3);
    assert_eq!(report.undecodable.len(), 1, "{report:?}");
    assert_eq!(report.undecodable[0].0, corrupt);
    assert!(!report.undecodable[0].1.is_empty());
    assert_eq!(
        report.repaired,
        vec![hephaestus_failure_handler::Repair::Execute {
            instance_id: lost,
            step: active_step.clone(),
            activation: 1,
        }],
        "the pass went on past the undecodable instance"
    );
    env.teardown().await;
}

/// What PgBouncer's transaction mode allows: no LISTEN, no session lock.
/// A poll-only worker still leads (the lease is plain statements) and runs
/// the work.
#[tokio::test]
async fn a_poll_only_worker_leads_and_runs_instances() {
    let env = Env::new().await;
    let worker = Worker::spawn(env.name(), &["--poll-only", "--poll-ms", "50"]);
    eventually("the poll-only worker to lead", || async {
        env.leader().await.as_deref() == Some(worker.id.as_str())
    })
    .await;
    let id = env.start("polled", json!({})).await;
    eventually("the instance to complete", || async {
        env.runtime.get(id).await.unwrap().unwrap().status == InstanceStatus::Completed
    })
    .await;
    worker.signal("TERM");
    let (rest, success, stderr) = worker.wait();
    assert!(success, "{rest:?} {stderr}");
    assert_eq!(
        env.leader().await,
        None,
        "the lease was given up on the way out"
    );
    env.teardown().await;
}

/// The page query applies every rule of the reconciler's check on
/// PostgreSQL: a lost timer, and a recorded result whose advance was lost
/// (an advance, not a second execution).
#[tokio::test]
async fn the_reconciler_page_query_finds_lost_timers_and_unapplied_results() {
    use hephaestus_engine_core::ports::{
        NewStepResult, ResultPayload, StepResultStore as _, UnitOfWork as _,
    };
    use hephaestus_engine_core::step::EventName;
    use hephaestus_failure_handler::Repair;

    let env = Env::new().await;
    let timed = env
        .runtime
        .start(fixtures::TIMER, "timed", json!({}), StartOptions::default())
        .await
        .unwrap()
        .id;
    env.runtime.drain().await.unwrap();
    let waiting = env.runtime.get(timed).await.unwrap().unwrap();
    let (timer_step, timer_state) = waiting
        .steps
        .iter()
        .find(|(_, state)| state.timer.is_some())
        .expect("a step waits on its timer");
    let (timer_step, timer_activation) = (timer_step.to_string(), timer_state.activation);
    let unapplied = env.start("unapplied", json!({})).await;
    let step = env
        .runtime
        .get(unapplied)
        .await
        .unwrap()
        .unwrap()
        .steps
        .iter()
        .find(|(_, state)| state.status == StepStatus::Active)
        .map(|(step, _)| step.clone())
        .unwrap();
    let backend = env.runtime.backend();
    let mut tx = backend.begin().await.unwrap();
    backend
        .record(
            &mut tx,
            &NewStepResult {
                instance_id: unapplied,
                step: Some(step),
                activation: 1,
                payload: ResultPayload::Completed {
                    event: EventName("done".to_owned()),
                    output: json!({}),
                    metadata: serde_json::Map::new(),
                },
            },
        )
        .await
        .unwrap();
    backend.commit(tx).await.unwrap();
    // Both lose every job.
    env.execute(&format!(
        "delete from {} where group_key in ('{timed}', '{unapplied}')",
        env.table("hephaestus_jobs")
    ))
    .await;

    let mut report = Reconciler::new(env.runtime.clone())
        .run_once()
        .await
        .unwrap();
    report.repaired.sort_by_key(|r| format!("{r:?}"));
    let mut expected = vec![
        Repair::Advance {
            instance_id: unapplied,
            status: InstanceStatus::Running,
            pending_results: 1,
        },
        Repair::Timer {
            instance_id: timed,
            step: timer_step,
            activation: timer_activation,
        },
    ];
    expected.sort_by_key(|r| format!("{r:?}"));
    assert_eq!(report.repaired, expected);
    // Repaired: nothing is flagged any more.
    let page = backend.reconcile_page(None, 100).await.unwrap();
    assert!(page.iter().all(|row| !row.candidate), "{page:?}");
    env.teardown().await;
}
