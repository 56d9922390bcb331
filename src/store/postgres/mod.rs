//! PostgreSQL: `AsyncPgConnection`, claims with `FOR UPDATE SKIP LOCKED`, batches as arrays.

use crate::store::rows::{ClaimedRow, DiedRow, ListenerCountRow, VersionRow};
use std::time::Duration;

use diesel::QueryResult;
use diesel::connection::{TransactionDepthChange, TransactionManagerStatus};
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::Untyped;
use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, Text};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{
    AnsiTransactionManager, AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection,
    TransactionManager,
};

use super::sql::{Sql, sql};

mod inbox;
mod ops;
mod pipeline;
use super::{
    Backend, Claimed, DeadFilter, DeadRow, DeliveryKey, DeliveryRef, Died, Inserted, NewEvent,
    Outcome, Recorded, Retention, Sealed, StatsRows, StoredMessage, UpdateRow, attempt_i32,
    attempt_u32, micros, split_done, system_time_from_micros,
};
use crate::__private::PgStatement;
use crate::migrate::{self, Migration};
use crate::{Error, EventId, MessageId, Operation};

/// A statement of this backend that diesel caches as a prepared statement.
fn query<'a>(text: &'static str) -> Sql<'a, diesel::pg::Pg> {
    sql(text)
}

/// The PostgreSQL backend (feature `postgres`), on diesel-async's `AsyncPgConnection`.
///
/// Connect with a URL such as `postgres://user:password@host:5432/database`; the tables go into
/// the first schema of the connection's `search_path`. No system library is needed.
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[derive(Debug, Clone, Copy, Default)]
pub struct Postgres;

impl Sealed for Postgres {}

const INSERT_EVENT: &str = "\
INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, lease_ms,
                              attempts, leased_at, available_at, expires_at)
SELECT e.id, l.listener, $1, $2::jsonb, statement_timestamp(), $3, 1, statement_timestamp(),
       statement_timestamp() + $3 * interval '1 millisecond',
       statement_timestamp() + $4 * interval '1 microsecond'
FROM (SELECT nextval('txbus_event_ids') AS id) e CROSS JOIN unnest($5::text[]) AS l (listener)
RETURNING event_id AS id, (extract(epoch FROM emitted_at) * 1000000)::int8 AS emitted_at_us";

// The same for the most common event, with one listener: a plain VALUES row is cheaper for the
// server to start and run than the join with `unnest`.
const INSERT_EVENT_ONE: &str = "\
INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, lease_ms,
                              attempts, leased_at, available_at, expires_at)
VALUES (nextval('txbus_event_ids'), $5, $1, $2::jsonb, statement_timestamp(), $3, 1,
        statement_timestamp(), statement_timestamp() + $3 * interval '1 millisecond',
        statement_timestamp() + $4 * interval '1 microsecond')
RETURNING event_id AS id, (extract(epoch FROM emitted_at) * 1000000)::int8 AS emitted_at_us";

const RESERVE_ID: &str = "\
SELECT nextval('txbus_event_ids') AS id,
       (extract(epoch FROM statement_timestamp()) * 1000000)::int8 AS emitted_at_us";

// The MATERIALIZED CTE is evaluated exactly once: a plain `IN (SELECT ... LIMIT n FOR UPDATE SKIP
// LOCKED)` can be rescanned by some plans and then claim more than n rows. Deliveries found
// expired are made dead instead of leased (all SET expressions see the row as it was).
const CLAIM: &str = "\
WITH c AS MATERIALIZED (
    SELECT event_id, listener FROM txbus_deliveries
    WHERE dead_at IS NULL AND delivered_at IS NULL AND available_at <= now()
      AND listener = ANY($1)
    ORDER BY available_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED)
UPDATE txbus_deliveries d
SET attempts = CASE WHEN d.expires_at <= now() THEN d.attempts ELSE d.attempts + 1 END,
    available_at = CASE WHEN d.expires_at <= now() THEN d.available_at
                        ELSE now() + d.lease_ms * interval '1 millisecond' END,
    leased_at = CASE WHEN d.expires_at <= now() THEN NULL ELSE now() END,
    dead_at = CASE WHEN d.expires_at <= now() THEN now() END,
    dead_reason = CASE WHEN d.expires_at <= now() THEN 'expired' END
FROM c
WHERE d.event_id = c.event_id AND d.listener = c.listener
RETURNING d.event_id, d.listener, d.attempts, d.payload::text AS payload,
          (extract(epoch FROM d.emitted_at) * 1000000)::int8 AS emitted_at_us, d.lease_ms,
          d.dead_at IS NOT NULL AS expired";

// The fences of the statements below say `COALESCE(dead_at, delivered_at) IS NULL` rather than
// `dead_at IS NULL AND delivered_at IS NULL`: the latter is the predicate of the partial index
// `txbus_deliveries_due`, and with statistics taken while the table was small the planner scans
// that whole index for every key instead of looking each key up in the primary key.
const DELETE_DONE: &str = "\
DELETE FROM txbus_deliveries t
USING unnest($1::int8[], $2::text[], $3::int4[]) AS x (event_id, listener, attempts)
WHERE t.event_id = x.event_id AND t.listener = x.listener AND t.attempts = x.attempts
  AND COALESCE(t.dead_at, t.delivered_at) IS NULL";

const MARK_DONE: &str = "\
UPDATE txbus_deliveries t
SET delivered_at = now(), leased_at = NULL
FROM unnest($1::int8[], $2::text[], $3::int4[]) AS x (event_id, listener, attempts)
WHERE t.event_id = x.event_id AND t.listener = x.listener AND t.attempts = x.attempts
  AND COALESCE(t.dead_at, t.delivered_at) IS NULL";

const UPDATE_FAILED: &str = "\
UPDATE txbus_deliveries t
SET attempts = t.attempts - CASE WHEN x.undo THEN 1 ELSE 0 END,
    leased_at = NULL,
    last_error = COALESCE(x.error, t.last_error),
    dead_at = CASE WHEN x.reason IS NOT NULL
                     OR now() + x.delay_us * interval '1 microsecond' >= t.expires_at
                   THEN now() END,
    dead_reason = CASE WHEN x.reason IS NOT NULL THEN x.reason
                       WHEN now() + x.delay_us * interval '1 microsecond' >= t.expires_at
                       THEN 'expired' END,
    available_at = now() + x.delay_us * interval '1 microsecond'
FROM unnest($1::int8[], $2::text[], $3::int4[], $4::int8[], $5::text[], $6::text[], $7::bool[])
     AS x (event_id, listener, attempts, delay_us, reason, error, undo)
WHERE t.event_id = x.event_id AND t.listener = x.listener AND t.attempts = x.attempts
  AND COALESCE(t.dead_at, t.delivered_at) IS NULL
RETURNING t.event_id, t.listener, t.dead_reason";

const EXPIRE: &str = "\
WITH c AS MATERIALIZED (
    SELECT event_id, listener FROM txbus_deliveries
    WHERE dead_at IS NULL AND delivered_at IS NULL AND available_at <= now()
      AND expires_at <= now() AND NOT (listener = ANY($1))
    LIMIT $2
    FOR UPDATE SKIP LOCKED)
UPDATE txbus_deliveries d
SET dead_at = now(),
    dead_reason = 'no_listener',
    leased_at = NULL,
    last_error = COALESCE(d.last_error, 'no running instance has listener ' || d.listener)
FROM c
WHERE d.event_id = c.event_id AND d.listener = c.listener
RETURNING d.event_id, d.listener, d.dead_reason";

const ORPHANS: &str = "\
SELECT listener, count(*) AS n FROM (
    SELECT listener FROM txbus_deliveries
    WHERE dead_at IS NULL AND delivered_at IS NULL AND available_at <= now()
      AND NOT (listener = ANY($1))
    LIMIT $2) due
GROUP BY listener ORDER BY listener";

// Keyed by schema, so that buses in different schemas of one database do not wait for each other.
const LOCK_MIGRATIONS: &str =
    "SELECT pg_advisory_lock(hashtext('txbus.migrate.' || COALESCE(current_schema(), '')))";
const UNLOCK_MIGRATIONS: &str =
    "SELECT pg_advisory_unlock(hashtext('txbus.migrate.' || COALESCE(current_schema(), '')))";
const CREATE_MIGRATIONS_TABLE: &str = "\
CREATE TABLE IF NOT EXISTS txbus_migrations (
    version TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now())";

#[derive(diesel::QueryableByName)]
struct InsertedRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = BigInt)]
    emitted_at_us: i64,
}

/// The insert of an event's deliveries, or without listeners the reservation of its id.
fn insert_statement(event: &NewEvent) -> Sql<'_, Pg> {
    let statement = match &*event.listeners {
        [] => return query(RESERVE_ID),
        [_] => INSERT_EVENT_ONE,
        _ => INSERT_EVENT,
    };
    let statement = query(statement)
        .bind::<Text, _>(event.name)
        .bind::<Text, _>(&*event.payload)
        .bind::<BigInt, _>(lease_ms(event.lease))
        .bind::<BigInt, _>(micros(event.expires_after));
    match &*event.listeners {
        [one] => statement.bind::<Text, _>(*one),
        all => statement.bind::<Array<Text>, _>(all),
    }
}

/// [`insert_statement`] through a shared connection (so that it can be pipelined). It goes on
/// the wire at its first poll.
async fn insert_rows(conn: &AsyncPgConnection, event: &NewEvent) -> QueryResult<Vec<InsertedRow>> {
    insert_statement(event).load(&mut &*conn).await
}

/// An entity's write and the event's insert as one statement:
/// `WITH txbus_write AS (<write>) <insert>`. PostgreSQL runs every data-modifying statement in
/// `WITH` to completion, and a statement is atomic by itself: the emit needs no transaction, and
/// takes one round trip, one statement and one commit.
struct WithEvent<'a> {
    write: PgStatement<'a>,
    event: Sql<'a, Pg>,
}

impl QueryFragment<Pg> for WithEvent<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("WITH txbus_write AS (");
        self.write.walk_ast(out.reborrow())?;
        out.push_sql(") ");
        self.event.walk_ast(out.reborrow())
    }

    // The write decides for itself (a derived upsert is cached when its SQL texts are few); a
    // walk of the whole tree would find the upsert's clause that diesel marks as not cacheable.
    // Through the trait object: `Box`'s own implementation would walk the tree.
    fn is_safe_to_cache_prepared(&self, backend: &Pg) -> QueryResult<bool> {
        Ok((*self.write).is_safe_to_cache_prepared(backend)?
            && self.event.is_safe_to_cache_prepared(backend)?)
    }
}

/// Keyed by its SQL text in the statement cache.
impl QueryId for WithEvent<'_> {
    type QueryId = ();

    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for WithEvent<'_> {
    type SqlType = Untyped;
}

impl Backend for Postgres {
    type Connection = AsyncPgConnection;

    type Manager = AsyncDieselConnectionManager<AsyncPgConnection>;

    const NAME: &'static str = "postgres";

    fn manager(url: &str) -> Result<AsyncDieselConnectionManager<AsyncPgConnection>, Error> {
        let mut config = ManagerConfig::default();
        // Broken connections and open transactions are still detected; a ping per checkout is
        // a round trip per emit that buys nothing a failed statement would not tell.
        config.recycling_method = RecyclingMethod::Fast;
        Ok(AsyncDieselConnectionManager::new_with_config(url, config))
    }

    async fn begin(conn: &mut AsyncPgConnection) -> QueryResult<()> {
        AnsiTransactionManager::begin_transaction(conn).await
    }

    // One operation: one statement with the event's insert (see `WithEvent`). Several (whose
    // statements could touch the same row, which one statement cannot do twice): in one round
    // trip when every operation can be sent so (see `pipeline`). Otherwise BEGIN
    // and the first operation travel together when the entity can write through a shared
    // connection: both go through the prepared-statement path, whose statement-cache lock keeps
    // BEGIN first on the wire even if the write looks a type up first. BEGIN cannot fail on a
    // live idle connection (and if the connection dies, both fail); the transaction manager
    // learns about the transaction afterwards.
    async fn emit_with(
        conn: &mut AsyncPgConnection,
        ops: &[Operation<'_, Self>],
        event: &NewEvent,
    ) -> QueryResult<Inserted> {
        if let [op] = ops
            && let Some(write) = op.statement()
        {
            let statement = WithEvent {
                write,
                event: insert_statement(event),
            };
            return inserted(statement.load(conn).await?);
        }
        if let Some(result) = pipeline::emit(conn, ops, event).await {
            return result;
        }
        let first = {
            let shared: &AsyncPgConnection = conn;
            match ops.first().and_then(|op| op.pipelined(shared)) {
                None => None,
                Some(write) => {
                    let (began, written) =
                        tokio::join!(query("BEGIN").execute(&mut &*shared), write);
                    Some(began.and(written))
                }
            }
        };
        let rest = match first {
            None => {
                AnsiTransactionManager::begin_transaction(conn).await?;
                ops
            }
            Some(result) => {
                if let TransactionManagerStatus::Valid(status) =
                    AnsiTransactionManager::transaction_manager_status_mut(conn)
                {
                    status.change_transaction_depth(TransactionDepthChange::IncreaseDepth)?;
                }
                result?;
                &ops[1..]
            }
        };
        for op in rest {
            op.run(conn).await?;
        }
        Self::commit_with_event(conn, event).await
    }

    async fn insert_event(conn: &mut AsyncPgConnection, event: &NewEvent) -> QueryResult<Inserted> {
        inserted(insert_rows(conn, event).await?)
    }

    // The insert and COMMIT travel together, in one round trip. Both go through diesel-async's
    // prepared-statement path, whose statement-cache lock keeps them in order on the wire even
    // when one of them still has to be prepared. A failure of the insert in the server aborts the
    // transaction, so the COMMIT behind it rolls back; the insert cannot fail in the client before
    // it is sent (its binds are text, integers and a text array).
    async fn commit_with_event(
        conn: &mut AsyncPgConnection,
        event: &NewEvent,
    ) -> QueryResult<Inserted> {
        let result = {
            let shared: &AsyncPgConnection = conn;
            let (rows, committed) = tokio::join!(
                insert_rows(shared, event),
                query("COMMIT").execute(&mut &*shared),
            );
            rows.and_then(|rows| committed.and_then(|_| inserted(rows)))
        };
        // The COMMIT went out: the transaction is over, whatever happened. Tell the transaction
        // manager that opened it.
        if let TransactionManagerStatus::Valid(status) =
            AnsiTransactionManager::transaction_manager_status_mut(conn)
        {
            status.change_transaction_depth(TransactionDepthChange::DecreaseDepth)?;
        }
        result
    }

    // One statement writes every delivery of the event: atomic by itself, so no transaction.
    async fn emit_alone(conn: &mut AsyncPgConnection, event: &NewEvent) -> QueryResult<Inserted> {
        Self::insert_event(conn, event).await
    }

    async fn claim(
        conn: &mut AsyncPgConnection,
        listeners: &[&'static str],
        limit: usize,
    ) -> QueryResult<Vec<Claimed>> {
        let rows: Vec<ClaimedRow> = query(CLAIM)
            .bind::<Array<Text>, _>(listeners)
            .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
            .load(conn)
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| Claimed {
                event_id: EventId::new(row.event_id),
                listener: row.listener,
                attempt: attempt_u32(row.attempts),
                payload: row.payload.into(),
                emitted_at: system_time_from_micros(row.emitted_at_us),
                lease: Duration::from_millis(u64::try_from(row.lease_ms).unwrap_or(0)),
                expired: row.expired,
            })
            .collect())
    }

    async fn record(
        conn: &mut AsyncPgConnection,
        outcomes: &[Outcome],
        retain: bool,
    ) -> QueryResult<Recorded> {
        let (done, other) = split_done(outcomes);
        let mut recorded = Recorded::default();
        if !done.is_empty() {
            recorded.applied += finish_done(conn, &done, retain).await?;
        }
        if !other.is_empty() {
            let keys: Vec<DeliveryKey> = other.iter().map(|o| o.key).collect();
            let (event_ids, listeners, attempts) = key_columns(&keys);
            let rows: Vec<UpdateRow> = other
                .iter()
                .map(|o| UpdateRow::new(&o.resolution))
                .collect();
            let died: Vec<DiedRow> = query(UPDATE_FAILED)
                .bind::<Array<BigInt>, _>(event_ids)
                .bind::<Array<Text>, _>(listeners)
                .bind::<Array<Integer>, _>(attempts)
                .bind::<Array<BigInt>, _>(rows.iter().map(|r| r.delay_us).collect::<Vec<_>>())
                .bind::<Array<Nullable<Text>>, _>(
                    rows.iter().map(|r| r.dead_reason).collect::<Vec<_>>(),
                )
                .bind::<Array<Nullable<Text>>, _>(
                    rows.iter().map(|r| r.error.as_deref()).collect::<Vec<_>>(),
                )
                .bind::<Array<Bool>, _>(rows.iter().map(|r| r.undo_attempt).collect::<Vec<_>>())
                .load(conn)
                .await?;
            recorded.applied += died.len();
            recorded
                .died
                .extend(died.into_iter().filter_map(died_from_row));
        }
        Ok(recorded)
    }

    async fn expire(
        conn: &mut AsyncPgConnection,
        known: &[&'static str],
        limit: usize,
    ) -> QueryResult<Vec<Died>> {
        let rows: Vec<DiedRow> = query(EXPIRE)
            .bind::<Array<Text>, _>(known)
            .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
            .load(conn)
            .await?;
        Ok(rows.into_iter().filter_map(died_from_row).collect())
    }

    async fn orphans(
        conn: &mut AsyncPgConnection,
        known: &[&'static str],
        limit: usize,
    ) -> QueryResult<Vec<(String, i64)>> {
        let rows: Vec<ListenerCountRow> = query(ORPHANS)
            .bind::<Array<Text>, _>(known)
            .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
            .load(conn)
            .await?;
        Ok(rows.into_iter().map(|r| (r.listener, r.n)).collect())
    }

    async fn reserve_message(
        conn: &mut AsyncPgConnection,
        id: &MessageId,
        window: Duration,
    ) -> QueryResult<bool> {
        inbox::reserve(conn, id, window).await
    }

    async fn purge_inbox(
        conn: &mut AsyncPgConnection,
        window: Duration,
        limit: usize,
    ) -> QueryResult<usize> {
        inbox::purge(conn, window, limit).await
    }

    async fn complete_in_transaction(
        conn: &mut AsyncPgConnection,
        event_id: i64,
        listener: &'static str,
        attempt: i32,
        retain: bool,
    ) -> QueryResult<bool> {
        inbox::complete(conn, event_id, listener, attempt, retain).await
    }

    async fn stats(conn: &mut AsyncPgConnection) -> QueryResult<StatsRows> {
        ops::stats(conn).await
    }

    async fn dead_letters(
        conn: &mut AsyncPgConnection,
        filter: &DeadFilter<'_>,
        limit: usize,
    ) -> QueryResult<Vec<DeadRow>> {
        ops::dead_letters(conn, filter, limit).await
    }

    async fn replay(
        conn: &mut AsyncPgConnection,
        filter: &DeadFilter<'_>,
        after: &DeliveryRef,
        limit: usize,
    ) -> QueryResult<Vec<DeliveryRef>> {
        ops::replay(conn, filter, after, limit).await
    }

    async fn purge_dead(
        conn: &mut AsyncPgConnection,
        older_than: Duration,
        limit: usize,
    ) -> QueryResult<usize> {
        ops::purge_dead(conn, older_than, limit).await
    }

    async fn cleanup(
        conn: &mut AsyncPgConnection,
        retention: Retention,
        limit: usize,
        max_batches: usize,
    ) -> QueryResult<Option<usize>> {
        ops::cleanup(conn, retention, limit, max_batches).await
    }

    async fn release_stale(conn: &mut AsyncPgConnection) -> QueryResult<usize> {
        ops::release_stale(conn).await
    }

    async fn store_message(
        conn: &mut AsyncPgConnection,
        id: &MessageId,
        payload: &str,
    ) -> QueryResult<bool> {
        inbox::store(conn, id, payload).await
    }

    async fn next_message(
        conn: &mut AsyncPgConnection,
        lease: Duration,
    ) -> QueryResult<Option<StoredMessage>> {
        inbox::next(conn, lease).await
    }

    async fn delete_message(
        conn: &mut AsyncPgConnection,
        id: &MessageId,
        deliveries: i32,
    ) -> QueryResult<bool> {
        inbox::delete(conn, id, deliveries).await
    }

    async fn message_count(conn: &mut AsyncPgConnection) -> QueryResult<i64> {
        inbox::count(conn).await
    }

    async fn migrate(conn: &mut AsyncPgConnection) -> Result<Vec<String>, Error> {
        conn.batch_execute(LOCK_MIGRATIONS).await?;
        let result = apply_migrations(conn, migrate::POSTGRES).await;
        // On a broken connection the session ends, and the lock with it.
        let unlocked = conn.batch_execute(UNLOCK_MIGRATIONS).await;
        let applied = result?;
        unlocked?;
        Ok(applied)
    }
}

async fn apply_migrations(
    conn: &mut AsyncPgConnection,
    migrations: &[Migration],
) -> Result<Vec<String>, Error> {
    conn.batch_execute(CREATE_MIGRATIONS_TABLE).await?;
    let done: Vec<VersionRow> = query("SELECT version FROM txbus_migrations")
        .load(conn)
        .await?;
    let done: Vec<String> = done.into_iter().map(|row| row.version).collect();
    let mut applied = Vec::new();
    for migration in migrate::pending(migrations, &done) {
        conn.transaction(async |conn| {
            conn.batch_execute(migration.up).await?;
            query("INSERT INTO txbus_migrations (version, name) VALUES ($1, $2)")
                .bind::<Text, _>(migration.version)
                .bind::<Text, _>(migration.name)
                .execute(conn)
                .await
        })
        .await
        .map_err(|source| Error::Migration {
            version: migration.version.to_owned(),
            source,
        })?;
        applied.push(migration.version.to_owned());
    }
    Ok(applied)
}

/// Deletes the successes, or marks them delivered with `retain`.
async fn finish_done(
    conn: &mut AsyncPgConnection,
    done: &[DeliveryKey],
    retain: bool,
) -> QueryResult<usize> {
    let (event_ids, listeners, attempts) = key_columns(done);
    query(if retain { MARK_DONE } else { DELETE_DONE })
        .bind::<Array<BigInt>, _>(&event_ids)
        .bind::<Array<Text>, _>(&listeners)
        .bind::<Array<Integer>, _>(&attempts)
        .execute(conn)
        .await
}

/// The id and emit time of the first row an insert returned.
fn inserted(rows: Vec<InsertedRow>) -> QueryResult<Inserted> {
    let row = rows
        .into_iter()
        .next()
        .ok_or(diesel::result::Error::NotFound)?;
    Ok(Inserted {
        id: EventId::new(row.id),
        emitted_at: system_time_from_micros(row.emitted_at_us),
    })
}

fn key_columns(keys: &[DeliveryKey]) -> (Vec<i64>, Vec<&'static str>, Vec<i32>) {
    let event_ids = keys.iter().map(|k| k.event_id.get()).collect();
    let listeners = keys.iter().map(|k| k.listener).collect();
    let attempts = keys.iter().map(|k| attempt_i32(k.attempt)).collect();
    (event_ids, listeners, attempts)
}

fn died_from_row(row: DiedRow) -> Option<Died> {
    Some(Died {
        event_id: EventId::new(row.event_id),
        listener: row.listener,
        reason: row.dead_reason?,
    })
}

/// Whole milliseconds, at least one, for the `lease_ms` column.
fn lease_ms(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX).max(1)
}
