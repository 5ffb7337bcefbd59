//! The advance job: the single writer of an instance.
//!
//! Under the instance lock it loads the instance, applies every pending step
//! result in sequence order with the pure engine, persists the instance, marks
//! the results processed and enqueues the jobs for what became due (execute
//! jobs for NEWLY activated steps only, timers, cancellations), all in one
//! commit. An advance job completes in that same commit, after one round: a
//! result that commits later enqueued a fresh advance (an executing advance
//! holds no uniqueness), and one that merged into this job's key while it
//! was still available kept it locked (queue-pg locks a unique holder
//! `for share` until the merging commit), so the job could not start
//! before that result was visible. No wake-up is lost (G3). A direct
//! [`Runtime::advance`] (no job) loops while rounds apply something.

use std::collections::VecDeque;

use hephaestus_engine_core::Workflow;
use hephaestus_engine_core::engine::{Disposition, Effect, Engine, EngineEvent, Input};
use hephaestus_engine_core::instance::{Instance, InstanceStatus};
use hephaestus_engine_core::ports::{JobId, JobLease, NewJob, NewStepResult};
use hephaestus_engine_core::step::Completion;
use hephaestus_engine_core::steps::DONE_ID;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::error::RunnerError;
use crate::jobs;
use crate::runtime::{Backend, Runtime};

/// What one advance did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdvanceReport {
    /// Rounds run (each one commit).
    pub rounds: u32,
    /// Results applied.
    pub applied: usize,
    /// Results ignored as stale or duplicate, or rejected.
    pub ignored: usize,
    /// Step executions enqueued.
    pub executions: usize,
    /// The status after the last round.
    pub status: Option<InstanceStatus>,
    /// Whether the advance job itself was completed by the last round.
    pub job_completed: bool,
}

/// One input of a round: a stored result (with its `seq`, marked processed
/// by the round) or a result applied as it is recorded (no `seq` yet).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RoundInput<'a> {
    pub seq: Option<i64>,
    pub result: &'a NewStepResult,
}

/// What one round decided for one instance: the writes, and the telemetry
/// for after the commit.
#[derive(Debug)]
pub(crate) struct Round {
    pub status_before: InstanceStatus,
    /// The instance changed and must be written.
    pub changed: bool,
    /// Stored results the round consumed (refused ones included).
    pub seqs: Vec<i64>,
    /// Stored results the round refused, with the reason: recorded as
    /// refused, so they no longer hold their slot (see
    /// [`Refused`](hephaestus_engine_core::ports::Refused)).
    pub refused_stored: Vec<(i64, String)>,
    /// Results applied as they are recorded (inputs without a `seq`) that
    /// the round refused: the position among those inputs, and the reason.
    pub refused_new: Vec<(usize, String)>,
    /// Jobs to enqueue (none once the instance ended).
    pub new_jobs: Vec<NewJob>,
    /// Timers of resumed steps to cancel.
    pub cancel_timers: Vec<(hephaestus_engine_core::StepId, u32)>,
    /// The instance ended: cancel its remaining jobs, signal its steps.
    pub cancel_all: bool,
    /// `Done` activations the round applied inline (no job ran them): each
    /// still reports its `step.start` and `step.stop`.
    pub done: Vec<(hephaestus_engine_core::StepId, u32)>,
    pub events: Vec<EngineEvent>,
    pub applied: usize,
    pub ignored: usize,
    pub executions: usize,
}

impl Round {
    fn new(status_before: InstanceStatus) -> Self {
        Self {
            status_before,
            changed: false,
            seqs: Vec::new(),
            refused_stored: Vec::new(),
            refused_new: Vec::new(),
            new_jobs: Vec::new(),
            cancel_timers: Vec::new(),
            cancel_all: false,
            done: Vec::new(),
            events: Vec::new(),
            applied: 0,
            ignored: 0,
            executions: 0,
        }
    }
}

/// Why the engine ignored a result, as kept with a refused row.
fn ignored_reason(why: &hephaestus_engine_core::Ignored) -> String {
    use hephaestus_engine_core::Ignored;
    match why {
        Ignored::InstanceFinished(status) => format!("the instance is {status}"),
        Ignored::AlreadyStarted => "the instance was already started".to_owned(),
        Ignored::StaleActivation { step, activation } => {
            format!("activation {activation} of step {step} is not active")
        }
        Ignored::StaleTimer { step, activation } => {
            format!("step {step} (activation {activation}) no longer waits on its timer")
        }
    }
}

impl<B: Backend> Runtime<B> {
    /// Runs the advance of one instance (what an advance job does).
    pub async fn advance(
        &self,
        instance_id: Uuid,
        current_job: Option<JobId>,
    ) -> Result<AdvanceReport, RunnerError> {
        self.advance_with(instance_id, current_job, None).await
    }

    /// The advance of an advance job: the job completes in the commit of
    /// the last (empty) round rather than in a transaction of its own.
    pub(crate) async fn advance_job(
        &self,
        instance_id: Uuid,
        lease: &JobLease,
    ) -> Result<AdvanceReport, RunnerError> {
        self.advance_with(instance_id, Some(lease.id), Some(lease))
            .await
    }

    async fn advance_with(
        &self,
        instance_id: Uuid,
        current_job: Option<JobId>,
        lease: Option<&JobLease>,
    ) -> Result<AdvanceReport, RunnerError> {
        let mut report = AdvanceReport::default();
        loop {
            report.rounds += 1;
            let worked = self
                .advance_round(instance_id, current_job, lease, &mut report)
                .await?;
            // An advance job ends with its first round, whose commit also
            // completes it: a result that arrives while the job runs enqueues
            // a fresh advance (an executing advance holds no uniqueness), so
            // no wake-up is lost without a second, usually empty, round.
            if !worked
                || report.job_completed
                || report.rounds >= self.inner.config.advance_loop_limit
            {
                return Ok(report);
            }
        }
    }

    /// One locked round; returns whether it applied anything. `lease` (if
    /// any) is completed in the round's commit.
    async fn advance_round(
        &self,
        instance_id: Uuid,
        current_job: Option<JobId>,
        lease: Option<&JobLease>,
        report: &mut AdvanceReport,
    ) -> Result<bool, RunnerError> {
        let span = crate::observe::round_span(instance_id, lease.map(|l| &l.meta));
        self.advance_round_in(instance_id, current_job, lease, report)
            .instrument(span)
            .await
    }

    async fn advance_round_in(
        &self,
        instance_id: Uuid,
        current_job: Option<JobId>,
        lease: Option<&JobLease>,
        report: &mut AdvanceReport,
    ) -> Result<bool, RunnerError> {
        let b = &self.inner.backend;
        let round_started = self.now();
        let mut tx = b.begin().await?;
        let mut instance = self.lock_existing(&mut tx, instance_id).await?;
        // A missing definition is a typed error; the instance stays untouched
        // and the job retries until the workflow is registered again.
        let wf = self.workflow_of(&instance)?.clone();
        let pending = b.pending(&mut tx, instance_id).await?;
        let inputs: Vec<RoundInput<'_>> = pending
            .iter()
            .map(|row| RoundInput {
                seq: Some(row.seq),
                result: &row.result,
            })
            .collect();
        let round = self.plan_round(&wf, &mut instance, &inputs)?;
        report.applied += round.applied;
        report.ignored += round.ignored;
        report.executions += round.executions;
        if !round.changed && pending.is_empty() {
            report.status = Some(instance.status);
            if let Some(lease) = lease {
                report.job_completed = b.complete(&mut tx, lease).await?;
                b.commit(tx).await?;
            }
            return Ok(false);
        }
        if round.changed {
            b.update(&mut tx, &instance).await?;
        }
        if round.refused_stored.is_empty() {
            b.mark_processed(&mut tx, instance_id, &round.seqs).await?;
        } else {
            // A refusal marks its row processed too, keeping the reason and
            // freeing the slot (a refused row never blocks a valid result).
            let applied: Vec<i64> = round
                .seqs
                .iter()
                .copied()
                .filter(|seq| !round.refused_stored.iter().any(|(r, _)| r == seq))
                .collect();
            b.mark_processed(&mut tx, instance_id, &applied).await?;
            b.refuse(&mut tx, instance_id, &round.refused_stored)
                .await?;
        }
        self.cancel_round_jobs(&mut tx, instance_id, &round, current_job)
            .await?;
        if !round.new_jobs.is_empty() {
            b.enqueue(&mut tx, &round.new_jobs).await?;
        }
        if let Some(lease) = lease {
            // A fenced lease (rescued meanwhile) still commits the round: it
            // ran under the instance lock, so what it applied is applied once,
            // and the rescued attempt will find nothing left to do.
            report.job_completed = b.complete(&mut tx, lease).await?;
        }
        let settle = tracing::Span::current();
        crate::observe::record_round(&settle, instance.status);
        b.commit(tx)
            .instrument(crate::observe::commit_span(&settle, 1))
            .await?;
        self.after_round(&instance, &round, round_started, report.rounds);
        report.status = Some(instance.status);
        Ok(true)
    }

    /// Applies a round's inputs to a locked `instance` with the pure engine
    /// (first the start of a pending instance, then each input in order) and
    /// returns what to write. `Done` activations are applied at once (its
    /// outcome is fixed: it completes with `done`), so the end of a workflow
    /// costs no job.
    pub(crate) fn plan_round(
        &self,
        wf: &Workflow,
        instance: &mut Instance,
        inputs: &[RoundInput<'_>],
    ) -> Result<Round, RunnerError> {
        let engine = Engine::new(wf);
        // A state that does not match its definition is an error of the job
        // (retried, then the instance fails with the reason), not of a result.
        engine.check(instance)?;
        let instance_id = instance.id;
        let now = self.now();
        let mut round = Round::new(instance.status);
        let mut effects: VecDeque<Effect> = VecDeque::new();
        if instance.status == InstanceStatus::Pending {
            let applied = engine.apply(instance, Input::Start, now)?;
            round.changed = true;
            effects.extend(applied.effects);
        }
        let mut new_position = 0;
        for input in inputs {
            let refusal = match input.result.to_input() {
                Err(e) => {
                    tracing::warn!(instance_id = %instance_id, seq = ?input.seq, error = %e, "step result cannot be decoded; refused");
                    Some(format!("cannot be decoded: {e}"))
                }
                Ok(decoded) => match engine.apply(instance, decoded, now) {
                    Ok(applied) => match applied.disposition {
                        Disposition::Applied | Disposition::Deferred => {
                            round.changed = true;
                            round.applied += 1;
                            effects.extend(applied.effects);
                            None
                        }
                        Disposition::Ignored(why) => {
                            tracing::debug!(instance_id = %instance_id, seq = ?input.seq, reason = ?why, "step result ignored");
                            Some(ignored_reason(&why))
                        }
                    },
                    Err(e) => {
                        tracing::warn!(instance_id = %instance_id, seq = ?input.seq, error = %e, "step result refused");
                        Some(e.to_string())
                    }
                },
            };
            if refusal.is_some() {
                round.ignored += 1;
            }
            match (input.seq, refusal) {
                (Some(seq), refusal) => {
                    round.seqs.push(seq);
                    if let Some(reason) = refusal {
                        round.refused_stored.push((seq, reason));
                    }
                }
                (None, refusal) => {
                    if let Some(reason) = refusal {
                        round.refused_new.push((new_position, reason));
                    }
                    new_position += 1;
                }
            }
        }
        let config = &self.inner.config;
        while let Some(effect) = effects.pop_front() {
            match effect {
                Effect::Execute { step, activation } if step.as_str() == DONE_ID => {
                    // The terminal step has a fixed outcome: apply it here
                    // instead of running a job for it.
                    round.done.push((step.clone(), activation));
                    let applied = engine.apply(
                        instance,
                        Input::Completed {
                            step,
                            activation,
                            completion: Completion::new("done"),
                        },
                        now,
                    )?;
                    if matches!(
                        applied.disposition,
                        Disposition::Applied | Disposition::Deferred
                    ) {
                        effects.extend(applied.effects);
                    }
                }
                Effect::Execute { step, activation } => {
                    round.executions += 1;
                    let mut job = jobs::execute(config, wf, instance_id, &step, activation);
                    crate::observe::carry(&mut job, &instance.telemetry_metadata);
                    round.new_jobs.push(job);
                }
                Effect::ScheduleTimer {
                    step,
                    activation,
                    fire_at,
                    event,
                } => {
                    let mut job =
                        jobs::timer(config, wf, instance_id, &step, activation, &event, fire_at);
                    crate::observe::carry(&mut job, &instance.telemetry_metadata);
                    round.new_jobs.push(job);
                }
                Effect::CancelTimer { step, activation } => {
                    round.cancel_timers.push((step, activation));
                }
                Effect::CancelJobs => round.cancel_all = true,
                Effect::Emit(event) => round.events.push(event),
            }
        }
        if round.cancel_all {
            // The instance ended: nothing else of it may run (its executions,
            // timers and scheduled resumes).
            round.new_jobs.clear();
        }
        Ok(round)
    }

    /// The cancellations of a round in `tx`: timers of resumed steps, and
    /// every job of an ended instance (except `current_job`).
    pub(crate) async fn cancel_round_jobs(
        &self,
        tx: &mut B::Tx,
        instance_id: Uuid,
        round: &Round,
        current_job: Option<JobId>,
    ) -> Result<(), RunnerError> {
        let b = &self.inner.backend;
        for (step, activation) in &round.cancel_timers {
            b.cancel_matching(tx, &jobs::timer_of(instance_id, step, *activation), None)
                .await?;
        }
        if round.cancel_all {
            self.close_ended(tx, instance_id, current_job).await?;
        }
        Ok(())
    }

    /// What ends an ended instance's work, in `tx` (its lock held): every
    /// job of it cancelled (except `current_job`), THEN every result still
    /// in its inbox marked processed (it can no longer apply). In this
    /// order, a result recorded concurrently is never stranded: committed
    /// before the cancel, its advance job is cancelled but the inbox read
    /// after the cancel sees it; committed later, its advance job survives
    /// and marks it.
    pub(crate) async fn close_ended(
        &self,
        tx: &mut B::Tx,
        instance_id: Uuid,
        current_job: Option<JobId>,
    ) -> Result<(), RunnerError> {
        let b = &self.inner.backend;
        b.cancel_matching(tx, &jobs::of_instance(instance_id), current_job)
            .await?;
        let left: Vec<(i64, String)> = b
            .pending(tx, instance_id)
            .await?
            .iter()
            .map(|row| (row.seq, "arrived after its instance ended".to_owned()))
            .collect();
        if !left.is_empty() {
            b.refuse(tx, instance_id, &left).await?;
        }
        Ok(())
    }

    /// What follows a committed round: running steps of an ended instance
    /// told to stop, local workers woken, telemetry.
    pub(crate) fn after_round(
        &self,
        instance: &Instance,
        round: &Round,
        round_started: chrono::DateTime<chrono::Utc>,
        iteration: u32,
    ) {
        if round.cancel_all {
            self.signal_cancelled(instance.id);
        }
        if !round.new_jobs.is_empty() {
            self.inner.wake.notify_waiters();
        }
        if instance.status.is_terminal() && !round.status_before.is_terminal() {
            crate::observe::instance_ended(instance, self.now());
        }
        let telemetry = &self.inner.telemetry;
        for (step, activation) in &round.done {
            self.emit_inline_done(instance, step, *activation);
        }
        telemetry.engine_events(instance, &round.events, self.now());
        telemetry.emit(
            crate::telemetry::names::ENGINE_ADVANCE,
            serde_json::json!({
                "duration": u64::try_from((self.now() - round_started).num_milliseconds()).unwrap_or(0),
                "active_steps_count": instance.open_steps().count(),
                // Steps the round itself completed (`Done`, applied inline).
                "completed_in_advance": round.done.len(),
            }),
            crate::telemetry::instance_metadata(
                instance,
                serde_json::Map::from_iter([
                    (
                        "status_before".to_owned(),
                        serde_json::json!(round.status_before),
                    ),
                    (
                        "status_after".to_owned(),
                        serde_json::json!(instance.status),
                    ),
                    ("iteration".to_owned(), serde_json::json!(iteration)),
                ]),
            ),
        );
    }

    /// `step.start` and `step.stop` of a `Done` applied inline, as a job
    /// running it would report them (it takes no time).
    fn emit_inline_done(
        &self,
        instance: &Instance,
        step: &hephaestus_engine_core::StepId,
        activation: u32,
    ) {
        let key = self
            .workflow_of(instance)
            .ok()
            .and_then(|wf| wf.step(step.as_str()).map(|d| d.key.clone()))
            .unwrap_or_else(|| step.default_step_key());
        let meta = crate::telemetry::instance_metadata(
            instance,
            serde_json::Map::from_iter([
                ("step".to_owned(), serde_json::json!(step)),
                ("step_key".to_owned(), serde_json::json!(key)),
                ("activation".to_owned(), serde_json::json!(activation)),
                ("attempt".to_owned(), serde_json::json!(1)),
                ("active_steps_count".to_owned(), serde_json::json!(1)),
                ("concurrent".to_owned(), serde_json::json!(false)),
            ]),
        );
        let span = crate::observe::inline_done_span(
            instance,
            step,
            activation,
            &self.inner.config.queues.execute,
        );
        let _in_span = span.enter();
        let telemetry = &self.inner.telemetry;
        telemetry.emit(
            crate::telemetry::names::STEP_START,
            serde_json::json!({"system_time": self.now()}),
            meta.clone(),
        );
        let mut meta = meta;
        meta.insert("event".into(), serde_json::json!("done"));
        meta.insert("has_context_updates".into(), serde_json::json!(false));
        meta.insert("has_metadata_updates".into(), serde_json::json!(false));
        telemetry.emit(
            crate::telemetry::names::STEP_STOP,
            serde_json::json!({"duration": 0}),
            meta,
        );
    }
}
