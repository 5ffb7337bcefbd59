//! The operators' query API: typed filters pushed into SQL, ordering and keyset
//! pagination.

use chrono::{DateTime, Utc};
use hephaestus_engine_core::business_id::BusinessId;
use hephaestus_engine_core::ids::WorkflowId;
use hephaestus_engine_core::instance::{Instance, InstanceStatus};
use hephaestus_engine_core::ports::PortError;
use sqlx::{PgExecutor, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use crate::error::port_error;
use crate::instances::decode_instance;
use crate::store::PgStore;

/// Which instances to return, in which order, from where. Every filter is ANDed; a field
/// left at its default does not filter. The type makes unknown filters impossible.
///
/// ```
/// use hephaestus_storage_pg::{Direction, InstanceQuery, Order, SortKey, TimeRange};
/// use hephaestus_engine_core::InstanceStatus;
///
/// let stuck = InstanceQuery::default()
///     .with_statuses(InstanceStatus::ACTIVE)
///     .with_workflow_family("shop.orders")
///     .with_updated(TimeRange { until: Some(chrono::Utc::now() - chrono::TimeDelta::hours(1)), ..TimeRange::default() })
///     .with_order(Order { key: SortKey::UpdatedAt, direction: Direction::Asc })
///     .with_limit(100);
/// # let _ = stuck;
/// ```
///
/// Start from [`InstanceQuery::default`] (every instance, newest first) and
/// add what you need with the `with_*` methods (new filters may be added
/// without breaking you).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InstanceQuery {
    /// Instance ids among these (empty = any).
    pub ids: Vec<Uuid>,
    /// Exact business id.
    pub business_id: Option<BusinessId>,
    /// Status among these (empty = any).
    pub statuses: Vec<InstanceStatus>,
    /// Exact workflow id.
    pub workflow_id: Option<WorkflowId>,
    /// Exact version.
    pub workflow_version: Option<u32>,
    /// Workflow ids starting with this text, taken literally (`%` and `_` are escaped):
    /// the original's `workflow_family` filter.
    pub workflow_family: Option<String>,
    /// Created (`inserted_at`) within this range.
    pub inserted: TimeRange,
    /// Last changed (`updated_at`) within this range.
    pub updated: TimeRange,
    /// The order of the results.
    pub order: Order,
    /// Continue after this position (from [`Page::next`]).
    pub after: Option<Cursor>,
    /// At most this many (`None` = no limit).
    pub limit: Option<u32>,
}

impl InstanceQuery {
    /// Only the instances with one of `ids` (see [`InstanceQuery::ids`]).
    #[must_use]
    pub fn with_ids(mut self, ids: impl IntoIterator<Item = Uuid>) -> Self {
        self.ids = ids.into_iter().collect();
        self
    }

    /// Only the instance with `business_id` (see [`InstanceQuery::business_id`]).
    #[must_use]
    pub fn with_business_id(mut self, business_id: BusinessId) -> Self {
        self.business_id = Some(business_id);
        self
    }

    /// Only instances with one of `statuses` (see [`InstanceQuery::statuses`]).
    #[must_use]
    pub fn with_statuses(mut self, statuses: impl IntoIterator<Item = InstanceStatus>) -> Self {
        self.statuses = statuses.into_iter().collect();
        self
    }

    /// Only instances of `workflow_id` (see [`InstanceQuery::workflow_id`]).
    #[must_use]
    pub fn with_workflow_id(mut self, workflow_id: WorkflowId) -> Self {
        self.workflow_id = Some(workflow_id);
        self
    }

    /// Only instances of version `version` (see [`InstanceQuery::workflow_version`]).
    #[must_use]
    pub fn with_workflow_version(mut self, version: u32) -> Self {
        self.workflow_version = Some(version);
        self
    }

    /// Only instances whose workflow id starts with `prefix` (see
    /// [`InstanceQuery::workflow_family`]).
    #[must_use]
    pub fn with_workflow_family(mut self, prefix: impl Into<String>) -> Self {
        self.workflow_family = Some(prefix.into());
        self
    }

    /// Only instances created within `range` (see [`InstanceQuery::inserted`]).
    #[must_use]
    pub fn with_inserted(mut self, range: TimeRange) -> Self {
        self.inserted = range;
        self
    }

    /// Only instances last changed within `range` (see [`InstanceQuery::updated`]).
    #[must_use]
    pub fn with_updated(mut self, range: TimeRange) -> Self {
        self.updated = range;
        self
    }

    /// Returns the instances in `order` (see [`InstanceQuery::order`]).
    #[must_use]
    pub fn with_order(mut self, order: Order) -> Self {
        self.order = order;
        self
    }

    /// Continues after `cursor` (see [`InstanceQuery::after`]).
    #[must_use]
    pub fn with_after(mut self, cursor: Cursor) -> Self {
        self.after = Some(cursor);
        self
    }

    /// Returns at most `limit` instances (see [`InstanceQuery::limit`]).
    #[must_use]
    pub fn with_limit(mut self, limit: u32) -> Self {
        self.limit = Some(limit);
        self
    }
}

/// A half-open time range `[from, until)`; an absent bound does not limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeRange {
    /// Inclusive lower bound.
    pub from: Option<DateTime<Utc>>,
    /// Exclusive upper bound.
    pub until: Option<DateTime<Utc>>,
}

/// What results are ordered by; ties (equal times) are broken by id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum SortKey {
    /// The id: UUID v7 ids are time-ordered, so this is creation order.
    #[default]
    Id,
    /// `inserted_at` (the instance's `created_at`), then id.
    InsertedAt,
    /// `updated_at`, then id.
    UpdatedAt,
}

/// Ascending or descending.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Oldest first.
    Asc,
    /// Newest first.
    #[default]
    Desc,
}

/// An order: a key and a direction. The default is newest first by id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Order {
    /// The key.
    pub key: SortKey,
    /// The direction.
    pub direction: Direction,
}

/// A position in an ordered result: the page continues strictly after it (keyset
/// pagination, stable under concurrent inserts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    key: SortKey,
    at: Option<DateTime<Utc>>,
    id: Uuid,
}

impl Cursor {
    /// The position of `instance` in an order by `key`.
    pub fn after(instance: &Instance, key: SortKey) -> Self {
        let at = match key {
            SortKey::Id => None,
            SortKey::InsertedAt => Some(instance.created_at),
            SortKey::UpdatedAt => Some(instance.updated_at),
        };
        Self {
            key,
            at,
            id: instance.id,
        }
    }

    /// The id of the row this cursor stands after.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The position of the instance `id` in the order by id (a cursor that
    /// needs no read, even of an instance that cannot be decoded).
    pub fn after_id(id: Uuid) -> Self {
        Self::at_id(SortKey::Id, id)
    }

    pub(crate) fn at_id(key: SortKey, id: Uuid) -> Self {
        Self { key, at: None, id }
    }

    /// The order key this cursor belongs to.
    pub fn key(&self) -> SortKey {
        self.key
    }
}

/// One page of a query.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Page {
    /// The instances, in the query's order.
    pub instances: Vec<Instance>,
    /// Rows of the page whose stored state cannot be decoded, in the query's
    /// order: reported and skipped, so one bad row never hides the others.
    pub undecodable: Vec<Undecodable>,
    /// Where the next page starts; `None` when this is the last page.
    pub next: Option<Cursor>,
}

/// An instance row that cannot be decoded: its id and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Undecodable {
    /// The instance.
    pub id: Uuid,
    /// The decoding error (which column, and why).
    pub error: String,
}

/// How many instances of a workflow version are in a status ([`PgStore::counts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InstanceCount {
    /// The workflow id.
    pub workflow_id: String,
    /// The version.
    pub workflow_version: u32,
    /// The status.
    pub status: InstanceStatus,
    /// How many.
    pub count: u64,
}

/// Escapes `%`, `_` and `\` for a `like .. escape '\'` pattern.
pub(crate) fn like_prefix(prefix: &str) -> String {
    let mut pattern = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// The `where`, `order by` and `limit` clauses of `query`, appended to `select`.
/// `fetch` rows at most (`None` = no limit).
pub(crate) fn build<'a>(
    select: &str,
    query: &'a InstanceQuery,
    fetch: Option<i64>,
) -> Result<QueryBuilder<'a, Postgres>, PortError> {
    let mut sql = QueryBuilder::new(select);
    sql.push(" where true");
    if !query.ids.is_empty() {
        sql.push(" and i.id = any(")
            .push_bind(query.ids.clone())
            .push(")");
    }
    if let Some(business_id) = &query.business_id {
        sql.push(" and i.business_id = ")
            .push_bind(business_id.as_str());
    }
    if !query.statuses.is_empty() {
        let statuses: Vec<&str> = query.statuses.iter().map(|s| s.as_str()).collect();
        sql.push(" and i.status = any(")
            .push_bind(statuses)
            .push(")");
    }
    if let Some(workflow_id) = &query.workflow_id {
        sql.push(" and i.workflow_id = ")
            .push_bind(workflow_id.as_str());
    }
    if let Some(version) = query.workflow_version {
        match i32::try_from(version) {
            Ok(version) => {
                sql.push(" and i.workflow_version = ").push_bind(version);
            }
            // No stored version is that large.
            Err(_) => {
                sql.push(" and false");
            }
        }
    }
    if let Some(family) = &query.workflow_family {
        crate::json::check_text("workflow family", family)?;
        sql.push(" and i.workflow_id like ")
            .push_bind(like_prefix(family))
            .push(r" escape '\'");
    }
    for (column, range) in [
        ("i.inserted_at", &query.inserted),
        ("i.updated_at", &query.updated),
    ] {
        if let Some(from) = range.from {
            sql.push(format_args!(" and {column} >= ")).push_bind(from);
        }
        if let Some(until) = range.until {
            sql.push(format_args!(" and {column} < ")).push_bind(until);
        }
    }
    let column = match query.order.key {
        SortKey::Id => None,
        SortKey::InsertedAt => Some("i.inserted_at"),
        SortKey::UpdatedAt => Some("i.updated_at"),
    };
    let (cmp, dir) = match query.order.direction {
        Direction::Asc => (">", "asc"),
        Direction::Desc => ("<", "desc"),
    };
    if let Some(cursor) = &query.after {
        if cursor.key != query.order.key {
            return Err(PortError::InvalidInput(format!(
                "a cursor of an order by {:?} continues an order by {:?}",
                cursor.key, query.order.key
            )));
        }
        match (column, cursor.at) {
            (None, _) => {
                sql.push(format_args!(" and i.id {cmp} "))
                    .push_bind(cursor.id);
            }
            (Some(column), Some(at)) => {
                sql.push(format_args!(" and ({column}, i.id) {cmp} ("))
                    .push_bind(at)
                    .push(", ")
                    .push_bind(cursor.id)
                    .push(")");
            }
            (Some(_), None) => {
                return Err(PortError::InvalidInput(
                    "a cursor without a time continues an order by time".to_owned(),
                ));
            }
        }
    }
    match column {
        None => sql.push(format_args!(" order by i.id {dir}")),
        Some(column) => sql.push(format_args!(" order by {column} {dir}, i.id {dir}")),
    };
    if let Some(fetch) = fetch {
        sql.push(" limit ").push_bind(fetch);
    }
    Ok(sql)
}

impl PgStore {
    /// Instances matching `query`, one page at a time. The rows are fetched in one
    /// statement (one more than the limit, to know whether a next page exists).
    pub async fn query(&self, query: &InstanceQuery) -> Result<Page, PortError> {
        self.query_using(self.pooled(), query).await
    }

    /// [`PgStore::query`] through any executor.
    pub async fn query_using<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
        query: &InstanceQuery,
    ) -> Result<Page, PortError> {
        let rows = self.run_query(executor, query, true).await?;
        let next = if rows.more { rows.last } else { None };
        Ok(Page {
            instances: rows.instances,
            undecodable: rows.undecodable,
            next,
        })
    }

    /// How many instances match `query`'s filters (its `after` cursor included,
    /// its `limit` ignored): what a bulk action over a filter would touch.
    pub async fn count(&self, query: &InstanceQuery) -> Result<u64, PortError> {
        let mut sql = build(&self.sql.count_instances, query, None)?;
        sql.push(") counted");
        let count: i64 = sql
            .build_query_scalar()
            .persistent(self.persistent())
            .fetch_one(self.pooled())
            .await
            .map_err(port_error)?;
        u64::try_from(count).map_err(|_| PortError::Corrupt(format!("negative count {count}")))
    }

    /// How many instances each workflow version has in each status (statuses with
    /// none left out), by workflow, version and status.
    pub async fn counts(&self) -> Result<Vec<InstanceCount>, PortError> {
        let rows: Vec<(String, i32, String, i64)> = sqlx::query_as(&self.sql.instance_counts)
            .persistent(self.persistent())
            .fetch_all(self.pooled())
            .await
            .map_err(port_error)?;
        rows.into_iter()
            .map(|(workflow_id, version, status, count)| {
                Ok(InstanceCount {
                    workflow_id,
                    workflow_version: u32::try_from(version)
                        .map_err(|_| PortError::Corrupt(format!("workflow version {version}")))?,
                    status: status
                        .parse()
                        .map_err(|e| PortError::Corrupt(format!("instance status: {e}")))?,
                    count: u64::try_from(count)
                        .map_err(|_| PortError::Corrupt(format!("negative count {count}")))?,
                })
            })
            .collect()
    }

    /// Runs `query`; with `peek`, fetches one extra row and reports whether there was
    /// one (it is not returned). A row that cannot be decoded is reported in
    /// `undecodable` and skipped; the cursor still moves past it.
    pub(crate) async fn run_query<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
        query: &InstanceQuery,
        peek: bool,
    ) -> Result<QueryRows, PortError> {
        let mut out = QueryRows::default();
        if query.limit == Some(0) {
            return Ok(out);
        }
        let limit = query.limit.map(i64::from);
        let fetch = limit.map(|l| if peek { l + 1 } else { l });
        let mut sql = build(&self.sql.select_instances, query, fetch)?;
        let mut rows = sql
            .build()
            .persistent(self.persistent())
            .fetch_all(executor)
            .await
            .map_err(port_error)?;
        if let Some(limit) = limit.and_then(|l| usize::try_from(l).ok())
            && rows.len() > limit
        {
            out.more = true;
            rows.truncate(limit);
        }
        for row in &rows {
            match decode_instance(row) {
                Ok(instance) => {
                    out.last = Some(Cursor::after(&instance, query.order.key));
                    out.instances.push(instance);
                }
                Err(error) => {
                    let id: Uuid = row.try_get("id").map_err(port_error)?;
                    let at = match query.order.key {
                        SortKey::Id => None,
                        SortKey::InsertedAt => {
                            Some(row.try_get("inserted_at").map_err(port_error)?)
                        }
                        SortKey::UpdatedAt => Some(row.try_get("updated_at").map_err(port_error)?),
                    };
                    out.last = Some(Cursor {
                        key: query.order.key,
                        at,
                        id,
                    });
                    tracing::warn!(instance_id = %id, error = %error, "instance cannot be decoded; skipped");
                    out.undecodable.push(Undecodable {
                        id,
                        error: error.to_string(),
                    });
                }
            }
        }
        Ok(out)
    }
}

/// What [`PgStore::run_query`] read.
#[derive(Debug, Default)]
pub(crate) struct QueryRows {
    pub(crate) instances: Vec<Instance>,
    pub(crate) undecodable: Vec<Undecodable>,
    /// A row beyond the limit exists.
    pub(crate) more: bool,
    /// The position of the last row read (decodable or not).
    pub(crate) last: Option<Cursor>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SELECT: &str = "select i.id from t i";

    fn sql(query: &InstanceQuery) -> String {
        build(SELECT, query, Some(3)).unwrap().sql().to_owned()
    }

    #[test]
    fn query_setters_set_their_own_filter() {
        let at = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
        let inserted = TimeRange {
            from: Some(at(1)),
            until: Some(at(2)),
        };
        let updated = TimeRange {
            from: Some(at(3)),
            until: None,
        };
        let order = Order {
            key: SortKey::InsertedAt,
            direction: Direction::Asc,
        };
        let cursor = Cursor::after_id(Uuid::from_u128(7));
        let query = InstanceQuery::default()
            .with_ids([Uuid::from_u128(1)])
            .with_business_id(BusinessId::parse("order::1").unwrap())
            .with_statuses([InstanceStatus::Waiting])
            .with_workflow_id(WorkflowId::new("orders").unwrap())
            .with_workflow_version(2)
            .with_workflow_family("shop.")
            .with_inserted(inserted)
            .with_updated(updated)
            .with_order(order)
            .with_after(cursor)
            .with_limit(9);
        assert_eq!(
            query,
            InstanceQuery {
                ids: vec![Uuid::from_u128(1)],
                business_id: Some(BusinessId::parse("order::1").unwrap()),
                statuses: vec![InstanceStatus::Waiting],
                workflow_id: Some(WorkflowId::new("orders").unwrap()),
                workflow_version: Some(2),
                workflow_family: Some("shop.".to_owned()),
                inserted,
                updated,
                order,
                after: Some(cursor),
                limit: Some(9),
            }
        );
        // The default filters nothing: newest first by id, no limit.
        let everything = InstanceQuery::default();
        assert!(everything.ids.is_empty() && everything.statuses.is_empty());
        assert_eq!(
            everything.order,
            Order {
                key: SortKey::Id,
                direction: Direction::Desc
            }
        );
        assert_eq!((everything.after, everything.limit), (None, None));
    }

    #[test]
    fn like_patterns_are_literal_prefixes() {
        assert_eq!(like_prefix("Test_Wild"), r"Test\_Wild%");
        assert_eq!(like_prefix("100%"), r"100\%%");
        assert_eq!(like_prefix(r"a\b"), r"a\\b%");
        assert_eq!(like_prefix(""), "%");
    }

    #[test]
    fn an_empty_query_orders_newest_first() {
        assert_eq!(
            sql(&InstanceQuery::default()),
            "select i.id from t i where true order by i.id desc limit $1"
        );
    }

    #[test]
    fn every_filter_is_a_bind_parameter() {
        let query = InstanceQuery {
            ids: vec![Uuid::nil()],
            business_id: Some(BusinessId::parse("order::1").unwrap()),
            statuses: vec![InstanceStatus::Failed],
            workflow_id: Some(WorkflowId::new("orders").unwrap()),
            workflow_version: Some(2),
            workflow_family: Some("shop'; drop table x; --".to_owned()),
            inserted: TimeRange {
                from: Some(Utc::now()),
                until: Some(Utc::now()),
            },
            updated: TimeRange {
                from: None,
                until: Some(Utc::now()),
            },
            order: Order {
                key: SortKey::UpdatedAt,
                direction: Direction::Asc,
            },
            after: Some(Cursor {
                key: SortKey::UpdatedAt,
                at: Some(Utc::now()),
                id: Uuid::nil(),
            }),
            limit: Some(3),
        };
        let text = sql(&query);
        assert_eq!(
            text,
            "select i.id from t i where true and i.id = any($1) and i.business_id = $2 \
             and i.status = any($3) and i.workflow_id = $4 and i.workflow_version = $5 \
             and i.workflow_id like $6 escape '\\' and i.inserted_at >= $7 and i.inserted_at < $8 \
             and i.updated_at < $9 and (i.updated_at, i.id) > ($10, $11) \
             order by i.updated_at asc, i.id asc limit $12"
        );
    }

    #[test]
    fn a_cursor_of_another_order_is_rejected() {
        let query = InstanceQuery {
            order: Order {
                key: SortKey::InsertedAt,
                direction: Direction::Desc,
            },
            after: Some(Cursor::at_id(SortKey::Id, Uuid::nil())),
            ..InstanceQuery::default()
        };
        assert!(matches!(
            build(SELECT, &query, None),
            Err(PortError::InvalidInput(_))
        ));
        let huge = InstanceQuery {
            workflow_version: Some(u32::MAX),
            ..InstanceQuery::default()
        };
        assert!(sql(&huge).contains(" and false"));
    }
}
