//! Identifier newtypes: step ids, events, workflow ids and idempotency keys.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Why an identifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// A step id must be non-empty and made of `[A-Za-z0-9_:.-]`.
    #[error(
        "invalid step id {0:?}: expected a non-empty string of letters, digits, '_', ':', '.' or '-'"
    )]
    InvalidStepId(String),
    /// An event must be an identifier `[A-Za-z_][A-Za-z0-9_]*`.
    #[error("invalid event {0:?}: an event must be an identifier [A-Za-z_][A-Za-z0-9_]*")]
    InvalidEvent(String),
    /// A workflow id must be non-empty and made of `[A-Za-z0-9_:.-]`.
    #[error(
        "invalid workflow id {0:?}: expected a non-empty string of letters, digits, '_', ':', '.' or '-'"
    )]
    InvalidWorkflowId(String),
}

fn is_path_like(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'.' | b'-'))
}

fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_alphabetic() || b == b'_' => {}
        _ => return false,
    }
    s.len() <= 128 && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $check:expr, $err:path) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates and builds the identifier.
            pub fn new(value: impl AsRef<str>) -> Result<Self, IdError> {
                let value = value.as_ref();
                if $check(value) {
                    Ok(Self(Arc::from(value)))
                } else {
                    Err($err(value.to_owned()))
                }
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<&str> for $name {
            type Error = IdError;
            fn try_from(value: &str) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                Self::new(&*s).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_id!(
    /// The stable identity of a step type, persisted in instances and job
    /// arguments (for example `orders::ValidateOrder` or `validate_order`).
    /// Each step id appears at most once per workflow.
    StepId,
    is_path_like,
    IdError::InvalidStepId
);

string_id!(
    /// An event a step emits when it completes (for example `approved`).
    Event,
    is_identifier,
    IdError::InvalidEvent
);

string_id!(
    /// The stable name of a workflow (its family name when versioned).
    WorkflowId,
    is_path_like,
    IdError::InvalidWorkflowId
);

impl StepId {
    /// The last `::`- or `.`-separated segment of the id (the original's
    /// "short name").
    pub fn short_name(&self) -> &str {
        let s = self.as_str();
        let after_colons = s.rsplit("::").next().unwrap_or(s);
        after_colons.rsplit('.').next().unwrap_or(after_colons)
    }

    /// The default context key: the short name converted to snake case.
    pub fn default_step_key(&self) -> String {
        crate::step_key::underscore(self.short_name())
    }
}

impl WorkflowId {
    /// The last path segment of the workflow id, snake cased (the name used in
    /// job metadata).
    pub fn short_name(&self) -> String {
        let s = self.as_str();
        let seg = s.rsplit("::").next().unwrap_or(s);
        crate::step_key::underscore(seg.rsplit('.').next().unwrap_or(seg))
    }
}

/// The identity of one execution of one step activation, handed to steps so
/// that they can make their side effects idempotent: `instance id + step id +
/// activation`. It is the same for every retry attempt of that activation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IdempotencyKey {
    /// The instance.
    pub instance_id: Uuid,
    /// The step.
    pub step: StepId,
    /// The activation number of the step within the instance (1 for the first).
    pub activation: u32,
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.instance_id, self.step, self.activation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_ids_accept_paths_and_reject_garbage() {
        assert!(StepId::new("orders::ValidateOrder").is_ok());
        assert!(StepId::new("MyApp.Steps.Charge").is_ok());
        assert!(StepId::new("charge-card_2").is_ok());
        for bad in ["", " a", "a b", "a/b", "é"] {
            assert_eq!(
                StepId::new(bad),
                Err(IdError::InvalidStepId(bad.to_owned())),
                "{bad:?}"
            );
        }
        assert!(StepId::new("x".repeat(256)).is_err());
    }

    #[test]
    fn events_must_be_identifiers() {
        for good in ["done", "payment_confirmed", "_x", "Ok2"] {
            assert!(Event::new(good).is_ok(), "{good}");
        }
        for bad in ["", "2fast", "a-b", "a b", "a::b"] {
            assert!(Event::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn short_names_and_default_keys() {
        let id = StepId::new("orders::steps::ValidateOrder").unwrap();
        assert_eq!(id.short_name(), "ValidateOrder");
        assert_eq!(id.default_step_key(), "validate_order");
        let id = StepId::new("MyApp.Steps.SAPExample").unwrap();
        assert_eq!(id.default_step_key(), "sap_example");
        let wf = WorkflowId::new("billing::CreateUser").unwrap();
        assert_eq!(wf.short_name(), "create_user");
    }

    #[test]
    fn ids_round_trip_through_serde_and_reject_invalid() {
        let e = Event::new("approved").unwrap();
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(json, "\"approved\"");
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), e);
        assert!(serde_json::from_str::<Event>("\"not valid\"").is_err());
    }

    #[test]
    fn idempotency_key_display_is_stable() {
        let key = IdempotencyKey {
            instance_id: Uuid::nil(),
            step: StepId::new("a").unwrap(),
            activation: 2,
        };
        assert_eq!(key.to_string(), "00000000-0000-0000-0000-000000000000:a:2");
    }
}
