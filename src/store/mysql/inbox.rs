//! MySQL / MariaDB: the inbox's receipts and the `InboxStore`.

use crate::store::rows::Count;
use std::time::Duration;

use diesel::QueryResult;
use diesel::sql_types::{BigInt, Integer, Text};
use diesel_async::{AsyncConnection, AsyncMysqlConnection, RunQueryDsl, SimpleAsyncConnection};

use super::{READ_COMMITTED, query};
use crate::MessageId;
use crate::store::{StoredMessage, micros};

// Whether a record of the id exists, and if so whether it is older than the window. A plain read:
// a duplicate takes no lock at all.
const LOOK_UP: &str = "\
SELECT received_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND AS expired
FROM txbus_inbox WHERE source = ? AND message_key = ?";

// `INSERT IGNORE` reports 0 rows for a duplicate key (`ON DUPLICATE KEY UPDATE` would report 1
// both for a new row and an unchanged one, with the found-rows flag diesel-async sets). Lengths
// are checked before, so it ignores nothing else.
const RESERVE: &str = "INSERT IGNORE INTO txbus_inbox (source, message_key, received_at) VALUES (?, ?, UTC_TIMESTAMP(6))";

const RENEW: &str = "\
UPDATE txbus_inbox SET received_at = UTC_TIMESTAMP(6)
WHERE source = ? AND message_key = ? AND received_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND";

const PURGE: &str = "\
DELETE FROM txbus_inbox WHERE received_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND
ORDER BY received_at LIMIT ?";

// Only a pending delivery (neither dead nor delivered) is still held by a run.
const COMPLETE: &str = "\
DELETE FROM txbus_deliveries
WHERE event_id = ? AND listener = ? AND attempts = ?
  AND dead_at IS NULL AND delivered_at IS NULL";

const COMPLETE_RETAINED: &str = "\
UPDATE txbus_deliveries SET delivered_at = UTC_TIMESTAMP(6), leased_at = NULL
WHERE event_id = ? AND listener = ? AND attempts = ?
  AND dead_at IS NULL AND delivered_at IS NULL";

const STORE: &str = "\
INSERT IGNORE INTO txbus_inbox_messages (source, message_key, payload, received_at, available_at)
VALUES (?, ?, ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))";

const NEXT_SELECT: &str = "\
SELECT source, message_key AS `key` FROM txbus_inbox_messages
WHERE available_at <= UTC_TIMESTAMP(6)
ORDER BY received_at
LIMIT 1
FOR UPDATE SKIP LOCKED";

const NEXT_LEASE: &str = "\
UPDATE txbus_inbox_messages
SET available_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, deliveries = deliveries + 1
WHERE source = ? AND message_key = ?";

const NEXT_LOAD: &str = "\
SELECT source, message_key AS `key`, payload,
       TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', received_at) AS received_at_us, deliveries
FROM txbus_inbox_messages WHERE source = ? AND message_key = ?";

const DELETE: &str =
    "DELETE FROM txbus_inbox_messages WHERE source = ? AND message_key = ? AND deliveries = ?";

#[derive(diesel::QueryableByName)]
struct Expired {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    expired: bool,
}

#[derive(diesel::QueryableByName)]
struct KeyRow {
    #[diesel(sql_type = Text)]
    source: String,
    #[diesel(sql_type = Text)]
    key: String,
}

// Taking a shared lock (a duplicate `INSERT IGNORE`) and then an exclusive one (the update) would
// deadlock two concurrent receipts of one id: so a duplicate within the window is found by a plain
// read, an expired record is renewed by an update alone, and only an id not seen is inserted.
pub(super) async fn reserve(
    conn: &mut AsyncMysqlConnection,
    id: &MessageId,
    window: Duration,
) -> QueryResult<bool> {
    let found: Vec<Expired> = query(LOOK_UP)
        .bind::<BigInt, _>(micros(window))
        .bind::<Text, _>(id.source())
        .bind::<Text, _>(id.key())
        .load(conn)
        .await?;
    match found.into_iter().next().map(|row| row.expired) {
        Some(false) => return Ok(false),
        Some(true) => {
            let renewed = query(RENEW)
                .bind::<Text, _>(id.source())
                .bind::<Text, _>(id.key())
                .bind::<BigInt, _>(micros(window))
                .execute(conn)
                .await?;
            if renewed == 1 {
                return Ok(true);
            }
            // Renewed by another receipt meanwhile, or purged: the insert decides.
        }
        None => {}
    }
    let inserted = query(RESERVE)
        .bind::<Text, _>(id.source())
        .bind::<Text, _>(id.key())
        .execute(conn)
        .await?;
    Ok(inserted == 1)
}

pub(super) async fn purge(
    conn: &mut AsyncMysqlConnection,
    window: Duration,
    limit: usize,
) -> QueryResult<usize> {
    conn.batch_execute(READ_COMMITTED).await?;
    query(PURGE)
        .bind::<BigInt, _>(micros(window))
        .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(conn)
        .await
}

pub(super) async fn complete(
    conn: &mut AsyncMysqlConnection,
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
    conn: &mut AsyncMysqlConnection,
    id: &MessageId,
    payload: &str,
) -> QueryResult<bool> {
    let inserted = query(STORE)
        .bind::<Text, _>(id.source())
        .bind::<Text, _>(id.key())
        .bind::<Text, _>(payload)
        .execute(conn)
        .await?;
    Ok(inserted == 1)
}

pub(super) async fn next(
    conn: &mut AsyncMysqlConnection,
    lease: Duration,
) -> QueryResult<Option<StoredMessage>> {
    conn.batch_execute(READ_COMMITTED).await?;
    let row: Option<StoredMessage> = conn
        .transaction(async |conn| {
            let Some(key) = query(NEXT_SELECT)
                .load::<KeyRow>(conn)
                .await?
                .into_iter()
                .next()
            else {
                return Ok(None);
            };
            query(NEXT_LEASE)
                .bind::<BigInt, _>(micros(lease))
                .bind::<Text, _>(&key.source)
                .bind::<Text, _>(&key.key)
                .execute(conn)
                .await?;
            let rows: Vec<StoredMessage> = query(NEXT_LOAD)
                .bind::<Text, _>(&key.source)
                .bind::<Text, _>(&key.key)
                .load(conn)
                .await?;
            QueryResult::Ok(rows.into_iter().next())
        })
        .await?;
    Ok(row)
}

pub(super) async fn delete(
    conn: &mut AsyncMysqlConnection,
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

pub(super) async fn count(conn: &mut AsyncMysqlConnection) -> QueryResult<i64> {
    let row: Count = query("SELECT count(*) AS n FROM txbus_inbox_messages")
        .get_result(conn)
        .await?;
    Ok(row.n)
}
