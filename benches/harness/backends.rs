//! The statements the benchmarks need that differ between backends: a bulk backlog, and the
//! plain-SQL drain that is the poller's baseline.

use std::future::Future;

use diesel::sql_types::BigInt;
use diesel_async::RunQueryDsl;
use txbus::{Entity, Pool};

use super::BenchUser;
use crate::support::TestBackend;
use crate::support::backends::exec;

/// The listener id the backlog is written for.
pub const DRAIN_LISTENER: &str = "bench.drain";

/// A backend the benchmarks run on.
pub trait BenchBackend: TestBackend
where
    BenchUser: Entity<Self>,
{
    /// SQL that yields the numbers 1..=n as rows of a column `n`, for `INSERT ... SELECT`.
    fn series(n: usize) -> String;

    /// The database clock plus `seconds`, as the backend's delivery time columns want it.
    fn now_plus(seconds: u32) -> String;

    /// A statement that brings `txbus_deliveries` to its steady state after a bulk write, where
    /// the server would do it later in the background (PostgreSQL's autovacuum: statistics and
    /// the visibility map), so that a measurement does not run beside that work.
    const ANALYZE: Option<&'static str> = None;

    /// Takes `n` consecutive event ids; returns the first.
    fn reserve_event_ids(pool: &Pool<Self>, n: usize) -> impl Future<Output = i64> + Send;

    /// Statements to run first, on the connection that writes the backlog.
    fn backlog_setup() -> &'static [&'static str] {
        &[]
    }

    /// How many connections the plain-SQL drain runs at once: two where `SKIP LOCKED` lets them
    /// work side by side (one claims while the other's delete commits, as the poller's claims
    /// overlap its completions), one on SQLite, whose writers take turns.
    const DRAINERS: usize = 2;

    /// How many statements the database server has run so far, for a count of what an idle
    /// bus costs it; `None` for an embedded database.
    fn statements(_pool: &Pool<Self>) -> impl Future<Output = Option<i64>> + Send {
        async { None }
    }

    /// Deletes up to `batch` due deliveries with plain SQL, as a queue that only removes work
    /// would, with the predicate the due index serves; returns how many it removed.
    fn raw_drain(pool: &Pool<Self>, batch: i64) -> impl Future<Output = usize> + Send;
}

/// Writes `n` events, each with one delivery for [`DRAIN_LISTENER`] that is due now, in chunks,
/// as a crash would leave them.
pub async fn bulk_backlog<B: BenchBackend>(pool: &Pool<B>, n: usize, payload: &str)
where
    BenchUser: Entity<B>,
{
    bulk_backlog_due::<B>(pool, n, payload, 0).await;
}

/// [`bulk_backlog`] with deliveries that fall due `due_in` seconds after the write.
pub async fn bulk_backlog_due<B: BenchBackend>(pool: &Pool<B>, n: usize, payload: &str, due_in: u32)
where
    BenchUser: Entity<B>,
{
    bulk_backlog_keyed::<B>(pool, n, payload, due_in, None).await;
}

/// [`bulk_backlog_due`] with events keyed round robin over `keys` ordering keys (`k0`, `k1`,
/// ...), or unkeyed.
pub async fn bulk_backlog_keyed<B: BenchBackend>(
    pool: &Pool<B>,
    n: usize,
    payload: &str,
    due_in: u32,
    keys: Option<usize>,
) where
    BenchUser: Entity<B>,
{
    let key = keys.map_or("NULL".to_owned(), |keys| {
        format!("concat('k', s.n % {keys})")
    });
    assert!(
        !payload.contains('\''),
        "the payload is written into the statement"
    );
    let mut conn = pool.get().await.unwrap();
    for setup in B::backlog_setup() {
        // A variable one of MySQL and MariaDB does not know is fine.
        let _ = diesel_async::SimpleAsyncConnection::batch_execute(&mut *conn, setup).await;
    }
    drop(conn);
    const CHUNK: usize = 50_000;
    let mut written = 0;
    while written < n {
        let chunk = CHUNK.min(n - written);
        let first = B::reserve_event_ids(pool, chunk).await;
        exec(
            pool,
            &format!(
                "INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, \
                 lease_ms, attempts, available_at, expires_at, ordering_key) \
                 SELECT {first} + s.n - 1, '{DRAIN_LISTENER}', 'bench.drained', '{payload}', {now}, \
                 30000, 0, {due}, {later}, {key} FROM ({series}) s",
                now = B::now_plus(0),
                due = B::now_plus(due_in),
                later = B::now_plus(24 * 3600),
                series = B::series(chunk),
            ),
        )
        .await;
        written += chunk;
    }
}

#[derive(diesel::QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

#[cfg(feature = "postgres")]
impl BenchBackend for txbus::Postgres {
    fn series(n: usize) -> String {
        format!("SELECT generate_series(1, {n}) AS n")
    }

    fn now_plus(seconds: u32) -> String {
        format!("(now() + interval '{seconds} seconds')")
    }

    const ANALYZE: Option<&'static str> = Some("VACUUM ANALYZE txbus_deliveries");

    async fn reserve_event_ids(pool: &Pool<Self>, n: usize) -> i64 {
        // The sequence hands out ids one by one; move it past the block and use the block.
        let mut conn = pool.get().await.unwrap();
        let first: Id = diesel::sql_query(
            "SELECT setval('txbus_event_ids', nextval('txbus_event_ids') + $1 - 1) - $1 + 1 AS id",
        )
        .bind::<BigInt, _>(n as i64)
        .get_result(&mut *conn)
        .await
        .unwrap();
        first.id
    }

    async fn statements(pool: &Pool<Self>) -> Option<i64> {
        // Counted per transaction, and each statement outside one is one; backends report
        // theirs at most once a second, and when they exit.
        let mut conn = pool.get().await.unwrap();
        let n: Id = diesel::sql_query(
            "SELECT (xact_commit + xact_rollback)::int8 AS id FROM pg_stat_database \
             WHERE datname = current_database()",
        )
        .get_result(&mut *conn)
        .await
        .unwrap();
        Some(n.id)
    }

    async fn raw_drain(pool: &Pool<Self>, batch: i64) -> usize {
        let mut conn = pool.get().await.unwrap();
        let gone: Vec<Id> = diesel::sql_query(
            // Rows found through the due index, deleted by their physical address: the least
            // any drain in SQL costs (a join back on the key made PostgreSQL hash the table).
            "DELETE FROM txbus_deliveries WHERE ctid = ANY(ARRAY(
                SELECT ctid FROM txbus_deliveries
                WHERE dead_at IS NULL AND delivered_at IS NULL AND available_at <= now()
                ORDER BY available_at LIMIT $1 FOR UPDATE SKIP LOCKED))
             RETURNING event_id AS id",
        )
        .bind::<BigInt, _>(batch)
        .load(&mut *conn)
        .await
        .unwrap();
        gone.len()
    }
}

#[cfg(feature = "mysql")]
impl BenchBackend for txbus::Mysql {
    fn series(n: usize) -> String {
        format!(
            "WITH RECURSIVE s (n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < {n}) SELECT n FROM s"
        )
    }

    fn now_plus(seconds: u32) -> String {
        format!("(UTC_TIMESTAMP(6) + INTERVAL {seconds} SECOND)")
    }

    fn backlog_setup() -> &'static [&'static str] {
        &[
            "SET SESSION max_recursive_iterations = 100000000",
            "SET SESSION cte_max_recursion_depth = 100000000",
        ]
    }

    async fn reserve_event_ids(pool: &Pool<Self>, n: usize) -> i64 {
        // One AUTO_INCREMENT row per id, in one statement: the ids of a multi-row insert are
        // consecutive while no other session inserts into the table, as here.
        let mut conn = pool.get().await.unwrap();
        let newest: Id =
            diesel::sql_query("SELECT COALESCE(MAX(id), 0) AS id FROM txbus_event_ids")
                .get_result(&mut *conn)
                .await
                .unwrap();
        diesel::sql_query(format!(
            "INSERT INTO txbus_event_ids (id) SELECT {} + n FROM ({}) s",
            newest.id,
            Self::series(n)
        ))
        .execute(&mut *conn)
        .await
        .unwrap();
        newest.id + 1
    }

    async fn statements(pool: &Pool<Self>) -> Option<i64> {
        // The server's count of statements from clients, all sessions.
        let mut conn = pool.get().await.unwrap();
        let n: Id = diesel::sql_query(
            "SELECT CAST(VARIABLE_VALUE AS SIGNED) AS id FROM information_schema.GLOBAL_STATUS \
             WHERE VARIABLE_NAME = 'QUESTIONS'",
        )
        .get_result(&mut *conn)
        .await
        .unwrap();
        Some(n.id)
    }

    async fn raw_drain(pool: &Pool<Self>, batch: i64) -> usize {
        use diesel_async::AsyncConnection;
        let mut conn = pool.get().await.unwrap();
        diesel_async::SimpleAsyncConnection::batch_execute(
            &mut *conn,
            "SET TRANSACTION ISOLATION LEVEL READ COMMITTED",
        )
        .await
        .unwrap();
        // Two drainers can deadlock on InnoDB's index locks; a queue tries again, as the bus's
        // own writes do.
        loop {
            let drained = conn
                .transaction(async |conn| {
                    let ids: Vec<Id> = diesel::sql_query(
                        "SELECT event_id AS id FROM txbus_deliveries
                 WHERE delivered_at IS NULL AND dead_at IS NULL AND available_at <= UTC_TIMESTAMP(6)
                 ORDER BY available_at LIMIT ? FOR UPDATE SKIP LOCKED",
                    )
                    .bind::<BigInt, _>(batch)
                    .load(conn)
                    .await?;
                    if ids.is_empty() {
                        return Ok(0);
                    }
                    let list = ids
                        .iter()
                        .map(|i| i.id.to_string())
                        .collect::<Vec<_>>()
                        .join(",");
                    diesel::sql_query(format!(
                        "DELETE FROM txbus_deliveries WHERE event_id IN ({list})"
                    ))
                    .execute(conn)
                    .await?;
                    diesel::QueryResult::Ok(ids.len())
                })
                .await;
            match drained {
                Ok(n) => return n,
                Err(error) if error.to_string().contains("Deadlock") => continue,
                Err(error) => panic!("the plain drain failed: {error}"),
            }
        }
    }
}

#[cfg(feature = "sqlite")]
impl BenchBackend for txbus::Sqlite {
    const DRAINERS: usize = 1;

    fn series(n: usize) -> String {
        format!(
            "WITH RECURSIVE s (n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < {n}) SELECT n FROM s"
        )
    }

    fn now_plus(seconds: u32) -> String {
        format!(
            "(CAST(unixepoch('subsec') * 1000 AS INTEGER) + {})",
            u64::from(seconds) * 1000
        )
    }

    async fn reserve_event_ids(pool: &Pool<Self>, n: usize) -> i64 {
        let mut conn = pool.get().await.unwrap();
        let last: Id = diesel::sql_query(
            "UPDATE txbus_sequence SET value = value + ? WHERE name = 'event_id' RETURNING value AS id",
        )
        .bind::<BigInt, _>(n as i64)
        .get_result(&mut *conn)
        .await
        .unwrap();
        last.id - n as i64 + 1
    }

    async fn raw_drain(pool: &Pool<Self>, batch: i64) -> usize {
        let mut conn = pool.get().await.unwrap();
        let gone: Vec<Id> = diesel::sql_query(
            "DELETE FROM txbus_deliveries WHERE (event_id, listener) IN (
                SELECT event_id, listener FROM txbus_deliveries
                WHERE dead_at IS NULL AND delivered_at IS NULL
                  AND available_at <= CAST(unixepoch('subsec') * 1000 AS INTEGER)
                ORDER BY available_at LIMIT ?) RETURNING event_id AS id",
        )
        .bind::<BigInt, _>(batch)
        .load(&mut *conn)
        .await
        .unwrap();
        gone.len()
    }
}
