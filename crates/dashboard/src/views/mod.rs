//! The pages (GET): overview, instances, one instance, bulk confirmation,
//! workflows, jobs.

pub(crate) mod bulk;
pub(crate) mod instance;
pub(crate) mod instances;
pub(crate) mod jobs;
pub(crate) mod overview;
pub(crate) mod workflows;

use chrono::{DateTime, SecondsFormat, Utc};
use hephaestus_engine_core::business_id::BusinessId;
use hephaestus_engine_core::ids::WorkflowId;
use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_queue_pg::PgQueue;
use hephaestus_storage_pg::{InstanceQuery, PgStore, TimeRange};
use maud::{Markup, html};

use crate::Shared;
use crate::params::{self, Params};

/// The store of the dashboard's runtime.
pub(crate) fn store(shared: &Shared) -> &PgStore {
    shared.runtime.backend().store()
}

/// The queue of the dashboard's runtime.
pub(crate) fn queue(shared: &Shared) -> &PgQueue {
    shared.runtime.backend().queue()
}

/// A time as shown: RFC 3339, UTC, milliseconds.
pub(crate) fn time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// How long ago `at` was, roughly (`4s`, `3m`, `2h`, `5d`).
pub(crate) fn ago(now: DateTime<Utc>, at: DateTime<Utc>) -> String {
    let secs = (now - at).num_seconds().max(0);
    match secs {
        0..60 => format!("{secs}s"),
        60..3_600 => format!("{}m", secs / 60),
        3_600..86_400 => format!("{}h", secs / 3_600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// A `<time>` with the exact time in its tooltip.
pub(crate) fn when(at: DateTime<Utc>) -> Markup {
    let text = time(at);
    html! { time datetime=(text) title=(text) { (text) } }
}

/// A status or state as a coloured badge.
pub(crate) fn badge(status: &str) -> Markup {
    html! { span class={ "status status-" (status) } { (status) } }
}

/// The instance filters of the instances page and the bulk actions, all in
/// the URL: `workflow`, `status` (repeatable), `business_id`, `since`,
/// `until` (created at or after / before).
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    pub(crate) workflow: Option<WorkflowId>,
    pub(crate) statuses: Vec<InstanceStatus>,
    pub(crate) business_id: Option<BusinessId>,
    pub(crate) since: Option<DateTime<Utc>>,
    pub(crate) until: Option<DateTime<Utc>>,
}

/// The names [`Filter`] reads.
pub(crate) const FILTER_PARAMS: [&str; 5] = ["workflow", "status", "business_id", "since", "until"];

impl Filter {
    /// Reads the filters from `params` (problems recorded there).
    pub(crate) fn parse(params: &mut Params) -> Self {
        let workflow = params.parsed("workflow", params::workflow);
        let mut statuses = Vec::new();
        for value in params
            .all("status")
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>()
        {
            for one in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                match params::status(one) {
                    Ok(s) if !statuses.contains(&s) => statuses.push(s),
                    Ok(_) => {}
                    Err(why) => params.problem(format!("status={one:?}: {why}")),
                }
            }
        }
        let business_id = params.parsed("business_id", params::business_id);
        let since = params.parsed("since", params::time);
        let until = params.parsed("until", params::time);
        if let (Some(s), Some(u)) = (since, until)
            && s >= u
        {
            params.problem(format!("since {} is not before until {}", time(s), time(u)));
        }
        Self {
            workflow,
            statuses,
            business_id,
            since,
            until,
        }
    }

    /// The filters as URL pairs.
    pub(crate) fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = Vec::new();
        if let Some(w) = &self.workflow {
            pairs.push(("workflow", w.to_string()));
        }
        for s in &self.statuses {
            pairs.push(("status", s.as_str().to_owned()));
        }
        if let Some(b) = &self.business_id {
            pairs.push(("business_id", b.to_string()));
        }
        if let Some(s) = self.since {
            pairs.push(("since", time(s)));
        }
        if let Some(u) = self.until {
            pairs.push(("until", time(u)));
        }
        pairs
    }

    /// The storage query of these filters (newest first).
    pub(crate) fn query(&self) -> InstanceQuery {
        // The optional filters are set as given (`None`: not filtered).
        let mut query = InstanceQuery::default()
            .with_statuses(self.statuses.iter().copied())
            .with_inserted(TimeRange {
                from: self.since,
                until: self.until,
            });
        query.business_id.clone_from(&self.business_id);
        query.workflow_id.clone_from(&self.workflow);
        query
    }

    /// Whether any filter is set.
    pub(crate) fn is_empty(&self) -> bool {
        self.pairs().is_empty()
    }
}
