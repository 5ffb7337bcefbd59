//! [`SqliteTx`]: the unit of work.
//!
//! A unit of work starts without touching the database. Until its first
//! write it reads the committed state through the pool, statement by
//! statement (the latest commit each time), and may hold instance locks.
//! Its first write takes the database's write lock: first this process's
//! queue for it ([`crate::locks`]), then `begin immediate` on a connection
//! of its own, which waits (under the busy timeout) for a writer of another
//! process. From then on, it reads and writes in that transaction, sees its
//! own writes, and holds the write lock until it commits or is dropped
//! (rolled back).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use hephaestus_engine_core::ports::{NewJob, PortError};
use sqlx::{Sqlite, SqliteConnection, Transaction};
use uuid::Uuid;

use crate::backend::Shared;
use crate::error::port_error;
use crate::locks::Resource;

/// A unit of work of a [`SqliteBackend`](crate::SqliteBackend). Dropping it
/// rolls it back and releases its locks.
pub struct SqliteTx {
    pub(crate) shared: Arc<Shared>,
    pub(crate) owner: u64,
    /// The write transaction, from the first write on.
    pub(crate) write: Option<Transaction<'static, Sqlite>>,
    /// The instances locked (or inserted) in this unit of work, with the
    /// `lock_version` this unit of work last saw or wrote: an update is
    /// fenced by it, so a write another process made meanwhile is refused.
    pub(crate) held: HashMap<Uuid, i64>,
    /// Unique jobs merged into an existing holder before this unit of work
    /// took the write lock: inserted at commit if the holder no longer holds
    /// their key by then (a worker claimed it meanwhile, before this unit of
    /// work's writes were visible, so it may have missed them).
    pub(crate) merged: Vec<NewJob>,
    /// Whether it enqueued jobs (the backend's waiters are woken at commit).
    pub(crate) enqueued: bool,
    /// Whether a write of it changed anything.
    pub(crate) dirty: bool,
    /// Why it was rolled back early (see [`SqliteTx::abandon`]).
    pub(crate) failed: Option<String>,
}

impl fmt::Debug for SqliteTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteTx")
            .field("owner", &self.owner)
            .field("writing", &self.write.is_some())
            .field("held", &self.held.len())
            .finish_non_exhaustive()
    }
}

impl SqliteTx {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let owner = shared.locks.owner();
        Self {
            shared,
            owner,
            write: None,
            held: HashMap::new(),
            merged: Vec::new(),
            enqueued: false,
            dirty: false,
            failed: None,
        }
    }

    /// The write transaction's connection, taking the write lock first if
    /// this is the unit of work's first write.
    pub(crate) async fn writer(&mut self) -> Result<&mut SqliteConnection, PortError> {
        if let Some(reason) = &self.failed {
            return Err(rolled_back(reason));
        }
        if self.write.is_none() {
            let tx = self.shared.begin_immediate(self.owner).await?;
            self.write = Some(tx);
        }
        match self.write.as_mut() {
            Some(tx) => Ok(&mut **tx),
            // Cannot happen: set just above.
            None => Err(PortError::Conflict("no write transaction".to_owned())),
        }
    }

    /// Records that a write changed something (it is kept until the end).
    pub(crate) fn changed(&mut self) {
        self.dirty = true;
    }

    /// After a write that changed nothing (a duplicate, a conflict, a fenced
    /// lease): if nothing else was written either, gives the write lock
    /// back, so a unit of work kept open after a refused write does not
    /// hold up every other writer. Its instance locks stay.
    pub(crate) async fn release_if_clean(&mut self) {
        if self.dirty {
            return;
        }
        if let Some(tx) = self.write.take() {
            let _ = tx.rollback().await;
            self.shared.locks.release(self.owner, Resource::Writer);
        }
    }

    /// After an insert or update refused with `error` (a held claim, a taken
    /// id, a fence): a unit of work that wrote nothing stays usable (see
    /// [`SqliteTx::release_if_clean`]); one that wrote is rolled back at
    /// once, so that, kept open by its caller, it does not hold every other
    /// writer up, and its later writes and its commit fail.
    pub(crate) async fn abandon(&mut self, error: &PortError) {
        if !self.dirty {
            self.release_if_clean().await;
            return;
        }
        if let Some(tx) = self.write.take() {
            let _ = tx.rollback().await;
            self.shared.locks.release(self.owner, Resource::Writer);
        }
        self.merged.clear();
        self.enqueued = false;
        self.failed = Some(error.to_string());
    }

    /// Takes the single-writer lock of instance `id` for this unit of work.
    pub(crate) async fn lock_instance(&mut self, id: Uuid) -> Result<(), PortError> {
        self.shared
            .locks
            .acquire(self.owner, Resource::Instance(id))
            .await
    }

    /// Releases the lock of instance `id` (taken by this unit of work for an
    /// instance that turned out not to exist).
    pub(crate) fn unlock_instance(&mut self, id: Uuid) {
        self.shared
            .locks
            .release(self.owner, Resource::Instance(id));
    }

    /// Commits: inserts the merged unique jobs whose holder moved on, then
    /// commits the write transaction (if any) and releases every lock.
    pub(crate) async fn commit(mut self) -> Result<(), PortError> {
        if let Some(reason) = &self.failed {
            return Err(rolled_back(reason));
        }
        if !self.merged.is_empty() {
            let merged = std::mem::take(&mut self.merged);
            crate::jobs::insert_merged_if_free(&mut self, &merged).await?;
        }
        if let Some(tx) = self.write.take() {
            tx.commit().await.map_err(port_error)?;
        }
        self.shared.locks.release_all(self.owner);
        if self.enqueued {
            self.shared.enqueued.notify_waiters();
        }
        Ok(())
    }
}

fn rolled_back(reason: &str) -> PortError {
    PortError::Conflict(format!(
        "the unit of work was rolled back after a refused write: {reason}"
    ))
}

impl Drop for SqliteTx {
    fn drop(&mut self) {
        // Roll back (queued on the connection) before the write lock is
        // handed on, so the next writer does not find SQLite still locked.
        drop(self.write.take());
        self.shared.locks.release_all(self.owner);
    }
}
