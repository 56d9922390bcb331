//! Per-event time limits and the retry backoff.

use std::time::Duration;

/// The part of a retry delay that is random: up to this fraction is added to each computed delay,
/// so that deliveries failing together do not all come back at the same moment.
const JITTER: f64 = 0.1;

/// The longest duration any setting may have; keeps every time computation in range.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Time limits and retry policy for the deliveries of one event type.
///
/// Every delivery (one event, one listener) is governed by them:
/// - it is run at most [`max_execution_time`](Self::max_execution_time) at a time; past that the
///   listener is cancelled and the run counts as a failure. This is also the lease: while a run may
///   still be going on, no other process takes the delivery;
/// - after a failure the next attempt comes [`retry_after`](Self::retry_after) later, each further
///   one [`backoff_factor`](Self::backoff_factor) times longer, never longer than
///   [`max_backoff`](Self::max_backoff) (plus up to 10% random jitter);
/// - it gives up and becomes a dead letter when the next attempt would come after
///   [`expires_after`](Self::expires_after) (counted from the emit), after
///   [`max_attempts`](Self::max_attempts) attempts if set, or at once when the listener returns
///   [`ListenerError::abort`](crate::ListenerError::abort).
///
/// ```
/// use std::time::Duration;
/// use txbus::EventSettings;
///
/// let settings = EventSettings::default()
///     .expires_after(Duration::from_secs(3600))
///     .max_execution_time(Duration::from_secs(10))
///     .retry_after(Duration::from_secs(2))
///     .max_attempts(8);
/// assert_eq!(settings.get_max_attempts(), Some(8));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EventSettings {
    pub(crate) expires_after: Duration,
    pub(crate) max_execution_time: Duration,
    pub(crate) retry_after: Duration,
    pub(crate) backoff_factor: f64,
    pub(crate) max_backoff: Duration,
    pub(crate) max_attempts: Option<u32>,
    pub(crate) block_key_on_dead: bool,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            expires_after: Duration::from_secs(24 * 3600),
            max_execution_time: Duration::from_secs(30),
            retry_after: Duration::from_secs(5),
            backoff_factor: 2.0,
            max_backoff: Duration::from_secs(3600),
            max_attempts: None,
            block_key_on_dead: false,
        }
    }
}

impl EventSettings {
    /// How long after the emit a delivery keeps being retried. Default: 24 hours.
    ///
    /// Must be longer than [`max_execution_time`](Self::max_execution_time).
    pub fn expires_after(mut self, duration: Duration) -> Self {
        self.expires_after = duration;
        self
    }

    /// The longest a single listener run may take, and the length of the lease that keeps other
    /// processes from running the same delivery meanwhile. Default: 30 seconds.
    pub fn max_execution_time(mut self, duration: Duration) -> Self {
        self.max_execution_time = duration;
        self
    }

    /// The delay before the first retry of a failed delivery. Default: 5 seconds.
    pub fn retry_after(mut self, duration: Duration) -> Self {
        self.retry_after = duration;
        self
    }

    /// How much longer each further retry waits than the one before. Default: 2.0.
    ///
    /// Must be at least 1.0 (1.0 retries at a fixed interval).
    pub fn backoff_factor(mut self, factor: f64) -> Self {
        self.backoff_factor = factor;
        self
    }

    /// The longest delay between two attempts, before jitter. Default: 1 hour.
    ///
    /// Must not be shorter than [`retry_after`](Self::retry_after).
    pub fn max_backoff(mut self, duration: Duration) -> Self {
        self.max_backoff = duration;
        self
    }

    /// Gives up after this many attempts. Default: no limit, only
    /// [`expires_after`](Self::expires_after) ends the retries. Must be at least 1.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// For events with an [ordering key](crate::Event::ordering_key): whether a delivery that
    /// becomes a dead letter holds the later deliveries of its key (for the same listener) until
    /// it is replayed and succeeds, or purged. Default: `false`, the next delivery of the key
    /// runs once the one before it is dead.
    ///
    /// The choice is stored with each delivery when it is emitted.
    pub fn block_key_on_dead(mut self, block: bool) -> Self {
        self.block_key_on_dead = block;
        self
    }

    /// See [`block_key_on_dead`](Self::block_key_on_dead).
    pub fn get_block_key_on_dead(&self) -> bool {
        self.block_key_on_dead
    }

    /// See [`expires_after`](Self::expires_after).
    pub fn get_expires_after(&self) -> Duration {
        self.expires_after
    }

    /// See [`max_execution_time`](Self::max_execution_time).
    pub fn get_max_execution_time(&self) -> Duration {
        self.max_execution_time
    }

    /// See [`retry_after`](Self::retry_after).
    pub fn get_retry_after(&self) -> Duration {
        self.retry_after
    }

    /// See [`backoff_factor`](Self::backoff_factor).
    pub fn get_backoff_factor(&self) -> f64 {
        self.backoff_factor
    }

    /// See [`max_backoff`](Self::max_backoff).
    pub fn get_max_backoff(&self) -> Duration {
        self.max_backoff
    }

    /// See [`max_attempts`](Self::max_attempts).
    pub fn get_max_attempts(&self) -> Option<u32> {
        self.max_attempts
    }

    /// Checks that the settings can be used; the message says which value is wrong and why.
    pub(crate) fn validate(&self) -> Result<(), String> {
        for (name, value) in [
            ("expires_after", self.expires_after),
            ("max_execution_time", self.max_execution_time),
            ("retry_after", self.retry_after),
            ("max_backoff", self.max_backoff),
        ] {
            if value.is_zero() {
                return Err(format!("{name} must be longer than zero"));
            }
            if value > MAX_DURATION {
                return Err(format!("{name} must be at most 100 years, got {value:?}"));
            }
        }
        if self.max_execution_time >= self.expires_after {
            return Err(format!(
                "max_execution_time ({:?}) must be shorter than expires_after ({:?})",
                self.max_execution_time, self.expires_after
            ));
        }
        if !self.backoff_factor.is_finite() || self.backoff_factor < 1.0 {
            return Err(format!(
                "backoff_factor must be a finite number of at least 1.0, got {}",
                self.backoff_factor
            ));
        }
        if self.max_backoff < self.retry_after {
            return Err(format!(
                "max_backoff ({:?}) must not be shorter than retry_after ({:?})",
                self.max_backoff, self.retry_after
            ));
        }
        if self.max_attempts == Some(0) {
            return Err("max_attempts must be at least 1".to_owned());
        }
        Ok(())
    }

    /// Whether a delivery that just failed its `attempt`-th run has used up its attempts.
    pub(crate) fn attempts_exhausted(&self, attempt: u32) -> bool {
        self.max_attempts.is_some_and(|max| attempt >= max)
    }

    /// The delay before the attempt after `attempt` (1 = the first run failed), with jitter.
    pub(crate) fn retry_delay(&self, attempt: u32) -> Duration {
        self.retry_delay_with(attempt, fastrand::f64())
    }

    /// [`retry_delay`](Self::retry_delay) with the random part given, `jitter` in `[0, 1)`.
    fn retry_delay_with(&self, attempt: u32, jitter: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(1024) as i32;
        let base = self.retry_after.as_secs_f64() * self.backoff_factor.powi(exponent);
        let capped = base.min(self.max_backoff.as_secs_f64());
        Duration::from_secs_f64(capped * (1.0 + JITTER * jitter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(EventSettings::default().validate(), Ok(()));
    }

    #[test]
    fn backoff_grows_by_the_factor_and_stops_at_the_cap() {
        let s = EventSettings::default()
            .retry_after(secs(5))
            .backoff_factor(3.0)
            .max_backoff(secs(100));
        assert_eq!(s.retry_delay_with(1, 0.0), secs(5));
        assert_eq!(s.retry_delay_with(2, 0.0), secs(15));
        assert_eq!(s.retry_delay_with(3, 0.0), secs(45));
        assert_eq!(s.retry_delay_with(4, 0.0), secs(100));
        assert_eq!(s.retry_delay_with(u32::MAX, 0.0), secs(100));
    }

    #[test]
    fn jitter_adds_at_most_a_tenth() {
        let s = EventSettings::default()
            .retry_after(secs(10))
            .backoff_factor(1.0);
        assert_eq!(
            s.retry_delay_with(1, 0.5),
            secs(10) + Duration::from_millis(500)
        );
        for attempt in 1..50 {
            let d = s.retry_delay(attempt);
            assert!(d >= secs(10) && d < secs(11), "{d:?}");
        }
    }

    #[test]
    fn max_attempts_counts_runs() {
        let s = EventSettings::default().max_attempts(3);
        assert!(!s.attempts_exhausted(2));
        assert!(s.attempts_exhausted(3));
        assert!(!EventSettings::default().attempts_exhausted(u32::MAX));
    }

    #[test]
    fn invalid_values_are_named() {
        let cases = [
            (
                EventSettings::default().retry_after(Duration::ZERO),
                "retry_after must be longer than zero",
            ),
            (
                EventSettings::default().expires_after(Duration::ZERO),
                "expires_after must be longer than zero",
            ),
            (
                EventSettings::default()
                    .max_execution_time(secs(10))
                    .expires_after(secs(10)),
                "max_execution_time (10s) must be shorter than expires_after (10s)",
            ),
            (
                EventSettings::default().backoff_factor(0.5),
                "backoff_factor must be a finite number",
            ),
            (
                EventSettings::default().backoff_factor(f64::NAN),
                "backoff_factor must be a finite number",
            ),
            (
                EventSettings::default()
                    .retry_after(secs(10))
                    .max_backoff(secs(5)),
                "max_backoff (5s)",
            ),
            (
                EventSettings::default().max_attempts(0),
                "max_attempts must be at least 1",
            ),
            (
                EventSettings::default().expires_after(Duration::MAX),
                "expires_after must be at most 100 years",
            ),
        ];
        for (settings, expected) in cases {
            let err = settings.validate().expect_err(expected);
            assert!(err.starts_with(expected), "{err}");
        }
    }
}
