//! The one clock abstraction. Every time the system decides on (engine
//! history, queue due times, retry and rescue cut-offs, telemetry
//! timestamps, the timestamps the storage crates write) comes from a
//! [`Clock`] handed to the component, so one [`ManualClock`] moves all of
//! them together in a test.
//!
//! The engine itself never reads a clock: its functions take the time as an
//! argument. [`SystemClock`] is the only place in this crate that reads the
//! wall clock, and it is only ever called by the crates above.
//!
//! Times are whole microseconds (what PostgreSQL's `timestamptz` and the
//! other stores keep), so a value read back equals the value written.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, TimeZone as _, Utc};

use crate::step::lock_ignoring_poison;

/// A source of the current time.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time, in whole microseconds.
    fn now(&self) -> DateTime<Utc>;
}

/// A clock shared by the components of one deployment.
pub type SharedClock = Arc<dyn Clock>;

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> DateTime<Utc> {
        (**self).now()
    }
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        truncate_micros(Utc::now())
    }
}

/// The wall clock as a [`SharedClock`].
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// A clock that only moves when told to; clones share one time.
#[derive(Clone)]
pub struct ManualClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualClock")
            .field("now", &self.now())
            .finish()
    }
}

impl Default for ManualClock {
    /// Stopped at 2030-01-01T00:00:00Z.
    fn default() -> Self {
        Self::new(
            Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0)
                .single()
                .unwrap_or_default(),
        )
    }
}

impl ManualClock {
    /// A clock stopped at `now`.
    pub fn new(now: DateTime<Utc>) -> Self {
        Self {
            now: Arc::new(Mutex::new(truncate_micros(now))),
        }
    }

    /// The current time (as [`Clock::now`], without importing the trait).
    pub fn now(&self) -> DateTime<Utc> {
        *lock_ignoring_poison(&self.now)
    }

    /// Moves the clock forward by `by`; a move past the last representable
    /// time leaves it where it is.
    pub fn advance(&self, by: Duration) {
        let delta = TimeDelta::from_std(by).unwrap_or(TimeDelta::MAX);
        let mut now = lock_ignoring_poison(&self.now);
        *now = truncate_micros(now.checked_add_signed(delta).unwrap_or(*now));
    }

    /// Sets the time (forward or back).
    pub fn set(&self, to: DateTime<Utc>) {
        *lock_ignoring_poison(&self.now) = truncate_micros(to);
    }

    /// This clock as a [`SharedClock`] (it keeps sharing the time).
    pub fn shared(&self) -> SharedClock {
        Arc::new(self.clone())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        ManualClock::now(self)
    }
}

/// `t` without its sub-microsecond part.
pub fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_clones_share_it() {
        let start = DateTime::from_timestamp(1_000, 123_456_789).unwrap();
        let clock = ManualClock::new(start);
        let shared = clock.shared();
        assert_eq!(clock.now().timestamp_subsec_nanos(), 123_456_000);
        clock.advance(Duration::from_secs(5));
        assert_eq!(shared.now().timestamp(), 1_005);
        clock.set(start);
        assert_eq!(shared.now().timestamp(), 1_000);
        clock.advance(Duration::MAX);
        assert_eq!(
            shared.now().timestamp(),
            1_000,
            "an impossible move is ignored, never wrapped"
        );
        assert_eq!(SystemClock.now().timestamp_subsec_nanos() % 1_000, 0);
    }
}
