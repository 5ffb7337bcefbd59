//! The operator's commands of `hephaestus` end to end against PostgreSQL:
//! `instances list` (every filter, keyset paging), `instances show` (the DAG
//! with step states, attempts, jobs and history; JSON), `instances resume`,
//! `instances cancel`, `instances retry` (a failed instance restarted, then
//! completed), `jobs`, `prune`, `demo`, and the errors of a bad day
//! (unreachable server, bad URL, unmigrated schema, unknown instance,
//! workflows the binary does not register, bad JSON payload, retry of an
//! instance that is not failed, bad arguments).
//!
//! Instances are started and their jobs run in this process, by a runtime
//! with the same fixture workflows as the binary (`faults::fixtures`) plus
//! two the binary does not know; the binary only reads and steers them.

use std::time::Duration;

use assert_cmd::assert::Assert;
use chrono::{SecondsFormat, Utc};
use hephaestus_engine_core::prelude::*;
use hephaestus_engine_core::steps::{Done, FnStep, WaitForEvent};
use hephaestus_queue_pg::PgQueue;
use hephaestus_runner::postgres::PgBackend;
use hephaestus_runner::testing::ManualClock;
use hephaestus_runner::{Runtime, StartOptions};
use hephaestus_storage_pg::PgStore;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::faults::fixtures::{self, Script};
use crate::faults::hephaestus_bin;
use crate::support::db::{TestSchema, database_url};

/// A workflow the `hephaestus` binary does not register: it waits.
const UNKNOWN_WAIT: &str = "test_unknown";
/// Another one: it fails.
const UNKNOWN_FAIL: &str = "test_unknown_fail";

fn unknown_workflows() -> Vec<Workflow> {
    let wait = Workflow::builder(UNKNOWN_WAIT)
        .unique("run", Scope::Workflow)
        .start(WaitForEvent)
        .on(WaitForEvent, "received", Done)
        .build()
        .unwrap();
    let boom = FnStep::new("Boom", ["done"], |_| StepOutcome::fatal("boom"));
    let fail = Workflow::builder(UNKNOWN_FAIL)
        .unique("run", Scope::Workflow)
        .start(boom.clone())
        .on(boom, "done", Done)
        .build()
        .unwrap();
    vec![wait, fail]
}

/// A migrated schema and a runtime that runs the jobs of its instances.
struct Env {
    schema: TestSchema,
    runtime: Runtime<PgBackend>,
    clock: Option<ManualClock>,
}

impl Env {
    /// With the system clock.
    async fn new() -> Self {
        Self::with_clock(None).await
    }

    /// With `clock` as the queue's and the runtime's clock (retry delays
    /// pass when the test says so).
    async fn with_clock(clock: Option<ManualClock>) -> Self {
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
        let mut backend = PgBackend::new(
            PgStore::new(schema.pool.clone(), schema.prefix.clone()),
            PgQueue::new(schema.pool.clone(), schema.prefix.clone()),
        );
        if let Some(clock) = &clock {
            backend = backend.with_clock(clock.clone());
        }
        let mut builder = Runtime::builder(backend)
            .discard_handler(hephaestus_failure_handler::FailureHandler::new());
        if let Some(clock) = &clock {
            builder = builder.clock(clock.clone());
        }
        for workflow in fixtures::workflows(&recorder)
            .unwrap()
            .into_iter()
            .chain(unknown_workflows())
        {
            builder = builder.workflow(workflow);
        }
        Self {
            runtime: builder.build().unwrap(),
            schema,
            clock,
        }
    }

    fn name(&self) -> &str {
        self.schema.prefix.as_str()
    }

    async fn start(&self, workflow: &str, value: &str, input: Value) -> Uuid {
        self.runtime
            .start(workflow, value, input, StartOptions::default())
            .await
            .unwrap()
            .id
    }

    /// Runs jobs until `id` no longer runs (waiting, or ended); with a
    /// virtual clock, moves it past each retry delay in between.
    async fn settle(&self, id: Uuid) -> Instance {
        for _ in 0..40 {
            self.runtime.drain().await.unwrap();
            let instance = self.runtime.get(id).await.unwrap().unwrap();
            if !matches!(
                instance.status,
                InstanceStatus::Pending | InstanceStatus::Running
            ) {
                return instance;
            }
            match &self.clock {
                Some(clock) => clock.advance(fixtures::RETRY_DELAY),
                None => panic!("{id} still {} after a drain", instance.status),
            }
        }
        panic!("{id} did not settle");
    }

    async fn status(&self, id: Uuid) -> InstanceStatus {
        self.runtime.get(id).await.unwrap().unwrap().status
    }

    async fn teardown(self) {
        self.schema.teardown().await;
    }
}

/// Runs `hephaestus ARGS --schema SCHEMA` (DATABASE_URL set).
fn run(schema: &str, args: &[&str]) -> Assert {
    assert_cmd::Command::new(hephaestus_bin())
        .args(args)
        .args(["--schema", schema])
        .env("DATABASE_URL", database_url())
        .assert()
}

/// Runs a command that must succeed; its stdout.
fn ok(schema: &str, args: &[&str]) -> String {
    stdout(&run(schema, args).success())
}

/// Runs a `--json` command that must succeed; its one JSON value.
fn json_of(schema: &str, args: &[&str]) -> Value {
    let out = ok(schema, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not one JSON value ({e}): {out}"))
}

/// Runs a command that must fail with exit code 1; its stderr.
fn fails(schema: &str, args: &[&str]) -> String {
    stderr(&run(schema, args).code(1))
}

fn stdout(assert: &Assert) -> String {
    String::from_utf8_lossy(&assert.get_output().stdout).into_owned()
}

fn stderr(assert: &Assert) -> String {
    String::from_utf8_lossy(&assert.get_output().stderr).into_owned()
}

fn ids(listing: &Value) -> Vec<String> {
    listing["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn fatal_at(step: &str) -> Value {
    Script {
        fatal: Some(step.to_owned()),
        ..Script::default()
    }
    .to_input()
}

#[tokio::test]
async fn instances_list_filters_by_workflow_status_business_id_and_time_and_pages() {
    let env = Env::new().await;
    let s = env.name().to_owned();
    // Batch one: two linear instances (one fails), one waiting.
    let l1 = env.start(fixtures::LINEAR, "l1", json!({})).await;
    let l2 = env.start(fixtures::LINEAR, "l2", fatal_at("Store")).await;
    let w1 = env.start(fixtures::WAIT, "w1", json!({})).await;
    for id in [l1, l2, w1] {
        env.settle(id).await;
    }
    // Batch two, created later: one linear, two waiting.
    let l3 = env.start(fixtures::LINEAR, "l3", json!({})).await;
    let w2 = env.start(fixtures::WAIT, "w2", json!({})).await;
    let w3 = env.start(fixtures::WAIT, "w3", json!({})).await;
    for id in [l3, w2, w3] {
        env.settle(id).await;
    }
    let all: Vec<String> = [l1, l2, w1, l3, w2, w3]
        .iter()
        .map(ToString::to_string)
        .collect();

    let listed = json_of(&s, &["instances", "list", "--json"]);
    assert_eq!(
        ids(&listed),
        all.iter().rev().cloned().collect::<Vec<_>>(),
        "newest first"
    );
    assert_eq!(listed["next"], Value::Null);
    let first = &listed["instances"][5];
    assert_eq!(first["business_id"], "run::l1");
    assert_eq!(first["workflow"], fixtures::LINEAR);
    assert_eq!(first["version"], 1);
    assert_eq!(first["status"], "completed");

    let waits = json_of(
        &s,
        &["instances", "list", "--workflow", fixtures::WAIT, "--json"],
    );
    assert_eq!(
        sorted(ids(&waits)),
        sorted(vec![w1.to_string(), w2.to_string(), w3.to_string()])
    );
    let failed = json_of(&s, &["instances", "list", "--status", "failed", "--json"]);
    assert_eq!(ids(&failed), vec![l2.to_string()]);
    assert_eq!(failed["instances"][0]["failed_step"], "Store");
    let some = json_of(
        &s,
        &[
            "instances",
            "list",
            "--status",
            "failed,completed",
            "--json",
        ],
    );
    assert_eq!(
        sorted(ids(&some)),
        sorted(vec![l1.to_string(), l2.to_string(), l3.to_string()])
    );
    let repeated = json_of(
        &s,
        &[
            "instances",
            "list",
            "--status",
            "failed",
            "--status",
            "waiting",
            "--json",
        ],
    );
    assert_eq!(ids(&repeated).len(), 4);
    let by_business = json_of(
        &s,
        &["instances", "list", "--business-id", "run::w2", "--json"],
    );
    assert_eq!(ids(&by_business), vec![w2.to_string()]);

    // The time range: batch two starts at l3's creation (to the microsecond,
    // as stored), strictly after every instance of batch one.
    let boundary = env
        .runtime
        .get(l3)
        .await
        .unwrap()
        .unwrap()
        .created_at
        .to_rfc3339_opts(SecondsFormat::Micros, true);
    let since = json_of(&s, &["instances", "list", "--since", &boundary, "--json"]);
    assert_eq!(
        sorted(ids(&since)),
        sorted(vec![l3.to_string(), w2.to_string(), w3.to_string()])
    );
    let until = json_of(&s, &["instances", "list", "--until", &boundary, "--json"]);
    assert_eq!(
        sorted(ids(&until)),
        sorted(vec![l1.to_string(), l2.to_string(), w1.to_string()])
    );
    let combined = json_of(
        &s,
        &[
            "instances",
            "list",
            "--since",
            &boundary,
            "--workflow",
            fixtures::WAIT,
            "--status",
            "waiting",
            "--json",
        ],
    );
    assert_eq!(
        sorted(ids(&combined)),
        sorted(vec![w2.to_string(), w3.to_string()])
    );

    // Keyset pages of two, following `next`, cover everything once in order.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..4 {
        let mut args = vec!["instances", "list", "--limit", "2", "--json"];
        if let Some(cursor) = &after {
            args.extend(["--after", cursor.as_str()]);
        }
        let page = json_of(&s, &args);
        assert!(ids(&page).len() <= 2);
        seen.extend(ids(&page));
        match page["next"].as_str() {
            Some(next) => {
                assert_eq!(
                    Some(next),
                    seen.last().map(String::as_str),
                    "the cursor is the last id"
                );
                after = Some(next.to_owned());
            }
            None => break,
        }
    }
    assert_eq!(seen, all.iter().rev().cloned().collect::<Vec<_>>());

    // The text form: a table and the cursor to go on with.
    let text = ok(&s, &["instances", "list", "--limit", "2"]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("ID"), "{text}");
    assert!(
        lines[0].contains("STATUS") && lines[0].contains("BUSINESS ID"),
        "{text}"
    );
    assert!(
        lines[1].starts_with(&w3.to_string()) && lines[1].contains("waiting"),
        "{text}"
    );
    assert!(
        lines[1].contains("fixture_wait v1") && lines[1].contains("run::w3"),
        "{text}"
    );
    assert_eq!(
        lines[3],
        format!("2 shown; next page: --after {w2}"),
        "{text}"
    );
    let empty = ok(&s, &["instances", "list", "--business-id", "run::nobody"]);
    assert_eq!(empty, "no instances match\n");
    env.teardown().await;
}

#[tokio::test]
async fn instances_show_draws_the_dag_with_states_attempts_jobs_and_history() {
    let clock = ManualClock::new(Utc::now());
    let env = Env::with_clock(Some(clock)).await;
    let s = env.name().to_owned();
    // Transform fails twice (retryable) then completes; Store fails for good.
    let script = Script {
        fail: [("Transform".to_owned(), 2)].into(),
        fatal: Some("Store".to_owned()),
        ..Script::default()
    };
    let id = env
        .start(fixtures::LINEAR, "shown", script.to_input())
        .await;
    let failed = env.settle(id).await;
    assert_eq!(failed.status, InstanceStatus::Failed);

    let text = ok(&s, &["instances", "show", &id.to_string()]);
    for expected in [
        format!("instance     {id}\n"),
        "business id  run::shown\n".to_owned(),
        "workflow     fixture_linear v1\n".to_owned(),
        "status       failed\n".to_owned(),
        "failure      step Store (activation 1) at ".to_owned(),
        "DAG (from the definition):\nfixture_linear v1\n[0]\n  Fetch  [done]\n      output: {\"attempt\":1,".to_owned(),
        "      :done -> Transform [taken]\n[1]\n  Transform  [done]\n".to_owned(),
        "      attempt 1 (activation 1, job #".to_owned(),
        "Transform: scripted failure of attempt 1 [retryable]\n".to_owned(),
        "Transform: scripted failure of attempt 2 [retryable]\n".to_owned(),
        "  Store  [failed]\n      error: Store: scripted fatal failure [fatal]\n".to_owned(),
        "      :done -> hephaestus::Done\n[3]\n  hephaestus::Done  [pending]\n".to_owned(),
        "hephaestus.execute Store#1 discarded attempt 1/12\n".to_owned(),
        "history:\n".to_owned(),
        "  Fetch#1  completed with :done\n".to_owned(),
        "  Store#1  failed: Store: scripted fatal failure\n".to_owned(),
    ] {
        assert!(text.contains(&expected), "missing {expected:?} in\n{text}");
    }
    assert!(
        !text.contains(":done -> hephaestus::Done [taken]"),
        "Store did not complete: {text}"
    );
    // The business id names the same instance.
    let by_business = ok(&s, &["instances", "show", "run::shown"]);
    assert!(
        by_business.starts_with(&format!("instance     {id}\n")),
        "{by_business}"
    );

    let shown = json_of(&s, &["instances", "show", &id.to_string(), "--json"]);
    assert_eq!(shown["id"], id.to_string());
    assert_eq!(shown["business_id"], "run::shown");
    assert_eq!(shown["workflow"], fixtures::LINEAR);
    assert_eq!(shown["version"], 1);
    assert_eq!(shown["status"], "failed");
    assert_eq!(shown["definition_known"], true);
    assert_eq!(shown["dag"]["source"], "definition");
    assert_eq!(
        shown["dag"]["layers"],
        json!([["Fetch"], ["Transform"], ["Store"], ["hephaestus::Done"]])
    );
    assert!(
        shown["dag"]["edges"]
            .as_array()
            .unwrap()
            .contains(&json!({"from": "Fetch", "event": "done", "to": "Transform", "dynamic": false, "taken": true}))
    );
    let step = |name: &str| -> Value {
        shown["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["step"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no step {name}"))
    };
    let states: Vec<&str> = shown["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, vec!["done", "done", "failed", "pending"]);
    assert_eq!(step("Transform")["output"]["attempt"], 3);
    let attempts = step("Transform")["attempts"].as_array().unwrap().clone();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["attempt"], 1);
    assert_eq!(attempts[0]["error_kind"], "retryable");
    assert_eq!(
        attempts[1]["message"],
        "Transform: scripted failure of attempt 2"
    );
    assert_eq!(attempts[0]["job_kind"], "hephaestus.execute");
    assert_eq!(step("Store")["error"], "Store: scripted fatal failure");
    assert_eq!(step("Store")["attempts"][0]["error_kind"], "fatal");
    assert_eq!(step("hephaestus::Done")["activation"], Value::Null);
    assert_eq!(shown["failure"]["step"], "Store");
    assert_eq!(
        shown["failure"]["error"]["message"],
        "Store: scripted fatal failure"
    );
    let kinds: Vec<&str> = shown["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["started", "completed", "completed", "failed"]);
    let jobs = shown["jobs"].as_array().unwrap();
    assert!(
        jobs.iter().any(|j| j["kind"] == "hephaestus.execute"
            && j["step"] == "Store"
            && j["state"] == "discarded"
            && j["errors"][0]["message"] == "Store: scripted fatal failure"),
        "{jobs:?}"
    );
    assert_eq!(shown["context"]["initial"], script.to_input());
    env.teardown().await;
}

#[tokio::test]
async fn resume_cancel_and_retry_steer_instances_through_the_runner() {
    let env = Env::new().await;
    let s = env.name().to_owned();

    // Resume a waiting step, by id and by business id.
    let w1 = env.start(fixtures::WAIT, "w1", json!({})).await;
    let w2 = env.start(fixtures::WAIT, "w2", json!({})).await;
    for id in [w1, w2] {
        assert_eq!(env.settle(id).await.status, InstanceStatus::Waiting);
    }
    let resumed = ok(
        &s,
        &[
            "instances",
            "resume",
            &w1.to_string(),
            fixtures::WAITING_STEP,
            fixtures::RESUME_EVENT,
            "--payload",
            r#"{"by": "cli"}"#,
        ],
    );
    assert_eq!(
        resumed,
        format!(
            "resumed step hephaestus::WaitForEvent of instance {w1} with :received; a worker applies it\n"
        )
    );
    let done = env.settle(w1).await;
    assert_eq!(done.status, InstanceStatus::Completed);
    assert_eq!(
        done.context.step("wait_for_event"),
        Some(&json!({"by": "cli"}))
    );
    let by_business = json_of(
        &s,
        &[
            "instances",
            "resume",
            "run::w2",
            fixtures::WAITING_STEP,
            "received",
            "--json",
        ],
    );
    assert_eq!(by_business["instance"], w2.to_string());
    assert_eq!(env.settle(w2).await.status, InstanceStatus::Completed);

    // A resume the step does not accept, and one of a finished instance.
    let w3 = env.start(fixtures::WAIT, "w3", json!({})).await;
    env.settle(w3).await;
    let undeclared = fails(
        &s,
        &[
            "instances",
            "resume",
            &w3.to_string(),
            fixtures::WAITING_STEP,
            "nope",
        ],
    );
    assert!(
        undeclared.contains(&format!(
            "cannot resume step hephaestus::WaitForEvent of instance {w3} with :nope"
        )) && undeclared.contains("does not declare event :nope"),
        "{undeclared}"
    );
    let finished = fails(
        &s,
        &[
            "instances",
            "resume",
            &w1.to_string(),
            fixtures::WAITING_STEP,
            "received",
        ],
    );
    assert!(finished.contains("instance is completed"), "{finished}");

    // Cancel, with a reason kept in the history; cancelling again is refused.
    let cancelled = ok(
        &s,
        &[
            "instances",
            "cancel",
            &w3.to_string(),
            "--reason",
            "operator says no",
        ],
    );
    assert_eq!(
        cancelled,
        format!("cancelled instance {w3} (operator says no)\n")
    );
    assert_eq!(env.status(w3).await, InstanceStatus::Cancelled);
    let shown = ok(&s, &["instances", "show", &w3.to_string()]);
    assert!(shown.contains("status       cancelled\n"), "{shown}");
    assert!(shown.contains("  cancelled: operator says no\n"), "{shown}");
    assert!(
        shown.contains("  hephaestus::WaitForEvent  [cancelled]\n"),
        "{shown}"
    );
    let again = fails(&s, &["instances", "cancel", &w3.to_string()]);
    assert!(
        again.contains(&format!("cannot cancel instance {w3}"))
            && again.contains("instance is cancelled"),
        "{again}"
    );

    // Retry a failed instance: the failed step runs again (its script
    // only fails the first activation) and the instance completes.
    let r1 = env.start(fixtures::DIAMOND, "r1", fatal_at("Left")).await;
    assert_eq!(env.settle(r1).await.status, InstanceStatus::Failed);
    let retried = json_of(&s, &["instances", "retry", &r1.to_string(), "--json"]);
    assert_eq!(retried["instance"], r1.to_string());
    assert_eq!(retried["status"], "running");
    let restarted = retried["restarted"].as_array().unwrap();
    assert!(
        restarted.contains(&json!({"step": "Left", "activation": 2})),
        "{retried}"
    );
    assert_eq!(env.status(r1).await, InstanceStatus::Running);
    let completed = env.settle(r1).await;
    assert_eq!(completed.status, InstanceStatus::Completed);
    assert_eq!(completed.failure, None);
    let shown = json_of(&s, &["instances", "show", &r1.to_string(), "--json"]);
    let retry_entry = shown["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["kind"] == "retried")
        .cloned()
        .expect("a retried history entry");
    assert_eq!(retry_entry["step"], "Left");
    assert_eq!(
        retry_entry["failure"]["error"]["message"],
        "Left: scripted fatal failure"
    );
    let left = shown["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "Left")
        .unwrap()
        .clone();
    assert_eq!(
        (left["state"].clone(), left["activation"].clone()),
        (json!("done"), json!(2))
    );
    let text = ok(&s, &["instances", "show", &r1.to_string()]);
    assert!(text.contains("  Left  [done, activation 2]\n"), "{text}");
    assert!(
        text.contains("retried: restarted Left")
            && text.contains("(the failure was: Left: scripted fatal failure)"),
        "{text}"
    );

    // Retrying what is not failed is refused, with the status.
    let not_failed = fails(&s, &["instances", "retry", &r1.to_string()]);
    assert_eq!(
        not_failed,
        format!(
            "hephaestus: instance {r1} is completed, not failed: only a failed instance can be retried\n"
        )
    );
    let w4 = env.start(fixtures::WAIT, "w4", json!({})).await;
    env.settle(w4).await;
    let waiting = fails(&s, &["instances", "retry", "run::w4"]);
    assert!(waiting.contains("is waiting, not failed"), "{waiting}");
    env.teardown().await;
}

#[tokio::test]
async fn workflows_the_binary_does_not_register_are_listed_and_shown_but_not_steered() {
    let env = Env::new().await;
    let s = env.name().to_owned();
    let waiting = env.start(UNKNOWN_WAIT, "u1", json!({})).await;
    let failed = env.start(UNKNOWN_FAIL, "u2", json!({})).await;
    assert_eq!(env.settle(waiting).await.status, InstanceStatus::Waiting);
    assert_eq!(env.settle(failed).await.status, InstanceStatus::Failed);

    let listed = json_of(
        &s,
        &["instances", "list", "--workflow", UNKNOWN_WAIT, "--json"],
    );
    assert_eq!(ids(&listed), vec![waiting.to_string()]);
    let shown = ok(&s, &["instances", "show", &waiting.to_string()]);
    assert!(
        shown.contains("DAG (drawn from the stored step states: this hephaestus does not register test_unknown v1; steps not reached yet are not shown):\ntest_unknown v1\n[0]\n  hephaestus::WaitForEvent  [waiting]\n"),
        "{shown}"
    );
    let shown = json_of(&s, &["instances", "show", &failed.to_string(), "--json"]);
    assert_eq!(shown["definition_known"], false);
    assert_eq!(shown["dag"]["source"], "stored_state");
    assert_eq!(shown["steps"][0]["step"], "Boom");
    assert_eq!(shown["steps"][0]["state"], "failed");
    assert_eq!(shown["steps"][0]["error"], "boom");

    let resume = fails(
        &s,
        &[
            "instances",
            "resume",
            &waiting.to_string(),
            "hephaestus::WaitForEvent",
            "received",
        ],
    );
    assert!(
        resume.contains(&format!(
            "instance {waiting} runs workflow test_unknown v1, which this hephaestus binary does not register (it registers: fixture_branch, fixture_diamond, fixture_linear, fixture_timer, fixture_wait)"
        )) && resume.contains("resume needs it"),
        "{resume}"
    );
    let retry = fails(&s, &["instances", "retry", &failed.to_string()]);
    assert!(
        retry.contains(
            "runs workflow test_unknown_fail v1, which this hephaestus binary does not register"
        ) && retry.contains("retry needs it"),
        "{retry}"
    );
    let cancel = fails(&s, &["instances", "cancel", "run::u1"]);
    assert!(
        cancel.contains("runs workflow test_unknown v1") && cancel.contains("cancel needs it too"),
        "{cancel}"
    );
    // Nothing was changed by the refused commands.
    assert_eq!(env.status(waiting).await, InstanceStatus::Waiting);
    assert_eq!(env.status(failed).await, InstanceStatus::Failed);
    env.teardown().await;
}

#[tokio::test]
async fn jobs_counts_by_queue_and_state_with_the_oldest_wait_and_recent_errors() {
    let env = Env::new().await;
    let s = env.name().to_owned();
    let empty = ok(&s, &["jobs"]);
    assert_eq!(empty, "no jobs\nrecent errors: none\n");

    let done = env.start(fixtures::LINEAR, "j1", json!({})).await;
    let failed = env.start(fixtures::LINEAR, "j2", fatal_at("Store")).await;
    env.settle(done).await;
    env.settle(failed).await;
    // Started, not run: its first step's execute job waits.
    let waiting = env.start(fixtures::LINEAR, "j3", json!({})).await;

    let report = json_of(&s, &["jobs", "--json"]);
    let queues = report["queues"].as_array().unwrap();
    assert_eq!(queues.len(), 1, "{report}");
    let queue = &queues[0];
    assert_eq!(queue["queue"], "hephaestus");
    assert_eq!(queue["counts"]["available"], 1, "{report}");
    assert_eq!(queue["counts"]["discarded"], 1, "{report}");
    assert!(
        queue["counts"]["completed"].as_u64().unwrap() >= 4,
        "{report}"
    );
    let oldest = &queue["oldest_available"];
    assert_eq!(oldest["kind"], "hephaestus.execute");
    assert!(oldest["age_seconds"].as_f64().unwrap() >= 0.0);
    let errors = report["recent_errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{report}");
    assert_eq!(errors[0]["kind"], "hephaestus.execute");
    assert_eq!(errors[0]["attempt"], 1);
    assert_eq!(errors[0]["state"], "discarded");
    assert_eq!(errors[0]["message"], "Store: scripted fatal failure");
    assert!(errors[0]["job_id"].as_i64().unwrap() > 0);

    let text = ok(&s, &["jobs"]);
    assert!(
        text.starts_with("queue hephaestus: available 1, completed "),
        "{text}"
    );
    assert!(text.contains("  oldest available: job #"), "{text}");
    assert!(text.contains("(hephaestus.execute), due "), "{text}");
    assert!(
        text.contains(&format!(
            "job #{} hephaestus.execute (hephaestus, discarded) attempt 1: Store: scripted fatal failure",
            errors[0]["job_id"]
        )),
        "{text}"
    );
    env.settle(waiting).await;
    env.teardown().await;
}

#[tokio::test]
async fn prune_deletes_finished_jobs_and_processed_step_results() {
    let env = Env::new().await;
    let s = env.name().to_owned();
    for value in ["p1", "p2"] {
        let id = env.start(fixtures::LINEAR, value, json!({})).await;
        assert_eq!(env.settle(id).await.status, InstanceStatus::Completed);
    }
    let count = |table: &str, condition: &str| {
        let sql = format!(
            "select count(*) from {} where {condition}",
            env.schema.table(table)
        );
        let pool = env.schema.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let finished = count("hephaestus_jobs", "state = 'completed'").await;
    let processed = count("hephaestus_step_results", "processed_at is not null").await;
    assert!(
        finished > 0 && processed > 0,
        "{finished} jobs, {processed} results"
    );

    let nothing_old = json_of(&s, &["prune", "--older-than", "7d", "--json"]);
    assert_eq!(
        (
            nothing_old["jobs"].clone(),
            nothing_old["step_results"].clone()
        ),
        (json!(0), json!(0))
    );
    let pruned = json_of(&s, &["prune", "--older-than", "0s", "--json"]);
    assert_eq!(pruned["jobs"], finished, "{pruned}");
    assert_eq!(pruned["step_results"], processed, "{pruned}");
    assert_eq!(count("hephaestus_jobs", "true").await, 0);
    assert_eq!(count("hephaestus_step_results", "true").await, 0);
    let again = ok(&s, &["prune", "--older-than", "0s"]);
    assert!(
        again.starts_with("pruned 0 finished jobs and 0 processed step results (finished before "),
        "{again}"
    );
    // Instances are history: never pruned.
    assert_eq!(count("hephaestus_instances", "true").await, 2);
    env.teardown().await;
}

#[test]
fn demo_runs_the_order_flow_in_memory() {
    let out = assert_cmd::Command::new(hephaestus_bin())
        .arg("demo")
        .env_remove("DATABASE_URL")
        .timeout(Duration::from_secs(120))
        .assert()
        .success();
    let text = stdout(&out);
    for expected in [
        "the order-flow demo, on the in-memory backend (no database)\n",
        "  [order::1001] ran orders::Validate -> :valid\n",
        "  [order::1001] the courier confirms delivery\n",
        "  [order::1001] completed\n",
        "  [order::1002] ran orders::Validate -> :invalid\n",
        "order::1001 is completed; context:\n",
        "order::1002 is completed; context:\n",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
}

#[tokio::test]
async fn bad_arguments_and_databases_fail_with_clear_errors() {
    // Unreachable server, and a URL that is not one.
    let refused = assert_cmd::Command::new(hephaestus_bin())
        .args([
            "instances",
            "list",
            "--database-url",
            "postgres://postgres@127.0.0.1:1/nowhere",
        ])
        .assert()
        .code(1);
    assert!(
        stderr(&refused).contains("cannot connect to PostgreSQL at 127.0.0.1:1, database nowhere"),
        "{}",
        stderr(&refused)
    );
    let garbage = assert_cmd::Command::new(hephaestus_bin())
        .args(["jobs", "--database-url", "not a url"])
        .assert()
        .code(1);
    assert!(
        stderr(&garbage).contains("is not a PostgreSQL URL"),
        "{}",
        stderr(&garbage)
    );

    // A schema nobody migrated: say what to run.
    let bare = TestSchema::new().await;
    let name = bare.prefix.as_str().to_owned();
    for args in [
        &["instances", "list"][..],
        &["instances", "show", "run::x"][..],
        &["jobs"][..],
        &["prune"][..],
    ] {
        let err = fails(&name, args);
        assert!(
            err.contains(&format!("schema {name} is not migrated"))
                && err.contains(&format!("run `hephaestus migrate --schema {name} up`")),
            "{args:?}: {err}"
        );
    }
    let bad_schema = fails("Not A Schema", &["instances", "list"]);
    assert!(
        bad_schema.contains("invalid --schema \"Not A Schema\""),
        "{bad_schema}"
    );
    bare.teardown().await;

    // In a migrated schema: unknown instances and bad values.
    let env = Env::new().await;
    let s = env.name().to_owned();
    let missing = Uuid::now_v7();
    for command in ["show", "cancel", "retry"] {
        let err = fails(&s, &["instances", command, &missing.to_string()]);
        assert_eq!(
            err,
            format!("hephaestus: no instance {missing} in schema {s}\n"),
            "{command}"
        );
    }
    let err = fails(&s, &["instances", "resume", "run::ghost", "Step", "event"]);
    assert!(
        err.contains(&format!(
            "no instance with business id run::ghost in schema {s}"
        )),
        "{err}"
    );
    let err = fails(&s, &["instances", "show", "neither"]);
    assert!(
        err.contains(
            "\"neither\" is neither an instance id (a UUID) nor a business id (key::value)"
        ),
        "{err}"
    );
    let err = fails(&s, &["instances", "list", "--after", &missing.to_string()]);
    assert!(
        err.contains(&format!(
            "--after {missing}: no such instance in schema {s}"
        )),
        "{err}"
    );
    let err = fails(
        &s,
        &[
            "instances",
            "list",
            "--since",
            "2026-02-01T00:00:00Z",
            "--until",
            "2026-01-01T00:00:00Z",
        ],
    );
    assert!(err.contains("is not before --until"), "{err}");

    // Values clap rejects before anything runs: exit code 2, the flag named.
    for (args, expected) in [
        (
            &[
                "instances",
                "resume",
                "run::x",
                "Step",
                "go",
                "--payload",
                "{bad",
            ][..],
            "invalid value '{bad' for '--payload <PAYLOAD>': not valid JSON",
        ),
        (
            &["instances", "list", "--status", "sleeping"][..],
            "unknown instance status \"sleeping\"; one of pending, running, waiting, completed, failed, cancelled",
        ),
        (
            &["instances", "list", "--since", "yesterday"][..],
            "invalid value 'yesterday' for '--since <SINCE>'",
        ),
        (
            &["instances", "list", "--limit", "0"][..],
            "invalid value '0' for '--limit <LIMIT>'",
        ),
        (
            &["instances", "list", "--after", "page-2"][..],
            "a cursor is the instance id",
        ),
        (
            &["instances", "list", "--business-id", "nokey"][..],
            "a business id is key::value",
        ),
        (
            &["prune", "--older-than", "soon"][..],
            "expected a number and a unit: ms, s, m, h or d",
        ),
        (
            &["instances", "show"][..],
            "required arguments were not provided",
        ),
    ] {
        let err = stderr(&run(&s, args).code(2));
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    env.teardown().await;
}

/// One instance whose stored state cannot be decoded (nested past what the
/// decoder reads, written by hand): listing skips and reports it, `show`
/// prints what can be read, `cancel` cancels it by its status and jobs, and
/// every other instance is listed and steered as usual.
#[tokio::test]
async fn an_undecodable_instance_is_reported_shown_and_cancelled_without_wedging_the_rest() {
    let env = Env::new().await;
    let s = env.name().to_owned();
    let bad = env.start(fixtures::WAIT, "bad", json!({})).await;
    let good = env.start(fixtures::WAIT, "good", json!({})).await;
    for id in [bad, good] {
        assert_eq!(env.settle(id).await.status, InstanceStatus::Waiting);
    }
    let too_deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
    sqlx::query(&format!(
        "update {} set state = jsonb_set(state, '{{context,initial}}', $2::jsonb) where id = $1",
        env.schema.table("hephaestus_instances")
    ))
    .bind(bad)
    .bind(&too_deep)
    .execute(&env.schema.pool)
    .await
    .unwrap();
    assert!(matches!(
        env.runtime.get(bad).await,
        Err(hephaestus_runner::RunnerError::Backend(
            hephaestus_engine_core::ports::PortError::Corrupt(_)
        ))
    ));

    // Listing: the good one is listed, the bad one reported, nothing fails.
    let listed = run(&s, &["instances", "list", "--json"]).success();
    let listing: Value = serde_json::from_str(&stdout(&listed)).unwrap();
    assert_eq!(ids(&listing), vec![good.to_string()]);
    assert_eq!(listing["undecodable"][0]["id"], json!(bad));
    assert!(
        listing["undecodable"][0]["error"]
            .as_str()
            .unwrap()
            .contains("state"),
        "{listing}"
    );
    assert!(stderr(&listed).contains(&format!("instance {bad} cannot be decoded")));
    let port_list = env
        .runtime
        .list(&hephaestus_engine_core::ports::InstanceFilter::default())
        .await
        .expect("the port's list skips it");
    assert_eq!(port_list.iter().map(|i| i.id).collect::<Vec<_>>(), [good]);

    // Show: what can be read, with the error and the jobs.
    let shown = ok(&s, &["instances", "show", &bad.to_string()]);
    assert!(shown.contains("CANNOT BE DECODED"), "{shown}");
    assert!(
        shown.contains("waiting") && shown.contains(fixtures::WAIT),
        "{shown}"
    );
    let shown = json_of(&s, &["instances", "show", &bad.to_string(), "--json"]);
    assert_eq!(shown["status"], "waiting");
    assert!(shown["decode_error"].as_str().unwrap().contains("state"));

    // Cancel: by status and jobs; its business key is free again.
    let cancelled = ok(&s, &["instances", "cancel", &bad.to_string()]);
    assert!(cancelled.contains(&bad.to_string()), "{cancelled}");
    let status: String = sqlx::query_scalar(&format!(
        "select status from {} where id = $1",
        env.schema.table("hephaestus_instances")
    ))
    .bind(bad)
    .fetch_one(&env.schema.pool)
    .await
    .unwrap();
    assert_eq!(status, "cancelled");
    assert!(
        env.runtime.jobs_of(bad).await.unwrap().is_empty(),
        "no live job"
    );
    env.start(fixtures::WAIT, "bad", json!({})).await;
    // The good one is untouched and still steerable.
    ok(
        &s,
        &[
            "instances",
            "resume",
            &good.to_string(),
            fixtures::WAITING_STEP,
            fixtures::RESUME_EVENT,
        ],
    );
    assert_eq!(env.settle(good).await.status, InstanceStatus::Completed);
    env.teardown().await;
}
