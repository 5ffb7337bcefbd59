//! Built-in steps (`Done`, `Wait`, `WaitForEvent`, `Debug`) and [`FnStep`],
//! a step made from a closure.

mod builtin;
mod fn_step;

pub use builtin::{DEBUG_ID, DONE_ID, Debug, Done, WAIT_FOR_EVENT_ID, WAIT_ID, Wait, WaitForEvent};
pub use fn_step::FnStep;
