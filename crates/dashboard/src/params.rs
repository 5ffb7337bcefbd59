//! Request parameters (query strings and form bodies), checked by the
//! dashboard itself so that every bad one is a 400 page naming it: unknown
//! names, repeated single values, and values that do not parse are all
//! reported at once. Values only ever reach the database as typed bind
//! parameters of storage-pg and queue-pg.

use std::collections::BTreeSet;

use chrono::{DateTime, NaiveDateTime, Utc};
use hephaestus_engine_core::business_id::BusinessId;
use hephaestus_engine_core::ids::WorkflowId;
use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_engine_core::ports::JobState;
use uuid::Uuid;

use crate::error::PageError;

/// Decoded `name=value` pairs, with the problems found so far.
#[derive(Debug, Default)]
pub(crate) struct Params {
    pairs: Vec<(String, String)>,
    problems: Vec<String>,
}

impl Params {
    /// Parses `raw` (a query string or an `application/x-www-form-urlencoded`
    /// body); names outside `allowed` are problems.
    pub(crate) fn parse(raw: &[u8], allowed: &[&str]) -> Self {
        let mut params = Self::default();
        let mut unknown = BTreeSet::new();
        for (name, value) in form_urlencoded::parse(raw) {
            if !allowed.contains(&name.as_ref()) {
                unknown.insert(name.into_owned());
                continue;
            }
            params.pairs.push((name.into_owned(), value.into_owned()));
        }
        for name in unknown {
            params.problems.push(format!(
                "unknown parameter {name:?} (known here: {})",
                if allowed.is_empty() {
                    "none".to_owned()
                } else {
                    allowed.join(", ")
                }
            ));
        }
        params
    }

    /// Records a problem.
    pub(crate) fn problem(&mut self, text: impl Into<String>) {
        self.problems.push(text.into());
    }

    /// Every non-empty value of `name`.
    pub(crate) fn all(&self, name: &str) -> Vec<&str> {
        self.pairs
            .iter()
            .filter(|(n, v)| n == name && !v.trim().is_empty())
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The one value of `name` (an empty value counts as absent; two
    /// values are a problem).
    pub(crate) fn one(&mut self, name: &str) -> Option<String> {
        let values = self.all(name);
        match values.as_slice() {
            [] => None,
            [one] => Some((*one).to_owned()),
            _ => {
                self.problem(format!(
                    "{name} is given {} times; give it once",
                    values.len()
                ));
                None
            }
        }
    }

    /// The value of `name` exactly as given (empty kept), if present once.
    pub(crate) fn raw(&mut self, name: &str) -> Option<String> {
        let values: Vec<&str> = self
            .pairs
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        match values.as_slice() {
            [] => None,
            [one] => Some((*one).to_owned()),
            _ => {
                self.problem(format!(
                    "{name} is given {} times; give it once",
                    values.len()
                ));
                None
            }
        }
    }

    /// The value of `name` parsed by `parse`, whose error explains.
    pub(crate) fn parsed<T>(
        &mut self,
        name: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let value = self.one(name)?;
        match parse(value.trim()) {
            Ok(v) => Some(v),
            Err(why) => {
                self.problem(format!("{name}={value:?}: {why}"));
                None
            }
        }
    }

    /// The value of `name`, required.
    pub(crate) fn required(&mut self, name: &str, what: &str) -> Option<String> {
        let value = self.one(name);
        if value.is_none() && !self.problems.iter().any(|p| p.starts_with(name)) {
            self.problem(format!("{name} is missing: {what}"));
        }
        value
    }

    /// `Ok` when no problem was found, else the 400.
    pub(crate) fn finish(self) -> Result<(), PageError> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(PageError::BadRequest(self.problems))
        }
    }
}

/// A workflow id.
pub(crate) fn workflow(s: &str) -> Result<WorkflowId, String> {
    WorkflowId::new(s).map_err(|e| e.to_string())
}

/// An instance status.
pub(crate) fn status(s: &str) -> Result<InstanceStatus, String> {
    s.parse::<InstanceStatus>().map_err(|e| {
        let names: Vec<&str> = InstanceStatus::ALL.iter().map(|s| s.as_str()).collect();
        format!("{e}; one of {}", names.join(", "))
    })
}

/// A job state.
pub(crate) fn job_state(s: &str) -> Result<JobState, String> {
    JobState::ALL
        .into_iter()
        .find(|state| state.as_str() == s)
        .ok_or_else(|| {
            let names: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
            format!("not a job state; one of {}", names.join(", "))
        })
}

/// A business id.
pub(crate) fn business_id(s: &str) -> Result<BusinessId, String> {
    BusinessId::parse(s).map_err(|e| format!("{e} (a business id is key::value)"))
}

/// A UUID.
pub(crate) fn uuid(s: &str) -> Result<Uuid, String> {
    Uuid::parse_str(s).map_err(|e| format!("not a UUID: {e}"))
}

/// A time: RFC 3339 (`2026-01-31T09:00:00Z`), or a browser's
/// `datetime-local` value (`2026-01-31T09:00`, taken as UTC).
pub(crate) fn time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for format in [
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M:%S%.f",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
            return Ok(t.and_utc());
        }
    }
    Err("not a time; expected RFC 3339 (2026-01-31T09:00:00Z) or 2026-01-31T09:00 (UTC)".to_owned())
}

/// A page size between 1 and `max`.
pub(crate) fn limit(max: u32) -> impl FnOnce(&str) -> Result<u32, String> {
    move |s| match s.parse::<u32>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("a page size is a whole number from 1 to {max}")),
    }
}

/// A job id.
pub(crate) fn job_id(s: &str) -> Result<i64, String> {
    match s.parse::<i64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("a job id is a positive whole number".to_owned()),
    }
}

/// A JSON value.
pub(crate) fn json(s: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not valid JSON: {e}"))
}

/// Percent-encodes one path segment.
pub(crate) fn segment(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Percent-encodes `pairs` as a query string (without `?`).
pub(crate) fn query_string<'a>(pairs: impl IntoIterator<Item = (&'a str, String)>) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        out.append_pair(name, &value);
    }
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_repeated_and_invalid_parameters_are_all_reported() {
        let mut p = Params::parse(b"a=1&a=2&b=x&zzz=1&c=", &["a", "b", "c"]);
        assert_eq!(p.one("a"), None);
        assert_eq!(p.parsed("b", limit(10)), None);
        assert_eq!(p.one("c"), None, "an empty value is absent");
        let Err(PageError::BadRequest(problems)) = p.finish() else {
            panic!("expected a 400");
        };
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("unknown parameter \"zzz\""));
        assert!(problems[1].starts_with("a is given 2 times"));
        assert!(problems[2].starts_with("b=\"x\": a page size"));
    }

    #[test]
    fn times_are_rfc3339_or_browser_local_times_in_utc() {
        assert_eq!(
            time("2026-01-31T09:00:00Z").unwrap(),
            time("2026-01-31T09:00").unwrap()
        );
        assert_eq!(
            time("2026-01-31T10:00:00+01:00").unwrap(),
            time("2026-01-31T09:00:00").unwrap()
        );
        assert!(time("yesterday").is_err());
    }
}
