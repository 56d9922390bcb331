//! The outbox: events written with their deliveries, due deliveries claimed, results recorded.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use diesel::QueryResult;
use diesel_async::RunQueryDsl;

use crate::delivery::{DeliveryKey, Outcome, Resolution};
use crate::event::EventId;
use crate::store::entity::{Operation, Persist};
use crate::store::rows::{ListenerCount, attempt_i32};
use crate::store::sql::sql;
use crate::store::tx::finish;
use crate::store::update::{self, Update};
use crate::store::{Backend, rows};

/// An event about to be written.
#[derive(Debug)]
pub struct NewEvent {
    pub(crate) name: &'static str,
    pub(crate) payload: Arc<str>,
    pub(crate) listeners: Arc<[&'static str]>,
    pub(crate) lease: Duration,
    pub(crate) expires_after: Duration,
    /// For a scheduled event, how long after the emit (by the database's clock) it falls due
    /// (zero for deliveries no listener here can run, left to the claims of other instances).
    /// Its deliveries are then written not leased (`attempts` 0, `available_at` the due time),
    /// and expire `expires_after` past the due time.
    pub(crate) due_in: Option<Duration>,
    /// The version of the event's type ([`Event::VERSION`](crate::Event::VERSION)).
    pub(crate) version: u32,
    /// The event's ordering key ([`Event::ordering_key`](crate::Event::ordering_key)). A keyed
    /// event's deliveries are written not leased (`due_in` zero), for the claims that take each
    /// key's head, unless the insert finds them the heads of their key ([`Self::lease_head`]).
    pub(crate) ordering_key: Option<Arc<str>>,
    /// Whether a dead letter of a keyed delivery holds its key
    /// ([`EventSettings::block_key_on_dead`](crate::EventSettings::block_key_on_dead)).
    pub(crate) key_hold: bool,
    /// A keyed event due now that every listener here can run: where the backend can tell in
    /// the insert, its deliveries are written leased to the emitter when none of its key is
    /// pending (or holding the key) for its listeners ([`Inserted::head`]). Set where the event
    /// is prepared, and cleared where it is scheduled for later.
    pub(crate) lease_head: bool,
    /// The W3C trace context of the span that emitted or received it (`traceparent`, and
    /// `tracestate` on a second line), with the `opentelemetry` feature; `None` otherwise.
    pub(crate) trace: Option<Arc<str>>,
}

impl NewEvent {
    /// The version, as the column stores it.
    pub(crate) fn version_i32(&self) -> i32 {
        i32::try_from(self.version).unwrap_or(i32::MAX)
    }

    /// Microseconds from the emit to the expiry of its deliveries: `expires_after`, counted
    /// from the due time for a scheduled event.
    pub(crate) fn expires_us(&self) -> i64 {
        rows::micros(
            self.due_in
                .unwrap_or_default()
                .saturating_add(self.expires_after),
        )
    }
}

/// A written event.
#[derive(Debug, Clone, Copy)]
pub struct Inserted {
    pub(crate) id: EventId,
    pub(crate) emitted_at: SystemTime,
    /// A keyed event's deliveries were written leased to the emitter, as the heads of their
    /// key (see [`NewEvent::lease_head`]).
    pub(crate) head: bool,
}

/// A delivery leased by a claim, or found expired by it (and made dead).
#[derive(Debug)]
pub struct Claimed {
    pub(crate) event_id: EventId,
    pub(crate) listener: String,
    pub(crate) attempt: u32,
    pub(crate) payload: Arc<str>,
    pub(crate) emitted_at: SystemTime,
    pub(crate) lease: Duration,
    pub(crate) expired: bool,
    /// The version of the event's type that wrote the payload.
    pub(crate) version: u32,
    /// The event's ordering key.
    pub(crate) ordering_key: Option<String>,
    /// Not leased: parked behind an earlier delivery of its key, which the claim of its key's
    /// head takes as due.
    pub(crate) parked: bool,
    /// Not leased: its key's head, which another transaction held when a claim of heads
    /// found it. The claim of its key's head is tried again at the next poll.
    pub(crate) held: bool,
    /// The stored trace context (see [`NewEvent::trace`]).
    pub(crate) trace: Option<Arc<str>>,
}

/// What a result write did.
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

/// Writing events and their deliveries, claiming due ones, recording results: the statements
/// of a backend, and the writes only it knows how to make fast.
///
/// A delivery is written in the emitting transaction already leased to the emitter
/// (`attempts` 1, `available_at` the end of the lease), and deleted when its listener succeeds
/// (or marked `delivered_at`, when successes are retained). Every result is fenced by the
/// attempt number of the run that reports it, and only applies to a pending delivery (neither
/// dead nor delivered).
#[doc(hidden)]
pub trait Outbox<B: Backend = Self> {
    /// Makes up to `$3` expired due deliveries dead that no listener here can run: those of
    /// listeners not in the list `$1`, as `no_listener` (with a `last_error` naming the
    /// listener, unless one is set), and those of listeners in it stored at a version newer
    /// than the listener's in the JSON object `$2`, as `unknown_version`. Returns their keys.
    const EXPIRE: Update;

    /// Counts the due deliveries of listeners not in the list `$1`, per listener, looking at no
    /// more than `$2` rows: [`ListenerCount`] rows.
    const ORPHANS: &'static str;

    /// How long until the earliest pending delivery of the listeners in the list `$1` that is
    /// not due yet becomes due (a retry, the end of a lease, a scheduled event), if within `$2`
    /// microseconds: a [`NextDue`](rows::NextDue) row. The bound keeps the index scan to the
    /// rows due within it, however many wait for later (or for other listeners).
    const NEXT_DUE: &'static str;

    /// Deletes the deliveries of event `$1` that are pending and not running: not leased, or
    /// leased with the lease passed (a run that can no longer record its result).
    const CANCEL: &'static str;

    /// The listener and ordering key of the keyed deliveries of event `$1` that
    /// [`CANCEL`](Self::CANCEL) deletes ([`KeyRow`]s, read before it), and the statement that
    /// then makes the parked deliveries (see [`claim_due`](Self::claim_due)) of those keys (listeners
    /// in the list `$1`, keys in the list `$2`) due now: the next of a cancelled head's key
    /// runs without waiting for its parking to end.
    ///
    /// [`KeyRow`]: rows::KeyRow
    const CANCEL_KEYS: (&'static str, &'static str);

    /// Deletes delivery (`$1`, `$2`) if it is pending and its `attempts` is `$3`.
    const COMPLETE: &'static str;

    /// Marks it delivered instead (successes retained): `delivered_at` now, no lease.
    const COMPLETE_RETAINED: &'static str;

    /// How a derived entity is persisted.
    const PERSIST: Persist;

    /// Locks ordering key `$1` until the end of the open transaction, where the database does
    /// not serialize writers by itself: a keyed emit takes it before its event id, so that the
    /// emits of one key take their ids in the order they commit, and a claim that sees a
    /// delivery of a key sees every earlier one.
    const LOCK_KEY: Option<&'static str> = None;

    /// Housekeeping the poller runs now and then, if the backend needs any.
    const MAINTAIN: Option<&'static str> = None;

    /// Whether an event emitted alone needs no transaction around [`insert_event`](Self::insert_event):
    /// it writes every delivery in one statement, atomic by itself.
    const INSERT_IS_ATOMIC: bool = false;

    /// The most event ids [`reserve_ids`](Self::reserve_ids) is asked for at once. A
    /// transaction's `tx.emit`s take their ids in blocks that start at
    /// [`FIRST_ID_BLOCK`](Self::FIRST_ID_BLOCK) and double up to it.
    const ID_BLOCK: usize;

    /// The first block of ids a transaction takes: small where an id costs a row.
    const FIRST_ID_BLOCK: usize = 16;

    /// Takes `n` fresh event ids (or fewer, at least one, where the database can only hand
    /// them out one by one), in increasing order, each with the database clock, in the
    /// transaction open on `conn`. Their deliveries are written by
    /// [`commit_with_events`](Self::commit_with_events).
    fn reserve_ids(
        conn: &mut B::Connection,
        n: usize,
    ) -> impl Future<Output = QueryResult<Vec<Inserted>>> + Send;

    /// Takes the lock of ordering `key` (see [`LOCK_KEY`](Self::LOCK_KEY)), then one fresh
    /// event id, in the transaction open on `conn`: the id of a keyed `tx.emit`.
    fn reserve_keyed_id(
        conn: &mut B::Connection,
        key: &str,
    ) -> impl Future<Output = QueryResult<Inserted>> + Send {
        async move {
            if let Some(lock) = Self::LOCK_KEY {
                sql::<B::Db>(lock).bind(key).execute(conn).await?;
            }
            B::reserve_ids(conn, 1).await?.pop().ok_or_else(|| {
                diesel::result::Error::QueryBuilderError("the database returned no event id".into())
            })
        }
    }

    /// Writes the deliveries of `events`, whose ids and emit times were reserved, as the last
    /// statement of the transaction opened by [`Backend::begin`], and commits: each delivery
    /// leased to the emitter from its event's emit time. When it returns the transaction is
    /// over: committed on `Ok`; on `Err` rolled back, or left for the caller's rollback when
    /// the transaction manager still counts it open.
    fn commit_with_events(
        conn: &mut B::Connection,
        events: &[(Inserted, &NewEvent)],
    ) -> impl Future<Output = QueryResult<()>> + Send;

    /// Writes one delivery per listener of `event`, leased to the emitter, in the transaction
    /// open on `conn`. With no listener, writes nothing and only reserves an id.
    fn insert_event(
        conn: &mut B::Connection,
        event: &NewEvent,
    ) -> impl Future<Output = QueryResult<Inserted>> + Send;

    /// Records the results of runs, each only if the delivery is still held by that attempt.
    /// With `retain`, a success marks the delivery delivered instead of deleting it.
    fn record(
        conn: &mut B::Connection,
        outcomes: &[Outcome],
        retain: bool,
    ) -> impl Future<Output = QueryResult<Recorded>> + Send;

    /// Writes the event as the last statement of the transaction opened by [`Backend::begin`]
    /// and commits. When it returns the transaction is over: committed on `Ok`, rolled back (or
    /// the connection broken) on `Err`.
    fn commit_with_event(
        conn: &mut B::Connection,
        event: &NewEvent,
    ) -> impl Future<Output = QueryResult<Inserted>> + Send {
        async move {
            let inserted = B::insert_event(conn, event).await;
            finish::<B, _, _>(conn, inserted).await
        }
    }

    /// Writes the event alone (an emit without entity operations): in a transaction of its own
    /// unless [`INSERT_IS_ATOMIC`](Self::INSERT_IS_ATOMIC) and the event has no ordering key.
    fn emit_alone(
        conn: &mut B::Connection,
        event: &NewEvent,
    ) -> impl Future<Output = QueryResult<Inserted>> + Send {
        async move {
            // A keyed event's lock is held to the end of a transaction (see `LOCK_KEY`).
            if B::INSERT_IS_ATOMIC && event.ordering_key.is_none() {
                return B::insert_event(conn, event).await;
            }
            B::begin(conn).await?;
            B::commit_with_event(conn, event).await
        }
    }

    /// Writes an emit: `ops` in order, then the event's deliveries, in one transaction. When it
    /// returns the transaction is over: committed on `Ok`; on `Err` rolled back, or left for the
    /// caller's rollback when the transaction manager still counts it open.
    fn emit_with(
        conn: &mut B::Connection,
        ops: &[Operation<'_, B>],
        event: &NewEvent,
    ) -> impl Future<Output = QueryResult<Inserted>> + Send {
        async move {
            B::begin(conn).await?;
            for op in ops {
                op.run(conn).await?;
            }
            B::commit_with_event(conn, event).await
        }
    }

    /// Leases up to `limit` due deliveries (`available_at` passed, pending) of `listeners`
    /// whose `event_version` is one the listener knows (1, or at most its version in the JSON
    /// object `versions`), oldest due first, so that concurrent claimers cannot overlap:
    /// `attempts` + 1, leased now for `lease_ms`. Those past `expires_at` are made dead
    /// (`expired`) instead. A keyed delivery is leased only as its key's head; one that is not
    /// is parked instead (`parked`, and out of the due range for a while) and returned as
    /// parked.
    ///
    /// With `heads`, only the heads of those `(listener, key)` pairs (sorted): for each pair,
    /// the first delivery of the key (by event id, pending or holding the key) is claimed if it
    /// would be claimed without `heads`, or if it is parked.
    fn claim_due(
        conn: &mut B::Connection,
        listeners: &[&'static str],
        versions: &str,
        heads: Option<&[(&'static str, Arc<str>)]>,
        limit: usize,
    ) -> impl Future<Output = QueryResult<Vec<Claimed>>> + Send;

    /// [`claim_due`](Self::claim_due) without `heads`.
    fn claim(
        conn: &mut B::Connection,
        listeners: &[&'static str],
        versions: &str,
        limit: usize,
    ) -> impl Future<Output = QueryResult<Vec<Claimed>>> + Send {
        Self::claim_due(conn, listeners, versions, None, limit)
    }

    /// [`claim_due`](Self::claim_due) of the heads of these keys.
    fn claim_heads(
        conn: &mut B::Connection,
        listeners: &[&'static str],
        versions: &str,
        heads: &[(&'static str, Arc<str>)],
        limit: usize,
    ) -> impl Future<Output = QueryResult<Vec<Claimed>>> + Send {
        Self::claim_due(conn, listeners, versions, Some(heads), limit)
    }

    /// How long until a delivery of `listeners` that waits in the table falls due, if within
    /// `within` (see [`Outbox::NEXT_DUE`]); `None` when none falls due by then.
    fn next_due(
        conn: &mut B::Connection,
        listeners: &[&'static str],
        within: Duration,
    ) -> impl Future<Output = QueryResult<Option<Duration>>> + Send {
        async move {
            let row: rows::NextDue = sql::<B::Db>(Self::NEXT_DUE)
                .bind_list(listeners)
                .bind(rows::micros(within))
                .get_result(conn)
                .await?;
            Ok(row
                .us
                .map(|us| Duration::from_micros(u64::try_from(us).unwrap_or(0))))
        }
    }

    /// Deletes the deliveries of `event_id` that have not started and not finished (see
    /// [`Outbox::CANCEL`]); returns how many.
    fn cancel(
        conn: &mut B::Connection,
        event_id: EventId,
    ) -> impl Future<Output = QueryResult<u64>> + Send {
        async move {
            let (find, unpark) = Self::CANCEL_KEYS;
            let keys: Vec<rows::KeyRow> =
                sql::<B::Db>(find).bind(event_id.get()).load(conn).await?;
            let deleted = sql::<B::Db>(Self::CANCEL)
                .bind(event_id.get())
                .execute(conn)
                .await?;
            if !keys.is_empty() && deleted > 0 {
                let listeners: Vec<&str> = keys.iter().map(|k| k.listener.as_str()).collect();
                let ordering: Vec<&str> = keys.iter().map(|k| k.ordering_key.as_str()).collect();
                sql::<B::Db>(unpark)
                    .bind_list(&listeners)
                    .bind_list(&ordering)
                    .execute(conn)
                    .await?;
            }
            Ok(u64::try_from(deleted).unwrap_or(u64::MAX))
        }
    }

    /// Makes up to `limit` expired deliveries dead that no listener here can run: of listeners
    /// not in `known`, as `no_listener`; of known ones stored at a version newer than theirs
    /// (`versions`), as `unknown_version`. (Other expired deliveries of known listeners die
    /// when they are claimed.)
    fn expire(
        conn: &mut B::Connection,
        known: &[&'static str],
        versions: &str,
        limit: usize,
    ) -> impl Future<Output = QueryResult<Vec<Died>>> + Send {
        async move {
            let keys = update::keys::<B>(conn, Self::EXPIRE, |q| {
                q.bind_list(known).bind(versions).bind(rows::limit(limit))
            })
            .await?;
            Ok(keys
                .into_iter()
                .map(|key| {
                    let reason = if known.contains(&key.listener.as_str()) {
                        "unknown_version"
                    } else {
                        "no_listener"
                    };
                    Died {
                        event_id: EventId::new(key.event_id),
                        listener: key.listener,
                        reason: reason.to_owned(),
                    }
                })
                .collect())
        }
    }

    /// Counts due deliveries, per listener, of listeners not in `known` (at most `limit` rows
    /// looked at): work waiting for an instance that has those listeners.
    fn orphans(
        conn: &mut B::Connection,
        known: &[&'static str],
        limit: usize,
    ) -> impl Future<Output = QueryResult<Vec<ListenerCount>>> + Send {
        async move {
            sql::<B::Db>(Self::ORPHANS)
                .bind_list(known)
                .bind(rows::limit(limit))
                .load(conn)
                .await
        }
    }

    /// Completes a delivery in the transaction of a transactional listener, if that run still
    /// holds it: returns whether it did.
    fn complete_in_transaction(
        conn: &mut B::Connection,
        key: DeliveryKey,
        retain: bool,
    ) -> impl Future<Output = QueryResult<bool>> + Send {
        async move {
            let completed = sql::<B::Db>(if retain {
                Self::COMPLETE_RETAINED
            } else {
                Self::COMPLETE
            })
            .bind(key.event_id.get())
            .bind(key.listener)
            .bind(attempt_i32(key.attempt))
            .execute(conn)
            .await?;
            Ok(completed == 1)
        }
    }

    /// Runs [`Outbox::MAINTAIN`].
    fn maintain(conn: &mut B::Connection) -> impl Future<Output = QueryResult<()>> + Send {
        async move {
            if let Some(statement) = Self::MAINTAIN {
                sql::<B::Db>(statement).execute(conn).await?;
            }
            Ok(())
        }
    }
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

/// The fields of an outcome that is not a success, flattened for binding.
pub(crate) struct Failure {
    pub(crate) delay_us: i64,
    pub(crate) dead_reason: Option<&'static str>,
    pub(crate) error: Option<String>,
    pub(crate) undo_attempt: bool,
}

impl Failure {
    pub(crate) fn new(resolution: &Resolution) -> Self {
        let (delay, dead_reason, error, undo_attempt) = match resolution {
            Resolution::Done => (Duration::ZERO, None, None, false),
            Resolution::Retry { delay, error } => (*delay, None, Some(error.clone()), false),
            Resolution::Dead { reason, error } => (
                Duration::ZERO,
                Some(reason.as_str()),
                Some(error.clone()),
                false,
            ),
            Resolution::Release {
                undo_attempt,
                error,
            } => (Duration::ZERO, None, error.clone(), *undo_attempt),
        };
        Self {
            delay_us: rows::micros(delay),
            dead_reason,
            error,
            undo_attempt,
        }
    }
}
