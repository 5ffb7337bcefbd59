//! The depth reporter (leader only): sets the `hephaestus_queue_jobs` gauge
//! (jobs per queue and state) every interval; a pair seen before and now
//! empty is set to 0.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::elector::Leadership;
use super::service::{Service, sleep_or_stop};
use crate::queue::PgQueue;

/// The depth reporter service.
#[derive(Debug)]
pub(crate) struct DepthReporter {
    service: Service,
}

impl DepthReporter {
    pub(crate) fn start(queue: PgQueue, interval: Duration, leader: Arc<Leadership>) -> Self {
        let service = Service::spawn("depth", move |stop| async move {
            let mut seen: HashSet<(String, &'static str)> = HashSet::new();
            while !sleep_or_stop(&stop, interval).await {
                if !leader.is_leader() {
                    continue;
                }
                match queue.depth().await {
                    Ok(depth) => {
                        let mut now_seen = HashSet::new();
                        for d in depth {
                            let state = d.state.as_str();
                            metrics::gauge!(
                                "hephaestus_queue_jobs",
                                "queue" => d.queue.clone(),
                                "state" => state
                            )
                            .set(u32::try_from(d.count).map_or(f64::from(u32::MAX), f64::from));
                            now_seen.insert((d.queue, state));
                        }
                        for (queue, state) in seen.difference(&now_seen) {
                            metrics::gauge!("hephaestus_queue_jobs", "queue" => queue.clone(), "state" => *state)
                                .set(0.0);
                        }
                        seen = now_seen;
                    }
                    Err(error) => {
                        tracing::warn!(target: "hephaestus_queue", %error, "reading queue depth failed");
                    }
                }
            }
        });
        Self { service }
    }

    /// Stops reporting. Idempotent.
    pub(crate) async fn stop(&self) {
        self.service.stop().await;
    }

    pub(crate) fn signal_stop(&self) {
        self.service.signal_stop();
    }
}
