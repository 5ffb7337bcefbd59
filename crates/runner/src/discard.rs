//! The vocabulary of a discard: the runner job being discarded
//! ([`DiscardedJob`]), what it was for ([`JobSubject`]), and what to do
//! once the discarding transaction has committed ([`AfterCommit`]). The
//! decision of what a discarded job means is taken above the runner, by a
//! [`DiscardHandler`](crate::DiscardHandler) (crate
//! `hephaestus-failure-handler` has the one workers use), inside the
//! transaction that discards the job, so the discard and its consequences
//! commit together (G4, G5).
//!
//! A step that returns an error is not a discarded job in this sense: its
//! last failed attempt is a step result like any other, which the engine
//! applies (failing the instance and cancelling the rest).

use std::fmt;

use chrono::{DateTime, Utc};
use hephaestus_engine_core::StepId;
use hephaestus_engine_core::instance::AttemptRecord;
use hephaestus_engine_core::ports::JobLease;
use hephaestus_engine_core::step::StepError;
use uuid::Uuid;

use crate::error::RunnerError;
use crate::jobs::{self, AdvanceArgs, ExecuteArgs, ResumeArgs, TimerArgs, decode};

/// A runner job being discarded: its last lease, its final error, and what
/// it was for.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct DiscardedJob<'a> {
    /// The lease of the final attempt (kind, id, attempt, earlier errors,
    /// trace context).
    pub lease: &'a JobLease,
    /// The final error. Its cause, when set, says why in the terms of a
    /// failure record (a corrupt instance, an unknown workflow, a lost
    /// worker).
    pub error: &'a StepError,
    /// The instance and step the job was for.
    pub subject: &'a JobSubject,
    /// When it is discarded.
    pub at: DateTime<Utc>,
}

/// What a runner job was for, read from its arguments (whose format stays
/// private to the runner).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobSubject {
    /// A step execution.
    Execute {
        /// The instance.
        instance_id: Uuid,
        /// The step.
        step: StepId,
        /// The step activation.
        activation: u32,
    },
    /// An instance's orchestration.
    Advance {
        /// The instance.
        instance_id: Uuid,
    },
    /// The durable timer of a waiting step.
    Timer {
        /// The instance.
        instance_id: Uuid,
        /// The waiting step.
        step: StepId,
        /// Its activation.
        activation: u32,
    },
    /// A scheduled resume.
    Resume {
        /// The instance.
        instance_id: Uuid,
        /// The step it resumes.
        step: StepId,
    },
    /// Not one of the runner's job kinds (or, for a discarded job,
    /// arguments that do not decode): no instance to act on.
    Other,
}

impl JobSubject {
    /// What `lease` is for. Arguments that do not decode are an
    /// [`RunnerError::InvalidInput`].
    pub fn of(lease: &JobLease) -> Result<Self, RunnerError> {
        Ok(match lease.kind.as_str() {
            jobs::EXECUTE => {
                let args: ExecuteArgs = decode(lease)?;
                Self::Execute {
                    instance_id: args.instance_id,
                    step: args.step,
                    activation: args.activation,
                }
            }
            jobs::ADVANCE => Self::Advance {
                instance_id: decode::<AdvanceArgs>(lease)?.instance_id,
            },
            jobs::TIMER => {
                let args: TimerArgs = decode(lease)?;
                Self::Timer {
                    instance_id: args.instance_id,
                    step: args.step,
                    activation: args.activation,
                }
            }
            jobs::RESUME => {
                let args: ResumeArgs = decode(lease)?;
                Self::Resume {
                    instance_id: args.instance_id,
                    step: args.step,
                }
            }
            _ => Self::Other,
        })
    }

    /// The instance the job was for.
    pub fn instance_id(&self) -> Option<Uuid> {
        match self {
            Self::Execute { instance_id, .. }
            | Self::Advance { instance_id }
            | Self::Timer { instance_id, .. }
            | Self::Resume { instance_id, .. } => Some(*instance_id),
            Self::Other => None,
        }
    }
}

/// What to do once a transaction has committed, in order: telemetry about
/// what it wrote, which must not be seen if it rolls back.
#[derive(Default)]
#[must_use = "run it once the transaction has committed"]
pub struct AfterCommit(Vec<Box<dyn FnOnce() + Send>>);

impl AfterCommit {
    /// Nothing to do.
    pub fn nothing() -> Self {
        Self::default()
    }

    /// Adds `then`, after what is already there.
    pub fn and(mut self, then: Self) -> Self {
        self.0.extend(then.0);
        self
    }

    /// Does it all, in order. Call it only once the transaction committed.
    pub fn run(self) {
        for action in self.0 {
            action();
        }
    }

    pub(crate) fn once(action: impl FnOnce() + Send + 'static) -> Self {
        Self(vec![Box::new(action)])
    }
}

impl fmt::Debug for AfterCommit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AfterCommit").field(&self.0.len()).finish()
    }
}

/// A step activation that failed for good, for
/// [`Runtime::record_step_failure`](crate::Runtime::record_step_failure).
#[derive(Debug, Clone, Copy)]
pub struct StepFailure<'a> {
    /// The instance.
    pub instance_id: Uuid,
    /// The step.
    pub step: &'a StepId,
    /// The step activation.
    pub activation: u32,
    /// The number of the final attempt.
    pub attempt: u32,
    /// The final error.
    pub error: &'a StepError,
    /// The earlier attempts' errors, oldest first.
    pub attempts: &'a [AttemptRecord],
    /// The trace context the advance carries.
    pub trace: &'a serde_json::Map<String, serde_json::Value>,
}
