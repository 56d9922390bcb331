//! SQLite: the claims of due deliveries, and of the heads of ordering keys.

use std::sync::Arc;

use diesel::sqlite::Sqlite as Db;
use diesel::{QueryResult, RunQueryDsl};

use super::Conn;
use crate::store::Claimed;
use crate::store::rows::{self, ClaimedRow};
use crate::store::sql::sql;

/// Leases the deliveries that the `(event_id, listener, blocked)` rows of `$candidates` name,
/// and parks those `blocked` behind an earlier delivery of their key (see the migration
/// `key_parking`): for as long as they have waited since their emit, at least 30 seconds and at
/// most an hour. The claim of its key's head takes a parked delivery at any time. Expired
/// deliveries are made dead instead of leased (all SET expressions see the old row).
macro_rules! lease_claimed {
    ($($candidates:expr),+) => {
        concat!(
            "UPDATE txbus_deliveries AS t SET
        attempts = CASE WHEN c.blocked OR t.expires_at <= ",
            now_ms!(),
            " THEN t.attempts ELSE t.attempts + 1 END,
        available_at = CASE WHEN c.blocked THEN ",
            now_ms!(),
            " + MAX(30000, MIN(",
            now_ms!(),
            " - t.emitted_at, 3600000)) WHEN t.expires_at <= ",
            now_ms!(),
            " THEN t.available_at ELSE ",
            now_ms!(),
            " + t.lease_ms END,
        leased_at = CASE WHEN c.blocked OR t.expires_at <= ",
            now_ms!(),
            " THEN NULL ELSE ",
            now_ms!(),
            " END,
        dead_at = CASE WHEN NOT c.blocked AND t.expires_at <= ",
            now_ms!(),
            " THEN ",
            now_ms!(),
            " END,
        dead_reason = CASE WHEN NOT c.blocked AND t.expires_at <= ",
            now_ms!(),
            " THEN 'expired' END,
        parked = c.blocked
    FROM (",
            $($candidates),+,
            ") AS c
    WHERE t.event_id = c.event_id AND t.listener = c.listener
    RETURNING event_id, listener, attempts, payload, emitted_at * 1000 AS emitted_at_us,
              lease_ms, dead_at IS NOT NULL AS expired, event_version, ordering_key, parked,
              trace_context, FALSE AS held"
        )
    };
}

/// A delivery `d` of a listener of the list `?1`, at a version it knows (the JSON object
/// `?2`).
macro_rules! runs_here {
    () => {
        "d.listener IN (SELECT value FROM json_each(?1))
          AND (d.event_version = 1 OR d.event_version <= (
               SELECT j.value FROM json_each(?2) j WHERE j.key = d.listener))"
    };
}

/// The condition that a delivery `d` is its key's head, for its listener (always true without a
/// key): no other delivery of the key is pending before it (by event id), or dead before it and
/// holding the key; a scheduled one not due yet does not count. One that may have been passed by
/// a later one (its `available_at` is past its emit) also waits while a later one of its key
/// runs. The partial indexes `txbus_deliveries_key` and `txbus_deliveries_key_leased` serve the
/// two look-ups: the first reads only the deliveries before `d`, the second only the leased ones.
macro_rules! key_head {
    () => {
        concat!(
            "(d.ordering_key IS NULL OR (
              NOT EXISTS (
                SELECT 1 FROM txbus_deliveries p
                WHERE p.listener = d.listener AND p.ordering_key = d.ordering_key
                  AND p.ordering_key IS NOT NULL AND p.delivered_at IS NULL
                  AND (p.dead_at IS NULL OR p.key_hold) AND p.event_id < d.event_id
                  AND (p.dead_at IS NOT NULL OR p.attempts > 0 OR p.parked
                       OR p.available_at <= ",
            now_ms!(),
            "))
              AND (d.available_at <= d.emitted_at OR NOT EXISTS (
                SELECT 1 FROM txbus_deliveries p
                WHERE p.listener = d.listener AND p.ordering_key = d.ordering_key
                  AND p.ordering_key IS NOT NULL AND p.leased_at IS NOT NULL
                  AND p.delivered_at IS NULL AND p.dead_at IS NULL
                  AND p.event_id <> d.event_id AND p.available_at > ",
            now_ms!(),
            "))))"
        )
    };
}

// Every due delivery, oldest due first: leased if it is its key's head, parked otherwise.
pub(super) const CLAIM: &str = lease_claimed!(
    "
        SELECT event_id, listener, NOT ",
    key_head!(),
    " AS blocked
        FROM txbus_deliveries d
        WHERE d.dead_at IS NULL AND d.delivered_at IS NULL AND d.available_at <= ",
    now_ms!(),
    "
          AND ",
    runs_here!(),
    "
        ORDER BY available_at
        LIMIT ?3"
);

// The first delivery of each `[listener, key]` pair of the JSON array `?4`, pending or holding
// its key, by the key index: claimed if it is its key's head and due. (A first one that is
// scheduled and not due yet stops the look-up; the general claim finds what is behind it.) A
// parked one counts as due: it waited for the one before it.
pub(super) const CLAIM_HEADS: &str = lease_claimed!(
    "
        SELECT d.event_id, d.listener, 0 AS blocked FROM json_each(?4) k
        JOIN txbus_deliveries d
          ON d.listener = k.value ->> 0
         AND d.event_id = (
             SELECT h.event_id FROM txbus_deliveries h
             WHERE h.listener = k.value ->> 0 AND h.ordering_key = k.value ->> 1
               AND h.ordering_key IS NOT NULL AND h.delivered_at IS NULL
               AND (h.dead_at IS NULL OR h.key_hold)
             ORDER BY h.event_id
             LIMIT 1)
        WHERE d.dead_at IS NULL AND (d.parked OR d.available_at <= ",
    now_ms!(),
    ")
          AND ",
    runs_here!(),
    "
          AND ",
    key_head!(),
    "
        LIMIT ?3"
);

/// Runs [`CLAIM`], or with `heads` [`CLAIM_HEADS`] of those `(listener, key)` pairs, and reads
/// its rows, in one trip to the blocking pool: through diesel-async's `load` the rows would be
/// copied on the blocking thread and decoded again on the runtime while the poller holds the
/// write turn (BENCHMARKS.md, D1 on SQLite).
pub(super) async fn claim(
    conn: &mut Conn,
    listeners: &[&'static str],
    versions: &str,
    heads: Option<&[(&'static str, Arc<str>)]>,
    limit: usize,
) -> QueryResult<Vec<Claimed>> {
    let listeners = serde_json::Value::from(listeners).to_string();
    let versions = versions.to_owned();
    let heads = heads.map(|heads| {
        serde_json::Value::from(
            heads
                .iter()
                .map(|(listener, key)| serde_json::json!([listener, &**key]))
                .collect::<Vec<_>>(),
        )
        .to_string()
    });
    let rows: Vec<ClaimedRow> = conn
        .spawn_blocking(move |c| {
            let statement = sql::<Db>(if heads.is_some() { CLAIM_HEADS } else { CLAIM })
                .bind(listeners)
                .bind(versions)
                .bind(rows::limit(limit));
            match heads {
                Some(heads) => statement.bind(heads).load(c),
                None => statement.load(c),
            }
        })
        .await?;
    Ok(rows.into_iter().map(Claimed::from).collect())
}
