//! `WorkflowBuilder::build`: every rule of the definition, problems collected
//! in rule order (options, then shape, then graph).

use std::any::TypeId;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde_json::{Map, Value};

use super::{
    Definition, DraftRoute, Edge, MetadataDraft, Route, StepDef, StepRef, StepRefKind, Target,
    TargetSpec, WorkflowBuilder, WorkflowError, WorkflowErrors,
};
use crate::ids::{Event, StepId, WorkflowId};
use crate::limits::{self, JsonRole};
use crate::step::Step;
use crate::steps::DONE_ID;

struct Registry {
    steps: BTreeMap<StepId, (Arc<dyn Step>, TypeId)>,
    duplicate_ids: BTreeSet<StepId>,
}

impl Registry {
    fn register(&mut self, r: &StepRef) {
        if let StepRefKind::Value(step, type_id) = &r.kind {
            let id = step.id();
            match self.steps.get(&id) {
                Some((_, existing)) if existing != type_id => {
                    self.duplicate_ids.insert(id);
                }
                Some(_) => {}
                None => {
                    self.steps.insert(id, (Arc::clone(step), *type_id));
                }
            }
        }
    }
}

struct Resolver<'a> {
    registry: &'a Registry,
    unknown: BTreeSet<StepId>,
    invalid: BTreeSet<String>,
}

impl Resolver<'_> {
    fn resolve(&mut self, r: &StepRef) -> Option<StepId> {
        match &r.kind {
            StepRefKind::Value(step, _) => Some(step.id()),
            StepRefKind::Id(raw) => match StepId::new(raw) {
                Ok(id) if self.registry.steps.contains_key(&id) => Some(id),
                Ok(id) => {
                    self.unknown.insert(id);
                    None
                }
                Err(_) => {
                    self.invalid.insert(raw.clone());
                    None
                }
            },
        }
    }

    fn resolve_target(&mut self, t: &TargetSpec) -> Option<Target> {
        self.resolve(&t.step).map(|step| Target {
            step,
            config: t.config.clone(),
        })
    }
}

fn option_errors(b: &WorkflowBuilder, errors: &mut Vec<WorkflowError>) -> Map<String, Value> {
    for tag in &b.tags {
        if tag.is_empty() || tag.trim() != tag || tag.contains('\0') {
            errors.push(WorkflowError::InvalidTag(tag.clone()));
        }
    }
    let metadata = match &b.metadata {
        MetadataDraft::Unset => Map::new(),
        MetadataDraft::Value(Value::Object(map)) => {
            if let Err(invalid) = limits::check_map(JsonRole::WorkflowMetadata, map) {
                errors.push(WorkflowError::MetadataNotJsonSafe(invalid.to_string()));
            }
            map.clone()
        }
        MetadataDraft::Value(other) => {
            errors.push(WorkflowError::MetadataNotAMap(other.to_string()));
            Map::new()
        }
        MetadataDraft::SerializeError(e) if e.contains("key must be a string") => {
            errors.push(WorkflowError::MetadataKeysNotStrings(e.clone()));
            Map::new()
        }
        MetadataDraft::SerializeError(e) => {
            errors.push(WorkflowError::MetadataNotJsonSafe(e.clone()));
            Map::new()
        }
    };
    match &b.unique {
        None => errors.push(WorkflowError::MissingUnique),
        Some(Err(e)) => errors.push(WorkflowError::InvalidUnique(e.clone())),
        Some(Ok(_)) => {}
    }
    if b.version == 0 {
        errors.push(WorkflowError::InvalidVersion(0));
    }
    if let Some(policy) = &b.retry_policy
        && let Err(e) = policy.validate()
    {
        errors.push(WorkflowError::InvalidRetryPolicy(e));
    }
    metadata
}

struct Clause {
    from: StepId,
    event: Event,
    route: Route,
}

pub(super) fn build(b: WorkflowBuilder) -> Result<Definition, WorkflowErrors> {
    let mut errors = Vec::new();
    let id = WorkflowId::new(&b.id)
        .map_err(|e| errors.push(WorkflowError::InvalidWorkflowId(e)))
        .ok();
    let metadata = option_errors(&b, &mut errors);

    // Register every step value given anywhere in the builder.
    let mut registry = Registry {
        steps: BTreeMap::new(),
        duplicate_ids: BTreeSet::new(),
    };
    for r in b.starts.iter().map(|t| &t.step).chain(&b.extra_steps) {
        registry.register(r);
    }
    for c in &b.clauses {
        registry.register(&c.from);
        let targets = match &c.route {
            DraftRoute::Static(t) | DraftRoute::Dynamic(t, _) => t,
        };
        for t in targets {
            registry.register(&t.step);
        }
    }
    let mut resolver = Resolver {
        registry: &registry,
        unknown: BTreeSet::new(),
        invalid: BTreeSet::new(),
    };

    // S1: exactly one start.
    let start = match b.starts.len() {
        0 => {
            errors.push(WorkflowError::MissingStart);
            None
        }
        1 => resolver.resolve_target(&b.starts[0]),
        n => {
            errors.push(WorkflowError::DuplicateStart(n));
            resolver.resolve_target(&b.starts[0])
        }
    };

    // S2: clause shape.
    let mut clauses: Vec<Clause> = Vec::new();
    let mut seen: BTreeSet<(StepId, Event)> = BTreeSet::new();
    for c in b.clauses {
        let from = resolver.resolve(&c.from);
        let event = Event::new(&c.event)
            .map_err(|_| errors.push(WorkflowError::InvalidTransitionEvent(c.event.clone())))
            .ok();
        let (specs, dynamic) = match c.route {
            DraftRoute::Static(t) => (t, None),
            DraftRoute::Dynamic(t, f) => (t, Some(f)),
        };
        let targets: Vec<Target> = specs
            .iter()
            .filter_map(|t| resolver.resolve_target(t))
            .collect();
        let (Some(from), Some(event)) = (from, event) else {
            continue;
        };
        if specs.is_empty() {
            errors.push(if dynamic.is_some() {
                WorkflowError::EmptyDynamicTargets {
                    from: from.clone(),
                    event: event.clone(),
                }
            } else {
                WorkflowError::EmptyTargets {
                    from: from.clone(),
                    event: event.clone(),
                }
            });
        }
        let mut names = BTreeSet::new();
        for t in &targets {
            if !names.insert(t.step.clone()) {
                errors.push(WorkflowError::DuplicateTarget {
                    from: from.clone(),
                    event: event.clone(),
                    target: t.step.clone(),
                });
            }
        }
        if !seen.insert((from.clone(), event.clone())) {
            errors.push(WorkflowError::DuplicateTransition {
                from: from.clone(),
                event: event.clone(),
            });
            continue;
        }
        let route = match dynamic {
            None => Route::Static(targets),
            Some(route) => Route::Dynamic {
                declared: targets,
                route,
            },
        };
        clauses.push(Clause { from, event, route });
    }
    for raw in &resolver.invalid {
        errors.push(WorkflowError::InvalidStepId(raw.clone()));
    }
    for id in &registry.duplicate_ids {
        errors.push(WorkflowError::DuplicateStepId(id.clone()));
    }

    // Literal configs: checked now; the first one per step decides its events.
    let mut literal_config: BTreeMap<StepId, Value> = BTreeMap::new();
    let literal_targets = start
        .iter()
        .chain(clauses.iter().flat_map(|c| c.route.edge_targets()));
    for t in literal_targets {
        if let (Some(cfg), Some((step, _))) = (&t.config, registry.steps.get(&t.step)) {
            if let Err(invalid) = limits::check(JsonRole::StepConfig, cfg) {
                errors.push(WorkflowError::InvalidConfig {
                    step: t.step.clone(),
                    reason: invalid.to_string(),
                });
            } else if let Err(reason) = step.validate_config(Some(cfg)) {
                errors.push(WorkflowError::InvalidConfig {
                    step: t.step.clone(),
                    reason,
                });
            }
            literal_config
                .entry(t.step.clone())
                .or_insert_with(|| cfg.clone());
        }
    }
    let steps: BTreeMap<StepId, StepDef> = registry
        .steps
        .iter()
        .map(|(id, (step, _))| {
            let events = step.events(literal_config.get(id));
            let def = StepDef {
                step: Arc::clone(step),
                key: step.step_key(),
                events,
            };
            (id.clone(), def)
        })
        .collect();

    // Graph.
    let mut successors: BTreeMap<StepId, BTreeSet<StepId>> = BTreeMap::new();
    let mut incoming: BTreeMap<StepId, Vec<Edge>> = BTreeMap::new();
    let mut vertices: BTreeSet<StepId> = BTreeSet::new();
    if let Some(s) = &start {
        vertices.insert(s.step.clone());
    }
    for id in b.extra_steps.iter().filter_map(|r| resolver.resolve(r)) {
        vertices.insert(id);
    }
    for c in &clauses {
        vertices.insert(c.from.clone());
        for t in c.route.edge_targets() {
            vertices.insert(t.step.clone());
            successors
                .entry(c.from.clone())
                .or_default()
                .insert(t.step.clone());
            incoming.entry(t.step.clone()).or_default().push(Edge {
                from: c.from.clone(),
                event: c.event.clone(),
                to: t.step.clone(),
                dynamic: c.route.is_dynamic(),
            });
        }
    }
    for id in &resolver.unknown {
        errors.push(WorkflowError::UnknownStep(id.clone()));
    }
    graph_errors(
        id.as_ref().map_or(b.id.as_str(), WorkflowId::as_str),
        start.as_ref().map(|t| &t.step),
        &vertices,
        &successors,
        &clauses,
        &steps,
        &mut errors,
    );

    if !errors.is_empty() {
        // Options first, then shape, then graph: the push order above, with the
        // unknown-step (G-6a) problems ordered among the graph rules.
        return Err(WorkflowErrors {
            workflow: b.id,
            errors: order(errors),
        });
    }
    let (Some(id), Some(start), Some(Ok(unique))) = (id, start, b.unique) else {
        unreachable!("errors were reported for a missing id, start or unique rule")
    };
    Ok(Definition {
        id,
        version: b.version,
        unique,
        tags: b.tags,
        metadata,
        retry_policy: b.retry_policy,
        start,
        steps,
        transitions: clauses
            .into_iter()
            .map(|c| ((c.from, c.event), c.route))
            .collect(),
        incoming,
        successors,
    })
}

fn rank(e: &WorkflowError) -> u8 {
    use WorkflowError as E;
    match e {
        E::InvalidWorkflowId(_)
        | E::InvalidTag(_)
        | E::MetadataNotAMap(_)
        | E::MetadataKeysNotStrings(_)
        | E::MetadataNotJsonSafe(_)
        | E::MissingUnique
        | E::InvalidUnique(_)
        | E::InvalidVersion(_)
        | E::InvalidRetryPolicy(_) => 0,
        E::MissingStart
        | E::DuplicateStart(_)
        | E::InvalidTransitionEvent(_)
        | E::InvalidStepId(_)
        | E::EmptyDynamicTargets { .. }
        | E::EmptyTargets { .. }
        | E::DuplicateTransition { .. }
        | E::DuplicateTarget { .. }
        | E::DuplicateStepId(_) => 1,
        E::Cycle(_) => 2,
        E::Unreachable { .. } => 3,
        E::LeafNotDone(_) => 4,
        E::FanOutDoesNotConverge(_) => 5,
        E::ContextKeyCollision { .. } => 6,
        E::UnknownStep(_) => 7,
        E::NoEvents(_) => 8,
        E::DuplicateEvent { .. } => 9,
        E::UndeclaredEvent { .. } => 10,
        E::MissingTransition { .. } => 11,
        _ => 12,
    }
}

fn order(mut errors: Vec<WorkflowError>) -> Vec<WorkflowError> {
    errors.sort_by_key(rank); // stable: keeps discovery order within a rule
    errors
}

fn reachable_from(
    start: &StepId,
    successors: &BTreeMap<StepId, BTreeSet<StepId>>,
) -> BTreeSet<StepId> {
    let mut seen = BTreeSet::from([start.clone()]);
    let mut queue = VecDeque::from([start.clone()]);
    while let Some(node) = queue.pop_front() {
        for next in successors.get(&node).into_iter().flatten() {
            if seen.insert(next.clone()) {
                queue.push_back(next.clone());
            }
        }
    }
    seen
}

/// Finds one cycle (as the list of its steps), if any.
fn find_cycle(
    vertices: &BTreeSet<StepId>,
    successors: &BTreeMap<StepId, BTreeSet<StepId>>,
) -> Option<Vec<StepId>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Color {
        White,
        Grey,
        Black,
    }
    let mut color: BTreeMap<&StepId, Color> = vertices.iter().map(|v| (v, Color::White)).collect();
    for root in vertices {
        if color[root] != Color::White {
            continue;
        }
        // Iterative DFS keeping the current path.
        let mut path: Vec<&StepId> = vec![root];
        let mut iters: Vec<Vec<&StepId>> = vec![
            successors
                .get(root)
                .map(|s| s.iter().collect())
                .unwrap_or_default(),
        ];
        color.insert(root, Color::Grey);
        while let Some(children) = iters.last_mut() {
            if let Some(next) = children.pop() {
                match color.get(next).copied().unwrap_or(Color::White) {
                    Color::Grey => {
                        let pos = path.iter().position(|p| *p == next).unwrap_or(0);
                        return Some(path[pos..].iter().map(|s| (*s).clone()).collect());
                    }
                    Color::White => {
                        color.insert(next, Color::Grey);
                        path.push(next);
                        iters.push(
                            successors
                                .get(next)
                                .map(|s| s.iter().collect())
                                .unwrap_or_default(),
                        );
                    }
                    Color::Black => {}
                }
            } else {
                iters.pop();
                if let Some(done) = path.pop() {
                    color.insert(done, Color::Black);
                }
            }
        }
    }
    None
}

fn graph_errors(
    workflow: &str,
    start: Option<&StepId>,
    vertices: &BTreeSet<StepId>,
    successors: &BTreeMap<StepId, BTreeSet<StepId>>,
    clauses: &[Clause],
    steps: &BTreeMap<StepId, StepDef>,
    errors: &mut Vec<WorkflowError>,
) {
    let is_done = |id: &StepId| id.as_str() == DONE_ID;

    // G-1 acyclic.
    if let Some(cycle) = find_cycle(vertices, successors) {
        errors.push(WorkflowError::Cycle(cycle));
    }
    // G-2 reachable.
    if let Some(start) = start {
        let reachable = reachable_from(start, successors);
        let unreachable: Vec<StepId> = vertices.difference(&reachable).cloned().collect();
        if !unreachable.is_empty() {
            errors.push(WorkflowError::Unreachable {
                start: start.clone(),
                steps: unreachable,
            });
        }
    }
    // G-3 every leaf is Done.
    let leaves: Vec<StepId> = vertices
        .iter()
        .filter(|v| successors.get(*v).is_none_or(BTreeSet::is_empty) && !is_done(v))
        .cloned()
        .collect();
    if !leaves.is_empty() {
        errors.push(WorkflowError::LeafNotDone(leaves));
    }
    // G-4 static fan-outs converge before Done.
    for c in clauses {
        if let Route::Static(targets) = &c.route
            && targets.len() > 1
        {
            let mut common: Option<BTreeSet<StepId>> = None;
            for t in targets {
                let r = reachable_from(&t.step, successors);
                common = Some(match common {
                    None => r,
                    Some(acc) => acc.intersection(&r).cloned().collect(),
                });
            }
            let converges = common.is_some_and(|s| s.iter().any(|v| !is_done(v)));
            if !converges {
                errors.push(WorkflowError::FanOutDoesNotConverge(c.from.clone()));
            }
        }
    }
    // G-5 context keys are unique (and none takes Done's key).
    let mut by_key: BTreeMap<&str, Vec<StepId>> = BTreeMap::new();
    for v in vertices {
        if let Some(def) = steps.get(v) {
            by_key.entry(def.key.as_str()).or_default().push(v.clone());
        }
    }
    for (key, ids) in by_key {
        let non_done = ids.iter().filter(|id| !is_done(id)).count();
        let collides_with_done = key == "done" && non_done > 0;
        if non_done > 1 || collides_with_done {
            errors.push(WorkflowError::ContextKeyCollision {
                key: key.to_owned(),
                steps: ids,
            });
        }
    }
    // G-6b … G-6e: events.
    let clause_events: BTreeSet<(&StepId, &Event)> =
        clauses.iter().map(|c| (&c.from, &c.event)).collect();
    for v in vertices.iter().filter(|v| !is_done(v)) {
        let Some(def) = steps.get(v) else { continue };
        if def.events.is_empty() {
            errors.push(WorkflowError::NoEvents(v.clone()));
        }
        let mut seen = BTreeSet::new();
        for e in &def.events {
            if !seen.insert(e) {
                errors.push(WorkflowError::DuplicateEvent {
                    step: v.clone(),
                    event: e.clone(),
                });
            }
        }
    }
    for c in clauses.iter().filter(|c| !is_done(&c.from)) {
        if let Some(def) = steps.get(&c.from)
            && !def.events.contains(&c.event)
        {
            errors.push(WorkflowError::UndeclaredEvent {
                step: c.from.clone(),
                event: c.event.clone(),
            });
        }
    }
    for v in vertices.iter().filter(|v| !is_done(v)) {
        let Some(def) = steps.get(v) else { continue };
        let mut reported = BTreeSet::new();
        for e in &def.events {
            if !clause_events.contains(&(v, e)) && reported.insert(e) {
                errors.push(WorkflowError::MissingTransition {
                    step: v.clone(),
                    event: e.clone(),
                    workflow: workflow.to_owned(),
                });
            }
        }
    }
}
