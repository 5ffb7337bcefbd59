//! One round of an instance, pure: from its workflow, the locked instance,
//! the round's inputs (stored results, then results applied as they are
//! recorded), the time and the configuration, to what the round writes and
//! the effects to carry out after the commit. No I/O: the advance job and
//! the batched settle both call [`plan`] and write what it returns.

use hephaestus_engine_core::Workflow;
use hephaestus_engine_core::engine::{Disposition, Effect, Engine, EngineEvent, Input};
use hephaestus_engine_core::instance::{Instance, InstanceStatus};
use hephaestus_engine_core::ports::{NewJob, NewStepResult};
use uuid::Uuid;

use crate::config::RunnerConfig;
use crate::error::RunnerError;
use crate::jobs;

/// One input of a round: a stored result (with its `seq`, marked processed
/// by the round) or a result applied as it is recorded (no `seq` yet).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RoundInput<'a> {
    pub seq: Option<i64>,
    pub result: &'a NewStepResult,
}

/// What one round decided for one instance: the writes, and the telemetry
/// for after the commit.
#[derive(Debug)]
pub(crate) struct Round {
    /// The instance the round is for: every job it creates is this
    /// instance's.
    pub instance_id: Uuid,
    pub status_before: InstanceStatus,
    /// The instance changed and must be written.
    pub changed: bool,
    /// Stored results the round consumed (refused ones included).
    pub seqs: Vec<i64>,
    /// Stored results the round refused, with the reason: recorded as
    /// refused, so they no longer hold their slot (see
    /// [`Refused`](hephaestus_engine_core::ports::Refused)).
    pub refused_stored: Vec<(i64, String)>,
    /// Results applied as they are recorded (inputs without a `seq`) that
    /// the round refused: the position among those inputs, and the reason.
    pub refused_new: Vec<(usize, String)>,
    /// Jobs to enqueue (none once the instance ended).
    pub new_jobs: Vec<NewJob>,
    /// Timers of resumed steps to cancel.
    pub cancel_timers: Vec<(hephaestus_engine_core::StepId, u32)>,
    /// The instance ended: cancel its remaining jobs, signal its steps.
    pub cancel_all: bool,
    /// `Done` activations the round applied inline (no job ran them): each
    /// still reports its `step.start` and `step.stop`.
    pub done: Vec<(hephaestus_engine_core::StepId, u32)>,
    pub events: Vec<EngineEvent>,
    pub applied: usize,
    pub ignored: usize,
    pub executions: usize,
}

impl Round {
    fn new(instance_id: Uuid, status_before: InstanceStatus) -> Self {
        Self {
            instance_id,
            status_before,
            changed: false,
            seqs: Vec::new(),
            refused_stored: Vec::new(),
            refused_new: Vec::new(),
            new_jobs: Vec::new(),
            cancel_timers: Vec::new(),
            cancel_all: false,
            done: Vec::new(),
            events: Vec::new(),
            applied: 0,
            ignored: 0,
            executions: 0,
        }
    }
}

/// Why the engine ignored a result, as kept with a refused row.
fn ignored_reason(why: &hephaestus_engine_core::Ignored) -> String {
    use hephaestus_engine_core::Ignored;
    match why {
        Ignored::InstanceFinished(status) => format!("the instance is {status}"),
        Ignored::AlreadyStarted => "the instance was already started".to_owned(),
        Ignored::StaleActivation { step, activation } => {
            format!("activation {activation} of step {step} is not active")
        }
        Ignored::StaleTimer { step, activation } => {
            format!("step {step} (activation {activation}) no longer waits on its timer")
        }
    }
}

/// Applies a round's inputs to a locked `instance` with the pure engine
/// (first the start of a pending instance, then each input in order) and
/// returns what to write. The engine completes `Done` activations itself
/// ([`Engine::complete_inline`]), so the end of a workflow costs no job.
pub(crate) fn plan(
    wf: &Workflow,
    instance: &mut Instance,
    inputs: &[RoundInput<'_>],
    now: chrono::DateTime<chrono::Utc>,
    config: &RunnerConfig,
) -> Result<Round, RunnerError> {
    let engine = Engine::new(wf);
    // A state that does not match its definition is an error of the job
    // (retried, then the instance fails with the reason), not of a result.
    engine.check(instance)?;
    let mut round = Round::new(instance.id, instance.status);
    let mut effects: Vec<Effect> = Vec::new();
    if instance.status == InstanceStatus::Pending {
        let applied = engine.apply(instance, Input::Start, now)?;
        round.changed = true;
        effects.extend(applied.effects);
    }
    let mut new_position = 0;
    for input in inputs {
        let refusal = apply_input(engine, instance, input, now, &mut round, &mut effects);
        if refusal.is_some() {
            round.ignored += 1;
        }
        if let Some(seq) = input.seq {
            round.seqs.push(seq);
            if let Some(reason) = refusal {
                round.refused_stored.push((seq, reason));
            }
        } else {
            if let Some(reason) = refusal {
                round.refused_new.push((new_position, reason));
            }
            new_position += 1;
        }
    }
    let inline = engine.complete_inline(instance, effects, now)?;
    round.done = inline.completed;
    for effect in inline.effects {
        carry_out(wf, instance, effect, config, &mut round);
    }
    if round.cancel_all {
        // The instance ended: nothing else of it may run (its executions,
        // timers and scheduled resumes).
        round.new_jobs.clear();
    }
    Ok(round)
}

/// Applies one input; returns why it was refused, if it was.
fn apply_input(
    engine: Engine<'_>,
    instance: &mut Instance,
    input: &RoundInput<'_>,
    now: chrono::DateTime<chrono::Utc>,
    round: &mut Round,
    effects: &mut Vec<Effect>,
) -> Option<String> {
    let instance_id = instance.id;
    let decoded = match input.result.to_input() {
        Ok(decoded) => decoded,
        Err(e) => {
            tracing::warn!(instance_id = %instance_id, seq = ?input.seq, error = %e, "step result cannot be decoded; refused");
            return Some(format!("cannot be decoded: {e}"));
        }
    };
    match engine.apply(instance, decoded, now) {
        Ok(applied) => match applied.disposition {
            Disposition::Applied | Disposition::Deferred => {
                round.changed = true;
                round.applied += 1;
                effects.extend(applied.effects);
                None
            }
            Disposition::Ignored(why) => {
                tracing::debug!(instance_id = %instance_id, seq = ?input.seq, reason = ?why, "step result ignored");
                Some(ignored_reason(&why))
            }
        },
        Err(e) => {
            tracing::warn!(instance_id = %instance_id, seq = ?input.seq, error = %e, "step result refused");
            Some(e.to_string())
        }
    }
}

/// Turns one engine effect into what the round writes.
fn carry_out(
    wf: &Workflow,
    instance: &Instance,
    effect: Effect,
    config: &RunnerConfig,
    round: &mut Round,
) {
    match effect {
        Effect::Execute { step, activation } => {
            round.executions += 1;
            let mut job = jobs::execute(config, wf, instance.id, &step, activation);
            crate::observe::carry(&mut job, &instance.telemetry_metadata);
            round.new_jobs.push(job);
        }
        Effect::ScheduleTimer {
            step,
            activation,
            fire_at,
            event,
        } => {
            let mut job = jobs::timer(config, wf, instance.id, &step, activation, &event, fire_at);
            crate::observe::carry(&mut job, &instance.telemetry_metadata);
            round.new_jobs.push(job);
        }
        Effect::CancelTimer { step, activation } => {
            round.cancel_timers.push((step, activation));
        }
        Effect::CancelJobs => round.cancel_all = true,
        Effect::Emit(event) => round.events.push(event),
    }
}
