//! Testing your listeners (feature `testing`): run what is due now, see the events committed,
//! and simulate the crashes a production process meets.
//!
//! A test drives a bus built with [`poller(false)`](crate::EventBusBuilder::poller), so that
//! nothing runs behind its back but the listeners of its own emits, right after their commits:
//!
//! - [`EventBus::run_due`] claims and runs every delivery that is due, waits for the runs and
//!   for their results to be written, and goes on until nothing more is due (a listener that
//!   emits: that event runs too). It returns a [`RunReport`].
//! - [`EventBus::emitted`] lists the events of a type committed through the bus, in order.
//! - [`EventBus::simulate_crash`] loses the dispatch after the next commit, or the record of the
//!   next success ([`CrashPoint`]): the delivery comes back after its lease, as the next
//!   attempt, exactly as after a real crash. That is how a test shows a listener idempotent.
//!
//! Without the feature none of this is compiled, and the hot path does not change.

use std::future::Future;

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

    /// Simulates a crash at `point`, once: the next commit loses its dispatch
    /// ([`CrashPoint::AfterCommit`]), or the next success is not recorded
    /// ([`CrashPoint::AfterListenerSuccess`]). The deliveries come back after their lease
    /// (`max_execution_time`), as the next attempt, for any poller or
    /// [`run_due`](Self::run_due).
    pub fn simulate_crash(&self, point: CrashPoint) {
        self.engine.runner.hooks.arm(point);
    }
}
