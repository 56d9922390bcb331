//! Run with `cargo run --example console --features web` (embedded SQLite, no server needed),
//! then open http://127.0.0.1:8080/txbus in a browser.
//!
//! A shop's bus with four listeners in the states a console shows: a mailer that keeps failing
//! (retrying), a fraud check that gives up on large orders (dead letters), a slow warehouse
//! listener (running; due once `seed` has stopped its runs), and reminders scheduled for
//! tomorrow. The console is mounted under `/txbus`, behind a stand-in for the service's own
//! authentication (a header check: replace it with yours).
//!
//! `cargo run --example console --features web -- seed PATH` only writes that state into the
//! SQLite database at PATH and exits (for `txbus web --database-url PATH`).

use std::time::Duration;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use txbus::{EventBus, EventSettings, ListenerError, Pool, Sqlite};

/// An order was placed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(name = "order.placed")]
struct OrderPlaced {
    order_id: i64,
    customer: String,
    total_cents: i64,
}

/// Remind a customer of their cart.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(name = "cart.reminder")]
struct CartReminder {
    customer: String,
}

/// The mail server is down: every run fails and is retried.
#[txbus::listener(name = "shop.send_confirmation")]
async fn send_confirmation(_order: OrderPlaced) -> Result<(), ListenerError> {
    Err("smtp.example.com:587: connection refused".into())
}

/// Gives up on large orders: a dead letter for an operator to look at.
#[txbus::listener(name = "shop.fraud_check")]
async fn fraud_check(order: OrderPlaced) -> Result<(), ListenerError> {
    if order.total_cents > 100_000 {
        return Err(ListenerError::abort(format!(
            "order {} of {} cents needs a manual review",
            order.order_id, order.total_cents
        )));
    }
    Ok(())
}

/// Slow: its runs are still running when `seed` stops the bus, which hands them back (due).
#[txbus::listener(name = "shop.reserve_stock")]
async fn reserve_stock(_order: OrderPlaced) -> Result<(), ListenerError> {
    tokio::time::sleep(Duration::from_secs(30)).await;
    Ok(())
}

/// Runs tomorrow.
#[txbus::listener(name = "shop.remind")]
async fn remind(_reminder: CartReminder) -> Result<(), ListenerError> {
    Ok(())
}

/// Writes the shop's state: 12 orders and 3 reminders.
async fn seed(bus: &EventBus<Sqlite>) -> Result<(), Box<dyn std::error::Error>> {
    for order_id in 1..=12 {
        let order = OrderPlaced {
            order_id,
            customer: format!("customer-{}", order_id % 5),
            total_cents: if order_id % 4 == 0 { 250_000 } else { 4_200 },
        };
        bus.emit(order, []).await?;
    }
    for customer in ["ada", "grace", "linus"] {
        let reminder = CartReminder {
            customer: customer.into(),
        };
        bus.emit_after(Duration::from_secs(24 * 3600), reminder, [])
            .await?;
    }
    // Let the first runs happen: the mailer's fail, the fraud check's give up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

async fn bus(path: &str) -> Result<EventBus<Sqlite>, Box<dyn std::error::Error>> {
    let pool = Pool::<Sqlite>::connect(path).await?;
    Ok(EventBus::builder(pool)
        .event::<OrderPlaced>(EventSettings::default().retry_after(Duration::from_secs(600)))
        .max_concurrent_listeners(64)
        .shutdown_grace(Duration::from_millis(100))
        .build()
        .await?)
}

/// A stand-in for the service's own authentication: replace it with yours.
async fn operators_only(request: Request, next: Next) -> Result<Response, StatusCode> {
    let _ = request.headers().get("authorization"); // check it here
    Ok(next.run(request).await)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [command, path] = args.as_slice()
        && command == "seed"
    {
        let bus = bus(path).await?;
        seed(&bus).await?;
        // What has not started is handed back: due for the next instance.
        bus.shutdown().await;
        println!("seeded {path}");
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("txbus-console-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("shop.db");
    let bus = bus(path.to_str().ok_or("a temporary path that is not UTF-8")?).await?;
    seed(&bus).await?;

    let app = axum::Router::new()
        .nest("/txbus", txbus::web::router(bus.clone()))
        .layer(middleware::from_fn(operators_only));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    println!("the console: http://127.0.0.1:8080/txbus (Ctrl-C to stop)");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    bus.shutdown().await;
    Ok(())
}
