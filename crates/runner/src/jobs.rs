//! The runner's job kinds and how they are enqueued. The arguments each
//! kind carries (the wire format) are private to the runner: other crates
//! build jobs through these functions and match them by kind and group.

use chrono::{DateTime, Utc};
use hephaestus_engine_core::ports::{JobMatch, JobState, NewJob, UniqueJob};
use hephaestus_engine_core::{Event, StepId, Workflow};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use hephaestus_engine_core::ports::JobLease;

use crate::config::RunnerConfig;
use crate::error::RunnerError;

/// Kind of the orchestrator job: applies results to one instance.
pub const ADVANCE: &str = "hephaestus.advance";
/// Kind of a step execution job.
pub const EXECUTE: &str = "hephaestus.execute";
/// Kind of a durable timer of a waiting step.
pub const TIMER: &str = "hephaestus.timer";
/// Kind of a scheduled resume (`schedule_resume`).
pub const RESUME: &str = "hephaestus.resume";

/// Arguments of an advance job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AdvanceArgs {
    /// The instance.
    pub instance_id: Uuid,
}

/// Arguments of an execute job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ExecuteArgs {
    /// The instance.
    pub instance_id: Uuid,
    /// The step.
    pub step: StepId,
    /// The step activation.
    pub activation: u32,
}

/// Arguments of a timer job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TimerArgs {
    /// The instance.
    pub instance_id: Uuid,
    /// The waiting step.
    pub step: StepId,
    /// Its activation.
    pub activation: u32,
    /// The event it resumes with.
    pub event: Event,
    /// Always true: lets `cancel_matching` pick timers out of an instance's jobs.
    pub timer: bool,
}

/// Arguments of a scheduled resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ResumeArgs {
    /// The instance.
    pub instance_id: Uuid,
    /// The step.
    pub step: StepId,
    /// Its activation when scheduled.
    pub activation: u32,
    /// The event.
    pub event: Event,
    /// The payload stored as the step's output.
    pub payload: Value,
}

const LIVE: [JobState; 4] = [
    JobState::Available,
    JobState::Scheduled,
    JobState::Executing,
    JobState::Retryable,
];

fn meta(workflow: &Workflow, instance_id: Uuid, step: Option<&StepId>) -> Map<String, Value> {
    let mut meta = workflow.metadata().clone();
    meta.insert("heph_workflow".into(), json!(workflow.id().short_name()));
    meta.insert("workflow".into(), json!(workflow.id().as_str()));
    meta.insert("workflow_version".into(), json!(workflow.version()));
    meta.insert("instance_id".into(), json!(instance_id));
    if let Some(step) = step {
        meta.insert("step".into(), json!(step.default_step_key()));
    }
    meta
}

fn tags(workflow: &Workflow) -> Vec<String> {
    let mut tags = vec![workflow.id().short_name()];
    for t in workflow.tags() {
        if !tags.contains(t) {
            tags.push(t.clone());
        }
    }
    tags
}

fn to_args<T: Serialize>(args: &T) -> Value {
    // These argument structs hold only strings, numbers and UUIDs: they
    // always serialize.
    serde_json::to_value(args).expect("job arguments serialize")
}

/// The advance job of an instance. Unique among jobs not yet running, so a
/// burst of results enqueues one advance, while a result arriving during a
/// running advance still enqueues the next one (no lost wake-up, G3).
pub fn advance(
    config: &RunnerConfig,
    workflow: &Workflow,
    instance_id: Uuid,
    step: Option<&StepId>,
) -> NewJob {
    let mut job = NewJob::new(
        ADVANCE,
        &config.queues.advance,
        to_args(&AdvanceArgs { instance_id }),
    );
    job.meta = meta(workflow, instance_id, step);
    job.tags = tags(workflow);
    job.group = Some(group(instance_id));
    job.max_attempts = config.advance_max_attempts;
    job.unique = Some(UniqueJob {
        key: format!("advance:{instance_id}"),
        states: vec![
            JobState::Available,
            JobState::Scheduled,
            JobState::Retryable,
        ],
    });
    job
}

/// The execute job of one step activation: unique forever (every state), so
/// an activation has exactly one job (G2).
pub fn execute(
    config: &RunnerConfig,
    workflow: &Workflow,
    instance_id: Uuid,
    step: &StepId,
    activation: u32,
) -> NewJob {
    let args = ExecuteArgs {
        instance_id,
        step: step.clone(),
        activation,
    };
    let mut job = NewJob::new(EXECUTE, &config.queues.execute, to_args(&args));
    job.meta = meta(workflow, instance_id, Some(step));
    job.tags = tags(workflow);
    job.group = Some(group(instance_id));
    job.max_attempts = workflow.retry_policy_for(step.as_str()).max_attempts;
    job.unique = Some(UniqueJob {
        key: format!("execute:{instance_id}:{step}:{activation}"),
        states: JobState::ALL.to_vec(),
    });
    job
}

/// A replacement for the lost execute job of an active step activation
/// (the reconciler's repair). The activation's own job is unique in every
/// state, so a replacement has a key of its own, unique while live: never
/// two live replacements, and user code still runs at most once per
/// recorded result (the execution's pre-check skips an activation whose
/// result is recorded or which is no longer active).
pub fn execute_replacement(
    config: &RunnerConfig,
    workflow: &Workflow,
    instance_id: Uuid,
    step: &StepId,
    activation: u32,
) -> NewJob {
    let mut job = execute(config, workflow, instance_id, step, activation);
    job.unique = Some(UniqueJob {
        key: format!("execute-replacement:{instance_id}:{step}:{activation}"),
        states: LIVE.to_vec(),
    });
    job
}

/// The durable timer of a waiting step activation.
pub fn timer(
    config: &RunnerConfig,
    workflow: &Workflow,
    instance_id: Uuid,
    step: &StepId,
    activation: u32,
    event: &Event,
    fire_at: DateTime<Utc>,
) -> NewJob {
    let args = TimerArgs {
        instance_id,
        step: step.clone(),
        activation,
        event: event.clone(),
        timer: true,
    };
    let mut job = NewJob::new(TIMER, &config.queues.timer, to_args(&args));
    job.meta = meta(workflow, instance_id, Some(step));
    job.tags = tags(workflow);
    job.group = Some(group(instance_id));
    job.max_attempts = config.advance_max_attempts;
    job.scheduled_at = Some(fire_at);
    job.unique = Some(UniqueJob {
        key: format!("timer:{instance_id}:{step}:{activation}"),
        states: LIVE.to_vec(),
    });
    job
}

/// A resume scheduled by `schedule_resume`.
pub(crate) fn resume(
    config: &RunnerConfig,
    workflow: &Workflow,
    args: &ResumeArgs,
    at: DateTime<Utc>,
) -> NewJob {
    let mut job = NewJob::new(RESUME, &config.queues.timer, to_args(args));
    job.meta = meta(workflow, args.instance_id, Some(&args.step));
    job.tags = tags(workflow);
    job.group = Some(group(args.instance_id));
    job.max_attempts = config.advance_max_attempts;
    job.scheduled_at = Some(at);
    job
}

/// The job group of an instance: every job of the instance is in it.
pub fn group(instance_id: Uuid) -> String {
    instance_id.to_string()
}

/// Matches every job of an instance (through the queue's group index).
pub fn of_instance(instance_id: Uuid) -> JobMatch {
    JobMatch::group(group(instance_id))
}

/// Matches the timer of one step activation.
pub fn timer_of(instance_id: Uuid, step: &StepId, activation: u32) -> JobMatch {
    of_instance(instance_id)
        .with_args(json!({ "step": step, "activation": activation, "timer": true }))
}

/// The arguments of a leased job, decoded; undecodable ones are
/// [`RunnerError::InvalidInput`] (they never get better).
pub(crate) fn decode<T: serde::de::DeserializeOwned>(lease: &JobLease) -> Result<T, RunnerError> {
    serde_json::from_value(lease.args.clone()).map_err(|e| {
        RunnerError::InvalidInput(format!(
            "job {} ({}) has undecodable args: {e}",
            lease.id, lease.kind
        ))
    })
}
