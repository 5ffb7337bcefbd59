//! Every field of the original's eleven telemetry events (spec 8.1), on both
//! backends: each event is checked against the table in docs/operations.md,
//! field by field, and `Done` reports its step start and stop like any step.

use std::collections::BTreeMap;
use std::time::Duration;

use hephaestus_engine_core::prelude::*;
use hephaestus_engine_core::steps::{Done, FnStep, WAIT_FOR_EVENT_ID, WaitForEvent};
use hephaestus_runner::telemetry::{TelemetryEvent, names};
use hephaestus_runner::{Backend, RunnerConfig, Runtime, StartOptions};
use serde_json::json;

use super::harness::{self, Harness, on_both_backends};

on_both_backends!(every_event_carries_every_field_of_the_original);

/// Event -> (measurements, metadata) every emission of it must carry
/// (instance-scoped events also carry instance_id, business_id, workflow and
/// workflow_version).
fn table() -> BTreeMap<&'static str, (&'static [&'static str], &'static [&'static str])> {
    BTreeMap::from([
        (
            names::WORKFLOW_START,
            (
                &["system_time"][..],
                &["initial_step", "context_keys", "runner"][..],
            ),
        ),
        (
            names::WORKFLOW_STOP,
            (
                &["duration", "step_count", "advance_count"][..],
                &["status", "completed_steps"][..],
            ),
        ),
        (
            names::WORKFLOW_EXCEPTION,
            (
                &["duration"][..],
                &[
                    "kind",
                    "reason",
                    "failed_step",
                    "status",
                    "step_count",
                    "advance_count",
                ][..],
            ),
        ),
        (
            names::WORKFLOW_TRANSITION,
            (
                &["targets_count"][..],
                &["from_step", "event", "targets", "fan_out"][..],
            ),
        ),
        (
            names::STEP_START,
            (
                &["system_time"][..],
                &["step", "step_key", "concurrent", "active_steps_count"][..],
            ),
        ),
        (
            names::STEP_STOP,
            (
                &["duration"][..],
                &[
                    "step",
                    "step_key",
                    "event",
                    "has_context_updates",
                    "has_metadata_updates",
                ][..],
            ),
        ),
        (
            names::STEP_EXCEPTION,
            (
                &["duration"][..],
                &["step", "step_key", "kind", "reason"][..],
            ),
        ),
        (
            names::STEP_ASYNC,
            (
                &["duration"][..],
                &["step", "step_key", "instance_status"][..],
            ),
        ),
        (
            names::STEP_RESUME,
            (
                &["system_time", "wait_duration"][..],
                &["step", "step_key", "resume_event", "source"][..],
            ),
        ),
        (
            names::ENGINE_ADVANCE,
            (
                &["duration", "active_steps_count", "completed_in_advance"][..],
                &["status_before", "status_after", "iteration"][..],
            ),
        ),
        (
            names::RUNNER_INIT,
            (&["system_time"][..], &["name", "runner", "backend"][..]),
        ),
    ])
}

async fn every_event_carries_every_field_of_the_original<B: Backend>(h: &Harness<B>) {
    let a = FnStep::new("A", ["done"], |_| StepOutcome::complete("done"));
    let b = FnStep::new("B", ["done"], |_| {
        StepOutcome::complete_with("done", json!({"b": 1}))
    });
    let linear = Workflow::builder("linear")
        .unique("run", Scope::Workflow)
        .start(a.clone())
        .on(a.clone(), "done", b.clone())
        .on(b, "done", Done)
        .build()
        .unwrap();
    let waits = Workflow::builder("waits")
        .unique("run", Scope::Workflow)
        .start(a.clone())
        .on_with(a, "done", WaitForEvent, json!({"timeout_ms": 60_000}))
        .on(WaitForEvent, "received", Done)
        .on(WaitForEvent, "timeout", Done)
        .build()
        .unwrap();
    let boom = FnStep::new("Boom", ["done"], |_| StepOutcome::fatal("no luck"));
    let fails = Workflow::builder("fails")
        .unique("run", Scope::Workflow)
        .start(boom.clone())
        .on(boom, "done", Done)
        .build()
        .unwrap();
    let builder = Runtime::builder(h.backend.clone())
        .discard_handler(hephaestus_failure_handler::FailureHandler::new())
        .clock(h.clock.clone())
        .config(RunnerConfig::default().with_name("worker-7".to_owned()))
        .workflow(linear)
        .workflow(waits)
        .workflow(fails);
    let mut events = builder.subscribe();
    let rt = builder.build().unwrap();

    let lin = rt
        .start("linear", "1", json!({"k": 1}), StartOptions::default())
        .await
        .unwrap();
    let resumed = rt
        .start("waits", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    let timed_out = rt
        .start("waits", "2", json!({}), StartOptions::default())
        .await
        .unwrap();
    rt.start("fails", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    rt.drain().await.unwrap();
    h.clock.advance(Duration::from_secs(2));
    rt.resume(resumed.id, WAIT_FOR_EVENT_ID, "received", json!({}))
        .await
        .unwrap();
    rt.drain().await.unwrap();
    h.clock.advance(Duration::from_secs(61));
    rt.drain().await.unwrap();
    for id in [lin.id, resumed.id, timed_out.id] {
        assert_eq!(
            rt.get(id).await.unwrap().unwrap().status,
            InstanceStatus::Completed
        );
    }

    let mut seen: Vec<TelemetryEvent> = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    let table = table();
    for (name, (measurements, metadata)) in &table {
        let of_name: Vec<&TelemetryEvent> = seen.iter().filter(|e| e.name == *name).collect();
        assert!(!of_name.is_empty(), "{name} was not emitted");
        for event in of_name {
            for field in *measurements {
                assert!(
                    event.measurements.contains_key(*field),
                    "{name} lacks measurement {field}: {event:?}"
                );
            }
            let instance_fields: &[&str] = if *name == names::RUNNER_INIT {
                &[]
            } else {
                &["instance_id", "business_id", "workflow", "workflow_version"]
            };
            for field in metadata.iter().chain(instance_fields) {
                assert!(
                    event.metadata.contains_key(*field),
                    "{name} lacks metadata {field}: {event:?}"
                );
            }
        }
    }
    let of = |name: &'static str| seen.iter().filter(move |e| e.name == name);
    let init = of(names::RUNNER_INIT).next().unwrap();
    assert_eq!(init.metadata["name"], "worker-7", "the configured name");
    // A linear run of two steps reports three step starts and stops (Done's
    // included, though no job runs it).
    let lin_id = json!(lin.id);
    for name in [names::STEP_START, names::STEP_STOP] {
        let steps: Vec<&str> = of(name)
            .filter(|e| e.metadata["instance_id"] == lin_id)
            .map(|e| e.metadata["step"].as_str().unwrap())
            .collect();
        assert_eq!(steps, ["A", "B", "hephaestus::Done"], "{name}");
    }
    let sources: Vec<(serde_json::Value, &str)> = of(names::STEP_RESUME)
        .map(|e| {
            (
                e.metadata["instance_id"].clone(),
                e.metadata["source"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(
        sources.contains(&(json!(resumed.id), "external")),
        "{sources:?}"
    );
    assert!(
        sources.contains(&(json!(timed_out.id), "timeout")),
        "{sources:?}"
    );
    let failed = of(names::WORKFLOW_EXCEPTION).next().unwrap();
    assert_eq!(failed.metadata["failed_step"], "Boom");
    assert_eq!(failed.metadata["step_count"], 0);
    assert!(failed.metadata["advance_count"].as_u64().unwrap() >= 1);
    let starts_a: Vec<&TelemetryEvent> = of(names::STEP_START)
        .filter(|e| e.metadata["step"] == "A")
        .collect();
    assert!(starts_a.iter().all(|e| e.metadata["concurrent"] == false));
}
