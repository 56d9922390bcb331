//! SQLite: one writer at a time, so every write is a short `BEGIN IMMEDIATE` transaction, and an
//! emit runs on the blocking pool in one trip; times are milliseconds since the Unix epoch.

use diesel::SqliteConnection;
use diesel::connection::AnsiTransactionManager;
use diesel::result::QueryResult;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, SimpleAsyncConnection};

use crate::error::Error;
use crate::store::migrate::{self, Migration, MigrationLock, Migrations};
use crate::store::{Backend, Sealed};

/// The database clock: milliseconds since the Unix epoch. SQLite treats the date and time
/// functions as constants of a statement (evaluated once, before its first row), so every use
/// within one statement sees the same time. Times are bound and read in microseconds, like on
/// the other backends, and converted in the statements. Defined before the submodules, which use
/// it.
macro_rules! now_ms {
    () => {
        "CAST(unixepoch('subsec') * 1000 AS INTEGER)"
    };
}

mod admin;
mod claim;
mod inbox;
mod outbox;

/// The embedded SQLite backend (feature `sqlite`, on by default), on
/// `SyncConnectionWrapper<SqliteConnection>` with a bundled SQLite: no server, no system library.
///
/// Connect with a file path (`"app.db"`, or `"sqlite://app.db"`); the file is created if missing.
/// Every connection uses write-ahead logging, `synchronous = NORMAL` (a commit survives a crash
/// of the process; a power loss may lose the last commits, entities and events alike),
/// `foreign_keys = ON` and a `busy_timeout` of 5 seconds. SQLite lets one transaction write at a
/// time: keep transactions short, and inside [`EventBus::transaction`](crate::EventBus::transaction)
/// emit with the transaction's `emit`, never with the bus's.
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
#[derive(Debug, Clone, Copy, Default)]
pub struct Sqlite;

impl Sealed for Sqlite {}

type Conn = SyncConnectionWrapper<SqliteConnection>;

const PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                       PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;";

impl Backend for Sqlite {
    type Connection = Conn;

    const NAME: &'static str = "sqlite";

    type Db = diesel::sqlite::Sqlite;

    type Manager = AsyncDieselConnectionManager<Conn>;

    const SINGLE_WRITER: bool = true;

    fn manager(url: &str) -> Result<Self::Manager, Error> {
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        if path.is_empty() || path.contains(":memory:") || path.contains("mode=memory") {
            return Err(Error::Config(format!(
                "`{url}` is not a database file; an in-memory SQLite database is private to one \
                 connection and cannot back a pool: give a file path such as `app.db`"
            )));
        }
        let mut config = ManagerConfig::default();
        config.recycling_method = RecyclingMethod::Fast;
        config.custom_setup = Box::new(|url| {
            Box::pin(async move {
                let mut conn = Conn::establish(url).await?;
                conn.batch_execute(PRAGMAS)
                    .await
                    .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                #[cfg(feature = "testing")]
                Self::set_clock_offset(&mut conn, 0)
                    .await
                    .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                Ok(conn)
            })
        });
        Ok(AsyncDieselConnectionManager::new_with_config(path, config))
    }

    // Takes the write lock up front: a deferred transaction that reads before it writes fails
    // at once, without waiting, when another connection wrote in between.
    async fn begin(conn: &mut Conn) -> QueryResult<()> {
        conn.spawn_blocking(|c| AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE"))
            .await
    }

    // SQLite has no session variables: the offset is a function of the connection's, defined
    // when it opens (a statement rewritten while it was out of the pool finds it), and again with
    // each value (which makes the connection prepare its statements again).
    #[cfg(feature = "testing")]
    async fn set_clock_offset(conn: &mut Conn, offset_us: i64) -> QueryResult<()> {
        diesel::define_sql_function! {
            /// The test kit's offset from the clock, in microseconds.
            fn txbus_clock_offset_us() -> diesel::sql_types::BigInt;
        }
        conn.spawn_blocking(move |c| {
            txbus_clock_offset_us_utils::register_nondeterministic_impl(c, move || offset_us)
        })
        .await
    }
}

impl Migrations for Sqlite {
    const EMBEDDED: &'static [Migration] = migrate::SQLITE;

    // The immediate transaction is the lock: concurrent starts wait on SQLite's writer lock.
    const LOCK: MigrationLock = MigrationLock::Transaction;

    const CREATE_TABLE: &'static str = concat!(
        "CREATE TABLE IF NOT EXISTS txbus_migrations (
    version TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    applied_at INTEGER NOT NULL DEFAULT (",
        now_ms!(),
        "))"
    );
}
