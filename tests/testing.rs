//! The test kit (feature `testing`) on every backend: `run_due` runs what is due and what it
//! emits, `emitted` lists what committed, `advance` moves one bus's clock past due times, leases
//! and expiry, and the simulated crashes bring deliveries back after their lease, as the next
//! attempt: a non-idempotent listener charges twice, an idempotent one once.
#![cfg(all(
    feature = "testing",
    feature = "postgres",
    feature = "mysql",
    feature = "sqlite"
))]
#![allow(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[path = "support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use txbus::testing::{CrashPoint, RunReport};
use txbus::{Context, EventBus, EventId, EventSettings, ListenerError};

use support::{TestBackend, eventually};

/// The lease of a run: what a simulated crash left leased is due again this much later, by the
/// bus's clock, which the tests move.
const LEASE: Duration = Duration::from_secs(30);

fn settings() -> EventSettings {
    EventSettings::default().max_execution_time(LEASE)
}

/// A margin for "not due yet": a run of a loaded machine takes well under it.
const MARGIN: Duration = Duration::from_secs(10);

/// Emits a `Shipped` for an order, through the bus under test (set once it is built).
type Ship = Arc<OnceLock<Box<dyn Fn(i64) -> BoxFuture<'static, ()> + Send + Sync>>>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, txbus::Event)]
#[event(name = "kit.order_placed")]
struct OrderPlaced {
    id: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, txbus::Event)]
#[event(name = "kit.order_shipped")]
struct OrderShipped {
    id: i64,
}

/// What the listeners did.
#[derive(Default)]
struct Ledger {
    shipped: Mutex<Vec<i64>>,
    charges: AtomicU64,
    charged_once: Mutex<HashSet<EventId>>,
    attempts: Mutex<Vec<u32>>,
    reminded: Mutex<Vec<u32>>,
}

#[txbus::listener(name = "kit.ship")]
async fn ship(order: OrderPlaced, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Ledger>>()?
        .attempts
        .lock()
        .unwrap()
        .push(ctx.attempt());
    let emit = ctx.state::<Ship>()?.get().ok_or("no bus yet")?;
    emit(order.id).await;
    Ok(())
}

#[txbus::listener(name = "kit.record_shipment")]
async fn record_shipment(shipped: OrderShipped, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Ledger>>()?
        .shipped
        .lock()
        .unwrap()
        .push(shipped.id);
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "kit.payment")]
struct Payment {
    cents: i64,
}

/// Charges on every run: a lost success charges twice.
#[txbus::listener(name = "kit.charge")]
async fn charge(_payment: Payment, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Ledger>>()?
        .charges
        .fetch_add(1, Ordering::SeqCst);
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "kit.idempotent_payment")]
struct IdempotentPayment {
    cents: i64,
}

/// Charges once per event, whatever the runs.
#[txbus::listener(name = "kit.charge_once")]
async fn charge_once(_payment: IdempotentPayment, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Ledger>>()?
        .charged_once
        .lock()
        .unwrap()
        .insert(ctx.event_id());
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "kit.reminder")]
struct Reminder {
    user: i64,
}

/// Fails its first attempt and asks to be retried in ten minutes.
#[txbus::listener(name = "kit.remind")]
async fn remind(_reminder: Reminder, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Ledger>>()?
        .reminded
        .lock()
        .unwrap()
        .push(ctx.attempt());
    if ctx.attempt() == 1 {
        return Err(ListenerError::retry_after(TEN_MINUTES, "not now"));
    }
    Ok(())
}

const TEN_MINUTES: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "kit.doomed")]
struct Doomed {
    n: i64,
}

/// Never succeeds.
#[txbus::listener(name = "kit.doom")]
async fn doom(_doomed: Doomed) -> Result<(), ListenerError> {
    Err("the provider is down".into())
}

/// A bus with its poller off, whose `kit.ship` listener emits through it.
async fn kit<B: TestBackend>(db: &support::TestDb<B>) -> (EventBus<B>, Arc<Ledger>) {
    let ledger = Arc::new(Ledger::default());
    let ship: Ship = Arc::default();
    let bus = EventBus::builder(db.another_pool().await)
        .state(ledger.clone())
        .state(ship.clone())
        .default_settings(settings())
        .poller(false)
        .build()
        .await
        .unwrap();
    let emitter = bus.clone();
    let _ = ship.set(Box::new(move |id| {
        let bus = emitter.clone();
        Box::pin(async move {
            bus.emit(OrderShipped { id }, []).await.unwrap();
        })
    }));
    (bus, ledger)
}

/// Moves the bus's clock past the lease of a run, and runs what is due.
async fn after_the_lease<B: txbus::Backend>(bus: &EventBus<B>) -> RunReport {
    bus.advance(LEASE);
    bus.run_due().await.unwrap()
}

async fn emitted_lists_what_committed<B: TestBackend>() {
    let db = B::open().await;
    let (bus, _) = kit(&db).await;
    let first = bus.emit(Payment { cents: 1 }, []).await.unwrap();
    let (second, _) = bus
        .transaction(async |tx| {
            let a = tx.emit(&Payment { cents: 2 }).await?;
            let b = tx.emit(&IdempotentPayment { cents: 3 }).await?;
            Ok::<_, txbus::Error>((a, b))
        })
        .await
        .unwrap();
    let rolled_back = bus
        .transaction(async |tx| {
            tx.emit(&Payment { cents: 4 }).await?;
            Err::<(), _>(txbus::Error::Invalid("rolled back".into()))
        })
        .await;
    assert!(rolled_back.is_err());
    let payments: Vec<(EventId, i64)> = bus
        .emitted::<Payment>()
        .into_iter()
        .map(|(id, p)| (id, p.cents))
        .collect();
    assert_eq!(payments, [(first, 1), (second, 2)]);
    assert_eq!(
        bus.emitted_names(),
        ["kit.payment", "kit.payment", "kit.idempotent_payment"]
    );
    assert!(bus.emitted::<OrderPlaced>().is_empty());
    bus.shutdown().await;

    // A bus with its poller (a service's, not a test's) keeps no record.
    let service = EventBus::builder(db.another_pool().await)
        .state(Arc::new(Ledger::default()))
        .state(Ship::default())
        .build()
        .await
        .unwrap();
    service.emit(Payment { cents: 5 }, []).await.unwrap();
    assert!(service.emitted::<Payment>().is_empty());
    assert!(service.emitted_names().is_empty());
    service.shutdown().await;
}

async fn run_due_runs_what_falls_due_and_what_it_emits<B: TestBackend>() {
    let db = B::open().await;
    let (bus, ledger) = kit(&db).await;
    assert_eq!(bus.run_due().await.unwrap(), RunReport::default());
    // The process "dies" after the commit: nothing runs until the lease ends.
    bus.simulate_crash(CrashPoint::AfterCommit);
    let order = bus.emit(OrderPlaced { id: 7 }, []).await.unwrap();
    assert_eq!(bus.run_due().await.unwrap().ran, 0, "still leased");
    bus.advance(LEASE - MARGIN);
    assert_eq!(bus.run_due().await.unwrap().ran, 0, "still leased");
    assert!(ledger.attempts.lock().unwrap().is_empty());
    bus.advance(MARGIN);

    let report = after_the_lease(&bus).await;
    // The order's listener, and the listener of the event it emitted, in the same call.
    assert_eq!(report.ran, 2, "{report:?}");
    assert_eq!(report.succeeded, 2);
    assert_eq!(*ledger.attempts.lock().unwrap(), [2], "the next attempt");
    assert_eq!(*ledger.shipped.lock().unwrap(), [7]);
    let emitted: Vec<i64> = bus
        .emitted::<OrderPlaced>()
        .iter()
        .map(|(_, o)| o.id)
        .collect();
    assert_eq!(emitted, [7]);
    assert_eq!(bus.emitted::<OrderShipped>().len(), 1);
    assert_eq!(bus.emitted::<OrderPlaced>()[0].0, order);
    // Nothing is left.
    assert_eq!(bus.run_due().await.unwrap(), RunReport::default());
    assert_eq!(bus.stats().await.unwrap().total.pending(), 0);
    bus.shutdown().await;
}

async fn a_lost_success_charges_twice_unless_the_listener_is_idempotent<B: TestBackend>() {
    let db = B::open().await;
    let (bus, ledger) = kit(&db).await;

    // Not idempotent: the run succeeded, its record was lost, it runs again.
    bus.simulate_crash(CrashPoint::AfterListenerSuccess);
    bus.emit(Payment { cents: 500 }, []).await.unwrap();
    eventually("the first charge", || async {
        (ledger.charges.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    let report = after_the_lease(&bus).await;
    assert_eq!((report.ran, report.succeeded), (1, 1));
    assert_eq!(ledger.charges.load(Ordering::SeqCst), 2, "charged twice");

    // Idempotent: the same crash, one charge.
    bus.simulate_crash(CrashPoint::AfterListenerSuccess);
    let payment = bus
        .emit(IdempotentPayment { cents: 500 }, [])
        .await
        .unwrap();
    eventually("the first run", || async {
        (!ledger.charged_once.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    let report = after_the_lease(&bus).await;
    assert_eq!((report.ran, report.succeeded), (1, 1));
    assert_eq!(
        *ledger.charged_once.lock().unwrap(),
        HashSet::from([payment]),
        "charged once"
    );
    assert_eq!(bus.run_due().await.unwrap(), RunReport::default());
    bus.shutdown().await;
}

async fn advance_moves_the_clock_of_this_bus_only<B: TestBackend>() {
    let db = B::open().await;
    let ledger = Arc::new(Ledger::default());
    let pool = db.another_pool().await;
    let hour = Duration::from_secs(3600);
    let bus = EventBus::builder(pool.clone())
        .state(ledger.clone())
        .state(Ship::default())
        .event::<Doomed>(EventSettings::default().expires_after(2 * hour))
        .retain_dead(hour)
        .poller(false)
        .build()
        .await
        .unwrap();
    // A second bus on the same pool: its clock is its own.
    let other = EventBus::builder(pool)
        .state(Arc::new(Ledger::default()))
        .state(Ship::default())
        .poller(false)
        .build()
        .await
        .unwrap();

    // A scheduled event falls due when the clock reaches it.
    let reminder = bus
        .emit_after(hour, Reminder { user: 1 }, [])
        .await
        .unwrap();
    assert_eq!(bus.run_due().await.unwrap(), RunReport::default());
    bus.advance(hour - MARGIN);
    assert_eq!(bus.run_due().await.unwrap().ran, 0, "not due yet");
    assert_eq!(bus.scheduled(10).await.unwrap().len(), 1);
    bus.advance(MARGIN);
    assert!(bus.scheduled(10).await.unwrap().is_empty(), "due");
    assert_eq!(
        other.scheduled(10).await.unwrap()[0].event_id,
        reminder,
        "still ahead for the other bus"
    );
    assert_eq!(other.run_due().await.unwrap(), RunReport::default());
    let report = bus.run_due().await.unwrap();
    assert_eq!((report.ran, report.failed), (1, 1), "{report:?}");

    // Its retry, ten minutes later by the same clock.
    bus.advance(TEN_MINUTES - MARGIN);
    assert_eq!(
        bus.run_due().await.unwrap().ran,
        0,
        "the retry is not due yet"
    );
    bus.advance(MARGIN);
    let report = bus.run_due().await.unwrap();
    assert_eq!((report.ran, report.succeeded), (1, 1), "{report:?}");
    assert_eq!(*ledger.reminded.lock().unwrap(), [1, 2]);

    // Past `expires_after`, a delivery that keeps failing is dead at the next run_due.
    let doomed = bus.emit(Doomed { n: 1 }, []).await.unwrap();
    bus.wait_idle().await;
    assert_eq!(
        bus.run_due().await.unwrap().ran,
        0,
        "the retry is not due yet"
    );
    bus.advance(2 * hour);
    let report = bus.run_due().await.unwrap();
    assert_eq!((report.ran, report.dead), (0, 1), "{report:?}");
    let dead = bus
        .dead_letters(txbus::DeadLetterQuery::new().event(doomed))
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, txbus::DeadReason::Expired);
    assert_eq!(bus.stats().await.unwrap().total.pending(), 0);

    // Retention keeps the dead letter for an hour of the same clock.
    bus.advance(hour - MARGIN);
    assert_eq!(bus.cleanup().await.unwrap(), Some(0));
    bus.advance(MARGIN);
    assert_eq!(bus.cleanup().await.unwrap(), Some(1));
    assert_eq!(bus.stats().await.unwrap().total.dead, 0);
    other.shutdown().await;
    bus.shutdown().await;
}

/// `run_due` on a bus whose poller runs too: whoever claims a delivery, it has run and its
/// result is written when `run_due` returns.
async fn run_due_works_beside_the_poller<B: TestBackend>() {
    let db = B::open().await;
    let ledger = Arc::new(Ledger::default());
    let hour = Duration::from_secs(3600);
    let bus = EventBus::builder(db.another_pool().await)
        .state(ledger.clone())
        .state(Ship::default())
        .retry_every(hour)
        .build()
        .await
        .unwrap();
    for round in 1..=5 {
        bus.emit_after(hour, Payment { cents: round }, [])
            .await
            .unwrap();
        // Wakes the poller, which races run_due for the delivery.
        bus.advance(hour);
        bus.run_due().await.unwrap();
        assert_eq!(ledger.charges.load(Ordering::SeqCst), round as u64);
        assert_eq!(bus.stats().await.unwrap().total.pending(), 0);
    }
    bus.shutdown().await;
}

macro_rules! backend_tests {
    ($($module:ident: $backend:ty),+ $(,)?) => {$(
        mod $module {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn emitted_lists_what_committed() {
                super::emitted_lists_what_committed::<$backend>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn run_due_runs_what_falls_due_and_what_it_emits() {
                super::run_due_runs_what_falls_due_and_what_it_emits::<$backend>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn run_due_works_beside_the_poller() {
                super::run_due_works_beside_the_poller::<$backend>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn advance_moves_the_clock_of_this_bus_only() {
                super::advance_moves_the_clock_of_this_bus_only::<$backend>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_lost_success_charges_twice_unless_the_listener_is_idempotent() {
                super::a_lost_success_charges_twice_unless_the_listener_is_idempotent::<$backend>()
                    .await;
            }
        }
    )+};
}

backend_tests!(
    postgres: txbus::Postgres,
    mysql: txbus::Mysql,
    sqlite: txbus::Sqlite
);
