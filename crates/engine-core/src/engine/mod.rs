//! The engine: pure transitions over an [`Instance`].
//!
//! Each call takes the instance, its workflow definition, an [`Input`] and
//! the current time, changes the instance in place and returns the
//! [`Effect`]s the runner must carry out (steps to execute with their
//! activation number, timers to schedule or cancel, jobs to cancel,
//! telemetry). No I/O, no clock reads, no randomness.
//!
//! Semantics (see `docs/architecture.md`):
//! - joins use dead-path elimination: a step becomes ready when every incoming
//!   edge is taken (its source completed and routed to it) or dead, and at
//!   least one was taken; a step whose incoming edges are all dead is dead,
//!   and deadness propagates;
//! - waiting is per step: other branches keep running; the instance is
//!   `waiting` only when nothing is active;
//! - a result is applied only to the step activation it names; applying it
//!   again is a no-op ([`Disposition::Ignored`]);
//! - an `Err` leaves the instance untouched.

mod apply;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::business_id::{BusinessId, UniqueClaim};
use crate::context::Context;
use crate::ids::{Event, StepId};
use crate::instance::{AttemptRecord, Instance, InstanceStatus, ResumeSource, StepStatus};
use crate::limits::{self, InvalidJson, JsonRole};
use crate::step::{AsyncWait, Completion, StepError, StepOutcome};
use crate::workflow::Workflow;

/// Something that happened to an instance, to be applied by the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Activate the start step of a pending instance.
    Start,
    /// A step activation completed.
    Completed {
        /// The step.
        step: StepId,
        /// Its activation.
        activation: u32,
        /// The completion the step returned.
        completion: Completion,
    },
    /// A step activation went async.
    Async {
        /// The step.
        step: StepId,
        /// Its activation.
        activation: u32,
        /// Its wait (and timer).
        wait: AsyncWait,
    },
    /// A caller resumes a step with an event.
    Resume {
        /// The step.
        step: StepId,
        /// The activation the caller saw, if it addressed one.
        activation: Option<u32>,
        /// The event; must be declared by the step.
        event: Event,
        /// Stored as the step's output (default `{}`).
        payload: Value,
    },
    /// A step's durable timer fired.
    TimerFired {
        /// The step.
        step: StepId,
        /// The activation that scheduled it.
        activation: u32,
        /// The timer's event.
        event: Event,
    },
    /// A step activation failed for good (fatal error or retries exhausted),
    /// or the instance itself failed (`step: None`).
    Failed {
        /// The failed step.
        step: Option<StepId>,
        /// Its activation.
        activation: u32,
        /// The final error.
        error: StepError,
        /// Every attempt's error.
        attempts: Vec<AttemptRecord>,
    },
    /// A caller cancels the instance.
    Cancel {
        /// Why.
        reason: Option<String>,
    },
    /// An operator restarts a failed instance where it failed: the failed
    /// step and every step the failure cancelled get a new activation (an
    /// [`Effect::Execute`] each), the status goes back to running and the
    /// failure record moves into the history
    /// ([`HistoryKind::Retried`](crate::instance::HistoryKind::Retried)).
    /// An instance that failed before its first step starts again. Only a
    /// failed instance can be retried ([`EngineError::NotFailed`]).
    Retry,
}

impl Input {
    /// The input for what a step returned, when it is final: completion,
    /// async, or a fatal error. A retryable error is not final (the queue
    /// retries) and yields `None`.
    pub fn from_outcome(step: StepId, activation: u32, outcome: StepOutcome) -> Option<Self> {
        match outcome {
            StepOutcome::Complete(completion) => Some(Self::Completed {
                step,
                activation,
                completion,
            }),
            StepOutcome::Async(wait) => Some(Self::Async {
                step,
                activation,
                wait,
            }),
            StepOutcome::Error(error) if !error.is_retryable() => Some(Self::Failed {
                step: Some(step),
                activation,
                error,
                attempts: Vec::new(),
            }),
            StepOutcome::Error(_) => None,
        }
    }
}

/// Work the runner must carry out after persisting the instance, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Execute a newly activated step (exactly once per activation).
    Execute {
        /// The step.
        step: StepId,
        /// Its activation.
        activation: u32,
    },
    /// Schedule a durable timer.
    ScheduleTimer {
        /// The waiting step.
        step: StepId,
        /// Its activation.
        activation: u32,
        /// When it fires.
        fire_at: DateTime<Utc>,
        /// The event it resumes with.
        event: Event,
    },
    /// Cancel the timer of a step activation (it was resumed first).
    CancelTimer {
        /// The step.
        step: StepId,
        /// Its activation.
        activation: u32,
    },
    /// The instance ended (failed or cancelled): cancel every remaining job
    /// of it (step executions and timers).
    CancelJobs,
    /// A telemetry event.
    Emit(EngineEvent),
}

/// Telemetry the engine reports as data; runners emit it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum EngineEvent {
    /// The instance started.
    WorkflowStarted {
        /// Its start step.
        start: StepId,
    },
    /// A step completed and activated `targets` (possibly none yet, at a join).
    Transition {
        /// The completed step.
        from: StepId,
        /// Its event.
        event: Event,
        /// Steps activated by this completion.
        targets: Vec<StepId>,
    },
    /// A step went async.
    StepAsync {
        /// The step.
        step: StepId,
    },
    /// A waiting step was resumed.
    StepResumed {
        /// The step.
        step: StepId,
        /// The event.
        event: Event,
        /// Caller or timer.
        source: ResumeSource,
    },
    /// Steps that became dead (paths not taken).
    StepsDead {
        /// The steps.
        steps: Vec<StepId>,
    },
    /// A resume that arrived while the step ran was dropped: it completed.
    ResumeDropped {
        /// The step.
        step: StepId,
        /// The dropped event.
        event: Event,
    },
    /// The instance completed.
    WorkflowCompleted,
    /// The instance failed.
    WorkflowFailed {
        /// The failed step.
        step: Option<StepId>,
        /// Why.
        message: String,
    },
    /// The instance was cancelled.
    WorkflowCancelled {
        /// Why.
        reason: Option<String>,
    },
}

/// What became of an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// It changed the instance.
    Applied,
    /// A resume for a step still executing: kept, applied when it goes async.
    Deferred,
    /// It did not apply (stale, duplicate or too late); the instance is unchanged.
    Ignored(Ignored),
}

/// Why an input was ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ignored {
    /// The instance already ended.
    InstanceFinished(InstanceStatus),
    /// The instance was already started.
    AlreadyStarted,
    /// The named step activation is not the active one (duplicate or stale).
    StaleActivation {
        /// The step.
        step: StepId,
        /// The activation named.
        activation: u32,
    },
    /// A timer for a step that is no longer waiting on it.
    StaleTimer {
        /// The step.
        step: StepId,
        /// The activation named.
        activation: u32,
    },
}

/// The result of applying one input.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// What became of the input.
    pub disposition: Disposition,
    /// Effects to carry out (empty unless applied or deferred).
    pub effects: Vec<Effect>,
}

impl Applied {
    /// The steps to execute, in order.
    pub fn executions(&self) -> impl Iterator<Item = (&StepId, u32)> {
        self.effects.iter().filter_map(|e| match e {
            Effect::Execute { step, activation } => Some((step, *activation)),
            _ => None,
        })
    }
}

/// What [`Engine::complete_inline`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inline {
    /// The effects left for the runner, in order.
    pub effects: Vec<Effect>,
    /// The activations the engine completed itself (`Done`), in order.
    pub completed: Vec<(StepId, u32)>,
}

/// A rejected input; the instance is unchanged.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The instance belongs to another workflow or version.
    #[error("instance runs {instance_workflow}@v{instance_version}, not {workflow}@v{version}")]
    WorkflowMismatch {
        /// The instance's workflow.
        instance_workflow: String,
        /// The instance's version.
        instance_version: u32,
        /// The definition's workflow.
        workflow: String,
        /// The definition's version.
        version: u32,
    },
    /// The step is not part of the workflow.
    #[error("step {0} is not part of this workflow")]
    UnknownStep(StepId),
    /// The event is not declared by the step.
    #[error("step {step} does not declare event :{event} (declared: {})", declared.iter().map(Event::as_str).collect::<Vec<_>>().join(", "))]
    UndeclaredEvent {
        /// The step.
        step: StepId,
        /// The event.
        event: Event,
        /// What it declares.
        declared: Vec<Event>,
    },
    /// The step is not waiting (nor executing) and cannot be resumed.
    #[error("step {step} is not waiting (state: {})", state.map_or("not reached", StepStatus::as_str))]
    NotWaiting {
        /// The step.
        step: StepId,
        /// Its state.
        state: Option<StepStatus>,
    },
    /// A resume is already pending for the step.
    #[error("step {0} already has a pending resume")]
    AlreadyResumed(StepId),
    /// The caller addressed another activation of the step.
    #[error("step {step} is at activation {current}, not {requested}")]
    StaleResume {
        /// The step.
        step: StepId,
        /// The activation addressed.
        requested: u32,
        /// The current activation.
        current: u32,
    },
    /// The instance already ended.
    #[error("instance is {0}; nothing can be resumed or cancelled")]
    InstanceFinished(InstanceStatus),
    /// Invalid input at start.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A JSON value that cannot enter an instance (not an object where one
    /// is needed, U+0000, too deep, too large: see [`crate::limits`]).
    #[error("invalid input: {0}")]
    InvalidJson(#[from] InvalidJson),
    /// The stored instance does not match its definition.
    #[error("corrupt instance state: {0}")]
    CorruptState(String),
    /// A retry of an instance that is not failed.
    #[error("instance is {0}, not failed: only a failed instance can be retried")]
    NotFailed(InstanceStatus),
}

/// Parameters of a new instance.
#[derive(Debug, Clone)]
pub struct NewInstance {
    /// Its UUID (v7 recommended: time-ordered).
    pub id: Uuid,
    /// Its business id.
    pub business_id: BusinessId,
    /// The start input (`context.initial`).
    pub input: Value,
    /// Caller metadata for telemetry.
    pub telemetry_metadata: Map<String, Value>,
    /// Creation time.
    pub now: DateTime<Utc>,
}

/// The pure engine for one workflow definition.
#[derive(Debug, Clone, Copy)]
pub struct Engine<'a> {
    workflow: &'a Workflow,
}

impl<'a> Engine<'a> {
    /// An engine for `workflow`.
    pub fn new(workflow: &'a Workflow) -> Self {
        Self { workflow }
    }

    /// Builds a pending instance (not started: apply [`Input::Start`]).
    pub fn new_instance(&self, params: NewInstance) -> Result<Instance, EngineError> {
        limits::check_object(JsonRole::Input, &params.input)?;
        limits::check_map(JsonRole::TelemetryMetadata, &params.telemetry_metadata)?;
        let wf = self.workflow;
        Ok(Instance {
            id: params.id,
            unique_claim: UniqueClaim::for_scope(
                wf.unique().scope,
                &params.business_id,
                wf.id(),
                wf.version(),
            ),
            business_id: params.business_id,
            workflow_id: wf.id().clone(),
            workflow_version: wf.version(),
            status: InstanceStatus::Pending,
            context: Context::new(params.input),
            step_configs: std::collections::BTreeMap::new(),
            runtime_metadata: Map::new(),
            steps: std::collections::BTreeMap::new(),
            history: Vec::new(),
            failure: None,
            telemetry_metadata: params.telemetry_metadata,
            created_at: params.now,
            updated_at: params.now,
            revision: 0,
        })
    }

    /// Applies one input. On `Err` the instance is unchanged.
    pub fn apply(
        &self,
        instance: &mut Instance,
        input: Input,
        now: DateTime<Utc>,
    ) -> Result<Applied, EngineError> {
        self.check_instance(instance)?;
        apply::Run::new(self.workflow, instance, now).apply(input)
    }

    /// Carries out, in order, the effects that need no runner: each
    /// execution of [`Done`](crate::steps::Done), whose outcome is fixed (it
    /// completes with `done`), is applied at once, and what that applies
    /// (the workflow's completion, a join it unblocks) joins the effects.
    /// Returns the remaining effects, in order, and the activations it
    /// completed, so a runner can report them as if a job had run them.
    /// The end of a workflow then costs no job.
    pub fn complete_inline(
        &self,
        instance: &mut Instance,
        effects: impl IntoIterator<Item = Effect>,
        now: DateTime<Utc>,
    ) -> Result<Inline, EngineError> {
        let mut queue: std::collections::VecDeque<Effect> = effects.into_iter().collect();
        let mut inline = Inline::default();
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::Execute { step, activation } if step.as_str() == crate::steps::DONE_ID => {
                    inline.completed.push((step.clone(), activation));
                    let applied = self.apply(
                        instance,
                        Input::Completed {
                            step,
                            activation,
                            completion: Completion::new("done"),
                        },
                        now,
                    )?;
                    if matches!(
                        applied.disposition,
                        Disposition::Applied | Disposition::Deferred
                    ) {
                        queue.extend(applied.effects);
                    }
                }
                other => inline.effects.push(other),
            }
        }
        Ok(inline)
    }

    /// Fails `instance` from outside its steps, with `error` (its cause, if
    /// set, is the failure's reason; else the reason follows the error's
    /// kind): what a failure handler does when a job the instance needs can
    /// never run (an orchestration out of attempts, a timer or a resume
    /// that cannot be delivered). Every open step is cancelled; the effects
    /// are the `WorkflowFailed` event and [`Effect::CancelJobs`].
    ///
    /// Needs no workflow definition (an associated function, not a method),
    /// so an instance whose definition this process lacks can still be
    /// failed. A finished instance is refused with
    /// [`EngineError::InstanceFinished`] and left unchanged.
    pub fn fail_instance(
        instance: &mut Instance,
        error: StepError,
        now: DateTime<Utc>,
    ) -> Result<Applied, EngineError> {
        if instance.status.is_terminal() {
            return Err(EngineError::InstanceFinished(instance.status));
        }
        let reason = crate::instance::FailureReason::of_step_error(&error, 1);
        let failure = apply::Failure {
            step: None,
            activation: 0,
            error,
            attempts: Vec::new(),
            reason,
        };
        let effects = apply::fail(instance, failure, now).into();
        instance.revision += 1;
        instance.updated_at = now;
        Ok(Applied {
            disposition: Disposition::Applied,
            effects,
        })
    }

    /// Checks that `step` of `instance` can be resumed with `event` now,
    /// without changing anything (runners call it before recording a resume).
    /// Returns the activation the resume addresses.
    pub fn check_resume(
        &self,
        instance: &Instance,
        step: &StepId,
        event: &Event,
    ) -> Result<u32, EngineError> {
        self.check_instance(instance)?;
        apply::check_resume(self.workflow, instance, step, event)
    }

    /// Checks that `instance` belongs to this definition and that its
    /// stored state only names steps the definition has.
    pub fn check(self, instance: &Instance) -> Result<(), EngineError> {
        self.check_instance(instance)
    }

    fn check_instance(self, instance: &Instance) -> Result<(), EngineError> {
        let wf = self.workflow;
        if instance.workflow_id != *wf.id() || instance.workflow_version != wf.version() {
            return Err(EngineError::WorkflowMismatch {
                instance_workflow: instance.workflow_id.to_string(),
                instance_version: instance.workflow_version,
                workflow: wf.id().to_string(),
                version: wf.version(),
            });
        }
        if let Some(unknown) = instance
            .steps
            .keys()
            .find(|s| wf.step(s.as_str()).is_none())
        {
            return Err(EngineError::CorruptState(format!(
                "instance has state for step {unknown}, which the workflow does not define"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
