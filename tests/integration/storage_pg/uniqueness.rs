//! Business ids: atomic uniqueness per scope among active instances, and history.

use std::sync::Arc;

use hephaestus_engine_core::business_id::Scope;
use hephaestus_engine_core::instance::{Instance, InstanceStatus};
use hephaestus_engine_core::ports::{InstanceFilter, InstanceStore, PortError, UnitOfWork};
use hephaestus_storage_pg::PgStore;
use tokio::sync::Barrier;
use uuid::Uuid;

use super::{Db, bid, insert_committed, instance, pending};

/// How many starts race in each round.
const RACERS: usize = 16;

/// Starts every instance at once, each in its own transaction (all transactions begin,
/// then all insert), and returns each outcome in order.
async fn race(store: &PgStore, instances: Vec<Instance>) -> Vec<Result<(), PortError>> {
    let barrier = Arc::new(Barrier::new(instances.len()));
    let tasks: Vec<_> = instances
        .into_iter()
        .map(|instance| {
            let (store, barrier) = (store.clone(), Arc::clone(&barrier));
            tokio::spawn(async move {
                let mut tx = store.begin().await?;
                barrier.wait().await;
                store.insert(&mut tx, &instance).await?;
                store.commit(tx).await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("start task"));
    }
    outcomes
}

/// Checks that exactly the instances at `winners` committed and every other one got
/// `AlreadyRunning` naming the winner with the same claim.
fn check_outcomes(instances: &[Instance], outcomes: &[Result<(), PortError>], winners: usize) {
    let won: Vec<&Instance> = instances
        .iter()
        .zip(outcomes)
        .filter(|(_, outcome)| outcome.is_ok())
        .map(|(instance, _)| instance)
        .collect();
    assert_eq!(won.len(), winners, "winners: {outcomes:?}");
    for (instance, outcome) in instances.iter().zip(outcomes) {
        if outcome.is_ok() {
            continue;
        }
        let holder = won
            .iter()
            .find(|w| w.unique_claim == instance.unique_claim)
            .expect("a winner with the same claim");
        match outcome {
            Err(PortError::AlreadyRunning {
                business_id,
                instance_id,
            }) => {
                assert_eq!(business_id, &instance.business_id);
                assert_eq!(*instance_id, holder.id, "the holder is named");
            }
            other => panic!("expected AlreadyRunning, got {other:?}"),
        }
    }
}

async fn stored(store: &PgStore, business: &str) -> Vec<Uuid> {
    let filter = InstanceFilter::default().with_business_id(bid(business));
    let mut ids: Vec<Uuid> = store
        .list(&filter)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_starts_of_one_business_id_commit_once_per_scope() {
    let db = Db::new().await;
    for (n, scope) in [Scope::Workflow, Scope::Version, Scope::Global]
        .into_iter()
        .enumerate()
    {
        let business = format!("order::{n}");
        let instances: Vec<Instance> = (0..RACERS)
            .map(|_| instance(&business, "orders", 1, scope, InstanceStatus::Pending))
            .collect();
        let outcomes = race(&db.store, instances.clone()).await;
        check_outcomes(&instances, &outcomes, 1);
        let winner = instances
            .iter()
            .zip(&outcomes)
            .find(|(_, o)| o.is_ok())
            .map(|(i, _)| i.id)
            .unwrap();
        assert_eq!(stored(&db.store, &business).await, vec![winner], "{scope}");
    }

    // Scope none: no claim, and a random suffix per start; every start commits.
    let instances: Vec<Instance> = (0..RACERS)
        .map(|n| {
            let business = format!("order::9::{n:08x}");
            instance(&business, "orders", 1, Scope::None, InstanceStatus::Pending)
        })
        .collect();
    assert!(instances.iter().all(|i| i.unique_claim.is_none()));
    let outcomes = race(&db.store, instances.clone()).await;
    check_outcomes(&instances, &outcomes, RACERS);
    db.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scopes_decide_which_instances_coexist() {
    let db = Db::new().await;
    // (scope, the two kinds of racers: workflow and version, expected winners)
    let rounds = [
        (Scope::Workflow, [("orders", 1), ("refunds", 1)], 2),
        (Scope::Workflow, [("orders", 1), ("orders", 2)], 1),
        (Scope::Version, [("orders", 1), ("orders", 2)], 2),
        (Scope::Version, [("orders", 3), ("orders", 3)], 1),
        (Scope::Global, [("orders", 1), ("refunds", 2)], 1),
    ];
    for (round, (scope, kinds, winners)) in rounds.into_iter().enumerate() {
        let business = format!("user::{round}");
        let instances: Vec<Instance> = (0..RACERS)
            .map(|n| {
                let (workflow, version) = kinds[n % 2];
                instance(&business, workflow, version, scope, InstanceStatus::Pending)
            })
            .collect();
        let outcomes = race(&db.store, instances.clone()).await;
        check_outcomes(&instances, &outcomes, winners);
        assert_eq!(stored(&db.store, &business).await.len(), winners);
    }
    db.teardown().await;
}

#[tokio::test]
async fn finished_instances_are_history_and_a_restart_creates_a_new_row() {
    let db = Db::new().await;
    let store = &db.store;
    let first = pending("order::1");
    insert_committed(store, &first).await;

    // While the first is active, a second start is refused.
    let mut tx = store.begin().await.unwrap();
    let outcome = store.insert(&mut tx, &pending("order::1")).await;
    assert!(
        matches!(outcome, Err(PortError::AlreadyRunning { instance_id, .. }) if instance_id == first.id),
        "{outcome:?}"
    );
    // The refused insert leaves the transaction usable.
    let unrelated = pending("order::2");
    store.insert(&mut tx, &unrelated).await.unwrap();
    store.commit(tx).await.unwrap();

    let mut done = first.clone();
    done.status = InstanceStatus::Completed;
    done.revision = 1;
    let mut tx = store.begin().await.unwrap();
    store.lock(&mut tx, first.id).await.unwrap().unwrap();
    store.update(&mut tx, &done).await.unwrap();
    store.commit(tx).await.unwrap();

    let again = pending("order::1");
    insert_committed(store, &again).await;
    assert_eq!(store.get(first.id).await.unwrap(), Some(done.clone()));
    assert_eq!(store.get(again.id).await.unwrap(), Some(again.clone()));
    let mut both = vec![first.id, again.id];
    both.sort();
    assert_eq!(stored(store, "order::1").await, both);

    // Re-activating the finished one while the new one holds the claim is refused.
    let mut revived = done.clone();
    revived.status = InstanceStatus::Running;
    let mut tx = store.begin().await.unwrap();
    store.lock(&mut tx, first.id).await.unwrap().unwrap();
    let outcome = store.update(&mut tx, &revived).await;
    assert!(
        matches!(outcome, Err(PortError::AlreadyRunning { instance_id, .. }) if instance_id == again.id),
        "{outcome:?}"
    );
    drop(tx);
    assert_eq!(store.get(first.id).await.unwrap(), Some(done));
    db.teardown().await;
}
