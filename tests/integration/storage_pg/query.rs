//! The query API: every filter pushed into SQL, orders, keyset pagination, and the
//! indexes behind the hot queries.

use chrono::{DateTime, TimeDelta, Utc};
use hephaestus_engine_core::business_id::Scope;
use hephaestus_engine_core::instance::{Instance, InstanceStatus};
use hephaestus_storage_pg::{Cursor, Direction, InstanceQuery, Order, PgStore, SortKey, TimeRange};
use uuid::Uuid;

use super::{Db, bid, insert_committed, instance, t0, wid};

fn at(minutes: i64) -> DateTime<Utc> {
    t0() + TimeDelta::minutes(minutes)
}

/// Twelve instances with distinct workflows, statuses and times, some times equal so
/// that ties are broken by id. Returned in id order.
fn fixture() -> Vec<Instance> {
    use InstanceStatus::{Cancelled, Completed, Failed, Pending, Running, Waiting};
    let rows = [
        ("order::1", "shop.orders", 1, Completed, 0, 10),
        ("order::1", "shop.orders", 2, Running, 1, 11),
        ("order::2", "shop.orders.v2", 1, Failed, 2, 12),
        ("order::3", "shop.ordersx", 1, Waiting, 3, 12),
        ("user::1", "signup", 1, Pending, 3, 13),
        ("order::4", "Test_Wild", 1, Running, 5, 14),
        ("order::5", "TestXWild", 1, Running, 6, 14),
        ("order::6", "shop.refunds", 1, Cancelled, 7, 15),
        ("order::7", "shop.orders", 3, Pending, 8, 9),
        ("order::8", "shop.orders", 1, Completed, 9, 30),
        ("user::2", "signup", 2, Failed, 10, 20),
        ("user::3", "signup", 2, Completed, 10, 20),
    ];
    let mut ids: Vec<Uuid> = rows.iter().map(|_| Uuid::now_v7()).collect();
    ids.sort();
    rows.into_iter()
        .zip(ids)
        .map(
            |((business, workflow, version, status, created, updated), id)| {
                let mut i = instance(business, workflow, version, Scope::None, status);
                i.id = id;
                i.created_at = at(created);
                i.updated_at = at(updated);
                i
            },
        )
        .collect()
}

fn ids(instances: &[Instance]) -> Vec<Uuid> {
    instances.iter().map(|i| i.id).collect()
}

async fn all(store: &PgStore, query: &InstanceQuery) -> Vec<Uuid> {
    let page = store.query(query).await.unwrap();
    assert_eq!(page.next, None, "one page");
    ids(&page.instances)
}

/// `fixture` sorted as `order` sorts.
fn sorted(fixture: &[Instance], order: Order) -> Vec<Uuid> {
    let mut sorted = fixture.to_vec();
    sorted.sort_by_key(|i| match order.key {
        SortKey::Id => (t0(), i.id),
        SortKey::InsertedAt => (i.created_at, i.id),
        SortKey::UpdatedAt => (i.updated_at, i.id),
    });
    if order.direction == Direction::Desc {
        sorted.reverse();
    }
    ids(&sorted)
}

#[tokio::test]
async fn filters_are_pushed_into_sql() {
    let db = Db::new().await;
    let fx = fixture();
    for n in [7, 3, 0, 11, 5, 1, 9, 2, 10, 4, 8, 6] {
        insert_committed(&db.store, &fx[n]).await;
    }
    let pick = |ns: &[usize]| -> Vec<Uuid> { ns.iter().rev().map(|n| fx[*n].id).collect() };
    let cases: Vec<(&str, InstanceQuery, Vec<Uuid>)> = vec![
        (
            "nothing",
            InstanceQuery::default(),
            pick(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),
        ),
        (
            "ids",
            InstanceQuery::default().with_ids(vec![fx[3].id, fx[8].id, Uuid::now_v7()]),
            pick(&[3, 8]),
        ),
        (
            "business id",
            InstanceQuery::default().with_business_id(bid("order::1")),
            pick(&[0, 1]),
        ),
        (
            "one status",
            InstanceQuery::default().with_statuses([InstanceStatus::Running]),
            pick(&[1, 5, 6]),
        ),
        (
            "a status set",
            InstanceQuery::default().with_statuses(InstanceStatus::ACTIVE),
            pick(&[1, 3, 4, 5, 6, 8]),
        ),
        (
            "workflow",
            InstanceQuery::default().with_workflow_id(wid("shop.orders")),
            pick(&[0, 1, 8, 9]),
        ),
        (
            "workflow and version",
            InstanceQuery::default()
                .with_workflow_id(wid("shop.orders"))
                .with_workflow_version(1),
            pick(&[0, 9]),
        ),
        (
            "version",
            InstanceQuery::default().with_workflow_version(2),
            pick(&[1, 10, 11]),
        ),
        (
            "family",
            InstanceQuery::default().with_workflow_family("shop.orders"),
            pick(&[0, 1, 2, 3, 8, 9]),
        ),
        (
            "family with a dot",
            InstanceQuery::default().with_workflow_family("shop.orders."),
            pick(&[2]),
        ),
        (
            "family with _ is literal",
            InstanceQuery::default().with_workflow_family("Test_"),
            pick(&[5]),
        ),
        (
            "family with % is literal",
            InstanceQuery::default().with_workflow_family("Test%"),
            vec![],
        ),
        (
            "inserted range",
            InstanceQuery::default().with_inserted(TimeRange {
                from: Some(at(3)),
                until: Some(at(6)),
            }),
            pick(&[3, 4, 5]),
        ),
        (
            "updated since",
            InstanceQuery::default().with_updated(TimeRange {
                from: Some(at(20)),
                until: None,
            }),
            pick(&[9, 10, 11]),
        ),
        (
            "updated before",
            InstanceQuery::default().with_updated(TimeRange {
                from: None,
                until: Some(at(11)),
            }),
            pick(&[0, 8]),
        ),
        (
            "everything at once",
            InstanceQuery::default()
                .with_statuses([InstanceStatus::Completed, InstanceStatus::Running])
                .with_workflow_family("shop.")
                .with_workflow_version(1)
                .with_inserted(TimeRange {
                    from: Some(at(0)),
                    until: Some(at(10)),
                })
                .with_updated(TimeRange {
                    from: Some(at(10)),
                    until: Some(at(31)),
                }),
            pick(&[0, 9]),
        ),
    ];
    for (name, query, expected) in cases {
        assert_eq!(all(&db.store, &query).await, expected, "{name}");
    }
    let one = db
        .store
        .query(&InstanceQuery::default().with_ids(vec![fx[4].id]))
        .await
        .unwrap();
    assert_eq!(one.instances, vec![fx[4].clone()], "every field comes back");
    db.teardown().await;
}

#[tokio::test]
async fn count_counts_what_a_query_selects_and_counts_groups_by_workflow_and_status() {
    use InstanceStatus::{Cancelled, Completed, Failed, Pending, Running, Waiting};
    let db = Db::new().await;
    let fx = fixture();
    for i in &fx {
        insert_committed(&db.store, i).await;
    }
    let count = |query: InstanceQuery| {
        let store = db.store.clone();
        async move { store.count(&query).await.unwrap() }
    };
    assert_eq!(count(InstanceQuery::default()).await, 12);
    assert_eq!(
        count(InstanceQuery::default().with_statuses(InstanceStatus::ACTIVE)).await,
        6
    );
    assert_eq!(
        count(
            InstanceQuery::default()
                .with_workflow_id(wid("signup"))
                .with_statuses([Failed, Completed])
        )
        .await,
        2
    );
    // The limit does not cut the count; a cursor does.
    assert_eq!(count(InstanceQuery::default().with_limit(1)).await, 12);
    assert_eq!(
        count(InstanceQuery::default().with_after(Cursor::after(&fx[3], SortKey::Id))).await,
        3,
        "newest first: fx[0..3] come after fx[3]"
    );
    assert_eq!(
        count(InstanceQuery::default().with_inserted(TimeRange {
            from: Some(at(3)),
            until: Some(at(7)),
        }))
        .await,
        4
    );

    // (Ordered by the database's collation; compared here in Rust's order.)
    let mut counts = db.store.counts().await.unwrap();
    counts.sort_by(|a, b| {
        (&a.workflow_id, a.workflow_version, a.status).cmp(&(
            &b.workflow_id,
            b.workflow_version,
            b.status,
        ))
    });
    let counts: Vec<(String, u32, InstanceStatus, u64)> = counts
        .into_iter()
        .map(|c| (c.workflow_id, c.workflow_version, c.status, c.count))
        .collect();
    let c = |workflow: &str, version: u32, status: InstanceStatus, count: u64| {
        (workflow.to_owned(), version, status, count)
    };
    assert_eq!(
        counts,
        vec![
            c("TestXWild", 1, Running, 1),
            c("Test_Wild", 1, Running, 1),
            c("shop.orders", 1, Completed, 2),
            c("shop.orders", 2, Running, 1),
            c("shop.orders", 3, Pending, 1),
            c("shop.orders.v2", 1, Failed, 1),
            c("shop.ordersx", 1, Waiting, 1),
            c("shop.refunds", 1, Cancelled, 1),
            c("signup", 1, Pending, 1),
            c("signup", 2, Completed, 1),
            c("signup", 2, Failed, 1),
        ]
    );
    let empty = Db::new().await;
    assert_eq!(empty.store.counts().await.unwrap(), Vec::new());
    empty.teardown().await;
    db.teardown().await;
}

#[tokio::test]
async fn every_order_pages_through_everything_with_keysets() {
    let db = Db::new().await;
    let fx = fixture();
    for i in &fx {
        insert_committed(&db.store, i).await;
    }
    for key in [SortKey::Id, SortKey::InsertedAt, SortKey::UpdatedAt] {
        for direction in [Direction::Asc, Direction::Desc] {
            let order = Order { key, direction };
            let expected = sorted(&fx, order);
            let everything = InstanceQuery::default().with_order(order);
            assert_eq!(all(&db.store, &everything).await, expected, "{order:?}");

            let mut seen = Vec::new();
            let mut after: Option<Cursor> = None;
            let mut pages = 0;
            loop {
                let page = db
                    .store
                    .query(&{
                        let mut query = InstanceQuery::default().with_order(order).with_limit(5);
                        query.after = after;
                        query
                    })
                    .await
                    .unwrap();
                pages += 1;
                assert!(page.instances.len() <= 5);
                seen.extend(ids(&page.instances));
                match page.next {
                    Some(next) => {
                        assert_eq!(next.key(), key);
                        after = Some(next);
                    }
                    None => break,
                }
            }
            assert_eq!(seen, expected, "pages of {order:?}");
            assert_eq!(pages, 3, "5 + 5 + 2, and no empty last page");

            // The cursor of a shorter page continues right after it.
            let first = db
                .store
                .query(&InstanceQuery::default().with_order(order).with_limit(4))
                .await
                .unwrap();
            let mut rest = InstanceQuery::default().with_order(order);
            rest.after = first.next;
            let rest = all(&db.store, &rest).await;
            assert_eq!(
                rest,
                expected[4..].to_vec(),
                "after the first page of {order:?}"
            );
        }
    }

    // A filter and a page together: the cursor continues the filtered order.
    let active = InstanceQuery::default()
        .with_statuses(InstanceStatus::ACTIVE)
        .with_order(Order {
            key: SortKey::UpdatedAt,
            direction: Direction::Asc,
        })
        .with_limit(2);
    let first = db.store.query(&active).await.unwrap();
    let second = db
        .store
        .query(&active.clone().with_after(first.next.unwrap()))
        .await
        .unwrap();
    let mut expected: Vec<&Instance> = fx.iter().filter(|i| i.status.is_active()).collect();
    expected.sort_by_key(|i| (i.updated_at, i.id));
    let got: Vec<Uuid> = first
        .instances
        .iter()
        .chain(&second.instances)
        .map(|i| i.id)
        .collect();
    assert_eq!(got, expected[..4].iter().map(|i| i.id).collect::<Vec<_>>());

    // Limit 0, and a cursor of another order.
    let none = db
        .store
        .query(&InstanceQuery::default().with_limit(0))
        .await
        .unwrap();
    assert!(none.instances.is_empty() && none.next.is_none());
    let wrong = InstanceQuery::default()
        .with_order(Order {
            key: SortKey::UpdatedAt,
            direction: Direction::Desc,
        })
        .with_after(Cursor::after(&fx[0], SortKey::Id));
    assert!(matches!(
        db.store.query(&wrong).await,
        Err(hephaestus_engine_core::ports::PortError::InvalidInput(_))
    ));
    db.teardown().await;
}

/// The plan of `sql` with sequential scans disabled (the tables are tiny, so the planner
/// would otherwise always scan): which indexes it can use.
async fn plan(db: &Db, sql: &str) -> String {
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::raw_sql("set local enable_seqscan = off")
        .execute(&mut *tx)
        .await
        .unwrap();
    let lines: Vec<String> = sqlx::query_scalar(&format!("explain {sql}"))
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    lines.join("\n")
}

#[tokio::test]
async fn hot_queries_have_their_indexes() {
    let db = Db::new().await;
    let instances = db.table("hephaestus_instances");
    let results = db.table("hephaestus_step_results");
    let id = Uuid::nil();
    let cases = [
        (
            format!(
                "select id from {instances} where unique_claim = 'c' and status in ('pending', 'running', 'waiting')"
            ),
            "hephaestus_instances_active_claim_uidx",
        ),
        (
            format!(
                "select id from {instances} where business_id = 'order::1' order by id desc limit 1"
            ),
            "hephaestus_instances_business_id_idx",
        ),
        (
            format!(r"select id from {instances} where workflow_id like 'shop.orders%' escape '\'"),
            "hephaestus_instances_workflow_idx",
        ),
        (
            format!(
                "select id from {instances} where status in ('pending', 'running', 'waiting') and updated_at < now()"
            ),
            "hephaestus_instances_active_status_idx",
        ),
        (
            format!(
                "select id from {instances} where updated_at >= now() order by updated_at, id limit 10"
            ),
            "hephaestus_instances_updated_at_idx",
        ),
        (
            format!(
                "select seq from {results} where instance_id = '{id}' and processed_at is null order by seq"
            ),
            "hephaestus_step_results_pending_idx",
        ),
        (
            format!("select seq from {results} where processed_at < now() limit 10"),
            "hephaestus_step_results_processed_at_idx",
        ),
        (
            format!(
                "select 1 from {results} where instance_id = '{id}' and step_id = 'a' and activation = 1 and kind in ('completed', 'async', 'failed')"
            ),
            "hephaestus_step_results_activation_uidx",
        ),
    ];
    for (sql, index) in cases {
        let plan = plan(&db, &sql).await;
        assert!(plan.contains(index), "{sql}\nshould use {index}:\n{plan}");
    }
    db.teardown().await;
}
