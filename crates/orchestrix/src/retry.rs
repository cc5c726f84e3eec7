//! Retry policy: how many times a step is retried and how long to wait in between.
//!
//! A [`RetryPolicy`] is a small value: it computes delays and nothing else. The engine
//! does the sleeping (and makes the sleep cancellable), so the formulas can be read and
//! tested on their own.

use std::time::Duration;

/// How the delay grows from one retry to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Backoff {
    /// The same delay before every retry: `d`.
    #[default]
    Fixed,
    /// Grows by `d` each retry: `d·(n+1)` before retry `n` (0-based).
    Linear,
    /// Doubles each retry: `d·2ⁿ` before retry `n` (0-based).
    Exponential,
}

/// Retries of one step: extra attempts after the first, the delay between them, and the
/// cap and jitter applied to that delay.
///
/// ```
/// use std::time::Duration;
/// use orchestrix::RetryPolicy;
///
/// let policy = RetryPolicy::retries(4)
///     .exponential(Duration::from_millis(100))
///     .max_delay(Duration::from_millis(500));
/// let delays: Vec<_> = (0..4).map(|n| policy.delay(n)).collect();
/// assert_eq!(delays, [100, 200, 400, 500].map(Duration::from_millis));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetryPolicy {
    retries: u32,
    delay: Duration,
    backoff: Backoff,
    max_delay: Option<Duration>,
    jitter: bool,
}

impl RetryPolicy {
    /// No retries: one attempt only. The default.
    pub const fn none() -> Self {
        Self::retries(0)
    }

    /// `n` retries after the first attempt, with no delay until one is set.
    pub const fn retries(n: u32) -> Self {
        Self {
            retries: n,
            delay: Duration::ZERO,
            backoff: Backoff::Fixed,
            max_delay: None,
            jitter: false,
        }
    }

    /// Waits `delay` before every retry.
    pub const fn fixed(self, delay: Duration) -> Self {
        self.with_backoff(Backoff::Fixed, delay)
    }

    /// Waits `delay·(n+1)` before retry `n`.
    pub const fn linear(self, delay: Duration) -> Self {
        self.with_backoff(Backoff::Linear, delay)
    }

    /// Waits `delay·2ⁿ` before retry `n`.
    pub const fn exponential(self, delay: Duration) -> Self {
        self.with_backoff(Backoff::Exponential, delay)
    }

    /// Sets the growth and the base delay.
    pub const fn with_backoff(mut self, backoff: Backoff, delay: Duration) -> Self {
        self.backoff = backoff;
        self.delay = delay;
        self
    }

    /// Caps every delay at `max`.
    pub const fn max_delay(mut self, max: Duration) -> Self {
        self.max_delay = Some(max);
        self
    }

    /// Draws each actual delay uniformly in `[0, delay]` ("full jitter"), so retries of
    /// many callers do not arrive in lockstep.
    pub const fn with_jitter(mut self) -> Self {
        self.jitter = true;
        self
    }

    /// How many retries follow the first attempt.
    pub const fn max_retries(&self) -> u32 {
        self.retries
    }

    /// The delay before retry `n` (0-based), after the cap and before jitter.
    pub fn delay(&self, n: u32) -> Duration {
        let raw = match self.backoff {
            Backoff::Fixed => self.delay,
            Backoff::Linear => self.delay.saturating_mul(n.saturating_add(1)),
            Backoff::Exponential => 1u32
                .checked_shl(n)
                .map_or(Duration::MAX, |factor| self.delay.saturating_mul(factor)),
        };
        self.max_delay.map_or(raw, |max| raw.min(max))
    }

    /// The delay to actually wait before retry `n`: [`delay`](Self::delay) with jitter
    /// applied when enabled.
    pub fn sleep_before(&self, n: u32) -> Duration {
        let delay = self.delay(n);
        if self.jitter { jitter(delay) } else { delay }
    }
}

/// A uniform draw in `[0, delay]`.
fn jitter(delay: Duration) -> Duration {
    let nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_millis(100);

    fn delays(policy: RetryPolicy) -> Vec<u64> {
        (0..5).map(|n| policy.delay(n).as_millis() as u64).collect()
    }

    #[test]
    fn fixed_backoff_waits_the_same_delay_every_retry() {
        assert_eq!(delays(RetryPolicy::retries(5).fixed(D)), [100; 5]);
    }

    #[test]
    fn linear_backoff_grows_by_the_base_delay() {
        assert_eq!(
            delays(RetryPolicy::retries(5).linear(D)),
            [100, 200, 300, 400, 500]
        );
    }

    #[test]
    fn exponential_backoff_doubles() {
        assert_eq!(
            delays(RetryPolicy::retries(5).exponential(D)),
            [100, 200, 400, 800, 1600]
        );
    }

    #[test]
    fn max_delay_caps_every_formula() {
        let cap = Duration::from_millis(250);
        for policy in [
            RetryPolicy::retries(5).fixed(Duration::from_secs(1)),
            RetryPolicy::retries(5).linear(D),
            RetryPolicy::retries(5).exponential(D),
        ] {
            let capped = policy.max_delay(cap);
            for n in 0..5 {
                assert_eq!(capped.delay(n), policy.delay(n).min(cap));
            }
        }
    }

    #[test]
    fn exponential_backoff_saturates_instead_of_overflowing() {
        let policy = RetryPolicy::retries(100).exponential(D);
        assert_eq!(policy.delay(40), Duration::MAX);
        assert_eq!(policy.max_delay(D).delay(99), D);
    }

    #[test]
    fn jitter_stays_within_zero_and_the_delay() {
        let policy = RetryPolicy::retries(3).exponential(D).with_jitter();
        let mut below_half = false;
        for _ in 0..2000 {
            for n in 0..3 {
                let drawn = policy.sleep_before(n);
                assert!(
                    drawn <= policy.delay(n),
                    "{drawn:?} > {:?}",
                    policy.delay(n)
                );
                below_half |= drawn < policy.delay(n) / 2;
            }
        }
        assert!(
            below_half,
            "jitter must actually spread delays below the maximum"
        );
    }

    #[test]
    fn without_jitter_the_sleep_is_the_delay() {
        let policy = RetryPolicy::retries(3).linear(D);
        assert_eq!(policy.sleep_before(2), Duration::from_millis(300));
    }

    #[test]
    fn none_means_a_single_attempt() {
        assert_eq!(RetryPolicy::none().max_retries(), 0);
        assert_eq!(RetryPolicy::default(), RetryPolicy::none());
    }
}
