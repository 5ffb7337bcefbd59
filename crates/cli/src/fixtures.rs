//! Fixture workflows for `hephaestus worker` and the fault-injection tests.
//!
//! Five shapes, each a handful of [`FixtureStep`]s whose behaviour follows a
//! script carried in the instance input ([`Script`]):
//!
//! | workflow | shape |
//! | --- | --- |
//! | `fixture_linear` | `Fetch → Transform → Store → Done` |
//! | `fixture_diamond` | `Split ⇉ {Left, Right} → Merge → Done` (fan-out and join) |
//! | `fixture_branch` | `Decide → Left \| Right → Merge → Done` (exclusive branch, join) |
//! | `fixture_wait` | `Prepare → WaitForEvent → Finish → Done` (resumed from outside) |
//! | `fixture_timer` | `Prepare → WaitForEvent(timeout) → Finish → Done` (a durable timer resumes it) |
//!
//! A script such as `{"fail": {"Transform": 2}, "fatal": "Store", "branch":
//! "right", "sleep_ms": 5}` makes `Transform` fail its first two attempts
//! with a retryable error, `Store` fail for good (the instance fails), the
//! branch take `right`, and every step sleep 5 ms. The script applies to a
//! step's first activation only: after `hephaestus instances retry` the
//! restarted step completes. Every step execution is
//! recorded in `<schema>.fixture_executions` (instance, step, activation,
//! attempt, idempotency key, worker pid, outcome) with its own statement,
//! outside the runner's transaction: user code runs at least once, so a test
//! counts executions there.
//!
//! This file is also compiled into the integration tests (`#[path]` include,
//! so the tests and the worker run the same definitions): it uses only crates
//! both packages depend on.

use std::collections::BTreeMap;
use std::time::Duration;

use hephaestus_engine_core::context::Context;
use hephaestus_engine_core::retry::{Backoff, RetryPolicy};
use hephaestus_engine_core::step::{Step, StepError, StepInput, StepOutcome};
use hephaestus_engine_core::steps::{Done, WAIT_FOR_EVENT_ID, WaitForEvent};
use hephaestus_engine_core::{Event, Scope, StepId, Workflow, WorkflowErrors, target};
use hephaestus_migrations_gen::SchemaPrefix;
use hephaestus_runner::postgres::Pooling;
use serde_json::{Map, Value, json};
use sqlx::PgPool;

/// The linear workflow.
pub const LINEAR: &str = "fixture_linear";
/// The fan-out / join workflow.
pub const DIAMOND: &str = "fixture_diamond";
/// The exclusive-branch workflow.
pub const BRANCH: &str = "fixture_branch";
/// The workflow waiting for an external resume.
pub const WAIT: &str = "fixture_wait";
/// The workflow resumed by its own durable timer.
pub const TIMER: &str = "fixture_timer";
/// Every fixture workflow.
#[allow(
    dead_code,
    reason = "used by the integration tests, which include this file"
)]
pub const SHAPES: [&str; 5] = [LINEAR, DIAMOND, BRANCH, WAIT, TIMER];

/// The step that waits in [`WAIT`] and [`TIMER`].
#[allow(
    dead_code,
    reason = "used by the integration tests, which include this file"
)]
pub const WAITING_STEP: &str = WAIT_FOR_EVENT_ID;
/// The event that resumes it.
pub const RESUME_EVENT: &str = "received";
/// How long [`TIMER`]'s wait lasts before its timer resumes it.
pub const TIMER_AFTER: Duration = Duration::from_millis(300);

/// Attempts of every fixture step (the first included).
pub const MAX_ATTEMPTS: u32 = 12;
/// The delay between attempts of a fixture step.
pub const RETRY_DELAY: Duration = Duration::from_millis(25);

/// What an instance's steps do, read from its input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Script {
    /// Step id → how many first attempts fail with a retryable error.
    pub fail: BTreeMap<String, u32>,
    /// A step that fails fatally (the instance fails there, if it is reached).
    pub fatal: Option<String>,
    /// The branch `Decide` takes in [`BRANCH`]: `left` (default) or `right`.
    pub branch: Option<String>,
    /// How long each step sleeps before it returns.
    pub sleep_ms: u64,
}

impl Script {
    /// The script in an instance input (missing fields take their default;
    /// malformed ones are ignored).
    pub fn from_input(input: &Value) -> Self {
        let fail = input
            .get("fail")
            .and_then(Value::as_object)
            .map(|fail| {
                fail.iter()
                    .filter_map(|(step, n)| {
                        let n = u32::try_from(n.as_u64()?).ok()?;
                        Some((step.clone(), n))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let text = |key: &str| input.get(key).and_then(Value::as_str).map(str::to_owned);
        Self {
            fail,
            fatal: text("fatal"),
            branch: text("branch"),
            sleep_ms: input.get("sleep_ms").and_then(Value::as_u64).unwrap_or(0),
        }
    }

    /// The instance input carrying this script.
    #[allow(
        dead_code,
        reason = "used by the integration tests, which include this file"
    )]
    pub fn to_input(&self) -> Value {
        let mut input = Map::new();
        if !self.fail.is_empty() {
            let fail: Map<String, Value> = self
                .fail
                .iter()
                .map(|(step, n)| (step.clone(), json!(n)))
                .collect();
            input.insert("fail".to_owned(), Value::Object(fail));
        }
        if let Some(fatal) = &self.fatal {
            input.insert("fatal".to_owned(), json!(fatal));
        }
        if let Some(branch) = &self.branch {
            input.insert("branch".to_owned(), json!(branch));
        }
        if self.sleep_ms > 0 {
            input.insert("sleep_ms".to_owned(), json!(self.sleep_ms));
        }
        Value::Object(input)
    }

    /// The branch `Decide` takes.
    pub fn branch(&self) -> &str {
        match self.branch.as_deref() {
            Some("right") => "right",
            _ => "left",
        }
    }

    /// What attempt `attempt` of `step`'s activation `activation` does:
    /// the script plays out in the first activation; a later one (the
    /// instance was retried) completes.
    pub fn outcome_in(&self, step: &str, activation: u32, attempt: u32) -> Planned {
        if activation > 1 {
            Planned::Complete
        } else {
            self.outcome(step, attempt)
        }
    }

    /// What attempt `attempt` of `step`'s first activation does.
    pub fn outcome(&self, step: &str, attempt: u32) -> Planned {
        if self.fatal.as_deref() == Some(step) {
            Planned::Fatal
        } else if attempt <= self.fail.get(step).copied().unwrap_or(0) {
            Planned::Retry
        } else {
            Planned::Complete
        }
    }
}

/// What one attempt of a fixture step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planned {
    /// Completes (with the shape's event).
    Complete,
    /// Fails with a retryable error.
    Retry,
    /// Fails for good.
    Fatal,
}

impl Planned {
    /// The label stored in `fixture_executions.outcome`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::Retry => "retry",
            Self::Fatal => "fatal",
        }
    }
}

/// The fixture steps `workflow` runs for `script`, in order (its path: the
/// taken branch only; waits and `Done` excluded).
#[allow(
    dead_code,
    reason = "used by the integration tests, which include this file"
)]
pub fn path(workflow: &str, script: &Script) -> Vec<&'static str> {
    match workflow {
        LINEAR => vec!["Fetch", "Transform", "Store"],
        DIAMOND => vec!["Split", "Left", "Right", "Merge"],
        BRANCH if script.branch() == "right" => vec!["Decide", "Right", "Merge"],
        BRANCH => vec!["Decide", "Left", "Merge"],
        WAIT | TIMER => vec!["Prepare", "Finish"],
        _ => Vec::new(),
    }
}

/// Records step executions in `<schema>.fixture_executions` (PostgreSQL),
/// or, on SQLite, as JSON lines appended to a file beside the database
/// ([`Recorder::file_of`]): a SQLite file has one writer at a time, and
/// user code writing into it would queue behind the worker's own commits.
#[derive(Debug, Clone)]
pub struct Recorder {
    pool: PgPool,
    /// How `pool`'s connections reach PostgreSQL: through PgBouncer's
    /// transaction pooling, a recording is an unnamed statement in a
    /// transaction of its own, as any statement a step runs must be there.
    pooling: Pooling,
    insert: String,
    /// The JSON-lines file, for a worker on SQLite.
    file: Option<std::path::PathBuf>,
}

/// One recorded execution, as a line of the SQLite fixture's file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Execution {
    /// The instance.
    pub instance_id: uuid::Uuid,
    /// The step.
    pub step: String,
    /// Its activation.
    pub activation: u32,
    /// The attempt.
    pub attempt: u32,
    /// The worker process.
    pub worker_pid: u32,
    /// What the script made it do.
    pub outcome: String,
}

impl Recorder {
    /// A recorder writing into `prefix`'s schema through `pool`; creates the
    /// table if it is missing.
    pub async fn new(pool: PgPool, prefix: &SchemaPrefix) -> Result<Self, sqlx::Error> {
        let table = Self::table(prefix);
        sqlx::raw_sql(&format!(
            r"create table if not exists {table} (
                id bigint generated always as identity primary key,
                instance_id uuid not null,
                step text not null,
                activation bigint not null,
                attempt bigint not null,
                idempotency_key text not null,
                worker_pid bigint not null,
                outcome text not null,
                executed_at timestamptz not null default now()
            )"
        ))
        .execute(&pool)
        .await?;
        let insert = format!(
            r"insert into {table}
                (instance_id, step, activation, attempt, idempotency_key, worker_pid, outcome)
              values ($1, $2, $3, $4, $5, $6, $7)"
        );
        Ok(Self {
            pool,
            pooling: Pooling::Session,
            insert,
            file: None,
        })
    }

    /// The same recorder for a pool whose connections reach PostgreSQL the
    /// `pooling` way.
    #[must_use]
    pub fn with_pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = pooling;
        self
    }

    /// A recorder appending to the executions file of the SQLite database
    /// `database` ([`Recorder::file_of`]), created if missing.
    pub fn sqlite(database: &std::path::Path) -> std::io::Result<Self> {
        let file = Self::file_of(database);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)?;
        Ok(Self {
            file: Some(file),
            ..Self::detached()
        })
    }

    /// The executions file of the SQLite database `database`:
    /// `<database>-fixture-executions.jsonl`, one JSON [`Execution`] a line.
    pub fn file_of(database: &std::path::Path) -> std::path::PathBuf {
        let mut name = database.as_os_str().to_owned();
        name.push("-fixture-executions.jsonl");
        std::path::PathBuf::from(name)
    }

    /// The executions recorded for the SQLite database `database` (a line
    /// cut short by a killed process is skipped).
    #[allow(
        dead_code,
        reason = "used by the integration tests, which include this file"
    )]
    pub fn read_file(database: &std::path::Path) -> std::io::Result<Vec<Execution>> {
        let text = std::fs::read_to_string(Self::file_of(database))?;
        Ok(text
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect())
    }

    /// A recorder that is never connected: for looking at the definitions
    /// (`hephaestus graph`), not for running them (recording would fail).
    pub fn detached() -> Self {
        Self {
            pool: sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect_lazy_with(sqlx::postgres::PgConnectOptions::new()),
            pooling: Pooling::Session,
            insert: String::new(),
            file: None,
        }
    }

    /// The schema-qualified table name.
    pub fn table(prefix: &SchemaPrefix) -> String {
        format!("{}.fixture_executions", prefix.quoted())
    }

    async fn record(&self, input: &StepInput<'_>, outcome: Planned) -> Result<(), sqlx::Error> {
        if let Some(file) = &self.file {
            let line = serde_json::to_string(&Execution {
                instance_id: input.instance_id,
                step: input.idempotency_key.step.as_str().to_owned(),
                activation: input.activation,
                attempt: input.attempt,
                worker_pid: std::process::id(),
                outcome: outcome.as_str().to_owned(),
            })
            .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
            // One `write` of a whole line to a file opened for appending:
            // lines of concurrent steps never interleave, and a line written
            // survives the process being killed (it is in the page cache).
            let appended = std::fs::OpenOptions::new()
                .append(true)
                .open(file)
                .and_then(|mut f| {
                    std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes())
                });
            return appended.map_err(sqlx::Error::Io);
        }
        sqlx::query(&self.insert)
            .persistent(self.pooling.persistent_statements())
            .bind(input.instance_id)
            .bind(input.idempotency_key.step.as_str())
            .bind(i64::from(input.activation))
            .bind(i64::from(input.attempt))
            .bind(input.idempotency_key.to_string())
            .bind(i64::from(std::process::id()))
            .bind(outcome.as_str())
            .execute(self.pooling.on(&self.pool))
            .await
            .map(drop)
    }
}

/// A step that follows the instance's [`Script`] and records each execution.
#[derive(Clone)]
pub struct FixtureStep {
    id: StepId,
    events: Vec<Event>,
    /// The event it completes with: fixed, or the script's branch.
    emits: Emits,
    recorder: Recorder,
}

#[derive(Debug, Clone, Copy)]
enum Emits {
    Done,
    Branch,
}

impl std::fmt::Debug for FixtureStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixtureStep")
            .field("id", &self.id)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl FixtureStep {
    fn new(id: &'static str, emits: Emits, recorder: &Recorder) -> Self {
        let events: &[&str] = match emits {
            Emits::Done => &["done"],
            Emits::Branch => &["left", "right"],
        };
        Self {
            // The ids and events are literals of this file, all valid.
            id: StepId::new(id).expect("a valid step id"),
            events: events
                .iter()
                .map(|e| Event::new(e).expect("a valid event"))
                .collect(),
            emits,
            recorder: recorder.clone(),
        }
    }
}

#[async_trait::async_trait]
impl Step for FixtureStep {
    fn id(&self) -> StepId {
        self.id.clone()
    }

    fn events(&self, _config: Option<&Value>) -> Vec<Event> {
        self.events.clone()
    }

    async fn execute(&self, input: StepInput<'_>) -> StepOutcome {
        let script = script_of(input.context);
        let planned = script.outcome_in(self.id.as_str(), input.activation, input.attempt);
        if let Err(e) = self.recorder.record(&input, planned).await {
            // Not recorded, so not counted: the attempt is retried.
            return StepOutcome::Error(StepError::retryable(format!(
                "recording the execution failed: {e}"
            )));
        }
        if script.sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(script.sleep_ms)).await;
        }
        let step = self.id.as_str();
        match planned {
            Planned::Fatal => StepOutcome::fatal(format!("{step}: scripted fatal failure")),
            Planned::Retry => StepOutcome::retry(format!(
                "{step}: scripted failure of attempt {}",
                input.attempt
            )),
            Planned::Complete => {
                let event = match self.emits {
                    Emits::Done => "done",
                    Emits::Branch => script.branch(),
                };
                StepOutcome::complete_with(
                    event,
                    json!({"attempt": input.attempt, "pid": std::process::id()}),
                )
            }
        }
    }
}

fn script_of(context: &Context) -> Script {
    Script::from_input(&context.initial)
}

/// The retry policy of every fixture workflow: [`MAX_ATTEMPTS`] attempts,
/// [`RETRY_DELAY`] apart.
pub fn retry_policy() -> RetryPolicy {
    // Constant backoff with base == max is always valid.
    RetryPolicy::new(MAX_ATTEMPTS, Backoff::Constant, RETRY_DELAY, RETRY_DELAY)
        .expect("a valid retry policy")
}

/// Every fixture workflow, its steps recording through `recorder`.
pub fn workflows(recorder: &Recorder) -> Result<Vec<Workflow>, WorkflowErrors> {
    let step = |id, emits| FixtureStep::new(id, emits, recorder);
    let base = |id: &str| {
        Workflow::builder(id)
            .unique("run", Scope::Workflow)
            .retry_policy(retry_policy())
    };

    let (fetch, transform, store) = (
        step("Fetch", Emits::Done),
        step("Transform", Emits::Done),
        step("Store", Emits::Done),
    );
    let linear = base(LINEAR)
        .start(fetch.clone())
        .on(fetch, "done", transform.clone())
        .on(transform, "done", store.clone())
        .on(store, "done", Done)
        .build()?;

    let (split, left, right, merge) = (
        step("Split", Emits::Done),
        step("Left", Emits::Done),
        step("Right", Emits::Done),
        step("Merge", Emits::Done),
    );
    let diamond = base(DIAMOND)
        .start(split.clone())
        .fan_out(split, "done", [target(left.clone()), target(right.clone())])
        .on(left.clone(), "done", merge.clone())
        .on(right.clone(), "done", merge.clone())
        .on(merge.clone(), "done", Done)
        .build()?;

    let decide = step("Decide", Emits::Branch);
    let branch = base(BRANCH)
        .start(decide.clone())
        .on(decide.clone(), "left", left.clone())
        .on(decide, "right", right.clone())
        .on(left, "done", merge.clone())
        .on(right, "done", merge.clone())
        .on(merge, "done", Done)
        .build()?;

    let (prepare, finish) = (step("Prepare", Emits::Done), step("Finish", Emits::Done));
    let wait = base(WAIT)
        .start(prepare.clone())
        .on(prepare.clone(), "done", WaitForEvent)
        .on(WaitForEvent, RESUME_EVENT, finish.clone())
        .on(finish.clone(), "done", Done)
        .build()?;

    let timeout_ms = u64::try_from(TIMER_AFTER.as_millis()).unwrap_or(u64::MAX);
    let timer = base(TIMER)
        .start(prepare.clone())
        .on_with(
            prepare,
            "done",
            WaitForEvent,
            json!({"timeout_ms": timeout_ms}),
        )
        .on(WaitForEvent, RESUME_EVENT, finish.clone())
        .on(WaitForEvent, "timeout", finish.clone())
        .on(finish, "done", Done)
        .build()?;

    Ok(vec![linear, diamond, branch, wait, timer])
}
