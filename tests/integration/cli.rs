//! The `hephaestus` command end to end against PostgreSQL: migrate up, down
//! and status (text and JSON), gen-migration and its check, graph, and the
//! errors a user meets on a bad day (unreachable server, bad URL, unknown
//! component or workflow, a stale migrations directory).

use std::process::{Command, Output};

use serde_json::Value;

use crate::faults::hephaestus_bin;
use crate::support::db::{TestSchema, database_url};

fn hephaestus(args: &[&str]) -> Output {
    Command::new(hephaestus_bin())
        .args(args)
        .env("DATABASE_URL", database_url())
        .output()
        .expect("the hephaestus binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn status_json(schema: &str) -> Value {
    let out = hephaestus(&["migrate", "--schema", schema, "--json", "status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("one JSON object")
}

fn versions(status: &Value) -> Vec<(String, u64, u64)> {
    status["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["component"].as_str().unwrap().to_owned(),
                c["database"].as_u64().unwrap(),
                c["latest"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn migrate_up_down_and_status_move_each_component() {
    // A fresh, empty schema name of our own (TestSchema gives a unique,
    // validated prefix; nothing is migrated in it yet).
    let schema = TestSchema::new().await;
    let name = schema.prefix.as_str().to_owned();
    let latest = |c: &str| match c {
        "storage" => u64::from(hephaestus_storage_pg::schema().latest()),
        _ => u64::from(hephaestus_queue_pg::schema().latest()),
    };

    let before = versions(&status_json(&name));
    assert!(before.iter().all(|(_, db, _)| *db == 0), "{before:?}");
    let text = hephaestus(&["migrate", "--schema", &name, "status"]);
    assert!(
        stdout(&text).contains(&format!("run `hephaestus migrate --schema {name} up`")),
        "an unmigrated schema says what to run: {}",
        stdout(&text)
    );

    let up = hephaestus(&["migrate", "--schema", &name, "up"]);
    assert!(up.status.success(), "{}", stderr(&up));
    for (c, db, l) in versions(&status_json(&name)) {
        assert_eq!((db, l), (latest(&c), latest(&c)), "{c} after up");
    }
    let again = hephaestus(&["migrate", "--schema", &name, "up"]);
    assert!(
        stdout(&again).contains("already at version"),
        "{}",
        stdout(&again)
    );

    let down = hephaestus(&[
        "migrate",
        "--schema",
        &name,
        "down",
        "--to",
        "0",
        "--component",
        "queue",
    ]);
    assert!(down.status.success(), "{}", stderr(&down));
    let after = versions(&status_json(&name));
    assert!(
        after.contains(&("queue".to_owned(), 0, latest("queue"))),
        "{after:?}"
    );
    assert!(after.contains(&("storage".to_owned(), latest("storage"), latest("storage"))));
    let table: Option<String> = sqlx::query_scalar("select to_regclass($1)::text")
        .bind(format!("{}.hephaestus_jobs", schema.prefix.quoted()))
        .fetch_one(&schema.pool)
        .await
        .unwrap();
    assert_eq!(table, None, "the queue's tables are gone");

    let unknown = hephaestus(&["migrate", "--schema", &name, "up", "--component", "nope"]);
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("unknown component \"nope\""),
        "{}",
        stderr(&unknown)
    );
    schema.teardown().await;
}

#[test]
fn connection_problems_say_what_is_wrong() {
    let refused = Command::new(hephaestus_bin())
        .args([
            "migrate",
            "--database-url",
            "postgres://postgres@127.0.0.1:1/nowhere",
            "status",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("cannot connect to PostgreSQL at 127.0.0.1:1, database nowhere"),
        "{}",
        stderr(&refused)
    );
    let garbage = Command::new(hephaestus_bin())
        .args(["migrate", "--database-url", "not a url", "status"])
        .output()
        .unwrap();
    assert!(!garbage.status.success());
    assert!(
        stderr(&garbage).contains("is not a PostgreSQL URL"),
        "{}",
        stderr(&garbage)
    );
}

#[test]
fn gen_migration_writes_and_checks_the_files() {
    let dir = std::env::temp_dir().join(format!(
        "hephaestus-cli-{}",
        crate::support::db::unique_suffix()
    ));
    let dir_str = dir.to_str().unwrap().to_owned();
    let out = hephaestus(&["gen-migration", "--prefix", "billing", "--out", &dir_str]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(
        names
            .iter()
            .any(|n| n.ends_with("_hephaestus_queue_v2.up.sql")),
        "{names:?}"
    );
    let sql = std::fs::read_to_string(dir.join(&names[1])).unwrap();
    assert!(sql.contains("\"billing\"."), "rendered for the prefix");
    let check = hephaestus(&[
        "gen-migration",
        "--prefix",
        "billing",
        "--out",
        &dir_str,
        "--check",
    ]);
    assert!(check.status.success(), "{}", stderr(&check));
    std::fs::write(dir.join(&names[0]), "-- edited by hand\n").unwrap();
    let stale = hephaestus(&[
        "gen-migration",
        "--prefix",
        "billing",
        "--out",
        &dir_str,
        "--check",
    ]);
    assert!(!stale.status.success());
    assert!(stderr(&stale).contains("out of date"), "{}", stderr(&stale));
    let bad = hephaestus(&["gen-migration", "--prefix", "Bad Prefix", "--out", &dir_str]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("--prefix"), "{}", stderr(&bad));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn graph_draws_a_registered_workflow_and_names_the_others() {
    let drawn = hephaestus(&["graph", "fixture_branch"]);
    assert!(drawn.status.success(), "{}", stderr(&drawn));
    let text = stdout(&drawn);
    assert!(
        text.starts_with("fixture_branch v1\n[0]\n  Decide\n"),
        "{text}"
    );
    assert!(text.contains("      :left -> Left\n"), "{text}");
    let dot = hephaestus(&["graph", "fixture_branch", "--dot"]);
    assert!(stdout(&dot).contains("\"Decide\" -> \"Left\" [label=\":left\"];"));
    let json: Value =
        serde_json::from_str(&stdout(&hephaestus(&["graph", "fixture_branch", "--json"])))
            .expect("one JSON object");
    assert_eq!(json["workflow"], "fixture_branch");
    assert_eq!(json["version"], 1);
    assert_eq!(json["layers"][0], serde_json::json!(["Decide"]));
    assert!(
        json["edges"].as_array().unwrap().contains(
            &serde_json::json!({"from": "Decide", "event": "left", "to": "Left", "dynamic": false})
        ),
        "{json}"
    );
    let listed: Value =
        serde_json::from_str(&stdout(&hephaestus(&["graph", "--list", "--json"]))).unwrap();
    assert_eq!(
        listed[0],
        serde_json::json!({"workflow": "fixture_branch", "versions": [1], "current": 1})
    );
    assert_eq!(listed.as_array().unwrap().len(), 5);
    let unknown = hephaestus(&["graph", "nope"]);
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains(
            "no workflow \"nope\" is registered; registered: fixture_branch, fixture_diamond, fixture_linear"
        ),
        "{}",
        stderr(&unknown)
    );
}

#[tokio::test]
async fn a_worker_stops_gracefully_on_sigterm() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let schema = TestSchema::new().await;
    let mut child = Command::new(hephaestus_bin())
        .args(["worker", "--schema", schema.prefix.as_str()])
        .env("DATABASE_URL", database_url())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the worker starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines.next().expect("a ready line").unwrap();
    assert!(ready.starts_with("hephaestus worker ready"), "{ready}");
    let pid = child.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success(), "sending SIGTERM");
    // A graceful stop prints its report and exits 0 (a kill would not).
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit {status:?}, output {rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.starts_with("hephaestus worker stopped: finished in grace true")),
        "{rest:?}"
    );
    schema.teardown().await;
}

/// `bench workflow --json` prints one object with every field the
/// benchmark promises, consistent with the run it describes, and drops its
/// schema afterwards.
#[test]
fn bench_workflow_prints_one_json_object_with_its_measurements() {
    let out = hephaestus(&[
        "bench",
        "workflow",
        "--instances",
        "20",
        "--shape",
        "diamond",
        "--warm-up",
        "0",
        "--samples",
        "2",
        "--workers",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_str(&stdout(&out)).expect("one JSON object");
    assert_eq!(report["bench"], "workflow");
    assert_eq!(report["shape"], "diamond");
    assert_eq!(report["backend"], "postgres");
    assert_eq!(report["instances"], 20);
    assert_eq!(report["steps"], 200, "10 steps per diamond instance");
    assert_eq!(report["workers"], 1);
    let positive = |key: &str| {
        let value = report[key].as_f64();
        assert!(value.is_some_and(|v| v > 0.0), "{key}: {report}");
        value.unwrap()
    };
    let seconds = positive("seconds");
    let steps_per_sec = positive("steps_per_sec");
    assert!((steps_per_sec * seconds - 200.0).abs() < 1.0, "{report}");
    assert!((positive("workflows_per_sec") * seconds - 20.0).abs() < 0.1);
    for key in [
        "p50_ms",
        "p99_ms",
        "step_latency_p50_ms",
        "commits_per_step",
        "wal_bytes_per_step",
    ] {
        positive(key);
    }
    assert!(positive("p99_ms") >= positive("p50_ms"));
    assert_eq!(report["latency_samples"], 2);
    // CPU per step, where /proc is readable (Linux): the bench process
    // always; PostgreSQL when it runs on this machine.
    if std::path::Path::new("/proc/self/stat").exists() {
        assert!(
            report["cpu_us_per_step"]["bench_process"]
                .as_f64()
                .is_some_and(|v| v >= 0.0),
            "{report}"
        );
    }
}

#[tokio::test]
async fn system_schemas_are_refused_before_anything_is_created() {
    let schema = TestSchema::new().await;
    let count_tables = || async {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from pg_tables where tablename like 'hephaestus%' \
             and schemaname in ('information_schema', 'pg_catalog')",
        )
        .fetch_one(&schema.pool)
        .await
        .unwrap()
    };
    for system in ["information_schema", "pg_catalog", "pg_toast"] {
        let out = hephaestus(&["migrate", "--schema", system, "up"]);
        assert!(!out.status.success(), "{system} accepted: {}", stdout(&out));
        let err = stderr(&out);
        assert!(
            err.contains("system schema") || err.contains("reserved for PostgreSQL system schemas"),
            "{system}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    assert_eq!(count_tables().await, 0, "nothing was created there");
    schema.teardown().await;
}
