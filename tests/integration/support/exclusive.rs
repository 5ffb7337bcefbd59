//! A process-wide gate for tests that disturb the shared PostgreSQL server
//! (the fault-injection test restarts it).
//!
//! Every test database and schema holds a [`Shared`] guard for its life
//! (taken in `TestSchema::new` and `TestDatabase::new`); a disruptive test
//! takes the [`Exclusive`] guard, which waits until no test holds a shared
//! one. While it waits, new shared takers wait too (so it is not starved
//! while the other tests keep the server busy), except on a thread that
//! already holds a shared guard: a test creating its second schema must not
//! deadlock against the waiting exclusive taker. (A test body runs on its
//! own thread, also under the multi-thread flavor.) As a last resort a
//! shared taker stops deferring to a waiting exclusive one after
//! [`PATIENCE`]; it never enters while an exclusive guard is held.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, MutexGuard, PoisonError};
use std::thread::ThreadId;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// How long a shared taker defers to a waiting exclusive taker.
pub const PATIENCE: Duration = Duration::from_secs(120);

#[derive(Debug, Default)]
struct State {
    /// Shared guards held, per thread that took them.
    shared: HashMap<ThreadId, usize>,
    /// Exclusive takers waiting.
    waiting: usize,
    /// An exclusive guard is held.
    exclusive: bool,
}

impl State {
    fn shared_total(&self) -> usize {
        self.shared.values().sum()
    }
}

static STATE: LazyLock<Mutex<State>> = LazyLock::new(Mutex::default);
static CHANGED: LazyLock<Notify> = LazyLock::new(Notify::new);

fn state() -> MutexGuard<'static, State> {
    // Every update is a single statement under the lock: never torn.
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Held by an ordinary database test.
#[derive(Debug)]
pub struct Shared {
    thread: ThreadId,
}

/// Held by a test that disturbs the server for everyone.
#[derive(Debug)]
pub struct Exclusive(());

/// Waits while a disruptive test runs (or waits to run), then holds a shared
/// guard.
pub async fn shared() -> Shared {
    let thread = std::thread::current().id();
    let patience = Instant::now() + PATIENCE;
    loop {
        let changed = CHANGED.notified();
        tokio::pin!(changed);
        // Registered before the check, so a release in between is not missed.
        changed.as_mut().enable();
        {
            let mut state = state();
            let reentrant = state.shared.get(&thread).is_some_and(|n| *n > 0);
            let deferring = state.waiting > 0 && !reentrant && Instant::now() < patience;
            if !state.exclusive && !deferring {
                *state.shared.entry(thread).or_default() += 1;
                return Shared { thread };
            }
        }
        // Wakes on any change, and at the end of the patience.
        let _ = tokio::time::timeout_at(patience.max(Instant::now()), changed).await;
        if Instant::now() >= patience {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Counts an exclusive taker as waiting until it is dropped.
struct Waiting;

impl Drop for Waiting {
    fn drop(&mut self) {
        state().waiting -= 1;
        CHANGED.notify_waiters();
    }
}

/// Waits until no other test uses the server, then holds it alone.
pub async fn exclusive() -> Exclusive {
    state().waiting += 1;
    let _waiting = Waiting;
    loop {
        let changed = CHANGED.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        {
            let mut state = state();
            if !state.exclusive && state.shared_total() == 0 {
                state.exclusive = true;
                return Exclusive(());
            }
        }
        changed.await;
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        {
            let mut state = state();
            if let Some(n) = state.shared.get_mut(&self.thread) {
                *n -= 1;
                if *n == 0 {
                    state.shared.remove(&self.thread);
                }
            }
        }
        CHANGED.notify_waiters();
    }
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        state().exclusive = false;
        CHANGED.notify_waiters();
    }
}
