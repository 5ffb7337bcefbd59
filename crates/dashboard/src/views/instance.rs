//! `GET /instances/{id}`: one instance as an operator needs it. Its DAG as
//! an SVG (from the definition when the runtime registers the workflow
//! version, else from the stored step states: steps not reached yet are
//! then unknown), each node coloured by its state; a click shows the step's
//! activation, timing, output, error, attempts, and for a waiting step the
//! resume form. Then the failure record, the context as collapsible JSON,
//! the instance's jobs with their errors, and the history as a timeline.
//! While the instance is active the page refreshes itself.

use std::sync::Arc;

use axum::Extension;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use hephaestus_engine_core::dag::{Dag, state_name};
use hephaestus_engine_core::ports::InstanceStore;
use hephaestus_engine_core::step::ErrorKind;
use hephaestus_engine_core::{Instance, StepError, StepId, Workflow};
use hephaestus_queue_pg::{Job, JobFilter};
use maud::{Markup, html};
use serde_json::Value;
use uuid::Uuid;

use super::{badge, queue, store, time, when};
use crate::Shared;
use crate::error::PageError;
use crate::page::{Ctx, layout_with};
use crate::params::{self, Params};

/// The id in the path, checked.
pub(crate) fn instance_id(path: Result<Path<String>, PathRejection>) -> Result<Uuid, PageError> {
    let Path(id) = path.map_err(|e| PageError::bad(format!("the instance id in the path: {e}")))?;
    params::uuid(&id).map_err(|e| PageError::bad(format!("{id:?} is not an instance id: {e}")))
}

/// The instance `id`, or a 404.
pub(crate) async fn load(shared: &Shared, id: Uuid) -> Result<Instance, PageError> {
    store(shared)
        .get(id)
        .await
        .map_err(|e| PageError::port("reading the instance", &e))?
        .ok_or_else(|| PageError::NotFound(format!("no instance {id}")))
}

fn kind(error: &StepError) -> &'static str {
    match error.kind {
        ErrorKind::Retryable { .. } => "retryable",
        ErrorKind::Fatal => "fatal",
    }
}

/// The instance page.
pub(crate) async fn page(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(raw): RawQuery,
) -> Result<Markup, PageError> {
    Params::parse(raw.unwrap_or_default().as_bytes(), &[]).finish()?;
    let id = instance_id(path)?;
    let instance = load(&shared, id).await?;
    let definition = shared
        .runtime
        .registry()
        .get(instance.workflow_id.as_str(), instance.workflow_version)
        .ok();
    let jobs = queue(&shared)
        .jobs(&JobFilter::default().with_group(hephaestus_runner::jobs::group(id)))
        .await
        .map_err(|e| PageError::queue("reading the instance's jobs", &e))?;
    let body = render(&ctx, &instance, definition, &jobs);
    let refresh = instance
        .status
        .is_active()
        .then(|| shared.refresh.as_millis());
    Ok(layout_with(
        &ctx,
        &format!("Instance {}", instance.business_id),
        "instances",
        refresh,
        body,
    ))
}

/// The page's main part (also what the performance test times).
pub(crate) fn render(
    ctx: &Ctx,
    instance: &Instance,
    definition: Option<&Workflow>,
    jobs: &[Job],
) -> Markup {
    let dag = definition.map_or_else(|| Dag::of_instance(instance), Dag::of_workflow);
    let taken = Dag::taken(instance);
    let state_of = |step: &str| Some(state_name(instance.steps.get(step)));
    let svg = crate::svg::render(&dag, &state_of, &taken);
    let attempts = hephaestus_runner::postgres::failed_attempts(instance, jobs);
    let steps: Vec<String> = dag.layers().into_iter().flatten().collect();
    let output = |step: &str| -> Option<&Value> {
        let key = definition
            .and_then(|wf| wf.step(step))
            .map(|def| def.key.clone())
            .or_else(|| StepId::new(step).ok().map(|id| id.default_step_key()))?;
        instance.context.steps.get(&key)
    };
    let action = |what: &str| ctx.url(&format!("/instances/{}/{what}", instance.id));
    let i = instance;
    html! {
        section.instance-head data-status=(i.status.as_str()) {
            h1 { "Instance " code { (i.id) } }
            dl.facts {
                dt { "Status" } dd id="status" { (badge(i.status.as_str())) }
                dt { "Business id" } dd { (i.business_id) }
                dt { "Workflow" } dd { a href=(ctx.url(&format!("/workflows/{}?version={}", params::segment(i.workflow_id.as_str()), i.workflow_version))) { (i.workflow_id) " v" (i.workflow_version) } }
                dt { "Created" } dd { (when(i.created_at)) }
                dt { "Updated" } dd { (when(i.updated_at)) }
                dt { "Revision" } dd { (i.revision) }
            }
            @if ctx.actions {
                div.actions {
                    @if i.status.is_active() {
                        form.inline method="post" action=(action("cancel")) data-confirm="Cancel this instance? Nothing of it runs afterwards." {
                            (ctx.csrf_field())
                            input name="reason" placeholder="reason (kept in the history)";
                            button.danger type="submit" { "Cancel instance" }
                        }
                    }
                    @if i.status == hephaestus_engine_core::InstanceStatus::Failed {
                        form.inline method="post" action=(action("retry")) {
                            (ctx.csrf_field())
                            button type="submit" { "Retry from the failed step" }
                        }
                    }
                }
            }
        }
        @if let Some(f) = &i.failure {
            section.failure {
                h2 { "Failure" }
                p {
                    @match &f.step { Some(s) => { "Step " code { (s) } " (activation " (f.activation) ")" }, None => { "The instance itself" } }
                    " failed at " (when(f.at)) ": "
                    strong.error { (f.error.message) } " [" (kind(&f.error)) "]"
                }
                @if let Some(details) = &f.error.details { (crate::json::tree(details)) }
                @if !f.attempts.is_empty() {
                    ol.attempts { @for a in &f.attempts { li { "attempt " (a.attempt) " at " (when(a.at)) ": " (a.error.message) " [" (kind(&a.error)) "]" } } }
                }
            }
        }
        section.graph {
            h2 { "DAG"
                @if definition.is_none() {
                    span.note { " (drawn from the stored step states: this dashboard does not register " (i.workflow_id) " v" (i.workflow_version) "; steps not reached yet are not shown)" }
                }
            }
            p.legend {
                @for s in ["pending", "running", "waiting", "done", "failed", "dead", "cancelled"] { (badge(s)) " " }
                span.hint { "Click a step for its details." }
            }
            div.dag-scroll { (svg) }
            div.step-details {
                @for step in &steps {
                    @let state = i.steps.get(step.as_str());
                    @let name = state_name(state);
                    section.step-detail data-step=(step) hidden {
                        h3 { code { (step) } " " (badge(name)) }
                        dl.facts {
                            @if let Some(s) = state {
                                dt { "Activation" } dd { (s.activation) }
                                @if let Some(e) = &s.event { dt { "Event" } dd { ":" (e) } }
                                @if !s.targets.is_empty() { dt { "Routed to" } dd { @for t in &s.targets { code { (t) } " " } } }
                                @if let Some(at) = s.activated_at { dt { "Activated" } dd { (when(at)) } }
                                @if let Some(at) = s.updated_at { dt { "Updated" } dd { (when(at)) } }
                                @if let (Some(a), Some(u)) = (s.activated_at, s.updated_at) {
                                    dt { "Took" } dd { ((u - a).num_milliseconds()) " ms" }
                                }
                                @if let Some(t) = &s.timer { dt { "Timer" } dd { ":" (t.event) " at " (when(t.fire_at)) } }
                            } @else {
                                dt { "State" } dd { "not reached" }
                            }
                        }
                        @if let Some(out) = output(step) { h4 { "Output" } (crate::json::tree(out)) }
                        @if let Some(config) = i.step_configs.get(step.as_str()) { h4 { "Config" } (crate::json::tree(config)) }
                        @if let Some(f) = i.failure.as_ref().filter(|f| f.step.as_ref().map(StepId::as_str) == Some(step.as_str())) {
                            h4 { "Error" } p.error { (f.error.message) " [" (kind(&f.error)) "]" }
                        }
                        @if let Some(list) = attempts.get(step.as_str()) {
                            h4 { "Failed attempts" }
                            ol.attempts {
                                @for a in list {
                                    li {
                                        "attempt " (a.number)
                                        @if let Some(act) = a.activation { " (activation " (act) ")" }
                                        @if let Some(job) = a.job_id { " job " a href=(ctx.url(&format!("/jobs/{job}"))) { "#" (job) } }
                                        " at " (when(a.at)) ": " (a.error.message) " [" (kind(&a.error)) "]"
                                    }
                                }
                            }
                        }
                        @if name == "waiting" || name == "running" {
                            (resume_form(ctx, i, definition, step))
                        }
                    }
                }
            }
        }
        section.context {
            h2 { "Context" }
            details.context-entry open {
                summary { "initial (the input)" }
                (crate::json::tree(&i.context.initial))
            }
            @for (key, value) in &i.context.steps {
                details.context-entry {
                    summary { (key) }
                    (crate::json::tree(value))
                }
            }
        }
        section.jobs {
            h2 { "Jobs" }
            @if jobs.is_empty() {
                p.empty { "None (finished jobs are pruned after a while)." }
            } @else {
                table.list {
                    thead { tr { th { "Job" } th { "Kind" } th { "Step" } th { "State" } th { "Attempt" } th { "Errors" } } }
                    tbody {
                        @for job in jobs {
                            tr {
                                td { a href=(ctx.url(&format!("/jobs/{}", job.id.0))) { "#" (job.id.0) } }
                                td { (job.kind) }
                                td { @if let Some(s) = job.args.get("step").and_then(Value::as_str) { code { (s) } } }
                                td { (badge(job.state.as_str())) }
                                td { (job.attempt) "/" (job.max_attempts) }
                                td.error { @for e in &job.errors { div { "attempt " (e.attempt) ": " (e.error.message) } } }
                            }
                        }
                    }
                }
            }
        }
        section.history {
            h2 { "History" }
            ol.timeline {
                @for entry in &i.history {
                    li {
                        span.at { (time(entry.at)) }
                        @if let Some(step) = &entry.step { " " code { (step) "#" (entry.activation) } }
                        " " span.what { (entry.kind) }
                    }
                }
            }
        }
    }
}

/// The resume form of a waiting (or still running) step: its declared
/// events, and an optional JSON payload the page's script checks before
/// sending (the server checks it again).
fn resume_form(
    ctx: &Ctx,
    instance: &Instance,
    definition: Option<&Workflow>,
    step: &str,
) -> Markup {
    if !ctx.actions {
        return html! {};
    }
    let Some(def) = definition.and_then(|wf| wf.step(step)) else {
        return html! { p.note { "Resuming needs the definition of this workflow, which this dashboard does not register." } };
    };
    html! {
        form.resume method="post" action=(ctx.url(&format!("/instances/{}/resume", instance.id))) data-step=(step) {
            h4 { "Resume" }
            (ctx.csrf_field())
            input type="hidden" name="step" value=(step);
            label { "Event "
                select name="event" {
                    @for e in &def.events { option value=(e) { (e) } }
                }
            }
            label.payload { "Payload (JSON, optional: the step's output) "
                textarea name="payload" data-json rows="3" placeholder="{}" {}
            }
            p.json-error hidden {}
            button type="submit" { "Resume " code { (step) } }
        }
    }
}
