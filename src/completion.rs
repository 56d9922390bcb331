//! Writes listener results to the database in batches: whatever arrived while the previous
//! batch was being written goes in the next one, so a busy bus writes few, large batches.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::delivery::{Outcome, Resolution};
use crate::dispatch::{self, Phase, Report, Runner};
use crate::error::{Chain, Error};
use crate::store::{Backend, Pool, Recorded};

/// The most results written in one batch.
const MAX_BATCH: usize = 512;

/// How long the first result of a batch waits for others to join it. It delays the record of a
/// success by as much, which is the window in which a crash makes a listener run again.
const LINGER: Duration = Duration::from_millis(2);

/// How often a batch is tried when the database is reachable but the write fails.
const MAX_STATEMENT_FAILURES: u32 = 5;

/// Receives reports until every sender is gone, writing each batch before taking the next.
/// With `retain`, successes are marked delivered instead of deleted. Retries shorter than
/// `retry_every` wake the poller when they fall due.
pub(crate) async fn complete_loop<B: Backend>(
    pool: Pool<B>,
    retain: bool,
    retry_every: Duration,
    mut reports: mpsc::Receiver<Report>,
    runner: Arc<Runner>,
) {
    let phase = runner.phase.subscribe();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while reports.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // Let a burst gather: one write for many results is one commit instead of many. Not
        // for a keyed delivery: the next of its key waits for this write.
        let deadline = tokio::time::sleep(LINGER);
        tokio::pin!(deadline);
        let keyed = batch.iter().any(|r| r.outcome.ordering_key.is_some());
        while batch.len() < MAX_BATCH && !keyed {
            let room = MAX_BATCH - batch.len();
            tokio::select! {
                n = reports.recv_many(&mut batch, room) => if n == 0 { break },
                _ = &mut deadline => break,
            }
        }
        let (outcomes, in_flight): (Vec<Outcome>, Vec<_>) =
            batch.drain(..).map(|r| (r.outcome, r._in_flight)).unzip();
        if write(&pool, &outcomes, retain, &phase).await {
            // Retries are due from the database's clock at the write, which came before now.
            let retries = outcomes.iter().filter_map(|o| match &o.resolution {
                Resolution::Retry { delay, .. } => Some(*delay),
                _ => None,
            });
            dispatch::wake_when_due(&runner, retries.collect(), retry_every);
            // A keyed delivery that finished lets the next of its key run: claim it now.
            runner.wake_heads(outcomes.iter().filter_map(|o| {
                let key = o.ordering_key.clone()?;
                Some((o.key.listener, key))
            }));
        }
        // Only now is the bus idle for these deliveries.
        drop(in_flight);
    }
}

/// Writes one batch, retrying while the database is unreachable, and a few times for other
/// errors; returns whether it was written. A batch that cannot be written is not lost work: its
/// deliveries run again once their leases pass.
async fn write<B: Backend>(
    pool: &Pool<B>,
    outcomes: &[Outcome],
    retain: bool,
    phase: &watch::Receiver<Phase>,
) -> bool {
    let mut pause = Duration::from_millis(50);
    let mut failures = 0;
    loop {
        let error = match record::<B>(pool, outcomes, retain).await {
            Ok(recorded) => {
                report(outcomes.len(), recorded);
                return true;
            }
            Err(error) => error,
        };
        failures += 1;
        // Without a connection, waiting is all there is to do; a statement that keeps failing
        // on a live connection will not succeed by being repeated.
        let unreachable = matches!(
            error,
            Error::Connection { .. }
                | Error::Database(diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::ClosedConnection,
                    _
                ))
                | Error::Database(diesel::result::Error::BrokenTransactionManager)
        );
        if *phase.borrow() >= Phase::Cancelling
            || (!unreachable && failures >= MAX_STATEMENT_FAILURES)
        {
            tracing::error!(error = %Chain(&error), results = outcomes.len(),
                "could not record listener results; those deliveries will run again after their leases");
            return false;
        }
        tracing::warn!(error = %Chain(&error), results = outcomes.len(), retry_in = ?pause,
            "could not record listener results; retrying");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

async fn record<B: Backend>(
    pool: &Pool<B>,
    outcomes: &[Outcome],
    retain: bool,
) -> Result<Recorded, Error> {
    let (_turn, mut conn) = pool.get_for_write().await?;
    Ok(B::record(&mut conn, outcomes, retain).await?)
}

fn report(written: usize, recorded: Recorded) {
    if recorded.applied < written {
        // Their leases had passed and another run holds them now: the fence kept this stale
        // result from overwriting the newer one.
        tracing::debug!(
            stale = written - recorded.applied,
            "results of runs that lost their lease were not recorded"
        );
    }
    for died in recorded.died {
        crate::metrics::died(&died.listener, &died.reason);
        tracing::error!(event_id = %died.event_id, listener = %died.listener, reason = %died.reason,
            "delivery is dead; it stays in txbus_deliveries as a dead letter");
    }
}
