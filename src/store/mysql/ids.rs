//! MySQL / MariaDB: event ids, from an `AUTO_INCREMENT` table whose rows are only needed for
//! their counter. MariaDB hands them back with `RETURNING`, a block at a time; MySQL, which has
//! no `RETURNING`, one at a time, by the insert and `SELECT LAST_INSERT_ID()`.

use std::sync::atomic::{AtomicBool, Ordering};

use diesel::QueryResult;
use diesel_async::{AsyncMysqlConnection, RunQueryDsl};

use super::Mysql;
use crate::store::rows::{Count, InsertedRow, inserted};
use crate::store::sql::sql;
use crate::store::{Backend, Inserted};

const NEXT_EVENT_ID: &str = "INSERT INTO txbus_event_ids () VALUES ()";

/// The columns an id statement returns: the id and the database's time in microseconds.
macro_rules! id_and_now {
    ($id:literal) => {
        concat!(
            "CAST(",
            $id,
            " AS SIGNED) AS id,
       TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) AS emitted_at_us"
        )
    };
}

/// MariaDB (10.5 and later) returns the new id and the time from the insert: one round trip
/// instead of `NEXT_EVENT_ID` and `LOAD_EVENT_ID`.
const NEXT_EVENT_ID_RETURNING: &str = concat!(
    "INSERT INTO txbus_event_ids () VALUES () RETURNING ",
    id_and_now!("id")
);

/// MariaDB: a block of ids, one row for each element of the JSON array bound (of any numbers),
/// with the time now, in one statement. The ids of a multi-row insert need not be consecutive
/// (`innodb_autoinc_lock_mode = 2`); `RETURNING` hands each one back.
const NEXT_EVENT_IDS_RETURNING: &str = concat!(
    "INSERT INTO txbus_event_ids (id)
SELECT NULL FROM JSON_TABLE(?, '$[*]' COLUMNS (n INT PATH '$')) j
RETURNING ",
    id_and_now!("id")
);

/// Whether a server refused `RETURNING` (MySQL has none): from then on, the process takes ids in
/// two statements, one at a time. A process that talks to MariaDB only never sets it.
static NO_RETURNING: AtomicBool = AtomicBool::new(false);

const LOAD_EVENT_ID: &str = concat!("SELECT ", id_and_now!("LAST_INSERT_ID()"));

/// Takes `n` ids (one where the server has no `RETURNING`), in increasing order. Each id is a
/// row: the callers start with blocks of one.
pub(super) async fn next_event_ids(
    conn: &mut AsyncMysqlConnection,
    n: usize,
) -> QueryResult<Vec<Inserted>> {
    if n > 1 && !AtomicBool::load(&NO_RETURNING, Ordering::Relaxed) {
        let elements = vec![0_u8; n];
        match sql::<<Mysql as Backend>::Db>(NEXT_EVENT_IDS_RETURNING)
            .bind(serde_json::Value::from(elements).to_string())
            .load::<InsertedRow>(conn)
            .await
        {
            Ok(rows) if !rows.is_empty() => {
                let mut ids: Vec<Inserted> = rows.into_iter().map(Inserted::from).collect();
                ids.sort_by_key(|i| i.id.get());
                return Ok(ids);
            }
            Ok(_) => return Err(diesel::result::Error::NotFound),
            Err(error) => refused_returning(conn, error).await?,
        }
    }
    Ok(vec![next_event_id(conn).await?])
}

/// A new event id and the database's time: one statement on MariaDB, two where the server has
/// no `RETURNING`. The first refusal, which leaves the transaction as it was, teaches the process
/// that: unless the server says it is MariaDB (then the error was another and is returned).
pub(super) async fn next_event_id(conn: &mut AsyncMysqlConnection) -> QueryResult<Inserted> {
    if !AtomicBool::load(&NO_RETURNING, Ordering::Relaxed) {
        match sql::<<Mysql as Backend>::Db>(NEXT_EVENT_ID_RETURNING)
            .load::<InsertedRow>(conn)
            .await
        {
            Ok(rows) => return inserted(rows),
            Err(error) => refused_returning(conn, error).await?,
        }
    }
    sql::<<Mysql as Backend>::Db>(NEXT_EVENT_ID)
        .execute(conn)
        .await?;
    inserted(sql(LOAD_EVENT_ID).load::<InsertedRow>(conn).await?)
}

/// From now on, takes ids as on MySQL, without `RETURNING` (see `testing`).
#[cfg(feature = "testing")]
pub(crate) fn without_returning() {
    AtomicBool::store(&NO_RETURNING, true, Ordering::Relaxed);
}

/// After `error` from a statement with `RETURNING`: on MySQL, which has none (a syntax error,
/// which leaves the transaction as it was), remembers to take ids without it from now on; on
/// MariaDB the error stands.
async fn refused_returning(
    conn: &mut AsyncMysqlConnection,
    error: diesel::result::Error,
) -> QueryResult<()> {
    if is_mariadb(conn).await.unwrap_or(true) {
        return Err(error);
    }
    AtomicBool::store(&NO_RETURNING, true, Ordering::Relaxed);
    Ok(())
}

/// Whether the server is MariaDB, by its version string.
async fn is_mariadb(conn: &mut AsyncMysqlConnection) -> QueryResult<bool> {
    let rows: Vec<Count> =
        sql::<<Mysql as Backend>::Db>("SELECT CAST(VERSION() LIKE '%MariaDB%' AS SIGNED) AS n")
            .load(conn)
            .await?;
    Ok(<[Count]>::first(&rows).is_some_and(|row| row.n == 1))
}
