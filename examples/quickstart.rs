//! Run with `cargo run --example quickstart` (embedded SQLite, no server needed).
//!
//! Creates a user and emits `UserCreated` in the same transaction. Two listeners react after the
//! commit: one sends a welcome email at once; the other syncs the user to a CRM that is down for
//! its first two attempts, so the bus retries it with backoff until it succeeds.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel_async::SimpleAsyncConnection;
use txbus::{Context, EventBus, EventSettings, ListenerError, Pool, Sqlite};

diesel::table! {
    /// The application's own table.
    users (id) {
        /// The primary key.
        id -> BigInt,
        /// Where the welcome mail goes.
        email -> Text,
    }
}

/// The application's entity; `txbus::Entity` lets `persist` write it in the emit's transaction.
#[derive(Debug, Insertable, AsChangeset, Identifiable, txbus::Entity)]
#[diesel(table_name = users)]
struct User {
    id: i64,
    email: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(name = "user.created")]
struct UserCreated {
    user_id: i64,
    email: String,
}

/// Application state the listeners reach through `ctx.state()`.
struct Crm {
    outages_left: AtomicU32,
    started: Instant,
}

#[txbus::listener]
async fn send_welcome_email(event: UserCreated, ctx: Context) -> Result<(), ListenerError> {
    let crm = ctx.state::<Crm>()?;
    println!(
        "[{:>5} ms] send_welcome_email: welcome mail to {} (attempt {})",
        crm.started.elapsed().as_millis(),
        event.email,
        ctx.attempt()
    );
    Ok(())
}

#[txbus::listener(name = "crm.sync_user")]
async fn sync_to_crm(event: UserCreated, ctx: Context) -> Result<(), ListenerError> {
    let crm = ctx.state::<Crm>()?;
    let at = crm.started.elapsed().as_millis();
    if crm.outages_left.load(Ordering::SeqCst) > 0 {
        crm.outages_left.fetch_sub(1, Ordering::SeqCst);
        println!(
            "[{at:>5} ms] sync_to_crm: attempt {} failed: CRM unavailable",
            ctx.attempt()
        );
        return Err("CRM unavailable (HTTP 503)".into());
    }
    println!(
        "[{at:>5} ms] sync_to_crm: user {} synced on attempt {}",
        event.user_id,
        ctx.attempt()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::temp_dir().join("txbus-quickstart.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let path = path
        .to_str()
        .ok_or("the temporary directory is not UTF-8")?;
    println!("database: {path}");

    let pool = Pool::<Sqlite>::connect(path).await?;
    pool.get()
        .await?
        .batch_execute("CREATE TABLE users (id BIGINT PRIMARY KEY, email TEXT NOT NULL)")
        .await?;

    let bus = EventBus::builder(pool.clone())
        .event::<UserCreated>(
            EventSettings::default()
                .max_execution_time(Duration::from_secs(5))
                .retry_after(Duration::from_millis(300)) // then 600 ms, 1.2 s, ...
                .expires_after(Duration::from_secs(3600)),
        )
        .retry_every(Duration::from_millis(100))
        .state(Crm {
            outages_left: AtomicU32::new(2),
            started: Instant::now(),
        })
        .build()
        .await?;

    let user = User {
        id: 1,
        email: "ada@example.com".into(),
    };
    let event = UserCreated {
        user_id: user.id,
        email: user.email.clone(),
    };
    let id = bus.emit(event, [txbus::persist(&user)]).await?;
    println!("emitted event {id}: user row and event committed in one transaction");

    // The deliveries are deleted as they succeed: wait until none is left.
    let crm = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if pending(&pool).await? == 0 {
                return Ok::<_, Box<dyn std::error::Error>>(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    crm.map_err(|_| "the CRM listener did not succeed within 30 s")??;
    bus.wait_idle().await;
    println!(
        "done: every delivery succeeded; {} left in txbus_deliveries",
        pending(&pool).await?
    );
    bus.shutdown().await;
    Ok(())
}

/// Deliveries not yet successful.
async fn pending(pool: &Pool<Sqlite>) -> Result<i64, Box<dyn std::error::Error>> {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = pool.get().await?;
    let row: Count = diesel_async::RunQueryDsl::get_result(
        diesel::sql_query("SELECT count(*) AS n FROM txbus_deliveries"),
        &mut *conn,
    )
    .await?;
    Ok(row.n)
}
