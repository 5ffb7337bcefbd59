//! The worker runtime against PostgreSQL: LISTEN/NOTIFY and poll-only
//! delivery, two runtimes sharing a queue, cancel while executing, graceful
//! shutdown with a grace period, heartbeat loss and rescue, fencing of a
//! stalled worker, panics, leader election. Tests await job events; time
//! limits are safety nets only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hephaestus_engine_core::ports::{Enqueued, JobId, JobState, NewJob};
use hephaestus_queue_pg::{
    JobContext, JobError, JobEvent, JobEventKind, QueueRuntime, RuntimeBuilder, Worker, Workers,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast};

use super::{QueueDb, SAFETY_NET, wait_for_event};
use crate::support::wait;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    Ok,
    /// Returns once told to stop.
    WaitForCancel,
    /// Never returns, whatever it is told.
    Hang,
    /// Returns once the test opens the gate.
    Gate,
    /// Waits for the gate on attempt 1, completes at once afterwards.
    GateFirstAttempt,
    Panic,
    /// Fails attempt 1 with a retry 200 ms later, completes afterwards.
    RetrySoonOnce,
    /// Snoozes attempt 1 for 200 ms, completes afterwards.
    SnoozeSoonOnce,
}

#[derive(Default)]
struct ProbeState {
    runs: Mutex<HashMap<JobId, usize>>,
    gate: Notify,
    saw_cancel: Mutex<Vec<JobId>>,
}

#[derive(Clone, Default)]
struct Probe(Arc<ProbeState>);

impl Probe {
    fn runs(&self, id: JobId) -> usize {
        self.0.runs.lock().unwrap().get(&id).copied().unwrap_or(0)
    }

    fn open_gate(&self) {
        self.0.gate.notify_waiters();
    }
}

#[async_trait::async_trait]
impl Worker for Probe {
    const KIND: &'static str = "probe";
    const QUEUE: &'static str = "q";
    type Args = Mode;

    async fn perform(&self, job: &JobContext, mode: Mode) -> Result<(), JobError> {
        *self.0.runs.lock().unwrap().entry(job.id()).or_default() += 1;
        match mode {
            Mode::RetrySoonOnce if job.attempt() == 1 => {
                return Err(JobError::retry_after(
                    "first attempt fails",
                    Duration::from_millis(200),
                ));
            }
            Mode::SnoozeSoonOnce if job.attempt() == 1 => {
                return Err(JobError::snooze(Duration::from_millis(200)));
            }
            Mode::Ok | Mode::RetrySoonOnce | Mode::SnoozeSoonOnce => {}
            Mode::WaitForCancel => {
                job.cancelled().await;
                self.0.saw_cancel.lock().unwrap().push(job.id());
            }
            Mode::Hang => std::future::pending::<()>().await,
            Mode::Gate => self.0.gate.notified().await,
            Mode::GateFirstAttempt => {
                if job.attempt() == 1 {
                    self.0.gate.notified().await;
                }
            }
            Mode::Panic => panic!("probe panicked"),
        }
        Ok(())
    }
}

fn probe_job(mode: Mode) -> NewJob {
    Probe::new_job(&mode).unwrap()
}

fn runtime(db: &QueueDb, probe: &Probe) -> RuntimeBuilder {
    runtime_with(db, probe, 8)
}

fn runtime_with(db: &QueueDb, probe: &Probe, concurrency: usize) -> RuntimeBuilder {
    QueueRuntime::builder(db.queue.clone(), Workers::new().register(probe.clone()))
        .queue("q", concurrency)
}

async fn wait_for(
    events: &mut broadcast::Receiver<JobEvent>,
    id: JobId,
    kind: &JobEventKind,
) -> JobEvent {
    let what = format!("{} of job {id}", kind.name());
    wait_for_event(events, &what, |e| {
        e.job == id && std::mem::discriminant(&e.kind) == std::mem::discriminant(kind)
    })
    .await
}

#[tokio::test]
async fn listen_notify_delivers_without_polling() {
    let db = QueueDb::new().await;
    let probe = Probe::default();
    // Polling once an hour: only the notification can deliver the job.
    let rt = runtime(&db, &probe)
        .poll_interval(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    let mut events = rt.subscribe();
    let id = db.queue.insert(&probe_job(Mode::Ok)).await.unwrap().id();
    let started = wait_for(&mut events, id, &JobEventKind::Started).await;
    assert_eq!((started.attempt, started.queue.as_str()), (1, "q"));
    let done = wait_for(&mut events, id, &JobEventKind::Completed).await;
    assert!(done.run_time.is_some());
    let job = db.queue.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(job.attempted_by.as_deref(), Some(rt.worker_id()));
    assert_eq!(probe.runs(id), 1);
    let report = rt.shutdown(Duration::from_secs(5)).await;
    assert!(report.finished_in_grace);
    db.teardown().await;
}

#[tokio::test]
async fn scheduled_retried_and_snoozed_jobs_wake_their_producer_when_due() {
    let db = QueueDb::new().await;
    let probe = Probe::default();
    // Polling once an hour: only the announced due times can deliver these.
    let rt = runtime(&db, &probe)
        .poll_interval(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    let mut events = rt.subscribe();
    let mut later = probe_job(Mode::Ok);
    later.scheduled_at = Some(chrono::Utc::now() + chrono::TimeDelta::milliseconds(300));
    let scheduled = db.queue.insert(&later).await.unwrap().id();
    assert_eq!(
        db.queue.job(scheduled).await.unwrap().unwrap().state,
        JobState::Scheduled
    );
    let retried = db
        .queue
        .insert(&probe_job(Mode::RetrySoonOnce))
        .await
        .unwrap()
        .id();
    let snoozed = db
        .queue
        .insert(&probe_job(Mode::SnoozeSoonOnce))
        .await
        .unwrap()
        .id();
    let mut waiting = std::collections::HashSet::from([scheduled, retried, snoozed]);
    while !waiting.is_empty() {
        let done = wait_for_event(&mut events, "the three jobs completing", |e| {
            e.kind == JobEventKind::Completed && waiting.contains(&e.job)
        })
        .await;
        waiting.remove(&done.job);
    }
    let job = db.queue.job(scheduled).await.unwrap().unwrap();
    assert!(
        job.attempted_at.unwrap() >= job.scheduled_at,
        "not before due"
    );
    assert_eq!(probe.runs(retried), 2);
    assert_eq!(probe.runs(snoozed), 2);
    rt.shutdown(Duration::from_secs(5)).await;
    db.teardown().await;
}

#[tokio::test]
async fn poll_only_mode_delivers_and_learns_of_cancels_by_heartbeat() {
    let db = QueueDb::new().await;
    let probe = Probe::default();
    let rt = runtime(&db, &probe)
        .poll_only(true)
        .poll_interval(Duration::from_millis(50))
        .heartbeat(Duration::from_millis(50), Duration::from_secs(30))
        .start()
        .await
        .unwrap();
    let mut events = rt.subscribe();
    let id = db.queue.insert(&probe_job(Mode::Ok)).await.unwrap().id();
    wait_for(&mut events, id, &JobEventKind::Completed).await;

    let waiting = db
        .queue
        .insert(&probe_job(Mode::WaitForCancel))
        .await
        .unwrap()
        .id();
    wait_for(&mut events, waiting, &JobEventKind::Started).await;
    assert!(db.queue.cancel(waiting).await.unwrap());
    // No LISTEN connection: the next heartbeat finds the lease gone.
    wait_for(&mut events, waiting, &JobEventKind::StopRequested).await;
    wait_for(&mut events, waiting, &JobEventKind::Fenced).await;
    assert_eq!(*probe.0.saw_cancel.lock().unwrap(), [waiting]);
    assert_eq!(
        db.queue.job(waiting).await.unwrap().unwrap().state,
        JobState::Cancelled
    );
    rt.shutdown(Duration::from_secs(5)).await;
    db.teardown().await;
}

#[tokio::test]
async fn cancel_while_executing_tells_the_worker_to_stop() {
    let db = QueueDb::new().await;
    let probe = Probe::default();
    // Heartbeats far apart: the NOTIFY alone must reach the worker.
    let rt = runtime(&db, &probe)
        .heartbeat(Duration::from_secs(3600), Duration::from_secs(3 * 3600))
        .start()
        .await
        .unwrap();
    let mut events = rt.subscribe();
    let id = db
        .queue
        .insert(&probe_job(Mode::WaitForCancel))
        .await
        .unwrap()
        .id();
    wait_for(&mut events, id, &JobEventKind::Started).await;
    assert_eq!(rt.running_jobs(), [id]);
    let cancelled = db
        .queue
        .cancel_where(&hephaestus_queue_pg::CancelFilter::args(serde_json::json!(
            "wait_for_cancel"
        )))
        .await
        .unwrap();
    assert_eq!(cancelled, [id]);
    wait_for(&mut events, id, &JobEventKind::StopRequested).await;
    // The worker returned Ok, but the job was cancelled: the ack is fenced.
    wait_for(&mut events, id, &JobEventKind::Fenced).await;
    let job = db.queue.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert!(job.completed_at.is_none());
    assert!(rt.running_jobs().is_empty());
    rt.shutdown(Duration::from_secs(5)).await;
    db.teardown().await;
}

#[tokio::test]
async fn two_runtimes_share_a_queue_without_running_a_job_twice() {
    const JOBS: usize = 200;
    let db = QueueDb::new().await;
    let probe = Probe::default();
    let a = runtime(&db, &probe).start().await.unwrap();
    let b = runtime(&db, &probe).start().await.unwrap();
    let (mut ea, mut eb) = (a.subscribe(), b.subscribe());
    let jobs: Vec<NewJob> = (0..JOBS).map(|_| probe_job(Mode::Ok)).collect();
    let ids: Vec<JobId> = db
        .queue
        .insert_many(&jobs)
        .await
        .unwrap()
        .into_iter()
        .map(Enqueued::id)
        .collect();
    let mut completed = 0;
    let deadline = tokio::time::Instant::now() + SAFETY_NET;
    while completed < JOBS {
        let event = tokio::time::timeout_at(deadline, async {
            tokio::select! {
                e = ea.recv() => e,
                e = eb.recv() => e,
            }
        })
        .await
        .expect("every job completes")
        .expect("no lag");
        if event.kind == JobEventKind::Completed {
            completed += 1;
        }
    }
    for id in &ids {
        assert_eq!(probe.runs(*id), 1, "job {id} ran once");
    }
    let done = db
        .queue
        .jobs(&hephaestus_queue_pg::JobFilter::default().with_states([JobState::Completed]))
        .await
        .unwrap();
    assert_eq!(done.len(), JOBS);
    assert!(done.iter().all(|j| j.attempt == 1));
    a.shutdown(Duration::from_secs(5)).await;
    b.shutdown(Duration::from_secs(5)).await;
    db.teardown().await;
}

#[tokio::test]
async fn a_panicking_worker_is_retried_and_the_runtime_keeps_running() {
    let db = QueueDb::new().await;
    let probe = Probe::default();
    let rt = runtime(&db, &probe).start().await.unwrap();
    let mut events = rt.subscribe();
    let bad = db.queue.insert(&probe_job(Mode::Panic)).await.unwrap().id();
    let retried = wait_for(
        &mut events,
        bad,
        &JobEventKind::Retried {
            retry_at: chrono::Utc::now(),
        },
    )
    .await;
    assert!(
        retried
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("panicked: probe panicked")
    );
    let good = db.queue.insert(&probe_job(Mode::Ok)).await.unwrap().id();
    wait_for(&mut events, good, &JobEventKind::Completed).await;
    let job = db.queue.job(bad).await.unwrap().unwrap();
    assert_eq!((job.state, job.errors.len()), (JobState::Retryable, 1));
    rt.shutdown(Duration::from_secs(5)).await;
    db.teardown().await;
}

#[tokio::test]
async fn shutdown_waits_for_running_jobs_within_the_grace_period() {
    let db = QueueDb::new().await;
    let probe = Probe::default();
    let rt = runtime(&db, &probe).start().await.unwrap();
    let mut events = rt.subscribe();
    let id = db.queue.insert(&probe_job(Mode::Gate)).await.unwrap().id();
    wait_for(&mut events, id, &JobEventKind::Started).await;

    let stopping = rt.clone();
    let mut shutdown =
        tokio::spawn(async move { stopping.shutdown(Duration::from_secs(30)).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut shutdown)
            .await
            .is_err(),
        "shutdown must wait for the running job"
    );
    // Jobs inserted now are not fetched any more.
    let late = db.queue.insert(&probe_job(Mode::Ok)).await.unwrap().id();
    probe.open_gate();
    let report = tokio::time::timeout(SAFETY_NET, shutdown)
        .await
        .unwrap()
        .unwrap();
    assert!(report.finished_in_grace);
    assert!(report.stop_requested.is_empty() && report.aborted.is_empty());
    assert_eq!(
        db.queue.job(id).await.unwrap().unwrap().state,
        JobState::Completed,
        "its completion was written before shutdown returned"
    );
    assert_eq!(
        db.queue.job(late).await.unwrap().unwrap().state,
        JobState::Available
    );
    assert_eq!(rt.shutdown(Duration::ZERO).await, report, "idempotent");
    db.teardown().await;
}

#[tokio::test]
async fn after_the_grace_period_jobs_are_told_to_stop_then_aborted() {
    let db = QueueDb::new().await;
    let probe = Probe::default();
    let rt = runtime(&db, &probe).start().await.unwrap();
    let mut events = rt.subscribe();
    let polite = db
        .queue
        .insert(&probe_job(Mode::WaitForCancel))
        .await
        .unwrap()
        .id();
    let stubborn = db.queue.insert(&probe_job(Mode::Hang)).await.unwrap().id();
    wait_for(&mut events, polite, &JobEventKind::Started).await;
    wait_for(&mut events, stubborn, &JobEventKind::Started).await;

    let report = rt.shutdown(Duration::from_millis(200)).await;
    assert!(!report.finished_in_grace);
    assert_eq!(report.stop_requested, [polite, stubborn]);
    assert_eq!(report.aborted, [stubborn]);
    assert_eq!(*probe.0.saw_cancel.lock().unwrap(), [polite]);
    // The polite job returned Ok when told to stop: it completed.
    assert_eq!(
        db.queue.job(polite).await.unwrap().unwrap().state,
        JobState::Completed
    );
    // The aborted one is handed back at once (not left executing until a
    // rescuer's `rescue_after`): available, its attempt not counted, the
    // interruption recorded.
    assert_eq!(report.handed_back, [stubborn]);
    let back = db.queue.job(stubborn).await.unwrap().unwrap();
    assert_eq!(back.state, JobState::Available);
    assert_eq!(back.attempt, 1, "the attempt number stays the fence");
    assert_eq!(
        back.max_attempts,
        probe_job(Mode::Hang).max_attempts + 1,
        "the interrupted attempt does not count"
    );
    assert!(
        back.errors
            .last()
            .is_some_and(|e| e.error.message.contains("interrupted")),
        "{:?}",
        back.errors
    );
    // Another runtime runs it right away.
    let next = runtime(&db, &probe).start().await.unwrap();
    let queue = &db.queue;
    wait::until("the handed-back job to run again", || async move {
        queue.job(stubborn).await.unwrap().unwrap().attempt >= 2
    })
    .await;
    next.abort().await;
    db.teardown().await;
}

#[tokio::test]
async fn a_pool_too_small_for_the_runtime_is_refused_at_start() {
    let db = QueueDb::with_connections(1).await;
    let probe = Probe::default();
    let error = runtime(&db, &probe).start().await.unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("allows 1 connection(s)") && message.contains("at least 2"),
        "{message}"
    );
    // Poll-only holds no connection: one is enough.
    let rt = runtime(&db, &probe).poll_only(true).start().await.unwrap();
    rt.shutdown(Duration::from_secs(5)).await;
    db.teardown().await;
}

#[tokio::test]
async fn a_lapsed_lease_is_taken_over_and_its_old_holder_stops_leading() {
    let db = QueueDb::new().await;
    let probe = Probe::default();
    let config = |b: RuntimeBuilder| {
        let config = hephaestus_queue_pg::RuntimeConfig::default()
            .with_elect_interval(Duration::from_millis(50))
            .with_leader_ttl(Duration::from_secs(30))
            .with_depth_interval(None);
        b.config(config)
    };
    let first = config(runtime(&db, &probe)).start().await.unwrap();
    let second = config(runtime(&db, &probe)).start().await.unwrap();
    assert!(first.is_leader() && !second.is_leader());
    let (holder, _) = db.queue.maintenance_leader().await.unwrap().unwrap();
    assert_eq!(holder, first.worker_id());
    // The leader's lease lapses (as when it stops renewing): the follower
    // takes it at its next attempt, and the old leader's next renewal finds
    // it gone and stops leading.
    sqlx::query(&format!(
        "update {}.hephaestus_leases set expires_at = clock_timestamp() - interval '1 second'",
        db.queue.prefix().quoted()
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    wait::until_holds("the follower to take the lapsed lease over", || {
        second.is_leader() && !first.is_leader()
    })
    .await;
    let (holder, _) = db.queue.maintenance_leader().await.unwrap().unwrap();
    assert_eq!(holder, second.worker_id());
    // A graceful stop gives the lease up at once.
    second.shutdown(Duration::from_secs(5)).await;
    wait::until_holds("the old leader to take the given-up lease", || {
        first.is_leader()
    })
    .await;
    first.shutdown(Duration::from_secs(5)).await;
    assert_eq!(db.queue.maintenance_leader().await.unwrap(), None);
    db.teardown().await;
}

#[tokio::test]
async fn heartbeat_loss_leads_to_rescue_by_the_leader() {
    let db = QueueDb::new().await;
    let probe = Probe::default();
    let crashing = runtime(&db, &probe)
        .maintenance(false)
        .heartbeat(Duration::from_secs(3600), Duration::from_secs(3 * 3600))
        .start()
        .await
        .unwrap();
    let mut crash_events = crashing.subscribe();
    let id = db
        .queue
        .insert(&probe_job(Mode::GateFirstAttempt))
        .await
        .unwrap()
        .id();
    wait_for(&mut crash_events, id, &JobEventKind::Started).await;
    let claimed = db.queue.job(id).await.unwrap().unwrap();
    crashing.heartbeat_now().await;
    let beaten = db.queue.job(id).await.unwrap().unwrap();
    assert!(
        beaten.heartbeat_at > claimed.heartbeat_at,
        "heartbeats move"
    );

    // The process dies: no more heartbeats, nothing settled.
    assert_eq!(crashing.abort().await, [id]);
    assert_eq!(
        db.queue.job(id).await.unwrap().unwrap().state,
        JobState::Executing
    );

    // A leader with a 1 s rescue threshold returns the job and runs it.
    let survivor = runtime(&db, &probe)
        .heartbeat(Duration::from_millis(200), Duration::from_secs(1))
        .rescue_interval(Duration::from_millis(100))
        .start()
        .await
        .unwrap();
    let mut events = survivor.subscribe();
    assert!(survivor.is_leader());
    let rescued = wait_for(&mut events, id, &JobEventKind::Rescued).await;
    assert!(rescued.error.unwrap().message.contains(&format!(
        "worker {} stopped heartbeating",
        crashing.worker_id()
    )));
    let done = wait_for(&mut events, id, &JobEventKind::Completed).await;
    assert_eq!(done.attempt, 2);
    let job = db.queue.job(id).await.unwrap().unwrap();
    assert_eq!(
        (job.state, job.attempt, job.attempted_by.as_deref()),
        (JobState::Completed, 2, Some(survivor.worker_id()))
    );
    survivor.shutdown(Duration::from_secs(5)).await;
    db.teardown().await;
}

#[tokio::test]
async fn a_stalled_worker_finishing_after_its_job_was_rescued_is_fenced() {
    let db = QueueDb::new().await;
    let probe = Probe::default();
    // The stalled runtime never heartbeats (its interval is an hour), and
    // its one slot stays taken, so the rescued job goes to the rescuer.
    let stalled = runtime_with(&db, &probe, 1)
        .maintenance(false)
        .heartbeat(Duration::from_secs(3600), Duration::from_secs(3 * 3600))
        .start()
        .await
        .unwrap();
    let mut stalled_events = stalled.subscribe();
    let id = db
        .queue
        .insert(&probe_job(Mode::GateFirstAttempt))
        .await
        .unwrap()
        .id();
    wait_for(&mut stalled_events, id, &JobEventKind::Started).await;

    let rescuer = runtime(&db, &probe)
        .heartbeat(Duration::from_millis(200), Duration::from_secs(1))
        .rescue_interval(Duration::from_millis(100))
        .start()
        .await
        .unwrap();
    let mut events = rescuer.subscribe();
    wait_for(&mut events, id, &JobEventKind::Rescued).await;
    wait_for(&mut events, id, &JobEventKind::Completed).await;

    // The first attempt finally returns: its completion must not count.
    probe.open_gate();
    let late = wait_for(&mut stalled_events, id, &JobEventKind::Fenced).await;
    assert_eq!(late.attempt, 1);
    let job = db.queue.job(id).await.unwrap().unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Completed, 2));
    assert_eq!(job.attempted_by.as_deref(), Some(rescuer.worker_id()));
    assert_eq!(probe.runs(id), 2);
    stalled.shutdown(Duration::from_secs(5)).await;
    rescuer.shutdown(Duration::from_secs(5)).await;
    db.teardown().await;
}

#[tokio::test]
async fn one_leader_at_a_time_and_a_follower_takes_over() {
    let db = QueueDb::new().await;
    let probe = Probe::default();
    let config = |b: RuntimeBuilder| {
        let config = hephaestus_queue_pg::RuntimeConfig::default()
            .with_elect_interval(Duration::from_millis(50))
            .with_depth_interval(None);
        b.config(config)
    };
    let first = config(runtime(&db, &probe)).start().await.unwrap();
    let second = config(runtime(&db, &probe)).start().await.unwrap();
    assert!(first.is_leader());
    assert!(!second.is_leader());
    first.shutdown(Duration::from_secs(5)).await;
    // The follower campaigns every 50 ms; the lock was released on shutdown.
    wait::until_holds("the follower to lead", || second.is_leader()).await;
    second.shutdown(Duration::from_secs(5)).await;
    db.teardown().await;
}

#[tokio::test]
async fn delete_completed_mode_removes_rows_but_keeps_unique_holders() {
    let db = QueueDb::new().await;
    let probe = Probe::default();
    let rt = runtime(&db, &probe)
        .config(hephaestus_queue_pg::RuntimeConfig::default().with_delete_completed(true))
        .start()
        .await
        .unwrap();
    let mut events = rt.subscribe();
    let plain = db.queue.insert(&probe_job(Mode::Ok)).await.unwrap().id();
    let mut once = probe_job(Mode::Ok);
    once.unique = Some(hephaestus_engine_core::ports::UniqueJob {
        key: "once".into(),
        states: JobState::ALL.to_vec(),
    });
    let unique = db.queue.insert(&once).await.unwrap().id();
    wait_for(&mut events, plain, &JobEventKind::Completed).await;
    wait_for(&mut events, unique, &JobEventKind::Completed).await;
    assert!(db.queue.job(plain).await.unwrap().is_none(), "deleted");
    assert_eq!(
        db.queue.job(unique).await.unwrap().unwrap().state,
        JobState::Completed,
        "a job unique among completed jobs is kept"
    );
    assert_eq!(
        db.queue.insert(&once).await.unwrap(),
        Enqueued::Existing(unique)
    );
    assert_eq!(rt.counts().completed, 2);
    rt.shutdown(Duration::from_secs(5)).await;
    db.teardown().await;
}

/// Metrics are recorded on the runtime's threads: a current-thread Tokio
/// runtime inside a thread-local recorder sees them all.
#[test]
fn metrics_report_wait_run_time_outcomes_and_depth() {
    use metrics_util::MetricKind;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        tokio.block_on(async {
            let db = QueueDb::new().await;
            let probe = Probe::default();
            let rt = runtime(&db, &probe)
                .config(
                    hephaestus_queue_pg::RuntimeConfig::default()
                        .with_depth_interval(Some(Duration::from_millis(20))),
                )
                .start()
                .await
                .unwrap();
            let mut events = rt.subscribe();
            let id = db.queue.insert(&probe_job(Mode::Ok)).await.unwrap().id();
            wait_for(&mut events, id, &JobEventKind::Completed).await;
            // The depth gauge is refreshed every 20 ms by the leader.
            wait::until_holds("a depth gauge counting the completed job", || {
                snapshotter
                    .snapshot()
                    .into_vec()
                    .into_iter()
                    .any(|(key, _, _, value)| {
                        key.kind() == MetricKind::Gauge
                            && key.key().name() == "hephaestus_queue_jobs"
                            && key.key().labels().any(|l| l.value() == "completed")
                            && value == DebugValue::Gauge(1.0.into())
                    })
            })
            .await;
            rt.shutdown(Duration::from_secs(5)).await;
            db.teardown().await;
        });
    });
    let snapshot = snapshotter.snapshot().into_vec();
    let has = |kind: MetricKind, name: &str, label: (&str, &str)| {
        snapshot.iter().any(|(key, _, _, _)| {
            key.kind() == kind
                && key.key().name() == name
                && key
                    .key()
                    .labels()
                    .any(|l| l.key() == label.0 && l.value() == label.1)
        })
    };
    assert!(has(
        MetricKind::Histogram,
        "hephaestus_queue_job_wait_seconds",
        ("queue", "q")
    ));
    assert!(has(
        MetricKind::Histogram,
        "hephaestus_queue_job_run_seconds",
        ("outcome", "completed")
    ));
    assert!(has(
        MetricKind::Counter,
        "hephaestus_queue_jobs_finished_total",
        ("kind", "probe")
    ));
}
