//! The scenarios of transactional listeners, shared by one test binary per backend: a
//! transactional listener names its backend's connection type, and `build()` refuses a
//! listener of another backend, so each binary holds the listener of one backend only.

use std::process::{Command, ExitCode};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use txbus::{BuildError, EventBus, EventSettings, Pool};

use crate::support::backends::exec;
use crate::support::process::{arguments, backends, runtime, trial};
use crate::support::{TestBackend, TestDb, eventually};
use crate::with_backend;

diesel::table! {
    /// One row per run of the listener that got as far as writing.
    tx_ledger (event_id, attempt) {
        /// The event.
        event_id -> BigInt,
        /// The run.
        attempt -> BigInt,
        /// The amount credited.
        amount -> BigInt,
    }
}

/// What the listener should do on its first attempts.
#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "tx.credit")]
pub struct Credit {
    pub amount: i64,
    pub mode: String,
}

/// A credit of an account, in order per account.
#[derive(Debug, Clone, Serialize, Deserialize, txbus::Event)]
#[event(name = "tx.transfer", ordering_key = account)]
pub struct Transfer {
    pub account: String,
    pub amount: i64,
}

/// Defines the transactional listeners for a connection type. `tx.credit` writes a ledger row,
/// then misbehaves on its first attempts as the event asks; `tx.transfer` writes one.
#[macro_export]
macro_rules! credit_listener {
    ($connection:ty) => {
        /// Writes the ledger row of this run.
        async fn write_ledger(
            ctx: &txbus::Context,
            amount: i64,
            conn: &mut $connection,
        ) -> Result<(), txbus::ListenerError> {
            use common::tx_ledger;
            use diesel::prelude::*;
            use diesel_async::RunQueryDsl;
            diesel::insert_into(tx_ledger::table)
                .values((
                    tx_ledger::event_id.eq(ctx.event_id().get()),
                    tx_ledger::attempt.eq(i64::from(ctx.attempt())),
                    tx_ledger::amount.eq(amount),
                ))
                .execute(conn)
                .await?;
            Ok(())
        }

        #[txbus::listener(transactional, name = "tx.transfer")]
        async fn transfer(
            event: common::Transfer,
            ctx: txbus::Context,
            conn: &mut $connection,
        ) -> Result<(), txbus::ListenerError> {
            write_ledger(&ctx, event.amount, conn).await
        }

        #[txbus::listener(transactional, name = "tx.credit")]
        async fn credit(
            event: common::Credit,
            ctx: txbus::Context,
            conn: &mut $connection,
        ) -> Result<(), txbus::ListenerError> {
            use diesel_async::RunQueryDsl;
            write_ledger(&ctx, event.amount, conn).await?;
            match (event.mode.as_str(), ctx.attempt()) {
                ("fail_twice", 1 | 2) => return Err("failed after writing".into()),
                ("lose_lease", 1) => {
                    // As if another process had claimed the delivery meanwhile.
                    diesel::sql_query("UPDATE txbus_deliveries SET attempts = attempts + 1")
                        .execute(conn)
                        .await?;
                }
                ("hang_first", 1) => std::future::pending::<()>().await,
                ("abort_first", 1) => std::process::abort(),
                _ => {}
            }
            Ok(())
        }
    };
}

/// A lease of 2 s: long enough that a busy machine never times out a run that should succeed
/// (which would change the attempt counts asserted), short enough for the scenarios that wait
/// it out (a lost lease, a hang, a crash).
fn settings() -> EventSettings {
    EventSettings::default()
        .max_execution_time(Duration::from_secs(2))
        .retry_after(Duration::from_millis(50))
}

async fn setup<B: TestBackend>() -> TestDb<B> {
    let db = B::open().await;
    txbus::migrate(&db.pool).await.unwrap();
    exec(
        &db.pool,
        "CREATE TABLE tx_ledger (event_id BIGINT NOT NULL, attempt BIGINT NOT NULL, amount BIGINT NOT NULL, \
         PRIMARY KEY (event_id, attempt))",
    )
    .await;
    db
}

async fn bus<B: TestBackend>(pool: Pool<B>) -> EventBus<B> {
    EventBus::builder(pool)
        .event::<Credit>(settings())
        .retry_every(Duration::from_millis(25))
        .build()
        .await
        .unwrap()
}

async fn ledger<B: TestBackend>(db: &TestDb<B>) -> i64 {
    B::count(&db.pool, "SELECT count(*) AS n FROM tx_ledger").await
}

/// Waits until the delivery is gone and returns the ledger rows then.
async fn settled<B: TestBackend>(db: &TestDb<B>) -> i64 {
    eventually("the delivery to complete", || async {
        (B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await == 0).then_some(())
    })
    .await;
    ledger(db).await
}

/// The attempt of the only ledger row.
async fn attempt_written<B: TestBackend>(db: &TestDb<B>) -> i64 {
    B::count(&db.pool, "SELECT max(attempt) AS n FROM tx_ledger").await
}

async fn writes_are_applied_once_after_failures<B: TestBackend>() {
    let db = setup::<B>().await;
    let bus = bus(db.pool.clone()).await;
    bus.emit(
        Credit {
            amount: 10,
            mode: "fail_twice".into(),
        },
        [],
    )
    .await
    .unwrap();
    assert_eq!(
        settled(&db).await,
        1,
        "the writes of the two failed runs were rolled back"
    );
    assert_eq!(attempt_written(&db).await, 3);
    bus.shutdown().await;
}

async fn a_lost_lease_rolls_the_writes_back<B: TestBackend>() {
    let db = setup::<B>().await;
    let bus = bus(db.pool.clone()).await;
    bus.emit(
        Credit {
            amount: 5,
            mode: "lose_lease".into(),
        },
        [],
    )
    .await
    .unwrap();
    // The first run's fence fails: rolled back, and the delivery is run again once its lease
    // passes (the failed fence recorded nothing).
    assert_eq!(settled(&db).await, 1);
    assert_eq!(attempt_written(&db).await, 2);
    bus.shutdown().await;
}

async fn a_timeout_rolls_back_and_drops_the_connection<B: TestBackend>() {
    let db = setup::<B>().await;
    let bus = bus(db.pool.clone()).await;
    bus.emit(
        Credit {
            amount: 7,
            mode: "hang_first".into(),
        },
        [],
    )
    .await
    .unwrap();
    assert_eq!(settled(&db).await, 1);
    assert_eq!(attempt_written(&db).await, 2);
    // The pool is healthy: no connection was left in the hung transaction.
    for _ in 0..10 {
        bus.emit(
            Credit {
                amount: 1,
                mode: "ok".into(),
            },
            [],
        )
        .await
        .unwrap();
    }
    assert_eq!(settled(&db).await, 11);
    bus.shutdown().await;
}

/// The deliveries of one key to a transactional listener, which records each success in its
/// own transaction: each success lets the next of the key run. The bus polls once an hour, so
/// only the success itself can start the next one.
async fn a_keyed_success_lets_the_next_of_its_key_run<B: TestBackend>() {
    let db = setup::<B>().await;
    let bus = EventBus::builder(db.pool.clone())
        .event::<Credit>(settings())
        .retry_every(Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    bus.transaction(async |tx| {
        for amount in 1..=3 {
            let transfer = Transfer {
                account: "acct-1".into(),
                amount,
            };
            tx.emit(&transfer).await?;
        }
        Ok::<_, txbus::Error>(())
    })
    .await
    .unwrap();
    assert_eq!(settled(&db).await, 3, "each transfer ran once");
    bus.shutdown().await;
}

/// A child process runs the listener, which writes and aborts the process before the commit.
async fn a_crash_before_commit_leaves_no_writes<B: TestBackend>() {
    let db = setup::<B>().await;
    let status = Command::new(std::env::current_exe().unwrap())
        .env("TXBUS_TX_CHILD", &db.url)
        .status()
        .unwrap();
    assert!(!status.success(), "the child aborted");
    assert_eq!(
        ledger(&db).await,
        0,
        "the aborted run's writes were rolled back"
    );
    assert_eq!(
        B::count(&db.pool, "SELECT count(*) AS n FROM txbus_deliveries").await,
        1
    );
    let bus = bus(db.pool.clone()).await;
    assert_eq!(settled(&db).await, 1, "retried after the lease, once");
    assert_eq!(attempt_written(&db).await, 2);
    bus.shutdown().await;
}

async fn child<B: TestBackend>(url: String) {
    let pool = Pool::<B>::connect(&url).await.unwrap();
    let bus = bus(pool).await;
    bus.emit(
        Credit {
            amount: 3,
            mode: "abort_first".into(),
        },
        [],
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
}

/// A bus of another backend refuses the listener, which takes this backend's connection.
async fn another_backend_refuses<B: TestBackend>() {
    let db = B::open().await;
    let error = EventBus::builder(db.pool.clone())
        .build()
        .await
        .unwrap_err();
    let BuildError::ListenerConnection {
        id,
        found,
        expected,
    } = &error
    else {
        panic!("expected ListenerConnection, got {error:?}");
    };
    assert_eq!(*id, "tx.credit");
    assert_ne!(found, expected);
    assert!(error.to_string().contains("takes `&mut"), "{error}");
}

fn refuse<O: TestBackend>() {
    runtime().block_on(another_backend_refuses::<O>());
}

/// The test binary's `main` for backend `B`; buses of every other backend built refuse its
/// listener.
pub fn main<B: TestBackend>() -> ExitCode {
    if let Ok(url) = std::env::var("TXBUS_TX_CHILD") {
        runtime().block_on(child::<B>(url));
        return ExitCode::SUCCESS;
    }
    let name = B::NAME;
    let mut trials = vec![
        trial(
            format!("{name}::writes_are_applied_once_after_failures"),
            || runtime().block_on(writes_are_applied_once_after_failures::<B>()),
        ),
        trial(
            format!("{name}::a_lost_lease_rolls_the_writes_back"),
            || runtime().block_on(a_lost_lease_rolls_the_writes_back::<B>()),
        ),
        trial(
            format!("{name}::a_timeout_rolls_back_and_drops_the_connection"),
            || runtime().block_on(a_timeout_rolls_back_and_drops_the_connection::<B>()),
        ),
        trial(
            format!("{name}::a_keyed_success_lets_the_next_of_its_key_run"),
            || runtime().block_on(a_keyed_success_lets_the_next_of_its_key_run::<B>()),
        ),
        trial(
            format!("{name}::a_crash_before_commit_leaves_no_writes"),
            || runtime().block_on(a_crash_before_commit_leaves_no_writes::<B>()),
        ),
    ];
    for other in backends().into_iter().filter(|other| *other != B::NAME) {
        trials.push(trial(
            format!("{other}::another_backend_refuses"),
            move || with_backend!(other, refuse()),
        ));
    }
    libtest_mimic::run(&arguments(), trials).exit_code()
}
