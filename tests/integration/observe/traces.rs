//! One trace per instance, with the OpenTelemetry SDK's in-memory exporter
//! behind the `tracing` bridge (installed once for the test binary: spans of
//! other tests land there too, and each test reads only its own trace).

use std::sync::OnceLock;
use std::time::Duration;

use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_engine_core::ports::JobState;
use hephaestus_engine_core::prelude::*;
use hephaestus_engine_core::step::StepError;
use hephaestus_engine_core::steps::Done;
use hephaestus_queue_pg::QueueRuntime;
use hephaestus_runner::observe::TRACEPARENT;
use hephaestus_runner::observe::otel::{InstanceIdGenerator, parse_traceparent};
use hephaestus_runner::postgres::PgBackend;
use hephaestus_runner::testing::{JobExpectation, ScriptedStep};
use hephaestus_runner::{RunnerConfig, Runtime, StartOptions, jobs};
use opentelemetry::trace::{SpanContext, SpanId, Status, TraceId, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::json;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use uuid::Uuid;

use crate::queue_pg::SAFETY_NET;
use crate::runner::harness::Harness;

/// The exporter every span of the test binary goes to.
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_id_generator(InstanceIdGenerator::default())
            .with_simple_exporter(exporter.clone())
            .build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        tracing_subscriber::registry()
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(provider.tracer("tests"))
                    .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
            )
            .try_init()
            .expect("no other global subscriber in the test binary");
        exporter
    })
}

/// The exported spans of trace `trace`.
fn spans_of(trace: TraceId) -> Vec<SpanData> {
    exporter()
        .get_finished_spans()
        .expect("the in-memory exporter answers")
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect()
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn attr_str(span: &SpanData, key: &str) -> String {
    attr(span, key).map(Value::as_str).map(|s| s.into_owned()).unwrap_or_default()
}

fn attr_i64(span: &SpanData, key: &str) -> Option<i64> {
    match attr(span, key)? {
        Value::I64(n) => Some(*n),
        other => other.as_str().parse().ok(),
    }
}

/// The instance's trace context (its root span's ids), as stored at start.
async fn root_of(rt: &Runtime<PgBackend>, id: Uuid) -> SpanContext {
    let instance = rt.get(id).await.unwrap().unwrap();
    let stored = instance.telemetry_metadata[TRACEPARENT]
        .as_str()
        .expect("a traceparent stored with the instance");
    parse_traceparent(stored).expect("a valid W3C traceparent")
}

/// Waits until `check` holds (a safety net bounds the wait).
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + SAFETY_NET;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not after {SAFETY_NET:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start_worker(rt: &Runtime<PgBackend>) -> QueueRuntime {
    rt.queue_runtime(hephaestus_failure_handler::workers(rt))
        .start()
        .await
        .expect("the queue runtime starts")
}

fn config() -> RunnerConfig {
    RunnerConfig {
        poll_interval: Duration::from_millis(20),
        concurrency: 4,
        ..RunnerConfig::default()
    }
}

/// Diamond "traced": Begin, then Left and Right, then Join.
fn diamond(right: ScriptedStep) -> (Workflow, [ScriptedStep; 3]) {
    let begin = ScriptedStep::new("Begin", ["done"]);
    let left = ScriptedStep::new("Left", ["done"]);
    let join = ScriptedStep::new("Join", ["done"]);
    let workflow = Workflow::builder("traced")
        .unique("key", Scope::Workflow)
        .start(begin.clone())
        .fan_out(
            begin.clone(),
            "done",
            vec![target(left.clone()), target(right.clone())],
        )
        .on(left.clone(), "done", join.clone())
        .on(right, "done", join.clone())
        .on(join.clone(), "done", Done)
        .build()
        .expect("a valid diamond");
    (workflow, [begin, left, join])
}

#[tokio::test]
async fn a_diamond_across_two_worker_runtimes_and_a_restart_is_one_trace() {
    exporter();
    let h = Harness::postgres().await;
    // Right fails its first attempt (retried 5 s later, on the virtual
    // clock), then completes: the retry happens after the restart.
    let right = ScriptedStep::new("Right", ["done"]).on_attempt(
        1,
        StepOutcome::Error(StepError::retry_after("flaky", Duration::from_secs(5))),
    );
    let (wf, [_begin, left, _join]) = diamond(right.clone());
    // Two worker "processes", each with its own runtime.
    let a = h.runtime_with(config(), vec![wf.clone()], Vec::new());
    let b = h.runtime_with(config(), vec![wf], Vec::new());

    // The caller's span: the instance's root span becomes its child.
    let caller = tracing::info_span!("caller");
    let caller_context = {
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        use opentelemetry::trace::TraceContextExt as _;
        caller.context().span().span_context().clone()
    };
    assert!(caller_context.is_valid(), "the bridge gives the caller a context");
    let started = {
        use tracing::Instrument as _;
        a.start("traced", "1", json!({}), StartOptions::default())
            .instrument(caller.clone())
            .await
            .unwrap()
    };
    drop(caller);
    let id = started.id;
    let root = root_of(&a, id).await;
    assert_eq!(root.trace_id(), caller_context.trace_id(), "the caller's trace");

    // Worker A runs until Right's first attempt failed and Left completed.
    let qa = start_worker(&a).await;
    until("Left done and Right's retry scheduled", || async {
        left.runs() == 1
            && !a
                .enqueued(
                    id,
                    &JobExpectation::kind(jobs::EXECUTE)
                        .step("Right")
                        .state(JobState::Retryable),
                )
                .await
                .unwrap()
                .is_empty()
    })
    .await;
    // A restart: A stops; B, which never saw the instance, takes over.
    qa.shutdown(Duration::from_secs(5)).await;
    let qb = start_worker(&b).await;
    h.clock.advance(Duration::from_secs(10));
    until("the instance completes", || async {
        b.get(id).await.unwrap().unwrap().status == InstanceStatus::Completed
    })
    .await;
    qb.shutdown(Duration::from_secs(5)).await;
    assert_eq!(right.attempts(), vec![1, 2]);

    let spans = spans_of(root.trace_id());
    let describe = || {
        spans
            .iter()
            .map(|s| format!("{} {} <- {}", s.name, s.span_context.span_id(), s.parent_span_id))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Exactly one trace: no span about this instance lies outside it.
    let elsewhere: Vec<SpanData> = exporter()
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| {
            attr_str(s, "hephaestus.instance_id") == id.to_string()
                && s.span_context.trace_id() != root.trace_id()
        })
        .collect();
    assert!(elsewhere.is_empty(), "spans outside the trace: {elsewhere:?}");

    // The root span: the instance, under the caller's span, exported once.
    let roots: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.span_context.span_id() == root.span_id())
        .collect();
    assert_eq!(roots.len(), 1, "{}", describe());
    let root_span = roots[0];
    assert_eq!(root_span.name, "workflow traced");
    assert_eq!(root_span.parent_span_id, caller_context.span_id());
    assert_eq!(root_span.status, Status::Ok);
    assert_eq!(attr_str(root_span, "hephaestus.status"), "completed");
    assert_eq!(attr_str(root_span, "hephaestus.workflow"), "traced");
    assert_eq!(attr_str(root_span, "hephaestus.instance_id"), id.to_string());
    assert_eq!(
        attr_str(root_span, "hephaestus.business_id"),
        started.business_id.to_string()
    );
    assert_eq!(attr_i64(root_span, "hephaestus.workflow.version"), Some(1));
    assert!(root_span.end_time >= root_span.start_time);

    // One span per step attempt, each a child of the root span.
    let mut attempts: Vec<(String, i64, String)> = spans
        .iter()
        .filter(|s| s.name.starts_with("process ") && attr(s, "hephaestus.step").is_some())
        .map(|s| {
            assert_eq!(s.parent_span_id, root.span_id(), "{}: {}", s.name, describe());
            assert_eq!(attr_str(s, "messaging.system"), "hephaestus");
            assert_eq!(attr_str(s, "messaging.operation.type"), "process");
            assert_eq!(attr_str(s, "messaging.destination.name"), "hephaestus");
            assert_eq!(attr_str(s, "hephaestus.workflow"), "traced");
            assert_eq!(attr_str(s, "hephaestus.instance_id"), id.to_string());
            assert_eq!(
                attr_str(s, "hephaestus.business_id"),
                started.business_id.to_string()
            );
            assert_eq!(attr_i64(s, "hephaestus.activation"), Some(1));
            (
                attr_str(s, "hephaestus.step"),
                attr_i64(s, "hephaestus.attempt").unwrap(),
                attr_str(s, "hephaestus.outcome"),
            )
        })
        .collect();
    attempts.sort();
    assert_eq!(
        attempts,
        vec![
            ("Begin".to_owned(), 1, "completed".to_owned()),
            ("Join".to_owned(), 1, "completed".to_owned()),
            ("Left".to_owned(), 1, "completed".to_owned()),
            ("Right".to_owned(), 1, "retryable".to_owned()),
            ("Right".to_owned(), 2, "completed".to_owned()),
        ],
        "{}",
        describe()
    );
    let failed_attempt = spans
        .iter()
        .find(|s| attr_str(s, "hephaestus.outcome") == "retryable")
        .unwrap();
    assert_eq!(attr_str(failed_attempt, "error.type"), "retryable");
    assert!(matches!(&failed_attempt.status, Status::Error { description } if description.contains("flaky")));

    // The settling units of work: each settle span hangs under a span of
    // the trace (a step attempt or a job), each commit under a settle span.
    let ids: std::collections::HashSet<SpanId> =
        spans.iter().map(|s| s.span_context.span_id()).collect();
    let settles: Vec<&SpanData> = spans.iter().filter(|s| s.name == "settle").collect();
    assert!(!settles.is_empty(), "{}", describe());
    for settle in &settles {
        assert!(ids.contains(&settle.parent_span_id), "{}", describe());
        assert_eq!(attr_str(settle, "messaging.operation.type"), "settle");
    }
    let commits: Vec<&SpanData> = spans.iter().filter(|s| s.name == "commit").collect();
    assert!(!commits.is_empty(), "{}", describe());
    for commit in commits {
        assert!(
            settles
                .iter()
                .any(|s| s.span_context.span_id() == commit.parent_span_id),
            "{}",
            describe()
        );
    }
    // The start: a producer span in the trace, under the root span.
    let start = spans
        .iter()
        .find(|s| s.name == "create traced")
        .expect("the start's span");
    assert_eq!(start.parent_span_id, root.span_id());
    assert_eq!(attr_str(start, "messaging.operation.type"), "create");
    h.teardown().await;
}

#[tokio::test]
async fn a_failed_instance_has_an_error_root_span() {
    exporter();
    let h = Harness::postgres().await;
    let right = ScriptedStep::new("Right", ["done"]).otherwise(StepOutcome::fatal("broken"));
    let (wf, _) = diamond(right);
    let rt = h.runtime_with(config(), vec![wf], Vec::new());
    let started = rt
        .start("traced", "2", json!({}), StartOptions::default())
        .await
        .unwrap();
    let root = root_of(&rt, started.id).await;
    let worker = start_worker(&rt).await;
    until("the instance fails", || async {
        rt.get(started.id).await.unwrap().unwrap().status == InstanceStatus::Failed
    })
    .await;
    worker.shutdown(Duration::from_secs(5)).await;
    let spans = spans_of(root.trace_id());
    let root_span = spans
        .iter()
        .find(|s| s.span_context.span_id() == root.span_id())
        .expect("the root span is exported when the instance fails");
    assert!(
        matches!(&root_span.status, Status::Error { description } if description.contains("broken")),
        "{:?}",
        root_span.status
    );
    assert_eq!(attr_str(root_span, "hephaestus.status"), "failed");
    assert_eq!(attr_str(root_span, "hephaestus.failed_step"), "Right");
    assert_eq!(attr_str(root_span, "error.type"), "fatal");
    // No caller span: the instance's trace starts at its root span.
    assert_eq!(root_span.parent_span_id, SpanId::INVALID);
    let failed = spans
        .iter()
        .find(|s| attr_str(s, "hephaestus.step") == "Right")
        .expect("the failed attempt's span");
    assert_eq!(attr_str(failed, "hephaestus.outcome"), "fatal");
    assert_eq!(failed.parent_span_id, root.span_id());
    h.teardown().await;
}
