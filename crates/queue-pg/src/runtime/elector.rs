//! Leader election for the maintenance services (rescuer, pruner, depth
//! gauge): `pg_try_advisory_lock` on a dedicated connection, keyed by the
//! schema prefix. The lock lives as long as the connection: a leader that
//! dies loses it with its connection, and another runtime takes over at its
//! next attempt.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::{Connection as _, PgConnection};

use super::service::{Service, sleep_or_stop};
use crate::queue::PgQueue;

const TRY_LOCK: &str =
    "select pg_try_advisory_lock(hashtext('hephaestus_queue_leader'), hashtext($1))";
const UNLOCK: &str = "select pg_advisory_unlock(hashtext('hephaestus_queue_leader'), hashtext($1))";

/// The elector service.
#[derive(Debug)]
pub(crate) struct Elector {
    service: Service,
    leader: Arc<AtomicBool>,
}

struct Campaign {
    queue: PgQueue,
    leader: Arc<AtomicBool>,
    conn: Option<PgConnection>,
}

impl Elector {
    /// Tries once to become leader, then keeps trying (or checking the
    /// connection, while leader) every `interval`.
    pub(crate) async fn start(queue: PgQueue, interval: Duration) -> Self {
        let leader = Arc::new(AtomicBool::new(false));
        let mut campaign = Campaign {
            queue,
            leader: Arc::clone(&leader),
            conn: None,
        };
        campaign.step().await;
        let service = Service::spawn("elector", move |stop| async move {
            while !sleep_or_stop(&stop, interval).await {
                campaign.step().await;
            }
            campaign.resign().await;
        });
        Self { service, leader }
    }

    /// Whether this runtime leads.
    pub(crate) fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// The shared flag.
    pub(crate) fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.leader)
    }

    /// Gives up leadership and closes the connection. Idempotent.
    pub(crate) async fn stop(&self) {
        self.service.stop().await;
    }

    pub(crate) fn signal_stop(&self) {
        self.service.signal_stop();
    }
}

impl Campaign {
    async fn step(&mut self) {
        if self.conn.is_none() {
            match PgConnection::connect_with(&self.queue.pool().connect_options()).await {
                Ok(conn) => self.conn = Some(conn),
                Err(error) => {
                    tracing::warn!(target: "hephaestus_queue", %error, "leader election: cannot connect");
                    return;
                }
            }
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let leading = self.leader.load(Ordering::SeqCst);
        let result = if leading {
            sqlx::query_scalar::<_, i32>("select 1")
                .fetch_one(&mut *conn)
                .await
                .map(|_| true)
        } else {
            sqlx::query_scalar::<_, bool>(TRY_LOCK)
                .bind(self.queue.prefix().as_str())
                .fetch_one(&mut *conn)
                .await
        };
        match result {
            Ok(now_leading) => {
                if now_leading && !leading {
                    tracing::info!(target: "hephaestus_queue", "became the maintenance leader");
                }
                self.leader.store(now_leading, Ordering::SeqCst);
            }
            Err(error) => {
                tracing::warn!(target: "hephaestus_queue", %error, "leader election connection failed");
                self.leader.store(false, Ordering::SeqCst);
                self.conn = None;
            }
        }
    }

    async fn resign(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            if self.leader.swap(false, Ordering::SeqCst) {
                let _ = sqlx::query_scalar::<_, bool>(UNLOCK)
                    .bind(self.queue.prefix().as_str())
                    .fetch_one(&mut conn)
                    .await;
            }
            let _ = conn.close().await;
        }
    }
}
