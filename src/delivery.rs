//! Deliveries: how one is named, what a run of it can end in, and why one gives up.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::error::Error;
use crate::event::EventId;

/// Why a delivery became a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(into = "&'static str")]
#[non_exhaustive]
pub enum DeadReason {
    /// Its next attempt would have come after the event's
    /// [`expires_after`](crate::EventSettings::expires_after).
    Expired,
    /// It failed [`max_attempts`](crate::EventSettings::max_attempts) times.
    MaxAttempts,
    /// The listener returned [`ListenerError::abort`](crate::ListenerError::abort).
    Aborted,
    /// It expired while no running instance had its listener.
    NoListener,
    /// Its payload, stored by an older version of the event's type, could not be upcast (an
    /// upcaster failed, or the result did not deserialize): see [`Event::upcast`](crate::Event::upcast).
    UpcastFailed,
    /// It expired while no running instance knew its event's version (stored by a newer
    /// version of the event's type than the instances that have its listener).
    UnknownVersion,
}

impl DeadReason {
    /// Every reason, in the order above.
    /// ```
    /// use txbus::DeadReason;
    /// assert!(DeadReason::ALL.contains(&DeadReason::Aborted));
    /// ```
    pub const ALL: &'static [DeadReason] = &[
        Self::Expired,
        Self::MaxAttempts,
        Self::Aborted,
        Self::NoListener,
        Self::UpcastFailed,
        Self::UnknownVersion,
    ];

    /// The code stored in `txbus_deliveries.dead_reason`: `expired`, `max_attempts`, `aborted`,
    /// `no_listener`, `upcast_failed` or `unknown_version`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::MaxAttempts => "max_attempts",
            Self::Aborted => "aborted",
            Self::NoListener => "no_listener",
            Self::UpcastFailed => "upcast_failed",
            Self::UnknownVersion => "unknown_version",
        }
    }
}

impl From<DeadReason> for &'static str {
    fn from(reason: DeadReason) -> Self {
        reason.as_str()
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeadReason {
    type Err = Error;

    fn from_str(code: &str) -> Result<Self, Error> {
        Ok(match code {
            "expired" => Self::Expired,
            "max_attempts" => Self::MaxAttempts,
            "aborted" => Self::Aborted,
            "no_listener" => Self::NoListener,
            "upcast_failed" => Self::UpcastFailed,
            "unknown_version" => Self::UnknownVersion,
            other => {
                return Err(Error::Invalid(format!(
                    "unknown dead letter reason `{other}` (expected expired, max_attempts, \
                     aborted, no_listener, upcast_failed or unknown_version; was it written by \
                     a newer txbus?)"
                )));
            }
        })
    }
}

/// One run of a delivery: the attempt number is the fence token of its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryKey {
    pub(crate) event_id: EventId,
    pub(crate) listener: &'static str,
    pub(crate) attempt: u32,
}

/// What to record for a run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Resolution {
    /// It succeeded: delete the delivery (or mark it delivered, when they are retained).
    Done,
    /// It failed: try again after `delay`, or die as expired if that is past the expiry.
    Retry { delay: Duration, error: String },
    /// It gave up.
    Dead { reason: DeadReason, error: String },
    /// It was not finished here: make it available at once. `undo_attempt` when it never started.
    Release {
        undo_attempt: bool,
        error: Option<String>,
    },
}

/// The result of one run, to be recorded if the delivery is still held by that run.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub(crate) key: DeliveryKey,
    pub(crate) resolution: Resolution,
    /// The event's ordering key: once this is recorded, the next delivery of the key may be
    /// its head.
    pub(crate) ordering_key: Option<std::sync::Arc<str>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_in_all_and_reads_back() {
        for &reason in DeadReason::ALL {
            assert_eq!(reason.as_str().parse::<DeadReason>().unwrap(), reason);
            // Fails to compile when a reason is added: add it to `ALL` too.
            match reason {
                DeadReason::Expired
                | DeadReason::MaxAttempts
                | DeadReason::Aborted
                | DeadReason::NoListener
                | DeadReason::UpcastFailed
                | DeadReason::UnknownVersion => {}
            }
        }
        assert!("exploded".parse::<DeadReason>().is_err());
    }
}
