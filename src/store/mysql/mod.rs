//! MySQL 8 and MariaDB ≥ 10.6: `AsyncMysqlConnection`; lists passed as one JSON parameter and
//! opened with `JSON_TABLE`; times as `DATETIME(6)` in UTC; no `RETURNING`, so updates that
//! report their rows select and lock the keys first, in one short `READ COMMITTED` transaction.

use diesel_async::AsyncMysqlConnection;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};

use crate::error::Error;
use crate::store::migrate::{self, Migration, MigrationLock, Migrations};
use crate::store::{Backend, Sealed};

mod admin;
mod claim;
mod ids;
mod inbox;
mod outbox;
mod results;

#[cfg(feature = "testing")]
pub(crate) use ids::without_returning;

/// The MySQL / MariaDB backend (feature `mysql`), on diesel-async's `AsyncMysqlConnection`.
///
/// Connect with a URL such as `mysql://user:password@host:3306/database`. Needs MySQL 8.0.4+ or
/// MariaDB 10.6+ (`SKIP LOCKED`, `JSON_TABLE`) with `binlog_format` ROW or MIXED (the default);
/// no system library.
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
#[derive(Debug, Clone, Copy, Default)]
pub struct Mysql;

impl Sealed for Mysql {}

/// Opens a JSON array of strings as a table `j (listener)`.
macro_rules! listeners_table {
    () => {
        "JSON_TABLE(?, '$[*]' COLUMNS (
            listener VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) j"
    };
}
use listeners_table;

/// Opens a JSON array of `[event_id, listener]` pairs as a table `k`.
///
/// A statement that locks the deliveries of such a list reads the list first and each delivery
/// by its primary key (`k STRAIGHT_JOIN txbus_deliveries d FORCE INDEX (PRIMARY)`): on a small
/// table the optimizer would otherwise scan it and lock rows outside the list, which deadlocks
/// with another statement doing the same.
macro_rules! keys_table {
    () => {
        "JSON_TABLE(?, '$[*]' COLUMNS (
            event_id BIGINT PATH '$[0]',
            listener VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[1]')) k"
    };
}
use keys_table;

/// The bucket of an ordering key, the SQL expression `$key`, in `txbus_key_locks` and
/// `txbus_key_parks`: the low 16 bits of its CRC-32.
macro_rules! bucket_of {
    ($key:literal) => {
        concat!("(CRC32(", $key, ") & 65535)")
    };
}
use bucket_of;

impl Backend for Mysql {
    type Connection = AsyncMysqlConnection;

    const NAME: &'static str = "mysql";

    type Db = diesel::mysql::Mysql;

    type Manager = AsyncDieselConnectionManager<AsyncMysqlConnection>;

    // Claims, sweeps, result writes and deletes read and lock only the rows they change: no gap
    // locks that would hold up concurrent emits.
    const READ_COMMITTED: Option<&'static str> =
        Some("SET TRANSACTION ISOLATION LEVEL READ COMMITTED");

    fn manager(url: &str) -> Result<Self::Manager, Error> {
        let mut config = ManagerConfig::default();
        config.recycling_method = RecyclingMethod::Fast;
        Ok(AsyncDieselConnectionManager::new_with_config(url, config))
    }

    #[cfg(feature = "testing")]
    async fn set_clock_offset(
        conn: &mut AsyncMysqlConnection,
        offset_us: i64,
    ) -> diesel::QueryResult<()> {
        use diesel_async::RunQueryDsl;
        crate::store::sql::sql::<diesel::mysql::Mysql>("SET @txbus_clock_offset_us = ?")
            .bind(offset_us)
            .execute(conn)
            .await
            .map(drop)
    }
}

impl Migrations for Mysql {
    const EMBEDDED: &'static [Migration] = migrate::MYSQL;

    // GET_LOCK names are at most 64 characters: hash the database name. MySQL commits each DDL
    // statement by itself, so every migration is a single statement, recorded right after it.
    const LOCK: MigrationLock = MigrationLock::Session {
        lock: "SELECT GET_LOCK(CONCAT('txbus.migrate.', MD5(COALESCE(DATABASE(), ''))), 600) AS n",
        unlock: "SELECT RELEASE_LOCK(CONCAT('txbus.migrate.', MD5(COALESCE(DATABASE(), '')))) AS n",
        transactional: false,
    };

    const CREATE_TABLE: &'static str = "\
CREATE TABLE IF NOT EXISTS txbus_migrations (
    version VARCHAR(32) NOT NULL PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    applied_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin";
}
