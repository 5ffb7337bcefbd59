//! # hephaestus-conformance
//!
//! The conformance suites every backend runs, written once and generic over
//! the traits it implements:
//!
//! - [`ports`]: the engine-core ports (`InstanceStore`, `StepResultStore`,
//!   `JobQueue`);
//! - [`backend`]: the runner's batched [`Backend`](hephaestus_runner::Backend)
//!   operations, which a backend may answer one statement per batch.
//!
//! [`conformance_tests!`] and [`backend_conformance_tests!`] generate one
//! `#[test]` per case, named after it, so `cargo test <case>` runs one case
//! and a failure names it. The in-memory backend runs every case in this
//! crate's tests; the PostgreSQL backends in the workspace's `tests/`.
//!
//! It is a crate of its own (and not part of engine-core) because it runs
//! futures with a watchdog thread and reads the wall clock, which the pure
//! engine never does.

pub mod backend;
pub mod ports;
