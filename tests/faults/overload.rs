//! Scenario 4: overload. 50,000 events emitted by 16 tasks, much faster than the listeners
//! (8 at a time, 20 ms each while the emit lasts: 400 a second) can run them. Memory stays
//! bounded: what does not fit in the dispatch queue is handed back to the database for the
//! poller, and every event is delivered (the listeners speed up to 2 ms once the emit is over).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use txbus::{Context, EventBus, EventSettings, ListenerError};

use crate::scale;
use crate::support::{PATIENCE, Probe, TestBackend, eventually};

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "fault.overload.job")]
struct Job {
    n: u64,
    padding: String,
}

/// Whether the emit is still going on: the listeners are slowest then.
static FLOODING: AtomicBool = AtomicBool::new(true);

#[txbus::listener(name = "fault.overload.work")]
async fn work(event: Job, ctx: Context) -> Result<(), ListenerError> {
    let pause = if FLOODING.load(Ordering::Relaxed) {
        20
    } else {
        2
    };
    tokio::time::sleep(Duration::from_millis(pause)).await;
    ctx.state::<Arc<Probe>>()?.record(&ctx, event.n.to_string());
    Ok(())
}

/// A field of /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

pub async fn overload<B: TestBackend>() {
    let events = 50_000 * scale();
    let db = B::open().await;
    let pool = db.another_pool().await;
    let probe = Probe::new();
    let bus = EventBus::builder(pool)
        .state(probe.clone())
        .max_concurrent_listeners(8)
        // A hand-back that finds the completer's queue full is dropped: the delivery then waits
        // for its lease, which is this long.
        .event::<Job>(EventSettings::default().max_execution_time(Duration::from_secs(2)))
        .retry_every(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    let before = status_kib("VmRSS:");
    std::fs::write("/proc/self/clear_refs", "5").unwrap();

    // Watch the database while emitting: deliveries handed back to the poller show up as due
    // rows that no run holds.
    let most_handed_back = Arc::new(AtomicI64::new(0));
    let watcher = tokio::spawn({
        let (pool, most) = (db.pool.clone(), most_handed_back.clone());
        async move {
            loop {
                let n = B::count(
                    &pool,
                    "SELECT count(*) AS n FROM txbus_deliveries WHERE attempts = 0",
                )
                .await;
                most.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let emitters: Vec<_> = (0..16u64)
        .map(|task| {
            let bus = bus.clone();
            tokio::spawn(async move {
                for i in 0..(events as u64 / 16) {
                    let n = task * 1_000_000 + i;
                    bus.emit(
                        Job {
                            n,
                            padding: "x".repeat(200),
                        },
                        [],
                    )
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    for emitter in emitters {
        emitter.await.unwrap();
    }
    let emitted = (events as u64 / 16) * 16;
    FLOODING.store(false, Ordering::Relaxed);
    // Some 40,000 deliveries wait for a poller that runs 8 at a time: fail when it stalls, not
    // when it takes long.
    let (mut seen, mut progressed) = (0, std::time::Instant::now());
    while (seen as u64) < emitted {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let runs = probe.calls().len();
        if runs > seen {
            (seen, progressed) = (runs, std::time::Instant::now());
        }
        assert!(
            progressed.elapsed() < PATIENCE,
            "delivery stalled at {seen} of {emitted} runs"
        );
    }
    tokio::time::timeout(PATIENCE, bus.wait_idle())
        .await
        .unwrap();
    watcher.abort();
    let peak = status_kib("VmHWM:");
    let growth_mib = peak.saturating_sub(before) / 1024;
    let distinct: HashSet<String> = probe.calls().into_iter().map(|c| c.note).collect();
    eprintln!(
        "[{}] overload: {emitted} events, up to {} handed back to the poller at once, RSS {} MiB before, peak {} MiB",
        B::NAME,
        most_handed_back.load(Ordering::Relaxed),
        before / 1024,
        peak / 1024
    );
    assert_eq!(distinct.len() as u64, emitted, "every event was delivered");
    assert!(
        most_handed_back.load(Ordering::Relaxed) > 0,
        "the overload never reached the poller"
    );
    // Generous: the probe itself keeps a record per run (about 10 MiB here).
    assert!(growth_mib < 128, "memory grew by {growth_mib} MiB");
    eventually("the table to empty", || async {
        (B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await == 0).then_some(())
    })
    .await;
    bus.shutdown().await;
}
