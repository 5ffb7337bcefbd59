//! Runs one scenario on every backend: the in-memory backend, PostgreSQL
//! (storage-pg + queue-pg in a fresh schema) and SQLite (a fresh file), with
//! one virtual clock.

use hephaestus_engine_core::Workflow;
use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_engine_core::workflow::WorkflowFamily;
use hephaestus_memory::MemoryBackend;
use hephaestus_runner::postgres::PgBackend;
use hephaestus_runner::testing::{ManualClock, ScriptedStep};
use hephaestus_runner::{Backend, RunnerConfig, Runtime};
use hephaestus_sqlite::SqliteBackend;

use crate::support::db::TestSchema;
use crate::support::sqlite::TempDir;
use crate::support::wait;

/// A backend and the clock every component reads.
pub struct Harness<B> {
    pub backend: B,
    pub clock: ManualClock,
    schema: Option<TestSchema>,
    dir: Option<TempDir>,
}

impl Harness<MemoryBackend> {
    pub fn memory() -> Self {
        let clock = ManualClock::default();
        Self {
            backend: MemoryBackend::with_clock(clock.clone()),
            clock,
            schema: None,
            dir: None,
        }
    }
}

impl Harness<SqliteBackend> {
    /// A fresh migrated SQLite file, read through the virtual clock.
    pub async fn sqlite() -> Self {
        let clock = ManualClock::default();
        let dir = TempDir::new("runner-sqlite");
        let backend = crate::support::sqlite::fresh(&dir, Some(clock.clone())).await;
        Self {
            backend,
            clock,
            schema: None,
            dir: Some(dir),
        }
    }
}

/// queue-pg reads time through its own trait; this adapts the virtual clock.
impl Harness<PgBackend> {
    pub async fn postgres() -> Self {
        let schema = TestSchema::new().await;
        hephaestus_storage_pg::migrate(&schema.pool, &schema.prefix)
            .await
            .expect("migrate storage");
        hephaestus_queue_pg::migrate(&schema.pool, &schema.prefix)
            .await
            .expect("migrate the queue");
        let clock = ManualClock::default();
        // Workers run many transactions at once: give them a pool of their own.
        let pool = schema.pool_with(24).await;
        let store = hephaestus_storage_pg::PgStore::new(pool.clone(), schema.prefix.clone())
            .with_clock(clock.clone());
        let queue = hephaestus_queue_pg::PgQueue::new(pool, schema.prefix.clone())
            .with_clock(clock.clone());
        Self {
            backend: PgBackend::new(store, queue),
            clock,
            schema: Some(schema),
            dir: None,
        }
    }
}

impl<B: Backend> Harness<B> {
    /// A runtime over this backend and clock with `workflows`.
    pub fn runtime(&self, workflows: Vec<Workflow>) -> Runtime<B> {
        self.runtime_with(RunnerConfig::default(), workflows, Vec::new())
    }

    pub fn runtime_with(
        &self,
        config: RunnerConfig,
        workflows: Vec<Workflow>,
        families: Vec<WorkflowFamily>,
    ) -> Runtime<B> {
        let mut b = Runtime::builder(self.backend.clone())
            .discard_handler(hephaestus_failure_handler::FailureHandler::new())
            .clock(self.clock.clone())
            .config(config);
        for wf in workflows {
            b = b.workflow(wf);
        }
        for f in families {
            b = b.family(f);
        }
        b.build().expect("a valid runtime")
    }

    /// Schedules a resume of `step` with `event` 30 s ahead, lets it come
    /// due, then discards its job as the queue would after its worker kept
    /// dying, with the failure handler's consequences in the discarding
    /// unit of work.
    pub async fn discard_a_due_resume(
        &self,
        rt: &Runtime<B>,
        instance: uuid::Uuid,
        step: &str,
        event: &str,
    ) {
        use hephaestus_runner::jobs;
        rt.schedule_resume(instance, step, event, std::time::Duration::from_secs(30))
            .await
            .unwrap();
        self.clock.advance(std::time::Duration::from_secs(31));
        let b = rt.backend();
        let leases = b
            .fetch(&rt.config().queues.timer, 10, self.clock.now())
            .await
            .unwrap();
        let [lease] = leases.as_slice() else {
            panic!("one due resume job: {leases:?}")
        };
        assert_eq!(lease.kind, jobs::RESUME);
        let error = hephaestus_engine_core::step::StepError::retryable("the worker died again");
        let mut tx = b.begin().await.unwrap();
        assert!(
            b.discard(&mut tx, lease, &error, self.clock.now())
                .await
                .unwrap()
        );
        let after = rt
            .on_discarded(&mut tx, lease, &error, self.clock.now())
            .await
            .unwrap();
        b.commit(tx).await.unwrap();
        after.run();
    }

    pub async fn teardown(self) {
        if let Some(schema) = self.schema {
            schema.teardown().await;
        }
        // The SQLite file goes with its directory (after the backend's
        // last handle here is dropped).
        drop(self.backend);
        drop(self.dir);
    }
}

/// Waits until instance `id` has `status`, looking again each time one of
/// `runtimes` (those that run its jobs) reports telemetry: every committed
/// round ends with an event, so no change goes unseen.
pub async fn until_status<B: Backend>(
    runtimes: &[&Runtime<B>],
    id: uuid::Uuid,
    status: InstanceStatus,
) {
    /// What the wait is for, with the status last seen (read when it fails).
    struct Becoming<'a> {
        id: uuid::Uuid,
        status: InstanceStatus,
        seen: &'a std::cell::Cell<Option<InstanceStatus>>,
    }
    impl std::fmt::Display for Becoming<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let (id, status, seen) = (self.id, self.status, self.seen.get());
            write!(f, "instance {id} to be {status:?} (last seen {seen:?})")
        }
    }
    let mut events: Vec<_> = runtimes.iter().map(|rt| rt.subscribe()).collect();
    let rt = runtimes[0];
    let seen = std::cell::Cell::new(None);
    let what = Becoming {
        id,
        status,
        seen: &seen,
    };
    let seen = &seen;
    wait::until_notified(&mut events, what, || async move {
        let now = rt.get(id).await.unwrap().unwrap().status;
        seen.set(Some(now));
        now == status
    })
    .await;
}

/// Workflow "fan": Begin, then `width` branches `Branch0..`, then Join.
pub struct FanOut {
    pub workflow: Workflow,
    pub begin: ScriptedStep,
    pub branches: Vec<ScriptedStep>,
    pub join: ScriptedStep,
}

impl FanOut {
    pub fn new(width: usize) -> Self {
        use hephaestus_engine_core::prelude::*;
        let begin = ScriptedStep::new("Begin", ["done"]);
        let branches: Vec<ScriptedStep> = (0..width)
            .map(|i| ScriptedStep::new(&format!("Branch{i}"), ["done"]))
            .collect();
        let join = ScriptedStep::new("Join", ["done"]);
        let mut builder = Workflow::builder("fan")
            .unique("key", Scope::Workflow)
            .start(begin.clone())
            .fan_out(
                begin.clone(),
                "done",
                branches
                    .iter()
                    .map(|b| target(b.clone()))
                    .collect::<Vec<_>>(),
            );
        for branch in &branches {
            builder = builder.on(branch.clone(), "done", join.clone());
        }
        let workflow = builder
            .on(join.clone(), "done", hephaestus_engine_core::steps::Done)
            .build()
            .expect("a valid fan-out");
        Self {
            workflow,
            begin,
            branches,
            join,
        }
    }
}

/// Generates `<name>::memory`, `<name>::postgres` and `<name>::sqlite`
/// tests running the scenario `<name>` on each backend.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use super::harness::Harness;

                #[tokio::test]
                async fn memory() {
                    let h = Harness::memory();
                    super::$name(&h).await;
                    h.teardown().await;
                }

                #[tokio::test]
                async fn postgres() {
                    let h = Harness::postgres().await;
                    super::$name(&h).await;
                    h.teardown().await;
                }

                #[tokio::test]
                async fn sqlite() {
                    let h = Harness::sqlite().await;
                    super::$name(&h).await;
                    h.teardown().await;
                }
            }
        )*
    };
}

pub(crate) use on_both_backends;
