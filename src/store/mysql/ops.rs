//! MySQL / MariaDB: statistics, dead letters, replay, retention, stale leases.
//!
//! Every statement on pending or dead deliveries says `delivered_at IS NULL`: it leads the one
//! index `txbus_deliveries_due (delivered_at, dead_at, available_at)`, which stands in for the
//! partial indexes MySQL does not have.

use std::time::Duration;

use diesel::QueryResult;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel_async::{AsyncConnection, AsyncMysqlConnection, RunQueryDsl, SimpleAsyncConnection};

use super::{KeyRow, LockRow, READ_COMMITTED, key_json, query};
use crate::store::{
    DeadFilter, DeadRow, DeliveryRef, Retention, StatsRow, StatsRows, limit_i64, micros,
};

// Every pending delivery is in exactly one of due, running, stale, retrying. SUM is DECIMAL in
// MySQL: cast, so that it reads as BIGINT. UTC_TIMESTAMP is fixed for the whole statement.
const STATS: &str = "\
SELECT s.listener, s.due, s.running, s.stale, s.retrying, s.dead, s.delivered, s.oldest_us,
       i.n AS inbox_ids, m.n AS inbox_messages,
       TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) AS now_us
FROM (SELECT count(*) AS n FROM txbus_inbox) i
CROSS JOIN (SELECT count(*) AS n FROM txbus_inbox_messages) m
LEFT JOIN (
    SELECT listener,
           CAST(SUM(CASE WHEN pending AND leased_at IS NULL AND available_at <= UTC_TIMESTAMP(6)
                         THEN 1 ELSE 0 END) AS SIGNED) AS due,
           CAST(SUM(CASE WHEN pending AND leased_at IS NOT NULL
                              AND available_at > UTC_TIMESTAMP(6)
                         THEN 1 ELSE 0 END) AS SIGNED) AS running,
           CAST(SUM(CASE WHEN pending AND leased_at IS NOT NULL
                              AND available_at <= UTC_TIMESTAMP(6)
                         THEN 1 ELSE 0 END) AS SIGNED) AS stale,
           CAST(SUM(CASE WHEN pending AND leased_at IS NULL AND available_at > UTC_TIMESTAMP(6)
                         THEN 1 ELSE 0 END) AS SIGNED) AS retrying,
           count(dead_at) AS dead,
           count(delivered_at) AS delivered,
           TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00',
                         MIN(CASE WHEN pending THEN emitted_at END)) AS oldest_us
    FROM (SELECT listener, leased_at, available_at, dead_at, delivered_at, emitted_at,
                 dead_at IS NULL AND delivered_at IS NULL AS pending
          FROM txbus_deliveries) d
    GROUP BY listener) s ON TRUE";

/// The conditions of a [`DeadFilter`], on `?1` to `?5` (a NULL sets no condition). The times
/// are clamped to the `DATETIME` range by [`bind_filter!`], so that they never overflow to NULL.
macro_rules! dead_filter {
    () => {
        "delivered_at IS NULL AND dead_at IS NOT NULL
  AND (?1 IS NULL OR event_id = ?1)
  AND (?2 IS NULL OR listener = ?2)
  AND (?3 IS NULL OR event_name = ?3)
  AND (?4 IS NULL OR dead_at >= TIMESTAMP '1970-01-01 00:00:00' + INTERVAL ?4 MICROSECOND)
  AND (?5 IS NULL OR dead_at < TIMESTAMP '1970-01-01 00:00:00' + INTERVAL ?5 MICROSECOND)"
    };
}

// utf8mb4_bin pads with spaces when it compares ('a' sorts after 'a\t'): the listener is
// compared and ordered as bytes, as Rust orders strings.
const DEAD_LETTERS: &str = concat!(
    "\
SELECT event_id, event_name, listener, attempts, COALESCE(dead_reason, '') AS reason, last_error,
       TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', emitted_at) AS emitted_at_us,
       TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', dead_at) AS dead_at_us, payload
FROM txbus_deliveries
WHERE ",
    dead_filter!(),
    "
ORDER BY dead_at DESC, event_id DESC, CAST(listener AS BINARY)
LIMIT ?6"
);

// Keyset pages in byte order of the listener, as Rust orders strings (see DEAD_LETTERS). Locks
// the rows it returns until the update after it.
const REPLAY_SELECT: &str = concat!(
    "\
SELECT event_id, listener FROM txbus_deliveries
WHERE ",
    dead_filter!(),
    "
  AND (event_id > ?6 OR (event_id = ?6 AND CAST(listener AS BINARY) > CAST(?7 AS BINARY)))
ORDER BY event_id, CAST(listener AS BINARY)
LIMIT ?8
FOR UPDATE"
);

// No assignment reads a column another one sets, so their order does not matter.
const REPLAY_UPDATE: &str = concat!(
    "UPDATE txbus_deliveries d
    JOIN ",
    super::keys_table!(),
    " ON d.event_id = k.event_id AND d.listener = k.listener
    SET d.dead_at = NULL, d.dead_reason = NULL, d.leased_at = NULL,
        d.available_at = UTC_TIMESTAMP(6),
        d.expires_at = UTC_TIMESTAMP(6)
                       + INTERVAL TIMESTAMPDIFF(MICROSECOND, d.emitted_at, d.expires_at) MICROSECOND
    WHERE d.delivered_at IS NULL AND d.dead_at IS NOT NULL"
);

// Bounded and oldest first, a range of the index. Ordered by the index's columns: MariaDB reads
// `ORDER BY dead_at` alone from it only after sorting every row of the range.
const PURGE_DEAD: &str = "\
DELETE FROM txbus_deliveries
WHERE delivered_at IS NULL AND dead_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND
ORDER BY delivered_at, dead_at
LIMIT ?";

const PURGE_DELIVERED: &str = "\
DELETE FROM txbus_deliveries
WHERE delivered_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND
ORDER BY delivered_at
LIMIT ?";

// A session lock, keyed by database like the migrations' lock (names are at most 64 characters:
// hash the database name). 1 when taken, 0 when another session holds it.
const TRY_LOCK_CLEANUP: &str =
    "SELECT GET_LOCK(CONCAT('txbus.cleanup.', MD5(COALESCE(DATABASE(), ''))), 0) AS n";
const UNLOCK_CLEANUP: &str =
    "SELECT RELEASE_LOCK(CONCAT('txbus.cleanup.', MD5(COALESCE(DATABASE(), '')))) AS n";

// Selected first, then updated by key: an UPDATE that sets `available_at`, a column of the index,
// is planned by MariaDB as a scan of the whole table. Rows another transaction holds are skipped:
// a claim leases them anew, a result write releases them itself.
const STALE_SELECT: &str = "\
SELECT event_id, listener FROM txbus_deliveries
WHERE delivered_at IS NULL AND dead_at IS NULL AND available_at <= UTC_TIMESTAMP(6)
  AND leased_at IS NOT NULL
LIMIT ?
FOR UPDATE SKIP LOCKED";

const STALE_UPDATE: &str = concat!(
    "UPDATE txbus_deliveries d
    JOIN ",
    super::keys_table!(),
    " ON d.event_id = k.event_id AND d.listener = k.listener
    SET d.leased_at = NULL, d.available_at = UTC_TIMESTAMP(6),
        d.last_error = COALESCE(d.last_error, 'its lease passed without a result')"
);

/// Stale deliveries released per transaction.
const STALE_BATCH: usize = 1000;

/// `TIMESTAMPDIFF(MICROSECOND, '1970-01-01', '1000-01-01')`: the start of the `DATETIME` range.
const DATETIME_MIN_US: i64 = -30_610_224_000_000_000;
/// `TIMESTAMPDIFF(MICROSECOND, '1970-01-01', '9999-12-31 23:59:59.999999')`: its end.
const DATETIME_MAX_US: i64 = 253_402_300_799_999_999;

pub(super) async fn stats(conn: &mut AsyncMysqlConnection) -> QueryResult<StatsRows> {
    let rows: Vec<StatsRow> = query(STATS).load(conn).await?;
    Ok(StatsRows::from_rows(rows))
}

/// A time bound of a filter, within the `DATETIME` range: past its ends, MySQL's date arithmetic
/// gives NULL, which would match nothing instead of everything.
fn datetime_us(us: Option<i64>) -> Option<i64> {
    us.map(|us| us.clamp(DATETIME_MIN_US, DATETIME_MAX_US))
}

/// Binds a [`DeadFilter`] to `?1` to `?5`.
macro_rules! bind_filter {
    ($query:expr, $filter:expr) => {
        $query
            .bind::<Nullable<BigInt>, _>($filter.event_id)
            .bind::<Nullable<Text>, _>($filter.listener)
            .bind::<Nullable<Text>, _>($filter.event_name)
            .bind::<Nullable<BigInt>, _>(datetime_us($filter.died_after_us))
            .bind::<Nullable<BigInt>, _>(datetime_us($filter.died_before_us))
    };
}

pub(super) async fn dead_letters(
    conn: &mut AsyncMysqlConnection,
    filter: &DeadFilter<'_>,
    limit: usize,
) -> QueryResult<Vec<DeadRow>> {
    let rows: Vec<DeadRow> = bind_filter!(query(DEAD_LETTERS), filter)
        .bind::<BigInt, _>(limit_i64(limit))
        .load(conn)
        .await?;
    Ok(rows)
}

// MySQL has no RETURNING: the keys are selected and locked first, then updated by key, in one
// short transaction at READ COMMITTED (like the claim: no gap locks that would hold up emits).
pub(super) async fn replay(
    conn: &mut AsyncMysqlConnection,
    filter: &DeadFilter<'_>,
    after: &DeliveryRef,
    limit: usize,
) -> QueryResult<Vec<DeliveryRef>> {
    conn.batch_execute(READ_COMMITTED).await?;
    let keys: Vec<KeyRow> = conn
        .transaction(async |conn| {
            let keys: Vec<KeyRow> = bind_filter!(query(REPLAY_SELECT), filter)
                .bind::<BigInt, _>(after.event_id)
                .bind::<Text, _>(after.listener.as_str())
                .bind::<BigInt, _>(limit_i64(limit))
                .load(conn)
                .await?;
            if !keys.is_empty() {
                query(REPLAY_UPDATE)
                    .bind::<Text, _>(key_json(
                        keys.iter().map(|k| (k.event_id, k.listener.as_str())),
                    ))
                    .execute(conn)
                    .await?;
            }
            QueryResult::Ok(keys)
        })
        .await?;
    Ok(keys
        .into_iter()
        .map(|k| DeliveryRef {
            event_id: k.event_id,
            listener: k.listener,
        })
        .collect())
}

pub(super) async fn purge_dead(
    conn: &mut AsyncMysqlConnection,
    older_than: Duration,
    limit: usize,
) -> QueryResult<usize> {
    purge(conn, PURGE_DEAD, older_than, limit).await
}

/// One bounded delete, at READ COMMITTED: it locks the rows it deletes and no gaps.
async fn purge(
    conn: &mut AsyncMysqlConnection,
    statement: &'static str,
    older_than: Duration,
    limit: usize,
) -> QueryResult<usize> {
    conn.batch_execute(READ_COMMITTED).await?;
    query(statement)
        .bind::<BigInt, _>(micros(older_than))
        .bind::<BigInt, _>(limit_i64(limit))
        .execute(conn)
        .await
}

// GET_LOCK is held by the session, not a transaction, so it is released by hand: after the
// deletes, whatever their result, as long as the connection still works (if it broke, the
// session ends and the lock with it). Each delete commits by itself, so a long round holds no
// row locks between statements.
pub(super) async fn cleanup(
    conn: &mut AsyncMysqlConnection,
    retention: Retention,
    limit: usize,
    max_batches: usize,
) -> QueryResult<Option<usize>> {
    let locked: LockRow = query(TRY_LOCK_CLEANUP).get_result(conn).await?;
    if locked.n != Some(1) {
        return Ok(None);
    }
    let result = purge_old(conn, retention, limit, max_batches).await;
    let unlocked = query(UNLOCK_CLEANUP).get_result::<LockRow>(conn).await;
    let deleted = result?;
    unlocked?;
    Ok(Some(deleted))
}

/// The deletes of a retention round: delivered deliveries, then dead letters, each in up to
/// `max_batches` statements of `limit` rows, stopping early when one finds fewer.
async fn purge_old(
    conn: &mut AsyncMysqlConnection,
    retention: Retention,
    limit: usize,
    max_batches: usize,
) -> QueryResult<usize> {
    let mut deleted = 0;
    for (statement, older_than) in [
        (PURGE_DELIVERED, retention.delivered),
        (PURGE_DEAD, retention.dead),
    ] {
        for _ in 0..max_batches {
            let n = purge(conn, statement, older_than, limit).await?;
            deleted += n;
            if n < limit {
                break;
            }
        }
    }
    Ok(deleted)
}

// In batches, each a short transaction at READ COMMITTED (like the claim: no gap locks that would
// hold up emits), until one finds fewer than a batch: a released delivery is no longer stale, so
// no batch finds it again.
pub(super) async fn release_stale(conn: &mut AsyncMysqlConnection) -> QueryResult<usize> {
    let mut released = 0;
    loop {
        conn.batch_execute(READ_COMMITTED).await?;
        let n = conn
            .transaction(async |conn| {
                let keys: Vec<KeyRow> = query(STALE_SELECT)
                    .bind::<BigInt, _>(limit_i64(STALE_BATCH))
                    .load(conn)
                    .await?;
                if !keys.is_empty() {
                    query(STALE_UPDATE)
                        .bind::<Text, _>(key_json(
                            keys.iter().map(|k| (k.event_id, k.listener.as_str())),
                        ))
                        .execute(conn)
                        .await?;
                }
                QueryResult::Ok(keys.len())
            })
            .await?;
        released += n;
        if n < STALE_BATCH {
            return Ok(released);
        }
    }
}
