//! MySQL / MariaDB: the outbox's statements, event ids from an `AUTO_INCREMENT` table, results
//! written as one JSON parameter.

use diesel::QueryResult;
use diesel_async::{AsyncMysqlConnection, RunQueryDsl};
use serde_json::json;

use super::{Mysql, keys_table, listeners_table};
use crate::delivery::{DeliveryKey, Outcome};
use crate::store::outbox::{Failure, split_done};
use crate::store::rows::{InsertedRow, attempt_i32, inserted, lease_ms, micros, rows};
use crate::store::sql::sql;
use crate::store::tx::finish;
use crate::store::update::read_committed;
use crate::store::{Backend, Inserted, NewEvent, Outbox, Persist, Recorded, Update};

const NEXT_EVENT_ID: &str = "INSERT INTO txbus_event_ids () VALUES ()";

const LOAD_EVENT_ID: &str = "\
SELECT CAST(LAST_INSERT_ID() AS SIGNED) AS id,
       TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) AS emitted_at_us";

const INSERT_EVENT: &str = concat!(
    "INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, lease_ms,
                                   attempts, leased_at, available_at, expires_at)
    SELECT ?, j.listener, ?, ?, e.t, ?, 1, e.t, e.t + INTERVAL ? MICROSECOND,
           e.t + INTERVAL ? MICROSECOND
    FROM (SELECT TIMESTAMPADD(MICROSECOND, ?, '1970-01-01 00:00:00') AS t) e CROSS JOIN ",
    listeners_table!()
);

// A scheduled event: its deliveries are not leased, and fall due at `e.t` plus the fourth value.
const INSERT_SCHEDULED: &str = concat!(
    "INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, lease_ms,
                                   attempts, leased_at, available_at, expires_at)
    SELECT ?, j.listener, ?, ?, e.t, ?, 0, NULL, e.t + INTERVAL ? MICROSECOND,
           e.t + INTERVAL ? MICROSECOND
    FROM (SELECT TIMESTAMPADD(MICROSECOND, ?, '1970-01-01 00:00:00') AS t) e CROSS JOIN ",
    listeners_table!()
);

// The deliveries of a transaction's events, from a JSON array of
// `[event_id, listener, name, payload, emitted_at_us, lease_ms, expires_us, due_us]`: a
// scheduled event's deliveries fall due `due_us` after the emit and are not leased; the others
// have -1 there.
const INSERT_EVENTS: &str = "\
INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, lease_ms,
                              attempts, leased_at, available_at, expires_at)
SELECT x.event_id, x.listener, x.name, x.payload, x.at, x.lease,
       CASE WHEN x.due < 0 THEN 1 ELSE 0 END, CASE WHEN x.due < 0 THEN x.at END,
       x.at + INTERVAL CASE WHEN x.due < 0 THEN x.lease * 1000 ELSE x.due END MICROSECOND,
       x.at + INTERVAL x.expires MICROSECOND
FROM (SELECT j.*, TIMESTAMPADD(MICROSECOND, j.emitted_us, '1970-01-01 00:00:00') AS at
      FROM JSON_TABLE(?, '$[*]' COLUMNS (
          event_id BIGINT PATH '$[0]',
          listener VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[1]',
          name VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[2]',
          payload LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[3]',
          emitted_us BIGINT PATH '$[4]',
          lease BIGINT PATH '$[5]',
          expires BIGINT PATH '$[6]',
          due BIGINT PATH '$[7]')) j) x";

/// Opens the JSON array of `[event_id, listener, attempts]` of successes as a table `k`.
macro_rules! done_table {
    () => {
        "JSON_TABLE(?, '$[*]' COLUMNS (
            event_id BIGINT PATH '$[0]',
            listener VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[1]',
            attempts INT PATH '$[2]')) k
          ON d.event_id = k.event_id AND d.listener = k.listener AND d.attempts = k.attempts"
    };
}

const DELETE_DONE: &str = concat!(
    "DELETE d FROM txbus_deliveries d JOIN ",
    done_table!(),
    " WHERE d.delivered_at IS NULL AND d.dead_at IS NULL"
);

const MARK_DONE: &str = concat!(
    "UPDATE txbus_deliveries d JOIN ",
    done_table!(),
    " SET d.delivered_at = UTC_TIMESTAMP(6), d.leased_at = NULL
    WHERE d.delivered_at IS NULL AND d.dead_at IS NULL"
);

/// Opens the JSON array of failed results as a table `x`.
macro_rules! failed_table {
    () => {
        "JSON_TABLE(?1, '$[*]' COLUMNS (
            event_id BIGINT PATH '$.e',
            listener VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$.l',
            attempts INT PATH '$.a',
            delay_us BIGINT PATH '$.d',
            reason VARCHAR(32) PATH '$.r',
            error LONGTEXT CHARACTER SET utf8mb4 PATH '$.m',
            undo_attempt INT PATH '$.u')) x"
    };
}

// MySQL has no RETURNING, and a dead row read back after the update could have been dead before
// (a stale result, fenced off). So the deliveries the results still hold are locked first, and
// which of them die is decided there at one instant, `now_us`, which the update then uses too:
// the deaths reported are exactly the ones written.
const LOCK_FAILED: &str = concat!(
    "SELECT t.event_id, t.listener,
           CASE WHEN x.reason IS NOT NULL THEN x.reason
                WHEN UTC_TIMESTAMP(6) + INTERVAL x.delay_us MICROSECOND >= t.expires_at
                THEN 'expired' END AS dead_reason,
           TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) AS now_us
    FROM txbus_deliveries t
    JOIN ",
    failed_table!(),
    " ON t.event_id = x.event_id AND t.listener = x.listener AND t.attempts = x.attempts
    WHERE t.delivered_at IS NULL AND t.dead_at IS NULL
    FOR UPDATE"
);

// `?2` is the instant of LOCK_FAILED. Every CASE tests `expires_at` and `x`, which no assignment
// changes, so the (unspecified) order of multi-table assignments does not matter.
const UPDATE_FAILED: &str = concat!(
    "UPDATE txbus_deliveries t
    JOIN ",
    failed_table!(),
    " ON t.event_id = x.event_id AND t.listener = x.listener AND t.attempts = x.attempts
    CROSS JOIN (SELECT TIMESTAMP '1970-01-01 00:00:00' + INTERVAL ?2 MICROSECOND AS now_at) n
    SET t.last_error = COALESCE(x.error, t.last_error),
        t.leased_at = NULL,
        t.dead_reason = CASE WHEN x.reason IS NOT NULL THEN x.reason
                             WHEN n.now_at + INTERVAL x.delay_us MICROSECOND >= t.expires_at
                             THEN 'expired' END,
        t.dead_at = CASE WHEN x.reason IS NOT NULL
                           OR n.now_at + INTERVAL x.delay_us MICROSECOND >= t.expires_at
                         THEN n.now_at END,
        t.available_at = n.now_at + INTERVAL x.delay_us MICROSECOND,
        t.attempts = t.attempts - x.undo_attempt
    WHERE t.delivered_at IS NULL AND t.dead_at IS NULL"
);

rows! {
    /// A delivery LOCK_FAILED holds for a result, and whether the result makes it dead.
    struct HeldRow { event_id: i64, listener: String, dead_reason: Option<String>, now_us: i64 }
}

impl Outbox for Mysql {
    const CLAIM: Update = Update::Keyed {
        select: concat!(
            "SELECT event_id, listener FROM txbus_deliveries
    WHERE delivered_at IS NULL AND dead_at IS NULL AND available_at <= UTC_TIMESTAMP(6)
      AND listener IN (SELECT listener FROM ",
            listeners_table!(),
            ")
    ORDER BY available_at
    LIMIT ?
    FOR UPDATE SKIP LOCKED"
        ),
        // Expired deliveries are made dead instead of leased. Every CASE tests `expires_at`,
        // which no assignment changes, so the (unspecified) order of multi-table assignments
        // does not matter.
        update: concat!(
            "UPDATE txbus_deliveries d JOIN ",
            keys_table!(),
            " ON d.event_id = k.event_id AND d.listener = k.listener
    SET d.dead_reason = CASE WHEN d.expires_at <= UTC_TIMESTAMP(6) THEN 'expired' END,
        d.dead_at = CASE WHEN d.expires_at <= UTC_TIMESTAMP(6) THEN UTC_TIMESTAMP(6) END,
        d.attempts = CASE WHEN d.expires_at <= UTC_TIMESTAMP(6) THEN d.attempts
                          ELSE d.attempts + 1 END,
        d.leased_at = CASE WHEN d.expires_at <= UTC_TIMESTAMP(6) THEN NULL
                           ELSE UTC_TIMESTAMP(6) END,
        d.available_at = CASE WHEN d.expires_at <= UTC_TIMESTAMP(6) THEN d.available_at
                              ELSE UTC_TIMESTAMP(6) + INTERVAL d.lease_ms * 1000 MICROSECOND END"
        ),
        read: Some(concat!(
            "SELECT d.event_id, d.listener, d.attempts, d.payload,
           TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', d.emitted_at) AS emitted_at_us,
           d.lease_ms, d.dead_at IS NOT NULL AS expired
    FROM txbus_deliveries d JOIN ",
            keys_table!(),
            " ON d.event_id = k.event_id AND d.listener = k.listener"
        )),
    };

    const EXPIRE: Update = Update::Keyed {
        select: concat!(
            "SELECT event_id, listener FROM txbus_deliveries
    WHERE delivered_at IS NULL AND dead_at IS NULL AND available_at <= UTC_TIMESTAMP(6)
      AND expires_at <= UTC_TIMESTAMP(6)
      AND listener NOT IN (SELECT listener FROM ",
            listeners_table!(),
            ")
    LIMIT ?
    FOR UPDATE SKIP LOCKED"
        ),
        update: concat!(
            "UPDATE txbus_deliveries d JOIN ",
            keys_table!(),
            " ON d.event_id = k.event_id AND d.listener = k.listener
    SET d.dead_at = UTC_TIMESTAMP(6),
        d.dead_reason = 'no_listener',
        d.leased_at = NULL,
        d.last_error = COALESCE(d.last_error,
                                CONCAT('no running instance has listener ', d.listener))"
        ),
        read: None,
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
        sql::<<Self as Backend>::Db>(NEXT_EVENT_ID)
            .execute(conn)
            .await?;
        let rows: Vec<InsertedRow> = sql(LOAD_EVENT_ID).load(conn).await?;
        let inserted = inserted(rows)?;
        if !event.listeners.is_empty() {
            let lease = lease_ms(event.lease);
            let (statement, available_us) = match event.due_in {
                None => (INSERT_EVENT, lease.saturating_mul(1000)),
                Some(due_in) => (INSERT_SCHEDULED, micros(due_in)),
            };
            sql::<<Self as Backend>::Db>(statement)
                .bind(inserted.id.get())
                .bind(event.name)
                .bind(&*event.payload)
                .bind(lease)
                .bind(available_us)
                .bind(event.expires_us())
                .bind(crate::store::micros_since_epoch(inserted.emitted_at))
                .bind_list(&event.listeners)
                .execute(conn)
                .await?;
        }
        Ok(inserted)
    }

    // Ids come one row of the `AUTO_INCREMENT` table at a time: the ids of a multi-row insert
    // need not be consecutive (`innodb_autoinc_lock_mode = 2`) and could not be read back.
    const ID_BLOCK: usize = 1;

    async fn reserve_ids(conn: &mut AsyncMysqlConnection, n: usize) -> QueryResult<Vec<Inserted>> {
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            sql::<<Self as Backend>::Db>(NEXT_EVENT_ID)
                .execute(conn)
                .await?;
            ids.push(inserted(sql(LOAD_EVENT_ID).load(conn).await?)?);
        }
        Ok(ids)
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

    async fn record(
        conn: &mut AsyncMysqlConnection,
        outcomes: &[Outcome],
        retain: bool,
    ) -> QueryResult<Recorded> {
        let (done, other) = split_done(outcomes);
        let mut recorded = Recorded::default();
        if !done.is_empty() {
            read_committed::<Self>(conn).await?;
            recorded.applied +=
                sql::<<Self as Backend>::Db>(if retain { MARK_DONE } else { DELETE_DONE })
                    .bind(done_json(&done))
                    .execute(conn)
                    .await?;
        }
        if !other.is_empty() {
            let failures = failed_json(&other);
            read_committed::<Self>(conn).await?;
            Self::begin(conn).await?;
            let written = write_failed(conn, &failures).await;
            let (applied, held) = finish::<Self, _, _>(conn, written).await?;
            recorded.applied += applied;
            recorded.died.extend(held.into_iter().filter_map(|row| {
                crate::store::rows::DiedRow {
                    event_id: row.event_id,
                    listener: row.listener,
                    dead_reason: row.dead_reason,
                }
                .died()
            }));
        }
        Ok(recorded)
    }
}

/// Locks the deliveries the failed results still hold, and writes the results at the instant of
/// the lock. Returns the rows written and the deliveries held.
async fn write_failed(
    conn: &mut AsyncMysqlConnection,
    failures: &str,
) -> QueryResult<(usize, Vec<HeldRow>)> {
    let held: Vec<HeldRow> = sql(LOCK_FAILED).bind(failures).load(conn).await?;
    let Some(now_us) = held.iter().map(|row| row.now_us).next() else {
        // Every result is stale: nothing to write.
        return Ok((0, held));
    };
    let applied = sql::<<Mysql as Backend>::Db>(UPDATE_FAILED)
        .bind(failures)
        .bind(now_us)
        .execute(conn)
        .await?;
    Ok((applied, held))
}

/// A JSON array of `[event_id, listener, attempts]` of successes, for `done_table!`.
fn done_json(done: &[DeliveryKey]) -> String {
    json!(
        done.iter()
            .map(|k| json!([k.event_id.get(), k.listener, attempt_i32(k.attempt)]))
            .collect::<Vec<_>>()
    )
    .to_string()
}

/// A JSON array of the failed results, for `failed_table!`.
fn failed_json(other: &[&Outcome]) -> String {
    json!(
        other
            .iter()
            .map(|o| {
                let failure = Failure::new(&o.resolution);
                json!({
                    "e": o.key.event_id.get(),
                    "l": o.key.listener,
                    "a": attempt_i32(o.key.attempt),
                    "d": failure.delay_us,
                    "r": failure.dead_reason,
                    "m": failure.error,
                    "u": i32::from(failure.undo_attempt),
                })
            })
            .collect::<Vec<_>>()
    )
    .to_string()
}
