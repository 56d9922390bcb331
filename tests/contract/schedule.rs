//! Scheduled events and cancellation: due times, atomicity, cancel, restarts, bad input.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use txbus::{Context, Error, EventSettings, ListenerError, persist};

use txbus::Entity;

use crate::emit::{User, user};
use crate::support::backends::create_users_table;
use crate::support::{HOUR, Probe, TestBackend, bus, fast_settings};

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.reminder")]
struct Reminder {
    n: u32,
}

#[txbus::listener]
async fn remind(_event: Reminder, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, "reminded");
    Ok(())
}

#[txbus::listener]
async fn remind_twice(_event: Reminder, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, "reminded");
    Ok(())
}

/// A timeout whose listener fails its first run, then succeeds.
#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.timeout")]
struct Timeout {
    n: u32,
}

#[txbus::listener]
async fn time_out(_event: Timeout, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, "run");
    if ctx.attempt() == 1 {
        return Err("the first run fails".into());
    }
    Ok(())
}

/// An event whose listener waits for a permit of the bus's `Arc<Semaphore>` before it ends.
#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.gated")]
struct Gated {
    n: u32,
}

#[txbus::listener]
async fn gated(_event: Gated, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, "started");
    let gate = ctx.state::<Arc<Semaphore>>()?;
    gate.acquire().await.map_err(|e| e.to_string())?.forget();
    Ok(())
}

const FAR: Duration = Duration::from_secs(3600);

/// The lower bound a run of an event scheduled `delay` after `before` has: the database's clock
/// counts the delay (SQLite in whole milliseconds), so allow it a few milliseconds of skew.
fn not_before(before: Instant, delay: Duration) -> Instant {
    before + delay - Duration::from_millis(20)
}

/// A scheduled event commits with its entity, its deliveries wait unleased and never run, and
/// it runs once due: the poll every hour does not matter, the bus that wrote it wakes then.
/// Stats count it as scheduled, and the list shows it with its due time.
pub async fn scheduled_events_run_when_due_and_not_before<B: TestBackend>()
where
    User: Entity<B>,
{
    let db = B::open().await;
    create_users_table(&db.pool).await;
    let probe = Probe::new();
    let bus = bus(db.pool.clone(), &probe)
        .retry_every(HOUR)
        .build()
        .await
        .unwrap();
    // Let the poller's first poll pass: it then finds nothing waiting and sleeps for the hour,
    // so only the wake-up of the emit can run the event in time.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let delay = Duration::from_secs(2);
    let before = Instant::now();
    let wall = SystemTime::now();
    let id = bus
        .emit_after(
            delay,
            Reminder { n: 1 },
            [persist(&user(1, "a@example.com"))],
        )
        .await
        .unwrap();
    assert!(B::user_exists(&db.pool, 1).await, "the entity committed");

    let rows = B::deliveries(&db.pool).await;
    assert_eq!(rows.len(), 2, "one delivery per listener: {rows:?}");
    assert!(
        rows.iter()
            .all(|r| r.event_id == id.get() && r.attempts == 0)
    );
    let stats = bus.stats().await.unwrap();
    let ran = probe.calls();
    if ran.is_empty() {
        assert_eq!(
            (stats.total.scheduled, stats.total.due, stats.total.retrying),
            (2, 0, 0)
        );
        assert_eq!(stats.total.pending(), 2);
        assert_eq!(
            stats.total.oldest_pending_age, None,
            "nothing waits to run yet"
        );
        let listed = bus.scheduled(10).await.unwrap();
        assert_eq!(listed.len(), 2, "{listed:?}");
        for s in &listed {
            assert_eq!(
                (s.event_id, s.event_name.as_str()),
                (id, "contract.reminder")
            );
            let ahead = s.due_at.duration_since(wall).unwrap_or_default();
            assert!(
                ahead >= Duration::from_millis(1900) && ahead < Duration::from_secs(60),
                "{s:?}"
            );
        }
        let listeners: Vec<_> = listed
            .iter()
            .map(|s| crate::support::short(&s.listener))
            .collect();
        assert!(listeners.contains(&"remind") && listeners.contains(&"remind_twice"));
    }

    let calls = probe
        .wait_until("both listeners' runs", |c| c.len() == 2)
        .await;
    for call in &calls {
        assert_eq!((call.event_id, call.attempt), (id, 1), "{call:?}");
        assert!(
            call.started >= not_before(before, delay),
            "ran before it was due: {call:?}"
        );
    }
    crate::support::idle(&bus).await;
    crate::support::eventually("the deliveries to be deleted", || async {
        (B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await == 0).then_some(())
    })
    .await;
    assert!(bus.scheduled(10).await.unwrap().is_empty());
    bus.shutdown().await;
}

/// A scheduled event written by another process runs here within a poll of falling due.
pub async fn a_scheduled_event_written_elsewhere_runs_when_due<B: TestBackend>() {
    let db = B::open().await;
    let elsewhere_probe = Probe::new();
    let elsewhere = bus(db.pool.clone(), &elsewhere_probe)
        .poller(false)
        .build()
        .await
        .unwrap();
    let probe = Probe::new();
    let here = bus(db.another_pool().await, &probe).build().await.unwrap();
    let delay = Duration::from_millis(800);
    let before = Instant::now();
    let id = elsewhere
        .emit_after(delay, Reminder { n: 2 }, [])
        .await
        .unwrap();
    let calls = probe
        .wait_until("both listeners' runs", |c| c.len() == 2)
        .await;
    assert!(calls.iter().all(|c| c.event_id == id && c.attempt == 1));
    assert!(
        calls.iter().all(|c| c.started >= not_before(before, delay)),
        "{calls:?}"
    );
    assert!(
        elsewhere_probe.calls().is_empty(),
        "the emitter has no poller"
    );
    elsewhere.shutdown().await;
    here.shutdown().await;
}

/// A scheduled event commits with the transaction, and is rolled back with it; an emit whose
/// operation fails writes nothing.
pub async fn a_scheduled_event_rolls_back_with_its_transaction<B: TestBackend>()
where
    User: Entity<B>,
{
    let db = B::open().await;
    create_users_table(&db.pool).await;
    let probe = Probe::new();
    let bus = bus(db.pool.clone(), &probe).build().await.unwrap();

    let rolled_back: Result<(), Error> = bus
        .transaction(async |tx| {
            tx.emit_after(FAR, &Reminder { n: 3 }).await?;
            tx.emit_at(SystemTime::now() + FAR, &Reminder { n: 4 })
                .await?;
            Err(Error::Invalid("the caller gives up".into()))
        })
        .await;
    assert!(rolled_back.is_err());
    assert!(B::deliveries(&db.pool).await.is_empty());

    bus.emit(Reminder { n: 0 }, [persist(&user(7, "taken@example.com"))])
        .await
        .unwrap();
    probe
        .wait_until("the first event's runs", |c| c.len() == 2)
        .await;
    crate::support::idle(&bus).await;
    // The same email again violates the unique constraint: nothing of the emit is written.
    let failed = bus
        .emit_after(
            FAR,
            Reminder { n: 5 },
            [persist(&user(8, "taken@example.com"))],
        )
        .await;
    assert!(matches!(failed, Err(Error::Database(_))), "{failed:?}");
    assert!(!B::user_exists(&db.pool, 8).await);

    let ids = bus
        .transaction(async |tx| {
            let later = tx.emit_after(FAR, &Reminder { n: 6 }).await?;
            let now = tx.emit(&Reminder { n: 7 }).await?;
            Ok::<_, Error>((later, now))
        })
        .await
        .unwrap();
    let calls = probe
        .wait_until("the immediate event's runs", |c| c.len() == 4)
        .await;
    assert!(calls[2..].iter().all(|c| c.event_id == ids.1), "{calls:?}");
    crate::support::idle(&bus).await;
    let rows = B::deliveries(&db.pool).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| r.event_id == ids.0.get() && r.attempts == 0)
    );
    assert_eq!(bus.stats().await.unwrap().total.scheduled, 2);
    bus.shutdown().await;
}

/// `cancel` deletes what has not started and returns how many, once; `tx.cancel` rolls back
/// with its transaction; a running delivery finishes and its result is recorded.
pub async fn cancel_removes_what_has_not_started<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let gate = Arc::new(Semaphore::new(0));
    let bus = bus(db.pool.clone(), &probe)
        .state(gate.clone())
        .build()
        .await
        .unwrap();

    let id = bus.emit_after(FAR, Reminder { n: 8 }, []).await.unwrap();
    assert_eq!(bus.cancel(id).await.unwrap(), 2);
    assert_eq!(bus.cancel(id).await.unwrap(), 0, "cancelling twice");
    assert_eq!(
        bus.cancel(txbus::EventId::new(i64::MAX)).await.unwrap(),
        0,
        "an unknown id"
    );
    assert!(B::deliveries(&db.pool).await.is_empty());

    let kept = bus.emit_after(FAR, Reminder { n: 9 }, []).await.unwrap();
    let rolled_back: Result<(), Error> = bus
        .transaction(async |tx| {
            assert_eq!(tx.cancel(kept).await?, 2);
            Err(Error::Invalid("the caller gives up".into()))
        })
        .await;
    assert!(rolled_back.is_err());
    assert_eq!(
        B::deliveries(&db.pool).await.len(),
        2,
        "the rollback kept them"
    );
    let cancelled = bus
        .transaction(async |tx| {
            let own = tx.emit_after(FAR, &Reminder { n: 10 }).await?;
            let n = tx.cancel(kept).await? + tx.cancel(own).await?;
            Ok::<_, Error>(n)
        })
        .await
        .unwrap();
    assert_eq!(
        cancelled, 4,
        "two written before, two of the transaction's own event"
    );
    assert!(B::deliveries(&db.pool).await.is_empty());

    let running = bus.emit(Gated { n: 1 }, []).await.unwrap();
    probe
        .wait_until("the gated listener to start", |c| c.len() == 1)
        .await;
    assert_eq!(
        bus.cancel(running).await.unwrap(),
        0,
        "a running delivery stays"
    );
    gate.add_permits(1);
    crate::support::idle(&bus).await;
    crate::support::eventually("the success to be recorded", || async {
        (B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await == 0).then_some(())
    })
    .await;
    assert!(
        probe.calls().iter().all(|c| c.event_id == running),
        "nothing cancelled ran"
    );
    bus.shutdown().await;
}

/// Attempts, the retry and the expiry count from the due time: an expiry shorter than the
/// delay does not kill the event, and its first run is attempt 1.
pub async fn retries_and_expiry_count_from_the_due_time<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let settings: EventSettings = fast_settings()
        .expires_after(Duration::from_secs(2))
        .max_execution_time(Duration::from_secs(1))
        .retry_after(Duration::from_millis(100));
    let bus = bus(db.pool.clone(), &probe)
        .event::<Timeout>(settings)
        .build()
        .await
        .unwrap();
    let delay = Duration::from_secs(3);
    let before = Instant::now();
    let id = bus.emit_after(delay, Timeout { n: 1 }, []).await.unwrap();
    let calls = probe.wait_until("two runs", |c| c.len() == 2).await;
    let attempts: Vec<_> = calls.iter().map(|c| (c.event_id, c.attempt)).collect();
    assert_eq!(attempts, [(id, 1), (id, 2)]);
    assert!(calls[0].started >= not_before(before, delay), "{calls:?}");
    crate::support::idle(&bus).await;
    crate::support::eventually("the delivery to be deleted", || async {
        (B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await == 0).then_some(())
    })
    .await;
    assert_eq!(bus.stats().await.unwrap().total.dead, 0, "nothing expired");
    bus.shutdown().await;
}

/// Scheduled events are rows: a bus that starts after their due time runs them at once. A time
/// in the past means now.
pub async fn scheduled_events_survive_a_restart<B: TestBackend>() {
    let db = B::open().await;
    let first_probe = Probe::new();
    let first = bus(db.pool.clone(), &first_probe)
        .poller(false)
        .build()
        .await
        .unwrap();
    let id = first
        .emit_after(Duration::from_millis(300), Reminder { n: 11 }, [])
        .await
        .unwrap();
    first.shutdown().await;
    tokio::time::sleep(Duration::from_millis(400)).await;

    let probe = Probe::new();
    let second = bus(db.pool.clone(), &probe).build().await.unwrap();
    let past = second
        .emit_at(SystemTime::now() - FAR, Reminder { n: 12 }, [])
        .await
        .unwrap();
    let calls = probe.wait_until("four runs", |c| c.len() == 4).await;
    let mut events: Vec<_> = calls.iter().map(|c| (c.event_id, c.attempt)).collect();
    events.sort();
    assert_eq!(events, [(id, 1), (id, 1), (past, 1), (past, 1)]);
    second.shutdown().await;
}

/// A delay whose due time cannot be stored is refused, and nothing is written.
pub async fn bad_schedules_are_refused<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let bus = bus(db.pool.clone(), &probe).build().await.unwrap();
    let refused = bus.emit_after(Duration::MAX, Reminder { n: 13 }, []).await;
    match refused {
        Err(Error::Invalid(message)) => assert!(message.contains("100 years"), "{message}"),
        other => panic!("expected Error::Invalid, got {other:?}"),
    }
    let far = SystemTime::now() + Duration::from_secs(200 * 365 * 86_400);
    assert!(matches!(
        bus.emit_at(far, Reminder { n: 14 }, []).await,
        Err(Error::Invalid(_))
    ));
    let in_tx: Result<(), Error> = bus
        .transaction(async |tx| {
            tx.emit_after(Duration::MAX, &Reminder { n: 15 }).await?;
            Ok(())
        })
        .await;
    assert!(matches!(in_tx, Err(Error::Invalid(_))), "{in_tx:?}");
    assert!(B::deliveries(&db.pool).await.is_empty());
    assert!(probe.calls().is_empty());
    bus.shutdown().await;
}

/// A scheduled event that fell due waits from its due time, not from its emit: its
/// `oldest_pending_age` leaves out the delay. (No poller here: it stays due.)
pub async fn a_due_scheduled_event_waits_from_its_due_time<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let bus = bus(db.pool.clone(), &probe)
        .poller(false)
        .build()
        .await
        .unwrap();
    let delay = Duration::from_secs(1);
    let before = Instant::now();
    bus.emit_after(delay, Reminder { n: 16 }, []).await.unwrap();
    tokio::time::sleep(delay + Duration::from_millis(200)).await;
    let stats = bus.stats().await.unwrap();
    let since_emit = before.elapsed();
    assert_eq!(
        (stats.total.due, stats.total.scheduled),
        (2, 0),
        "{stats:?}"
    );
    let age = stats.total.oldest_pending_age.unwrap();
    // Counted from the emit, the age would be about `since_emit`; from the due time it is the
    // delay less. Half the delay of slack covers the clocks' skew and SQLite's milliseconds.
    assert!(
        age + delay / 2 <= since_emit,
        "age {age:?}, {since_emit:?} since the emit"
    );
    bus.shutdown().await;
}
