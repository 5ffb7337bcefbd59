//! One lifecycle for every background service: `start` returns once the
//! service runs, `stop` signals it and waits for it, and is idempotent.

use std::future::Future;
use std::sync::Mutex;

use hephaestus_engine_core::step::CancellationSignal;

use super::lock_ignoring_poison;
use tokio::task::JoinHandle;

/// A spawned service loop and its stop signal.
#[derive(Debug)]
pub(crate) struct Service {
    name: &'static str,
    stop: CancellationSignal,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Service {
    /// Spawns `body` with the stop signal it must watch.
    pub(crate) fn spawn<F, Fut>(name: &'static str, body: F) -> Self
    where
        F: FnOnce(CancellationSignal) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = CancellationSignal::new();
        let task = tokio::spawn(body(stop.clone()));
        Self {
            name,
            stop,
            task: Mutex::new(Some(task)),
        }
    }

    /// Asks the service to stop without waiting.
    pub(crate) fn signal_stop(&self) {
        self.stop.cancel();
    }

    /// Stops the service and waits until its loop has returned. Idempotent.
    pub(crate) async fn stop(&self) {
        self.stop.cancel();
        let task = lock_ignoring_poison(&self.task).take();
        if let Some(task) = task
            && let Err(error) = task.await
            && error.is_panic()
        {
            tracing::error!(target: "hephaestus_queue", service = self.name, "service panicked");
        }
    }
}

/// Waits for `delay` unless `stop` is raised first; returns whether it was.
pub(crate) async fn sleep_or_stop(stop: &CancellationSignal, delay: std::time::Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(delay) => stop.is_cancelled(),
    }
}
