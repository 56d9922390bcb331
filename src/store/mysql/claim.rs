//! MySQL / MariaDB: the claims of due deliveries, and of the heads of ordering keys, with
//! parking.
//!
//! A claim selects and locks its candidates, then, in the same `READ COMMITTED` transaction,
//! leases those that are their key's heads and parks the others (see the migration
//! `key_parking`): a parked delivery is out of the due range, so that claims of a keyed backlog
//! do not scan it again and again, and the claim of its key's head takes it when the one before
//! it finishes. A delivery is parked only under the row of its listener and its key's bucket in
//! `txbus_key_parks`, taken without waiting and followed by a fresh look at its key; the claim
//! of a key's head takes that row, waiting, before it looks. So a claim of heads that runs
//! after a head's result is written either sees the next delivery parked, or the claim that
//! would park it sees that the head is done and leases it instead.

use std::collections::BTreeSet;
use std::sync::Arc;

use diesel::QueryResult;
use diesel_async::{AsyncMysqlConnection, RunQueryDsl};
use serde_json::json;

use super::{Mysql, bucket_of, keys_table, listeners_table};
use crate::store::rows::{self, ClaimedRow, DeliveryRef, KeyRow, rows};
use crate::store::sql::sql;
use crate::store::tx::finish;
use crate::store::update::{key_json, read_committed};
use crate::store::{Backend, Claimed};

/// The condition that a due delivery `d` is its key's head, for its listener (always true
/// without a key): no other delivery of the key is pending before it (by event id), or dead
/// before it and holding the key; a scheduled one not due yet does not count, a parked one does.
/// One that may have been passed by a later one (a retry, a scheduled or replayed one: its
/// `available_at` is past its emit) also waits while a later one of its key runs. The index
/// `txbus_deliveries_key` serves the look-up: named, since MariaDB otherwise reads the pending
/// deliveries of every key through the due index, for each candidate.
macro_rules! key_head {
    () => {
        "(d.ordering_key IS NULL OR NOT EXISTS (
          SELECT 1 FROM txbus_deliveries p FORCE INDEX (txbus_deliveries_key)
          WHERE p.listener = d.listener AND p.ordering_key = d.ordering_key
            AND p.delivered_at IS NULL AND (p.dead_at IS NULL OR p.key_hold)
            AND p.event_id <> d.event_id
            AND ((p.event_id < d.event_id
                  AND (p.dead_at IS NOT NULL OR p.attempts > 0 OR p.parked
                       OR p.available_at <= UTC_TIMESTAMP(6)))
                 OR (d.available_at > d.emitted_at AND p.dead_at IS NULL
                     AND p.leased_at IS NOT NULL AND p.available_at > UTC_TIMESTAMP(6)))))"
    };
}

/// Opens a JSON array of `[listener, ordering_key]` pairs as a table `k`.
macro_rules! pairs_table {
    () => {
        "JSON_TABLE(?, '$[*]' COLUMNS (
            listener VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[0]',
            ordering_key VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[1]')) k"
    };
}

/// A delivery `d` of a listener of the list `?`, at a version it knows (the JSON object `?`).
macro_rules! runs_here {
    () => {
        concat!(
            "d.listener IN (SELECT listener FROM ",
            listeners_table!(),
            ")
      AND (d.event_version = 1
           OR d.event_version <= JSON_VALUE(?, CONCAT('$.', JSON_QUOTE(d.listener))))"
        )
    };
}

/// Every due delivery, oldest due first, and whether it waits behind an earlier one of its key.
const CANDIDATES: &str = concat!(
    "SELECT d.event_id, d.listener, d.ordering_key, NOT ",
    key_head!(),
    " AS blocked
    FROM txbus_deliveries d
    WHERE d.delivered_at IS NULL AND d.dead_at IS NULL AND d.available_at <= UTC_TIMESTAMP(6)
      AND ",
    runs_here!(),
    "
    ORDER BY d.available_at
    LIMIT ?
    FOR UPDATE SKIP LOCKED"
);

/// The first delivery of each `[listener, key]` pair of the JSON array, pending or holding its
/// key, by the key index (named: MariaDB otherwise reads the primary key in order until it
/// finds one): a candidate if it is its key's head and due. (A first one that is
/// scheduled and not due yet stops the look-up; the general claim finds what is behind it.) A
/// parked one counts as due: it waited for the one before it. MariaDB has no `LATERAL`: the
/// first is a correlated look-up, which reads without locking. A first one that another
/// transaction holds is waited for, not skipped: a general claim whose plan scans the table (a
/// small one) holds each row it reads for a moment, and a parked head skipped then would wait
/// for the end of its parking. Nothing that holds a delivery waits for a parking row.
const HEADS: &str = concat!(
    "SELECT d.event_id, d.listener, d.ordering_key, FALSE AS blocked
    FROM ",
    pairs_table!(),
    "
    STRAIGHT_JOIN txbus_deliveries d FORCE INDEX (PRIMARY)
      ON d.listener = k.listener
     AND d.event_id = (
         SELECT h.event_id FROM txbus_deliveries h FORCE INDEX (txbus_deliveries_key)
         WHERE h.listener = k.listener AND h.ordering_key = k.ordering_key
           AND h.delivered_at IS NULL AND (h.dead_at IS NULL OR h.key_hold)
         ORDER BY h.event_id
         LIMIT 1)
    WHERE d.delivered_at IS NULL AND d.dead_at IS NULL
      AND (d.parked OR d.available_at <= UTC_TIMESTAMP(6))
      AND ",
    runs_here!(),
    "
      AND ",
    key_head!(),
    "
    LIMIT ?
    FOR UPDATE"
);

/// Locks the parking rows of the JSON array of `[listener, key]` pairs (the rows of their keys'
/// buckets), and returns the pairs whose row it took.
macro_rules! lock_parks {
    ($how:literal) => {
        concat!(
            "SELECT k.listener, k.ordering_key FROM ",
            pairs_table!(),
            " STRAIGHT_JOIN txbus_key_parks p FORCE INDEX (PRIMARY)
      ON p.listener = k.listener AND p.bucket = ",
            bucket_of!("k.ordering_key"),
            "
    FOR UPDATE",
            $how
        )
    };
}

/// Takes the parking rows of the pairs, waiting for a claim that parks under one of them.
const LOCK_PARKS: &str = lock_parks!("");

/// Takes those parking rows of the pairs that no one holds.
const TRY_LOCK_PARKS: &str = lock_parks!(" SKIP LOCKED");

/// Adds the parking rows that a claim could not take, where they are missing: after its
/// transaction, so that the claim never waits for another one adding or holding the same.
const ADD_PARKS: &str = concat!(
    "INSERT IGNORE INTO txbus_key_parks (listener, bucket)
    SELECT k.listener, ",
    bucket_of!("k.ordering_key"),
    " FROM ",
    pairs_table!()
);

/// Those of the deliveries `k` that still wait behind an earlier one of their key: a statement
/// of its own, whose view starts after the parking rows were taken.
const STILL_BLOCKED: &str = concat!(
    "SELECT d.event_id, d.listener FROM txbus_deliveries d JOIN ",
    keys_table!(),
    " ON d.event_id = k.event_id AND d.listener = k.listener
    WHERE NOT ",
    key_head!()
);

/// Leases the deliveries of the JSON array of `[event_id, listener, park]`, or parks those
/// marked `park`: for as long as they have waited since their emit, at least 30 seconds and at
/// most an hour, so that a delivery held up for long is looked at rarely. Expired deliveries
/// are made dead instead of leased. Every CASE tests `k.park` or `expires_at`, which no
/// assignment changes, so the (unspecified) order of multi-table assignments does not matter.
const LEASE: &str = "\
UPDATE JSON_TABLE(?, '$[*]' COLUMNS (
        event_id BIGINT PATH '$[0]',
        listener VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[1]',
        park BOOLEAN PATH '$[2]')) k
    STRAIGHT_JOIN txbus_deliveries d FORCE INDEX (PRIMARY)
    ON d.event_id = k.event_id AND d.listener = k.listener
SET d.dead_reason = CASE WHEN NOT k.park AND d.expires_at <= UTC_TIMESTAMP(6)
                         THEN 'expired' END,
    d.dead_at = CASE WHEN NOT k.park AND d.expires_at <= UTC_TIMESTAMP(6)
                     THEN UTC_TIMESTAMP(6) END,
    d.attempts = CASE WHEN k.park OR d.expires_at <= UTC_TIMESTAMP(6) THEN d.attempts
                      ELSE d.attempts + 1 END,
    d.leased_at = CASE WHEN k.park OR d.expires_at <= UTC_TIMESTAMP(6) THEN NULL
                       ELSE UTC_TIMESTAMP(6) END,
    d.available_at = CASE
        WHEN k.park THEN UTC_TIMESTAMP(6) + INTERVAL GREATEST(30000000, LEAST(
            TIMESTAMPDIFF(MICROSECOND, d.emitted_at, UTC_TIMESTAMP(6)), 3600000000)) MICROSECOND
        WHEN d.expires_at <= UTC_TIMESTAMP(6) THEN d.available_at
        ELSE UTC_TIMESTAMP(6) + INTERVAL d.lease_ms * 1000 MICROSECOND END,
    d.parked = k.park";

/// Reads the deliveries of the JSON array of `[event_id, listener]` back as claimed.
const READ: &str = concat!(
    "SELECT d.event_id, d.listener, d.attempts, d.payload,
           TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', d.emitted_at) AS emitted_at_us,
           d.lease_ms, d.dead_at IS NOT NULL AS expired, d.event_version, d.ordering_key,
           d.parked, d.trace_context, FALSE AS held
    FROM txbus_deliveries d JOIN ",
    keys_table!(),
    " ON d.event_id = k.event_id AND d.listener = k.listener"
);

rows! {
    /// A claim's candidate, and whether it waits behind an earlier delivery of its key.
    struct Candidate { event_id: i64, listener: String, ordering_key: Option<String>, blocked: bool }
}

/// Leases up to `limit` due deliveries of `listeners` (at a version in `versions`), or with
/// `heads` only the heads of those `(listener, key)` pairs, and parks what waits behind its
/// key's head (see the module's documentation).
pub(super) async fn claim(
    conn: &mut AsyncMysqlConnection,
    listeners: &[&'static str],
    versions: &str,
    heads: Option<&[(&'static str, Arc<str>)]>,
    limit: usize,
) -> QueryResult<Vec<Claimed>> {
    read_committed::<Mysql>(conn).await?;
    Mysql::begin(conn).await?;
    let result = lease(conn, listeners, versions, heads, limit).await;
    let (claimed, untaken) = finish::<Mysql, _, _>(conn, result).await?;
    if !untaken.is_empty() {
        // Without them the deliveries stay due, and the next claim parks them.
        if let Err(error) = sql::<<Mysql as Backend>::Db>(ADD_PARKS)
            .bind(pairs_json(
                untaken.iter().map(|(l, k)| (l.as_str(), k.as_str())),
            ))
            .execute(conn)
            .await
        {
            tracing::debug!(%error, "could not add parking rows; the next claim tries again");
        }
    }
    Ok(claimed.into_iter().map(Claimed::from).collect())
}

/// A claim's work in its transaction: the claimed rows, and the `(listener, key)` pairs that
/// had no parking row to take.
async fn lease(
    conn: &mut AsyncMysqlConnection,
    listeners: &[&'static str],
    versions: &str,
    heads: Option<&[(&'static str, Arc<str>)]>,
    limit: usize,
) -> QueryResult<(Vec<ClaimedRow>, BTreeSet<(String, String)>)> {
    type Db = <Mysql as Backend>::Db;
    let candidates: Vec<Candidate> = match heads {
        None => {
            sql::<Db>(CANDIDATES)
                .bind_list(listeners)
                .bind(versions)
                .bind(rows::limit(limit))
                .load(conn)
                .await?
        }
        Some(heads) => {
            let pairs = pairs_json(heads.iter().map(|(l, k)| (*l, &**k)));
            let _: Vec<KeyRow> = sql::<Db>(LOCK_PARKS).bind(pairs.clone()).load(conn).await?;
            sql::<Db>(HEADS)
                .bind(pairs)
                .bind_list(listeners)
                .bind(versions)
                .bind(rows::limit(limit))
                .load(conn)
                .await?
        }
    };
    // The heads of keys, leased; the others wait, parked where their parking row is taken.
    let mut rows: Vec<serde_json::Value> = candidates
        .iter()
        .filter(|c| !c.blocked)
        .map(|c| json!([c.event_id, c.listener, false]))
        .collect();
    let blocked: BTreeSet<(String, String)> =
        candidates.iter().filter(|c| c.blocked).map(pair).collect();
    let mut untaken = BTreeSet::new();
    if !blocked.is_empty() {
        let taken: Vec<KeyRow> = sql::<Db>(TRY_LOCK_PARKS)
            .bind(pairs_json(
                blocked.iter().map(|(l, k)| (l.as_str(), k.as_str())),
            ))
            .load(conn)
            .await?;
        let taken: BTreeSet<(String, String)> = taken
            .into_iter()
            .map(|row| (row.listener, row.ordering_key))
            .collect();
        let parkable: Vec<DeliveryRef> = candidates
            .iter()
            .filter(|c| c.blocked && taken.contains(&pair(c)))
            .map(|c| DeliveryRef {
                event_id: c.event_id,
                listener: c.listener.clone(),
            })
            .collect();
        if !parkable.is_empty() {
            // The head they waited for may have finished since the candidates were read.
            let still: BTreeSet<DeliveryRef> = sql::<Db>(STILL_BLOCKED)
                .bind(key_json(&parkable))
                .load::<DeliveryRef>(conn)
                .await?
                .into_iter()
                .collect();
            rows.extend(
                parkable
                    .iter()
                    .map(|d| json!([d.event_id, d.listener, still.contains(d)])),
            );
        }
        untaken = blocked.difference(&taken).cloned().collect();
    }
    if rows.is_empty() {
        return Ok((Vec::new(), untaken));
    }
    // `READ` takes the first two values of each row.
    let rows = serde_json::Value::from(rows).to_string();
    sql::<Db>(LEASE).bind(rows.clone()).execute(conn).await?;
    let claimed = sql::<Db>(READ).bind(rows).load(conn).await?;
    Ok((claimed, untaken))
}

/// A candidate's listener and key.
fn pair(c: &Candidate) -> (String, String) {
    (
        c.listener.clone(),
        c.ordering_key.clone().unwrap_or_default(),
    )
}

/// A JSON array of `[listener, key]` pairs. The claims of heads take their parking rows in the
/// order of their keys (sorted by `take_heads`). Two keys of one bucket share a row, so two
/// claims may still take two rows in opposite orders, if each holds a key of both buckets: InnoDB
/// then fails one of them, whose keys are claimed again at the next poll. Sorting by bucket
/// would rule that out, and made the two-process keyed drain (K1) a sixth slower on MariaDB.
fn pairs_json<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    serde_json::Value::from(pairs.map(|(l, k)| json!([l, k])).collect::<Vec<_>>()).to_string()
}
