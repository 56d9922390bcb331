//! MySQL 8 and MariaDB ≥ 10.6: `AsyncMysqlConnection`, claims in one short transaction
//! (`SELECT ... FOR UPDATE SKIP LOCKED`, then `UPDATE`), lists passed as one JSON parameter
//! and opened with `JSON_TABLE`, times as `DATETIME(6)` in UTC.

use crate::store::rows::{ClaimedRow, ListenerCountRow, VersionRow};
use std::time::Duration;

use diesel::QueryResult;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{
    AnsiTransactionManager, AsyncConnection, AsyncMysqlConnection, RunQueryDsl,
    SimpleAsyncConnection, TransactionManager,
};
use serde_json::json;

use super::sql::{Sql, sql};

mod inbox;
mod ops;
use super::{
    Backend, Claimed, DeadFilter, DeadRow, DeliveryKey, DeliveryRef, Died, Inserted, NewEvent,
    Outcome, Recorded, Retention, Sealed, StatsRows, StoredMessage, UpdateRow, attempt_i32,
    attempt_u32, micros, split_done, system_time_from_micros,
};
use crate::migrate;
use crate::{Error, EventId, MessageId};

/// A statement of this backend that diesel caches as a prepared statement.
fn query<'a>(text: &'static str) -> Sql<'a, diesel::mysql::Mysql> {
    sql(text)
}

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

/// Opens a JSON array of `[event_id, listener]` pairs as a table `k`.
macro_rules! keys_table {
    () => {
        "JSON_TABLE(?, '$[*]' COLUMNS (
            event_id BIGINT PATH '$[0]',
            listener VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[1]')) k"
    };
}
// For the statements of `ops`.
use keys_table;

/// Claims, sweeps, result writes and deletes read and lock only the rows they change: no gap
/// locks that would hold up concurrent emits. Applies to the next transaction (or statement) only.
const READ_COMMITTED: &str = "SET TRANSACTION ISOLATION LEVEL READ COMMITTED";

const NEXT_EVENT_ID: &str = "INSERT INTO txbus_event_ids () VALUES ()";

const LOAD_EVENT_ID: &str = "\
SELECT CAST(LAST_INSERT_ID() AS SIGNED) AS id,
       TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) AS emitted_at_us";

const INSERT_EVENT: &str = concat!(
    "INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, lease_ms,
                                   attempts, leased_at, available_at, expires_at)
    SELECT ?, j.listener, ?, ?, e.t, ?, 1, e.t, e.t + INTERVAL ? MICROSECOND,
           e.t + INTERVAL ? MICROSECOND
    FROM (SELECT TIMESTAMPADD(MICROSECOND, ?, '1970-01-01 00:00:00') AS t) e CROSS JOIN ",
    listeners_table!()
);

const CLAIM_SELECT: &str = concat!(
    "SELECT event_id, listener FROM txbus_deliveries
    WHERE delivered_at IS NULL AND dead_at IS NULL AND available_at <= UTC_TIMESTAMP(6)
      AND listener IN (SELECT listener FROM ",
    listeners_table!(),
    ")
    ORDER BY available_at
    LIMIT ?
    FOR UPDATE SKIP LOCKED"
);

// Expired deliveries are made dead instead of leased. Every CASE tests `expires_at`, which no
// assignment changes, so the (unspecified) order of multi-table assignments does not matter.
const CLAIM_UPDATE: &str = concat!(
    "UPDATE txbus_deliveries d
    JOIN ",
    keys_table!(),
    " ON d.event_id = k.event_id AND d.listener = k.listener
    SET d.dead_reason = CASE WHEN d.expires_at <= UTC_TIMESTAMP(6) THEN 'expired' END,
        d.dead_at = CASE WHEN d.expires_at <= UTC_TIMESTAMP(6) THEN UTC_TIMESTAMP(6) END,
        d.attempts = CASE WHEN d.expires_at <= UTC_TIMESTAMP(6) THEN d.attempts
                          ELSE d.attempts + 1 END,
        d.leased_at = CASE WHEN d.expires_at <= UTC_TIMESTAMP(6) THEN NULL
                           ELSE UTC_TIMESTAMP(6) END,
        d.available_at = CASE WHEN d.expires_at <= UTC_TIMESTAMP(6) THEN d.available_at
                              ELSE UTC_TIMESTAMP(6) + INTERVAL d.lease_ms * 1000 MICROSECOND END"
);

const CLAIM_LOAD: &str = concat!(
    "SELECT d.event_id, d.listener, d.attempts, d.payload,
           TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', d.emitted_at) AS emitted_at_us,
           d.lease_ms, d.dead_at IS NOT NULL AS expired
    FROM txbus_deliveries d
    JOIN ",
    keys_table!(),
    " ON d.event_id = k.event_id AND d.listener = k.listener"
);

const DELETE_DONE: &str = "\
DELETE d FROM txbus_deliveries d
JOIN JSON_TABLE(?, '$[*]' COLUMNS (
    event_id BIGINT PATH '$[0]',
    listener VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[1]',
    attempts INT PATH '$[2]')) k
  ON d.event_id = k.event_id AND d.listener = k.listener AND d.attempts = k.attempts
WHERE d.delivered_at IS NULL AND d.dead_at IS NULL";

const MARK_DONE: &str = "\
UPDATE txbus_deliveries d
JOIN JSON_TABLE(?, '$[*]' COLUMNS (
    event_id BIGINT PATH '$[0]',
    listener VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[1]',
    attempts INT PATH '$[2]')) k
  ON d.event_id = k.event_id AND d.listener = k.listener AND d.attempts = k.attempts
SET d.delivered_at = UTC_TIMESTAMP(6), d.leased_at = NULL
WHERE d.delivered_at IS NULL AND d.dead_at IS NULL";

/// Opens the JSON array of failed results as a table `x`.
macro_rules! failed_table {
    () => {
        "JSON_TABLE(?1, '$[*]' COLUMNS (
            event_id BIGINT PATH '$.e',
            listener VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$.l',
            attempts INT PATH '$.a',
            delay_us BIGINT PATH '$.d',
            reason VARCHAR(32) PATH '$.r',
            error LONGTEXT CHARACTER SET utf8mb4 PATH '$.m',
            undo_attempt INT PATH '$.u')) x"
    };
}

// MySQL has no RETURNING, and a dead row read back after the update could have been dead before
// (a stale result, fenced off). So the deliveries the results still hold are locked first, and
// which of them die is decided there at one instant, `now_us`, which the update then uses too:
// the deaths reported are exactly the ones written.
const LOCK_FAILED: &str = concat!(
    "SELECT t.event_id, t.listener,
           CASE WHEN x.reason IS NOT NULL THEN x.reason
                WHEN UTC_TIMESTAMP(6) + INTERVAL x.delay_us MICROSECOND >= t.expires_at
                THEN 'expired' END AS dead_reason,
           TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) AS now_us
    FROM txbus_deliveries t
    JOIN ",
    failed_table!(),
    " ON t.event_id = x.event_id AND t.listener = x.listener AND t.attempts = x.attempts
    WHERE t.delivered_at IS NULL AND t.dead_at IS NULL
    FOR UPDATE"
);

// `?2` is the instant of LOCK_FAILED. Every CASE tests `expires_at` and `x`, which no assignment
// changes, so the (unspecified) order of multi-table assignments does not matter.
const UPDATE_FAILED: &str = concat!(
    "UPDATE txbus_deliveries t
    JOIN ",
    failed_table!(),
    " ON t.event_id = x.event_id AND t.listener = x.listener AND t.attempts = x.attempts
    CROSS JOIN (SELECT TIMESTAMP '1970-01-01 00:00:00' + INTERVAL ?2 MICROSECOND AS now_at) n
    SET t.last_error = COALESCE(x.error, t.last_error),
        t.leased_at = NULL,
        t.dead_reason = CASE WHEN x.reason IS NOT NULL THEN x.reason
                             WHEN n.now_at + INTERVAL x.delay_us MICROSECOND >= t.expires_at
                             THEN 'expired' END,
        t.dead_at = CASE WHEN x.reason IS NOT NULL
                           OR n.now_at + INTERVAL x.delay_us MICROSECOND >= t.expires_at
                         THEN n.now_at END,
        t.available_at = n.now_at + INTERVAL x.delay_us MICROSECOND,
        t.attempts = t.attempts - x.undo_attempt
    WHERE t.delivered_at IS NULL AND t.dead_at IS NULL"
);

const EXPIRE_SELECT: &str = concat!(
    "SELECT event_id, listener FROM txbus_deliveries
    WHERE delivered_at IS NULL AND dead_at IS NULL AND available_at <= UTC_TIMESTAMP(6)
      AND expires_at <= UTC_TIMESTAMP(6)
      AND listener NOT IN (SELECT listener FROM ",
    listeners_table!(),
    ")
    LIMIT ?
    FOR UPDATE SKIP LOCKED"
);

const EXPIRE_UPDATE: &str = concat!(
    "UPDATE txbus_deliveries d
    JOIN ",
    keys_table!(),
    " ON d.event_id = k.event_id AND d.listener = k.listener
    SET d.dead_at = UTC_TIMESTAMP(6),
        d.dead_reason = 'no_listener',
        d.leased_at = NULL,
        d.last_error = COALESCE(d.last_error, CONCAT('no running instance has listener ', d.listener))"
);

const ORPHANS: &str = concat!(
    "SELECT listener, count(*) AS n FROM (
        SELECT listener FROM txbus_deliveries
        WHERE delivered_at IS NULL AND dead_at IS NULL AND available_at <= UTC_TIMESTAMP(6)
          AND listener NOT IN (SELECT listener FROM ",
    listeners_table!(),
    ")
        LIMIT ?) due
    GROUP BY listener ORDER BY listener"
);

// GET_LOCK names are at most 64 characters: hash the database name.
const LOCK_MIGRATIONS: &str =
    "SELECT GET_LOCK(CONCAT('txbus.migrate.', MD5(COALESCE(DATABASE(), ''))), 600) AS n";
const UNLOCK_MIGRATIONS: &str =
    "SELECT RELEASE_LOCK(CONCAT('txbus.migrate.', MD5(COALESCE(DATABASE(), '')))) AS n";
const CREATE_MIGRATIONS_TABLE: &str = "\
CREATE TABLE IF NOT EXISTS txbus_migrations (
    version VARCHAR(32) NOT NULL PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    applied_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin";

#[derive(diesel::QueryableByName)]
struct InsertedRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = BigInt)]
    emitted_at_us: i64,
}

#[derive(diesel::QueryableByName)]
struct KeyRow {
    #[diesel(sql_type = BigInt)]
    event_id: i64,
    #[diesel(sql_type = Text)]
    listener: String,
}

/// A delivery LOCK_FAILED holds for a result, and whether the result makes it dead.
#[derive(diesel::QueryableByName)]
struct HeldRow {
    #[diesel(sql_type = BigInt)]
    event_id: i64,
    #[diesel(sql_type = Text)]
    listener: String,
    #[diesel(sql_type = Nullable<Text>)]
    dead_reason: Option<String>,
    #[diesel(sql_type = BigInt)]
    now_us: i64,
}

#[derive(diesel::QueryableByName)]
struct LockRow {
    #[diesel(sql_type = Nullable<BigInt>)]
    n: Option<i64>,
}

#[derive(diesel::QueryableByName)]
struct IdRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

impl Backend for Mysql {
    type Connection = AsyncMysqlConnection;

    type Manager = AsyncDieselConnectionManager<AsyncMysqlConnection>;

    const NAME: &'static str = "mysql";

    fn manager(url: &str) -> Result<Self::Manager, Error> {
        let mut config = ManagerConfig::default();
        config.recycling_method = RecyclingMethod::Fast;
        Ok(AsyncDieselConnectionManager::new_with_config(url, config))
    }

    async fn begin(conn: &mut AsyncMysqlConnection) -> QueryResult<()> {
        AnsiTransactionManager::begin_transaction(conn).await
    }

    async fn insert_event(
        conn: &mut AsyncMysqlConnection,
        event: &NewEvent,
    ) -> QueryResult<Inserted> {
        query(NEXT_EVENT_ID).execute(conn).await?;
        let row: InsertedRow = query(LOAD_EVENT_ID).get_result(conn).await?;
        if !event.listeners.is_empty() {
            let lease = lease_ms(event.lease);
            query(INSERT_EVENT)
                .bind::<BigInt, _>(row.id)
                .bind::<Text, _>(event.name)
                .bind::<Text, _>(&*event.payload)
                .bind::<BigInt, _>(lease)
                .bind::<BigInt, _>(lease.saturating_mul(1000))
                .bind::<BigInt, _>(micros(event.expires_after))
                .bind::<BigInt, _>(row.emitted_at_us)
                .bind::<Text, _>(json!(&*event.listeners).to_string())
                .execute(conn)
                .await?;
        }
        Ok(Inserted {
            id: EventId::new(row.id),
            emitted_at: system_time_from_micros(row.emitted_at_us),
        })
    }

    // The deliveries go in one statement, atomic by itself; an id row without deliveries (a
    // failure between the two statements) is harmless and trimmed by `maintain`.
    async fn emit_alone(
        conn: &mut AsyncMysqlConnection,
        event: &NewEvent,
    ) -> QueryResult<Inserted> {
        Self::insert_event(conn, event).await
    }

    async fn claim(
        conn: &mut AsyncMysqlConnection,
        listeners: &[&'static str],
        limit: usize,
    ) -> QueryResult<Vec<Claimed>> {
        let listeners = json!(listeners).to_string();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        conn.batch_execute(READ_COMMITTED).await?;
        let rows: Vec<ClaimedRow> = conn
            .transaction(async |conn| {
                let keys: Vec<KeyRow> = query(CLAIM_SELECT)
                    .bind::<Text, _>(&listeners)
                    .bind::<BigInt, _>(limit)
                    .load(conn)
                    .await?;
                if keys.is_empty() {
                    return Ok(Vec::new());
                }
                let keys = key_json(keys.iter().map(|k| (k.event_id, k.listener.as_str())));
                query(CLAIM_UPDATE)
                    .bind::<Text, _>(&keys)
                    .execute(conn)
                    .await?;
                query(CLAIM_LOAD).bind::<Text, _>(&keys).load(conn).await
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| Claimed {
                event_id: EventId::new(row.event_id),
                listener: row.listener,
                attempt: attempt_u32(row.attempts),
                payload: row.payload.into(),
                emitted_at: system_time_from_micros(row.emitted_at_us),
                lease: Duration::from_millis(u64::try_from(row.lease_ms).unwrap_or(0)),
                expired: row.expired,
            })
            .collect())
    }

    async fn record(
        conn: &mut AsyncMysqlConnection,
        outcomes: &[Outcome],
        retain: bool,
    ) -> QueryResult<Recorded> {
        let (done, other) = split_done(outcomes);
        let mut recorded = Recorded::default();
        if !done.is_empty() {
            recorded.applied += finish_done(conn, &done, retain).await?;
        }
        if !other.is_empty() {
            let rows: Vec<serde_json::Value> = other
                .iter()
                .map(|o| {
                    let row = UpdateRow::new(&o.resolution);
                    json!({
                        "e": o.key.event_id.get(),
                        "l": o.key.listener,
                        "a": attempt_i32(o.key.attempt),
                        "d": row.delay_us,
                        "r": row.dead_reason,
                        "m": row.error,
                        "u": i32::from(row.undo_attempt),
                    })
                })
                .collect();
            let rows = json!(rows).to_string();
            conn.batch_execute(READ_COMMITTED).await?;
            let (applied, held) = conn
                .transaction(async |conn| {
                    let held: Vec<HeldRow> =
                        query(LOCK_FAILED).bind::<Text, _>(&rows).load(conn).await?;
                    let Some(now_us) = held.iter().map(|row| row.now_us).next() else {
                        // Every result is stale: nothing to write.
                        return Ok((0, held));
                    };
                    let applied = query(UPDATE_FAILED)
                        .bind::<Text, _>(&rows)
                        .bind::<BigInt, _>(now_us)
                        .execute(conn)
                        .await?;
                    QueryResult::Ok((applied, held))
                })
                .await?;
            recorded.applied += applied;
            recorded
                .died
                .extend(held.into_iter().filter_map(died_from_row));
        }
        Ok(recorded)
    }

    async fn expire(
        conn: &mut AsyncMysqlConnection,
        known: &[&'static str],
        limit: usize,
    ) -> QueryResult<Vec<Died>> {
        let known = json!(known).to_string();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        conn.batch_execute(READ_COMMITTED).await?;
        conn.transaction(async |conn| {
            let keys: Vec<KeyRow> = query(EXPIRE_SELECT)
                .bind::<Text, _>(&known)
                .bind::<BigInt, _>(limit)
                .load(conn)
                .await?;
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            query(EXPIRE_UPDATE)
                .bind::<Text, _>(key_json(
                    keys.iter().map(|k| (k.event_id, k.listener.as_str())),
                ))
                .execute(conn)
                .await?;
            Ok(keys
                .into_iter()
                .map(|k| Died {
                    event_id: EventId::new(k.event_id),
                    listener: k.listener,
                    reason: "no_listener".to_owned(),
                })
                .collect())
        })
        .await
    }

    async fn orphans(
        conn: &mut AsyncMysqlConnection,
        known: &[&'static str],
        limit: usize,
    ) -> QueryResult<Vec<(String, i64)>> {
        let rows: Vec<ListenerCountRow> = query(ORPHANS)
            .bind::<Text, _>(json!(known).to_string())
            .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
            .load(conn)
            .await?;
        Ok(rows.into_iter().map(|r| (r.listener, r.n)).collect())
    }

    async fn reserve_message(
        conn: &mut AsyncMysqlConnection,
        id: &MessageId,
        window: Duration,
    ) -> QueryResult<bool> {
        inbox::reserve(conn, id, window).await
    }

    async fn purge_inbox(
        conn: &mut AsyncMysqlConnection,
        window: Duration,
        limit: usize,
    ) -> QueryResult<usize> {
        inbox::purge(conn, window, limit).await
    }

    async fn complete_in_transaction(
        conn: &mut AsyncMysqlConnection,
        event_id: i64,
        listener: &'static str,
        attempt: i32,
        retain: bool,
    ) -> QueryResult<bool> {
        inbox::complete(conn, event_id, listener, attempt, retain).await
    }

    async fn stats(conn: &mut AsyncMysqlConnection) -> QueryResult<StatsRows> {
        ops::stats(conn).await
    }

    async fn dead_letters(
        conn: &mut AsyncMysqlConnection,
        filter: &DeadFilter<'_>,
        limit: usize,
    ) -> QueryResult<Vec<DeadRow>> {
        ops::dead_letters(conn, filter, limit).await
    }

    async fn replay(
        conn: &mut AsyncMysqlConnection,
        filter: &DeadFilter<'_>,
        after: &DeliveryRef,
        limit: usize,
    ) -> QueryResult<Vec<DeliveryRef>> {
        ops::replay(conn, filter, after, limit).await
    }

    async fn purge_dead(
        conn: &mut AsyncMysqlConnection,
        older_than: Duration,
        limit: usize,
    ) -> QueryResult<usize> {
        ops::purge_dead(conn, older_than, limit).await
    }

    async fn cleanup(
        conn: &mut AsyncMysqlConnection,
        retention: Retention,
        limit: usize,
        max_batches: usize,
    ) -> QueryResult<Option<usize>> {
        ops::cleanup(conn, retention, limit, max_batches).await
    }

    async fn release_stale(conn: &mut AsyncMysqlConnection) -> QueryResult<usize> {
        ops::release_stale(conn).await
    }

    async fn store_message(
        conn: &mut AsyncMysqlConnection,
        id: &MessageId,
        payload: &str,
    ) -> QueryResult<bool> {
        inbox::store(conn, id, payload).await
    }

    async fn next_message(
        conn: &mut AsyncMysqlConnection,
        lease: Duration,
    ) -> QueryResult<Option<StoredMessage>> {
        inbox::next(conn, lease).await
    }

    async fn delete_message(
        conn: &mut AsyncMysqlConnection,
        id: &MessageId,
        deliveries: i32,
    ) -> QueryResult<bool> {
        inbox::delete(conn, id, deliveries).await
    }

    async fn message_count(conn: &mut AsyncMysqlConnection) -> QueryResult<i64> {
        inbox::count(conn).await
    }

    async fn maintain(conn: &mut AsyncMysqlConnection) -> QueryResult<()> {
        // Event ids come from AUTO_INCREMENT rows that are only needed for their counter; the
        // newest stays, so the counter survives even a server without a persistent one.
        let newest: IdRow = query("SELECT COALESCE(MAX(id), 0) AS id FROM txbus_event_ids")
            .get_result(conn)
            .await?;
        query("DELETE FROM txbus_event_ids WHERE id < ? LIMIT 10000")
            .bind::<BigInt, _>(newest.id)
            .execute(conn)
            .await?;
        Ok(())
    }

    async fn migrate(conn: &mut AsyncMysqlConnection) -> Result<Vec<String>, Error> {
        let locked: LockRow = query(LOCK_MIGRATIONS).get_result(conn).await?;
        if locked.n != Some(1) {
            return Err(Error::Config(
                "could not take the txbus migration lock (GET_LOCK) within 10 minutes; another \
                 process may be stuck migrating this database"
                    .to_owned(),
            ));
        }
        let result = apply_migrations(conn).await;
        // On a broken connection the session ends, and the lock with it.
        let unlocked = query(UNLOCK_MIGRATIONS).get_result::<LockRow>(conn).await;
        let applied = result?;
        unlocked?;
        Ok(applied)
    }
}

/// MySQL commits each DDL statement by itself, so every migration is a single statement and is
/// recorded right after it.
async fn apply_migrations(conn: &mut AsyncMysqlConnection) -> Result<Vec<String>, Error> {
    conn.batch_execute(CREATE_MIGRATIONS_TABLE).await?;
    let done: Vec<VersionRow> = query("SELECT version FROM txbus_migrations")
        .load(conn)
        .await?;
    let done: Vec<String> = done.into_iter().map(|row| row.version).collect();
    let mut applied = Vec::new();
    for migration in migrate::pending(migrate::MYSQL, &done) {
        let result = async {
            conn.batch_execute(migration.up).await?;
            query("INSERT INTO txbus_migrations (version, name) VALUES (?, ?)")
                .bind::<Text, _>(migration.version)
                .bind::<Text, _>(migration.name)
                .execute(conn)
                .await
        }
        .await;
        result.map_err(|source| Error::Migration {
            version: migration.version.to_owned(),
            source,
        })?;
        applied.push(migration.version.to_owned());
    }
    Ok(applied)
}

/// Deletes the successes, or marks them delivered with `retain`.
async fn finish_done(
    conn: &mut AsyncMysqlConnection,
    done: &[DeliveryKey],
    retain: bool,
) -> QueryResult<usize> {
    let keys = json!(
        done.iter()
            .map(|k| json!([k.event_id.get(), k.listener, attempt_i32(k.attempt)]))
            .collect::<Vec<_>>()
    )
    .to_string();
    conn.batch_execute(READ_COMMITTED).await?;
    query(if retain { MARK_DONE } else { DELETE_DONE })
        .bind::<Text, _>(&keys)
        .execute(conn)
        .await
}

/// A JSON array of `[event_id, listener]` pairs, for `keys_table!`.
fn key_json<'a>(keys: impl Iterator<Item = (i64, &'a str)>) -> String {
    json!(
        keys.map(|(id, listener)| json!([id, listener]))
            .collect::<Vec<_>>()
    )
    .to_string()
}

fn died_from_row(row: HeldRow) -> Option<Died> {
    Some(Died {
        event_id: EventId::new(row.event_id),
        listener: row.listener,
        reason: row.dead_reason?,
    })
}

fn lease_ms(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX).max(1)
}
