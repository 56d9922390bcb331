//! PostgreSQL: the statements of statistics, dead letters, replay, retention and stale leases.

use super::Postgres;
use crate::store::{Admin, RoundLock, Update};

/// The conditions of a dead-letter filter, on `$1` to `$6`.
macro_rules! dead_filter {
    () => {
        "dead_at IS NOT NULL
  AND ($1::int8 IS NULL OR event_id = $1)
  AND ($2::text IS NULL OR listener = $2)
  AND ($3::text IS NULL OR event_name = $3)
  AND ($4::int8 IS NULL OR dead_at >= timestamptz 'epoch' + $4 * interval '1 microsecond')
  AND ($5::int8 IS NULL OR dead_at < timestamptz 'epoch' + $5 * interval '1 microsecond')
  AND ($6::text IS NULL OR dead_reason = $6)"
    };
}

impl Admin for Postgres {
    // Every pending delivery is in exactly one of due, running, stale, retrying, scheduled (a
    // parked one is due: it waits only for its key). A delivery never run waits since its due
    // time, any other (and a parked one) since its emit.
    const STATS: &'static str = "\
SELECT s.listener, s.due, s.running, s.stale, s.retrying, s.scheduled, s.dead, s.delivered,
       s.oldest_us, s.held_keys, s.held_since_us, s.event_version::int8 AS event_version, i.n AS inbox_ids, m.n AS inbox_messages,
       (extract(epoch FROM now()) * 1000000)::int8 AS now_us
FROM (SELECT count(*) AS n FROM txbus_inbox) i
CROSS JOIN (SELECT count(*) AS n FROM txbus_inbox_messages) m
LEFT JOIN (
    SELECT listener, event_version,
           count(*) FILTER (WHERE pending AND leased_at IS NULL
                                  AND (available_at <= now() OR parked)) AS due,
           count(*) FILTER (WHERE pending AND leased_at IS NOT NULL AND available_at > now())
               AS running,
           count(*) FILTER (WHERE pending AND leased_at IS NOT NULL AND available_at <= now())
               AS stale,
           count(*) FILTER (WHERE pending AND leased_at IS NULL AND available_at > now()
                                  AND attempts > 0 AND NOT parked) AS retrying,
           count(*) FILTER (WHERE pending AND leased_at IS NULL AND available_at > now()
                                  AND attempts = 0 AND NOT parked) AS scheduled,
           count(dead_at) AS dead,
           count(delivered_at) AS delivered,
           (extract(epoch FROM min(CASE WHEN attempts = 0 AND leased_at IS NULL AND NOT parked
                                        THEN available_at ELSE emitted_at END)
                               FILTER (WHERE pending AND NOT (attempts = 0 AND leased_at IS NULL
                                                              AND available_at > now()
                                                              AND NOT parked)))
            * 1000000)::int8 AS oldest_us,
           count(DISTINCT ordering_key) FILTER (WHERE dead_at IS NOT NULL AND key_hold)
               AS held_keys,
           (extract(epoch FROM min(dead_at) FILTER (WHERE key_hold)) * 1000000)::int8
               AS held_since_us
    FROM (SELECT listener, event_version, attempts, leased_at, available_at, dead_at, delivered_at, emitted_at,
                 ordering_key, key_hold, parked,
                 dead_at IS NULL AND delivered_at IS NULL AS pending
          FROM txbus_deliveries) d
    GROUP BY listener, event_version) s ON true";

    const DEAD_LETTERS: &'static str = concat!(
        "\
SELECT event_id, event_name, listener, attempts, COALESCE(dead_reason, '') AS reason, last_error,
       (extract(epoch FROM emitted_at) * 1000000)::int8 AS emitted_at_us,
       (extract(epoch FROM dead_at) * 1000000)::int8 AS dead_at_us, payload::text AS payload
FROM txbus_deliveries
WHERE ",
        dead_filter!(),
        "
ORDER BY dead_at DESC, event_id DESC, listener COLLATE \"C\"
LIMIT $7 OFFSET $8"
    );

    // The due index serves it: pending deliveries by `available_at`, from now on.
    const SCHEDULED: &'static str = "\
SELECT event_id, event_name, listener,
       (extract(epoch FROM available_at) * 1000000)::int8 AS due_at_us,
       (extract(epoch FROM emitted_at) * 1000000)::int8 AS emitted_at_us
FROM txbus_deliveries
WHERE dead_at IS NULL AND delivered_at IS NULL AND available_at > now()
  AND leased_at IS NULL AND attempts = 0 AND NOT parked
ORDER BY available_at, event_id, listener COLLATE \"C\"
LIMIT $1";

    // Keyset pages in byte order of the listener (COLLATE "C"), as Rust orders strings.
    const REPLAY: Update = Update::Returning(concat!(
        "\
WITH c AS MATERIALIZED (
    SELECT event_id, listener FROM txbus_deliveries
    WHERE ",
        dead_filter!(),
        "
      AND (event_id > $7 OR (event_id = $7 AND listener COLLATE \"C\" > $8))
    ORDER BY event_id, listener COLLATE \"C\"
    LIMIT $9
    FOR UPDATE)
UPDATE txbus_deliveries d
SET dead_at = NULL, dead_reason = NULL, leased_at = NULL, available_at = now(),
    expires_at = now() + (d.expires_at - d.emitted_at)
FROM c
WHERE d.event_id = c.event_id AND d.listener = c.listener AND d.dead_at IS NOT NULL
RETURNING d.event_id, d.listener"
    ));

    const PURGE_DEAD: &'static str = "\
WITH old AS MATERIALIZED (
    SELECT event_id, listener FROM txbus_deliveries
    WHERE dead_at < now() - $1 * interval '1 microsecond'
    ORDER BY dead_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED)
DELETE FROM txbus_deliveries d USING old
WHERE d.event_id = old.event_id AND d.listener = old.listener AND d.dead_at IS NOT NULL";

    // The key index holds every pending keyed delivery, the parked ones among them.
    const UNPARK: &'static str = "UPDATE txbus_deliveries SET available_at = now(), parked = FALSE
WHERE parked AND ordering_key IS NOT NULL AND delivered_at IS NULL AND dead_at IS NULL";

    const PURGE_DELIVERED: &'static str = "\
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
    const ROUND_LOCK: RoundLock = RoundLock::Transaction(Some(
        "SELECT pg_try_advisory_xact_lock(
                    hashtext('txbus.cleanup.' || COALESCE(current_schema(), '')))::int::int8 AS n",
    ));

    const RELEASE_STALE: Update = Update::Returning(
        "\
WITH c AS MATERIALIZED (
    SELECT event_id, listener FROM txbus_deliveries
    WHERE dead_at IS NULL AND delivered_at IS NULL AND leased_at IS NOT NULL
      AND available_at <= now()
    LIMIT $1
    FOR UPDATE SKIP LOCKED)
UPDATE txbus_deliveries d
SET leased_at = NULL, available_at = now(),
    last_error = COALESCE(d.last_error, 'its lease passed without a result')
FROM c
WHERE d.event_id = c.event_id AND d.listener = c.listener
RETURNING d.event_id, d.listener",
    );
}
