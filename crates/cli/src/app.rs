//! The application: which workflows this `hephaestus` binary knows, and how
//! commands build a runtime over them.

use std::sync::Arc;

use anyhow::{Context as _, Result};
use hephaestus_engine_core::workflow::WorkflowRegistry;
use hephaestus_migrations_gen::SchemaPrefix;
use hephaestus_queue_pg::PgQueue;
use hephaestus_runner::postgres::{PgBackend, Pooling};
use hephaestus_runner::{RunnerConfig, Runtime, RuntimeBuilder};
use hephaestus_storage_pg::PgStore;
use sqlx::PgPool;

use crate::database::Database;
use crate::fixtures;

/// What a registration learns about the command it registers workflows for
/// (the command builds it: fields may be added without breaking you).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Setup {
    /// The connection pool of the command (for `graph`, a pool that never
    /// connects: it has no database).
    pub pool: PgPool,
    /// The schema holding Hephaestus's tables.
    pub schema: SchemaPrefix,
    /// Whether this process runs steps (`worker`). Otherwise the definitions
    /// are only looked at (a resume validated, failed steps restarted, a DAG
    /// drawn) and no step executes here: a registration may skip building
    /// what its steps need to run.
    pub runs_steps: bool,
    /// The SQLite database file, when the command runs on one
    /// (`--database-url sqlite://FILE`): `pool` then never connects.
    pub sqlite: Option<std::path::PathBuf>,
    /// How `pool`'s connections reach PostgreSQL (`--pgbouncer`: PgBouncer's
    /// transaction pooling). Steps that run statements of their own on
    /// `pool` must follow it: under [`Pooling::Transaction`], each statement
    /// unnamed (`.persistent(pooling.persistent_statements())`) and inside
    /// a transaction (`pooling.on(&pool)` for a statement of its own).
    pub pooling: Pooling,
}

/// Registers workflows on the runtime a command builds. A function
/// `fn(RuntimeBuilder<PgBackend>, &Setup) -> anyhow::Result<RuntimeBuilder<PgBackend>>`
/// is one, and so is a closure with that signature (annotate its argument
/// and return types); implement the trait yourself when registering needs
/// to await.
#[async_trait::async_trait]
pub trait Workflows: Send + Sync + 'static {
    /// Adds workflows and families (`builder.workflow(..)`,
    /// `builder.family(..)`) and returns the builder.
    async fn register(
        &self,
        builder: RuntimeBuilder<PgBackend>,
        setup: &Setup,
    ) -> Result<RuntimeBuilder<PgBackend>>;
}

#[async_trait::async_trait]
impl<F> Workflows for F
where
    F: Fn(RuntimeBuilder<PgBackend>, &Setup) -> Result<RuntimeBuilder<PgBackend>>
        + Send
        + Sync
        + 'static,
{
    async fn register(
        &self,
        builder: RuntimeBuilder<PgBackend>,
        setup: &Setup,
    ) -> Result<RuntimeBuilder<PgBackend>> {
        self(builder, setup)
    }
}

/// The fixture workflows of the test suite (`fixture_linear`,
/// `fixture_diamond`, `fixture_branch`, `fixture_wait`, `fixture_timer`):
/// what the stock `hephaestus` binary registers. Their steps follow a script
/// in the instance input and record each execution in
/// `<schema>.fixture_executions`, which a `worker` creates.
#[derive(Debug, Clone, Copy, Default)]
pub struct FixtureWorkflows;

#[async_trait::async_trait]
impl Workflows for FixtureWorkflows {
    async fn register(
        &self,
        mut builder: RuntimeBuilder<PgBackend>,
        setup: &Setup,
    ) -> Result<RuntimeBuilder<PgBackend>> {
        let recorder = if let (true, Some(database)) = (setup.runs_steps, &setup.sqlite) {
            fixtures::Recorder::sqlite(database)
                .context("creating the fixture's executions file")?
        } else if setup.runs_steps {
            fixtures::Recorder::new(setup.pool.clone(), &setup.schema)
                .await
                .context("creating the fixture's execution table")?
                .with_pooling(setup.pooling)
        } else {
            fixtures::Recorder::detached()
        };
        for workflow in fixtures::workflows(&recorder).context("building the fixture workflows")? {
            builder = builder.workflow(workflow);
        }
        Ok(builder)
    }
}

/// A `hephaestus` command-line application: the commands, with the
/// workflows of a [`Workflows`] registration.
#[derive(Clone)]
pub struct App {
    workflows: Arc<dyn Workflows>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

impl Default for App {
    /// The stock binary: the [`FixtureWorkflows`].
    fn default() -> Self {
        Self::new(FixtureWorkflows)
    }
}

impl App {
    /// An application whose commands know the workflows `workflows`
    /// registers.
    pub fn new(workflows: impl Workflows) -> Self {
        Self {
            workflows: Arc::new(workflows),
        }
    }

    /// A runtime over `db` (its pool, schema and pooling) with the
    /// registered workflows.
    pub(crate) async fn runtime(
        &self,
        db: &Database,
        config: RunnerConfig,
        runs_steps: bool,
    ) -> Result<Runtime<PgBackend>> {
        let backend = PgBackend::new(db.store(), db.queue());
        let setup = Setup {
            pool: db.pool.clone(),
            schema: db.prefix.clone(),
            runs_steps,
            sqlite: None,
            pooling: db.pooling,
        };
        let builder = Runtime::builder(backend)
            .discard_handler(hephaestus_failure_handler::FailureHandler::new())
            .config(config);
        let builder = self
            .workflows
            .register(builder, &setup)
            .await
            .context("registering the workflows")?;
        builder.build().context("building the runtime")
    }

    /// A runtime over the SQLite `backend` with the registered workflows:
    /// the registration runs on a builder that never connects, and its
    /// workflows and families are taken over as they are (a registration
    /// is written once, for any backend).
    pub(crate) async fn sqlite_runtime(
        &self,
        backend: hephaestus_sqlite::SqliteBackend,
        config: RunnerConfig,
        runs_steps: bool,
    ) -> Result<Runtime<hephaestus_sqlite::SqliteBackend>> {
        let setup = Setup {
            pool: detached_pool(),
            schema: SchemaPrefix::new(SchemaPrefix::DEFAULT).context("the default schema")?,
            runs_steps,
            sqlite: Some(backend.path().to_owned()),
            pooling: Pooling::Session,
        };
        let registry = self.registered(&setup).await?;
        let mut builder = Runtime::builder(backend)
            .discard_handler(hephaestus_failure_handler::FailureHandler::new())
            .config(config);
        for family in registry.families() {
            builder = builder.family(family.clone());
        }
        builder.build().context("building the runtime")
    }

    /// What the registration registers, for `setup`.
    async fn registered(&self, setup: &Setup) -> Result<WorkflowRegistry> {
        let backend = PgBackend::new(
            PgStore::new(setup.pool.clone(), setup.schema.clone()),
            PgQueue::new(setup.pool.clone(), setup.schema.clone()),
        )
        .with_pooling(setup.pooling);
        let builder = self
            .workflows
            .register(
                Runtime::builder(backend)
                    .discard_handler(hephaestus_failure_handler::FailureHandler::new()),
                setup,
            )
            .await
            .context("registering the workflows")?;
        Ok(builder
            .build()
            .context("building the runtime")?
            .registry()
            .clone())
    }

    /// The registered workflows, for commands that only look at them
    /// (`graph`: no database is touched).
    pub(crate) async fn registry(&self) -> Result<WorkflowRegistry> {
        let db = Database {
            pool: detached_pool(),
            prefix: SchemaPrefix::new(SchemaPrefix::DEFAULT).context("the default schema")?,
            pooling: Pooling::Session,
        };
        let runtime = self.runtime(&db, RunnerConfig::default(), false).await?;
        Ok(runtime.registry().clone())
    }
}

/// A pool that never connects (nothing is ever run on it).
fn detached_pool() -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(sqlx::postgres::PgConnectOptions::new())
}

#[cfg(test)]
mod tests {
    use hephaestus_engine_core::prelude::*;
    use hephaestus_engine_core::steps::{Done, FnStep};

    use super::*;

    #[tokio::test]
    async fn a_closure_registers_workflows_and_learns_what_the_command_does() {
        let app = App::new(
            |builder: RuntimeBuilder<PgBackend>,
             setup: &Setup|
             -> Result<RuntimeBuilder<PgBackend>> {
                assert!(!setup.runs_steps, "graph only looks at the definitions");
                let ship = FnStep::new("Ship", ["shipped"], |_| StepOutcome::complete("shipped"));
                let workflow = Workflow::builder("shop::Shipping")
                    .unique("order", Scope::Workflow)
                    .start(ship.clone())
                    .on(ship, "shipped", Done)
                    .build()?;
                Ok(builder.workflow(workflow))
            },
        );
        let registry = app.registry().await.unwrap();
        let ids: Vec<&str> = registry.families().map(|f| f.id().as_str()).collect();
        assert_eq!(ids, vec!["shop::Shipping"]);
    }

    #[tokio::test]
    async fn the_stock_app_registers_the_fixture_workflows() {
        let registry = App::default().registry().await.unwrap();
        let ids: Vec<&str> = registry.families().map(|f| f.id().as_str()).collect();
        let mut expected = fixtures::SHAPES.to_vec();
        expected.sort_unstable();
        assert_eq!(ids, expected);
    }

    #[tokio::test]
    async fn a_failing_registration_is_an_error_with_its_cause() {
        let app = App::new(
            |_: RuntimeBuilder<PgBackend>, _: &Setup| -> Result<RuntimeBuilder<PgBackend>> {
                anyhow::bail!("the payment client needs PAYMENT_URL")
            },
        );
        let error = app.registry().await.unwrap_err();
        assert_eq!(
            format!("{error:#}"),
            "registering the workflows: the payment client needs PAYMENT_URL"
        );
    }
}
