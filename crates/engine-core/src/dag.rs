//! A workflow's DAG as operators see it: the steps, the edges between them
//! and a layering for drawing (the `hephaestus` CLI's terminal and DOT
//! drawings and the dashboard's SVG share it). A DAG comes from a
//! definition, or, when the definition is not at hand, from an instance's
//! stored step states and the edges its completed steps took.

use std::collections::{BTreeMap, BTreeSet};

use crate::instance::{Instance, StepState, StepStatus};
use crate::workflow::Workflow;

/// One edge: `from` routes to `to` when it completes with `event`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DagEdge {
    /// The source step.
    pub from: String,
    /// The event.
    pub event: String,
    /// The target step.
    pub to: String,
    /// A dynamic route: `to` is one of the targets it may pick.
    pub dynamic: bool,
}

/// A DAG to draw: a title, the steps and the edges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dag {
    /// `workflow vN`.
    pub title: String,
    /// Every step.
    pub steps: BTreeSet<String>,
    /// Every edge, sorted.
    pub edges: Vec<DagEdge>,
}

impl Dag {
    /// The DAG of a definition.
    pub fn of_workflow(workflow: &Workflow) -> Self {
        let mut edges: Vec<DagEdge> = workflow
            .edges()
            .into_iter()
            .map(|e| DagEdge {
                from: e.from.to_string(),
                event: e.event.to_string(),
                to: e.to.to_string(),
                dynamic: e.dynamic,
            })
            .collect();
        edges.sort();
        Self {
            title: format!("{} v{}", workflow.id(), workflow.version()),
            steps: workflow.steps().keys().map(ToString::to_string).collect(),
            edges,
        }
    }

    /// What an instance's stored state tells of its DAG, without the
    /// definition: every step it reached, and the edges its completed steps
    /// took (steps not reached and edges not taken are unknown).
    pub fn of_instance(instance: &Instance) -> Self {
        let mut steps = BTreeSet::new();
        let mut edges = Vec::new();
        for (id, state) in &instance.steps {
            steps.insert(id.to_string());
            if state.status != StepStatus::Completed {
                continue;
            }
            let Some(event) = &state.event else { continue };
            for target in &state.targets {
                steps.insert(target.to_string());
                edges.push(DagEdge {
                    from: id.to_string(),
                    event: event.to_string(),
                    to: target.to_string(),
                    dynamic: false,
                });
            }
        }
        edges.sort();
        Self {
            title: format!("{} v{}", instance.workflow_id, instance.workflow_version),
            steps,
            edges,
        }
    }

    /// The steps by layer: a step's layer is the length of the longest path
    /// from a root to it, so every edge points to a later layer. Steps of a
    /// layer are in name order.
    pub fn layers(&self) -> Vec<Vec<String>> {
        let mut depth: BTreeMap<&str, usize> = self.steps.iter().map(|s| (s.as_str(), 0)).collect();
        // Relax edges until nothing changes; the graph is acyclic (a
        // validated definition, or edges taken in activation order), so
        // this ends after at most as many passes as there are steps.
        for _ in 0..=self.steps.len() {
            let mut changed = false;
            for edge in &self.edges {
                let from = depth.get(edge.from.as_str()).copied().unwrap_or(0);
                let to = depth.entry(edge.to.as_str()).or_insert(0);
                if *to < from + 1 {
                    *to = from + 1;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        let mut out: Vec<Vec<String>> = Vec::new();
        for (step, d) in depth {
            if out.len() <= d {
                out.resize_with(d + 1, Vec::new);
            }
            out[d].push(step.to_owned());
        }
        out
    }

    /// (step, event) → the targets an instance's completed steps took.
    pub fn taken(instance: &Instance) -> BTreeMap<(String, String), BTreeSet<String>> {
        let mut taken = BTreeMap::new();
        for (id, state) in &instance.steps {
            if state.status != StepStatus::Completed {
                continue;
            }
            if let Some(event) = &state.event {
                taken.insert(
                    (id.to_string(), event.to_string()),
                    state.targets.iter().map(ToString::to_string).collect(),
                );
            }
        }
        taken
    }
}

/// A step's state as operators name it: `pending` (not reached), `running`,
/// `waiting`, `done`, `dead`, `failed` or `cancelled`.
pub fn state_name(state: Option<&StepState>) -> &'static str {
    match state.map(|s| s.status) {
        None => "pending",
        Some(StepStatus::Active) => "running",
        Some(StepStatus::Waiting) => "waiting",
        Some(StepStatus::Completed) => "done",
        Some(StepStatus::Dead) => "dead",
        Some(StepStatus::Failed) => "failed",
        Some(StepStatus::Cancelled) => "cancelled",
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use crate::steps::{Done, FnStep};

    use super::*;

    fn diamond() -> Workflow {
        let step = |id: &str| FnStep::new(id, ["done"], |_| StepOutcome::complete("done"));
        let (a, b, c, d) = (step("A"), step("B"), step("C"), step("D"));
        Workflow::builder("diamond")
            .unique("k", Scope::Workflow)
            .start(a.clone())
            .fan_out(a, "done", [target(b.clone()), target(c.clone())])
            .on(b, "done", d.clone())
            .on(c, "done", d.clone())
            .on(d, "done", Done)
            .build()
            .unwrap()
    }

    #[test]
    fn layers_put_every_step_after_all_its_predecessors() {
        let dag = Dag::of_workflow(&diamond());
        assert_eq!(dag.title, "diamond v1");
        assert_eq!(
            dag.layers(),
            vec![
                vec!["A"],
                vec!["B", "C"],
                vec!["D"],
                vec!["hephaestus::Done"]
            ]
        );
    }

    #[test]
    fn an_instance_alone_gives_the_steps_it_reached_and_the_edges_it_took() {
        let wf = diamond();
        let engine = Engine::new(&wf);
        let now = chrono::Utc::now();
        let mut instance = engine
            .new_instance(NewInstance {
                id: uuid::Uuid::now_v7(),
                business_id: BusinessId::parse("k::1").unwrap(),
                input: serde_json::json!({}),
                telemetry_metadata: serde_json::Map::new(),
                now,
            })
            .unwrap();
        engine.apply(&mut instance, Input::Start, now).unwrap();
        assert_eq!(state_name(instance.steps.get("A")), "running");
        assert_eq!(state_name(instance.steps.get("D")), "pending");
        engine
            .apply(
                &mut instance,
                Input::Completed {
                    step: StepId::new("A").unwrap(),
                    activation: 1,
                    completion: Completion::new("done"),
                },
                now,
            )
            .unwrap();
        let dag = Dag::of_instance(&instance);
        assert_eq!(dag.layers(), vec![vec!["A"], vec!["B", "C"]]);
        assert_eq!(dag.edges.len(), 2);
        assert_eq!(state_name(instance.steps.get("A")), "done");
        let taken = Dag::taken(&instance);
        assert_eq!(
            taken.get(&("A".to_owned(), "done".to_owned())),
            Some(&["B".to_owned(), "C".to_owned()].into())
        );
    }
}
