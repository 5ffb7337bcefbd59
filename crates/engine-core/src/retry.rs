//! Retry policies and backoff: exponential, linear or constant, clamped by a
//! maximum and spread by bounded jitter. Resolution is most specific first:
//! step, then workflow, then [`RetryPolicy::default`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What follows a failed attempt ([`RetryPolicy::decide`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again after this delay.
    RetryAfter(Duration),
    /// Give up: the error is fatal, or no attempt is left.
    Discard,
}

/// How the delay grows with the attempt number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backoff {
    /// `base · 2^(attempt−1)`.
    Exponential,
    /// `base · attempt`.
    Linear,
    /// `base`.
    Constant,
}

/// Why a retry policy was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RetryPolicyError {
    /// `max_attempts` must be at least 1.
    #[error("max_attempts must be at least 1, got: {0}")]
    ZeroAttempts(u32),
    /// Jitter is a fraction in `[0, 1]`, in per-mille.
    #[error("jitter must be between 0 and 1000 per mille, got: {0}")]
    JitterOutOfRange(u16),
    /// The base delay must not exceed the maximum.
    #[error("base delay {base:?} exceeds max_backoff {max:?}")]
    BaseAboveMax {
        /// The base delay.
        base: Duration,
        /// The maximum.
        max: Duration,
    },
}

/// A retry policy: how many attempts, and how long to wait between them.
/// Build it with [`RetryPolicy::new`] (then
/// [`RetryPolicy::with_jitter_per_mille`]) or take [`Default`]: both check
/// the invariants, and a field can be added without breaking callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = never retry).
    pub max_attempts: u32,
    /// The growth strategy.
    pub backoff: Backoff,
    /// The base delay `B`, in milliseconds.
    pub base_ms: u64,
    /// The clamp `M` on any delay, in milliseconds.
    pub max_backoff_ms: u64,
    /// Jitter in per-mille of the delay: the delay is spread uniformly over
    /// `[d·(1−j), d·(1+j)]`, then clamped to `max_backoff`.
    pub jitter_per_mille: u16,
}

impl Default for RetryPolicy {
    /// `{max_attempts: 5, backoff: exponential, base 1 s, max_backoff 60 s, jitter 10 %}`.
    fn default() -> Self {
        Self {
            max_attempts: 5,
            backoff: Backoff::Exponential,
            base_ms: 1_000,
            max_backoff_ms: 60_000,
            jitter_per_mille: 100,
        }
    }
}

impl RetryPolicy {
    /// A validated policy with no jitter.
    pub fn new(
        max_attempts: u32,
        backoff: Backoff,
        base: Duration,
        max_backoff: Duration,
    ) -> Result<Self, RetryPolicyError> {
        let policy = Self {
            max_attempts,
            backoff,
            base_ms: duration_ms(base),
            max_backoff_ms: duration_ms(max_backoff),
            jitter_per_mille: 0,
        };
        policy.validate()?;
        Ok(policy)
    }

    /// A policy that never retries.
    pub fn no_retries() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Sets the jitter fraction in per-mille (0–1000).
    pub fn with_jitter_per_mille(mut self, jitter: u16) -> Result<Self, RetryPolicyError> {
        self.jitter_per_mille = jitter;
        self.validate()?;
        Ok(self)
    }

    /// Checks the invariants (also after deserialization).
    pub fn validate(&self) -> Result<(), RetryPolicyError> {
        if self.max_attempts == 0 {
            return Err(RetryPolicyError::ZeroAttempts(0));
        }
        if self.jitter_per_mille > 1000 {
            return Err(RetryPolicyError::JitterOutOfRange(self.jitter_per_mille));
        }
        if self.base_ms > self.max_backoff_ms {
            return Err(RetryPolicyError::BaseAboveMax {
                base: Duration::from_millis(self.base_ms),
                max: Duration::from_millis(self.max_backoff_ms),
            });
        }
        Ok(())
    }

    /// Whether a failed `attempt` (1-based) may be followed by another.
    pub fn should_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// What follows the failed `attempt` (1-based) of a job allowed
    /// `max_attempts` attempts, that failed with `error`: the one retry
    /// decision the queue and the runner both make. A fatal error, or the
    /// last attempt, discards; otherwise the error's own delay wins, else
    /// this policy's backoff with jitter from `sample` (a uniformly random
    /// number from the caller: the engine reads no randomness).
    pub fn decide(
        &self,
        attempt: u32,
        max_attempts: u32,
        error: &crate::step::StepError,
        sample: u32,
    ) -> RetryDecision {
        match error.kind {
            crate::step::ErrorKind::Fatal => RetryDecision::Discard,
            _ if attempt >= max_attempts => RetryDecision::Discard,
            crate::step::ErrorKind::Retryable {
                after_ms: Some(after),
            } => RetryDecision::RetryAfter(Duration::from_millis(after)),
            crate::step::ErrorKind::Retryable { after_ms: None } => {
                RetryDecision::RetryAfter(self.delay(attempt, sample))
            }
        }
    }

    /// The delay before the attempt after the failed `attempt` (1-based),
    /// without jitter: the strategy's value clamped to `max_backoff`.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let attempt = u64::from(attempt.max(1));
        let raw = match self.backoff {
            Backoff::Exponential => {
                let shift = u32::try_from(attempt - 1).unwrap_or(u32::MAX).min(63);
                self.base_ms.saturating_mul(1_u64 << shift)
            }
            Backoff::Linear => self.base_ms.saturating_mul(attempt),
            Backoff::Constant => self.base_ms,
        };
        Duration::from_millis(raw.min(self.max_backoff_ms))
    }

    /// The delay with jitter. `sample` is a uniformly random number supplied
    /// by the caller (the engine reads no randomness itself); the result is
    /// within `[d·(1−j), d·(1+j)]` and never above `max_backoff`.
    pub fn delay(&self, attempt: u32, sample: u32) -> Duration {
        let base = self.base_delay(attempt);
        if self.jitter_per_mille == 0 {
            return base;
        }
        let jitter = i128::from(self.jitter_per_mille);
        // A factor in per-mille, uniform over [−j, j].
        let factor = i128::from(sample) % (2 * jitter + 1) - jitter;
        let base_ms = i128::from(duration_ms(base));
        let jittered =
            (base_ms + base_ms * factor / 1000).clamp(0, i128::from(self.max_backoff_ms));
        Duration::from_millis(u64::try_from(jittered).unwrap_or(self.max_backoff_ms))
    }

    /// Resolves the policy for a step: the step's own, else the workflow's,
    /// else the default.
    pub fn resolve(step: Option<Self>, workflow: Option<Self>) -> Self {
        step.or(workflow).unwrap_or_default()
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The jitter sample of attempt `attempt` of job `job`, for
/// [`RetryPolicy::decide`] and [`RetryPolicy::delay`]: the one source of
/// jitter for the queue and the runner. A well-mixed hash of the two
/// (SplitMix64's finalizer), not a random draw: the engine reads no
/// randomness, a failed attempt always gets the same delay (runs and tests
/// reproduce), and jobs that fail together still spread out, since their
/// ids differ.
pub fn jitter_sample(job: i64, attempt: u32) -> u32 {
    let mut x = u64::from_le_bytes(job.to_le_bytes())
        ^ u64::from(attempt).rotate_left(32)
        ^ 0x9e37_79b9_7f4a_7c15;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    // The high half: the best-mixed bits.
    u32::try_from(x >> 32).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {

    #[test]
    fn jitter_samples_spread_jobs_that_fail_together() {
        let policy = RetryPolicy::default().with_jitter_per_mille(100).unwrap();
        let base = policy.base_delay(1);
        // A thousand consecutive jobs failing their first attempt at once.
        let delays: Vec<Duration> = (1..=1000)
            .map(|job| policy.delay(1, jitter_sample(job, 1)))
            .collect();
        let below = delays.iter().filter(|d| **d < base).count();
        let above = delays.iter().filter(|d| **d > base).count();
        assert!(
            (400..=600).contains(&below),
            "{below} of 1000 below the base delay"
        );
        assert!(
            (400..=600).contains(&above),
            "{above} of 1000 above the base delay"
        );
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(
            distinct.len() > 150,
            "only {} distinct delays",
            distinct.len()
        );
        // Every delay stays within the jitter band.
        let band = base.mul_f64(0.1);
        assert!(
            delays
                .iter()
                .all(|d| Some(*d) >= base.checked_sub(band) && *d <= base + band)
        );
        // The same attempt gets the same sample; the next attempt another.
        assert_eq!(jitter_sample(42, 3), jitter_sample(42, 3));
        assert_ne!(jitter_sample(42, 3), jitter_sample(42, 4));
        assert_ne!(jitter_sample(42, 3), jitter_sample(43, 3));
    }

    #[test]
    fn decide_discards_fatal_and_last_attempts_and_prefers_explicit_delays() {
        use crate::step::StepError;
        let policy = RetryPolicy::new(
            5,
            Backoff::Linear,
            Duration::from_secs(2),
            Duration::from_secs(60),
        )
        .unwrap()
        .with_jitter_per_mille(0)
        .unwrap();
        assert_eq!(
            policy.decide(1, 5, &StepError::fatal("x"), 0),
            RetryDecision::Discard
        );
        assert_eq!(
            policy.decide(3, 5, &StepError::retryable("x"), 0),
            RetryDecision::RetryAfter(Duration::from_secs(6))
        );
        assert_eq!(
            policy.decide(
                3,
                5,
                &StepError::retry_after("x", Duration::from_millis(1500)),
                0
            ),
            RetryDecision::RetryAfter(Duration::from_millis(1500))
        );
        assert_eq!(
            policy.decide(5, 5, &StepError::retryable("x"), 0),
            RetryDecision::Discard,
            "the last attempt"
        );
        assert_eq!(
            policy.decide(
                2,
                2,
                &StepError::retry_after("x", Duration::from_secs(1)),
                0
            ),
            RetryDecision::Discard,
            "an explicit delay does not add an attempt"
        );
    }

    use super::*;
    use proptest::prelude::*;

    fn policy(backoff: Backoff, base: u64, max: u64) -> RetryPolicy {
        RetryPolicy::new(
            5,
            backoff,
            Duration::from_millis(base),
            Duration::from_millis(max),
        )
        .unwrap()
    }

    #[test]
    fn strategies_follow_their_formulas_and_clamp() {
        let exp = policy(Backoff::Exponential, 1000, 60_000);
        let got: Vec<u64> = (1..=8).map(|a| duration_ms(exp.base_delay(a))).collect();
        assert_eq!(got, [1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000]);
        let lin = policy(Backoff::Linear, 500, 2_000);
        let got: Vec<u64> = (1..=6).map(|a| duration_ms(lin.base_delay(a))).collect();
        assert_eq!(got, [500, 1000, 1500, 2000, 2000, 2000]);
        let con = policy(Backoff::Constant, 700, 700);
        assert!((1..=10).all(|a| con.base_delay(a) == Duration::from_millis(700)));
        // Huge attempt numbers saturate rather than overflow.
        assert_eq!(exp.base_delay(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn default_policy_matches_the_documented_default() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_attempts, 5);
        assert_eq!(p.backoff, Backoff::Exponential);
        assert_eq!(p.max_backoff_ms, 60_000);
        assert!(p.should_retry(4));
        assert!(!p.should_retry(5));
    }

    #[test]
    fn resolution_is_step_then_workflow_then_default() {
        let step = RetryPolicy::no_retries();
        let wf = policy(Backoff::Linear, 10, 100);
        assert_eq!(RetryPolicy::resolve(Some(step), Some(wf)), step);
        assert_eq!(RetryPolicy::resolve(None, Some(wf)), wf);
        assert_eq!(RetryPolicy::resolve(None, None), RetryPolicy::default());
    }

    #[test]
    fn invalid_policies_are_typed_errors() {
        assert_eq!(
            RetryPolicy::new(0, Backoff::Constant, Duration::ZERO, Duration::ZERO),
            Err(RetryPolicyError::ZeroAttempts(0))
        );
        assert!(matches!(
            RetryPolicy::new(
                3,
                Backoff::Constant,
                Duration::from_secs(2),
                Duration::from_secs(1)
            ),
            Err(RetryPolicyError::BaseAboveMax { .. })
        ));
        assert_eq!(
            RetryPolicy::default().with_jitter_per_mille(1001),
            Err(RetryPolicyError::JitterOutOfRange(1001))
        );
    }

    #[test]
    fn jitter_extremes() {
        let p = policy(Backoff::Constant, 1000, 10_000)
            .with_jitter_per_mille(200)
            .unwrap();
        // sample % 401 − 200 is the factor in per-mille.
        assert_eq!(p.delay(1, 0), Duration::from_millis(800));
        assert_eq!(p.delay(1, 400), Duration::from_millis(1200));
        assert_eq!(p.delay(1, 200), Duration::from_secs(1));
        assert_eq!(p.delay(1, 401), Duration::from_millis(800));
        // Clamped to max_backoff even with positive jitter.
        let capped = policy(Backoff::Constant, 1000, 1000)
            .with_jitter_per_mille(500)
            .unwrap();
        assert_eq!(capped.delay(1, 1000), Duration::from_secs(1));
    }

    proptest! {
        #[test]
        fn jittered_delay_is_bounded(
            attempt in 1u32..100,
            sample in any::<u32>(),
            jitter in 0u16..=1000,
            base in 0u64..10_000,
            extra in 0u64..100_000,
            backoff in prop_oneof![Just(Backoff::Exponential), Just(Backoff::Linear), Just(Backoff::Constant)],
        ) {
            let p = RetryPolicy::new(5, backoff, Duration::from_millis(base), Duration::from_millis(base + extra))
                .unwrap()
                .with_jitter_per_mille(jitter)
                .unwrap();
            let d = duration_ms(p.base_delay(attempt));
            let got = duration_ms(p.delay(attempt, sample));
            let spread = d * u64::from(jitter) / 1000 + 1;
            prop_assert!(got <= p.max_backoff_ms);
            prop_assert!(got + spread >= d, "{got} too far below {d}");
            prop_assert!(got <= d + spread, "{got} too far above {d}");
        }

        #[test]
        fn base_delay_is_monotonic(attempt in 1u32..200) {
            let p = RetryPolicy::default();
            prop_assert!(p.base_delay(attempt) <= p.base_delay(attempt + 1));
        }
    }
}
