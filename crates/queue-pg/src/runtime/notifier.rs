//! The notifier: one LISTEN connection per runtime. `i:<queue>` wakes that
//! queue's producer; `s:<queue>:<unix ms>` tells it when a scheduled or
//! retried job becomes due; `c:<job id>` tells a running job of this process
//! to stop. After a lost connection (sqlx reconnects by itself) every producer
//! is woken, since notifications may have been missed; the producers' poll
//! interval covers the rest.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hephaestus_engine_core::ports::JobId;
use sqlx::postgres::PgListener;

use super::Shared;
use super::producer::Wakes;
use super::service::{Service, sleep_or_stop};
use crate::error::Error;
use crate::events::JobEventKind;

/// The notifier service.
#[derive(Debug)]
pub(crate) struct Notifier {
    service: Service,
}

impl Notifier {
    /// Listens on the queue's channel; returns once LISTEN is in effect.
    pub(crate) async fn start(
        shared: Arc<Shared>,
        producers: HashMap<String, Arc<Wakes>>,
    ) -> Result<Self, Error> {
        let mut listener = PgListener::connect_with(shared.queue.pool()).await?;
        listener.listen(shared.queue.channel()).await?;
        let service = Service::spawn("notifier", move |stop| async move {
            loop {
                let received = tokio::select! {
                    () = stop.cancelled() => break,
                    received = listener.recv() => received,
                };
                match received {
                    Ok(notification) => dispatch(&shared, &producers, notification.payload()),
                    Err(error) => {
                        tracing::warn!(target: "hephaestus_queue", %error, "LISTEN connection failed; reconnecting");
                        for wakes in producers.values() {
                            wakes.jobs_available();
                        }
                        if sleep_or_stop(&stop, Duration::from_millis(500)).await {
                            break;
                        }
                    }
                }
            }
            if let Err(error) = listener.unlisten_all().await {
                tracing::debug!(target: "hephaestus_queue", %error, "UNLISTEN failed");
            }
        });
        Ok(Self { service })
    }

    /// Stops listening. Idempotent.
    pub(crate) async fn stop(&self) {
        self.service.stop().await;
    }

    pub(crate) fn signal_stop(&self) {
        self.service.signal_stop();
    }
}

fn dispatch(shared: &Shared, producers: &HashMap<String, Arc<Wakes>>, payload: &str) {
    if let Some(queue) = payload.strip_prefix("i:") {
        if let Some(wakes) = producers.get(queue) {
            wakes.jobs_available();
        }
    } else if let Some(scheduled) = payload.strip_prefix("s:") {
        // The queue name may itself hold ':'; the time is after the last one.
        if let Some((queue, millis)) = scheduled.rsplit_once(':')
            && let Some(wakes) = producers.get(queue)
            && let Ok(millis) = millis.parse::<i64>()
            && let Some(at) = chrono::DateTime::from_timestamp_millis(millis)
        {
            wakes.due_at(at);
        }
    } else if let Some(id) = payload.strip_prefix("c:")
        && let Ok(id) = id.parse::<i64>()
        && let Some(job) = shared.running.request_stop(JobId(id), None)
    {
        shared
            .events
            .emit(job.lease(), JobEventKind::StopRequested, None, None);
    }
}
