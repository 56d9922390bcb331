//! Failures: retries with backoff, timeouts that cancel, panics, payloads that do not decode.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use txbus::{Context, EventSettings, ListenerError};

use crate::support::{HOUR, Probe, TestBackend, bus, fast_settings};

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.retried")]
struct Retried {
    n: u32,
}

#[txbus::listener]
async fn retried_ok(_event: Retried, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, "ok");
    Ok(())
}

#[txbus::listener]
async fn retried_fails_twice(_event: Retried, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, "run");
    if ctx.attempt() <= 2 {
        return Err(format!("attempt {} fails", ctx.attempt()).into());
    }
    Ok(())
}

pub async fn failures_are_retried_with_backoff<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let settings = fast_settings()
        .retry_after(Duration::from_millis(200))
        .backoff_factor(2.0);
    let bus = bus(db.pool.clone(), &probe)
        .event::<Retried>(settings)
        .build()
        .await
        .unwrap();
    let id = bus.emit(Retried { n: 1 }, []).await.unwrap();

    let calls = probe
        .wait_until("three runs of the failing listener", |c| {
            c.iter()
                .filter(|c| c.listener == "retried_fails_twice")
                .count()
                == 3
        })
        .await;
    crate::support::idle(&bus).await;
    crate::support::eventually("the event to be deleted", || async {
        (B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await == 0).then_some(())
    })
    .await;

    let ok = probe.calls_of("retried_ok");
    assert_eq!(
        ok.len(),
        1,
        "the succeeding listener ran exactly once: {ok:?}"
    );
    let failing = probe.calls_of("retried_fails_twice");
    assert_eq!(failing.len(), 3, "{failing:?}");
    assert!(calls.iter().all(|c| c.event_id == id));
    let attempts: Vec<_> = failing.iter().map(|c| c.attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);
    // The first retry waits retry_after, the second twice that (backoff factor 2), each plus at
    // most 10% jitter. Runs cannot start before then; the upper bound only shows progress.
    let first_gap = failing[1].started - failing[0].started;
    let second_gap = failing[2].started - failing[1].started;
    assert!(first_gap >= Duration::from_millis(200), "{first_gap:?}");
    assert!(second_gap >= Duration::from_millis(400), "{second_gap:?}");
    assert!(first_gap < Duration::from_secs(5) && second_gap < Duration::from_secs(5));
    bus.shutdown().await;
}

/// A retry this process wrote wakes its poller when it falls due: with a poll only every hour,
/// both retries still run.
pub async fn retries_run_when_due_without_waiting_for_a_poll<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let settings = fast_settings().retry_after(Duration::from_millis(300));
    let bus = bus(db.pool.clone(), &probe)
        .retry_every(HOUR)
        .event::<Retried>(settings)
        .build()
        .await
        .unwrap();
    bus.emit(Retried { n: 2 }, []).await.unwrap();
    assert_eq!(failing_attempts(&probe, 3).await, [1, 2, 3]);
    bus.shutdown().await;
}

/// Waits until the failing listener ran `runs` times here; returns the attempts of its runs.
async fn failing_attempts(probe: &Probe, runs: usize) -> Vec<u32> {
    probe
        .wait_until("runs of the failing listener", |c| {
            c.iter()
                .filter(|c| c.listener == "retried_fails_twice")
                .count()
                == runs
        })
        .await;
    probe
        .calls_of("retried_fails_twice")
        .iter()
        .map(|c| c.attempt)
        .collect()
}

/// A retry another process wrote wakes this one's poller when it falls due: the poller reads
/// when the next delivery waiting in the table is due. With a poll only every hour, the retry
/// still runs here, and the next one too.
pub async fn a_retry_written_elsewhere_runs_when_due_without_waiting_for_a_poll<B: TestBackend>() {
    let db = B::open().await;
    let settings = fast_settings().retry_after(Duration::from_secs(4));
    let first = Probe::new();
    let elsewhere = bus(db.pool.clone(), &first)
        .event::<Retried>(settings)
        .build()
        .await
        .unwrap();
    elsewhere.emit(Retried { n: 3 }, []).await.unwrap();
    first
        .wait_until("the failing listener's first run", |c| {
            c.iter().any(|c| c.listener == "retried_fails_twice")
        })
        .await;
    crate::support::idle(&elsewhere).await;
    elsewhere.shutdown().await;

    let second = Probe::new();
    let bus = bus(db.pool.clone(), &second)
        .retry_every(HOUR)
        .event::<Retried>(settings)
        .build()
        .await
        .unwrap();
    assert_eq!(failing_attempts(&second, 2).await, [2, 3]);
    assert!(second.calls_of("retried_ok").is_empty());
    bus.shutdown().await;
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.slow")]
struct Slow {
    n: u32,
}

/// Counts runs in progress in the probe; a run that is cancelled drops it without finishing.
struct Running {
    probe: Arc<Probe>,
    finished: bool,
}

impl Running {
    fn start(probe: Arc<Probe>) -> Self {
        let now = probe.running.fetch_add(1, Ordering::SeqCst) + 1;
        probe.most_running.fetch_max(now, Ordering::SeqCst);
        Self {
            probe,
            finished: false,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.probe.running.fetch_sub(1, Ordering::SeqCst);
        if !self.finished {
            self.probe.cancelled.fetch_add(1, Ordering::SeqCst);
            self.probe.cancelled_at.lock().unwrap().push(Instant::now());
        }
    }
}

/// Hangs on its first two attempts, so the bus must cancel it; succeeds on the third.
#[txbus::listener]
async fn slow_twice(_event: Slow, ctx: Context) -> Result<(), ListenerError> {
    let probe = ctx.state::<Arc<Probe>>()?.clone();
    probe.record(&ctx, "start");
    let mut running = Running::start(probe);
    if ctx.attempt() <= 2 {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    running.finished = true;
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.always_slow")]
struct AlwaysSlow {
    n: u32,
}

#[txbus::listener]
async fn always_slow(_event: AlwaysSlow, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, "start");
    tokio::time::sleep(Duration::from_secs(3600)).await;
    Ok(())
}

pub async fn timeouts_cancel_the_listener_without_overlap<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    // A lease of 2 s: its safety margin (a tenth) covers a late timer on a busy machine.
    let lease = Duration::from_secs(2);
    let settings = fast_settings()
        .max_execution_time(lease)
        .retry_after(Duration::from_millis(50));
    let bus = bus(db.pool.clone(), &probe)
        .event::<Slow>(settings)
        .event::<AlwaysSlow>(settings.max_attempts(1))
        .build()
        .await
        .unwrap();
    let before_emit = Instant::now();
    bus.emit(Slow { n: 1 }, []).await.unwrap();
    bus.emit(AlwaysSlow { n: 1 }, []).await.unwrap();

    probe
        .wait_until("the third attempt", |c| {
            c.iter()
                .any(|c| c.listener == "slow_twice" && c.attempt == 3)
        })
        .await;
    let dead = crate::support::eventually("the always slow delivery to die", || async {
        B::deliveries(&db.pool)
            .await
            .into_iter()
            .find(|d| d.dead_reason.is_some())
    })
    .await;
    crate::support::idle(&bus).await;

    let runs = probe.calls_of("slow_twice");
    assert_eq!(
        runs.iter().map(|c| c.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    // Each attempt was cancelled at its deadline (its lease less a tenth), not before: the lease
    // of the first began after the emit was called, that of the second once the first one's
    // failure was recorded, after its cancellation (a run may start well after its lease began,
    // so its own start bounds nothing). The next attempt started only after the cancellation.
    let cancelled_at = probe.cancelled_at.lock().unwrap().clone();
    assert_eq!(cancelled_at.len(), 2, "{runs:?}");
    let leases_began_after = [before_emit, cancelled_at[0]];
    for (i, cancelled) in cancelled_at.iter().enumerate() {
        let held = *cancelled - leases_began_after[i];
        // Half the lease: the start of a lease is read just before the statement that takes it.
        assert!(
            held >= lease / 2,
            "attempt {} was cancelled {held:?} into its lease of {lease:?}",
            i + 1
        );
        assert!(
            runs[i + 1].started >= *cancelled,
            "{runs:?} {cancelled_at:?}"
        );
    }
    assert_eq!(
        probe.most_running.load(Ordering::SeqCst),
        1,
        "two runs of the delivery overlapped"
    );
    assert_eq!(
        probe.cancelled.load(Ordering::SeqCst),
        2,
        "the hanging runs were dropped"
    );
    assert_eq!(dead.dead_reason.as_deref(), Some("max_attempts"));
    let error = dead.last_error.unwrap_or_default();
    assert!(error.contains("timed out"), "{error}");
    bus.shutdown().await;
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.panicky")]
struct Panicky {
    n: u32,
}

#[txbus::listener]
async fn panics_first(event: Panicky, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?
        .record(&ctx, format!("{}", event.n));
    if ctx.attempt() == 1 {
        panic!("listener bug on event {}", event.n);
    }
    Ok(())
}

#[txbus::listener]
async fn beside_the_panic(event: Panicky, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?
        .record(&ctx, format!("{}", event.n));
    Ok(())
}

pub async fn panics_are_retried_and_the_bus_keeps_working<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let bus = bus(db.pool.clone(), &probe).build().await.unwrap();
    for n in 1..=2 {
        bus.emit(Panicky { n }, []).await.unwrap();
        probe
            .wait_until("the retry after the panic", |c| {
                c.iter().any(|c| {
                    c.listener == "panics_first" && c.attempt == 2 && c.note == n.to_string()
                })
            })
            .await;
    }
    crate::support::idle(&bus).await;
    let panicking: Vec<_> = probe
        .calls_of("panics_first")
        .iter()
        .map(|c| (c.note.clone(), c.attempt))
        .collect();
    assert_eq!(
        panicking,
        [
            ("1".into(), 1),
            ("1".into(), 2),
            ("2".into(), 1),
            ("2".into(), 2)
        ]
    );
    let beside: Vec<_> = probe
        .calls_of("beside_the_panic")
        .iter()
        .map(|c| c.note.clone())
        .collect();
    assert_eq!(beside, ["1", "2"]);
    bus.shutdown().await;
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.decoded")]
struct Decoded {
    n: u32,
}

#[txbus::listener(name = "contract.decoded_listener")]
async fn decoded(event: Decoded, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, event.n.to_string());
    Ok(())
}

pub async fn undeserializable_payload_fails_only_its_delivery<B: TestBackend>() {
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    let mut payloads: Vec<String> = (1..=6).map(|n| format!(r#"{{"n":{n}}}"#)).collect();
    payloads.insert(3, r#"{"n":"not a number"}"#.to_owned());
    let ids = B::insert_backlog(
        &db.pool,
        "contract.decoded",
        payloads,
        "contract.decoded_listener".into(),
        HOUR,
    )
    .await;
    let bad = ids[3];

    let probe = Probe::new();
    let settings = EventSettings::default().retry_after(Duration::from_secs(600));
    let bus = bus(db.pool.clone(), &probe)
        .event::<Decoded>(settings)
        .build()
        .await
        .unwrap();
    probe
        .wait_until("the six good events", |c| c.len() == 6)
        .await;
    let failed = crate::support::eventually("the failure to be recorded", || async {
        B::deliveries(&db.pool)
            .await
            .into_iter()
            .find(|d| d.last_error.is_some())
    })
    .await;
    crate::support::idle(&bus).await;

    assert_eq!(failed.event_id, bad);
    assert_eq!(failed.attempts, 1);
    assert_eq!(
        failed.dead_reason, None,
        "a decoding failure is retried like any other"
    );
    let error = failed.last_error.unwrap();
    assert!(error.contains("does not deserialize into"), "{error}");
    assert!(error.contains("Decoded"), "{error}");
    let mut delivered: Vec<_> = probe.calls().into_iter().map(|c| c.note).collect();
    delivered.sort();
    assert_eq!(delivered, ["1", "2", "3", "4", "5", "6"]);
    bus.shutdown().await;
}
