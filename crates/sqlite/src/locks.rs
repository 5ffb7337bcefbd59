//! The locks of one backend handle: the database's single write lock, and
//! each instance's single-writer lock.
//!
//! SQLite lets one connection write at a time. Units of work of this process
//! queue for that right here, first come first served, instead of spinning
//! in SQLite's busy handler; only the holder then runs `begin immediate`
//! (which waits, under the busy timeout, for a writer in another process).
//!
//! An instance lock is held by a unit of work from [`InstanceStore::lock`]
//! until it ends, whether or not it writes. A unit of work that waits would
//! close a cycle (it holds the write lock and waits for an instance whose
//! holder waits for the write lock, or two instances taken in opposite
//! orders) fails at once with [`PortError::Conflict`], as a database reports
//! a deadlock.
//!
//! [`InstanceStore::lock`]: hephaestus_engine_core::ports::InstanceStore::lock

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use hephaestus_engine_core::ports::PortError;
use hephaestus_engine_core::step::lock_ignoring_poison;
use uuid::Uuid;

/// A lockable resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Resource {
    /// The database's write lock.
    Writer,
    /// An instance's single-writer lock.
    Instance(Uuid),
}

/// Who holds a resource and who waits for it, in arrival order.
struct Held {
    owner: u64,
    waiters: VecDeque<(u64, Waker)>,
}

#[derive(Default)]
struct State {
    held: HashMap<Resource, Held>,
    /// What each waiting owner waits for.
    waiting_for: HashMap<u64, Resource>,
    /// What each owner holds.
    holds: HashMap<u64, Vec<Resource>>,
}

impl State {
    fn grant(&mut self, owner: u64, resource: Resource) {
        self.held.insert(
            resource,
            Held {
                owner,
                waiters: VecDeque::new(),
            },
        );
        self.holds.entry(owner).or_default().push(resource);
    }

    /// Whether `owner` waiting for `resource` would wait for itself.
    fn closes_cycle(&self, owner: u64, resource: Resource) -> bool {
        let mut next = resource;
        // Each owner waits for one resource at most: the chain is a path.
        for _ in 0..=self.waiting_for.len() {
            let Some(held) = self.held.get(&next) else {
                return false;
            };
            if held.owner == owner {
                return true;
            }
            match self.waiting_for.get(&held.owner) {
                Some(resource) => next = *resource,
                None => return false,
            }
        }
        false
    }

    /// Releases `resource` held by `owner`, handing it to its first waiter.
    fn release(&mut self, owner: u64, resource: Resource) -> Option<Waker> {
        let held = self.held.get_mut(&resource)?;
        if held.owner != owner {
            return None;
        }
        if let Some((next, waker)) = held.waiters.pop_front() {
            held.owner = next;
            self.waiting_for.remove(&next);
            self.holds.entry(next).or_default().push(resource);
            Some(waker)
        } else {
            self.held.remove(&resource);
            None
        }
    }

    /// Stops `owner` waiting (its future was dropped).
    fn stop_waiting(&mut self, owner: u64) {
        if let Some(resource) = self.waiting_for.remove(&owner)
            && let Some(held) = self.held.get_mut(&resource)
        {
            held.waiters.retain(|(waiter, _)| *waiter != owner);
        }
    }
}

/// The lock table of a backend handle (shared by its clones).
#[derive(Default)]
pub(crate) struct Locks {
    state: Mutex<State>,
    next_owner: AtomicU64,
}

impl Locks {
    fn state(&self) -> MutexGuard<'_, State> {
        lock_ignoring_poison(&self.state)
    }

    /// A new owner id (a unit of work, or one statement's write).
    pub(crate) fn owner(&self) -> u64 {
        self.next_owner.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Waits until `owner` holds `resource` (at once if it already does).
    /// A wait that would close a cycle is [`PortError::Conflict`].
    pub(crate) fn acquire(self: &Arc<Self>, owner: u64, resource: Resource) -> Acquire {
        Acquire {
            locks: Arc::clone(self),
            owner,
            resource,
            waiting: false,
        }
    }

    /// Takes `resource` for `owner` if it is free (or already `owner`'s),
    /// without waiting: whether `owner` holds it now.
    pub(crate) fn try_acquire(&self, owner: u64, resource: Resource) -> bool {
        let mut state = self.state();
        match state.held.get(&resource) {
            None => {
                state.grant(owner, resource);
                true
            }
            Some(held) => held.owner == owner,
        }
    }

    /// Releases one resource `owner` holds.
    pub(crate) fn release(&self, owner: u64, resource: Resource) {
        let waker = {
            let mut state = self.state();
            if let Some(held) = state.holds.get_mut(&owner) {
                held.retain(|r| *r != resource);
            }
            state.release(owner, resource)
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Releases everything `owner` holds, and its wait if any.
    pub(crate) fn release_all(&self, owner: u64) {
        let wakers: Vec<Waker> = {
            let mut state = self.state();
            state.stop_waiting(owner);
            let held = state.holds.remove(&owner).unwrap_or_default();
            held.into_iter()
                .filter_map(|resource| state.release(owner, resource))
                .collect()
        };
        for waker in wakers {
            waker.wake();
        }
    }
}

/// The future of [`Locks::acquire`].
pub(crate) struct Acquire {
    locks: Arc<Locks>,
    owner: u64,
    resource: Resource,
    waiting: bool,
}

impl Future for Acquire {
    type Output = Result<(), PortError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let owner = self.owner;
        let resource = self.resource;
        let mut state = self.locks.state();
        let Some(held) = state.held.get_mut(&resource) else {
            state.grant(owner, resource);
            drop(state);
            self.waiting = false;
            return Poll::Ready(Ok(()));
        };
        if held.owner == owner {
            drop(state);
            self.waiting = false;
            return Poll::Ready(Ok(()));
        }
        if let Some(entry) = held.waiters.iter_mut().find(|(w, _)| *w == owner) {
            entry.1.clone_from(cx.waker());
            return Poll::Pending;
        }
        if state.closes_cycle(owner, resource) {
            return Poll::Ready(Err(PortError::Conflict(format!(
                "deadlock: waiting for {} would wait for this unit of work itself",
                match resource {
                    Resource::Writer => "the database's write lock".to_owned(),
                    Resource::Instance(id) => format!("the lock of instance {id}"),
                }
            ))));
        }
        if let Some(held) = state.held.get_mut(&resource) {
            held.waiters.push_back((owner, cx.waker().clone()));
        }
        state.waiting_for.insert(owner, resource);
        drop(state);
        self.waiting = true;
        Poll::Pending
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        if self.waiting {
            // A wait given up (a timeout): leave the queue. A lock handed
            // over meanwhile stays with the owner, who releases all it holds.
            self.locks.state().stop_waiting(self.owner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll_once(fut: &mut Acquire) -> Poll<Result<(), PortError>> {
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        Pin::new(fut).poll(&mut cx)
    }

    #[test]
    fn waiters_get_the_lock_in_order_and_cycles_are_refused() {
        let locks = Arc::new(Locks::default());
        let (a, b) = (locks.owner(), locks.owner());
        let x = Resource::Instance(Uuid::from_u128(1));
        assert!(matches!(
            poll_once(&mut locks.acquire(a, Resource::Writer)),
            Poll::Ready(Ok(()))
        ));
        assert!(matches!(
            poll_once(&mut locks.acquire(b, x)),
            Poll::Ready(Ok(()))
        ));
        // a (holding the writer) waits for x, held by b ...
        let mut a_waits = locks.acquire(a, x);
        assert!(poll_once(&mut a_waits).is_pending());
        // ... so b waiting for the writer would be a deadlock.
        assert!(matches!(
            poll_once(&mut locks.acquire(b, Resource::Writer)),
            Poll::Ready(Err(PortError::Conflict(_)))
        ));
        // b ends: x goes to a.
        locks.release_all(b);
        assert!(matches!(poll_once(&mut a_waits), Poll::Ready(Ok(()))));
        locks.release_all(a);
        assert!(locks.state().held.is_empty());
        assert!(locks.state().waiting_for.is_empty());
    }

    #[test]
    fn try_acquire_never_waits() {
        let locks = Arc::new(Locks::default());
        let (a, b) = (locks.owner(), locks.owner());
        let x = Resource::Instance(Uuid::from_u128(1));
        assert!(locks.try_acquire(a, x));
        assert!(locks.try_acquire(a, x), "already held by the same owner");
        assert!(!locks.try_acquire(b, x), "held by another owner");
        assert!(
            locks.state().waiting_for.is_empty(),
            "a refused try does not wait"
        );
        locks.release_all(a);
        assert!(locks.try_acquire(b, x));
        locks.release_all(b);
        assert!(locks.state().held.is_empty());
    }

    #[test]
    fn a_dropped_wait_leaves_the_queue() {
        let locks = Arc::new(Locks::default());
        let (a, b, c) = (locks.owner(), locks.owner(), locks.owner());
        assert!(poll_once(&mut locks.acquire(a, Resource::Writer)).is_ready());
        let mut b_waits = locks.acquire(b, Resource::Writer);
        assert!(poll_once(&mut b_waits).is_pending());
        drop(b_waits);
        let mut c_waits = locks.acquire(c, Resource::Writer);
        assert!(poll_once(&mut c_waits).is_pending());
        locks.release_all(a);
        assert!(matches!(poll_once(&mut c_waits), Poll::Ready(Ok(()))));
        locks.release_all(c);
        assert!(locks.state().held.is_empty());
    }
}
