//! PostgreSQL: `AsyncPgConnection`, claims with `FOR UPDATE SKIP LOCKED`, lists as arrays.

use diesel_async::AsyncPgConnection;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};

use crate::error::Error;
use crate::store::migrate::{self, Migration, MigrationLock, Migrations};
use crate::store::{Backend, Sealed};

mod admin;
mod claim;
mod inbox;
mod insert;
mod outbox;
mod pipeline;

/// The PostgreSQL backend (feature `postgres`), on diesel-async's `AsyncPgConnection`.
///
/// Connect with a URL such as `postgres://user:password@host:5432/database`; the tables go into
/// the first schema of the connection's `search_path`. No system library is needed.
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[derive(Debug, Clone, Copy, Default)]
pub struct Postgres;

impl Sealed for Postgres {}

impl Backend for Postgres {
    type Connection = AsyncPgConnection;

    const NAME: &'static str = "postgres";

    type Db = diesel::pg::Pg;

    type Manager = AsyncDieselConnectionManager<AsyncPgConnection>;

    fn manager(url: &str) -> Result<Self::Manager, Error> {
        let mut config = ManagerConfig::default();
        // Broken connections and open transactions are still detected; a ping per checkout is
        // a round trip per emit that buys nothing a failed statement would not tell.
        config.recycling_method = RecyclingMethod::Fast;
        Ok(AsyncDieselConnectionManager::new_with_config(url, config))
    }

    #[cfg(feature = "testing")]
    async fn set_clock_offset(
        conn: &mut AsyncPgConnection,
        offset_us: i64,
    ) -> diesel::QueryResult<()> {
        use diesel_async::RunQueryDsl;
        crate::store::sql::sql::<diesel::pg::Pg>(
            "SELECT set_config('txbus.clock_offset_us', $1::int8::text, false)",
        )
        .bind(offset_us)
        .execute(conn)
        .await
        .map(drop)
    }
}

impl Migrations for Postgres {
    const EMBEDDED: &'static [Migration] = migrate::POSTGRES;

    // Keyed by schema, so that buses in different schemas of one database do not wait for each
    // other.
    const LOCK: MigrationLock = MigrationLock::Session {
        lock: "SELECT 1::int8 AS n
               FROM pg_advisory_lock(hashtext('txbus.migrate.' || COALESCE(current_schema(), '')))",
        unlock: "SELECT pg_advisory_unlock(
                     hashtext('txbus.migrate.' || COALESCE(current_schema(), '')))::int::int8 AS n",
        transactional: true,
    };

    const CREATE_TABLE: &'static str = "\
CREATE TABLE IF NOT EXISTS txbus_migrations (
    version TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now())";
}
