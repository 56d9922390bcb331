//! Updates that report the deliveries they changed, on every backend: one statement with
//! `RETURNING`, or, on MySQL, which has none, a select of the keys followed by an update of them.

use diesel::QueryResult;
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};

use crate::store::Backend;
use crate::store::rows::DeliveryRef;
use crate::store::sql::{Sql, sql};
use crate::store::tx::finish;

/// An update of deliveries that reports which it changed.
#[derive(Debug, Clone, Copy)]
pub enum Update {
    /// One statement whose `RETURNING` clause names the columns of the rows it returns
    /// (PostgreSQL, SQLite).
    Returning(&'static str),
    /// MySQL: in one short `READ COMMITTED` transaction, `select` the keys (`event_id`,
    /// `listener`) of the deliveries to change, locking them (`SKIP LOCKED` where concurrent
    /// callers must not wait for each other); `update` those, bound as one JSON array of
    /// `[event_id, listener]` pairs.
    Keyed {
        select: &'static str,
        update: &'static str,
    },
}

/// Runs `update` with the values `bind` adds (to the statement with `RETURNING`, or to MySQL's
/// select), and returns the keys of the deliveries it changed.
pub(crate) async fn keys<'q, B: Backend>(
    conn: &mut B::Connection,
    update: Update,
    bind: impl FnOnce(Sql<'q, B::Db>) -> Sql<'q, B::Db>,
) -> QueryResult<Vec<DeliveryRef>> {
    let (select, update) = match update {
        Update::Returning(text) => return bind(sql(text)).load(conn).await,
        Update::Keyed { select, update } => (select, update),
    };
    read_committed::<B>(conn).await?;
    B::begin(conn).await?;
    let result = select_and_update::<B>(conn, select, update, bind).await;
    finish::<B, _, _>(conn, result).await
}

/// In the open transaction: selects and locks the keys, and updates them.
pub(crate) async fn select_and_update<'q, B: Backend>(
    conn: &mut B::Connection,
    select: &'static str,
    update: &'static str,
    bind: impl FnOnce(Sql<'q, B::Db>) -> Sql<'q, B::Db>,
) -> QueryResult<Vec<DeliveryRef>> {
    let keys: Vec<DeliveryRef> = bind(sql(select)).load(conn).await?;
    if !keys.is_empty() {
        sql::<B::Db>(update)
            .bind(key_json(&keys))
            .execute(conn)
            .await?;
    }
    Ok(keys)
}

/// Runs the backend's statement that makes the next transaction (or statement) lock only the
/// rows it changes, if it has one.
pub(crate) async fn read_committed<B: Backend>(conn: &mut B::Connection) -> QueryResult<()> {
    match B::READ_COMMITTED {
        Some(statement) => conn.batch_execute(statement).await,
        None => Ok(()),
    }
}

/// A JSON array of `[event_id, listener]` pairs.
pub(crate) fn key_json(keys: &[DeliveryRef]) -> String {
    serde_json::Value::from(
        keys.iter()
            .map(|k| serde_json::json!([k.event_id, k.listener]))
            .collect::<Vec<_>>(),
    )
    .to_string()
}
