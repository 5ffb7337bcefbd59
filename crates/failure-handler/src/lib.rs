//! # hephaestus-failure-handler
//!
//! What keeps instances from getting stuck.
//!
//! - Step failures: the runner fails an instance in the same commit that
//!   discards the step's last attempt (fixing the original's G4, where the
//!   telemetry-based handler never fired). See `hephaestus-runner`.
//! - [`FailureHook`] (feature `postgres`): queue-pg's discard hook. When the
//!   queue itself discards a runner job — its worker kept dying until the
//!   attempts ran out, so the rescuer gave up — the hook records the step's
//!   failure (or fails the instance, for advance, timer and resume jobs) in
//!   the discarding transaction. [`queue_runtime`] builds a worker
//!   process's runtime with the hook attached (the runner's workers cannot
//!   be had without a hook).
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
//! use hephaestus_failure_handler::Reconciler;
//! use hephaestus_runner::Runtime;
//!
//! let runtime = Runtime::builder(MemoryBackend::new()).build().unwrap();
//! let reconciler = Reconciler::new(runtime);
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
//! let report = rt.block_on(reconciler.run_once()).unwrap();
//! assert!(report.repaired.is_empty());
//! ```

#[cfg(feature = "postgres")]
mod hook;
mod reconciler;

#[cfg(feature = "postgres")]
pub use hook::{FailureHook, queue_runtime, workers};
pub use reconciler::{LeaderCheck, Reconciler, Repair, RepairReport};

/// The getting-started guide (`docs/getting-started.md`), compiled as doc
/// tests.
#[cfg(all(doctest, feature = "postgres"))]
#[doc = include_str!("../../../docs/getting-started.md")]
pub struct GettingStarted;
