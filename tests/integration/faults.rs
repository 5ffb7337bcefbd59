//! Bad input, in-process, on both backends.
//!
//! - `bad_input`: corrupt job arguments, an instance whose workflow is no
//!   longer registered, a panicking step, a resume of a finished instance,
//!   in-process on both backends: each is a clear recorded error, and an
//!   instance running alongside completes.
//! - `boundary`: what enters at the boundary (JSON that is not an object,
//!   nested too deep or too large; zero delays) is refused with a typed
//!   error and nothing stored; every value at the limits reads back
//!   identically; a row the single writer refuses keeps its reason and
//!   never blocks a valid result. On both backends.
//!
//! The fault-injection test (worker processes SIGKILLed, PostgreSQL
//! restarted) is a test binary of its own: `tests/chaos/main.rs`.

mod bad_input;
mod boundary;
#[allow(
    dead_code,
    reason = "the worker's half of the fixture (its CLI) does not run in the tests"
)]
#[path = "../../crates/cli/src/fixtures.rs"]
pub(crate) mod fixtures;

pub use crate::support::bin::hephaestus_bin;
