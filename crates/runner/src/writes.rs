//! The writes jobs end with, shared by every kind of job: recording a
//! result with its advance, completing a job that had nothing (more) to do,
//! closing an ended instance, a round's cancellations, and what follows a
//! committed round.

use hephaestus_engine_core::Workflow;
use hephaestus_engine_core::instance::Instance;
use hephaestus_engine_core::ports::{JobId, JobLease, NewStepResult, ResultPayload};
use uuid::Uuid;

use crate::backend::Backend;
use crate::error::RunnerError;
use crate::handle::Runtime;
use crate::jobs;
use crate::outcome::JobOutcome;
use crate::round::Round;

impl<B: Backend> Runtime<B> {
    /// Completes `lease` and records its step's `result` with the advance, in
    /// a unit of work of its own (what a batch does for many).
    pub(crate) async fn record_and_finish(
        &self,
        lease: &JobLease,
        wf: &Workflow,
        result: NewStepResult,
    ) -> Result<JobOutcome, RunnerError> {
        let b = &self.inner.backend;
        let mut tx = b.begin().await?;
        if !b.complete(&mut tx, lease).await? {
            // The job was cancelled or rescued meanwhile: this attempt's result
            // must not land (a result after cancel is ignored).
            return Ok(JobOutcome::Fenced);
        }
        let Some(step) = result.step else {
            return Err(RunnerError::Corrupt(format!(
                "a step result of instance {} without a step",
                result.instance_id
            )));
        };
        self.record_and_advance(
            tx,
            wf,
            result.instance_id,
            &step,
            result.activation,
            result.payload,
            &lease.meta,
        )
        .await?;
        Ok(JobOutcome::Succeeded)
    }

    /// Records a result of `step`'s `activation`, enqueues the instance's
    /// advance (carrying the trace context of `trace`, the meta of the job
    /// producing the result) and commits `tx`: the one commit every
    /// result-producing job ends with.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn record_and_advance(
        &self,
        mut tx: B::Tx,
        wf: &Workflow,
        instance_id: uuid::Uuid,
        step: &hephaestus_engine_core::StepId,
        activation: u32,
        payload: ResultPayload,
        trace: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), RunnerError> {
        self.record_and_enqueue_advance(&mut tx, wf, instance_id, step, activation, payload, trace)
            .await?;
        self.inner.backend.commit(tx).await?;
        self.inner.wake.notify_waiters();
        Ok(())
    }

    /// [`Self::record_and_advance`] without the commit.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn record_and_enqueue_advance(
        &self,
        tx: &mut B::Tx,
        wf: &Workflow,
        instance_id: uuid::Uuid,
        step: &hephaestus_engine_core::StepId,
        activation: u32,
        payload: ResultPayload,
        trace: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), RunnerError> {
        let b = &self.inner.backend;
        b.record(
            tx,
            &NewStepResult {
                instance_id,
                step: Some(step.clone()),
                activation,
                payload,
            },
        )
        .await?;
        b.enqueue(
            tx,
            &[crate::observe::carried(
                jobs::advance(&self.inner.config, wf, instance_id, Some(step)),
                trace,
            )],
        )
        .await?;
        Ok(())
    }

    /// Completes a job that had nothing (more) to do.
    pub(crate) async fn finish(
        &self,
        lease: &JobLease,
        outcome: JobOutcome,
    ) -> Result<JobOutcome, RunnerError> {
        let b = &self.inner.backend;
        let mut tx = b.begin().await?;
        if !b.complete(&mut tx, lease).await? {
            return Ok(JobOutcome::Fenced);
        }
        b.commit(tx).await?;
        Ok(outcome)
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
        let duration = u64::try_from((self.now() - round_started).num_milliseconds()).unwrap_or(0);
        let active = instance.open_steps().count();
        telemetry.emit_lazy(
            crate::telemetry::names::ENGINE_ADVANCE,
            || {
                let measurements = serde_json::json!({
                    "duration": duration,
                    "active_steps_count": active,
                    // Steps the round itself completed (`Done`, applied inline).
                    "completed_in_advance": round.done.len(),
                });
                let metadata = crate::telemetry::instance_metadata(
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
                );
                (measurements, metadata)
            },
            || {
                #[allow(clippy::cast_precision_loss)]
                crate::telemetry::metric::engine_advance(
                    instance.workflow_id.to_string(),
                    duration as f64,
                    active as f64,
                );
            },
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
        use crate::telemetry::names;
        let telemetry = &self.inner.telemetry;
        let span = crate::observe::inline_done_span(
            instance,
            step,
            activation,
            &self.inner.config.queues.execute,
        );
        let _in_span = span.enter();
        let meta = || {
            let key = self
                .workflow_of(instance)
                .ok()
                .and_then(|wf| wf.step(step.as_str()).map(|d| d.key.clone()))
                .unwrap_or_else(|| step.default_step_key());
            crate::telemetry::instance_metadata(
                instance,
                serde_json::Map::from_iter([
                    ("step".to_owned(), serde_json::json!(step)),
                    ("step_key".to_owned(), serde_json::json!(key)),
                    ("activation".to_owned(), serde_json::json!(activation)),
                    ("attempt".to_owned(), serde_json::json!(1)),
                    ("active_steps_count".to_owned(), serde_json::json!(1)),
                    ("concurrent".to_owned(), serde_json::json!(false)),
                ]),
            )
        };
        telemetry.emit_lazy(
            names::STEP_START,
            || (serde_json::json!({"system_time": self.now()}), meta()),
            || {},
        );
        telemetry.emit_lazy(
            names::STEP_STOP,
            || {
                let mut meta = meta();
                meta.insert("event".into(), serde_json::json!("done"));
                meta.insert("has_context_updates".into(), serde_json::json!(false));
                meta.insert("has_metadata_updates".into(), serde_json::json!(false));
                (serde_json::json!({"duration": 0}), meta)
            },
            || {
                crate::telemetry::metric::step_stop(
                    instance.workflow_id.to_string(),
                    step.to_string(),
                    0.0,
                );
            },
        );
    }
}
