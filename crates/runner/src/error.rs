//! The runner's error type.

use hephaestus_engine_core::business_id::BusinessIdError;
use hephaestus_engine_core::ids::IdError;
use hephaestus_engine_core::instance::{InstanceStatus, StepStatus};
use hephaestus_engine_core::limits::InvalidJson;
use hephaestus_engine_core::ports::PortError;
use hephaestus_engine_core::workflow::RegistryError;
use hephaestus_engine_core::{EngineError, Event, StepId};
use uuid::Uuid;

/// What can go wrong when driving workflows.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunnerError {
    /// No such instance (or no active instance for a business id).
    #[error("instance not found: {0}")]
    NotFound(String),
    /// Only a failed instance can be retried ([`Runtime::retry`](crate::Runtime::retry)).
    #[error("instance {id} is {status}, not failed: only a failed instance can be retried")]
    NotFailed {
        /// The instance.
        id: Uuid,
        /// Its status.
        status: hephaestus_engine_core::instance::InstanceStatus,
    },
    /// The business id is held by another active instance.
    #[error("business id {business_id} is already running as instance {instance_id}")]
    AlreadyRunning {
        /// The business id.
        business_id: String,
        /// The active instance holding it.
        instance_id: Uuid,
    },
    /// The workflow or version is not registered in this runtime.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A business key or value is invalid.
    #[error(transparent)]
    BusinessId(#[from] BusinessIdError),
    /// A step id or event is malformed.
    #[error(transparent)]
    Id(#[from] IdError),
    /// The step is not part of the instance's workflow.
    #[error("step {0} is not part of this workflow")]
    UnknownStep(StepId),
    /// The event is not declared by the step (fixes G7).
    #[error("step {step} does not declare event :{event}")]
    UndeclaredEvent {
        /// The step.
        step: StepId,
        /// The event.
        event: Event,
    },
    /// The step is not waiting (nor executing) and cannot be resumed.
    #[error("step {step} is not waiting (state: {})", state.map_or("not reached", StepStatus::as_str))]
    NotWaiting {
        /// The step.
        step: StepId,
        /// Its state.
        state: Option<StepStatus>,
    },
    /// A resume for this step activation was already recorded.
    #[error("step {0} was already resumed")]
    AlreadyResumed(StepId),
    /// A resume addressed an activation of the step that is no longer its
    /// current one.
    #[error(
        "resume of step {step} addresses activation {requested}, but the current one is {current}"
    )]
    StaleResume {
        /// The step.
        step: StepId,
        /// The activation addressed.
        requested: u32,
        /// The current activation.
        current: u32,
    },
    /// The instance already ended.
    #[error("instance is {0}")]
    Finished(InstanceStatus),
    /// The timer already fired (or was cancelled) and cannot be cancelled.
    #[error("timer job {0} already fired or was cancelled")]
    TimerAlreadyFinished(i64),
    /// Invalid input.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A JSON value that cannot enter an instance: a start input that is not
    /// an object, U+0000, nested too deep or too large (see
    /// [`hephaestus_engine_core::limits`]). Nothing was stored.
    #[error("invalid input: {0}")]
    InvalidJson(#[from] InvalidJson),
    /// A delay that is zero or too large to schedule.
    #[error("invalid delay {delay:?}: {reason}")]
    InvalidDelay {
        /// The delay given.
        delay: std::time::Duration,
        /// Why it cannot be used.
        reason: &'static str,
    },
    /// The stored instance does not match its definition.
    #[error("corrupt state: {0}")]
    Corrupt(String),
    /// The backend failed.
    #[error(transparent)]
    Backend(PortError),
    /// Workers were asked of a runtime without a failure handler: a job
    /// discarded for good would leave its instance stuck. Attach one with
    /// [`RuntimeBuilder::discard_handler`](crate::RuntimeBuilder::discard_handler).
    #[error(
        "this runtime has no discard handler, so it cannot run workers: attach \
         hephaestus_failure_handler::FailureHandler with RuntimeBuilder::discard_handler"
    )]
    NoDiscardHandler,
    /// The engine refused an input for a reason the runner has no variant
    /// of its own for; the engine's error is kept as it is.
    #[error(transparent)]
    Engine(EngineError),
}

impl From<PortError> for RunnerError {
    fn from(e: PortError) -> Self {
        match e {
            PortError::AlreadyRunning {
                business_id,
                instance_id,
            } => Self::AlreadyRunning {
                business_id: business_id.to_string(),
                instance_id,
            },
            PortError::InvalidInput(msg) => Self::InvalidInput(msg),
            other => Self::Backend(other),
        }
    }
}

impl From<EngineError> for RunnerError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::UnknownStep(step) => Self::UnknownStep(step),
            EngineError::UndeclaredEvent { step, event, .. } => {
                Self::UndeclaredEvent { step, event }
            }
            EngineError::NotWaiting { step, state } => Self::NotWaiting { step, state },
            EngineError::AlreadyResumed(step) => Self::AlreadyResumed(step),
            EngineError::InstanceFinished(status) => Self::Finished(status),
            EngineError::InvalidInput(msg) => Self::InvalidInput(msg),
            EngineError::InvalidJson(invalid) => Self::InvalidJson(invalid),
            EngineError::StaleResume {
                step,
                requested,
                current,
            } => Self::StaleResume {
                step,
                requested,
                current,
            },
            // Both say the stored instance does not match its definition.
            EngineError::CorruptState(message) => Self::Corrupt(message),
            e @ EngineError::WorkflowMismatch { .. } => Self::Corrupt(e.to_string()),
            other => Self::Engine(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_keep_their_kind() {
        let step = StepId::new("Hold").unwrap();
        assert!(matches!(
            RunnerError::from(EngineError::StaleResume {
                step: step.clone(),
                requested: 1,
                current: 2,
            }),
            RunnerError::StaleResume {
                requested: 1,
                current: 2,
                ..
            }
        ));
        assert!(matches!(
            RunnerError::from(EngineError::NotFailed(InstanceStatus::Running)),
            RunnerError::Engine(EngineError::NotFailed(InstanceStatus::Running))
        ));
        assert!(matches!(
            RunnerError::from(EngineError::CorruptState("ghost step".to_owned())),
            RunnerError::Corrupt(message) if message == "ghost step"
        ));
        assert!(matches!(
            RunnerError::from(EngineError::UnknownStep(step)),
            RunnerError::UnknownStep(_)
        ));
    }
}
