//! A step built from a closure: handy for tests, examples and glue.

use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use crate::ids::{Event, StepId};
use crate::step::{Step, StepInput, StepOutcome};

type StepFn = Arc<dyn Fn(&StepInput<'_>) -> StepOutcome + Send + Sync>;

/// A step whose behaviour is a synchronous closure. Cheap to clone; clones
/// share the closure. Two `FnStep`s given to one builder under the same id
/// are the same step (the first one given is kept).
#[derive(Clone)]
pub struct FnStep {
    id: StepId,
    key: Option<String>,
    events: Vec<Event>,
    retry: Option<crate::retry::RetryPolicy>,
    run: StepFn,
}

impl fmt::Debug for FnStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnStep")
            .field("id", &self.id)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl FnStep {
    /// A step with id `id` declaring `events`.
    ///
    /// # Panics
    /// When `id` or an event is not a valid identifier: a closure step is
    /// written in code, so a bad literal is a programming error.
    pub fn new<I, E, F>(id: &str, events: I, run: F) -> Self
    where
        I: IntoIterator<Item = E>,
        E: AsRef<str>,
        F: Fn(&StepInput<'_>) -> StepOutcome + Send + Sync + 'static,
    {
        Self {
            id: StepId::new(id).unwrap_or_else(|e| panic!("FnStep::new: {e}")),
            key: None,
            events: events
                .into_iter()
                .map(|e| Event::new(e.as_ref()).unwrap_or_else(|err| panic!("FnStep::new: {err}")))
                .collect(),
            retry: None,
            run: Arc::new(run),
        }
    }

    /// Overrides the context key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the step's own retry policy.
    #[must_use]
    pub fn with_retry_policy(mut self, policy: crate::retry::RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }
}

#[async_trait::async_trait]
impl Step for FnStep {
    fn id(&self) -> StepId {
        self.id.clone()
    }

    fn events(&self, _config: Option<&Value>) -> Vec<Event> {
        self.events.clone()
    }

    fn step_key(&self) -> String {
        self.key
            .clone()
            .unwrap_or_else(|| self.id.default_step_key())
    }

    fn retry_policy(&self) -> Option<crate::retry::RetryPolicy> {
        self.retry
    }

    async fn execute(&self, input: StepInput<'_>) -> StepOutcome {
        (self.run)(&input)
    }
}
