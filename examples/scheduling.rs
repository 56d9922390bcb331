//! Run with `cargo run --example scheduling` (embedded SQLite, no server needed).
//!
//! Two orders are placed, each with a payment timeout due in 2 seconds, scheduled in the same
//! transaction as the order row. Order 1 is paid in time: the payment and the cancellation of
//! its timeout commit together. Order 2 is not: its timeout fires, and the listener cancels the
//! order in the listener's own transaction. The example ends by checking that the paid order
//! was not cancelled.

use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use txbus::{Context, EventBus, EventId, ListenerError, Pool, Sqlite};

diesel::table! {
    /// The application's orders.
    orders (id) {
        /// The primary key.
        id -> BigInt,
        /// `pending`, `paid` or `cancelled`.
        status -> Text,
        /// The event id of the order's payment timeout.
        timeout_event -> BigInt,
    }
}

/// Fires when an order has waited too long for its payment.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(name = "order.payment_timeout")]
struct PaymentTimeout {
    order_id: i64,
}

/// When the example started, for the timestamps it prints.
struct Started(Instant);

fn at(ctx: &Context) -> u128 {
    ctx.state::<Started>()
        .map_or(0, |s| s.0.elapsed().as_millis())
}

/// Cancels the order if it is still unpaid, in the same transaction that records this
/// delivery as done.
#[txbus::listener(transactional)]
async fn cancel_unpaid_order(
    timeout: PaymentTimeout,
    ctx: Context,
    conn: &mut SyncConnectionWrapper<SqliteConnection>,
) -> Result<(), ListenerError> {
    let cancelled = diesel::update(orders::table)
        .filter(orders::id.eq(timeout.order_id))
        .filter(orders::status.eq("pending"))
        .set(orders::status.eq("cancelled"))
        .execute(conn)
        .await?;
    println!(
        "[{:>5} ms] payment timeout of order {}: {}",
        at(&ctx),
        timeout.order_id,
        if cancelled == 1 {
            "unpaid, cancelled"
        } else {
            "already settled"
        }
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::temp_dir().join("txbus-scheduling.db");
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
            "CREATE TABLE orders (id BIGINT PRIMARY KEY, status TEXT NOT NULL, \
             timeout_event BIGINT NOT NULL)",
        )
        .await?;
    let started = Instant::now();
    let bus = EventBus::builder(pool.clone())
        .state(Started(started))
        .build()
        .await?;

    for order_id in [1, 2] {
        let timeout = place_order(&bus, order_id).await?;
        println!(
            "[{:>5} ms] order {order_id} placed; its payment timeout {timeout} is due in 2 s",
            started.elapsed().as_millis()
        );
    }

    let cancelled = bus
        .transaction(async |tx| {
            diesel::update(orders::table.find(1))
                .set(orders::status.eq("paid"))
                .execute(tx.conn())
                .await?;
            let timeout: i64 = orders::table
                .find(1)
                .select(orders::timeout_event)
                .get_result(tx.conn())
                .await?;
            tx.cancel(EventId::new(timeout)).await
        })
        .await?;
    println!(
        "[{:>5} ms] order 1 paid; its timeout cancelled in the same transaction ({cancelled} delivery)",
        started.elapsed().as_millis()
    );
    println!("scheduled now: {}", bus.stats().await?.total.scheduled);

    // Wait for order 2's timeout to cancel it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&pool, 2).await? != "cancelled" {
        if Instant::now() > deadline {
            return Err("order 2 was not cancelled within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bus.wait_idle().await;

    let (paid, unpaid) = (status(&pool, 1).await?, status(&pool, 2).await?);
    println!("order 1: {paid}, order 2: {unpaid}");
    if paid != "paid" || unpaid != "cancelled" {
        return Err(format!(
            "expected order 1 paid and order 2 cancelled, got {paid} and {unpaid}"
        )
        .into());
    }
    println!("check passed: the paid order was not cancelled");
    bus.shutdown().await;
    Ok(())
}

/// Writes the order and schedules its payment timeout in one transaction; returns the
/// timeout's event id.
async fn place_order(bus: &EventBus<Sqlite>, order_id: i64) -> Result<EventId, txbus::Error> {
    bus.transaction(async |tx| {
        let timeout = tx
            .emit_after(Duration::from_secs(2), &PaymentTimeout { order_id })
            .await?;
        diesel::insert_into(orders::table)
            .values((
                orders::id.eq(order_id),
                orders::status.eq("pending"),
                orders::timeout_event.eq(timeout.get()),
            ))
            .execute(tx.conn())
            .await?;
        Ok(timeout)
    })
    .await
}

async fn status(pool: &Pool<Sqlite>, order_id: i64) -> Result<String, Box<dyn std::error::Error>> {
    let mut conn = pool.get().await?;
    Ok(orders::table
        .find(order_id)
        .select(orders::status)
        .get_result(&mut *conn)
        .await?)
}
