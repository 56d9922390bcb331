//! Operating the tables: statistics, dead letters and their replay, retention, stale leases.

use std::future::Future;
use std::time::Duration;

use diesel::QueryResult;
use diesel_async::RunQueryDsl;

use crate::store::rows::{DeliveryRef, Lock, micros, rows};
use crate::store::sql::{Sql, SqlDb, sql};
use crate::store::tx::finish;
use crate::store::update::{self, Update, read_committed};
use crate::store::{Backend, rows};

rows! {
    /// A dead letter, as stored.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct DeadRow {
        event_id: i64,
        event_name: String,
        listener: String,
        attempts: i32,
        reason: String,
        last_error: Option<String>,
        emitted_at_us: i64,
        dead_at_us: i64,
        payload: String,
    }

    /// A scheduled delivery not due yet, as stored.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct ScheduledRow {
        event_id: i64,
        event_name: String,
        listener: String,
        due_at_us: i64,
        emitted_at_us: i64,
    }

    /// A row of the statistics statement: one per listener and event version (none when the
    /// table is empty: then one with a `NULL` listener), each with the inbox counts and the
    /// clock.
    pub(crate) struct StatsRow {
        listener: Option<String>,
        due: Option<i64>,
        running: Option<i64>,
        stale: Option<i64>,
        retrying: Option<i64>,
        scheduled: Option<i64>,
        dead: Option<i64>,
        delivered: Option<i64>,
        oldest_us: Option<i64>,
        held_keys: Option<i64>,
        held_since_us: Option<i64>,
        event_version: Option<i64>,
        inbox_ids: i64,
        inbox_messages: i64,
        now_us: i64,
    }
}

/// The counts of one listener's deliveries of one event version by state. A live delivery (neither dead nor
/// delivered) is exactly one of: due (available, not leased), running (leased, lease not
/// passed), stale (leased, lease passed without a result), retrying (not leased, available
/// later, run before), scheduled (not leased, available later, never run).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ListenerRow {
    pub(crate) listener: String,
    /// The version of the event's type that wrote these deliveries.
    pub(crate) event_version: u32,
    pub(crate) due: i64,
    pub(crate) running: i64,
    pub(crate) stale: i64,
    pub(crate) retrying: i64,
    pub(crate) scheduled: i64,
    pub(crate) dead: i64,
    pub(crate) delivered: i64,
    /// Since when the longest-waiting of its deliveries that may run has waited (its emit, or
    /// its due time if it never ran), in microseconds since the Unix epoch.
    pub(crate) oldest_pending_us: Option<i64>,
    /// How many keys its dead letters hold (`block_key_on_dead`).
    pub(crate) held_keys: i64,
    /// When the first of those dead letters died, in microseconds since the Unix epoch.
    pub(crate) held_since_us: Option<i64>,
}

/// What the statistics statement counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsRows {
    pub(crate) listeners: Vec<ListenerRow>,
    /// Received message ids kept for deduplication.
    pub(crate) inbox_ids: i64,
    /// Messages kept by the `InboxStore`.
    pub(crate) inbox_messages: i64,
    /// The database's clock, in microseconds since the Unix epoch.
    pub(crate) now_us: i64,
}

impl StatsRows {
    fn from_rows(rows: Vec<StatsRow>) -> Self {
        let mut stats = Self::default();
        for row in rows {
            (stats.inbox_ids, stats.inbox_messages, stats.now_us) =
                (row.inbox_ids, row.inbox_messages, row.now_us);
            if let Some(listener) = row.listener {
                stats.listeners.push(ListenerRow {
                    listener,
                    event_version: row
                        .event_version
                        .and_then(|v| u32::try_from(v).ok())
                        .unwrap_or(1),
                    due: row.due.unwrap_or(0),
                    running: row.running.unwrap_or(0),
                    stale: row.stale.unwrap_or(0),
                    retrying: row.retrying.unwrap_or(0),
                    scheduled: row.scheduled.unwrap_or(0),
                    dead: row.dead.unwrap_or(0),
                    delivered: row.delivered.unwrap_or(0),
                    oldest_pending_us: row.oldest_us,
                    held_keys: row.held_keys.unwrap_or(0),
                    held_since_us: row.held_since_us,
                });
            }
        }
        stats
    }
}

/// Which dead letters an operation applies to: every condition given must hold.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadFilter<'a> {
    pub(crate) event_id: Option<i64>,
    pub(crate) listener: Option<&'a str>,
    pub(crate) event_name: Option<&'a str>,
    /// Died at or after, in microseconds since the Unix epoch.
    pub(crate) died_after_us: Option<i64>,
    /// Died before, in microseconds since the Unix epoch.
    pub(crate) died_before_us: Option<i64>,
    /// The code of the reason it died for (`DeadReason::as_str`).
    pub(crate) reason: Option<&'a str>,
}

/// `TIMESTAMPDIFF(MICROSECOND, '1970-01-01', '1000-01-01')`: the start of MySQL's `DATETIME`,
/// the narrowest range of times the backends store.
const EARLIEST_US: i64 = -30_610_224_000_000_000;
/// `TIMESTAMPDIFF(MICROSECOND, '1970-01-01', '9999-12-31 23:59:59.999999')`: its end.
const LATEST_US: i64 = 253_402_300_799_999_999;

impl<'a> DeadFilter<'a> {
    /// Binds the filter to `$1` to `$6`. The times are clamped to the range every backend
    /// stores: past it, date arithmetic overflows (to an error, or to `NULL`, which would match
    /// nothing instead of everything); no death lies outside it.
    fn bind<DB: SqlDb>(&self, query: Sql<'a, DB>) -> Sql<'a, DB> {
        let clamp = |us: Option<i64>| us.map(|us| us.clamp(EARLIEST_US, LATEST_US));
        query
            .bind(self.event_id)
            .bind(self.listener)
            .bind(self.event_name)
            .bind(clamp(self.died_after_us))
            .bind(clamp(self.died_before_us))
            .bind(self.reason)
    }
}

/// How long finished deliveries are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub(crate) delivered: Duration,
    pub(crate) dead: Duration,
}

/// How retention rounds of several instances keep from running at once.
#[derive(Debug, Clone, Copy)]
pub enum RoundLock {
    /// The round is one transaction opened by [`Backend::begin`] that first takes this lock,
    /// returning `n` = 1 when it got it (PostgreSQL's transaction-level advisory lock); `None`:
    /// the transaction is the lock (SQLite's writer lock).
    Transaction(Option<&'static str>),
    /// A session lock, taken without waiting (`n` = 1 when taken) and released by hand whatever
    /// the round's result (MySQL's `GET_LOCK`); each delete commits by itself, so a long round
    /// holds no row locks between statements.
    Session {
        lock: &'static str,
        unlock: &'static str,
    },
}

/// The statements of a backend's operations, and the operations on them, written once.
#[doc(hidden)]
pub trait Admin<B: Backend = Self> {
    /// Counts every listener's deliveries by state, and the inbox's records, in one statement:
    /// [`StatsRow`]s.
    const STATS: &'static str;

    /// Up to `$7` dead letters matching the filter `$1`..`$6` (event id, listener, event name,
    /// died at or after and before, in µs, reason code; each `NULL` for any), newest first (by
    /// death time, then event id descending, then listener in byte order), after skipping the
    /// first `$8`: [`DeadRow`]s.
    const DEAD_LETTERS: &'static str;

    /// Up to `$1` scheduled deliveries not due yet (never run, not leased, available later),
    /// soonest due first: [`ScheduledRow`]s.
    const SCHEDULED: &'static str;

    /// Makes up to `$9` dead letters matching `$1`..`$6` whose key comes after (`$7`, `$8`) in
    /// key order (event id, then listener in byte order) pending again: due now, lease and
    /// reason cleared, expiring after the same window as when emitted, counted from now. The
    /// attempt count stays (it fences the results of older runs). Returns their keys.
    const REPLAY: Update;

    /// Deletes up to `$2` dead letters that died more than `$1` µs ago, oldest first.
    const PURGE_DEAD: &'static str;

    /// Makes every parked delivery (see [`Outbox::claim_due`](crate::store::Outbox::claim_due)) due now,
    /// for the claims to look at again: after dead letters that may have held their keys were
    /// deleted.
    const UNPARK: &'static str;

    /// Deletes up to `$2` deliveries delivered more than `$1` µs ago, oldest first.
    const PURGE_DELIVERED: &'static str;

    /// How retention rounds keep from overlapping.
    const ROUND_LOCK: RoundLock;

    /// Makes up to `$1` deliveries whose lease passed without a result (stale) due now, without
    /// a lease (and with a `last_error` saying so, unless one is set), skipping those another
    /// transaction holds. Returns their keys.
    const RELEASE_STALE: Update;

    /// Counts the deliveries of every listener by state, and the inbox's records.
    fn stats(conn: &mut B::Connection) -> impl Future<Output = QueryResult<StatsRows>> + Send {
        async move {
            let rows: Vec<StatsRow> = sql::<B::Db>(Self::STATS).load(conn).await?;
            Ok(StatsRows::from_rows(rows))
        }
    }

    /// Up to `limit` dead letters matching `filter`, newest first, after the first `offset`.
    fn dead_letters(
        conn: &mut B::Connection,
        filter: &DeadFilter<'_>,
        limit: usize,
        offset: usize,
    ) -> impl Future<Output = QueryResult<Vec<DeadRow>>> + Send {
        async move {
            filter
                .bind(sql::<B::Db>(Self::DEAD_LETTERS))
                .bind(rows::limit(limit))
                .bind(rows::limit(offset))
                .load(conn)
                .await
        }
    }

    /// Up to `limit` scheduled deliveries not due yet, soonest first.
    fn scheduled(
        conn: &mut B::Connection,
        limit: usize,
    ) -> impl Future<Output = QueryResult<Vec<ScheduledRow>>> + Send {
        async move {
            sql::<B::Db>(Self::SCHEDULED)
                .bind(rows::limit(limit))
                .load(conn)
                .await
        }
    }

    /// Makes up to `limit` dead letters matching `filter` whose key comes after `after` pending
    /// again (see [`Admin::REPLAY`]). Returns the keys replayed.
    fn replay(
        conn: &mut B::Connection,
        filter: &DeadFilter<'_>,
        after: &DeliveryRef,
        limit: usize,
    ) -> impl Future<Output = QueryResult<Vec<DeliveryRef>>> + Send {
        async move {
            update::keys::<B>(conn, Self::REPLAY, |q| {
                filter
                    .bind(q)
                    .bind(after.event_id)
                    .bind(after.listener.as_str())
                    .bind(rows::limit(limit))
            })
            .await
        }
    }

    /// Deletes up to `limit` dead letters that died more than `older_than` ago.
    fn purge_dead(
        conn: &mut B::Connection,
        older_than: Duration,
        limit: usize,
    ) -> impl Future<Output = QueryResult<usize>> + Send {
        async move { purge::<B>(conn, Self::PURGE_DEAD, older_than, limit).await }
    }

    /// Runs [`UNPARK`](Self::UNPARK).
    fn unpark(conn: &mut B::Connection) -> impl Future<Output = QueryResult<()>> + Send {
        async move { sql::<B::Db>(Self::UNPARK).execute(conn).await.map(drop) }
    }

    /// One retention round, unless another instance is running one (then `None`): deletes
    /// deliveries delivered more than `retention.delivered` ago and dead letters that died more
    /// than `retention.dead` ago, `limit` rows per statement, each kind until a statement finds
    /// fewer or `max_batches` ran, and unparks what deleted dead letters may have held. Returns
    /// the rows deleted.
    fn cleanup(
        conn: &mut B::Connection,
        retention: Retention,
        limit: usize,
        max_batches: usize,
    ) -> impl Future<Output = QueryResult<Option<usize>>> + Send {
        async move {
            match Self::ROUND_LOCK {
                RoundLock::Transaction(lock) => {
                    B::begin(conn).await?;
                    let result = async {
                        if let Some(lock) = lock
                            && !taken::<B>(conn, lock).await?
                        {
                            return Ok(None);
                        }
                        purge_round::<B>(conn, retention, limit, max_batches)
                            .await
                            .map(Some)
                    }
                    .await;
                    finish::<B, _, _>(conn, result).await
                }
                RoundLock::Session { lock, unlock } => {
                    if !taken::<B>(conn, lock).await? {
                        return Ok(None);
                    }
                    let result = purge_round::<B>(conn, retention, limit, max_batches).await;
                    let unlocked = sql::<B::Db>(unlock).load::<Lock>(conn).await;
                    let deleted = result?;
                    unlocked?;
                    Ok(Some(deleted))
                }
            }
        }
    }

    /// Makes the deliveries whose lease has passed without a result due, `batch` per statement
    /// until one finds fewer (a released delivery is no longer stale). Returns how many.
    fn release_stale(
        conn: &mut B::Connection,
        batch: usize,
    ) -> impl Future<Output = QueryResult<usize>> + Send {
        async move {
            let mut released = 0;
            loop {
                let keys =
                    update::keys::<B>(conn, Self::RELEASE_STALE, |q| q.bind(rows::limit(batch)))
                        .await?;
                released += keys.len();
                if keys.len() < batch {
                    return Ok(released);
                }
            }
        }
    }
}

/// Whether the lock `statement` takes was taken.
async fn taken<B: Backend>(conn: &mut B::Connection, statement: &'static str) -> QueryResult<bool> {
    let rows: Vec<Lock> = sql::<B::Db>(statement).load(conn).await?;
    Ok(rows.iter().any(|row| row.n == Some(1)))
}

/// One bounded delete of rows older than `older_than`.
async fn purge<B: Backend>(
    conn: &mut B::Connection,
    statement: &'static str,
    older_than: Duration,
    limit: usize,
) -> QueryResult<usize> {
    read_committed::<B>(conn).await?;
    sql::<B::Db>(statement)
        .bind(micros(older_than))
        .bind(rows::limit(limit))
        .execute(conn)
        .await
}

/// The deletes of a retention round: each kind in up to `max_batches` statements of `limit`
/// rows, stopping early when one finds fewer. Dead letters deleted may have held their keys
/// (`block_key_on_dead`): what a claim parked behind them is made due again, as after a purge.
async fn purge_round<B: Backend>(
    conn: &mut B::Connection,
    retention: Retention,
    limit: usize,
    max_batches: usize,
) -> QueryResult<usize> {
    let delivered = purge_batches::<B>(
        conn,
        B::PURGE_DELIVERED,
        retention.delivered,
        limit,
        max_batches,
    )
    .await?;
    let dead = purge_batches::<B>(conn, B::PURGE_DEAD, retention.dead, limit, max_batches).await?;
    if dead > 0 {
        B::unpark(conn).await?;
    }
    Ok(delivered + dead)
}

/// Up to `max_batches` runs of the delete `statement`, until one deletes fewer than `limit`.
async fn purge_batches<B: Backend>(
    conn: &mut B::Connection,
    statement: &'static str,
    older_than: Duration,
    limit: usize,
    max_batches: usize,
) -> QueryResult<usize> {
    let mut deleted = 0;
    for _ in 0..max_batches {
        let n = purge::<B>(conn, statement, older_than, limit).await?;
        deleted += n;
        if n < limit {
            break;
        }
    }
    Ok(deleted)
}
