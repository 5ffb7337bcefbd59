//! The reconciler's page read: which active instances may need a repair.
//!
//! The one statement of this crate that reads a table it does not own: the
//! queue's `hephaestus_jobs` (hephaestus-queue-pg), which the PostgreSQL
//! backend keeps in the same schema as the instances and step results. It
//! reads the job columns `group_key` (an instance's id as text), `kind`,
//! `state`, `heartbeat_at` and `args` (`step`, `activation`); the queue's
//! migrations own their definition. It writes nothing.

use hephaestus_engine_core::ports::PortError;
use uuid::Uuid;

use crate::error::port_error;
use crate::store::PgStore;

/// `$1` ids below (nullable), `$2` page size, `$3` to `$5` the advance,
/// execute and timer job kinds, `$6` the `Done` step.
///
/// It finds the instances that may need a repair by the rules of the
/// reconciler's check (a pending instance without any live job; unprocessed
/// results without a live advance; an active step without a live execution
/// or an unprocessed result of its activation; a waiting step with a timer
/// but no live timer job), without decoding any state. Malformed JSON is
/// treated as "nothing to check" there: a row that cannot be decoded is
/// reported by the check that reads it, never fails the page.
const RECONCILE_PAGE: &str = r"with page as (
    select i.id, i.status, i.workflow_id, i.workflow_version,
           case when jsonb_typeof(i.state -> 'steps') = 'object'
                then i.state -> 'steps' else '{}'::jsonb end as steps
    from {prefix}.hephaestus_instances as i
    where i.status in ('pending', 'running', 'waiting')
      and ($1::uuid is null or i.id < $1::uuid)
    order by i.id desc
    limit $2
),
live as (
    select j.group_key, j.kind, j.args
    from {prefix}.hephaestus_jobs as j
    where j.group_key in (select p.id::text from page as p)
      and j.state in ('available', 'scheduled', 'retryable')
    union all
    select j.group_key, j.kind, j.args
    from {prefix}.hephaestus_jobs as j
    where j.heartbeat_at is not null and j.state = 'executing'
      and j.group_key in (select p.id::text from page as p)
),
live_by_instance as (
    select group_key,
           bool_or(kind = $3) as has_advance,
           array_agg(kind || ':' || coalesce(args #>> '{step}', '') || ':'
                     || coalesce(args #>> '{activation}', '')) as keys
    from live
    group by group_key
),
inbox as (
    select r.instance_id, array_agg(r.step_id || ':' || r.activation) as keys
    from {prefix}.hephaestus_step_results as r
    where r.instance_id in (select p.id from page as p) and r.processed_at is null
    group by r.instance_id
)
select p.id, p.workflow_id, p.workflow_version,
    case when p.status = 'pending' then l.group_key is null
    else
        (b.instance_id is not null and not coalesce(l.has_advance, false))
        or exists (
            select 1 from jsonb_each(p.steps) as s(step, st)
            where jsonb_typeof(s.st) = 'object' and s.step <> $6
              and ((s.st ->> 'status' = 'active'
                    and not coalesce(l.keys, '{}')
                        @> array[$4 || ':' || s.step || ':' || coalesce(s.st ->> 'activation', '')]
                    and not coalesce(b.keys, '{}')
                        @> array[s.step || ':' || coalesce(s.st ->> 'activation', '')])
                or (s.st ->> 'status' = 'waiting'
                    and jsonb_typeof(s.st -> 'timer') = 'object'
                    and not coalesce(l.keys, '{}')
                        @> array[$5 || ':' || s.step || ':' || coalesce(s.st ->> 'activation', '')])))
    end
from page as p
left join live_by_instance as l on l.group_key = p.id::text
left join inbox as b on b.instance_id = p.id
order by p.id desc";

/// What one page of [`PgStore::reconcile_page`] reads: where it starts,
/// how long it is, and the runner's names the statement matches jobs and
/// steps by (this crate knows no job kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconcilePage<'a> {
    /// Only instances whose id is below this one (`None`: from the top).
    pub before: Option<Uuid>,
    /// At most this many instances (at least 1).
    pub limit: u32,
    /// The job kind that advances an instance (applies its step results).
    pub advance_kind: &'a str,
    /// The job kind that executes one step activation.
    pub execute_kind: &'a str,
    /// The job kind that fires a waiting step's timer.
    pub timer_kind: &'a str,
    /// The id of the `Done` step, which has no job of its own.
    pub done_step: &'a str,
}

/// One active instance of a [`PgStore::reconcile_page`] page.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReconcileCandidate {
    /// The instance.
    pub id: Uuid,
    /// Its workflow.
    pub workflow_id: String,
    /// Its workflow version.
    pub workflow_version: u32,
    /// Whether it may need a repair: a pending instance without a live job,
    /// unprocessed results without a live advance job, an active step
    /// without a live execute job or an unprocessed result, a waiting step
    /// with a timer but no live timer job.
    pub candidate: bool,
}

impl PgStore {
    /// One page of active instances (pending, running, waiting), newest id
    /// first, each marked whether it may need a repair. One statement; it
    /// reads the instances, the unprocessed step results and the live jobs
    /// of the queue's `hephaestus_jobs` table in this store's schema (see the
    /// module docs), and decodes no instance state.
    pub async fn reconcile_page(
        &self,
        page: &ReconcilePage<'_>,
    ) -> Result<Vec<ReconcileCandidate>, PortError> {
        let sql = RECONCILE_PAGE.replace("{prefix}", &self.prefix().quoted());
        let rows: Vec<(Uuid, String, i32, bool)> = sqlx::query_as(&sql)
            .persistent(self.persistent())
            .bind(page.before)
            .bind(i64::from(page.limit.max(1)))
            .bind(page.advance_kind)
            .bind(page.execute_kind)
            .bind(page.timer_kind)
            .bind(page.done_step)
            .fetch_all(self.pooled())
            .await
            .map_err(port_error)?;
        rows.into_iter()
            .map(|(id, workflow_id, version, candidate)| {
                Ok(ReconcileCandidate {
                    id,
                    workflow_id,
                    workflow_version: u32::try_from(version).map_err(|_| {
                        PortError::Corrupt(format!("instance {id}: workflow version {version}"))
                    })?,
                    candidate,
                })
            })
            .collect()
    }
}
