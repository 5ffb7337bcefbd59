//! Group commit, generic: callers queue items, and one caller holding a
//! flush permit takes what is queued and flushes it for everyone. Knows
//! nothing of jobs or instances (items are keyed by a UUID at most).

use std::collections::HashSet;
use std::future::Future;
use std::sync::Mutex;

use hephaestus_engine_core::step::lock_ignoring_poison;

use tokio::sync::{Semaphore, oneshot};
use uuid::Uuid;

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
    pub(crate) fn new(flushers: usize, max: usize) -> Self {
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
        lock_ignoring_poison(&self.state)
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
}
