//! The background poller: every `retry_every` it makes expired deliveries dead, then claims due
//! deliveries of this process's listeners, as many as can start at once, and hands them to the
//! runner. While full batches keep coming it claims again as soon as listeners free up. A retry
//! this process wrote wakes it when it falls due; after a poll that leaves nothing due, it also
//! wakes when the earliest delivery waiting in the table falls due.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::time::MissedTickBehavior;
use tracing::Instrument;

use crate::delivery::DeliveryKey;
use crate::dispatch::{self, Job, Phase};
use crate::engine::Engine;
use crate::error::{Chain, Error};
use crate::store::{Backend, Claimed};

/// How many expired deliveries one sweep handles at most.
const EXPIRE_BATCH: usize = 1000;

/// Every how many polls the expiry sweep for listeners this process lacks runs: it scans the due
/// deliveries, so not at every poll. (Expired deliveries of known listeners die when claimed.)
const SWEEP_EVERY_POLLS: u64 = 10;

/// Every how many polls the gauges (feature `metrics`) are refreshed, at most.
const GAUGES_EVERY_POLLS: u32 = 10;

/// How often the poller reports due deliveries whose listener this process does not have, and
/// does its backend's housekeeping.
const ORPHAN_REPORT_EVERY: Duration = Duration::from_secs(60);

/// The shortest wait for a delivery that falls due: it keeps a row due in a moment from
/// turning the poller into a busy loop.
const MIN_WAIT: Duration = Duration::from_millis(1);

/// How many due deliveries one orphan report looks at, at most.
const ORPHAN_SAMPLE: usize = 10_000;

pub(crate) async fn poll_loop<B: Backend>(engine: Arc<Engine<B>>) {
    let runner = engine.runner.clone();
    let mut phase = runner.phase.subscribe();
    let known = engine.registry.names();
    let versions = engine.registry.versions();
    let mut tick = tokio::time::interval(engine.config.retry_every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut more = More::No;
    // When the earliest delivery waiting in the table falls due, if before the next tick.
    let mut next_due: Option<Instant> = None;
    let mut polls: u64 = 0;
    let mut next_report = Instant::now();
    let gauges = Arc::new(Gauges {
        running: AtomicBool::new(false),
        not_before: Mutex::new(Instant::now()),
    });
    loop {
        if more == More::Now {
            // The batch parked deliveries waiting behind their keys: what is due behind them
            // is claimed at once.
            if *phase.borrow() >= Phase::Draining {
                break;
            }
        } else if more == More::WhenFree {
            // A full batch came back: more is probably due. Claim again when a listener frees
            // up or a key's head may have changed, or at the next tick at the latest.
            tokio::select! {
                _ = runner.freed.notified() => {}
                _ = runner.heads_ready.notified() => {}
                _ = tick.tick() => {}
                _ = phase.wait_for(|p| *p >= Phase::Draining) => break,
            }
        } else {
            // A retry falling due only needs a claim; ticks and requested polls also count
            // towards the sweep. Keys whose head may have changed only need a claim of their
            // heads.
            let due = next_due;
            let wake = tokio::select! {
                _ = tick.tick() => Wake::Counted,
                _ = engine.poll_now.notified() => Wake::Counted,
                _ = runner.retry_due.notified() => Wake::Due,
                _ = sleep_until(due), if due.is_some() => Wake::Due,
                _ = runner.heads_ready.notified() => Wake::Heads,
                _ = phase.wait_for(|p| *p >= Phase::Draining) => break,
            };
            if wake == Wake::Heads {
                // With every listener busy, claim everything due once one frees up.
                more = match claim_heads(&engine, &known, &versions).await {
                    Ok(true) => More::WhenFree,
                    Ok(false) => More::No,
                    Err(error) => {
                        tracing::warn!(error = %Chain(&error), "claiming the heads of ordering keys failed; retrying at the next poll");
                        More::No
                    }
                };
                continue;
            }
            next_due = None;
            let counted = wake == Wake::Counted;
            polls += u64::from(counted);
            if counted && polls % SWEEP_EVERY_POLLS == 1 {
                if let Err(error) = sweep(&engine, &known, &versions).await {
                    tracing::warn!(error = %Chain(&error), "expiry sweep failed; retrying later");
                }
                if let Err(error) = engine.cleanup().await {
                    tracing::warn!(error = %Chain(&error), "retention cleanup failed; retrying later");
                }
            }
            if crate::metrics::GAUGES {
                refresh_gauges(&engine, &gauges);
            }
            if Instant::now() >= next_report {
                next_report = Instant::now() + ORPHAN_REPORT_EVERY;
                if let Err(error) = housekeeping(&engine, &known).await {
                    tracing::debug!(error = %Chain(&error), "housekeeping failed; retrying later");
                }
            }
        }
        // Heads first: the general claim does not take a parked delivery that a finished run
        // let go.
        if let Err(error) = claim_heads(&engine, &known, &versions).await {
            tracing::warn!(error = %Chain(&error), "claiming the heads of ordering keys failed; retrying at the next poll");
        }
        more = match claim(&engine, &known, &versions).await {
            Ok(more) => more,
            Err(error) => {
                tracing::warn!(error = %Chain(&error), "claiming due deliveries failed; retrying at the next poll");
                More::No
            }
        };
        if more == More::No && !known.is_empty() {
            next_due = match waiting(&engine, &known).await {
                Ok(due) => due,
                Err(error) => {
                    tracing::debug!(error = %Chain(&error), "could not read when the next delivery is due; polling at the next tick");
                    None
                }
            };
        }
    }
}

/// One round of the poller's claims, heads first (for the test kit's `run_due`). Returns
/// whether more may be due at once.
#[cfg(feature = "testing")]
pub(crate) async fn claim_round<B: Backend>(engine: &Engine<B>) -> Result<bool, Error> {
    let known = engine.registry.names();
    let versions = engine.registry.versions();
    let full = claim_heads(engine, &known, &versions).await?;
    let more = claim(engine, &known, &versions).await?;
    Ok(full || more != More::No)
}

/// When the poller claims again after a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum More {
    /// When something falls due, or at the next tick.
    No,
    /// When a listener frees up: the batch was full.
    WhenFree,
    /// At once: the batch parked deliveries, and more may be due behind them.
    Now,
}

/// What woke the idle poller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// A tick or a requested poll: they count towards the sweep.
    Counted,
    /// A delivery falling due.
    Due,
    /// Ordering keys whose head may have changed.
    Heads,
}

/// When the gauges are refreshed next.
struct Gauges {
    running: AtomicBool,
    not_before: Mutex<Instant>,
}

/// Refreshes the gauges in a task of its own, unless the last refresh is still running or was
/// too recent: every ten polls, and no more than 5 % of the time (the statistics read the whole
/// table, so a large one is read less often). A slow read never holds up a claim.
fn refresh_gauges<B: Backend>(engine: &Arc<Engine<B>>, gauges: &Arc<Gauges>) {
    let due = *gauges
        .not_before
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        <= Instant::now();
    if !due || gauges.running.swap(true, Ordering::AcqRel) {
        return;
    }
    let engine = engine.clone();
    let gauges = gauges.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        match crate::stats::read(&engine.pool, &engine.registry).await {
            Ok(stats) => crate::metrics::gauges(&stats),
            Err(error) => {
                tracing::debug!(error = %Chain(&error), "could not refresh the gauges; retrying later");
            }
        }
        let pause = (engine.config.retry_every * GAUGES_EVERY_POLLS).max(started.elapsed() * 20);
        *gauges
            .not_before
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now() + pause;
        gauges.running.store(false, Ordering::Release);
    });
}

/// When the earliest delivery of `known` listeners that waits in the table (a retry, a lease
/// that ends) falls due, if that is before the next tick.
async fn waiting<B: Backend>(
    engine: &Engine<B>,
    known: &[&'static str],
) -> Result<Option<Instant>, Error> {
    let mut conn = engine.pool.get().await?;
    let due = B::next_due(&mut conn, known, engine.config.retry_every).await?;
    Ok(due
        .filter(|d| *d < engine.config.retry_every)
        // The database's clock counts from before the answer arrived: wake no earlier than it.
        .map(|d| Instant::now() + d.max(MIN_WAIT)))
}

async fn sleep_until(due: Option<Instant>) {
    if let Some(due) = due {
        tokio::time::sleep_until(due.into()).await;
    }
}

/// Makes expired deliveries of listeners nobody here has dead, and forgets received message ids
/// older than the dedup window.
async fn sweep<B: Backend>(
    engine: &Engine<B>,
    known: &[&'static str],
    versions: &str,
) -> Result<(), Error> {
    #[cfg(feature = "testing")]
    let _claiming = engine.runner.hooks.claiming().await;
    let (_turn, mut conn) = engine.pool.get_for_write().await?;
    B::purge_inbox(&mut conn, engine.config.inbox_dedup_window, EXPIRE_BATCH).await?;
    let died = B::expire(&mut conn, known, versions, EXPIRE_BATCH).await?;
    for died in died {
        crate::metrics::died(&died.listener, &died.reason);
        tracing::error!(event_id = %died.event_id, listener = %died.listener, reason = %died.reason,
            "delivery expired; it stays in txbus_deliveries as a dead letter");
    }
    Ok(())
}

/// Runs the backend's housekeeping, and warns about due deliveries that wait for a listener
/// this process does not have (a rolling deploy, a rename, a listener in a crate that is not
/// linked).
async fn housekeeping<B: Backend>(engine: &Engine<B>, known: &[&'static str]) -> Result<(), Error> {
    #[cfg(feature = "testing")]
    let _claiming = engine.runner.hooks.claiming().await;
    let (_turn, mut conn) = engine.pool.get_for_write().await?;
    B::maintain(&mut conn).await?;
    for orphan in B::orphans(&mut conn, known, ORPHAN_SAMPLE).await? {
        tracing::warn!(listener = %orphan.listener, due = orphan.n, "deliveries are due for a listener this process does not have; \
            they wait for an instance that has it, and expire as no_listener otherwise");
    }
    Ok(())
}

/// Claims the heads of the ordering keys waiting for it (see [`Runner::wake_heads`]), or
/// everything due where the backend has no such claim. Returns whether every listener is busy.
///
/// [`Runner::wake_heads`]: crate::dispatch::Runner::wake_heads
async fn claim_heads<B: Backend>(
    engine: &Engine<B>,
    known: &[&'static str],
    versions: &str,
) -> Result<bool, Error> {
    let room = engine.runner.room(engine.config.max_events_per_retry);
    if room == 0 {
        return Ok(true);
    }
    let heads = engine.runner.take_heads(room);
    if heads.is_empty() || known.is_empty() {
        return Ok(false);
    }
    let span = tracing::debug_span!(
        "txbus.claim",
        keys = heads.len(),
        claimed = tracing::field::Empty
    );
    let result = async {
        #[cfg(feature = "testing")]
        let _claiming = engine.runner.hooks.claiming().await;
        #[cfg(feature = "testing")]
        engine.runner.hooks.head_claim_fails()?;
        let (turn, mut conn) = engine.pool.get_for_write().await?;
        let leased = Instant::now();
        let claimed = B::claim_heads(&mut conn, known, versions, &heads, room).await?;
        drop((conn, turn));
        let full = claimed.len() >= room;
        submit_all(engine, claimed, leased);
        Ok(full)
    }
    .instrument(span)
    .await;
    if result.is_err() {
        // Their next deliveries may be parked, which only a claim of their heads takes before
        // the parking ends: try again at the next poll.
        engine.runner.return_heads(heads);
    }
    result
}

/// Claims one batch and queues it. Returns when to claim again.
async fn claim<B: Backend>(
    engine: &Engine<B>,
    known: &[&'static str],
    versions: &str,
) -> Result<More, Error> {
    if known.is_empty() {
        return Ok(More::No);
    }
    let room = engine.runner.room(engine.config.max_events_per_retry);
    if room == 0 {
        return Ok(More::WhenFree);
    }
    let span = tracing::debug_span!("txbus.claim", room, claimed = tracing::field::Empty);
    async {
        #[cfg(feature = "testing")]
        let _claiming = engine.runner.hooks.claiming().await;
        let (turn, mut conn) = engine.pool.get_for_write().await?;
        let leased = Instant::now();
        let claimed = B::claim(&mut conn, known, versions, room).await?;
        drop((conn, turn));
        let more = if claimed.iter().any(|d| d.parked) {
            More::Now
        } else if claimed.len() >= room {
            More::WhenFree
        } else {
            More::No
        };
        submit_all(engine, claimed, leased);
        Ok(more)
    }
    .instrument(span)
    .await
}

/// Queues what a claim leased at `leased`, in the claim's span.
fn submit_all<B: Backend>(engine: &Engine<B>, claimed: Vec<Claimed>, leased: Instant) {
    tracing::Span::current().record("claimed", claimed.len());
    let ready = Instant::now();
    let parent = tracing::Span::current().id();
    for delivery in claimed {
        submit(engine, delivery, leased, ready, parent.clone());
    }
}

fn submit<B: Backend>(
    engine: &Engine<B>,
    delivery: Claimed,
    leased: Instant,
    ready: Instant,
    parent: Option<tracing::span::Id>,
) {
    if delivery.parked {
        return;
    }
    // Its listener, as registered, and its key.
    let listener_key = || {
        let key = delivery.ordering_key.as_deref()?;
        let (stored_as, _) = engine.registry.resolve(&delivery.listener)?;
        Some((stored_as, Arc::from(key)))
    };
    if delivery.held {
        // Claimed again at the next poll.
        engine
            .runner
            .return_heads(listener_key().into_iter().collect());
        return;
    }
    if delivery.expired {
        // The next delivery of its key may run now.
        engine.runner.wake_heads(listener_key());
        crate::metrics::died(&delivery.listener, "expired");
        #[cfg(feature = "testing")]
        engine.runner.hooks.expired();
        tracing::error!(event_id = %delivery.event_id, listener = %delivery.listener, reason = "expired",
            "delivery expired; it stays in txbus_deliveries as a dead letter");
        return;
    }
    let Some((stored_as, def)) = engine.registry.resolve(&delivery.listener) else {
        // Claims name only listeners of this process.
        tracing::warn!(listener = %delivery.listener, "claimed a delivery of an unknown listener; it will be retried after its lease");
        return;
    };
    engine.runner.submit(
        Job {
            key: DeliveryKey {
                event_id: delivery.event_id,
                listener: stored_as,
                attempt: delivery.attempt,
            },
            def,
            payload: delivery.payload,
            version: delivery.version,
            ordering_key: delivery.ordering_key.map(Arc::from),
            emitted_at: delivery.emitted_at,
            deadline: dispatch::deadline(leased, delivery.lease),
            ready,
            settings: engine.settings_for(def.event),
            in_flight: engine.runner.tracker.enter(),
            parent,
            trace: delivery.trace,
        },
        false,
    );
}
