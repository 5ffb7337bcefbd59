//! # hephaestus-failure-handler
//!
//! What keeps instances from getting stuck.
//!
//! - Step failures: the runner fails an instance in the same commit that
//!   discards the step's last attempt (fixing the original's G4, where the
//!   telemetry-based handler never fired). See `hephaestus-runner`.
//! - [`Reconciler`]: a periodic safety net (run it on one leader) that finds
//!   active instances with no live job — pending or running instances whose
//!   advance was lost, waiting instances with unprocessed results, waiting
//!   steps whose timer job is gone — and re-enqueues the advance or the timer.
//!   It reports what it repaired, and repairing twice is harmless: advance and
//!   timer jobs are unique.
//!
//! ```
//! use hephaestus_engine_core::ports::memory::MemoryBackend;
//! use hephaestus_failure_handler::Reconciler;
//! use hephaestus_runner::Runtime;
//!
//! let runtime = Runtime::builder(MemoryBackend::new()).build().unwrap();
//! let reconciler = Reconciler::new(runtime);
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
//! let report = rt.block_on(reconciler.run_once()).unwrap();
//! assert!(report.repaired.is_empty());
//! ```

mod reconciler;

pub use reconciler::{Reconciler, Repair, RepairReport};
