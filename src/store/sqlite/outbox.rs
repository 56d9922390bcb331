//! SQLite: the outbox's statements; an emit's write and a batch of results each in one trip to
//! the blocking pool.

use std::sync::Arc;

use diesel::connection::{AnsiTransactionManager, TransactionManager};
use diesel::sqlite::{Sqlite as Db, SqliteConnection};
use diesel::{QueryResult, RunQueryDsl};

use super::{Conn, Sqlite, claim};
use crate::delivery::Outcome;
use crate::event::EventId;
use crate::store::outbox::{Failure, split_done};
use crate::store::rows::{self, DiedRow, attempt_i32, lease_ms, rows, system_time_from_micros};
use crate::store::sql::sql;
use crate::store::{Claimed, Inserted, NewEvent, Outbox, Persist, Recorded, Update};

const NEXT_EVENT_ID: &str = concat!(
    "UPDATE txbus_sequence SET value = value + 1 WHERE name = 'event_id' RETURNING value AS id, ",
    now_ms!(),
    " AS now_ms"
);

const INSERT_EVENT: &str = "\
INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, lease_ms,
                              attempts, leased_at, available_at, expires_at, event_version,
                              trace_context)
SELECT ?1, value, ?2, ?3, ?4, ?5, 1, ?4, ?4 + ?5, ?4 + ?6 / 1000, ?8, ?9 FROM json_each(?7)";

// A scheduled or keyed event: its deliveries are not leased, and fall due `?9` microseconds
// after `?4`. (Writers take turns, so the emits of a key take their ids in commit order.)
const INSERT_SCHEDULED: &str = "\
INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, lease_ms,
                              attempts, leased_at, available_at, expires_at, event_version,
                              ordering_key, key_hold, trace_context)
SELECT ?1, value, ?2, ?3, ?4, ?5, 0, NULL, ?4 + ?9 / 1000, ?4 + ?6 / 1000, ?8, ?10, ?11, ?12
FROM json_each(?7)";

// A keyed event whose key has nothing pending for its listeners (see `KEY_IDLE`): its
// deliveries are the key's heads, leased to the emitter as an unkeyed event's are.
const INSERT_KEY_HEAD: &str = "\
INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, lease_ms,
                              attempts, leased_at, available_at, expires_at, event_version,
                              ordering_key, key_hold, trace_context)
SELECT ?1, value, ?2, ?3, ?4, ?5, 1, ?4, ?4 + ?5, ?4 + ?6 / 1000, ?8, ?9, ?10, ?11
FROM json_each(?7)";

// Whether ordering key `?2` has nothing pending (or dead and holding it) for the listeners in
// the list `?1`, by the key index. Writers take turns, and an emit's transaction holds the
// write lock from its start, so this sees every earlier emit of the key.
const KEY_IDLE: &str = "\
SELECT NOT EXISTS (
    SELECT 1 FROM txbus_deliveries p
    WHERE p.listener IN (SELECT value FROM json_each(?1)) AND p.ordering_key = ?2
      AND p.ordering_key IS NOT NULL AND p.delivered_at IS NULL
      AND (p.dead_at IS NULL OR p.key_hold)) AS idle";

const DELETE_DONE: &str = "\
DELETE FROM txbus_deliveries WHERE event_id = ? AND listener = ? AND attempts = ?
    AND dead_at IS NULL AND delivered_at IS NULL";

// A success kept for `retain_delivered`: the same fence as the delete.
const MARK_DONE: &str = concat!(
    "UPDATE txbus_deliveries SET delivered_at = ",
    now_ms!(),
    ", leased_at = NULL
    WHERE event_id = ? AND listener = ? AND attempts = ?
    AND dead_at IS NULL AND delivered_at IS NULL"
);

const UPDATE_FAILED: &str = concat!(
    "UPDATE txbus_deliveries SET
    attempts = attempts - ?4,
    leased_at = NULL,
    last_error = COALESCE(?7, last_error),
    dead_at = CASE WHEN ?6 IS NOT NULL OR ",
    now_ms!(),
    " + ?5 / 1000 >= expires_at THEN ",
    now_ms!(),
    " END,
    dead_reason = CASE WHEN ?6 IS NOT NULL THEN ?6 WHEN ",
    now_ms!(),
    " + ?5 / 1000 >= expires_at THEN 'expired' END,
    available_at = ",
    now_ms!(),
    " + ?5 / 1000
    WHERE event_id = ?1 AND listener = ?2 AND attempts = ?3
    AND dead_at IS NULL AND delivered_at IS NULL
    RETURNING event_id, listener, dead_reason"
);

const RESERVE_IDS: &str = concat!(
    "UPDATE txbus_sequence SET value = value + ?1 WHERE name = 'event_id' RETURNING value AS id, ",
    now_ms!(),
    " AS now_ms"
);

rows! {
    /// The next event id (the last of a block) and the clock.
    struct IdRow { id: i64, now_ms: i64 }

    /// Whether an ordering key has nothing pending.
    struct IdleRow { idle: bool }
}

impl Outbox for Sqlite {
    const EXPIRE: Update = Update::Returning(concat!(
        "UPDATE txbus_deliveries SET dead_at = ",
        now_ms!(),
        ",
    dead_reason = CASE WHEN listener IN (SELECT value FROM json_each(?1))
                       THEN 'unknown_version' ELSE 'no_listener' END,
    leased_at = NULL,
    last_error = COALESCE(last_error,
                          CASE WHEN listener IN (SELECT value FROM json_each(?1))
                               THEN 'no running instance knows version ' || event_version
                                    || ' of event ' || event_name
                               ELSE 'no running instance has listener ' || listener END)
    WHERE (event_id, listener) IN (
        SELECT event_id, listener FROM txbus_deliveries
        WHERE dead_at IS NULL AND delivered_at IS NULL AND available_at <= ",
        now_ms!(),
        " AND expires_at <= ",
        now_ms!(),
        " AND (listener NOT IN (SELECT value FROM json_each(?1))
               OR (event_version > 1 AND event_version > COALESCE(
                   (SELECT j.value FROM json_each(?2) j WHERE j.key = listener), 0)))
        LIMIT ?3)
    RETURNING event_id, listener"
    ));

    const ORPHANS: &'static str = concat!(
        "SELECT listener, count(*) AS n FROM (
        SELECT listener FROM txbus_deliveries
        WHERE dead_at IS NULL AND delivered_at IS NULL AND available_at <= ",
        now_ms!(),
        " AND listener NOT IN (SELECT value FROM json_each(?1))
        LIMIT ?2) due
    GROUP BY listener ORDER BY listener"
    );

    const NEXT_DUE: &'static str = concat!(
        "SELECT (min(available_at) - ",
        now_ms!(),
        ") * 1000 AS us FROM txbus_deliveries
    WHERE dead_at IS NULL AND delivered_at IS NULL AND available_at > ",
        now_ms!(),
        " AND available_at <= ",
        now_ms!(),
        " + ?2 / 1000 AND listener IN (SELECT value FROM json_each(?1))"
    );

    const CANCEL: &'static str = concat!(
        "DELETE FROM txbus_deliveries
    WHERE event_id = ? AND dead_at IS NULL AND delivered_at IS NULL
    AND (leased_at IS NULL OR available_at <= ",
        now_ms!(),
        ")"
    );

    // The parked deliveries of the keys are found through the key index; the two lists pair
    // by position.
    const CANCEL_KEYS: (&'static str, &'static str) = (
        concat!(
            "SELECT DISTINCT listener, ordering_key FROM txbus_deliveries
    WHERE event_id = ? AND ordering_key IS NOT NULL AND dead_at IS NULL AND delivered_at IS NULL
    AND (leased_at IS NULL OR available_at <= ",
            now_ms!(),
            ")"
        ),
        concat!(
            "UPDATE txbus_deliveries SET available_at = ",
            now_ms!(),
            ", parked = 0
    WHERE parked AND ordering_key IS NOT NULL AND delivered_at IS NULL AND dead_at IS NULL
    AND (listener, ordering_key) IN (
        SELECT l.value, k.value FROM json_each(?1) l JOIN json_each(?2) k ON k.key = l.key)"
        ),
    );

    const COMPLETE: &'static str = DELETE_DONE;

    const COMPLETE_RETAINED: &'static str = MARK_DONE;

    const PERSIST: Persist = Persist::Upsert;

    async fn insert_event(conn: &mut Conn, event: &NewEvent) -> QueryResult<Inserted> {
        let row = EventRow::new(event);
        conn.spawn_blocking(move |c| row.insert(c)).await
    }

    // One trip to the blocking pool for the insert and the COMMIT (or the ROLLBACK).
    async fn commit_with_event(conn: &mut Conn, event: &NewEvent) -> QueryResult<Inserted> {
        let row = EventRow::new(event);
        conn.spawn_blocking(move |c| match row.insert(c) {
            Ok(inserted) => {
                AnsiTransactionManager::commit_transaction(c)?;
                Ok(inserted)
            }
            Err(error) => {
                let _ = AnsiTransactionManager::rollback_transaction(c);
                Err(error)
            }
        })
        .await
    }

    const ID_BLOCK: usize = 256;

    async fn reserve_ids(conn: &mut Conn, n: usize) -> QueryResult<Vec<Inserted>> {
        let n = rows::limit(n);
        let last: IdRow = conn
            .spawn_blocking(move |c| sql::<Db>(RESERVE_IDS).bind(n).get_result(c))
            .await?;
        let emitted_at = system_time_from_micros(last.now_ms.saturating_mul(1000));
        Ok((last.id - n + 1..=last.id)
            .map(|id| Inserted {
                id: EventId::new(id),
                emitted_at,
                head: false,
            })
            .collect())
    }

    // Every insert and the COMMIT (or the ROLLBACK) in one trip to the blocking pool.
    async fn commit_with_events(
        conn: &mut Conn,
        events: &[(Inserted, &NewEvent)],
    ) -> QueryResult<()> {
        let rows: Vec<(Inserted, EventRow)> = events
            .iter()
            .filter(|(_, event)| !event.listeners.is_empty())
            .map(|(inserted, event)| (*inserted, EventRow::new(event)))
            .collect();
        conn.spawn_blocking(move |c| {
            let written = rows
                .iter()
                .try_for_each(|(inserted, row)| row.write(c, inserted));
            match written {
                Ok(()) => AnsiTransactionManager::commit_transaction(c),
                Err(error) => {
                    let _ = AnsiTransactionManager::rollback_transaction(c);
                    Err(error)
                }
            }
        })
        .await
    }

    async fn emit_alone(conn: &mut Conn, event: &NewEvent) -> QueryResult<Inserted> {
        let row = EventRow::new(event);
        conn.spawn_blocking(move |c| c.immediate_transaction(|c| row.insert(c)))
            .await
    }

    async fn claim_due(
        conn: &mut Conn,
        listeners: &[&'static str],
        versions: &str,
        heads: Option<&[(&'static str, Arc<str>)]>,
        limit: usize,
    ) -> QueryResult<Vec<Claimed>> {
        claim::claim(conn, listeners, versions, heads, limit).await
    }

    // One immediate transaction on the blocking pool, a statement per result.
    async fn record(conn: &mut Conn, outcomes: &[Outcome], retain: bool) -> QueryResult<Recorded> {
        let (done, other) = split_done(outcomes);
        let other: Vec<_> = other
            .into_iter()
            .map(|o| (o.key, Failure::new(&o.resolution)))
            .collect();
        conn.spawn_blocking(move |c| {
            c.immediate_transaction(|c| {
                let mut recorded = Recorded::default();
                for key in &done {
                    recorded.applied += sql::<Db>(if retain { MARK_DONE } else { DELETE_DONE })
                        .bind(key.event_id.get())
                        .bind(key.listener)
                        .bind(attempt_i32(key.attempt))
                        .execute(c)?;
                }
                for (key, failure) in &other {
                    let died: Vec<DiedRow> = sql::<Db>(UPDATE_FAILED)
                        .bind(key.event_id.get())
                        .bind(key.listener)
                        .bind(attempt_i32(key.attempt))
                        .bind(i64::from(failure.undo_attempt))
                        .bind(failure.delay_us)
                        .bind(failure.dead_reason)
                        .bind(failure.error.as_deref())
                        .load(c)?;
                    recorded.applied += died.len();
                    recorded
                        .died
                        .extend(died.into_iter().filter_map(DiedRow::died));
                }
                Ok(recorded)
            })
        })
        .await
    }
}

/// An event's deliveries, ready to be written on the blocking pool.
struct EventRow {
    name: &'static str,
    payload: Arc<str>,
    lease: i64,
    expires_us: i64,
    /// For a scheduled event, microseconds from the emit to its due time.
    due_us: Option<i64>,
    version: i32,
    listeners: Option<String>,
    ordering_key: Option<Arc<str>>,
    key_hold: bool,
    /// See [`NewEvent::lease_head`].
    lease_head: bool,
    trace: Option<Arc<str>>,
}

impl EventRow {
    fn new(event: &NewEvent) -> Self {
        Self {
            name: event.name,
            payload: event.payload.clone(),
            lease: lease_ms(event.lease),
            expires_us: event.expires_us(),
            due_us: event.due_in.map(crate::store::rows::micros),
            version: event.version_i32(),
            listeners: (!event.listeners.is_empty())
                .then(|| serde_json::Value::from(&*event.listeners).to_string()),
            ordering_key: event.ordering_key.clone(),
            key_hold: event.key_hold,
            lease_head: event.lease_head,
            trace: event.trace.clone(),
        }
    }

    /// Takes the next event id and writes one delivery per listener, in the open transaction:
    /// leased to the emitter as its key's heads when the key has nothing pending.
    fn insert(self, c: &mut SqliteConnection) -> QueryResult<Inserted> {
        let id: IdRow = sql::<Db>(NEXT_EVENT_ID).get_result(c)?;
        let mut inserted = Inserted {
            id: EventId::new(id.id),
            emitted_at: system_time_from_micros(id.now_ms.saturating_mul(1000)),
            head: false,
        };
        if let (true, Some(listeners), Some(key)) =
            (self.lease_head, &self.listeners, &self.ordering_key)
        {
            let idle: IdleRow = sql::<Db>(KEY_IDLE)
                .bind(listeners.as_str())
                .bind(&**key)
                .get_result(c)?;
            inserted.head = idle.idle;
        }
        self.write(c, &inserted)?;
        Ok(inserted)
    }

    /// Writes one delivery per listener for the event `inserted` names, in the open
    /// transaction: leased to the emitter unless it is scheduled or keyed, or as its key's
    /// heads (`inserted.head`).
    fn write(&self, c: &mut SqliteConnection, inserted: &Inserted) -> QueryResult<()> {
        if let Some(listeners) = &self.listeners {
            let statement = sql::<Db>(match (inserted.head, self.due_us) {
                (true, _) => INSERT_KEY_HEAD,
                (false, None) => INSERT_EVENT,
                (false, Some(_)) => INSERT_SCHEDULED,
            })
            .bind(inserted.id.get())
            .bind(self.name)
            .bind(&*self.payload)
            .bind(crate::store::micros_since_epoch(inserted.emitted_at) / 1000)
            .bind(self.lease)
            .bind(self.expires_us)
            .bind(listeners.as_str())
            .bind(self.version);
            match (inserted.head, self.due_us) {
                (true, _) => statement
                    .bind(self.ordering_key.as_deref())
                    .bind(self.key_hold),
                (false, Some(due_us)) => statement
                    .bind(due_us)
                    .bind(self.ordering_key.as_deref())
                    .bind(self.key_hold),
                (false, None) => statement,
            }
            .bind(self.trace.as_deref())
            .execute(c)?;
        }
        Ok(())
    }
}
