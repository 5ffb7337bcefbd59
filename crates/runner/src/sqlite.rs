//! The SQLite backend (crate `hephaestus-sqlite`): instances, step results
//! and jobs in one file. The runner takes it through the ports alone, with
//! the [`Backend`] trait's default batched operations: no special case.

use crate::backend::Backend;

pub use hephaestus_sqlite::{SqliteBackend, SqliteOptions, WorkerLock};

impl Backend for SqliteBackend {}
