//! The built-in steps.

use std::time::Duration;

use serde_json::{Value, json};

use crate::ids::{Event, StepId};
use crate::step::{Step, StepInput, StepOutcome};

/// Id of [`Done`], the only legal leaf.
pub const DONE_ID: &str = "hephaestus::Done";
/// Id of [`Wait`].
pub const WAIT_ID: &str = "hephaestus::Wait";
/// Id of [`WaitForEvent`].
pub const WAIT_FOR_EVENT_ID: &str = "hephaestus::WaitForEvent";
/// Id of [`Debug`](struct@Debug).
pub const DEBUG_ID: &str = "hephaestus::Debug";

fn id(s: &str) -> StepId {
    // The built-in ids above are valid step ids (checked by a unit test).
    StepId::new(s).expect("built-in step ids are valid")
}

fn event(s: &str) -> Event {
    // Built-in event names are valid identifiers (checked by a unit test).
    Event::new(s).expect("built-in event names are valid")
}

/// The terminal step: every path ends here. Emits `done`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Done;

#[async_trait::async_trait]
impl Step for Done {
    fn id(&self) -> StepId {
        id(DONE_ID)
    }

    fn events(&self, _config: Option<&Value>) -> Vec<Event> {
        vec![event("done")]
    }

    async fn execute(&self, _input: StepInput<'_>) -> StepOutcome {
        StepOutcome::complete("done")
    }
}

/// A durable pause: config `{"duration": N, "unit": "millisecond"|"second"|"minute"|"hour"|"day"}`.
/// Goes async and schedules its own timer; emits `timeout` when it fires.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wait;

impl Wait {
    /// The delay a config asks for.
    pub fn delay(config: Option<&Value>) -> Result<Duration, String> {
        let config = config.ok_or("Wait needs a config {\"duration\": N, \"unit\": ...}")?;
        let duration = config
            .get("duration")
            .and_then(Value::as_u64)
            .filter(|d| *d > 0)
            .ok_or_else(|| match config.get("duration") {
                Some(other) => {
                    format!("Wait \"duration\" must be a positive integer, got: {other}")
                }
                None => "Wait config needs \"duration\": a positive integer".to_owned(),
            })?;
        let unit_ms: u64 = match config.get("unit").and_then(Value::as_str) {
            Some("millisecond") => 1,
            Some("second") | None => 1_000,
            Some("minute") => 60_000,
            Some("hour") => 3_600_000,
            Some("day") => 86_400_000,
            Some(other) => {
                return Err(format!(
                    "Wait config \"unit\" must be millisecond, second, minute, hour or day, got: {other:?}"
                ));
            }
        };
        duration
            .checked_mul(unit_ms)
            .map(Duration::from_millis)
            .ok_or_else(|| "Wait duration overflows".to_owned())
    }
}

#[async_trait::async_trait]
impl Step for Wait {
    fn id(&self) -> StepId {
        id(WAIT_ID)
    }

    fn events(&self, _config: Option<&Value>) -> Vec<Event> {
        vec![event("timeout")]
    }

    fn validate_config(&self, config: Option<&Value>) -> Result<(), String> {
        Self::delay(config).map(drop)
    }

    async fn execute(&self, input: StepInput<'_>) -> StepOutcome {
        match Self::delay(input.config) {
            Ok(after) => StepOutcome::wait_with_timer(after, "timeout"),
            Err(reason) => StepOutcome::fatal(reason),
        }
    }
}

/// Waits for an external resume with `received`. With config
/// `{"timeout_ms": N}` it also declares `timeout` and resumes itself with it
/// after N ms.
#[derive(Debug, Clone, Copy, Default)]
pub struct WaitForEvent;

impl WaitForEvent {
    fn timeout(config: Option<&Value>) -> Result<Option<Duration>, String> {
        match config.and_then(|c| c.get("timeout_ms")) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|ms| *ms > 0)
                .map(|ms| Some(Duration::from_millis(ms)))
                .ok_or_else(|| {
                    format!("WaitForEvent \"timeout_ms\" must be a positive integer, got: {v}")
                }),
        }
    }
}

#[async_trait::async_trait]
impl Step for WaitForEvent {
    fn id(&self) -> StepId {
        id(WAIT_FOR_EVENT_ID)
    }

    fn events(&self, config: Option<&Value>) -> Vec<Event> {
        match Self::timeout(config) {
            Ok(Some(_)) => vec![event("received"), event("timeout")],
            _ => vec![event("received")],
        }
    }

    fn validate_config(&self, config: Option<&Value>) -> Result<(), String> {
        if let Some(c) = config
            && !c.is_object()
        {
            return Err(format!("WaitForEvent config must be an object, got: {c}"));
        }
        Self::timeout(config).map(drop)
    }

    async fn execute(&self, input: StepInput<'_>) -> StepOutcome {
        match Self::timeout(input.config) {
            Ok(Some(after)) => StepOutcome::wait_with_timer(after, "timeout"),
            Ok(None) => StepOutcome::wait(),
            Err(reason) => StepOutcome::fatal(reason),
        }
    }
}

/// Logs the context at debug level and emits `completed`; its output is a
/// summary (initial input keys and completed step keys).
#[derive(Debug, Clone, Copy, Default)]
pub struct Debug;

#[async_trait::async_trait]
impl Step for Debug {
    fn id(&self) -> StepId {
        id(DEBUG_ID)
    }

    fn events(&self, _config: Option<&Value>) -> Vec<Event> {
        vec![event("completed")]
    }

    async fn execute(&self, input: StepInput<'_>) -> StepOutcome {
        tracing::debug!(
            instance_id = %input.instance_id,
            initial = %input.context.initial,
            steps = ?input.context.steps,
            "Debug step"
        );
        let initial_keys: Vec<&String> = input
            .context
            .initial
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        let steps: Vec<&String> = input.context.steps.keys().collect();
        StepOutcome::complete_with(
            "completed",
            json!({"initial_keys": initial_keys, "steps": steps}),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{block_on, run_step};

    #[test]
    fn builtin_ids_and_keys() {
        assert_eq!(Done.step_key(), "done");
        assert_eq!(Wait.step_key(), "wait");
        assert_eq!(WaitForEvent.step_key(), "wait_for_event");
        assert_eq!(Debug.step_key(), "debug");
        assert_eq!(Done.id().as_str(), DONE_ID);
    }

    #[test]
    fn wait_converts_units_and_schedules_its_timer() {
        for (unit, ms) in [
            ("millisecond", 1),
            ("second", 1_000),
            ("minute", 60_000),
            ("hour", 3_600_000),
            ("day", 86_400_000),
        ] {
            let cfg = json!({"duration": 2, "unit": unit});
            assert_eq!(Wait::delay(Some(&cfg)), Ok(Duration::from_millis(2 * ms)));
        }
        let cfg = json!({"duration": 5, "unit": "second"});
        let out = block_on(run_step(&Wait, Some(&cfg)));
        assert_eq!(
            out,
            StepOutcome::wait_with_timer(Duration::from_secs(5), "timeout")
        );
    }

    #[test]
    fn wait_with_a_bad_config_fails_fatally_at_run_time() {
        for bad in [
            json!({}),
            json!({"duration": -1}),
            json!({"duration": 0}),
            json!({"duration": 0, "unit": "day"}),
            json!({"duration": 1.5}),
            json!({"duration": 1, "unit": "week"}),
            json!("x"),
        ] {
            assert!(Wait.validate_config(Some(&bad)).is_err(), "{bad}");
            let out = block_on(run_step(&Wait, Some(&bad)));
            assert!(
                matches!(out, StepOutcome::Error(ref e) if !e.is_retryable()),
                "{bad}: {out:?}"
            );
        }
        assert!(Wait.validate_config(None).is_err());
    }

    #[test]
    fn wait_for_event_declares_timeout_only_with_a_timeout() {
        assert_eq!(WaitForEvent.events(None), vec![event("received")]);
        let cfg = json!({"timeout_ms": 250});
        assert_eq!(
            WaitForEvent.events(Some(&cfg)),
            vec![event("received"), event("timeout")]
        );
        assert_eq!(
            block_on(run_step(&WaitForEvent, Some(&cfg))),
            StepOutcome::wait_with_timer(Duration::from_millis(250), "timeout")
        );
        assert_eq!(block_on(run_step(&WaitForEvent, None)), StepOutcome::wait());
        assert!(
            WaitForEvent
                .validate_config(Some(&json!({"timeout_ms": "soon"})))
                .is_err()
        );
        assert!(WaitForEvent.validate_config(Some(&json!(3))).is_err());
        for zero in [json!({"timeout_ms": 0}), json!({"timeout_ms": -5})] {
            assert!(WaitForEvent.validate_config(Some(&zero)).is_err(), "{zero}");
            assert!(matches!(
                block_on(run_step(&WaitForEvent, Some(&zero))),
                StepOutcome::Error(ref e) if !e.is_retryable()
            ));
        }
    }

    #[test]
    fn done_and_debug_complete() {
        assert_eq!(
            block_on(run_step(&Done, None)),
            StepOutcome::complete("done")
        );
        let StepOutcome::Complete(c) = block_on(run_step(&Debug, None)) else {
            panic!("Debug completes");
        };
        assert_eq!(c.event.as_str(), "completed");
    }
}
