//! The transition rules.

mod retry;

use std::collections::{BTreeSet, VecDeque};

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::{Applied, Disposition, Effect, EngineError, EngineEvent, Ignored, Input};
use crate::ids::{Event, StepId};
use crate::instance::{
    AttemptRecord, FailureReason, FailureRecord, HistoryEntry, HistoryKind, Instance,
    InstanceStatus, PendingResume, ResumeSource, StepState, StepStatus, StepTimer,
};
use crate::limits::{self, JsonRole};
use crate::step::{AsyncWait, Completion, StepError};
use crate::workflow::{Route, Workflow};

/// Why a route failed the instance, and the message.
type RouteError = (FailureReason, String);

pub(super) struct Run<'a> {
    wf: &'a Workflow,
    inst: &'a mut Instance,
    now: DateTime<Utc>,
    effects: Vec<Effect>,
}

enum Readiness {
    Pending,
    Ready,
    Dead,
}

fn declared_events(wf: &Workflow, inst: &Instance, step: &StepId) -> Vec<Event> {
    wf.step(step.as_str())
        .map(|def| def.step.events(inst.step_configs.get(step)))
        .unwrap_or_default()
}

pub(super) fn check_resume(
    wf: &Workflow,
    inst: &Instance,
    step: &StepId,
    event: &Event,
) -> Result<u32, EngineError> {
    if inst.status.is_terminal() {
        return Err(EngineError::InstanceFinished(inst.status));
    }
    if wf.step(step.as_str()).is_none() {
        return Err(EngineError::UnknownStep(step.clone()));
    }
    let declared = declared_events(wf, inst, step);
    if !declared.contains(event) {
        return Err(EngineError::UndeclaredEvent {
            step: step.clone(),
            event: event.clone(),
            declared,
        });
    }
    match inst.steps.get(step) {
        Some(s) if s.status == StepStatus::Waiting => Ok(s.activation),
        Some(s) if s.status == StepStatus::Active => {
            if s.pending_resume.is_some() {
                Err(EngineError::AlreadyResumed(step.clone()))
            } else {
                Ok(s.activation)
            }
        }
        other => Err(EngineError::NotWaiting {
            step: step.clone(),
            state: other.map(|s| s.status),
        }),
    }
}

impl<'a> Run<'a> {
    pub(super) fn new(wf: &'a Workflow, inst: &'a mut Instance, now: DateTime<Utc>) -> Self {
        Self {
            wf,
            inst,
            now,
            effects: Vec::new(),
        }
    }

    pub(super) fn apply(mut self, input: Input) -> Result<Applied, EngineError> {
        let disposition = match input {
            Input::Start => self.start(),
            Input::Completed {
                step,
                activation,
                completion,
            } => self.completed(&step, activation, completion),
            Input::Async {
                step,
                activation,
                wait,
            } => self.went_async(&step, activation, &wait),
            Input::Resume {
                step,
                activation,
                event,
                payload,
            } => self.resume(&step, activation, &event, payload)?,
            Input::TimerFired {
                step,
                activation,
                event,
            } => self.timer_fired(&step, activation, &event),
            Input::Failed {
                step,
                activation,
                error,
                attempts,
            } => self.failed(step.as_ref(), activation, error, attempts),
            Input::Cancel { reason } => self.cancel(reason)?,
            Input::Retry => self.retry()?,
        };
        if matches!(disposition, Disposition::Applied | Disposition::Deferred) {
            self.settle();
            self.inst.revision += 1;
            self.inst.updated_at = self.now;
        } else {
            self.effects.clear();
        }
        Ok(Applied {
            disposition,
            effects: self.effects,
        })
    }

    fn history(&mut self, step: Option<&StepId>, activation: u32, kind: HistoryKind) {
        self.inst.history.push(HistoryEntry {
            at: self.now,
            step: step.cloned(),
            activation,
            kind,
        });
    }

    fn emit(&mut self, event: EngineEvent) {
        self.effects.push(Effect::Emit(event));
    }

    fn finished(&self) -> Option<Disposition> {
        self.inst
            .status
            .is_terminal()
            .then_some(Disposition::Ignored(Ignored::InstanceFinished(
                self.inst.status,
            )))
    }

    fn start(&mut self) -> Disposition {
        if let Some(d) = self.finished() {
            return d;
        }
        if self.inst.status != InstanceStatus::Pending {
            return Disposition::Ignored(Ignored::AlreadyStarted);
        }
        let start = self.wf.start().clone();
        self.inst.status = InstanceStatus::Running;
        self.history(None, 0, HistoryKind::Started);
        self.emit(EngineEvent::WorkflowStarted {
            start: start.step.clone(),
        });
        if let Some(cfg) = start.config {
            self.inst.step_configs.insert(start.step.clone(), cfg);
        }
        self.activate(&start.step);
        Disposition::Applied
    }

    fn activate(&mut self, step: &StepId) {
        let activation = self.inst.steps.get(step).map_or(1, |s| s.activation + 1);
        self.inst.steps.insert(
            step.clone(),
            StepState::new(StepStatus::Active, activation, self.now),
        );
        self.effects.push(Effect::Execute {
            step: step.clone(),
            activation,
        });
    }

    fn stale(&self, step: &StepId, activation: u32, allowed: &[StepStatus]) -> Option<Disposition> {
        if let Some(d) = self.finished() {
            return Some(d);
        }
        let ok = self
            .inst
            .steps
            .get(step)
            .is_some_and(|s| s.activation == activation && allowed.contains(&s.status));
        (!ok).then(|| {
            Disposition::Ignored(Ignored::StaleActivation {
                step: step.clone(),
                activation,
            })
        })
    }

    fn completed(&mut self, step: &StepId, activation: u32, c: Completion) -> Disposition {
        if let Some(d) = self.stale(step, activation, &[StepStatus::Active]) {
            return d;
        }
        let declared = declared_events(self.wf, self.inst, step);
        let event = match Event::new(c.event.as_str()) {
            Ok(e) if declared.contains(&e) => e,
            _ => {
                let msg = format!(
                    "step {step} returned undeclared event {:?} (declared: {})",
                    c.event.as_str(),
                    declared
                        .iter()
                        .map(Event::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                let reason = FailureReason::UndeclaredEvent {
                    event: c.event.as_str().to_owned(),
                };
                self.fail_fatally(Some(step), activation, msg, reason);
                return Disposition::Applied;
            }
        };
        if let Err(invalid) = limits::check(JsonRole::StepOutput, &c.output)
            .and_then(|()| limits::check_map(JsonRole::StepMetadata, &c.metadata))
        {
            let msg = format!("step {step} returned a value that cannot be stored: {invalid}");
            self.fail_fatally(Some(step), activation, msg, FailureReason::UnstorableValue);
            return Disposition::Applied;
        }
        if let Some(state) = self.inst.steps.get_mut(step)
            && let Some(dropped) = state.pending_resume.take()
        {
            self.history(
                Some(step),
                activation,
                HistoryKind::ResumeDropped {
                    event: dropped.event.clone(),
                },
            );
            self.emit(EngineEvent::ResumeDropped {
                step: step.clone(),
                event: dropped.event,
            });
        }
        self.finish_step(step, activation, &event, c.output, c.metadata, None);
        Disposition::Applied
    }

    /// Completes `step` with `event`: stores its output, routes, activates the
    /// ready targets and eliminates dead paths.
    fn finish_step(
        &mut self,
        step: &StepId,
        activation: u32,
        event: &Event,
        output: Value,
        metadata: Map<String, Value>,
        resumed: Option<ResumeSource>,
    ) {
        let key = self
            .wf
            .step(step.as_str())
            .map_or_else(|| step.default_step_key(), |d| d.key.clone());
        self.inst.context.put_step_output(key, output);
        for (k, v) in metadata {
            self.inst.runtime_metadata.insert(k, v);
        }
        let targets = match self.route(step, event) {
            Ok(t) => t,
            Err((reason, msg)) => {
                self.fail_fatally(Some(step), activation, msg, reason);
                return;
            }
        };
        // A resumed step has one entry, the resume (spec 3.6): it is how the
        // step completed.
        if let Some(source) = resumed {
            self.history(
                Some(step),
                activation,
                HistoryKind::Resumed {
                    event: event.clone(),
                    source,
                },
            );
            self.emit(EngineEvent::StepResumed {
                step: step.clone(),
                event: event.clone(),
                source,
            });
        } else {
            self.history(
                Some(step),
                activation,
                HistoryKind::Completed {
                    event: event.clone(),
                },
            );
        }
        if let Some(state) = self.inst.steps.get_mut(step) {
            state.status = StepStatus::Completed;
            state.event = Some(event.clone());
            state.targets = targets.iter().map(|(s, _)| s.clone()).collect();
            state.timer = None;
            state.updated_at = Some(self.now);
        }
        for (target, config) in targets {
            if let Some(cfg) = config {
                self.inst.step_configs.insert(target, cfg);
            }
        }
        let activated = self.propagate(step);
        self.emit(EngineEvent::Transition {
            from: step.clone(),
            event: event.clone(),
            targets: activated,
        });
    }

    /// The targets `step` routes to on `event`, validated (G26).
    fn route(
        &self,
        step: &StepId,
        event: &Event,
    ) -> Result<Vec<(StepId, Option<Value>)>, RouteError> {
        let Some(route) = self.wf.transition(step.as_str(), event.as_str()) else {
            // No transition (Done): the branch ends here.
            return Ok(Vec::new());
        };
        match route {
            Route::Static(targets) => Ok(targets
                .iter()
                .map(|t| (t.step.clone(), t.config.clone()))
                .collect()),
            Route::Dynamic { declared, route } => {
                let picks = route(&self.inst.context);
                if picks.is_empty() {
                    return Err((
                        FailureReason::NoTarget,
                        format!(
                            "NoTarget: the dynamic route from {step} on :{event} returned no target"
                        ),
                    ));
                }
                let mut out: Vec<(StepId, Option<Value>)> = Vec::new();
                for pick in picks {
                    let Some(decl) = declared.iter().find(|t| t.step.as_str() == pick.step) else {
                        let reason = FailureReason::UndeclaredTarget {
                            target: pick.step.clone(),
                        };
                        return Err((
                            reason,
                            format!(
                                "the dynamic route from {step} on :{event} returned {:?}, which is not among its declared targets ({})",
                                pick.step,
                                declared
                                    .iter()
                                    .map(|t| t.step.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ));
                    };
                    let config = pick.config.or_else(|| decl.config.clone());
                    if let Some(cfg) = &config {
                        if let Err(invalid) = limits::check(JsonRole::StepConfig, cfg) {
                            return Err((
                                FailureReason::InvalidConfig,
                                format!(
                                    "the config picked for {} cannot be stored: {invalid}",
                                    decl.step
                                ),
                            ));
                        }
                        if let Some(def) = self.wf.step(decl.step.as_str())
                            && let Err(reason) = def.step.validate_config(Some(cfg))
                        {
                            return Err((
                                FailureReason::InvalidConfig,
                                format!("invalid config for {}: {reason}", decl.step),
                            ));
                        }
                    }
                    if !out.iter().any(|(s, _)| *s == decl.step) {
                        out.push((decl.step.clone(), config));
                    }
                }
                Ok(out)
            }
        }
    }

    fn readiness(&self, step: &StepId) -> Readiness {
        let mut taken = false;
        for edge in self.wf.incoming(step.as_str()) {
            match self.inst.steps.get(&edge.from) {
                None => return Readiness::Pending,
                Some(s) => match s.status {
                    StepStatus::Active | StepStatus::Waiting => return Readiness::Pending,
                    StepStatus::Completed => {
                        if s.event.as_ref() == Some(&edge.event) && s.targets.contains(step) {
                            taken = true;
                        }
                    }
                    StepStatus::Dead | StepStatus::Failed | StepStatus::Cancelled => {}
                },
            }
        }
        if taken {
            Readiness::Ready
        } else {
            Readiness::Dead
        }
    }

    /// Activates every successor that became ready and marks dead the ones
    /// whose incoming edges are all dead, transitively. Returns the activated.
    fn propagate(&mut self, from: &StepId) -> Vec<StepId> {
        let mut queue: VecDeque<StepId> = self.wf.successors(from.as_str()).cloned().collect();
        let mut seen: BTreeSet<StepId> = BTreeSet::new();
        let mut activated = Vec::new();
        let mut dead = Vec::new();
        while let Some(candidate) = queue.pop_front() {
            if self.inst.steps.contains_key(&candidate) || !seen.insert(candidate.clone()) {
                continue;
            }
            match self.readiness(&candidate) {
                Readiness::Pending => {
                    // Not decided yet: it may be reached again through another
                    // path once more sources finish.
                    seen.remove(&candidate);
                }
                Readiness::Ready => {
                    self.activate(&candidate);
                    activated.push(candidate);
                }
                Readiness::Dead => {
                    self.inst.steps.insert(
                        candidate.clone(),
                        StepState::new(StepStatus::Dead, 0, self.now),
                    );
                    queue.extend(self.wf.successors(candidate.as_str()).cloned());
                    dead.push(candidate);
                }
            }
        }
        if !dead.is_empty() {
            self.emit(EngineEvent::StepsDead { steps: dead });
        }
        activated
    }

    fn went_async(&mut self, step: &StepId, activation: u32, wait: &AsyncWait) -> Disposition {
        if let Some(d) = self.stale(step, activation, &[StepStatus::Active]) {
            return d;
        }
        let timer = match &wait.timer {
            None => None,
            Some(spec) => {
                let declared = declared_events(self.wf, self.inst, step);
                let event = match Event::new(spec.event.as_str()) {
                    Ok(e) if declared.contains(&e) => e,
                    _ => {
                        let msg = format!(
                            "step {step} asked for a timer with undeclared event {:?}",
                            spec.event.as_str()
                        );
                        let reason = FailureReason::UndeclaredEvent {
                            event: spec.event.as_str().to_owned(),
                        };
                        self.fail_fatally(Some(step), activation, msg, reason);
                        return Disposition::Applied;
                    }
                };
                let Some(fire_at) = chrono::Duration::from_std(spec.after)
                    .ok()
                    .and_then(|d| self.now.checked_add_signed(d))
                else {
                    let msg = format!("step {step} asked for a timer too far in the future");
                    self.fail_fatally(Some(step), activation, msg, FailureReason::UnstorableValue);
                    return Disposition::Applied;
                };
                Some(StepTimer { fire_at, event })
            }
        };
        self.history(
            Some(step),
            activation,
            HistoryKind::Async {
                timer_at: timer.as_ref().map(|t| t.fire_at),
            },
        );
        self.emit(EngineEvent::StepAsync { step: step.clone() });
        let pending = self
            .inst
            .steps
            .get_mut(step)
            .and_then(|s| s.pending_resume.take());
        if let Some(resume) = pending {
            // A resume arrived while the step ran: apply it now; no timer needed.
            self.finish_step(
                step,
                activation,
                &resume.event,
                resume.payload,
                Map::new(),
                Some(ResumeSource::External),
            );
            return Disposition::Applied;
        }
        if let Some(state) = self.inst.steps.get_mut(step) {
            state.status = StepStatus::Waiting;
            state.timer.clone_from(&timer);
            state.updated_at = Some(self.now);
        }
        if let Some(t) = timer {
            self.effects.push(Effect::ScheduleTimer {
                step: step.clone(),
                activation,
                fire_at: t.fire_at,
                event: t.event,
            });
        }
        Disposition::Applied
    }

    fn resume(
        &mut self,
        step: &StepId,
        activation: Option<u32>,
        event: &Event,
        payload: Value,
    ) -> Result<Disposition, EngineError> {
        let current = check_resume(self.wf, self.inst, step, event)?;
        if let Some(requested) = activation
            && requested != current
        {
            return Err(EngineError::StaleResume {
                step: step.clone(),
                requested,
                current,
            });
        }
        limits::check(JsonRole::ResumePayload, &payload)?;
        let Some(state) = self.inst.steps.get_mut(step) else {
            return Err(EngineError::NotWaiting {
                step: step.clone(),
                state: None,
            });
        };
        if state.status == StepStatus::Active {
            state.pending_resume = Some(PendingResume {
                event: event.clone(),
                payload,
                at: self.now,
            });
            return Ok(Disposition::Deferred);
        }
        if state.timer.is_some() {
            self.effects.push(Effect::CancelTimer {
                step: step.clone(),
                activation: current,
            });
        }
        self.finish_step(
            step,
            current,
            event,
            payload,
            Map::new(),
            Some(ResumeSource::External),
        );
        Ok(Disposition::Applied)
    }

    fn timer_fired(&mut self, step: &StepId, activation: u32, event: &Event) -> Disposition {
        if let Some(d) = self.finished() {
            return d;
        }
        let live = self.inst.steps.get(step).is_some_and(|s| {
            s.status == StepStatus::Waiting
                && s.activation == activation
                && s.timer.as_ref().is_some_and(|t| t.event == *event)
        });
        if !live {
            return Disposition::Ignored(Ignored::StaleTimer {
                step: step.clone(),
                activation,
            });
        }
        self.finish_step(
            step,
            activation,
            event,
            Value::Object(Map::new()),
            Map::new(),
            Some(ResumeSource::Timer),
        );
        Disposition::Applied
    }

    fn failed(
        &mut self,
        step: Option<&StepId>,
        activation: u32,
        error: StepError,
        attempts: Vec<AttemptRecord>,
    ) -> Disposition {
        if let Some(step) = step
            && let Some(d) =
                self.stale(step, activation, &[StepStatus::Active, StepStatus::Waiting])
        {
            return d;
        }
        if let Some(d) = self.finished() {
            return d;
        }
        let tries = u32::try_from(attempts.len()).unwrap_or(u32::MAX).max(1);
        let reason = FailureReason::of_step_error(&error, tries);
        self.fail(step, activation, error, attempts, reason);
        Disposition::Applied
    }

    /// Fails the instance on a fatal error the engine itself found.
    fn fail_fatally(
        &mut self,
        step: Option<&StepId>,
        activation: u32,
        message: String,
        reason: FailureReason,
    ) {
        let error = StepError::fatal(message).with_cause(reason.clone());
        self.fail(step, activation, error, Vec::new(), reason);
    }

    fn fail(
        &mut self,
        step: Option<&StepId>,
        activation: u32,
        error: StepError,
        attempts: Vec<AttemptRecord>,
        reason: FailureReason,
    ) {
        let failure = Failure {
            step,
            activation,
            error,
            attempts,
            reason,
        };
        self.effects.extend(fail(self.inst, failure, self.now));
    }

    fn cancel(&mut self, reason: Option<String>) -> Result<Disposition, EngineError> {
        if self.inst.status.is_terminal() {
            return Err(EngineError::InstanceFinished(self.inst.status));
        }
        for state in self.inst.steps.values_mut() {
            if matches!(state.status, StepStatus::Active | StepStatus::Waiting) {
                state.status = StepStatus::Cancelled;
                state.timer = None;
                state.pending_resume = None;
                state.updated_at = Some(self.now);
            }
        }
        self.inst.status = InstanceStatus::Cancelled;
        self.history(
            None,
            0,
            HistoryKind::Cancelled {
                reason: reason.clone(),
            },
        );
        self.emit(EngineEvent::WorkflowCancelled { reason });
        self.effects.push(Effect::CancelJobs);
        Ok(Disposition::Applied)
    }

    /// Recomputes the status of a started, unfinished instance.
    fn settle(&mut self) {
        if !matches!(
            self.inst.status,
            InstanceStatus::Running | InstanceStatus::Waiting
        ) {
            return;
        }
        let mut any_active = false;
        let mut any_waiting = false;
        for s in self.inst.steps.values() {
            match s.status {
                StepStatus::Active => any_active = true,
                StepStatus::Waiting => any_waiting = true,
                _ => {}
            }
        }
        self.inst.status = if any_active {
            InstanceStatus::Running
        } else if any_waiting {
            InstanceStatus::Waiting
        } else {
            self.history(None, 0, HistoryKind::Finished);
            self.emit(EngineEvent::WorkflowCompleted);
            InstanceStatus::Completed
        };
    }
}

/// A failure the instance ends with.
pub(super) struct Failure<'s> {
    /// The failed step (`None`: the instance itself failed).
    pub(super) step: Option<&'s StepId>,
    pub(super) activation: u32,
    pub(super) error: StepError,
    pub(super) attempts: Vec<AttemptRecord>,
    pub(super) reason: FailureReason,
}

/// Ends `inst` as failed: the failed step (if any) marked failed, every
/// other open step cancelled, the history entry and the failure record
/// written. Returns the effects: the `WorkflowFailed` event, then the
/// cancellation of every job. Needs no workflow definition, so an instance
/// whose definition is gone can still be failed.
pub(super) fn fail(inst: &mut Instance, failure: Failure<'_>, now: DateTime<Utc>) -> [Effect; 2] {
    let Failure {
        step,
        activation,
        error,
        attempts,
        reason,
    } = failure;
    for (id, state) in &mut inst.steps {
        if matches!(state.status, StepStatus::Active | StepStatus::Waiting) {
            state.status = if Some(id) == step {
                StepStatus::Failed
            } else {
                StepStatus::Cancelled
            };
            state.timer = None;
            state.pending_resume = None;
            state.updated_at = Some(now);
        }
    }
    inst.status = InstanceStatus::Failed;
    inst.history.push(HistoryEntry {
        at: now,
        step: step.cloned(),
        activation,
        kind: HistoryKind::Failed {
            message: error.message.clone(),
        },
    });
    let event = EngineEvent::WorkflowFailed {
        step: step.cloned(),
        message: error.message.clone(),
    };
    inst.failure = Some(FailureRecord {
        reason,
        step: step.cloned(),
        activation,
        error,
        attempts,
        at: now,
    });
    [Effect::Emit(event), Effect::CancelJobs]
}
