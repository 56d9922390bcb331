//! PostgreSQL: the inserts of events and their deliveries, one statement per emit or per
//! transaction.

use diesel::QueryResult;
use diesel::pg::Pg;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::event::EventId;
use crate::store::rows::{lease_ms, micros, rows, system_time_from_micros};
use crate::store::sql::{Sql, sql};
use crate::store::{Inserted, NewEvent};

const INSERT_EVENT: &str = "\
INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, lease_ms,
                              attempts, leased_at, available_at, expires_at, event_version,
                              trace_context)
SELECT e.id, l.listener, $1, $2::jsonb, statement_timestamp(), $3, 1, statement_timestamp(),
       statement_timestamp() + $3 * interval '1 millisecond',
       statement_timestamp() + $4 * interval '1 microsecond', $6, $7
FROM (SELECT nextval('txbus_event_ids') AS id) e CROSS JOIN unnest($5::text[]) AS l (listener)
RETURNING event_id AS id, (extract(epoch FROM emitted_at) * 1000000)::int8 AS emitted_at_us,
          FALSE AS head";

// The same for the most common event, with one listener: a plain VALUES row is cheaper for the
// server to start and run than the join with `unnest`.
const INSERT_EVENT_ONE: &str = "\
INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, lease_ms,
                              attempts, leased_at, available_at, expires_at, event_version,
                              trace_context)
VALUES (nextval('txbus_event_ids'), $5, $1, $2::jsonb, statement_timestamp(), $3, 1,
        statement_timestamp(), statement_timestamp() + $3 * interval '1 millisecond',
        statement_timestamp() + $4 * interval '1 microsecond', $6, $7)
RETURNING event_id AS id, (extract(epoch FROM emitted_at) * 1000000)::int8 AS emitted_at_us,
          FALSE AS head";

// A scheduled event: its deliveries are not leased, and fall due `$7` microseconds from now.
const INSERT_SCHEDULED: &str = "\
INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, lease_ms,
                              attempts, leased_at, available_at, expires_at, event_version,
                              trace_context)
SELECT e.id, l.listener, $1, $2::jsonb, statement_timestamp(), $3, 0, NULL,
       statement_timestamp() + $7 * interval '1 microsecond',
       statement_timestamp() + $4 * interval '1 microsecond', $6, $8
FROM (SELECT nextval('txbus_event_ids') AS id) e CROSS JOIN unnest($5::text[]) AS l (listener)
RETURNING event_id AS id, (extract(epoch FROM emitted_at) * 1000000)::int8 AS emitted_at_us,
          FALSE AS head";

const INSERT_SCHEDULED_ONE: &str = "\
INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, lease_ms,
                              attempts, leased_at, available_at, expires_at, event_version,
                              trace_context)
VALUES (nextval('txbus_event_ids'), $5, $1, $2::jsonb, statement_timestamp(), $3, 0, NULL,
        statement_timestamp() + $7 * interval '1 microsecond',
        statement_timestamp() + $4 * interval '1 microsecond', $6, $8)
RETURNING event_id AS id, (extract(epoch FROM emitted_at) * 1000000)::int8 AS emitted_at_us,
          FALSE AS head";

// A keyed event, scheduled or due now, in one statement. `txbus_key_head` (see the migration
// `key_heads`) takes the key's lock, after the entity writes of the statement (its `written`), and
// before the event's id: the emits of one key take their ids in the order they commit, so a
// claim that sees a delivery of the key sees every earlier one. Due now (`$11`), and with no
// delivery of the key pending or holding it for these listeners, the deliveries are the key's
// heads: written leased to the emitter, which runs them (`head`). Otherwise they are not leased:
// a claim takes each key's head. (The materialized CTE runs before the `nextval` that reads it.)
macro_rules! insert_keyed {
    ($written:literal) => {
        concat!(
            "k AS MATERIALIZED (SELECT txbus_key_head($5::text[], $8, $11, ",
            $written,
            ") AS head)
INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, lease_ms,
                              attempts, leased_at, available_at, expires_at, event_version,
                              ordering_key, key_hold, trace_context)
SELECT e.id, l.listener, $1, $2::jsonb, statement_timestamp(), $3,
       CASE WHEN e.head THEN 1 ELSE 0 END, CASE WHEN e.head THEN statement_timestamp() END,
       statement_timestamp() + CASE WHEN e.head THEN $3 * interval '1 millisecond'
                                    ELSE $7 * interval '1 microsecond' END,
       statement_timestamp() + $4 * interval '1 microsecond', $6, $8, $9, $10
FROM (SELECT nextval('txbus_event_ids') AS id, k.head FROM k OFFSET 0) e
CROSS JOIN unnest($5::text[]) AS l (listener)
RETURNING event_id AS id, (extract(epoch FROM emitted_at) * 1000000)::int8 AS emitted_at_us,
          attempts = 1 AS head"
        )
    };
}

/// A keyed event alone.
const INSERT_KEYED: &str = concat!("WITH ", insert_keyed!("0"));

/// A keyed event after the entity write `txbus_write` (see `WithEvent` in `outbox`), which
/// returns a row per row it wrote.
const INSERT_KEYED_AFTER_WRITE: &str =
    concat!(", ", insert_keyed!("(SELECT count(*) FROM txbus_write)"));

/// Takes the advisory lock of ordering key `$1` for the rest of the transaction: the lock of
/// `txbus_key_head`, which a keyed `tx.emit` takes before its event id.
pub(super) const LOCK_KEY: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))";

const RESERVE_ID: &str = "\
SELECT nextval('txbus_event_ids') AS id,
       (extract(epoch FROM statement_timestamp()) * 1000000)::int8 AS emitted_at_us,
       FALSE AS head";

pub(super) const RESERVE_IDS: &str = "\
SELECT nextval('txbus_event_ids') AS id,
       (extract(epoch FROM statement_timestamp()) * 1000000)::int8 AS emitted_at_us
FROM generate_series(1, $1)";

// The deliveries of a transaction's events, one row of the arrays per delivery, with the emit
// times their ids were reserved at. A scheduled event's deliveries have the microseconds until
// they fall due in `due`, and are not leased; the others have -1 there.
const INSERT_EVENTS: &str = "\
INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, lease_ms,
                              attempts, leased_at, available_at, expires_at, event_version,
                              ordering_key, key_hold, trace_context)
SELECT x.id, x.listener, x.name, x.payload::jsonb, t.at, x.lease,
       CASE WHEN x.due < 0 THEN 1 ELSE 0 END, CASE WHEN x.due < 0 THEN t.at END,
       t.at + CASE WHEN x.due < 0 THEN x.lease * interval '1 millisecond'
                   ELSE x.due * interval '1 microsecond' END,
       t.at + x.expires * interval '1 microsecond', x.version, x.ordering_key, x.key_hold,
       x.trace_context
FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::int8[],
            $8::int8[], $9::int4[], $10::text[], $11::bool[], $12::text[])
     AS x (id, listener, name, payload, emitted_us, lease, expires, due, version, ordering_key,
           key_hold, trace_context)
CROSS JOIN LATERAL (SELECT timestamptz 'epoch' + x.emitted_us * interval '1 microsecond' AS at) t";

/// The insert of an event's deliveries, or without listeners the reservation of its id. With
/// `after_write`, a keyed event's insert is the rest of a `WITH txbus_write AS (...)` statement
/// (see [`INSERT_KEYED_AFTER_WRITE`]).
pub(super) fn insert_statement(event: &NewEvent, after_write: bool) -> Sql<'_, Pg> {
    let statement = match (&*event.listeners, event.due_in) {
        ([], _) => return sql(RESERVE_ID),
        (all, _) if event.ordering_key.is_some() => {
            return sql(if after_write {
                INSERT_KEYED_AFTER_WRITE
            } else {
                INSERT_KEYED
            })
            .bind(event.name)
            .bind(&*event.payload)
            .bind(lease_ms(event.lease))
            .bind(event.expires_us())
            .bind_list(all)
            .bind(event.version_i32())
            .bind(micros(event.due_in.unwrap_or_default()))
            .bind(event.ordering_key.as_deref())
            .bind(event.key_hold)
            .bind(event.trace.as_deref())
            .bind(event.lease_head);
        }
        ([_], None) => INSERT_EVENT_ONE,
        (_, None) => INSERT_EVENT,
        ([_], Some(_)) => INSERT_SCHEDULED_ONE,
        (_, Some(_)) => INSERT_SCHEDULED,
    };
    let statement = sql(statement)
        .bind(event.name)
        .bind(&*event.payload)
        .bind(lease_ms(event.lease))
        .bind(event.expires_us());
    let statement = match &*event.listeners {
        [one] => statement.bind(*one),
        all => statement.bind_list(all),
    }
    .bind(event.version_i32());
    match event.due_in {
        Some(due_in) => statement.bind(micros(due_in)),
        None => statement,
    }
    .bind(event.trace.as_deref())
}

/// [`insert_statement`] through a shared connection (so that it can be pipelined). It goes on
/// the wire at its first poll.
pub(super) async fn insert_rows(
    conn: &AsyncPgConnection,
    event: &NewEvent,
) -> QueryResult<Vec<EmittedRow>> {
    insert_statement(event, false).load(&mut &*conn).await
}

/// Whether the insert of `event` after an entity write needs the write's rows (see
/// [`INSERT_KEYED_AFTER_WRITE`]).
pub(super) fn reads_the_write(event: &NewEvent) -> bool {
    event.ordering_key.is_some() && !event.listeners.is_empty()
}

rows! {
    /// An event's id and emit time, as an insert returns them, and whether its deliveries
    /// were leased as their key's heads.
    pub(super) struct EmittedRow { id: i64, emitted_at_us: i64, head: bool }
}

impl From<EmittedRow> for Inserted {
    fn from(row: EmittedRow) -> Self {
        Self {
            id: EventId::new(row.id),
            emitted_at: system_time_from_micros(row.emitted_at_us),
            head: row.head,
        }
    }
}

/// The columns of [`INSERT_EVENTS`], one entry per delivery.
#[derive(Default)]
pub(super) struct EventColumns<'a> {
    ids: Vec<i64>,
    listeners: Vec<&'a str>,
    names: Vec<&'a str>,
    payloads: Vec<&'a str>,
    emitted: Vec<i64>,
    leases: Vec<i64>,
    expires: Vec<i64>,
    due: Vec<i64>,
    versions: Vec<i32>,
    keys: Vec<Option<&'a str>>,
    holds: Vec<bool>,
    traces: Vec<Option<&'a str>>,
}

impl<'a> EventColumns<'a> {
    /// The columns of the deliveries of `events`.
    pub(super) fn new(events: &'a [(Inserted, &'a NewEvent)]) -> Self {
        let mut columns = Self::default();
        for (inserted, event) in events {
            for listener in event.listeners.iter() {
                columns.ids.push(inserted.id.get());
                columns.listeners.push(listener);
                columns.names.push(event.name);
                columns.payloads.push(&event.payload);
                columns
                    .emitted
                    .push(crate::store::micros_since_epoch(inserted.emitted_at));
                columns.leases.push(lease_ms(event.lease));
                columns.expires.push(event.expires_us());
                columns.due.push(event.due_in.map_or(-1, micros));
                columns.versions.push(event.version_i32());
                columns.keys.push(event.ordering_key.as_deref());
                columns.holds.push(event.key_hold);
                columns.traces.push(event.trace.as_deref());
            }
        }
        columns
    }

    /// Whether there is no delivery to write.
    pub(super) fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// [`INSERT_EVENTS`] of these columns.
    pub(super) fn statement(&self) -> Sql<'_, Pg> {
        sql::<Pg>(INSERT_EVENTS)
            .bind(&self.ids[..])
            .bind_list(&self.listeners)
            .bind_list(&self.names)
            .bind_list(&self.payloads)
            .bind(&self.emitted[..])
            .bind(&self.leases[..])
            .bind(&self.expires[..])
            .bind(&self.due[..])
            .bind(&self.versions[..])
            .bind(&self.keys[..])
            .bind(&self.holds[..])
            .bind(&self.traces[..])
    }
}
