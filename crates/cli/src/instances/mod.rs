//! `hephaestus instances list|show|resume|cancel|retry`: workflow instances
//! seen and steered by an operator.
//!
//! An instance is named by its UUID or by its business id (`key::value`):
//! the active instance with that business id, else the latest one.

mod control;
mod list;
mod show;

use anyhow::{Context as _, Result, anyhow, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use clap::Subcommand;
use hephaestus_engine_core::business_id::BusinessId;
use hephaestus_engine_core::ports::InstanceStore;
use hephaestus_engine_core::{Instance, Workflow};
use hephaestus_runner::{Backend, Runtime};
use hephaestus_storage_pg::{InstanceQuery, PgStore};
use uuid::Uuid;

use crate::App;

/// The instance commands.
#[derive(Debug, Subcommand)]
pub enum InstancesCommand {
    /// Lists instances, newest first, with filters and keyset paging.
    List(list::ListCommand),
    /// Shows one instance: its DAG with each step's state, output, errors
    /// and attempts, its jobs and its execution history.
    Show(show::ShowCommand),
    /// Resumes a waiting step of an instance with an event.
    Resume(control::ResumeCommand),
    /// Cancels an instance: nothing of it runs afterwards.
    Cancel(control::CancelCommand),
    /// Restarts a failed instance from its failed step.
    Retry(control::RetryCommand),
}

impl InstancesCommand {
    pub async fn run(self, app: &App) -> Result<()> {
        match self {
            Self::List(list) => list.run().await,
            Self::Show(show) => show.run(app).await,
            Self::Resume(resume) => resume.run(app).await,
            Self::Cancel(cancel) => cancel.run(app).await,
            Self::Retry(retry) => retry.run(app).await,
        }
    }
}

/// The instance `given` names: a UUID, or a business id (the active
/// instance with it, else the latest).
async fn resolve(store: &PgStore, given: &str) -> Result<Instance> {
    let schema = store.prefix().as_str();
    if let Ok(id) = Uuid::parse_str(given) {
        return store
            .get(id)
            .await
            .context("reading the instance")?
            .ok_or_else(|| anyhow!("no instance {id} in schema {schema}"));
    }
    let business_id = BusinessId::parse(given).map_err(|e| {
        anyhow!("{given:?} is neither an instance id (a UUID) nor a business id (key::value): {e}")
    })?;
    let page = store
        .query(
            &InstanceQuery::default()
                .with_business_id(business_id)
                .with_limit(100),
        )
        .await
        .context("looking the business id up")?;
    let active: Vec<&Instance> = page
        .instances
        .iter()
        .filter(|i| i.status.is_active())
        .collect();
    if let [one] = active.as_slice() {
        return Ok((*one).clone());
    }
    if active.len() > 1 {
        let names: Vec<String> = active
            .iter()
            .map(|i| format!("{} ({})", i.id, i.workflow_id))
            .collect();
        bail!(
            "business id {given} names {} active instances: {}; give the instance id",
            active.len(),
            names.join(", ")
        );
    }
    page.instances
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("no instance with business id {given} in schema {schema}"))
}

/// [`resolve`] on a SQLite file.
async fn resolve_sqlite(
    backend: &hephaestus_sqlite::SqliteBackend,
    given: &str,
) -> Result<Instance> {
    let file = backend.path().display();
    if let Ok(id) = Uuid::parse_str(given) {
        return backend
            .get(id)
            .await
            .context("reading the instance")?
            .ok_or_else(|| anyhow!("no instance {id} in {file}"));
    }
    let business_id = BusinessId::parse(given).map_err(|e| {
        anyhow!("{given:?} is neither an instance id (a UUID) nor a business id (key::value): {e}")
    })?;
    let page = backend
        .list(
            &hephaestus_engine_core::ports::InstanceFilter::default()
                .with_business_id(business_id)
                .with_limit(100),
        )
        .await
        .context("looking the business id up")?;
    let active: Vec<&Instance> = page.iter().filter(|i| i.status.is_active()).collect();
    if let [one] = active.as_slice() {
        return Ok((*one).clone());
    }
    if active.len() > 1 {
        bail!(
            "business id {given} names {} active instances; give the instance id",
            active.len()
        );
    }
    page.into_iter()
        .next()
        .ok_or_else(|| anyhow!("no instance with business id {given} in {file}"))
}

/// Why a command needs the definition of an instance's workflow.
#[derive(Debug, Clone, Copy)]
enum NeedsDefinition {
    /// `instances resume`.
    Resume,
    /// `instances cancel`.
    Cancel,
    /// `instances retry`.
    Retry,
}

impl NeedsDefinition {
    fn explain(self) -> &'static str {
        match self {
            Self::Resume => "resume needs it to check the step and its declared events",
            Self::Cancel => {
                "cancel needs it too: the runner applies the cancel through the engine, which checks the instance against its definition"
            }
            Self::Retry => "retry needs it to restart the failed steps",
        }
    }
}

/// The definition of `instance`'s workflow version in `runtime`, or an
/// error that names the workflow and says what to do.
fn definition<'r, B: Backend>(
    runtime: &'r Runtime<B>,
    instance: &Instance,
    why: NeedsDefinition,
) -> Result<&'r Workflow> {
    let registry = runtime.registry();
    let (workflow, version) = (instance.workflow_id.as_str(), instance.workflow_version);
    if let Ok(wf) = registry.get(workflow, version) {
        return Ok(wf);
    }
    let known: Vec<String> = registry.families().map(|f| f.id().to_string()).collect();
    let known = if known.is_empty() {
        "none".to_owned()
    } else {
        known.join(", ")
    };
    let what = match registry.family(workflow) {
        Ok(family) => {
            let versions: Vec<String> = family.versions().map(|(v, _)| v.to_string()).collect();
            format!(
                "instance {} runs workflow {workflow} v{version}, and this hephaestus binary registers {workflow} only in version(s) {}",
                instance.id,
                versions.join(", ")
            )
        }
        Err(_) => format!(
            "instance {} runs workflow {workflow} v{version}, which this hephaestus binary does not register (it registers: {known})",
            instance.id
        ),
    };
    bail!(
        "{what}; {}. Build a hephaestus binary with {workflow} v{version} registered (the hephaestus_cli library: `App::new(your_registration).run()`); `instances list` and `instances show` work without it",
        why.explain()
    )
}

/// A timestamp as printed: RFC 3339, UTC, milliseconds.
pub(crate) fn time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}
