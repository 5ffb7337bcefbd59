//! `GET /instances`: instances newest first, filtered by workflow, status,
//! business id and creation time (every filter in the URL), searched by
//! UUID or business id (`q`), one page at a time with the CLI's keyset
//! cursor (`after` = the id of the previous page's last instance).

use std::sync::Arc;

use axum::Extension;
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_engine_core::ports::InstanceStore;
use hephaestus_storage_pg::{Cursor, SortKey};
use maud::html;

use super::{FILTER_PARAMS, Filter, badge, store, when};
use crate::Shared;
use crate::error::PageError;
use crate::page::{Ctx, layout, see_other};
use crate::params::{self, Params, query_string};

/// The default page size.
pub(crate) const PAGE: u32 = 50;
/// The largest page size.
pub(crate) const MAX_PAGE: u32 = 500;

/// The instances page.
pub(crate) async fn page(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    RawQuery(raw): RawQuery,
) -> Result<Response, PageError> {
    let mut names = FILTER_PARAMS.to_vec();
    names.extend(["q", "after", "limit"]);
    let mut params = Params::parse(raw.unwrap_or_default().as_bytes(), &names);
    let mut filter = Filter::parse(&mut params);
    let q = params.one("q").map(|q| q.trim().to_owned());
    let after = params.parsed("after", |s| {
        params::uuid(s)
            .map_err(|e| format!("{e}; a cursor is the id of the previous page's last instance"))
    });
    let limit = params
        .parsed("limit", params::limit(MAX_PAGE))
        .unwrap_or(PAGE);
    let store = store(&shared);
    if let Some(q) = &q {
        if let Ok(id) = uuid::Uuid::parse_str(q) {
            params.finish()?;
            return match store.get(id).await {
                Ok(Some(_)) => Ok(see_other(&ctx.url(&format!("/instances/{id}")))),
                Ok(None) => Err(PageError::NotFound(format!("no instance {id}"))),
                Err(e) => Err(PageError::port("reading the instance", &e)),
            };
        }
        match params::business_id(q) {
            Ok(b) if filter.business_id.as_ref().is_none_or(|given| *given == b) => {
                filter.business_id = Some(b);
            }
            Ok(_) => params.problem("q and business_id name different business ids; give one"),
            Err(_) => params.problem(format!(
                "q={q:?} is neither an instance id (a UUID) nor a business id (key::value)"
            )),
        }
    }
    params.finish()?;
    let mut query = filter.query();
    query.limit = Some(limit);
    if let Some(after) = after {
        let last = store
            .get(after)
            .await
            .map_err(|e| PageError::port("reading the cursor's instance", &e))?
            .ok_or_else(|| {
                PageError::bad(format!(
                    "after={after}: no such instance (a cursor is the id of the previous page's last instance)"
                ))
            })?;
        query.after = Some(Cursor::after(&last, SortKey::Id));
    }
    let page = store
        .query(&query)
        .await
        .map_err(|e| PageError::port("listing instances", &e))?;
    let next = page
        .next
        .and_then(|_| page.instances.last())
        .map(|last| last.id);
    let mut pairs = filter.pairs();
    if limit != PAGE {
        pairs.push(("limit", limit.to_string()));
    }
    let next_url = next.map(|id| {
        let mut p = pairs.clone();
        p.push(("after", id.to_string()));
        ctx.url(&format!("/instances?{}", query_string(p)))
    });
    let first_url = ctx.url(&format!("/instances?{}", query_string(pairs.clone())));
    let workflows: Vec<String> = shared
        .runtime
        .registry()
        .families()
        .map(|f| f.id().to_string())
        .collect();
    let bulk = |action: &str| {
        let mut p = filter.pairs();
        p.insert(0, ("action", action.to_owned()));
        ctx.url(&format!("/instances/bulk?{}", query_string(p)))
    };
    let body = html! {
        h1 { "Instances" }
        form.filters method="get" action=(ctx.url("/instances")) {
            label { "Workflow "
                input name="workflow" list="workflow-ids" value=[filter.workflow.as_ref().map(ToString::to_string)] placeholder="any";
                datalist id="workflow-ids" { @for w in &workflows { option value=(w) {} } }
            }
            label { "Status "
                select name="status" {
                    option value="" { "any" }
                    @for s in InstanceStatus::ALL {
                        option value=(s.as_str()) selected[filter.statuses == [s]] { (s.as_str()) }
                    }
                }
            }
            label { "Business id " input name="business_id" value=[filter.business_id.as_ref().map(ToString::to_string)] placeholder="key::value"; }
            label { "Created from " input name="since" value=[filter.since.map(super::time)] placeholder="2026-01-31T09:00:00Z"; }
            label { "until " input name="until" value=[filter.until.map(super::time)] placeholder="(UTC)"; }
            button type="submit" { "Filter" }
            a.reset href=(ctx.url("/instances")) { "Clear" }
        }
        form.search method="get" action=(ctx.url("/instances")) {
            label { "Find " input name="q" placeholder="instance id or business id" value=[q.as_deref()]; }
            button type="submit" { "Go" }
        }
        @if filter.statuses.len() > 1 {
            p.note { "Statuses: " @for s in &filter.statuses { (badge(s.as_str())) " " } }
        }
        @if page.instances.is_empty() {
            p.empty { "No instances match." }
        } @else {
            table.list.instances {
                thead { tr { th { "Instance" } th { "Status" } th { "Workflow" } th { "Business id" } th { "Created" } th { "Updated" } } }
                tbody {
                    @for i in &page.instances {
                        tr data-id=(i.id) data-status=(i.status.as_str()) {
                            td { a href=(ctx.url(&format!("/instances/{}", i.id))) { (i.id) } }
                            td { (badge(i.status.as_str())) }
                            td { (i.workflow_id) " v" (i.workflow_version) }
                            td { (i.business_id) }
                            td { (when(i.created_at)) }
                            td { (when(i.updated_at)) }
                        }
                    }
                }
            }
        }
        nav.pager {
            @if after.is_some() { a href=(first_url) { "First page" } }
            @if let Some(url) = &next_url { a.next href=(url) { "Next page" } } @else { span { "No more." } }
        }
        @if ctx.actions {
            section.bulk {
                h2 { "Bulk actions on everything these filters select" }
                a.button href=(bulk("cancel")) { "Cancel the active ones…" }
                " "
                a.button href=(bulk("retry")) { "Retry the failed ones…" }
                p.hint { "The next page says how many instances it would touch and asks to confirm." }
            }
        }
    };
    Ok(layout(&ctx, "Instances", "instances", body).into_response())
}
