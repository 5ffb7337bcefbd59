//! `hephaestus jobs`: the job queue at a glance, through queue-pg's inspect
//! API — how many jobs each queue has in each state, how long the oldest
//! available job of each queue has been due, and the most recent errors
//! (job id, kind, attempt, message).
//!
//! Recent errors ([`hephaestus_queue_pg::PgQueue::recent_errors`]) are read from the jobs that are not completed (available,
//! scheduled, executing, retryable, discarded, cancelled), page by page; a
//! job that ended well is not a problem, and completed jobs are most of the
//! table.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use clap::Args;
use hephaestus_engine_core::ports::JobState;
use hephaestus_queue_pg::{JobFilter, RecentError};
use serde_json::{Value, json};

use crate::database::{Database, DatabaseArgs, Needs};
use crate::instances::time;

/// `jobs` options.
#[derive(Debug, Args)]
pub struct JobsCommand {
    #[command(flatten)]
    db: DatabaseArgs,
    /// How many recent errors to show.
    #[arg(long, default_value_t = 10)]
    errors: usize,
    /// Print JSON: `{"queues": [...], "recent_errors": [...]}`.
    #[arg(long)]
    json: bool,
}

/// One queue's line.
#[derive(Debug, Default)]
struct QueueView {
    counts: BTreeMap<&'static str, u64>,
    /// (job id, kind, due at) of the oldest available job.
    oldest: Option<(i64, String, DateTime<Utc>)>,
}

/// Job counts by queue and state.
fn by_queue(
    depths: impl IntoIterator<Item = (String, JobState, u64)>,
) -> BTreeMap<String, QueueView> {
    let mut queues: BTreeMap<String, QueueView> = BTreeMap::new();
    for (queue, state, count) in depths {
        queues
            .entry(queue)
            .or_default()
            .counts
            .insert(state.as_str(), count);
    }
    queues
}

impl JobsCommand {
    pub async fn run(self) -> Result<()> {
        if hephaestus_sqlite::SqliteOptions::is_sqlite_url(&self.db.database_url) {
            return self.run_sqlite().await;
        }
        let db = Database::open(&self.db, Needs::Queue).await?;
        let queue = db.queue();
        let now = queue.now();
        let mut queues = by_queue(
            queue
                .depth()
                .await
                .context("counting jobs")?
                .into_iter()
                .map(|d| (d.queue, d.state, d.count)),
        );
        for (name, view) in &mut queues {
            if view
                .counts
                .get(JobState::Available.as_str())
                .copied()
                .unwrap_or(0)
                == 0
            {
                continue;
            }
            let oldest = queue
                .jobs(
                    &JobFilter::default()
                        .with_states([JobState::Available])
                        .with_queue(name.clone())
                        .with_limit(1),
                )
                .await
                .context("reading the oldest available job")?;
            view.oldest = oldest
                .into_iter()
                .next()
                .map(|job| (job.id.0, job.kind, job.scheduled_at));
        }
        let errors = queue
            .recent_errors(self.errors)
            .await
            .context("reading jobs with errors")?;
        self.print(&queues, &errors, now);
        Ok(())
    }
}

impl JobsCommand {
    fn print(
        &self,
        queues: &BTreeMap<String, QueueView>,
        errors: &[RecentError],
        now: DateTime<Utc>,
    ) {
        if self.json {
            println!("{}", json_report(queues, errors, now));
        } else {
            print!("{}", text_report(queues, errors, now));
        }
    }

    /// `jobs` on a SQLite file.
    async fn run_sqlite(self) -> Result<()> {
        let backend = crate::database::open_sqlite(&self.db.database_url).await?;
        let now = backend.now();
        let mut queues = by_queue(
            backend
                .queue_depth()
                .await
                .context("counting jobs")?
                .into_iter()
                .map(|d| (d.queue, d.state, d.count)),
        );
        for (name, view) in &mut queues {
            view.oldest = backend
                .oldest_available(name)
                .await
                .context("reading the oldest available job")?
                .map(|job| (job.id.0, job.kind, job.scheduled_at));
        }
        let errors: Vec<RecentError> = backend
            .recent_errors(self.errors)
            .await
            .context("reading jobs with errors")?
            .into_iter()
            .map(|e| RecentError {
                job_id: e.job.id,
                kind: e.job.kind,
                queue: e.job.queue,
                state: e.job.state,
                attempt: e.error.attempt,
                at: e.error.at,
                message: e.error.error.message,
            })
            .collect();
        backend.close().await;
        self.print(&queues, &errors, now);
        Ok(())
    }
}

fn age_seconds(now: DateTime<Utc>, due: DateTime<Utc>) -> f64 {
    // Due in the future (clock skew): no age.
    (now - due).to_std().map_or(0.0, |age| age.as_secs_f64())
}

fn json_report(
    queues: &BTreeMap<String, QueueView>,
    errors: &[RecentError],
    now: DateTime<Utc>,
) -> Value {
    let queues: Vec<Value> = queues
        .iter()
        .map(|(name, view)| {
            json!({
                "queue": name,
                "counts": view.counts,
                "oldest_available": view.oldest.as_ref().map(|(id, kind, due)| json!({
                    "job_id": id,
                    "kind": kind,
                    "due_at": time(*due),
                    "age_seconds": age_seconds(now, *due),
                })),
            })
        })
        .collect();
    let errors: Vec<Value> = errors
        .iter()
        .map(|e| {
            json!({
                "job_id": e.job_id.0,
                "kind": e.kind,
                "queue": e.queue,
                "state": e.state.as_str(),
                "attempt": e.attempt,
                "at": time(e.at),
                "message": e.message,
            })
        })
        .collect();
    json!({"queues": queues, "recent_errors": errors})
}

fn text_report(
    queues: &BTreeMap<String, QueueView>,
    errors: &[RecentError],
    now: DateTime<Utc>,
) -> String {
    use std::fmt::Write as _;

    let mut out = String::new();
    if queues.is_empty() {
        out.push_str("no jobs\n");
    }
    for (name, view) in queues {
        let counts: Vec<String> = view
            .counts
            .iter()
            .map(|(state, n)| format!("{state} {n}"))
            .collect();
        let _ = writeln!(out, "queue {name}: {}", counts.join(", "));
        if let Some((id, kind, due)) = &view.oldest {
            let _ = writeln!(
                out,
                "  oldest available: job #{id} ({kind}), due {:.1}s ago",
                age_seconds(now, *due)
            );
        }
    }
    if errors.is_empty() {
        out.push_str("recent errors: none\n");
    } else {
        out.push_str("recent errors:\n");
        for e in errors {
            let _ = writeln!(
                out,
                "  {}  job #{} {} ({}, {}) attempt {}: {}",
                time(e.at),
                e.job_id.0,
                e.kind,
                e.queue,
                e.state.as_str(),
                e.attempt,
                e.message
            );
        }
    }
    out
}
