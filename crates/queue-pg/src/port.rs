//! The engine-core [`JobQueue`] port on [`PgQueue`]. The unit of work is a
//! `sqlx::Transaction<'static, Postgres>`, the same type storage-pg uses, so
//! a runner puts storage and queue writes in one transaction.

use chrono::{DateTime, Utc};
use hephaestus_engine_core::ports::{
    Enqueued, JobId, JobInfo, JobLease, JobMatch, JobQueue, NewJob, PortError, UnitOfWork,
};
use hephaestus_engine_core::step::StepError;
use sqlx::{Postgres, Transaction};

use crate::error::Error;
use crate::queue::{CancelFilter, PgQueue};

/// The `attempted_by` of jobs fetched through the port.
const PORT_WORKER: &str = "port";

#[async_trait::async_trait]
impl UnitOfWork for PgQueue {
    type Tx = Transaction<'static, Postgres>;

    async fn begin(&self) -> Result<Self::Tx, PortError> {
        Ok(self.pool().begin().await.map_err(Error::from)?)
    }

    async fn commit(&self, tx: Self::Tx) -> Result<(), PortError> {
        Ok(tx.commit().await.map_err(Error::from)?)
    }
}

#[async_trait::async_trait]
impl JobQueue for PgQueue {
    async fn enqueue(
        &self,
        tx: &mut Self::Tx,
        jobs: &[NewJob],
    ) -> Result<Vec<Enqueued>, PortError> {
        Ok(self.insert_many_using(tx, jobs).await?)
    }

    async fn cancel(&self, tx: &mut Self::Tx, id: JobId) -> Result<bool, PortError> {
        Ok(self.cancel_using(tx, id).await?)
    }

    async fn cancel_matching(
        &self,
        tx: &mut Self::Tx,
        matching: &JobMatch,
        except: Option<JobId>,
    ) -> Result<u64, PortError> {
        let filter = CancelFilter {
            group: matching.group.clone(),
            args: matching.args.clone(),
            except,
            ..CancelFilter::default()
        };
        let ids = self.cancel_where_using(tx, &filter).await?;
        Ok(u64::try_from(ids.len()).unwrap_or(u64::MAX))
    }

    async fn fetch(
        &self,
        queue: &str,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<JobLease>, PortError> {
        Ok(PgQueue::fetch(self, queue, limit, now, PORT_WORKER).await?)
    }

    async fn complete(&self, tx: &mut Self::Tx, lease: &JobLease) -> Result<bool, PortError> {
        Ok(self.complete_using(tx, lease).await?)
    }

    async fn retry(
        &self,
        tx: &mut Self::Tx,
        lease: &JobLease,
        error: &StepError,
        retry_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool, PortError> {
        Ok(self.retry_using(tx, lease, error, retry_at, now).await?)
    }

    async fn discard(
        &self,
        tx: &mut Self::Tx,
        lease: &JobLease,
        error: &StepError,
        now: DateTime<Utc>,
    ) -> Result<bool, PortError> {
        Ok(self.discard_using(tx, lease, error, now).await?)
    }

    async fn prune_finished(&self, before: DateTime<Utc>) -> Result<u64, PortError> {
        Ok(self.prune(before).await?)
    }

    async fn job(&self, id: JobId) -> Result<Option<JobInfo>, PortError> {
        Ok(PgQueue::job(self, id).await?.map(|job| job.info()))
    }

    async fn heartbeat(&self, leases: &[(JobId, u32)]) -> Result<Vec<JobId>, PortError> {
        Ok(PgQueue::heartbeat(self, leases).await?)
    }

    async fn stale(&self, before: DateTime<Utc>, limit: u32) -> Result<Vec<JobLease>, PortError> {
        Ok(PgQueue::stale_jobs(self, before, limit)
            .await?
            .into_iter()
            .map(|s| s.lease)
            .collect())
    }

    async fn live_jobs(&self, matching: &JobMatch) -> Result<Vec<JobInfo>, PortError> {
        Ok(PgQueue::live_jobs(self, matching)
            .await?
            .iter()
            .map(crate::Job::info)
            .collect())
    }
}
