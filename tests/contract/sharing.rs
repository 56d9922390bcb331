//! Several buses on one database: a shared backlog runs exactly once; first starts race safely.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use txbus::{Context, EventBus, ListenerError};

use crate::support::backends::RowLocks;
use crate::support::{HOUR, Probe, TestBackend, bus};

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "contract.backlog")]
struct Backlog {
    n: u32,
}

#[txbus::listener(name = "contract.backlog_counter")]
async fn backlog_counter(_event: Backlog, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?.record(&ctx, "run");
    Ok(())
}

pub async fn two_buses_drain_a_backlog_exactly_once<B: TestBackend>() {
    const BACKLOG: usize = 2000;
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    let payloads = (0..BACKLOG).map(|n| format!(r#"{{"n":{n}}}"#)).collect();
    let ids = B::insert_backlog(
        &db.pool,
        "contract.backlog",
        payloads,
        "contract.backlog_counter".into(),
        HOUR,
    )
    .await;
    assert_eq!(ids.len(), BACKLOG);

    let probes = [Probe::new(), Probe::new()];
    let mut buses: Vec<EventBus<B>> = Vec::new();
    for probe in &probes {
        let pool = db.another_pool().await;
        buses.push(
            bus(pool, probe)
                .max_events_per_retry(50)
                .build()
                .await
                .unwrap(),
        );
    }
    crate::support::eventually("the backlog to drain", || async {
        let done: usize = probes.iter().map(|p| p.calls().len()).sum();
        (done >= BACKLOG).then_some(())
    })
    .await;
    for bus in &buses {
        crate::support::idle(bus).await;
    }
    crate::support::eventually("the tables to empty", || async {
        (B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await == 0).then_some(())
    })
    .await;
    // Some more polls, to catch a late second run.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let runs: Vec<_> = probes.iter().flat_map(|p| p.calls()).collect();
    let distinct: HashSet<_> = runs.iter().map(|c| c.event_id.get()).collect();
    assert_eq!(runs.len(), BACKLOG, "no delivery ran twice");
    assert_eq!(
        distinct,
        ids.into_iter().collect::<HashSet<_>>(),
        "every delivery ran"
    );
    assert!(runs.iter().all(|c| c.attempt == 1));
    let shares: Vec<_> = probes.iter().map(|p| p.calls().len()).collect();
    eprintln!(
        "[{}] backlog shares between the two buses: {shares:?}",
        B::NAME
    );
    for bus in &buses {
        bus.shutdown().await;
    }
}

pub async fn concurrent_first_starts_migrate_once<B: TestBackend>() {
    let db = B::open().await;
    let mut starts = Vec::new();
    for _ in 0..6 {
        let pool = db.another_pool().await;
        starts.push(tokio::spawn(async move {
            let probe = Probe::new();
            bus(pool, &probe).build().await
        }));
    }
    let mut buses = Vec::new();
    for start in starts {
        buses.push(
            start
                .await
                .unwrap()
                .expect("every concurrent start succeeds"),
        );
    }
    let versions = B::count(&db.pool, "SELECT count(*) AS n FROM txbus_migrations").await;
    assert_eq!(versions, B::MIGRATIONS, "each migration applied once");
    assert!(txbus::migrate(&db.pool).await.unwrap().is_empty());
    for bus in &buses {
        bus.shutdown().await;
    }
}

#[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]
pub async fn claims_skip_rows_locked_by_another_transaction<B: RowLocks>() {
    const BACKLOG: usize = 50;
    const LOCKED: i64 = 10;
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    let payloads = (0..BACKLOG).map(|n| format!(r#"{{"n":{n}}}"#)).collect();
    B::insert_backlog(
        &db.pool,
        "contract.backlog",
        payloads,
        "contract.backlog_counter".into(),
        HOUR,
    )
    .await;

    // Another transaction holds the first rows. A claimer that waited for them would deliver
    // nothing until that transaction ends; one that skips them delivers all the others now.
    let mut holder = B::hold_locks(&db.pool, LOCKED).await;
    let probe = Probe::new();
    let bus = bus(db.another_pool().await, &probe).build().await.unwrap();
    probe
        .wait_until("every unlocked delivery", |c| {
            c.len() == BACKLOG - LOCKED as usize
        })
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        probe.calls().len(),
        BACKLOG - LOCKED as usize,
        "locked rows were left alone"
    );

    diesel_async::SimpleAsyncConnection::batch_execute(&mut *holder, "COMMIT")
        .await
        .unwrap();
    drop(holder);
    probe
        .wait_until("the rest once released", |c| c.len() == BACKLOG)
        .await;
    bus.shutdown().await;
}
