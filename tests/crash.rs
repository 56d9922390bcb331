//! Crash recovery, with real processes: a child process emits events and aborts (SIGABRT) in
//! the middle of running their listeners, after one listener's success was recorded. Then this
//! process starts a bus with the poller: once the child's leases have passed, it runs every
//! delivery the child had not finished, exactly once, and none that had succeeded.
//!
//! This test binary has its own `main` (the child is this same binary, started with
//! `TXBUS_CRASH_CHILD` set); it runs the scenario on every backend txbus was built with, as one
//! test each (`<backend>::crash_recovery`).
#![allow(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[path = "support/mod.rs"]
mod support;

use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use support::backends::exec;
use support::process::{arguments, on_every_backend, runtime};
use support::{PATIENCE, TestBackend, eventually};
use txbus::{Context, EventBus, EventSettings, ListenerError, Pool};

/// How long the child's deliveries stay leased to it.
const LEASE: Duration = Duration::from_secs(2);
const EVENTS: u32 = 5;

#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "crash.order_placed")]
struct OrderPlaced {
    n: u32,
}

/// Which process a listener runs in, and where it writes down its runs.
struct Role {
    child: bool,
    record: Arc<dyn Fn(String) -> txbus::BoxFuture<'static, ()> + Send + Sync>,
    /// Resolves once the quick listener's successes are all recorded (child only).
    quick_done: Arc<dyn Fn() -> txbus::BoxFuture<'static, ()> + Send + Sync>,
}

#[txbus::listener(name = "crash.quick")]
async fn quick(event: OrderPlaced, ctx: Context) -> Result<(), ListenerError> {
    let role = ctx.state::<Role>()?;
    (role.record)(format!(
        "INSERT INTO crash_runs VALUES ('quick', {}, {}, {})",
        event.n,
        role.child,
        ctx.attempt()
    ))
    .await;
    Ok(())
}

#[txbus::listener(name = "crash.dies")]
async fn dies(event: OrderPlaced, ctx: Context) -> Result<(), ListenerError> {
    let role = ctx.state::<Role>()?;
    (role.record)(format!(
        "INSERT INTO crash_runs VALUES ('dies', {}, {}, {})",
        event.n,
        role.child,
        ctx.attempt()
    ))
    .await;
    if role.child && event.n == EVENTS {
        // Die only once the other listener's results are durable, so the parent can tell
        // "succeeded before the crash" from "never finished".
        (role.quick_done)().await;
        std::process::abort();
    }
    if role.child {
        // Stay running (leased) until the crash.
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    Ok(())
}

fn role<B: TestBackend>(pool: &Pool<B>, child: bool) -> Role {
    let for_record = pool.clone();
    let for_done = pool.clone();
    Role {
        child,
        record: Arc::new(move |sql| {
            let pool = for_record.clone();
            Box::pin(async move { exec(&pool, &sql).await })
        }),
        quick_done: Arc::new(move || {
            let pool = for_done.clone();
            Box::pin(async move {
                eventually("the quick results to be recorded", || async {
                    let left = B::count(
                        &pool,
                        "SELECT count(*) AS n FROM txbus_deliveries WHERE listener = 'crash.quick'",
                    )
                    .await;
                    (left == 0).then_some(())
                })
                .await;
            })
        }),
    }
}

fn settings() -> EventSettings {
    EventSettings::default()
        .max_execution_time(LEASE)
        .retry_after(Duration::from_millis(100))
}

/// The child: emit the events, let the listeners run, die in the last one.
async fn child<B: TestBackend>(url: String) {
    let pool = Pool::<B>::connect(&url).await.unwrap();
    let bus = EventBus::builder(pool.clone())
        .state(role(&pool, true))
        .event::<OrderPlaced>(settings())
        .poller(false)
        .build()
        .await
        .unwrap();
    for n in 1..=EVENTS {
        bus.emit(OrderPlaced { n }, []).await.unwrap();
    }
    tokio::time::sleep(PATIENCE).await;
    panic!("the child should have aborted by now");
}

async fn runs<B: TestBackend>(pool: &Pool<B>, sql: &'static str) -> i64 {
    B::count(pool, sql).await
}

async fn crash_recovery<B: TestBackend>() {
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    exec(
        &db.pool,
        "CREATE TABLE crash_runs (listener TEXT NOT NULL, n BIGINT NOT NULL, child BOOLEAN NOT NULL, attempt BIGINT NOT NULL)",
    )
    .await;

    let status = Command::new(std::env::current_exe().unwrap())
        .env("TXBUS_CRASH_CHILD", B::NAME)
        .env("TXBUS_CRASH_URL", &db.url)
        .status()
        .unwrap();
    let crashed_at = Instant::now();
    assert!(!status.success(), "the child aborted: {status:?}");

    // What the child left: every quick delivery done, every other one leased and unfinished.
    let pool = &db.pool;
    assert_eq!(
        runs(
            pool,
            "SELECT count(*) AS n FROM crash_runs WHERE listener = 'quick'"
        )
        .await,
        EVENTS as i64
    );
    assert_eq!(
        runs(
            pool,
            "SELECT count(*) AS n FROM txbus_deliveries WHERE listener = 'crash.quick'"
        )
        .await,
        0
    );
    assert_eq!(
        runs(pool, "SELECT count(*) AS n FROM txbus_deliveries WHERE listener = 'crash.dies' AND attempts = 1").await,
        EVENTS as i64
    );

    let bus = EventBus::builder(db.pool.clone())
        .state(role(&db.pool, false))
        .event::<OrderPlaced>(settings())
        .retry_every(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    eventually("the survivor to run the unfinished deliveries", || async {
        let done = runs(pool, "SELECT count(*) AS n FROM crash_runs WHERE NOT child").await;
        (done >= EVENTS as i64).then_some(())
    })
    .await;
    let recovered_at = crashed_at.elapsed();
    support::idle(&bus).await;
    eventually("the tables to empty", || async {
        (runs(pool, "SELECT count(*) AS n FROM txbus_deliveries").await == 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    bus.shutdown().await;

    // Exactly once each, only what had not succeeded, and only after the child's lease.
    assert_eq!(
        runs(
            pool,
            "SELECT count(*) AS n FROM crash_runs WHERE NOT child AND listener = 'quick'"
        )
        .await,
        0
    );
    assert_eq!(
        runs(
            pool,
            "SELECT count(*) AS n FROM crash_runs WHERE NOT child AND listener = 'dies'"
        )
        .await,
        EVENTS as i64
    );
    assert_eq!(
        runs(pool, "SELECT count(DISTINCT n) AS n FROM crash_runs WHERE NOT child AND listener = 'dies' AND attempt = 2").await,
        EVENTS as i64
    );
    eprintln!(
        "[{}] recovered {EVENTS} deliveries {recovered_at:?} after the crash (lease {LEASE:?})",
        B::NAME
    );
}

fn main() -> ExitCode {
    // The child process, started by the test below: it aborts, and must not return.
    if let Ok(backend) = std::env::var("TXBUS_CRASH_CHILD") {
        let url = std::env::var("TXBUS_CRASH_URL").unwrap();
        with_backend!(backend.as_str(), run_child(url));
        return ExitCode::FAILURE;
    }
    let trials = on_every_backend("crash_recovery", |backend| {
        with_backend!(backend, run_recovery())
    });
    libtest_mimic::run(&arguments(), trials).exit()
}

fn run_child<B: TestBackend>(url: String) {
    runtime().block_on(child::<B>(url));
}

fn run_recovery<B: TestBackend>() {
    runtime().block_on(crash_recovery::<B>());
}
