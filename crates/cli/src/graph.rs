//! `hephaestus graph WORKFLOW [--dot]`: a registered workflow's DAG, drawn
//! in the terminal (steps in layers from the start, each with its outgoing
//! transitions) or as Graphviz DOT.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use anyhow::{Result, bail};
use clap::Args;
use hephaestus_engine_core::Workflow;

use crate::fixtures;

/// Graph options.
#[derive(Debug, Args)]
pub struct GraphCommand {
    /// The workflow id (see `hephaestus graph --list`).
    workflow: Option<String>,
    /// Print Graphviz DOT instead of the terminal drawing.
    #[arg(long)]
    dot: bool,
    /// List the registered workflows.
    #[arg(long)]
    list: bool,
}

impl GraphCommand {
    pub fn run(&self) -> Result<()> {
        let workflows = fixtures::workflows(&fixtures::Recorder::detached())?;
        let ids: Vec<&str> = workflows.iter().map(|w| w.id().as_str()).collect();
        if self.list {
            for id in &ids {
                println!("{id}");
            }
            return Ok(());
        }
        let Some(wanted) = &self.workflow else {
            bail!("which workflow? registered: {} (or --list)", ids.join(", "));
        };
        let Some(workflow) = workflows.iter().find(|w| w.id().as_str() == wanted) else {
            bail!(
                "no workflow {wanted:?} is registered; registered: {}",
                ids.join(", ")
            );
        };
        if self.dot {
            print!("{}", dot(workflow));
        } else {
            print!("{}", ascii(workflow));
        }
        Ok(())
    }
}

/// The steps by layer: a step's layer is the length of the longest path
/// from a root to it, so every edge points to a later layer.
fn layers(workflow: &Workflow) -> Vec<Vec<String>> {
    let mut depth: BTreeMap<String, usize> = BTreeMap::new();
    let steps: Vec<String> = workflow.steps().keys().map(ToString::to_string).collect();
    // Relax edges until nothing changes; the graph is acyclic (validated),
    // so this ends after at most as many passes as there are steps.
    for step in &steps {
        depth.insert(step.clone(), 0);
    }
    let edges = workflow.edges();
    for _ in 0..steps.len() {
        let mut changed = false;
        for edge in &edges {
            let from = depth.get(edge.from.as_str()).copied().unwrap_or(0);
            let to = depth.entry(edge.to.to_string()).or_insert(0);
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
        out[d].push(step);
    }
    out
}

/// The terminal drawing.
pub fn ascii(workflow: &Workflow) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{} v{}", workflow.id(), workflow.version());
    let mut outgoing: BTreeMap<(String, String), (BTreeSet<String>, bool)> = BTreeMap::new();
    for edge in workflow.edges() {
        let entry = outgoing
            .entry((edge.from.to_string(), edge.event.to_string()))
            .or_default();
        entry.0.insert(edge.to.to_string());
        entry.1 |= edge.dynamic;
    }
    for (i, layer) in layers(workflow).iter().enumerate() {
        let _ = writeln!(out, "[{i}]");
        for step in layer {
            let _ = writeln!(out, "  {step}");
            for ((from, event), (targets, dynamic)) in &outgoing {
                if from != step {
                    continue;
                }
                let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
                let how = if *dynamic {
                    " (routed at run time)"
                } else {
                    ""
                };
                let _ = writeln!(out, "      :{event} -> {}{how}", targets.join(", "));
            }
        }
    }
    out
}

/// Graphviz DOT: dynamic edges dashed, labelled with their event.
pub fn dot(workflow: &Workflow) -> String {
    let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "digraph {} {{",
        quote(&format!("{} v{}", workflow.id(), workflow.version()))
    );
    let _ = writeln!(out, "  rankdir=TB;");
    let _ = writeln!(out, "  node [shape=box];");
    for step in workflow.steps().keys() {
        let _ = writeln!(out, "  {};", quote(step.as_str()));
    }
    for edge in workflow.edges() {
        let style = if edge.dynamic { ", style=dashed" } else { "" };
        let _ = writeln!(
            out,
            "  {} -> {} [label={}{style}];",
            quote(edge.from.as_str()),
            quote(edge.to.as_str()),
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
        let drawn = ascii(&diamond());
        assert_eq!(
            drawn,
            "diamond v1\n[0]\n  A\n      :done -> B, C\n[1]\n  B\n      :done -> D\n  C\n      :done -> D\n[2]\n  D\n      :done -> hephaestus::Done\n[3]\n  hephaestus::Done\n"
        );
    }

    #[test]
    fn dot_lists_every_step_and_edge() {
        let drawn = dot(&diamond());
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
