//! PostgreSQL: statistics, dead letters, replay, retention, stale leases.

use std::time::Duration;

use diesel::QueryResult;
use diesel::sql_types::{BigInt, Bool, Nullable, Text};
use diesel_async::{AnsiTransactionManager, AsyncPgConnection, RunQueryDsl, TransactionManager};

use super::query;
use crate::store::{
    DeadFilter, DeadRow, DeliveryRef, Retention, StatsRow, StatsRows, limit_i64, micros,
};

// Every pending delivery is in exactly one of due, running, stale, retrying.
const STATS: &str = "\
SELECT s.listener, s.due, s.running, s.stale, s.retrying, s.dead, s.delivered, s.oldest_us,
       i.n AS inbox_ids, m.n AS inbox_messages,
       (extract(epoch FROM now()) * 1000000)::int8 AS now_us
FROM (SELECT count(*) AS n FROM txbus_inbox) i
CROSS JOIN (SELECT count(*) AS n FROM txbus_inbox_messages) m
LEFT JOIN (
    SELECT listener,
           count(*) FILTER (WHERE pending AND leased_at IS NULL AND available_at <= now()) AS due,
           count(*) FILTER (WHERE pending AND leased_at IS NOT NULL AND available_at > now())
               AS running,
           count(*) FILTER (WHERE pending AND leased_at IS NOT NULL AND available_at <= now())
               AS stale,
           count(*) FILTER (WHERE pending AND leased_at IS NULL AND available_at > now())
               AS retrying,
           count(dead_at) AS dead,
           count(delivered_at) AS delivered,
           (extract(epoch FROM min(emitted_at) FILTER (WHERE pending)) * 1000000)::int8
               AS oldest_us
    FROM (SELECT listener, leased_at, available_at, dead_at, delivered_at, emitted_at,
                 dead_at IS NULL AND delivered_at IS NULL AS pending
          FROM txbus_deliveries) d
    GROUP BY listener) s ON true";

/// The conditions of a [`DeadFilter`], on `$1` to `$5`.
macro_rules! dead_filter {
    () => {
        "dead_at IS NOT NULL
  AND ($1::int8 IS NULL OR event_id = $1)
  AND ($2::text IS NULL OR listener = $2)
  AND ($3::text IS NULL OR event_name = $3)
  AND ($4::int8 IS NULL OR dead_at >= timestamptz 'epoch' + $4 * interval '1 microsecond')
  AND ($5::int8 IS NULL OR dead_at < timestamptz 'epoch' + $5 * interval '1 microsecond')"
    };
}

const DEAD_LETTERS: &str = concat!(
    "\
SELECT event_id, event_name, listener, attempts, COALESCE(dead_reason, '') AS reason, last_error,
       (extract(epoch FROM emitted_at) * 1000000)::int8 AS emitted_at_us,
       (extract(epoch FROM dead_at) * 1000000)::int8 AS dead_at_us, payload::text AS payload
FROM txbus_deliveries
WHERE ",
    dead_filter!(),
    "
ORDER BY dead_at DESC, event_id DESC, listener COLLATE \"C\"
LIMIT $6"
);

// Keyset pages in byte order of the listener (COLLATE "C"), as Rust orders strings.
const REPLAY: &str = concat!(
    "\
WITH c AS MATERIALIZED (
    SELECT event_id, listener FROM txbus_deliveries
    WHERE ",
    dead_filter!(),
    "
      AND (event_id > $6 OR (event_id = $6 AND listener COLLATE \"C\" > $7))
    ORDER BY event_id, listener COLLATE \"C\"
    LIMIT $8
    FOR UPDATE)
UPDATE txbus_deliveries d
SET dead_at = NULL, dead_reason = NULL, leased_at = NULL, available_at = now(),
    expires_at = now() + (d.expires_at - d.emitted_at)
FROM c
WHERE d.event_id = c.event_id AND d.listener = c.listener AND d.dead_at IS NOT NULL
RETURNING d.event_id, d.listener"
);

const PURGE_DEAD: &str = "\
WITH old AS MATERIALIZED (
    SELECT event_id, listener FROM txbus_deliveries
    WHERE dead_at < now() - $1 * interval '1 microsecond'
    ORDER BY dead_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED)
DELETE FROM txbus_deliveries d USING old
WHERE d.event_id = old.event_id AND d.listener = old.listener AND d.dead_at IS NOT NULL";

const PURGE_DELIVERED: &str = "\
WITH old AS MATERIALIZED (
    SELECT event_id, listener FROM txbus_deliveries
    WHERE delivered_at < now() - $1 * interval '1 microsecond'
    ORDER BY delivered_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED)
DELETE FROM txbus_deliveries d USING old
WHERE d.event_id = old.event_id AND d.listener = old.listener";

// Held until the end of the round's transaction, so that no error can leave it held. Keyed by
// schema, like the migrations' lock.
const TRY_LOCK_CLEANUP: &str = "\
SELECT pg_try_advisory_xact_lock(hashtext('txbus.cleanup.' || COALESCE(current_schema(), '')))
    AS locked";

const RELEASE_STALE: &str = "\
UPDATE txbus_deliveries
SET leased_at = NULL, available_at = now(),
    last_error = COALESCE(last_error, 'its lease passed without a result')
WHERE dead_at IS NULL AND delivered_at IS NULL AND leased_at IS NOT NULL
  AND available_at <= now()";

#[derive(diesel::QueryableByName)]
struct Locked {
    #[diesel(sql_type = Bool)]
    locked: bool,
}

pub(super) async fn stats(conn: &mut AsyncPgConnection) -> QueryResult<StatsRows> {
    let rows: Vec<StatsRow> = query(STATS).load(conn).await?;
    Ok(StatsRows::from_rows(rows))
}

/// Binds a [`DeadFilter`] to `$1` to `$5`.
macro_rules! bind_filter {
    ($query:expr, $filter:expr) => {
        $query
            .bind::<Nullable<BigInt>, _>($filter.event_id)
            .bind::<Nullable<Text>, _>($filter.listener)
            .bind::<Nullable<Text>, _>($filter.event_name)
            .bind::<Nullable<BigInt>, _>($filter.died_after_us)
            .bind::<Nullable<BigInt>, _>($filter.died_before_us)
    };
}

pub(super) async fn dead_letters(
    conn: &mut AsyncPgConnection,
    filter: &DeadFilter<'_>,
    limit: usize,
) -> QueryResult<Vec<DeadRow>> {
    let rows: Vec<DeadRow> = bind_filter!(query(DEAD_LETTERS), filter)
        .bind::<BigInt, _>(limit_i64(limit))
        .load(conn)
        .await?;
    Ok(rows)
}

pub(super) async fn replay(
    conn: &mut AsyncPgConnection,
    filter: &DeadFilter<'_>,
    after: &DeliveryRef,
    limit: usize,
) -> QueryResult<Vec<DeliveryRef>> {
    let rows: Vec<DeliveryRef> = bind_filter!(query(REPLAY), filter)
        .bind::<BigInt, _>(after.event_id)
        .bind::<Text, _>(after.listener.as_str())
        .bind::<BigInt, _>(limit_i64(limit))
        .load(conn)
        .await?;
    Ok(rows)
}

pub(super) async fn purge_dead(
    conn: &mut AsyncPgConnection,
    older_than: Duration,
    limit: usize,
) -> QueryResult<usize> {
    purge(conn, PURGE_DEAD, older_than, limit).await
}

async fn purge(
    conn: &mut AsyncPgConnection,
    statement: &'static str,
    older_than: Duration,
    limit: usize,
) -> QueryResult<usize> {
    query(statement)
        .bind::<BigInt, _>(micros(older_than))
        .bind::<BigInt, _>(limit_i64(limit))
        .execute(conn)
        .await
}

pub(super) async fn cleanup(
    conn: &mut AsyncPgConnection,
    retention: Retention,
    limit: usize,
    max_batches: usize,
) -> QueryResult<Option<usize>> {
    AnsiTransactionManager::begin_transaction(conn).await?;
    let result = locked_cleanup(conn, retention, limit, max_batches).await;
    match result {
        Ok(deleted) => {
            AnsiTransactionManager::commit_transaction(conn).await?;
            Ok(deleted)
        }
        Err(error) => {
            // A failed rollback leaves the connection broken, and the pool drops it.
            let _ = AnsiTransactionManager::rollback_transaction(conn).await;
            Err(error)
        }
    }
}

async fn locked_cleanup(
    conn: &mut AsyncPgConnection,
    retention: Retention,
    limit: usize,
    max_batches: usize,
) -> QueryResult<Option<usize>> {
    let locked: Locked = query(TRY_LOCK_CLEANUP).get_result(conn).await?;
    if !locked.locked {
        return Ok(None);
    }
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
    Ok(Some(deleted))
}

pub(super) async fn release_stale(conn: &mut AsyncPgConnection) -> QueryResult<usize> {
    query(RELEASE_STALE).execute(conn).await
}
