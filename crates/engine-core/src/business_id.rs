//! Business ids and uniqueness rules.
//!
//! Every workflow declares a unique key (`[a-z0-9]+`) and a scope. Starting
//! an instance with a business value (`[a-z0-9]+` or a lower-case UUID)
//! builds the business id `key::value`, or `key::value::<8 hex>` for scope
//! `none`. Uniqueness holds among ACTIVE instances (pending, running,
//! waiting) and is enforced atomically by the storage through the
//! [`UniqueClaim`] computed here.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::WorkflowId;

/// A business-id error; messages keep the original's phrases.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BusinessIdError {
    /// The unique key is not `[a-z0-9]+`.
    #[error("unique key must contain only lowercase letters and numbers [a-z0-9], got: {0:?}")]
    InvalidKey(String),
    /// The scope name is unknown.
    #[error("unique scope must be one of [workflow, version, global, none], got: {0:?}")]
    InvalidScope(String),
    /// The business value is neither `[a-z0-9]+` nor a lower-case UUID.
    #[error("invalid id value: {0:?}. Must be [a-z0-9]+ or a valid UUID")]
    InvalidValue(String),
    /// A business id string does not have the `key::value[::suffix]` shape.
    #[error("invalid unique id format: {0:?}")]
    InvalidFormat(String),
}

fn is_lower_alnum(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn is_lower_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        })
}

/// A workflow's unique key: `[a-z0-9]+`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UniqueKey(String);

impl UniqueKey {
    /// Validates the key.
    pub fn new(key: impl Into<String>) -> Result<Self, BusinessIdError> {
        let key = key.into();
        if is_lower_alnum(&key) {
            Ok(Self(key))
        } else {
            Err(BusinessIdError::InvalidKey(key))
        }
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UniqueKey {
    type Error = BusinessIdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<UniqueKey> for String {
    fn from(value: UniqueKey) -> Self {
        value.0
    }
}

impl fmt::Display for UniqueKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where uniqueness of a business id holds, among active instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One active instance per business id and workflow (any version).
    #[default]
    Workflow,
    /// One active instance per business id, workflow and version.
    Version,
    /// One active instance per business id across all workflows.
    Global,
    /// No check; a random suffix makes every business id unique.
    None,
}

impl Scope {
    /// The scope's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Workflow => "workflow",
            Self::Version => "version",
            Self::Global => "global",
            Self::None => "none",
        }
    }
}

impl FromStr for Scope {
    type Err = BusinessIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "workflow" => Ok(Self::Workflow),
            "version" => Ok(Self::Version),
            "global" => Ok(Self::Global),
            "none" => Ok(Self::None),
            other => Err(BusinessIdError::InvalidScope(other.to_owned())),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A workflow's uniqueness rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Unique {
    /// The business key.
    pub key: UniqueKey,
    /// The scope.
    pub scope: Scope,
}

impl Unique {
    /// Validates the key and builds the rule.
    pub fn new(key: impl Into<String>, scope: Scope) -> Result<Self, BusinessIdError> {
        Ok(Self {
            key: UniqueKey::new(key)?,
            scope,
        })
    }

    /// The business id for starting an instance with `value`: `key::value`,
    /// or `key::value::<8 hex>` from `random` for scope `none` (every start
    /// is then distinct).
    pub fn business_id(&self, value: &str, random: [u8; 4]) -> Result<BusinessId, BusinessIdError> {
        let value = BusinessValue::new(value)?;
        Ok(match self.scope {
            Scope::None => BusinessId::build_with_suffix(&self.key, &value, random),
            _ => BusinessId::build(&self.key, &value),
        })
    }

    /// The business id a caller addresses with `value` (resume, cancel, get):
    /// `key::value`. Scope `none` has no addressable id.
    pub fn address(&self, value: &str) -> Result<Option<BusinessId>, BusinessIdError> {
        let value = BusinessValue::new(value)?;
        Ok((self.scope != Scope::None).then(|| BusinessId::build(&self.key, &value)))
    }
}

/// A business value: `[a-z0-9]+` or a lower-case UUID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BusinessValue(String);

impl BusinessValue {
    /// Validates the value.
    pub fn new(value: impl Into<String>) -> Result<Self, BusinessIdError> {
        let value = value.into();
        if is_lower_alnum(&value) || is_lower_uuid(&value) {
            Ok(Self(value))
        } else {
            Err(BusinessIdError::InvalidValue(value))
        }
    }

    /// The value.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for BusinessValue {
    type Error = BusinessIdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<BusinessValue> for String {
    fn from(value: BusinessValue) -> Self {
        value.0
    }
}

impl fmt::Display for BusinessValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A business id: `key::value` or `key::value::<8 lower-case hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BusinessId(String);

impl BusinessId {
    /// `key::value`.
    pub fn build(key: &UniqueKey, value: &BusinessValue) -> Self {
        Self(format!("{key}::{value}"))
    }

    /// `key::value::<8 hex>` from four caller-supplied random bytes (scope `none`).
    pub fn build_with_suffix(key: &UniqueKey, value: &BusinessValue, random: [u8; 4]) -> Self {
        let [a, b, c, d] = random;
        Self(format!("{key}::{value}::{a:02x}{b:02x}{c:02x}{d:02x}"))
    }

    /// Parses and validates a stored business id.
    pub fn parse(id: &str) -> Result<Self, BusinessIdError> {
        let parts: Vec<&str> = id.split("::").collect();
        let ok = match parts.as_slice() {
            [k, v] => is_lower_alnum(k) && BusinessValue::new(*v).is_ok(),
            [k, v, s] => {
                is_lower_alnum(k)
                    && BusinessValue::new(*v).is_ok()
                    && s.len() == 8
                    && s.bytes()
                        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
            }
            _ => false,
        };
        if ok {
            Ok(Self(id.to_owned()))
        } else {
            Err(BusinessIdError::InvalidFormat(id.to_owned()))
        }
    }

    /// The key part.
    pub fn key(&self) -> &str {
        self.0.split("::").next().unwrap_or_default()
    }

    /// The value part (the original's `extract_value`).
    pub fn value(&self) -> &str {
        self.0.split("::").nth(1).unwrap_or_default()
    }

    /// The random suffix, for scope `none`.
    pub fn suffix(&self) -> Option<&str> {
        self.0.split("::").nth(2)
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for BusinessId {
    type Error = BusinessIdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<BusinessId> for String {
    fn from(value: BusinessId) -> Self {
        value.0
    }
}

impl fmt::Display for BusinessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The key a storage enforces unique among active instances (for example a
/// partial unique index `where status in ('pending','running','waiting')`).
/// Two instances conflict exactly when their claims are equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UniqueClaim(String);

impl UniqueClaim {
    /// The claim for starting `business_id` of `workflow` at `version` under
    /// `scope`; `None` for scope `none` (no check).
    pub fn for_scope(
        scope: Scope,
        business_id: &BusinessId,
        workflow: &WorkflowId,
        version: u32,
    ) -> Option<Self> {
        match scope {
            Scope::None => None,
            Scope::Global => Some(Self(format!("global|{business_id}"))),
            Scope::Workflow => Some(Self(format!("workflow|{workflow}|{business_id}"))),
            Scope::Version => Some(Self(format!("version|{workflow}|{version}|{business_id}"))),
        }
    }

    /// Rebuilds a claim read back from storage.
    pub fn from_stored(claim: String) -> Self {
        Self(claim)
    }

    /// The claim as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_validation() {
        assert!(UniqueKey::new("order").is_ok());
        assert!(UniqueKey::new("o2").is_ok());
        for bad in ["", "Order", "a-b", "a_b", "a b"] {
            let err = UniqueKey::new(bad).unwrap_err();
            assert!(
                err.to_string().contains(
                    "unique key must contain only lowercase letters and numbers [a-z0-9]"
                ),
                "{err}"
            );
        }
    }

    #[test]
    fn scope_parsing() {
        assert_eq!("version".parse::<Scope>(), Ok(Scope::Version));
        assert_eq!(Scope::default(), Scope::Workflow);
        let err = "Workflow".parse::<Scope>().unwrap_err();
        assert!(err.to_string().contains("unique scope must be one of"));
        for s in [Scope::Workflow, Scope::Version, Scope::Global, Scope::None] {
            assert_eq!(s.as_str().parse::<Scope>(), Ok(s));
        }
    }

    #[test]
    fn value_validation() {
        for good in ["abc123", "42", "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"] {
            assert!(BusinessValue::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "ABC",
            "a-b",
            "a_b",
            "a::b",
            "a b",
            "0193A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5B",
            "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5",
            "0193a1b2xc3d4-7e5f-8a9b-0c1d2e3f4a5b",
        ] {
            let err = BusinessValue::new(bad).unwrap_err();
            assert!(
                err.to_string()
                    .contains("Must be [a-z0-9]+ or a valid UUID"),
                "{bad}"
            );
        }
    }

    #[test]
    fn ids_and_extraction() {
        let key = UniqueKey::new("order").unwrap();
        let value = BusinessValue::new("123").unwrap();
        let id = BusinessId::build(&key, &value);
        assert_eq!(id.as_str(), "order::123");
        assert_eq!(id.value(), "123");
        assert_eq!(id.suffix(), None);
        let with = BusinessId::build_with_suffix(&key, &value, [0xde, 0xad, 0x0b, 0x01]);
        assert_eq!(with.as_str(), "order::123::dead0b01");
        assert_eq!(with.key(), "order");
        assert_eq!(with.value(), "123");
        assert_eq!(with.suffix(), Some("dead0b01"));
        assert_eq!(BusinessId::parse("order::123::dead0b01"), Ok(with));
        for bad in [
            "order",
            "order::",
            "order::1::2::3",
            "Order::1",
            "order::1::xyz",
            "order::1::DEADBEEF",
        ] {
            let err = BusinessId::parse(bad).unwrap_err();
            assert!(
                err.to_string().contains("invalid unique id format"),
                "{bad}"
            );
        }
    }

    #[test]
    fn unique_rules_build_business_ids_per_scope() {
        let order = Unique::new("order", Scope::Workflow).unwrap();
        assert_eq!(
            order.business_id("42", [1, 2, 3, 4]).unwrap().as_str(),
            "order::42"
        );
        assert_eq!(order.address("42").unwrap().unwrap().as_str(), "order::42");
        let none = Unique::new("job", Scope::None).unwrap();
        let a = none.business_id("7", [0, 0, 0, 1]).unwrap();
        let b = none.business_id("7", [0, 0, 0, 2]).unwrap();
        assert_eq!(a.as_str(), "job::7::00000001");
        assert_ne!(a, b, "scope none makes every start distinct");
        assert_eq!(none.address("7").unwrap(), None);
        assert_eq!(
            order.business_id("Bad", [0; 4]),
            Err(BusinessIdError::InvalidValue("Bad".into()))
        );
        assert!(Unique::new("", Scope::Global).is_err());
    }

    #[test]
    fn claims_follow_the_scope() {
        let id = BusinessId::parse("order::1").unwrap();
        let a = WorkflowId::new("a").unwrap();
        let b = WorkflowId::new("b").unwrap();
        let claim = |s, w: &WorkflowId, v| UniqueClaim::for_scope(s, &id, w, v);
        assert_eq!(claim(Scope::None, &a, 1), None);
        assert_eq!(claim(Scope::Global, &a, 1), claim(Scope::Global, &b, 2));
        assert_eq!(claim(Scope::Workflow, &a, 1), claim(Scope::Workflow, &a, 2));
        assert_ne!(claim(Scope::Workflow, &a, 1), claim(Scope::Workflow, &b, 1));
        assert_ne!(claim(Scope::Version, &a, 1), claim(Scope::Version, &a, 2));
        assert_eq!(claim(Scope::Version, &a, 3), claim(Scope::Version, &a, 3));
    }

    #[test]
    fn serde_validates() {
        assert!(serde_json::from_str::<UniqueKey>("\"BAD\"").is_err());
        assert!(serde_json::from_str::<BusinessId>("\"order::1\"").is_ok());
        assert!(serde_json::from_str::<BusinessId>("\"nope\"").is_err());
    }
}
