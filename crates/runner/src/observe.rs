//! Observability of the runner's work: the trace context an instance
//! carries, the `tracing` spans of its jobs, and the metrics that are not
//! telemetry events.
//!
//! One trace per instance. With the `otel` feature, a start stores a W3C
//! `traceparent` in the instance's telemetry metadata ([`TRACEPARENT`]): the
//! trace id (the caller's, when the caller's current span has an
//! OpenTelemetry context) and the span id of the instance's root span. Every
//! job of the instance copies it into its meta, so a span opened for the job
//! in any process, after any restart or retry, is parented into the same
//! trace. The root span itself is exported once, by the process whose
//! commit ends the instance, with the instance's creation time as its start
//! (see [`otel`]).
//!
//! The spans (`hephaestus.start`, `hephaestus.step`, `hephaestus.advance`,
//! `hephaestus.settle`, `hephaestus.commit`, ...) are ordinary `tracing`
//! spans at level `INFO` under the target [`TARGET`]: a log subscriber shows
//! their fields (instance id, step) on the events inside them, and without
//! a subscriber that wants them they cost one interest check each. Their
//! fields follow the OpenTelemetry messaging conventions where they fit
//! (`messaging.system`, `messaging.operation.type` = create, process or
//! settle, `messaging.destination.name` = the queue).

use hephaestus_engine_core::instance::{Instance, InstanceStatus};
use hephaestus_engine_core::ports::{JobLease, NewJob};
use serde_json::{Map, Value};
use tracing::Span;
use tracing::field::Empty;

/// The key of the instance's W3C trace context, in its telemetry metadata
/// and in the meta of each of its jobs.
pub const TRACEPARENT: &str = "traceparent";

/// The key, in the instance's telemetry metadata, of the W3C trace context
/// of the caller's span at start: the parent of the instance's root span.
pub const TRACE_CALLER: &str = "trace_caller";

/// The `tracing` target of the runner's spans.
pub const TARGET: &str = "hephaestus_runner::trace";

/// The value of `messaging.system` on every span.
const SYSTEM: &str = "hephaestus";

/// Copies the instance's trace context from `from` (its telemetry metadata,
/// or the meta of one of its jobs) into `job`'s meta. Nothing when there is
/// none.
pub fn carry(job: &mut NewJob, from: &Map<String, Value>) {
    if let Some(context) = from.get(TRACEPARENT) {
        job.meta.insert(TRACEPARENT.to_owned(), context.clone());
    }
}

/// [`carry`] for a job being built.
pub fn carried(mut job: NewJob, from: &Map<String, Value>) -> NewJob {
    carry(&mut job, from);
    job
}

/// Whether the runner's spans are wanted by the current subscriber (no
/// subscriber, or one filtering them out: no).
pub(crate) fn spans_enabled() -> bool {
    tracing::span_enabled!(target: TARGET, tracing::Level::INFO)
}

/// Parents `span` into the instance trace named by `meta` (a job's meta or
/// an instance's telemetry metadata). Without the `otel` feature the span
/// keeps its `tracing` parent.
fn join_trace(span: &Span, meta: &Map<String, Value>) {
    #[cfg(feature = "otel")]
    otel::set_parent(span, meta);
    #[cfg(not(feature = "otel"))]
    let _ = (span, meta);
}

/// The span of a start (a producer: it creates the instance and its first
/// jobs): a child of the caller's current span when there is one (beside
/// the instance's root span), else of the instance's root span.
pub(crate) fn start_span(workflow: &str, meta: &Map<String, Value>) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        "hephaestus.start",
        otel.name = %format_args!("create {workflow}"),
        otel.kind = "producer",
        "messaging.system" = SYSTEM,
        "messaging.operation.type" = "create",
        "messaging.operation.name" = "start",
        "hephaestus.workflow" = workflow,
        "hephaestus.instance_id" = Empty,
        "hephaestus.business_id" = Empty,
        "hephaestus.workflow.version" = Empty,
    );
    if Span::current().is_none() {
        join_trace(&span, meta);
    }
    span
}

/// Records the started instance on its start span.
pub(crate) fn record_started(span: &Span, instance: &Instance) {
    if span.is_disabled() {
        return;
    }
    span.record(
        "hephaestus.instance_id",
        tracing::field::display(instance.id),
    );
    span.record(
        "hephaestus.business_id",
        tracing::field::display(&instance.business_id),
    );
    span.record("hephaestus.workflow.version", instance.workflow_version);
}

/// The span of one attempt of a step (an execute job), in the instance's
/// trace.
pub(crate) fn step_span(
    lease: &JobLease,
    instance: &Instance,
    step: &hephaestus_engine_core::StepId,
    activation: u32,
) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        "hephaestus.step",
        otel.name = %format_args!("process {step}"),
        otel.kind = "consumer",
        otel.status_code = Empty,
        otel.status_description = Empty,
        "messaging.system" = SYSTEM,
        "messaging.operation.type" = "process",
        "messaging.operation.name" = "execute",
        "messaging.destination.name" = %lease.queue,
        "messaging.message.id" = lease.id.0,
        "hephaestus.workflow" = %instance.workflow_id,
        "hephaestus.workflow.version" = instance.workflow_version,
        "hephaestus.business_id" = %instance.business_id,
        "hephaestus.instance_id" = %instance.id,
        "hephaestus.step" = %step,
        "hephaestus.activation" = activation,
        "hephaestus.attempt" = lease.attempt,
        "hephaestus.outcome" = Empty,
        "hephaestus.event" = Empty,
        "error.type" = Empty,
    );
    join_trace(&span, &lease.meta);
    span
}

/// The span of a `Done` the orchestrator applied inline (no job runs it), a
/// step of the instance's trace like any other, so its `step.start` and
/// `step.stop` events name the step.
pub(crate) fn inline_done_span(
    instance: &Instance,
    step: &hephaestus_engine_core::StepId,
    activation: u32,
    queue: &str,
) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        "hephaestus.step",
        otel.name = %format_args!("process {step}"),
        otel.kind = "internal",
        "messaging.system" = SYSTEM,
        "messaging.operation.type" = "process",
        "messaging.operation.name" = "execute",
        "messaging.destination.name" = queue,
        "hephaestus.workflow" = %instance.workflow_id,
        "hephaestus.workflow.version" = instance.workflow_version,
        "hephaestus.business_id" = %instance.business_id,
        "hephaestus.instance_id" = %instance.id,
        "hephaestus.step" = %step,
        "hephaestus.activation" = activation,
        "hephaestus.attempt" = 1_u32,
        "hephaestus.outcome" = "completed",
        "hephaestus.event" = "done",
    );
    // A child of the instance's root span, like every step attempt.
    join_trace(&span, &instance.telemetry_metadata);
    span
}

/// How a step attempt ended, on its span: `outcome` (completed, async,
/// retryable, fatal), the event it completed with, and for an error its
/// kind and message with error status.
pub(crate) fn record_step(span: &Span, outcome: &hephaestus_engine_core::step::StepOutcome) {
    use hephaestus_engine_core::step::StepOutcome;
    if span.is_disabled() {
        return;
    }
    match outcome {
        StepOutcome::Complete(c) => {
            span.record("hephaestus.outcome", "completed");
            span.record("hephaestus.event", c.event.as_str());
        }
        StepOutcome::Async(_) => {
            span.record("hephaestus.outcome", "async");
        }
        StepOutcome::Error(e) => {
            let kind = if e.is_retryable() {
                "retryable"
            } else {
                "fatal"
            };
            span.record("hephaestus.outcome", kind);
            span.record("error.type", kind);
            span.record("otel.status_code", "error");
            span.record("otel.status_description", e.message.as_str());
        }
    }
}

/// The span of a job that is not a step attempt (advance, timer, resume),
/// in its instance's trace.
pub(crate) fn job_span(lease: &JobLease) -> Span {
    let instance = lease.meta.get("instance_id").and_then(Value::as_str);
    let step = lease.meta.get("step").and_then(Value::as_str);
    let span = tracing::info_span!(
        target: TARGET,
        "hephaestus.job",
        otel.name = %format_args!("process {}", lease.kind),
        otel.kind = "consumer",
        "messaging.system" = SYSTEM,
        "messaging.operation.type" = "process",
        "messaging.operation.name" = %lease.kind,
        "messaging.destination.name" = %lease.queue,
        "messaging.message.id" = lease.id.0,
        "hephaestus.workflow" = lease.meta.get("workflow").and_then(serde_json::Value::as_str),
        "hephaestus.instance_id" = instance,
        "hephaestus.step" = step,
        "hephaestus.attempt" = lease.attempt,
    );
    join_trace(&span, &lease.meta);
    span
}

/// The span of one job's share of a settling unit of work (its result
/// recorded, its instance's round applied, its lease completed): a child of
/// `parent` (the job's own span) when it has one, else in the trace named
/// by the job's meta. `batch` is the number of jobs settled together.
pub(crate) fn settle_span(
    parent: &Span,
    lease: &JobLease,
    instance_id: uuid::Uuid,
    batch: usize,
) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        parent: parent,
        "hephaestus.settle",
        otel.name = "settle",
        "messaging.system" = SYSTEM,
        "messaging.operation.type" = "settle",
        "messaging.operation.name" = "settle",
        "messaging.destination.name" = %lease.queue,
        "messaging.batch.message_count" = batch,
        "hephaestus.instance_id" = %instance_id,
        "hephaestus.job.kind" = %lease.kind,
        "hephaestus.status" = Empty,
    );
    if parent.is_none() {
        join_trace(&span, &lease.meta);
    }
    span
}

/// The span of the round that applies results to an instance outside a
/// batch (a direct advance), in the instance's trace.
pub(crate) fn round_span(instance_id: uuid::Uuid, meta: Option<&Map<String, Value>>) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        "hephaestus.settle",
        otel.name = "settle",
        "messaging.system" = SYSTEM,
        "messaging.operation.type" = "settle",
        "messaging.operation.name" = "advance",
        "messaging.batch.message_count" = 1_usize,
        "hephaestus.instance_id" = %instance_id,
        "hephaestus.status" = Empty,
    );
    if let Some(meta) = meta
        && Span::current().is_none()
    {
        join_trace(&span, meta);
    }
    span
}

/// Records the instance's status after a round on its settle span.
pub(crate) fn record_round(span: &Span, status: InstanceStatus) {
    if !span.is_disabled() {
        span.record("hephaestus.status", status.as_str());
    }
}

/// The span of the commit of a settling unit of work, under `parent`.
pub(crate) fn commit_span(parent: &Span, batch: usize) -> Span {
    tracing::info_span!(
        target: TARGET,
        parent: parent,
        "hephaestus.commit",
        otel.name = "commit",
        "db.operation.name" = "COMMIT",
        "messaging.batch.message_count" = batch,
    )
}

/// What follows an instance's end, once its commit is done: the
/// `hephaestus.workflow.end.count` metric and, with `otel`, its root span.
pub(crate) fn instance_ended(instance: &Instance, now: chrono::DateTime<chrono::Utc>) {
    metrics::counter!(
        "hephaestus.workflow.end.count",
        "workflow" => instance.workflow_id.as_str().to_owned(),
        "status" => instance.status.as_str()
    )
    .increment(1);
    #[cfg(feature = "otel")]
    otel::export_root(instance, now);
    #[cfg(not(feature = "otel"))]
    let _ = now;
}

/// Records the size of a settling unit of work (jobs settled together).
pub(crate) fn record_batch(jobs: usize) {
    // A batch holds at most `max_batch` jobs: far below f64's exact range.
    let jobs = u32::try_from(jobs).map_or(f64::from(u32::MAX), f64::from);
    metrics::histogram!("hephaestus.runner.batch.size").record(jobs);
}

#[cfg(feature = "otel")]
pub mod otel {
    //! The OpenTelemetry side of the instance trace (feature `otel`).
    //!
    //! The root span of an instance is exported when the instance ends,
    //! with the span id its children were given at start. The OpenTelemetry
    //! SDK draws span ids from its provider's id generator, so a provider
    //! that exports the runner's traces must use [`InstanceIdGenerator`]
    //! (random ids, except for the root span being exported); a provider
    //! without it exports the root span under an id of its own, with a
    //! warning, and the steps' spans point at a parent that is never
    //! exported.

    use std::cell::Cell;
    use std::sync::atomic::{AtomicBool, Ordering};

    use hephaestus_engine_core::instance::{Instance, InstanceStatus};
    use opentelemetry::trace::{
        Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
        TraceState, Tracer as _,
    };
    use opentelemetry::{Context, KeyValue};
    use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
    use serde_json::{Map, Value};
    use tracing::Span;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    use super::{TRACE_CALLER, TRACEPARENT};

    thread_local! {
        /// The ids the next span built on this thread takes (the root span
        /// being exported), consumed by [`InstanceIdGenerator`].
        pub(crate) static NEXT_IDS: Cell<(Option<TraceId>, Option<SpanId>)> = const { Cell::new((None, None)) };
    }

    /// The id generator of a tracer provider that exports instance traces:
    /// random ids, except for an instance's root span, which takes the ids
    /// stored with the instance at start.
    #[derive(Debug, Default)]
    pub struct InstanceIdGenerator {
        random: RandomIdGenerator,
    }

    impl IdGenerator for InstanceIdGenerator {
        fn new_trace_id(&self) -> TraceId {
            NEXT_IDS.with(|next| {
                let (trace, span) = next.get();
                next.set((None, span));
                trace.unwrap_or_else(|| self.random.new_trace_id())
            })
        }

        fn new_span_id(&self) -> SpanId {
            NEXT_IDS.with(|next| {
                let (trace, span) = next.get();
                next.set((trace, None));
                span.unwrap_or_else(|| self.random.new_span_id())
            })
        }
    }

    /// Formats a W3C `traceparent` (version 00).
    pub fn format_traceparent(context: &SpanContext) -> String {
        format!(
            "00-{}-{}-{:02x}",
            context.trace_id(),
            context.span_id(),
            context.trace_flags().to_u8()
        )
    }

    /// Parses a W3C `traceparent` (version 00) into a remote span context;
    /// `None` for anything else (malformed, all-zero ids).
    pub fn parse_traceparent(text: &str) -> Option<SpanContext> {
        let mut parts = text.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some()
            || version != "00"
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
        {
            return None;
        }
        let trace = TraceId::from_hex(trace).ok()?;
        let span = SpanId::from_hex(span).ok()?;
        let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?);
        let context = SpanContext::new(trace, span, flags, true, TraceState::default());
        context.is_valid().then_some(context)
    }

    fn stored(meta: &Map<String, Value>, key: &str) -> Option<SpanContext> {
        meta.get(key)
            .and_then(Value::as_str)
            .and_then(parse_traceparent)
    }

    /// Makes `span` a child of the instance's root span named by `meta`.
    pub(super) fn set_parent(span: &Span, meta: &Map<String, Value>) {
        if span.is_disabled() {
            return;
        }
        if let Some(parent) = stored(meta, TRACEPARENT) {
            // Fails only when no OpenTelemetry layer is installed: then
            // there is no trace to join.
            let _ = span.set_parent(Context::new().with_remote_span_context(parent));
        }
    }

    /// The trace context of a new instance, written into its telemetry
    /// metadata: a fresh root span id in the trace of the caller's current
    /// span (its context kept as [`TRACE_CALLER`]), else in the trace of a
    /// valid `traceparent` the caller put in the metadata, else in a new
    /// trace.
    pub(crate) fn begin(meta: &mut Map<String, Value>) {
        let ids = RandomIdGenerator::default();
        let current = Span::current().context();
        let current = current.span().span_context().clone();
        let caller = if current.is_valid() {
            Some(current)
        } else {
            stored(meta, TRACEPARENT)
        };
        let root = match &caller {
            Some(caller) => SpanContext::new(
                caller.trace_id(),
                ids.new_span_id(),
                caller.trace_flags(),
                true,
                TraceState::default(),
            ),
            None => SpanContext::new(
                ids.new_trace_id(),
                ids.new_span_id(),
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            ),
        };
        match caller {
            Some(caller) => {
                meta.insert(
                    TRACE_CALLER.to_owned(),
                    Value::String(format_traceparent(&caller)),
                );
            }
            None => {
                meta.remove(TRACE_CALLER);
            }
        }
        meta.insert(
            TRACEPARENT.to_owned(),
            Value::String(format_traceparent(&root)),
        );
    }

    static WARNED: AtomicBool = AtomicBool::new(false);

    /// Exports the root span of an ended instance: from its creation to
    /// `now`, with the ids stored at start, an error status when it failed.
    pub(super) fn export_root(instance: &Instance, now: chrono::DateTime<chrono::Utc>) {
        let Some(root) = stored(&instance.telemetry_metadata, TRACEPARENT) else {
            return;
        };
        let parent = match stored(&instance.telemetry_metadata, TRACE_CALLER) {
            Some(caller) => Context::new().with_remote_span_context(caller),
            None => Context::new(),
        };
        let tracer = opentelemetry::global::tracer("hephaestus");
        let mut attributes = vec![
            KeyValue::new("hephaestus.workflow", instance.workflow_id.to_string()),
            KeyValue::new(
                "hephaestus.workflow.version",
                i64::from(instance.workflow_version),
            ),
            KeyValue::new("hephaestus.business_id", instance.business_id.to_string()),
            KeyValue::new("hephaestus.instance_id", instance.id.to_string()),
            KeyValue::new("hephaestus.status", instance.status.as_str()),
        ];
        let failure = instance.failure.as_ref();
        if let Some(failure) = failure {
            if let Some(step) = &failure.step {
                attributes.push(KeyValue::new("hephaestus.failed_step", step.to_string()));
            }
            attributes.push(KeyValue::new(
                "error.type",
                if failure.error.is_retryable() {
                    "retryable"
                } else {
                    "fatal"
                },
            ));
        }
        let builder = tracer
            .span_builder(format!("workflow {}", instance.workflow_id))
            .with_kind(SpanKind::Internal)
            .with_start_time(std::time::SystemTime::from(instance.created_at))
            .with_attributes(attributes);
        NEXT_IDS.with(|next| next.set((Some(root.trace_id()), Some(root.span_id()))));
        let mut span = tracer.build_with_context(builder, &parent);
        NEXT_IDS.with(|next| next.set((None, None)));
        if span.span_context().is_valid()
            && span.span_context().span_id() != root.span_id()
            && !WARNED.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "the tracer provider does not use hephaestus_runner::observe::otel::InstanceIdGenerator: instance root spans get ids their steps do not point at"
            );
        }
        if instance.status == InstanceStatus::Failed {
            let message = failure.map_or_else(String::new, |f| f.error.message.clone());
            span.set_status(Status::error(message));
        } else {
            span.set_status(Status::Ok);
        }
        span.end_with_timestamp(std::time::SystemTime::from(now));
    }
}

#[cfg(test)]
mod tests {
    use hephaestus_engine_core::ports::NewJob;
    use serde_json::{Map, Value, json};

    use super::{TRACEPARENT, carry};

    #[test]
    fn a_job_carries_the_trace_context_it_is_given_and_nothing_else() {
        let mut with = Map::new();
        with.insert(TRACEPARENT.to_owned(), json!("00-ab-cd-01"));
        with.insert("tenant".to_owned(), json!("acme"));
        let mut job = NewJob::new("k", "q", json!({}));
        carry(&mut job, &with);
        assert_eq!(job.meta.get(TRACEPARENT), Some(&json!("00-ab-cd-01")));
        assert_eq!(job.meta.get("tenant"), None);
        let mut job = NewJob::new("k", "q", json!({}));
        carry(&mut job, &Map::<String, Value>::new());
        assert!(job.meta.is_empty());
    }

    #[cfg(feature = "otel")]
    mod otel {
        use opentelemetry::trace::{SpanId, TraceFlags, TraceId};
        use opentelemetry_sdk::trace::IdGenerator as _;
        use serde_json::{Map, Value, json};

        use super::super::otel::{
            InstanceIdGenerator, NEXT_IDS, begin, format_traceparent, parse_traceparent,
        };
        use super::super::{TRACE_CALLER, TRACEPARENT};

        const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

        #[test]
        fn traceparents_round_trip_and_malformed_ones_are_refused() {
            let context = parse_traceparent(VALID).expect("valid");
            assert_eq!(
                context.trace_id(),
                TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
            );
            assert_eq!(
                context.span_id(),
                SpanId::from_hex("00f067aa0ba902b7").unwrap()
            );
            assert_eq!(context.trace_flags(), TraceFlags::SAMPLED);
            assert!(context.is_remote());
            assert_eq!(format_traceparent(&context), VALID);
            for bad in [
                "",
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
                "00-xyz92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ] {
                assert!(parse_traceparent(bad).is_none(), "{bad:?}");
            }
        }

        fn stored(meta: &Map<String, Value>, key: &str) -> opentelemetry::trace::SpanContext {
            parse_traceparent(meta[key].as_str().unwrap()).unwrap()
        }

        #[test]
        fn a_start_without_a_caller_begins_a_new_sampled_trace() {
            let mut meta = Map::new();
            begin(&mut meta);
            let root = stored(&meta, TRACEPARENT);
            assert!(root.is_sampled());
            assert!(!meta.contains_key(TRACE_CALLER));
            let mut again = Map::new();
            begin(&mut again);
            assert_ne!(stored(&again, TRACEPARENT).trace_id(), root.trace_id());
        }

        #[test]
        fn a_start_joins_the_trace_the_caller_put_in_the_metadata() {
            let mut meta = Map::new();
            meta.insert(TRACEPARENT.to_owned(), json!(VALID));
            begin(&mut meta);
            let caller = parse_traceparent(VALID).unwrap();
            let root = stored(&meta, TRACEPARENT);
            assert_eq!(root.trace_id(), caller.trace_id());
            assert_ne!(root.span_id(), caller.span_id());
            assert_eq!(meta[TRACE_CALLER], json!(VALID));
            // A malformed one is replaced by a new trace.
            let mut meta = Map::new();
            meta.insert(TRACEPARENT.to_owned(), json!("not a traceparent"));
            meta.insert(TRACE_CALLER.to_owned(), json!("stale"));
            begin(&mut meta);
            assert!(parse_traceparent(meta[TRACEPARENT].as_str().unwrap()).is_some());
            assert!(!meta.contains_key(TRACE_CALLER));
        }

        #[test]
        fn the_id_generator_hands_out_the_stored_ids_once() {
            let ids = InstanceIdGenerator::default();
            let trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
            let span = SpanId::from_hex("00f067aa0ba902b7").unwrap();
            NEXT_IDS.with(|next| next.set((Some(trace), Some(span))));
            assert_eq!(ids.new_span_id(), span);
            assert_eq!(ids.new_trace_id(), trace);
            assert_ne!(ids.new_span_id(), span);
            assert_ne!(ids.new_trace_id(), trace);
        }
    }
}
