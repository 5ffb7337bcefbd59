//! The step contract: what a step declares, what it receives and what it returns.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::context::Context;
use crate::ids::{Event, IdempotencyKey, StepId};
use crate::retry::RetryPolicy;

/// One step type of a workflow.
///
/// A step has a stable string id (persisted; renaming it orphans running
/// instances), declares every event it can emit, and executes asynchronously.
/// Execution is at-least-once: use [`StepInput::idempotency_key`] to make side
/// effects idempotent.
#[async_trait::async_trait]
pub trait Step: Send + Sync + 'static {
    /// The stable identity of this step type.
    fn id(&self) -> StepId;

    /// Every event this step can emit when it completes, given the config it
    /// is activated with (literal configs are known at build time).
    fn events(&self, config: Option<&Value>) -> Vec<Event>;

    /// The key under which this step's output is stored in the context.
    /// Defaults to the snake-cased short name of the id.
    fn step_key(&self) -> String {
        self.id().default_step_key()
    }

    /// A retry policy for this step, overriding the workflow's.
    fn retry_policy(&self) -> Option<RetryPolicy> {
        None
    }

    /// Checks a config this step is activated with. Literal configs are
    /// checked when the workflow is built; runtime configs (from dynamic
    /// routes) when the step is activated, failing the step fatally.
    fn validate_config(&self, config: Option<&Value>) -> Result<(), String> {
        let _ = config;
        Ok(())
    }

    /// Runs the step.
    async fn execute(&self, input: StepInput<'_>) -> StepOutcome;
}

/// Everything a step sees when it runs.
#[derive(Debug)]
pub struct StepInput<'a> {
    /// The instance's context: the start input and every completed step's output.
    pub context: &'a Context,
    /// The config this activation was given by the transition that activated it.
    pub config: Option<&'a Value>,
    /// The instance's UUID.
    pub instance_id: Uuid,
    /// The instance's business id (`key::value`).
    pub business_id: &'a str,
    /// The activation of the step within the instance (1 for the first).
    pub activation: u32,
    /// The attempt of this activation (1 for the first try, then retries).
    pub attempt: u32,
    /// Identity of this activation, the same across retry attempts.
    pub idempotency_key: IdempotencyKey,
    /// Signals that the instance was cancelled; a long step may stop early.
    pub cancellation: CancellationSignal,
}

/// What a step returns. A typed enum, so a malformed result cannot exist.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    /// The step finished and emits `event`.
    Complete(Completion),
    /// The step started something external; the instance waits for a resume
    /// of this step (and, with a timer, resumes itself when it fires).
    Async(AsyncWait),
    /// The step failed.
    Error(StepError),
}

impl StepOutcome {
    /// Completes with `event` and an empty output.
    pub fn complete(event: impl AsRef<str>) -> Self {
        Self::Complete(Completion::new(event))
    }

    /// Completes with `event` and `output` stored under the step's key.
    pub fn complete_with(event: impl AsRef<str>, output: Value) -> Self {
        Self::Complete(Completion::new(event).with_output(output))
    }

    /// Waits for an external resume, with no timer.
    pub fn wait() -> Self {
        Self::Async(AsyncWait::default())
    }

    /// Waits for an external resume, resuming with `event` after `after` if
    /// none arrives first.
    pub fn wait_with_timer(after: Duration, event: impl AsRef<str>) -> Self {
        Self::Async(AsyncWait {
            timer: Some(TimerSpec {
                after,
                event: EventName(event.as_ref().to_owned()),
            }),
        })
    }

    /// A retryable failure.
    pub fn retry(message: impl Into<String>) -> Self {
        Self::Error(StepError::retryable(message))
    }

    /// A fatal failure: no retries, the instance fails.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self::Error(StepError::fatal(message))
    }
}

/// An event name as a step returned it, not yet validated against the
/// step's declaration (the engine does that, failing the step fatally on an
/// undeclared or malformed event).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventName(pub String);

impl EventName {
    /// The raw name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A successful completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The event emitted.
    pub event: EventName,
    /// Output stored in the context under the step's key (default `{}`).
    pub output: Value,
    /// Shallow-merged into the instance's runtime metadata (later wins).
    pub metadata: Map<String, Value>,
}

impl Completion {
    /// A completion with an empty output.
    pub fn new(event: impl AsRef<str>) -> Self {
        Self {
            event: EventName(event.as_ref().to_owned()),
            output: Value::Object(Map::new()),
            metadata: Map::new(),
        }
    }

    /// Sets the output.
    #[must_use]
    pub fn with_output(mut self, output: Value) -> Self {
        self.output = output;
        self
    }

    /// Sets the metadata updates.
    #[must_use]
    pub fn with_metadata(mut self, metadata: Map<String, Value>) -> Self {
        self.metadata = metadata;
        self
    }
}

/// The async outcome: wait for a resume, optionally with a durable timer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AsyncWait {
    /// A timer that resumes the step with its event unless resumed first.
    pub timer: Option<TimerSpec>,
}

/// A durable timer request.
#[derive(Debug, Clone, PartialEq)]
pub struct TimerSpec {
    /// Delay from the moment the async outcome is applied.
    pub after: Duration,
    /// The event the step is resumed with when the timer fires.
    pub event: EventName,
}

/// How a step failure is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ErrorKind {
    /// Retry per the retry policy; `after` overrides the computed backoff.
    Retryable {
        /// Explicit delay before the next attempt, in milliseconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after_ms: Option<u64>,
    },
    /// Do not retry: the step, and so the instance, fails now.
    Fatal,
}

/// A classified step failure; its persisted form is this small struct.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepError {
    /// Retryable or fatal.
    #[serde(flatten)]
    pub kind: ErrorKind,
    /// A human-readable reason.
    pub message: String,
    /// Optional structured details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
    /// What failed when it was not the step's own error (a panic, a lost
    /// worker, a value that cannot be stored): the failure reason an
    /// instance failing on this error records. `None` for errors a step
    /// returns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<crate::instance::FailureReason>,
}

impl StepError {
    /// A retryable error with the policy's backoff.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Retryable { after_ms: None },
            message: message.into(),
            details: None,
            cause: None,
        }
    }

    /// A retryable error with an explicit delay before the next attempt.
    pub fn retry_after(message: impl Into<String>, after: Duration) -> Self {
        Self {
            kind: ErrorKind::Retryable {
                after_ms: Some(u64::try_from(after.as_millis()).unwrap_or(u64::MAX)),
            },
            message: message.into(),
            details: None,
            cause: None,
        }
    }

    /// A fatal error.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Fatal,
            message: message.into(),
            details: None,
            cause: None,
        }
    }

    /// Names what failed (see [`StepError::cause`]).
    #[must_use]
    pub fn with_cause(mut self, cause: crate::instance::FailureReason) -> Self {
        self.cause = Some(cause);
        self
    }

    /// Attaches structured details.
    #[must_use]
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// Whether another attempt may be made.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Retryable { .. })
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A cloneable flag a runner raises when the instance is cancelled, so a
/// running step can stop early. It can be polled or awaited.
#[derive(Clone, Default)]
pub struct CancellationSignal {
    inner: Arc<CancelInner>,
}

#[derive(Default)]
struct CancelInner {
    cancelled: AtomicBool,
    wakers: Mutex<Vec<Waker>>,
}

impl fmt::Debug for CancellationSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancellationSignal")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl CancellationSignal {
    /// A signal that is not raised.
    pub fn new() -> Self {
        Self::default()
    }

    /// Raises the signal and wakes every waiter. Idempotent.
    pub fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::SeqCst);
        let wakers = std::mem::take(&mut *lock_ignoring_poison(&self.inner.wakers));
        for waker in wakers {
            waker.wake();
        }
    }

    /// Whether the signal was raised.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    /// Whether `other` is a clone of this signal.
    pub fn same_as(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// A future that resolves once the signal is raised.
    pub fn cancelled(&self) -> Cancelled<'_> {
        Cancelled { signal: self }
    }
}

/// Future returned by [`CancellationSignal::cancelled`].
#[derive(Debug)]
pub struct Cancelled<'a> {
    signal: &'a CancellationSignal,
}

impl Future for Cancelled<'_> {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        if self.signal.is_cancelled() {
            return Poll::Ready(());
        }
        let mut wakers = lock_ignoring_poison(&self.signal.inner.wakers);
        // Re-check under the lock: cancel() takes the lock after setting the flag.
        if self.signal.is_cancelled() {
            return Poll::Ready(());
        }
        if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// The message of a caught panic (`panic!("...")` payloads are a `&str` or a
/// `String`); the one such helper of the workspace (the runner, queue-pg
/// and the conformance suites use it).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_owned())
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it: for
/// data that is always left consistent between statements (the one such
/// helper of the workspace: the clocks, the in-memory backend, the runner
/// and queue-pg use it).
pub fn lock_ignoring_poison<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::block_on;

    #[test]
    fn panic_messages_are_read_from_str_and_string_payloads() {
        let payload = std::panic::catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(panic_message(payload.as_ref()), "plain");
        let payload = std::panic::catch_unwind(|| panic!("formatted {}", 7)).unwrap_err();
        assert_eq!(panic_message(payload.as_ref()), "formatted 7");
        let payload = std::panic::catch_unwind(|| std::panic::panic_any(7_u8)).unwrap_err();
        assert_eq!(
            panic_message(payload.as_ref()),
            "a non-string panic payload"
        );
    }

    #[test]
    fn outcome_constructors() {
        assert_eq!(
            StepOutcome::complete("done"),
            StepOutcome::Complete(Completion::new("done"))
        );
        let StepOutcome::Async(wait) =
            StepOutcome::wait_with_timer(Duration::from_secs(3), "timeout")
        else {
            panic!("expected async");
        };
        assert_eq!(wait.timer.unwrap().after, Duration::from_secs(3));
        assert!(StepError::retryable("x").is_retryable());
        assert!(!StepError::fatal("x").is_retryable());
    }

    #[test]
    fn step_error_persisted_form_round_trips() {
        let err = StepError::retry_after("busy", Duration::from_millis(1500))
            .with_details(serde_json::json!({"code": 503}));
        let json = serde_json::to_value(&err).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"kind": "retryable", "after_ms": 1500, "message": "busy", "details": {"code": 503}})
        );
        assert_eq!(serde_json::from_value::<StepError>(json).unwrap(), err);
    }

    #[test]
    fn cancellation_wakes_registered_waiters() {
        use std::sync::atomic::AtomicUsize;
        use std::task::Wake;

        struct CountingWaker(AtomicUsize);
        impl Wake for CountingWaker {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }

        let signal = CancellationSignal::new();
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = TaskContext::from_waker(&waker);
        let mut fut = std::pin::pin!(signal.cancelled());
        assert_eq!(fut.as_mut().poll(&mut cx), Poll::Pending);
        assert_eq!(
            fut.as_mut().poll(&mut cx),
            Poll::Pending,
            "polling twice registers once"
        );
        assert_eq!(counter.0.load(Ordering::SeqCst), 0);
        signal.clone().cancel();
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        assert_eq!(fut.as_mut().poll(&mut cx), Poll::Ready(()));
        assert!(signal.is_cancelled());
        // Already cancelled: resolves at once.
        block_on(signal.cancelled());
    }
}
