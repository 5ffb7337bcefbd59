//! The actions (POST), each through the runner's API so every rule holds as
//! in an application: resume a step with one of its declared events and an
//! optional JSON payload, cancel, retry a failed instance, start an
//! instance, and bulk cancel or retry over a filter. A success redirects
//! (303) to the page to look at next; a failure is the runner's typed error
//! on a page with its status (400, 404, 409).

use std::sync::Arc;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use hephaestus_runner::StartOptions;
use hephaestus_storage_pg::{Cursor, SortKey};
use maud::html;

use crate::Shared;
use crate::error::PageError;
use crate::page::{Ctx, layout, see_other};
use crate::params;
use crate::views::bulk::{self, Bulk};
use crate::views::instance::{instance_id, load};
use crate::views::{FILTER_PARAMS, store};

/// Instances acted on per page of a bulk action.
const BULK_PAGE: u32 = 200;

/// Any action of a read-only dashboard.
pub(crate) async fn read_only() -> PageError {
    PageError::Forbidden(
        "this dashboard is read-only (--read-only): it serves no action".to_owned(),
    )
}

/// `POST /instances/{id}/resume`: `step`, `event`, optional `payload`.
pub(crate) async fn resume(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, PageError> {
    let mut form = ctx.form(&shared, body, &["step", "event", "payload"])?;
    let id = instance_id(path)?;
    let step = form.required("step", "the waiting step to resume");
    let event = form.required("event", "one of the step's declared events");
    let payload = form
        .parsed("payload", params::json)
        .unwrap_or_else(|| serde_json::json!({}));
    form.finish()?;
    let (Some(step), Some(event)) = (step, event) else {
        return Err(PageError::bad("step and event are required"));
    };
    let instance = load(&shared, id).await?;
    shared
        .runtime
        .resume(instance.id, &step, &event, payload)
        .await
        .map_err(|e| {
            PageError::runner(
                &format!("cannot resume step {step} of instance {id} with :{event}"),
                &e,
            )
        })?;
    Ok(see_other(&ctx.url(&format!("/instances/{id}"))))
}

/// `POST /instances/{id}/cancel`: optional `reason`.
pub(crate) async fn cancel(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, PageError> {
    let mut form = ctx.form(&shared, body, &["reason"])?;
    let id = instance_id(path)?;
    let reason = form.one("reason");
    form.finish()?;
    load(&shared, id).await?;
    shared
        .runtime
        .cancel(id, reason)
        .await
        .map_err(|e| PageError::runner(&format!("cannot cancel instance {id}"), &e))?;
    Ok(see_other(&ctx.url(&format!("/instances/{id}"))))
}

/// `POST /instances/{id}/retry`.
pub(crate) async fn retry(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, PageError> {
    ctx.form(&shared, body, &[])?.finish()?;
    let id = instance_id(path)?;
    load(&shared, id).await?;
    shared
        .runtime
        .retry(id)
        .await
        .map_err(|e| PageError::runner(&format!("cannot retry instance {id}"), &e))?;
    Ok(see_other(&ctx.url(&format!("/instances/{id}"))))
}

/// `POST /workflows/{id}/start`: `business_value`, optional `input` (JSON,
/// default `{}`) and `version`.
pub(crate) async fn start(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, PageError> {
    let mut form = ctx.form(&shared, body, &["business_value", "input", "version"])?;
    let Path(workflow) =
        path.map_err(|e| PageError::bad(format!("the workflow id in the path: {e}")))?;
    let value = form.required("business_value", "the business value of the new instance");
    let input = form
        .parsed("input", params::json)
        .unwrap_or_else(|| serde_json::json!({}));
    let version = form.parsed("version", |s| {
        s.parse::<u32>()
            .map_err(|_| "a version is a whole number".to_owned())
    });
    form.finish()?;
    let Some(value) = value else {
        return Err(PageError::bad("business_value is required"));
    };
    let started = shared
        .runtime
        .start(
            &workflow,
            &value,
            input,
            StartOptions::default().with_version(version),
        )
        .await
        .map_err(|e| PageError::runner(&format!("cannot start {workflow} for {value:?}"), &e))?;
    Ok(see_other(&ctx.url(&format!("/instances/{}", started.id))))
}

/// `POST /instances/bulk`: `action`, the filters, and `expected` (the count
/// the operator confirmed). Refused (409) when the selection no longer
/// holds that many instances; otherwise each selected instance is
/// cancelled or retried through the runner, and the page reports what was
/// done and each error.
pub(crate) async fn bulk(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, PageError> {
    let mut names = FILTER_PARAMS.to_vec();
    names.extend(["action", "expected"]);
    let mut form = ctx.form(&shared, body, &names)?;
    let (action, filter) = bulk::parse(&mut form);
    let expected = form.parsed("expected", |s| {
        s.parse::<u64>()
            .map_err(|_| "expected is the count confirmed on the previous page".to_owned())
    });
    if expected.is_none() && form.one("expected").is_none() {
        form.problem("expected is missing: confirm the action on its confirmation page");
    }
    form.finish()?;
    let (Some(action), Some(expected)) = (action, expected) else {
        return Err(PageError::bad("action and expected are required"));
    };
    let now = bulk::count(&shared, action, &filter).await?;
    if now != expected {
        return Err(PageError::Conflict(format!(
            "the selection changed: {now} instances match now, {expected} were confirmed; review it again"
        )));
    }
    let Some(target) = action.target(&filter) else {
        return Err(PageError::Conflict("no instance is selected".to_owned()));
    };
    let mut query = target.query();
    query.limit = Some(BULK_PAGE);
    let mut done = 0_u64;
    let mut errors: Vec<String> = Vec::new();
    let store = store(&shared);
    loop {
        let page = store
            .query(&query)
            .await
            .map_err(|e| PageError::port("listing the selected instances", &e))?;
        for instance in &page.instances {
            let outcome = match action {
                Bulk::Cancel => {
                    shared
                        .runtime
                        .cancel(
                            instance.id,
                            Some("bulk cancel from the dashboard".to_owned()),
                        )
                        .await
                }
                Bulk::Retry => shared.runtime.retry(instance.id).await.map(|_| ()),
            };
            match outcome {
                Ok(()) => done += 1,
                Err(e) => errors.push(format!("{}: {e}", instance.id)),
            }
        }
        match (page.next, page.instances.last()) {
            (Some(_), Some(last)) => query.after = Some(Cursor::after(last, SortKey::Id)),
            _ => break,
        }
    }
    let verb = action.name();
    let body = html! {
        h1 { "Bulk " (verb) }
        p.bulk-result data-done=(done) data-failed=(errors.len()) {
            (verb) " done for " (done) " of " (expected) " instance" @if expected != 1 { "s" } "."
        }
        @if !errors.is_empty() {
            h2 { "Errors" }
            ul.problems { @for e in &errors { li { (e) } } }
        }
        p { a href=(ctx.url(&format!("/instances?{}", params::query_string(filter.pairs())))) { "Back to the instances" } }
    };
    Ok(layout(&ctx, "Bulk action", "instances", body).into_response())
}
