//! The crash tests' plans and checks, shared by the chaos test (PostgreSQL,
//! `tests/chaos`) and the SQLite crash test: a random script per instance,
//! and what the instance, its results and its recorded executions must look
//! like once the run settles, and on PostgreSQL what a run recorded.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use hephaestus_engine_core::StepId;
use hephaestus_engine_core::instance::{HistoryKind, Instance, InstanceStatus, ResumeSource};
use hephaestus_migrations_gen::SchemaPrefix;
use sqlx::PgPool;
use uuid::Uuid;

use super::rng::Rng;
use crate::fixtures::{self, Execution, Script};

/// What the test expects of one instance.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The instance's id.
    pub id: Uuid,
    /// Its business value.
    pub business_value: String,
    /// Its workflow (one of the fixtures' shapes).
    pub workflow: &'static str,
    /// What its steps do.
    pub script: Script,
}

impl Plan {
    /// A random plan (the `index`-th of a run).
    pub fn random(rng: &mut Rng, index: usize) -> Self {
        let workflow = fixtures::SHAPES[rng.pick(fixtures::SHAPES.len())];
        let mut script = Script {
            sleep_ms: rng.below(15),
            ..Script::default()
        };
        if workflow == fixtures::BRANCH {
            script.branch = Some(if rng.chance(50) { "right" } else { "left" }.to_owned());
        }
        let path = fixtures::path(workflow, &script);
        for step in &path {
            if rng.chance(20) {
                script
                    .fail
                    .insert((*step).to_owned(), 1 + u32::from(rng.chance(50)));
            }
        }
        if rng.chance(8) {
            script.fatal = Some(path[rng.pick(path.len())].to_owned());
        } else if workflow == fixtures::BRANCH && rng.chance(10) {
            // On the branch not taken: never runs, so the instance completes.
            let other = if script.branch() == "right" {
                "Left"
            } else {
                "Right"
            };
            script.fatal = Some(other.to_owned());
        }
        Self {
            id: Uuid::now_v7(),
            business_value: index.to_string(),
            workflow,
            script,
        }
    }

    /// The steps it runs, in order.
    pub fn path(&self) -> Vec<&'static str> {
        fixtures::path(self.workflow, &self.script)
    }

    /// The step the instance fails at, if it does.
    pub fn fails_at(&self) -> Option<&str> {
        let fatal = self.script.fatal.as_deref()?;
        self.path().contains(&fatal).then_some(fatal)
    }
}

/// Checks that `instance` ended as `plan` says, with each result recorded
/// once and applied, and user code run at most `MAX_ATTEMPTS` times per
/// activation, each attempt once; what is wrong goes to `problems`.
pub fn check_instance(
    plan: &Plan,
    instance: &Instance,
    execs: &[Execution],
    results: &BTreeMap<(String, i64, String), (i64, i64)>,
    problems: &mut Vec<String>,
) {
    let id = plan.id;
    let mut problem = |text: String| problems.push(format!("{id} ({}): {text}", plan.workflow));
    let path = plan.path();

    // The end the script says.
    match plan.fails_at() {
        Some(step) => {
            let failed_at = instance
                .failure
                .as_ref()
                .and_then(|f| f.step.as_ref())
                .map(|s| s.as_str().to_owned());
            if instance.status != InstanceStatus::Failed || failed_at.as_deref() != Some(step) {
                problem(format!(
                    "expected failed at {step}, got {:?} {:?}",
                    instance.status, instance.failure
                ));
            }
        }
        None if instance.status != InstanceStatus::Completed => problem(format!(
            "expected completed, got {:?} {:?}",
            instance.status, instance.failure
        )),
        None => {}
    }

    // Every result recorded once and applied.
    for ((step, activation, kind), (n, processed)) in results {
        if *n != 1 || processed != n {
            problem(format!(
                "result {step}#{activation} {kind}: {n} rows, {processed} processed"
            ));
        }
        if *activation > 1 {
            problem(format!("{step} was activated {activation} times"));
        }
    }

    // User code: at most max_attempts per activation, each attempt once,
    // each doing what the script says, never off the path.
    let mut by_step: BTreeMap<&str, Vec<&Execution>> = BTreeMap::new();
    for exec in execs {
        by_step.entry(exec.step.as_str()).or_default().push(exec);
        if !path.contains(&exec.step.as_str()) {
            problem(format!("{} ran but is not on the path {path:?}", exec.step));
        }
        if exec.activation != 1 {
            problem(format!("{} ran activation {}", exec.step, exec.activation));
        }
        let scripted = plan.script.outcome(&exec.step, exec.attempt).as_str();
        if exec.outcome != scripted {
            problem(format!(
                "{} attempt {} did {}, the script says {scripted}",
                exec.step, exec.attempt, exec.outcome
            ));
        }
    }
    for (step, runs) in &by_step {
        let attempts: BTreeSet<u32> = runs.iter().map(|e| e.attempt).collect();
        if attempts.len() != runs.len() {
            problem(format!("{step}: an attempt ran twice: {runs:?}"));
        }
        if runs.len() > usize::try_from(fixtures::MAX_ATTEMPTS).unwrap_or(usize::MAX) {
            problem(format!("{step} ran {} times", runs.len()));
        }
    }
    // The steps that must have run: all of a completed path; before a fatal
    // step, its predecessors (in the diamond, a failing branch may cancel
    // its sibling before that one starts).
    let reached: Vec<&str> = match plan.fails_at() {
        Some(fatal) => {
            let mut before: Vec<&str> = path.iter().copied().take_while(|s| *s != fatal).collect();
            if plan.workflow == fixtures::DIAMOND && fatal != "Merge" {
                before.retain(|s| *s == "Split");
            }
            before.push(fatal);
            before
        }
        None => path.clone(),
    };
    for step in &reached {
        if !by_step.contains_key(step) {
            problem(format!("{step} never ran"));
        }
    }
    if instance.status != InstanceStatus::Completed {
        return;
    }
    // Completed: each path step completed once, and its applied output came
    // from a recorded execution.
    for step in &path {
        if !results.contains_key(&((*step).to_owned(), 1, "completed".to_owned())) {
            problem(format!("{step} has no completed result"));
        }
        let completions = instance
            .history
            .iter()
            .filter(|h| {
                h.step.as_ref().is_some_and(|s| s.as_str() == *step)
                    && matches!(h.kind, HistoryKind::Completed { .. })
            })
            .count();
        if completions != 1 {
            problem(format!(
                "{step} completed {completions} times in the history"
            ));
        }
        let key = StepId::new(*step)
            .expect("a valid step id")
            .default_step_key();
        let output = instance.context.step(&key);
        let (attempt, pid) = (
            output.and_then(|o| o["attempt"].as_u64()),
            output.and_then(|o| o["pid"].as_u64()),
        );
        let from_a_run = by_step.get(step).is_some_and(|runs| {
            runs.iter().any(|e| {
                Some(u64::from(e.attempt)) == attempt
                    && Some(u64::from(e.worker_pid)) == pid
                    && e.outcome == "complete"
            })
        });
        if !from_a_run {
            problem(format!(
                "{step}'s applied output {output:?} matches no recorded execution"
            ));
        }
    }
    let finished = instance
        .history
        .iter()
        .filter(|h| matches!(h.kind, HistoryKind::Finished))
        .count();
    if finished != 1 {
        problem(format!("finished {finished} times in the history"));
    }
    let resumes: Vec<ResumeSource> = instance
        .history
        .iter()
        .filter_map(|h| match h.kind {
            HistoryKind::Resumed { source, .. } => Some(source),
            _ => None,
        })
        .collect();
    let expected = match plan.workflow {
        fixtures::WAIT => vec![ResumeSource::External],
        fixtures::TIMER => vec![ResumeSource::Timer],
        _ => Vec::new(),
    };
    if resumes != expected {
        problem(format!("resumed by {resumes:?}, expected {expected:?}"));
    }
}

/// What the fixture steps recorded in `prefix`'s `fixture_executions`, by
/// instance.
pub async fn recorded_executions(
    pool: &PgPool,
    prefix: &SchemaPrefix,
) -> HashMap<Uuid, Vec<Execution>> {
    let sql = format!(
        "select instance_id, step, activation, attempt, worker_pid, outcome from {}",
        fixtures::Recorder::table(prefix)
    );
    let rows: Vec<(Uuid, String, i64, i64, i64, String)> = sqlx::query_as(&sql)
        .fetch_all(pool)
        .await
        .expect("read the executions");
    let mut out: HashMap<Uuid, Vec<Execution>> = HashMap::new();
    let small = |what: &str, n: i64| {
        u32::try_from(n).unwrap_or_else(|_| panic!("a recorded {what} out of range: {n}"))
    };
    for (instance, step, activation, attempt, pid, outcome) in rows {
        out.entry(instance).or_default().push(Execution {
            instance_id: instance,
            step,
            activation: small("activation", activation),
            attempt: small("attempt", attempt),
            worker_pid: small("worker pid", pid),
            outcome,
        });
    }
    out
}

/// `prefix`'s `hephaestus_step_results` by instance: (step, activation,
/// kind) → (rows, processed rows).
pub async fn recorded_results(
    pool: &PgPool,
    prefix: &SchemaPrefix,
) -> HashMap<Uuid, BTreeMap<(String, i64, String), (i64, i64)>> {
    let sql = format!(
        "select instance_id, step_id, activation::bigint, kind, count(*), count(processed_at)
         from {}.hephaestus_step_results group by 1, 2, 3, 4",
        prefix.quoted()
    );
    let rows: Vec<(Uuid, String, i64, String, i64, i64)> = sqlx::query_as(&sql)
        .fetch_all(pool)
        .await
        .expect("read the step results");
    let mut out: HashMap<Uuid, BTreeMap<_, _>> = HashMap::new();
    for (instance, step, activation, kind, n, processed) in rows {
        out.entry(instance)
            .or_default()
            .insert((step, activation, kind), (n, processed));
    }
    out
}
