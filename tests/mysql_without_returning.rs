//! MySQL 8 has no `RETURNING`: there, event ids come one at a time, by an insert and
//! `SELECT LAST_INSERT_ID()`. This process takes them that way on whatever server the tests use
//! (MariaDB too), and shows that emits, keyed emits and transactions of many emits behave as with
//! `RETURNING`: each event delivered once, ids increasing in emit order.
#![cfg(all(feature = "mysql", feature = "testing"))]
#![allow(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[path = "support/mod.rs"]
mod support;

use serde::{Deserialize, Serialize};
use txbus::{Context, EventBus, EventId, ListenerError};

use support::{Probe, TestBackend};

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "no_returning.placed")]
struct Placed {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "no_returning.keyed", ordering_key = account)]
struct Keyed {
    account: String,
    n: u32,
}

#[txbus::listener]
async fn placed(event: Placed, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<std::sync::Arc<Probe>>()?
        .record(&ctx, event.n.to_string());
    Ok(())
}

#[txbus::listener]
async fn keyed(event: Keyed, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<std::sync::Arc<Probe>>()?
        .record(&ctx, format!("{} {}", event.account, event.n));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_without_returning() {
    txbus::testing::mysql_ids_without_returning();
    let db = txbus::Mysql::open().await;
    let probe = Probe::new();
    let bus = EventBus::builder(db.pool.clone())
        .state(probe.clone())
        .build()
        .await
        .unwrap();

    let alone = bus.emit(Placed { n: 0 }, []).await.unwrap();
    let ids: Vec<EventId> = bus
        .transaction(async |tx| {
            let mut ids = Vec::new();
            for n in 1..=40 {
                ids.push(tx.emit(&Placed { n }).await?);
            }
            Ok::<_, txbus::Error>(ids)
        })
        .await
        .unwrap();
    let mut keyed_ids = Vec::new();
    for n in 0..5 {
        let account = "a".to_string();
        keyed_ids.push(bus.emit(Keyed { account, n }, []).await.unwrap());
    }

    assert!(
        std::iter::once(alone)
            .chain(ids.iter().copied())
            .collect::<Vec<_>>()
            .windows(2)
            .all(|w| w[0] < w[1]),
        "ids increase in emit order: {alone} then {ids:?}"
    );
    probe
        .wait_until("every delivery", |calls| calls.len() >= 46)
        .await;
    support::idle(&bus).await;
    let mut placed: Vec<(EventId, String)> = probe
        .calls_of("placed")
        .into_iter()
        .map(|c| (c.event_id, c.note))
        .collect();
    placed.sort();
    let expected: Vec<(EventId, String)> = std::iter::once(alone)
        .chain(ids)
        .zip(0..)
        .map(|(id, n)| (id, n.to_string()))
        .collect();
    assert_eq!(
        placed, expected,
        "each event once, under the id its emit returned"
    );
    let keyed: Vec<(EventId, String)> = probe
        .calls_of("keyed")
        .into_iter()
        .map(|c| (c.event_id, c.note))
        .collect();
    let expected: Vec<(EventId, String)> = keyed_ids
        .into_iter()
        .zip(0..)
        .map(|(id, n)| (id, format!("a {n}")))
        .collect();
    assert_eq!(keyed, expected, "the key's events once each, in emit order");
    bus.shutdown().await;
}
