//! `GET /jobs?queue=Q&state=S&after=ID&limit=N`: jobs by queue and state
//! (oldest first, keyset paging by job id), with the depth of every queue
//! and the most recent errors; `GET /jobs/{id}`: one job's args, meta,
//! attempts and errors.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use hephaestus_engine_core::ports::{JobId, JobState};
use hephaestus_queue_pg::JobFilter;
use maud::{Markup, html};
use serde_json::Value;

use super::{badge, queue, when};
use crate::Shared;
use crate::error::PageError;
use crate::page::{Ctx, layout};
use crate::params::{self, Params, query_string};

/// Recent errors shown.
const RECENT_ERRORS: usize = 20;
/// The default page size.
const PAGE: u32 = 50;

/// The jobs page.
pub(crate) async fn list(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    RawQuery(raw): RawQuery,
) -> Result<Markup, PageError> {
    let mut params = Params::parse(
        raw.unwrap_or_default().as_bytes(),
        &["queue", "state", "after", "limit"],
    );
    let queue_name = params.one("queue");
    let state = params.parsed("state", params::job_state);
    let after = params.parsed("after", params::job_id);
    let limit = params.parsed("limit", params::limit(500)).unwrap_or(PAGE);
    params.finish()?;
    let queue = queue(&shared);
    let depth = queue
        .depth()
        .await
        .map_err(|e| PageError::queue("counting jobs", &e))?;
    let mut queues: BTreeMap<String, BTreeMap<JobState, u64>> = BTreeMap::new();
    for d in depth {
        queues.entry(d.queue).or_default().insert(d.state, d.count);
    }
    let mut filter = JobFilter::default()
        .with_states(state)
        .with_limit(limit + 1);
    if let Some(name) = &queue_name {
        filter = filter.with_queue(name.clone());
    }
    if let Some(after) = after {
        filter = filter.with_after(JobId(after));
    }
    let jobs = queue
        .jobs(&filter)
        .await
        .map_err(|e| PageError::queue("listing jobs", &e))?;
    let more = jobs.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    let jobs = &jobs[..jobs.len().min(usize::try_from(limit).unwrap_or(usize::MAX))];
    let errors = queue
        .recent_errors(RECENT_ERRORS)
        .await
        .map_err(|e| PageError::queue("reading recent errors", &e))?;
    let mut pairs = Vec::new();
    if let Some(q) = &queue_name {
        pairs.push(("queue", q.clone()));
    }
    if let Some(s) = state {
        pairs.push(("state", s.as_str().to_owned()));
    }
    if limit != PAGE {
        pairs.push(("limit", limit.to_string()));
    }
    let next = more.then(|| jobs.last()).flatten().map(|last| {
        let mut p = pairs.clone();
        p.push(("after", last.id.0.to_string()));
        ctx.url(&format!("/jobs?{}", query_string(p)))
    });
    let body = html! {
        h1 { "Jobs" }
        table.counts {
            thead { tr { th { "Queue" } @for s in JobState::ALL { th { (s.as_str()) } } } }
            tbody {
                @for (name, states) in &queues {
                    tr {
                        td { a href=(ctx.url(&format!("/jobs?{}", query_string([("queue", name.clone())])))) { (name) } }
                        @for s in JobState::ALL {
                            td.num {
                                @match states.get(&s) {
                                    Some(n) => a href=(ctx.url(&format!("/jobs?{}", query_string([("queue", name.clone()), ("state", s.as_str().to_owned())])))) { (n) },
                                    None => span.zero { "0" },
                                }
                            }
                        }
                    }
                }
            }
        }
        form.filters method="get" action=(ctx.url("/jobs")) {
            label { "Queue " input name="queue" value=[queue_name.as_deref()] placeholder="any"; }
            label { "State "
                select name="state" {
                    option value="" { "any" }
                    @for s in JobState::ALL { option value=(s.as_str()) selected[state == Some(s)] { (s.as_str()) } }
                }
            }
            button type="submit" { "Filter" }
        }
        @if jobs.is_empty() {
            p.empty { "No jobs match." }
        } @else {
            table.list.jobs {
                thead { tr { th { "Job" } th { "Queue" } th { "Kind" } th { "State" } th { "Attempt" } th { "Due" } th { "Instance" } } }
                tbody {
                    @for job in jobs {
                        tr data-state=(job.state.as_str()) {
                            td { a href=(ctx.url(&format!("/jobs/{}", job.id.0))) { "#" (job.id.0) } }
                            td { (job.queue) }
                            td { (job.kind) }
                            td { (badge(job.state.as_str())) }
                            td { (job.attempt) "/" (job.max_attempts) }
                            td { (when(job.scheduled_at)) }
                            td { (instance_link(&ctx, job)) }
                        }
                    }
                }
            }
        }
        nav.pager {
            @if after.is_some() { a href=(ctx.url(&format!("/jobs?{}", query_string(pairs.clone())))) { "First page" } }
            @if let Some(url) = &next { a.next href=(url) { "Next page" } } @else { span { "No more." } }
        }
        section {
            h2 { "Recent errors" }
            @if errors.is_empty() {
                p.empty { "None." }
            } @else {
                table.list {
                    thead { tr { th { "When" } th { "Job" } th { "Kind" } th { "Queue" } th { "State" } th { "Attempt" } th { "Error" } } }
                    tbody {
                        @for e in &errors {
                            tr {
                                td { (when(e.at)) }
                                td { a href=(ctx.url(&format!("/jobs/{}", e.job_id.0))) { "#" (e.job_id.0) } }
                                td { (e.kind) } td { (e.queue) } td { (badge(e.state.as_str())) } td { (e.attempt) }
                                td.error { (e.message) }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout(&ctx, "Jobs", "jobs", body))
}

/// The workflow instance a runner job belongs to (its args or meta name
/// it), as a link.
fn instance_link(ctx: &Ctx, job: &hephaestus_queue_pg::Job) -> Markup {
    let id = job
        .args
        .get("instance_id")
        .or_else(|| job.meta.get("instance_id"))
        .and_then(Value::as_str)
        .and_then(|s| uuid::Uuid::parse_str(s).ok());
    html! { @if let Some(id) = id { a href=(ctx.url(&format!("/instances/{id}"))) { (id) } } }
}

/// One job's page.
pub(crate) async fn page(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(raw): RawQuery,
) -> Result<Markup, PageError> {
    Params::parse(raw.unwrap_or_default().as_bytes(), &[]).finish()?;
    let Path(id) = path.map_err(|e| PageError::bad(format!("the job id in the path: {e}")))?;
    let id = params::job_id(&id).map_err(|e| PageError::bad(format!("{id:?}: {e}")))?;
    let job = queue(&shared)
        .job(JobId(id))
        .await
        .map_err(|e| PageError::queue("reading the job", &e))?
        .ok_or_else(|| {
            PageError::NotFound(format!(
                "no job #{id} (finished jobs are pruned after a while)"
            ))
        })?;
    let body = html! {
        h1 { "Job #" (job.id.0) " " (badge(job.state.as_str())) }
        dl.facts {
            dt { "Kind" } dd { (job.kind) }
            dt { "Queue" } dd { (job.queue) }
            dt { "Priority" } dd { (job.priority) }
            dt { "Attempt" } dd { (job.attempt) " of " (job.max_attempts) }
            dt { "Inserted" } dd { (when(job.inserted_at)) }
            dt { "Due" } dd { (when(job.scheduled_at)) }
            @if let Some(at) = job.attempted_at { dt { "Attempted" } dd { (when(at)) } }
            @if let Some(by) = &job.attempted_by { dt { "By" } dd { (by) } }
            @if let Some(at) = job.heartbeat_at { dt { "Heartbeat" } dd { (when(at)) } }
            @if let Some(at) = job.completed_at { dt { "Completed" } dd { (when(at)) } }
            @if let Some(at) = job.discarded_at { dt { "Discarded" } dd { (when(at)) } }
            @if let Some(at) = job.cancelled_at { dt { "Cancelled" } dd { (when(at)) } }
            @if let Some(key) = &job.unique_key { dt { "Unique key" } dd { code { (key) } } }
            @if let Some(group) = &job.group { dt { "Group" } dd { code { (group) } } }
            @if !job.tags.is_empty() { dt { "Tags" } dd { @for t in &job.tags { code { (t) } " " } } }
            dt { "Instance" } dd { (instance_link(&ctx, &job)) }
        }
        h2 { "Args" } (crate::json::tree(&job.args))
        h2 { "Meta" } (crate::json::tree(&Value::Object(job.meta.clone())))
        h2 { "Errors" }
        @if job.errors.is_empty() {
            p.empty { "None." }
        } @else {
            ol.attempts {
                @for e in &job.errors {
                    li { "attempt " (e.attempt) " at " (when(e.at)) ": " span.error { (e.error.message) } }
                }
            }
        }
    };
    Ok(layout(&ctx, &format!("Job #{id}"), "jobs", body))
}
