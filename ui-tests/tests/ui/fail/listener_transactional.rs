use diesel::SqliteConnection;
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
struct Paid;

#[txbus::listener(transactional)]
async fn no_connection(_event: Paid) -> Result<(), txbus::ListenerError> {
    Ok(())
}

#[txbus::listener(transactional)]
async fn connection_by_value(
    _event: Paid,
    _conn: SyncConnectionWrapper<SqliteConnection>,
) -> Result<(), txbus::ListenerError> {
    Ok(())
}

#[txbus::listener(transactional)]
async fn shared_connection(
    _event: Paid,
    _conn: &SyncConnectionWrapper<SqliteConnection>,
) -> Result<(), txbus::ListenerError> {
    Ok(())
}

#[txbus::listener(transactional, transactional)]
async fn twice(
    _event: Paid,
    _conn: &mut SyncConnectionWrapper<SqliteConnection>,
) -> Result<(), txbus::ListenerError> {
    Ok(())
}

fn main() {}
