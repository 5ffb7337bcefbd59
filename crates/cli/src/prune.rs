//! `hephaestus prune [--older-than DURATION] [--instances]`: deletes the jobs
//! that finished (completed, discarded, cancelled) and the step results that
//! were processed more than DURATION ago, in short batches (queue-pg's
//! `PgQueue::prune`, storage-pg's `PgStore::prune_processed_in_batches`), and
//! prints how many. With `--instances` it also deletes the instances that
//! finished (completed, failed, cancelled) more than DURATION ago, with their
//! step results and jobs (the runner's `PgBackend::prune_instances`); an
//! active instance is never deleted.

use std::time::Duration;

use anyhow::{Context as _, Result};
use chrono::Utc;
use clap::Args;
use hephaestus_runner::postgres::PgBackend;
use serde_json::json;

use crate::database::{Database, DatabaseArgs, Needs};
use crate::instances::time;

/// Step results deleted per statement.
const RESULTS_BATCH: u32 = 1_000;

/// Finished instances deleted per transaction (with their results and jobs).
const INSTANCES_BATCH: u32 = 500;

/// `prune` options.
#[derive(Debug, Args)]
pub struct PruneCommand {
    #[command(flatten)]
    db: DatabaseArgs,
    /// Delete what finished longer ago than this: a number and a unit, ms,
    /// s, m, h or d (e.g. 30m, 24h, 7d).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    older_than: Duration,
    /// Also delete the instances that finished before the cut-off, with
    /// their step results and jobs (never an active instance).
    #[arg(long)]
    instances: bool,
    /// Print JSON: `{"before": TIME, "jobs": N, "step_results": N}`, plus
    /// `"instances": N` with --instances.
    #[arg(long)]
    json: bool,
}

/// A duration such as `500ms`, `90s`, `15m`, `24h` or `7d`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let expected = "expected a number and a unit: ms, s, m, h or d (e.g. 30m, 24h, 7d)";
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: {expected}"))?;
    let seconds_per = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: {expected}")),
    };
    n.checked_mul(seconds_per)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

impl PruneCommand {
    pub async fn run(self) -> Result<()> {
        let age = chrono::Duration::from_std(self.older_than)
            .ok()
            .filter(|age| *age < chrono::Duration::days(365 * 1_000))
            .with_context(|| format!("--older-than {:?} is too long", self.older_than))?;
        if hephaestus_sqlite::SqliteOptions::is_sqlite_url(&self.db.database_url) {
            return self.run_sqlite(age).await;
        }
        let db = Database::open(&self.db, Needs::Both).await?;
        let before = Utc::now() - age;
        let retention = if self.instances {
            let backend = PgBackend::new(db.store(), db.queue());
            Some(
                backend
                    .prune_instances(before, INSTANCES_BATCH)
                    .await
                    .context("pruning finished instances")?,
            )
        } else {
            None
        };
        let jobs = db
            .queue()
            .prune(before)
            .await
            .context("pruning finished jobs")?;
        let results = db
            .store()
            .prune_processed_in_batches(before, RESULTS_BATCH)
            .await
            .context("pruning processed step results")?;
        self.report(
            before,
            jobs,
            results,
            retention.map(|r| (r.instances, r.jobs, r.step_results)),
        );
        Ok(())
    }

    /// `prune` on a SQLite file.
    async fn run_sqlite(self, age: chrono::Duration) -> Result<()> {
        use hephaestus_engine_core::ports::{JobQueue as _, StepResultStore as _};
        let backend = crate::database::open_sqlite(&self.db.database_url).await?;
        let before = backend.now() - age;
        let retention = if self.instances {
            Some(
                backend
                    .prune_instances(before, INSTANCES_BATCH)
                    .await
                    .context("pruning finished instances")?,
            )
        } else {
            None
        };
        let jobs = backend
            .prune_finished(before)
            .await
            .context("pruning finished jobs")?;
        let results = backend
            .prune_processed(before)
            .await
            .context("pruning processed step results")?;
        backend.close().await;
        self.report(
            before,
            jobs,
            results,
            retention.map(|r| (r.instances, r.jobs, r.step_results)),
        );
        Ok(())
    }

    /// Prints what was pruned; `retention` is (instances, their jobs, their
    /// step results) with `--instances`.
    fn report(
        &self,
        before: chrono::DateTime<Utc>,
        jobs: u64,
        results: u64,
        retention: Option<(u64, u64, u64)>,
    ) {
        let (jobs, results) = match &retention {
            Some((_, r_jobs, r_results)) => (jobs + r_jobs, results + r_results),
            None => (jobs, results),
        };
        if self.json {
            let mut out = json!({"before": time(before), "jobs": jobs, "step_results": results});
            if let Some((instances, _, _)) = &retention {
                out["instances"] = json!(instances);
            }
            println!("{out}");
        } else if let Some((instances, _, _)) = &retention {
            println!(
                "pruned {instances} finished instances, {jobs} jobs and {results} step results (finished before {})",
                time(before)
            );
        } else {
            println!(
                "pruned {jobs} finished jobs and {results} processed step results (finished before {})",
                time(before)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_number_and_a_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        for bad in ["", "h", "10", "10 parsecs", "-1h", "1.5h"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("expected a number and a unit"), "{bad}: {err}");
        }
        assert!(
            parse_duration("99999999999999999d")
                .unwrap_err()
                .contains("too long")
        );
    }
}
