//! The retry decision: what the database records for the way a run ended.

use std::time::Instant;

use crate::delivery::{DeadReason, Resolution};
use crate::dispatch::run::Verdict;
use crate::settings::EventSettings;

/// Turns a verdict into what the database should record (`None`: nothing, the run recorded
/// itself or lost its lease), logging failures. `attempt` is the run's attempt number.
pub(crate) fn resolve(
    verdict: Verdict,
    attempt: u32,
    settings: &EventSettings,
    started: Instant,
) -> Option<Resolution> {
    let (error, requested_delay) = match verdict {
        Verdict::Succeeded => {
            tracing::debug!(elapsed = ?started.elapsed(), "listener succeeded");
            return Some(Resolution::Done);
        }
        Verdict::Recorded => {
            tracing::debug!(elapsed = ?started.elapsed(), "transactional listener succeeded and committed");
            return None;
        }
        Verdict::LostLease => {
            tracing::warn!(
                "transactional listener finished after its lease passed; rolled back, another run holds the delivery"
            );
            return None;
        }
        Verdict::Cancelled => {
            tracing::info!("listener cancelled by shutdown; released for a later run");
            return Some(Resolution::Release {
                undo_attempt: false,
                error: Some("cancelled: the bus shut down before the listener finished".to_owned()),
            });
        }
        Verdict::Failed(error) if error.is_abort() => {
            let reason = error.dead_reason().unwrap_or(DeadReason::Aborted);
            let error = error.to_string();
            tracing::warn!(%error, %reason, "the delivery gives up");
            return Some(Resolution::Dead { reason, error });
        }
        Verdict::Failed(error) => (error.to_string(), error.retry_delay()),
        Verdict::Panicked(message) => (format!("panicked: {message}"), None),
        Verdict::TimedOut(elapsed) => (
            format!(
                "timed out after {elapsed:?} and was cancelled (max_execution_time {:?})",
                settings.max_execution_time
            ),
            None,
        ),
    };
    if settings.attempts_exhausted(attempt) {
        tracing::warn!(%error, "listener failed its last attempt");
        return Some(Resolution::Dead {
            reason: DeadReason::MaxAttempts,
            error,
        });
    }
    let delay = requested_delay.unwrap_or_else(|| settings.retry_delay(attempt));
    tracing::warn!(%error, retry_in = ?delay, "listener failed");
    Some(Resolution::Retry { delay, error })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listener::ListenerError;
    use std::time::Duration;

    fn settings() -> EventSettings {
        EventSettings::default()
            .retry_after(Duration::from_secs(2))
            .backoff_factor(1.0)
            .max_attempts(3)
    }

    #[test]
    fn failures_retry_after_the_backoff_or_the_requested_delay() {
        let now = Instant::now();
        let Some(Resolution::Retry { delay, error }) =
            resolve(Verdict::Failed("boom".into()), 1, &settings(), now)
        else {
            panic!("a failure is retried");
        };
        assert!(delay >= Duration::from_secs(2) && delay < Duration::from_millis(2200));
        assert_eq!(error, "boom");
        let requested = ListenerError::retry_after(Duration::from_secs(60), "later");
        assert!(matches!(
            resolve(Verdict::Failed(requested), 1, &settings(), now),
            Some(Resolution::Retry { delay, .. }) if delay == Duration::from_secs(60)
        ));
    }

    #[test]
    fn the_last_attempt_and_aborts_end_in_a_dead_letter() {
        let now = Instant::now();
        assert!(matches!(
            resolve(Verdict::Panicked("p".into()), 3, &settings(), now),
            Some(Resolution::Dead { reason: DeadReason::MaxAttempts, error }) if error == "panicked: p"
        ));
        assert!(matches!(
            resolve(
                Verdict::Failed(ListenerError::abort("no")),
                1,
                &settings(),
                now
            ),
            Some(Resolution::Dead {
                reason: DeadReason::Aborted,
                ..
            })
        ));
    }

    #[test]
    fn runs_that_recorded_themselves_record_nothing_more() {
        let now = Instant::now();
        assert_eq!(resolve(Verdict::Recorded, 1, &settings(), now), None);
        assert_eq!(resolve(Verdict::LostLease, 1, &settings(), now), None);
        assert!(matches!(
            resolve(Verdict::Cancelled, 1, &settings(), now),
            Some(Resolution::Release {
                undo_attempt: false,
                ..
            })
        ));
    }
}
