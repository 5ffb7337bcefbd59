//! Workflow definitions: a validated DAG of steps with static and dynamic
//! transitions, built with [`Workflow::builder`].
//!
//! ```
//! use hephaestus_engine_core::prelude::*;
//! use hephaestus_engine_core::steps::{Done, FnStep};
//! use serde_json::json;
//!
//! let check = FnStep::new("check", ["ok", "ko"], |_| StepOutcome::complete("ok"));
//! let ship = FnStep::new("ship", ["done"], |_| StepOutcome::complete("done"));
//! let refund = FnStep::new("refund", ["done"], |_| StepOutcome::complete("done"));
//! let workflow = Workflow::builder("orders")
//!     .unique("order", Scope::Workflow)
//!     .start(check.clone())
//!     .on(check.clone(), "ok", ship.clone())
//!     .on(check, "ko", refund.clone())
//!     .on(ship, "done", Done)
//!     .on(refund, "done", Done)
//!     .build()
//!     .unwrap();
//! assert_eq!(workflow.version(), 1);
//! ```

mod error;
mod family;
mod validate;

use std::any::TypeId;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};

pub use error::{WorkflowError, WorkflowErrors};
pub use family::{FamilyBuilder, RegistryError, StartSelection, WorkflowFamily, WorkflowRegistry};

use crate::business_id::{Scope, Unique};
use crate::context::Context;
use crate::ids::{Event, StepId, WorkflowId};
use crate::retry::RetryPolicy;
use crate::step::Step;

/// A step and the config it is activated with.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The step.
    pub step: StepId,
    /// Its config, if any.
    pub config: Option<Value>,
}

impl Target {
    /// A target without config.
    pub fn new(step: StepId) -> Self {
        Self { step, config: None }
    }

    /// A target with a config.
    pub fn with_config(step: StepId, config: Value) -> Self {
        Self {
            step,
            config: Some(config),
        }
    }
}

/// A target picked by a dynamic route at run time. The engine checks it
/// against the route's declared targets (an undeclared pick fails the
/// instance).
#[derive(Debug, Clone, PartialEq)]
pub struct Pick {
    /// The step id.
    pub step: String,
    /// A config for the activation.
    pub config: Option<Value>,
}

impl Pick {
    /// Picks `step` without config.
    pub fn step(step: impl Into<String>) -> Self {
        Self {
            step: step.into(),
            config: None,
        }
    }

    /// Attaches a config.
    #[must_use]
    pub fn config(mut self, config: Value) -> Self {
        self.config = Some(config);
        self
    }
}

impl From<&str> for Pick {
    fn from(step: &str) -> Self {
        Self::step(step)
    }
}

impl From<&StepId> for Pick {
    fn from(step: &StepId) -> Self {
        Self::step(step.as_str())
    }
}

/// The routing function of a dynamic transition: reads the context (with the
/// completing step's output already stored) and picks targets among the
/// declared ones.
pub type RouteFn = Arc<dyn Fn(&Context) -> Vec<Pick> + Send + Sync>;

/// Where a transition goes.
#[derive(Clone)]
pub enum Route {
    /// Fixed targets (one, or a fan-out list).
    Static(Vec<Target>),
    /// Targets chosen at run time among a declared set.
    Dynamic {
        /// The declared targets (the graph's edges), with literal configs.
        declared: Vec<Target>,
        /// The routing function.
        route: RouteFn,
    },
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Static(t) => f.debug_tuple("Static").field(t).finish(),
            Self::Dynamic { declared, .. } => f
                .debug_struct("Dynamic")
                .field("declared", declared)
                .finish_non_exhaustive(),
        }
    }
}

impl Route {
    /// The graph edges of this route: every target it may activate.
    pub fn edge_targets(&self) -> impl Iterator<Item = &Target> {
        match self {
            Self::Static(t) | Self::Dynamic { declared: t, .. } => t.iter(),
        }
    }

    /// Whether the route is dynamic.
    pub fn is_dynamic(&self) -> bool {
        matches!(self, Self::Dynamic { .. })
    }
}

/// A registered step with what the definition derived from it.
#[derive(Clone)]
pub struct StepDef {
    /// The implementation.
    pub step: Arc<dyn Step>,
    /// Its context key.
    pub key: String,
    /// The events it declares (with its literal config).
    pub events: Vec<Event>,
}

impl fmt::Debug for StepDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepDef")
            .field("id", &self.step.id())
            .field("key", &self.key)
            .field("events", &self.events)
            .finish()
    }
}

/// One graph edge: `from` on `event` may activate `to`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Edge {
    /// The source step.
    pub from: StepId,
    /// The event.
    pub event: Event,
    /// The target.
    pub to: StepId,
    /// Whether the edge belongs to a dynamic transition.
    pub dynamic: bool,
}

/// A validated, immutable workflow definition. Cheap to clone.
#[derive(Clone)]
pub struct Workflow {
    inner: Arc<Definition>,
}

pub(crate) struct Definition {
    pub(crate) id: WorkflowId,
    pub(crate) version: u32,
    pub(crate) unique: Unique,
    pub(crate) tags: Vec<String>,
    pub(crate) metadata: Map<String, Value>,
    pub(crate) retry_policy: Option<RetryPolicy>,
    pub(crate) start: Target,
    pub(crate) steps: BTreeMap<StepId, StepDef>,
    pub(crate) transitions: BTreeMap<(StepId, Event), Route>,
    pub(crate) incoming: BTreeMap<StepId, Vec<Edge>>,
    pub(crate) successors: BTreeMap<StepId, BTreeSet<StepId>>,
}

impl fmt::Debug for Workflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workflow")
            .field("id", &self.inner.id)
            .field("version", &self.inner.version)
            .field("steps", &self.inner.steps.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Workflow {
    /// Starts a definition for the workflow `id`.
    pub fn builder(id: impl Into<String>) -> WorkflowBuilder {
        WorkflowBuilder::new(id.into())
    }

    /// The workflow id (family name when versioned).
    pub fn id(&self) -> &WorkflowId {
        &self.inner.id
    }

    /// The version (1 unless set).
    pub fn version(&self) -> u32 {
        self.inner.version
    }

    /// The uniqueness rule.
    pub fn unique(&self) -> &Unique {
        &self.inner.unique
    }

    /// Tags (for job metadata and filtering).
    pub fn tags(&self) -> &[String] {
        &self.inner.tags
    }

    /// JSON metadata (for job metadata).
    pub fn metadata(&self) -> &Map<String, Value> {
        &self.inner.metadata
    }

    /// The workflow's default retry policy, if set.
    pub fn retry_policy(&self) -> Option<RetryPolicy> {
        self.inner.retry_policy
    }

    /// The resolved retry policy for `step`: step, then workflow, then default.
    pub fn retry_policy_for(&self, step: &str) -> RetryPolicy {
        let own = self
            .inner
            .steps
            .get(step)
            .and_then(|d| d.step.retry_policy());
        RetryPolicy::resolve(own, self.inner.retry_policy)
    }

    /// The start step and its config.
    pub fn start(&self) -> &Target {
        &self.inner.start
    }

    /// The registered steps.
    pub fn steps(&self) -> &BTreeMap<StepId, StepDef> {
        &self.inner.steps
    }

    /// A registered step.
    pub fn step(&self, id: &str) -> Option<&StepDef> {
        self.inner.steps.get(id)
    }

    /// The transition for `from` on `event`.
    pub fn transition(&self, from: &str, event: &str) -> Option<&Route> {
        // BTreeMap keys are (StepId, Event); look up by constructing ids.
        let from = StepId::new(from).ok()?;
        let event = Event::new(event).ok()?;
        self.inner.transitions.get(&(from, event))
    }

    /// Every transition.
    pub fn transitions(&self) -> impl Iterator<Item = (&StepId, &Event, &Route)> {
        self.inner.transitions.iter().map(|((s, e), r)| (s, e, r))
    }

    /// Every graph edge, sorted.
    pub fn edges(&self) -> Vec<Edge> {
        let mut edges: Vec<Edge> = self.inner.incoming.values().flatten().cloned().collect();
        edges.sort();
        edges
    }

    /// The incoming edges of `step`.
    pub fn incoming(&self, step: &str) -> &[Edge] {
        self.inner.incoming.get(step).map_or(&[], Vec::as_slice)
    }

    /// The static predecessors of `step` (sources of its incoming edges).
    pub fn predecessors(&self, step: &str) -> BTreeSet<StepId> {
        self.incoming(step).iter().map(|e| e.from.clone()).collect()
    }

    /// Every step an edge from `step` may activate.
    pub fn successors(&self, step: &str) -> impl Iterator<Item = &StepId> {
        self.inner.successors.get(step).into_iter().flatten()
    }

    /// Checks a requested version against this standalone workflow.
    pub fn resolve_version(&self, requested: Option<u32>) -> Result<u32, RegistryError> {
        match requested {
            None => Ok(self.inner.version),
            Some(v) if v == self.inner.version => Ok(v),
            Some(v) => Err(RegistryError::NotVersioned {
                workflow: self.inner.id.to_string(),
                version: self.inner.version,
                requested: v,
            }),
        }
    }
}

/// A reference to a step in the builder: a step value (registering it), or
/// the id of a step given elsewhere in the same builder.
#[derive(Clone)]
pub struct StepRef {
    kind: StepRefKind,
}

#[derive(Clone)]
enum StepRefKind {
    Value(Arc<dyn Step>, TypeId),
    Id(String),
}

impl fmt::Debug for StepRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            StepRefKind::Value(s, _) => write!(f, "StepRef({})", s.id()),
            StepRefKind::Id(id) => write!(f, "StepRef({id:?})"),
        }
    }
}

/// Anything the builder accepts as a step: a step value, or a `&str` id.
pub trait IntoStepRef {
    /// Converts.
    fn into_step_ref(self) -> StepRef;
}

impl<S: Step> IntoStepRef for S {
    fn into_step_ref(self) -> StepRef {
        StepRef {
            kind: StepRefKind::Value(Arc::new(self), TypeId::of::<S>()),
        }
    }
}

impl IntoStepRef for &str {
    fn into_step_ref(self) -> StepRef {
        StepRef {
            kind: StepRefKind::Id(self.to_owned()),
        }
    }
}

impl IntoStepRef for StepRef {
    fn into_step_ref(self) -> StepRef {
        self
    }
}

/// A step reference with an optional config, for fan-outs and dynamic routes.
#[derive(Debug, Clone)]
pub struct TargetSpec {
    step: StepRef,
    config: Option<Value>,
}

impl TargetSpec {
    /// Attaches a config.
    #[must_use]
    pub fn config(mut self, config: Value) -> Self {
        self.config = Some(config);
        self
    }
}

/// Builds a [`TargetSpec`] from a step value or id.
pub fn target(step: impl IntoStepRef) -> TargetSpec {
    TargetSpec {
        step: step.into_step_ref(),
        config: None,
    }
}

pub(crate) enum DraftRoute {
    Static(Vec<TargetSpec>),
    Dynamic(Vec<TargetSpec>, RouteFn),
}

pub(crate) struct DraftClause {
    pub(crate) from: StepRef,
    pub(crate) event: String,
    pub(crate) route: DraftRoute,
}

pub(crate) enum MetadataDraft {
    Unset,
    Value(Value),
    SerializeError(String),
}

/// Collects a workflow definition; [`WorkflowBuilder::build`] validates it.
pub struct WorkflowBuilder {
    pub(crate) id: String,
    pub(crate) version: u32,
    pub(crate) unique: Option<Result<Unique, crate::business_id::BusinessIdError>>,
    pub(crate) tags: Vec<String>,
    pub(crate) metadata: MetadataDraft,
    pub(crate) retry_policy: Option<RetryPolicy>,
    pub(crate) starts: Vec<TargetSpec>,
    pub(crate) extra_steps: Vec<StepRef>,
    pub(crate) clauses: Vec<DraftClause>,
}

impl fmt::Debug for WorkflowBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkflowBuilder")
            .field("id", &self.id)
            .field("version", &self.version)
            .field("clauses", &self.clauses.len())
            .finish_non_exhaustive()
    }
}

impl WorkflowBuilder {
    fn new(id: String) -> Self {
        Self {
            id,
            version: 1,
            unique: None,
            tags: Vec::new(),
            metadata: MetadataDraft::Unset,
            retry_policy: None,
            starts: Vec::new(),
            extra_steps: Vec::new(),
            clauses: Vec::new(),
        }
    }

    /// Sets the version (default 1; must be positive).
    #[must_use]
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Declares the unique key (`[a-z0-9]+`) and scope. Required.
    #[must_use]
    pub fn unique(mut self, key: impl Into<String>, scope: Scope) -> Self {
        self.unique = Some(Unique::new(key, scope));
        self
    }

    /// Adds tags.
    #[must_use]
    pub fn tags<I, T>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }

    /// Sets JSON metadata; it must serialize to a JSON object.
    #[must_use]
    pub fn metadata(mut self, metadata: impl Serialize) -> Self {
        self.metadata = match serde_json::to_value(metadata) {
            Ok(v) => MetadataDraft::Value(v),
            Err(e) => MetadataDraft::SerializeError(e.to_string()),
        };
        self
    }

    /// Sets the workflow's default retry policy.
    #[must_use]
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry_policy = Some(policy);
        self
    }

    /// Registers a step without a transition from it (to reference it by id).
    #[must_use]
    pub fn step(mut self, step: impl IntoStepRef) -> Self {
        self.extra_steps.push(step.into_step_ref());
        self
    }

    /// Declares the start step.
    #[must_use]
    pub fn start(mut self, step: impl IntoStepRef) -> Self {
        self.starts.push(target(step));
        self
    }

    /// Declares the start step with a config.
    #[must_use]
    pub fn start_with(mut self, step: impl IntoStepRef, config: Value) -> Self {
        self.starts.push(target(step).config(config));
        self
    }

    /// `from` on `event` activates `to`.
    #[must_use]
    pub fn on(self, from: impl IntoStepRef, event: &str, to: impl IntoStepRef) -> Self {
        self.fan_out(from, event, [target(to)])
    }

    /// `from` on `event` activates `to` with `config`.
    #[must_use]
    pub fn on_with(
        self,
        from: impl IntoStepRef,
        event: &str,
        to: impl IntoStepRef,
        config: Value,
    ) -> Self {
        self.fan_out(from, event, [target(to).config(config)])
    }

    /// `from` on `event` activates every target (a fan-out).
    #[must_use]
    pub fn fan_out(
        mut self,
        from: impl IntoStepRef,
        event: &str,
        targets: impl IntoIterator<Item = TargetSpec>,
    ) -> Self {
        self.clauses.push(DraftClause {
            from: from.into_step_ref(),
            event: event.to_owned(),
            route: DraftRoute::Static(targets.into_iter().collect()),
        });
        self
    }

    /// `from` on `event` activates the targets `route` picks among `declared`.
    #[must_use]
    pub fn route<F>(
        mut self,
        from: impl IntoStepRef,
        event: &str,
        declared: impl IntoIterator<Item = TargetSpec>,
        route: F,
    ) -> Self
    where
        F: Fn(&Context) -> Vec<Pick> + Send + Sync + 'static,
    {
        self.clauses.push(DraftClause {
            from: from.into_step_ref(),
            event: event.to_owned(),
            route: DraftRoute::Dynamic(declared.into_iter().collect(), Arc::new(route)),
        });
        self
    }

    /// Validates every rule and returns the workflow, or every problem found.
    pub fn build(self) -> Result<Workflow, WorkflowErrors> {
        validate::build(self).map(|inner| Workflow {
            inner: Arc::new(inner),
        })
    }
}

#[cfg(test)]
mod tests;
