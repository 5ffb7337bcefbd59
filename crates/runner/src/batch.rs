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
//!    results with the pure engine ([`Runtime::plan_round`]);
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use hephaestus_engine_core::instance::Instance;
use hephaestus_engine_core::ports::{
    Consumed, JobLease, NewJob, NewStepResult, PortError, RoundResult,
};
use hephaestus_engine_core::{StepId, Workflow};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use uuid::Uuid;

use crate::advance::{Round, RoundInput};
use crate::config::RunnerConfig;
use crate::error::RunnerError;
use crate::jobs;
use crate::runtime::{Backend, Runtime};
use crate::worker::JobOutcome;

/// Group commit: callers queue items; a caller that gets a flush permit
/// takes what is queued (up to `max`) and flushes it for everyone.
///
/// An item may carry a key (the instance it writes). An item whose key is
/// in a flush still running stays queued for a later flush: two flushes of
/// one batcher never write the same instance at once, so the second one
/// finds the instance's lock free instead of falling back to its inbox and
/// an advance job.
pub(crate) struct Batcher<T, R> {
    state: Mutex<Queue<T, R>>,
    flushers: Semaphore,
    /// Told whenever a flush ends (keys it held are free again).
    ended: tokio::sync::Notify,
    max: usize,
}

struct Queue<T, R> {
    items: Vec<Queued<T, R>>,
    /// Keys of the items being flushed.
    busy: HashSet<Uuid>,
}

struct Queued<T, R> {
    item: T,
    key: Option<Uuid>,
    answer: oneshot::Sender<R>,
}

/// The keys of a flush in progress; freed (and waiters told) on drop.
struct Busy<'a, T, R> {
    batcher: &'a Batcher<T, R>,
    keys: Vec<Uuid>,
}

impl<T, R> Drop for Busy<'_, T, R> {
    fn drop(&mut self) {
        {
            let mut state = self.batcher.lock();
            for key in &self.keys {
                state.busy.remove(key);
            }
        }
        self.batcher.ended.notify_waiters();
    }
}

impl<T, R> std::fmt::Debug for Batcher<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl<T, R> Batcher<T, R> {
    fn new(flushers: usize, max: usize) -> Self {
        Self {
            state: Mutex::new(Queue {
                items: Vec::new(),
                busy: HashSet::new(),
            }),
            flushers: Semaphore::new(flushers.max(1)),
            ended: tokio::sync::Notify::new(),
            max: max.max(1),
        }
    }

    /// Queues `item` and returns its answer: flushed by this caller (with
    /// whatever else is queued) or by another one. `None` when the caller
    /// that took the item was dropped before answering.
    pub(crate) async fn submit<F, Fut>(&self, item: T, key: Option<Uuid>, flush: F) -> Option<R>
    where
        F: Fn(Vec<T>) -> Fut,
        Fut: Future<Output = Vec<R>>,
    {
        let (answer, mut answered) = oneshot::channel();
        self.lock().items.push(Queued { item, key, answer });
        loop {
            // Registered before looking at the queue, so a flush ending in
            // between is not missed.
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            tokio::select! {
                biased;
                got = &mut answered => return got.ok(),
                permit = self.flushers.acquire() => {
                    // The semaphore is never closed.
                    let Ok(permit) = permit else { return answered.await.ok() };
                    let (items, answers, keys) = self.take();
                    if items.is_empty() {
                        // This item was taken by another flusher, or waits
                        // for a flush of its key to end.
                        drop(permit);
                        tokio::select! {
                            biased;
                            got = &mut answered => return got.ok(),
                            () = ended => continue,
                        }
                    }
                    // Frees the keys even if this caller is dropped mid-flush.
                    let _busy = Busy { batcher: self, keys };
                    let results = flush(items).await;
                    for (answer, result) in answers.into_iter().zip(results) {
                        // A waiter that went away needs no answer.
                        let _ = answer.send(result);
                    }
                    // `_busy` (freeing the keys) drops before `permit`.
                }
            }
        }
    }

    /// Takes up to `max` queued items whose keys no flush holds, in queue
    /// order, and marks their keys busy.
    #[allow(clippy::type_complexity)]
    fn take(&self) -> (Vec<T>, Vec<oneshot::Sender<R>>, Vec<Uuid>) {
        let mut state = self.lock();
        let Queue { items, busy } = &mut *state;
        let mut taken = Vec::new();
        let mut answers = Vec::new();
        let mut keys = Vec::new();
        let mut kept = Vec::with_capacity(items.len());
        // Keys this flush takes: later items with them join it.
        let mut mine: HashSet<Uuid> = HashSet::new();
        for queued in items.drain(..) {
            let free = match queued.key {
                None => true,
                Some(key) => mine.contains(&key) || !busy.contains(&key),
            };
            if taken.len() < self.max && free {
                if let Some(key) = queued.key
                    && mine.insert(key)
                {
                    keys.push(key);
                }
                taken.push(queued.item);
                answers.push(queued.answer);
            } else {
                kept.push(queued);
            }
        }
        *items = kept;
        busy.extend(keys.iter().copied());
        (taken, answers, keys)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<T, R>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A write settled by the batched orchestration.
#[derive(Debug)]
pub(crate) enum Settle {
    /// A step execution's result (completed or async): recorded, applied,
    /// and its job completed.
    Result {
        lease: JobLease,
        wf: Workflow,
        result: NewStepResult,
        /// The caller can run a continuation.
        chain: bool,
        /// The span of the job being settled (its step attempt).
        origin: tracing::Span,
    },
    /// An advance job.
    Advance {
        lease: JobLease,
        instance_id: Uuid,
        /// The caller can run a continuation.
        chain: bool,
        /// The span of the job being settled.
        origin: tracing::Span,
    },
}

impl Settle {
    fn lease(&self) -> &JobLease {
        match self {
            Self::Result { lease, .. } | Self::Advance { lease, .. } => lease,
        }
    }

    fn instance_id(&self) -> Uuid {
        match self {
            Self::Result { result, .. } => result.instance_id,
            Self::Advance { instance_id, .. } => *instance_id,
        }
    }

    fn chain(&self) -> bool {
        match self {
            Self::Result { chain, .. } | Self::Advance { chain, .. } => *chain,
        }
    }

    fn origin(&self) -> &tracing::Span {
        match self {
            Self::Result { origin, .. } | Self::Advance { origin, .. } => origin,
        }
    }
}

/// A step activation this worker claimed while settling, to run next in the
/// same slot: the job, and the instance as the settling unit of work wrote
/// it (the step is active, nothing is recorded for it).
#[derive(Debug)]
pub(crate) struct Continuation {
    pub lease: JobLease,
    pub instance: Arc<Instance>,
    pub wf: Workflow,
    /// One of the runtime's extra slots, for a continuation beyond the
    /// first (it runs in a task of its own).
    pub permit: Option<OwnedSemaphorePermit>,
}

/// How a settled job ended, and what its worker runs next.
#[derive(Debug)]
pub(crate) struct Settled {
    pub outcome: JobOutcome,
    /// Run next in this slot.
    pub next: Option<Continuation>,
    /// Run at once, each in a task of its own (fan-out branches).
    pub extra: Vec<Continuation>,
}

impl From<JobOutcome> for Settled {
    fn from(outcome: JobOutcome) -> Self {
        Self {
            outcome,
            next: None,
            extra: Vec::new(),
        }
    }
}

/// The continuations a worker runs after a settled job.
#[derive(Debug, Default)]
pub(crate) struct ChainStart {
    pub next: Option<Continuation>,
    pub extra: Vec<Continuation>,
}

impl From<Settled> for ChainStart {
    fn from(settled: Settled) -> Self {
        Self {
            next: settled.next,
            extra: settled.extra,
        }
    }
}

/// An execution pre-check: the instance (shared by the requests of one
/// batch) and whether a result is recorded for the activation.
pub(crate) type Preflight = Option<(Arc<Instance>, bool)>;

type Answer = Result<Settled, RunnerError>;

/// The runtime's batchers.
#[derive(Debug)]
pub(crate) struct Batches {
    settle: Batcher<Settle, Answer>,
    preflight: Batcher<(Uuid, StepId, u32), Result<Preflight, RunnerError>>,
    /// Slots for continuations beyond the first of a settled job (fan-out
    /// branches run at once by the worker that activated them).
    extra_slots: Arc<Semaphore>,
}

impl Batches {
    pub(crate) fn new(config: &RunnerConfig) -> Self {
        Self {
            settle: Batcher::new(config.batch_flushers, config.max_batch),
            preflight: Batcher::new(config.batch_flushers, config.max_batch),
            extra_slots: Arc::new(Semaphore::new(config.concurrency)),
        }
    }
}

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
            .submit((instance_id, step, activation), None, move |batch| {
                let rt = rt.clone();
                async move {
                    match rt.inner.backend.load_for_execution_many(&batch).await {
                        Ok(checks) => checks.into_iter().map(Ok).collect(),
                        // Every caller gets the error's own kind (a
                        // NotFound stays NotFound).
                        Err(e) => batch.iter().map(|_| Err(e.same_kind().into())).collect(),
                    }
                }
            })
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

    /// An advance job on its own, waiting for the instance's lock.
    pub(crate) async fn advance_alone(
        &self,
        lease: &JobLease,
        instance_id: Uuid,
    ) -> Result<JobOutcome, RunnerError> {
        match self.advance_job(instance_id, lease).await {
            Ok(report) if report.job_completed => Ok(JobOutcome::Succeeded),
            Ok(_) => self.finish(lease, JobOutcome::Succeeded).await,
            Err(RunnerError::NotFound(_)) => self.finish(lease, JobOutcome::Skipped).await,
            Err(e) => Err(e),
        }
    }

    /// The batch's unit of work (see the module docs).
    async fn settle_together(&self, items: &[Settle]) -> Result<Decided, BatchFailed> {
        let b = &self.inner.backend;
        let started = self.now();
        crate::observe::record_batch(items.len());
        // Each job's share of this unit of work, in its instance's trace
        // (nothing is built when no subscriber wants the spans).
        let spans: Vec<tracing::Span> = if crate::observe::spans_enabled() {
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
        } else {
            Vec::new()
        };
        let mut decided: Decided = items.iter().map(|_| None).collect();
        let mut tx = b.begin().await?;

        // 1. The results. Their leases are completed (fenced) at the end,
        //    with the advance jobs': one statement; a lease that no longer
        //    holds (cancelled or rescued meanwhile) rolls the batch back.
        let results: Vec<usize> = (0..items.len())
            .filter(|&i| matches!(items[i], Settle::Result { .. }))
            .collect();
        let advance_ix: Vec<usize> = (0..items.len())
            .filter(|&i| matches!(items[i], Settle::Advance { .. }))
            .collect();

        // 2. Lock what can be locked without waiting.
        let ids: Vec<Uuid> = results
            .iter()
            .chain(&advance_ix)
            .map(|&i| items[i].instance_id())
            .collect();
        let locked = b.try_lock_many(&mut tx, &ids).await?;
        let mut instances: BTreeMap<Uuid, (Instance, Workflow)> = BTreeMap::new();
        // Locked instances whose inbox may hold results (usually none: a
        // result is applied as it is recorded when its instance is free).
        let mut with_inbox: Vec<Uuid> = Vec::new();
        for (instance, inbox) in locked {
            // A missing definition leaves the instance to the unbatched path
            // (a typed error; the instance stays untouched).
            if let Ok(wf) = self.workflow_of(&instance) {
                let wf = wf.clone();
                if inbox {
                    with_inbox.push(instance.id);
                }
                instances.insert(instance.id, (instance, wf));
            }
        }

        // 3. Plan every locked instance: its inbox, then the new results.
        let mut pending = if with_inbox.is_empty() {
            HashMap::new()
        } else {
            b.pending_many(&mut tx, &with_inbox).await?
        };
        let mut new_results: HashMap<Uuid, Vec<&NewStepResult>> = HashMap::new();
        for &i in &results {
            if let Settle::Result { result, .. } = &items[i] {
                new_results
                    .entry(result.instance_id)
                    .or_default()
                    .push(result);
            }
        }
        let mut plans: BTreeMap<Uuid, Plan> = BTreeMap::new();
        for (id, (mut instance, wf)) in instances {
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
            match self.plan_round(&wf, &mut instance, &inputs) {
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
                    // Left to its advance job, which reports the error.
                    tracing::debug!(instance_id = %id, error = %e, "instance not advanced in a batch");
                }
            }
        }

        // 4. Write everything, one statement per kind.
        // The k-th new result of an instance is its round's k-th input
        // without a `seq` (the same order as `new_results`).
        let mut positions: HashMap<Uuid, usize> = HashMap::new();
        let records: Vec<RoundResult> = results
            .iter()
            .filter_map(|&i| match &items[i] {
                Settle::Result { result, .. } => {
                    let plan = plans.get(&result.instance_id);
                    let position = positions.entry(result.instance_id).or_insert(0);
                    let refusal = plan.and_then(|p| {
                        p.round
                            .refused_new
                            .iter()
                            .find(|(at, _)| at == position)
                            .map(|(_, reason)| reason.clone())
                    });
                    *position += 1;
                    Some(RoundResult {
                        result: result.clone(),
                        processed: plan.is_some(),
                        refusal,
                    })
                }
                Settle::Advance { .. } => None,
            })
            .collect();
        let changed: Vec<&Instance> = plans
            .values()
            .filter(|p| p.round.changed)
            .map(|p| &p.instance)
            .collect();
        let seqs: Vec<(Uuid, Vec<Consumed>)> = plans
            .iter()
            .filter(|(_, p)| !p.round.seqs.is_empty())
            .map(|(id, p)| {
                let rows = p
                    .round
                    .seqs
                    .iter()
                    .map(|&seq| Consumed {
                        seq,
                        refusal: p
                            .round
                            .refused_stored
                            .iter()
                            .find(|(s, _)| *s == seq)
                            .map(|(_, reason)| reason.clone()),
                    })
                    .collect();
                (*id, rows)
            })
            .collect();
        b.write_rounds(&mut tx, &records, &seqs, &changed).await?;
        for (id, plan) in &plans {
            let own_job = advance_ix
                .iter()
                .find(|&&i| items[i].instance_id() == *id)
                .map(|&i| items[i].lease().id);
            self.cancel_round_jobs(&mut tx, *id, &plan.round, own_job)
                .await?;
        }
        let mut new_jobs: Vec<NewJob> = plans
            .values()
            .flat_map(|p| p.round.new_jobs.iter().cloned())
            .collect();
        // Results of instances not advanced here wait in the inbox for their
        // advance job (one per instance, in id order so concurrent batches
        // take the unique keys in one order).
        let mut waiting: BTreeMap<Uuid, (&Workflow, &StepId, &JobLease)> = BTreeMap::new();
        for &i in &results {
            if let Settle::Result {
                wf, result, lease, ..
            } = &items[i]
                && !plans.contains_key(&result.instance_id)
                && let Some(step) = &result.step
            {
                waiting
                    .entry(result.instance_id)
                    .or_insert((wf, step, lease));
            }
        }
        let config = &self.inner.config;
        new_jobs.extend(waiting.iter().map(|(id, (wf, step, lease))| {
            crate::observe::carried(jobs::advance(config, wf, *id, Some(step)), &lease.meta)
        }));
        // Continuations: each caller that can run one takes an execute job
        // its instance's round just enqueued (at most one per caller, so a
        // slot never runs more than one step at a time).
        let mut offers: HashMap<Uuid, Vec<usize>> = HashMap::new();
        if self.inner.config.continuations {
            for (index, job) in new_jobs.iter().enumerate() {
                if job.kind == jobs::EXECUTE
                    && let Some(id) = job.group.as_deref().and_then(|g| Uuid::parse_str(g).ok())
                {
                    offers.entry(id).or_default().push(index);
                }
            }
            for list in offers.values_mut() {
                list.reverse();
            }
        }
        // (taker, job, extra slot: none for the first one of a taker)
        let mut takers: Vec<(usize, usize, Option<OwnedSemaphorePermit>)> = Vec::new();
        for i in results.iter().chain(&advance_ix).copied() {
            if items[i].chain()
                && let Some(index) = offers.get_mut(&items[i].instance_id()).and_then(Vec::pop)
            {
                takers.push((i, index, None));
            }
        }
        // What is left of a fan-out goes to its takers while the runtime has
        // extra slots.
        for i in results.iter().chain(&advance_ix).copied() {
            if !items[i].chain() {
                continue;
            }
            let Some(offered) = offers.get_mut(&items[i].instance_id()) else {
                continue;
            };
            while !offered.is_empty() {
                let Ok(permit) = Arc::clone(&self.inner.batches.extra_slots).try_acquire_owned()
                else {
                    break;
                };
                if let Some(index) = offered.pop() {
                    takers.push((i, index, Some(permit)));
                }
            }
        }
        let mut claim = vec![false; new_jobs.len()];
        for (_, index, _) in &takers {
            claim[*index] = true;
        }
        let advanced: Vec<usize> = advance_ix
            .iter()
            .copied()
            .filter(|&i| plans.contains_key(&items[i].instance_id()))
            .collect();
        let leases: Vec<&JobLease> = results
            .iter()
            .chain(&advanced)
            .map(|&i| items[i].lease())
            .collect();
        let (mut enqueued, mut held) = b
            .enqueue_and_complete(&mut tx, &new_jobs, &claim, &leases)
            .await?;
        if held[..results.len()].iter().any(|held| !held) {
            // This attempt's result must not land: nothing of the batch
            // commits, and each job is settled on its own (the fenced one
            // finds its lease gone and lands nothing).
            return Err(BatchFailed::Fenced);
        }
        let held = held.split_off(results.len());
        let commits: Vec<tracing::Span> = spans
            .iter()
            .zip(items)
            .map(|(span, item)| {
                if let Some(plan) = plans.get(&item.instance_id()) {
                    crate::observe::record_round(span, plan.instance.status);
                }
                crate::observe::commit_span(span, items.len())
            })
            .collect();
        b.commit(tx).await?;
        drop(commits);

        // 5. After the commit.
        for &i in &results {
            decided[i] = Some(Ok(JobOutcome::Succeeded.into()));
        }
        for (&i, held) in advanced.iter().zip(held) {
            // A fenced advance (rescued meanwhile) still applied its round
            // under the lock; only its completion did not hold.
            decided[i] = Some(Ok(if held {
                JobOutcome::Succeeded
            } else {
                JobOutcome::Fenced
            }
            .into()));
        }
        let mut shared: HashMap<Uuid, Arc<Instance>> = HashMap::new();
        for (i, index, permit) in takers {
            let Some(lease) = enqueued.get_mut(index).and_then(|(_, lease)| lease.take()) else {
                continue;
            };
            let instance_id = items[i].instance_id();
            let Some(plan) = plans.get(&instance_id) else {
                continue;
            };
            let instance = shared
                .entry(instance_id)
                .or_insert_with(|| Arc::new(plan.instance.clone()));
            if let Some(Ok(settled)) = decided[i].as_mut() {
                let extra = permit.is_some();
                let continuation = Continuation {
                    lease,
                    instance: Arc::clone(instance),
                    wf: plan.wf.clone(),
                    permit,
                };
                if extra {
                    settled.extra.push(continuation);
                } else {
                    settled.next = Some(continuation);
                }
            }
        }
        for (_, lease) in enqueued {
            if let Some(lease) = lease {
                // Not expected: every claim has its taker. The job is left to
                // the rescuer, which returns it to work after `stale_after`.
                tracing::warn!(job_id = %lease.id, "a claimed continuation had no taker");
            }
        }
        if !waiting.is_empty() {
            self.inner.wake.notify_waiters();
        }
        let planned: HashSet<Uuid> = plans.keys().copied().collect();
        for plan in plans.into_values() {
            self.after_round(&plan.instance, &plan.round, started, 1);
        }
        tracing::trace!(
            jobs = items.len(),
            advanced = planned.len(),
            "batch settled"
        );
        Ok(decided)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::Mutex;

    use tokio::sync::Notify;

    use super::Batcher;

    /// While a flush runs, later items queue up and go together into the
    /// next flush; every caller gets its own answer.
    #[tokio::test]
    async fn items_queued_during_a_flush_share_the_next_one() {
        let batcher: Arc<Batcher<u32, u32>> = Arc::new(Batcher::new(1, 16));
        let sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
        let gate = Arc::new(Notify::new());
        let entered = Arc::new(Notify::new());
        let flush = {
            let (sizes, gate, entered) =
                (Arc::clone(&sizes), Arc::clone(&gate), Arc::clone(&entered));
            move |items: Vec<u32>| {
                let (sizes, gate, entered) =
                    (Arc::clone(&sizes), Arc::clone(&gate), Arc::clone(&entered));
                async move {
                    let first = {
                        let mut sizes = sizes.lock().unwrap();
                        sizes.push(items.len());
                        sizes.len() == 1
                    };
                    if first {
                        // Hold the only flush permit until told.
                        entered.notify_one();
                        gate.notified().await;
                    }
                    items.into_iter().map(|i| i * 10).collect::<Vec<u32>>()
                }
            }
        };
        let submit = |item: u32| {
            let (batcher, flush) = (Arc::clone(&batcher), flush.clone());
            tokio::spawn(async move { batcher.submit(item, None, flush).await })
        };
        let first = submit(1);
        entered.notified().await;
        let second = submit(2);
        let third = submit(3);
        // Let both reach the queue before the first flush ends.
        while batcher.lock().items.len() < 2 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        assert_eq!(first.await.unwrap(), Some(10));
        assert_eq!(second.await.unwrap(), Some(20));
        assert_eq!(third.await.unwrap(), Some(30));
        assert_eq!(*sizes.lock().unwrap(), vec![1, 2]);
    }

    /// An item whose key a running flush holds waits for that flush to end,
    /// while an item with another key is flushed at once by a second
    /// flusher: two flushes never write one instance at the same time.
    #[tokio::test]
    async fn an_item_waits_while_a_flush_holds_its_key() {
        let batcher: Arc<Batcher<u32, u32>> = Arc::new(Batcher::new(2, 16));
        let flushed: Arc<Mutex<Vec<Vec<u32>>>> = Arc::default();
        let gate = Arc::new(Notify::new());
        let entered = Arc::new(Notify::new());
        let flush = {
            let (flushed, gate, entered) = (
                Arc::clone(&flushed),
                Arc::clone(&gate),
                Arc::clone(&entered),
            );
            move |items: Vec<u32>| {
                let (flushed, gate, entered) = (
                    Arc::clone(&flushed),
                    Arc::clone(&gate),
                    Arc::clone(&entered),
                );
                async move {
                    flushed.lock().unwrap().push(items.clone());
                    if items.contains(&1) {
                        entered.notify_one();
                        gate.notified().await;
                    }
                    items
                }
            }
        };
        let (a, b) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
        let submit = |item: u32, key: uuid::Uuid| {
            let (batcher, flush) = (Arc::clone(&batcher), flush.clone());
            tokio::spawn(async move { batcher.submit(item, Some(key), flush).await })
        };
        let first = submit(1, a);
        entered.notified().await;
        let same_key = submit(2, a);
        let other_key = submit(3, b);
        assert_eq!(other_key.await.unwrap(), Some(3));
        // Item 2 is still queued: its key is held by the first flush.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(*flushed.lock().unwrap(), vec![vec![1], vec![3]]);
        assert_eq!(batcher.lock().items.len(), 1);
        gate.notify_one();
        assert_eq!(first.await.unwrap(), Some(1));
        assert_eq!(same_key.await.unwrap(), Some(2));
        assert_eq!(*flushed.lock().unwrap(), vec![vec![1], vec![3], vec![2]]);
    }

    /// A flusher dropped in the middle of its flush frees its keys: the
    /// items waiting for them are flushed.
    #[tokio::test]
    async fn a_dropped_flush_frees_its_keys() {
        let batcher: Arc<Batcher<u32, u32>> = Arc::new(Batcher::new(2, 16));
        let entered = Arc::new(Notify::new());
        let flush = {
            let entered = Arc::clone(&entered);
            move |items: Vec<u32>| {
                let entered = Arc::clone(&entered);
                async move {
                    if items.contains(&1) {
                        entered.notify_one();
                        std::future::pending::<()>().await;
                    }
                    items
                }
            }
        };
        let key = uuid::Uuid::from_u128(7);
        let submit = |item: u32| {
            let (batcher, flush) = (Arc::clone(&batcher), flush.clone());
            tokio::spawn(async move { batcher.submit(item, Some(key), flush).await })
        };
        let stuck = submit(1);
        entered.notified().await;
        let waiting = submit(2);
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished());
        stuck.abort();
        assert_eq!(waiting.await.unwrap(), Some(2));
    }

    /// A batch never holds more than `max` items.
    #[tokio::test]
    async fn a_flush_takes_at_most_max_items() {
        let batcher: Arc<Batcher<u32, u32>> = Arc::new(Batcher::new(1, 2));
        let sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
        let flush = {
            let sizes = Arc::clone(&sizes);
            move |items: Vec<u32>| {
                let sizes = Arc::clone(&sizes);
                async move {
                    sizes.lock().unwrap().push(items.len());
                    items
                }
            }
        };
        // Hold the only flush permit until all five are queued.
        let permit = batcher.flushers.acquire().await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (batcher, flush) = (Arc::clone(&batcher), flush.clone());
            tasks.push(tokio::spawn(
                async move { batcher.submit(i, None, flush).await },
            ));
        }
        while batcher.lock().items.len() < 5 {
            tokio::task::yield_now().await;
        }
        drop(permit);
        for (i, task) in tasks.into_iter().enumerate() {
            assert_eq!(task.await.unwrap(), Some(u32::try_from(i).unwrap()));
        }
        let sizes = sizes.lock().unwrap().clone();
        assert!(sizes.iter().all(|&n| n <= 2), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 5, "{sizes:?}");
    }

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
