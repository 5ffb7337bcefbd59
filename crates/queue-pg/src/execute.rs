//! One attempt: find the worker, run it outside any transaction with panic
//! capture, and settle what it returned (retry with backoff, discard with
//! the hook in the discarding transaction, snooze, cancel). Shared by the
//! runtime and the drain helper.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use chrono::TimeDelta;
use hephaestus_engine_core::ports::JobLease;
use hephaestus_engine_core::retry::{RetryDecision, RetryPolicy};
use hephaestus_engine_core::step::{StepError, panic_message};
use serde_json::json;

use crate::error::Error;
use crate::events::{Events, JobEventKind, record_attempt};
use crate::hook::{AfterCommit, DiscardedJob};
use crate::queue::PgQueue;
use crate::worker::{JobContext, JobError, Workers};

/// What an attempt returned.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Attempt {
    Completed,
    /// The worker settled the attempt itself ([`JobContext::mark_settled`]).
    SettledByWorker,
    Failed(StepError),
    Snoozed(Duration),
    Cancelled(String),
}

/// An attempt that ran, with the policy for its retries.
#[derive(Debug)]
pub(crate) struct Ran {
    pub outcome: Attempt,
    pub policy: RetryPolicy,
    pub run_time: Duration,
}

/// How an attempt was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settlement {
    Completed,
    Retried,
    Discarded,
    HookFailed,
    Snoozed,
    /// The worker settled the attempt itself.
    SettledByWorker,
    Cancelled,
    /// The lease no longer held: nothing changed.
    Fenced,
}

/// Runs the worker for `job`. Never fails: an unknown kind, undecodable
/// args or a panic become a recorded retryable error.
pub(crate) async fn run(workers: &Workers, job: &JobContext) -> Ran {
    let Some(worker) = workers.get(job.kind()) else {
        return Ran {
            outcome: Attempt::Failed(StepError::retryable(format!(
                "no worker is registered for job kind {:?} (job {})",
                job.kind(),
                job.id()
            ))),
            policy: workers.fallback_policy(),
            run_time: Duration::ZERO,
        };
    };
    let policy = worker.retry_policy();
    let started = Instant::now();
    let result = CatchUnwind(Box::pin(worker.perform(job))).await;
    let run_time = started.elapsed();
    let outcome = match result {
        Ok(_) if job.is_settled() => Attempt::SettledByWorker,
        Ok(Ok(())) => Attempt::Completed,
        Ok(Err(JobError::Failed(error))) => Attempt::Failed(error),
        Ok(Err(JobError::Snooze(delay))) => Attempt::Snoozed(delay),
        Ok(Err(JobError::Cancel(reason))) => Attempt::Cancelled(reason),
        Err(panic) => Attempt::Failed(
            StepError::retryable(format!(
                "job {} (kind {:?}) panicked: {}",
                job.id(),
                job.kind(),
                panic_message(panic.as_ref())
            ))
            .with_details(json!({"panic": true})),
        ),
    };
    Ran {
        outcome,
        policy,
        run_time,
    }
}

/// Settles attempts: the queue, the workers (retry policies, discard hook)
/// and where to report.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settler<'a> {
    pub queue: &'a PgQueue,
    pub workers: &'a Workers,
    pub events: &'a Events,
}

impl Settler<'_> {
    /// Settles an attempt that did not complete (a completion is batched by
    /// the runtime, or settled by [`Settler::complete_now`]).
    pub(crate) async fn settle_failure(
        &self,
        lease: &JobLease,
        ran: &Ran,
    ) -> Result<Settlement, Error> {
        let Self { queue, events, .. } = *self;
        let now = queue.now();
        let outcome_name;
        let settlement = match &ran.outcome {
            Attempt::Completed => return self.complete_now(lease, ran).await,
            Attempt::SettledByWorker => {
                events.emit(
                    lease,
                    JobEventKind::SettledByWorker,
                    None,
                    Some(ran.run_time),
                );
                record_attempt(lease, "settled_by_worker", ran.run_time);
                return Ok(Settlement::SettledByWorker);
            }
            Attempt::Failed(error)
                if let RetryDecision::RetryAfter(delay) = ran.policy.decide(
                    lease.attempt,
                    lease.max_attempts,
                    error,
                    lease.jitter_sample(),
                ) =>
            {
                outcome_name = "retried";
                let retry_at = now + to_delta(delay);
                let mut conn = queue.acquire().await?;
                let held = queue
                    .retry_using(&mut conn, lease, error, retry_at, now)
                    .await?;
                conn.finish().await?;
                if held {
                    events.emit(
                        lease,
                        JobEventKind::Retried { retry_at },
                        Some(error),
                        Some(ran.run_time),
                    );
                    Settlement::Retried
                } else {
                    Settlement::Fenced
                }
            }
            Attempt::Failed(error) => {
                outcome_name = "discarded";
                self.discard_with_hook(lease, error, &ran.policy, Some(ran.run_time))
                    .await?
            }
            Attempt::Snoozed(delay) => {
                outcome_name = "snoozed";
                let until = now + to_delta(*delay);
                let mut conn = queue.acquire().await?;
                let held = queue.snooze_using(&mut conn, lease, until).await?;
                conn.finish().await?;
                if held {
                    events.emit(
                        lease,
                        JobEventKind::Snoozed { until },
                        None,
                        Some(ran.run_time),
                    );
                    Settlement::Snoozed
                } else {
                    Settlement::Fenced
                }
            }
            Attempt::Cancelled(reason) => {
                outcome_name = "cancelled";
                let error = StepError::fatal(format!("cancelled by its worker: {reason}"));
                let mut conn = queue.acquire().await?;
                let held = queue
                    .cancel_lease_using(&mut conn, lease, &error, now)
                    .await?;
                conn.finish().await?;
                if held {
                    events.emit(
                        lease,
                        JobEventKind::Cancelled,
                        Some(&error),
                        Some(ran.run_time),
                    );
                    Settlement::Cancelled
                } else {
                    Settlement::Fenced
                }
            }
        };
        if settlement == Settlement::Fenced {
            fenced(events, lease, ran.run_time);
            record_attempt(lease, "fenced", ran.run_time);
        } else {
            record_attempt(lease, outcome_name, ran.run_time);
        }
        Ok(settlement)
    }

    /// Completes one attempt now (the drain helper; the runtime batches).
    pub(crate) async fn complete_now(
        &self,
        lease: &JobLease,
        ran: &Ran,
    ) -> Result<Settlement, Error> {
        let Self { queue, events, .. } = *self;
        let mut conn = queue.acquire().await?;
        let held = queue.complete_using(&mut conn, lease).await?;
        conn.finish().await?;
        if held {
            events.emit(lease, JobEventKind::Completed, None, Some(ran.run_time));
            record_attempt(lease, "completed", ran.run_time);
            Ok(Settlement::Completed)
        } else {
            fenced(events, lease, ran.run_time);
            record_attempt(lease, "fenced", ran.run_time);
            Ok(Settlement::Fenced)
        }
    }

    /// Discards the job and runs the discard hook in the same transaction. A
    /// hook error rolls both back; the job is then made retryable with the hook
    /// failure recorded, and due again after the backoff.
    pub(crate) async fn discard_with_hook(
        &self,
        lease: &JobLease,
        error: &StepError,
        policy: &RetryPolicy,
        run_time: Option<Duration>,
    ) -> Result<Settlement, Error> {
        let Self {
            queue,
            workers,
            events,
        } = *self;
        let now = queue.now();
        let mut tx = queue.pool().begin().await?;
        if !queue.discard_using(&mut tx, lease, error, now).await? {
            return Ok(Settlement::Fenced);
        }
        let after_commit = AfterCommit::default();
        if let Some(hook) = workers.hook() {
            let job = DiscardedJob {
                lease,
                error,
                at: now,
                queue,
                after_commit: &after_commit,
            };
            if let Err(hook_error) = hook.on_discard(&mut tx, job).await {
                // Roll back the discard and whatever the hook wrote.
                tx.rollback().await?;
                let recorded = StepError::retryable(format!("discard hook failed: {hook_error}"))
                    .with_details(json!({ "error": error }));
                let retry_at = now + retry_delay(policy, lease, &recorded);
                let mut conn = queue.acquire().await?;
                let held = queue
                    .retry_using(&mut conn, lease, &recorded, retry_at, now)
                    .await?;
                conn.finish().await?;
                if !held {
                    return Ok(Settlement::Fenced);
                }
                tracing::error!(
                    target: "hephaestus_queue",
                    job = lease.id.0,
                    kind = %lease.kind,
                    error = %hook_error,
                    "discard hook failed; the discard was rolled back"
                );
                events.emit(
                    lease,
                    JobEventKind::DiscardHookFailed { retry_at },
                    Some(&recorded),
                    run_time,
                );
                return Ok(Settlement::HookFailed);
            }
        }
        tx.commit().await?;
        after_commit.run();
        events.emit(lease, JobEventKind::Discarded, Some(error), run_time);
        Ok(Settlement::Discarded)
    }
}

/// Reports an acknowledgement that did not hold: the job is no longer
/// executing at this attempt, or was cancelled while it ran.
pub(crate) fn fenced(events: &Events, lease: &JobLease, run_time: Duration) {
    events.emit(lease, JobEventKind::Fenced, None, Some(run_time));
}

/// The delay before the next attempt after the failed `attempt`, whatever
/// the attempts left (a discard hook that failed is retried even on the
/// last attempt): [`RetryPolicy::decide`] with no limit, so the error's
/// explicit delay wins, else the policy's backoff with jitter.
pub(crate) fn retry_delay(policy: &RetryPolicy, lease: &JobLease, error: &StepError) -> TimeDelta {
    let (attempt, sample) = (lease.attempt, lease.jitter_sample());
    match policy.decide(attempt, u32::MAX, error, sample) {
        RetryDecision::RetryAfter(delay) => to_delta(delay),
        // A fatal error has no delay of its own: the policy's backoff.
        RetryDecision::Discard => to_delta(policy.delay(attempt, sample)),
    }
}

fn to_delta(delay: Duration) -> TimeDelta {
    TimeDelta::from_std(delay).unwrap_or(TimeDelta::MAX)
}

/// Polls a future, turning a panic into an error.
struct CatchUnwind<'a, T>(Pin<Box<dyn Future<Output = T> + Send + 'a>>);

impl<T> Future for CatchUnwind<'_, T> {
    type Output = Result<T, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let future = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_delays_override_the_backoff() {
        let policy = RetryPolicy::new(
            5,
            hephaestus_engine_core::retry::Backoff::Linear,
            Duration::from_secs(2),
            Duration::from_secs(60),
        )
        .unwrap();
        let lease = JobLease {
            id: hephaestus_engine_core::ports::JobId(7),
            kind: "k".into(),
            queue: "default".into(),
            args: serde_json::Value::Null,
            meta: serde_json::Map::new(),
            attempt: 3,
            max_attempts: 5,
            scheduled_at: chrono::DateTime::UNIX_EPOCH,
            errors: Vec::new(),
        };
        assert_eq!(
            retry_delay(&policy, &lease, &StepError::retryable("x")),
            TimeDelta::seconds(6)
        );
        assert_eq!(
            retry_delay(
                &policy,
                &lease,
                &StepError::retry_after("x", Duration::from_millis(1500))
            ),
            TimeDelta::milliseconds(1500)
        );
    }

    #[test]
    fn panics_are_caught_with_their_message() {
        let caught = std::panic::catch_unwind(|| panic!("boom {}", 1)).unwrap_err();
        assert_eq!(panic_message(caught.as_ref()), "boom 1");
        let caught = std::panic::catch_unwind(|| std::panic::panic_any(7_u8)).unwrap_err();
        assert_eq!(panic_message(caught.as_ref()), "a non-string panic payload");
    }
}
