//! `hephaestus graph WORKFLOW [--dot]`: a registered workflow's DAG, drawn
//! in the terminal (steps in layers from the start, each with its outgoing
//! transitions) or as Graphviz DOT. The drawing is shared with `instances
//! show`, which marks each step with its state and each taken edge, and
//! draws from an instance's stored step states when the workflow is not
//! registered.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use anyhow::{Result, bail};
use clap::Args;
use hephaestus_engine_core::{Instance, StepStatus, Workflow};

use crate::App;

/// Graph options.
#[derive(Debug, Args)]
pub struct GraphCommand {
    /// The workflow id (see `hephaestus graph --list`).
    workflow: Option<String>,
    /// The version of a versioned workflow (default: its current version).
    #[arg(long)]
    version: Option<u32>,
    /// Print Graphviz DOT instead of the terminal drawing.
    #[arg(long)]
    dot: bool,
    /// List the registered workflows.
    #[arg(long)]
    list: bool,
    /// Print JSON: the layers and edges (with --list: each workflow's
    /// versions).
    #[arg(long, conflicts_with = "dot")]
    json: bool,
}

impl GraphCommand {
    pub async fn run(&self, app: &App) -> Result<()> {
        let registry = app.registry().await?;
        let ids: Vec<String> = registry.families().map(|f| f.id().to_string()).collect();
        if self.list {
            if self.json {
                let list: Vec<serde_json::Value> = registry
                    .families()
                    .map(|f| {
                        let versions: Vec<u32> = f.versions().map(|(v, _)| v).collect();
                        serde_json::json!({
                            "workflow": f.id().as_str(),
                            "versions": versions,
                            "current": f.current_version(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
                return Ok(());
            }
            for id in &ids {
                println!("{id}");
            }
            return Ok(());
        }
        let Some(wanted) = &self.workflow else {
            bail!("which workflow? registered: {} (or --list)", ids.join(", "));
        };
        let Ok(family) = registry.family(wanted) else {
            bail!(
                "no workflow {wanted:?} is registered; registered: {}",
                ids.join(", ")
            );
        };
        let version = self.version.unwrap_or_else(|| family.current_version());
        let Some(workflow) = family.version(version) else {
            let versions: Vec<String> = family.versions().map(|(v, _)| v.to_string()).collect();
            bail!(
                "{wanted} has no version {version}; registered versions: {}",
                versions.join(", ")
            );
        };
        let dag = Dag::of_workflow(workflow);
        if self.json {
            let edges: Vec<serde_json::Value> = dag
                .edges
                .iter()
                .map(|e| {
                    serde_json::json!({"from": e.from, "event": e.event, "to": e.to, "dynamic": e.dynamic})
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "workflow": workflow.id().as_str(),
                    "version": workflow.version(),
                    "layers": dag.layers(),
                    "edges": edges,
                })
            );
        } else if self.dot {
            print!("{}", dot(&dag));
        } else {
            print!("{}", ascii(&dag, &Marks::default()));
        }
        Ok(())
    }
}

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
#[derive(Debug, Clone, Default)]
pub struct Dag {
    /// The first line of the drawing.
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
    /// from a root to it, so every edge points to a later layer.
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
}

/// What `instances show` adds to a drawing: a label beside each step, lines
/// under it, and the edges taken.
#[derive(Debug, Clone, Default)]
pub struct Marks {
    /// Step → the label printed beside it (`[done]`).
    pub labels: BTreeMap<String, String>,
    /// Step → lines printed under it (output, errors, attempts).
    pub details: BTreeMap<String, Vec<String>>,
    /// (step, event) → the targets it took.
    pub taken: BTreeMap<(String, String), BTreeSet<String>>,
}

/// The terminal drawing.
pub fn ascii(dag: &Dag, marks: &Marks) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", dag.title);
    let mut outgoing: BTreeMap<(&str, &str), (Vec<&str>, bool)> = BTreeMap::new();
    for edge in &dag.edges {
        let entry = outgoing
            .entry((edge.from.as_str(), edge.event.as_str()))
            .or_default();
        entry.0.push(edge.to.as_str());
        entry.1 |= edge.dynamic;
    }
    for (i, layer) in dag.layers().iter().enumerate() {
        let _ = writeln!(out, "[{i}]");
        for step in layer {
            match marks.labels.get(step) {
                Some(label) => {
                    let _ = writeln!(out, "  {step}  [{label}]");
                }
                None => {
                    let _ = writeln!(out, "  {step}");
                }
            }
            for line in marks.details.get(step).into_iter().flatten() {
                let _ = writeln!(out, "      {line}");
            }
            for ((from, event), (targets, dynamic)) in &outgoing {
                if from != step {
                    continue;
                }
                let how = if *dynamic {
                    " (routed at run time)"
                } else {
                    ""
                };
                let taken = match marks.taken.get(&((*from).to_owned(), (*event).to_owned())) {
                    None => String::new(),
                    Some(picked) if *dynamic => format!(
                        " [taken: {}]",
                        picked
                            .iter()
                            .map(String::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    Some(_) => " [taken]".to_owned(),
                };
                let _ = writeln!(out, "      :{event} -> {}{how}{taken}", targets.join(", "));
            }
        }
    }
    out
}

/// Graphviz DOT: dynamic edges dashed, labelled with their event.
pub fn dot(dag: &Dag) -> String {
    let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let mut out = String::new();
    let _ = writeln!(out, "digraph {} {{", quote(&dag.title));
    let _ = writeln!(out, "  rankdir=TB;");
    let _ = writeln!(out, "  node [shape=box];");
    for step in &dag.steps {
        let _ = writeln!(out, "  {};", quote(step));
    }
    for edge in &dag.edges {
        let style = if edge.dynamic { ", style=dashed" } else { "" };
        let _ = writeln!(
            out,
            "  {} -> {} [label={}{style}];",
            quote(&edge.from),
            quote(&edge.to),
            quote(&format!(":{}", edge.event))
        );
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use hephaestus_engine_core::prelude::*;
    use hephaestus_engine_core::steps::{Done, FnStep};

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
    fn ascii_puts_every_step_after_all_its_predecessors() {
        let drawn = ascii(&Dag::of_workflow(&diamond()), &Marks::default());
        assert_eq!(
            drawn,
            "diamond v1\n[0]\n  A\n      :done -> B, C\n[1]\n  B\n      :done -> D\n  C\n      :done -> D\n[2]\n  D\n      :done -> hephaestus::Done\n[3]\n  hephaestus::Done\n"
        );
    }

    #[test]
    fn marks_label_steps_add_details_and_flag_taken_edges() {
        let mut marks = Marks::default();
        marks.labels.insert("A".into(), "done".into());
        marks.labels.insert("B".into(), "failed".into());
        marks
            .details
            .insert("B".into(), vec!["error: boom".to_owned()]);
        marks.taken.insert(
            ("A".into(), "done".into()),
            ["B".to_owned(), "C".to_owned()].into(),
        );
        let drawn = ascii(&Dag::of_workflow(&diamond()), &marks);
        assert!(
            drawn.starts_with(
                "diamond v1\n[0]\n  A  [done]\n      :done -> B, C [taken]\n[1]\n  B  [failed]\n      error: boom\n      :done -> D\n  C\n"
            ),
            "{drawn}"
        );
    }

    #[test]
    fn an_instance_alone_draws_the_steps_it_reached_and_the_edges_it_took() {
        let wf = diamond();
        let engine = Engine::new(&wf);
        let mut instance = engine
            .new_instance(NewInstance {
                id: uuid::Uuid::now_v7(),
                business_id: BusinessId::parse("k::1").unwrap(),
                input: serde_json::json!({}),
                telemetry_metadata: serde_json::Map::new(),
                now: chrono::Utc::now(),
            })
            .unwrap();
        let now = chrono::Utc::now();
        engine.apply(&mut instance, Input::Start, now).unwrap();
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
        assert_eq!(
            ascii(&dag, &Marks::default()),
            "diamond v1\n[0]\n  A\n      :done -> B, C\n[1]\n  B\n  C\n"
        );
    }

    #[test]
    fn dot_lists_every_step_and_edge() {
        let drawn = dot(&Dag::of_workflow(&diamond()));
        assert!(drawn.starts_with("digraph \"diamond v1\" {\n"));
        for line in [
            "  \"A\" -> \"B\" [label=\":done\"];",
            "  \"A\" -> \"C\" [label=\":done\"];",
            "  \"D\" -> \"hephaestus::Done\" [label=\":done\"];",
        ] {
            assert!(drawn.contains(line), "missing {line} in\n{drawn}");
        }
        assert!(drawn.ends_with("}\n"));
    }
}
