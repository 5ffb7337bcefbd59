//! The conformance suite of the runner's batched [`Backend`] operations:
//! what the hot path asks of a backend beyond the engine-core ports (whose
//! own suites are in [`crate::ports`]).
//!
//! A backend's tests run it with
//! [`backend_conformance_tests!`](crate::backend_conformance_tests), one
//! `#[test]` per case named after it, on a fresh backend each:
//!
//! ```
//! fn run<F: std::future::Future>(case: F) -> F::Output {
//!     tokio::runtime::Builder::new_current_thread()
//!         .build()
//!         .unwrap()
//!         .block_on(case)
//! }
//!
//! mod backend {
//!     hephaestus_conformance::backend_conformance_tests!(
//!         make: || async { hephaestus_memory::MemoryBackend::new() },
//!         run: super::run,
//!     );
//! }
//! # fn main() {}
//! ```
//!
//! Each case returns `Err(message)` instead of panicking; the generated test
//! panics with the message, naming the case. A backend may take the default
//! of an operation (built from the ports) or its own, one statement for a
//! batch: both must pass.

use chrono::{DateTime, TimeDelta, Utc};
use hephaestus_engine_core::business_id::BusinessId;
use hephaestus_engine_core::engine::{Engine, Input, NewInstance};
use hephaestus_engine_core::instance::{Instance, InstanceStatus};
use hephaestus_engine_core::ports::{
    Consumed, Enqueued, JobState, NewJob, NewStepResult, PortError, Recorded, Refused, ResultKind,
    ResultPayload, RoundResult, UniqueJob,
};
use hephaestus_engine_core::step::{EventName, StepOutcome};
use hephaestus_engine_core::steps::{Done, FnStep};
use hephaestus_engine_core::workflow::Workflow;
use hephaestus_engine_core::{Scope, StepId};
use serde_json::{Map, json};
use uuid::Uuid;

use hephaestus_runner::{
    Backend, ExecutionRequest, InboxRows, RoundWrites, Settlement, SettlementDone,
};

/// The cases, listed once: hands `[case, ...]` to the macro `$then`.
#[doc(hidden)]
#[macro_export]
macro_rules! __backend_conformance_cases {
    ($then:ident { $($args:tt)* }) => {
        $crate::$then! { $($args)* ; [
            load_for_execution_reads_each_instance_and_whether_a_result_is_recorded,
            try_lock_many_locks_existing_instances_and_reports_their_inbox,
            pending_many_groups_unprocessed_results_in_seq_order,
            write_rounds_records_marks_refuses_and_writes_at_commit,
            write_rounds_refuses_an_instance_it_does_not_hold,
            enqueue_and_complete_enqueues_and_fences_each_lease,
            enqueue_and_complete_merges_unique_jobs_and_never_claims_a_merged_one,
            reconcile_page_pages_active_instances_and_flags_lost_work,
        ] }
    };
}

/// Generates one `#[test]` per case of the batched [`Backend`] suite (see
/// the [module docs](crate::backend)): `make` gives a closure returning
/// a future of a fresh backend, `run` runs a future to completion, and the
/// optional `cleanup` gets the backend after its case.
#[macro_export]
macro_rules! backend_conformance_tests {
    (make: $make:expr, run: $run:expr $(,)?) => {
        $crate::backend_conformance_tests!(make: $make, run: $run, cleanup: |_backend| async {});
    };
    (make: $make:expr, run: $run:expr, cleanup: $cleanup:expr $(,)?) => {
        $crate::__backend_conformance_cases!(__backend_conformance_fns { $make, $run, $cleanup });
    };
}

/// The `#[test]` functions of [`backend_conformance_tests!`](crate::backend_conformance_tests).
#[doc(hidden)]
#[macro_export]
macro_rules! __backend_conformance_fns {
    ($make:expr, $run:expr, $cleanup:expr ; [$($case:ident),* $(,)?]) => {
        $(
            #[test]
            fn $case() {
                $run(async {
                    let backend = ($make)().await;
                    $crate::ports::assert_case(
                        "backend",
                        stringify!($case),
                        $crate::backend::$case(&backend),
                    )
                    .await;
                    ($cleanup)(backend).await;
                });
            }
        )*
    };
}

trait Check<T> {
    fn check(self, what: &str) -> Result<T, String>;
}

impl<T> Check<T> for Result<T, PortError> {
    fn check(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

fn ensure(condition: bool, message: impl FnOnce() -> String) -> Result<(), String> {
    if condition { Ok(()) } else { Err(message()) }
}

fn sid(s: &str) -> StepId {
    // Every step id here is a valid literal.
    StepId::new(s).unwrap_or_else(|e| panic!("test step id {s:?}: {e}"))
}

fn request(instance_id: Uuid, step: &str, activation: u32) -> ExecutionRequest {
    ExecutionRequest {
        instance_id,
        step: sid(step),
        activation,
    }
}

/// Whole microseconds (what `timestamptz` keeps).
fn now() -> DateTime<Utc> {
    let now = Utc::now();
    now - TimeDelta::nanoseconds(i64::from(now.timestamp_subsec_nanos() % 1_000))
}

/// `A -> Done`.
fn workflow() -> Workflow {
    let a = FnStep::new("A", ["done"], |_| StepOutcome::complete("done"));
    Workflow::builder("conformance")
        .unique("run", Scope::None)
        .start(a.clone())
        .on(a, "done", Done)
        .build()
        // A literal, valid definition.
        .unwrap_or_else(|e| panic!("the conformance workflow: {e}"))
}

/// A started instance (its step `A` active at activation 1), committed.
async fn started<B: Backend>(b: &B, n: u32) -> Result<Instance, String> {
    let wf = workflow();
    let engine = Engine::new(&wf);
    let at = now();
    let business_id = BusinessId::parse(&format!("run::{n}::0000000{n}"))
        .map_err(|e| format!("business id: {e}"))?;
    let mut instance = engine
        .new_instance(NewInstance {
            id: Uuid::now_v7(),
            business_id,
            input: json!({"n": n}),
            telemetry_metadata: Map::new(),
            now: at,
        })
        .map_err(|e| format!("new instance: {e}"))?;
    engine
        .apply(&mut instance, Input::Start, at)
        .map_err(|e| format!("start: {e}"))?;
    let mut tx = b.begin().await.check("begin")?;
    b.insert(&mut tx, &instance).await.check("insert")?;
    b.commit(tx).await.check("commit")?;
    Ok(instance)
}

fn completed(instance_id: Uuid, step: &str, activation: u32) -> NewStepResult {
    NewStepResult {
        instance_id,
        step: Some(sid(step)),
        activation,
        payload: ResultPayload::Completed {
            event: EventName("done".to_owned()),
            output: json!({"from": step}),
            metadata: Map::new(),
        },
    }
}

async fn record_committed<B: Backend>(b: &B, result: &NewStepResult) -> Result<i64, String> {
    let mut tx = b.begin().await.check("begin")?;
    let recorded = b.record(&mut tx, result).await.check("record")?;
    b.commit(tx).await.check("commit")?;
    match recorded {
        Recorded::Inserted(seq) => Ok(seq),
        Recorded::Duplicate => Err("expected a new row, got a duplicate".to_owned()),
    }
}

/// Case: each request gets its instance (requests of one instance may share
/// it) and whether a result is recorded for the step's activation while it
/// is active; a missing instance is `None`.
#[doc(hidden)]
pub async fn load_for_execution_reads_each_instance_and_whether_a_result_is_recorded<B: Backend>(
    b: &B,
) -> Result<(), String> {
    let fresh = started(b, 1).await?;
    let done = started(b, 2).await?;
    record_committed(b, &completed(done.id, "A", 1)).await?;
    let missing = Uuid::now_v7();
    let answers = b
        .load_for_execution_many(&[
            request(fresh.id, "A", 1),
            request(done.id, "A", 1),
            request(missing, "A", 1),
            request(fresh.id, "A", 2),
        ])
        .await
        .check("load_for_execution_many")?;
    ensure(answers.len() == 4, || {
        format!("one answer per request: {answers:?}")
    })?;
    let flags: Vec<Option<(Uuid, bool)>> = answers
        .iter()
        .map(|a| a.as_ref().map(|c| (c.instance.id, c.recorded)))
        .collect();
    ensure(
        flags
            == vec![
                Some((fresh.id, false)),
                Some((done.id, true)),
                None,
                Some((fresh.id, false)),
            ],
        || format!("instances and recorded flags in request order: {flags:?}"),
    )?;
    let loaded = answers[0].as_ref().map(|c| (*c.instance).clone());
    ensure(loaded.as_ref() == Some(&fresh), || {
        format!("the instance as stored: {loaded:?}")
    })
}

/// Case: the instances that exist are returned locked (an update of them in
/// the same unit of work is allowed), each once; the inbox flag is `true`
/// for an instance with unprocessed results.
#[doc(hidden)]
pub async fn try_lock_many_locks_existing_instances_and_reports_their_inbox<B: Backend>(
    b: &B,
) -> Result<(), String> {
    let quiet = started(b, 1).await?;
    let busy = started(b, 2).await?;
    record_committed(b, &completed(busy.id, "A", 1)).await?;
    let mut tx = b.begin().await.check("begin")?;
    let locked = b
        .try_lock_many(&mut tx, &[busy.id, Uuid::now_v7(), quiet.id, busy.id])
        .await
        .check("try_lock_many")?;
    let mut ids: Vec<Uuid> = locked.iter().map(|l| l.instance.id).collect();
    ids.sort_unstable();
    let mut expected = vec![quiet.id, busy.id];
    expected.sort_unstable();
    ensure(ids == expected, || {
        format!("each existing instance once, the missing one skipped: {ids:?}")
    })?;
    let busy_flag = locked
        .iter()
        .find(|l| l.instance.id == busy.id)
        .map(|l| l.inbox);
    ensure(busy_flag == Some(true), || {
        "an instance with an unprocessed result must say its inbox may hold results".to_owned()
    })?;
    let mut changed = quiet.clone();
    changed.revision += 1;
    b.update(&mut tx, &changed)
        .await
        .check("update of an instance try_lock_many locked")?;
    b.commit(tx).await.check("commit")?;
    let got = b.get(quiet.id).await.check("get")?;
    ensure(got.as_ref() == Some(&changed), || {
        format!("written: {got:?}")
    })
}

/// Case: the unprocessed results of each instance asked for, in `seq`
/// order; processed results and other instances' are left out.
#[doc(hidden)]
pub async fn pending_many_groups_unprocessed_results_in_seq_order<B: Backend>(
    b: &B,
) -> Result<(), String> {
    let one = started(b, 1).await?;
    let two = started(b, 2).await?;
    let other = started(b, 3).await?;
    let first = record_committed(b, &completed(one.id, "A", 1)).await?;
    let second = record_committed(b, &completed(one.id, "A", 2)).await?;
    let processed = record_committed(b, &completed(two.id, "A", 1)).await?;
    let third = record_committed(b, &completed(two.id, "A", 2)).await?;
    record_committed(b, &completed(other.id, "A", 1)).await?;
    let mut tx = b.begin().await.check("begin")?;
    b.mark_processed(&mut tx, two.id, &[processed])
        .await
        .check("mark_processed")?;
    b.commit(tx).await.check("commit")?;
    let mut tx = b.begin().await.check("begin")?;
    let pending = b
        .pending_many(&mut tx, &[one.id, two.id])
        .await
        .check("pending_many")?;
    let seqs = |id: Uuid| -> Vec<i64> {
        pending
            .get(&id)
            .map(|rows| rows.iter().map(|r| r.seq).collect())
            .unwrap_or_default()
    };
    ensure(seqs(one.id) == vec![first, second], || {
        format!("the first instance's rows in seq order: {:?}", seqs(one.id))
    })?;
    ensure(seqs(two.id) == vec![third], || {
        format!("the processed row is left out: {:?}", seqs(two.id))
    })?;
    ensure(!pending.contains_key(&other.id), || {
        "an instance not asked for is left out".to_owned()
    })
}

/// Case: new results are recorded (processed or not, a refused one with its
/// reason and without holding its slot; duplicates and results of missing
/// instances skipped), consumed inbox rows are marked processed (or
/// refused), and the locked instances written; nothing is visible before
/// the commit.
#[doc(hidden)]
pub async fn write_rounds_records_marks_refuses_and_writes_at_commit<B: Backend>(
    b: &B,
) -> Result<(), String> {
    let inst = started(b, 1).await?;
    let applied_row = record_committed(b, &completed(inst.id, "A", 1)).await?;
    let refused_row = record_committed(b, &completed(inst.id, "B", 1)).await?;
    let duplicate = completed(inst.id, "A", 1);
    let mut tx = b.begin().await.check("begin")?;
    let locked = b.lock(&mut tx, inst.id).await.check("lock")?;
    let mut written = locked.ok_or("the instance is missing")?;
    written.status = InstanceStatus::Completed;
    written.revision += 1;
    let new_applied = completed(inst.id, "C", 1);
    let new_refused = completed(inst.id, "D", 1);
    let results = [
        RoundResult {
            result: new_applied.clone(),
            processed: true,
            refusal: None,
        },
        RoundResult {
            result: new_refused.clone(),
            processed: true,
            refusal: Some("stale activation".to_owned()),
        },
        RoundResult {
            result: duplicate,
            processed: true,
            refusal: None,
        },
        RoundResult {
            result: completed(Uuid::now_v7(), "A", 1),
            processed: false,
            refusal: None,
        },
    ];
    let consumed = [InboxRows {
        instance_id: inst.id,
        rows: vec![
            Consumed {
                seq: applied_row,
                refusal: None,
            },
            Consumed {
                seq: refused_row,
                refusal: Some("undeclared event".to_owned()),
            },
        ],
    }];
    b.write_rounds(
        &mut tx,
        RoundWrites {
            results: &results,
            consumed: &consumed,
            instances: &[&written],
        },
    )
    .await
    .check("write_rounds")?;
    let before = b.get(inst.id).await.check("get before commit")?;
    ensure(before.as_ref() == Some(&inst), || {
        "nothing is visible before the commit".to_owned()
    })?;
    b.commit(tx).await.check("commit")?;

    let after = b.get(inst.id).await.check("get")?;
    ensure(after.as_ref() == Some(&written), || {
        format!("the instance as written: {after:?}")
    })?;
    let mut tx = b.begin().await.check("begin")?;
    let pending = b.pending(&mut tx, inst.id).await.check("pending")?;
    drop(tx);
    ensure(pending.is_empty(), || {
        format!("every row is processed: {pending:?}")
    })?;
    let refused: Vec<(Option<StepId>, ResultKind, String)> = b
        .refused(inst.id)
        .await
        .check("refused")?
        .into_iter()
        .map(
            |Refused {
                 step, kind, reason, ..
             }| (step, kind, reason),
        )
        .collect();
    ensure(
        refused
            == vec![
                (
                    Some(sid("B")),
                    ResultKind::Completed,
                    "undeclared event".to_owned(),
                ),
                (
                    Some(sid("D")),
                    ResultKind::Completed,
                    "stale activation".to_owned(),
                ),
            ],
        || format!("both refusals with their reasons, in seq order: {refused:?}"),
    )?;
    ensure(
        b.is_recorded(inst.id, &sid("C"), 1)
            .await
            .check("is_recorded")?,
        || "the applied new result is recorded".to_owned(),
    )?;
    // The refused new result holds no slot; the applied one does.
    record_committed(b, &new_refused).await?;
    let mut tx = b.begin().await.check("begin")?;
    let again = b.record(&mut tx, &new_applied).await.check("record")?;
    drop(tx);
    ensure(again == Recorded::Duplicate, || {
        "the applied new result holds its slot".to_owned()
    })
}

/// Case: an instance this unit of work neither locked nor inserted is not
/// written: the call fails (the caller rolls back).
#[doc(hidden)]
pub async fn write_rounds_refuses_an_instance_it_does_not_hold<B: Backend>(
    b: &B,
) -> Result<(), String> {
    let inst = started(b, 1).await?;
    let mut changed = inst.clone();
    changed.revision += 1;
    let mut tx = b.begin().await.check("begin")?;
    let outcome = b
        .write_rounds(
            &mut tx,
            RoundWrites {
                results: &[],
                consumed: &[],
                instances: &[&changed],
            },
        )
        .await;
    drop(tx);
    ensure(matches!(outcome, Err(PortError::Conflict(_))), || {
        format!("expected Conflict, got {outcome:?}")
    })?;
    let got = b.get(inst.id).await.check("get")?;
    ensure(got.as_ref() == Some(&inst), || "unchanged".to_owned())
}

/// Case: jobs are enqueued and every lease completed in the same unit of
/// work, each fenced by its attempt (a lease whose job was cancelled
/// meanwhile does not hold); a claimed job comes back executing for this
/// worker, an unclaimed one waits for a fetch.
#[doc(hidden)]
pub async fn enqueue_and_complete_enqueues_and_fences_each_lease<B: Backend>(
    b: &B,
) -> Result<(), String> {
    let queue = "conformance";
    let mut tx = b.begin().await.check("begin")?;
    let ids: Vec<Enqueued> = b
        .enqueue(
            &mut tx,
            &[
                NewJob::new("work", queue, json!({"n": 1})),
                NewJob::new("work", queue, json!({"n": 2})),
            ],
        )
        .await
        .check("enqueue")?;
    b.commit(tx).await.check("commit")?;
    let leases = b
        .fetch(queue, 10, now() + TimeDelta::minutes(1))
        .await
        .check("fetch")?;
    ensure(leases.len() == 2, || format!("two leases: {leases:?}"))?;
    let (held, gone) = (&leases[0], &leases[1]);
    let mut tx = b.begin().await.check("begin")?;
    ensure(b.cancel(&mut tx, gone.id).await.check("cancel")?, || {
        "the second job is cancelled".to_owned()
    })?;
    b.commit(tx).await.check("commit")?;

    let next = [
        NewJob::new("next", queue, json!({"n": 3})),
        NewJob::new("next", queue, json!({"n": 4})),
    ];
    let mut tx = b.begin().await.check("begin")?;
    let SettlementDone {
        enqueued,
        held: completed,
    } = b
        .enqueue_and_complete(
            &mut tx,
            Settlement {
                jobs: &next,
                claim: &[true, false],
                leases: &[held, gone],
            },
        )
        .await
        .check("enqueue_and_complete")?;
    b.commit(tx).await.check("commit")?;
    ensure(completed == vec![true, false], || {
        format!("the held lease completes, the cancelled one is fenced: {completed:?}")
    })?;
    ensure(enqueued.len() == 2, || {
        format!("two jobs enqueued: {enqueued:?}")
    })?;
    let state = |id| async move { b.job(id).await.check("job").map(|j| j.map(|j| j.state)) };
    ensure(state(held.id).await? == Some(JobState::Completed), || {
        "the held lease's job is completed".to_owned()
    })?;
    ensure(state(gone.id).await? == Some(JobState::Cancelled), || {
        "the cancelled job stays cancelled".to_owned()
    })?;
    ensure(
        ids.iter().all(|e| matches!(e, Enqueued::Inserted(_))),
        || "the first jobs were inserted".to_owned(),
    )?;
    // A job claimed by this worker is executing and comes with its lease;
    // every other one is available to a fetch.
    let mut fetchable = 0;
    for (job, lease) in &enqueued {
        let job_state = state(job.id()).await?;
        if let Some(lease) = lease {
            ensure(
                job_state == Some(JobState::Executing) && lease.attempt == 1,
                || format!("a claimed job executes at attempt 1: {job_state:?} {lease:?}"),
            )?;
        } else {
            ensure(job_state == Some(JobState::Available), || {
                format!("an unclaimed job is available: {job_state:?}")
            })?;
            fetchable += 1;
        }
    }
    let fetched = b
        .fetch(queue, 10, now() + TimeDelta::minutes(1))
        .await
        .check("fetch")?;
    ensure(fetched.len() == fetchable, || {
        format!("every unclaimed job is fetched: {fetched:?}")
    })
}

/// Case: a unique job whose key is held, by a stored job or by an earlier
/// job of the same batch, is merged into its holder and never comes back
/// claimed, even when flagged; the holder is left as it was. A claimed job
/// that was inserted executes at attempt 1 and holds its key.
#[doc(hidden)]
pub async fn enqueue_and_complete_merges_unique_jobs_and_never_claims_a_merged_one<B: Backend>(
    b: &B,
) -> Result<(), String> {
    let queue = "conformance";
    let unique = |key: &str, n: u32| {
        NewJob::new("work", queue, json!({"n": n})).with_unique(UniqueJob {
            key: key.to_owned(),
            states: JobState::ALL.to_vec(),
        })
    };
    let mut tx = b.begin().await.check("begin")?;
    let stored = b
        .enqueue(&mut tx, &[unique("held", 1)])
        .await
        .check("enqueue")?;
    b.commit(tx).await.check("commit")?;
    let holder = match stored.as_slice() {
        [Enqueued::Inserted(id)] => *id,
        other => return Err(format!("the holder is inserted: {other:?}")),
    };
    let jobs = [unique("held", 2), unique("fresh", 3), unique("fresh", 4)];
    let mut tx = b.begin().await.check("begin")?;
    let SettlementDone { enqueued, held } = b
        .enqueue_and_complete(
            &mut tx,
            Settlement {
                jobs: &jobs,
                claim: &[true, true, true],
                leases: &[],
            },
        )
        .await
        .check("enqueue_and_complete")?;
    b.commit(tx).await.check("commit")?;
    ensure(held.is_empty(), || {
        format!("no lease to complete: {held:?}")
    })?;
    ensure(enqueued.len() == 3, || {
        format!("one outcome per job: {enqueued:?}")
    })?;
    ensure(
        matches!(enqueued[0], (Enqueued::Existing(id), None) if id == holder),
        || {
            format!(
                "merged into the stored holder, unclaimed: {:?}",
                enqueued[0]
            )
        },
    )?;
    let fresh = match &enqueued[1] {
        (Enqueued::Inserted(id), _) => *id,
        other => {
            return Err(format!(
                "the first job of a fresh key is inserted: {other:?}"
            ));
        }
    };
    ensure(
        matches!(enqueued[2], (Enqueued::Existing(id), None) if id == fresh),
        || {
            format!(
                "a repeated key merges into the batch's earlier job, unclaimed: {:?}",
                enqueued[2]
            )
        },
    )?;
    let state = |id| async move { b.job(id).await.check("job").map(|j| j.map(|j| j.state)) };
    ensure(state(holder).await? == Some(JobState::Available), || {
        "the stored holder is left as it was".to_owned()
    })?;
    let fresh_state = state(fresh).await?;
    match &enqueued[1].1 {
        Some(lease) => ensure(
            fresh_state == Some(JobState::Executing) && lease.attempt == 1 && lease.id == fresh,
            || format!("a claimed job executes at attempt 1: {fresh_state:?} {lease:?}"),
        ),
        None => ensure(fresh_state == Some(JobState::Available), || {
            format!("an unclaimed job is available: {fresh_state:?}")
        }),
    }
}

/// Case: the reconciler's pages list the active instances newest first
/// (finished ones left out), page by page with `before`, each with its
/// workflow; an instance with an active step and no job at all is flagged.
#[doc(hidden)]
pub async fn reconcile_page_pages_active_instances_and_flags_lost_work<B: Backend>(
    b: &B,
) -> Result<(), String> {
    let older = started(b, 1).await?;
    let newer = started(b, 2).await?;
    let finished = started(b, 3).await?;
    let mut tx = b.begin().await.check("begin")?;
    let mut ended = b
        .lock(&mut tx, finished.id)
        .await
        .check("lock")?
        .ok_or("the instance is missing")?;
    ended.status = InstanceStatus::Completed;
    ended.revision += 1;
    b.update(&mut tx, &ended).await.check("update")?;
    b.commit(tx).await.check("commit")?;

    let first = b.reconcile_page(None, 1).await.check("first page")?;
    let ids: Vec<Uuid> = first.iter().map(|r| r.id).collect();
    ensure(ids == vec![newer.id], || {
        format!("the newest active instance first: {first:?}")
    })?;
    let second = b
        .reconcile_page(Some(newer.id), 10)
        .await
        .check("second page")?;
    let ids: Vec<Uuid> = second.iter().map(|r| r.id).collect();
    ensure(ids == vec![older.id], || {
        format!("then the older one; the finished one is left out: {second:?}")
    })?;
    for row in first.iter().chain(&second) {
        ensure(
            row.workflow_id == "conformance" && row.workflow_version == 1,
            || format!("its workflow and version: {row:?}"),
        )?;
        ensure(row.candidate, || {
            format!("an active step with no job is lost work: {row:?}")
        })?;
    }
    Ok(())
}
