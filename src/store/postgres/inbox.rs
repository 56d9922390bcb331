//! PostgreSQL: the inbox's statements.

use super::Postgres;
use crate::store::{Inbox, Receipt, Take};

impl Inbox for Postgres {
    const RECEIPT: Receipt = Receipt::Upsert(
        "\
INSERT INTO txbus_inbox (source, message_key, received_at) VALUES ($1, $2, now())
ON CONFLICT (source, message_key) DO UPDATE SET received_at = excluded.received_at
WHERE txbus_inbox.received_at < now() - $3 * interval '1 microsecond'",
    );

    const PURGE: &'static str = "\
WITH old AS MATERIALIZED (
    SELECT source, message_key FROM txbus_inbox
    WHERE received_at < now() - $1 * interval '1 microsecond'
    ORDER BY received_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED)
DELETE FROM txbus_inbox i USING old
WHERE i.source = old.source AND i.message_key = old.message_key";

    const STORE: &'static str = "\
INSERT INTO txbus_inbox_messages (source, message_key, payload, received_at, available_at)
VALUES ($1, $2, $3, now(), now())
ON CONFLICT (source, message_key) DO NOTHING";

    const TAKE: Take = Take::Returning(
        "\
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
          (extract(epoch FROM m.received_at) * 1000000)::int8 AS received_at_us, m.deliveries",
    );

    const DELETE: &'static str = "DELETE FROM txbus_inbox_messages WHERE source = $1 AND message_key = $2 AND deliveries = $3";

    const COUNT: &'static str = "SELECT count(*) AS n FROM txbus_inbox_messages";
}
