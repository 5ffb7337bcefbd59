//! How a SQL backend lays out what it stores, written once for every such
//! backend: an instance's `state` document ([`InstanceState`],
//! [`state_of`]), and a [`ResultPayload`] in a step-results row, four
//! nullable columns an operator can read directly ([`columns`],
//! [`payload`]), with the row's step and activation ([`step_of`],
//! [`activation_of`], [`refused`]).
//!
//! | kind | `event` | `output` | `metadata` | `detail` |
//! | --- | --- | --- | --- | --- |
//! | `completed` | the event | the output | the metadata | null |
//! | `async` | the timer's event, if any | null | null | `{"timer_after_ms": n}` or null |
//! | `resume` | the event | the payload | null | null |
//! | `timer` | the event | null | null | null |
//! | `failed` | null | null | null | `{"error": .., "attempts": [..]}` |
//! | `cancel` | null | null | null | `{"reason": ".."}` or null |
//!
//! A backend turns the JSON values into its own column types (and checks
//! what it cannot store); reading back, it hands the columns to
//! [`payload`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Refused, ResultKind, ResultPayload};
use crate::context::Context;
use crate::ids::{Event, StepId};
use crate::instance::{AttemptRecord, HistoryEntry, Instance, StepState};
use crate::step::{EventName, StepError};

/// An instance's `state` document as written: everything of it that is not
/// a column of its own, borrowed from the instance.
#[derive(Debug, Serialize)]
pub struct StateOf<'a> {
    context: &'a Context,
    step_configs: &'a BTreeMap<StepId, Value>,
    runtime_metadata: &'a Map<String, Value>,
    steps: &'a BTreeMap<StepId, StepState>,
    history: &'a [HistoryEntry],
}

/// The `state` document of `instance`, to serialize into its column.
pub fn state_of(instance: &Instance) -> StateOf<'_> {
    StateOf {
        context: &instance.context,
        step_configs: &instance.step_configs,
        runtime_metadata: &instance.runtime_metadata,
        steps: &instance.steps,
        history: &instance.history,
    }
}

/// An instance's `state` document as read back (parts missing from older
/// documents are empty).
#[derive(Debug, Deserialize)]
pub struct InstanceState {
    /// [`Instance::context`].
    pub context: Context,
    /// [`Instance::step_configs`].
    #[serde(default)]
    pub step_configs: BTreeMap<StepId, Value>,
    /// [`Instance::runtime_metadata`].
    #[serde(default)]
    pub runtime_metadata: Map<String, Value>,
    /// [`Instance::steps`].
    #[serde(default)]
    pub steps: BTreeMap<StepId, StepState>,
    /// [`Instance::history`].
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
}

/// The step of a stored row: `''` for instance-level rows (a step id is
/// never empty).
pub fn step_of(stored: &str) -> Result<Option<StepId>, String> {
    if stored.is_empty() {
        return Ok(None);
    }
    StepId::new(stored)
        .map(Some)
        .map_err(|e| format!("step_id: {e}"))
}

/// The activation of a stored row.
pub fn activation_of(stored: i64) -> Result<u32, String> {
    u32::try_from(stored).map_err(|_| format!("activation {stored}"))
}

/// A refused row, from its columns.
pub fn refused(
    seq: i64,
    step: &str,
    activation: i64,
    kind: &str,
    reason: String,
) -> Result<Refused, String> {
    Ok(Refused {
        seq,
        step: step_of(step)?,
        activation: activation_of(activation)?,
        kind: ResultKind::parse(kind).ok_or_else(|| format!("unknown kind {kind:?}"))?,
        reason,
    })
}

#[derive(Serialize, Deserialize)]
struct AsyncDetail {
    timer_after_ms: u64,
}

#[derive(Serialize)]
struct FailedDetailOut<'a> {
    error: &'a StepError,
    attempts: &'a [AttemptRecord],
}

#[derive(Deserialize)]
struct FailedDetailIn {
    error: StepError,
    #[serde(default)]
    attempts: Vec<AttemptRecord>,
}

#[derive(Serialize, Deserialize)]
struct CancelDetail {
    reason: String,
}

/// A payload's columns, borrowing what it can from the payload.
#[derive(Debug, Default, PartialEq)]
pub struct Columns<'a> {
    /// The `event` column.
    pub event: Option<&'a str>,
    /// The `output` column.
    pub output: Option<&'a Value>,
    /// The `metadata` column.
    pub metadata: Option<&'a Map<String, Value>>,
    /// The `detail` column.
    pub detail: Option<Value>,
}

/// The columns of `payload`. Fails only when a detail cannot be turned into
/// JSON (a step error whose `details` hold a non-string map key, say).
pub fn columns(payload: &ResultPayload) -> Result<Columns<'_>, serde_json::Error> {
    Ok(match payload {
        ResultPayload::Completed {
            event,
            output,
            metadata,
        } => Columns {
            event: Some(event.as_str()),
            output: Some(output),
            metadata: Some(metadata),
            detail: None,
        },
        ResultPayload::Async {
            timer_after_ms,
            timer_event,
        } => Columns {
            event: timer_event.as_ref().map(EventName::as_str),
            detail: timer_after_ms
                .map(|ms| serde_json::to_value(AsyncDetail { timer_after_ms: ms }))
                .transpose()?,
            ..Columns::default()
        },
        ResultPayload::Resume { event, payload } => Columns {
            event: Some(event.as_str()),
            output: Some(payload),
            ..Columns::default()
        },
        ResultPayload::Timer { event } => Columns {
            event: Some(event.as_str()),
            ..Columns::default()
        },
        ResultPayload::Failed { error, attempts } => Columns {
            detail: Some(serde_json::to_value(FailedDetailOut { error, attempts })?),
            ..Columns::default()
        },
        ResultPayload::Cancel { reason } => Columns {
            detail: reason
                .as_ref()
                .map(|reason| {
                    serde_json::to_value(CancelDetail {
                        reason: reason.clone(),
                    })
                })
                .transpose()?,
            ..Columns::default()
        },
    })
}

/// The payload of a stored row of `kind`, from its columns; what cannot be
/// read (a missing event, a detail of the wrong shape, an unknown kind) is
/// described in the error.
pub fn payload(
    kind: &str,
    event: Option<String>,
    output: Option<Value>,
    metadata: Option<Map<String, Value>>,
    detail: Option<Value>,
) -> Result<ResultPayload, String> {
    let output = output.unwrap_or(Value::Null);
    let need_event =
        |event: Option<String>| event.ok_or_else(|| format!("a {kind} row without an event"));
    let valid_event = |name: String| Event::new(&name).map_err(|e| format!("event: {e}"));
    let detail_of = |what| move |e: serde_json::Error| format!("{what}: {e}");
    Ok(match kind {
        "completed" => ResultPayload::Completed {
            event: EventName(need_event(event)?),
            output,
            metadata: metadata.unwrap_or_default(),
        },
        "async" => ResultPayload::Async {
            timer_after_ms: detail
                .map(serde_json::from_value::<AsyncDetail>)
                .transpose()
                .map_err(detail_of("detail"))?
                .map(|d| d.timer_after_ms),
            timer_event: event.map(EventName),
        },
        "resume" => ResultPayload::Resume {
            event: valid_event(need_event(event)?)?,
            payload: output,
        },
        "timer" => ResultPayload::Timer {
            event: valid_event(need_event(event)?)?,
        },
        "failed" => {
            let detail = detail.ok_or_else(|| "a failed row without detail".to_owned())?;
            let FailedDetailIn { error, attempts } =
                serde_json::from_value(detail).map_err(detail_of("detail"))?;
            ResultPayload::Failed { error, attempts }
        }
        "cancel" => ResultPayload::Cancel {
            reason: detail
                .map(serde_json::from_value::<CancelDetail>)
                .transpose()
                .map_err(detail_of("detail"))?
                .map(|d| d.reason),
        },
        other => return Err(format!("unknown kind {other:?}")),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::ids::Event;

    fn round_trip(payload: &ResultPayload) -> ResultPayload {
        let c = columns(payload).unwrap();
        payload_of(payload.kind().as_str(), &c)
    }

    fn payload_of(kind: &str, c: &Columns<'_>) -> ResultPayload {
        payload(
            kind,
            c.event.map(ToOwned::to_owned),
            c.output.cloned(),
            c.metadata.cloned(),
            c.detail.clone(),
        )
        .unwrap()
    }

    #[test]
    fn every_kind_reads_back_as_written() {
        let mut metadata = Map::new();
        metadata.insert("worker".to_owned(), json!("w1"));
        let error = StepError::retryable("card declined");
        let payloads = [
            ResultPayload::Completed {
                event: EventName("done".to_owned()),
                output: json!({"total": 42}),
                metadata,
            },
            ResultPayload::Async {
                timer_after_ms: Some(1_500),
                timer_event: Some(EventName("timeout".to_owned())),
            },
            ResultPayload::Async {
                timer_after_ms: None,
                timer_event: None,
            },
            ResultPayload::Resume {
                event: Event::new("approved").unwrap(),
                payload: json!({"by": "ops"}),
            },
            ResultPayload::Timer {
                event: Event::new("timeout").unwrap(),
            },
            ResultPayload::Failed {
                error: error.clone(),
                attempts: Vec::new(),
            },
            ResultPayload::Cancel {
                reason: Some("operator".to_owned()),
            },
            ResultPayload::Cancel { reason: None },
        ];
        for p in &payloads {
            assert_eq!(&round_trip(p), p);
        }
        let failed = columns(&payloads[5]).unwrap();
        assert_eq!(failed.event, None);
        assert!(failed.detail.is_some_and(|d| d.get("error").is_some()));
    }

    #[test]
    fn steps_activations_and_refused_rows_read_back_or_say_why() {
        assert_eq!(step_of("").unwrap(), None);
        assert_eq!(
            step_of("Charge").unwrap(),
            Some(StepId::new("Charge").unwrap())
        );
        assert!(step_of("not a step!").unwrap_err().starts_with("step_id:"));
        assert_eq!(activation_of(3).unwrap(), 3);
        assert_eq!(activation_of(-1).unwrap_err(), "activation -1");
        let row = refused(7, "Charge", 2, "completed", "stale".to_owned()).unwrap();
        assert_eq!(
            (row.seq, row.activation, row.kind, row.reason.as_str()),
            (7, 2, ResultKind::Completed, "stale")
        );
        assert_eq!(
            refused(7, "", 1, "exotic", String::new()).unwrap_err(),
            "unknown kind \"exotic\""
        );
    }

    #[test]
    fn an_instance_state_reads_back_as_written() {
        let wf = crate::workflow::Workflow::builder("w")
            .unique("k", crate::business_id::Scope::Workflow)
            .start(crate::steps::Done)
            .build()
            .unwrap();
        let instance = crate::engine::Engine::new(&wf)
            .new_instance(crate::engine::NewInstance {
                id: uuid::Uuid::from_u128(1),
                business_id: crate::business_id::BusinessId::parse("w::1").unwrap(),
                input: json!({"a": 1}),
                telemetry_metadata: Map::new(),
                now: chrono::DateTime::UNIX_EPOCH,
            })
            .unwrap();
        let text = serde_json::to_string(&state_of(&instance)).unwrap();
        let back: InstanceState = serde_json::from_str(&text).unwrap();
        assert_eq!(back.context, instance.context);
        assert_eq!(back.steps, instance.steps);
        assert_eq!(back.history, instance.history);
        let old: InstanceState =
            serde_json::from_value(json!({"context": instance.context})).unwrap();
        assert!(
            old.steps.is_empty() && old.history.is_empty(),
            "missing parts are empty"
        );
    }

    #[test]
    fn rows_that_cannot_be_read_say_why() {
        let no_event = payload("completed", None, None, None, None).unwrap_err();
        assert_eq!(no_event, "a completed row without an event");
        let bad_detail = payload("async", None, None, None, Some(json!({"x": 1}))).unwrap_err();
        assert!(bad_detail.starts_with("detail:"), "{bad_detail}");
        assert_eq!(
            payload("exotic", None, None, None, None).unwrap_err(),
            "unknown kind \"exotic\""
        );
        let bad_event = payload("timer", Some("not an event!".to_owned()), None, None, None);
        assert!(bad_event.unwrap_err().starts_with("event:"));
    }
}
