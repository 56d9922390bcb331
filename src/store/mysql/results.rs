//! MySQL / MariaDB: listener results written as one JSON parameter per batch.

use diesel::QueryResult;
use diesel_async::{AsyncMysqlConnection, RunQueryDsl};
use serde_json::json;

use super::Mysql;
use crate::delivery::{DeliveryKey, Outcome};
use crate::store::outbox::{Failure, split_done};
use crate::store::rows::{attempt_i32, rows};
use crate::store::sql::sql;
use crate::store::tx::finish;
use crate::store::update::read_committed;
use crate::store::{Backend, Recorded};

/// Opens the JSON array of `[event_id, listener, attempts]` of successes as a table `k`, and
/// joins their deliveries `d` by primary key (see `keys_table!`).
macro_rules! done_table {
    () => {
        "JSON_TABLE(?, '$[*]' COLUMNS (
            event_id BIGINT PATH '$[0]',
            listener VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[1]',
            attempts INT PATH '$[2]')) k
          STRAIGHT_JOIN txbus_deliveries d FORCE INDEX (PRIMARY)
          ON d.event_id = k.event_id AND d.listener = k.listener AND d.attempts = k.attempts"
    };
}

const DELETE_DONE: &str = concat!(
    "DELETE d FROM ",
    done_table!(),
    " WHERE d.delivered_at IS NULL AND d.dead_at IS NULL"
);

const MARK_DONE: &str = concat!(
    "UPDATE ",
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
    FROM ",
    failed_table!(),
    " STRAIGHT_JOIN txbus_deliveries t FORCE INDEX (PRIMARY)
      ON t.event_id = x.event_id AND t.listener = x.listener AND t.attempts = x.attempts
    WHERE t.delivered_at IS NULL AND t.dead_at IS NULL
    FOR UPDATE"
);

// `?2` is the instant of LOCK_FAILED. Every CASE tests `expires_at` and `x`, which no assignment
// changes, so the (unspecified) order of multi-table assignments does not matter.
const UPDATE_FAILED: &str = concat!(
    "UPDATE ",
    failed_table!(),
    " STRAIGHT_JOIN txbus_deliveries t FORCE INDEX (PRIMARY)
      ON t.event_id = x.event_id AND t.listener = x.listener AND t.attempts = x.attempts
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

/// Writes the results of a batch: the successes in one statement, the other results in a
/// short transaction that locks the deliveries they still hold first.
pub(super) async fn record(
    conn: &mut AsyncMysqlConnection,
    outcomes: &[Outcome],
    retain: bool,
) -> QueryResult<Recorded> {
    let (done, other) = split_done(outcomes);
    let mut recorded = Recorded::default();
    if !done.is_empty() {
        read_committed::<Mysql>(conn).await?;
        recorded.applied +=
            sql::<<Mysql as Backend>::Db>(if retain { MARK_DONE } else { DELETE_DONE })
                .bind(done_json(&done))
                .execute(conn)
                .await?;
    }
    if !other.is_empty() {
        let failures = failed_json(&other);
        read_committed::<Mysql>(conn).await?;
        Mysql::begin(conn).await?;
        let written = write_failed(conn, &failures).await;
        let (applied, held) = finish::<Mysql, _, _>(conn, written).await?;
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
