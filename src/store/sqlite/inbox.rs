//! SQLite: the inbox's statements.

use super::Sqlite;
use crate::store::{Inbox, Receipt, Take};

impl Inbox for Sqlite {
    const RECEIPT: Receipt = Receipt::Upsert(concat!(
        "INSERT INTO txbus_inbox (source, message_key, received_at) VALUES (?1, ?2, ",
        now_ms!(),
        ")
    ON CONFLICT (source, message_key) DO UPDATE SET received_at = excluded.received_at
    WHERE txbus_inbox.received_at < ",
        now_ms!(),
        " - ?3 / 1000"
    ));

    const PURGE: &'static str = concat!(
        "DELETE FROM txbus_inbox WHERE (source, message_key) IN (
        SELECT source, message_key FROM txbus_inbox
        WHERE received_at < ",
        now_ms!(),
        " - ?1 / 1000
        ORDER BY received_at
        LIMIT ?2)"
    );

    const STORE: &'static str = concat!(
        "INSERT INTO txbus_inbox_messages (source, message_key, payload, received_at, available_at)
    VALUES (?1, ?2, ?3, ",
        now_ms!(),
        ", ",
        now_ms!(),
        ")
    ON CONFLICT (source, message_key) DO NOTHING"
    );

    const TAKE: Take = Take::Returning(concat!(
        "UPDATE txbus_inbox_messages SET available_at = ",
        now_ms!(),
        " + ?1 / 1000, deliveries = deliveries + 1
    WHERE (source, message_key) IN (
        SELECT source, message_key FROM txbus_inbox_messages
        WHERE available_at <= ",
        now_ms!(),
        " ORDER BY received_at
        LIMIT 1)
    RETURNING source, message_key AS key, payload, received_at * 1000 AS received_at_us,
              deliveries"
    ));

    const DELETE: &'static str =
        "DELETE FROM txbus_inbox_messages WHERE source = ? AND message_key = ? AND deliveries = ?";

    const COUNT: &'static str = "SELECT count(*) AS n FROM txbus_inbox_messages";
}
