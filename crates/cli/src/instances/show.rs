//! `hephaestus instances show ID`: one instance as an operator needs it —
//! status, business id, workflow and version, timestamps, the failure, the
//! DAG with each step's state (done, running, waiting, failed, dead,
//! cancelled, pending), output, errors and attempts, the instance's jobs
//! with their recorded errors, and the execution history.
//!
//! The DAG comes from the definition when this binary registers the
//! instance's workflow version; otherwise from the instance's stored step
//! states and the edges its completed steps took (steps not reached yet are
//! then unknown and not drawn).

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use clap::Args;
use hephaestus_engine_core::instance::{HistoryEntry, StepState};
use hephaestus_engine_core::step::{ErrorKind, StepError};
use hephaestus_engine_core::{Instance, StepId, Workflow};
use hephaestus_queue_pg::{Job, JobFilter};
use hephaestus_runner::RunnerConfig;
use hephaestus_runner::postgres::{StepAttempt, failed_attempts};
use hephaestus_storage_pg::RawInstance;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{resolve, time};
use crate::App;
use crate::database::{Database, DatabaseArgs, Needs};
use crate::graph::{Dag, Marks, ascii};
use hephaestus_engine_core::dag::state_name;

/// `instances show` options.
#[derive(Debug, Args)]
pub struct ShowCommand {
    #[command(flatten)]
    db: DatabaseArgs,
    /// The instance: its id (a UUID) or its business id (key::value).
    instance: String,
    /// Print everything as one JSON object.
    #[arg(long)]
    json: bool,
}

impl ShowCommand {
    pub async fn run(self, app: &App) -> Result<()> {
        if hephaestus_sqlite::SqliteOptions::is_sqlite_url(&self.db.database_url) {
            return self.run_sqlite(app).await;
        }
        let db = Database::open(&self.db, Needs::Both).await?;
        let store = db.store();
        let instance = match resolve(&store, &self.instance).await {
            Ok(instance) => instance,
            Err(error) => {
                // An instance whose state cannot be decoded: show what can be read.
                if let Ok(id) = Uuid::parse_str(&self.instance)
                    && let Some(raw) = store
                        .get_raw_using(store.pool(), id, RAW_STATE_CHARS)
                        .await
                        .context("reading the instance's columns")?
                {
                    let jobs = instance_jobs(&db, id).await?;
                    self.print_raw(&raw, &error, &jobs);
                    return Ok(());
                }
                return Err(error);
            }
        };
        let definition = definition_of(
            app.runtime(&db, RunnerConfig::default(), false).await,
            &instance,
        );
        let jobs = instance_jobs(&db, instance.id).await?;
        let view = View::new(&instance, definition.as_ref(), &jobs);
        if self.json {
            println!("{}", view.json());
        } else {
            print!("{}", view.text());
        }
        Ok(())
    }

    /// `show` on a SQLite file.
    async fn run_sqlite(self, app: &App) -> Result<()> {
        let backend = crate::database::open_sqlite(&self.db.database_url).await?;
        let instance = super::resolve_sqlite(&backend, &self.instance).await?;
        let definition = definition_of(
            app.sqlite_runtime(backend.clone(), RunnerConfig::default(), false)
                .await,
            &instance,
        );
        let jobs: Vec<Job> = backend
            .jobs_of_group(&hephaestus_runner::jobs::group(instance.id))
            .await
            .context("reading the instance's jobs")?
            .into_iter()
            .map(job_of_record)
            .collect();
        let view = View::new(&instance, definition.as_ref(), &jobs);
        if self.json {
            println!("{}", view.json());
        } else {
            print!("{}", view.text());
        }
        backend.close().await;
        Ok(())
    }

    /// What can be read of an instance whose state cannot be decoded.
    fn print_raw(&self, raw: &RawInstance, error: &anyhow::Error, jobs: &[Job]) {
        let decode_error = format!("{error:#}");
        if self.json {
            println!(
                "{}",
                json!({
                    "id": raw.id,
                    "status": raw.status,
                    "business_id": raw.business_id,
                    "workflow": raw.workflow_id,
                    "version": raw.workflow_version,
                    "revision": raw.revision,
                    "created_at": time(raw.inserted_at),
                    "updated_at": time(raw.updated_at),
                    "decode_error": decode_error,
                    "state_text": raw.state,
                    "failure_text": raw.failure,
                    "jobs": jobs.iter().map(job_json).collect::<Vec<_>>(),
                })
            );
            return;
        }
        println!("instance {}  (its stored state CANNOT BE DECODED)", raw.id);
        println!("  error:     {decode_error}");
        println!("  status:    {}", raw.status);
        println!("  workflow:  {} v{}", raw.workflow_id, raw.workflow_version);
        println!("  business:  {}", raw.business_id);
        println!(
            "  created:   {}  updated: {}  revision: {}",
            time(raw.inserted_at),
            time(raw.updated_at),
            raw.revision
        );
        println!(
            "  state (first {RAW_STATE_CHARS} characters): {}",
            raw.state
        );
        if let Some(failure) = &raw.failure {
            println!("  failure: {failure}");
        }
        println!("jobs:");
        if jobs.is_empty() {
            println!("  none");
        }
        for job in jobs {
            println!(
                "  {} {} {}{} attempt {}/{}",
                job.id.0,
                job.kind,
                job_step(job).unwrap_or_default(),
                job.state.as_str(),
                job.attempt,
                job.max_attempts
            );
        }
        println!(
            "`hephaestus instances cancel {}` cancels it by its status and jobs.",
            raw.id
        );
    }
}

/// How much of an undecodable state document `show` prints.
const RAW_STATE_CHARS: u32 = 2_000;

/// The instance's jobs, live and finished.
async fn instance_jobs(db: &Database, id: Uuid) -> Result<Vec<Job>> {
    db.queue()
        .jobs(&JobFilter::default().with_group(hephaestus_runner::jobs::group(id)))
        .await
        .context("reading the instance's jobs")
}

/// A SQLite job as the views print jobs.
fn job_of_record(record: hephaestus_sqlite::JobRecord) -> Job {
    let info = record.info;
    Job {
        id: info.id,
        state: info.state,
        queue: info.queue,
        kind: info.kind,
        args: info.args,
        meta: info.meta,
        tags: info.tags,
        priority: info.priority,
        attempt: info.attempt,
        max_attempts: info.max_attempts,
        errors: info.errors,
        inserted_at: record.inserted_at,
        scheduled_at: info.scheduled_at,
        attempted_at: record.attempted_at,
        attempted_by: record.attempted_by,
        heartbeat_at: record.heartbeat_at,
        completed_at: record.completed_at,
        discarded_at: record.discarded_at,
        cancelled_at: record.cancelled_at,
        unique_key: record.unique_key,
        group: info.group,
    }
}

/// A failed attempt as JSON.
fn attempt_json(attempt: &StepAttempt) -> Value {
    json!({
        "job_id": attempt.job_id,
        "job_kind": attempt.job_kind,
        "activation": attempt.activation,
        "attempt": attempt.number,
        "at": time(attempt.at),
        "error_kind": error_kind(&attempt.error),
        "message": attempt.error.message,
    })
}

/// A failed attempt as a line of text.
fn attempt_line(attempt: &StepAttempt) -> String {
    let mut where_ = Vec::new();
    if let Some(a) = attempt.activation {
        where_.push(format!("activation {a}"));
    }
    if let Some(id) = attempt.job_id {
        where_.push(format!("job #{id}"));
    }
    format!(
        "attempt {} ({}) at {}: {} [{}]",
        attempt.number,
        where_.join(", "),
        time(attempt.at),
        attempt.error.message,
        error_kind(&attempt.error)
    )
}

fn error_kind(error: &StepError) -> &'static str {
    match error.kind {
        ErrorKind::Retryable { .. } => "retryable",
        ErrorKind::Fatal => "fatal",
    }
}

/// Everything `show` prints, gathered once for text and JSON.
struct View<'a> {
    instance: &'a Instance,
    definition: Option<&'a Workflow>,
    dag: Dag,
    jobs: &'a [Job],
    /// Step → its recorded failed attempts, oldest first.
    attempts: BTreeMap<String, Vec<StepAttempt>>,
}

impl<'a> View<'a> {
    fn new(instance: &'a Instance, definition: Option<&'a Workflow>, jobs: &'a [Job]) -> Self {
        let dag = definition.map_or_else(|| Dag::of_instance(instance), Dag::of_workflow);
        let attempts = failed_attempts(instance, jobs);
        Self {
            instance,
            definition,
            dag,
            jobs,
            attempts,
        }
    }

    /// The steps in drawing order (layer by layer).
    fn steps(&self) -> Vec<String> {
        self.dag.layers().into_iter().flatten().collect()
    }

    fn state(&self, step: &str) -> Option<&StepState> {
        self.instance.steps.get(step)
    }

    fn output(&self, step: &str) -> Option<&Value> {
        let key = self
            .definition
            .and_then(|wf| wf.step(step))
            .map(|def| def.key.clone())
            .or_else(|| StepId::new(step).ok().map(|id| id.default_step_key()))?;
        self.instance.context.steps.get(&key)
    }

    fn config(&self, step: &str) -> Option<&Value> {
        self.instance.step_configs.get(step)
    }

    /// The final error of `step`, when the instance failed there.
    fn failed_with(&self, step: &str) -> Option<&StepError> {
        let failure = self.instance.failure.as_ref()?;
        (failure.step.as_ref().map(StepId::as_str) == Some(step)).then_some(&failure.error)
    }

    fn source(&self) -> &'static str {
        if self.definition.is_some() {
            "definition"
        } else {
            "stored_state"
        }
    }

    fn taken(&self) -> BTreeMap<(String, String), std::collections::BTreeSet<String>> {
        Dag::taken(self.instance)
    }

    fn json(&self) -> Value {
        let i = self.instance;
        let taken = self.taken();
        let edges: Vec<Value> = self
            .dag
            .edges
            .iter()
            .map(|e| {
                let took = taken
                    .get(&(e.from.clone(), e.event.clone()))
                    .is_some_and(|t| t.contains(&e.to));
                json!({"from": e.from, "event": e.event, "to": e.to, "dynamic": e.dynamic, "taken": took})
            })
            .collect();
        let steps: Vec<Value> = self
            .steps()
            .iter()
            .map(|step| {
                let state = self.state(step);
                json!({
                    "step": step,
                    "state": state_name(state),
                    "activation": state.map(|s| s.activation),
                    "event": state.and_then(|s| s.event.as_ref()).map(ToString::to_string),
                    "targets": state.map(|s| s.targets.iter().map(ToString::to_string).collect::<Vec<_>>()).unwrap_or_default(),
                    "output": self.output(step),
                    "config": self.config(step),
                    "timer": state.and_then(|s| s.timer.as_ref()).map(|t| json!({"fire_at": time(t.fire_at), "event": t.event.as_str()})),
                    "activated_at": state.and_then(|s| s.activated_at).map(time),
                    "updated_at": state.and_then(|s| s.updated_at).map(time),
                    "error": self.failed_with(step).map(|e| e.message.clone()),
                    "attempts": self.attempts.get(step.as_str()).map(|a| a.iter().map(attempt_json).collect::<Vec<_>>()).unwrap_or_default(),
                })
            })
            .collect();
        let jobs: Vec<Value> = self.jobs.iter().map(job_json).collect();
        json!({
            "id": i.id,
            "business_id": i.business_id.as_str(),
            "workflow": i.workflow_id.as_str(),
            "version": i.workflow_version,
            "status": i.status.as_str(),
            "created_at": time(i.created_at),
            "updated_at": time(i.updated_at),
            "revision": i.revision,
            "definition_known": self.definition.is_some(),
            "dag": {
                "source": self.source(),
                "layers": self.dag.layers(),
                "edges": edges,
            },
            "steps": steps,
            "failure": i.failure,
            "history": i.history,
            "jobs": jobs,
            "context": i.context,
        })
    }

    fn text(&self) -> String {
        use std::fmt::Write as _;

        let i = self.instance;
        let mut out = String::new();
        let _ = writeln!(out, "instance     {}", i.id);
        let _ = writeln!(out, "business id  {}", i.business_id);
        let _ = writeln!(
            out,
            "workflow     {} v{}",
            i.workflow_id, i.workflow_version
        );
        let _ = writeln!(out, "status       {}", i.status);
        let _ = writeln!(out, "created      {}", time(i.created_at));
        let _ = writeln!(out, "updated      {}", time(i.updated_at));
        if let Some(failure) = &i.failure {
            let at = failure.step.as_ref().map_or_else(
                || "the instance itself".to_owned(),
                |s| format!("step {s} (activation {})", failure.activation),
            );
            let _ = writeln!(
                out,
                "failure      {at} at {}: {} [{}]",
                time(failure.at),
                failure.error.message,
                error_kind(&failure.error)
            );
            let _ = writeln!(
                out,
                "reason       {} ({})",
                failure.reason.as_str(),
                failure.reason
            );
        }
        let _ = writeln!(out);
        if self.definition.is_some() {
            let _ = writeln!(out, "DAG (from the definition):");
        } else {
            let _ = writeln!(
                out,
                "DAG (drawn from the stored step states: this hephaestus does not register {} v{}; steps not reached yet are not shown):",
                i.workflow_id, i.workflow_version
            );
        }
        let mut marks = Marks {
            taken: self.taken(),
            ..Marks::default()
        };
        for step in self.steps() {
            let state = self.state(&step);
            let mut label = state_name(state).to_owned();
            if let Some(s) = state
                && s.activation > 1
            {
                let _ = write!(label, ", activation {}", s.activation);
            }
            let mut details = Vec::new();
            if let Some(output) = self.output(&step) {
                details.push(format!("output: {}", clip(&output.to_string())));
            }
            if let Some(config) = self.config(&step) {
                details.push(format!("config: {}", clip(&config.to_string())));
            }
            if let Some(timer) = state.and_then(|s| s.timer.as_ref()) {
                details.push(format!(
                    "timer: :{} at {}",
                    timer.event,
                    time(timer.fire_at)
                ));
            }
            if let Some(error) = self.failed_with(&step) {
                details.push(format!("error: {} [{}]", error.message, error_kind(error)));
            }
            for attempt in self.attempts.get(&step).into_iter().flatten() {
                details.push(attempt_line(attempt));
            }
            marks.labels.insert(step.clone(), label);
            marks.details.insert(step, details);
        }
        out.push_str(&ascii(&self.dag, &marks));
        let _ = writeln!(out);
        if self.jobs.is_empty() {
            let _ = writeln!(out, "jobs: none (finished jobs are pruned after a while)");
        } else {
            let _ = writeln!(out, "jobs:");
            for job in self.jobs {
                let step = job_step(job).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  #{} {} {}{} attempt {}/{}",
                    job.id.0,
                    job.kind,
                    step,
                    job.state.as_str(),
                    job.attempt,
                    job.max_attempts
                );
                for record in &job.errors {
                    let _ = writeln!(
                        out,
                        "      attempt {} at {}: {} [{}]",
                        record.attempt,
                        time(record.at),
                        record.error.message,
                        error_kind(&record.error)
                    );
                }
            }
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "history:");
        for entry in &i.history {
            let _ = writeln!(out, "  {}", history_line(entry));
        }
        out
    }
}

/// `Step#activation ` for jobs of a step, empty for instance jobs.
fn job_step(job: &Job) -> Option<String> {
    let step = job.args.get("step")?.as_str()?;
    let activation = job.args.get("activation")?.as_u64()?;
    Some(format!("{step}#{activation} "))
}

fn job_json(job: &Job) -> Value {
    json!({
        "id": job.id.0,
        "kind": job.kind,
        "queue": job.queue,
        "state": job.state.as_str(),
        "step": job.args.get("step"),
        "activation": job.args.get("activation"),
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "inserted_at": time(job.inserted_at),
        "scheduled_at": time(job.scheduled_at),
        "errors": job.errors.iter().map(|r| json!({
            "attempt": r.attempt,
            "at": time(r.at),
            "error_kind": error_kind(&r.error),
            "message": r.error.message,
        })).collect::<Vec<_>>(),
    })
}

/// One history entry as a line: time, step and activation, what happened.
fn history_line(entry: &HistoryEntry) -> String {
    let what = &entry.kind;
    match &entry.step {
        Some(step) => format!("{}  {step}#{}  {what}", time(entry.at), entry.activation),
        None => format!("{}  {what}", time(entry.at)),
    }
}

/// A long JSON value cut for the terminal (`--json` has it whole).
fn clip(text: &str) -> String {
    const MAX: usize = 200;
    if text.chars().count() <= MAX {
        return text.to_owned();
    }
    let cut: String = text.chars().take(MAX).collect();
    format!("{cut}... (--json shows all)")
}

/// The registered definition of `instance`'s workflow version, if
/// `runtime` could be built and knows it; without a runtime, a warning, and
/// the DAG is drawn from the stored step states.
fn definition_of<B: hephaestus_runner::Backend>(
    runtime: Result<hephaestus_runner::Runtime<B>>,
    instance: &Instance,
) -> Option<Workflow> {
    match runtime {
        Ok(runtime) => runtime
            .registry()
            .get(instance.workflow_id.as_str(), instance.workflow_version)
            .ok()
            .cloned(),
        Err(error) => {
            eprintln!(
                "hephaestus: warning: {error:#}; drawing the DAG from the stored step states"
            );
            None
        }
    }
}
