//! Waiting in tests: every wait names what it waits for and checks that
//! thing, never how much time went by.
//!
//! - [`for_event`]: the first event on a subscription that matches (a job
//!   event of queue-pg, a telemetry event of the runner).
//! - [`for_signal`]: a signal that a test's own step gives.
//! - [`until_notified`]: a condition re-checked each time a component
//!   announces that it did something (subscribe first, then wait), for
//!   state that an event tells about but does not carry.
//! - [`until`] (and [`until_some`], [`until_within`], [`holds_within`]):
//!   a condition re-checked on a short pace, for state that nothing
//!   announces to the test (a row another process wrote, an HTTP endpoint
//!   of a child process, a leadership flag, a metrics snapshot).
//!
//! Each fails after [`SAFETY_NET`] (or its own bound) with a message naming
//! what it waited for: a bound on a hang, not the pace of a test. This is
//! the one place a test pauses (`RECHECK`); the tidy test
//! `tests_wait_for_what_they_name` keeps it so.

use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

/// The longest any test waits for something that should happen at once.
pub const SAFETY_NET: Duration = Duration::from_secs(20);

/// How often [`until`] re-checks a condition that nothing announces.
const RECHECK: Duration = Duration::from_millis(10);

/// Waits until `check` holds; fails naming `what` after [`SAFETY_NET`].
pub async fn until<F, Fut>(what: impl Display, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    until_within(SAFETY_NET, what, check).await;
}

/// [`until`] for a condition that needs no I/O to check.
pub async fn until_holds(what: impl Display, mut check: impl FnMut() -> bool) {
    until(what, || std::future::ready(check())).await;
}

/// [`until`] with its own bound (a browser or a child process may need
/// longer than [`SAFETY_NET`]).
pub async fn until_within<F, Fut>(within: Duration, what: impl Display, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    assert!(
        holds_within(within, check).await,
        "waited {within:?} for {what}: it did not happen"
    );
}

/// Waits until `check` returns a value, and returns it; fails naming
/// `what` after [`SAFETY_NET`].
pub async fn until_some<T, F, Fut>(what: impl Display, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    until_some_within(SAFETY_NET, what, check).await
}

async fn until_some_within<T, F, Fut>(within: Duration, what: impl Display, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    found_within(within, check)
        .await
        .unwrap_or_else(|| panic!("waited {within:?} for {what}: it did not happen"))
}

/// [`until_within`] that returns whether `check` came to hold instead of
/// failing, for a caller that describes the failure itself.
pub async fn holds_within<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    found_within(within, || {
        let holds = check();
        async move { holds.await.then_some(()) }
    })
    .await
    .is_some()
}

/// The one loop that re-checks a condition nothing announces.
async fn found_within<T, F, Fut>(within: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = check().await {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        // not a wait: the pace of looking again; the condition decides
        tokio::time::sleep(RECHECK).await;
    }
}

/// The first event on `events` that `matches`, skipping others; fails
/// naming `what` after [`SAFETY_NET`], or when the subscriber lagged (an
/// event it needed may be lost).
pub async fn for_event<T: Clone>(
    events: &mut broadcast::Receiver<T>,
    what: impl Display,
    mut matches: impl FnMut(&T) -> bool,
) -> T {
    let deadline = Instant::now() + SAFETY_NET;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(event)) if matches(&event) => return event,
            Ok(Ok(_)) => {}
            Ok(Err(RecvError::Lagged(n))) => {
                panic!("waiting for {what}: the subscriber lagged by {n} events")
            }
            Ok(Err(RecvError::Closed)) => {
                panic!("waiting for {what}: the subscription closed")
            }
            Err(tokio::time::error::Elapsed { .. }) => {
                panic!("waiting for {what}: no such event within {SAFETY_NET:?}")
            }
        }
    }
}

/// Waits for `signal` (its permit, if it was given before the wait);
/// fails naming `what` after [`SAFETY_NET`].
pub async fn for_signal(signal: &tokio::sync::Notify, what: impl Display) {
    if tokio::time::timeout(SAFETY_NET, signal.notified())
        .await
        .is_err()
    {
        panic!("waiting for {what}: no signal within {SAFETY_NET:?}");
    }
}

/// Waits until `check` holds, re-checking it each time an event arrives
/// on any of `events` (subscribed before the state could change, so no
/// change goes unannounced); fails naming `what` after [`SAFETY_NET`]. A
/// subscriber that lagged re-checks too: the state is the truth, the
/// events only say when to look.
pub async fn until_notified<T, F, Fut>(
    events: &mut [broadcast::Receiver<T>],
    what: impl Display,
    mut check: F,
) where
    T: Clone,
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    assert!(!events.is_empty(), "waiting for {what}: no subscription");
    let deadline = Instant::now() + SAFETY_NET;
    while !check().await {
        match tokio::time::timeout_at(deadline, next_of(events)).await {
            Ok(Ok(()) | Err(RecvError::Lagged(_))) => {}
            Ok(Err(RecvError::Closed)) => {
                panic!("waiting for {what}: a subscription closed")
            }
            Err(tokio::time::error::Elapsed { .. }) => {
                panic!("waiting for {what}: not announced within {SAFETY_NET:?}")
            }
        }
    }
}

/// The next event on any of `events` (its content dropped).
async fn next_of<T: Clone>(events: &mut [broadcast::Receiver<T>]) -> Result<(), RecvError> {
    // `recv` is cancel safe: the futures of the receivers that lose the
    // race are dropped without losing an event.
    let mut pending: Vec<Pin<Box<_>>> = events.iter_mut().map(|rx| Box::pin(rx.recv())).collect();
    std::future::poll_fn(|cx| {
        for recv in &mut pending {
            if let Poll::Ready(got) = recv.as_mut().poll(cx) {
                return Poll::Ready(got.map(drop));
            }
        }
        Poll::Pending
    })
    .await
}
