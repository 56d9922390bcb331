//! Scenario 3: listeners that never return. They hold a few of the concurrency permits until
//! their deadline; every other delivery goes on meanwhile. Each hanging run is cancelled at
//! `max_execution_time`, and its retry never overlaps it. Shown by what each run saw and by
//! counts, not by how long anything took.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

impl Overlap {
    /// Runs in progress, of every delivery.
    fn in_progress(&self) -> usize {
        self.running.lock().unwrap().values().sum()
    }
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
    let overlap = ctx.state::<Arc<Overlap>>()?;
    let _running = Running::start(overlap, ctx.event_id().get());
    // Recorded once in progress: a run seen in the probe is counted in `Overlap`.
    ctx.state::<Arc<Probe>>()?.record(&ctx, "start");
    std::future::pending::<()>().await;
    Ok(())
}

/// Records how many hanging runs were in progress while it ran.
#[txbus::listener(name = "fault.stuck.quick")]
async fn quick(_event: Quick, ctx: Context) -> Result<(), ListenerError> {
    let hanging = ctx.state::<Arc<Overlap>>()?.in_progress();
    ctx.state::<Arc<Probe>>()?
        .record(&ctx, format!("beside {hanging}"));
    Ok(())
}

pub async fn stuck_listeners_do_not_block_others<B: TestBackend>() {
    const HANGING: usize = 3;
    const QUICK: usize = 200;
    // Long enough that the quick deliveries have all run before the first deadline, even on a
    // busy machine: the test shows they did by what they saw, not by the clock.
    let timeout = Duration::from_secs(5);
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

    for n in 0..HANGING {
        bus.emit(Hangs { n: n as u32 }, []).await.unwrap();
    }
    probe
        .wait_until("the hanging runs to start", |c| c.len() == HANGING)
        .await;
    bus.transaction(async |tx| {
        for n in 0..QUICK {
            tx.emit(&Quick { n: n as u32 }).await?;
        }
        Ok::<_, txbus::Error>(())
    })
    .await
    .unwrap();
    let calls = probe
        .wait_until("every quick delivery", |c| {
            c.iter()
                .filter(|c| c.listener == "fault.stuck.quick")
                .count()
                >= QUICK
        })
        .await;
    // Every quick delivery ran, once, while the three hanging first attempts were in progress
    // (holding three of the eight permits): none waited for a hanging run to end.
    let quick: Vec<_> = calls
        .iter()
        .filter(|c| c.listener == "fault.stuck.quick")
        .collect();
    assert_eq!(quick.len(), QUICK, "each quick delivery ran once");
    let beside = format!("beside {HANGING}");
    let waited: Vec<_> = quick.iter().filter(|c| c.note != beside).collect();
    assert!(
        waited.is_empty(),
        "quick deliveries ran without the hanging ones in progress: {waited:?}"
    );
    let hanging: Vec<_> = calls
        .iter()
        .filter(|c| c.listener == "fault.stuck.hanging")
        .map(|c| c.attempt)
        .collect();
    assert_eq!(
        hanging, [1; HANGING],
        "only the first attempts of the hanging ones had started"
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
    // Two runs of each, in order; the second began only after the first was dropped (below).
    let runs = probe.calls_of("fault.stuck.hanging");
    assert_eq!(runs.len(), 2 * HANGING, "{runs:?}");
    for n in 0..HANGING {
        let id = runs[n].event_id;
        let of_one: Vec<_> = runs.iter().filter(|c| c.event_id == id).collect();
        assert_eq!(of_one.iter().map(|c| c.attempt).collect::<Vec<_>>(), [1, 2]);
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
