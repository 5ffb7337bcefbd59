//! The runtime handle: the state one runtime's components share (backend,
//! registry, configuration, clock, batchers, telemetry, the signals of the
//! steps running here), and the small accessors they all use. The public
//! operations live in their own modules (`runtime` is the facade).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use hephaestus_engine_core::Workflow;
use hephaestus_engine_core::clock::SharedClock;
use hephaestus_engine_core::instance::Instance;
use hephaestus_engine_core::step::{CancellationSignal, lock_ignoring_poison};
use hephaestus_engine_core::workflow::WorkflowRegistry;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::backend::{Backend, ExecutionRequest};
use crate::batcher::Batcher;
use crate::config::RunnerConfig;
use crate::discard::{AfterCommit, DiscardedJob};
use crate::error::RunnerError;
use crate::outcome::{Preflight, Settle, Settled};

/// Decides, and writes, what a job discarded for good means for its step
/// and instance: the failure handler (see [`crate::discard`]). Attach one with
/// [`RuntimeBuilder::discard_handler`](crate::RuntimeBuilder::discard_handler);
/// a runtime without one refuses to run workers
/// ([`RunnerError::NoDiscardHandler`]).
#[async_trait::async_trait]
pub trait DiscardHandler<B: Backend>: Send + Sync + fmt::Debug + 'static {
    /// Writes, in `tx` (which already holds the discard of `job`), what the
    /// discard means. Returns what to do once `tx` has committed (the
    /// telemetry of what it wrote); nothing of it happens if `tx` rolls
    /// back. An error rolls the discard back: the job is retried after its
    /// backoff, and the handler is asked again then.
    async fn discarded(
        &self,
        runtime: &Runtime<B>,
        tx: &mut B::Tx,
        job: DiscardedJob<'_>,
    ) -> Result<AfterCommit, RunnerError>;
}

/// What the clones of one [`Runtime`] share.
pub(crate) struct Inner<B> {
    pub(crate) backend: B,
    pub(crate) registry: WorkflowRegistry,
    pub(crate) config: RunnerConfig,
    pub(crate) clock: SharedClock,
    /// Cancellation signals of step executions running in this process.
    pub(crate) running: Mutex<HashMap<Uuid, Vec<CancellationSignal>>>,
    pub(crate) wake: tokio::sync::Notify,
    pub(crate) telemetry: crate::telemetry::Telemetry,
    pub(crate) batches: Batches,
    /// What a discarded job means for its step and instance (workers need
    /// one).
    pub(crate) discards: Option<Arc<dyn DiscardHandler<B>>>,
}

/// A runtime: registered workflows over a backend. Cheap to clone; build one
/// explicitly per backend (no global state).
pub struct Runtime<B> {
    pub(crate) inner: Arc<Inner<B>>,
}

impl<B> Clone for Runtime<B> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<B> fmt::Debug for Runtime<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("registry", &self.inner.registry)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// The runtime's batchers.
#[derive(Debug)]
pub(crate) struct Batches {
    pub(crate) settle: Batcher<Settle, Answer>,
    pub(crate) preflight: Batcher<ExecutionRequest, Result<Preflight, RunnerError>>,
    /// Slots for continuations beyond the first of a settled job (fan-out
    /// branches run at once by the worker that activated them).
    pub(crate) extra_slots: Arc<Semaphore>,
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

/// What a settle request is answered with.
pub(crate) type Answer = Result<Settled, RunnerError>;

/// A random `u32` (business-id salts).
pub(crate) fn random_u32() -> u32 {
    let bytes = Uuid::new_v4().into_bytes();
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

impl<B: Backend> Runtime<B> {
    /// The backend.
    pub fn backend(&self) -> &B {
        &self.inner.backend
    }

    /// The registered workflows.
    pub fn registry(&self) -> &WorkflowRegistry {
        &self.inner.registry
    }

    /// The configuration.
    pub fn config(&self) -> &RunnerConfig {
        &self.inner.config
    }

    pub(crate) fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.inner.clock.now()
    }

    /// The registered definition of `instance`'s workflow version.
    pub fn workflow_of(&self, instance: &Instance) -> Result<&Workflow, RunnerError> {
        Ok(self
            .inner
            .registry
            .get(instance.workflow_id.as_str(), instance.workflow_version)?)
    }

    /// Takes the single-writer lock of instance `id` in `tx` and loads it;
    /// [`RunnerError::NotFound`] when it does not exist.
    pub(crate) async fn lock_existing(
        &self,
        tx: &mut B::Tx,
        id: Uuid,
    ) -> Result<Instance, RunnerError> {
        self.inner
            .backend
            .lock(tx, id)
            .await?
            .ok_or_else(|| RunnerError::NotFound(id.to_string()))
    }

    fn running(&self) -> MutexGuard<'_, HashMap<Uuid, Vec<CancellationSignal>>> {
        lock_ignoring_poison(&self.inner.running)
    }

    pub(crate) fn register_running(&self, id: Uuid, signal: &CancellationSignal) {
        self.running().entry(id).or_default().push(signal.clone());
    }

    pub(crate) fn unregister_running(&self, id: Uuid, signal: &CancellationSignal) {
        let mut running = self.running();
        if let Some(list) = running.get_mut(&id) {
            list.retain(|s| !s.same_as(signal));
            if list.is_empty() {
                running.remove(&id);
            }
        }
    }

    pub(crate) fn signal_cancelled(&self, id: Uuid) {
        if let Some(list) = self.running().remove(&id) {
            for s in list {
                s.cancel();
            }
        }
    }
}
