//! # hephaestus-memory
//!
//! The in-memory backend: the embedded default (no database needed) and the
//! fast, deterministic test backend. It implements the engine-core ports
//! (`InstanceStore`, `StepResultStore`, `JobQueue` over one unit of work)
//! and passes their conformance suites (crate `hephaestus-conformance`).
//! It lives outside engine-core, which does no I/O and reads no clock.
//!
//! One state sits under a `std::sync::Mutex` that is never held across an
//! `.await`; cloned [`MemoryBackend`] handles share it, so a handle kept
//! across a runtime restart still sees every instance, result and job.
//!
//! A [`MemoryTx`] is a journal of writes. Reads through it see the committed
//! state plus its own writes (instances it inserted or updated, results it
//! recorded or marked processed, jobs it enqueued or changed).
//! `commit` re-checks every constraint under the lock and applies the whole
//! journal or nothing; dropping the unit of work discards the journal and
//! releases its instance locks.
//!
//! Instance locks ([`InstanceStore::lock`]) need no async runtime: a waiter
//! queues its `Waker` behind the holder (first come, first served) and the
//! lock is handed to it when the holder's unit of work ends. A wait that would
//! close a cycle fails at once with [`PortError::Conflict`], as a database
//! reports a deadlock.
//!
//! Where a database would make a second writer wait on a row another
//! transaction wrote, this backend lets both proceed and decides at commit:
//! an instance whose claim was taken meanwhile fails the commit with
//! [`PortError::AlreadyRunning`] (nothing is applied); a step result or a
//! unique job that another commit recorded meanwhile is dropped as a
//! duplicate; a fenced job update whose fence no longer holds is skipped.
//!
//! Step-result sequence numbers are drawn when a result is recorded, like a
//! database sequence: they are unique and increasing in recording order, and
//! a rolled-back unit of work leaves a gap.
//!
//! The backend reads time only from its clock ([`MemoryBackend::with_clock`];
//! [`MemoryBackend::new`] uses the wall clock): for the time a result was
//! recorded or processed, a job finished, and whether a new job is due.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::ops::Bound;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context as TaskContext, Poll, Waker};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use hephaestus_engine_core::business_id::UniqueClaim;
use hephaestus_engine_core::clock::{Clock, SharedClock, SystemClock};
use hephaestus_engine_core::context::contains_nul;
use hephaestus_engine_core::ids::StepId;
use hephaestus_engine_core::instance::{AttemptRecord, Instance};
use hephaestus_engine_core::ports::{
    Enqueued, InstanceFilter, InstanceStore, JobId, JobInfo, JobLease, JobMatch, JobQueue,
    JobState, NewJob, NewStepResult, PortError, Recorded, Refused, ResultKind, StepResult,
    StepResultStore, UniqueJob, UnitOfWork,
};
use hephaestus_engine_core::step::{StepError, lock_ignoring_poison};

/// The in-memory backend. A cheap handle: clones share one state.
#[derive(Clone)]
pub struct MemoryBackend {
    shared: Arc<Shared>,
}

impl fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBackend").finish_non_exhaustive()
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

/// A unit of work of a [`MemoryBackend`]: a journal of writes applied at
/// commit. Dropping it rolls it back and releases its instance locks.
pub struct MemoryTx {
    shared: Arc<Shared>,
    id: u64,
    /// Instance locks held until the unit of work ends.
    locks: Vec<Uuid>,
    /// The writes, in call order.
    ops: Vec<Op>,
}

impl fmt::Debug for MemoryTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTx")
            .field("id", &self.id)
            .field("locks", &self.locks)
            .field("writes", &self.ops.len())
            .finish_non_exhaustive()
    }
}

impl Drop for MemoryTx {
    fn drop(&mut self) {
        if self.locks.is_empty() {
            return;
        }
        let wakers = self
            .shared
            .state()
            .release_all(self.id, std::mem::take(&mut self.locks));
        wake_all(wakers);
    }
}

struct Shared {
    state: Mutex<State>,
    clock: SharedClock,
    next_tx: AtomicU64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock_ignoring_poison(&self.state)
    }

    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }
}

#[derive(Default)]
struct State {
    instances: BTreeMap<Uuid, Instance>,
    /// Claims of active instances, to their holder.
    claims: HashMap<UniqueClaim, Uuid>,
    results: BTreeMap<i64, ResultRow>,
    /// Every stored result (processed or not), by its dedupe key.
    result_keys: HashMap<ResultKey, i64>,
    /// Unprocessed result seqs per instance.
    unprocessed: HashMap<Uuid, BTreeSet<i64>>,
    last_seq: i64,
    jobs: BTreeMap<JobId, JobRow>,
    /// Unfinished jobs.
    live_jobs: BTreeSet<JobId>,
    /// Jobs by unique key.
    unique_jobs: HashMap<String, BTreeSet<JobId>>,
    last_job_id: i64,
    /// Held instance locks.
    locks: HashMap<Uuid, InstanceLock>,
    /// Which instance each waiting unit of work waits for.
    waiting_for: HashMap<u64, Uuid>,
}

struct InstanceLock {
    holder: u64,
    waiters: VecDeque<(u64, Waker)>,
}

struct ResultRow {
    result: NewStepResult,
    inserted_at: DateTime<Utc>,
    processed_at: Option<DateTime<Utc>>,
    /// Why the writer refused it (see [`Refused`]).
    refusal: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ResultKey {
    instance_id: Uuid,
    step: Option<StepId>,
    activation: u32,
    kind: ResultKind,
}

impl ResultKey {
    fn of(result: &NewStepResult) -> Self {
        Self {
            instance_id: result.instance_id,
            step: result.step.clone(),
            activation: result.activation,
            kind: result.payload.kind(),
        }
    }
}

#[derive(Debug, Clone)]
struct JobRow {
    id: JobId,
    kind: String,
    queue: String,
    args: Value,
    meta: serde_json::Map<String, Value>,
    tags: Vec<String>,
    priority: i16,
    max_attempts: u32,
    state: JobState,
    attempt: u32,
    scheduled_at: DateTime<Utc>,
    errors: Vec<AttemptRecord>,
    unique: Option<UniqueJob>,
    group: Option<String>,
    finalized_at: Option<DateTime<Utc>>,
    /// When the current attempt last showed signs of life (fetch or heartbeat).
    heartbeat_at: Option<DateTime<Utc>>,
}

impl JobRow {
    fn is_due(&self, now: DateTime<Utc>) -> bool {
        match self.state {
            JobState::Available => true,
            JobState::Scheduled | JobState::Retryable => self.scheduled_at <= now,
            _ => false,
        }
    }

    /// Whether the job is executing at `attempt` (the fence of a lease).
    fn holds(&self, attempt: u32) -> bool {
        self.state == JobState::Executing && self.attempt == attempt
    }

    fn info(&self) -> JobInfo {
        JobInfo {
            id: self.id,
            kind: self.kind.clone(),
            queue: self.queue.clone(),
            args: self.args.clone(),
            meta: self.meta.clone(),
            tags: self.tags.clone(),
            priority: self.priority,
            state: self.state,
            attempt: self.attempt,
            max_attempts: self.max_attempts,
            scheduled_at: self.scheduled_at,
            errors: self.errors.clone(),
            group: self.group.clone(),
        }
    }

    fn lease(&self) -> JobLease {
        JobLease {
            id: self.id,
            kind: self.kind.clone(),
            queue: self.queue.clone(),
            args: self.args.clone(),
            meta: self.meta.clone(),
            attempt: self.attempt,
            max_attempts: self.max_attempts,
            scheduled_at: self.scheduled_at,
            errors: self.errors.clone(),
        }
    }
}

/// A change to an existing job, applied only if it still holds.
#[derive(Debug)]
enum JobChange {
    Cancel,
    Complete {
        attempt: u32,
    },
    Retry {
        record: AttemptRecord,
        retry_at: DateTime<Utc>,
    },
    Discard {
        record: AttemptRecord,
    },
}

impl JobChange {
    /// Applies the change if its condition holds; returns whether it did.
    fn apply(&self, job: &mut JobRow) -> bool {
        match self {
            Self::Cancel => {
                if job.state.is_finished() {
                    return false;
                }
                job.state = JobState::Cancelled;
            }
            Self::Complete { attempt } => {
                if !job.holds(*attempt) {
                    return false;
                }
                job.state = JobState::Completed;
            }
            Self::Retry { record, retry_at } => {
                if !job.holds(record.attempt) {
                    return false;
                }
                job.errors.push(record.clone());
                job.state = JobState::Retryable;
                job.scheduled_at = *retry_at;
            }
            Self::Discard { record } => {
                if !job.holds(record.attempt) {
                    return false;
                }
                job.errors.push(record.clone());
                job.state = JobState::Discarded;
            }
        }
        true
    }
}

/// One journaled write.
#[derive(Debug)]
enum Op {
    InsertInstance(Box<Instance>),
    UpdateInstance(Box<Instance>),
    Record {
        seq: i64,
        result: NewStepResult,
    },
    MarkProcessed {
        instance_id: Uuid,
        seqs: Vec<i64>,
    },
    Refuse {
        instance_id: Uuid,
        refused: Vec<(i64, String)>,
    },
    Enqueue(Box<JobRow>),
    /// A unique job that merged into a committed holder: inserted at commit
    /// only if the holder no longer holds the key by then (a worker claimed
    /// it meanwhile, before this unit of work's writes were visible, so it
    /// may have missed them). Invisible inside the unit of work.
    EnqueueIfFree(Box<JobRow>),
    ChangeJob {
        id: JobId,
        change: JobChange,
    },
}

fn wake_all(wakers: Vec<Waker>) {
    for waker in wakers {
        waker.wake();
    }
}

fn active_claim(instance: &Instance) -> Option<&UniqueClaim> {
    if instance.status.is_active() {
        instance.unique_claim.as_ref()
    } else {
        None
    }
}

/// Rejects values PostgreSQL cannot store (U+0000 in JSON or text).
fn reject_nul<T: Serialize + ?Sized>(what: &str, value: &T) -> Result<(), PortError> {
    let json = serde_json::to_value(value)
        .map_err(|e| PortError::InvalidInput(format!("{what} cannot be encoded as JSON: {e}")))?;
    if contains_nul(&json) {
        Err(PortError::InvalidInput(format!(
            "{what} contains U+0000, which cannot be stored"
        )))
    } else {
        Ok(())
    }
}

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The instance as a unit of work with journal `ops` sees it.
fn tx_instance<'a>(st: &'a State, ops: &'a [Op], id: Uuid) -> Option<&'a Instance> {
    ops.iter()
        .rev()
        .find_map(|op| match op {
            Op::InsertInstance(i) | Op::UpdateInstance(i) if i.id == id => Some(&**i),
            _ => None,
        })
        .or_else(|| st.instances.get(&id))
}

/// A job enqueued in the journal `ops`.
fn tx_enqueued(ops: &[Op], id: JobId) -> Option<&JobRow> {
    ops.iter().find_map(|op| match op {
        Op::Enqueue(job) if job.id == id => Some(&**job),
        _ => None,
    })
}

/// The job as a unit of work with journal `ops` sees it.
fn tx_job(st: &State, ops: &[Op], id: JobId) -> Option<JobRow> {
    let mut job = st.jobs.get(&id).or_else(|| tx_enqueued(ops, id)).cloned()?;
    for op in ops {
        if let Op::ChangeJob { id: target, change } = op
            && *target == id
        {
            change.apply(&mut job);
        }
    }
    Some(job)
}

/// A job with `unique.key` in one of `unique.states`, as `ops` sees it.
fn find_unique(st: &State, ops: &[Op], unique: &UniqueJob) -> Option<JobId> {
    let committed = st
        .unique_jobs
        .get(&unique.key)
        .into_iter()
        .flatten()
        .copied();
    let in_tx = ops.iter().filter_map(|op| match op {
        Op::Enqueue(job) if job.unique.as_ref().is_some_and(|u| u.key == unique.key) => {
            Some(job.id)
        }
        _ => None,
    });
    committed
        .chain(in_tx)
        .find(|id| tx_job(st, ops, *id).is_some_and(|job| unique.states.contains(&job.state)))
}

/// Checks the instance writes among `ops`, in order, against `st`: ids must
/// be new for inserts and exist for updates, and an active instance's claim
/// must not be held by another active instance.
fn check_instance_writes<'a>(
    st: &State,
    ops: impl IntoIterator<Item = &'a Op>,
) -> Result<(), PortError> {
    let mut written: HashMap<Uuid, &Instance> = HashMap::new();
    // Claim changes made by the ops so far (`None` = freed).
    let mut claims: HashMap<UniqueClaim, Option<Uuid>> = HashMap::new();
    for op in ops {
        let (instance, insert) = match op {
            Op::InsertInstance(i) => (&**i, true),
            Op::UpdateInstance(i) => (&**i, false),
            _ => continue,
        };
        let before = written
            .get(&instance.id)
            .copied()
            .or_else(|| st.instances.get(&instance.id));
        match (insert, before) {
            (true, Some(_)) => {
                return Err(PortError::AlreadyExists(format!(
                    "instance {}",
                    instance.id
                )));
            }
            (false, None) => {
                return Err(PortError::NotFound(format!("instance {}", instance.id)));
            }
            _ => {}
        }
        if let Some(claim) = before.and_then(active_claim) {
            claims.insert(claim.clone(), None);
        }
        if let Some(claim) = active_claim(instance) {
            let holder = match claims.get(claim) {
                Some(changed) => *changed,
                None => st.claims.get(claim).copied(),
            };
            if let Some(holder) = holder.filter(|h| *h != instance.id) {
                return Err(PortError::AlreadyRunning {
                    business_id: instance.business_id.clone(),
                    instance_id: holder,
                });
            }
            claims.insert(claim.clone(), Some(instance.id));
        }
        written.insert(instance.id, instance);
    }
    Ok(())
}

impl State {
    /// Releases `tx`'s lock on `id`, handing it to the first waiter; returns
    /// the waker to wake (after the state lock is released).
    fn release(&mut self, id: Uuid, tx: u64) -> Option<Waker> {
        let lock = self.locks.get_mut(&id)?;
        if lock.holder != tx {
            return None;
        }
        if let Some((next, waker)) = lock.waiters.pop_front() {
            lock.holder = next;
            self.waiting_for.remove(&next);
            Some(waker)
        } else {
            self.locks.remove(&id);
            None
        }
    }

    fn release_all(&mut self, tx: u64, ids: Vec<Uuid>) -> Vec<Waker> {
        ids.into_iter()
            .filter_map(|id| self.release(id, tx))
            .collect()
    }

    /// Removes `tx` from the wait queue of `id`.
    fn forget_waiter(&mut self, tx: u64, id: Uuid) {
        if let Some(lock) = self.locks.get_mut(&id) {
            lock.waiters.retain(|(waiter, _)| *waiter != tx);
        }
        self.waiting_for.remove(&tx);
    }

    /// Whether `tx` waiting for `id` closes a cycle of waits.
    fn would_deadlock(&self, tx: u64, id: Uuid) -> bool {
        let mut target = id;
        // Each step follows one waiting unit of work; a longer walk is a
        // cycle that does not involve `tx`, which is not ours to report.
        for _ in 0..=self.waiting_for.len() {
            let Some(lock) = self.locks.get(&target) else {
                return false;
            };
            if lock.holder == tx {
                return true;
            }
            let Some(next) = self.waiting_for.get(&lock.holder) else {
                return false;
            };
            target = *next;
        }
        false
    }

    /// Applies a checked journal.
    fn apply(&mut self, ops: Vec<Op>, now: DateTime<Utc>) {
        for op in ops {
            match op {
                Op::InsertInstance(instance) | Op::UpdateInstance(instance) => {
                    self.put_instance(*instance);
                }
                Op::Record { seq, result } => self.put_result(seq, result, now),
                Op::MarkProcessed { instance_id, seqs } => {
                    for seq in seqs {
                        self.mark_processed(instance_id, seq, now);
                    }
                }
                Op::Refuse {
                    instance_id,
                    refused,
                } => {
                    for (seq, reason) in refused {
                        self.refuse(instance_id, seq, reason, now);
                    }
                }
                Op::Enqueue(job) | Op::EnqueueIfFree(job) => self.put_job(*job),
                Op::ChangeJob { id, change } => self.change_job(id, &change, now),
            }
        }
    }

    fn put_instance(&mut self, instance: Instance) {
        if let Some(old) = self.instances.get(&instance.id)
            && let Some(claim) = active_claim(old)
            && self.claims.get(claim) == Some(&old.id)
        {
            self.claims.remove(claim);
        }
        if let Some(claim) = active_claim(&instance) {
            self.claims.insert(claim.clone(), instance.id);
        }
        self.instances.insert(instance.id, instance);
    }

    fn put_result(&mut self, seq: i64, result: NewStepResult, now: DateTime<Utc>) {
        let key = ResultKey::of(&result);
        // A duplicate committed meanwhile is dropped; instances are never
        // deleted, so the instance checked when recording still exists.
        if self.result_keys.contains_key(&key) || !self.instances.contains_key(&key.instance_id) {
            return;
        }
        self.unprocessed
            .entry(result.instance_id)
            .or_default()
            .insert(seq);
        self.result_keys.insert(key, seq);
        self.results.insert(
            seq,
            ResultRow {
                result,
                inserted_at: now,
                processed_at: None,
                refusal: None,
            },
        );
    }

    fn mark_processed(&mut self, instance_id: Uuid, seq: i64, now: DateTime<Utc>) {
        let Some(row) = self.results.get_mut(&seq) else {
            return;
        };
        if row.result.instance_id != instance_id || row.processed_at.is_some() {
            return;
        }
        row.processed_at = Some(now);
        if let Some(seqs) = self.unprocessed.get_mut(&instance_id) {
            seqs.remove(&seq);
            if seqs.is_empty() {
                self.unprocessed.remove(&instance_id);
            }
        }
    }

    /// Marks an unprocessed result processed as refused: it keeps its reason
    /// and gives up its dedupe key.
    fn refuse(&mut self, instance_id: Uuid, seq: i64, reason: String, now: DateTime<Utc>) {
        let Some(row) = self.results.get(&seq) else {
            return;
        };
        if row.result.instance_id != instance_id || row.processed_at.is_some() {
            return;
        }
        let key = ResultKey::of(&row.result);
        self.mark_processed(instance_id, seq, now);
        if let Some(row) = self.results.get_mut(&seq) {
            row.refusal = Some(reason);
        }
        if self.result_keys.get(&key) == Some(&seq) {
            self.result_keys.remove(&key);
        }
    }

    fn put_job(&mut self, job: JobRow) {
        if let Some(unique) = &job.unique {
            // A conflicting job committed meanwhile: this one is a duplicate.
            if find_unique(self, &[], unique).is_some() {
                return;
            }
            self.unique_jobs
                .entry(unique.key.clone())
                .or_default()
                .insert(job.id);
        }
        if !job.state.is_finished() {
            self.live_jobs.insert(job.id);
        }
        self.jobs.insert(job.id, job);
    }

    fn change_job(&mut self, id: JobId, change: &JobChange, now: DateTime<Utc>) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if change.apply(job) && job.state.is_finished() {
            job.finalized_at = Some(now);
            self.live_jobs.remove(&id);
        }
    }

    fn remove_job(&mut self, id: JobId) {
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        self.live_jobs.remove(&id);
        if let Some(unique) = job.unique
            && let Some(ids) = self.unique_jobs.get_mut(&unique.key)
        {
            ids.remove(&id);
            if ids.is_empty() {
                self.unique_jobs.remove(&unique.key);
            }
        }
    }
}

/// Waits for an instance lock; resolves once `tx` holds it.
struct LockWait {
    shared: Arc<Shared>,
    tx: u64,
    id: Uuid,
    done: bool,
}

impl Future for LockWait {
    type Output = Result<(), PortError>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut guard = this.shared.state();
        let st = &mut *guard;
        match st.locks.get(&this.id).map(|lock| lock.holder) {
            None => {
                st.locks.insert(
                    this.id,
                    InstanceLock {
                        holder: this.tx,
                        waiters: VecDeque::new(),
                    },
                );
            }
            // Free, or handed to us by the previous holder.
            Some(holder) if holder == this.tx => {}
            Some(_) => {
                if st.would_deadlock(this.tx, this.id) {
                    st.forget_waiter(this.tx, this.id);
                    drop(guard);
                    this.done = true;
                    return Poll::Ready(Err(PortError::Conflict(format!(
                        "deadlock detected while locking instance {}",
                        this.id
                    ))));
                }
                if let Some(lock) = st.locks.get_mut(&this.id) {
                    match lock
                        .waiters
                        .iter_mut()
                        .find(|(waiter, _)| *waiter == this.tx)
                    {
                        Some((_, waker)) => waker.clone_from(cx.waker()),
                        None => lock.waiters.push_back((this.tx, cx.waker().clone())),
                    }
                }
                st.waiting_for.insert(this.tx, this.id);
                return Poll::Pending;
            }
        }
        drop(guard);
        this.done = true;
        Poll::Ready(Ok(()))
    }
}

impl Drop for LockWait {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Abandoned: leave the queue, and pass the lock on if it was already
        // handed to us.
        let waker = {
            let mut st = self.shared.state();
            st.forget_waiter(self.tx, self.id);
            st.release(self.id, self.tx)
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl MemoryBackend {
    /// An empty backend reading the wall clock.
    pub fn new() -> Self {
        Self::with_clock(SystemClock)
    }

    /// An empty backend reading time from `clock` (give the runtime the same
    /// one).
    pub fn with_clock(clock: impl Clock) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                clock: Arc::new(clock),
                next_tx: AtomicU64::new(1),
            }),
        }
    }

    /// Every instance, by id.
    pub fn instances(&self) -> Vec<Instance> {
        self.state().instances.values().cloned().collect()
    }

    /// Every job, by id.
    pub fn jobs(&self) -> Vec<JobInfo> {
        self.state().jobs.values().map(JobRow::info).collect()
    }

    /// How many jobs (of any queue) are due at `now`.
    pub fn due_count(&self, now: DateTime<Utc>) -> usize {
        let st = self.state();
        st.live_jobs
            .iter()
            .filter_map(|id| st.jobs.get(id))
            .filter(|job| job.is_due(now))
            .count()
    }

    /// Deletes jobs that finished before `before`; returns how many.
    pub fn prune_finished_jobs(&self, before: DateTime<Utc>) -> u64 {
        let mut st = self.state();
        let doomed: Vec<JobId> = st
            .jobs
            .values()
            .filter(|job| job.finalized_at.is_some_and(|at| at < before))
            .map(|job| job.id)
            .collect();
        for id in &doomed {
            st.remove_job(*id);
        }
        count(doomed.len())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state()
    }

    fn check_tx(&self, tx: &MemoryTx) -> Result<(), PortError> {
        if Arc::ptr_eq(&tx.shared, &self.shared) {
            Ok(())
        } else {
            Err(PortError::InvalidInput(
                "the unit of work belongs to another memory backend".to_owned(),
            ))
        }
    }

    fn begin_sync(&self) -> MemoryTx {
        MemoryTx {
            shared: Arc::clone(&self.shared),
            id: self.shared.next_tx.fetch_add(1, Ordering::Relaxed),
            locks: Vec::new(),
            ops: Vec::new(),
        }
    }

    fn commit_sync(&self, mut tx: MemoryTx) -> Result<(), PortError> {
        self.check_tx(&tx)?;
        let now = self.shared.now();
        let wakers = {
            let mut st = self.state();
            // On failure `tx` is dropped after the guard: rolled back.
            check_instance_writes(&st, &tx.ops)?;
            st.apply(std::mem::take(&mut tx.ops), now);
            st.release_all(tx.id, std::mem::take(&mut tx.locks))
        };
        wake_all(wakers);
        Ok(())
    }

    fn insert_sync(&self, tx: &mut MemoryTx, instance: &Instance) -> Result<(), PortError> {
        self.check_tx(tx)?;
        reject_nul("instance", instance)?;
        let op = Op::InsertInstance(Box::new(instance.clone()));
        check_instance_writes(&self.state(), tx.ops.iter().chain([&op]))?;
        tx.ops.push(op);
        Ok(())
    }

    /// The instance after `tx` acquired its lock; releases the lock again if
    /// there is no such instance.
    fn locked_instance(&self, tx: &mut MemoryTx, id: Uuid) -> Option<Instance> {
        let (found, waker) = {
            let mut st = self.state();
            let found = tx_instance(&st, &tx.ops, id).cloned();
            let waker = if found.is_none() {
                tx.locks.retain(|held| *held != id);
                st.release(id, tx.id)
            } else {
                None
            };
            (found, waker)
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        found
    }

    fn update_sync(&self, tx: &mut MemoryTx, instance: &Instance) -> Result<(), PortError> {
        self.check_tx(tx)?;
        reject_nul("instance", instance)?;
        let st = self.state();
        let inserted_here = tx
            .ops
            .iter()
            .any(|op| matches!(op, Op::InsertInstance(i) if i.id == instance.id));
        if !inserted_here && !tx.locks.contains(&instance.id) {
            return Err(if tx_instance(&st, &tx.ops, instance.id).is_none() {
                PortError::NotFound(format!("instance {}", instance.id))
            } else {
                PortError::Conflict(format!(
                    "instance {} is not locked in this unit of work",
                    instance.id
                ))
            });
        }
        let op = Op::UpdateInstance(Box::new(instance.clone()));
        check_instance_writes(&st, tx.ops.iter().chain([&op]))?;
        drop(st);
        tx.ops.push(op);
        Ok(())
    }

    fn list_sync(&self, filter: &InstanceFilter) -> Vec<Instance> {
        let limit = filter
            .limit
            .map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
        let upper = filter.before_id.map_or(Bound::Unbounded, Bound::Excluded);
        let st = self.state();
        st.instances
            .range((Bound::Unbounded, upper))
            .rev()
            .map(|(_, instance)| instance)
            .filter(|i| {
                filter
                    .business_id
                    .as_ref()
                    .is_none_or(|b| *b == i.business_id)
            })
            .filter(|i| {
                filter
                    .workflow_id
                    .as_ref()
                    .is_none_or(|w| *w == i.workflow_id)
            })
            .filter(|i| {
                filter
                    .workflow_version
                    .is_none_or(|v| v == i.workflow_version)
            })
            .filter(|i| filter.statuses.is_empty() || filter.statuses.contains(&i.status))
            .take(limit)
            .cloned()
            .collect()
    }

    fn record_sync(
        &self,
        tx: &mut MemoryTx,
        result: &NewStepResult,
    ) -> Result<Recorded, PortError> {
        self.check_tx(tx)?;
        reject_nul("step result", &result.payload)?;
        let key = ResultKey::of(result);
        let mut st = self.state();
        if tx_instance(&st, &tx.ops, result.instance_id).is_none() {
            return Err(PortError::NotFound(format!(
                "instance {}",
                result.instance_id
            )));
        }
        let in_tx = tx
            .ops
            .iter()
            .any(|op| matches!(op, Op::Record { result: r, .. } if ResultKey::of(r) == key));
        if in_tx || st.result_keys.contains_key(&key) {
            return Ok(Recorded::Duplicate);
        }
        st.last_seq += 1;
        let seq = st.last_seq;
        drop(st);
        tx.ops.push(Op::Record {
            seq,
            result: result.clone(),
        });
        Ok(Recorded::Inserted(seq))
    }

    fn pending_sync(&self, tx: &MemoryTx, instance_id: Uuid) -> Result<Vec<StepResult>, PortError> {
        self.check_tx(tx)?;
        let marked: HashSet<i64> = tx
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::MarkProcessed {
                    instance_id: target,
                    seqs,
                } if *target == instance_id => Some(seqs.clone()),
                Op::Refuse {
                    instance_id: target,
                    refused,
                } if *target == instance_id => {
                    Some(refused.iter().map(|(seq, _)| *seq).collect::<Vec<_>>())
                }
                _ => None,
            })
            .flatten()
            .collect();
        let now = self.shared.now();
        let st = self.state();
        let committed = st
            .unprocessed
            .get(&instance_id)
            .into_iter()
            .flatten()
            .filter_map(|seq| {
                st.results.get(seq).map(|row| StepResult {
                    seq: *seq,
                    result: row.result.clone(),
                    inserted_at: row.inserted_at,
                })
            });
        // Results recorded in this unit of work, as a database would show them.
        let own = tx.ops.iter().filter_map(|op| match op {
            Op::Record { seq, result } if result.instance_id == instance_id => Some(StepResult {
                seq: *seq,
                result: result.clone(),
                inserted_at: now,
            }),
            _ => None,
        });
        let mut rows: Vec<StepResult> = committed
            .chain(own)
            .filter(|row| !marked.contains(&row.seq))
            .collect();
        rows.sort_by_key(|row| row.seq);
        Ok(rows)
    }

    fn is_recorded_sync(&self, instance_id: Uuid, step: &StepId, activation: u32) -> bool {
        let st = self.state();
        [ResultKind::Completed, ResultKind::Async, ResultKind::Failed]
            .into_iter()
            .any(|kind| {
                st.result_keys.contains_key(&ResultKey {
                    instance_id,
                    step: Some(step.clone()),
                    activation,
                    kind,
                })
            })
    }

    fn prune_processed_sync(&self, before: DateTime<Utc>) -> u64 {
        let mut st = self.state();
        let doomed: Vec<i64> = st
            .results
            .iter()
            .filter(|(_, row)| row.processed_at.is_some_and(|at| at < before))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in &doomed {
            if let Some(row) = st.results.remove(seq) {
                st.result_keys.remove(&ResultKey::of(&row.result));
            }
        }
        count(doomed.len())
    }

    fn enqueue_sync(&self, tx: &mut MemoryTx, jobs: &[NewJob]) -> Result<Vec<Enqueued>, PortError> {
        self.check_tx(tx)?;
        for job in jobs {
            reject_nul(
                "job",
                &(
                    &job.kind,
                    &job.queue,
                    &job.args,
                    &job.meta,
                    &job.tags,
                    job.unique.as_ref().map(|u| &u.key),
                ),
            )?;
        }
        let now = self.shared.now();
        let mut st = self.state();
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            let existing = job
                .unique
                .as_ref()
                .and_then(|unique| find_unique(&st, &tx.ops, unique));
            if let Some(existing) = existing
                && !st.jobs.contains_key(&existing)
            {
                // Held by a job of this same unit of work.
                out.push(Enqueued::Existing(existing));
                continue;
            }
            st.last_job_id += 1;
            let id = JobId(st.last_job_id);
            let scheduled_at = job.scheduled_at.unwrap_or(now);
            let row = Box::new(JobRow {
                id,
                kind: job.kind.clone(),
                queue: job.queue.clone(),
                args: job.args.clone(),
                meta: job.meta.clone(),
                tags: job.tags.clone(),
                priority: job.priority,
                max_attempts: job.max_attempts,
                state: if scheduled_at > now {
                    JobState::Scheduled
                } else {
                    JobState::Available
                },
                attempt: 0,
                scheduled_at,
                errors: Vec::new(),
                unique: job.unique.clone(),
                group: job.group.clone(),
                finalized_at: None,
                heartbeat_at: None,
            });
            if let Some(existing) = existing {
                // Merged into a committed holder; see `Op::EnqueueIfFree`.
                tx.ops.push(Op::EnqueueIfFree(row));
                out.push(Enqueued::Existing(existing));
            } else {
                tx.ops.push(Op::Enqueue(row));
                out.push(Enqueued::Inserted(id));
            }
        }
        Ok(out)
    }

    fn cancel_sync(&self, tx: &mut MemoryTx, id: JobId) -> Result<bool, PortError> {
        self.check_tx(tx)?;
        let live = tx_job(&self.state(), &tx.ops, id).is_some_and(|job| !job.state.is_finished());
        if live {
            tx.ops.push(Op::ChangeJob {
                id,
                change: JobChange::Cancel,
            });
        }
        Ok(live)
    }

    fn cancel_matching_sync(
        &self,
        tx: &mut MemoryTx,
        matching: &JobMatch,
        except: Option<JobId>,
    ) -> Result<u64, PortError> {
        self.check_tx(tx)?;
        let ids: Vec<JobId> = {
            let st = self.state();
            let committed = st.live_jobs.iter().copied();
            let in_tx = tx.ops.iter().filter_map(|op| match op {
                Op::Enqueue(job) => Some(job.id),
                _ => None,
            });
            committed
                .chain(in_tx)
                .filter(|id| Some(*id) != except)
                .filter(|id| {
                    st.jobs
                        .get(id)
                        .or_else(|| tx_enqueued(&tx.ops, *id))
                        .is_some_and(|job| matching.matches(job.group.as_deref(), &job.args))
                })
                .filter(|id| tx_job(&st, &tx.ops, *id).is_some_and(|job| !job.state.is_finished()))
                .collect()
        };
        for id in &ids {
            tx.ops.push(Op::ChangeJob {
                id: *id,
                change: JobChange::Cancel,
            });
        }
        Ok(count(ids.len()))
    }

    fn fetch_sync(&self, queue: &str, limit: u32, now: DateTime<Utc>) -> Vec<JobLease> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let mut st = self.state();
        let mut due: Vec<&JobRow> = st
            .live_jobs
            .iter()
            .filter_map(|id| st.jobs.get(id))
            .filter(|job| job.queue == queue && job.is_due(now))
            .collect();
        due.sort_by_key(|job| (job.priority, job.scheduled_at, job.id));
        let ids: Vec<JobId> = due.into_iter().take(limit).map(|job| job.id).collect();
        ids.iter()
            .filter_map(|id| {
                let job = st.jobs.get_mut(id)?;
                job.state = JobState::Executing;
                job.attempt = job.attempt.saturating_add(1);
                job.heartbeat_at = Some(now);
                Some(job.lease())
            })
            .collect()
    }

    /// Journals a fenced change; returns whether the fence holds now.
    fn fenced_sync(
        &self,
        tx: &mut MemoryTx,
        lease: &JobLease,
        change: JobChange,
    ) -> Result<bool, PortError> {
        self.check_tx(tx)?;
        let holds =
            tx_job(&self.state(), &tx.ops, lease.id).is_some_and(|job| job.holds(lease.attempt));
        if holds {
            tx.ops.push(Op::ChangeJob {
                id: lease.id,
                change,
            });
        }
        Ok(holds)
    }

    fn failure_record(
        lease: &JobLease,
        error: &StepError,
        now: DateTime<Utc>,
    ) -> Result<AttemptRecord, PortError> {
        reject_nul("job error", error)?;
        Ok(AttemptRecord {
            attempt: lease.attempt,
            at: now,
            error: error.clone(),
        })
    }

    fn live_jobs_sync(&self, matching: &JobMatch) -> Vec<JobInfo> {
        let st = self.state();
        st.live_jobs
            .iter()
            .filter_map(|id| st.jobs.get(id))
            .filter(|job| matching.matches(job.group.as_deref(), &job.args))
            .map(JobRow::info)
            .collect()
    }
}

#[async_trait::async_trait]
impl UnitOfWork for MemoryBackend {
    type Tx = MemoryTx;

    async fn begin(&self) -> Result<MemoryTx, PortError> {
        Ok(self.begin_sync())
    }

    async fn commit(&self, tx: MemoryTx) -> Result<(), PortError> {
        self.commit_sync(tx)
    }
}

#[async_trait::async_trait]
impl InstanceStore for MemoryBackend {
    async fn insert(&self, tx: &mut MemoryTx, instance: &Instance) -> Result<(), PortError> {
        self.insert_sync(tx, instance)
    }

    async fn lock(&self, tx: &mut MemoryTx, id: Uuid) -> Result<Option<Instance>, PortError> {
        self.check_tx(tx)?;
        if !tx.locks.contains(&id) {
            LockWait {
                shared: Arc::clone(&self.shared),
                tx: tx.id,
                id,
                done: false,
            }
            .await?;
            tx.locks.push(id);
        }
        Ok(self.locked_instance(tx, id))
    }

    async fn update(&self, tx: &mut MemoryTx, instance: &Instance) -> Result<(), PortError> {
        self.update_sync(tx, instance)
    }

    async fn cancel_status_only(
        &self,
        tx: &mut MemoryTx,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<bool, PortError> {
        self.check_tx(tx)?;
        let cancelled = {
            let st = self.state();
            match tx_instance(&st, &tx.ops, id) {
                Some(instance) if instance.status.is_active() => {
                    let mut cancelled = instance.clone();
                    cancelled.status = hephaestus_engine_core::instance::InstanceStatus::Cancelled;
                    cancelled.updated_at = now;
                    Some(cancelled)
                }
                _ => None,
            }
        };
        Ok(match cancelled {
            Some(instance) => {
                tx.ops.push(Op::UpdateInstance(Box::new(instance)));
                true
            }
            None => false,
        })
    }

    async fn get(&self, id: Uuid) -> Result<Option<Instance>, PortError> {
        Ok(self.state().instances.get(&id).cloned())
    }

    async fn list(&self, filter: &InstanceFilter) -> Result<Vec<Instance>, PortError> {
        Ok(self.list_sync(filter))
    }
}

#[async_trait::async_trait]
impl StepResultStore for MemoryBackend {
    async fn record(
        &self,
        tx: &mut MemoryTx,
        result: &NewStepResult,
    ) -> Result<Recorded, PortError> {
        self.record_sync(tx, result)
    }

    async fn pending(
        &self,
        tx: &mut MemoryTx,
        instance_id: Uuid,
    ) -> Result<Vec<StepResult>, PortError> {
        self.pending_sync(tx, instance_id)
    }

    async fn mark_processed(
        &self,
        tx: &mut MemoryTx,
        instance_id: Uuid,
        seqs: &[i64],
    ) -> Result<(), PortError> {
        self.check_tx(tx)?;
        if !seqs.is_empty() {
            tx.ops.push(Op::MarkProcessed {
                instance_id,
                seqs: seqs.to_vec(),
            });
        }
        Ok(())
    }

    async fn refuse(
        &self,
        tx: &mut MemoryTx,
        instance_id: Uuid,
        refused: &[(i64, String)],
    ) -> Result<(), PortError> {
        self.check_tx(tx)?;
        if !refused.is_empty() {
            tx.ops.push(Op::Refuse {
                instance_id,
                refused: refused.to_vec(),
            });
        }
        Ok(())
    }

    async fn refused(&self, instance_id: Uuid) -> Result<Vec<Refused>, PortError> {
        let st = self.state();
        Ok(st
            .results
            .iter()
            .filter(|(_, row)| row.result.instance_id == instance_id)
            .filter_map(|(seq, row)| {
                row.refusal.as_ref().map(|reason| Refused {
                    seq: *seq,
                    step: row.result.step.clone(),
                    activation: row.result.activation,
                    kind: row.result.payload.kind(),
                    reason: reason.clone(),
                })
            })
            .collect())
    }

    async fn is_recorded(
        &self,
        instance_id: Uuid,
        step: &StepId,
        activation: u32,
    ) -> Result<bool, PortError> {
        Ok(self.is_recorded_sync(instance_id, step, activation))
    }

    async fn prune_processed(&self, before: DateTime<Utc>) -> Result<u64, PortError> {
        Ok(self.prune_processed_sync(before))
    }
}

#[async_trait::async_trait]
impl JobQueue for MemoryBackend {
    async fn enqueue(
        &self,
        tx: &mut MemoryTx,
        jobs: &[NewJob],
    ) -> Result<Vec<Enqueued>, PortError> {
        self.enqueue_sync(tx, jobs)
    }

    async fn cancel(&self, tx: &mut MemoryTx, id: JobId) -> Result<bool, PortError> {
        self.cancel_sync(tx, id)
    }

    async fn cancel_matching(
        &self,
        tx: &mut MemoryTx,
        matching: &JobMatch,
        except: Option<JobId>,
    ) -> Result<u64, PortError> {
        self.cancel_matching_sync(tx, matching, except)
    }

    async fn fetch(
        &self,
        queue: &str,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<JobLease>, PortError> {
        Ok(self.fetch_sync(queue, limit, now))
    }

    async fn complete(&self, tx: &mut MemoryTx, lease: &JobLease) -> Result<bool, PortError> {
        self.fenced_sync(
            tx,
            lease,
            JobChange::Complete {
                attempt: lease.attempt,
            },
        )
    }

    async fn retry(
        &self,
        tx: &mut MemoryTx,
        lease: &JobLease,
        error: &StepError,
        retry_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool, PortError> {
        let record = Self::failure_record(lease, error, now)?;
        self.fenced_sync(tx, lease, JobChange::Retry { record, retry_at })
    }

    async fn discard(
        &self,
        tx: &mut MemoryTx,
        lease: &JobLease,
        error: &StepError,
        now: DateTime<Utc>,
    ) -> Result<bool, PortError> {
        let record = Self::failure_record(lease, error, now)?;
        self.fenced_sync(tx, lease, JobChange::Discard { record })
    }

    async fn heartbeat(&self, leases: &[(JobId, u32)]) -> Result<Vec<JobId>, PortError> {
        let now = self.shared.now();
        let mut st = self.state();
        let mut held = Vec::new();
        for (id, attempt) in leases {
            if let Some(job) = st.jobs.get_mut(id)
                && job.holds(*attempt)
            {
                job.heartbeat_at = Some(now);
                held.push(*id);
            }
        }
        Ok(held)
    }

    async fn stale(&self, before: DateTime<Utc>, limit: u32) -> Result<Vec<JobLease>, PortError> {
        let st = self.state();
        let mut stale: Vec<&JobRow> = st
            .live_jobs
            .iter()
            .filter_map(|id| st.jobs.get(id))
            .filter(|job| {
                job.state == JobState::Executing && job.heartbeat_at.is_none_or(|at| at < before)
            })
            .collect();
        stale.sort_by_key(|job| (job.heartbeat_at, job.id));
        Ok(stale
            .into_iter()
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .map(JobRow::lease)
            .collect())
    }

    async fn prune_finished(&self, before: DateTime<Utc>) -> Result<u64, PortError> {
        Ok(self.prune_finished_jobs(before))
    }

    async fn job(&self, id: JobId) -> Result<Option<JobInfo>, PortError> {
        Ok(self.state().jobs.get(&id).map(JobRow::info))
    }

    async fn live_jobs(&self, matching: &JobMatch) -> Result<Vec<JobInfo>, PortError> {
        Ok(self.live_jobs_sync(matching))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    use chrono::TimeDelta;
    use serde_json::json;

    use hephaestus_engine_core::business_id::{BusinessId, Scope};
    use hephaestus_engine_core::clock::ManualClock;
    use hephaestus_engine_core::context::Context;
    use hephaestus_engine_core::ids::WorkflowId;
    use hephaestus_engine_core::instance::InstanceStatus;
    use hephaestus_engine_core::ports::{ResultPayload, StepResultStore};
    use hephaestus_engine_core::step::EventName;

    use super::*;

    /// Runs a future to completion on a fresh current-thread runtime.
    fn block_on<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
            .block_on(future)
    }

    /// Counts wake-ups.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Wakes {
        fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn poll<F: Future + ?Sized>(future: Pin<&mut F>, counter: &Arc<Wakes>) -> Poll<F::Output> {
        let waker = Waker::from(Arc::clone(counter));
        future.poll(&mut TaskContext::from_waker(&waker))
    }

    fn instance(business: &str) -> Instance {
        let business_id = BusinessId::parse(business).unwrap();
        let workflow_id = WorkflowId::new("orders").unwrap();
        let unique_claim = UniqueClaim::for_scope(Scope::Workflow, &business_id, &workflow_id, 1);
        Instance {
            id: Uuid::now_v7(),
            business_id,
            workflow_id,
            workflow_version: 1,
            status: InstanceStatus::Running,
            unique_claim,
            context: Context::new(json!({})),
            step_configs: BTreeMap::new(),
            runtime_metadata: serde_json::Map::new(),
            steps: BTreeMap::new(),
            history: Vec::new(),
            failure: None,
            telemetry_metadata: serde_json::Map::new(),
            created_at: DateTime::<Utc>::UNIX_EPOCH,
            updated_at: DateTime::<Utc>::UNIX_EPOCH,
            revision: 0,
        }
    }

    fn committed(b: &MemoryBackend, business: &str) -> Instance {
        let inst = instance(business);
        let mut tx = block_on(b.begin()).unwrap();
        block_on(b.insert(&mut tx, &inst)).unwrap();
        block_on(b.commit(tx)).unwrap();
        inst
    }

    fn completed(instance_id: Uuid, step: &str) -> NewStepResult {
        NewStepResult {
            instance_id,
            step: Some(StepId::new(step).unwrap()),
            activation: 1,
            payload: ResultPayload::Completed {
                event: EventName("done".to_owned()),
                output: json!({}),
                metadata: serde_json::Map::new(),
            },
        }
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + TimeDelta::days(20_000) + TimeDelta::seconds(secs)
    }

    /// A backend whose clock the test sets.
    fn clocked() -> (MemoryBackend, ManualClock) {
        let time = ManualClock::new(at(0));
        (MemoryBackend::with_clock(time.clone()), time)
    }

    #[test]
    fn lock_is_handed_to_waiters_in_arrival_order() {
        let b = MemoryBackend::new();
        let x = committed(&b, "order::1");
        let other = committed(&b, "order::2");
        let mut t1 = block_on(b.begin()).unwrap();
        assert_eq!(block_on(b.lock(&mut t1, x.id)).unwrap().as_ref(), Some(&x));
        let (w2, w3) = (Arc::new(Wakes::default()), Arc::new(Wakes::default()));
        let mut t2 = block_on(b.begin()).unwrap();
        let mut t3 = block_on(b.begin()).unwrap();
        let mut f2 = b.lock(&mut t2, x.id);
        let mut f3 = b.lock(&mut t3, x.id);
        assert!(poll(f2.as_mut(), &w2).is_pending());
        assert!(poll(f3.as_mut(), &w3).is_pending());
        assert!(
            poll(f2.as_mut(), &w2).is_pending(),
            "polling again keeps the place"
        );

        // Another instance is not blocked.
        let mut t4 = block_on(b.begin()).unwrap();
        assert!(block_on(b.lock(&mut t4, other.id)).unwrap().is_some());
        drop(t4);

        let mut updated = x.clone();
        updated.revision = 1;
        block_on(b.update(&mut t1, &updated)).unwrap();
        assert_eq!((w2.count(), w3.count()), (0, 0));
        block_on(b.commit(t1)).unwrap();
        assert_eq!(
            (w2.count(), w3.count()),
            (1, 0),
            "only the first waiter is woken"
        );
        let Poll::Ready(seen) = poll(f2.as_mut(), &w2) else {
            panic!("the first waiter must hold the lock");
        };
        assert_eq!(
            seen.unwrap().unwrap().revision,
            1,
            "it sees the committed update"
        );
        assert!(poll(f3.as_mut(), &w3).is_pending());
        drop(f2);
        drop(t2);
        assert_eq!(
            w3.count(),
            1,
            "the rollback of the second hands the lock on"
        );
        assert!(matches!(poll(f3.as_mut(), &w3), Poll::Ready(Ok(Some(_)))));
        drop(f3);
        drop(t3);
        assert!(b.state().locks.is_empty() && b.state().waiting_for.is_empty());
    }

    #[test]
    fn an_abandoned_waiter_passes_the_lock_on() {
        let b = MemoryBackend::new();
        let x = committed(&b, "order::1");
        let (w2, w3) = (Arc::new(Wakes::default()), Arc::new(Wakes::default()));

        // Abandoned before the lock is handed over.
        let mut t1 = block_on(b.begin()).unwrap();
        block_on(b.lock(&mut t1, x.id)).unwrap();
        let mut t2 = block_on(b.begin()).unwrap();
        let mut f2 = b.lock(&mut t2, x.id);
        assert!(poll(f2.as_mut(), &w2).is_pending());
        drop(f2);
        block_on(b.commit(t1)).unwrap();
        assert_eq!(w2.count(), 0);
        assert!(b.state().locks.is_empty());

        // Abandoned after the lock was handed to it.
        let mut t1 = block_on(b.begin()).unwrap();
        block_on(b.lock(&mut t1, x.id)).unwrap();
        let mut f2 = b.lock(&mut t2, x.id);
        let mut t3 = block_on(b.begin()).unwrap();
        let mut f3 = b.lock(&mut t3, x.id);
        assert!(poll(f2.as_mut(), &w2).is_pending());
        assert!(poll(f3.as_mut(), &w3).is_pending());
        drop(t1);
        assert_eq!(w2.count(), 1);
        drop(f2);
        assert_eq!(w3.count(), 1, "the abandoned waiter passes the lock on");
        assert!(matches!(poll(f3.as_mut(), &w3), Poll::Ready(Ok(Some(_)))));
        assert!(t2.locks.is_empty());
    }

    #[test]
    fn a_lock_cycle_is_reported_as_a_deadlock() {
        let b = MemoryBackend::new();
        let x = committed(&b, "order::1");
        let y = committed(&b, "order::2");
        let (w1, w2) = (Arc::new(Wakes::default()), Arc::new(Wakes::default()));
        let mut t1 = block_on(b.begin()).unwrap();
        let mut t2 = block_on(b.begin()).unwrap();
        block_on(b.lock(&mut t1, x.id)).unwrap();
        block_on(b.lock(&mut t2, y.id)).unwrap();
        let mut f1 = b.lock(&mut t1, y.id);
        assert!(poll(f1.as_mut(), &w1).is_pending());
        let mut f2 = b.lock(&mut t2, x.id);
        assert!(matches!(
            poll(f2.as_mut(), &w2),
            Poll::Ready(Err(PortError::Conflict(_)))
        ));
        drop(f2);
        drop(t2);
        assert_eq!(w1.count(), 1);
        assert!(matches!(poll(f1.as_mut(), &w1), Poll::Ready(Ok(Some(_)))));
    }

    #[test]
    fn a_shared_handle_survives_a_runtime_restart() {
        let backend = MemoryBackend::new();
        let kept = backend.clone();
        let first_runtime = std::thread::spawn(move || {
            block_on(async {
                let inst = instance("order::1");
                let mut tx = backend.begin().await.unwrap();
                backend.insert(&mut tx, &inst).await.unwrap();
                backend
                    .record(&mut tx, &completed(inst.id, "a"))
                    .await
                    .unwrap();
                backend
                    .enqueue(
                        &mut tx,
                        &[NewJob::new("advance", "default", json!({"id": inst.id}))],
                    )
                    .await
                    .unwrap();
                backend.commit(tx).await.unwrap();
                inst.id
            })
        });
        let id = first_runtime.join().unwrap();
        block_on(async {
            assert!(kept.get(id).await.unwrap().is_some());
            let mut tx = kept.begin().await.unwrap();
            assert_eq!(kept.pending(&mut tx, id).await.unwrap().len(), 1);
            let leases = kept
                .fetch("default", 10, Utc::now() + TimeDelta::minutes(1))
                .await
                .unwrap();
            assert_eq!(leases.len(), 1);
        });
    }

    #[test]
    fn time_comes_from_the_injected_clock() {
        let (b, time) = clocked();
        let inst = committed(&b, "order::1");
        let mut tx = block_on(b.begin()).unwrap();
        let Recorded::Inserted(seq) =
            block_on(b.record(&mut tx, &completed(inst.id, "a"))).unwrap()
        else {
            panic!("expected a new row");
        };
        time.set(at(10));
        block_on(b.commit(tx)).unwrap();
        let mut tx = block_on(b.begin()).unwrap();
        let pending = block_on(b.pending(&mut tx, inst.id)).unwrap();
        assert_eq!(pending[0].inserted_at, at(10), "recorded at commit time");
        block_on(b.mark_processed(&mut tx, inst.id, &[seq])).unwrap();
        time.set(at(20));
        block_on(b.commit(tx)).unwrap();
        assert_eq!(
            block_on(b.prune_processed(at(20))).unwrap(),
            0,
            "processed at 20, not before"
        );
        assert_eq!(block_on(b.prune_processed(at(21))).unwrap(), 1);

        // Due or scheduled per the clock.
        let mut later = NewJob::new("k", "q", json!({}));
        later.scheduled_at = Some(at(21));
        let mut tx = block_on(b.begin()).unwrap();
        let out = block_on(b.enqueue(&mut tx, &[NewJob::new("k", "q", json!({})), later])).unwrap();
        block_on(b.commit(tx)).unwrap();
        let now_job = block_on(b.job(out[0].id())).unwrap().unwrap();
        let later_job = block_on(b.job(out[1].id())).unwrap().unwrap();
        assert_eq!(
            (now_job.state, now_job.scheduled_at),
            (JobState::Available, at(20))
        );
        assert_eq!(
            (later_job.state, later_job.scheduled_at),
            (JobState::Scheduled, at(21))
        );
        assert_eq!(b.due_count(at(20)), 1);
        assert_eq!(b.due_count(at(21)), 2);

        // Finished jobs are pruned by the time they finished.
        let leases = block_on(b.fetch("q", 10, at(21))).unwrap();
        let mut tx = block_on(b.begin()).unwrap();
        for lease in &leases {
            assert!(block_on(b.complete(&mut tx, lease)).unwrap());
        }
        time.set(at(30));
        block_on(b.commit(tx)).unwrap();
        assert_eq!(b.prune_finished_jobs(at(30)), 0);
        assert_eq!(b.prune_finished_jobs(at(31)), 2);
        assert!(b.jobs().is_empty());
    }

    #[test]
    fn a_claim_taken_before_commit_fails_the_whole_commit() {
        let b = MemoryBackend::new();
        let existing = committed(&b, "order::9");
        let first = instance("order::1");
        let second = instance("order::1");
        let mut t1 = block_on(b.begin()).unwrap();
        let mut t2 = block_on(b.begin()).unwrap();
        block_on(b.insert(&mut t1, &first)).unwrap();
        block_on(b.insert(&mut t2, &second)).unwrap();
        block_on(b.record(&mut t2, &completed(existing.id, "a"))).unwrap();
        block_on(b.enqueue(&mut t2, &[NewJob::new("k", "q", json!({}))])).unwrap();
        block_on(b.commit(t1)).unwrap();
        match block_on(b.commit(t2)) {
            Err(PortError::AlreadyRunning {
                business_id,
                instance_id,
            }) => {
                assert_eq!(business_id.as_str(), "order::1");
                assert_eq!(instance_id, first.id);
            }
            other => panic!("expected AlreadyRunning, got {other:?}"),
        }
        assert_eq!(
            b.instances().len(),
            2,
            "nothing of the failed commit is applied"
        );
        assert!(b.jobs().is_empty());
        let mut tx = block_on(b.begin()).unwrap();
        assert!(
            block_on(b.pending(&mut tx, existing.id))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn conflicts_found_at_commit_drop_or_skip_the_write() {
        let b = MemoryBackend::new();
        let inst = committed(&b, "order::1");

        // The same result recorded by two units of work: stored once.
        let mut t1 = block_on(b.begin()).unwrap();
        let mut t2 = block_on(b.begin()).unwrap();
        let r1 = block_on(b.record(&mut t1, &completed(inst.id, "a"))).unwrap();
        let r2 = block_on(b.record(&mut t2, &completed(inst.id, "a"))).unwrap();
        assert!(matches!(
            (r1, r2),
            (Recorded::Inserted(_), Recorded::Inserted(_))
        ));
        block_on(b.commit(t1)).unwrap();
        block_on(b.commit(t2)).unwrap();
        let mut tx = block_on(b.begin()).unwrap();
        let pending = block_on(b.pending(&mut tx, inst.id)).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(Recorded::Inserted(pending[0].seq), r1);

        // The same unique job enqueued by two units of work: stored once.
        let mut job = NewJob::new("k", "q", json!({}));
        job.unique = Some(UniqueJob {
            key: "u".to_owned(),
            states: vec![JobState::Available],
        });
        let mut t1 = block_on(b.begin()).unwrap();
        let mut t2 = block_on(b.begin()).unwrap();
        let e1 = block_on(b.enqueue(&mut t1, std::slice::from_ref(&job))).unwrap();
        let e2 = block_on(b.enqueue(&mut t2, std::slice::from_ref(&job))).unwrap();
        assert!(matches!(
            (e1[0], e2[0]),
            (Enqueued::Inserted(_), Enqueued::Inserted(_))
        ));
        block_on(b.commit(t1)).unwrap();
        block_on(b.commit(t2)).unwrap();
        assert_eq!(
            b.jobs().iter().map(|j| j.id).collect::<Vec<_>>(),
            vec![e1[0].id()]
        );

        // A fence that held when called but not at commit: skipped.
        let lease = block_on(b.fetch("q", 1, Utc::now())).unwrap().remove(0);
        let mut t1 = block_on(b.begin()).unwrap();
        assert!(block_on(b.complete(&mut t1, &lease)).unwrap());
        let mut t2 = block_on(b.begin()).unwrap();
        assert!(block_on(b.cancel(&mut t2, lease.id)).unwrap());
        block_on(b.commit(t2)).unwrap();
        block_on(b.commit(t1)).unwrap();
        assert_eq!(
            block_on(b.job(lease.id)).unwrap().unwrap().state,
            JobState::Cancelled
        );
    }

    #[test]
    fn update_needs_the_lock_and_the_right_backend() {
        let b = MemoryBackend::new();
        let inst = committed(&b, "order::1");
        let mut tx = block_on(b.begin()).unwrap();
        assert!(matches!(
            block_on(b.update(&mut tx, &inst)),
            Err(PortError::Conflict(_))
        ));
        assert!(matches!(
            block_on(b.update(&mut tx, &instance("order::2"))),
            Err(PortError::NotFound(_))
        ));

        let other = MemoryBackend::new();
        let mut foreign = block_on(other.begin()).unwrap();
        assert!(matches!(
            block_on(b.lock(&mut foreign, inst.id)),
            Err(PortError::InvalidInput(_))
        ));
        assert!(matches!(
            block_on(b.commit(foreign)),
            Err(PortError::InvalidInput(_))
        ));
    }

    #[test]
    fn inspection_helpers_show_committed_state() {
        let b = MemoryBackend::new();
        let inst = committed(&b, "order::1");
        let mut tx = block_on(b.begin()).unwrap();
        block_on(b.enqueue(&mut tx, &[NewJob::new("k", "q", json!({"a": 1}))])).unwrap();
        assert!(b.jobs().is_empty());
        block_on(b.commit(tx)).unwrap();
        assert_eq!(b.instances(), vec![inst]);
        let jobs = b.jobs();
        assert_eq!(
            (jobs.len(), jobs[0].state, &jobs[0].args),
            (1, JobState::Available, &json!({"a": 1}))
        );
        assert_eq!(b.due_count(Utc::now() + TimeDelta::minutes(1)), 1);
        assert_eq!(format!("{b:?}"), "MemoryBackend { .. }");
    }
}
