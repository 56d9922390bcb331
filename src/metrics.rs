//! Metrics on the `metrics` facade (feature `metrics`); without the feature every function here
//! is empty and compiles away.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `txbus_events_emitted_total` | counter | `event` | events committed (emitted or received) |
//! | `txbus_deliveries_total` | counter | `listener`, `outcome` | listener runs by outcome: `succeeded`, `failed`, `aborted`, `timed_out`, `panicked`, `cancelled`, `lost_lease` |
//! | `txbus_listener_duration_seconds` | histogram | `listener` | how long runs took, whatever their outcome |
//! | `txbus_dead_letters_total` | counter | `listener`, `reason` | deliveries that became dead letters |
//! | `txbus_backlog` | gauge | `listener` | pending deliveries that may run (due, running, stale, retrying) |
//! | `txbus_scheduled` | gauge | `listener` | deliveries of scheduled events not due yet |
//! | `txbus_dead_letters` | gauge | `listener` | dead letters kept |
//! | `txbus_oldest_pending_seconds` | gauge | `listener` | age of the oldest pending delivery's event (0 when none) |
//!
//! The gauges are refreshed from [`EventBus::stats`](crate::EventBus::stats) by the poller, every
//! ten polls at most and no more than 5 % of the time (the statistics read the whole table: a
//! large one is read less often), in a task beside its claims, which a slow read never holds up.

#[cfg(feature = "metrics")]
use std::time::Duration;

use crate::stats::Stats;

/// An event was committed.
pub(crate) fn emitted(_event: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("txbus_events_emitted_total", "event" => _event).increment(1);
}

/// A listener run ended with `outcome` after `elapsed`.
pub(crate) fn ran(_listener: &'static str, _outcome: &'static str, _elapsed: std::time::Duration) {
    #[cfg(feature = "metrics")]
    {
        metrics::counter!("txbus_deliveries_total", "listener" => _listener, "outcome" => _outcome)
            .increment(1);
        metrics::histogram!("txbus_listener_duration_seconds", "listener" => _listener)
            .record(_elapsed.as_secs_f64());
    }
}

/// A delivery became a dead letter.
pub(crate) fn died(_listener: &str, _reason: &str) {
    #[cfg(feature = "metrics")]
    metrics::counter!(
        "txbus_dead_letters_total",
        "listener" => _listener.to_owned(),
        "reason" => _reason.to_owned()
    )
    .increment(1);
}

/// Whether the gauges are collected at all (the poller skips the statistics query otherwise).
pub(crate) const GAUGES: bool = cfg!(feature = "metrics");

/// Sets the gauges from a snapshot of the tables.
pub(crate) fn gauges(_stats: &Stats) {
    #[cfg(feature = "metrics")]
    for (listener, counts) in &_stats.listeners {
        let oldest = counts.oldest_pending_age.unwrap_or(Duration::ZERO);
        metrics::gauge!("txbus_backlog", "listener" => listener.clone())
            .set((counts.pending() - counts.scheduled) as f64);
        metrics::gauge!("txbus_scheduled", "listener" => listener.clone())
            .set(counts.scheduled as f64);
        metrics::gauge!("txbus_dead_letters", "listener" => listener.clone())
            .set(counts.dead as f64);
        metrics::gauge!("txbus_oldest_pending_seconds", "listener" => listener.clone())
            .set(oldest.as_secs_f64());
    }
}
