//! Telemetry: the eleven events of the original (`hephaestus.workflow.start`,
//! ...), emitted by this runner as `tracing` events, broadcast to subscribers
//! as typed [`TelemetryEvent`]s, and recorded as metrics through the `metrics`
//! facade with the original's names (spec 8.3).
//!
//! Metadata merge: caller metadata first, then event-specific fields, then
//! the system fields (`instance_id`, `business_id`, `workflow`, `step`, ...)
//! which caller metadata can never override, and `workflow_version` last.

use chrono::{DateTime, Utc};
use hephaestus_engine_core::engine::EngineEvent;
use hephaestus_engine_core::instance::{Instance, InstanceStatus, StepStatus};
use serde::Serialize;
use serde_json::{Map, Value, json};

/// The event names, as the original's telemetry names them.
pub mod names {
    /// A workflow instance started.
    pub const WORKFLOW_START: &str = "hephaestus.workflow.start";
    /// A workflow instance completed.
    pub const WORKFLOW_STOP: &str = "hephaestus.workflow.stop";
    /// A workflow instance failed.
    pub const WORKFLOW_EXCEPTION: &str = "hephaestus.workflow.exception";
    /// A step completed and activated its targets.
    pub const WORKFLOW_TRANSITION: &str = "hephaestus.workflow.transition";
    /// A step execution started.
    pub const STEP_START: &str = "hephaestus.step.start";
    /// A step execution completed.
    pub const STEP_STOP: &str = "hephaestus.step.stop";
    /// A step execution failed.
    pub const STEP_EXCEPTION: &str = "hephaestus.step.exception";
    /// A step went async.
    pub const STEP_ASYNC: &str = "hephaestus.step.async";
    /// A waiting step was resumed.
    pub const STEP_RESUME: &str = "hephaestus.step.resume";
    /// An advance round ran.
    pub const ENGINE_ADVANCE: &str = "hephaestus.engine.advance";
    /// A runtime was built.
    pub const RUNNER_INIT: &str = "hephaestus.runner.init";

    /// All eleven.
    pub const ALL: [&str; 11] = [
        WORKFLOW_START,
        WORKFLOW_STOP,
        WORKFLOW_EXCEPTION,
        WORKFLOW_TRANSITION,
        STEP_START,
        STEP_STOP,
        STEP_EXCEPTION,
        STEP_ASYNC,
        STEP_RESUME,
        ENGINE_ADVANCE,
        RUNNER_INIT,
    ];
}

/// One telemetry event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct TelemetryEvent {
    /// One of [`names::ALL`].
    pub name: &'static str,
    /// Numbers (durations in milliseconds, counts).
    pub measurements: Map<String, Value>,
    /// Context: caller metadata merged under the system fields.
    pub metadata: Map<String, Value>,
}

/// Where events go: tracing, subscribers, metrics.
#[derive(Debug)]
pub(crate) struct Telemetry {
    sender: tokio::sync::broadcast::Sender<TelemetryEvent>,
}

impl Default for Telemetry {
    fn default() -> Self {
        let (sender, _) = tokio::sync::broadcast::channel(1024);
        Self { sender }
    }
}

fn ms_between(from: DateTime<Utc>, to: DateTime<Utc>) -> Option<i64> {
    let ms = (to - from).num_milliseconds();
    (ms >= 0).then_some(ms)
}

/// Builds the metadata of an instance-scoped event.
pub(crate) fn instance_metadata(
    instance: &Instance,
    extra: Map<String, Value>,
) -> Map<String, Value> {
    let mut meta = instance.telemetry_metadata.clone();
    meta.extend(extra);
    meta.insert("instance_id".into(), json!(instance.id));
    meta.insert("business_id".into(), json!(instance.business_id));
    meta.insert("workflow".into(), json!(instance.workflow_id));
    meta.insert("workflow_version".into(), json!(instance.workflow_version));
    meta
}

fn completed_steps(instance: &Instance) -> Vec<&str> {
    instance
        .steps
        .iter()
        .filter(|(_, s)| s.status == StepStatus::Completed)
        .map(|(id, _)| id.as_str())
        .collect()
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

impl Telemetry {
    /// A receiver of every later event.
    pub(crate) fn subscribe(&self) -> tokio::sync::broadcast::Receiver<TelemetryEvent> {
        self.sender.subscribe()
    }

    /// Whether anything takes event `name` beyond its metrics: a subscriber
    /// of [`Telemetry::subscribe`], or a `tracing` subscriber at the event's
    /// level. When nothing does, the hot path records the metrics alone
    /// ([`Telemetry::emit_lazy`]) and builds no event.
    pub(crate) fn observed(&self, name: &'static str) -> bool {
        if self.sender.receiver_count() > 0 {
            return true;
        }
        match name {
            names::WORKFLOW_EXCEPTION | names::STEP_EXCEPTION => {
                tracing::enabled!(tracing::Level::ERROR)
            }
            names::STEP_ASYNC => tracing::enabled!(tracing::Level::WARN),
            names::WORKFLOW_TRANSITION | names::ENGINE_ADVANCE => {
                tracing::enabled!(tracing::Level::DEBUG)
            }
            _ => tracing::enabled!(tracing::Level::INFO),
        }
    }

    /// Emits event `name` built by `build` when something takes it
    /// ([`Telemetry::observed`]); otherwise runs `metrics_only`, which
    /// records the event's metrics (the same definitions, see
    /// [`metric`]) without building it.
    pub(crate) fn emit_lazy(
        &self,
        name: &'static str,
        build: impl FnOnce() -> (Value, Map<String, Value>),
        metrics_only: impl FnOnce(),
    ) {
        if self.observed(name) {
            let (measurements, metadata) = build();
            self.emit(name, measurements, metadata);
        } else {
            metrics_only();
        }
    }

    /// Emits one event everywhere.
    pub(crate) fn emit(
        &self,
        name: &'static str,
        measurements: Value,
        metadata: Map<String, Value>,
    ) {
        let event = TelemetryEvent {
            name,
            measurements: obj(measurements),
            metadata,
        };
        record_metrics(&event);
        // The fields are serialized only when a subscriber takes the event:
        // telemetry runs several times per step, mostly with nobody
        // logging it.
        macro_rules! log_at {
            ($level:expr) => {
                if tracing::enabled!($level) {
                    let fields = serde_json::to_string(&event.metadata).unwrap_or_default();
                    let numbers = serde_json::to_string(&event.measurements).unwrap_or_default();
                    tracing::event!($level, telemetry = name, measurements = %numbers, metadata = %fields, "{name}");
                }
            };
        }
        match name {
            names::WORKFLOW_EXCEPTION | names::STEP_EXCEPTION => log_at!(tracing::Level::ERROR),
            names::STEP_ASYNC => log_at!(tracing::Level::WARN),
            names::WORKFLOW_TRANSITION | names::ENGINE_ADVANCE => log_at!(tracing::Level::DEBUG),
            _ => log_at!(tracing::Level::INFO),
        }
        // No subscriber is not an error.
        let _ = self.sender.send(event);
    }

    /// The events an advance round produced for `instance`.
    pub(crate) fn engine_events(
        &self,
        instance: &Instance,
        events: &[EngineEvent],
        now: DateTime<Utc>,
    ) {
        for event in events {
            match event {
                // No metric: built only when something takes it.
                EngineEvent::Transition { .. } if !self.observed(names::WORKFLOW_TRANSITION) => {}
                EngineEvent::Transition { from, event, targets } => self.emit(
                    names::WORKFLOW_TRANSITION,
                    json!({"targets_count": targets.len()}),
                    instance_metadata(
                        instance,
                        obj(json!({"from_step": from, "event": event, "targets": targets, "fan_out": targets.len() > 1})),
                    ),
                ),

                EngineEvent::StepResumed { step, event, source } => {
                    // Waited since the step went async (its last async entry).
                    let waited = instance
                        .history
                        .iter()
                        .rev()
                        .find(|h| {
                            h.step.as_ref() == Some(step)
                                && matches!(h.kind, hephaestus_engine_core::instance::HistoryKind::Async { .. })
                        })
                        .and_then(|h| ms_between(h.at, now));
                    self.emit(
                        names::STEP_RESUME,
                        json!({"system_time": now, "wait_duration": waited}),
                        instance_metadata(
                            instance,
                            obj(json!({"step": step, "step_key": step.default_step_key(), "resume_event": event, "source": source.telemetry_name()})),
                        ),
                    );
                }
                EngineEvent::WorkflowCompleted => {
                    let completed = completed_steps(instance);
                    self.emit(
                        names::WORKFLOW_STOP,
                        json!({
                            "duration": ms_between(instance.created_at, now),
                            "step_count": completed.len(),
                            "advance_count": instance.revision,
                        }),
                        instance_metadata(instance, obj(json!({"status": InstanceStatus::Completed, "completed_steps": completed}))),
                    );
                }
                EngineEvent::WorkflowFailed { step, message } => self.emit(
                    names::WORKFLOW_EXCEPTION,
                    json!({"duration": ms_between(instance.created_at, now)}),
                    instance_metadata(
                        instance,
                        obj(json!({
                            "kind": "error",
                            "reason": message,
                            "failed_step": step,
                            "status": InstanceStatus::Failed,
                            // As the original: the counts land in metadata.
                            "step_count": completed_steps(instance).len(),
                            "advance_count": instance.revision,
                        })),
                    ),
                ),
                // `step.async` is emitted by the step's execution, which
                // knows the attempt's duration.
                EngineEvent::WorkflowStarted { .. }
                | EngineEvent::StepAsync { .. }
                | EngineEvent::StepsDead { .. }
                | EngineEvent::ResumeDropped { .. }
                | EngineEvent::WorkflowCancelled { .. } => {
                    tracing::debug!(instance_id = %instance.id, event = ?event, "engine event");
                }
            }
        }
    }
}

fn label(event: &TelemetryEvent, key: &str) -> String {
    match event.metadata.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn number(event: &TelemetryEvent, key: &str) -> Option<f64> {
    event.measurements.get(key).and_then(Value::as_f64)
}

/// The nine metric definitions of spec 8.3.
fn record_metrics(event: &TelemetryEvent) {
    let workflow = label(event, "workflow");
    match event.name {
        names::WORKFLOW_START => {
            metrics::counter!("hephaestus.workflow.start.count", "workflow" => workflow)
                .increment(1);
        }
        names::WORKFLOW_STOP => {
            metrics::counter!("hephaestus.workflow.stop.count", "workflow" => workflow.clone())
                .increment(1);
            if let Some(ms) = number(event, "duration") {
                metrics::histogram!("hephaestus.workflow.stop.duration", "workflow" => workflow)
                    .record(ms);
            }
        }
        names::WORKFLOW_EXCEPTION => metrics::counter!(
            "hephaestus.workflow.exception.count",
            "workflow" => workflow,
            "failed_step" => label(event, "failed_step")
        )
        .increment(1),
        names::STEP_STOP => {
            if let Some(ms) = number(event, "duration") {
                metric::step_stop(workflow, label(event, "step"), ms);
            }
        }
        names::STEP_EXCEPTION => {
            metric::step_exception(workflow, label(event, "step"), label(event, "kind"));
        }
        names::STEP_ASYNC => metric::step_async(workflow, label(event, "step")),
        names::STEP_RESUME => {
            if let Some(ms) = number(event, "wait_duration") {
                metrics::histogram!(
                    "hephaestus.step.resume.wait_duration",
                    "workflow" => workflow,
                    "step" => label(event, "step"),
                    "source" => label(event, "source")
                )
                .record(ms);
            }
        }
        names::ENGINE_ADVANCE => {
            if let (Some(ms), Some(n)) = (
                number(event, "duration"),
                number(event, "active_steps_count"),
            ) {
                metric::engine_advance(workflow, ms, n);
            }
        }
        _ => {}
    }
}

/// The metrics of the events the hot path emits lazily, written once: used
/// from a built event and, when nothing takes the event, directly.
pub(crate) mod metric {
    /// `hephaestus.step.stop.duration`.
    pub(crate) fn step_stop(workflow: String, step: String, ms: f64) {
        metrics::histogram!("hephaestus.step.stop.duration", "workflow" => workflow, "step" => step)
            .record(ms);
    }

    /// `hephaestus.step.exception.count`.
    pub(crate) fn step_exception(workflow: String, step: String, kind: String) {
        metrics::counter!(
            "hephaestus.step.exception.count",
            "workflow" => workflow,
            "step" => step,
            "kind" => kind
        )
        .increment(1);
    }

    /// `hephaestus.step.async.count`.
    pub(crate) fn step_async(workflow: String, step: String) {
        metrics::counter!("hephaestus.step.async.count", "workflow" => workflow, "step" => step)
            .increment(1);
    }

    /// `hephaestus.engine.advance.duration` and
    /// `hephaestus.engine.advance.active_steps_count`.
    pub(crate) fn engine_advance(workflow: String, ms: f64, active_steps: f64) {
        metrics::histogram!("hephaestus.engine.advance.duration", "workflow" => workflow.clone())
            .record(ms);
        metrics::gauge!("hephaestus.engine.advance.active_steps_count", "workflow" => workflow)
            .set(active_steps);
    }
}
