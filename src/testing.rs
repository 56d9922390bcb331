//! Testing your listeners (feature `testing`): run what is due now, see the events committed,
//! and simulate the crashes a production process meets.
//!
//! A test drives a bus built with [`poller(false)`](crate::EventBusBuilder::poller), so that
//! nothing runs behind its back but the listeners of its own emits, right after their commits:
//!
//! - [`EventBus::run_due`] claims and runs every delivery that is due, waits for the runs and
//!   for their results to be written, and goes on until nothing more is due (a listener that
//!   emits: that event runs too). It returns a [`RunReport`].
//! - [`EventBus::advance`] moves the bus's clock forward: retries and scheduled events fall
//!   due, leases end and deliveries expire without waiting, on this bus only.
//! - [`EventBus::emitted`] lists the events of a type committed through the bus, in order.
//! - [`EventBus::simulate_crash`] loses the dispatch after the next commit, or the record of the
//!   next success ([`CrashPoint`]): the delivery comes back after its lease, as the next
//!   attempt, exactly as after a real crash. That is how a test shows a listener idempotent.
//!
//! Without the feature none of this is compiled, and the hot path does not change. With it,
//! once a bus moved its clock, every statement of the bus reads the clock through its offset
//! (see `advance`): the feature is for tests, not for a service's build.

use std::future::Future;
use std::time::Duration;

use crate::bus::EventBus;
use crate::error::Error;
use crate::event::{Event, EventId};
use crate::store::Backend;

pub use crate::dispatch::{CrashPoint, RunReport};

/// How many rounds of claims [`EventBus::run_due`] makes at most before it gives up on work that
/// keeps falling due.
const MAX_ROUNDS: usize = 1000;

impl<B: Backend> EventBus<B> {
    /// Claims and runs every delivery of this process's listeners that is due now (retries whose
    /// time came, scheduled events that fell due, deliveries whose lease ended), waits for the
    /// runs and for their results to be written, and repeats until a round finds nothing due:
    /// what those runs emit runs too. Works whether or not the bus's poller is on. Counts what
    /// ran meanwhile ([`RunReport`]), the listeners of emits included.
    ///
    /// Fails after 1,000 rounds of work that keeps falling due (a listener that emits an event
    /// that makes it run again, a retry delay of zero): a test should not hang.
    pub fn run_due(&self) -> impl Future<Output = Result<RunReport, Error>> + Send + '_ {
        async move {
            let engine = &*self.engine;
            engine.check_running()?;
            let hooks = &engine.runner.hooks;
            let before = hooks.report();
            for _ in 0..MAX_ROUNDS {
                let round = hooks.report();
                let more = crate::poller::claim_round(engine).await?;
                self.wait_idle().await;
                if !more && hooks.report() == round {
                    return Ok(hooks.report().since(before));
                }
            }
            Err(Error::Invalid(format!(
                "run_due gave up after {MAX_ROUNDS} rounds of claims: deliveries keep falling \
                 due (a listener whose runs emit what runs it again, or a retry delay of zero?)"
            )))
        }
    }

    /// The events of type `E` committed through this bus (emitted, in a transaction, or
    /// received), in commit order, with their ids. Rolled-back ones never count.
    ///
    /// Only a test's bus, built with [`poller(false)`](crate::EventBusBuilder::poller), keeps
    /// this record: on a bus with its poller it is empty, so that a bus that runs for long
    /// (a benchmark built with every feature, say) does not collect every event it emits.
    ///
    /// An event whose stored payload does not read back as `E` (another version of the type's
    /// wrote it) is left out.
    pub fn emitted<E: Event>(&self) -> Vec<(EventId, E)> {
        self.engine.runner.hooks.emitted(|emitted| {
            if emitted.name != E::NAME {
                return None;
            }
            serde_json::from_str(&emitted.payload)
                .ok()
                .map(|event| (emitted.id, event))
        })
    }

    /// The names of every event committed through this bus, in commit order (on a test's bus,
    /// as [`emitted`](Self::emitted)).
    pub fn emitted_names(&self) -> Vec<&'static str> {
        self.engine
            .runner
            .hooks
            .emitted(|emitted| Some(emitted.name))
    }

    /// Moves this bus's clock forward by `by`, for everything time-based that it does: due
    /// times of retries and scheduled events, leases, expiry, retention, `emit_at`, the ages in
    /// [`stats`](Self::stats). The database server's clock does not move, nor do other buses
    /// (each has a clock of its own, even on the same pool) or the application's queries. After
    /// a retry's delay a [`run_due`](Self::run_due) runs it; past an event's `expires_after`,
    /// the next one turns it dead; past `max_execution_time`, what a
    /// [simulated crash](Self::simulate_crash) left leased runs again.
    ///
    /// The listeners' own timeouts are not affected: they count real time. Once any bus of the
    /// process moved its clock, the bus's statements read the clock through the offset, and
    /// every connection taken from a pool sets its offset first (one more statement per
    /// checkout); until then, nothing of it runs.
    ///
    /// ```
    /// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
    /// # struct Reminder { user_id: i64 }
    /// #[txbus::listener]
    /// async fn remind(_reminder: Reminder) -> Result<(), txbus::ListenerError> {
    ///     Ok(())
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = std::env::temp_dir().join(format!("txbus-doc-advance-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir)?;
    /// # let path = dir.join("app.db");
    /// # let _ = std::fs::remove_file(&path);
    /// use std::time::Duration;
    /// use txbus::{EventBus, Pool, Sqlite};
    ///
    /// let pool = Pool::<Sqlite>::connect(path.to_str().unwrap()).await?;
    /// let bus = EventBus::builder(pool).poller(false).build().await?;
    /// bus.emit_after(Duration::from_secs(3600), Reminder { user_id: 1 }, []).await?;
    /// assert_eq!(bus.run_due().await?.ran, 0, "not due for an hour");
    /// bus.advance(Duration::from_secs(3600));
    /// assert_eq!(bus.run_due().await?.succeeded, 1);
    /// # bus.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn advance(&self, by: Duration) {
        self.engine.pool.clock().advance(by);
        // A poller asleep until the next due time it knew wakes to look again.
        self.engine.runner.retry_due.notify_one();
    }

    /// Simulates a crash at `point`, once: the next commit loses its dispatch
    /// ([`CrashPoint::AfterCommit`]), or the next success is not recorded
    /// ([`CrashPoint::AfterListenerSuccess`]). The deliveries come back after their lease
    /// (`max_execution_time`), as the next attempt, for any poller or
    /// [`run_due`](Self::run_due).
    pub fn simulate_crash(&self, point: CrashPoint) {
        self.engine.runner.hooks.arm(point);
    }
}

/// Makes the next `n` claims of ordering keys' heads by `bus`'s poller fail before their
/// statement, as a statement that fails would. For txbus's own tests of what a failed claim
/// leaves behind.
#[doc(hidden)]
pub fn fail_head_claims<B: Backend>(bus: &EventBus<B>, n: u64) {
    bus.engine.runner.hooks.fail_head_claims(n);
}

/// How many of the failures [`fail_head_claims`] asked for are still to happen.
#[doc(hidden)]
pub fn head_claim_failures_left<B: Backend>(bus: &EventBus<B>) -> u64 {
    bus.engine.runner.hooks.head_claim_failures_left()
}

/// Makes this process take MySQL event ids as it does on MySQL 8, which has no `RETURNING`: one
/// at a time, by an insert and `SELECT LAST_INSERT_ID()`, even on MariaDB. For txbus's own tests
/// of that path; it lasts for the life of the process.
#[cfg(feature = "mysql")]
#[doc(hidden)]
pub fn mysql_ids_without_returning() {
    crate::store::mysql_without_returning();
}
