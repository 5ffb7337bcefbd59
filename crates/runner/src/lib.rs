//! # hephaestus-runner
//!
//! The durable runner. Every step activation is a job; a single advance job
//! per instance, serialized by the instance lock, applies step results with
//! the pure engine and enqueues what comes next; step executions run in
//! parallel and never write the instance — they record a result and enqueue
//! an advance in one commit.
//!
//! The algorithm is written once, generic over the engine-core ports
//! ([`Backend`]): it runs on the in-memory backend (no database) and on
//! PostgreSQL (storage-pg + queue-pg).
//!
//! Invariants:
//! - user code runs outside any unit of work, only for an active instance and
//!   an active step activation with no recorded result (G2, G25);
//! - "apply results + persist + mark processed + enqueue" and "record result +
//!   enqueue advance + complete job" are each one commit;
//! - a result arriving while an advance runs is applied by the next advance
//!   job, and one that merged into a waiting advance job is visible before
//!   that job can start (G3);
//! - retries follow the step's, else the workflow's, else the default policy (G19);
//!   a step out of attempts fails the instance in the same commit as its
//!   discard (G4).
//!
//! ```
//! # tokio_test_block_on();
//! # fn tokio_test_block_on() {
//! use hephaestus_memory::MemoryBackend;
//! use hephaestus_engine_core::prelude::*;
//! use hephaestus_engine_core::steps::{Done, FnStep};
//! use hephaestus_failure_handler::FailureHandler;
//! use hephaestus_runner::{Runtime, StartOptions};
//! use serde_json::json;
//!
//! let greet = FnStep::new("greet", ["done"], |_| StepOutcome::complete_with("done", json!({"hi": 1})));
//! let hello = Workflow::builder("hello")
//!     .unique("user", Scope::Workflow)
//!     .start(greet.clone())
//!     .on(greet, "done", Done)
//!     .build()
//!     .unwrap();
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
//! rt.block_on(async {
//!     let runtime = Runtime::builder(MemoryBackend::new())
//!         .discard_handler(FailureHandler::new())
//!         .workflow(hello)
//!         .build()
//!         .unwrap();
//!     let started = runtime.start("hello", "42", json!({}), StartOptions::default()).await.unwrap();
//!     runtime.drain().await.unwrap();
//!     let instance = runtime.get(started.id).await.unwrap().unwrap();
//!     assert_eq!(instance.status, InstanceStatus::Completed);
//! });
//! # }
//! ```

mod advance;
mod backend;
mod batcher;
pub mod config;
mod continuations;
pub mod discard;
mod error;
mod execute;
mod facade;
mod failures;
mod handle;
pub mod jobs;
pub mod observe;
mod outcome;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod retry;
mod round;
mod runtime;
mod settle;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

/// The testing guide (`docs/testing.md`), compiled and run as doc tests.
#[cfg(all(doctest, feature = "testing"))]
#[doc = include_str!("../../../docs/testing.md")]
pub struct TestingGuide;
mod worker;
mod writes;

pub use advance::AdvanceReport;
pub use backend::{
    Backend, ExecutionCheck, ExecutionRequest, InboxRows, Locked, ReconcileRow, RoundWrites,
    Settlement, SettlementDone,
};
pub use config::{QueueNames, RunnerConfig};
pub use discard::{AfterCommit, DiscardedJob, JobSubject, StepFailure};
pub use error::RunnerError;
pub use facade::WorkflowHandle;
pub use handle::{DiscardHandler, Runtime};
pub use hephaestus_engine_core::clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use outcome::{DrainReport, JobOutcome};
pub use runtime::{RuntimeBuilder, StartOptions, Started};
pub use telemetry::TelemetryEvent;

#[cfg(test)]
mod tests;
