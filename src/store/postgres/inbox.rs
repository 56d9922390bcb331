//! PostgreSQL: the inbox's receipts and the `InboxStore`.

use crate::store::rows::{Count, One};
use std::time::Duration;

use diesel::QueryResult;
use diesel::sql_types::{BigInt, Integer, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::query;
use crate::MessageId;
use crate::store::{StoredMessage, micros};

const RESERVE: &str = "\
INSERT INTO txbus_inbox (source, message_key, received_at) VALUES ($1, $2, now())
ON CONFLICT (source, message_key) DO UPDATE SET received_at = excluded.received_at
WHERE txbus_inbox.received_at < now() - $3 * interval '1 microsecond'
RETURNING 1 AS n";

const PURGE: &str = "\
WITH old AS MATERIALIZED (
    SELECT source, message_key FROM txbus_inbox
    WHERE received_at < now() - $1 * interval '1 microsecond'
    ORDER BY received_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED)
DELETE FROM txbus_inbox i USING old
WHERE i.source = old.source AND i.message_key = old.message_key";

// Fenced like the completion in `super`: `COALESCE` keeps the planner on the primary key.
const COMPLETE: &str = "\
DELETE FROM txbus_deliveries
WHERE event_id = $1 AND listener = $2 AND attempts = $3
  AND COALESCE(dead_at, delivered_at) IS NULL";

const COMPLETE_RETAINED: &str = "\
UPDATE txbus_deliveries SET delivered_at = now(), leased_at = NULL
WHERE event_id = $1 AND listener = $2 AND attempts = $3
  AND COALESCE(dead_at, delivered_at) IS NULL";

const STORE: &str = "\
INSERT INTO txbus_inbox_messages (source, message_key, payload, received_at, available_at)
VALUES ($1, $2, $3, now(), now())
ON CONFLICT (source, message_key) DO NOTHING
RETURNING 1 AS n";

const NEXT: &str = "\
WITH c AS MATERIALIZED (
    SELECT source, message_key FROM txbus_inbox_messages
    WHERE available_at <= now()
    ORDER BY received_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED)
UPDATE txbus_inbox_messages m
SET available_at = now() + $1 * interval '1 microsecond', deliveries = m.deliveries + 1
FROM c
WHERE m.source = c.source AND m.message_key = c.message_key
RETURNING m.source, m.message_key AS key, m.payload,
          (extract(epoch FROM m.received_at) * 1000000)::int8 AS received_at_us, m.deliveries";

const DELETE: &str =
    "DELETE FROM txbus_inbox_messages WHERE source = $1 AND message_key = $2 AND deliveries = $3";

pub(super) async fn reserve(
    conn: &mut AsyncPgConnection,
    id: &MessageId,
    window: Duration,
) -> QueryResult<bool> {
    let rows: Vec<One> = query(RESERVE)
        .bind::<Text, _>(id.source())
        .bind::<Text, _>(id.key())
        .bind::<BigInt, _>(micros(window))
        .load(conn)
        .await?;
    Ok(!rows.is_empty())
}

pub(super) async fn purge(
    conn: &mut AsyncPgConnection,
    window: Duration,
    limit: usize,
) -> QueryResult<usize> {
    query(PURGE)
        .bind::<BigInt, _>(micros(window))
        .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(conn)
        .await
}

pub(super) async fn complete(
    conn: &mut AsyncPgConnection,
    event_id: i64,
    listener: &'static str,
    attempt: i32,
    retain: bool,
) -> QueryResult<bool> {
    let deleted = query(if retain { COMPLETE_RETAINED } else { COMPLETE })
        .bind::<BigInt, _>(event_id)
        .bind::<Text, _>(listener)
        .bind::<Integer, _>(attempt)
        .execute(conn)
        .await?;
    Ok(deleted == 1)
}

pub(super) async fn store(
    conn: &mut AsyncPgConnection,
    id: &MessageId,
    payload: &str,
) -> QueryResult<bool> {
    let rows: Vec<One> = query(STORE)
        .bind::<Text, _>(id.source())
        .bind::<Text, _>(id.key())
        .bind::<Text, _>(payload)
        .load(conn)
        .await?;
    Ok(!rows.is_empty())
}

pub(super) async fn next(
    conn: &mut AsyncPgConnection,
    lease: Duration,
) -> QueryResult<Option<StoredMessage>> {
    let rows: Vec<StoredMessage> = query(NEXT)
        .bind::<BigInt, _>(micros(lease))
        .load(conn)
        .await?;
    Ok(rows.into_iter().next())
}

pub(super) async fn delete(
    conn: &mut AsyncPgConnection,
    id: &MessageId,
    deliveries: i32,
) -> QueryResult<bool> {
    let deleted = query(DELETE)
        .bind::<Text, _>(id.source())
        .bind::<Text, _>(id.key())
        .bind::<Integer, _>(deliveries)
        .execute(conn)
        .await?;
    Ok(deleted == 1)
}

pub(super) async fn count(conn: &mut AsyncPgConnection) -> QueryResult<i64> {
    let row: Count = query("SELECT count(*) AS n FROM txbus_inbox_messages")
        .get_result(conn)
        .await?;
    Ok(row.n)
}
