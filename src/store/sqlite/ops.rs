//! SQLite: statistics, dead letters, replay, retention, stale leases.
//!
//! Times are milliseconds since the Unix epoch in the table and microseconds in the trait's
//! types: the statements convert what they return, and the filters convert their bounds here,
//! so that the comparisons stay on the indexed columns.

use std::time::Duration;

use diesel::connection::{AnsiTransactionManager, TransactionManager};
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::sqlite::SqliteConnection;
use diesel::{QueryResult, RunQueryDsl};

use super::{Conn, millis, query};
use crate::store::{DeadFilter, DeadRow, DeliveryRef, Retention, StatsRow, StatsRows, limit_i64};

// Every pending delivery is in exactly one of due, running, stale, retrying. SQLite treats its
// clock as a constant of the statement (evaluated once, before the first row), so every count
// and `now_us` see the same time.
const STATS: &str = concat!(
    "SELECT s.listener, s.due, s.running, s.stale, s.retrying, s.dead, s.delivered, s.oldest_us,
       i.n AS inbox_ids, m.n AS inbox_messages, ",
    now_ms!(),
    " * 1000 AS now_us
FROM (SELECT count(*) AS n FROM txbus_inbox) i
CROSS JOIN (SELECT count(*) AS n FROM txbus_inbox_messages) m
LEFT JOIN (
    SELECT listener,
           count(*) FILTER (WHERE pending AND leased_at IS NULL AND available_at <= ",
    now_ms!(),
    ") AS due,
           count(*) FILTER (WHERE pending AND leased_at IS NOT NULL AND available_at > ",
    now_ms!(),
    ") AS running,
           count(*) FILTER (WHERE pending AND leased_at IS NOT NULL AND available_at <= ",
    now_ms!(),
    ") AS stale,
           count(*) FILTER (WHERE pending AND leased_at IS NULL AND available_at > ",
    now_ms!(),
    ") AS retrying,
           count(dead_at) AS dead,
           count(delivered_at) AS delivered,
           min(emitted_at) FILTER (WHERE pending) * 1000 AS oldest_us
    FROM (SELECT listener, leased_at, available_at, dead_at, delivered_at, emitted_at,
                 dead_at IS NULL AND delivered_at IS NULL AS pending
          FROM txbus_deliveries) d
    GROUP BY listener) s ON true"
);

/// The conditions of a [`DeadFilter`], on `?1` to `?5`: the time bounds in whole milliseconds
/// (see [`DeadBounds`]). `dead_at IS NOT NULL` stands alone so that the partial index applies.
macro_rules! dead_filter {
    () => {
        "dead_at IS NOT NULL
  AND (?1 IS NULL OR event_id = ?1)
  AND (?2 IS NULL OR listener = ?2)
  AND (?3 IS NULL OR event_name = ?3)
  AND (?4 IS NULL OR dead_at >= ?4)
  AND (?5 IS NULL OR dead_at < ?5)"
    };
}

const DEAD_LETTERS: &str = concat!(
    "SELECT event_id, event_name, listener, attempts, COALESCE(dead_reason, '') AS reason,
       last_error, emitted_at * 1000 AS emitted_at_us, dead_at * 1000 AS dead_at_us, payload
FROM txbus_deliveries
WHERE ",
    dead_filter!(),
    "
ORDER BY dead_at DESC, event_id DESC, listener
LIMIT ?6"
);

// Keyset pages in key order. The listener column has SQLite's default BINARY collation, which
// compares bytes, as Rust orders strings. The `IN` list is computed in full before the first row
// is updated, and one statement is atomic: no row is replayed twice, nor beyond the limit.
// The `BETWEEN` adds nothing to the conditions (the key comparison implies its lower bound, the
// filter its upper one), but gives SQLite a range of the primary key: the replay of one event's
// delivery seeks to it instead of scanning the table while holding the writer lock.
const REPLAY: &str = concat!(
    "UPDATE txbus_deliveries SET dead_at = NULL, dead_reason = NULL, leased_at = NULL,
    available_at = ",
    now_ms!(),
    ", expires_at = ",
    now_ms!(),
    " + (expires_at - emitted_at)
WHERE (event_id, listener) IN (
    SELECT event_id, listener FROM txbus_deliveries
    WHERE ",
    dead_filter!(),
    "
      AND (event_id, listener) > (?6, ?7)
      AND event_id BETWEEN COALESCE(?1, ?6) AND COALESCE(?1, 9223372036854775807)
    ORDER BY event_id, listener
    LIMIT ?8)
RETURNING event_id, listener"
);

// SQLite is built without `DELETE ... LIMIT`, and the table has no rowid: the bounded batch is
// chosen by key. The explicit `IS NOT NULL` lets the partial index serve the subquery.
const PURGE_DEAD: &str = concat!(
    "DELETE FROM txbus_deliveries WHERE (event_id, listener) IN (
    SELECT event_id, listener FROM txbus_deliveries
    WHERE dead_at IS NOT NULL AND dead_at < ",
    now_ms!(),
    " - ?1
    ORDER BY dead_at
    LIMIT ?2)"
);

const PURGE_DELIVERED: &str = concat!(
    "DELETE FROM txbus_deliveries WHERE (event_id, listener) IN (
    SELECT event_id, listener FROM txbus_deliveries
    WHERE delivered_at IS NOT NULL AND delivered_at < ",
    now_ms!(),
    " - ?1
    ORDER BY delivered_at
    LIMIT ?2)"
);

const RELEASE_STALE: &str = concat!(
    "UPDATE txbus_deliveries SET leased_at = NULL, available_at = ",
    now_ms!(),
    ",
    last_error = COALESCE(last_error, 'its lease passed without a result')
WHERE dead_at IS NULL AND delivered_at IS NULL AND leased_at IS NOT NULL
  AND available_at <= ",
    now_ms!()
);

/// A [`DeadFilter`], owned for the blocking pool, with its time bounds in milliseconds.
struct DeadBounds {
    event_id: Option<i64>,
    listener: Option<String>,
    event_name: Option<String>,
    died_after_ms: Option<i64>,
    died_before_ms: Option<i64>,
}

impl DeadBounds {
    /// A death time in whole milliseconds `m` is at or after `us` when `m * 1000 >= us`, and
    /// before it when `m * 1000 < us`: both when compared with `us / 1000` rounded up.
    fn new(filter: &DeadFilter<'_>) -> Self {
        Self {
            event_id: filter.event_id,
            listener: filter.listener.map(str::to_owned),
            event_name: filter.event_name.map(str::to_owned),
            died_after_ms: filter.died_after_us.map(ms_ceil),
            died_before_ms: filter.died_before_us.map(ms_ceil),
        }
    }
}

/// Microseconds to milliseconds, rounded up (toward positive infinity).
fn ms_ceil(us: i64) -> i64 {
    let ms = us.div_euclid(1000);
    if us.rem_euclid(1000) == 0 { ms } else { ms + 1 }
}

/// Binds a [`DeadBounds`] to `?1` to `?5`.
macro_rules! bind_filter {
    ($query:expr, $filter:expr) => {
        $query
            .bind::<Nullable<BigInt>, _>($filter.event_id)
            .bind::<Nullable<Text>, _>($filter.listener.as_deref())
            .bind::<Nullable<Text>, _>($filter.event_name.as_deref())
            .bind::<Nullable<BigInt>, _>($filter.died_after_ms)
            .bind::<Nullable<BigInt>, _>($filter.died_before_ms)
    };
}

pub(super) async fn stats(conn: &mut Conn) -> QueryResult<StatsRows> {
    let rows: Vec<StatsRow> = conn.spawn_blocking(|c| query(STATS).load(c)).await?;
    Ok(StatsRows::from_rows(rows))
}

pub(super) async fn dead_letters(
    conn: &mut Conn,
    filter: &DeadFilter<'_>,
    limit: usize,
) -> QueryResult<Vec<DeadRow>> {
    let (filter, limit) = (DeadBounds::new(filter), limit_i64(limit));
    let rows: Vec<DeadRow> = conn
        .spawn_blocking(move |c| {
            bind_filter!(query(DEAD_LETTERS), filter)
                .bind::<BigInt, _>(limit)
                .load(c)
        })
        .await?;
    Ok(rows)
}

pub(super) async fn replay(
    conn: &mut Conn,
    filter: &DeadFilter<'_>,
    after: &DeliveryRef,
    limit: usize,
) -> QueryResult<Vec<DeliveryRef>> {
    let (filter, limit) = (DeadBounds::new(filter), limit_i64(limit));
    let after = after.clone();
    let rows: Vec<DeliveryRef> = conn
        .spawn_blocking(move |c| {
            bind_filter!(query(REPLAY), filter)
                .bind::<BigInt, _>(after.event_id)
                .bind::<Text, _>(after.listener.as_str())
                .bind::<BigInt, _>(limit)
                .load(c)
        })
        .await?;
    Ok(rows)
}

pub(super) async fn purge_dead(
    conn: &mut Conn,
    older_than: Duration,
    limit: usize,
) -> QueryResult<usize> {
    let (older_than, limit) = (millis(older_than), limit_i64(limit));
    conn.spawn_blocking(move |c| purge(c, PURGE_DEAD, older_than, limit))
        .await
}

/// Runs one bounded purge: `older_than` in milliseconds.
fn purge(
    c: &mut SqliteConnection,
    statement: &'static str,
    older_than: i64,
    limit: i64,
) -> QueryResult<usize> {
    query(statement)
        .bind::<BigInt, _>(older_than)
        .bind::<BigInt, _>(limit)
        .execute(c)
}

// SQLite lets one transaction write at a time, and the round is one `BEGIN IMMEDIATE`
// transaction: rounds of several processes (or several buses on one file) take turns on the
// writer lock, waiting for it up to the busy timeout, and never delete at the same time. A round
// that waited then finds only what the other left, so there is never "another instance is
// running one" to report: this always returns `Some`. Past the busy timeout, BEGIN fails with
// "database is locked", an error like any other write's.
pub(super) async fn cleanup(
    conn: &mut Conn,
    retention: Retention,
    limit: usize,
    max_batches: usize,
) -> QueryResult<Option<usize>> {
    let delivered = millis(retention.delivered);
    let dead = millis(retention.dead);
    conn.spawn_blocking(move |c| {
        AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE")?;
        match cleanup_round(c, delivered, dead, limit, max_batches) {
            Ok(deleted) => {
                AnsiTransactionManager::commit_transaction(c)?;
                Ok(Some(deleted))
            }
            Err(error) => {
                // Keep the first error; a failed rollback leaves the connection broken, and the
                // pool drops it.
                let _ = AnsiTransactionManager::rollback_transaction(c);
                Err(error)
            }
        }
    })
    .await
}

/// The deletes of one retention round, in the open transaction: each kind until a statement
/// deletes fewer than `limit` rows, or `max_batches` statements ran.
fn cleanup_round(
    c: &mut SqliteConnection,
    delivered: i64,
    dead: i64,
    limit: usize,
    max_batches: usize,
) -> QueryResult<usize> {
    let mut deleted = 0;
    for (statement, older_than) in [(PURGE_DELIVERED, delivered), (PURGE_DEAD, dead)] {
        for _ in 0..max_batches {
            let n = purge(c, statement, older_than, limit_i64(limit))?;
            deleted += n;
            if n < limit {
                break;
            }
        }
    }
    Ok(deleted)
}

pub(super) async fn release_stale(conn: &mut Conn) -> QueryResult<usize> {
    conn.spawn_blocking(|c| query(RELEASE_STALE).execute(c))
        .await
}
