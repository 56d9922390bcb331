//! The database side of the bus: one sealed trait, implemented once per backend.
//!
//! Every SQL statement lives in the backend files beside this one. The engine above only calls
//! the methods of [`Backend`], so it never needs to know which database it runs on.
//!
//! Storage (see the migrations): one table, `txbus_deliveries`, with one row per (event,
//! listener) that carries the event (name, JSON payload, emit time, lease length) and the
//! delivery's state: attempts, when it is next available (a retry time, or the end of a lease),
//! when it expires, and for dead letters when and why it died. A row is written in the emitting
//! transaction and deleted when its listener succeeds; an event's id comes from a sequence.
//!
//! One table rather than events plus deliveries: an emit then writes one row and two index
//! entries per listener instead of two rows, four index entries and a foreign-key check, and a
//! success is one fenced delete with nothing left to clean up. Measured with pgbench on
//! PostgreSQL at 16 clients, the same statements in the same round trips, beside a plain upsert
//! transaction: 0.74× its rate for one table, 0.64× for two (BENCHMARKS.md). An event with
//! several listeners stores its payload once per listener.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use diesel::QueryResult;
use diesel_async::AsyncConnection;

use crate::{DeadReason, Error, EventId, MessageId, Operation};

#[cfg(feature = "mysql")]
pub(crate) mod mysql;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
mod rows;
mod sql;
#[cfg(feature = "sqlite")]
pub(crate) mod sqlite;

mod sealed {
    pub trait Sealed {}
}
pub(crate) use sealed::Sealed;

/// A database txbus runs on: `Postgres`, `Mysql` or `Sqlite` (each behind its feature).
///
/// This trait is sealed; its methods are the bus's internals and hidden from the docs.
pub trait Backend: Sealed + Sized + Send + Sync + 'static {
    /// The diesel-async connection of this backend, which [`Pool::get`](crate::Pool::get)
    /// hands out and [`Transaction::conn`](crate::Transaction::conn) lends.
    type Connection: AsyncConnection + Send + 'static;

    /// A short name for messages: `"postgres"`, `"sqlite"`.
    const NAME: &'static str;

    /// Whether the database lets one transaction write at a time (SQLite). The bus's writers
    /// in a process then take turns on an async lock, rather than on the database's busy
    /// handler, which sleeps for milliseconds between tries.
    #[doc(hidden)]
    const SINGLE_WRITER: bool = false;

    /// The pool's connection manager.
    #[doc(hidden)]
    type Manager: deadpool::managed::Manager<
            Type = Self::Connection,
            Error = diesel_async::pooled_connection::PoolError,
        > + Send
        + Sync
        + 'static;

    #[doc(hidden)]
    fn manager(url: &str) -> Result<Self::Manager, Error>;

    /// Opens a transaction for [`EventBus::transaction`](crate::EventBus::transaction).
    #[doc(hidden)]
    fn begin(conn: &mut Self::Connection) -> impl Future<Output = QueryResult<()>> + Send;

    /// Writes an emit: a transaction of `ops` in order, then the event's deliveries, committed.
    /// When it returns the transaction is over: committed on `Ok`; on `Err` rolled back, or
    /// left for the caller's rollback when the transaction manager still counts it open.
    #[doc(hidden)]
    fn emit_with(
        conn: &mut Self::Connection,
        ops: &[Operation<'_, Self>],
        event: &NewEvent,
    ) -> impl Future<Output = QueryResult<Inserted>> + Send {
        async move {
            Self::begin(conn).await?;
            for op in ops {
                op.run(conn).await?;
            }
            Self::commit_with_event(conn, event).await
        }
    }

    /// Inserts one delivery per listener of the event, leased to the emitter for `event.lease`.
    /// With no listener, writes nothing and only reserves an id.
    #[doc(hidden)]
    fn insert_event(
        conn: &mut Self::Connection,
        event: &NewEvent,
    ) -> impl Future<Output = QueryResult<Inserted>> + Send;

    /// Writes the event as the last statement of the transaction opened by [`Backend::begin`]
    /// and commits. When it returns the transaction is over: committed on `Ok`, rolled back (or
    /// the connection broken) on `Err`.
    #[doc(hidden)]
    fn commit_with_event(
        conn: &mut Self::Connection,
        event: &NewEvent,
    ) -> impl Future<Output = QueryResult<Inserted>> + Send {
        async move {
            use diesel_async::TransactionManager;
            type Manager<C> = <C as AsyncConnection>::TransactionManager;
            match Self::insert_event(conn, event).await {
                Ok(inserted) => {
                    Manager::<Self::Connection>::commit_transaction(conn).await?;
                    Ok(inserted)
                }
                Err(error) => {
                    // Keep the first error; a failed rollback leaves the connection broken,
                    // and the pool drops it.
                    let _ = Manager::<Self::Connection>::rollback_transaction(conn).await;
                    Err(error)
                }
            }
        }
    }

    /// Writes the event alone in a transaction of its own (an emit without entity operations).
    #[doc(hidden)]
    fn emit_alone(
        conn: &mut Self::Connection,
        event: &NewEvent,
    ) -> impl Future<Output = QueryResult<Inserted>> + Send {
        async move {
            Self::begin(conn).await?;
            Self::commit_with_event(conn, event).await
        }
    }

    /// Leases up to `limit` due deliveries of `listeners`, oldest due first, in one statement
    /// that concurrent claimers cannot overlap.
    #[doc(hidden)]
    fn claim(
        conn: &mut Self::Connection,
        listeners: &[&'static str],
        limit: usize,
    ) -> impl Future<Output = QueryResult<Vec<Claimed>>> + Send;

    /// Records the results of runs, each only if the delivery is still held by that attempt.
    /// With `retain`, a success marks the delivery delivered instead of deleting it.
    #[doc(hidden)]
    fn record(
        conn: &mut Self::Connection,
        outcomes: &[Outcome],
        retain: bool,
    ) -> impl Future<Output = QueryResult<Recorded>> + Send;

    /// Makes up to `limit` expired deliveries of listeners not in `known` dead, as
    /// "no_listener". (Expired deliveries of known listeners die when they are claimed.)
    #[doc(hidden)]
    fn expire(
        conn: &mut Self::Connection,
        known: &[&'static str],
        limit: usize,
    ) -> impl Future<Output = QueryResult<Vec<Died>>> + Send;

    /// Counts due deliveries, per listener, of listeners not in `known` (at most `limit` rows
    /// looked at): work waiting for an instance that has those listeners.
    #[doc(hidden)]
    fn orphans(
        conn: &mut Self::Connection,
        known: &[&'static str],
        limit: usize,
    ) -> impl Future<Output = QueryResult<Vec<(String, i64)>>> + Send;

    /// Records the receipt of message `id`, unless it was received within `window`: returns
    /// whether this is its first receipt. Insert-or-ignore on the primary key, so concurrent
    /// receipts of one id accept it once.
    #[doc(hidden)]
    fn reserve_message(
        conn: &mut Self::Connection,
        id: &MessageId,
        window: Duration,
    ) -> impl Future<Output = QueryResult<bool>> + Send;

    /// Deletes up to `limit` receipt records older than `window`.
    #[doc(hidden)]
    fn purge_inbox(
        conn: &mut Self::Connection,
        window: Duration,
        limit: usize,
    ) -> impl Future<Output = QueryResult<usize>> + Send;

    /// Deletes a delivery (marks it delivered, with `retain`) in the transaction of a
    /// transactional listener, if that run still holds it (its attempt number matches): returns
    /// whether it did.
    #[doc(hidden)]
    fn complete_in_transaction(
        conn: &mut Self::Connection,
        event_id: i64,
        listener: &'static str,
        attempt: i32,
        retain: bool,
    ) -> impl Future<Output = QueryResult<bool>> + Send;

    /// Counts the deliveries of every listener by state, and the inbox's records, in one
    /// statement.
    #[doc(hidden)]
    fn stats(conn: &mut Self::Connection) -> impl Future<Output = QueryResult<StatsRows>> + Send;

    /// Up to `limit` dead letters matching `filter`, newest first (by death time, then event
    /// id descending, then listener).
    #[doc(hidden)]
    fn dead_letters(
        conn: &mut Self::Connection,
        filter: &DeadFilter<'_>,
        limit: usize,
    ) -> impl Future<Output = QueryResult<Vec<DeadRow>>> + Send;

    /// Makes up to `limit` dead letters matching `filter` whose key (event id, listener) comes
    /// after `after`, in key order, pending again: due now, lease and error reason cleared,
    /// expiring after the same window as when emitted (counted from now). The attempt count
    /// stays (it fences the results of older runs). Returns the keys replayed.
    #[doc(hidden)]
    fn replay(
        conn: &mut Self::Connection,
        filter: &DeadFilter<'_>,
        after: &DeliveryRef,
        limit: usize,
    ) -> impl Future<Output = QueryResult<Vec<DeliveryRef>>> + Send;

    /// Deletes up to `limit` dead letters that died more than `older_than` ago.
    #[doc(hidden)]
    fn purge_dead(
        conn: &mut Self::Connection,
        older_than: Duration,
        limit: usize,
    ) -> impl Future<Output = QueryResult<usize>> + Send;

    /// One retention round, unless another instance is running one (then `None`): deletes
    /// deliveries delivered more than `retain_delivered` ago and dead letters that died more
    /// than `retain_dead` ago, `limit` rows per statement, at most `max_batches` statements of
    /// each. Exclusive across instances without a lock service: an advisory lock, `GET_LOCK`,
    /// or SQLite's single writer. Returns the rows deleted.
    #[doc(hidden)]
    fn cleanup(
        conn: &mut Self::Connection,
        retention: Retention,
        limit: usize,
        max_batches: usize,
    ) -> impl Future<Output = QueryResult<Option<usize>>> + Send;

    /// Makes deliveries whose lease has passed without a result (stale) due, without a lease.
    /// Returns how many.
    #[doc(hidden)]
    fn release_stale(
        conn: &mut Self::Connection,
    ) -> impl Future<Output = QueryResult<usize>> + Send;

    /// Keeps a message for the `InboxStore`, unless one with its id is kept already.
    #[doc(hidden)]
    fn store_message(
        conn: &mut Self::Connection,
        id: &MessageId,
        payload: &str,
    ) -> impl Future<Output = QueryResult<bool>> + Send;

    /// Leases the oldest available message of the `InboxStore` for `lease`.
    #[doc(hidden)]
    fn next_message(
        conn: &mut Self::Connection,
        lease: Duration,
    ) -> impl Future<Output = QueryResult<Option<StoredMessage>>> + Send;

    /// Deletes a message of the `InboxStore` if it was not handed out again since.
    #[doc(hidden)]
    fn delete_message(
        conn: &mut Self::Connection,
        id: &MessageId,
        deliveries: i32,
    ) -> impl Future<Output = QueryResult<bool>> + Send;

    /// How many messages the `InboxStore` keeps.
    #[doc(hidden)]
    fn message_count(conn: &mut Self::Connection) -> impl Future<Output = QueryResult<i64>> + Send;

    /// Housekeeping the poller runs now and then.
    #[doc(hidden)]
    fn maintain(_conn: &mut Self::Connection) -> impl Future<Output = QueryResult<()>> + Send {
        async { Ok(()) }
    }

    /// Applies the pending migrations under a lock that serializes concurrent starts. Returns the
    /// versions applied.
    #[doc(hidden)]
    fn migrate(
        conn: &mut Self::Connection,
    ) -> impl Future<Output = Result<Vec<String>, Error>> + Send;
}

/// How long finished deliveries are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub(crate) delivered: Duration,
    pub(crate) dead: Duration,
}

/// The counts of one listener's deliveries by state, as [`Backend::stats`] reads them. A live
/// delivery (neither dead nor delivered) is exactly one of: due (available, not leased),
/// running (leased, lease not passed), stale (leased, lease passed without a result), retrying
/// (not leased, available later).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ListenerRow {
    pub(crate) listener: String,
    pub(crate) due: i64,
    pub(crate) running: i64,
    pub(crate) stale: i64,
    pub(crate) retrying: i64,
    pub(crate) dead: i64,
    pub(crate) delivered: i64,
    /// The earliest emit time of its live deliveries, in microseconds since the Unix epoch.
    pub(crate) oldest_pending_us: Option<i64>,
}

/// What [`Backend::stats`] returns.
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
}

/// A delivery's key (read by every backend's replay from columns `event_id`, `listener`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, diesel::QueryableByName)]
pub struct DeliveryRef {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub(crate) event_id: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub(crate) listener: String,
}

impl DeliveryRef {
    /// Before every key.
    pub(crate) fn first() -> Self {
        Self {
            event_id: i64::MIN,
            listener: String::new(),
        }
    }
}

/// A dead letter, as stored (read by every backend's dead-letter list, its columns named as
/// the fields).
#[derive(Debug, Clone, PartialEq, Eq, diesel::QueryableByName)]
pub struct DeadRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub(crate) event_id: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub(crate) event_name: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub(crate) listener: String,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub(crate) attempts: i32,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub(crate) reason: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    pub(crate) last_error: Option<String>,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub(crate) emitted_at_us: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub(crate) dead_at_us: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub(crate) payload: String,
}

/// A row of every backend's statistics statement: one per listener (none when the table is
/// empty: then one with a `NULL` listener), each with the inbox counts and the clock.
#[derive(diesel::QueryableByName)]
pub(crate) struct StatsRow {
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    listener: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    due: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    running: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    stale: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    retrying: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    dead: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    delivered: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    oldest_us: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    inbox_ids: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    inbox_messages: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    now_us: i64,
}

impl StatsRows {
    pub(crate) fn from_rows(rows: Vec<StatsRow>) -> Self {
        let mut stats = Self::default();
        for row in rows {
            (stats.inbox_ids, stats.inbox_messages, stats.now_us) =
                (row.inbox_ids, row.inbox_messages, row.now_us);
            if let Some(listener) = row.listener {
                stats.listeners.push(ListenerRow {
                    listener,
                    due: row.due.unwrap_or(0),
                    running: row.running.unwrap_or(0),
                    stale: row.stale.unwrap_or(0),
                    retrying: row.retrying.unwrap_or(0),
                    dead: row.dead.unwrap_or(0),
                    delivered: row.delivered.unwrap_or(0),
                    oldest_pending_us: row.oldest_us,
                });
            }
        }
        stats
    }
}

/// A message of the `InboxStore`, as stored (read by every backend with columns named as the
/// fields).
#[derive(Debug, Clone, PartialEq, Eq, diesel::QueryableByName)]
pub struct StoredMessage {
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub(crate) source: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub(crate) key: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub(crate) payload: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub(crate) received_at_us: i64,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub(crate) deliveries: i32,
}

/// An event about to be written.
#[derive(Debug)]
pub struct NewEvent {
    pub(crate) name: &'static str,
    pub(crate) payload: Arc<str>,
    pub(crate) listeners: Arc<[&'static str]>,
    pub(crate) lease: Duration,
    pub(crate) expires_after: Duration,
}

/// A written event.
#[derive(Debug, Clone, Copy)]
pub struct Inserted {
    pub(crate) id: EventId,
    pub(crate) emitted_at: SystemTime,
}

/// A delivery leased by [`Backend::claim`], or found expired by it (and made dead).
#[derive(Debug)]
pub struct Claimed {
    pub(crate) event_id: EventId,
    pub(crate) listener: String,
    pub(crate) attempt: u32,
    pub(crate) payload: Arc<str>,
    pub(crate) emitted_at: SystemTime,
    pub(crate) lease: Duration,
    pub(crate) expired: bool,
}

/// One run of a delivery: the attempt number is the fence token of its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeliveryKey {
    pub(crate) event_id: EventId,
    pub(crate) listener: &'static str,
    pub(crate) attempt: u32,
}

/// What to record for a run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Resolution {
    /// It succeeded: delete the delivery (and the event when it has none left).
    Done,
    /// It failed: try again after `delay`, or die as expired if that is past the expiry.
    Retry { delay: Duration, error: String },
    /// It gave up.
    Dead { reason: DeadReason, error: String },
    /// It was not finished here: make it available at once. `undo_attempt` when it never started.
    Release {
        undo_attempt: bool,
        error: Option<String>,
    },
}

/// The result of one run, for [`Backend::record`].
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub(crate) key: DeliveryKey,
    pub(crate) resolution: Resolution,
}

/// What [`Backend::record`] did.
#[derive(Debug, Default)]
pub struct Recorded {
    /// Outcomes written.
    pub(crate) applied: usize,
    /// Deliveries that became dead letters.
    pub(crate) died: Vec<Died>,
}

/// A delivery that became a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Died {
    pub(crate) event_id: EventId,
    pub(crate) listener: String,
    pub(crate) reason: String,
}

/// Splits `outcomes` into the keys of successes and the rest.
pub(crate) fn split_done(outcomes: &[Outcome]) -> (Vec<DeliveryKey>, Vec<&Outcome>) {
    let mut done = Vec::new();
    let mut other = Vec::new();
    for outcome in outcomes {
        match outcome.resolution {
            Resolution::Done => done.push(outcome.key),
            _ => other.push(outcome),
        }
    }
    (done, other)
}

/// Converts a duration to whole microseconds for binding; settings are validated to fit.
pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// A row limit, for binding.
pub(crate) fn limit_i64(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Converts whole microseconds since the Unix epoch to a `SystemTime`.
pub(crate) fn system_time_from_micros(us: i64) -> SystemTime {
    let magnitude = Duration::from_micros(us.unsigned_abs());
    if us >= 0 {
        SystemTime::UNIX_EPOCH + magnitude
    } else {
        SystemTime::UNIX_EPOCH - magnitude
    }
}

/// The attempt number as the database stores it.
pub(crate) fn attempt_i32(attempt: u32) -> i32 {
    i32::try_from(attempt).unwrap_or(i32::MAX)
}

/// An attempt number read back from the database.
pub(crate) fn attempt_u32(attempt: i32) -> u32 {
    u32::try_from(attempt).unwrap_or(0)
}

/// The fields of an outcome that is not a success, flattened for binding.
pub(crate) struct UpdateRow {
    pub(crate) delay_us: i64,
    pub(crate) dead_reason: Option<&'static str>,
    pub(crate) error: Option<String>,
    pub(crate) undo_attempt: bool,
}

impl UpdateRow {
    pub(crate) fn new(resolution: &Resolution) -> Self {
        match resolution {
            Resolution::Done => Self {
                delay_us: 0,
                dead_reason: None,
                error: None,
                undo_attempt: false,
            },
            Resolution::Retry { delay, error } => Self {
                delay_us: micros(*delay),
                dead_reason: None,
                error: Some(error.clone()),
                undo_attempt: false,
            },
            Resolution::Dead { reason, error } => Self {
                delay_us: 0,
                dead_reason: Some(reason.as_str()),
                error: Some(error.clone()),
                undo_attempt: false,
            },
            Resolution::Release {
                undo_attempt,
                error,
            } => Self {
                delay_us: 0,
                dead_reason: None,
                error: error.clone(),
                undo_attempt: *undo_attempt,
            },
        }
    }
}
