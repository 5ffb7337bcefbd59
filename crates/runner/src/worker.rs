//! Running jobs: dispatch by kind, a synchronous drain for tests and demos,
//! and a worker loop with bounded concurrency.

use std::collections::HashMap;
use std::future::Future;

use hephaestus_engine_core::ports::{JobId, JobLease};
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::backend::Backend;
use crate::error::RunnerError;
use crate::handle::Runtime;
use crate::jobs::{self, AdvanceArgs, ExecuteArgs, ResumeArgs, TimerArgs, decode};
use crate::outcome::{DrainReport, JobOutcome, Settle};

impl<B: Backend> Runtime<B> {
    /// Runs one fetched job to its end (completed, retried or discarded).
    pub async fn perform(&self, lease: JobLease) -> JobOutcome {
        // One job at a time, as a drain counts them: no continuations.
        self.perform_job(lease, None, None, false).await
    }

    /// [`Runtime::perform`] for a job whose queue can ask it to stop (a
    /// cancel from another process): when `stop` fires, a running step is
    /// told to stop through its own cancellation signal. Every outcome is
    /// settled by the runtime itself, in the transaction that writes its
    /// consequences.
    pub async fn perform_linked(
        &self,
        lease: JobLease,
        stop: Option<&hephaestus_engine_core::step::CancellationSignal>,
    ) -> JobOutcome {
        self.perform_job(lease, stop, None, self.inner.config.continuations)
            .await
    }

    /// Runs one job; with `chain`, then the continuations it claimed
    /// (adopted through `adopt` when given).
    pub(crate) async fn perform_job(
        &self,
        lease: JobLease,
        stop: Option<&hephaestus_engine_core::step::CancellationSignal>,
        adopt: Option<&crate::execute::Adopt>,
        chain: bool,
    ) -> JobOutcome {
        let result = match lease.kind.as_str() {
            jobs::ADVANCE => match decode::<AdvanceArgs>(&lease) {
                Ok(args) => {
                    let span = crate::observe::job_span(&lease);
                    let settled = self
                        .settle(Settle::Advance {
                            lease: lease.clone(),
                            instance_id: args.instance_id,
                            chain,
                            origin: span.clone(),
                        })
                        .instrument(span)
                        .await;
                    match settled {
                        Ok(settled) => {
                            let outcome = settled.outcome;
                            self.run_chain(settled.into(), stop, adopt).await;
                            Ok(outcome)
                        }
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            },
            jobs::EXECUTE => match decode::<ExecuteArgs>(&lease) {
                Ok(args) => self.perform_execute(&lease, args, stop, adopt, chain).await,
                Err(e) => Err(e),
            },
            jobs::TIMER => match decode::<TimerArgs>(&lease) {
                Ok(args) => {
                    self.perform_timer(&lease, args)
                        .instrument(crate::observe::job_span(&lease))
                        .await
                }
                Err(e) => Err(e),
            },
            jobs::RESUME => match decode::<ResumeArgs>(&lease) {
                Ok(args) => {
                    self.perform_resume(&lease, args)
                        .instrument(crate::observe::job_span(&lease))
                        .await
                }
                Err(e) => Err(e),
            },
            other => Err(RunnerError::InvalidInput(format!(
                "unknown job kind {other:?}"
            ))),
        };
        match result {
            Ok(outcome) => outcome,
            Err(e) => self.job_error(&lease, &e).await,
        }
    }

    /// Runs due jobs one at a time, in every queue of this runtime, until none
    /// is due at the runtime's clock. Deterministic: for tests and demos.
    /// Refused without a discard handler ([`RunnerError::NoDiscardHandler`]).
    pub async fn drain(&self) -> Result<DrainReport, RunnerError> {
        self.discard_handler()?;
        let mut report = DrainReport::default();
        let queues = self.inner.config.queues.distinct();
        loop {
            let mut ran = 0;
            for queue in &queues {
                let leases = self.inner.backend.fetch(queue, 1, self.now()).await?;
                for lease in leases {
                    ran += 1;
                    report.add(self.perform(lease).await);
                }
            }
            if ran == 0 {
                return Ok(report);
            }
        }
    }

    /// Runs jobs with up to `concurrency` at once until `shutdown` resolves,
    /// then waits for the running ones. A job may go on with the
    /// continuations its settling commit claimed
    /// ([`RunnerConfig::continuations`](crate::RunnerConfig::continuations)),
    /// in its slot, before the slot is free again.
    pub async fn run(
        &self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<DrainReport, RunnerError> {
        self.discard_handler()?;
        let mut report = DrainReport::default();
        let mut running: JoinSet<(JobId, JobOutcome)> = JoinSet::new();
        let mut leases_held: HashMap<JobId, u32> = HashMap::new();
        let queues = self.inner.config.queues.distinct();
        let concurrency = self.inner.config.concurrency.max(1);
        let poll = self.inner.config.poll_interval;
        let mut heartbeat = tokio::time::interval(self.inner.config.heartbeat_interval);
        let mut rescue = tokio::time::interval(self.inner.config.rescue_interval);
        tokio::pin!(shutdown);
        loop {
            // Taken before the fetch: a commit of another runtime that
            // enqueues meanwhile still wakes this loop.
            let enqueued = self.inner.backend.enqueued_wake();
            let fetched = self
                .fetch_and_spawn(&queues, concurrency, &mut running, &mut leases_held)
                .await;
            if fetched > 0 {
                continue;
            }
            let notified = self.inner.wake.notified();
            tokio::select! {
                () = &mut shutdown => break,
                Some(done) = running.join_next(), if !running.is_empty() => {
                    if let Ok((id, outcome)) = done {
                        leases_held.remove(&id);
                        report.add(outcome);
                    }
                }
                _ = heartbeat.tick() => {
                    let leases: Vec<(JobId, u32)> = leases_held.iter().map(|(id, a)| (*id, *a)).collect();
                    if let Err(e) = self.inner.backend.heartbeat(&leases).await {
                        tracing::warn!(error = %e, "heartbeat failed");
                    }
                }
                _ = rescue.tick() => {
                    if let Err(e) = self.rescue_stale().await {
                        tracing::warn!(error = %e, "rescue pass failed");
                    }
                }
                () = notified => {}
                () = enqueued => {}
                () = tokio::time::sleep(poll) => {}
            }
        }
        while let Some(done) = running.join_next().await {
            if let Ok((_, outcome)) = done {
                report.add(outcome);
            }
        }
        Ok(report)
    }

    /// One look for work in every queue, as many jobs as `concurrency`
    /// leaves room for, each run in a task of `running`; how many started.
    async fn fetch_and_spawn(
        &self,
        queues: &[String],
        concurrency: usize,
        running: &mut JoinSet<(JobId, JobOutcome)>,
        leases_held: &mut HashMap<JobId, u32>,
    ) -> usize {
        let mut fetched = 0;
        for queue in queues {
            let free = concurrency.saturating_sub(running.len());
            if free == 0 {
                break;
            }
            let limit = u32::try_from(free).unwrap_or(u32::MAX);
            let leases = match self.inner.backend.fetch(queue, limit, self.now()).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, queue, "fetch failed");
                    Vec::new()
                }
            };
            for lease in leases {
                fetched += 1;
                leases_held.insert(lease.id, lease.attempt);
                let rt = self.clone();
                running.spawn(async move {
                    let id = lease.id;
                    // With continuations on, the steps its result
                    // activates may follow in this slot (claimed in the
                    // settling commit, heartbeated by the runner).
                    let chain = rt.inner.config.continuations;
                    (id, rt.perform_job(lease, None, None, chain).await)
                });
            }
        }
        fetched
    }
}
