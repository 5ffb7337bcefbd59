//! Step execution, timers and scheduled resumes: the jobs that never write the
//! instance. Each records its result and enqueues an advance in one commit.

use hephaestus_engine_core::instance::FailureReason;
use hephaestus_engine_core::limits::{self, JsonRole};
use hephaestus_engine_core::ports::{JobLease, NewStepResult, ResultPayload};
use hephaestus_engine_core::step::{
    CancellationSignal, StepError, StepInput, StepOutcome, panic_message,
};
use hephaestus_engine_core::{IdempotencyKey, StepId, Workflow};

use std::sync::Arc;

use hephaestus_engine_core::instance::Instance;

use crate::backend::Backend;
use crate::error::RunnerError;
use crate::handle::Runtime;
use crate::jobs::{ExecuteArgs, ResumeArgs, TimerArgs, decode};
use crate::outcome::{ChainStart, Continuation, JobOutcome, Settle, Settled};
use tracing::Instrument as _;

fn payload_of(outcome: StepOutcome) -> Result<ResultPayload, StepError> {
    match outcome {
        StepOutcome::Complete(c) => Ok(ResultPayload::Completed {
            event: c.event,
            output: c.output,
            metadata: c.metadata,
        }),
        StepOutcome::Async(wait) => Ok(ResultPayload::Async {
            timer_after_ms: wait
                .timer
                .as_ref()
                .map(|t| u64::try_from(t.after.as_millis()).unwrap_or(u64::MAX)),
            timer_event: wait.timer.map(|t| t.event),
        }),
        StepOutcome::Error(e) => Err(e),
    }
}

/// The longest step error message kept, in bytes; a longer one is cut (at
/// a character boundary) and marked, so a step cannot wedge its instance by
/// failing with a message too large to store.
pub(crate) const MAX_ERROR_MESSAGE_BYTES: usize = 64 * 1024;

/// What user code returned, made storable before anything is recorded: an
/// output or metadata that cannot be stored and read back (see
/// [`hephaestus_engine_core::limits`]) fails the step fatally instead (a
/// retry would return the same), and an error message loses its U+0000
/// characters and is cut to [`MAX_ERROR_MESSAGE_BYTES`].
pub(crate) fn storable_outcome(step: &StepId, outcome: StepOutcome) -> StepOutcome {
    match outcome {
        StepOutcome::Complete(c) => {
            match limits::check(JsonRole::StepOutput, &c.output)
                .and_then(|()| limits::check_map(JsonRole::StepMetadata, &c.metadata))
            {
                Ok(()) => StepOutcome::Complete(c),
                Err(invalid) => StepOutcome::Error(
                    StepError::fatal(format!(
                        "step {step} returned a value that cannot be stored: {invalid}"
                    ))
                    .with_cause(FailureReason::UnstorableValue),
                ),
            }
        }
        StepOutcome::Error(mut e) => {
            let mut message = std::mem::take(&mut e.message);
            if let Some(details) = &e.details
                && let Err(invalid) = limits::check(JsonRole::StepOutput, details)
            {
                e.details = None;
                message = format!("{message} (details dropped: {})", invalid.problem);
            }
            e.message = storable_message(message);
            StepOutcome::Error(e)
        }
        other @ StepOutcome::Async(_) => other,
    }
}

/// `message` without U+0000 and at most [`MAX_ERROR_MESSAGE_BYTES`] long.
pub(crate) fn storable_message(message: String) -> String {
    let mut message = if message.contains('\0') {
        message.replace('\0', "\u{fffd}")
    } else {
        message
    };
    if message.len() > MAX_ERROR_MESSAGE_BYTES {
        let mut cut = MAX_ERROR_MESSAGE_BYTES;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str(" [cut]");
    }
    message
}

impl<B: Backend> Runtime<B> {
    /// Runs one step activation (what an execute job does). User code runs
    /// outside any unit of work, only if the instance is still active, the
    /// step activation is still active, and no result is recorded for it.
    /// With `chain`, the worker then runs the continuations its results
    /// claimed (see [`RunnerConfig::continuations`](crate::RunnerConfig)).
    pub(crate) async fn perform_execute(
        &self,
        lease: &JobLease,
        args: ExecuteArgs,
        stop: Option<&CancellationSignal>,
        adopt: Option<&Adopt>,
        chain: bool,
    ) -> Result<JobOutcome, RunnerError> {
        let loaded = self
            .preflight(args.instance_id, args.step.clone(), args.activation)
            .await?;
        let Some((instance, recorded)) = loaded else {
            return self.finish(lease, JobOutcome::Skipped).await;
        };
        if !instance.is_step_active(args.step.as_str(), args.activation) {
            // Cancelled, failed, or a stale duplicate (G25).
            return self.finish(lease, JobOutcome::Skipped).await;
        }
        if recorded {
            // A result exists for this activation: never run user code again (G2).
            return self.finish(lease, JobOutcome::Skipped).await;
        }
        let wf = self.workflow_of(&instance)?.clone();
        // A worker asked to stop claims no continuation.
        let chain = chain && stop.is_none_or(|s| !s.is_cancelled());
        let settled = self
            .run_step(lease, wf, args, instance, stop, chain)
            .await?;
        let outcome = settled.outcome;
        self.run_chain(settled.into(), stop, adopt).await;
        Ok(outcome)
    }

    /// Runs the continuations a settled job claimed: `settled.next` in this
    /// task, one after the other, and each of `settled.extra` (further steps
    /// of a fan-out, each holding one of the runtime's extra slots) in a
    /// task of its own, all awaited before this returns (so the job's slot,
    /// and a graceful shutdown, wait for them). Each is adopted by the queue
    /// runtime running the job (heartbeats and stop requests, as for a
    /// fetched job) when `adopt` can, else kept alive by a heartbeat of the
    /// runner's own. A continuation's failure is settled like any job's.
    pub(crate) fn run_chain<'a>(
        &'a self,
        settled: ChainStart,
        stop: Option<&'a CancellationSignal>,
        adopt: Option<&'a Adopt>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(self.run_chain_inner(settled, stop, adopt))
    }

    async fn run_chain_inner(
        &self,
        settled: ChainStart,
        stop: Option<&CancellationSignal>,
        adopt: Option<&Adopt>,
    ) {
        let mut branches = tokio::task::JoinSet::new();
        let mut next = settled.next;
        let mut extra = settled.extra;
        loop {
            for continuation in extra.drain(..) {
                let rt = self.clone();
                let adopt = adopt.cloned();
                branches.spawn(async move {
                    rt.run_chain(
                        ChainStart {
                            next: Some(continuation),
                            extra: Vec::new(),
                        },
                        None,
                        adopt.as_ref(),
                    )
                    .await;
                });
            }
            let Some(continuation) = next.take() else {
                break;
            };
            let Continuation {
                lease,
                instance,
                wf,
                permit: _permit,
            } = continuation;
            let adopted = adopt.and_then(|adopt| adopt(&lease));
            let _alive = match adopted {
                Some(_) => None,
                None => Some(self.keep_alive(&lease)),
            };
            let own_stop = adopted.as_ref().map(|a| a.stop.clone());
            let args = match decode::<ExecuteArgs>(&lease) {
                Ok(args) => args,
                Err(e) => {
                    self.job_error(&lease, &e).await;
                    continue;
                }
            };
            // A worker asked to stop finishes this step but claims no more.
            let chain = stop.is_none_or(|s| !s.is_cancelled())
                && own_stop.as_ref().is_none_or(|s| !s.is_cancelled());
            match self
                .run_step(&lease, wf, args, instance, own_stop.as_ref(), chain)
                .await
            {
                Ok(settled) => {
                    next = settled.next;
                    extra = settled.extra;
                }
                Err(e) => {
                    self.job_error(&lease, &e).await;
                }
            }
        }
        while branches.join_next().await.is_some() {}
    }

    /// Heartbeats `lease` every heartbeat interval until the returned guard
    /// is dropped (a continuation is not one of the queue's running jobs).
    fn keep_alive(&self, lease: &JobLease) -> AbortOnDrop {
        let rt = self.clone();
        let held = [(lease.id, lease.attempt)];
        let every = self.inner.config.heartbeat_interval;
        AbortOnDrop(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                if let Err(e) = rt.inner.backend.heartbeat(&held).await {
                    tracing::warn!(error = %e, "heartbeat of a continuation failed");
                }
            }
        }))
    }

    /// Runs user code for an activation that passed its checks, then
    /// settles the outcome, in the span of this step attempt.
    async fn run_step(
        &self,
        lease: &JobLease,
        wf: Workflow,
        args: ExecuteArgs,
        instance: Arc<Instance>,
        stop: Option<&CancellationSignal>,
        chain: bool,
    ) -> Result<Settled, RunnerError> {
        let span = crate::observe::step_span(lease, &instance, &args.step, args.activation);
        self.run_step_in(lease, wf, args, instance, stop, chain, &span)
            .instrument(span.clone())
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_step_in(
        &self,
        lease: &JobLease,
        wf: Workflow,
        args: ExecuteArgs,
        instance: Arc<Instance>,
        stop: Option<&CancellationSignal>,
        chain: bool,
        span: &tracing::Span,
    ) -> Result<Settled, RunnerError> {
        let Some(def) = wf.step(args.step.as_str()) else {
            return Err(RunnerError::Corrupt(format!(
                "step {} is not part of {}",
                args.step,
                wf.id()
            )));
        };
        let step_impl = def.step.clone();
        let telemetry = &self.inner.telemetry;
        // Built only when something takes the step's events (the metrics
        // are recorded either way).
        let step_meta = [
            crate::telemetry::names::STEP_START,
            crate::telemetry::names::STEP_STOP,
            crate::telemetry::names::STEP_EXCEPTION,
            crate::telemetry::names::STEP_ASYNC,
        ]
        .into_iter()
        .any(|name| telemetry.observed(name))
        .then(|| step_metadata(&instance, &args, &def.key, lease.attempt));
        if let Some(meta) = &step_meta {
            telemetry.emit_lazy(
                crate::telemetry::names::STEP_START,
                || (serde_json::json!({"system_time": self.now()}), meta.clone()),
                || {},
            );
        }
        let workflow_id = instance.workflow_id.clone();
        // Durations read the runtime's clock, like every other time: a
        // virtual clock in tests makes them deterministic.
        let step_started = self.now();
        let outcome = self
            .call_step(step_impl, instance, &args, lease.attempt, stop, span)
            .await;
        let outcome = storable_outcome(&args.step, outcome);
        let duration = u64::try_from((self.now() - step_started).num_milliseconds()).unwrap_or(0);
        crate::observe::record_step(span, &outcome);
        match step_meta {
            Some(meta) => self.emit_step_outcome(meta, &outcome, duration),
            None => record_step_metrics(&workflow_id, &args.step, &outcome, duration),
        }
        match payload_of(outcome) {
            Ok(payload) => {
                self.settle(Settle::Result {
                    lease: lease.clone(),
                    wf,
                    result: NewStepResult {
                        instance_id: args.instance_id,
                        step: Some(args.step),
                        activation: args.activation,
                        payload,
                    },
                    chain: chain && self.inner.config.continuations,
                    origin: span.clone(),
                })
                .await
            }
            Err(error) => self
                .step_failed(lease, &wf, &args, error)
                .await
                .map(Settled::from),
        }
    }

    /// Runs user code in a task of its own (a panic becomes a retryable
    /// error), registered as running here so a cancel in this process stops
    /// it, and linked to `stop` (a cancel from another process).
    async fn call_step(
        &self,
        step_impl: Arc<dyn hephaestus_engine_core::step::Step>,
        instance: Arc<Instance>,
        args: &ExecuteArgs,
        attempt: u32,
        stop: Option<&CancellationSignal>,
        span: &tracing::Span,
    ) -> StepOutcome {
        let signal = CancellationSignal::new();
        self.register_running(args.instance_id, &signal);
        let link = stop.cloned().map(|stop| {
            let signal = signal.clone();
            tokio::spawn(async move {
                stop.cancelled().await;
                signal.cancel();
            })
        });
        let task_signal = signal.clone();
        let step_id = args.step.clone();
        let activation = args.activation;
        let handle = tokio::spawn(
            async move {
                let input = StepInput {
                    context: &instance.context,
                    config: instance.step_configs.get(&step_id),
                    instance_id: instance.id,
                    business_id: instance.business_id.as_str(),
                    activation,
                    attempt,
                    idempotency_key: IdempotencyKey {
                        instance_id: instance.id,
                        step: step_id.clone(),
                        activation,
                    },
                    cancellation: task_signal,
                };
                step_impl.execute(input).await
            }
            .instrument(span.clone()),
        );
        let joined = handle.await;
        if let Some(link) = link {
            link.abort();
        }
        self.unregister_running(args.instance_id, &signal);
        match joined {
            Ok(outcome) => outcome,
            Err(e) if e.is_panic() => {
                let text = panic_message(e.into_panic().as_ref());
                StepOutcome::Error(
                    StepError::retryable(format!("step panicked: {text}"))
                        .with_cause(FailureReason::StepPanicked),
                )
            }
            Err(e) => StepOutcome::Error(StepError::retryable(format!("step task failed: {e}"))),
        }
    }

    /// `step.stop`, `step.exception` or `step.async` for an attempt's
    /// outcome.
    fn emit_step_outcome(
        &self,
        mut meta: serde_json::Map<String, serde_json::Value>,
        outcome: &StepOutcome,
        duration: u64,
    ) {
        use crate::telemetry::names;
        let name = match outcome {
            StepOutcome::Complete(c) => {
                meta.insert("event".into(), serde_json::json!(c.event.as_str()));
                meta.insert(
                    "has_context_updates".into(),
                    serde_json::json!(c.output.as_object().is_none_or(|m| !m.is_empty())),
                );
                meta.insert(
                    "has_metadata_updates".into(),
                    serde_json::json!(!c.metadata.is_empty()),
                );
                names::STEP_STOP
            }
            StepOutcome::Error(e) => {
                let kind = if e.is_retryable() {
                    "retryable"
                } else {
                    "fatal"
                };
                meta.insert("kind".into(), serde_json::json!(kind));
                meta.insert("reason".into(), serde_json::json!(e.message));
                names::STEP_EXCEPTION
            }
            StepOutcome::Async(_) => {
                // As the original: the attempt's duration, and the status an
                // instance whose only open step went async takes.
                meta.insert(
                    "instance_status".into(),
                    serde_json::json!(hephaestus_engine_core::InstanceStatus::Waiting),
                );
                names::STEP_ASYNC
            }
        };
        self.inner
            .telemetry
            .emit(name, serde_json::json!({"duration": duration}), meta);
    }

    /// A durable timer fired: record it and enqueue the advance.
    pub(crate) async fn perform_timer(
        &self,
        lease: &JobLease,
        args: TimerArgs,
    ) -> Result<JobOutcome, RunnerError> {
        let payload = ResultPayload::Timer { event: args.event };
        self.record_event(lease, args.instance_id, args.step, args.activation, payload)
            .await
    }

    /// A scheduled resume is due: record it as a resume.
    pub(crate) async fn perform_resume(
        &self,
        lease: &JobLease,
        args: ResumeArgs,
    ) -> Result<JobOutcome, RunnerError> {
        let payload = ResultPayload::Resume {
            event: args.event,
            payload: args.payload,
        };
        self.record_event(lease, args.instance_id, args.step, args.activation, payload)
            .await
    }

    async fn record_event(
        &self,
        lease: &JobLease,
        instance_id: uuid::Uuid,
        step: hephaestus_engine_core::StepId,
        activation: u32,
        payload: ResultPayload,
    ) -> Result<JobOutcome, RunnerError> {
        let Some(instance) = self.get(instance_id).await? else {
            return self.finish(lease, JobOutcome::Skipped).await;
        };
        let wf = self.workflow_of(&instance)?.clone();
        let b = &self.inner.backend;
        let mut tx = b.begin().await?;
        if !b.complete(&mut tx, lease).await? {
            return Ok(JobOutcome::Fenced);
        }
        self.record_and_advance(
            tx,
            &wf,
            instance_id,
            &step,
            activation,
            payload,
            &lease.meta,
        )
        .await?;
        Ok(JobOutcome::Succeeded)
    }
}

/// A continuation adopted by the queue runtime running its worker: its
/// stop signal, and a guard that ends the adoption when dropped.
pub(crate) struct Adoption {
    /// Raised when the adopted job is asked to stop.
    pub stop: CancellationSignal,
    /// Held until the continuation ends; dropping it ends the adoption.
    pub _guard: Box<dyn Send>,
}

impl std::fmt::Debug for Adoption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adoption").finish_non_exhaustive()
    }
}

/// Adopts a continuation's lease into the queue runtime running the worker.
pub(crate) type Adopt = Arc<dyn Fn(&JobLease) -> Option<Adoption> + Send + Sync>;

/// Aborts a task when dropped.
pub(crate) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The metadata of a step attempt's telemetry events.
fn step_metadata(
    instance: &Instance,
    args: &ExecuteArgs,
    key: &impl serde::Serialize,
    attempt: u32,
) -> serde_json::Map<String, serde_json::Value> {
    let open = instance.open_steps().count();
    crate::telemetry::instance_metadata(
        instance,
        serde_json::Map::from_iter([
            ("step".to_owned(), serde_json::json!(args.step)),
            ("step_key".to_owned(), serde_json::json!(key)),
            ("activation".to_owned(), serde_json::json!(args.activation)),
            ("attempt".to_owned(), serde_json::json!(attempt)),
            ("active_steps_count".to_owned(), serde_json::json!(open)),
            // Other steps of the instance are open beside this one.
            ("concurrent".to_owned(), serde_json::json!(open > 1)),
        ]),
    )
}

/// The metrics of an attempt's outcome when nothing takes its event
/// (the same definitions the events record).
#[allow(clippy::cast_precision_loss)]
fn record_step_metrics(
    workflow: &hephaestus_engine_core::ids::WorkflowId,
    step: &hephaestus_engine_core::StepId,
    outcome: &StepOutcome,
    duration: u64,
) {
    use crate::telemetry::metric;
    let (workflow, step) = (workflow.to_string(), step.to_string());
    match outcome {
        StepOutcome::Complete(_) => metric::step_stop(workflow, step, duration as f64),
        StepOutcome::Error(e) => {
            let kind = if e.is_retryable() {
                "retryable"
            } else {
                "fatal"
            };
            metric::step_exception(workflow, step, kind.to_owned());
        }
        StepOutcome::Async(_) => metric::step_async(workflow, step),
    }
}
