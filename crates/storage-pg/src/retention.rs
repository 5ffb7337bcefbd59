//! Instance retention: finished instances (completed, failed, cancelled)
//! that ended before a cut-off are deleted with their step results, in
//! short batches. An active instance is never deleted: the statement
//! selects by status and locks each row it deletes (`for update skip
//! locked`), so an instance restarted meanwhile (`instances retry`) is
//! either skipped or deleted before its restart could commit, never
//! deleted while active.

use chrono::{DateTime, Utc};
use hephaestus_engine_core::ports::PortError;
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::error::port_error;
use crate::store::PgStore;

/// `$1` ended before, `$2` batch size. The instance's finish time is its
/// `updated_at` (nothing writes a finished instance but its end).
const PRUNE_FINISHED: &str = r"with doomed as (
    select id
    from {prefix}.hephaestus_instances
    where status in ('completed', 'failed', 'cancelled') and updated_at < $1
    order by updated_at
    limit $2
    for update skip locked
),
results as (
    delete from {prefix}.hephaestus_step_results as r
    using doomed
    where r.instance_id = doomed.id
    returning 1
),
deleted as (
    delete from {prefix}.hephaestus_instances as i
    using doomed
    where i.id = doomed.id
    returning i.id
)
select (select array_agg(id) from deleted), (select count(*) from results)";

/// One batch of instance retention.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PrunedInstances {
    /// The instances deleted.
    pub instances: Vec<Uuid>,
    /// Their step results deleted with them.
    pub step_results: u64,
}

impl PgStore {
    /// Deletes at most `batch` finished instances that ended before
    /// `before`, and their step results, through `executor` (run it in the
    /// transaction that also deletes their jobs). Never an active one.
    pub async fn prune_finished_instances_using<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
        before: DateTime<Utc>,
        batch: u32,
    ) -> Result<PrunedInstances, PortError> {
        let sql = PRUNE_FINISHED.replace("{prefix}", &self.prefix().quoted());
        let (ids, results): (Option<Vec<Uuid>>, i64) = sqlx::query_as(&sql)
            .persistent(self.persistent())
            .bind(before)
            .bind(i64::from(batch.max(1)))
            .fetch_one(executor)
            .await
            .map_err(port_error)?;
        Ok(PrunedInstances {
            instances: ids.unwrap_or_default(),
            step_results: u64::try_from(results).unwrap_or(0),
        })
    }
}
