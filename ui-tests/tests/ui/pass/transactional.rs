use diesel::SqliteConnection;
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use txbus::{Context, ListenerError};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(name = "payment.received")]
struct PaymentReceived {
    cents: i64,
}

#[txbus::listener(transactional)]
async fn credit(
    event: PaymentReceived,
    ctx: Context,
    conn: &mut SyncConnectionWrapper<SqliteConnection>,
) -> Result<(), ListenerError> {
    let _ = (event.cents, ctx.attempt(), conn);
    Ok(())
}

#[txbus::listener(transactional, name = "ledger")]
async fn without_context(
    _event: PaymentReceived,
    _conn: &mut SyncConnectionWrapper<SqliteConnection>,
) -> anyhow::Result<()> {
    Ok(())
}

fn main() {}
