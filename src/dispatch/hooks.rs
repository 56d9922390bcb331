//! What the test kit (feature `testing`) sees and changes inside the runner: the events
//! committed, the runs and how they ended, and the crashes it simulates.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::delivery::Resolution;
use crate::event::EventId;

/// Where [`EventBus::simulate_crash`](crate::EventBus::simulate_crash) makes the process "die",
/// once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CrashPoint {
    /// The next emit (or transaction, or receipt) commits, and its listeners are not started,
    /// as if the process died right after the commit: its deliveries stay leased until their
    /// lease ends (`max_execution_time`), and then any poller (or
    /// [`run_due`](crate::EventBus::run_due)) runs them, as the next attempt.
    AfterCommit,
    /// The next successful run of a listener is not recorded, as if the process died between
    /// the listener's success and the write of its result: the delivery runs again after its
    /// lease, as the next attempt. (A transactional listener records its delivery in its own
    /// transaction: its success cannot be lost, and this waits for the next other one.)
    AfterListenerSuccess,
}

/// What one [`run_due`](crate::EventBus::run_due) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunReport {
    /// Runs of listeners that started (every attempt counts).
    pub ran: u64,
    /// Runs that succeeded.
    pub succeeded: u64,
    /// Runs that failed: returned an error, panicked or timed out.
    pub failed: u64,
    /// Deliveries that became dead letters: a run gave up (an abort, the last of
    /// `max_attempts`), or a claim found the delivery expired.
    pub dead: u64,
}

/// An event committed through the bus.
pub(crate) struct Emitted {
    pub(crate) id: EventId,
    pub(crate) name: &'static str,
    pub(crate) payload: Arc<str>,
}

/// The runner's test hooks.
#[derive(Default)]
pub(crate) struct Hooks {
    /// Whether committed events are recorded: on a test's bus only (its poller off), so that a
    /// bus that runs for long keeps no record that grows without end.
    recording: AtomicBool,
    emitted: Mutex<Vec<Emitted>>,
    crash_after_commit: AtomicBool,
    /// Claims of keys' heads that are to fail before their statement (txbus's own tests).
    failing_head_claims: AtomicU64,
    crash_after_success: AtomicBool,
    ran: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    dead: AtomicU64,
    /// Held by every claim from its statement until what it claimed is queued (see
    /// [`claiming`](Self::claiming)).
    claiming: tokio::sync::Mutex<()>,
}

impl Hooks {
    /// Arms `point` for its next occasion.
    pub(crate) fn arm(&self, point: CrashPoint) {
        match point {
            CrashPoint::AfterCommit => &self.crash_after_commit,
            CrashPoint::AfterListenerSuccess => &self.crash_after_success,
        }
        .store(true, Ordering::SeqCst);
    }

    /// Whether to record committed events.
    pub(crate) fn record_emitted(&self, record: bool) {
        self.recording.store(record, Ordering::SeqCst);
    }

    /// Records committed events (on a test's bus); returns whether their dispatch is lost to a
    /// simulated crash.
    pub(crate) fn committed(&self, events: impl IntoIterator<Item = Emitted>) -> bool {
        if self.recording.load(Ordering::Relaxed) {
            self.emitted
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(events);
        }
        self.crash_after_commit.swap(false, Ordering::SeqCst)
    }

    /// The events committed so far, in commit order.
    pub(crate) fn emitted<T>(&self, f: impl Fn(&Emitted) -> Option<T>) -> Vec<T> {
        let emitted = self.emitted.lock().unwrap_or_else(PoisonError::into_inner);
        emitted.iter().filter_map(f).collect()
    }

    /// Counts a run that ended in `resolution` (`None`: recorded in its own transaction, a
    /// success); returns it, or `None` when a simulated crash loses its success.
    pub(crate) fn ran(&self, resolution: Option<Resolution>) -> Option<Resolution> {
        self.ran.fetch_add(1, Ordering::SeqCst);
        match &resolution {
            None | Some(Resolution::Done) => self.succeeded.fetch_add(1, Ordering::SeqCst),
            Some(Resolution::Retry { .. }) => self.failed.fetch_add(1, Ordering::SeqCst),
            Some(Resolution::Dead { .. }) => {
                self.dead.fetch_add(1, Ordering::SeqCst);
                self.failed.fetch_add(1, Ordering::SeqCst)
            }
            // Cancelled by the shutdown: handed back, not an outcome.
            Some(Resolution::Release { .. }) => 0,
        };
        match resolution {
            Some(Resolution::Done) if self.crash_after_success.swap(false, Ordering::SeqCst) => {
                None
            }
            other => other,
        }
    }

    /// Taken by every claim, the poller's and `run_due`'s, until what it claimed is queued, and
    /// by the poller's other statements that lock rows (the expiry sweep, retention,
    /// housekeeping): a claim of `run_due` skips no row they hold, and comes after the poller's
    /// claim under way, whose runs it then waits for.
    pub(crate) async fn claiming(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.claiming.lock().await
    }

    /// Makes the next `n` claims of keys' heads fail, as a statement that fails would.
    pub(crate) fn fail_head_claims(&self, n: u64) {
        self.failing_head_claims.store(n, Ordering::SeqCst);
    }

    /// How many claims of keys' heads are still to fail.
    pub(crate) fn head_claim_failures_left(&self) -> u64 {
        self.failing_head_claims.load(Ordering::SeqCst)
    }

    /// Fails this claim of keys' heads if [`fail_head_claims`](Self::fail_head_claims) asked.
    pub(crate) fn head_claim_fails(&self) -> Result<(), crate::Error> {
        let armed =
            self.failing_head_claims
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        match armed {
            Ok(_) => Err(crate::Error::Database(
                diesel::result::Error::QueryBuilderError("a simulated failure of a claim".into()),
            )),
            Err(_) => Ok(()),
        }
    }

    /// Counts a delivery a claim found expired (and made dead).
    pub(crate) fn expired(&self) {
        self.dead.fetch_add(1, Ordering::SeqCst);
    }

    /// The counts so far.
    pub(crate) fn report(&self) -> RunReport {
        RunReport {
            ran: self.ran.load(Ordering::SeqCst),
            succeeded: self.succeeded.load(Ordering::SeqCst),
            failed: self.failed.load(Ordering::SeqCst),
            dead: self.dead.load(Ordering::SeqCst),
        }
    }
}

impl RunReport {
    /// What happened between `before` and `self`.
    pub(crate) fn since(self, before: Self) -> Self {
        Self {
            ran: self.ran.saturating_sub(before.ran),
            succeeded: self.succeeded.saturating_sub(before.succeeded),
            failed: self.failed.saturating_sub(before.failed),
            dead: self.dead.saturating_sub(before.dead),
        }
    }
}
