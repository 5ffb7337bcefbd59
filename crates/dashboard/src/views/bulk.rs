//! `GET /instances/bulk?action=cancel|retry&<filters>`: how many instances
//! a bulk action would touch, and the form that confirms it (the count goes
//! with it: the action refuses to run if the selection changed since).

use std::sync::Arc;

use axum::Extension;
use axum::extract::{RawQuery, State};
use hephaestus_engine_core::instance::InstanceStatus;
use maud::{Markup, html};

use super::{FILTER_PARAMS, Filter, badge, store};
use crate::Shared;
use crate::error::PageError;
use crate::page::{Ctx, layout};
use crate::params::Params;

/// A bulk action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bulk {
    /// Cancel every active instance selected.
    Cancel,
    /// Retry every failed instance selected.
    Retry,
}

impl Bulk {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        match s {
            "cancel" => Ok(Self::Cancel),
            "retry" => Ok(Self::Retry),
            _ => Err("the action is cancel or retry".to_owned()),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Cancel => "cancel",
            Self::Retry => "retry",
        }
    }

    /// The statuses the action applies to.
    fn applies_to(self) -> &'static [InstanceStatus] {
        match self {
            Self::Cancel => &InstanceStatus::ACTIVE,
            Self::Retry => &[InstanceStatus::Failed],
        }
    }

    /// `filter` narrowed to the instances this action applies to; `None`
    /// when its statuses leave none.
    pub(crate) fn target(self, filter: &Filter) -> Option<Filter> {
        let statuses: Vec<InstanceStatus> = if filter.statuses.is_empty() {
            self.applies_to().to_vec()
        } else {
            filter
                .statuses
                .iter()
                .copied()
                .filter(|s| self.applies_to().contains(s))
                .collect()
        };
        (!statuses.is_empty()).then(|| Filter {
            statuses,
            ..filter.clone()
        })
    }
}

/// Parses the action and filters of a bulk request.
pub(crate) fn parse(params: &mut Params) -> (Option<Bulk>, Filter) {
    let action = params.parsed("action", Bulk::parse);
    if action.is_none() && params.one("action").is_none() {
        params.problem("action is missing: cancel or retry");
    }
    (action, Filter::parse(params))
}

/// How many instances `action` would touch under `filter`.
pub(crate) async fn count(
    shared: &Shared,
    action: Bulk,
    filter: &Filter,
) -> Result<u64, PageError> {
    match action.target(filter) {
        None => Ok(0),
        Some(target) => store(shared)
            .count(&target.query())
            .await
            .map_err(|e| PageError::port("counting the selected instances", &e)),
    }
}

/// The confirmation page.
pub(crate) async fn confirm(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    RawQuery(raw): RawQuery,
) -> Result<Markup, PageError> {
    let mut names = FILTER_PARAMS.to_vec();
    names.push("action");
    let mut params = Params::parse(raw.unwrap_or_default().as_bytes(), &names);
    let (action, filter) = parse(&mut params);
    params.finish()?;
    let Some(action) = action else {
        return Err(PageError::bad("action is missing: cancel or retry"));
    };
    if !ctx.actions {
        return Err(PageError::Forbidden(
            "this dashboard is read-only: it serves no action".to_owned(),
        ));
    }
    let n = count(&shared, action, &filter).await?;
    let verb = action.name();
    let body = html! {
        h1 { "Bulk " (verb) }
        p { "Filters: "
            @if filter.is_empty() { "none (every instance)" }
            @for (name, value) in filter.pairs() { code { (name) "=" (value) } " " }
        }
        p { "Applies to instances that are "
            @for s in action.applies_to() { (badge(s.as_str())) " " }
        }
        @if n == 0 {
            p.confirm-count data-count="0" { "No instance is selected: nothing to " (verb) "." }
        } @else {
            p.confirm-count data-count=(n) {
                strong { "This will " (verb) " " (n) " instance" @if n != 1 { "s" } "." }
            }
            form method="post" action=(ctx.url("/instances/bulk")) {
                (ctx.csrf_field())
                input type="hidden" name="action" value=(verb);
                input type="hidden" name="expected" value=(n);
                @for (name, value) in filter.pairs() { input type="hidden" name=(name) value=(value); }
                button.danger type="submit" { "Yes, " (verb) " " (n) " instance" @if n != 1 { "s" } }
            }
        }
        p { a href=(ctx.url(&format!("/instances?{}", crate::params::query_string(filter.pairs())))) { "Back to the instances" } }
    };
    Ok(layout(&ctx, "Bulk action", "instances", body))
}
