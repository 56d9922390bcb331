//! One isolated database per test, on each backend, and the few statements tests need that
//! differ between backends.

use std::future::Future;

use diesel::sql_types::BigInt;
#[cfg(any(feature = "postgres", feature = "mysql"))]
use diesel::sql_types::Text;
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use txbus::{Backend, Pool};

use super::{Count, DeliveryRow, TestDb, unique};

/// A backend the contract suite runs on.
pub trait TestBackend: Backend {
    /// How many migrations txbus has for this backend.
    const MIGRATIONS: i64;

    /// Whether an emit whose ordering key has nothing pending writes its deliveries leased to
    /// itself, as the key's heads, and runs them without a claim.
    const LEASES_KEY_HEADS: bool;

    /// A fresh, empty database of this backend.
    fn open() -> impl Future<Output = TestDb<Self>> + Send;

    /// Every delivery row, ordered by event and listener.
    fn deliveries(pool: &Pool<Self>) -> impl Future<Output = Vec<DeliveryRow>> + Send;

    /// Runs `sql`, a query returning one row with one column `n`.
    fn count(pool: &Pool<Self>, sql: &'static str) -> impl Future<Output = i64> + Send;

    /// Writes events named `name` with these payloads, each with one delivery for `listener`,
    /// due now and expiring after `expires_in`, as if emitted by a process that then crashed.
    fn insert_backlog(
        pool: &Pool<Self>,
        name: &'static str,
        payloads: Vec<String>,
        listener: String,
        expires_in: std::time::Duration,
    ) -> impl Future<Output = Vec<i64>> + Send;

    /// Whether the contract users table has the row `id`.
    fn user_exists(pool: &Pool<Self>, id: i64) -> impl Future<Output = bool> + Send {
        async move {
            Self::count_bound(
                pool,
                "SELECT count(*) AS n FROM contract_users WHERE id = ",
                id,
            )
            .await
                > 0
        }
    }

    /// Runs `sql` followed by the bound id, as a count.
    fn count_bound(
        pool: &Pool<Self>,
        sql: &'static str,
        id: i64,
    ) -> impl Future<Output = i64> + Send;

    /// What subtracts an hour from a timestamp column in this backend's SQL.
    const MINUS_AN_HOUR: &'static str;

    /// Moves every timestamp of the deliveries of event `event_id` an hour back, as if it had
    /// been emitted, leased, retried and finished an hour earlier: an expiry or lease an hour
    /// (or less) away is then past, and its ages exceed any window of the test by an hour.
    fn an_hour_before(pool: &Pool<Self>, event_id: i64) -> impl Future<Output = ()> + Send {
        async move {
            exec(
                pool,
                &hour_back::<Self>(
                    "txbus_deliveries",
                    DELIVERY_TIMES,
                    &format!("event_id = {event_id}"),
                ),
            )
            .await;
        }
    }

    /// Moves the timestamps of every row of `table` (`txbus_deliveries`, `txbus_inbox`,
    /// `txbus_inbox_messages`) an hour back.
    fn all_an_hour_before(
        pool: &Pool<Self>,
        table: &'static str,
    ) -> impl Future<Output = ()> + Send {
        async move {
            let columns = match table {
                "txbus_deliveries" => DELIVERY_TIMES,
                "txbus_inbox" => &["received_at"],
                "txbus_inbox_messages" => &["received_at", "available_at"],
                other => panic!("no timestamps known for {other}"),
            };
            exec(pool, &hour_back::<Self>(table, columns, "1 = 1")).await;
        }
    }
}

/// The timestamp columns of a delivery.
const DELIVERY_TIMES: &[&str] = &[
    "emitted_at",
    "available_at",
    "expires_at",
    "leased_at",
    "delivered_at",
    "dead_at",
];

/// An `UPDATE` moving `columns` of the rows of `table` matching `filter` an hour back (a NULL
/// stays NULL).
fn hour_back<B: TestBackend>(table: &str, columns: &[&str], filter: &str) -> String {
    let set: Vec<String> = columns
        .iter()
        .map(|c| format!("{c} = {c}{}", B::MINUS_AN_HOUR))
        .collect();
    format!("UPDATE {table} SET {} WHERE {filter}", set.join(", "))
}

/// A backend with row locks: a transaction can hold some deliveries while others claim.
pub trait RowLocks: TestBackend {
    /// A connection in a transaction that holds the first `n` deliveries (by event id) locked
    /// until `COMMIT`.
    fn hold_locks(
        pool: &Pool<Self>,
        n: i64,
    ) -> impl Future<Output = txbus::PooledConnection<Self>> + Send;

    /// A connection in a transaction that holds the deliveries of event `event_id` locked
    /// until `COMMIT`; returns it and how many it holds.
    fn hold_event(
        pool: &Pool<Self>,
        event_id: i64,
    ) -> impl Future<Output = (txbus::PooledConnection<Self>, usize)> + Send;
}

/// Runs a batch of statements.
pub async fn exec<B: Backend>(pool: &Pool<B>, sql: &str) {
    let mut conn = pool.get().await.unwrap();
    conn.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The table the contract scenarios write entities to.
pub async fn create_users_table<B: Backend>(pool: &Pool<B>) {
    exec(
        pool,
        "CREATE TABLE contract_users (id BIGINT PRIMARY KEY, email VARCHAR(255) NOT NULL UNIQUE)",
    )
    .await;
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use diesel_async::{AsyncConnection, AsyncPgConnection};
    use txbus::Postgres;

    const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

    fn base_url() -> String {
        std::env::var("TXBUS_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
    }

    fn unreachable(url: &str, error: impl std::fmt::Display) -> ! {
        panic!(
            "PostgreSQL is not reachable at {url}: {error}\n\
             Start the local server with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, \
             or set TXBUS_TEST_POSTGRES_URL to a server where this user may create schemas."
        )
    }

    impl TestBackend for Postgres {
        const MINUS_AN_HOUR: &'static str = " - interval '1 hour'";
        const MIGRATIONS: i64 = 9;
        const LEASES_KEY_HEADS: bool = true;

        async fn open() -> TestDb<Self> {
            let base = base_url();
            let schema = unique("txbus_t");
            let mut admin = AsyncPgConnection::establish(&base)
                .await
                .unwrap_or_else(|e| unreachable(&base, e));
            admin
                .batch_execute(&format!("CREATE SCHEMA {schema}"))
                .await
                .unwrap_or_else(|e| unreachable(&base, e));
            let separator = if base.contains('?') { '&' } else { '?' };
            let url = format!("{base}{separator}options=-csearch_path%3D{schema}");
            let pool = Pool::builder(url.clone())
                .max_size(6)
                .connect()
                .await
                .unwrap();
            let cleanup = move || {
                // Dropped from sync code, maybe inside a runtime: use a thread of its own.
                let _ = std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    runtime.block_on(async {
                        if let Ok(mut conn) = AsyncPgConnection::establish(&base).await {
                            let _ = conn
                                .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                                .await;
                        }
                    });
                })
                .join();
            };
            TestDb {
                url,
                pool,
                cleanup: Some(Box::new(cleanup)),
            }
        }

        async fn deliveries(pool: &Pool<Self>) -> Vec<DeliveryRow> {
            let mut conn = pool.get().await.unwrap();
            diesel::sql_query(
                "SELECT event_id, listener, attempts, dead_reason, last_error FROM txbus_deliveries \
                 ORDER BY event_id, listener",
            )
            .load(&mut *conn)
            .await
            .unwrap()
        }

        async fn count(pool: &Pool<Self>, sql: &'static str) -> i64 {
            let mut conn = pool.get().await.unwrap();
            let row: Count = diesel::sql_query(sql).get_result(&mut *conn).await.unwrap();
            row.n
        }

        async fn count_bound(pool: &Pool<Self>, sql: &'static str, id: i64) -> i64 {
            let mut conn = pool.get().await.unwrap();
            let row: Count = diesel::sql_query(format!("{sql}$1"))
                .bind::<BigInt, _>(id)
                .get_result(&mut *conn)
                .await
                .unwrap();
            row.n
        }

        async fn insert_backlog(
            pool: &Pool<Self>,
            name: &'static str,
            payloads: Vec<String>,
            listener: String,
            expires_in: std::time::Duration,
        ) -> Vec<i64> {
            #[derive(diesel::QueryableByName)]
            struct Id {
                #[diesel(sql_type = BigInt)]
                event_id: i64,
            }
            let mut conn = pool.get().await.unwrap();
            let mut ids = Vec::new();
            for payload in &payloads {
                let id: Id = diesel::sql_query(
                    "INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at,
                                                   lease_ms, attempts, available_at, expires_at)
                     VALUES (nextval('txbus_event_ids'), $3, $1, $2::jsonb, now(), 5000, 0, now(),
                             now() + $4 * interval '1 millisecond')
                     RETURNING event_id",
                )
                .bind::<Text, _>(name)
                .bind::<Text, _>(payload)
                .bind::<Text, _>(&listener)
                .bind::<BigInt, _>(expires_in.as_millis() as i64)
                .get_result(&mut *conn)
                .await
                .unwrap();
                ids.push(id.event_id);
            }
            ids
        }
    }
}

/// Implements [`RowLocks`] for a backend whose statements write their one parameter as `$param`.
macro_rules! row_locks {
    ($backend:ty, $param:literal) => {
        impl RowLocks for $backend {
            async fn hold_locks(pool: &Pool<Self>, n: i64) -> txbus::PooledConnection<Self> {
                let (conn, locked) =
                    lock_rows!(pool, concat!("ORDER BY event_id LIMIT ", $param), n);
                assert_eq!(locked as i64, n);
                conn
            }

            async fn hold_event(
                pool: &Pool<Self>,
                event_id: i64,
            ) -> (txbus::PooledConnection<Self>, usize) {
                lock_rows!(pool, concat!("WHERE event_id = ", $param), event_id)
            }
        }
    };
}

/// Opens a transaction on a connection of `pool` that locks the deliveries `SELECT ...
/// FROM txbus_deliveries $rest FOR UPDATE` reads, `$bind` bound; evaluates to the connection and
/// how many rows it locked.
macro_rules! lock_rows {
    ($pool:expr, $rest:expr, $bind:expr) => {{
        let mut conn = $pool.get().await.unwrap();
        conn.batch_execute("BEGIN").await.unwrap();
        let locked: Vec<Count> = diesel::sql_query(concat!(
            "SELECT event_id AS n FROM txbus_deliveries ",
            $rest,
            " FOR UPDATE"
        ))
        .bind::<BigInt, _>($bind)
        .load(&mut *conn)
        .await
        .unwrap();
        (conn, locked.len())
    }};
}

#[cfg(feature = "postgres")]
row_locks!(txbus::Postgres, "$1");

#[cfg(feature = "mysql")]
row_locks!(txbus::Mysql, "?");

#[cfg(feature = "mysql")]
mod mysql {
    use super::*;
    use diesel_async::{AsyncConnection, AsyncMysqlConnection};
    use txbus::Mysql;

    const DEFAULT_URL: &str = "mysql://root@127.0.0.1:3306/test";

    fn base_url() -> String {
        std::env::var("TXBUS_TEST_MYSQL_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
    }

    fn unreachable(url: &str, error: impl std::fmt::Display) -> ! {
        panic!(
            "MySQL/MariaDB is not reachable at {url}: {error}\n\
             Start the local server with `start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd`, \
             or set TXBUS_TEST_MYSQL_URL to a server where this user may create databases."
        )
    }

    /// `base` with its database replaced by `database`.
    fn with_database(base: &str, database: &str) -> String {
        let (address, query) = match base.split_once('?') {
            Some((address, query)) => (address, format!("?{query}")),
            None => (base, String::new()),
        };
        let scheme_end = address.find("://").map_or(0, |i| i + 3);
        let host_end = address[scheme_end..]
            .find('/')
            .map_or(address.len(), |i| scheme_end + i);
        format!("{}/{database}{query}", &address[..host_end])
    }

    impl TestBackend for Mysql {
        const MINUS_AN_HOUR: &'static str = " - INTERVAL 1 HOUR";
        const MIGRATIONS: i64 = 11;
        const LEASES_KEY_HEADS: bool = false;

        async fn open() -> TestDb<Self> {
            let base = base_url();
            let database = unique("txbus_t");
            let mut admin = AsyncMysqlConnection::establish(&base)
                .await
                .unwrap_or_else(|e| unreachable(&base, e));
            admin
                .batch_execute(&format!("CREATE DATABASE {database}"))
                .await
                .unwrap_or_else(|e| unreachable(&base, e));
            let url = with_database(&base, &database);
            let pool = Pool::builder(url.clone())
                .max_size(6)
                .connect()
                .await
                .unwrap();
            let cleanup = move || {
                let _ = std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    runtime.block_on(async {
                        if let Ok(mut conn) = AsyncMysqlConnection::establish(&base).await {
                            let _ = conn
                                .batch_execute(&format!("DROP DATABASE {database}"))
                                .await;
                        }
                    });
                })
                .join();
            };
            TestDb {
                url,
                pool,
                cleanup: Some(Box::new(cleanup)),
            }
        }

        async fn deliveries(pool: &Pool<Self>) -> Vec<DeliveryRow> {
            let mut conn = pool.get().await.unwrap();
            diesel::sql_query(
                "SELECT event_id, listener, attempts, dead_reason, last_error FROM txbus_deliveries \
                 ORDER BY event_id, listener",
            )
            .load(&mut *conn)
            .await
            .unwrap()
        }

        async fn count(pool: &Pool<Self>, sql: &'static str) -> i64 {
            let mut conn = pool.get().await.unwrap();
            let row: Count = diesel::sql_query(sql).get_result(&mut *conn).await.unwrap();
            row.n
        }

        async fn count_bound(pool: &Pool<Self>, sql: &'static str, id: i64) -> i64 {
            let mut conn = pool.get().await.unwrap();
            let row: Count = diesel::sql_query(format!("{sql}?"))
                .bind::<BigInt, _>(id)
                .get_result(&mut *conn)
                .await
                .unwrap();
            row.n
        }

        async fn insert_backlog(
            pool: &Pool<Self>,
            name: &'static str,
            payloads: Vec<String>,
            listener: String,
            expires_in: std::time::Duration,
        ) -> Vec<i64> {
            #[derive(diesel::QueryableByName)]
            struct Id {
                #[diesel(sql_type = BigInt)]
                id: i64,
            }
            let mut conn = pool.get().await.unwrap();
            conn.transaction(async |conn| {
                let mut ids = Vec::new();
                for payload in &payloads {
                    diesel::sql_query("INSERT INTO txbus_event_ids () VALUES ()").execute(conn).await?;
                    let id: Id = diesel::sql_query("SELECT CAST(LAST_INSERT_ID() AS SIGNED) AS id")
                        .get_result(conn)
                        .await?;
                    diesel::sql_query(
                        "INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, \
                         lease_ms, attempts, available_at, expires_at) \
                         VALUES (?, ?, ?, ?, UTC_TIMESTAMP(6), 5000, 0, UTC_TIMESTAMP(6), \
                                 UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND)",
                    )
                    .bind::<BigInt, _>(id.id)
                    .bind::<Text, _>(&listener)
                    .bind::<Text, _>(name)
                    .bind::<Text, _>(payload)
                    .bind::<BigInt, _>(expires_in.as_micros() as i64)
                    .execute(conn)
                    .await?;
                    ids.push(id.id);
                }
                diesel::QueryResult::Ok(ids)
            })
            .await
            .unwrap()
        }
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use txbus::Sqlite;

    impl TestBackend for Sqlite {
        // Milliseconds since the epoch.
        const MINUS_AN_HOUR: &'static str = " - 3600000";
        const MIGRATIONS: i64 = 8;
        const LEASES_KEY_HEADS: bool = true;

        async fn open() -> TestDb<Self> {
            let dir = std::env::temp_dir().join("txbus-tests");
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("{}.db", unique("db")));
            let url = path.to_str().unwrap().to_owned();
            let pool = Pool::builder(url.clone())
                .max_size(6)
                .connect()
                .await
                .unwrap();
            let cleanup = move || {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            };
            TestDb {
                url,
                pool,
                cleanup: Some(Box::new(cleanup)),
            }
        }

        async fn deliveries(pool: &Pool<Self>) -> Vec<DeliveryRow> {
            let mut conn = pool.get().await.unwrap();
            diesel::sql_query(
                "SELECT event_id, listener, attempts, dead_reason, last_error FROM txbus_deliveries \
                 ORDER BY event_id, listener",
            )
            .load(&mut *conn)
            .await
            .unwrap()
        }

        async fn count(pool: &Pool<Self>, sql: &'static str) -> i64 {
            let mut conn = pool.get().await.unwrap();
            let row: Count = diesel::sql_query(sql).get_result(&mut *conn).await.unwrap();
            row.n
        }

        async fn count_bound(pool: &Pool<Self>, sql: &'static str, id: i64) -> i64 {
            let mut conn = pool.get().await.unwrap();
            let row: Count = diesel::sql_query(format!("{sql}?"))
                .bind::<BigInt, _>(id)
                .get_result(&mut *conn)
                .await
                .unwrap();
            row.n
        }

        async fn insert_backlog(
            pool: &Pool<Self>,
            name: &'static str,
            payloads: Vec<String>,
            listener: String,
            expires_in: std::time::Duration,
        ) -> Vec<i64> {
            let expires_ms = expires_in.as_millis() as i64;
            let mut conn = pool.get().await.unwrap();
            conn.spawn_blocking(move |c| {
                sync::insert_backlog(c, name, &payloads, &listener, expires_ms)
            })
            .await
            .unwrap()
        }
    }

    /// Sync diesel, in a module of its own: its `RunQueryDsl` clashes with diesel-async's.
    mod sync {
        use diesel::sql_types::{BigInt, Text};
        use diesel::sqlite::SqliteConnection;
        use diesel::{QueryResult, RunQueryDsl};

        #[derive(diesel::QueryableByName)]
        struct Id {
            #[diesel(sql_type = BigInt)]
            id: i64,
        }

        pub(super) fn insert_backlog(
            c: &mut SqliteConnection,
            name: &str,
            payloads: &[String],
            listener: &str,
            expires_ms: i64,
        ) -> QueryResult<Vec<i64>> {
            c.immediate_transaction(|c| {
                let mut ids = Vec::new();
                for payload in payloads {
                    let id: Id = diesel::sql_query(
                        "UPDATE txbus_sequence SET value = value + 1 WHERE name = 'event_id' RETURNING value AS id",
                    )
                    .get_result(c)?;
                    diesel::sql_query(
                        "INSERT INTO txbus_deliveries (event_id, listener, event_name, payload, emitted_at, \
                         lease_ms, attempts, available_at, expires_at) \
                         VALUES (?, ?, ?, ?, CAST(unixepoch('subsec') * 1000 AS INTEGER), 5000, 0, \
                                 CAST(unixepoch('subsec') * 1000 AS INTEGER), \
                                 CAST(unixepoch('subsec') * 1000 AS INTEGER) + ?)",
                    )
                    .bind::<BigInt, _>(id.id)
                    .bind::<Text, _>(listener)
                    .bind::<Text, _>(name)
                    .bind::<Text, _>(payload)
                    .bind::<BigInt, _>(expires_ms)
                    .execute(c)?;
                    ids.push(id.id);
                }
                Ok(ids)
            })
        }
    }
}
