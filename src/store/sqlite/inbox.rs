//! SQLite: the inbox's receipts and the `InboxStore`.

use crate::store::rows::{Count, One};
use std::time::Duration;

use diesel::sql_types::{BigInt, Integer, Text};
use diesel::{QueryResult, RunQueryDsl};

use super::{Conn, millis, query};
use crate::MessageId;
use crate::store::StoredMessage;

const RESERVE: &str = concat!(
    "INSERT INTO txbus_inbox (source, message_key, received_at) VALUES (?1, ?2, ",
    now_ms!(),
    ")
    ON CONFLICT (source, message_key) DO UPDATE SET received_at = excluded.received_at
    WHERE txbus_inbox.received_at < ",
    now_ms!(),
    " - ?3
    RETURNING 1 AS n"
);

const PURGE: &str = concat!(
    "DELETE FROM txbus_inbox WHERE (source, message_key) IN (
        SELECT source, message_key FROM txbus_inbox
        WHERE received_at < ",
    now_ms!(),
    " - ?1
        ORDER BY received_at
        LIMIT ?2)"
);

const COMPLETE: &str = "\
DELETE FROM txbus_deliveries WHERE event_id = ? AND listener = ? AND attempts = ?
    AND dead_at IS NULL AND delivered_at IS NULL";

// A success kept for `retain_delivered`: the same fence as the delete.
const COMPLETE_RETAINED: &str = concat!(
    "UPDATE txbus_deliveries SET delivered_at = ",
    now_ms!(),
    ", leased_at = NULL
    WHERE event_id = ? AND listener = ? AND attempts = ?
    AND dead_at IS NULL AND delivered_at IS NULL"
);

const STORE: &str = concat!(
    "INSERT INTO txbus_inbox_messages (source, message_key, payload, received_at, available_at)
    VALUES (?1, ?2, ?3, ",
    now_ms!(),
    ", ",
    now_ms!(),
    ")
    ON CONFLICT (source, message_key) DO NOTHING
    RETURNING 1 AS n"
);

const NEXT: &str = concat!(
    "UPDATE txbus_inbox_messages SET available_at = ",
    now_ms!(),
    " + ?1, deliveries = deliveries + 1
    WHERE (source, message_key) IN (
        SELECT source, message_key FROM txbus_inbox_messages
        WHERE available_at <= ",
    now_ms!(),
    " ORDER BY received_at
        LIMIT 1)
    RETURNING source, message_key AS key, payload, received_at * 1000 AS received_at_us, deliveries"
);

const DELETE: &str =
    "DELETE FROM txbus_inbox_messages WHERE source = ? AND message_key = ? AND deliveries = ?";

pub(super) async fn reserve(
    conn: &mut Conn,
    id: &MessageId,
    window: Duration,
) -> QueryResult<bool> {
    let (source, key, window) = (id.source().to_owned(), id.key().to_owned(), millis(window));
    conn.spawn_blocking(move |c| {
        let rows: Vec<One> = query(RESERVE)
            .bind::<Text, _>(&source)
            .bind::<Text, _>(&key)
            .bind::<BigInt, _>(window)
            .load(c)?;
        Ok(!rows.is_empty())
    })
    .await
}

pub(super) async fn purge(conn: &mut Conn, window: Duration, limit: usize) -> QueryResult<usize> {
    let (window, limit) = (millis(window), i64::try_from(limit).unwrap_or(i64::MAX));
    conn.spawn_blocking(move |c| {
        query(PURGE)
            .bind::<BigInt, _>(window)
            .bind::<BigInt, _>(limit)
            .execute(c)
    })
    .await
}

pub(super) async fn complete(
    conn: &mut Conn,
    event_id: i64,
    listener: &'static str,
    attempt: i32,
    retain: bool,
) -> QueryResult<bool> {
    conn.spawn_blocking(move |c| {
        let deleted = query(if retain { COMPLETE_RETAINED } else { COMPLETE })
            .bind::<BigInt, _>(event_id)
            .bind::<Text, _>(listener)
            .bind::<Integer, _>(attempt)
            .execute(c)?;
        Ok(deleted == 1)
    })
    .await
}

pub(super) async fn store(conn: &mut Conn, id: &MessageId, payload: &str) -> QueryResult<bool> {
    let (source, key, payload) = (
        id.source().to_owned(),
        id.key().to_owned(),
        payload.to_owned(),
    );
    conn.spawn_blocking(move |c| {
        let rows: Vec<One> = query(STORE)
            .bind::<Text, _>(&source)
            .bind::<Text, _>(&key)
            .bind::<Text, _>(&payload)
            .load(c)?;
        Ok(!rows.is_empty())
    })
    .await
}

pub(super) async fn next(conn: &mut Conn, lease: Duration) -> QueryResult<Option<StoredMessage>> {
    let lease = millis(lease);
    conn.spawn_blocking(move |c| {
        let rows: Vec<StoredMessage> = query(NEXT).bind::<BigInt, _>(lease).load(c)?;
        Ok(rows.into_iter().next())
    })
    .await
}

pub(super) async fn delete(conn: &mut Conn, id: &MessageId, deliveries: i32) -> QueryResult<bool> {
    let (source, key) = (id.source().to_owned(), id.key().to_owned());
    conn.spawn_blocking(move |c| {
        let deleted = query(DELETE)
            .bind::<Text, _>(&source)
            .bind::<Text, _>(&key)
            .bind::<Integer, _>(deliveries)
            .execute(c)?;
        Ok(deleted == 1)
    })
    .await
}

pub(super) async fn count(conn: &mut Conn) -> QueryResult<i64> {
    conn.spawn_blocking(|c| {
        let row: Count = query("SELECT count(*) AS n FROM txbus_inbox_messages").get_result(c)?;
        Ok(row.n)
    })
    .await
}
