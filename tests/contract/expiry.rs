//! Giving up: expiry, max_attempts and abort end in dead letters, and only for that listener.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use txbus::{Context, ListenerError};

use crate::support::{
    DeliveryRow, HOUR, Probe, TestBackend, TestDb, bus, eventually, fast_settings,
};

async fn dead_letter<B: TestBackend>(db: &TestDb<B>) -> DeliveryRow {
    eventually("a dead letter", || async {
        B::deliveries(&db.pool)
            .await
            .into_iter()
            .find(|d| d.dead_reason.is_some())
    })
    .await
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.expiring")]
struct Expiring {
    n: u32,
}

#[txbus::listener]
async fn never_succeeds(_event: Expiring, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, "run");
    Err("the downstream service is down".into())
}

#[txbus::listener]
async fn succeeds_beside_expiring(_event: Expiring, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, "run");
    Ok(())
}

pub async fn deliveries_expire_into_dead_letters<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    // Retried 100 ms after the first failure, then 100 s after the second: the delivery waits
    // for its third attempt while the test moves its clock.
    let settings = fast_settings()
        .expires_after(HOUR)
        .retry_after(Duration::from_millis(100))
        .backoff_factor(1000.0);
    let bus = bus(db.pool.clone(), &probe)
        .event::<Expiring>(settings)
        .build()
        .await
        .unwrap();
    let id = bus.emit(Expiring { n: 1 }, []).await.unwrap();

    // Failed twice and waiting for its retry (not leased), still alive.
    eventually("the second failure to be recorded", || async {
        let waiting = B::count(
            &db.pool,
            "SELECT count(*) AS n FROM txbus_deliveries \
             WHERE attempts = 2 AND leased_at IS NULL AND dead_at IS NULL",
        )
        .await;
        (waiting == 1).then_some(())
    })
    .await;
    assert_eq!(probe.calls_of("never_succeeds").len(), 2);
    // An hour earlier, its expiry (an hour after its emit) has passed, and its retry is due.
    B::an_hour_before(&db.pool, id.get()).await;

    let dead = dead_letter(&db).await;
    crate::support::idle(&bus).await;
    assert_eq!(
        probe.calls_of("never_succeeds").len(),
        2,
        "retried until it expired, and not run once expired"
    );
    assert_eq!(dead.event_id, id.get());
    assert!(dead.listener.ends_with("never_succeeds"));
    assert_eq!(dead.dead_reason.as_deref(), Some("expired"));
    assert_eq!(dead.attempts, 2);
    assert_eq!(
        dead.last_error.as_deref(),
        Some("the downstream service is down")
    );
    // Only the dead letter is left; the other listener's delivery succeeded once.
    assert_eq!(B::deliveries(&db.pool).await.len(), 1);
    assert_eq!(probe.calls_of("succeeds_beside_expiring").len(), 1);

    // The poller goes on (it claims a delivery written after the death); it never runs the
    // dead delivery again.
    let later = B::insert_backlog(
        &db.pool,
        "contract.expiring",
        vec![r#"{"n":2}"#.into()],
        format!("{}::succeeds_beside_expiring", module_path!()),
        HOUR,
    )
    .await;
    probe
        .wait_until("a poll after the death", |c| {
            c.iter().any(|c| c.event_id.get() == later[0])
        })
        .await;
    crate::support::idle(&bus).await;
    assert_eq!(probe.calls_of("never_succeeds").len(), 2);
    eventually("the later delivery to be deleted", || async {
        (B::deliveries(&db.pool).await.len() == 1).then_some(())
    })
    .await;
    let kept = B::count(
        &db.pool,
        "SELECT count(*) AS n FROM txbus_deliveries WHERE event_name = 'contract.expiring'",
    )
    .await;
    assert_eq!(kept, 1, "the dead letter keeps its event");
    bus.shutdown().await;
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.limited")]
struct Limited {
    n: u32,
}

#[txbus::listener]
async fn fails_every_time(_event: Limited, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, "run");
    Err(std::io::Error::other(format!("failure {}", ctx.attempt())).into())
}

#[txbus::listener]
async fn succeeds_beside_limited(_event: Limited, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, "run");
    Ok(())
}

pub async fn max_attempts_ends_in_a_dead_letter<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let settings = fast_settings()
        .retry_after(Duration::from_millis(50))
        .max_attempts(3);
    let bus = bus(db.pool.clone(), &probe)
        .event::<Limited>(settings)
        .build()
        .await
        .unwrap();
    bus.emit(Limited { n: 1 }, []).await.unwrap();

    let dead = dead_letter(&db).await;
    crate::support::idle(&bus).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let attempts: Vec<_> = probe
        .calls_of("fails_every_time")
        .iter()
        .map(|c| c.attempt)
        .collect();
    assert_eq!(attempts, [1, 2, 3]);
    assert_eq!(dead.dead_reason.as_deref(), Some("max_attempts"));
    assert_eq!(dead.attempts, 3);
    assert_eq!(dead.last_error.as_deref(), Some("failure 3"));
    assert_eq!(probe.calls_of("succeeds_beside_limited").len(), 1);
    assert_eq!(B::deliveries(&db.pool).await.len(), 1);
    bus.shutdown().await;
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.rejected")]
struct Rejected {
    n: u32,
}

#[txbus::listener]
async fn aborts(event: Rejected, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, "run");
    Err(ListenerError::abort(format!(
        "order {} cannot be shipped",
        event.n
    )))
}

#[txbus::listener]
async fn succeeds_beside_abort(_event: Rejected, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, "run");
    Ok(())
}

pub async fn abort_ends_in_a_dead_letter_at_once<B: TestBackend>() {
    let db = B::open().await;
    let probe = Probe::new();
    let settings = fast_settings().retry_after(Duration::from_millis(20));
    let bus = bus(db.pool.clone(), &probe)
        .event::<Rejected>(settings)
        .build()
        .await
        .unwrap();
    bus.emit(Rejected { n: 7 }, []).await.unwrap();

    let dead = dead_letter(&db).await;
    crate::support::idle(&bus).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(probe.calls_of("aborts").len(), 1);
    assert_eq!(dead.dead_reason.as_deref(), Some("aborted"));
    assert_eq!(dead.attempts, 1);
    assert_eq!(
        dead.last_error.as_deref(),
        Some("order 7 cannot be shipped")
    );
    assert_eq!(probe.calls_of("succeeds_beside_abort").len(), 1);
    bus.shutdown().await;
}

pub async fn unknown_listeners_wait_and_expire_as_no_listener<B: TestBackend>() {
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    // Two deliveries for a listener no process has, expiring in half an hour; the second is
    // moved an hour back, so that it expired half an hour ago.
    let backlog = |n: u32| {
        B::insert_backlog(
            &db.pool,
            "contract.expiring",
            vec![format!(r#"{{"n":{n}}}"#)],
            "contract.removed_listener".into(),
            HOUR / 2,
        )
    };
    let waiting = backlog(1).await[0];
    let expired = backlog(2).await[0];
    B::an_hour_before(&db.pool, expired).await;
    let probe = Probe::new();
    let bus = bus(db.pool.clone(), &probe).build().await.unwrap();

    // This process does not have the listener: the sweep that makes the expired one dead...
    let dead = dead_letter(&db).await;
    assert_eq!(dead.event_id, expired);
    // ...leaves the other alone...
    let rows = B::deliveries(&db.pool).await;
    let alive = rows.iter().find(|r| r.event_id == waiting).unwrap();
    assert_eq!((alive.attempts, alive.dead_reason.as_deref()), (0, None));

    // ...until it expires too, as a dead letter that says why.
    B::an_hour_before(&db.pool, waiting).await;
    let dead = eventually("the second dead letter", || async {
        B::deliveries(&db.pool)
            .await
            .into_iter()
            .find(|d| d.event_id == waiting && d.dead_reason.is_some())
    })
    .await;
    assert_eq!(dead.dead_reason.as_deref(), Some("no_listener"));
    assert_eq!(dead.attempts, 0);
    assert_eq!(
        dead.last_error.as_deref(),
        Some("no running instance has listener contract.removed_listener")
    );
    assert!(probe.calls().is_empty());
    bus.shutdown().await;
}
