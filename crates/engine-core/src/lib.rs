//! # hephaestus-engine-core
//!
//! The pure heart of Hephaestus: workflow definitions validated as DAGs when
//! built, the instance model, and an engine that applies inputs (start, step
//! results, resumes, timers, failures, cancel) to an instance and returns the
//! effects to carry out. It also defines the port traits that storage and
//! queue backends implement, with an in-memory backend and conformance suites.
//!
//! Invariants:
//! - no I/O, no async runtime, no clock reads, no randomness: time and random
//!   samples come in as arguments (a tidy test keeps database and runtime
//!   crates out of this crate's dependencies);
//! - a workflow that builds is valid: every rule is checked by
//!   [`WorkflowBuilder::build`], which reports all problems at once;
//! - each step activation produces exactly one [`Effect::Execute`], and a
//!   result is applied only to the activation it names (duplicates are no-ops);
//! - joins use dead-path elimination, so a join after exclusive branches runs
//!   exactly once, and after a fan-out only when every taken branch completed.
//!
//! ```
//! use chrono::Utc;
//! use hephaestus_engine_core::prelude::*;
//! use hephaestus_engine_core::steps::{Done, FnStep};
//! use serde_json::json;
//! use uuid::Uuid;
//!
//! let greet = FnStep::new("greet", ["done"], |_| StepOutcome::complete_with("done", json!({"hi": true})));
//! let workflow = Workflow::builder("hello")
//!     .unique("user", Scope::Workflow)
//!     .start(greet.clone())
//!     .on(greet, "done", Done)
//!     .build()
//!     .unwrap();
//! let engine = Engine::new(&workflow);
//! let now = Utc::now();
//! let mut instance = engine
//!     .new_instance(NewInstance {
//!         id: Uuid::now_v7(),
//!         business_id: BusinessId::parse("user::42").unwrap(),
//!         input: json!({}),
//!         telemetry_metadata: Default::default(),
//!         now,
//!     })
//!     .unwrap();
//! let started = engine.apply(&mut instance, Input::Start, now).unwrap();
//! assert_eq!(started.executions().next().map(|(s, a)| (s.as_str(), a)), Some(("greet", 1)));
//! let done = engine
//!     .apply(
//!         &mut instance,
//!         Input::Completed { step: StepId::new("greet").unwrap(), activation: 1, completion: Completion::new("done") },
//!         now,
//!     )
//!     .unwrap();
//! assert_eq!(done.executions().next().map(|(s, _)| s.as_str()), Some(hephaestus_engine_core::steps::DONE_ID));
//! assert_eq!(instance.status, InstanceStatus::Running);
//! ```

pub mod business_id;
pub mod clock;
pub mod context;
pub mod dag;
pub mod engine;
pub mod ids;
pub mod instance;
pub mod limits;
pub mod ports;
pub mod retry;
pub mod step;
mod step_key;
pub mod steps;
pub mod workflow;

#[cfg(test)]
pub(crate) mod test_support;

/// The README's example, compiled as a doc test so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeExample;

pub use step_key::underscore;

pub use business_id::{
    BusinessId, BusinessIdError, BusinessValue, Scope, Unique, UniqueClaim, UniqueKey,
};
pub use context::Context;
pub use engine::{
    Applied, Disposition, Effect, Engine, EngineError, EngineEvent, Ignored, Input, NewInstance,
};
pub use ids::{Event, IdError, IdempotencyKey, StepId, WorkflowId};
pub use instance::{Instance, InstanceStatus, StepState, StepStatus};
pub use retry::{Backoff, RetryDecision, RetryPolicy};
pub use step::{
    AsyncWait, CancellationSignal, Completion, ErrorKind, Step, StepError, StepInput, StepOutcome,
};
pub use workflow::{
    Pick, Target, Workflow, WorkflowBuilder, WorkflowError, WorkflowErrors, WorkflowFamily,
    WorkflowRegistry, target,
};

/// The names most programs need.
pub mod prelude {
    pub use crate::business_id::{BusinessId, Scope};
    pub use crate::engine::{Applied, Disposition, Effect, Engine, Input, NewInstance};
    pub use crate::ids::{Event, StepId};
    pub use crate::instance::{Instance, InstanceStatus, StepStatus};
    pub use crate::retry::{Backoff, RetryPolicy};
    pub use crate::step::{Completion, Step, StepError, StepInput, StepOutcome};
    pub use crate::workflow::{Pick, Workflow, WorkflowFamily, target};
}
