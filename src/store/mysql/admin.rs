//! MySQL / MariaDB: the statements of statistics, dead letters, replay, retention and stale
//! leases.
//!
//! Every statement on pending or dead deliveries says `delivered_at IS NULL`: it leads the one
//! index `txbus_deliveries_due (delivered_at, dead_at, available_at)`, which stands in for the
//! partial indexes MySQL does not have.

use super::{Mysql, keys_table};
use crate::store::{Admin, RoundLock, Update};

/// The conditions of a dead-letter filter, on `?1` to `?6` (a NULL sets no condition).
macro_rules! dead_filter {
    () => {
        "delivered_at IS NULL AND dead_at IS NOT NULL
  AND (?1 IS NULL OR event_id = ?1)
  AND (?2 IS NULL OR listener = ?2)
  AND (?3 IS NULL OR event_name = ?3)
  AND (?4 IS NULL OR dead_at >= TIMESTAMP '1970-01-01 00:00:00' + INTERVAL ?4 MICROSECOND)
  AND (?5 IS NULL OR dead_at < TIMESTAMP '1970-01-01 00:00:00' + INTERVAL ?5 MICROSECOND)
  AND (?6 IS NULL OR dead_reason = ?6)"
    };
}

impl Admin for Mysql {
    // Every pending delivery is in exactly one of due, running, stale, retrying, scheduled (a
    // parked one is due: it waits only for its key). A delivery never run waits since its due
    // time, any other (and a parked one) since its emit. SUM is DECIMAL in MySQL: cast, so that
    // it reads as BIGINT. UTC_TIMESTAMP is fixed for the whole statement.
    const STATS: &'static str = "\
SELECT s.listener, s.due, s.running, s.stale, s.retrying, s.scheduled, s.dead, s.delivered,
       s.oldest_us, s.held_keys, s.held_since_us, CAST(s.event_version AS SIGNED) AS event_version, i.n AS inbox_ids, m.n AS inbox_messages,
       TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) AS now_us
FROM (SELECT count(*) AS n FROM txbus_inbox) i
CROSS JOIN (SELECT count(*) AS n FROM txbus_inbox_messages) m
LEFT JOIN (
    SELECT listener, event_version,
           CAST(SUM(CASE WHEN pending AND leased_at IS NULL
                              AND (available_at <= UTC_TIMESTAMP(6) OR parked)
                         THEN 1 ELSE 0 END) AS SIGNED) AS due,
           CAST(SUM(CASE WHEN pending AND leased_at IS NOT NULL
                              AND available_at > UTC_TIMESTAMP(6)
                         THEN 1 ELSE 0 END) AS SIGNED) AS running,
           CAST(SUM(CASE WHEN pending AND leased_at IS NOT NULL
                              AND available_at <= UTC_TIMESTAMP(6)
                         THEN 1 ELSE 0 END) AS SIGNED) AS stale,
           CAST(SUM(CASE WHEN pending AND leased_at IS NULL AND available_at > UTC_TIMESTAMP(6)
                              AND attempts > 0 AND NOT parked
                         THEN 1 ELSE 0 END) AS SIGNED) AS retrying,
           CAST(SUM(CASE WHEN pending AND leased_at IS NULL AND available_at > UTC_TIMESTAMP(6)
                              AND attempts = 0 AND NOT parked
                         THEN 1 ELSE 0 END) AS SIGNED) AS scheduled,
           count(dead_at) AS dead,
           count(delivered_at) AS delivered,
           TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00',
                         MIN(CASE WHEN NOT pending THEN NULL
                                  WHEN attempts = 0 AND leased_at IS NULL AND NOT parked
                                       AND available_at > UTC_TIMESTAMP(6) THEN NULL
                                  WHEN attempts = 0 AND leased_at IS NULL AND NOT parked
                                       THEN available_at
                                  ELSE emitted_at END)) AS oldest_us,
           COUNT(DISTINCT CASE WHEN dead_at IS NOT NULL AND key_hold THEN ordering_key END)
               AS held_keys,
           TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00',
                         MIN(CASE WHEN key_hold THEN dead_at END)) AS held_since_us
    FROM (SELECT listener, event_version, attempts, leased_at, available_at, dead_at, delivered_at, emitted_at,
                 ordering_key, key_hold, parked,
                 dead_at IS NULL AND delivered_at IS NULL AS pending
          FROM txbus_deliveries) d
    GROUP BY listener, event_version) s ON TRUE";

    const SCHEDULED: &'static str = "\
SELECT event_id, event_name, listener,
       TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', available_at) AS due_at_us,
       TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', emitted_at) AS emitted_at_us
FROM txbus_deliveries
WHERE dead_at IS NULL AND delivered_at IS NULL AND available_at > UTC_TIMESTAMP(6)
  AND leased_at IS NULL AND attempts = 0 AND NOT parked
ORDER BY available_at, event_id, CAST(listener AS BINARY)
LIMIT ?";

    // utf8mb4_bin pads with spaces when it compares ('a' sorts after 'a\t'): the listener is
    // compared and ordered as bytes, as Rust orders strings. `event_id + 0`: once the prepared
    // statement has run with an event id bound (`event_id = ?1`, a constant), MariaDB drops a
    // plain `event_id` from its ORDER BY for every later run, which then orders ties of
    // `dead_at` by listener alone, and pages (`OFFSET`) overlap. The sort is a filesort anyway.
    const DEAD_LETTERS: &'static str = concat!(
        "\
SELECT event_id, event_name, listener, attempts, COALESCE(dead_reason, '') AS reason, last_error,
       TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', emitted_at) AS emitted_at_us,
       TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', dead_at) AS dead_at_us, payload
FROM txbus_deliveries
WHERE ",
        dead_filter!(),
        "
ORDER BY dead_at DESC, event_id + 0 DESC, CAST(listener AS BINARY)
LIMIT ?7 OFFSET ?8"
    );

    // Keyset pages in byte order of the listener, as Rust orders strings (see DEAD_LETTERS). No
    // assignment of the update reads a column another one sets, so their order does not matter.
    const REPLAY: Update = Update::Keyed {
        select: concat!(
            "\
SELECT event_id, listener FROM txbus_deliveries
WHERE ",
            dead_filter!(),
            "
  AND (event_id > ?7 OR (event_id = ?7 AND CAST(listener AS BINARY) > CAST(?8 AS BINARY)))
ORDER BY event_id, CAST(listener AS BINARY)
LIMIT ?9
FOR UPDATE"
        ),
        update: concat!(
            "UPDATE ",
            keys_table!(),
            " STRAIGHT_JOIN txbus_deliveries d FORCE INDEX (PRIMARY)
      ON d.event_id = k.event_id AND d.listener = k.listener
    SET d.dead_at = NULL, d.dead_reason = NULL, d.leased_at = NULL,
        d.available_at = UTC_TIMESTAMP(6),
        d.expires_at = UTC_TIMESTAMP(6)
                       + INTERVAL TIMESTAMPDIFF(MICROSECOND, d.emitted_at, d.expires_at) MICROSECOND
    WHERE d.delivered_at IS NULL AND d.dead_at IS NOT NULL"
        ),
    };

    // Bounded and oldest first, a range of the index. Ordered by the index's columns: MariaDB
    // reads `ORDER BY dead_at` alone from it only after sorting every row of the range.
    const PURGE_DEAD: &'static str = "\
DELETE FROM txbus_deliveries
WHERE delivered_at IS NULL AND dead_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND
ORDER BY delivered_at, dead_at
LIMIT ?";

    // The key index holds every pending keyed delivery, the parked ones among them.
    const UNPARK: &'static str = "\
UPDATE txbus_deliveries SET available_at = UTC_TIMESTAMP(6), parked = FALSE
WHERE parked AND ordering_key IS NOT NULL AND delivered_at IS NULL AND dead_at IS NULL";

    const PURGE_DELIVERED: &'static str = "\
DELETE FROM txbus_deliveries
WHERE delivered_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND
ORDER BY delivered_at
LIMIT ?";

    // Keyed by database like the migrations' lock (names are at most 64 characters: hash the
    // database name). 1 when taken, 0 when another session holds it.
    const ROUND_LOCK: RoundLock = RoundLock::Session {
        lock: "SELECT GET_LOCK(CONCAT('txbus.cleanup.', MD5(COALESCE(DATABASE(), ''))), 0) AS n",
        unlock: "SELECT RELEASE_LOCK(CONCAT('txbus.cleanup.', MD5(COALESCE(DATABASE(), '')))) AS n",
    };

    // Selected first, then updated by key: an UPDATE that sets `available_at`, a column of the
    // index, is planned by MariaDB as a scan of the whole table. Rows another transaction holds
    // are skipped: a claim leases them anew, a result write releases them itself.
    const RELEASE_STALE: Update = Update::Keyed {
        select: "\
SELECT event_id, listener FROM txbus_deliveries
WHERE delivered_at IS NULL AND dead_at IS NULL AND available_at <= UTC_TIMESTAMP(6)
  AND leased_at IS NOT NULL
LIMIT ?
FOR UPDATE SKIP LOCKED",
        update: concat!(
            "UPDATE ",
            keys_table!(),
            " STRAIGHT_JOIN txbus_deliveries d FORCE INDEX (PRIMARY)
      ON d.event_id = k.event_id AND d.listener = k.listener
    SET d.leased_at = NULL, d.available_at = UTC_TIMESTAMP(6),
        d.last_error = COALESCE(d.last_error, 'its lease passed without a result')"
        ),
    };
}
