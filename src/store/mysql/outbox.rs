//! MySQL / MariaDB: the outbox's statements, event ids from an `AUTO_INCREMENT` table, results
//! written as one JSON parameter.

use std::sync::Arc;

use diesel::QueryResult;
use diesel_async::{AsyncMysqlConnection, RunQueryDsl};
use serde_json::json;

use super::{Mysql, bucket_of, claim, ids, keys_table, listeners_table, results};
use crate::delivery::Outcome;
use crate::store::rows::{lease_ms, micros};
use crate::store::sql::sql;
use crate::store::tx::finish;
use crate::store::update::{read_committed, select_and_update};
use crate::store::{Backend, Claimed, Died, Inserted, NewEvent, Outbox, Persist, Recorded, Update};

const INSERT_EVENT: &str = concat!(
    "INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, lease_ms,
                                   attempts, leased_at, available_at, expires_at, event_version,
                                   trace_context)
    SELECT ?, j.listener, ?, ?, e.t, ?, 1, e.t, e.t + INTERVAL ? MICROSECOND,
           e.t + INTERVAL ? MICROSECOND, ?, ?
    FROM (SELECT TIMESTAMPADD(MICROSECOND, ?, '1970-01-01 00:00:00') AS t) e CROSS JOIN ",
    listeners_table!()
);

// A scheduled or keyed event: its deliveries are not leased, and fall due at `e.t` plus the
// fourth value.
const INSERT_SCHEDULED: &str = concat!(
    "INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, lease_ms,
                                   attempts, leased_at, available_at, expires_at, event_version,
                                   ordering_key, key_hold, trace_context)
    SELECT ?, j.listener, ?, ?, e.t, ?, 0, NULL, e.t + INTERVAL ? MICROSECOND,
           e.t + INTERVAL ? MICROSECOND, ?, ?, ?, ?
    FROM (SELECT TIMESTAMPADD(MICROSECOND, ?, '1970-01-01 00:00:00') AS t) e CROSS JOIN ",
    listeners_table!()
);

// The deliveries of a transaction's events, from a JSON array of
// `[event_id, listener, name, payload, emitted_at_us, lease_ms, expires_us, due_us, version,
// ordering_key, key_hold, trace_context]`: a scheduled event's deliveries fall due `due_us`
// after the emit and are not leased; the others have -1 there.
const INSERT_EVENTS: &str = "\
INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, lease_ms,
                              attempts, leased_at, available_at, expires_at, event_version,
                              ordering_key, key_hold, trace_context)
SELECT x.event_id, x.listener, x.name, x.payload, x.at, x.lease,
       CASE WHEN x.due < 0 THEN 1 ELSE 0 END, CASE WHEN x.due < 0 THEN x.at END,
       x.at + INTERVAL CASE WHEN x.due < 0 THEN x.lease * 1000 ELSE x.due END MICROSECOND,
       x.at + INTERVAL x.expires MICROSECOND, x.version, x.ordering_key, x.key_hold,
       x.trace_context
FROM (SELECT j.*, TIMESTAMPADD(MICROSECOND, j.emitted_us, '1970-01-01 00:00:00') AS at
      FROM JSON_TABLE(?, '$[*]' COLUMNS (
          event_id BIGINT PATH '$[0]',
          listener VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[1]',
          name VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[2]',
          payload LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[3]',
          emitted_us BIGINT PATH '$[4]',
          lease BIGINT PATH '$[5]',
          expires BIGINT PATH '$[6]',
          due BIGINT PATH '$[7]',
          version INT PATH '$[8]',
          ordering_key VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[9]',
          key_hold BOOLEAN PATH '$[10]',
          trace_context TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[11]')) j) x";

/// Locks ordering key `?` to the end of the transaction (see `Outbox::LOCK_KEY`): the row of its
/// bucket (see the migration `key_locks`), so that the table stays small whatever the keys.
const LOCK_KEY: &str = concat!(
    "INSERT INTO txbus_key_locks (bucket) VALUES (",
    bucket_of!("?"),
    ")
ON DUPLICATE KEY UPDATE bucket = bucket"
);

/// Relabels dead letters that `EXPIRE` made for a version no instance knew.
const UNKNOWN_VERSION: &str = concat!(
    "UPDATE ",
    keys_table!(),
    " STRAIGHT_JOIN txbus_deliveries d FORCE INDEX (PRIMARY)
      ON d.event_id = k.event_id AND d.listener = k.listener
    SET d.dead_reason = 'unknown_version',
        d.last_error = CONCAT('no running instance knows version ', d.event_version,
                              ' of event ', d.event_name)
    WHERE d.dead_reason = 'no_listener'"
);

impl Outbox for Mysql {
    const EXPIRE: Update = Update::Keyed {
        select: concat!(
            "SELECT event_id, listener FROM txbus_deliveries
    WHERE delivered_at IS NULL AND dead_at IS NULL AND available_at <= UTC_TIMESTAMP(6)
      AND expires_at <= UTC_TIMESTAMP(6)
      AND (listener NOT IN (SELECT listener FROM ",
            listeners_table!(),
            ")
           OR (event_version > 1 AND event_version > COALESCE(
               JSON_VALUE(?, CONCAT('$.', JSON_QUOTE(listener))), 0)))
    LIMIT ?
    FOR UPDATE SKIP LOCKED"
        ),
        // Those of listeners known here died for their version: `expire` relabels them.
        update: concat!(
            "UPDATE ",
            keys_table!(),
            " STRAIGHT_JOIN txbus_deliveries d FORCE INDEX (PRIMARY)
      ON d.event_id = k.event_id AND d.listener = k.listener
    SET d.dead_at = UTC_TIMESTAMP(6),
        d.dead_reason = 'no_listener',
        d.leased_at = NULL,
        d.last_error = COALESCE(d.last_error,
                                CONCAT('no running instance has listener ', d.listener))"
        ),
    };

    const ORPHANS: &'static str = concat!(
        "SELECT listener, count(*) AS n FROM (
        SELECT listener FROM txbus_deliveries
        WHERE delivered_at IS NULL AND dead_at IS NULL AND available_at <= UTC_TIMESTAMP(6)
          AND listener NOT IN (SELECT listener FROM ",
        listeners_table!(),
        ")
        LIMIT ?) due
    GROUP BY listener ORDER BY listener"
    );

    const NEXT_DUE: &'static str = concat!(
        "SELECT TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), min(available_at)) AS us
    FROM txbus_deliveries
    WHERE delivered_at IS NULL AND dead_at IS NULL AND available_at > UTC_TIMESTAMP(6)
      AND listener IN (SELECT listener FROM ",
        listeners_table!(),
        ")
      AND available_at <= UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND"
    );

    const CANCEL: &'static str = "\
DELETE FROM txbus_deliveries
WHERE event_id = ? AND dead_at IS NULL AND delivered_at IS NULL
  AND (leased_at IS NULL OR available_at <= UTC_TIMESTAMP(6))";

    // The parked deliveries of the keys are found through the key index (see `keys_table!`);
    // the two lists pair by position.
    const CANCEL_KEYS: (&'static str, &'static str) = (
        "\
SELECT DISTINCT listener, ordering_key FROM txbus_deliveries
WHERE event_id = ? AND ordering_key IS NOT NULL AND dead_at IS NULL AND delivered_at IS NULL
  AND (leased_at IS NULL OR available_at <= UTC_TIMESTAMP(6))",
        "\
UPDATE (SELECT l.listener, o.ordering_key
      FROM JSON_TABLE(?, '$[*]' COLUMNS (
               n FOR ORDINALITY,
               listener VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) l
      JOIN JSON_TABLE(?, '$[*]' COLUMNS (
               n FOR ORDINALITY,
               ordering_key VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) o
        ON o.n = l.n) k
STRAIGHT_JOIN txbus_deliveries d FORCE INDEX (txbus_deliveries_key)
  ON d.listener = k.listener AND d.ordering_key = k.ordering_key
SET d.available_at = UTC_TIMESTAMP(6), d.parked = FALSE
WHERE d.parked AND d.delivered_at IS NULL AND d.dead_at IS NULL",
    );

    // Only a pending delivery (neither dead nor delivered) is still held by a run.
    const COMPLETE: &'static str = "\
DELETE FROM txbus_deliveries
WHERE event_id = ? AND listener = ? AND attempts = ?
  AND dead_at IS NULL AND delivered_at IS NULL";

    const COMPLETE_RETAINED: &'static str = "\
UPDATE txbus_deliveries SET delivered_at = UTC_TIMESTAMP(6), leased_at = NULL
WHERE event_id = ? AND listener = ? AND attempts = ?
  AND dead_at IS NULL AND delivered_at IS NULL";

    const PERSIST: Persist = Persist::InsertThenUpdate;

    const LOCK_KEY: Option<&'static str> = Some(LOCK_KEY);

    // Event ids come from AUTO_INCREMENT rows that are only needed for their counter; the
    // newest stays, so the counter survives even a server without a persistent one.
    const MAINTAIN: Option<&'static str> = Some(
        "\
DELETE FROM txbus_event_ids
WHERE id < (SELECT newest FROM (SELECT COALESCE(MAX(id), 0) AS newest FROM txbus_event_ids) n)
LIMIT 10000",
    );

    // The deliveries go in one statement, atomic by itself; an id row without deliveries (a
    // failure between the two statements) is harmless and trimmed by `MAINTAIN`.
    const INSERT_IS_ATOMIC: bool = true;

    async fn insert_event(
        conn: &mut AsyncMysqlConnection,
        event: &NewEvent,
    ) -> QueryResult<Inserted> {
        if let Some(key) = event.ordering_key.as_deref()
            && !event.listeners.is_empty()
        {
            sql::<<Self as Backend>::Db>(LOCK_KEY)
                .bind(key)
                .execute(conn)
                .await?;
        }
        let inserted = ids::next_event_id(conn).await?;
        if !event.listeners.is_empty() {
            let lease = lease_ms(event.lease);
            let (statement, available_us) = match event.due_in {
                None => (INSERT_EVENT, lease.saturating_mul(1000)),
                Some(due_in) => (INSERT_SCHEDULED, micros(due_in)),
            };
            let statement = sql::<<Self as Backend>::Db>(statement)
                .bind(inserted.id.get())
                .bind(event.name)
                .bind(&*event.payload)
                .bind(lease)
                .bind(available_us)
                .bind(event.expires_us())
                .bind(event.version_i32());
            match event.due_in {
                Some(_) => statement
                    .bind(event.ordering_key.as_deref())
                    .bind(event.key_hold),
                None => statement,
            }
            .bind(event.trace.as_deref())
            .bind(crate::store::micros_since_epoch(inserted.emitted_at))
            .bind_list(&event.listeners)
            .execute(conn)
            .await?;
        }
        Ok(inserted)
    }

    // MariaDB takes a block of ids in one statement (`NEXT_EVENT_IDS_RETURNING`); MySQL, which
    // has no `RETURNING`, one at a time: the ids of a multi-row insert need not be consecutive
    // and could not be read back. Each id is a row, so blocks start at one: a transaction that
    // emits once writes one.
    const ID_BLOCK: usize = 256;

    const FIRST_ID_BLOCK: usize = 1;

    async fn reserve_ids(conn: &mut AsyncMysqlConnection, n: usize) -> QueryResult<Vec<Inserted>> {
        ids::next_event_ids(conn, n).await
    }

    async fn commit_with_events(
        conn: &mut AsyncMysqlConnection,
        events: &[(Inserted, &NewEvent)],
    ) -> QueryResult<()> {
        let rows: Vec<_> = events
            .iter()
            .flat_map(|(inserted, event)| {
                event.listeners.iter().map(move |listener| {
                    json!([
                        inserted.id.get(),
                        listener,
                        event.name,
                        &*event.payload,
                        crate::store::micros_since_epoch(inserted.emitted_at),
                        lease_ms(event.lease),
                        event.expires_us(),
                        event.due_in.map_or(-1, micros),
                        event.version_i32(),
                        event.ordering_key.as_deref(),
                        event.key_hold,
                        event.trace.as_deref(),
                    ])
                })
            })
            .collect();
        let written = if rows.is_empty() {
            Ok(0)
        } else {
            sql::<<Self as Backend>::Db>(INSERT_EVENTS)
                .bind(serde_json::Value::from(rows).to_string())
                .execute(conn)
                .await
        };
        finish::<Self, _, _>(conn, written).await.map(drop)
    }

    // The keyed update cannot tell the two reasons apart: those of known listeners are
    // relabelled after it, by key, in the same transaction.
    async fn expire(
        conn: &mut AsyncMysqlConnection,
        known: &[&'static str],
        versions: &str,
        limit: usize,
    ) -> QueryResult<Vec<Died>> {
        let Update::Keyed { select, update } = Self::EXPIRE else {
            return Err(diesel::result::Error::QueryBuilderError(
                "MySQL's expiry is a keyed update".into(),
            ));
        };
        read_committed::<Self>(conn).await?;
        Self::begin(conn).await?;
        let result = async {
            let keys = select_and_update::<Self>(conn, select, update, |q| {
                q.bind_list(known)
                    .bind(versions)
                    .bind(crate::store::rows::limit(limit))
            })
            .await?;
            let (versioned, unknown): (Vec<_>, Vec<_>) = keys
                .into_iter()
                .partition(|key| known.contains(&key.listener.as_str()));
            if !versioned.is_empty() {
                let pairs: Vec<_> = versioned
                    .iter()
                    .map(|key| json!([key.event_id, key.listener]))
                    .collect();
                sql::<<Self as Backend>::Db>(UNKNOWN_VERSION)
                    .bind(serde_json::Value::from(pairs).to_string())
                    .execute(conn)
                    .await?;
            }
            Ok::<_, diesel::result::Error>((versioned, unknown))
        }
        .await;
        let (versioned, unknown) = finish::<Self, _, _>(conn, result).await?;
        let died = |reason: &'static str| {
            move |key: crate::store::rows::DeliveryRef| Died {
                event_id: crate::event::EventId::new(key.event_id),
                listener: key.listener,
                reason: reason.to_owned(),
            }
        };
        Ok(versioned
            .into_iter()
            .map(died("unknown_version"))
            .chain(unknown.into_iter().map(died("no_listener")))
            .collect())
    }

    // See `claim.rs`.
    async fn claim_due(
        conn: &mut AsyncMysqlConnection,
        listeners: &[&'static str],
        versions: &str,
        heads: Option<&[(&'static str, Arc<str>)]>,
        limit: usize,
    ) -> QueryResult<Vec<Claimed>> {
        claim::claim(conn, listeners, versions, heads, limit).await
    }

    async fn record(
        conn: &mut AsyncMysqlConnection,
        outcomes: &[Outcome],
        retain: bool,
    ) -> QueryResult<Recorded> {
        results::record(conn, outcomes, retain).await
    }
}
