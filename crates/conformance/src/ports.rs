//! The port suites: [`instance_store`], [`step_result_store`] and
//! [`job_queue`], written once and run against every backend.
//!
//! A backend's tests run them with
//! [`conformance_tests!`](crate::conformance_tests), which generates one
//! `#[test]` per case named after it (`cargo test <case>` runs one, and a
//! failure names its case); the functions below run a whole suite into a
//! [`Report`] instead. The case lists are written once, in
//! `__conformance_cases!`, for both.
//!
//! ```
//! use hephaestus_conformance::ports as conformance;
//! use hephaestus_memory::MemoryBackend;
//!
//! // In a backend crate's test, with its runtime and a fresh schema per case.
//! async fn memory_backend_conforms() {
//!     let fresh = || async { MemoryBackend::new() };
//!     conformance::instance_store(fresh).await.assert_ok();
//!     conformance::step_result_store(fresh).await.assert_ok();
//!     conformance::job_queue(fresh).await.assert_ok();
//! }
//! ```
//!
//! - Every case gets a fresh, empty backend from `make`, and returns
//!   `Err(message)` rather than panicking, so one failing case does not hide
//!   the others (a panic inside a case is caught and reported as a failure).
//! - Concurrency cases run several units of work at once with [`join_all`],
//!   which needs no runtime; on a database they are real concurrent
//!   transactions, so the backend needs at least [`CONCURRENCY`] connections.
//!   Cases that wait for the other side to make progress give up after
//!   [`PATIENCE`], and a case still running after [`CASE_LIMIT`] (a lock
//!   never released, a waiter never woken) is stopped and reported, so a
//!   broken backend fails instead of hanging.
//! - Time: jobs are due relative to `chrono::Utc::now()` with margins of a
//!   minute or an hour, so a backend with its own clock passes without
//!   sleeps; timestamps the cases store are whole microseconds (what
//!   `timestamptz` keeps). No case sleeps.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use hephaestus_engine_core::business_id::{BusinessId, Scope, UniqueClaim};
use hephaestus_engine_core::context::Context;
use hephaestus_engine_core::ids::{Event, StepId, WorkflowId};
use hephaestus_engine_core::instance::{
    AttemptRecord, FailureRecord, HistoryEntry, HistoryKind, Instance, InstanceStatus,
    PendingResume, ResumeSource, StepState, StepStatus, StepTimer,
};
use hephaestus_engine_core::ports::{
    Enqueued, InstanceFilter, InstanceStore, JobId, JobInfo, JobLease, JobMatch, JobQueue,
    JobState, NewJob, NewStepResult, PortError, Recorded, Refused, ResultKind, ResultPayload,
    StepResultStore, UniqueJob,
};
use hephaestus_engine_core::step::{EventName, StepError, lock_ignoring_poison};

/// How many units of work the concurrency cases run at once.
pub const CONCURRENCY: usize = 8;

/// How long a case waits for another unit of work to make progress.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// How long one case may run before it is stopped and reported as failed.
pub const CASE_LIMIT: Duration = Duration::from_secs(60);

/// The outcome of one suite.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// The suite.
    pub suite: &'static str,
    /// The cases that passed.
    pub passed: Vec<&'static str>,
    /// The cases that failed.
    pub failures: Vec<Failure>,
}

/// A failed case.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Failure {
    /// The case.
    pub case: &'static str,
    /// What went wrong.
    pub message: String,
}

impl Report {
    #[doc(hidden)]
    pub fn new(suite: &'static str) -> Self {
        Self {
            suite,
            passed: Vec::new(),
            failures: Vec::new(),
        }
    }

    #[doc(hidden)]
    pub fn record(&mut self, case: &'static str, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => self.passed.push(case),
            Err(message) => self.failures.push(Failure { case, message }),
        }
    }

    /// Whether every case passed.
    pub fn is_ok(&self) -> bool {
        self.failures.is_empty()
    }

    /// Panics listing every failure.
    pub fn assert_ok(&self) {
        assert!(self.is_ok(), "{self}");
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "conformance suite {}: {} passed, {} failed",
            self.suite,
            self.passed.len(),
            self.failures.len()
        )?;
        for failure in &self.failures {
            write!(f, "\n- {}: {}", failure.case, failure.message)?;
        }
        Ok(())
    }
}

/// A boxed future for [`join_all`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs `futures` concurrently inside one future (no runtime needed) and
/// returns their outputs in order.
pub async fn join_all<T>(futures: Vec<BoxFuture<'_, T>>) -> Vec<T> {
    JoinAll {
        outputs: futures.iter().map(|_| None).collect(),
        futures: futures.into_iter().map(Some).collect(),
    }
    .await
}

struct JoinAll<'a, T> {
    futures: Vec<Option<BoxFuture<'a, T>>>,
    outputs: Vec<Option<T>>,
}

// Outputs are only moved, never pinned.
impl<T> Unpin for JoinAll<'_, T> {}

impl<T> Future for JoinAll<'_, T> {
    type Output = Vec<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Vec<T>> {
        let this = self.get_mut();
        let mut running = false;
        for (slot, output) in this.futures.iter_mut().zip(&mut this.outputs) {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => {
                        *output = Some(value);
                        *slot = None;
                    }
                    Poll::Pending => running = true,
                }
            }
        }
        if running {
            Poll::Pending
        } else {
            Poll::Ready(this.outputs.drain(..).flatten().collect())
        }
    }
}

/// Yields once to the executor (or to [`join_all`]'s other futures).
pub async fn yield_now() {
    YieldNow(false).await;
}

struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

/// Yields until `done()` or [`PATIENCE`] ran out (the case's own checks
/// then report what did not happen).
async fn yield_until(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() && Instant::now() <= deadline {
        yield_now().await;
    }
}

/// Runs one case: a panic is caught and a case still running after
/// [`CASE_LIMIT`] is stopped, both reported as failures, so a broken backend
/// (say, one that never releases a lock) cannot hide the other cases.
struct Guarded<F> {
    case: Pin<Box<F>>,
    watchdog: Option<Watchdog>,
}

/// A thread that wakes the case once its time is up. It waits on a channel,
/// so it ends as soon as the case does.
struct Watchdog {
    expired: Arc<AtomicBool>,
    waker: Arc<Mutex<Waker>>,
    _done: mpsc::Sender<()>,
}

impl Watchdog {
    fn start(waker: &Waker) -> Self {
        let expired = Arc::new(AtomicBool::new(false));
        let shared_waker = Arc::new(Mutex::new(waker.clone()));
        let (done, wait) = mpsc::channel::<()>();
        let (flag, to_wake) = (Arc::clone(&expired), Arc::clone(&shared_waker));
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(CASE_LIMIT) {
                flag.store(true, Ordering::SeqCst);
                lock_ignoring_poison(&to_wake).wake_by_ref();
            }
        });
        Self {
            expired,
            waker: shared_waker,
            _done: done,
        }
    }
}

impl<F> Guarded<F> {
    fn new(case: F) -> Self {
        Self {
            case: Box::pin(case),
            watchdog: None,
        }
    }
}

impl<F: Future<Output = Result<(), String>>> Future for Guarded<F> {
    type Output = Result<(), String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        match &this.watchdog {
            None => this.watchdog = Some(Watchdog::start(cx.waker())),
            Some(watchdog) => {
                if watchdog.expired.load(Ordering::SeqCst) {
                    return Poll::Ready(Err(format!(
                        "still running after {CASE_LIMIT:?}: a lock or wait never ended"
                    )));
                }
                lock_ignoring_poison(&watchdog.waker).clone_from(cx.waker());
            }
        }
        let case = this.case.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| case.poll(cx))) {
            Ok(poll) => poll,
            Err(panic) => {
                let message = hephaestus_engine_core::step::panic_message(panic.as_ref());
                Poll::Ready(Err(format!("panicked: {message}")))
            }
        }
    }
}

/// Runs one case the way every suite does: a panic is caught and a case
/// still running after [`CASE_LIMIT`] is stopped, both as failures.
#[doc(hidden)]
pub async fn guarded<F: Future<Output = Result<(), String>>>(case: F) -> Result<(), String> {
    Guarded::new(case).await
}

/// Runs one case of `suite` on `backend` and panics with the case's message
/// if it fails: what the tests [`conformance_tests!`](crate::conformance_tests)
/// generates run.
#[doc(hidden)]
pub async fn assert_case<F: Future<Output = Result<(), String>>>(
    suite: &str,
    case: &str,
    outcome: F,
) {
    if let Err(message) = guarded(outcome).await {
        panic!("conformance suite {suite}, case {case}: {message}");
    }
}

/// The cases of each suite, listed once: hands `suite [case, ...]` to the
/// macro `$then` with its arguments.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    (instance_store, $then:ident { $($args:tt)* }) => {
        $crate::$then! { $($args)* ; instance_store [
                insert_then_get_round_trips_every_field,
                duplicate_id_is_already_exists,
                active_claim_conflicts_with_holder_id,
                claim_is_freed_when_the_holder_ends,
                instances_without_claim_never_conflict,
                concurrent_inserts_with_one_claim_commit_once,
                dropped_unit_of_work_leaves_nothing,
                lock_serializes_writers,
                locks_on_different_instances_do_not_block,
                lock_of_missing_instance_is_none,
                update_is_visible_after_commit_only,
                update_of_missing_instance_is_an_error,
                nul_characters_are_rejected,
                list_filters_and_pages_newest_first,
                cancel_status_only_ends_an_active_instance_and_frees_its_claim,
        ] }
    };
    (step_result_store, $then:ident { $($args:tt)* }) => {
        $crate::$then! { $($args)* ; step_result_store [
                record_returns_increasing_seqs,
                duplicates_are_detected_per_activation_and_kind,
                pending_is_in_seq_order_and_excludes_processed,
                is_recorded_counts_completions_markers_and_failures,
                result_for_missing_instance_is_not_found,
                concurrent_records_all_arrive,
                concurrent_duplicates_are_stored_once,
                dropped_unit_of_work_drops_results,
                prune_deletes_only_old_processed_results,
                nul_characters_in_results_are_rejected,
                a_refused_result_keeps_its_reason_and_gives_up_its_slot,
        ] }
    };
    (job_queue, $then:ident { $($args:tt)* }) => {
        $crate::$then! { $($args)* ; job_queue [
                enqueue_fetch_complete,
                scheduled_jobs_wait_until_due,
                fetch_orders_by_priority_then_time_then_id,
                fetch_honours_limit_and_queue,
                unique_jobs_return_the_existing_job,
                a_merged_unique_job_is_not_lost_to_a_claim_before_commit,
                stale_lease_is_fenced_off,
                retry_records_the_error_and_bumps_the_attempt,
                discard_records_the_error_and_stops,
                cancel_stops_unfinished_jobs,
                cancel_matching_uses_json_containment,
                cancel_matching_by_group,
                concurrent_fetchers_never_share_a_job,
                dropped_unit_of_work_enqueues_nothing,
                nul_characters_in_jobs_are_rejected,
                job_info_reports_what_was_enqueued,
                prune_removes_only_finished_jobs,
                heartbeats_keep_a_job_fresh_and_silence_makes_it_stale,
        ] }
    };
}

/// Runs every case of a suite into a [`Report`].
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_report {
    ($report:ident, $make:ident ; $suite:ident [$($case:ident),* $(,)?]) => {
        $(
            let backend = $make().await;
            let outcome = $crate::ports::guarded(
                $crate::ports::$case(&backend),
            )
            .await;
            $report.record(stringify!($case), outcome);
        )*
    };
}

/// Generates one `#[test]` per case of a conformance suite, each named after
/// its case, so `cargo test <case>` runs one case and a failure names it.
///
/// - `make`: an expression giving a closure that returns a future of a
///   fresh, empty backend (called once per case);
/// - `run`: a function that runs a future to completion on the backend's
///   runtime (`block_on` for a runtime-free backend, a Tokio runtime's
///   `block_on` for a database);
/// - `cleanup` (optional): a closure given the backend after its case, which
///   returns a future (drop the case's schema, ...).
///
/// Put each suite in a module of its own: the tests are named after the
/// cases.
///
/// ```
/// fn run<F: std::future::Future>(case: F) -> F::Output {
///     tokio::runtime::Builder::new_current_thread()
///         .build()
///         .unwrap()
///         .block_on(case)
/// }
///
/// mod instance_store {
///     hephaestus_conformance::conformance_tests!(
///         instance_store,
///         make: || async { hephaestus_memory::MemoryBackend::new() },
///         run: super::run,
///     );
/// }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($suite:ident, make: $make:expr, run: $run:expr $(,)?) => {
        $crate::conformance_tests!(
            $suite,
            make: $make,
            run: $run,
            cleanup: |_backend| async {},
        );
    };
    ($suite:ident, make: $make:expr, run: $run:expr, cleanup: $cleanup:expr $(,)?) => {
        $crate::__conformance_cases!($suite, __conformance_test_fns { $make, $run, $cleanup });
    };
}

/// The `#[test]` functions of [`conformance_tests!`](crate::conformance_tests).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_test_fns {
    ($make:expr, $run:expr, $cleanup:expr ; $suite:ident [$($case:ident),* $(,)?]) => {
        $(
            #[test]
            fn $case() {
                $run(async {
                    let backend = ($make)().await;
                    $crate::ports::assert_case(
                        stringify!($suite),
                        stringify!($case),
                        $crate::ports::$case(&backend),
                    )
                    .await;
                    ($cleanup)(backend).await;
                });
            }
        )*
    };
}

/// Fails the case unless `cond`.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!("line {}: {}", line!(), format!($($fmt)+)));
        }
    };
}

/// Fails the case unless `left == right`.
macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($fmt:tt)+) => {
        // `match` keeps temporaries alive, like `assert_eq!`.
        match (&$left, &$right) {
            (left, right) => {
                if left != right {
                    return Err(format!(
                        "line {}: {}\n  left: {:?}\n right: {:?}",
                        line!(),
                        format!($($fmt)+),
                        left,
                        right
                    ));
                }
            }
        }
    };
}

/// Turns an unexpected backend error into a case failure.
trait Check<T> {
    fn check(self, what: &str) -> Result<T, String>;
}

impl<T> Check<T> for Result<T, PortError> {
    fn check(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: unexpected error: {e} ({e:?})"))
    }
}

// ---------------------------------------------------------------------------
// Test data
// ---------------------------------------------------------------------------

/// `n` fresh v7 ids in increasing order.
fn ids(n: usize) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    ids.sort();
    ids
}

fn one_id() -> Uuid {
    Uuid::now_v7()
}

/// A fixed instant with microsecond precision.
fn base_time() -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH + TimeDelta::microseconds(1_715_000_000_123_456)
}

fn secs(n: i64) -> TimeDelta {
    TimeDelta::seconds(n)
}

/// The wall clock truncated to whole microseconds.
fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    now - TimeDelta::nanoseconds(i64::from(now.timestamp_subsec_nanos() % 1_000))
}

/// A fetch time at which every job enqueued "now" is due, even if the
/// backend's clock runs a little ahead of ours.
fn soon() -> DateTime<Utc> {
    now_micros() + TimeDelta::minutes(1)
}

/// A fetch time after every job these cases schedule.
fn far_future() -> DateTime<Utc> {
    now_micros() + TimeDelta::days(2)
}

fn bid(s: &str) -> BusinessId {
    // Every business id in this file is a valid literal.
    BusinessId::parse(s).unwrap_or_else(|e| panic!("test business id {s:?}: {e}"))
}

fn wid(s: &str) -> WorkflowId {
    // Every workflow id in this file is a valid literal.
    WorkflowId::new(s).unwrap_or_else(|e| panic!("test workflow id {s:?}: {e}"))
}

fn sid(s: &str) -> StepId {
    // Every step id in this file is a valid literal.
    StepId::new(s).unwrap_or_else(|e| panic!("test step id {s:?}: {e}"))
}

fn event(s: &str) -> Event {
    // Every event in this file is a valid literal.
    Event::new(s).unwrap_or_else(|e| panic!("test event {s:?}: {e}"))
}

/// A minimal instance; with `claim`, it claims its business id within
/// its workflow.
fn instance(
    id: Uuid,
    business: &str,
    workflow: &str,
    version: u32,
    status: InstanceStatus,
    claim: bool,
) -> Instance {
    let business_id = bid(business);
    let workflow_id = wid(workflow);
    let unique_claim = if claim {
        UniqueClaim::for_scope(Scope::Workflow, &business_id, &workflow_id, version)
    } else {
        None
    };
    Instance {
        id,
        business_id,
        workflow_id,
        workflow_version: version,
        status,
        unique_claim,
        context: Context::new(json!({"n": 1})),
        step_configs: BTreeMap::new(),
        runtime_metadata: Map::new(),
        steps: BTreeMap::new(),
        history: Vec::new(),
        failure: None,
        telemetry_metadata: Map::new(),
        created_at: base_time(),
        updated_at: base_time(),
        revision: 0,
    }
}

/// A pending instance of workflow `orders` claiming `business`.
fn active(id: Uuid, business: &str) -> Instance {
    instance(id, business, "orders", 1, InstanceStatus::Pending, true)
}

/// An instance using every field, with awkward JSON.
fn rich_instance(id: Uuid) -> Instance {
    let t0 = base_time();
    let business_id = bid("order::0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b");
    let workflow_id = wid("shop.orders:checkout-flow_2");
    let unique_claim = UniqueClaim::for_scope(Scope::Version, &business_id, &workflow_id, 3);
    let mut context = Context::new(json!({
        "unicode": "héllo wörld ✓ 日本語 😀 \u{200b} ∑",
        "escapes": "quote \" backslash \\ newline \n tab \t slash /",
        "ключ": "значение",
        "big": {"u64_max": u64::MAX, "i64_min": i64::MIN, "i64_max": i64::MAX, "zero": 0},
        "floats": [0.1, -2.5, 3.0, 123_456.789],
        "nulls": [null, {"inner": null}],
        "empty_object": {},
        "empty_array": [],
        "empty_string": "",
        "bools": [true, false],
        "nested": {"a": {"b": {"c": [1, [2, [3, {"d": true}]]]}}},
    }));
    context.put_step_output(
        "charge",
        json!({"amount": 12.5, "currency": "EUR", "lines": [{"sku": "a"}]}),
    );
    context.put_step_output("notify", Value::Null);
    context.put_step_output("empty", json!({}));

    let mut steps = BTreeMap::new();
    steps.insert(
        sid("charge"),
        StepState {
            status: StepStatus::Completed,
            activation: 2,
            event: Some(event("paid")),
            targets: vec![sid("notify"), sid("wait_for_ship")],
            timer: None,
            pending_resume: None,
            activated_at: Some(t0),
            updated_at: Some(t0 + secs(1)),
        },
    );
    steps.insert(
        sid("wait_for_ship"),
        StepState {
            status: StepStatus::Waiting,
            activation: 1,
            event: None,
            targets: Vec::new(),
            timer: Some(StepTimer {
                fire_at: t0 + secs(3600),
                event: event("timeout"),
            }),
            pending_resume: Some(PendingResume {
                event: event("shipped"),
                payload: json!({"carrier": "ÜPS", "ids": [1, 2]}),
                at: t0 + secs(2),
            }),
            activated_at: Some(t0 + secs(1)),
            updated_at: Some(t0 + secs(2)),
        },
    );
    steps.insert(
        sid("notify"),
        StepState {
            status: StepStatus::Active,
            activation: 1,
            event: None,
            targets: Vec::new(),
            timer: None,
            pending_resume: None,
            activated_at: Some(t0 + secs(1)),
            updated_at: None,
        },
    );
    steps.insert(
        sid("refund"),
        StepState {
            status: StepStatus::Dead,
            activation: 0,
            event: None,
            targets: Vec::new(),
            timer: None,
            pending_resume: None,
            activated_at: None,
            updated_at: Some(t0 + secs(1)),
        },
    );

    let error = StepError::retry_after(
        "card declined: «insufficient funds»",
        Duration::from_millis(1_500),
    )
    .with_details(json!({"code": 402, "retry": true, "nested": {"x": [null]}}));
    let attempts = vec![
        AttemptRecord {
            attempt: 1,
            at: t0 + secs(1),
            error: StepError::retryable("timeout"),
        },
        AttemptRecord {
            attempt: 2,
            at: t0 + secs(2),
            error: error.clone(),
        },
    ];
    let history = vec![
        HistoryEntry {
            at: t0,
            step: None,
            activation: 0,
            kind: HistoryKind::Started,
        },
        HistoryEntry {
            at: t0 + secs(1),
            step: Some(sid("charge")),
            activation: 2,
            kind: HistoryKind::Completed {
                event: event("paid"),
            },
        },
        HistoryEntry {
            at: t0 + secs(1),
            step: Some(sid("wait_for_ship")),
            activation: 1,
            kind: HistoryKind::Async {
                timer_at: Some(t0 + secs(3600)),
            },
        },
        HistoryEntry {
            at: t0 + secs(2),
            step: Some(sid("wait_for_ship")),
            activation: 1,
            kind: HistoryKind::Resumed {
                event: event("shipped"),
                source: ResumeSource::Timer,
            },
        },
        HistoryEntry {
            at: t0 + secs(2),
            step: Some(sid("wait_for_ship")),
            activation: 1,
            kind: HistoryKind::ResumeDropped {
                event: event("late"),
            },
        },
        HistoryEntry {
            at: t0 + secs(3),
            step: None,
            activation: 0,
            kind: HistoryKind::Cancelled {
                reason: Some("customer asked — «nope»".to_owned()),
            },
        },
    ];

    let mut step_configs = BTreeMap::new();
    step_configs.insert(
        sid("notify"),
        json!({"channel": "email", "retries": [1, 2, 3], "opts": {}}),
    );
    step_configs.insert(sid("wait_for_ship"), Value::Null);

    let mut runtime_metadata = Map::new();
    runtime_metadata.insert("charged".to_owned(), json!(12.5));
    runtime_metadata.insert(
        "gateway".to_owned(),
        json!({"name": "stripe", "ids": [1, 2]}),
    );

    let mut telemetry_metadata = Map::new();
    telemetry_metadata.insert("tenant".to_owned(), json!("acme"));
    telemetry_metadata.insert(
        "trace".to_owned(),
        json!({"id": "0af7651916cd43dd8448eb211c80319c", "sampled": true}),
    );
    telemetry_metadata.insert("empty".to_owned(), json!({}));

    Instance {
        id,
        business_id,
        workflow_id,
        workflow_version: 3,
        status: InstanceStatus::Waiting,
        unique_claim,
        context,
        step_configs,
        runtime_metadata,
        steps,
        history,
        failure: Some(FailureRecord {
            reason: hephaestus_engine_core::instance::FailureReason::UndeclaredTarget {
                target: "refund".to_owned(),
            },
            step: Some(sid("charge")),
            activation: 2,
            error,
            attempts,
            at: t0 + secs(3),
        }),
        telemetry_metadata,
        created_at: t0,
        updated_at: t0 + secs(3),
        revision: 42,
    }
}

async fn insert_committed<B: InstanceStore>(b: &B, instance: &Instance) -> Result<(), String> {
    let mut tx = b.begin().await.check("begin")?;
    b.insert(&mut tx, instance)
        .await
        .check(&format!("insert {}", instance.id))?;
    b.commit(tx).await.check("commit")
}

/// Locks, updates and commits `instance`.
async fn update_committed<B: InstanceStore>(b: &B, instance: &Instance) -> Result<(), String> {
    let mut tx = b.begin().await.check("begin")?;
    let found = b.lock(&mut tx, instance.id).await.check("lock")?;
    ensure!(found.is_some(), "lock {}: instance not found", instance.id);
    b.update(&mut tx, instance).await.check("update")?;
    b.commit(tx).await.check("commit")
}

fn expect_already_running<T: fmt::Debug>(
    outcome: Result<T, PortError>,
    business_id: &BusinessId,
    holder: Uuid,
    what: &str,
) -> Result<(), String> {
    match outcome {
        Err(PortError::AlreadyRunning {
            business_id: ref got_business,
            instance_id,
        }) if got_business == business_id && instance_id == holder => Ok(()),
        other => Err(format!(
            "{what}: expected AlreadyRunning {{ business_id: {business_id}, instance_id: {holder} }}, got {other:?}"
        )),
    }
}

fn listed_ids(instances: &[Instance]) -> Vec<Uuid> {
    instances.iter().map(|i| i.id).collect()
}

fn push(log: &Mutex<Vec<&'static str>>, entry: &'static str) {
    lock_ignoring_poison(log).push(entry);
}

fn logged(log: &Mutex<Vec<&'static str>>, entry: &str) -> bool {
    lock_ignoring_poison(log).contains(&entry)
}

fn position(log: &[&'static str], entry: &str) -> Result<usize, String> {
    log.iter()
        .position(|e| *e == entry)
        .ok_or_else(|| format!("{entry:?} missing from the log {log:?}"))
}

// ---------------------------------------------------------------------------
// InstanceStore
// ---------------------------------------------------------------------------

/// Runs the [`InstanceStore`] suite; `make` returns a fresh, empty backend.
pub async fn instance_store<B, F, Fut>(make: F) -> Report
where
    B: InstanceStore,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let mut report = Report::new("instance_store");
    crate::__conformance_cases!(instance_store, __conformance_report { report, make });
    report
}

/// Conformance case of `instance_store`: insert then get round trips every field.
#[doc(hidden)]
pub async fn insert_then_get_round_trips_every_field<B: InstanceStore>(
    b: &B,
) -> Result<(), String> {
    let original = rich_instance(one_id());
    let mut tx = b.begin().await.check("begin")?;
    b.insert(&mut tx, &original).await.check("insert")?;
    ensure_eq!(
        b.get(original.id).await.check("get before commit")?,
        None,
        "an uncommitted instance must not be visible"
    );
    b.commit(tx).await.check("commit")?;

    let got = b.get(original.id).await.check("get")?;
    ensure_eq!(
        got.as_ref(),
        Some(&original),
        "get must return every field as inserted"
    );
    let listed = b.list(&InstanceFilter::default()).await.check("list")?;
    ensure_eq!(
        listed,
        vec![original.clone()],
        "list must return every field as inserted"
    );
    let mut tx = b.begin().await.check("begin")?;
    let locked = b.lock(&mut tx, original.id).await.check("lock")?;
    ensure_eq!(
        locked.as_ref(),
        Some(&original),
        "lock must return every field as inserted"
    );
    drop(tx);
    Ok(())
}

/// Conformance case of `instance_store`: duplicate id is already exists.
#[doc(hidden)]
pub async fn duplicate_id_is_already_exists<B: InstanceStore>(b: &B) -> Result<(), String> {
    let id = one_id();
    insert_committed(
        b,
        &instance(id, "order::1", "orders", 1, InstanceStatus::Running, false),
    )
    .await?;
    let other = instance(id, "order::2", "refunds", 1, InstanceStatus::Pending, false);
    let mut tx = b.begin().await.check("begin")?;
    let outcome = b.insert(&mut tx, &other).await;
    let outcome = match outcome {
        Ok(()) => b.commit(tx).await,
        Err(e) => Err(e),
    };
    ensure!(
        matches!(outcome, Err(PortError::AlreadyExists(_))),
        "a second instance with an existing id: expected AlreadyExists, got {outcome:?}"
    );
    let stored = b
        .get(id)
        .await
        .check("get")?
        .ok_or("the first instance vanished")?;
    ensure_eq!(
        stored.business_id.as_str(),
        "order::1",
        "the first instance must be untouched"
    );

    // Twice in one unit of work.
    let fresh = one_id();
    let mut tx = b.begin().await.check("begin")?;
    b.insert(
        &mut tx,
        &instance(
            fresh,
            "order::3",
            "orders",
            1,
            InstanceStatus::Pending,
            false,
        ),
    )
    .await
    .check("first insert")?;
    let outcome = b
        .insert(
            &mut tx,
            &instance(
                fresh,
                "order::4",
                "orders",
                1,
                InstanceStatus::Pending,
                false,
            ),
        )
        .await;
    let outcome = match outcome {
        Ok(()) => b.commit(tx).await,
        Err(e) => Err(e),
    };
    ensure!(
        matches!(outcome, Err(PortError::AlreadyExists(_))),
        "the same id twice in one unit of work: expected AlreadyExists, got {outcome:?}"
    );
    Ok(())
}

/// Conformance case of `instance_store`: active claim conflicts with holder id.
#[doc(hidden)]
pub async fn active_claim_conflicts_with_holder_id<B: InstanceStore>(b: &B) -> Result<(), String> {
    // Every active status holds the claim.
    for (n, status) in InstanceStatus::ACTIVE.into_iter().enumerate() {
        let business = format!("order::{n}");
        let ids = ids(2);
        let holder = instance(ids[0], &business, "orders", 1, status, true);
        insert_committed(b, &holder).await?;
        let second = instance(
            ids[1],
            &business,
            "orders",
            2,
            InstanceStatus::Pending,
            true,
        );
        let mut tx = b.begin().await.check("begin")?;
        let outcome = match b.insert(&mut tx, &second).await {
            Ok(()) => b.commit(tx).await,
            Err(e) => Err(e),
        };
        expect_already_running(
            outcome,
            &second.business_id,
            holder.id,
            &format!("second insert while the first is {status}"),
        )?;
        ensure_eq!(
            b.get(second.id).await.check("get")?,
            None,
            "the rejected instance must not exist"
        );
    }

    // Within one unit of work.
    let ids = ids(2);
    let first = active(ids[0], "order::77");
    let second = active(ids[1], "order::77");
    let mut tx = b.begin().await.check("begin")?;
    b.insert(&mut tx, &first).await.check("first insert")?;
    let outcome = match b.insert(&mut tx, &second).await {
        Ok(()) => b.commit(tx).await,
        Err(e) => Err(e),
    };
    expect_already_running(
        outcome,
        &second.business_id,
        first.id,
        "same claim twice in one unit of work",
    )?;

    // Another workflow's claim for the same business id does not conflict.
    insert_committed(
        b,
        &instance(
            one_id(),
            "order::0",
            "refunds",
            1,
            InstanceStatus::Pending,
            true,
        ),
    )
    .await
}

/// Conformance case of `instance_store`: cancel status only ends an active instance and frees its claim.
#[doc(hidden)]
pub async fn cancel_status_only_ends_an_active_instance_and_frees_its_claim<B: InstanceStore>(
    b: &B,
) -> Result<(), String> {
    let original = active(one_id(), "order::9");
    insert_committed(b, &original).await?;
    let at = base_time() + secs(60);
    let mut tx = b.begin().await.check("begin")?;
    b.lock(&mut tx, original.id).await.check("lock")?;
    let cancelled = b
        .cancel_status_only(&mut tx, original.id, at)
        .await
        .check("cancel_status_only")?;
    ensure!(cancelled, "an active instance must be cancelled");
    b.commit(tx).await.check("commit")?;
    let got = b
        .get(original.id)
        .await
        .check("get")?
        .ok_or("the instance is gone")?;
    ensure_eq!(got.status, InstanceStatus::Cancelled, "its status");
    ensure_eq!(got.context, original.context, "its state is left as it was");
    // Its claim is free: a new active instance with it inserts.
    insert_committed(b, &active(one_id(), "order::9")).await?;
    // A finished instance is left alone.
    let mut tx = b.begin().await.check("begin")?;
    let again = b
        .cancel_status_only(&mut tx, original.id, at)
        .await
        .check("cancel_status_only again")?;
    ensure!(!again, "a finished instance is not cancelled again");
    drop(tx);
    Ok(())
}

/// Conformance case of `instance_store`: claim is freed when the holder ends.
#[doc(hidden)]
pub async fn claim_is_freed_when_the_holder_ends<B: InstanceStore>(b: &B) -> Result<(), String> {
    let ids = ids(3);
    let mut first = active(ids[0], "order::1");
    insert_committed(b, &first).await?;
    first.status = InstanceStatus::Completed;
    first.revision = 1;
    update_committed(b, &first).await?;

    let second = active(ids[1], "order::1");
    insert_committed(b, &second).await?;
    let stored_first = b.get(first.id).await.check("get first")?;
    ensure_eq!(
        stored_first.as_ref(),
        Some(&first),
        "the finished instance is history and must be kept"
    );
    let filter = InstanceFilter::default().with_business_id(bid("order::1"));
    let listed = b.list(&filter).await.check("list")?;
    ensure_eq!(
        listed_ids(&listed),
        vec![second.id, first.id],
        "both instances, newest first"
    );

    // A finished instance with the same claim does not conflict either.
    let mut finished = active(ids[2], "order::1");
    finished.status = InstanceStatus::Failed;
    insert_committed(b, &finished).await?;

    // The new holder holds the claim again.
    let mut tx = b.begin().await.check("begin")?;
    let outcome = match b.insert(&mut tx, &active(one_id(), "order::1")).await {
        Ok(()) => b.commit(tx).await,
        Err(e) => Err(e),
    };
    expect_already_running(
        outcome,
        &bid("order::1"),
        second.id,
        "insert while the second is active",
    )
}

/// Conformance case of `instance_store`: instances without claim never conflict.
#[doc(hidden)]
pub async fn instances_without_claim_never_conflict<B: InstanceStore>(b: &B) -> Result<(), String> {
    let ids = ids(3);
    let a = instance(
        ids[0],
        "order::1::0badcafe",
        "orders",
        1,
        InstanceStatus::Running,
        false,
    );
    let c = instance(
        ids[1],
        "order::1::0badcafe",
        "orders",
        1,
        InstanceStatus::Pending,
        false,
    );
    insert_committed(b, &a).await?;
    insert_committed(b, &c).await?;
    // Nor with a claiming instance of the same business id.
    let claiming = active(ids[2], "order::1");
    insert_committed(b, &claiming).await?;
    let listed = b.list(&InstanceFilter::default()).await.check("list")?;
    ensure_eq!(
        listed_ids(&listed),
        vec![ids[2], ids[1], ids[0]],
        "all three instances are stored"
    );
    Ok(())
}

/// Conformance case of `instance_store`: concurrent inserts with one claim commit once.
#[doc(hidden)]
pub async fn concurrent_inserts_with_one_claim_commit_once<B: InstanceStore>(
    b: &B,
) -> Result<(), String> {
    let ids = ids(CONCURRENCY);
    let begun = AtomicUsize::new(0);
    let begun = &begun;
    let futures: Vec<BoxFuture<'_, Result<(), PortError>>> = ids
        .iter()
        .map(|&id| {
            Box::pin(async move {
                let mut tx = b.begin().await?;
                begun.fetch_add(1, Ordering::SeqCst);
                // Start all inserts together (a backend may make later ones wait).
                yield_until(|| begun.load(Ordering::SeqCst) == CONCURRENCY).await;
                b.insert(&mut tx, &active(id, "order::1")).await?;
                b.commit(tx).await
            }) as BoxFuture<'_, _>
        })
        .collect();
    let outcomes = join_all(futures).await;
    let winners: Vec<Uuid> = ids
        .iter()
        .zip(&outcomes)
        .filter(|(_, outcome)| outcome.is_ok())
        .map(|(id, _)| *id)
        .collect();
    ensure_eq!(
        winners.len(),
        1,
        "exactly one of {CONCURRENCY} concurrent inserts must commit: {outcomes:?}"
    );
    let winner = winners[0];
    for (id, outcome) in ids.iter().zip(outcomes) {
        if *id != winner {
            expect_already_running(outcome, &bid("order::1"), winner, &format!("loser {id}"))?;
        }
    }
    let filter = InstanceFilter::default().with_business_id(bid("order::1"));
    let listed = b.list(&filter).await.check("list")?;
    ensure_eq!(
        listed_ids(&listed),
        vec![winner],
        "only the winner is stored"
    );
    Ok(())
}

/// Conformance case of `instance_store`: dropped unit of work leaves nothing.
#[doc(hidden)]
pub async fn dropped_unit_of_work_leaves_nothing<B: InstanceStore>(b: &B) -> Result<(), String> {
    let ids = ids(2);
    let mut tx = b.begin().await.check("begin")?;
    b.insert(&mut tx, &active(ids[0], "order::1"))
        .await
        .check("insert")?;
    drop(tx);
    ensure_eq!(
        b.get(ids[0]).await.check("get")?,
        None,
        "a rolled-back insert must leave nothing"
    );
    ensure_eq!(
        b.list(&InstanceFilter::default()).await.check("list")?,
        Vec::new(),
        "nothing listed"
    );
    // Its claim was never taken.
    let kept = active(ids[1], "order::1");
    insert_committed(b, &kept).await?;

    // A rolled-back update leaves the committed state.
    let mut tx = b.begin().await.check("begin")?;
    b.lock(&mut tx, kept.id).await.check("lock")?;
    let mut changed = kept.clone();
    changed.status = InstanceStatus::Cancelled;
    changed.revision = 9;
    b.update(&mut tx, &changed).await.check("update")?;
    drop(tx);
    ensure_eq!(
        b.get(kept.id).await.check("get")?.as_ref(),
        Some(&kept),
        "a rolled-back update must leave nothing"
    );
    // ... and released the lock.
    update_committed(b, &changed).await
}

/// Conformance case of `instance_store`: lock serializes writers.
#[doc(hidden)]
pub async fn lock_serializes_writers<B: InstanceStore>(b: &B) -> Result<(), String> {
    let original = active(one_id(), "order::1");
    insert_committed(b, &original).await?;
    let id = original.id;
    let log = Mutex::new(Vec::new());
    let log = &log;

    let mut first = b.begin().await.check("begin first")?;
    let locked = b.lock(&mut first, id).await.check("first lock")?;
    ensure_eq!(locked.as_ref(), Some(&original), "first lock");

    let mut updated = original.clone();
    updated.status = InstanceStatus::Running;
    updated.revision = 1;
    let writer_a: BoxFuture<'_, Result<(), String>> = Box::pin(async move {
        // Let the second writer try to lock and give it every chance to get
        // through wrongly before updating.
        yield_until(|| logged(log, "b: locking")).await;
        for _ in 0..50 {
            yield_now().await;
        }
        b.update(&mut first, &updated).await.check("first update")?;
        push(log, "a: committing");
        b.commit(first).await.check("first commit")
    });
    let writer_b: BoxFuture<'_, Result<(), String>> = Box::pin(async move {
        let mut second = b.begin().await.check("begin second")?;
        push(log, "b: locking");
        let seen = b.lock(&mut second, id).await.check("second lock")?;
        push(log, "b: locked");
        let mut seen = seen.ok_or("second lock: the instance vanished")?;
        ensure_eq!(
            seen.revision,
            1,
            "the second writer must see the first writer's committed update"
        );
        seen.revision = 2;
        b.update(&mut second, &seen).await.check("second update")?;
        b.commit(second).await.check("second commit")
    });
    for outcome in join_all(vec![writer_a, writer_b]).await {
        outcome?;
    }
    let log = lock_ignoring_poison(log).clone();
    ensure!(
        position(&log, "a: committing")? < position(&log, "b: locked")?,
        "the second lock returned while the first unit of work was still open: {log:?}"
    );
    let last = b
        .get(id)
        .await
        .check("get")?
        .ok_or("the instance vanished")?;
    ensure_eq!(last.revision, 2, "both writes must be applied in order");
    Ok(())
}

/// Conformance case of `instance_store`: locks on different instances do not block.
#[doc(hidden)]
pub async fn locks_on_different_instances_do_not_block<B: InstanceStore>(
    b: &B,
) -> Result<(), String> {
    let ids = ids(2);
    insert_committed(b, &active(ids[0], "order::1")).await?;
    insert_committed(b, &active(ids[1], "order::2")).await?;
    let log = Mutex::new(Vec::new());
    let log = &log;
    let mut first = b.begin().await.check("begin first")?;
    b.lock(&mut first, ids[0]).await.check("first lock")?;
    let holder: BoxFuture<'_, Result<(), String>> = Box::pin(async move {
        yield_until(|| logged(log, "b: locked")).await;
        push(log, "a: committing");
        b.commit(first).await.check("first commit")
    });
    let other: BoxFuture<'_, Result<(), String>> = Box::pin(async move {
        let mut second = b.begin().await.check("begin second")?;
        let found = b.lock(&mut second, ids[1]).await.check("second lock")?;
        push(log, "b: locked");
        ensure!(found.is_some(), "second lock: instance not found");
        b.commit(second).await.check("second commit")
    });
    for outcome in join_all(vec![holder, other]).await {
        outcome?;
    }
    let log = lock_ignoring_poison(log).clone();
    ensure!(
        position(&log, "b: locked")? < position(&log, "a: committing")?,
        "locking another instance waited for an unrelated unit of work: {log:?}"
    );
    Ok(())
}

/// Conformance case of `instance_store`: lock of missing instance is none.
#[doc(hidden)]
pub async fn lock_of_missing_instance_is_none<B: InstanceStore>(b: &B) -> Result<(), String> {
    let mut tx = b.begin().await.check("begin")?;
    let found = b.lock(&mut tx, one_id()).await.check("lock")?;
    ensure_eq!(found, None, "locking a missing instance");
    b.commit(tx).await.check("commit")
}

/// Conformance case of `instance_store`: update is visible after commit only.
#[doc(hidden)]
pub async fn update_is_visible_after_commit_only<B: InstanceStore>(b: &B) -> Result<(), String> {
    let original = active(one_id(), "order::1");
    insert_committed(b, &original).await?;
    let mut tx = b.begin().await.check("begin")?;
    let locked = b.lock(&mut tx, original.id).await.check("lock")?;
    ensure_eq!(locked.as_ref(), Some(&original), "lock");
    let mut changed = original.clone();
    changed.status = InstanceStatus::Waiting;
    changed.revision = 1;
    changed.updated_at = base_time() + secs(5);
    changed.context.put_step_output("a", json!({"ok": "✓"}));
    changed.history.push(HistoryEntry {
        at: base_time() + secs(5),
        step: None,
        activation: 0,
        kind: HistoryKind::Started,
    });
    b.update(&mut tx, &changed).await.check("update")?;
    ensure_eq!(
        b.get(original.id).await.check("get")?.as_ref(),
        Some(&original),
        "before commit, get sees the committed state"
    );
    // Locking again in the same unit of work sees its own write.
    let again = b
        .lock(&mut tx, original.id)
        .await
        .check("second lock in the same unit of work")?;
    ensure_eq!(
        again.as_ref(),
        Some(&changed),
        "the unit of work must see its own update"
    );
    b.commit(tx).await.check("commit")?;
    ensure_eq!(
        b.get(original.id).await.check("get")?.as_ref(),
        Some(&changed),
        "after commit"
    );

    // An instance inserted and then updated in one unit of work.
    let mut fresh = active(one_id(), "order::2");
    let mut tx = b.begin().await.check("begin")?;
    b.insert(&mut tx, &fresh).await.check("insert")?;
    fresh.status = InstanceStatus::Running;
    fresh.revision = 1;
    b.update(&mut tx, &fresh)
        .await
        .check("update of an instance inserted in this unit of work")?;
    b.commit(tx).await.check("commit")?;
    ensure_eq!(
        b.get(fresh.id).await.check("get")?.as_ref(),
        Some(&fresh),
        "insert then update"
    );
    Ok(())
}

/// Conformance case of `instance_store`: update of missing instance is an error.
#[doc(hidden)]
pub async fn update_of_missing_instance_is_an_error<B: InstanceStore>(b: &B) -> Result<(), String> {
    let ghost = active(one_id(), "order::1");
    let mut tx = b.begin().await.check("begin")?;
    let outcome = match b.update(&mut tx, &ghost).await {
        Ok(()) => b.commit(tx).await,
        Err(e) => Err(e),
    };
    ensure!(
        outcome.is_err(),
        "updating a missing instance must fail, got {outcome:?}"
    );
    ensure_eq!(
        b.get(ghost.id).await.check("get")?,
        None,
        "an update must not create an instance"
    );
    Ok(())
}

/// Conformance case of `instance_store`: nul characters are rejected.
#[doc(hidden)]
pub async fn nul_characters_are_rejected<B: InstanceStore>(b: &B) -> Result<(), String> {
    let ids = ids(4);
    let mut in_value = active(ids[0], "order::1");
    in_value.context = Context::new(json!({"name": "a\u{0}b"}));
    let mut in_key = active(ids[1], "order::2");
    in_key.context = Context::new(json!({"nested": {"k\u{0}": 1}}));
    let mut in_metadata = active(ids[2], "order::3");
    in_metadata
        .telemetry_metadata
        .insert("t".to_owned(), json!(["\u{0}"]));
    for bad in [&in_value, &in_key, &in_metadata] {
        let mut tx = b.begin().await.check("begin")?;
        let outcome = match b.insert(&mut tx, bad).await {
            Ok(()) => b.commit(tx).await,
            Err(e) => Err(e),
        };
        ensure!(
            matches!(outcome, Err(PortError::InvalidInput(_))),
            "inserting JSON with U+0000: expected InvalidInput, got {outcome:?}"
        );
        ensure_eq!(
            b.get(bad.id).await.check("get")?,
            None,
            "the rejected instance must not exist"
        );
    }

    let good = active(ids[3], "order::4");
    insert_committed(b, &good).await?;
    let mut bad = good.clone();
    bad.context.put_step_output("a", json!("\u{0}"));
    let mut tx = b.begin().await.check("begin")?;
    b.lock(&mut tx, good.id).await.check("lock")?;
    let outcome = match b.update(&mut tx, &bad).await {
        Ok(()) => b.commit(tx).await,
        Err(e) => Err(e),
    };
    ensure!(
        matches!(outcome, Err(PortError::InvalidInput(_))),
        "updating with U+0000: expected InvalidInput, got {outcome:?}"
    );
    ensure_eq!(
        b.get(good.id).await.check("get")?.as_ref(),
        Some(&good),
        "the instance must be unchanged"
    );
    Ok(())
}

/// Conformance case of `instance_store`: list filters and pages newest first.
#[doc(hidden)]
pub async fn list_filters_and_pages_newest_first<B: InstanceStore>(b: &B) -> Result<(), String> {
    use InstanceStatus::{Cancelled, Completed, Failed, Pending, Running, Waiting};
    let i = ids(6);
    let all = [
        instance(i[0], "order::1", "orders", 1, Completed, false),
        instance(i[1], "order::1", "orders", 2, Running, false),
        instance(i[2], "order::2", "orders", 1, Failed, false),
        instance(i[3], "user::1", "signup", 1, Waiting, false),
        instance(i[4], "order::2", "orders", 2, Pending, false),
        instance(i[5], "order::3", "refunds", 1, Cancelled, false),
    ];
    // Not in id order, so insertion order cannot pass for id order.
    for n in [3, 0, 5, 1, 4, 2] {
        insert_committed(b, &all[n]).await?;
    }
    let cases: Vec<(&str, InstanceFilter, Vec<Uuid>)> = vec![
        (
            "no filter",
            InstanceFilter::default(),
            vec![i[5], i[4], i[3], i[2], i[1], i[0]],
        ),
        (
            "business id",
            InstanceFilter::default().with_business_id(bid("order::1")),
            vec![i[1], i[0]],
        ),
        (
            "unknown business id",
            InstanceFilter::default().with_business_id(bid("order::9")),
            vec![],
        ),
        (
            "workflow",
            InstanceFilter::default().with_workflow_id(wid("orders")),
            vec![i[4], i[2], i[1], i[0]],
        ),
        (
            "version",
            InstanceFilter::default().with_workflow_version(2),
            vec![i[4], i[1]],
        ),
        (
            "workflow and version",
            InstanceFilter::default()
                .with_workflow_id(wid("orders"))
                .with_workflow_version(1),
            vec![i[2], i[0]],
        ),
        (
            "statuses",
            InstanceFilter::default().with_statuses([Completed, Failed]),
            vec![i[2], i[0]],
        ),
        (
            "active statuses",
            InstanceFilter::default().with_statuses(InstanceStatus::ACTIVE),
            vec![i[4], i[3], i[1]],
        ),
        (
            "limit",
            InstanceFilter::default().with_limit(2),
            vec![i[5], i[4]],
        ),
        ("limit 0", InstanceFilter::default().with_limit(0), vec![]),
        (
            "before id",
            InstanceFilter::default().with_before_id(i[3]),
            vec![i[2], i[1], i[0]],
        ),
        (
            "everything at once",
            InstanceFilter::default()
                .with_business_id(bid("order::2"))
                .with_workflow_id(wid("orders"))
                .with_statuses([Failed, Pending])
                .with_before_id(i[5])
                .with_limit(1),
            vec![i[4]],
        ),
    ];
    for (name, filter, expected) in cases {
        let listed = b.list(&filter).await.check(name)?;
        ensure_eq!(listed_ids(&listed), expected, "list with {name}");
    }

    // Keyset pagination, two per page.
    let mut seen = Vec::new();
    let mut before_id = None;
    for _ in 0..5 {
        let page = b
            .list(&{
                let mut filter = InstanceFilter::default().with_limit(2);
                filter.before_id = before_id;
                filter
            })
            .await
            .check("page")?;
        ensure!(
            page.len() <= 2,
            "a page longer than its limit: {}",
            page.len()
        );
        let Some(last) = page.last() else { break };
        before_id = Some(last.id);
        seen.extend(listed_ids(&page));
    }
    ensure_eq!(
        seen,
        vec![i[5], i[4], i[3], i[2], i[1], i[0]],
        "paging through everything"
    );
    let one = b
        .list(&InstanceFilter::default().with_business_id(bid("user::1")))
        .await
        .check("list")?;
    ensure_eq!(
        one,
        vec![all[3].clone()],
        "listed instances carry every field"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// StepResultStore
// ---------------------------------------------------------------------------

/// Runs the [`StepResultStore`] suite; `make` returns a fresh, empty backend.
pub async fn step_result_store<B, F, Fut>(make: F) -> Report
where
    B: InstanceStore + StepResultStore,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let mut report = Report::new("step_result_store");
    crate::__conformance_cases!(step_result_store, __conformance_report { report, make });
    report
}

fn result(instance_id: Uuid, step: &str, activation: u32, kind: ResultKind) -> NewStepResult {
    let payload = match kind {
        ResultKind::Completed => ResultPayload::Completed {
            event: EventName("done".to_owned()),
            output: json!({"step": step, "n": activation, "ü": [1.5, null]}),
            metadata: {
                let mut m = Map::new();
                m.insert("took_ms".to_owned(), json!(12));
                m
            },
        },
        ResultKind::Async => ResultPayload::Async {
            timer_after_ms: Some(60_000),
            timer_event: Some(EventName("timeout".to_owned())),
        },
        ResultKind::Resume => ResultPayload::Resume {
            event: event("approved"),
            payload: json!({"by": "ada"}),
        },
        ResultKind::Timer => ResultPayload::Timer {
            event: event("timeout"),
        },
        ResultKind::Failed => ResultPayload::Failed {
            error: StepError::fatal("boom").with_details(json!({"code": 1})),
            attempts: vec![AttemptRecord {
                attempt: 1,
                at: base_time(),
                error: StepError::fatal("boom"),
            }],
        },
        ResultKind::Cancel => ResultPayload::Cancel {
            reason: Some("stop".to_owned()),
        },
    };
    NewStepResult {
        instance_id,
        step: Some(sid(step)),
        activation,
        payload,
    }
}

fn completed(instance_id: Uuid, step: &str, activation: u32) -> NewStepResult {
    result(instance_id, step, activation, ResultKind::Completed)
}

/// Inserts a fresh running instance.
async fn new_instance<B: InstanceStore>(b: &B, business: &str) -> Result<Uuid, String> {
    let id = one_id();
    insert_committed(
        b,
        &instance(id, business, "orders", 1, InstanceStatus::Running, false),
    )
    .await?;
    Ok(id)
}

async fn record_committed<B: StepResultStore>(
    b: &B,
    result: &NewStepResult,
) -> Result<Recorded, String> {
    let mut tx = b.begin().await.check("begin")?;
    let recorded = b.record(&mut tx, result).await.check("record")?;
    b.commit(tx).await.check("commit")?;
    Ok(recorded)
}

fn inserted(recorded: Recorded, what: &str) -> Result<i64, String> {
    match recorded {
        Recorded::Inserted(seq) => Ok(seq),
        Recorded::Duplicate => Err(format!("{what}: expected a new row, got Duplicate")),
    }
}

async fn pending_of<B: StepResultStore>(
    b: &B,
    instance_id: Uuid,
) -> Result<Vec<(i64, NewStepResult)>, String> {
    let mut tx = b.begin().await.check("begin")?;
    let rows = b.pending(&mut tx, instance_id).await.check("pending")?;
    drop(tx);
    Ok(rows.into_iter().map(|row| (row.seq, row.result)).collect())
}

async fn mark_committed<B: StepResultStore>(
    b: &B,
    instance_id: Uuid,
    seqs: &[i64],
) -> Result<(), String> {
    let mut tx = b.begin().await.check("begin")?;
    b.mark_processed(&mut tx, instance_id, seqs)
        .await
        .check("mark_processed")?;
    b.commit(tx).await.check("commit")
}

/// Conformance case of `step_result_store`: record returns increasing seqs.
#[doc(hidden)]
pub async fn record_returns_increasing_seqs<B: InstanceStore + StepResultStore>(
    b: &B,
) -> Result<(), String> {
    let id = new_instance(b, "order::1").await?;
    let results = [
        completed(id, "a", 1),
        completed(id, "b", 1),
        completed(id, "c", 1),
    ];
    let mut tx = b.begin().await.check("begin")?;
    let s1 = inserted(b.record(&mut tx, &results[0]).await.check("record a")?, "a")?;
    let s2 = inserted(b.record(&mut tx, &results[1]).await.check("record b")?, "b")?;
    b.commit(tx).await.check("commit")?;
    let s3 = inserted(record_committed(b, &results[2]).await?, "c")?;
    ensure!(s1 < s2 && s2 < s3, "seqs must increase: {s1}, {s2}, {s3}");

    let mut tx = b.begin().await.check("begin")?;
    let rows = b.pending(&mut tx, id).await.check("pending")?;
    drop(tx);
    let got: Vec<(i64, &NewStepResult)> = rows.iter().map(|r| (r.seq, &r.result)).collect();
    ensure_eq!(
        got,
        vec![(s1, &results[0]), (s2, &results[1]), (s3, &results[2])],
        "pending returns every result as recorded, with the seqs record returned"
    );
    let now = Utc::now();
    for row in &rows {
        ensure!(
            (row.inserted_at - now).abs() < TimeDelta::hours(1),
            "inserted_at {} is not the time of recording (now is {now})",
            row.inserted_at
        );
    }
    Ok(())
}

/// Conformance case of `step_result_store`: a refused result keeps its reason and gives up its slot.
#[doc(hidden)]
pub async fn a_refused_result_keeps_its_reason_and_gives_up_its_slot<
    B: InstanceStore + StepResultStore,
>(
    b: &B,
) -> Result<(), String> {
    let id = new_instance(b, "order::1").await?;
    let bogus = completed(id, "a", 1);
    let seq = inserted(record_committed(b, &bogus).await?, "bogus")?;
    ensure!(
        b.is_recorded(id, &sid("a"), 1).await.check("is_recorded")?,
        "a live completion is recorded"
    );
    let mut tx = b.begin().await.check("begin")?;
    b.refuse(&mut tx, id, &[(seq, "not declared".to_owned())])
        .await
        .check("refuse")?;
    ensure_eq!(
        b.pending(&mut tx, id).await.check("pending in tx")?,
        Vec::new(),
        "a refused row is processed inside its unit of work"
    );
    b.commit(tx).await.check("commit")?;
    ensure_eq!(
        pending_of(b, id).await?,
        Vec::new(),
        "refused rows are processed"
    );
    let refused = b.refused(id).await.check("refused")?;
    ensure_eq!(
        refused,
        vec![Refused {
            seq,
            step: Some(sid("a")),
            activation: 1,
            kind: ResultKind::Completed,
            reason: "not declared".to_owned(),
        }],
        "the refusal is kept with its reason"
    );
    ensure!(
        !b.is_recorded(id, &sid("a"), 1).await.check("is_recorded")?,
        "a refused completion does not count as recorded"
    );
    // The slot is free: the valid result of the same activation records.
    let valid = inserted(record_committed(b, &bogus).await?, "valid")?;
    ensure!(valid > seq, "a new row");
    ensure_eq!(
        record_committed(b, &bogus).await?,
        Recorded::Duplicate,
        "the live row holds the slot again"
    );
    // Refusing an already processed row changes nothing.
    mark_committed(b, id, &[valid]).await?;
    let mut tx = b.begin().await.check("begin")?;
    b.refuse(&mut tx, id, &[(valid, "late".to_owned())])
        .await
        .check("refuse processed")?;
    b.commit(tx).await.check("commit")?;
    ensure_eq!(b.refused(id).await.check("refused")?.len(), 1, "unchanged");
    Ok(())
}

/// Conformance case of `step_result_store`: duplicates are detected per activation and kind.
#[doc(hidden)]
pub async fn duplicates_are_detected_per_activation_and_kind<B: InstanceStore + StepResultStore>(
    b: &B,
) -> Result<(), String> {
    let id = new_instance(b, "order::1").await?;
    let first = completed(id, "a", 1);
    let seq = inserted(record_committed(b, &first).await?, "first")?;
    let mut again = first.clone();
    // Same key, different payload: still the same row.
    again.payload = ResultPayload::Completed {
        event: EventName("other".to_owned()),
        output: json!(2),
        metadata: Map::new(),
    };
    ensure_eq!(
        record_committed(b, &again).await?,
        Recorded::Duplicate,
        "same (instance, step, activation, kind), unprocessed"
    );
    mark_committed(b, id, &[seq]).await?;
    ensure_eq!(
        record_committed(b, &first).await?,
        Recorded::Duplicate,
        "same key, processed"
    );
    ensure_eq!(
        pending_of(b, id).await?,
        Vec::new(),
        "a duplicate must not add a pending row"
    );

    // Different activation, kind or step: new rows.
    inserted(
        record_committed(b, &completed(id, "a", 2)).await?,
        "another activation",
    )?;
    inserted(
        record_committed(b, &result(id, "a", 1, ResultKind::Async)).await?,
        "another kind",
    )?;
    inserted(
        record_committed(b, &completed(id, "b", 1)).await?,
        "another step",
    )?;
    let other = new_instance(b, "order::2").await?;
    inserted(
        record_committed(b, &completed(other, "a", 1)).await?,
        "another instance",
    )?;

    // Twice in one unit of work.
    let mut tx = b.begin().await.check("begin")?;
    let timer = result(id, "w", 1, ResultKind::Timer);
    inserted(b.record(&mut tx, &timer).await.check("record")?, "timer")?;
    ensure_eq!(
        b.record(&mut tx, &timer).await.check("record again")?,
        Recorded::Duplicate,
        "twice in one unit of work"
    );
    b.commit(tx).await.check("commit")?;

    // Instance-level rows (no step) are deduplicated too.
    let cancel = NewStepResult {
        instance_id: id,
        step: None,
        activation: 0,
        payload: ResultPayload::Cancel { reason: None },
    };
    inserted(record_committed(b, &cancel).await?, "cancel")?;
    ensure_eq!(
        record_committed(b, &cancel).await?,
        Recorded::Duplicate,
        "instance-level row twice"
    );

    let pending = pending_of(b, id).await?;
    ensure_eq!(pending.len(), 5, "pending rows: {pending:?}");
    Ok(())
}

/// Conformance case of `step_result_store`: pending is in seq order and excludes processed.
#[doc(hidden)]
pub async fn pending_is_in_seq_order_and_excludes_processed<B: InstanceStore + StepResultStore>(
    b: &B,
) -> Result<(), String> {
    let a = new_instance(b, "order::1").await?;
    let other = new_instance(b, "order::2").await?;
    let (a1, b1, a2, a3) = (
        completed(a, "s1", 1),
        completed(other, "s1", 1),
        completed(a, "s2", 1),
        completed(a, "s3", 1),
    );
    let mut tx = b.begin().await.check("begin")?;
    let sa1 = inserted(b.record(&mut tx, &a1).await.check("record")?, "a1")?;
    let sb1 = inserted(b.record(&mut tx, &b1).await.check("record")?, "b1")?;
    let sa2 = inserted(b.record(&mut tx, &a2).await.check("record")?, "a2")?;
    b.commit(tx).await.check("commit")?;
    let sa3 = inserted(record_committed(b, &a3).await?, "a3")?;

    ensure_eq!(
        pending_of(b, a).await?,
        vec![(sa1, a1.clone()), (sa2, a2.clone()), (sa3, a3.clone())],
        "pending of the instance, in seq order"
    );
    ensure_eq!(
        pending_of(b, other).await?,
        vec![(sb1, b1.clone())],
        "pending of the other instance"
    );

    // Marks are visible in their own unit of work, and roll back.
    let mut tx = b.begin().await.check("begin")?;
    b.mark_processed(&mut tx, a, &[sa1, sa2])
        .await
        .check("mark")?;
    let rows = b.pending(&mut tx, a).await.check("pending")?;
    ensure_eq!(
        rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![sa3],
        "pending after marking, same unit of work"
    );
    drop(tx);
    ensure_eq!(
        pending_of(b, a).await?.len(),
        3,
        "a rolled-back mark must leave the results pending"
    );

    // A unit of work sees the results it recorded itself.
    let mut tx = b.begin().await.check("begin")?;
    let sa4 = inserted(
        b.record(&mut tx, &completed(a, "s4", 1))
            .await
            .check("record")?,
        "a4",
    )?;
    let rows = b.pending(&mut tx, a).await.check("pending")?;
    ensure_eq!(
        rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![sa1, sa2, sa3, sa4],
        "pending in the unit of work that recorded a4"
    );
    drop(tx);

    // A seq of another instance is not marked through this one.
    mark_committed(b, a, &[sa1, sb1]).await?;
    ensure_eq!(
        pending_of(b, a).await?,
        vec![(sa2, a2), (sa3, a3)],
        "pending after marking"
    );
    ensure_eq!(
        pending_of(b, other).await?,
        vec![(sb1, b1)],
        "another instance's result is not marked"
    );
    mark_committed(b, a, &[]).await?;
    Ok(())
}

/// Conformance case of `step_result_store`: is recorded counts completions markers and failures.
#[doc(hidden)]
pub async fn is_recorded_counts_completions_markers_and_failures<
    B: InstanceStore + StepResultStore,
>(
    b: &B,
) -> Result<(), String> {
    let id = new_instance(b, "order::1").await?;
    let mut tx = b.begin().await.check("begin")?;
    let kinds = [
        ("done", ResultKind::Completed),
        ("went_async", ResultKind::Async),
        ("failed", ResultKind::Failed),
        ("resumed", ResultKind::Resume),
        ("timed", ResultKind::Timer),
    ];
    for (step, kind) in kinds {
        b.record(&mut tx, &result(id, step, 1, kind))
            .await
            .check("record")?;
    }
    ensure!(
        !b.is_recorded(id, &sid("done"), 1)
            .await
            .check("is_recorded")?,
        "an uncommitted completion must not count"
    );
    b.commit(tx).await.check("commit")?;
    for (step, kind) in kinds {
        let expected = matches!(
            kind,
            ResultKind::Completed | ResultKind::Async | ResultKind::Failed
        );
        let got = b
            .is_recorded(id, &sid(step), 1)
            .await
            .check("is_recorded")?;
        ensure_eq!(got, expected, "is_recorded after a {} row", kind.as_str());
    }
    ensure!(
        !b.is_recorded(id, &sid("done"), 2)
            .await
            .check("is_recorded")?,
        "another activation"
    );
    ensure!(
        !b.is_recorded(id, &sid("never"), 1)
            .await
            .check("is_recorded")?,
        "a step without rows"
    );
    ensure!(
        !b.is_recorded(one_id(), &sid("done"), 1)
            .await
            .check("is_recorded")?,
        "another instance"
    );

    // An instance-level failure does not mark any step.
    let other = new_instance(b, "order::2").await?;
    record_committed(
        b,
        &NewStepResult {
            instance_id: other,
            step: None,
            activation: 0,
            payload: result(other, "x", 0, ResultKind::Failed).payload,
        },
    )
    .await?;
    ensure!(
        !b.is_recorded(other, &sid("x"), 0)
            .await
            .check("is_recorded")?,
        "instance-level failure"
    );

    // Processed rows still count.
    let seqs: Vec<i64> = pending_of(b, id)
        .await?
        .into_iter()
        .map(|(seq, _)| seq)
        .collect();
    mark_committed(b, id, &seqs).await?;
    ensure!(
        b.is_recorded(id, &sid("done"), 1)
            .await
            .check("is_recorded")?,
        "a processed completion still counts"
    );
    Ok(())
}

/// Conformance case of `step_result_store`: result for missing instance is not found.
#[doc(hidden)]
pub async fn result_for_missing_instance_is_not_found<B: InstanceStore + StepResultStore>(
    b: &B,
) -> Result<(), String> {
    let ghost = one_id();
    let mut tx = b.begin().await.check("begin")?;
    let outcome = match b.record(&mut tx, &completed(ghost, "a", 1)).await {
        Ok(_) => b.commit(tx).await,
        Err(e) => Err(e),
    };
    ensure!(
        matches!(outcome, Err(PortError::NotFound(_))),
        "a result for a missing instance: expected NotFound, got {outcome:?}"
    );
    ensure!(
        !b.is_recorded(ghost, &sid("a"), 1)
            .await
            .check("is_recorded")?,
        "nothing recorded"
    );

    // An instance inserted earlier in the same unit of work exists.
    let fresh = one_id();
    let mut tx = b.begin().await.check("begin")?;
    b.insert(&mut tx, &active(fresh, "order::1"))
        .await
        .check("insert")?;
    inserted(
        b.record(&mut tx, &completed(fresh, "a", 1))
            .await
            .check("record")?,
        "same unit of work",
    )?;
    b.commit(tx).await.check("commit")?;
    ensure_eq!(
        pending_of(b, fresh).await?.len(),
        1,
        "the result recorded with its instance"
    );
    Ok(())
}

/// Conformance case of `step_result_store`: concurrent records all arrive.
#[doc(hidden)]
pub async fn concurrent_records_all_arrive<B: InstanceStore + StepResultStore>(
    b: &B,
) -> Result<(), String> {
    let id = new_instance(b, "order::1").await?;
    let begun = AtomicUsize::new(0);
    let begun = &begun;
    let futures: Vec<BoxFuture<'_, Result<i64, String>>> = (0..CONCURRENCY)
        .map(|n| {
            Box::pin(async move {
                let mut tx = b.begin().await.check("begin")?;
                begun.fetch_add(1, Ordering::SeqCst);
                yield_until(|| begun.load(Ordering::SeqCst) == CONCURRENCY).await;
                let step = format!("step{n}");
                let seq = inserted(
                    b.record(&mut tx, &completed(id, &step, 1))
                        .await
                        .check("record")?,
                    &step,
                )?;
                b.commit(tx).await.check("commit")?;
                Ok(seq)
            }) as BoxFuture<'_, _>
        })
        .collect();
    let mut returned = Vec::new();
    for outcome in join_all(futures).await {
        returned.push(outcome?);
    }
    let pending = pending_of(b, id).await?;
    let seqs: Vec<i64> = pending.iter().map(|(seq, _)| *seq).collect();
    ensure!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "pending must be in strictly increasing seq order: {seqs:?}"
    );
    returned.sort_unstable();
    ensure_eq!(
        seqs,
        returned,
        "every committed result is pending, with the seq record returned"
    );
    let steps: BTreeSet<String> = pending
        .iter()
        .filter_map(|(_, r)| r.step.as_ref().map(|s| s.as_str().to_owned()))
        .collect();
    ensure_eq!(steps.len(), CONCURRENCY, "one result per step");
    Ok(())
}

/// Conformance case of `step_result_store`: concurrent duplicates are stored once.
#[doc(hidden)]
pub async fn concurrent_duplicates_are_stored_once<B: InstanceStore + StepResultStore>(
    b: &B,
) -> Result<(), String> {
    let id = new_instance(b, "order::1").await?;
    let begun = AtomicUsize::new(0);
    let begun = &begun;
    let futures: Vec<BoxFuture<'_, Result<Recorded, String>>> = (0..CONCURRENCY)
        .map(|_| {
            Box::pin(async move {
                let mut tx = b.begin().await.check("begin")?;
                begun.fetch_add(1, Ordering::SeqCst);
                yield_until(|| begun.load(Ordering::SeqCst) == CONCURRENCY).await;
                let recorded = b
                    .record(&mut tx, &completed(id, "a", 1))
                    .await
                    .check("record")?;
                b.commit(tx).await.check("commit")?;
                Ok(recorded)
            }) as BoxFuture<'_, _>
        })
        .collect();
    let mut new_rows = 0;
    for outcome in join_all(futures).await {
        if matches!(outcome?, Recorded::Inserted(_)) {
            new_rows += 1;
        }
    }
    ensure!(
        new_rows >= 1,
        "at least one concurrent record must report a new row"
    );
    ensure_eq!(
        pending_of(b, id).await?.len(),
        1,
        "the result is stored once"
    );
    Ok(())
}

/// Conformance case of `step_result_store`: dropped unit of work drops results.
#[doc(hidden)]
pub async fn dropped_unit_of_work_drops_results<B: InstanceStore + StepResultStore>(
    b: &B,
) -> Result<(), String> {
    let id = new_instance(b, "order::1").await?;
    let mut tx = b.begin().await.check("begin")?;
    inserted(
        b.record(&mut tx, &completed(id, "a", 1))
            .await
            .check("record")?,
        "a",
    )?;
    drop(tx);
    ensure_eq!(
        pending_of(b, id).await?,
        Vec::new(),
        "a rolled-back result is not pending"
    );
    ensure!(
        !b.is_recorded(id, &sid("a"), 1).await.check("is_recorded")?,
        "a rolled-back result is not recorded"
    );
    inserted(
        record_committed(b, &completed(id, "a", 1)).await?,
        "after the rollback",
    )?;
    Ok(())
}

/// Conformance case of `step_result_store`: prune deletes only old processed results.
#[doc(hidden)]
pub async fn prune_deletes_only_old_processed_results<B: InstanceStore + StepResultStore>(
    b: &B,
) -> Result<(), String> {
    let id = new_instance(b, "order::1").await?;
    let mut seqs = Vec::new();
    for step in ["a", "b", "c"] {
        seqs.push(inserted(
            record_committed(b, &completed(id, step, 1)).await?,
            step,
        )?);
    }
    mark_committed(b, id, &seqs[..2]).await?;
    ensure_eq!(
        b.prune_processed(now_micros() - TimeDelta::hours(1))
            .await
            .check("prune")?,
        0,
        "nothing was processed an hour ago"
    );
    ensure_eq!(
        b.prune_processed(now_micros() + TimeDelta::hours(1))
            .await
            .check("prune")?,
        2,
        "both processed results"
    );
    ensure_eq!(
        b.prune_processed(now_micros() + TimeDelta::hours(1))
            .await
            .check("prune")?,
        0,
        "pruning again"
    );
    ensure_eq!(
        pending_of(b, id).await?,
        vec![(seqs[2], completed(id, "c", 1))],
        "the unprocessed result is kept"
    );
    Ok(())
}

/// Conformance case of `step_result_store`: nul characters in results are rejected.
#[doc(hidden)]
pub async fn nul_characters_in_results_are_rejected<B: InstanceStore + StepResultStore>(
    b: &B,
) -> Result<(), String> {
    let id = new_instance(b, "order::1").await?;
    let bad = NewStepResult {
        instance_id: id,
        step: Some(sid("a")),
        activation: 1,
        payload: ResultPayload::Completed {
            event: EventName("done".to_owned()),
            output: json!({"x": "\u{0}"}),
            metadata: Map::new(),
        },
    };
    let mut tx = b.begin().await.check("begin")?;
    let outcome = match b.record(&mut tx, &bad).await {
        Ok(_) => b.commit(tx).await,
        Err(e) => Err(e),
    };
    ensure!(
        matches!(outcome, Err(PortError::InvalidInput(_))),
        "a result with U+0000: expected InvalidInput, got {outcome:?}"
    );
    ensure_eq!(pending_of(b, id).await?, Vec::new(), "nothing stored");
    Ok(())
}

// ---------------------------------------------------------------------------
// JobQueue
// ---------------------------------------------------------------------------

/// Runs the [`JobQueue`] suite; `make` returns a fresh, empty backend.
pub async fn job_queue<B, F, Fut>(make: F) -> Report
where
    B: JobQueue,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let mut report = Report::new("job_queue");
    crate::__conformance_cases!(job_queue, __conformance_report { report, make });
    report
}

fn new_job(queue: &str, args: Value) -> NewJob {
    NewJob::new("test_job", queue, args)
}

async fn enqueue_committed<B: JobQueue>(b: &B, jobs: &[NewJob]) -> Result<Vec<Enqueued>, String> {
    let mut tx = b.begin().await.check("begin")?;
    let out = b.enqueue(&mut tx, jobs).await.check("enqueue")?;
    b.commit(tx).await.check("commit")?;
    ensure_eq!(out.len(), jobs.len(), "one outcome per job");
    Ok(out)
}

async fn enqueue_one<B: JobQueue>(b: &B, job: NewJob) -> Result<JobId, String> {
    match enqueue_committed(b, &[job]).await?.as_slice() {
        [Enqueued::Inserted(id)] => Ok(*id),
        other => Err(format!("expected one inserted job, got {other:?}")),
    }
}

async fn job_info<B: JobQueue>(b: &B, id: JobId) -> Result<JobInfo, String> {
    b.job(id)
        .await
        .check("job")?
        .ok_or_else(|| format!("job {id} not found"))
}

async fn fetch_one<B: JobQueue>(
    b: &B,
    queue: &str,
    now: DateTime<Utc>,
) -> Result<JobLease, String> {
    let mut leases = b.fetch(queue, 1, now).await.check("fetch")?;
    match (leases.pop(), leases.is_empty()) {
        (Some(lease), true) => Ok(lease),
        (lease, _) => Err(format!(
            "expected one lease from {queue}, got {lease:?} and {leases:?}"
        )),
    }
}

fn lease_ids(leases: &[JobLease]) -> BTreeSet<JobId> {
    leases.iter().map(|l| l.id).collect()
}

async fn commit_fenced<B, Fut>(b: &B, op: impl FnOnce(B::Tx) -> Fut) -> Result<bool, String>
where
    B: JobQueue,
    Fut: Future<Output = (B::Tx, Result<bool, PortError>)>,
{
    let tx = b.begin().await.check("begin")?;
    let (tx, held) = op(tx).await;
    let held = held.check("fenced update")?;
    b.commit(tx).await.check("commit")?;
    Ok(held)
}

async fn complete_committed<B: JobQueue>(b: &B, lease: &JobLease) -> Result<bool, String> {
    commit_fenced(b, |mut tx| async move {
        let held = b.complete(&mut tx, lease).await;
        (tx, held)
    })
    .await
}

/// Conformance case of `job_queue`: enqueue fetch complete.
#[doc(hidden)]
pub async fn enqueue_fetch_complete<B: JobQueue>(b: &B) -> Result<(), String> {
    let mut job = new_job(
        "default",
        json!({"instance": "x", "n": 1, "ü": [true, null]}),
    );
    job.meta.insert("workflow".to_owned(), json!("orders@1"));
    job.tags = vec!["advance".to_owned()];
    job.priority = 3;
    job.max_attempts = 7;
    let mut tx = b.begin().await.check("begin")?;
    let out = b
        .enqueue(&mut tx, std::slice::from_ref(&job))
        .await
        .check("enqueue")?;
    let [Enqueued::Inserted(id)] = out.as_slice() else {
        return Err(format!("expected one inserted job, got {out:?}"));
    };
    let id = *id;
    ensure_eq!(
        b.fetch("default", 10, far_future()).await.check("fetch")?,
        Vec::new(),
        "an uncommitted job must not be fetched"
    );
    ensure_eq!(
        b.job(id).await.check("job")?,
        None,
        "an uncommitted job must not be visible"
    );
    b.commit(tx).await.check("commit")?;

    let info = job_info(b, id).await?;
    ensure_eq!(
        (
            info.state,
            info.attempt,
            &info.kind,
            &info.queue,
            &info.args,
            info.errors.len()
        ),
        (JobState::Available, 0, &job.kind, &job.queue, &job.args, 0),
        "the enqueued job"
    );
    ensure_eq!(
        b.fetch("elsewhere", 10, soon()).await.check("fetch")?,
        Vec::new(),
        "another queue"
    );
    let lease = fetch_one(b, "default", soon()).await?;
    ensure_eq!(
        (
            lease.id,
            &lease.kind,
            &lease.queue,
            &lease.args,
            &lease.meta,
            lease.attempt,
            lease.max_attempts,
            lease.errors.len()
        ),
        (id, &job.kind, &job.queue, &job.args, &job.meta, 1, 7, 0),
        "the lease"
    );
    let info = job_info(b, id).await?;
    ensure_eq!(
        (info.state, info.attempt),
        (JobState::Executing, 1),
        "a fetched job"
    );
    ensure_eq!(
        b.fetch("default", 10, far_future()).await.check("fetch")?,
        Vec::new(),
        "an executing job is not fetched again"
    );
    ensure_eq!(
        b.live_jobs(&JobMatch::args(json!({"instance": "x"})))
            .await
            .check("live_jobs")?
            .len(),
        1,
        "the executing job is live"
    );

    let mut tx = b.begin().await.check("begin")?;
    ensure!(
        b.complete(&mut tx, &lease).await.check("complete")?,
        "completing the current lease"
    );
    ensure_eq!(
        job_info(b, id).await?.state,
        JobState::Executing,
        "not completed before commit"
    );
    b.commit(tx).await.check("commit")?;
    ensure_eq!(
        job_info(b, id).await?.state,
        JobState::Completed,
        "completed after commit"
    );
    ensure!(
        !complete_committed(b, &lease).await?,
        "completing twice must fail the fence"
    );
    ensure_eq!(
        b.live_jobs(&JobMatch::args(json!({"instance": "x"})))
            .await
            .check("live_jobs")?,
        Vec::new(),
        "a completed job is not live"
    );
    ensure_eq!(
        b.fetch("default", 10, far_future()).await.check("fetch")?,
        Vec::new(),
        "a completed job is not fetched"
    );
    Ok(())
}

/// Conformance case of `job_queue`: scheduled jobs wait until due.
#[doc(hidden)]
pub async fn scheduled_jobs_wait_until_due<B: JobQueue>(b: &B) -> Result<(), String> {
    let due_at = now_micros() + TimeDelta::hours(1);
    let mut later = new_job("q", json!({"n": "later"}));
    later.scheduled_at = Some(due_at);
    let mut earlier = new_job("q", json!({"n": "earlier"}));
    earlier.scheduled_at = Some(now_micros() - TimeDelta::hours(1));
    let later_id = enqueue_one(b, later).await?;
    let earlier_id = enqueue_one(b, earlier).await?;
    let info = job_info(b, later_id).await?;
    ensure_eq!(
        (info.state, info.scheduled_at),
        (JobState::Scheduled, due_at),
        "a future job is scheduled"
    );
    ensure_eq!(
        job_info(b, earlier_id).await?.state,
        JobState::Available,
        "a past job is available"
    );

    let leases = b.fetch("q", 10, soon()).await.check("fetch")?;
    ensure_eq!(
        lease_ids(&leases),
        BTreeSet::from([earlier_id]),
        "only the due job"
    );
    ensure_eq!(
        b.fetch("q", 10, due_at - TimeDelta::seconds(1))
            .await
            .check("fetch")?,
        Vec::new(),
        "one second early"
    );
    let lease = fetch_one(b, "q", due_at).await?;
    ensure_eq!(
        (lease.id, lease.scheduled_at),
        (later_id, due_at),
        "due exactly at its time"
    );
    Ok(())
}

/// Conformance case of `job_queue`: fetch orders by priority then time then id.
#[doc(hidden)]
pub async fn fetch_orders_by_priority_then_time_then_id<B: JobQueue>(b: &B) -> Result<(), String> {
    let base = now_micros() - TimeDelta::hours(1);
    let spec: [(&str, i16, Option<DateTime<Utc>>); 6] = [
        ("a", 2, Some(base + secs(1))),
        ("b", 1, Some(base + secs(3))),
        ("c", 1, Some(base + secs(2))),
        ("d", 0, Some(base + secs(5))),
        ("e", 1, Some(base + secs(2))),
        ("f", -1, None),
    ];
    let jobs: Vec<NewJob> = spec
        .iter()
        .map(|(name, priority, at)| {
            let mut job = new_job("q", json!({"name": name}));
            job.priority = *priority;
            job.scheduled_at = *at;
            job
        })
        .collect();
    let ids: Vec<JobId> = enqueue_committed(b, &jobs)
        .await?
        .into_iter()
        .map(Enqueued::id)
        .collect();
    ensure!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids of one enqueue must increase: {ids:?}"
    );
    let mut order = Vec::new();
    for _ in 0..spec.len() {
        let lease = fetch_one(b, "q", soon()).await?;
        order.push(lease.args["name"].as_str().unwrap_or("?").to_owned());
    }
    ensure_eq!(
        order,
        vec!["f", "d", "c", "e", "b", "a"],
        "fetch order: priority, then due time, then id"
    );
    Ok(())
}

/// Conformance case of `job_queue`: fetch honours limit and queue.
#[doc(hidden)]
pub async fn fetch_honours_limit_and_queue<B: JobQueue>(b: &B) -> Result<(), String> {
    let jobs: Vec<NewJob> = (0..5).map(|n| new_job("q", json!({"n": n}))).collect();
    let ids: Vec<JobId> = enqueue_committed(b, &jobs)
        .await?
        .into_iter()
        .map(Enqueued::id)
        .collect();
    enqueue_committed(b, &[new_job("other", json!({}))]).await?;
    ensure_eq!(
        b.fetch("q", 0, soon()).await.check("fetch")?,
        Vec::new(),
        "limit 0"
    );
    let first = b.fetch("q", 3, soon()).await.check("fetch")?;
    ensure_eq!(
        lease_ids(&first),
        ids[..3].iter().copied().collect::<BTreeSet<_>>(),
        "the three oldest"
    );
    let second = b.fetch("q", 3, soon()).await.check("fetch")?;
    ensure_eq!(
        lease_ids(&second),
        ids[3..].iter().copied().collect::<BTreeSet<_>>(),
        "the remaining two"
    );
    ensure_eq!(
        b.fetch("q", 3, soon()).await.check("fetch")?,
        Vec::new(),
        "nothing left in the queue"
    );
    ensure_eq!(
        b.fetch("other", 3, soon()).await.check("fetch")?.len(),
        1,
        "the other queue's job"
    );
    Ok(())
}

/// A unique enqueue that merges into a waiting holder carries work the
/// holder's run must see (the runner's "advance this instance" after a
/// step result). If a worker claims the holder before the merging unit of
/// work commits, it may run without seeing that work: a backend must then
/// either keep the holder from being claimed until the commit (PostgreSQL
/// locks it) or enqueue the merged job at commit (memory). Either way, a
/// job with the key is claimed after the commit.
/// Conformance case of `job_queue`: a merged unique job is not lost to a claim before commit.
#[doc(hidden)]
pub async fn a_merged_unique_job_is_not_lost_to_a_claim_before_commit<B: JobQueue>(
    b: &B,
) -> Result<(), String> {
    let job = {
        let mut job = new_job("merge", json!({"instance": "m1"}));
        job.unique = Some(UniqueJob {
            key: "merge:m1".to_owned(),
            states: vec![
                JobState::Available,
                JobState::Scheduled,
                JobState::Retryable,
            ],
        });
        job
    };
    let holder = enqueue_one(b, job.clone()).await?;
    let mut tx = b.begin().await.check("begin")?;
    ensure_eq!(
        b.enqueue(&mut tx, std::slice::from_ref(&job))
            .await
            .check("enqueue")?,
        vec![Enqueued::Existing(holder)],
        "merged into the waiting holder"
    );
    // A worker fetches before the merging unit of work commits.
    let early = b.fetch("merge", 10, soon()).await.check("fetch")?;
    b.commit(tx).await.check("commit")?;
    let late = b.fetch("merge", 10, soon()).await.check("fetch")?;
    match (early.as_slice(), late.as_slice()) {
        // The holder was kept from the early fetch: it is claimed now.
        ([], [lease]) => ensure_eq!(lease.id, holder, "the holder, after the commit"),
        // The holder was claimed early: the merged job was enqueued at commit.
        ([claimed], [lease]) => {
            ensure_eq!(claimed.id, holder, "the early claim took the holder");
            ensure!(lease.id != holder, "a new job, enqueued at commit");
            ensure_eq!(
                lease.args.clone(),
                json!({"instance": "m1"}),
                "the merged job"
            );
        }
        _ => {
            return Err(format!(
                "expected the key's work to be claimed after the commit; early {early:?}, late {late:?}"
            ));
        }
    }
    // Nothing else is left: the merge produced at most one extra job.
    ensure_eq!(
        b.fetch("merge", 10, far_future()).await.check("fetch")?,
        Vec::new(),
        "no further job"
    );
    Ok(())
}

/// Conformance case of `job_queue`: unique jobs return the existing job.
#[doc(hidden)]
pub async fn unique_jobs_return_the_existing_job<B: JobQueue>(b: &B) -> Result<(), String> {
    let live = vec![
        JobState::Available,
        JobState::Scheduled,
        JobState::Executing,
        JobState::Retryable,
    ];
    let unique_job = |queue: &str, key: &str, states: &[JobState]| {
        let mut job = new_job(queue, json!({"key": key}));
        job.unique = Some(UniqueJob {
            key: key.to_owned(),
            states: states.to_vec(),
        });
        job
    };
    let k1 = unique_job("q1", "k1", &live);
    let mut tx = b.begin().await.check("begin")?;
    let out = b
        .enqueue(
            &mut tx,
            &[k1.clone(), k1.clone(), unique_job("q2", "k2", &live)],
        )
        .await
        .check("enqueue")?;
    let [
        Enqueued::Inserted(first),
        Enqueued::Existing(again),
        Enqueued::Inserted(other),
    ] = out.as_slice()
    else {
        return Err(format!(
            "expected [Inserted(a), Existing(a), Inserted(b)], got {out:?}"
        ));
    };
    let (first, other) = (*first, *other);
    ensure_eq!(*again, first, "the duplicate in one call returns the first");
    ensure_eq!(
        b.enqueue(&mut tx, std::slice::from_ref(&k1))
            .await
            .check("enqueue")?,
        vec![Enqueued::Existing(first)],
        "later in the same unit of work"
    );
    b.commit(tx).await.check("commit")?;
    ensure!(first != other, "different keys are different jobs");

    ensure_eq!(
        enqueue_committed(b, std::slice::from_ref(&k1)).await?,
        vec![Enqueued::Existing(first)],
        "after commit"
    );
    ensure_eq!(
        b.live_jobs(&JobMatch::args(json!({"key": "k1"})))
            .await
            .check("live_jobs")?
            .len(),
        1,
        "one job for the key"
    );
    let lease = fetch_one(b, "q1", soon()).await?;
    ensure_eq!(lease.id, first, "the unique job");
    ensure_eq!(
        enqueue_committed(b, std::slice::from_ref(&k1)).await?,
        vec![Enqueued::Existing(first)],
        "while it executes"
    );
    ensure!(complete_committed(b, &lease).await?, "complete");
    let out = enqueue_committed(b, std::slice::from_ref(&k1)).await?;
    let [Enqueued::Inserted(next)] = out.as_slice() else {
        return Err(format!(
            "a finished job must not block its key when finished states are not listed, got {out:?}"
        ));
    };
    ensure!(*next != first, "a new job after the first finished");

    // Finished states listed: a cancelled job still blocks its key.
    let k3 = unique_job("q3", "k3", &JobState::ALL);
    let id3 = enqueue_one(b, k3.clone()).await?;
    let mut tx = b.begin().await.check("begin")?;
    ensure!(b.cancel(&mut tx, id3).await.check("cancel")?, "cancel");
    b.commit(tx).await.check("commit")?;
    ensure_eq!(
        enqueue_committed(b, &[k3]).await?,
        vec![Enqueued::Existing(id3)],
        "unique among every state"
    );

    // A rolled-back unique job does not block its key.
    let k4 = unique_job("q4", "k4", &live);
    let mut tx = b.begin().await.check("begin")?;
    b.enqueue(&mut tx, std::slice::from_ref(&k4))
        .await
        .check("enqueue")?;
    drop(tx);
    enqueue_one(b, k4).await?;
    Ok(())
}

/// Conformance case of `job_queue`: stale lease is fenced off.
#[doc(hidden)]
pub async fn stale_lease_is_fenced_off<B: JobQueue>(b: &B) -> Result<(), String> {
    let id = enqueue_one(b, new_job("q", json!({"n": 1}))).await?;
    let first = fetch_one(b, "q", soon()).await?;
    let first = &first;
    let now = now_micros();
    let retried = commit_fenced(b, |mut tx| async move {
        let held = b
            .retry(
                &mut tx,
                first,
                &StepError::retryable("flaky"),
                now - TimeDelta::seconds(1),
                now,
            )
            .await;
        (tx, held)
    })
    .await?;
    ensure!(retried, "retrying the current lease");
    let second = fetch_one(b, "q", soon()).await?;
    ensure_eq!(
        (second.id, second.attempt),
        (id, 2),
        "the retried job, second attempt"
    );

    ensure!(
        !complete_committed(b, first).await?,
        "a stale lease must not complete the job"
    );
    let stale_retry = commit_fenced(b, |mut tx| async move {
        let held = b
            .retry(&mut tx, first, &StepError::retryable("stale"), now, now)
            .await;
        (tx, held)
    })
    .await?;
    ensure!(!stale_retry, "a stale lease must not retry the job");
    let stale_discard = commit_fenced(b, |mut tx| async move {
        let held = b
            .discard(&mut tx, first, &StepError::fatal("stale"), now)
            .await;
        (tx, held)
    })
    .await?;
    ensure!(!stale_discard, "a stale lease must not discard the job");
    let info = job_info(b, id).await?;
    ensure_eq!(
        (info.state, info.attempt, info.errors.len()),
        (JobState::Executing, 2, 1),
        "unchanged by the stale lease"
    );

    ensure!(
        complete_committed(b, &second).await?,
        "the current lease completes"
    );
    ensure_eq!(
        job_info(b, id).await?.state,
        JobState::Completed,
        "completed"
    );
    Ok(())
}

/// Conformance case of `job_queue`: retry records the error and bumps the attempt.
#[doc(hidden)]
pub async fn retry_records_the_error_and_bumps_the_attempt<B: JobQueue>(
    b: &B,
) -> Result<(), String> {
    let id = enqueue_one(b, new_job("q", json!({"n": 1}))).await?;
    let lease = fetch_one(b, "q", soon()).await?;
    let now = now_micros();
    let retry_at = now + TimeDelta::hours(1);
    let error = StepError::retry_after("gateway «timeout»", Duration::from_millis(1_500))
        .with_details(json!({"code": 503}));
    let mut tx = b.begin().await.check("begin")?;
    ensure!(
        b.retry(&mut tx, &lease, &error, retry_at, now)
            .await
            .check("retry")?,
        "retrying the current lease"
    );
    ensure_eq!(
        job_info(b, id).await?.state,
        JobState::Executing,
        "not retried before commit"
    );
    b.commit(tx).await.check("commit")?;

    let record = AttemptRecord {
        attempt: 1,
        at: now,
        error: error.clone(),
    };
    let info = job_info(b, id).await?;
    ensure_eq!(
        (info.state, info.attempt, info.scheduled_at, &info.errors),
        (JobState::Retryable, 1, retry_at, &vec![record.clone()]),
        "a retried job"
    );
    ensure_eq!(
        b.fetch("q", 10, soon()).await.check("fetch")?,
        Vec::new(),
        "not due before retry_at"
    );
    let next = fetch_one(b, "q", retry_at).await?;
    ensure_eq!(
        (next.id, next.attempt, &next.errors),
        (id, 2, &vec![record]),
        "the next attempt carries the error"
    );
    Ok(())
}

/// Conformance case of `job_queue`: discard records the error and stops.
#[doc(hidden)]
pub async fn discard_records_the_error_and_stops<B: JobQueue>(b: &B) -> Result<(), String> {
    let id = enqueue_one(b, new_job("q", json!({"n": 1}))).await?;
    let lease = fetch_one(b, "q", soon()).await?;
    let now = now_micros();
    let error = StepError::fatal("bad input");
    let lease_ref = &lease;
    let error_ref = &error;
    let discarded = commit_fenced(b, |mut tx| async move {
        let held = b.discard(&mut tx, lease_ref, error_ref, now).await;
        (tx, held)
    })
    .await?;
    ensure!(discarded, "discarding the current lease");
    let info = job_info(b, id).await?;
    ensure_eq!(
        (info.state, &info.errors),
        (
            JobState::Discarded,
            &vec![AttemptRecord {
                attempt: 1,
                at: now,
                error,
            }]
        ),
        "a discarded job"
    );
    ensure_eq!(
        b.fetch("q", 10, far_future()).await.check("fetch")?,
        Vec::new(),
        "a discarded job is not fetched"
    );
    ensure!(
        !complete_committed(b, &lease).await?,
        "a discarded job cannot complete"
    );
    let mut tx = b.begin().await.check("begin")?;
    ensure!(
        !b.cancel(&mut tx, id).await.check("cancel")?,
        "a discarded job cannot be cancelled"
    );
    Ok(())
}

/// Conformance case of `job_queue`: cancel stops unfinished jobs.
#[doc(hidden)]
pub async fn cancel_stops_unfinished_jobs<B: JobQueue>(b: &B) -> Result<(), String> {
    let available = enqueue_one(b, new_job("a", json!({"n": "available"}))).await?;
    let executing = enqueue_one(b, new_job("e", json!({"n": "executing"}))).await?;
    let lease = fetch_one(b, "e", soon()).await?;
    let completed = enqueue_one(b, new_job("c", json!({"n": "completed"}))).await?;
    ensure!(
        complete_committed(b, &fetch_one(b, "c", soon()).await?).await?,
        "complete"
    );
    let mut later = new_job("s", json!({"n": "scheduled"}));
    later.scheduled_at = Some(now_micros() + TimeDelta::hours(1));
    let scheduled = enqueue_one(b, later).await?;

    let mut tx = b.begin().await.check("begin")?;
    for (id, expected, what) in [
        (available, true, "an available job"),
        (executing, true, "an executing job"),
        (completed, false, "a completed job"),
        (scheduled, true, "a scheduled job"),
        (JobId(i64::MAX), false, "a missing job"),
    ] {
        ensure_eq!(
            b.cancel(&mut tx, id).await.check("cancel")?,
            expected,
            "cancel {what}"
        );
    }
    ensure_eq!(
        job_info(b, available).await?.state,
        JobState::Available,
        "not cancelled before commit"
    );
    b.commit(tx).await.check("commit")?;
    for (id, expected) in [
        (available, JobState::Cancelled),
        (executing, JobState::Cancelled),
        (completed, JobState::Completed),
        (scheduled, JobState::Cancelled),
    ] {
        ensure_eq!(
            job_info(b, id).await?.state,
            expected,
            "job {id} after cancel"
        );
    }
    let mut tx = b.begin().await.check("begin")?;
    ensure!(
        !b.cancel(&mut tx, available).await.check("cancel")?,
        "cancelling twice"
    );
    drop(tx);
    ensure!(
        !complete_committed(b, &lease).await?,
        "a cancelled job cannot complete"
    );
    for queue in ["a", "e", "s"] {
        ensure_eq!(
            b.fetch(queue, 10, far_future()).await.check("fetch")?,
            Vec::new(),
            "a cancelled job is not fetched"
        );
    }

    // A rolled-back cancel leaves the job alone.
    let kept = enqueue_one(b, new_job("k", json!({}))).await?;
    let mut tx = b.begin().await.check("begin")?;
    ensure!(b.cancel(&mut tx, kept).await.check("cancel")?, "cancel");
    drop(tx);
    ensure_eq!(
        job_info(b, kept).await?.state,
        JobState::Available,
        "after a rolled-back cancel"
    );
    Ok(())
}

/// Conformance case of `job_queue`: cancel matching uses json containment.
#[doc(hidden)]
pub async fn cancel_matching_uses_json_containment<B: JobQueue>(b: &B) -> Result<(), String> {
    let j1 = enqueue_one(b, new_job("avail", json!({"instance": "i1", "step": "a"}))).await?;
    let j2 = enqueue_one(
        b,
        new_job(
            "exec",
            json!({"instance": "i1", "step": "b", "tags": ["x", "y"]}),
        ),
    )
    .await?;
    let lease2 = fetch_one(b, "exec", soon()).await?;
    let mut scheduled = new_job("avail", json!({"instance": "i1", "step": "c", "n": 1}));
    scheduled.scheduled_at = Some(now_micros() + TimeDelta::hours(1));
    let j3 = enqueue_one(b, scheduled).await?;
    let j4 = enqueue_one(b, new_job("done", json!({"instance": "i1", "step": "d"}))).await?;
    ensure!(
        complete_committed(b, &fetch_one(b, "done", soon()).await?).await?,
        "complete"
    );
    let j5 = enqueue_one(b, new_job("avail", json!({"instance": "i2", "step": "a"}))).await?;
    let j6 = enqueue_one(b, new_job("avail", json!({"instance": "i1", "step": "e"}))).await?;
    let j7 = enqueue_one(b, new_job("avail", json!({"nested": {"instance": "i1"}}))).await?;
    let j8 = enqueue_one(b, new_job("avail", json!({"instance": "i11"}))).await?;

    let live_ids = |jobs: Vec<JobInfo>| jobs.into_iter().map(|j| j.id).collect::<BTreeSet<_>>();
    ensure_eq!(
        live_ids(
            b.live_jobs(&JobMatch::args(json!({"instance": "i1"})))
                .await
                .check("live_jobs")?
        ),
        BTreeSet::from([j1, j2, j3, j6]),
        "live jobs of i1"
    );
    ensure_eq!(
        live_ids(
            b.live_jobs(&JobMatch::args(json!({"tags": ["y"]})))
                .await
                .check("live_jobs")?
        ),
        BTreeSet::from([j2]),
        "array containment"
    );
    ensure_eq!(
        live_ids(
            b.live_jobs(&JobMatch::args(
                json!({"instance": "i1", "step": "c", "n": 1})
            ))
            .await
            .check("live_jobs")?
        ),
        BTreeSet::from([j3]),
        "every key must match"
    );

    let mut tx = b.begin().await.check("begin")?;
    let cancelled = b
        .cancel_matching(
            &mut tx,
            &JobMatch::args(json!({"instance": "i1"})),
            Some(j6),
        )
        .await
        .check("cancel_matching")?;
    ensure_eq!(cancelled, 3, "unfinished jobs of i1 except j6");
    ensure_eq!(
        job_info(b, j1).await?.state,
        JobState::Available,
        "not cancelled before commit"
    );
    b.commit(tx).await.check("commit")?;
    for (id, expected) in [
        (j1, JobState::Cancelled),
        (j2, JobState::Cancelled),
        (j3, JobState::Cancelled),
        (j4, JobState::Completed),
        (j5, JobState::Available),
        (j6, JobState::Available),
        (j7, JobState::Available),
        (j8, JobState::Available),
    ] {
        ensure_eq!(
            job_info(b, id).await?.state,
            expected,
            "job {id} after cancel_matching"
        );
    }
    ensure_eq!(
        live_ids(
            b.live_jobs(&JobMatch::args(json!({"instance": "i1"})))
                .await
                .check("live_jobs")?
        ),
        BTreeSet::from([j6]),
        "live jobs of i1 after cancel_matching"
    );
    ensure!(
        !complete_committed(b, &lease2).await?,
        "a cancelled executing job cannot complete"
    );

    // Jobs enqueued earlier in the same unit of work are matched too.
    let mut tx = b.begin().await.check("begin")?;
    let out = b
        .enqueue(&mut tx, &[new_job("avail", json!({"instance": "i3"}))])
        .await
        .check("enqueue")?;
    let cancelled = b
        .cancel_matching(&mut tx, &JobMatch::args(json!({"instance": "i3"})), None)
        .await
        .check("cancel_matching")?;
    b.commit(tx).await.check("commit")?;
    ensure_eq!(cancelled, 1, "a job enqueued in the same unit of work");
    let id = out.first().map(|e| e.id()).ok_or("no enqueue outcome")?;
    ensure_eq!(
        job_info(b, id).await?.state,
        JobState::Cancelled,
        "enqueued then cancelled"
    );
    Ok(())
}

/// Conformance case of `job_queue`: cancel matching by group.
#[doc(hidden)]
pub async fn cancel_matching_by_group<B: JobQueue>(b: &B) -> Result<(), String> {
    let grouped = |queue: &str, group: &str, args: Value| new_job(queue, args).in_group(group);
    let g1 = enqueue_one(b, grouped("avail", "g1", json!({"step": "a"}))).await?;
    let g1_exec = enqueue_one(b, grouped("exec", "g1", json!({"step": "b"}))).await?;
    let lease = fetch_one(b, "exec", soon()).await?;
    ensure_eq!(lease.id, g1_exec, "the executing job of g1");
    let mut later = grouped("avail", "g1", json!({"step": "c", "timer": true}));
    later.scheduled_at = Some(now_micros() + TimeDelta::hours(1));
    let g1_timer = enqueue_one(b, later).await?;
    let g2 = enqueue_one(b, grouped("avail", "g2", json!({"step": "a"}))).await?;
    let g11 = enqueue_one(b, grouped("avail", "g11", json!({"step": "a"}))).await?;
    let ungrouped = enqueue_one(b, new_job("avail", json!({"step": "a"}))).await?;

    ensure_eq!(
        job_info(b, g1).await?.group.as_deref(),
        Some("g1"),
        "the group is reported"
    );
    ensure_eq!(job_info(b, ungrouped).await?.group, None, "no group");
    let live_ids = |jobs: Vec<JobInfo>| jobs.into_iter().map(|j| j.id).collect::<BTreeSet<_>>();
    ensure_eq!(
        live_ids(
            b.live_jobs(&JobMatch::group("g1"))
                .await
                .check("live_jobs")?
        ),
        BTreeSet::from([g1, g1_exec, g1_timer]),
        "live jobs of g1, executing included"
    );
    ensure_eq!(
        live_ids(
            b.live_jobs(&JobMatch::group("g1").with_args(json!({"timer": true})))
                .await
                .check("live_jobs")?
        ),
        BTreeSet::from([g1_timer]),
        "group and args together"
    );

    // Group and args narrow a cancel together.
    let mut tx = b.begin().await.check("begin")?;
    let cancelled = b
        .cancel_matching(
            &mut tx,
            &JobMatch::group("g1").with_args(json!({"timer": true})),
            None,
        )
        .await
        .check("cancel_matching")?;
    b.commit(tx).await.check("commit")?;
    ensure_eq!(cancelled, 1, "only the timer of g1");
    ensure_eq!(
        job_info(b, g1_timer).await?.state,
        JobState::Cancelled,
        "the timer"
    );

    let mut tx = b.begin().await.check("begin")?;
    let cancelled = b
        .cancel_matching(&mut tx, &JobMatch::group("g1"), Some(g1))
        .await
        .check("cancel_matching")?;
    b.commit(tx).await.check("commit")?;
    ensure_eq!(cancelled, 1, "the executing job of g1 (g1 itself excepted)");
    for (id, expected) in [
        (g1, JobState::Available),
        (g1_exec, JobState::Cancelled),
        (g2, JobState::Available),
        (g11, JobState::Available),
        (ungrouped, JobState::Available),
    ] {
        ensure_eq!(
            job_info(b, id).await?.state,
            expected,
            "job {id} after cancelling group g1"
        );
    }
    ensure!(
        !complete_committed(b, &lease).await?,
        "a cancelled executing job cannot complete"
    );
    Ok(())
}

/// Conformance case of `job_queue`: concurrent fetchers never share a job.
#[doc(hidden)]
pub async fn concurrent_fetchers_never_share_a_job<B: JobQueue>(b: &B) -> Result<(), String> {
    const JOBS: usize = 24;
    let jobs: Vec<NewJob> = (0..JOBS).map(|n| new_job("q", json!({"n": n}))).collect();
    let ids: BTreeSet<JobId> = enqueue_committed(b, &jobs)
        .await?
        .into_iter()
        .map(Enqueued::id)
        .collect();
    let at = soon();
    let futures: Vec<BoxFuture<'_, Result<Vec<JobId>, String>>> = (0..CONCURRENCY / 2)
        .map(|_| {
            Box::pin(async move {
                let mut mine = Vec::new();
                loop {
                    let leases = b.fetch("q", 2, at).await.check("fetch")?;
                    if leases.is_empty() {
                        return Ok(mine);
                    }
                    ensure!(leases.len() <= 2, "more leases than the limit");
                    for lease in leases {
                        ensure_eq!(lease.attempt, 1, "first attempt of job {}", lease.id);
                        mine.push(lease.id);
                    }
                    yield_now().await;
                }
            }) as BoxFuture<'_, _>
        })
        .collect();
    let mut all = Vec::new();
    for outcome in join_all(futures).await {
        all.extend(outcome?);
    }
    let unique: BTreeSet<JobId> = all.iter().copied().collect();
    ensure_eq!(unique.len(), all.len(), "a job was fetched twice: {all:?}");
    ensure_eq!(unique, ids, "every job is fetched once");
    Ok(())
}

/// Conformance case of `job_queue`: dropped unit of work enqueues nothing.
#[doc(hidden)]
pub async fn dropped_unit_of_work_enqueues_nothing<B: JobQueue>(b: &B) -> Result<(), String> {
    let mut tx = b.begin().await.check("begin")?;
    let out = b
        .enqueue(
            &mut tx,
            &[new_job("q", json!({"n": 1})), new_job("q", json!({"n": 2}))],
        )
        .await
        .check("enqueue")?;
    drop(tx);
    ensure_eq!(
        b.fetch("q", 10, far_future()).await.check("fetch")?,
        Vec::new(),
        "a rolled-back job is not fetched"
    );
    for outcome in out {
        ensure_eq!(
            b.job(outcome.id()).await.check("job")?,
            None,
            "a rolled-back job does not exist"
        );
    }
    ensure_eq!(
        b.live_jobs(&JobMatch::args(json!({})))
            .await
            .check("live_jobs")?,
        Vec::new(),
        "no live jobs"
    );
    Ok(())
}

/// Conformance case of `job_queue`: nul characters in jobs are rejected.
#[doc(hidden)]
pub async fn nul_characters_in_jobs_are_rejected<B: JobQueue>(b: &B) -> Result<(), String> {
    let mut tx = b.begin().await.check("begin")?;
    let outcome = match b
        .enqueue(
            &mut tx,
            &[
                new_job("q", json!({"ok": 1})),
                new_job("q", json!({"x": "\u{0}"})),
            ],
        )
        .await
    {
        Ok(out) => b.commit(tx).await.map(|()| out),
        Err(e) => Err(e),
    };
    ensure!(
        matches!(outcome, Err(PortError::InvalidInput(_))),
        "a job with U+0000: expected InvalidInput, got {outcome:?}"
    );
    ensure_eq!(
        b.fetch("q", 10, far_future()).await.check("fetch")?,
        Vec::new(),
        "nothing enqueued"
    );
    Ok(())
}

/// Conformance case of `job_queue`: job info reports what was enqueued.
#[doc(hidden)]
pub async fn job_info_reports_what_was_enqueued<B: JobQueue>(b: &B) -> Result<(), String> {
    let mut job = new_job("q", json!({"n": 1}));
    job.meta.insert("instance_id".into(), json!("abc"));
    job.tags = vec!["billing".into(), "eu".into()];
    job.priority = 3;
    job.max_attempts = 7;
    let id = enqueue_one(b, job).await?;
    let info = job_info(b, id).await?;
    ensure_eq!(
        (
            &info.kind,
            &info.queue,
            &info.args,
            info.priority,
            info.max_attempts,
            info.attempt
        ),
        (
            &"test_job".to_owned(),
            &"q".to_owned(),
            &json!({"n": 1}),
            3,
            7,
            0
        ),
        "job info fields"
    );
    ensure_eq!(
        info.meta.get("instance_id"),
        Some(&json!("abc")),
        "job meta"
    );
    ensure_eq!(
        info.tags,
        vec!["billing".to_owned(), "eu".to_owned()],
        "job tags"
    );
    ensure_eq!(info.state, JobState::Available, "a job due now");
    Ok(())
}

/// Conformance case of `job_queue`: prune removes only finished jobs.
#[doc(hidden)]
pub async fn prune_removes_only_finished_jobs<B: JobQueue>(b: &B) -> Result<(), String> {
    let done = enqueue_one(b, new_job("q", json!({"n": 1}))).await?;
    let live = enqueue_one(b, new_job("other", json!({"n": 2}))).await?;
    let lease = fetch_one(b, "q", soon()).await?;
    ensure!(complete_committed(b, &lease).await?, "completing the lease");
    ensure_eq!(
        b.prune_finished(now_micros() - chrono::Duration::hours(1))
            .await
            .check("prune")?,
        0,
        "nothing finished an hour ago"
    );
    ensure_eq!(
        b.prune_finished(far_future()).await.check("prune")?,
        1,
        "the completed job is pruned"
    );
    ensure!(
        b.job(done).await.check("job")?.is_none(),
        "the pruned job is gone"
    );
    ensure!(
        b.job(live).await.check("job")?.is_some(),
        "a live job is kept"
    );
    Ok(())
}

/// Conformance case of `job_queue`: heartbeats keep a job fresh and silence makes it stale.
#[doc(hidden)]
pub async fn heartbeats_keep_a_job_fresh_and_silence_makes_it_stale<B: JobQueue>(
    b: &B,
) -> Result<(), String> {
    let id = enqueue_one(b, new_job("q", json!({"n": 1}))).await?;
    let fetched_at = soon();
    let lease = fetch_one(b, "q", fetched_at).await?;
    ensure_eq!(
        b.stale(fetched_at, 10).await.check("stale")?,
        Vec::new(),
        "a job fetched at the cut-off is not stale"
    );
    let later = fetched_at + chrono::Duration::hours(2);
    let stale = b.stale(later, 10).await.check("stale")?;
    ensure_eq!(
        stale.iter().map(|l| (l.id, l.attempt)).collect::<Vec<_>>(),
        vec![(id, 1)],
        "a silent job is stale"
    );
    ensure_eq!(
        b.heartbeat(&[(id, lease.attempt), (id, lease.attempt + 1)])
            .await
            .check("heartbeat")?,
        vec![id],
        "only the held lease beats"
    );
    ensure_eq!(
        b.stale(now_micros() - chrono::Duration::minutes(1), 10)
            .await
            .check("stale")?,
        Vec::new(),
        "a heartbeat makes it fresh again"
    );
    ensure!(complete_committed(b, &lease).await?, "completing");
    ensure_eq!(
        b.stale(far_future(), 10).await.check("stale")?,
        Vec::new(),
        "finished jobs are never stale"
    );
    ensure_eq!(
        b.heartbeat(&[(id, lease.attempt)])
            .await
            .check("heartbeat")?,
        Vec::new(),
        "a finished job's lease no longer holds"
    );
    Ok(())
}
