//! SQLite: one writer at a time, so every write is a short `BEGIN IMMEDIATE` transaction run on
//! the blocking pool; times are milliseconds since the Unix epoch.

use crate::store::rows::{DiedRow, ListenerCountRow, VersionRow};
use std::sync::Arc;
use std::time::Duration;

use diesel::connection::{AnsiTransactionManager, SimpleConnection};
use diesel::sql_types::{BigInt, Bool, Integer, Nullable, Text};
use diesel::sqlite::SqliteConnection;
use diesel::{QueryResult, RunQueryDsl};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, SimpleAsyncConnection};

use super::sql::{Sql, sql};

use super::{
    Backend, Claimed, DeadFilter, DeadRow, DeliveryKey, DeliveryRef, Died, Inserted, NewEvent,
    Outcome, Recorded, Retention, Sealed, StatsRows, StoredMessage, UpdateRow, attempt_i32,
    attempt_u32, split_done, system_time_from_micros,
};
use crate::migrate;
use crate::{Error, EventId, MessageId};

/// A statement of this backend that diesel caches as a prepared statement.
fn query<'a>(text: &'static str) -> Sql<'a, diesel::sqlite::Sqlite> {
    sql(text)
}

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

/// The database clock: milliseconds since the Unix epoch. SQLite treats the date and time
/// functions as constants of a statement (evaluated once, before its first row), so every use
/// within one statement sees the same time. Defined before the submodules, which use it too.
macro_rules! now_ms {
    () => {
        "CAST(unixepoch('subsec') * 1000 AS INTEGER)"
    };
}

mod inbox;
mod ops;

const PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                       PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;";

const NEXT_EVENT_ID: &str = concat!(
    "UPDATE txbus_sequence SET value = value + 1 WHERE name = 'event_id' RETURNING value AS id, ",
    now_ms!(),
    " AS now"
);

const INSERT_EVENT: &str = "\
INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, lease_ms,
                              attempts, leased_at, available_at, expires_at)
SELECT ?1, value, ?2, ?3, ?4, ?5, 1, ?4, ?4 + ?5, ?4 + ?6 FROM json_each(?7)";

// Expired deliveries are made dead instead of leased (all SET expressions see the old row).
const CLAIM: &str = concat!(
    "UPDATE txbus_deliveries SET
        attempts = CASE WHEN expires_at <= ",
    now_ms!(),
    " THEN attempts ELSE attempts + 1 END,
        available_at = CASE WHEN expires_at <= ",
    now_ms!(),
    " THEN available_at ELSE ",
    now_ms!(),
    " + lease_ms END,
        leased_at = CASE WHEN expires_at <= ",
    now_ms!(),
    " THEN NULL ELSE ",
    now_ms!(),
    " END,
        dead_at = CASE WHEN expires_at <= ",
    now_ms!(),
    " THEN ",
    now_ms!(),
    " END,
        dead_reason = CASE WHEN expires_at <= ",
    now_ms!(),
    " THEN 'expired' END
    WHERE (event_id, listener) IN (
        SELECT event_id, listener FROM txbus_deliveries
        WHERE dead_at IS NULL AND delivered_at IS NULL AND available_at <= ",
    now_ms!(),
    " AND listener IN (SELECT value FROM json_each(?1))
        ORDER BY available_at
        LIMIT ?2)
    RETURNING event_id, listener, attempts, payload, emitted_at, lease_ms,
              dead_at IS NOT NULL AS expired"
);

const DELETE_DONE: &str = "\
DELETE FROM txbus_deliveries WHERE event_id = ? AND listener = ? AND attempts = ?
    AND dead_at IS NULL AND delivered_at IS NULL";

// A success kept for `retain_delivered`: the same fence as the delete.
const MARK_DONE: &str = concat!(
    "UPDATE txbus_deliveries SET delivered_at = ",
    now_ms!(),
    ", leased_at = NULL
    WHERE event_id = ? AND listener = ? AND attempts = ?
    AND dead_at IS NULL AND delivered_at IS NULL"
);

const UPDATE_FAILED: &str = concat!(
    "UPDATE txbus_deliveries SET
    attempts = attempts - ?4,
    leased_at = NULL,
    last_error = COALESCE(?7, last_error),
    dead_at = CASE WHEN ?6 IS NOT NULL OR ",
    now_ms!(),
    " + ?5 >= expires_at THEN ",
    now_ms!(),
    " END,
    dead_reason = CASE WHEN ?6 IS NOT NULL THEN ?6 WHEN ",
    now_ms!(),
    " + ?5 >= expires_at THEN 'expired' END,
    available_at = ",
    now_ms!(),
    " + ?5
    WHERE event_id = ?1 AND listener = ?2 AND attempts = ?3
    AND dead_at IS NULL AND delivered_at IS NULL
    RETURNING event_id, listener, dead_reason"
);

const EXPIRE: &str = concat!(
    "UPDATE txbus_deliveries SET dead_at = ",
    now_ms!(),
    ",
    dead_reason = 'no_listener',
    leased_at = NULL,
    last_error = COALESCE(last_error, 'no running instance has listener ' || listener)
    WHERE (event_id, listener) IN (
        SELECT event_id, listener FROM txbus_deliveries
        WHERE dead_at IS NULL AND delivered_at IS NULL AND available_at <= ",
    now_ms!(),
    " AND expires_at <= ",
    now_ms!(),
    " AND listener NOT IN (SELECT value FROM json_each(?1))
        LIMIT ?2)
    RETURNING event_id, listener, dead_reason"
);

const ORPHANS: &str = concat!(
    "SELECT listener, count(*) AS n FROM (
        SELECT listener FROM txbus_deliveries
        WHERE dead_at IS NULL AND delivered_at IS NULL AND available_at <= ",
    now_ms!(),
    " AND listener NOT IN (SELECT value FROM json_each(?1))
        LIMIT ?2) due
    GROUP BY listener ORDER BY listener"
);

const CREATE_MIGRATIONS_TABLE: &str = concat!(
    "CREATE TABLE IF NOT EXISTS txbus_migrations (
    version TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    applied_at INTEGER NOT NULL DEFAULT (",
    now_ms!(),
    "))"
);

#[derive(diesel::QueryableByName)]
struct IdRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = BigInt)]
    now: i64,
}

#[derive(diesel::QueryableByName)]
struct ClaimedRow {
    #[diesel(sql_type = BigInt)]
    event_id: i64,
    #[diesel(sql_type = Text)]
    listener: String,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Text)]
    payload: String,
    #[diesel(sql_type = BigInt)]
    emitted_at: i64,
    #[diesel(sql_type = BigInt)]
    lease_ms: i64,
    #[diesel(sql_type = Bool)]
    expired: bool,
}

impl Backend for Sqlite {
    type Connection = Conn;

    type Manager = AsyncDieselConnectionManager<Conn>;

    const NAME: &'static str = "sqlite";

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
                Ok(conn)
            })
        });
        Ok(AsyncDieselConnectionManager::new_with_config(path, config))
    }

    async fn begin(conn: &mut Conn) -> QueryResult<()> {
        // Take the write lock up front: a deferred transaction that reads before it writes fails
        // at once, without waiting, when another connection wrote in between.
        conn.spawn_blocking(|c| AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE"))
            .await
    }

    async fn insert_event(conn: &mut Conn, event: &NewEvent) -> QueryResult<Inserted> {
        let row = EventRow::new(event);
        conn.spawn_blocking(move |c| row.insert(c)).await
    }

    // One trip to the blocking pool for the insert and the COMMIT (or the ROLLBACK).
    async fn commit_with_event(conn: &mut Conn, event: &NewEvent) -> QueryResult<Inserted> {
        use diesel::connection::TransactionManager;
        let row = EventRow::new(event);
        conn.spawn_blocking(move |c| match row.insert(c) {
            Ok(inserted) => {
                AnsiTransactionManager::commit_transaction(c)?;
                Ok(inserted)
            }
            Err(error) => {
                let _ = AnsiTransactionManager::rollback_transaction(c);
                Err(error)
            }
        })
        .await
    }

    async fn emit_alone(conn: &mut Conn, event: &NewEvent) -> QueryResult<Inserted> {
        let row = EventRow::new(event);
        conn.spawn_blocking(move |c| c.immediate_transaction(|c| row.insert(c)))
            .await
    }

    async fn claim(
        conn: &mut Conn,
        listeners: &[&'static str],
        limit: usize,
    ) -> QueryResult<Vec<Claimed>> {
        let listeners = json_list(listeners);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Vec<ClaimedRow> = conn
            .spawn_blocking(move |c| {
                query(CLAIM)
                    .bind::<Text, _>(&listeners)
                    .bind::<BigInt, _>(limit)
                    .load(c)
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| Claimed {
                event_id: EventId::new(row.event_id),
                listener: row.listener,
                attempt: attempt_u32(row.attempts),
                payload: row.payload.into(),
                emitted_at: system_time_from_micros(row.emitted_at.saturating_mul(1000)),
                lease: Duration::from_millis(u64::try_from(row.lease_ms).unwrap_or(0)),
                expired: row.expired,
            })
            .collect())
    }

    async fn record(conn: &mut Conn, outcomes: &[Outcome], retain: bool) -> QueryResult<Recorded> {
        let (done, other) = split_done(outcomes);
        let other: Vec<(DeliveryKey, UpdateRow)> = other
            .into_iter()
            .map(|o| (o.key, UpdateRow::new(&o.resolution)))
            .collect();
        conn.spawn_blocking(move |c| {
            c.immediate_transaction(|c| {
                let mut recorded = Recorded::default();
                for key in &done {
                    recorded.applied += query(if retain { MARK_DONE } else { DELETE_DONE })
                        .bind::<BigInt, _>(key.event_id.get())
                        .bind::<Text, _>(key.listener)
                        .bind::<Integer, _>(attempt_i32(key.attempt))
                        .execute(c)?;
                }
                for (key, row) in &other {
                    let died: Option<DiedRow> = query(UPDATE_FAILED)
                        .bind::<BigInt, _>(key.event_id.get())
                        .bind::<Text, _>(key.listener)
                        .bind::<Integer, _>(attempt_i32(key.attempt))
                        .bind::<BigInt, _>(i64::from(row.undo_attempt))
                        .bind::<BigInt, _>(row.delay_us / 1000)
                        .bind::<Nullable<Text>, _>(row.dead_reason)
                        .bind::<Nullable<Text>, _>(row.error.as_deref())
                        .get_result(c)
                        .map(Some)
                        .or_else(not_found_as_none)?;
                    if let Some(died) = died {
                        recorded.applied += 1;
                        recorded.died.extend(died_from_row(died));
                    }
                }
                Ok(recorded)
            })
        })
        .await
    }

    async fn expire(
        conn: &mut Conn,
        known: &[&'static str],
        limit: usize,
    ) -> QueryResult<Vec<Died>> {
        let known = json_list(known);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        conn.spawn_blocking(move |c| {
            let rows: Vec<DiedRow> = query(EXPIRE)
                .bind::<Text, _>(&known)
                .bind::<BigInt, _>(limit)
                .load(c)?;
            Ok(rows.into_iter().filter_map(died_from_row).collect())
        })
        .await
    }

    async fn orphans(
        conn: &mut Conn,
        known: &[&'static str],
        limit: usize,
    ) -> QueryResult<Vec<(String, i64)>> {
        let known = json_list(known);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        conn.spawn_blocking(move |c| {
            let rows: Vec<ListenerCountRow> = query(ORPHANS)
                .bind::<Text, _>(&known)
                .bind::<BigInt, _>(limit)
                .load(c)?;
            Ok(rows.into_iter().map(|r| (r.listener, r.n)).collect())
        })
        .await
    }

    async fn reserve_message(
        conn: &mut Conn,
        id: &MessageId,
        window: Duration,
    ) -> QueryResult<bool> {
        inbox::reserve(conn, id, window).await
    }

    async fn purge_inbox(conn: &mut Conn, window: Duration, limit: usize) -> QueryResult<usize> {
        inbox::purge(conn, window, limit).await
    }

    async fn complete_in_transaction(
        conn: &mut Conn,
        event_id: i64,
        listener: &'static str,
        attempt: i32,
        retain: bool,
    ) -> QueryResult<bool> {
        inbox::complete(conn, event_id, listener, attempt, retain).await
    }

    async fn stats(conn: &mut Conn) -> QueryResult<StatsRows> {
        ops::stats(conn).await
    }

    async fn dead_letters(
        conn: &mut Conn,
        filter: &DeadFilter<'_>,
        limit: usize,
    ) -> QueryResult<Vec<DeadRow>> {
        ops::dead_letters(conn, filter, limit).await
    }

    async fn replay(
        conn: &mut Conn,
        filter: &DeadFilter<'_>,
        after: &DeliveryRef,
        limit: usize,
    ) -> QueryResult<Vec<DeliveryRef>> {
        ops::replay(conn, filter, after, limit).await
    }

    async fn purge_dead(conn: &mut Conn, older_than: Duration, limit: usize) -> QueryResult<usize> {
        ops::purge_dead(conn, older_than, limit).await
    }

    async fn cleanup(
        conn: &mut Conn,
        retention: Retention,
        limit: usize,
        max_batches: usize,
    ) -> QueryResult<Option<usize>> {
        ops::cleanup(conn, retention, limit, max_batches).await
    }

    async fn release_stale(conn: &mut Conn) -> QueryResult<usize> {
        ops::release_stale(conn).await
    }

    async fn store_message(conn: &mut Conn, id: &MessageId, payload: &str) -> QueryResult<bool> {
        inbox::store(conn, id, payload).await
    }

    async fn next_message(conn: &mut Conn, lease: Duration) -> QueryResult<Option<StoredMessage>> {
        inbox::next(conn, lease).await
    }

    async fn delete_message(conn: &mut Conn, id: &MessageId, deliveries: i32) -> QueryResult<bool> {
        inbox::delete(conn, id, deliveries).await
    }

    async fn message_count(conn: &mut Conn) -> QueryResult<i64> {
        inbox::count(conn).await
    }

    async fn migrate(conn: &mut Conn) -> Result<Vec<String>, Error> {
        // The immediate transaction is the lock: concurrent starts wait on SQLite's writer lock.
        conn.spawn_blocking(|c| {
            Ok(c.immediate_transaction(|c| {
                c.batch_execute(CREATE_MIGRATIONS_TABLE)?;
                let done: Vec<VersionRow> =
                    query("SELECT version FROM txbus_migrations").load(c)?;
                let done: Vec<String> = done.into_iter().map(|row| row.version).collect();
                let mut applied = Vec::new();
                for migration in migrate::pending(migrate::SQLITE, &done) {
                    c.batch_execute(migration.up)
                        .and_then(|()| {
                            query("INSERT INTO txbus_migrations (version, name) VALUES (?, ?)")
                                .bind::<Text, _>(migration.version)
                                .bind::<Text, _>(migration.name)
                                .execute(c)
                        })
                        .map_err(|source| Error::Migration {
                            version: migration.version.to_owned(),
                            source,
                        })?;
                    applied.push(migration.version.to_owned());
                }
                Ok::<_, Error>(applied)
            }))
        })
        .await?
    }
}

/// An event's deliveries, ready to be written on the blocking pool.
struct EventRow {
    name: &'static str,
    payload: Arc<str>,
    lease: i64,
    expires: i64,
    listeners: Option<String>,
}

impl EventRow {
    fn new(event: &NewEvent) -> Self {
        Self {
            name: event.name,
            payload: event.payload.clone(),
            lease: lease_ms(event.lease),
            expires: millis(event.expires_after),
            listeners: (!event.listeners.is_empty()).then(|| json_list(&event.listeners)),
        }
    }

    /// Takes the next event id and writes one delivery per listener, in the open transaction.
    fn insert(self, c: &mut SqliteConnection) -> QueryResult<Inserted> {
        let id: IdRow = query(NEXT_EVENT_ID).get_result(c)?;
        if let Some(listeners) = &self.listeners {
            query(INSERT_EVENT)
                .bind::<BigInt, _>(id.id)
                .bind::<Text, _>(self.name)
                .bind::<Text, _>(&*self.payload)
                .bind::<BigInt, _>(id.now)
                .bind::<BigInt, _>(self.lease)
                .bind::<BigInt, _>(self.expires)
                .bind::<Text, _>(listeners)
                .execute(c)?;
        }
        Ok(Inserted {
            id: EventId::new(id.id),
            emitted_at: system_time_from_micros(id.now.saturating_mul(1000)),
        })
    }
}

fn not_found_as_none<T>(error: diesel::result::Error) -> QueryResult<Option<T>> {
    match error {
        diesel::result::Error::NotFound => Ok(None),
        other => Err(other),
    }
}

fn died_from_row(row: DiedRow) -> Option<Died> {
    Some(Died {
        event_id: EventId::new(row.event_id),
        listener: row.listener,
        reason: row.dead_reason?,
    })
}

/// A JSON array of strings, for `json_each`.
fn json_list(items: &[&str]) -> String {
    serde_json::Value::from(items.to_vec()).to_string()
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn lease_ms(lease: Duration) -> i64 {
    millis(lease).max(1)
}
