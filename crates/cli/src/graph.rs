//! `hephaestus graph WORKFLOW [--dot]`: a registered workflow's DAG, drawn
//! in the terminal (steps in layers from the start, each with its outgoing
//! transitions) or as Graphviz DOT. The drawing is shared with `instances
//! show`, which marks each step with its state and each taken edge, and
//! draws from an instance's stored step states when the workflow is not
//! registered. The DAG itself (steps, edges, layers) is engine-core's
//! [`Dag`], shared with the dashboard's SVG.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use anyhow::{Result, bail};
use clap::Args;
pub use hephaestus_engine_core::dag::Dag;

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
