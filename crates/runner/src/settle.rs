//! Batched orchestration: group commit of finished steps and advances.
//!
//! Step executions and advance jobs run concurrently, each in its own task.
//! Instead of one unit of work each, they hand their last write to a
//! [`Batcher`]: the first of them to find no batch in progress (up to
//! [`RunnerConfig::batch_flushers`](crate::RunnerConfig) at once) takes
//! everything queued so far and settles it in ONE unit of work, while the
//! others wait for their answer. On an idle system a batch holds one job and
//! adds no delay; under load batches grow by themselves.
//!
//! One settling unit of work, for a batch of step results and advance jobs:
//!
//! 1. takes the single-writer lock of every instance involved that no other
//!    writer holds, **without waiting** ([`Backend::try_lock_many`]);
//! 2. for each locked instance: reads its inbox (only if the lock statement
//!    saw unprocessed results in it), applies the inbox and the batch's new
//!    results with the pure engine ([`round::plan`](crate::round::plan));
//! 3. records the new results (those of locked instances as already
//!    processed), marks the inbox processed and writes the instances
//!    ([`Backend::write_rounds`]), cancels jobs;
//! 4. enqueues the new jobs and completes every job of the batch, fenced by
//!    attempt ([`Backend::enqueue_and_complete`], one statement on
//!    PostgreSQL): if a step result's lease no longer holds (its job was
//!    cancelled or rescued meanwhile), that attempt's result must not land,
//!    so the batch rolls back and each job is settled on its own;
//! 5. commits.
//!
//! An instance whose lock is held elsewhere is not waited for: its results
//! go to the inbox with an advance job, exactly as without batching (the
//! holder, or that advance, applies them: no wake-up is lost, G3). An
//! advance job whose instance could not be locked, or any job of a batch
//! whose unit of work failed, is settled on its own, as without batching:
//! nothing of a failed batch was committed.

use std::collections::{BTreeMap, HashMap};

use hephaestus_engine_core::StepId;
use hephaestus_engine_core::Workflow;
use hephaestus_engine_core::instance::Instance;
use hephaestus_engine_core::ports::{
    Consumed, Enqueued, JobLease, NewJob, NewStepResult, PortError, RoundResult, StepResult,
};
use uuid::Uuid;

use crate::backend::{Backend, ExecutionRequest, InboxRows, Locked, RoundWrites, Settlement};
use crate::continuations::{self, Offer};
use crate::error::RunnerError;
use crate::handle::{Answer, Runtime};
use crate::jobs;
use crate::outcome::{JobOutcome, Preflight, Settle, Settled};
use crate::round::{self, Round, RoundInput};

fn abandoned() -> RunnerError {
    RunnerError::Backend(PortError::Unavailable(
        "the batch carrying this job was abandoned".into(),
    ))
}

/// A locked instance being advanced in a batch.
struct Plan {
    instance: Instance,
    wf: Workflow,
    round: Round,
}

/// Why a batch's unit of work did not commit.
#[derive(Debug, thiserror::Error)]
enum BatchFailed {
    /// A result's lease no longer held.
    #[error("a job of the batch was cancelled or rescued meanwhile")]
    Fenced,
    #[error(transparent)]
    Runner(#[from] RunnerError),
}

impl From<PortError> for BatchFailed {
    fn from(e: PortError) -> Self {
        Self::Runner(e.into())
    }
}

/// What a batch decided: an answer per item, or `None` for the items to
/// settle on their own after the commit.
type Decided = Vec<Option<Answer>>;

impl<B: Backend> Runtime<B> {
    /// What a step execution checks before running user code, read in one
    /// statement with the other executions starting at the same time.
    pub(crate) async fn preflight(
        &self,
        instance_id: Uuid,
        step: StepId,
        activation: u32,
    ) -> Result<Preflight, RunnerError> {
        let rt = self.clone();
        self.inner
            .batches
            .preflight
            .submit(
                ExecutionRequest {
                    instance_id,
                    step,
                    activation,
                },
                None,
                move |batch| {
                    let rt = rt.clone();
                    async move {
                        match rt.inner.backend.load_for_execution_many(&batch).await {
                            Ok(checks) => checks
                                .into_iter()
                                .map(|check| Ok(check.map(|c| (c.instance, c.recorded))))
                                .collect(),
                            // Every caller gets the error's own kind (a
                            // NotFound stays NotFound).
                            Err(e) => batch.iter().map(|_| Err(e.same_kind().into())).collect(),
                        }
                    }
                },
            )
            .await
            .unwrap_or_else(|| Err(abandoned()))
    }

    /// Settles `item` in a batch with whatever else is being settled.
    pub(crate) async fn settle(&self, item: Settle) -> Answer {
        let rt = self.clone();
        let key = Some(item.instance_id());
        self.inner
            .batches
            .settle
            .submit(item, key, move |batch| {
                let rt = rt.clone();
                async move { rt.settle_batch(batch).await }
            })
            .await
            .unwrap_or_else(|| Err(abandoned()))
    }

    async fn settle_batch(&self, items: Vec<Settle>) -> Vec<Answer> {
        let decided = match self.settle_together(&items).await {
            Ok(decided) => decided,
            Err(BatchFailed::Runner(e)) if items.len() == 1 => return vec![Err(e)],
            Err(e) => {
                // Nothing of the batch committed: settle each on its own.
                tracing::debug!(error = %e, jobs = items.len(), "a batch failed; settling its jobs one by one");
                items.iter().map(|_| None).collect()
            }
        };
        let mut answers = Vec::with_capacity(items.len());
        for (item, decided) in items.iter().zip(decided) {
            answers.push(match decided {
                Some(answer) => answer,
                None => self.settle_alone(item).await,
            });
        }
        answers
    }

    /// One item on its own: the unbatched path.
    async fn settle_alone(&self, item: &Settle) -> Answer {
        match item {
            Settle::Result {
                lease, wf, result, ..
            } => self
                .record_and_finish(lease, wf, result.clone())
                .await
                .map(Settled::from),
            Settle::Advance {
                lease, instance_id, ..
            } => self
                .advance_alone(lease, *instance_id)
                .await
                .map(Settled::from),
        }
    }

    /// The batch's unit of work (see the module docs), in its named steps:
    /// lock and plan, write, offer continuations, enqueue and complete,
    /// commit, then answer each item.
    async fn settle_together(&self, items: &[Settle]) -> Result<Decided, BatchFailed> {
        let b = &self.inner.backend;
        let started = self.now();
        crate::observe::record_batch(items.len());
        let spans = settle_spans(items);
        let mut tx = b.begin().await?;
        let unit = self.lock_and_plan(&mut tx, items).await?;
        let new_jobs = self.write(&mut tx, &unit).await?;
        let offer = if self.inner.config.continuations {
            continuations::offer(
                &unit.candidates(),
                &new_jobs.jobs,
                &self.inner.batches.extra_slots,
            )
        } else {
            Offer::default()
        };
        let (enqueued, held) = self
            .enqueue_and_complete(&mut tx, &unit, new_jobs.jobs, &offer.claim)
            .await?;
        let commits: Vec<tracing::Span> = spans
            .iter()
            .zip(items)
            .map(|(span, item)| {
                if let Some(plan) = unit.plans.get(&item.instance_id()) {
                    crate::observe::record_round(span, plan.instance.status);
                }
                crate::observe::commit_span(span, items.len())
            })
            .collect();
        b.commit(tx).await?;
        drop(commits);
        let decided = unit.answers(held, offer, enqueued);
        if new_jobs.waiting {
            self.inner.wake.notify_waiters();
        }
        let advanced = unit.plans.len();
        for plan in unit.plans.into_values() {
            self.after_round(&plan.instance, &plan.round, started, 1);
        }
        tracing::trace!(jobs = items.len(), advanced, "batch settled");
        Ok(decided)
    }

    /// Step 1: takes the lock of every instance of the batch that no other
    /// writer holds, without waiting, reads the inboxes that may hold
    /// results, and plans each locked instance's round: its inbox, then the
    /// batch's new results. An instance that cannot be planned here (a
    /// missing definition, a corrupt state) is left to its advance job,
    /// which reports the error.
    async fn lock_and_plan<'a>(
        &self,
        tx: &mut B::Tx,
        items: &'a [Settle],
    ) -> Result<Unit<'a>, BatchFailed> {
        let b = &self.inner.backend;
        let (results, advances): (Vec<usize>, Vec<usize>) =
            (0..items.len()).partition(|&i| matches!(items[i], Settle::Result { .. }));
        let ids: Vec<Uuid> = results
            .iter()
            .chain(&advances)
            .map(|&i| items[i].instance_id())
            .collect();
        let mut locked: Vec<(Instance, Workflow)> = Vec::new();
        // Locked instances whose inbox may hold results (usually none: a
        // result is applied as it is recorded when its instance is free).
        let mut with_inbox: Vec<Uuid> = Vec::new();
        for Locked { instance, inbox } in b.try_lock_many(tx, &ids).await? {
            if let Ok(wf) = self.workflow_of(&instance) {
                let wf = wf.clone();
                if inbox {
                    with_inbox.push(instance.id);
                }
                locked.push((instance, wf));
            }
        }
        let pending = if with_inbox.is_empty() {
            HashMap::new()
        } else {
            b.pending_many(tx, &with_inbox).await?
        };
        let plans = self.plan_locked(items, &results, locked, pending);
        // The advance jobs whose instance was planned (the others are
        // settled on their own, waiting for the lock).
        let planned_advances = advances
            .iter()
            .copied()
            .filter(|&i| plans.contains_key(&items[i].instance_id()))
            .collect();
        Ok(Unit {
            items,
            results,
            advances,
            advanced: planned_advances,
            plans,
        })
    }

    /// Plans the round of each locked instance.
    fn plan_locked(
        &self,
        items: &[Settle],
        results: &[usize],
        locked: Vec<(Instance, Workflow)>,
        mut pending: HashMap<Uuid, Vec<StepResult>>,
    ) -> BTreeMap<Uuid, Plan> {
        let mut new_results: HashMap<Uuid, Vec<&NewStepResult>> = HashMap::new();
        for &i in results {
            if let Settle::Result { result, .. } = &items[i] {
                new_results
                    .entry(result.instance_id)
                    .or_default()
                    .push(result);
            }
        }
        let now = self.now();
        let mut plans = BTreeMap::new();
        for (mut instance, wf) in locked {
            let id = instance.id;
            let stored = pending.remove(&id).unwrap_or_default();
            let inputs: Vec<RoundInput<'_>> = stored
                .iter()
                .map(|row| RoundInput {
                    seq: Some(row.seq),
                    result: &row.result,
                })
                .chain(
                    new_results
                        .get(&id)
                        .into_iter()
                        .flatten()
                        .map(|result| RoundInput { seq: None, result }),
                )
                .collect();
            match round::plan(&wf, &mut instance, &inputs, now, &self.inner.config) {
                Ok(round) => {
                    plans.insert(
                        id,
                        Plan {
                            instance,
                            wf,
                            round,
                        },
                    );
                }
                Err(e) => {
                    tracing::debug!(instance_id = %id, error = %e, "instance not advanced in a batch");
                }
            }
        }
        plans
    }

    /// Step 2: records the new results (those of planned instances as
    /// already processed, or refused), marks the inboxes, writes the changed
    /// instances and cancels what the rounds cancel. Returns the jobs to
    /// enqueue, each with its instance: the rounds' own, then one advance
    /// per instance whose results wait in its inbox (in id order, so
    /// concurrent batches take the unique keys in one order).
    async fn write(&self, tx: &mut B::Tx, unit: &Unit<'_>) -> Result<NewJobs, BatchFailed> {
        let b = &self.inner.backend;
        let changed: Vec<&Instance> = unit
            .plans
            .values()
            .filter(|p| p.round.changed)
            .map(|p| &p.instance)
            .collect();
        b.write_rounds(
            tx,
            RoundWrites {
                results: &unit.records(),
                consumed: &unit.consumed(),
                instances: &changed,
            },
        )
        .await?;
        for (id, plan) in &unit.plans {
            let own_job = unit
                .advances
                .iter()
                .find(|&&i| unit.items[i].instance_id() == *id)
                .map(|&i| unit.items[i].lease().id);
            self.cancel_round_jobs(tx, *id, &plan.round, own_job)
                .await?;
        }
        let mut jobs: Vec<(Uuid, NewJob)> = unit
            .plans
            .values()
            .flat_map(|p| {
                p.round
                    .new_jobs
                    .iter()
                    .map(|job| (p.round.instance_id, job.clone()))
            })
            .collect();
        let waiting = unit.waiting();
        let config = &self.inner.config;
        jobs.extend(waiting.iter().map(|(id, (wf, step, lease))| {
            let job = jobs::advance(config, wf, *id, Some(step));
            (*id, crate::observe::carried(job, &lease.meta))
        }));
        Ok(NewJobs {
            jobs,
            waiting: !waiting.is_empty(),
        })
    }

    /// Step 4: enqueues the new jobs (those claimed come back as leases)
    /// and completes every result's job and every planned advance job,
    /// fenced by attempt. A result whose lease no longer holds (its job was
    /// cancelled or rescued meanwhile) must not land: nothing of the batch
    /// commits ([`BatchFailed::Fenced`]). Returns the enqueued jobs and
    /// whether each planned advance's lease held.
    async fn enqueue_and_complete(
        &self,
        tx: &mut B::Tx,
        unit: &Unit<'_>,
        jobs: Vec<(Uuid, NewJob)>,
        claim: &[bool],
    ) -> Result<(Vec<(Enqueued, Option<JobLease>)>, Vec<bool>), BatchFailed> {
        let jobs: Vec<NewJob> = jobs.into_iter().map(|(_, job)| job).collect();
        let leases: Vec<&JobLease> = unit
            .results
            .iter()
            .chain(&unit.advanced)
            .map(|&i| unit.items[i].lease())
            .collect();
        let mut done = self
            .inner
            .backend
            .enqueue_and_complete(
                tx,
                Settlement {
                    jobs: &jobs,
                    claim,
                    leases: &leases,
                },
            )
            .await?;
        if done.held[..unit.results.len()].iter().any(|held| !held) {
            return Err(BatchFailed::Fenced);
        }
        let held = done.held.split_off(unit.results.len());
        Ok((done.enqueued, held))
    }
}

/// Each job's share of a settling unit of work, in its instance's trace
/// (nothing is built when no subscriber wants the spans).
fn settle_spans(items: &[Settle]) -> Vec<tracing::Span> {
    if !crate::observe::spans_enabled() {
        return Vec::new();
    }
    items
        .iter()
        .map(|item| {
            crate::observe::settle_span(
                item.origin(),
                item.lease(),
                item.instance_id(),
                items.len(),
            )
        })
        .collect()
}

/// The jobs a batch enqueues, each with its instance.
struct NewJobs {
    jobs: Vec<(Uuid, NewJob)>,
    /// Results of instances not advanced here wait in their inbox (an
    /// advance job for each is among `jobs`).
    waiting: bool,
}

/// One settling unit of work: the batch, by kind, and the rounds planned
/// for the instances it locked.
struct Unit<'a> {
    items: &'a [Settle],
    /// Indexes of the step results.
    results: Vec<usize>,
    /// Indexes of the advance jobs.
    advances: Vec<usize>,
    /// Indexes of the advance jobs whose instance was planned.
    advanced: Vec<usize>,
    plans: BTreeMap<Uuid, Plan>,
}

impl Unit<'_> {
    /// The items that can run a continuation, in the order they are served
    /// (results first, then advances), with their instance.
    fn candidates(&self) -> Vec<(usize, Uuid)> {
        self.results
            .iter()
            .chain(&self.advances)
            .filter(|&&i| self.items[i].chain())
            .map(|&i| (i, self.items[i].instance_id()))
            .collect()
    }

    /// The new results to record: processed when their instance's round
    /// applied (or refused) them. The k-th new result of an instance is its
    /// round's k-th input without a `seq`.
    fn records(&self) -> Vec<RoundResult> {
        let mut positions: HashMap<Uuid, usize> = HashMap::new();
        self.results
            .iter()
            .filter_map(|&i| match &self.items[i] {
                Settle::Result { result, .. } => Some(result),
                Settle::Advance { .. } => None,
            })
            .map(|result| {
                let plan = self.plans.get(&result.instance_id);
                let position = positions.entry(result.instance_id).or_insert(0);
                let refusal = plan.and_then(|p| {
                    p.round
                        .refused_new
                        .iter()
                        .find(|(at, _)| at == position)
                        .map(|(_, reason)| reason.clone())
                });
                *position += 1;
                RoundResult {
                    result: result.clone(),
                    processed: plan.is_some(),
                    refusal,
                }
            })
            .collect()
    }

    /// The inbox rows each round consumed, refused ones with their reason.
    fn consumed(&self) -> Vec<InboxRows> {
        self.plans
            .iter()
            .filter(|(_, p)| !p.round.seqs.is_empty())
            .map(|(id, p)| {
                let rows = p
                    .round
                    .seqs
                    .iter()
                    .map(|&seq| Consumed {
                        seq,
                        refusal: refusal_of(&p.round, seq),
                    })
                    .collect();
                InboxRows {
                    instance_id: *id,
                    rows,
                }
            })
            .collect()
    }

    /// The results of instances not planned here, one per instance (by id):
    /// each waits in its inbox for an advance job.
    fn waiting(&self) -> BTreeMap<Uuid, (&Workflow, &StepId, &JobLease)> {
        let mut waiting = BTreeMap::new();
        for &i in &self.results {
            if let Settle::Result {
                wf, result, lease, ..
            } = &self.items[i]
                && !self.plans.contains_key(&result.instance_id)
                && let Some(step) = &result.step
            {
                waiting
                    .entry(result.instance_id)
                    .or_insert((wf, step, lease));
            }
        }
        waiting
    }

    /// Step 5, after the commit: every result succeeded; a planned advance
    /// succeeded, or was fenced (rescued meanwhile: its round still applied
    /// under the lock, only its completion did not hold); the others are
    /// settled on their own. Claimed jobs go to their takers.
    fn answers(
        &self,
        held: Vec<bool>,
        offer: Offer,
        enqueued: Vec<(Enqueued, Option<JobLease>)>,
    ) -> Decided {
        let mut decided: Decided = self.items.iter().map(|_| None).collect();
        for &i in &self.results {
            decided[i] = Some(Ok(JobOutcome::Succeeded.into()));
        }
        for (&i, held) in self.advanced.iter().zip(held) {
            let outcome = if held {
                JobOutcome::Succeeded
            } else {
                JobOutcome::Fenced
            };
            decided[i] = Some(Ok(outcome.into()));
        }
        continuations::hand_out(
            offer.takers,
            enqueued,
            |i| self.items[i].instance_id(),
            |id| self.plans.get(&id).map(|p| (&p.instance, &p.wf)),
            |i, continuation| {
                if let Some(Some(Ok(settled))) = decided.get_mut(i) {
                    if continuation.permit.is_some() {
                        settled.extra.push(continuation);
                    } else {
                        settled.next = Some(continuation);
                    }
                }
            },
        );
        decided
    }
}

/// Why `round` refused its stored input `seq`, if it did.
fn refusal_of(round: &Round, seq: i64) -> Option<String> {
    round
        .refused_stored
        .iter()
        .find(|(s, _)| *s == seq)
        .map(|(_, reason)| reason.clone())
}

#[cfg(test)]
mod tests {
    /// Two instances of a one-step workflow, each with its execute job
    /// fetched (leases in the order of `ids`).
    struct TwoRunning {
        backend: hephaestus_memory::MemoryBackend,
        rt: crate::Runtime<hephaestus_memory::MemoryBackend>,
        wf: hephaestus_engine_core::Workflow,
        ids: Vec<uuid::Uuid>,
        leases: Vec<hephaestus_engine_core::ports::JobLease>,
    }

    async fn two_running() -> TwoRunning {
        use hephaestus_engine_core::ports::JobQueue;
        use hephaestus_engine_core::prelude::*;
        use hephaestus_engine_core::steps::{Done, FnStep};
        use hephaestus_memory::MemoryBackend;
        use serde_json::json;

        use crate::{Runtime, StartOptions};

        let step = FnStep::new("Step", ["done"], |_| StepOutcome::complete("done"));
        let wf = Workflow::builder("one")
            .unique("key", Scope::Workflow)
            .start(step.clone())
            .on(step, "done", Done)
            .build()
            .unwrap();
        let backend = MemoryBackend::new();
        let rt = Runtime::builder(backend.clone())
            .discard_handler(crate::tests::Discards::default())
            .workflow(wf.clone())
            .build()
            .unwrap();
        let queue = rt.config().queues.execute.clone();
        let mut ids = Vec::new();
        for key in ["first", "second"] {
            ids.push(
                rt.start("one", key, json!({}), StartOptions::default())
                    .await
                    .unwrap()
                    .id,
            );
        }
        // The two execute jobs their starts enqueued.
        let fetched = backend.fetch(&queue, 10, rt.now()).await.unwrap();
        let leases = ids
            .iter()
            .map(|id| {
                fetched
                    .iter()
                    .find(|l| l.args["instance_id"] == json!(id))
                    .unwrap()
                    .clone()
            })
            .collect();
        TwoRunning {
            backend,
            rt,
            wf,
            ids,
            leases,
        }
    }

    /// The completion of `lease`'s step with `output`, to settle.
    fn completed(t: &TwoRunning, i: usize, output: serde_json::Value) -> super::Settle {
        use hephaestus_engine_core::ports::{NewStepResult, ResultPayload};
        use hephaestus_engine_core::step::EventName;
        super::Settle::Result {
            lease: t.leases[i].clone(),
            wf: t.wf.clone(),
            result: NewStepResult {
                instance_id: t.ids[i],
                step: Some(hephaestus_engine_core::StepId::new("Step").unwrap()),
                activation: 1,
                payload: ResultPayload::Completed {
                    event: EventName("done".to_owned()),
                    output,
                    metadata: serde_json::Map::new(),
                },
            },
            chain: false,
            origin: tracing::Span::none(),
        }
    }

    /// A batch whose unit of work fails (here: one output PostgreSQL could
    /// not store, which the in-memory backend rejects the same way) commits
    /// nothing; every job in it is then settled on its own, so only the
    /// faulty one fails.
    #[tokio::test]
    async fn a_failed_batch_settles_its_jobs_one_by_one() {
        use hephaestus_engine_core::instance::InstanceStatus;
        use serde_json::json;

        use crate::JobOutcome;

        let t = two_running().await;
        let answers =
            t.rt.settle_batch(vec![
                completed(&t, 0, json!({"ok": true})),
                completed(&t, 1, json!({"text": "a\u{0}b"})),
            ])
            .await;
        assert_eq!(
            answers[0].as_ref().map(|s| s.outcome).unwrap(),
            JobOutcome::Succeeded,
            "{answers:?}"
        );
        assert!(
            matches!(answers[1], Err(crate::RunnerError::InvalidInput(_))),
            "{answers:?}"
        );
        // The good result landed on its own (its advance applies it); the
        // bad one changed nothing.
        t.rt.drain().await.unwrap();
        let good = t.rt.get(t.ids[0]).await.unwrap().unwrap();
        assert_eq!(good.status, InstanceStatus::Completed);
        assert_eq!(good.context.step("step"), Some(&json!({"ok": true})));
        let bad = t.rt.get(t.ids[1]).await.unwrap().unwrap();
        assert_eq!(bad.status, InstanceStatus::Running);
        assert!(bad.context.step("step").is_none());
    }

    /// A result whose job was cancelled (or rescued) while its step ran must
    /// not land, and the rest of its batch still does.
    #[tokio::test]
    async fn a_fenced_result_in_a_batch_lands_nothing_and_the_rest_lands() {
        use hephaestus_engine_core::instance::InstanceStatus;
        use hephaestus_engine_core::ports::{JobQueue, UnitOfWork};
        use serde_json::json;

        use crate::JobOutcome;

        let t = two_running().await;
        let mut tx = t.backend.begin().await.unwrap();
        assert!(t.backend.cancel(&mut tx, t.leases[1].id).await.unwrap());
        t.backend.commit(tx).await.unwrap();
        let answers =
            t.rt.settle_batch(vec![
                completed(&t, 0, json!({"ok": 1})),
                completed(&t, 1, json!({"ok": 2})),
            ])
            .await;
        let outcomes: Vec<JobOutcome> = answers
            .iter()
            .map(|a| a.as_ref().unwrap().outcome)
            .collect();
        assert_eq!(outcomes, vec![JobOutcome::Succeeded, JobOutcome::Fenced]);
        t.rt.drain().await.unwrap();
        let landed = t.rt.get(t.ids[0]).await.unwrap().unwrap();
        assert_eq!(landed.status, InstanceStatus::Completed);
        let fenced = t.rt.get(t.ids[1]).await.unwrap().unwrap();
        assert!(fenced.context.step("step").is_none(), "{fenced:?}");
    }
}
