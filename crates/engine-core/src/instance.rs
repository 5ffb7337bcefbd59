//! The instance: one execution of one workflow version, with per-step state.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::business_id::{BusinessId, UniqueClaim};
use crate::context::Context;
use crate::ids::{Event, StepId, WorkflowId};
use crate::step::StepError;

/// The lifecycle status of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    /// Created; the start step is not activated yet.
    Pending,
    /// At least one step is runnable.
    Running,
    /// Nothing is runnable and at least one step waits for a resume.
    Waiting,
    /// Every path reached its end.
    Completed,
    /// A step failed for good; see the failure record.
    Failed,
    /// Cancelled by a caller.
    Cancelled,
}

impl InstanceStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [Self; 6] = [
        Self::Pending,
        Self::Running,
        Self::Waiting,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
    ];

    /// The statuses among which business ids are unique.
    pub const ACTIVE: [Self; 3] = [Self::Pending, Self::Running, Self::Waiting];

    /// Pending, running or waiting.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Pending | Self::Running | Self::Waiting)
    }

    /// Completed, failed or cancelled: nothing happens to it any more.
    pub fn is_terminal(self) -> bool {
        !self.is_active()
    }

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Waiting => "waiting",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// An unknown status name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown instance status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for InstanceStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

impl fmt::Display for InstanceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state of one step within an instance. A step with no entry has not
/// been reached yet (pending).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Activated; its execution is due or running.
    Active,
    /// Returned async; waits for a resume or its timer.
    Waiting,
    /// Completed with an event.
    Completed,
    /// On a path that was not taken (dead-path elimination).
    Dead,
    /// Failed for good; the instance failed with it.
    Failed,
    /// Was active or waiting when the instance failed or was cancelled.
    Cancelled,
}

impl StepStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Waiting => "waiting",
            Self::Completed => "completed",
            Self::Dead => "dead",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for StepStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A durable timer a waiting step holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepTimer {
    /// When it fires.
    pub fire_at: DateTime<Utc>,
    /// The event it resumes the step with.
    pub event: Event,
}

/// A resume that arrived while the step was still executing; applied when the
/// step's async outcome is applied, dropped (and reported) if it completes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingResume {
    /// The event.
    pub event: Event,
    /// The payload stored as the step's output.
    pub payload: Value,
    /// When it arrived.
    pub at: DateTime<Utc>,
}

/// Per-step state within an instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    /// Where the step is.
    pub status: StepStatus,
    /// How many times the step was activated (1 for the first activation).
    pub activation: u32,
    /// The event it completed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<Event>,
    /// The targets its completion activated (the taken edges).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<StepId>,
    /// The timer of a waiting step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timer: Option<StepTimer>,
    /// A resume that arrived before the async outcome was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_resume: Option<PendingResume>,
    /// When the current activation began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<DateTime<Utc>>,
    /// When it reached its current status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
}

impl StepState {
    pub(crate) fn new(status: StepStatus, activation: u32, now: DateTime<Utc>) -> Self {
        Self {
            status,
            activation,
            event: None,
            targets: Vec::new(),
            timer: None,
            pending_resume: None,
            activated_at: (status == StepStatus::Active).then_some(now),
            updated_at: Some(now),
        }
    }
}

/// Where a resume came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResumeSource {
    /// A caller's `resume`.
    External,
    /// A durable timer.
    Timer,
}

impl ResumeSource {
    /// The name telemetry gives it (the original's `source`): `external`
    /// or `timeout`.
    pub fn telemetry_name(self) -> &'static str {
        match self {
            Self::External => "external",
            Self::Timer => "timeout",
        }
    }
}

/// One entry of the execution history (the audit trail).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When it happened.
    pub at: DateTime<Utc>,
    /// The step concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<StepId>,
    /// The step's activation (0 for instance-level entries).
    #[serde(default)]
    pub activation: u32,
    /// What happened.
    #[serde(flatten)]
    pub kind: HistoryKind,
}

/// What a history entry records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HistoryKind {
    /// The instance started.
    Started,
    /// A step completed with an event.
    Completed {
        /// The event.
        event: Event,
    },
    /// A step went async.
    Async {
        /// Its timer's due time.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timer_at: Option<DateTime<Utc>>,
    },
    /// A waiting step was resumed.
    Resumed {
        /// The event.
        event: Event,
        /// Caller or timer.
        source: ResumeSource,
    },
    /// A resume that arrived early was dropped because the step completed.
    ResumeDropped {
        /// The dropped event.
        event: Event,
    },
    /// The instance failed.
    Failed {
        /// The reason.
        message: String,
    },
    /// The instance was cancelled.
    Cancelled {
        /// The caller's reason.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Every path ended; the instance completed.
    Finished,
    /// An operator retried the failed instance: the failure it had, and the
    /// steps that got a new activation.
    Retried {
        /// The failure record the instance had (none if it had none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failure: Option<Box<FailureRecord>>,
        /// The steps activated again (the start step if none had run).
        steps: Vec<StepId>,
    },
}

impl fmt::Display for HistoryKind {
    /// What happened, as operators read it (`completed with :done`,
    /// `resumed with :received (external)`, `retried: restarted B`); times
    /// in RFC 3339, UTC, milliseconds.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Started => f.write_str("started"),
            Self::Completed { event } => write!(f, "completed with :{event}"),
            Self::Async { timer_at: None } => f.write_str("went async"),
            Self::Async { timer_at: Some(at) } => write!(
                f,
                "went async, timer at {}",
                at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            ),
            Self::Resumed { event, source } => write!(
                f,
                "resumed with :{event} ({})",
                match source {
                    ResumeSource::External => "external",
                    ResumeSource::Timer => "timer",
                }
            ),
            Self::ResumeDropped { event } => {
                write!(f, "resume :{event} dropped (the step completed first)")
            }
            Self::Failed { message } => write!(f, "failed: {message}"),
            Self::Cancelled { reason: None } => f.write_str("cancelled"),
            Self::Cancelled {
                reason: Some(reason),
            } => write!(f, "cancelled: {reason}"),
            Self::Finished => f.write_str("instance completed"),
            Self::Retried { failure, steps } => {
                let steps: Vec<&str> = steps.iter().map(StepId::as_str).collect();
                write!(f, "retried: restarted {}", steps.join(", "))?;
                match failure {
                    Some(failure) => write!(f, " (the failure was: {})", failure.error.message),
                    None => Ok(()),
                }
            }
        }
    }
}

/// One failed attempt of a step activation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The attempt number (1-based).
    pub attempt: u32,
    /// When it failed.
    pub at: DateTime<Utc>,
    /// Why.
    pub error: StepError,
}

/// Why an instance failed, whichever process or path failed it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureReason {
    /// The step kept failing until its attempts ran out (each attempt's
    /// error is in the record's `attempts`).
    AttemptsExhausted {
        /// How many attempts were made.
        attempts: u32,
    },
    /// The step returned a fatal error.
    StepFatal,
    /// The step panicked on its last attempt.
    StepPanicked,
    /// The step's worker kept dying (its job was rescued until the queue
    /// gave up on it).
    WorkerLost,
    /// The step completed with (or asked for a timer with) an event it does
    /// not declare.
    UndeclaredEvent {
        /// The event.
        event: String,
    },
    /// A dynamic route picked a step that is not among its declared targets.
    UndeclaredTarget {
        /// The step picked.
        target: String,
    },
    /// A dynamic route picked no target.
    NoTarget,
    /// A config picked at run time is invalid.
    InvalidConfig,
    /// The step returned a value that cannot be stored (see
    /// [`crate::limits`]), or a timer too far in the future.
    UnstorableValue,
    /// The instance's stored state does not match its definition.
    CorruptState,
    /// The instance's workflow or version is not registered.
    UnknownWorkflow,
    /// A job orchestrating the instance (advance, timer, scheduled resume)
    /// was discarded: what it carried can no longer be delivered.
    JobDiscarded {
        /// The job's kind.
        job: String,
    },
    /// A record written before failure reasons were kept.
    #[default]
    Unknown,
}

impl FailureReason {
    /// The reason's name, as stored (`attempts_exhausted`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::AttemptsExhausted { .. } => "attempts_exhausted",
            Self::StepFatal => "step_fatal",
            Self::StepPanicked => "step_panicked",
            Self::WorkerLost => "worker_lost",
            Self::UndeclaredEvent { .. } => "undeclared_event",
            Self::UndeclaredTarget { .. } => "undeclared_target",
            Self::NoTarget => "no_target",
            Self::InvalidConfig => "invalid_config",
            Self::UnstorableValue => "unstorable_value",
            Self::CorruptState => "corrupt_state",
            Self::UnknownWorkflow => "unknown_workflow",
            Self::JobDiscarded { .. } => "job_discarded",
            Self::Unknown => "unknown",
        }
    }

    /// The reason of a step failure whose final error is `error`, after
    /// `attempts` attempts: the cause the runner named, else fatal or
    /// exhausted by the error's kind.
    pub fn of_step_error(error: &StepError, attempts: u32) -> Self {
        match &error.cause {
            Some(cause) => cause.clone(),
            None if error.is_retryable() => Self::AttemptsExhausted { attempts },
            None => Self::StepFatal,
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AttemptsExhausted { attempts } => {
                write!(f, "the step failed on all {attempts} attempts")
            }
            Self::StepFatal => f.write_str("the step returned a fatal error"),
            Self::StepPanicked => f.write_str("the step panicked"),
            Self::WorkerLost => f.write_str("the step's worker kept dying"),
            Self::UndeclaredEvent { event } => {
                write!(f, "the step returned the undeclared event :{event}")
            }
            Self::UndeclaredTarget { target } => {
                write!(f, "a dynamic route picked the undeclared target {target}")
            }
            Self::NoTarget => f.write_str("a dynamic route picked no target"),
            Self::InvalidConfig => f.write_str("a config picked at run time is invalid"),
            Self::UnstorableValue => f.write_str("the step returned a value that cannot be stored"),
            Self::CorruptState => f.write_str("the stored state does not match its definition"),
            Self::UnknownWorkflow => f.write_str("the workflow or version is not registered"),
            Self::JobDiscarded { job } => write!(f, "a {job} job was discarded"),
            Self::Unknown => f.write_str("unknown (recorded before reasons were kept)"),
        }
    }
}

/// Why an instance failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureRecord {
    /// The reason, typed.
    #[serde(default)]
    pub reason: FailureReason,
    /// The failed step (none for instance-level failures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<StepId>,
    /// The failed step's activation.
    #[serde(default)]
    pub activation: u32,
    /// The final error.
    pub error: StepError,
    /// Every recorded attempt of that activation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<AttemptRecord>,
    /// When the instance failed.
    pub at: DateTime<Utc>,
}

/// One running or finished execution of one workflow version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Time-ordered UUID v7 primary key.
    pub id: Uuid,
    /// `key::value` (or `key::value::suffix` for scope none).
    pub business_id: BusinessId,
    /// The workflow (family) id.
    pub workflow_id: WorkflowId,
    /// The resolved version, fixed at start.
    pub workflow_version: u32,
    /// Lifecycle status.
    pub status: InstanceStatus,
    /// What the storage keeps unique among active instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_claim: Option<UniqueClaim>,
    /// The start input and every step's output.
    pub context: Context,
    /// Configs attached to steps by the transitions that activated them.
    #[serde(default)]
    pub step_configs: BTreeMap<StepId, Value>,
    /// Metadata merged from step completions (observability only).
    #[serde(default)]
    pub runtime_metadata: Map<String, Value>,
    /// Per-step state; a step absent here has not been reached.
    #[serde(default)]
    pub steps: BTreeMap<StepId, StepState>,
    /// The audit trail.
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureRecord>,
    /// Caller metadata added to every telemetry event; persisted.
    #[serde(default)]
    pub telemetry_metadata: Map<String, Value>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// Bumped on every applied change; storages may use it as a fence.
    #[serde(default)]
    pub revision: u64,
}

impl Instance {
    /// The state of `step`, if it was reached.
    pub fn step(&self, step: &str) -> Option<&StepState> {
        self.steps.get(step)
    }

    /// Steps whose status is `status`, in id order.
    pub fn steps_with(&self, status: StepStatus) -> impl Iterator<Item = &StepId> + '_ {
        self.steps
            .iter()
            .filter(move |(_, s)| s.status == status)
            .map(|(id, _)| id)
    }

    /// Steps activated and not finished: active or waiting.
    pub fn open_steps(&self) -> impl Iterator<Item = &StepId> + '_ {
        self.steps
            .iter()
            .filter(|(_, s)| matches!(s.status, StepStatus::Active | StepStatus::Waiting))
            .map(|(id, _)| id)
    }

    /// Whether `step` is active at `activation` (its result may be applied).
    pub fn is_step_active(&self, step: &str, activation: u32) -> bool {
        self.steps
            .get(step)
            .is_some_and(|s| s.status == StepStatus::Active && s.activation == activation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip() {
        for st in InstanceStatus::ALL {
            assert_eq!(st.as_str().parse::<InstanceStatus>(), Ok(st));
            assert_eq!(
                serde_json::to_value(st).unwrap(),
                Value::String(st.as_str().into())
            );
        }
        assert!("done".parse::<InstanceStatus>().is_err());
        assert_eq!(
            InstanceStatus::ACTIVE.to_vec(),
            InstanceStatus::ALL
                .into_iter()
                .filter(|s| s.is_active())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn history_entries_have_a_flat_tagged_form() {
        let entry = HistoryEntry {
            at: DateTime::from_timestamp(0, 0).unwrap(),
            step: Some(StepId::new("a").unwrap()),
            activation: 1,
            kind: HistoryKind::Completed {
                event: Event::new("done").unwrap(),
            },
        };
        let json = serde_json::to_value(&entry).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"at": "1970-01-01T00:00:00Z", "step": "a", "activation": 1, "kind": "completed", "event": "done"})
        );
        assert_eq!(serde_json::from_value::<HistoryEntry>(json).unwrap(), entry);
    }
}
