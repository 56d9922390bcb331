//! Scenario 3: listeners that never return. They hold a few of the concurrency permits until
//! their deadline; every other delivery goes on meanwhile. Each hanging run is cancelled at
//! `max_execution_time`, and its retry never overlaps it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use txbus::{Context, EventBus, EventSettings, ListenerError};

use crate::support::{Probe, TestBackend, eventually};

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "fault.stuck.hangs")]
struct Hangs {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "fault.stuck.quick")]
struct Quick {
    n: u32,
}

/// Runs in progress per delivery, and the most ever at once for any one delivery.
#[derive(Default)]
struct Overlap {
    running: Mutex<HashMap<i64, usize>>,
    most: std::sync::atomic::AtomicUsize,
}

struct Running<'a> {
    overlap: &'a Overlap,
    id: i64,
}

impl<'a> Running<'a> {
    fn start(overlap: &'a Overlap, id: i64) -> Self {
        let mut running = overlap.running.lock().unwrap();
        let now = running.entry(id).or_default();
        *now += 1;
        overlap.most.fetch_max(*now, Ordering::SeqCst);
        Self { overlap, id }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        *self
            .overlap
            .running
            .lock()
            .unwrap()
            .entry(self.id)
            .or_default() -= 1;
    }
}

#[txbus::listener(name = "fault.stuck.hanging")]
async fn hanging(_event: Hangs, ctx: Context) -> Result<(), ListenerError> {
    let probe = ctx.state::<Arc<Probe>>()?;
    probe.record(&ctx, "start");
    let overlap = ctx.state::<Arc<Overlap>>()?;
    let _running = Running::start(overlap, ctx.event_id().get());
    std::future::pending::<()>().await;
    Ok(())
}

#[txbus::listener(name = "fault.stuck.quick")]
async fn quick(_event: Quick, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, "done");
    Ok(())
}

pub async fn stuck_listeners_do_not_block_others<B: TestBackend>() {
    const HANGING: usize = 3;
    const QUICK: usize = 200;
    let timeout = Duration::from_millis(1500);
    let db = B::open().await;
    let probe = Probe::new();
    let overlap = Arc::new(Overlap::default());
    let settings = EventSettings::default()
        .max_execution_time(timeout)
        .retry_after(Duration::from_millis(50))
        .max_attempts(2);
    let bus = EventBus::builder(db.pool.clone())
        .state(probe.clone())
        .state(overlap.clone())
        .event::<Hangs>(settings)
        .max_concurrent_listeners(8)
        .retry_every(Duration::from_millis(25))
        .build()
        .await
        .unwrap();

    let started = Instant::now();
    for n in 0..HANGING {
        bus.emit(Hangs { n: n as u32 }, []).await.unwrap();
    }
    for n in 0..QUICK {
        bus.emit(Quick { n: n as u32 }, []).await.unwrap();
    }
    let calls = probe
        .wait_until("every quick delivery", |c| {
            c.iter()
                .filter(|c| c.listener == "fault.stuck.quick")
                .count()
                == QUICK
        })
        .await;
    let quick_done = started.elapsed();
    assert!(
        quick_done < timeout,
        "the quick deliveries waited for the hanging ones: {quick_done:?}"
    );
    let hanging_started = calls
        .iter()
        .filter(|c| c.listener == "fault.stuck.hanging")
        .count();
    assert_eq!(
        hanging_started, HANGING,
        "the hanging ones were running meanwhile"
    );

    // Each hanging delivery: cancelled at its deadline, retried, never two runs at once, dead
    // after its two attempts.
    let dead = eventually("the hanging deliveries to die", || async {
        let rows = B::deliveries(&db.pool).await;
        (rows.len() == HANGING && rows.iter().all(|r| r.dead_reason.is_some())).then_some(rows)
    })
    .await;
    for row in &dead {
        assert_eq!(row.dead_reason.as_deref(), Some("max_attempts"));
        assert_eq!(row.attempts, 2);
        assert!(
            row.last_error
                .as_deref()
                .unwrap_or_default()
                .contains("timed out"),
            "{row:?}"
        );
    }
    let runs = probe.calls_of("fault.stuck.hanging");
    for n in 0..HANGING {
        let id = runs[n].event_id;
        let mut of_one: Vec<_> = runs.iter().filter(|c| c.event_id == id).collect();
        of_one.sort_by_key(|c| c.attempt);
        assert_eq!(of_one.iter().map(|c| c.attempt).collect::<Vec<_>>(), [1, 2]);
        for pair in of_one.windows(2) {
            assert!(
                pair[1].started - pair[0].started >= timeout * 9 / 10,
                "a retry started before its run was cancelled"
            );
        }
    }
    crate::support::idle(&bus).await;
    bus.shutdown().await;
    // Every cancelled run was dropped (its guard ran), and no two runs of one delivery overlapped.
    assert_eq!(
        overlap.most.load(Ordering::SeqCst),
        1,
        "two runs of one delivery overlapped"
    );
    assert!(
        overlap.running.lock().unwrap().values().all(|n| *n == 0),
        "a hanging run was not dropped"
    );
}
