//! A rolling deploy on one PostgreSQL database: the old binary (`rolling_deploy_old`,
//! `rolling.order_placed` at version 1) and this one (version 2, with an upcaster) both emit and
//! both run the listener `rolling.ship`. Every order is shipped exactly once; the version-2
//! payloads only here, since the old binary's claims leave them alone; the version-1 payloads
//! in both, upcast here; nothing dies.
//!
//! This binary has its own `main`; it starts the old binary, which the same `cargo test` builds
//! beside it.
#![cfg(feature = "postgres")]
#![allow(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[path = "rolling/common.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::backends::exec;
use support::process::{arguments, runtime, trial};
use support::{TestBackend, eventually};
use txbus::{Context, ListenerError, Postgres, UpcastError};

/// Version 2: the total in cents.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(name = "rolling.order_placed", version = 2, upcast(1 => cents))]
struct OrderPlaced {
    order_id: i64,
    total_cents: i64,
}

fn cents(mut v1: Value) -> Result<Value, UpcastError> {
    let total = v1["total"]
        .as_i64()
        .ok_or_else(|| UpcastError::new("no integer `total`"))?;
    v1["total_cents"] = json!(total * 100);
    Ok(v1)
}

#[txbus::listener(name = "rolling.ship")]
async fn ship(order: OrderPlaced, ctx: Context) -> Result<(), ListenerError> {
    common::run(&ctx, "new", order.order_id, order.total_cents).await
}

/// The old binary, built by `cargo test` beside this one: the newest of its builds.
fn old_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let builds = std::fs::read_dir(dir).unwrap().filter_map(|entry| {
        let entry = entry.ok()?;
        let name = entry.file_name().into_string().ok()?;
        if !name.starts_with("rolling_deploy_old-") || name.contains('.') {
            return None;
        }
        Some((entry.metadata().ok()?.modified().ok()?, entry.path()))
    });
    builds.max().map(|(_, path)| path).unwrap_or_else(|| {
        panic!(
            "the old binary of this test is not built in {}; build it with \
             `cargo test --features postgres --test rolling_deploy_old --no-run` \
             (a whole `cargo test` builds it too)",
            dir.display()
        )
    })
}

async fn count(pool: &txbus::Pool<Postgres>, sql: &'static str) -> i64 {
    Postgres::count(pool, sql).await
}

async fn a_rolling_deploy_delivers_every_event_once() {
    let db = Postgres::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    exec(&db.pool, common::CREATE_RUNS).await;
    let bus = common::bus(db.another_pool().await).build().await.unwrap();
    let mut old = Command::new(old_binary())
        .arg(&db.url)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(old.stdout.take().unwrap()).lines();
    let ready = tokio::task::spawn_blocking(move || (lines.next(), lines));
    let (first, mut lines) = ready.await.unwrap();
    assert_eq!(first.unwrap().unwrap(), "ready");
    let done = tokio::task::spawn_blocking(move || lines.next());
    // The even orders, at version 2, each due a moment later: claimed by a poller, which in
    // the old binary must leave them alone.
    for n in 0..common::ORDERS {
        let order_id = 2 * n + 2;
        let order = OrderPlaced {
            order_id,
            total_cents: order_id * 100,
        };
        bus.emit_after(Duration::from_millis(200), order, [])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(done.await.unwrap().unwrap().unwrap(), "done");
    assert!(old.wait().unwrap().success(), "the old binary failed");

    let orders = 2 * common::ORDERS;
    eventually("every order shipped", || async {
        (count(&db.pool, "SELECT count(*) AS n FROM rolling_runs WHERE ok").await == orders)
            .then_some(())
    })
    .await;
    support::idle(&bus).await;
    let stats = bus.stats().await.unwrap();
    assert_eq!(
        (stats.total.pending(), stats.total.dead),
        (0, 0),
        "{stats:?}"
    );
    let shipped_once = count(
        &db.pool,
        "SELECT count(*) AS n FROM (SELECT order_id FROM rolling_runs WHERE ok
         GROUP BY order_id HAVING count(*) = 1) once",
    )
    .await;
    assert_eq!(shipped_once, orders, "each order shipped exactly once");
    // Version 2 ran only here.
    let v2_elsewhere = count(
        &db.pool,
        "SELECT count(*) AS n FROM rolling_runs WHERE order_id % 2 = 0 AND binary_name <> 'new'",
    )
    .await;
    assert_eq!(v2_elsewhere, 0);
    // ...and was never charged an attempt elsewhere: the only failures are the listener's own.
    let v2_charged = count(
        &db.pool,
        "SELECT count(*) AS n FROM rolling_runs WHERE order_id % 2 = 0
         AND attempt <> CASE WHEN ok AND order_id % 3 = 0 THEN 2 ELSE 1 END",
    )
    .await;
    assert_eq!(v2_charged, 0);
    // Version 1 ran in both: first in the old binary, and the retries it left, upcast, here.
    let v1_old = count(
        &db.pool,
        "SELECT count(*) AS n FROM rolling_runs
         WHERE order_id % 2 = 1 AND binary_name = 'old' AND attempt = 1",
    )
    .await;
    assert_eq!(v1_old, common::ORDERS);
    let v1_retried_here = count(
        &db.pool,
        "SELECT count(*) AS n FROM rolling_runs
         WHERE order_id % 2 = 1 AND order_id % 3 = 0 AND binary_name = 'new' AND attempt = 2 AND ok",
    )
    .await;
    assert_eq!(v1_retried_here, common::ORDERS / 3);
    // Every run read the total in cents, whichever version wrote it.
    let wrong_totals = count(
        &db.pool,
        "SELECT count(*) AS n FROM rolling_runs WHERE total_cents <> order_id * 100",
    )
    .await;
    assert_eq!(wrong_totals, 0);
    bus.shutdown().await;
}

fn main() -> ExitCode {
    let trials = vec![trial(
        "postgres::a_rolling_deploy_delivers_every_event_once",
        || {
            runtime().block_on(a_rolling_deploy_delivers_every_event_once());
        },
    )];
    libtest_mimic::run(&arguments(), trials).exit()
}
