//! `hephaestus instances resume|cancel|retry`: an operator steering an
//! instance through the runner (`Runtime::resume`, `Runtime::cancel`,
//! `Runtime::retry`), so every rule holds as it does in an application:
//! the event is checked against the step, the cancel and the retry are
//! serialized with advances by the instance lock, and the jobs they enqueue
//! are run by the workers.
//!
//! Each needs the instance's workflow version registered in this binary;
//! without it the error names the workflow and says how to build a
//! `hephaestus` that knows it.

use anyhow::{Context as _, Result};
use clap::Args;
use hephaestus_engine_core::Instance;
use hephaestus_runner::postgres::PgBackend;
use hephaestus_runner::retry::Retried;
use hephaestus_runner::{RunnerConfig, RunnerError, Runtime};
use hephaestus_sqlite::SqliteBackend;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{NeedsDefinition, definition, resolve, resolve_sqlite};
use crate::App;
use crate::database::{DatabaseArgs, Needs, Target};

/// A runtime with this binary's workflows, on PostgreSQL or on SQLite.
enum Steering {
    Postgres(Runtime<PgBackend>),
    Sqlite(Runtime<SqliteBackend>),
}

impl Steering {
    /// A runtime over `db`'s database that runs no steps.
    async fn open(app: &App, db: &DatabaseArgs) -> Result<Self> {
        Ok(match Target::open(db, Needs::Both).await? {
            Target::Postgres(db) => {
                Self::Postgres(app.runtime(&db, RunnerConfig::default(), false).await?)
            }
            Target::Sqlite(backend) => Self::Sqlite(
                app.sqlite_runtime(backend, RunnerConfig::default(), false)
                    .await?,
            ),
        })
    }

    /// The instance `given` names.
    async fn resolve(&self, given: &str) -> Result<Instance> {
        match self {
            Self::Postgres(rt) => resolve(rt.backend().store(), given).await,
            Self::Sqlite(rt) => resolve_sqlite(rt.backend(), given).await,
        }
    }

    fn check(&self, instance: &Instance, needs: NeedsDefinition) -> Result<()> {
        match self {
            Self::Postgres(rt) => definition(rt, instance, needs).map(drop),
            Self::Sqlite(rt) => definition(rt, instance, needs).map(drop),
        }
    }

    async fn resume(
        &self,
        id: Uuid,
        step: &str,
        event: &str,
        payload: Value,
    ) -> Result<(), RunnerError> {
        match self {
            Self::Postgres(rt) => rt.resume(id, step, event, payload).await,
            Self::Sqlite(rt) => rt.resume(id, step, event, payload).await,
        }
    }

    async fn cancel(&self, id: Uuid, reason: Option<String>) -> Result<(), RunnerError> {
        match self {
            Self::Postgres(rt) => rt.cancel(id, reason).await,
            Self::Sqlite(rt) => rt.cancel(id, reason).await,
        }
    }

    async fn retry(&self, id: Uuid) -> Result<Retried, RunnerError> {
        match self {
            Self::Postgres(rt) => rt.retry(id).await,
            Self::Sqlite(rt) => rt.retry(id).await,
        }
    }
}

/// What every steering command starts with: the database (checked to be
/// migrated), the instance (by id or business id), a runtime with this
/// binary's workflows, and the instance's definition among them.
async fn steer(
    app: &App,
    db: &DatabaseArgs,
    given: &str,
    needs: NeedsDefinition,
) -> Result<(Instance, Steering)> {
    let runtime = Steering::open(app, db).await?;
    let instance = runtime.resolve(given).await?;
    runtime.check(&instance, needs)?;
    Ok((instance, runtime))
}

fn parse_json(s: &str) -> Result<Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not valid JSON: {e}"))
}

/// `instances resume` options.
#[derive(Debug, Args)]
pub struct ResumeCommand {
    #[command(flatten)]
    db: DatabaseArgs,
    /// The instance: its id (a UUID) or its business id (key::value).
    instance: String,
    /// The waiting step (e.g. `hephaestus::WaitForEvent`).
    step: String,
    /// The event, one the step declares (e.g. `received`).
    event: String,
    /// A JSON value stored as the step's output (default `{}`).
    #[arg(long, value_parser = parse_json)]
    payload: Option<Value>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl ResumeCommand {
    pub async fn run(self, app: &App) -> Result<()> {
        let (instance, runtime) =
            steer(app, &self.db, &self.instance, NeedsDefinition::Resume).await?;
        let payload = self.payload.unwrap_or_else(|| json!({}));
        runtime
            .resume(instance.id, &self.step, &self.event, payload)
            .await
            .with_context(|| {
                format!(
                    "cannot resume step {} of instance {} with :{}",
                    self.step, instance.id, self.event
                )
            })?;
        if self.json {
            println!(
                "{}",
                json!({"instance": instance.id, "step": self.step, "event": self.event, "resumed": true})
            );
        } else {
            println!(
                "resumed step {} of instance {} with :{}; a worker applies it",
                self.step, instance.id, self.event
            );
        }
        Ok(())
    }
}

/// What `instances cancel` prints about.
struct Cancelled {
    id: uuid::Uuid,
}

impl CancelCommand {
    /// The instance id, when `error` came from an instance (given by id)
    /// whose stored state cannot be decoded.
    fn undecodable(&self, error: &anyhow::Error) -> Option<uuid::Uuid> {
        let corrupt = error.chain().any(|cause| {
            cause
                .downcast_ref::<hephaestus_engine_core::ports::PortError>()
                .is_some_and(|e| matches!(e, hephaestus_engine_core::ports::PortError::Corrupt(_)))
        });
        let id = uuid::Uuid::parse_str(&self.instance).ok()?;
        corrupt.then_some(id)
    }
}

/// `instances cancel` options.
#[derive(Debug, Args)]
pub struct CancelCommand {
    #[command(flatten)]
    db: DatabaseArgs,
    /// The instance: its id (a UUID) or its business id (key::value).
    instance: String,
    /// Why (kept in the history).
    #[arg(long)]
    reason: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl CancelCommand {
    pub async fn run(self, app: &App) -> Result<()> {
        let id = match steer(app, &self.db, &self.instance, NeedsDefinition::Cancel).await {
            Ok((instance, runtime)) => {
                runtime
                    .cancel(instance.id, self.reason.clone())
                    .await
                    .with_context(|| format!("cannot cancel instance {}", instance.id))?;
                instance.id
            }
            Err(error) => {
                // An instance whose state cannot be decoded is cancelled by its
                // status and jobs alone (the runner's cancel does that when
                // the instance does not decode).
                let Some(id) = self.undecodable(&error) else {
                    return Err(error);
                };
                let runtime = Steering::open(app, &self.db).await?;
                runtime
                    .cancel(id, self.reason.clone())
                    .await
                    .with_context(|| format!("cannot cancel instance {id}"))?;
                id
            }
        };
        let instance = Cancelled { id };
        if self.json {
            println!(
                "{}",
                json!({"instance": instance.id, "status": "cancelled", "reason": self.reason})
            );
        } else {
            println!(
                "cancelled instance {}{}",
                instance.id,
                self.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            );
        }
        Ok(())
    }
}

/// `instances retry` options.
#[derive(Debug, Args)]
pub struct RetryCommand {
    #[command(flatten)]
    db: DatabaseArgs,
    /// The failed instance: its id (a UUID) or its business id (key::value).
    instance: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl RetryCommand {
    pub async fn run(self, app: &App) -> Result<()> {
        let (instance, runtime) =
            steer(app, &self.db, &self.instance, NeedsDefinition::Retry).await?;
        let retried = match runtime.retry(instance.id).await {
            Ok(retried) => retried,
            // Its own message says it all: "instance X is waiting, not failed: ...".
            Err(error @ RunnerError::NotFailed { .. }) => return Err(error.into()),
            Err(error) => {
                return Err(anyhow::Error::new(error)
                    .context(format!("cannot retry instance {}", instance.id)));
            }
        };
        let steps: Vec<String> = retried
            .steps
            .iter()
            .map(|(step, activation)| format!("{step} (activation {activation})"))
            .collect();
        if self.json {
            let restarted: Vec<Value> = retried
                .steps
                .iter()
                .map(|(step, activation)| json!({"step": step, "activation": activation}))
                .collect();
            println!(
                "{}",
                json!({"instance": instance.id, "status": retried.status.as_str(), "restarted": restarted})
            );
        } else {
            println!(
                "retried instance {}: restarted {}; status {}; a worker runs the steps",
                instance.id,
                steps.join(", "),
                retried.status
            );
        }
        Ok(())
    }
}
