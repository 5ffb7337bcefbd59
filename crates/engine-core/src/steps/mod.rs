//! Built-in steps (`Done`, `Wait`, `WaitForEvent`, `Debug`) and [`FnStep`],
//! a step made from a closure.

mod builtin;
mod fn_step;

pub use builtin::{Debug, Done, Wait, WaitForEvent, DEBUG_ID, DONE_ID, WAIT_FOR_EVENT_ID, WAIT_ID};
pub use fn_step::FnStep;
