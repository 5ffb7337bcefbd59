//! # hephaestus-failure-handler
//!
//! What keeps instances from getting stuck.
//!
//! - Step failures: a step's last failed attempt is recorded as its result
//!   in the same commit that discards it, and the engine fails the instance
//!   (fixing the original's G4, where the telemetry-based handler never
//!   fired). See `hephaestus-runner`.
//! - [`FailureHandler`]: what a runner job discarded for good means for its
//!   step and instance — a job whose attempts went on errors outside user
//!   code, or whose workers kept dying until the queue gave up on it. It
//!   records the step's failure, or fails the instance, cancelling the rest,
//!   in the discarding transaction. Every runtime that runs workers has it
//!   attached
//!   ([`RuntimeBuilder::discard_handler`](hephaestus_runner::RuntimeBuilder::discard_handler)); workers refuse to start
//!   without one.
//! - [`Reconciler`]: a periodic safety net (leader-only with
//!   [`Reconciler::leader_only`]) that finds
//!   active instances with no live job — pending or running instances whose
//!   advance was lost, waiting instances with unprocessed results, waiting
//!   steps whose timer job is gone — and re-enqueues the advance or the timer.
//!   It reports what it repaired, and repairing twice is harmless: advance and
//!   timer jobs are unique.
//!
//! ```
//! use hephaestus_memory::MemoryBackend;
//! use hephaestus_failure_handler::{FailureHandler, Reconciler};
//! use hephaestus_runner::Runtime;
//!
//! let runtime = Runtime::builder(MemoryBackend::new())
//!     .discard_handler(FailureHandler::new())
//!     .build()
//!     .unwrap();
//! let reconciler = Reconciler::new(runtime);
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
//! let report = rt.block_on(reconciler.run_once()).unwrap();
//! assert!(report.repaired.is_empty());
//! ```

mod handler;
mod reconciler;

pub use handler::FailureHandler;
pub use reconciler::{LeaderCheck, Reconciler, Repair, RepairReport};

/// The getting-started guide (`docs/getting-started.md`), compiled as doc
/// tests.
#[cfg(all(doctest, feature = "postgres"))]
#[doc = include_str!("../../../docs/getting-started.md")]
pub struct GettingStarted;
