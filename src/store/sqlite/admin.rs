//! SQLite: the statements of statistics, dead letters, replay, retention and stale leases.

use super::Sqlite;
use crate::store::{Admin, RoundLock, Update};

/// The conditions of a dead-letter filter, on `?1` to `?6` (times in µs, compared with the
/// millisecond column scaled up). `dead_at IS NOT NULL` stands alone so that the partial index
/// applies.
macro_rules! dead_filter {
    () => {
        "dead_at IS NOT NULL
  AND (?1 IS NULL OR event_id = ?1)
  AND (?2 IS NULL OR listener = ?2)
  AND (?3 IS NULL OR event_name = ?3)
  AND (?4 IS NULL OR dead_at * 1000 >= ?4)
  AND (?5 IS NULL OR dead_at * 1000 < ?5)
  AND (?6 IS NULL OR dead_reason = ?6)"
    };
}

impl Admin for Sqlite {
    // Every pending delivery is in exactly one of due, running, stale, retrying, scheduled (a
    // parked one is due: it waits only for its key). SQLite treats
    // its clock as a constant of the statement, so every count and `now_us` see the same time.
    const STATS: &'static str = concat!(
        "SELECT s.listener, s.due, s.running, s.stale, s.retrying, s.scheduled, s.dead,
       s.delivered, s.oldest_us, s.held_keys, s.held_since_us, s.event_version, i.n AS inbox_ids, m.n AS inbox_messages, ",
        now_ms!(),
        " * 1000 AS now_us
FROM (SELECT count(*) AS n FROM txbus_inbox) i
CROSS JOIN (SELECT count(*) AS n FROM txbus_inbox_messages) m
LEFT JOIN (
    SELECT listener, event_version,
           count(*) FILTER (WHERE pending AND leased_at IS NULL
                                  AND (available_at <= now OR parked)) AS due,
           count(*) FILTER (WHERE pending AND leased_at IS NOT NULL AND available_at > now)
               AS running,
           count(*) FILTER (WHERE pending AND leased_at IS NOT NULL AND available_at <= now)
               AS stale,
           count(*) FILTER (WHERE pending AND leased_at IS NULL AND available_at > now
                                  AND attempts > 0 AND NOT parked) AS retrying,
           count(*) FILTER (WHERE pending AND leased_at IS NULL AND available_at > now
                                  AND attempts = 0 AND NOT parked) AS scheduled,
           count(dead_at) AS dead,
           count(delivered_at) AS delivered,
           min(CASE WHEN attempts = 0 AND leased_at IS NULL AND NOT parked THEN available_at
                    ELSE emitted_at END)
               FILTER (WHERE pending AND NOT (attempts = 0 AND leased_at IS NULL
                                              AND available_at > now AND NOT parked))
               * 1000 AS oldest_us,
           count(DISTINCT CASE WHEN dead_at IS NOT NULL AND key_hold THEN ordering_key END)
               AS held_keys,
           min(CASE WHEN key_hold THEN dead_at END) * 1000 AS held_since_us
    FROM (SELECT listener, event_version, attempts, leased_at, available_at, dead_at, delivered_at, emitted_at,
                 ordering_key, key_hold, parked,
                 dead_at IS NULL AND delivered_at IS NULL AS pending, ",
        now_ms!(),
        " AS now
          FROM txbus_deliveries) d
    GROUP BY listener, event_version) s ON true"
    );

    const SCHEDULED: &'static str = concat!(
        "SELECT event_id, event_name, listener, available_at * 1000 AS due_at_us,
       emitted_at * 1000 AS emitted_at_us
FROM txbus_deliveries
WHERE dead_at IS NULL AND delivered_at IS NULL AND available_at > ",
        now_ms!(),
        " AND leased_at IS NULL AND attempts = 0 AND NOT parked
ORDER BY available_at, event_id, listener
LIMIT ?"
    );

    const DEAD_LETTERS: &'static str = concat!(
        "SELECT event_id, event_name, listener, attempts, COALESCE(dead_reason, '') AS reason,
       last_error, emitted_at * 1000 AS emitted_at_us, dead_at * 1000 AS dead_at_us, payload
FROM txbus_deliveries
WHERE ",
        dead_filter!(),
        "
ORDER BY dead_at DESC, event_id DESC, listener
LIMIT ?7 OFFSET ?8"
    );

    // Keyset pages in key order. The listener column has SQLite's default BINARY collation,
    // which compares bytes, as Rust orders strings. The `IN` list is computed in full before the
    // first row is updated, and one statement is atomic: no row is replayed twice, nor beyond
    // the limit. The `BETWEEN` adds nothing to the conditions (the key comparison implies its
    // lower bound, the filter its upper one), but gives SQLite a range of the primary key: the
    // replay of one event's delivery seeks to it instead of scanning the table while holding the
    // writer lock.
    const REPLAY: Update = Update::Returning(concat!(
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
      AND (event_id, listener) > (?7, ?8)
      AND event_id BETWEEN COALESCE(?1, ?7) AND COALESCE(?1, 9223372036854775807)
    ORDER BY event_id, listener
    LIMIT ?9)
RETURNING event_id, listener"
    ));

    // SQLite is built without `DELETE ... LIMIT`, and the table has no rowid: the bounded batch
    // is chosen by key. The explicit `IS NOT NULL` lets the partial index serve the subquery.
    const PURGE_DEAD: &'static str = concat!(
        "DELETE FROM txbus_deliveries WHERE (event_id, listener) IN (
    SELECT event_id, listener FROM txbus_deliveries
    WHERE dead_at IS NOT NULL AND dead_at < ",
        now_ms!(),
        " - ?1 / 1000
    ORDER BY dead_at
    LIMIT ?2)"
    );

    // The key index holds every pending keyed delivery, the parked ones among them.
    const UNPARK: &'static str = concat!(
        "UPDATE txbus_deliveries SET available_at = ",
        now_ms!(),
        ", parked = 0
WHERE parked AND ordering_key IS NOT NULL AND delivered_at IS NULL AND dead_at IS NULL"
    );

    const PURGE_DELIVERED: &'static str = concat!(
        "DELETE FROM txbus_deliveries WHERE (event_id, listener) IN (
    SELECT event_id, listener FROM txbus_deliveries
    WHERE delivered_at IS NOT NULL AND delivered_at < ",
        now_ms!(),
        " - ?1 / 1000
    ORDER BY delivered_at
    LIMIT ?2)"
    );

    // SQLite lets one transaction write at a time, and the round is one `BEGIN IMMEDIATE`
    // transaction: rounds of several processes (or several buses on one file) take turns on the
    // writer lock, waiting for it up to the busy timeout, and never delete at the same time. A
    // round that waited then finds only what the other left, so there is never "another
    // instance is running one" to report. Past the busy timeout, BEGIN fails with "database is
    // locked", an error like any other write's.
    const ROUND_LOCK: RoundLock = RoundLock::Transaction(None);

    const RELEASE_STALE: Update = Update::Returning(concat!(
        "UPDATE txbus_deliveries SET leased_at = NULL, available_at = ",
        now_ms!(),
        ",
    last_error = COALESCE(last_error, 'its lease passed without a result')
WHERE (event_id, listener) IN (
    SELECT event_id, listener FROM txbus_deliveries
    WHERE dead_at IS NULL AND delivered_at IS NULL AND leased_at IS NOT NULL
      AND available_at <= ",
        now_ms!(),
        "
    LIMIT ?1)
RETURNING event_id, listener"
    ));
}
