//! `GET /workflows`: every registered workflow and version with its
//! instance counts; `GET /workflows/{id}?version=N`: one version's DAG,
//! its counts, and the form that starts an instance.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use hephaestus_engine_core::dag::Dag;
use hephaestus_engine_core::instance::InstanceStatus;
use maud::{Markup, html};

use super::{badge, store};
use crate::Shared;
use crate::error::PageError;
use crate::page::{Ctx, layout};
use crate::params::{self, Params, query_string};

type Counts = BTreeMap<(String, u32), BTreeMap<InstanceStatus, u64>>;

async fn counts(shared: &Shared) -> Result<Counts, PageError> {
    let mut out: Counts = BTreeMap::new();
    for c in store(shared)
        .counts()
        .await
        .map_err(|e| PageError::port("counting instances", &e))?
    {
        *out.entry((c.workflow_id, c.workflow_version))
            .or_default()
            .entry(c.status)
            .or_default() += c.count;
    }
    Ok(out)
}

fn count_cells(
    ctx: &Ctx,
    workflow: &str,
    counts: Option<&BTreeMap<InstanceStatus, u64>>,
) -> Markup {
    html! {
        @for s in InstanceStatus::ALL {
            td.num {
                @match counts.and_then(|c| c.get(&s)) {
                    Some(n) => a href=(ctx.url(&format!("/instances?{}", query_string([("workflow", workflow.to_owned()), ("status", s.as_str().to_owned())])))) { (n) },
                    None => span.zero { "0" },
                }
            }
        }
    }
}

/// The workflows page.
pub(crate) async fn list(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    RawQuery(raw): RawQuery,
) -> Result<Markup, PageError> {
    Params::parse(raw.unwrap_or_default().as_bytes(), &[]).finish()?;
    let counts = counts(&shared).await?;
    let registry = shared.runtime.registry();
    let registered: Vec<(String, u32)> = registry
        .families()
        .flat_map(|f| f.versions().map(move |(v, _)| (f.id().to_string(), v)))
        .collect();
    let unregistered: Vec<&(String, u32)> =
        counts.keys().filter(|k| !registered.contains(k)).collect();
    let body = html! {
        h1 { "Workflows" }
        table.list.workflows {
            thead { tr { th { "Workflow" } th { "Version" } @for s in InstanceStatus::ALL { th { (s.as_str()) } } } }
            tbody {
                @for family in registry.families() {
                    @for (version, _) in family.versions() {
                        tr {
                            td { a href=(ctx.url(&format!("/workflows/{}?version={version}", params::segment(family.id().as_str())))) { (family.id()) } }
                            td { "v" (version) @if version == family.current_version() { " (current)" } }
                            (count_cells(&ctx, family.id().as_str(), counts.get(&(family.id().to_string(), version))))
                        }
                    }
                }
            }
        }
        @if !unregistered.is_empty() {
            h2 { "Instances of workflows this dashboard does not register" }
            p.note { "Their pages draw the DAG from the stored step states; they cannot be steered from here." }
            table.list {
                thead { tr { th { "Workflow" } th { "Version" } @for s in InstanceStatus::ALL { th { (s.as_str()) } } } }
                tbody {
                    @for (workflow, version) in unregistered {
                        tr {
                            td { (workflow) } td { "v" (version) }
                            (count_cells(&ctx, workflow, counts.get(&(workflow.clone(), *version))))
                        }
                    }
                }
            }
        }
    };
    Ok(layout(&ctx, "Workflows", "workflows", body))
}

/// One workflow version's page.
pub(crate) async fn page(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(raw): RawQuery,
) -> Result<Markup, PageError> {
    let Path(id) = path.map_err(|e| PageError::bad(format!("the workflow id in the path: {e}")))?;
    let mut params = Params::parse(raw.unwrap_or_default().as_bytes(), &["version"]);
    let version = params.parsed("version", |s| {
        s.parse::<u32>()
            .map_err(|_| "a version is a whole number".to_owned())
    });
    params.finish()?;
    let registry = shared.runtime.registry();
    let family = registry.family(&id).map_err(|_| {
        PageError::NotFound(format!(
            "no workflow {id:?} is registered in this dashboard"
        ))
    })?;
    let version = version.unwrap_or_else(|| family.current_version());
    let Some(workflow) = family.version(version) else {
        let versions: Vec<String> = family.versions().map(|(v, _)| v.to_string()).collect();
        return Err(PageError::NotFound(format!(
            "{id} has no version {version}; registered versions: {}",
            versions.join(", ")
        )));
    };
    let counts = counts(&shared).await?;
    let dag = Dag::of_workflow(workflow);
    let svg = crate::svg::render(&dag, &|_| None, &BTreeMap::new());
    let body = html! {
        h1 { "Workflow " code { (id) } " v" (version) }
        p { "Versions: "
            @for (v, _) in family.versions() {
                a href=(ctx.url(&format!("/workflows/{}?version={v}", params::segment(&id)))) { "v" (v) } " "
            }
        }
        table.counts {
            thead { tr { @for s in InstanceStatus::ALL { th { (badge(s.as_str())) } } } }
            tbody { tr { (count_cells(&ctx, &id, counts.get(&(id.clone(), version)))) } }
        }
        section.graph.plain {
            h2 { "DAG" }
            div.dag-scroll { (svg) }
            p.note { "Steps: " (dag.steps.len()) ", edges: " (dag.edges.len()) "." }
        }
        @if ctx.actions {
            section.start {
                h2 { "Start an instance" }
                form.start method="post" action=(ctx.url(&format!("/workflows/{}/start", params::segment(&id)))) {
                    (ctx.csrf_field())
                    input type="hidden" name="version" value=(version);
                    label { "Business value " input name="business_value" required placeholder="lower-case letters and digits, e.g. 42"; }
                    label.payload { "Input (JSON) " textarea name="input" data-json rows="4" { "{}" } }
                    p.json-error hidden {}
                    button type="submit" { "Start " (id) " v" (version) }
                }
            }
        }
    };
    Ok(layout(&ctx, &format!("Workflow {id}"), "workflows", body))
}
