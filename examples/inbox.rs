//! Run with `cargo run --example inbox` (embedded SQLite, no server needed).
//!
//! A payment provider delivers the same webhook three times (its retries). The bus accepts it
//! once; a transactional listener credits the account in the same transaction that completes
//! its delivery. Its first attempt fails after writing, and that write is rolled back: the
//! balance moves exactly once.

use std::time::Duration;

use diesel::SqliteConnection;
use diesel::prelude::*;
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use txbus::{Context, EventBus, EventSettings, ListenerError, MessageId, Pool, Received, Sqlite};

diesel::table! {
    /// The application's own table.
    accounts (id) {
        /// The primary key.
        id -> BigInt,
        /// In cents.
        balance -> BigInt,
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(name = "payment.received")]
struct PaymentReceived {
    account: i64,
    cents: i64,
}

/// Runs in a transaction that also completes its delivery: its writes commit exactly once.
#[txbus::listener(transactional, name = "accounts.credit")]
async fn credit_account(
    event: PaymentReceived,
    ctx: Context,
    conn: &mut SyncConnectionWrapper<SqliteConnection>,
) -> Result<(), ListenerError> {
    diesel::update(accounts::table.find(event.account))
        .set(accounts::balance.eq(accounts::balance + event.cents))
        .execute(conn)
        .await?;
    if ctx.attempt() == 1 {
        println!("credit_account: attempt 1 wrote the credit, then failed: rolled back");
        return Err("ledger service timed out".into());
    }
    println!(
        "credit_account: attempt {} credited {} cents",
        ctx.attempt(),
        event.cents
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::temp_dir().join("txbus-inbox.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let path = path
        .to_str()
        .ok_or("the temporary directory is not UTF-8")?;
    let pool = Pool::<Sqlite>::connect(path).await?;
    pool.get()
        .await?
        .batch_execute(
            "CREATE TABLE accounts (id BIGINT PRIMARY KEY, balance BIGINT NOT NULL);
             INSERT INTO accounts VALUES (7, 1000);",
        )
        .await?;

    let bus = EventBus::builder(pool.clone())
        .event::<PaymentReceived>(EventSettings::default().retry_after(Duration::from_millis(200)))
        .retry_every(Duration::from_millis(100))
        .inbox_dedup_window(Duration::from_secs(7 * 24 * 3600))
        .build()
        .await?;

    // The provider's webhook, delivered three times with the same delivery id.
    let payment = PaymentReceived {
        account: 7,
        cents: 2500,
    };
    for delivery in 1..=3 {
        let id = MessageId::new("payments-webhook", "evt_3MtwBwLkdIwHu7ix");
        match bus.receive(id, payment.clone()).await? {
            Received::Accepted(event) => println!("delivery {delivery}: accepted as event {event}"),
            Received::Duplicate => println!("delivery {delivery}: duplicate, ignored"),
        }
    }

    tokio::time::timeout(Duration::from_secs(30), async {
        while pending(&pool).await? > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })
    .await
    .map_err(|_| "the credit did not succeed within 30 s")??;
    bus.shutdown().await;

    let balance: i64 = accounts::table
        .find(7)
        .select(accounts::balance)
        .first(&mut *pool.get().await?)
        .await?;
    println!("balance: {balance} cents (1000 + 2500, credited once)");
    if balance != 3500 {
        return Err(format!("expected a balance of 3500, found {balance}").into());
    }
    Ok(())
}

/// Deliveries not yet successful.
async fn pending(pool: &Pool<Sqlite>) -> Result<i64, Box<dyn std::error::Error>> {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let row: Count = diesel::sql_query("SELECT count(*) AS n FROM txbus_deliveries")
        .get_result(&mut *pool.get().await?)
        .await?;
    Ok(row.n)
}
