//! On MySQL and MariaDB a keyed emit locks a row of `txbus_key_locks` before it takes its event
//! id. The rows are per bucket of keys (the low 16 bits of the key's CRC-32), not per key, so the
//! table stays bounded however many keys a service uses: two keys of one bucket share a row, and
//! the events of each still reach their listener once each and in emit order.
#![cfg(feature = "mysql")]
#![allow(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use txbus::{Context, EventBus, EventId, ListenerError};

use support::{Probe, TestBackend};

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "key_buckets.posted", ordering_key = account)]
struct Posted {
    account: String,
    n: u32,
}

#[txbus::listener]
async fn post(event: Posted, ctx: Context) -> Result<(), ListenerError> {
    ctx.state::<std::sync::Arc<Probe>>()?
        .record(&ctx, format!("{} {}", event.account, event.n));
    Ok(())
}

fn bucket(key: &str) -> u32 {
    crc32fast::hash(key.as_bytes()) & 0xFFFF
}

/// Two different keys of one bucket, and a key of another bucket.
fn keys() -> (String, String, String) {
    let mut seen = HashMap::new();
    for n in 0.. {
        let key = format!("account-{n}");
        if let Some(first) = seen.insert(bucket(&key), key.clone()) {
            let other = (0..)
                .map(|m| format!("other-{m}"))
                .find(|k| bucket(k) != bucket(&key))
                .unwrap();
            return (first, key, other);
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_one_bucket_share_a_lock_row() {
    let (a, b, c) = keys();
    let db = txbus::Mysql::open().await;
    let probe = Probe::new();
    let bus = EventBus::builder(db.pool.clone())
        .state(probe.clone())
        .build()
        .await
        .unwrap();

    // Alone and in one transaction, where the second key's lock is the row the first took.
    let mut emitted: Vec<(EventId, String)> = Vec::new();
    for (n, account) in [&a, &b, &c, &a, &b].into_iter().enumerate() {
        let n = n as u32;
        let id = bus
            .emit(
                Posted {
                    account: account.clone(),
                    n,
                },
                [],
            )
            .await
            .unwrap();
        emitted.push((id, format!("{account} {n}")));
    }
    let ids = bus
        .transaction(async |tx| {
            let first = tx
                .emit(&Posted {
                    account: a.clone(),
                    n: 5,
                })
                .await?;
            let second = tx
                .emit(&Posted {
                    account: b.clone(),
                    n: 6,
                })
                .await?;
            Ok::<_, txbus::Error>([first, second])
        })
        .await
        .unwrap();
    emitted.push((ids[0], format!("{a} 5")));
    emitted.push((ids[1], format!("{b} 6")));

    probe
        .wait_until("every delivery", |calls| calls.len() >= emitted.len())
        .await;
    support::idle(&bus).await;
    let mut ran: Vec<(EventId, String)> = probe
        .calls_of("post")
        .into_iter()
        .map(|call| (call.event_id, call.note))
        .collect();
    for key in [&a, &b, &c] {
        let of_key = |list: &[(EventId, String)]| -> Vec<(EventId, String)> {
            list.iter()
                .filter(|(_, note)| note.starts_with(&format!("{key} ")))
                .cloned()
                .collect()
        };
        assert_eq!(
            of_key(&ran),
            of_key(&emitted),
            "the events of {key} once each, in emit order"
        );
    }
    ran.sort();
    emitted.sort();
    assert_eq!(ran, emitted, "every event once");

    let rows = txbus::Mysql::count(&db.pool, "SELECT COUNT(*) AS n FROM txbus_key_locks").await;
    assert_eq!(
        rows,
        2,
        "{a} and {b} share bucket {}, {c} has bucket {}: a lock row each",
        bucket(&a),
        bucket(&c)
    );
    bus.shutdown().await;
}
