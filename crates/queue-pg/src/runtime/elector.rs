//! Leader election for the maintenance services (rescuer, pruner, depth
//! gauge, and whatever else asks [`QueueRuntime::is_leader`]): a lease in
//! `hephaestus_leases` with a deadline in the database's clock.
//!
//! - A follower tries every `interval` to take the lease: one statement
//!   that inserts it, or takes it over when it has lapsed.
//! - The leader renews it every `interval`, pushing its deadline `ttl`
//!   ahead; a renewal that finds the lease held by another or lapsed means
//!   the leadership was lost.
//! - The leader believes it leads only until a LOCAL deadline: the moment
//!   it sent its last successful renewal plus `ttl`, on the monotonic clock
//!   (measured before the statement was sent, so never later than the
//!   database's deadline). A leader that was stopped (SIGSTOP, a frozen VM)
//!   and comes back finds its local deadline passed and stops acting as
//!   leader before doing anything else, even before its next renewal fails.
//! - Every statement is one autocommit statement from the pool: no session
//!   state, so it works through PgBouncer in transaction mode.
//!
//! On a graceful stop the leader deletes its lease so another runtime takes
//! over at its next attempt instead of after `ttl`.
//!
//! [`QueueRuntime::is_leader`]: super::QueueRuntime::is_leader

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::lock_ignoring_poison;
use super::service::{Service, sleep_or_stop};
use crate::queue::PgQueue;

/// The lease the maintenance services run under.
pub(crate) const MAINTENANCE: &str = "maintenance";

/// `$1` name, `$2` holder, `$3` ttl in ms. Takes the lease when nobody
/// holds it, its holder let it lapse, or this holder has it already (a
/// leader whose local deadline passed while the lease still ran takes it
/// back at once instead of leaving a gap); returns a row when this holder
/// got it.
const ACQUIRE: &str = r"insert into {prefix}.hephaestus_leases as l
    (name, holder, acquired_at, renewed_at, expires_at)
values ($1, $2, clock_timestamp(), clock_timestamp(),
        clock_timestamp() + $3 * interval '1 millisecond')
on conflict (name) do update
set holder = excluded.holder, acquired_at = excluded.acquired_at,
    renewed_at = excluded.renewed_at, expires_at = excluded.expires_at
where l.expires_at < clock_timestamp() or l.holder = excluded.holder
returning l.holder";

/// `$1` name, `$2` holder, `$3` ttl in ms. Holds only while this holder
/// still has an unexpired lease.
const RENEW: &str = r"update {prefix}.hephaestus_leases
set renewed_at = clock_timestamp(), expires_at = clock_timestamp() + $3 * interval '1 millisecond'
where name = $1 and holder = $2 and expires_at >= clock_timestamp()
returning holder";

/// `$1` name, `$2` holder.
const RESIGN: &str = r"delete from {prefix}.hephaestus_leases where name = $1 and holder = $2";

/// Whether this runtime leads, and until when it may believe so.
#[derive(Debug, Default)]
pub(crate) struct Leadership {
    deadline: Mutex<Option<Instant>>,
}

impl Leadership {
    /// True while the last successful renewal (or acquisition) is less than
    /// `ttl` old on this process's monotonic clock.
    pub(crate) fn is_leader(&self) -> bool {
        lock_ignoring_poison(&self.deadline).is_some_and(|deadline| Instant::now() < deadline)
    }

    fn lead_until(&self, deadline: Instant) {
        *lock_ignoring_poison(&self.deadline) = Some(deadline);
    }

    /// Forgets the leadership; returns whether it was still believed.
    fn lose(&self) -> bool {
        lock_ignoring_poison(&self.deadline)
            .take()
            .is_some_and(|deadline| Instant::now() < deadline)
    }

    fn held(&self) -> bool {
        lock_ignoring_poison(&self.deadline).is_some()
    }
}

/// The elector service.
#[derive(Debug)]
pub(crate) struct Elector {
    service: Service,
    leadership: Arc<Leadership>,
}

struct Campaign {
    queue: PgQueue,
    holder: String,
    ttl: Duration,
    leadership: Arc<Leadership>,
    acquire: String,
    renew: String,
    resign: String,
}

impl Elector {
    /// Tries once to become leader, then keeps trying (or renewing, while
    /// leader) every `interval`. `holder` names this runtime in the lease.
    pub(crate) async fn start(
        queue: PgQueue,
        holder: String,
        interval: Duration,
        ttl: Duration,
    ) -> Self {
        let leadership = Arc::new(Leadership::default());
        let prefix = queue.prefix().clone();
        let render = |sql: &str| sql.replace("{prefix}", &prefix.quoted());
        let mut campaign = Campaign {
            acquire: render(ACQUIRE),
            renew: render(RENEW),
            resign: render(RESIGN),
            queue,
            holder,
            ttl,
            leadership: Arc::clone(&leadership),
        };
        campaign.step().await;
        let service = Service::spawn("elector", move |stop| async move {
            while !sleep_or_stop(&stop, interval).await {
                campaign.step().await;
            }
            campaign.resign().await;
        });
        Self {
            service,
            leadership,
        }
    }

    /// Whether this runtime leads.
    pub(crate) fn is_leader(&self) -> bool {
        self.leadership.is_leader()
    }

    /// The shared leadership.
    pub(crate) fn leadership(&self) -> Arc<Leadership> {
        Arc::clone(&self.leadership)
    }

    /// Gives up leadership. Idempotent.
    pub(crate) async fn stop(&self) {
        self.service.stop().await;
    }

    pub(crate) fn signal_stop(&self) {
        self.service.signal_stop();
    }
}

impl Campaign {
    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
    }

    async fn step(&mut self) {
        let renewing = self.leadership.held();
        if renewing && !self.leadership.is_leader() {
            // Back from a stall longer than the lease: stop acting as
            // leader now, before the renewal tells whether another took over.
            tracing::warn!(
                target: "hephaestus_queue",
                holder = %self.holder,
                "lost the maintenance lease: it lapsed before it was renewed (was this process stopped?)"
            );
            self.leadership.lose();
        }
        // Measured before the statement is sent: the database's deadline is
        // at least this late.
        let sent = Instant::now();
        let sql = if self.leadership.held() {
            &self.renew
        } else {
            &self.acquire
        };
        let result = sqlx::query_scalar::<_, String>(sql)
            .persistent(self.queue.persistent())
            .bind(MAINTENANCE)
            .bind(&self.holder)
            .bind(self.ttl_ms())
            .fetch_optional(self.queue.db())
            .await;
        match result {
            Ok(Some(_)) => {
                if !self.leadership.held() {
                    tracing::info!(
                        target: "hephaestus_queue",
                        holder = %self.holder,
                        "became the maintenance leader"
                    );
                }
                self.leadership.lead_until(sent + self.ttl);
            }
            Ok(None) => {
                if self.leadership.held() {
                    self.leadership.lose();
                    tracing::warn!(
                        target: "hephaestus_queue",
                        holder = %self.holder,
                        "lost the maintenance lease: another runtime holds it"
                    );
                }
            }
            Err(error) => {
                // The local deadline still bounds the leadership: nothing to
                // forget before it passes.
                tracing::warn!(target: "hephaestus_queue", %error, "leader election failed");
            }
        }
    }

    async fn resign(&mut self) {
        if !self.leadership.held() {
            return;
        }
        self.leadership.lose();
        if let Err(error) = sqlx::query(&self.resign)
            .persistent(self.queue.persistent())
            .bind(MAINTENANCE)
            .bind(&self.holder)
            .execute(self.queue.db())
            .await
        {
            tracing::warn!(target: "hephaestus_queue", %error, "could not give up the maintenance lease");
        }
    }
}
