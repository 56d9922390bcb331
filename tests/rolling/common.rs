//! What both sides of the rolling deploy share: the listener id, the table of runs, the sizes.
#![allow(dead_code)]

use std::time::Duration;

use txbus::{Context, ListenerError, Pool, Postgres};

/// The listener both binaries have, each with its own version of the event's type.
pub const LISTENER: &str = "rolling.ship";

/// Orders each side emits.
pub const ORDERS: i64 = 60;

/// The first run of every third order fails; its retry waits this long, so that the old
/// binary has shut down before its own retries fall due.
pub const RETRY_AFTER: Duration = Duration::from_secs(3);

/// What each run writes down: the order, the binary that ran it (`old`, `new`), its attempt,
/// the total in cents as the listener read it, and whether it succeeded.
pub const CREATE_RUNS: &str = "CREATE TABLE rolling_runs (
    order_id BIGINT NOT NULL, binary_name TEXT NOT NULL, attempt INTEGER NOT NULL,
    total_cents BIGINT NOT NULL, ok BOOLEAN NOT NULL)";

/// Writes down one run, and fails the first run of every third order.
pub async fn run(
    ctx: &Context,
    binary: &str,
    order_id: i64,
    total_cents: i64,
) -> Result<(), ListenerError> {
    let pool = ctx.state::<Pool<Postgres>>()?;
    let ok = ctx.attempt() > 1 || order_id % 3 != 0;
    let mut conn = pool.get().await?;
    diesel_async::RunQueryDsl::execute(
        diesel::sql_query(format!(
            "INSERT INTO rolling_runs VALUES ({order_id}, '{binary}', {}, {total_cents}, {ok})",
            ctx.attempt()
        )),
        &mut *conn,
    )
    .await?;
    if ok {
        Ok(())
    } else {
        Err(ListenerError::retry_after(
            RETRY_AFTER,
            "the first run of every third order fails",
        ))
    }
}

/// The bus of either side.
pub fn bus(pool: Pool<Postgres>) -> txbus::EventBusBuilder<Postgres> {
    txbus::EventBus::builder(pool.clone())
        .state(pool)
        .retry_every(Duration::from_millis(25))
}
