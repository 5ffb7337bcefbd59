//! `hephaestus worker --log-format json`: one JSON object per line, filtered
//! by `RUST_LOG`, and each event of a step carrying the instance id and the
//! step in the fields of its span.

use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_runner::StartOptions;
use serde_json::Value;

use super::metrics::{Worker, api_runtime};
use crate::faults::fixtures;
use crate::support::db::{TestSchema, database_url};
use crate::support::wait;

#[tokio::test]
async fn json_logs_carry_the_instance_and_the_step_of_each_event() {
    let schema = TestSchema::new().await;
    let worker = Worker::spawn(
        database_url(),
        schema.prefix.as_str(),
        &["--log-format", "json"],
        // The runner's events, not the queue's or sqlx's.
        "warn,hephaestus_runner=info",
    );
    let api = api_runtime(&schema).await;
    let started = api
        .start(
            fixtures::DIAMOND,
            "logs",
            fixtures::Script::default().to_input(),
            StartOptions::default(),
        )
        .await
        .unwrap();
    // The worker process completes it; only the database tells.
    let (api, id) = (&api, started.id);
    wait::until("the instance to complete", || async move {
        api.get(id).await.unwrap().unwrap().status == InstanceStatus::Completed
    })
    .await;
    let log = worker.stop();

    let events: Vec<Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    // RUST_LOG kept the queue's info events out.
    assert!(
        events.iter().all(|e| e["level"] != "INFO"
            || e["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("hephaestus_runner"))),
        "{log}"
    );
    // Every step's start and stop event sits in the step's span, which names
    // the instance and the step.
    let id = started.id.to_string();
    let mut seen = Vec::new();
    for event in &events {
        let Some(name @ ("hephaestus.step.start" | "hephaestus.step.stop")) =
            event["telemetry"].as_str()
        else {
            continue;
        };
        let span = &event["span"];
        assert_eq!(span["name"], "hephaestus.step", "{event}");
        assert_eq!(span["hephaestus.instance_id"], id.as_str(), "{event}");
        let step = span["hephaestus.step"]
            .as_str()
            .expect("the step")
            .to_owned();
        seen.push((step, name.to_owned()));
    }
    seen.sort();
    // `Done`, applied inline by the orchestrator, reports its start and
    // stop in a step span of its own like any step.
    let mut expected: Vec<(String, String)> =
        fixtures::path(fixtures::DIAMOND, &fixtures::Script::default())
            .iter()
            .chain(&[hephaestus_engine_core::steps::DONE_ID])
            .flat_map(|step| {
                ["hephaestus.step.start", "hephaestus.step.stop"]
                    .map(|n| ((*step).to_owned(), n.to_owned()))
            })
            .collect();
    expected.sort();
    assert_eq!(seen, expected, "{log}");
    schema.teardown().await;
}

#[test]
fn a_worker_refuses_an_invalid_log_filter() {
    let out = std::process::Command::new(crate::faults::hephaestus_bin())
        .args(["worker", "--log-format", "json"])
        .env("DATABASE_URL", database_url())
        .env("RUST_LOG", "hephaestus=loud")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("the binary runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid RUST_LOG \"hephaestus=loud\""),
        "{stderr}"
    );
}
