//! The crash test on SQLite, with real processes and no PostgreSQL: one
//! `hephaestus worker` on a SQLite file is SIGKILLed and started again every
//! few hundred milliseconds while 200 scripted workflows (the fixture
//! workflows of `crates/cli/src/fixtures.rs`) are started and their waiting
//! steps resumed from this process. Then: every instance ended as its
//! script says, every step result was recorded once and applied, and user
//! code ran at least once and at most `max_attempts` times per activation,
//! each attempt once, each doing what the script says.
//!
//! The seed is printed; `HEPHAESTUS_FAULTS_SEED=<n>` replays the scripts and
//! the kill schedule (timing still varies).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hephaestus_engine_core::WorkflowId;
use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_engine_core::ports::InstanceFilter;
use hephaestus_runner::{RunnerError, Runtime, StartOptions};
use hephaestus_sqlite::{SqliteBackend, SqliteOptions};
use serde_json::json;
use uuid::Uuid;

use crate::faults::fixtures::{self, Execution, Recorder};
use crate::support::bin::hephaestus_bin;
use crate::support::plans::{Plan, check_instance};
use crate::support::rng::Rng;
use crate::support::sqlite::TempDir;
use crate::support::worker::KillableWorker;

/// Workflows started.
const INSTANCES: usize = 200;
/// Started per tenth of a second.
const PER_TICK: usize = 5;
/// How long every instance may take to finish once the load stopped.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);
/// Kills go on this long after the last start.
const KILLS_AFTER_LOAD: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_again_and_again_loses_nothing_and_applies_nothing_twice() {
    let seed = std::env::var("HEPHAESTUS_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            let bytes = Uuid::new_v4().into_bytes();
            u64::from_le_bytes([
                bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
            ])
        });
    eprintln!(
        "sqlite crash: seed {seed} (replay with HEPHAESTUS_FAULTS_SEED={seed}), {INSTANCES} instances"
    );
    let bin = tokio::task::spawn_blocking(hephaestus_bin)
        .await
        .expect("locating the binary");
    let dir = TempDir::new("sqlite-crash");
    let file = dir.join("crash.db");
    let backend = SqliteBackend::open_migrated(SqliteOptions::new(&file))
        .await
        .expect("a migrated file");
    let mut builder = Runtime::builder(backend.clone())
        .discard_handler(hephaestus_failure_handler::FailureHandler::new());
    for workflow in fixtures::workflows(&Recorder::detached()).expect("the fixture workflows") {
        builder = builder.workflow(workflow);
    }
    let runtime = builder.build().expect("a runtime");

    let mut rng = Rng(seed);
    let plans: Vec<Plan> = (0..INSTANCES).map(|i| Plan::random(&mut rng, i)).collect();
    let killer_seed = rng.next();

    let stop_kills = Arc::new(AtomicBool::new(false));
    let killer = std::thread::spawn({
        let (bin, file, stop) = (bin.clone(), file.clone(), Arc::clone(&stop_kills));
        move || {
            let mut rng = Rng(killer_seed);
            let mut worker = spawn_worker(&bin, &file);
            let mut kills = 0_usize;
            while !stop.load(Ordering::SeqCst) {
                // not a wait: the fault schedule, a kill every 150 to 600 ms
                std::thread::sleep(Duration::from_millis(150 + rng.below(450)));
                worker.kill();
                kills += 1;
                worker = spawn_worker(&bin, &file);
            }
            (worker, kills)
        }
    });
    let stop_resumer = Arc::new(AtomicBool::new(false));
    let resumer = tokio::spawn(resume_waiting(runtime.clone(), Arc::clone(&stop_resumer)));

    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for chunk in plans.chunks(PER_TICK) {
        tick.tick().await;
        for plan in chunk {
            start(&runtime, plan).await;
        }
    }
    // not a wait: the kills go on for a while after the last start
    tokio::time::sleep(KILLS_AFTER_LOAD).await;
    stop_kills.store(true, Ordering::SeqCst);
    let (worker, kills) = tokio::task::spawn_blocking(move || killer.join())
        .await
        .expect("joining the killer")
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    eprintln!("sqlite crash: the worker was killed {kills} times");
    assert!(kills >= 5, "the worker was killed {kills} times only");

    let settle_began = Instant::now();
    let active = || async {
        runtime
            .list(&InstanceFilter::default().with_statuses(InstanceStatus::ACTIVE))
            .await
            .expect("list the active instances")
    };
    let settled =
        crate::support::wait::holds_within(SETTLE_LIMIT, || async { active().await.is_empty() })
            .await;
    if !settled {
        let stuck = active().await;
        panic!(
            "{} instances still active {SETTLE_LIMIT:?} after the load (seed {seed}), e.g. {:?}",
            stuck.len(),
            stuck
                .iter()
                .take(5)
                .map(|i| (i.id, i.workflow_id.as_str(), i.status, &i.steps))
                .collect::<Vec<_>>()
        );
    }
    eprintln!(
        "sqlite crash: every instance finished {:?} after the load",
        settle_began.elapsed()
    );
    stop_resumer.store(true, Ordering::SeqCst);
    resumer.await.expect("the resumer");
    let status = tokio::task::spawn_blocking(move || worker.stop(Duration::from_secs(30)))
        .await
        .expect("stopping the worker");
    assert!(
        status.as_ref().is_ok_and(std::process::ExitStatus::success),
        "the last worker did not stop gracefully: {status:?}"
    );

    let executions = executions(&file);
    let beyond_script: usize = plans
        .iter()
        .map(|plan| {
            executions.get(&plan.id).map_or(0, |runs| {
                runs.iter()
                    .filter(|e| e.attempt > plan.script.fail.get(&e.step).copied().unwrap_or(0) + 1)
                    .count()
            })
        })
        .sum();
    eprintln!(
        "sqlite crash: {beyond_script} step attempts beyond the scripted ones (attempts the kills cut short)"
    );
    let results = results(&backend).await;
    let mut problems = Vec::new();
    for plan in &plans {
        let instance = runtime
            .get(plan.id)
            .await
            .expect("read an instance")
            .unwrap_or_else(|| panic!("instance {} is missing", plan.id));
        check_instance(
            plan,
            &instance,
            executions.get(&plan.id).map_or(&[][..], Vec::as_slice),
            &results.get(&plan.id).cloned().unwrap_or_default(),
            &mut problems,
        );
    }
    assert!(
        problems.is_empty(),
        "seed {seed}: {} problems, first ones:\n{}",
        problems.len(),
        problems
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    backend.close().await;
}

/// Starts `plan`'s instance; a start whose commit raced a busy file is
/// retried, and found by its id if it did commit.
async fn start(rt: &Runtime<SqliteBackend>, plan: &Plan) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let options = StartOptions::default().with_id(plan.id);
        let outcome = rt
            .start(
                plan.workflow,
                &plan.business_value,
                plan.script.to_input(),
                options,
            )
            .await;
        let Err(error) = outcome else { return };
        if let Ok(Some(_)) = rt.get(plan.id).await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "cannot start instance {}: {error}",
            plan.id
        );
        // not a wait: the pace of retrying a start the busy file refused
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resumes the waiting instances of `fixture_wait` until told to stop.
async fn resume_waiting(rt: Runtime<SqliteBackend>, stop: Arc<AtomicBool>) {
    let filter = InstanceFilter::default()
        .with_workflow_id(WorkflowId::new(fixtures::WAIT).expect("a valid workflow id"))
        .with_statuses([InstanceStatus::Waiting]);
    while !stop.load(Ordering::SeqCst) {
        if let Ok(waiting) = rt.list(&filter).await {
            for instance in waiting {
                match rt
                    .resume(
                        instance.id,
                        fixtures::WAITING_STEP,
                        fixtures::RESUME_EVENT,
                        json!({"resumed_by": "sqlite crash test"}),
                    )
                    .await
                {
                    // Sent; raced another resume or the end; or the file was
                    // busy (tried again next round).
                    Ok(())
                    | Err(
                        RunnerError::NotWaiting { .. }
                        | RunnerError::AlreadyResumed(_)
                        | RunnerError::Finished(_)
                        | RunnerError::Backend(_),
                    ) => {}
                    Err(e) => panic!("resuming {}: {e}", instance.id),
                }
            }
        }
        // not a wait: the resumer stands in for an outside system, which
        // looks for waiting instances at its own pace
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The recorded executions, by instance.
fn executions(file: &Path) -> HashMap<Uuid, Vec<Execution>> {
    let mut out: HashMap<Uuid, Vec<Execution>> = HashMap::new();
    for execution in Recorder::read_file(file).expect("read the executions file") {
        out.entry(execution.instance_id)
            .or_default()
            .push(execution);
    }
    out
}

/// Step results by instance: (step, activation, kind) → (rows, processed).
async fn results(
    backend: &SqliteBackend,
) -> HashMap<Uuid, BTreeMap<(String, i64, String), (i64, i64)>> {
    let rows: Vec<(String, String, i64, String, i64, i64)> = sqlx::query_as(
        "select instance_id, step_id, activation, kind, count(*), count(processed_at)
         from hephaestus_step_results group by 1, 2, 3, 4",
    )
    .fetch_all(backend.pool())
    .await
    .expect("read the step results");
    let mut out: HashMap<Uuid, BTreeMap<_, _>> = HashMap::new();
    for (instance, step, activation, kind, n, processed) in rows {
        let id = Uuid::parse_str(&instance).expect("an instance id");
        out.entry(id)
            .or_default()
            .insert((step, activation, kind), (n, processed));
    }
    out
}

/// A `hephaestus worker` on the file, tuned to notice dead workers fast;
/// it is either ready or refused (the killed one's lock is free at once, so
/// a refusal is a failure).
fn spawn_worker(bin: &Path, file: &Path) -> KillableWorker {
    let url = format!("sqlite://{}", file.display());
    let args = [
        "worker",
        "--database-url",
        &url,
        "--concurrency",
        "6",
        "--heartbeat-ms",
        "100",
        "--stale-after-ms",
        "1000",
        "--rescue-interval-ms",
        "200",
        "--poll-ms",
        "50",
        "--reconcile-ms",
        "1000",
        "--exit-on-stdin-close",
    ];
    // The scripted failures would fill the output with their logs.
    KillableWorker::spawn(bin, &args, &[("RUST_LOG", "off")]).expect("a worker starts")
}
