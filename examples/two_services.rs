//! Run with `cargo run --example two_services --features nats` (embedded SQLite for both
//! services; NATS with JetStream at 127.0.0.1:4222, or `NATS_URL`).
//!
//! Service A, the shop, stores each order and emits `OrderPlaced` in the same transaction; its
//! relay publishes the event to JetStream. Service B, shipping, has its own database: its
//! JetStream inbox receives each message once, and a transactional listener counts the order
//! in B's projection in the transaction that completes its delivery. The first order's message
//! is published a second time with the same `Nats-Msg-Id`, as a relay does after a lost
//! acknowledgement: JetStream drops it, and B counts every order exactly once.
//!
//! Both services run in this one process here; in production each is its own service.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use diesel::SqliteConnection;
use diesel::prelude::*;
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use txbus::nats::{EVENT_HEADER, JetStreamInbox, JetStreamRelay};
use txbus::{Context, EventBus, EventSettings, ListenerError, Pool, Sqlite, persist};

const STREAM: &str = "TXBUS_EXAMPLE_ORDERS";
const SUBJECT: &str = "txbus_example.orders.placed";

diesel::table! {
    /// Service A's orders.
    orders (id) {
        /// The order number.
        id -> BigInt,
        /// In cents.
        total -> BigInt,
    }
}

diesel::table! {
    /// Service B's projection: how many orders it has seen, and their sum.
    shipments (id) {
        /// Always 1: one row.
        id -> BigInt,
        /// Orders counted.
        orders -> BigInt,
        /// Their totals, in cents.
        cents -> BigInt,
    }
}

#[derive(Debug, Clone, Insertable, AsChangeset, Identifiable, txbus::Entity)]
#[diesel(table_name = orders)]
struct Order {
    id: i64,
    total: i64,
}

/// Service A's event.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(name = "shop.order_placed")]
struct OrderPlaced {
    id: i64,
    total: i64,
}

/// The same message as service B knows it, under a name of B's own.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(name = "shipping.order_received")]
struct OrderReceived {
    id: i64,
    total: i64,
}

/// Service B's listener: its writes commit with the completion of its delivery, exactly once.
#[txbus::listener(transactional, name = "shipping.project")]
async fn project(
    event: OrderReceived,
    _ctx: Context,
    conn: &mut SyncConnectionWrapper<SqliteConnection>,
) -> Result<(), ListenerError> {
    diesel::update(shipments::table.find(1))
        .set((
            shipments::orders.eq(shipments::orders + 1),
            shipments::cents.eq(shipments::cents + event.total),
        ))
        .execute(conn)
        .await?;
    println!("B: order {} projected", event.id);
    Ok(())
}

/// B's projection: orders counted, and their sum.
async fn projected(pool: &Pool<Sqlite>) -> Result<(i64, i64), Box<dyn std::error::Error>> {
    Ok(shipments::table
        .find(1)
        .select((shipments::orders, shipments::cents))
        .first(&mut *pool.get().await?)
        .await?)
}

/// A fresh SQLite database in the temporary directory.
async fn database(name: &str, schema: &str) -> Result<Pool<Sqlite>, Box<dyn std::error::Error>> {
    let path = std::env::temp_dir().join(name);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let path = path
        .to_str()
        .ok_or("the temporary directory is not UTF-8")?;
    let pool = Pool::<Sqlite>::connect(path).await?;
    pool.get().await?.batch_execute(schema).await?;
    Ok(pool)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".to_owned());
    let client = async_nats::connect(&url).await.map_err(|e| {
        format!(
            "NATS is not reachable at {url} ({e}); start it with `start-stop-daemon --start \
             --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js \
             -sd /var/lib/nats-server`"
        )
    })?;
    let jetstream = jetstream::new(client);
    // A stream that keeps the orders, with a duplicate window for retried publishes.
    let _ = jetstream.delete_stream(STREAM).await;
    let orders_stream = jetstream
        .create_stream(stream::Config {
            name: STREAM.to_owned(),
            subjects: vec![SUBJECT.to_owned()],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?;

    // Service A: the shop.
    let shop_db = database(
        "txbus-shop.db",
        "CREATE TABLE orders (id BIGINT PRIMARY KEY, total BIGINT NOT NULL);",
    )
    .await?;
    let shop = EventBus::builder(shop_db.clone())
        .relay(JetStreamRelay::new(jetstream.clone()).route::<OrderPlaced>(SUBJECT))
        .event::<OrderPlaced>(EventSettings::default().retry_after(Duration::from_millis(200)))
        .build()
        .await?;

    // Service B: shipping, with a durable consumer of the stream.
    let shipping_db = database(
        "txbus-shipping.db",
        "CREATE TABLE shipments (id BIGINT PRIMARY KEY, orders BIGINT NOT NULL, cents BIGINT NOT NULL);
         INSERT INTO shipments VALUES (1, 0, 0);",
    )
    .await?;
    let shipping = EventBus::builder(shipping_db.clone()).build().await?;
    let consumer = orders_stream
        .create_consumer(pull::Config {
            durable_name: Some("shipping".to_owned()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let inbox = tokio::spawn(
        JetStreamInbox::new(shipping.clone(), consumer)
            .event_as::<OrderReceived>("shop.order_placed")
            .run_until(async {
                let _ = stopped.await;
            }),
    );

    for (id, total) in [(1, 2500), (2, 1200), (3, 990)] {
        let event_id = shop
            .emit(OrderPlaced { id, total }, [persist(&Order { id, total })])
            .await?;
        println!("A: order {id} stored, event {event_id} emitted");
    }
    shop.wait_idle().await;

    // The first order once more, with the id the relay gave it, as after a lost ack.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("1@{SUBJECT}").as_str(),
    );
    headers.insert(EVENT_HEADER, "shop.order_placed");
    let again = jetstream
        .publish_with_headers(SUBJECT, headers, r#"{"id":1,"total":2500}"#.into())
        .await?
        .await?;
    println!(
        "A: the first order published again: JetStream duplicate = {}",
        again.duplicate
    );

    tokio::time::timeout(Duration::from_secs(30), async {
        while projected(&shipping_db).await?.0 < 3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })
    .await
    .map_err(|_| "B did not project the three orders within 30 s")??;
    // Give a duplicate the time to show up, if there were one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    shipping.wait_idle().await;
    let (counted, cents) = projected(&shipping_db).await?;
    let _ = stop.send(());
    inbox.await??;
    shop.shutdown().await;
    shipping.shutdown().await;
    let _ = jetstream.delete_stream(STREAM).await;

    println!("B: {counted} orders, {cents} cents (each order once)");
    if (counted, cents) != (3, 4690) {
        return Err(
            format!("expected 3 orders and 4690 cents, found {counted} and {cents}").into(),
        );
    }
    Ok(())
}
