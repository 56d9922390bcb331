//! Scenario 5: `shutdown()` in the middle of work. It returns within the grace period (plus the
//! last writes); what had not started is handed back at once (due again as soon as `shutdown()`
//! returns, not leased for another 30 s), so another instance runs it; what was running
//! finishes, or is cancelled at the end of the grace period and run again elsewhere.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use txbus::{Context, DeliveryCounts, EventBus, EventBusBuilder, EventId, ListenerError};

use crate::support::{Probe, TestBackend, TestDb};

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "fault.shutdown.slow")]
struct SlowJob {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "fault.shutdown.stuck")]
struct StuckJob {
    n: u32,
}

/// Takes 300 ms.
#[txbus::listener(name = "fault.shutdown.slow")]
async fn slow(_event: SlowJob, ctx: Context) -> Result<(), ListenerError> {
    let probe = ctx.state::<Arc<Probe>>()?;
    probe.record(&ctx, "start");
    tokio::time::sleep(Duration::from_millis(300)).await;
    probe.record(&ctx, "end");
    Ok(())
}

/// Hangs on its first attempt; quick after.
#[txbus::listener(name = "fault.shutdown.stuck")]
async fn stuck(_event: StuckJob, ctx: Context) -> Result<(), ListenerError> {
    let probe = ctx.state::<Arc<Probe>>()?;
    probe.record(&ctx, "start");
    if ctx.attempt() == 1 {
        std::future::pending::<()>().await;
    }
    probe.record(&ctx, "end");
    Ok(())
}

async fn bus<B: TestBackend>(db: &TestDb<B>, probe: &Arc<Probe>) -> EventBusBuilder<B> {
    EventBus::builder(db.another_pool().await)
        .state(probe.clone())
        .retry_every(Duration::from_millis(25))
        .max_concurrent_listeners(4)
}

/// How long `shutdown()` may take beyond the grace period: the bus's last writes.
const LAST_WRITES: Duration = Duration::from_secs(2);

/// The deliveries of `listener` as they are in the database, read by a bus that runs nothing.
async fn counts<B: TestBackend>(db: &TestDb<B>, listener: &str) -> DeliveryCounts {
    let reader = EventBus::builder(db.another_pool().await)
        .poller(false)
        .build()
        .await
        .unwrap();
    let counts = reader.stats().await.unwrap().listeners[listener];
    reader.shutdown().await;
    counts
}

fn ended(probe: &Probe, listener: &str) -> HashSet<EventId> {
    probe
        .calls_of(listener)
        .into_iter()
        .filter(|c| c.note == "end")
        .map(|c| c.event_id)
        .collect()
}

pub async fn shutdown_releases_and_finishes<B: TestBackend>() {
    const JOBS: usize = 40;
    let db = B::open().await;

    // Running listeners finish within the grace period; the queued rest is handed back.
    let first = Probe::new();
    let grace = Duration::from_secs(2);
    let a = bus(&db, &first)
        .await
        .shutdown_grace(grace)
        .build()
        .await
        .unwrap();
    for n in 0..JOBS {
        a.emit(SlowJob { n: n as u32 }, []).await.unwrap();
    }
    first
        .wait_until("four running", |c| {
            c.iter().filter(|c| c.note == "start").count() >= 4
        })
        .await;
    let stopping = Instant::now();
    a.shutdown().await;
    let took = stopping.elapsed();
    assert!(took < grace + LAST_WRITES, "shutdown took {took:?}");
    let starts = first.calls().iter().filter(|c| c.note == "start").count();
    let done_by_a = ended(&first, "fault.shutdown.slow");
    assert_eq!(
        done_by_a.len(),
        starts,
        "every run A started finished (none was cancelled)"
    );
    assert!(done_by_a.len() < JOBS, "A was stopped in the middle");

    // Handed back at once: due now, none still leased (the lease is 30 s).
    let left = counts(&db, "fault.shutdown.slow").await;
    assert_eq!(
        (left.due, left.running, left.stale, left.retrying),
        ((JOBS - done_by_a.len()) as u64, 0, 0, 0),
        "{left:?}"
    );

    let second = Probe::new();
    let b = bus(&db, &second).await.build().await.unwrap();
    second
        .wait_until("the rest on the other instance", |c| {
            c.iter().filter(|c| c.note == "end").count() >= JOBS - done_by_a.len()
        })
        .await;
    crate::support::idle(&b).await;
    let done_by_b = ended(&second, "fault.shutdown.slow");
    assert!(
        done_by_a.is_disjoint(&done_by_b),
        "a delivery A completed ran again on B"
    );
    assert_eq!(done_by_a.len() + done_by_b.len(), JOBS);
    assert_eq!(
        second.calls().iter().filter(|c| c.note == "start").count(),
        JOBS - done_by_a.len(),
        "B ran each of the rest once"
    );
    b.shutdown().await;

    // Running listeners that outlive the grace period are cancelled and run again elsewhere.
    let third = Probe::new();
    let grace = Duration::from_millis(500);
    let c = bus(&db, &third)
        .await
        .shutdown_grace(grace)
        .build()
        .await
        .unwrap();
    for n in 0..3 {
        c.emit(StuckJob { n }, []).await.unwrap();
    }
    third.wait_until("three hanging", |c| c.len() >= 3).await;
    let stopping = Instant::now();
    c.shutdown().await;
    let took = stopping.elapsed();
    assert!(took < grace + LAST_WRITES, "shutdown took {took:?}");
    assert_eq!(third.calls().len(), 3, "{:?}", third.calls());
    assert!(ended(&third, "fault.shutdown.stuck").is_empty());

    // Cancelled and handed back at once: due now, not leased for another 30 s.
    let left = counts(&db, "fault.shutdown.stuck").await;
    assert_eq!(
        (left.due, left.running, left.stale, left.retrying),
        (3, 0, 0, 0),
        "{left:?}"
    );

    let fourth = Probe::new();
    let d = bus(&db, &fourth).await.build().await.unwrap();
    fourth
        .wait_until("the cancelled runs, run again", |c| {
            c.iter().filter(|c| c.note == "end").count() >= 3
        })
        .await;
    crate::support::idle(&d).await;
    let calls = fourth.calls();
    assert_eq!(calls.len(), 6, "each ran once more: {calls:?}");
    assert!(calls.iter().all(|c| c.attempt == 2), "{calls:?}");
    d.shutdown().await;
    crate::support::eventually("every delivery done", || async {
        (B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await == 0).then_some(())
    })
    .await;
}
