//! Shared test helpers.

pub mod bin;
pub mod catalog;
pub mod conformance;
pub mod db;
pub mod plans;
pub mod rng;
pub mod sqlite;
pub mod wait;
pub mod worker;

use std::path::PathBuf;

/// The workspace root (the parent of the `tests/` package).
pub fn repo_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.clone(), PathBuf::from)
}
