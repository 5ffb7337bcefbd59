//! Cancel by id and by predicate. Any unfinished job can be cancelled,
//! executing ones included: the job becomes `cancelled` at once (so the
//! running attempt's acknowledgement is fenced off) and its worker is told
//! to stop by a NOTIFY sent at commit (in poll-only mode, by its next
//! heartbeat).

use hephaestus_engine_core::ports::JobId;
use serde_json::Value;
use sqlx::PgConnection;

use super::PgQueue;
use crate::error::Error;
use crate::job::has_nul;

/// `$1` id, `$2` now. Returns the id and the state it had.
pub(super) const CANCEL_ONE: &str = r"with target as (
    select id, state
    from {prefix}.hephaestus_jobs
    where id = $1 and state in ('available', 'scheduled', 'executing', 'retryable')
    for update
)
update {prefix}.hephaestus_jobs as j
set state = 'cancelled', cancelled_at = $2, heartbeat_at = null
from target
where j.id = target.id
returning j.id, target.state";

/// `$1` group, `$2` args (containment, nullable), `$3` except id
/// (nullable), `$4` now. Waiting jobs through the group index, executing
/// ones through the rescue index (never more than the workers' slots).
pub(super) const CANCEL_GROUP: &str = r"with target as (
    select id, state
    from {prefix}.hephaestus_jobs
    where ((group_key = $1 and state in ('available', 'scheduled', 'retryable'))
           or (heartbeat_at is not null and state = 'executing' and group_key = $1))
      and ($2::jsonb is null or args @> $2::jsonb)
      and id is distinct from $3::bigint
    for update
)
update {prefix}.hephaestus_jobs as j
set state = 'cancelled', cancelled_at = $4, heartbeat_at = null
from target
where j.id = target.id
returning j.id, target.state";

/// `$1` now; `{live}` and `{conditions}` are built from fixed fragments with
/// binds from `$2`.
pub(super) const CANCEL_WHERE_BASE: &str = r"with target as (
    select id, state
    from {prefix}.hephaestus_jobs
    where {live}{conditions}
    for update
)
update {prefix}.hephaestus_jobs as j
set state = 'cancelled', cancelled_at = $1, heartbeat_at = null
from target
where j.id = target.id
returning j.id, target.state";

/// Every unfinished job.
const LIVE: &str = "state in ('available', 'scheduled', 'executing', 'retryable')";

/// `$1` channel, `$2` ids of cancelled executing jobs.
pub(super) const NOTIFY_CANCELLED: &str =
    r"select count(pg_notify($1::text, 'c:' || id::text)) from unnest($2::bigint[]) as id";

/// Which unfinished jobs to cancel: every given condition must hold.
///
/// A filter with a group is answered through the group index; without one
/// it scans the unfinished jobs (fine for an operator's occasional cancel,
/// not for a hot path).
///
/// Start from [`CancelFilter::group`], [`CancelFilter::args`] or
/// [`CancelFilter::meta`] and add conditions with the `with_*` methods (new
/// conditions may be added without breaking you).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct CancelFilter {
    /// In this group ([`NewJob::group`](hephaestus_engine_core::ports::NewJob::group)).
    pub group: Option<String>,
    /// Args contain this JSON (containment, `@>`).
    pub args: Option<Value>,
    /// Meta contains this JSON.
    pub meta: Option<Value>,
    /// In this queue.
    pub queue: Option<String>,
    /// Of this kind.
    pub kind: Option<String>,
    /// Not this job (for example the job doing the cancelling).
    pub except: Option<JobId>,
}

impl CancelFilter {
    /// The jobs of `group`.
    pub fn group(group: impl Into<String>) -> Self {
        Self {
            group: Some(group.into()),
            ..Self::default()
        }
    }

    /// Jobs whose args contain `args`.
    pub fn args(args: Value) -> Self {
        Self {
            args: Some(args),
            ..Self::default()
        }
    }

    /// Jobs whose meta contains `meta`.
    pub fn meta(meta: Value) -> Self {
        Self {
            meta: Some(meta),
            ..Self::default()
        }
    }

    /// Only jobs in `group` (see [`CancelFilter::group`](field@CancelFilter::group)).
    #[must_use]
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Only jobs whose args contain `args` (see [`CancelFilter::args`](field@CancelFilter::args)).
    #[must_use]
    pub fn with_args(mut self, args: Value) -> Self {
        self.args = Some(args);
        self
    }

    /// Only jobs whose meta contains `meta` (see [`CancelFilter::meta`](field@CancelFilter::meta)).
    #[must_use]
    pub fn with_meta(mut self, meta: Value) -> Self {
        self.meta = Some(meta);
        self
    }

    /// Only jobs in `queue` (see [`CancelFilter::queue`]).
    #[must_use]
    pub fn with_queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Only jobs of `kind` (see [`CancelFilter::kind`]).
    #[must_use]
    pub fn with_kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = Some(kind.into());
        self
    }

    /// Not the job `except` (see [`CancelFilter::except`]).
    #[must_use]
    pub fn with_except(mut self, except: JobId) -> Self {
        self.except = Some(except);
        self
    }
}

impl PgQueue {
    /// Cancels one unfinished job (its own transaction); `false` when it is
    /// finished or missing.
    pub async fn cancel(&self, id: JobId) -> Result<bool, Error> {
        let mut tx = self.pool().begin().await?;
        let cancelled = self.cancel_using(&mut tx, id).await?;
        tx.commit().await?;
        Ok(cancelled)
    }

    /// [`PgQueue::cancel`] on the caller's connection or transaction.
    pub async fn cancel_using(&self, conn: &mut PgConnection, id: JobId) -> Result<bool, Error> {
        let rows: Vec<(i64, String)> = sqlx::query_as(&self.sql().cancel_one)
            .persistent(self.persistent())
            .bind(id.0)
            .bind(self.now())
            .fetch_all(&mut *conn)
            .await?;
        self.notify_cancelled(conn, &rows).await?;
        Ok(!rows.is_empty())
    }

    /// Cancels every unfinished job matching `filter` (its own
    /// transaction); returns their ids.
    pub async fn cancel_where(&self, filter: &CancelFilter) -> Result<Vec<JobId>, Error> {
        let mut tx = self.pool().begin().await?;
        let ids = self.cancel_where_using(&mut tx, filter).await?;
        tx.commit().await?;
        Ok(ids)
    }

    /// [`PgQueue::cancel_where`] on the caller's connection or transaction.
    pub async fn cancel_where_using(
        &self,
        conn: &mut PgConnection,
        filter: &CancelFilter,
    ) -> Result<Vec<JobId>, Error> {
        if filter.group.as_deref().is_some_and(|g| g.contains('\0')) {
            return Err(Error::InvalidInput("U+0000 in a cancel filter".to_owned()));
        }
        for json in [&filter.args, &filter.meta].into_iter().flatten() {
            if has_nul(json) {
                return Err(Error::InvalidInput("U+0000 in a cancel filter".to_owned()));
            }
        }
        let rows: Vec<(i64, String)> = if let (Some(group), None, None, None) =
            (&filter.group, &filter.meta, &filter.queue, &filter.kind)
        {
            sqlx::query_as(&self.sql().cancel_group)
                .persistent(self.persistent())
                .bind(group)
                .bind(&filter.args)
                .bind(filter.except.map(|id| id.0))
                .bind(self.now())
                .fetch_all(&mut *conn)
                .await?
        } else {
            let mut conditions = super::Conditions::new(2);
            if filter.group.is_some() {
                conditions.add("group_key = ", "");
            }
            if filter.args.is_some() {
                conditions.add("args @> ", "");
            }
            if filter.meta.is_some() {
                conditions.add("meta @> ", "");
            }
            if filter.queue.is_some() {
                conditions.add("queue = ", "");
            }
            if filter.kind.is_some() {
                conditions.add("kind = ", "");
            }
            if filter.except.is_some() {
                conditions.add("id <> ", "");
            }
            let sql = self
                .sql()
                .cancel_where_base
                .replace("{live}", LIVE)
                .replace("{conditions}", &conditions.sql);
            let mut query = sqlx::query_as(&sql)
                .persistent(self.persistent())
                .bind(self.now());
            if let Some(group) = &filter.group {
                query = query.bind(group);
            }
            if let Some(args) = &filter.args {
                query = query.bind(args);
            }
            if let Some(meta) = &filter.meta {
                query = query.bind(meta);
            }
            if let Some(queue) = &filter.queue {
                query = query.bind(queue);
            }
            if let Some(kind) = &filter.kind {
                query = query.bind(kind);
            }
            if let Some(except) = filter.except {
                query = query.bind(except.0);
            }
            query.fetch_all(&mut *conn).await?
        };
        self.notify_cancelled(conn, &rows).await?;
        Ok(rows.into_iter().map(|(id, _)| JobId(id)).collect())
    }

    /// Tells the workers of cancelled executing jobs to stop (at commit).
    async fn notify_cancelled(
        &self,
        conn: &mut PgConnection,
        rows: &[(i64, String)],
    ) -> Result<(), Error> {
        let executing: Vec<i64> = rows
            .iter()
            .filter(|(_, state)| state == "executing")
            .map(|(id, _)| *id)
            .collect();
        if !executing.is_empty() {
            sqlx::query(&self.sql().notify_cancelled)
                .persistent(self.persistent())
                .bind(self.channel())
                .bind(&executing)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_filter_setters_set_their_own_condition() {
        let filter = CancelFilter::group("g")
            .with_args(serde_json::json!({"a": 1}))
            .with_meta(serde_json::json!({"m": 2}))
            .with_queue("q")
            .with_kind("k")
            .with_except(JobId(3));
        assert_eq!(
            filter,
            CancelFilter {
                group: Some("g".to_owned()),
                args: Some(serde_json::json!({"a": 1})),
                meta: Some(serde_json::json!({"m": 2})),
                queue: Some("q".to_owned()),
                kind: Some("k".to_owned()),
                except: Some(JobId(3)),
            }
        );
        assert_eq!(
            CancelFilter::meta(serde_json::json!({"m": 2})).with_group("g"),
            CancelFilter {
                group: Some("g".to_owned()),
                meta: Some(serde_json::json!({"m": 2})),
                ..CancelFilter::default()
            }
        );
    }
}
