//! Scenario 2: the database goes away. A TCP proxy between the bus and PostgreSQL drops every
//! connection and refuses new ones for three seconds, while emits, dispatch and polls go on.
//! Emits in the outage fail with an error, quickly; afterwards the same bus, without a restart,
//! delivers every event that was committed.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use txbus::{Context, EventBus, EventSettings, ListenerError, Pool, Postgres, persist};

use crate::support::backends::exec;
use crate::support::proxy::{Proxy, authority, through};
use crate::support::{Probe, TestBackend, eventually};
use crate::{Order, scale};

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "fault.outage.order")]
struct OutageOrder {
    id: i64,
}

#[txbus::listener(name = "fault.outage.ship")]
async fn ship(event: OutageOrder, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<Arc<Probe>>()?
        .record(&ctx, event.id.to_string());
    Ok(())
}

pub async fn database_outage() {
    let orders = 1500 * scale();
    let db = Postgres::open().await;
    exec(
        &db.pool,
        "CREATE TABLE fault_orders (id BIGINT PRIMARY KEY, note VARCHAR(255) NOT NULL)",
    )
    .await;
    txbus::migrate(&db.pool).await.unwrap();
    let proxy = Proxy::start(authority(&db.url).to_string()).await;
    let pool = Pool::<Postgres>::builder(through(&db.url, proxy.address))
        .max_size(8)
        .connect_timeout(Duration::from_secs(1))
        .acquire_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    let probe = Probe::new();
    let bus = EventBus::builder(pool)
        .state(probe.clone())
        .event::<OutageOrder>(
            EventSettings::default()
                .max_execution_time(Duration::from_secs(2))
                .retry_after(Duration::from_millis(100)),
        )
        .retry_every(Duration::from_millis(50))
        .build()
        .await
        .unwrap();

    let emitter = tokio::spawn({
        let bus = bus.clone();
        async move {
            let (mut ok, mut failed, mut slowest) = (0, 0, Duration::ZERO);
            for id in 0..orders as i64 {
                let order = Order {
                    id,
                    note: "outage".into(),
                };
                let started = Instant::now();
                let result = tokio::time::timeout(
                    Duration::from_secs(10),
                    bus.emit(OutageOrder { id }, [persist(&order)]),
                )
                .await
                .expect("an emit hung past 10 s");
                slowest = slowest.max(started.elapsed());
                match result {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (ok, failed, slowest)
        }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.restore();
    let (ok, failed, slowest) = emitter.await.unwrap();
    eprintln!("[postgres] outage: {ok} emits committed, {failed} failed, slowest {slowest:?}");
    assert!(failed > 0, "the outage did not hit any emit");
    assert!(ok > 0);

    // Everything committed is delivered, by the same bus, after the outage: the orders in the
    // database are the truth (an emit that failed while its COMMIT was in flight may still have
    // committed).
    eventually("every committed order to be delivered", || async {
        let left = Postgres::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await;
        (left == 0).then_some(())
    })
    .await;
    crate::support::idle(&bus).await;
    let committed: HashSet<String> = {
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;
        let mut conn = db.pool.get().await.unwrap();
        let ids: Vec<i64> = crate::fault_orders::table
            .select(crate::fault_orders::id)
            .load(&mut *conn)
            .await
            .unwrap();
        ids.into_iter().map(|id| id.to_string()).collect()
    };
    let delivered: HashSet<String> = probe.calls().into_iter().map(|c| c.note).collect();
    assert!(
        committed.len() >= ok,
        "every successful emit committed its order"
    );
    assert_eq!(
        delivered, committed,
        "every committed order was delivered, and nothing else"
    );
    bus.shutdown().await;
}
