//! The reconciler: repairs active instances that have no work scheduled.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hephaestus_engine_core::instance::{Instance, InstanceStatus, StepStatus};
use hephaestus_engine_core::ports::{NewJob, PortError};
use hephaestus_engine_core::steps::DONE_ID;
use hephaestus_runner::{Backend, RunnerError, Runtime, jobs};
use uuid::Uuid;

/// What the reconciler did to one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// Re-enqueued the advance of an instance with no live job.
    Advance {
        /// The instance.
        instance_id: Uuid,
        /// Its status.
        status: InstanceStatus,
        /// Unprocessed results it had.
        pending_results: usize,
    },
    /// Re-enqueued the lost execution of an active step.
    Execute {
        /// The instance.
        instance_id: Uuid,
        /// The step.
        step: String,
        /// Its activation.
        activation: u32,
    },
    /// Re-enqueued the lost timer of a waiting step.
    Timer {
        /// The instance.
        instance_id: Uuid,
        /// The step.
        step: String,
        /// Its activation.
        activation: u32,
    },
}

/// The outcome of one pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RepairReport {
    /// Active instances looked at.
    pub scanned: usize,
    /// What was repaired.
    pub repaired: Vec<Repair>,
    /// Instances whose workflow is not registered here (left untouched).
    pub unregistered: Vec<Uuid>,
    /// Instances whose stored state cannot be read, with the error (left
    /// untouched; the pass goes on with the others).
    pub undecodable: Vec<(Uuid, String)>,
}

/// Whether this process leads the deployment's maintenance.
pub type LeaderCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// Finds and repairs stuck instances. Every worker process may run one:
/// with [`Reconciler::leader_only`], only the elected leader's passes run.
#[derive(Clone)]
pub struct Reconciler<B> {
    runtime: Runtime<B>,
    page: u32,
    leader: Option<LeaderCheck>,
}

impl<B> std::fmt::Debug for Reconciler<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("page", &self.page)
            .field("leader_only", &self.leader.is_some())
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Reconciler<B> {
    /// A reconciler over `runtime`'s backend and workflows.
    pub fn new(runtime: Runtime<B>) -> Self {
        Self {
            runtime,
            page: 1_000,
            leader: None,
        }
    }

    /// Runs the periodic passes of [`Reconciler::run_every`] only while
    /// `is_leader` says this process leads (on PostgreSQL, pass queue-pg's
    /// election: `move || queue_runtime.is_leader()`). One pass at a time
    /// per deployment, and another process takes over when the leader dies.
    #[must_use]
    pub fn leader_only(mut self, is_leader: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        self.leader = Some(Arc::new(is_leader));
        self
    }

    /// Whether a periodic pass runs here now.
    pub fn leads(&self) -> bool {
        self.leader.as_ref().is_none_or(|is_leader| is_leader())
    }

    /// One pass over every active instance: a statement per page finds
    /// those that may need a repair ([`Backend::reconcile_page`]), and
    /// only those are read and checked. An instance that cannot be read is
    /// reported in [`RepairReport::undecodable`] and skipped.
    ///
    /// Dropping the future stops the pass at its next await (what
    /// [`Reconciler::run_every`] does at shutdown): every repair is its own
    /// commit, so nothing is left half done.
    pub async fn run_once(&self) -> Result<RepairReport, RunnerError> {
        self.pass(false).await
    }

    /// [`Reconciler::run_once`]; with `while_leading`, the pass stops as
    /// soon as this process no longer leads (checked before each repair):
    /// a leader that was stopped mid-pass and comes back after losing its
    /// lease repairs nothing more.
    async fn pass(&self, while_leading: bool) -> Result<RepairReport, RunnerError> {
        let mut report = RepairReport::default();
        let mut before = None;
        loop {
            let page = self
                .runtime
                .backend()
                .reconcile_page(before, self.page)
                .await?;
            let Some(last) = page.last() else { break };
            before = Some(last.id);
            let full = u32::try_from(page.len()).unwrap_or(u32::MAX) >= self.page;
            report.scanned += page.len();
            for row in page {
                let id = row.id;
                if self
                    .runtime
                    .registry()
                    .get(&row.workflow_id, row.workflow_version)
                    .is_err()
                {
                    report.unregistered.push(id);
                    continue;
                }
                if !row.candidate {
                    continue;
                }
                if while_leading && !self.leads() {
                    tracing::warn!(
                        scanned = report.scanned,
                        repaired = report.repaired.len(),
                        "reconciler: this process no longer leads; pass abandoned"
                    );
                    return Ok(report);
                }
                let instance = match self.runtime.backend().get(id).await {
                    Ok(Some(instance)) => instance,
                    // Finished and pruned since the page was read.
                    Ok(None) => continue,
                    Err(PortError::Corrupt(error)) => {
                        tracing::error!(
                            instance = %id,
                            %error,
                            "reconciler: cannot decode the instance; skipping it"
                        );
                        report.undecodable.push((id, error));
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                if !instance.status.is_active() {
                    continue;
                }
                self.check(&instance, &mut report).await?;
            }
            if !full {
                break;
            }
        }
        if !report.repaired.is_empty() || !report.undecodable.is_empty() {
            tracing::warn!(
                repaired = report.repaired.len(),
                undecodable = report.undecodable.len(),
                scanned = report.scanned,
                "reconciler repaired instances"
            );
        }
        Ok(report)
    }

    /// Runs a pass every `interval` until `shutdown` resolves (skipping
    /// passes while another process leads, see [`Reconciler::leader_only`]).
    /// A pass in progress when `shutdown` resolves is abandoned at once.
    pub async fn run_every(&self, interval: Duration, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            if self.leads() {
                tokio::select! {
                    biased;
                    () = &mut shutdown => return,
                    outcome = self.pass(true) => {
                        if let Err(e) = outcome {
                            tracing::error!(error = %e, "reconciler pass failed");
                        }
                    }
                }
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }

    async fn check(
        &self,
        instance: &Instance,
        report: &mut RepairReport,
    ) -> Result<(), RunnerError> {
        let b = self.runtime.backend();
        let Ok(wf) = self
            .runtime
            .registry()
            .get(instance.workflow_id.as_str(), instance.workflow_version)
        else {
            report.unregistered.push(instance.id);
            return Ok(());
        };
        let live = b.live_jobs(&jobs::of_instance(instance.id)).await?;
        let mut tx = b.begin().await?;
        let inbox = b.pending(&mut tx, instance.id).await?;
        drop(tx);
        let pending = inbox.len();
        let mut repairs: Vec<(NewJob, Repair)> = Vec::new();
        let has_advance = live.iter().any(|j| j.kind == jobs::ADVANCE);
        let needs_advance = match instance.status {
            // Started before its first round was applied at start.
            InstanceStatus::Pending => live.is_empty(),
            InstanceStatus::Running | InstanceStatus::Waiting => pending > 0 && !has_advance,
            _ => false,
        };
        if needs_advance {
            repairs.push((
                jobs::advance(self.runtime.config(), wf, instance.id, None),
                Repair::Advance {
                    instance_id: instance.id,
                    status: instance.status,
                    pending_results: pending,
                },
            ));
        }
        let of_activation = |kind: &str, step: &str, activation: u32| {
            live.iter().any(|j| {
                j.kind == kind
                    && j.args.get("step").and_then(|s| s.as_str()) == Some(step)
                    && j.args.get("activation").and_then(serde_json::Value::as_u64)
                        == Some(u64::from(activation))
            })
        };
        if matches!(
            instance.status,
            InstanceStatus::Running | InstanceStatus::Waiting
        ) {
            for (step, state) in &instance.steps {
                if state.status != StepStatus::Active
                    || step.as_str() == DONE_ID
                    || of_activation(jobs::EXECUTE, step.as_str(), state.activation)
                    || inbox.iter().any(|row| {
                        row.result.step.as_ref() == Some(step)
                            && row.result.activation == state.activation
                    })
                {
                    continue;
                }
                repairs.push((
                    jobs::execute_replacement(
                        self.runtime.config(),
                        wf,
                        instance.id,
                        step,
                        state.activation,
                    ),
                    Repair::Execute {
                        instance_id: instance.id,
                        step: step.to_string(),
                        activation: state.activation,
                    },
                ));
            }
        }
        for (step, state) in &instance.steps {
            let Some(timer) = &state.timer else { continue };
            if state.status != StepStatus::Waiting {
                continue;
            }
            if !of_activation(jobs::TIMER, step.as_str(), state.activation) {
                repairs.push((
                    jobs::timer(
                        self.runtime.config(),
                        wf,
                        instance.id,
                        step,
                        state.activation,
                        &timer.event,
                        timer.fire_at,
                    ),
                    Repair::Timer {
                        instance_id: instance.id,
                        step: step.to_string(),
                        activation: state.activation,
                    },
                ));
            }
        }
        if repairs.is_empty() {
            return Ok(());
        }
        let mut tx = b.begin().await?;
        // Each replacement carries the instance's trace context.
        let jobs: Vec<NewJob> = repairs
            .iter()
            .map(|(j, _)| {
                hephaestus_runner::observe::carried(j.clone(), &instance.telemetry_metadata)
            })
            .collect();
        b.enqueue(&mut tx, &jobs).await?;
        b.commit(tx)
            .await
            .map_err(|e: PortError| RunnerError::from(e))?;
        for (_, repair) in &repairs {
            let kind = match repair {
                Repair::Advance { .. } => "advance",
                Repair::Execute { .. } => "execute",
                Repair::Timer { .. } => "timer",
            };
            metrics::counter!("hephaestus.reconciler.repair.count", "repair" => kind).increment(1);
        }
        report.repaired.extend(repairs.into_iter().map(|(_, r)| r));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::{TimeZone, Utc};
    use hephaestus_engine_core::ports::{InstanceStore, JobQueue, UnitOfWork};
    use hephaestus_engine_core::prelude::*;
    use hephaestus_engine_core::steps::{Done, FnStep, Wait};
    use hephaestus_memory::MemoryBackend;
    use hephaestus_runner::{ManualClock, StartOptions};
    use serde_json::json;

    use super::*;

    fn clock() -> ManualClock {
        ManualClock::new(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap())
    }

    fn linear() -> Workflow {
        let a = FnStep::new("A", ["done"], |_| StepOutcome::complete("done"));
        Workflow::builder("linear")
            .unique("k", Scope::Workflow)
            .start(a.clone())
            .on(a, "done", Done)
            .build()
            .unwrap()
    }

    fn pause() -> Workflow {
        Workflow::builder("pause")
            .unique("p", Scope::Workflow)
            .start_with(Wait, json!({"duration": 10, "unit": "second"}))
            .on(Wait, "timeout", Done)
            .build()
            .unwrap()
    }

    async fn cancel_all_jobs(b: &MemoryBackend, id: Uuid) {
        let mut tx = b.begin().await.unwrap();
        b.cancel_matching(&mut tx, &jobs::of_instance(id), None)
            .await
            .unwrap();
        b.commit(tx).await.unwrap();
    }

    /// A runtime with `linear()` over a fresh backend, and an instance of it
    /// whose jobs were lost (cancelled) right after its start.
    async fn lost_linear() -> (MemoryBackend, Runtime<MemoryBackend>, ManualClock, Uuid) {
        let clock = clock();
        let backend = MemoryBackend::with_clock(clock.clone());
        let rt = Runtime::builder(backend.clone())
            .discard_handler(crate::FailureHandler::new())
            .clock(clock.clone())
            .workflow(linear())
            .build()
            .unwrap();
        let s = rt
            .start("linear", "1", json!({}), StartOptions::default())
            .await
            .unwrap();
        cancel_all_jobs(&backend, s.id).await;
        (backend, rt, clock, s.id)
    }

    #[tokio::test]
    async fn a_running_instance_that_lost_its_execution_is_repaired_once() {
        // A lost job: the start step's execution vanished.
        let (_backend, rt, _clock, id) = lost_linear().await;
        let reconciler = Reconciler::new(rt.clone());
        let report = reconciler.run_once().await.unwrap();
        assert_eq!(report.scanned, 1);
        assert_eq!(
            report.repaired,
            vec![Repair::Execute {
                instance_id: id,
                step: "A".to_owned(),
                activation: 1,
            }]
        );
        assert!(
            reconciler.run_once().await.unwrap().repaired.is_empty(),
            "repairing twice is a no-op"
        );
        rt.drain().await.unwrap();
        assert_eq!(
            rt.get(id).await.unwrap().unwrap().status,
            InstanceStatus::Completed
        );
        assert_eq!(
            reconciler.run_once().await.unwrap().scanned,
            0,
            "finished instances are not scanned"
        );
    }

    /// A result waiting in the inbox of a running instance whose advance
    /// was lost gets an advance, and its activation no replacement
    /// execution (the result is there; it only needs applying).
    #[tokio::test]
    async fn an_unapplied_result_gets_an_advance_not_a_second_execution() {
        use hephaestus_engine_core::ports::{NewStepResult, ResultPayload, StepResultStore};
        use hephaestus_engine_core::step::EventName;

        let (backend, rt, _clock, id) = lost_linear().await;
        // The step's result was recorded, its advance lost.
        let mut tx = backend.begin().await.unwrap();
        backend
            .record(
                &mut tx,
                &NewStepResult {
                    instance_id: id,
                    step: Some(StepId::new("A").unwrap()),
                    activation: 1,
                    payload: ResultPayload::Completed {
                        event: EventName("done".to_owned()),
                        output: json!({"from": "inbox"}),
                        metadata: serde_json::Map::new(),
                    },
                },
            )
            .await
            .unwrap();
        backend.commit(tx).await.unwrap();
        let report = Reconciler::new(rt.clone()).run_once().await.unwrap();
        assert_eq!(
            report.repaired,
            vec![Repair::Advance {
                instance_id: id,
                status: InstanceStatus::Running,
                pending_results: 1
            }]
        );
        rt.drain().await.unwrap();
        let done = rt.get(id).await.unwrap().unwrap();
        assert_eq!(done.status, InstanceStatus::Completed);
        assert_eq!(done.context.step("a"), Some(&json!({"from": "inbox"})));
    }

    /// A replacement execution never runs user code for an activation
    /// whose result is already recorded.
    #[tokio::test]
    async fn a_replacement_execution_skips_a_recorded_activation() {
        let clock = clock();
        let backend = MemoryBackend::with_clock(clock.clone());
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = {
            let runs = Arc::clone(&runs);
            FnStep::new("A", ["done"], move |_| {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                StepOutcome::complete("done")
            })
        };
        let wf = Workflow::builder("linear")
            .unique("k", Scope::Workflow)
            .start(counted.clone())
            .on(counted, "done", Done)
            .build()
            .unwrap();
        let rt = Runtime::builder(backend.clone())
            .discard_handler(crate::FailureHandler::new())
            .clock(clock.clone())
            .workflow(wf.clone())
            .build()
            .unwrap();
        let s = rt
            .start("linear", "1", json!({}), StartOptions::default())
            .await
            .unwrap();
        rt.drain().await.unwrap();
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A replacement enqueued late (as by a pass that read the instance
        // before its step completed) finds the activation done.
        let mut tx = backend.begin().await.unwrap();
        backend
            .enqueue(
                &mut tx,
                &[jobs::execute_replacement(
                    rt.config(),
                    &wf,
                    s.id,
                    &StepId::new("A").unwrap(),
                    1,
                )],
            )
            .await
            .unwrap();
        backend.commit(tx).await.unwrap();
        let report = rt.drain().await.unwrap();
        assert_eq!(report.skipped, 1, "{report:?}");
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// An instance written pending (by a version that applied the start in
    /// its first advance job) whose advance was lost gets one.
    #[tokio::test]
    async fn a_pending_instance_that_lost_its_advance_is_repaired() {
        let clock = clock();
        let backend = MemoryBackend::with_clock(clock.clone());
        let rt = Runtime::builder(backend.clone())
            .discard_handler(crate::FailureHandler::new())
            .clock(clock.clone())
            .workflow(linear())
            .build()
            .unwrap();
        let wf = linear();
        let id = Uuid::now_v7();
        let instance = hephaestus_engine_core::engine::Engine::new(&wf)
            .new_instance(hephaestus_engine_core::engine::NewInstance {
                id,
                business_id: wf.unique().business_id("1", [0; 4]).unwrap(),
                input: json!({}),
                telemetry_metadata: serde_json::Map::new(),
                now: clock.now(),
            })
            .unwrap();
        assert_eq!(instance.status, InstanceStatus::Pending);
        let mut tx = backend.begin().await.unwrap();
        backend.insert(&mut tx, &instance).await.unwrap();
        backend.commit(tx).await.unwrap();
        let report = Reconciler::new(rt.clone()).run_once().await.unwrap();
        assert_eq!(
            report.repaired,
            vec![Repair::Advance {
                instance_id: id,
                status: InstanceStatus::Pending,
                pending_results: 0
            }]
        );
        rt.drain().await.unwrap();
        assert_eq!(
            rt.get(id).await.unwrap().unwrap().status,
            InstanceStatus::Completed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn periodic_passes_run_only_while_this_process_leads() {
        let (backend, rt, _clock, id) = lost_linear().await;
        let leads = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reconciler = {
            let leads = Arc::clone(&leads);
            Reconciler::new(rt.clone())
                .leader_only(move || leads.load(std::sync::atomic::Ordering::SeqCst))
        };
        let live = || async { backend.live_jobs(&jobs::of_instance(id)).await.unwrap() };
        // A follower's loop would run its pass at once, then wait for the
        // next interval (60 s) and stop at the shutdown (30 s, paused
        // clock): nothing is repaired.
        let half_an_interval = || tokio::time::sleep(std::time::Duration::from_secs(30));
        reconciler
            .run_every(std::time::Duration::from_secs(60), half_an_interval())
            .await;
        assert!(live().await.is_empty(), "a follower repairs nothing");
        // Once it leads, its pass repairs the instance.
        leads.store(true, std::sync::atomic::Ordering::SeqCst);
        reconciler
            .run_every(std::time::Duration::from_secs(60), half_an_interval())
            .await;
        let repaired = live().await;
        assert_eq!(repaired.len(), 1, "{repaired:?}");
        assert_eq!(repaired[0].kind, jobs::EXECUTE);
    }

    /// A periodic pass stops repairing once this process no longer leads.
    #[tokio::test(start_paused = true)]
    async fn a_periodic_pass_stops_when_the_leadership_is_lost() {
        let clock = clock();
        let backend = MemoryBackend::with_clock(clock.clone());
        let rt = Runtime::builder(backend.clone())
            .discard_handler(crate::FailureHandler::new())
            .clock(clock.clone())
            .workflow(linear())
            .build()
            .unwrap();
        for value in ["1", "2"] {
            let s = rt
                .start("linear", value, json!({}), StartOptions::default())
                .await
                .unwrap();
            cancel_all_jobs(&backend, s.id).await;
        }
        // Leads for the pass's start and its first repair, then loses it.
        let checks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let reconciler = {
            let checks = Arc::clone(&checks);
            Reconciler::new(rt.clone())
                .leader_only(move || checks.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2)
        };
        reconciler
            .run_every(
                std::time::Duration::from_secs(60),
                tokio::time::sleep(std::time::Duration::from_secs(30)),
            )
            .await;
        let live = backend
            .live_jobs(&hephaestus_engine_core::ports::JobMatch::args(json!({})))
            .await
            .unwrap();
        assert_eq!(live.len(), 1, "one repair, then it stopped: {live:?}");
    }

    #[tokio::test]
    async fn healthy_instances_are_left_alone() {
        let clock = clock();
        let backend = MemoryBackend::with_clock(clock.clone());
        let rt = Runtime::builder(backend)
            .discard_handler(crate::FailureHandler::new())
            .clock(clock.clone())
            .workflow(linear())
            .workflow(pause())
            .build()
            .unwrap();
        rt.start("linear", "1", json!({}), StartOptions::default())
            .await
            .unwrap();
        rt.start("pause", "1", json!({}), StartOptions::default())
            .await
            .unwrap();
        rt.drain().await.unwrap();
        rt.start("linear", "2", json!({}), StartOptions::default())
            .await
            .unwrap();
        let report = Reconciler::new(rt).run_once().await.unwrap();
        assert_eq!(report.scanned, 2, "the waiting one and the new one");
        assert!(report.repaired.is_empty(), "{report:?}");
    }

    #[tokio::test]
    async fn a_lost_timer_is_rescheduled_and_fires() {
        let clock = clock();
        let backend = MemoryBackend::with_clock(clock.clone());
        let rt = Runtime::builder(backend.clone())
            .discard_handler(crate::FailureHandler::new())
            .clock(clock.clone())
            .workflow(pause())
            .build()
            .unwrap();
        let s = rt
            .start("pause", "1", json!({}), StartOptions::default())
            .await
            .unwrap();
        rt.drain().await.unwrap();
        cancel_all_jobs(&backend, s.id).await;
        let report = Reconciler::new(rt.clone()).run_once().await.unwrap();
        assert!(
            matches!(
                report.repaired.as_slice(),
                [Repair::Timer { activation: 1, .. }]
            ),
            "{report:?}"
        );
        clock.advance(std::time::Duration::from_secs(11));
        rt.drain().await.unwrap();
        assert_eq!(
            rt.get(s.id).await.unwrap().unwrap().status,
            InstanceStatus::Completed
        );
    }

    #[tokio::test]
    async fn instances_of_unregistered_workflows_are_reported_not_touched() {
        let (backend, _rt, clock, id) = lost_linear().await;
        let bare = Runtime::builder(backend.clone())
            .discard_handler(crate::FailureHandler::new())
            .clock(clock.clone())
            .build()
            .unwrap();
        let report = Reconciler::new(bare).run_once().await.unwrap();
        assert_eq!(report.unregistered, vec![id]);
        assert!(report.repaired.is_empty());
        assert!(
            backend
                .live_jobs(&jobs::of_instance(id))
                .await
                .unwrap()
                .is_empty()
        );
    }
}
