//! E3: fan-out of one event with a large payload to five listeners.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use diesel_async::AsyncConnection;
use txbus::{Entity, EventBus, persist};

use super::backends::BenchBackend;
use super::scenarios::{create_users, fan_out, next_user, pool_for, settle};
use super::{Args, BenchPayload, BenchUser, FannedOut, Recorder, Row};
use crate::support::backends::exec;

/// The payloads of E3's events: 4 KiB, and for comparison the other scenarios' size.
const PAYLOADS: [usize; 2] = [4096, 256];

/// `len` random letters and digits: a payload the databases cannot compress away.
fn noise(len: usize) -> String {
    std::iter::repeat_with(fastrand::alphanumeric)
        .take(len)
        .collect()
}

/// How many listeners each event has.
const LISTENERS: u64 = 5;

/// E3: `emit` of an event with five listeners and a 4 KiB payload (and a 256 B one, to tell the
/// payload's copies from the fan-out), with a `persist`, from the highest concurrency, until all
/// five ran; baseline: the same entity write plus one row holding the payload, in a plain
/// transaction.
pub async fn e3<B: BenchBackend>(args: &Args) -> Vec<Row>
where
    BenchUser: Entity<B>,
    BenchPayload: Entity<B>,
{
    let clients = args.concurrency.iter().copied().max().unwrap_or(1);
    let db = B::open().await;
    let pool = pool_for::<B>(&db.url, clients + 8).await;
    create_users(&pool).await;
    exec(
        &pool,
        "CREATE TABLE bench_payloads (id BIGINT PRIMARY KEY, body TEXT NOT NULL)",
    )
    .await;
    let recorder = Arc::new(Recorder::default());
    let bus = EventBus::builder(pool.clone())
        .state(recorder.clone())
        .build()
        .await
        .unwrap();
    let mut rows = Vec::new();
    for payload in PAYLOADS {
        let mut row = Row {
            backend: B::NAME,
            scenario: "E3 fan-out",
            case: format!("{LISTENERS} listeners, {payload} B payload, {clients} emitters"),
            unit: "events/s",
            txbus: Vec::new(),
            baseline: Vec::new(),
            baseline_name: "entity + one payload row, plain tx",
            lower_is_better: false,
        };
        let n = args.events;
        for round in 0..args.rounds {
            for bus_first in [round % 2 == 1, round % 2 == 0] {
                let started = Instant::now();
                if bus_first {
                    let target = recorder.runs.load(Ordering::Relaxed) + n as u64 * LISTENERS;
                    fan_out(clients, n, |count| {
                        let bus = bus.clone();
                        async move {
                            for _ in 0..count {
                                let (user, _) = next_user(0);
                                let event = FannedOut {
                                    id: user.id,
                                    padding: noise(payload),
                                };
                                bus.emit(event, [persist(&user)]).await.unwrap();
                            }
                        }
                    })
                    .await;
                    settle(&bus, &recorder, target).await;
                    row.txbus.push(n as f64 / started.elapsed().as_secs_f64());
                } else {
                    fan_out(clients, n, |count| {
                        let pool = pool.clone();
                        async move {
                            for _ in 0..count {
                                let (user, _) = next_user(0);
                                let body = BenchPayload {
                                    id: user.id,
                                    body: noise(payload),
                                };
                                let mut conn = pool.get().await.unwrap();
                                conn.transaction(async |c| {
                                    <BenchUser as Entity<B>>::persist(&user, c).await?;
                                    <BenchPayload as Entity<B>>::persist(&body, c).await
                                })
                                .await
                                .unwrap();
                            }
                        }
                    })
                    .await;
                    row.baseline
                        .push(n as f64 / started.elapsed().as_secs_f64());
                }
            }
        }
        rows.push(row);
    }
    bus.shutdown().await;
    rows
}
