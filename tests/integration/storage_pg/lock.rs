//! The single-writer lock: a namespaced 64-bit advisory key, serialized writers, and
//! updates only by the holder.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_engine_core::ports::{InstanceStore, PortError, StepResultStore, UnitOfWork};
use hephaestus_storage_pg::instance_lock_key;
use sqlx::PgPool;

use super::{Db, insert_committed, pending};
use crate::storage_pg::inbox::completed;

/// How long a test waits for another connection to reach a state before failing.
const PATIENCE: Duration = Duration::from_secs(20);

/// The advisory lock `key` as `pg_locks` shows it: (classid, objid) = (high, low) 32 bits.
fn lock_parts(key: i64) -> (i64, i64) {
    let bits = u64::from_be_bytes(key.to_be_bytes());
    (
        i64::try_from(bits >> 32).unwrap(),
        i64::try_from(bits & 0xffff_ffff).unwrap(),
    )
}

/// The backends holding (`granted`) or waiting for the advisory lock `key`.
async fn advisory_lock_pids(pool: &PgPool, key: i64, granted: bool) -> Vec<i32> {
    let (classid, objid) = lock_parts(key);
    sqlx::query_scalar(
        "select pid from pg_locks
         where locktype = 'advisory' and classid::bigint = $1 and objid::bigint = $2
           and objsubid = 1 and granted = $3 and database = (select oid from pg_database where datname = current_database())",
    )
    .bind(classid)
    .bind(objid)
    .bind(granted)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Waits until backend `pid` waits for `key` (the catalog is the only
/// place that tells).
async fn until_waiting(pool: &PgPool, key: i64, pid: i32) {
    let what = format!("backend {pid} to wait for the lock");
    crate::support::wait::until_within(PATIENCE, what, || async move {
        advisory_lock_pids(pool, key, false).await.contains(&pid)
    })
    .await;
}

async fn backend_pid(conn: &mut sqlx::PgConnection) -> i32 {
    sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_advisory_lock_serializes_two_writers() {
    let db = Db::new().await;
    let original = pending("order::1");
    insert_committed(&db.store, &original).await;
    let key = instance_lock_key(db.prefix(), original.id);

    let mut first = db.store.begin().await.unwrap();
    let first_pid = backend_pid(&mut first).await;
    let locked = db.store.lock(&mut first, original.id).await.unwrap();
    assert_eq!(locked.as_ref(), Some(&original));
    assert_eq!(
        advisory_lock_pids(&db.pool, key, true).await,
        vec![first_pid],
        "the holder holds the 64-bit key of the instance"
    );

    let mut second = db.store.begin().await.unwrap();
    let second_pid = backend_pid(&mut second).await;
    let second_locked = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, flag, id) = (db.store.clone(), Arc::clone(&second_locked), original.id);
        tokio::spawn(async move {
            let seen = store.lock(&mut second, id).await.unwrap().unwrap();
            flag.store(true, Ordering::SeqCst);
            let mut next = seen.clone();
            next.revision += 1;
            store.update(&mut second, &next).await.unwrap();
            store.commit(second).await.unwrap();
            seen
        })
    };

    until_waiting(&db.pool, key, second_pid).await;
    assert!(
        !second_locked.load(Ordering::SeqCst),
        "the second writer got the lock while the first held it"
    );
    let mut updated = original.clone();
    updated.status = InstanceStatus::Running;
    updated.revision = 1;
    db.store.update(&mut first, &updated).await.unwrap();
    assert!(!second_locked.load(Ordering::SeqCst));
    db.store.commit(first).await.unwrap();

    let seen = writer.await.unwrap();
    assert_eq!(
        seen, updated,
        "the second writer sees the first one's commit"
    );
    let last = db.store.get(original.id).await.unwrap().unwrap();
    assert_eq!((last.status, last.revision), (InstanceStatus::Running, 2));
    assert!(advisory_lock_pids(&db.pool, key, true).await.is_empty());
    db.teardown().await;
}

#[tokio::test]
async fn lock_keys_are_per_instance_and_per_schema() {
    let db = Db::new().await;
    let (a, b) = (pending("order::1"), pending("order::2"));
    insert_committed(&db.store, &a).await;
    insert_committed(&db.store, &b).await;
    let mut tx = db.store.begin().await.unwrap();
    let pid = backend_pid(&mut tx).await;
    db.store.lock(&mut tx, a.id).await.unwrap();
    db.store.lock(&mut tx, b.id).await.unwrap();
    for id in [a.id, b.id] {
        let key = instance_lock_key(db.prefix(), id);
        assert_eq!(advisory_lock_pids(&db.pool, key, true).await, vec![pid]);
    }
    assert_ne!(
        instance_lock_key(db.prefix(), a.id),
        instance_lock_key(db.prefix(), b.id)
    );
    let other = hephaestus_migrations_gen::SchemaPrefix::new("tenant_b").unwrap();
    assert_ne!(
        instance_lock_key(db.prefix(), a.id),
        instance_lock_key(&other, a.id)
    );
    // A missing instance: no row, no lock.
    let ghost = uuid::Uuid::now_v7();
    assert_eq!(db.store.lock(&mut tx, ghost).await.unwrap(), None);
    let ghost_key = instance_lock_key(db.prefix(), ghost);
    assert!(
        advisory_lock_pids(&db.pool, ghost_key, true)
            .await
            .is_empty()
    );
    drop(tx);
    db.teardown().await;
}

#[tokio::test]
async fn only_the_holder_may_update() {
    let db = Db::new().await;
    let store = &db.store;
    let inst = pending("order::1");
    insert_committed(store, &inst).await;
    let mut next = inst.clone();
    next.revision = 1;

    // Not locked in this transaction: a conflict, and nothing is written.
    let mut tx = store.begin().await.unwrap();
    let outcome = store.update(&mut tx, &next).await;
    assert!(
        matches!(outcome, Err(PortError::Conflict(_))),
        "{outcome:?}"
    );
    // The transaction is still usable: lock, then update.
    store.lock(&mut tx, inst.id).await.unwrap().unwrap();
    store.update(&mut tx, &next).await.unwrap();
    store.commit(tx).await.unwrap();
    assert_eq!(store.get(inst.id).await.unwrap(), Some(next.clone()));

    // The lock ends with its transaction: a later one must lock again.
    let mut tx = store.begin().await.unwrap();
    next.revision = 2;
    assert!(matches!(
        store.update(&mut tx, &next).await,
        Err(PortError::Conflict(_))
    ));
    drop(tx);

    // Locking one instance does not allow updating another.
    let other = pending("order::2");
    insert_committed(store, &other).await;
    let mut tx = store.begin().await.unwrap();
    store.lock(&mut tx, inst.id).await.unwrap();
    let mut other_next = other.clone();
    other_next.revision = 1;
    assert!(matches!(
        store.update(&mut tx, &other_next).await,
        Err(PortError::Conflict(_))
    ));
    drop(tx);

    // A missing instance is NotFound.
    let mut tx = store.begin().await.unwrap();
    assert!(matches!(
        store.update(&mut tx, &pending("order::3")).await,
        Err(PortError::NotFound(_))
    ));
    drop(tx);
    db.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_results_never_waits_for_the_single_writer() {
    let db = Db::new().await;
    let inst = pending("order::1");
    insert_committed(&db.store, &inst).await;
    let mut writer = db.store.begin().await.unwrap();
    db.store.lock(&mut writer, inst.id).await.unwrap().unwrap();

    // A step worker records a result for the locked instance and commits: the row lock
    // of the single writer (`for no key update`) does not block the foreign key's
    // `key share` lock.
    let worker = {
        let store = db.store.clone();
        tokio::spawn(async move {
            let mut tx = store.begin().await.unwrap();
            let recorded = store.record(&mut tx, &completed(inst.id, "a", 1)).await;
            store.commit(tx).await.unwrap();
            recorded
        })
    };
    let recorded = tokio::time::timeout(PATIENCE, worker)
        .await
        .expect("recording waited for the single writer")
        .unwrap();
    assert!(recorded.is_ok(), "{recorded:?}");
    // The writer's next read of the inbox sees it.
    let pending = db.store.pending(&mut writer, inst.id).await.unwrap();
    assert_eq!(pending.len(), 1);
    drop(writer);
    db.teardown().await;
}

/// The batched try-lock tells, per locked instance, whether its inbox held
/// unprocessed results when the statement began: true with one waiting,
/// false once it is processed, false for an instance with none; an instance
/// another transaction holds is skipped without waiting.
#[tokio::test]
async fn the_batched_try_lock_reports_whether_the_inbox_holds_results() {
    let db = Db::new().await;
    let busy = pending("order::busy");
    let quiet = pending("order::quiet");
    let held = pending("order::held");
    for instance in [&busy, &quiet, &held] {
        insert_committed(&db.store, instance).await;
    }
    let mut tx = db.store.begin().await.unwrap();
    let recorded = db
        .store
        .record(&mut tx, &completed(busy.id, "Step", 1))
        .await
        .unwrap();
    db.store.commit(tx).await.unwrap();
    let hephaestus_engine_core::ports::Recorded::Inserted(seq) = recorded else {
        panic!("{recorded:?}")
    };

    let mut other = db.store.begin().await.unwrap();
    assert!(db.store.lock(&mut other, held.id).await.unwrap().is_some());

    let ids = [busy.id, quiet.id, held.id];
    let mut tx = db.store.begin().await.unwrap();
    let locked = db.store.try_lock_many_using(&mut tx, &ids).await.unwrap();
    let flags: Vec<(uuid::Uuid, bool)> = locked.iter().map(|(i, f)| (i.id, *f)).collect();
    let mut expected = vec![(busy.id, true), (quiet.id, false)];
    expected.sort_unstable();
    assert_eq!(flags, expected, "the held one is skipped");
    db.store
        .mark_processed(&mut tx, busy.id, &[seq])
        .await
        .unwrap();
    db.store.commit(tx).await.unwrap();
    db.store.commit(other).await.unwrap();

    let mut tx = db.store.begin().await.unwrap();
    let locked = db.store.try_lock_many_using(&mut tx, &ids).await.unwrap();
    assert!(
        locked.iter().all(|(_, inbox)| !inbox),
        "nothing left to read: {locked:?}"
    );
    assert_eq!(locked.len(), 3);
    db.store.commit(tx).await.unwrap();
    db.teardown().await;
}
