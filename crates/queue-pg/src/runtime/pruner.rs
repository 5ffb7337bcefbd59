//! The pruner (leader only): deletes jobs that finished (completed,
//! discarded, cancelled) longer than the retention ago, in batches.

use std::sync::Arc;
use std::time::Duration;

use chrono::TimeDelta;

use super::elector::Leadership;
use super::service::{Service, sleep_or_stop};
use crate::error::Error;
use crate::queue::PgQueue;

/// The pruner service.
#[derive(Debug)]
pub(crate) struct Pruner {
    service: Service,
}

impl Pruner {
    pub(crate) fn start(
        queue: PgQueue,
        retention: Duration,
        interval: Duration,
        leader: Arc<Leadership>,
    ) -> Self {
        let service = Service::spawn("pruner", move |stop| async move {
            while !sleep_or_stop(&stop, interval).await {
                if leader.is_leader() {
                    match prune_once(&queue, retention).await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(target: "hephaestus_queue", pruned = n, "pruned finished jobs");
                        }
                        Err(error) => {
                            tracing::warn!(target: "hephaestus_queue", %error, "prune failed");
                        }
                    }
                }
            }
        });
        Self { service }
    }

    /// Stops pruning. Idempotent.
    pub(crate) async fn stop(&self) {
        self.service.stop().await;
    }

    pub(crate) fn signal_stop(&self) {
        self.service.signal_stop();
    }
}

/// Deletes jobs finished before now minus `retention`.
pub(crate) async fn prune_once(queue: &PgQueue, retention: Duration) -> Result<u64, Error> {
    let before = queue.now() - TimeDelta::from_std(retention).unwrap_or(TimeDelta::MAX);
    queue.prune(before).await
}
