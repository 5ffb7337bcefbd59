//! Definition errors: one variant per validation rule, each message keeping
//! the original's phrase so it can be matched on.

use std::fmt;

use crate::ids::{Event, StepId};

/// One problem found when building a workflow or a family.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum WorkflowError {
    // ---- options (O1–O6) ----
    /// O1: a tag is empty or has surrounding whitespace.
    #[error(
        "expected :tags to be a list of strings, got: {0:?} (tags must be non-empty and trimmed)"
    )]
    InvalidTag(String),
    /// O2: metadata is not a JSON object.
    #[error("expected :metadata to be a map, got: {0}")]
    MetadataNotAMap(String),
    /// O3: metadata keys must be strings (a map with non-string keys failed to serialize).
    #[error(
        "expected :metadata keys to be strings (atom keys would lose identity after JSON round-tripping in adapters like Oban), got: {0}"
    )]
    MetadataKeysNotStrings(String),
    /// O4: metadata values must be JSON-safe (serializable, without U+0000).
    #[error(
        "expected :metadata values to be JSON-safe (strings, numbers, booleans, or nested maps/lists of the same), got: {0}"
    )]
    MetadataNotJsonSafe(String),
    /// O5: no unique rule declared.
    #[error("the :unique option is required for Hephaestus.Workflow (call .unique(key, scope))")]
    MissingUnique,
    /// O5: the unique key or scope is invalid.
    #[error("{0}")]
    InvalidUnique(crate::business_id::BusinessIdError),
    /// O6: the version is not positive.
    #[error("version: must be a positive integer, got: {0}")]
    InvalidVersion(u32),
    /// The workflow id is invalid.
    #[error("{0}")]
    InvalidWorkflowId(crate::ids::IdError),
    /// The default retry policy is invalid.
    #[error("invalid default retry policy: {0}")]
    InvalidRetryPolicy(crate::retry::RetryPolicyError),

    // ---- shape (S1–S2) ----
    /// S1: no start step.
    #[error("workflow must define start/0 (call .start(step))")]
    MissingStart,
    /// S1: more than one start step.
    #[error("start/0 must return a single step, but the start was declared {0} times")]
    DuplicateStart(usize),
    /// S2: an event in a transition is not an identifier.
    #[error("transit/3 event must be an atom event, got: {0:?}")]
    InvalidTransitionEvent(String),
    /// S2: a step id is invalid.
    #[error("transit/3 source must be a step module, got: {0:?}")]
    InvalidStepId(String),
    /// S2: a dynamic transition declares no targets.
    #[error(
        "transit/3 @targets must be a list of step modules, got an empty list for {from} on :{event}"
    )]
    EmptyDynamicTargets {
        /// The source.
        from: StepId,
        /// The event.
        event: Event,
    },
    /// S2: a static transition has no target.
    #[error(
        "transit/3 body must return step modules, {{step_module, config}}, or lists of them, got an empty list for {from} on :{event}"
    )]
    EmptyTargets {
        /// The source.
        from: StepId,
        /// The event.
        event: Event,
    },
    /// S2: two transitions for the same source and event.
    #[error("duplicate transition from {from} on :{event}")]
    DuplicateTransition {
        /// The source.
        from: StepId,
        /// The event.
        event: Event,
    },
    /// S2: a transition lists the same target twice.
    #[error("transition from {from} on :{event} lists {target} more than once")]
    DuplicateTarget {
        /// The source.
        from: StepId,
        /// The event.
        event: Event,
        /// The repeated target.
        target: StepId,
    },
    /// Two different step types share one id.
    #[error("step id {0} is used by two different step types; each step id names one step")]
    DuplicateStepId(StepId),

    // ---- graph (G-1 … G-6e) ----
    /// G-1: the graph has a cycle (a self-loop counts).
    #[error("cycle detected in workflow graph: {}", join_cycle(.0))]
    Cycle(Vec<StepId>),
    /// G-2: steps not reachable from the start.
    #[error("unreachable steps from start/0 {start}: {}", join(.steps))]
    Unreachable {
        /// The start step.
        start: StepId,
        /// The unreachable steps, sorted.
        steps: Vec<StepId>,
    },
    /// G-3: paths that end at a step other than Done.
    #[error("path terminates at {}, which is not Hephaestus.Steps.Done (every path must end at Done)", join(.0))]
    LeafNotDone(Vec<StepId>),
    /// G-4: a static fan-out whose branches never meet before Done.
    #[error("fan-out branches from {0} must converge before Hephaestus.Steps.Done")]
    FanOutDoesNotConverge(StepId),
    /// G-5: two steps share a context key (or a step uses Done's key).
    #[error("context key collision for :{key}: {}", join(.steps))]
    ContextKeyCollision {
        /// The key.
        key: String,
        /// The steps sharing it.
        steps: Vec<StepId>,
    },
    /// G-6a: a transition names a step that was never given.
    #[error("unable to load step module {0}: no step with this id was given to the builder")]
    UnknownStep(StepId),
    /// G-6b: a step (other than Done) declares no events.
    #[error("{0} must implement events/0 (it declares no events)")]
    NoEvents(StepId),
    /// G-6c: a step declares an event twice.
    #[error(
        "{step} events/0 must return a list of atoms without duplicates, but :{event} is declared twice"
    )]
    DuplicateEvent {
        /// The step.
        step: StepId,
        /// The repeated event.
        event: Event,
    },
    /// G-6d: a transition on an event the step does not declare.
    #[error("{step} does not declare :{event} in events/0")]
    UndeclaredEvent {
        /// The step.
        step: StepId,
        /// The event.
        event: Event,
    },
    /// G-6e: a declared event without a transition.
    #[error("{step} declares event :{event} but no transit is defined in {workflow}")]
    MissingTransition {
        /// The step.
        step: StepId,
        /// The event.
        event: Event,
        /// The workflow.
        workflow: String,
    },
    /// A literal step config is invalid (for example a `Wait` duration).
    #[error("invalid config for {step}: {reason}")]
    InvalidConfig {
        /// The step.
        step: StepId,
        /// Why.
        reason: String,
    },

    // ---- versioned families (spec 2.7) ----
    /// A family with no versions.
    #[error("workflow family {0} has no versions")]
    EmptyFamily(String),
    /// A version key that is not positive.
    #[error("all keys in :versions must be positive integer, got invalid keys: [{0}]")]
    InvalidVersionKey(u32),
    /// The same version twice.
    #[error("version {version} is declared twice in family {family}")]
    DuplicateVersion {
        /// The family.
        family: String,
        /// The version.
        version: u32,
    },
    /// `current` is not one of the versions.
    #[error(":current {current} is not a key in :versions (available: [{}])", join_nums(.available))]
    CurrentNotAVersion {
        /// The requested current version.
        current: u32,
        /// The versions.
        available: Vec<u32>,
    },
    /// A member's own version differs from its key.
    #[error("version mismatch for {workflow}: __version__/0 returns {actual} but key is {key}")]
    VersionMismatch {
        /// The member workflow.
        workflow: String,
        /// Its own version.
        actual: u32,
        /// The key it was registered under.
        key: u32,
    },
    /// A member whose id is not the family's.
    #[error(
        "version module {workflow} for key {key} must be nested under {family} (its id must be the family id)"
    )]
    NotNestedUnderFamily {
        /// The member's id.
        workflow: String,
        /// Its key.
        key: u32,
        /// The family.
        family: String,
    },
    /// A member whose unique rule differs from the family's.
    #[error(
        "version {key} of {family} must share the family's unique key {expected}, got: {actual}"
    )]
    UniqueMismatch {
        /// The family.
        family: String,
        /// The version.
        key: u32,
        /// The family's rule.
        expected: String,
        /// The member's rule.
        actual: String,
    },
}

fn join(ids: &[StepId]) -> String {
    ids.iter()
        .map(StepId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

fn join_cycle(ids: &[StepId]) -> String {
    let mut s = ids
        .iter()
        .map(StepId::as_str)
        .collect::<Vec<_>>()
        .join(" -> ");
    if let Some(first) = ids.first() {
        s.push_str(" -> ");
        s.push_str(first.as_str());
    }
    s
}

fn join_nums(nums: &[u32]) -> String {
    nums.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every problem found when building one workflow or family, options first,
/// then shape, then graph.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct WorkflowErrors {
    /// The workflow or family id as given.
    pub workflow: String,
    /// The problems, in rule order.
    pub errors: Vec<WorkflowError>,
}

impl WorkflowErrors {
    /// Whether any problem matches `pred`.
    pub fn any(&self, pred: impl Fn(&WorkflowError) -> bool) -> bool {
        self.errors.iter().any(pred)
    }
}

impl fmt::Display for WorkflowErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid workflow {}: ", self.workflow)?;
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}
