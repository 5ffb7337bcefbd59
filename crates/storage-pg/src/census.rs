//! Counts and durations over the storage tables for operators and
//! benchmarks: what a schema holds ([`PgStore::census`]), how many
//! instances are still active, how a batch of instances ended, and how long
//! they took. Reads only; none of them is on the runner's hot path.

use std::collections::BTreeMap;

use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_engine_core::ports::PortError;
use sqlx::PgExecutor;

use crate::error::port_error;
use crate::store::PgStore;

const CENSUS: &str = r"select
    (select count(*) from {prefix}.hephaestus_instances),
    (select count(*) from {prefix}.hephaestus_instances
        where status in ('pending', 'running', 'waiting')),
    (select count(*) from {prefix}.hephaestus_step_results)";

/// Through the partial index of active instances (its predicate, written
/// out, so the planner can use it).
const ACTIVE_COUNT: &str = r"select count(*) from {prefix}.hephaestus_instances
where status in ('pending', 'running', 'waiting')";

/// `$1` the business id prefix, taken literally.
const STATUS_COUNTS: &str = r"select status, count(*) from {prefix}.hephaestus_instances
where starts_with(business_id, $1)
group by status";

/// `$1` the business id prefix, `$2` the quantiles (0 to 1). A completed
/// instance's `updated_at` is its end (nothing writes it afterwards).
const COMPLETION_QUANTILES: &str = r"select percentile_cont($2::float8[])
    within group (order by extract(epoch from updated_at - inserted_at))
from {prefix}.hephaestus_instances
where status = 'completed' and starts_with(business_id, $1)";

/// What a schema's storage tables hold: what migrating the storage
/// component down would destroy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StorageCensus {
    /// Instances, in any status.
    pub instances: u64,
    /// Instances pending, running or waiting.
    pub active_instances: u64,
    /// Step results, processed or not.
    pub step_results: u64,
}

impl PgStore {
    /// What the storage tables hold (one statement).
    pub async fn census(&self) -> Result<StorageCensus, PortError> {
        self.census_using(self.pooled()).await
    }

    /// [`PgStore::census`] through any executor (a transaction that also reads
    /// the queue's census, for example).
    pub async fn census_using<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
    ) -> Result<StorageCensus, PortError> {
        let (instances, active, results): (i64, i64, i64) = sqlx::query_as(&self.render(CENSUS))
            .persistent(self.persistent())
            .fetch_one(executor)
            .await
            .map_err(port_error)?;
        Ok(StorageCensus {
            instances: count(instances)?,
            active_instances: count(active)?,
            step_results: count(results)?,
        })
    }

    /// How many instances are active (pending, running or waiting), counted
    /// through the partial index of active instances: cheap enough to poll
    /// while a burst of instances drains.
    pub async fn active_count(&self) -> Result<u64, PortError> {
        let active: i64 = sqlx::query_scalar(&self.render(ACTIVE_COUNT))
            .persistent(self.persistent())
            .fetch_one(self.pooled())
            .await
            .map_err(port_error)?;
        count(active)
    }

    /// How many instances whose business id starts with `business_id_prefix`
    /// (taken literally, no pattern) are in each status; statuses with none
    /// are left out.
    pub async fn status_counts(
        &self,
        business_id_prefix: &str,
    ) -> Result<BTreeMap<InstanceStatus, u64>, PortError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(&self.render(STATUS_COUNTS))
            .persistent(self.persistent())
            .bind(business_id_prefix)
            .fetch_all(self.pooled())
            .await
            .map_err(port_error)?;
        rows.into_iter()
            .map(|(status, n)| {
                let status = status
                    .parse()
                    .map_err(|e| PortError::Corrupt(format!("instance status: {e}")))?;
                Ok((status, count(n)?))
            })
            .collect()
    }

    /// The `quantiles` (each from 0 to 1, interpolated) of the time in
    /// seconds from start to end of the completed instances whose business
    /// id starts with `business_id_prefix` (taken literally), in the order
    /// asked; `None` when no such instance exists.
    pub async fn completion_seconds(
        &self,
        business_id_prefix: &str,
        quantiles: &[f64],
    ) -> Result<Option<Vec<f64>>, PortError> {
        sqlx::query_scalar(&self.render(COMPLETION_QUANTILES))
            .persistent(self.persistent())
            .bind(business_id_prefix)
            .bind(quantiles)
            .fetch_one(self.pooled())
            .await
            .map_err(port_error)
    }

    /// `template` with this store's quoted schema for `{prefix}`.
    fn render(&self, template: &str) -> String {
        template.replace("{prefix}", &self.prefix().quoted())
    }
}

fn count(n: i64) -> Result<u64, PortError> {
    u64::try_from(n).map_err(|_| PortError::Corrupt(format!("negative count {n}")))
}
