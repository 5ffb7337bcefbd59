//! The runtime handle and its public API.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hephaestus_engine_core::business_id::{BusinessId, Scope};
use hephaestus_engine_core::engine::{Effect, Engine, Input, NewInstance};
use hephaestus_engine_core::instance::Instance;
use hephaestus_engine_core::limits::{self, JsonRole};
use hephaestus_engine_core::ports::{
    InstanceFilter, JobId, NewStepResult, PortError, Recorded, ResultPayload,
};
use hephaestus_engine_core::workflow::{StartSelection, WorkflowFamily, WorkflowRegistry};
use hephaestus_engine_core::{Event, StepId, Workflow};
use serde_json::{Map, Value};
use tracing::Instrument as _;
use uuid::Uuid;

use hephaestus_engine_core::clock::{self, Clock, SharedClock};

use crate::backend::Backend;
use crate::config::RunnerConfig;
use crate::error::RunnerError;
use crate::handle::{Batches, Inner, Runtime, random_u32};
use crate::jobs;
use crate::round::{self, Round};

/// Options of a start: [`StartOptions::default`], then the `with_*`
/// methods (new options may be added without breaking you).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct StartOptions {
    /// A version of the family (default: the selector's pick, else current).
    pub version: Option<u32>,
    /// Caller metadata added to every telemetry event (persisted).
    pub telemetry_metadata: Map<String, Value>,
    /// The instance id (default: a new UUID v7).
    pub id: Option<Uuid>,
}

impl StartOptions {
    /// Runs `version` of the family (instead of the selector's pick;
    /// `None` goes back to it).
    #[must_use]
    pub fn with_version(mut self, version: impl Into<Option<u32>>) -> Self {
        self.version = version.into();
        self
    }

    /// Sets the caller metadata added to every telemetry event.
    #[must_use]
    pub fn with_telemetry_metadata(mut self, metadata: Map<String, Value>) -> Self {
        self.telemetry_metadata = metadata;
        self
    }

    /// Gives the instance this id (instead of a new UUID v7; `None` goes
    /// back to that).
    #[must_use]
    pub fn with_id(mut self, id: impl Into<Option<Uuid>>) -> Self {
        self.id = id.into();
        self
    }
}

/// A started instance.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Started {
    /// Its UUID.
    pub id: Uuid,
    /// Its business id.
    pub business_id: BusinessId,
    /// The version it runs.
    pub version: u32,
}

/// Builds a [`Runtime`].
pub struct RuntimeBuilder<B> {
    backend: B,
    registry: WorkflowRegistry,
    config: RunnerConfig,
    clock: SharedClock,
    errors: Vec<RunnerError>,
    telemetry: crate::telemetry::Telemetry,
    discards: Option<Arc<dyn crate::handle::DiscardHandler<B>>>,
}

impl<B> fmt::Debug for RuntimeBuilder<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeBuilder").finish_non_exhaustive()
    }
}

impl<B: Backend> RuntimeBuilder<B> {
    /// Attaches the failure handler: what a job discarded for good (its
    /// attempts spent on errors outside user code, or its workers dying)
    /// means for its step and instance, written in the discarding
    /// transaction. Workers refuse to start without one
    /// ([`RunnerError::NoDiscardHandler`]); use
    /// `hephaestus_failure_handler::FailureHandler`.
    #[must_use]
    pub fn discard_handler(mut self, handler: impl crate::handle::DiscardHandler<B>) -> Self {
        self.discards = Some(Arc::new(handler));
        self
    }

    /// Registers a standalone workflow.
    #[must_use]
    pub fn workflow(mut self, workflow: Workflow) -> Self {
        if let Err(e) = self.registry.register(workflow) {
            self.errors.push(e.into());
        }
        self
    }

    /// Registers a versioned family.
    #[must_use]
    pub fn family(mut self, family: WorkflowFamily) -> Self {
        if let Err(e) = self.registry.register_family(family) {
            self.errors.push(e.into());
        }
        self
    }

    /// Sets the configuration.
    #[must_use]
    pub fn config(mut self, config: RunnerConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets the clock (a [`ManualClock`](hephaestus_engine_core::clock::ManualClock)
    /// in tests; give the backend the same one).
    #[must_use]
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Subscribes to telemetry before the runtime exists (to see `runner.init`).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<crate::telemetry::TelemetryEvent> {
        self.telemetry.subscribe()
    }

    /// Builds the runtime; fails on a duplicate registration.
    pub fn build(mut self) -> Result<Runtime<B>, RunnerError> {
        if !self.errors.is_empty() {
            return Err(self.errors.remove(0));
        }
        let batches = Batches::new(&self.config);
        let runtime = Runtime {
            inner: Arc::new(Inner {
                backend: self.backend,
                registry: self.registry,
                config: self.config,
                clock: self.clock,
                running: Mutex::new(HashMap::new()),
                wake: tokio::sync::Notify::new(),
                batches,
                telemetry: self.telemetry,
                discards: self.discards,
            }),
        };
        let workflows: Vec<String> = runtime
            .inner
            .registry
            .families()
            .map(|f| f.id().to_string())
            .collect();
        runtime.inner.telemetry.emit(
            crate::telemetry::names::RUNNER_INIT,
            serde_json::json!({"system_time": runtime.inner.clock.now()}),
            match serde_json::json!({
                "name": runtime.inner.config.name,
                "runner": "hephaestus-runner",
                "backend": std::any::type_name::<B>(),
                "workflows": workflows,
            }) {
                Value::Object(m) => m,
                _ => Map::new(),
            },
        );
        Ok(runtime)
    }
}

impl<B: Backend> Runtime<B> {
    /// Starts building a runtime over `backend`.
    pub fn builder(backend: B) -> RuntimeBuilder<B> {
        RuntimeBuilder {
            backend,
            registry: WorkflowRegistry::new(),
            config: RunnerConfig::default(),
            clock: clock::system(),
            errors: Vec::new(),
            telemetry: crate::telemetry::Telemetry::default(),
            discards: None,
        }
    }

    /// Starts an instance of `workflow` for `business_value` with `input`.
    /// The uniqueness check and the insert are one atomic step of the backend
    /// (G12); the first advance is enqueued in the same commit.
    pub async fn start(
        &self,
        workflow: &str,
        business_value: &str,
        input: Value,
        options: StartOptions,
    ) -> Result<Started, RunnerError> {
        #[cfg(feature = "otel")]
        let options = {
            let mut options = options;
            crate::observe::otel::begin(&mut options.telemetry_metadata);
            options
        };
        let span = crate::observe::start_span(workflow, &options.telemetry_metadata);
        async move {
            let b = &self.inner.backend;
            let began = self.now();
            let mut tx = b.begin().await?;
            let (started, instance, round) = self
                .start_inner(&mut tx, workflow, business_value, input, options)
                .await?;
            crate::observe::record_started(&tracing::Span::current(), &instance);
            b.commit(tx).await?;
            self.emit_start(&instance);
            self.after_round(&instance, &round, began, 1);
            Ok(started)
        }
        .instrument(span)
        .await
    }

    /// [`Runtime::start`] inside the caller's unit of work: the instance exists
    /// only if the caller commits.
    pub async fn start_in(
        &self,
        tx: &mut B::Tx,
        workflow: &str,
        business_value: &str,
        input: Value,
        options: StartOptions,
    ) -> Result<Started, RunnerError> {
        #[cfg(feature = "otel")]
        let options = {
            let mut options = options;
            crate::observe::otel::begin(&mut options.telemetry_metadata);
            options
        };
        let span = crate::observe::start_span(workflow, &options.telemetry_metadata);
        async move {
            let began = self.now();
            let (started, instance, round) = self
                .start_inner(tx, workflow, business_value, input, options)
                .await?;
            crate::observe::record_started(&tracing::Span::current(), &instance);
            // Emitted now: the caller's commit is not observable from here.
            self.emit_start(&instance);
            self.after_round(&instance, &round, began, 1);
            Ok(started)
        }
        .instrument(span)
        .await
    }

    fn emit_start(&self, instance: &Instance) {
        let start = self
            .workflow_of(instance)
            .map(|wf| wf.start().step.to_string())
            .unwrap_or_default();
        let context_keys: Vec<&String> = instance
            .context
            .initial
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        self.inner.telemetry.emit(
            crate::telemetry::names::WORKFLOW_START,
            serde_json::json!({"system_time": instance.created_at}),
            crate::telemetry::instance_metadata(
                instance,
                match serde_json::json!({"initial_step": start, "context_keys": context_keys, "runner": "hephaestus-runner"}) {
                    Value::Object(m) => m,
                    _ => Map::new(),
                },
            ),
        );
    }

    /// Subscribes to every telemetry event emitted after this call.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<crate::telemetry::TelemetryEvent> {
        self.inner.telemetry.subscribe()
    }

    async fn start_inner(
        &self,
        tx: &mut B::Tx,
        workflow: &str,
        business_value: &str,
        input: Value,
        options: StartOptions,
    ) -> Result<(Started, Instance, Round), RunnerError> {
        let family = self.inner.registry.family(workflow)?;
        let selection = StartSelection {
            business_value,
            input: &input,
            metadata: &options.telemetry_metadata,
        };
        let wf = family.resolve(options.version, &selection)?;
        let business_id = wf
            .unique()
            .business_id(business_value, random_u32().to_le_bytes())?;
        let id = options.id.unwrap_or_else(Uuid::now_v7);
        let mut instance = Engine::new(wf).new_instance(NewInstance {
            id,
            business_id: business_id.clone(),
            input,
            telemetry_metadata: options.telemetry_metadata,
            now: self.now(),
        })?;
        // The first round is applied here: nobody else can see the instance
        // before this commit, so this unit of work is its single writer. It
        // is inserted running, with the execute job of its start step.
        let round = round::plan(wf, &mut instance, &[], self.now(), &self.inner.config)?;
        let b = &self.inner.backend;
        b.insert(tx, &instance).await?;
        if !round.new_jobs.is_empty() {
            b.enqueue(tx, &round.new_jobs).await?;
        }
        Ok((
            Started {
                id,
                business_id,
                version: wf.version(),
            },
            instance,
            round,
        ))
    }

    /// The current state of an instance.
    pub async fn get(&self, id: Uuid) -> Result<Option<Instance>, RunnerError> {
        Ok(self.inner.backend.get(id).await?)
    }

    /// Instances matching `filter`, newest first.
    pub async fn list(&self, filter: &InstanceFilter) -> Result<Vec<Instance>, RunnerError> {
        Ok(self.inner.backend.list(filter).await?)
    }

    /// The instance of `workflow` for `business_value`: the active one if any,
    /// else the latest finished one.
    pub async fn get_by_business_value(
        &self,
        workflow: &str,
        business_value: &str,
    ) -> Result<Option<Instance>, RunnerError> {
        let family = self.inner.registry.family(workflow)?;
        let Some(business_id) = family.unique().address(business_value)? else {
            return Ok(None);
        };
        let all = self
            .list(
                &InstanceFilter::default()
                    .with_business_id(business_id)
                    .with_workflow_id(family.id().clone()),
            )
            .await?;
        let active = all.iter().find(|i| i.status.is_active()).cloned();
        Ok(active.or_else(|| all.into_iter().next()))
    }

    async fn active_by_business_value(
        &self,
        workflow: &str,
        business_value: &str,
    ) -> Result<Instance, RunnerError> {
        let family = self.inner.registry.family(workflow)?;
        if family.unique().scope == Scope::None {
            return Err(RunnerError::NotFound(format!(
                "{workflow} uses scope none: address its instances by id"
            )));
        }
        match self.get_by_business_value(workflow, business_value).await? {
            Some(i) if i.status.is_active() => Ok(i),
            _ => Err(RunnerError::NotFound(format!(
                "no active instance of {workflow} for {business_value:?}"
            ))),
        }
    }

    /// Resumes `step` of an instance with `event`; `payload` becomes the
    /// step's output. Validated now (G7): unknown step, undeclared event, not
    /// waiting are typed errors. A resume that arrives while the step still
    /// runs is kept and applied when it goes async.
    pub async fn resume(
        &self,
        id: Uuid,
        step: &str,
        event: &str,
        payload: Value,
    ) -> Result<(), RunnerError> {
        // Refused before anything is recorded: a payload the decoder could
        // not read back would poison the instance's inbox.
        limits::check(JsonRole::ResumePayload, &payload)?;
        let (wf, step, event, activation, telemetry) = self.resume_target(id, step, event).await?;
        let wf = &wf;
        let b = &self.inner.backend;
        let mut tx = b.begin().await?;
        let recorded = b
            .record(
                &mut tx,
                &NewStepResult {
                    instance_id: id,
                    step: Some(step.clone()),
                    activation,
                    payload: ResultPayload::Resume { event, payload },
                },
            )
            .await?;
        if recorded == Recorded::Duplicate {
            return Err(RunnerError::AlreadyResumed(step));
        }
        let advance = jobs::advance(&self.inner.config, wf, id, Some(&step));
        b.enqueue(&mut tx, &[crate::observe::carried(advance, &telemetry)])
            .await?;
        b.commit(tx).await?;
        self.inner.wake.notify_waiters();
        Ok(())
    }

    /// Validates a resume of `step` with `event` against the instance now
    /// (G7) and returns what it addresses: the workflow, the ids, and the
    /// step activation.
    async fn resume_target(
        &self,
        id: Uuid,
        step: &str,
        event: &str,
    ) -> Result<(Workflow, StepId, Event, u32, Map<String, Value>), RunnerError> {
        let instance = self
            .get(id)
            .await?
            .ok_or_else(|| RunnerError::NotFound(id.to_string()))?;
        let wf = self.workflow_of(&instance)?.clone();
        let step = StepId::new(step)?;
        let event = Event::new(event)?;
        let activation = Engine::new(&wf).check_resume(&instance, &step, &event)?;
        Ok((wf, step, event, activation, instance.telemetry_metadata))
    }

    /// [`Runtime::resume`] addressing the active instance of `workflow` for
    /// `business_value`.
    pub async fn resume_by_business_value(
        &self,
        workflow: &str,
        business_value: &str,
        step: &str,
        event: &str,
        payload: Value,
    ) -> Result<(), RunnerError> {
        let instance = self
            .active_by_business_value(workflow, business_value)
            .await?;
        self.resume(instance.id, step, event, payload).await
    }

    /// Resumes `step` with `event` after `delay` unless it was resumed before
    /// (a durable, cancellable job). Returns the job id to cancel it.
    pub async fn schedule_resume(
        &self,
        id: Uuid,
        step: &str,
        event: &str,
        delay: Duration,
    ) -> Result<JobId, RunnerError> {
        if delay.is_zero() {
            return Err(RunnerError::InvalidDelay {
                delay,
                reason: "a scheduled resume needs a positive delay (resume now with `resume`)",
            });
        }
        let too_large = RunnerError::InvalidDelay {
            delay,
            reason: "too large to schedule",
        };
        let at = chrono::Duration::from_std(delay)
            .ok()
            .and_then(|d| self.now().checked_add_signed(d))
            .ok_or(too_large)?;
        let (wf, step, event, activation, telemetry) = self.resume_target(id, step, event).await?;
        let wf = &wf;
        let args = jobs::ResumeArgs {
            instance_id: id,
            step,
            activation,
            event,
            payload: Value::Object(Map::new()),
        };
        let b = &self.inner.backend;
        let mut tx = b.begin().await?;
        let job = b
            .enqueue(
                &mut tx,
                &[crate::observe::carried(
                    jobs::resume(&self.inner.config, wf, &args, at),
                    &telemetry,
                )],
            )
            .await?;
        b.commit(tx).await?;
        Ok(job[0].id())
    }

    /// Cancels a scheduled resume; a typed error if it already fired.
    pub async fn cancel_scheduled_resume(&self, job: JobId) -> Result<(), RunnerError> {
        let b = &self.inner.backend;
        let mut tx = b.begin().await?;
        let cancelled = b.cancel(&mut tx, job).await?;
        if !cancelled {
            return Err(RunnerError::TimerAlreadyFinished(job.0));
        }
        b.commit(tx).await?;
        Ok(())
    }

    /// Cancels an instance now: status cancelled, its jobs cancelled, running
    /// steps signalled; nothing runs after (G14). Serialized with advances by
    /// the instance lock.
    ///
    /// An instance whose stored state cannot be decoded is still cancelled,
    /// by its status and its jobs alone (its state is left as it is for an
    /// operator to inspect; no history entry can be appended to it).
    pub async fn cancel(&self, id: Uuid, reason: Option<String>) -> Result<(), RunnerError> {
        let b = &self.inner.backend;
        let mut tx = b.begin().await?;
        let mut instance = match b.lock(&mut tx, id).await {
            Ok(Some(instance)) => instance,
            Ok(None) => return Err(RunnerError::NotFound(id.to_string())),
            Err(PortError::Corrupt(error)) => {
                // The lock statement took the lock before decoding failed.
                if !b.cancel_status_only(&mut tx, id, self.now()).await? {
                    return Err(RunnerError::Corrupt(format!(
                        "instance {id} is not active and cannot be decoded: {error}"
                    )));
                }
                self.close_ended(&mut tx, id, None).await?;
                b.commit(tx).await?;
                self.signal_cancelled(id);
                tracing::warn!(target: "hephaestus.workflow.cancel", instance_id = %id, error = %error, "undecodable workflow instance cancelled by its status");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let wf = self.workflow_of(&instance)?;
        let applied = Engine::new(wf).apply(&mut instance, Input::Cancel { reason }, self.now())?;
        b.update(&mut tx, &instance).await?;
        if applied.effects.contains(&Effect::CancelJobs) {
            // Its jobs cancelled, then the results still in the inbox
            // (they can no longer apply) marked processed.
            self.close_ended(&mut tx, id, None).await?;
        }
        b.commit(tx).await?;
        self.signal_cancelled(id);
        if applied.effects.contains(&Effect::CancelJobs) {
            crate::observe::instance_ended(&instance, self.now());
        }
        tracing::info!(target: "hephaestus.workflow.cancel", instance_id = %id, "Workflow cancelled");
        Ok(())
    }

    /// [`Runtime::cancel`] addressing the active instance of `workflow` for
    /// `business_value`.
    pub async fn cancel_by_business_value(
        &self,
        workflow: &str,
        business_value: &str,
        reason: Option<String>,
    ) -> Result<(), RunnerError> {
        let instance = self
            .active_by_business_value(workflow, business_value)
            .await?;
        self.cancel(instance.id, reason).await
    }
}
