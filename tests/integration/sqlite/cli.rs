//! The `hephaestus` commands on a SQLite file (`--database-url
//! sqlite://FILE`): migrate, instances list/show/resume/cancel/retry, jobs
//! and prune, against instances a runtime in this process runs.

use std::process::{Command, Output};

use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_runner::{Runtime, StartOptions};
use hephaestus_sqlite::{SqliteBackend, SqliteOptions};
use serde_json::{Value, json};

use crate::faults::fixtures::{self, Recorder, Script};
use crate::support::bin::hephaestus_bin;
use crate::support::sqlite::TempDir;

fn hephaestus(args: &[&str]) -> Output {
    Command::new(hephaestus_bin())
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run hephaestus")
}

fn ok_json(args: &[&str]) -> Value {
    let out = hephaestus(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_commands_work_on_a_sqlite_file() {
    let dir = TempDir::new("sqlite-cli");
    let file = dir.join("ops.db");
    let url = format!("sqlite://{}", file.display());

    // Not migrated yet: a command that reads says what to run.
    let unmigrated = hephaestus(&["instances", "list", "--database-url", &url]);
    assert!(!unmigrated.status.success());
    assert!(
        String::from_utf8_lossy(&unmigrated.stderr).contains("hephaestus migrate"),
        "{}",
        String::from_utf8_lossy(&unmigrated.stderr)
    );
    let up = ok_json(&["migrate", "--database-url", &url, "--json", "up"]);
    assert_eq!(
        up["migrated"][0],
        json!({"component": "sqlite", "from": 0, "to": 1})
    );
    let status = ok_json(&["migrate", "--database-url", &url, "--json", "status"]);
    assert_eq!(status["components"][0]["up_to_date"], json!(true));

    // Instances run by a runtime of this process, its steps recording
    // their executions like a worker's.
    let backend = SqliteBackend::open(SqliteOptions::new(&file))
        .await
        .unwrap();
    let recorder = Recorder::sqlite(&file).unwrap();
    let mut builder = Runtime::builder(backend.clone())
        .discard_handler(hephaestus_failure_handler::FailureHandler::new());
    for workflow in fixtures::workflows(&recorder).unwrap() {
        builder = builder.workflow(workflow);
    }
    let rt = builder.build().unwrap();
    let waiting = rt
        .start(fixtures::WAIT, "w1", json!({}), StartOptions::default())
        .await
        .unwrap();
    let failing = rt
        .start(
            fixtures::LINEAR,
            "l1",
            Script {
                fatal: Some("Transform".to_owned()),
                ..Script::default()
            }
            .to_input(),
            StartOptions::default(),
        )
        .await
        .unwrap();
    let doomed = rt
        .start(fixtures::WAIT, "w2", json!({}), StartOptions::default())
        .await
        .unwrap();
    rt.drain().await.unwrap();

    let listed = ok_json(&["instances", "list", "--database-url", &url, "--json"]);
    let ids: Vec<&str> = listed["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{listed}");
    let failed = ok_json(&[
        "instances",
        "list",
        "--database-url",
        &url,
        "--status",
        "failed",
        "--json",
    ]);
    assert_eq!(failed["instances"][0]["id"], json!(failing.id));
    let paged = ok_json(&[
        "instances",
        "list",
        "--database-url",
        &url,
        "--limit",
        "2",
        "--json",
    ]);
    assert_eq!(paged["instances"].as_array().unwrap().len(), 2);
    assert!(paged["next"].is_string(), "{paged}");

    let shown = ok_json(&[
        "instances",
        "show",
        "--database-url",
        &url,
        &waiting.id.to_string(),
        "--json",
    ]);
    assert_eq!(shown["status"], json!("waiting"), "{shown}");

    // Steering: resume, cancel, retry go through the runner.
    let resumed = ok_json(&[
        "instances",
        "resume",
        "--database-url",
        &url,
        "run::w1",
        fixtures::WAITING_STEP,
        fixtures::RESUME_EVENT,
        "--json",
    ]);
    assert_eq!(resumed["resumed"], json!(true));
    ok_json(&[
        "instances",
        "cancel",
        "--database-url",
        &url,
        &doomed.id.to_string(),
        "--reason",
        "not needed",
        "--json",
    ]);
    rt.drain().await.unwrap();
    assert_eq!(
        rt.get(waiting.id).await.unwrap().unwrap().status,
        InstanceStatus::Completed
    );
    assert_eq!(
        rt.get(doomed.id).await.unwrap().unwrap().status,
        InstanceStatus::Cancelled
    );
    let retried = ok_json(&[
        "instances",
        "retry",
        "--database-url",
        &url,
        &failing.id.to_string(),
        "--json",
    ]);
    assert_eq!(
        retried["restarted"][0]["step"],
        json!("Transform"),
        "{retried}"
    );
    rt.drain().await.unwrap();
    assert_eq!(
        rt.get(failing.id).await.unwrap().unwrap().status,
        InstanceStatus::Completed,
        "the script's fatal failure is for the first activation only"
    );

    let jobs = ok_json(&["jobs", "--database-url", &url, "--json"]);
    let queue = &jobs["queues"][0];
    assert_eq!(queue["queue"], json!("hephaestus"), "{jobs}");
    assert!(queue["counts"]["completed"].as_u64().unwrap() > 0, "{jobs}");
    assert!(
        jobs["recent_errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["message"]
                .as_str()
                .unwrap()
                .contains("scripted fatal failure")),
        "{jobs}"
    );

    let pruned = ok_json(&[
        "prune",
        "--database-url",
        &url,
        "--older-than",
        "0s",
        "--instances",
        "--json",
    ]);
    assert_eq!(pruned["instances"], json!(3), "{pruned}");
    assert!(rt.get(waiting.id).await.unwrap().is_none());
    backend.close().await;
}
