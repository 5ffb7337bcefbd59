//! The DAG as an SVG, laid out on the server: engine-core's [`Dag`] layers
//! from top to bottom (a step below every step that leads to it), the steps
//! of a layer side by side, a wide layer (a fan-out) wrapped into rows of
//! [`ROW`] steps and framed as a group: the edges into and out of a group
//! are drawn once per step outside it (a 500-way fan-out is two edges, not
//! a thousand). Each node is a `<g class="node state-NAME" data-step="ID"
//! data-state="NAME">`; the page's script shows the step's details when one
//! is clicked. Taken edges are drawn solid and dark, others faint, dynamic
//! routes dashed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use hephaestus_engine_core::dag::Dag;
use maud::{Markup, PreEscaped};

/// Steps per row within a layer.
pub const ROW: usize = 10;
const NODE_W: usize = 150;
const NODE_H: usize = 40;
const GAP_X: usize = 20;
const GAP_ROW: usize = 24;
const GAP_LAYER: usize = 56;
const MARGIN: usize = 16;
/// Above this many edges, event names go into tooltips only.
const LABELLED_EDGES: usize = 40;
/// Characters of a step name shown in its box.
const LABEL_CHARS: usize = 20;

/// A node's position (top-left corner).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct At {
    x: usize,
    y: usize,
}

/// The laid-out DAG.
#[derive(Debug)]
pub(crate) struct Layout {
    at: BTreeMap<String, At>,
    /// Step → its group, for steps of a wrapped layer.
    group_of: BTreeMap<String, usize>,
    /// Each group's frame: top-left, bottom-right, and how many steps.
    groups: Vec<(At, At, usize)>,
    width: usize,
    height: usize,
}

/// Space between a group's frame and its nodes.
const FRAME: usize = 10;
/// Room for a group's label above its nodes.
const LABEL: usize = 14;

/// Places every step of `dag`.
pub(crate) fn layout(dag: &Dag) -> Layout {
    let layers = dag.layers();
    let widest = layers.iter().map(|l| l.len().min(ROW)).max().unwrap_or(1);
    let width = MARGIN * 2 + widest * NODE_W + widest.saturating_sub(1) * GAP_X;
    let mut at = BTreeMap::new();
    let mut group_of = BTreeMap::new();
    let mut groups = Vec::new();
    let mut y = MARGIN;
    for layer in &layers {
        let wrapped = layer.len() > ROW;
        if wrapped {
            y += FRAME + LABEL;
            let frame_x = (width - (ROW * NODE_W + (ROW - 1) * GAP_X)) / 2 - FRAME;
            groups.push((
                At {
                    x: frame_x,
                    y: y - FRAME - LABEL,
                },
                At { x: 0, y: 0 },
                layer.len(),
            ));
            for step in layer {
                group_of.insert(step.clone(), groups.len() - 1);
            }
        }
        for row in layer.chunks(ROW) {
            let row_width = row.len() * NODE_W + (row.len() - 1) * GAP_X;
            let mut x = (width - row_width) / 2;
            for step in row {
                at.insert(step.clone(), At { x, y });
                x += NODE_W + GAP_X;
            }
            y += NODE_H + GAP_ROW;
        }
        if wrapped && let Some(group) = groups.last_mut() {
            group.1 = At {
                x: width - group.0.x,
                y: y - GAP_ROW + FRAME,
            };
            y += FRAME;
        }
        y += GAP_LAYER - GAP_ROW;
    }
    let height = (y + MARGIN)
        .saturating_sub(GAP_LAYER)
        .max(NODE_H + 2 * MARGIN);
    Layout {
        at,
        group_of,
        groups,
        width,
        height,
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn label(step: &str) -> String {
    // `hephaestus::Done` reads better as `Done`; the tooltip has the id.
    let short = step.strip_prefix("hephaestus::").unwrap_or(step);
    if short.chars().count() <= LABEL_CHARS {
        return short.to_owned();
    }
    let cut: String = short.chars().take(LABEL_CHARS - 1).collect();
    format!("{cut}…")
}

/// An edge as drawn (possibly several edges of the DAG merged at a group).
struct Drawn {
    from: String,
    to: String,
    event: String,
    start: (usize, usize),
    end: (usize, usize),
    taken: bool,
    dynamic: bool,
}

/// The SVG of `dag`: each step in the state `state_of` gives it (`None`
/// for a definition drawn without an instance), edges taken per `taken`
/// ((step, event) → targets).
pub(crate) fn render(
    dag: &Dag,
    state_of: &dyn Fn(&str) -> Option<&'static str>,
    taken: &BTreeMap<(String, String), BTreeSet<String>>,
) -> Markup {
    let layout = layout(dag);
    let mut out = String::with_capacity(256 * (dag.steps.len() + dag.edges.len()));
    let _ = write!(
        out,
        r#"<svg class="dag" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{title}">"#,
        w = layout.width,
        h = layout.height,
        title = escape(&dag.title),
    );
    out.push_str(r#"<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerUnits="userSpaceOnUse" markerWidth="9" markerHeight="9" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" class="arrowhead"/></marker></defs>"#);
    out.push_str(r#"<g class="edges">"#);
    // Edges into or out of a group are merged per outside step.
    let mut drawn: Vec<Drawn> = Vec::new();
    let mut merged: BTreeMap<(String, String, String), usize> = BTreeMap::new();
    for edge in &dag.edges {
        let (Some(from), Some(to)) = (layout.at.get(&edge.from), layout.at.get(&edge.to)) else {
            continue;
        };
        let was_taken = taken
            .get(&(edge.from.clone(), edge.event.clone()))
            .is_some_and(|t| t.contains(&edge.to));
        let group_from = layout.group_of.get(&edge.from).copied();
        let group_to = layout.group_of.get(&edge.to).copied();
        let (start, from_name) = match group_from {
            Some(g) if group_from != group_to => {
                let (top_left, bottom_right, n) = layout.groups[g];
                (
                    (usize::midpoint(top_left.x, bottom_right.x), bottom_right.y),
                    format!("{n} steps"),
                )
            }
            _ => ((from.x + NODE_W / 2, from.y + NODE_H), edge.from.clone()),
        };
        let (end, to_name) = match group_to {
            Some(g) if group_from != group_to => {
                let (top_left, bottom_right, n) = layout.groups[g];
                (
                    (usize::midpoint(top_left.x, bottom_right.x), top_left.y),
                    format!("{n} steps"),
                )
            }
            _ => ((to.x + NODE_W / 2, to.y), edge.to.clone()),
        };
        let key = (from_name.clone(), edge.event.clone(), to_name.clone());
        if let Some(&i) = merged.get(&key) {
            drawn[i].taken |= was_taken;
            drawn[i].dynamic |= edge.dynamic;
            continue;
        }
        merged.insert(key, drawn.len());
        drawn.push(Drawn {
            from: from_name,
            to: to_name,
            event: edge.event.clone(),
            start,
            end,
            taken: was_taken,
            dynamic: edge.dynamic,
        });
    }
    let labelled = drawn.len() <= LABELLED_EDGES;
    for edge in &drawn {
        let ((x1, y1), (x2, y2)) = (edge.start, edge.end);
        let mid = usize::midpoint(y1, y2);
        let class = format!(
            "edge{}{}",
            if edge.taken { " taken" } else { "" },
            if edge.dynamic { " dynamic" } else { "" }
        );
        let _ = write!(
            out,
            r#"<path class="{class}" data-from="{f}" data-to="{t}" d="M {x1} {y1} C {x1} {mid}, {x2} {mid}, {x2} {y2}" marker-end="url(#arrow)"><title>{f} :{e} → {t}</title></path>"#,
            f = escape(&edge.from),
            t = escape(&edge.to),
            e = escape(&edge.event),
        );
        if labelled {
            let _ = write!(
                out,
                r#"<text class="edge-label" x="{x}" y="{y}">:{e}</text>"#,
                x = usize::midpoint(x1, x2) + 4,
                y = mid,
                e = escape(&edge.event),
            );
        }
    }
    out.push_str("</g><g class=\"groups\">");
    for (top_left, bottom_right, n) in &layout.groups {
        let _ = write!(
            out,
            r#"<rect class="group" x="{x}" y="{y}" width="{w}" height="{h}" rx="8"/><text class="group-label" x="{lx}" y="{ly}">{n} steps</text>"#,
            x = top_left.x,
            y = top_left.y,
            w = bottom_right.x - top_left.x,
            h = bottom_right.y - top_left.y,
            lx = top_left.x + 6,
            ly = top_left.y + 4,
        );
    }
    out.push_str("</g><g class=\"nodes\">");
    for (step, at) in &layout.at {
        let state = state_of(step);
        let state_class = state.unwrap_or("definition");
        let _ = write!(
            out,
            r#"<g class="node state-{state_class}" data-step="{s}" data-state="{state_class}" tabindex="0"><title>{s}{colon}{state_text}</title><rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="6"/><text class="node-label" x="{tx}" y="{ty}">{label}</text>"#,
            s = escape(step),
            colon = if state.is_some() { ": " } else { "" },
            state_text = state.unwrap_or(""),
            x = at.x,
            y = at.y,
            tx = at.x + NODE_W / 2,
            ty = at.y + if state.is_some() { 17 } else { 25 },
            label = escape(&label(step)),
        );
        if let Some(state) = state {
            let _ = write!(
                out,
                r#"<text class="node-state" x="{tx}" y="{ty}">{state}</text>"#,
                tx = at.x + NODE_W / 2,
                ty = at.y + 32,
            );
        }
        out.push_str("</g>");
    }
    out.push_str("</g></svg>");
    PreEscaped(out)
}

#[cfg(test)]
mod tests {
    use hephaestus_engine_core::dag::DagEdge;

    use super::*;

    fn fan_out(n: usize) -> Dag {
        let mut dag = Dag {
            title: "fan <out> v1".to_owned(),
            ..Dag::default()
        };
        dag.steps.insert("Split".to_owned());
        dag.steps.insert("Join".to_owned());
        for i in 0..n {
            let branch = format!("Branch{i:03}");
            dag.steps.insert(branch.clone());
            dag.edges.push(DagEdge {
                from: "Split".into(),
                event: "done".into(),
                to: branch.clone(),
                dynamic: false,
            });
            dag.edges.push(DagEdge {
                from: branch,
                event: "done".into(),
                to: "Join".into(),
                dynamic: false,
            });
        }
        dag.edges.sort();
        dag
    }

    #[test]
    fn every_edge_points_down_and_a_wide_layer_wraps_into_rows() {
        let dag = fan_out(25);
        let layout = layout(&dag);
        for edge in &dag.edges {
            assert!(layout.at[&edge.from].y < layout.at[&edge.to].y, "{edge:?}");
        }
        let rows: BTreeSet<usize> = (0..25)
            .map(|i| layout.at[&format!("Branch{i:03}")].y)
            .collect();
        assert_eq!(rows.len(), 3, "25 branches in rows of {ROW}");
        assert!(layout.width <= MARGIN * 2 + ROW * (NODE_W + GAP_X));
        assert_eq!(layout.groups.len(), 1);
        let (top_left, bottom_right, n) = layout.groups[0];
        assert_eq!(n, 25);
        for i in 0..25 {
            let at = layout.at[&format!("Branch{i:03}")];
            assert!(top_left.x < at.x && at.x + NODE_W < bottom_right.x);
            assert!(top_left.y < at.y && at.y + NODE_H < bottom_right.y);
        }
        assert!(bottom_right.y < layout.at["Join"].y);
        assert!(layout.at["Split"].y + NODE_H < top_left.y);
        // No two nodes overlap.
        let mut seen = BTreeSet::new();
        for at in layout.at.values() {
            assert!(seen.insert((at.x, at.y)));
        }
    }

    #[test]
    fn nodes_carry_their_state_and_text_is_escaped() {
        let dag = fan_out(2);
        let taken = BTreeMap::from([(
            ("Split".to_owned(), "done".to_owned()),
            BTreeSet::from(["Branch000".to_owned()]),
        )]);
        let state = |s: &str| (s == "Split").then_some("done");
        let svg = render(&dag, &state, &taken).into_string();
        assert!(svg.contains(r#"aria-label="fan &lt;out&gt; v1""#));
        assert!(svg.contains(r#"class="node state-done" data-step="Split" data-state="done""#));
        assert!(svg.contains(r#"class="node state-definition" data-step="Join""#));
        assert!(svg.contains(r#"class="edge taken" data-from="Split" data-to="Branch000""#));
        assert!(svg.contains(r#"class="edge" data-from="Split" data-to="Branch001""#));
        assert!(!svg.contains("class=\"group\""), "two branches do not wrap");
    }

    #[test]
    fn edges_into_and_out_of_a_wrapped_layer_are_drawn_once() {
        let dag = fan_out(500);
        let taken = BTreeMap::from([(
            ("Split".to_owned(), "done".to_owned()),
            BTreeSet::from(["Branch007".to_owned()]),
        )]);
        let svg = render(&dag, &|_| Some("running"), &taken).into_string();
        assert_eq!(svg.matches("<path class=\"edge").count(), 2, "{svg}");
        assert!(svg.contains(r#"class="edge taken" data-from="Split" data-to="500 steps""#));
        assert!(svg.contains(r#"class="edge" data-from="500 steps" data-to="Join""#));
        assert_eq!(svg.matches("class=\"node state-running\"").count(), 502);
        assert!(svg.contains(">500 steps</text>"));
    }
}
