//! One trace per instance, with the OpenTelemetry SDK's in-memory exporter
//! behind the `tracing` bridge (installed once for the test binary: spans of
//! other tests land there too, and each test reads only its own trace).

use std::sync::OnceLock;
use std::time::Duration;

use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_engine_core::ports::JobState;
use hephaestus_engine_core::prelude::*;
use hephaestus_engine_core::steps::Done;
use hephaestus_queue_pg::QueueRuntime;
use hephaestus_runner::observe::TRACEPARENT;
use hephaestus_runner::observe::otel::{InstanceIdGenerator, parse_traceparent};
use hephaestus_runner::postgres::PgBackend;
use hephaestus_runner::testing::{JobExpectation, ScriptedStep};
use hephaestus_runner::{RunnerConfig, Runtime, StartOptions, jobs};
use opentelemetry::Value;
use opentelemetry::trace::{SpanContext, SpanId, Status, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::json;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use uuid::Uuid;

use crate::runner::harness::{Harness, until_status};
use crate::support::wait::until;

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
                    // As `hephaestus worker` does: queue-pg's per-job span
                    // (no instance) stays out of the traces.
                    .with_filter(
                        tracing_subscriber::filter::Targets::new()
                            .with_default(tracing_subscriber::filter::LevelFilter::INFO)
                            .with_target(
                                "hephaestus_queue",
                                tracing_subscriber::filter::LevelFilter::OFF,
                            ),
                    ),
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
    attr(span, key)
        .map(Value::as_str)
        .map(std::borrow::Cow::into_owned)
        .unwrap_or_default()
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

async fn start_worker(rt: &Runtime<PgBackend>) -> QueueRuntime {
    rt.queue_runtime()
        .expect("the runtime has a discard handler")
        .start()
        .await
        .expect("the queue runtime starts")
}

fn config() -> RunnerConfig {
    RunnerConfig::default()
        .with_poll_interval(Duration::from_millis(20))
        .with_concurrency(4)
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
        use opentelemetry::trace::TraceContextExt as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        caller.context().span().span_context().clone()
    };
    assert!(
        caller_context.is_valid(),
        "the bridge gives the caller a context"
    );
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
    assert_eq!(
        root.trace_id(),
        caller_context.trace_id(),
        "the caller's trace"
    );

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
    until_status(&[&b], id, InstanceStatus::Completed).await;
    qb.shutdown(Duration::from_secs(5)).await;
    assert_eq!(right.attempts(), vec![1, 2]);

    let spans = spans_of(root.trace_id());
    let describe = || {
        spans
            .iter()
            .map(|s| {
                format!(
                    "{} {} <- {}",
                    s.name,
                    s.span_context.span_id(),
                    s.parent_span_id
                )
            })
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
    assert!(
        elsewhere.is_empty(),
        "spans outside the trace: {:?}",
        elsewhere.iter().map(|s| &s.name).collect::<Vec<_>>()
    );

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
    assert_eq!(
        attr_str(root_span, "hephaestus.instance_id"),
        id.to_string()
    );
    assert_eq!(
        attr_str(root_span, "hephaestus.business_id"),
        started.business_id.to_string()
    );
    assert_eq!(attr_i64(root_span, "hephaestus.workflow.version"), Some(1));
    assert!(root_span.end_time >= root_span.start_time);

    // One span per step attempt, each a child of the root span.
    let mut attempts: Vec<(String, i64, String)> = spans
        .iter()
        .filter(|s| attr_str(s, "messaging.operation.name") == "execute")
        .map(|s| {
            assert_eq!(
                s.parent_span_id,
                root.span_id(),
                "{}: {}",
                s.name,
                describe()
            );
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
            // `Done`, applied inline by the orchestrator: a step all the same.
            ("hephaestus::Done".to_owned(), 1, "completed".to_owned()),
        ],
        "{}",
        describe()
    );
    let failed_attempt = spans
        .iter()
        .find(|s| attr_str(s, "hephaestus.outcome") == "retryable")
        .unwrap();
    assert_eq!(attr_str(failed_attempt, "error.type"), "retryable");
    assert!(
        matches!(&failed_attempt.status, Status::Error { description } if description.contains("flaky"))
    );

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
    // The start: a producer span in the caller's process, under its span.
    let start = spans
        .iter()
        .find(|s| s.name == "create traced")
        .expect("the start's span");
    assert_eq!(start.parent_span_id, caller_context.span_id());
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
    until_status(&[&rt], started.id, InstanceStatus::Failed).await;
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
    // No caller span: the instance's trace starts at its root span, and the
    // start's span is its child.
    assert_eq!(root_span.parent_span_id, SpanId::INVALID);
    let start = spans
        .iter()
        .find(|s| s.name == "create traced")
        .expect("the start's span");
    assert_eq!(start.parent_span_id, root.span_id());
    let failed = spans
        .iter()
        .find(|s| attr_str(s, "hephaestus.step") == "Right")
        .expect("the failed attempt's span");
    assert_eq!(attr_str(failed, "hephaestus.outcome"), "fatal");
    assert_eq!(failed.parent_span_id, root.span_id());
    h.teardown().await;
}

/// An instance failed by the failure handler (a scheduled resume that could
/// not be delivered was discarded), not by a step: its root span is
/// exported all the same, with error status.
#[tokio::test]
async fn an_instance_failed_by_a_discarded_job_has_an_error_root_span() {
    exporter();
    let h = Harness::postgres().await;
    let begin = ScriptedStep::new("Begin", ["done"]);
    let wf = Workflow::builder("awaited")
        .unique("order", Scope::Workflow)
        .start(begin.clone())
        .on(begin, "done", hephaestus_engine_core::steps::WaitForEvent)
        .on(
            hephaestus_engine_core::steps::WaitForEvent,
            "received",
            Done,
        )
        .build()
        .unwrap();
    let rt = h.runtime_with(config(), vec![wf], Vec::new());
    let started = rt
        .start("awaited", "3", json!({}), StartOptions::default())
        .await
        .unwrap();
    let root = root_of(&rt, started.id).await;
    rt.drain().await.unwrap();
    assert_eq!(
        rt.get(started.id).await.unwrap().unwrap().status,
        InstanceStatus::Waiting
    );
    h.discard_a_due_resume(
        &rt,
        started.id,
        hephaestus_engine_core::steps::WAIT_FOR_EVENT_ID,
        "received",
    )
    .await;
    assert_eq!(
        rt.get(started.id).await.unwrap().unwrap().status,
        InstanceStatus::Failed
    );
    let spans = spans_of(root.trace_id());
    let root_span = spans
        .iter()
        .find(|s| s.span_context.span_id() == root.span_id())
        .expect("the root span is exported when the failure handler fails the instance");
    assert!(
        matches!(&root_span.status, Status::Error { description } if description.contains("could not be delivered")),
        "{:?}",
        root_span.status
    );
    assert_eq!(attr_str(root_span, "hephaestus.status"), "failed");
    h.teardown().await;
}

/// A step that sleeps `ms`, then completes with `done`.
#[derive(Clone)]
struct Sleepy {
    id: &'static str,
    ms: u64,
}

#[async_trait::async_trait]
impl Step for Sleepy {
    fn id(&self) -> StepId {
        StepId::new(self.id).expect("a valid step id")
    }

    fn events(&self, _config: Option<&serde_json::Value>) -> Vec<Event> {
        vec![Event::new("done").expect("a valid event")]
    }

    async fn execute(&self, _input: hephaestus_engine_core::step::StepInput<'_>) -> StepOutcome {
        // not a wait: user code at work, so that the picture has bars of
        // different lengths
        tokio::time::sleep(Duration::from_millis(self.ms)).await;
        StepOutcome::complete("done")
    }
}

/// Draws a trace as an SVG waterfall: one row per span, depth-first from
/// the spans whose parent is not in the trace, children by start time; a
/// bar from start to end on a common time axis; error spans in red.
pub fn waterfall(spans: &[SpanData]) -> String {
    use std::fmt::Write as _;
    use std::time::UNIX_EPOCH;
    // Rows and depths are small counts.
    let count = |n: usize| f64::from(u32::try_from(n).unwrap_or(u32::MAX));
    let micros = |t: std::time::SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    let ids: std::collections::HashSet<SpanId> =
        spans.iter().map(|s| s.span_context.span_id()).collect();
    let mut rows: Vec<(usize, &SpanData)> = Vec::new();
    let mut stack: Vec<(usize, &SpanData)> = {
        let mut tops: Vec<&SpanData> = spans
            .iter()
            .filter(|s| !ids.contains(&s.parent_span_id))
            .collect();
        tops.sort_by_key(|s| std::cmp::Reverse(s.start_time));
        tops.into_iter().map(|s| (0, s)).collect()
    };
    while let Some((depth, span)) = stack.pop() {
        rows.push((depth, span));
        let mut children: Vec<&SpanData> = spans
            .iter()
            .filter(|c| c.parent_span_id == span.span_context.span_id())
            .collect();
        children.sort_by_key(|s| std::cmp::Reverse(s.start_time));
        stack.extend(children.into_iter().map(|c| (depth + 1, c)));
    }
    let t0 = spans
        .iter()
        .map(|s| micros(s.start_time))
        .fold(f64::MAX, f64::min);
    let t1 = spans
        .iter()
        .map(|s| micros(s.end_time))
        .fold(f64::MIN, f64::max);
    let total = (t1 - t0).max(1.0);
    let (label_w, bar_w, row_h, top) = (330.0, 600.0, 20.0, 30.0);
    let height = top + row_h * count(rows.len()) + 10.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="monospace" font-size="11">
<rect width="100%" height="100%" fill="#ffffff"/>
<text x="4" y="18" font-weight="bold">one trace: {n} spans, {ms:.1} ms</text>
"##,
        w = label_w + bar_w + 90.0,
        n = rows.len(),
        ms = total / 1000.0
    );
    for (i, (depth, span)) in rows.iter().enumerate() {
        let y = top + row_h * count(i);
        let start = micros(span.start_time) - t0;
        let length = (micros(span.end_time) - micros(span.start_time)).max(0.0);
        let x = label_w + bar_w * start / total;
        let w = (bar_w * length / total).max(1.5);
        let color = if matches!(span.status, Status::Error { .. }) {
            "#d9534f"
        } else if span.name.starts_with("workflow ") {
            "#1f4e79"
        } else if span.name.starts_with("process ") {
            "#4a9d5b"
        } else if span.name == "settle" {
            "#e39b2d"
        } else if span.name == "commit" {
            "#8c8c8c"
        } else {
            "#7b5ea7"
        };
        let step = attr_str(span, "hephaestus.step");
        let attempt = attr_i64(span, "hephaestus.attempt");
        let mut label = span.name.to_string();
        if !step.is_empty() && !span.name.contains(&step) {
            let _ = write!(label, " [{step}]");
        }
        if let (Some(attempt), true) = (attempt, span.name.starts_with("process ")) {
            let _ = write!(label, " #{attempt}");
        }
        let _ = writeln!(
            svg,
            r##"<text x="{lx}" y="{ty}">{label}</text><rect x="{x:.1}" y="{ry}" width="{w:.1}" height="{rh}" fill="{color}"/><text x="{dx:.1}" y="{ty}" fill="#555">{d:.2} ms</text>"##,
            lx = 4.0 + 12.0 * count(*depth),
            ty = y + 14.0,
            ry = y + 4.0,
            rh = row_h - 6.0,
            dx = x + w + 4.0,
            d = length / 1000.0,
            label = label.replace('&', "&amp;").replace('<', "&lt;"),
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The picture in the docs: a diamond run (with the caller's span above the
/// instance), exported and drawn as a waterfall. With
/// `HEPHAESTUS_TRACE_SVG=path` the SVG is written there
/// (`docs/observability-diamond-trace.svg`).
#[tokio::test]
async fn a_diamond_trace_renders_as_a_waterfall() {
    exporter();
    let h = Harness::postgres().await;
    let [split, left, right, merge] =
        [("Split", 5), ("Left", 30), ("Right", 15), ("Merge", 5)].map(|(id, ms)| Sleepy { id, ms });
    let wf = Workflow::builder("diamond")
        .unique("order", Scope::Workflow)
        .start(split.clone())
        .fan_out(
            split,
            "done",
            vec![target(left.clone()), target(right.clone())],
        )
        .on(left, "done", merge.clone())
        .on(right, "done", merge.clone())
        .on(merge, "done", Done)
        .build()
        .expect("a valid diamond");
    // The system clock: the root span's times are the instance's.
    let rt = Runtime::builder(h.backend.clone())
        .discard_handler(hephaestus_failure_handler::FailureHandler::new())
        .config(config())
        .workflow(wf)
        .build()
        .unwrap();
    let worker = start_worker(&rt).await;
    let caller = tracing::info_span!("POST /orders", otel.kind = "server");
    let started = {
        use tracing::Instrument as _;
        rt.start("diamond", "42", json!({}), StartOptions::default())
            .instrument(caller.clone())
            .await
            .unwrap()
    };
    drop(caller);
    let root = root_of(&rt, started.id).await;
    until_status(&[&rt], started.id, InstanceStatus::Completed).await;
    worker.shutdown(Duration::from_secs(5)).await;
    let spans = spans_of(root.trace_id());
    let svg = waterfall(&spans);
    assert_eq!(
        svg.matches("<rect x=").count(),
        spans.len(),
        "one bar per span"
    );
    for label in [
        "POST /orders",
        "workflow diamond",
        "create diamond",
        "process Split",
        "process Left",
        "process Right",
        "process Merge",
        "settle",
        "commit",
    ] {
        assert!(svg.contains(label), "{label} in the picture:\n{svg}");
    }
    // The root span starts with the instance, before its steps, and ends
    // after the first step.
    let root_span = spans
        .iter()
        .find(|s| s.span_context.span_id() == root.span_id())
        .unwrap();
    let steps: Vec<&SpanData> = spans
        .iter()
        .filter(|s| attr_str(s, "messaging.operation.name") == "execute")
        .collect();
    // The four steps and `Done` (applied inline, a step all the same).
    assert_eq!(steps.len(), 5);
    for step in steps {
        assert!(step.start_time >= root_span.start_time, "{}", step.name);
    }
    if let Some(path) = std::env::var_os("HEPHAESTUS_TRACE_SVG") {
        std::fs::write(&path, &svg).expect("writing the picture");
    }
    h.teardown().await;
}
