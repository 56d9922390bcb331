//! MySQL / MariaDB: the inbox's statements.

use super::Mysql;
use crate::store::{Inbox, Receipt, Take};

impl Inbox for Mysql {
    // `INSERT IGNORE` reports 0 rows for a duplicate key (`ON DUPLICATE KEY UPDATE` would report
    // 1 both for a new row and an unchanged one, with the found-rows flag diesel-async sets).
    // Lengths are checked before, so it ignores nothing else.
    const RECEIPT: Receipt = Receipt::ReadRenewInsert {
        read: "\
SELECT received_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND AS expired
FROM txbus_inbox WHERE source = ? AND message_key = ?",
        renew: "\
UPDATE txbus_inbox SET received_at = UTC_TIMESTAMP(6)
WHERE source = ? AND message_key = ? AND received_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND",
        insert: "INSERT IGNORE INTO txbus_inbox (source, message_key, received_at)
                 VALUES (?, ?, UTC_TIMESTAMP(6))",
    };

    const PURGE: &'static str = "\
DELETE FROM txbus_inbox WHERE received_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND
ORDER BY received_at LIMIT ?";

    const STORE: &'static str = "\
INSERT IGNORE INTO txbus_inbox_messages (source, message_key, payload, received_at, available_at)
VALUES (?, ?, ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))";

    const TAKE: Take = Take::SelectLeaseRead {
        select: "\
SELECT source, message_key AS `key` FROM txbus_inbox_messages
WHERE available_at <= UTC_TIMESTAMP(6)
ORDER BY received_at
LIMIT 1
FOR UPDATE SKIP LOCKED",
        lease: "\
UPDATE txbus_inbox_messages
SET available_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, deliveries = deliveries + 1
WHERE source = ? AND message_key = ?",
        read: "\
SELECT source, message_key AS `key`, payload,
       TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', received_at) AS received_at_us, deliveries
FROM txbus_inbox_messages WHERE source = ? AND message_key = ?",
    };

    const DELETE: &'static str =
        "DELETE FROM txbus_inbox_messages WHERE source = ? AND message_key = ? AND deliveries = ?";

    const COUNT: &'static str = "SELECT count(*) AS n FROM txbus_inbox_messages";
}
