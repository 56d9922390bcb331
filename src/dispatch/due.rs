//! Waking the poller when deliveries this process wrote fall due: retries, scheduled events.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::dispatch::{Phase, Runner};

/// How many tasks at most wait to wake the poller for deliveries falling due; beyond them,
/// those deliveries run at the poller's next tick.
const MAX_DUE_TIMERS: usize = 64;

/// Deliveries falling due within this of each other are claimed by one wake-up, at the last one.
const DUE_TOGETHER: Duration = Duration::from_millis(10);

/// Wakes the poller when deliveries just written fall due, `delays` from now (they are due from
/// the database's clock at the write, which came before now), so that they run within moments
/// of their time instead of at the next poll. Only delays shorter than `horizon` (the poll
/// interval) get a wake-up: the poller finds the later ones in the table itself when it polls.
pub(crate) fn wake_when_due(runner: &Arc<Runner>, mut delays: Vec<Duration>, horizon: Duration) {
    let before = delays.len();
    delays.retain(|delay| !delay.is_zero());
    if delays.len() < before {
        // Due now (keyed events, left to the claims that take each key's head).
        runner.retry_due.notify_one();
    }
    delays.retain(|delay| *delay < horizon);
    if delays.is_empty() {
        return;
    }
    if runner.due_timers.fetch_add(1, Ordering::Relaxed) >= MAX_DUE_TIMERS {
        runner.due_timers.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    delays.sort_unstable();
    // One wake-up per group of deliveries due together, at the group's last.
    let written = Instant::now();
    let mut wakes: Vec<Instant> = Vec::new();
    let mut first = None;
    for delay in delays {
        match first {
            Some(start) if delay - start < DUE_TOGETHER => {
                if let Some(last) = wakes.last_mut() {
                    *last = written + delay;
                }
            }
            _ => {
                first = Some(delay);
                wakes.push(written + delay);
            }
        }
    }
    let runner = runner.clone();
    let mut phase = runner.phase.subscribe();
    tokio::spawn(async move {
        for wake in wakes {
            tokio::select! {
                _ = tokio::time::sleep_until(wake.into()) => runner.retry_due.notify_one(),
                _ = phase.wait_for(|p| *p >= Phase::Draining) => break,
            }
        }
        runner.due_timers.fetch_sub(1, Ordering::Relaxed);
    });
}
