//! `GET /`: instances by status and by workflow, queue depth by queue and
//! state with the oldest waiting job, jobs finished per minute over the
//! last hour, recent failures.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{RawQuery, State};
use chrono::{DurationRound, TimeDelta, Utc};
use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_engine_core::ports::JobState;
use hephaestus_queue_pg::{FinishedCount, JobFilter};
use hephaestus_storage_pg::{Direction, InstanceQuery, Order, SortKey};
use maud::{Markup, PreEscaped, html};

use super::{ago, badge, queue, store, when};
use crate::Shared;
use crate::error::PageError;
use crate::page::{Ctx, layout};
use crate::params::{Params, query_string};

/// Failures listed.
const RECENT_FAILURES: u32 = 10;

/// The overview page.
pub(crate) async fn page(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    RawQuery(raw): RawQuery,
) -> Result<Markup, PageError> {
    Params::parse(raw.unwrap_or_default().as_bytes(), &[]).finish()?;
    let store = store(&shared);
    let queue = queue(&shared);
    let now = Utc::now();
    let counts = store
        .counts()
        .await
        .map_err(|e| PageError::port("counting instances", &e))?;
    let depth = queue
        .depth()
        .await
        .map_err(|e| PageError::queue("counting jobs", &e))?;
    let mut oldest = Vec::new();
    let mut queues: BTreeMap<String, BTreeMap<JobState, u64>> = BTreeMap::new();
    for d in &depth {
        queues
            .entry(d.queue.clone())
            .or_default()
            .insert(d.state, d.count);
    }
    for (name, states) in &queues {
        if states.get(&JobState::Available).copied().unwrap_or(0) == 0 {
            continue;
        }
        let jobs = queue
            .jobs(
                &JobFilter::default()
                    .with_states([JobState::Available])
                    .with_queue(name.clone())
                    .with_limit(1),
            )
            .await
            .map_err(|e| PageError::queue("reading the oldest waiting job", &e))?;
        if let Some(job) = jobs.into_iter().next() {
            oldest.push((name.clone(), job));
        }
    }
    let hour_ago = now - TimeDelta::hours(1);
    let finished = queue
        .finished_per_minute(hour_ago)
        .await
        .map_err(|e| PageError::queue("counting finished jobs", &e))?;
    let failures = store
        .query(
            &InstanceQuery::default()
                .with_statuses([InstanceStatus::Failed])
                .with_order(Order {
                    key: SortKey::UpdatedAt,
                    direction: Direction::Desc,
                })
                .with_limit(RECENT_FAILURES),
        )
        .await
        .map_err(|e| PageError::port("reading recent failures", &e))?;

    // Workflow (id vN) → status → count; and totals by status.
    let mut by_workflow: BTreeMap<(String, u32), BTreeMap<InstanceStatus, u64>> = BTreeMap::new();
    let mut totals: BTreeMap<InstanceStatus, u64> = BTreeMap::new();
    for c in &counts {
        *by_workflow
            .entry((c.workflow_id.clone(), c.workflow_version))
            .or_default()
            .entry(c.status)
            .or_default() += c.count;
        *totals.entry(c.status).or_default() += c.count;
    }
    let link = |workflow: Option<&str>, status: Option<InstanceStatus>| {
        let mut pairs = Vec::new();
        if let Some(w) = workflow {
            pairs.push(("workflow", w.to_owned()));
        }
        if let Some(s) = status {
            pairs.push(("status", s.as_str().to_owned()));
        }
        ctx.url(&format!("/instances?{}", query_string(pairs)))
    };
    let body = html! {
        h1 { "Overview" }
        section.cards {
            @for status in InstanceStatus::ALL {
                a.card href=(link(None, Some(status))) data-status=(status.as_str()) {
                    span.count { (totals.get(&status).copied().unwrap_or(0)) }
                    (badge(status.as_str()))
                }
            }
        }
        section {
            h2 { "Instances by workflow" }
            @if by_workflow.is_empty() {
                p.empty { "No instances yet." }
            } @else {
                table.counts {
                    thead { tr { th { "Workflow" } @for s in InstanceStatus::ALL { th { (s.as_str()) } } } }
                    tbody {
                        @for ((workflow, version), statuses) in &by_workflow {
                            tr {
                                td { a href=(link(Some(workflow), None)) { (workflow) } " v" (version) }
                                @for s in InstanceStatus::ALL {
                                    td.num {
                                        @match statuses.get(&s) {
                                            Some(n) => a href=(link(Some(workflow), Some(s))) { (n) },
                                            None => span.zero { "0" },
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Queues" }
            @if queues.is_empty() {
                p.empty { "No jobs." }
            } @else {
                table.counts {
                    thead { tr { th { "Queue" } @for s in JobState::ALL { th { (s.as_str()) } } th { "Oldest waiting" } } }
                    tbody {
                        @for (name, states) in &queues {
                            tr {
                                td { (name) }
                                @for s in JobState::ALL {
                                    td.num {
                                        @match states.get(&s) {
                                            Some(n) => a href=(ctx.url(&format!("/jobs?{}", query_string([("queue", name.clone()), ("state", s.as_str().to_owned())])))) { (n) },
                                            None => span.zero { "0" },
                                        }
                                    }
                                }
                                td {
                                    @if let Some((_, job)) = oldest.iter().find(|(q, _)| q == name) {
                                        a href=(ctx.url(&format!("/jobs/{}", job.id.0))) { "#" (job.id.0) " " (job.kind) }
                                        " due " (ago(now, job.scheduled_at)) " ago"
                                    } @else { "–" }
                                }
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Jobs finished per minute, last hour" }
            (throughput(&finished, now))
        }
        section {
            h2 { "Recent failures" }
            @if failures.instances.is_empty() {
                p.empty { "No failed instances." }
            } @else {
                table.list {
                    thead { tr { th { "Instance" } th { "Workflow" } th { "Business id" } th { "Failed step" } th { "Error" } th { "When" } } }
                    tbody {
                        @for i in &failures.instances {
                            tr {
                                td { a href=(ctx.url(&format!("/instances/{}", i.id))) { (i.id) } }
                                td { (i.workflow_id) " v" (i.workflow_version) }
                                td { (i.business_id) }
                                td { @if let Some(s) = i.failure.as_ref().and_then(|f| f.step.as_ref()) { (s) } }
                                td.error { @if let Some(f) = &i.failure { (f.error.message) } }
                                td { (when(i.updated_at)) }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout(&ctx, "Overview", "overview", body))
}

/// A bar chart of finished jobs per minute: 60 bars, completed stacked
/// under discarded and cancelled.
fn throughput(finished: &[FinishedCount], now: chrono::DateTime<Utc>) -> Markup {
    let end = now.duration_trunc(TimeDelta::minutes(1)).unwrap_or(now);
    let start = end - TimeDelta::minutes(59);
    let mut minutes: Vec<[u64; 3]> = vec![[0; 3]; 60];
    let mut total = 0;
    for f in finished {
        let Ok(i) = usize::try_from((f.minute - start).num_minutes()) else {
            continue;
        };
        let Some(slot) = minutes.get_mut(i) else {
            continue;
        };
        let k = match f.state {
            JobState::Completed => 0,
            JobState::Discarded => 1,
            _ => 2,
        };
        slot[k] += f.count;
        total += f.count;
    }
    let max = minutes
        .iter()
        .map(|m| m.iter().sum::<u64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let (w, h, bar) = (600_u64, 120_u64, 10_u64);
    let mut svg = format!(
        r#"<svg class="throughput" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {}" width="{w}" height="{}" role="img" aria-label="jobs finished per minute">"#,
        h + 16,
        h + 16
    );
    for (i, m) in minutes.iter().enumerate() {
        let x = u64::try_from(i).unwrap_or(0) * bar;
        let mut y = h;
        for (k, class) in ["completed", "discarded", "cancelled"].iter().enumerate() {
            if m[k] == 0 {
                continue;
            }
            let height = (m[k] * h).div_ceil(max);
            y = y.saturating_sub(height);
            let minute = start + TimeDelta::minutes(i64::try_from(i).unwrap_or(0));
            let _ = write!(
                svg,
                r#"<rect class="bar {class}" x="{x}" y="{y}" width="{}" height="{height}"><title>{} {class}: {}</title></rect>"#,
                bar - 2,
                minute.format("%H:%M"),
                m[k]
            );
        }
    }
    let _ = write!(
        svg,
        r#"<text class="axis" x="0" y="{}">{}</text><text class="axis" x="{}" y="{}" text-anchor="end">{} (max {max}/min)</text></svg>"#,
        h + 14,
        start.format("%H:%M"),
        w,
        h + 14,
        end.format("%H:%M")
    );
    html! {
        p { (total) " jobs finished in the last hour (completed, discarded, cancelled; pruned jobs are not counted)." }
        (PreEscaped(svg))
    }
}
