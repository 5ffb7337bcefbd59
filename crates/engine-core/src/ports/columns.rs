//! How a [`ResultPayload`] is laid out in a SQL backend's step-results
//! table, written once for every such backend: four nullable columns an
//! operator can read directly.
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

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::ResultPayload;
use crate::ids::Event;
use crate::instance::AttemptRecord;
use crate::step::{EventName, StepError};

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
