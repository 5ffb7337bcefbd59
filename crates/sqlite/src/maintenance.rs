//! Operators' maintenance: jobs of a dead worker, retention of finished
//! instances.

use chrono::{DateTime, Utc};
use hephaestus_engine_core::ports::PortError;

use crate::backend::SqliteBackend;
use crate::error::port_error;
use crate::time::micros;

/// What one [`SqliteBackend::prune_instances`] call deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InstanceRetention {
    /// Finished instances deleted.
    pub instances: u64,
    /// Their step results.
    pub step_results: u64,
    /// Their jobs.
    pub jobs: u64,
}

impl SqliteBackend {
    /// Marks every executing job's heartbeat as long gone, so the next
    /// rescue pass returns it to work: what a worker does when it takes the
    /// worker lock, since no other worker can be running them. Returns how
    /// many.
    pub(crate) async fn release_orphans(&self) -> Result<u64, PortError> {
        let mut write = self.shared.own_write().await?;
        let marked =
            sqlx::query("update hephaestus_jobs set heartbeat_at = 0 where state = 'executing'")
                .execute(write.conn())
                .await
                .map_err(port_error)?
                .rows_affected();
        write.commit().await.map_err(port_error)?;
        Ok(marked)
    }

    /// Deletes finished instances (completed, failed, cancelled) that ended
    /// before `before`, with their step results and jobs, `batch` instances
    /// per transaction. Never an active one: each batch selects by status
    /// under the write lock.
    pub async fn prune_instances(
        &self,
        before: DateTime<Utc>,
        batch: u32,
    ) -> Result<InstanceRetention, PortError> {
        let mut total = InstanceRetention::default();
        loop {
            let mut write = self.shared.own_write().await?;
            let ids: Vec<String> = sqlx::query_scalar(
                r"select id from hephaestus_instances
where status in ('completed', 'failed', 'cancelled') and updated_at < ?1
order by updated_at limit ?2",
            )
            .bind(micros(before))
            .bind(i64::from(batch.max(1)))
            .fetch_all(write.conn())
            .await
            .map_err(port_error)?;
            if ids.is_empty() {
                return Ok(total);
            }
            let list = serde_json::Value::from(ids.clone()).to_string();
            let jobs = sqlx::query(
                "delete from hephaestus_jobs where group_key in (select value from json_each(?1))",
            )
            .bind(&list)
            .execute(write.conn())
            .await
            .map_err(port_error)?
            .rows_affected();
            let results = sqlx::query(
                "delete from hephaestus_step_results where instance_id in (select value from json_each(?1))",
            )
            .bind(&list)
            .execute(write.conn())
            .await
            .map_err(port_error)?
            .rows_affected();
            let instances = sqlx::query(
                "delete from hephaestus_instances where id in (select value from json_each(?1))",
            )
            .bind(&list)
            .execute(write.conn())
            .await
            .map_err(port_error)?
            .rows_affected();
            write.commit().await.map_err(port_error)?;
            total.instances += instances;
            total.step_results += results;
            total.jobs += jobs;
        }
    }
}
