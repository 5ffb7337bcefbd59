//! Counts and durations over the jobs table for operators and benchmarks:
//! what a schema's queue holds ([`PgQueue::census`]) and how long jobs
//! waited from due to done. Reads only; not on the workers' hot path.

use sqlx::PgExecutor;

use super::{PgQueue, render};
use crate::error::Error;

const CENSUS: &str = r"select count(*),
    count(*) filter (where state in ('available', 'scheduled', 'executing', 'retryable')),
    count(*) filter (where state = 'executing')
from {prefix}.hephaestus_jobs";

/// `$1` the kind, `$2` the quantiles (0 to 1).
const LATENCY_QUANTILES: &str = r"select percentile_cont($2::float8[])
    within group (order by extract(epoch from completed_at - scheduled_at))
from {prefix}.hephaestus_jobs
where kind = $1 and state = 'completed'";

/// What a schema's jobs table holds: what migrating the queue component
/// down would destroy, and whether workers are busy in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueCensus {
    /// Jobs, in any state.
    pub jobs: u64,
    /// Jobs not finished yet (available, scheduled, executing, retryable).
    pub unfinished_jobs: u64,
    /// Jobs a worker is executing now.
    pub executing_jobs: u64,
}

impl PgQueue {
    /// What the jobs table holds (one statement).
    pub async fn census(&self) -> Result<QueueCensus, Error> {
        self.census_using(self.db()).await
    }

    /// [`PgQueue::census`] through any executor (a transaction that also
    /// reads the storage's census, for example).
    pub async fn census_using<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
    ) -> Result<QueueCensus, Error> {
        let (jobs, unfinished, executing): (i64, i64, i64) =
            sqlx::query_as(&render(CENSUS, self.prefix()))
                .persistent(self.persistent())
                .fetch_one(executor)
                .await?;
        Ok(QueueCensus {
            jobs: count(jobs)?,
            unfinished_jobs: count(unfinished)?,
            executing_jobs: count(executing)?,
        })
    }

    /// The `quantiles` (each from 0 to 1, interpolated) of the time in
    /// seconds from due (`scheduled_at`) to completion of the completed jobs
    /// of `kind`, in the order asked; `None` when no such job exists.
    pub async fn latency_seconds(
        &self,
        kind: &str,
        quantiles: &[f64],
    ) -> Result<Option<Vec<f64>>, Error> {
        Ok(
            sqlx::query_scalar(&render(LATENCY_QUANTILES, self.prefix()))
                .persistent(self.persistent())
                .bind(kind)
                .bind(quantiles)
                .fetch_one(self.db())
                .await?,
        )
    }

    /// Refreshes the planner's statistics of the jobs table (`analyze`), so
    /// that plans made from now on fit its size; for benchmarks and
    /// operators after a burst of inserts (autovacuum does it later).
    pub async fn analyze(&self) -> Result<(), Error> {
        let sql = render("analyze {prefix}.hephaestus_jobs", self.prefix());
        sqlx::raw_sql(&sql).execute(self.pool()).await?;
        Ok(())
    }

    /// Vacuums the jobs table and refreshes its statistics (`vacuum
    /// analyze`): the dead rows and index entries a burst of completions
    /// leaves would otherwise slow every fetch until autovacuum comes by.
    pub async fn vacuum_analyze(&self) -> Result<(), Error> {
        let sql = render("vacuum analyze {prefix}.hephaestus_jobs", self.prefix());
        sqlx::raw_sql(&sql).execute(self.pool()).await?;
        Ok(())
    }
}

fn count(n: i64) -> Result<u64, Error> {
    u64::try_from(n).map_err(|_| Error::Corrupt(format!("negative count {n}")))
}
