//! The components this crate ships, one module per component.

pub mod storage;
