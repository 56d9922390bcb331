//! PostgreSQL: the outbox's statements, an emit in one round trip, results written as arrays.

use std::sync::Arc;

use diesel::QueryResult;
use diesel::connection::{TransactionDepthChange, TransactionManagerStatus};
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::Untyped;
use diesel_async::{AnsiTransactionManager, AsyncPgConnection, RunQueryDsl, TransactionManager};

use super::claim::{CLAIM, CLAIM_HEADS};
use super::insert::{
    EmittedRow, EventColumns, LOCK_KEY, RESERVE_IDS, insert_rows, insert_statement, reads_the_write,
};
use super::{Postgres, pipeline};
use crate::delivery::{DeliveryKey, Outcome};
use crate::store::outbox::{Failure, split_done};
use crate::store::rows::{self, ClaimedRow, DiedRow, InsertedRow, attempt_i32, inserted};
use crate::store::sql::{Sql, sql};
use crate::store::{
    Claimed, Inserted, NewEvent, Operation, Outbox, Persist, Recorded, Statement, Update,
};

// The fences of the result writes say `COALESCE(dead_at, delivered_at) IS NULL` rather than
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

impl Outbox for Postgres {
    const EXPIRE: Update = Update::Returning(
        "\
WITH c AS MATERIALIZED (
    SELECT event_id, listener FROM txbus_deliveries
    WHERE dead_at IS NULL AND delivered_at IS NULL AND available_at <= now()
      AND expires_at <= now()
      AND (NOT (listener = ANY($1))
           OR (event_version > 1
               AND event_version > COALESCE(($2::jsonb ->> listener)::int4, 0)))
    LIMIT $3
    FOR UPDATE SKIP LOCKED)
UPDATE txbus_deliveries d
SET dead_at = now(),
    dead_reason = CASE WHEN d.listener = ANY($1) THEN 'unknown_version' ELSE 'no_listener' END,
    leased_at = NULL,
    last_error = COALESCE(d.last_error,
                          CASE WHEN d.listener = ANY($1)
                               THEN 'no running instance knows version ' || d.event_version
                                    || ' of event ' || d.event_name
                               ELSE 'no running instance has listener ' || d.listener END)
FROM c
WHERE d.event_id = c.event_id AND d.listener = c.listener
RETURNING d.event_id, d.listener",
    );

    const ORPHANS: &'static str = "\
SELECT listener, count(*) AS n FROM (
    SELECT listener FROM txbus_deliveries
    WHERE dead_at IS NULL AND delivered_at IS NULL AND available_at <= now()
      AND NOT (listener = ANY($1))
    LIMIT $2) due
GROUP BY listener ORDER BY listener";

    const NEXT_DUE: &'static str = "\
SELECT (extract(epoch FROM min(available_at) - now()) * 1000000)::int8 AS us
FROM txbus_deliveries
WHERE dead_at IS NULL AND delivered_at IS NULL AND available_at > now()
  AND available_at <= now() + $2 * interval '1 microsecond' AND listener = ANY($1)";

    // `COALESCE` keeps the planner on the primary key, as in the result writes.
    const CANCEL: &'static str = "\
DELETE FROM txbus_deliveries
WHERE event_id = $1 AND COALESCE(dead_at, delivered_at) IS NULL
  AND (leased_at IS NULL OR available_at <= now())";

    // The parked deliveries of the keys are found through the key index.
    const CANCEL_KEYS: (&'static str, &'static str) = (
        "\
SELECT DISTINCT listener, ordering_key FROM txbus_deliveries
WHERE event_id = $1 AND ordering_key IS NOT NULL AND COALESCE(dead_at, delivered_at) IS NULL
  AND (leased_at IS NULL OR available_at <= now())",
        "\
UPDATE txbus_deliveries d SET available_at = now(), parked = FALSE
FROM unnest($1::text[], $2::text[]) AS k (listener, ordering_key)
WHERE d.listener = k.listener AND d.ordering_key = k.ordering_key AND d.parked
  AND d.ordering_key IS NOT NULL AND d.delivered_at IS NULL AND d.dead_at IS NULL",
    );

    // Fenced like the result writes: `COALESCE` keeps the planner on the primary key.
    const COMPLETE: &'static str = "\
DELETE FROM txbus_deliveries
WHERE event_id = $1 AND listener = $2 AND attempts = $3
  AND COALESCE(dead_at, delivered_at) IS NULL";

    const COMPLETE_RETAINED: &'static str = "\
UPDATE txbus_deliveries SET delivered_at = now(), leased_at = NULL
WHERE event_id = $1 AND listener = $2 AND attempts = $3
  AND COALESCE(dead_at, delivered_at) IS NULL";

    const PERSIST: Persist = Persist::Upsert;

    const LOCK_KEY: Option<&'static str> = Some(LOCK_KEY);

    // One statement writes every delivery of the event.
    const INSERT_IS_ATOMIC: bool = true;

    const ID_BLOCK: usize = 256;

    async fn reserve_ids(conn: &mut AsyncPgConnection, n: usize) -> QueryResult<Vec<Inserted>> {
        let rows: Vec<InsertedRow> = sql::<Pg>(RESERVE_IDS)
            .bind(crate::store::rows::limit(n))
            .load(conn)
            .await?;
        let mut ids: Vec<Inserted> = rows.into_iter().map(Inserted::from).collect();
        ids.sort_by_key(|i| i.id.get());
        Ok(ids)
    }

    // The insert and COMMIT travel together, as in `commit_with_event`.
    async fn commit_with_events(
        conn: &mut AsyncPgConnection,
        events: &[(Inserted, &NewEvent)],
    ) -> QueryResult<()> {
        let columns = EventColumns::new(events);
        if columns.is_empty() {
            return AnsiTransactionManager::commit_transaction(conn).await;
        }
        let result = {
            let shared: &AsyncPgConnection = conn;
            let (written, committed) = tokio::join!(
                biased;
                columns.statement()
                    .execute(&mut &*shared),
                sql::<Pg>("COMMIT").execute(&mut &*shared),
            );
            written.and(committed).map(drop)
        };
        change_depth(conn, TransactionDepthChange::DecreaseDepth)?;
        result
    }

    // One statement, atomic by itself, keyed or not: a keyed event's takes its key's lock (see
    // `INSERT_KEYED`), which its implicit transaction holds to its commit.
    async fn emit_alone(conn: &mut AsyncPgConnection, event: &NewEvent) -> QueryResult<Inserted> {
        Self::insert_event(conn, event).await
    }

    async fn insert_event(conn: &mut AsyncPgConnection, event: &NewEvent) -> QueryResult<Inserted> {
        inserted(insert_rows(conn, event).await?)
    }

    // The statements are in `claim.rs`.
    async fn claim_due(
        conn: &mut AsyncPgConnection,
        listeners: &[&'static str],
        versions: &str,
        heads: Option<&[(&'static str, Arc<str>)]>,
        limit: usize,
    ) -> QueryResult<Vec<Claimed>> {
        let (head_listeners, keys): (Vec<&str>, Vec<&str>) = heads
            .unwrap_or_default()
            .iter()
            .map(|(listener, key)| (*listener, &**key))
            .unzip();
        let statement = sql::<Pg>(if heads.is_some() { CLAIM_HEADS } else { CLAIM })
            .bind_list(listeners)
            .bind(versions)
            .bind(rows::limit(limit));
        let rows: Vec<ClaimedRow> = match heads {
            Some(_) => {
                statement
                    .bind_list(&head_listeners)
                    .bind_list(&keys)
                    .load(conn)
                    .await?
            }
            None => statement.load(conn).await?,
        };
        Ok(rows.into_iter().map(Claimed::from).collect())
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
                biased;
                insert_rows(shared, event),
                sql::<Pg>("COMMIT").execute(&mut &*shared),
            );
            rows.and_then(|rows| committed.and_then(|_| inserted(rows)))
        };
        // The COMMIT went out: the transaction is over, whatever happened. Tell the transaction
        // manager that opened it.
        change_depth(conn, TransactionDepthChange::DecreaseDepth)?;
        result
    }

    // One operation: one statement with the event's insert (see `WithEvent`). Several (whose
    // statements could touch the same row, which one statement cannot do twice): in one round
    // trip when every operation can be sent so (see `pipeline`). Otherwise BEGIN and the first
    // operation travel together when the entity is derived: both go through the
    // prepared-statement path, whose statement-cache lock keeps BEGIN first on the wire even if
    // the write looks a type up first. BEGIN cannot fail on a live idle connection (and if the
    // connection dies, both fail); the transaction manager learns about the transaction
    // afterwards.
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
                read: reads_the_write(event),
                event: insert_statement(event, true),
            };
            let rows: Vec<EmittedRow> = statement.load(conn).await?;
            return inserted(rows);
        }
        if let Some(result) = pipeline::emit(conn, ops, event).await {
            return result;
        }
        let first = match ops.first().and_then(Operation::statement) {
            None => None,
            Some(write) => {
                let shared: &AsyncPgConnection = conn;
                let (began, written) = tokio::join!(
                    biased;
                    sql::<Pg>("BEGIN").execute(&mut &*shared),
                    write.execute(&mut &*shared),
                );
                Some(began.and(written))
            }
        };
        let rest = match first {
            None => {
                AnsiTransactionManager::begin_transaction(conn).await?;
                ops
            }
            Some(result) => {
                change_depth(conn, TransactionDepthChange::IncreaseDepth)?;
                result?;
                &ops[1..]
            }
        };
        for op in rest {
            op.run(conn).await?;
        }
        Self::commit_with_event(conn, event).await
    }

    async fn record(
        conn: &mut AsyncPgConnection,
        outcomes: &[Outcome],
        retain: bool,
    ) -> QueryResult<Recorded> {
        let (done, other) = split_done(outcomes);
        let mut recorded = Recorded::default();
        if !done.is_empty() {
            let (event_ids, listeners, attempts) = key_columns(&done);
            recorded.applied += sql::<Pg>(if retain { MARK_DONE } else { DELETE_DONE })
                .bind(&event_ids[..])
                .bind_list(&listeners)
                .bind(&attempts[..])
                .execute(conn)
                .await?;
        }
        if !other.is_empty() {
            let keys: Vec<DeliveryKey> = other.iter().map(|o| o.key).collect();
            let (event_ids, listeners, attempts) = key_columns(&keys);
            let failures: Vec<Failure> =
                other.iter().map(|o| Failure::new(&o.resolution)).collect();
            let delays: Vec<i64> = failures.iter().map(|f| f.delay_us).collect();
            let reasons: Vec<Option<&str>> = failures.iter().map(|f| f.dead_reason).collect();
            let errors: Vec<Option<&str>> = failures.iter().map(|f| f.error.as_deref()).collect();
            let undo: Vec<bool> = failures.iter().map(|f| f.undo_attempt).collect();
            let died: Vec<DiedRow> = sql::<Pg>(UPDATE_FAILED)
                .bind(&event_ids[..])
                .bind_list(&listeners)
                .bind(&attempts[..])
                .bind(&delays[..])
                .bind(&reasons[..])
                .bind(&errors[..])
                .bind(&undo[..])
                .load(conn)
                .await?;
            recorded.applied += died.len();
            recorded
                .died
                .extend(died.into_iter().filter_map(DiedRow::died));
        }
        Ok(recorded)
    }
}

/// Tells the transaction manager about a transaction opened or ended by a pipelined statement.
pub(super) fn change_depth(
    conn: &mut AsyncPgConnection,
    change: TransactionDepthChange,
) -> QueryResult<()> {
    match AnsiTransactionManager::transaction_manager_status_mut(conn) {
        TransactionManagerStatus::Valid(status) => status.change_transaction_depth(change),
        TransactionManagerStatus::InError => Ok(()),
    }
}

/// An entity's write and the event's insert as one statement:
/// `WITH txbus_write AS (<write>) <insert>`. PostgreSQL runs every data-modifying statement in
/// `WITH` to completion, and a statement is atomic by itself: the emit needs no transaction, and
/// takes one round trip, one statement and one commit.
///
/// PostgreSQL runs a `WITH` write that nothing reads after the statement's main part. A keyed
/// event's insert takes the key's lock, which every emit takes after its entity writes (a
/// deadlock otherwise), so it reads the write (`read`: the write returns a row per row written)
/// before the lock.
struct WithEvent<'a> {
    write: Statement<'a, Pg>,
    read: bool,
    event: Sql<'a, Pg>,
}

impl QueryFragment<Pg> for WithEvent<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("WITH txbus_write AS (");
        self.write.walk_ast(out.reborrow())?;
        out.push_sql(if self.read { " RETURNING 1) " } else { ") " });
        self.event.walk_ast(out.reborrow())
    }

    // The write decides for itself (a derived upsert is cached when its SQL texts are few); a
    // walk of the whole tree would find the upsert's clause that diesel marks as not cacheable.
    fn is_safe_to_cache_prepared(&self, backend: &Pg) -> QueryResult<bool> {
        Ok(self.write.is_safe_to_cache_prepared(backend)?
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

fn key_columns(keys: &[DeliveryKey]) -> (Vec<i64>, Vec<&'static str>, Vec<i32>) {
    let event_ids = keys.iter().map(|k| k.event_id.get()).collect();
    let listeners = keys.iter().map(|k| k.listener).collect();
    let attempts = keys.iter().map(|k| attempt_i32(k.attempt)).collect();
    (event_ids, listeners, attempts)
}
